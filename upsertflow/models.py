"""Database tables (SQLAlchemy 2 declarative). Migrations live in `migrations/`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, ForeignKey, ForeignKeyConstraint, Index, Integer, LargeBinary, Text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql import ColumnElement, func

from upsertflow.contracts import Persisted


class Base(DeclarativeBase):
    pass


class Blob(Base):
    """Content-addressed request documents (`{"attributes", "info"}`): the claim-check store.

    Workflows carry the digest, never the document itself.
    """

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(Text, primary_key=True)  # sha256 hex of `body`
    body: Mapped[bytes] = mapped_column(LargeBinary)  # canonical JSON, UTF-8
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BlobClaim(Base):
    """A request's hold on the documents it stored, until its `persist` takes them over.

    It keeps the janitor from collecting a document between the API storing it
    and the workflow persisting it; a claim that no workflow ever picked up (the
    API died in between) expires and its documents are collected.
    """

    __tablename__ = "blob_claims"

    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    digest: Mapped[str] = mapped_column(
        Text, ForeignKey("blobs.digest", ondelete="CASCADE"), primary_key=True, index=True
    )
    #: The resource the request upserts: a DELETE withdraws the requests not persisted yet.
    #: (Null only for claims stored before this column existed.)
    resource_id: Mapped[str | None] = mapped_column(Text, index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Resource(Base):
    """The current state of a resource: its latest persisted version."""

    __tablename__ = "resources"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ResourceVersion(Base):
    """One persisted upsert, and the state of the ETL run over it."""

    __tablename__ = "resource_versions"
    __table_args__ = (Index("ix_resource_versions_etl_status", "etl_status"),)

    resource_id: Mapped[str] = mapped_column(
        Text, ForeignKey("resources.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    # The request that created this version: a retried `persist` finds it and writes nothing.
    request_id: Mapped[str] = mapped_column(Text, unique=True)
    blob_digest: Mapped[str] = mapped_column(Text, ForeignKey("blobs.digest"), index=True)
    persisted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    etl_status: Mapped[str] = mapped_column(Text)
    etl_workflow_id: Mapped[str] = mapped_column(Text)
    etl_run_id: Mapped[str] = mapped_column(Text)
    etl_steps: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    etl_error: Mapped[str | None] = mapped_column(Text)
    etl_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    etl_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


def persisted_from(version: ResourceVersion, created_at: datetime) -> Persisted:
    """The `Persisted` of a stored version (`created_at`: its resource's)."""
    return Persisted(
        resource_id=version.resource_id,
        version=version.version,
        # The version that created the resource (in its current life) was persisted then.
        created=version.persisted_at == created_at,
        created_at=created_at,
        updated_at=version.persisted_at,
    )


def is_current_version() -> ColumnElement[bool]:
    """Join condition: the version row of a resource's latest version."""
    return (ResourceVersion.resource_id == Resource.id) & (
        ResourceVersion.version == Resource.version
    )


class StepOutput(Base):
    """The output of one ETL step for one version, read by the next step (claim-check)."""

    __tablename__ = "etl_step_outputs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["resource_id", "version"],
            ["resource_versions.resource_id", "resource_versions.version"],
            ondelete="CASCADE",
        ),
    )

    resource_id: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[str] = mapped_column(Text, primary_key=True)
    body: Mapped[bytes] = mapped_column(LargeBinary)


class ResourceContext(Base):
    """The ETL output of the latest loaded version of a resource: its records are in its
    chunks (`ResourceContextChunk`)."""

    __tablename__ = "resource_contexts"

    resource_id: Mapped[str] = mapped_column(
        Text, ForeignKey("resources.id", ondelete="CASCADE"), primary_key=True
    )
    version: Mapped[int] = mapped_column(Integer)
    #: The records as one object: NULL since migration 0007 (a load writes the chunks
    #: only). Written, it is chunked by the trigger of 0004 (contexts loaded before).
    records: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    loaded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: The workflow run that loaded it: a retried `load` of that run finds its work done.
    run_id: Mapped[str | None] = mapped_column(Text)
    record_count: Mapped[int] = mapped_column(Integer)
    #: The pipeline's output version that produced it (`workflows.pipeline.OUTPUT_VERSION`);
    #: None for contexts loaded before it was recorded.
    pipeline_version: Mapped[int | None] = mapped_column(Integer)


class ResourceContextChunk(Base):
    """A context's records in path order, 1,000 to a chunk: what pages of it are read from.

    Written with the context, in the same transaction: by the load (cut by the worker,
    `upsertflow.store.versions.load_context`), or by the trigger of migration 0004 from
    `ResourceContext.records` where a writer sets those.
    """

    __tablename__ = "resource_context_chunks"

    resource_id: Mapped[str] = mapped_column(
        Text, ForeignKey("resource_contexts.resource_id", ondelete="CASCADE"), primary_key=True
    )
    #: The chunk's last path (in `COLLATE "C"` order): chunks are found by it.
    last_path: Mapped[str] = mapped_column(Text(collation="C"), primary_key=True)
    record_count: Mapped[int] = mapped_column(Integer)
    records: Mapped[dict[str, Any]] = mapped_column(JSONB)


class ResourceTombstone(Base):
    """The last version of a deleted resource: versions of an id never go backwards.

    A resource created again after a DELETE continues from here, so a late step of
    its earlier life always compares as superseded.
    """

    __tablename__ = "resource_tombstones"

    resource_id: Mapped[str] = mapped_column(Text, primary_key=True)
    last_version: Mapped[int] = mapped_column(Integer)
    deleted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Base):
    """A request made with an `Idempotency-Key`, and the response to replay for it."""

    __tablename__ = "idempotency_keys"

    #: The client's key, scoped by the request's method and path.
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    fingerprint: Mapped[str] = mapped_column(Text)
    request_id: Mapped[str] = mapped_column(Text)
    #: Null while the first request is in flight.
    status_code: Mapped[int | None] = mapped_column(Integer)
    #: The response body as it was sent, replayed byte for byte.
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary)
    response_headers: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: An in-flight claim older than this may be taken over (its API process died).
    locked_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
