"""upsertflow against a bare-Temporal baseline measured in the same run, on the same servers.

    .venv/bin/python -m bench.upserts            # every section (the backlog is the longest)
    .venv/bin/python -m bench.upserts --help     # the sizes
    .venv/bin/python -m bench.upserts --only hot,backlog --backlog 500 --hot-upserts 200

Starts the stack of `make dev` (embedded PostgreSQL, the Temporal dev server on
SQLite in WAL mode, the enrichment service, one worker, the API) in a temporary
directory on free ports, and an in-process worker for the baseline on a task
queue of its own. The baseline, `bench.baseline.BareUpsert`, has the shape of
`UpsertWorkflow` with nothing in it: update-with-start answered after the first
of 5 no-op activities. Then two sections without a baseline: hot ids
(`bench.hot`: many synchronous upserts racing on few ids, checked exactly) and a
backlog drain (`bench.backlog`: upserts accepted with `Prefer: respond-async` as
fast as the API takes them, then drained). Prints a markdown table of ratios and
the sections and writes them to bench/RESULTS.md; stops everything at the end,
also on Ctrl-C or a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from types import FrameType
from typing import Any, NamedTuple

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WithStartWorkflowOperation
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.worker import Worker

from bench.backlog import drain
from bench.baseline import BareUpsert, noop
from bench.common import Row, body, count_etls, pct, peak_rss_kib, reset_peak_rss, table
from bench.hot import hot_ids
from bench.stack import REPO_ROOT, Stack
from devstack import venv_binary
from upsertflow import temporal
from upsertflow.event_loops import loop_factory
from upsertflow.settings import Limits
from workflows.pipeline import PIPELINE_VERSION

RESULTS = Path(__file__).with_name("RESULTS.md")
#: Seconds to wait for any workflow, or for all of those of the throughput metric.
TIMEOUT = 600


class Sent(NamedTuple):
    """One timed request: when it was sent, how long its answer took, its workflow."""

    at: float  # `time.perf_counter()` when the request left: its body was built before
    answer: float  # seconds until the answer
    workflow_id: str


#: Calls build one request, then time it (not the building: the client's work).
Call = Callable[[int], Awaitable[Sent]]


class Samples(NamedTuple):
    answers: list[float]  # seconds until the answer
    totals: list[float]  # seconds until the workflow completed
    ids: list[str]  # workflow ids


#: The sections of the run, in order.
SECTIONS = ("latency", "throughput", "large", "largest", "hot", "backlog")


def sections(value: str) -> tuple[str, ...]:
    """`--only`: section names, comma-separated, kept in the run's order."""
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = names - set(SECTIONS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"choose among {','.join(SECTIONS)}")
    return tuple(name for name in SECTIONS if name in names)


