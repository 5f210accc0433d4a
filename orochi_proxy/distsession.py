"""Statements on distributed and reference tables, inside a client session.

The logical table stays defined (empty) on the metadata node, so the session forwards the
client's Parse, Describe, Bind and Close of such statements to its metadata-node connection
unchanged: PostgreSQL itself then infers parameter types, describes result columns and checks
bound values, with its own error messages. Only Execute (and a simple Query) is answered by the
proxy: the statement is planned (``rewriter.planner``, cached per text, search_path and catalog
version) and run on the nodes by ``executor.distributed``, whose rows go straight to the client.

Inside a transaction block, statements run on node connections pinned to the block
(``orochi_proxy.txcoordinator``): they see the block's earlier writes and commit with it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable
from typing import TYPE_CHECKING, TypeVar

from pglast import ast, parse_sql

from executor import distributed
from executor import protocol as pg
from executor.protocol import PgError
from executor.transaction import DistTransaction, transaction_failed
from orochi_proxy.chunks import ensure_chunks
from rewriter.intercept import Distributed
from rewriter.literals import Normalized, normalize, shape_is_safe
from rewriter.planner import Plan, plan_statement

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session

T = TypeVar("T")


_MISSING = object()


class DistStatement:
    """A client's prepared statement that mentions catalog tables (answered by the proxy)."""

    __slots__ = ("action", "param_oids", "client_oids", "fields", "version")

    def __init__(self, action: Distributed, client_oids: list[int]) -> None:
        self.action = action
        self.client_oids = client_oids
        self.param_oids: list[int] | None = None  # as the metadata node inferred them
        self.fields: list[pg.Field] | None = None  # result columns; None: no rows (NoData)
        self.version: int | None = None  # catalog version ``fields`` were described at

    def describe_statement(self) -> bytes:
        out = pg.parameter_description(self.param_oids or [])
        if self.fields is None:
            return out + pg.NO_DATA
        return out + pg.row_description([_with_format(f, 0) for f in self.fields])


def _with_format(f: pg.Field, fmt: int) -> pg.Field:
    return pg.Field(f.name, f.type_oid, f.type_size, f.type_mod, fmt, f.table_oid, f.column)


class DistPortal:
    __slots__ = ("statement", "bind", "done", "statement_name", "rows", "tag")

    def __init__(self, statement: DistStatement, bind: pg.BindMsg, statement_name: str) -> None:
        self.statement = statement
        self.bind = bind
        self.statement_name = statement_name
        self.done = False
        # Execute with a row limit (cursors: asyncpg's cursor.fetch(n), JDBC fetchSize): the
        # answer is collected whole, then handed out max_rows DataRows per Execute with
        # PortalSuspended in between, as PostgreSQL does for a portal.
        self.rows: list[bytes] | None = None  # DataRow messages not sent yet
        self.tag = ""  # the statement's command tag (its verb is reused per chunk)

    def next_chunk(self, max_rows: int) -> bytes:
        """Up to ``max_rows`` (0: all) buffered rows, then PortalSuspended or CommandComplete."""
        rows = self.rows or []
        n = len(rows) if max_rows <= 0 else min(max_rows, len(rows))
        out, self.rows = rows[:n], rows[n:]
        if self.rows:
            out.append(pg.PORTAL_SUSPENDED)
        else:
            # PostgreSQL reports the rows of this Execute, under the statement's own verb.
            words = self.tag.split() or ["SELECT", "0"]
            words[-1] = str(n)
            out.append(pg.command_complete(" ".join(words)))
        return b"".join(out)

    def describe_portal(self) -> bytes:
        fields = self.statement.fields
        if fields is None:
            return pg.NO_DATA
        return pg.row_description([_with_format(f, self.bind.result_format(i)) for i, f in enumerate(fields)])


def _split_answer(data: bytes) -> tuple[list[bytes], list[bytes], str]:
    """Messages written by a distributed execution → (DataRows, other messages, command tag)."""
    rows: list[bytes] = []
    other: list[bytes] = []
    tag = ""
    pos = 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1 : pos + 5], "big")
        frame = data[pos : pos + 1 + length]
        pos += 1 + length
        if frame[:1] == b"D":
            rows.append(frame)
        elif frame[:1] == b"C":
            tag = frame[5:].rstrip(b"\x00").decode()
        else:
            other.append(frame)
    return rows, other, tag


