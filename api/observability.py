"""Request metrics (Prometheus, on a port of their own) and a correlation id on every request.

The metrics are served by `serve_metrics` on `UPSERTFLOW_API__METRICS_PORT`, never on the
API's own port: who can call the API cannot read them.

Each request gets a correlation id — the client's `X-Correlation-ID` if it sent a
usable one, a new one otherwise — returned in the response's `X-Correlation-ID`,
bound to every log line written while handling the request, and passed into the
workflows the request starts.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from contextvars import ContextVar
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import Counter, Histogram, start_http_server
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from upsertflow.tracing import set_correlation_id

CORRELATION_HEADER = "X-Correlation-ID"
_USABLE_ID = re.compile(r"[A-Za-z0-9._~:-]{1,128}")

log = logging.getLogger("upsertflow.api.access")

correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")

REQUESTS = Counter(
    "upsertflow_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["method", "route", "status"],
)
LATENCY = Histogram(
    "upsertflow_http_request_duration_seconds",
    "Time to answer an HTTP request, by route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WORKFLOWS_STARTED = Counter(
    "upsertflow_workflows_started_total",
    "Workflows the API started (or joined), by kind.",
    ["kind"],
)


_MAX_LOGGED_PATH = 200


def serve_metrics(host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve this process's metrics at `http://host:port/metrics`, in a thread.

    Return the server (`shutdown()` stops it) and its thread.
    """
    server, thread = start_http_server(port, addr=host)
    logging.getLogger("upsertflow.api").info("metrics at http://%s:%s/metrics", host, port)
    return server, thread


def _bounded_path(path: str) -> str:
    """The path as logged: printable, at most `_MAX_LOGGED_PATH` characters."""
    path = "".join(c if c.isprintable() else "?" for c in path[: _MAX_LOGGED_PATH + 1])
    return path if len(path) <= _MAX_LOGGED_PATH else path[:_MAX_LOGGED_PATH] + "…"


def route_template(scope: Scope) -> str:
    """The template of the route that served the request (`/resources/{resource_id}`), never
    the path itself (it holds ids: unbounded labels); `unmatched` for no route."""
    return str(getattr(scope.get("route"), "path", None) or "unmatched")


class ObservabilityMiddleware:
    """Count and time requests by route; give each one a correlation id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = (
            dict(scope["headers"]).get(CORRELATION_HEADER.lower().encode(), b"").decode("latin-1")
        )
        cid = incoming if _USABLE_ID.fullmatch(incoming) else uuid.uuid4().hex
        token = correlation_id.set(cid)
        set_correlation_id(cid)
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (CORRELATION_HEADER.lower().encode(), cid.encode()),
                ]
            await send(message)

        with structlog.contextvars.bound_contextvars(correlation_id=cid):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                template = route_template(scope)
                method = scope["method"]
                REQUESTS.labels(method, template, str(status)).inc()
                LATENCY.labels(method, template).observe(elapsed)
                # The path, never the query string (it can carry data); `route` is the template.
                log.info(
                    "%s %s %s",
                    method,
                    _bounded_path(scope["path"]),
                    status,
                    extra={
                        "status": status,
                        "route": template,
                        "duration_ms": round(elapsed * 1000, 1),
                    },
                )
                correlation_id.reset(token)
