"""pgbench's built-in TPC-B-like script through the proxy, then the books must balance.

The pgbench tables are created through the proxy with the schema ``pgbench -i -s 1`` creates
(``pgbench -i`` itself would load row by row through the proxy, which is slow):
``pgbench_accounts`` distributed on ``aid``, ``pgbench_branches`` on ``bid``,
``pgbench_tellers`` on ``tid`` and ``pgbench_history`` on ``aid``. Every pgbench transaction
then updates an account, a teller and a branch — usually on different nodes — and inserts a
history row: a distributed transaction block committed with two-phase commit.

pgbench runs for a few seconds with the simple and with the extended query protocol; it must
exit 0 with no failed transaction, and afterwards (through the proxy):
``sum(abalance) = sum(bbalance) = sum(tbalance) = sum(delta)`` and the history holds one row per
transaction pgbench reports as processed.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proxyproc import ProxyProcess, start_proxy

from orochi_proxy.localcluster import LocalCluster, find_pg_bindir

SCALE = 1
ACCOUNTS = 100_000 * SCALE
DURATION = 10  # seconds per pgbench run
TABLES = ("pgbench_history", "pgbench_tellers", "pgbench_accounts", "pgbench_branches")


@pytest.fixture(scope="module")
def bench(cluster: LocalCluster, proxy: ProxyProcess) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(proxy.dsn(), autocommit=True) as a:
        for n in cluster.nodes:
            a.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
        a.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES)}")
        try:
            # pgbench -i's DDL (fillfactor left out: it only tunes page fill).
            a.execute(
                "CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, "
                "mtime timestamp, filler char(22))"
            )
            a.execute(
                "CREATE TABLE pgbench_tellers (tid int NOT NULL PRIMARY KEY, bid int, "
                "tbalance int, filler char(84))"
            )
            a.execute(
                "CREATE TABLE pgbench_accounts (aid int NOT NULL PRIMARY KEY, bid int, "
                "abalance int, filler char(84))"
            )
            a.execute(
                "CREATE TABLE pgbench_branches (bid int NOT NULL PRIMARY KEY, bbalance int, "
                "filler char(88))"
            )
            for table, column in (
                ("pgbench_accounts", "aid"),
                ("pgbench_branches", "bid"),
                ("pgbench_tellers", "tid"),
                ("pgbench_history", "aid"),
            ):
                a.execute(f"SELECT create_distributed_table('{table}', '{column}')")
            a.execute(
                f"INSERT INTO pgbench_branches (bid, bbalance) "
                f"SELECT g, 0 FROM generate_series(1, {SCALE}) g"
            )
            a.execute(
                f"INSERT INTO pgbench_tellers (tid, bid, tbalance) "
                f"SELECT g, (g - 1) / 10 + 1, 0 FROM generate_series(1, {10 * SCALE}) g"
            )
            a.execute(
                f"INSERT INTO pgbench_accounts (aid, bid, abalance, filler) "
                f"SELECT g, (g - 1) / 100000 + 1, 0, '' FROM generate_series(1, {ACCOUNTS}) g"
            )
            assert a.execute("SELECT count(*) FROM pgbench_accounts").fetchone() == (ACCOUNTS,)
            yield a
        finally:
            a.execute(f"DROP TABLE IF EXISTS {', '.join(TABLES)}")


def _pgbench(proxy: ProxyProcess, mode: str, duration: int = DURATION) -> int:
    """Run the built-in tpcb-like script; returns the number of processed transactions."""
    pgbench = find_pg_bindir() / "pgbench"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = proxy.password
    cmd = [
        str(pgbench),
        "-n",  # no VACUUM of the pgbench tables first
        "-b", "tpcb-like",
        "-c", "4",
        "-j", "2",
        "-T", str(duration),
        "-M", mode,
        "-h", proxy.host,
        "-p", str(proxy.port),
        "-U", proxy.user,
        proxy.dbname,
    ]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"pgbench -M {mode} exited {res.returncode}:\n{out}"
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert failed is None or failed.group(1) == "0", out
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    assert processed, out
    n = int(processed.group(1))
    assert n > 0, out
    return n


def _assert_books_balance(
    a: psycopg.Connection[Any], cluster: LocalCluster, transactions: int
) -> None:
    (abal,) = a.execute("SELECT sum(abalance) FROM pgbench_accounts").fetchone()
    (bbal,) = a.execute("SELECT sum(bbalance) FROM pgbench_branches").fetchone()
    (tbal,) = a.execute("SELECT sum(tbalance) FROM pgbench_tellers").fetchone()
    rows, delta = a.execute(
        "SELECT count(*), coalesce(sum(delta), 0) FROM pgbench_history"
    ).fetchone()
    assert (abal, bbal, tbal) == (delta, delta, delta), (abal, bbal, tbal, delta)
    assert rows == transactions, f"history has {rows} rows, pgbench reported {transactions}"
    for n in cluster.nodes:
        with psycopg.connect(n.dsn(), autocommit=True) as c:
            assert c.execute("SELECT gid FROM pg_catalog.pg_prepared_xacts").fetchall() == []


def test_pgbench_tpcb_like_simple_then_extended(
    bench: psycopg.Connection[Any], cluster: LocalCluster, proxy: ProxyProcess
) -> None:
    total = _pgbench(proxy, "simple")
    _assert_books_balance(bench, cluster, total)
    total += _pgbench(proxy, "extended")
    _assert_books_balance(bench, cluster, total)


def test_pgbench_tpcb_like_with_reference_branches_and_tellers(
    bench: psycopg.Connection[Any], cluster: LocalCluster, tmp_path: Path
) -> None:
    """The same, with branches and tellers as reference tables (a copy on every node).

    Every transaction updates the one branch row on every node: the copies are written in one
    fixed node order, so the clients queue on the first copy instead of deadlocking across
    nodes (which only the 1 s lock_timeout would end, failing pgbench's transactions).
    """
    a = bench
    a.execute("DROP TABLE IF EXISTS pgbench_tellers, pgbench_branches")
    a.execute(
        "CREATE TABLE pgbench_tellers (tid int NOT NULL PRIMARY KEY, bid int, "
        "tbalance int, filler char(84))"
    )
    a.execute(
        "CREATE TABLE pgbench_branches (bid int NOT NULL PRIMARY KEY, bbalance int, "
        "filler char(88))"
    )
    a.execute("SELECT create_reference_table('pgbench_tellers')")
    a.execute("SELECT create_reference_table('pgbench_branches')")
    a.execute(
        f"INSERT INTO pgbench_branches (bid, bbalance) SELECT g, 0 FROM generate_series(1, {SCALE}) g"
    )
    a.execute(
        f"INSERT INTO pgbench_tellers (tid, bid, tbalance) "
        f"SELECT g, (g - 1) / 10 + 1, 0 FROM generate_series(1, {10 * SCALE}) g"
    )
    a.execute("TRUNCATE pgbench_history")
    a.execute("UPDATE pgbench_accounts SET abalance = 0 WHERE abalance <> 0")
    # A short lock_timeout: a deadlocked pair is ended in a second, not in the default 30 s.
    ref_proxy = start_proxy(
        tmp_path, cluster, name="tpcb_ref", backend={"transaction_lock_timeout": "1s"}
    )
    try:
        total = _pgbench(ref_proxy, "simple", duration=5)
        _assert_books_balance(a, cluster, total)
        total += _pgbench(ref_proxy, "extended", duration=5)
    finally:
        ref_proxy.stop()
    _assert_books_balance(a, cluster, total)
    for table in ("pgbench_tellers", "pgbench_branches"):
        _assert_copies_agree(a, cluster, table)


def _assert_copies_agree(a: psycopg.Connection[Any], cluster: LocalCluster, table: str) -> None:
    """Every node's copy of a reference table holds the same rows (read on the nodes directly)."""
    placements = a.execute(
        "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = %s", (f"public.{table}",)
    ).fetchall()
    assert len(placements) == len(cluster.nodes), placements
    ports = {n.port: n for n in cluster.nodes}
    copies = []
    for shard, port in placements:
        with psycopg.connect(ports[int(port)].dsn(), autocommit=True) as c:
            copies.append(c.execute(f"SELECT * FROM {shard} ORDER BY 1").fetchall())
    assert all(copy == copies[0] for copy in copies), f"copies of {table} differ"
