# syntax=docker/dockerfile:1
# One image for every upsertflow process; the command picks the role:
#   upsertflow-api (the default) · upsertflow-worker · upsertflow-enrichment · alembic upgrade head
# docker-compose.yml runs each of them; README.md, section "Deploying", explains the stack.

# ---- builder: install the project (not editable, no test or dev extras) into a venv ----
FROM python:3.11.15-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# Every dependency has a manylinux wheel for CPython 3.11: no compiler is needed.
COPY pyproject.toml README.md worker.py ./
COPY upsertflow ./upsertflow
COPY workflows ./workflows
COPY activities ./activities
COPY api ./api
COPY enrichment_service ./enrichment_service
RUN pip install --no-cache-dir . \
    && pip check

# ---- runtime: the venv, the migrations, a non-root user; no build tools, no sources ----
FROM python:3.11.15-slim-bookworm AS runtime

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UPSERTFLOW_API__HOST=0.0.0.0 \
    UPSERTFLOW_API__PORT=8000 \
    UPSERTFLOW_LOG_FORMAT=json

RUN groupadd --system --gid 10001 upsertflow \
    && useradd --system --uid 10001 --gid upsertflow --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin upsertflow

WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
# `alembic upgrade head` runs from here: alembic.ini and migrations/ are not in a package.
COPY alembic.ini ./
COPY migrations ./migrations

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001

EXPOSE 8000

# The API's liveness (GET /healthz); compose overrides it for the other roles.
# No curl in the slim image: Python's urllib does it (an HTTP error or no answer exits 1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('UPSERTFLOW_API__PORT', '8000') + '/healthz', timeout=2)"]

CMD ["upsertflow-api"]
