"""Admin SQL that turns tables into distributed or reference tables, and back (Citus names).

``create_distributed_table('t', 'col')``: the table (created normally through the proxy, so it
exists on the metadata node) gets ``shard_count`` shard tables ``t_<shardid>`` placed over the
nodes (co-located with other tables of the same distribution type and shard count unless told
otherwise), its rows move into the shard their distribution value hashes to, and the catalog
records it — the catalog write is the last step, so a failure before it leaves the table as it
was (the shard tables already created are dropped). The logical table stays on the metadata node,
empty, so ``\\d t``, ORMs and the proxy's own Parse/Describe keep working.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from executor import protocol as pg
from executor.copyio import copy_in, copy_out, text_field
from executor.protocol import PgError
from executor.tabledef import read_table_definition
from orochi_proxy.catalog import CatalogError
from orochi_proxy.localexec import INT4, INT8, TEXT, VOID, ParamSpec, admin_function
from rewriter import hashing
from rewriter.model import TableInfo, shard_table_name
from rewriter.quoting import qualified_name, quote_ident, quote_literal

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session

DEFAULT_SHARD_COUNT = 32
MAX_SHARD_COUNT = 64000








async def resolve_table(session: Session, name: str) -> tuple[str, str]:
    """(schema, table) of ``name`` as the client's session resolves it (regclass semantics)."""
    rows = await session.dist.text_rows(
        "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE c.oid = {quote_literal(name)}::regclass",
    )
    schema, table = rows[0]
    return schema or "", table or ""


def _check_session(server: ProxyServer, session: Session, fn: str) -> None:
    if session is None:
        raise PgError("0A000", f"{fn}() needs a client session")
    if session.tx_status != pg.TX_IDLE:
        raise PgError("25001", f"{fn}() cannot run inside a transaction block")
    if session.database != server.config.metadata.dbname:
        raise PgError(
            "0A000",
            f"{fn}() works in the metadata database {server.config.metadata.dbname!r}, not {session.database!r}",
            hint="Connect to the metadata database to distribute tables.",
        )


async def _create_shards(
    server: ProxyServer,
    database: str,
    ddl_for: dict[int, list[str]],
    shard_nodes: dict[int, list[int]],
) -> None:
    """Run each shard's DDL on its node(s): one transaction per node."""
    per_node: dict[int, list[str]] = defaultdict(list)
    for shard_id, nodes in shard_nodes.items():
        for node in nodes:
            per_node[node].extend(ddl_for[shard_id])
    for node, stmts in per_node.items():
        pool = server.node_pool(node, database)
        conn = await pool.acquire()
        try:
            await conn.simple_query("BEGIN; " + "; ".join(stmts) + "; COMMIT")
        except PgError:
            if conn.usable:
                try:
                    await conn.simple_query("ROLLBACK")
                except PgError:
                    conn.broken = True
            raise
        finally:
            pool.release(conn, reset=False)


async def _drop_shards(server: ProxyServer, database: str, schema: str, shard_nodes: dict[int, tuple[str, list[int]]]) -> None:
    """Best effort: remove shard tables (after a failed distribution or for undistribute)."""
    per_node: dict[int, list[str]] = defaultdict(list)
    for _sid, (name, nodes) in shard_nodes.items():
        for node in nodes:
            per_node[node].append(f"DROP TABLE IF EXISTS {qualified_name(schema, name)}")
    for node, stmts in per_node.items():
        try:
            pool = server.node_pool(node, database)
            conn = await pool.acquire()
        except (PgError, CatalogError):
            continue
        try:
            await conn.simple_query("; ".join(stmts))
        except PgError:
            pass
        finally:
            pool.release(conn, reset=False)


async def _move_rows_in(
    server: ProxyServer,
    session: Session,
    schema: str,
    name: str,
    column_index: int | None,
    dist_type: str | None,
    shards: list[tuple[int, int, list[int]]],
) -> int:
    """Copy the logical table's rows into its shards (by hash, or to every copy); returns rows moved."""
    md_pool = server.metadata_pool(session.database)
    conn = await md_pool.acquire()
    try:
        rows = await copy_out(conn, f"COPY {qualified_name(schema, name)} TO STDOUT")
    finally:
        md_pool.release(conn, reset=False)
    if not rows:
        return 0
    by_index = {idx: (sid, nodes) for sid, idx, nodes in shards}
    batches: dict[int, list[bytes]] = defaultdict(list)
    if column_index is None:
        batches[0] = rows
    else:
        n = len(shards)
        for line in rows:
            value = text_field(line.rstrip(b"\n"), column_index)
            if value is None:
                raise PgError("23502", f'cannot distribute "{name}": a row has NULL in the distribution column')
            batches[hashing.shard_slot(dist_type or "", hashing.parse_text_value(dist_type or "", value), n)].append(line)
    for idx, lines in batches.items():
        sid, nodes = by_index[idx]
        for node in nodes:
            pool = server.node_pool(node, session.database)
            c = await pool.acquire()
            try:
                await copy_in(c, f"COPY {qualified_name(schema, shard_table_name(name, sid))} FROM STDIN", lines)
            finally:
                pool.release(c, reset=not c.usable)
    return len(rows)


