"""Distributed transactions through the proxy: BEGIN ... COMMIT across nodes, checked on the nodes.

Each test writes through the proxy inside a transaction block and then checks what PostgreSQL
holds on every node directly (shard tables, ``pg_prepared_xacts``): a proxy reading back its own
writes could not tell a half-committed transaction from a whole one.

Tables are named ``tx_*`` (unique to this module) and dropped at the end.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from clusterenv import ClusterEnv
from proxyproc import ProxyProcess

from orochi_proxy.localcluster import LocalCluster

SHARDS = 8
ROWS = 40  # ids 0..39 hit every shard, and so every node


class Env(ClusterEnv):
    def node_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of ``table``'s shards, read on the nodes directly (not through the proxy)."""
        shards = self.q(
            "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = %s", (f"public.{table}",)
        )
        ports = {n.port: c for n, c in zip(self.cluster.nodes, self.nodes, strict=True)}
        rows: list[tuple[Any, ...]] = []
        for shard, port in shards:
            rows += ports[int(port)].execute(f"SELECT * FROM {shard}").fetchall()
        return sorted(rows)

    def prepared(self) -> list[str]:
        out: list[str] = []
        for c in self.nodes:
            out += [r[0] for r in c.execute("SELECT gid FROM pg_prepared_xacts").fetchall()]
        return out

    def table(self, name: str, *, reference: bool = False) -> str:
        self.admin.execute(f"DROP TABLE IF EXISTS {name}")
        self.admin.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
        if reference:
            self.q(f"SELECT create_reference_table('{name}')")
        else:
            self.q(f"SELECT create_distributed_table('{name}', 'id', shard_count => {SHARDS})")
        return name


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, proxy: ProxyProcess) -> Iterator[Env]:
    e = Env(proxy, cluster)
    e.register_nodes()
    try:
        yield e
    finally:
        for (name,) in e.q("SELECT table_name FROM citus_tables WHERE table_name LIKE 'public.tx\\_%'"):
            e.admin.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
        e.admin.execute("DROP TABLE IF EXISTS tx_local, tx_pipe_local")
        e.close()


def sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


# ------------------------------------------------------------------------------ commit / rollback
def test_commit_makes_writes_on_every_node_visible_together(env: Env) -> None:
    t = env.table("tx_commit")
    with env.connect() as conn, env.connect(autocommit=True) as other:
        for i in range(ROWS):
            conn.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, i * 10))
        conn.execute(f"UPDATE {t} SET v = v + 1 WHERE id < 5")
        # The block sees its own writes on every node (multi-shard aggregate and router reads).
        assert conn.execute(f"SELECT count(*), sum(v) FROM {t}").fetchone() == (ROWS, sum(i * 10 for i in range(ROWS)) + 5)
        assert conn.execute(f"SELECT v FROM {t} WHERE id = 3").fetchone() == (31,)
        # Nobody else does, before COMMIT.
        assert other.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        assert env.node_rows(t) == []
        conn.commit()
        assert other.execute(f"SELECT count(*) FROM {t}").fetchone() == (ROWS,)
    assert env.node_rows(t) == sorted((i, i * 10 + (1 if i < 5 else 0)) for i in range(ROWS))
    assert env.prepared() == []


def test_rollback_undoes_writes_on_every_node(env: Env) -> None:
    t = env.table("tx_rollback")
    env.admin.execute(f"INSERT INTO {t} VALUES (1, 1), (2, 2)")
    with env.connect() as conn:
        conn.execute(f"INSERT INTO {t} SELECT g, g FROM generate_series(3, {ROWS}) g")
        conn.execute(f"DELETE FROM {t} WHERE id = 1")
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (ROWS - 1,)
        conn.rollback()
        assert conn.execute(f"SELECT id FROM {t} ORDER BY id").fetchall() == [(1,), (2,)]
    assert env.node_rows(t) == [(1, 1), (2, 2)]
    assert env.prepared() == []


