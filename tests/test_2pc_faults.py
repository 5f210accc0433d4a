"""Fault injection at every step of two-phase commit: the proxy or a node dies, recovery settles it.

Each case runs one distributed transaction that writes rows on all three nodes, through a proxy
started just for it with ``OROCHI_FAULT`` armed (``executor.faults``), in one of two shapes:

* ``block``: ``BEGIN``; one ``INSERT`` per row (so every node joins the block); ``COMMIT``
  (``orochi_proxy.txcoordinator``: the decision is written in the client's own metadata-node
  transaction);
* ``autocommit``: one ``INSERT ... VALUES`` with rows for every node (``executor.twophase``: the
  decision goes through the proxy's ``TransactionLog``).

``kill`` cases: the proxy SIGKILLs itself at the step; the client's connection breaks; a proxy
without faults then runs ``recover_prepared_transactions()``. ``node`` cases: the step pauses and
touches a file; the test crashes a participant node (``pg_ctl stop -m immediate``) and starts it
again; the commit goes on against the broken connection, and recovery settles what is left.

The verdict is read on the nodes directly (shard tables and ``pg_prepared_xacts``), never through
a proxy: no ``orochi_*`` prepared transaction is left, and the rows are on every node or on none —
all of them when the client saw COMMIT succeed (or when the proxy died after the commit point),
none when it saw an error (or when the proxy died before it).

The cases share the session's cluster: a stopped node is always started again (``finally``).
Tables are named ``f2pc_*`` and dropped at the end. Starting a proxy costs a second or two of
interpreter start-up, so the faulty proxies of the selected cases are started a couple of cases
ahead, in the background (``Prefetch``): an idle armed proxy does nothing until its case runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from proxyproc import ProxyProcess, start_proxy

from executor.twophase import GID_PREFIX, parse_gid
from orochi_proxy.localcluster import LocalCluster
from orochi_proxy.recovery import LOCK_SPACE

SHARDS = 6
ROWS = 30  # ids 0..29 hit every shard, and so every node
#: How long a paused step waits: long enough to crash a node while it waits (the test's
#: verdict does not depend on it: a later crash is just another interleaving).
PAUSE = 1.0
#: Upper bound for waits on events that happen promptly (a recovery round, a node restart).
WAIT = 30.0

COMMITTED_AFTER_KILL = {
    "prepared#1": False,
    "all_prepared": False,
    "decided": True,
    "commit_prepared#1": True,
}
STEPS = tuple(COMMITTED_AFTER_KILL)
PATHS = ("block", "autocommit")


def _prepared_gids(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute(
        "SELECT gid FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE %s",
        (GID_PREFIX.replace("_", "\\_") + "%",),
    ).fetchall()
    return [r[0] for r in rows]


@dataclass
class Fx:
    cluster: LocalCluster
    recoverer: ProxyProcess  # a proxy without faults; its recovery runs only when asked
    tmp: Path
    proxies: Prefetch | None = None  # the cases' faulty proxies

    def node_conn(self, i: int) -> psycopg.Connection[Any]:
        return psycopg.connect(self.cluster.nodes[i].dsn(), autocommit=True, connect_timeout=10)

    def admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.recoverer.dsn(), autocommit=True, connect_timeout=10)

    def prepared(self) -> dict[int, list[str]]:
        """Every node's ``orochi_*`` prepared transactions, read on the node."""
        out: dict[int, list[str]] = {}
        for i in range(len(self.cluster.nodes)):
            with self.node_conn(i) as c:
                out[i] = _prepared_gids(c)
        return out

    def table(self, name: str) -> tuple[str, dict[int, list[int]]]:
        """A fresh distributed table; (name, ids of 0..ROWS-1 by node index)."""
        with self.admin() as a:
            a.execute(f"DROP TABLE IF EXISTS {name}")
            a.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v int NOT NULL)")
            a.execute(f"SELECT create_distributed_table('{name}', 'id', shard_count => {SHARDS})")
            ports = {n.port: i for i, n in enumerate(self.cluster.nodes)}
            by_node: dict[int, list[int]] = {i: [] for i in ports.values()}
            for i in range(ROWS):
                shard = a.execute(
                    f"SELECT get_shard_id_for_distribution_column('{name}', {i})"
                ).fetchone()[0]
                port = a.execute(
                    "SELECT nodeport FROM citus_shards WHERE shardid = %s", (shard,)
                ).fetchone()[0]
                by_node[ports[int(port)]].append(i)
        assert all(by_node.values()), f"{name}: the rows must hit every node: {by_node}"
        # The session cluster runs with synchronous_commit = off: a node crashed right after
        # the table was created could lose its shard (PostgreSQL's trade-off, not the case
        # under test). A synchronous commit on each node flushes the WAL before it.
        for n in self.cluster.nodes:
            with psycopg.connect(n.dsn(), autocommit=True) as c:
                c.execute("SET synchronous_commit = on")
                c.execute("SELECT pg_catalog.txid_current()")
        return name, by_node

    def node_rows(self, table: str) -> dict[int, list[tuple[Any, ...]]]:
        """Rows of ``table`` on each node, read from its shards there."""
        with self.admin() as a:
            shards = a.execute(
                "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = %s",
                (f"public.{table}",),
            ).fetchall()
        ports = {n.port: i for i, n in enumerate(self.cluster.nodes)}
        out: dict[int, list[tuple[Any, ...]]] = {i: [] for i in ports.values()}
        for shard, port in shards:
            i = ports[int(port)]
            with self.node_conn(i) as c:
                out[i] += c.execute(f"SELECT id, v FROM {shard}").fetchall()
        return {i: sorted(r) for i, r in out.items()}

    def recover(self) -> None:
        """``recover_prepared_transactions()`` through the fault-free proxy until nothing is left.

        Repeated because a killed proxy's coordinator lock is released only when PostgreSQL has
        noticed its connection is gone; until then recovery (rightly) leaves its work alone.
        """
        deadline = time.monotonic() + WAIT
        while True:
            with self.admin() as a:
                a.execute("SELECT recover_prepared_transactions()")
            left = {i: g for i, g in self.prepared().items() if g}
            if not left:
                return
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prepared transactions left after recovery: {left}\n{self.recoverer.log_tail()}"
                )
            time.sleep(0.2)

    def wait_settled(self, proxy: ProxyProcess) -> None:
        """Wait until no node has an ``orochi_*`` prepared transaction (recovery by anyone)."""
        deadline = time.monotonic() + WAIT
        while True:
            left = {i: g for i, g in self.prepared().items() if g}
            if not left:
                return
            if time.monotonic() > deadline:
                pytest.fail(f"prepared transactions never settled: {left}\n{proxy.log_tail()}")
            time.sleep(0.2)

    def assert_all_or_nothing(
        self,
        table: str,
        by_node: dict[int, list[int]],
        committed: bool,
        extra: Sequence[tuple[int, int]] = (),
    ) -> None:
        """No prepared transaction is left; the case's rows are on every node, or on none.

        ``extra``: rows of a later transaction, committed for sure (ignored here).
        """
        assert {i: g for i, g in self.prepared().items() if g} == {}
        rows = {i: [r for r in rs if r not in extra] for i, rs in self.node_rows(table).items()}
        if committed:
            assert rows == {i: [(v, v) for v in sorted(ids)] for i, ids in by_node.items()}, (
                "every participant must hold its rows"
            )
        else:
            assert rows == {i: [] for i in by_node}, "no participant may keep any row"
        if extra:
            assert sorted(
                r for rs in self.node_rows(table).values() for r in rs if r in extra
            ) == sorted(extra)


