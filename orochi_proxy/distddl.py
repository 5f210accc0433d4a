"""DDL on distributed and reference tables: the logical table and every shard change together.

One statement (ALTER TABLE, CREATE/DROP INDEX, TRUNCATE, DROP TABLE, ALTER TABLE RENAME, ALTER
INDEX RENAME) becomes: the original statement on the metadata node (it validates the statement
and changes the logical table), plus the per-shard statements of ``rewriter.ddl`` on the nodes.
All of it is one two-phase transaction: every participant runs its part inside ``BEGIN`` and
``PREPARE TRANSACTION``; only when all have prepared is each committed, otherwise all roll back,
so a failure on one node leaves no half-applied change. The catalog rows (a dropped or renamed
table, and the catalog version that makes every proxy re-plan) change inside the metadata
node's part of that same transaction — the catalog lives in the metadata database.

``CREATE/DROP INDEX CONCURRENTLY`` cannot run in a transaction block; those run node by node.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING

from executor import protocol as pg
from executor import twophase
from executor.backend import BackendConnection
from executor.protocol import PgError
from executor.tabledef import read_index_names
from orochi_proxy.compressadmin import alter_compression
from rewriter import ddl
from rewriter.intercept import Distributed
from rewriter.model import TableInfo
from rewriter.quoting import qualified_name, quote_ident, quote_literal

if TYPE_CHECKING:
    from orochi_proxy.distsession import DistributedRunner

SCHEMA = "orochi_catalog"
log = logging.getLogger(__name__)




def _catalog_sql(kind: str, stmt, tables: list[TableInfo]) -> list[str]:
    """Catalog changes to make in the metadata node's transaction for this DDL."""
    out: list[str] = []
    if kind == "drop_table":
        for t in tables:
            out.append(
                f"DELETE FROM {SCHEMA}.tables WHERE schema_name = {quote_literal(t.schema)} AND table_name = {quote_literal(t.name)}"
            )
    elif kind == "rename_table":
        new = ddl._unwrap(stmt).newname
        for t in tables:
            out.append(
                f"UPDATE {SCHEMA}.tables SET table_name = {quote_literal(new)} "
                f"WHERE schema_name = {quote_literal(t.schema)} AND table_name = {quote_literal(t.name)}"
            )
    out.append(f"UPDATE {SCHEMA}.catalog_version SET version = version + 1")
    return out


# NOTIFY cannot be part of a prepared transaction: it is sent right after the commit.
_NOTIFY = f"SELECT pg_notify('orochi_catalog_changed', (SELECT version::text FROM {SCHEMA}.catalog_version))"


async def run_ddl(runner: DistributedRunner, action: Distributed) -> str | None:
    """Run DDL on catalog tables; returns the command tag, or None if ``action`` is not such DDL."""
    session = runner.session
    server = runner.server
    stmt = action.stmt
    kind = ddl.classify_ddl(stmt)
    if kind is None:
        return None
    if session.tx_status != pg.TX_IDLE:
        raise PgError("25001", "DDL on distributed or reference tables cannot run inside a transaction block")
    if kind == "alter_table":
        tag = await alter_compression(runner, stmt)
        if tag is not None:
            return tag
    search_path = await runner.current_search_path()
    model = server.catalog.model

    def resolve(schema: str | None, name: str) -> TableInfo | None:
        return model.lookup(schema, name, search_path)

    index_tables: dict[tuple[str | None, str], TableInfo | None] = {}

    async def load_index_owner(schema: str | None, name: str) -> None:
        qual = qualified_name(schema, name) if schema else quote_ident(name)
        rows = await runner._backend_query(
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_index i "
            "JOIN pg_catalog.pg_class c ON c.oid = i.indrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE i.indexrelid = pg_catalog.to_regclass({quote_literal(qual)})"
        )
        index_tables[(schema, name)] = index_tables[(None, name)] = (
            model.tables.get((rows[0][0].decode(), rows[0][1].decode())) if rows else None  # type: ignore[union-attr]
        )

    if kind in ("drop_index", "rename_index"):
        for schema, name in _index_names(stmt):
            await load_index_owner(schema, name)

    def resolve_index(schema: str | None, name: str) -> TableInfo | None:
        return index_tables.get((schema, name), index_tables.get((None, name)))

    targets = ddl.ddl_targets(stmt, resolve, resolve_index)
    if not targets:
        # e.g. DROP INDEX of an index on a plain table: nothing to do on shards.
        return await _run_tagged(runner, action.sql)
    for t in targets:
        ddl.check_ddl_supported(stmt, t)
    concurrently = bool(getattr(ddl._unwrap(stmt), "concurrent", False))

    before: set[str] = set()
    if kind == "create_index" and ddl.needs_index_name(stmt):
        t = targets[0]
        before = await read_index_names(runner.text_rows, t.schema, t.name)

    shard_stmt = stmt
    if concurrently:
        tag = await _run_tagged(runner, action.sql)
    else:
        tag = await _run_tagged(runner, "BEGIN", action.sql)
    if kind == "create_index" and ddl.needs_index_name(stmt):
        # Read inside the still-open transaction: after PREPARE the new index is invisible.
        t = targets[0]
        after = await read_index_names(runner.text_rows, t.schema, t.name)
        new = sorted(after - before)
        if len(new) != 1:
            if not concurrently:
                await _run_tagged(runner, "ROLLBACK")
            raise PgError("XX000", "could not determine the name of the new index")
        shard_stmt = ddl.name_index(stmt, new[0])
    if not concurrently:
        await _run_tagged(runner, *_catalog_sql(kind, stmt, targets))
    per_node: dict[int, list[str]] = defaultdict(list)
    try:
        for table, part in ddl.split_by_table(shard_stmt, resolve, resolve_index):
            if table is None:
                continue
            for shard in table.shards:
                sql = ddl.shard_ddl_statement(part, table, shard)
                for node in shard.node_ids:
                    per_node[node].append(sql)
        _companion_ddl(kind, targets, per_node)
        log.debug("DDL %s on %s: %d shard statements on %d nodes", kind, [t.name for t in targets], sum(map(len, per_node.values())), len(per_node))
    except BaseException:
        if not concurrently:
            await _run_tagged(runner, "ROLLBACK")
        raise
    if concurrently:
        await _run_per_node(runner, per_node, transactional=False)
    else:
        await _commit_everywhere(runner, per_node)
        await _run_tagged(runner, _NOTIFY)
    await server.catalog.reload()
    runner.server.plans = type(runner.server.plans)()  # plans mention old shapes
    return tag




