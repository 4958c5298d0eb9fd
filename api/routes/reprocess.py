"""`/etl/reprocess`: re-run the ETL of every resource that matches a filter, as one job."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import SettingsDep, TemporalDep
from api.jobs import cancel_job, read_job, start_job, update_job
from api.observability import WORKFLOWS_STARTED
from api.problems import problem_responses
from api.ratelimit import require_write
from api.schemas import ReprocessAccepted, ReprocessJobPublic, ReprocessRequest
from api.security import Scope, require_scopes
from api.workflows import ui_url
from upsertflow.jobs import ReprocessProgress
from workflows.reprocess import ReprocessWorkflow

router = APIRouter(
    prefix="/etl/reprocess", tags=["reprocessing"], responses=problem_responses(401, 403)
)


@router.post(
    "",
    operation_id="startReprocessing",
    summary="Re-run the ETL of every matching resource, as one durable job",
    status_code=202,
    response_model=ReprocessAccepted,
    responses=problem_responses(400, 422, 429, 503),
    dependencies=[require_write(Scope.OPERATE)],
)
async def start_reprocessing(
    body: ReprocessRequest, client: TemporalDep, settings: SettingsDep
) -> JSONResponse:
    """Start the job of this filter, or answer the one that runs already (the same filter is
    the same job). Follow `Location` for its progress."""
    where = body.filter()
    WORKFLOWS_STARTED.labels("reprocess").inc()
    handle = await start_job(client, settings, where, body.concurrency)
    accepted = ReprocessAccepted(
        job_id=handle.id,
        run_id=handle.result_run_id,
        filter=where,
        ui_url=ui_url(settings, client.namespace, handle.id, None),
    )
    return JSONResponse(
        accepted.model_dump(mode="json"),
        status_code=202,
        headers={"Location": f"/etl/reprocess/{handle.id}"},
    )


@router.get(
    "/{job_id}",
    operation_id="getReprocessing",
    summary="A reprocessing job's progress",
    response_model=ReprocessJobPublic,
    responses=problem_responses(404, 503),
    dependencies=[require_scopes(Scope.READ)],
)
async def get_reprocessing(
    job_id: str, client: TemporalDep, settings: SettingsDep
) -> ReprocessJobPublic:
    """Done, failed, skipped, in flight, remaining; live while the job runs."""
    status, progress, live = await read_job(client, job_id)
    return ReprocessJobPublic(
        job_id=job_id,
        status=status.name.lower(),
        live=live and progress is not None,
        progress=progress,
        ui_url=ui_url(settings, client.namespace, job_id, None),
    )


@router.post(
    "/{job_id}/pause",
    operation_id="pauseReprocessing",
    summary="Pause a reprocessing job",
    response_model=ReprocessJobPublic,
    responses=problem_responses(404, 409, 429, 503),
    dependencies=[require_write(Scope.OPERATE)],
)
async def pause_reprocessing(
    job_id: str, client: TemporalDep, settings: SettingsDep
) -> ReprocessJobPublic:
    """Start no new re-run until resumed; the re-runs in flight finish."""
    progress = await update_job(client, job_id, ReprocessWorkflow.pause)
    return _answer(job_id, progress, ui_url(settings, client.namespace, job_id, None))


@router.post(
    "/{job_id}/resume",
    operation_id="resumeReprocessing",
    summary="Resume a paused reprocessing job",
    response_model=ReprocessJobPublic,
    responses=problem_responses(404, 409, 429, 503),
    dependencies=[require_write(Scope.OPERATE)],
)
async def resume_reprocessing(
    job_id: str, client: TemporalDep, settings: SettingsDep
) -> ReprocessJobPublic:
    """Start re-runs again."""
    progress = await update_job(client, job_id, ReprocessWorkflow.resume)
    return _answer(job_id, progress, ui_url(settings, client.namespace, job_id, None))


@router.delete(
    "/{job_id}",
    operation_id="cancelReprocessing",
    summary="Cancel a reprocessing job",
    status_code=202,
    response_model=None,
    responses=problem_responses(404, 409, 429, 503),
    dependencies=[require_write(Scope.OPERATE)],
)
async def cancel_reprocessing(job_id: str, client: TemporalDep) -> JSONResponse:
    """Start no new re-run; the job ends `cancelled` once the re-runs in flight have ended
    (each one either loads its resource's context or leaves the old one)."""
    await cancel_job(client, job_id)
    return JSONResponse(
        {"job_id": job_id, "status": "cancelling"},
        status_code=202,
        headers={"Location": f"/etl/reprocess/{job_id}"},
    )


def _answer(job_id: str, progress: ReprocessProgress, url: str) -> ReprocessJobPublic:
    return ReprocessJobPublic(
        job_id=job_id, status="running", live=True, progress=progress, ui_url=url
    )
