"""A real browser on the Temporal Web UI: what a person sees of one upsert.

With the stack up — a Temporal dev server with its Web UI (the module's own, on
free ports) pointed at the API's codec server (`--ui-codec-endpoint`, as `make dev`
does), a real worker in-process and the API served by uvicorn — the test upserts a
resource, waits until its ETL succeeded, then headless Chromium (Debian's package,
driven by Playwright; installed with apt on first use) opens

1. the workflows list filtered by the visibility query `ResourceId="<id>"` (the
   UI's `?query=` parameter), which must list the resource's workflow, completed;
2. that workflow's page, whose "User Metadata" tab must show its summary
   "Upsert <id>" (the list itself cannot: the server's visibility API does not
   return summaries, and UI 2.54 has no such column);
3. the API's deep link `etl.ui_url` (the run's event history), which must show the
   workflow's input and result decoded, and whose compact view must show the
   activity summaries "normalize <id> v1", "enrich <id> v1" and "load <id> v1"
   (`normalize` and `load` are local activities since pipeline v4 and v3: the UI shows
   their markers with the summaries).

Every payload is encrypted (the suite's key): the summaries, the input and the result
are readable only because the UI decodes them through the codec server, from the
browser (CORS), with a token of the `codec` scope. A second test runs the same upsert
on a Web UI without the codec server, which shows the encrypted payloads instead.

The browser may reach the local UI and API only, so the pages are proven to render
offline. Screenshots of the pages are written to `test-artifacts/temporal-ui/` and
named in the assertion messages (and in the test's junit properties).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from playwright.async_api import (
    Browser,
    Locator,
    Page,
    Route,
    ViewportSize,
    async_playwright,
    expect,
)
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from temporalio.client import Client

from api.main import create_app
from api.security import Scope
from devstack import TemporalDevServer, free_port, venv_binary
from tests.browser import ARTIFACTS, CHROMIUM_ARGS, ChromiumUnavailable, ensure_chromium
from tests.conftest import SIGNING_KEY
from tests.helpers import auth_headers, wait_for_etl
from upsertflow import temporal
from upsertflow.settings import Auth, Codec, Enrichment, Settings
from worker import build_worker, enrichment_client

# 600 s: the first test of a session may include installing Chromium with apt.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

EXAMPLE = {
    "attributes": {"name": "Widget"},
    "info": {"Address": {"City": " Paris ", "Country": "FR"}, "Age": "42", "Active": "yes"},
}
#: How long the UI may take to show something: it loads its data after the page itself.
UI_TIMEOUT_MS = 20_000
VIEWPORT: ViewportSize = {"width": 1440, "height": 1300}
SHOTS = ARTIFACTS / "temporal-ui"

#: Cosmetic, for the screenshot of the list: the project's search attributes as columns
#: (the UI keeps its column choice in this localStorage key). Nothing is asserted on them.
_COLUMN_LABELS = ["Status", "Workflow ID", "ResourceId", "ResourceVersion", "EtlStatus"]
_COLUMNS = [
    {"label": label, "pinned": label in ("Status", "Workflow ID")}
    for label in [*_COLUMN_LABELS, "Type", "Start", "End"]
]
_INIT_SCRIPT = (
    "if (!localStorage.getItem('namespace-workflow-table-columns')) {"
    " localStorage.setItem('namespace-workflow-table-columns',"
    f" JSON.stringify({json.dumps({'default': _COLUMNS})})); }}"
)


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed once per session (and once per machine, under a lock)."""
    try:
        path, seconds = ensure_chromium()
    except ChromiumUnavailable as error:
        pytest.skip(f"no Chromium for the browser test: {error}")
    if seconds:
        print(f"installed {path} with apt in {seconds:.1f} s")
    return path


@dataclass(frozen=True)
class TemporalWithUi:
    address: str
    ui_url: str
    #: The API's URL: its `/codec` is the UI's codec server, unless `codec` is False.
    api_url: str
    codec: bool

    @property
    def ui_origin(self) -> str:
        return f"http://localhost:{urlsplit(self.ui_url).port}"


