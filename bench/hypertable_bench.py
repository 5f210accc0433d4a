"""Hypertables: proxy vs one plain PostgreSQL table, measured side by side in one run.

The data set is metrics-like and generated inside PostgreSQL (``--rows`` rows, ``--devices``
devices reporting every few seconds over ``--days`` days, NULLs in every value column): a
``timestamptz`` time, an int device, a noisy float reading (3 decimals), a numeric(6,2) CPU
figure and a low-cardinality text state.

1. COPY ingest: rows/s of ``COPY ... FROM STDIN`` (the same text) into a hypertable through the
   proxy (space-partitioned by device over the nodes, 7-day chunks, TimescaleDB's default
   indexes, chunks created on the fly) vs into a plain table directly on one node, without
   indexes and with the hypertable's two indexes.
2. Narrow time range (one hour out of ``--days`` days: count/avg), the time_bucket GROUP BY over
   a day (hourly buckets) and over a week (daily buckets), and a whole-history GROUP BY device:
   the hypertable through the proxy (chunk exclusion) vs the plain table without an index (a
   sequential scan) and with an index on time. Median of ``--repeat`` runs; every answer is
   checked against the plain table's.
3. Compression: the older half of the chunks compressed (segment by device, order by time
   DESC); compression ratio (bytes before / after, as chunk_compression_stats reports them, and
   heap bytes / compressed bytes); the same narrow and one-day queries on a compressed range vs
   a hot range of the same hypertable, and the whole-history GROUP BY again.

Usage::

    python3 bench/hypertable_bench.py [--rows 2000000] [--nodes 3] [--devices 20] [--days 90]
                                      [--repeat 5]

Everything shares the machine's cores (2 here): read ratios from one run, not absolutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.distributed_bench import start_bench_proxy, stop_bench_proxy  # noqa: E402
from orochi_proxy.localcluster import LocalCluster  # noqa: E402

COLUMNS = "time timestamptz NOT NULL, device int NOT NULL, value float8, cpu numeric(6,2), state text"
UTC = dt.UTC

NARROW = "SELECT count(*), avg(value), max(cpu) FROM {t} WHERE time >= '{lo}' AND time < '{lo}'::timestamptz + interval '1 hour'"
DAY = ("SELECT time_bucket('1 hour', time) AS b, count(*), avg(value), max(cpu) FROM {t} "
       "WHERE time >= '{lo}' AND time < '{lo}'::timestamptz + interval '1 day' GROUP BY b ORDER BY b")
WEEK = ("SELECT time_bucket('1 day', time) AS b, count(*), avg(value), sum(cpu) FROM {t} "
        "WHERE time >= '{lo}' AND time < '{lo}'::timestamptz + interval '7 days' GROUP BY b ORDER BY b")
HISTORY = "SELECT device, count(*), avg(value), max(time) FROM {t} GROUP BY device ORDER BY device"


def generate_sql(table: str, start: dt.datetime, step_s: int, steps: int, devices: int) -> str:
    """Deterministic metrics rows (no random()): a slow sine plus a fast wobble per device."""
    return f"""
INSERT INTO {table}
SELECT timestamptz '{start.isoformat()}' + i * interval '{step_s} seconds' + d * interval '{max(1, step_s // (devices + 1))} seconds',
       d,
       CASE WHEN (i + d) % 53 = 0 THEN NULL
            ELSE round((20 + d + 8 * sin(i / 700.0 + d) + 0.5 * sin(i * 1.7)) ::numeric, 3)::float8 END,
       CASE WHEN (i * 7 + d) % 97 = 0 THEN NULL ELSE round((30 + 25 * sin(i / 90.0 + d * 0.3))::numeric, 2) END,
       CASE WHEN (i + 3 * d) % 101 = 0 THEN NULL
            WHEN (i / 500 + d) % 13 = 0 THEN 'maintenance'
            WHEN sin(i / 90.0 + d * 0.3) > 0.9 THEN 'busy' ELSE 'ok' END
