"""A worker interceptor for every activity: its ids in every log line, its attempt on failure.

- While an activity runs, the workflow id, run id, activity, attempt and resource
  id are bound to the log context, so every line it logs carries them.
- Temporal's `ActivityError` does not carry the attempt number, yet the ETL's
  step-by-step state shows it: every failure leaving an activity is re-raised as
  an `ApplicationError` with `{"attempt": n}` as its last detail; its type,
  retryability and retry delay are kept.
- No payload data in failures: a failure's message travels into the Temporal
  history, the worker's log and `GET /resources/{id}/etl`. So the message is
  bounded (`upsertflow.logs.describe_exception`: one line, at most 300 characters);
  an unexpected exception is described by its type and first line, a database
  error by its driver exception class and SQLSTATE only (never its SQL or the
  values it refused). The original exception is not chained into the failure
  (Temporal would serialize its full text as the cause); at DEBUG it is logged,
  with a plain traceback.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog
from temporalio import activity
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from upsertflow.logs import bounded, describe_exception

log = logging.getLogger("upsertflow.activities")


class _ReportAttempt(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        resource_id = getattr(input.args[0], "resource_id", None) if input.args else None
        with structlog.contextvars.bound_contextvars(
            workflow_id=info.workflow_id,
            run_id=info.workflow_run_id,
            activity=info.activity_type,
            attempt=info.attempt,
            resource_id=resource_id,
        ):
            return await self._execute(input)

    async def _execute(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except CancelledError:
            raise
        except ApplicationError as error:
            _log_cause(error)
            _, message = describe_exception(error)
            raise ApplicationError(
                message,
                *error.details,
                {"attempt": activity.info().attempt},
                type=error.type,
                non_retryable=error.non_retryable,
                next_retry_delay=error.next_retry_delay,
                category=error.category,
            ) from None
        except Exception as error:
            _log_cause(error)
            error_type, message = describe_exception(error)
            if not message.startswith(error_type):
                message = bounded(f"{error_type}: {message}")
            raise ApplicationError(
                message,
                {"attempt": activity.info().attempt},
                type=error_type,
            ) from None


def _log_cause(error: BaseException) -> None:
    """At DEBUG, log the original exception (with a plain traceback, see `upsertflow.logs`)."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("activity attempt failed", exc_info=error)


class AttemptInterceptor(Interceptor):
    """Add the attempt number to every activity failure."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ReportAttempt(next)


def failed_attempt(error: BaseException) -> int | None:
    """Return the attempt number an `AttemptInterceptor` attached to a failure chain."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ApplicationError) and cause.details:
            last = cause.details[-1]
            if isinstance(last, dict) and isinstance(last.get("attempt"), int):
                return int(last["attempt"])
        cause = cause.__cause__
    return None
