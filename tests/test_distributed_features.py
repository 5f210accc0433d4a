"""Distributed-table features end to end: through the proxy, with every effect checked on the nodes.

Why check on the nodes and not only through the proxy: the proxy reading back what it wrote
cannot catch a row routed to the wrong shard (the same wrong hash routes the read there too), a
shard left out of a DDL change that no query happens to touch, or a prepared transaction left
behind after a multi-node write. So each feature is checked twice: what a client sees through the
proxy, and what PostgreSQL itself holds on each node, connected directly:

* **placement** — ``satisfies_hash_partition`` (PostgreSQL's own hash-partition routing) must
  accept every row of every shard for that shard's index (DESIGN.md: the shard of a value is the
  slot ``PARTITION BY HASH`` would choose); the helper parent tables ``feat_hp_<type>`` exist
  only to give that function a partition key type;
* **DDL** — each shard's columns (``information_schema.columns``), constraints and indexes
  (``pg_indexes``, names suffixed ``_<shardid>``) equal the logical table's;
* **transactions** — after every multi-node write, DDL and COPY, ``pg_prepared_xacts`` is empty on
  every node, and a failed statement leaves no shard changed.

Tables are named ``feat_*`` (unique to this module) and dropped at the end. Connections use
autocommit: distributed writes inside explicit transaction blocks are not supported yet.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import random
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from proxyproc import ProxyProcess

from orochi_proxy.localcluster import LocalCluster, LocalNode

Row = tuple[Any, ...]


# ====================================================================================== helpers
@dataclass
class Env:
    """A proxy connection plus one direct connection per node (keyed by port)."""

    proxy: psycopg.Connection[Any]
    proxy_obj: ProxyProcess
    nodes: dict[int, psycopg.Connection[Any]]
    cluster: LocalCluster

    def node_at(self, port: int) -> psycopg.Connection[Any]:
        """The direct connection of the node ``citus_shards`` names by port."""
        return self.nodes[int(port)]

    @property
    def metadata(self) -> psycopg.Connection[Any]:
        """Node 0, which holds the catalog and the (empty) logical tables."""
        return self.nodes[self.cluster.nodes[0].port]

    def q(self, sql: str, params: Any = None) -> list[Row]:
        """Rows of a query through the proxy."""
        with self.proxy.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def tag(self, sql: str, params: Any = None) -> tuple[str, list[Row]]:
        """Command tag and rows of a statement through the proxy."""
        with self.proxy.cursor() as cur:
            cur.execute(sql, params)
            rows = cur.fetchall() if cur.description else []
            return cur.statusmessage or "", rows


@dataclass
class ShardRow:
    """One placement as ``citus_shards`` reports it."""

    shardid: int
    shard_name: str
    nodeport: int
    shard_index: int

    @property
    def table(self) -> str:
        """The unqualified physical table name on the node."""
        return self.shard_name.split(".", 1)[1]


def shards_of(env: Env, table: str) -> list[ShardRow]:
    """Placements of ``public.<table>`` from citus_shards, by shard index."""
    rows = env.q(
        "SELECT shardid, shard_name, nodeport, shard_index FROM citus_shards "
        "WHERE table_name = %s ORDER BY shard_index, nodeport",
        (f"public.{table}",),
    )
    return [ShardRow(int(a), str(b), int(c), int(d)) for a, b, c, d in rows]


def node_rows(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> list[Row]:
    """Rows of a query run directly on a node."""
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


def assert_no_prepared(env: Env) -> None:
    """No node holds a prepared transaction: every 2PC finished (committed or rolled back)."""
    for port, conn in env.nodes.items():
        left = node_rows(conn, "SELECT gid FROM pg_prepared_xacts")
        assert left == [], f"node :{port} keeps prepared transactions {left}"


def hp_parent(env: Env, conn: psycopg.Connection[Any], pg_type: str) -> str:
    """A hash-partitioned parent with key type ``pg_type`` on this node (for satisfies_hash_partition)."""
    name = "feat_hp_" + re.sub(r"\W", "_", pg_type)
    conn.execute(f"CREATE TABLE IF NOT EXISTS {name} (k {pg_type}) PARTITION BY HASH (k)")
    return name


def check_placement(env: Env, table: str, dist_col: str, pg_type: str) -> int:
    """Every row of every shard satisfies its hash partition; returns the rows counted on nodes."""
    shards = shards_of(env, table)
    assert shards, f"{table} has no shards in citus_shards"
    count = len({s.shard_index for s in shards})
    total = 0
    for s in shards:
        conn = env.node_at(s.nodeport)
        parent = hp_parent(env, conn, pg_type)
        ((n, ok),) = node_rows(
            conn,
            f"SELECT count(*), bool_and(satisfies_hash_partition('{parent}'::regclass, "
            f"{count}, {s.shard_index}, {dist_col})) FROM {s.shard_name}",
        )
        assert ok is not False, f"{s.shard_name} (index {s.shard_index}) holds rows of other shards"
        total += n
    return total


def node_table_names(conn: psycopg.Connection[Any], pattern: str) -> list[str]:
    """Tables in schema public on a node whose name matches the regex ``pattern``."""
    rows = node_rows(
        conn,
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND c.relname ~ %s ORDER BY 1",
        (pattern,),
    )
    return [r[0] for r in rows]


def columns_of(conn: psycopg.Connection[Any], table: str) -> list[Row]:
    """(name, type, nullable, default) per column in attribute order."""
    return node_rows(
        conn,
        "SELECT column_name, data_type, is_nullable, column_default FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position",
        (table,),
    )


def indexes_of(conn: psycopg.Connection[Any], table: str) -> set[str]:
    """Index names of a table on a node."""
    rows = node_rows(
        conn, "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = %s", (table,)
    )
    return {r[0] for r in rows}


def constraints_of(conn: psycopg.Connection[Any], table: str) -> set[tuple[str, str]]:
    """(name, definition) of the table's CHECK constraints on a node."""
    rows = node_rows(
        conn,
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = to_regclass(%s) AND contype = 'c'",
        (f"public.{table}",),
    )
    return {(a, b) for a, b in rows}


def sqlstate_of(excinfo: pytest.ExceptionInfo[BaseException]) -> str | None:
    """The SQLSTATE of a psycopg error."""
    exc = excinfo.value
    assert isinstance(exc, psycopg.Error), exc
    return exc.sqlstate


# ====================================================================================== fixture
@pytest.fixture(scope="module")
def env(cluster: LocalCluster, proxy: ProxyProcess) -> Iterator[Env]:
    """Nodes registered through the proxy; direct node connections; ``feat_*`` dropped at the end."""
    pconn = psycopg.connect(proxy.dsn(), autocommit=True)
    for n in cluster.nodes:
        pconn.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))
    nodes = {n.port: psycopg.connect(n.dsn(), autocommit=True) for n in cluster.nodes}
    e = Env(pconn, proxy, nodes, cluster)
    try:
        yield e
    finally:
        try:
            for (name,) in e.q("SELECT table_name FROM citus_tables WHERE table_name LIKE 'public.feat\\_%'"):
                try:
                    pconn.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
                except psycopg.Error:
                    pass
            pconn.execute("DROP SEQUENCE IF EXISTS feat_copy_seq_n")
            for conn in nodes.values():
                for t in node_table_names(conn, r"^feat_"):
                    conn.execute(f"DROP TABLE IF EXISTS public.{t} CASCADE")
        finally:
            pconn.close()
            for conn in nodes.values():
                conn.close()


def _node_of(cluster: LocalCluster, port: int) -> LocalNode:
    return next(n for n in cluster.nodes if n.port == port)


# ============================================================================ 1. distribution
def _uuid_values(n: int) -> list[uuid.UUID]:
    rnd = random.Random(7)
    return [uuid.UUID(int=rnd.getrandbits(128)) for _ in range(n)]


DIST_CASES = {
    "bigint": [(i * 7919 - 300_000, f"v{i}") for i in range(300)],
    "integer": [(i * 31 - 2000, f"v{i}") for i in range(300)],
    "text": [(f"key-{i}-é", f"v{i}") for i in range(290)]
    + [(k, "special") for k in ("a\tb", "back\\slash", "new\nline", "cr\rx", "", " sp ", "\\N", "q'\"", "x" * 300, "\x01")],
    "uuid": [(u, f"v{i}") for i, u in enumerate(_uuid_values(300))],
}


