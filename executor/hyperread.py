"""Reading hypertables: chunk exclusion by time, and compressed (warm) chunks in the task SQL.

Pure planning over the catalog's chunk list at execution time (the plan may be cached; the
chunk list comes from the live catalog through ``ExecContext.hypertable_of``):

* :func:`prune_chunks` — the chunks whose range overlaps the time range of the WHERE clause
  (``rewriter.timerange.time_bounds``); shards with none are not contacted.
* :func:`apply_chunks` — also, when kept chunks are compressed, a per-execution copy of the plan
  whose task SQL reads the shard as ``(heap UNION ALL decoded segments of its warm chunks)``,
  with the time range turned into min/max conditions so segments that cannot match are not
  unnested. The node's planner pushes the WHERE clause into both branches.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from executor.protocol import PgError
from policies import compression
from rewriter import timerange
from rewriter.model import ChunkInfo, HypertableInfo, TableInfo
from rewriter.planner import Plan
from rewriter.quoting import qualified_name, quote_ident

if TYPE_CHECKING:
    from executor.distributed import ExecContext


def current_hypertable(plan: Plan, ctx: ExecContext) -> tuple[TableInfo, HypertableInfo | None]:
    table = plan.tables[plan.first_distributed]
    ht = ctx.hypertable_of(table) if ctx.hypertable_of is not None else table.hypertable
    return table, ht


NOW_SLACK = timedelta(seconds=60)  # proxy clock vs the nodes' now(): prune only what both exclude


def time_range(plan: Plan, ctx: ExecContext, ht: HypertableInfo) -> timerange.Range:
    """The internal time range the plan's WHERE clause lets rows of the hypertable have.

    ``now()`` is the node transaction's start, which the proxy does not know exactly: the range
    is the hull of the ranges for now = proxy clock -/+ NOW_SLACK (every bound is monotonic in
    now), and inside a client's transaction block (whose now() may be long past) now() is not
    used at all.
    """
    if plan.time_filter is None:
        return timerange.FULL
    where, aliases = plan.time_filter

    from executor.distributed import UnknownValue, _param_text

    def param(n: int) -> str | None:
        try:
            return _param_text(ctx, n)
        except (UnknownValue, IndexError):
            return None

    tz = ctx.settings.get("TimeZone") or "UTC"

    def bounds(now: datetime | None) -> timerange.Range:
        return timerange.time_bounds(where, ht.time_column, set(aliases), param, now, column_type=ht.time_type, timezone=tz)

    if ctx.txn is not None:
        return bounds(None)
    clock = datetime.now(UTC).replace(tzinfo=None)
    return bounds(clock - NOW_SLACK).hull(bounds(clock + NOW_SLACK))


def prune_chunks(plan: Plan, ctx: ExecContext, shards: list[int]) -> tuple[list[int], list[ChunkInfo], int]:
    """Shards left after chunk exclusion, the chunks kept, and the hypertable's chunk count.

    A shard none of whose chunks overlaps the time range holds no matching row and is not
    contacted; if no shard is left, the first one still runs so the answer has its shape
    (aggregates over no rows).
    """
    _, ht = current_hypertable(plan, ctx)
    if ht is None:
        return shards, [], 0
    rng = time_range(plan, ctx, ht) if plan.time_filter is not None else timerange.FULL
    kept = [c for c in ht.chunks if c.shard_index in shards and rng.contains_any(c.range_start, c.range_end)]
    with_chunks = {c.shard_index for c in kept}
    left = [s for s in shards if s in with_chunks]
    return (left or shards[:1]), kept, len(ht.chunks)


def apply_chunks(plan: Plan, ctx: ExecContext, shards: list[int]) -> tuple[list[int], Plan]:
    """Shards to run after chunk exclusion, and the plan to run them with (see module doc)."""
    table, ht = current_hypertable(plan, ctx)
    if ht is None:
        return shards, plan
    if plan.time_filter is not None and len(shards) > 1:
        shards, kept, _ = prune_chunks(plan, ctx, shards)
    else:
        kept = [c for c in ht.chunks if c.shard_index in shards]
    warm = [c for c in kept if c.tier == "warm"]
    if not warm:
        return shards, plan
    if plan.kind != "select":
        raise PgError(
            "0A000",
            f"{plan.command} on compressed chunks of hypertable {table.name} is not supported",
            hint="Decompress the chunks it touches first (SELECT decompress_chunk(c) for each), or restrict it to a time range without compressed chunks.",
        )
    rng = time_range(plan, ctx, ht)
    if plan.time_filter is not None:
        warm = [c for c in warm if rng.contains_any(c.range_start, c.range_end)]
    by_shard: dict[int, list[ChunkInfo]] = {}
    for c in warm:
        by_shard.setdefault(c.shard_index, []).append(c)
    index = plan.first_distributed
    sql = {s: shard_with_segments(table, ht, s, chunks, rng) for s, chunks in by_shard.items()}
    return shards, dataclasses.replace(plan, warm_table=index, warm_sql=sql)


def _predicates(ht: HypertableInfo, rng: timerange.Range) -> list[compression.Predicate]:
    out = []
    if rng.lo is not None and rng.lo not in (timerange.NOBEGIN, timerange.NOEND):
        out.append(compression.Predicate(ht.time_column, ">=", timerange.from_internal(ht.time_type, rng.lo)))
    if rng.hi is not None and rng.hi not in (timerange.NOBEGIN, timerange.NOEND):
        out.append(compression.Predicate(ht.time_column, "<", timerange.from_internal(ht.time_type, rng.hi)))
    return out


def shard_with_segments(table: TableInfo, ht: HypertableInfo, shard_index: int, chunks: list[ChunkInfo], rng: timerange.Range) -> str:
    """``SELECT`` of a shard's rows: its heap (every chunk's) and its warm chunks' segments."""
    settings = ht.compression or {}
    columns = [tuple(c) for c in settings.get("columns", [])]
    if not columns:
        raise PgError("XX000", f"hypertable {table.name} has compressed chunks but no recorded column types")
    cs = compression.CompressionSettings(list(settings.get("segmentby", [])), [tuple(o) for o in settings.get("orderby", [])])  # type: ignore[misc]
    predicates = _predicates(ht, rng)
    parent = qualified_name(table.schema, table.shard_name(table.shards[shard_index]))
    parts = [f"SELECT {', '.join(quote_ident(n) for n, _ in columns)} FROM {parent}"]
    for c in chunks:
        parts.append(compression.segments_sql(c.schema, c.name, columns, cs, ht.time_column, predicates))  # type: ignore[arg-type]
    return " UNION ALL ".join(parts)
