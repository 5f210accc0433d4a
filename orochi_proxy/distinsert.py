"""INSERT ... SELECT into a distributed or reference table that cannot run shard by shard.

The proxy runs the SELECT itself — a multi-shard merge, a router query, reference or local
tables — collecting its rows as text, then routes each row by its distribution value and loads
the shards with COPY inside one transaction per node, two-phase committed across nodes (the
same path as ``COPY FROM STDIN``, see ``orochi_proxy.distcopy``). The rows are held in memory
between the two steps; that is the price of the general case (co-located INSERT ... SELECT is
pushed down instead and moves no rows through the proxy).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import TYPE_CHECKING

from pglast import parse_sql

from executor import distributed
from executor import protocol as pg
from executor.protocol import PgError
from orochi_proxy.chunks import ChunkRouter
from orochi_proxy.distcopy import ShardLoader
from rewriter.model import TableInfo
from rewriter.planner import Plan, plan_statement
from rewriter.quoting import qualified_name, quote_ident

if TYPE_CHECKING:
    from orochi_proxy.distsession import DistributedRunner

#: Rows routed between two turns of the event loop (~50 ms of work for a hypertable).
ROUTE_SLICE = 1000


def copy_text_value(value: bytes | None) -> bytes:
    """A value in COPY's text format (the inverse of ``executor.copyio.unescape_text_field``)."""
    if value is None:
        return b"\\N"
    return (
        value.replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")
    )


class _Rows:
    """Collects DataRows written by a distributed SELECT (text format)."""

    def __init__(self) -> None:
        self.rows: list[list[bytes | None]] = []

    def write(self, data: bytes) -> None:
        self.rows.extend(pg.decode_data_row(p) for t, p in pg.iter_messages(data) if t == ord("D"))


async def _select_rows(runner: DistributedRunner, sql: str, ctx: distributed.ExecContext) -> list[list[bytes | None]]:
    model = runner.server.catalog.model
    search_path = await runner.current_search_path()
    stmt = parse_sql(sql)[0].stmt
    inner = plan_statement(stmt, sql, model, search_path, model.aggregate_names)
    if inner is not None:
        if inner.kind not in ("select", "ref_select"):
            raise PgError("0A000", "INSERT ... SELECT needs a plain SELECT as its source")
        sink = _Rows()
        await distributed.execute(inner, ctx.capturing(sink.write))
        return sink.rows
    return await distributed.collect_rows(ctx.metadata_pool(), ctx, sql)


async def insert_select_via_proxy(runner: DistributedRunner, plan: Plan, ctx: distributed.ExecContext) -> None:
    table = plan.tables[0]
    names = list(plan.insert_columns)
    assert plan.select_sql is not None
    rows = await _select_rows(runner, plan.select_sql, ctx)
    if rows and len(rows[0]) != len(names):
        more = len(rows[0]) > len(names)
        raise PgError("42601", "INSERT has more expressions than target columns" if more else "INSERT has more target columns than expressions")
    missing = [c for c in table.fill if c not in names]
    if missing and rows:
        fill_plan = Plan("insert", plan.sql, [table], "", insert_fill=[table.fill[c] for c in missing])
        values = await distributed._fill_values(fill_plan, ctx, len(rows))
        for i, row in enumerate(rows):
            row.extend(values[j][i].encode() for j in range(len(missing)))
        names += missing
    key = names.index(table.dist_column) if not table.is_reference else -1
    chunker: ChunkRouter | None = None
    ht = table.hypertable
    if ht is not None:
        if ht.time_column not in names:
            raise PgError("23502", f'null value in column "{ht.time_column}" of relation "{table.name}" violates not-null constraint')
        t_index = names.index(ht.time_column)
        chunker = ChunkRouter(runner.server, runner.session.database, table, runner.session.output_settings())
    buffers: dict[int, list[bytes]] = defaultdict(list)
    for n, row in enumerate(rows):
        if n % ROUTE_SLICE == ROUTE_SLICE - 1:
            await asyncio.sleep(0)  # other clients' turn: routing 500k rows takes seconds
        if key >= 0:
            value = row[key]
            if value is None:
                raise PgError("23502", f'null value in distribution column "{table.dist_column}" of relation "{table.name}"')
            idx = distributed.shard_of(table.dist_type or "", value.decode(), table.shard_count)
            if idx is None or idx < 0:
                raise PgError("22P02", f'invalid input for distribution column "{table.dist_column}": "{value.decode()}"')
        else:
            idx = 0
        buffers[idx].append(b"\t".join(copy_text_value(v) for v in row) + b"\n")
        if chunker is not None:
            raw = row[t_index]
            chunker.note(idx, None if raw is None else raw.decode())
    if chunker is not None:
        await chunker.settle()
    await _load(table, names, buffers, ctx)
    ctx.write(pg.command_complete(f"INSERT 0 {len(rows)}"))


async def _load(table: TableInfo, names: list[str], buffers: dict[int, list[bytes]], ctx: distributed.ExecContext) -> None:
    """COPY each shard's rows to its copies: inside the client's block through its node
    transactions, which commit with the block; else in one transaction per node, two-phase
    committed across nodes (``ShardLoader``)."""
    cols = ", ".join(quote_ident(n) for n in names)
    loader = ShardLoader(ctx.pool_for, ctx.settings, ctx.txn, ctx.metadata_node_id)
    try:
        for idx, lines in buffers.items():
            shard = table.shards[idx]
            sql = f"COPY {qualified_name(table.schema, table.shard_name(shard))} ({cols}) FROM STDIN"
            await loader.copy(shard, sql, b"".join(lines))
        await loader.commit(ctx.decider or distributed._NO_LOG)
    finally:
        await loader.close()
