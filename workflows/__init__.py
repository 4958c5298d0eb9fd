"""Temporal workflows, and the names shared with the processes that start them.

Workflow ids say what they are about: `upsert:{resource_id}:{request_id}`.
The resource id is limited to `[A-Za-z0-9._~-]`, the request id is a UUID in hex.
"""

from temporalio.common import SearchAttributeKey

RESOURCE_ID = SearchAttributeKey.for_keyword("ResourceId")
RESOURCE_VERSION = SearchAttributeKey.for_int("ResourceVersion")
ETL_STATUS = SearchAttributeKey.for_keyword("EtlStatus")

#: name=type pairs, as `temporal server start-dev --search-attribute` takes them.
SEARCH_ATTRIBUTES = {"ResourceId": "Keyword", "ResourceVersion": "Int", "EtlStatus": "Keyword"}


def upsert_workflow_id(resource_id: str, request_id: str) -> str:
    """Return the id of the workflow that applies one upsert request."""
    return f"upsert:{resource_id}:{request_id}"
