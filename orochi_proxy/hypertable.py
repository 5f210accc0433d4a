"""Hypertables with TimescaleDB's names: create_hypertable, add_dimension, set_chunk_time_interval.

A hypertable is a hash-distributed table whose shards are *partitioned by range of the time
column* on their nodes; each partition is a chunk, ``_timescaledb_internal._hyper_<h>_<c>_chunk``.
Without a space dimension the table is distributed by its time column over one shard (so every
router, merge, 2PC and DDL path of distributed tables applies unchanged); ``add_dimension`` /
``partitioning_column`` with ``number_partitions`` re-creates it distributed by that column over
that many shards, placed round-robin over the nodes.

Why native partitions as chunks: the node's planner prunes them itself (including run-time
pruning for ``$n`` and ``now()``), an INSERT or COPY into the shard is routed to its chunk by
PostgreSQL, and ``CREATE INDEX`` / ``ALTER TABLE`` on the shard reach every chunk. The proxy
only has to make sure a chunk exists before rows for its range arrive (:mod:`orochi_proxy.chunks`)
and prunes whole shards whose chunks cannot match (``rewriter.timerange``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from executor import protocol as pg
from executor.protocol import PgError
from executor.tabledef import read_table_definition
from orochi_proxy.catalog import CatalogError, HypertableSpec
from orochi_proxy.distribute import _check_session, _create_shards, _drop_shards, resolve_table
from orochi_proxy.localexec import BOOL, INT4, NAME, TEXT, ParamSpec, admin_function
from rewriter import timerange
from rewriter.intercept import AdminCall, DimensionArg
from rewriter.model import TableInfo, shard_table_name
from rewriter.quoting import qualified_name, quote_ident, quote_literal

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session

DEFAULT_CHUNK_INTERVAL = 7 * timerange.USECS_PER_DAY
MAX_SPACE_PARTITIONS = 32767


def time_type_of(type_sql: str) -> str:
    """Canonical time dimension type of a column's SQL type (typmods dropped), or 0A000."""
    base = re.sub(r"\(\s*\d+\s*\)", "", type_sql).strip()
    try:
        return timerange.normalize_type(base)
    except ValueError:
        raise PgError(
            "0A000",
            f"a time dimension of type {type_sql} is not supported",
            hint="Use a column of type timestamptz, timestamp, date, smallint, integer or bigint.",
        ) from None


async def interval_internal(session: Session, time_type: str, value: str | None) -> int:
    """A chunk interval argument in internal units (microseconds, or the integer itself)."""
    if value is None:
        if time_type not in ("timestamptz", "timestamp", "date"):
            raise PgError("22023", "integer dimensions require an explicit interval")
        return DEFAULT_CHUNK_INTERVAL
    text = value.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        n = int(text)
    else:
        if time_type not in ("timestamptz", "timestamp", "date"):
            raise PgError(
                "22023", f"invalid interval type for {time_type} dimension",
                hint="Use an integer chunk interval for an integer time column.",
            )
        rows = await session.dist.text_rows(
            f"SELECT (extract(epoch FROM {quote_literal(text)}::interval) * 1000000)::bigint"
        )
        n = int(rows[0][0] or 0)
    if n <= 0:
        raise PgError("22023", "invalid interval: must be a positive value")
    if time_type == "date" and n % timerange.USECS_PER_DAY:
        raise PgError("22023", "the chunk interval of a date column must be a whole number of days")
    return n


def _notice(session: Session, message: str, sqlstate: str = "00000") -> None:
    session.client.write(pg.notice_response(message, sqlstate=sqlstate))


def _new_form(call: AdminCall) -> bool:
    return any(isinstance(a, DimensionArg) for a in call.args) or any(n == "dimension" for n, _ in call.named)


def _create_hypertable_columns(call: AdminCall) -> tuple[tuple[str, int], ...]:
    if _new_form(call):
        return (("hypertable_id", INT4), ("created", BOOL))
    return (("hypertable_id", INT4), ("schema_name", NAME), ("table_name", NAME), ("created", BOOL))


