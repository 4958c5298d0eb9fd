"""Where ETL steps read their input and store their output: PostgreSQL, not histories.

A step's input is the output of the step before it (the first step reads the
version's raw `info`). Only references travel through Temporal: the claim-check
pattern, so `info` maps of many megabytes never reach a payload limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from temporalio import activity
from temporalio.exceptions import ApplicationError

from upsertflow.contracts import EtlStatus, StepInput
from upsertflow.db import single_statements

A = TypeVar("A")
R = TypeVar("R")


#: The fence of every write of a step: the version (`:resource_id`, `:version`) is its
#: resource's current one and its ETL is owned by the running activity's workflow
#: (`:workflow_id`).
#:
#: The workflow that persisted a version owns its ETL until a retry (another workflow id)
#: claims it. A step of a workflow that no longer owns it — superseded by a newer version,
#: its resource deleted, or its ETL taken over by a retry — must write nothing: this is its
#: fence. (A reset keeps the workflow id: the new run of a reset workflow goes on owning
#: the ETL.)
OWNS_ETL = """EXISTS (
    SELECT FROM resources AS fence_resource
    JOIN resource_versions AS fence_version
      ON fence_version.resource_id = fence_resource.id
     AND fence_version.version = fence_resource.version
    WHERE fence_resource.id = :resource_id AND fence_resource.version = :version
      AND fence_version.etl_workflow_id = :workflow_id)"""

#: Which write of a step output a row holds: the writing transaction and the body's size.
#: A transaction id is unique while a worker can remember it (`Handoff.TTL_SECONDS`), so
#: a row still showing what one write returned holds what that write stored.
#: (`octet_length` reads the size in the TOAST pointer: the body is not read.)
STORED_AS = "output.xmin::text || ':' || octet_length(output.body)"

# Every step runs these: plain SQL, prepared once per connection, with nothing for
# SQLAlchemy to build or compile per call (that cost the worker more than the queries).

#: A step begins: the version's ETL marked running (by this run), behind the fence, and
#: in the same statement its input read — the version's raw `info` for the first step
#: (`:previous` NULL), else the output of step `:previous` — with what an earlier attempt
#: stored under names starting with `:prefix` (its checkpoints; none if NULL). No row: the
#: version was superseded or its ETL taken over. One round trip where there were three.
_BEGIN = text(f"""
    WITH begun AS (
        UPDATE resource_versions SET
            etl_status = CASE WHEN etl_status = '{EtlStatus.PENDING}'
                              THEN '{EtlStatus.RUNNING}' ELSE etl_status END,
            etl_started_at = CASE WHEN etl_status = '{EtlStatus.PENDING}' THEN now()
                                  ELSE etl_started_at END,
            etl_run_id = :run_id
        WHERE resource_id = :resource_id AND version = :version AND {OWNS_ETL}
        RETURNING blob_digest
    )
    SELECT begun.blob_digest,
           CASE WHEN CAST(:previous AS text) IS NULL
                THEN (SELECT blob.body FROM blobs AS blob WHERE blob.digest = begun.blob_digest)
                ELSE (SELECT CASE WHEN {STORED_AS} = CAST(:known AS text) THEN ''::bytea
                                  ELSE output.body END
                      FROM etl_step_outputs AS output
                      WHERE output.resource_id = :resource_id AND output.version = :version
                        AND output.step = :previous)
           END AS input,
           saved.steps AS saved_steps,
           saved.bodies AS saved_bodies
    FROM begun
    CROSS JOIN LATERAL (
        SELECT array_agg(output.step) AS steps, array_agg(output.body) AS bodies
        FROM etl_step_outputs AS output
        WHERE output.resource_id = :resource_id AND output.version = :version
          AND starts_with(output.step, CAST(:prefix AS text))
    ) AS saved
