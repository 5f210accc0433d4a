"""Size functions through the proxy: hypertable_size, hypertable_detailed_size,
chunks_detailed_size, chunk_compression_stats, hypertable_compression_stats.

Every figure is checked against what the nodes themselves report for the same relations (the
chunks, found on the nodes as partitions of the shard tables, their ``_compressed`` companions,
and the logical table on the metadata node). Tables are named ``hs_*`` (unique to this module).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from clusterenv import ClusterEnv
from proxyproc import ProxyProcess

from orochi_proxy.localcluster import LocalCluster
from policies.compression import compressed_table_name

Size = tuple[int, int, int, int]  # table, index, toast, total bytes

SIZE_SQL = (
    "SELECT pg_total_relation_size(c.oid) - pg_indexes_size(c.oid) - COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0), "
    "pg_indexes_size(c.oid), COALESCE(pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0), pg_total_relation_size(c.oid) "
    "FROM pg_class c WHERE c.oid = to_regclass(%s)"
)


class Env(ClusterEnv):
    def __init__(self, proxy: ProxyProcess, cluster: LocalCluster) -> None:
        super().__init__(proxy, cluster)
        self.by_address = {f"{n.host}:{n.port}": c for n, c in zip(cluster.nodes, self.nodes, strict=True)}
        # The proxy's metadata database is node 0 (tests/proxyproc.py).
        self.metadata = psycopg.connect(cluster.nodes[0].dsn(), autocommit=True)

    def chunks_on_nodes(self, table: str) -> dict[str, list[str]]:
        """node address -> qualified names of the partitions of the table's shards there."""
        out: dict[str, list[str]] = {}
        for address, conn in self.by_address.items():
            out[address] = [r[0] for r in conn.execute(
                "SELECT n.nspname || '.' || c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_class p ON p.oid = i.inhparent "
                "WHERE p.relname LIKE %s AND c.relkind = 'r' ORDER BY 1",
                (f"{table}\\_%",),
            ).fetchall()]
        return out


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, proxy: ProxyProcess) -> Iterator[Env]:
    e = Env(proxy, cluster)
    e.register_nodes()
    try:
        yield e
    finally:
        for (name,) in e.q("SELECT hypertable_name FROM timescaledb_information.hypertables WHERE hypertable_name LIKE 'hs\\_%'"):
            e.q(f"DROP TABLE IF EXISTS {name}")
        e.q("DROP TABLE IF EXISTS hs_plain")
        e.metadata.close()
        e.close()


