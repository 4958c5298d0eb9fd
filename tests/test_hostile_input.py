"""Hostile input has a bounded cost.

What a valid-looking body turns into once the ETL flattens it is bounded by the limits
of `upsertflow.settings.Limits` (records, key and path lengths, flattened size,
attributes), checked by the API before anything is written:

- a corpus of hostile bodies, each refused with a problem that names the limit it
  exceeds (and never echoes more than a short excerpt of the client's data, nor any
  interpreter detail), nothing written, no workflow started, the API still ready;
- every limit at its edge: exactly at the limit is accepted and its ETL ends within
  the bounds, one over is refused;
- the worker's memory for the largest accepted shapes, measured in a process of its own.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from api import body as body_module
from api.body import parse_upsert_body, setting
from api.problems import Problem
from api.routes.context import MAX_PAGE_RECORDS
from tests.helpers import wait_for_etl
from tests.test_bad_input import JSON, _counts
from tests.test_context import read_context
from upsertflow.settings import Limits
from upsertflow.store.blobs import Document
from workflows.upsert import UpsertWorkflow

LIMITS = Limits()  # the defaults: the cost model as shipped
PROBLEM = "urn:upsertflow:problem:"
#: Words that would mean an interpreter's message reached the client.
INTERNALS = (
    "sys.",
    "int_max_str_digits",
    "Exceeds the limit",
    "Traceback",
    "codec can't",
    "object at 0x",
    "<class",
    "Error(",
)
#: A problem quotes at most ~40 characters of the client's data: it stays this small.
MAX_PROBLEM_BYTES = 1500
#: Temporal warns about payloads over 256 KiB; no history event may come close.
PAYLOAD_WARNING_BYTES = 256 * 1024
#: What the ETL of the largest accepted info may take of the worker's memory.
WORKER_MEMORY_MB = 300

Info = dict[str, Any]


def _body(info: Info | None = None, attributes: Info | None = None) -> bytes:
    value: Info = {}
    if attributes is not None:
        value["attributes"] = attributes
    if info is not None:
        value["info"] = info
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _list_body(item: str, field: str = "info", size: int = LIMITS.max_body_bytes) -> bytes:
    """`{"<field>":{"a":[item,item,…]}}` as close to `size` bytes as the item allows."""
    head, tail = f'{{"{field}":{{"a":[', "]}}"
    count = (size - len(head) - len(tail) + 1) // (len(item) + 1)
    return (head + (item + ",") * (count - 1) + item + tail).encode()


def _nested(levels: int, leaf: Any = "x") -> Info:
    """`levels` objects nested in one another: as `info`, the innermost is at level
    `levels + 1` (the body is level 1)."""
    value: Info = {"leaf": leaf}
    for _ in range(levels - 1):
        value = {"level": value}
    return value


def _path(lengths: list[int], leaf: Any) -> Info:
    """Objects nested along keys of the given lengths (a, b, c, …), `leaf` at the end."""
    value: Any = leaf
    for index in reversed(range(len(lengths))):
        value = {chr(ord("a") + index) * lengths[index]: value}
    return value  # type: ignore[no-any-return]


def _colliding(count: int) -> list[str]:
    """`count` distinct keys that all normalize to `a` (`__a--`, `_a-`, …)."""
    side = int(count**0.5) + 1
    return [f"{'_' * before}a{'-' * after}" for before in range(side) for after in range(side)][
        :count
    ]


def flattened(info: Info) -> int:
    """The flattened size of an ASCII-keyed `info`, computed independently of the API:
    over its scalars, the UTF-8 bytes of the dotted path plus those of the value (a
    string's own, the JSON text of any other)."""
    total = 0
    stack: list[tuple[str | None, Any]] = [(None, info)]
    while stack:
        prefix, node = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in children:
            path = str(key) if prefix is None else f"{prefix}.{key}"
            if isinstance(child, dict | list):
                stack.append((path, child))
            else:
                text = child if isinstance(child, str) else json.dumps(child)
                total += len(path.encode()) + len(text.encode())
    return total


def _flattened_to(size: int) -> Info:
    """An `info` of one-letter strings under a 401-character path, flattened to `size` bytes."""
    items: list[str] = ["v"] * (size // 411)
    info: Info = {"p" * 200: {"q" * 200: items}}
    items[-1] = "v" * (size - flattened(info) + 1)
    assert flattened(info) == size
    return info


def _utf8_flattened() -> Info:
    """Under 4-byte characters, the flattened size in bytes is four times its characters."""
    emoji = "\U0001f600" * 60
    return {emoji: {emoji: {emoji: [""] * 24_000}}}


@dataclass(frozen=True)
class Hostile:
    name: str
    build: Callable[[], bytes]
    status: int
    limit: str | None  # the `Limits` field the problem must name, if a limit
    words: tuple[str, ...] = ()  # more words the detail must contain


LONG_PARENTS = [255, 255, 255]  # a path prefix of 767 characters
MILLIONS = "under the body limit"

HOSTILE = [
    # The amplification shapes of the issue.
    Hostile(
        "a 100 KB key over a 1,000-item list",
        lambda: _body({"k" * 100_000: list(range(1000))}),
        422,
        "max_key_chars",
        ("100,000 characters",),
    ),
    Hostile(
        "1,000-item lists under 100 KB keys, 10 MB",
        lambda: _body({f"{n}" + "k" * 100_000: [0] * 1000 for n in range(100)}),
        422,
        "max_key_chars",
    ),
    Hostile(
        f"millions of zeros {MILLIONS}",
        lambda: _list_body("0"),
        422,
        "max_records",
        ("attributes",),
    ),
    Hostile(f"millions of floats {MILLIONS}", lambda: _list_body("0.5"), 422, "max_records"),
    Hostile(
        f"millions of 16-digit integers {MILLIONS}",
        lambda: _list_body("9007199254740991"),
        422,
        "max_records",
    ),
    Hostile(
        f"millions of empty strings {MILLIONS}",
        lambda: _list_body('""'),
        422,
        "max_records",
        ("list items included",),
    ),
    Hostile(
        f"millions of two-letter strings {MILLIONS}", lambda: _list_body('"ab"'), 422, "max_records"
    ),
    Hostile(f"millions of nulls {MILLIONS}", lambda: _list_body("null"), 422, "max_records"),
    Hostile(f"millions of booleans {MILLIONS}", lambda: _list_body("true"), 422, "max_records"),
    Hostile(f"millions of empty objects {MILLIONS}", lambda: _list_body("{}"), 422, "max_records"),
    Hostile(f"millions of empty lists {MILLIONS}", lambda: _list_body("[]"), 422, "max_records"),
    Hostile(
        f"millions of one-key objects {MILLIONS}",
        lambda: _list_body('{"a":0}'),
        422,
        "max_records",
    ),
    Hostile(
        "lists nested 30 deep, over and over",
        lambda: _list_body("[" * 29 + "0" + "]" * 29),
        422,
        "max_records",
    ),
    Hostile(
        "one value over the limit of records",
        lambda: _body({"a": [0] * LIMITS.max_records}),
        422,
        "max_records",
        (f"{LIMITS.max_records:,}",),
    ),
    Hostile(
        "a wide object: one key over the limit",
        lambda: _body({f"k{n}": 0 for n in range(LIMITS.max_info_keys + 1)}),
        422,
        "max_info_keys",
    ),
    Hostile(
        "a wide object of 300,000 keys",
        lambda: _body({f"k{n}": 0 for n in range(300_000)}),
        422,
        "max_records",
    ),
    Hostile(
        "thousands of keys colliding after normalization, under a 5,000-character parent",
        lambda: _body({"P" * 5000: {key: 1 for key in _colliding(5000)}}),
        422,
        "max_key_chars",
    ),
    Hostile(
        "thousands of colliding keys under a parent path of 1,020 characters",
        lambda: _body(_path([255, 255, 255, 252], {key: 1 for key in _colliding(5000)})),
        422,
        "max_path_chars",
    ),
    Hostile(
        "a 60 KB body of empty strings flattening into 19 MB",
        lambda: _body(_path(LONG_PARENTS, [""] * 25_000)),
        422,
        "max_flattened_bytes",
    ),
    Hostile(
        "a 45 KB body of zeros flattening into 17 MB",
        lambda: _body(_path(LONG_PARENTS, [0] * 22_000)),
        422,
        "max_flattened_bytes",
    ),
    Hostile(
        "long leaf keys under long parents",
        lambda: _body(_path(LONG_PARENTS, {f"{n:0250d}": 1 for n in range(17_000)})),
        422,
        "max_flattened_bytes",
    ),
    Hostile(
        "4-byte characters: the flattened size counts bytes, not characters",
        lambda: _body(_utf8_flattened()),
        422,
        "max_flattened_bytes",
    ),
    Hostile(
        "flattened one byte over the limit",
        lambda: _body(_flattened_to(LIMITS.max_flattened_bytes + 1)),
        422,
        "max_flattened_bytes",
    ),
    # Keys and paths.
    Hostile("a 1 MB key", lambda: _body({"k" * 1_000_000: 1}), 422, "max_key_chars"),
    Hostile(
        "a key one character over the limit",
        lambda: _body({"k" * (LIMITS.max_key_chars + 1): 1}),
        422,
        "max_key_chars",
    ),
    Hostile(
        "a key that Unicode NFKC makes 18 times longer (U+FDFA)",
        lambda: _body({"\ufdfa" * 15: 1}),
        422,
        "max_key_chars",
        ("NFKC",),
    ),
    Hostile(
        "a dotted key of 300 characters",
        lambda: _body({"a." * 150: 1}),
        422,
        "max_key_chars",
    ),
    Hostile(
        "a path one character over the limit",
        lambda: _body(_path([200] * 5 + [LIMITS.max_path_chars - 1004], 1)),
        422,
        "max_path_chars",
    ),
    Hostile(
        "a deep path within the nesting limit: 31 levels of 40-character keys",
        lambda: _body(_path([40] * 26, {"k" * 40: {"k" * 40: {"k" * 40: {"k" * 40: 1}}}})),
        422,
        "max_path_chars",
    ),
    # Nesting.
    Hostile(
        "nested one level deeper than the limit",
        lambda: _body(_nested(LIMITS.max_depth)),
        422,
        "max_depth",
    ),
    Hostile(
        "nested 100,000 levels deep",
        lambda: b'{"info":{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}}",
        422,
        "max_depth",
    ),
    # Numbers: refused before Python converts them, in words of the API.
    Hostile(
        "a 5,000-digit integer",
        lambda: b'{"info":{"a":' + b"9" * 5000 + b"}}",
        422,
        None,
        ("5,000 digits", "2^53"),
    ),
    Hostile(
        "a 5,000-digit negative integer in a list",
        lambda: b'{"info":{"a":[1,-' + b"9" * 5000 + b"]}}",
        422,
        None,
        ("5,000 digits",),
    ),
    Hostile(
        "a 1,000,000-digit integer",
        lambda: b'{"info":{"a":' + b"1" * 1_000_000 + b"}}",
        422,
        None,
        ("1,000,000 digits",),
    ),
    Hostile(
        "an integer of 17 digits",
        lambda: b'{"info":{"a":12345678901234567}}',
        422,
        None,
        ("17 digits",),
    ),
    Hostile("1e400", lambda: b'{"info":{"a":1e400}}', 422, None, ("overflows",)),
    Hostile("-1e400", lambda: b'{"info":{"a":-1e400}}', 422, None, ("overflows",)),
    Hostile(
        "a 100,000-digit number that overflows",
        lambda: b'{"info":{"a":' + b"9" * 100_000 + b".5}}",
        422,
        None,
        ("overflows",),
    ),
    # Attributes: stored as given and returned by every GET.
    Hostile(
        "attributes over their limit",
        lambda: _body(attributes={"a": "x" * 300_000}),
        422,
        "max_attributes_bytes",
    ),
    Hostile(
        "attributes of 200,000 values",
        lambda: _body(attributes={"a": [0] * 200_000}),
        422,
        "max_attributes_bytes",
    ),
    Hostile(
        f"attributes of millions of numbers {MILLIONS}",
        lambda: _list_body("0", field="attributes"),
        422,
        "max_records",
        ("attributes",),
    ),
    # The client's data is never echoed beyond a short excerpt.
    Hostile(
        "a duplicate 1 MB key",
        lambda: b'{"info":{"' + b"d" * 1_000_000 + b'":1,"' + b"d" * 1_000_000 + b'":2}}',
        422,
        None,
        ("duplicate",),
    ),
    Hostile(
        "an unknown top-level field with a 1 MB name",
        lambda: _body()[:-1] + b'"' + b"u" * 1_000_000 + b'":1}',
        422,
        None,
        ("unknown field",),
    ),
    Hostile(
        "a 1 MB key with \\u0000",
        lambda: b'{"info":{"' + b"n" * 1_000_000 + b'\\u0000":1}}',
        422,
        None,
        ("u0000",),
    ),
    Hostile(
        "a lone surrogate in a non-ASCII key",
        lambda: b'{"info":{"\xc3\xa9\\ud800":1}}',
        422,
        None,
        ("surrogate",),
    ),
    Hostile(
        "a body one byte over the limit",
        lambda: _body({"a": "x" * LIMITS.max_body_bytes})[: LIMITS.max_body_bytes + 1],
        413,
        "max_body_bytes",
    ),
]


def _assert_bounded_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"] == "application/problem+json"
    assert len(response.content) <= MAX_PROBLEM_BYTES, response.text[:3000]
    for word in INTERNALS:
        assert word not in response.text, f"{word!r} in {response.text}"
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["title"]
    return problem


@pytest.mark.parametrize("case", [pytest.param(case, id=case.name) for case in HOSTILE])
async def test_hostile_body_is_refused_naming_the_limit_and_nothing_happens(
    api: httpx.AsyncClient,
    sessions: async_sessionmaker[AsyncSession],
    client: Client,
    resource_id: str,
    case: Hostile,
) -> None:
    raw = case.build()
    assert len(raw) <= LIMITS.max_body_bytes or case.status == 413
    before = await _counts(sessions)

    started = time.perf_counter()
    response = await api.put(
        f"/resources/{resource_id}",
        content=raw,
        headers={**JSON, "Idempotency-Key": f"k-{resource_id}"},
        timeout=120,
    )
    elapsed = time.perf_counter() - started

    problem = _assert_bounded_problem(response, case.status)
    if case.limit is not None:
        name = setting(case.limit)
        assert name in problem["detail"], problem["detail"]
        if case.status == 422:
            assert problem["type"] == PROBLEM + "limit-exceeded"
            error = problem["errors"][0]
            assert error["limit"] == case.limit
            assert error["maximum"] == getattr(LIMITS, case.limit)
    else:
        assert problem["type"] == PROBLEM + "invalid-body"
    for word in case.words:
        assert word in problem["detail"], problem["detail"]
    print(f"{case.name}: {len(raw):,} bytes refused in {elapsed * 1000:.0f} ms")
    assert await _counts(sessions) == before
    assert (await api.get(f"/resources/{resource_id}")).status_code == 404
    assert (await client.count_workflows(f'ResourceId="{resource_id}"')).count == 0
    assert (await api.get("/readyz")).status_code == 200


#: Settings of `Limits` that no request can exceed: how much of a context a `GET` inlines.
NOT_REQUEST_LIMITS = {"max_inline_context_records"}


def test_the_corpus_is_large_and_covers_every_limit() -> None:
    assert len(HOSTILE) >= 30
    named = {case.limit for case in HOSTILE}
    limits = set(Limits.model_fields) - NOT_REQUEST_LIMITS
    assert named >= limits, limits - named


# --- every limit at its edge -----------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """A body that is exactly at a limit when built with the limit, one over with limit + 1."""

    limit: str
    build: Callable[[int], bytes]
    label: str = ""


EDGES = [
    Edge("max_records", lambda n: _body({"a": [0] * (n - 1)})),  # the list is a value too
    Edge("max_info_keys", lambda n: _body({f"k{i}": 0 for i in range(n)})),
    Edge("max_key_chars", lambda n: _body({"k" * n: "v"})),
    # 14 characters U+FDFA are 252 after NFKC, as normalization sees them.
    Edge("max_key_chars", lambda n: _body({"\ufdfa" * 14 + "k" * (n - 252): "v"}), "NFKC"),
    Edge("max_path_chars", lambda n: _body(_path([200] * 5 + [n - 1005], "v"))),
    Edge("max_flattened_bytes", lambda n: _body(_flattened_to(n))),
    Edge("max_attributes_bytes", lambda n: _body({"a": 1}, attributes={"a": "x" * (n - 8)})),
    Edge("max_depth", lambda n: _body(_nested(n - 1))),
    Edge(
        "max_body_bytes",
        lambda n: _body({"a": "x" * (n - len(_body({"a": ""})))}),
    ),
]


def _edge(limit: str) -> Edge:
    return next(edge for edge in EDGES if edge.limit == limit)


def test_edges_are_where_they_say() -> None:
    """The edge bodies measure what they claim, independently of the API's own measure."""
    n = LIMITS.max_flattened_bytes
    assert flattened(json.loads(_edge("max_flattened_bytes").build(n))["info"]) == n
    assert len(_edge("max_body_bytes").build(LIMITS.max_body_bytes)) == LIMITS.max_body_bytes
    attributes = json.loads(_edge("max_attributes_bytes").build(LIMITS.max_attributes_bytes))[
        "attributes"
    ]
    assert len(json.dumps(attributes, separators=(",", ":"))) == LIMITS.max_attributes_bytes
    path = json.loads(_edge("max_path_chars").build(LIMITS.max_path_chars))["info"]
    keys = []
    while isinstance(path, dict):
        [(key, path)] = path.items()
        keys.append(key)
    assert len(".".join(keys)) == LIMITS.max_path_chars
    assert max(map(len, keys)) <= LIMITS.max_key_chars


@pytest.mark.parametrize(
    "edge", [pytest.param(edge, id=f"{edge.limit} {edge.label}".strip()) for edge in EDGES]
)
async def test_at_the_limit_is_accepted_and_its_etl_stays_bounded_one_over_is_refused(
    api: httpx.AsyncClient,
    worker: Worker,
    sessions: async_sessionmaker[AsyncSession],
    resource_id: str,
    edge: Edge,
) -> None:
    limit = getattr(LIMITS, edge.limit)
    before = await _counts(sessions)

    over = await api.put(
        f"/resources/{resource_id}", content=edge.build(limit + 1), headers=JSON, timeout=120
    )
    after_over = await _counts(sessions)
    at = await api.put(
        f"/resources/{resource_id}", content=edge.build(limit), headers=JSON, timeout=120
    )

    problem = _assert_bounded_problem(over, 413 if edge.limit == "max_body_bytes" else 422)
    assert setting(edge.limit) in problem["detail"], problem["detail"]
    assert after_over == before
    assert at.status_code in (200, 201, 202), at.text[:2000]
    done = await wait_for_etl(api, resource_id, version=1, within=240)
    assert done["etl"]["status"] == "succeeded", done["etl"]
    context, pages = await read_context(api, resource_id, limit=MAX_PAGE_RECORDS)
    assert len(context) == done["context_records"] <= LIMITS.max_records
    assert max(map(len, context)) <= 2 * LIMITS.max_path_chars
    context_bytes = len(json.dumps(context, separators=(",", ":"), ensure_ascii=False).encode())
    # The flattened size plus the JSON punctuation of each record ("", :, "" and ,).
    assert context_bytes <= LIMITS.max_flattened_bytes + 6 * len(context) + 2
    started = time.perf_counter()
    read = await api.get(f"/resources/{resource_id}")
    elapsed = time.perf_counter() - started
    assert read.status_code == 200
    print(
        f"{edge.limit} at {limit:,}: {len(context):,} records in {len(pages)} pages, GET of "
        f"{len(read.content):,} bytes in {elapsed * 1000:.0f} ms"
    )


#: The target is well under a second; the bound leaves room for a loaded test machine.
GET_SECONDS = 2.0


async def _fastest(http: httpx.AsyncClient, url: str, **params: Any) -> tuple[float, int]:
    """The fastest of three GETs of `url`, in seconds, and the size of its answer."""
    timings = []
    for _ in range(3):
        started = time.perf_counter()
        read = await http.get(url, params=params, timeout=60)
        timings.append(time.perf_counter() - started)
        assert read.status_code == 200, read.text[:2000]
    return min(timings), len(read.content)


async def test_the_largest_enriched_context_is_read_quickly(
    api: httpx.AsyncClient, worker: Worker, resource_id: str
) -> None:
    """The most records an info may have, every one an e-mail address that enrichment
    answers with two more fields: the largest context in records. The resource is read
    without it, and so are pages of it, each as large as one may be."""
    info = {f"c{n}.email": f"u{n}@gmail.com" for n in range(LIMITS.max_records)}

    created = await api.put(f"/resources/{resource_id}", json={"info": info}, timeout=60)

    assert created.status_code == 201, created.text[:2000]
    done = await wait_for_etl(api, resource_id, version=1, within=240)
    assert done["etl"]["status"] == "succeeded", done["etl"]
    assert (done["context"], done["context_records"]) == (None, 3 * LIMITS.max_records)
    resource = await _fastest(api, f"/resources/{resource_id}")
    page = await _fastest(api, done["context_url"], limit=MAX_PAGE_RECORDS)
    started = time.perf_counter()
    context, pages = await read_context(api, resource_id, limit=MAX_PAGE_RECORDS)
    whole = time.perf_counter() - started
    assert len(context) == 3 * LIMITS.max_records
    print(
        f"GET of the resource: {resource[1]:,} bytes in {resource[0] * 1000:.0f} ms; a page of "
        f"{MAX_PAGE_RECORDS:,} records: {page[1]:,} bytes in {page[0] * 1000:.0f} ms; "
        f"all {len(pages)} pages in {whole * 1000:.0f} ms"
    )
    assert max(resource[0], page[0]) < GET_SECONDS


async def test_colliding_keys_under_a_long_parent_are_processed_with_bounded_results(
    api: httpx.AsyncClient, worker: Worker, client: Client, resource_id: str
) -> None:
    parent = "p" * LIMITS.max_key_chars
    info = {parent: {key: 1 for key in _colliding(5000)}}

    created = await api.put(f"/resources/{resource_id}", json={"info": info}, timeout=60)

    assert created.status_code == 201, created.text[:2000]
    done = await wait_for_etl(api, resource_id, version=1, within=120)
    assert done["etl"]["status"] == "succeeded", done["etl"]
    assert done["context"] == {f"{parent}.a": 1}
    handle = client.get_workflow_handle_for(UpsertWorkflow.run, done["etl"]["workflow_id"])
    history = await handle.fetch_history()
    largest = max(event.ByteSize() for event in history.events)
    assert largest < PAYLOAD_WARNING_BYTES, f"a history event of {largest} bytes"


# --- the cost of refusing -----------------------------------------------------------------


BUDGET = LIMITS.max_records + LIMITS.max_attributes_bytes // 2 + 4  # values of a body


@pytest.mark.parametrize("item", ["0", '""', "[]", "{}", "null", "[[[0]]]"])
def test_a_body_of_millions_of_values_is_refused_before_it_is_parsed(
    monkeypatch: pytest.MonkeyPatch, item: str
) -> None:
    def parse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the body was parsed")

    monkeypatch.setattr(json, "loads", parse)  # the module api.body uses

    with pytest.raises(Problem) as refused:
        parse_upsert_body(_list_body(item), LIMITS)

    assert setting("max_records") in refused.value.detail


def test_the_parser_hooks_stop_at_the_budget() -> None:
    """Behind the count from bytes, the parser's own hooks keep the budget too."""
    hooks = body_module._Hooks(LIMITS)
    for _ in range(BUDGET):
        hooks.integer("0")

    with pytest.raises(Problem) as refused:
        hooks.integer("0")

    assert setting("max_records") in refused.value.detail
    with pytest.raises(Problem):
        body_module._Hooks(LIMITS).object_pairs([("k", 0)] * (BUDGET + 1))


@pytest.mark.parametrize("item", ['""', "null", "[]"])
def test_the_walk_stops_at_the_first_limit(item: str) -> None:
    """Millions of values without a parser hook: the walk stops after the limit's worth."""
    info = json.loads(_list_body(item))["info"]
    assert len(info["a"]) > 2_000_000

    started = time.perf_counter()
    with pytest.raises(Problem) as refused:
        body_module.measure(info, "info", LIMITS)
    elapsed = time.perf_counter() - started

    assert setting("max_records") in refused.value.detail
    # A walk of all of it takes seconds; up to the limit, a few tens of milliseconds.
    assert elapsed < 1.0, f"{elapsed:.2f} s"


def test_stored_info_keeps_the_input_order() -> None:
    """Normalization's "first wins" on collisions depends on the order the client sent."""
    raw = b'{"info":{"b":1,"B":2,"a":{"z":1,"y":2}}}'

    parsed = parse_upsert_body(raw, LIMITS)

    assert parsed.info.body == b'{"b":1,"B":2,"a":{"z":1,"y":2}}'
    assert list(json.loads(parsed.info.body)) == ["b", "B", "a"]


#: JSON objects of every kind of value but floats, with any text the API accepts (no lone
#: surrogates, no NUL).
_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=8)
_FLOAT_FREE = st.dictionaries(
    _TEXT,
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _TEXT,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children),
        max_leaves=20,
    ),
    max_size=5,
)


