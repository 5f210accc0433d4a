"""COPY on distributed and reference tables.

``COPY t FROM STDIN`` (text, csv, binary): the proxy answers CopyInResponse itself, splits the
client's stream into rows (``executor.copysplit``), routes each row by its distribution value,
and feeds per-shard buffers to the nodes: when a shard's buffer reaches ``FLUSH_BYTES`` it is
sent as one ``COPY <shard> FROM STDIN`` inside that node's open transaction. Memory stays bounded
(shards × FLUSH_BYTES plus the client messages in flight; the client is paused when too many
wait). At CopyDone every node's transaction commits — two-phase across nodes, so the load is
all-or-nothing. Inside a transaction block the load runs in the block's node transactions
instead (``DistTransaction``) and commits or rolls back with the block; a failed load fails the
block, as in PostgreSQL. A reference table gets every row on every node, each buffer on its
copies one after the other in the lock order every writer uses
(``executor.distributed.copies_in_lock_order``): concurrent loads and statements writing the same
keys queue on the first copy instead of deadlocking across nodes.

``COPY t TO STDOUT`` and ``COPY (query) TO STDOUT``: each shard (or, for a query, each node's
union of shard queries) runs COPY TO STDOUT and its CopyData is relayed; CSV headers and binary
headers/trailers are emitted once. Queries that need the combine step get 0A000.
"""

from __future__ import annotations

import asyncio
import copy as copymod
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from pglast import ast
from pglast.stream import RawStream

from executor import protocol as pg
from executor import twophase
from executor.backend import BackendConnection
from executor.copysplit import (
    BINARY_HEADER,
    BINARY_TRAILER,
    BinarySplitter,
    CsvSplitter,
    TextSplitter,
    binary_field,
    binary_key_text,
)
from executor.distributed import apply_settings, copies_in_lock_order, shard_of
from executor.protocol import PgError
from executor.tasks import run_on
from orochi_proxy.chunks import ChunkRouter
from rewriter.intercept import Distributed
from rewriter.model import Shard, TableInfo
from rewriter.quoting import qualified_name, quote_ident

if TYPE_CHECKING:
    from executor.pool import NodePool
    from executor.transaction import DistTransaction
    from orochi_proxy.distsession import DistributedRunner

FLUSH_BYTES = 256 * 1024
_PAUSE_AT, _RESUME_AT = 64, 16


class CopyInQueue:
    """Client CopyData/CopyDone/CopyFail messages for the running COPY, with back-pressure."""

    def __init__(self, session) -> None:
        self.session = session
        self.queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.paused = False

    def put(self, mtype: int, payload: bytes) -> None:
        self.queue.put_nowait((mtype, payload))
        if not self.paused and self.queue.qsize() >= _PAUSE_AT:
            self.paused = True
            self.session.client.pause_reading()

    async def get(self) -> tuple[int, bytes]:
        item = await self.queue.get()
        if self.paused and self.queue.qsize() <= _RESUME_AT:
            self.paused = False
            self.session.client.resume_reading()
        return item


def _options(stmt: ast.CopyStmt) -> dict[str, object]:
    out: dict[str, object] = {}
    for d in stmt.options or ():
        arg = d.arg
        if isinstance(arg, ast.String):
            out[d.defname] = arg.sval
        elif isinstance(arg, ast.Integer):
            out[d.defname] = arg.ival
        elif isinstance(arg, ast.Boolean):
            out[d.defname] = arg.boolval
        elif arg is None:
            out[d.defname] = True
        else:
            out[d.defname] = arg
    return out


def _shard_copy_sql(stmt: ast.CopyStmt, table: TableInfo, shard_name: str, *, drop_header: bool) -> str:
    s = copymod.deepcopy(stmt)
    s.relation = ast.RangeVar(schemaname=table.schema, relname=shard_name, inh=True, relpersistence="p")
    if drop_header and s.options:
        s.options = tuple(d for d in s.options if d.defname != "header") or None
    return RawStream()(s)