def test_local_and_distributed_writes_commit_and_roll_back_together(env: Env) -> None:
    t = env.table("tx_mixed")
    env.admin.execute("DROP TABLE IF EXISTS tx_local")
    env.admin.execute(
        "CREATE TABLE tx_local (id int PRIMARY KEY, ref int, "
        "CONSTRAINT tx_local_ref_positive CHECK (ref > 0) NOT DEFERRABLE)"
    )
    with env.connect() as conn:
        conn.execute("INSERT INTO tx_local VALUES (1, 1)")
        conn.execute(f"INSERT INTO {t} SELECT g, g FROM generate_series(0, {ROWS - 1}) g")
        conn.commit()
    assert env.q("SELECT count(*) FROM tx_local") == [(1,)]
    assert len(env.node_rows(t)) == ROWS
    # A failure on the metadata node's side after the distributed writes undoes them too.
    with env.connect() as conn:
        conn.execute(f"DELETE FROM {t}")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO tx_local VALUES (2, -1)")
        conn.rollback()
    assert len(env.node_rows(t)) == ROWS
    assert env.prepared() == []


def test_deferred_failure_at_commit_rolls_back_the_nodes(env: Env) -> None:
    """COMMIT fails on the metadata node (a deferred constraint): no node keeps its writes."""
    t = env.table("tx_deferred")
    env.admin.execute("DROP TABLE IF EXISTS tx_parent, tx_child")
    env.admin.execute("CREATE TABLE tx_parent (id int PRIMARY KEY)")
    env.admin.execute(
        "CREATE TABLE tx_child (id int PRIMARY KEY, parent int REFERENCES tx_parent DEFERRABLE INITIALLY DEFERRED)"
    )
    try:
        with env.connect() as conn:
            conn.execute(f"INSERT INTO {t} SELECT g, g FROM generate_series(0, {ROWS - 1}) g")
            conn.execute("INSERT INTO tx_child VALUES (1, 42)")  # no parent 42: fails at COMMIT
            with pytest.raises(psycopg.errors.ForeignKeyViolation):
                conn.commit()
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        assert env.node_rows(t) == []
        assert env.prepared() == []
    finally:
        env.admin.execute("DROP TABLE IF EXISTS tx_parent, tx_child")


# ------------------------------------------------------------------------------ errors in a block
def test_error_in_block_fails_the_block_until_rollback(env: Env) -> None:
    t = env.table("tx_error")
    env.admin.execute(f"INSERT INTO {t} VALUES (1, 1)")
    with env.connect() as conn:
        conn.execute(f"INSERT INTO {t} VALUES (2, 2), (3, 3)")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {t} VALUES (1, 5)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        for sql in (f"SELECT count(*) FROM {t}", "SELECT 1", f"INSERT INTO {t} VALUES (9, 9)"):
            with pytest.raises(psycopg.errors.InFailedSqlTransaction):
                conn.execute(sql)
        conn.rollback()
        assert conn.execute(f"SELECT id FROM {t} ORDER BY id").fetchall() == [(1,)]
    assert env.node_rows(t) == [(1, 1)]


def test_commit_of_a_failed_block_rolls_back(env: Env) -> None:
    t = env.table("tx_failed_commit")
    with env.connect(autocommit=True) as conn:
        conn.execute("BEGIN")
        conn.execute(f"INSERT INTO {t} SELECT g, g FROM generate_series(0, {ROWS - 1}) g")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(f"SELECT 1 / (v - v) FROM {t} WHERE id = 3")
        cur = conn.execute("COMMIT")
        assert cur.statusmessage == "ROLLBACK"
    assert env.node_rows(t) == []
    assert env.prepared() == []


