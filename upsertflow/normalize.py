"""Normalize a parsed JSON object into flat, coerced records (a pure ETL step).

Rules:

1. Flatten objects and lists into dotted paths (``address.city``, ``tags.0``). A raw
   key containing dots is split into segments, so ``{"a.b": 1}`` equals
   ``{"a": {"b": 1}}`` and ``normalize_info`` is idempotent on its own output.
2. Normalize each segment (``normalize_key``): camelCase/PascalCase -> snake_case
   (``HTTPServer`` -> ``http_server``), lowercase, every character that is not
   ``str.isalnum`` -> ``_``, collapse runs of ``_``, strip ``_`` at the ends; a segment
   that ends up empty becomes ``_``. Unicode letters/digits are kept (lowercased);
   digit-only segments (list indexes) are unchanged.
3. Coerce strings (``coerce_value``), after trimming: true/yes/y/on and
   false/no/n/off (any case) -> bool; numbers in JSON syntax with an optional sign ->
   int or float, unless they have a leading zero (``007``), are not finite, or are
   ints beyond +-2**53 (kept as strings); strings starting ``YYYY-MM-DD`` that parse
   as ISO dates/datetimes -> canonical ISO (aware datetimes in UTC with ``Z``, naive
   ones kept naive); anything else stays the trimmed string. bool/int/float leaves
   are kept as they are.
4. Drop empty leaves: ``None``, blank strings and the placeholders N/A, NA, null,
   none, ``-`` (any case); their raw dotted paths are listed in ``dropped``. Empty
   objects/lists produce nothing and are not listed.
5. When kept leaves normalize to the same path, the first in input (depth-first)
   order wins and a ``Collision`` lists all their raw paths. Dropped leaves never
   claim a path. Collisions are listed in the order they are first detected.

Traversal is iterative, so nesting depth is not limited by the recursion limit.
Non-JSON input (non-string keys, other value types, NaN/Infinity) raises.
"""

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Final

__all__ = [
    "Collision",
    "JsonScalar",
    "Normalized",
    "coerce_value",
    "normalize_info",
    "normalize_key",
]

JsonScalar = str | int | float | bool


@dataclass(frozen=True)
class Collision:
    path: str  # the normalized dotted path
    sources: tuple[str, ...]  # raw dotted paths that normalized to it, input order; first kept


@dataclass(frozen=True)
class Normalized:
    records: dict[str, JsonScalar]  # dotted path -> coerced scalar value
    dropped: tuple[str, ...]  # raw dotted paths whose values were dropped as empty
    collisions: tuple[Collision, ...]


_MAX_SAFE_INT: Final = 2**53
_MAX_SAFE_INT_DIGITS: Final = len(str(_MAX_SAFE_INT))
_TRUE: Final = frozenset({"true", "yes", "y", "on"})
_FALSE: Final = frozenset({"false", "no", "n", "off"})
_EMPTY: Final = frozenset({"", "n/a", "na", "null", "none", "-"})
_NUMBER: Final = re.compile(r"[+-]?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_DATE_PREFIX: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NUMBER_START: Final = frozenset("0123456789+-")
# Segments that are already normalized (the common case, and every re-run).
_PLAIN_SEGMENT: Final = re.compile(r"[a-z0-9]+(?:_[a-z0-9]+)*|_")
_NON_WORD: Final = re.compile(r"[\W_]+")  # \w is exactly str.isalnum() plus "_"
# ASCII-only equivalent of _split_camel's loop, for speed.
_ASCII_CAMEL: Final = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _is_upper(c: str) -> bool:
    # Only letters that have a lowercase form: after .lower() none is left, which
    # keeps normalize_key idempotent (e.g. U+2102 is "upper" but has no lowercase).
    return c.isupper() and c.lower() != c


def _split_camel(segment: str) -> str:
    if segment.isascii():
        return _ASCII_CAMEL.sub("_", segment)
    out: list[str] = []
    last = len(segment) - 1
    prev = ""
    for i, c in enumerate(segment):
        if (
            i
            and _is_upper(c)
            and (
                prev.islower()
                or prev.isdigit()
                or (_is_upper(prev) and i < last and segment[i + 1].islower())
            )
        ):
            out.append("_")
        out.append(c)
        prev = c
    return "".join(out)


def normalize_key(key: str) -> str:
    """Normalize one path segment (see rule 2 of the module docstring)."""
    if _PLAIN_SEGMENT.fullmatch(key):
        return key
    snake = _NON_WORD.sub("_", _split_camel(key.strip()).lower()).strip("_")
    return snake or "_"


def _normalize_raw_key(key: str) -> str:
    if "." in key:
        return ".".join([normalize_key(part) for part in key.split(".")])
    return normalize_key(key)


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
    records: dict[str, JsonScalar] = {}
    first_source: dict[str, str] = {}
    collided: dict[str, list[str]] = {}
    dropped: list[str] = []
    key_cache: dict[str, str] = {}

    if not isinstance(info, Mapping):
        raise TypeError(f"info must be a mapping, not {type(info).__name__}")
    root = _children(info, "") or ()
    # Each frame: (normalized prefix, raw prefix, remaining children); prefixes end in ".".
    stack = [("", "", iter(root))]
    while stack:
        norm_prefix, raw_prefix, items = stack[-1]
        for raw_key, value in items:
            norm_key = key_cache.get(raw_key)
            if norm_key is None:
                norm_key = key_cache[raw_key] = _normalize_raw_key(raw_key)
            raw_path = raw_prefix + raw_key

            coerced: JsonScalar | None
            if isinstance(value, str):
                coerced = coerce_value(value)
            elif value is None:
                coerced = None
            elif isinstance(value, int):
                coerced = value
            elif isinstance(value, float):
                if not math.isfinite(value):
                    raise ValueError(f"non-finite number at {raw_path!r}")
                coerced = value
            else:
                children = _children(value, raw_path)
                if children is None:
                    raise TypeError(f"unsupported {type(value).__name__} at {raw_path!r}")
                stack.append((norm_prefix + norm_key + ".", raw_path + ".", iter(children)))
                break  # descend now, so output follows input (depth-first) order

            if coerced is None:
                dropped.append(raw_path)
                continue
            path = norm_prefix + norm_key
            if path in records:
                sources = collided.get(path)
                if sources is None:
                    collided[path] = [first_source[path], raw_path]
                else:
                    sources.append(raw_path)
            else:
                records[path] = coerced
                first_source[path] = raw_path
        else:
            stack.pop()

    return Normalized(
        records=records,
        dropped=tuple(dropped),
        collisions=tuple(Collision(path, tuple(srcs)) for path, srcs in collided.items()),
    )