async def _distribute(
    server: ProxyServer,
    session: Session,
    fn: str,
    table_name: str,
    kind: str,
    dist_column: str | None,
    shard_count: int | None,
    colocate_with: str,
) -> None:
    _check_session(server, session, fn)
    schema, name = await resolve_table(session, table_name)
    catalog = server.catalog
    if (schema, name) in catalog.model.tables:
        raise PgError("42P16", f'table "{name}" is already distributed', hint=f"See citus_tables; undistribute_table('{name}') first.")

    tdef = await read_table_definition(session.dist.text_rows, schema, name)
    dist_type: str | None = None
    column_index: int | None = None
    if kind == "hash":
        col = tdef.column(dist_column or "")
        dist_type = hashing.canonical_type(col.type_sql)
        tdef.check_distributable(col.name)
        column_index = [c.name for c in tdef.columns].index(col.name)
        search_path = await session.dist.current_search_path()
        if shard_count is None:
            # Citus: without shard_count, colocate_with => 'table' takes that table's count
            # (the default 32 made naming a table with another count an error).
            target = None
            if colocate_with.lower() not in ("default", "none"):
                sch, _, tname = colocate_with.rpartition(".")
                target = catalog.model.lookup(sch or None, tname, tuple(search_path))
            shard_count = target.shard_count if target is not None and target.kind == "hash" else DEFAULT_SHARD_COUNT
        colocation_id, nodes_by_index = catalog.colocation_for(dist_type, shard_count, colocate_with, search_path)
        ids = await catalog.allocate_shard_ids(shard_count)
        shards = [(ids[i], i, [nodes_by_index[i]]) for i in range(shard_count)]
    else:
        colocation_id = None
        all_nodes = [n.node_id for n in catalog.nodes if n.is_active]
        if not all_nodes:
            raise PgError("55000", "the cluster has no active nodes; add one with citus_add_node")
        (sid,) = await catalog.allocate_shard_ids(1)
        shards = [(sid, 0, all_nodes)]
    ddl = {sid: [f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}", *tdef.shard_ddl(shard_table_name(name, sid), sid)] for sid, _, _ in shards}
    placement = {sid: nodes for sid, _, nodes in shards}
    created = {sid: (shard_table_name(name, sid), nodes) for sid, _, nodes in shards}
    try:
        await _create_shards(server, session.database, ddl, placement)
        await _move_rows_in(server, session, schema, name, column_index, dist_type, shards)
        await catalog.register_table(
            schema, name, kind, dist_column if kind == "hash" else None, dist_type, colocation_id, shards, _fill_columns(tdef)
        )
    except BaseException:
        await _drop_shards(server, session.database, schema, created)
        raise
    # The rows now live in the shards; the logical table keeps only the definition.
    await session.dist.text_rows(f"TRUNCATE {qualified_name(schema, name)}")


def _fill_columns(tdef) -> dict[str, str]:
    """Sequence-fed columns and the expression giving their next value on the metadata node."""
    out: dict[str, str] = {}
    for col in tdef.columns:
        if not col.uses_sequence:
            continue
        if col.default_sql and "nextval" in col.default_sql:
            out[col.name] = col.default_sql
        elif col.sequence:
            out[col.name] = f"pg_catalog.nextval({quote_literal(col.sequence)}::regclass)"
    return out


@admin_function(
    "create_distributed_table",
    [
        ParamSpec("table_name", TEXT),
        ParamSpec("distribution_column", TEXT),
        ParamSpec("distribution_type", TEXT, "hash"),
        ParamSpec("colocate_with", TEXT, "default"),
        ParamSpec("shard_count", INT4, None),
    ],
    [("create_distributed_table", VOID)],
    needs_session=True,
)
async def create_distributed_table(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Distribute a table by hash of a column over ``shard_count`` shards (default 32)."""
    if a["table_name"] is None or a["distribution_column"] is None:
        raise PgError("22004", "table_name and distribution_column must not be NULL")
    dtype = (a["distribution_type"] or "hash").lower()
    if dtype != "hash":
        raise PgError(
            "0A000", f"distribution type {dtype!r} is not supported", hint="Only 'hash' distribution is supported."
        )
    count = a["shard_count"]
    if count is not None and not 1 <= count <= MAX_SHARD_COUNT:
        raise PgError("22023", f"shard_count must be between 1 and {MAX_SHARD_COUNT}")
    await _distribute(server, session, "create_distributed_table", a["table_name"], "hash", a["distribution_column"], count, a["colocate_with"] or "default")
    return [("",)]


@admin_function("create_reference_table", [ParamSpec("table_name", TEXT)], [("create_reference_table", VOID)], needs_session=True)
async def create_reference_table(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Replicate a table to every node (one shard, a copy on each node)."""
    if a["table_name"] is None:
        raise PgError("22004", "table_name must not be NULL")
    await _distribute(server, session, "create_reference_table", a["table_name"], "reference", None, 1, "none")
    return [("",)]


@admin_function("undistribute_table", [ParamSpec("table_name", TEXT)], [("undistribute_table", VOID)], needs_session=True)
async def undistribute_table(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Bring a distributed or reference table's rows back into the plain table on the metadata node."""
    _check_session(server, session, "undistribute_table")
    schema, name = await resolve_table(session, a["table_name"])
    table = server.catalog.model.tables.get((schema, name))
    if table is None:
        raise PgError("42809", f'table "{name}" is not distributed')
    if table.hypertable is not None:
        raise PgError(
            "0A000", f'undistribute_table() of hypertable "{name}" is not supported',
            hint=f"Copy its rows out (COPY {name} TO STDOUT) into a new table instead.",
        )
    target = qualified_name(schema, name)
    shards = table.shards if not table.is_reference else table.shards[:1]
    for shard in shards:
        node = shard.node_ids[0]
        pool = server.node_pool(node, session.database)
        conn = await pool.acquire()
        try:
            rows = await copy_out(conn, f"COPY {qualified_name(schema, table.shard_name(shard))} TO STDOUT")
        finally:
            pool.release(conn, reset=False)
        if rows:
            md = server.metadata_pool(session.database)
            c = await md.acquire()
            try:
                await copy_in(c, f"COPY {target} FROM STDIN", rows)
            finally:
                md.release(c, reset=not c.usable)
    await server.catalog.unregister_table(schema, name)
    await _drop_shards(server, session.database, schema, {s.shard_id: (table.shard_name(s), list(s.node_ids)) for s in table.shards})
    return [("",)]


@admin_function(
    "get_shard_id_for_distribution_column",
    [ParamSpec("table_name", TEXT), ParamSpec("distribution_value", TEXT, None)],
    [("get_shard_id_for_distribution_column", INT8)],
    needs_session=True,
)
async def get_shard_id_for_distribution_column(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """The shard id that holds rows with this distribution value."""
    schema, name = await resolve_table(session, a["table_name"])
    table: TableInfo | None = server.catalog.model.tables.get((schema, name))
    if table is None:
        raise PgError("42809", f'table "{name}" is not distributed')
    if table.is_reference:
        return [(table.shards[0].shard_id,)]
    value = a["distribution_value"]
    if value is None:
        raise PgError("22004", "distribution value cannot be NULL for distributed tables")
    slot = hashing.shard_slot(table.dist_type or "", hashing.parse_text_value(table.dist_type or "", value), table.shard_count)
    return [(table.shards[slot].shard_id,)]


async def refresh_shard_sizes(server: ProxyServer, database: str) -> None:
    """Measure every shard placement's size on its node (for citus_shards / citus_tables)."""
    per_node: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for table in server.catalog.model.tables.values():
        for shard in table.shards:
            for node in shard.node_ids:
                per_node[node].append((shard.shard_id, qualified_name(table.schema, table.shard_name(shard))))
    sizes: list[tuple[int, int, int]] = []
    for node, items in per_node.items():
        pool = server.node_pool(node, database)
        conn = await pool.acquire()
        try:
            sql = " UNION ALL ".join(
                f"SELECT {sid}, COALESCE(pg_catalog.pg_total_relation_size(pg_catalog.to_regclass({quote_literal(q)})), 0)"
                for sid, q in items
            )
            for sid, size in await conn.simple_query(sql):
                sizes.append((int(sid), node, int(size)))  # type: ignore[arg-type]
        finally:
            pool.release(conn, reset=False)
    if sizes:
        await server.catalog.record_shard_sizes(sizes)
