"""Warm tier with TimescaleDB's names: ALTER TABLE ... SET (timescaledb.compress ...),
compress_chunk, decompress_chunk.

The format and the SQL that moves rows are in :mod:`policies.compression`; this module decides
*when* each step runs so that every moment of a compression is readable and right:

1. the companion table ``<chunk>_compressed`` is created (empty) on the chunk's node;
2. the catalog marks the chunk ``warm``: from now on a query reads the chunk's heap
   ``UNION ALL`` its decoded segments (both parts always);
3. one node transaction moves the heap rows into segments (``DELETE`` of the heap, so a
   snapshot taken before still sees the rows there and not yet in segments).

A crash after 1 leaves a hot chunk with an empty companion; after 2 a warm chunk whose rows are
all still in the heap; after 3 the finished state. Decompressing runs the steps backwards (rows
back into the heap in one transaction, then ``hot``, then the companion is dropped).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from pglast import ast
from pglast.enums import AlterTableType

from executor import faults
from executor import protocol as pg
from executor.backend import BackendConnection
from executor.protocol import PgError
from orochi_proxy.distribute import resolve_table
from orochi_proxy.localexec import BOOL, TEXT, ParamSpec, admin_function
from policies import compression
from rewriter.model import ChunkInfo, TableInfo
from rewriter.quoting import qualified_name, quote_literal

if TYPE_CHECKING:
    from orochi_proxy.distsession import DistributedRunner
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session

COMPRESS_LOCK_TIMEOUT = "30s"
# Between marking a chunk warm and moving its rows (see compress()): covers the NOTIFY delay of
# connected replicas, not a replica whose LISTEN connection is down (README, limits).
REPLICA_PROPAGATION_WAIT = 0.5


# ------------------------------------------------------------------------ ALTER TABLE SET
def _timescaledb_options(stmt: ast.Node) -> dict[str, str | None] | None:
    """``{option: value}`` of ``ALTER TABLE t SET (timescaledb.x = ...)``; None if not that."""
    if not isinstance(stmt, ast.AlterTableStmt) or not stmt.cmds or len(stmt.cmds) != 1:
        return None
    cmd = stmt.cmds[0]
    if cmd.subtype not in (AlterTableType.AT_SetRelOptions, AlterTableType.AT_ResetRelOptions):
        return None
    defs = list(cmd.def_ or ())
    ours = [d for d in defs if (d.defnamespace or "").lower() == "timescaledb"]
    if not ours:
        return None
    if len(ours) != len(defs) or cmd.subtype == AlterTableType.AT_ResetRelOptions:
        raise PgError("0A000", "timescaledb options cannot be mixed with other options or RESET", hint="Set them in a statement of their own.")
    out: dict[str, str | None] = {}
    for d in ours:
        value = d.arg
        if value is None:
            out[d.defname.lower()] = None
        elif isinstance(value, ast.String):
            out[d.defname.lower()] = value.sval
        elif isinstance(value, ast.Integer):
            out[d.defname.lower()] = str(value.ival)
        elif isinstance(value, ast.Boolean):
            out[d.defname.lower()] = "true" if value.boolval else "false"
        elif isinstance(value, ast.TypeName):
            out[d.defname.lower()] = value.names[-1].sval
        else:
            out[d.defname.lower()] = getattr(value, "sval", None) or str(getattr(value, "fval", ""))
    return out


_KNOWN = {"compress", "enable_columnstore", "compress_segmentby", "segmentby", "compress_orderby", "orderby"}


async def alter_compression(runner: DistributedRunner, stmt: ast.Node) -> str | None:
    """Handle ``ALTER TABLE ht SET (timescaledb.compress ...)``; None if ``stmt`` is not that."""
    options = _timescaledb_options(stmt)
    if options is None:
        return None
    unknown = sorted(set(options) - _KNOWN)
    if unknown:
        raise PgError("22023", f'unrecognized parameter "timescaledb.{unknown[0]}"')
    rv = stmt.relation
    schema, name = await resolve_table(runner.session, qualified_name(rv.schemaname, rv.relname) if rv.schemaname else rv.relname)
    table = runner.server.catalog.model.tables.get((schema, name))
    if table is None or table.hypertable is None:
        raise PgError("TS001", f'table "{name}" is not a hypertable', hint="Call create_hypertable() first.")
    ht = table.hypertable
    enabled_text = options.get("compress", options.get("enable_columnstore", "true"))
    enabled = (enabled_text or "true").strip().lower() in ("true", "on", "1", "t", "yes")
    if not enabled:
        if any(c.tier == "warm" for c in ht.chunks):
            raise PgError("55000", f'cannot disable compression on hypertable "{name}" with compressed chunks', hint="Decompress the chunks first.")
        await runner.server.catalog.set_compression(ht.hypertable_id, None)
        return "ALTER TABLE"
    current = ht.compression or {}
    segmentby = options.get("compress_segmentby", options.get("segmentby"))
    orderby = options.get("compress_orderby", options.get("orderby"))
    if segmentby is None:
        segmentby = ",".join(current.get("segmentby", []))
    if orderby is None and current.get("orderby_text"):
        orderby = current["orderby_text"]
    try:
        settings = compression.CompressionSettings.parse(segmentby, orderby, ht.time_column)
    except ValueError as exc:
        raise PgError("22023", f"invalid compression settings: {exc}") from None
    missing = [c for c in [*settings.segmentby, *(o[0] for o in settings.orderby)] if c not in table.columns]
    if missing:
        raise PgError("42703", f'column "{missing[0]}" does not exist')
    if any(c.tier == "warm" for c in ht.chunks) and settings.segmentby != current.get("segmentby"):
        raise PgError("55000", "cannot change the segment-by columns while chunks are compressed", hint="Decompress the chunks first.")
    rows = await runner.text_rows(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a "
        f"WHERE a.attrelid = {quote_literal(qualified_name(schema, name))}::regclass AND a.attnum > 0 "
        "AND NOT a.attisdropped ORDER BY a.attnum"
    )
    columns = [[r[0], r[1]] for r in rows]
    if any(c.tier == "warm" for c in ht.chunks) and columns != current.get("columns"):
        raise PgError("55000", "the columns changed since chunks were compressed", hint="Decompress the chunks first.")
    await runner.server.catalog.set_compression(
        ht.hypertable_id,
        {
            "segmentby": settings.segmentby,
            "orderby": [list(o) for o in settings.orderby],
            "orderby_text": orderby or "",
            "columns": columns,
        },
    )
    return "ALTER TABLE"


def settings_of(table: TableInfo) -> compression.CompressionSettings:
    ht = table.hypertable
    assert ht is not None
    c = ht.compression
    if c is None:
        raise PgError(
            "55000", f'compression not enabled on hypertable "{table.name}"',
            hint=f"Enable it with ALTER TABLE {table.name} SET (timescaledb.compress, timescaledb.compress_segmentby = '...').",
        )
    return compression.CompressionSettings(list(c.get("segmentby", [])), [tuple(o) for o in c.get("orderby", [])])  # type: ignore[misc]


# ------------------------------------------------------------------------ chunk operations
async def _columns(conn: BackendConnection, chunk: ChunkInfo) -> list[tuple[str, str]]:
    rows = await conn.simple_query(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_catalog.pg_attribute a "
        f"WHERE a.attrelid = {quote_literal(chunk.qualified)}::regclass AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY a.attnum"
    )
    return [(r[0].decode(), r[1].decode()) for r in rows]  # type: ignore[union-attr]


async def _in_transaction(conn: BackendConnection, statements: list[str]) -> None:
    await conn.run_in_transaction(statements, lock_timeout=COMPRESS_LOCK_TIMEOUT)


async def compress(server: ProxyServer, database: str, table: TableInfo, chunk: ChunkInfo) -> int:
    """Compress one chunk (see the module docstring for the order); returns the rows moved."""
    settings = settings_of(table)
    ht = table.hypertable
    assert ht is not None
    pool = server.node_pool(table.chunk_node(chunk), database)
    async with pool.connection() as conn:
        columns = await _columns(conn, chunk)
        recorded = [tuple(c) for c in (ht.compression or {}).get("columns", [])]
        if columns != recorded:
            # The table changed (ALTER TABLE) since compression was enabled: readers decode
            # segments with the recorded column list, so it must match every warm chunk.
            if any(c.tier == "warm" for c in ht.chunks):
                raise PgError(
                    "0A000", f"the columns of {table.name} changed since its chunks were compressed",
                    hint="Decompress its compressed chunks, then compress again.",
                )
            await server.catalog.set_compression(ht.hypertable_id, {**(ht.compression or {}), "columns": [list(c) for c in columns]})
        companion = chunk.compressed_qualified
        exists = (await conn.simple_query(f"SELECT to_regclass({quote_literal(companion)}) IS NOT NULL"))[0][0] == b"t"
        if not exists:
            lz4 = (await conn.simple_query(
                "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
            ))[0][0] == b"t"
            await _in_transaction(conn, compression.compressed_table_ddl(chunk.schema, chunk.name, columns, settings, ht.time_column, lz4=lz4))
        if faults.ARMED:
            await faults.reached("compress_created")
        if chunk.tier != "warm":
            await server.catalog.set_chunk_tier(chunk.chunk_id, "warm")
            # Other proxy replicas learn "warm" from the catalog's NOTIFY (milliseconds); one
            # that still thought the chunk hot once its rows moved would read its heap alone.
            await asyncio.sleep(REPLICA_PROPAGATION_WAIT)
        if faults.ARMED:
            await faults.reached("compress_marked")
        # chunk_compression_stats' "before" side: the heap's size while it still holds every
        # row (empty companion: a first run or a re-run after a crash); compressing rows
        # inserted since keeps the first figure.
        (size, first), = await conn.simple_query(
            f"SELECT pg_total_relation_size({quote_literal(chunk.qualified)}::regclass), NOT EXISTS (SELECT FROM {companion})"
        )
        if first == b"t":
            await server.catalog.record_chunk_size(chunk.chunk_id, int(size))  # type: ignore[arg-type]
        before = await conn.simple_query(f"SELECT count(*) FROM {chunk.qualified}")
        await _in_transaction(conn, compression.compress_sql(chunk.schema, chunk.name, columns, settings, ht.time_column))
        await conn.simple_query(f"VACUUM {chunk.qualified}")
        await conn.simple_query(f"ANALYZE {companion}")  # segment counts for the node's planner
        return int(before[0][0] or 0)  # type: ignore[arg-type]


async def decompress(server: ProxyServer, database: str, table: TableInfo, chunk: ChunkInfo) -> None:
    """Move a warm chunk's rows back into its heap; the chunk is hot again."""
    settings = settings_of(table)
    ht = table.hypertable
    assert ht is not None
    pool = server.node_pool(table.chunk_node(chunk), database)
    async with pool.connection() as conn:
        columns = await _columns(conn, chunk)
        await _in_transaction(conn, compression.decompress_sql(chunk.schema, chunk.name, columns, settings, ht.time_column))
        if faults.ARMED:
            await faults.reached("decompress_moved")
        await server.catalog.set_chunk_tier(chunk.chunk_id, "hot")
        companion = chunk.compressed_qualified
        await _in_transaction(conn, [f"DROP TABLE IF EXISTS {companion}"])


