"""SCRAM-SHA-256: RFC 7677 vector, PostgreSQL-made verifiers, libpq and a real server."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import socket
import struct
import threading

import pytest

from executor.scram import (
    ScramAuthFailed,
    ScramClient,
    ScramError,
    ScramServer,
    ScramVerifier,
    format_verifier,
    make_verifier,
    parse_verifier,
    saslprep,
    verifier_for,
)

# RFC 7677 section 3.
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="

# Made by PostgreSQL 15 (CREATE ROLE ... PASSWORD, then SELECT rolpassword FROM pg_authid).
PG_VERIFIER_OROCHI = (
    "SCRAM-SHA-256$4096:fiL9aPH+VmrW8eEZXSiOOQ==$5tcTMzDtlo+59ff0xXafANxvdipyxr/OLWy9YMRJ9b0="
    ":Z3Z+oOM+wTlrpROhWbUnhnJu4EwplyjU3pqJT7z/fvo="
)
# Password 'pässwörd Ⅸ' (U+2168 ROMAN NUMERAL NINE): exercises SASLprep's NFKC step.
PG_VERIFIER_UNICODE = (
    "SCRAM-SHA-256$4096:SuO5cBKWh97B9Tb8hm+XyA==$kdtPzKI9EwhZm+Ml4p+3B477J42Szsu659h6vEJFxgo="
    ":+GqMnotQSpfxb/9jZA350SwV6wPlC1lf8mrCdScJNTw="
)


def exchange(server: ScramServer, client: ScramClient) -> None:
    server_first = server.client_first("SCRAM-SHA-256", client.client_first())
    server_final = server.client_final(client.server_first(server_first))
    client.server_final(server_final)


def test_rfc7677_vector_client() -> None:
    client = ScramClient("user", "pencil", nonce=RFC_CLIENT_NONCE)
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.server_first(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.server_final(RFC_SERVER_FINAL)


def test_rfc7677_vector_server() -> None:
    verifier = make_verifier("pencil", iterations=4096, salt=RFC_SALT)
    server = ScramServer(verifier, nonce=RFC_SERVER_NONCE)
    assert server.client_first("SCRAM-SHA-256", RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.client_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL


def test_round_trip_with_postgres_style_empty_username() -> None:
    server = ScramServer(make_verifier("s3cret"))
    client = ScramClient("", "s3cret")
    first = client.client_first()
    assert first.startswith(b"n,,n=,r=")
    server_final = server.client_final(
        client.server_first(server.client_first("SCRAM-SHA-256", first))
    )
    client.server_final(server_final)


def test_wrong_password_fails() -> None:
    server = ScramServer(make_verifier("right"))
    client = ScramClient("u", "wrong")
    first = server.client_first("SCRAM-SHA-256", client.client_first())
    with pytest.raises(ScramAuthFailed):
        server.client_final(client.server_first(first))


def test_unknown_user_runs_full_exchange_then_fails() -> None:
    server = ScramServer(None, username="ghost")
    client = ScramClient("ghost", "anything")
    first = server.client_first("SCRAM-SHA-256", client.client_first())
    assert b",s=" in first and b",i=4096" in first
    with pytest.raises(ScramAuthFailed):
        server.client_final(client.server_first(first))


def test_unknown_user_salt_is_stable_per_name() -> None:
    """A random salt per attempt would tell an attacker the user does not exist."""

    def salt_for(name: str) -> bytes:
        first = ScramServer(None, username=name).client_first("SCRAM-SHA-256", b"n,,n=,r=abc")
        return first.split(b",")[1]

    assert salt_for("ghost") == salt_for("ghost")
    assert salt_for("ghost") != salt_for("phantom")


def test_server_rejects_forged_signature_on_client() -> None:
    server = ScramServer(make_verifier("pw"))
    client = ScramClient("u", "pw")
    client.server_first(server.client_first("SCRAM-SHA-256", client.client_first()))
    with pytest.raises(ScramAuthFailed):
        client.server_final(b"v=" + base64.b64encode(b"\0" * 32))


def test_client_sees_server_error() -> None:
    client = ScramClient("u", "pw", nonce="abc")
    client.client_first()
    client.server_first(b"r=abcdef,s=c2FsdA==,i=4096")
    with pytest.raises(ScramAuthFailed):
        client.server_final(b"e=invalid-proof")


@pytest.mark.parametrize(
    ("mechanism", "data"),
    [
        ("SCRAM-SHA-256-PLUS", b"n,,n=,r=abc"),
        ("SCRAM-SHA-1", b"n,,n=,r=abc"),
        ("SCRAM-SHA-256", b"p=tls-server-end-point,,n=,r=abc"),
        ("SCRAM-SHA-256", b"x,,n=,r=abc"),
        ("SCRAM-SHA-256", b"n,a=admin,n=,r=abc"),
        ("SCRAM-SHA-256", b"n,,m=ext,n=,r=abc"),
        ("SCRAM-SHA-256", b"n,,r=abc"),
        ("SCRAM-SHA-256", b"n,,n=,x=abc"),
        ("SCRAM-SHA-256", b"n,,n=,r="),
        ("SCRAM-SHA-256", b"n,,n=,r=ab\x7fc"),
        ("SCRAM-SHA-256", b"n,,n=,r=abc,garbage"),
        ("SCRAM-SHA-256", b"\xff\xfe"),
        ("SCRAM-SHA-256", b""),
    ],
)
def test_malformed_client_first(mechanism: str, data: bytes) -> None:
    server = ScramServer(make_verifier("pw"))
    with pytest.raises(ScramError) as info:
        server.client_first(mechanism, data)
    assert not isinstance(info.value, ScramAuthFailed)


def test_y_flag_accepted_and_bound_in_final() -> None:
    """'y' = client could bind but thinks we can't; c= must then echo 'y,,'."""
    server = ScramServer(make_verifier("pw"), nonce="SRV")
    server.client_first("SCRAM-SHA-256", b"y,,n=,r=CLI")
    with pytest.raises(ScramError):
        server.client_final(b"c=biws,r=CLISRV,p=" + base64.b64encode(b"\0" * 32))


