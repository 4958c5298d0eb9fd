"""`upsertflow-dev` (`make dev`): the whole stack on one machine, supervised.

Starts what is not configured externally — PostgreSQL unless `DATABASE_URL` is
set, the Temporal dev server unless `TEMPORAL_ADDRESS` is set — then applies the
migrations and runs the local enrichment service, one worker and the API. Data
stays under `UPSERTFLOW_DATA_DIR` (`.data/`) across runs. Ctrl-C or SIGTERM
stops everything, the API first and the servers last; if any child dies, the
rest is stopped too and the exit code says so.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from types import FrameType

from upsertflow.embedded import (
    EmbeddedPostgres,
    TemporalDevServer,
    child_env,
    migrate,
    stop_process,
    wait_for_port,
)
from upsertflow.logs import configure_logging
from upsertflow.settings import get_settings

log = logging.getLogger("upsertflow.dev")


class Supervisor:
    """Start children in order, stop them in reverse order."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.stopping = threading.Event()

    def spawn(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        # Own process group: Ctrl-C reaches only the supervisor, which stops children in order.
        process = subprocess.Popen(args, env=env, process_group=0)
        self.children.append((name, process))
        log.info("started %s (pid %d)", name, process.pid)
        return process

    def exited(self) -> tuple[str, int] | None:
        for name, process in self.children:
            if process.poll() is not None:
                return name, process.returncode
        return None

    def stop_all(self, grace: float) -> None:
        for name, process in reversed(self.children):
            if not stop_process(process, grace):
                log.warning("%s did not stop within %.0f s; it was killed", name, grace)
            log.info("stopped %s", name)


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    supervisor = Supervisor()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        supervisor.stopping.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    postgres: EmbeddedPostgres | None = None
    temporal: TemporalDevServer | None = None
    temporal_log = None
    env = child_env(PYTHONUNBUFFERED="1")
    exit_code = 0
    try:
        if not settings.database_url:
            postgres = EmbeddedPostgres(data_dir / "postgres")
            env["DATABASE_URL"] = postgres.start()
            log.info("embedded PostgreSQL ready in %s", postgres.data_dir)
        ui_url = settings.temporal_ui_url
        if not os.environ.get("TEMPORAL_ADDRESS"):
            temporal_log = (data_dir / "temporal.log").open("ab")
            temporal = TemporalDevServer(
                db_file=data_dir / "temporal.sqlite",
                port=settings.dev_temporal_port,
                ui_port=settings.dev_temporal_ui_port,
                log_file=temporal_log,
            )
            env["TEMPORAL_ADDRESS"] = temporal.start()
            ui_url = temporal.ui_url or ui_url
            env["UPSERTFLOW_TEMPORAL_UI_URL"] = ui_url
            log.info("Temporal dev server ready at %s", temporal.address)
        migrate(env)
        enrichment_url = f"http://127.0.0.1:{settings.dev_enrichment_port}"
        env.setdefault("UPSERTFLOW_ENRICHMENT__URL", enrichment_url)
        enrichment = supervisor.spawn(
            "enrichment service",
            [
                sys.executable,
                "-m",
                "enrichment_service",
                "--port",
                str(settings.dev_enrichment_port),
            ],
            env,
        )
        wait_for_port("127.0.0.1", settings.dev_enrichment_port, 30, enrichment)
        supervisor.spawn("worker", [sys.executable, "-m", "worker"], env)
        api = supervisor.spawn("api", [sys.executable, "-m", "api"], env)
        wait_for_port(settings.api_host, settings.api_port, 30, api)
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        print(
            "\n  upsertflow is running\n"
            f"    API          {api_url}\n"
            f"    API docs     {api_url}/docs\n"
            f"    Temporal UI  {ui_url}\n"
            f"    Temporal     {env['TEMPORAL_ADDRESS']}\n"
            f"    Enrichment   {env['UPSERTFLOW_ENRICHMENT__URL']}\n"
            "  Ctrl-C stops everything; the data stays in "
            f"{data_dir if (postgres or temporal) else 'your external services'}.\n",
            flush=True,
        )
        while not supervisor.stopping.wait(0.2):
            if (dead := supervisor.exited()) is not None:
                log.error("%s exited with code %s; stopping everything", *dead)
                exit_code = 1
                break
    except Exception:
        log.exception("the stack failed to start")
        exit_code = 1
    finally:
        log.info("stopping")
        supervisor.stop_all(grace=settings.worker_graceful_shutdown_seconds + 5)
        if temporal is not None:
            temporal.stop()
            log.info("stopped Temporal dev server")
        if temporal_log is not None:
            temporal_log.close()
        if postgres is not None:
            postgres.stop()
            log.info("stopped PostgreSQL")
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
