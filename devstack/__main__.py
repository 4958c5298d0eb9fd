"""`python -m devstack` (`make dev`): the whole stack on one machine, supervised.

Starts what is not configured externally — PostgreSQL unless `DATABASE_URL` is
set, the Temporal dev server unless `TEMPORAL_ADDRESS` is set — then applies the
migrations and runs the local enrichment service, the workers and the API
processes (`--workers N`, `--apis M`: one each by default, the APIs on consecutive
ports from `UPSERTFLOW_API__PORT`). Data stays under `UPSERTFLOW_DEV__DATA_DIR`
(`.data/`) across runs.

Every part is supervised (`devstack.supervisor`): one that dies is started again
after a backoff while the rest keeps running. The embedded PostgreSQL and Temporal
dev server are restarted on the data they keep on disk; the workers and the APIs
reconnect to them by themselves. SIGUSR1 logs the status of every part.

Ctrl-C or SIGTERM stops everything, the APIs first and the servers last, also while
a part waits to be restarted. The exit code is 0 then, and 1 if the stack could not
start.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import sys
from types import FrameType

from api.security import LOOPBACK
from devstack.stack import Stack, StackConfig
from devstack.supervisor import Supervisor
from upsertflow.logs import configure_logging
from upsertflow.settings import Settings, get_settings

log = logging.getLogger("devstack")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes")
    parser.add_argument("--apis", type=int, default=1, metavar="M", help="API processes")
    return parser.parse_args(argv)


def config(settings: Settings, workers: int = 1, apis: int = 1) -> StackConfig:
    """The stack of `make dev`, from upsertflow's settings (environment and `.env`)."""
    return StackConfig(
        root=settings.dev.data_dir,
        database_url=settings.database_url.get_secret_value() or None,
        temporal_address=os.environ.get("TEMPORAL_ADDRESS") or None,
        temporal_port=settings.dev.temporal_port,
        temporal_ui_port=settings.dev.temporal_ui_port or None,
        enrichment_port=settings.dev.enrichment_port,
        workers=workers,
        api_ports=[settings.api.port + n for n in range(apis)],
        api_host=settings.api.host,
        shell=True,
        # The dev server's Web UI has no login: let it decode payloads (loopback only).
        env={"UPSERTFLOW_CODEC__DEV_UI_WITHOUT_TOKEN": str(settings.api.host in LOOPBACK).lower()},
    )


def banner(stack: Stack, supervisor: Supervisor, settings: Settings) -> str:
    policy = supervisor.policy
    embedded = stack.config.database_url is None or stack.config.temporal_address is None
    ui_url = stack.temporal_ui_url or settings.temporal_ui_url
    apis = "".join(
        f"    API          {url}\n    API docs     {url}/docs\n" for url in stack.api_urls
    )
    return (
        f"\n  upsertflow is running (supervisor pid {os.getpid()})\n"
        f"{apis}"
        f"{auth_lines(stack)}"
        f"    Temporal UI  {ui_url}\n"
        f"    Codec        {codec_line(stack)}\n"
        f"    Temporal     {stack.temporal_address}\n"
        f"    Enrichment   {stack.enrichment_url}\n"
        f"    Workers      {worker_line(stack)}\n"
        "    Processes    "
        + ", ".join(f"{name} {pid}" for name, pid in stack.pids().items())
        + "\n"
        f"  A process that dies is restarted (after {policy.initial:g} s, doubling up to "
        f"{policy.maximum:g} s); `kill -USR1 {os.getpid()}` logs their status.\n"
        "  Ctrl-C stops everything; the data stays in "
        f"{stack.root if embedded else 'your external services'}.\n"
    )


def auth_lines(stack: Stack) -> str:
    """How to call the API: a token from the local key, or what else verifies them."""
    auth = stack.auth
    if auth.disabled:
        return "    Auth         DISABLED (UPSERTFLOW_AUTH__DISABLED): anyone may call the API\n"
    if auth.jwks_url:
        return f"    Auth         tokens from your identity provider ({auth.jwks_url})\n"
    python = shlex.quote(os.path.relpath(sys.executable))
    return (
        f"    Token        TOKEN=$({python} -m api.tokens)   (every scope, 1 h; --help)\n"
        f'                 curl -H "Authorization: Bearer $TOKEN" {stack.api_url}/resources\n'
    )


def worker_line(stack: Stack) -> str:
    """The Worker Deployment version the workers run as (current), or unversioned."""
    version = stack.worker_version
    if version is None:
        return "unversioned (UPSERTFLOW_WORKER__VERSIONING=false)"
    return (
        f"deployment {version.deployment_name}, build id {version.build_id} (current); "
        f"temporal worker deployment describe --deployment-name {version.deployment_name}"
    )


def codec_line(stack: Stack) -> str:
    """Where the payload keys come from, and the codec server the UI is pointed at."""
    keys = stack.codec.keys_file or "UPSERTFLOW_CODEC__KEYS"
    own_ui = stack.config.temporal_address is None and stack.temporal.ui_port
    endpoint = stack.temporal.codec_endpoint if own_ui else None
    tokenless = stack.env.get("UPSERTFLOW_CODEC__DEV_UI_WITHOUT_TOKEN") == "true"
    access = "the UI decodes them there, no token on loopback" if tokenless else "scope `codec`"
    return f"payloads encrypted (keys: {keys})" + (
        f"; codec server {endpoint} ({access})" if endpoint else ""
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    settings = get_settings()
    configure_logging(settings)
    stack = Stack(config(settings, args.workers, args.apis))
    supervisor = Supervisor(stack)

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        supervisor.stopping.set()

    def on_status(signum: int, _frame: FrameType | None) -> None:
        supervisor.status_requested.set()

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGUSR1, on_status)

    exit_code = 0
    try:
        try:
            stack.start(stopping=supervisor.stopping)
        except Exception:
            log.exception("the stack failed to start")
            exit_code = 1
        else:
            if not supervisor.stopping.is_set():
                print(banner(stack, supervisor, settings), flush=True)
            supervisor.run()
    except Exception:
        log.exception("the supervisor failed; stopping everything")
        exit_code = 1
    finally:
        log.info("stopping")
        stack.stop()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
