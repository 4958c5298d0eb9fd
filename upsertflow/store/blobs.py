"""Stored request documents (the claim-check store) and the claims on them."""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

from sqlalchemy import Delete, exists, func

from upsertflow.models import Blob, BlobClaim, ResourceVersion

_D = TypeVar("_D", bound=Delete)


def unreferenced_blobs(statement: _D, untouched_for: timedelta) -> _D:
    """Restrict a `DELETE FROM blobs` to documents nothing refers to or claims.

    `untouched_for` spares documents stored (or stored again) very recently: a
    request storing the same content right now will claim it in a moment.
    """
    return statement.where(
        Blob.created_at < func.now() - untouched_for,
        ~exists().where(ResourceVersion.blob_digest == Blob.digest),
        ~exists().where(BlobClaim.digest == Blob.digest),
    )