class PlanCache:
    """Plans by (statement text, search_path, catalog version); bounded LRU."""

    def __init__(self, size: int = 2000) -> None:
        self.size = size
        self._plans: OrderedDict[tuple, Plan | None] = OrderedDict()

    def _cached(self, key: tuple) -> tuple[bool, Plan | None]:
        try:
            plan = self._plans[key]
        except KeyError:
            return False, None
        self._plans.move_to_end(key)
        return True, plan

    def _store(self, key: tuple, plan: Plan | None) -> Plan | None:
        self._plans[key] = plan
        if len(self._plans) > self.size:
            self._plans.popitem(last=False)
        return plan

    def get(self, server: ProxyServer, action: Distributed, search_path: tuple[str, ...]) -> Plan | None:
        model = server.catalog.model
        key = (action.sql, search_path, model.version)
        hit, plan = self._cached(key)
        if hit:
            return plan
        return self._store(key, plan_statement(action.stmt, action.sql, model, search_path, model.aggregate_names))

    def get_shape(self, server: ProxyServer, norm: Normalized, search_path: tuple[str, ...]) -> Plan | None:
        """The plan of a literal statement's shape (constants as $n); None if it cannot be used."""
        model = server.catalog.model
        key = ("shape", norm.key, search_path, model.version)
        hit, plan = self._cached(key)
        if hit:
            return plan
        plan = None
        try:
            stmts = parse_sql(norm.shape)
        except Exception:  # noqa: BLE001 - unusual text: plan it literally instead
            stmts = ()
        if len(stmts) == 1 and shape_is_safe(stmts[0].stmt) and not isinstance(stmts[0].stmt, ast.ExplainStmt):
            try:
                plan = plan_statement(stmts[0].stmt, norm.shape, model, search_path, model.aggregate_names)
            except PgError:
                plan = None  # the literal text gets the exact error from the normal path
            if plan is not None and plan.multi_error is not None:
                # The split matches expressions structurally: with every constant a different $n,
                # ``SELECT user_id % 7 ... GROUP BY user_id % 7`` no longer finds its GROUP BY
                # item and the shape plan refuses (0A000) what the literal plan runs. Plan such
                # statements by their text.
                plan = None
        return self._store(key, plan)


