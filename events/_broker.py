"""The AMQP client library, typed as ``Any``.

Its annotations are partial, so strict type checking would flag every call;
the calls are few and tested against a real broker instead.
"""

from __future__ import annotations

from typing import Any

import kombu as _kombu

kombu: Any = _kombu
