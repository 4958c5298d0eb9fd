"""Where ETL steps read their input and store their output: PostgreSQL, not histories.

A step's input is the output of the step before it (the first step reads the
version's raw `info`). Only references travel through Temporal: the claim-check
pattern, so `info` maps of many megabytes never reach a payload limit.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    Integer,
    LargeBinary,
    Text,
    case,
    cast,
    exists,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from upsertflow.contracts import EtlStatus, StepInput
from upsertflow.models import Blob, Resource, ResourceVersion, StepOutput, is_current_version

A = TypeVar("A")
R = TypeVar("R")


def owns_etl(resource_id: str, version: int) -> ColumnElement[bool]:
    """Whether the version is current and the running activity's workflow owns its ETL.

    The workflow that persisted a version owns its ETL until a retry (another
    workflow id) claims it. A step of a workflow that no longer owns it —
    superseded by a newer version, its resource deleted, or its ETL taken over by
    a retry — must write nothing: this is its fence. (A reset keeps the workflow
    id: the new run of a reset workflow goes on owning the ETL.)
    """
    return exists().where(
        Resource.id == resource_id,
        Resource.version == version,
        is_current_version(),
        ResourceVersion.etl_workflow_id == activity.info().workflow_id,
    )


class StepStore:
    """Read and write the data of ETL steps, fenced by the ownership of the ETL."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def begin(self, step: StepInput) -> bool:
        """Mark the version's ETL as running; False if it was superseded or taken over.

        One statement: the fence (`owns_etl`) and the update together. A reset workflow
        goes on in a new run: the version points at the run at work.
        """
        pending = ResourceVersion.etl_status == EtlStatus.PENDING
        statement = (
            update(ResourceVersion)
            .where(
                ResourceVersion.resource_id == step.resource_id,
                ResourceVersion.version == step.version,
                owns_etl(step.resource_id, step.version),
            )
            .values(
                etl_status=case((pending, EtlStatus.RUNNING), else_=ResourceVersion.etl_status),
                etl_started_at=case((pending, func.now()), else_=ResourceVersion.etl_started_at),
                etl_run_id=activity.info().workflow_run_id,
            )
            .returning(ResourceVersion.version)
        )
        async with self.sessions.begin() as session:
            return (await session.scalar(statement)) is not None

    async def still_owned(self, step: StepInput) -> bool:
        """Whether the version is still current and its ETL still this run's."""
        async with self.sessions() as session:
            return bool(await session.scalar(select(owns_etl(step.resource_id, step.version))))

    async def read_input(self, step: StepInput) -> dict[str, Any]:
        """Return the previous step's output, or the version's raw `info` for the first step."""
        if step.previous_step is None:
            async with self.sessions() as session:
                body = await session.scalar(
                    select(Blob.body)
                    .join(ResourceVersion, ResourceVersion.blob_digest == Blob.digest)
                    .where(
                        ResourceVersion.resource_id == step.resource_id,
                        ResourceVersion.version == step.version,
                    )
                )
                if body is not None:
                    return await decoded(body)
                digest = await session.scalar(
                    select(ResourceVersion.blob_digest).where(
                        ResourceVersion.resource_id == step.resource_id,
                        ResourceVersion.version == step.version,
                    )
                )
                if digest is None:
                    raise ApplicationError(
                        f"resource {step.resource_id} v{step.version} no longer exists",
                        type="VersionGone",
                        non_retryable=True,
                    )
                return await load_blob_json(session, digest)
        output = await self.read(step, step.previous_step)
        if output is None:
            raise ApplicationError(
                f"the output of step {step.previous_step!r} for {step.resource_id} "
                f"v{step.version} is missing",
                type="StepOutputMissing",
                non_retryable=True,
            )
        return output

    async def read(self, step: StepInput, name: str) -> dict[str, Any] | None:
        """Return what was stored under `name` for the step's version, if anything."""
        async with self.sessions() as session:
            body = await session.scalar(
                select(StepOutput.body).where(
                    StepOutput.resource_id == step.resource_id,
                    StepOutput.version == step.version,
                    StepOutput.step == name,
                )
            )
        return None if body is None else await decoded(body)

    async def read_all(self, step: StepInput, prefix: str) -> dict[str, dict[str, Any]]:
        """Return everything stored for the step's version under names starting with `prefix`."""
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(StepOutput.step, StepOutput.body).where(
                        StepOutput.resource_id == step.resource_id,
                        StepOutput.version == step.version,
                        StepOutput.step.startswith(prefix, autoescape=True),
                    )
                )
            ).all()
        return {row.step: await decoded(row.body) for row in rows}

    async def write(self, step: StepInput, value: dict[str, Any], name: str | None = None) -> bool:
        """Store `value` as the step's output (or under `name`, e.g. a checkpoint).

        Only while this run owns the version's ETL; return whether it was stored.
        """
        body = await off_loop(encode, value, inline=len(value) <= INLINE_RECORDS)
        row = select(
            cast(literal(step.resource_id), Text),
            cast(literal(step.version), Integer),
            cast(literal(name or step.step), Text),
            cast(literal(body, LargeBinary), LargeBinary),
        ).where(owns_etl(step.resource_id, step.version))
        statement = pg_insert(StepOutput).from_select(
            ["resource_id", "version", "step", "body"], row
        )
        async with self.sessions.begin() as session:
            result = await session.execute(
                statement.on_conflict_do_update(
                    index_elements=[StepOutput.resource_id, StepOutput.version, StepOutput.step],
                    set_={"body": statement.excluded.body},
                )
            )
        return bool(result.rowcount)  # type: ignore[attr-defined]


async def load_blob_json(session: AsyncSession, digest: str) -> dict[str, Any]:
    body = await session.scalar(select(Blob.body).where(Blob.digest == digest))
    if body is None:
        raise missing_blob(digest)
    return await decoded(body)


#: Decoding or encoding a document larger than this runs in a thread, so that a large one
#: does not stall the worker's event loop (and its heartbeats); a smaller one runs inline,
#: as a thread hand-off costs more than decoding a few kilobytes.
INLINE_BYTES = 64 * 1024
#: The same for a map of records about to be encoded (~64 bytes a record).
INLINE_RECORDS = 1_000


async def off_loop(function: Callable[[A], R], argument: A, *, inline: bool) -> R:
    """`function(argument)`: inline if it is small work, else in a thread."""
    if inline:
        return function(argument)
    return await asyncio.to_thread(function, argument)


async def decoded(body: bytes) -> dict[str, Any]:
    """A stored JSON object, decoded."""
    return await off_loop(decode_object, body, inline=len(body) <= INLINE_BYTES)


def missing_blob(digest: str) -> ApplicationError:
    return ApplicationError(
        f"stored document {digest} is missing", type="BlobMissing", non_retryable=True
    )


def decode_object(body: bytes) -> dict[str, Any]:
    value = json.loads(body)
    if not isinstance(value, dict):
        raise ApplicationError("stored document is not a JSON object", non_retryable=True)
    return value


def encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