@pytest.mark.parametrize("pg_type", list(DIST_CASES))
def test_create_distributed_table_moves_rows_into_hash_shards(env: Env, pg_type: str) -> None:
    """Existing rows move into the shard PostgreSQL's hash partitioning would pick."""
    table = f"feat_d_{pg_type}"
    rows = DIST_CASES[pg_type]
    env.proxy.execute(f"CREATE TABLE {table} (k {pg_type} PRIMARY KEY, v text)")
    with env.proxy.cursor() as cur:
        cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", rows)
    env.q(f"SELECT create_distributed_table('{table}', 'k', shard_count => 8)")

    # Through the proxy: every row, once.
    assert env.q(f"SELECT count(*) FROM {table}") == [(len(rows),)]
    got = sorted(env.q(f"SELECT k, v FROM {table}"), key=lambda r: str(r[0]))
    assert got == sorted(rows, key=lambda r: str(r[0]))
    # The logical table on the metadata node is empty.
    assert node_rows(env.metadata, f"SELECT count(*) FROM public.{table}") == [(0,)]
    # On the nodes: every row in its hash shard, and all of them there.
    assert check_placement(env, table, "k", pg_type) == len(rows)
    shards = shards_of(env, table)
    assert sorted(s.shard_index for s in shards) == list(range(8))
    per_node_rows = [
        node_rows(env.node_at(s.nodeport), f"SELECT count(*) FROM {s.shard_name}")[0][0] for s in shards
    ]
    assert sum(1 for n in per_node_rows if n) >= 6, "rows should spread over most of the 8 shards"


def test_shards_spread_and_colocate(env: Env) -> None:
    """Shards spread evenly over the nodes; a co-located table has shard i on the same node."""
    env.proxy.execute("CREATE TABLE feat_c1 (id bigint PRIMARY KEY, v int)")
    env.proxy.execute("CREATE TABLE feat_c2 (id bigint, x int, PRIMARY KEY (id, x))")
    env.q("SELECT create_distributed_table('feat_c1', 'id', shard_count => 9)")
    env.q("SELECT create_distributed_table(table_name => 'feat_c2', distribution_column => 'id', colocate_with => 'feat_c1')")
    s1, s2 = shards_of(env, "feat_c1"), shards_of(env, "feat_c2")
    assert len(s1) == len(s2) == 9
    per_node: dict[int, int] = {}
    for s in s1:
        per_node[s.nodeport] = per_node.get(s.nodeport, 0) + 1
    assert sorted(per_node) == sorted(env.nodes), "every node should hold shards"
    assert max(per_node.values()) - min(per_node.values()) <= 1, per_node
    assert [(s.shard_index, s.nodeport) for s in s1] == [(s.shard_index, s.nodeport) for s in s2]
    for s in s1 + s2:
        assert node_table_names(env.node_at(s.nodeport), f"^{s.table}$") == [s.table]
    tables = dict(
        (r[0], r[1:])
        for r in env.q(
            "SELECT table_name, citus_table_type, distribution_column, colocation_id, shard_count "
            "FROM citus_tables WHERE table_name IN ('public.feat_c1', 'public.feat_c2')"
        )
    )
    assert tables["public.feat_c1"][:2] == ("distributed", "id")
    assert tables["public.feat_c1"][3] == tables["public.feat_c2"][3] == 9
    assert tables["public.feat_c1"][2] == tables["public.feat_c2"][2], "co-located tables share a group"
    # Shard names carry the shard id.
    assert all(s.table == f"feat_c1_{s.shardid}" for s in s1)


def test_create_distributed_table_refusals(env: Env) -> None:
    """Range distribution, a second distribution, jsonb keys and a PK without the key are refused."""
    env.proxy.execute("CREATE TABLE feat_r1 (id bigint PRIMARY KEY, j jsonb, other int)")
    with pytest.raises(psycopg.Error) as ei:
        env.q("SELECT create_distributed_table('feat_r1', 'id', distribution_type => 'range')")
    assert sqlstate_of(ei) == "0A000"
    with pytest.raises(psycopg.Error) as ei:
        env.q("SELECT create_distributed_table('feat_r1', 'j')")
    assert sqlstate_of(ei) == "0A000"
    with pytest.raises(psycopg.Error) as ei:
        env.q("SELECT create_distributed_table('feat_r1', 'other')")
    assert sqlstate_of(ei) == "0A000", "PRIMARY KEY (id) cannot be enforced when distributed by other"
    assert "feat_r1" not in {r[0].split(".")[1] for r in env.q("SELECT table_name FROM citus_tables")}
    # Nothing left behind on the nodes by the refused attempts.
    for conn in env.nodes.values():
        assert node_table_names(conn, r"^feat_r1_\d+$") == []
    env.q("SELECT create_distributed_table('feat_r1', 'id', shard_count => 4)")
    with pytest.raises(psycopg.Error) as ei:
        env.q("SELECT create_distributed_table('feat_r1', 'id', shard_count => 4)")
    assert "already distributed" in str(ei.value)
    assert len(shards_of(env, "feat_r1")) == 4


def test_get_shard_id_for_distribution_column(env: Env) -> None:
    """The shard id named for a value is the shard whose table holds that row on its node."""
    env.proxy.execute("CREATE TABLE feat_g (id text PRIMARY KEY, v int)")
    env.q("SELECT create_distributed_table('feat_g', 'id', shard_count => 6)")
    keys = [f"user-{i}" for i in range(40)]
    with env.proxy.cursor() as cur:
        cur.executemany("INSERT INTO feat_g VALUES (%s, %s)", [(k, i) for i, k in enumerate(keys)])
    by_id = {s.shardid: s for s in shards_of(env, "feat_g")}
    seen = set()
    for k in keys:
        ((sid,),) = env.q("SELECT get_shard_id_for_distribution_column('feat_g', %s)", (k,))
        s = by_id[int(sid)]
        seen.add(s.shardid)
        found = node_rows(env.node_at(s.nodeport), f"SELECT count(*) FROM {s.shard_name} WHERE id = %s", (k,))
        assert found == [(1,)], f"{k!r} is not in shard {sid} named for it"
    assert len(seen) > 1


def test_undistribute_table_brings_rows_back(env: Env) -> None:
    """undistribute_table: rows back in the plain table, catalog rows and shard tables gone."""
    env.proxy.execute("CREATE TABLE feat_u (id int PRIMARY KEY, v text)")
    env.q("SELECT create_distributed_table('feat_u', 'id', shard_count => 5)")
    with env.proxy.cursor() as cur:
        cur.executemany("INSERT INTO feat_u VALUES (%s, %s)", [(i, f"r{i}") for i in range(100)])
    assert node_rows(env.metadata, "SELECT count(*) FROM public.feat_u") == [(0,)]
    env.q("SELECT undistribute_table('feat_u')")
    assert node_rows(env.metadata, "SELECT count(*), sum(id) FROM public.feat_u") == [(100, sum(range(100)))]
    assert env.q("SELECT count(*) FROM feat_u") == [(100,)]
    assert env.q("SELECT count(*) FROM citus_tables WHERE table_name = 'public.feat_u'") == [(0,)]
    assert shards_of(env, "feat_u") == []
    for port, conn in env.nodes.items():
        assert node_table_names(conn, r"^feat_u_\d+$") == [], f"node :{port} keeps shards"
    env.proxy.execute("DROP TABLE feat_u")


def test_create_reference_table_copies_on_every_node(env: Env) -> None:
    """A reference table has a full copy on every node."""
    env.proxy.execute("CREATE TABLE feat_ref (code text PRIMARY KEY, name text)")
    env.proxy.execute("INSERT INTO feat_ref VALUES ('a', 'Alpha'), ('b', 'Beta'), ('c', NULL)")
    env.q("SELECT create_reference_table('feat_ref')")
    placements = shards_of(env, "feat_ref")
    assert sorted(p.nodeport for p in placements) == sorted(env.nodes)
    assert len({p.shardid for p in placements}) == 1
    for p in placements:
        got = node_rows(env.node_at(p.nodeport), f"SELECT code, name FROM {p.shard_name} ORDER BY code")
        assert got == [("a", "Alpha"), ("b", "Beta"), ("c", None)], f"node :{p.nodeport}"
    assert env.q("SELECT citus_table_type FROM citus_tables WHERE table_name = 'public.feat_ref'") == [("reference",)]
    assert env.q("SELECT count(*) FROM feat_ref") == [(3,)]
    assert node_rows(env.metadata, "SELECT count(*) FROM public.feat_ref") == [(0,)]


