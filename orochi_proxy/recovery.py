"""Commit decisions and recovery of prepared transactions (``executor.twophase``).

``TransactionLog`` is this proxy process's coordinator identity: a random key whose PostgreSQL
advisory lock it holds, for its whole life, on a dedicated connection to the metadata database,
and the connection on which it records commit decisions. Writing the decision on the very
connection that holds the lock means a coordinator that lost its lock (connection gone) can no
longer decide. A lost connection (the metadata node restarted) is reopened under a new key
(``TransactionLog.ensure``, by the next commit or recovery round): transactions prepared under the
old key belong to a dead coordinator from then on, and recovery settles them. Decisions are
written with ``synchronous_commit = on`` whatever the database's default.

``recover`` (at start-up, every ``recovery_interval`` seconds, and on
``SELECT recover_prepared_transactions()``) looks at every node's prepared transactions named
``orochi_*``. For each coordinator it first tries to take that coordinator's lock: held by a live
process, its transactions are left alone (they are between PREPARE and decision, or being
committed right now); free, the coordinator is gone, and each of its prepared transactions is
committed if a decision exists and rolled back otherwise. This process's own transactions are
finished only when they are no longer in flight. Decisions with nothing prepared anywhere are
deleted. Several replicas may run recovery at once: COMMIT/ROLLBACK PREPARED of a gid another
replica already finished just fails harmlessly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import asyncpg

from executor.protocol import PgError
from executor.twophase import GID_PREFIX, Decider, OutcomeUnknown, parse_gid

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer

log = logging.getLogger(__name__)
SCHEMA = "orochi_catalog"
LOCK_SPACE = 0x0C0C0000_00000000  # high bits of the advisory-lock keys of coordinators


class TransactionLog:
    def __init__(self, connect_kwargs: dict[str, Any]) -> None:
        self._kwargs = dict(connect_kwargs)
        self.key = secrets.randbits(40)  # small enough to stay a positive bigint with LOCK_SPACE
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()
        self.in_flight: set[str] = set()

    @property
    def lock_key(self) -> int:
        return LOCK_SPACE | self.key

    async def open(self) -> None:
        # A decision is the commit point: it must survive a crash of the metadata node even where
        # that database runs with synchronous_commit = off (an async commit can vanish in one).
        settings = {**self._kwargs.get("server_settings", {}), "synchronous_commit": "on"}
        conn = await asyncpg.connect(**{"timeout": 10, **self._kwargs, "server_settings": settings})
        try:
            # Shared: sessions writing a decision inside their own transaction take the same lock
            # shared for that transaction (orochi_proxy.txcoordinator); recovery needs it exclusive.
            await conn.execute("SELECT pg_advisory_lock_shared($1)", self.lock_key)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn

    async def ensure(self) -> None:
        """Reopen a lost decision connection (the metadata node restarted), under a new key.

        The lost connection's lock went with it, so recovery in any replica may already have
        rolled back transactions prepared under the old key: those must never be decided now.
        A new key gives later transactions new gids; ``decide`` refuses gids of an old key, and
        ``holder_pid`` no longer vouches for it.
        """
        if self._conn is not None and not self._conn.is_closed():
            return
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            old, self._conn = self.key, None
            self.key = secrets.randbits(40)
            await self.open()
            log.warning("reopened the commit-decision connection; coordinator key %d replaces %d", self.key, old)

    def holder_pid(self, key: int) -> int | None:
        """Backend pid of the connection holding coordinator ``key``'s lock (None if lost)."""
        conn = self._conn
        if key != self.key or conn is None or conn.is_closed():
            return None
        return conn.get_server_pid()

    async def close(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._conn.close(), 2)
        self._conn = None

    def decider(self) -> Decider:
        return Decider(self.key, self.decide, self.forget, self.in_flight)

    async def decide(self, gid: str, node_ids: list[int]) -> None:
        lost = PgError("08006", "lost the connection that records commit decisions; the transaction was rolled back")
        try:
            await self.ensure()  # for later transactions: this one's gid has the old key
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise lost from exc
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed() or not gid.startswith(f"{GID_PREFIX}{self.key}_"):
                raise lost
            try:
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.transactions (gid, coordinator, node_ids) VALUES ($1, $2, $3)",
                    gid, self.key, node_ids,
                )
            except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
                # The INSERT may have committed before the connection went: only recovery, which
                # reads the record, may settle the participants now.
                raise OutcomeUnknown(
                    "08006", "lost the metadata database while recording the commit decision; "
                    "the outcome is settled by recovery",
                ) from exc

    async def forget(self, gid: str) -> None:
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                await self._conn.execute(f"DELETE FROM {SCHEMA}.transactions WHERE gid = $1", gid)


