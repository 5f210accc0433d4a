"""Pools of backend connections, one pool per (node, database).

A pool opens connections lazily up to ``size``; a client waiting longer than ``acquire_timeout``
gets SQLSTATE 53300 instead of hanging. A connection comes back through ``release``: when it may
carry a client's session state (SETs, prepared statements, temp tables, LISTEN), it is reset with
``DISCARD ALL`` (after a ROLLBACK if a transaction is open) before anyone else gets it; a broken
connection is closed instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from executor.backend import BackendConnection, connect_backend
from executor.protocol import PgError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSettings:
    user: str
    password: str
    size: int = 50
    connect_timeout: float = 5.0
    acquire_timeout: float = 30.0


class NodePool:
    def __init__(
        self,
        host: str,
        port: int,
        database: str,
        settings: PoolSettings,
        node_name: str = "",
        on_change: Callable[[NodePool], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.database = database
        self.settings = settings
        self.node_name = node_name or f"{host}:{port}"
        self._idle: deque[BackendConnection] = deque()
        self._waiters: deque[asyncio.Future[BackendConnection | None]] = deque()
        self.open_count = 0  # connections open or being opened
        self.in_use = 0
        self._on_change = on_change
        self._closed = False

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self)

    def acquire_nowait(self) -> BackendConnection | None:
        """An idle ready connection, or None (then :meth:`acquire` must wait or connect)."""
        if self._closed or self._waiters:
            return None  # never overtake a client already waiting
        return self._take_idle()

    def _take_idle(self) -> BackendConnection | None:
        """Check out the newest usable idle connection, dropping dead ones on the way."""
        while self._idle:
            conn = self._idle.pop()
            if conn.usable:
                self.in_use += 1
                self._changed()
                return conn
            self.open_count -= 1
        return None

    async def acquire(self) -> BackendConnection:
        """A ready connection: an idle one, a new one while under ``size``, or wait for one."""
        if self._closed:
            raise PgError("57P01", f"pool for node {self.node_name} is closed")
        conn = self._take_idle()
        if conn is not None:
            return conn
        if self.open_count < self.settings.size:
            return await self._open_new()
        fut: asyncio.Future[BackendConnection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._changed()
        try:
            async with asyncio.timeout(self.settings.acquire_timeout):
                conn = await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                # Handed a connection (or a free slot) just as the wait timed out: take it, or
                # it would be lost to the pool for good (counted in use, owned by nobody).
                conn = fut.result()
                if conn is None:
                    return await self._open_new()
                self.in_use += 1
                self._changed()
                return conn
            raise PgError(
                "53300",
                f"no free connection to node {self.node_name} after {self.settings.acquire_timeout:g}s "
                f"(pool size {self.settings.size})",
                hint="Raise [backend] pool_size or reduce concurrent sessions.",
            ) from None
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)
            self._changed()
        if conn is None:  # a slot freed up: open a new connection in it
            return await self._open_new()
        self.in_use += 1
        self._changed()
        return conn

    async def _open_new(self) -> BackendConnection:
        self.open_count += 1
        self._changed()
        try:
            conn = await connect_backend(
                self.host,
                self.port,
                user=self.settings.user,
                password=self.settings.password,
                database=self.database,
                timeout=self.settings.connect_timeout,
                node_name=self.node_name,
            )
        except BaseException:
            self.open_count -= 1
            self._hand_slot_to_waiter()
            self._changed()
            raise
        self.in_use += 1
        self._changed()
        return conn

    def _hand_slot_to_waiter(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    @contextlib.asynccontextmanager
    async def connection(self, *, reset: bool = False) -> AsyncIterator[BackendConnection]:
        """A connection for a few statements, given back afterwards (``reset``: discard its
        session state first, e.g. after a SET). A broken one is closed, as by :meth:`release`."""
        conn = await self.acquire()
        try:
            yield conn
        finally:
            self.release(conn, reset=reset)

    def release(self, conn: BackendConnection, *, reset: bool = True) -> None:
        """Give ``conn`` back. With ``reset``, session state is discarded first (in a task)."""
        self.in_use -= 1
        conn.consumer = None
        if self._closed or not conn.usable:
            self._discard(conn)
            return
        if reset:
            asyncio.get_running_loop().create_task(self._reset_and_return(conn))
        else:
            self._return(conn)

    async def _reset_and_return(self, conn: BackendConnection) -> None:
        self.in_use += 1  # still busy while resetting
        try:
            async with asyncio.timeout(self.settings.connect_timeout):
                if conn.tx_status != b"I":
                    # Two round trips, not "ROLLBACK; DISCARD ALL": a multi-statement Query runs
                    # in an implicit transaction block, where DISCARD ALL always fails (25001).
                    await conn.simple_query("ROLLBACK")
                await conn.simple_query("DISCARD ALL")
            conn.prepared.clear()
            conn.__dict__.pop("applied_settings", None)  # DISCARD ALL reset them too
        except Exception as exc:  # noqa: BLE001 - any failure: drop the connection
            log.info("reset of connection to %s failed (%s); closing it", self.node_name, exc)
            self.in_use -= 1
            self._discard(conn)
            return
        self.in_use -= 1
        self._return(conn)

    def _return(self, conn: BackendConnection) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                self._changed()
                return
        self._idle.append(conn)
        self._changed()

    def _discard(self, conn: BackendConnection) -> None:
        conn.abort() if conn.broken else conn.close()
        self.open_count -= 1
        self._hand_slot_to_waiter()
        self._changed()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        for fut in self._waiters:
            if not fut.done():
                fut.set_exception(PgError("57P01", f"pool for node {self.node_name} is closing"))
        self._waiters.clear()


class PoolManager:
    """All node pools of one proxy process, created on first use."""

    def __init__(self, settings: PoolSettings, on_change: Callable[[NodePool], None] | None = None):
        self.settings = settings
        self._pools: dict[tuple[str, int, str, str], NodePool] = {}
        self._on_change = on_change

    def pool(self, host: str, port: int, database: str, node_name: str = "", purpose: str = "") -> NodePool:
        """The pool for (node, database, purpose): client sessions and node work use separate
        pools, so a session holding its connection in a transaction never waits for its own
        pool's last connection to run a shard statement on the same node (a pool deadlock)."""
        key = (host, port, database, purpose)
        p = self._pools.get(key)
        if p is None:
            p = NodePool(host, port, database, self.settings, node_name, self._on_change)
            self._pools[key] = p
        return p

    def pools(self) -> list[NodePool]:
        return list(self._pools.values())

    async def close(self) -> None:
        for p in self._pools.values():
            await p.close()
