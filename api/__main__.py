"""`upsertflow-api`: serve the API with uvicorn."""

from __future__ import annotations

import uvicorn

from api.main import create_app
from upsertflow.logs import configure_logging
from upsertflow.settings import get_settings


def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    uvicorn.run(
        create_app(settings),
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
