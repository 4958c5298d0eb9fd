"""`upsertflow-api`: serve the API with uvicorn."""

from __future__ import annotations

import uvicorn

from api.main import create_app
from api.observability import serve_metrics
from api.security import AuthNotConfigured
from upsertflow.logs import configure_logging
from upsertflow.settings import get_settings
from upsertflow.tracing import TracingConfigError, configure_tracing


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    try:
        # Before the app is built: it is instrumented as it is built.
        traced = configure_tracing("upsertflow-api")
        app = create_app(settings)
    except (AuthNotConfigured, TracingConfigError) as error:
        raise SystemExit(f"upsertflow-api: not starting: {error}") from None
    if settings.api.metrics_port:
        serve_metrics(settings.api.host, settings.api.metrics_port)
    try:
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
    finally:
        if traced:
            traced.shutdown()


if __name__ == "__main__":
    main()