@given(
    attributes=_FLOAT_FREE,
    info=_FLOAT_FREE,
    number=st.floats(allow_nan=False, allow_infinity=False),
)
@settings(max_examples=300, deadline=None, database=None)
def test_stored_documents_are_json_dumps_bytes_whoever_writes_them(
    attributes: dict[str, Any], info: dict[str, Any], number: float
) -> None:
    """A body without floats is written by orjson, with a float by `json`: the bytes (and so
    the digest, which Idempotency-Key fingerprints and content addresses are) are always
    `json.dumps`'s, as before orjson wrote any."""

    def stored(value: dict[str, Any]) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

    for document in ({"attributes": attributes, "info": info}, {"info": {**info, "n": number}}):
        for ascii_only in (True, False):
            raw = json.dumps(document, ensure_ascii=ascii_only).encode()
            parsed = parse_upsert_body(raw, LIMITS)
            assert parsed.info.body == stored(json.loads(raw)["info"])
            assert parsed.attributes.body == stored(json.loads(raw).get("attributes", {}))
            assert parsed.info.digest == hashlib.sha256(parsed.info.body).hexdigest()


def test_a_document_deeper_than_orjson_goes_is_written_all_the_same() -> None:
    """orjson stops at 255 levels; `max_depth` may be raised past that: `json` writes it."""
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(300):
        node["a"] = node = {}

    assert Document.of(deep, floats=False) == Document.of(deep)