@pytest.fixture(scope="module")
def temporal_with_ui(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TemporalWithUi]:
    """A Temporal dev server of the module's own (in memory), with its Web UI on a free port,
    pointed at the API's codec server (`--ui-codec-endpoint`) as `make dev` does; without it
    for a test parametrized (indirectly) with "no codec"."""
    codec = getattr(request, "param", "codec") == "codec"
    api_url = f"http://127.0.0.1:{free_port()}"
    log_path = tmp_path_factory.mktemp("temporal-ui") / "server.log"
    server = TemporalDevServer(
        db_file=None,
        port=free_port(),
        ui_port=free_port(),
        log_path=log_path,
        codec_endpoint=f"{api_url}/codec" if codec else None,
    )
    try:
        server.start()
        assert server.ui_url is not None
        yield TemporalWithUi(server.address, server.ui_url, api_url, codec)
    finally:
        server.stop()


@pytest.fixture
async def ui_client(temporal_with_ui: TemporalWithUi, codec: Codec) -> Client:
    return await temporal.connect(env={"TEMPORAL_ADDRESS": temporal_with_ui.address}, codec=codec)


@pytest.fixture
def ui_settings(
    database_url: str, enrichment_url: str, temporal_with_ui: TemporalWithUi, codec: Codec
) -> Settings:
    """The test's own task queue, `ui_url` links to this module's Web UI, whose origin may
    call the codec server; payloads encrypted with the suite's key."""
    return Settings(
        database_url=database_url,
        task_queue=f"test-ui-{uuid.uuid4().hex}",
        enrichment=Enrichment(url=enrichment_url),
        temporal_ui_url=temporal_with_ui.ui_url,
        auth=Auth(signing_key=SecretStr(SIGNING_KEY)),
        codec=codec.model_copy(update={"cors_origins": [temporal_with_ui.ui_origin]}),
    )


@asynccontextmanager
async def serving(app: FastAPI, url: str) -> AsyncIterator[None]:
    """Serve `app` with uvicorn on `url`'s port in this event loop: the browser calls it."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=urlsplit(url).port or 80, log_level="warning", ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                await task
                raise RuntimeError(f"uvicorn did not start on {url}")
            await asyncio.sleep(0.02)
        yield
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def ui_api(
    ui_settings: Settings,
    ui_client: Client,
    sessions: async_sessionmaker[AsyncSession],
    enrichment: httpx.AsyncClient,
    temporal_with_ui: TemporalWithUi,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[httpx.AsyncClient]:
    """The API, served over HTTP (the UI calls its codec server), and a real worker, both on
    this module's Temporal server."""
    # The app connects with the SDK's environment configuration, read in its lifespan.
    monkeypatch.setenv("TEMPORAL_ADDRESS", temporal_with_ui.address)
    app = create_app(ui_settings)
    async with (
        enrichment_client(ui_settings) as http,
        build_worker(ui_client, ui_settings, sessions, http),
        serving(app, temporal_with_ui.api_url),
        httpx.AsyncClient(
            base_url=temporal_with_ui.api_url, headers=auth_headers(ui_settings), timeout=10
        ) as api,
    ):
        yield api


def _is_remote(url: str) -> bool:
    return urlsplit(url).hostname not in ("localhost", "127.0.0.1", None)


@pytest.fixture
async def page(chromium: Path) -> AsyncIterator[Page]:
    """A page of a fresh headless Chromium; the browser and Playwright's driver stop after."""
    async with async_playwright() as playwright:
        browser: Browser = await playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, timeout=60_000
        )
        try:
            context = await browser.new_context(viewport=VIEWPORT)
            # Offline by construction: the UI must render from the local server alone (it
            # asks newsfeed.temporal.io for news; that request fails at once).
            await context.route(_is_remote, lambda route: route.abort("internetdisconnected"))
            await context.add_init_script(_INIT_SCRIPT)
            context.set_default_timeout(UI_TIMEOUT_MS)
            context.set_default_navigation_timeout(30_000)
            yield await context.new_page()
        finally:
            await browser.close()


