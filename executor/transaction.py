"""Node connections pinned to one client transaction block (a distributed transaction).

While a client is inside ``BEGIN ... COMMIT`` its distributed statements must run on the same
node connections, each inside its own node transaction, so later statements see earlier writes
and everything commits or rolls back together. A ``DistTransaction`` holds those connections:

* a node joins on the first statement that touches it: a pool connection gets the session's
  output settings (outside the transaction, so a rollback cannot undo them behind the settings
  cache), then ``BEGIN`` with the client's isolation level, access mode and timeouts, then the
  ``SET LOCAL``\\ s and savepoints the block has so far — so ``ROLLBACK TO SAVEPOINT`` works the
  same on every participant whenever it joined;
* ``SAVEPOINT`` / ``RELEASE`` / ``ROLLBACK TO`` / ``SET LOCAL`` are sent to every participant;
  a savepoint older than the distributed transaction (set before any node joined) rolls every
  participant back entirely, since all their work came after it;
* writes mark their participant ``written``; at commit only written participants need the
  two-phase protocol (``prepare`` / ``commit_prepared``), read-only ones just finish.

Committing is coordinated by the session (``orochi_proxy.txcoordinator``), because the client's
own metadata-node connection is part of the same transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from executor.backend import BackendConnection
from executor.pool import NodePool
from executor.protocol import PgError
from rewriter.quoting import quote_ident, quote_literal

log = logging.getLogger(__name__)


@dataclass
class TxOptions:
    """How the client's block began, read once from its metadata-node connection."""

    isolation: str = "read committed"
    read_only: bool = False
    deferrable: bool = False
    statement_timeout: str = "0"
    lock_timeout: str = "0"

    def begin_sql(self, default_lock_timeout: str) -> str:
        mode = f"BEGIN ISOLATION LEVEL {self.isolation.upper()}"
        if self.read_only:
            mode += " READ ONLY"
            if self.deferrable and self.isolation == "serializable":
                mode += " DEFERRABLE"
        # A lock wait across nodes is invisible to each node's deadlock detector (T1 waits on
        # node A for T2, T2 on node B for T1): a lock_timeout always ends it.
        lock_timeout = self.lock_timeout if self.lock_timeout not in ("0", "") else default_lock_timeout
        parts = [mode]
        if lock_timeout not in ("0", ""):
            parts.append(f"SET LOCAL lock_timeout = {quote_literal(lock_timeout)}")
        if self.statement_timeout not in ("0", ""):
            parts.append(f"SET LOCAL statement_timeout = {quote_literal(self.statement_timeout)}")
        return "; ".join(parts)


OPTIONS_QUERY = (
    "SELECT pg_catalog.current_setting('transaction_isolation'), "
    "pg_catalog.current_setting('transaction_read_only'), "
    "pg_catalog.current_setting('transaction_deferrable'), "
    "pg_catalog.current_setting('statement_timeout'), "
    "pg_catalog.current_setting('lock_timeout')"
)


def options_from_row(row: list[str | None]) -> TxOptions:
    iso, ro, deferrable, st, lt = (v or "" for v in row)
    return TxOptions(iso or "read committed", ro == "on", deferrable == "on", st or "0", lt or "0")


@dataclass
class Participant:
    node_id: int
    pool: NodePool
    conn: BackendConnection
    written: bool = False


