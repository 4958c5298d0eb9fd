"""A resource's versions: persisting the next one, claiming its ETL, loading its context,
recording how its ETL ended.

Each function is one transaction, idempotent by the keys it is given: a request id
persists one version whatever the number of attempts, a run id loads a context
once. The callers (the activities) pass the workflow and run that act; these
functions fence on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, exists, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from upsertflow.contracts import (
    IN_FLIGHT,
    ClaimInput,
    EtlStatus,
    OutcomeInput,
    Persisted,
    PersistInput,
    StepState,
)
from upsertflow.db import single_statements, transactions
from upsertflow.models import (
    Resource,
    ResourceVersion,
    StepOutput,
    persisted_from,
)
from upsertflow.store.steps import (
    INLINE_BYTES,
    OWNS_ETL,
    STORED_AS,
    Handoff,
    decode_object,
    missing_blob,
    off_loop,
)


class RequestWithdrawn(Exception):
    """The request's claim on its stored body is gone: its resource was deleted (which
    withdrew the request) or the claim expired. Nothing is persisted, ever."""


class NotCurrent(Exception):
    """The version is no longer its resource's current one."""


async def persist_version(
    sessions: async_sessionmaker[AsyncSession],
    request: PersistInput,
    workflow_id: str,
    run_id: str,
) -> Persisted:
    """Persist the request as its resource's next version, or find the version it made."""
    try:
        return await _persist(sessions, request, workflow_id, run_id)
    except IntegrityError:
        # A concurrent attempt of the same request won the race: it is persisted now.
        return await _persist(sessions, request, workflow_id, run_id)


#: Persisting a version, one statement, one round trip (every upsert pays it): if both
#: documents are claimed by the request — and only then — take its claims over, upsert the
#: resource and insert the version. The claim is the request's fence: a DELETE that withdrew
#: the request (and so cancelled the workflow) removed it, and a late attempt writes nothing;
#: locked here, such a DELETE waits for this statement, then deletes what it wrote. Versions
#: never go backwards, even across a DELETE: a resource created again continues from its
#: tombstone. The attributes document, stored canonical JSON, is decoded by the database.
_PERSIST = text(f"""
    WITH held AS (
        SELECT digest FROM blob_claims WHERE request_id = :request_id FOR UPDATE
    ), taken AS (
        SELECT coalesce(bool_or(digest = :info_digest), false) AS info,
               coalesce(bool_or(digest = :attributes_digest), false) AS attributes
        FROM held
    ), claimed AS (
        DELETE FROM blob_claims
        WHERE request_id = :request_id AND (SELECT info AND attributes FROM taken)
    ), resource AS (
        INSERT INTO resources AS resource (id, version, attributes, created_at, updated_at)
        SELECT CAST(:resource_id AS text),
               (SELECT coalesce(max(last_version), 0) + 1 FROM resource_tombstones
                WHERE resource_id = :resource_id),
               (SELECT convert_from(body, 'UTF8')::jsonb FROM blobs
                WHERE digest = :attributes_digest),
               CAST(:now AS timestamptz), CAST(:now AS timestamptz)
        FROM taken WHERE taken.info AND taken.attributes
        ON CONFLICT (id) DO UPDATE SET
            version = resource.version + 1,
            attributes = excluded.attributes,
            updated_at = excluded.updated_at
        RETURNING resource.version, resource.created_at
    ), version_row AS (
        INSERT INTO resource_versions (resource_id, version, request_id, blob_digest,
            persisted_at, etl_status, etl_workflow_id, etl_run_id, etl_steps)
        SELECT :resource_id, resource.version, CAST(:request_id AS text), :info_digest,
               :now, '{EtlStatus.PENDING}', CAST(:workflow_id AS text),
               CAST(:run_id AS text), '[]'::jsonb
        FROM resource
    )
    SELECT taken.info, taken.attributes, resource.version, resource.created_at
    FROM taken LEFT JOIN resource ON true
""")
#: The version a request persisted, and its resource's creation time.
_PERSISTED = text("""
    SELECT version.version, version.persisted_at, resource.created_at
    FROM resource_versions AS version
    JOIN resources AS resource ON resource.id = version.resource_id
    WHERE version.request_id = :request_id
""")


