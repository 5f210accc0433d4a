"""The catalog against a real PostgreSQL node: migrations, node registry, NOTIFY, reconnects.

Why real servers: the properties that matter here (advisory-lock-serialised migrations, NOTIFY
delivered at commit, surviving ``pg_terminate_backend``) are PostgreSQL behaviour, not ours to mock.
Each module gets its own database on node 0, and tests that need an untouched schema get their
own, so suites running side by side don't see each other's nodes.

No pytest-asyncio in the dependencies: each test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

from orochi_proxy.catalog import MIGRATIONS, Catalog, CatalogError, Migration, migrate

T = TypeVar("T")

_addr = itertools.count(1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine on a fresh event loop, bounded so a hang fails instead of stalling."""
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def fake_node() -> tuple[str, int]:
    """An address unique within this module; the catalog never connects to registered nodes."""
    n = next(_addr)
    return f"10.77.{n // 250}.{n % 250 + 1}", 5432


async def _admin(kw: dict[str, Any], sql: str) -> None:
    conn = await asyncpg.connect(**kw)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def _create_db(cluster: Any) -> Iterator[dict[str, Any]]:
    node = cluster.nodes[0]
    name = f"cat_test_{secrets.token_hex(4)}"
    run(_admin(node.connect_kwargs("postgres"), f"CREATE DATABASE {name}"))
    try:
        yield node.connect_kwargs(name)
    finally:
        run(_admin(node.connect_kwargs("postgres"), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(scope="module")
def db(cluster: Any) -> Iterator[dict[str, Any]]:
    """asyncpg kwargs of this module's database (shared by the tests that add fake nodes)."""
    yield from _create_db(cluster)


@pytest.fixture
def fresh_db(cluster: Any) -> Iterator[dict[str, Any]]:
    """A database of its own, for tests that must start without the catalog schema."""
    yield from _create_db(cluster)


@pytest.fixture
def make_catalog(cluster: Any) -> Callable[..., Catalog]:
    """Build a Catalog whose metadata node is node 0 (spelled ``localhost`` on purpose)."""
    node = cluster.nodes[0]

    def make(kw: dict[str, Any], **opts: Any) -> Catalog:
        return Catalog(kw, metadata_host="localhost", metadata_port=node.port, **opts)

    return make


async def _fetch(kw: dict[str, Any], sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(**kw)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


# ------------------------------------------------------------------------------ migrations


def test_open_twice_is_idempotent(fresh_db: dict[str, Any], make_catalog: Callable[..., Catalog]):
    async def body() -> None:
        async with make_catalog(fresh_db) as cat:
            assert cat.version == 1
            assert cat.nodes == []
        async with make_catalog(fresh_db) as cat:
            assert cat.version == 1
        rows = await _fetch(fresh_db, "SELECT version FROM orochi_catalog.schema_migrations")
        assert sorted(r["version"] for r in rows) == [m.version for m in MIGRATIONS]

    run(body())


def test_concurrent_open(fresh_db: dict[str, Any], make_catalog: Callable[..., Catalog]):
    async def body() -> None:
        cats = [make_catalog(fresh_db) for _ in range(4)]
        await asyncio.gather(*(c.open() for c in cats))
        try:
            assert {c.version for c in cats} == {1}
            rows = await _fetch(fresh_db, "SELECT version FROM orochi_catalog.schema_migrations")
            assert sorted(r["version"] for r in rows) == [m.version for m in MIGRATIONS]
            assert (await _fetch(fresh_db, "SELECT count(*) FROM orochi_catalog.catalog_version"))[
                0
            ][0] == 1
        finally:
            await asyncio.gather(*(c.close() for c in cats))

    run(body())


def test_new_migration_applies_once(fresh_db: dict[str, Any]):
    """Later features append numbered steps; only the missing ones run."""
    extra = (
        *MIGRATIONS,
        Migration(
            MIGRATIONS[-1].version + 1,
            "test step",
            ("CREATE TABLE orochi_catalog.test_step (x int)",),
        ),
    )

    async def body() -> None:
        conn = await asyncpg.connect(**fresh_db)
        try:
            assert await migrate(conn) == [m.version for m in MIGRATIONS]
            assert await migrate(conn, extra) == [extra[-1].version]
            assert await migrate(conn, extra) == []
            assert await migrate(conn) == []  # an older process tolerates a newer schema
            assert await conn.fetchval("SELECT to_regclass('orochi_catalog.test_step')") is not None
        finally:
            await conn.close()

    run(body())


def test_open_unreachable_metadata_raises_catalog_error():
    from orochi_proxy.localcluster import free_port

    port = free_port()
    cat = Catalog(
        {"host": "127.0.0.1", "port": port, "user": "postgres", "database": "postgres"},
        metadata_host="127.0.0.1",
        metadata_port=port,
    )
    with pytest.raises(CatalogError) as info:
        run(cat.open())
    assert info.value.sqlstate == "08006"
    assert f"127.0.0.1:{port}" in str(info.value)


# ------------------------------------------------------------------------------ node registry


def test_add_node_returns_ids_and_is_idempotent(
    db: dict[str, Any], make_catalog: Callable[..., Catalog]
):
    async def body() -> None:
        async with make_catalog(db) as cat:
            a, b = fake_node(), fake_node()
            id_a = await cat.add_node(*a)
            id_b = await cat.add_node(*b)
            assert id_b > id_a
            version = cat.version
            assert await cat.add_node(*a) == id_a
            assert cat.version == version, "re-adding a known node must not bump the version"
            node = cat.node(id_a)
            assert (node.host, node.port, node.is_active, node.is_metadata) == (*a, True, False)
            assert [n.node_id for n in cat.nodes] == sorted(n.node_id for n in cat.nodes)

    run(body())


def test_remove_node_and_unknown_node_errors(
    db: dict[str, Any], make_catalog: Callable[..., Catalog]
):
    async def body() -> None:
        async with make_catalog(db) as cat:
            host, port = fake_node()
            node_id = await cat.add_node(host, port)
            before = cat.version
            await cat.remove_node(host, port)
            assert cat.version == before + 1
            assert node_id not in [n.node_id for n in cat.nodes]
            with pytest.raises(CatalogError) as info:
                cat.node(node_id)
            assert info.value.sqlstate == "42704"
            with pytest.raises(CatalogError) as info:
                await cat.remove_node(host, port)
            assert info.value.sqlstate == "42704"
            assert f"{host}:{port}" in str(info.value) and "citus_nodes" in str(info.value)
            assert cat.version == before + 1, "a failed change must not bump the version"

    run(body())


@pytest.mark.parametrize(("host", "port"), [("", 5432), ("  ", 5432), ("h", 0), ("h", 70000)])
def test_bad_arguments(
    db: dict[str, Any], make_catalog: Callable[..., Catalog], host: str, port: int
):
    async def body() -> None:
        async with make_catalog(db) as cat:
            with pytest.raises(CatalogError) as info:
                await cat.add_node(host, port)
            assert info.value.sqlstate == "22023"

    run(body())


def test_metadata_node_loopback_spellings(
    cluster: Any, db: dict[str, Any], make_catalog: Callable[..., Catalog]
):
    """Config says localhost, the node is added as 127.0.0.1: still the metadata node."""
    meta = cluster.nodes[0]

    async def body() -> None:
        async with make_catalog(db) as cat:
            node_id = await cat.add_node(meta.host, meta.port)
            assert meta.host == "127.0.0.1"
            assert cat.node(node_id).is_metadata
            assert cat.metadata_node is not None and cat.metadata_node.node_id == node_id
            other = await cat.add_node(meta.host, meta.port + 1)
            assert not cat.node(other).is_metadata
            await cat.remove_node(meta.host, meta.port + 1)

    run(body())


def test_views(cluster: Any, db: dict[str, Any], make_catalog: Callable[..., Catalog]):
    meta = cluster.nodes[0]

    async def body() -> None:
        async with make_catalog(db) as cat:
            meta_id = await cat.add_node(meta.host, meta.port)
            host, port = fake_node()
            worker_id = await cat.add_node(host, port)
            rows = await _fetch(db, "SELECT * FROM orochi_catalog.citus_nodes")
            assert list(rows[0].keys()) == [
                "nodeid",
                "nodename",
                "nodeport",
                "role",
                "active",
                "isactive",
            ]
            by_id = {r["nodeid"]: r for r in rows}
            assert set(by_id) == {n.node_id for n in cat.nodes}
            assert dict(by_id[meta_id]) == {
                "nodeid": meta_id,
                "nodename": meta.host,
                "nodeport": meta.port,
                "role": "coordinator",
                "active": True,
                "isactive": True,
            }
            assert by_id[worker_id]["role"] == "worker"

            rows = await _fetch(db, "SELECT * FROM orochi_catalog.pg_dist_node")
            assert list(rows[0].keys()) == [
                "nodeid",
                "groupid",
                "nodename",
                "nodeport",
                "noderack",
                "hasmetadata",
                "isactive",
                "noderole",
                "nodecluster",
                "metadatasynced",
                "shouldhaveshards",
            ]
            by_id = {r["nodeid"]: r for r in rows}
            assert by_id[meta_id]["groupid"] == 0 and by_id[meta_id]["hasmetadata"]
            w = by_id[worker_id]
            assert (w["nodename"], w["nodeport"], w["groupid"], w["hasmetadata"]) == (
                host,
                port,
                worker_id,
                False,
            )
            assert (w["noderole"], w["noderack"], w["nodecluster"]) == (
                "primary",
                "default",
                "default",
            )
            await cat.remove_node(host, port)

    run(body())


# ------------------------------------------------------------------------------ notifications


def test_second_catalog_sees_change_via_notify(
    db: dict[str, Any], make_catalog: Callable[..., Catalog]
):
    async def body() -> None:
        # A long poll interval: only NOTIFY can make the second catalog catch up in time.
        async with make_catalog(db) as a, make_catalog(db, poll_interval=60) as b:
            seen: list[int] = []
            b.add_listener(seen.append)
            host, port = fake_node()
            node_id = await a.add_node(host, port)
            await b.wait_for_version(a.version, timeout=1.0)
            assert b.node(node_id).host == host
            assert seen and seen[-1] == a.version
            seen_a: list[int] = []
            a.add_listener(seen_a.append)
            await b.remove_node(host, port)
            await a.wait_for_version(b.version, timeout=1.0)
            assert node_id not in [n.node_id for n in a.nodes]
            assert seen_a == [b.version]

    run(body())


def test_listener_reconnects_after_terminate(
    db: dict[str, Any], make_catalog: Callable[..., Catalog], caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="orochi_proxy.catalog")

    async def body() -> None:
        async with make_catalog(db) as a, make_catalog(db, poll_interval=60) as b:
            listen_conn = b._listen_conn
            assert listen_conn is not None
            killed = await _fetch(
                db, "SELECT pg_terminate_backend($1)", listen_conn.get_server_pid()
            )
            assert killed[0][0] is True
            # A change while b's listener may be down: b catches up by reloading on reconnect.
            first = await a.add_node(*fake_node())
            await b.wait_for_version(a.version, timeout=5.0)
            assert b.node(first)
            # And the new LISTEN connection delivers notifications again, promptly.
            for _ in range(50):
                if b._listen_conn is not None and b._listen_conn is not listen_conn:
                    break
                await asyncio.sleep(0.1)
            second = await a.add_node(*fake_node())
            await b.wait_for_version(a.version, timeout=1.0)
            assert b.node(second)

    run(body())
    assert any("reconnect" in r.getMessage() for r in caplog.records)


def test_command_connection_survives_terminate(
    db: dict[str, Any], make_catalog: Callable[..., Catalog]
):
    async def body() -> None:
        async with make_catalog(db) as cat:
            assert cat._conn is not None
            await _fetch(db, "SELECT pg_terminate_backend($1)", cat._conn.get_server_pid())
            await asyncio.sleep(0.1)
            node_id = await cat.add_node(*fake_node())
            assert cat.node(node_id)
            await cat.reload()

    run(body())
