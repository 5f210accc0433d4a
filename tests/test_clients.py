"""Real clients through the proxy: psql, psycopg 3, asyncpg and pgbench.

Why these tests exist: the proxy's promise is that *any* Postgres client works through it, and
each client drives the protocol differently (psql: simple query and COPY; psycopg: extended
protocol with text or binary formats, pipelines, COPY, DECLARE cursors; asyncpg: named prepared
statements, binary codecs, portal suspension; pgbench: all three query modes under load). Every
test checks real values round-tripped, not just that nothing raised.

Statements that the proxy does not intercept pass through to the metadata node
(``cluster.nodes[0]``), so tables created here are plain tables there. Each test uses its own
table names (prefix ``clients_``) and drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from proxyproc import ProxyProcess, start_proxy
from psycopg import sql

from executor import protocol as pg
from executor.backend import connect_backend
from orochi_proxy.localcluster import LocalCluster

PSQL_TIMEOUT = 60


# ------------------------------------------------------------------------------------ helpers
def arun(coro: Any) -> Any:
    """Run one asyncio test body (the suite has no pytest-asyncio; a fresh loop per test)."""
    return asyncio.run(coro)


def pconnect(proxy: ProxyProcess, **kw: Any) -> psycopg.Connection[Any]:
    """A psycopg connection to the proxy; autocommit unless the test asks otherwise."""
    kw.setdefault("autocommit", True)
    dbname = kw.pop("dbname", proxy.dbname)
    return psycopg.connect(
        host=proxy.host,
        port=proxy.port,
        user=proxy.user,
        password=proxy.password,
        dbname=dbname,
        connect_timeout=10,
        **kw,
    )


async def aconnect(proxy: ProxyProcess, **kw: Any) -> asyncpg.Connection:
    """An asyncpg connection to the proxy."""
    return await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=proxy.user,
        password=proxy.password,
        database=kw.pop("database", proxy.dbname),
        timeout=10,
        **kw,
    )


def client_env(proxy: ProxyProcess) -> dict[str, str]:
    """Environment for libpq command-line tools: the password without putting it in argv."""
    env = dict(os.environ)
    env["PGPASSWORD"] = proxy.password
    env.pop("PGSERVICE", None)
    return env


def run_psql(
    proxy: ProxyProcess, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", proxy.dsn(), "-X", "--no-psqlrc", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=PSQL_TIMEOUT,
        env=client_env(proxy),
    )


def unique(prefix: str) -> str:
    """A table name no other test (or earlier run on the same cluster) uses."""
    return f"clients_{prefix}_{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def dropping(proxy: ProxyProcess, *tables: str) -> Iterator[None]:
    """Drop ``tables`` (through the proxy) after the block, whatever happened in it."""
    try:
        yield
    finally:
        with pconnect(proxy) as conn:
            for t in tables:
                conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(t)))


# ------------------------------------------------------------------------------------ psql
def test_psql_multi_statement_string(proxy: ProxyProcess) -> None:
    t = unique("psql")
    with dropping(proxy, t):
        r = run_psql(
            proxy,
            "-At",
            "-c",
            f"CREATE TABLE {t} (id int PRIMARY KEY, v text); "
            f"INSERT INTO {t} VALUES (1, 'one'), (2, 'two'); "
            f"SELECT v FROM {t} ORDER BY id; SELECT count(*) FROM {t}",
        )
        assert r.returncode == 0, r.stderr
        # psql 15 prints every result of a multi-statement string, in order.
        assert r.stdout.strip().splitlines() == ["CREATE TABLE", "INSERT 0 2", "one", "two", "2"]
        r = run_psql(proxy, "-At", "-c", f"SELECT string_agg(v, ',' ORDER BY id) FROM {t}")
        assert r.stdout.strip() == "one,two", r.stderr


def test_psql_describe_table(proxy: ProxyProcess) -> None:
    t = unique("desc")
    with dropping(proxy, t):
        r = run_psql(
            proxy,
            "-c",
            f"CREATE TABLE {t} (id bigint PRIMARY KEY, name text NOT NULL, at timestamptz)",
            "-c",
            f"\\d {t}",
        )
        assert r.returncode == 0, r.stderr
        assert f'Table "public.{t}"' in r.stdout
        lines = {ln.split("|")[0].strip(): ln for ln in r.stdout.splitlines() if "|" in ln}
        assert "bigint" in lines["id"] and "not null" in lines["id"]
        assert "text" in lines["name"] and "not null" in lines["name"]
        assert "timestamp with time zone" in lines["at"]
        assert f"{t}_pkey" in r.stdout


def test_psql_error_mid_script_continues(proxy: ProxyProcess) -> None:
    t = unique("script")
    script = f"""
