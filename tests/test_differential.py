"""Differential test: the cluster behind the proxy must answer exactly like one plain PostgreSQL.

DESIGN.md's promise is "every query either returns exactly what one big Postgres holding all the
data would return, or a clear 0A000". The oracle is therefore PostgreSQL itself, not expected
values written by hand: the same deterministic data set (``tests/diffdata.py``) is loaded

* **plain side** — into ordinary tables of a separate database on ``cluster.nodes[1]``, reached
  directly (no proxy);
* **cluster side** — through the proxy into the metadata database: ``countries``, ``users`` and
  ``orders`` are created and filled with COPY while they are still ordinary tables (the COPY
  passes through to the metadata node), then ``create_reference_table`` /
  ``create_distributed_table`` move the rows into the shards; ``events`` is distributed while
  empty and filled by COPY through the proxy, which routes every row to its shard. Both load
  paths are thus under test (a whole-row fingerprint per table is compared first).

and every query of ``diffdata.QUERIES`` runs on both sides. Rows are compared as PostgreSQL prints
them (psycopg text results, raw bytes), as multisets unless the query's ORDER BY fixes the order
completely; float columns with a relative tolerance of 1e-9 (partial sums are added in another
order), everything else — numeric included, scale and all — exactly. Column types and command
tags must match too; a query PostgreSQL rejects must be rejected with the same SQLSTATE. A subset
runs again in psycopg binary mode, pipelined, inside a transaction block, under non-default
TimeZone/DateStyle/IntervalStyle/extra_float_digits, and through asyncpg prepared statements with
parameters and a cursor (Execute with a row limit). Then writes (INSERT single/multi-row/...SELECT,
ON CONFLICT, RETURNING, UPDATE/DELETE by key and fanned out, reference tables, COPY) are applied to
both sides step by step, each compared by its rows, command tag and table fingerprints, and a
sample of the queries is re-run. Statements the proxy cannot run exactly must fail with SQLSTATE
0A000; queries marked ``allow_unsupported`` may do that instead of answering, never answer
wrongly. A known wrong answer that needs a design change is a strict xfail (``Query.xfail``).

Tests depend on running in file order (reads, writes, reads after writes), which is pytest's
default; each write step is applied to both sides, so a comparison stays meaningful either way.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from diffdata import (
    EVENTS_SHARDS,
    QUERIES,
    SCHEMA,
    TABLES,
    USERS_SHARDS,
    DataSet,
    Query,
    copy_text,
    generate,
    user_pair,
)
from pgresult import Result, run_text
from proxyproc import ProxyProcess

from orochi_proxy.localcluster import LocalCluster

PLAIN_DB = "orochi_diff_plain"
FLOAT_OIDS = {700, 701}
REL_TOL = 1e-9
MAX_SHOWN = 8  # differing rows shown per failure


# ====================================================================================== setup
@dataclass
class Env:
    """Both sides of the comparison, loaded with the same rows."""

    proxy: psycopg.Connection[Any]
    plain: psycopg.Connection[Any]
    proxy_dsn: str
    plain_dsn: str
    proxy_pg: dict[str, Any]  # asyncpg.connect() keyword arguments
    plain_pg: dict[str, Any]
    data: DataSet
    load_seconds: float
    phases: dict[str, float] | None = None  # seconds per load phase, for the report


def _copy_in(conn: psycopg.Connection[Any], table: str, text: str) -> None:
    with conn.cursor() as cur, cur.copy(f"COPY {table} FROM STDIN") as cp:
        cp.write(text.encode())


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, proxy: ProxyProcess) -> Iterator[Env]:
    started = time.monotonic()
    data = generate()
    texts = {t: data.copy_text(t) for t in TABLES}
    phases = {"generate": time.monotonic() - started}

    # Plain side: a database of its own on node 1, ordinary tables.
    node = cluster.nodes[1]
    with psycopg.connect(node.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {PLAIN_DB}")
        admin.execute(f"CREATE DATABASE {PLAIN_DB}")
    plain = psycopg.connect(node.dsn(PLAIN_DB), autocommit=True)
    for t in TABLES:
        plain.execute(SCHEMA[t])
        _copy_in(plain, t, texts[t])
    plain.execute("ANALYZE")
    phases["plain"] = time.monotonic() - started - sum(phases.values())

    # Cluster side, two load paths: countries, users and orders are filled with COPY while still
    # ordinary tables (it passes through to the metadata node) and create_*_table moves their
    # rows into the shards; events is distributed empty and filled by COPY *through* the proxy,
    # which splits the rows by shard.
    pconn = psycopg.connect(proxy.dsn(), autocommit=True)
    for n in cluster.nodes:
        pconn.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
    for t in TABLES:
        pconn.execute(SCHEMA[t])
        if t != "events":
            _copy_in(pconn, t, texts[t])
    phases["proxy_copy_plain_tables"] = time.monotonic() - started - sum(phases.values())
    pconn.execute("SELECT create_reference_table('countries')")
    pconn.execute(f"SELECT create_distributed_table('users', 'user_id', shard_count => {USERS_SHARDS})")
    pconn.execute(
        "SELECT create_distributed_table('orders', 'user_id', colocate_with => 'users', "
        f"shard_count => {USERS_SHARDS})"
    )
    pconn.execute(f"SELECT create_distributed_table('events', 'id', shard_count => {EVENTS_SHARDS})")
    phases["distribute"] = time.monotonic() - started - sum(phases.values())
    _copy_in(pconn, "events", texts["events"])
    phases["copy_into_distributed"] = time.monotonic() - started - sum(phases.values())
    env = Env(
        proxy=pconn,
        plain=plain,
        proxy_dsn=proxy.dsn(),
        plain_dsn=node.dsn(PLAIN_DB),
        proxy_pg={"host": proxy.host, "port": proxy.port, "user": proxy.user,
                  "password": proxy.password, "database": proxy.dbname},
        plain_pg=node.connect_kwargs(PLAIN_DB),
        data=data,
        load_seconds=time.monotonic() - started,
        phases=phases,
    )
    try:
        yield env
    finally:
        pconn.close()
        plain.close()


# ====================================================================================== compare
def run_binary(conn: psycopg.Connection[Any], sql: str, params: Sequence[Any] | None = None) -> Result:
    """Run with binary results, loaded into Python values by psycopg."""
    with conn.cursor(binary=True) as cur:
        cur.execute(sql, params)
        oids = [d.type_code for d in cur.description or ()]
        rows = [tuple(r) for r in cur.fetchall()] if cur.description else []
        return Result(oids, rows, cur.statusmessage or "")


def _sig_digits(text: str) -> int:
    mantissa = text.lower().split("e")[0].lstrip("+-").replace(".", "").lstrip("0")
    return len(mantissa.rstrip("0")) if mantissa else 0


def _canon(v: Any, oid: int) -> Any:
    """Value for comparison: floats as float, Decimal as its text (keeps the scale)."""
    if v is None:
        return None
    if oid in FLOAT_OIDS:
        return float(v)
    if isinstance(v, Decimal):
        return str(v)
    return v


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    return a == b and type(a) is type(b)


def _rows_close(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))


def _sort_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    # Floats rounded so that tolerance-equal values sort alike; None first; types kept apart.
    key = []
    for v in row:
        if v is None:
            key.append((0, ""))
        elif isinstance(v, float):
            key.append((1, f"{v:.6e}" if math.isfinite(v) else repr(v)))
        else:
            key.append((2, repr(v)))
    return tuple(key)


def _multiset_diff(
    got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Rows only in ``got`` and only in ``want``, matching floats with tolerance."""
    gs, ws = sorted(got, key=_sort_key), sorted(want, key=_sort_key)
    if len(gs) == len(ws) and all(_rows_close(g, w) for g, w in zip(gs, ws, strict=True)):
        return [], []
    # Slow path (float rounding may have put equal rows in another sort position).
    exact = Counter(gs) - Counter(ws), Counter(ws) - Counter(gs)
    extra, missing = list(exact[0].elements()), list(exact[1].elements())
    unmatched = []
    for g in extra:
        for i, w in enumerate(missing):
            if _rows_close(g, w):
                del missing[i]
                break
        else:
            unmatched.append(g)
    return unmatched, missing