def _companion_ddl(kind: str, targets: list[TableInfo], per_node: dict[int, list[str]]) -> None:
    """TRUNCATE / DROP TABLE of a hypertable also empty / drop its compressed chunks' segments
    (companion tables are not partitions, so the shard's own statement does not reach them)."""
    if kind not in ("truncate", "drop_table"):
        return

    for t in targets:
        if t.hypertable is None:
            continue
        for c in t.hypertable.chunks:
            if c.tier != "warm":
                continue
            companion = c.compressed_qualified
            verb = "TRUNCATE" if kind == "truncate" else "DROP TABLE IF EXISTS"
            per_node[t.chunk_node(c)].append(f"{verb} {companion}")


def _index_names(stmt) -> list[tuple[str | None, str]]:
    s = ddl._unwrap(stmt)
    out: list[tuple[str | None, str]] = []
    if hasattr(s, "objects") and s.objects:
        for obj in s.objects:
            names = [x.sval for x in obj]
            out.append((names[0], names[1]) if len(names) == 2 else (None, names[-1]))
    elif getattr(s, "relation", None) is not None:
        rv = s.relation
        out.append((rv.schemaname, rv.relname))
    return out


async def _run_tagged(runner: DistributedRunner, *statements: str) -> str:
    """Run statements on the session's metadata connection; the tag of the first non-BEGIN one."""
    msgs = await runner.session._collect_from_backend(pg.query("; ".join(statements)))
    tag = ""
    for t, p in msgs:
        if t == ord("C") and not tag:
            text = pg.read_cstr(p, 0)[0]
            if text != "BEGIN":
                tag = text
        elif t == ord("E"):
            err = PgError.from_payload(p)
            if runner.session.tx_status != pg.TX_IDLE:
                await runner.session._collect_from_backend(pg.query("ROLLBACK"))
            raise err
    return tag


async def _conn_for(runner: DistributedRunner, node: int) -> tuple[object, BackendConnection]:
    pool = runner.server.node_pool(node, runner.session.database)
    return pool, await pool.acquire()


async def _run_per_node(runner: DistributedRunner, per_node: dict[int, list[str]], *, transactional: bool) -> None:
    for node, stmts in per_node.items():
        pool, conn = await _conn_for(runner, node)
        try:
            for s in stmts:
                await conn.simple_query(s)
        finally:
            pool.release(conn, reset=not conn.usable)  # type: ignore[attr-defined]


async def _commit_everywhere(runner: DistributedRunner, per_node: dict[int, list[str]]) -> None:
    """Shard statements in a transaction per node, then all participants (the metadata node's
    open transaction on the session's connection among them) committed by two-phase commit."""
    session = runner.session
    backend = session.backend
    assert backend is not None
    md = runner.server.catalog.metadata_node
    taken: list[tuple[object, BackendConnection]] = []
    participants: list[tuple[int, BackendConnection]] = [(md.node_id if md is not None else 0, backend)]
    backend.consumer = None
    try:
        try:
            for node, stmts in per_node.items():
                pool, conn = await _conn_for(runner, node)
                taken.append((pool, conn))
                await conn.simple_query("BEGIN; " + "; ".join(stmts))
                participants.append((node, conn))
        except BaseException:
            # The node whose statements failed is in ``taken`` but not yet a participant; left
            # in its aborted transaction it went back to the pool and failed the next user (25P02).
            failed = [conn for _pool, conn in taken if all(conn is not c for _n, c in participants)]
            for conn in [*(c for _n, c in participants), *failed]:
                if conn.usable and conn.tx_status != b"I":
                    try:
                        await conn.simple_query("ROLLBACK")
                    except PgError:
                        conn.broken = True
            raise
        await twophase.commit(participants, runner.server.txlog.decider(), kind="ddl")
    finally:
        if not backend.closed:
            backend.consumer = session
        session.tx_status = backend.tx_status
        for pool, conn in taken:
            pool.release(conn, reset=not conn.usable)  # type: ignore[attr-defined]
