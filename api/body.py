"""Reading an upsert body strictly: bounded size, strict JSON, bounded cost.

Everything PostgreSQL's `jsonb` or Temporal would refuse later (NaN, `\\u0000`,
lone surrogates, integers beyond ±2^53) is refused here, before anything is
written, so no activity can fail on every retry because of a client's data.

So is everything that would make the ETL of a body too costly. What a body turns
into once flattened is measured in one pass over `info` (`measure`) and compared
with the limits of `upsertflow.settings.Limits`, the cost model in one place:

- records: every value in `info`, at every level and list items included — each
  scalar becomes one record, each object and list is walked (`max_records`);
- the longest key (`max_key_chars`) and the longest dotted path, keys and list
  indexes joined by dots (`max_path_chars`);
- the flattened size: over all scalars, the UTF-8 bytes of the dotted path plus
  the value's (a string's own bytes, the JSON text of any other value) — what the
  context stores and a `GET` returns (`max_flattened_bytes`).

Non-ASCII keys are measured after Unicode NFKC normalization (or as sent, if that
is longer), as the ETL's key normalization sees them: NFKC can make one character
many (U+FDFA is 18). Normalization may still lengthen an ASCII key by the `_` of
camelCase splits (`aB` -> `a_b`), by less than double: the limits leave room for that.

Parsing is bounded too, by a budget of values (what `info` and `attributes` may
hold together): values are counted from the raw bytes before parsing (the parser
builds arrays and strings without calling back), and the parser's hooks stop it
in the middle of a body made of more numbers or objects than the budget.

Each exceeded limit is a 422 problem of type `limit-exceeded` that names the limit
and its setting, and quotes at most a short excerpt of one key. Messages never
carry interpreter details: numbers are checked before Python converts them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
from starlette.requests import Request

from api.problems import Problem
from upsertflow.settings import Limits
from upsertflow.store.blobs import Document

_MAX_SAFE_INT = 2**53
_MAX_SAFE_INT_DIGITS = len(str(_MAX_SAFE_INT))  # 16
#: orjson reads an integer literal beyond 64 bits as a float, of this size at least.
_TWO_63 = float(2**63)
_BOM = "\ufeff".encode()
_EXCERPT_CHARS = 40
_SETTING_PREFIX = "UPSERTFLOW_LIMITS__"
_RECORDS = (
    "every value in `info` counts, at every level and list items included: each scalar "
    "becomes a record, each object and list is walked"
)
#: Values the body itself adds around `info` and `attributes`: the body, and the two objects.
_ROOT_VALUES = 3
#: For `bytes.translate`: every byte but `"`, `[`, `{` and `,` (none is part of a
#: multi-byte UTF-8 character).
_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'"[{,')
#: For `bytes.translate`: every byte but `"` and `:`.
_NOT_COLONS = bytes(b for b in range(256) if b not in b'":')
#: A string, once escapes are gone and only quotes and colons are left.
_STRINGS = re.compile(rb'"[^"]*"')


def _values_over(raw: bytes, budget: int) -> bool:
    """Whether the JSON text `raw` certainly holds more than `budget` values, found with
    bytes operations before the parser builds any of them.

    The parser builds arrays and strings without calling a hook, so only this can stop
    a body of millions of `[]` or `""` before it costs seconds (holding the GIL) and
    hundreds of megabytes. Outside strings, every `[` or `{` opens a value, and every
    `,` separates two values of a container: either count is at most the number of
    values. To count outside strings only: escaped backslashes and quotes are removed,
    then every byte but quotes, brackets and commas; two adjacent quotes are an empty
    string, or the end of one and the start of the next, so removing them keeps what
    is inside strings inside. Then strings and runs of marks outside alternate, each
    run at least one mark: too many quotes alone prove the count is over the budget.
    A few linear passes in C; the common body, with few marks at all, needs one.
    """
    containers = raw.count(b"[") + raw.count(b"{")
    if containers <= budget and raw.count(b",") <= budget:
        return False
    marks = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURE)
    while b'""' in marks:
        marks = marks.replace(b'""', b"")
    if marks.count(b'"') > 4 * budget + 2:
        return True
    outside = b"".join(marks.split(b'"')[::2])
    containers = outside.count(b"[") + outside.count(b"{")
    return containers > budget or outside.count(b",") > budget


@dataclass(frozen=True)
class UpsertBody:
    attributes: Document
    info: Document

    @property
    def fingerprint(self) -> str:
        """What tells two bodies apart, for `Idempotency-Key`."""
        return hashlib.sha256(f"{self.attributes.digest}:{self.info.digest}".encode()).hexdigest()


def setting(name: str) -> str:
    """The environment variable of a limit: `max_records` -> `UPSERTFLOW_LIMITS__MAX_RECORDS`."""
    return _SETTING_PREFIX + name.upper()


def _invalid(detail: str, field: str | None = None) -> Problem:
    errors = [{"field": field, "message": detail}] if field else None
    return Problem(422, "invalid-body", "Invalid request body", detail, errors=errors)


def _over_limit(name: str, maximum: int, what: str, field: str | None, more: str = "") -> Problem:
    """A 422 for an exceeded limit of `Limits`: what exceeds it, the limit and its setting."""
    detail = f"{what}: the limit is {maximum:,} ({setting(name)}){more}"
    error: dict[str, Any] = {"message": detail, "limit": name, "maximum": maximum}
    if field:
        error = {"field": field, **error}
    return Problem(422, "limit-exceeded", "Request exceeds a limit", detail, errors=[error])


def _excerpt(text: str) -> str:
    """A short, JSON-quoted excerpt of a client's string, for a message."""
    cut = text[:_EXCERPT_CHARS]
    return json.dumps(cut + "…" if len(text) > _EXCERPT_CHARS else cut, ensure_ascii=False)


