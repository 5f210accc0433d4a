"""Differential test of hypertables: the proxy must answer like one plain PostgreSQL table.

Issue 5's "Must show": the same time-series data in a plain table on one plain PostgreSQL and in
hypertables through the proxy, and time-range, time_bucket/GROUP BY, last-value-per-device and
``ORDER BY time DESC LIMIT`` queries give the same rows at every stage of the data's life. The
oracle is PostgreSQL itself:

* **plain side** — a database of its own (``orochi_htdiff_plain``) on ``cluster.nodes[1]``,
  reached directly, with two ordinary tables ``htd_space`` and ``htd_time`` (same rows; one per
  hypertable because retention drops each hypertable's own chunk ranges);
* **cluster side** — through the proxy: ``htd_space`` is space-partitioned by ``device``
  (classic ``create_hypertable(..., 'device', 4)``, 7-day chunks, four shards round-robin over
  the three nodes) and loaded by ``COPY ... FROM STDIN`` streamed straight out of the plain
  table; ``htd_time`` is time-only (``by_range('time', INTERVAL '3 days')``, one shard) and loaded
  by ``INSERT ... SELECT generate_series`` through the proxy. Both write paths
  create the chunks, and a whole-row fingerprint is compared before anything else. Meanwhile
  another client pings the proxy and must be answered within :data:`STALL_BUDGET_S`.

The data (generated inside PostgreSQL, so loading is fast): four months of ``timestamptz`` rows
ending at the current hour, 12 devices every ``step`` seconds (each device shifted by a few
seconds, so no two rows share a time and every ``ORDER BY time`` is total); NULLs in every value
column in different patterns (and device 7's last week of ``value`` is all NULL); device 10
stops after 40 days (retention later removes it completely), device 11 starts 20 days before the
end; device 0's rows fall exactly on chunk boundaries. No row lies within 15 minutes of
``now() - interval`` for the intervals the ``now()`` queries use, so both sides agree although
they evaluate ``now()`` a few milliseconds apart.

Size: ``OROCHI_HTDIFF_ROWS`` rows per table, rounded to a step that divides an hour (default
150,000: ~121k rows per table after the device lifetimes, ~115 chunks; 57-75 s for the module on
the 2-core machine, of which ~15 s is loading: COPY into a hypertable through the proxy runs at
~15-20k rows/s here). That is fewer than the issue's "several million" so the suite stays
fast; the several-million-row run is ``OROCHI_HTDIFF_ROWS=3000000 pytest --timeout 0 ...``
(same tests, 2.7M rows per table, 12 minutes; loading alone takes longer than the suite's 300 s
per-test timeout) and the multi-million figures are in ``bench/hypertable_bench.py``.

Stages, each followed by the whole query catalogue on both tables (``QUERIES``; rows compared
as multisets, in order when the ORDER BY is total; float columns with a relative tolerance of
1e-9, everything else as PostgreSQL's text exactly, plus column types and command tags):

(a) after loading; then concurrent inserts from several clients into a new (future) chunk range
    (single-row INSERT, multi-row INSERT, COPY), which must create each chunk once and keep every
    row; (b) after ``drop_chunks(older_than => ...)``, the plain side deleting exactly the time
    ranges of the chunks the proxy reports dropped (read from ``timescaledb_information.chunks``);
    (c) after compressing every second chunk (:func:`compress_half_the_chunks`; skipped on a
    proxy without ``compress_chunk``; several clients compress at once) and inserting into a
    compressed chunk's range; (d) after a second retention run that drops compressed chunks too
    (a cross-section of the catalogue). While :data:`WARM_JIT_BUG` stands, (c) and (d) skip the
    whole-history DISTINCT ON queries marked ``heavy`` (seconds of JIT each on the nodes;
    ``OROCHI_HTDIFF_FULL=1`` runs them; one of them runs with a time budget that xfails naming
    the bug).

``time_bucket`` queries are compared with PostgreSQL's own ``date_bin``/``date_trunc`` on the
plain side (TimescaleDB's buckets for timestamptz: UTC, origin Monday 2000-01-03, calendar
months), so the oracle does not share code with the proxy. A known wrong answer is a strict
xfail naming the bug (``Query.xfail``). Tests run in file order (pytest's default).
"""

from __future__ import annotations

import datetime as dt
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from pgresult import Result, run_text
from proxyproc import ProxyProcess

from orochi_proxy.localcluster import LocalCluster

UTC = dt.UTC
PLAIN_DB = "orochi_htdiff_plain"
SPACE, TIMEONLY = "htd_space", "htd_time"
TABLES = (SPACE, TIMEONLY)
SPACE_PARTITIONS = 4
SPACE_INTERVAL = dt.timedelta(days=7)
TIME_INTERVAL = dt.timedelta(days=3)
DAYS = 120
DEVICES = 12
ROWS = int(os.environ.get("OROCHI_HTDIFF_ROWS", "150000"))
#: ``now() - interval`` cut-offs the queries use; the data has a gap around each (see above).
NOW_INTERVALS = ("45 days", "36 hours")
NOW_GAP = dt.timedelta(minutes=15)
#: Retention runs: (b) on hot chunks, then (d) a later cut-off that reaches compressed chunks.
RETENTION = "80 days"
RETENTION_WARM = "60 days"
FLOAT_OIDS = {700, 701}
REL_TOL = 1e-9
MAX_SHOWN = 6
#: Divisors of an hour: a step from this list keeps device 0 on every hour, hence on every
#: chunk boundary (chunk boundaries are multiples of the interval since the epoch).
STEPS = (30, 36, 40, 45, 48, 50, 60, 72, 75, 80, 90, 100, 120, 144, 150, 180, 200, 225, 240,
         300, 360, 400, 450, 600, 720, 900, 1200, 1800, 3600)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=UTC)

COLUMNS = "time timestamptz NOT NULL, device int NOT NULL, value float8, cpu numeric(6,2), state text"