def _hypertable_copy_sql(stmt: ast.CopyStmt, table: TableInfo, shard_index: int, *, drop_header: bool) -> str:
    """``COPY (SELECT ...) TO STDOUT`` of one hypertable shard: PostgreSQL cannot COPY a
    partitioned table directly, and compressed chunks are read through their segments."""
    from pglast import parse_sql

    from executor.hyperread import shard_with_segments
    from rewriter import timerange

    ht = table.hypertable
    assert ht is not None
    columns = [c.sval for c in stmt.attlist] if stmt.attlist else list(table.columns)
    warm = [c for c in ht.chunks if c.shard_index == shard_index and c.tier == "warm"]
    parent = qualified_name(table.schema, table.shard_name(table.shards[shard_index]))
    source = f"({shard_with_segments(table, ht, shard_index, warm, timerange.FULL)}) AS s" if warm else parent
    s = copymod.deepcopy(stmt)
    s.relation = None
    s.attlist = None
    s.query = parse_sql(f"SELECT {', '.join(quote_ident(c) for c in columns)} FROM {source}")[0].stmt
    if drop_header and s.options:
        s.options = tuple(d for d in s.options if d.defname != "header") or None
    return RawStream()(s)


def _is_true(v: object) -> bool:
    if isinstance(v, bool):
        return v
    return str(v).lower() in ("true", "on", "1", "yes")


async def _copy_in(conn: BackendConnection, sql: str, data: bytes) -> None:
    """``sql`` (a COPY ... FROM STDIN) with ``data`` as its whole input, on ``conn``."""
    msgs = await conn.exchange(pg.query(sql), until=(ord("G"), ord("E")))
    for t, p in msgs:
        if t == ord("E"):
            conn.broken = True
            raise PgError.from_payload(p)
    conn.write(pg.message(b"d", data))
    res = await run_on(conn, pg.message(b"c"))
    if res.error is not None:
        raise res.error


class ShardLoader:
    """Loads rows into shard tables with COPY, one connection per node.

    Inside the client's block (``txn``) the block's node transactions take the rows and commit
    or roll back with it; otherwise each node gets a transaction of its own, two-phase
    committed by :meth:`commit`. A shard's copies are written one after the other in the lock
    order every writer uses (``copies_in_lock_order``). :meth:`close` always runs: it rolls
    back what was not committed and gives the connections back.
    """

    def __init__(self, pool_for: Callable[[int], NodePool], settings: dict[str, str],
                 txn: DistTransaction | None, metadata_node_id: int | None) -> None:
        self.pool_for = pool_for
        self.settings = settings  # the client's TimeZone/DateStyle read its text
        self.txn = txn
        self.metadata_node_id = metadata_node_id
        self._own: dict[int, tuple[NodePool, BackendConnection]] = {}
        self._committed = False

    async def _conn(self, node: int) -> BackendConnection:
        if self.txn is not None:
            return await self.txn.conn(node, self.settings, write=True)
        own = self._own.get(node)
        if own is None:
            pool = self.pool_for(node)
            conn = await pool.acquire()
            self._own[node] = (pool, conn)
            await apply_settings(conn, self.settings)
            await conn.simple_query("BEGIN")
            return conn
        return own[1]

    async def copy(self, shard: Shard, sql: str, data: bytes) -> None:
        for node in copies_in_lock_order(shard.node_ids, self.metadata_node_id):
            await _copy_in(await self._conn(node), sql, data)

    async def commit(self, decider) -> None:
        """Commit the nodes' own transactions (outside a block; one node plainly, several by
        two-phase commit); inside a block the block's COMMIT does it."""
        if self.txn is None:
            await twophase.commit([(node, conn) for node, (_pool, conn) in self._own.items()], decider, kind="copy")
        self._committed = True

    async def close(self) -> None:
        if not self._committed and self.txn is not None:
            self.txn.failed = True  # the block's ROLLBACK (or ROLLBACK TO) ends the nodes' part
        for pool, conn in self._own.values():
            if not self._committed:
                await conn.rollback_quietly()
            pool.release(conn, reset=not conn.usable)
        self._own.clear()