class Screens:
    """Screenshots named after what they show, listed in the test's junit properties."""

    def __init__(self, record: Callable[[str, object], None]) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self._record = record

    async def take(self, page: Page, name: str) -> Path:
        path = SHOTS / f"{name}.png"
        await page.screenshot(path=path)
        self._record(f"screenshot {name}", str(path))
        return path

    async def expect_text(self, page: Page, text: str, name: str, what: str) -> None:
        """Wait (bounded) until the page holds `text`; if it does not, fail with a screenshot."""
        await self.expect_visible(page, page.locator("body"), name, what, text)

    async def expect_visible(
        self, page: Page, locator: Locator, name: str, what: str, text: str | None = None
    ) -> None:
        """Wait (bounded) until `locator` is visible (and holds `text`); if it is not, fail
        with a screenshot."""
        try:
            await expect(locator).to_be_visible(timeout=UI_TIMEOUT_MS)
            if text is not None:
                await expect(locator).to_contain_text(text, timeout=UI_TIMEOUT_MS)
        except AssertionError as error:
            path = await self.take(page, f"{name}-FAILED")
            (SHOTS / f"{name}-FAILED.txt").write_text(await page.inner_text("body"))
            raise AssertionError(
                f"{page.url} does not show {what} after {UI_TIMEOUT_MS / 1000:.0f} s; "
                f"screenshot: {path}\n" + "\n".join(str(error).splitlines()[:12])
            ) from None


async def wait_until_listed(client: Client, query: str, within: float = 10.0) -> list[str]:
    """Visibility is eventually consistent: wait until the query finds the workflow."""
    deadline = time.monotonic() + within
    found: list[str] = []
    while not found and time.monotonic() < deadline:
        found = [execution.id async for execution in client.list_workflows(query)]
    return found


async def pass_access_token(page: Page, ui: TemporalWithUi, settings: Settings) -> None:
    """Send the codec server a token with the `codec` scope, as the Web UI does for a user
    logged in to it (`TEMPORAL_CODEC_PASS_ACCESS_TOKEN`, over HTTPS); the dev server's UI has
    no login, so the test adds the header the UI would."""
    headers = auth_headers(settings, Scope.CODEC)

    async def with_token(route: Route) -> None:
        await route.continue_(headers={**route.request.headers, **headers})

    await page.route(f"{ui.api_url}/codec/**", with_token)


async def test_the_web_ui_shows_the_workflow_its_summary_and_its_activities(
    ui_api: httpx.AsyncClient,
    ui_client: Client,
    ui_settings: Settings,
    page: Page,
    temporal_with_ui: TemporalWithUi,
    resource_id: str,
    record_property: Callable[[str, object], None],
) -> None:
    """Everything the UI shows of an upsert but ids and search attributes is encrypted: the
    summaries, the input and the result are readable through the codec server only."""
    await pass_access_token(page, temporal_with_ui, ui_settings)
    created = await ui_api.put(f"/resources/{resource_id}", json=EXAMPLE)
    assert created.status_code == 201, created.text
    done = await wait_for_etl(ui_api, resource_id, version=1)
    assert done["etl"]["status"] == "succeeded", done
    workflow_id = done["etl"]["workflow_id"]
    ui_url = done["etl"]["ui_url"]
    assert ui_url.startswith(f"{temporal_with_ui.ui_url}/namespaces/default/workflows/"), ui_url
    query = f'ResourceId="{resource_id}"'
    assert await wait_until_listed(ui_client, query) == [workflow_id]
    screens = Screens(record_property)

    # 1. The workflows list, filtered by the resource's search attribute.
    await page.goto(
        f"{temporal_with_ui.ui_url}/namespaces/default/workflows?query={quote(query, safe='')}"
    )
    row = page.locator("tr", has=page.get_by_role("link", name=workflow_id, exact=True))
    await screens.expect_visible(page, row, "1-workflows-list", f"the workflow {workflow_id}")
    await screens.expect_visible(
        page, row.get_by_text("Completed", exact=False), "1-workflows-list", "its status"
    )
    shot = await screens.take(page, "1-workflows-list")
    rows = page.locator("tbody tr")
    assert await rows.count() == 1, f"the query {query} lists other workflows too; see {shot}"

    # 2. Its page, from the list as a person would open it: the summary in its metadata.
    await row.get_by_role("link", name=workflow_id, exact=True).click()
    await page.get_by_role("tab", name="User Metadata").click()
    # The UI renders the summary (markdown) in an iframe, the first of the tab.
    summary = page.frame_locator("iframe").first.get_by_text(f"Upsert {resource_id}", exact=True)
    await screens.expect_visible(page, summary, "2-workflow-summary", "the summary")
    shot = await screens.take(page, "2-workflow-summary")
    assert f"/workflows/{quote(workflow_id, safe='')}/" in page.url, f"{page.url}; see {shot}"

    # 3. The API's deep link: the run's event history with its input and result, decoded,
    # then one line per activity.
    await page.goto(ui_url)
    for decoded in (f'"resource_id": "{resource_id}"', '"status": "succeeded"'):
        await screens.expect_text(page, decoded, "3-history-decoded", "the decoded result")
    await screens.take(page, "3-history-decoded")
    await page.get_by_role("button", name="Compact").click()
    for step in ("normalize", "enrich", "load"):
        activity = page.get_by_text(f"{step} {resource_id} v1", exact=True)
        await screens.expect_visible(
            page, activity, "3-history-activities", f"the summary of the {step} activity"
        )
    await screens.take(page, "3-history-activities")


