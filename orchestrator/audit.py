"""The audit trail: who did what to which run, when and why.

Every management action writes its row in the same transaction as the action, so
the trail cannot miss an action that happened or show one that did not.
"""

from __future__ import annotations

import getpass
import os
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from orchestrator.db import as_utc
from orchestrator.schema import audit_log


def default_actor() -> str:
    """``ORCHESTRATOR_ACTOR`` if set, else the operating-system user."""
    actor = os.environ.get("ORCHESTRATOR_ACTOR")
    if actor:
        return actor
    try:
        return getpass.getuser()
    except Exception:  # no user database entry (some containers)
        return "unknown"


def record(
    session: Session,
    *,
    action: str,
    at: datetime,
    actor: str | None = None,
    workflow_id: str | None = None,
    run_id: str | None = None,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    session.execute(
        insert(audit_log).values(
            at=at,
            actor=actor or default_actor(),
            action=action,
            workflow_id=workflow_id,
            run_id=run_id,
            reason=reason or None,
            details=details,
        )
    )


def entries(
    session: Session, *, workflow_id: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """The newest audit entries first."""
    query = select(audit_log).order_by(audit_log.c.id.desc()).limit(limit)
    if workflow_id is not None:
        query = query.where(audit_log.c.workflow_id == workflow_id)
    rows = session.execute(query).mappings().all()
    return [
        {
            "id": row["id"],
            "at": as_utc(row["at"]).isoformat(),
            "actor": row["actor"],
            "action": row["action"],
            "workflow_id": row["workflow_id"],
            "run_id": row["run_id"],
            "reason": row["reason"],
            "details": row["details"],
        }
        for row in rows
    ]