""")
_WRITE = text(f"""
    INSERT INTO etl_step_outputs AS output (resource_id, version, step, body)
    SELECT CAST(:resource_id AS text), CAST(:version AS integer), :step, :body
    WHERE {OWNS_ETL}
    ON CONFLICT (resource_id, version, step) DO UPDATE SET body = excluded.body
    RETURNING {STORED_AS}
""")


@dataclass(frozen=True)
class Begun:
    """A step that began: its input, decoded, and what an earlier attempt saved."""

    input: dict[str, Any]
    #: The input's size as stored (JSON): what decoding it cost, and working on it costs.
    input_bytes: int
    #: What was stored under the names asked for (`begin`'s `saved`), by name.
    saved: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Held:
    """A step output this process stored: which write (`STORED_AS`), and its value."""

    stored_as: str
    value: dict[str, Any]
    #: Its size as stored (JSON bytes), as `Begun.input_bytes`.
    size: int
    at: float


class Handoff:
    """The step outputs this process stored lately, decoded, for the next step of the same
    ETL if it runs here: a local activity (`normalize` → `enrich` → `load`: `load` runs in
    the workflow's worker) always does, `enrich` often. The next step asks PostgreSQL for
    its input only if the row no longer holds that write (`STORED_AS`: an attempt on
    another worker wrote it since); else it takes the value from here, without reading and
    decoding it again (~25 ms each for the 70,000 records of a 5 MiB `info`).

    Bounded: at most `max_records` records held (the oldest go first), none longer than
    `TTL_SECONDS`, each taken once (by the load, when a step before it stored only its
    additions: pipeline v6). Outputs are kept as written: a step must not change a value
    it stored, nor one it took (neither does).
    """

    TTL_SECONDS = 60.0

    def __init__(self, max_records: int = 200_000) -> None:
        self.max_records = max_records
        self._held: OrderedDict[tuple[str, int, str], tuple[Held, int]] = OrderedDict()
        self._records = 0

    def keep(self, step: StepInput, held: Held) -> None:
        """Hold `held` as the output of `step` (replacing what was held for it)."""
        key = (step.resource_id, step.version, step.step)
        self._drop(key)
        records = len(held.value)
        if records > self.max_records:
            return
        self._held[key] = (held, records)
        self._records += records
        expired = held.at - self.TTL_SECONDS
        while self._held:
            oldest, _ = next(iter(self._held.values()))
            if self._records <= self.max_records and oldest.at >= expired:
                break
            self._drop(next(iter(self._held)))

    def take(
        self, resource_id: str, version: int, name: str | None, *, keep: bool = False
    ) -> Held | None:
        """What is held as the output of step `name` of the version: no longer held after,
        unless `keep` (a step that stores only its additions leaves the records it read
        for the load, which merges them)."""
        if name is None:
            return None
        key = (resource_id, version, name)
        held = self._held[key][0] if keep and key in self._held else self._drop(key)
        if held is None or time.monotonic() - held.at > self.TTL_SECONDS:
            return None
        return held

    def _drop(self, key: tuple[str, int, str]) -> Held | None:
        entry = self._held.pop(key, None)
        if entry is None:
            return None
        self._records -= entry[1]
        return entry[0]


def _version_of(step: StepInput) -> dict[str, Any]:
    return {"resource_id": step.resource_id, "version": step.version}


class StepStore:
    """Read and write the data of ETL steps, fenced by the ownership of the ETL."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        #: Shared by the steps that use this store (one per worker: `worker.build_worker`).
        self.handoff = Handoff()

    @property
    def _engine(self) -> AsyncEngine:
        # Every statement here stands alone: no transaction round trips around it.
        return single_statements(self.sessions)

    async def begin(self, step: StepInput, saved: str | None = None) -> Begun | None:
        """Mark the version's ETL as running and read the step's input; None if the version
        was superseded or its ETL taken over.

        One statement: the fence (`OWNS_ETL`), the update and the reads together. A reset
        workflow goes on in a new run: the version points at the run at work. `saved`: also
        return what was stored under names starting with it (an earlier attempt's
        checkpoints). The input comes from the `Handoff` if this process stored it and the
        row still holds that write.
        """
        info = activity.info()
        held = self.handoff.take(
            step.resource_id, step.version, step.previous_step, keep=step.stores_additions
        )
        params = {
            **_version_of(step),
            "workflow_id": info.workflow_id,
            "run_id": info.workflow_run_id,
            "previous": step.previous_step,
            "prefix": saved,
            "known": None if held is None else held.stored_as,
        }
        async with self._engine.connect() as connection:
            row = (await connection.execute(_BEGIN, params)).one_or_none()
        if row is None:
            return None
        if row.input is None:
            if step.previous_step is None:
                raise missing_blob(row.blob_digest)
            raise missing_output(step, step.previous_step)
        saved_outputs = zip(row.saved_steps or (), row.saved_bodies or (), strict=True)
        saved_bodies = {name: await decoded(body) for name, body in saved_outputs}
        if held is not None and row.input == b"":  # the row holds what `held` holds
            return Begun(input=held.value, input_bytes=held.size, saved=saved_bodies)
        return Begun(input=await decoded(row.input), input_bytes=len(row.input), saved=saved_bodies)

    async def write(self, step: StepInput, value: dict[str, Any], name: str | None = None) -> bool:
        """Store `value` as the step's output (or under `name`, e.g. a checkpoint).

        Only while this run owns the version's ETL; return whether it was stored. A step's
        output is also held in the `Handoff`, for the next step: `value` must not change.
        """
        body = await off_loop(encode, value, inline=len(value) <= INLINE_RECORDS)
        params = {
            **_version_of(step),
            "workflow_id": activity.info().workflow_id,
            "step": name or step.step,
            "body": body,
        }
        async with self._engine.connect() as connection:
            stored_as = (await connection.execute(_WRITE, params)).scalar_one_or_none()
        if stored_as is None:
            return False
        if name is None:
            self.handoff.keep(step, Held(stored_as, value, len(body), time.monotonic()))
        return True


#: Decoding or encoding a document larger than this runs in a thread, so that a large one
#: does not stall the worker's event loop (and its heartbeats); a smaller one runs inline,
#: as a thread hand-off costs more than decoding a few kilobytes (orjson: ~1 ms for this).
INLINE_BYTES = 128 * 1024
#: The same for a map of records about to be encoded (~64 bytes a record; ~1 ms).
INLINE_RECORDS = 5_000


async def off_loop(function: Callable[[A], R], argument: A, *, inline: bool) -> R:
    """`function(argument)`: inline if it is small work, else in a thread."""
    if inline:
        return function(argument)
    return await asyncio.to_thread(function, argument)


async def decoded(body: bytes) -> dict[str, Any]:
    """A stored JSON object, decoded."""
    return await off_loop(decode_object, body, inline=len(body) <= INLINE_BYTES)


def missing_output(step: StepInput, name: str | None) -> ApplicationError:
    """The failure of a step whose input, the output of step `name`, is not stored."""
    return ApplicationError(
        f"the output of step {name!r} for {step.resource_id} v{step.version} is missing",
        type="StepOutputMissing",
        non_retryable=True,
    )


def missing_blob(digest: str) -> ApplicationError:
    return ApplicationError(
        f"stored document {digest} is missing", type="BlobMissing", non_retryable=True
    )


def decode_object(body: bytes) -> dict[str, Any]:
    """A stored document. With orjson: what is stored was accepted by the API (no lone
    surrogates, no NaN, integers within ±2^53) or parsed by orjson (enrichment answers)."""
    value = orjson.loads(body)
    if not isinstance(value, dict):
        raise ApplicationError("stored document is not a JSON object", non_retryable=True)
    return value


def encode(value: Any) -> bytes:
    """Compact UTF-8 JSON; orjson, as documents of ~100,000 records are common."""
    return orjson.dumps(value)
