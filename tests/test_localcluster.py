"""The local PostgreSQL cluster the rest of the suite stands on: if these fail, nothing else can
be trusted. Each test checks something the proxy depends on (SCRAM over TCP, 2PC settings,
logical WAL, postgres_fdw, crash/restart of one node)."""

from __future__ import annotations

import asyncio
import socket

import asyncpg
import psycopg
import pytest
from conftest import pg_base_dir

from orochi_proxy import localcluster
from orochi_proxy.localcluster import LocalCluster, PostgresNotFoundError, find_pg_bindir


def _scalar(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn, connect_timeout=10) as conn:
        row = conn.execute(sql).fetchone()
        assert row is not None
        return row[0]


def test_three_nodes_on_distinct_free_ports(cluster: LocalCluster) -> None:
    assert [n.name for n in cluster.nodes] == ["node0", "node1", "node2"]
    ports = [n.port for n in cluster.nodes]
    assert len(set(ports)) == 3
    assert 5432 not in ports
    for i, node in enumerate(cluster.nodes):
        assert node.host == "127.0.0.1"
        assert cluster.is_running(i)
        assert (node.data_dir / "PG_VERSION").is_file()
        # Unix socket paths are limited to 107 bytes.
        assert len(str(node.socket_dir / f".s.PGSQL.{node.port}")) < 107
        assert (node.socket_dir / f".s.PGSQL.{node.port}").exists()


def test_tcp_login_needs_the_scram_password(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        assert _scalar(node.dsn(), "SELECT 1") == 1
        # The server really stores a SCRAM verifier, so the proxy's SCRAM client is exercised.
        verifier = _scalar(
            node.dsn(), "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'"
        )
        assert str(verifier).startswith("SCRAM-SHA-256$")
        bad = f"host={node.host} port={node.port} dbname=postgres user=postgres password=wrong"
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(bad, connect_timeout=10)
        nopw = f"host={node.host} port={node.port} dbname=postgres user=postgres"
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(nopw, connect_timeout=10, passfile="/dev/null")


def test_connect_kwargs_work_with_asyncpg(cluster: LocalCluster) -> None:
    async def query(kw: dict[str, object]) -> int:
        conn = await asyncpg.connect(**kw, timeout=10)
        try:
            return int(await conn.fetchval("SELECT 41 + 1"))
        finally:
            await conn.close()

    for node in cluster.nodes:
        assert asyncio.run(query(node.connect_kwargs())) == 42


def test_settings_for_2pc_and_shard_moves(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        assert int(str(_scalar(node.dsn(), "SHOW max_prepared_transactions"))) >= 64
        assert _scalar(node.dsn(), "SHOW wal_level") == "logical"
        assert int(str(_scalar(node.dsn(), "SHOW max_connections"))) >= 300
        assert _scalar(node.dsn(), "SHOW server_encoding") == "UTF8"
        assert _scalar(node.dsn(), "SHOW lc_collate") == "C"
        assert int(str(_scalar(node.dsn(), "SHOW server_version_num"))) >= 150000


def test_prepared_transaction_round_trip(cluster: LocalCluster) -> None:
    dsn = cluster.nodes[1].dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS lc_twophase (v int)")
        conn.execute("BEGIN")
        conn.execute("INSERT INTO lc_twophase VALUES (7)")
        conn.execute("PREPARE TRANSACTION 'lc_test_gid'")
        conn.execute("COMMIT PREPARED 'lc_test_gid'")
        row = conn.execute("SELECT count(*) FROM lc_twophase WHERE v = 7").fetchone()
        assert row is not None and row[0] >= 1
        conn.execute("DROP TABLE lc_twophase")


def test_stop_node_and_start_node(cluster: LocalCluster) -> None:
    i = 2
    node = cluster.nodes[i]
    try:
        cluster.stop_node(i)
        assert not cluster.is_running(i)
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(node.dsn(), connect_timeout=3)
        cluster.stop_node(i)  # stopping a stopped node is harmless
    finally:
        cluster.start_node(i)
    assert cluster.is_running(i)
    assert _scalar(cluster.nodes[i].dsn(), "SELECT 1") == 1
    # The other nodes were untouched.
    for other in (0, 1):
        assert _scalar(cluster.nodes[other].dsn(), "SELECT 1") == 1


def test_postgres_fdw_is_available(cluster: LocalCluster) -> None:
    node = cluster.nodes[0]
    with psycopg.connect(node.dsn(), autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS lc_fdw_scratch")
        admin.execute("CREATE DATABASE lc_fdw_scratch")
    try:
        with psycopg.connect(node.dsn("lc_fdw_scratch"), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION postgres_fdw")
            row = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'postgres_fdw'"
            ).fetchone()
            assert row is not None
            # A foreign server pointing at another node, through SCRAM: what the general-SQL
            # fallback builds.
            other = cluster.nodes[1]
            conn.execute(
                f"CREATE SERVER lc_other FOREIGN DATA WRAPPER postgres_fdw "
                f"OPTIONS (host '{other.host}', port '{other.port}', dbname 'postgres')"
            )
            conn.execute(
                "CREATE USER MAPPING FOR CURRENT_USER SERVER lc_other "
                f"OPTIONS (user '{other.user}', password '{other.password}')"
            )
            conn.execute(
                "CREATE FOREIGN TABLE lc_remote_settings (name text, setting text) "
                "SERVER lc_other OPTIONS (schema_name 'pg_catalog', table_name 'pg_settings')"
            )
            got = conn.execute(
                "SELECT setting FROM lc_remote_settings WHERE name = 'port'"
            ).fetchone()
            assert got is not None and int(got[0]) == other.port
    finally:
        with psycopg.connect(node.dsn(), autocommit=True) as admin:
            admin.execute("DROP DATABASE IF EXISTS lc_fdw_scratch WITH (FORCE)")


def test_find_pg_bindir() -> None:
    bindir = find_pg_bindir()
    for prog in ("initdb", "pg_ctl", "postgres"):
        assert (bindir / prog).is_file()


def test_missing_postgres_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OROCHI_PG_BINDIR", raising=False)
    monkeypatch.setattr(localcluster, "_bindir_has_server", lambda _path: False)
    with pytest.raises(
        PostgresNotFoundError, match="apt-get install -y postgresql-15 postgresql-contrib"
    ):
        find_pg_bindir()


def test_restart_reuses_data_and_retries_a_taken_port(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-node cluster: settings overrides apply, data survives stop/start, and a start whose
    port was taken in the meantime ("Address already in use") moves to another port."""
    base = pg_base_dir("lc-test")
    with LocalCluster(base, 1, settings={"max_connections": "40"}) as c:
        node = c.nodes[0]
        assert _scalar(node.dsn(), "SHOW max_connections") == "40"
        with psycopg.connect(node.dsn(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (1)")
    assert not c.is_running(0)
    try:
        # Occupy the old port and make the pre-check believe it is free, so the server itself
        # hits "Address already in use" and the retry path runs.
        old_port = node.port
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", old_port))
        blocker.listen(1)
        monkeypatch.setattr(LocalCluster, "_port_free", staticmethod(lambda *_a, **_k: True))
        try:
            c.start()
        finally:
            blocker.close()
        assert node.port != old_port
        assert "Address already in use" in node.log_path.read_text()
        assert _scalar(node.dsn(), "SELECT count(*) FROM kept") == 1
    finally:
        c.destroy()
    assert not base.exists()
