"""Chunk arithmetic and WHERE-clause time bounds (rewriter/timerange.py), checked against
TimescaleDB's formulas and against PostgreSQL itself.

Why: the proxy will skip every chunk outside the range :func:`time_bounds` derives. A range that
is too narrow silently drops rows, so the central property is *soundness*: for random WHERE
clauses (AND/OR/NOT, BETWEEN, IN, ANY/ALL, parameters, now() arithmetic, typed and untyped
literals, unsupported forms mixed in) over random rows, every row PostgreSQL returns lies in the
derived range, in three session time zones and four column types. *Exactness* is checked too:
each supported value expression must evaluate to PostgreSQL's own value (DST gaps and folds,
month arithmetic, interval syntax, typmod rounding), and simple comparisons must give the tight
range. Chunk ranges are compared with a literal port of TimescaleDB's
``calculate_open_range_default``.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parse_sql

from rewriter.timerange import (
    EMPTY,
    FULL,
    INT64_MAX,
    INT64_MIN,
    NOBEGIN,
    NOEND,
    TIMESTAMP_INTERNAL_MIN,
    USECS_PER_DAY,
    Range,
    chunk_range,
    chunks_overlapping,
    clamp,
    from_internal,
    time_bounds,
    to_internal,
    type_max,
    type_min,
)

ZONES = ("UTC", "Europe/Berlin", "America/New_York")
PROPS = settings(
    # more with OROCHI_PROPERTY_EXAMPLES=2000 when changing the code under test
    max_examples=int(os.environ.get("OROCHI_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
H = 3_600_000_000
D = USECS_PER_DAY


def where(sql: str):  # noqa: ANN201
    return parse_sql("SELECT * FROM t WHERE " + sql)[0].stmt.whereClause


def bounds(
    sql: str, *, params: dict[int, str] | None = None, now: datetime | None = None, **kw
) -> Range:  # noqa: ANN003
    p = params or {}
    return time_bounds(where(sql), "ts", {"t"}, p.get, now, **kw)


def us(text: str, type_name: str = "timestamptz", tz: str = "UTC") -> int:
    return to_internal(type_name, text, tz)


# ------------------------------------------------------------------------ chunk arithmetic


def timescale_open_range(value: int, interval: int, type_name: str) -> tuple[int, int]:
    """TimescaleDB's calculate_open_range_default (src/dimension.c), C division and all."""

    def cdiv(a: int, b: int) -> int:
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q

    if value < 0:
        end = cdiv(value + 1, interval) * interval
        start = INT64_MIN if type_min(type_name) - end > -interval else end - interval
    else:
        start = cdiv(value, interval) * interval
        end = INT64_MAX if type_max(type_name) - start < interval else start + interval
    return start, end


def test_chunk_range_examples() -> None:
    week = 7 * D
    assert chunk_range(0, week) == (0, week)
    assert chunk_range(week - 1, week) == (0, week)
    assert chunk_range(-1, week) == (-week, 0)
    assert chunk_range(-week, week) == (-week, 0)
    assert chunk_range(-week - 1, week) == (-2 * week, -week)
    assert chunk_range(32767, 1000, "smallint") == (32000, INT64_MAX)
    assert chunk_range(-32768, 1000, "smallint") == (INT64_MIN, -32000)
    assert chunk_range(us("2024-01-03 12:00+00"), week) == (
        us("2023-12-28 00:00+00"),
        us("2024-01-04 00:00+00"),
    )
    assert clamp("smallint", 10**6) == 32767 and clamp("timestamptz", NOEND) == NOEND
    with pytest.raises(ValueError):
        chunk_range(5, 0)


