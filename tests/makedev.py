"""`make dev` (`python -m devstack`) in a subprocess, as the end-to-end tests drive it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import SecretStr

from api.tokens import SIGNING_KEY_FILE, mint, read_signing_key
from devstack import REPO_ROOT, free_port, postmaster_pid
from devstack.procfs import command_line, parent, pids
from tests.helpers import eventually_sync
from upsertflow.settings import Auth

T = TypeVar("T")

#: What identifies each supervised child in its command line.
CHILDREN = {
    "enrichment service": "-m\0enrichment_service",
    "worker": "-m\0worker",
    "api": "-m\0api",
    "Temporal dev server": "start-dev",
}


class MakeDev:
    """`make dev` in a subprocess, on free ports and a folder of its own, kept until `close()`.

    The folder is not under pytest's temporary directory: as root, PostgreSQL runs as the
    user `pgserver`, who must traverse every parent folder, and every pytest session that
    starts makes /tmp/pytest-of-<user> private again. It is the working directory too, so
    no `.env` of the checkout is read.
    """

    def __init__(self, **settings: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="upsertflow-make-dev-"))
        self.data_dir = self.root / "data"
        self.api_port = free_port()
        self.enrichment_port = free_port()
        self.temporal_port = free_port()
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("TEMPORAL_", "UPSERTFLOW_", "ENRICHMENT_"))
            and key != "DATABASE_URL"
        }
        self.env.update(
            PYTHONUNBUFFERED="1",
            PYTHONPATH=str(REPO_ROOT),
            UPSERTFLOW_DEV__DATA_DIR=str(self.data_dir),
            UPSERTFLOW_API__PORT=str(self.api_port),
            UPSERTFLOW_DEV__TEMPORAL_PORT=str(self.temporal_port),
            UPSERTFLOW_DEV__TEMPORAL_UI_PORT=str(free_port()),
            UPSERTFLOW_DEV__ENRICHMENT_PORT=str(self.enrichment_port),
            **settings,
        )
        self.log_path = self.root / "dev.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        #: Every child pid seen, with its command line: all must be gone at the end.
        self.seen: dict[int, bytes] = {}
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.api = httpx.Client(base_url=self.url, timeout=10)
        self.enrichment = httpx.Client(
            base_url=f"http://127.0.0.1:{self.enrichment_port}", timeout=10
        )

    def start(self, within: float = 90.0) -> None:
        """Start it and wait until it printed its banner and the API is ready."""
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "devstack"],
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool | None:
            assert self.process is not None and self.process.poll() is None, (
                f"make dev exited:\n{self.log()[-5000:]}"
            )
            running = "upsertflow is running" in self.log()[self._log_offset :]
            return True if running and self.api_ready() else None

        eventually_sync(ready, "the stack to start", within, 0.2)
        self.api.headers.update(self.auth_headers())
        self.children()

    def auth_headers(self) -> dict[str, str]:
        """`Authorization: Bearer <token>` with every scope, signed with the key `make dev` made."""
        key = read_signing_key(self.data_dir / SIGNING_KEY_FILE)
        return {"Authorization": f"Bearer {mint(Auth(signing_key=SecretStr(key)))}"}

    def api_ready(self) -> bool:
        try:
            return self.api.get("/readyz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def enrichment_ready(self) -> bool | None:
        try:
            return True if self.enrichment.get("/healthz", timeout=2).status_code == 200 else None
        except httpx.TransportError:
            return None

    def children(self) -> dict[str, int]:
        """The supervised children running now, by name (PostgreSQL runs detached)."""
        assert self.process is not None
        found: dict[str, int] = {}
        for pid in pids():
            if parent(pid) != self.process.pid:
                continue
            command = command_line(pid)
            for name, marker in CHILDREN.items():
                if marker.encode() in command:
                    found[name] = pid
                    self.seen[pid] = command
        if (postmaster := postmaster_pid(self.data_dir / "postgres")) is not None:
            found["PostgreSQL"] = postmaster
            self.seen[postmaster] = command_line(postmaster)
        return found

    def kill(self, name: str) -> int:
        """SIGKILL one child; return its pid."""
        pid = self.children()[name]
        os.kill(pid, signal.SIGKILL)
        return pid

    def restarted(self, name: str, old_pid: int, within: float = 15.0) -> int:
        """Wait until `name` runs again under a new pid and the supervisor logged it."""

        def probe() -> int | None:
            pid = self.children().get(name)
            if pid is None or pid == old_pid:
                return None
            return pid if f"{name} restarted (pid {pid}, restart #" in self.log() else None

        try:
            return eventually_sync(probe, f"{name} to be restarted", within)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM, within: float = 60.0) -> int:
        """Stop it with `signum` (SIGTERM as a process manager, SIGINT as Ctrl-C); return the
        exit code."""
        process, self.process = self.process, None
        if process is None:
            return 0
        process.send_signal(signum)
        try:
            return process.wait(within)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(
                f"make dev did not stop on {signal.Signals(signum).name}:\n{self.log()[-5000:]}"
            ) from None

    def leftovers(self) -> list[int]:
        """Children seen that still run (same pid, same command line)."""
        return [
            pid for pid, command in self.seen.items() if command and command_line(pid) == command
        ]

    def close(self) -> None:
        """Stop everything it started, whatever state the test left it in."""
        try:
            self.stop()
        finally:
            for pid in self.leftovers():
                os.kill(pid, signal.SIGKILL)
            self.api.close()
            self.enrichment.close()
            shutil.rmtree(self.root, ignore_errors=True)