def _split_name(name: str) -> tuple[str | None, str]:
    """(schema, name) of a possibly qualified, possibly quoted relation name."""
    from pglast import parse_sql
    from pglast.parser import ParseError

    try:
        stmt = parse_sql(f"TABLE {name}")[0].stmt
        rv = stmt.fromClause[0]
        return rv.schemaname, rv.relname
    except (ParseError, AttributeError, IndexError, TypeError):
        raise PgError("42602", f'invalid name syntax: "{name}"') from None


def find_chunk(server: ProxyServer, name: str) -> tuple[TableInfo, ChunkInfo]:
    """A chunk by its (optionally schema-qualified) name, as show_chunks prints it."""
    schema, table_name = _split_name(name)
    for table in server.catalog.model.tables.values():
        ht = table.hypertable
        if ht is None:
            continue
        for c in ht.chunks:
            if c.name == table_name and (schema is None or schema == c.schema):
                return table, c
    raise PgError("42P01", f'relation "{name}" does not exist', hint="Chunk names are listed by show_chunks().")


@admin_function(
    "compress_chunk",
    [ParamSpec("uncompressed_chunk", TEXT), ParamSpec("if_not_compressed", BOOL, True), ParamSpec("recompress", BOOL, False)],
    [("compress_chunk", TEXT)],
    needs_session=True,
)
async def compress_chunk(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Compress a chunk (rows inserted into a compressed chunk since are compressed too)."""
    if a["uncompressed_chunk"] is None:
        raise PgError("22004", "invalid chunk: cannot be NULL")
    table, chunk = find_chunk(server, a["uncompressed_chunk"])
    if chunk.tier == "warm" and not a["if_not_compressed"] and not a["recompress"]:
        raise PgError("55000", f'chunk "{chunk.name}" is already compressed')
    await compress(server, session.database, table, chunk)
    return [(chunk.qualified,)]


@admin_function(
    "decompress_chunk",
    [ParamSpec("uncompressed_chunk", TEXT), ParamSpec("if_compressed", BOOL, True)],
    [("decompress_chunk", TEXT)],
    needs_session=True,
)
async def decompress_chunk(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Decompress a chunk back into a plain (hot) chunk."""
    if a["uncompressed_chunk"] is None:
        raise PgError("22004", "invalid chunk: cannot be NULL")
    table, chunk = find_chunk(server, a["uncompressed_chunk"])
    if chunk.tier != "warm":
        if a["if_compressed"]:
            session.client.write(pg.notice_response(f'chunk "{chunk.name}" is not compressed'))
            return []
        raise PgError("55000", f'chunk "{chunk.name}" is not compressed')
    await decompress(server, session.database, table, chunk)
    return [(chunk.qualified,)]

