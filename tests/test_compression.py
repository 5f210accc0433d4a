"""The warm tier's compressed chunk format (``policies.compression``) on a real PostgreSQL 15.

Everything runs on ``cluster.nodes[0]`` in a database of its own. The reference for every
comparison is an untouched copy of the data: results are compared as the rows' text forms
(``row::text``), which for floats is the shortest exact form, so -0, NaN and the last bit of a
double all count.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from policies.compression import (
    CompressionSettings,
    Predicate,
    Raw,
    _layout,
    chunk_columns,
    compress_chunk,
    compress_sql,
    compressed_table_ddl,
    compressed_table_name,
    decompress_chunk,
    decompress_sql,
    segment_count_sql,
    select_sql,
    server_has_lz4,
)
from rewriter.quoting import quote_ident

DB = "orochi_compression_test"

# 100 devices, one reading every 10 s (2000 each: 200,000 rows), like a metrics agent sends.
METRICS_SQL = """
CREATE TABLE {name} AS
WITH dev AS (
  SELECT d, (ARRAY['eu-west', 'us-east', 'ap-south', 'eu-north'])[1 + d % 4] AS region,
            (ARRAY['rpi4', 'nuc', 'jetson'])[1 + d % 3] AS model
  FROM generate_series(1, {devices}) d
), steps AS (
  SELECT dev.*, s, random() * 2 - 1 AS r1, random() * 2 - 1 AS r2, random() AS r3, random() AS r4
  FROM dev, generate_series(0, 1999) s
)
SELECT timestamptz '2024-03-01 00:00:00+00' + s * interval '10 seconds' AS time,
       d AS device_id, region, model,
       round((50 + 20 * sin(d + s / 300.0) + 3 * r1)::numeric, 1)::float8 AS cpu,
       round((40 + 0.01 * sum(r2) OVER w)::numeric, 2)::float8 AS temperature,
       (1000000 + sum(round(r1 * 50)) OVER w)::bigint AS mem_free,
       CASE WHEN r3 < 0.99 THEN 'ok' ELSE 'warn' END AS status,
       CASE WHEN r4 < 0.02 THEN NULL
            ELSE round((2 + sin(d + s / 500.0) + 0.05 * sum(r2) OVER w)::numeric, 2)::float8
       END AS load
