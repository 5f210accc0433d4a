"""A client's transaction block across its metadata-node connection and the data nodes.

The client's ``BEGIN`` goes to its metadata-node connection as always (that connection's
ReadyForQuery status is what the client sees). The first distributed statement in the block
opens a ``DistTransaction`` (``executor.transaction``): node connections pinned to the block,
begun with the block's isolation level, access mode and timeouts. From then on, transaction
control is applied to both sides:

* ``SAVEPOINT`` / ``RELEASE`` / ``ROLLBACK TO`` / ``SET LOCAL``: on the metadata node first (it
  words errors exactly as PostgreSQL, e.g. an unknown savepoint), then on every participant;
* a distributed statement that fails puts the metadata-node transaction into the failed state
  too, so the client's next statements get ``25P02`` from PostgreSQL itself until ``ROLLBACK``
  or ``ROLLBACK TO SAVEPOINT``;
* ``ROLLBACK`` (or ``COMMIT`` of a failed block): every participant rolls back;
* ``COMMIT``:

  - no participant wrote: read-only participants end, the metadata node commits;
  - one participant wrote and the metadata-node transaction has no writes of its own
    (``pg_current_xact_id_if_assigned()`` is NULL): one-phase — that participant commits,
    then the metadata node;
  - otherwise two-phase: ``PREPARE TRANSACTION`` on every writer, then the **decision** is
    inserted into ``orochi_catalog.transactions`` *inside the client's own metadata-node
    transaction*, which then commits: that commit is the commit point, atomic with whatever the
    client wrote there (the "last agent" of a two-phase commit, so the metadata-node side needs
    no PREPARE — temporary tables and all keep working), then ``COMMIT PREPARED`` everywhere.
    The insert takes the coordinator's advisory lock in shared mode for the transaction, so
    recovery (which needs the lock exclusively) cannot roll back a participant while a decision
    may still commit, and inserts only if the proxy's decision connection still holds that lock
    (had it lost it, a recovery may have run already); it also makes that commit synchronous.
    If the client's database is not the metadata database, the decision goes through the
    server's ``TransactionLog`` instead and the metadata-node transaction must not have written
    (0A000 otherwise).

An extended-protocol batch (the messages up to a Sync: a pipeline, ``executemany``) is one
implicit transaction in PostgreSQL. When such a batch holds a distributed write and other
statements, the session asks ``begin_batch_block`` for a block on the metadata node before the
write runs (a BEGIN there turns the node's implicit transaction, with the batch's earlier
statements, into a block), the batch's distributed statements join it as in ``BEGIN ...
COMMIT``, and the client's Sync ends it with ``end_batch_block``: commit, or roll back after an
error (PostgreSQL skips the rest of the batch then, and so does the session).

A failure before the commit point rolls back everywhere and the client's COMMIT gets the error
(the block is over, status idle, as when PostgreSQL's own COMMIT fails). A lost metadata-node
connection *during* its COMMIT leaves the outcome unknown to the proxy: participants stay
prepared and recovery settles them by the decision record; the client sees 08006, as it would
from a plain server.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from executor import faults
from executor import protocol as pg
from executor.backend import BackendConnection
from executor.protocol import PgError
from executor.transaction import OPTIONS_QUERY, DistTransaction, Participant, options_from_row
from executor.twophase import Decider
from rewriter.intercept import TxControl
from rewriter.quoting import quote_literal

if TYPE_CHECKING:
    from orochi_proxy.session import Session

log = logging.getLogger(__name__)

_E, _C, _CLOSE, _Z, _N = ord("E"), ord("C"), ord("3"), ord("Z"), ord("N")
# Commands PostgreSQL allows in transaction blocks only (commit/rollback: with AND CHAIN).
_BLOCK_ONLY = {
    "commit": "COMMIT", "rollback": "ROLLBACK",
    "savepoint": "SAVEPOINT", "release": "RELEASE SAVEPOINT", "rollback_to": "ROLLBACK TO SAVEPOINT",
}
_INTERNAL = "__orochi_tx"


class TxCoordinator:
    """Per session: the distributed side of the client's current transaction block."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.txn: DistTransaction | None = None
        # The block was opened by the proxy for the client's current extended-protocol batch
        # (``begin_batch_block``): the client's Sync ends it, the client never sees it.
        self.batch_block = False
        self.batch_failed = False  # a statement of that batch failed: its Sync rolls back

    # ------------------------------------------------------------------ joining
    async def current(self) -> DistTransaction:
        """The block's distributed transaction, opened on first use (the block must be open)."""
        if self.txn is None:
            s = self.session
            rows = await self.backend_rows(OPTIONS_QUERY)
            options = options_from_row([None if v is None else v.decode() for v in rows[0]])
            server = s.server
            database = s.database
            self.txn = DistTransaction(
                options,
                lambda node_id: server.node_pool(node_id, database),
                server.config.backend.transaction_lock_timeout,
            )
        return self.txn

    def abandon(self) -> None:
        """The session ended with the block open: roll the nodes back in the background."""
        self.batch_block = False
        txn, self.txn = self.txn, None
        if txn is not None:
            txn.abandon()

    # ------------------------------------------------------------------ implicit batch blocks
    async def begin_batch_block(self) -> None:
        """Make the client's current extended-protocol batch one block, ended at its Sync.

        PostgreSQL keeps every statement up to Sync in one implicit transaction; a distributed
        write there must roll back with a later failure like any other statement. If the node
        answers the BEGIN with warning 25001, the client's own BEGIN came earlier in the batch
        (its ReadyForQuery is still to come): the block is the client's and outlives the Sync.
        """
        msgs = await self.backend_messages("BEGIN")
        for t, p in msgs:
            if t == _E:
                raise PgError.from_payload(p)
        self.session.tx_status = pg.TX_BLOCK  # no ReadyForQuery tells it in the middle of a batch
        self.batch_failed = False
        self.batch_block = not any(t == _N and pg.parse_error_fields(p).get("C") == "25001" for t, p in msgs)

    async def end_batch_block(self) -> tuple[bytes, bool]:
        """At the client's Sync: commit the batch's block, or roll it back after an error.

        Returns the answer to the client's Sync (the commit's error, if any, then
        ReadyForQuery) and whether it is an error. The Sync goes to the node first: after an
        error there it skips everything until a Sync, and it reports the block failed.
        """
        self.batch_block = False
        s = self.session
        await s._collect_from_backend(pg.SYNC)
        # Status I here: a COMMIT of the client's own ended the block inside the batch; its
        # later distributed writes are then committed like statements after a COMMIT.
        failed = self.batch_failed or s.tx_status == pg.TX_FAILED
        kind = "rollback" if failed else "commit"
        data, error = await self.control(TxControl(kind, kind.upper()), None)
        return (data if error else b"") + pg.ready_for_query(s.tx_status), error

    # ------------------------------------------------------------------ metadata-node statements
    async def backend_messages(self, sql: str) -> list[tuple[int, bytes]]:
        """Run one statement on the session's metadata-node connection, without disturbing it.

        Between client messages the connection may be in the middle of an extended-protocol
        batch (a Bind forwarded with no Sync yet): then a named statement and portal are used,
        ending in Flush, so the client's unnamed statement and portal and its batch survive.
        Otherwise a simple Query, whose ReadyForQuery updates the session's status.
        """
        s = self.session
        if not s._unsynced:
            return await s._collect_from_backend(pg.query(sql))
        body = (
            # Closed first too: a statement that failed (fail_backend's, on purpose) left it
            # prepared, as the node skipped the Closes behind the error.
            pg.message(b"C", b"S" + pg.cstr(_INTERNAL))
            + pg.parse_message(_INTERNAL, sql)
            + pg.message(b"B", pg.cstr(_INTERNAL) + pg.cstr(_INTERNAL) + b"\x00\x00\x00\x00\x00\x00")
            + pg.message(b"E", pg.cstr(_INTERNAL) + b"\x00\x00\x00\x00")
            + pg.message(b"C", b"P" + pg.cstr(_INTERNAL))
            + pg.message(b"C", b"S" + pg.cstr(_INTERNAL))
            + pg.FLUSH
        )
        return await s._collect_until(body, (_CLOSE, _E), count=3)

    async def backend_rows(self, sql: str) -> list[list[bytes | None]]:
        rows: list[list[bytes | None]] = []
        for t, p in await self.backend_messages(sql):
            if t == ord("D"):
                rows.append(pg.decode_data_row(p))
            elif t == _E:
                raise PgError.from_payload(p)
        return rows

    async def fail_backend(self, err: PgError) -> None:
        """Put the metadata-node transaction into the failed state after a node's error.

        PostgreSQL then answers the client's later statements with 25P02 until the block or a
        savepoint is rolled back — exactly the behaviour of a failed statement on one server.
        """
        if self.session.tx_status != pg.TX_BLOCK:
            return
        msg = f"orochi: distributed statement failed: {err.sqlstate}"
        sql = f"DO $orochi$ BEGIN RAISE EXCEPTION USING MESSAGE = {quote_literal(msg)}, ERRCODE = 'XX000'; END $orochi$"
        try:
            await self.backend_messages(sql)
        except PgError:
            pass
        if self.session._unsynced:
            # The node now skips to the client's Sync, which answers with status 'E'.
            return
        self.session.tx_status = pg.TX_FAILED

    async def _client_statement(self, tc: TxControl, frame: bytes | None, *, adopt: bool = False) -> tuple[bytes, bool]:
        """Run the client's own statement on the metadata node; (its answer, error?).

        ``frame`` is the client's Execute (extended protocol; its Bind went ahead), else the
        statement runs as a simple Query whose ReadyForQuery is left for the caller.
        ``adopt``: a BEGIN that takes over the implicit block the proxy began explicitly (see
        ``control_in_implicit``): the node's warning 25001, which PostgreSQL would not give
        there, is dropped.
        """
        s = self.session
        if frame is None:
            msgs = await s._collect_from_backend(pg.query(tc.sql))
        else:
            msgs = await s._collect_until(frame + pg.FLUSH, (_C, _E, ord("I")))
        body = [(t, p) for t, p in msgs if t != _Z]
        error = any(t == _E for t, _ in body)
        if adopt and not error:
            body = _without_notice(body, "25001")
        if frame is not None and not error and tc.kind in ("commit", "rollback", "prepare") and not tc.chain:
            # No ReadyForQuery in the middle of a batch tells it: the block is over, and the
            # batch's later statements run outside it (in a block of the batch's own, if needed).
            s.tx_status = pg.TX_IDLE
        return b"".join(pg.message(bytes([t]), p) for t, p in body), error

    async def control_in_implicit(self, tc: TxControl, frame: bytes | None, *, pipeline: bool) -> tuple[bytes, bool, bool]:
        """Transaction control inside an implicit transaction the proxy holds as an explicit
        block on the metadata node, answered as PostgreSQL answers it there; (answer, error?,
        is the block still the implicit one?).

        ``pipeline``: an extended-protocol batch (PostgreSQL runs it as a transaction that is
        not a block), else a multi-statement Query (an implicit block). In both, BEGIN makes
        the transaction the client's block (the statements before it included, open after the
        batch); COMMIT and ROLLBACK end it with warning 25P01; AND CHAIN and savepoint commands
        are errors 25P01 (the implicit transaction rolls back with the batch). SET LOCAL
        applies, with warning 25P01 in a pipeline only.
        """
        if tc.kind == "begin":
            data, error = await self._client_statement(tc, frame, adopt=True)
            return data, error, error
        if tc.kind in ("commit", "rollback") and not tc.chain:
            data, error = await self._control(tc, frame)
            if error:
                return data, True, not pipeline and self.session.tx_status != pg.TX_IDLE
            return pg.notice_response("there is no transaction in progress", "WARNING", "25P01") + data, False, False
        if tc.kind in _BLOCK_ONLY:
            what = _BLOCK_ONLY[tc.kind] + (" AND CHAIN" if tc.chain else "")
            return PgError("25P01", f"{what} can only be used in transaction blocks").to_message(), True, True
        data, error = await self._control(tc, frame)
        if pipeline and tc.kind == "set_local" and not error:
            data = pg.notice_response("SET LOCAL can only be used in transaction blocks", "WARNING", "25P01") + data
        return data, error, True

    # ------------------------------------------------------------------ transaction control
    async def control(self, tc: TxControl, frame: bytes | None) -> tuple[bytes, bool]:
        """Apply ``tc`` to the block (metadata node and participants); the client's answer."""
        if self.batch_block:
            data, error, self.batch_block = await self.control_in_implicit(tc, frame, pipeline=True)
            return data, error
        return await self._control(tc, frame)

    async def _control(self, tc: TxControl, frame: bytes | None) -> tuple[bytes, bool]:
        txn = self.txn
        if txn is None:
            return await self._client_statement(tc, frame)
        if tc.kind in ("commit", "rollback", "prepare"):
            if tc.kind == "prepare":
                return await self._refuse(
                    "PREPARE TRANSACTION is not supported in a distributed transaction",
                    "The proxy already commits distributed transactions with two-phase commit.",
                )
            if tc.kind == "rollback" or self.session.tx_status == pg.TX_FAILED or txn.failed:
                self.txn = None
                await txn.rollback()
                return await self._client_statement(tc, frame)
            return await self._commit(tc, frame)
        if tc.kind == "begin":
            return await self._client_statement(tc, frame)  # a WARNING from the node
        data, error = await self._client_statement(tc, frame)
        if error:
            return data, True
        try:
            if tc.kind == "savepoint":
                await txn.savepoint(tc.savepoint or "")
            elif tc.kind == "release":
                await txn.release_savepoint(tc.savepoint or "")
            elif tc.kind == "rollback_to":
                await txn.rollback_to(tc.savepoint or "")
            elif tc.kind == "set_local":
                await txn.set_local(tc.sql)
        except PgError as exc:
            txn.failed = True
            await self.fail_backend(exc)
            return exc.to_message(), True
        except OSError as exc:
            txn.failed = True
            err = PgError("08006", f"lost a node of the distributed transaction: {exc}")
            await self.fail_backend(err)
            return err.to_message(), True
        return data, False

    async def _refuse(self, message: str, hint: str) -> tuple[bytes, bool]:
        err = PgError("0A000", message, hint=hint)
        await self.fail_backend(err)
        return err.to_message(), True

    async def _abort_all(self, txn: DistTransaction, err: PgError) -> tuple[bytes, bool]:
        """Before the commit point: everything rolls back; the client's COMMIT gets ``err``."""
        await txn.rollback()
        try:
            await self.backend_messages("ROLLBACK")
        except PgError as exc:
            log.info("ROLLBACK of the metadata-node transaction failed: %s", exc)
        return err.to_message(), True

    async def _commit(self, tc: TxControl, frame: bytes | None) -> tuple[bytes, bool]:
        txn = self.txn
        assert txn is not None
        self.txn = None
        writers = txn.writers()
        readers = [p for p in txn.participants.values() if not p.written]
        try:
            if not writers:
                await txn.finish_readers(readers)
                return await self._client_statement(tc, frame)
            try:
                backend_wrote = await self._backend_has_writes()
            except PgError as exc:
                return await self._abort_all(txn, exc)
            if len(writers) == 1 and not backend_wrote:
                return await self._commit_one_phase(tc, frame, txn, writers[0], readers)
            return await self._commit_two_phase(tc, frame, txn, writers, readers, backend_wrote)
        finally:
            txn.release_all(reset=True)

    async def _backend_has_writes(self) -> bool:
        rows = await self.backend_rows("SELECT pg_catalog.pg_current_xact_id_if_assigned() IS NOT NULL")
        return bool(rows) and rows[0][0] == b"t"

    async def _commit_one_phase(
        self, tc: TxControl, frame: bytes | None, txn: DistTransaction, writer: Participant, readers: list[Participant]
    ) -> tuple[bytes, bool]:
        try:
            await writer.conn.simple_query("COMMIT")
        except (PgError, OSError) as exc:
            err = exc if isinstance(exc, PgError) else PgError("08006", f"lost node {writer.node_id} during COMMIT: {exc}")
            return await self._abort_all(txn, err)
        txn.participants.pop(writer.node_id, None)
        writer.pool.release(writer.conn, reset=False)
        await txn.finish_readers(readers)
        return await self._client_statement(tc, frame)

    async def _commit_two_phase(
        self,
        tc: TxControl,
        frame: bytes | None,
        txn: DistTransaction,
        writers: list[Participant],
        readers: list[Participant],
        backend_wrote: bool,
    ) -> tuple[bytes, bool]:
        s = self.session
        server = s.server
        try:
            await server.txlog.ensure()  # after a metadata-node restart: a new coordinator key
        except Exception as exc:  # noqa: BLE001 - reported to the client as a lost connection
            return await self._abort_all(txn, PgError("08006", f"cannot record commit decisions: {exc}"))
        decider: Decider = server.txlog.decider()
        decision_here = s.database == server.config.metadata.dbname
        if not decision_here and backend_wrote:
            err = PgError(
                "0A000",
                "this transaction wrote to local tables and to distributed tables on several nodes, "
                f"but database {s.database!r} is not the metadata database, where the commit decision is kept",
                hint="Keep local-table writes and multi-node writes in separate transactions.",
            )
            return await self._abort_all(txn, err)
        gid = decider.new_gid("tx")
        decider.in_flight.add(gid)
        try:
            prepared: list[tuple[Participant, str]] = []
            failure: PgError | None = None
            results = await _on_each(
                [(p.conn, f"PREPARE TRANSACTION '{gid}_{i}'") for i, p in enumerate(writers)], "prepared"
            )
            for i, (p, r) in enumerate(zip(writers, results, strict=True)):
                if isinstance(r, BaseException):
                    if failure is None:
                        failure = r if isinstance(r, PgError) else PgError("08006", f"lost node {p.node_id} during PREPARE: {r}")
                else:
                    prepared.append((p, f"{gid}_{i}"))
            nodes = [p.node_id for p in writers]
            if failure is None:
                try:
                    if decision_here:
                        await self._decide_here(gid, decider, nodes)
                    else:
                        await decider.decide(gid, nodes)
                except (PgError, OSError) as exc:
                    failure = exc if isinstance(exc, PgError) else PgError("08006", str(exc))
            if failure is None and faults.ARMED:
                await faults.reached("all_prepared")
            if failure is not None:
                await _rollback_prepared(prepared)
                return await self._abort_all(txn, failure)
            # The commit point: the metadata node commits the client's work with the decision.
            try:
                data, error = await self._client_statement(tc, frame)
            except (PgError, OSError) as exc:
                if s.backend is None or s.backend.closed or s.backend.broken:
                    # Outcome unknown here: recovery decides by the record (committed or not).
                    log.warning("lost the metadata node during COMMIT of %s; recovery will settle it", gid)
                    for p, _g in prepared:
                        txn.participants.pop(p.node_id, None)
                        p.pool.release(p.conn, reset=False)
                    raise PgError("08006", "lost the metadata node during COMMIT; the outcome is settled by recovery") from exc
                raise
            if error or b"C\x00\x00\x00\x0dROLLBACK\x00" in data:
                await _rollback_prepared(prepared)
                await txn.rollback()
                return data, error
            if faults.ARMED:
                await faults.reached("decided")
            unfinished = await _commit_prepared(prepared)
            for p, _g in prepared:
                txn.participants.pop(p.node_id, None)
                p.pool.release(p.conn, reset=not p.conn.usable)
            await txn.finish_readers(readers)
            if not unfinished:
                try:
                    await decider.forget(gid)
                except Exception as exc:  # noqa: BLE001 - recovery deletes stale decisions
                    log.info("could not delete decision %s (%s); recovery will", gid, exc)
            return data, False
        finally:
            decider.in_flight.discard(gid)

    async def _decide_here(self, gid: str, decider: Decider, nodes: list[int]) -> None:
        from orochi_proxy.recovery import LOCK_SPACE, SCHEMA

        lock_key = LOCK_SPACE | decider.coordinator
        lost = PgError("08006", "lost the connection that holds this proxy's coordinator lock; the transaction was rolled back")
        holder = self.session.server.txlog.holder_pid(decider.coordinator)
        if holder is None:
            raise lost
        node_array = "ARRAY[" + ",".join(str(int(n)) for n in nodes) + "]::int[]"
        # Once this transaction holds the lock shared, recovery cannot take it; but it may have
        # taken it (and rolled our participants back) before, if the decision connection had
        # lost its session lock by then. Still held by that connection now means it never was
        # lost (a lost key is never locked again), so no recovery ran in between.
        # The commit of this transaction is the commit point: durable even where the database
        # runs with synchronous_commit = off (set_config(..., true) lasts until that commit).
        sql = (
            f"INSERT INTO {SCHEMA}.transactions (gid, coordinator, node_ids) "
            f"SELECT {quote_literal(gid)}, {int(decider.coordinator)}, {node_array} "
            f"FROM pg_catalog.pg_advisory_xact_lock_shared({lock_key}), "
            "pg_catalog.set_config('synchronous_commit', 'on', true) "
            "WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted "
            f"AND pid = {int(holder)} AND objsubid = 1 AND classid = '{lock_key >> 32}'::oid "
            f"AND objid = '{lock_key & 0xFFFFFFFF}'::oid)"
        )
        inserted = False
        for t, p in await self.backend_messages(sql):
            if t == _E:
                raise PgError.from_payload(p)
            if t == _C and p.rstrip(b"\x00") == b"INSERT 0 1":
                inserted = True
        if not inserted:
            raise lost


