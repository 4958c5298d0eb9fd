"""Activities that persist resources and run the database side of the ETL.

Every activity here is idempotent: Temporal may run an attempt again after a
crash, a timeout or a lost completion, and the database must end the same. The
SQL is the store's (`upsertflow.store`); these say what Temporal sees: results,
and failures that retrying cannot fix.
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from upsertflow.contracts import (
    ClaimInput,
    OutcomeInput,
    Persisted,
    PersistInput,
    StepInput,
    StepResult,
)
from upsertflow.normalize import normalize_info
from upsertflow.store import versions
from upsertflow.store.steps import StepStore, missing_output, off_loop

log = logging.getLogger("upsertflow.activities")

#: PostgreSQL error classes that retrying cannot fix: data exceptions (22).
_PERMANENT_SQLSTATE_CLASSES = ("22",)
#: `normalize` runs in the event loop for an `info` of up to this many bytes (~0.5 ms).
INLINE_NORMALIZE_BYTES = 16 * 1024


def _workflow() -> tuple[str, str]:
    """The workflow id and run id of the running activity (every one here has a workflow)."""
    info = activity.info()
    assert info.workflow_id is not None and info.workflow_run_id is not None
    return info.workflow_id, info.workflow_run_id


def _sqlstate(error: DBAPIError) -> str:
    return str(getattr(error.orig, "sqlstate", "") or getattr(error.orig, "pgcode", "") or "")


class ResourceActivities:
    """Database work of the upsert: persist, the storage side of ETL steps, outcomes."""

    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], store: StepStore | None = None
    ) -> None:
        self._sessions = sessions
        # One store for every step of the worker: its `Handoff` passes outputs between them.
        self._store = store or StepStore(sessions)

    @activity.defn(name="persist")
    async def persist(self, request: PersistInput) -> Persisted:
        """Persist the upsert as the resource's next version, or find it if already done."""
        try:
            persisted = await versions.persist_version(self._sessions, request, *_workflow())
        except versions.RequestWithdrawn:
            raise ApplicationError(
                f"the upsert request {request.request_id} was withdrawn (its resource was "
                "deleted) or its stored body has expired: nothing was persisted",
                type="RequestWithdrawn",
                non_retryable=True,
            ) from None
        except DBAPIError as error:
            if _sqlstate(error).startswith(_PERMANENT_SQLSTATE_CLASSES):
                raise ApplicationError(
                    "PostgreSQL refused the resource's data "
                    f"(SQLSTATE {_sqlstate(error)}): nothing was persisted",
                    type="InvalidData",
                    non_retryable=True,
                ) from error
            raise
        log.info("persisted %s v%d", request.resource_id, persisted.version)
        return persisted

    @activity.defn(name="claim_etl")
    async def claim_etl(self, claim: ClaimInput) -> Persisted:
        """Make this workflow the owner of the ETL of a version that is still current."""
        try:
            return await versions.claim_version(self._sessions, claim, *_workflow())
        except versions.NotCurrent:
            raise ApplicationError(
                f"resource {claim.resource_id} v{claim.version} is no longer the current "
                "version: nothing to retry",
                type="NotCurrent",
                non_retryable=True,
            ) from None

    @activity.defn(name="normalize")
    async def normalize(self, step: StepInput) -> StepResult:
        """Flatten and clean the version's raw `info` into records."""
        begun = await self._store.begin(step)
        if begun is None:
            return superseded_result()
        # A small `info` in the event loop (a thread hand-off costs more than normalizing
        # it); a large one in a thread (~0.2 s for 5 MiB), so that heartbeats go on.
        normalized = await off_loop(
            normalize_info, begun.input, inline=begun.input_bytes <= INLINE_NORMALIZE_BYTES
        )
        if not await self._store.write(step, normalized.records):
            return superseded_result()
        return StepResult(
            attempt=activity.info().attempt,
            stats={
                "records": len(normalized.records),
                "dropped": len(normalized.dropped),
                "collisions": normalized.collided_paths,
                # Leaves that lost a collision: each one counted, none listed.
                "lost": normalized.lost,
            },
        )

    @activity.defn(name="load")
    async def load(self, step: StepInput) -> StepResult:
        """Replace the resource's context with this version's records, unless a newer one won.

        The records are the output of the step before, or (pipeline v6) the outputs of
        `StepInput.records_from` merged: `normalize`'s records with `enrich`'s additions.

        Idempotent: a retried attempt of a load that committed finds the context
        loaded by its own run and reports it again. A new run of the same version
        (an ETL retry) replaces the context: a retry recomputes it. Given the run's
        steps (pipeline v5), it records the ETL as succeeded in the same transaction.
        """
        attempt = activity.info().attempt
        if not step.sources:  # a pipeline whose first step loads: nothing to load
            raise missing_output(step, step.previous_step)
        try:
            records = await versions.load_context(
                self._sessions,
                step.resource_id,
                step.version,
                *_workflow(),
                step.sources,
                step.pipeline_version,
                succeeded=(
                    None
                    if step.steps is None
                    else lambda records: step.succeeded_steps(attempt, {"records": records})
                ),
                handoff=self._store.handoff,
            )
        except versions.OutputMissing as missing:
            raise missing_output(step, missing.step) from None
        if records is None:
            return superseded_result()
        return StepResult(attempt=attempt, stats={"records": records})

    @activity.defn(name="record_outcome")
    async def record_outcome(self, outcome: OutcomeInput) -> None:
        """Record how the ETL of a version ended, if this workflow still owns that ETL."""
        await versions.record_outcome(self._sessions, outcome)


def superseded_result() -> StepResult:
    return StepResult(superseded=True, attempt=activity.info().attempt)
