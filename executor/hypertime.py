"""Time values of hypertable rows: text -> the internal integer that picks the chunk.

Used by every write path that routes rows to chunks (executor.distributed for INSERT, and the
COPY / INSERT ... SELECT / migrate paths in orochi_proxy).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from executor.protocol import PgError
from rewriter import timerange
from rewriter.model import HypertableInfo
from rewriter.quoting import quote_literal

if TYPE_CHECKING:
    from executor.pool import NodePool


def _internal_sql(time_type: str) -> str:
    """SQL turning text ``v`` into the internal integer (as ``rewriter.timerange`` defines it)."""
    if time_type == "timestamptz":
        conv = "v::timestamptz"
    elif time_type == "timestamp":
        conv = "v::timestamp"
    elif time_type == "date":
        conv = "v::date::timestamp"
    else:
        return "v::bigint"
    return (
        f"CASE WHEN {conv} = 'infinity' THEN 9223372036854775807 "
        f"WHEN {conv} = '-infinity' THEN -9223372036854775808 "
        f"ELSE (extract(epoch FROM {conv}) * 1000000)::bigint END"
    )


class TimeValues:
    """Turns a hypertable's time values (text) into internal integers.

    ISO text (what drivers and ``COPY`` send) is converted in Python with the session's time
    zone; anything else (``DateStyle`` forms, ``'yesterday'``, ``'now'``) is converted once
    by PostgreSQL on the metadata node under the client's TimeZone/DateStyle, so a value lands
    in exactly the chunk the node's partition bounds put it in.
    """

    def __init__(self, ht: HypertableInfo, settings: dict[str, str]) -> None:
        self.ht = ht
        self.settings = settings
        self.timezone = settings.get("TimeZone") or settings.get("timezone") or "UTC"

    def fast(self, text: str) -> int | None:
        try:
            return timerange.to_internal(self.ht.time_type, text, self.timezone)
        except ValueError:
            return None

    async def slow(self, pool: NodePool, texts: Iterable[str]) -> dict[str, int]:
        """Convert ``texts`` on a metadata-node connection (one round trip)."""
        values = sorted(set(texts))
        if not values:
            return {}
        array = "ARRAY[" + ", ".join(quote_literal(v) for v in values) + "]::text[]"
        sets = [
            f"SET LOCAL {name} = {quote_literal(self.settings[key])}"
            for key, name in (("TimeZone", "timezone"), ("DateStyle", "datestyle"), ("IntervalStyle", "intervalstyle"))
            if self.settings.get(key)
        ]
        select = f"SELECT v, {_internal_sql(self.ht.time_type)} FROM unnest({array}) AS v"
        async with pool.connection() as conn:
            rows = await conn.run_in_transaction([*sets, select])
        return {r[0].decode(): int(r[1]) for r in rows if r[0] is not None and r[1] is not None}  # type: ignore[union-attr]

    async def convert(self, pool: NodePool, texts: list[str]) -> list[int]:
        out: list[int | None] = [self.fast(t) for t in texts]
        unknown = [t for t, v in zip(texts, out, strict=True) if v is None]
        if unknown:
            slow = await self.slow(pool, unknown)
            out = [v if v is not None else slow.get(t) for t, v in zip(texts, out, strict=True)]
        if any(v is None for v in out):
            bad = next(t for t, v in zip(texts, out, strict=True) if v is None)
            raise PgError("22007", f'invalid input syntax for type {self.ht.time_type}: "{bad}"')
        return out  # type: ignore[return-value]


def iso_sql(time_type: str, expr: str) -> str:
    """SQL giving ``expr`` as DateStyle-proof ISO text of the column type (UTC for timestamptz)."""
    if time_type == "timestamptz":
        return f"to_char(({expr})::timestamptz AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'"
    if time_type == "timestamp":
        return f"to_char(({expr})::timestamp, 'YYYY-MM-DD HH24:MI:SS.US')"
    if time_type == "date":
        return f"to_char(({expr})::date, 'YYYY-MM-DD')"
    return f"(({expr})::{time_type})::text"


async def evaluate(pool: NodePool, time_type: str, expressions: list[str], settings: dict[str, str]) -> list[str]:
    """Values of time expressions (``now()``, ``current_date - 1``) as ISO text, one round trip
    on a metadata-node connection under the client's TimeZone."""
    if not expressions:
        return []
    tz = settings.get("TimeZone")
    sets = [f"SET LOCAL timezone = {quote_literal(tz)}"] if tz else []
    cols = ", ".join(iso_sql(time_type, e) for e in expressions)
    async with pool.connection() as conn:
        rows = await conn.run_in_transaction([*sets, f"SELECT {cols}"])
    out = []
    for v in rows[0]:
        if v is None:
            raise PgError("22004", "the time column of a hypertable cannot be NULL or infinite here")
        out.append(v.decode())
    return out
