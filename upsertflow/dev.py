"""`upsertflow-dev` (`make dev`): the whole stack on one machine, supervised.

Starts what is not configured externally — PostgreSQL unless `DATABASE_URL` is
set, the Temporal dev server unless `TEMPORAL_ADDRESS` is set — then applies the
migrations and runs the local enrichment service, one worker and the API. Data
stays under `UPSERTFLOW_DATA_DIR` (`.data/`) across runs.

Every part is supervised: one that dies (a crash, `kill -9`, the OOM killer) is
started again after a backoff — 0.5 s, doubling on each quick crash up to 30 s,
back to 0.5 s once it has stayed up for 60 s — while the rest keeps running. Each
crash and each restart is one log line naming the process, how it ended and when
it comes back. The embedded PostgreSQL and Temporal dev server are restarted the
same way, on the data they keep on disk; the worker and the API reconnect to them
by themselves. SIGUSR1 logs the status of every part.

Ctrl-C or SIGTERM stops everything, the API first and the servers last, also while
a part waits to be restarted. The exit code is 0 then, and 1 if the stack could not
start.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from upsertflow.embedded import (
    EmbeddedPostgres,
    TemporalDevServer,
    child_env,
    migrate,
    stop_process,
    wait_for_port,
)
from upsertflow.logs import configure_logging
from upsertflow.settings import Settings, get_settings

log = logging.getLogger("upsertflow.dev")

#: How often the supervisor looks at its children (and at most how long a stop waits).
TICK_SECONDS = 0.2
#: How long a part may take to start the first time.
START_TIMEOUT_SECONDS = 30.0
#: Grace of the Temporal dev server and PostgreSQL on stop, as before supervision.
SERVER_GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff between restarts, forgotten once a child has stayed up a while."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    reset_after: float = 60.0

    def next_delay(self, previous: float | None, uptime: float) -> float:
        """The wait before restarting a child that died after `uptime` seconds.

        `previous` is the wait before its last restart, None if it never restarted.
        """
        if previous is None or uptime >= self.reset_after:
            return self.initial
        return min(previous * self.factor, self.maximum)


def describe_exit(returncode: int) -> str:
    """`exited with code 1`, `was killed by SIGKILL (exit code -9)`."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name} (exit code {returncode})"


class Child:
    """A supervised process: started, watched, restarted after it dies, stopped."""

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        *,
        ports: tuple[tuple[str, int], ...] = (),
        output: IO[bytes] | None = None,
        grace: float = SERVER_GRACE_SECONDS,
        policy: RestartPolicy | None = None,
    ) -> None:
        self.name = name
        self.args = args
        #: Shared with the other children and read at every (re)start.
        self.env = env
        self.ports = ports
        self.output = output
        self.grace = grace
        self.policy = policy or RestartPolicy()
        self.process: subprocess.Popen[bytes] | None = None
        #: Restarts so far (attempts, successful or not).
        self.restarts = 0
        #: The pid of its current or last process, for the log.
        self.last_pid: int | None = None
        self.started_at = 0.0
        #: The wait before the last restart; None until the first crash.
        self.delay: float | None = None
        #: When the next restart is due; None unless the child waits to be restarted.
        self.restart_at: float | None = None
        #: Whether it has answered on its ports since it was last started.
        self.ready = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def launch(self) -> None:
        """Start the process, without waiting for it to serve."""
        # Own process group: Ctrl-C reaches only the supervisor, which stops children in order.
        self.process = subprocess.Popen(
            self.args,
            env=self.env,
            stdout=self.output,
            stderr=subprocess.STDOUT if self.output is not None else None,
            process_group=0,
        )

    def exit_status(self) -> str | None:
        """None while it runs; otherwise how it ended."""
        if self.process is None:
            return "is not running"
        returncode = self.process.poll()
        return None if returncode is None else describe_exit(returncode)

    def wait_ready(self, timeout: float) -> None:
        """Wait until it listens on all its ports; raise if it exits first."""
        assert self.process is not None
        for host, port in self.ports:
            wait_for_port(host, port, timeout, self.process)

    def probe(self) -> bool:
        """Whether it listens on all its ports now (no waiting)."""
        for host, port in self.ports:
            try:
                with socket.create_connection((host, port), timeout=0.05):
                    pass
            except OSError:
                return False
        return True

    def stop(self) -> bool:
        """Stop it gracefully within its grace; False if it had to be killed."""
        process, self.process = self.process, None
        return process is None or stop_process(process, self.grace)


