"""The bank invariant under faults: transfers through the proxy while it and the nodes crash.

Accounts (a distributed table over every node) start with equal balances; client threads move
money between random accounts, each transfer one transaction block through the proxy::

    BEGIN; UPDATE accounts (debit); UPDATE accounts (credit); INSERT INTO transfers (uuid); COMMIT

and retry after any error. Meanwhile a chaos thread SIGKILLs the proxy (and starts a new one on
the same port) and crashes nodes (``pg_ctl stop -m immediate``, then start) — the metadata node
included. At the end, everything running again and recovery done, on the nodes directly:

* no ``orochi_*`` prepared transaction is left, and the total balance is unchanged;
* every transfer whose COMMIT the client saw succeed is in the log exactly once, as sent;
* no transfer the client saw fail for sure (an error before COMMIT, or a COMMIT that failed with
  anything but a lost connection) is in the log; one whose COMMIT lost its connection may or
  may not be (its outcome is unknown to the client);
* every balance is its start plus what the log says came in minus what went out: a logged
  transfer is fully applied, and nothing applied is missing from the log.

The cluster is this module's own (three nodes, started in a couple of seconds): crashing the
session cluster's metadata node would disturb the other modules, and durability must be real:
with ``synchronous_commit = off`` (the shared cluster's setting) a crash may lose a one-node
transaction whose COMMIT the client saw succeed, which is PostgreSQL's documented trade-off,
not the proxy's doing.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import pg_base_dir
from proxyproc import ProxyProcess, start_proxy

from orochi_proxy.localcluster import LocalCluster, free_port

ACCOUNTS = 200
START = 1000
WORKERS = 8
CHAOS_SECONDS = 20.0
SHARDS = 6
CHAOS_SEED = int(os.environ.get("BANK_CHAOS_SEED", "42"))  # vary it to explore
WAIT = 60.0  # upper bound for things that happen promptly (a recovery round, a join)


@pytest.fixture(scope="module")
def bank_cluster() -> Iterator[LocalCluster]:
    c = LocalCluster(pg_base_dir("bank"), 3, settings={"synchronous_commit": "on"})
    try:
        c.start()
        yield c
    finally:
        c.destroy()


@dataclass
class Ledger:
    """What the clients saw, by transfer id."""

    sent: dict[uuid.UUID, tuple[int, int, int]] = field(
        default_factory=dict
    )  # id -> (src, dst, amount)
    committed: set[uuid.UUID] = field(default_factory=set)  # COMMIT succeeded
    failed: set[uuid.UUID] = field(default_factory=set)  # certainly not committed
    unknown: set[uuid.UUID] = field(default_factory=set)  # COMMIT lost its connection
    errors: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Bank:
    def __init__(self, cluster: LocalCluster, tmp: Path, pool_mode: str) -> None:
        self.cluster = cluster
        self.tmp = tmp
        self.pool_mode = pool_mode
        self.port = free_port()
        self.generation = 0
        self.proxy = self._start_proxy()
        self.events: list[str] = []

    def _start_proxy(self) -> ProxyProcess:
        self.generation += 1
        return start_proxy(
            self.tmp,
            self.cluster,
            name=f"bank{self.generation}",
            server={"port": self.port, "pool_mode": self.pool_mode},
            backend={"recovery_interval": 1, "transaction_lock_timeout": "5s"},
        )

    def dsn(self) -> str:
        return self.proxy.dsn()

    def kill_proxy(self) -> None:
        self.proxy.process.kill()
        self.proxy.process.wait(WAIT)
        self.proxy = self._start_proxy()  # same port: clients just reconnect

    def crash_node(self, i: int, down: float) -> None:
        port = self.cluster.nodes[i].port
        self.cluster.stop_node(i, "immediate")
        try:
            time.sleep(down)  # pacing: the node stays down a while (clients see it gone)
        finally:
            self.cluster.start_node(i)
        assert self.cluster.nodes[i].port == port, "the node came back on another port"

    def shard_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of ``table``, read from its shards on the nodes directly."""
        with psycopg.connect(self.dsn(), autocommit=True) as a:
            shards = a.execute(
                "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = %s",
                (f"public.{table}",),
            ).fetchall()
        ports = {n.port: n for n in self.cluster.nodes}
        rows: list[tuple[Any, ...]] = []
        for shard, port in shards:
            with psycopg.connect(ports[int(port)].dsn(), autocommit=True) as c:
                rows += c.execute(f"SELECT * FROM {shard}").fetchall()
        return rows

    def prepared(self) -> list[str]:
        out: list[str] = []
        for n in self.cluster.nodes:
            with psycopg.connect(n.dsn(), autocommit=True) as c:
                out += [
                    r[0]
                    for r in c.execute(
                        "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'orochi\\_%'"
                    ).fetchall()
                ]
        return out


