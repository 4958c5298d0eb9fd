"""Fixtures on real components: an embedded PostgreSQL with the migrations applied,
a Temporal dev server, workers on a fresh task queue per test, the ASGI app."""

from __future__ import annotations

import io
import logging
import os
import secrets
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client
from temporalio.worker import Worker

from devstack import EmbeddedPostgres, TemporalDevServer, free_port, migrate
from devstack.stack import enrichment_service
from tests.helpers import api_client
from upsertflow import temporal
from upsertflow.codec import CodecKey
from upsertflow.db import create_engine, create_sessionmaker
from upsertflow.logs import build_formatter
from upsertflow.settings import Auth, Codec, Enrichment, RateLimit, Settings
from worker import build_worker, enrichment_client

#: The suite's local signing key: its APIs verify tokens with it (auth is on in every test).
SIGNING_KEY = secrets.token_urlsafe(48)
#: Writes per caller far above what any test sends at once (200 concurrent PUTs):
#: tests/test_rate_limit.py tests the limiter with small rates.
UNTHROTTLED = RateLimit(writes_per_second=10_000, burst=10_000)

# The suite runs on its own servers, never on whatever the shell points at, and traces
# into no collector of the shell's (tests/test_tracing.py traces into memory).
for _name in ("DATABASE_URL", "TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TEMPORAL_API_KEY"):
    os.environ.pop(_name, None)
for _name in [name for name in os.environ if name.startswith("OTEL_")]:
    os.environ.pop(_name)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A PostgreSQL server of the suite's own, migrated to head.

    Its data lives in a folder of its own under /tmp, not pytest's: run as root, the
    server runs as another user who must enter every parent folder, and pytest makes
    its own base folder private again at the start of every session.
    """
    parent = Path(tempfile.mkdtemp(prefix="upsertflow-test-pg-"))
    server = EmbeddedPostgres(parent / "data", delete_on_stop=True)
    try:
        server.start()
        migrate(server.url)
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def temporal_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Temporal dev server (in memory) with the project's search attributes."""
    log_path = tmp_path_factory.mktemp("temporal") / "server.log"
    server = TemporalDevServer(
        db_file=None, port=free_port(), ui_port=free_port(), log_path=log_path
    )
    try:
        server.start()
        os.environ["TEMPORAL_ADDRESS"] = server.address
        yield server.address
    finally:
        os.environ.pop("TEMPORAL_ADDRESS", None)
        server.stop()


@pytest.fixture(scope="session")
def codec() -> Codec:
    """Payload encryption with a key of the session's own: the suite runs encrypted."""
    return Codec(keys=SecretStr(CodecKey.generate("test").spec()))


@pytest.fixture(scope="session")
async def client(temporal_address: str, codec: Codec) -> Client:
    return await temporal.connect(codec=codec)


@pytest.fixture
def settings(
    database_url: str, temporal_address: str, enrichment_url: str, codec: Codec
) -> Settings:
    """Settings for one test: its own task queue, so its workflows meet only its worker."""
    return Settings(
        database_url=database_url,
        task_queue=f"test-{uuid.uuid4().hex}",
        enrichment=Enrichment(url=enrichment_url),
        codec=codec,
        auth=Auth(signing_key=SecretStr(SIGNING_KEY)),
        rate_limit=UNTHROTTLED,
    )


@pytest.fixture(scope="session")
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(Settings(database_url=database_url))
    yield create_sessionmaker(engine)
    await engine.dispose()


@pytest.fixture(scope="session")
def enrichment_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The local enrichment service, as a real server process."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("enrichment") / "service.log"
    service = enrichment_service(port, dict(os.environ), log_path=log_path)
    try:
        service.start()
        yield f"http://127.0.0.1:{port}"
    finally:
        service.stop()


@pytest.fixture
async def enrichment(enrichment_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the enrichment service's admin API; faults and stats reset around each test."""
    async with httpx.AsyncClient(base_url=enrichment_url) as admin:
        await admin.delete("/_faults")
        await admin.delete("/_stats")
        yield admin
        await admin.delete("/_faults")


@pytest.fixture
async def worker(
    client: Client,
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
) -> AsyncIterator[Worker]:
    """The project's real worker, in-process, on the test's task queue."""
    async with enrichment_client(settings) as http:
        async with build_worker(client, settings, sessions, http) as running:
            yield running


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The ASGI app with its lifespan run, over httpx."""
    async with api_client(settings) as http:
        yield http


@pytest.fixture
def resource_id() -> str:
    """A resource id no other test uses."""
    return f"r-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """Every log record of the process, rendered as the production JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(build_formatter("json"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