async def _persist(
    sessions: async_sessionmaker[AsyncSession],
    request: PersistInput,
    workflow_id: str,
    run_id: str,
) -> Persisted:
    now = datetime.now(UTC)
    params = {
        "request_id": request.request_id,
        "resource_id": request.resource_id,
        "info_digest": request.info_digest,
        "attributes_digest": request.attributes_digest,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "now": now,
    }
    async with single_statements(sessions).connect() as connection:
        row = (await connection.execute(_PERSIST, params)).one()
        if row.version is not None:
            return Persisted(
                resource_id=request.resource_id,
                version=row.version,
                created=row.created_at == now,
                created_at=row.created_at,
                updated_at=now,
            )
        if row.info:
            # Never in practice: the API claims both documents, and a claimed document
            # is kept (deleting it deletes its claims). Nothing was written.
            raise missing_blob(request.attributes_digest)
        # Persisted already, by an earlier attempt (which took the claim over), or withdrawn.
        existing = (
            await connection.execute(_PERSISTED, {"request_id": request.request_id})
        ).one_or_none()
        if existing is None:
            raise RequestWithdrawn(request.request_id)
        return Persisted(
            resource_id=request.resource_id,
            version=existing.version,
            created=existing.persisted_at == existing.created_at,
            created_at=existing.created_at,
            updated_at=existing.persisted_at,
        )


async def claim_version(
    sessions: async_sessionmaker[AsyncSession], claim: ClaimInput, workflow_id: str, run_id: str
) -> Persisted:
    """Make `workflow_id` the owner of the ETL of a version that is still current, from
    scratch: the last run's status and step outputs are cleared. Raises `NotCurrent`."""
    async with sessions.begin() as session:
        resource = await session.get(Resource, claim.resource_id, with_for_update=True)
        if resource is None or resource.version != claim.version:
            raise NotCurrent(f"{claim.resource_id} v{claim.version}")
        version = await session.get_one(ResourceVersion, (claim.resource_id, claim.version))
        version.etl_status = EtlStatus.PENDING
        version.etl_workflow_id = workflow_id
        version.etl_run_id = run_id
        version.etl_steps = []
        version.etl_error = None
        version.etl_started_at = None
        version.etl_finished_at = None
        # A new run starts from scratch: no checkpoint of the last one is resumed.
        await session.execute(_step_outputs_of(claim.resource_id, claim.version))
        return persisted_from(version, resource.created_at)