# ============================================================================ 2. DDL propagation
def _assert_shards_match(env: Env, table: str) -> None:
    """Every shard's columns, CHECK constraints and indexes equal the logical table's (suffixed)."""
    logical_cols = columns_of(env.metadata, table)
    logical_idx = indexes_of(env.metadata, table)
    logical_checks = constraints_of(env.metadata, table)
    shards = shards_of(env, table)
    assert shards
    for s in shards:
        conn = env.node_at(s.nodeport)
        assert columns_of(conn, s.table) == logical_cols, f"{s.shard_name} columns"
        assert indexes_of(conn, s.table) == {f"{i}_{s.shardid}" for i in logical_idx}, f"{s.shard_name} indexes"
        assert constraints_of(conn, s.table) == {(f"{n}_{s.shardid}", d) for n, d in logical_checks}, (
            f"{s.shard_name} constraints"
        )


def test_ddl_propagates_to_every_shard(env: Env) -> None:
    """Each DDL reaches every shard, and the proxy sees the change."""
    t = "feat_ddl"
    env.proxy.execute(f"CREATE TABLE {t} (id bigint PRIMARY KEY, a int, b text)")
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 6)")
    with env.proxy.cursor() as cur:
        cur.executemany(f"INSERT INTO {t} (id, a, b) VALUES (%s, %s, %s)", [(i, i, f"b{i}") for i in range(30)])
    _assert_shards_match(env, t)

    env.proxy.execute(f"ALTER TABLE {t} ADD COLUMN c int")
    _assert_shards_match(env, t)
    assert "c" in [r[0] for r in columns_of(env.metadata, t)]
    assert env.q(f"SELECT count(c) FROM {t}") == [(0,)]

    env.proxy.execute(f"ALTER TABLE {t} ALTER COLUMN c SET DEFAULT 42")
    _assert_shards_match(env, t)
    env.proxy.execute(f"INSERT INTO {t} (id, a, b) VALUES (1000, 1, 'x'), (1001, 2, 'y')")
    assert env.q(f"SELECT id, c FROM {t} WHERE id IN (1000, 1001) ORDER BY id") == [(1000, 42), (1001, 42)]

    env.proxy.execute(f"ALTER TABLE {t} RENAME COLUMN b TO bee")
    _assert_shards_match(env, t)
    assert env.q(f"SELECT bee FROM {t} WHERE id = 3") == [("b3",)]

    env.proxy.execute(f"ALTER TABLE {t} DROP COLUMN a")
    _assert_shards_match(env, t)
    with pytest.raises(psycopg.Error) as ei:
        env.q(f"SELECT a FROM {t}")
    assert sqlstate_of(ei) == "42703"

    env.proxy.execute(f"ALTER TABLE {t} ADD CONSTRAINT feat_ddl_c_pos CHECK (c > 0)")
    _assert_shards_match(env, t)
    assert any(n == "feat_ddl_c_pos" for n, _ in constraints_of(env.metadata, t))
    with pytest.raises(psycopg.Error) as ei:
        env.q(f"INSERT INTO {t} (id, bee, c) VALUES (2000, 'z', -1)")
    assert sqlstate_of(ei) == "23514"

    env.proxy.execute(f"CREATE INDEX feat_ddl_bee_named ON {t} (bee)")
    env.proxy.execute(f"CREATE INDEX ON {t} (c)")
    _assert_shards_match(env, t)
    idx = indexes_of(env.metadata, t)
    assert "feat_ddl_bee_named" in idx and "feat_ddl_c_idx" in idx, idx

    env.proxy.execute("ALTER INDEX feat_ddl_bee_named RENAME TO feat_ddl_bee_renamed")
    _assert_shards_match(env, t)
    assert "feat_ddl_bee_renamed" in indexes_of(env.metadata, t)

    env.proxy.execute("DROP INDEX feat_ddl_c_idx")
    _assert_shards_match(env, t)
    assert "feat_ddl_c_idx" not in indexes_of(env.metadata, t)
    assert_no_prepared(env)

    # A DDL that fails on the logical table changes no shard and leaves no prepared transaction.
    before = {s.shard_name: columns_of(env.node_at(s.nodeport), s.table) for s in shards_of(env, t)}
    with pytest.raises(psycopg.Error) as ei:
        env.proxy.execute(f"ALTER TABLE {t} ADD COLUMN c int")
    assert sqlstate_of(ei) == "42701"
    after = {s.shard_name: columns_of(env.node_at(s.nodeport), s.table) for s in shards_of(env, t)}
    assert after == before
    assert_no_prepared(env)
    assert env.q(f"SELECT count(*) FROM {t}") == [(32,)], "the connection keeps working after the error"
    # A DDL the (empty) logical table accepts but shards reject (their rows violate it) is
    # rolled back everywhere, the logical table included.
    with pytest.raises(psycopg.Error) as ei:
        env.proxy.execute(f"ALTER TABLE {t} ADD CONSTRAINT feat_ddl_id_small CHECK (id < 500)")
    assert sqlstate_of(ei) == "23514"
    assert not any(n == "feat_ddl_id_small" for n, _ in constraints_of(env.metadata, t))
    _assert_shards_match(env, t)
    assert_no_prepared(env)

    status, _ = env.tag(f"TRUNCATE {t}")
    assert status == "TRUNCATE TABLE"
    assert env.q(f"SELECT count(*) FROM {t}") == [(0,)]
    for s in shards_of(env, t):
        assert node_rows(env.node_at(s.nodeport), f"SELECT count(*) FROM {s.shard_name}") == [(0,)]
    env.proxy.execute(f"INSERT INTO {t} (id, bee) VALUES (1, 'one'), (2, 'two'), (3, 'three')")

    old_shards = shards_of(env, t)
    env.proxy.execute(f"ALTER TABLE {t} RENAME TO feat_ddl2")
    new_shards = shards_of(env, "feat_ddl2")
    assert shards_of(env, t) == []
    assert [s.shardid for s in new_shards] == [s.shardid for s in old_shards]
    for s in new_shards:
        conn = env.node_at(s.nodeport)
        assert node_table_names(conn, f"^{s.table}$") == [f"feat_ddl2_{s.shardid}"]
        assert node_table_names(conn, f"^feat_ddl_{s.shardid}$") == []
    _assert_shards_match(env, "feat_ddl2")
    assert env.q("SELECT id, bee, c FROM feat_ddl2 ORDER BY id") == [(1, "one", 42), (2, "two", 42), (3, "three", 42)]
    assert env.q("SELECT bee FROM feat_ddl2 WHERE id = 2") == [("two",)]

    env.proxy.execute("DROP TABLE feat_ddl2")
    assert env.q("SELECT count(*) FROM citus_tables WHERE table_name = 'public.feat_ddl2'") == [(0,)]
    for port, conn in env.nodes.items():
        assert node_table_names(conn, r"^feat_ddl2?(_\d+)?$") == [], f"node :{port}"
    assert_no_prepared(env)


# ============================================================================ 3. COPY
COPY_COLS = "id, name, note, n"


def _copy_table(env: Env, name: str, shards: int = 8) -> None:
    env.proxy.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, name text, note text, n int)")
    env.q(f"SELECT create_distributed_table('{name}', 'id', shard_count => {shards})")


def _shard_counts(env: Env, table: str) -> list[int]:
    return [
        node_rows(env.node_at(s.nodeport), f"SELECT count(*) FROM {s.shard_name}")[0][0] for s in shards_of(env, table)
    ]


