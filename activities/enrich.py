"""The `enrich` step: send selected records to the external enrichment service, merge answers.

Records are selected by the enrichment rules (a path pattern and a kind each),
sent in batches, `concurrency` of them in flight at once, and each answer's fields
are merged as `{path}.{field}` (`address.country` = "FR" gains
`address.country.country_name` = "France"): its output is the records with those
fields, or (pipeline v6, `StepInput.stores_additions`) those fields alone, which
the load merges into the records. After every batch the activity stores
that batch's answers (a checkpoint in PostgreSQL, one row per batch, so
checkpointing stays linear in the number of batches; the last batch's answers are
stored with the step's output instead) and heartbeats its progress (the number of
batches stored), so a retried attempt — after a crash, a
timeout or a 5xx — asks only for the batches not answered yet instead of
starting over. A 4xx answer cannot succeed on
retry: it fails the step at once.

Failures say what happened (the status, how it is handled, at most the short
`title` of a problem+json answer) and never quote the service's answer: it can
echo the values sent. A retryable answer's `Retry-After` is honoured, but never
sooner than the step's declared backoff and never longer than
`MAX_RETRY_AFTER` (`retry_delay`). An answer of 2xx that is not the expected
JSON fails the attempt as `EnrichmentBadAnswer`, retryable: the request was
fine, the service's answer was not (like a 5xx). So does one with a NUL (`\\u0000`) in
its fields, which PostgreSQL's `jsonb` cannot store: `load` would fail on it instead,
on every attempt, with a database error.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any

import httpx
import orjson
from temporalio import activity
from temporalio.common import RetryPolicy
from temporalio.exceptions import ApplicationError

from activities.resources import superseded_result
from upsertflow.contracts import StepInput, StepResult
from upsertflow.literals import required_literals
from upsertflow.logs import bounded
from upsertflow.settings import Enrichment, EnrichmentRule
from upsertflow.store.steps import StepStore, off_loop

#: 4xx answers that are worth retrying: the request itself was fine.
_RETRYABLE_CLIENT_ERRORS = {408, 409, 425, 429}


def refused_for_good(status: int) -> bool:
    """Whether an HTTP answer says the same request would be refused again: a 4xx other
    than 408/409/425/429. Retrying it is pointless (the enrichment service, webhooks)."""
    return 400 <= status < 500 and status not in _RETRYABLE_CLIENT_ERRORS


#: The longest wait one `Retry-After` can impose before the next attempt.
MAX_RETRY_AFTER = timedelta(minutes=5)
#: Longest `title` of a problem+json error answer quoted in a failure.
_TITLE_LIMIT = 80
#: Records selected in the event loop up to this many (more: in a thread, `off_loop`).
_SELECT_INLINE_UP_TO = 5_000
#: Error bodies longer than this are not parsed for a title.
_MAX_PARSED_ERROR_BODY = 64 * 1024


@dataclass(frozen=True)
class _Rule:
    path: re.Pattern[str]
    kind: str
    #: The literals one of which every path the pattern matches contains (None: unknown).
    needs: tuple[str, ...] | None

    @classmethod
    def of(cls, rule: EnrichmentRule) -> _Rule:
        pattern = re.compile(rule.path)
        needs = required_literals(pattern)
        return cls(pattern, rule.kind, None if needs is None else tuple(sorted(needs)))


def select_items(records: dict[str, Any], rules: Iterable[_Rule]) -> list[dict[str, str]]:
    """Return the enrichment requests for the records the rules select, in path order; a
    record goes to the first rule whose pattern its path matches.

    A path without any of the literals a rule's pattern needs is not searched: a
    substring test costs a fraction of a failing search (~0.1 s → ~0.03 s for the
    70,000 records of a 5 MiB `info` under the default rules; `upsertflow.literals`).
    """
    paths = [path for path, value in records.items() if isinstance(value, str) and value]
    kinds: dict[str, str] = {}
    for rule in rules:
        if rule.needs is None:
            candidates = paths
        elif len(rule.needs) == 1:
            (literal,) = rule.needs
            candidates = [path for path in paths if literal in path]
        else:
            candidates = [path for path in paths if any(needed in path for needed in rule.needs)]
        search = rule.path.search
        for path in candidates:
            if path not in kinds and search(path):
                kinds[path] = rule.kind
    return [{"key": path, "kind": kinds[path], "value": records[path]} for path in sorted(kinds)]


class EnrichActivities:
    """The enrichment step, with its HTTP client (one per worker, pooled)."""

    def __init__(self, store: StepStore, http: httpx.AsyncClient, config: Enrichment) -> None:
        self._store = store
        self._http = http
        self._config = config
        self._rules = [_Rule.of(rule) for rule in config.rules]
        # Batch i is only the same batch under the same rules and batch size: checkpoints
        # are named after both, so an attempt retried by a worker configured otherwise (a
        # deploy that changes them) asks again rather than skipping values it never asked.
        plan = orjson.dumps([config.batch_size, [[r.path, r.kind] for r in config.rules]])
        self._plan = hashlib.sha256(plan).hexdigest()[:12]

    @activity.defn(name="enrich")
    async def enrich(self, step: StepInput) -> StepResult:
        """Enrich the version's records through the enrichment service."""
        info = activity.info()
        prefix = f"{step.step}.batch.{self._plan}."
        # The batches an earlier attempt stored come with the input, in the same statement.
        begun = await self._store.begin(step, saved=prefix)
        if begun is None:
            return superseded_result()
        records = begun.input
        # Off the event loop for a large input (~0.1 s for the 70,000 records of 5 MiB).
        items = await off_loop(
            functools.partial(select_items, rules=self._rules),
            records,
            inline=len(records) <= _SELECT_INLINE_UP_TO,
        )
        size = self._config.batch_size
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        # Each batch's answers are stored as it is answered: a retried attempt asks only for
        # the batches not stored yet. (Heartbeats report the same progress, but the SDK
        # throttles them: a worker killed between two may not have sent the last one.)
        # The batch that completes the step is not: its answers go straight into the
        # step's output, stored next (an attempt that dies in between asks for it again).
        stored = begun.saved
        merged: dict[str, Any] = {}
        for answers in stored.values():
            merged.update(answers)
        resumed = len(stored)
        todo = iter([i for i in range(len(batches)) if f"{prefix}{i}" not in stored])
        answered = done = resumed

        async def ask() -> bool:
            """Ask for the batches left, one after the other; False if superseded."""
            nonlocal answered, done
            for index in todo:  # shared by every `ask`: each batch is asked for once
                answers = await self._call(batches[index])
                answered += 1
                if answered == len(batches):  # the last answer: stored with the output
                    merged.update(answers)
                    continue
                if not await self._store.write(step, answers, f"{prefix}{index}"):
                    return False
                merged.update(answers)
                done += 1
                activity.heartbeat(done)  # progress: the batches stored
            return True

        # A few batches in flight at once: the service's, PostgreSQL's and this worker's
        # time overlap. The first failure cancels the others and fails the attempt.
        # Heartbeats say what is stored: none at the start unless resumed, none for the
        # last batch. (The first heartbeat of an attempt goes to the server at once, a
        # write there; a single-batch `enrich` sends none, well within its timeout.)
        if resumed:
            activity.heartbeat(done)
        askers = [asyncio.ensure_future(ask()) for _ in range(self._config.concurrency)]
        try:
            finished = await asyncio.gather(*askers)
        finally:
            for asker in askers:
                asker.cancel()
            await asyncio.gather(*askers, return_exceptions=True)
        if not all(finished):
            return superseded_result()
        # Pipeline v6: only the fields added, which the load merges into the records.
        output = merged if step.stores_additions else {**records, **merged}
        if not await self._store.write(step, output):
            return superseded_result()
        return StepResult(
            attempt=info.attempt,
            stats={
                "selected": len(items),
                "enriched_fields": len(merged),
                "batches": len(batches),
                "resumed_at_batch": resumed,
            },
        )

    async def _call(self, batch: list[dict[str, str]]) -> dict[str, Any]:
        """Send one batch; return the fields to merge."""
        try:
            response = await self._http.post(
                f"{self._config.url.rstrip('/')}/v1/enrich",
                content=orjson.dumps({"items": batch}),
                headers={"Content-Type": "application/json"},
                timeout=self._config.request_timeout_seconds,
            )
        except httpx.TimeoutException as error:
            _count_call("timeout")
            raise ApplicationError(
                f"the enrichment service did not answer within "
                f"{self._config.request_timeout_seconds} s",
                type="EnrichmentTimeout",
            ) from error
        except httpx.TransportError as error:
            _count_call("unreachable")
            reason = bounded(str(error), 120)
            raise ApplicationError(
                f"the enrichment service is unreachable: {type(error).__name__}"
                + (f" ({reason})" if reason else ""),
                type="EnrichmentUnavailable",
            ) from error
        _count_call(str(response.status_code))
        if not 200 <= response.status_code < 300:
            info = activity.info()
            sent = [item["value"] for item in batch]
            raise _failure(response, info.attempt, info.retry_policy, sent)
        return _answers(response, batch)


