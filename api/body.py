"""Reading an upsert body strictly: bounded size, strict JSON, bounded shape.

Everything PostgreSQL's `jsonb` or Temporal would refuse later (NaN, `\\u0000`,
lone surrogates, integers beyond ±2^53) is refused here, before anything is
written, so no activity can fail on every retry because of a client's data.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from api.problems import Problem
from upsertflow.settings import Limits

_MAX_SAFE_INT = 2**53
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")


@dataclass(frozen=True)
class Document:
    """A canonical JSON object and its content address."""

    value: dict[str, Any]
    body: bytes
    digest: str

    @classmethod
    def of(cls, value: dict[str, Any]) -> Document:
        body = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        return cls(value=value, body=body, digest=hashlib.sha256(body).hexdigest())


@dataclass(frozen=True)
class UpsertBody:
    attributes: Document
    info: Document


def _invalid(detail: str, field: str | None = None) -> Problem:
    errors = [{"field": field, "message": detail}] if field else None
    return Problem(422, "invalid-body", "Invalid request body", detail, errors=errors)


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
        f"the body is larger than {limit} bytes",
    )


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
            f"send the body as application/json, not {content_type or 'no content type'!r}",
        )


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:100]!r}")
            seen.add(key)
    return result


def _parse_int(text: str) -> int:
    value = int(text)
    if abs(value) > _MAX_SAFE_INT:
        raise ValueError(f"integer {text[:40]} is beyond ±2^53")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} overflows")
    return value


def _parse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_upsert_body(raw: bytes, limits: Limits) -> UpsertBody:
    """Parse and check an upsert body; raise a `Problem` saying what is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise Problem(
            400, "malformed-json", "Malformed JSON", f"the body is not valid UTF-8: {error}"
        ) from None
    if not text.strip():
        value: Any = {}
    else:
        try:
            value = json.loads(
                text,
                object_pairs_hook=_object_pairs,
                parse_int=_parse_int,
                parse_float=_parse_float,
                parse_constant=_parse_constant,
            )
        except json.JSONDecodeError as error:
            raise Problem(400, "malformed-json", "Malformed JSON", str(error)) from None
        except ValueError as error:
            raise _invalid(str(error)) from None
        except RecursionError:
            raise _invalid(f"the body is nested deeper than {limits.max_depth} levels") from None
    if not isinstance(value, dict):
        raise _invalid("the body must be a JSON object with `attributes` and `info`")
    unknown = sorted(set(value) - {"attributes", "info"})
    if unknown:
        raise _invalid(
            f"unknown field {unknown[0]!r}: the body has `attributes` and `info`", unknown[0]
        )
    parts: dict[str, Document] = {}
    for field in ("attributes", "info"):
        part = value.get(field, {})
        if not isinstance(part, dict):
            raise _invalid(f"`{field}` must be a JSON object", field)
        keys = _check_shape(part, field, limits)
        if field == "info" and keys > limits.max_info_keys:
            raise _invalid(
                f"`info` has {keys} keys, more than the limit of {limits.max_info_keys}", field
            )
        parts[field] = Document.of(part)
    return UpsertBody(attributes=parts["attributes"], info=parts["info"])


def _check_shape(root: dict[str, Any], field: str, limits: Limits) -> int:
    """Check depth and characters iteratively; return the number of object keys."""
    keys = 0
    stack: list[tuple[Any, int]] = [(root, 2)]
    while stack:
        node, depth = stack.pop()
        if depth > limits.max_depth:
            raise _invalid(f"`{field}` is nested deeper than {limits.max_depth} levels", field)
        if isinstance(node, dict):
            keys += len(node)
            for key, child in node.items():
                if _BAD_CHARS.search(key):
                    raise _invalid(f"`{field}` has a key with \\u0000 or a lone surrogate", field)
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1))
                elif isinstance(child, str) and _BAD_CHARS.search(child):
                    raise _invalid(
                        f"`{field}` has a string with \\u0000 or a lone surrogate", field
                    )
        else:
            for child in node:
                if isinstance(child, dict | list):
                    stack.append((child, depth + 1))
                elif isinstance(child, str) and _BAD_CHARS.search(child):
                    raise _invalid(
                        f"`{field}` has a string with \\u0000 or a lone surrogate", field
                    )
    return keys