# --- the worker's memory for the largest accepted info ------------------------------------

_NORMALIZE_STEP = textwrap.dedent(
    """
    import gc, json, sys, time
    from upsertflow.normalize import normalize_info

    def peak_mb():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM")

    gc.collect()
    baseline = peak_mb()
    started = time.perf_counter()
    with open(sys.argv[1], "rb") as stored:  # as the activity reads the stored info
        info = json.loads(stored.read())
    normalized = normalize_info(info)
    records = json.dumps(normalized.records, ensure_ascii=False, separators=(",", ":")).encode()
    del info, normalized
    decoded = json.loads(records)  # as the next step reads them
    print(json.dumps({"peak_mb": peak_mb(), "baseline_mb": baseline, "records": len(decoded),
                      "seconds": time.perf_counter() - started}))
    """
)


def _most_records() -> Info:
    """As many records as accepted, each with its share of the flattened limit."""
    records = LIMITS.max_records
    value = "v" * (LIMITS.max_flattened_bytes // (records - 1) - len("p" * 60 + ".99999") - 1)
    return {"p" * 60: [value] * (records - 1)}


def _longest_paths() -> Info:
    """The flattened limit spent on paths of 1,020 characters that normalization lengthens
    by half (camelCase -> snake_case)."""
    camel = ["aB" * 127 + "a", "cD" * 127 + "c", "eF" * 127 + "e"]
    count = LIMITS.max_flattened_bytes // (len(".".join(camel)) + 1 + 252 + 1) - 1
    leaves = {f"{n:06d}" + "gH" * 123: 1 for n in range(count)}
    return {camel[0]: {camel[1]: {camel[2]: leaves}}}


LARGEST_ACCEPTED: dict[str, Callable[[], Info]] = {
    "max records, each with its share of the flattened limit": _most_records,
    "max flattened, camelCase paths of 1,020 characters": _longest_paths,
    "max keys, the body near its limit": lambda: {
        f"k{n:05d}": "v" * 80 for n in range(LIMITS.max_info_keys)
    },
    "the body at its limit, of 1 KB values": lambda: {f"k{n}": "x" * 1000 for n in range(10_300)},
}


@pytest.mark.parametrize("name", list(LARGEST_ACCEPTED))
def test_the_worker_normalizes_the_largest_accepted_info_in_bounded_memory(
    tmp_path: Path, name: str
) -> None:
    raw = _body(LARGEST_ACCEPTED[name]())
    parsed = parse_upsert_body(raw, LIMITS)  # accepted: it is within every limit
    stored = tmp_path / "info.json"
    stored.write_bytes(parsed.info.body)

    result = subprocess.run(
        [sys.executable, "-c", _NORMALIZE_STEP, str(stored)],
        capture_output=True,
        text=True,
        check=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[1],
    )

    measured = json.loads(result.stdout)
    print(f"{name}: {len(raw):,} bytes -> {measured}")
    assert measured["records"] <= LIMITS.max_records
    assert measured["peak_mb"] < WORKER_MEMORY_MB, measured


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(alphabet=st.sampled_from('[]{}"\\,:ab é\U0001f600\n'), max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.text(alphabet=st.sampled_from('[]"\\ab'), max_size=4), children, max_size=4
        )
    ),
    max_leaves=30,
)


def _containers_and_commas(value: Any) -> tuple[int, int]:
    containers = commas = 0
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, list | dict):
            containers += 1
            commas += max(len(node) - 1, 0)
            stack.extend(node.values() if isinstance(node, dict) else node)
    return containers, commas


@given(value=JSON_VALUES, ensure_ascii=st.booleans())
@settings(max_examples=500, deadline=None, database=None)
def test_values_are_counted_exactly_before_parsing(value: Any, ensure_ascii: bool) -> None:
    """The counts that guard the parser, from bytes alone, are exact: the containers and
    the commas between values, outside strings, whatever the strings hold."""
    document = {"info": {"v": value, "w": [value]}}
    raw = json.dumps(document, ensure_ascii=ensure_ascii).encode()
    most = max(_containers_and_commas(document))

    assert not body_module._values_over(raw, most)
    assert body_module._values_over(raw, most - 1)