CREATE TABLE {t} (id int PRIMARY KEY);
INSERT INTO {t} VALUES (1);
INSERT INTO {t} VALUES (1);
SELECT 1/0;
INSERT INTO {t} VALUES (2);
COPY {t} FROM STDIN;
10
20
\\.
SELECT citus_remove_node('clients-no-such-host', 1);
BEGIN;
INSERT INTO {t} VALUES (30);
SELECT nope;
INSERT INTO {t} VALUES (40);
ROLLBACK;
SELECT 'sum=' || sum(id) FROM {t};
"""
    with dropping(proxy, t):
        r = run_psql(proxy, "-At", "-v", "ON_ERROR_STOP=0", stdin=script)
        assert r.returncode == 0, r.stderr
        assert "duplicate key value violates unique constraint" in r.stderr
        assert "division by zero" in r.stderr
        assert "is not in the cluster" in r.stderr  # answered by the proxy, script went on
        assert 'column "nope" does not exist' in r.stderr
        assert "current transaction is aborted" in r.stderr
        assert "sum=33" in r.stdout.splitlines()
        # With ON_ERROR_STOP=1 the script stops at the first error (exit code 3).
        r = run_psql(
            proxy,
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            stdin=f"SELECT 1/0;\nINSERT INTO {t} VALUES (9);\n",
        )
        assert r.returncode == 3
        r = run_psql(proxy, "-At", "-c", f"SELECT count(*) FROM {t} WHERE id = 9")
        assert r.stdout.strip() == "0"


def test_psql_copy_in_and_out(proxy: ProxyProcess, tmp_path: Path) -> None:
    t = unique("pcopy")
    src = tmp_path / "in.csv"
    rows = [
        (i, f"name {i}, with comma", f"line\n{i}" if i % 7 == 0 else f"v{i}") for i in range(1, 501)
    ]
    with src.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = tmp_path / "out.csv"
    with dropping(proxy, t):
        r = run_psql(
            proxy,
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            f"CREATE TABLE {t} (id int, a text, b text)",
            "-c",
            f"\\copy {t} FROM '{src}' WITH (FORMAT csv)",
            "-c",
            f"\\copy (SELECT * FROM {t} ORDER BY id) TO '{out}' WITH (FORMAT csv)",
        )
        assert r.returncode == 0, r.stderr
        assert "COPY 500" in r.stdout

        with out.open(newline="") as f:
            back = [(int(a), b, c) for a, b, c in csv.reader(f)]
        assert back == rows


# ------------------------------------------------------------------------------------ psycopg
def test_psycopg_simple_and_parameters(proxy: ProxyProcess) -> None:
    with pconnect(proxy) as conn:
        assert conn.execute("SELECT 1 + 1").fetchone() == (2,)
        # Server-side binding: the values travel as Bind parameters, not in the SQL text.
        row = conn.execute(
            "SELECT %s::int * 2, upper(%s), %s::int IS NULL, %s::text[]",
            (21, "it's", None, ["a", "b'c"]),
        ).fetchone()
        assert row == (42, "IT'S", True, ["a", "b'c"])
        cur = conn.execute(
            "SELECT g, md5(g::text) FROM generate_series(1, %s) g WHERE g %% %s = 0", (1000, 7)
        )
        rows = cur.fetchall()
        assert len(rows) == 142 and rows[0][0] == 7 and rows[-1][0] == 994
        assert cur.rowcount == 142
        # Multiple statements in one simple query (no parameters => simple protocol).
        cur = conn.execute("SELECT 'a'; SELECT 'b'")
        assert cur.fetchone() == ("a",)
        assert cur.nextset() and cur.fetchone() == ("b",)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM clients_no_such_table WHERE x = %s", (1,))
        assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)


def test_multi_statement_query_is_one_implicit_transaction(proxy: ProxyProcess) -> None:
    """PostgreSQL runs a Query's statements in one implicit transaction; an error undoes all.

    The texts mention ``citus_nodes``, so the proxy parses and runs them itself; it must still
    keep that atomicity, also with comments at statement ends.
    """
    t = unique("implicit")
    with dropping(proxy, t), pconnect(proxy) as conn:
        conn.execute(f"CREATE TABLE {t} (a int)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(
                f"INSERT INTO {t} VALUES (1) -- one\n; "
                "SELECT count(*) FROM pg_class WHERE relname = 'citus_nodes' -- two\n; "
                f"INSERT INTO {t} VALUES (2); SELECT 1/0"
            )
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        with pytest.raises(psycopg.errors.UndefinedColumn):
            conn.execute(f"INSERT INTO {t} VALUES (3); SELECT nope FROM citus_nodes")
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        cur = conn.execute(f"INSERT INTO {t} VALUES (4); SELECT count(*) FROM citus_nodes -- end")
        assert cur.statusmessage == "INSERT 0 1"
        assert cur.nextset() and cur.fetchone()[0] >= 0
        assert conn.execute(f"SELECT array_agg(a) FROM {t}").fetchone() == ([4],)


@pytest.mark.xfail(
    strict=True,
    reason="admin functions run outside the client's transaction: a Query mixing plain "
    "statements and an admin call is split at the admin call, so an error there cannot "
    "roll back the statements before it (needs admin calls inside the node's transaction)",
)
def test_admin_error_rolls_back_the_implicit_transaction(proxy: ProxyProcess) -> None:
    t = unique("implicit_admin")
    with dropping(proxy, t), pconnect(proxy) as conn:
        conn.execute(f"CREATE TABLE {t} (a int)")
        with pytest.raises(psycopg.Error):
            conn.execute(
                f"INSERT INTO {t} VALUES (1); SELECT citus_remove_node('clients-no-such-host', 1)"
            )
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)


def test_psycopg_binary_roundtrip(proxy: ProxyProcess) -> None:
    t = unique("bin")
    values = (
        -(2**62),
        Decimal("-12345678901234567890.000000000123"),
        "unicode ✓ text with 'quotes' and \\ backslash",
        dt.datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=dt.UTC),
        bytes(range(256)) * 3,
        [1, -2, None, 2**31 - 1],
        [["x", "y"], ["z", None]],
        {"k": [1, 2.5, None, True], "nested": {"s": "é"}},
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
    )
    with dropping(proxy, t), pconnect(proxy) as conn:
        conn.execute(
            f"CREATE TABLE {t} (i int8, n numeric, s text, ts timestamptz, b bytea, "
            "ia int4[], ta text[][], j jsonb, u uuid)"
        )
        cur = conn.cursor(binary=True)
        cur.execute(
            f"INSERT INTO {t} VALUES (%b, %b, %b, %b, %b, %b::int4[], %b, %b, %b)",
            (*values[:7], psycopg.types.json.Jsonb(values[7]), values[8]),
        )
        assert cur.rowcount == 1
        cur.execute(f"SELECT i, n, s, ts, b, ia, ta, j, u FROM {t}")
        assert cur.pgresult is not None and cur.pgresult.fformat(0) == 1  # really binary
        row = cur.fetchone()
        assert row is not None
        assert row[:3] == values[:3]
        assert row[3] == values[3]
        assert row[4] == values[4]
        assert row[5:] == values[5:]
        # The same values in text format, parameters bound as text.
        tcur = conn.cursor(binary=False)
        tcur.execute(f"SELECT i, n, s, ts, b, ia, ta, j, u FROM {t} WHERE u = %t", (values[8],))
        assert tcur.pgresult is not None and tcur.pgresult.fformat(0) == 0
        assert tcur.fetchone() == row


def test_psycopg_pipeline_error_skips_to_sync(proxy: ProxyProcess) -> None:
    t = unique("pipe")
    with dropping(proxy, t), pconnect(proxy) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        with conn.pipeline() as p:
            # A first batch that succeeds: many statements queued before one Sync.
            curs = [
                conn.execute(f"INSERT INTO {t} VALUES (%s, %s) RETURNING id", (i, f"v{i}"))
                for i in range(50)
            ]
            p.sync()
            assert [c.fetchone() for c in curs] == [(i,) for i in range(50)]

            # Second batch: ok, ok, error, then statements PostgreSQL skips until the Sync.
            # psycopg reads whatever results have arrived on every call, so the error may
            # surface at any later execute() or at sync(): collect where it shows up.
            errors: list[type[Exception]] = []

            def attempt(query: str, params: tuple[Any, ...]) -> psycopg.Cursor[Any] | None:
                try:
                    return conn.execute(query, params)
                except psycopg.Error as exc:
                    errors.append(type(exc))
                    return None

            attempt(f"INSERT INTO {t} VALUES (%s, 'batch2')", (100,))
            c_ok2 = attempt("SELECT %s::int + 1", (1,))
            attempt(f"INSERT INTO {t} VALUES (%s, 'dup')", (1,))
            c_after = [
                attempt(f"INSERT INTO {t} VALUES (%s, 'skipped')", (200 + i,)) for i in range(10)
            ]
            try:
                p.sync()
            except psycopg.Error as exc:
                errors.append(type(exc))
            assert errors[0] is psycopg.errors.UniqueViolation, errors
            assert set(errors[1:]) <= {psycopg.errors.PipelineAborted}, errors
            assert c_ok2 is not None and c_ok2.fetchone() == (2,)  # answered before the error
            for c in c_after:
                if c is None:
                    continue  # psycopg already knew the pipeline was aborted
                # Skipped by the node: no result at all, exactly as psycopg sees it without a proxy.
                assert c.pgresult is None
                with pytest.raises(psycopg.ProgrammingError, match="no result available"):
                    c.fetchone()

            # After the Sync the pipeline works again.
            c_next = conn.execute(f"SELECT count(*) FROM {t}")
            p.sync()
            # The implicit transaction of batch 2 was rolled back as a whole (row 100 too).
            assert c_next.fetchone() == (50,)
        assert conn.execute(f"SELECT count(*) FROM {t} WHERE id >= 100").fetchone() == (0,)
        assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


def test_psycopg_pipeline_in_transaction(proxy: ProxyProcess) -> None:
    t = unique("pipetx")
    with dropping(proxy, t), pconnect(proxy, autocommit=False) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        conn.commit()
        with conn.pipeline():
            for i in range(100):
                conn.execute(f"INSERT INTO {t} VALUES (%s)", (i,))
        conn.commit()
        assert conn.execute(f"SELECT count(*), sum(id) FROM {t}").fetchone() == (100, 4950)
        conn.rollback()
        # An error in a pipelined transaction aborts the transaction; rollback recovers.
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute(f"INSERT INTO {t} VALUES (%s)", (1000,))
            conn.execute(f"INSERT INTO {t} VALUES (%s)", (5,))
            conn.execute(f"INSERT INTO {t} VALUES (%s)", (1001,))
        conn.rollback()
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (100,)
        conn.rollback()


def test_psycopg_transactions_and_savepoints(proxy: ProxyProcess) -> None:
    t = unique("tx")
    with dropping(proxy, t), pconnect(proxy, autocommit=False) as conn:
        conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY)")
        conn.commit()
        conn.execute(f"INSERT INTO {t} VALUES (1)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.rollback()
        conn.execute(f"INSERT INTO {t} VALUES (2)")
        conn.commit()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with conn.transaction():
            conn.execute(f"INSERT INTO {t} VALUES (3)")
            with pytest.raises(psycopg.errors.UniqueViolation), conn.transaction():  # savepoint
                conn.execute(f"INSERT INTO {t} VALUES (4)")
                conn.execute(f"INSERT INTO {t} VALUES (2)")
            with conn.transaction():
                conn.execute(f"INSERT INTO {t} VALUES (5)")
        assert conn.execute(f"SELECT array_agg(id ORDER BY id) FROM {t}").fetchone() == ([2, 3, 5],)
        conn.commit()
        # An error outside a savepoint fails the transaction until ROLLBACK.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 'ok'").fetchone() == ("ok",)
        conn.rollback()


def test_psycopg_named_prepared_statements(proxy: ProxyProcess) -> None:
    with pconnect(proxy, prepare_threshold=0) as conn:
        for i in range(200):
            row = conn.execute("SELECT %s::int * 3, %s::text || 'x'", (i, str(i))).fetchone()
            assert row == (i * 3, f"{i}x")
        # psycopg really prepared it on the server (a named statement, reused).
        n = conn.execute(
            "SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE %s",
            ("SELECT $1::int * 3%",),
        ).fetchone()
        assert n == (1,)
    with pconnect(proxy) as conn:
        cur = conn.cursor()
        for i in range(100):
            cur.execute("SELECT %s::bigint + 1", (i,), prepare=True)
            assert cur.fetchone() == (i + 1,)
        # A prepared statement whose execution fails does not break the next ones.
        for divisor in (1, 0, 2):
            if divisor == 0:
                with pytest.raises(psycopg.errors.DivisionByZero):
                    cur.execute("SELECT 10 / %s::int", (divisor,), prepare=True)
            else:
                cur.execute("SELECT 10 / %s::int", (divisor,), prepare=True)
                assert cur.fetchone() == (10 // divisor,)


# Run by a separate interpreter with psycopg's pure-Python implementation, which uses the
# system's libpq (15 on Debian 12): before libpq 17 psycopg evicts prepared statements from its
# cache with a DEALLOCATE statement instead of a protocol-level Close.
_EVICTION_SCRIPT = """
import sys, psycopg
assert psycopg.pq.__impl__ == "python", psycopg.pq.__impl__
with psycopg.connect(sys.argv[1], autocommit=True, prepare_threshold=0) as conn:
    conn.prepared_max = 2
    out = []
    for round in range(3):
        out.append(conn.execute("SELECT orochi_catalog_version()").fetchone()[0] > 0)
        for i in range(3):  # pushes the admin call's statement out of psycopg's cache
            out.append(conn.execute("SELECT %s::int + " + str(i), (i,)).fetchone()[0])
    conn.execute("DEALLOCATE ALL")
    out.append(conn.execute("SELECT orochi_catalog_version()").fetchone()[0] > 0)
    print(out)
