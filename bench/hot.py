"""Hot ids: `--hot-upserts` synchronous PUTs over `--hot-ids` ids, then checked exactly.

Each id gets the same number of PUTs (±1), sent in a shuffled order, `--concurrency` in
flight, so PUTs of the same id race each other all the time. Every PUT's body is
distinct and checkable: it carries its position in the sending order, `seq`, in its
`attributes` and its `info` (`hot_body`). A PUT answered 201/200 says which version
it became; one answered 202 (persisting took longer than the sync timeout) is found
by its request id in `resource_versions`. Then, once no version of these ids is
pending or running in PostgreSQL, `GET /resources/{id}` of every id must say:

- `version` = the number of accepted PUTs (200/201/202) of the id, and the versions
  the PUTs became are exactly 1…that number, each the version its request persisted
  (201 for version 1 only);
- `etl` is the last version's, and `succeeded`;
- `context_version` = `version`, and `context` is what the last version's `info`
  normalizes to (`upsertflow.normalize.normalize_info`) with the enrichment service's
  fields merged as `enrich` merges them; `attributes` are the last version's.

Every id that differs is listed with the reasons. A difference is a correctness bug.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx
from sqlalchemy import text

from bench.backlog import STALL, Section
from bench.common import COUNTRIES, Row, pct, table
from upsertflow.normalize import normalize_info

if TYPE_CHECKING:
    from bench.upserts import Bench

#: The records `enrich` sends to the enrichment service, by path, with their kind (the
#: default rules in `upsertflow.settings.Enrichment` select exactly these of `hot_body`).
ENRICHED = {"country": "country_code", "buyer.email": "email"}
#: Differing ids listed in the report, at most.
LISTED = 20
#: The shuffle's seed: the same order in every run.
SEED = 12

VERSIONS = text(
    "select resource_id, version, request_id, etl_status from resource_versions"
    " where resource_id like :pattern"
)
IN_FLIGHT = text(
    "select count(*), count(*) filter (where etl_status in ('pending', 'running'))"
    " from resource_versions where resource_id like :pattern"
)


def hot_body(resource_id: str, seq: int) -> dict[str, Any]:
    """The body of the `seq`-th PUT: messy values to normalize, two of them to enrich."""
    return {
        "attributes": {"name": resource_id, "seq": seq},
        "info": {
            "Seq": str(seq),
            "Source": f" {resource_id} ",
            "Buyer": {
                "Name": f"  Buyer {seq} ",
                "Email": f"buyer{seq}@example.com",
                "Active": "yes" if seq % 2 else "no",
            },
            "Country": COUNTRIES[seq % len(COUNTRIES)],
            "Price": f"{seq % 1000}.50",
            "Created": "2024-01-02",
            "Notes": "N/A",
            "Tags": [f"tag{seq % 7}", " "],
        },
    }


#: A check an id failed, and what differs.
Problem = tuple[str, str]


class Put(NamedTuple):
    seq: int
    resource_id: str
    status: int  # 0: no answer
    version: int | None  # from a 201/200 answer
    request_id: str | None
    seconds: float
    error: str | None


async def expected_context(enrichment: httpx.AsyncClient, info: dict[str, Any]) -> dict[str, Any]:
    """What the ETL of `info` loads: its records, and the enrichment service's fields."""
    records = dict(normalize_info(info).records)
    items = [{"key": path, "kind": kind, "value": records[path]} for path, kind in ENRICHED.items()]
    response = await enrichment.post("/v1/enrich", json={"items": items})
    response.raise_for_status()
    for result in response.json()["results"]:
        for field, value in (result.get("fields") or {}).items():
            records[f"{result['key']}.{field}"] = value
    return records