# ------------------------------------------------------------------------------ savepoints
def test_savepoints_roll_back_on_every_node(env: Env) -> None:
    t = env.table("tx_savepoint")
    with env.connect() as conn:
        conn.execute(f"INSERT INTO {t} SELECT g, 1 FROM generate_series(0, 9) g")
        conn.execute("SAVEPOINT a")
        conn.execute(f"INSERT INTO {t} SELECT g, 2 FROM generate_series(10, 19) g")
        conn.execute(f"UPDATE {t} SET v = 100 WHERE id < 10")
        conn.execute("SAVEPOINT b")
        conn.execute(f"DELETE FROM {t}")
        conn.execute("ROLLBACK TO SAVEPOINT b")
        assert conn.execute(f"SELECT count(*), sum(v) FROM {t}").fetchone() == (20, 1020)
        conn.execute("ROLLBACK TO a")
        assert conn.execute(f"SELECT count(*), sum(v) FROM {t}").fetchone() == (10, 10)
        conn.execute("RELEASE SAVEPOINT a")
        conn.execute(f"INSERT INTO {t} VALUES (30, 3)")
        conn.commit()
    assert env.node_rows(t) == sorted([(i, 1) for i in range(10)] + [(30, 3)])


def test_savepoint_before_the_first_distributed_statement(env: Env) -> None:
    """Nodes that join after a savepoint roll back entirely to it."""
    t = env.table("tx_early_savepoint")
    with env.connect() as conn:
        conn.execute("SAVEPOINT early")
        conn.execute(f"INSERT INTO {t} SELECT g, g FROM generate_series(0, {ROWS - 1}) g")
        conn.execute("ROLLBACK TO SAVEPOINT early")
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        conn.execute(f"INSERT INTO {t} VALUES (7, 7)")
        conn.commit()
    assert env.node_rows(t) == [(7, 7)]


def test_rollback_to_savepoint_recovers_from_an_error(env: Env) -> None:
    t = env.table("tx_sp_error")
    env.admin.execute(f"INSERT INTO {t} VALUES (1, 1)")
    with env.connect() as conn:
        conn.execute(f"INSERT INTO {t} VALUES (2, 2)")
        conn.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {t} VALUES (3, 3), (1, 1)")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute(f"SELECT * FROM {t}")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        conn.execute(f"INSERT INTO {t} VALUES (4, 4)")
        conn.commit()
    assert env.node_rows(t) == [(1, 1), (2, 2), (4, 4)]
    assert env.prepared() == []


def test_unknown_savepoint_is_reported_like_postgres(env: Env) -> None:
    t = env.table("tx_sp_unknown")
    with env.connect() as conn:
        conn.execute(f"INSERT INTO {t} VALUES (1, 1)")
        with pytest.raises(psycopg.errors.InvalidSavepointSpecification):
            conn.execute("ROLLBACK TO SAVEPOINT nope")
        conn.rollback()
    assert env.node_rows(t) == []


# ------------------------------------------------------------------------------ isolation, options
def test_read_only_block_refuses_writes(env: Env) -> None:
    t = env.table("tx_read_only")
    with env.connect(autocommit=True) as conn:
        conn.execute("BEGIN READ ONLY")
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute(f"INSERT INTO {t} VALUES (1, 1)")
        conn.execute("ROLLBACK")
    assert env.node_rows(t) == []


def test_repeatable_read_keeps_the_snapshot_of_each_node(env: Env) -> None:
    t = env.table("tx_rr")
    env.admin.execute(f"INSERT INTO {t} SELECT g, 1 FROM generate_series(0, {ROWS - 1}) g")
    with env.connect(autocommit=True) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        assert conn.execute(f"SELECT sum(v) FROM {t}").fetchone() == (ROWS,)
        env.admin.execute(f"UPDATE {t} SET v = 2")
        assert conn.execute(f"SELECT sum(v) FROM {t}").fetchone() == (ROWS,), "snapshot kept on every node"
        with pytest.raises(psycopg.errors.SerializationFailure):
            conn.execute(f"UPDATE {t} SET v = 3 WHERE id = 1")
        conn.execute("ROLLBACK")
    assert env.q(f"SELECT sum(v) FROM {t}") == [(2 * ROWS,)]