FROM steps
WINDOW w AS (PARTITION BY d ORDER BY s)
ORDER BY s, d
"""
METRICS_SETTINGS = {"timescaledb.compress_segmentby": "device_id"}
# Measured: 19.99 MB heap -> 1.19 MB compressed, 16.8x (lz4; pglz is within a few percent).
MIN_RATIO = 15.0


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def kw(cluster: Any) -> Iterator[dict[str, Any]]:
    node = cluster.nodes[0]

    async def setup() -> None:
        conn = await asyncpg.connect(**node.connect_kwargs())
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {DB}")
        finally:
            await conn.close()

    async def teardown() -> None:
        conn = await asyncpg.connect(**node.connect_kwargs())
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        finally:
            await conn.close()

    run(setup())
    yield node.connect_kwargs(DB)
    run(teardown())


async def _connect(kw: dict[str, Any]) -> asyncpg.Connection:
    return await asyncpg.connect(**kw)


async def _fingerprint(conn: asyncpg.Connection, query: str, order: str) -> tuple[int, str]:
    """(row count, md5 of the rows' text forms in ``order``)."""
    return tuple(
        await conn.fetchrow(
            f"SELECT count(*), md5(coalesce(string_agg(_x::text, E'\\n' ORDER BY {order}), ''))"
            f" FROM ({query}) _x"
        )
    )


async def _assert_same(conn: asyncpg.Connection, got: str, want: str, order: str) -> int:
    a = await _fingerprint(conn, got, order)
    b = await _fingerprint(conn, want, order)
    if a != b:
        diff = await conn.fetch(
            f"(SELECT 'extra' AS side, _x::text AS r FROM ({got}) _x"
            f" EXCEPT ALL SELECT 'extra', _y::text FROM ({want}) _y)"
            f" UNION ALL (SELECT 'missing', _y::text FROM ({want}) _y"
            f" EXCEPT ALL SELECT 'missing', _x::text FROM ({got}) _x) LIMIT 10"
        )
        pytest.fail(f"{a} != {b}; first differences: {[tuple(r) for r in diff]}")
    return a[0]


async def _make_metrics(conn: asyncpg.Connection, name: str, devices: int) -> None:
    await conn.execute("SELECT setseed(0.42)")
    await conn.execute(METRICS_SQL.format(name=name, devices=devices))


@pytest.fixture(scope="module")
def metrics(kw: dict[str, Any]) -> dict[str, Any]:
    """``metrics_src`` (reference) and ``metrics`` (the chunk), compressed; sizes and timings."""

    async def go() -> dict[str, Any]:
        conn = await _connect(kw)
        try:
            await _make_metrics(conn, "metrics_src", 100)
            await conn.execute("CREATE TABLE metrics AS SELECT * FROM metrics_src")
            heap = await conn.fetchval("SELECT pg_total_relation_size('metrics')")
            cols = await chunk_columns(conn, "public", "metrics")
            settings = CompressionSettings.from_options(METRICS_SETTINGS, "time")
            t0 = time.monotonic()
            await compress_chunk(conn, "public", "metrics", settings, "time")
            took = time.monotonic() - t0
            comp = await conn.fetchval("SELECT pg_total_relation_size('metrics_compressed')")
            heap_after = await conn.fetchval("SELECT pg_relation_size('metrics')")
            return {
                "cols": cols,
                "settings": settings,
                "heap": heap,
                "comp": comp,
                "heap_after": heap_after,
                "took": took,
            }
        finally:
            await conn.close()

    return run(go())


# ------------------------------------------------------------------------------------------
# Settings


def test_settings_from_timescaledb_options() -> None:
    s = CompressionSettings.from_options(METRICS_SETTINGS, "time")
    assert s.segmentby == ["device_id"]
    assert s.orderby == [("time", "DESC", True)]  # TimescaleDB's default, NULLS FIRST as DESC

    s = CompressionSettings.from_options(
        {
            "timescaledb.compress_segmentby": 'device_id, "Site Name"',
            "timescaledb.compress_orderby": 'time ASC, "Seq No" DESC NULLS LAST, x NULLS FIRST',
        },
        "time",
    )
    assert s.segmentby == ["device_id", "Site Name"]
    assert s.orderby == [("time", "ASC", False), ("Seq No", "DESC", False), ("x", "ASC", True)]

    assert CompressionSettings.parse(None, None, "ts") == CompressionSettings(
        [], [("ts", "DESC", True)]
    )
    assert CompressionSettings.parse("ts", "", "ts").orderby == []
    for seg, order in [
        ("a", "a"),  # both segment-by and order-by
        ("a, a", None),
        ("lower(a)", None),
        ("a", "b USING <"),
        ("a; DROP TABLE x", None),
        (None, "t.b"),
    ]:
        with pytest.raises(ValueError):
            CompressionSettings.parse(seg, order, "time")


def test_names_and_ddl() -> None:
    assert compressed_table_name("c1") == "c1_compressed"
    long = "x" * 60
    name = compressed_table_name(long)
    assert (
        len(name) <= 63 and name.endswith("_compressed") and name != compressed_table_name("x" * 61)
    )
    cols = [
        ("time", "timestamptz"),
        ("device id", "int"),
        ("v", "double precision"),
        ("j", "jsonb"),
    ]
    settings = CompressionSettings.parse('"device id"', None, "time")
    ddl = compressed_table_ddl("my schema", "c1", cols, settings, "time", lz4=False)
    assert ddl[0].startswith('CREATE TABLE "my schema".c1_compressed (')
    assert "COMPRESSION pglz" in ddl[0] and "lz4" not in ddl[0]
    assert '"device id" int,' in ddl[0] and "_min_v double precision" in ddl[0]
    assert "_min_j" not in ddl[0]  # jsonb: no min/max
    assert ddl[1] == 'CREATE INDEX ON "my schema".c1_compressed ("device id")'


# ------------------------------------------------------------------------------------------
# The realistic chunk


def test_compression_ratio(metrics: dict[str, Any], kw: dict[str, Any]) -> None:
    ratio = metrics["heap"] / metrics["comp"]
    print(
        f"\nheap {metrics['heap']} B, compressed {metrics['comp']} B: {ratio:.1f}x;"
        f" compress took {metrics['took']:.1f} s"
    )
    assert ratio >= MIN_RATIO
    # The heap part is empty and its pages were returned (VACUUM after the DELETE).
    assert metrics["heap_after"] == 0

    async def go() -> None:
        conn = await _connect(kw)
        try:
            assert await conn.fetchval("SELECT count(*) FROM metrics") == 0
            assert await conn.fetchval("SELECT count(*) FROM metrics_compressed") == 200
            assert await conn.fetchval("SELECT sum(_count) FROM metrics_compressed") == 200_000
            if await server_has_lz4(conn):
                method = await conn.fetchval(
                    "SELECT pg_column_compression(_d4_time) FROM metrics_compressed LIMIT 1"
                )
                assert method == "lz4"
            # The realistic columns are all delta-encoded, one byte per delta except time.
            r = await conn.fetchrow(
                "SELECT count(_d4_time) AS t, count(_d1_cpu) AS c, count(_d1_mem_free) AS m,"
                " count(_d1_load) AS l, count(load) AS l_raw FROM metrics_compressed"
            )
            assert tuple(r) == (200, 200, 200, 200, 0)
        finally:
            await conn.close()

    run(go())


def test_select_equals_original(metrics: dict[str, Any], kw: dict[str, Any]) -> None:
    q = select_sql("public", "metrics", metrics["cols"], metrics["settings"], "time")

    async def go() -> None:
        conn = await _connect(kw)
        try:
            n = await _assert_same(conn, q, "SELECT * FROM metrics_src", "device_id, time")
            assert n == 200_000
            # Names and types are the chunk's own.
            stmt = await conn.prepare(q)
            assert [(a.name, a.type.name) for a in stmt.get_attributes()] == [
                ("time", "timestamptz"),
                ("device_id", "int4"),
                ("region", "text"),
                ("model", "text"),
                ("cpu", "float8"),
                ("temperature", "float8"),
                ("mem_free", "int8"),
                ("status", "text"),
                ("load", "float8"),
            ]
            # Also as Python values (the floats compare bit for bit).
            got = await conn.fetch(f"SELECT * FROM ({q}) x ORDER BY device_id, time LIMIT 5000")
            want = await conn.fetch("SELECT * FROM metrics_src ORDER BY device_id, time LIMIT 5000")
            assert [tuple(r) for r in got] == [tuple(r) for r in want]
        finally:
            await conn.close()

    run(go())


T0 = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
PREDICATE_CASES = [
    # (predicates, the same filter written by hand, segments that may match at most)
    (
        [
            Predicate("time", ">=", T0 + dt.timedelta(hours=1)),
            Predicate("time", "<", T0 + dt.timedelta(hours=2)),
        ],
        "time >= '2024-03-01 01:00+00' AND time < '2024-03-01 02:00+00'",
        100,
    ),
    ([Predicate("device_id", "=", 42)], "device_id = 42", 2),
    ([Predicate("device_id", "IN", [3, 5, 99])], "device_id IN (3, 5, 99)", 6),
    ([Predicate("cpu", ">", 72.5)], "cpu > 72.5", 120),
    (
        [Predicate("device_id", "=", 7), Predicate("time", "<", T0 + dt.timedelta(minutes=30))],
        "device_id = 7 AND time < '2024-03-01 00:30+00'",
        1,
    ),
    ([Predicate("temperature", "<=", 39.5)], "temperature <= 39.5", 10),
    ([Predicate("load", "IS NULL")], "load IS NULL", 200),
    (
        [Predicate("status", "=", "warn"), Predicate("device_id", "<", 10)],
        "status = 'warn' AND device_id < 10",
        18,
    ),
    ([Predicate("region", "=", "nowhere")], "region = 'nowhere'", 0),
    ([Predicate("mem_free", ">", Raw("1000000 + 1500"))], "mem_free > 1001500", 60),
    ([Predicate("model", "<>", "nuc")], "model <> 'nuc'", 132),
]


@pytest.mark.parametrize("preds, where, max_segments", PREDICATE_CASES)
def test_predicates_skip_segments(
    metrics: dict[str, Any],
    kw: dict[str, Any],
    preds: list[Predicate],
    where: str,
    max_segments: int,
) -> None:
    cols, settings = metrics["cols"], metrics["settings"]
    q = select_sql("public", "metrics", cols, settings, "time", preds)

    async def go() -> None:
        conn = await _connect(kw)
        try:
            await _assert_same(
                conn, q, f"SELECT * FROM metrics_src WHERE {where}", "device_id, time"
            )
            segments = await conn.fetchval(
                segment_count_sql("public", "metrics", cols, settings, preds)
            )
            assert segments <= max_segments
            # Only those segments were unnested: the function scan ran once per segment.
            plan = json.loads(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {q}"))
            loops = [
                n["Actual Loops"]
                for n in _plan_nodes(plan[0]["Plan"])
                if n["Node Type"] == "Function Scan"
            ]
            assert loops == [segments] or (segments == 0 and loops in ([], [0]))
        finally:
            await conn.close()

    run(go())


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


# ------------------------------------------------------------------------------------------
# Writes: inserts after compression, decompression, crashes


@pytest.fixture()
def small(kw: dict[str, Any]) -> Iterator[tuple[str, list[tuple[str, str]], CompressionSettings]]:
    """A fresh 20,000-row chunk ``small`` (10 devices) and its reference ``small_src``."""

    async def setup() -> list[tuple[str, str]]:
        conn = await _connect(kw)
        try:
            await conn.execute("DROP TABLE IF EXISTS small, small_src, small_compressed")
            await _make_metrics(conn, "small_src", 10)
            await conn.execute("CREATE TABLE small AS SELECT * FROM small_src")
            return await chunk_columns(conn, "public", "small")
        finally:
            await conn.close()

    cols = run(setup())
    yield "small", cols, CompressionSettings.from_options(METRICS_SETTINGS, "time")


def test_inserts_after_compression_and_decompress(
    small: tuple[str, list[tuple[str, str]], CompressionSettings], kw: dict[str, Any]
) -> None:
    name, cols, settings = small
    q = select_sql("public", name, cols, settings, "time")
    new_rows = (
        "INSERT INTO {t} VALUES ('2024-03-02 00:00+00', 3, 'eu-west', 'nuc', 1.5, 2.25, 7, 'ok', NULL),"
        " ('2024-03-02 00:00+00', NULL, NULL, NULL, NULL, NULL, NULL, NULL, -0.0)"
    )

    async def go() -> None:
        conn = await _connect(kw)
        try:
            await compress_chunk(conn, "public", name, settings, "time")
            await conn.execute(new_rows.format(t=name))
            await conn.execute(new_rows.format(t="small_src"))
            assert await conn.fetchval(f"SELECT count(*) FROM {name}") == 2  # the heap part
            order = "device_id, time, load"
            await _assert_same(conn, q, "SELECT * FROM small_src", order)
            # Compressing again turns the new heap rows into segments of their own.
            await compress_chunk(conn, "public", name, settings, "time", columns=cols)
            assert await conn.fetchval(f"SELECT count(*) FROM {name}") == 0
            await _assert_same(conn, q, "SELECT * FROM small_src", order)
            # Back to rows.
            await decompress_chunk(conn, "public", name, settings, "time")
            assert await conn.fetchval("SELECT count(*) FROM small_compressed") == 0
            await _assert_same(conn, f"SELECT * FROM {name}", "SELECT * FROM small_src", order)
            await _assert_same(conn, q, "SELECT * FROM small_src", order)
        finally:
            await conn.close()

    run(go())


async def _terminate(conn: asyncpg.Connection, victim: asyncpg.Connection) -> None:
    pid = victim.get_server_pid()
    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    for _ in range(200):
        if not await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            break
        await asyncio.sleep(0.05)
    victim.terminate()


@pytest.mark.parametrize("stop_after", ["insert", "delete", "during_insert"])
def test_killed_backend_leaves_one_copy(
    small: tuple[str, list[tuple[str, str]], CompressionSettings],
    kw: dict[str, Any],
    stop_after: str,
) -> None:
    """A backend terminated in the middle of compressing: the heap rows are all there, the
    compressed table is empty; then compression runs to the end and only segments are left."""
    name, cols, settings = small
    q = select_sql("public", name, cols, settings, "time")
    stmts = compress_sql("public", name, cols, settings, "time")
    insert_at = next(i for i, s in enumerate(stmts) if s.startswith("INSERT"))

    async def go() -> None:
        conn = await _connect(kw)
        victim = await _connect(kw)
        try:
            lz4 = await server_has_lz4(conn)
            for s in compressed_table_ddl("public", name, cols, settings, "time", lz4=lz4):
                await conn.execute(s)
            await victim.execute("BEGIN")
            if stop_after == "during_insert":
                for s in stmts[:insert_at]:
                    await victim.execute(s)
                task = asyncio.ensure_future(victim.execute(stmts[insert_at]))
                await asyncio.sleep(0.05)
                await _terminate(conn, victim)
                # Usually killed mid-statement; if it had finished, the transaction was open.
                await asyncio.gather(task, return_exceptions=True)
            else:
                upto = insert_at + 1 if stop_after == "insert" else len(stmts)
                for s in stmts[:upto]:
                    await victim.execute(s)
                await _terminate(conn, victim)
            assert await conn.fetchval(f"SELECT count(*) FROM {name}") == 20_000
            assert await conn.fetchval(f"SELECT count(*) FROM {name}_compressed") == 0
            await _assert_same(conn, q, "SELECT * FROM small_src", "device_id, time")
            # The same statements in one committed transaction: only the segments remain.
            await conn.execute("BEGIN")
            for s in stmts:
                await conn.execute(s)
            await conn.execute("COMMIT")
            assert await conn.fetchval(f"SELECT count(*) FROM {name}") == 0
            assert await conn.fetchval(f"SELECT sum(_count) FROM {name}_compressed") == 20_000
            await _assert_same(conn, q, "SELECT * FROM small_src", "device_id, time")
        finally:
            await conn.close()
            if not victim.is_closed():
                victim.terminate()

    run(go())


# ------------------------------------------------------------------------------------------
# Every supported type, NULLs everywhere (segment-by too), awkward names, edge values

ODD_TABLE = '"Odd Schema"."Odd Chunk"'
ODD_DDL = f"""
CREATE SCHEMA "Odd Schema";
CREATE TABLE {ODD_TABLE} (
    id int4, "Time" timestamptz, ts timestamp, d date, i2 int2, i8 int8, f4 real,
    f8 double precision, num numeric(12, 3), "Text" text, vc varchar(20), b boolean, j jsonb,
    u uuid, "order" int4, "group" text, "select" float8, "_min_f8" int4
)
"""
ODD_ROWS = """
INSERT INTO {table}
SELECT g,
  CASE WHEN g % 50 = 0 THEN NULL WHEN g = 78 THEN 'infinity' WHEN g = 85 THEN '-infinity'
       ELSE timestamptz '2024-01-01 00:00:00.123456+00' + g * interval '1 min'
            + (random() * 1000)::int * interval '1 ms' END,
  CASE WHEN g % 40 = 0 THEN NULL WHEN g = 1499 THEN '4713-01-01 00:00:00 BC'
       ELSE timestamp '1999-12-31 23:59:59' + g * interval '17 s' END,
  CASE WHEN g % 30 = 0 THEN NULL WHEN g = 2500 THEN 'infinity'
       ELSE date '2020-02-28' + g / 10 END,
  CASE WHEN g % 20 = 0 THEN NULL ELSE (random() * 65535 - 32768)::int2 END,
  CASE WHEN g % 25 = 0 THEN NULL WHEN g = 603 THEN 9223372036854775807
       WHEN g = 610 THEN -9223372036854775808 ELSE (g / 3)::int8 END,
  CASE WHEN g % 45 = 0 THEN NULL WHEN g = 904 THEN 'NaN' WHEN g = 911 THEN '-0'
       ELSE round((random() * 100)::numeric, 2)::real END,
  CASE WHEN g % 35 = 0 THEN NULL WHEN g = 106 THEN 'NaN' WHEN g = 113 THEN 'Infinity'
       WHEN g = 120 THEN '-Infinity' WHEN g = 127 THEN '-0' WHEN g = 134 THEN 5e-324
       WHEN g = 141 THEN 1e300 WHEN g = 148 THEN 0.1::float8 + 0.2::float8
       WHEN g % 7 = 1 AND g BETWEEN 2000 AND 2600 THEN random()
       ELSE round((random() * 10)::numeric, 3)::float8 END,
  CASE WHEN g % 33 = 0 THEN NULL WHEN g = 50 THEN 'NaN' ELSE round((random() * 1e6)::numeric, 3) END,
  CASE WHEN g % 10 = 0 THEN NULL WHEN g % 10 = 1 THEN '' WHEN g % 10 = 2 THEN 'it''s "quoted" \\ é ✓'
       ELSE md5(g::text) END,
  CASE WHEN g % 11 = 0 THEN NULL ELSE 'v' || g % 5 END,
  CASE WHEN g % 13 = 0 THEN NULL ELSE random() < 0.5 END,
  CASE WHEN g % 14 = 0 THEN NULL ELSE jsonb_build_object('k', g, 'a', jsonb_build_array(1, 'x', null)) END,
  CASE WHEN g % 15 = 0 THEN NULL ELSE md5(g::text)::uuid END,
  CASE WHEN g % 16 = 0 THEN NULL ELSE g % 100 END,
  CASE WHEN g % 7 = 0 THEN NULL WHEN g % 7 = 1 THEN 'it''s' ELSE 'g' || g % 3 END,
  CASE WHEN g % 17 = 0 THEN NULL ELSE g * 0.5 END,
  CASE WHEN g % 19 = 0 THEN NULL ELSE g END
FROM generate_series(1, 6000) g
"""
ODD_SETTINGS = ('"group"', '"Time" DESC NULLS LAST, id')
# The edge values sit at g % 7 = 1 (group 'it''s'): its segments fall back to raw arrays, the
# other groups' segments are delta-encoded.


def test_types_nulls_and_names(kw: dict[str, Any]) -> None:
    settings = CompressionSettings.parse(*ODD_SETTINGS, "Time")
    preds_cases = [
        ([Predicate("group", "IS NULL")], '"group" IS NULL'),
        ([Predicate("group", "=", "it's")], "\"group\" = 'it''s'"),
        (
            [Predicate("Time", ">=", dt.datetime(2024, 1, 3, tzinfo=dt.UTC))],
            "\"Time\" >= '2024-01-03+00'",
        ),
        ([Predicate("f8", ">", 5.5)], "f8 > 5.5"),
        ([Predicate("f8", "=", float("nan"))], "f8 = 'NaN'"),
        ([Predicate("f4", "<", 3.5)], "f4 < 3.5"),
        (
            [Predicate("i8", "=", 100), Predicate("i2", "IS NOT NULL")],
            "i8 = 100 AND i2 IS NOT NULL",
        ),
        ([Predicate("ts", "<", dt.datetime(2000, 1, 1, 2))], "ts < '2000-01-01 02:00'"),
        ([Predicate("d", ">=", dt.date(2020, 4, 1))], "d >= '2020-04-01'"),
        ([Predicate("num", "<=", 1000)], "num <= 1000"),
        (
            [Predicate("Text", "=", 'it\'s "quoted" \\ é ✓')],
            "\"Text\" = E'it''s \"quoted\" \\\\ é ✓'",
        ),
        ([Predicate("vc", "IN", ["v1", "v3"])], "vc IN ('v1', 'v3')"),
        ([Predicate("b", "=", True)], "b"),
        (
            [Predicate("j", "=", {"k": 5, "a": [1, "x", None]})],
            'j = \'{"k": 5, "a": [1, "x", null]}\'',
        ),
        ([Predicate("u", "=", "c4ca4238-a0b9-2382-0dcc-509a6f75849b")], "u = md5('1')::uuid"),
        ([Predicate("order", "!=", 5)], '"order" <> 5'),
        ([Predicate("_min_f8", ">", 5990)], '"_min_f8" > 5990'),
    ]

    async def go() -> None:
        conn = await _connect(kw)
        try:
            await conn.execute('DROP SCHEMA IF EXISTS "Odd Schema" CASCADE')
            await conn.execute(ODD_DDL)
            await conn.execute("SELECT setseed(0.1)")
            await conn.execute(ODD_ROWS.format(table=ODD_TABLE))
            await conn.execute(f'CREATE TABLE "Odd Schema".odd_src AS SELECT * FROM {ODD_TABLE}')
            cols = await chunk_columns(conn, "Odd Schema", "Odd Chunk")
            q = select_sql("Odd Schema", "Odd Chunk", cols, settings, "Time")
            src = 'SELECT * FROM "Odd Schema".odd_src'
            await compress_chunk(conn, "Odd Schema", "Odd Chunk", settings, "Time")
            comp = '"Odd Schema"."Odd Chunk_compressed"'
            assert await conn.fetchval(f"SELECT count(*) FROM {ODD_TABLE}") == 0
            assert await conn.fetchval(f"SELECT sum(_count) FROM {comp}") == 6000
            # Edge values pushed some segments to the raw arrays, the rest are delta-encoded.
            lay = _layout("Odd Schema", "Odd Chunk", cols, settings)
            assert lay.col("f8").min == "_min_7"  # "_min_f8" is a user column
            for name in ("Time", "ts", "d", "i8", "f4", "f8"):
                c = lay.col(name)
                raw, enc = await conn.fetchrow(
                    f"SELECT count({quote_ident(c.raw)}), count(coalesce("
                    + ", ".join(f"{quote_ident(n)}::text" for n in (c.d1, c.d2, c.d4))
                    + f")) FROM {comp}"
                )
                assert raw >= 1 and enc >= 1, name
            assert await _assert_same(conn, q, src, "id") == 6000
            for preds, where in preds_cases:
                pq = select_sql("Odd Schema", "Odd Chunk", cols, settings, "Time", preds)
                await _assert_same(conn, pq, f"{src} WHERE {where}", "id")
            await decompress_chunk(conn, "Odd Schema", "Odd Chunk", settings, "Time")
            await _assert_same(conn, f"SELECT * FROM {ODD_TABLE}", src, "id")
        finally:
            await conn.close()

    run(go())


def test_no_segmentby_pglz_and_sql_lists(kw: dict[str, Any]) -> None:
    """No segment-by columns (segments in time order over the whole chunk), pglz, and the raw
    statement lists run by hand."""
    settings = CompressionSettings.parse(None, None, "time")
    cols = [
        ("time", "timestamp with time zone"),
        ("v", "integer"),
        ("tag", "character varying(10)"),
    ]

    async def go() -> None:
        conn = await _connect(kw)
        try:
            await conn.execute("DROP TABLE IF EXISTS plain, plain_src, plain_compressed")
            await conn.execute(
                "CREATE TABLE plain (time timestamptz, v int, tag varchar(10));"
                " INSERT INTO plain SELECT timestamptz '2024-01-01+00' + g * interval '1 s',"
                " CASE WHEN g % 9 = 0 THEN NULL ELSE g * g END, 't' || g % 4"
                " FROM generate_series(1, 2500) g;"
                " CREATE TABLE plain_src AS SELECT * FROM plain"
            )
            for s in compressed_table_ddl("public", "plain", cols, settings, "time", lz4=False):
                await conn.execute(s)
            async with conn.transaction():
                for s in compress_sql("public", "plain", cols, settings, "time", truncate=True):
                    await conn.execute(s)
            assert await conn.fetchval("SELECT count(*) FROM plain_compressed") == 3
            assert await conn.fetchval(
                "SELECT array_agg(_count ORDER BY _min_time) FROM plain_compressed"
            ) == [500, 1000, 1000]
            assert await conn.fetchval(
                "SELECT pg_column_compression(_d4_v) FROM plain_compressed LIMIT 1"
            ) in ("pglz", None)
            q = select_sql("public", "plain", cols, settings, "time")
            await _assert_same(conn, q, "SELECT * FROM plain_src", "time")
            pq = select_sql("public", "plain", cols, settings, "time", [Predicate("v", "<", 100)])
            await _assert_same(conn, pq, "SELECT * FROM plain_src WHERE v < 100", "time")
            async with conn.transaction():
                for s in decompress_sql("public", "plain", cols, settings, "time", truncate=True):
                    await conn.execute(s)
            await _assert_same(conn, "SELECT * FROM plain", "SELECT * FROM plain_src", "time")
        finally:
            await conn.close()

    run(go())