class Prefetch:
    """Starts the faulty proxies of the selected cases, in their order, ``AHEAD`` at a time."""

    AHEAD = 2

    def __init__(self, start: dict[str, Any]) -> None:
        self._start = start  # case proxy name -> start_proxy thunk, in test order
        self._order = list(start)
        self._futures: dict[str, Future[ProxyProcess]] = {}
        self._pool = ThreadPoolExecutor(self.AHEAD)

    def get(self, name: str) -> ProxyProcess:
        i = self._order.index(name)
        for n in self._order[i : i + 1 + self.AHEAD]:
            if n not in self._futures:
                self._futures[n] = self._pool.submit(self._start[n])
        try:
            return self._futures[name].result()
        except Exception:  # noqa: BLE001 - started ahead while an earlier case had a node down
            proxy = self._start[name]()
            done: Future[ProxyProcess] = Future()
            done.set_result(proxy)
            self._futures[name] = done
            return proxy

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        for f in self._futures.values():
            if not f.cancelled() and f.exception() is None:
                f.result().stop()


def _selected_cases(request: pytest.FixtureRequest) -> list[tuple[str, dict[str, Any]]]:
    """(test name, parameters) of this module's collected parametrized cases, in run order."""
    out = []
    for item in request.session.items:
        if item.module is request.module and hasattr(item, "callspec"):
            out.append((item.originalname, dict(item.callspec.params)))  # type: ignore[attr-defined]
    return out