async def recover(server: ProxyServer) -> int:
    """Resolve orphaned prepared transactions on every node; returns how many were resolved."""
    txlog: TransactionLog = server.txlog
    database = server.config.metadata.dbname
    with contextlib.suppress(Exception):  # a lost decision connection comes back here at the latest
        await txlog.ensure()
    # node id -> (gid, database): client sessions prepare in their own database, and COMMIT
    # PREPARED must run in that database.
    prepared: dict[int, list[tuple[str, str]]] = defaultdict(list)
    reachable_all = True
    for node in server.catalog.nodes:
        pool = server.node_pool(node.node_id, database)
        try:
            conn = await pool.acquire()
        except PgError:
            reachable_all = False
            continue
        try:
            rows = await conn.simple_query(
                "SELECT gid, database FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE 'orochi\\_%'"
            )
            prepared[node.node_id] = [(r[0].decode(), r[1].decode()) for r in rows]  # type: ignore[union-attr]
        except PgError:
            reachable_all = False
        finally:
            pool.release(conn, reset=False)
    checker = await asyncpg.connect(**server.catalog._connect_kwargs)
    resolved = 0
    try:
        by_coordinator: dict[int, list[tuple[int, str, str, str]]] = defaultdict(list)
        for node_id, items in prepared.items():
            for gid, dbname in items:
                parsed = parse_gid(gid)
                if parsed is not None:
                    by_coordinator[parsed[0]].append((node_id, gid, parsed[1], dbname))
        for coordinator, items in by_coordinator.items():
            own = coordinator == txlog.key
            locked = False
            if not own:
                locked = await checker.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_SPACE | coordinator)
                if not locked:
                    continue  # a live coordinator is still working on these
            try:
                for node_id, gid, base, dbname in items:
                    if base in txlog.in_flight:  # this process commits it (maybe under an old key)
                        continue
                    decided = await checker.fetchval(f"SELECT 1 FROM {SCHEMA}.transactions WHERE gid = $1", base)
                    sql = f"{'COMMIT' if decided else 'ROLLBACK'} PREPARED '{gid}'"
                    pool = server.node_pool(node_id, dbname)
                    try:
                        conn = await pool.acquire()
                    except PgError:
                        continue
                    try:
                        await conn.simple_query(sql)
                        resolved += 1
                        log.info("recovery: %s", sql)
                    except PgError as exc:
                        if exc.sqlstate != "42704":  # already finished by someone else
                            log.warning("recovery: %s failed: %s", sql, exc)
                    finally:
                        pool.release(conn, reset=False)
            finally:
                if locked:
                    await checker.execute("SELECT pg_advisory_unlock($1)", LOCK_SPACE | coordinator)
        if reachable_all:
            still = {parse_gid(g)[1] for items in prepared.values() for g, _db in items if parse_gid(g)}  # type: ignore[index]
            rows = await checker.fetch(
                f"SELECT gid FROM {SCHEMA}.transactions WHERE decided_at < now() - interval '30 seconds'"
            )
            stale = [r["gid"] for r in rows if r["gid"] not in still and r["gid"] not in txlog.in_flight]
            if stale:
                await checker.execute(f"DELETE FROM {SCHEMA}.transactions WHERE gid = ANY($1::text[])", stale)
    finally:
        await checker.close()
    return resolved


async def recovery_loop(server: ProxyServer, interval: float) -> None:
    """Run recovery at start-up and then every ``interval`` seconds until cancelled."""
    while True:
        try:
            n = await recover(server)
            if n:
                log.info("recovery resolved %d prepared transaction(s)", n)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried at the next interval
            log.warning("recovery failed: %s", exc)
        await asyncio.sleep(interval)