# ====================================================================================== data
@dataclass(frozen=True)
class Layout:
    """Where the rows lie in time; every query literal is derived from it."""

    start: dt.datetime  # first row (device 0), hour-aligned
    step: int  # seconds between a device's rows
    n_steps: int
    offset: int  # device d's rows are d * offset seconds after device 0's
    now0: dt.datetime  # the clock when the data was made (the now() gaps are around it)

    @classmethod
    def make(cls, rows: int, now0: dt.datetime) -> Layout:
        want = DAYS * 86400 * DEVICES / max(rows, 1)
        step = min(STEPS, key=lambda s: abs(s - want))
        start = now0.replace(minute=0, second=0, microsecond=0) - dt.timedelta(days=DAYS)
        return cls(start, step, DAYS * 86400 // step, max(1, step // 16), now0)

    @property
    def end(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.n_steps * self.step)

    def at(self, i: int, device: int = 0) -> dt.datetime:
        return self.start + dt.timedelta(seconds=i * self.step + device * self.offset)

    def gaps(self) -> list[tuple[dt.datetime, dt.datetime]]:
        out = []
        for text in NOW_INTERVALS:
            n, unit = text.split()
            cut = self.now0 - dt.timedelta(**{unit: int(n)})
            out.append((cut - NOW_GAP, cut + NOW_GAP))
        return out

    def insert_select(self, table: str) -> str:
        """INSERT ... SELECT that generates the whole data set (deterministic, no random())."""
        n40 = 40 * 86400 // self.step
        n_late = self.n_steps - 20 * 86400 // self.step
        n_week = self.n_steps - 7 * 86400 // self.step
        gaps = " ".join(f"AND ts NOT BETWEEN {lit(lo)} AND {lit(hi)}" for lo, hi in self.gaps())
        return f"""
INSERT INTO {table} (time, device, value, cpu, state)
SELECT ts, d,
       CASE WHEN (i + d) % 17 = 0 OR (d = 7 AND i >= {n_week}) THEN NULL
            ELSE round((20 + 10 * sin(i / 159.0 + d) + d * 0.5)::numeric, 3)::float8 END,
       CASE WHEN (i * 7 + d) % 23 = 0 THEN NULL ELSE ((i * 31 + d * 17) % 10000) / 100.0 END,
       CASE WHEN (i + 3 * d) % 29 = 0 THEN NULL
            ELSE (ARRAY['ok', 'warn', 'crit', 'idle'])[1 + (i / 7 + d) % 4] END
FROM generate_series(0, {self.n_steps - 1}) i
CROSS JOIN generate_series(0, {DEVICES - 1}) d
CROSS JOIN LATERAL (SELECT {lit(self.start)} + i * interval '{self.step} seconds'
                           + d * interval '{self.offset} seconds' AS ts) x
WHERE NOT (d = 10 AND i >= {n40}) AND NOT (d = 11 AND i < {n_late}) {gaps}"""


def lit(t: dt.datetime) -> str:
    """A timestamptz literal in UTC, as the queries write them."""
    return f"timestamptz '{t.astimezone(UTC).isoformat(sep=' ')}'"


def boundary(after: dt.datetime, interval: dt.timedelta) -> dt.datetime:
    """The first chunk boundary of ``interval`` (epoch-aligned, as TimescaleDB) at or after."""
    n = math.ceil((after - EPOCH) / interval)
    return EPOCH + n * interval


def marks_for(lay: Layout) -> dict[str, dt.datetime]:
    """Named instants the queries use: chunk boundaries, exact row times, windows. All but
    ``early`` lie after day 67 of the data, which both retention runs keep."""
    s = lay.start
    b7 = boundary(s + dt.timedelta(days=80), SPACE_INTERVAL)
    b3 = boundary(s + dt.timedelta(days=72), TIME_INTERVAL)
    h0 = s + dt.timedelta(days=100, hours=5)
    d0 = b3 - dt.timedelta(days=1, hours=7)
    return {
        "exact": lay.at(lay.n_steps * 3 // 4 + 3, 3),
        "b7": b7,
        "b3": b3,
        "h0": h0,
        "h1": h0 + dt.timedelta(hours=1),
        "d0": d0,
        "d3": d0 + dt.timedelta(days=3),
        "m0": b7 - dt.timedelta(days=10),
        "m1": b7 + dt.timedelta(days=16),
        "early": s + dt.timedelta(days=20),
        "late": lay.end - dt.timedelta(days=10),
        "mid": s + dt.timedelta(days=91, minutes=17, seconds=3),
    }


# ====================================================================================== queries
TB_ORIGIN = "timestamptz '2000-01-03 00:00+00'"


@dataclass(frozen=True)
class Query:
    """One query of the catalogue, written for both sides.

    ``sql`` is a ``str.format`` template: ``{t}`` is the table, ``{<mark>}`` a timestamptz
    literal of :func:`marks_for`, ``{bucket}`` the bucket expression (``bucket[0]`` through the
    proxy, ``bucket[1]`` on the plain side). ``params`` are mark names passed as psycopg
    parameters (``%s``; ``binary`` uses ``%b``). ``ordered``: the ORDER BY is total, compare in
    order. ``xfail``: a known wrong answer (strict), naming the bug. ``heavy``: reads the whole
    history with a plan the nodes JIT-compile for seconds once chunks are compressed
    (:data:`WARM_JIT_BUG`); stage (c) runs these only when that bug is gone or with
    ``OROCHI_HTDIFF_FULL=1``.
    """

    id: str
    sql: str
    bucket: tuple[str, str] | None = None
    params: tuple[str, ...] = ()
    ordered: bool = False
    xfail: str | None = None
    tables: tuple[str, ...] = TABLES
    heavy: bool = False

    def render(self, table: str, marks: dict[str, dt.datetime], plain: bool) -> str:
        values: dict[str, str] = {k: lit(v) for k, v in marks.items()}
        values["t"] = table
        # b7 written with another zone offset, as an untyped literal (the proxy converts it).
        values["b7_ist"] = marks["b7"].astimezone(dt.timezone(dt.timedelta(hours=5, minutes=30))).isoformat(sep=" ")
        # Zone-less forms (read in the session's TimeZone by the node and by chunk exclusion).
        values["b3_date"] = marks["b3"].astimezone(UTC).date().isoformat()
        values["b7_naive"] = marks["b7"].astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
        if self.bucket is not None:
            values["bucket"] = self.bucket[1 if plain else 0]
        return self.sql.format(**values)


def tb(width: str, plain: str | None = None) -> tuple[str, str]:
    """time_bucket(width, time) and its PostgreSQL equivalent (date_bin from TimescaleDB's origin)."""
    return f"time_bucket('{width}', time)", plain or f"date_bin('{width}', time, {TB_ORIGIN})"


AGGS = "count(*) AS n, count(value) AS nv, sum(cpu) AS s, avg(cpu) AS a, avg(value) AS av, min(value) AS lo, max(value) AS hi"

QUERIES: list[Query] = [
    # ---------------------------------------------------------------- counts and fingerprints
    Query("count", "SELECT count(*) FROM {t}"),
    Query("count-nulls", "SELECT count(*), count(value), count(cpu), count(state), count(*) - count(value) FROM {t}"),
    Query("fingerprint", "SELECT count(*), sum(hashtextextended(x::text, 0)) FROM {t} x"),
    Query("count-null-value", "SELECT count(*) FROM {t} WHERE value IS NULL AND time >= {m0}"),
    # ---------------------------------------------------------------- time-range filters
    Query("eq", "SELECT * FROM {t} WHERE time = {exact}"),
    Query("eq-untyped", "SELECT device, value, cpu, state FROM {t} WHERE time = '2000-01-01 00:00+00' OR time = {exact}"),
    Query("eq-chunk-boundary", "SELECT device, value, cpu FROM {t} WHERE time = {b7} OR time = {b3}"),
    Query("lt", "SELECT count(*), sum(cpu), min(time), max(time) FROM {t} WHERE time < {b7}"),
    Query("le", "SELECT count(*), sum(cpu), min(time), max(time) FROM {t} WHERE time <= {b7}"),
    Query("gt", "SELECT count(*), sum(cpu), min(time), max(time) FROM {t} WHERE time > {b7}"),
    Query("ge", "SELECT count(*), sum(cpu), min(time), max(time) FROM {t} WHERE time >= {b3}"),
    Query("reversed-operands", "SELECT count(*), max(time) FROM {t} WHERE {b7} > time AND {b3} <= time"),
    Query("between", "SELECT count(*), sum(cpu), avg(value) FROM {t} WHERE time BETWEEN {b3} AND {b7}"),
    Query("between-device", "SELECT count(*), sum(cpu), max(value) FROM {t} WHERE device = 3 AND time BETWEEN {d0} AND {m1}"),
    Query("narrow-hour", f"SELECT {AGGS} FROM {{t}} WHERE time >= {{h0}} AND time < {{h1}}"),
    Query("narrow-hour-rows", "SELECT time, device, value, cpu, state FROM {t} WHERE time >= {h0} AND time < {h1} ORDER BY time",
          ordered=True),
    Query("interval-arith", "SELECT count(*), sum(cpu) FROM {t} WHERE time >= {b7} - interval '1 day' AND time < {b7} + interval '6 hours'"),
    Query("text-literal-offset",
          "SELECT count(*), min(time) FROM {t} WHERE time >= '{b7_ist}' AND time < '{b7_ist}'::timestamptz + interval '2 days'"),
    Query("in-list", "SELECT device, time, cpu FROM {t} WHERE time IN ({exact}, {b7}, {b3}, {mid})"),
    Query("alias-qualified", "SELECT m.device, count(*) FROM {t} AS m WHERE m.time >= {b3} AND m.time < {b7} GROUP BY m.device"),
    Query("device-in-range", "SELECT device, count(*), max(time) FROM {t} WHERE device IN (1, 2, 9) "
          "AND time >= {m0} AND time < {m1} GROUP BY device"),
    Query("between-symmetric", "SELECT count(*), min(time), max(time) FROM {t} WHERE time BETWEEN SYMMETRIC {b7} AND {b3}"),
    Query("date-literals", "SELECT count(*), min(time), max(time) FROM {t} WHERE time >= DATE '{b3_date}' "
          "AND time < DATE '{b3_date}' + 2"),
    Query("timestamp-literal", "SELECT count(*), max(time) FROM {t} WHERE time < TIMESTAMP '{b7_naive}' "
          "AND time >= TIMESTAMP '{b7_naive}' - interval '36 hours'"),
    Query("or-ranges", "SELECT count(*), sum(cpu) FROM {t} WHERE time < {early} OR time >= {late}"),
    Query("not-between", "SELECT count(*) FROM {t} WHERE time NOT BETWEEN {early} AND {late}"),
    Query("empty-range", "SELECT count(*), max(value), sum(cpu), avg(cpu) FROM {t} WHERE time < '2000-01-01'"),
    Query("empty-range-rows", "SELECT * FROM {t} WHERE time > {late} AND time < {early}"),
    Query("now-45d", "SELECT count(*), sum(cpu), min(time) FROM {t} WHERE time > now() - interval '45 days'"),
    Query("now-36h-rows", "SELECT time, device, value FROM {t} WHERE time > now() - interval '36 hours' ORDER BY time DESC",
          ordered=True),
    Query("now-between", "SELECT device, count(*) FROM {t} WHERE time BETWEEN now() - interval '45 days' "
          "AND now() - interval '36 hours' GROUP BY device"),
    Query("current-timestamp", "SELECT count(*) FROM {t} WHERE time >= current_timestamp - interval '45 days'"),
    # ---------------------------------------------------------------- parameters (psycopg)
    Query("param-range", "SELECT count(*), sum(cpu), avg(value) FROM {t} WHERE time >= %s AND time < %s", params=("b3", "b7")),
    Query("param-range-binary", "SELECT count(*), sum(cpu), avg(value) FROM {t} WHERE time >= %b AND time < %b", params=("h0", "m1")),
    Query("param-between-device", "SELECT time, value FROM {t} WHERE device = 2 AND time BETWEEN %s AND %s ORDER BY time DESC LIMIT 5",
          params=("m0", "mid"), ordered=True),
    Query("param-eq", "SELECT device, cpu FROM {t} WHERE time = %s", params=("exact",)),
    Query("param-any", "SELECT device, time FROM {t} WHERE time = ANY(%s)", params=("exact,b7,b3",)),
    Query("param-interval-arith", "SELECT count(*), sum(cpu) FROM {t} WHERE time > %s::timestamptz - interval '1 day' "
          "AND time <= %s", params=("b7", "b7")),
    # ---------------------------------------------------------------- time_bucket + GROUP BY
    Query("tb-hour", f"SELECT {{bucket}} AS b, {AGGS} FROM {{t}} WHERE time >= {{d0}} AND time < {{d3}} GROUP BY b ORDER BY b",
          bucket=tb("1 hour"), ordered=True),
    Query("tb-day-device",
          "SELECT {bucket} AS b, device, count(*), sum(cpu), avg(cpu), max(state), min(value) FROM {t} "
          "WHERE time >= {m0} AND time < {m1} GROUP BY b, device ORDER BY b, device",
          bucket=tb("1 day"), ordered=True),
    Query("tb-day-all", f"SELECT {{bucket}}, {AGGS} FROM {{t}} GROUP BY 1 ORDER BY 1", bucket=tb("1 day"), ordered=True),
    Query("tb-week", "SELECT {bucket} AS w, count(*), sum(cpu), avg(value), min(time), max(time) FROM {t} GROUP BY w ORDER BY w",
          bucket=tb("1 week"), ordered=True),
    Query("tb-month", "SELECT {bucket} AS m, count(*), sum(cpu), avg(cpu), count(state) FROM {t} GROUP BY m ORDER BY m",
          bucket=("time_bucket('1 month', time)", "date_trunc('month', time)"), ordered=True),
    Query("tb-month-device", "SELECT device, {bucket} AS m, count(*), max(cpu) FROM {t} GROUP BY 1, 2",
          bucket=("time_bucket('1 month', time)", "date_trunc('month', time)")),
    Query("tb-6h-offset", "SELECT {bucket} AS b, count(*), sum(cpu) FROM {t} WHERE time >= {m0} AND time < {m1} GROUP BY b ORDER BY b",
          bucket=("time_bucket('6 hours', time, INTERVAL '90 minutes')",
                  "date_bin('6 hours', time, timestamptz '2000-01-03 01:30+00')"), ordered=True),
    Query("tb-day-timezone", "SELECT {bucket} AS b, count(*), sum(cpu) FROM {t} WHERE time >= {m0} AND time < {m1} GROUP BY b ORDER BY b",
          bucket=("time_bucket('1 day', time, 'Europe/Berlin')", "date_trunc('day', time, 'Europe/Berlin')"), ordered=True),
    Query("tb-15min-now", "SELECT {bucket} AS b, count(*), avg(value) FROM {t} WHERE time > now() - interval '36 hours' "
          "GROUP BY b ORDER BY b", bucket=tb("15 minutes"), ordered=True),
    Query("tb-day-having-limit", "SELECT {bucket} AS b, count(*), sum(cpu) FROM {t} GROUP BY b HAVING count(*) > 10 "
          "ORDER BY sum(cpu) DESC, b LIMIT 7", bucket=tb("1 day"), ordered=True),
    # ---------------------------------------------------------------- GROUP BY device / state
    Query("by-device", f"SELECT device, {AGGS}, min(time), max(time) FROM {{t}} GROUP BY device ORDER BY device", ordered=True),
    Query("by-device-range", "SELECT device, count(*), sum(cpu), avg(value) FROM {t} WHERE time >= {b3} AND time < {m1} "
          "GROUP BY device HAVING count(*) > 100"),
    Query("by-state", "SELECT state, count(*), sum(cpu), avg(value) FROM {t} GROUP BY state"),
    Query("by-device-state", "SELECT device, state, count(*) FROM {t} WHERE time < {mid} GROUP BY 1, 2"),
    # ---------------------------------------------------------------- last / first value per device
    Query("last-per-device", "SELECT DISTINCT ON (device) device, time, value, cpu, state FROM {t} ORDER BY device, time DESC",
          ordered=True, heavy=True),
    Query("last-nonnull-per-device", "SELECT DISTINCT ON (device) device, time, value FROM {t} WHERE value IS NOT NULL "
          "ORDER BY device, time DESC", ordered=True, heavy=True),
    Query("last-before-per-device", "SELECT DISTINCT ON (device) device, time, cpu FROM {t} WHERE time < {mid} "
          "ORDER BY device, time DESC", ordered=True),
    Query("first-per-device", "SELECT DISTINCT ON (device) device, time, state FROM {t} ORDER BY device, time", ordered=True, heavy=True),
    # ---------------------------------------------------------------- ORDER BY time DESC LIMIT
    Query("latest", "SELECT time, device, value, cpu, state FROM {t} ORDER BY time DESC LIMIT 10", ordered=True),
    Query("latest-before", "SELECT time, device, value FROM {t} WHERE time < {b7} ORDER BY time DESC LIMIT 25", ordered=True),
    Query("latest-offset", "SELECT time, device FROM {t} ORDER BY time DESC LIMIT 5 OFFSET 100", ordered=True),
    Query("oldest", "SELECT time, device, cpu FROM {t} ORDER BY time LIMIT 10", ordered=True),
    Query("latest-device", "SELECT time, value, state FROM {t} WHERE device = 5 ORDER BY time DESC LIMIT 3", ordered=True),
    Query("top-values", "SELECT time, device, value FROM {t} WHERE time >= {m0} ORDER BY value DESC NULLS LAST, time LIMIT 10",
          ordered=True),
]


def _query_params(queries: Sequence[Query]) -> list[Any]:
    """One pytest param per (query, table); known wrong answers are strict xfails."""
    return [
        pytest.param(q, t, id=f"{t}-{q.id}", marks=[pytest.mark.xfail(strict=True, reason=q.xfail)] if q.xfail else [])
        for q in queries
        for t in q.tables
    ]


# ====================================================================================== setup
@dataclass
class Env:
    """Both sides of the comparison, loaded with the same rows."""

    cluster: LocalCluster
    proxy_proc: ProxyProcess
    proxy: psycopg.Connection[Any]
    plain: psycopg.Connection[Any]
    layout: Layout
    marks: dict[str, dt.datetime]
    rows: int = 0
    ping_worst: float = 0.0  # longest SELECT 1 through the proxy during the INSERT ... SELECT load
    hot_seconds: dict[tuple[str, str], float] = field(default_factory=dict)  # stage (a) check() times
    phases: dict[str, float] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)  # stages completed ("loaded", "new_range", ...)
    skipped: dict[str, str] = field(default_factory=dict)  # stage -> why it did not run

    def connect_proxy(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.proxy_proc.dsn(), autocommit=True)
        conn.execute("SET TimeZone = 'UTC'")
        return conn

    def connect_plain(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.cluster.nodes[1].dsn(PLAIN_DB), autocommit=True)
        conn.execute("SET TimeZone = 'UTC'")
        return conn

    def require(self, stage: str) -> None:
        """Skip a stage's queries when the stage did not run (its own test says why)."""
        if stage in self.skipped:
            pytest.skip(self.skipped[stage])
        if stage not in self.done:
            pytest.skip(f"stage {stage!r} did not complete (see its test)")


def _timed(env: Env, phase: str, fn: Callable[[], Any]) -> Any:
    started = time.monotonic()
    out = fn()
    env.phases[phase] = time.monotonic() - started
    return out


def copy_between(src: psycopg.Connection[Any], dst: psycopg.Connection[Any], src_sql: str, dst_sql: str) -> None:
    """Stream COPY TO STDOUT of one connection into COPY FROM STDIN of another."""
    with src.cursor() as out_cur, dst.cursor() as in_cur, \
            out_cur.copy(src_sql) as out_copy, in_cur.copy(dst_sql) as in_copy:
        for block in out_copy:
            in_copy.write(block)


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, proxy: ProxyProcess) -> Iterator[Env]:
    now0 = dt.datetime.now(UTC)
    lay = Layout.make(ROWS, now0)
    marks = marks_for(lay)
    node = cluster.nodes[1]
    with psycopg.connect(node.dsn(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {PLAIN_DB}")
        admin.execute(f"CREATE DATABASE {PLAIN_DB}")
    pconn = psycopg.connect(proxy.dsn(), autocommit=True)
    pconn.execute("SET TimeZone = 'UTC'")
    plain = psycopg.connect(node.dsn(PLAIN_DB), autocommit=True)
    plain.execute("SET TimeZone = 'UTC'")
    e = Env(cluster, proxy, pconn, plain, lay, marks)
    try:
        for n in cluster.nodes:
            pconn.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))  # idempotent
        for t in TABLES:
            pconn.execute(f"DROP TABLE IF EXISTS {t}")
            plain.execute(f"CREATE TABLE {t} ({COLUMNS})")
            plain.execute(f"CREATE INDEX ON {t} (time DESC)")
        _timed(e, "plain_generate", lambda: plain.execute(lay.insert_select(SPACE)))
        _timed(e, "plain_copy", lambda: plain.execute(f"INSERT INTO {TIMEONLY} SELECT * FROM {SPACE}"))
        plain.execute("ANALYZE")
        e.rows = plain.execute(f"SELECT count(*) FROM {SPACE}").fetchone()[0]  # type: ignore[index]

        pconn.execute(f"CREATE TABLE {SPACE} ({COLUMNS})")
        pconn.execute(f"SELECT create_hypertable('{SPACE}', 'time', 'device', {SPACE_PARTITIONS}, "
                      f"chunk_time_interval => INTERVAL '{SPACE_INTERVAL.days} days')")
        pconn.execute(f"CREATE TABLE {TIMEONLY} ({COLUMNS})")
        pconn.execute(f"SELECT create_hypertable('{TIMEONLY}', by_range('time', INTERVAL '{TIME_INTERVAL.days} days'))")
        # INSERT ... SELECT through the proxy on a connection of its own while this one pings the
        # proxy: how long another client waits meanwhile is checked by
        # test_insert_select_does_not_stall_other_clients. Not concurrently with the COPY: a
        # stall longer than the proxy's connect_timeout (5 s) fails the COPY's node connections.
        errors: list[BaseException] = []
        finished = threading.Event()

        def insert_select() -> None:
            try:
                with e.connect_proxy() as c:
                    _timed(e, "proxy_insert_select", lambda: c.execute(lay.insert_select(TIMEONLY)))
            except BaseException as exc:  # noqa: BLE001 - raised below
                errors.append(exc)
            finally:
                finished.set()

        loader = threading.Thread(target=insert_select)
        loader.start()
        while not finished.wait(0.05):
            started = time.monotonic()
            pconn.execute("SELECT 1").fetchall()
            e.ping_worst = max(e.ping_worst, time.monotonic() - started)
        loader.join()
        if errors:
            raise errors[0]
        _timed(e, "proxy_copy", lambda: copy_between(plain, pconn, f"COPY {SPACE} TO STDOUT", f"COPY {SPACE} FROM STDIN"))
        e.done.add("loaded")
        yield e
    finally:
        try:
            for t in TABLES:
                pconn.execute(f"DROP TABLE IF EXISTS {t}")
        finally:
            pconn.close()
            plain.close()
            with psycopg.connect(node.dsn(), autocommit=True) as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {PLAIN_DB} WITH (FORCE)")


