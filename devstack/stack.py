"""The dev stack: everything `make dev` runs, also for the benchmark and the multi-process tests.

In start order: PostgreSQL and the Temporal dev server (each unless an external one
is given), the migrations, the local enrichment service (unless one is given), N
workers (a version of the Worker Deployment, made its current version once they poll)
and M API processes; then it waits until every API is ready. `stop()` stops
them in reverse order. Every part is a `Child` that can be killed, stopped and
started again on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
from pydantic import SecretStr
from temporalio.common import WorkerDeploymentVersion

from api.security import Scope
from api.tokens import SIGNING_KEY_FILE, ensure_signing_key, mint
from devstack import codec, cpu
from devstack.processes import (
    REPO_ROOT,
    SERVER_GRACE_SECONDS,
    Child,
    Processes,
    check_port_free,
    free_port,
    log,
    venv_binary,
)
from devstack.servers import EmbeddedPostgres, TemporalDevServer, migrate
from upsertflow import versioning
from upsertflow.settings import Auth, Codec, Settings, Worker

#: What an isolated stack's children never inherit from this process's environment.
SETTINGS_PREFIXES = ("TEMPORAL_", "UPSERTFLOW_", "ENRICHMENT_")


@dataclass(frozen=True)
class StackConfig:
    """What the stack runs, and where. A port 0 is a free port, chosen when the stack is made."""

    #: Data and logs; None: a temporary directory, deleted by `stop()`.
    root: Path | None = None
    #: Given: use this PostgreSQL, Temporal or enrichment service instead of starting one.
    database_url: str | None = None
    temporal_address: str | None = None
    enrichment_url: str | None = None
    temporal_port: int = 0
    #: None: the dev server runs without its Web UI.
    temporal_ui_port: int | None = 0
    #: `KEY=VALUE` dynamic config values for the dev server.
    temporal_dynamic_config: Sequence[str] = ()
    enrichment_port: int = 0
    workers: int = 1
    #: One API process per port.
    api_ports: Sequence[int] = (0,)
    api_host: str = "127.0.0.1"
    #: Settings for the children (`UPSERTFLOW_*`, `TEMPORAL_*`), over the environment.
    env: Mapping[str, str] = field(default_factory=dict)
    #: True (`make dev`): the children see this process's whole environment, run in its
    #: directory (so they read its `.env`) and write to its terminal; only the Temporal dev
    #: server writes to `root/temporal.log`. False: they see no `TEMPORAL_*`, `UPSERTFLOW_*`,
    #: `ENRICHMENT_*` or `DATABASE_URL` but what the stack and `env` set, run in `root` and
    #: write to `root/logs/`.
    shell: bool = False
    #: How long an enrichment, worker or API process may take to stop before it is killed;
    #: None: the worker's graceful shutdown (from `env`) and 5 s.
    app_grace: float | None = None


class Stack(Processes):
    """The processes of `make dev`, started in order and stopped in reverse order."""

    def __init__(self, config: StackConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or StackConfig()
        self._temporary = config.root is None
        self.root = (
            config.root.resolve()
            if config.root is not None
            else Path(tempfile.mkdtemp(prefix="upsertflow-stack-"))
        )
        self.env = self._environment()
        #: How the APIs verify tokens: a local signing key unless auth is configured.
        self.auth = self._auth()
        #: The Worker Deployment version the workers run as (None: unversioned workers);
        #: `start()` makes it the deployment's current version.
        self.worker_version = self._worker_version()
        self.api_ports = [port or free_port() for port in config.api_ports]
        self._postgres: EmbeddedPostgres | None = None
        self._temporal: TemporalDevServer | None = None
        self._enrichment: Child | None = None
        self._codec_key_file: Path | None = None
        if config.database_url is None:
            self._postgres = EmbeddedPostgres(self.root / "postgres", self.env)
        if config.temporal_address is None:
            ui_port = config.temporal_ui_port
            self._temporal = TemporalDevServer(
                db_file=self.root / "temporal.sqlite",
                port=config.temporal_port or free_port(),
                ui_port=None if ui_port is None else ui_port or free_port(),
                env=self.env,
                log_path=self.root / "temporal.log" if config.shell else self._log("temporal"),
                dynamic_config=config.temporal_dynamic_config,
                codec_endpoint=codec.codec_endpoint(self.api_urls[0]) if self.api_urls else None,
            )
            self.env["TEMPORAL_ADDRESS"] = self._temporal.address
            if self._temporal.ui_url:
                self.env["UPSERTFLOW_TEMPORAL_UI_URL"] = self._temporal.ui_url
        #: The payload encryption of the workers and APIs, for clients of this process.
        self.codec = self._codec()
        if config.enrichment_url is None:
            port = config.enrichment_port or free_port()
            self._enrichment = enrichment_service(
                port,
                self.env,
                log_path=self._log("enrichment-service"),
                cwd=self._cwd,
                grace=self._app_grace(),
            )
            self.env.setdefault("UPSERTFLOW_ENRICHMENT__URL", f"http://127.0.0.1:{port}")
        self.workers = [
            self._app(name, ["worker"], [], self._worker_overrides(n), ready_log="worker started")
            for n, name in enumerate(_names("worker", config.workers))
        ]
        self.apis = [
            self._app(name, ["api"], *self._api_listeners(n, port))
            for n, (name, port) in enumerate(
                zip(_names("api", len(self.api_ports)), self.api_ports, strict=True)
            )
        ]

    # --- the parts --------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        config = self.config
        if config.shell:
            env = dict(os.environ)
        else:
            env = {
                key: value
                for key, value in os.environ.items()
                if not key.startswith(SETTINGS_PREFIXES) and key != "DATABASE_URL"
            }
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
            )
        env["PYTHONUNBUFFERED"] = "1"
        # Cache bytecode as an installed package has it (pip compiles it): the workflow
        # sandbox imports the workflow's module afresh for every workflow run, and without
        # a cache compiles it from source every time.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env.update(config.env)
        if config.database_url is not None:
            env["DATABASE_URL"] = config.database_url
        if config.temporal_address is not None:
            env["TEMPORAL_ADDRESS"] = config.temporal_address
        if config.enrichment_url is not None:
            env["UPSERTFLOW_ENRICHMENT__URL"] = config.enrichment_url
        return env

    def _codec(self) -> Codec:
        """Encryption on, with a local key unless keys are configured; the UI's origins allowed.

        The children read what this process reads in the shell (its environment and `.env`),
        and only the stack's environment otherwise.
        """
        configured = Settings().codec if self.config.shell else codec.codec_from_env(self.env)
        if not codec.has_keys(configured):
            self._codec_key_file = self.root / "codec-keys"
            self.env[codec.KEYS_FILE] = str(self._codec_key_file)
            configured = configured.model_copy(update={"keys_file": self._codec_key_file})
        if self._temporal is not None and self._temporal.ui_url:
            ui_origins = codec.ui_origins(self._temporal.ui_url)
            origins = codec.with_origins(configured.cors_origins, ui_origins)
            if origins != configured.cors_origins:
                self.env[codec.CORS_ORIGINS] = json.dumps(origins)
                configured = configured.model_copy(update={"cors_origins": origins})
        return configured

    def _auth(self) -> Auth:
        """Tokens signed with a local key (kept in `root`), unless auth is configured."""
        if self.config.shell:
            auth = Settings().auth
        else:
            prefix = "UPSERTFLOW_AUTH__"
            given = {
                k[len(prefix) :].lower(): v for k, v in self.env.items() if k.startswith(prefix)
            }
            auth = Auth.model_validate(given)
        if auth.disabled or auth.jwks_url or auth.signing_key.get_secret_value():
            return auth
        key = ensure_signing_key(self.root / SIGNING_KEY_FILE)
        self.env["UPSERTFLOW_AUTH__SIGNING_KEY"] = key
        return auth.model_copy(update={"signing_key": SecretStr(key)})

    def _worker_version(self) -> WorkerDeploymentVersion | None:
        """The workers' version, its build id fixed here so that the stack and they agree."""
        if self.config.shell:
            worker = Settings().worker
        else:
            prefix = "UPSERTFLOW_WORKER__"
            given = {
                k[len(prefix) :].lower(): v for k, v in self.env.items() if k.startswith(prefix)
            }
            worker = Worker.model_validate(given)
        version = versioning.deployment_version(worker)
        if version is not None:
            self.env["UPSERTFLOW_WORKER__BUILD_ID"] = version.build_id
        return version

    def make_workers_current(self, timeout: float = 30.0) -> None:
        """Make the workers' version current, once they have polled: new upserts go to them.

        `temporal worker deployment set-current-version`, as an operator runs it, on the
        stack's Temporal (the CLI reads the same `TEMPORAL_*` variables as the workers).
        """
        version = self.worker_version
        if version is None:
            return
        command = [
            venv_binary("temporal"),
            *("worker", "deployment", "set-current-version", "--yes"),
            *("--deployment-name", version.deployment_name, "--build-id", version.build_id),
        ]
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(command, env=self.env, capture_output=True, text=True)
            if done.returncode == 0:
                log.info("worker version %s is current", version.build_id)
                return
            # Until a worker of the version has polled, the server does not know it.
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"could not make {version} current: {done.stderr or done.stdout}"
                )
            self.check_alive()
            time.sleep(0.2)

    def token(self, *scopes: str, subject: str = "devstack", ttl: float = 3600) -> str:
        """A token the stack's APIs accept: every scope unless `scopes` are given."""
        return mint(self.auth, subject=subject, ttl=ttl, scopes=scopes or tuple(Scope))

    def auth_headers(self, *scopes: str, subject: str = "devstack") -> dict[str, str]:
        """`Authorization: Bearer <token>` for the stack's APIs (see `token`)."""
        return {"Authorization": f"Bearer {self.token(*scopes, subject=subject)}"}

    def _log(self, slug: str) -> Path | None:
        return None if self.config.shell else self.root / "logs" / f"{slug}.log"

    def _app(
        self,
        name: str,
        module: list[str],
        ports: list[tuple[str, int]],
        overrides: Mapping[str, str] | None = None,
        ready_log: str | None = None,
    ) -> Child:
        """`python -m <module>` as a child of the stack."""
        return Child(
            name,
            [sys.executable, "-m", *module],
            self.env,
            overrides=overrides,
            ports=ports,
            ready_log=ready_log,
            log_path=self._log(name.replace(" ", "-")),
            cwd=self._cwd,
            grace=self._app_grace(),
        )

    @property
    def _cwd(self) -> Path | None:
        return None if self.config.shell else self.root

    def _app_grace(self) -> float:
        if self.config.app_grace is not None:
            return self.config.app_grace
        default = Worker().graceful_shutdown_seconds
        return float(self.env.get("UPSERTFLOW_WORKER__GRACEFUL_SHUTDOWN_SECONDS", default)) + 5

    def _api_listeners(self, n: int, port: int) -> tuple[list[tuple[str, int]], dict[str, str]]:
        """The `n`th API's ports and settings: its port, and its own metrics port, if any."""
        host = self.config.api_host
        overrides = {"UPSERTFLOW_API__HOST": host, "UPSERTFLOW_API__PORT": str(port)}
        ports = [(host, port)]
        metrics = int(self.env.get("UPSERTFLOW_API__METRICS_PORT") or 0)
        if metrics:
            overrides["UPSERTFLOW_API__METRICS_PORT"] = str(metrics + n)
            ports.append((host, metrics + n))
        return ports, overrides

    def _worker_overrides(self, n: int) -> dict[str, str]:
        """Each worker its own metrics port, if they serve metrics."""
        port = int(self.env.get("UPSERTFLOW_WORKER__METRICS_PORT") or 0)
        return {"UPSERTFLOW_WORKER__METRICS_PORT": str(port + n)} if port else {}

    @property
    def parts(self) -> list[Child]:
        """Every child of the stack, in start order, started or not."""
        servers: list[Child | None] = [self._postgres, self._temporal, self._enrichment]
        return [child for child in servers if child is not None] + self.workers + self.apis

    @property
    def postgres(self) -> EmbeddedPostgres:
        if self._postgres is None:
            raise LookupError("this stack uses an external PostgreSQL")
        return self._postgres

    @property
    def temporal(self) -> TemporalDevServer:
        if self._temporal is None:
            raise LookupError("this stack uses an external Temporal")
        return self._temporal

    @property
    def enrichment(self) -> Child:
        if self._enrichment is None:
            raise LookupError("this stack uses an external enrichment service")
        return self._enrichment

    @property
    def worker(self) -> Child:
        """The first worker."""
        return self.workers[0]

    @property
    def api(self) -> Child:
        """The first API process."""
        return self.apis[0]

    # --- where they are ---------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """PostgreSQL's URL ("" until the embedded server has started)."""
        return self.env.get("DATABASE_URL", "")

    @property
    def temporal_address(self) -> str:
        return self.env["TEMPORAL_ADDRESS"]

    @property
    def temporal_ui_url(self) -> str | None:
        return self.env.get("UPSERTFLOW_TEMPORAL_UI_URL")

    @property
    def enrichment_url(self) -> str:
        return self.env["UPSERTFLOW_ENRICHMENT__URL"]

    @property
    def api_urls(self) -> list[str]:
        return [f"http://{self.config.api_host}:{port}" for port in self.api_ports]

    @property
    def api_url(self) -> str:
        """The first API process's URL."""
        return self.api_urls[0]

    def pids(self) -> dict[str, int]:
        """The pid of every running child, by name."""
        return {child.name: pid for child in self.children if (pid := child.pid) is not None}

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each child, with its subprocesses, by name."""
        return cpu.cpu_seconds(self.pids())

    def tails(self, chars: int = 4000) -> str:
        """The end of every worker's and API process's log, for failure messages."""
        return "\n".join(
            f"=== {child.name} ===\n{child.tail(chars)}" for child in self.workers + self.apis
        )

    # --- start and stop ---------------------------------------------------------------------

    def start(self, stopping: threading.Event | None = None) -> None:
        """Start every part in order, each once the one before serves, until the APIs are ready.

        Return early, leaving the rest unstarted, once `stopping` is set.
        """

        def stopped() -> bool:
            return stopping is not None and stopping.is_set()

        self.root.mkdir(parents=True, exist_ok=True)
        for child in self.parts:
            for host, port in child.ports:
                check_port_free(host, port, child.name)
        if self._postgres is not None and not stopped():
            self.start_child(self._postgres)
            log.info("embedded PostgreSQL ready in %s", self._postgres.data_dir)
        if self._temporal is not None and not stopped():
            self.start_child(self._temporal)
            log.info("Temporal dev server ready at %s", self._temporal.address)
        if stopped():
            return
        if self._codec_key_file is not None:
            codec.make_key_file(self._codec_key_file)
        migrate(self.database_url)
        for child in self.parts:
            if child in self.children:
                continue
            if stopped():
                return
            self.start_child(child)
            if self.workers and child is self.workers[-1]:
                self.make_workers_current()
        self.wait_ready(stopping=stopping)

    def wait_ready(self, timeout: float = 60.0, stopping: threading.Event | None = None) -> None:
        """Wait until every API answers `GET /readyz` with 200 (PostgreSQL and Temporal up)."""
        pending = list(self.api_urls)
        deadline = time.monotonic() + timeout
        while not (stopping is not None and stopping.is_set()):
            self.check_alive()
            pending = [url for url in pending if not _ready(url)]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pending} not ready after {timeout} s:\n{self.tails()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop every child, the last started first; delete the data of a temporary stack."""
        try:
            super().stop()
        finally:
            if self._temporary:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def enrichment_service(
    port: int,
    env: dict[str, str],
    *,
    log_path: Path | None = None,
    cwd: Path | None = None,
    grace: float = SERVER_GRACE_SECONDS,
) -> Child:
    """The local enrichment service, on 127.0.0.1:`port`, in test mode (faults on demand)."""
    return Child(
        "enrichment service",
        [sys.executable, "-m", "enrichment_service", "--port", str(port), "--test-mode"],
        env,
        ports=[("127.0.0.1", port)],
        log_path=log_path,
        cwd=cwd,
        grace=grace,
    )


def _names(kind: str, count: int) -> list[str]:
    """`worker` for one, `worker 1` … `worker N` for more."""
    return [kind] if count == 1 else [f"{kind} {n}" for n in range(1, count + 1)]


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
