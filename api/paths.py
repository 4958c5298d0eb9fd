"""The resource id in paths: what it may be, checked once for every route."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path
from starlette.convertors import Convertor, register_url_convertor

from api.problems import Problem


class _AnyText(Convertor[str]):
    """Whatever stands in the id's place, newlines included, so that `check_id` judges it.

    Starlette's `path` convertor stops at a newline: `a%0Ab` would match no route (404).
    """

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("resource_id", _AnyText())

ID_PATTERN = re.compile(r"[A-Za-z0-9._~-]{1,128}")

ResourceIdPath = Annotated[
    str,
    Path(
        alias="resource_id",
        description="1–128 characters of `[A-Za-z0-9._~-]`, not `.` or `..`.",
        examples=["r1"],
    ),
]


def check_id(resource_id: str) -> str:
    """Refuse ids that are not 1–128 unreserved URL characters (or are `.`/`..`)."""
    if not ID_PATTERN.fullmatch(resource_id) or resource_id in (".", ".."):
        raise Problem(
            422,
            "invalid-id",
            "Invalid resource id",
            "a resource id is 1–128 characters of A–Z, a–z, 0–9, '.', '_', '~' and '-' "
            f"(and not '.' or '..'); got {resource_id[:140]!r}",
            errors=[{"field": "path.resource_id", "message": "invalid resource id"}],
        )
    return resource_id


def not_found(resource_id: str) -> Problem:
    return Problem(404, "not-found", "Resource not found", f"no resource {resource_id!r}")
