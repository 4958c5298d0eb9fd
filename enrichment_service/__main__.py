"""Run the local enrichment service: `upsertflow-enrichment [--port 8300] [--error-rate 0.1] ...`.

`--test-mode` (`ENRICHMENT_TEST_MODE=1`; `make dev` and the tests) adds the fault-injection
and counter endpoints (`/_faults`, `/_stats`) and honours the `X-Fault-*` headers; without
it they are 404 and the headers are ignored.

Every flag can also come from the environment (`ENRICHMENT_<FLAG>`, e.g. `ENRICHMENT_PORT`);
a flag wins over the environment.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from enrichment_service.app import FaultConfig, create_app, release_hangs


class _Server(uvicorn.Server):
    """A uvicorn server that releases hanging requests as soon as it starts shutting down."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        release_hangs(self._app)
        await super().shutdown(sockets)


def _rate(raw: str) -> float:
    """Parse an error rate from 0 to 1."""
    rate = float(raw)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(raw)
    return rate


_rate.__name__ = "rate from 0 to 1"  # what argparse calls the type in its error message


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, with defaults from the environment."""
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="upsertflow-enrichment",
        description="The local enrichment service, with fault injection.",
    )
    # String defaults go through `type`, so a bad environment variable is a clean usage error.
    parser.add_argument("--host", default=env("ENRICHMENT_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=env("ENRICHMENT_PORT", "8300"))
    parser.add_argument(
        "--test-mode",
        action="store_true",
        default=env("ENRICHMENT_TEST_MODE", "").lower() in ("1", "true", "yes", "on"),
        help="let callers inject faults (/_faults, X-Fault-* headers) and read /_stats",
    )
    parser.add_argument(
        "--latency-ms",
        type=int,
        default=env("ENRICHMENT_LATENCY_MS", "0"),
        help="delay before every enrich answer",
    )
    parser.add_argument(
        "--error-rate",
        type=_rate,
        default=env("ENRICHMENT_ERROR_RATE", "0"),
        help="share of enrich requests answered with --error-status, from 0 to 1",
    )
    parser.add_argument(
        "--error-status",
        type=int,
        default=env("ENRICHMENT_ERROR_STATUS", "503"),
        help="status of the injected errors (default 503)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=env("ENRICHMENT_SEED", "0"),
        help="seed of the error-rate sequence",
    )
    args = parser.parse_args(argv)
    try:
        args.faults = FaultConfig(
            latency_ms=args.latency_ms,
            error_rate=args.error_rate,
            error_status=args.error_status,
            seed=args.seed,
        )
    except ValidationError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    args = parse_args(argv)
    app = create_app(args.faults, test_mode=args.test_mode)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    faults = args.faults.model_dump(exclude_defaults=True) or "none"
    print(
        f"upsertflow-enrichment: serving on http://{args.host}:{args.port}, faults: {faults}"
        + (", test mode (/_faults, /_stats)" if args.test_mode else ""),
        file=sys.stderr,
        flush=True,
    )
    try:
        _Server(config, app).run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