@given(
    type_name=st.sampled_from(
        ["timestamptz", "timestamp", "date", "smallint", "integer", "bigint"]
    ),
    data=st.data(),
)
@settings(max_examples=300, deadline=None)
def test_chunk_range_matches_timescaledb(type_name: str, data: st.DataObject) -> None:
    lo, hi = type_min(type_name), type_max(type_name)
    interval = data.draw(
        st.one_of(st.integers(1, 1000), st.integers(1, hi), st.sampled_from([7 * D, D, H]))
    )
    value = data.draw(
        st.one_of(
            st.integers(lo, hi),
            st.integers(lo, lo + 3 * interval),
            st.integers(hi - 3 * interval, hi),
            st.integers(-3000, 3000),
        ).filter(lambda v: lo <= v <= hi)
    )
    start, end = chunk_range(value, interval, type_name)
    assert (start, end) == timescale_open_range(value, interval, type_name)
    assert start <= value and (value < end or end == INT64_MAX)  # an open last chunk holds the max


def test_internal_conversions() -> None:
    # test/expected/timestamp.out: _timescaledb_internal.to_unix_microseconds(
    #   '2017-02-07 15:09:36.236538+00') = 1486480176236538
    assert us("2017-02-07 15:09:36.236538+00") == 1486480176236538
    # "Julian day zero is -210866803200000000 microseconds from UNIX epoch" (the minimum)
    assert TIMESTAMP_INTERNAL_MIN == -210866803200000000 == type_min("timestamp")
    assert us("2000-01-01", "date") == 946684800000000 == us("2000-01-01 00:00", "timestamp")
    assert us("2024-07-01 12:00", tz="Europe/Berlin") == us("2024-07-01 10:00Z")
    assert us("2024-07-01 12:00+02", "timestamp") == us(
        "2024-07-01 12:00", "timestamp"
    )  # zone ignored
    assert us("infinity") == NOEND and us("-infinity", "timestamp") == NOBEGIN
    assert to_internal("integer", 42) == 42 and to_internal("bigint", " -7 ") == -7
    assert to_internal("timestamptz", datetime(2024, 1, 1, tzinfo=UTC)) == us("2024-01-01Z")
    assert to_internal("timestamptz", datetime(2024, 1, 1), "America/New_York") == us(
        "2024-01-01 05:00Z"
    )
    assert to_internal("timestamp", datetime(2024, 1, 1, tzinfo=UTC), "Europe/Berlin") == us(
        "2024-01-01 01:00", "timestamp"
    )
    assert to_internal("date", date(1969, 12, 31)) == -D
    for bad in ("yesterday", "2024-13-01", "01/02/2024", "2024-01-01 25:00"):
        with pytest.raises(ValueError):
            us(bad)
    with pytest.raises(ValueError):
        to_internal("smallint", 40000)
    v = us("2031-05-06 07:08:09.123456+00")
    assert from_internal("timestamptz", v) == datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert from_internal("timestamp", v) == datetime(2031, 5, 6, 7, 8, 9, 123456)
    assert from_internal("date", us("2031-05-06", "date")) == date(2031, 5, 6)
    assert from_internal("timestamptz", NOEND) == "infinity" and from_internal("smallint", 3) == 3


def test_chunks_overlapping() -> None:
    chunks = [(0, 10), (10, 20), (10, 20), (30, 40), (40, 50)]
    assert chunks_overlapping(FULL, chunks) == chunks
    assert chunks_overlapping(EMPTY, chunks) == []
    assert chunks_overlapping(Range(10, 20), chunks) == [(10, 20), (10, 20)]
    assert chunks_overlapping(Range(9, 10), chunks) == [(0, 10)]
    assert chunks_overlapping(Range(20, 30), chunks) == []
    assert chunks_overlapping(Range(None, 31), chunks) == chunks[:4]
    assert chunks_overlapping(Range(45, None), chunks) == [(40, 50)]


