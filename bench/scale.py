"""Scale-out on one machine: throughput of the stack with 1, 2, … worker processes.

    .venv/bin/python -m bench.scale [--workers 1,2,3] [--apis 2] [--m 200] [--concurrency 50]

For each worker count, a fresh dev stack (its own PostgreSQL and Temporal dev server,
`--apis` API processes, N workers) takes `--m` upserts, `--concurrency` in flight spread
over the APIs, and is timed until every ETL has succeeded (counted in PostgreSQL, as
`make bench`'s throughput). Printed as a Markdown table with CPU per upsert by process:
where the CPUs go as workers are added, and so which process is the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from sqlalchemy.ext.asyncio import create_async_engine

from bench.common import body, count_etls, table
from bench.stack import Stack


async def run(workers: int, apis: int, m: int, concurrency: int) -> dict[str, float]:
    """Upserts per second with `workers` worker processes; CPU ms per upsert by process."""
    root = Path(tempfile.mkdtemp(prefix="upsertflow-scale-"))
    stack = Stack(root, workers=workers, apis=apis)
    stack.start()
    db = create_async_engine(stack.database_url)
    run_id = uuid.uuid4().hex[:8]
    try:
        headers = {**stack.auth_headers(), "Content-Type": "application/json"}
        clients = [
            httpx.AsyncClient(base_url=url, headers=headers, timeout=120) for url in stack.api_urls
        ]
        limit = asyncio.Semaphore(concurrency)

        async def put(n: int) -> None:
            async with limit:
                answer = await clients[n % apis].put(
                    f"/resources/sc-{run_id}-{n}", content=body(f"{run_id}-{n}", 1024)
                )
                assert answer.status_code in (201, 202), answer.text

        before = stack.cpu_seconds()
        started = time.monotonic()
        await asyncio.gather(*(put(n) for n in range(m)))
        for _ in range(6000):  # at most 10 minutes
            if (await count_etls(db, f"sc-{run_id}-%"))[0] >= m:
                break
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError(f"{m} ETLs did not all succeed within 10 minutes")
        seconds = time.monotonic() - started
        after = stack.cpu_seconds()
        for client in clients:
            await client.aclose()
    finally:
        await db.dispose()
        stack.stop()
    cpu = {name: (after[name] - before[name]) * 1000 / m for name in after}
    merged: dict[str, float] = {}
    for name, value in cpu.items():
        kind = name.split(" ")[0] if name.startswith(("worker", "api")) else name
        merged[kind] = merged.get(kind, 0.0) + value
    return {
        "rate": m / seconds,
        "busy": sum(cpu.values()) * m / 1000 / seconds / (os.cpu_count() or 1),
        **merged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("--workers", default="1,2,3", help="worker counts, comma-separated")
    parser.add_argument("--apis", type=int, default=2)
    parser.add_argument("--m", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    results = {n: asyncio.run(run(n, args.apis, args.m, args.concurrency)) for n in counts}
    first = results[counts[0]]["rate"]
    processes = [k for k in results[counts[0]] if k not in ("rate", "busy")]
    rows = [
        (
            f"{n} worker{'s' if n > 1 else ''}",
            f"{r['rate']:.1f}",
            f"{r['rate'] / first:.2f}",
            f"{r['busy']:.0%}",
            *(f"{r.get(p, 0.0):.1f}" for p in processes),
        )
        for n, r in results.items()
    ]
    header = ("workers", "upserts/s", "vs 1 worker", "CPUs busy", *(f"{p} ms" for p in processes))
    print(
        f"Command: `python -m bench.scale --workers {args.workers} --apis {args.apis} "
        f"--m {args.m} --concurrency {args.concurrency}`, nproc {os.cpu_count()}\n"
    )
    print(table(header, rows))


if __name__ == "__main__":
    main()