"""


def test_prepared_statement_eviction_with_deallocate(proxy: ProxyProcess) -> None:
    """DEALLOCATE of statements the proxy answers itself (admin calls) must not reach the node."""
    env = {**client_env(proxy), "PSYCOPG_IMPL": "python"}
    r = subprocess.run(
        [sys.executable, "-c", _EVICTION_SCRIPT, proxy.dsn()],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str([True, 0, 2, 4] * 3 + [True])

    async def body() -> None:
        conn = await aconnect(proxy)
        try:
            stmt = await conn.prepare("SELECT orochi_catalog_version()")
            version = await stmt.fetchval()
            assert isinstance(version, int)
            name = stmt._state.name  # noqa: SLF001 - asyncpg names statements itself
            assert await conn.execute(f'DEALLOCATE "{name}"') == "DEALLOCATE"
            with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError):
                await stmt.fetchval()
            # Deallocating a name nobody prepared is the node's error, as without the proxy.
            with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError):
                await conn.execute("DEALLOCATE clients_never_prepared")
            again = await conn.prepare("SELECT orochi_catalog_version()")
            assert await again.fetchval() == version
            assert await conn.execute("DISCARD ALL") == "DISCARD ALL"
            with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError):
                await again.fetchval()
        finally:
            await conn.close()

    arun(body())


def test_psycopg_copy_in_and_out(proxy: ProxyProcess) -> None:
    t = unique("copy")
    rows = [(i, f"row {i}\twith tab", None if i % 10 == 0 else i * 1.5) for i in range(2000)]
    with dropping(proxy, t), pconnect(proxy) as conn:
        conn.execute(f"CREATE TABLE {t} (id int, s text, f float8)")
        with conn.cursor() as cur:
            with cur.copy(f"COPY {t} (id, s, f) FROM STDIN") as cp:
                for r in rows:
                    cp.write_row(r)
            assert cur.rowcount == 2000
            with cur.copy(f"COPY (SELECT * FROM {t} ORDER BY id) TO STDOUT") as cp:
                back = [(int(a), b, None if c is None else float(c)) for a, b, c in cp.rows()]
            assert back == rows
            # Binary COPY both ways.
            with cur.copy(f"COPY {t} FROM STDIN (FORMAT BINARY)") as cp:
                cp.set_types(["int4", "text", "float8"])
                cp.write_row((5000, "binary", 2.25))
            with cur.copy(
                f"COPY (SELECT id, s, f FROM {t} WHERE id = 5000) TO STDOUT (FORMAT BINARY)"
            ) as cp:
                cp.set_types(["int4", "text", "float8"])
                assert list(cp.rows()) == [(5000, "binary", 2.25)]
            # COPY with a bad row fails with the node's error; the connection stays usable.
            with pytest.raises(psycopg.errors.InvalidTextRepresentation):
                with cur.copy(f"COPY {t} (id) FROM STDIN") as cp:
                    cp.write(b"1\nnot-a-number\n")
            assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (2001,)
            # COPY with parameters goes through the extended protocol.
            with cur.copy(
                sql.SQL("COPY (SELECT id FROM {} WHERE id < {}) TO STDOUT").format(
                    sql.Identifier(t), sql.Literal(3)
                )
            ) as cp:
                assert sorted(int(r[0]) for r in cp.rows()) == [0, 1, 2]
        assert conn.execute("SELECT %s::int", (1,)).fetchone() == (1,)


def test_psycopg_copy_in_pipeline_and_transaction(proxy: ProxyProcess) -> None:
    """COPY inside an explicit transaction, followed by extended-protocol statements."""
    t = unique("copytx")
    with dropping(proxy, t), pconnect(proxy, autocommit=False) as conn:
        conn.execute(f"CREATE TABLE {t} (id int)")
        with conn.cursor() as cur, cur.copy(f"COPY {t} FROM STDIN") as cp:
            for i in range(10):
                cp.write_row((i,))
        assert conn.execute(f"SELECT sum(id) FROM {t} WHERE id > %s", (0,)).fetchone() == (45,)
        conn.rollback()
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename = %s", (t,)
        ).fetchone() == (0,)
        conn.rollback()


class LibpqCaller:
    """Run blocking libpq calls with a deadline, so a hung proxy fails the test, not the run.

    After a hang the connection is still in use by the stuck thread: ``finish()`` on it then
    would abort the interpreter, so callers check ``hung`` first.
    """

    def __init__(self, timeout: float = 15.0) -> None:
        self.timeout = timeout
        self.hung = False

    def __call__(self, fn: Any) -> Any:
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                box["error"] = exc

        th = threading.Thread(target=target, daemon=True)
        th.start()
        th.join(self.timeout)
        if th.is_alive():
            self.hung = True
            raise AssertionError(f"no answer within {self.timeout}s (proxy hung)")
        if "error" in box:
            raise box["error"]
        return box["value"]


def test_libpq_extended_protocol_copy(proxy: ProxyProcess) -> None:
    """COPY FROM STDIN through PQexecParams (extended protocol), as lib/pq and others send it.

    libpq sends Parse/Bind/Describe/Execute/Sync, then after CopyDone another Sync; the node
    ignores Syncs while in COPY mode, so only one ReadyForQuery comes back. The proxy must not
    wait for a second one: statements it answers itself (admin views) would then hang.
    """
    t = unique("xcopy")
    pq = psycopg.pq
    call = LibpqCaller()
    with dropping(proxy, t):
        pgc = pq.PGconn.connect(proxy.dsn().encode())
        try:
            assert pgc.status == pq.ConnStatus.OK, pgc.get_error_message()
            assert (
                pgc.exec_(f"CREATE TABLE {t} (a int)".encode()).status == pq.ExecStatus.COMMAND_OK
            )
            for attempt in range(2):
                res = pgc.exec_params(f"COPY {t} FROM STDIN".encode(), [])
                assert res.status == pq.ExecStatus.COPY_IN
                if attempt == 0:
                    pgc.put_copy_data(b"1\n2\n3\n")
                else:
                    pgc.put_copy_data(b"4\nnot-a-number\n")  # fails on the node
                pgc.put_copy_end()
                res = call(pgc.get_result)
                if attempt == 0:
                    assert res.status == pq.ExecStatus.COMMAND_OK and res.command_tuples == 3
                else:
                    assert res.status == pq.ExecStatus.FATAL_ERROR
                    assert res.error_field(pq.DiagnosticField.SQLSTATE) == b"22P02"
                assert call(pgc.get_result) is None
                res = call(lambda: pgc.exec_(f"SELECT sum(a) FROM {t}".encode()))
                assert res.get_value(0, 0) == b"6"
                # A statement the proxy answers itself must not wait for a stray Sync answer.
                res = call(lambda: pgc.exec_(b"SELECT count(*) >= 0 FROM citus_nodes"))
                assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
                assert res.get_value(0, 0) == b"t"
                res = call(lambda: pgc.exec_params(b"SELECT $1::int + 1", [b"41"]))
                assert res.get_value(0, 0) == b"42"
        finally:
            if not call.hung:
                pgc.finish()


def test_psycopg_server_side_cursor(proxy: ProxyProcess) -> None:
    with pconnect(proxy, autocommit=False) as conn:
        with conn.cursor(name="clients_ssc") as cur:
            cur.itersize = 100
            cur.execute("SELECT g, g * g FROM generate_series(1, %s) g ORDER BY g", (1050,))
            first = cur.fetchmany(10)
            assert first == [(g, g * g) for g in range(1, 11)]
            assert cur.fetchone() == (11, 121)
            rest = list(cur)
            assert len(rest) == 1039 and rest[-1] == (1050, 1050 * 1050)
        conn.commit()
        # A scrollable cursor moved backwards.
        with conn.cursor(name="clients_scroll", scrollable=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 20) g")
            assert cur.fetchmany(5) == [(1,), (2,), (3,), (4,), (5,)]
            cur.scroll(-3)
            assert cur.fetchone() == (3,)
        conn.commit()


def test_psycopg_notices(proxy: ProxyProcess) -> None:
    seen: list[tuple[str, str]] = []
    with pconnect(proxy) as conn:
        conn.add_notice_handler(
            lambda d: seen.append((d.severity_nonlocalized or "", d.message_primary or ""))
        )
        conn.execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
        conn.execute("SELECT %s::int", (1,))  # through the extended protocol as well
        conn.execute("DO $$ BEGIN RAISE NOTICE 'second'; END $$")
        assert seen == [("NOTICE", "hello 42"), ("WARNING", "careful"), ("NOTICE", "second")]


def test_psycopg_listen_notify(proxy: ProxyProcess) -> None:
    channel = f"clients_ch_{uuid.uuid4().hex[:6]}"
    with pconnect(proxy) as listener, pconnect(proxy) as sender:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        sender.execute("SELECT pg_notify(%s, %s)", (channel, "payload-1"))
        sender.execute(sql.SQL("NOTIFY {}, 'payload-2'").format(sql.Identifier(channel)))
        got = [(n.channel, n.payload) for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == [(channel, "payload-1"), (channel, "payload-2")]
        # A notification arriving while the listener is idle (no query running).
        pid = listener.info.backend_pid

        def later() -> None:
            time.sleep(0.3)
            sender.execute("SELECT pg_notify(%s, %s)", (channel, "idle"))

        th = threading.Thread(target=later)
        th.start()
        got2 = [(n.payload, n.pid != pid) for n in listener.notifies(timeout=5, stop_after=1)]
        th.join()
        assert got2 == [("idle", True)]


# ------------------------------------------------------------------------------------ asyncpg
def test_asyncpg_fetch_with_parameters(proxy: ProxyProcess) -> None:
    async def body() -> None:
        conn = await aconnect(proxy)
        try:
            rows = await conn.fetch(
                "SELECT g, g::text AS s FROM generate_series($1::int, $2::int) g", 1, 5
            )
            assert [(r["g"], r["s"]) for r in rows] == [(i, str(i)) for i in range(1, 6)]
            row = await conn.fetchrow(
                "SELECT $1::text || $2::text AS c, $3::int8 AS n", "a", "b", 2**40
            )
            assert row is not None and row["c"] == "ab" and row["n"] == 2**40
            assert await conn.fetchval("SELECT $1::int IS NULL", None) is True
            assert await conn.fetchval("SELECT 1 WHERE false") is None
            status = await conn.execute(
                "CREATE TEMP TABLE clients_tmp (a int); INSERT INTO clients_tmp VALUES (1), (2)"
            )
            assert status == "INSERT 0 2"
            await conn.executemany(
                "INSERT INTO clients_tmp VALUES ($1)", [(i,) for i in range(3, 53)]
            )
            assert await conn.fetchval("SELECT sum(a) FROM clients_tmp") == sum(range(1, 53))
        finally:
            await conn.close()

    arun(body())


def test_asyncpg_prepared_statement_reuse(proxy: ProxyProcess) -> None:
    async def body() -> None:
        conn = await aconnect(proxy)
        try:
            stmt = await conn.prepare("SELECT $1::int8 * $2::int8 AS p, $3::text AS t")
            assert [a.name for a in stmt.get_attributes()] == ["p", "t"]
            assert [p.name for p in stmt.get_parameters()] == ["int8", "int8", "text"]
            for i in range(300):
                assert await stmt.fetchrow(i, 3, f"s{i}") == (i * 3, f"s{i}")
            assert await stmt.fetchval(7, 6, "x") == 42
            # Statement cache: the same text through fetchval many times.
            for i in range(100):
                assert await conn.fetchval("SELECT $1::int + 100", i) == i + 100
            # An error executing a prepared statement leaves it usable.
            div = await conn.prepare("SELECT 100 / $1::int")
            with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
                await div.fetchval(0)
            assert await div.fetchval(4) == 25
        finally:
            await conn.close()

    arun(body())


def test_asyncpg_binary_codecs(proxy: ProxyProcess) -> None:
    t = unique("acodec")
    values = (
        -(2**63),
        Decimal("3.14159265358979323846264338327950288"),
        -1.5e300,
        "päss ✓ 'word'",
        True,
        dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
        dt.date(2000, 2, 29),
        dt.timedelta(days=-3, seconds=3661, microseconds=5),
        uuid.uuid4(),
        {"a": [1, "b", None], "c": {"d": 1.5}},
        b"\x00\xff binary \x01" * 10,
        [[1, 2], [3, None]],
    )

    async def body() -> None:
        conn = await aconnect(proxy)
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        try:
            await conn.execute(
                f"CREATE TABLE {t} (i int8, n numeric, f float8, s text, b bool, ts timestamptz, "
                "d date, iv interval, u uuid, j jsonb, by bytea, ia int4[])"
            )
            await conn.execute(
                f"INSERT INTO {t} VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)", *values
            )
            row = await conn.fetchrow(f"SELECT * FROM {t}")
            assert tuple(row) == values
            # And straight through parameters without a table.
            echo = await conn.fetchrow(
                "SELECT $1::int8, $2::numeric, $3::float8, $4::text, $5::bool, $6::timestamptz, "
                "$7::date, $8::interval, $9::uuid, $10::jsonb, $11::bytea, $12::int4[]",
                *values,
            )
            assert tuple(echo) == values
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {t}")
            await conn.close()

    arun(body())


def test_asyncpg_copy(proxy: ProxyProcess) -> None:
    t = unique("acopy")
    records = [
        (
            i,
            f"name-{i}",
            Decimal(i) / 4,
            dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=i),
        )
        for i in range(3000)
    ]

    async def body() -> None:
        conn = await aconnect(proxy)
        try:
            await conn.execute(
                f"CREATE TABLE {t} (id int, name text, amount numeric, at timestamptz)"
            )
            status = await conn.copy_records_to_table(t, records=records)
            assert status == "COPY 3000"
            assert await conn.fetchval(f"SELECT sum(amount) FROM {t}") == sum(r[2] for r in records)
            buf = bytearray()

            async def sink(chunk: bytes) -> None:
                buf.extend(chunk)

            status = await conn.copy_from_query(
                f"SELECT id, name FROM {t} WHERE id < $1 ORDER BY id",
                100,
                output=sink,
                format="csv",
            )
            assert status == "COPY 100"
            lines = bytes(buf).decode().splitlines()
            assert lines == [f"{i},name-{i}" for i in range(100)]
            # Whole-table copy out and back in (the text format the node produced).
            buf.clear()
            await conn.copy_from_table(t, output=sink)
            assert bytes(buf).count(b"\n") == 3000
            await conn.execute(f"TRUNCATE {t}")

            await conn.copy_to_table(t, source=io.BytesIO(bytes(buf)))
            assert await conn.fetchval(f"SELECT count(*) FROM {t}") == 3000
            assert await conn.fetchval("SELECT $1::int", 5) == 5
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {t}")
            await conn.close()

    arun(body())


def test_asyncpg_cursor_portal_suspension(proxy: ProxyProcess) -> None:
    async def body() -> None:
        conn = await aconnect(proxy)
        try:
            async with conn.transaction():
                got = [
                    r[0]
                    async for r in conn.cursor(
                        "SELECT g FROM generate_series(1, $1) g", 1000, prefetch=37
                    )
                ]
                assert got == list(range(1, 1001))
                cur = await conn.cursor(
                    "SELECT g, repeat('x', g % 50) FROM generate_series(1, 500) g ORDER BY g"
                )
                a = await cur.fetch(10)
                assert [r[0] for r in a] == list(range(1, 11))
                assert (await cur.fetchrow())[0] == 11
                await cur.forward(100)
                b = await cur.fetch(5)
                assert [r[0] for r in b] == [112, 113, 114, 115, 116]
                rest = await cur.fetch(1000)
                assert len(rest) == 384 and rest[-1][0] == 500
                assert await cur.fetch(10) == []
                # Two portals open in the same transaction, interleaved.
                c1 = await conn.cursor("SELECT g FROM generate_series(1, 100) g")
                c2 = await conn.cursor("SELECT -g FROM generate_series(1, 100) g")
                inter = []
                for _ in range(5):
                    inter += [r[0] for r in await c1.fetch(3)] + [r[0] for r in await c2.fetch(2)]
                assert inter[:5] == [1, 2, 3, -1, -2] and inter[-5:] == [13, 14, 15, -9, -10]
            assert await conn.fetchval("SELECT 'after'") == "after"
        finally:
            await conn.close()

    arun(body())


def test_asyncpg_errors_keep_sqlstate(proxy: ProxyProcess) -> None:
    t = unique("aerr")

    async def body() -> None:
        conn = await aconnect(proxy)
        try:
            await conn.execute(
                f"CREATE TABLE {t} (id int PRIMARY KEY, v int CHECK (v > 0), r int NOT NULL DEFAULT 1)"
            )
            await conn.execute(f"INSERT INTO {t} VALUES (1, 1)")
            with pytest.raises(asyncpg.exceptions.UniqueViolationError) as ei:
                await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 1, 2)
            assert ei.value.sqlstate == "23505" and ei.value.constraint_name == f"{t}_pkey"
            assert ei.value.detail == "Key (id)=(1) already exists."
            with pytest.raises(asyncpg.exceptions.CheckViolationError):
                await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 2, -1)
            with pytest.raises(asyncpg.exceptions.NotNullViolationError):
                await conn.execute(f"INSERT INTO {t} VALUES (3, 3, NULL)")
            with pytest.raises(asyncpg.exceptions.UndefinedColumnError):
                await conn.fetch(f"SELECT nope FROM {t}")
            with pytest.raises(asyncpg.exceptions.PostgresSyntaxError):
                await conn.fetch("SELEC 1")
            with pytest.raises(asyncpg.exceptions.DataError):
                await conn.fetchval("SELECT $1::int", "not an int")
            with pytest.raises(asyncpg.exceptions.RaiseError) as ei2:
                await conn.execute(
                    "DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'custom', HINT = 'h'; END $$"
                )
            assert ei2.value.hint == "h"
            tr = conn.transaction()
            await tr.start()
            with pytest.raises(asyncpg.exceptions.UniqueViolationError):
                await conn.execute(f"INSERT INTO {t} VALUES (1, 1)")
            with pytest.raises(asyncpg.exceptions.InFailedSQLTransactionError):
                await conn.fetchval("SELECT 1")
            await tr.rollback()
            assert await conn.fetchval(f"SELECT count(*) FROM {t}") == 1
        finally:
            await conn.execute(f"DROP TABLE IF EXISTS {t}")
            await conn.close()

    arun(body())


def test_asyncpg_pool_concurrency(proxy: ProxyProcess) -> None:
    async def body() -> None:
        pool = await asyncpg.create_pool(
            host=proxy.host,
            port=proxy.port,
            user=proxy.user,
            password=proxy.password,
            database=proxy.dbname,
            min_size=2,
            max_size=10,
        )
        try:

            async def task(i: int) -> tuple[int, int]:
                async with pool.acquire() as conn:
                    if i % 10 == 0:
                        async with conn.transaction():
                            v = await conn.fetchval("SELECT $1::int * 2", i)
                    else:
                        v = await conn.fetchval("SELECT $1::int * 2 FROM pg_sleep(0.001)", i)
                    backend = await conn.fetchval("SELECT pg_backend_pid()")
                    return v, backend

            results = await asyncio.gather(*(task(i) for i in range(300)))
            assert [v for v, _ in results] == [i * 2 for i in range(300)]
            assert 1 < len({b for _, b in results}) <= 10

            # Errors in some tasks do not disturb the others.
            async def maybe_fail(i: int) -> int | str:
                try:
                    return await pool.fetchval("SELECT 10 / $1::int", i % 3)
                except asyncpg.exceptions.DivisionByZeroError:
                    return "div0"

            out = await asyncio.gather(*(maybe_fail(i) for i in range(90)))
            assert out == ["div0" if i % 3 == 0 else 10 // (i % 3) for i in range(90)]
        finally:
            await asyncio.wait_for(pool.close(), 10)

    arun(body())


def test_large_results_and_slow_reader(proxy: ProxyProcess) -> None:
    """Tens of megabytes through the relay, once read fast and once by a reader that stalls.

    A stalled client fills the proxy's write buffer; the proxy must pause reading from the node
    (backpressure) and resume, losing and reordering nothing.
    """
    query = "SELECT g, repeat(md5(g::text), 30) FROM generate_series(1, $1::int) g"
    n = 40_000  # ~40 MB of DataRows

    async def fast() -> None:
        conn = await aconnect(proxy)
        try:
            rows = await conn.fetch(query, n)
            assert len(rows) == n and sum(r[0] for r in rows) == n * (n + 1) // 2
            assert rows[-1][1] == (await conn.fetchval("SELECT md5($1::text)", str(n))) * 30
        finally:
            await conn.close()

    arun(fast())
    with pconnect(proxy) as conn:
        expected = 1
        for g, text in conn.cursor().stream(query.replace("$1::int", "%s"), (n,)):
            assert g == expected and len(text) == 32 * 30
            expected += 1
            if g % 10_000 == 0:
                time.sleep(0.2)  # the proxy must hold the node back meanwhile
        assert expected == n + 1
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)


# ------------------------------------------------------------------------------------ pgbench
@pytest.fixture(scope="module")
def pgbench_db(proxy: ProxyProcess) -> Iterator[str]:
    """A database of its own for pgbench's tables, created and dropped through the proxy."""
    db = f"clients_pgbench_{os.getpid()}"
    with pconnect(proxy) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db)))
    try:
        r = subprocess.run(
            [
                "pgbench",
                "-i",
                "-s",
                "1",
                "-h",
                proxy.host,
                "-p",
                str(proxy.port),
                "-U",
                proxy.user,
                db,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=client_env(proxy),
        )
        assert r.returncode == 0, f"pgbench -i failed:\n{r.stdout}\n{r.stderr}"
        assert "done in" in r.stderr
        yield db
    finally:
        with pconnect(proxy) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db))
            )


