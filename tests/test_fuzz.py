"""Fuzz the proxy with thousands of random and mutated protocol messages over many connections.

Why: the hand-written cases in ``test_bad_input.py`` cover the failures we thought of; this
covers the ones we did not. A deterministic ``random.Random`` (not hypothesis) drives it, because
the unit here is a whole connection against a real proxy process: shrinking would replay real
network conversations, and a fixed seed already makes every failure reproducible.

The oracle is the standard we hold, not a model of PostgreSQL:

* every byte the proxy sends frames as backend messages, and no answer is an internal error
  (``XX000``), and the proxy logs no traceback;
* afterwards the process is alive, an ordinary psycopg client works, the pool has given back
  every connection (in-use gauge 0) and the node holds no more client backends than the pool
  size (nothing leaked), and every pooled connection is clean: no leftover settings, prepared
  statements, temp tables, LISTENs, advisory locks, roles or open transactions.

The proxy and its node are this module's own (a 1-node LocalCluster), so the connection count
on the node is exact and a fuzz case that upsets the node cannot disturb other tests.
"""

from __future__ import annotations

import random
import struct
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg
import pytest
from conftest import pg_base_dir
from prometheus_client.parser import text_string_to_metric_families
from proxyproc import ProxyProcess, start_proxy
from rawpg import BadFraming, RawClient, ServerClosed, error_fields, raw_message

from executor import protocol as pg
from orochi_proxy.localcluster import LocalCluster

SEED = 0x0C0C41
POOL_SIZE = 12
CONCURRENCY = 24
MAX_MESSAGE_SIZE = 1 << 20  # small, so "huge length" mutations hit the limit quickly
#: (kind, number of connections); every connection sends one or many messages.
PLAN = (("raw_bytes", 400), ("startup", 400), ("typed", 400), ("extended", 500))
IDLE_READ = 0.25  # seconds of silence after which a fuzz connection stops reading

_I32 = struct.Struct("!i")

#: Statements the fuzzer builds valid messages from: harmless ones, errors, and ones that leave
#: session state behind (which the pool must reset before another client gets the connection).
SQL = (
    "SELECT 1",
    "SELECT $1::int + 1",
    "SELECT $1::text, $2::int",
    "SELECT generate_series(1, 50)",
    "SELECT repeat('x', 70000)",
    "SELECT 1/0",
    "SELEC broken syntax",
    "SELECT pg_sleep(0.01)",
    "SELECT orochi_catalog_version()",
    "SELECT * FROM citus_nodes",
    "SET search_path TO fuzz, public",
    "SET statement_timeout = '7s'",
    "SET application_name = 'fuzzed'",
    "SET ROLE pg_monitor",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "BEGIN; SELECT 1",
    "PREPARE fz AS SELECT 1",
    "LISTEN fuzz_channel",
    "CREATE TEMP TABLE IF NOT EXISTS fz_tmp (a int)",
    "SELECT pg_advisory_lock(4242)",
    "DECLARE fz_cur CURSOR WITH HOLD FOR SELECT 1",
    "COPY (SELECT 1) TO STDOUT",
    "COPY fz_tmp FROM STDIN",
    "",
)


@dataclass
class Outcome:
    """What one fuzz connection saw."""

    sqlstates: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    messages_sent: int = 0
    kind: str = ""
    seconds: float = 0.0


# ------------------------------------------------------------------------------ builders


def _rand_name(rng: random.Random) -> str:
    return rng.choice(["", "", "s1", "s2", "fz", "p" * rng.randint(1, 70)])


def _bind(rng: random.Random, stmt: str) -> bytes:
    n = rng.choice([0, 0, 1, 2, 3])
    params: list[bytes | None] = [
        rng.choice([b"1", b"42", b"abc", None, rng.randbytes(rng.randint(0, 8))]) for _ in range(n)
    ]
    fmts = rng.choice([[], [0], [1], [0] * n])
    return pg.encode_bind(
        pg.BindMsg(_rand_name(rng), stmt, fmts, params, rng.choice([[], [0], [1]]))
    )


def _valid_message(rng: random.Random) -> bytes:
    """One well-formed frontend message of the extended or simple protocol."""
    kind = rng.choice("PPBBDEESSCHQ")
    name = _rand_name(rng)
    if kind == "P":
        sql = rng.choice(SQL)
        oids = rng.choice([[], [], [23], [25, 23], [0]])
        return pg.parse_message(name, sql, oids)
    if kind == "B":
        return _bind(rng, name)
    if kind == "D":
        return pg.message(b"D", rng.choice([b"S", b"P"]) + pg.cstr(name))
    if kind == "E":
        return pg.message(b"E", pg.cstr(name) + _I32.pack(rng.choice([0, 0, 1, 5, -1])))
    if kind == "C":
        return pg.message(b"C", rng.choice([b"S", b"P"]) + pg.cstr(name))
    if kind == "H":
        return pg.FLUSH
    if kind == "Q":
        return pg.query(rng.choice(SQL))
    return pg.SYNC


