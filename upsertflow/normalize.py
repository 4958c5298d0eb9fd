"""Normalize a parsed JSON object into flat, coerced records (a pure ETL step).

A *leaf* is a scalar (string, number, boolean or ``null``) inside ``info``; empty
objects and lists contain no leaf. Every leaf ends in exactly one of three places:
kept in ``records``, listed in ``dropped``, or lost to a collision and counted in
``lost``, so that ``len(records) + lost + len(dropped)`` is the number of leaves.

Rules:

1. Flatten objects and lists into dotted paths (``address.city``, ``tags.0``). A raw
   key containing dots is split into segments, so ``{"a.b": 1}`` equals
   ``{"a": {"b": 1}}``. Traversal is depth-first in input order: a key's whole
   value comes before its next sibling, and ``records`` keeps that order.
2. Keys (``normalize_key``), in this order:

   a. Unicode: the raw key is normalized to NFKC before anything else, so that
      the decomposed ``"cafe\\u0301"`` and the composed ``"café"`` are the same key.
      NFKC rather than NFC because keys are identifiers, not prose: it also folds
      the compatibility variants a human reads as the same name (full-width
      ``Ｎａｍｅ``, the ligature ``ﬁ``, ``x²`` -> ``x2``, no-break spaces), as
      Python identifiers (PEP 3131) and Unicode identifiers (UAX #31) do.
      Accents are kept: ``café`` stays ``café``. A full-width dot ``．`` is a dot.
   b. The key is split at ``.`` into segments. Each segment: camelCase/PascalCase
      -> snake_case (``HTTPServer`` -> ``http_server``), lowercase, NFKC again
      (lowercasing can undo it), every run of other characters than letters and
      digits (``str.isalnum``) -> one ``_``, ``_`` stripped at both ends. Combining
      marks (Unicode category M) right after a letter or digit are part of it and
      kept (``हिन्दी``, ``"q\\u0301"``); elsewhere they are like punctuation. Digit-only
      segments (list indexes) are unchanged. Lowercasing is ``str.lower``
      (``Straße`` -> ``straße``; no case folding).
   c. A segment with nothing left (``""``, blank, only punctuation, marks or ``_``)
      is empty. Empty segments are left out of the path wherever they come from
      (``"a..b"`` -> ``a.b``, ``"Invoice No."`` -> ``invoice_no``, ``{"a": {"": 1}}``
      -> ``a``), so a dotted key still equals its nesting. A path with no segment
      left is ``_``: the keys ``""``, ``"   "``, ``"."`` and ``"_"`` all give ``_``
      (and collide, rule 5).
3. Values: strings are trimmed and coerced (``coerce_value``): true/yes/y/on and
   false/no/n/off (any case) -> bool; numbers in JSON syntax with an optional sign ->
   int or float, unless they have a leading zero (``007``), are not finite, or are
   ints beyond +-2**53 (kept as strings); strings starting ``YYYY-MM-DD`` that parse
   as ISO dates/datetimes -> canonical ISO (aware datetimes in UTC with ``Z``, naive
   ones kept naive); anything else stays the trimmed string (not Unicode-normalized).
   bool/int/float leaves are kept as they are.
4. Drop empty leaves: ``None``, blank strings and the placeholders N/A, NA, null,
   none, ``-`` (any case); their raw dotted paths are listed in ``dropped``, in
   input order. Dropped leaves never claim a path.
5. Collisions: when kept leaves normalize to the same path, the first in input
   order (rule 1) keeps it, whatever spelling, nesting or dotted key produced it;
   every later one is lost. ``Normalized.lost`` counts every lost leaf and
   ``Normalized.collided_paths`` every path that lost one, exactly. For cost bounded
   on hostile input the details are capped: ``collisions`` lists the first
   ``MAX_COLLISIONS`` (100) collided paths in order of detection, and each
   ``Collision.sources`` the first ``MAX_COLLISION_SOURCES`` (5) raw paths (the
   first one is the kept one), while ``Collision.lost`` stays exact.

``normalize_info`` is idempotent: applied to its own ``records`` it returns the same
records, with nothing dropped and no collision.

Cost: linear in the size of ``info``. Each distinct raw key is normalized once;
ASCII keys skip Unicode normalization; traversal is iterative, so nesting depth is
not limited by the recursion limit. Besides ``records``, memory is ``dropped`` (one
raw path per dropped leaf) and the capped collision details above. An ``info`` with a
collision is walked twice (the second walk finds the listed paths' raw sources): the
first builds no raw path a kept leaf does not need.

Non-JSON input (non-string keys, other value types, NaN/Infinity) raises.
"""