# ------------------------------------------------------------------------ exact ranges

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("clause", "expected"),
    [
        ("ts >= '2024-01-01' AND ts < '2024-02-01'", Range(us("2024-01-01Z"), us("2024-02-01Z"))),
        ("'2024-01-01' <= t.ts AND '2024-02-01' > ts", Range(us("2024-01-01Z"), us("2024-02-01Z"))),
        (
            "ts > '2024-01-01' AND ts <= '2024-02-01'",
            Range(us("2024-01-01Z") + 1, us("2024-02-01Z") + 1),
        ),
        (
            "ts = timestamptz '2024-01-01 10:00+02'",
            Range(us("2024-01-01 08:00Z"), us("2024-01-01 08:00Z") + 1),
        ),
        (
            "ts BETWEEN '2024-01-01'::date AND '2024-01-31'",
            Range(us("2024-01-01Z"), us("2024-01-31Z") + 1),
        ),
        (
            "ts BETWEEN SYMMETRIC '2024-01-31' AND '2024-01-01'",
            Range(us("2024-01-01Z"), us("2024-01-31Z") + 1),
        ),
        (
            "ts IN ('2024-03-01', '2024-01-01', NULL)",
            Range(us("2024-01-01Z"), us("2024-03-01Z") + 1),
        ),
        (
            "ts = ANY(ARRAY['2024-03-01'::timestamptz, '2024-01-01'])",
            Range(us("2024-01-01Z"), us("2024-03-01Z") + 1),
        ),
        (
            "ts = ANY('{2024-03-01,\"2024-01-01 00:00+00\"}')",
            Range(us("2024-01-01Z"), us("2024-03-01Z") + 1),
        ),
        ("ts < ALL('{2024-03-01,2024-01-01}'::date[])", Range(None, us("2024-01-01Z"))),
        ("ts > ANY('{2024-03-01,2024-01-01}'::timestamptz[])", Range(us("2024-01-01Z") + 1, None)),
        ("ts >= now() - interval '7 days'", Range(us("2024-04-24 12:00Z"), None)),
        (
            "ts >= now() - '1 month'::interval AND ts < current_date",
            Range(us("2024-04-01 12:00Z"), us("2024-05-01Z")),
        ),
        (
            "ts > current_timestamp + INTERVAL '1 day 02:00'",
            Range(us("2024-05-02 14:00Z") + 1, None),
        ),
        ("ts >= $1 AND ts < $2::date + 1", Range(us("2024-01-01 00:00Z"), us("2024-01-03Z"))),
        ("ts >= '2024-01-01' OR ts < '2023-01-01'", FULL),
        (
            "(ts >= '2024-01-01' AND ts < '2024-01-02') OR ts = '2024-03-01'",
            Range(us("2024-01-01Z"), us("2024-03-01Z") + 1),
        ),
        (
            "ts >= '2024-01-01' AND (ts < '2024-02-01' OR ts <> '2025-01-01')",
            Range(us("2024-01-01Z"), None),
        ),
        ("ts NOT BETWEEN '2024-01-01' AND '2024-02-01'", FULL),
        ("NOT ts < '2024-01-01'", FULL),
        ("ts NOT IN ('2024-01-01')", FULL),
        (
            "ts <> '2024-01-01' AND date_trunc('day', ts) = '2024-01-01' AND ts + interval '1 h' > now()",
            FULL,
        ),
        ("ts = NULL", EMPTY),
        (
            "ts > '2024-01-01' AND ts < '2023-01-01'",
            Range(us("2024-01-01Z") + 1, us("2023-01-01Z")),
        ),
        ("false OR ts = '2024-01-01'", Range(us("2024-01-01Z"), us("2024-01-01Z") + 1)),
        (
            "ts >= '2024-01-01' AND x.ts < '2024-02-01' AND ts::date = '2024-01-05'",
            Range(us("2024-01-01Z"), None),
        ),
        ("ts < 'infinity' AND ts > '-infinity'", FULL),
        ("ts = 'infinity'", Range(NOEND, None)),
        ("ts < 'yesterday' AND ts < '01/02/2024' AND ts < statement_timestamp()", FULL),
    ],
)
def test_exact_ranges(clause: str, expected: Range) -> None:
    got = bounds(clause, params={1: "2024-01-01 00:00:00+00", 2: "2024-01-02"}, now=NOW)
    if expected.empty:
        assert got.empty, got
    else:
        assert got == expected