def test_copy_from_stdin_text_csv_binary(env: Env) -> None:
    """Rows sent in text, csv and binary arrive exactly (values, NULLs, empty strings), spread over shards."""
    t = "feat_copy"
    _copy_table(env, t)
    expected: dict[int, Row] = {}

    # text: tabs and backslashes escaped, \N is NULL.
    text_rows = [(i, f"t\\{i}\twith tab", None if i % 5 == 0 else f"note {i}", i * 2) for i in range(0, 200)]
    lines = []
    for r in text_rows:
        fields = ["\\N" if v is None else str(v).replace("\\", "\\\\").replace("\t", "\\t") for v in r]
        lines.append("\t".join(fields) + "\n")
    with env.proxy.cursor() as cur, cur.copy(f"COPY {t} ({COPY_COLS}) FROM STDIN") as cp:
        for chunk in range(0, len(lines), 37):  # several CopyData messages, split mid-stream
            cp.write("".join(lines[chunk : chunk + 37]))
    expected.update({r[0]: r for r in text_rows})

    # csv with a header; quoted commas, quotes and newlines; unquoted empty = NULL, "" = empty string.
    csv_rows = [
        (1000 + i, f'name, with "comma" {i}', "line1\nline2" if i % 2 else "", None if i % 3 == 0 else i)
        for i in range(150)
    ]
    buf = io.StringIO()
    buf.write("id,name,note,n\n")
    for r in csv_rows:
        note = '""' if r[2] == "" else '"' + r[2].replace('"', '""') + '"'
        name = '"' + r[1].replace('"', '""') + '"'
        n = "" if r[3] is None else str(r[3])
        buf.write(f"{r[0]},{name},{note},{n}\n")
    with env.proxy.cursor() as cur, cur.copy(f"COPY {t} ({COPY_COLS}) FROM STDIN (FORMAT csv, HEADER)") as cp:
        data = buf.getvalue().encode()
        for off in range(0, len(data), 500):
            cp.write(data[off : off + 500])
    expected.update({r[0]: r for r in csv_rows})

    # binary through psycopg's typed writer.
    bin_rows = [(5000 + i * 13, f"bin{i}", None if i % 4 == 0 else "ü" * (i % 7), -i) for i in range(150)]
    with env.proxy.cursor() as cur, cur.copy(f"COPY {t} ({COPY_COLS}) FROM STDIN (FORMAT binary)") as cp:
        cp.set_types(["int8", "text", "text", "int4"])
        for r in bin_rows:
            cp.write_row(r)
    expected.update({r[0]: r for r in bin_rows})

    got = {r[0]: r for r in env.q(f"SELECT {COPY_COLS} FROM {t}")}
    assert len(got) == len(expected) == 500
    assert got == expected
    counts = _shard_counts(env, t)
    assert sum(counts) == 500 and sum(1 for c in counts if c) == 8, counts
    assert check_placement(env, t, "id", "bigint") == 500
    assert node_rows(env.metadata, f"SELECT count(*) FROM public.{t}") == [(0,)]
    assert_no_prepared(env)


@pytest.mark.parametrize("dup_at", [50, 990])
def test_copy_from_stdin_is_all_or_nothing(env: Env, dup_at: int) -> None:
    """A duplicate key in a COPY aborts the whole load on every node, early or late in the stream.

    4 MB over 8 shards passes the per-shard flush threshold, so with the duplicate early its
    shard's batch reaches the node (and fails) while the client is still sending; with it late,
    the other shards' rows are already on their nodes when the failure comes.
    """
    t = f"feat_copy_atomic_{dup_at}"
    _copy_table(env, t)
    env.proxy.execute(f"INSERT INTO {t} (id, name) VALUES (77, 'existing')")
    pad = "x" * 4000
    lines = [f"{i}\trow{i}\t{pad}\t{i}\n" for i in range(1000, 2000)]
    lines.insert(dup_at, "77\tdup\t\\N\t0\n")
    started = time.monotonic()
    with pytest.raises(psycopg.Error) as ei:
        with env.proxy.cursor() as cur, cur.copy(f"COPY {t} ({COPY_COLS}) FROM STDIN") as cp:
            for line in lines:
                cp.write(line)
    assert sqlstate_of(ei) == "23505"
    # A 4 MB load fails in well under a second; waiting for a CopyDone already consumed hung 30 s.
    assert time.monotonic() - started < 10, "the error should be answered at once"
    assert env.q(f"SELECT id, name FROM {t}") == [(77, "existing")]
    assert sum(_shard_counts(env, t)) == 1
    assert_no_prepared(env)
    # The connection still works and a correct COPY goes through.
    with env.proxy.cursor() as cur, cur.copy(f"COPY {t} (id, name) FROM STDIN") as cp:
        cp.write("".join(f"{i}\tok{i}\n" for i in range(100, 140)))
    assert env.q(f"SELECT count(*) FROM {t}") == [(41,)]
    assert_no_prepared(env)
    # The client aborting (CopyFail) after rows reached the nodes leaves nothing either.
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="client gives up"):  # psycopg sends CopyFail, re-raises
        with env.proxy.cursor() as cur, cur.copy(f"COPY {t} ({COPY_COLS}) FROM STDIN") as cp:
            for line in lines[:dup_at] + lines[dup_at + 1 :]:
                cp.write(line)
            raise RuntimeError("client gives up")
    assert time.monotonic() - started < 10
    assert env.q(f"SELECT count(*) FROM {t}") == [(41,)]
    assert sum(_shard_counts(env, t)) == 41
    assert_no_prepared(env)


def _copy_out(env: Env, sql: str) -> bytes:
    with env.proxy.cursor() as cur, cur.copy(sql) as cp:
        return b"".join(bytes(b) for b in cp)


def test_copy_to_stdout(env: Env) -> None:
    """COPY TO STDOUT in text, csv (one header) and binary, and COPY (query) TO STDOUT."""
    t = "feat_copy_out"
    _copy_table(env, t)
    rows = [(i, f"n,{i}", None if i % 3 == 0 else f'q"{i}', i % 10) for i in range(120)]
    with env.proxy.cursor() as cur:
        cur.executemany(f"INSERT INTO {t} VALUES (%s, %s, %s, %s)", rows)
    by_id = {r[0]: r for r in rows}

    text = _copy_out(env, f"COPY {t} TO STDOUT").decode()
    got_text = sorted(text.splitlines())
    want_text = sorted("\t".join("\\N" if v is None else str(v) for v in r) for r in rows)
    assert got_text == want_text

    out = _copy_out(env, f"COPY {t} TO STDOUT (FORMAT csv, HEADER)").decode()
    parsed = list(csv.reader(io.StringIO(out)))
    assert parsed[0] == ["id", "name", "note", "n"]
    assert ["id", "name", "note", "n"] not in parsed[1:], "the header must appear once"
    assert len(parsed) == 121
    assert sorted(int(r[0]) for r in parsed[1:]) == sorted(by_id)
    assert {int(r[0]): r[1] for r in parsed[1:]} == {i: r[1] for i, r in by_id.items()}

    with env.proxy.cursor() as cur, cur.copy(f"COPY {t} TO STDOUT (FORMAT binary)") as cp:
        cp.set_types(["int8", "text", "text", "int4"])
        got_bin = list(cp.rows())
    assert sorted(got_bin) == sorted(rows)

    out = _copy_out(env, f"COPY (SELECT id, n FROM {t} WHERE n = 3) TO STDOUT").decode()
    assert sorted(out.splitlines()) == sorted(f"{i}\t3" for i in by_id if i % 10 == 3)
    out = _copy_out(env, f"COPY (SELECT id, name FROM {t} WHERE id = 42) TO STDOUT (FORMAT csv)").decode()
    assert out == '42,"n,42"\n'
    # No rows: the header still comes, once.
    out = _copy_out(env, f"COPY (SELECT id, n FROM {t} WHERE id < 0) TO STDOUT (FORMAT csv, HEADER)").decode()
    assert out == "id,n\n"
    # A query that needs merging is answered exactly or refused, never per shard.
    try:
        out = _copy_out(env, f"COPY (SELECT count(*) FROM {t}) TO STDOUT").decode()
    except psycopg.Error as exc:
        assert exc.sqlstate == "0A000", exc
    else:
        assert out == "120\n"


