"""A tiny raw-socket PostgreSQL client for tests that must send what no driver would send.

Why not psycopg/asyncpg here: the point of these tests is malformed, truncated and out-of-order
protocol traffic, which real drivers refuse to produce. The builders live in
``executor.protocol`` (the proxy's own codec) where they are plain; anything deliberately broken
is built by hand in the tests. Reading is strict: every byte the proxy sends must frame as
``type + int32 length``, so a proxy that answers with garbage fails the test, too.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time

from executor import protocol as pg
from executor.scram import ScramClient

_I32 = struct.Struct("!i")


class ServerClosed(Exception):
    """The proxy closed the connection (EOF or reset) while we expected more."""


class BadFraming(AssertionError):
    """The proxy sent bytes that do not frame as a backend message."""


def startup_packet(params: dict[str, str], version: int = pg.PROTOCOL_3_0) -> bytes:
    """A StartupMessage with an arbitrary protocol version (``pg.startup_message`` is 3.0 only)."""
    body = _I32.pack(version) + b"".join(pg.cstr(k) + pg.cstr(v) for k, v in params.items())
    body += b"\x00"
    return _I32.pack(len(body) + 4) + body


def raw_message(mtype: bytes, payload: bytes, length: int | None = None) -> bytes:
    """A typed message whose length field may lie (``length`` overrides the true one)."""
    return mtype + _I32.pack(len(payload) + 4 if length is None else length) + payload


def error_fields(payload: bytes) -> dict[str, str]:
    return pg.parse_error_fields(payload)


class RawClient:
    """A blocking socket with message-level reads; every read has a deadline."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection((host, port), timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer from the proxy in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            raise ServerClosed("connection reset") from None
        except ssl.SSLError as exc:
            raise ServerClosed(f"TLS error: {exc}") from None
        except TimeoutError:
            raise TimeoutError("no answer from the proxy in time") from None
        if not chunk:
            raise ServerClosed("EOF")
        self.buf += chunk

    def recv_exact(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buf) < n:
            self._fill(deadline)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_message(self, timeout: float | None = None) -> tuple[bytes, bytes]:
        """One backend message as ``(type, payload)``; ServerClosed on EOF."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buf) < 5:
            self._fill(deadline)
        mtype = self.buf[:1]
        (ln,) = _I32.unpack_from(self.buf, 1)
        if ln < 4 or ln > 1 << 30 or not (mtype.isalpha() or mtype in b"123"):
            raise BadFraming(f"proxy sent a bad frame header {self.buf[:5]!r}")
        while len(self.buf) < ln + 1:
            self._fill(deadline)
        payload, self.buf = self.buf[5 : ln + 1], self.buf[ln + 1 :]
        return mtype, payload

    def read_until(
        self, types: bytes = b"Z", timeout: float | None = None
    ) -> list[tuple[bytes, bytes]]:
        """Messages up to and including the first whose type is in ``types``."""
        deadline = time.monotonic() + (timeout or self.timeout)
        out: list[tuple[bytes, bytes]] = []
        while True:
            msg = self.read_message(max(deadline - time.monotonic(), 0.001))
            out.append(msg)
            if msg[0] in types:
                return out

    def expect_error_then_close(self, timeout: float | None = None) -> dict[str, str]:
        """Read up to an ErrorResponse, return its fields, and check that EOF follows."""
        msgs = self.read_until(b"E", timeout)
        fields = error_fields(msgs[-1][1])
        self.expect_closed(timeout)
        return fields

    def expect_closed(self, timeout: float | None = None) -> bytes:
        """Wait for EOF; return whatever bytes arrived before it (usually none)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            while True:
                self._fill(deadline)
        except ServerClosed:
            pass
        rest, self.buf = self.buf, b""
        return rest

    def start_tls(self, cafile: str | None = None) -> None:
        ctx = (
            ssl.create_default_context(cafile=cafile)
            if cafile
            else ssl._create_unverified_context()
        )
        assert not self.buf, "unencrypted bytes pending before the TLS handshake"
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def login(
        self, user: str, password: str, database: str = "postgres", **params: str
    ) -> list[tuple[bytes, bytes]]:
        """Startup + SCRAM (or trust) up to the first ReadyForQuery; returns those messages.

        An ErrorResponse during login raises AssertionError with its fields.
        """
        self.send(pg.startup_message({"user": user, "database": database, **params}))
        scram: ScramClient | None = None
        out: list[tuple[bytes, bytes]] = []
        while True:
            mtype, payload = self.read_message()
            out.append((mtype, payload))
            if mtype == b"E":
                raise AssertionError(f"login failed: {error_fields(payload)}")
            if mtype == b"Z":
                return out
            if mtype != b"R":
                continue
            (code,) = _I32.unpack_from(payload, 0)
            if code == 10:
                scram = ScramClient(user, password)
                first = scram.client_first()
                self.send(
                    pg.message(b"p", pg.cstr("SCRAM-SHA-256") + _I32.pack(len(first)) + first)
                )
            elif code == 11:
                assert scram is not None
                self.send(pg.message(b"p", scram.server_first(payload[4:])))
            elif code == 12:
                assert scram is not None
                scram.server_final(payload[4:])
            elif code != 0:
                raise AssertionError(f"unexpected authentication request {code}")

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        """Simple Query; all answers up to ReadyForQuery."""
        self.send(pg.query(sql))
        return self.read_until(b"Z")


def first_value(msgs: list[tuple[bytes, bytes]]) -> str | None:
    """The first column of the first DataRow among ``msgs`` (text format)."""
    for mtype, payload in msgs:
        if mtype == b"D":
            v = pg.decode_data_row(payload)[0]
            return None if v is None else v.decode()
    raise AssertionError(f"no DataRow in {msgs!r}")


def errors_in(msgs: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [error_fields(p) for t, p in msgs if t == b"E"]
