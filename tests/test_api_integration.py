"""The main path, end to end: a PUT persists, its ETL fills the context, a second PUT is
version 2, `respond-async`, a 404, and the search attributes an operator finds the
workflows by — the API, a real worker, the Temporal dev server and PostgreSQL together.

The contract's finer points (concurrency, Idempotency-Key, retry, delete, list) are in
`test_api_semantics.py`."""

from __future__ import annotations

import httpx
from temporalio.client import Client
from temporalio.worker import Worker

from tests.helpers import wait_for_etl
from workflows.upsert import UpsertWorkflow

EXAMPLE = {
    "attributes": {"name": "Widget"},
    "info": {"Address": {"City": " Paris "}, "Age": "42", "Active": "yes", "Empty": ""},
}


async def test_put_persists_then_etl_fills_the_context(
    api: httpx.AsyncClient, worker: Worker, client: Client, resource_id: str
) -> None:
    created = await api.put(f"/resources/{resource_id}", json=EXAMPLE)

    assert created.status_code == 201, created.text
    body = created.json()
    assert body["version"] == 1
    assert body["attributes"] == {"name": "Widget"}
    assert created.headers["location"] == f"/resources/{resource_id}"
    assert resource_id in body["etl"]["workflow_id"]

    done = await wait_for_etl(api, resource_id, version=1)
    assert done["etl"]["status"] == "succeeded"
    assert done["context"] == {"address.city": "Paris", "age": 42, "active": True}
    assert done["context_version"] == 1

    handle = client.get_workflow_handle_for(UpsertWorkflow.run, body["etl"]["workflow_id"])
    result = await handle.result()
    assert [step.name for step in result.steps] == ["normalize", "enrich", "load"]
    assert all(step.status == "succeeded" for step in result.steps)
    progress = await handle.query(UpsertWorkflow.progress)
    assert progress.status == "succeeded"


async def test_second_put_is_version_2_and_replaces_the_context(
    api: httpx.AsyncClient, worker: Worker, resource_id: str
) -> None:
    first = await api.put(f"/resources/{resource_id}", json=EXAMPLE)
    assert first.status_code == 201
    await wait_for_etl(api, resource_id, version=1)

    second = await api.put(
        f"/resources/{resource_id}",
        json={"attributes": {"name": "Gadget"}, "info": {"Color": "Red", "Size": "3.5"}},
    )

    assert second.status_code == 200, second.text
    assert second.json()["version"] == 2
    done = await wait_for_etl(api, resource_id, version=2)
    assert done["etl"]["status"] == "succeeded"
    assert done["attributes"] == {"name": "Gadget"}
    assert done["context"] == {"color": "Red", "size": 3.5}
    assert done["context_version"] == 2


async def test_respond_async_answers_202_and_the_work_completes(
    api: httpx.AsyncClient, worker: Worker, resource_id: str
) -> None:
    accepted = await api.put(
        f"/resources/{resource_id}", json=EXAMPLE, headers={"Prefer": "respond-async"}
    )

    assert accepted.status_code == 202, accepted.text
    assert accepted.headers["location"] == f"/resources/{resource_id}"
    assert resource_id in accepted.json()["workflow_id"]
    done = await wait_for_etl(api, resource_id, version=1)
    assert done["context"]["address.city"] == "Paris"


async def test_unknown_resource_is_404_problem(api: httpx.AsyncClient, resource_id: str) -> None:
    response = await api.get(f"/resources/{resource_id}")

    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 404
    assert resource_id in problem["detail"]


async def test_search_attributes_find_the_workflows_of_a_resource(
    api: httpx.AsyncClient, worker: Worker, client: Client, resource_id: str
) -> None:
    created = await api.put(f"/resources/{resource_id}", json=EXAMPLE)
    await wait_for_etl(api, resource_id, version=1)

    workflow_id = created.json()["etl"]["workflow_id"]
    for _ in range(100):  # visibility is eventually consistent
        found = [
            execution.id
            async for execution in client.list_workflows(
                f'ResourceId="{resource_id}" AND EtlStatus="succeeded"'
            )
        ]
        if found:
            break
    assert found == [workflow_id]
    description = await client.get_workflow_handle(workflow_id).describe()
    assert await description.static_summary() == f"Upsert {resource_id}"