def _mutate(rng: random.Random, msg: bytes) -> bytes:
    """Break a valid message in one of the ways real bugs and attackers do."""
    how = rng.randrange(8)
    if how == 0 and len(msg) > 1:  # flip bytes anywhere, header included
        b = bytearray(msg)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if how == 1:  # wrong length field, body unchanged
        return (
            msg[:1]
            + _I32.pack(rng.choice([-1, 0, 3, len(msg) + rng.randint(1, 50), 2**31 - 1]))
            + msg[5:]
        )
    if how == 2 and len(msg) > 5:  # truncated body, length fixed up to match
        body = msg[5 : 5 + rng.randrange(len(msg) - 5)]
        return msg[:1] + _I32.pack(len(body) + 4) + body
    if how == 3:  # junk appended inside the message
        body = msg[5:] + rng.randbytes(rng.randint(1, 20))
        return msg[:1] + _I32.pack(len(body) + 4) + body
    if how == 4:  # another type byte
        return bytes([rng.randrange(256)]) + msg[1:]
    if how == 5:  # huge but plausible length: over the server's limit
        return msg[:1] + _I32.pack(MAX_MESSAGE_SIZE + rng.randint(1, 1000)) + msg[5:]
    if how == 6:  # the message cut off in the middle (the rest never comes)
        return msg[: rng.randrange(1, len(msg) + 1)]
    return msg + msg  # duplicated


# ------------------------------------------------------------------------------ one connection


def _drain(c: RawClient, out: Outcome, until_marker: bool) -> None:
    """Read what the proxy says until EOF, silence, or our end marker."""
    seen_marker = False
    while True:
        try:
            mtype, payload = c.read_message(IDLE_READ)
        except (TimeoutError, ServerClosed):
            return
        except BadFraming as exc:
            out.problems.append(str(exc))
            return
        except OSError:
            return
        if mtype == b"E":
            fields = error_fields(payload)
            code = fields.get("C", "?")
            out.sqlstates[code] += 1
            if code == "XX000" or "C" not in fields:
                out.problems.append(f"internal/invalid error: {fields}")
        elif mtype == b"D" and payload.endswith(b"fuzz-end"):
            seen_marker = True
        elif mtype == b"Z" and seen_marker and until_marker:
            return


def _login(c: RawClient, proxy: ProxyProcess) -> bool:
    try:
        c.login(proxy.user, proxy.password, proxy.dbname)
        return True
    except (AssertionError, ServerClosed, TimeoutError, OSError):
        # A login can fail under load (53300 pool timeout) but must never crash the proxy.
        return False


def _send(c: RawClient, data: bytes, out: Outcome, n: int = 1) -> bool:
    try:
        c.send(data)
    except OSError:
        return False
    out.messages_sent += n
    return True