async def copy_from_stdin(
    runner: DistributedRunner, stmt: ast.CopyStmt, table: TableInfo, txn: DistTransaction | None = None
) -> str:
    """Load the client's COPY data; ``txn``: the client's block, whose node transactions take it."""
    session = runner.session
    server = runner.server
    opts = _options(stmt)
    fmt = str(opts.get("format", "text")).lower()
    columns = [c.sval for c in stmt.attlist] if stmt.attlist else list(table.columns)
    # Shards have no sequences (the proxy fills those columns on INSERT), so an omitted
    # serial/identity/nextval column would be stored NULL where PostgreSQL fills it.
    unfilled = [c for c in table.fill if c not in columns]
    if unfilled:
        raise PgError(
            "0A000",
            f'COPY into "{table.name}" must list the sequence-filled column(s) {", ".join(unfilled)}: '
            "COPY does not fill them on distributed or reference tables yet",
            hint="Supply the values in the COPY data, or use INSERT, which fills them.",
        )
    if not table.is_reference and table.dist_column not in columns:
        raise PgError("23502", f'COPY into "{table.name}" must include the distribution column "{table.dist_column}"')
    key_index = columns.index(table.dist_column) if not table.is_reference else 0
    if fmt == "text":
        splitter = TextSplitter(key_index, str(opts.get("delimiter", "\t")), str(opts.get("null", "\\N")))
    elif fmt == "csv":
        splitter = CsvSplitter(
            key_index, str(opts.get("delimiter", ",")), str(opts.get("quote", '"')),
            opts.get("escape"), str(opts.get("null", "")), _is_true(opts.get("header", False)),  # type: ignore[arg-type]
        )
    elif fmt == "binary":
        splitter = BinarySplitter(key_index, table.dist_type or "text")
    else:
        raise PgError("22023", f'COPY format "{fmt}" not recognized')
    ncols = len(columns)
    chunker, time_of = _chunk_routing(runner, table, columns, key_index, fmt, splitter)
    fcode = 1 if fmt == "binary" else 0
    queue = CopyInQueue(session)
    session.copy_sink = queue
    session.client.write(pg.message(b"G", bytes([fcode]) + ncols.to_bytes(2, "big") + fcode.to_bytes(2, "big") * ncols))
    session.client.uncork()  # the client sends its data only after it has CopyInResponse

    buffers: dict[int, list[bytes]] = defaultdict(list)
    sizes: dict[int, int] = defaultdict(int)
    total = 0
    error: BaseException | None = None
    client_done = False  # CopyDone/CopyFail consumed: nothing of the client's left to discard

    md = server.catalog.metadata_node
    loader = ShardLoader(
        lambda node: server.node_pool(node, session.database), session.output_settings(), txn,
        md.node_id if md is not None else None,
    )

    async def flush(idx: int) -> None:
        if chunker is not None:
            await chunker.settle()  # every buffered row's chunk exists before any row is sent
        rows = buffers.pop(idx, [])
        sizes.pop(idx, None)
        if not rows:
            return
        shard = table.shards[idx]
        data = b"".join(rows)
        if fmt == "binary":
            data = BINARY_HEADER + data + BINARY_TRAILER
        await loader.copy(shard, _shard_copy_sql(stmt, table, table.shard_name(shard), drop_header=True), data)

    def route(rows: list[tuple[bytes, str | None]]) -> list[int]:
        full = []
        for row, key in rows:
            if table.is_reference:
                idx = 0
            else:
                if key is None:
                    raise PgError("23502", f'null value in distribution column "{table.dist_column}" of relation "{table.name}"')
                idx = shard_of(table.dist_type or "", key, table.shard_count)  # type: ignore[assignment]
                if idx is None or idx < 0:
                    raise PgError("22P02", f'invalid input for distribution column "{table.dist_column}": "{key}"')
            if chunker is not None:
                chunker.note(idx, time_of(row, key))
            buffers[idx].append(row)
            sizes[idx] += len(row)
            if sizes[idx] >= FLUSH_BYTES:
                full.append(idx)
        return full

    try:
        while True:
            mtype, payload = await queue.get()
            if mtype == ord("d"):
                rows = splitter.feed(payload)
                total += len(rows)
                for idx in route(rows):
                    await flush(idx)
            elif mtype == ord("c"):
                client_done = True
                rows = splitter.finish()
                total += len(rows)
                route(rows)
                for idx in list(buffers):
                    await flush(idx)
                break
            elif mtype == ord("f"):
                client_done = True
                raise PgError("57014", f"COPY from stdin failed: {pg.read_cstr(payload, 0)[0]}")
        await loader.commit(runner.server.txlog.decider())
        return f"COPY {total}"
    except BaseException as exc:
        error = exc
        raise
    finally:
        session.copy_sink = None
        if error is not None:
            # The client keeps sending until CopyDone/CopyFail: swallow the rest of its data.
            if not isinstance(error, asyncio.CancelledError) and not client_done:
                await _discard_rest(queue, error)
        await loader.close()
        if queue.paused:
            session.client.resume_reading()


