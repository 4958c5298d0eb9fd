"""Property-based: every operation of the API's own OpenAPI document, fuzzed with schemathesis.

The API (uvicorn) and a worker run as real processes on the suite's PostgreSQL, Temporal dev
server and enrichment service; the schema is the one the running server serves. For every
generated request — valid and invalid ids, queries, headers and bodies — the API must answer
without a 5xx, with a documented status code and content type, with a body that matches the
documented schema, and every error must be an `application/problem+json` document.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devstack import Stack, StackConfig

#: Every resource this module creates has this prefix: it never meets another test's.
PREFIX = f"fz{uuid.uuid4().hex[:8]}-"
#: Ids that exist (seeded below), so that generated requests also reach real resources.
POOL = [f"{PREFIX}{n}" for n in range(4)]
ID = re.compile(r"[A-Za-z0-9._~-]{1,128}")
PROBLEM = "application/problem+json"
#: Small limits, so that generated bodies reach the 413 and 422 answers too.
LIMITS = {
    "UPSERTFLOW_LIMITS__MAX_BODY_BYTES": "1024",
    "UPSERTFLOW_LIMITS__MAX_DEPTH": "4",
    "UPSERTFLOW_LIMITS__MAX_INFO_KEYS": "16",
}
#: Ids at the edges of what the path accepts; each must be answered as documented.
EDGE_IDS = [
    "a\nb",
    "a\rb",
    "\n",
    "a\tb",
    "a b",
    "\x00",
    "\x7f",
    "é",
    "%",
    "%2F",
    "?",
    "#",
    "a/b",
    f"{POOL[0]}/etl",
    f"{POOL[0]}/etl/retry",
    f"{POOL[0]}/",
    "x" * 129,
    PREFIX + "x" * (128 - len(PREFIX)),
]

#: Resources the fuzzing created or updated: their ETL must end well.
upserted: set[str] = set()


def errors_are_documented_problems(_ctx: Any, response: Any, case: schemathesis.Case[Any]) -> None:
    """Stricter than `response_schema_conformance`, which passes any body of a media type that
    is documented without a schema: here such a body fails, and every error must be the
    `application/problem+json` document the README promises, with the answer's status."""
    media_type = (response.headers.get("content-type") or [""])[0].split(";")[0].strip().lower()
    if response.status_code >= 400:
        assert media_type == PROBLEM, f"an error answered as {media_type!r}, not {PROBLEM}"
        try:
            problem = json.loads(response.content)
        except ValueError:
            raise AssertionError(f"an error's body is not JSON: {response.content!r}") from None
        assert isinstance(problem, dict), problem
        assert problem.get("status") == response.status_code, problem
    if not response.content:
        return
    operation = case.operation.schema.raw_schema["paths"][case.operation.path]
    documented = operation[case.operation.method.lower()]["responses"]
    content = documented.get(str(response.status_code), {}).get("content", {})
    if media_type in content:
        assert "schema" in content[media_type], (
            f"{case.operation.label} documents {response.status_code} {media_type} "
            "without a schema: its body is not described"
        )


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    errors_are_documented_problems,
]


@pytest.fixture(scope="module")
def stack(database_url: str, temporal_address: str, enrichment_url: str) -> Iterator[Stack]:
    """The API and a worker of the dev stack, as processes on a task queue of their own."""
    config = StackConfig(
        database_url=database_url,
        temporal_address=temporal_address,
        enrichment_url=enrichment_url,
        env={
            "UPSERTFLOW_TASK_QUEUE": f"fuzz-{uuid.uuid4().hex}",
            "UPSERTFLOW_API__SYNC_TIMEOUT_SECONDS": "2",
            "UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS": "2",
            **LIMITS,
        },
    )
    with Stack(config) as running:
        _seed(running)
        yield running


def _seed(stack: Stack) -> None:
    """Create the pool's resources and let their ETL end, so later requests find them."""
    with httpx.Client(base_url=stack.api_url, timeout=10, headers=stack.auth_headers()) as http:
        for resource_id in POOL:
            response = http.put(
                f"/resources/{resource_id}",
                json={"attributes": {"name": resource_id}, "info": {"Age": "42", "country": "FR"}},
            )
            assert response.status_code == 201, response.text
            upserted.add(resource_id)
        _wait_for_etls(http, POOL, within=20)


def _wait_for_etls(http: httpx.Client, resource_ids: list[str], within: float) -> dict[str, Any]:
    """Wait until the ETL of each resource has ended; return the resources (deleted: None)."""
    deadline = time.monotonic() + within
    ended: dict[str, Any] = {}
    while len(ended) < len(resource_ids) and time.monotonic() < deadline:
        for resource_id in resource_ids:
            if resource_id in ended:
                continue
            response = http.get(f"/resources/{resource_id}")
            assert response.status_code in (200, 404), response.text
            if response.status_code == 404:
                ended[resource_id] = None
            elif response.json()["etl"]["status"] not in ("pending", "running"):
                ended[resource_id] = response.json()
        time.sleep(0.05)
    pending = sorted(set(resource_ids) - set(ended))
    assert not pending, f"the ETL of {pending} did not end within {within} s"
    return ended