def test_copy_into_reference_table_reaches_every_node(env: Env) -> None:
    """COPY into a reference table writes every row to every copy."""
    env.proxy.execute("CREATE TABLE feat_copy_ref (code int PRIMARY KEY, label text)")
    env.q("SELECT create_reference_table('feat_copy_ref')")
    with env.proxy.cursor() as cur, cur.copy("COPY feat_copy_ref FROM STDIN (FORMAT csv)") as cp:
        cp.write("".join(f'{i},"label {i}"\n' for i in range(50)))
    for p in shards_of(env, "feat_copy_ref"):
        got = node_rows(env.node_at(p.nodeport), f"SELECT count(*), sum(code) FROM {p.shard_name}")
        assert got == [(50, sum(range(50)))], f"node :{p.nodeport}"
    assert env.q("SELECT count(*) FROM feat_copy_ref") == [(50,)]
    assert_no_prepared(env)


# ============================================================================ 4. serial / identity
def test_serial_and_identity_filled_by_proxy(env: Env) -> None:
    """bigserial key and identity column: distinct increasing values, RETURNING in input order, right shard."""
    t = "feat_ser"
    env.proxy.execute(
        f"CREATE TABLE {t} (id bigserial PRIMARY KEY, seq bigint GENERATED ALWAYS AS IDENTITY, v text)"
    )
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 6)")
    values = [f"row{i}" for i in range(40)]
    status, ret = env.tag(
        f"INSERT INTO {t} (v) VALUES " + ", ".join(f"('{v}')" for v in values) + " RETURNING id, seq, v"
    )
    assert status == "INSERT 0 40"
    assert [r[2] for r in ret] == values, "RETURNING must follow the input order"
    ids = [r[0] for r in ret]
    seqs = [r[1] for r in ret]
    assert ids == sorted(set(ids)), "serial values distinct and increasing in input order"
    assert seqs == sorted(set(seqs)), "identity values distinct and increasing in input order"
    # A second statement continues the sequences.
    _, ret2 = env.tag(f"INSERT INTO {t} (v) VALUES ('a'), ('b') RETURNING id, seq")
    assert ret2[0][0] > ids[-1] and ret2[0][1] > seqs[-1]
    # Rows landed in the shard of their generated key.
    assert check_placement(env, t, "id", "bigint") == 42
    assert sorted(env.q(f"SELECT id, seq, v FROM {t} WHERE v LIKE 'row%'")) == sorted(ret)
    for i in (ids[0], ids[17], ids[-1]):
        assert env.q(f"SELECT v FROM {t} WHERE id = %s", (i,)) == [(values[ids.index(i)],)]
    assert_no_prepared(env)


def test_copy_never_stores_null_for_sequence_columns(env: Env) -> None:
    """COPY that omits serial/identity/nextval columns fills them like PostgreSQL or answers 0A000.

    Shards carry no sequences (the proxy fills those columns on INSERT); COPY once passed the
    omitted column through, and a nullable ``DEFAULT nextval(...)`` column was stored NULL.
    """
    t = "feat_copy_seq"
    env.proxy.execute("CREATE SEQUENCE IF NOT EXISTS feat_copy_seq_n")
    env.proxy.execute(
        f"CREATE TABLE {t} (id bigserial PRIMARY KEY, seq int GENERATED BY DEFAULT AS IDENTITY, "
        "n bigint DEFAULT nextval('feat_copy_seq_n'), v text)"
    )
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 4)")
    for cols, data in (("v", "a\nb\n"), ("id, v", "1\ta\n2\tb\n"), ("id, seq, v", "3\t3\tc\n")):
        try:
            with env.proxy.cursor() as cur, cur.copy(f"COPY {t} ({cols}) FROM STDIN") as cp:
                cp.write(data)
        except psycopg.Error as exc:
            assert exc.sqlstate == "0A000", (cols, exc)
    with env.proxy.cursor() as cur, cur.copy(f"COPY {t} (id, seq, n, v) FROM STDIN") as cp:
        cp.write("10\t10\t10\tfull\n")
    rows = env.q(f"SELECT id, seq, n, v FROM {t}")
    assert (10, 10, 10, "full") in rows
    assert all(None not in r for r in rows), f"a sequence-filled column was stored NULL: {rows}"
    assert_no_prepared(env)


# ============================================================================ 5. INSERT ... SELECT
def test_insert_select_between_colocated_tables(env: Env) -> None:
    """INSERT ... SELECT between co-located tables runs shard by shard; other shapes get 0A000."""
    env.proxy.execute("CREATE TABLE feat_is_src (id bigint PRIMARY KEY, v int)")
    env.proxy.execute("CREATE TABLE feat_is_dst (id bigint PRIMARY KEY, v int)")
    env.proxy.execute("CREATE TABLE feat_is_other (id bigint PRIMARY KEY, v int)")
    env.q("SELECT create_distributed_table('feat_is_src', 'id', shard_count => 7)")
    env.q("SELECT create_distributed_table('feat_is_dst', 'id', colocate_with => 'feat_is_src')")
    env.q("SELECT create_distributed_table('feat_is_other', 'id', shard_count => 5)")
    with env.proxy.cursor() as cur:
        cur.executemany("INSERT INTO feat_is_src VALUES (%s, %s)", [(i, i % 10) for i in range(200)])

    status, _ = env.tag("INSERT INTO feat_is_dst (id, v) SELECT id, v * 2 FROM feat_is_src WHERE v < 5")
    assert status == "INSERT 0 100"
    assert env.q("SELECT count(*), sum(v) FROM feat_is_dst") == [(100, sum(2 * (i % 10) for i in range(200) if i % 10 < 5))]
    assert check_placement(env, "feat_is_dst", "id", "bigint") == 100
    status, ret = env.tag("INSERT INTO feat_is_dst SELECT id, v FROM feat_is_src WHERE v = 7 RETURNING id")
    assert status == "INSERT 0 20"
    assert sorted(r[0] for r in ret) == [i for i in range(200) if i % 10 == 7]
    assert_no_prepared(env)

    # Not pushable shard by shard (other shard count; key transformed): rows must be
    # re-routed by the proxy (fc9901d) into the shard of their new key, or refused with 0A000.
    for sql, table, added in (
        ("INSERT INTO feat_is_other SELECT id, v FROM feat_is_src WHERE v < 3", "feat_is_other", 60),
        ("INSERT INTO feat_is_dst SELECT id + 1000, v FROM feat_is_src WHERE v >= 8", "feat_is_dst", 40),
    ):
        before = env.q(f"SELECT count(*) FROM {table}")[0][0]
        try:
            status, _ = env.tag(sql)
        except psycopg.Error as exc:
            assert exc.sqlstate == "0A000", (sql, exc)
            assert env.q(f"SELECT count(*) FROM {table}") == [(before,)], "a refused statement wrote rows"
            continue
        assert status == f"INSERT 0 {added}", sql
        assert check_placement(env, table, "id", "bigint") == before + added, sql
        assert_no_prepared(env)
    assert env.q("SELECT count(*) FROM feat_is_dst WHERE id >= 1000") in ([(0,)], [(40,)])
    assert env.q("SELECT count(*) FROM feat_is_dst WHERE id = 1008") in ([(0,)], [(1,)])


def test_insert_select_through_the_proxy_quotes_keyword_columns(env: Env) -> None:
    """Rows re-routed by the proxy are loaded with COPY naming the columns: keywords need quotes."""
    env.proxy.execute('CREATE TABLE feat_kw_src (id bigint PRIMARY KEY, "order" int, "user" text)')
    env.proxy.execute('CREATE TABLE feat_kw_dst (id bigint PRIMARY KEY, "order" int, "user" text)')
    env.q("SELECT create_distributed_table('feat_kw_src', 'id', shard_count => 4)")
    env.q("SELECT create_distributed_table('feat_kw_dst', 'id', shard_count => 6)")
    with env.proxy.cursor() as cur:
        cur.executemany('INSERT INTO feat_kw_src (id, "order", "user") VALUES (%s, %s, %s)', [(i, i * 2, f"u{i}") for i in range(50)])
    # Different shard counts: not co-located, so the proxy runs the SELECT and routes the rows.
    status, _ = env.tag('INSERT INTO feat_kw_dst (id, "order", "user") SELECT id, "order", "user" FROM feat_kw_src WHERE id < 30')
    assert status == "INSERT 0 30"
    assert env.q('SELECT count(*), sum("order"), min("user") FROM feat_kw_dst') == [(30, sum(i * 2 for i in range(30)), "u0")]
    assert check_placement(env, "feat_kw_dst", "id", "bigint") == 30
    assert_no_prepared(env)