def test_pgbench_initialized_through_proxy(proxy: ProxyProcess, pgbench_db: str) -> None:
    with pconnect(proxy, dbname=pgbench_db) as conn:
        assert conn.execute("SELECT count(*) FROM pgbench_accounts").fetchone() == (100000,)
        assert conn.execute("SELECT count(*) FROM pgbench_branches").fetchone() == (1,)
        assert conn.execute("SELECT current_database()").fetchone() == (pgbench_db,)


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_select_only(proxy: ProxyProcess, pgbench_db: str, mode: str) -> None:
    r = subprocess.run(
        [
            "pgbench",
            "-S",
            "-T",
            "3",
            "-M",
            mode,
            "-c",
            "4",
            "-j",
            "2",
            "-n",
            "-h",
            proxy.host,
            "-p",
            str(proxy.port),
            "-U",
            proxy.user,
            pgbench_db,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=client_env(proxy),
    )
    out = r.stdout
    assert r.returncode == 0, f"pgbench exited {r.returncode}:\n{out}\n{r.stderr}"
    assert f"query mode: {mode}" in out
    m = re.search(r"number of failed transactions: (\d+)", out)
    assert m is not None and int(m.group(1)) == 0, out
    m = re.search(r"number of transactions actually processed: (\d+)", out)
    assert m is not None and int(m.group(1)) > 0, out
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
    assert m is not None and float(m.group(1)) > 0, out


# ------------------------------------------------------------------------------------ admin
def _registered(conn: psycopg.Connection[Any]) -> set[tuple[str, int]]:
    return {
        (h, p) for h, p in conn.execute("SELECT nodename, nodeport FROM citus_nodes").fetchall()
    }


@pytest.fixture(scope="module")
def admin_proxy(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """A proxy with a catalog of its own (metadata database ``clients_admin_<pid>`` on node 0).

    Why not the session's proxy: other test modules register every node there and leave them
    (with shards) for later tests, so node registration could not be checked from a known state
    nor undone. Clients connect to the metadata database itself, where ``citus_nodes`` lives.
    """
    db = f"clients_admin_{os.getpid()}"

    def on_every_node(statement: str) -> None:
        for node in cluster.nodes:
            with psycopg.connect(node.dsn(), autocommit=True) as conn:
                conn.execute(sql.SQL(statement).format(sql.Identifier(db)))

    # As with Citus, the database exists on every node (the proxy logs in to a node being added
    # with the metadata database's name).
    on_every_node("DROP DATABASE IF EXISTS {} WITH (FORCE)")
    on_every_node("CREATE DATABASE {}")
    proc = start_proxy(
        tmp_path_factory.mktemp("admin"), cluster, name="admin", metadata={"dbname": db}
    )
    proc.dbname = db
    try:
        yield proc
    finally:
        proc.stop()
        on_every_node("DROP DATABASE IF EXISTS {} WITH (FORCE)")


@pytest.fixture
def worker(admin_proxy: ProxyProcess, cluster: LocalCluster) -> Iterator[tuple[str, int]]:
    """A worker address, not registered; whatever a test registered is removed afterwards."""
    with pconnect(admin_proxy) as conn:
        before = _registered(conn)
    n1 = cluster.nodes[1]
    assert (n1.host, n1.port) not in before
    yield n1.host, n1.port
    with pconnect(admin_proxy) as conn:
        for host, port in _registered(conn) - before:
            conn.execute("SELECT citus_remove_node(%s, %s)", (host, port))


def test_admin_add_node_asyncpg_parameters(
    admin_proxy: ProxyProcess, worker: tuple[str, int]
) -> None:
    proxy = admin_proxy
    host, port = worker

    async def body() -> None:
        conn = await aconnect(proxy)
        try:
            node_id = await conn.fetchval("SELECT citus_add_node($1, $2)", host, port)
            assert isinstance(node_id, int) and node_id > 0
            # Adding it again returns the same id (prepared statement, binary parameters).
            stmt = await conn.prepare("SELECT citus_add_node($1, $2)")
            assert await stmt.fetchval(host, port) == node_id
            rows = await conn.fetch("SELECT nodeid, nodename, nodeport FROM citus_nodes")
            assert (node_id, host, port) in {tuple(r) for r in rows}
            row = await conn.fetchrow("SELECT * FROM citus_nodes WHERE nodeport = $1", port)
            assert row is not None and row["nodeid"] == node_id and row["active"] is True
            # void, as in Citus: asyncpg decodes it as None
            assert await conn.fetchval("SELECT citus_remove_node($1, $2)", host, port) is None
            rows = await conn.fetch("SELECT nodename, nodeport FROM citus_nodes")
            assert (host, port) not in {tuple(r) for r in rows}
            with pytest.raises(asyncpg.exceptions.PostgresError) as ei:
                await conn.fetchval("SELECT citus_remove_node($1, $2)", host, port)
            assert ei.value.sqlstate == "42704"
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    arun(body())


def test_admin_add_node_psycopg(admin_proxy: ProxyProcess, worker: tuple[str, int]) -> None:
    proxy = admin_proxy
    host, port = worker
    with pconnect(proxy) as conn:
        node_id = conn.execute("SELECT citus_add_node(%s, %s)", (host, port)).fetchone()[0]
        assert isinstance(node_id, int) and node_id > 0
        cur = conn.cursor(binary=True)
        assert cur.execute("SELECT citus_add_node(%s, %s)", (host, port)).fetchone() == (node_id,)
        # Simple protocol (literals) gives the same answer.
        lit = conn.execute(
            sql.SQL("SELECT citus_add_node({}, {})").format(sql.Literal(host), sql.Literal(port))
        ).fetchone()
        assert lit == (node_id,)
        assert (node_id, host, port) in set(
            conn.execute("SELECT nodeid, nodename, nodeport FROM citus_nodes").fetchall()
        )
        conn.execute("SELECT citus_remove_node(%s, %s)", (host, port))
        assert (host, port) not in _registered(conn)


def test_admin_add_node_named_arguments(admin_proxy: ProxyProcess, worker: tuple[str, int]) -> None:
    proxy = admin_proxy
    host, port = worker
    with pconnect(proxy) as conn:
        node_id = conn.execute(
            "SELECT citus_add_node(nodename => %s, nodeport => %s)", (host, port)
        ).fetchone()[0]
        assert isinstance(node_id, int) and node_id > 0
        same = conn.execute(
            sql.SQL("SELECT citus_add_node(nodeport => {}, nodename => {})").format(
                sql.Literal(port), sql.Literal(host)
            )
        ).fetchone()
        assert same == (node_id,)
        assert (host, port) in _registered(conn)
        conn.execute("SELECT citus_remove_node(nodename => %s, nodeport => %s)", (host, port))
        assert (host, port) not in _registered(conn)
    r = run_psql(
        proxy, "-At", "-c", f"SELECT citus_add_node(nodename => '{host}', nodeport => {port})"
    )
    assert r.returncode == 0 and int(r.stdout.strip()) > 0, r.stderr
    r = run_psql(
        proxy,
        "-At",
        "-c",
        f"SELECT citus_remove_node('{host}', {port})",
        "-c",
        "SELECT count(*) FROM citus_nodes WHERE nodeport = " + str(port),
    )
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "0", r.stderr


def test_admin_calls_in_pipeline(admin_proxy: ProxyProcess, worker: tuple[str, int]) -> None:
    """Admin answers come from the proxy, passthrough answers from the node: in order."""
    proxy = admin_proxy
    host, port = worker
    with pconnect(proxy) as conn, conn.pipeline() as p:
        c1 = conn.execute("SELECT %s::text", ("before",))
        c2 = conn.execute("SELECT citus_add_node(%s, %s)", (host, port))
        c3 = conn.execute("SELECT nodename FROM citus_nodes WHERE nodeport = %s", (port,))
        c4 = conn.execute("SELECT citus_remove_node(%s, %s)", (host, port))
        c5 = conn.execute("SELECT count(*) FROM citus_nodes WHERE nodeport = %s", (port,))
        p.sync()
        assert c1.fetchone() == ("before",)
        assert isinstance(c2.fetchone()[0], int)
        assert c3.fetchone() == (host,)
        c4.fetchone()
        assert c5.fetchone() == (0,)


# A statement that fails only when executed, after a short sleep: by then a pipelining client
# has sent everything behind it (the Sync included), which is the case the skip logic must get
# right. (1/0 with constants would fail already at Bind, during planning.)
SLOW_ERROR = "SELECT 1 / (g - 1) FROM pg_sleep(0.3), generate_series(1, 1) g"


def test_admin_call_after_error_in_pipeline_is_skipped(
    admin_proxy: ProxyProcess, worker: tuple[str, int]
) -> None:
    """PostgreSQL skips everything after an error up to Sync: a queued admin call must not run."""
    proxy = admin_proxy
    host, port = worker
    with pconnect(proxy) as conn:
        errors: list[type[Exception]] = []
        with conn.pipeline() as p:
            for query, params in [
                (SLOW_ERROR, None),
                ("SELECT citus_add_node(%s, %s)", (host, port)),
                ("SELECT %s::text", ("skipped",)),
            ]:
                try:
                    conn.execute(query, params)
                except psycopg.Error as exc:
                    errors.append(type(exc))
            try:
                p.sync()
            except psycopg.Error as exc:
                errors.append(type(exc))
            assert psycopg.errors.DivisionByZero in errors
            after = conn.execute("SELECT count(*) FROM citus_nodes WHERE nodeport = %s", (port,))
            p.sync()
            assert after.fetchone() == (0,)
        assert (host, port) not in _registered(conn)


def test_raw_pipeline_error_then_admin_call(
    admin_proxy: ProxyProcess, worker: tuple[str, int]
) -> None:
    """The same, byte-exact: one write holding [failing statement, admin call, Sync].

    Uses the proxy's own protocol client as a bare-bones frontend, so the answer sequence is
    checked message by message against what PostgreSQL sends: ParseComplete, BindComplete,
    ErrorResponse, then nothing until ReadyForQuery.
    """
    proxy = admin_proxy
    host, port = worker

    def bind() -> bytes:
        return pg.message(b"B", b"\x00\x00" + struct.pack("!hhh", 0, 0, 0))

    def execute() -> bytes:
        return pg.message(b"E", b"\x00" + struct.pack("!i", 0))

    async def body() -> None:
        conn = await connect_backend(
            proxy.host, proxy.port, user=proxy.user, password=proxy.password, database=proxy.dbname
        )
        try:
            batch = (
                pg.parse_message("", SLOW_ERROR)
                + bind()
                + execute()
                + pg.parse_message("", f"SELECT citus_add_node('{host}', {port})")
                + bind()
                + pg.message(b"D", b"P\x00")
                + execute()
                + pg.SYNC
            )
            msgs = await asyncio.wait_for(conn.exchange(batch), 10)
            assert [chr(t) for t, _ in msgs] == ["1", "2", "E", "Z"]
            assert pg.parse_error_fields(msgs[2][1])["C"] == "22012"
            rows = await asyncio.wait_for(
                conn.simple_query(f"SELECT count(*) FROM citus_nodes WHERE nodeport = {port}"), 10
            )
            assert rows == [[b"0"]]
        finally:
            conn.close()

    arun(body())


# ------------------------------------------------------------------------------------ cancel
def test_cancel_psycopg(proxy: ProxyProcess) -> None:
    with pconnect(proxy) as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled) as ei:
            conn.execute("SELECT pg_sleep(30)")
        elapsed = time.monotonic() - t0
        timer.join()
        assert ei.value.sqlstate == "57014"
        assert elapsed < 5
        assert conn.execute("SELECT %s::int + 1", (1,)).fetchone() == (2,)
        assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)