async def read_limited(request: Request, limit: int) -> bytes:
    """Read the body, refusing it as soon as it is larger than `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> Problem:
    return Problem(
        413,
        "body-too-large",
        "Request body too large",
        f"the body is larger than {limit} bytes: the limit is {limit} bytes "
        f"({setting('max_body_bytes')})",
    )


async def read_upsert_body(request: Request, limits: Limits) -> UpsertBody:
    """Read the body within `max_body_bytes`, then parse and check it (off the event loop)."""
    raw = await read_limited(request, limits.max_body_bytes)
    return await asyncio.to_thread(parse_upsert_body, raw, limits)


def check_content_type(request: Request) -> None:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            "send the body as application/json, "
            + (f"not {_excerpt(content_type)}" if content_type else "with that content type"),
        )


class _Hooks:
    """`json.loads` hooks for one body: strict numbers and keys, and a budget of values.

    The budget stops, while it is parsed, a body that cannot be accepted because it
    holds more values than `info` and `attributes` together may (a 10 MiB list of
    numbers is refused after its first few hundred thousand, not after millions).
    Numbers and objects are disjoint kinds of values, and every object member is a
    value, so either count over the budget proves the body is over its limits.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        # n values of `attributes` take at least 2n - 1 bytes.
        self.budget = limits.max_records + limits.max_attributes_bytes // 2 + 1 + _ROOT_VALUES
        self.values = 0  # numbers and objects
        self.members = 0  # object members

    def over_budget(self) -> NoReturn:
        limits = self.limits
        raise _over_limit(
            "max_records",
            limits.max_records,
            f"the body holds more than {self.budget:,} values: more than `info` can flatten "
            f"into with `attributes` under {limits.max_attributes_bytes:,} bytes "
            f"({setting('max_attributes_bytes')})",
            "info",
            f"; {_RECORDS}",
        )

    def object_pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        self.values += 1
        self.members += len(pairs)
        if self.values > self.budget or self.members > self.budget:
            self.over_budget()
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise _invalid(f"duplicate key {_excerpt(key)} in an object")
                seen.add(key)
        return result

    def integer(self, text: str) -> int:
        self.values += 1
        if self.values > self.budget:
            self.over_budget()
        digits = len(text) - text.startswith("-")
        if digits > _MAX_SAFE_INT_DIGITS:  # before int(): no conversion of huge literals
            raise _invalid(
                f"an integer with {digits:,} digits is beyond ±2^53: integers have at most "
                f"{_MAX_SAFE_INT_DIGITS} digits; send larger numbers as strings"
            )
        value = int(text)
        if abs(value) > _MAX_SAFE_INT:
            raise _invalid(f"integer {text} is beyond ±2^53; send larger numbers as strings")
        return value

    def number(self, text: str) -> float:
        self.values += 1
        if self.values > self.budget:
            self.over_budget()
        value = float(text)  # any length is fine for float(); too large gives inf
        if math.isinf(value):
            raise _invalid(
                f"number {_excerpt(text)} overflows: numbers must be within ±1.8e308; "
                "send larger numbers as strings"
            )
        return value

    @staticmethod
    def constant(name: str) -> Any:
        raise _invalid(f"{name} is not valid JSON: numbers must be finite")