def fuzz_raw_bytes(rng: random.Random, proxy: ProxyProcess, out: Outcome) -> None:
    with RawClient(proxy.host, proxy.port, 5) as c:
        data = rng.randbytes(rng.randint(0, 300))
        if rng.random() < 0.3:  # random bytes that at least start like a length
            data = _I32.pack(rng.randint(-5, 12000)) + data
        for piece in (data[: len(data) // 2], data[len(data) // 2 :]):
            if piece and not _send(c, piece, out):
                return
        _drain(c, out, until_marker=False)


def fuzz_startup(rng: random.Random, proxy: ProxyProcess, out: Outcome) -> None:
    params = {"user": rng.choice([proxy.user, proxy.user, "nobody", ""]), "database": "postgres"}
    if rng.random() < 0.3:
        params[rng.choice(["options", "application_name", "_pq_.x", "search_path"])] = rng.choice(
            ["-c work_mem=64kB", "fz", "\u00e9t\u00e9", "-c nosuch=1", ""]
        )
    packet = pg.startup_message(params)
    if rng.random() < 0.8:
        how = rng.randrange(5)
        if how == 0:
            b = bytearray(packet)
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            packet = bytes(b)
        elif how == 1:
            packet = _I32.pack(rng.choice([0, 7, 8, 9, len(packet) + 5, 10_001, -3])) + packet[4:]
        elif how == 2:
            packet = packet[: rng.randrange(len(packet))]
        elif how == 3:
            packet = packet + rng.randbytes(rng.randint(1, 40))
        else:
            version = rng.choice([0, 2 << 16, (3 << 16) + 1, pg.CANCEL_REQUEST, pg.GSSENC_REQUEST])
            packet = packet[:4] + _I32.pack(version) + packet[8:]
    with RawClient(proxy.host, proxy.port, 5) as c:
        if rng.random() < 0.2:
            _send(c, struct.pack("!ii", 8, rng.choice([pg.SSL_REQUEST, pg.GSSENC_REQUEST])), out)
            try:
                answer = c.recv_exact(1, 5)  # one byte, not a message: this proxy has no TLS
            except (TimeoutError, ServerClosed):
                answer = b"(none)"
            if answer != b"N":
                out.problems.append(f"SSLRequest/GSSENCRequest answered {answer!r}")
                return
        _send(c, packet, out)
        if _is_encryption_request(packet):  # a mutation made it one: one byte, not a message
            try:
                answer = c.recv_exact(1, 2)
            except (TimeoutError, ServerClosed):
                answer = b"N"
            if answer != b"N":
                out.problems.append(f"mutated start-up {packet[:8]!r} answered {answer!r}")
                return
        if rng.random() < 0.3:  # and a SASL answer that makes no sense
            _send(c, raw_message(b"p", rng.randbytes(rng.randint(0, 60))), out)
        _drain(c, out, until_marker=False)


def _is_encryption_request(packet: bytes) -> bool:
    """Whether the proxy will answer ``packet`` with the single byte of an SSL/GSS request."""
    if len(packet) < 8:
        return False
    length, code = struct.unpack_from("!ii", packet)
    return code in (pg.SSL_REQUEST, pg.GSSENC_REQUEST) and 8 <= length <= len(packet)


def fuzz_typed(rng: random.Random, proxy: ProxyProcess, out: Outcome) -> None:
    """Log in properly, then random typed messages (random types, bodies and lengths)."""
    with RawClient(proxy.host, proxy.port, 10) as c:
        if not _login(c, proxy):
            return
        batch: list[bytes] = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.5:
                mtype = rng.choice(b"QPBDEHSCXdcfF")
            elif r < 0.6:
                mtype = rng.randrange(256)
            else:
                batch.append(_mutate(rng, _valid_message(rng)))
                continue
            body = rng.randbytes(rng.randint(0, 80))
            length = len(body) + 4 if rng.random() < 0.8 else rng.randint(-10, 200)
            batch.append(raw_message(bytes([mtype]), body, length))
        finish(rng, c, batch, out)


def fuzz_extended(rng: random.Random, proxy: ProxyProcess, out: Outcome) -> None:
    """Log in, then plausible Parse/Bind/Describe/Execute/Sync sequences with some junk."""
    with RawClient(proxy.host, proxy.port, 10) as c:
        if not _login(c, proxy):
            return
        batch: list[bytes] = []
        for _ in range(rng.randint(1, 6)):
            stmt = rng.choice(["", "", "s1", "fz"])
            seq = [
                pg.parse_message(stmt, rng.choice(SQL), rng.choice([[], [23], [25, 23]])),
                _bind(rng, stmt),
                pg.message(b"D", b"P\x00"),
                pg.message(b"E", b"\x00" + _I32.pack(rng.choice([0, 1]))),
                pg.SYNC,
            ]
            if rng.random() < 0.3:
                seq.insert(rng.randrange(len(seq)), _valid_message(rng))
            if rng.random() < 0.4:
                i = rng.randrange(len(seq))
                seq[i] = _mutate(rng, seq[i])
            if rng.random() < 0.2:
                seq.pop(rng.randrange(len(seq)))
            batch.extend(seq)
        finish(rng, c, batch, out)


def finish(rng: random.Random, c: RawClient, batch: list[bytes], out: Outcome) -> None:
    """Send the batch (whole or dribbled), maybe vanish at once, else read to the end marker."""
    marker = pg.SYNC + pg.query("SELECT 'fuzz-end'")
    if rng.random() < 0.5:
        if not _send(c, b"".join(batch), out, len(batch)):
            return
    else:
        for msg in batch:
            if not _send(c, msg, out):
                return
    if rng.random() < 0.25:
        return  # disconnect with answers in flight: the pool must cope
    _send(c, marker, out, 2)
    _drain(c, out, until_marker=True)
    if rng.random() < 0.5:
        _send(c, pg.TERMINATE, out)


FUZZERS: dict[str, Callable[[random.Random, ProxyProcess, Outcome], None]] = {
    "raw_bytes": fuzz_raw_bytes,
    "startup": fuzz_startup,
    "typed": fuzz_typed,
    "extended": fuzz_extended,
}


def _run_one(kind: str, i: int, proxy: ProxyProcess) -> Outcome:
    out = Outcome(kind=kind)
    t0 = time.monotonic()
    rng = random.Random(f"{SEED}:{kind}:{i}")  # str seeds are hashed with SHA-512: stable
    try:
        FUZZERS[kind](rng, proxy, out)
    except (OSError, TimeoutError):
        pass  # connection-level trouble on our side is not a finding; the proxy checks are
    out.seconds = time.monotonic() - t0
    return out


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def fuzz_env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalCluster, ProxyProcess]]:
    cluster = LocalCluster(pg_base_dir("fuzz"), 1)
    try:
        cluster.start()
        proxy = start_proxy(
            tmp_path_factory.mktemp("fuzz"),
            cluster,
            name="fuzz",
            server={"max_message_size": MAX_MESSAGE_SIZE, "startup_timeout": 3.0},
            backend={"pool_size": POOL_SIZE, "acquire_timeout": 20.0, "connect_timeout": 5.0},
        )
        try:
            yield cluster, proxy
        finally:
            proxy.stop()
    finally:
        cluster.destroy()