@pytest.fixture(scope="module")
def api_schema(stack: Stack) -> Any:
    """The API's OpenAPI document, as the running server serves it."""
    schema = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json")

    @schema.hook
    def before_generate_path_parameters(context: Any, strategy: Any) -> Any:
        # Half of the ids name a resource of the pool; the others are what the documented
        # (plain string) parameter allows: mostly invalid (422), a few new resources.
        if "{resource_id}" not in context.operation.path:
            return strategy
        return st.one_of(strategy, st.fixed_dictionaries({"resource_id": st.sampled_from(POOL)}))

    @schema.hook
    def before_generate_body(context: Any, strategy: Any) -> Any:
        # The documented body is two free-form objects, which schemathesis mostly leaves
        # empty: add upserts with content, for the limits and for the ETL.
        if context.operation.method.upper() != "PUT":
            return strategy
        return st.one_of(strategy, UPSERT_BODIES)

    return schema


_KEYS = st.sampled_from(["Address", "City", "Age", "country", "email", "currency", "Tags", ""])
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**54), max_value=2**54)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["42", "007", "yes", "N/A", " Paris ", "2024-02-30", "FR", "a@b.example"])
    | st.text(max_size=12)
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(_KEYS | st.text(max_size=8), children)
    ),
    max_leaves=12,
)
_OBJECTS = st.dictionaries(_KEYS | st.text(max_size=10), _VALUES, max_size=6)
UPSERT_BODIES = st.fixed_dictionaries({}, optional={"attributes": _OBJECTS, "info": _OBJECTS})


def _namespaced(resource_id: str) -> str:
    """A valid id moved into this module's namespace; an invalid one as it is.

    schemathesis percent-encodes the ids it generates (`.` as `%2E`), and a valid id has
    nothing to encode."""
    if resource_id.startswith(PREFIX):
        return resource_id
    if ID.fullmatch(resource_id):
        return (PREFIX + resource_id)[:128]
    return resource_id


def _call(case: schemathesis.Case[Any], stack: Stack) -> Any:
    try:
        return case.call_and_validate(checks=CHECKS, timeout=30, headers=stack.auth_headers())
    except Exception as error:
        error.add_note(f"API log ({stack.api.log_path}), last lines:\n{stack.api.tail(4000)}")
        raise


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    """schemathesis 4.32 reads `item._nodeid`, which pytest 9.2 no longer has."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


@schema.parametrize()
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_answer_is_documented(case: schemathesis.Case[Any], stack: Stack) -> None:
    """No 5xx; documented status codes and content types; bodies match their schemas."""
    resource_id = (case.path_parameters or {}).get("resource_id")
    if isinstance(resource_id, str):
        # Every phase, the explicit examples (`r1`) included, creates only our resources.
        case.path_parameters["resource_id"] = _namespaced(resource_id)
    response = _call(case, stack)
    if case.method.upper() == "PUT" and response.status_code in (200, 201, 202):
        upserted.add(case.path_parameters["resource_id"])


@pytest.mark.parametrize(
    "resource_id", EDGE_IDS, ids=lambda rid: ascii(rid.replace(PREFIX, "fz-"))[1:-1][:32]
)
def test_edge_ids_are_answered_as_documented(
    api_schema: Any, stack: Stack, resource_id: str
) -> None:
    """Every operation on an id at the edge of the path's rules, with the same checks."""
    if resource_id.startswith(POOL[0]):
        # The fuzzing may have deleted it: these ids are about an existing resource.
        created = httpx.put(
            f"{stack.api_url}/resources/{POOL[0]}",
            json={},
            timeout=10,
            headers=stack.auth_headers(),
        )
        assert created.status_code in (200, 201), created.text
    failures: list[str] = []
    for path, methods in api_schema.raw_schema["paths"].items():
        if "{resource_id}" in path:
            for method in set(methods) & {"get", "put", "post", "delete", "patch"}:
                operation = api_schema[path][method.upper()]
                failures += _edge_failures(operation, resource_id, stack.auth_headers())
    assert not failures, "\n\n".join([*failures, f"API log:\n{stack.api.tail(4000)}"])


def _edge_failures(operation: Any, resource_id: str, headers: dict[str, str]) -> list[str]:
    body: dict[str, Any] = {"body": {}, "media_type": "application/json"}
    case = operation.Case(
        # Quoted as schemathesis quotes the ids it generates: it sends them as they are.
        path_parameters={"resource_id": quote(resource_id, safe="")},
        **(body if operation.method.upper() == "PUT" else {}),
    )
    try:
        case.call_and_validate(checks=CHECKS, timeout=30, headers=headers)
    except Exception as error:
        return [f"{operation.label} with id {resource_id!r}:\n{error}"]
    return []


def test_every_accepted_upsert_is_processed(stack: Stack) -> None:
    """The fuzzed upserts the API accepted were all processed: none of their ETLs failed."""
    with httpx.Client(base_url=stack.api_url, timeout=10, headers=stack.auth_headers()) as http:
        ended = _wait_for_etls(http, sorted(upserted), within=30)
        failed = {
            resource_id: http.get(f"/resources/{resource_id}/etl").json()
            for resource_id, resource in ended.items()
            if resource is not None and resource["etl"]["status"] == "failed"
        }
    assert not failed, f"{json.dumps(failed, indent=1)}\nworker log:\n{stack.worker.tail()}"
