"""`Idempotency-Key` (IETF httpapi idempotency-key draft), as one protocol around a handler.

The same key with the same body replays the first response (with
`Idempotent-Replayed: true`) and creates nothing new; the same key with another
body is `422`; the same key while the first request is in flight is `409`. Keys
expire after `UPSERTFLOW_API__IDEMPOTENCY_TTL_SECONDS`. Because the keys live in the
database (`upsertflow.store.idempotency`), they survive API restarts; a request
whose API process died while it was in flight is taken over after its lock
expires, with the same request id — and so the same workflow — as the first.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.problems import Problem, problem_response
from upsertflow.store.idempotency import (
    Claim,
    KeyRef,
    KeyState,
    claim_key,
    store_response,
    unlock_key,
)

REPLAY_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Answer:
    """A response to give (and, with an Idempotency-Key, to replay)."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str]

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status_code, headers=self.headers)


#: The handler's work, given the request id to use: the same for every repeat of a key.
Work = Callable[[str], Awaitable[Answer]]


def check_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            f"an Idempotency-Key is 1–{MAX_KEY_LENGTH} printable characters",
        )
    return key


class Idempotency:
    """The protocol for one request: `check` the key early, `respond` once the body is read."""

    def __init__(self, key: str | None, scope: str) -> None:
        """Refuse a malformed key (`400`); `scope` is the request's method and path."""
        self.ref = KeyRef(check_key(key), scope) if key is not None else None

    async def respond(
        self,
        sessions: async_sessionmaker[AsyncSession],
        fingerprint: str,
        work: Work,
        *,
        ttl: timedelta,
        lock_for: timedelta,
    ) -> Response:
        """Claim the key, then replay, refuse (`409`/`422`) or run `work` and keep its answer.

        Without a key, `work` runs with a new request id. A `422` of `work` (the data
        cannot be applied) is final and kept for replays; any other failure unlocks the
        key, so that a repeat takes the request over with the same request id.
        """
        if self.ref is None:
            return (await work(uuid.uuid4().hex)).response()
        state = await claim_key(sessions, self.ref, fingerprint, ttl, lock_for)
        if state.claim is Claim.REPLAY:
            return _replay(state)
        _refuse_if_taken(self.ref, state)
        try:
            answer = await work(state.request_id)
        except Problem as problem:
            if problem.status != 422:
                await unlock_key(sessions, self.ref)
                raise
            refused = problem_response(problem)
            await store_response(sessions, self.ref, 422, bytes(refused.body), {})
            raise
        except BaseException:
            await unlock_key(sessions, self.ref)
            raise
        response = answer.response()
        await store_response(
            sessions, self.ref, answer.status_code, bytes(response.body), answer.headers
        )
        return response


def _replay(state: KeyState) -> Response:
    assert state.status_code is not None and state.body is not None
    return Response(
        state.body,
        status_code=state.status_code,
        headers={**(state.headers or {}), REPLAY_HEADER: "true"},
        media_type="application/json",
    )


def _refuse_if_taken(ref: KeyRef, state: KeyState) -> None:
    """`422` for a key first used with another body, `409` while its first request runs."""
    if state.claim is Claim.MISMATCH:
        raise Problem(
            422,
            "idempotency-key-reused",
            "Idempotency-Key reused with another body",
            f"the key {ref.key!r} was first used for a different request body; "
            "use a new key for a new request",
        )
    if state.claim is Claim.IN_FLIGHT:
        assert state.locked_until is not None
        # The first request answers within its lock, or the lock expires and a repeat
        # takes it over: either way a repeat after this long gets an answer.
        left = (state.locked_until - datetime.now(UTC)).total_seconds()
        wait = max(1, math.ceil(left))
        raise Problem(
            409,
            "idempotency-key-in-flight",
            "Request with this Idempotency-Key is in flight",
            f"the first request with this key is still being processed; repeat this "
            f"request to get its response (at the latest after {wait} s, when a repeat "
            "takes over the first request if it has not answered)",
            headers={"Retry-After": str(wait)},
        )