import math
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Final

__all__ = [
    "MAX_COLLISIONS",
    "MAX_COLLISION_SOURCES",
    "Collision",
    "JsonScalar",
    "Normalized",
    "coerce_value",
    "normalize_info",
    "normalize_key",
]

JsonScalar = str | int | float | bool

MAX_COLLISIONS: Final = 100  # Collision entries kept in Normalized.collisions
MAX_COLLISION_SOURCES: Final = 5  # raw paths kept in Collision.sources


@dataclass(frozen=True)
class Collision:
    path: str  # the normalized dotted path
    # Raw dotted paths that normalized to it, in input order, the first (kept) one
    # first; at most MAX_COLLISION_SOURCES of them.
    sources: tuple[str, ...]
    # Leaves that lost this path: exact, even when sources is capped. Defaults to
    # len(sources) - 1 (nothing left out).
    lost: int = -1

    def __post_init__(self) -> None:
        if self.lost < 0:
            object.__setattr__(self, "lost", len(self.sources) - 1)


@dataclass(frozen=True)
class Normalized:
    records: dict[str, JsonScalar]  # dotted path -> coerced scalar value
    dropped: tuple[str, ...]  # raw dotted paths whose values were dropped as empty
    collisions: tuple[Collision, ...]  # the first MAX_COLLISIONS collided paths
    lost: int = 0  # leaves that lost a collision (all of them, not only those listed)
    collided_paths: int = 0  # paths that had a collision (all of them)


