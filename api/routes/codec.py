"""The codec server: `POST /codec/encode` and `/codec/decode` for the Temporal Web UI and CLI.

Temporal's remote codec protocol: the body is `{"payloads": [...]}`, each payload in
protobuf JSON (base64 `metadata` values and `data`); the answer is the same list
encoded or decoded with the API's own data converter (`upsertflow.codec`). The Web UI
calls `<endpoint>/decode` from the browser, with the headers `Content-Type`,
`X-Namespace` and, when it passes the user's token, `Authorization`; so the routes
answer CORS requests from `UPSERTFLOW_CODEC__CORS_ORIGINS`, and only these routes.

The body is bounded by `UPSERTFLOW_LIMITS__MAX_BODY_BYTES`, like every other request, and
by `MAX_PAYLOADS` payloads; it is parsed off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field
from starlette import types
from starlette.middleware.cors import CORSMiddleware
from temporalio.api.common.v1 import Payload, Payloads

from api.body import check_content_type, read_limited
from api.deps import SettingsDep, TemporalDep
from api.problems import Problem, problem_responses
from api.security import Scope, require_scopes
from upsertflow.codec import UndecryptablePayload

PREFIX = "/codec"
#: Payloads per request: the Web UI sends one event attribute's (a few) at a time, and
#: parsing each costs far more than its bytes, so the body limit alone is not enough.
MAX_PAYLOADS = 1_000
#: What the Temporal UI sends (`Authorization-Extras`: its id token, with `Authorization`).
ALLOWED_HEADERS = ["Content-Type", "X-Namespace", "Authorization", "Authorization-Extras"]


router = APIRouter(
    prefix=PREFIX,
    tags=["codec"],
    dependencies=[require_scopes(Scope.CODEC)],
    responses=problem_responses(401, 403),
)


class CodecPayload(BaseModel):
    """A Temporal payload in protobuf JSON: base64 metadata values and data."""

    model_config = ConfigDict(extra="allow")

    metadata: dict[str, str] = Field(
        default_factory=dict, description="Metadata values, base64 (`encoding`, …)."
    )
    data: str = Field(default="", description="The payload's bytes, base64.")


class CodecPayloads(BaseModel):
    """The body of a codec request and of its answer."""

    payloads: list[CodecPayload] = Field(default_factory=list)


_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CodecPayloads"}}},
}


@router.post(
    "/encode",
    operation_id="codec_encode",
    response_model=CodecPayloads,
    responses=problem_responses(400, 413, 415, 422),
    openapi_extra={"requestBody": _BODY},
)
async def encode(request: Request, settings: SettingsDep, client: TemporalDep) -> JSONResponse:
    """Encode (encrypt) payloads as upsertflow's workers would."""
    codec = client.data_converter.payload_codec
    return await _apply(request, settings.limits.max_body_bytes, codec.encode if codec else None)


@router.post(
    "/decode",
    operation_id="codec_decode",
    response_model=CodecPayloads,
    responses=problem_responses(400, 413, 415, 422),
    openapi_extra={"requestBody": _BODY},
)
async def decode(request: Request, settings: SettingsDep, client: TemporalDep) -> JSONResponse:
    """Decode (decrypt) payloads; payloads that are not encrypted come back as they are."""
    codec = client.data_converter.payload_codec
    return await _apply(request, settings.limits.max_body_bytes, codec.decode if codec else None)


async def _apply(
    request: Request,
    limit: int,
    transform: Callable[[Sequence[Payload]], Awaitable[list[Payload]]] | None,
) -> JSONResponse:
    check_content_type(request)
    raw = await read_limited(request, limit)
    payloads = await asyncio.to_thread(_parse, raw)
    if transform is not None:
        try:
            payloads = await transform(payloads)
        except UndecryptablePayload as error:
            raise Problem(
                422, "undecryptable-payload", "Undecryptable payload", str(error)
            ) from None
    body: dict[str, Any] = json_format.MessageToDict(Payloads(payloads=payloads))
    body.setdefault("payloads", [])
    return JSONResponse(body)


def _parse(raw: bytes) -> list[Payload]:
    """The payloads of a request body, at most `MAX_PAYLOADS` of them."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise _invalid() from None
    items = body.get("payloads", []) if isinstance(body, dict) else None
    if not isinstance(items, list):
        raise _invalid()
    if len(items) > MAX_PAYLOADS:
        raise Problem(
            422,
            "too-many-payloads",
            "Too many payloads",
            f"send at most {MAX_PAYLOADS} payloads per request, not {len(items)}",
        )
    try:
        return list(json_format.ParseDict(body, Payloads(), ignore_unknown_fields=True).payloads)
    except (json_format.ParseError, RecursionError):
        raise _invalid() from None


def _invalid() -> Problem:
    return Problem(
        400,
        "invalid-payloads",
        "Invalid payloads",
        'send {"payloads": [...]}, each payload in protobuf JSON with base64 `metadata` '
        "values and `data`",
    )


class CodecCors:
    """CORS for the codec routes only: the rest of the API is not for browsers."""

    def __init__(self, app: types.ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=list(origins),
            allow_methods=["POST"],
            allow_headers=ALLOWED_HEADERS,
            # The UI may send `credentials: "include"` (TEMPORAL_CODEC_INCLUDE_CREDENTIALS);
            # the API sets no cookies, and only the listed origins are ever allowed.
            allow_credentials=True,
            max_age=600,
        )

    async def __call__(self, scope: types.Scope, receive: types.Receive, send: types.Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PREFIX + "/"):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)