@pytest.fixture(scope="module")
def fx(
    request: pytest.FixtureRequest, cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fx]:
    tmp = tmp_path_factory.mktemp("f2pc")
    recoverer = start_proxy(tmp, cluster, name="recoverer", backend={"recovery_interval": 3600})
    f = Fx(cluster, recoverer, tmp)
    starts: dict[str, Any] = {}
    for test, params in _selected_cases(request):
        if test == "test_proxy_killed_at_step":
            name, env = _kill_proxy(params["step"], params["path"])
        elif test == "test_node_crashes_at_step":
            name, env = _node_proxy(f, params["step"], params["path"], params["victim"])
        else:
            continue
        starts[name] = lambda name=name, env=env: start_proxy(
            tmp, cluster, name=name, env=env, backend={"recovery_interval": 0.5}
        )
    f.proxies = Prefetch(starts)
    try:
        with f.admin() as a:
            for n in cluster.nodes:
                a.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
        f.recover()  # nothing of an earlier run may be left over
        yield f
    finally:
        for i in range(len(cluster.nodes)):
            if not cluster.is_running(i):
                cluster.start_node(i)
        try:
            with f.admin() as a:
                names = [
                    r[0]
                    for r in a.execute(
                        "SELECT table_name FROM citus_tables WHERE table_name LIKE 'public.f2pc\\_%'"
                    ).fetchall()
                ]
                if names:
                    a.execute(f"DROP TABLE IF EXISTS {', '.join(names)}")
        finally:
            f.proxies.close()
            recoverer.stop()


def _transaction(proxy: ProxyProcess, path: str, table: str, by_node: dict[int, list[int]]) -> None:
    """The transaction under test: rows 0..ROWS-1, first the last node's, then the others'."""
    order = [i for n in sorted(by_node, reverse=True) for i in by_node[n]]
    with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as c:
        if path == "block":
            c.execute("BEGIN")
            for i in order:
                c.execute(f"INSERT INTO {table} VALUES (%s, %s)", (i, i))
            try:
                cur = c.execute("COMMIT")
            except psycopg.Error:
                if not c.closed:
                    # What an application does next. It must get an answer (any answer): a
                    # session whose metadata-node connection died must not swallow it.
                    try:
                        c.execute("ROLLBACK")
                    except psycopg.Error:
                        pass
                raise
            assert cur.statusmessage == "COMMIT", cur.statusmessage
        else:
            values = ", ".join(f"({i}, {i})" for i in order)
            c.execute(f"INSERT INTO {table} VALUES {values}")


def _case_name(step: str, path: str) -> str:
    return f"{step.replace('#', '')}_{path}"


def _kill_proxy(step: str, path: str) -> tuple[str, dict[str, str]]:
    """Name and environment of the proxy of a kill case."""
    return f"kill_{_case_name(step, path)}", {"OROCHI_FAULT": f"{step}:kill"}