def test_distributed_deadlock_ends_by_lock_timeout(env: Env) -> None:
    """Two blocks lock rows on two nodes in opposite orders: no node sees a deadlock, the lock
    timeout ends the wait, and the other block commits."""
    t = env.table("tx_deadlock")
    # Two ids on different nodes.
    placement = {}
    for i in range(ROWS):
        shard = env.q(f"SELECT get_shard_id_for_distribution_column('{t}', {i})")[0][0]
        port = env.q("SELECT nodeport FROM citus_shards WHERE shardid = %s", (shard,))[0][0]
        placement.setdefault(port, i)
    a, b = list(placement.values())[:2]
    env.admin.execute(f"INSERT INTO {t} VALUES ({a}, 0), ({b}, 0)")
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def worker(first: int, second: int) -> None:
        try:
            with env.connect() as conn:
                conn.execute("SET lock_timeout = '1s'")
                conn.execute(f"UPDATE {t} SET v = v + 1 WHERE id = %s", (first,))
                barrier.wait()
                conn.execute(f"UPDATE {t} SET v = v + 1 WHERE id = %s", (second,))
                conn.commit()
        except psycopg.Error as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=worker, args=args) for args in ((a, b), (b, a))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not any(th.is_alive() for th in threads), "a distributed deadlock must not hang"
    assert time.monotonic() - started < 15
    assert errors and all(sqlstate(e) == "55P03" for e in errors), errors
    total = sum(v for _, v in env.node_rows(t))
    assert total == 2 * (2 - len(errors)), "the block that was not cancelled committed both updates"