def test_cancel_during_query_the_proxy_splits(proxy: ProxyProcess) -> None:
    """Cancel while the proxy itself runs a multi-statement Query (it mentions citus_nodes).

    The proxy executes such a Query statement by statement on the metadata node; the cancel
    must end the running statement there, and the node's 57014 must answer this Query, not
    leak into the next one.
    """
    with pconnect(proxy) as conn:
        for delay in (0.3, 0.6):
            timer = threading.Timer(delay, conn.cancel_safe)
            timer.start()
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30); SELECT count(*) FROM citus_nodes")
            timer.join()
            assert time.monotonic() - t0 < 5
            for i in range(3):
                assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
                assert conn.execute("SELECT 'plain'").fetchone() == ("plain",)
            assert conn.execute("SELECT count(*) >= 0 FROM citus_nodes").fetchone() == (True,)


def _send_cancel(host: str, port: int, pid: int, secret: int) -> None:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(struct.pack("!iiii", 16, 80877102, pid, secret))
        s.recv(1)  # the server closes the connection without answering


def test_cancel_asyncpg(proxy: ProxyProcess) -> None:
    async def body() -> None:
        conn = await aconnect(proxy)
        try:
            # 1. A CancelRequest carrying the key the proxy gave this connection (asyncpg has
            #    no public cancel call; its protocol object holds BackendKeyData).
            proto = conn._protocol  # noqa: SLF001
            loop = asyncio.get_running_loop()
            loop.call_later(
                0.5,
                lambda: loop.run_in_executor(
                    None,
                    _send_cancel,
                    proxy.host,
                    proxy.port,
                    proto.backend_pid,
                    proto.backend_secret,
                ),
            )
            t0 = time.monotonic()
            with pytest.raises(asyncpg.exceptions.QueryCanceledError) as ei:
                await conn.fetchval("SELECT pg_sleep(30)")
            assert ei.value.sqlstate == "57014"
            assert time.monotonic() - t0 < 5
            assert await conn.fetchval("SELECT $1::int", 3) == 3
            # 2. asyncpg's own cancel on timeout: the next statement must not wait for the sleep.
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT pg_sleep(30)", timeout=0.5)
            assert await conn.fetchval("SELECT 'usable'") == "usable"
            assert time.monotonic() - t0 < 5
        finally:
            await conn.close()

    arun(body())