async def hot_ids(bench: Bench) -> Section:
    args, http = bench.args, bench.http
    n, ids = args.hot_upserts, args.hot_ids
    names = [f"hot-{bench.run}-{index}" for index in range(ids)]
    order = [names[seq % ids] for seq in range(n)]
    random.Random(SEED).shuffle(order)
    bodies = [hot_body(resource_id, seq) for seq, resource_id in enumerate(order)]
    slots = asyncio.Semaphore(args.concurrency)

    async def put(seq: int) -> Put:
        resource_id = order[seq]
        async with slots:
            started = time.perf_counter()
            try:
                response = await http.put(f"/resources/{resource_id}", json=bodies[seq])
            except httpx.HTTPError as error:
                return Put(seq, resource_id, 0, None, None, 0.0, repr(error))
            seconds = time.perf_counter() - started
        status = response.status_code
        if status in (200, 201):
            answer = response.json()
            request_id = response.headers.get("X-Request-ID")
            return Put(seq, resource_id, status, answer["version"], request_id, seconds, None)
        if status == 202:
            return Put(seq, resource_id, status, None, response.json()["request_id"], seconds, None)
        return Put(seq, resource_id, status, None, None, seconds, response.text[:300])

    started = time.perf_counter()
    puts = await asyncio.gather(*(put(seq) for seq in range(n)))
    answered = time.perf_counter() - started
    accepted = [p for p in puts if p.status in (200, 201, 202)]
    pattern = f"hot-{bench.run}-%"
    await wait_ended(bench, pattern, len(accepted))
    ended = time.perf_counter() - started

    async with bench.db.connect() as connection:
        stored = (await connection.execute(VERSIONS, {"pattern": pattern})).all()
    by_request = {
        request_id: (resource_id, version) for resource_id, version, request_id, _ in stored
    }
    statuses = Counter(status for *_, status in stored)
    async with httpx.AsyncClient(base_url=bench.stack.enrichment_url, timeout=30) as enrichment:
        resources = {name: (await http.get(f"/resources/{name}")).json() for name in names}
        problems = await check(puts, by_request, resources, bodies, enrichment)

    return report(args, puts, answered, ended, statuses, problems)


async def wait_ended(bench: Bench, pattern: str, accepted: int) -> None:
    """Until every accepted PUT's version exists and none is pending or running."""
    progress_at, last = time.monotonic(), (-1, -1)
    while True:
        async with bench.db.connect() as connection:
            versions, in_flight = (await connection.execute(IN_FLIGHT, {"pattern": pattern})).one()
        if versions >= accepted and in_flight == 0:
            return
        if (versions, in_flight) != last:
            progress_at, last = time.monotonic(), (versions, in_flight)
        elif time.monotonic() - progress_at > STALL:
            raise RuntimeError(
                f"hot ids: {versions} of {accepted} versions persisted, {in_flight} ETLs "
                f"in flight; no change for {STALL} s"
            )
        await asyncio.sleep(0.1)


async def check(
    puts: list[Put],
    by_request: dict[str, tuple[str, int]],
    resources: dict[str, dict[str, Any]],
    bodies: list[dict[str, Any]],
    enrichment: httpx.AsyncClient,
) -> dict[str, list[Problem]]:
    """Why each id is not exactly right (none: it is), by id: (which check, what differs)."""
    problems: dict[str, list[Problem]] = defaultdict(list)
    versions: dict[str, dict[int, Put]] = defaultdict(dict)
    accepted: Counter[str] = Counter()
    for p in puts:
        if p.status not in (200, 201, 202):
            problems[p.resource_id].append(
                ("error answer", f"PUT seq {p.seq}: {p.status} {p.error}")
            )
            continue
        accepted[p.resource_id] += 1
        stored = by_request.get(p.request_id or "")
        if stored is None:
            problems[p.resource_id].append(("request not persisted", f"PUT seq {p.seq}"))
            continue
        if stored[0] != p.resource_id:
            problems[p.resource_id].append(("request in another id", f"PUT seq {p.seq}: {stored}"))
            continue
        version = stored[1]
        if p.version is not None and p.version != version:
            problems[p.resource_id].append(
                (
                    "answered version ≠ persisted",
                    f"PUT seq {p.seq}: answered {p.version}, persisted {version}",
                )
            )
        if (p.status == 201) != (version == 1) and p.status != 202:
            problems[p.resource_id].append(
                ("201/200 wrong", f"PUT seq {p.seq}: {p.status} for version {version}")
            )
        if version in versions[p.resource_id]:
            other = versions[p.resource_id][version].seq
            problems[p.resource_id].append(
                ("version twice", f"PUTs seq {other} and {p.seq}: {version}")
            )
        versions[p.resource_id][version] = p
    for name, resource in resources.items():
        count = accepted[name]
        why = problems[name]
        if sorted(versions[name]) != list(range(1, count + 1)):
            why.append(("versions not 1…n", f"{sorted(versions[name])}, not 1…{count}"))
        current = resource.get("version")
        if current != count:
            why.append(("version ≠ accepted PUTs", f"version {current}, accepted PUTs {count}"))
        etl = resource.get("etl") or {}
        if etl.get("version") != current or etl.get("status") != "succeeded":
            why.append(
                ("ETL not succeeded", f"{etl.get('status')} for version {etl.get('version')}")
            )
        if resource.get("context_version") != current:
            why.append(("context_version ≠ version", f"{resource.get('context_version')}"))
        last = versions[name].get(current) if isinstance(current, int) else None
        if last is None:
            why.append(("no PUT became the version", f"{current}"))
            continue
        body = bodies[last.seq]
        if resource.get("attributes") != body["attributes"]:
            why.append(("attributes", f"{resource.get('attributes')}, not seq {last.seq}'s"))
        context = resource.get("context")
        expected = await expected_context(enrichment, body["info"])
        if context != expected:
            got = (context or {}).get("seq")
            why.append(
                (
                    "context ≠ last info normalized",
                    f"context of seq {got}, last version's seq {last.seq}: "
                    f"{diff(expected, context or {})}",
                )
            )
    return {name: why for name, why in problems.items() if why}