# ------------------------------------------------------------------------------ implicit blocks
def test_multi_statement_query_is_one_transaction(env: Env) -> None:
    t = env.table("tx_multi")
    with env.connect(autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO {t} VALUES (1, 1); INSERT INTO {t} VALUES (2, 2), (3, 3); INSERT INTO {t} VALUES (1, 3)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conn.execute(f"INSERT INTO {t} VALUES (1, 1); UPDATE {t} SET v = 5 WHERE id = 1; INSERT INTO {t} VALUES (2, 2)")
    assert env.node_rows(t) == [(1, 5), (2, 2)]
    assert env.prepared() == []


def _pid_last_query(env: Env, pid: int) -> str:
    """The last statement the metadata node saw on the backend ``pid`` (pg_stat_activity)."""
    return env.nodes[0].execute("SELECT query FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]


def test_pipeline_is_one_transaction(env: Env) -> None:
    """Statements up to a Sync (a psycopg pipeline) are one implicit transaction, as in PostgreSQL.

    A failure undoes the batch's earlier distributed and local writes and skips its later
    statements; each Sync ends a transaction, so an earlier batch stays when a later one fails.
    """
    t = env.table("tx_pipe")
    local = "tx_pipe_local"
    env.admin.execute(f"DROP TABLE IF EXISTS {local}")
    env.admin.execute(f"CREATE TABLE {local} (id int)")
    ins = f"INSERT INTO {t} VALUES (%s, %s)"
    with env.connect(autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            conn.execute(f"INSERT INTO {local} VALUES (1)")
            conn.execute(ins, (1, 1))
            conn.execute(f"UPDATE {t} SET v = 2 WHERE id = %s", (1,))
            conn.execute(ins, (5, 5))
            conn.execute(ins, (1, 3))
            conn.execute(ins, (7, 7))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert env.node_rows(t) == []
        assert env.q(f"SELECT count(*) FROM {local}") == [(0,)]

        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline() as p:
            conn.execute(ins, (1, 1))
            conn.execute(ins, (2, 2))
            p.sync()
            conn.execute(ins, (3, 3))
            conn.execute(ins, (1, 9))
        assert env.node_rows(t) == [(1, 1), (2, 2)]

        with conn.pipeline():
            conn.execute(f"INSERT INTO {local} VALUES (2)")
            conn.execute(f"UPDATE {t} SET v = v + 10 WHERE id = ANY(%s)", ([1, 2],))
            conn.execute(ins, (3, 3))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (3,)
    assert env.node_rows(t) == [(1, 11), (2, 12), (3, 3)]
    assert env.q(f"SELECT id FROM {local}") == [(2,)]
    assert env.prepared() == []


def test_executemany_is_one_transaction_with_asyncpg(env: Env) -> None:
    """asyncpg's executemany (Bind/Execute per row, one Sync) commits all rows or none."""
    t = env.table("tx_pipe_asyncpg")
    p = env.proxy

    async def run() -> None:
        conn = await asyncpg.connect(host=p.host, port=p.port, user=p.user, password=p.password, database=p.dbname)
        try:
            ins = f"INSERT INTO {t} VALUES ($1, $2)"
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.executemany(ins, [(i, i) for i in range(20)] + [(3, 0)])
            assert await conn.fetchval(f"SELECT count(*) FROM {t}") == 0
            await conn.executemany(ins, [(i, i) for i in range(20)])
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(run(), 30))
    assert env.node_rows(t) == [(i, i) for i in range(20)]
    assert env.prepared() == []


def test_pipeline_after_the_clients_begin_stays_the_clients_block(env: Env) -> None:
    """A batch that holds the client's own BEGIN is the client's block: still open after Sync."""
    t = env.table("tx_pipe_begin")
    ins = f"INSERT INTO {t} VALUES (%s, %s)"
    with env.connect(autocommit=True) as conn:
        with conn.pipeline():
            conn.execute("BEGIN")
            conn.execute(ins, (1, 1))
            conn.execute(ins, (2, 2))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert env.node_rows(t) == []
        conn.execute("ROLLBACK")
        assert conn.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        with conn.pipeline():
            conn.execute("BEGIN")
            conn.execute(ins, (3, 3))
            conn.execute(ins, (4, 4))
            conn.execute("COMMIT")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert env.node_rows(t) == [(3, 3), (4, 4)]
    assert env.prepared() == []


def test_begin_in_the_middle_of_a_pipeline_makes_it_the_clients_block(env: Env) -> None:
    """A BEGIN after a batch's first statements turns the batch's implicit transaction into the
    client's block in PostgreSQL (the earlier statements join it, the block outlives the Sync,
    and no 'already a transaction in progress' warning). Checked against a plain node."""
    t = env.table("tx_pipe_midbegin")
    plain = env.nodes[1]
    plain.execute("DROP TABLE IF EXISTS tx_pipe_midbegin_plain")
    plain.execute("CREATE TABLE tx_pipe_midbegin_plain (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    seen: dict[str, list[Any]] = {}
    try:
        for side, dsn, table in (("plain", env.cluster.nodes[1].dsn(), "tx_pipe_midbegin_plain"), ("proxy", env.proxy.dsn(), t)):
            notices: list[str] = []
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.add_notice_handler(lambda d, notices=notices: notices.append(d.sqlstate or ""))
                ins = f"INSERT INTO {table} VALUES (%s, %s)"
                with conn.pipeline():
                    conn.execute(ins, (1, 1))
                    conn.execute(ins, (2, 2))
                    conn.execute("BEGIN")
                    conn.execute(ins, (3, 3))
                status = conn.info.transaction_status
                conn.execute("ROLLBACK")
                after_rollback = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                with conn.pipeline():
                    conn.execute(ins, (4, 4))
                    conn.execute(ins, (5, 5))
                    conn.execute("BEGIN")
                    conn.execute(ins, (6, 6))
                conn.execute("COMMIT")
                # The same in one multi-statement simple Query.
                psycopg.ClientCursor(conn).execute(
                    f"INSERT INTO {table} VALUES (7, 7); INSERT INTO {table} VALUES (8, 8); BEGIN; "
                    f"INSERT INTO {table} VALUES (9, 9)"
                )
                status_simple = conn.info.transaction_status
                conn.execute("ROLLBACK")
                rows = conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
            seen[side] = [status, after_rollback, status_simple, rows, notices]
    finally:
        plain.execute("DROP TABLE IF EXISTS tx_pipe_midbegin_plain")
    assert seen["proxy"] == seen["plain"]
    assert seen["plain"][0] == seen["plain"][2] == psycopg.pq.TransactionStatus.INTRANS
    assert env.node_rows(t) == [(4, 4), (5, 5), (6, 6)]
    assert env.prepared() == []


TX_IN_BATCH = {
    "commit-mid": ["INSERT 1", "INSERT 2", "COMMIT", "INSERT 3", "INSERT 1"],
    "rollback-mid": ["INSERT 1", "INSERT 2", "ROLLBACK", "INSERT 3"],
    "end-then-fail": ["INSERT 1", "END", "INSERT 2", "SELECT 1/0"],
    "savepoint": ["INSERT 1", "SAVEPOINT s", "INSERT 2"],
    "chain": ["INSERT 1", "COMMIT AND CHAIN", "INSERT 2"],
    "set-local": ["INSERT 1", "SET LOCAL lock_timeout = '3s'", "INSERT 2"],
    "begin-first": ["BEGIN", "INSERT 1", "INSERT 2", "COMMIT", "INSERT 3"],
    "begin-last": ["INSERT 1", "INSERT 2", "BEGIN"],
}


def _run_batch(conn: psycopg.Connection[Any], table: str, steps: list[str], protocol: str) -> list[Any]:
    """Run ``steps`` as one pipeline (one Sync) or one multi-statement Query; what the client saw."""
    sqls = [f"INSERT INTO {table} VALUES ({s.split()[1]}, 0)" if s.startswith("INSERT") else s for s in steps]
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.sqlstate or ""))
    error = None
    try:
        if protocol == "pipeline":
            with conn.pipeline():
                for sql in sqls:
                    conn.execute(sql)
        else:
            psycopg.ClientCursor(conn).execute("; ".join(sqls))
    except psycopg.Error as exc:
        error = exc.sqlstate
    status = conn.info.transaction_status
    if status != psycopg.pq.TransactionStatus.IDLE:
        conn.execute("ROLLBACK")
    rows = conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()
    return [error, status, notices, rows]


@pytest.mark.parametrize("protocol", ["pipeline", "query"])
@pytest.mark.parametrize("case", list(TX_IN_BATCH))
def test_transaction_control_inside_a_batch_is_answered_as_postgres_does(env: Env, case: str, protocol: str) -> None:
    """COMMIT, ROLLBACK, END, SAVEPOINT, AND CHAIN, SET LOCAL, BEGIN among a batch's distributed
    writes (a pipeline up to one Sync, or one multi-statement Query): the error, transaction
    status, warnings and the rows left are those of a plain PostgreSQL given the same batch."""
    t = env.table(f"tx_batch_{case.replace('-', '_')}_{protocol}")
    plain_table = f"tx_batch_plain_{case.replace('-', '_')}_{protocol}"
    direct = env.nodes[1]
    direct.execute(f"DROP TABLE IF EXISTS {plain_table}")
    direct.execute(f"CREATE TABLE {plain_table} (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
    try:
        with psycopg.connect(env.cluster.nodes[1].dsn(), autocommit=True) as c:
            want = _run_batch(c, plain_table, TX_IN_BATCH[case], protocol)
        with env.connect(autocommit=True) as c:
            got = _run_batch(c, t, TX_IN_BATCH[case], protocol)
    finally:
        direct.execute(f"DROP TABLE IF EXISTS {plain_table}")
    assert got == want
    assert env.prepared() == []


def test_lone_statement_batches_keep_the_direct_path(env: Env) -> None:
    """Parse/Bind/Execute/Sync of one distributed write opens no block (no metadata-node round
    trip: that connection's last statement stays the same); a batch of several does."""
    t = env.table("tx_pipe_fast")
    ins = f"INSERT INTO {t} VALUES (%s, %s)"
    with env.connect(autocommit=True) as conn:
        conn.execute(ins, (1, 1))  # the first Parse is described on the metadata node
        (pid,) = conn.execute("SELECT pg_backend_pid()").fetchone()
        for i in range(2, 6):
            conn.execute(ins, (i, i))
            conn.execute(ins, (i + 10, i), prepare=True)
        assert _pid_last_query(env, pid) == "SELECT pg_backend_pid()"
        with conn.pipeline():
            conn.execute(ins, (20, 20))
            conn.execute(ins, (21, 21))
        assert _pid_last_query(env, pid) == "COMMIT"
    assert len(env.node_rows(t)) == 11
    assert env.prepared() == []


def test_reference_write_waits_on_the_first_copy_only(env: Env) -> None:
    """A writer of a locked reference row waits on its first copy (the metadata node's) and has
    not locked any other: writers of one row queue there, in one order, instead of each holding
    some copies and waiting for the others (a deadlock across nodes)."""
    t = env.table("tx_ref_order", reference=True)
    env.admin.execute(f"INSERT INTO {t} VALUES (1, 0)")
    errors: list[BaseException] = []

    def lock_waiters(node: psycopg.Connection[Any]) -> int:
        return node.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            (f"%{t}%",),
        ).fetchone()[0]

    def write() -> None:
        try:
            with env.connect(autocommit=True) as waiter:
                waiter.execute(f"UPDATE {t} SET v = v + 10 WHERE id = 1")
        except psycopg.Error as exc:
            errors.append(exc)

    with env.connect() as holder:
        holder.execute(f"UPDATE {t} SET v = v + 1 WHERE id = 1")
        th = threading.Thread(target=write)
        th.start()
        deadline = time.monotonic() + 10
        while lock_waiters(env.nodes[0]) == 0:
            assert time.monotonic() < deadline, "the second writer never waited on the first copy"
            time.sleep(0.05)
        assert [lock_waiters(c) for c in env.nodes[1:]] == [0] * (len(env.nodes) - 1)
        holder.commit()
    th.join(10)
    assert not th.is_alive() and not errors, errors
    assert env.node_rows(t) == [(1, 11)] * len(env.nodes)
    assert env.prepared() == []


def test_reference_table_writes_in_a_block(env: Env) -> None:
    t = env.table("tx_ref", reference=True)
    d = env.table("tx_ref_dist")
    with env.connect() as conn:
        conn.execute(f"INSERT INTO {t} VALUES (1, 10), (2, 20)")
        conn.execute(f"INSERT INTO {d} SELECT g, g FROM generate_series(0, 9) g")
        assert conn.execute(f"SELECT sum(r.v) FROM {d} d JOIN {t} r ON r.id = d.v").fetchone() == (30,)
        conn.commit()
    for c in env.nodes:
        assert c.execute(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'tx\\_ref\\_%' AND relname NOT LIKE 'tx\\_ref\\_dist%'"
        ).fetchone()[0] >= 1
    assert env.q(f"SELECT id, v FROM {t} ORDER BY id") == [(1, 10), (2, 20)]
    assert env.prepared() == []


# ------------------------------------------------------------------------------ COPY FROM in a block
def _copy_rows(conn: psycopg.Connection[Any], table: str, rows: list[tuple[int, int]]) -> None:
    with conn.cursor().copy(f"COPY {table} (id, v) FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK"])