FROM generate_series(0, {steps - 1}) i CROSS JOIN generate_series(0, {devices - 1}) d"""


def copy_in(dsn: str, table: str, data: bytes) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        with cur.copy(f"COPY {table} FROM STDIN") as cp:
            step = 1 << 20
            for i in range(0, len(data), step):
                cp.write(data[i : i + step])
        return time.perf_counter() - started


def timed(conn: psycopg.Connection[Any], sql: str, repeat: int) -> tuple[float, list[tuple[str, ...]]]:
    """Median seconds of ``repeat`` runs (after one warm-up run) and the rows as text."""
    conn.execute(sql).fetchall()
    times = []
    rows: list[Any] = []
    for _ in range(repeat):
        started = time.perf_counter()
        rows = conn.execute(sql).fetchall()
        times.append(time.perf_counter() - started)
    return statistics.median(times), [tuple(_norm(v) for v in r) for r in rows]


def _norm(v: Any) -> str:
    """Floats to 9 significant digits: partial sums over shards add in another order."""
    return f"{v:.9g}" if isinstance(v, float) else str(v)


def chunks_kept(conn: psycopg.Connection[Any], sql: str) -> str:
    for (line,) in conn.execute("EXPLAIN " + sql).fetchall():
        if "Chunks:" in line:
            return line.split("Chunks:")[1].split("(")[0].strip()
    return "?"


def ms(s: float) -> str:
    return f"{s * 1000:>9.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=0, help="space partitions (default: one per node)")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--days", type=int, default=90)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compressors", type=int, default=4, help="clients running compress_chunk at once")
    args = ap.parse_args()
    partitions = args.partitions or args.nodes

    step_s = max(1, round(args.days * 86400 * args.devices / args.rows))
    steps = args.rows // args.devices
    start = dt.datetime(2024, 1, 1, tzinfo=UTC)
    end = start + dt.timedelta(seconds=steps * step_s)
    work = Path(tempfile.mkdtemp(prefix="orochi-htbench-"))
    cluster = LocalCluster(work / "nodes", args.nodes, password="orochi")
    proxy = None
    try:
        nodes = cluster.start()
        proxy, port = start_bench_proxy(work, nodes[0].port)
        proxy_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres options='-c TimeZone=UTC'"
        direct_dsn = nodes[0].dsn() + " options='-c TimeZone=UTC'"
        with psycopg.connect(proxy_dsn, autocommit=True) as conn:
            for n in nodes:
                conn.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
            conn.execute(f"CREATE TABLE metrics ({COLUMNS})")
            conn.execute(f"SELECT create_hypertable('metrics', 'time', 'device', {partitions}, "
                         "chunk_time_interval => INTERVAL '7 days')")
        with psycopg.connect(direct_dsn, autocommit=True) as conn:
            for t in ("plain_metrics", "plain_metrics_idx", "gen"):
                conn.execute(f"CREATE TABLE {t} ({COLUMNS})")
            conn.execute("CREATE INDEX ON plain_metrics_idx (time DESC)")
            conn.execute("CREATE INDEX ON plain_metrics_idx (device, time DESC)")
            conn.execute(generate_sql("gen", start, step_s, steps, args.devices))
            with conn.cursor() as cur, cur.copy("COPY gen TO STDOUT") as cp:
                data = b"".join(bytes(block) for block in cp)
            conn.execute("DROP TABLE gen")
        rows = data.count(b"\n")

        t_plain = copy_in(direct_dsn, "plain_metrics", data)
        t_plain_idx = copy_in(direct_dsn, "plain_metrics_idx", data)
        t_proxy = copy_in(proxy_dsn, "metrics", data)
        with psycopg.connect(direct_dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE plain_metrics")
            conn.execute("VACUUM ANALYZE plain_metrics_idx")
        for n in nodes:
            with psycopg.connect(n.dsn(), autocommit=True) as conn:
                conn.execute("ANALYZE")
        proxy_conn = psycopg.connect(proxy_dsn, autocommit=True)
        plain_conn = psycopg.connect(direct_dsn, autocommit=True)
        n_chunks = proxy_conn.execute(
            "SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'metrics'").fetchone()[0]  # type: ignore[index]

        print(f"{rows:,} rows ({args.devices} devices every {step_s} s over {args.days} days), {args.nodes} nodes, "
              f"hypertable space-partitioned by device into {partitions}, 7-day chunks ({n_chunks} chunks); "
              f"{os.cpu_count()} cores shared by everything\n")
        print("COPY ingest (text format, same rows)")
        print(f"  direct, plain table, no index       : {rows / t_plain:>10,.0f} rows/s")
        print(f"  direct, plain table, same 2 indexes : {rows / t_plain_idx:>10,.0f} rows/s")
        print(f"  hypertable through orochi-proxy     : {rows / t_proxy:>10,.0f} rows/s")
        print(f"  ratio proxy/direct                  : {t_plain / t_proxy:.2f} (no index), {t_plain_idx / t_proxy:.2f} (same indexes)")

        mid = start + (end - start) / 2
        hour = (mid.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=13)).isoformat()
        day = mid.replace(hour=0, minute=0, second=0, microsecond=0).isoformat()
        week = (mid.replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(days=mid.weekday())).isoformat()
        cases = [("one hour: count, avg", NARROW, hour), ("time_bucket 1 hour over a day", DAY, day),
                 ("time_bucket 1 day over a week", WEEK, week), ("whole history: GROUP BY device", HISTORY, "")]
        print(f"\nQueries (median of {args.repeat}; answers checked against the plain table)")
        print(f"  {'query':32s} {'plain, no index':>15s} {'plain, indexes':>15s} {'hypertable':>15s}  "
              f"{'plain/proxy':>11s} {'idx/proxy':>9s}  chunks kept")
        hot: dict[str, float] = {}
        for label, sql, lo in cases:
            t_seq, r_seq = timed(plain_conn, sql.format(t="plain_metrics", lo=lo), args.repeat)
            t_idx, r_idx = timed(plain_conn, sql.format(t="plain_metrics_idx", lo=lo), args.repeat)
            t_ht, r_ht = timed(proxy_conn, sql.format(t="metrics", lo=lo), args.repeat)
            hot[label] = t_ht
            same = r_seq == r_idx == r_ht
            print(f"  {label:32s} {ms(t_seq):>15s} {ms(t_idx):>15s} {ms(t_ht):>15s}  {t_seq / t_ht:>11.2f} {t_idx / t_ht:>9.2f}  "
                  f"{chunks_kept(proxy_conn, sql.format(t='metrics', lo=lo))}{'' if same else '   ROWS DIFFER'}")

        # ------------------------------------------------------------------ compression
        proxy_conn.execute("ALTER TABLE metrics SET (timescaledb.compress, timescaledb.compress_segmentby = 'device', "
                           "timescaledb.compress_orderby = 'time DESC')")
        # (chunk_schema, chunk_name, table_bytes, index_bytes, toast_bytes, total_bytes, node_name)
        before = {(r[0], r[1]): r for r in proxy_conn.execute("SELECT * FROM chunks_detailed_size('metrics')")}
        old = [f"{s}.{n}" for s, n in proxy_conn.execute(
            "SELECT chunk_schema, chunk_name FROM timescaledb_information.chunks WHERE hypertable_name = 'metrics' "
            "AND range_end <= %s ORDER BY range_start", (mid,)).fetchall()]
        errors: list[BaseException] = []

        def compress(names: list[str]) -> None:
            try:
                with psycopg.connect(proxy_dsn, autocommit=True) as c:
                    for name in names:
                        c.execute(f"SELECT compress_chunk('{name}')")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        started = time.perf_counter()
        threads = [threading.Thread(target=compress, args=(old[k :: args.compressors],)) for k in range(args.compressors)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        t_compress = time.perf_counter() - started
        if errors:
            raise errors[0]
        # (chunk_schema, chunk_name, compression_status, before table/index/toast/total, after
        # table/index/toast/total, node_name): admin functions are called on their own.
        stats = [r for r in proxy_conn.execute("SELECT * FROM chunk_compression_stats('metrics')") if r[2] == "Compressed"]
        b_total = sum(r[6] or 0 for r in stats)
        a_total = sum(r[10] or 0 for r in stats)
        heap = sum((before[(r[0], r[1])][2] or 0) + (before[(r[0], r[1])][4] or 0) for r in stats)
        rows_warm = proxy_conn.execute(f"SELECT count(*) FROM metrics WHERE time < '{mid.isoformat()}'").fetchone()[0]  # type: ignore[index]
        print(f"\nCompression: {len(stats)} of {n_chunks} chunks (the older half, {rows_warm:,} rows), segment by device, "
              f"order by time DESC; {args.compressors} clients, {t_compress:.1f} s ({rows_warm / t_compress:,.0f} rows/s)")
        print(f"  total bytes before / after (chunk_compression_stats)       : {b_total:>13,} / {a_total:>11,}  = {b_total / max(a_total, 1):.1f}x")
        print(f"  heap bytes (table + toast) / compressed total bytes         : {heap:>13,} / {a_total:>11,}  = {heap / max(a_total, 1):.1f}x")

        warm_hour = (start + (mid - start) / 2).replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=13)
        hot_hour = (mid + (end - mid) / 2).replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=13)
        print(f"\nHot vs compressed ranges of the hypertable (median of {args.repeat})")
        print(f"  {'query':32s} {'hot range':>15s} {'compressed':>15s}  {'compressed/hot':>14s}")
        for label, sql, offset in (("one hour: count, avg", NARROW, dt.timedelta(0)),
                                   ("time_bucket 1 hour over a day", DAY, -dt.timedelta(hours=13))):
            t_hot, r_hot = timed(proxy_conn, sql.format(t="metrics", lo=(hot_hour + offset).isoformat()), args.repeat)
            t_warm, r_warm = timed(proxy_conn, sql.format(t="metrics", lo=(warm_hour + offset).isoformat()), args.repeat)
            _, p_warm = timed(plain_conn, sql.format(t="plain_metrics_idx", lo=(warm_hour + offset).isoformat()), 1)
            print(f"  {label:32s} {ms(t_hot):>15s} {ms(t_warm):>15s}  {t_warm / t_hot:>14.2f}"
                  f"{'' if r_warm == p_warm else '   ROWS DIFFER from plain'}")
        label, sql = "whole history: GROUP BY device", HISTORY
        t_mixed, r_mixed = timed(proxy_conn, sql.format(t="metrics"), max(1, args.repeat // 2))
        _, r_plain = timed(plain_conn, sql.format(t="plain_metrics"), 1)
        print(f"  {label:32s} {ms(hot[label]):>15s} {ms(t_mixed):>15s}  {t_mixed / hot[label]:>14.2f}"
              f"   (all chunks hot / half compressed){'' if r_mixed == r_plain else '   ROWS DIFFER from plain'}")
        proxy_conn.close()
        plain_conn.close()
    finally:
        if proxy is not None:
            stop_bench_proxy(proxy)
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