class PostgresChild(Child):
    """The embedded PostgreSQL: `pg_ctl` runs it detached, so it is watched by its pid."""

    def __init__(self, postgres: EmbeddedPostgres, env: dict[str, str]) -> None:
        super().__init__("PostgreSQL", [], env)
        self.postgres = postgres
        self._started = False

    @property
    def pid(self) -> int | None:
        return postmaster_pid(self.postgres.data_dir)

    def launch(self) -> None:
        """Start the server (blocking until it accepts connections) and publish its URL."""
        if not self._started:
            self.env["DATABASE_URL"] = self.postgres.start()
            self._started = True
            return
        self.postgres.resume()  # pg_ctl start on the same data: crash recovery, then ready
        if self.pid is None:
            # pgserver took the killed server's unreaped process for a running one.
            raise RuntimeError("the killed server has not been reaped yet")
        if (url := self.postgres.url) != self.env["DATABASE_URL"]:
            log.warning("PostgreSQL moved to %s; restart make dev if the API cannot reach it", url)
            self.env["DATABASE_URL"] = url

    def exit_status(self) -> str | None:
        return None if self.pid is not None else "is no longer running"

    def wait_ready(self, timeout: float) -> None:
        pass  # `launch` returns once the server is ready

    def probe(self) -> bool:
        return True

    def stop(self) -> bool:
        self.postgres.stop()
        # Interrupted while it started, the server may run without a handle: stop it by its pid.
        if (pid := postmaster_pid(self.postgres.data_dir)) is not None:
            os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
            deadline = time.monotonic() + SERVER_GRACE_SECONDS
            while postmaster_pid(self.postgres.data_dir) is not None:
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
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if str(data_dir).encode() in command else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # it runs, as another user
    return pid


class Supervisor:
    """Start children in order, restart the ones that die, stop them in reverse order."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.stopping = threading.Event()
        self.status_requested = threading.Event()

    def start(self, child: Child, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Start a child for the first time and wait until it serves; raise if it cannot."""
        self.children.append(child)  # before launching: stopped even if its start fails
        child.launch()
        child.started_at = time.monotonic()
        child.last_pid = child.pid
        log.info("started %s (pid %s)", child.name, child.pid)
        child.wait_ready(timeout)
        child.ready = True

    def tick(self) -> None:
        """Notice dead children, restart those whose backoff is over, note who serves again."""
        for child in self.children:
            if self.stopping.is_set():
                return
            now = time.monotonic()
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
            elif (status := child.exit_status()) is not None:
                self._died(child, status, now)
            elif not child.ready and child.probe():
                child.ready = True
                if child.ports:
                    log.info("%s is serving again (pid %s)", child.name, child.pid)

    def _died(self, child: Child, status: str, now: float) -> None:
        uptime = now - child.started_at
        child.delay = child.policy.next_delay(child.delay, uptime)
        child.restart_at = now + child.delay
        child.ready = False
        log.error(
            "%s (pid %s) %s after %.1f s up; restart #%d in %g s",
            child.name,
            child.last_pid,
            status,
            uptime,
            child.restarts + 1,
            child.delay,
        )

    def _restart(self, child: Child) -> None:
        child.restart_at = None
        child.restarts += 1
        child.started_at = time.monotonic()
        try:
            child.launch()
        except Exception as error:
            self._died(child, f"failed to restart ({error})", time.monotonic())
            return
        child.last_pid = child.pid
        log.warning(
            "%s restarted (pid %s, restart #%d); %s",
            child.name,
            child.pid,
            child.restarts,
            self.status_line(),
        )

    def next_wait(self) -> float:
        """How long the main loop may sleep before the next tick is due."""
        now = time.monotonic()
        due = [child.restart_at - now for child in self.children if child.restart_at is not None]
        return max(0.0, min([TICK_SECONDS, *due]))

    def status_line(self) -> str:
        """One line: each child up, starting or waiting to restart; its pid and restarts."""
        now = time.monotonic()
        parts = []
        for child in self.children:
            restarts = f"{child.restarts} restart{'' if child.restarts == 1 else 's'}"
            if child.restart_at is not None:
                wait = max(0.0, child.restart_at - now)
                parts.append(f"{child.name} down, restart in {wait:.1f} s ({restarts})")
            else:
                state = "up" if child.ready else "starting"
                details = f"pid {child.pid}" + (f", {restarts}" if child.restarts else "")
                parts.append(f"{child.name} {state} ({details})")
        return "status: " + "; ".join(parts)

    def run(self) -> None:
        """Supervise until Ctrl-C or SIGTERM."""
        while not self.stopping.wait(self.next_wait()):
            self.tick()
            if self.status_requested.is_set():
                self.status_requested.clear()
                log.info("%s", self.status_line())

    def stop_all(self) -> None:
        """Stop every child, the last started first; those waiting to restart stay down."""
        for child in reversed(self.children):
            waiting, child.restart_at = child.restart_at is not None, None
            if not child.stop():
                log.warning("%s did not stop within %.0f s; it was killed", child.name, child.grace)
            log.info("stopped %s%s", child.name, " (it was waiting to restart)" if waiting else "")


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
                "(UPSERTFLOW_API_PORT, UPSERTFLOW_DEV_*_PORT)."
            ) from None