def compare(got: Result, want: Result, *, ordered: bool, what: str, count_only: bool = False) -> None:
    """Assert the proxy's answer (``got``) equals the plain database's (``want``)."""
    problems = []
    if got.oids != want.oids:
        problems.append(f"column types differ: proxy {got.oids}, plain {want.oids}")
    if got.tag != want.tag:
        problems.append(f"command tag differs: proxy {got.tag!r}, plain {want.tag!r}")
    # A float column printed with more digits than any double has is a numeric answer under a
    # float8 RowDescription: a binary-mode client would decode garbage.
    not_float = [
        v for r in got.rows for v, o in zip(r, got.oids, strict=False)
        if o in FLOAT_OIDS and isinstance(v, str) and v not in ("NaN", "Infinity", "-Infinity")
        and _sig_digits(v) > 17
    ]
    if not_float:
        problems.append(f"float column values that are not float8 text: {not_float[:MAX_SHOWN]}")
    if count_only:
        if len(got.rows) != len(want.rows):
            problems.append(f"row count differs: proxy {len(got.rows)}, plain {len(want.rows)}")
    else:
        g = [tuple(_canon(v, o) for v, o in zip(r, got.oids, strict=False)) for r in got.rows]
        w = [tuple(_canon(v, o) for v, o in zip(r, want.oids, strict=False)) for r in want.rows]
        if ordered:
            if len(g) != len(w) or not all(_rows_close(a, b) for a, b in zip(g, w, strict=True)):
                first = next(
                    (i for i, (a, b) in enumerate(zip(g, w, strict=False)) if not _rows_close(a, b)),
                    min(len(g), len(w)),
                )
                problems.append(
                    f"ordered rows differ at row {first} (proxy {len(g)} rows, plain {len(w)}):\n"
                    f"  proxy: {g[first:first + MAX_SHOWN]}\n  plain: {w[first:first + MAX_SHOWN]}"
                )
        else:
            extra, missing = _multiset_diff(g, w)
            if extra or missing:
                problems.append(
                    f"rows differ (proxy {len(g)} rows, plain {len(w)}); "
                    f"{len(extra)} only from proxy, {len(missing)} only from plain:\n"
                    f"  only proxy: {extra[:MAX_SHOWN]}\n  only plain: {missing[:MAX_SHOWN]}"
                )
    if problems:
        pytest.fail(f"{what}\n" + "\n".join(problems), pytrace=False)