def diff(expected: dict[str, Any], got: dict[str, Any]) -> str:
    keys = sorted(set(expected) | set(got))
    differing = [
        f"{key}: {got.get(key, '∅')!r} (expected {expected.get(key, '∅')!r})"
        for key in keys
        if expected.get(key, ...) != got.get(key, ...)
    ]
    return "; ".join(differing[:5]) + (
        f" … ({len(differing)} in all)" if len(differing) > 5 else ""
    )


def report(
    args: argparse.Namespace,
    puts: list[Put],
    answered: float,
    ended: float,
    statuses: Counter[str],
    problems: dict[str, list[Problem]],
) -> Section:
    n, ids, in_flight = args.hot_upserts, args.hot_ids, args.concurrency
    seconds = [p.seconds for p in puts if p.status in (200, 201, 202)]
    answers = Counter(p.status for p in puts)
    right = not problems
    checks = Counter(check for why in problems.values() for check, _ in why)
    label = f"hot ids: {n:,} PUTs over {ids} ids, {in_flight} in flight"
    low, high = n // ids, math.ceil(n / ids)
    spread = str(low) if low == high else f"{low}–{high}"
    rate = len(seconds) / answered
    rows: list[Row] = [
        ("PUTs answered (per s)", f"{rate:.1f}"),
        ("answer p50 / p90 (ms)", f"{pct(seconds, 50) * 1000:.0f} / {pct(seconds, 90) * 1000:.0f}"),
        ("every ETL ended (s after the first PUT)", f"{ended:.1f}"),
        ("upserts end to end (per s)", f"{len(seconds) / ended:.1f}"),
        (
            "answers",
            ", ".join(f"{count} × {status or 'none'}" for status, count in sorted(answers.items())),
        ),
        (
            "ETLs of all versions",
            ", ".join(f"{count} × {s}" for s, count in sorted(statuses.items())),
        ),
        ("ids exactly right", f"{ids - len(problems)} of {ids}"),
        (
            "mismatches",
            ", ".join(f"{count} × {check}" for check, count in checks.most_common()) or "0",
        ),
    ]
    listed = sorted(problems.items())[:LISTED]
    details = "\n".join(
        f"- `{name}`: " + "; ".join(f"{check}: {what}" for check, what in why)
        for name, why in listed
    )
    if len(problems) > LISTED:
        details += f"\n- … and {len(problems) - LISTED} more ids"
    verdict = (
        "**Exactly right: yes** (0 ids differ)."
        if right
        else f"**Exactly right: NO** — {len(problems)} of {ids} ids differ (a correctness "
        f"bug); mismatches by check: "
        + ", ".join(f"{check} {count}" for check, count in checks.most_common())
        + f"\n\n{details}"
    )
    text = "\n\n".join(
        [
            f"## Hot ids: {n:,} synchronous upserts over {ids} ids, {in_flight} in flight",
            table(("metric", "value"), rows),
            verdict,
            f"Each id got {spread} PUTs, in a shuffled order; each body "
            "distinct (its `seq` in `attributes` and `info`). Checked for every id once no "
            "version was pending or running: `version` = its accepted PUTs (200/201/202), "
            "the versions its PUTs became are exactly 1…`version` (each the one its request "
            "persisted; 201 only for version 1), its `etl` is its last version's and "
            "succeeded, `context_version` = `version`, `context` = the last version's `info` "
            "normalized and enriched, `attributes` = the last version's. Older versions' "
            "ETLs may end `superseded`. PUTs answered per s: accepted PUTs over the time "
            "until the last answer.",
        ]
    )
    main_rows: list[Row] = [
        (f"{label}: answered (per s)", "—", f"{rate:.1f}", "—"),
        (
            f"{label}: answer p50 / p90 (ms)",
            "—",
            f"{pct(seconds, 50) * 1000:.0f} / {pct(seconds, 90) * 1000:.0f}",
            "—",
        ),
        (
            f"{label}: exactly right",
            "—",
            "yes" if right else f"NO: {len(problems)} ids differ",
            "—",
        ),
    ]
    return Section(main_rows, text)