def test_exact_ranges_other_types_and_zones() -> None:
    berlin = {"timezone": "Europe/Berlin"}
    assert bounds("ts >= '2024-07-01' AND ts < '2024-07-02'", **berlin) == Range(
        us("2024-06-30 22:00Z"), us("2024-07-01 22:00Z")
    )
    assert bounds("ts >= current_date", now=NOW, timezone="Pacific/Auckland") == Range(
        us("2024-05-01 12:00Z"), None
    )
    # timestamp column: local times, zone suffixes ignored; a timestamptz value widens by a day
    ts = {"column_type": "timestamp"}
    assert bounds("ts >= '2024-01-01 10:00+05' AND ts < '2024-01-02'", **ts) == Range(
        us("2024-01-01 10:00", "timestamp"), us("2024-01-02", "timestamp")
    )
    assert bounds("ts >= timestamptz '2024-01-01 10:00+00'", **ts, **berlin) == Range(
        us("2024-01-01 11:00", "timestamp") - 2 * D, None
    )
    # date column: whole days
    dt = {"column_type": "date"}
    assert bounds("ts > '2024-01-01' AND ts <= timestamp '2024-01-05 12:00'", **dt) == Range(
        us("2024-01-02", "date"), us("2024-01-06", "date")
    )
    assert bounds("ts = current_date - 1", now=NOW, **dt) == Range(
        us("2024-04-30", "date"), us("2024-05-01", "date")
    )
    # integers, including decimals and parameters
    it = {"column_type": "integer"}
    assert bounds("ts > 5 AND ts <= 7.5", **it) == Range(6, 8)
    assert bounds("ts >= 2.5 AND ts < '10'", **it) == Range(3, 10)
    assert bounds("ts = 7.5", **it).empty
    assert bounds("ts = ANY($1) OR ts BETWEEN -3 AND -1", params={1: "{4,NULL,9}"}, **it) == Range(
        -3, 10
    )
    assert bounds("ts < 100 - 1", **it) == Range(None, 99)
    # without now, now() is unbounded; an unknown parameter too
    assert bounds("ts > now() AND ts < $3", now=None) == FULL


# ------------------------------------------------------------------------ against PostgreSQL


@pytest.fixture(scope="module")
def pg(cluster) -> Iterator[psycopg.Connection]:
    kw = dict(cluster.nodes[1].connect_kwargs())
    kw["dbname"] = kw.pop("database")
    conn = psycopg.connect(**kw, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def exec_params(
    conn: psycopg.Connection, sql: str, params: list[str]
) -> list[tuple[str | None, ...]]:
    """Run ``sql`` with ``$n`` parameters sent as untyped text, like a client's Bind."""
    res = conn.pgconn.exec_params(sql.encode(), [p.encode() for p in params])
    if res.status != psycopg.pq.ExecStatus.TUPLES_OK:
        raise AssertionError(f"{res.error_message.decode()}\n{sql}\n{params}")
    return [
        tuple(
            None if (v := res.get_value(r, c)) is None else v.decode() for c in range(res.nfields)
        )
        for r in range(res.ntuples)
    ]


@dataclass
class Clause:
    """A WHERE clause under construction: SQL, its ``$n`` texts, and the value expressions whose
    values (and neighbours) go into the row set."""

    params: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)

    def param(self, text: str) -> str:
        self.params.append(text)
        return f"${len(self.params)}"


