"""The list's query parameters fuzzed: any cursor, limit and status is a 200 or a 4xx problem.

A forged cursor (one that decodes to NUL bytes, to text that is no id, or to
nothing) once answered a plain-text 500.
"""

from __future__ import annotations

import base64

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROBLEM = "application/problem+json"

_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)
_CURSORS = st.one_of(
    _TEXT,
    st.binary(max_size=200).map(lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")),
    _TEXT.map(lambda text: base64.urlsafe_b64encode(text.encode()).decode()),
)
_LIMITS = st.one_of(st.integers(min_value=-(2**70), max_value=2**70).map(str), _TEXT)
_STATUSES = st.one_of(
    st.sampled_from(["pending", "running", "succeeded", "failed", "superseded", "cancelled"]),
    _TEXT,
)


@pytest.mark.parametrize("nul_cursor", ["AA", "AAAA", "AAE", base64.b64encode(b"a\x00b").decode()])
async def test_a_cursor_of_nul_bytes_is_a_400(api: httpx.AsyncClient, nul_cursor: str) -> None:
    response = await api.get("/resources", params={"cursor": nul_cursor})

    assert response.status_code == 400
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["type"] == "urn:upsertflow:problem:invalid-cursor"


@given(cursor=_CURSORS, limit=_LIMITS, etl_status=_STATUSES)
@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
async def test_any_query_is_answered_200_or_a_4xx_problem(
    api: httpx.AsyncClient, cursor: str, limit: str, etl_status: str
) -> None:
    response = await api.get(
        "/resources", params={"cursor": cursor, "limit": limit, "etl_status": etl_status}
    )

    if response.status_code == 200:
        page = response.json()
        assert isinstance(page["items"], list)
        assert len(page["items"]) <= int(limit)
    else:
        assert response.status_code in (400, 422), response.text
        assert response.headers["content-type"] == PROBLEM
        problem = response.json()
        assert problem["status"] == response.status_code
        assert "Traceback" not in problem["detail"] and "sys." not in problem["detail"]
