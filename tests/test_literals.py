"""The literal filter in front of the enrichment rules' patterns (`upsertflow.literals`):
it may only ever skip paths a pattern cannot match, and the selection it speeds up
selects exactly what searching every path with every rule selects."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activities.enrich import _Rule, select_items
from upsertflow.literals import required_literals
from upsertflow.settings import Enrichment, EnrichmentRule

# Pieces of patterns over a small alphabet, so that random texts often match.
_ATOMS = ["a", "b", "c", "ab", "abc", r"\.", "[ab]", ".", "^", "$", r"\b", "", "a|b"]


def _patterns() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.one_of(
            st.tuples(inner, inner).map("".join),
            st.tuples(inner, inner).map("|".join),
            inner.map(lambda p: f"({p})"),
            inner.map(lambda p: f"(?:{p})?"),
            inner.map(lambda p: f"(?:{p})*"),
            inner.map(lambda p: f"(?:{p})+"),
            inner.map(lambda p: f"(?:{p}){{2,3}}"),
            inner.map(lambda p: f"(?>{p})"),
            inner.map(lambda p: f"(?:{p})++"),
            inner.map(lambda p: f"(?i:{p})"),
            inner.map(lambda p: f"(?={p})"),
            inner.map(lambda p: f"(?!{p})"),
        )

    return st.recursive(st.sampled_from(_ATOMS), extend, max_leaves=8)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=_patterns(), texts=st.lists(st.text("abcAB.x_", max_size=12), max_size=30))
def test_a_text_the_filter_skips_is_never_one_the_pattern_matches(
    pattern: str, texts: list[str]
) -> None:
    compiled = re.compile(pattern)
    literals = required_literals(compiled)
    if literals is None:
        return
    for text in texts:
        if compiled.search(text):
            assert any(literal in text for literal in literals), (pattern, text, literals)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), pattern=_patterns())
def test_every_text_a_pattern_matches_contains_one_of_its_literals(data: Any, pattern: str) -> None:
    compiled = re.compile(pattern)
    literals = required_literals(compiled)
    if literals is None:
        return
    text = data.draw(st.from_regex(compiled))
    assert any(literal in text for literal in literals), (pattern, text, literals)


def test_the_default_rules_each_need_a_word_and_unknown_shapes_need_nothing() -> None:
    needs = [_Rule.of(rule).needs for rule in Enrichment().rules]
    assert needs == [("country",), ("mail",), ("currency",)]
    # Case-insensitive matching (global or scoped) and patterns without a literal that
    # every match contains: no filter, every path searched.
    for pattern in [r"(?i)e_?mail$", r"\d+$", r"(mail)?$", r"[ab]|c", r"(?=mail)"]:
        assert required_literals(re.compile(pattern)) is None, pattern
    # A scoped `(?i:...)` hides only its own part.
    assert required_literals(re.compile(r"e(?i:mail)")) == frozenset({"e"})
    assert required_literals(re.compile(r"(^|\.)(phone|tel)$")) == frozenset({"phone", "tel"})


_PATH_SEGMENTS = st.sampled_from(
    ["country", "country_code", "e_mail", "email", "mail", "currency", "x", "0", "Email", "tel"]
)
_RULE_PATTERNS = st.sampled_from(
    [
        r"(^|\.)(country|country_code)$",
        r"(^|\.)e_?mail(_address)?$",
        r"(?i)email",
        r"mail|tel",
        r"\d$",
        r"^x\.",
        r"(currency){1,2}",
    ]
)


@settings(max_examples=200, deadline=None)
@given(
    records=st.dictionaries(
        st.lists(_PATH_SEGMENTS, min_size=1, max_size=3).map(".".join),
        st.one_of(st.text(max_size=3), st.integers(), st.none()),
        max_size=25,
    ),
    patterns=st.lists(_RULE_PATTERNS, min_size=1, max_size=4),
)
def test_the_selection_is_what_searching_every_path_with_every_rule_gives(
    records: dict[str, Any], patterns: list[str]
) -> None:
    rules = [EnrichmentRule(path=p, kind=f"kind{i}") for i, p in enumerate(patterns)]
    expected = []
    for path in sorted(records):  # the rule: a non-empty string, its path's first rule
        value = records[path]
        if isinstance(value, str) and value:
            kind = next((r.kind for r in rules if re.search(r.path, path)), None)
            if kind is not None:
                expected.append({"key": path, "kind": kind, "value": value})
    assert select_items(records, [_Rule.of(rule) for rule in rules]) == expected