# Local times at DST changes of the zones (gaps and folds), and ordinary ones.
DST_LOCAL = [
    datetime(2024, 3, 10, 2, 30),
    datetime(2024, 11, 3, 1, 30),
    datetime(2024, 3, 31, 2, 30),
    datetime(2024, 10, 27, 2, 30),
    datetime(2024, 3, 10, 1, 59, 59, 999999),
    datetime(2024, 10, 27, 3, 0),
]
local_times = st.one_of(
    st.sampled_from(DST_LOCAL),
    st.datetimes(min_value=datetime(2023, 1, 1), max_value=datetime(2025, 12, 31)),
    st.datetimes(min_value=datetime(2023, 1, 1), max_value=datetime(2025, 12, 31)).map(
        lambda d: d.replace(second=0, microsecond=0)
    ),
)
ZONE_SUFFIXES = [
    "",
    "",
    "",
    "+00",
    "Z",
    " UTC",
    "+05:30",
    "-0800",
    "-03",
    " Europe/Berlin",
    " America/New_York",
]
UNITS = {
    "us": ["microseconds", "us", "usec"],
    "ms": ["milliseconds", "ms", "msec"],
    "s": ["seconds", "second", "sec", "secs", "s"],
    "min": ["minutes", "min", "mins", "minute", "m"],
    "h": ["hours", "hour", "h", "hr", "hrs"],
    "d": ["days", "day", "d"],
    "w": ["weeks", "week", "w"],
    "mon": ["months", "month", "mon", "mons"],
    "y": ["years", "year", "y", "yr"],
}


@st.composite
def interval_texts(draw: st.DrawFn) -> str:
    parts = []
    kinds = draw(
        st.lists(st.sampled_from(sorted(UNITS)), min_size=1, max_size=3, unique=True)
    )  # PG rejects repeats
    for kind in kinds:
        n = draw(st.integers(-40, 40))
        # PostgreSQL rejects a fraction that spills into a field given explicitly too
        finer = {"s": {"ms", "us"}, "ms": {"us"}}.get(kind, set())
        if (
            kind in ("s", "min", "h", "d", "w", "ms")
            and not finer & set(kinds)
            and draw(st.booleans())
        ):
            num = f"{n}.{draw(st.sampled_from(['5', '25', '1', '75']))}" if n >= 0 else f"-{-n}.5"
        else:
            num = str(n)
        parts.append(f"{num} {draw(st.sampled_from(UNITS[kind]))}")
    if not set(kinds) & {"h", "min", "s", "ms", "us"} and draw(st.booleans()):
        parts.append(draw(st.sampled_from(["02:00", "-01:30", "10:30:00", "00:00:01.5", "1:2:3"])))
    text = " ".join(parts)
    if draw(st.integers(0, 4)) == 0:
        text = "@ " + text + " ago"
    return text


@st.composite
def time_values(draw: st.DrawFn, c: Clause, zone: str, depth: int = 0) -> str:
    """A value expression of a timestamp type that time_bounds claims to understand."""
    local = draw(local_times)
    text = local.isoformat(sep=draw(st.sampled_from([" ", "T"])))
    kind = draw(st.integers(0, 12 if depth == 0 else 9))
    if kind == 0:
        return f"'{text}{draw(st.sampled_from(ZONE_SUFFIXES))}'::timestamptz"
    if kind == 1:
        return f"timestamptz '{text}{draw(st.sampled_from(ZONE_SUFFIXES))}'"
    if kind == 2:
        return f"CAST('{text}' AS timestamp)"
    if kind == 3:
        return f"date '{local.date().isoformat()}'"
    if kind == 4:
        p = draw(st.integers(0, 5))
        return f"'{text}{draw(st.sampled_from(ZONE_SUFFIXES))}'::{draw(st.sampled_from(['timestamp', 'timestamptz']))}({p})"
    if kind == 5:
        return c.param(text + draw(st.sampled_from(ZONE_SUFFIXES))) + "::timestamptz"
    if kind == 6:
        return draw(
            st.sampled_from(
                [
                    "now()",
                    "current_timestamp",
                    "current_timestamp(0)",
                    "localtimestamp",
                    "localtimestamp(2)",
                    "current_date",
                    "transaction_timestamp()",
                    "pg_catalog.now()",
                ]
            )
        )
    if kind in (7, 8, 9):
        base = draw(time_values(c, zone, depth + 1))
        iv = draw(interval_texts())
        ivx = draw(st.sampled_from([f"interval '{iv}'", f"'{iv}'::interval", f"INTERVAL '{iv}'"]))
        if kind == 9 and draw(st.booleans()):
            return f"({ivx} + {base})"
        return f"({base} {draw(st.sampled_from(['+', '-']))} {ivx})"
    if kind == 10:
        return f"(date '{local.date().isoformat()}' {draw(st.sampled_from(['+', '-']))} {draw(st.integers(-400, 400))})"
    if kind == 11:
        return f"(current_date - {draw(st.integers(-40, 40))})"
    return f"('{text}'::timestamp - {c.param(draw(interval_texts()))}::interval)"