def check_query(env: Env, q: Query, runner=run_text) -> None:
    try:
        want = runner(env.plain, q.sql, q.params)
    except psycopg.Error as plain_exc:
        # PostgreSQL refuses it: the proxy must refuse it too, with the same SQLSTATE.
        try:
            got = runner(env.proxy, q.sql, q.params)
        except psycopg.Error as exc:
            assert exc.sqlstate == plain_exc.sqlstate, (
                f"{q.sql}\nproxy failed with {exc.sqlstate}: {exc}\n"
                f"plain failed with {plain_exc.sqlstate}: {plain_exc}"
            )
            return
        pytest.fail(f"{q.sql}\nplain failed with {plain_exc.sqlstate}: {plain_exc}\n"
                    f"proxy answered {got.tag}: {got.rows[:MAX_SHOWN]}", pytrace=False)
    try:
        got = runner(env.proxy, q.sql, q.params)
    except psycopg.Error as exc:
        if q.allow_unsupported and exc.sqlstate == "0A000":
            return
        pytest.fail(
            f"{q.sql}\nproxy failed with {exc.sqlstate}: {exc}\n"
            f"plain answered {len(want.rows)} rows",
            pytrace=False,
        )
    compare(got, want, ordered=q.ordered, what=q.sql, count_only=q.count_only)


# ====================================================================================== loading
def test_data_loaded_identically(env: Env) -> None:
    """Row counts and a whole-row fingerprint per table match before any query is trusted."""
    for t in TABLES:
        q = Query(f"fp-{t}", f"SELECT count(*), sum(hashtextextended(x::text, 0)) FROM {t} x")
        check_query(env, q)
    want = {t: len(env.data.rows[t]) for t in TABLES}
    got = {t: env.proxy.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}  # type: ignore[index]
    assert got == want
    # The logical tables on the metadata node keep only the definition.
    assert env.proxy.execute("SELECT count(*) FROM citus_tables").fetchone()[0] >= 4  # type: ignore[index]
    print(f"\nloaded {env.data.total_rows} rows in {env.load_seconds:.1f}s: "
          + ", ".join(f"{k} {v:.1f}s" for k, v in (env.phases or {}).items()))
    assert env.load_seconds < 120, f"loading took {env.load_seconds:.0f}s"


# ====================================================================================== reads
def _params(queries: list[Query]) -> list[Any]:
    """One pytest param per query, id = query id; known wrong answers are strict xfails."""
    return [
        pytest.param(q, id=q.id, marks=[pytest.mark.xfail(strict=True, reason=q.xfail)] if q.xfail else [])
        for q in queries
    ]


@pytest.mark.parametrize("q", _params(QUERIES))
def test_query(env: Env, q: Query) -> None:
    check_query(env, q)


BINARY_QUERIES = [
    q for i, q in enumerate(QUERIES)
    if i % 8 == 0 or q.id.startswith(("router-param", "router-any", "edge-param", "agg-float", "error-"))
]


@pytest.mark.parametrize("q", _params(BINARY_QUERIES))
def test_query_binary(env: Env, q: Query) -> None:
    check_query(env, q, runner=run_binary)


# ------------------------------------------------------------------------------ asyncpg
@dataclass(frozen=True)
class AsyncCase:
    id: str
    sql: str
    args: tuple[tuple[Any, ...], ...]  # one execution of the prepared statement per tuple
    ordered: bool = False


