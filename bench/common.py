"""What every part of the benchmark shares: request bodies, percentiles, tables, `/proc`, counts.

Kept apart from `bench.upserts` so that its sections in other modules (`bench.backlog`,
`bench.hot`) import these without importing the entry point (run as `__main__`).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

#: A row of a markdown table.
Row = tuple[str, ...]

COUNTRIES = ("FR", "DE", "US", "JP", "BR")
#: Long enough that a 5 MiB info stays under the API's limit of values (`MAX_RECORDS`).
DESCRIPTION = "A widget of the usual kind, " * 12


def make_info(size: int, seed: str) -> dict[str, Any]:
    """A messy `info` of about `size` bytes of JSON: items with values to coerce and enrich."""
    items: dict[str, Any] = {}
    total = 0
    while total < size:
        index = len(items)
        item = {
            "Name": f" Widget {seed}-{index} ",
            "Price": f"{index % 1000}.50",
            "Country": COUNTRIES[index % len(COUNTRIES)],
            "Email": f"buyer{index}@example.com",
            "Active": "yes" if index % 2 else "no",
            "Created": "2024-01-02",
            "Notes": "N/A",
            "Description": DESCRIPTION,
        }
        items[f"Item {index}"] = item
        total += len(json.dumps(item)) + 12
    return {"Source": seed, "Items": items}


def body(seed: str, info_bytes: int) -> bytes:
    return json.dumps({"attributes": {"name": seed}, "info": make_info(info_bytes, seed)}).encode()


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def table(header: tuple[str, ...], rows: Sequence[Row]) -> str:
    lines = [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(f"no {field} for {pid}")


def host_steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests while this machine's CPUs were ready to
    run (`steal` in `/proc/stat`), all CPUs together, so far."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """The process's resident memory now (`VmRSS`), in KiB."""
    return _status_kib(pid, "VmRSS")


def reset_peak_rss(pid: int) -> None:
    """Start counting the process's peak resident memory afresh (Linux `clear_refs`)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident memory since start (or its last `clear_refs`), in KiB."""
    return _status_kib(pid, "VmHWM")


_ETLS = text(
    "select count(*) filter (where etl_status = 'succeeded'),"
    " count(*) filter (where etl_status in ('failed', 'cancelled', 'superseded'))"
    " from resource_versions where resource_id like :pattern"
)


async def count_etls(db: AsyncEngine, pattern: str) -> tuple[int, int]:
    """Versions of the resources whose id is `LIKE pattern`: (ETL succeeded, ended otherwise)."""
    async with db.connect() as connection:
        succeeded, ended_otherwise = (await connection.execute(_ETLS, {"pattern": pattern})).one()
    return int(succeeded), int(ended_otherwise)