@admin_function(
    "create_hypertable",
    [
        ParamSpec("relation", TEXT),
        ParamSpec("time_column_name", TEXT, None),
        ParamSpec("partitioning_column", TEXT, None),
        ParamSpec("number_partitions", INT4, None),
        ParamSpec("associated_schema_name", TEXT, None),
        ParamSpec("associated_table_prefix", TEXT, None),
        ParamSpec("chunk_time_interval", TEXT, None),
        ParamSpec("create_default_indexes", BOOL, True),
        ParamSpec("if_not_exists", BOOL, False),
        ParamSpec("partitioning_func", TEXT, None),
        ParamSpec("migrate_data", BOOL, False),
        ParamSpec("dimension", TEXT, None),
    ],
    [("hypertable_id", INT4), ("schema_name", NAME), ("table_name", NAME), ("created", BOOL)],
    needs_session=True,
    columns_for=_create_hypertable_columns,
)
async def create_hypertable(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Turn a table into a hypertable (TimescaleDB's classic and ``by_range`` forms)."""
    dim = a["dimension"] if isinstance(a["dimension"], DimensionArg) else None
    if isinstance(a["time_column_name"], DimensionArg):
        dim, a["time_column_name"] = a["time_column_name"], None
    if dim is not None:
        if dim.kind != "range":
            raise PgError("22023", "the first dimension of a hypertable must be by_range(...)")
        time_column, interval_text = dim.column, dim.setting
        new_form = True
    else:
        time_column, interval_text = a["time_column_name"], a["chunk_time_interval"]
        new_form = False
    if a["relation"] is None or time_column is None:
        raise PgError("22004", "relation and time column must not be NULL" if not new_form else "invalid dimension")
    if a["partitioning_func"] is not None:
        raise PgError("0A000", "partitioning_func is not supported", hint="Leave it out; space partitions use PostgreSQL's hash.")
    space, partitions = a["partitioning_column"], a["number_partitions"]
    if space is not None and partitions is None:
        raise PgError("22023", "invalid number of partitions: must be specified with a partitioning column")
    if partitions is not None and space is None:
        raise PgError("22023", "number_partitions needs partitioning_column")
    _check_session(server, session, "create_hypertable")
    schema, name = await resolve_table(session, a["relation"])
    existing = server.catalog.model.tables.get((schema, name))
    if existing is not None:
        if existing.hypertable is not None and a["if_not_exists"]:
            _notice(session, f'table "{name}" is already a hypertable, skipping', "42710")
            ht_id = existing.hypertable.hypertable_id
            return [(ht_id, False) if new_form else (ht_id, schema, name, False)]
        if existing.hypertable is not None:
            raise PgError("TS110", f'table "{name}" is already a hypertable')
        raise PgError("0A000", f'table "{name}" is already distributed', hint=f"undistribute_table('{name}') first.")
    ht_id = await _make_hypertable(
        server, session, schema, name, time_column, interval_text, space, partitions,
        default_indexes=bool(a["create_default_indexes"]), migrate=bool(a["migrate_data"]),
    )
    return [(ht_id, True) if new_form else (ht_id, schema, name, True)]


async def _make_hypertable(
    server: ProxyServer,
    session: Session,
    schema: str,
    name: str,
    time_column: str,
    interval_text: str | None,
    space: str | None,
    partitions: int | None,
    *,
    default_indexes: bool,
    migrate: bool,
) -> int:
    target = qualified_name(schema, name)
    tdef = await read_table_definition(session.dist.text_rows, schema, name)
    col = tdef.column(time_column)
    time_type = time_type_of(col.type_sql)
    interval = await interval_internal(session, time_type, interval_text)
    if space is not None:
        tdef.column(space)
        if not 1 <= (partitions or 0) <= MAX_SPACE_PARTITIONS:
            raise PgError("22023", f"invalid number of partitions: must be between 1 and {MAX_SPACE_PARTITIONS}")
    has_rows = (await session.dist.text_rows(f"SELECT EXISTS (SELECT 1 FROM {target})"))[0][0] == "t"
    if has_rows and not migrate:
        raise PgError(
            "22023", f'table "{name}" is not empty',
            hint="You can migrate data by specifying 'migrate_data => true' when calling this function.",
        )
    if not col.not_null:
        await session.dist.text_rows(f"ALTER TABLE {target} ALTER COLUMN {quote_ident(time_column)} SET NOT NULL")
        _notice(session, f'adding not-null constraint to column "{time_column}"')
    if default_indexes:
        await _default_indexes(session, schema, name, time_column, space)
    tdef = await read_table_definition(session.dist.text_rows, schema, name)
    dist_column = space or time_column
    dist_col = tdef.column(dist_column)
    if space is not None:
        tdef.check_distributable(dist_col.name)
    from rewriter import hashing

    dist_type = hashing.canonical_type(dist_col.type_sql) if space is not None else time_type
    shard_count = partitions or 1
    catalog = server.catalog
    _, nodes_by_index = catalog.colocation_for(dist_type, shard_count, "none")
    # Spread hypertables over the nodes: each starts its round-robin on the next node.
    turn = sum(1 for t in catalog.model.tables.values() if t.hypertable is not None)
    active = sorted(set(nodes_by_index)) if shard_count == 1 else []
    if active:
        all_nodes = [n.node_id for n in catalog.nodes if n.is_active]
        nodes_by_index = [all_nodes[turn % len(all_nodes)]]
    ids = await catalog.allocate_shard_ids(shard_count)
    shards = [(ids[i], i, [nodes_by_index[i]]) for i in range(shard_count)]
    partition_by = f"RANGE ({quote_ident(time_column)})"
    ddl = {
        sid: [f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}", *tdef.shard_ddl(shard_table_name(name, sid), sid, partition_by)]
        for sid, _, _ in shards
    }
    placement = {sid: nodes for sid, _, nodes in shards}
    created = {sid: (shard_table_name(name, sid), nodes) for sid, _, nodes in shards}
    from orochi_proxy.distribute import _fill_columns

    try:
        await install_functions(server, session.database)
        await _create_shards(server, session.database, ddl, placement)
        spec = HypertableSpec(time_column, time_type, interval, space, partitions)
        ht_id = await catalog.register_table(
            schema, name, "hash", dist_column, dist_type, None, shards, _fill_columns(tdef), hypertable=spec
        )
    except BaseException:
        await _drop_shards(server, session.database, schema, created)
        raise
    if has_rows:
        from orochi_proxy.chunks import migrate_rows

        try:
            await migrate_rows(server, session, catalog.model.tables[(schema, name)])
        except BaseException:
            await catalog.unregister_table(schema, name)
            await _drop_shards(server, session.database, schema, created)
            raise
        await session.dist.text_rows(f"TRUNCATE {target}")
    assert ht_id is not None
    return ht_id


async def _default_indexes(session: Session, schema: str, name: str, time_column: str, space: str | None) -> None:
    """TimescaleDB's default indexes: (time DESC), and (space, time DESC) with a space column,
    unless an index already leads with those columns."""
    target = qualified_name(schema, name)
    leading = {
        r[0]
        for r in await session.dist.text_rows(
            "SELECT string_agg(a.attname, ',' ORDER BY k.ord) FROM pg_catalog.pg_index i "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
            "JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            f"WHERE i.indrelid = {quote_literal(target)}::regclass AND k.ord <= 2 GROUP BY i.indexrelid"
        )
    }
    wanted = [(f"{name}_{time_column}_idx", [time_column])]
    if space is not None:
        wanted.append((f"{name}_{space}_{time_column}_idx", [space, time_column]))
    for index_name, cols in wanted:
        if any(lead is not None and lead.split(",")[: len(cols)] == cols for lead in leading):
            continue
        keys = ", ".join(f"{quote_ident(c)} DESC" if c == time_column else quote_ident(c) for c in cols)
        await session.dist.text_rows(f"CREATE INDEX IF NOT EXISTS {quote_ident(index_name[:63])} ON {target} ({keys})")


async def install_functions(server: ProxyServer, database: str) -> None:
    """time_bucket() and friends on every node and the metadata node (idempotent, versioned)."""
    from policies import timebucket

    nodes = [n.node_id for n in server.catalog.nodes if n.is_active]
    pools = [server.node_pool(n, database) for n in nodes]
    md = server.catalog.metadata_node
    if md is None or md.node_id not in nodes:
        pools.append(server.metadata_pool(database))
    for pool in pools:
        async with pool.connection() as conn:
            current = await conn.simple_query(timebucket.version_query())
            if not timebucket.is_current(int(current[0][0]) if current and current[0][0] else None):  # type: ignore[arg-type]
                await conn.run_in_transaction(timebucket.install_statements("public"))


def hypertable_of(server: ProxyServer, schema: str, name: str) -> TableInfo:
    table = server.catalog.model.tables.get((schema, name))
    if table is None or table.hypertable is None:
        raise PgError("TS001", f'table "{name}" is not a hypertable')
    return table


@admin_function(
    "set_chunk_time_interval",
    [ParamSpec("hypertable", TEXT), ParamSpec("chunk_time_interval", TEXT), ParamSpec("dimension_name", TEXT, None)],
    [("set_chunk_time_interval", 2278)],
    needs_session=True,
)
async def set_chunk_time_interval(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """New chunks get this interval; existing chunks keep their ranges (as in TimescaleDB)."""
    if a["hypertable"] is None or a["chunk_time_interval"] is None:
        raise PgError("22004", "hypertable and chunk_time_interval must not be NULL")
    schema, name = await resolve_table(session, a["hypertable"])
    table = hypertable_of(server, schema, name)
    ht = table.hypertable
    assert ht is not None
    if a["dimension_name"] not in (None, ht.time_column):
        raise PgError("22023", f'"{a["dimension_name"]}" is not the time dimension of "{name}"')
    interval = await interval_internal(session, ht.time_type, a["chunk_time_interval"])
    await server.catalog.set_chunk_interval(ht.hypertable_id, interval)
    return [("",)]


@admin_function(
    "add_dimension",
    [
        ParamSpec("hypertable", TEXT),
        ParamSpec("column_name", TEXT, None),
        ParamSpec("number_partitions", INT4, None),
        ParamSpec("chunk_time_interval", TEXT, None),
        ParamSpec("partitioning_func", TEXT, None),
        ParamSpec("if_not_exists", BOOL, False),
    ],
    [("dimension_id", INT4), ("schema_name", NAME), ("table_name", NAME), ("column_name", NAME), ("created", BOOL)],
    needs_session=True,
)
async def add_dimension(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """A hash (space) dimension: the hypertable is distributed by that column over the nodes.

    As in TimescaleDB the hypertable must be empty; it is re-created with ``number_partitions``
    shards (``by_hash(column, n)`` works too).
    """
    column, partitions = a["column_name"], a["number_partitions"]
    if isinstance(column, DimensionArg):
        if column.kind != "hash":
            raise PgError("0A000", "only one time dimension per hypertable is supported", hint="Add a by_hash(column, partitions) dimension.")
        column, partitions = column.column, int(column.setting or 0)
    if a["hypertable"] is None or column is None:
        raise PgError("22004", "hypertable and column_name must not be NULL")
    if a["chunk_time_interval"] is not None:
        raise PgError("0A000", "a second time dimension is not supported", hint="Give number_partitions for a hash dimension.")
    if partitions is None:
        raise PgError("22023", "invalid number of partitions: number_partitions is required for a hash dimension")
    _check_session(server, session, "add_dimension")
    schema, name = await resolve_table(session, a["hypertable"])
    table = hypertable_of(server, schema, name)
    ht = table.hypertable
    assert ht is not None
    if ht.space_column is not None:
        if ht.space_column == column and a["if_not_exists"]:
            _notice(session, f'column "{column}" is already a dimension, skipping', "42701")
            return [(2, schema, name, column, False)]
        raise PgError("0A000", f'hypertable "{name}" already has a space dimension', hint="One hash dimension per hypertable is supported.")
    if ht.chunks:
        raise PgError("55000", f'hypertable "{name}" has data or empty chunks', hint="Add dimensions before inserting data.")
    # Re-create it distributed by the new column: drop the old shard, register anew.
    old = {s.shard_id: (table.shard_name(s), list(s.node_ids)) for s in table.shards}
    await server.catalog.unregister_table(schema, name)
    await _drop_shards(server, session.database, schema, old)
    try:
        await _make_hypertable(
            server, session, schema, name, ht.time_column, str(ht.chunk_interval), column, partitions,
            default_indexes=False, migrate=False,
        )
    except (PgError, CatalogError):
        await _make_hypertable(
            server, session, schema, name, ht.time_column, str(ht.chunk_interval), None, None,
            default_indexes=False, migrate=False,
        )
        raise
    return [(2, schema, name, column, True)]