_MAX_SAFE_INT: Final = 2**53
_MAX_SAFE_INT_DIGITS: Final = len(str(_MAX_SAFE_INT))
_TRUE: Final = frozenset({"true", "yes", "y", "on"})
_FALSE: Final = frozenset({"false", "no", "n", "off"})
_EMPTY: Final = frozenset({"", "n/a", "na", "null", "none", "-"})
_NUMBER: Final = re.compile(r"[+-]?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_DATE_PREFIX: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NUMBER_START: Final = frozenset("0123456789+-")
# Segments that are already normalized (the common case, and every re-run).
_PLAIN_SEGMENT: Final = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*")
_NON_WORD: Final = re.compile(r"[\W_]+")  # \w is exactly str.isalnum() plus "_"
_ODD_NON_WORD: Final = re.compile(r"[^\w\x00-\x7f]")  # non-ASCII, not a letter or digit
# ASCII-only equivalent of _split_camel (same result after the _NON_WORD step), for speed.
_ASCII_CAMEL: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _is_mark(c: str) -> bool:
    return unicodedata.category(c)[0] == "M"


def _is_upper(c: str) -> bool:
    # Only letters that have a lowercase form: after .lower() none is left, which
    # keeps normalize_key idempotent (e.g. U+2102 is "upper" but has no lowercase).
    return c.isupper() and c.lower() != c


def _split_camel(segment: str) -> str:
    """Insert "_" where a word starts with an upper-case letter (camelCase, HTTPServer).

    Only letters and digits count as neighbours: a combining mark belongs to the
    letter before it, and separators become "_" anyway.
    """
    parts: list[str] = []
    start = 0
    last = len(segment) - 1
    for i, c in enumerate(segment):
        if i and c.isupper() and c.lower() != c:
            j = i - 1  # back to the previous letter or digit (separators: once each)
            while j >= 0 and not segment[j].isalnum():
                j -= 1
            if j < 0:
                continue
            prev = segment[j]
            if (
                prev.islower()
                or prev.isdigit()
                or (_is_upper(prev) and i < last and segment[i + 1].islower())
            ):
                parts.append(segment[start:i])
                start = i
    if not parts:
        return segment
    parts.append(segment[start:])
    return "_".join(parts)


def _non_word_run(match: re.Match[str]) -> str:
    """One "_" for a run of non-word characters, after the marks that end a word."""
    run = match.group()
    if run.isascii() or not match.start():
        return "_"
    # The run follows a letter or digit: combining marks at its start belong to it.
    end = 0
    while end < len(run) and _is_mark(run[end]):
        end += 1
    return run if end == len(run) else run[:end] + "_"


def _normalize_segment(segment: str) -> str:
    """One segment of an NFKC-normalized key (rule 2b); "" if it is empty (rule 2c)."""
    if _PLAIN_SEGMENT.fullmatch(segment):
        return segment
    segment = segment.strip()  # only saves work: blanks become "_", stripped below
    if segment.isascii():
        return _NON_WORD.sub("_", _ASCII_CAMEL.sub("_", segment).lower()).strip("_")
    lowered = segment.lower()
    if lowered != segment:  # else nothing is upper case: no word to split
        lowered = _split_camel(segment).lower()
    text = unicodedata.normalize("NFKC", lowered)
    if _ODD_NON_WORD.search(text) is None:  # no combining mark to keep
        return _NON_WORD.sub("_", text).strip("_")
    return _NON_WORD.sub(_non_word_run, text).strip("_")


def _normalize_raw_key(key: str) -> str:
    """The normalized dotted form of one raw key; "" if no segment is left."""
    if _PLAIN_SEGMENT.fullmatch(key):
        return key
    if not key.isascii():
        key = unicodedata.normalize("NFKC", key)
    if "." in key:
        return ".".join([s for s in map(_normalize_segment, key.split(".")) if s])
    return _normalize_segment(key)


def normalize_key(key: str) -> str:
    """Normalize one raw key, dots included (rule 2); ``_`` if no segment is left.

    ``normalize_key("Address.City") == "address.city"``, ``normalize_key("a..b") ==
    "a.b"``, ``normalize_key("  ") == "_"``. In a longer path an empty key adds no
    segment at all (rule 2c).
    """
    return _normalize_raw_key(key) or "_"


def _coerce_temporal(text: str) -> str | None:
    try:
        if len(text) == 10:
            return date.fromisoformat(text).isoformat()
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            return moment.isoformat()
        return moment.astimezone(UTC).replace(tzinfo=None).isoformat() + "Z"
    except (ValueError, OverflowError):
        return None


def _coerce_number(text: str) -> int | float | None:
    match = _NUMBER.fullmatch(text)
    if match is None:
        return None
    if match.group(1) is None and match.group(2) is None:
        if len(text.lstrip("+-")) > _MAX_SAFE_INT_DIGITS:
            return None  # also keeps int() away from its digit limit
        integer = int(text)
        return integer if -_MAX_SAFE_INT <= integer <= _MAX_SAFE_INT else None
    number = float(text)
    return number if math.isfinite(number) else None


def coerce_value(value: str) -> JsonScalar | None:
    """Coerce a string leaf (rule 3); ``None`` means empty, drop it (rule 4)."""
    text = value.strip()
    if len(text) <= 5:
        folded = text.lower()
        if folded in _EMPTY:
            return None
        if folded in _TRUE:
            return True
        if folded in _FALSE:
            return False
    if text[0] in _NUMBER_START:
        number = _coerce_number(text)
        if number is not None:
            return number
        if _DATE_PREFIX.match(text):
            return _coerce_temporal(text) or text
    return text


def _children(node: Any, path: str) -> Iterable[tuple[str, Any]] | None:
    """The (raw key, value) pairs of a container, or None for a leaf."""
    if isinstance(node, dict | Mapping):
        for key in node:
            if not isinstance(key, str):
                raise TypeError(f"non-string key {key!r} at {path or '<root>'!r}")
        return node.items()
    if isinstance(node, list | tuple):
        return zip(map(str, range(len(node))), node, strict=True)
    return None


def normalize_info(info: Mapping[str, Any]) -> Normalized:
    """Flatten, normalize and coerce a parsed JSON object (see the module docstring)."""
    if not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping, not {type(info).__name__}")
    walk = _walk(info)
    sources: dict[str, list[str]] = {}
    if walk.listed:
        # Collisions: walk again for the raw paths of the leaves of the paths listed. The
        # first walk builds no raw path a record does not need (~20 % of its time), as
        # most inputs have no collision at all; one that has costs a second walk.
        sources = {path: [] for path in walk.listed}
        _walk(info, sources)
    return Normalized(
        records=walk.records,
        dropped=tuple(walk.dropped),
        collisions=tuple(
            Collision(path, tuple(sources[path]), walk.lost_at[path]) for path in walk.listed
        ),
        lost=walk.lost,
        collided_paths=len(walk.lost_at),
    )


@dataclass
class _Walk:
    records: dict[str, JsonScalar]
    dropped: list[str]
    lost: int
    lost_at: dict[str, int]  # path -> leaves that lost it (every collided path)
    listed: list[str]  # the first MAX_COLLISIONS collided paths, in order of detection


def _walk(info: Mapping[str, Any], sources: dict[str, list[str]] | None = None) -> _Walk:
    """Flatten `info` depth first. With `sources`: also collect, for each of its paths, the
    raw paths of the first `MAX_COLLISION_SOURCES` kept leaves that normalize to it."""
    records: dict[str, JsonScalar] = {}
    lost_at: dict[str, int] = {}
    listed: list[str] = []
    dropped: list[str] = []
    lost = 0
    key_cache: dict[str, str] = {}
    value_cache: dict[str, JsonScalar | None] = {}  # string leaf -> coerced (values repeat)

    root = _children(info, "") or ()
    # Each frame: (normalized prefix, raw prefix, remaining children); a prefix is ""
    # or ends in "." (the normalized one is "" while every segment so far was empty).
    stack = [("", "", iter(root))]
    while stack:
        norm_prefix, raw_prefix, items = stack[-1]
        for raw_key, value in items:
            norm_key = key_cache.get(raw_key)
            if norm_key is None:
                norm_key = key_cache[raw_key] = _normalize_raw_key(raw_key)

            coerced: JsonScalar | None
            if isinstance(value, str):
                if value in value_cache:
                    coerced = value_cache[value]
                else:
                    coerced = value_cache[value] = coerce_value(value)
            elif value is None:
                coerced = None
            elif isinstance(value, int):
                coerced = value
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise ValueError(f"non-finite number at {raw_prefix + raw_key!r}")
                coerced = value
            else:
                raw_path = raw_prefix + raw_key
                children = _children(value, raw_path)
                if children is None:
                    raise TypeError(f"unsupported {type(value).__name__} at {raw_path!r}")
                child_prefix = norm_prefix + norm_key + "." if norm_key else norm_prefix
                stack.append((child_prefix, raw_path + ".", iter(children)))
                break  # descend now, so output follows input (depth-first) order

            if coerced is None:
                dropped.append(raw_prefix + raw_key)
                continue
            if norm_key:
                path = norm_prefix + norm_key
            else:
                path = norm_prefix[:-1] or "_"
            if sources is not None:
                listed_sources = sources.get(path)
                if listed_sources is not None and len(listed_sources) < MAX_COLLISION_SOURCES:
                    listed_sources.append(raw_prefix + raw_key)
            if path not in records:
                records[path] = coerced
                continue
            lost += 1
            count = lost_at.get(path)
            if count is None:
                lost_at[path] = 1
                if len(listed) < MAX_COLLISIONS:
                    listed.append(path)
            else:
                lost_at[path] = count + 1
        else:
            stack.pop()
    return _Walk(records, dropped, lost, lost_at, listed)