@PROPS
@given(data=st.data(), zone=st.sampled_from(ZONES))
def test_values_equal_postgres(pg: psycopg.Connection, data: st.DataObject, zone: str) -> None:
    """Each supported value expression evaluates to exactly PostgreSQL's value."""
    c = Clause()
    exprs = [data.draw(time_values(c, zone)) for _ in range(8)]
    pg.execute(f"SET timezone = '{zone}'")
    with pg.transaction():
        cols = ", ".join(
            f"(extract(epoch FROM ({e})::timestamptz) * 1000000)::bigint" for e in exprs
        )
        row = exec_params(
            pg, f"SELECT (extract(epoch FROM now()) * 1000000)::bigint, {cols}", c.params
        )[0]
    now = from_internal("timestamptz", int(row[0]))
    assert isinstance(now, datetime)
    for e, got in zip(exprs, row[1:], strict=True):
        r = bounds(f"ts = {e}", params=dict(enumerate(c.params, 1)), now=now, timezone=zone)
        assert r == Range(int(got), int(got) + 1), (
            e,
            zone,
            c.params,
            from_internal("timestamptz", int(got)),
        )


@st.composite
def int_values(draw: st.DrawFn, c: Clause) -> str:
    kind = draw(st.integers(0, 4))
    n = draw(st.integers(-200, 200))
    if kind == 0:
        return str(n)
    if kind == 1:
        return f"{n}.{draw(st.sampled_from(['5', '25', '0', '99']))}"
    if kind == 2:
        return f"'{n}'"
    if kind == 3:
        return c.param(str(n))
    return f"({n} {draw(st.sampled_from(['+', '-']))} {draw(st.integers(0, 50))})"


