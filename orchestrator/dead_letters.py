"""Dead-lettered compensations: recorded, listed, replayed or discarded by an operator.

A compensation that exhausts its retry policy is never dropped: its activity
stays ``DEAD_LETTERED``, a row here keeps every attempt's error, the run shows
``COMPENSATION_BLOCKED``, and a copy goes to a RabbitMQ queue for visibility.
The workflow code simply keeps waiting for the compensation. A replay gives it a
fresh attempt budget; a discard fails it, and the saga carries on with the rest.
Both take the run's lock and check the row is still open, so doing either twice,
or from two terminals at once, acts once.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from activities.failure import Failure
from orchestrator import audit, messages
from orchestrator.activity_runner import activity_row, set_activity
from orchestrator.db import as_utc
from orchestrator.errors import DeadLetterNotFoundError
from orchestrator.history import ActivityDeadLettered, ActivityFailed
from orchestrator.lifecycle import CompensationDeadLettered, lifecycle_message
from orchestrator.policies import RunStatus
from orchestrator.runs import LockedRun, lock_run, save_run
from orchestrator.schema import dead_letters
from outbox.message import OutboxMessage

if TYPE_CHECKING:
    from orchestrator.engine import Engine

COMPENSATION_DEAD_LETTER_QUEUE = "orchestrator.compensations.dead-letter"
OPEN, REPLAYED, DISCARDED = "OPEN", "REPLAYED", "DISCARDED"


class DeadLetters:
    """The engine's dead-letter list."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(
        self,
        session: Session,
        run: LockedRun,
        row: Any,
        *,
        failure: Failure,
        attempts: list[dict[str, Any]],
        now: datetime,
    ) -> None:
        """Park a compensation that ran out of retries (inside the run's transaction)."""
        dead_letter_id = str(uuid.uuid4())
        session.execute(
            insert(dead_letters).values(
                id=dead_letter_id,
                kind="compensation",
                run_id=run.run_id,
                workflow_id=run.workflow_id,
                workflow_type=run.workflow_type,
                activity_id=row["activity_id"],
                activity_type=row["activity_type"],
                input=row["input"],
                attempts=attempts,
                status=OPEN,
                created_at=now,
            )
        )
        set_activity(
            session,
            run.run_id,
            row["activity_id"],
            status="DEAD_LETTERED",
            deadline_at=None,
            last_failure=failure.to_json(),
            attempt_failures=attempts,
        )
        run.append(
            ActivityDeadLettered(
                activity_id=row["activity_id"],
                activity_type=row["activity_type"],
                attempt=row["attempt"],
                dead_letter_id=dead_letter_id,
                failure=failure.to_json(),
            )
        )
        run.status = RunStatus.COMPENSATION_BLOCKED
        run.changes["status"] = RunStatus.COMPENSATION_BLOCKED.value
        notices = []
        if self.engine.settings.lifecycle_events:
            notice = CompensationDeadLettered(
                workflow_id=run.workflow_id,
                run_id=run.run_id,
                workflow_type=run.workflow_type,
                activity_type=row["activity_type"],
                dead_letter_id=dead_letter_id,
            )
            notices.append(lifecycle_message(notice, suffix=f"dead-letter:{dead_letter_id[:8]}"))
        self.engine.outbox.add(
            session,
            [
                *notices,
                OutboxMessage(
                    kind="task",
                    destination="orchestrator.compensation_dead_lettered",
                    queue=COMPENSATION_DEAD_LETTER_QUEUE,
                    aggregate_id=run.workflow_id,
                    body={
                        "dead_letter_id": dead_letter_id,
                        "workflow_id": run.workflow_id,
                        "run_id": run.run_id,
                        "activity_type": row["activity_type"],
                        "input": row["input"],
                        "attempts": attempts,
                    },
                    headers={"workflow_id": run.workflow_id, "reason": failure.message[:200]},
                ),
            ],
        )

    # ------------------------------------------------------------------ reading
    def list(
        self,
        *,
        status: str | None = OPEN,
        workflow_type: str | None = None,
        since: datetime | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        query = select(dead_letters).order_by(dead_letters.c.created_at).limit(limit)
        if status is not None:
            query = query.where(dead_letters.c.status == status)
        if workflow_type is not None:
            query = query.where(dead_letters.c.workflow_type == workflow_type)
        if since is not None:
            query = query.where(dead_letters.c.created_at >= since)
        with self.engine.sessions() as session:
            return [_as_dict(row) for row in session.execute(query).mappings().all()]

    def get(self, dead_letter_id: str) -> dict[str, Any]:
        with self.engine.sessions() as session:
            row = (
                session.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id))
                .mappings()
                .first()
            )
        if row is None:
            raise DeadLetterNotFoundError(f"no dead letter {dead_letter_id!r}")
        return _as_dict(row)

    def open_count(self) -> int:
        with self.engine.sessions() as session:
            return int(
                session.execute(
                    select(func.count())
                    .select_from(dead_letters)
                    .where(dead_letters.c.status == OPEN)
                ).scalar_one()
            )

    # ------------------------------------------------------------------ acting
    def replay(self, dead_letter_id: str, *, actor: str | None = None, reason: str = "") -> bool:
        """Run the compensation again with a fresh retry budget; False if already resolved."""

        def act(session: Session, run: LockedRun, letter: Any, row: Any, now: datetime) -> None:
            attempt = row["attempt"] + 1
            set_activity(
                session,
                run.run_id,
                row["activity_id"],
                status="SCHEDULED",
                attempt=attempt,
                attempt_base=row["attempt"],
                scheduled_at=now,
                attempt_scheduled_at=now,
                started_at=None,
                deadline_at=None,
            )
            self.engine.outbox.add(
                session,
                [
                    messages.activity_task(
                        run_id=run.run_id,
                        workflow_id=run.workflow_id,
                        activity_id=row["activity_id"],
                        activity_type=row["activity_type"],
                        attempt=attempt,
                        queue=row["task_queue"],
                    )
                ],
            )

        return self._resolve(
            dead_letter_id,
            status=REPLAYED,
            action="dlq.replay",
            actor=actor,
            reason=reason,
            act=act,
        )

    def discard(self, dead_letter_id: str, *, actor: str | None = None, reason: str = "") -> bool:
        """Give the compensation up: it fails, and the saga carries on without it."""

        def act(session: Session, run: LockedRun, letter: Any, row: Any, now: datetime) -> None:
            set_activity(session, run.run_id, row["activity_id"], status="FAILED", closed_at=now)
            failure = row["last_failure"] or Failure(type="Discarded", message=reason).to_json()
            run.append(
                ActivityFailed(
                    activity_id=row["activity_id"],
                    activity_type=row["activity_type"],
                    attempt=row["attempt"],
                    failure=failure,
                )
            )

        return self._resolve(
            dead_letter_id,
            status=DISCARDED,
            action="dlq.discard",
            actor=actor,
            reason=reason,
            act=act,
        )

    def _resolve(
        self,
        dead_letter_id: str,
        *,
        status: str,
        action: str,
        actor: str | None,
        reason: str,
        act: Callable[[Session, LockedRun, Any, Any, datetime], None],
    ) -> bool:
        engine = self.engine
        with engine.sessions() as session:
            letter = (
                session.execute(select(dead_letters).where(dead_letters.c.id == dead_letter_id))
                .mappings()
                .first()
            )
            if letter is None:
                raise DeadLetterNotFoundError(f"no dead letter {dead_letter_id!r}")
            run = lock_run(session, letter["run_id"])  # the run's lock first, as everywhere
            letter = (
                session.execute(
                    select(dead_letters)
                    .where(dead_letters.c.id == dead_letter_id)
                    .with_for_update()
                )
                .mappings()
                .first()
            )
            if letter is None or run is None:
                return False
            row = activity_row(session, letter["run_id"], letter["activity_id"])
            if letter["status"] != OPEN or row is None or row["status"] != "DEAD_LETTERED":
                return False
            now = engine.clock()
            act(session, run, letter, row, now)
            session.execute(
                update(dead_letters)
                .where(dead_letters.c.id == dead_letter_id)
                .values(
                    status=status,
                    resolved_at=now,
                    resolved_by=actor or audit.default_actor(),
                    resolution=reason or None,
                )
            )
            still_open = session.execute(
                select(func.count())
                .select_from(dead_letters)
                .where(dead_letters.c.run_id == run.run_id, dead_letters.c.status == OPEN)
            ).scalar_one()
            if not still_open and run.status is RunStatus.COMPENSATION_BLOCKED:
                run.status = RunStatus.RUNNING
                run.changes["status"] = RunStatus.RUNNING.value
            audit.record(
                session,
                action=action,
                at=now,
                actor=actor,
                workflow_id=run.workflow_id,
                run_id=run.run_id,
                reason=reason,
                details={"dead_letter_id": dead_letter_id, "activity": row["activity_type"]},
            )
            appended = bool(run.appended)
            if appended:
                engine.after_result(session, run, now)  # saves the run
            else:
                save_run(session, run, now)
            engine.commit(session)
            return True


def _as_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "kind": row["kind"],
        "run_id": row["run_id"],
        "workflow_id": row["workflow_id"],
        "workflow_type": row["workflow_type"],
        "activity_id": row["activity_id"],
        "activity_type": row["activity_type"],
        "input": row["input"],
        "attempts": row["attempts"],
        "status": row["status"],
        "created_at": as_utc(row["created_at"]).isoformat(),
        "resolved_at": as_utc(row["resolved_at"]).isoformat() if row["resolved_at"] else None,
        "resolved_by": row["resolved_by"],
        "resolution": row["resolution"],
    }
