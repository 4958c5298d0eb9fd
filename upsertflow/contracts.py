"""The data contracts between the API, the workflow and the activities.

One model per input and output, so fields can be added without breaking running
workflows (add them with defaults). Everything here travels through Temporal
histories, so everything here is small: large data is passed by reference
(blob digests, step outputs stored in PostgreSQL).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum

from pydantic import BaseModel, Field


class EtlStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"


#: The ETL statuses of a version whose ETL has not ended (as far as PostgreSQL knows).
IN_FLIGHT = (EtlStatus.PENDING, EtlStatus.RUNNING)


class StepStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class UpsertRequest(BaseModel):
    """Input of `UpsertWorkflow`: what the API accepted, by reference."""

    resource_id: str
    request_id: str
    attributes_digest: str
    info_digest: str
    info_bytes: int = 0
    idempotency_key: str | None = None
    #: The API request's correlation id (`X-Correlation-ID`), for following it into logs.
    correlation_id: str | None = None
    #: Set by `POST /resources/{id}/etl/retry`: run the ETL again for this version, no persist.
    retry_of_version: int | None = None
    #: Notify the webhook (`UPSERTFLOW_WEBHOOKS__URL`) when the ETL ends.
    notify: bool = False
    #: The pipeline version to run (`workflows.pipeline.PIPELINES`): the newest its starter
    #: knows. None (workflows started before v3): the newest, recorded by a patch marker.
    pipeline_version: int | None = None


class EtlEnded(BaseModel):
    """What a webhook receives when an ETL ends: no resource data, only where to read it."""

    #: The same for every delivery attempt of one event: receivers deduplicate on it.
    id: str
    type: str = "etl.ended"
    resource_id: str
    version: int
    status: EtlStatus
    error: str | None = None
    workflow_id: str
    ended_at: datetime


class PersistInput(BaseModel):
    resource_id: str
    request_id: str
    attributes_digest: str
    info_digest: str


class ClaimInput(BaseModel):
    """Which version an ETL retry takes over."""

    resource_id: str
    version: int


class Persisted(BaseModel):
    """The version a `persist` created (or found, when it had already run)."""

    resource_id: str
    version: int
    created: bool
    created_at: datetime
    updated_at: datetime


class StepResult(BaseModel):
    """A step's small report; its data stays in PostgreSQL."""

    superseded: bool = False
    attempt: int = 1
    stats: dict[str, int] = Field(default_factory=dict)
    note: str = ""


class StepState(BaseModel):
    name: str
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    stats: dict[str, int] = Field(default_factory=dict)


class StepInput(BaseModel):
    """What every ETL step receives: which version, and whose output to read."""

    resource_id: str
    version: int
    step: str
    previous_step: str | None = None
    #: The version of what the pipeline computes (`workflows.pipeline.OUTPUT_VERSION` when
    #: the run started), recorded with the context it loads. None from runs before it.
    pipeline_version: int | None = None
    #: The last step of a run that records its success with it (pipeline v5): every
    #: step's state so far, this one's `running`. A load that commits records the ETL as
    #: succeeded with these (this step's completed), in its own transaction.
    steps: list[StepState] | None = None
    #: Store only the records this step adds or replaces, not the map it read with them
    #: (pipeline v6, `enrich`): the load merges them into that map. Its output is then a
    #: fraction of the size, written, deleted and (on another worker) read once less.
    stores_additions: bool = False
    #: The load (pipeline v6): the step outputs whose records it loads, merged in order —
    #: the first a whole map of records, each one after it what its step added or
    #: replaced. None: the output of `previous_step` alone, a whole map.
    records_from: list[str] | None = None

    @property
    def sources(self) -> list[str]:
        """The step outputs this step's records are merged from (`records_from`)."""
        if self.records_from is not None:
            return self.records_from
        return [] if self.previous_step is None else [self.previous_step]

    def succeeded_steps(self, attempt: int, stats: dict[str, int]) -> list[StepState]:
        """`steps`, this step's state completed: succeeded now, at `attempt`, with `stats`.

        Now is the worker's clock, `started_at` the workflow's (the server's): a step never
        ends before it started, whatever the skew between them.
        """
        assert self.steps, "only a last step given the steps records the success"
        step = self.steps[-1]
        now = datetime.now(UTC)
        done = step.model_copy(
            update={
                "status": StepStatus.SUCCEEDED,
                "attempts": attempt,
                "finished_at": max(now, step.started_at) if step.started_at else now,
                "stats": stats,
            }
        )
        return [*self.steps[:-1], done]


class EtlProgress(BaseModel):
    """The step-by-step state of one ETL run: the `progress` query and the workflow's result."""

    resource_id: str
    version: int | None = None
    #: The pipeline definition the run follows (`workflows.pipeline.PIPELINES`).
    pipeline_version: int = 1
    status: EtlStatus = EtlStatus.PENDING
    steps: list[StepState] = Field(default_factory=list)
    error: str | None = None


class OutcomeInput(BaseModel):
    resource_id: str
    version: int
    workflow_id: str
    status: EtlStatus
    steps: list[StepState]
    error: str | None = None