def _is_connection_error(exc: BaseException) -> bool:
    """A lost connection (client side, or the proxy's 08xxx): the outcome is unknown."""
    if isinstance(exc, psycopg.OperationalError):
        state = getattr(exc, "sqlstate", None)
        return state is None or state.startswith("08")
    return False


def _worker(bank: Bank, ledger: Ledger, seed: int, stop: threading.Event) -> None:
    rng = random.Random(seed)
    conn: psycopg.Connection[Any] | None = None
    while not stop.is_set():
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        amount = rng.randint(1, 100)
        tid = uuid.uuid4()
        with ledger.lock:
            ledger.sent[tid] = (src, dst, amount)
        at_commit = False
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(bank.dsn(), autocommit=True, connect_timeout=5)
            conn.execute("BEGIN")
            # Rows locked in id order: concurrent transfers never wait on each other in a cycle.
            for acc in sorted((src, dst)):
                delta = -amount if acc == src else amount
                conn.execute(
                    "UPDATE accounts SET balance = balance + %s WHERE id = %s", (delta, acc)
                )
            conn.execute(
                "INSERT INTO transfers (id, src, dst, amount) VALUES (%s, %s, %s, %s)",
                (tid, src, dst, amount),
            )
            at_commit = True
            status = conn.execute("COMMIT").statusmessage
            with ledger.lock:
                (ledger.committed if status == "COMMIT" else ledger.failed).add(tid)
        except psycopg.Error as exc:
            unknown = at_commit and _is_connection_error(exc)
            with ledger.lock:
                (ledger.unknown if unknown else ledger.failed).add(tid)
                ledger.errors[f"{'commit' if at_commit else 'body'}:{type(exc).__name__}"] += 1
            if conn is not None and not conn.closed:
                try:
                    conn.execute("ROLLBACK")
                except psycopg.Error:
                    conn.close()
            if conn is not None and conn.closed:
                conn = None
            time.sleep(rng.uniform(0.02, 0.1))  # back off while the proxy or a node restarts
    if conn is not None:
        conn.close()