def rel_size(conn: psycopg.Connection[Any], name: str) -> Size:
    """What a node reports for one relation; zeros if it does not exist there."""
    row = conn.execute(SIZE_SQL, (name,)).fetchone()
    return (0, 0, 0, 0) if row is None else (int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def add(*sizes: Size) -> Size:
    return (sum(s[0] for s in sizes), sum(s[1] for s in sizes), sum(s[2] for s in sizes), sum(s[3] for s in sizes))


def companion(chunk: str) -> str:
    schema, name = chunk.split(".")
    return f"{schema}.{compressed_table_name(name)}"


def stable(direct: Callable[[], Any], proxy: Callable[[], Any]) -> tuple[Any, Any]:
    """(node figures, proxy figures) read with nothing changing in between.

    The node figures are read before and after the proxy's; if they differ (autovacuum made a
    free-space map between the reads), read again. So equality is a real check, never a race.
    """
    for _ in range(5):
        before = direct()
        via_proxy = proxy()
        if direct() == before:
            return before, via_proxy
    raise AssertionError("the nodes' sizes kept changing")


def chunk_names(env: Env, table: str) -> list[str]:
    return [r[0] for r in env.q(f"SELECT show_chunks('{table}')")]


def sizes_by_chunk(env: Env, table: str) -> list[tuple[str, int]]:
    """(chunk name, total bytes) from chunks_detailed_size (called on its own, as the proxy requires)."""
    return sorted((r[1], r[5]) for r in env.q(f"SELECT * FROM chunks_detailed_size('{table}')"))


def compression_row(env: Env, chunk: str) -> tuple[Any, ...]:
    """The chunk_compression_stats row of one chunk (schema-qualified name)."""
    schema, name = chunk.split(".")
    (row,) = [r for r in env.q("SELECT * FROM chunk_compression_stats('hs_comp')") if r[:2] == (schema, name)]
    return row


def test_sizes_equal_what_the_nodes_report(env: Env) -> None:
    env.q("CREATE TABLE hs_space (time timestamptz NOT NULL, device int NOT NULL, value float8, note text)")
    env.q("SELECT create_hypertable('hs_space', 'time', 'device', 3, chunk_time_interval => INTERVAL '1 day')")
    env.q(
        "INSERT INTO hs_space SELECT timestamptz '2024-03-01' + g * interval '1 minute', g % 6, g, repeat('x', g % 50) "
        "FROM generate_series(0, 3 * 1440 - 1) g"
    )
    on_nodes = env.chunks_on_nodes("hs_space")
    holders = sorted(a for a, names in on_nodes.items() if names)
    assert len(holders) >= 2  # the space partitions spread the chunks over the nodes
    assert sorted(n for names in on_nodes.values() for n in names) == sorted(chunk_names(env, "hs_space"))

    # chunks_detailed_size: each chunk on the node that holds it, with that node's figures.
    def direct_chunks() -> list[tuple[Any, ...]]:
        return sorted(
            (*name.split("."), *add(rel_size(env.by_address[a], name), rel_size(env.by_address[a], companion(name))), a)
            for a, names in on_nodes.items() for name in names
        )

    nodes_view, proxy_view = stable(direct_chunks, lambda: sorted(env.q("SELECT * FROM chunks_detailed_size('hs_space')")))
    assert proxy_view == nodes_view
    assert all(r[5] == r[2] + r[3] + r[4] and r[5] > 0 and r[3] > 0 for r in proxy_view)  # every chunk has the time index

    # hypertable_detailed_size: one row per node holding shards (its chunks and shard tables),
    # one for the logical table in the metadata database (node_name NULL).
    shards_by_node = {
        a: [r[0] for r in conn.execute(
            "SELECT n.nspname || '.' || c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relname ~ '^hs_space_[0-9]+$' AND c.relkind = 'p'"
        ).fetchall()]
        for a, conn in env.by_address.items()
    }

    def direct_detailed() -> list[tuple[Any, ...]]:
        rows = []
        for a, conn in env.by_address.items():
            if not shards_by_node[a]:
                continue
            parts = [rel_size(conn, n) for n in shards_by_node[a]]
            parts += [rel_size(conn, n) for name in on_nodes[a] for n in (name, companion(name))]
            rows.append((*add(*parts), a))
        rows.append((*rel_size(env.metadata, "public.hs_space"), None))
        return sorted(rows, key=lambda r: (r[4] is None, r[4] or ""))

    nodes_view, proxy_view = stable(
        direct_detailed, lambda: sorted(env.q("SELECT * FROM hypertable_detailed_size('hs_space')"), key=lambda r: (r[4] is None, r[4] or ""))
    )
    assert proxy_view == nodes_view
    assert sum(len(v) for v in shards_by_node.values()) == 3
    assert proxy_view[-1][4] is None and proxy_view[-1][1] > 0  # the logical table's index has pages

    # hypertable_size: the sum of total_bytes, i.e. every byte the nodes hold for the table.
    total, (size,) = stable(lambda: sum(r[3] for r in direct_detailed()), lambda: env.q("SELECT hypertable_size('hs_space')")[0])
    assert size == total
    # The single-column form and the composite form give the same numbers.
    records = env.q("SELECT hypertable_detailed_size('hs_space')")
    as_text = sorted((tuple(None if v is None else str(v) for v in r) for r in proxy_view), key=str)
    assert sorted((r[0] for r in records), key=str) == as_text


def test_sizes_grow_with_inserts_and_new_chunks(env: Env) -> None:
    env.q("CREATE TABLE hs_grow (time timestamptz NOT NULL, v int)")
    env.q("SELECT create_hypertable('hs_grow', by_range('time', INTERVAL '1 day'))")
    (empty,) = env.q("SELECT hypertable_size('hs_grow')")[0]
    assert env.q("SELECT * FROM chunks_detailed_size('hs_grow')") == []
    # No chunk yet: the empty shard table (no storage) and the logical table's index pages.
    assert empty == rel_size(env.metadata, "public.hs_grow")[3] > 0
    assert [(r[3], r[4] is None) for r in env.q("SELECT * FROM hypertable_detailed_size('hs_grow')")] == [(0, False), (empty, True)]

    env.q("INSERT INTO hs_grow SELECT timestamptz '2024-04-01' + g * interval '1 second', g FROM generate_series(0, 9999) g")
    (one_chunk,) = env.q("SELECT hypertable_size('hs_grow')")[0]
    ((first, before),) = sizes_by_chunk(env, "hs_grow")
    assert one_chunk > empty and before > 0

    env.q("INSERT INTO hs_grow SELECT timestamptz '2024-04-01 05:00' + g * interval '1 second', g FROM generate_series(0, 9999) g")
    ((same, grown),) = sizes_by_chunk(env, "hs_grow")
    assert same == first and grown > before

    env.q("INSERT INTO hs_grow VALUES ('2024-04-03 00:00+00', 1)")  # a new chunk
    rows = sizes_by_chunk(env, "hs_grow")
    assert len(rows) == 2 and dict(rows)[first] >= grown
    (two_chunks,) = env.q("SELECT hypertable_size('hs_grow')")[0]
    assert two_chunks > one_chunk

    # Through the extended protocol with binary results, as drivers fetch them.
    with psycopg.connect(env.proxy.dsn(), autocommit=True) as c:
        cur = c.cursor(binary=True)
        assert cur.execute("SELECT hypertable_size(%s)", ("hs_grow",)).fetchone() == (two_chunks,)
        binary_rows = cur.execute("SELECT * FROM chunks_detailed_size(%s)", ("hs_grow",)).fetchall()
        assert sorted((r[1], r[5]) for r in binary_rows) == sorted(rows)
        assert all(r[0] == "_timescaledb_internal" and r[6] in env.by_address for r in binary_rows)


def test_not_a_hypertable_null_and_missing(env: Env) -> None:
    env.q("CREATE TABLE hs_plain (id int PRIMARY KEY)")
    # TimescaleDB's functions are STRICT and skip tables that are not hypertables.
    assert env.q("SELECT hypertable_size('hs_plain')") == [(None,)]
    assert env.q("SELECT hypertable_size(NULL)") == [(None,)]
    for fn in ("hypertable_detailed_size", "chunks_detailed_size", "chunk_compression_stats", "hypertable_compression_stats"):
        assert env.q(f"SELECT * FROM {fn}('hs_plain')") == []
    with pytest.raises(psycopg.Error) as err:
        env.q("SELECT hypertable_size('hs_no_such_table')")
    assert err.value.diag.sqlstate == "42P01"


def test_compression_stats_before_and_after(env: Env) -> None:
    env.q("CREATE TABLE hs_comp (time timestamptz NOT NULL, device int NOT NULL, cpu float8, temp float8)")
    env.q("SELECT create_hypertable('hs_comp', 'time', chunk_time_interval => INTERVAL '1 day')")
    env.q(
        "INSERT INTO hs_comp SELECT timestamptz '2024-05-01' + g * interval '5 seconds', g % 10, "
        "round((50 + 40 * sin(g / 500.0))::numeric, 1), round((20 + (g % 300) / 100.0)::numeric, 2) "
        "FROM generate_series(0, 2 * 17280 - 1) g"
    )
    # Compression not enabled: no rows, as TimescaleDB.
    assert env.q("SELECT * FROM chunk_compression_stats('hs_comp')") == []
    assert env.q("SELECT * FROM hypertable_compression_stats('hs_comp')") == []
    env.q("ALTER TABLE hs_comp SET (timescaledb.compress, timescaledb.compress_segmentby = 'device')")
    chunks = chunk_names(env, "hs_comp")
    assert len(chunks) == 2
    stats = sorted(env.q("SELECT * FROM chunk_compression_stats('hs_comp')"))
    assert [r[2] for r in stats] == ["Uncompressed", "Uncompressed"]
    assert all(v is None for r in stats for v in r[3:11])
    (summary,) = env.q("SELECT * FROM hypertable_compression_stats('hs_comp')")
    assert summary[:2] == (2, 0) and all(v is None for v in summary[2:10])

    (address,) = {r[6] for r in env.q("SELECT * FROM chunks_detailed_size('hs_comp')")}
    node = env.by_address[address]
    target = chunks[0]
    # VACUUM first so autovacuum has nothing left to add between this reading and the proxy's.
    node.execute(f"VACUUM {target}")
    heap_before = rel_size(node, target)
    size_before = env.q("SELECT hypertable_size('hs_comp')")[0][0]
    env.q(f"SELECT compress_chunk('{target}')")

    stats = {r[1]: r for r in env.q("SELECT * FROM chunk_compression_stats('hs_comp')")}
    row = stats[target.split(".")[1]]
    assert row[2] == "Compressed" and row[11] == address
    assert row[3:7] == (None, None, None, heap_before[3])  # only the total is recorded
    comp_now, after = stable(lambda: rel_size(node, companion(target)), lambda: compression_row(env, target)[7:11])
    assert comp_now[3] > 0 and row[7:11] == comp_now == after
    assert row[10] * 5 < row[6], row  # compressed: several times smaller than the heap was
    other = stats[chunks[1].split(".")[1]]
    assert other[2] == "Uncompressed" and all(v is None for v in other[3:11])
    (summary,) = env.q("SELECT * FROM hypertable_compression_stats('hs_comp')")
    assert summary == (2, 1, None, None, None, heap_before[3], *comp_now, address)
    # The chunk's own size now counts its (emptied) heap part and its segments.
    heap_now = rel_size(node, target)
    detailed = {r[1]: r for r in env.q("SELECT * FROM chunks_detailed_size('hs_comp')")}
    assert detailed[target.split(".")[1]][2:6] == add(heap_now, comp_now)
    assert env.q("SELECT hypertable_size('hs_comp')")[0][0] < size_before

    # Rows inserted into the compressed range and compressed later keep the recorded figure.
    env.q("INSERT INTO hs_comp VALUES ('2024-05-01 00:00:01+00', 3, 1.5, 2.5)")
    env.q(f"SELECT compress_chunk('{target}', recompress => true)")
    row = compression_row(env, target)
    assert row[6] == heap_before[3]
    assert row[7:11] == rel_size(node, companion(target))

    # Decompressed: Uncompressed again, NULL sizes; compressing anew records the heap anew.
    env.q(f"SELECT decompress_chunk('{target}')")
    row = compression_row(env, target)
    assert row[2] == "Uncompressed" and all(v is None for v in row[3:11])
    node.execute(f"VACUUM {target}")
    heap_again = rel_size(node, target)
    env.q(f"SELECT compress_chunk('{target}')")
    row = compression_row(env, target)
    assert row[2] == "Compressed" and row[6] == heap_again[3] and row[10] < row[6]
    assert env.q("SELECT count(*) FROM hs_comp") == [(2 * 17280 + 1,)]