# ============================================================================ 6. EXPLAIN
def test_explain(env: Env) -> None:
    """EXPLAIN names the strategy and shards; ANALYZE counts rows; ANALYZE of a write is refused."""
    t = "feat_ex"
    env.proxy.execute(f"CREATE TABLE {t} (id bigint PRIMARY KEY, v int)")
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 7)")
    with env.proxy.cursor() as cur:
        cur.executemany(f"INSERT INTO {t} VALUES (%s, %s)", [(i, i % 10) for i in range(200)])
    plan = "\n".join(r[0] for r in env.q(f"EXPLAIN SELECT v FROM {t} WHERE id = 5"))
    assert "router" in plan and "Shards: 1 of 7" in plan, plan
    assert f"{t}_" in plan, "the task SQL names the shard table"
    plan = "\n".join(r[0] for r in env.q(f"EXPLAIN SELECT v, count(*) FROM {t} GROUP BY v"))
    assert "multi-shard, combine" in plan and "Shards: 7 of 7" in plan, plan
    plan = "\n".join(r[0] for r in env.q(f"EXPLAIN ANALYZE SELECT id FROM {t} WHERE v = 3"))
    assert "Rows returned: 20" in plan, plan
    plan = "\n".join(r[0] for r in env.q(f"EXPLAIN ANALYZE SELECT v, count(*) FROM {t} GROUP BY v"))
    assert "Rows returned: 10" in plan, plan
    with pytest.raises(psycopg.Error) as ei:
        env.q(f"EXPLAIN ANALYZE UPDATE {t} SET v = v + 1")
    assert sqlstate_of(ei) == "0A000"
    assert env.q(f"SELECT sum(v) FROM {t}") == [(sum(i % 10 for i in range(200)),)], "nothing was updated"


# ============================================================================ 7. writes
def test_fan_out_writes(env: Env) -> None:
    """Multi-shard INSERT/UPDATE/DELETE/ON CONFLICT: summed tags, merged RETURNING, no 2PC left over."""
    t = "feat_w"
    env.proxy.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v int, s text)")
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 8)")
    status, _ = env.tag(f"INSERT INTO {t} VALUES " + ", ".join(f"({i}, {i}, 's{i}')" for i in range(60)))
    assert status == "INSERT 0 60"
    assert_no_prepared(env)
    assert sum(1 for c in _shard_counts(env, t) if c) == 8
    assert check_placement(env, t, "id", "integer") == 60

    # A statement failing on one shard changes no shard (two-phase commit or none).
    with pytest.raises(psycopg.Error) as ei:
        env.proxy.execute(f"INSERT INTO {t} VALUES " + ", ".join(f"({i}, 0, 'n')" for i in range(100, 130)) + ", (7, 0, 'dup')")
    assert sqlstate_of(ei) == "23505"
    assert env.q(f"SELECT count(*) FROM {t}") == [(60,)]
    assert_no_prepared(env)
    env.proxy.execute(f"ALTER TABLE {t} ADD CONSTRAINT feat_w_v_small CHECK (v < 1000)")
    with pytest.raises(psycopg.Error) as ei:
        env.proxy.execute(f"UPDATE {t} SET v = v + 950")  # only rows with v >= 50 break the check
    assert sqlstate_of(ei) == "23514"
    assert env.q(f"SELECT sum(v) FROM {t}") == [(sum(range(60)),)]
    assert_no_prepared(env)

    status, _ = env.tag(f"UPDATE {t} SET v = v + 100 WHERE id < 45")
    assert status == "UPDATE 45"
    assert_no_prepared(env)
    assert env.q(f"SELECT sum(v) FROM {t}") == [(sum(range(60)) + 45 * 100,)]

    status, ret = env.tag(f"UPDATE {t} SET s = s || '!' WHERE v % 2 = 0 RETURNING id, s")
    assert status == f"UPDATE {len(ret)}" and len(ret) == 30
    assert sorted(ret) == sorted((i, f"s{i}!") for i in range(60) if i % 2 == 0)
    assert_no_prepared(env)

    status, ret = env.tag(f"DELETE FROM {t} WHERE id % 3 = 0 RETURNING id")
    assert status == "DELETE 20"
    assert sorted(r[0] for r in ret) == list(range(0, 60, 3))
    assert_no_prepared(env)
    assert env.q(f"SELECT count(*) FROM {t}") == [(40,)]

    keys = [5, 90, 6, 91, 7, 92, 8, 93]  # existing (5, 7, 8), deleted (6) and new keys, mixed
    status, ret = env.tag(
        f"INSERT INTO {t} (id, v, s) VALUES "
        + ", ".join(f"({k}, {-k}, 'new')" for k in keys)
        + " ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v * 10, s = 'upd' RETURNING id, v, s"
    )
    assert status == "INSERT 0 8"
    existing = {5, 7, 8}
    want = [(k, -k * 10, "upd") if k in existing else (k, -k, "new") for k in keys]
    assert ret == want, "RETURNING of ON CONFLICT across shards, in input order"
    assert sorted(env.q(f"SELECT id, v, s FROM {t} WHERE id = ANY(%s)", (keys,))) == sorted(want)
    assert_no_prepared(env)

    with pytest.raises(psycopg.Error) as ei:
        env.proxy.execute(f"UPDATE {t} SET id = id + 1000 WHERE id = 5")
    assert sqlstate_of(ei) == "0A000"
    with pytest.raises(psycopg.Error) as ei:
        env.proxy.execute(f"UPDATE {t} SET id = 7")
    assert sqlstate_of(ei) == "0A000"
    assert env.q(f"SELECT count(*) FROM {t} WHERE id >= 1000") == [(0,)]
    assert_no_prepared(env)


def test_on_conflict_on_constraint(env: Env) -> None:
    """``ON CONFLICT ON CONSTRAINT pkey`` (SQLAlchemy's ``constraint=``) works across shards."""
    t = "feat_w_con"
    env.proxy.execute(f"CREATE TABLE {t} (id int CONSTRAINT feat_w_con_pk PRIMARY KEY, v int)")
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 4)")
    env.proxy.execute(f"INSERT INTO {t} VALUES (1, 1), (2, 2)")
    status, ret = env.tag(
        f"INSERT INTO {t} VALUES (1, 10), (3, 30), (2, 20) ON CONFLICT ON CONSTRAINT feat_w_con_pk "
        "DO UPDATE SET v = EXCLUDED.v + 1 RETURNING id, v"
    )
    assert status == "INSERT 0 3"
    assert ret == [(1, 11), (3, 30), (2, 21)]


@pytest.mark.parametrize("how", ["multi-statement query", "executemany"])
def test_failure_undoes_the_whole_implicit_transaction(env: Env, how: str) -> None:
    """Statements before Sync form one implicit transaction: one failure leaves nothing."""
    t = "feat_itx_" + ("q" if how.startswith("multi") else "m")
    env.proxy.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v int)")
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 4)")
    with pytest.raises(psycopg.errors.UniqueViolation):
        if how.startswith("multi"):
            env.proxy.execute(
                f"INSERT INTO {t} VALUES (1, 1); INSERT INTO {t} VALUES (2, 2); INSERT INTO {t} VALUES (1, 3)"
            )
        else:
            with env.proxy.cursor() as cur:
                cur.executemany(f"INSERT INTO {t} VALUES (%s, %s)", [(1, 1), (2, 2), (3, 3), (1, 9)])
    assert env.q(f"SELECT id FROM {t} ORDER BY id") == [], "PostgreSQL keeps none of these rows"


# ============================================================================ 8. prepared statements
PS_ROWS = 60


@pytest.fixture(scope="module")
def ps_table(env: Env) -> dict[int, int]:
    """``feat_ps`` (8 shards, ids 0..59 -> v = 3 * id); returns the expected id -> v."""
    env.proxy.execute("CREATE TABLE feat_ps (id int PRIMARY KEY, v int)")
    env.q("SELECT create_distributed_table('feat_ps', 'id', shard_count => 8)")
    env.proxy.execute("INSERT INTO feat_ps VALUES " + ", ".join(f"({i}, {3 * i})" for i in range(PS_ROWS)))
    return {i: 3 * i for i in range(PS_ROWS)}