def _final_with(server_nonce: str = "SRV", **replace: str) -> bytes:
    fields = {"c": "biws", "r": "CLI" + server_nonce, "p": base64.b64encode(b"\0" * 32).decode()}
    fields.update(replace)
    return ",".join(f"{k}={v}" for k, v in fields.items() if v != "-").encode()


@pytest.mark.parametrize(
    "data",
    [
        _final_with(c="eSws"),  # channel binding header differs from client-first
        _final_with(r="CLIxxx"),  # nonce mismatch
        _final_with(p="-"),  # no proof
        _final_with(p="AAAA"),  # proof of the wrong length
        _final_with(p="not base64!"),
        _final_with(c="-"),
        b"\xff",
    ],
)
def test_malformed_client_final(data: bytes) -> None:
    server = ScramServer(make_verifier("pw"), nonce="SRV")
    server.client_first("SCRAM-SHA-256", b"n,,n=,r=CLI")
    with pytest.raises(ScramError) as info:
        server.client_final(data)
    assert not isinstance(info.value, ScramAuthFailed)


def test_messages_out_of_order() -> None:
    server = ScramServer(make_verifier("pw"))
    with pytest.raises(ScramError):
        server.client_final(b"c=biws,r=x,p=AAAA")
    client = ScramClient("u", "pw")
    with pytest.raises(ScramError):
        client.server_first(b"r=x,s=c2FsdA==,i=1")
    # A failed step poisons the exchange: no retrying within one attempt.
    server = ScramServer(make_verifier("pw"))
    with pytest.raises(ScramError):
        server.client_first("SCRAM-SHA-256", b"bogus")
    with pytest.raises(ScramError):
        server.client_first("SCRAM-SHA-256", b"n,,n=,r=abc")


@pytest.mark.parametrize(
    "data",
    [
        b"r=zzz-not-ours,s=c2FsdA==,i=4096",
        b"r=abc,s=c2FsdA==,i=4096",  # nonce not extended
        b"r=abcdef,s=c2FsdA==,i=0",
        b"r=abcdef,s=c2FsdA==,i=-1",
        b"r=abcdef,s=,i=4096",
        b"r=abcdef,i=4096",
        b"m=ext,r=abcdef,s=c2FsdA==,i=4096",
    ],
)
def test_client_rejects_malformed_server_first(data: bytes) -> None:
    client = ScramClient("u", "pw", nonce="abc")
    client.client_first()
    with pytest.raises(ScramError):
        client.server_first(data)