def _chunk_routing(runner: DistributedRunner, table: TableInfo, columns: list[str], key_index: int, fmt: str, splitter):
    """For a hypertable: the chunk router, and how to read a row's time value as text."""
    ht = table.hypertable
    if ht is None:
        return None, None
    if ht.time_column not in columns:
        raise PgError("23502", f'COPY into hypertable "{table.name}" must include the time column "{ht.time_column}"')
    chunker = ChunkRouter(runner.server, runner.session.database, table, runner.session.output_settings())
    t_index = columns.index(ht.time_column)
    if t_index == key_index:
        return chunker, lambda _row, key: key
    if fmt == "binary":
        return chunker, lambda row, _key: _binary_time_text(row, t_index, ht.time_type)
    reader = copymod.copy(splitter)
    reader.key_index = t_index
    if fmt == "csv":
        return chunker, lambda row, _key: reader._key(row)
    return chunker, lambda row, _key: reader._key(row.rstrip(b"\n"))


def _binary_time_text(row: bytes, index: int, time_type: str) -> str | None:
    raw = binary_field(row, index)
    return None if raw is None else binary_key_text(raw, time_type)


async def _discard_rest(queue: CopyInQueue, error: BaseException) -> None:
    if isinstance(error, PgError) and error.sqlstate == "57014" and "COPY from stdin failed" in error.message:
        return  # CopyFail already consumed
    session = queue.session
    session.copy_sink = queue
    try:
        while True:
            try:
                mtype, _ = await asyncio.wait_for(queue.get(), 30)
            except TimeoutError:
                return
            if mtype in (ord("c"), ord("f")):
                return
    finally:
        session.copy_sink = None


async def copy_to_stdout(runner: DistributedRunner, stmt: ast.CopyStmt, table: TableInfo | None, query_plan) -> str:
    """Relay COPY TO STDOUT from the shards (table) or from each node's shard queries (query)."""
    session = runner.session
    server = runner.server
    opts = _options(stmt)
    fmt = str(opts.get("format", "text")).lower()
    header = _is_true(opts.get("header", False))
    jobs: list[tuple[int, str]] = []  # (node, COPY sql)
    if table is not None:
        ncols = len(stmt.attlist) if stmt.attlist else len(table.columns)
        shards = table.shards[:1] if table.is_reference else table.shards
        for i, shard in enumerate(shards):
            if table.hypertable is not None:
                sql = _hypertable_copy_sql(stmt, table, i, drop_header=i > 0)
            else:
                sql = _shard_copy_sql(stmt, table, table.shard_name(shard), drop_header=i > 0)
            jobs.append((shard.node_ids[0], sql))
    else:
        plan = query_plan
        ncols = await _describe_columns(runner, stmt.query)
        from executor.distributed import ExecContext, _by_node, _union_all, resolve_shards  # noqa: F401

        ctx = runner._context(row_description=None)
        shards = resolve_shards(plan, ctx)
        if plan.kind == "ref_select":
            node = plan.tables[0].shards[0].node_ids[0]
            groups = {node: [0]}
            template = plan.template
        elif len(shards) <= 1:
            idx = shards[0] if shards else 0
            groups = {plan.tables[0].shards[idx].node_ids[0]: [idx]}
            template = plan.template
        else:
            if plan.multi_error is not None:
                raise plan.multi_error
            if plan.split is None or plan.split.mode != "concat" or plan.split.limit is not None:
                raise PgError(
                    "0A000",
                    "COPY (query) TO STDOUT over several shards supports only queries without aggregates, ORDER BY, DISTINCT or LIMIT",
                    hint="Run the query with SELECT instead.",
                )
            groups = _by_node(plan, shards)
            template = plan.worker_template
        first = True
        for node, node_shards in groups.items():
            q = _union_all(plan, template, node_shards)
            s = copymod.deepcopy(stmt)
            s.query = None
            s.relation = ast.RangeVar(relname="__orochi_q__", inh=True, relpersistence="p")
            if not first and s.options:
                s.options = tuple(d for d in s.options if d.defname != "header") or None
            text = RawStream()(s).replace("__orochi_q__", f"({q})", 1)
            jobs.append((node, text))
            first = False
    fcode = 1 if fmt == "binary" else 0
    session.client.write(pg.message(b"H", bytes([fcode]) + ncols.to_bytes(2, "big") + fcode.to_bytes(2, "big") * ncols))
    total = 0
    settings = session.output_settings()
    relay = _CopyRelay(session, binary=fmt == "binary")
    for node, sql in jobs:
        pool = server.node_pool(node, session.database)
        conn = await pool.acquire()
        try:
            await apply_settings(conn, settings)
            relay.next_node()
            res = await run_on(conn, pg.query(sql), sink=relay.sink, sink_types=(ord("d"),))
            if res.error is not None:
                raise res.error
            total += int(res.tags[-1].split()[-1]) if res.tags else 0
        finally:
            pool.release(conn, reset=not conn.usable)
    relay.finish()
    session.client.write(pg.message(b"c"))
    del header
    return f"COPY {total}"