@pytest.mark.parametrize("temporal_with_ui", ["no codec"], indirect=True)
async def test_without_the_codec_the_web_ui_shows_encrypted_payloads(
    ui_api: httpx.AsyncClient,
    page: Page,
    temporal_with_ui: TemporalWithUi,
    resource_id: str,
    record_property: Callable[[str, object], None],
) -> None:
    """A Web UI without the codec server shows what Temporal stores: ciphertext."""
    assert not temporal_with_ui.codec
    created = await ui_api.put(f"/resources/{resource_id}", json=EXAMPLE)
    assert created.status_code == 201, created.text
    done = await wait_for_etl(ui_api, resource_id, version=1)
    assert done["etl"]["status"] == "succeeded", done
    screens = Screens(record_property)

    # The history as JSON: its payloads as stored, the metadata base64 as in the API.
    await page.goto(done["etl"]["ui_url"])
    await page.get_by_role("button", name="JSON").click()
    for stored in (
        f'"encoding": "{base64.b64encode(b"binary/encrypted").decode()}"',
        f'"encryption-key-id": "{base64.b64encode(b"test").decode()}"',
    ):
        await screens.expect_text(page, stored, "4-no-codec-encrypted", "an encrypted payload")
    shot = await screens.take(page, "4-no-codec-encrypted")
    # Nothing decoded anywhere: the input, the result, the summaries are ciphertext.
    await page.get_by_role("button", name="All").click()
    await screens.expect_visible(
        page, page.get_by_text("Result", exact=True).first, "4-no-codec-result", "the result"
    )
    text = await page.inner_text("body")
    for clear in ('"pipeline_version"', f"Upsert {resource_id}", f"normalize {resource_id}"):
        assert clear not in text, f"{clear} shown without the codec; see {shot}"


async def test_the_temporal_cli_decodes_through_the_codec_server(
    ui_api: httpx.AsyncClient,
    ui_settings: Settings,
    temporal_with_ui: TemporalWithUi,
    resource_id: str,
) -> None:
    """`temporal workflow show --codec-endpoint … --codec-auth …`, as an engineer runs it."""
    created = await ui_api.put(f"/resources/{resource_id}", json=EXAMPLE)
    done = await wait_for_etl(ui_api, resource_id, version=1)
    assert done["etl"]["status"] == "succeeded", done
    workflow_id = created.json()["etl"]["workflow_id"]
    show = ["workflow", "show", "-w", workflow_id, "-o", "json"]
    show += ["--address", temporal_with_ui.address]
    codec = ["--codec-endpoint", f"{temporal_with_ui.api_url}/codec"]
    codec += ["--codec-auth", auth_headers(ui_settings, Scope.CODEC)["Authorization"]]

    def payload_data(*options: str) -> str:
        done = subprocess.run(
            [venv_binary("temporal"), *show, *options],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        started = json.loads(done.stdout)["events"][0]["workflowExecutionStartedEventAttributes"]
        return base64.b64decode(started["input"]["payloads"][0]["data"]).decode("utf-8", "replace")

    assert f'"resource_id":"{resource_id}"' in await asyncio.to_thread(payload_data, *codec)
    assert resource_id not in await asyncio.to_thread(payload_data)
