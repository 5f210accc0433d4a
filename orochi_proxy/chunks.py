"""Chunks of hypertables: found or created before rows for their time range reach a node.

Every write path (INSERT ... VALUES, INSERT ... SELECT through the proxy, COPY FROM STDIN,
``migrate_data``) turns each row's time value into the internal integer of
``rewriter.timerange``, asks the cached catalog which chunk of the row's shard holds it, and
calls :func:`ensure_chunks` for the values that have none. Creation is one catalog change per
chunk (``Catalog.add_chunk``): the catalog's version row lock serialises creators across
proxy replicas, so two clients inserting into a new range create it once.

On the node a chunk is created as a table ``LIKE`` the shard (defaults, constraints, storage)
and attached with ``ALTER TABLE ... ATTACH PARTITION``, which takes only SHARE UPDATE EXCLUSIVE
on the shard: transactions that already write into the shard (a client's open block) do not
block it. ``CREATE TABLE ... PARTITION OF`` would need ACCESS EXCLUSIVE and wait for them.
ATTACH also creates the chunk's copies of the shard's indexes.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from executor.copyio import copy_out, text_field
from executor.hypertime import TimeValues
from executor.protocol import PgError
from rewriter import hashing, timerange
from rewriter.model import ChunkInfo, HypertableInfo, TableInfo
from rewriter.quoting import qualified_name, quote_ident, quote_literal

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session

CHUNK_LOCK_TIMEOUT = "10s"


def bound_literal(time_type: str, internal: int) -> str:
    """A partition bound for an internal time value (MINVALUE/MAXVALUE for open chunk ends)."""
    if internal == timerange.INT64_MIN:
        return "MINVALUE"
    if internal == timerange.INT64_MAX:
        return "MAXVALUE"
    value = timerange.from_internal(time_type, internal)
    if isinstance(value, int):
        return str(value)
    text = value.isoformat(sep=" ") if hasattr(value, "hour") else value.isoformat()  # type: ignore[call-arg, union-attr]
    return quote_literal(text)


def chunk_ddl(table: TableInfo, shard_index: int, chunk: ChunkInfo, known: list[str]) -> list[str]:
    """The statements (one transaction) that create and attach ``chunk`` (idempotent).

    A partition of the shard that the catalog does not know is a leftover of a creator that
    died between the node and the catalog: it never received rows (rows are sent only after
    the chunk is registered), so it is dropped; one holding rows stops the creation instead.
    """
    ht = table.hypertable
    assert ht is not None
    parent = qualified_name(table.schema, table.shard_name(table.shards[shard_index]))
    target = qualified_name(chunk.schema, chunk.name)
    names = "ARRAY[" + ", ".join(quote_literal(n) for n in [*known, chunk.name]) + "]::text[]"
    lo, hi = bound_literal(ht.time_type, chunk.range_start), bound_literal(ht.time_type, chunk.range_end)
    return [f"CREATE SCHEMA IF NOT EXISTS {quote_ident(chunk.schema)}", f"""DO $orochi$
DECLARE r record; n bigint;
BEGIN
  FOR r IN SELECT c.oid::regclass AS rel FROM pg_catalog.pg_inherits i
           JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = {quote_literal(parent)}::regclass AND c.relname::text <> ALL ({names}) LOOP
    EXECUTE format('SELECT count(*) FROM %s', r.rel) INTO n;
    IF n > 0 THEN
      RAISE EXCEPTION 'partition % of % holds % rows but is not a registered chunk', r.rel, {quote_literal(parent)}, n
        USING ERRCODE = 'XX000', HINT = 'Inspect it; detach it or register it before inserting into this range.';
    END IF;
    EXECUTE format('DROP TABLE %s', r.rel);
  END LOOP;
END $orochi$""", f"""CREATE TABLE IF NOT EXISTS {target} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS
    INCLUDING STORAGE INCLUDING COMPRESSION INCLUDING GENERATED)""", f"""DO $orochi$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits WHERE inhrelid = {quote_literal(target)}::regclass) THEN
    EXECUTE {quote_literal(f"ALTER TABLE {parent} ATTACH PARTITION {target} FOR VALUES FROM ({lo}) TO ({hi})")};
  END IF;
