"""Opaque page cursors: where the previous page ended, base64url-encoded.

A cursor the API did not give out (or one of another list) is a `400`.
"""

from __future__ import annotations

import base64
import binascii

from api.paths import ID_PATTERN
from api.problems import Problem


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode(cursor: str) -> str | None:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return base64.b64decode(padded, altchars=b"-_", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def invalid_cursor(detail: str = "use the `next_cursor` of a previous page") -> Problem:
    return Problem(400, "invalid-cursor", "Invalid cursor", detail)


def resource_cursor(last_id: str) -> str:
    """The cursor of a page of resources that ended at `last_id`."""
    return _encode(last_id)


def after_resource(cursor: str) -> str:
    """The last id of the previous page of resources."""
    last_id = _decode(cursor)
    if last_id is None or not ID_PATTERN.fullmatch(last_id):
        raise invalid_cursor()
    return last_id
