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

from dataclasses import dataclass, field

MAX_IDENTIFIER = 63  # NAMEDATALEN - 1


def shard_table_name(table: str, shard_id: int) -> str:
    """``<table>_<shardid>``, shortened (with a stable hash) when it would exceed 63 bytes."""
    suffix = f"_{shard_id}"
    name = table + suffix
    if len(name.encode()) <= MAX_IDENTIFIER:
        return name
    import hashlib

    digest = hashlib.md5(table.encode()).hexdigest()[:8]
    room = MAX_IDENTIFIER - len(suffix) - len(digest) - 1
    head = table.encode()[:room].decode(errors="ignore")
    return f"{head}_{digest}{suffix}"


@dataclass(frozen=True, slots=True)
class Shard:
    shard_id: int
    index: int  # hash slot (0 for a reference table)
    node_ids: tuple[int, ...]  # one for a distributed table, every node for a reference table


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

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"

    @property
    def is_reference(self) -> bool:
        return self.kind == "reference"

    @property
    def shard_count(self) -> int:
        return len(self.shards)

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
