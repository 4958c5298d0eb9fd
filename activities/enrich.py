"""The `enrich` step: send selected records to the external enrichment service, merge answers.

Records are selected by the enrichment rules (a path pattern and a kind each),
sent in batches, and each answer's fields are merged as `{path}.{field}`
(`address.country` = "FR" gains `address.country.country_name` = "France").
After every batch the activity stores that batch's answers (a checkpoint in
PostgreSQL, one row per batch, so checkpointing stays linear in the number of
batches) and heartbeats its progress, so a retried attempt — after a crash, a
timeout or a 5xx — asks only for the batches not answered yet instead of
starting over. A 4xx answer cannot succeed on
retry: it fails the step at once with the service's message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.resources import superseded_result
from activities.steps import StepStore
from upsertflow.contracts import StepInput, StepResult
from upsertflow.settings import Enrichment

#: 4xx answers that are worth retrying: the request itself was fine.
_RETRYABLE_CLIENT_ERRORS = {408, 409, 425, 429}


@dataclass(frozen=True)
class _Rule:
    path: re.Pattern[str]
    kind: str


def select_items(records: dict[str, Any], rules: Iterable[_Rule]) -> list[dict[str, str]]:
    """Return the enrichment requests for the records the rules select, in path order."""
    items = []
    for path in sorted(records):
        value = records[path]
        if not isinstance(value, str) or not value:
            continue
        for rule in rules:
            if rule.path.search(path):
                items.append({"key": path, "kind": rule.kind, "value": value})
                break
    return items


class EnrichActivities:
    """The enrichment step, with its HTTP client (one per worker, pooled)."""

    def __init__(self, store: StepStore, http: httpx.AsyncClient, config: Enrichment) -> None:
        self._store = store
        self._http = http
        self._config = config
        self._rules = [_Rule(re.compile(rule.path), rule.kind) for rule in config.rules]

    @activity.defn(name="enrich")
    async def enrich(self, step: StepInput) -> StepResult:
        """Enrich the version's records through the enrichment service."""
        info = activity.info()
        if not await self._store.begin(step):
            return superseded_result()
        records = await self._store.read_input(step)
        items = select_items(records, self._rules)
        size = self._config.batch_size
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        # Each batch's answers are stored as it is answered: a retried attempt asks only for
        # the batches not stored yet. (Heartbeats report the same progress, but the SDK
        # throttles them: a worker killed between two may not have sent the last one.)
        prefix = f"{step.step}.batch."
        stored = await self._store.read_all(step, prefix)
        merged: dict[str, Any] = {}
        for answers in stored.values():
            merged.update(answers)
        resumed = len(stored)
        for index, batch in enumerate(batches):
            if f"{prefix}{index}" in stored:
                continue
            activity.heartbeat(index)
            answers = await self._call(batch)
            await self._store.write(step, answers, name=f"{prefix}{index}")
            merged.update(answers)
            activity.heartbeat(index + 1)
        await self._store.write(step, {**records, **merged})
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
                json={"items": batch},
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
            raise ApplicationError(
                f"the enrichment service is unreachable: {error!r}", type="EnrichmentUnavailable"
            ) from error
        _count_call(str(response.status_code))
        if response.status_code >= 400:
            raise _failure(response)
        merged: dict[str, Any] = {}
        for result in response.json()["results"]:
            for field, value in result.get("fields", {}).items():
                merged[f"{result['key']}.{field}"] = value
        return merged


def _count_call(outcome: str) -> None:
    """Count a call to the enrichment service in the worker's metrics, by status."""
    activity.metric_meter().create_counter(
        "upsertflow_enrichment_requests", "Calls to the enrichment service, by HTTP status."
    ).add(1, {"status": outcome})


def _failure(response: httpx.Response) -> ApplicationError:
    """Turn an error answer into a failure a person can act on, retryable or not."""
    try:
        detail = response.json().get("detail") or response.text
    except ValueError:
        detail = response.text
    message = f"the enrichment service answered {response.status_code}: {detail[:500]}"
    status = response.status_code
    if 400 <= status < 500 and status not in _RETRYABLE_CLIENT_ERRORS:
        return ApplicationError(message, type="EnrichmentRejected", non_retryable=True)
    retry_after = response.headers.get("retry-after", "")
    delay = timedelta(seconds=int(retry_after)) if retry_after.isdigit() else None
    return ApplicationError(message, type="EnrichmentUnavailable", next_retry_delay=delay)
