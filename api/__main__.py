"""`upsertflow-api`: serve the API with uvicorn."""

from __future__ import annotations

import uvicorn

from api.main import create_app
from api.observability import serve_metrics
from api.security import AuthNotConfigured
from upsertflow.logs import configure_logging
from upsertflow.settings import get_settings


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    try:
        app = create_app(settings)
    except AuthNotConfigured as error:
        raise SystemExit(f"upsertflow-api: not starting: {error}") from None
    if settings.api.metrics_port:
        serve_metrics(settings.api.host, settings.api.metrics_port)
    uvicorn.run(
        app,
        host=settings.api.host,
        port=settings.api.port,
        log_config=None,
        # One access-log line per request: ours (`upsertflow.api.access`), with the
        # correlation id and the route, and without the query string.
        access_log=False,
        proxy_headers=True,
    )


if __name__ == "__main__":
    main()
