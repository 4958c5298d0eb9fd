"""The API's public representations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from upsertflow.contracts import EtlStatus, StepStatus
from upsertflow.jobs import DEFAULT_CONCURRENCY, MAX_CONCURRENCY, ReprocessFilter, ReprocessProgress


class ResourceUpsert(BaseModel):
    """The body of `PUT /resources/{id}` (documentation: the body is read strictly by hand)."""

    attributes: dict[str, Any] = Field(default_factory=dict, description="Stored as given.")
    info: dict[str, Any] = Field(
        default_factory=dict, description="Raw material for the ETL pipeline."
    )


class EtlRef(BaseModel):
    """Where the ETL of a version stands, and where to watch it."""

    status: EtlStatus
    version: int
    workflow_id: str
    run_id: str
    ui_url: str
    error: str | None = None


class ResourcePublic(BaseModel):
    id: str
    version: int
    attributes: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    context: dict[str, Any] | None = Field(
        default=None,
        description="The ETL output of the latest processed version (dotted path -> value, in "
        "path order) when it has at most `UPSERTFLOW_LIMITS__MAX_INLINE_CONTEXT_RECORDS` "
        "records; null until one is loaded, and null for a larger one: read it page by page "
        "at `context_url`.",
    )
    context_version: int | None = Field(
        default=None, description="The version whose ETL output `context` is."
    )
    context_records: int | None = Field(
        default=None, description="How many records the context holds; null until one is loaded."
    )
    context_pipeline_version: int | None = Field(
        default=None,
        description="The pipeline output version that computed the context "
        "(`GET /resources?pipeline_version_lt=N` finds older ones); null until one is loaded, "
        "and for a context loaded before versions were recorded.",
    )
    context_url: str | None = Field(
        default=None,
        description="Where to read the context page by page, whatever its size; null until one "
        "is loaded.",
    )
    etl: EtlRef


class UpsertAccepted(BaseModel):
    """`202`: the upsert is durable and will be applied; follow `Location`."""

    id: str
    request_id: str
    workflow_id: str
    run_id: str | None
    ui_url: str
    status: str = "accepted"


class ResourceSummary(BaseModel):
    id: str
    version: int
    updated_at: datetime
    etl_status: EtlStatus
    context_pipeline_version: int | None = Field(
        default=None, description="The pipeline output version of its context, if known."
    )


class ResourceList(BaseModel):
    items: list[ResourceSummary]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end."
    )


class EtlStepPublic(BaseModel):
    name: str
    status: StepStatus
    attempts: int
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    stats: dict[str, int] = Field(default_factory=dict)


class EtlRunPublic(BaseModel):
    """The ETL of a resource's latest version, step by step."""

    resource_id: str
    version: int
    status: EtlStatus
    workflow_id: str
    run_id: str
    ui_url: str
    live: bool = Field(description="True when read from the running workflow.")
    error: str | None
    steps: list[EtlStepPublic]


class EtlRetryAccepted(BaseModel):
    resource_id: str
    version: int
    workflow_id: str
    run_id: str | None
    ui_url: str


class ContextPagePublic(BaseModel):
    """A page of a resource's context: its records in path order."""

    resource_id: str
    version: int = Field(description="The version whose ETL output the context is.")
    record_count: int = Field(description="How many records the whole context holds.")
    records: dict[str, Any] = Field(
        description="The page's records (dotted path -> value), in path order (by UTF-8 bytes)."
    )
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class ReprocessRequest(ReprocessFilter):
    """The body of `POST /etl/reprocess`: a filter (`{}`: every resource), and a concurrency."""

    concurrency: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CONCURRENCY,
        description=f"ETL re-runs in flight at once (default {DEFAULT_CONCURRENCY}); not part "
        "of the job's identity: asking again with another concurrency joins the running job.",
    )

    def filter(self) -> ReprocessFilter:
        return ReprocessFilter.model_validate(self.model_dump(exclude={"concurrency"}))


class ReprocessAccepted(BaseModel):
    """`202`: the job runs (or was running already: the same filter is the same job)."""

    job_id: str
    run_id: str | None
    filter: ReprocessFilter
    ui_url: str


class ReprocessJobPublic(BaseModel):
    """A reprocessing job: its Temporal status and its progress."""

    job_id: str
    status: str = Field(
        description="The workflow's status in Temporal: running, completed, canceled, "
        "terminated, failed, timed_out."
    )
    live: bool = Field(description="True when read from the running job (its `progress` query).")
    progress: ReprocessProgress | None = Field(
        description="done, failed, skipped, in flight, remaining (an estimate), cursor and state; "
        "null when the job could not be asked (no worker answered)."
    )
    ui_url: str