async def _on_each(work: list[tuple[BackendConnection, str]], step: str) -> list[object]:
    """Run each statement on its connection, concurrently; results or exceptions, in order.

    With a fault armed (tests), one after another, so "after the first participant" is a
    well-defined moment.
    """
    if not faults.ARMED:
        return list(await asyncio.gather(*(c.simple_query(sql) for c, sql in work), return_exceptions=True))
    out: list[object] = []
    for c, sql in work:
        try:
            out.append(await c.simple_query(sql))
        except Exception as exc:  # noqa: BLE001 - reported like gather's return_exceptions
            out.append(exc)
        await faults.reached(step)
    return out


async def _rollback_prepared(prepared: list[tuple[Participant, str]]) -> None:
    for p, g in prepared:
        try:
            await p.conn.simple_query(f"ROLLBACK PREPARED '{g}'")
        except Exception as exc:  # noqa: BLE001 - recovery rolls back undecided leftovers
            log.info("ROLLBACK PREPARED %s failed (%s); recovery will", g, exc)
            p.conn.broken = True


async def _commit_prepared(prepared: list[tuple[Participant, str]]) -> bool:
    """COMMIT PREPARED everywhere; True if some participant is left for recovery."""
    results = await _on_each([(p.conn, f"COMMIT PREPARED '{g}'") for p, g in prepared], "commit_prepared")
    unfinished = False
    for (p, g), r in zip(prepared, results, strict=True):
        if isinstance(r, BaseException):
            log.warning("COMMIT PREPARED %s failed (%s); recovery will finish it", g, r)
            p.conn.broken = True
            unfinished = True
    return unfinished


def _without_notice(msgs: list[tuple[int, bytes]], sqlstate: str) -> list[tuple[int, bytes]]:
    return [(t, p) for t, p in msgs if not (t == _N and pg.parse_error_fields(p).get("C") == sqlstate)]