def _metrics(proxy: ProxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(
        f"http://{proxy.host}:{proxy.metrics_port}/metrics", timeout=5
    ) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _pool_gauge(proxy: ProxyProcess, name: str) -> float:
    return sum(v for (n, _), v in _metrics(proxy).items() if n == name)


def _node_client_backends(cluster: LocalCluster) -> int:
    with psycopg.connect(cluster.nodes[0].dsn(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE usename = 'postgres' "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


# ------------------------------------------------------------------------------ the test


def test_fuzz_protocol(fuzz_env: tuple[LocalCluster, ProxyProcess]) -> None:
    cluster, proxy = fuzz_env
    baseline = _node_client_backends(cluster)  # the catalog's own connections
    t0 = time.monotonic()
    jobs = [(kind, i) for kind, n in PLAN for i in range(n)]
    random.Random(SEED).shuffle(jobs)  # mix the kinds, so all run concurrently
    with ThreadPoolExecutor(CONCURRENCY) as ex:
        outcomes = list(ex.map(lambda j: _run_one(j[0], j[1], proxy), jobs))
    fuzz_seconds = time.monotonic() - t0

    sent = sum(o.messages_sent for o in outcomes)
    codes: Counter[str] = Counter()
    for o in outcomes:
        codes.update(o.sqlstates)
    problems = [p for o in outcomes for p in o.problems]
    print(
        f"\nfuzz: {len(jobs)} connections, {sent} messages in {fuzz_seconds:.1f}s; errors {dict(codes)}"
    )

    for kind, _ in PLAN:
        times = sorted(o.seconds for o in outcomes if o.kind == kind)
        print(f"  {kind}: median {times[len(times) // 2]:.2f}s max {times[-1]:.2f}s")
    assert sent >= 3000, f"the fuzzer sent only {sent} messages"
    assert not problems, f"{len(problems)} bad answers, e.g. {problems[:5]}"
    assert proxy.process.poll() is None, f"proxy died:\n{proxy.log_tail()}"
    log = proxy.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-6000:]

    # A normal client still works.
    with psycopg.connect(proxy.dsn(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 'alive'").fetchone() == ("alive",)

    # Every backend connection goes back to the pool (resets take a moment) ...
    deadline = time.monotonic() + 15
    while _pool_gauge(proxy, "orochi_backend_pool_connections_in_use") > 0:
        assert time.monotonic() < deadline, f"pool connections still in use: {_metrics(proxy)}"
        time.sleep(0.2)
    # ... and the node has no more client backends than the pool may hold.
    opened = _node_client_backends(cluster) - baseline
    assert opened <= POOL_SIZE, f"{opened} backends on the node for a pool of {POOL_SIZE}"
    assert opened == _pool_gauge(proxy, "orochi_backend_pool_connections_open")

    # Every pooled connection is clean: hold them all at once so each is inspected.
    conns = [
        psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) for _ in range(POOL_SIZE)
    ]
    try:
        for conn in conns:
            state = conn.execute(
                """
                SELECT current_setting('search_path'),
                       current_user::text,
                       (SELECT count(*) FROM pg_prepared_statements),
                       (SELECT count(*) FROM pg_cursors),
                       (SELECT count(*) FROM pg_listening_channels()),
                       (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
                       (SELECT count(*) FROM pg_locks
                         WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
                       (SELECT array_agg(name ORDER BY name) FROM pg_settings
                         WHERE source = 'session'),
                       txid_current_if_assigned()
                """
            ).fetchone()
            assert state == ('"$user", public', "postgres", 0, 0, 0, 0, 0, None, None), state
    finally:
        for conn in conns:
            conn.close()