def _node_proxy(fx: Fx, step: str, path: str, victim: str) -> tuple[str, dict[str, str]]:
    """Name and environment of the proxy of a node case (the flag file is ``<name>.flag``)."""
    name = f"node_{_case_name(step, path)}_{victim}"
    return name, {
        "OROCHI_FAULT": f"{step}:pause={PAUSE}",
        "OROCHI_FAULT_FILE": str(fx.tmp / f"{name}.flag"),
    }


# ------------------------------------------------------------------------------ the proxy dies
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("step", STEPS)
def test_proxy_killed_at_step(fx: Fx, step: str, path: str) -> None:
    name, _env = _kill_proxy(step, path)
    table, by_node = fx.table(f"f2pc_{name}")
    assert fx.proxies is not None
    proxy = fx.proxies.get(name)
    try:
        with pytest.raises(psycopg.OperationalError):
            _transaction(proxy, path, table, by_node)
        assert proxy.process.wait(WAIT) == -9, (
            f"the fault at {step} did not fire:\n{proxy.log_tail()}"
        )
    finally:
        proxy.stop()
    fx.recover()
    fx.assert_all_or_nothing(table, by_node, COMMITTED_AFTER_KILL[step])


# ------------------------------------------------------------------------------ a node dies
#: (step, path, which node to crash, whether the client must see COMMIT succeed; None: either):
#: "unprepared" — a non-metadata participant that has not prepared yet (its PREPARE fails: the
#: client gets an error and nothing may commit); "prepared" — a non-metadata participant holding
#: a prepared transaction (it survives the crash: the commit goes on and recovery finishes that
#: node); "metadata" — node 0: the client's session, the decision record and a participant. When
#: node 0 dies after the commit point the client's session dies with it: the client may see
#: COMMIT or a broken connection (outcome unknown to it), and the rows must then be complete.
NODE_CASES = [
    ("prepared#1", "block", "unprepared", False),
    ("prepared#1", "autocommit", "prepared", True),
    ("all_prepared", "block", "prepared", True),
    ("all_prepared", "block", "metadata", False),
    ("all_prepared", "autocommit", "metadata", False),
    ("decided", "block", "metadata", None),
    ("decided", "autocommit", "prepared", True),
    ("commit_prepared#1", "block", "prepared", True),
    ("commit_prepared#1", "autocommit", "metadata", None),
]


@pytest.mark.parametrize(("step", "path", "victim", "succeeds"), NODE_CASES)
def test_node_crashes_at_step(
    fx: Fx, cluster: LocalCluster, step: str, path: str, victim: str, succeeds: bool | None
) -> None:
    name, env = _node_proxy(fx, step, path, victim)
    table, by_node = fx.table(f"f2pc_{name}")
    flag = Path(env["OROCHI_FAULT_FILE"])
    flag.unlink(missing_ok=True)
    assert fx.proxies is not None
    proxy = fx.proxies.get(name)
    outcome: dict[str, BaseException | None] = {}

    def client() -> None:
        try:
            _transaction(proxy, path, table, by_node)
            outcome["error"] = None
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = exc

    th = threading.Thread(target=client, daemon=True)
    stopped: int | None = None
    try:
        th.start()
        deadline = time.monotonic() + WAIT
        while not flag.exists():
            assert th.is_alive(), (
                f"the transaction ended before {step}: {outcome}\n{proxy.log_tail()}"
            )
            assert time.monotonic() < deadline, f"{step} never reached\n{proxy.log_tail()}"
            time.sleep(0.02)
        stopped = _pick_victim(fx, victim)
        cluster.stop_node(stopped, "immediate")
        # Whether the node went down while the step waited (it should, by far): only then is
        # the client's outcome determined by the case; any interleaving must be consistent.
        in_pause = time.time() - flag.stat().st_mtime < PAUSE
        cluster.start_node(stopped)
        stopped = None
        th.join(WAIT + PAUSE)
        assert not th.is_alive(), f"the client hangs after the crash\n{proxy.log_tail()}"
        # The faulty proxy lives on: its own periodic recovery settles what it left prepared.
        fx.wait_settled(proxy)
        # And it still commits multi-node writes (after a metadata-node restart too).
        _follow_up_write(proxy, table)
    finally:
        if stopped is not None and not cluster.is_running(stopped):
            cluster.start_node(stopped)
        proxy.stop()
    fx.recover()
    error = outcome["error"]
    assert error is None or isinstance(error, psycopg.Error), repr(error)
    if succeeds is None:
        # The client lost its connection during COMMIT: either outcome, but all or nothing.
        rows = [r for rs in fx.node_rows(table).values() for r in rs if r not in FOLLOW_UP]
        committed = error is None or bool(rows)
    else:
        committed = error is None
    fx.assert_all_or_nothing(table, by_node, committed=committed, extra=FOLLOW_UP)
    if in_pause:
        expected = {True: "success", False: "an error", None: "success or a broken connection"}[
            succeeds
        ]
        ok = (
            error is None or isinstance(error, psycopg.OperationalError)
            if succeeds is None
            else (error is None) == succeeds
        )
        assert ok, f"client saw {error!r}, expected {expected}\n{proxy.log_tail()}"
        if succeeds is None:
            assert committed, "the crash came after the commit point: the transaction must commit"