# ====================================================================================== compare
def _canon(row: tuple[str | None, ...], oids: list[int]) -> tuple[Any, ...]:
    return tuple(float(v) if v is not None and o in FLOAT_OIDS else v for v, o in zip(row, oids, strict=False))


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    return a == b


def _rows_close(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))


def _sort_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((0, "") if v is None else (1, f"{v:.6e}") if isinstance(v, float) else (2, v) for v in row)


def compare(got: Result, want: Result, *, ordered: bool, what: str) -> None:
    """Fail with both answers unless the proxy's (``got``) equals the plain table's (``want``)."""
    problems = []
    if got.oids != want.oids:
        problems.append(f"column types differ: proxy {got.oids}, plain {want.oids}")
    if got.tag != want.tag:
        problems.append(f"command tag differs: proxy {got.tag!r}, plain {want.tag!r}")
    g = [_canon(r, got.oids) for r in got.rows]
    w = [_canon(r, want.oids) for r in want.rows]
    if not ordered:
        g, w = sorted(g, key=_sort_key), sorted(w, key=_sort_key)
    if len(g) != len(w) or not all(_rows_close(a, b) for a, b in zip(g, w, strict=True)):
        if ordered:
            first = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if not _rows_close(a, b)), min(len(g), len(w)))
            problems.append(
                f"{'ordered ' if ordered else ''}rows differ at row {first} (proxy {len(g)} rows, plain {len(w)}):\n"
                f"  proxy: {g[first:first + MAX_SHOWN]}\n  plain: {w[first:first + MAX_SHOWN]}"
            )
        else:
            extra = Counter(g) - Counter(w)
            missing = Counter(w) - Counter(g)
            problems.append(
                f"rows differ (proxy {len(g)} rows, plain {len(w)}):\n"
                f"  only proxy: {list(extra.elements())[:MAX_SHOWN]}\n  only plain: {list(missing.elements())[:MAX_SHOWN]}"
            )
    if problems:
        pytest.fail(f"{what}\n" + "\n".join(problems), pytrace=False)