def test_psycopg_prepared_statements_route_by_parameter(env: Env, ps_table: dict[int, int]) -> None:
    """psycopg server-side prepared statements (text and binary), many executions, survive an error."""
    t, truth = "feat_ps", ps_table
    with psycopg.connect(env.proxy_obj.dsn(), autocommit=True) as conn:
        for binary in (False, True):
            mark = "%b" if binary else "%s"
            with conn.cursor(binary=binary) as cur:
                for _ in range(2):
                    for k in [*list(truth)[:25], 100_000]:
                        cur.execute(f"SELECT v FROM {t} WHERE id = {mark}", (k,), prepare=True)
                        assert cur.fetchall() == ([(truth[k],)] if k in truth else []), (binary, k)
                for keys in ([1, 2, 4], [50, 51, 52, 53, 10, 1000], [], [55]):
                    cur.execute(f"SELECT id, v FROM {t} WHERE id = ANY({mark}) ORDER BY id", (keys,), prepare=True)
                    assert cur.fetchall() == sorted((k, truth[k]) for k in keys if k in truth), (binary, keys)
                # An error in one statement does not disturb the next ones.
                with pytest.raises(psycopg.errors.UndefinedColumn):
                    cur.execute(f"SELECT nope FROM {t} WHERE id = {mark}", (1,), prepare=True)
                with pytest.raises(psycopg.errors.DivisionByZero):
                    cur.execute(f"SELECT v / (v - v) FROM {t} WHERE id = {mark}", (1,), prepare=True)
                for k in (1, 2, 4):
                    cur.execute(f"SELECT v FROM {t} WHERE id = {mark}", (k,), prepare=True)
                    assert cur.fetchall() == [(truth[k],)]
                cur.execute(f"SELECT count(*) FROM {t}")
                assert cur.fetchall() == [(len(truth),)]


def test_psycopg_pipeline_keeps_answers_in_order(env: Env, ps_table: dict[int, int]) -> None:
    """In a pipeline, each answer goes to its own statement, and an error aborts only up to Sync."""
    t, truth = "feat_ps", ps_table
    with psycopg.connect(env.proxy_obj.dsn(), autocommit=True) as conn:
        for _ in range(2):
            with conn.pipeline() as p:
                curs = []
                for k in (3, 40, 7, 59, 12):
                    c = conn.cursor()
                    c.execute(f"SELECT id, v FROM {t} WHERE id = %s", (k,), prepare=True)
                    curs.append((k, c))
                c = conn.cursor()
                c.execute(f"SELECT count(*) FROM {t} WHERE id = ANY(%s)", ([1, 2, 3, 99],), prepare=True)
                p.sync()
                for k, cur in curs:
                    assert cur.fetchall() == [(k, truth[k])], k
                assert c.fetchall() == [(3,)]
        with pytest.raises(psycopg.errors.UndefinedColumn):
            with conn.pipeline() as p:
                ok = conn.cursor().execute(f"SELECT v FROM {t} WHERE id = %s", (5,), prepare=True)
                conn.cursor().execute(f"SELECT nope FROM {t} WHERE id = %s", (6,), prepare=True)
                conn.cursor().execute(f"SELECT v FROM {t} WHERE id = %s", (7,), prepare=True)
                p.sync()
        assert ok.fetchall() == [(truth[5],)]
        for k in (8, 9, 10):
            assert conn.execute(f"SELECT v FROM {t} WHERE id = %s", (k,), prepare=True).fetchall() == [(truth[k],)]


def test_asyncpg_prepared_statements_route_by_parameter(env: Env, ps_table: dict[int, int]) -> None:
    """asyncpg prepared statements (binary), ``= $1`` and ``= ANY($1)``, writes too, survive errors."""
    t, truth = "feat_ps", dict(ps_table)
    p = env.proxy_obj

    async def run() -> None:
        conn = await asyncpg.connect(host=p.host, port=p.port, user=p.user, password=p.password, database=p.dbname)
        try:
            one = await conn.prepare(f"SELECT v FROM {t} WHERE id = $1")
            many = await conn.prepare(f"SELECT id, v FROM {t} WHERE id = ANY($1) ORDER BY id")
            for _ in range(3):
                for k in [*truth, 123_456]:
                    assert await one.fetchval(k) == truth.get(k), k
            for keys in ([1, 2, 4], [50, 51, 5, 7000], [], list(truth)):
                got = [tuple(r) for r in await many.fetch(keys)]
                assert got == sorted((k, truth[k]) for k in keys if k in truth)
            with pytest.raises(asyncpg.UndefinedColumnError):
                await conn.prepare(f"SELECT nope FROM {t} WHERE id = $1")
            assert await one.fetchval(2) == truth[2]
            bad = await conn.prepare(f"SELECT v / (v - v) FROM {t} WHERE id = $1")
            with pytest.raises(asyncpg.DivisionByZeroError):
                await bad.fetchval(1)
            for k in (1, 2, 4):
                assert await one.fetchval(k) == truth[k]
            # Prepared writes routed by parameter.
            await conn.executemany(f"INSERT INTO {t} VALUES ($1, $2)", [(k, -k) for k in range(1000, 1030)])
            upd = await conn.prepare(f"UPDATE {t} SET v = v + $2 WHERE id = $1 RETURNING v")
            for k in range(1000, 1030, 3):
                assert await upd.fetchval(k, 1) == -k + 1
            with pytest.raises(asyncpg.UniqueViolationError):
                await conn.execute(f"INSERT INTO {t} VALUES ($1, $2)", 1000, 0)
            assert await one.fetchval(1003) == -1002
            assert await conn.fetchval(f"SELECT count(*) FROM {t} WHERE id >= $1", 1000) == 30
            await conn.execute(f"DELETE FROM {t} WHERE id = ANY($1)", list(range(1000, 1030)))
            assert [tuple(r) for r in await many.fetch([4, 1])] == sorted((k, truth[k]) for k in (1, 4))
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(run(), 30))
    assert env.q(f"SELECT count(*), sum(v) FROM {t}") == [(len(truth), sum(truth.values()))]
    assert_no_prepared(env)


_UTC = dt.UTC
PARAM_KEYS: dict[str, list[Any]] = {
    "timestamptz": [dt.datetime(2020, 1, 1, tzinfo=_UTC) + dt.timedelta(hours=7 * i, microseconds=i) for i in range(24)],
    "timestamp": [dt.datetime(1999, 12, 31, 23) + dt.timedelta(minutes=97 * i) for i in range(24)],
    "numeric": [Decimal(i - 12) / 8 for i in range(23)] + [Decimal("123456789012345678901234567890.5")],
    "double precision": [(i - 12) / 3 for i in range(24)],
    "bytea": [bytes([i, 255 - i]) * (i % 3 + 1) for i in range(24)],
    "boolean": [True, False],
    "date": [dt.date(1999, 12, 1) + dt.timedelta(days=37 * i) for i in range(24)],
}