def _count_call(outcome: str) -> None:
    """Count a call to the enrichment service in the worker's metrics, by status."""
    activity.metric_meter().create_counter(
        "upsertflow_enrichment_requests", "Calls to the enrichment service, by HTTP status."
    ).add(1, {"status": outcome})


def _answers(response: httpx.Response, batch: list[dict[str, str]]) -> dict[str, Any]:
    """Return the fields to merge from a 2xx answer; raise `EnrichmentBadAnswer` if malformed."""
    try:
        # orjson, as the answers are stored with it: no NaN, no lone surrogates, integers of
        # 64 bits at most (larger ones are read as floats), nesting at most 1,024 deep.
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:  # not JSON, not UTF-8, or absurdly nested
        raise _bad_answer(response, "its body is not JSON") from None
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list):
        raise _bad_answer(response, "it has no `results` list")
    asked = {item["key"] for item in batch}
    # JSON can only spell NUL `\u0000` (fast path: no such escape, no NUL anywhere).
    may_hold_nul = b"\\u0000" in response.content
    merged: dict[str, Any] = {}
    for index, result in enumerate(results):
        key = result.get("key") if isinstance(result, dict) else None
        if not isinstance(key, str) or key not in asked:
            raise _bad_answer(response, f"result {index} is not an answer to a key that was sent")
        fields = result.get("fields") or {}
        if not isinstance(fields, dict):
            raise _bad_answer(response, f"the `fields` of result {index} are not an object")
        if may_hold_nul and _holds_nul(fields):
            # PostgreSQL's `jsonb` cannot store it: `load` would fail on every attempt.
            raise _bad_answer(response, f"the `fields` of result {index} hold a \\u0000")
        for field, value in fields.items():
            merged[f"{key}.{field}"] = value
    return merged