def test_verifier_string_round_trip() -> None:
    v = make_verifier("pw", iterations=10000)
    assert parse_verifier(format_verifier(v)) == v
    assert format_verifier(parse_verifier(PG_VERIFIER_OROCHI)) == PG_VERIFIER_OROCHI
    assert "stored_key" not in repr(v)


@pytest.mark.parametrize(
    "text",
    [
        "md5abc",
        "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 44 + ":" + "A" * 44,
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==",
    ],
)
def test_parse_verifier_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_verifier(text)


def test_postgres_made_verifiers_match_ours() -> None:
    for password, text in [("orochi", PG_VERIFIER_OROCHI), ("pässwörd Ⅸ", PG_VERIFIER_UNICODE)]:
        pg = parse_verifier(text)
        assert make_verifier(password, iterations=pg.iterations, salt=pg.salt) == pg
        exchange(ScramServer(pg), ScramClient("", password))
    # NFKC: the Roman numeral character and the letters "IX" are the same password.
    exchange(ScramServer(parse_verifier(PG_VERIFIER_UNICODE)), ScramClient("", "pässwörd IX"))


def test_make_verifier_against_independent_computation() -> None:
    """Recompute RFC 5802's formulas by hand, straight from hashlib/hmac."""
    salt = bytes(range(16))
    salted = hashlib.pbkdf2_hmac("sha256", b"orochi", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = [base64.b64encode(x).decode() for x in (salt, hashlib.sha256(client_key).digest())]
    expected = f"SCRAM-SHA-256$4096:{b64[0]}${b64[1]}:{base64.b64encode(server_key).decode()}"
    assert format_verifier(make_verifier("orochi", salt=salt)) == expected


def test_verifier_for() -> None:
    assert verifier_for(PG_VERIFIER_OROCHI) == parse_verifier(PG_VERIFIER_OROCHI)
    plain = verifier_for("orochi")
    assert plain == make_verifier("orochi", salt=plain.salt)
    # Like PostgreSQL: a string that merely starts like a verifier is a plaintext password.
    odd = verifier_for("SCRAM-SHA-256$oops")
    assert odd == make_verifier("SCRAM-SHA-256$oops", salt=odd.salt)
    with pytest.raises(ValueError):
        verifier_for("md5" + "0123456789abcdef" * 2)


def test_saslprep() -> None:
    assert saslprep("plain ascii\x07") == b"plain ascii\x07"  # ASCII untouched, like PG
    assert saslprep("a\u00a0b") == b"a b"  # non-ASCII space -> space
    assert saslprep("a\u00adb") == b"ab"  # soft hyphen maps to nothing
    assert saslprep("\u2168") == b"IX"  # NFKC
    assert saslprep("a\u0080b") == "a\u0080b".encode()  # prohibited -> raw password
    assert saslprep("\u00ad") == "\u00ad".encode()  # empty after mapping -> raw


# --------------------------------------------------------------------------- libpq as client


def _pg_message(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def _auth(code: int, data: bytes = b"") -> bytes:
    return _pg_message(b"R", struct.pack("!I", code) + data)


async def _read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await reader.readexactly(5)
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], await reader.readexactly(length - 4)


class FakePostgres:
    """Just enough of a PostgreSQL server to authenticate libpq with ScramServer."""

    def __init__(self, verifier: ScramVerifier | None) -> None:
        self.verifier = verifier
        self.errors: list[Exception] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # startup packet; answer SSL/GSS requests with 'N'
                (length,) = struct.unpack("!I", await reader.readexactly(4))
                body = await reader.readexactly(length - 4)
                if struct.unpack("!I", body[:4])[0] in (80877103, 80877104):
                    writer.write(b"N")
                    continue
                break
            server = ScramServer(self.verifier, username="postgres")
            writer.write(_auth(10, b"".join(m.encode() + b"\0" for m in server.MECHANISMS) + b"\0"))
            kind, body = await _read_message(reader)
            assert kind == b"p"
            mechanism, _, rest = body.partition(b"\0")
            (n,) = struct.unpack("!i", rest[:4])
            writer.write(_auth(11, server.client_first(mechanism.decode(), rest[4 : 4 + n])))
            kind, body = await _read_message(reader)
            try:
                final = server.client_final(body)
            except ScramAuthFailed:
                fields = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
                writer.write(_pg_message(b"E", fields))
                return
            writer.write(_auth(12, final) + _auth(0))
            for key, value in [(b"server_version", b"15.0"), (b"client_encoding", b"UTF8")]:
                writer.write(_pg_message(b"S", key + b"\0" + value + b"\0"))
            writer.write(_pg_message(b"K", struct.pack("!II", 1, 2)))
            writer.write(_pg_message(b"Z", b"I"))
            await writer.drain()
            await reader.read()  # until libpq sends Terminate and closes
        except Exception as exc:  # noqa: BLE001 - surfaced by the test
            self.errors.append(exc)
        finally:
            writer.close()


def _libpq_connect(verifier: ScramVerifier | None, password: str) -> FakePostgres:
    """Serve FakePostgres on a background loop and connect to it with psycopg (libpq)."""
    psycopg = pytest.importorskip("psycopg")
    fake = FakePostgres(verifier)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    handlers: list[asyncio.Task[None]] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        await fake.handle(reader, writer)

    async def shutdown(srv: asyncio.Server) -> None:
        srv.close()
        await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), 10)
        await srv.wait_closed()

    start = asyncio.start_server(on_connect, "127.0.0.1", 0)
    srv = asyncio.run_coroutine_threadsafe(start, loop).result(10)
    try:
        port = srv.sockets[0].getsockname()[1]
        conninfo = (
            f"host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=disable "
            "gssencmode=disable require_auth=scram-sha-256 connect_timeout=10"
        )
        with psycopg.connect(conninfo, password=password) as conn:
            assert conn.info.parameter_status("server_version") == "15.0"
    finally:
        asyncio.run_coroutine_threadsafe(shutdown(srv), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    return fake


def test_libpq_authenticates_against_scram_server() -> None:
    fake = _libpq_connect(make_verifier("orochi"), "orochi")
    assert not fake.errors


def test_libpq_wrong_password_rejected() -> None:
    psycopg = pytest.importorskip("psycopg")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _libpq_connect(make_verifier("orochi"), "nope")


# --------------------------------------------------------------------------- real PostgreSQL


def _recv_message(sock: socket.socket) -> tuple[bytes, bytes]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        return buf

    header = exactly(5)
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], exactly(length - 4)


