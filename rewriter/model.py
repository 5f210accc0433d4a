"""The catalog's view of distributed and reference tables, as the planner sees it (pure data).

The catalog (``orochi_proxy.catalog``) loads these from the metadata database; the rewriter
plans with them; nothing here does I/O.

* A **hash-distributed** table has ``shard_count`` shards; shard ``i`` holds the rows whose
  distribution-column value has PostgreSQL hash-partition slot ``i`` (``rewriter.hashing``) and
  lives on one node. Tables in one colocation group place shard ``i`` on the same node.
* A **reference** table has one shard with a placement on every node.

Shard tables are ordinary tables ``<schema>.<table>_<shardid>`` on their node.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property

MAX_IDENTIFIER = 63  # NAMEDATALEN - 1


def bounded_name(base: str, suffix: str) -> str:
    """``<base><suffix>``; past 63 bytes the base is cut and a stable hash of it added, so the
    name stays unique and the same in every process (shard tables, compressed chunks)."""
    name = base + suffix
    if len(name.encode()) <= MAX_IDENTIFIER:
        return name
    import hashlib

    digest = hashlib.md5(base.encode()).hexdigest()[:8]
    room = MAX_IDENTIFIER - len(suffix) - len(digest) - 1
    head = base.encode()[:room].decode(errors="ignore")
    return f"{head}_{digest}{suffix}"


def compressed_table_name(chunk_name: str) -> str:
    """``<chunk>_compressed``: a compressed chunk's companion table of segments."""
    return bounded_name(chunk_name, "_compressed")


def shard_table_name(table: str, shard_id: int) -> str:
    """``<table>_<shardid>``, shortened (with a stable hash) when it would exceed 63 bytes."""
    return bounded_name(table, f"_{shard_id}")


@dataclass(frozen=True, slots=True)
class Shard:
    shard_id: int
    index: int  # hash slot (0 for a reference table)
    node_ids: tuple[int, ...]  # one for a distributed table, every node for a reference table


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One chunk: the partition of shard ``shard_index`` for times ``[range_start, range_end)``.

    Ranges are in the internal form of :mod:`rewriter.timerange` (microseconds since 1970 UTC for
    time types, the integer itself for integer types). ``tier``: ``hot`` (heap partition),
    ``warm`` (compressed; the partition keeps rows inserted later), ``cold`` (object storage).
    """

    chunk_id: int
    shard_index: int
    range_start: int
    range_end: int
    schema: str
    name: str
    tier: str = "hot"

    @property
    def qualified(self) -> str:
        from rewriter.quoting import qualified_name

        return qualified_name(self.schema, self.name)

    @property
    def compressed_qualified(self) -> str:
        """The qualified name of its companion table of compressed segments."""
        from rewriter.quoting import qualified_name

        return qualified_name(self.schema, compressed_table_name(self.name))


@dataclass(frozen=True)
class HypertableInfo:
    """The time dimension (and optional space dimension) of a hypertable, and its chunks.

    A hypertable is also a hash-distributed :class:`TableInfo`: by its space column over
    ``space_partitions`` shards, or by its time column over one shard. On its node each shard is
    a table partitioned by range of the time column; the chunks are its partitions.
    """

    hypertable_id: int
    time_column: str
    time_type: str  # canonical: timestamptz | timestamp | date | smallint | integer | bigint
    chunk_interval: int  # internal units
    space_column: str | None = None
    space_partitions: int | None = None
    chunks: tuple[ChunkInfo, ...] = ()
    compression: dict | None = field(default=None, compare=False, hash=False)

    @cached_property
    def known_chunks(self) -> frozenset[tuple[int, int]]:
        """(shard index, range start) of every chunk: the insert path's "exists?" check."""
        return frozenset((c.shard_index, c.range_start) for c in self.chunks)

    @cached_property
    def _by_shard(self) -> dict[int, tuple[list[int], list[ChunkInfo]]]:
        out: dict[int, tuple[list[int], list[ChunkInfo]]] = {}
        for c in sorted(self.chunks, key=lambda c: c.range_start):
            starts, chunks = out.setdefault(c.shard_index, ([], []))
            starts.append(c.range_start)
            chunks.append(c)
        return out

    def chunk_containing(self, shard_index: int, value: int) -> ChunkInfo | None:
        """The chunk of this shard whose range holds internal ``value`` (None: not created yet)."""
        starts, chunks = self._by_shard.get(shard_index, ((), ()))  # type: ignore[assignment]
        i = bisect_right(starts, value) - 1
        if i >= 0 and chunks[i].range_end > value:
            return chunks[i]
        return None

    def new_chunk_range(self, shard_index: int, value: int) -> tuple[int, int]:
        """The range a new chunk for ``value`` gets: the interval's slot, cut where it would
        overlap an existing chunk of the shard (after ``set_chunk_time_interval`` the old
        chunks keep their ranges, as in TimescaleDB)."""
        from rewriter.timerange import chunk_range

        lo, hi = chunk_range(value, self.chunk_interval, self.time_type)
        starts, chunks = self._by_shard.get(shard_index, ((), ()))  # type: ignore[assignment]
        i = bisect_right(starts, value) - 1
        if i >= 0:
            lo = max(lo, chunks[i].range_end)
        if i + 1 < len(chunks):
            hi = min(hi, chunks[i + 1].range_start)
        return lo, hi

    def shard_chunks(self, shard_index: int) -> list[ChunkInfo]:
        return list(self._by_shard.get(shard_index, ((), []))[1])

    @property
    def is_time_type(self) -> bool:
        return self.time_type in ("timestamptz", "timestamp", "date")


@dataclass(frozen=True)
class TableInfo:
    schema: str
    name: str
    kind: str  # "hash" | "reference"
    dist_column: str | None
    dist_type: str | None  # canonical type name of the distribution column
    colocation_id: int
    shards: tuple[Shard, ...]
    columns: tuple[str, ...] = ()  # column names in table order (for INSERT without a column list)
    # Columns fed by a sequence (serial, identity, nextval default) -> the SQL that yields the
    # next value on the metadata node; shards have no sequences, so the proxy fills these.
    fill: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    shard_names: dict[int, str] = field(default_factory=dict, compare=False, hash=False)
    hypertable: HypertableInfo | None = field(default=None, compare=False, hash=False)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def is_reference(self) -> bool:
        return self.kind == "reference"

    @property
    def shard_count(self) -> int:
        return len(self.shards)

    def chunk_node(self, chunk: ChunkInfo) -> int:
        """The node holding ``chunk`` (its shard's placement)."""
        return self.shards[chunk.shard_index].node_ids[0]

    def shard_name(self, shard: Shard) -> str:
        name = self.shard_names.get(shard.shard_id)
        if name is None:
            name = self.shard_names[shard.shard_id] = shard_table_name(self.name, shard.shard_id)
        return name


@dataclass(frozen=True)
class ClusterModel:
    """Everything the planner needs: tables by (schema, name) and the catalog version."""

    version: int
    tables: dict[tuple[str, str], TableInfo]
    node_ids: tuple[int, ...]
    aggregate_names: frozenset[str] = frozenset()  # every aggregate function name in the database

    def lookup(self, schema: str | None, name: str, search_path: tuple[str, ...]) -> TableInfo | None:
        if schema is not None:
            return self.tables.get((schema, name))
        for s in search_path:
            t = self.tables.get((s, name))
            if t is not None:
                return t
        return None

    @property
    def table_names(self) -> frozenset[str]:
        return frozenset(name for _, name in self.tables)