def test_cancel_with_wrong_key_does_nothing(proxy: ProxyProcess) -> None:
    with pconnect(proxy) as conn:
        pid = conn.info.backend_pid
        threading.Timer(0.2, _send_cancel, (proxy.host, proxy.port, pid, 12345)).start()
        assert conn.execute("SELECT 1 FROM pg_sleep(1)").fetchone() == (1,)


# ------------------------------------------------------------------------------------ settings
def test_startup_settings_visible(proxy: ProxyProcess) -> None:
    schema = f"clients_sp_{uuid.uuid4().hex[:6]}"
    with pconnect(proxy) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        with pconnect(
            proxy,
            application_name="clients-test-app",
            options=f"-c search_path={schema},public -c statement_timeout=12345",
        ) as conn:
            assert conn.execute("SHOW application_name").fetchone() == ("clients-test-app",)
            assert conn.execute("SELECT current_setting('search_path')").fetchone() == (
                f"{schema},public",
            )
            assert conn.execute("SELECT current_schema()").fetchone() == (schema,)
            assert conn.execute("SHOW statement_timeout").fetchone() == ("12345ms",)
            assert conn.info.parameter_status("application_name") == "clients-test-app"
            # Objects created without a schema land in the search_path's first schema.
            conn.execute("CREATE TABLE sp_probe (a int)")
            assert conn.execute(
                "SELECT schemaname FROM pg_tables WHERE tablename = 'sp_probe'"
            ).fetchone() == (schema,)

        # TimeZone from the start-up options reaches psycopg as ParameterStatus, and psycopg
        # loads timestamptz values in that zone.
        with pconnect(proxy, options="-c TimeZone=Asia/Kolkata") as conn:
            assert conn.info.parameter_status("TimeZone") == "Asia/Kolkata"
            ts = conn.execute("SELECT '2024-01-01 00:00:00+00'::timestamptz").fetchone()[0]
            assert ts.utcoffset() == dt.timedelta(hours=5, minutes=30)
            assert ts == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)

        async def body() -> None:
            conn = await aconnect(
                proxy,
                server_settings={"TimeZone": "Asia/Tokyo", "application_name": "clients-asyncpg"},
            )
            try:
                assert await conn.fetchval("SHOW TimeZone") == "Asia/Tokyo"
                assert (
                    await conn.fetchval("SELECT current_setting('application_name')")
                    == "clients-asyncpg"
                )
                assert conn.get_settings().TimeZone == "Asia/Tokyo"
                local = await conn.fetchval("SELECT '2024-01-01 00:00:00+00'::timestamptz::text")
                assert local == "2024-01-01 09:00:00+09"
            finally:
                await conn.close()

        arun(body())
    finally:
        with pconnect(proxy) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def test_set_and_parameter_status(proxy: ProxyProcess) -> None:
    with pconnect(proxy) as conn:
        conn.execute("SET TimeZone = 'America/Sao_Paulo'")
        assert conn.execute("SHOW TimeZone").fetchone() == ("America/Sao_Paulo",)
        assert conn.info.parameter_status("TimeZone") == "America/Sao_Paulo"
        # psycopg loads timestamptz in the session's time zone, learned from ParameterStatus.
        ts = conn.execute("SELECT '2024-06-01 12:00:00+00'::timestamptz").fetchone()[0]
        assert ts.utcoffset() == dt.timedelta(hours=-3)
        conn.execute("SELECT set_config('application_name', %s, false)", ("renamed",))
        assert conn.info.parameter_status("application_name") == "renamed"
        conn.execute("SET work_mem = '7MB'")
        assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
        conn.execute("RESET work_mem")
        assert conn.execute("SHOW work_mem").fetchone() != ("7MB",)
    # A fresh connection does not inherit the previous session's settings (pool reset).
    with pconnect(proxy) as conn:
        assert conn.execute("SHOW TimeZone").fetchone() != ("America/Sao_Paulo",)
        assert conn.info.parameter_status("TimeZone") == conn.execute("SHOW TimeZone").fetchone()[0]