def check(env: Env, q: Query, table: str, *, proxy: psycopg.Connection[Any] | None = None,
          plain: psycopg.Connection[Any] | None = None) -> None:
    """Run ``q`` on both sides and compare; a query the plain side rejects must fail alike."""
    params = [[env.marks[m] for m in p.split(",")] if "," in p else env.marks[p] for p in q.params] or None
    proxy_sql = q.render(table, env.marks, plain=False)
    plain_sql = q.render(table, env.marks, plain=True)
    proxy, plain = proxy or env.proxy, plain or env.plain
    what = f"[{q.id} on {table}] {proxy_sql}" + (f"\n  params: {params}" if params else "") + \
        (f"\n  plain side: {plain_sql}" if plain_sql != proxy_sql else "") + f"\n  data starts {env.layout.start}"
    try:
        want = run_text(plain, plain_sql, params)
    except psycopg.Error as plain_exc:
        with pytest.raises(psycopg.Error) as err:
            run_text(proxy, proxy_sql, params)
        assert err.value.sqlstate == plain_exc.sqlstate, f"{what}\nproxy: {err.value}\nplain: {plain_exc}"
        return
    try:
        got = run_text(proxy, proxy_sql, params)
    except psycopg.Error as exc:
        pytest.fail(f"{what}\nproxy failed with {exc.sqlstate}: {exc}\nplain answered {len(want.rows)} rows", pytrace=False)
    compare(got, want, ordered=q.ordered, what=what)