def test_copy_in_a_block_commits_and_rolls_back_with_it(env: Env, end: str) -> None:
    """COPY FROM inside BEGIN ... COMMIT loads into the block's node transactions: the block
    reads the rows, nobody else does before COMMIT, and ROLLBACK leaves nothing on any node."""
    t = env.table(f"tx_copy_{end.lower()}")
    ref = env.table(f"tx_copy_ref_{end.lower()}", reference=True)
    rows = [(i, i * 3) for i in range(ROWS)]
    with env.connect() as conn, env.connect(autocommit=True) as other:
        conn.execute(f"INSERT INTO {t} VALUES (1000, 0)")
        _copy_rows(conn, t, rows)
        _copy_rows(conn, ref, rows[:5])
        conn.execute(f"UPDATE {t} SET v = v + 1 WHERE id < 3")  # the block's own COPY rows
        assert conn.execute(f"SELECT count(*), sum(v) FROM {t}").fetchone() == (ROWS + 1, sum(v for _, v in rows) + 3)
        assert conn.execute(f"SELECT count(*) FROM {t} d JOIN {ref} r USING (id)").fetchone() == (5,)
        assert other.execute(f"SELECT count(*) FROM {t}").fetchone() == (0,)
        assert env.node_rows(t) == []
        conn.execute(end)
    if end == "COMMIT":
        expected = sorted([(1000, 0), *((i, v + (1 if i < 3 else 0)) for i, v in rows)])
        assert env.node_rows(t) == expected
        for c in env.nodes:  # every copy of the reference table has the rows
            shard = env.q(f"SELECT shard_name FROM citus_shards WHERE table_name = 'public.{ref}'")[0][0]
            assert sorted(c.execute(f"SELECT * FROM {shard}").fetchall()) == rows[:5]
    else:
        assert env.node_rows(t) == []
        assert env.q(f"SELECT count(*) FROM {ref}") == [(0,)]
    assert env.prepared() == []


