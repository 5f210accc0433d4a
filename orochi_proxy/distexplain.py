"""EXPLAIN [ANALYZE] of statements on distributed and reference tables.

The answer is one text column ``QUERY PLAN`` (as PostgreSQL's), made of the distributed plan —
strategy, shards kept out of the table's total, nodes, the SQL sent to one task — followed by
that node's own ``EXPLAIN`` of the task, indented. For a merged multi-shard SELECT the combine
query is shown too. ``EXPLAIN ANALYZE`` of a SELECT runs the whole distributed query (its rows
are counted and discarded) and the node's ``EXPLAIN ANALYZE`` of one task; EXPLAIN ANALYZE of a
write would run the write twice, so it gets 0A000.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pglast import ast
from pglast.stream import RawStream

from executor import distributed, hyperread
from executor import protocol as pg
from executor.protocol import PgError
from rewriter.intercept import Distributed
from rewriter.planner import plan_statement

if TYPE_CHECKING:
    from orochi_proxy.distsession import DistributedRunner


def _options(stmt: ast.ExplainStmt) -> dict[str, object]:
    out: dict[str, object] = {}
    for d in stmt.options or ():
        arg = d.arg
        if arg is None:
            out[d.defname] = True
        elif isinstance(arg, ast.String):
            out[d.defname] = arg.sval.lower()
        elif isinstance(arg, ast.Boolean):
            out[d.defname] = arg.boolval
        elif isinstance(arg, ast.Integer):
            out[d.defname] = bool(arg.ival)
        else:
            out[d.defname] = True
    return out


def _truthy(v: object) -> bool:
    return v is True or (isinstance(v, str) and v in ("true", "on", "1", "yes"))


async def explain(runner: DistributedRunner, action: Distributed, ctx: distributed.ExecContext) -> list[str]:
    """The QUERY PLAN lines for an EXPLAIN of a statement on catalog tables."""
    stmt: ast.ExplainStmt = action.stmt  # type: ignore[assignment]
    opts = _options(stmt)
    if str(opts.get("format", "text")) != "text":
        raise PgError("0A000", "EXPLAIN of distributed tables supports only FORMAT TEXT")
    analyze = _truthy(opts.get("analyze", False))
    inner_sql = RawStream()(stmt.query)
    model = runner.server.catalog.model
    search_path = await runner.current_search_path()
    plan = plan_statement(stmt.query, inner_sql, model, search_path, model.aggregate_names)
    if plan is None:
        raise PgError("0A000", "EXPLAIN of this statement on a distributed table is not supported")
    if analyze and plan.kind not in ("select", "ref_select"):
        raise PgError("0A000", "EXPLAIN ANALYZE of writes to distributed or reference tables is not supported", hint="Use EXPLAIN without ANALYZE.")
    lines: list[str] = []
    dist = [t for t in plan.tables if not t.is_reference]
    kept_chunks: list = []
    chunk_total: int | None = None
    total = dist[0].shard_count if dist else 1
    if plan.kind in ("ref_select", "ref_modify"):
        shards = [0]
        node = distributed._reference_read_node(plan, ctx) if plan.kind == "ref_select" else plan.tables[0].shards[0].node_ids[0]
        strategy = "reference table, one node" if plan.kind == "ref_select" else "reference table, every node (two-phase commit)"
        task_sql = plan.sql_for_shard(plan.template, 0)
        node_groups = {node: [0]}
    elif plan.kind == "insert":
        raise PgError("0A000", "EXPLAIN of INSERT into a distributed table is not supported yet")
    else:
        shards = distributed.resolve_shards(plan, ctx)
        if dist and dist[0].hypertable is not None:
            _, kept_chunks, chunk_total = hyperread.prune_chunks(plan, ctx, shards)
            shards, plan = hyperread.apply_chunks(plan, ctx, shards)
        if len(shards) <= 1:
            idx = shards[0] if shards else 0
            node = plan.tables[distributed._first_dist(plan)].shards[idx].node_ids[0]
            strategy = "router"
            task_sql = plan.sql_for_shard(plan.template, idx)
            node_groups = {node: [idx]}
        else:
            if plan.multi_error is not None:
                raise plan.multi_error
            node_groups = distributed._by_node(plan, shards)
            if plan.kind == "select":
                assert plan.split is not None and plan.worker_template is not None
                strategy = f"multi-shard, {plan.split.mode}"
                task_sql = distributed._union_all(plan, plan.worker_template, node_groups[next(iter(node_groups))])
            else:
                strategy = "multi-shard write (two-phase commit across nodes)"
                task_sql = plan.sql_for_shard(plan.template, node_groups[next(iter(node_groups))][0])
            node = next(iter(node_groups))
    info = runner.server.catalog.node(node)
    lines.append(f"Distributed Plan (orochi-proxy): {strategy}")
    lines.append(f"  Shards: {len(shards)} of {total}" + (" (pruned)" if len(shards) < total else ""))
    lines.append(f"  Nodes: {len(node_groups)}, tasks: {len(node_groups)}")
    if chunk_total is not None:
        lines.append(f"  Chunks: {len(kept_chunks)} of {chunk_total}" + (" (excluded by time)" if len(kept_chunks) < chunk_total else ""))
        for c in kept_chunks[:20]:
            lines.append(f"    {c.qualified} (shard index {c.shard_index}, {c.tier})")
        if len(kept_chunks) > 20:
            lines.append(f"    ... {len(kept_chunks) - 20} more")
    if analyze:
        started = time.perf_counter()
        counted = _Counter()
        await distributed.execute(plan, ctx.capturing(counted.write))
        ms = (time.perf_counter() - started) * 1000
        lines.append(f"  Rows returned: {counted.rows}, execution time: {ms:.3f} ms")
    if plan.kind == "select" and plan.split is not None and plan.split.mode == "combine" and len(shards) > 1:
        lines.append("  Combine query: runs on the metadata node over the partial rows")
    lines.append(f"  Task on node {info.node_id} ({info.address}):")
    lines.append(f"    SQL: {task_sql}")
    options = []
    for k, v in opts.items():
        if k == "format":
            continue
        options.append(f"{k.upper()} {'true' if _truthy(v) else 'false'}")
    explain_sql = f"EXPLAIN ({', '.join(options)}) {task_sql}" if options else f"EXPLAIN {task_sql}"
    for row in await distributed.collect_rows(ctx.pool_for(node), ctx, explain_sql):
        lines.append("    " + (row[0] or b"").decode())
    return lines


class _Counter:
    """Stands in for the client while EXPLAIN ANALYZE runs the query: counts DataRows."""

    def __init__(self) -> None:
        self.rows = 0

    def write(self, data: bytes) -> None:
        self.rows += sum(1 for t, _ in pg.iter_messages(data) if t == ord("D"))


def plan_rows(lines: list[str], *, simple: bool) -> bytes:
    out = []
    if simple:
        out.append(pg.row_description([pg.Field("QUERY PLAN", 25)]))
    out += [pg.data_row([line.encode()]) for line in lines]
    out.append(pg.command_complete("EXPLAIN"))
    return b"".join(out)
