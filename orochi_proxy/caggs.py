"""Continuous aggregates with TimescaleDB's names.

``CREATE MATERIALIZED VIEW v WITH (timescaledb.continuous) AS SELECT time_bucket(w, time) AS
bucket, ..., aggregates FROM hypertable GROUP BY bucket, ...`` creates, on the metadata node, a
materialization table ``_timescaledb_internal._materialized_hypertable_<id>`` (the query's
columns) and the view ``v`` over it; querying ``v`` returns the materialized rollup
(TimescaleDB's ``materialized_only = true``).

Refreshing a window ``[start, end)`` (``CALL refresh_continuous_aggregate('v', start, end)``, or
the ``policy_refresh_continuous_aggregate`` job of ``add_continuous_aggregate_policy``) widens it
to whole buckets, runs the defining query with ``time >= start AND time < end`` added through the
proxy's own distributed execution (chunk exclusion, partial aggregates on the nodes), and replaces
the buckets of the window in the materialization table in one metadata-node transaction: a
reader sees the old rollup or the new one, and a crash leaves the old one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType, ObjectType

from executor import distributed
from executor import protocol as pg
from executor.copyio import copy_in
from executor.protocol import PgError
from orochi_proxy.chunks import ensure_chunks
from orochi_proxy.distinsert import _Rows, copy_text_value
from orochi_proxy.localexec import BOOL, INT4, TEXT, VOID, ParamSpec, admin_function
from policies import jobs
from rewriter import combine
from rewriter.model import TableInfo
from rewriter.planner import plan_statement
from rewriter.quoting import qualified_name, quote_ident, quote_literal

if TYPE_CHECKING:
    from orochi_proxy.distsession import DistributedRunner
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session

MAT_SCHEMA = "_timescaledb_internal"
SCHEMA = "orochi_catalog"
# A catalog change written in the client's session: bump the version and tell the replicas.
_BUMP = (
    f"UPDATE {SCHEMA}.catalog_version SET version = version + 1; "
    f"SELECT pg_notify('orochi_catalog_changed', version::text) FROM {SCHEMA}.catalog_version"
)


@dataclass(frozen=True)
class Cagg:
    cagg_id: int
    view_schema: str
    view_name: str
    hypertable_id: int
    mat_schema: str
    mat_table: str
    query: str
    bucket_column: str

    @property
    def mat(self) -> str:
        return qualified_name(self.mat_schema, self.mat_table)


# ------------------------------------------------------------------------------ analysis
def is_continuous(stmt: ast.Node) -> bool:
    """``CREATE MATERIALIZED VIEW ... WITH (timescaledb.continuous)``."""
    if not isinstance(stmt, ast.CreateTableAsStmt) or stmt.objtype != ObjectType.OBJECT_MATVIEW:
        return False
    return any(
        (d.defnamespace or "").lower() == "timescaledb" and d.defname.lower() == "continuous"
        for d in (stmt.into.options or ())
    )


def _time_bucket_target(select: ast.SelectStmt, time_column: str) -> tuple[str, ast.FuncCall]:
    """The output column holding ``time_bucket(..., <time column>, ...)`` and the call itself."""
    for target in select.targetList or ():
        v = target.val
        if isinstance(v, ast.FuncCall) and v.funcname[-1].sval == "time_bucket" and v.args and len(v.args) >= 2:
            arg = v.args[1]
            if isinstance(arg, ast.ColumnRef) and arg.fields[-1].sval == time_column:
                return target.name or "time_bucket", v
    raise PgError(
        "0A000",
        f"a continuous aggregate needs time_bucket(..., {time_column}) in its select list",
        hint=f"SELECT time_bucket(INTERVAL '1 hour', {time_column}) AS bucket, ... GROUP BY bucket",
    )


def _hypertable_of(server: ProxyServer, select: ast.SelectStmt, search_path: tuple[str, ...]) -> TableInfo:
    froms = list(select.fromClause or ())
    if len(froms) != 1 or not isinstance(froms[0], ast.RangeVar):
        raise PgError("0A000", "a continuous aggregate must read exactly one hypertable (no joins or subqueries)")
    rv = froms[0]
    table = server.catalog.model.lookup(rv.schemaname, rv.relname, search_path)
    if table is None or table.hypertable is None:
        raise PgError("TS001", f'table "{rv.relname}" is not a hypertable')
    rv.schemaname = table.schema  # stored qualified: refreshes run with any search_path
    return table


def _with_window(query: str, time_column: str, lo: str | None, hi: str | None) -> str:
    """The defining query with ``time >= lo AND time < hi`` ANDed to its WHERE clause."""
    select = parse_sql(query)[0].stmt
    conds = []
    col = ast.ColumnRef(fields=(ast.String(sval=time_column),))
    for op, value in ((">=", lo), ("<", hi)):
        if value is not None:
            conds.append(ast.A_Expr(kind=A_Expr_Kind.AEXPR_OP, name=(ast.String(sval=op),), lexpr=col,
                                    rexpr=ast.A_Const(val=ast.String(sval=value))))
    if select.whereClause is not None:
        conds.insert(0, select.whereClause)
    if conds:
        select.whereClause = conds[0] if len(conds) == 1 else ast.BoolExpr(boolop=BoolExprType.AND_EXPR, args=tuple(conds))
    return combine.deparse(select)


# ------------------------------------------------------------------------------ catalog
async def _load_one(sql: jobs.SqlRunner, where: str, missing: str) -> Cagg:
    rows = await sql(
        f"SELECT cagg_id::text, view_schema, view_name, hypertable_id::text, mat_schema, mat_table, query, bucket_column "
        f"FROM {SCHEMA}.continuous_aggregates WHERE {where} ORDER BY view_schema = 'public' DESC LIMIT 1"
    )
    if not rows:
        raise PgError("42P01", f"continuous aggregate {missing} does not exist")
    r = rows[0]
    return Cagg(int(r[0]), r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7])  # type: ignore[arg-type]


async def load(server: ProxyServer, schema: str | None, name: str, sql: jobs.SqlRunner) -> Cagg:
    where = f"view_name = {quote_literal(name)}" + (f" AND view_schema = {quote_literal(schema)}" if schema else "")
    return await _load_one(sql, where, f'"{name}"')


async def load_by_id(sql: jobs.SqlRunner, cagg_id: int) -> Cagg:
    return await _load_one(sql, f"cagg_id = {int(cagg_id)}", str(cagg_id))


# ------------------------------------------------------------------------------ refresh
def server_context(server: ProxyServer, database: str, write) -> distributed.ExecContext:
    """An execution context without a client session (jobs, refreshes): text results to ``write``."""
    md = server.catalog.metadata_node

    async def drain() -> None:
        return None

    return distributed.ExecContext(
        database=database,
        pool_for=lambda node_id: server.node_pool(node_id, database),
        metadata_pool=lambda: server.metadata_pool(database),
        metadata_node_id=md.node_id if md is not None else None,
        write=write,
        drain=drain,
        settings={"DateStyle": "ISO, MDY", "TimeZone": "UTC", "IntervalStyle": "postgres", "extra_float_digits": "3"},
        type_names=server.type_names.lookup,
        result_formats=[0],
        decider=server.txlog.decider(),
        ensure_chunks=lambda table, needs: ensure_chunks(server, database, table, needs),
        hypertable_of=lambda table: getattr(server.catalog.model.tables.get((table.schema, table.name)), "hypertable", None),
    )


async def _scalar(server: ProxyServer, database: str, sql: str) -> str | None:
    pool = server.metadata_pool(database)
    async with pool.connection(reset=True) as conn:
        rows = await conn.simple_query(f"SET TimeZone = 'UTC'; {sql}")
    return rows[0][0].decode() if rows and rows[0][0] is not None else None  # type: ignore[union-attr]


async def _bucket_edge(
    server: ProxyServer, database: str, cagg: Cagg, value: str | None, time_type: str, *, up: bool = False
) -> str | None:
    """A window edge moved to a bucket boundary (the aggregate's own time_bucket arguments):
    down for the end, ``up`` for the start, so only buckets wholly inside the window refresh."""
    if value is None:
        return None
    select = parse_sql(cagg.query)[0].stmt
    call = None
    for target in select.targetList:
        if (target.name or "time_bucket") == cagg.bucket_column and isinstance(target.val, ast.FuncCall):
            call = copy.deepcopy(target.val)
    if call is None:
        raise PgError("XX000", f"continuous aggregate {cagg.view_name} lost its time_bucket column")
    edge = ast.TypeCast(arg=ast.A_Const(val=ast.String(sval=value)), typeName=ast.TypeName(names=(ast.String(sval=time_type),)))
    args = list(call.args)
    args[1] = edge
    call.args = tuple(args)
    down = combine.deparse(call)
    if not up:
        return await _scalar(server, database, f"SELECT ({down})::text")
    args[1] = ast.A_Expr(kind=A_Expr_Kind.AEXPR_OP, name=(ast.String(sval="+"),), lexpr=edge, rexpr=args[0])
    call.args = tuple(args)
    later = combine.deparse(call)
    edge_sql = combine.deparse(edge)
    return await _scalar(server, database, f"SELECT (CASE WHEN {down} = {edge_sql} THEN {down} ELSE {later} END)::text")


async def refresh(server: ProxyServer, database: str, cagg: Cagg, start: str | None, end: str | None) -> int:
    """Re-materialize the whole buckets in ``[start, end)`` (None: unbounded); returns rows written."""
    table = next(
        (t for t in server.catalog.model.tables.values() if t.hypertable is not None and t.hypertable.hypertable_id == cagg.hypertable_id),
        None,
    )
    if table is None or table.hypertable is None:
        raise PgError("TS001", f"the hypertable of continuous aggregate {cagg.view_name} no longer exists")
    ht = table.hypertable
    lo = await _bucket_edge(server, database, cagg, start, ht.time_type, up=True)
    hi = await _bucket_edge(server, database, cagg, end, ht.time_type)
    if lo is not None and hi is not None:
        ordered = await _scalar(server, database, f"SELECT {quote_literal(lo)}::{ht.time_type} < {quote_literal(hi)}::{ht.time_type}")
        if ordered != "t":
            return 0  # the window holds no whole bucket
    sql = _with_window(cagg.query, ht.time_column, lo, hi)
    model = server.catalog.model
    plan = plan_statement(parse_sql(sql)[0].stmt, sql, model, ("public",), model.aggregate_names)
    if plan is None or plan.kind not in ("select", "ref_select"):
        raise PgError("0A000", f"the query of continuous aggregate {cagg.view_name} cannot run distributed")
    sink = _Rows()
    await distributed.execute(plan, server_context(server, database, sink.write))
    lines = [b"\t".join(copy_text_value(v) for v in row) + b"\n" for row in sink.rows]
    bucket = quote_ident(cagg.bucket_column)
    conds = ["true"]
    if lo is not None:
        conds.append(f"{bucket} >= {quote_literal(lo)}")
    if hi is not None:
        conds.append(f"{bucket} < {quote_literal(hi)}")
    pool = server.metadata_pool(database)
    async with pool.connection(reset=True) as conn:
        try:
            await conn.simple_query(f"BEGIN; SET LOCAL TimeZone = 'UTC'; DELETE FROM {cagg.mat} WHERE {' AND '.join(conds)}")
            if lines:
                await copy_in(conn, f"COPY {cagg.mat} FROM STDIN", lines)
            await conn.simple_query("COMMIT")
        except BaseException:
            await conn.rollback_quietly()
            raise
    return len(lines)


# ------------------------------------------------------------------------------ DDL
async def create(runner: DistributedRunner, stmt: ast.CreateTableAsStmt) -> str:
    """``CREATE MATERIALIZED VIEW v WITH (timescaledb.continuous) AS ...`` (see module doc)."""
    server, session = runner.server, runner.session
    if session.tx_status != pg.TX_IDLE:
        raise PgError("25001", "CREATE MATERIALIZED VIEW ... WITH (timescaledb.continuous) cannot run inside a transaction block")
    unknown = [d.defname for d in stmt.into.options or () if (d.defnamespace or "").lower() != "timescaledb" or d.defname.lower() not in ("continuous", "materialized_only")]
    if unknown:
        raise PgError("0A000", f"option {unknown[0]} is not supported for continuous aggregates")
    select = stmt.query
    if not isinstance(select, ast.SelectStmt) or select.op not in (None, 0) or select.withClause is not None:
        raise PgError("0A000", "a continuous aggregate must be a plain SELECT ... GROUP BY")
    search_path = await runner.current_search_path()
    table = _hypertable_of(server, select, search_path)
    ht = table.hypertable
    assert ht is not None
    bucket_column, _ = _time_bucket_target(select, ht.time_column)
    if not select.groupClause:
        raise PgError("0A000", "a continuous aggregate needs GROUP BY on its time_bucket column")
    query = combine.deparse(select)
    rv = stmt.into.rel
    view_schema = rv.schemaname or search_path[0]
    view_name = rv.relname
    if (view_schema, view_name) in server.catalog.caggs:
        if stmt.if_not_exists:
            return "CREATE MATERIALIZED VIEW"
        raise PgError("42P07", f'relation "{view_name}" already exists')
    sql = session.dist.text_rows
    cagg_id = int((await sql(f"SELECT nextval(pg_get_serial_sequence('{SCHEMA}.continuous_aggregates', 'cagg_id'))::text"))[0][0])  # type: ignore[arg-type]
    mat_table = f"_materialized_hypertable_{cagg_id}"
    mat = qualified_name(MAT_SCHEMA, mat_table)
    view = qualified_name(view_schema, view_name)
    # One simple Query = one implicit transaction: all of it or nothing.
    await sql(
        f"CREATE SCHEMA IF NOT EXISTS {MAT_SCHEMA}; "
        f"CREATE TABLE {mat} AS {query} WITH NO DATA; "
        f"CREATE INDEX ON {mat} ({quote_ident(bucket_column)}); "
        f"CREATE VIEW {view} AS SELECT * FROM {mat}; "
        f"INSERT INTO {SCHEMA}.continuous_aggregates (cagg_id, view_schema, view_name, hypertable_id, mat_schema, "
        f"mat_table, query, bucket_column) VALUES ({cagg_id}, {quote_literal(view_schema)}, {quote_literal(view_name)}, "
        f"{ht.hypertable_id}, {quote_literal(MAT_SCHEMA)}, {quote_literal(mat_table)}, {quote_literal(query)}, "
        f"{quote_literal(bucket_column)}); "
        + _BUMP
    )
    await server.catalog.reload()
    if not stmt.into.skipData:
        cagg = await load(server, view_schema, view_name, sql)
        rows = await refresh(server, session.database, cagg, None, None)
        session.client.write(pg.notice_response(f'refreshing continuous aggregate "{view_name}": {rows} rows materialized'))
    return "CREATE MATERIALIZED VIEW"


async def drop(runner: DistributedRunner, stmt: ast.DropStmt) -> str:
    """``DROP MATERIALIZED VIEW`` of continuous aggregates: view, materialization, policies."""
    server, session = runner.server, runner.session
    sql = session.dist.text_rows
    for obj in stmt.objects or ():
        names = [x.sval for x in obj]
        schema, name = (names[-2] if len(names) >= 2 else None), names[-1]
        try:
            cagg = await load(server, schema, name, sql)
        except PgError:
            if stmt.missing_ok:
                continue
            raise
        for job in await jobs.find_jobs(sql, proc_name="policy_refresh_continuous_aggregate"):
            if (job.config or {}).get("mat_hypertable_id") == cagg.cagg_id:
                await jobs.delete_job(sql, job.job_id)
        await sql(
            f"DROP VIEW IF EXISTS {qualified_name(cagg.view_schema, cagg.view_name)}; "
            f"DROP TABLE IF EXISTS {cagg.mat}; "
            f"DELETE FROM {SCHEMA}.continuous_aggregates WHERE cagg_id = {cagg.cagg_id}; " + _BUMP
        )
    await server.catalog.reload()
    return "DROP MATERIALIZED VIEW"


async def run_statement(runner: DistributedRunner, stmt: ast.Node) -> str | None:
    """The continuous-aggregate DDL in ``stmt``, or None if it is none."""
    if is_continuous(stmt):
        return await create(runner, stmt)  # type: ignore[arg-type]
    if isinstance(stmt, ast.DropStmt) and stmt.removeType == ObjectType.OBJECT_MATVIEW:
        return await drop(runner, stmt)
    return None


# ------------------------------------------------------------------------------ admin SQL
@admin_function(
    "refresh_continuous_aggregate",
    [ParamSpec("continuous_aggregate", TEXT), ParamSpec("window_start", TEXT, None), ParamSpec("window_end", TEXT, None)],
    [],
    needs_session=True,
    procedure=True,
)
async def refresh_continuous_aggregate(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Materialize the whole buckets of ``[window_start, window_end)`` (NULL: unbounded)."""
    if a["continuous_aggregate"] is None:
        raise PgError("22004", "invalid continuous aggregate")
    if session.tx_status != pg.TX_IDLE:
        raise PgError("25001", "refresh_continuous_aggregate() cannot run inside a transaction block")
    schema, _, name = a["continuous_aggregate"].rpartition(".")
    cagg = await load(server, schema or None, name, session.dist.text_rows)
    await refresh(server, session.database, cagg, a["window_start"], a["window_end"])
    return []


@admin_function(
    "add_continuous_aggregate_policy",
    [
        ParamSpec("continuous_aggregate", TEXT),
        ParamSpec("start_offset", TEXT, None),
        ParamSpec("end_offset", TEXT, None),
        ParamSpec("schedule_interval", TEXT, None),
        ParamSpec("if_not_exists", BOOL, False),
        ParamSpec("initial_start", TEXT, None),
        ParamSpec("timezone", TEXT, None),
    ],
    [("add_continuous_aggregate_policy", INT4)],
    needs_session=True,
)
async def add_continuous_aggregate_policy(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Refresh ``[now() - start_offset, now() - end_offset)`` every schedule_interval; returns the job id."""
    if a["continuous_aggregate"] is None or a["schedule_interval"] is None:
        raise PgError("22004", "continuous_aggregate and schedule_interval must not be NULL")
    schema, _, name = a["continuous_aggregate"].rpartition(".")
    sql = session.dist.text_rows
    cagg = await load(server, schema or None, name, sql)
    for job in await jobs.find_jobs(sql, proc_name="policy_refresh_continuous_aggregate"):
        if (job.config or {}).get("mat_hypertable_id") == cagg.cagg_id:
            if a["if_not_exists"]:
                return [(job.job_id,)]
            raise PgError("42710", f'continuous aggregate policy already exists for "{name}"')
    config = {"mat_hypertable_id": cagg.cagg_id, "start_offset": a["start_offset"], "end_offset": a["end_offset"]}
    job_id = await jobs.add_job(
        sql, "policy_refresh_continuous_aggregate", a["schedule_interval"], config=config,
        initial_start=a["initial_start"], fixed_schedule=a["initial_start"] is not None,
    )
    server.jobs.wake()
    return [(job_id,)]


@admin_function(
    "remove_continuous_aggregate_policy",
    [ParamSpec("continuous_aggregate", TEXT), ParamSpec("if_not_exists", BOOL, False), ParamSpec("if_exists", BOOL, None)],
    [("remove_continuous_aggregate_policy", VOID)],
    needs_session=True,
)
async def remove_continuous_aggregate_policy(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Remove the continuous aggregate's refresh policy."""
    schema, _, name = (a["continuous_aggregate"] or "").rpartition(".")
    sql = session.dist.text_rows
    cagg = await load(server, schema or None, name, sql)
    found = [j for j in await jobs.find_jobs(sql, proc_name="policy_refresh_continuous_aggregate") if (j.config or {}).get("mat_hypertable_id") == cagg.cagg_id]
    if not found and not (a["if_exists"] or a["if_not_exists"]):
        raise PgError("42704", f'continuous aggregate policy not found for "{name}"')
    for job in found:
        await jobs.delete_job(sql, job.job_id)
    return [("",)]
