"""Opaque page cursors: where the previous page ended, base64url-encoded.

A cursor the API did not give out (or one of another list) is a `400`.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from api.paths import ID_PATTERN
from api.problems import Problem
from upsertflow.store.contexts import ContextLoad

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_MAX_INT32 = 2**31 - 1
#: Microseconds from the epoch to the last instant a `datetime` holds.
_MAX_MICROS = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND


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


@dataclass(frozen=True)
class ContextCursor:
    """Where a page of a context ended: the load of the context it pages, and its last path."""

    load: ContextLoad
    last_path: str

    def encode(self) -> str:
        loaded = (self.load.loaded_at - _EPOCH) // _MICROSECOND
        return _encode(f"{self.load.version}.{loaded}.{self.last_path}")

    @classmethod
    def decode(cls, cursor: str) -> ContextCursor:
        """The cursor a previous page of a context gave out; anything else is a `400`."""
        parts = (_decode(cursor) or "").split(".", 2)
        if len(parts) == 3 and all(p.isascii() and p.isdigit() and len(p) <= 18 for p in parts[:2]):
            version, loaded, last_path = int(parts[0]), int(parts[1]), parts[2]
            if (
                version <= _MAX_INT32
                and loaded <= _MAX_MICROS
                and last_path
                and "\x00" not in last_path
            ):
                return cls(ContextLoad(version, _EPOCH + loaded * _MICROSECOND), last_path)
        raise invalid_cursor("use the `next_cursor` of a previous page of this context")