FOLLOW_UP = [(ROWS + i, 0) for i in range(ROWS)]


def _follow_up_write(proxy: ProxyProcess, table: str) -> None:
    """A multi-node autocommit INSERT through ``proxy`` commits (one retry: the crash may have
    broken a connection that nobody has used since)."""
    values = ", ".join(f"({i}, {v})" for i, v in FOLLOW_UP)
    for attempt in (1, 2):
        try:
            with psycopg.connect(proxy.dsn(), autocommit=True, connect_timeout=10) as c:
                c.execute(f"INSERT INTO {table} VALUES {values}")
            return
        except psycopg.OperationalError:
            if attempt == 2:
                raise


def _pick_victim(fx: Fx, kind: str) -> int:
    if kind == "metadata":
        return 0
    prepared = fx.prepared()
    for i in (2, 1):
        if bool(prepared[i]) == (kind == "prepared"):
            return i
    pytest.fail(f"no {kind} non-metadata participant at the pause: {prepared}")


# ------------------------------------------------------------------------------ start-up recovery
def test_start_up_recovery_finishes_a_killed_commit(fx: Fx, cluster: LocalCluster) -> None:
    """No explicit recovery call: a fresh proxy's start-up recovery commits the decided rest."""
    table, by_node = fx.table("f2pc_startup")
    proxy = start_proxy(
        fx.tmp, cluster, name="startup_killed", env={"OROCHI_FAULT": "commit_prepared#1:kill"}
    )
    try:
        with pytest.raises(psycopg.OperationalError):
            _transaction(proxy, "autocommit", table, by_node)
        assert proxy.process.wait(WAIT) == -9
    finally:
        proxy.stop()
    left = [g for gids in fx.prepared().values() for g in gids]
    assert left, "COMMIT PREPARED of the first participant only: the others stay prepared"
    # Start-up recovery skips a coordinator whose lock is still held: wait until PostgreSQL has
    # ended the dead proxy's session (it holds the lock) so the one start-up run must do it all.
    keys = {parse_gid(g)[0] for g in left}  # type: ignore[index]
    with fx.node_conn(0) as c:
        deadline = time.monotonic() + WAIT
        while any(_lock_held(c, LOCK_SPACE | k) for k in keys):
            assert time.monotonic() < deadline, "the killed proxy's lock was never released"
            time.sleep(0.1)
    fresh = start_proxy(fx.tmp, cluster, name="startup_fresh", backend={"recovery_interval": 3600})
    try:
        fx.wait_settled(fresh)
    finally:
        fresh.stop()
    fx.assert_all_or_nothing(table, by_node, committed=True)


def _lock_held(conn: psycopg.Connection[Any], key: int) -> bool:
    row = conn.execute(
        "SELECT count(*) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
        "AND classid = %s::oid AND objid = %s::oid",
        (str(key >> 32), str(key & 0xFFFFFFFF)),
    ).fetchone()
    return bool(row and row[0])
