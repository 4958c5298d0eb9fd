"""`/resources/{id}/context`: a resource's context, page by page, whatever its size."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.cursors import ContextCursor
from api.deps import SessionDep
from api.paths import ResourceIdPath, check_id, not_found
from api.problems import Problem, problem_responses
from api.schemas import ContextPagePublic
from api.security import Scope, require_scopes
from upsertflow.store.contexts import ContextPage, PageQuery, read_context_page

router = APIRouter(prefix="/resources", tags=["context"], responses=problem_responses(401, 403))

#: The most records of one page, and of `fields`.
MAX_PAGE_RECORDS = 10_000

PageLimit = Annotated[
    int, Query(ge=1, le=MAX_PAGE_RECORDS, description="Most records in the page.")
]
PageCursor = Annotated[
    str | None, Query(description="`next_cursor` of the previous page of this context.")
]
PathPrefix = Annotated[
    str | None,
    Query(
        pattern=r"^[^\x00]*$",
        description="Only records whose path starts with this (`contact.`: a subtree).",
    ),
]
PathList = Annotated[
    str | None,
    Query(
        pattern=r"^[^,\x00]+(,[^,\x00]+)*$",
        description=f"Only the records of these paths, comma-separated (at most "
        f"{MAX_PAGE_RECORDS:,}; paths never hold a comma).",
    ),
]


@router.get(
    "/{resource_id:resource_id}/context",
    operation_id="getResourceContext",
    summary="Read a resource's context, page by page",
    response_model=ContextPagePublic,
    responses=problem_responses(400, 404, 409, 422),
    dependencies=[require_scopes(Scope.READ)],
)
async def get_context(
    resource_id: ResourceIdPath,
    session: SessionDep,
    limit: PageLimit = 1_000,
    cursor: PageCursor = None,
    prefix: PathPrefix = None,
    fields: PathList = None,
) -> ContextPagePublic:
    """Return the records of the resource's context in path order; follow `next_cursor`.

    `prefix` and `fields` select records, `limit` bounds the page. A cursor pages the
    context it was given for: if the context has been replaced since (a newer version,
    or an ETL retry, was loaded), the answer is `409`: start again without a cursor.
    """
    check_id(resource_id)
    after = ContextCursor.decode(cursor) if cursor is not None else None
    query = PageQuery(
        limit=limit,
        after=after.last_path if after else "",
        prefix=prefix or "",
        paths=_paths(fields) if fields is not None else None,
        of=after.load if after else None,
    )
    page = await read_context_page(session, resource_id, query)
    if page is None:
        raise not_found(resource_id)
    return _page_public(resource_id, page, after)


def _paths(fields: str) -> tuple[str, ...]:
    paths = tuple(fields.split(","))
    if len(paths) > MAX_PAGE_RECORDS:
        raise Problem(
            422,
            "validation",
            "Invalid request",
            f"query.fields: at most {MAX_PAGE_RECORDS:,} paths",
            errors=[{"field": "query.fields", "message": f"at most {MAX_PAGE_RECORDS:,} paths"}],
        )
    return paths


def _page_public(
    resource_id: str, page: ContextPage, after: ContextCursor | None
) -> ContextPagePublic:
    """The page, or why there is none: no context yet (`404`), or another one (`409`)."""
    context = page.context
    if context is None:
        raise Problem(
            404,
            "context-not-found",
            "The resource has no context yet",
            f"no ETL of {resource_id!r} has loaded a context yet; "
            f"see GET /resources/{resource_id}/etl",
        )
    if after is not None and after.load != context.load:
        raise Problem(
            409,
            "context-changed",
            "The context has changed",
            f"the context of {resource_id!r} was replaced (it is now the output of version "
            f"{context.load.version}) after this cursor was given out: read it again "
            "from the first page, without a cursor",
        )
    cursor = ContextCursor(context.load, next(reversed(page.records))) if page.more else None
    return ContextPagePublic(
        resource_id=resource_id,
        version=context.load.version,
        record_count=context.record_count,
        records=page.records,
        next_cursor=cursor.encode() if cursor else None,
    )
