"""The API reads an upsert body with orjson when it provably reads it as the strict
parser does (`api.body._fast`), else with the strict parser: whatever the body, the
answer is the strict parser's — the same documents, byte for byte, or the same
problem."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.body import _fast, parse_upsert_body
from api.problems import Problem
from upsertflow.settings import Limits

# Small limits, so that generated bodies cross them often.
LIMITS = Limits(
    max_depth=5,
    max_info_keys=12,
    max_records=16,
    max_key_chars=8,
    max_path_chars=30,
    max_flattened_bytes=400,
    max_attributes_bytes=120,
)

# Keys and strings with what the checks look for: colons and quotes (the duplicate-key
# count), escapes, NUL, non-ASCII and NFKC-expanding characters, lone surrogates.
_TEXTS = st.text(st.sampled_from([*'ab:"\\\x00é\ufdfa', "\ud800", "/", " "]), max_size=6)
_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from([str(2**53), str(2**53 + 1), str(-(2**53) - 1), str(2**63), str(2**64), "-0"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(["1e400", "-1E+400", "1e-400", "0.1", "1E5", "-0.0", "2.5e19", "1e30"]),
)
_CONSTANTS = st.sampled_from(["true", "false", "null", "NaN", "Infinity"])


def _string(text: str) -> str:
    # ensure_ascii: lone surrogates become escapes, as a client would send them.
    return json.dumps(text)


def _values() -> st.SearchStrategy[str]:
    """JSON texts; objects as lists of members, so that keys can repeat."""
    scalars = st.one_of(_TEXTS.map(_string), _NUMBERS, _CONSTANTS)

    def containers(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        members = st.lists(st.tuples(_TEXTS, inner), max_size=5)
        return st.one_of(
            st.lists(inner, max_size=5).map(lambda items: "[" + ",".join(items) + "]"),
            members.map(lambda pairs: "{" + ",".join(f"{_string(k)}:{v}" for k, v in pairs) + "}"),
            # A member repeated: the same key twice.
            members.filter(bool).map(
                lambda pairs: (
                    "{" + ",".join(f"{_string(k)}:{v}" for k, v in [*pairs, pairs[0]]) + "}"
                )
            ),
        )

    return st.recursive(scalars, containers, max_leaves=20)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    fields = draw(
        st.lists(
            st.tuples(st.sampled_from(["attributes", "info", "info", "other"]), _values()),
            max_size=3,
        )
    )
    space = draw(st.sampled_from(["", " ", "\n  "]))
    text = "{" + f",{space}".join(f"{_string(k)}:{space}{v}" for k, v in fields) + "}"
    if draw(st.booleans()):  # or a body that is not an object at all
        text = draw(_values())
    return text.encode("utf-8", "surrogatepass")


def _answer(raw: bytes, *, fast: bool) -> Any:
    try:
        body = parse_upsert_body(raw, LIMITS, fast=fast)
    except Problem as problem:
        return ("problem", problem.status, problem.slug, problem.detail, problem.errors)
    return ("accepted", body.attributes.body, body.info.body, body.fingerprint)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_bodies())
def test_any_body_gets_the_strict_parser_s_answer(raw: bytes) -> None:
    assert _answer(raw, fast=True) == _answer(raw, fast=False)


def test_an_ordinary_body_is_read_by_orjson_even_with_colons_and_escapes_in_strings() -> None:
    raw = json.dumps(
        {
            "attributes": {"name": 'Ada "the first"'},
            "info": {"At": "12:30:00", "Url": "https://example.org/a:b", "N": [1, 2.5, None]},
        }
    ).encode()
    fast = _fast(raw, LIMITS)
    assert fast is not None
    strict = parse_upsert_body(raw, LIMITS, fast=False)
    assert (fast.attributes.body, fast.info.body) == (strict.attributes.body, strict.info.body)


def test_what_orjson_reads_otherwise_is_left_to_the_strict_parser() -> None:
    for raw in [
        b'{"info": {"a": 1, "a": 2}}',  # orjson keeps the last; refused: duplicate key
        b'{"info": {"a": "x:y", "a": 2}}',  # the same, with a colon in a string
        b'{"info": {"a": 9007199254740993}}',  # an int beyond 2^53: refused
        b'{"info": {"a": 123456789012345678901234567890}}',  # a float to orjson: refused
        b'{"info": {"a": 1e30}}',  # a float of 2^63 or more: accepted, but strictly read
        b'{"info": {"a": "\\u0000"}}',  # refused, by the strict parser's words
    ]:
        assert _fast(raw, LIMITS) is None, raw
    accepted = parse_upsert_body(b'{"info": {"a": 1e30}}', LIMITS)
    assert accepted.info.body == b'{"a":1e+30}'
