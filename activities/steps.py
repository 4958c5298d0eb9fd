"""Where ETL steps read their input and store their output: PostgreSQL, not histories.

A step's input is the output of the step before it (the first step reads the
version's raw `info`). Only references travel through Temporal: the claim-check
pattern, so `info` maps of many megabytes never reach a payload limit.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.exceptions import ApplicationError

from upsertflow.contracts import EtlStatus, StepInput
from upsertflow.models import Blob, Resource, ResourceVersion, StepOutput


class StepStore:
    """Read and write the data of ETL steps."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def begin(self, step: StepInput) -> bool:
        """Mark the version's ETL as running; return False if a newer version superseded it."""
        async with self.sessions.begin() as session:
            current = await session.scalar(
                select(Resource.version).where(Resource.id == step.resource_id)
            )
            if current is None or current > step.version:
                return False
            await session.execute(
                update(ResourceVersion)
                .where(
                    ResourceVersion.resource_id == step.resource_id,
                    ResourceVersion.version == step.version,
                    ResourceVersion.etl_status == EtlStatus.PENDING,
                )
                .values(etl_status=EtlStatus.RUNNING, etl_started_at=func.now())
            )
        return True

    async def read_input(self, step: StepInput) -> dict[str, Any]:
        """Return the previous step's output, or the version's raw `info` for the first step."""
        if step.previous_step is None:
            async with self.sessions() as session:
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
        body = await self.read(step, step.previous_step)
        if body is None:
            raise ApplicationError(
                f"the output of step {step.previous_step!r} for {step.resource_id} "
                f"v{step.version} is missing",
                type="StepOutputMissing",
                non_retryable=True,
            )
        return body

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
        return None if body is None else await asyncio.to_thread(decode_object, body)

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
        return {row.step: await asyncio.to_thread(decode_object, row.body) for row in rows}

    async def write(self, step: StepInput, value: dict[str, Any], name: str | None = None) -> None:
        """Store `value` as the step's output (or under `name`, e.g. a checkpoint)."""
        body = await asyncio.to_thread(encode, value)
        statement = pg_insert(StepOutput).values(
            resource_id=step.resource_id,
            version=step.version,
            step=name or step.step,
            body=body,
        )
        async with self.sessions.begin() as session:
            await session.execute(
                statement.on_conflict_do_update(
                    index_elements=[StepOutput.resource_id, StepOutput.version, StepOutput.step],
                    set_={"body": statement.excluded.body},
                )
            )


async def load_blob_json(session: AsyncSession, digest: str) -> dict[str, Any]:
    body = await session.scalar(select(Blob.body).where(Blob.digest == digest))
    if body is None:
        raise missing_blob(digest)
    return await asyncio.to_thread(decode_object, body)


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
