"""Size functions with TimescaleDB's names and result columns: hypertable_size,
hypertable_detailed_size, chunks_detailed_size, hypertable_compression_stats,
chunk_compression_stats.

A hypertable's bytes are spread over several servers, so every figure is measured where the
relation lives, in one query per node (``pg_total_relation_size``, ``pg_indexes_size`` and the
TOAST relation's total, as TimescaleDB's ``relation_size`` does; ``table_bytes`` is the total
less indexes and TOAST, so it includes the free-space and visibility maps):

* on the node of each shard: the shard table (a partitioned table: no storage of its own), its
  chunks and their ``<chunk>_compressed`` companions (the warm tier's segments);
* in the metadata database: the logical table the clients see (empty, but its indexes have
  pages), TimescaleDB's "access node".

Rows per node follow TimescaleDB's distributed hypertables: ``node_name`` is the node's
``host:port`` (as in ``citus_nodes``), and NULL for the metadata database's row.
``hypertable_size`` is the sum of ``hypertable_detailed_size``'s ``total_bytes``, as there.

Compression statistics: the "after" side of a compressed chunk is its companion table, measured
now. The "before" side cannot be measured once the rows are segments, so ``compress_chunk``
records the chunk's total size just before it moves them (``orochi_catalog.chunks.size_bytes``);
only that total is kept, so ``before_compression_table/index/toast_bytes`` are NULL. Rows
inserted into a compressed chunk and compressed later do not change the recorded figure.

Like TimescaleDB's (STRICT) functions, a NULL argument or a table that is not a hypertable
gives NULL / no rows, and a name that is no relation gives 42P01.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orochi_proxy.catalog import SCHEMA
from orochi_proxy.distribute import resolve_table
from orochi_proxy.localexec import INT8, NAME, TEXT, ParamSpec, admin_function
from rewriter.model import TableInfo
from rewriter.quoting import qualified_name, quote_literal

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session


@dataclass(frozen=True)
class RelSize:
    """Bytes of one relation (or a sum of relations), split as TimescaleDB reports them."""

    table: int = 0
    index: int = 0
    toast: int = 0

    @property
    def total(self) -> int:
        return self.table + self.index + self.toast

    def __add__(self, other: RelSize) -> RelSize:
        return RelSize(self.table + other.table, self.index + other.index, self.toast + other.toast)


ZERO = RelSize()


def _size_sql(names: list[str]) -> str:
    """One row (ordinal, total, indexes, toast) per relation name; a missing relation gives zeros.

    ``to_regclass`` rather than a cast: a chunk dropped while we measure must not fail the call.
    """
    array = "ARRAY[" + ", ".join(quote_literal(n) for n in names) + "]::text[]"
    return (
        "SELECT r.i, COALESCE(pg_catalog.pg_total_relation_size(c.oid), 0), "
        "COALESCE(pg_catalog.pg_indexes_size(c.oid), 0), "
        "COALESCE(pg_catalog.pg_total_relation_size(NULLIF(c.reltoastrelid, 0)), 0) "
        f"FROM unnest({array}) WITH ORDINALITY AS r(name, i) "
        "LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(r.name) ORDER BY r.i"
    )


def _rel_size(total: int, index: int, toast: int) -> RelSize:
    return RelSize(total - index - toast, index, toast)


async def _measure_on_node(server: ProxyServer, node: int, database: str, names: list[str]) -> list[RelSize]:
    """Sizes of ``names`` (qualified, quoted) on one node, in order."""
    if not names:
        return []
    pool = server.node_pool(node, database)
    conn = await pool.acquire()
    try:
        rows = await conn.simple_query(_size_sql(names))
    finally:
        pool.release(conn, reset=not conn.usable)
    return [_rel_size(int(r[1]), int(r[2]), int(r[3])) for r in rows]  # type: ignore[arg-type]


@dataclass
class Measured:
    """What one call measured: per chunk its heap part and its companion, per node the shards."""

    chunks: dict[int, tuple[RelSize, RelSize]]  # chunk_id -> (chunk heap part, companion)
    shards: dict[int, RelSize]  # node id -> sum of the shard tables on it
    nodes: list[int]  # nodes that hold a shard of the hypertable, in id order


async def measure(server: ProxyServer, database: str, table: TableInfo) -> Measured:
    """Measure every relation of the hypertable on its node (the nodes in parallel)."""
    ht = table.hypertable
    assert ht is not None
    per_node: dict[int, list[tuple[str, int, str]]] = defaultdict(list)  # node -> (kind, id, name)
    for shard in table.shards:
        per_node[shard.node_ids[0]].append(("shard", shard.shard_id, qualified_name(table.schema, table.shard_name(shard))))
    for c in ht.chunks:
        node = table.chunk_node(c)
        per_node[node].append(("chunk", c.chunk_id, c.qualified))
        per_node[node].append(("companion", c.chunk_id, c.compressed_qualified))
    nodes = sorted(per_node)
    results = await asyncio.gather(
        *(_measure_on_node(server, n, database, [name for _, _, name in per_node[n]]) for n in nodes)
    )
    chunks: dict[int, list[RelSize]] = defaultdict(lambda: [ZERO, ZERO])
    shards: dict[int, RelSize] = {}
    for node, sizes in zip(nodes, results, strict=True):
        shards[node] = ZERO
        for (kind, ident, _), size in zip(per_node[node], sizes, strict=True):
            if kind == "shard":
                shards[node] += size
            else:
                chunks[ident][0 if kind == "chunk" else 1] = size
    return Measured({k: (v[0], v[1]) for k, v in chunks.items()}, shards, nodes)


async def _logical_size(session: Session, table: TableInfo) -> RelSize:
    """The logical table in the metadata database (the client session's own connection)."""
    rows = await session.dist.text_rows(_size_sql([qualified_name(table.schema, table.name)]))
    _, total, index, toast = rows[0]
    return _rel_size(int(total or 0), int(index or 0), int(toast or 0))


async def _hypertable(server: ProxyServer, session: Session, relation: str | None) -> TableInfo | None:
    """The hypertable ``relation`` names; None for NULL or a table that is not one (42P01 if no
    such relation, as the regclass argument of TimescaleDB's functions gives)."""
    if relation is None:
        return None
    schema, name = await resolve_table(session, relation)
    table = server.catalog.model.tables.get((schema, name))
    return table if table is not None and table.hypertable is not None else None


def _node_name(server: ProxyServer, node: int) -> str:
    return server.catalog.node(node).address


async def detailed_rows(server: ProxyServer, session: Session, table: TableInfo) -> list[tuple[Any, ...]]:
    """hypertable_detailed_size rows: one per node holding shards, then the metadata database's."""
    ht = table.hypertable
    assert ht is not None
    m, logical = await asyncio.gather(measure(server, session.database, table), _logical_size(session, table))
    per_node = dict(m.shards)
    for c in ht.chunks:
        heap, comp = m.chunks.get(c.chunk_id, (ZERO, ZERO))
        per_node[table.chunk_node(c)] += heap + comp
    out: list[tuple[Any, ...]] = []
    for node in m.nodes:
        s = per_node[node]
        out.append((s.table, s.index, s.toast, s.total, _node_name(server, node)))
    out.append((logical.table, logical.index, logical.toast, logical.total, None))
    return out


_SIZE_PARAMS = [ParamSpec("hypertable", TEXT)]


@admin_function("hypertable_size", _SIZE_PARAMS, [("hypertable_size", INT8)], needs_session=True)
async def hypertable_size(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Total bytes of a hypertable: its chunks (heap and compressed parts, indexes, TOAST) on
    every node plus the logical table; NULL if the table is not a hypertable."""
    table = await _hypertable(server, session, a["hypertable"])
    if table is None:
        return [(None,)]
    return [(sum(r[3] for r in await detailed_rows(server, session, table)),)]


@admin_function(
    "hypertable_detailed_size",
    _SIZE_PARAMS,
    [("table_bytes", INT8), ("index_bytes", INT8), ("toast_bytes", INT8), ("total_bytes", INT8), ("node_name", NAME)],
    needs_session=True,
)
async def hypertable_detailed_size(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Table, index, TOAST and total bytes of a hypertable, one row per node that holds its
    shards (node_name host:port) and one for the logical table (node_name NULL)."""
    table = await _hypertable(server, session, a["hypertable"])
    if table is None:
        return []
    return await detailed_rows(server, session, table)


@admin_function(
    "chunks_detailed_size",
    _SIZE_PARAMS,
    [
        ("chunk_schema", NAME), ("chunk_name", NAME), ("table_bytes", INT8), ("index_bytes", INT8),
        ("toast_bytes", INT8), ("total_bytes", INT8), ("node_name", NAME),
    ],
    needs_session=True,
)
async def chunks_detailed_size(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Bytes of each chunk on its node; a compressed chunk counts its heap part and its
    segments (the companion table), as TimescaleDB adds the compressed chunk to the chunk."""
    table = await _hypertable(server, session, a["hypertable"])
    if table is None:
        return []
    ht = table.hypertable
    assert ht is not None
    m = await measure(server, session.database, table)
    out: list[tuple[Any, ...]] = []
    for c in ht.chunks:
        heap, comp = m.chunks.get(c.chunk_id, (ZERO, ZERO))
        s = heap + comp
        out.append((c.schema, c.name, s.table, s.index, s.toast, s.total, _node_name(server, table.chunk_node(c))))
    return out


_STATS_SIZES = [
    ("before_compression_table_bytes", INT8), ("before_compression_index_bytes", INT8),
    ("before_compression_toast_bytes", INT8), ("before_compression_total_bytes", INT8),
    ("after_compression_table_bytes", INT8), ("after_compression_index_bytes", INT8),
    ("after_compression_toast_bytes", INT8), ("after_compression_total_bytes", INT8),
    ("node_name", NAME),
]


async def compression_rows(server: ProxyServer, session: Session, table: TableInfo) -> list[tuple[Any, ...]]:
    """chunk_compression_stats rows (no rows when compression is not enabled, as TimescaleDB)."""
    ht = table.hypertable
    assert ht is not None
    if ht.compression is None:
        return []
    warm = [c for c in ht.chunks if c.tier == "warm"]
    recorded: dict[int, int] = {}
    if warm:
        ids = ", ".join(str(c.chunk_id) for c in warm)
        for chunk_id, size in await session.dist.text_rows(
            f"SELECT chunk_id, size_bytes FROM {SCHEMA}.chunks WHERE chunk_id IN ({ids}) AND size_bytes IS NOT NULL"
        ):
            recorded[int(chunk_id or 0)] = int(size or 0)
    m = await measure(server, session.database, table)
    out: list[tuple[Any, ...]] = []
    for c in ht.chunks:
        node = _node_name(server, table.chunk_node(c))
        if c.tier != "warm":
            out.append((c.schema, c.name, "Uncompressed", None, None, None, None, None, None, None, None, node))
            continue
        after = m.chunks.get(c.chunk_id, (ZERO, ZERO))[1]
        out.append((
            c.schema, c.name, "Compressed", None, None, None, recorded.get(c.chunk_id),
            after.table, after.index, after.toast, after.total, node,
        ))
    return out


@admin_function(
    "chunk_compression_stats",
    _SIZE_PARAMS,
    [("chunk_schema", NAME), ("chunk_name", NAME), ("compression_status", TEXT), *_STATS_SIZES],
    needs_session=True,
)
async def chunk_compression_stats(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Per chunk: Compressed/Uncompressed, the size before compression (total only, recorded by
    compress_chunk) and the compressed segments' size now; NULLs for uncompressed chunks."""
    table = await _hypertable(server, session, a["hypertable"])
    if table is None:
        return []
    return await compression_rows(server, session, table)


def _sum(values: list[int | None]) -> int | None:
    """SQL's sum(): NULL when every value is NULL."""
    present = [v for v in values if v is not None]
    return sum(present) if present else None


@admin_function(
    "hypertable_compression_stats",
    _SIZE_PARAMS,
    [("total_chunks", INT8), ("number_compressed_chunks", INT8), *_STATS_SIZES],
    needs_session=True,
)
async def hypertable_compression_stats(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """chunk_compression_stats summed per node (TimescaleDB groups by node_name the same way)."""
    table = await _hypertable(server, session, a["hypertable"])
    if table is None:
        return []
    by_node: dict[str, list[tuple[Any, ...]]] = {}
    for row in await compression_rows(server, session, table):
        by_node.setdefault(row[-1], []).append(row)
    out: list[tuple[Any, ...]] = []
    for node, rows in by_node.items():
        sums = [_sum([r[i] for r in rows]) for i in range(3, 11)]
        out.append((len(rows), sum(1 for r in rows if r[2] == "Compressed"), *sums, node))
    return out