def _chaos(bank: Bank, stop: threading.Event, seed: int, errors: list[BaseException]) -> None:
    """Alternately kill the proxy and crash a node (node 0 first), at random moments."""
    rng = random.Random(seed)
    others = list(range(1, len(bank.cluster.nodes)))
    rng.shuffle(others)
    nodes = [0, *others]
    deadline = time.monotonic() + CHAOS_SECONDS
    k = 0
    try:
        while time.monotonic() < deadline:
            time.sleep(rng.uniform(1.0, 2.5))  # pacing: let transfers run between faults
            if k % 2 == 0:
                bank.events.append(f"{time.monotonic():.1f} kill proxy")
                bank.kill_proxy()
            else:
                i = nodes[(k // 2) % len(nodes)]
                bank.events.append(f"{time.monotonic():.1f} crash node {i}")
                bank.crash_node(i, rng.uniform(0.2, 1.0))
            k += 1
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)
    finally:
        stop.set()


@pytest.mark.parametrize("pool_mode", ["session", "transaction"])
def test_bank_invariant_under_faults(bank_cluster: LocalCluster, tmp_path: Path, pool_mode: str) -> None:
    """The invariants above, with clients holding a metadata-node connection for their whole
    session (``session``) or only inside each transaction (``transaction`` pooling)."""
    bank = Bank(bank_cluster, tmp_path, pool_mode)
    try:
        with psycopg.connect(bank.dsn(), autocommit=True) as a:
            for n in bank_cluster.nodes:
                a.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
            a.execute("DROP TABLE IF EXISTS accounts, transfers")  # the other pool mode's run
            a.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            a.execute(f"SELECT create_distributed_table('accounts', 'id', shard_count => {SHARDS})")
            a.execute(
                "CREATE TABLE transfers (id uuid PRIMARY KEY, src int NOT NULL, dst int NOT NULL, "
                "amount int NOT NULL)"
            )
            a.execute(
                f"SELECT create_distributed_table('transfers', 'id', shard_count => {SHARDS})"
            )
            a.execute(
                f"INSERT INTO accounts SELECT g, {START} FROM generate_series(1, {ACCOUNTS}) g"
            )
        ledger = Ledger()
        stop = threading.Event()
        chaos_errors: list[BaseException] = []
        workers = [
            threading.Thread(target=_worker, args=(bank, ledger, seed, stop), daemon=True)
            for seed in range(WORKERS)
        ]
        chaos = threading.Thread(
            target=_chaos, args=(bank, stop, CHAOS_SEED, chaos_errors), daemon=True
        )
        for th in (*workers, chaos):
            th.start()
        chaos.join(CHAOS_SECONDS + WAIT)
        stop.set()
        for th in workers:
            th.join(WAIT)
        hung = [th.name for th in workers if th.is_alive()]
        if hung:  # what each session waits on goes to the proxy's log
            bank.proxy.process.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
        assert not hung, f"clients hang: {hung}\n{bank.events}\n{bank.proxy.log_tail()}"
        assert not chaos.is_alive() and not chaos_errors, (chaos_errors, bank.events)
        assert any("kill proxy" in e for e in bank.events), bank.events
        assert any("crash node" in e for e in bank.events), bank.events

        # Everything is up again; recovery finishes what the crashes left prepared.
        for i in range(len(bank_cluster.nodes)):
            assert bank_cluster.is_running(i)
        assert bank.proxy.process.poll() is None, bank.proxy.log_tail()
        deadline = time.monotonic() + WAIT
        while True:
            with psycopg.connect(bank.dsn(), autocommit=True) as a:
                a.execute("SELECT recover_prepared_transactions()")
            left = bank.prepared()
            if not left:
                break
            assert time.monotonic() < deadline, f"prepared transactions left: {left}"
            time.sleep(0.2)

        summary = (
            f"committed {len(ledger.committed)}, failed {len(ledger.failed)}, "
            f"unknown {len(ledger.unknown)}, errors {dict(ledger.errors)}, events {bank.events}"
        )
        assert len(ledger.committed) >= 20, f"too little progress to mean anything: {summary}"

        balances = dict(bank.shard_rows("accounts"))
        log = bank.shard_rows("transfers")
        assert sorted(balances) == list(range(1, ACCOUNTS + 1)), summary
        assert sum(balances.values()) == ACCOUNTS * START, f"money created or destroyed: {summary}"

        counts = Counter(row[0] for row in log)
        assert [t for t, n in counts.items() if n > 1] == [], f"a transfer logged twice: {summary}"
        logged = set(counts)
        missing = ledger.committed - logged
        assert not missing, f"{len(missing)} transfers seen committed are not in the log: {summary}"
        ghosts = logged & ledger.failed
        assert not ghosts, f"{len(ghosts)} transfers seen failing are in the log: {summary}"
        assert logged <= ledger.committed | ledger.unknown, summary
        for tid, src, dst, amount in log:
            assert ledger.sent[tid] == (src, dst, amount), f"transfer {tid} logged wrongly"

        expected = dict.fromkeys(balances, START)
        for _tid, src, dst, amount in log:
            expected[src] -= amount
            expected[dst] += amount
        wrong = {a: (balances[a], expected[a]) for a in balances if balances[a] != expected[a]}
        assert not wrong, f"balances disagree with the log (balance, expected): {wrong}; {summary}"
        print(summary, f"; unknown outcomes that committed: {len(ledger.unknown & logged)}")
    finally:
        bank.proxy.stop()
