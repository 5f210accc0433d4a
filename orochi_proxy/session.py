"""One client session after start-up: routes each frontend message and keeps answers in order.

Design (why it looks like this):

* **Callbacks, no per-message coroutine.** A statement that goes to the metadata node unchanged
  is written to the backend straight from ``on_message`` and its answer is relayed straight from
  ``on_backend_messages``: no task switch, no queue, one write per batch of messages. That is the
  path pgbench measures.
* **Ordered slots.** The protocol answers messages in order, but some messages are answered by
  the node and some by the proxy (admin functions such as ``citus_add_node``; later, statements
  the executor fans out). ``self.pending`` holds one entry per outstanding answer: an ``int``
  kind for a message forwarded to the node (completed by the matching backend message) or a
  ``LocalAnswer``. A local answer is written only when it reaches the head, so the client sees
  exactly the order PostgreSQL would produce.
* **Errors as PostgreSQL has them.** After an error in the extended protocol, everything up to
  the next Sync is skipped: forwarded entries are dropped (the node skips them too), local ones
  are never run, and later client messages until Sync are not forwarded (``skipping``).
* **Blocking local work.** A local answer that has to run something (a task) blocks: the
  client's later messages wait in ``backlog`` until it finishes, so the task can use the
  backend connection in collect mode and nothing overtakes it.

* **Transactions.** Transaction control is the ``TxCoordinator``'s (``self.tx``) as soon as a
  distributed statement joined the block; a multi-statement Query or an extended-protocol batch
  with a distributed write runs in an implicit block the proxy opens, with PostgreSQL's rules
  for transaction control inside it (``TxCoordinator.control_in_implicit``).
* **A lost node connection is never silent.** Lost while relaying: FATAL 08006
  (``on_backend_lost``). Lost while a proxy-run statement held it (collect mode): the next
  client message finds it closed and gets FATAL 08006, or, between transactions with
  transaction pooling, a fresh connection (``_replace_lost_backend``); nothing is ever queued
  for a dead connection, since its answer would never come.

Pool modes: *session* (default) — the client holds one metadata-node connection from start-up
to Terminate, prepared statement names pass through unchanged; *transaction* — the session
holds a connection only inside a transaction or an unfinished batch (``_attach_nowait``,
``_maybe_detach``), with its settings and prepared statements reproduced on each
(``orochi_proxy.txpool``). ``kill -USR1`` makes the server log every session's state
(``describe``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from executor import protocol as pg
from executor.backend import BackendConnection, node_unavailable
from executor.pool import NodePool
from executor.protocol import PgError, ProtocolViolation
from orochi_proxy import localexec, txpool
from orochi_proxy.distsession import DistPortal, DistributedRunner, DistStatement
from orochi_proxy.txcoordinator import TxCoordinator
from rewriter.intercept import (
    TX_WORDS,
    AdminCall,
    Distributed,
    Passthrough,
    TxControl,
    classify_tx_control,
)
from rewriter.literals import normalize
from rewriter.quoting import quote_literal

if TYPE_CHECKING:
    from orochi_proxy.server import ClientConnection, ProxyServer

log = logging.getLogger(__name__)

# Kinds of forwarded messages and the backend message types that complete their answer.
K_PARSE, K_BIND, K_CLOSE, K_DESCRIBE, K_EXECUTE, K_SYNC, K_QUERY = range(7)
# Transaction pooling: a Close/Parse the proxy slips in to prepare a client's statement on the
# connection now serving it; its answer is not the client's and is cut out of the relay.
K_HIDDEN_CLOSE, K_HIDDEN_PARSE = 7, 8
_COMPLETES: tuple[frozenset[int], ...] = (
    frozenset(b"1"),
    frozenset(b"2"),
    frozenset(b"3"),
    frozenset(b"Tn"),
    frozenset(b"CIs"),
    frozenset(b"Z"),
    frozenset(b"Z"),
    frozenset(b"3"),
    frozenset(b"1"),
)
_Z_TERMINATED = (K_SYNC, K_QUERY)
# Messages whose body the proxy may decode, and the kind of answer each gets when forwarded.
_BODY_KINDS = {
    ord("P"): K_PARSE,
    ord("B"): K_BIND,
    ord("D"): K_DESCRIBE,
    ord("E"): K_EXECUTE,
    ord("C"): K_CLOSE,
    ord("Q"): K_QUERY,
}
_ERR = ord("E")
_READY = ord("Z")
_COPY_IN = ord("G")

# A simple Query that drops prepared statements: DEALLOCATE [PREPARE] name | ALL, DISCARD ALL.
_DEALLOCATE = re.compile(
    rb'\s*(?:DEALLOCATE\s+(?:PREPARE\s+)?(?P<name>"(?:[^"]|"")+"|[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*)'
    rb"|DISCARD\s+ALL)\s*;?\s*\x00?",
    re.IGNORECASE,
)

# Startup parameters that are session settings to reproduce on the backend.
_NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})


class LocalAnswer:
    """An answer produced by the proxy. ``data`` is set when ready; ``run`` makes it when blocking."""

    __slots__ = ("data", "error", "run", "task", "extended", "sync")

    def __init__(
        self,
        data: bytes | None = None,
        *,
        error: bool = False,
        run: Callable[[], Awaitable[tuple[bytes, bool]]] | None = None,
        extended: bool = True,
        sync: bool = False,
    ) -> None:
        self.data = data
        self.error = error
        self.run = run
        self.task: asyncio.Task[None] | None = None
        self.extended = extended
        self.sync = sync  # the proxy's own answer to a Sync: skipping after an error stops here


class LocalStatement:
    """A prepared statement the proxy answers itself (an admin function call)."""

    __slots__ = ("call", "param_oids")

    def __init__(self, call: AdminCall, param_oids: list[int]) -> None:
        self.call = call
        self.param_oids = param_oids


class LocalPortal:
    __slots__ = ("statement", "bind", "done")

    def __init__(self, statement: LocalStatement, bind: pg.BindMsg) -> None:
        self.statement = statement
        self.bind = bind
        self.done = False


class Session:
    def __init__(
        self,
        server: ProxyServer,
        client: ClientConnection,
        user: str,
        database: str,
        startup_params: dict[str, str],
    ) -> None:
        self.server = server
        self.client = client
        self.user = user
        self.database = database
        self.startup_params = startup_params
        self.backend: BackendConnection | None = None
        self.pool: NodePool | None = None
        self.pending: deque[int | LocalAnswer] = deque()
        self.backlog: deque[tuple[int, bytes]] = deque()
        self.blocked = 0  # number of blocking local answers in ``pending``
        self.skipping = False
        self.tx_status = pg.TX_IDLE
        self.local_statements: dict[str, LocalStatement] = {}
        self.local_portals: dict[str, LocalPortal] = {}
        self.closed = False
        self.dist_statements: dict[str, DistStatement] = {}
        self.dist_portals: dict[str, DistPortal] = {}
        self.dist = DistributedRunner(self)
        self.tx = TxCoordinator(self)  # the distributed side of the client's transaction block
        # Prepared transaction-control statements (COMMIT, SAVEPOINT ...) and their portals: while
        # a distributed transaction is open their Execute is run by the proxy (on the nodes too).
        self.tx_statements: dict[str, TxControl] = {}
        self.tx_portals: dict[str, TxControl] = {}
        # Transaction pooling (orochi_proxy.txpool): the metadata-node connection is attached
        # only while needed; settings and named statements follow the client.
        self.txn_pooling = server.config.server.pool_mode == "transaction"
        self.client_settings: dict[str, str] = {}
        self.startup_settings: dict[str, str] = {}
        self.client_statements: dict[str, tuple[str, bytes]] = {}  # name -> (node-side name, its Parse)
        self._pinned = False  # state the proxy cannot reproduce: keep this connection
        self._new_parses: list[str] = []  # node-side names prepared since the last ReadyForQuery
        self._pending_sets: list[tuple[str, str | None]] | None = None  # SETs awaiting success
        self._query_failed = False
        self.reported: dict[str, str] = {}  # ParameterStatus values the node reported to us
        self.copy_sink = None  # set while a proxy-run COPY FROM STDIN reads the client's data
        self._draining = False  # replaying the backlog (new messages queue behind it otherwise)
        self._wbuf: list[bytes] | None = None  # forwarded messages waiting for end_batch()
        # Named statements prepared on the metadata node: name -> (text, declared types). When
        # the catalog changes (a table becomes distributed), they are analysed again.
        self.passthrough_statements: dict[str, tuple[str, list[int]]] = {}
        self._checked_version = server.catalog.version
        self.metrics = server.metrics
        # Children resolved once: label lookup per statement is measurable on the relay path.
        self._passthrough_count = server.metrics.statements.labels("passthrough")
        self._passthrough_seconds = server.metrics.statement_seconds.labels("passthrough")
        self._stmt_started = 0.0
        # Something went to the node after its last ReadyForQuery (a Parse/Bind/Execute without
        # Sync, a Flush): the node is mid-conversation, so the connection cannot be reset.
        self._unsynced = False
        # The node is in COPY FROM STDIN started by an extended-protocol Execute: it ignores
        # every Sync until CopyDone/CopyFail (libpq sends one with the Execute and another after
        # CopyDone), so those Syncs get no ReadyForQuery and must get no ``pending`` entry.
        self._copy_in_extended = False
        # Executes handled since the client's last Sync: with a distributed write among several,
        # the batch runs as one transaction block (``_execute_dist_portal``).
        self._batch_executes = 0

    @property
    def router(self):
        """The server's interceptor (rebuilt when the catalog's table names change)."""
        return self.server.router

    def output_settings(self) -> dict[str, str]:
        """Settings that shape how values print; reproduced on node connections for this session."""
        out = {}
        for name in ("DateStyle", "TimeZone", "IntervalStyle"):
            v = self.reported.get(name)
            if v is not None:
                out[name] = v
        for name in ("extra_float_digits", "bytea_output"):
            v = self.startup_params.get(name)
            if v is not None:
                out[name] = v
        return out

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> dict[str, str]:
        """Bind a metadata-node connection and apply the client's start-up settings to it.

        The connection stays in a local until start-up is done: a client that leaves meanwhile
        (start-up timeout while the pool is busy, a disconnect) closes the session, and then only
        this coroutine can give the connection back. Storing it on ``self`` first leaked it, and
        leaked connections wedged the pool for every later client.
        """
        self.pool = pool = self.server.session_pool(self.database)
        settings = [(k, v) for k, v in self.startup_params.items() if k not in _NOT_SETTINGS]
        settings += _parse_options(self.startup_params.get("options", ""))
        if self.txn_pooling:
            return await self._start_pooled(pool, settings)
        backend = await pool.acquire()
        try:
            if settings:
                sql = "; ".join(
                    f"SELECT pg_catalog.set_config({quote_literal(k)}, {quote_literal(v)}, false)" for k, v in settings
                )
                await backend.simple_query(sql)
            if self.closed:
                raise PgError("08003", "the client closed the connection during start-up")
        except BaseException:
            pool.release(backend)
            raise
        self.backend = backend
        backend.consumer = self
        params = dict(backend.parameters)
        self.reported = dict(params)
        if self.server.config.server.server_version:
            params["server_version"] = self.server.config.server.server_version
        return params

    async def _start_pooled(self, pool: NodePool, settings: list[tuple[str, str]]) -> dict[str, str]:
        """Transaction pooling: borrow a connection to learn the parameters, then give it back."""
        self.startup_settings = {k.lower(): v for k, v in settings}
        self.client_settings = dict(self.startup_settings)
        backend = await pool.acquire()
        try:
            await self._apply_client_settings(backend)
            if self.closed:
                raise PgError("08003", "the client closed the connection during start-up")
        except BaseException:
            pool.release(backend)
            raise
        params = dict(backend.parameters)
        self.reported = dict(params)
        pool.release(backend, reset=False)
        if self.server.config.server.server_version:
            params["server_version"] = self.server.config.server.server_version
        return params

    async def _apply_client_settings(self, conn: BackendConnection) -> None:
        applied: dict[str, str] = conn.__dict__.get("applied_settings", {})
        sql, new = txpool.settings_sql(applied, self.client_settings)
        if sql:
            await conn.simple_query(sql)
        conn.__dict__["applied_settings"] = new

    def describe(self) -> str:
        """One line of this session's protocol state (for ``ProxyServer.log_sessions``)."""
        b = self.backend
        conn = "none" if b is None else (
            f"{b.node_name}#{b.id} closed={b.closed} broken={b.broken} relaying={b.consumer is self}"
        )
        heads = [p if p.__class__ is int else type(p).__name__ for p in list(self.pending)[:4]]
        return (
            f"tx={self.tx_status!r} txn={self.tx.txn is not None} pending={len(self.pending)}{heads} "
            f"blocked={self.blocked} backlog={len(self.backlog)} unsynced={self._unsynced} "
            f"skipping={self.skipping} pinned={self._pinned} backend={conn}"
        )

    # ------------------------------------------------------------------ transaction pooling
    def _attach_nowait(self) -> bool:
        """Attach an idle connection whose settings already match (the common case) at once.

        False: a task is attaching one (waiting for the pool, or applying settings).
        """
        assert self.pool is not None
        conn = self.pool.acquire_nowait()
        if conn is not None:
            sql, _ = txpool.settings_sql(conn.__dict__.get("applied_settings", {}), self.client_settings)
            if not sql:
                self.backend = conn
                conn.consumer = self
                return True
        self._start_attach(conn)
        return False

    def _start_attach(self, conn: BackendConnection | None = None) -> None:
        """Attach a connection in a task; client messages wait in the backlog meanwhile."""
        self.blocked += 1
        asyncio.get_running_loop().create_task(self._attach_task(conn))

    async def _attach_task(self, conn: BackendConnection | None) -> None:
        try:
            await self._attach(conn)
        except Exception as exc:  # noqa: BLE001 - any failure must reach the client, whose messages wait
            if not isinstance(exc, (PgError, OSError)):
                log.exception("internal error attaching a node connection")
            err = exc if isinstance(exc, PgError) else node_unavailable("metadata", str(exc))
            self.client.fail(PgError(err.sqlstate, err.message, "FATAL", hint=err.hint))
            return
        finally:
            self.blocked -= 1
        if not self.closed:
            self._drain_backlog()

    async def _attach(self, conn: BackendConnection | None = None) -> BackendConnection:
        assert self.pool is not None
        pool = self.pool
        if conn is None:
            conn = await pool.acquire()
        try:
            await self._apply_client_settings(conn)
        except BaseException:
            pool.release(conn, reset=True)
            raise
        if self.closed:
            pool.release(conn, reset=False)
            raise PgError("08003", "the client closed the connection")
        self.backend = conn
        conn.consumer = self
        return conn

    def _between_transactions(self) -> bool:
        """Nothing of the client's is open on its node connection: no answer awaited, no
        batch, transaction, COPY or pinned session state (so another connection can serve it)."""
        return not (
            self.pending
            or self._unsynced
            or self.blocked
            or self._pinned
            or self.tx_status != pg.TX_IDLE
            or self.tx.txn is not None
            or self.copy_sink is not None
            or self._copy_in_extended
        )

    def _maybe_detach(self) -> None:
        """Between transactions, give the metadata-node connection back to the pool."""
        backend = self.backend
        if (
            backend is None
            or self.backlog
            or self.closed
            or backend.consumer is not self
            or not self._between_transactions()
        ):
            return
        self.backend = None
        assert self.pool is not None
        self.pool.release(backend, reset=False)

    def _note_pooled_query(self, payload: bytes) -> None:
        """Settings and session state in a simple Query (transaction pooling)."""
        if txpool.PINNING.search(payload):
            self._pinned = True
        elif txpool.SET_WORDS.match(payload):
            sets = txpool.parse_set(pg.decode_query(payload))
            if sets is None:
                self._pinned = True
            else:
                self._pending_sets = sets

    def _apply_sets(self, sets: list[tuple[str, str | None]]) -> None:
        applied = self.backend.__dict__.setdefault("applied_settings", {}) if self.backend is not None else {}
        for name, value in sets:
            if name == "*":
                self.client_settings = dict(self.startup_settings)
                applied.clear()
                applied.update(self.startup_settings)
            elif value is None:
                if name in self.startup_settings:
                    self.client_settings[name] = self.startup_settings[name]
                else:
                    self.client_settings.pop(name, None)
                for k in [k for k in applied if k.lower() == name]:
                    del applied[k]
                if name in self.startup_settings:
                    applied[name] = self.startup_settings[name]
            else:
                self.client_settings[name] = value
                applied[name] = value

    def _statement_ref(self, name: str) -> str | None:
        """The node-side name of a client's named statement, prepared on the connection first."""
        entry = self.client_statements.get(name)
        if entry is None:
            return None
        bname, parse_frame = entry
        backend = self.backend
        if backend is not None and bname not in backend.prepared:
            # Close first: a Parse of a name the connection still has (an earlier batch's
            # failure made us forget it) would fail with 42P05.
            self._forward(pg.message(b"C", b"S" + pg.cstr(bname)), K_HIDDEN_CLOSE)
            self._forward(parse_frame, K_HIDDEN_PARSE)
            backend.prepared.add(bname)
            self._new_parses.append(bname)
        return bname

    def close(self) -> None:
        """The client went away: return the backend (reset) and cancel local work."""
        if self.closed:
            return
        self.closed = True
        self.tx.abandon()
        for entry in self.pending:
            if isinstance(entry, LocalAnswer) and entry.task is not None:
                entry.task.cancel()
        backend, self.backend = self.backend, None
        if backend is not None and self.pool is not None:
            if self.pending or self._unsynced:
                # Mid-statement or mid-pipeline: no reset can be trusted (a Sync would even commit
                # the implicit transaction the client never finished). Closing rolls it back.
                backend.broken = True
            backend.tx_status = self.tx_status  # relay mode does not track it on the connection
            self.pool.release(backend, reset=True)
        self.pending.clear()
        self.backlog.clear()

    def cancel(self) -> None:
        """A CancelRequest named this session: cancel on the node and any local task."""
        if self.backend is not None and self.pending:
            asyncio.get_running_loop().create_task(self.backend.cancel())
            if self.backend.consumer is None:
                # A local task is waiting on the metadata node in collect mode: the node's own
                # 57014 ends its statement. Cancelling the task instead would abandon that
                # exchange, and the node's late ErrorResponse/ReadyForQuery would then be relayed
                # as the answer to the client's next statement.
                return
        for entry in self.pending:
            if isinstance(entry, LocalAnswer) and entry.task is not None:
                entry.task.cancel()

    def pause_backend(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.pause_reading()

    def resume_backend(self) -> None:
        if self.backend is not None and self.backend.transport is not None:
            self.backend.transport.resume_reading()

    # ------------------------------------------------------------------ client → proxy
    def on_message(self, mtype: int, payload: bytes, frame: bytes) -> None:
        """Handle one complete frontend message (``frame`` is the whole message, header included)."""
        if self.closed:
            return
        if self.copy_sink is not None and mtype in (100, 99, 102):  # d c f: data for a proxy-run COPY
            self.copy_sink.put(mtype, payload)
            return
        if (
            self.passthrough_statements
            and mtype in (66, 68, 69)  # B D E: a prepared statement may have to change hands
            and self.server.catalog.version != self._checked_version
        ):
            self._recheck_prepared()
        if self.blocked or (self.backlog and not self._draining):
            # Behind a blocking answer, or behind messages waiting to be replayed: keep order.
            self.backlog.append((mtype, frame))
            return
        backend = self.backend
        if backend is not None and backend.closed and mtype != 88 and not self._replace_lost_backend(backend):
            return
        if self.backend is None and self.txn_pooling and mtype != 88 and not self._attach_nowait():  # 'X'
            # Replayed once the attaching task has a connection. While draining, the messages
            # behind this one are still in the backlog: it goes back to the front, not the end.
            if self._draining:
                self.backlog.appendleft((mtype, frame))
            else:
                self.backlog.append((mtype, frame))
            return
        if self.skipping:
            if mtype == 83:  # 'S' Sync ends the skip
                self.skipping = False
            elif mtype in (80, 66, 68, 69, 67, 72):  # P B D E C H: discarded until Sync
                return
        try:
            handler = self._handlers[mtype]
        except KeyError:
            raise ProtocolViolation(f"invalid frontend message type {mtype}") from None
        try:
            handler(self, payload, frame)
        except ProtocolViolation as exc:
            if mtype not in _BODY_KINDS:
                raise
            self._on_malformed(mtype, payload, frame, exc)

    def _on_malformed(self, mtype: int, payload: bytes, frame: bytes, exc: ProtocolViolation) -> None:
        """A well-framed message whose body does not decode: an ERROR for this request only.

        PostgreSQL answers a malformed Parse/Bind/Query with ERROR 08P01 and carries on (skipping
        to Sync in the extended protocol); a FATAL close here would lose the client's session and
        transaction. So the frame goes to the node, which words the error as PostgreSQL does and
        keeps the transaction state right, unless it is a Bind to a statement the proxy answers
        itself, which the node has never seen.
        """
        if mtype == 66:  # 'B'
            try:
                pos = pg.read_cstr(payload, 0)[1]
                stmt_name: str | None = pg.read_cstr(payload, pos)[0]
            except ProtocolViolation:
                stmt_name = None
            if stmt_name is not None and stmt_name in self.local_statements:
                self._local_error(PgError("08P01", str(exc)))
                return
        self._forward(frame, _BODY_KINDS[mtype])

    def _forward(self, frame: bytes, kind: int | None) -> None:
        if self.backend is None:
            raise node_unavailable("metadata", "no backend connection")
        if kind is not None:
            self.pending.append(kind)
        self._unsynced = True
        if self._wbuf is not None:
            self._wbuf.append(frame)
        else:
            self.backend.write(frame)

    def begin_batch(self) -> None:
        """Coalesce forwarded messages until :meth:`end_batch`: one send() per client read.

        A pipelined Bind/Execute/Sync arrives in one read; writing each message separately
        cost a send() (and a wake-up of the node) per message.
        """
        if self._wbuf is None:
            self._wbuf = []

    def end_batch(self) -> None:
        buf, self._wbuf = self._wbuf, None
        if not buf:
            return
        backend = self.backend
        if backend is None or backend.closed:
            # Their answers are awaited in ``pending``; dropping the messages silently would
            # leave the client waiting forever.
            self._metadata_connection_lost(backend.node_name if backend is not None else "metadata")
            return
        backend.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def _on_query(self, payload: bytes, frame: bytes) -> None:
        self._stmt_started = time.perf_counter()
        if self.txn_pooling:
            self._note_pooled_query(payload)
        if b"search_path" in payload:
            self.dist.invalidate_search_path()
        if (self.local_statements or self.dist_statements or self.txn_pooling) and self._on_deallocate(payload):
            return
        if self.tx.txn is not None and TX_WORDS.search(payload):
            # Transaction control while nodes take part in the block: the proxy runs it.
            sql = pg.decode_query(payload)
            self._enqueue_task(lambda: self._run_simple_query(sql), extended=False)
            return
        if not self.router.may_intercept(payload):
            self._passthrough_count.inc()
            self._forward(frame, K_QUERY)
            return
        sql = pg.decode_query(payload)
        self._enqueue_task(lambda: self._run_simple_query(sql), extended=False)

    def _on_deallocate(self, payload: bytes) -> bool:
        """DEALLOCATE of a statement the proxy answers itself: the node never saw it.

        Forwarded, ``DEALLOCATE name`` failed on the node with 26000 (psycopg with libpq < 17
        evicts prepared statements this way). Returns True if answered here; DEALLOCATE ALL and
        DISCARD ALL go on to the node and drop the proxy's statements too.
        """
        m = _DEALLOCATE.fullmatch(payload)
        if m is None:
            return False
        raw = m.group("name")
        if raw is None or raw.upper() == b"ALL":
            self.local_statements.clear()
            self.dist_statements.clear()
            if self.txn_pooling:
                self.client_statements.clear()
                if raw is not None:
                    # The connection's statements are shared by other clients: only this
                    # client's names go.
                    self._enqueue_task(lambda: self._answer_tag("DEALLOCATE ALL"), extended=False)
                    return True
                if self.backend is not None:
                    self.backend.prepared.clear()  # DISCARD ALL drops them on the node
                    self.backend.__dict__.pop("applied_settings", None)
            return False
        if raw[:1] == b'"':
            name = raw[1:-1].replace(b'""', b'"').decode()
        else:
            name = raw.decode().lower()
        if name in self.client_statements:
            del self.client_statements[name]
            self._enqueue_task(lambda: self._answer_tag("DEALLOCATE"), extended=False)
            return True
        if name not in self.local_statements and name not in self.dist_statements:
            return False
        self._enqueue_task(lambda: self._run_deallocate(name), extended=False)
        return True

    def _recheck_prepared(self) -> None:
        """Statements prepared before a table became distributed must now be answered by the proxy.

        Left on the metadata node they would read the (empty) logical table. Each one that now
        mentions a catalog table becomes a proxy-answered statement, described first by a
        blocking task (later messages wait behind it).
        """
        self._checked_version = self.server.catalog.version
        converted: list[tuple[str, DistStatement]] = []
        for name, (sql, oids) in list(self.passthrough_statements.items()):
            if not self.router.may_intercept(sql.encode()):
                continue
            try:
                actions = self.router.analyze(sql)
            except PgError:
                continue
            if len(actions) == 1 and isinstance(actions[0], Distributed):
                ds = DistStatement(actions[0], oids)
                self.dist_statements[name] = ds
                del self.passthrough_statements[name]
                self.client_statements.pop(name, None)
                converted.append((name, ds))
        if converted:
            self._enqueue_task(lambda: self.dist.describe_converted(converted), extended=True)

    def _on_parse(self, payload: bytes, frame: bytes) -> None:
        if TX_WORDS.search(payload):
            self._note_tx_statement(payload)
        elif self.tx_statements:
            self.tx_statements.pop(pg.read_cstr(payload, 0)[0], None)
        if self.txn_pooling:
            if txpool.PINNING.search(payload) or txpool.SET_WORDS.match(payload, payload.find(b"\x00") + 1):
                self._pinned = True  # SET, LISTEN ... through the extended protocol: not followed
            elif txpool.DROPS_STATEMENTS.search(payload):
                payload, frame = self._pooled_deallocate(payload, frame)
        if not self.router.may_intercept(payload):
            if payload[:1] != b"\x00":
                try:
                    msg = pg.decode_parse(payload)
                    self.passthrough_statements[msg.name] = (msg.sql, msg.param_oids)
                except ProtocolViolation:
                    pass  # the node reports the malformed message
                else:
                    if self.txn_pooling and self._forward_named_parse(msg.name, payload):
                        return
            if self.dist_statements and payload[:1] == b"\x00":
                self.dist_statements.pop("", None)
            if self.local_statements:
                name = pg.read_cstr(payload, 0)[0]
                if name in self.local_statements:
                    if name:
                        self._local_error(PgError("42P05", f'prepared statement "{name}" already exists'))
                        return
                    del self.local_statements[name]
            self._forward(frame, K_PARSE)
            return
        msg = pg.decode_parse(payload)
        try:
            actions = self.router.analyze(msg.sql)
        except PgError as exc:
            self._local_error(exc)
            return
        if len(actions) > 1:
            self._local_error(PgError("42601", "cannot insert multiple commands into a prepared statement"))
            return
        action = actions[0] if actions else Passthrough(msg.sql)
        if isinstance(action, Distributed):
            if msg.name in self.local_statements or (msg.name and msg.name in self.dist_statements):
                if msg.name:
                    self._local_error(PgError("42P05", f'prepared statement "{msg.name}" already exists'))
                    return
                del self.local_statements[msg.name]
            # Answered by the proxy: described once on the metadata node (cached), never
            # prepared there, so Bind/Describe/Execute/Close of it need no round trip.
            ds = DistStatement(action, msg.param_oids)
            self.dist_statements[msg.name] = ds
            if self.dist.use_cached_description(ds):
                self._local_ready(pg.PARSE_COMPLETE)
            else:
                self._enqueue_task(lambda: self.dist.parse_task(ds, msg.name), extended=True)
            return
        if not msg.name:
            self.dist_statements.pop("", None)
        if isinstance(action, Passthrough):
            if msg.name in self.local_statements:
                if msg.name:
                    self._local_error(PgError("42P05", f'prepared statement "{msg.name}" already exists'))
                    return
                del self.local_statements[msg.name]
            data = frame if action.sql == msg.sql else pg.parse_message(msg.name, action.sql, msg.param_oids)
            self._forward(data, K_PARSE)
            return
        if msg.name and msg.name in self.local_statements:
            self._local_error(PgError("42P05", f'prepared statement "{msg.name}" already exists'))
            return
        try:
            oids = localexec.param_types(action, msg.param_oids)
        except PgError as exc:
            self._local_error(exc)
            return
        self.local_statements[msg.name] = LocalStatement(action, oids)
        self._local_ready(pg.PARSE_COMPLETE)

    def _pooled_deallocate(self, payload: bytes, frame: bytes) -> tuple[bytes, bytes]:
        """DEALLOCATE / DISCARD prepared through the extended protocol (psycopg sends every
        statement so): name the node-side statement, and forget what the connection loses."""
        try:
            msg = pg.decode_parse(payload)
        except ProtocolViolation:
            return payload, frame
        m = _DEALLOCATE.fullmatch(msg.sql.encode() + b"\x00")
        if m is None:
            return payload, frame
        raw = m.group("name")
        backend = self.backend
        if raw is None or raw.upper() == b"ALL":
            self.client_statements.clear()
            if backend is not None:
                backend.prepared.clear()  # other clients prepare theirs again (Close + Parse)
            return payload, frame
        name = raw[1:-1].replace(b'""', b'"').decode() if raw[:1] == b'"' else raw.decode().lower()
        entry = self.client_statements.pop(name, None)
        if entry is None:
            return payload, frame
        if backend is not None:
            backend.prepared.discard(entry[0])
        new = pg.parse_message(msg.name, f'DEALLOCATE "{entry[0]}"', msg.param_oids)
        return new[5:], new

    def _forward_named_parse(self, name: str, payload: bytes) -> bool:
        """Transaction pooling: prepare a named statement under its node-side name."""
        if name in self.local_statements or name in self.dist_statements:
            return False  # the usual checks (42P05) apply
        nul = payload.index(b"\x00")
        rest = payload[nul + 1 :]
        bname = txpool.backend_name(rest, b"")
        parse_frame = pg.message(b"P", pg.cstr(bname) + rest)
        self.client_statements[name] = (bname, parse_frame)
        backend = self.backend
        if backend is not None and bname in backend.prepared:
            self._local_ready(pg.PARSE_COMPLETE)
            return True
        self._forward(parse_frame, K_PARSE)
        if backend is not None:
            backend.prepared.add(bname)
            self._new_parses.append(bname)
        return True

    def _note_tx_statement(self, payload: bytes) -> None:
        """Remember whether a prepared statement is transaction control (see ``tx_statements``)."""
        try:
            msg = pg.decode_parse(payload)
        except ProtocolViolation:
            return  # the node reports the malformed message
        tc = classify_tx_control(msg.sql)
        if tc is None:
            self.tx_statements.pop(msg.name, None)
        else:
            self.tx_statements[msg.name] = tc

    def _on_bind(self, payload: bytes, frame: bytes) -> None:
        client_stmt: str | None = None  # the client's name, when the node's differs (pooling)
        if self.client_statements:
            portal, pos = pg.read_cstr(payload, 0)
            stmt_name, pos2 = pg.read_cstr(payload, pos)
            bname = self._statement_ref(stmt_name)
            if bname is not None:
                client_stmt = stmt_name
                payload = pg.cstr(portal) + pg.cstr(bname) + payload[pos2:]
                frame = pg.message(b"B", payload)
        if not (
            self.local_statements or self.local_portals or self.dist_statements or self.dist_portals
            or self.tx_statements or self.tx_portals
        ):
            self._forward(frame, K_BIND)
            return
        portal, pos = pg.read_cstr(payload, 0)
        stmt_name = pg.read_cstr(payload, pos)[0]
        if self.tx_statements or self.tx_portals:
            # Known by the client's name: a prepared COMMIT missed here went to the node alone,
            # and the node transactions of the block were rolled back behind its success.
            tc = self.tx_statements.get(client_stmt if client_stmt is not None else stmt_name)
            if tc is None:
                self.tx_portals.pop(portal, None)
            else:
                self.tx_portals[portal] = tc
        ds = self.dist_statements.get(stmt_name)
        if ds is not None:
            self.local_portals.pop(portal, None)
            bind = pg.decode_bind(payload)
            if ds.param_oids is not None and len(bind.params) != len(ds.param_oids):
                self._local_error(
                    PgError(
                        "08P01",
                        f'bind message supplies {len(bind.params)} parameters, but prepared statement "{stmt_name}" requires {len(ds.param_oids)}',
                    )
                )
                return
            self.dist_portals[portal] = DistPortal(ds, bind, stmt_name)
            self._local_ready(pg.BIND_COMPLETE)
            return
        self.dist_portals.pop(portal, None)
        stmt = self.local_statements.get(stmt_name)
        if stmt is None:
            self.local_portals.pop(portal, None)
            self._forward(frame, K_BIND)
            return
        bind = pg.decode_bind(payload)
        if len(bind.params) != len(stmt.param_oids):
            self._local_error(
                PgError(
                    "08P01",
                    f'bind message supplies {len(bind.params)} parameters, but prepared statement "{stmt_name}" requires {len(stmt.param_oids)}',
                )
            )
            return
        self.local_portals[portal] = LocalPortal(stmt, bind)
        self._local_ready(pg.BIND_COMPLETE)

    def _on_describe(self, payload: bytes, frame: bytes) -> None:
        if self.client_statements and payload[:1] == b"S":
            bname = self._statement_ref(pg.read_cstr(payload, 1)[0])
            if bname is not None:
                payload = b"S" + pg.cstr(bname)
                frame = pg.message(b"D", payload)
        if not (self.local_statements or self.local_portals or self.dist_statements or self.dist_portals):
            self._forward(frame, K_DESCRIBE)
            return
        kind, name = pg.decode_target(payload, "Describe")
        if kind == "S" and name in self.dist_statements:
            self._local_ready(self.dist_statements[name].describe_statement())
        elif kind == "P" and name in self.dist_portals:
            self._local_ready(self.dist_portals[name].describe_portal())
        elif kind == "S" and name in self.local_statements:
            st = self.local_statements[name]
            self._local_ready(pg.parameter_description(st.param_oids) + localexec.describe(st.call, None))
        elif kind == "P" and name in self.local_portals:
            lp = self.local_portals[name]
            self._local_ready(localexec.describe(lp.statement.call, lp.bind))
        else:
            self._forward(frame, K_DESCRIBE)

    def _on_execute(self, payload: bytes, frame: bytes) -> None:
        self._stmt_started = time.perf_counter()
        self._batch_executes += 1
        if not self.local_portals and not self.dist_portals and not self.tx_portals:
            self._passthrough_count.inc()
            self._forward(frame, K_EXECUTE)
            return
        portal, max_rows = pg.decode_execute(payload)
        tc = self.tx_portals.get(portal)
        if tc is not None and self.tx.txn is not None:
            self._enqueue_task(lambda: self.tx.control(tc, frame), extended=True)
            return
        dp = self.dist_portals.get(portal)
        if dp is not None:
            self._enqueue_task(lambda: self._execute_dist_portal(dp, max_rows), extended=True)
            return
        lp = self.local_portals.get(portal)
        if lp is None:
            self._passthrough_count.inc()
            self._forward(frame, K_EXECUTE)
            return
        self._enqueue_task(lambda: self._run_local_portal(lp), extended=True)

    def _on_close(self, payload: bytes, frame: bytes) -> None:
        if self.client_statements and payload[:1] == b"S":
            name = pg.read_cstr(payload, 1)[0]
            if self.client_statements.pop(name, None) is not None:
                self.passthrough_statements.pop(name, None)
                self._local_ready(pg.CLOSE_COMPLETE)  # the node-side statement stays, shared
                return
        if not (
            self.local_statements or self.local_portals or self.dist_statements or self.dist_portals
            or self.passthrough_statements
        ):
            self._forward(frame, K_CLOSE)
            return
        kind, name = pg.decode_target(payload, "Close")
        if kind == "S":
            self.passthrough_statements.pop(name, None)
        if kind == "S" and name in self.dist_statements:
            del self.dist_statements[name]
            self._local_ready(pg.CLOSE_COMPLETE)
        elif kind == "P" and name in self.dist_portals:
            del self.dist_portals[name]
            self._local_ready(pg.CLOSE_COMPLETE)
        elif kind == "S" and name in self.local_statements:
            del self.local_statements[name]
            self._local_ready(pg.CLOSE_COMPLETE)
        elif kind == "P" and name in self.local_portals:
            del self.local_portals[name]
            self._local_ready(pg.CLOSE_COMPLETE)
        else:
            self._forward(frame, K_CLOSE)

    def _on_sync(self, payload: bytes, frame: bytes) -> None:
        if self._copy_in_extended:
            self._forward(frame, None)  # the node ignores it in COPY mode: no answer comes
            return
        self._batch_executes = 0
        self.local_portals.pop("", None)  # the unnamed portal ends with the implicit transaction
        self.dist_portals.pop("", None)
        self.tx_portals.pop("", None)
        if self.tx.batch_block:
            # The batch ran as a block the proxy opened: this Sync commits or rolls it back.
            self._enqueue_task(self._end_batch_block, extended=False, sync=True)
            return
        if not self._unsynced and self.backend is not None:
            # Nothing went to the node since its last ReadyForQuery (the batch was answered by
            # the proxy): answer the Sync here, with the transaction status the node last gave.
            self.pending.append(LocalAnswer(pg.ready_for_query(self.tx_status), sync=True))
            self._pump()
            return
        self._forward(frame, K_SYNC)

    def _on_flush(self, payload: bytes, frame: bytes) -> None:
        self._forward(frame, None)

    def _on_copy(self, payload: bytes, frame: bytes) -> None:
        if frame[0] != 100:  # CopyDone / CopyFail end COPY mode: Syncs count again
            self._copy_in_extended = False
        self._forward(frame, None)

    def _on_function_call(self, payload: bytes, frame: bytes) -> None:
        self._forward(frame, K_QUERY)

    def _on_terminate(self, payload: bytes, frame: bytes) -> None:
        self.client.close()

    _handlers: dict[int, Callable[[Session, bytes, bytes], None]] = {
        ord("Q"): _on_query,
        ord("P"): _on_parse,
        ord("B"): _on_bind,
        ord("D"): _on_describe,
        ord("E"): _on_execute,
        ord("C"): _on_close,
        ord("S"): _on_sync,
        ord("H"): _on_flush,
        ord("d"): _on_copy,
        ord("c"): _on_copy,
        ord("f"): _on_copy,
        ord("F"): _on_function_call,
        ord("X"): _on_terminate,
    }

    # ------------------------------------------------------------------ local answers
    def _local_ready(self, data: bytes) -> None:
        self.pending.append(LocalAnswer(data))
        self._pump()

    def _local_error(self, err: PgError) -> None:
        """A proxy-detected error in the extended protocol: answer it in order, skip to Sync."""
        self.metrics.errors.labels(err.sqlstate).inc()
        self.pending.append(LocalAnswer(err.to_message(), error=True))
        self.skipping = True
        self._pump()

    def _enqueue_task(
        self, run: Callable[[], Awaitable[tuple[bytes, bool]]], *, extended: bool, sync: bool = False
    ) -> None:
        if self.backend is not None and any(p.__class__ is int for p in self.pending):
            # Messages forwarded before this one (a pipeline's earlier statements, the
            # Parse/Bind/Describe of this Execute) went to the node with no Sync or Flush; the
            # task waits for their answers to reach the head of ``pending``, while the client's
            # Sync waits in the backlog behind the task. Without a Flush the node never answers
            # and the session deadlocks (admin calls and distributed statements alike).
            self._forward(pg.FLUSH, None)  # behind the batched messages, not ahead of them
        self.end_batch()  # the task may talk to the node: everything before it goes out now
        self.pending.append(LocalAnswer(run=run, extended=extended, sync=sync))
        self.blocked += 1
        self._pump()

    def _pump(self) -> None:
        """Write the local answers at the head; start a blocking one when it reaches the head."""
        out = self._take_ready_locals()
        if out:
            self.client.write_many(out)

    def _take_ready_locals(self) -> list[bytes]:
        out: list[bytes] = []
        pending = self.pending
        while pending:
            head = pending[0]
            if head.__class__ is int:
                break
            assert isinstance(head, LocalAnswer)
            if head.data is None:
                if head.task is None:
                    head.task = asyncio.get_running_loop().create_task(self._run_local(head))
                break
            pending.popleft()
            if head.run is not None:
                self.blocked -= 1
            out.append(head.data)
            if head.error and head.extended:
                self._skip_to_sync()
        if not self.blocked and self.backlog and not self.closed:
            # Replay messages that waited behind a blocking answer (after writing ``out``).
            asyncio.get_running_loop().call_soon(self._drain_backlog)
        return out

    async def _run_local(self, entry: LocalAnswer) -> None:
        assert entry.run is not None
        self.client.cork()
        try:
            await self._run_local_corked(entry)
        finally:
            self.client.uncork()

    async def _run_local_corked(self, entry: LocalAnswer) -> None:
        assert entry.run is not None
        try:
            data, error = await entry.run()
        except asyncio.CancelledError:
            if self.closed:
                return
            data, error = PgError("57014", "canceling statement due to user request").to_message(), True
            if not entry.extended:
                data += pg.ready_for_query(self.tx_status)
        except PgError as exc:
            data, error = exc.to_message(), True
            if not entry.extended:
                data += pg.ready_for_query(self.tx_status)
        except Exception as exc:  # noqa: BLE001 - never kill the session for a proxy bug
            log.exception("internal error in local statement")
            data = PgError("XX000", f"internal error in orochi-proxy: {exc}").to_message()
            error = True
            if not entry.extended:
                data += pg.ready_for_query(self.tx_status)
        if self.closed:
            return
        if error:
            self.metrics.errors.labels(_sqlstate_of(data)).inc()
        entry.data, entry.error = data, error
        self._pump()
        if self.txn_pooling:
            self._maybe_detach()
        if not self.blocked and self.backlog and not self.closed:
            # Messages that waited behind this answer (typically the client's Sync) are handled
            # now, so their answers join the same corked send.
            self._drain_backlog()

    def _drain_backlog(self) -> None:
        self._draining = True
        self.begin_batch()
        try:
            while self.backlog and not self.blocked and not self.closed:
                mtype, frame = self.backlog.popleft()
                self.on_message(mtype, frame[5:], frame)
        except (ProtocolViolation, PgError) as exc:
            self.client.fail(exc)
        finally:
            self._draining = False
            self.end_batch()
            if not self.blocked:
                self.client.uncork()
            if self.txn_pooling:
                self._maybe_detach()

    def _skip_to_sync(self) -> None:
        """Drop answers up to the next Sync (PostgreSQL skips those messages after an error)."""
        if self.tx.batch_block:
            self.tx.batch_failed = True  # the batch's Sync rolls its block back
        pending = self.pending
        while pending and pending[0] != K_SYNC and not (
            pending[0].__class__ is LocalAnswer and pending[0].sync  # type: ignore[union-attr]
        ):
            entry = pending.popleft()
            if isinstance(entry, LocalAnswer) and entry.run is not None:
                self.blocked -= 1
                if entry.task is not None:
                    entry.task.cancel()
        if not pending:
            self.skipping = True
        if not self.blocked:
            self.client.uncork()
        if not self.blocked and self.backlog and not self.closed:
            # A dropped blocking answer held the client's later messages (its Sync among them)
            # in the backlog; nothing else would replay them after a node-reported error.
            asyncio.get_running_loop().call_soon(self._drain_backlog)

    # ------------------------------------------------------------------ node → client
    def on_backend_messages(
        self, conn: BackendConnection, buf: bytes, frames: list[tuple[int, int, int]]
    ) -> None:
        pending = self.pending
        out: list[bytes] | None = None
        seg = 0
        for t, s, e in frames:
            if t == 83:  # 'S' ParameterStatus: remember settings that shape output
                name, pos = pg.read_cstr(buf, s + 5)
                value = pg.read_cstr(buf, pos)[0]
                self.reported[name] = value
                if self.txn_pooling and name.lower() in txpool.REPORTED_SETTINGS:
                    self.client_settings[name.lower()] = value
                    if self.backend is not None:
                        self.backend.__dict__.setdefault("applied_settings", {})[name.lower()] = value
            if not pending:
                continue  # asynchronous message (notice, notification, parameter status)
            head = pending[0]
            if head.__class__ is not int:
                continue
            if head >= K_HIDDEN_CLOSE:  # type: ignore[operator]
                if t in _COMPLETES[head]:  # type: ignore[index]
                    # The answer to a Close/Parse the proxy slipped in: not the client's.
                    pending.popleft()
                    if out is None:
                        out = []
                    out.append(buf[seg:s])
                    seg = e
                    if pending and pending[0].__class__ is not int:
                        out.extend(self._take_ready_locals())
                    continue
            if t in _COMPLETES[head]:  # type: ignore[index]
                pending.popleft()
                if t == _READY:
                    self.tx_status = buf[s + 5 : s + 6]
                    self._unsynced = False
                    self._observe_latency()
                    if self.txn_pooling:
                        self._new_parses.clear()
                        if self._pending_sets is not None:
                            if not self._query_failed:
                                self._apply_sets(self._pending_sets)
                            self._pending_sets = None
                        self._query_failed = False
                    if self.tx.txn is not None and self.tx_status == pg.TX_IDLE:
                        # The block ended by a path the proxy did not run (it should not
                        # happen): the nodes' part must not stay open.
                        log.warning("transaction block ended on the metadata node; rolling back its node transactions")
                        self.tx.abandon()
                        self.client.write(pg.notice_response(
                            "orochi: the transaction block ended by a statement the proxy did not see as "
                            "transaction control; its writes on distributed tables were rolled back",
                            "WARNING", "01000",
                        ))
            elif t == _ERR:
                self.metrics.errors.labels(_sqlstate_of(buf[s:e])).inc()
                self._copy_in_extended = False  # an error ends COPY mode on the node
                if self.txn_pooling:
                    self._query_failed = True
                    if self._new_parses and self.backend is not None:
                        # Not known to exist any more: prepared again (after a Close) when used.
                        self.backend.prepared.difference_update(self._new_parses)
                if head in _Z_TERMINATED:
                    continue
                pending.popleft()
                self._skip_to_sync()
            elif t == _COPY_IN and head == K_EXECUTE:
                self._enter_extended_copy_in()
                continue
            else:
                continue
            if pending and pending[0].__class__ is not int:
                local = self._take_ready_locals()
                if local:
                    if out is None:
                        out = []
                    out.append(buf[seg:e])
                    out.extend(local)
                    seg = e
        if out is None:
            self.client.write(buf)
        else:
            out.append(buf[seg:])
            self.client.write_many(out)
        if not self.blocked:
            self.client.uncork()  # corked only while a proxy-run answer is pending
        if self.txn_pooling and not pending:
            self._maybe_detach()

    def _enter_extended_copy_in(self) -> None:
        """CopyInResponse to an Execute: Syncs the client sent behind it will get no answer."""
        self._copy_in_extended = True
        pending = self.pending
        while len(pending) > 1 and pending[1] == K_SYNC:
            del pending[1]

    def on_backend_lost(self, conn: BackendConnection, exc: Exception | None) -> None:
        self._metadata_connection_lost(conn.node_name)

    def _metadata_connection_lost(self, node_name: str) -> None:
        """The session's node connection is gone: its transaction and session state with it."""
        if self.closed:
            return
        err = PgError(
            "08006",
            f"connection to node {node_name} was lost",
            severity="FATAL",
            hint="The node stopped or the network failed; reconnect to continue.",
        )
        self.metrics.errors.labels(err.sqlstate).inc()
        self.client.fail(err)

    def _replace_lost_backend(self, backend: BackendConnection) -> bool:
        """A message arrives for a session whose node connection died while nobody relayed on it
        (a proxy-run statement had it in collect mode, or it died between answers).

        With transaction pooling, between transactions, the session lost nothing: the dead
        connection goes back (the pool closes it) and the message attaches a live one (True).
        Otherwise the session's transaction or state died with it: FATAL 08006, as when the
        connection is lost while relaying (False).
        """
        if self.txn_pooling and self._between_transactions():
            self.backend = None
            assert self.pool is not None
            self.pool.release(backend, reset=False)
            return True
        self._metadata_connection_lost(backend.node_name)
        return False

    def _observe_latency(self) -> None:
        if self._stmt_started:
            self._passthrough_seconds.observe(time.perf_counter() - self._stmt_started)
            self._stmt_started = 0.0

    # ------------------------------------------------------------------ local statement runners
    async def _run_simple_query(self, sql: str) -> tuple[bytes, bool]:
        """A simple Query that mentions an intercepted name: run statement by statement.

        Answers are written as each statement finishes (this runs at the head of the ordered
        answers, so direct writes keep the order); the first error ends the Query, as in
        PostgreSQL. Several statements with a distributed write among them run as one implicit
        transaction, as PostgreSQL runs a multi-statement Query: a later error undoes the
        earlier statements on every node.
        """
        if not sql.strip():
            return pg.EMPTY_QUERY_RESPONSE + pg.ready_for_query(self.tx_status), False
        router = self.router
        norm = normalize(sql)
        if norm is not None and norm.key in router.distributed_shapes:
            # A shape analysed before as one distributed statement: no parse (~18% of the
            # proxy's CPU in pgbench's tpcb-like, all statements simple-protocol literals).
            try:
                if await self.dist.run_shape(sql, norm):
                    return pg.ready_for_query(self.tx_status), False
            except PgError as exc:
                self.metrics.errors.labels(exc.sqlstate).inc()
                return exc.to_message() + pg.ready_for_query(self.tx_status), False
        try:
            actions = _merge_passthrough(router.analyze(sql, tx_control=True))
        except PgError as exc:
            return exc.to_message() + pg.ready_for_query(self.tx_status), False
        if norm is not None and len(actions) == 1 and isinstance(actions[0], Distributed):
            if len(router.distributed_shapes) > 5000:
                router.distributed_shapes.clear()
            router.distributed_shapes.add(norm.key)
        # Statements outside the client's block run in implicit blocks, as PostgreSQL runs a
        # multi-statement Query: one opens before a statement when none is open, and lasts
        # until the Query ends or a transaction-control statement ends or adopts it.
        use_implicit = self.tx_status == pg.TX_IDLE and _needs_implicit_block(actions)
        implicit = False
        failed = False
        for action in actions:
            if use_implicit and not implicit and self.tx_status == pg.TX_IDLE and not isinstance(action, TxControl):
                msgs = await self._collect_from_backend(pg.query("BEGIN"))
                if any(t == _ERR for t, _ in msgs):
                    self.client.write(b"".join(pg.message(bytes([t]), p) for t, p in msgs if t != _READY))
                    failed = True
                    break
                implicit = True
            try:
                if isinstance(action, Passthrough):
                    self._passthrough_count.inc()
                    msgs = await self._collect_from_backend(pg.query(action.sql))
                    body = [m for m in msgs if m[0] != _READY]
                    self.client.write(b"".join(pg.message(bytes([t]), p) for t, p in body))
                    if any(t == _ERR for t, _ in body):
                        failed = True
                        break
                elif isinstance(action, TxControl):
                    if implicit:
                        data, error, implicit = await self.tx.control_in_implicit(action, None, pipeline=False)
                    else:
                        data, error = await self.tx.control(action, None)
                    self.client.write(data)
                    if error:
                        failed = True
                        break
                elif isinstance(action, Distributed):
                    await self.dist.run_simple(action, norm if len(actions) == 1 else None)
                else:
                    self.metrics.statements.labels("admin").inc()
                    self.client.write(await localexec.run_admin(self.server, action, None, simple=True, session=self))
            except PgError as exc:
                self.metrics.errors.labels(exc.sqlstate).inc()
                self.client.write(exc.to_message())
                failed = True
                break
        if implicit:
            end = TxControl("rollback" if failed else "commit", "ROLLBACK" if failed else "COMMIT")
            data, error = await self.tx.control(end, None)
            if error:
                self.client.write(data)  # the implicit COMMIT failed: its error ends the Query
        return pg.ready_for_query(self.tx_status), False

    async def _execute_dist_portal(self, dp: DistPortal, max_rows: int) -> tuple[bytes, bool]:
        """Execute a distributed portal; a write in a batch of several Executes opens a block.

        PostgreSQL runs an extended-protocol batch (up to Sync) as one implicit transaction;
        a distributed write committed on its own would survive a later failure of the batch.
        A lone Execute (the usual Parse/Bind/Execute/Sync) keeps the direct path.
        """
        if (
            self.tx_status == pg.TX_IDLE
            and dp.rows is None
            and not dp.done
            and _is_write(dp.statement.action)
            and self._batch_has_other_executes()
        ):
            await self.tx.begin_batch_block()
        return await self.dist.execute_portal(dp, max_rows)

    def _batch_has_other_executes(self) -> bool:
        """Whether the client's current batch holds an Execute besides the one running now.

        The Executes handled since the last Sync, then the client's messages waiting behind
        this one (``backlog``) up to the Sync. A batch whose Sync has not arrived yet may still
        grow, so it counts as several.
        """
        if self._batch_executes > 1:
            return True
        for mtype, _frame in self.backlog:
            if mtype == 69:  # 'E'
                return True
            if mtype == 83:  # 'S'
                return False
        return True

    async def _end_batch_block(self) -> tuple[bytes, bool]:
        """The client's Sync, when its batch ran in a block the proxy opened: end that block."""
        answer = await self.tx.end_batch_block()
        if self.txn_pooling:
            # What a relayed ReadyForQuery does: the batch is over on the node.
            self._new_parses.clear()
            self._query_failed = False
        return answer

    async def _answer_tag(self, tag: str) -> tuple[bytes, bool]:
        if self.tx_status == pg.TX_FAILED:
            raise PgError(
                "25P02", "current transaction is aborted, commands ignored until end of transaction block"
            )
        return pg.command_complete(tag) + pg.ready_for_query(self.tx_status), False

    async def _run_deallocate(self, name: str) -> tuple[bytes, bool]:
        if self.tx_status == pg.TX_FAILED:
            raise PgError(
                "25P02", "current transaction is aborted, commands ignored until end of transaction block"
            )
        self.local_statements.pop(name, None)
        self.dist_statements.pop(name, None)
        return pg.command_complete("DEALLOCATE") + pg.ready_for_query(self.tx_status), False

    async def _run_local_portal(self, lp: LocalPortal) -> tuple[bytes, bool]:
        self.metrics.statements.labels("admin").inc()
        if lp.done:
            return pg.command_complete("SELECT 0"), False
        if self.tx_status == pg.TX_FAILED:
            raise PgError(
                "25P02", "current transaction is aborted, commands ignored until end of transaction block"
            )
        data = await localexec.run_admin(self.server, lp.statement.call, lp.bind, simple=False, session=self)
        lp.done = True
        return data, False

    async def _collect_until(self, data: bytes, stop: tuple[int, ...], count: int = 1) -> list[tuple[int, bytes]]:
        """Send messages ending in Flush and collect answers up to the count-th of ``stop`` types."""
        backend = self.backend if self.backend is not None or not self.txn_pooling else await self._attach()
        if backend is None:
            raise node_unavailable("metadata", "no backend connection")
        backend.consumer = None
        try:
            return await backend.exchange(data, until=stop, count=count)
        finally:
            if not backend.closed:
                backend.consumer = self

    async def _collect_from_backend(self, data: bytes) -> list[tuple[int, bytes]]:
        """Run messages on the bound backend in collect mode (only while this session blocks)."""
        backend = self.backend if self.backend is not None or not self.txn_pooling else await self._attach()
        if backend is None:
            raise node_unavailable("metadata", "no backend connection")
        backend.consumer = None
        try:
            msgs = await backend.exchange(data)
        finally:
            if not backend.closed:
                backend.consumer = self
        for t, p in msgs:
            if t == _READY:
                self.tx_status = p[:1]
                self._unsynced = False
        return msgs


def _merge_passthrough(
    actions: list[Passthrough | AdminCall | Distributed],
) -> list[Passthrough | AdminCall | Distributed]:
    """Join consecutive statements for the node into one Query.

    PostgreSQL runs the statements of one Query as a single implicit transaction: when one
    fails, those before it roll back. Sent one Query per statement, they committed one by one
    (``INSERT ...; SELECT 1/0`` kept the row whenever the text mentioned an intercepted name).
    The newline before the separator ends a trailing ``--`` comment.
    """
    out: list[Passthrough | AdminCall | Distributed] = []
    for action in actions:
        prev = out[-1] if out else None
        if isinstance(action, Passthrough) and isinstance(prev, Passthrough):
            out[-1] = Passthrough(f"{prev.sql}\n;\n{action.sql}")
        else:
            out.append(action)
    return out


def _needs_implicit_block(actions: list[Passthrough | AdminCall | Distributed | TxControl]) -> bool:
    """Several statements, a distributed write among them, nothing that cannot run in a block."""
    from pglast import ast

    if len(actions) < 2:
        return False
    writes = False
    for a in actions:
        if isinstance(a, AdminCall):
            return False
        if isinstance(a, Distributed):
            if isinstance(a.stmt, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt):
                writes = True
            elif not isinstance(a.stmt, ast.SelectStmt):
                return False  # DDL, COPY: they run outside blocks with their own commit
    return writes


def _is_write(action: Distributed) -> bool:
    """A statement that changes rows (as ``_needs_implicit_block`` counts writes)."""
    from pglast import ast

    return isinstance(action.stmt, ast.InsertStmt | ast.UpdateStmt | ast.DeleteStmt)


def _sqlstate_of(error_message: bytes) -> str:
    return pg.parse_error_fields(error_message[5:]).get("C", "XX000")




def _parse_options(options: str) -> list[tuple[str, str]]:
    """``options='-c a=b --c=d'`` from the start-up packet, as PostgreSQL splits it."""
    out: list[tuple[str, str]] = []
    tokens: list[str] = []
    cur: list[str] = []
    escape = False
    for ch in options:
        if escape:
            cur.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch.isspace():
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        tokens.append("".join(cur))
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        setting = None
        if tok == "-c" and i + 1 < len(tokens):
            setting = tokens[i + 1]
            i += 1
        elif tok.startswith("-c"):
            setting = tok[2:]
        elif tok.startswith("--"):
            setting = tok[2:]
        if setting and "=" in setting:
            k, v = setting.split("=", 1)
            out.append((k.replace("-", "_"), v))
        i += 1
    return out