class _CopyRelay:
    """Forward the nodes' CopyData as one stream, keeping PostgreSQL's message framing.

    Text/CSV: every CopyData is one row; forwarded as is. Binary: the first message of a COPY
    carries the file header in front of the first row and the last one is the trailer alone
    (clients such as psycopg rely on that framing), so the header is kept only on the first row
    of the whole stream, every node's trailer is dropped, and one trailer ends the stream.
    """

    def __init__(self, session, *, binary: bool) -> None:
        self.session = session
        self.binary = binary
        self.header_sent = False
        self.node_first = True

    def next_node(self) -> None:
        self.node_first = True

    def sink(self, buf: bytes, frames: list[tuple[int, int, int]]) -> None:
        if not self.binary:
            self.session.client.write(b"".join(buf[s:e] for _, s, e in frames))
            return
        out = []
        for _, s, e in frames:
            data = buf[s + 5 : e]
            if self.node_first:
                self.node_first = False
                if data.startswith(BINARY_HEADER[:11]):
                    ext = int.from_bytes(data[15:19], "big")
                    data = data[19 + ext :]
            if data == BINARY_TRAILER or not data:
                continue
            if not self.header_sent:
                data = BINARY_HEADER + data
                self.header_sent = True
            out.append(pg.message(b"d", data))
        if out:
            self.session.client.write(b"".join(out))

    def finish(self) -> None:
        if not self.binary:
            return
        if not self.header_sent:
            # No rows at all: PostgreSQL sends header and trailer in one message.
            self.session.client.write(pg.message(b"d", BINARY_HEADER + BINARY_TRAILER))
            return
        self.session.client.write(pg.message(b"d", BINARY_TRAILER))


async def _describe_columns(runner: DistributedRunner, query: ast.Node) -> int:
    sql = RawStream()(query)
    data = pg.parse_message("", sql) + pg.message(b"D", b"S\x00") + pg.SYNC
    msgs = await runner.session._collect_from_backend(data)
    for t, p in msgs:
        if t == ord("T"):
            return int.from_bytes(p[:2], "big")
        if t == ord("E"):
            raise PgError.from_payload(p)
    return 0


async def run_copy(runner: DistributedRunner, action: Distributed) -> str | None:
    """COPY involving catalog tables; None if ``action`` is not a COPY."""
    stmt = action.stmt
    if not isinstance(stmt, ast.CopyStmt):
        return None
    if stmt.filename is not None or stmt.is_program:
        raise PgError(
            "0A000",
            "COPY to or from a server file or program is not supported on distributed tables",
            hint="Use COPY ... FROM STDIN / TO STDOUT (psql: \\copy).",
        )
    session = runner.session
    if session.tx_status == pg.TX_FAILED:
        raise PgError("25P02", "current transaction is aborted, commands ignored until end of transaction block")
    search_path = await runner.current_search_path()
    model = runner.server.catalog.model
    if stmt.relation is not None:
        table = model.lookup(stmt.relation.schemaname, stmt.relation.relname, search_path)
        if table is None:
            return None
        if stmt.whereClause is not None:
            raise PgError("0A000", "COPY ... FROM STDIN WHERE is not supported on distributed tables")
        if stmt.is_from:
            txn = await runner.block_transaction()
            return await runner.run_in_block(txn, copy_from_stdin(runner, stmt, table, txn))
        return await copy_to_stdout(runner, stmt, table, None)
    from rewriter.planner import plan_statement

    plan = plan_statement(stmt.query, RawStream()(stmt.query), model, search_path, model.aggregate_names)
    if plan is None:
        return None
    if plan.kind not in ("select", "ref_select"):
        raise PgError("0A000", "COPY (INSERT/UPDATE/DELETE ... RETURNING) TO STDOUT is not supported on distributed tables")
    return await copy_to_stdout(runner, stmt, None, plan)


__all__ = ["run_copy"]
