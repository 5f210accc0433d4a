"""Bad input from clients: each case gets a clear error (or a quiet close) and harms nobody else.

The standard: bad input gets a clear error and loses nothing; the proxy keeps serving other
clients. So every test here talks raw protocol to a real proxy process (``rawpg``), asserts the
exact answer (SQLSTATE, then EOF or a usable session), and the autouse ``still_serving`` fixture
checks afterwards that the process is alive, a normal psycopg client still works and the proxy
logged no traceback while the test ran.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from proxyproc import ProxyProcess, start_proxy
from rawpg import (
    RawClient,
    ServerClosed,
    error_fields,
    errors_in,
    first_value,
    raw_message,
    startup_packet,
)

from executor import protocol as pg
from orochi_proxy.localcluster import LocalCluster

_I32 = struct.Struct("!i")

#: Start-up timeout of the ``tls_proxy`` fixture: short, so the slow-loris tests take seconds.
STARTUP_TIMEOUT = 1.5


def _check_serving(proc: ProxyProcess, log_offset: int) -> None:
    assert proc.process.poll() is None, f"proxy exited:\n{proc.log_tail()}"
    with psycopg.connect(proc.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
    new_log = proc.log_path.read_text(errors="replace")[log_offset:]
    assert "Traceback" not in new_log, f"proxy logged a traceback:\n{new_log[-4000:]}"


def _log_size(proc: ProxyProcess) -> int:
    return len(proc.log_path.read_text(errors="replace"))


@pytest.fixture(scope="module")
def tls_proxy(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A second proxy with a self-signed certificate and a short start-up timeout."""
    pytest.importorskip("cryptography")
    from orochi_proxy.tls import generate_self_signed

    tmp = tmp_path_factory.mktemp("tlsproxy")
    cert, key = tmp / "server.crt", tmp / "server.key"
    generate_self_signed(cert, key)
    proc = start_proxy(
        tmp,
        cluster,
        name="tls",
        server={"tls_cert": str(cert), "tls_key": str(key), "startup_timeout": STARTUP_TIMEOUT},
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def still_serving(proxy: ProxyProcess) -> Iterator[None]:
    offset = _log_size(proxy)
    yield
    _check_serving(proxy, offset)


def raw(proxy: ProxyProcess, timeout: float = 10.0) -> RawClient:
    return RawClient(proxy.host, proxy.port, timeout)


def logged_in(proxy: ProxyProcess) -> RawClient:
    c = raw(proxy)
    c.login(proxy.user, proxy.password, proxy.dbname)
    return c


# ------------------------------------------------------------------------------ start-up packet


def test_truncated_startup_then_close(proxy: ProxyProcess) -> None:
    """Half a start-up packet, then the client goes away: the proxy just drops it."""
    packet = startup_packet({"user": proxy.user, "database": "postgres"})
    with raw(proxy) as c:
        c.send(packet[: len(packet) // 2])
    # Half a packet, then a half-close: the proxy must close its side too, without a word.
    with raw(proxy) as c:
        c.send(packet[:6])
        c.sock.shutdown(socket.SHUT_WR)
        assert c.expect_closed(5) == b""


@pytest.mark.parametrize("length", [0, 4, 7, -1, -(2**31), 10_001, 2**31 - 1])
def test_startup_length_out_of_range(proxy: ProxyProcess, length: int) -> None:
    with raw(proxy) as c:
        c.send(_I32.pack(length) + _I32.pack(pg.PROTOCOL_3_0) + b"user\x00app\x00\x00")
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "08P01"
    assert fields["S"] == "FATAL"
    assert "length" in fields["M"]


@pytest.mark.parametrize(
    "version",
    [(2 << 16), (1 << 16), (4 << 16), 0, 1234, -1],
    ids=["2.0", "1.0", "4.0", "0", "junk", "neg"],
)
def test_unsupported_protocol_version(proxy: ProxyProcess, version: int) -> None:
    """PostgreSQL answers 0A000 "unsupported frontend protocol"; so does the proxy."""
    with raw(proxy) as c:
        c.send(startup_packet({"user": proxy.user, "database": "postgres"}, version))
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "0A000", fields
    assert "unsupported frontend protocol" in fields["M"]


def test_newer_minor_version_is_negotiated(proxy: ProxyProcess) -> None:
    """3.5 with a _pq_ option: NegotiateProtocolVersion (3.0, the option refused), then login."""
    with raw(proxy) as c:
        c.send(
            startup_packet(
                {"user": proxy.user, "database": "postgres", "_pq_.fancy": "1"},
                pg.PROTOCOL_3_0 + 5,
            )
        )
        mtype, payload = c.read_message()
        assert mtype == b"v"
        minor, n = struct.unpack_from("!ii", payload)
        assert (minor, n) == (pg.PROTOCOL_3_0, 1)
        assert payload[8:] == b"_pq_.fancy\x00"
        mtype, payload = c.read_message()
        assert (mtype, _I32.unpack_from(payload)[0]) == (b"R", 10)  # SASL: login continues


@pytest.mark.parametrize(
    "body",
    [
        b"user\x00app\x00database\x00postgres",  # no final terminator
        b"user\x00app",  # key without value
        b"user\x00app\x00\x00junk",  # data after the terminator
        b"user\x00\xff\xfe\x00\x00",  # not UTF-8
    ],
    ids=["no-terminator", "no-value", "trailing", "not-utf8"],
)
def test_malformed_startup_body(proxy: ProxyProcess, body: bytes) -> None:
    with raw(proxy) as c:
        c.send(_I32.pack(len(body) + 8) + _I32.pack(pg.PROTOCOL_3_0) + body)
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "08P01", fields


def test_startup_without_user(proxy: ProxyProcess) -> None:
    with raw(proxy) as c:
        c.send(startup_packet({"database": "postgres"}))
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "28000"


def test_replication_connection_refused(proxy: ProxyProcess) -> None:
    with raw(proxy) as c:
        c.send(startup_packet({"user": proxy.user, "replication": "database"}))
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "0A000"


@pytest.mark.parametrize(
    "junk",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
        bytes(range(256)),
        b"\x00\x00\x00\x08\x00\x00\x00\x00",  # length 8, version 0.0
    ],
    ids=["http", "tls-hello", "bytes", "zero-version"],
)
def test_garbage_instead_of_startup(proxy: ProxyProcess, junk: bytes) -> None:
    with raw(proxy) as c:
        c.send(junk)
        fields = c.expect_error_then_close(5)
    assert fields["C"] in ("08P01", "0A000"), fields


# ------------------------------------------------------------------------------ SSL / GSS / cancel


def test_ssl_request_without_tls_answers_n(proxy: ProxyProcess) -> None:
    with raw(proxy) as c:
        c.send(struct.pack("!ii", 8, pg.SSL_REQUEST))
        assert c.recv_exact(1, 5) == b"N"
        # The client may continue in plaintext on the same connection.
        c.login(proxy.user, proxy.password, proxy.dbname)
        assert first_value(c.query("SELECT 'plain'")) == "plain"


def test_gssenc_request_answers_n(proxy: ProxyProcess) -> None:
    with raw(proxy) as c:
        c.send(struct.pack("!ii", 8, pg.GSSENC_REQUEST))
        assert c.recv_exact(1, 5) == b"N"
        c.login(proxy.user, proxy.password, proxy.dbname)
        assert first_value(c.query("SELECT 'gss-n'")) == "gss-n"


def test_ssl_request_with_tls_handshakes(tls_proxy: ProxyProcess) -> None:
    cert = str(tls_proxy.log_path.parent / "server.crt")
    with RawClient(tls_proxy.host, tls_proxy.port) as c:
        c.send(struct.pack("!ii", 8, pg.SSL_REQUEST))
        assert c.recv_exact(1, 5) == b"S"
        c.start_tls(cafile=cert)
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
        # A second SSLRequest inside TLS is answered N, as PostgreSQL does.
        c.send(struct.pack("!ii", 8, pg.SSL_REQUEST))
        assert c.recv_exact(1, 5) == b"N"
        c.login(tls_proxy.user, tls_proxy.password, tls_proxy.dbname)
        assert first_value(c.query("SELECT 'over tls'")) == "over tls"


@pytest.mark.parametrize("sslmode", ["require", "verify-full", "disable", "prefer"])
def test_psycopg_sslmodes(tls_proxy: ProxyProcess, sslmode: str) -> None:
    extra = {"sslmode": sslmode}
    if sslmode == "verify-full":
        extra["sslrootcert"] = str(tls_proxy.log_path.parent / "server.crt")
    with psycopg.connect(tls_proxy.dsn(**extra), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        encrypted = conn.pgconn.ssl_in_use
    assert encrypted == (sslmode != "disable")


def test_plaintext_after_ssl_request_is_refused(tls_proxy: ProxyProcess) -> None:
    """Bytes pipelined behind SSLRequest could be injected before TLS (CVE-2021-23214)."""
    with RawClient(tls_proxy.host, tls_proxy.port) as c:
        c.send(struct.pack("!ii", 8, pg.SSL_REQUEST) + startup_packet({"user": "app"}))
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "08P01"


def test_tls_handshake_garbage_drops_only_that_client(tls_proxy: ProxyProcess) -> None:
    with RawClient(tls_proxy.host, tls_proxy.port) as c:
        c.send(struct.pack("!ii", 8, pg.SSL_REQUEST))
        assert c.recv_exact(1, 5) == b"S"
        c.send(b"this is not a TLS ClientHello" * 10)
        c.expect_closed(5)
    _check_serving(tls_proxy, _log_size(tls_proxy))


def test_cancel_request_with_unknown_key_is_ignored(proxy: ProxyProcess) -> None:
    with raw(proxy) as c:
        c.send(pg.cancel_request(12345, 67890))
        assert c.expect_closed(5) == b""


def test_cancel_request_with_bad_length(proxy: ProxyProcess) -> None:
    with raw(proxy) as c:
        c.send(struct.pack("!iii", 12, pg.CANCEL_REQUEST, 1))
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "08P01"


def test_cancel_request_with_right_key_cancels(proxy: ProxyProcess) -> None:
    with raw(proxy) as c:
        msgs = c.login(proxy.user, proxy.password, proxy.dbname)
        pid, secret = next(struct.unpack("!ii", p) for t, p in msgs if t == b"K")
        c.send(pg.query("SELECT pg_sleep(30)"))
        time.sleep(0.3)
        with raw(proxy) as k:
            k.send(pg.cancel_request(pid, secret))
            assert k.expect_closed(5) == b""
        msgs = c.read_until(b"Z", 10)
        assert [e["C"] for e in errors_in(msgs)] == ["57014"]
        assert first_value(c.query("SELECT 'after cancel'")) == "after cancel"


# ------------------------------------------------------------------------------ after login


@pytest.mark.parametrize("mtype", [b"Z", b"\x00", b"\xff", b"A", b"p", b"T"])
def test_unknown_message_type_after_login(proxy: ProxyProcess, mtype: bytes) -> None:
    with logged_in(proxy) as c:
        c.send(raw_message(mtype, b"hello\x00"))
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "08P01"
    assert fields["S"] == "FATAL"


@pytest.mark.parametrize("length", [-1, -(2**31), 0, 3, 64 * 1024 * 1024 + 1, 2**31 - 1])
def test_bad_message_length_after_login(proxy: ProxyProcess, length: int) -> None:
    with logged_in(proxy) as c:
        c.send(raw_message(b"Q", b"SELECT 1\x00", length=length))
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "08P01"
    assert "length" in fields["M"]


def test_garbage_after_login(proxy: ProxyProcess) -> None:
    with logged_in(proxy) as c:
        c.send(b"\x13\x37" * 100)
        fields = c.expect_error_then_close(5)
    assert fields["C"] == "08P01"


def test_message_split_byte_by_byte_still_works(proxy: ProxyProcess) -> None:
    """Not bad input, but the edge of framing: one byte per packet must reassemble."""
    with logged_in(proxy) as c:
        for b in pg.query("SELECT 'slow' AS x"):
            c.send(bytes([b]))
        assert first_value(c.read_until(b"Z")) == "slow"


BROKEN_BINDS = {
    "truncated": b"\x00\x00\x00\x01",  # portal, statement, then half a format count
    "param-len-too-long": b"\x00\x00\x00\x00\x00\x01\x00\x00\x00\x50ab\x00\x00",
    "negative-count": b"\x00\x00\xff\xff\x00\x00\x00\x00",
    "no-terminator": b"portal-without-nul",
    "trailing": b"\x00\x00\x00\x00\x00\x00\x00\x00junk",
}


@pytest.mark.parametrize("body", BROKEN_BINDS.values(), ids=BROKEN_BINDS.keys())
def test_broken_bind_body(proxy: ProxyProcess, body: bytes) -> None:
    """A Bind whose body does not parse: 08P01 for this request, and the session lives on."""
    with logged_in(proxy) as c:
        c.send(pg.parse_message("", "SELECT 1") + raw_message(b"B", body) + pg.SYNC)
        try:
            msgs = c.read_until(b"Z", 5)
        except ServerClosed:
            pytest.fail("a malformed Bind closed the session instead of failing the request")
        errs = errors_in(msgs)
        assert [e["C"] for e in errs] == ["08P01"], msgs
        assert msgs[0][0] == b"1"  # the Parse before it was done
        assert first_value(c.query("SELECT 'after bad bind'")) == "after bad bind"


@pytest.mark.parametrize("body", BROKEN_BINDS.values(), ids=BROKEN_BINDS.keys())
def test_broken_bind_body_on_proxy_statement(proxy: ProxyProcess, body: bytes) -> None:
    """The same, when the prepared statement is one the proxy answers itself."""
    with logged_in(proxy) as c:
        c.send(pg.parse_message("", "SELECT orochi_catalog_version()") + pg.SYNC)
        assert [t for t, _ in c.read_until(b"Z")] == [b"1", b"Z"]
        c.send(raw_message(b"B", body) + pg.SYNC)
        msgs = c.read_until(b"Z", 5)
        assert [e["C"] for e in errors_in(msgs)] == ["08P01"], msgs
        assert first_value(c.query("SELECT 'after bad bind'")) == "after bad bind"


@pytest.mark.parametrize(
    "msg",
    [
        raw_message(b"P", b"no-terminators"),
        raw_message(b"P", b"\x00SELECT 1\x00\x00\x05"),  # 5 parameter types, none given
        raw_message(b"D", b"X\x00"),
        raw_message(b"C", b"Q"),
        raw_message(b"E", b"\x00\x00"),
        raw_message(b"Q", b"SELECT 1"),  # no terminator
        raw_message(b"Q", b"SELECT 1\x00trailing"),
    ],
    ids=[
        "parse-noterm",
        "parse-oids",
        "describe-kind",
        "close-kind",
        "execute-short",
        "query-noterm",
        "query-trailing",
    ],
)
def test_broken_bodies_get_08p01(proxy: ProxyProcess, msg: bytes) -> None:
    with logged_in(proxy) as c:
        # A Query ends with its own ReadyForQuery; the extended messages need a Sync for theirs.
        c.send(msg if msg[:1] == b"Q" else msg + pg.SYNC)
        try:
            msgs = c.read_until(b"Z", 5)
        except ServerClosed:
            pytest.fail("a malformed message closed the session instead of failing the request")
        assert [e["C"] for e in errors_in(msgs)] == ["08P01"], msgs
        assert first_value(c.query("SELECT 'still here'")) == "still here"


# ------------------------------------------------------------------------------ authentication


def test_wrong_password_psycopg(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn().replace(f"password='{proxy.password}'", "password='wrong'")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10)
    # libpq keeps no SQLSTATE for errors during connection set-up, so psycopg reports None
    # even against PostgreSQL itself (psycopg issue #1188); the message is libpq's rendering
    # of our FATAL. The wire SQLSTATE is checked with the raw client and asyncpg below.
    assert info.value.sqlstate in (None, "28P01")
    assert 'FATAL:  password authentication failed for user "app"' in str(info.value)


def test_unknown_user_psycopg(proxy: ProxyProcess) -> None:
    dsn = proxy.dsn().replace(f"user={proxy.user}", "user=nobody")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(dsn, connect_timeout=10)
    assert info.value.sqlstate in (None, "28P01")  # see test_wrong_password_psycopg
    assert 'FATAL:  password authentication failed for user "nobody"' in str(info.value)


@pytest.mark.parametrize("user,password", [("app", "wrong"), ("nobody", "whatever")])
def test_bad_credentials_on_the_wire(proxy: ProxyProcess, user: str, password: str) -> None:
    """The ErrorResponse itself carries 28P01 (what psycopg cannot show)."""
    with raw(proxy) as c:
        with pytest.raises(AssertionError, match="28P01"):
            c.login(user, password)
        c.expect_closed(5)


@pytest.mark.parametrize("user,password", [("app", "wrong"), ("nobody", "whatever")])
def test_bad_credentials_asyncpg(proxy: ProxyProcess, user: str, password: str) -> None:
    async def go() -> None:
        await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user=user,
            password=password,
            database="postgres",
            timeout=10,
        )

    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        asyncio.run(go())
    assert info.value.sqlstate == "28P01"


@pytest.mark.parametrize(
    "response",
    [
        raw_message(b"p", b"SCRAM-SHA-1\x00" + _I32.pack(3) + b"n,,"),  # unknown mechanism
        raw_message(b"p", b"SCRAM-SHA-256\x00" + _I32.pack(9) + b"garbage!!"),
        raw_message(b"p", b"SCRAM-SHA-256\x00"),  # no length
        raw_message(b"p", b"SCRAM-SHA-256\x00" + _I32.pack(2**30) + b"n,,"),  # lying inner length
        raw_message(b"Q", b"SELECT 1\x00"),  # not a SASL response at all
        raw_message(b"p", b"x" * 20, length=-5),
        raw_message(b"p", b"x", length=20_000),
    ],
    ids=["mechanism", "garbage", "no-length", "inner-length", "query", "neg-length", "huge-length"],
)
def test_malformed_sasl(proxy: ProxyProcess, response: bytes) -> None:
    with raw(proxy) as c:
        c.send(pg.startup_message({"user": proxy.user, "database": "postgres"}))
        assert c.read_message()[0] == b"R"
        c.send(response)
        fields = c.expect_error_then_close(5)
    assert fields["S"] == "FATAL"
    assert fields["C"] in ("08P01", "28000", "28P01"), fields


def test_malformed_sasl_final(proxy: ProxyProcess) -> None:
    from executor.scram import ScramClient

    with raw(proxy) as c:
        c.send(pg.startup_message({"user": proxy.user, "database": "postgres"}))
        assert c.read_message()[0] == b"R"
        first = ScramClient(proxy.user, proxy.password).client_first()
        c.send(raw_message(b"p", b"SCRAM-SHA-256\x00" + _I32.pack(len(first)) + first))
        assert c.read_message()[0] == b"R"
        c.send(raw_message(b"p", b"c=biws,r=forged,p=AAAA"))
        fields = c.expect_error_then_close(5)
    assert fields["C"] in ("08P01", "28P01"), fields


# ------------------------------------------------------------------------------ slow clients


def _assert_dropped_within(c: RawClient, seconds: float) -> dict[str, str] | None:
    """The proxy ends this connection within ``seconds``; return the error it sent, if any."""
    t0 = time.monotonic()
    rest = c.expect_closed(seconds)
    elapsed = time.monotonic() - t0
    assert elapsed < seconds, f"still connected after {elapsed:.1f}s"
    if not rest:
        return None
    # What was left is whole messages; the last one should be the FATAL error.
    c.buf = rest
    msgs: list[tuple[bytes, bytes]] = []
    while c.buf:
        msgs.append(c.read_message(1))
    assert msgs[-1][0] == b"E", msgs
    return error_fields(msgs[-1][1])


def test_slow_loris_startup_dropped(tls_proxy: ProxyProcess) -> None:
    packet = startup_packet({"user": tls_proxy.user, "database": "postgres"})
    with RawClient(tls_proxy.host, tls_proxy.port) as c:
        t0 = time.monotonic()
        dropped = False
        for b in packet[:-1]:  # one byte every 0.2 s; never the last byte
            try:
                c.send(bytes([b]))
            except OSError:
                dropped = True
                break
            time.sleep(0.2)
            if time.monotonic() - t0 > STARTUP_TIMEOUT + 3:
                break
        fields = _assert_dropped_within(c, STARTUP_TIMEOUT + 3) if not dropped else None
    assert time.monotonic() - t0 < STARTUP_TIMEOUT + 4
    if fields is not None:
        assert fields["C"] == "08P01"


@pytest.mark.parametrize("stage", ["connect", "ssl-n", "ssl-s", "sasl"])
def test_stalled_startup_dropped(tls_proxy: ProxyProcess, stage: str) -> None:
    """A client that stops at any start-up stage is dropped after the start-up timeout."""
    with RawClient(tls_proxy.host, tls_proxy.port) as c:
        if stage == "ssl-n":
            c.send(struct.pack("!ii", 8, pg.GSSENC_REQUEST))
            assert c.recv_exact(1, 5) == b"N"
        elif stage == "ssl-s":
            c.send(struct.pack("!ii", 8, pg.SSL_REQUEST))
            assert c.recv_exact(1, 5) == b"S"  # ... and never starts the handshake
        elif stage == "sasl":
            c.send(pg.startup_message({"user": tls_proxy.user, "database": "postgres"}))
            assert c.read_message()[0] == b"R"
        fields = _assert_dropped_within(c, STARTUP_TIMEOUT + 3)
    if fields is not None:
        assert fields["C"] == "08P01"
        assert "start-up" in fields["M"]


def test_slow_but_complete_startup_works(tls_proxy: ProxyProcess) -> None:
    """Dribbling the start-up packet is fine as long as it finishes in time."""
    packet = pg.startup_message({"user": tls_proxy.user, "database": "postgres"})
    with RawClient(tls_proxy.host, tls_proxy.port) as c:
        for i in range(0, len(packet), 8):
            c.send(packet[i : i + 8])
            time.sleep(0.01)
        assert c.read_message()[0] == b"R"


def test_many_idle_connections_do_not_block_others(tls_proxy: ProxyProcess) -> None:
    """200 clients that connect and say nothing: others still log in, and all are dropped."""
    idle = [RawClient(tls_proxy.host, tls_proxy.port) for _ in range(200)]
    try:
        with psycopg.connect(tls_proxy.dsn(sslmode="disable"), connect_timeout=5) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        for c in idle:
            c.expect_closed(STARTUP_TIMEOUT + 5)
    finally:
        for c in idle:
            c.close()