@pytest.mark.parametrize("pg_type", list(PARAM_KEYS))
def test_binary_parameters_route_every_key_type(env: Env, pg_type: str) -> None:
    """Rows written and read by binary parameters (psycopg's default for these types, asyncpg's
    always) land in PostgreSQL's hash shard and are found again by ``= $1`` and ``= ANY($1)``."""
    t = "feat_pk_" + re.sub(r"\W", "_", pg_type)
    keys = PARAM_KEYS[pg_type]
    env.proxy.execute(f"CREATE TABLE {t} (k {pg_type} PRIMARY KEY, v int)")
    env.q(f"SELECT create_distributed_table('{t}', 'k', shard_count => 6)")
    half = len(keys) // 2
    with env.proxy.cursor() as cur:
        for i, k in enumerate(keys[:half]):
            cur.execute(f"INSERT INTO {t} VALUES (%b, %b)", (k, i))
    p = env.proxy_obj

    async def write_and_read() -> None:
        conn = await asyncpg.connect(host=p.host, port=p.port, user=p.user, password=p.password, database=p.dbname)
        try:
            await conn.executemany(f"INSERT INTO {t} VALUES ($1, $2)", [(k, half + i) for i, k in enumerate(keys[half:])])
            one = await conn.prepare(f"SELECT v FROM {t} WHERE k = $1")
            for i, k in enumerate(keys):
                assert await one.fetchval(k) == i, k
            assert await conn.fetchval(f"SELECT count(*) FROM {t} WHERE k = ANY($1)", keys[::2]) == len(keys[::2])
        finally:
            await conn.close()

    asyncio.run(asyncio.wait_for(write_and_read(), 30))
    assert check_placement(env, t, "k", pg_type) == len(keys)
    with env.proxy.cursor(binary=True) as cur:
        for i, k in enumerate(keys):
            cur.execute(f"SELECT v FROM {t} WHERE k = %s", (k,), prepare=True)
            assert cur.fetchall() == [(i,)], k
        cur.execute(f"SELECT count(*) FROM {t} WHERE k = ANY(%b)", (keys[1::2],))
        assert cur.fetchall() == [(len(keys[1::2]),)]


def test_prepared_statement_after_ddl_behaves_like_postgresql(env: Env) -> None:
    """A prepared ``SELECT *`` whose columns changed by DDL fails with 0A000 as in PostgreSQL
    (asyncpg then re-prepares by itself); it never sends rows of the new shape under the old
    RowDescription. Statements whose columns did not change keep working."""
    t = "feat_shape"
    env.proxy.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v int)")
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 4)")
    env.proxy.execute(f"INSERT INTO {t} VALUES (1, 10), (2, 20)")
    p = env.proxy_obj

    async def run() -> None:
        conn = await asyncpg.connect(host=p.host, port=p.port, user=p.user, password=p.password, database=p.dbname)
        try:
            assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} WHERE id = $1", 1)] == [(1, 10)]
            env.proxy.execute(f"ALTER TABLE {t} ADD COLUMN w text DEFAULT 'new'")
            # asyncpg's statement cache: InvalidCachedStatementError is handled by re-preparing.
            assert [tuple(r) for r in await conn.fetch(f"SELECT * FROM {t} WHERE id = $1", 1)] == [(1, 10, "new")]
        finally:
            await conn.close()

    with psycopg.connect(p.dsn(), autocommit=True) as conn:
        star = f"SELECT * FROM {t} WHERE id = %s"
        cols = f"SELECT id, v FROM {t} WHERE id = %s"
        for sql in (star, cols):
            conn.execute(sql, (2,), prepare=True)
        asyncio.run(asyncio.wait_for(run(), 30))  # adds column w
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="cached plan must not change result type"):
            conn.execute(star, (2,), prepare=True)
        assert conn.execute(cols, (2,), prepare=True).fetchall() == [(2, 20)]
        assert conn.execute(star, (2,), prepare=False).fetchall() == [(2, 20, "new")]  # unnamed: fresh
        multi = f"SELECT * FROM {t} WHERE id > %s ORDER BY id"
        assert conn.execute(multi, (0,), prepare=True).fetchall() == [(1, 10, "new"), (2, 20, "new")]
        env.proxy.execute(f"ALTER TABLE {t} DROP COLUMN v")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            conn.execute(multi, (0,), prepare=True)
        # The DDL on this very connection makes psycopg drop its prepared statements.
        conn.execute(f"ALTER TABLE {t} ADD COLUMN z int")
        assert conn.execute(multi, (0,), prepare=True).fetchall() == [(1, "new", None), (2, "new", None)]


def test_statement_prepared_before_distribution_sees_the_shards(env: Env) -> None:
    """psycopg prepares a statement after 5 runs; distributing the table must not make it wrong."""
    t = "feat_prep_before"
    env.proxy.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v int)")
    env.proxy.execute(f"INSERT INTO {t} VALUES (1, 10), (2, 20)")
    with psycopg.connect(env.proxy_obj.dsn(), autocommit=True) as conn:
        sql = f"SELECT count(*) FROM {t} WHERE id > %s"
        assert conn.execute(sql, (0,), prepare=True).fetchall() == [(2,)]
        env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 4)")
        assert conn.execute(sql, (0,), prepare=True).fetchall() == [(2,)]


def test_repeated_literal_shapes_answer_like_the_first(env: Env) -> None:
    """The simple-Query path skips the parse for a text whose shape (constants aside) was seen
    before as one distributed statement: each such text still routes by its own constants, fails
    with its own error, and reads its own writes inside a block; a catalog change (the table
    undistributed) is seen at once. Compared with the same statements on a plain table."""
    t = "feat_shapes"
    env.proxy.execute(f"DROP TABLE IF EXISTS {t}, {t}_plain")
    env.proxy.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text NOT NULL)")
    env.proxy.execute(f"CREATE TABLE {t}_plain (id int PRIMARY KEY, v text NOT NULL)")  # metadata node only
    env.q(f"SELECT create_distributed_table('{t}', 'id', shard_count => 6)")

    def both(sql: str) -> None:
        """Run ``sql`` (simple protocol) on both tables: the same rows or the same SQLSTATE."""
        out = []
        for table in (t, f"{t}_plain"):
            cur = psycopg.ClientCursor(env.proxy)
            try:
                cur.execute(sql.format(t=table))
                out.append(("ok", cur.statusmessage, cur.fetchall() if cur.description else None))
            except psycopg.Error as exc:
                out.append(("error", exc.sqlstate, None))
        assert out[0] == out[1], sql

    for i in range(12):  # every shard, the same three shapes over and over
        both(f"INSERT INTO {{t}} VALUES ({i}, 'v{i}')")
        both(f"SELECT v FROM {{t}} WHERE id = {i}")
        both(f"UPDATE {{t}} SET v = v || '!' WHERE id = {i} RETURNING id, v")
    both("INSERT INTO {t} VALUES (3, 'dup')")  # 23505 on the shape seen 12 times
    both("SELECT v FROM {t} WHERE id = 'x'")  # 22P02
    both("SELECT v FROM {t} WHERE id = 99")  # no row
    env.proxy.execute("BEGIN")
    try:
        both("INSERT INTO {t} VALUES (100, 'in block')")
        both("SELECT v FROM {t} WHERE id = 100")
    finally:
        env.proxy.execute("ROLLBACK")
    both("SELECT v FROM {t} WHERE id = 100")
    env.q(f"SELECT undistribute_table('{t}')")
    both("SELECT v FROM {t} WHERE id = 5")
    assert node_rows(env.metadata, f"SELECT count(*) FROM {t}") == [(12,)]  # local again
    env.proxy.execute(f"DROP TABLE IF EXISTS {t}, {t}_plain")


def test_loads_give_their_node_connections_back(env: Env, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each COPY FROM and routed INSERT ... SELECT returns its node connections to the pool: with
    two connections per node, ten loads in a row must not wait for a free one (53300)."""
    from proxyproc import start_proxy

    small = start_proxy(
        tmp_path_factory.mktemp("smallpool"), env.cluster, name="smallpool",
        backend={"pool_size": 2, "acquire_timeout": 3},
    )
    t = "feat_pool_loads"
    try:
        with psycopg.connect(small.dsn(), autocommit=True) as c:
            c.execute(f"DROP TABLE IF EXISTS {t}, {t}_src")
            c.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v int)")
            c.execute(f"SELECT create_distributed_table('{t}', 'id', shard_count => 6)")
            c.execute(f"CREATE TABLE {t}_src (id int PRIMARY KEY, v int)")  # local: routed by the proxy
            for k in range(10):
                with c.cursor().copy(f"COPY {t} FROM STDIN") as cp:
                    for i in range(k * 100, k * 100 + 50):
                        cp.write_row((i, k))
                c.execute(f"INSERT INTO {t}_src SELECT g, {k} FROM generate_series({k * 100 + 50}, {k * 100 + 99}) g")
                c.execute(f"INSERT INTO {t} SELECT * FROM {t}_src WHERE v = {k}")
            assert c.execute(f"SELECT count(*), count(DISTINCT v) FROM {t}").fetchone() == (1000, 10)
            c.execute(f"DROP TABLE {t}, {t}_src")
    finally:
        small.stop()