def _holds_nul(fields: dict[str, Any]) -> bool:
    """Whether a key or string anywhere in `fields` has a NUL (iteratively: an answer may
    nest 1,024 deep)."""
    pending: list[Any] = [fields]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                return True
        elif isinstance(value, dict):
            pending.extend(value.keys())
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return False


def _bad_answer(response: httpx.Response, reason: str) -> ApplicationError:
    return ApplicationError(
        f"the enrichment service answered {_status(response.status_code)} but {reason}; retried",
        type="EnrichmentBadAnswer",
    )


def _status(code: int) -> str:
    """`503 Service Unavailable`: the standard phrase, not the one the server sent."""
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _problem_title(response: httpx.Response, sent: Iterable[str]) -> str | None:
    """The `title` of a problem+json (or JSON) error answer, bounded; None for any other body,
    and for a title that quotes a value that was sent."""
    content_type = response.headers.get("content-type", "").lower()
    if "json" not in content_type or len(response.content) > _MAX_PARSED_ERROR_BODY:
        return None
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return None
    title = body.get("title") if isinstance(body, dict) else None
    if not isinstance(title, str):
        return None
    folded = title.casefold()
    if any(len(value) >= 4 and value.casefold() in folded for value in sent):
        return None
    return bounded(title, _TITLE_LIMIT) or None


def _failure(
    response: httpx.Response,
    attempt: int = 1,
    policy: RetryPolicy | None = None,
    sent: Iterable[str] = (),
) -> ApplicationError:
    """Turn an error answer into a failure a person can act on, retryable or not.

    The message says the status, how it is handled and at most the answer's short
    problem `title` (unless it quotes one of the values `sent`): never its body,
    which can quote the values that were sent.
    """
    status = response.status_code
    title = _problem_title(response, sent)
    said = f' ("{title}")' if title else ""
    if refused_for_good(status):
        return ApplicationError(
            f"the enrichment service rejected the request: {_status(status)}{said}; "
            "not retried (the same request would be rejected again)",
            type="EnrichmentRejected",
            non_retryable=True,
        )
    header = response.headers.get("retry-after")
    delay = retry_delay(header, attempt, policy)
    if status < 400:
        kind = "an unexpected status"
    elif status < 500:
        kind = "a transient refusal"
    else:
        kind = "a server error"
    when = f"; next attempt in {delay.total_seconds():g} s" if delay else "; retried"
    return ApplicationError(
        f"the enrichment service answered {_status(status)}{said}: {kind}{when}",
        type="EnrichmentUnavailable",
        next_retry_delay=delay,
    )


def declared_backoff(policy: RetryPolicy | None, attempt: int) -> timedelta:
    """The delay Temporal's retry policy sets after failed attempt `attempt` (1-based).

    `initial_interval × backoff_coefficient^(attempt-1)`, at most `maximum_interval`
    (Temporal's default: 100 × the initial interval). Zero without a policy.
    """
    if policy is None:
        return timedelta(0)
    initial = policy.initial_interval or timedelta(seconds=1)
    maximum = policy.maximum_interval or initial * 100
    exponent = min(max(attempt - 1, 0), 1000)
    try:
        seconds = initial.total_seconds() * policy.backoff_coefficient**exponent
    except OverflowError:
        seconds = math.inf
    return maximum if seconds >= maximum.total_seconds() else timedelta(seconds=seconds)


def _retry_after_seconds(header: str | None, now: datetime | None = None) -> float | None:
    """`Retry-After` in seconds (delay-seconds or an HTTP date); None if absent or unusable."""
    if header is None:
        return None
    value = header.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


def retry_delay(
    header: str | None,
    attempt: int,
    policy: RetryPolicy | None,
    *,
    now: datetime | None = None,
) -> timedelta | None:
    """The delay before the next attempt, given the answer's `Retry-After` header.

    The rule: honour `Retry-After`, but never sooner than the declared backoff of
    this attempt (the service's `Retry-After: 1` must not turn a 1 s, 2 s, 4 s …
    30 s backoff into retries every second), and never longer than `MAX_RETRY_AFTER`
    (a huge or far-future value must not park the step; its overall deadline still
    applies). None without a usable header: Temporal then applies the declared backoff.
    """
    seconds = _retry_after_seconds(header, now)
    if seconds is None:
        return None
    asked = timedelta(seconds=min(seconds, MAX_RETRY_AFTER.total_seconds()))
    return max(asked, declared_backoff(policy, attempt))