class TypeNames:
    """OID → (SQL type name, array type OID), loaded from the metadata node on demand."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._known: dict[int, tuple[str, int]] = {}
        self._lock = asyncio.Lock()

    async def lookup(self, oids: list[int]) -> list[tuple[str, int]]:
        missing = [o for o in oids if o not in self._known]
        if missing:
            async with self._lock:
                missing = [o for o in oids if o not in self._known]
                if missing:
                    await self._load(missing)
        out = []
        for o in oids:
            name, arr = self._known.get(o, ("text", 1009))
            if arr == 0:
                raise PgError("0A000", f"cannot combine values of type {name} across shards (it has no array type)")
            out.append((name, arr))
        return out

    async def _load(self, oids: list[int]) -> None:
        pool = self.server.metadata_pool(self.server.config.metadata.dbname)
        conn = await pool.acquire()
        try:
            rows = await conn.simple_query(
                "SELECT oid::text, pg_catalog.format_type(oid, NULL), typarray::text FROM pg_catalog.pg_type "
                f"WHERE oid IN ({', '.join(str(int(o)) for o in oids)})"
            )
        finally:
            pool.release(conn, reset=False)
        for oid, name, arr in rows:
            self._known[int(oid)] = (name.decode(), int(arr))  # type: ignore[union-attr,arg-type]


class DistributedRunner:
    """Per-session helper: describe, plan and execute statements on catalog tables."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.server = session.server
        self.search_path: tuple[str, ...] | None = None
        # (text, declared types, catalog version) -> (parameter types, result columns or None)
        self.descriptions: dict[tuple, tuple[list[int], list[pg.Field] | None]] = {}
        # Result columns of literal statements by shape key (same shape and literal kinds).
        self.shape_fields: dict[tuple, list[pg.Field] | None] = {}

    # ------------------------------------------------------------------ session facts
    async def current_search_path(self) -> tuple[str, ...]:
        if self.search_path is None:
            rows = await self._backend_query("SELECT pg_catalog.array_to_string(pg_catalog.current_schemas(false), ',')")
            text = rows[0][0].decode() if rows and rows[0][0] else ""  # type: ignore[union-attr]
            self.search_path = tuple(s for s in text.split(",") if s)
        return self.search_path

    def invalidate_search_path(self) -> None:
        self.search_path = None

    async def _backend_query(self, sql: str) -> list[list[bytes | None]]:
        # Not a simple Query in the middle of the client's extended-protocol batch: that would
        # commit the batch's implicit transaction, its earlier statements with it.
        msgs = await self.session.tx.backend_messages(sql)
        rows: list[list[bytes | None]] = []
        for t, p in msgs:
            if t == ord("D"):
                rows.append(pg.decode_data_row(p))
            elif t == ord("E"):
                raise PgError.from_payload(p)
        return rows

    async def text_rows(self, sql: str) -> list[list[str | None]]:
        """Rows of ``sql`` on the session's metadata connection, as text (a tabledef ``Query``)."""
        return [[None if v is None else v.decode() for v in r] for r in await self._backend_query(sql)]

    async def block_transaction(self) -> DistTransaction | None:
        """The distributed transaction of the client's open block (None outside blocks)."""
        s = self.session
        if s.tx_status == pg.TX_FAILED:
            raise transaction_failed()
        if s.tx_status == pg.TX_BLOCK:
            txn = await s.tx.current()
            if txn.failed:
                raise transaction_failed()
            return txn
        return None

    async def run_in_block(self, txn: DistTransaction | None, run: Awaitable[T]) -> T:
        """Run a statement (its result); in a block, a failure fails the whole block (on the
        metadata node too), as a failed statement does in PostgreSQL."""
        if txn is None:
            return await run
        try:
            return await run
        except PgError as exc:
            txn.failed = True
            await self.session.tx.fail_backend(exc)
            raise
        except BaseException:
            txn.failed = True
            await self.session.tx.fail_backend(PgError("57014", "canceled"))
            raise

    async def plan(self, action: Distributed) -> Plan | None:
        """The cached plan, or None for a statement that is not a query (DDL, COPY, ...)."""
        search_path = await self.current_search_path()
        return self.server.plans.get(self.server, action, search_path)

    async def run_other(self, action: Distributed) -> str:
        """DDL on catalog tables (or 0A000): returns the command tag."""
        from orochi_proxy.distcopy import run_copy
        from orochi_proxy.distddl import _run_tagged, run_ddl

        if isinstance(action.stmt, ast.CreateStmt) and action.stmt.if_not_exists:
            # CREATE TABLE IF NOT EXISTS of a table that exists (it is distributed): a no-op,
            # answered by the metadata node as PostgreSQL would (with its notice dropped).
            return await _run_tagged(self, action.sql)

        from orochi_proxy.caggs import run_statement as run_cagg_statement

        tag = await run_cagg_statement(self, action.stmt)
        if tag is None:
            tag = await run_copy(self, action)
        if tag is None:
            tag = await run_ddl(self, action)
        if tag is None:
            raise PgError(
                "0A000",
                f"this statement on a distributed or reference table is not supported yet: {action.sql[:80]}",
                hint="Supported: SELECT, INSERT ... VALUES, UPDATE, DELETE, COPY, and ALTER TABLE/CREATE INDEX/DROP INDEX/TRUNCATE/DROP TABLE.",
            )
        return tag

    def _context(self, *, row_description: bytes | None) -> distributed.ExecContext:
        s = self.session
        server = self.server
        database = s.database
        md = server.catalog.metadata_node
        return distributed.ExecContext(
            database=database,
            pool_for=lambda node_id: server.node_pool(node_id, database),
            metadata_pool=lambda: server.metadata_pool(database),
            metadata_node_id=md.node_id if md is not None else None,
            write=s.client.write,
            drain=s.client.drain,
            settings=s.output_settings(),
            type_names=server.type_names.lookup,
            row_description=row_description,
            throttle=s.client.throttle,
            decider=server.txlog.decider(),
            ensure_chunks=lambda table, needs: ensure_chunks(server, database, table, needs),
            hypertable_of=lambda table: getattr(server.catalog.model.tables.get((table.schema, table.name)), "hypertable", None),
        )

    # ------------------------------------------------------------------ extended protocol
    def _description_key(self, sql: str, client_oids: list[int]) -> tuple:
        return (sql, tuple(client_oids), self.server.catalog.model.version, self.search_path)

    def use_cached_description(self, ds: DistStatement) -> bool:
        """Fill ``ds`` from this session's cache; False if the metadata node must describe it."""
        cached = self.descriptions.get(self._description_key(ds.action.sql, ds.client_oids))
        if cached is None:
            return False
        ds.param_oids, ds.fields = cached
        ds.version = self.server.catalog.model.version
        return True

    async def describe(self, sql: str, client_oids: list[int]) -> tuple[list[int], list[pg.Field] | None]:
        """Parameter types and result columns of ``sql`` as PostgreSQL sees it on the shell tables.

        Uses a private statement name and ends with Sync only when the client has nothing
        pending on the connection (otherwise Flush: a Sync would end the client's batch).
        """
        await self.current_search_path()
        key = self._description_key(sql, client_oids)
        cached = self.descriptions.get(key)
        if cached is not None:
            return cached
        name = b"__orochi_describe\x00"
        session = self.session
        body = (
            pg.parse_message("__orochi_describe", sql, client_oids)
            + pg.message(b"D", b"S" + name)
            + pg.message(b"C", b"S" + name)
        )
        if session._unsynced:
            msgs = await session._collect_until(body + pg.FLUSH, (ord("3"), ord("E")))
        else:
            msgs = await session._collect_from_backend(body + pg.SYNC)
        oids: list[int] = []
        fields: list[pg.Field] | None = None
        for t, p in msgs:
            if t == ord("t"):
                import struct

                (n,) = struct.unpack_from("!h", p, 0)
                oids = list(struct.unpack_from(f"!{n}I", p, 2)) if n else []
            elif t == ord("T"):
                fields = pg.decode_row_description(p)
            elif t == ord("E"):
                if session._unsynced:
                    # The node now skips until the client's Sync; that Sync must reach it.
                    session._unsynced = True
                raise PgError.from_payload(p)
        if len(self.descriptions) > 2000:
            self.descriptions.clear()
        self.descriptions[key] = (oids, fields)
        return oids, fields

    async def describe_converted(self, converted: list[tuple[str, DistStatement]]) -> tuple[bytes, bool]:
        """Describe statements that became distributed after they were prepared (no output)."""
        for name, ds in converted:
            try:
                ds.param_oids, ds.fields = await self.describe(ds.action.sql, ds.client_oids)
            except PgError:
                # Keep using the node's prepared statement; the node reports what is wrong.
                if self.session.dist_statements.get(name) is ds:
                    del self.session.dist_statements[name]
                    self.session.passthrough_statements[name] = (ds.action.sql, ds.client_oids)
        return b"", False

    async def parse_task(self, ds: DistStatement, name: str) -> tuple[bytes, bool]:
        """First Parse of a distributed statement in this session: describe it on the shell."""
        try:
            ds.version = self.server.catalog.model.version
            ds.param_oids, ds.fields = await self.describe(ds.action.sql, ds.client_oids)
        except PgError:
            if self.session.dist_statements.get(name) is ds:
                del self.session.dist_statements[name]
            raise
        return pg.PARSE_COMPLETE, False

    async def execute_portal(self, dp: DistPortal, max_rows: int = 0) -> tuple[bytes, bool]:
        metrics = self.server.metrics
        if dp.rows is not None:
            return dp.next_chunk(max_rows), False
        if dp.done:
            return pg.command_complete("SELECT 0"), False
        oids = dp.statement.param_oids or []
        if isinstance(dp.statement.action.stmt, ast.ExplainStmt):
            from orochi_proxy.distexplain import explain, plan_rows

            ctx = self._context(row_description=None)
            ctx.params, ctx.param_formats, ctx.param_oids = dp.bind.params, dp.bind.param_formats, oids
            lines = await explain(self, dp.statement.action, ctx)
            dp.done = True
            return plan_rows(lines, simple=False), False
        await self._check_result_shape(dp.statement)
        plan = await self.plan(dp.statement.action)
        if plan is None:
            tag = await self.run_other(dp.statement.action)
            dp.done = True
            return pg.command_complete(tag), False
        txn = await self.block_transaction()
        ctx = self._context(row_description=None)
        ctx.txn = txn
        ctx.params = dp.bind.params
        ctx.param_formats = dp.bind.param_formats
        ctx.param_oids = oids
        ctx.result_formats = dp.bind.result_formats
        metrics.statements.labels(_strategy(plan)).inc()
        if max_rows > 0:
            collected: list[bytes] = []
            ctx.write = collected.append
            await self.run_in_block(ctx.txn, self._execute(plan, ctx))
            dp.done = True
            dp.rows, other, dp.tag = _split_answer(b"".join(collected))
            return b"".join(other) + dp.next_chunk(max_rows), False
        await self.run_in_block(ctx.txn, self._execute(plan, ctx))
        dp.done = True
        return b"", False

    async def _check_result_shape(self, ds: DistStatement) -> None:
        """After DDL, refuse a prepared statement whose result columns changed, as PostgreSQL does.

        The proxy answers Bind itself, so PostgreSQL's own check never runs; the re-planned
        statement would send rows of the new shape under the RowDescription the client already
        holds (``SELECT *`` after ADD COLUMN), which clients misread.
        """
        version = self.server.catalog.model.version
        if ds.version is None or ds.version == version:
            return
        _, fields = await self.describe(ds.action.sql, ds.client_oids)

        def shape(fs: list[pg.Field] | None) -> list[tuple[str, int, int]] | None:
            return None if fs is None else [(f.name, f.type_oid, f.type_mod) for f in fs]

        if shape(fields) != shape(ds.fields):
            message = "cached plan must not change result type"
            # PostgreSQL's routine name: asyncpg recognises it and re-prepares its cached statement.
            fields_ = {"S": "ERROR", "V": "ERROR", "C": "0A000", "M": message, "R": "RevalidateCachedQuery"}
            raise PgError("0A000", message, fields=fields_)
        ds.version = version

    async def _execute(self, plan: Plan, ctx: distributed.ExecContext) -> None:
        if plan.kind == "insert_select":
            from orochi_proxy.distinsert import insert_select_via_proxy

            await insert_select_via_proxy(self, plan, ctx)
            return
        await distributed.execute(plan, ctx)

    # ------------------------------------------------------------------ simple protocol
    async def run_shape(self, sql: str, norm: Normalized) -> bool:
        """Run a literal statement by the cached plan of its shape; False (nothing done) when
        the shape has no plan for the session's search_path or its literals do not route."""
        search_path = await self.current_search_path()
        shape_plan = self.server.plans.get_shape(self.server, norm, search_path)
        if shape_plan is None or not _literals_route(shape_plan, norm):
            return False
        txn = await self.block_transaction()
        fkey = (norm.key, self.server.catalog.model.version, search_path)
        fields = self.shape_fields.get(fkey, _MISSING)
        if fields is _MISSING:
            _, fields = await self.describe(sql, [])
            if len(self.shape_fields) > 2000:
                self.shape_fields.clear()
            self.shape_fields[fkey] = fields
        ctx = self._context(row_description=pg.row_description(fields) if fields is not None else None)
        ctx.literals = norm.literals
        ctx.txn = txn
        self.server.metrics.statements.labels(_strategy(shape_plan)).inc()
        await self.run_in_block(ctx.txn, distributed.execute(shape_plan, ctx))
        return True

    async def run_simple(self, action: Distributed, norm: Normalized | None = None) -> None:
        """One statement of a simple Query: describe on the shell, run, write T/D/C.

        ``norm``: the Query's normalized text when it is this one statement (already computed
        by the session), else it is normalized here."""
        if isinstance(action.stmt, ast.ExplainStmt):
            from orochi_proxy.distexplain import explain, plan_rows

            lines = await explain(self, action, self._context(row_description=None))
            self.session.client.write(plan_rows(lines, simple=True))
            return
        if norm is None:
            norm = normalize(action.sql)
        if norm is not None and await self.run_shape(action.sql, norm):
            return
        plan = await self.plan(action)
        if plan is None:
            self.session.client.write(pg.command_complete(await self.run_other(action)))
            return
        txn = await self.block_transaction()
        _, fields = await self.describe(action.sql, [])
        row_description = pg.row_description(fields) if fields is not None else None
        ctx = self._context(row_description=row_description)
        ctx.txn = txn
        self.server.metrics.statements.labels(_strategy(plan)).inc()
        await self.run_in_block(ctx.txn, self._execute(plan, ctx))


def _literals_route(plan: Plan, norm: Normalized) -> bool:
    """An INSERT planned by shape must know every row's key literal (E'..' strings are not decoded)."""
    if plan.kind == "insert_select":
        return False
    if plan.kind != "insert":
        return True
    return all(
        r.key is None or r.key.kind != "param" or norm.literals[r.key.number - 1].value is not None
        for r in plan.insert_rows
    )


def _strategy(plan: Plan) -> str:
    if plan.kind in ("select", "modify", "insert"):
        return "multi_shard" if plan.pins is None and plan.kind != "insert" else "router"
    return "router"