# ====================================================================================== (a) loaded
def test_data_loaded_identically(env: Env) -> None:
    """Counts and a whole-row fingerprint agree before any query is trusted; chunks exist."""
    for t in TABLES:
        check(env, Query("load-fingerprint", "SELECT count(*), sum(hashtextextended(x::text, 0)) FROM {t} x"), t)
    assert env.rows >= ROWS * 0.8, f"only {env.rows} rows generated"
    chunks = dict(env.proxy.execute(
        "SELECT hypertable_name, count(*) FROM timescaledb_information.chunks WHERE hypertable_name IN (%s, %s) GROUP BY 1",
        TABLES).fetchall())
    # ~18 weekly ranges per space partition that holds devices (12 devices hash into at least
    # half of the partitions), ~40 three-day ranges.
    assert chunks[SPACE] >= SPACE_PARTITIONS // 2 * (DAYS // 7), chunks
    assert chunks[TIMEONLY] >= DAYS // 3, chunks
    # The space partitions are spread over every node.
    nodes = env.proxy.execute("SELECT count(DISTINCT node_id) FROM timescaledb_information.chunks WHERE hypertable_name = %s",
                              (SPACE,)).fetchone()
    assert nodes == (len(env.cluster.nodes),)
    print(f"\n{env.rows:,} rows per table, step {env.layout.step}s, from {env.layout.start}; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in env.phases.items())
          + f"; SELECT 1 waited up to {env.ping_worst:.1f}s meanwhile; chunks {chunks}")


