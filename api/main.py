"""The HTTP API: `create_app()` builds it; `upsertflow-api` serves it with uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import unquote

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from api import docs, problems
from api.observability import ObservabilityMiddleware
from api.ratelimit import write_buckets
from api.routes import codec, context, etl, health, reprocess, resources
from api.security import TokenVerifier, anonymous_scopes, warn_if_disabled
from upsertflow import temporal, tracing
from upsertflow.db import create_engine, create_sessionmaker
from upsertflow.settings import Settings, get_settings


class KeepEncodedSlashes:
    """Route with `%2F` kept encoded, so that an id never holds a `/`.

    Starlette routes on the decoded path: `/resources/r1%2Fetl` would reach the ETL
    view of `r1`. Kept encoded, it reaches the resource routes and is a 422.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = scope.get("raw_path")
        if scope["type"] == "http" and raw_path and b"%2f" in raw_path.lower():
            path = raw_path.decode("ascii", "replace").replace("%2f", "%2F")
            scope = {**scope, "path": unquote(path.replace("%2F", "%252F"))}
        await self.app(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; its lifespan opens the database engine and the Temporal client once.

    Raises `AuthNotConfigured` unless the settings say how to verify tokens (or, explicitly,
    that auth is disabled).
    """
    settings = settings or get_settings()
    token_verifier = TokenVerifier(settings.auth, anonymous_scopes(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        tracing.instrument_engine(engine)
        app.state.settings = settings
        app.state.sessions = create_sessionmaker(engine)
        # Lazy: the API starts while Temporal is down; /readyz says so, writes answer 503.
        app.state.temporal = await temporal.connect(lazy=True, codec=settings.codec)
        warn_if_disabled(settings.auth)
        try:
            yield
        finally:
            await engine.dispose()

    app = FastAPI(
        title="upsertflow",
        version="1",
        summary="Upsert resources now; their ETL runs durably on Temporal.",
        lifespan=lifespan,
        # Served by `api.docs`, from files of the app rather than a CDN.
        docs_url=None,
        redoc_url=None,
        # A span per request while tracing is on (`upsertflow.tracing`), none otherwise.
        telemetry=tracing.fastapi_telemetry(),
    )
    app.state.token_verifier = token_verifier
    app.state.write_buckets = write_buckets(settings.rate_limit)
    problems.install(app)
    app.add_middleware(codec.CodecCors, origins=settings.codec.cors_origins)
    app.add_middleware(KeepEncodedSlashes)
    app.add_middleware(ObservabilityMiddleware)
    # Metrics are served on a port of their own (`UPSERTFLOW_API__METRICS_PORT`), not here.
    docs.install(app)
    # `/resources/{id}/etl` and `/context` first: `{id:path}` of the resource routes would
    # take them.
    app.include_router(etl.router)
    app.include_router(context.router)
    app.include_router(resources.router)
    app.include_router(reprocess.router)
    app.include_router(health.router)
    app.include_router(codec.router)
    return app
