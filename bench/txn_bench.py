"""Distributed transactions: throughput through the proxy, measured side by side in one run.

1. One-node vs multi-node transactions through the proxy (pgbench custom scripts over a
   distributed ``accounts`` table): ``BEGIN; UPDATE one account; COMMIT`` commits in one phase on
   one node; ``BEGIN; UPDATE two accounts on different nodes; COMMIT`` is two-phase committed.
2. pgbench's built-in tpcb-like script through the proxy (``pgbench_accounts`` distributed on
   ``aid``, history on ``aid``; branches and tellers either distributed on ``bid``/``tid`` or
   reference tables, a copy on every node) vs the same script directly on one plain node (all
   tables local).

Usage::

    python3 bench/txn_bench.py [--nodes 3] [--seconds 10] [--clients 8] [--scale 1]
                               [--branches-tellers distributed|reference|both]

Everything shares the machine's cores: read ratios from one run, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.distributed_bench import pgbench, start_bench_proxy, stop_bench_proxy  # noqa: E402
from orochi_proxy.localcluster import LocalCluster  # noqa: E402

ACCOUNTS = 10_000


def pgbench_builtin(host: str, port: int, password: str, seconds: int, clients: int, scale: int) -> tuple[float, str]:
    out = subprocess.run(
        ["pgbench", "-n", "-b", "tpcb-like", "-M", "simple", "-c", str(clients), "-j", "2", "-T", str(seconds),
         "-s", str(scale), "-h", host, "-p", str(port), "-U", "postgres", "postgres"],
        capture_output=True, text=True, env=dict(os.environ, PGPASSWORD=password), check=False,
    )
    m = re.search(r"tps = ([0-9.]+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench failed:\n{out.stdout}\n{out.stderr}")
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    return float(m.group(1)), failed.group(1) if failed else "?"


def create_tpcb_tables(conn: psycopg.Connection, layout: str, scale: int) -> None:
    """pgbench -i's tables and rows through the proxy; branches/tellers ``distributed`` or ``reference``.

    Loaded through the proxy in a few statements (``pgbench -i`` itself inserts row by row).
    """
    conn.execute("DROP TABLE IF EXISTS pgbench_branches, pgbench_tellers, pgbench_accounts, pgbench_history")
    conn.execute("CREATE TABLE pgbench_branches (bid int PRIMARY KEY, bbalance int, filler char(88))")
    conn.execute("CREATE TABLE pgbench_tellers (tid int PRIMARY KEY, bid int, tbalance int, filler char(84))")
    conn.execute("CREATE TABLE pgbench_accounts (aid int PRIMARY KEY, bid int, abalance int, filler char(84))")
    conn.execute("CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22))")
    if layout == "reference":
        conn.execute("SELECT create_reference_table('pgbench_branches')")
        conn.execute("SELECT create_reference_table('pgbench_tellers')")
    else:
        conn.execute("SELECT create_distributed_table('pgbench_branches', 'bid')")
        conn.execute("SELECT create_distributed_table('pgbench_tellers', 'tid')")
    conn.execute("SELECT create_distributed_table('pgbench_accounts', 'aid')")
    conn.execute("SELECT create_distributed_table('pgbench_history', 'aid')")
    conn.execute("INSERT INTO pgbench_branches VALUES " + ", ".join(f"({i}, 0, '')" for i in range(1, scale + 1)))
    conn.execute("INSERT INTO pgbench_tellers VALUES " + ", ".join(f"({i}, {(i - 1) // 10 + 1}, 0, '')" for i in range(1, 10 * scale + 1)))
    with conn.cursor().copy("COPY pgbench_accounts FROM STDIN") as cp:
        for i in range(1, 100_000 * scale + 1):
            cp.write(f"{i}\t{(i - 1) // 100_000 + 1}\t0\t\n")


def balances(conn: psycopg.Connection) -> list[int]:
    """sum(abalance), sum(bbalance), sum(tbalance), sum(delta): all equal when the books balance."""
    return [
        conn.execute(f"SELECT sum({c}) FROM {t}").fetchone()[0]
        for t, c in (("pgbench_accounts", "abalance"), ("pgbench_branches", "bbalance"),
                     ("pgbench_tellers", "tbalance"), ("pgbench_history", "delta"))
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--branches-tellers", choices=("distributed", "reference", "both"), default="both",
                    help="how the tpcb-like run lays out pgbench_branches/pgbench_tellers")
    args = ap.parse_args()
    layouts = ("distributed", "reference") if args.branches_tellers == "both" else (args.branches_tellers,)

    work = Path(tempfile.mkdtemp(prefix="orochi-tbench-"))
    cluster = LocalCluster(work / "nodes", args.nodes + 1, password="orochi")
    proxy = None
    try:
        nodes = cluster.start()
        plain, nodes = nodes[-1], nodes[:-1]  # the last node serves the direct comparison
        proxy, port = start_bench_proxy(work, nodes[0].port)
        proxy_dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        with psycopg.connect(proxy_dsn, autocommit=True) as conn:
            for n in nodes:
                conn.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            conn.execute("SELECT create_distributed_table('accounts', 'id')")
            for start in range(1, ACCOUNTS + 1, 1000):
                values = ", ".join(f"({i}, 1000)" for i in range(start, min(start + 1000, ACCOUNTS + 1)))
                conn.execute(f"INSERT INTO accounts VALUES {values}")

        one = work / "one_node.sql"
        one.write_text(
            f"\\set id random(1, {ACCOUNTS})\nBEGIN;\nUPDATE accounts SET balance = balance + 1 WHERE id = :id;\nCOMMIT;\n"
        )
        two_random = work / "two_random.sql"
        two_random.write_text(
            f"\\set x random(1, {ACCOUNTS})\n\\set y random(1, {ACCOUNTS})\nBEGIN;\n"
            "UPDATE accounts SET balance = balance - 1 WHERE id = :x;\n"
            "UPDATE accounts SET balance = balance + 1 WHERE id = :y;\nCOMMIT;\n"
        )
        print(f"{args.nodes} nodes (+1 plain node for the direct runs), {os.cpu_count()} cores shared by everything;"
              f" pgbench {args.clients} clients, {args.seconds} s each\n")
        print("Transactions through orochi-proxy (-M simple)")
        tps_one = pgbench("127.0.0.1", port, "postgres", "", one, "simple", args.seconds, args.clients)
        tps_two = pgbench("127.0.0.1", port, "postgres", "", two_random, "simple", args.seconds, args.clients)
        print(f"  one-node (1PC)  BEGIN; UPDATE; COMMIT          : {tps_one:>9,.0f} tps")
        print(f"  two accounts, random (mostly 2PC)             : {tps_two:>9,.0f} tps   ratio to one-node {tps_two / tps_one:.2f}")
        with psycopg.connect(proxy_dsn, autocommit=True) as conn:
            total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()[0]
        print(f"  total balance after the transfers: {total:,} (started {ACCOUNTS * 1000:,} + one-node increments)")

        # tpcb-like: the same schema directly on the plain node and distributed through the proxy.
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), "-h", plain.host, "-p", str(plain.port),
                        "-U", "postgres", "postgres"], env=dict(os.environ, PGPASSWORD="orochi"), check=True,
                       capture_output=True)
        print("\npgbench tpcb-like (-M simple)")
        tps_plain, f_plain = pgbench_builtin(plain.host, plain.port, "orochi", args.seconds, args.clients, args.scale)
        print(f"  direct, one plain node                          : {tps_plain:>9,.0f} tps (failed {f_plain})")
        for layout in layouts:
            with psycopg.connect(proxy_dsn, autocommit=True) as conn:
                create_tpcb_tables(conn, layout, args.scale)
            tps_proxy, f_proxy = pgbench_builtin("127.0.0.1", port, "", args.seconds, args.clients, args.scale)
            with psycopg.connect(proxy_dsn, autocommit=True) as conn:
                sums = balances(conn)
            print(f"  orochi-proxy, {args.nodes} nodes, branches/tellers {layout:<11}: {tps_proxy:>9,.0f} tps"
                  f" (failed {f_proxy})   ratio {tps_proxy / tps_plain:.2f}")
            print(f"    balances (accounts, branches, tellers, history): {sums}  consistent: {len(set(sums)) == 1}")
    finally:
        if proxy is not None:
            stop_bench_proxy(proxy)
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