#: Where the context of a resource stands for a load of `:version` by the run `:run_id`
#: of `:workflow_id`, and the step outputs to load, `:steps`, in order (NULL for one not
#: stored; empty for one the worker holds, `:known`, and the row still holds), only while
#: the version is current (a superseded load fetches no document); the resource locked:
#: loads of one resource follow each other, and the load's write, a statement later,
#: sees what the one before wrote.
_LOAD_CHECK = text(f"""
    SELECT resource.version = :version AND {OWNS_ETL} AS owned,
           context.version AS loaded,
           coalesce(context.version = :version AND context.run_id = :run_id, false) AS ours,
           coalesce(context.version = :version
                    AND context.pipeline_version IS NOT DISTINCT FROM :pipeline_version,
                    false) AS same_load,
           context.record_count,
           CASE WHEN resource.version = :version THEN (
               SELECT array_agg(CASE WHEN {STORED_AS} = wanted.known THEN ''::bytea
                                     ELSE output.body END ORDER BY wanted.position)
               FROM unnest(CAST(:steps AS text[]), CAST(:known AS text[]))
                    WITH ORDINALITY AS wanted(step, known, position)
               LEFT JOIN etl_step_outputs AS output
                 ON output.resource_id = resource.id AND output.version = :version
                AND output.step = wanted.step
           ) END AS bodies
    FROM resources AS resource
    LEFT JOIN resource_contexts AS context ON context.resource_id = resource.id
    WHERE resource.id = :resource_id
    FOR UPDATE OF resource
""")
#: The load itself, in one statement once checked: the context's row (its records go in
#: its chunks), its chunks (each one's records, cut by `chunks_of`, parsed by PostgreSQL;
#: chunks of before that no new one replaces gone), the version's step outputs, done
#: with, and — given `:steps` (pipeline v5) — the ETL's outcome: succeeded, with those
#: steps, if this workflow owns it. (Replaced chunks are updated, not deleted and inserted:
#: the statement's parts run in no set order.)
_LOAD = text("""
    WITH outcome AS (
        UPDATE resource_versions SET
            etl_status = 'succeeded', etl_steps = CAST(:steps AS jsonb), etl_error = NULL,
            etl_finished_at = now()
        WHERE CAST(:steps AS text) IS NOT NULL
          AND resource_id = :resource_id AND version = :version
          AND etl_workflow_id = :workflow_id
    ), old_chunks AS (
        DELETE FROM resource_context_chunks
        WHERE resource_id = :resource_id AND last_path <> ALL(CAST(:last_paths AS text[]))
    ), done_with AS (
        DELETE FROM etl_step_outputs WHERE resource_id = :resource_id AND version = :version
    ), context AS (
        INSERT INTO resource_contexts AS context
            (resource_id, version, records, loaded_at, run_id, record_count, pipeline_version)
        VALUES (:resource_id, :version, NULL, now(), :run_id, :record_count, :pipeline_version)
        ON CONFLICT (resource_id) DO UPDATE SET
            version = excluded.version,
            records = NULL,
            loaded_at = excluded.loaded_at,
            run_id = excluded.run_id,
            record_count = excluded.record_count,
            pipeline_version = excluded.pipeline_version
    )
    INSERT INTO resource_context_chunks AS stored (resource_id, last_path, record_count, records)
    SELECT CAST(:resource_id AS text), chunk.last_path, chunk.record_count,
           CAST(chunk.records AS jsonb)
    FROM unnest(CAST(:last_paths AS text[]), CAST(:counts AS integer[]),
                CAST(:records AS text[])) AS chunk(last_path, record_count, records)
    ON CONFLICT (resource_id, last_path) DO UPDATE SET
        record_count = excluded.record_count,
        records = excluded.records
""")

#: The records of a context's chunk (the last one's: fewer). A page of the context reads
#: the chunks it needs (`upsertflow.store.contexts`), whatever the context's size.
CHUNK_RECORDS = 1_000


@dataclass(frozen=True)
class Chunks:
    """A context's records in path order (`COLLATE "C"`: Python's `str` order), cut in
    chunks of `CHUNK_RECORDS`: each one's last path, number of records, records as JSON."""

    last_paths: list[str]
    counts: list[int]
    records: list[str]

    @property
    def record_count(self) -> int:
        return sum(self.counts)


def _chunks(outputs: Sequence[dict[str, Any] | bytes]) -> Chunks:
    """The chunks of step outputs merged (`merged`), each decoded or stored JSON."""
    return chunks_of(merged([decode_object(o) if isinstance(o, bytes) else o for o in outputs]))


def chunks_of(records: dict[str, Any]) -> Chunks:
    """The chunks of records (path -> value)."""
    paths = sorted(records)
    chunks = Chunks([], [], [])
    for start in range(0, len(paths), CHUNK_RECORDS):
        part = paths[start : start + CHUNK_RECORDS]
        chunks.last_paths.append(part[-1])
        chunks.counts.append(len(part))
        chunks.records.append(orjson.dumps({path: records[path] for path in part}).decode())
    return chunks