def runs(args: argparse.Namespace, section: str) -> bool:
    """Whether the run measures `section` (chosen, and not sized 0)."""
    sizes = {
        "large": args.large_mib > 0,
        "largest": args.largest,
        "hot": args.hot_upserts > 0,
        "backlog": args.backlog > 0,
    }
    return section in args.only and sizes.get(section, True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.upserts", description=__doc__)
    add = parser.add_argument
    add("--n", type=int, default=50, help="requests one at a time, per latency metric")
    add("--warmup", type=int, default=5, help="untimed requests before each latency metric")
    # 600, not fewer: the first 50 arrive at once, and over 200 that burst made the answer
    # under load's median swing 0.9-2.1 between runs of the same code (both sides' own).
    add("--m", type=int, default=600, help="workflows or upserts in the throughput metric")
    add(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the throughput metric, the sides taking turns (--m of each per round)",
    )
    add(
        "--concurrency",
        type=int,
        default=50,
        help="requests in flight in the throughput and the hot-id metrics",
    )
    add("--activities", type=int, default=5, help="no-op activities of the baseline workflow")
    add("--info-kib", type=int, default=1, help="size of the info of every small upsert")
    add("--large-mib", type=float, default=5, help="size of the large info (0: skip)")
    add("--large-runs", type=int, default=3, help="large and small upserts, end to end")
    add(
        "--largest",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the largest input the API accepts (worker memory, GET latency)",
    )
    add(
        "--hot-upserts",
        type=int,
        default=2000,
        help="synchronous upserts over --hot-ids ids, checked exactly (0: skip)",
    )
    add("--hot-ids", type=int, default=50, help="ids of the hot-id metric")
    add(
        "--backlog",
        type=int,
        default=10_000,
        help="upserts sent with `Prefer: respond-async`, then drained (0: skip)",
    )
    add("--backlog-concurrency", type=int, default=100, help="requests in flight sending it")
    add(
        "--only",
        type=sections,
        default=SECTIONS,
        metavar="SECTION,...",
        help=f"run only these sections (default: all of {','.join(SECTIONS)})",
    )
    add(
        "--dev-server-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dynamic config value for the dev server (default: none, as `make dev`)",
    )
    add(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop of this process, which runs the client and the baseline's worker "
        "(default: asyncio, the SDK's; upsertflow's worker runs on uvloop)",
    )
    add("--results", type=Path, default=RESULTS, help="where to write the table")
    return parser.parse_args(argv)


def command(args: argparse.Namespace) -> str:
    python = os.path.relpath(sys.executable, REPO_ROOT)
    options = (
        f"--n {args.n} --warmup {args.warmup} --m {args.m} --rounds {args.rounds} "
        f"--concurrency {args.concurrency} "
        f"--activities {args.activities} --info-kib {args.info_kib} "
        f"--large-mib {args.large_mib:g} --large-runs {args.large_runs}"
        f"{'' if args.largest else ' --no-largest'} "
        f"--hot-upserts {args.hot_upserts} --hot-ids {args.hot_ids} "
        f"--backlog {args.backlog} --backlog-concurrency {args.backlog_concurrency}"
    )
    if args.only != SECTIONS:
        options += f" --only {','.join(args.only)}"
    for value in args.dev_server_config:
        options += f" --dev-server-config {value}"
    if args.loop != "asyncio":
        options += f" --loop {args.loop}"
    return f"{python} -m bench.upserts {options}"


class Bench:
    """The calls, the ways of timing them, and the measurements with a baseline."""

    def __init__(
        self,
        args: argparse.Namespace,
        stack: Stack,
        client: Client,
        http: httpx.AsyncClient,
        db: AsyncEngine,
    ) -> None:
        self.args = args
        self.stack = stack
        self.client = client
        self.http = http
        self.db = db
        self.run = uuid.uuid4().hex[:8]
        self.queue = f"bench-baseline-{self.run}"
        self.small = args.info_kib * 1024

    def baseline_worker(self) -> Worker:
        return Worker(self.client, task_queue=self.queue, workflows=[BareUpsert], activities=[noop])

    # The calls: each times one request and returns the id of the workflow it started.

    async def bare_update_with_start(self, _index: int) -> Sent:
        workflow_id = f"bare-{uuid.uuid4().hex}"
        operation = WithStartWorkflowOperation(
            BareUpsert.run,
            self.args.activities,
            id=workflow_id,
            task_queue=self.queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        )
        started = time.perf_counter()
        await self.client.execute_update_with_start_workflow(
            BareUpsert.first_done, start_workflow_operation=operation
        )
        return Sent(started, time.perf_counter() - started, workflow_id)

    async def bare_start(self, _index: int) -> Sent:
        workflow_id = f"bare-{uuid.uuid4().hex}"
        started = time.perf_counter()
        await self.client.start_workflow(
            BareUpsert.run, self.args.activities, id=workflow_id, task_queue=self.queue
        )
        return Sent(started, time.perf_counter() - started, workflow_id)

    def put(
        self, prefix: str, info_bytes: int, prefer_async: bool = False, accept: tuple[int, ...] = ()
    ) -> Call:
        """PUT resources `{prefix}-{run}-{index}`; answers other than `accept` fail the run."""
        headers = {"Content-Type": "application/json"}
        if prefer_async:
            headers["Prefer"] = "respond-async"
        accept = accept or ((202,) if prefer_async else (201,))

        async def call(index: int) -> Sent:
            resource_id = f"{prefix}-{self.run}-{index}"
            content = body(resource_id, info_bytes)
            started = time.perf_counter()
            response = await self.http.put(
                f"/resources/{resource_id}", content=content, headers=headers
            )
            elapsed = time.perf_counter() - started
            if response.status_code not in accept:
                raise RuntimeError(f"PUT {resource_id}: {response.status_code} {response.text}")
            answer = response.json()
            return Sent(started, elapsed, answer.get("workflow_id") or answer["etl"]["workflow_id"])

        return call

    async def finish(self, workflow_id: str) -> None:
        """Wait until the workflow has completed; fail unless its ETL (if any) succeeded."""
        async with asyncio.timeout(TIMEOUT):
            result = await self.client.get_workflow_handle(workflow_id).result()
        if isinstance(result, dict) and result.get("status") != "succeeded":
            raise RuntimeError(f"{workflow_id} ended {result.get('status')}: {result}")

    # The measurements.

    async def latency(self) -> tuple[list[Row], list[list[str]]]:
        """One at a time, baseline and upsertflow in turn: rows, and the workflows to break down."""
        n, warmup = self.args.n, self.args.warmup
        async with self.baseline_worker():
            bare, put = await self.one_at_a_time(
                [self.bare_update_with_start, self.put("lat", self.small)], n, warmup
            )
            bare_start, put_async = await self.one_at_a_time(
                [self.bare_start, self.put("async", self.small, prefer_async=True)], n, warmup
            )
        rows = [
            *latency_rows("answer, one at a time", bare.answers, put.answers),
            *latency_rows("start only, one at a time", bare_start.answers, put_async.answers),
            *latency_rows("end to end, one at a time", bare.totals, put.totals),
        ]
        return rows, [bare.ids, put.ids]

    async def throughput(self) -> tuple[list[Row], list[Row]]:
        """`m` of each, `concurrency` in flight, in `rounds` taking turns: rows, and CPU per
        workflow by process.

        The machine's speed drifts by more than the difference measured: one pair of floods
        is one sample of it. Rounds alternate which side goes first (baseline first in odd
        rounds), so a drift slows both alike, and the rates pool every round.
        """
        args = self.args
        seconds = {"baseline": 0.0, "upsertflow": 0.0}
        answers: dict[str, list[float]] = {"baseline": [], "upsertflow": []}
        used: dict[str, dict[str, float]] = {"baseline": {}, "upsertflow": {}}
        rates: dict[str, list[float]] = {"baseline": [], "upsertflow": []}
        for round_ in range(args.rounds):
            sides = ["baseline", "upsertflow"] if round_ % 2 == 0 else ["upsertflow", "baseline"]
            for side in sides:
                before = self.stack.cpu_seconds()
                if side == "baseline":
                    async with self.baseline_worker():
                        took, answered = await self.flood(
                            self.bare_update_with_start, self.all_finished
                        )
                else:
                    took, answered = await self.flood(
                        # Past the sync timeout under load the answer is 202: durable all
                        # the same.
                        self.put(f"tp{round_}", self.small, accept=(201, 202)),
                        self.etls_succeeded(f"tp{round_}"),
                    )
                after = self.stack.cpu_seconds()
                seconds[side] += took
                answers[side] += answered
                rates[side].append(args.m / took)
                for name in after:
                    used[side][name] = used[side].get(name, 0.0) + after[name] - before[name]
        total = args.m * args.rounds
        bare, put = total / seconds["baseline"], total / seconds["upsertflow"]
        each = [u / b for b, u in zip(rates["baseline"], rates["upsertflow"], strict=True)]
        rows: list[Row] = [
            (
                f"throughput, {args.m} × {args.rounds} rounds with {args.concurrency} in "
                "flight (per s)",
                f"{bare:.1f}",
                f"{put:.1f}",
                f"{put / bare:.2f}",
            ),
            (
                "… each round (per s)",
                " / ".join(f"{rate:.1f}" for rate in rates["baseline"]),
                " / ".join(f"{rate:.1f}" for rate in rates["upsertflow"]),
                " / ".join(f"{ratio:.2f}" for ratio in each),
            ),
            *latency_rows("answer under that load", answers["baseline"], answers["upsertflow"]),
        ]
        per = 1000 / total
        cpu = [used["baseline"], used["upsertflow"]]
        by_process: list[Row] = [(name, *(f"{u[name] * per:.1f}" for u in cpu)) for name in cpu[0]]
        busy = [
            sum(used[side].values()) / (seconds[side] * (os.cpu_count() or 1))
            for side in ("baseline", "upsertflow")
        ]
        by_process += [
            ("total", *(f"{sum(u.values()) * per:.1f}" for u in cpu)),
            ("share of all CPUs busy", *(f"{share:.0%}" for share in busy)),
        ]
        return rows, by_process

    async def large(self) -> tuple[list[Row], list[str], list[Row]]:
        """Small upserts, then large ones, end to end: rows, the large workflows, and the
        CPU of each process per large upsert (ms).

        Not in turn: after a long workflow the dev server's task queue reader is
        idle and a small upsert right after it would not wait for it as usual.
        """
        size, runs = int(self.args.large_mib * 2**20), self.args.large_runs
        [small] = await self.one_at_a_time([self.put("ref", self.small)], runs, 0)
        before = self.stack.cpu_seconds()
        # Past the sync timeout the answer is 202: persisting a large body may take that long.
        [large] = await self.one_at_a_time([self.put("large", size, accept=(201, 202))], runs, 0)
        after = self.stack.cpu_seconds()
        rows = [
            seconds_row("large info: PUT answer (s)", small.answers, large.answers),
            seconds_row("large info: end to end (s)", small.totals, large.totals),
        ]
        used = {name: (after[name] - before[name]) * 1000 / runs for name in after}
        cpu: list[Row] = [(name, f"{ms:.0f}") for name, ms in used.items()]
        cpu.append(("total", f"{sum(used.values()):.0f}"))
        return rows, large.ids, cpu

    async def largest(self) -> list[Row]:
        """The largest input the API accepts (values up to `MAX_RECORDS`, every one enriched):
        end to end, the worker's peak memory meanwhile, and what reading it back costs."""
        resource_id = f"largest-{self.run}"
        contacts = (Limits().max_records - 2) // 2  # each contact: an object and its e-mail
        info = {f"c{i}": {"Email": f"buyer{i}@example.com"} for i in range(contacts)}
        worker = self.stack.worker.pid
        assert worker is not None
        reset_peak_rss(worker)
        content = json.dumps({"info": info}).encode()
        started = time.perf_counter()
        response = await self.http.put(
            f"/resources/{resource_id}",
            content=content,
            headers={"Content-Type": "application/json", "Prefer": "respond-async"},
        )
        if response.status_code != 202:
            raise RuntimeError(f"PUT {resource_id}: {response.status_code} {response.text}")
        await self.finish(response.json()["workflow_id"])
        total = time.perf_counter() - started
        peak_mib = peak_rss_kib(worker) / 1024
        gets: list[float] = []
        pages: list[float] = []
        for _ in range(5):
            for url, times in (
                (f"/resources/{resource_id}", gets),
                (f"/resources/{resource_id}/context?limit=1000", pages),
            ):
                started = time.perf_counter()
                (await self.http.get(url)).raise_for_status()
                times.append(time.perf_counter() - started)
        records = (await self.http.get(f"/resources/{resource_id}")).json()["context_records"]
        label = f"largest accepted input ({contacts * 2:,} values, {records:,} records)"
        return [
            (f"{label}: end to end (s)", "—", f"{total:.2f}", "—"),
            (f"{label}: worker peak RSS (MiB)", "—", f"{peak_mib:.0f}", "—"),
            (f"{label}: GET /resources/{{id}}, p50 (ms)", "—", ms(gets), "—"),
            (f"{label}: GET …/context?limit=1000, p50 (ms)", "—", ms(pages), "—"),
        ]

    # Ways of timing calls.

    async def one_at_a_time(self, calls: list[Call], runs: int, warmup: int) -> list[Samples]:
        """Each call in turn, waiting for its workflow's end before the next one.

        Taking turns, the calls see the same machine: whatever else runs on it
        slows them alike.
        """
        samples = [Samples([], [], []) for _ in calls]
        for index in range(-warmup, runs):
            for call, sample in zip(calls, samples, strict=True):
                sent = await call(index)
                await self.finish(sent.workflow_id)
                if index >= 0:
                    sample.answers.append(sent.answer)
                    sample.totals.append(time.perf_counter() - sent.at)
                    sample.ids.append(sent.workflow_id)
        return samples

    async def flood(
        self, call: Call, wait: Callable[[list[str]], Awaitable[None]]
    ) -> tuple[float, list[float]]:
        """`m` calls, `concurrency` at a time, then `wait` until all ended: (seconds, answers)."""
        slots = asyncio.Semaphore(self.args.concurrency)
        answers: list[float] = []
        ids: list[str] = []

        async def one(index: int) -> None:
            async with slots:
                sent = await call(index)
            answers.append(sent.answer)
            ids.append(sent.workflow_id)

        started = time.perf_counter()
        await asyncio.gather(*(one(index) for index in range(self.args.m)))
        await wait(ids)
        return time.perf_counter() - started, answers

    async def all_finished(self, ids: list[str]) -> None:
        await asyncio.gather(*(self.finish(workflow_id) for workflow_id in ids))

    def etls_succeeded(self, prefix: str) -> Callable[[list[str]], Awaitable[None]]:
        """Poll PostgreSQL until every ETL of the resources under `prefix` succeeded."""

        async def wait(ids: list[str]) -> None:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    succeeded, ended_otherwise = await count_etls(self.db, f"{prefix}-{self.run}-%")
                    if ended_otherwise:
                        raise RuntimeError(f"{ended_otherwise} ETLs did not succeed")
                    if succeeded >= len(ids):
                        return
                    await asyncio.sleep(0.05)

        return wait


async def segments(client: Client, workflow_id: str) -> dict[str, float]:
    """Where a workflow's time went, from its history: seconds by segment.

    Each activity's run; then, summed over the workflow, the time activities and
    workflow tasks waited in their queues, the time workflow tasks ran on the
    worker, and the rest: the server between events (its round trips).
    """
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    events = history.events
    result: dict[str, float] = {}
    started: dict[int, float] = {}
    queued = {"activities": 0.0, "workflow tasks": 0.0}
    worker = 0.0
    for event in events:
        at = event.event_time.ToNanoseconds() / 1e9
        kind = event.event_type
        if kind in (
            EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
            EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        ):
            started[event.event_id] = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            scheduled = event.activity_task_started_event_attributes.scheduled_event_id
            queued["activities"] += at - started[scheduled]
            started[scheduled] = at
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED:
            scheduled = event.activity_task_completed_event_attributes.scheduled_event_id
            result[f"activity {len(result) + 1} ran"] = at - started[scheduled]
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED:
            scheduled = event.workflow_task_started_event_attributes.scheduled_event_id
            queued["workflow tasks"] += at - started[scheduled]
            started[scheduled] = at
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
            worker += (
                at - started[event.workflow_task_completed_event_attributes.scheduled_event_id]
            )
    total = (events[-1].event_time.ToNanoseconds() - events[0].event_time.ToNanoseconds()) / 1e9
    result["activities queued (sum)"] = queued["activities"]
    result["workflow tasks queued (sum)"] = queued["workflow tasks"]
    result["workflow tasks ran on the worker (sum)"] = worker
    result["rest: the server between events"] = total - sum(result.values())
    result["total: workflow start → completed"] = total
    return result


async def breakdown(client: Client, ids: list[str]) -> dict[str, float]:
    """The median of every segment over the workflows."""
    samples = await asyncio.gather(*(segments(client, workflow_id) for workflow_id in ids))
    return {key: statistics.median(sample[key] for sample in samples) for key in samples[0]}


class Results(NamedTuple):
    metrics: list[Row]  # metric, baseline, upsertflow, ratio
    where: list[Row]  # segment, then one column per kind of workflow
    where_columns: list[str]  # the kinds of workflow of `where`
    cpu: list[Row]  # process, baseline, upsertflow
    large_cpu: list[Row]  # process, ms per large upsert
    sections: list[str]  # markdown: the sections of their own (hot ids, backlog)


async def measure(stack: Stack, args: argparse.Namespace) -> Results:
    client = await temporal.connect(
        env={"TEMPORAL_ADDRESS": stack.temporal_address}, codec=stack.codec
    )
    db = create_async_engine(stack.database_url)
    # Idle connections expire before uvicorn's keep-alive (5 s) closes them: a request sent
    # on one as the server closes it would fail (ECONNRESET) for nothing the API did.
    limits = httpx.Limits(
        max_connections=max(args.concurrency, args.backlog_concurrency), keepalive_expiry=2
    )
    chosen = [section for section in SECTIONS if runs(args, section)]
    step = iter(range(1, len(chosen) + 1))

    def say(what: str) -> None:
        print(f"{next(step)}/{len(chosen)} {what}", flush=True)

    metrics: list[Row] = []
    cpu: list[Row] = []
    large_cpu: list[Row] = []
    sections: list[str] = []
    ids: dict[str, list[str]] = {}  # workflows to break down, by column
    try:
        async with httpx.AsyncClient(
            base_url=stack.api_url, timeout=120, limits=limits, headers=stack.auth_headers()
        ) as http:
            bench = Bench(args, stack, client, http, db)
            if "latency" in chosen:
                say(f"latency, one at a time, n={args.n}")
                rows, (bare_ids, put_ids) = await bench.latency()
                metrics += rows
                ids["baseline"] = bare_ids
                ids[f"upsertflow {args.info_kib} KiB"] = put_ids
            if "throughput" in chosen:
                say(f"throughput, m={args.m} × {args.rounds} rounds, {args.concurrency} in flight")
                rows, cpu = await bench.throughput()
                metrics += rows
            if "large" in chosen:
                say(f"large info, {args.large_mib:g} MiB, runs={args.large_runs}")
                rows, ids[f"upsertflow {args.large_mib:g} MiB"], large_cpu = await bench.large()
                metrics += rows
            if "largest" in chosen:
                say("the largest accepted input")
                metrics += await bench.largest()
            # Before the backlog: its 10,000 workflows make the dev server slower to read.
            columns = [await breakdown(client, some) for some in ids.values()]
            if "hot" in chosen:
                say(f"hot ids, {args.hot_upserts} upserts over {args.hot_ids} ids")
                section = await hot_ids(bench)
                metrics += section.rows
                sections.append(section.text)
            if "backlog" in chosen:
                say(f"backlog of {args.backlog}, {args.backlog_concurrency} in flight")
                section = await drain(bench)
                metrics += section.rows
                sections.append(section.text)
    finally:
        await db.dispose()
    keys = list(dict.fromkeys(key for column in columns for key in column))
    where: list[Row] = [
        (key, *(f"{column[key] * 1000:.0f}" if key in column else "—" for column in columns))
        for key in keys
    ]
    return Results(metrics, where, list(ids), cpu, large_cpu, sections)


def latency_rows(metric: str, baseline: list[float], upsertflow: list[float]) -> list[Row]:
    rows: list[Row] = []
    for q in (50, 90):
        b, u = pct(baseline, q), pct(upsertflow, q)
        rows.append((f"{metric}, p{q} (ms)", f"{b * 1000:.0f}", f"{u * 1000:.0f}", f"{u / b:.2f}"))
    return rows


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:.0f}"


