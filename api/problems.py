"""RFC 9457 problem details: every error the API returns is one of these.

Including the unexpected ones: `install` adds a catch-all that answers any
exception a route or a dependency raises with a problem, logged once as one line
(its type and a bounded message, never the request's data):

- the database unreachable (a connection refused, lost or timed out, the pool
  exhausted, PostgreSQL shutting down or refusing connections): `503` with
  `Retry-After`;
- anything else: `500`, whose detail carries the request's correlation id, the
  key to its log lines.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.observability import correlation_id, route_template
from upsertflow.logs import describe_exception, exception_chain

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "urn:upsertflow:problem:"
#: Seconds a client is asked to wait after a `503` for an unreachable database.
RETRY_AFTER_SECONDS = "5"

log = logging.getLogger("upsertflow.api.errors")


class ProblemDetail(BaseModel):
    """An error, per RFC 9457."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class Problem(Exception):
    """Raise to answer with a problem document."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers
        self.errors = errors


def problem_response(problem: Problem) -> JSONResponse:
    body = ProblemDetail(
        type=PROBLEM_BASE + problem.slug,
        title=problem.title,
        status=problem.status,
        detail=problem.detail,
        errors=problem.errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=problem.status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=problem.headers,
    )


_PROBLEM_SCHEMA = {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the problem statuses an operation can return."""
    return {
        status: {"model": ProblemDetail, "content": {PROBLEM_MEDIA_TYPE: _PROBLEM_SCHEMA}}
        for status in statuses
    }


_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal server error",
    503: "Service unavailable",
}

#: SQLSTATEs of an unreachable database: connection exceptions (class 08), too many
#: connections, and a server shutting down, crashed or starting up.
_OUTAGE_SQLSTATES = ("08", "53300", "57P01", "57P02", "57P03")


def outage_kind(error: BaseException) -> str | None:
    """`"database"` if `error` says the database is unreachable, `"dependency"` for another
    connection failure or time-out; None for anything else (a bug: a `500`)."""
    chain = exception_chain(error)
    for cause in chain:
        sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
        if (
            isinstance(cause, sa_exc.OperationalError | sa_exc.InterfaceError | sa_exc.TimeoutError)
            or (isinstance(cause, sa_exc.DBAPIError) and cause.connection_invalidated)
            or isinstance(cause, asyncpg.PostgresConnectionError | asyncpg.InterfaceError)
            or (isinstance(sqlstate, str) and sqlstate.startswith(_OUTAGE_SQLSTATES))
        ):
            return "database"
    for cause in chain:
        if isinstance(cause, OSError | TimeoutError):
            # asyncpg raises a refused or timed-out connection unwrapped: tell by where.
            return "database" if _raised_by_database_code(cause) else "dependency"
    return None


def _raised_by_database_code(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None:
        module = str(traceback.tb_frame.f_globals.get("__name__", ""))
        if module.startswith(("sqlalchemy.", "asyncpg.")):
            return True
        traceback = traceback.tb_next
    return False


def unexpected_error(scope: Scope, error: Exception) -> JSONResponse:
    """The problem answering an exception nothing else handled; logged as one line."""
    cid = correlation_id.get() or "-"
    method, route = scope.get("method", "-"), route_template(scope)
    error_type, message = describe_exception(error)
    fields = {"error_type": error_type, "error": message, "route": route}
    # A traceback (plain, see `upsertflow.logs`) only when debugging.
    exc_info = error if log.isEnabledFor(logging.DEBUG) else None
    kind = outage_kind(error)
    if kind is not None:
        what = "the database" if kind == "database" else "a service it depends on"
        log.warning(
            "%s %s: %s is unreachable; answered 503",
            method,
            route,
            what,
            extra=fields,
            exc_info=exc_info,
        )
        return problem_response(
            Problem(
                503,
                f"{kind}-unavailable",
                "The database is unavailable" if kind == "database" else "Service unavailable",
                f"the API cannot reach {what} right now; try again in "
                f"{RETRY_AFTER_SECONDS} s (correlation id {cid})",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
        )
    log.error(
        "%s %s: unexpected %s; answered 500",
        method,
        route,
        error_type,
        extra=fields,
        exc_info=exc_info,
    )
    return problem_response(
        Problem(
            500,
            "internal-error",
            "Internal server error",
            f"the request failed on an unexpected error; it is logged under correlation id "
            f"{cid}: quote it when you report the problem",
        )
    )


class CatchAllMiddleware:
    """Answer any exception of the app inside it with `unexpected_error`, and not re-raise it.

    Inside the observability middleware (`install` adds it first, so innermost): the
    answer carries `X-Correlation-ID` and is counted in the metrics. Starlette's own
    `Exception` handler runs outside every middleware, and re-raises to the server,
    which logs the exception a second time.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            if started:
                raise  # too late for a problem: the server ends the response and logs it
            await unexpected_error(scope, error)(scope, receive, send)


def install(app: FastAPI) -> None:
    """Answer every error, ours, the framework's and unexpected ones, as problem+json.

    Call it before adding the other middleware: its catch-all must be the innermost.
    """

    async def on_problem(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc)

    async def on_http(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        title = _TITLES.get(exc.status_code, "Error")
        return problem_response(
            Problem(
                exc.status_code,
                title.lower().replace(" ", "-"),
                title,
                str(exc.detail),
                headers=dict(exc.headers) if exc.headers else None,
            )
        )

    async def on_validation(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {"field": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
            for error in jsonable_encoder(exc.errors())
        ]
        detail = "; ".join(f"{error['field']}: {error['message']}" for error in errors)
        return problem_response(
            Problem(422, "validation", "Invalid request", detail, errors=errors)
        )

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Only for an exception of a middleware outside `CatchAllMiddleware`.
        return unexpected_error(request.scope, exc)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_middleware(CatchAllMiddleware)