#: Before distinsert routed rows in slices (ROUTE_SLICE), 500k rows stalled other clients 22.7 s.
STALL_BUDGET_S = 1.0


def test_insert_select_does_not_stall_other_clients(env: Env) -> None:
    """While one client loads ~100k rows by INSERT ... SELECT into a hypertable, another
    client's SELECT 1 through the proxy is answered within STALL_BUDGET_S."""
    assert env.ping_worst < STALL_BUDGET_S, f"SELECT 1 waited {env.ping_worst:.1f}s during the INSERT ... SELECT"


@pytest.mark.parametrize(("q", "table"), _query_params(QUERIES))
def test_query_loaded(env: Env, q: Query, table: str) -> None:
    env.require("loaded")
    started = time.monotonic()
    check(env, q, table)
    env.hot_seconds[(q.id, table)] = time.monotonic() - started


def test_chunk_exclusion_in_explain(env: Env) -> None:
    """A one-hour range keeps one chunk per shard holding rows in it, out of the whole history."""
    for t, most in ((SPACE, SPACE_PARTITIONS), (TIMEONLY, 1)):
        sql = f"EXPLAIN SELECT count(*) FROM {t} WHERE time >= {lit(env.marks['h0'])} AND time < {lit(env.marks['h1'])}"
        plan = "\n".join(r[0] for r in env.proxy.execute(sql).fetchall())
        line = next((ln for ln in plan.splitlines() if "Chunks:" in ln), "")
        kept, total = (int(x) for x in line.split("Chunks:")[1].split("(")[0].split(" of "))
        assert 1 <= kept <= most and total >= 10 * kept, plan


PARAM_RANGES = (("d0", "d3"), ("b7", "m1"), ("h0", "h1"), ("late", "early"), ("early", "late"), ("m0", "b7"))


@pytest.mark.parametrize("table", TABLES)
def test_prepared_statement_reused_with_other_ranges(env: Env, table: str) -> None:
    """One prepared statement executed with different time ranges: chunk exclusion must use each
    execution's parameters, never the first one's (a cached plan pruned for other values)."""
    q = Query("prepared", "SELECT count(*), sum(cpu), min(time), max(time) FROM {t} WHERE time >= %s AND time < %s")
    sql = q.render(table, env.marks, plain=False)
    for lo, hi in PARAM_RANGES:
        params = (env.marks[lo], env.marks[hi])
        with env.proxy.cursor() as cur:
            cur.execute(sql, params, prepare=True)
            got = [tuple(None if v is None else str(v) for v in r) for r in cur.fetchall()]
        want_rows = [tuple(None if v is None else str(v) for v in r) for r in env.plain.execute(sql, params).fetchall()]
        assert got == want_rows, f"{sql} with {lo}..{hi}: proxy {got}, plain {want_rows}"


def test_queries_in_a_transaction_block(env: Env) -> None:
    """Inside BEGIN ... COMMIT the proxy must not prune by its own clock (now() is the block's start)."""
    picked = [q for q in QUERIES if q.id in ("now-45d", "now-36h-rows", "narrow-hour", "tb-hour", "last-per-device", "latest")]
    with env.connect_proxy() as proxy, env.connect_plain() as plain:
        proxy.autocommit = plain.autocommit = False
        for t in TABLES:
            for q in picked:
                check(env, q, t, proxy=proxy, plain=plain)
        proxy.rollback()
        plain.rollback()


def test_other_session_timezone(env: Env) -> None:
    """Literals without a zone are read in the session's TimeZone by both the node and the
    proxy's chunk exclusion; timestamps print in that zone; time_bucket stays in UTC."""
    # b7 (a chunk boundary, device 0 has a row on it) as New York wall-clock time, no zone.
    naive = env.marks["b7"].astimezone(ZoneInfo("America/New_York")).replace(tzinfo=None).isoformat(sep=" ")
    queries = [
        Query("tz-naive-literal", f"SELECT count(*), min(time), max(time) FROM {{t}} WHERE time >= '{naive}' "
              f"AND time < '{naive}'::timestamptz + interval '1 day'"),
        Query("tz-naive-eq", f"SELECT device, time FROM {{t}} WHERE time = '{naive}'"),
        Query("tz-naive-lt", f"SELECT count(*), max(time) FROM {{t}} WHERE time < '{naive}'"),
        next(q for q in QUERIES if q.id == "date-literals"),
        next(q for q in QUERIES if q.id == "timestamp-literal"),
        Query("tz-bucket", "SELECT {bucket} AS b, count(*) FROM {t} WHERE time >= {m0} AND time < {m1} GROUP BY b ORDER BY b",
              bucket=tb("1 day"), ordered=True),
        Query("tz-latest", "SELECT time, device FROM {t} ORDER BY time DESC LIMIT 5", ordered=True),
    ]
    with env.connect_proxy() as proxy, env.connect_plain() as plain:
        for c in (proxy, plain):
            c.execute("SET TimeZone = 'America/New_York'")
        assert plain.execute(f"SELECT count(*) FROM {SPACE} WHERE time = '{naive}'").fetchone() == (1,)
        for t in TABLES:
            for q in queries:
                check(env, q, t, proxy=proxy, plain=plain)


# ====================================================================================== new range
NEW_WRITERS = 4
NEW_ROWS_PER_WRITER = 300  # every 20 minutes: ~4 days, two or more new chunk ranges per table


def _new_rows(env: Env, k: int) -> list[tuple[dt.datetime, int, float | None, str | None, str | None]]:
    """Writer ``k``'s rows: the same future range as every other writer, times never shared."""
    base = boundary(env.layout.end + dt.timedelta(days=10), SPACE_INTERVAL) - dt.timedelta(days=1)
    rows = []
    for j in range(NEW_ROWS_PER_WRITER):
        t = base + dt.timedelta(seconds=j * 1200 + k * 5)
        rows.append((t, (j + k) % DEVICES, None if j % 11 == 0 else round(j * 0.25 - k, 2),
                     None if j % 13 == 0 else f"{(j * 7 + k) % 10000 / 100:.2f}", ["ok", None, "new"][j % 3]))
    return rows


def _node_partitions(env: Env, table: str) -> list[str]:
    out: list[str] = []
    for n in env.cluster.nodes:
        with psycopg.connect(n.dsn(), autocommit=True) as c:
            out += [r[0] for r in c.execute(
                "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname LIKE %s AND c.relkind = 'r'",
                (f"{table}\\_%",)).fetchall()]
    return sorted(out)


