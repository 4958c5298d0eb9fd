"""What upsertflow's workflows are called in Temporal: ids and search attributes.

Workflow ids say what they are about, and hold no resource data beyond the id
(Temporal stores ids and search attributes unencrypted):

- `upsert:{resource_id}:{request_id}` — the workflow that applies one upsert
  request (the request id is a UUID in hex);
- `etl-retry:{resource_id}:v{version}:{run}` — a retry of the ETL of a version,
  one per ended run (`run`: a short hash of the run id it retries); a reprocessing
  job's re-runs are such retries too;
- `reprocess:{filter}` — a reprocessing job (`filter`: a short hash of its normalized
  filter, so the same filter asked twice while the job runs is the same job).

The resource id is limited to `[A-Za-z0-9._~-]`.
"""

from __future__ import annotations

import hashlib

from temporalio.common import SearchAttributeKey

RESOURCE_ID = SearchAttributeKey.for_keyword("ResourceId")
RESOURCE_VERSION = SearchAttributeKey.for_int("ResourceVersion")
ETL_STATUS = SearchAttributeKey.for_keyword("EtlStatus")

#: name=type pairs, as `temporal server start-dev --search-attribute` takes them.
SEARCH_ATTRIBUTES = {"ResourceId": "Keyword", "ResourceVersion": "Int", "EtlStatus": "Keyword"}


def webhook_workflow_id(workflow_id: str) -> str:
    """Return the id of the workflow that delivers the completion webhook of `workflow_id`."""
    return f"webhook:{workflow_id}"


def upsert_workflow_id(resource_id: str, request_id: str) -> str:
    """Return the id of the workflow that applies one upsert request."""
    return f"upsert:{resource_id}:{request_id}"


def reprocess_job_id(filter_digest: str) -> str:
    """Return the id of the reprocessing job of a filter (`ReprocessFilter.digest`)."""
    return f"reprocess:{filter_digest}"


def reprocess_task_queue(task_queue: str) -> str:
    """Return the task queue of reprocessing: its jobs, their re-runs and their activities.

    Apart from the live upserts' queue, served by workers with slots of their own, so a
    large job never delays a live upsert.
    """
    return f"{task_queue}-reprocess"


def etl_retry_workflow_id(resource_id: str, version: int, retried_run_id: str) -> str:
    """Return the id of the workflow retrying the ETL run `retried_run_id` of a version.

    One per ended run: concurrent retries of the same run start one workflow.
    """
    run = hashlib.sha256(retried_run_id.encode()).hexdigest()[:12]
    return f"etl-retry:{resource_id}:v{version}:{run}"