def start_stack(settings: Settings, supervisor: Supervisor, output: list[IO[bytes]]) -> None:
    """Start every part in order, then print the banner; return early on Ctrl-C."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    env = child_env(PYTHONUNBUFFERED="1")
    app_grace = settings.worker_graceful_shutdown_seconds + 5
    enrichment_port = settings.dev_enrichment_port
    temporal: TemporalDevServer | None = None
    temporal_ports: list[tuple[str, int]] = []
    if not os.environ.get("TEMPORAL_ADDRESS"):
        temporal = TemporalDevServer(
            db_file=data_dir / "temporal.sqlite",
            port=settings.dev_temporal_port,
            ui_port=settings.dev_temporal_ui_port,
        )
        temporal_ports.append((temporal.ip, temporal.port))
        if temporal.ui_port:
            temporal_ports.append(("127.0.0.1", temporal.ui_port))
    for host, port in temporal_ports:
        check_port_free(host, port, "Temporal dev server")
    check_port_free("127.0.0.1", enrichment_port, "enrichment service")
    check_port_free(settings.api_host, settings.api_port, "API")

    if not settings.database_url:
        postgres = EmbeddedPostgres(data_dir / "postgres")
        supervisor.start(PostgresChild(postgres, env))
        log.info("embedded PostgreSQL ready in %s", postgres.data_dir)
    ui_url = settings.temporal_ui_url
    if temporal is not None and not supervisor.stopping.is_set():
        output.append((data_dir / "temporal.log").open("ab"))
        server = Child(
            "Temporal dev server",
            temporal.command(),
            env,
            ports=tuple(temporal_ports),
            output=output[-1],
        )
        supervisor.start(server)
        env["TEMPORAL_ADDRESS"] = temporal.address
        ui_url = temporal.ui_url or ui_url
        env["UPSERTFLOW_TEMPORAL_UI_URL"] = ui_url
        log.info("Temporal dev server ready at %s", temporal.address)
    if supervisor.stopping.is_set():
        return
    embedded = not settings.database_url or temporal is not None
    migrate(env)
    env.setdefault("UPSERTFLOW_ENRICHMENT__URL", f"http://127.0.0.1:{enrichment_port}")
    python = sys.executable
    children = [
        Child(
            "enrichment service",
            [python, "-m", "enrichment_service", "--port", str(enrichment_port)],
            env,
            ports=(("127.0.0.1", enrichment_port),),
            grace=app_grace,
        ),
        Child("worker", [python, "-m", "worker"], env, grace=app_grace),
        Child(
            "api",
            [python, "-m", "api"],
            env,
            ports=((settings.api_host, settings.api_port),),
            grace=app_grace,
        ),
    ]
    for child in children:
        if supervisor.stopping.is_set():
            return
        supervisor.start(child)
    api_url = f"http://{settings.api_host}:{settings.api_port}"
    policy = RestartPolicy()
    print(
        f"\n  upsertflow is running (supervisor pid {os.getpid()})\n"
        f"    API          {api_url}\n"
        f"    API docs     {api_url}/docs\n"
        f"    Temporal UI  {ui_url}\n"
        f"    Temporal     {env['TEMPORAL_ADDRESS']}\n"
        f"    Enrichment   {env['UPSERTFLOW_ENRICHMENT__URL']}\n"
        "    Processes    "
        + ", ".join(f"{child.name} {child.pid}" for child in supervisor.children)
        + "\n"
        f"  A process that dies is restarted (after {policy.initial:g} s, doubling up to "
        f"{policy.maximum:g} s); `kill -USR1 {os.getpid()}` logs their status.\n"
        "  Ctrl-C stops everything; the data stays in "
        f"{data_dir if embedded else 'your external services'}.\n",
        flush=True,
    )


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    supervisor = Supervisor()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        supervisor.stopping.set()

    def on_status(signum: int, _frame: FrameType | None) -> None:
        supervisor.status_requested.set()

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGUSR1, on_status)

    output: list[IO[bytes]] = []
    exit_code = 0
    try:
        try:
            start_stack(settings, supervisor, output)
        except Exception:
            log.exception("the stack failed to start")
            exit_code = 1
        else:
            supervisor.run()
    except Exception:
        log.exception("the supervisor failed; stopping everything")
        exit_code = 1
    finally:
        log.info("stopping")
        supervisor.stop_all()
        for file in output:
            file.close()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