def _catalog_chunks(env: Env, table: str) -> list[tuple[str, dt.datetime, dt.datetime, int]]:
    return env.proxy.execute(
        "SELECT chunk_name::text, range_start, range_end, node_id FROM timescaledb_information.chunks "
        "WHERE hypertable_name = %s ORDER BY range_start, chunk_name", (table,)).fetchall()


def test_concurrent_inserts_into_a_new_range(env: Env) -> None:
    """Several clients write into a range with no chunks yet, at once (single-row INSERT,
    multi-row INSERT, COPY), into both hypertables: each chunk is created once (catalog and
    nodes agree), and every row arrives exactly once."""
    env.require("loaded")
    before = {t: {c[0] for c in _catalog_chunks(env, t)} for t in TABLES}
    errors: list[BaseException] = []
    barrier = threading.Barrier(NEW_WRITERS)

    def writer(k: int) -> None:
        rows = _new_rows(env, k)
        try:
            with env.connect_proxy() as c:
                barrier.wait(timeout=30)
                for t in TABLES:
                    for r in rows[:10]:
                        c.execute(f"INSERT INTO {t} VALUES (%s, %s, %s, %s, %s)", r)
                    multi = rows[10:60]
                    c.execute(f"INSERT INTO {t} VALUES " + ", ".join(["(%s, %s, %s, %s, %s)"] * len(multi)),
                              [v for r in multi for v in r])
                    with c.cursor() as cur, cur.copy(f"COPY {t} FROM STDIN") as cp:
                        for r in rows[60:]:
                            cp.write_row(r)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(NEW_WRITERS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert not errors, errors
    for t in TABLES:
        with env.plain.cursor() as cur, cur.copy(f"COPY {t} FROM STDIN") as cp:
            for k in range(NEW_WRITERS):
                for r in _new_rows(env, k):
                    cp.write_row(r)
    env.done.add("new_range")

    first = min(r[0] for r in _new_rows(env, 0))
    for t in TABLES:
        chunks = _catalog_chunks(env, t)
        new = [c for c in chunks if c[0] not in before[t]]
        assert new and all(c[2] > first for c in new), new
        # One chunk per (node/shard, range): a race that created a range twice would show here.
        per_range = Counter((c[1], c[3]) for c in new)
        if t == TIMEONLY:
            assert max(per_range.values()) == 1 and len(new) >= 2, new
        else:
            assert len({c[1] for c in new}) >= 1 and len(new) <= SPACE_PARTITIONS * len({c[1] for c in new}), new
        # The nodes hold exactly the catalog's chunks, no leftover partitions.
        assert _node_partitions(env, t) == sorted(c[0] for c in chunks)
    lo, hi = first, max(r[0] for k in range(NEW_WRITERS) for r in _new_rows(env, k)) + dt.timedelta(seconds=1)
    new_range_queries = [
        Query("new-count", f"SELECT count(*), count(DISTINCT device), sum(cpu), count(value) FROM {{t}} WHERE time >= {lit(lo)}"),
        Query("new-rows", f"SELECT * FROM {{t}} WHERE time >= {lit(lo)} AND time < {lit(hi)} ORDER BY time", ordered=True),
        Query("new-by-device", f"SELECT device, count(*), sum(cpu), max(state) FROM {{t}} WHERE time >= {lit(lo)} GROUP BY 1"),
    ]
    for t in TABLES:
        for q in new_range_queries:
            check(env, q, t)
        got = env.proxy.execute(f"SELECT count(*) FROM {t} WHERE time >= %s", (lo,)).fetchone()
        assert got == (NEW_WRITERS * NEW_ROWS_PER_WRITER,)


# ====================================================================================== (b) retention
def retention_run(env: Env, older_than: str) -> int:
    """drop_chunks(older_than => interval) on both hypertables; the plain side deletes exactly
    the time ranges of the chunks the proxy reports dropped (ranges read from
    timescaledb_information.chunks before the drop). Returns how many chunks went."""
    total = 0
    for t in TABLES:
        before = _catalog_chunks(env, t)
        by_name = {f"_timescaledb_internal.{c[0]}": c for c in before}
        cut_lo = env.proxy.execute(f"SELECT now() - interval '{older_than}'").fetchone()[0]  # type: ignore[index]
        shown = {r[0] for r in env.proxy.execute(f"SELECT show_chunks('{t}', older_than => INTERVAL '{older_than}')").fetchall()}
        dropped = [r[0] for r in env.proxy.execute(f"SELECT drop_chunks('{t}', older_than => INTERVAL '{older_than}')").fetchall()]
        cut_hi = env.proxy.execute(f"SELECT now() - interval '{older_than}'").fetchone()[0]  # type: ignore[index]
        assert dropped and set(dropped) <= set(by_name), (dropped, sorted(by_name)[:5])
        assert set(dropped) == shown
        # Exactly the chunks that end at or before the cut-off: whole chunks only.
        for name, c in by_name.items():
            if c[2] <= cut_lo:
                assert name in dropped, f"{name} ends {c[2]} before the cut-off {cut_lo} but was kept"
            elif c[2] > cut_hi:
                assert name not in dropped, f"{name} ends {c[2]} after the cut-off {cut_hi} but was dropped"
        after = _catalog_chunks(env, t)
        assert sorted(c[0] for c in after) == sorted(c[0] for c in before if f"_timescaledb_internal.{c[0]}" not in dropped)
        # The nodes hold exactly the remaining chunks (compressed chunks' companions are gone too).
        assert _node_partitions(env, t) == sorted(c[0] for c in after)
        ranges = sorted({(by_name[n][1], by_name[n][2]) for n in dropped})
        # Every shard's chunk of a dropped range went: deleting the range for every device on the
        # plain side is then exactly what the proxy removed.
        for c in after:
            assert not any(lo < c[2] and c[1] < hi for lo, hi in ranges), f"kept chunk {c} overlaps a dropped range"
        deleted = sum(env.plain.execute(f"DELETE FROM {t} WHERE time >= %s AND time < %s", r).rowcount for r in ranges)
        assert deleted > 0
        # Running it again finds nothing more to drop.
        assert env.proxy.execute(f"SELECT drop_chunks('{t}', older_than => INTERVAL '{older_than}')").fetchall() == []
        total += len(dropped)
    return total


def test_retention_drop_chunks(env: Env) -> None:
    env.require("loaded")
    assert retention_run(env, RETENTION) > 0
    env.done.add("retention")


@pytest.mark.parametrize(("q", "table"), _query_params(QUERIES))
def test_query_after_retention(env: Env, q: Query, table: str) -> None:
    env.require("retention")
    check(env, q, table)


# ====================================================================================== (c) compression
#: Stage (c) needs compress_chunk through the proxy; the stage is skipped (not failed) on a
#: proxy without it (see :func:`compression_available`).
COMPRESSORS = 4
COMPRESSION_SETTINGS = "timescaledb.compress, timescaledb.compress_segmentby = 'device', timescaledb.compress_orderby = 'time DESC'"

#: A performance bug that stages (c) and (d) work around (the ``heavy`` queries are skipped);
#: set to None once fixed.
# Was: warm-chunk reads JIT-compiled hundreds of functions per task (4-7 s for a whole-history
# DISTINCT ON, 7.6 s of 7.7 s JIT on the node); fixed by jit = off for tasks that decode
# segments (executor/distributed.execute) and ANALYZE of the companion after compressing.
WARM_JIT_BUG: str | None = None
WARM_BUDGET_S = 2.0
WARM_SLOWDOWN = 5.0
#: ``OROCHI_HTDIFF_FULL=1`` runs the heavy queries in stage (c) despite WARM_JIT_BUG (slow).
FULL = os.environ.get("OROCHI_HTDIFF_FULL") == "1"


def compression_available(env: Env) -> bool:
    """Whether the proxy knows compress_chunk: unknown, it reaches the metadata node as an
    undefined function (42883); known, a chunk that does not exist gives another error."""
    try:
        env.proxy.execute("SELECT compress_chunk('_timescaledb_internal._htd_no_such_chunk')")
    except psycopg.errors.UndefinedFunction as exc:
        return "compress_chunk" not in str(exc)
    except psycopg.Error:
        return True
    return True


def compress_half_the_chunks(env: Env) -> None:
    """Stage (c): compress every second chunk of each hypertable (old, new and in between, so
    ranges mix hot and compressed chunks), from several clients at once, then insert rows into a
    compressed chunk's range on both sides. The plain side is unchanged otherwise: compression
    must not change any answer.

    Several clients: compress_chunk waits ~0.5 s per chunk on purpose (replicas catch up), so
    one client would spend most of the module's time budget here; concurrent calls on distinct
    chunks must work anyway."""
    work: list[str] = []
    for t in TABLES:
        env.proxy.execute(f"ALTER TABLE {t} SET ({COMPRESSION_SETTINGS})")
        chunks = [r[0] for r in env.proxy.execute(f"SELECT show_chunks('{t}')").fetchall()]
        work += chunks[::2]
    errors: list[BaseException] = []

    def compress(names: list[str]) -> None:
        try:
            with env.connect_proxy() as c:
                for name in names:
                    c.execute(f"SELECT compress_chunk('{name}')")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=compress, args=(work[k::COMPRESSORS],)) for k in range(COMPRESSORS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    for t in TABLES:
        compressed = env.proxy.execute(
            "SELECT count(*) FILTER (WHERE is_compressed), count(*) FROM timescaledb_information.chunks WHERE hypertable_name = %s",
            (t,)).fetchone()
        assert compressed is not None and compressed[0] == (compressed[1] + 1) // 2, compressed
        # INSERT into a compressed chunk's range still works (rows land in an uncompressed part).
        at = env.marks["mid"] + dt.timedelta(seconds=1)
        rows = [(at + dt.timedelta(minutes=i), i % DEVICES, i * 1.5, f"{i}.25", "late") for i in range(5)]
        for conn in (env.proxy, env.plain):
            with conn.cursor() as cur:
                cur.executemany(f"INSERT INTO {t} VALUES (%s, %s, %s, %s, %s)", rows)


def test_compress_half_the_chunks(env: Env) -> None:
    env.require("loaded")
    if not compression_available(env):
        env.skipped["compressed"] = "compress_chunk is not available through the proxy yet (issue 5, compression)"
        pytest.skip(env.skipped["compressed"])
    started = time.monotonic()
    compress_half_the_chunks(env)
    env.phases["compress"] = time.monotonic() - started
    env.done.add("compressed")


def _skip_heavy_on_warm(q: Query) -> None:
    if q.heavy and WARM_JIT_BUG is not None and not FULL:
        pytest.skip("whole-history query over compressed chunks takes seconds of JIT (WARM_JIT_BUG); "
                    "OROCHI_HTDIFF_FULL=1 runs it")


@pytest.mark.parametrize(("q", "table"), _query_params(QUERIES))
def test_query_compressed(env: Env, q: Query, table: str) -> None:
    env.require("compressed")
    _skip_heavy_on_warm(q)
    check(env, q, table)


def test_last_value_per_device_over_compressed_chunks(env: Env) -> None:
    """The last row per device over a hypertable with half its chunks compressed: the right
    rows (always checked), within WARM_BUDGET_S seconds or WARM_SLOWDOWN times the same check
    before compression, whichever is more (0.2 s before compression at the default size; the
    budget grows with OROCHI_HTDIFF_ROWS). Over budget is an xfail naming WARM_JIT_BUG while
    that is set, not a strict one: whether the node JIT-compiled depended on its estimates,
    which changed once autovacuum had analysed the compressed companion tables."""
    env.require("compressed")
    q = next(q for q in QUERIES if q.id == "last-per-device")
    budget = max(WARM_BUDGET_S, WARM_SLOWDOWN * env.hot_seconds.get((q.id, SPACE), 0.0))
    started = time.monotonic()
    check(env, q, SPACE)
    elapsed = time.monotonic() - started
    if elapsed >= budget and WARM_JIT_BUG is not None:
        pytest.xfail(f"{q.id} on {SPACE} took {elapsed:.1f}s: {WARM_JIT_BUG}")
    assert elapsed < budget, f"{q.id} on {SPACE} took {elapsed:.1f}s with compressed chunks (budget {budget:.1f}s)"


# ====================================================================================== (d) retention, warm
def test_retention_drops_compressed_chunks(env: Env) -> None:
    """A later retention run reaches compressed chunks: they go with their segments."""
    env.require("compressed")
    warm_before = {t: env.proxy.execute(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = %s AND is_compressed", (t,)).fetchone()[0]
        for t in TABLES}
    assert retention_run(env, RETENTION_WARM) > 0
    warm_after = {t: env.proxy.execute(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = %s AND is_compressed", (t,)).fetchone()[0]
        for t in TABLES}
    assert all(warm_after[t] < warm_before[t] for t in TABLES), (warm_before, warm_after)
    env.done.add("retention_warm")


#: Stage (d) re-checks a cross-section of the catalogue (every kind of query once or twice).
WARM_RETENTION_QUERIES = [q for q in QUERIES if q.id in {
    "count", "count-nulls", "fingerprint", "lt", "gt", "between", "now-45d", "param-range", "tb-day-device",
    "tb-week", "tb-month", "by-device", "by-state", "last-per-device", "last-before-per-device", "latest",
    "latest-before", "top-values",
}]


@pytest.mark.parametrize(("q", "table"), _query_params(WARM_RETENTION_QUERIES))
def test_query_after_retention_of_compressed_chunks(env: Env, q: Query, table: str) -> None:
    env.require("retention_warm")
    _skip_heavy_on_warm(q)
    check(env, q, table)