def parse_upsert_body(raw: bytes, limits: Limits, *, fast: bool = True) -> UpsertBody:
    """Parse and check an upsert body; raise a `Problem` saying what is wrong.

    Two parsers, one answer: orjson first (a 5 MiB body parsed and checked in 64 ms
    rather than 83 with `json` and its hooks), kept only if it provably read the body
    as the strict parser does (`_fast`); anything else, and every refusal, goes through
    the strict parser, whose problems say exactly what is wrong. `fast=False`: the
    strict parser alone (the tests hold the two to the same answers).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Problem(
            400,
            "malformed-json",
            "Malformed JSON",
            f"the body is not valid UTF-8: invalid byte at position {error.start}",
        ) from None
    text = text.removeprefix("\ufeff")  # a byte order mark may be ignored (RFC 8259)
    if not text.strip():
        value: Any = {}
    else:
        hooks = _Hooks(limits)
        if _values_over(raw, hooks.budget):
            hooks.over_budget()
        parsed = _fast(raw.removeprefix(_BOM), limits) if fast else None
        if parsed is not None:
            return parsed
        try:
            value = json.loads(
                text,
                object_pairs_hook=hooks.object_pairs,
                parse_int=hooks.integer,
                parse_float=hooks.number,
                parse_constant=hooks.constant,
            )
        except json.JSONDecodeError as error:
            raise Problem(400, "malformed-json", "Malformed JSON", str(error)) from None
        except RecursionError:
            raise _depth(limits, "the body") from None
        except ValueError:  # no other is expected; never show an interpreter's message
            raise Problem(400, "malformed-json", "Malformed JSON", "the body is not JSON") from None
    return _checked(value, limits)[0]


def _fast(raw: bytes, limits: Limits) -> UpsertBody | None:
    """The body parsed by orjson, if that is provably what the strict parser gives; None
    (parse it strictly) if orjson refuses it, or if the body is refused, or might differ.

    orjson refuses what the strict parser refuses for its own reasons (NaN, lone
    surrogates, invalid JSON, numbers that overflow a double) and parses the rest to
    the same values, but differs where the strict hooks check: it keeps the last of
    duplicate keys, reads integers up to 2^64 as `int` and larger ones as `float`, and
    has no budget of values. So this result counts: no two members with one key (every
    member has one `:` outside strings), integers within ±2^53 and no float of 2^63 or
    more (an integer too large for orjson, maybe). The budget needs no count: a body
    within the limits `_checked` applies is within it.
    """
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(value) is not dict:
        return None
    try:
        body, tally = _checked(value, limits)
    except Problem:
        return None  # refused: the strict parser says why (it may find something first)
    if tally.wide_numbers:
        return None
    if raw.count(b":") != tally.members and _colons_outside_strings(raw) != tally.members:
        return None  # a duplicate key
    return body


def _colons_outside_strings(raw: bytes) -> int:
    """The `:` of a JSON text outside its strings: one per object member. As in
    `_values_over`: escaped backslashes and quotes removed, then every byte but quotes
    and colons, then every string (now a quote, no quote, a quote)."""
    marks = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_COLONS)
    return _STRINGS.sub(b"", marks).count(b":")


def _checked(value: Any, limits: Limits) -> tuple[UpsertBody, Tally]:
    """Check a parsed body: its shape, then `attributes` and `info` against the limits."""
    if not isinstance(value, dict):
        raise _invalid("the body must be a JSON object with `attributes` and `info`")
    unknown = [key for key in value if key not in ("attributes", "info")]
    if unknown:
        raise _invalid(
            f"unknown field {_excerpt(unknown[0])}: the body has `attributes` and `info`",
            unknown[0][:_EXCERPT_CHARS],
        )
    attributes, info = value.get("attributes", {}), value.get("info", {})
    for field, part in (("attributes", attributes), ("info", info)):
        if not isinstance(part, dict):
            raise _invalid(f"`{field}` must be a JSON object", field)
    (attributes_document, of_attributes), (info_document, of_info) = (
        _attributes(attributes, limits),
        _info(info, limits),
    )
    tally = Tally(
        members=len(value) + of_attributes.members + of_info.members,
        wide_numbers=of_attributes.wide_numbers + of_info.wide_numbers,
        floats=of_attributes.floats + of_info.floats,
    )
    return UpsertBody(attributes=attributes_document, info=info_document), tally


def _attributes(attributes: dict[str, Any], limits: Limits) -> tuple[Document, Tally]:
    """Check `attributes` (stored as given, returned by every `GET`): its size and shape."""
    limit = limits.max_attributes_bytes

    def too_large(size: str) -> NoReturn:
        raise _over_limit(
            "max_attributes_bytes",
            limit,
            f"`attributes` is {size} bytes as compact JSON",
            "attributes",
        )

    # Every n values take at least 2n - 1 bytes: more than this many cannot fit.
    tally = measure(
        attributes,
        "attributes",
        limits,
        flatten=False,
        max_values=limit // 2 + 1,
        over_values=lambda: too_large(f"more than {limit:,}"),
    )
    document = Document.of(attributes, floats=tally.floats > 0)
    if len(document.body) > limit:
        too_large(f"{len(document.body):,}")
    return document, tally


def _info(info: dict[str, Any], limits: Limits) -> tuple[Document, Tally]:
    tally = measure(info, "info", limits)
    # Without a float, orjson writes the document, to the same bytes (`Document.of`).
    return Document.of(info, floats=tally.floats > 0), tally


def _depth(limits: Limits, what: str, field: str | None = None) -> Problem:
    return _over_limit(
        "max_depth",
        limits.max_depth,
        f"{what} is nested deeper than {limits.max_depth} levels (the body is level 1)",
        field,
    )


@dataclass(frozen=True)
class Tally:
    """What `measure` counted in a parsed value (`_fast` checks orjson's reading with it)."""

    #: Members of objects.
    members: int
    #: Integers beyond ±2^53, and floats of 2^63 or more (an integer, maybe, to orjson).
    wide_numbers: int
    #: Floats (a document without one is written by orjson: `Document.of`).
    floats: int


def measure(
    root: dict[str, Any],
    field: str,
    limits: Limits,
    *,
    flatten: bool = True,
    max_values: int | None = None,
    over_values: Callable[[], NoReturn] | None = None,
) -> Tally:
    """Measure what `root` turns into once flattened, in one pass; raise at the first limit.

    Iterative (no recursion), and it stops as soon as a limit is crossed, so a hostile
    body costs no more than an acceptable one. Also refuses what PostgreSQL or Temporal
    would refuse later: `\\u0000` and lone surrogates in keys and strings. With
    `flatten=False` (for `attributes`) only depth, characters and the number of values
    (`max_values`, then `over_values()`) are checked.
    """
    big = 2**63
    max_depth = limits.max_depth
    if flatten:
        max_keys, max_key = limits.max_info_keys, limits.max_key_chars
        max_path, max_flat = limits.max_path_chars, limits.max_flattened_bytes
    else:
        max_keys = max_key = max_path = max_flat = big
    if max_values is None:
        max_values = limits.max_records
    measured: dict[str, tuple[int, int]] = {}  # non-ASCII key -> (characters, UTF-8 bytes)
    records = keys = longest_key = longest_path = flat = 0
    floats = wide = 0
    # Frames: a container, its level, and the characters and bytes of its children's
    # path prefix (the container's own path and a dot; nothing at the root).
    stack: list[tuple[Any, int, int, int]] = [(root, 2, 0, 0)]
    while stack:
        node, depth, prefix_chars, prefix_bytes = stack.pop()
        if depth > max_depth:
            raise _depth(limits, f"`{field}`", field)
        is_object = type(node) is dict
        if is_object:
            keys += len(node)
            if keys > max_keys:
                raise _over_limit(
                    "max_info_keys",
                    max_keys,
                    f"`{field}` has more than {max_keys:,} keys (counted at every level)",
                    field,
                )
            pairs: Any = node.items()
        else:
            pairs = enumerate(node)
            width, wider_at = 1, 10  # characters of the list index
        for key, child in pairs:
            if is_object:
                if "\x00" in key:
                    raise _invalid(f"`{field}` has a key with \\u0000", field)
                if key.isascii():
                    key_chars = key_bytes = len(key)
                else:
                    sizes = measured.get(key)
                    if sizes is None:
                        sizes = measured[key] = _key_sizes(key, field)
                    key_chars, key_bytes = sizes
                if key_chars > longest_key:
                    if key_chars > max_key:
                        raise _key_too_long(key, key_chars, max_key, field)
                    longest_key = key_chars
            else:
                if key == wider_at:
                    width, wider_at = width + 1, wider_at * 10
                key_chars = key_bytes = width
            records += 1
            if records > max_values:
                if over_values is not None:
                    over_values()
                raise _over_limit(
                    "max_records",
                    max_values,
                    f"`{field}` flattens into more than {max_values:,} records ({_RECORDS})",
                    field,
                )
            path_chars = prefix_chars + key_chars
            if path_chars > longest_path:
                if path_chars > max_path:
                    raise _over_limit(
                        "max_path_chars",
                        max_path,
                        f"`{field}` has a dotted path of {path_chars:,} characters (keys and "
                        "list indexes joined by dots)",
                        field,
                    )
                longest_path = path_chars
            kind = type(child)
            if kind is str:
                # `in` and isascii() are much faster than a regular expression.
                if "\x00" in child:
                    raise _invalid(f"`{field}` has a string with \\u0000", field)
                size = len(child) if child.isascii() else _utf8_size(child, field)
            elif kind is dict or kind is list:
                stack.append((child, depth + 1, path_chars + 1, prefix_bytes + key_bytes + 1))
                continue
            elif kind is int:
                if child > _MAX_SAFE_INT or child < -_MAX_SAFE_INT:
                    wide += 1
                size = len(str(child))
            elif kind is float:
                floats += 1
                if not -_TWO_63 < child < _TWO_63:
                    wide += 1
                size = len(repr(child))
            else:  # true, false, null
                size = 5 if child is False else 4
            flat += prefix_bytes + key_bytes + size
            if flat > max_flat:
                raise _over_limit(
                    "max_flattened_bytes",
                    max_flat,
                    f"`{field}` flattens into more than {max_flat:,} bytes (the dotted path and "
                    "value of every record, in UTF-8)",
                    field,
                )
    return Tally(members=keys, wide_numbers=wide, floats=floats)


def _utf8_size(text: str, field: str) -> int:
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise _invalid(f"`{field}` has a string with a lone surrogate", field) from None


def _key_sizes(key: str, field: str) -> tuple[int, int]:
    """Characters and UTF-8 bytes of a non-ASCII key: NFKC's, or the key's if longer."""
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise _invalid(f"`{field}` has a key with a lone surrogate", field) from None
    folded = unicodedata.normalize("NFKC", key)
    return max(len(key), len(folded)), max(size, len(folded.encode()))


def _key_too_long(key: str, chars: int, limit: int, field: str) -> Problem:
    return _over_limit(
        "max_key_chars",
        limit,
        f"`{field}` has a key of {chars:,} characters"
        + ("" if chars == len(key) else " after Unicode NFKC normalization, as the ETL sees it"),
        field,
        f"; the key begins {_excerpt(key)}",
    )
