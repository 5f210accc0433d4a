"""Transaction pooling (``[server] pool_mode = "transaction"``): many clients, few node connections.

A dedicated proxy in transaction mode with a small pool serves these tests. What each client set
up (settings, prepared statements) must follow it to whichever connection serves it next, and
must never leak into another client; the number of node connections must stay within the pool.
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
from proxyproc import ProxyProcess, start_proxy

from orochi_proxy.localcluster import LocalCluster

POOL = 20


@pytest.fixture(scope="module")
def pooled(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = start_proxy(
        tmp_path_factory.mktemp("txpool"), cluster, name="txpool",
        server={"pool_mode": "transaction"}, backend={"pool_size": POOL},
    )
    try:
        with psycopg.connect(proc.dsn(), autocommit=True) as conn:
            for n in cluster.nodes:
                conn.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
            conn.execute("DROP TABLE IF EXISTS txp_items")
            conn.execute("CREATE TABLE txp_items (id int PRIMARY KEY, n int NOT NULL)")
            conn.execute("SELECT create_distributed_table('txp_items', 'id', shard_count => 6)")
        yield proc
    finally:
        try:
            with psycopg.connect(proc.dsn(), autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS txp_items")
        finally:
            proc.stop()


def _client_backends(cluster: LocalCluster) -> int:
    """Client connections open on the node serving as metadata node (the proxy's pool among them)."""
    with psycopg.connect(cluster.nodes[0].dsn(), autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        ).fetchone()[0]


def test_settings_follow_each_client_and_never_leak(pooled: ProxyProcess) -> None:
    with psycopg.connect(pooled.dsn(), autocommit=True) as a, psycopg.connect(pooled.dsn(), autocommit=True) as b:
        default_tz = b.execute("SHOW TimeZone").fetchone()
        assert default_tz != ("Asia/Tokyo",)
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        a.execute("SET search_path TO pg_catalog, public")
        a.execute("SET application_name = 'client-a'")
        for _ in range(5):  # the two sessions take turns on the pool's connections
            assert a.execute("SHOW TimeZone").fetchone() == ("Asia/Tokyo",)
            assert b.execute("SHOW TimeZone").fetchone() == default_tz
            assert a.execute("SHOW search_path").fetchone() == ("pg_catalog, public",)
            assert b.execute("SHOW search_path").fetchone() == ('"$user", public',)
            assert a.execute("SHOW application_name").fetchone() == ("client-a",)
            assert b.execute("SHOW application_name").fetchone() != ("client-a",)
        a.execute("RESET TimeZone")
        assert a.execute("SHOW TimeZone").fetchone() == default_tz


def test_prepared_statements_follow_the_client(pooled: ProxyProcess) -> None:
    async def run() -> None:
        conns = [await _aconnect(pooled) for _ in range(4)]
        try:
            # The same statement name (asyncpg's __asyncpg_stmt_N__) with different texts per client.
            stmts = [await c.prepare(f"SELECT {i * 100}::int + $1::int") for i, c in enumerate(conns)]
            for _ in range(10):
                for i, st in enumerate(stmts):
                    assert await st.fetchval(7) == i * 100 + 7
            # And over a distributed table, inside transactions.
            for i, c in enumerate(conns):
                async with c.transaction():
                    await c.execute("INSERT INTO txp_items VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n", i, i)
                    assert await c.fetchval("SELECT n FROM txp_items WHERE id = $1", i) == i
        finally:
            for c in conns:
                await c.close()

    asyncio.run(run())


def test_deallocate_and_close_are_per_client(pooled: ProxyProcess) -> None:
    with psycopg.connect(pooled.dsn(), autocommit=True) as a, psycopg.connect(pooled.dsn(), autocommit=True) as b:
        for conn in (a, b):
            conn.execute("SELECT %s::int + 1", (1,), prepare=True)
        a.execute("DEALLOCATE ALL")
        assert b.execute("SELECT %s::int + 1", (2,), prepare=True).fetchone() == (3,)
        assert a.execute("SELECT %s::int + 1", (3,), prepare=True).fetchone() == (4,)


def test_session_state_the_proxy_cannot_move_pins_the_session(pooled: ProxyProcess) -> None:
    with psycopg.connect(pooled.dsn(), autocommit=True) as a, psycopg.connect(pooled.dsn(), autocommit=True) as b:
        a.execute("CREATE TEMP TABLE txp_scratch (x int)")
        a.execute("INSERT INTO txp_scratch VALUES (1)")
        for _ in range(5):
            b.execute("SELECT 1")
            assert a.execute("SELECT count(*) FROM txp_scratch").fetchone() == (1,)


def test_failed_transaction_does_not_poison_the_next_client(pooled: ProxyProcess) -> None:
    with psycopg.connect(pooled.dsn()) as a:
        with pytest.raises(psycopg.errors.DivisionByZero):
            a.execute("SELECT 1 / 0")
        a.rollback()
    with psycopg.connect(pooled.dsn(), autocommit=True) as b:
        for _ in range(POOL + 2):
            assert b.execute("SELECT 42").fetchone() == (42,)


def _node_ids(cluster: LocalCluster, proxy: ProxyProcess, lo: int, hi: int) -> list[int]:
    """Ids in [lo, hi) of ``txp_items``, read from its shards on the nodes directly."""
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        shards = conn.execute(
            "SELECT shard_name, nodeport FROM citus_shards WHERE table_name = 'public.txp_items'"
        ).fetchall()
    ports = {n.port: n for n in cluster.nodes}
    ids: list[int] = []
    for shard, port in shards:
        with psycopg.connect(ports[int(port)].dsn(), autocommit=True) as c:
            ids += [r[0] for r in c.execute(f"SELECT id FROM {shard} WHERE id >= %s AND id < %s", (lo, hi))]
    return sorted(ids)


def test_prepared_commit_and_rollback_end_distributed_blocks(pooled: ProxyProcess, cluster: LocalCluster) -> None:
    """BEGIN/COMMIT/ROLLBACK as prepared statements (psycopg prepares every statement it runs
    often; here all of them): the proxy must see them as transaction control under the client's
    statement names, not the node-side ones; a COMMIT that went to the metadata node alone
    answered COMMIT while the nodes' part of the block was rolled back."""
    ins = "INSERT INTO txp_items VALUES (%s, 0)"
    with psycopg.connect(pooled.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for round_ in range(3):
            base = 5000 + 100 * round_
            conn.execute("BEGIN")
            for i in range(base, base + 6):
                conn.execute(ins, (i,))
            assert conn.execute("COMMIT").statusmessage == "COMMIT"
            conn.execute("BEGIN")
            conn.execute(ins, (base + 50,))
            conn.execute("ROLLBACK")
            assert _node_ids(cluster, pooled, base, base + 100) == list(range(base, base + 6))
        conn.execute("DELETE FROM txp_items WHERE id >= 5000 AND id < 6000")


def test_pipeline_is_one_transaction_in_transaction_mode(pooled: ProxyProcess, cluster: LocalCluster) -> None:
    """A pipeline with distributed writes commits or rolls back whole, as in session mode."""
    ins = "INSERT INTO txp_items VALUES (%s, 0)"
    with psycopg.connect(pooled.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation), conn.pipeline():
            for i in (6000, 6001, 6002, 6000):
                conn.execute(ins, (i,))
        assert _node_ids(cluster, pooled, 6000, 6100) == []
        with conn.pipeline():
            for i in (6000, 6001, 6002):
                conn.execute(ins, (i,))
        assert _node_ids(cluster, pooled, 6000, 6100) == [6000, 6001, 6002]
        conn.execute("DELETE FROM txp_items WHERE id >= 6000 AND id < 6100")


def test_a_thousand_clients_share_the_bounded_pool(pooled: ProxyProcess, cluster: LocalCluster) -> None:
    """1000 concurrent asyncpg connections doing short transactions, some of them distributed writes."""
    baseline = _client_backends(cluster)
    peak = [baseline]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _client_backends(cluster))
            time.sleep(0.05)

    async def client(i: int) -> int:
        conn = await _aconnect(pooled)
        try:
            for _ in range(2):
                async with conn.transaction():
                    assert await conn.fetchval("SELECT $1::int * 2", i) == 2 * i
            if i % 10 == 0:
                async with conn.transaction():
                    await conn.execute("UPDATE txp_items SET n = n + 1 WHERE id = $1", i % 4)
            return 1
        finally:
            await conn.close()

    async def run() -> int:
        sem = asyncio.Semaphore(1000)

        async def gated(i: int) -> int:
            async with sem:
                return await client(i)

        return sum(await asyncio.gather(*(gated(i) for i in range(1000))))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with psycopg.connect(pooled.dsn(), autocommit=True) as conn:
            conn.execute("INSERT INTO txp_items VALUES (0, 0), (1, 0), (2, 0), (3, 0) ON CONFLICT (id) DO UPDATE SET n = 0")
        assert asyncio.run(run()) == 1000
    finally:
        stop.set()
        sampler.join()
    with psycopg.connect(pooled.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT sum(n) FROM txp_items WHERE id < 4").fetchone() == (100,)
    # The node sees at most the session pool plus the pool for shard statements on it.
    assert peak[0] - baseline <= 2 * POOL, (baseline, peak[0])


async def _aconnect(proxy: ProxyProcess) -> Any:
    return await asyncpg.connect(
        host=proxy.host, port=proxy.port, user=proxy.user, password=proxy.password,
        database=proxy.dbname, timeout=120,
    )


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_statement_after_losing_the_metadata_connection_is_answered(
    request: pytest.FixtureRequest, cluster: LocalCluster, mode: str
) -> None:
    """The client's node connection dies while the proxy runs its COMMIT (a distributed block's
    COMMIT goes to the metadata node through the proxy, not relayed): the client gets an error,
    and whatever it sends next gets an answer (a FATAL 08006: its transaction died), never silence.

    The COMMIT is held up by a deferred constraint trigger that sleeps, and its backend is
    terminated meanwhile. Both pool modes: the session mode's proxy is the shared ``proxy``.
    The next statement is a prepared one (Bind/Execute/Sync only): before the fix, those were
    put in a batch for the dead connection and dropped, and the client waited forever — the
    hang of the bank test in transaction mode after a metadata-node crash.
    """
    proxy: ProxyProcess = request.getfixturevalue("proxy" if mode == "session" else "pooled")
    table = f"txp_slow_commit_{mode}"
    with psycopg.connect(proxy.dsn(), autocommit=True) as admin:
        for n in cluster.nodes:
            admin.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
        admin.execute(f"DROP TABLE IF EXISTS {table}")
        admin.execute(f"CREATE TABLE {table} (id int)")
        admin.execute(
            "CREATE OR REPLACE FUNCTION txp_sleep_at_commit() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$"
        )
        admin.execute(
            f"CREATE CONSTRAINT TRIGGER slow AFTER INSERT ON {table} DEFERRABLE INITIALLY DEFERRED "
            "FOR EACH ROW EXECUTE FUNCTION txp_sleep_at_commit()"
        )
        admin.execute(f"DROP TABLE IF EXISTS {table}_dist")
        admin.execute(f"CREATE TABLE {table}_dist (id int PRIMARY KEY)")
        admin.execute(f"SELECT create_distributed_table('{table}_dist', 'id', shard_count => 3)")
    outcome: dict[str, Any] = {}

    def client() -> None:
        with psycopg.connect(proxy.dsn(), autocommit=True) as c:
            c.execute("SELECT 1", prepare=True)  # later only Bind/Execute/Sync, forwarded as is
            c.execute("BEGIN")
            c.execute(f"INSERT INTO {table} VALUES (1)")
            c.execute(f"SELECT count(*) FROM {table}_dist")  # a distributed read: the proxy runs COMMIT
            try:
                c.execute("COMMIT")
            except psycopg.Error as exc:
                outcome["commit"] = exc
            try:
                c.execute("SELECT 1", prepare=True)
                outcome["next"] = "answered"
            except psycopg.Error as exc:
                outcome["next"] = exc

    th = threading.Thread(target=client, daemon=True)
    th.start()
    try:
        with psycopg.connect(cluster.nodes[0].dsn(), autocommit=True) as direct:
            deadline = time.monotonic() + 10
            while True:
                row = direct.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query = 'COMMIT'"
                ).fetchone()
                if row:
                    break
                assert time.monotonic() < deadline and th.is_alive(), (outcome, proxy.log_tail())
                time.sleep(0.02)
            direct.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        th.join(15)
        assert not th.is_alive(), f"the client waits forever after its connection died: {outcome}"
        assert isinstance(outcome.get("commit"), psycopg.OperationalError), outcome
        nxt = outcome["next"]
        assert isinstance(nxt, psycopg.OperationalError) and nxt.sqlstate in (None, "08006"), outcome
    finally:
        with psycopg.connect(proxy.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP TABLE IF EXISTS {table}, {table}_dist")
            admin.execute("DROP FUNCTION IF EXISTS txp_sleep_at_commit() CASCADE")