def merged(outputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Step outputs merged in order: the first a whole map of records, each after it what
    its step added or replaced (pipeline v6). One output is returned as it is."""
    if len(outputs) == 1:
        return outputs[0]
    records: dict[str, Any] = {}
    for output in outputs:
        records.update(output)
    return records


class OutputMissing(Exception):
    """A step output to load is not stored (anymore)."""

    def __init__(self, step: str, resource_id: str, version: int) -> None:
        super().__init__(f"{step} of {resource_id} v{version}")
        self.step = step


async def load_context(
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
    version: int,
    workflow_id: str,
    run_id: str,
    source_steps: Sequence[str],
    pipeline_version: int | None = None,
    succeeded: Callable[[int], list[StepState]] | None = None,
    handoff: Handoff | None = None,
) -> int | None:
    """Replace the resource's context with the records `source_steps` stored for the
    version (merged in order: the first a whole map, each after it what its step added or
    replaced; `merged`); return their number. Idempotent: if this run loaded it already,
    return that number.

    `succeeded` (pipeline v5): the ETL's steps, given the number of records loaded; the
    load records the ETL as succeeded with them, in its transaction (no window between the
    two for a crash or a terminate), and no `record_outcome` after it.

    None (nothing written) if the version is no longer current, its ETL is no longer this
    workflow's, or a newer version's context is loaded; a new run of the same version (an
    ETL retry) replaces the context. If an output is gone but this version's context,
    by this pipeline, is loaded already — a run reset past its steps after its load, which
    deleted the outputs — that context is kept and its number returned. Raises
    `OutputMissing` if there is nothing to load.

    The worker cuts the records in chunks (a thread for a large output) and PostgreSQL
    parses each: cutting them in SQL (expanding, sorting and aggregating every record) cost
    PostgreSQL ~0.9 s for a 5 MiB input, this ~0.2 s and the worker ~0.1 s. Each output
    comes from the `handoff` if this process stored it and the row still holds it.
    """
    assert not isinstance(source_steps, str), "the names of steps, not one name"
    params: dict[str, Any] = {
        "resource_id": resource_id,
        "version": version,
        "workflow_id": workflow_id,
        "run_id": run_id,
        "steps": list(source_steps),
        "pipeline_version": pipeline_version,
    }
    helds = [
        None if handoff is None else handoff.take(resource_id, version, step)
        for step in source_steps
    ]
    params["known"] = [None if held is None else held.stored_as for held in helds]
    async with transactions(sessions).begin() as connection:
        state = (await connection.execute(_LOAD_CHECK, params)).one_or_none()
        if state is not None and state.ours:
            count: int = state.record_count
            return count
        if state is None or not state.owned or (state.loaded or 0) > version:
            return None
        bodies: list[bytes | None] = state.bodies or [None] * len(source_steps)
        missing = [step for step, body in zip(source_steps, bodies, strict=True) if body is None]
        if missing:
            if not state.same_load:
                raise OutputMissing(missing[0], resource_id, version)
            # This version's context, by this pipeline, is loaded, and its outputs deleted
            # with that load: a run of this ETL reset past its steps after it loaded (the
            # Web UI's or the CLI's reset to the last workflow task). That context is what
            # this load would write: keep it, and record the success with it.
            count = state.record_count
            if succeeded is not None:
                await connection.execute(
                    _RECORD_OUTCOME,
                    {
                        "resource_id": resource_id,
                        "version": version,
                        "workflow_id": workflow_id,
                        "status": str(EtlStatus.SUCCEEDED),
                        "steps": _steps_json(succeeded(count)),
                        "error": None,
                    },
                )
            return count
        # An empty body: the row holds what the handoff holds.
        outputs = [
            (held.value, held.size) if held is not None and body == b"" else (body, len(body))
            for held, body in zip(helds, bodies, strict=True)
            if body is not None
        ]
        size = sum(size for _, size in outputs)
        chunks = await off_loop(
            _chunks, [value for value, _ in outputs], inline=size <= INLINE_BYTES
        )
        await connection.execute(
            _LOAD,
            {
                "resource_id": resource_id,
                "version": version,
                "run_id": run_id,
                "workflow_id": workflow_id,
                "steps": None if succeeded is None else _steps_json(succeeded(chunks.record_count)),
                "record_count": chunks.record_count,
                "pipeline_version": pipeline_version,
                "last_paths": chunks.last_paths,
                "counts": chunks.counts,
                "records": chunks.records,
            },
        )
        return chunks.record_count


#: How a version's ETL ended, if `:workflow_id` still owns it.
_RECORD_OUTCOME = text("""
    UPDATE resource_versions SET
        etl_status = :status, etl_steps = CAST(:steps AS jsonb), etl_error = :error,
        etl_finished_at = now()
    WHERE resource_id = :resource_id AND version = :version AND etl_workflow_id = :workflow_id
""")


async def record_outcome(sessions: async_sessionmaker[AsyncSession], outcome: OutcomeInput) -> None:
    """Record how the ETL of a version ended, if `outcome.workflow_id` still owns it."""
    async with single_statements(sessions).connect() as connection:
        await connection.execute(
            _RECORD_OUTCOME,
            {
                "resource_id": outcome.resource_id,
                "version": outcome.version,
                "workflow_id": outcome.workflow_id,
                "status": str(outcome.status),
                "steps": _steps_json(outcome.steps),
                "error": outcome.error,
            },
        )


def _steps_json(steps: list[StepState]) -> str:
    """Steps as `etl_steps` JSON text (SQLAlchemy's jsonb codec for asyncpg takes it so)."""
    return orjson.dumps([step.model_dump(mode="json") for step in steps]).decode()


async def finish_in_flight(
    sessions: async_sessionmaker[AsyncSession], version: ResourceVersion, values: dict[str, Any]
) -> datetime | None:
    """Store how the version's ETL ended (`values` of its `etl_*` columns) if its status is
    still in flight for the same workflow run; return the finishing time, None if not."""
    async with sessions.begin() as session:
        finished: datetime | None = await session.scalar(
            update(ResourceVersion)
            .where(
                ResourceVersion.resource_id == version.resource_id,
                ResourceVersion.version == version.version,
                ResourceVersion.etl_workflow_id == version.etl_workflow_id,
                ResourceVersion.etl_run_id == version.etl_run_id,
                ResourceVersion.etl_status.in_(IN_FLIGHT),
            )
            .values(**values, etl_finished_at=func.now())
            .returning(ResourceVersion.etl_finished_at)
        )
        return finished


async def in_flight_since(
    sessions: async_sessionmaker[AsyncSession], cutoff: datetime, limit: int
) -> Sequence[ResourceVersion]:
    """Up to `limit` versions persisted before `cutoff` whose ETL is still in flight."""
    async with sessions() as session:
        return (
            await session.scalars(
                select(ResourceVersion)
                .where(
                    ResourceVersion.etl_status.in_(IN_FLIGHT),
                    ResourceVersion.persisted_at < cutoff,
                )
                .order_by(ResourceVersion.persisted_at)
                .limit(limit)
            )
        ).all()


async def delete_ended_step_outputs(
    sessions: async_sessionmaker[AsyncSession], grace: timedelta
) -> int:
    """Delete the step outputs of versions whose ETL ended over `grace` ago."""
    async with sessions.begin() as session:
        result = await session.execute(
            delete(StepOutput).where(
                exists().where(
                    ResourceVersion.resource_id == StepOutput.resource_id,
                    ResourceVersion.version == StepOutput.version,
                    ResourceVersion.etl_status.not_in(IN_FLIGHT),
                    ResourceVersion.etl_finished_at < func.now() - grace,
                )
            )
        )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _step_outputs_of(resource_id: str, version: int) -> Any:
    return delete(StepOutput).where(
        StepOutput.resource_id == resource_id, StepOutput.version == version
    )
