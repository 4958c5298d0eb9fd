"""The literal text a regular expression cannot match without: a cheap filter before it.

`enrich` runs every rule's pattern over every record's path: for the 70,000 records
of a 5 MiB `info` and the three default rules, 210,000 regex searches, ~0.1 s of the
worker's time, nearly all of it in searches that fail. A pattern such as
`(^|\\.)e_?mail(_address)?$` cannot match a path that does not contain `mail`, and
`"mail" in path` costs a fraction of a search: `required_literals` finds such text
by reading the pattern's parse tree, the way RE2 and Hyperscan prefilter.

Sound by construction, never clever: a literal is only reported when every match
must contain it, and anything not understood (case-insensitive matching, a parse
tree of an unknown shape, a Python whose `re` internals moved) gives None — no
filter: every path is searched with the pattern.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from typing import Any

# CPython's regex parser and its opcodes (3.11+; typeshed does not describe them).
# Without them (another interpreter, a Python that moved them): no filter.
_sre: Any
_sre_parse: Any
try:
    _sre = importlib.import_module("re._constants")
    _sre_parse = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - other interpreters
    _sre = _sre_parse = None

#: A set of literals, one of which every match contains.
Literals = frozenset[str]


def required_literals(pattern: re.Pattern[str]) -> Literals | None:
    """Texts of which every match of `pattern` contains at least one; None if unknown."""
    if _sre_parse is None or pattern.flags & re.IGNORECASE:
        return None
    try:
        tree = _sre_parse.parse(pattern.pattern, pattern.flags)
        return _sequence(list(tree))
    except Exception:  # an internal shape this does not know: no filter, never a wrong one
        return None


def _sequence(items: Iterable[tuple[Any, Any]]) -> Literals | None:
    """Every match of the sequence matches each of its items in turn, so any item's
    literals are the sequence's (and a run of single characters is one literal)."""
    best: Literals | None = None
    run: list[str] = []

    def consider(candidate: Literals | None) -> None:
        nonlocal best
        if candidate and all(candidate) and _better(candidate, best):
            best = candidate

    for op, argument in items:
        if op == _sre.LITERAL:
            run.append(chr(argument))
            continue
        consider(frozenset(["".join(run)]) if run else None)
        run = []
        consider(_item(op, argument))
    consider(frozenset(["".join(run)]) if run else None)
    return best


def _item(op: Any, argument: Any) -> Literals | None:
    """The literals of one item of a sequence: None for anything that may match without
    a known text (classes, anchors, optional parts, assertions, back references)."""
    if op == _sre.SUBPATTERN:
        _group, add_flags, _del_flags, body = argument
        if add_flags & re.IGNORECASE:  # `(?i:...)`
            return None
        return _sequence(list(body))
    if op == _sre.ATOMIC_GROUP:
        return _sequence(list(argument))
    if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
        low, _high, body = argument
        return _sequence(list(body)) if low >= 1 else None
    if op == _sre.BRANCH:
        _, branches = argument
        union: set[str] = set()
        for branch in branches:
            literals = _sequence(list(branch))
            if literals is None:
                return None
            union |= literals
        return frozenset(union)
    return None


def _better(candidate: Literals, best: Literals | None) -> bool:
    """Longer shortest literal first (fewer paths pass), then fewer literals."""
    if best is None:
        return True
    return (min(map(len, candidate)), -len(candidate)) > (min(map(len, best)), -len(best))