@st.composite
def clauses(draw: st.DrawFn, c: Clause, ctype: str, zone: str, depth: int = 0) -> str:
    """A random WHERE clause over ``ts``; its value expressions are recorded in ``c.values``."""

    def value() -> str:
        v = draw(int_values(c)) if ctype == "bigint" else draw(time_values(c, zone))
        c.values.append(v)
        return v

    col = draw(st.sampled_from(["ts", "t.ts"]))
    if depth < 3 and draw(st.integers(0, 2)) == 0:
        op = draw(st.sampled_from(["AND", "OR", "AND NOT"]))
        left, right = (
            draw(clauses(c, ctype, zone, depth + 1)),
            draw(clauses(c, ctype, zone, depth + 1)),
        )
        return f"({left} {op} {right})"
    kind = draw(st.integers(0, 9))
    op = draw(st.sampled_from(["=", "<", "<=", ">", ">="]))
    if kind <= 2:
        return f"{col} {op} {value()}"
    if kind == 3:
        return f"{value()} {op} {col}"
    if kind == 4:
        sym = draw(st.sampled_from(["", "SYMMETRIC ", "NOT "]))
        return (
            f"{col} {'NOT BETWEEN ' if sym == 'NOT ' else 'BETWEEN ' + sym}{value()} AND {value()}"
        )
    if kind == 5:
        items = [value() for _ in range(draw(st.integers(1, 3)))] + (
            ["NULL"] if draw(st.booleans()) else []
        )
        return f"{col} {draw(st.sampled_from(['IN', 'NOT IN']))} ({', '.join(items)})"
    if kind == 6:
        items = [value() for _ in range(draw(st.integers(0, 3)))]
        typ = "bigint" if ctype == "bigint" else "timestamptz"
        return f"{col} {op} {draw(st.sampled_from(['ANY', 'ALL']))} (ARRAY[{', '.join(items)}]::{typ}[])"
    if kind == 7:  # an array literal or parameter whose elements are rows' values
        n = draw(st.integers(0, 3))
        if ctype == "bigint":
            elems = [str(draw(st.integers(-200, 200))) for _ in range(n)]
            typ = "bigint"
        else:
            elems = [
                f'"{draw(local_times).isoformat(sep=" ")}{draw(st.sampled_from(ZONE_SUFFIXES))}"'
                for _ in range(n)
            ]
            typ = "timestamptz"
        c.values.extend(
            e if ctype == "bigint" else f"{typ} {e.replace(chr(34), chr(39))}" for e in elems
        )
        arr = "{" + ",".join(elems + (["NULL"] if draw(st.booleans()) else [])) + "}"
        target = c.param(arr) if draw(st.booleans()) else f"'{arr}'::{typ}[]"
        return f"{col} {op} {draw(st.sampled_from(['ANY', 'ALL']))} ({target})"
    if kind == 8:  # forms time_bounds must leave unbounded
        v = value()
        step = "1" if ctype == "bigint" else "interval '1 hour'"
        return draw(
            st.sampled_from(
                [
                    f"{col} <> {v}",
                    f"{col} IS NULL",
                    f"{col} IS NOT NULL",
                    f"({col} + {step}) > {v}",
                    f"{col}::text > '2'",
                    f"{col} > (SELECT ({v})::{ctype})",
                    f"coalesce({col}, {v}) = {v}",
                ]
            )
        )
    return draw(st.sampled_from(["true", "false", "NULL::boolean", f"{col} = NULL"]))


COLUMN_SQL = {  # a column value as its internal integer
    "timestamptz": "(extract(epoch FROM {x}) * 1000000)::bigint",
    "timestamp": "(extract(epoch FROM {x}) * 1000000)::bigint",
    "date": "(({x}) - date '1970-01-01')::bigint * 86400000000",
    "bigint": "({x})::bigint",
}


def literal_of(internal: int, ctype: str) -> str:
    v = from_internal(ctype, internal)
    if isinstance(v, datetime):
        return v.isoformat(sep=" ")
    if isinstance(v, date):
        return v.isoformat()
    return str(v)


