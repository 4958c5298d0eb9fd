"""Backlog drain: `--backlog` upserts accepted with `Prefer: respond-async`, then drained.

The client sends them as fast as the API takes them, `--backlog-concurrency` in flight,
each to a resource of its own with a `--info-kib` `info` (as in the throughput metric);
then it waits until every ETL has ended, counting `etl_status = 'succeeded'` in
PostgreSQL (`bench.common.count_etls`, as the throughput metric does).

Is the drain rate flat? The order of completions alone cannot say: a worker that takes
on more workflows than it can finish at once (the SDK's default slots) lets the
workflows of a backlog advance together, one step per round through the queue, and most
of them end in the last rounds. So the drain — from the last 202, the whole backlog
in, to the last ETL's end — is cut into four quarters of *time*, and each quarter's
rate is the *work* done in it: the steps of the upserts that ended in it — persisted
(`persisted_at`), each ETL step (`etl_steps[].finished_at`), the outcome recorded
(`etl_finished_at`) — in upserts' worth per second (steps over steps per upsert), with
the steps of each kind that ended in it and the CPU each process used. Flat: the last
quarter's rate within `FLAT` of the first's. The acceptance phase before it (the worker drains
already, the API competes for the CPUs) is reported on its own, as are the ETLs ended
in each phase and when a quarter, half, three quarters and all of them had ended.

The worker's and the API's resident memory (`VmRSS`) is sampled at every poll (every
`POLL` s) and reported as of each quarter's end.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from bisect import bisect_right
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx
from sqlalchemy import text

from bench.common import (
    Row,
    body,
    count_etls,
    host_steal_seconds,
    pct,
    peak_rss_kib,
    reset_peak_rss,
    rss_kib,
    table,
)

if TYPE_CHECKING:
    from bench.stack import Stack
    from bench.upserts import Bench

#: Seconds between two counts in PostgreSQL (and samples of memory).
POLL = 0.5
#: Seconds without an ETL ending, once everything was sent, before the run fails.
STALL = 300
#: The goal: the last quarter's rate within this share of the first's.
FLAT = 0.15
#: Error answers quoted in the report, at most.
QUOTED = 3

STEPS = text(
    "select resource_id, etl_status, extract(epoch from persisted_at),"
    " extract(epoch from etl_finished_at), etl_steps"
    " from resource_versions where resource_id like :pattern"
)


class Section(NamedTuple):
    """A section of the report: its rows in the main table, and its own text."""

    rows: list[Row]  # metric, baseline ("—"), upsertflow, ratio ("—")
    text: str  # markdown


#: In a sample's CPU seconds: the CPU time the host took from this machine (not a process).
STOLEN = "stolen by the host"


class Sample(NamedTuple):
    """What a poll saw."""

    seconds: float  # since the first PUT
    rss_kib: dict[str, int]  # by process
    cpu_seconds: dict[str, float]  # used so far, by process


class Drain(NamedTuple):
    """What a backlog run measured; times in seconds since the first PUT."""

    accepted_in: float  # when the poll saw every answer in
    answers: list[float]  # seconds to each 202
    latencies: dict[str, float]  # by resource id: its 202 → its ETL's end
    errors: Counter[str]  # non-202 answers by status, or failed requests by error
    quoted: list[str]  # the first few of them
    etls_not_succeeded: int
    finished: list[float]  # when each succeeded ETL ended (`etl_finished_at`), in order
    steps: list[float]  # when each step of every upsert ended, in order
    kinds: dict[str, list[float]]  # the same by step (persisted, normalize, …), in order
    retries: Counter[str]  # attempts beyond the first, by ETL step
    samples: list[Sample]  # from the polls, in order
    start_rss: dict[str, int]  # KiB by process, before the first PUT
    peak_rss: dict[str, int]  # KiB by process, over the run (`VmHWM`)
    cpu_ms: dict[str, float]  # CPU per upsert by process


def watched(stack: Stack) -> dict[str, int]:
    """The processes whose memory is reported: the worker and the API."""
    pids = {"worker": stack.worker.pid, "API": stack.api.pid}
    missing = [name for name, pid in pids.items() if pid is None]
    if missing:
        raise RuntimeError(f"not running: {missing}")
    return {name: pid for name, pid in pids.items() if pid is not None}


def epoch(value: Any) -> float | None:
    """Seconds since the epoch of an ISO timestamp from JSON (or a number from SQL)."""
    if value is None:
        return None
    if isinstance(value, str):
        return datetime.fromisoformat(value).timestamp()
    return float(value)


async def drain(bench: Bench) -> Section:
    """Send the backlog, wait until it has drained, and say how flat the drain was."""
    args, stack, http = bench.args, bench.stack, bench.http
    n, in_flight = args.backlog, args.backlog_concurrency
    pattern = f"backlog-{bench.run}-%"
    pids = watched(stack)
    headers = {"Content-Type": "application/json", "Prefer": "respond-async"}
    slots = asyncio.Semaphore(in_flight)
    answers: list[float] = []
    accepted_at: dict[str, float] = {}
    errors: Counter[str] = Counter()
    quoted: list[str] = []

    async def put(index: int) -> None:
        resource_id = pattern.replace("%", str(index))
        async with slots:
            content = body(resource_id, bench.small)
            started = time.perf_counter()
            try:
                response = await http.put(
                    f"/resources/{resource_id}", content=content, headers=headers
                )
            except httpx.HTTPError as error:
                errors[type(error).__name__] += 1
                if len(quoted) < QUOTED:
                    quoted.append(f"PUT {resource_id}: {error!r}")
                return
            elapsed = time.perf_counter() - started
        if response.status_code == 202:
            answers.append(elapsed)
            accepted_at[resource_id] = time.time()
        else:
            errors[str(response.status_code)] += 1
            if len(quoted) < QUOTED:
                quoted.append(f"PUT {resource_id}: {response.status_code} {response.text[:300]}")

    for pid in pids.values():
        reset_peak_rss(pid)
    start_rss = {name: rss_kib(pid) for name, pid in pids.items()}
    cpu_before = stack.cpu_seconds()
    t0 = time.time()
    sending = asyncio.ensure_future(asyncio.gather(*(put(index) for index in range(n))))
    accepted_in: float | None = None
    samples: list[Sample] = []
    last_ended, progress_at = 0, t0
    try:
        while True:
            await asyncio.sleep(POLL)
            if accepted_in is None and sending.done():
                sending.result()
                accepted_in = time.time() - t0
                print(f"  backlog: {len(answers):,} accepted in {accepted_in:.0f} s", flush=True)
            succeeded, ended_otherwise = await count_etls(bench.db, pattern)
            now, ended = time.time(), succeeded + ended_otherwise
            samples.append(
                Sample(
                    now - t0,
                    {name: rss_kib(pid) for name, pid in pids.items()},
                    {**stack.cpu_seconds(), STOLEN: host_steal_seconds()},
                )
            )
            if ended > last_ended:
                for quarter in range(1, 5):
                    if last_ended < math.ceil(quarter * n / 4) <= ended:
                        print(f"  backlog: {ended:,} ETLs ended at {now - t0:.0f} s", flush=True)
                last_ended, progress_at = ended, now
            if accepted_in is not None and ended >= n - errors.total():
                break
            if accepted_in is not None and now - progress_at > STALL:
                raise RuntimeError(
                    f"backlog: {ended:,} of {n - errors.total():,} ETLs ended; none for {STALL} s"
                )
    finally:
        sending.cancel()
    assert accepted_in is not None
    cpu_after = stack.cpu_seconds()
    peak = {name: peak_rss_kib(pid) for name, pid in pids.items()}
    async with bench.db.connect() as connection:
        rows = (await connection.execute(STEPS, {"pattern": pattern})).all()
    finished: list[float] = []
    kinds: dict[str, list[float]] = {}
    retries: Counter[str] = Counter()
    latencies: dict[str, float] = {}
    for resource_id, status, persisted_at, finished_at, etl_steps in rows:
        ended_at = epoch(finished_at)
        if status != "succeeded" or ended_at is None:
            continue
        finished.append(ended_at - t0)
        latencies[resource_id] = ended_at - accepted_at.get(resource_id, t0)
        moments = [
            ("persisted", persisted_at),
            *((step["name"], step.get("finished_at")) for step in etl_steps),
            ("recorded", finished_at),
        ]
        for kind, at in moments:
            if (seconds := epoch(at)) is not None:
                kinds.setdefault(kind, []).append(seconds - t0)
        for step in etl_steps:
            retries[step["name"]] += max(int(step.get("attempts") or 1) - 1, 0)
    steps = sorted(seconds for times in kinds.values() for seconds in times)
    return report(
        args,
        Drain(
            accepted_in=accepted_in,
            answers=answers,
            latencies=latencies,
            errors=errors,
            quoted=quoted,
            etls_not_succeeded=ended_otherwise,
            finished=sorted(finished),
            steps=steps,
            kinds={kind: sorted(times) for kind, times in kinds.items()},
            retries=retries,
            samples=samples,
            start_rss=start_rss,
            peak_rss=peak,
            cpu_ms={
                name: (cpu_after[name] - cpu_before[name]) * 1000 / max(len(finished), 1)
                for name in cpu_after
            },
        ),
    )


def count_until(times: list[float], seconds: float) -> int:
    """How many of the sorted `times` are at most `seconds`."""
    return bisect_right(times, seconds)


def rss_at(samples: list[Sample], seconds: float) -> dict[str, int]:
    """The memory the last poll up to `seconds` saw (the first poll, if none)."""
    return samples[poll_index(samples, seconds)].rss_kib


def cpu_between(samples: list[Sample], start: float, end: float) -> dict[str, float]:
    """CPU seconds each process used between the polls nearest `start` and `end`."""
    first, last = poll_index(samples, start), poll_index(samples, end)
    return {
        name: samples[last].cpu_seconds[name] - samples[first].cpu_seconds.get(name, 0.0)
        for name in samples[last].cpu_seconds
    }


def poll_index(samples: list[Sample], seconds: float) -> int:
    """The index of the last poll up to `seconds` (the first poll, if none)."""
    return max(bisect_right([s.seconds for s in samples], seconds) - 1, 0)


def mib(kib: int) -> str:
    return f"{kib / 1024:.0f}"


def report(args: argparse.Namespace, drain: Drain) -> Section:
    n, in_flight = args.backlog, args.backlog_concurrency
    accepted, finished = len(drain.answers), drain.finished
    if not finished:
        raise RuntimeError("backlog: no ETL succeeded")
    accept_rate = accepted / drain.accepted_in
    latencies = sorted(drain.latencies.values())
    slowest = max(drain.latencies, key=drain.latencies.__getitem__)
    total = finished[-1]
    per_upsert = len(drain.steps) / len(finished)  # steps per upsert
    names = list(drain.start_rss)

    def row(label: str, start: float, end: float) -> tuple[Row, float]:
        work = count_until(drain.steps, end) - count_until(drain.steps, start)
        rate = work / per_upsert / (end - start)
        ended = count_until(finished, end) - count_until(finished, start)
        rss = rss_at(drain.samples, end)
        vs = f"{rate / rates[0]:.2f}" if rates else "1.00"
        by_kind = " / ".join(
            f"{count_until(times, end) - count_until(times, start):,}"
            for times in drain.kinds.values()
        )
        used = cpu_between(drain.samples, start, end)
        busy = " / ".join(f"{used.get(name, 0.0) / (end - start):.2f}" for name in busiest)
        cells = (label, f"{start:.0f} → {end:.0f}", f"{rate:.1f}", vs, f"{ended:,}", by_kind)
        return (*cells, busy, *(mib(rss[name]) for name in names)), rate

    whole = cpu_between(drain.samples, 0.0, total)
    # The three busiest processes, and what the host took: a phase that did less work with
    # the same CPU busy may have had less CPU to use than it looked.
    processes = [name for name in whole if name != STOLEN]
    busiest = [*sorted(processes, key=whole.__getitem__, reverse=True)[:3], STOLEN]

    rates: list[float] = []
    rows: list[Row] = [("start", "0", "—", "", "—", "", "", *map(mib, drain.start_rss.values()))]
    accepting, _ = row("accepting", 0.0, drain.accepted_in)
    rows.append((*accepting[:3], "", *accepting[4:]))
    quarter = (total - drain.accepted_in) / 4
    for k in range(1, 5):
        start = drain.accepted_in + (k - 1) * quarter
        cells, rate = row(f"drain, quarter {k}", start, start + quarter)
        rates.append(rate)
        rows.append(cells)
    rows.append(("peak", "", "", "", "", "", "", *(mib(drain.peak_rss[name]) for name in names)))
    ratio = rates[-1] / rates[0]
    flat = abs(ratio - 1) <= FLAT
    milestones = " / ".join(
        f"{finished[math.ceil(k * len(finished) / 4) - 1]:.0f}" for k in range(1, 5)
    )
    # The drain's tail: the last 1 % of the ETLs, once the backlog is nearly out (fewer
    # workflows left than the worker's slots) — part of the last quarter, at a lower rate.
    last_pct = max(len(finished) // 100, 1)
    tail = finished[-1] - finished[-last_pct - 1] if len(finished) > last_pct else 0.0
    errors = drain.errors.total() + drain.etls_not_succeeded
    if errors:
        said = ", ".join(f"{count} × {what}" for what, count in drain.errors.most_common())
        if drain.etls_not_succeeded:
            said += f"{', ' if said else ''}{drain.etls_not_succeeded} ETL(s) not succeeded"
        error_text = f"**errors: {said}**" + "".join(f"\n    - `{q}`" for q in drain.quoted)
    else:
        error_text = "errors: none (every answer 202, every ETL succeeded)"
    summary = (
        f"Sent with {in_flight} in flight, {accepted:,} of {n:,} PUTs were answered 202 in "
        f"{drain.accepted_in:.0f} s: **{accept_rate:.1f} accepted per s** (answer p50 "
        f"{pct(drain.answers, 50) * 1000:.0f} ms, p90 {pct(drain.answers, 90) * 1000:.0f} ms). "
        f"Every ETL had ended {total:.0f} s after the first PUT: **{len(finished) / total:.1f} "
        f"upserts per s** overall. Work done in the drain's last quarter / its first: "
        f"**{ratio:.2f}** "
        f"(goal: within {FLAT:.0%}: {'met' if flat else 'not met'}). The first ETL ended "
        f"after {finished[0]:.1f} s; a quarter, half, three quarters and all of them after "
        f"{milestones} s, the last {last_pct:,} in the last {tail:.1f} s; from its 202 to its "
        f"ETL's end an upsert took p50 "
        f"{pct(latencies, 50):.0f} s, p90 {pct(latencies, 90):.0f} s, at most "
        f"{latencies[-1]:.0f} s (`{slowest}`). "
        f"{error_text}."
    )
    text = "\n\n".join(
        [
            f"## Backlog drain: {n:,} upserts with `Prefer: respond-async`",
            summary,
            table(
                (
                    "phase",
                    "from → to (s)",
                    "work done (upserts per s)",
                    "vs first quarter",
                    "ETLs ended",
                    f"steps ended ({' / '.join(drain.kinds)})",
                    f"CPU cores busy ({' / '.join(busiest)})",
                    *(f"{name} RSS (MiB)" for name in names),
                ),
                rows,
            ),
            "*Accepting*: from the first PUT to the last 202 (the worker already drains, and "
            "the API competes with it for the CPUs). *Drain, quarter k*: the k-th quarter of "
            "the time from the last 202 to the last ETL's end, the whole backlog in, nothing "
            "else running. *Work done*: the steps that ended in the phase (persisted, each "
            f"ETL step, outcome recorded: {per_upsert:.0f} per upsert), in upserts' worth per "
            "second, not the ETLs ended per phase: were the backlog's workflows to advance "
            "together, most ETLs would end late; *steps ended* shows which steps each phase "
            "did (the same number of each: workflows taken on one after the other, start to "
            "end). *CPU cores busy*: CPU "
            "seconds per second of the phase, by process (2: both cores); *stolen by the "
            "host*: CPU time the hypervisor gave other guests while this machine's CPUs were "
            "ready to run (`steal` in `/proc/stat`). Attempts beyond "
            "the first, by step: "
            + (", ".join(f"{k} {v:,}" for k, v in sorted(drain.retries.items())) or "none")
            + f". RSS: `VmRSS` at the last poll (every {POLL:g} s) of the phase; start: "
            "before the first PUT; peak: `VmHWM` over the run.",
            "CPU per upsert by process over the whole backlog (ms):",
            table(
                ("process", "ms per upsert"),
                [(name, f"{ms:.1f}") for name, ms in drain.cpu_ms.items()]
                + [("total", f"{sum(drain.cpu_ms.values()):.1f}")],
            ),
        ]
    )
    label = f"backlog of {n:,} (respond-async, {in_flight} in flight)"
    end_rss = rss_at(drain.samples, total)
    main_rows: list[Row] = [
        (f"{label}: accepted (per s)", "—", f"{accept_rate:.1f}", "—"),
        (f"{label}: drained, whole run (upserts per s)", "—", f"{len(finished) / total:.1f}", "—"),
        (
            f"{label}: work done, first / last quarter (upserts per s)",
            "—",
            f"{rates[0]:.1f} / {rates[-1]:.1f}",
            "—",
        ),
        (f"{label}: last quarter's rate / first's", "—", f"{ratio:.2f}", "—"),
        (
            f"{label}: worker / API RSS, start → end (MiB)",
            "—",
            " / ".join(f"{mib(drain.start_rss[name])} → {mib(end_rss[name])}" for name in names),
            "—",
        ),
        (f"{label}: errors", "—", str(errors), "—"),
    ]
    return Section(main_rows, text)