UTC = dt.UTC
ASYNC_CASES = [
    AsyncCase("router-eq", "SELECT * FROM events WHERE id = $1",
              ((1,), (-250,), (10**15 + 3,), (9_223_372_036_854_775_807,), (424_242_424_242,), (0,))),
    AsyncCase("router-any", "SELECT id, kind, amount FROM events WHERE id = ANY($1)",
              (([1, 2, 3],), ([-1, 10**15 + 2, 999],), ([],), ([5, None],))),
    AsyncCase("router-any-users", "SELECT * FROM users WHERE user_id = ANY($1::int[])",
              (([1, 2, 50_001],), ([-2_147_483_648, 2_147_483_647],))),
    AsyncCase("router-in", "SELECT id, note FROM events WHERE id IN ($1, $2)", ((5, 6), (-5, 10**15 + 5))),
    AsyncCase("router-join",
              "SELECT u.name, o.order_id, o.total FROM users u JOIN orders o ON u.user_id = o.user_id "
              "WHERE u.user_id = $1", ((1,), (34,), (50_001,), (-7,))),
    AsyncCase("router-orders-agg",
              "SELECT count(*), sum(total), avg(total), min(status) FROM orders WHERE user_id = $1",
              ((2,), (3,), (404,))),
    AsyncCase("multi-threshold",
              "SELECT kind, count(*), sum(amount), avg(score) FROM events WHERE amount > $1 GROUP BY kind",
              ((Decimal("0"),), (Decimal("99000000"),), (Decimal("-0.01"),))),
    AsyncCase("multi-having-param",
              "SELECT user_id, count(*) FROM orders GROUP BY user_id HAVING count(*) > $1",
              ((100,), (5000,))),
    AsyncCase("multi-order-limit-param",
              "SELECT id, amount FROM events WHERE kind = $1 ORDER BY amount DESC NULLS LAST, id "
              "LIMIT $2 OFFSET $3", (("click", 10, 0), ("日本", 5, 17), ("", 3, 1)), ordered=True),
    AsyncCase("multi-ts-range",
              "SELECT count(*), min(created), max(created) FROM events WHERE created >= $1 AND created < $2",
              ((dt.datetime(2023, 3, 1, tzinfo=UTC), dt.datetime(2023, 4, 1, tzinfo=UTC)),
               (dt.datetime(2024, 12, 1, tzinfo=UTC), dt.datetime(2030, 1, 1, tzinfo=UTC)))),
    AsyncCase("multi-text-param", "SELECT flag, count(*) FROM events WHERE note = $1 GROUP BY flag",
              (("日本語テキスト",), ("",), ("😀 smile",), ('double "quote"',))),
    AsyncCase("multi-distinct-on-any",
              "SELECT DISTINCT ON (user_id) user_id, id FROM events WHERE user_id = ANY($1) "
              "ORDER BY user_id, id DESC", (([1, 2, 3, 4],), ([99999],)), ordered=True),
    AsyncCase("multi-join-param",
              "SELECT u.country, count(*) FROM users u JOIN orders o ON u.user_id = o.user_id "
              "WHERE o.total > $1 GROUP BY u.country", ((Decimal("9000000"),),)),
    AsyncCase("multi-float-param", "SELECT count(*), sum(score) FROM events WHERE score BETWEEN $1 AND $2",
              ((10.5, 20.25), (-1e9, 0.0))),
    AsyncCase("multi-bool-param", "SELECT kind, count(*) FROM events WHERE flag = $1 GROUP BY kind",
              ((True,), (False,))),
]


def _canon_record(r: asyncpg.Record) -> tuple[Any, ...]:
    return tuple(str(v) if isinstance(v, Decimal) else v for v in r.values())


async def _async_case(env: Env, case: AsyncCase) -> list[str]:
    problems: list[str] = []
    pc = await asyncpg.connect(**env.proxy_pg)
    dc = await asyncpg.connect(**env.plain_pg)
    try:
        ps, ds = await pc.prepare(case.sql), await dc.prepare(case.sql)
        for args in case.args:
            try:
                got = [_canon_record(r) for r in await ps.fetch(*args)]
            except asyncpg.PostgresError as exc:
                problems.append(f"args {args}: proxy failed with {exc.sqlstate}: {exc}")
                continue
            want = [_canon_record(r) for r in await ds.fetch(*args)]
            if case.ordered:
                ok = len(got) == len(want) and all(_rows_close(a, b) for a, b in zip(got, want, strict=True))
                if not ok:
                    problems.append(f"args {args}: proxy {got[:MAX_SHOWN]} plain {want[:MAX_SHOWN]}")
            else:
                extra, missing = _multiset_diff(got, want)
                if extra or missing:
                    problems.append(f"args {args}: only proxy {extra[:MAX_SHOWN]}, only plain {missing[:MAX_SHOWN]}")
    finally:
        await pc.close()
        await dc.close()
    return problems


@pytest.mark.parametrize("case", ASYNC_CASES, ids=[c.id for c in ASYNC_CASES])
def test_asyncpg_prepared(env: Env, case: AsyncCase) -> None:
    problems = asyncio.run(_async_case(env, case))
    if problems:
        pytest.fail(f"{case.sql}\n" + "\n".join(problems), pytrace=False)