@PROPS
@given(
    data=st.data(),
    zone=st.sampled_from(ZONES),
    ctype=st.sampled_from(["timestamptz", "timestamptz", "timestamp", "date", "bigint"]),
)
def test_bounds_are_sound(
    pg: psycopg.Connection, data: st.DataObject, zone: str, ctype: str
) -> None:
    """Every row PostgreSQL selects lies inside the derived range; simple clauses are tight."""
    c = Clause()
    clause = data.draw(clauses(c, ctype, zone))
    step = 1 if ctype in ("timestamptz", "timestamp", "bigint") else D
    pg.execute(f"SET timezone = '{zone}'")
    with pg.transaction():
        cast = COLUMN_SQL[ctype]
        cols = "".join(f", {cast.format(x=f'({v})::{ctype}')}" for v in c.values)
        used = " ".join(c.values)
        # A parameter only the clause uses still needs a type in this query.
        cols += "".join(
            f", ${n}::text IS NULL"
            for n in range(1, len(c.params) + 1)
            if not re.search(rf"\${n}\b", used)
        )
        row = exec_params(
            pg, f"SELECT (extract(epoch FROM now()) * 1000000)::bigint{cols}", c.params
        )[0]
        now = from_internal("timestamptz", int(row[0]))
        assert isinstance(now, datetime)
        # Rows: each value and its neighbours, plus random others.
        rows: set[int] = set()
        for v in row[1 : 1 + len(c.values)]:
            if v is not None:
                rows.update(int(v) + k * step for k in (-1, 0, 1))
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        if ctype == "bigint":
            rows.update(rng.randint(-300, 300) for _ in range(40))
        else:
            base = us("2023-01-01", "timestamp")
            rows.update(
                base + rng.randrange(0, 3 * 365) * D + (0 if ctype == "date" else rng.randrange(D))
                for _ in range(40)
            )
        array = "{" + ",".join(f'"{literal_of(r, ctype)}"' for r in sorted(rows)) + "}"
        # Parameters of value expressions an unsupported form dropped: typed, always true.
        unused = "".join(
            f" AND ${n}::text IS NOT NULL"
            for n in range(1, len(c.params) + 1)
            if not re.search(rf"\${n}\b", clause)
        )
        res = exec_params(
            pg,
            f"SELECT count(*), min({cast.format(x='ts')}), max({cast.format(x='ts')})"
            f" FROM unnest(${len(c.params) + 1}::{ctype}[]) AS t(ts) WHERE ({clause}){unused}",
            [*c.params, array],
        )[0]
    r = bounds(
        clause, params=dict(enumerate(c.params, 1)), now=now, column_type=ctype, timezone=zone
    )
    count = int(res[0] or 0)
    if count:
        lo, hi = int(res[1]), int(res[2])
        assert r.contains(lo) and r.contains(hi), (clause, c.params, r, lo, hi, zone)
    # Tight for a single comparison of a timestamptz column with a supported value.
    simple = clause.split(" ", 2)
    if (
        ctype == "timestamptz"
        and count
        and len(simple) == 3
        and simple[1] in ("=", "<", "<=", ">", ">=")
        and simple[0] in ("ts", "t.ts")
        and " ANY " not in clause
        and " ALL " not in clause
    ):
        assert (r.lo is None or r.lo == lo) and (r.hi is None or r.hi == hi + 1), (
            clause,
            r,
            lo,
            hi,
        )


@given(texts=st.lists(interval_texts(), min_size=1, max_size=10))
@settings(max_examples=40, deadline=None)
def test_interval_syntax_equals_postgres(pg: psycopg.Connection, texts: list[str]) -> None:
    """The interval parser gives PostgreSQL's (months, days, microseconds) for what it accepts."""
    cols = ", ".join(
        f"(extract(epoch FROM timestamp '2001-01-31 12:00' + CAST($${t}$$ AS interval)) * 1000000)::bigint"
        for t in texts
    )
    row = pg.execute(f"SELECT {cols}").fetchone()
    assert row is not None
    for t, got in zip(texts, row, strict=True):
        r = bounds(f"ts = timestamp '2001-01-31 12:00' + interval '{t}'", column_type="timestamp")
        assert r == Range(got, got + 1), t


def test_dst_rule_examples(pg: psycopg.Connection) -> None:
    """Local times in a gap or fold: PostgreSQL takes the later instant; so does time_bounds."""
    cases = [
        ("America/New_York", "2018-11-04 01:30"),
        ("America/New_York", "2018-03-11 02:30"),
        ("Europe/Berlin", "2018-10-28 02:30"),
        ("Europe/Berlin", "2018-03-25 02:30"),
    ]
    for zone, text in cases:
        pg.execute(f"SET timezone = '{zone}'")
        got = pg.execute(
            f"SELECT (extract(epoch FROM '{text}'::timestamptz) * 1000000)::bigint"
        ).fetchone()
        assert got is not None
        assert us(text, tz=zone) == int(got[0])
        assert bounds(f"ts = '{text}'", timezone=zone) == Range(int(got[0]), int(got[0]) + 1)