def seconds_row(metric: str, baseline: list[float], upsertflow: list[float]) -> Row:
    b, u = statistics.median(baseline), statistics.median(upsertflow)
    return (metric, f"{b:.2f}", f"{u:.2f}", f"{u / b:.1f}")


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.machine(),
    )
    cli = subprocess.run(
        [venv_binary("temporal"), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return (
        f"nproc {os.cpu_count()} ({cpu}), Python {platform.python_version()}, "
        f"temporalio {version('temporalio')}, {cli}"
    )


def cpu_busy(seconds: float = 1.0) -> float:
    """The share of the machine's CPU time that was not idle during `seconds`."""

    def sample() -> tuple[int, int]:
        fields = [int(value) for value in Path("/proc/stat").read_text().split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle, total = sample()
    time.sleep(seconds)
    idle_after, total_after = sample()
    return 1 - (idle_after - idle) / max(total_after - total, 1)


def report(args: argparse.Namespace, results: Results, seconds: float, busy: float) -> str:
    a, info = f"{args.activities} no-op activities", f"{args.info_kib} KiB `info`"
    legend: list[str] = []
    if runs(args, "latency"):
        legend += [
            f"- **answer**: `execute_update_with_start_workflow` whose update waits for the "
            f"first of {a} / `PUT /resources/{{id}}` → 201 with a {info}.",
            "- **start only**: `start_workflow` / the same PUT with `Prefer: respond-async` → 202.",
            f"- **end to end**: until the workflow completed ({a} / persist → normalize → "
            "enrich → load, which records the outcome), waited for before the next request.",
        ]
    if runs(args, "throughput"):
        legend.append(
            f"- **throughput**: {args.m} requests, {args.concurrency} in flight, until every "
            "workflow completed (baseline: its result; upsertflow: `etl_status = 'succeeded'` "
            f"counted in PostgreSQL); {args.rounds} rounds, the sides taking turns (the baseline "
            "first in rounds 1, 3, …), the rate over all of them. Ratio: upsertflow / baseline "
            "rate."
        )
    if runs(args, "large"):
        legend.append(
            f"- **large info**: upsertflow with a {info} / a {args.large_mib:g} MiB `info`, "
            f"median of {args.large_runs} run(s) each, one at a time."
        )
    if runs(args, "hot"):
        legend.append(
            f"- **hot ids**: {args.hot_upserts:,} synchronous PUTs over {args.hot_ids} ids "
            f"(shuffled, {args.concurrency} in flight), then every id checked exactly: see "
            "its section."
        )
    if runs(args, "backlog"):
        legend.append(
            f"- **backlog**: {args.backlog:,} PUTs with `Prefer: respond-async` "
            f"({args.backlog_concurrency} in flight, a {info} each), then drained; the work "
            "done per quarter of the drain, memory, CPU: see its section."
        )
    parts = [
        f"# upsertflow benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"Machine: {machine()}; CPUs {busy:.0%} busy in the second before the run (it "
        "should be near 0: anything else running slows the two columns unevenly).",
        f"Command: `{command(args)}` (took {seconds:.0f} s).",
        "Baseline: `bench.baseline.BareUpsert` on the same dev server, run by an in-process "
        f"worker on a task queue of its own, on {args.loop}'s event loop. upsertflow: the "
        "stack of `make dev` over real HTTP (its worker on uvloop's). Ratio: upsertflow / "
        "baseline.",
        table(("metric", "baseline", "upsertflow", "ratio"), results.metrics),
        "\n".join(legend),
    ]
    if results.where:
        parts += [
            "Where the time goes: median per segment (ms) from the workflow histories "
            "of the one-at-a-time runs (end to end, large info). Activities: the regular "
            "ones — upsertflow's enrich (1); the baseline's 5 no-ops. "
            "upsertflow's persist, normalize and load are local activities (pipeline "
            f"v{PIPELINE_VERSION}; "
            "record_outcome too, when an ETL does not succeed): they run inside workflow "
            "tasks, so their time is in "
            "'workflow tasks ran on the worker'. Queued: scheduled → started; ran: "
            "started → completed.",
            table(("segment", *results.where_columns), results.where),
        ]
    if results.cpu:
        parts += [
            f"CPU per workflow in the throughput metric (ms), by process: where the "
            f"{args.concurrency}-in-flight time goes.",
            table(("process", "baseline", "upsertflow"), results.cpu),
        ]
    if results.large_cpu:
        parts += [
            f"CPU per {args.large_mib:g} MiB upsert, one at a time (ms), by process: on "
            f"{os.cpu_count()} cores its end-to-end time cannot be less than the total "
            f"over {os.cpu_count()}. The benchmark's own is mostly building the body.",
            table(("process", f"upsertflow {args.large_mib:g} MiB"), results.large_cpu),
        ]
    return "\n\n".join(parts + results.sections)


async def supervise(stack: Stack, work: Coroutine[Any, Any, Results]) -> Results:
    """Run `work` until it ends, a child of the stack exits, or SIGINT or SIGTERM arrive.

    The last two cancel it, so every `async with` ends in order (the baseline
    worker shuts down); the SDK may turn the cancellation into an error of its
    own, which is why the cause is kept aside and raised instead.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    stopped: list[BaseException] = []

    def stop(cause: BaseException) -> None:
        stopped.append(cause)
        task.cancel()
        # Futures the SDK leaves with the cancellation in them are no news.
        loop.set_exception_handler(lambda _loop, _context: None)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, KeyboardInterrupt())
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and not stopped:
            try:
                stack.check_alive()
            except RuntimeError as error:
                stop(error)
    if stopped:
        with contextlib.suppress(BaseException):
            task.result()
        raise stopped[0]
    return task.result()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def interrupt(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # while the stack starts; then `until_signal`
    busy = cpu_busy()
    if busy > 0.1:
        print(f"warning: the CPUs are {busy:.0%} busy before the run", file=sys.stderr)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="upsertflow-bench-", ignore_cleanup_errors=True) as tmp:
        stack = Stack(Path(tmp), args.dev_server_config)
        try:
            print(f"starting the stack in {tmp}", flush=True)
            stack.start()
            with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
                results = runner.run(supervise(stack, measure(stack, args)))
        except KeyboardInterrupt:
            print("interrupted: stopping everything", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception:
            print(stack.tails(), file=sys.stderr)
            raise
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping has timeouts of its own
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stack.stop()
    text = report(args, results, time.monotonic() - started, busy)
    args.results.write_text(text + "\n")
    print(f"\n{text}\n\nwritten to {args.results}")


if __name__ == "__main__":
    main()