def _auth_code(kind: bytes, body: bytes) -> int:
    assert kind == b"R", (kind, body)
    return struct.unpack("!I", body[:4])[0]


@pytest.fixture
def pg_node(request: pytest.FixtureRequest) -> object:
    try:
        cluster = request.getfixturevalue("cluster")
    except pytest.FixtureLookupError:
        pytest.skip("no `cluster` fixture in tests/conftest.py")
    return cluster.nodes[0]


def test_scram_client_against_real_postgres(pg_node: object) -> None:
    host, port = pg_node.host, pg_node.port  # type: ignore[attr-defined]
    with socket.create_connection((host, port), timeout=30) as sock:
        params = b"user\0postgres\0database\0postgres\0\0"
        sock.sendall(struct.pack("!II", 8 + len(params), 196608) + params)

        kind, body = _recv_message(sock)
        assert _auth_code(kind, body) == 10, "server did not ask for SASL"
        mechanisms = body[4:].split(b"\0")
        assert b"SCRAM-SHA-256" in mechanisms

        client = ScramClient("postgres", "orochi")
        first = client.client_first()
        payload = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first
        sock.sendall(_pg_message(b"p", payload))

        kind, body = _recv_message(sock)
        assert _auth_code(kind, body) == 11
        sock.sendall(_pg_message(b"p", client.server_first(body[4:])))

        kind, body = _recv_message(sock)
        assert _auth_code(kind, body) == 12
        client.server_final(body[4:])

        kind, body = _recv_message(sock)
        assert _auth_code(kind, body) == 0, "expected AuthenticationOk"
        sock.sendall(_pg_message(b"X", b""))


def test_postgres_stored_verifier_works_with_our_server(pg_node: object) -> None:
    """The superuser's rolpassword, as the node stores it, drives ScramServer."""
    psycopg = pytest.importorskip("psycopg")
    conninfo = (
        f"host={pg_node.host} port={pg_node.port} user=postgres "  # type: ignore[attr-defined]
        "dbname=postgres password=orochi sslmode=disable"
    )
    with psycopg.connect(conninfo) as conn:
        row = conn.execute(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'"
        ).fetchone()
    assert row is not None and row[0].startswith("SCRAM-SHA-256$")
    exchange(ScramServer(parse_verifier(row[0])), ScramClient("", "orochi"))