async def _cursor_chunks(kw: dict[str, Any], sql: str, sizes: Sequence[int]) -> list[list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(**kw)
    try:
        async with conn.transaction():
            cur = await conn.cursor(sql)
            return [[_canon_record(r) for r in await cur.fetch(n)] for n in sizes]
    finally:
        await conn.close()


def test_asyncpg_cursor(env: Env) -> None:
    """Execute with a row limit (a cursor): each fetch gets exactly its rows, in order."""
    sql = "SELECT id, kind, amount FROM events WHERE id < -400 ORDER BY id"
    sizes = (5, 3, 50, 1, 1000, 10)
    got = asyncio.run(_cursor_chunks(env.proxy_pg, sql, sizes))
    want = asyncio.run(_cursor_chunks(env.plain_pg, sql, sizes))
    assert [len(c) for c in got] == [len(c) for c in want]
    assert got == want


PIPELINE_QUERIES = [q for q in QUERIES if q.id.startswith(("router-eq-", "agg-count_star", "order-amount"))]


def _pipelined(conn: psycopg.Connection[Any], queries: list[Query]) -> list[Result]:
    """All queries sent in one psycopg pipeline (no round trip between them)."""
    cursors = []
    with conn.pipeline():
        for q in queries:
            cur = conn.cursor()
            cur.execute(q.sql, q.params, prepare=False)
            cursors.append(cur)
    out = []
    for cur in cursors:
        res = cur.pgresult
        assert res is not None
        rows = [
            tuple(None if (v := res.get_value(i, j)) is None else v.decode() for j in range(res.nfields))
            for i in range(res.ntuples)
        ]
        out.append(Result([res.ftype(j) for j in range(res.nfields)], rows, cur.statusmessage or ""))
        cur.close()
    return out


def test_pipeline(env: Env) -> None:
    """Distributed statements pipelined: every answer arrives, in order, and matches."""
    got = _pipelined(env.proxy, PIPELINE_QUERIES)
    want = _pipelined(env.plain, PIPELINE_QUERIES)
    for q, g, w in zip(PIPELINE_QUERIES, got, want, strict=True):
        compare(g, w, ordered=q.ordered, what=q.sql)


def test_reads_in_transaction_block(env: Env) -> None:
    """READ COMMITTED reads inside BEGIN ... COMMIT answer like autocommit ones."""
    sample = [q for q in QUERIES if q.id.startswith(("router-in", "join-inner", "order-amount"))]
    with psycopg.connect(env.proxy_dsn) as proxy, proxy.transaction():
        for q in sample:
            compare(run_text(proxy, q.sql, q.params), run_text(env.plain, q.sql, q.params),
                    ordered=q.ordered, what=q.sql)


SETTINGS = (
    "SET TimeZone = 'Asia/Tokyo'",
    "SET DateStyle = 'SQL, DMY'",
    "SET IntervalStyle = 'postgres_verbose'",
    "SET extra_float_digits = 0",
)
SETTINGS_QUERIES = [
    Query("tz-group-by-day", "SELECT date_trunc('day', created) AS d, count(*) FROM events "
          "WHERE created < '2023-01-20' GROUP BY 1"),
    Query("tz-min-max", "SELECT kind, min(created), max(created), max(created) - min(created) FROM events "
          "GROUP BY kind"),
    Query("tz-router", "SELECT created, created + interval '1 day 2 hours', score FROM events WHERE id = 3"),
    Query("tz-concat", "SELECT id, created FROM events WHERE id < -480"),
    Query("tz-concat-dates", "SELECT user_id, signup FROM users WHERE user_id < 300 AND signup IS NOT NULL"),
    Query("tz-order", "SELECT id, created, score FROM events ORDER BY created DESC NULLS LAST, id LIMIT 10",
          ordered=True),
    Query("tz-users-signup", "SELECT signup, count(*) FROM users WHERE signup < '2015-02-01' GROUP BY signup"),
    Query("tz-float-digits", "SELECT kind, avg(score), sum(score) FROM events GROUP BY kind"),
    Query("tz-literal-filter", "SELECT count(*) FROM events WHERE created >= '01/06/2023 00:00' "
          "AND created < '02/06/2023 00:00'"),
]


@pytest.fixture(scope="module")
def env_settings(env: Env) -> Iterator[Env]:
    """Both sides with the same non-default output settings (they shape text and parsing)."""
    proxy = psycopg.connect(env.proxy_dsn, autocommit=True)
    plain = psycopg.connect(env.plain_dsn, autocommit=True)
    for conn in (proxy, plain):
        for s in SETTINGS:
            conn.execute(s)
    try:
        yield Env(proxy, plain, env.proxy_dsn, env.plain_dsn, env.proxy_pg, env.plain_pg, env.data, 0.0)
    finally:
        proxy.close()
        plain.close()


@pytest.mark.parametrize("q", _params(SETTINGS_QUERIES))
def test_query_with_session_settings(env_settings: Env, q: Query) -> None:
    check_query(env_settings, q)


# ====================================================================================== writes
@dataclass(frozen=True)
class WriteStep:
    """A write applied to both sides, then checks: ``verify`` queries must answer alike."""

    id: str
    sql: str
    verify: tuple[str, ...] = ()
    params: tuple[Any, ...] | None = None
    allow_unsupported: bool = False  # the proxy may refuse with 0A000 (then neither side writes)


FINGERPRINTS = tuple(f"SELECT count(*), sum(hashtextextended(x::text, 0)) FROM {t} x" for t in TABLES)


def _event_values(ids: Sequence[int], tag: str) -> str:
    rows = []
    for k in ids:
        rows.append(
            f"({k}, {k % 97}, '{tag}', {k % 1000}.25, {k / 7!r}, {'true' if k % 2 else 'false'}, "
            f"'2025-01-01 00:00:00+00'::timestamptz + interval '{abs(k) % 1000} minutes', 'ins é {k}')"
        )
    return ", ".join(rows)


WRITES = [
    WriteStep("insert-single",
              "INSERT INTO events VALUES (300001, 7, 'w', 1.50, 2.5, true, '2025-01-01 00:00:00+00', 'single')",
              ("SELECT * FROM events WHERE id = 300001",)),
    WriteStep("insert-multi-shard",
              f"INSERT INTO events VALUES {_event_values(range(300002, 300052), 'multi')}",
              ("SELECT * FROM events WHERE id BETWEEN 300002 AND 300051", *FINGERPRINTS[3:])),
    WriteStep("insert-columns-defaults",
              "INSERT INTO events (note, id) VALUES ('cols a', 300100), (NULL, -300100), ('日本', 300101)",
              ("SELECT * FROM events WHERE id IN (300100, -300100, 300101)",)),
    WriteStep("insert-returning",
              f"INSERT INTO events VALUES {_event_values([300200, -300200, 10**15 + 300200, 300201], 'ret')} "
              "RETURNING id, amount, score, note",
              ("SELECT * FROM events WHERE kind = 'ret'",)),
    WriteStep("insert-params",
              "INSERT INTO events (id, user_id, kind, amount, note) VALUES (%s, %s, %s, %s, %s), (%s, %s, %s, %s, %s)",
              ("SELECT * FROM events WHERE kind = 'param'",),
              params=(300300, 1, "param", Decimal("12.34"), "p1", 300301, None, "param", None, "p2 ß")),
    WriteStep("upsert-do-update",
              "INSERT INTO events (id, amount, note) VALUES (300001, 99.99, 'upserted'), (300002, -1.00, 'up2'), "
              "(300400, 5.00, 'fresh') ON CONFLICT (id) DO UPDATE SET amount = EXCLUDED.amount, "
              "note = events.note || '+' || EXCLUDED.note RETURNING id, amount, note",
              ("SELECT * FROM events WHERE id IN (300001, 300002, 300400)",)),
    WriteStep("upsert-do-nothing",
              "INSERT INTO events (id, note) VALUES (1, 'nothing'), (300500, 'new') ON CONFLICT DO NOTHING",
              ("SELECT * FROM events WHERE id IN (1, 300500)",)),
    WriteStep("update-by-key",
              "UPDATE events SET amount = amount + 1, note = 'by key' WHERE id = 17",
              ("SELECT * FROM events WHERE id = 17",)),
    WriteStep("update-by-key-returning",
              "UPDATE events SET score = score * 2 WHERE id = 18 RETURNING id, score",
              ("SELECT * FROM events WHERE id = 18",)),
    WriteStep("update-fanout-returning",
              "UPDATE events SET note = 'fanout ü', flag = NOT flag WHERE kind = 'refund' AND amount < -999000 "
              "RETURNING id, note, flag",
              ("SELECT * FROM events WHERE note = 'fanout ü'", FINGERPRINTS[3])),
    WriteStep("update-fanout-count",
              "UPDATE events SET amount = round(amount * 1.1, 2) WHERE flag IS NULL AND kind = 'click' "
              "AND abs(amount) < 1e9",
              (FINGERPRINTS[3],)),
    WriteStep("update-orders-router",
              "UPDATE orders SET status = 'archived' WHERE user_id = 1 AND order_id < 5000",
              ("SELECT status, count(*) FROM orders WHERE user_id = 1 GROUP BY status",)),
    WriteStep("update-join-colocated",
              "UPDATE orders o SET status = 'vip' FROM users u WHERE u.user_id = o.user_id AND u.country = 'IS'",
              (FINGERPRINTS[2],)),
    WriteStep("delete-by-key", "DELETE FROM events WHERE id = 19", ("SELECT * FROM events WHERE id = 19",)),
    WriteStep("delete-fanout",
              "DELETE FROM events WHERE score < -40 AND kind = 'view'",
              (FINGERPRINTS[3], "SELECT count(*) FROM events WHERE score < -40")),
    WriteStep("delete-fanout-returning",
              "DELETE FROM orders WHERE total < -49900 RETURNING user_id, order_id, total",
              (FINGERPRINTS[2],)),
    WriteStep("delete-no-rows", "DELETE FROM events WHERE amount > 1e15", (FINGERPRINTS[3],)),
    WriteStep("insert-select-repartition",
              "INSERT INTO events (id, user_id, kind, amount, score, note) SELECT id + 5000000, user_id, "
              "'ins-sel', amount, score, note FROM events WHERE id BETWEEN 1 AND 400 AND flag",
              ("SELECT * FROM events WHERE kind = 'ins-sel'", FINGERPRINTS[3])),
    WriteStep("insert-select-colocated",
              "INSERT INTO orders SELECT order_id + 10000000000000, user_id, total, 'dup' FROM orders "
              "WHERE user_id IN (2, 3, 50001) AND order_id < 60000",
              ("SELECT user_id, count(*), sum(total) FROM orders WHERE status = 'dup' GROUP BY user_id",
               FINGERPRINTS[2])),
    WriteStep("insert-select-repartition-users",
              "INSERT INTO users SELECT user_id + 3000000, name, country, signup FROM users "
              "WHERE user_id BETWEEN 100 AND 140",
              (FINGERPRINTS[1],)),
    WriteStep("insert-select-returning",
              "INSERT INTO users SELECT user_id + 4000000, name, country, signup FROM users "
              "WHERE user_id BETWEEN 200 AND 240 RETURNING user_id, name",
              (FINGERPRINTS[1],), allow_unsupported=True),
    WriteStep("reference-insert",
              "INSERT INTO countries VALUES ('QQ', 'Qatar-ish ☃', 'Asia'), ('ZZ', '', NULL) RETURNING *",
              (FINGERPRINTS[0], "SELECT c.region, count(*) FROM users u JOIN countries c ON c.code = u.country GROUP BY 1")),
    WriteStep("reference-update",
              "UPDATE countries SET region = 'Eurasia' WHERE code IN ('TR', 'RU')",
              (FINGERPRINTS[0],)),
    WriteStep("users-insert-heavy", "INSERT INTO users VALUES (50001, 'orphan no more', 'QQ', '2025-01-01')",
              ("SELECT u.name, count(*) FROM users u JOIN orders o ON u.user_id = o.user_id "
               "WHERE u.user_id = 50001 GROUP BY u.name", FINGERPRINTS[1])),
]


def _apply(conn: psycopg.Connection[Any], step: WriteStep) -> Result:
    return run_text(conn, step.sql, step.params)


@pytest.mark.parametrize("step", WRITES, ids=[s.id for s in WRITES])
def test_write(env: Env, step: WriteStep) -> None:
    # The proxy first: a refused step must leave both sides alike for the steps after it.
    try:
        got = _apply(env.proxy, step)
    except psycopg.Error as exc:
        if step.allow_unsupported and exc.sqlstate == "0A000":
            return
        pytest.fail(f"{step.sql}\nproxy failed with {exc.sqlstate}: {exc}", pytrace=False)
    want = _apply(env.plain, step)
    compare(got, want, ordered=False, what=step.sql)
    for sql in step.verify:
        check_query(env, Query(f"verify-{step.id}", sql))


TX_WRITES = (
    "UPDATE events SET note = 'in tx' WHERE id = 20",
    "UPDATE events SET note = 'in tx many' WHERE id IN (21, 22, 1000000000000005, -21)",
    "INSERT INTO events (id, note) VALUES (300700, 'tx row'), (-300700, 'tx row')",
    "DELETE FROM orders WHERE user_id = 8 AND order_id % 2 = 0",
)
TX_VERIFY = (
    "SELECT * FROM events WHERE note LIKE 'in tx%' OR note = 'tx row'",
    FINGERPRINTS[2],
    FINGERPRINTS[3],
)


@pytest.mark.parametrize("end", ["ROLLBACK", "COMMIT"])
def test_writes_in_transaction_block(env: Env, end: str) -> None:
    """Writes inside BEGIN ... COMMIT/ROLLBACK: applied all or nothing, or refused with 0A000."""
    with psycopg.connect(env.proxy_dsn, autocommit=True) as proxy:
        proxy.execute("BEGIN")
        try:
            for sql in TX_WRITES:
                proxy.execute(sql)
        except psycopg.Error as exc:
            proxy.execute("ROLLBACK")
            assert exc.sqlstate == "0A000", f"{exc.sqlstate}: {exc}"
            end = "ROLLBACK"  # refused: nothing may have changed
        else:
            proxy.execute(end)
    if end == "COMMIT":
        with env.plain.transaction():
            for sql in TX_WRITES:
                env.plain.execute(sql)
    for sql in TX_VERIFY:
        check_query(env, Query(f"tx-{end}", sql))


async def _executemany(kw: dict[str, Any], rows: list[tuple[Any, ...]]) -> None:
    conn = await asyncpg.connect(**kw)
    try:
        await conn.executemany(
            "INSERT INTO events (id, user_id, kind, amount, score, note) VALUES ($1, $2, $3, $4, $5, $6) "
            "ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note",
            rows,
        )
        await conn.executemany("UPDATE orders SET total = total + $2 WHERE user_id = $1 AND order_id < 2000",
                               [(u, Decimal("0.01")) for u in (1, 2, 3, 404, 50_001)])
    finally:
        await conn.close()


def test_asyncpg_executemany(env: Env) -> None:
    """Many Bind/Execute pairs in one pipeline (asyncpg executemany): every row lands once."""
    rows = [(310_000 + i * 7919 % 1000, i % 50, "many", Decimal(f"{i}.25"), i / 9, f"many é {i}")
            for i in range(120)]  # ids repeat: later rows update earlier ones
    asyncio.run(_executemany(env.proxy_pg, rows))
    asyncio.run(_executemany(env.plain_pg, rows))
    check_query(env, Query("many-rows", "SELECT * FROM events WHERE kind = 'many'"))
    check_query(env, Query("many-fp-events", FINGERPRINTS[3]))
    check_query(env, Query("many-fp-orders", FINGERPRINTS[2]))


def test_copy_into_distributed_table(env: Env) -> None:
    """COPY into a distributed table: either the rows reach the shards, or 0A000 and no row."""
    rows = [(400001 + i, i, "copied", f"{i}.5", i / 3, True, "2025-02-01 00:00:00+00", f"copy ß {i}")
            for i in range(40)]
    text = copy_text(rows)
    try:
        _copy_in(env.proxy, "events", text)
    except psycopg.Error as exc:
        assert exc.sqlstate == "0A000", f"COPY failed with {exc.sqlstate}: {exc}"
        check_query(env, Query("copy-none", "SELECT count(*) FROM events WHERE kind = 'copied'"))
        return
    _copy_in(env.plain, "events", text)
    check_query(env, Query("copy-rows", "SELECT * FROM events WHERE kind = 'copied'"))
    check_query(env, Query("copy-fp", FINGERPRINTS[3]))


AFTER_WRITES = [q for i, q in enumerate(QUERIES) if i % 12 == 1]


@pytest.mark.parametrize("q", _params(AFTER_WRITES))
def test_query_after_writes(env: Env, q: Query) -> None:
    check_query(env, q)


# ====================================================================================== 0A000
UNSUPPORTED = [
    ("non-colocated-join", "SELECT count(*) FROM events JOIN orders ON events.user_id = orders.user_id"),
    ("non-colocated-join-where", "SELECT count(*) FROM events e, users u WHERE e.user_id = u.user_id"),
    ("colocated-join-not-on-key", "SELECT count(*) FROM users u JOIN orders o ON u.name = o.status"),
    ("update-dist-column", "UPDATE events SET id = id + 1 WHERE id = 5"),
    ("update-dist-column-fanout", "UPDATE users SET user_id = user_id + 100000"),
    ("upsert-dist-column", "INSERT INTO users VALUES (1, 'x', 'US', NULL) ON CONFLICT (user_id) "
     "DO UPDATE SET user_id = 7"),
    ("window-row-number", "SELECT id, row_number() OVER (ORDER BY id) FROM events"),
    ("window-partition", "SELECT user_id, sum(amount) OVER (PARTITION BY kind) FROM events"),
    ("window-in-agg-query", "SELECT kind, rank() OVER (ORDER BY count(*)) FROM events GROUP BY kind"),
    ("subquery-in-where", "SELECT count(*) FROM users WHERE user_id IN (SELECT user_id FROM orders WHERE total > 100)"),
    ("subquery-in-from", "SELECT count(*) FROM (SELECT kind FROM events) s"),
    ("subquery-scalar-select", "SELECT id, (SELECT max(total) FROM orders) FROM events WHERE amount > 99999000"),
    ("subquery-exists", "SELECT count(*) FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.user_id)"),
    ("cte-distributed", "WITH x AS (SELECT * FROM events WHERE amount > 0) SELECT count(*) FROM x"),
    ("union", "SELECT id FROM events UNION SELECT user_id FROM users"),
    ("subquery-only-distributed", "SELECT count(*) FROM countries WHERE code IN (SELECT country FROM users)"),
    ("string-agg", "SELECT string_agg(kind, ',') FROM events"),
    ("array-agg", "SELECT kind, array_agg(id) FROM events GROUP BY kind"),
    ("percentile", "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY amount) FROM events"),
    ("grouping-sets", "SELECT kind, flag, count(*) FROM events GROUP BY ROLLUP (kind, flag)"),
    ("insert-expr-key", "INSERT INTO events (id, note) VALUES (1 + 300900, 'expr')"),
    ("distinct-on-order-mismatch-lateral",
     "SELECT count(*) FROM users u, LATERAL (SELECT * FROM orders o WHERE o.user_id = u.user_id LIMIT 1) l"),
    ("join-pinned-different-shards-write",
     "DELETE FROM orders o USING users u WHERE u.user_id = {} AND o.user_id = {}".format(
         *user_pair(same_shard=False))),
]


@pytest.mark.parametrize("sql", [s for _, s in UNSUPPORTED], ids=[i for i, _ in UNSUPPORTED])
def test_unsupported_is_0a000(env: Env, sql: str) -> None:
    with pytest.raises(psycopg.Error) as info:
        got = run_text(env.proxy, sql)
        pytest.fail(f"{sql}\nexpected 0A000, proxy answered {got.tag} with rows {got.rows[:MAX_SHOWN]}",
                    pytrace=False)
    assert info.value.sqlstate == "0A000", f"{sql}\n{info.value.sqlstate}: {info.value}"