@dataclass
class DistTransaction:
    """The node side of one client transaction block."""

    options: TxOptions
    pool_for: Callable[[int], NodePool]
    default_lock_timeout: str = "0"
    participants: dict[int, Participant] = field(default_factory=dict)
    savepoints: list[str] = field(default_factory=list)  # set while some node had joined
    set_locals: list[str] = field(default_factory=list)
    failed: bool = False  # a statement failed: only ROLLBACK (TO SAVEPOINT) can go on
    _joining: dict[int, asyncio.Future[Participant]] = field(default_factory=dict)

    @property
    def read_only(self) -> bool:
        return self.options.read_only

    def writers(self) -> list[Participant]:
        return [p for p in self.participants.values() if p.written]

    async def conn(self, node_id: int, settings: dict[str, str], *, write: bool = False) -> BackendConnection:
        """This transaction's connection to ``node_id`` (joining the node on first use)."""
        p = self.participants.get(node_id)
        if p is None:
            p = await self._join(node_id, settings)
        else:
            from executor.distributed import apply_settings

            # Inside the transaction: a rollback undoes it, and then the release resets the
            # connection (which forgets the settings cache).
            await apply_settings(p.conn, settings)
        if write:
            p.written = True
        return p.conn

    async def _join(self, node_id: int, settings: dict[str, str]) -> Participant:
        pending = self._joining.get(node_id)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Participant] = asyncio.get_running_loop().create_future()
        self._joining[node_id] = fut
        try:
            from executor.distributed import apply_settings

            pool = self.pool_for(node_id)
            conn = await pool.acquire()
            try:
                await apply_settings(conn, settings)
                sql = [self.options.begin_sql(self.default_lock_timeout)]
                sql += self.set_locals
                sql += [f"SAVEPOINT {quote_ident(s)}" for s in self.savepoints]
                await conn.simple_query("; ".join(sql))
            except BaseException:
                pool.release(conn, reset=True)
                raise
            p = Participant(node_id, pool, conn)
            self.participants[node_id] = p
            fut.set_result(p)
            return p
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: a lone joiner must not log "never retrieved"
            raise
        finally:
            self._joining.pop(node_id, None)

    async def broadcast(self, sql: str) -> None:
        """Run ``sql`` on every participant concurrently; raise the first error."""
        items = list(self.participants.values())
        if not items:
            return
        results = await asyncio.gather(*(p.conn.simple_query(sql) for p in items), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def savepoint(self, name: str) -> None:
        if self.participants:
            await self.broadcast(f"SAVEPOINT {quote_ident(name)}")
        self.savepoints.append(name)

    async def release_savepoint(self, name: str) -> None:
        if name not in self.savepoints:
            # Older than every node's work: releasing it releases the later ones too.
            self.savepoints.clear()
            return
        if self.participants:
            await self.broadcast(f"RELEASE SAVEPOINT {quote_ident(name)}")
        i = len(self.savepoints) - 1 - self.savepoints[::-1].index(name)
        del self.savepoints[i:]

    async def rollback_to(self, name: str) -> None:
        if name not in self.savepoints:
            # Set before any node joined: every participant's work came after it.
            await self.rollback()
            self.savepoints.clear()
            self.set_locals.clear()
            self.failed = False
            return
        if self.participants:
            await self.broadcast(f"ROLLBACK TO SAVEPOINT {quote_ident(name)}")
        i = len(self.savepoints) - 1 - self.savepoints[::-1].index(name)
        del self.savepoints[i + 1 :]
        self.failed = False

    async def set_local(self, sql: str) -> None:
        if self.participants:
            await self.broadcast(sql)
        self.set_locals.append(sql)

    async def rollback(self) -> None:
        """Roll back and release every participant (best effort: a lost node rolls back anyway)."""
        items = list(self.participants.values())
        self.participants.clear()
        await asyncio.gather(*(_finish(p, "ROLLBACK") for p in items))

    async def finish_readers(self, readers: list[Participant]) -> None:
        """End read-only participants (COMMIT and ROLLBACK are the same for them) and release."""
        for p in readers:
            self.participants.pop(p.node_id, None)
        await asyncio.gather(*(_finish(p, "COMMIT") for p in readers))

    def release_all(self, *, reset: bool) -> None:
        for p in self.participants.values():
            p.pool.release(p.conn, reset=reset or not p.conn.usable or p.conn.tx_status != b"I")
        self.participants.clear()

    def abandon(self) -> None:
        """The client went away mid-transaction: roll back in the background."""
        if self.participants:
            asyncio.get_running_loop().create_task(self.rollback())


async def _finish(p: Participant, sql: str) -> None:
    ok = False
    if p.conn.tx_status == b"E":
        sql = "ROLLBACK"  # what COMMIT of a failed transaction does anyway
    if p.conn.usable and p.conn.tx_status != b"I":
        try:
            await p.conn.simple_query(sql)
            ok = True
        except Exception as exc:  # noqa: BLE001 - the node rolls back a lost transaction itself
            log.info("%s on node %s failed: %s", sql, p.node_id, exc)
            p.conn.broken = True
    elif p.conn.usable:
        ok = True
    if not ok or sql == "ROLLBACK":
        # Settings applied inside the transaction are gone; the pool's reset forgets the cache.
        p.pool.release(p.conn, reset=True)
    else:
        p.pool.release(p.conn, reset=False)


def transaction_failed() -> PgError:
    return PgError("25P02", "current transaction is aborted, commands ignored until end of transaction block")
