"""The stack of `make dev`, on free ports and a temporary directory, for one benchmark run.

An embedded PostgreSQL migrated with Alembic, the Temporal dev server on a SQLite
file in WAL mode, the local enrichment service, one worker and the API, each a
subprocess in its own process group; `stop()` ends them all, the API first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from upsertflow.embedded import (
    EmbeddedPostgres,
    TemporalDevServer,
    migrate,
    stop_process,
    wait_for_port,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Stack:
    """Everything `make dev` runs, started in order and stopped in reverse order."""

    task_queue = "bench-upsertflow"

    def __init__(self, root: Path, dynamic_config: Sequence[str] = ()) -> None:
        self.root = root
        self.dynamic_config = dynamic_config
        self.logs = root / "logs"
        self.api_port = free_port()
        self.postgres = EmbeddedPostgres(root / "postgres", delete_on_stop=True)
        self.temporal: TemporalDevServer | None = None
        self._temporal_log: IO[bytes] | None = None
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.database_url = ""

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def temporal_address(self) -> str:
        assert self.temporal is not None
        return self.temporal.address

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.database_url = self.postgres.start()
        self._temporal_log = (self.logs / "temporal.log").open("ab")
        self.temporal = _DevServer(
            self.dynamic_config,
            db_file=self.root / "temporal.sqlite",
            port=free_port(),
            ui_port=free_port(),
            log_file=self._temporal_log,
        )
        self.temporal.start()
        enrichment_port = free_port()
        # The children see only what this run sets: no DATABASE_URL, TEMPORAL_* or
        # UPSERTFLOW_* from the shell (a `.env` is not read: the children run in `root`).
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("TEMPORAL_", "UPSERTFLOW_")) and key != "DATABASE_URL"
        }
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(REPO_ROOT),
            DATABASE_URL=self.database_url,
            TEMPORAL_ADDRESS=self.temporal_address,
            UPSERTFLOW_TASK_QUEUE=self.task_queue,
            UPSERTFLOW_ENRICHMENT__URL=f"http://127.0.0.1:{enrichment_port}",
            UPSERTFLOW_API_PORT=str(self.api_port),
        )
        migrate(env)
        enrichment = self._spawn(
            "enrichment", ["-m", "enrichment_service", "--port", str(enrichment_port)], env
        )
        wait_for_port("127.0.0.1", enrichment_port, 30, enrichment)
        self._spawn("worker", ["-m", "worker"], env)
        api = self._spawn("api", ["-m", "api"], env)
        wait_for_port("127.0.0.1", self.api_port, 30, api)
        self._wait_ready()

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, *args],
                env=env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                process_group=0,  # Ctrl-C reaches only the benchmark, which stops them in order
            )
        self.children.append((name, process))
        return process

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(f"{self.api_url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the API was not ready after {timeout} s")

    def check_alive(self) -> None:
        """Raise if a child has exited."""
        for name, process in self.children:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}: {self.tail(name)}")

    def tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used so far by each server and child (with its subprocesses) and by us."""
        stats = {pid: stat for pid in _pids() if (stat := _stat(pid)) is not None}
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in stats.items():
            children.setdefault(ppid, []).append(pid)

        def tree(pid: int) -> float:
            return stats.get(pid, (0, 0.0))[1] + sum(tree(child) for child in children.get(pid, []))

        assert self.temporal is not None and self.temporal.pid is not None
        roots = {"Temporal dev server": self.temporal.pid}
        if (postmaster := _postmaster_pid(self.postgres.data_dir)) is not None:
            roots["PostgreSQL"] = postmaster
        roots.update((name, process.pid) for name, process in self.children)
        result = {name: tree(pid) for name, pid in roots.items()}
        own = os.times()
        result["benchmark (client, baseline worker)"] = own.user + own.system
        return result

    def stop(self, grace: float = 40.0) -> None:
        """Stop the children (API first), then Temporal, then PostgreSQL; kill what lingers."""
        while self.children:
            _name, process = self.children.pop()
            stop_process(process, grace)
        if self.temporal is not None:
            self.temporal.stop()
            self.temporal = None
        if self._temporal_log is not None:
            self._temporal_log.close()
            self._temporal_log = None
        self.postgres.stop()
        # Interrupted while it started, the server runs without a handle: stop it by its pid.
        if (postmaster := _postmaster_pid(self.postgres.data_dir)) is not None:
            _stop_pid(postmaster, signal.SIGINT)  # PostgreSQL's fast shutdown


class _DevServer(TemporalDevServer):
    """The dev server of `make dev`, with `--dynamic-config-value KEY=VALUE` options if asked."""

    def __init__(self, dynamic_config: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dynamic_config = dynamic_config

    def command(self) -> list[str]:
        extra = [arg for value in self.dynamic_config for arg in ("--dynamic-config-value", value)]
        return [*super().command(), *extra]


def _postmaster_pid(data_dir: Path) -> int | None:
    """The pid of the PostgreSQL server running on `data_dir`, if one does."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return pid if str(data_dir).encode() in command else None  # not a stale file's pid


def _stop_pid(pid: int, signum: int, timeout: float = 10.0) -> None:
    """Signal a process that is not our child, wait until it is gone, kill it if it lingers."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.1)


def _alive(pid: int) -> bool:
    """Whether the process exists and is no zombie (whose parent, not us, has to reap it)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return raw[raw.rindex(")") + 2] != "Z"


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _stat(pid: int) -> tuple[int, float] | None:
    """A process's parent and CPU seconds, its own and its waited-for children's."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # from the third field, `state`, on
    utime, stime, cutime, cstime = (int(value) for value in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")
