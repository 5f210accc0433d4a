"""The proxy's own protocol connection to one PostgreSQL node.

Why not asyncpg/psycopg on the data path: a routed statement must reach the client with the
exact bytes, types and formats the node produced, and every decode/re-encode costs CPU the
proxy does not have (ENVIRONMENT.md: relaying 10k rows raw ~1-2 ms, decoding 4-6 ms). So this is
an ``asyncio.Protocol`` (callbacks, no stream objects: measured 2x faster than streams here)
that frames messages and hands complete ones to a *consumer* (a client session) untouched.

Two modes:
- **relay**: ``consumer.on_backend_messages(conn, buf, frames)`` gets each batch of complete
  messages; the session forwards ``buf`` to its client with one write when it can.
- **collect**: control-plane helpers (``exchange``, ``simple_query``) send messages and await
  the answers up to ReadyForQuery, for start-up, session set-up and proxy-run statements.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import os
import struct
from collections import deque
from collections.abc import Iterable
from typing import Protocol

from executor import protocol as pg
from executor.protocol import PgError
from rewriter.quoting import quote_literal

log = logging.getLogger(__name__)

_I32 = struct.Struct("!i")
_conn_ids = itertools.count(1)


class BackendConsumer(Protocol):
    def on_backend_messages(
        self, conn: BackendConnection, buf: bytes, frames: list[tuple[int, int, int]]
    ) -> None: ...

    def on_backend_lost(self, conn: BackendConnection, exc: Exception | None) -> None: ...


class NodeUnavailable(PgError):
    """The node cannot be reached or the connection broke: SQLSTATE class 08."""


def node_unavailable(node: str, why: str) -> NodeUnavailable:
    return NodeUnavailable(
        "08006",
        f"connection to node {node} failed: {why}",
        hint="Check that the node is running and reachable; see `orochi-proxy status`.",
    )


class _Collector:
    """Gathers (type, payload) messages for a control-plane exchange."""

    def __init__(self) -> None:
        self.messages: deque[tuple[int, bytes]] = deque()
        self.event = asyncio.Event()
        self.error: Exception | None = None

    def feed(self, buf: bytes, frames: Iterable[tuple[int, int, int]]) -> None:
        for t, s, e in frames:
            self.messages.append((t, buf[s + 5 : e]))
        self.event.set()

    def fail(self, exc: Exception) -> None:
        self.error = exc
        self.event.set()

    async def next(self) -> tuple[int, bytes]:
        while not self.messages:
            if self.error is not None:
                raise self.error
            self.event.clear()
            await self.event.wait()
        return self.messages.popleft()


class BackendConnection(asyncio.Protocol):
    """One raw protocol connection to a node; see the module docstring."""

    def __init__(self, host: str, port: int, node_name: str = "") -> None:
        self.id = next(_conn_ids)
        self.host = host
        self.port = port
        self.node_name = node_name or f"{host}:{port}"
        self.transport: asyncio.Transport | None = None
        self.reader = pg.FrameReader()
        self.consumer: BackendConsumer | None = None
        self._collector: _Collector | None = None
        self.parameters: dict[str, str] = {}
        self.pid = 0
        self.secret = 0
        self.tx_status = pg.TX_IDLE
        self.prepared: set[str] = set()  # statement names prepared on this connection
        self.closed = False
        self.broken = False
        self._connected = asyncio.get_running_loop().create_future()

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._connected.done():
            self._connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            buf, frames = self.reader.feed(data)
        except pg.ProtocolViolation as exc:
            self._break(node_unavailable(self.node_name, f"invalid data from node: {exc}"))
            return
        if not frames:
            return
        if self._collector is not None:
            self._collector.feed(buf, frames)
        elif self.consumer is not None:
            self.consumer.on_backend_messages(self, buf, frames)
        else:
            self._idle_messages(buf, frames)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.broken = True
        err = node_unavailable(self.node_name, "server closed the connection unexpectedly")
        if not self._connected.done():
            self._connected.set_exception(err)
        if self._collector is not None:
            self._collector.fail(err)
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            consumer.on_backend_lost(self, exc)

    def pause_writing(self) -> None:  # node slower than us; nothing to do, writes are small
        pass

    def resume_writing(self) -> None:
        pass

    # ---------------------------------------------------------------- helpers
    def _idle_messages(self, buf: bytes, frames: list[tuple[int, int, int]]) -> None:
        """Messages while nobody listens: a FATAL (admin shutdown) marks the connection broken."""
        for t, s, e in frames:
            if t == ord("E"):
                err = PgError.from_payload(buf[s + 5 : e])
                log.info("idle backend %s got %s", self.node_name, err)
                self.broken = True
            elif t == ord("S"):
                name, pos = pg.read_cstr(buf[s + 5 : e], 0)
                self.parameters[name] = pg.read_cstr(buf[s + 5 : e], pos)[0]

    def _break(self, exc: Exception) -> None:
        self.broken = True
        if self._collector is not None:
            self._collector.fail(exc)
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is None or self.closed:
            raise node_unavailable(self.node_name, "connection is closed")
        self.transport.write(data)

    def writelines(self, chunks: list[bytes]) -> None:
        if self.transport is None or self.closed:
            raise node_unavailable(self.node_name, "connection is closed")
        self.transport.writelines(chunks)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(pg.TERMINATE)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.broken = True
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        return not (self.closed or self.broken) and self.transport is not None

    # ---------------------------------------------------------------- start-up and control plane
    async def _startup(self, user: str, password: str, database: str, params: dict[str, str]) -> None:
        self._collector = col = _Collector()
        try:
            startup = {"user": user, "database": database, "client_encoding": "UTF8"}
            startup.update(params)
            self.write(pg.startup_message(startup))
            scram = None
            while True:
                t, payload = await col.next()
                if t == ord("R"):
                    (code,) = _I32.unpack_from(payload, 0)
                    if code == 0:
                        continue
                    if code == 3:  # cleartext password
                        self.write(pg.message(b"p", pg.cstr(password)))
                    elif code == 5:  # md5
                        salt = payload[4:8]
                        inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                        digest = "md5" + hashlib.md5(inner + salt).hexdigest()
                        self.write(pg.message(b"p", pg.cstr(digest)))
                    elif code == 10:  # SASL
                        mechanisms = payload[4:].split(b"\x00")
                        if b"SCRAM-SHA-256" not in mechanisms:
                            raise PgError("28000", f"node {self.node_name} offers no supported SASL mechanism")
                        from executor.scram import ScramClient

                        scram = ScramClient(user, password)
                        first = scram.client_first()
                        self.write(
                            pg.message(b"p", pg.cstr("SCRAM-SHA-256") + _I32.pack(len(first)) + first)
                        )
                    elif code == 11 and scram is not None:
                        self.write(pg.message(b"p", scram.server_first(payload[4:])))
                    elif code == 12 and scram is not None:
                        scram.server_final(payload[4:])
                    else:
                        raise PgError("08P01", f"node {self.node_name} asked for unsupported authentication {code}")
                elif t == ord("S"):
                    name, pos = pg.read_cstr(payload, 0)
                    self.parameters[name] = pg.read_cstr(payload, pos)[0]
                elif t == ord("K"):
                    self.pid, self.secret = struct.unpack("!ii", payload[:8])
                elif t == ord("E"):
                    raise PgError.from_payload(payload)
                elif t == ord("Z"):
                    self.tx_status = payload[:1]
                    return
                # NoticeResponse during start-up: ignore
        finally:
            self._collector = None

    async def exchange(
        self, data: bytes, until: tuple[int, ...] = (90,), count: int = 1
    ) -> list[tuple[int, bytes]]:
        """Send protocol messages and return every answer up to one of ``until`` (ReadyForQuery).

        With ``until`` other than ReadyForQuery the messages should end in Flush: the caller is
        in the middle of an extended-protocol batch and must not end it with a Sync. ``count``:
        stop at the count-th such message (an ErrorResponse in ``until`` always stops).
        """
        if self.consumer is not None:
            raise RuntimeError("backend connection is in relay mode")
        self._collector = col = _Collector()
        try:
            self.write(data)
            out: list[tuple[int, bytes]] = []
            while True:
                t, payload = await col.next()
                out.append((t, payload))
                if t == ord("Z"):
                    self.tx_status = payload[:1]
                    return out
                if t == ord("S"):
                    name, pos = pg.read_cstr(payload, 0)
                    self.parameters[name] = pg.read_cstr(payload, pos)[0]
                if t in until:
                    count -= 1
                    if count <= 0 or t == ord("E"):
                        return out
        except BaseException:
            # The conversation is out of step now; nobody can reuse this connection safely.
            self.broken = True
            raise
        finally:
            self._collector = None

    async def simple_query(self, sql: str) -> list[list[bytes | None]]:
        """Run ``sql`` (simple protocol) and return the data rows of its last result; raise PgError."""
        rows: list[list[bytes | None]] = []
        error: PgError | None = None
        for t, payload in await self.exchange(pg.query(sql)):
            if t == ord("T"):
                rows = []
            elif t == ord("D"):
                rows.append(pg.decode_data_row(payload))
            elif t == ord("E"):
                error = PgError.from_payload(payload)
        if error is not None:
            raise error
        return rows

    async def rollback_quietly(self) -> None:
        """After an error: end the open (or failed) transaction. A connection that cannot is
        marked broken, so its pool closes it instead of handing it out again."""
        if self.usable and self.tx_status != b"I":
            try:
                await self.simple_query("ROLLBACK")
            except PgError:
                self.broken = True

    async def run_in_transaction(self, statements: list[str], *, lock_timeout: str | None = None) -> list[list[bytes | None]]:
        """Run ``statements`` as one transaction (one round trip); rolled back on error."""
        head = "BEGIN; " + (f"SET LOCAL lock_timeout = {quote_literal(lock_timeout)}; " if lock_timeout else "")
        try:
            return await self.simple_query(head + "; ".join(statements) + "; COMMIT")
        except PgError:
            await self.rollback_quietly()
            raise

    async def cancel(self) -> None:
        """Send a CancelRequest for whatever this connection runs (on a new connection)."""
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), 5)
            writer.write(pg.cancel_request(self.pid, self.secret))
            await writer.drain()
            writer.close()
        except (TimeoutError, OSError) as exc:
            log.warning("cancel to %s failed: %s", self.node_name, exc)


async def connect_backend(
    host: str,
    port: int,
    *,
    user: str,
    password: str,
    database: str,
    params: dict[str, str] | None = None,
    timeout: float = 5.0,
    node_name: str = "",
) -> BackendConnection:
    """Open and authenticate a connection; NodeUnavailable (08006) within ``timeout`` if impossible."""
    loop = asyncio.get_running_loop()
    name = node_name or f"{host}:{port}"
    conn: BackendConnection | None = None
    try:
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(lambda: BackendConnection(host, port, name), host, port)
            sock = conn.transport.get_extra_info("socket") if conn.transport else None
            if sock is not None:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await conn._startup(user, password, database, params or {})
            return conn
    except TimeoutError:
        if conn is not None:
            conn.abort()
        raise node_unavailable(name, f"timeout after {timeout:g}s") from None
    except OSError as exc:
        if conn is not None:
            conn.abort()
        # asyncio words a refused connect as "Connect call failed (...)": prefer the OS's words.
        why = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        raise node_unavailable(name, why) from None
    except PgError:
        if conn is not None:
            conn.abort()
        raise