def test_failed_copy_fails_the_block(env: Env) -> None:
    """A COPY that fails inside a block (a duplicate key on one node) fails the block as in
    PostgreSQL: 25P02 until ROLLBACK (TO SAVEPOINT), and none of its rows survive."""
    t = env.table("tx_copy_fail")
    env.admin.execute(f"INSERT INTO {t} VALUES (7, 7)")
    with env.connect() as conn:
        conn.execute(f"INSERT INTO {t} VALUES (100, 100)")
        conn.execute("SAVEPOINT s")
        with pytest.raises(psycopg.errors.UniqueViolation):
            _copy_rows(conn, t, [(i, i) for i in range(ROWS)])
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute(f"SELECT count(*) FROM {t}")
        conn.execute("ROLLBACK TO SAVEPOINT s")
        _copy_rows(conn, t, [(200, 1), (201, 2)])
        conn.commit()
    assert env.node_rows(t) == [(7, 7), (100, 100), (200, 1), (201, 2)]
    assert env.prepared() == []


# ------------------------------------------------------------------------------ spellings of the end
END_FORMS = [
    ("END", True, "I"),
    ("ABORT", False, "I"),
    ("commit /* lower case, comment */", True, "I"),
    ("COMMIT AND CHAIN", True, "T"),
    ("ROLLBACK AND CHAIN", False, "T"),
    ("COMMIT TRANSACTION", True, "I"),
    ("ROLLBACK WORK", False, "I"),
]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize(("sql", "commits", "status_after"), END_FORMS, ids=[f[0].split(" /*")[0] for f in END_FORMS])
def test_every_spelling_of_the_end_reaches_every_node(
    env: Env, sql: str, commits: bool, status_after: str, protocol: str
) -> None:
    """END, ABORT, AND CHAIN ...: the nodes' part of the block ends the way the metadata node's
    does (the rows written on every node are there or not), and a chained block is a new
    distributed block that works like the first."""
    t = env.table(f"tx_end_{abs(hash((sql, protocol))) % 10**6}")
    with env.connect(autocommit=True) as conn:
        if protocol == "simple":
            cur = psycopg.ClientCursor(conn)
        else:
            cur = conn.cursor()
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        for i in range(ROWS // 2):
            cur.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, 1))
        cur.execute(sql)
        status = {psycopg.pq.TransactionStatus.IDLE: "I", psycopg.pq.TransactionStatus.INTRANS: "T"}.get(
            conn.info.transaction_status, "?"
        )
        assert status == status_after
        expected = sorted((i, 1) for i in range(ROWS // 2)) if commits else []
        assert env.node_rows(t) == expected
        if status_after == "T":
            # The chained block: same isolation, distributed writes and reads, a plain COMMIT.
            cur.execute("SHOW transaction_isolation")
            assert cur.fetchone() == ("repeatable read",)
            for i in range(ROWS // 2, ROWS):
                cur.execute(f"INSERT INTO {t} VALUES (%s, %s)", (i, 2))
            cur.execute(f"SELECT count(*) FROM {t}")
            assert cur.fetchone() == (len(expected) + ROWS // 2,)
            cur.execute("COMMIT")
            assert env.node_rows(t) == sorted([*expected, *((i, 2) for i in range(ROWS // 2, ROWS))])
    assert env.prepared() == []