END $orochi$"""]


async def _create_on_node(
    server: ProxyServer, database: str, table: TableInfo, shard_index: int, chunk: ChunkInfo, known: list[str]
) -> None:
    node = table.shards[shard_index].node_ids[0]
    pool = server.node_pool(node, database)
    async with pool.connection() as conn:
        await conn.run_in_transaction(chunk_ddl(table, shard_index, chunk, known), lock_timeout=CHUNK_LOCK_TIMEOUT)


def missing_chunks(ht: HypertableInfo, values: Iterable[tuple[int, int]]) -> dict[tuple[int, int], int]:
    """(shard, new range start) -> one value in it, for the (shard, value) pairs with no chunk."""
    out: dict[tuple[int, int], int] = {}
    for shard, v in values:
        if ht.chunk_containing(shard, v) is None:
            lo, _ = ht.new_chunk_range(shard, v)
            out.setdefault((shard, lo), v)
    return out


async def ensure_chunks(server: ProxyServer, database: str, table: TableInfo, values: Iterable[tuple[int, int]]) -> int:
    """Create the chunks that (shard index, internal time) pairs need; returns how many."""
    ht = table.hypertable
    assert ht is not None
    needed = missing_chunks(ht, values)
    for (shard, _), value in sorted(needed.items()):
        create = functools.partial(_create_on_node, server, database, table, shard)
        await server.catalog.add_chunk(table.schema, table.name, shard, value, create)
    return len(needed)


# ---------------------------------------------------------------------- migrate_data
async def migrate_rows(server: ProxyServer, session: Session, table: TableInfo) -> int:
    """Move the rows of the table on the metadata node into chunks (``migrate_data => true``)."""
    from orochi_proxy.distribute import _move_rows_in

    ht = table.hypertable
    assert ht is not None
    md_pool = server.metadata_pool(session.database)
    async with md_pool.connection() as conn:
        lines = await copy_out(conn, f"COPY {qualified_name(table.schema, table.name)} TO STDOUT")
    if not lines:
        return 0
    t_index = list(table.columns).index(ht.time_column)
    times = await TimeValues(ht, {"TimeZone": "UTC"}).convert(
        md_pool, [text_field(line.rstrip(b"\n"), t_index) or "" for line in lines]
    )
    if ht.space_column is not None:
        s_index = list(table.columns).index(ht.space_column)
        shards = []
        for line in lines:
            value = text_field(line.rstrip(b"\n"), s_index)
            if value is None:
                shards.append(0)
                continue
            shards.append(hashing.shard_slot(table.dist_type or "", hashing.parse_text_value(table.dist_type or "", value), table.shard_count))
    else:
        shards = [0] * len(lines)
    await ensure_chunks(server, session.database, table, zip(shards, times, strict=True))
    spec = [(s.shard_id, s.index, list(s.node_ids)) for s in table.shards]
    index = list(table.columns).index(ht.space_column) if ht.space_column is not None else None
    return await _move_rows_in(server, session, table.schema, table.name, index, table.dist_type, spec)


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")
_OFFSET = re.compile(r"([+-])(\d{2})(?::?(\d{2}))?")
_HOUR = 3600 * 1_000_000
_DATE_TYPES = frozenset({"timestamptz", "timestamp", "date"})


class ChunkRouter:
    """Chunk bookkeeping for a stream of rows (COPY, INSERT ... SELECT through the proxy).

    ``note(shard, time_text)`` per row; ``settle()`` before rows are sent converts the unusual
    time texts on the metadata node and creates the chunks the noted rows need.

    Most rows need no parse at all: once a row's calendar day (its ``YYYY-MM-DD`` prefix) with
    its zone suffix (``+00``, ``-05:30``; none or a zone name count as one unknown zone) is
    known to lie, whatever the time of day, inside one existing chunk of its shard, every later
    row of that shard, day and suffix is noted by a set lookup (``_whole_days``). Parsing each
    row's time text took 63-75% of the proxy's CPU during hypertable COPY. The node's
    partitioning still places each row; the proxy only has to know its chunk exists.
    """

    def __init__(self, server: ProxyServer, database: str, table: TableInfo, settings: dict[str, str]) -> None:
        assert table.hypertable is not None
        self.server = server
        self.database = database
        self.table = table
        self.values = TimeValues(table.hypertable, settings)
        self.slow: list[tuple[int, str]] = []
        self.needs: dict[tuple[int, int], int] = {}
        self._last: tuple[int, int, int] | None = None  # (shard, lo, hi) of the last chunk hit
        self._whole_days: set[tuple[int, str, str]] = set()  # (shard, day, zone) in one chunk
        self._seen_days: set[tuple[int, str, str]] = set()  # (shard, day, zone) settled
        self._windows: dict[tuple[int, str, str], tuple[int, int]] = {}  # their value ranges
        self._time_type = timerange.normalize_type(table.hypertable.time_type)
        self._by_day = self._time_type in _DATE_TYPES

    @property
    def ht(self) -> HypertableInfo:
        current = self.server.catalog.model.tables.get((self.table.schema, self.table.name))
        ht = current.hypertable if current is not None else None
        if ht is None:
            raise PgError("42P01", f'hypertable "{self.table.name}" was dropped during the statement')
        return ht

    def note(self, shard: int, text: str | None) -> None:
        if text is None:
            ht = self.table.hypertable
            raise PgError(
                "23502", f'null value in column "{ht.time_column if ht else "time"}" of relation "{self.table.name}" violates not-null constraint'
            )
        sign = max(text.rfind("+"), text.rfind("-"))
        day = (shard, text[:10], text[sign:] if sign > 10 else "")
        if day in self._whole_days and text[-1] not in "Cc":  # "... BC" is another era
            return
        v = self.values.fast(text)
        if v is None:
            self.slow.append((shard, text))
            return
        self.note_value(shard, v)
        if self._by_day and day not in self._seen_days:
            self._learn_day(day, text)

    def _learn_day(self, day: tuple[int, str, str], text: str) -> None:
        """Remember ``day`` when every value of it lies in one existing chunk of its shard.

        Asked again for later rows of the day while its chunk does not exist yet (a load into
        new ranges creates its chunks as it goes); settled once the chunk is there.
        """
        window = self._windows.get(day)
        if window is None:
            if len(self._windows) > 100_000:
                self._windows.clear()
                self._whole_days.clear()
                self._seen_days.clear()
            window = self._day_window(day, text)
            if window is None:
                self._seen_days.add(day)
                return
            self._windows[day] = window
        lo, hi = window
        chunk = self.ht.chunk_containing(day[0], lo)
        if chunk is None:
            return
        if chunk.range_end > hi:
            self._whole_days.add(day)
        self._seen_days.add(day)

    def _day_window(self, day: tuple[int, str, str], text: str) -> tuple[int, int] | None:
        """[lo, hi] of every value of ``day`` written with its zone suffix; None: not a day.

        The values of a calendar day lie in [midnight, midnight + 24 h] (``24:00:00`` is
        valid) of local time: for ``timestamptz`` shifted by the zone's UTC offset, which, for
        an unknown zone, is anywhere within ±16 h. ``timestamp`` and ``date`` ignore zones.
        """
        _shard, prefix, zone = day
        if not _DAY.fullmatch(prefix) or (len(text) > 10 and text[10] not in " Tt") or "bc" in text.lower():
            return None
        try:
            midnight = timerange.to_internal("timestamp", prefix)
        except ValueError:
            return None
        lo, hi = midnight, midnight + 24 * _HOUR
        if self._time_type == "timestamptz":
            m = _OFFSET.fullmatch(zone) if zone and text[-len(zone) - 1].isdigit() else None
            if m is not None:
                offset = (int(m[2]) * 60 + int(m[3] or 0)) * 60 * 1_000_000 * (1 if m[1] == "+" else -1)
                return lo - offset, hi - offset
            return lo - 16 * _HOUR, hi + 16 * _HOUR
        return lo, hi

    def note_value(self, shard: int, v: int) -> None:
        last = self._last
        if last is not None and last[0] == shard and last[1] <= v < last[2]:
            return
        chunk = self.ht.chunk_containing(shard, v)
        if chunk is not None:
            self._last = (shard, chunk.range_start, chunk.range_end)
            return
        self.needs.setdefault((shard, v), v)

    async def settle(self) -> None:
        if self.slow:
            converted = await self.values.slow(self.server.metadata_pool(self.database), [t for _, t in self.slow])
            pending, self.slow = self.slow, []
            for shard, text in pending:
                if text not in converted:
                    raise PgError("22007", f'invalid input syntax for type {self.values.ht.time_type}: "{text}"')
                self.note_value(shard, converted[text])
        if self.needs:
            needs, self.needs = self.needs, {}
            current = self.server.catalog.model.tables.get((self.table.schema, self.table.name)) or self.table
            await ensure_chunks(self.server, self.database, current, needs.keys())
