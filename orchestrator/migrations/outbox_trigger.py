"""The insert trigger that once woke relays: created by 0001, dropped by 0003.

A trigger notified in every transaction that wrote outbox rows, and PostgreSQL
serializes notifying transactions through their commit's flush. Writers now
wake relays after their commit (:class:`outbox.doorbell.Doorbell`). The
statements stay here, fixed, for those two migrations.
"""

from __future__ import annotations

_CHANNEL = "orchestrator_outbox"
_TABLE = "outbox_messages"
_NOTIFY_FUNCTION = "outbox_messages_notify"
_NOTIFY_TRIGGER = "outbox_messages_notify"


def postgres_notify_ddl() -> list[str]:
    """Return the PostgreSQL statements that make inserts wake listening relays.

    The trigger fires once per statement, not per row, and carries an empty
    payload: a relay only needs to know that there is something to read, and
    PostgreSQL folds identical notifications of one transaction into one.
    Statements are idempotent and run in order.
    """
    return [
        f"""
        CREATE OR REPLACE FUNCTION {_NOTIFY_FUNCTION}() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{_CHANNEL}', '');
            RETURN NULL;
        END;
        $$
        """,
        f"DROP TRIGGER IF EXISTS {_NOTIFY_TRIGGER} ON {_TABLE}",
        f"""
        CREATE TRIGGER {_NOTIFY_TRIGGER}
        AFTER INSERT ON {_TABLE}
        FOR EACH STATEMENT EXECUTE FUNCTION {_NOTIFY_FUNCTION}()
        """,
    ]


def postgres_notify_drop_ddl() -> list[str]:
    """Return the PostgreSQL statements that undo :func:`postgres_notify_ddl`."""
    return [
        f"DROP TRIGGER IF EXISTS {_NOTIFY_TRIGGER} ON {_TABLE}",
        f"DROP FUNCTION IF EXISTS {_NOTIFY_FUNCTION}()",
    ]
