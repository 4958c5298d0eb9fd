"""Reading resource contexts (the ETL's output) without loading a large one whole.

A context is a map of records (dotted path -> value), and its size `record_count`.
Its records are kept in chunks (`ResourceContextChunk`: in path order, 1,000 a row,
written with the context by the load). Pages of it are cut by PostgreSQL, in path
order (`COLLATE "C"`: UTF-8 byte order, which is also Python's `str` order): after
a path, under a prefix or among chosen paths, at most `limit` records. A page costs
what it returns plus a chunk at most (for chosen paths: the chunks that hold them),
whatever the size of the context. Only the page travels to Python, as one JSON object.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Integer, ScalarSelect, func, literal, select, text, true
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.selectable import TextualSelect

from upsertflow.models import ResourceContext, ResourceContextChunk


@dataclass(frozen=True)
class ContextLoad:
    """One load of a resource's context: the version it is the output of, and when."""

    version: int
    loaded_at: datetime


@dataclass(frozen=True)
class ContextSummary:
    """Which load of a resource's context this is, and how many records it holds."""

    load: ContextLoad
    record_count: int
    #: The pipeline output version that computed it; None if unknown (loaded before).
    pipeline_version: int | None = None


@dataclass(frozen=True)
class PageQuery:
    """Which records of a context to return: all filters apply together."""

    limit: int  # at most this many
    after: str = ""  # only paths after this one
    prefix: str = ""  # only paths that start with this
    paths: tuple[str, ...] | None = None  # only these exact paths
    #: Only from this load of the context (a cursor's): another one returns no records.
    of: ContextLoad | None = None


@dataclass(frozen=True)
class ContextPage:
    context: ContextSummary | None  # None: the resource has no context (yet)
    records: dict[str, Any]  # path -> value, in path order
    more: bool  # whether more records follow (that the same filters select)


_record = func.jsonb_each(ResourceContextChunk.records).table_valued("key", "value")
#: Every record of the context in the enclosing query (a `resource_contexts` row), as one
#: object from its chunks: for a small context only (a large one is read page by page).
ALL_RECORDS: ScalarSelect[Any] = (
    select(
        func.coalesce(
            func.jsonb_object_agg(_record.c.key, _record.c.value, type_=JSONB),
            literal({}, JSONB),
            type_=JSONB,
        )
    )
    .select_from(ResourceContextChunk)
    .join(_record, true())
    .where(ResourceContextChunk.resource_id == ResourceContext.resource_id)
    .scalar_subquery()
)

#: The records a page may hold: of the requested load, after the cursor, under the prefix.
_PAGE_FILTER = """
    WHERE (CAST(:of_version AS integer) IS NULL
           OR (context.version = :of_version AND context.loaded_at = :of_loaded_at))
      AND record.key COLLATE "C" > :after
      AND starts_with(record.key, :prefix)
"""

#: All records in path order: the chunks from the one holding the first record a page may
#: hold, as many as make `limit` records after it (those under a prefix follow each other).
_IN_ORDER = f"""
    SELECT record.key, record.value
    FROM (
        SELECT chunk.records,
               sum(chunk.record_count) OVER in_order - chunk.record_count
               - first_value(chunk.record_count) OVER in_order AS before
        FROM resource_context_chunks AS chunk
        WHERE chunk.resource_id = context.resource_id
          AND chunk.last_path > :after
          AND chunk.last_path >= :prefix
        WINDOW in_order AS (ORDER BY chunk.last_path)
    ) AS chunk
    CROSS JOIN LATERAL jsonb_each(chunk.records) AS record
    {_PAGE_FILTER}
      AND chunk.before < :fetch
    ORDER BY record.key COLLATE "C"
    LIMIT :fetch
"""

#: The records of chosen paths: only the chunks that may hold one of them.
_CHOSEN = f"""
    SELECT record.key, record.value
    FROM resource_context_chunks AS chunk
    CROSS JOIN LATERAL jsonb_each(chunk.records) AS record
    {_PAGE_FILTER}
      AND chunk.resource_id = context.resource_id
      AND chunk.last_path IN (
          SELECT (SELECT candidate.last_path
                  FROM resource_context_chunks AS candidate
                  WHERE candidate.resource_id = context.resource_id
                    AND candidate.last_path >= path
                  ORDER BY candidate.last_path
                  LIMIT 1)
          FROM unnest(CAST(:paths AS text[])) AS path
          WHERE path COLLATE "C" > :after AND starts_with(path, :prefix))
      AND record.key IN (SELECT unnest(CAST(:paths AS text[])))
    ORDER BY record.key COLLATE "C"
    LIMIT :fetch
"""


def _page_statement(page: str) -> TextualSelect:
    """The resource's context summary and a page of it, in one snapshot.

    The page's `fetch` records come as one JSON object, built in path order by
    PostgreSQL: one value for Python to decode, not one per record.
    """
    return text(
        f"""
        SELECT context.version, context.loaded_at,
               context.record_count,
               page.records
        FROM resources AS resource
        LEFT JOIN resource_contexts AS context ON context.resource_id = resource.id
        LEFT JOIN LATERAL (
            SELECT json_object_agg(rows.key, rows.value ORDER BY rows.key COLLATE "C")
                AS records
            FROM ({page}) AS rows
        ) AS page ON context.resource_id IS NOT NULL
        WHERE resource.id = :resource_id
        """
    ).columns(
        version=Integer,
        loaded_at=DateTime(timezone=True),
        record_count=Integer,
        records=JSON,
    )


_PAGE_IN_ORDER = _page_statement(_IN_ORDER)
_PAGE_OF_PATHS = _page_statement(_CHOSEN)


async def read_context_page(
    session: AsyncSession, resource_id: str, query: PageQuery
) -> ContextPage | None:
    """Return a page of the resource's context; None if there is no such resource.

    One statement, so the summary and the records are of the same load of the context.
    """
    parameters: dict[str, Any] = {
        "resource_id": resource_id,
        "after": query.after,
        "prefix": query.prefix,
        "fetch": query.limit + 1,  # one more: whether more follow
        "of_version": query.of.version if query.of else None,
        "of_loaded_at": query.of.loaded_at if query.of else None,
    }
    if query.paths is None:
        statement = _PAGE_IN_ORDER
    else:
        statement, parameters["paths"] = _PAGE_OF_PATHS, list(query.paths)
    row = (await session.execute(statement, parameters)).one_or_none()
    if row is None:
        return None
    if row.version is None:
        return ContextPage(context=None, records={}, more=False)
    records: dict[str, Any] = row.records or {}
    more = len(records) > query.limit
    if more:
        records.popitem()  # the one more
    summary = ContextSummary(ContextLoad(row.version, row.loaded_at), row.record_count)
    return ContextPage(summary, records, more)
