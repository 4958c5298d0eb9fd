"""The contracts of the reprocessing job (`workflows.reprocess.ReprocessWorkflow`).

Its filter, its input (carried across continue-as-new), the pages of resources it
reads, and its progress. Everything here travels through Temporal: small.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, computed_field

from upsertflow.contracts import EtlStatus

#: The most ETL re-runs one job may have in flight; the default, when not asked.
MAX_CONCURRENCY = 100
DEFAULT_CONCURRENCY = 10


class ReprocessFilter(BaseModel):
    """Which resources a job re-runs the ETL of. Every field narrows; none set: all resources."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    etl_status: EtlStatus | None = Field(
        default=None, description="Only resources whose current version's ETL ended so."
    )
    pipeline_version_lt: int | None = Field(
        default=None,
        ge=1,
        description="Only resources whose context was computed by a pipeline output version "
        "below this, or an unknown one (loaded before versions were recorded); as "
        "`GET /resources?pipeline_version_lt=`. A resource without a context does not match "
        "(its ETL never loaded: `etl_status` finds it).",
    )
    id_prefix: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9._~-]+$",
        description="Only resources whose id starts with this.",
    )

    def digest(self) -> str:
        """A short hash of the normalized filter: the same filter, the same job."""
        normalized = json.dumps(
            self.model_dump(mode="json", exclude_none=True), sort_keys=True, separators=(",", ":")
        )
        return hashlib.sha256(normalized.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """The filter in words, for the Temporal UI."""
        parts = [f"{name}={value}" for name, value in self.model_dump(exclude_none=True).items()]
        return ", ".join(parts) or "all resources"


class JobState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    #: Cancelled: no new re-run starts; those in flight finish.
    CANCELLING = "cancelling"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class ItemFailure(BaseModel):
    """A resource whose re-run failed, and why (the job keeps the last few)."""

    resource_id: str
    version: int
    error: str


class ReprocessProgress(BaseModel):
    """Where a job stands: the `progress` query, and its result."""

    state: JobState = JobState.RUNNING
    #: Resources that matched when the job started: the estimate `remaining` counts down.
    matched: int | None = None
    #: Re-runs that loaded a new context.
    done: int = 0
    #: Re-runs whose ETL failed.
    failed: int = 0
    #: Resources left as they were: a newer upsert came first (the re-run ended superseded
    #: or found its version no longer current), their ETL was running already, or this run
    #: was retried already.
    skipped: int = 0
    in_flight: int = 0
    #: The last resource id handed to the window: the job goes on after it.
    cursor: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    #: How many times the job continued as new (its history stays small).
    continued: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    recent_failures: list[ItemFailure] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def remaining(self) -> int | None:
        """An estimate: resources created after the start that match are re-run too."""
        if self.matched is None:
            return None
        return max(self.matched - self.done - self.failed - self.skipped - self.in_flight, 0)


class ReprocessInput(BaseModel):
    """The input of `ReprocessWorkflow`; continue-as-new carries `progress` over."""

    filter: ReprocessFilter
    concurrency: int = Field(default=DEFAULT_CONCURRENCY, ge=1, le=MAX_CONCURRENCY)
    page_size: int = Field(default=100, ge=1, le=1000)
    #: Re-runs started by one run of the workflow before it continues as new.
    items_per_run: int = Field(default=500, ge=1)
    progress: ReprocessProgress | None = None
    paused: bool = False


class PageInput(BaseModel):
    filter: ReprocessFilter
    after: str | None
    limit: int


class ReprocessItem(BaseModel):
    """A matching resource's current version, and what a re-run of its ETL needs."""

    resource_id: str
    version: int
    info_digest: str
    etl_status: EtlStatus
    etl_run_id: str


class ReprocessPage(BaseModel):
    items: list[ReprocessItem]
    more: bool
