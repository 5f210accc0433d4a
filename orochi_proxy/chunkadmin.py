"""Chunk administration with TimescaleDB's names: show_chunks, drop_chunks.

``older_than`` / ``newer_than`` take what TimescaleDB takes: an interval (meaning ``now() -
interval``), a time value of the column's type, or an integer for integer time columns. A chunk
is *older than* a cut-off when its whole range ends at or before it, and *newer than* one when
its range starts at or after it — so only whole chunks are shown or dropped, never part of one.

Dropping runs on each node first (``DROP TABLE`` of the partitions, in one transaction per
node), then removes the chunks from the catalog. A crash in between leaves catalog rows for
tables that are gone; running ``drop_chunks`` again finishes the job (``DROP TABLE IF
EXISTS``). The other order could leave a partition full of rows that the catalog no longer
knows.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from executor.hypertime import TimeValues
from executor.protocol import PgError
from orochi_proxy.distribute import resolve_table
from orochi_proxy.hypertable import hypertable_of
from orochi_proxy.localexec import BOOL, TEXT, ParamSpec, admin_function
from rewriter import timerange
from rewriter.model import ChunkInfo, HypertableInfo, TableInfo
from rewriter.quoting import quote_literal

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session

DROP_LOCK_TIMEOUT = "30s"


def age_cutoff_sql(ht: HypertableInfo, age: str) -> str:
    """SQL giving ``now() - age`` as an internal time value of the hypertable's time type
    (``localtimestamp`` for timestamp/date columns, as TimescaleDB's policies compute it)."""
    base = "now()" if ht.time_type == "timestamptz" else "localtimestamp"
    return f"SELECT (extract(epoch FROM {base} - {quote_literal(age)}::interval) * 1000000)::bigint"


async def cutoff_internal(session: Session, ht: HypertableInfo, value: str | None) -> int | None:
    """An ``older_than``/``newer_than`` argument as an internal time value (None: no cut-off)."""
    if value is None:
        return None
    text = value.strip()
    if not ht.is_time_type:
        try:
            return int(text)
        except ValueError:
            raise PgError("22023", f'invalid time argument "{value}" for an integer time column', hint="Give an integer.") from None
    if timerange._parse_interval_text(text) is not None:
        rows = await session.dist.text_rows(age_cutoff_sql(ht, text))
        return int(rows[0][0] or 0)
    values = TimeValues(ht, session.output_settings())
    v = values.fast(text)
    if v is None:
        converted = await values.slow(session.server.metadata_pool(session.database), [text])
        if text not in converted:
            raise PgError("22007", f'invalid input syntax for type {ht.time_type}: "{value}"')
        v = converted[text]
    return v


def select_chunks(ht: HypertableInfo, older: int | None, newer: int | None) -> list[ChunkInfo]:
    """Chunks wholly before ``older`` and wholly at or after ``newer`` (both when both given)."""
    out = []
    for c in ht.chunks:
        if older is not None and c.range_end > older:
            continue
        if newer is not None and c.range_start < newer:
            continue
        out.append(c)
    return out


async def _resolve(server: ProxyServer, session: Session, relation: str | None) -> TableInfo:
    if relation is None:
        raise PgError("22004", "invalid hypertable: relation cannot be NULL")
    schema, name = await resolve_table(session, relation)
    return hypertable_of(server, schema, name)


@admin_function(
    "show_chunks",
    [
        ParamSpec("relation", TEXT),
        ParamSpec("older_than", TEXT, None),
        ParamSpec("newer_than", TEXT, None),
        ParamSpec("created_before", TEXT, None),
        ParamSpec("created_after", TEXT, None),
    ],
    [("show_chunks", TEXT)],
    needs_session=True,
)
async def show_chunks(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """The chunks of a hypertable (optionally only those older/newer than a cut-off)."""
    if a["created_before"] is not None or a["created_after"] is not None:
        raise PgError("0A000", "created_before/created_after are not supported", hint="Use older_than/newer_than.")
    table = await _resolve(server, session, a["relation"])
    ht = table.hypertable
    assert ht is not None
    older = await cutoff_internal(session, ht, a["older_than"])
    newer = await cutoff_internal(session, ht, a["newer_than"])
    return [(c.qualified,) for c in select_chunks(ht, older, newer)]


async def drop_chunk_tables(server: ProxyServer, database: str, table: TableInfo, chunks: list[ChunkInfo]) -> None:
    """Drop the chunks on their nodes (one transaction per node), then forget them."""

    per_node: dict[int, list[str]] = defaultdict(list)
    for c in chunks:
        node = table.chunk_node(c)
        per_node[node].append(f"DROP TABLE IF EXISTS {c.qualified}")
        per_node[node].append(f"DROP TABLE IF EXISTS {c.compressed_qualified}")
    for node, statements in sorted(per_node.items()):
        pool = server.node_pool(node, database)
        async with pool.connection() as conn:
            await conn.run_in_transaction(statements, lock_timeout=DROP_LOCK_TIMEOUT)
    await server.catalog.remove_chunks([c.chunk_id for c in chunks])


@admin_function(
    "drop_chunks",
    [
        ParamSpec("relation", TEXT),
        ParamSpec("older_than", TEXT, None),
        ParamSpec("newer_than", TEXT, None),
        ParamSpec("verbose", BOOL, False),
        ParamSpec("created_before", TEXT, None),
        ParamSpec("created_after", TEXT, None),
    ],
    [("drop_chunks", TEXT)],
    needs_session=True,
)
async def drop_chunks(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Drop whole chunks older/newer than a cut-off; returns the dropped chunks' names."""
    if a["created_before"] is not None or a["created_after"] is not None:
        raise PgError("0A000", "created_before/created_after are not supported", hint="Use older_than/newer_than.")
    if a["older_than"] is None and a["newer_than"] is None:
        raise PgError("22023", "invalid time range for dropping chunks", hint="At least one of older_than and newer_than must be provided.")
    table = await _resolve(server, session, a["relation"])
    ht = table.hypertable
    assert ht is not None
    older = await cutoff_internal(session, ht, a["older_than"])
    newer = await cutoff_internal(session, ht, a["newer_than"])
    chunks = select_chunks(ht, older, newer)
    if chunks:
        await drop_chunk_tables(server, session.database, table, chunks)
    return [(c.qualified,) for c in chunks]
