"""Distributed tables: proxy vs one plain PostgreSQL, measured side by side in one run.

1. COPY ingest: rows/s of ``COPY ... FROM STDIN`` into a distributed table through the proxy vs
   into a plain table directly on one node (same rows, text format).
2. Multi-shard aggregate: ``GROUP BY`` over all rows on ``--nodes`` nodes through the proxy vs
   the same query on the plain table (median wall time of several runs).
3. Point SELECT by key: pgbench with a random-key script through the proxy (router) vs the
   plain table directly (TPS), ``-M simple`` and ``-M prepared``.

Usage::

    python3 bench/distributed_bench.py [--rows 1000000] [--nodes 4] [--seconds 10]

Everything shares the machine's cores (2 here): read ratios from one run, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.pgbench_proxy import free_port, wait_port  # noqa: E402
from orochi_proxy.localcluster import LocalCluster  # noqa: E402

TABLE_DDL = "CREATE TABLE {name} (id bigint PRIMARY KEY, user_id int NOT NULL, kind int NOT NULL, amount numeric(12,2), note text)"
QUERY = "SELECT kind, count(*), sum(amount), avg(amount), max(user_id) FROM {name} GROUP BY kind ORDER BY kind"


def rows_text(n: int) -> bytes:
    lines = [f"{i}\t{i % 100000}\t{i % 17}\t{(i * 37) % 100000 / 100:.2f}\tnote {i % 1000}\n" for i in range(1, n + 1)]
    return "".join(lines).encode()


def copy_in(dsn: str, table: str, data: bytes) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        started = time.perf_counter()
        with cur.copy(f"COPY {table} FROM STDIN") as cp:
            step = 1 << 20
            for i in range(0, len(data), step):
                cp.write(data[i : i + step])
        return time.perf_counter() - started


def timed_query(dsn: str, sql: str, repeat: int) -> tuple[float, list]:
    times = []
    rows: list = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(repeat):
            started = time.perf_counter()
            rows = conn.execute(sql).fetchall()
            times.append(time.perf_counter() - started)
    return statistics.median(times), rows


def pgbench(host: str, port: int, user: str, password: str, script: Path, mode: str, seconds: int, clients: int) -> float:
    out = subprocess.run(
        ["pgbench", "-n", "-f", str(script), "-M", mode, "-c", str(clients), "-j", "2", "-T", str(seconds),
         "-h", host, "-p", str(port), "-U", user, "postgres"],
        capture_output=True, text=True, env=dict(os.environ, PGPASSWORD=password), check=False,
    )
    m = re.search(r"tps = ([0-9.]+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    return float(m.group(1))


def start_bench_proxy(work: Path, metadata_port: int) -> tuple[subprocess.Popen, int]:
    """An ``orochi-proxy serve`` (trust auth, metadata on ``metadata_port``) for a benchmark run."""
    port = free_port()
    cfg = work / "proxy.toml"
    cfg.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\nauth = "trust"\n'
        f'[metadata]\nhost = "127.0.0.1"\nport = {metadata_port}\ndbname = "postgres"\n'
        f'[backend]\nuser = "postgres"\npassword = "orochi"\npool_size = 64\n'
    )
    proxy = subprocess.Popen(
        [sys.executable, "-m", "orochi_proxy", "serve", "--config", str(cfg), "--log-level", "warning"],
        stdout=open(work / "proxy.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    wait_port(port)
    return proxy, port


def stop_bench_proxy(proxy: subprocess.Popen) -> None:
    proxy.send_signal(signal.SIGTERM)
    try:
        proxy.wait(10)
    except subprocess.TimeoutExpired:
        proxy.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="orochi-dbench-"))
    cluster = LocalCluster(work / "nodes", args.nodes, password="orochi")
    proxy = None
    try:
        nodes = cluster.start()
        proxy, port = start_bench_proxy(work, nodes[0].port)
        proxy_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        direct_dsn = nodes[0].dsn()
        with psycopg.connect(proxy_dsn, autocommit=True) as conn:
            for n in nodes:
                conn.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
            conn.execute(TABLE_DDL.format(name="dist_events"))
            conn.execute("SELECT create_distributed_table('dist_events', 'id')")
        with psycopg.connect(direct_dsn, autocommit=True) as conn:
            conn.execute(TABLE_DDL.format(name="plain_events"))

        data = rows_text(args.rows)
        t_direct = copy_in(direct_dsn, "plain_events", data)
        t_proxy = copy_in(proxy_dsn, "dist_events", data)
        with psycopg.connect(direct_dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE plain_events")
        print(f"{args.rows:,} rows, {args.nodes} nodes, 32 shards; {os.cpu_count()} cores shared by everything\n")
        print("COPY ingest (text format)")
        print(f"  direct into one plain table : {args.rows / t_direct:>12,.0f} rows/s")
        print(f"  through orochi-proxy        : {args.rows / t_proxy:>12,.0f} rows/s")
        print(f"  ratio proxy/direct          : {t_direct / t_proxy:.2f}")

        tq_direct, r_direct = timed_query(direct_dsn, QUERY.format(name="plain_events"), 5)
        tq_proxy, r_proxy = timed_query(proxy_dsn, QUERY.format(name="dist_events"), 5)
        same = [tuple(map(str, r)) for r in r_direct] == [tuple(map(str, r)) for r in r_proxy]
        print("\nGROUP BY over all rows (median of 5)")
        print(f"  one plain node              : {tq_direct * 1000:>10.1f} ms")
        print(f"  orochi-proxy, {args.nodes} nodes        : {tq_proxy * 1000:>10.1f} ms")
        print(f"  ratio proxy/plain time      : {tq_proxy / tq_direct:.2f}   (same rows: {same})")

        script = work / "point.sql"
        script.write_text(f"\\set id random(1, {args.rows})\nSELECT id, user_id, amount FROM {{t}} WHERE id = :id;\n")
        print(f"\nPoint SELECT by key, pgbench {args.clients} clients, {args.seconds} s")
        for mode in ("simple", "prepared"):
            s_direct = work / f"direct_{mode}.sql"
            s_proxy = work / f"proxy_{mode}.sql"
            s_direct.write_text(script.read_text().replace("{t}", "plain_events"))
            s_proxy.write_text(script.read_text().replace("{t}", "dist_events"))
            tps_direct = pgbench(nodes[0].host, nodes[0].port, "postgres", "orochi", s_direct, mode, args.seconds, args.clients)
            tps_proxy = pgbench("127.0.0.1", port, "postgres", "", s_proxy, mode, args.seconds, args.clients)
            print(f"  -M {mode:8s} direct {tps_direct:>9,.0f} tps   proxy {tps_proxy:>9,.0f} tps   ratio {tps_proxy / tps_direct:.2f}")
    finally:
        if proxy is not None:
            stop_bench_proxy(proxy)
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
