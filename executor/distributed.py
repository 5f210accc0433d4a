"""Execute a distributed plan (``rewriter.planner.Plan``) on the nodes and answer the client.

Strategies (see the planner):

* **router** — one shard: the statement runs on its node with the client's parameters and
  result formats; DataRows are relayed as the node produced them.
* **concat** — several shards, no merge: one query per node (``UNION ALL`` of its shards), rows
  relayed as they arrive; LIMIT/OFFSET applied by counting.
* **combine** — partial rows are collected as text and handed to PostgreSQL's own evaluation in
  the combine query (``rewriter.combine``) on a metadata-node connection, whose answer is relayed
  with the client's result formats.
* **writes on several nodes** — every node runs its shard statements inside ``BEGIN``; with more
  than one node the transaction is two-phase committed (``PREPARE TRANSACTION`` everywhere, then
  ``COMMIT PREPARED``), so it is applied on all or none; the commit decision is recorded in the
  metadata database first (``executor.twophase``), and ``orochi_proxy.recovery`` finishes what a
  crashed proxy left prepared.

The output path writes straight to the client: a distributed statement runs only when its answer
is at the head of the session's ordered answers, so nothing can overtake it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from executor import hyperread, hypertime, twophase
from executor import protocol as pg
from executor.backend import BackendConnection
from executor.pool import NodePool
from executor.protocol import PgError
from executor.tasks import TaskResult, extended_query, run_on
from executor.transaction import DistTransaction
from rewriter import hashing
from rewriter.model import HypertableInfo, TableInfo
from rewriter.planner import TIME_PLACEHOLDER, Plan
from rewriter.quoting import quote_literal


async def _no_record(gid: str, nodes: list[int]) -> None:
    return None


async def _no_forget(gid: str) -> None:
    return None


# For contexts built without a server (tests): two-phase commit without a durable decision.
_NO_LOG = twophase.Decider(0, _no_record, _no_forget, set())


@dataclass
class ExecContext:
    """What a distributed statement needs from the session that runs it."""

    database: str
    pool_for: Callable[[int], NodePool]  # node id -> pool for the session's database
    metadata_pool: Callable[[], NodePool]
    metadata_node_id: int | None
    write: Callable[[bytes], None]  # to the client
    drain: Callable[[], Awaitable[None]]  # wait while the client's buffer is full
    settings: dict[str, str]  # output settings of the client session
    type_names: Callable[[list[int]], Awaitable[list[tuple[str, int]]]]  # oid -> (type name, array oid)
    params: list[bytes | None] = field(default_factory=list)
    param_formats: list[int] = field(default_factory=list)
    param_oids: list[int] = field(default_factory=list)
    result_formats: list[int] = field(default_factory=list)
    row_description: bytes | None = None  # sent first (simple protocol); None in extended
    throttle: Callable[[BackendConnection], None] | None = None  # pause a node while the client is full
    # Simple-protocol statements planned by shape (rewriter.literals): $n in the plan's SQL are
    # these literals, put back as text before sending; routing reads their values.
    literals: tuple | None = None
    decider: twophase.Decider | None = None  # records commit decisions (the server's TransactionLog)
    # Inside a client's transaction block: its pinned node connections. Statements then run in
    # the node transactions (no BEGIN/COMMIT of their own); the session commits at COMMIT.
    txn: DistTransaction | None = None
    # Hypertables: create the chunks that (shard index, internal time) pairs need (the server's
    # catalog does it; see orochi_proxy.chunks). None outside a server (tests).
    ensure_chunks: Callable[[TableInfo, list[tuple[int, int]]], Awaitable[None]] | None = None
    # The catalog's current description of a hypertable (a cached plan's copy may predate a
    # chunk created since); None outside a server.
    hypertable_of: Callable[[TableInfo], HypertableInfo | None] | None = None

    def capturing(self, write: Callable[[bytes], None]) -> ExecContext:
        """The same statement context with its answer (text format) going to ``write``.

        For the proxy's own use of a query's rows (EXPLAIN ANALYZE, INSERT ... SELECT): nothing
        is relayed to the client, so the client's buffer must not throttle the nodes either.
        """
        return dataclasses.replace(self, write=write, result_formats=[0], row_description=None, throttle=None)


# ---------------------------------------------------------------------------------- routing
class UnknownValue(Exception):
    """A literal whose value the proxy does not decode (E'...', $$...$$): route to all shards."""


def _q(ctx: ExecContext, sql: str, shift: int = 0) -> str:
    """The SQL to send: literal texts substituted back for a shape-planned statement."""
    if getattr(ctx, "literals", None) is None:
        return sql
    from rewriter.literals import substitute

    return substitute(sql, ctx.literals, shift)


def _param_text(ctx: ExecContext, number: int) -> str | None:
    literals = getattr(ctx, "literals", None)
    if literals is not None:
        lit = literals[number - 1]
        if lit.value is None:
            raise UnknownValue(lit.text)
        return lit.value
    i = number - 1
    if i >= len(ctx.params):
        raise PgError("08P01", f"there is no parameter ${number}")
    raw = ctx.params[i]
    if raw is None:
        return None
    fmt = ctx.param_formats[i] if len(ctx.param_formats) > 1 else (ctx.param_formats[0] if ctx.param_formats else 0)
    if fmt == 0:
        return raw.decode()
    oid = ctx.param_oids[i] if i < len(ctx.param_oids) else 0
    return _binary_to_text(raw, oid)


def _binary_to_text(raw: bytes, oid: int) -> str:
    if oid == 20:
        return str(struct.unpack("!q", raw)[0])
    if oid == 23:
        return str(struct.unpack("!i", raw)[0])
    if oid == 21:
        return str(struct.unpack("!h", raw)[0])
    if oid in (25, 1043, 19, 705, 1042):
        return raw.decode()
    if oid == 2950:
        return str(uuid.UUID(bytes=raw))
    if oid == 1082:  # date: days since 2000-01-01
        import datetime

        return (datetime.date(2000, 1, 1) + datetime.timedelta(days=struct.unpack("!i", raw)[0])).isoformat()
    # psycopg sends these in binary even for %s, asyncpg always: without them such a
    # distribution column could not be queried or written by parameter at all.
    decode = _BINARY_DECODERS.get(oid)
    if decode is not None:
        return decode(raw)
    raise _unroutable()


def _float_text(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "Infinity" if v > 0 else "-Infinity"
    return repr(v)


def _numeric_text(raw: bytes) -> str:
    """Binary numeric (ndigits, weight, sign, dscale, base-10000 digits) as PostgreSQL prints it."""
    ndigits, weight, sign, dscale = struct.unpack_from("!hhHh", raw, 0)
    special = {0xC000: "NaN", 0xD000: "Infinity", 0xF000: "-Infinity"}
    if sign in special:
        return special[sign]
    value = 0
    for d in struct.unpack_from(f"!{ndigits}H", raw, 8):
        value = value * 10000 + d
    digits, exp = str(value), 4 * (weight - ndigits + 1)
    if exp >= 0:
        whole, frac = digits + "0" * exp, ""
    else:
        digits = digits.rjust(1 - exp, "0")
        whole, frac = digits[:exp], digits[exp:]
    frac = (frac + "0" * dscale)[:dscale]
    text = (whole.lstrip("0") or "0") + ("." + frac if frac else "")
    return ("-" if sign == 0x4000 else "") + text


def _timestamp_text(raw: bytes, suffix: str) -> str:
    """Binary timestamp[tz] (microseconds since 2000-01-01, UTC for tz) as text."""
    import datetime

    (us,) = struct.unpack("!q", raw)
    if us in (2**63 - 1, -(2**63)):
        return "infinity" if us > 0 else "-infinity"
    try:
        value = datetime.datetime(2000, 1, 1) + datetime.timedelta(microseconds=us)
    except OverflowError:
        raise UnknownValue("a timestamp outside years 1-9999") from None  # all shards / 0A000
    return value.isoformat(" ") + suffix


def _time_text(raw: bytes) -> str:
    (us,) = struct.unpack("!q", raw)
    secs, us = divmod(us, 1_000_000)
    return f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{us:06d}"


_BINARY_DECODERS: dict[int, Callable[[bytes], str]] = {
    16: lambda raw: "t" if raw[:1] != b"\x00" else "f",  # bool
    17: lambda raw: "\\x" + raw.hex(),  # bytea
    18: lambda raw: chr(raw[0]) if raw and 32 < raw[0] < 127 and raw[0] != 92 else f"\\{raw[0] if raw else 0:03o}",  # "char"
    26: lambda raw: str(struct.unpack("!I", raw)[0]),  # oid
    700: lambda raw: _float_text(struct.unpack("!f", raw)[0]),
    701: lambda raw: _float_text(struct.unpack("!d", raw)[0]),
    1083: _time_text,
    1114: lambda raw: _timestamp_text(raw, ""),
    1184: lambda raw: _timestamp_text(raw, "+00:00"),
    1700: _numeric_text,
}


def _unroutable() -> PgError:
    return PgError("0A000", "cannot route by this parameter's binary format")


def _array_texts(ctx: ExecContext, number: int) -> list[str | None] | None:
    i = number - 1
    raw = ctx.params[i] if i < len(ctx.params) else None
    if raw is None:
        return None
    fmt = ctx.param_formats[i] if len(ctx.param_formats) > 1 else (ctx.param_formats[0] if ctx.param_formats else 0)
    if fmt == 0:
        return _parse_array_literal(raw.decode())
    # binary array: ndim, flags, elemtype, then (dim, lbound) per dim, then elements
    ndim, _flags, elem = struct.unpack_from("!iii", raw, 0)
    if ndim == 0:
        return []
    if ndim != 1:
        return None
    (n, _lb) = struct.unpack_from("!ii", raw, 12)
    pos = 20
    out: list[str | None] = []
    for _ in range(n):
        (ln,) = struct.unpack_from("!i", raw, pos)
        pos += 4
        if ln < 0:
            out.append(None)
        else:
            out.append(_binary_to_text(raw[pos : pos + ln], elem))
            pos += ln
    return out


def _parse_array_literal(text: str) -> list[str | None] | None:
    """A one-dimensional array literal ``{a,"b c",NULL}``; None for anything fancier."""
    text = text.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    body = text[1:-1]
    out: list[str | None] = []
    i, n = 0, len(body)
    if not body.strip():
        return []
    while i < n:
        while i < n and body[i].isspace():
            i += 1
        if i < n and body[i] == "{":
            return None
        if i < n and body[i] == '"':
            i += 1
            buf = []
            while i < n and body[i] != '"':
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                buf.append(body[i])
                i += 1
            i += 1
            out.append("".join(buf))
        else:
            j = i
            while j < n and body[j] != ",":
                j += 1
            tok = body[i:j].strip()
            out.append(None if tok.upper() == "NULL" else tok)
            i = j
        while i < n and body[i] != ",":
            i += 1
        i += 1
    return out


def shard_of(dist_type: str, text: str | None, shard_count: int) -> int | None:
    """The shard of a value given as text; None when it cannot be decided (then: all shards)."""
    if text is None:
        return -1  # NULL: equality never holds; no shard needed
    if shard_count == 1:
        return 0  # e.g. a hypertable without a space dimension: no need to parse the value
    try:
        value = hashing.parse_text_value(dist_type, text)
    except (ValueError, PgError, TypeError, OverflowError):
        return None
    return hashing.shard_slot(dist_type, value, shard_count)


def resolve_shards(plan: Plan, ctx: ExecContext) -> list[int]:
    """Shard indexes the statement must run on (sorted); all shards when not pinned."""
    everything = set(range(plan.shard_count))
    if not plan.pins or plan.dist_type is None:
        return sorted(everything)
    result = set(everything)
    for group in plan.pins:
        shards: set[int] | None = set()
        for v in group:
            texts: list[str | None] | None
            try:
                if v.kind == "const":
                    texts = [v.text]
                elif v.kind == "param":
                    texts = [_param_text(ctx, v.number)]
                else:
                    texts = _array_texts(ctx, v.number) if getattr(ctx, "literals", None) is None else None
            except UnknownValue:
                texts = None
            if texts is None:
                shards = None
                break
            for t in texts:
                s = shard_of(plan.dist_type, t, plan.shard_count)
                if s is None:
                    shards = None
                    break
                if s >= 0:
                    shards.add(s)  # type: ignore[union-attr]
            if shards is None:
                break
        if shards is not None:
            result &= shards
    return sorted(result)


# ---------------------------------------------------------------------------------- connections
async def apply_settings(conn: BackendConnection, wanted: dict[str, str]) -> None:
    applied: dict[str, str] = conn.__dict__.setdefault("applied_settings", {})
    changes = {k: v for k, v in wanted.items() if applied.get(k) != v}
    if not changes:
        return
    sql = "; ".join(
        f"SELECT pg_catalog.set_config({quote_literal(k)}, {quote_literal(v)}, false)" for k, v in changes.items()
    )
    await conn.simple_query(sql)
    applied.update(changes)


class _Lease:
    """Connections for one statement: the transaction's own, or taken from pools and returned
    (without reset) at the end."""

    def __init__(self, ctx: ExecContext) -> None:
        self.ctx = ctx
        self.taken: list[tuple[NodePool, BackendConnection]] = []

    async def node(self, node_id: int, settings: dict[str, str], *, write: bool = False) -> BackendConnection:
        """A connection to ``node_id``: in a transaction block, the block's connection there."""
        if self.ctx.txn is not None:
            return await self.ctx.txn.conn(node_id, settings, write=write)
        return await self.get(self.ctx.pool_for(node_id), settings)

    async def get(self, pool: NodePool, settings: dict[str, str]) -> BackendConnection:
        conn = await pool.acquire()
        self.taken.append((pool, conn))
        await apply_settings(conn, settings)
        return conn

    def release(self) -> None:
        for pool, conn in self.taken:
            pool.release(conn, reset=not conn.usable or conn.tx_status != b"I")
        self.taken.clear()


# ---------------------------------------------------------------------------------- execution
class ClientOutput:
    """Counts relayed rows, applies OFFSET/LIMIT by counting, and respects client back-pressure."""

    def __init__(self, ctx: ExecContext, limit: int | None = None, offset: int = 0) -> None:
        self.ctx = ctx
        self.sent = 0
        self.skipped = 0
        self.limit = limit
        self.offset = offset

    @property
    def full(self) -> bool:
        return self.limit is not None and self.sent >= self.limit

    def sink(self, buf: bytes, frames: list[tuple[int, int, int]]) -> None:
        if self.limit is None and self.offset == 0:
            if len(frames) == 1:
                _, s, e = frames[0]
                self.ctx.write(buf[s:e])
            else:
                self.ctx.write(b"".join(buf[s:e] for _, s, e in frames))
            self.sent += len(frames)
            return
        out = []
        for _, s, e in frames:
            if self.skipped < self.offset:
                self.skipped += 1
                continue
            if self.full:
                break
            out.append(buf[s:e])
            self.sent += 1
        if out:
            self.ctx.write(b"".join(out))


async def execute(plan: Plan, ctx: ExecContext) -> None:
    """Run ``plan`` and write RowDescription (if any), DataRows and CommandComplete to the client."""
    if plan.kind == "ref_select":
        node_id = _reference_read_node(plan, ctx)
        await _run_single(plan, ctx, node_id, plan.sql_for_shard(plan.template, 0))
        return
    if plan.kind == "ref_modify":
        await _run_reference_write(plan, ctx)
        return
    if plan.kind == "insert":
        await _run_insert(plan, ctx)
        return
    shards = resolve_shards(plan, ctx)
    if plan.tables[_first_dist(plan)].hypertable is not None:
        shards, plan = hyperread.apply_chunks(plan, ctx, shards)
        if plan.warm_sql:
            # Decoding segments is many small functions per row; the node's JIT compiled
            # hundreds of them per task (seconds) for what runs in milliseconds without it.
            ctx = dataclasses.replace(ctx, settings={**ctx.settings, "jit": "off"})
    if len(shards) <= 1:
        idx = shards[0] if shards else 0
        node_id = plan.tables[_first_dist(plan)].shards[idx].node_ids[0]
        await _run_single(plan, ctx, node_id, plan.sql_for_shard(plan.template, idx))
        return
    if plan.multi_error is not None:
        raise plan.multi_error
    if plan.kind == "select":
        assert plan.split is not None
        if plan.split.mode == "concat":
            await _run_concat(plan, ctx, shards)
        else:
            await _run_combine(plan, ctx, shards)
        return
    await _run_multi_write(plan, ctx, {s: [plan.sql_for_shard(plan.template, s)] for s in shards})


def _first_dist(plan: Plan) -> int:
    return plan.first_distributed


def _reference_read_node(plan: Plan, ctx: ExecContext) -> int:
    nodes = set(plan.tables[0].shards[0].node_ids)
    for t in plan.tables[1:]:
        nodes &= set(t.shards[0].node_ids)
    if not nodes:
        raise PgError("XX000", "reference tables have no common node")
    if ctx.metadata_node_id in nodes:
        return ctx.metadata_node_id  # type: ignore[return-value]
    return min(nodes)


def _writes(plan: Plan) -> bool:
    return plan.kind not in ("select", "ref_select")


async def _run_single(plan: Plan, ctx: ExecContext, node_id: int, sql: str) -> None:
    lease = _Lease(ctx)
    try:
        conn = await lease.node(node_id, ctx.settings, write=_writes(plan))
        if ctx.row_description is not None:
            ctx.write(ctx.row_description)
        out = ClientOutput(ctx)
        res = await run_on(
            conn,
            extended_query(_q(ctx, sql), ctx.params, param_oids=ctx.param_oids, param_formats=ctx.param_formats, result_formats=ctx.result_formats),
            sink=out.sink,
            throttle=ctx.throttle,
        )
        _raise(res)
        ctx.write(pg.command_complete(res.tags[-1] if res.tags else "SELECT 0"))
    finally:
        lease.release()


def _raise(res: TaskResult) -> None:
    if res.error is not None:
        raise res.error


async def collect_rows(pool: NodePool, ctx: ExecContext, sql: str) -> list[list[bytes | None]]:
    """Run ``sql`` (with the statement's parameters) on one connection of ``pool``; rows as text."""
    conn = await pool.acquire()
    try:
        await apply_settings(conn, ctx.settings)
        res = await run_on(
            conn,
            extended_query(sql, ctx.params, param_oids=ctx.param_oids, param_formats=ctx.param_formats, result_formats=[0]),
            collect=True,
        )
    finally:
        pool.release(conn, reset=not conn.usable)
    _raise(res)
    return res.rows or []


def _by_node(plan: Plan, shards: list[int]) -> dict[int, list[int]]:
    table = plan.tables[_first_dist(plan)]
    groups: dict[int, list[int]] = {}
    for s in shards:
        groups.setdefault(table.shards[s].node_ids[0], []).append(s)
    return groups


def _union_all(plan: Plan, template: str, shards: list[int]) -> str:
    parts = [plan.sql_for_shard(template, s) for s in shards]
    if len(parts) == 1:
        return parts[0]
    return " UNION ALL ".join(f"({p})" for p in parts)


def _int_value(node, ctx: ExecContext) -> int | None:
    from pglast import ast

    if node is None:
        return None
    if isinstance(node, ast.A_Const):
        if node.isnull:
            return None
        if isinstance(node.val, ast.Integer):
            return node.val.ival
    if isinstance(node, ast.ParamRef):
        t = _param_text(ctx, node.number)
        return None if t is None else int(t)
    if isinstance(node, ast.TypeCast):
        return _int_value(node.arg, ctx)
    raise PgError("0A000", "LIMIT/OFFSET must be a constant or a parameter on distributed tables")


async def _run_concat(plan: Plan, ctx: ExecContext, shards: list[int]) -> None:
    split = plan.split
    assert split is not None and plan.worker_template is not None
    limit = _int_value(split.limit, ctx)
    offset = _int_value(split.offset, ctx) or 0
    out = ClientOutput(ctx, limit, offset)
    lease = _Lease(ctx)
    try:
        if ctx.row_description is not None:
            ctx.write(ctx.row_description)
        groups = _by_node(plan, shards)
        conns = [await lease.node(node, ctx.settings) for node in groups]
        msgs = [
            extended_query(
                _q(ctx, _union_all(plan, plan.worker_template, node_shards)),
                ctx.params, param_oids=ctx.param_oids, param_formats=ctx.param_formats,
                result_formats=ctx.result_formats,
            )
            for node_shards in groups.values()
        ]
        results = await _gather([run_on(c, m, sink=out.sink, throttle=ctx.throttle) for c, m in zip(conns, msgs, strict=True)])
        for r in results:
            _raise(r)
        ctx.write(pg.command_complete(f"SELECT {out.sent}"))
    finally:
        lease.release()


async def _gather(coros: list[Awaitable[TaskResult]]) -> list[TaskResult]:
    """Run tasks concurrently; if one fails, cancel the others (on their nodes too)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _array_literal(values: list[bytes | None]) -> bytes:
    parts = []
    for v in values:
        if v is None:
            parts.append(b"NULL")
        else:
            parts.append(b'"' + v.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"')
    return b"{" + b",".join(parts) + b"}"


async def _run_combine(plan: Plan, ctx: ExecContext, shards: list[int]) -> None:
    split = plan.split
    assert split is not None and plan.worker_template is not None
    lease = _Lease(ctx)
    try:
        groups = _by_node(plan, shards)
        lossless = dict(ctx.settings, extra_float_digits="3")
        conns = [await lease.node(node, lossless) for node in groups]
        msgs = [
            extended_query(
                _q(ctx, _union_all(plan, plan.worker_template, node_shards)),
                ctx.params, param_oids=ctx.param_oids, param_formats=ctx.param_formats,
                result_formats=[0], describe=True,
            )
            for node_shards in groups.values()
        ]
        results = await _gather([run_on(c, m, collect=True) for c, m in zip(conns, msgs, strict=True)])
        for r in results:
            _raise(r)
        fields = pg.decode_row_description(results[0].row_description[5:]) if results[0].row_description else []
        ncols = len(fields)
        if split.star_outputs or split.combine_sort or split.combine_distinct is not None:
            from rewriter.combine import resolve_refs

            n_out = ncols - split.n_extra
            resolve_refs(split, n_out)
        types = await ctx.type_names([f.type_oid for f in fields])
        columns: list[list[bytes | None]] = [[] for _ in range(ncols)]
        for r in results:
            for row in r.rows or ():
                for i, v in enumerate(row):
                    columns[i].append(v)
        sql = _q(ctx, split.combine_sql([t for t, _ in types], ncols, len(ctx.param_oids)), shift=ncols)
        array_params = [_array_literal(c) for c in columns]
        params = array_params + list(ctx.params)
        n = len(ctx.params)
        orig_formats = (
            list(ctx.param_formats) if len(ctx.param_formats) > 1
            else [ctx.param_formats[0] if ctx.param_formats else 0] * n
        )
        formats = [0] * ncols + orig_formats
        oids = [a for _, a in types] + list(ctx.param_oids)
        combine_settings = dict(ctx.settings)
        conn = await lease.get(ctx.metadata_pool(), combine_settings)
        if ctx.row_description is not None:
            ctx.write(ctx.row_description)
        out = ClientOutput(ctx)
        res = await run_on(
            conn,
            extended_query(sql, params, param_oids=oids, param_formats=formats, result_formats=ctx.result_formats),
            sink=out.sink,
        )
        _raise(res)
        ctx.write(pg.command_complete(f"SELECT {out.sent}"))
    finally:
        lease.release()


# ---------------------------------------------------------------------------------- writes
def _sum_tags(tags: list[str], verb: str) -> str:
    total = 0
    for t in tags:
        parts = t.split()
        if parts and parts[0] == verb and parts[-1].isdigit():
            total += int(parts[-1])
    return f"INSERT 0 {total}" if verb == "INSERT" else f"{verb} {total}"


async def _run_multi_write(
    plan: Plan, ctx: ExecContext, statements: dict[int, list[str]], row_order: list[int] | None = None
) -> None:
    """Statements per shard → per node transactions, two-phase committed across nodes.

    With ``row_order`` (the shard of each input row of an INSERT ... RETURNING), the returned
    rows are written in input order, as PostgreSQL returns them, instead of as they arrive.
    """
    table = plan.tables[_first_dist(plan)]
    per_node: dict[int, list[str]] = {}
    shards_of_node: dict[int, list[int]] = {}
    for shard, sqls in statements.items():
        node = table.shards[shard].node_ids[0]
        per_node.setdefault(node, []).extend(sqls)
        shards_of_node.setdefault(node, []).append(shard)
    await _write_on_nodes(plan, ctx, per_node, relay_rows_from=None, row_order=row_order, shards_of_node=shards_of_node)


class _RowCollector:
    """Keeps one node's RETURNING rows (raw DataRow bytes) in arrival order."""

    def __init__(self) -> None:
        self.rows: list[bytes] = []

    def sink(self, buf: bytes, frames: list[tuple[int, int, int]]) -> None:
        self.rows.extend(buf[s:e] for _, s, e in frames)


async def _write_on_nodes(
    plan: Plan,
    ctx: ExecContext,
    per_node: dict[int, list[str]],
    relay_rows_from: int | None,
    row_order: list[int] | None = None,
    shards_of_node: dict[int, list[int]] | None = None,
    lead: int | None = None,
) -> None:
    """Run each node's statements in its transaction (the block's, or one of our own).

    With ``lead``, that node's statements run and must succeed before any other node's start
    (reference-table copies, see ``copies_in_lock_order``).
    """
    lease = _Lease(ctx)
    open_tx: list[BackendConnection] = []
    in_block = ctx.txn is not None  # the client's transaction: no BEGIN/COMMIT of our own
    try:
        if ctx.row_description is not None and plan.returning:
            ctx.write(ctx.row_description)
        out = ClientOutput(ctx)
        conns = {node: await lease.node(node, ctx.settings, write=True) for node in per_node}
        runs = []
        collectors: dict[int, _RowCollector] = {}
        for node, sqls in per_node.items():
            begin = b"" if in_block else extended_query("BEGIN", sync=False)
            body = begin + b"".join(
                extended_query(
                    _q(ctx, s), ctx.params, param_oids=ctx.param_oids, param_formats=ctx.param_formats,
                    result_formats=ctx.result_formats, sync=False,
                )
                for s in sqls
            ) + pg.SYNC
            relay = plan.returning and (relay_rows_from is None or relay_rows_from == node)
            sink = out.sink if relay else None
            if relay and row_order is not None:
                collectors[node] = _RowCollector()
                sink = collectors[node].sink
            runs.append(functools.partial(run_on, conns[node], body, sink=sink))
            if not in_block:
                open_tx.append(conns[node])
        results = await _run_lead_first(runs, list(per_node).index(lead) if lead in per_node else None)
        errors = [r.error for r in results if r.error is not None]
        if errors:
            raise errors[0]
        tags = [t for r in results for t in r.tags if t != "BEGIN"]
        if collectors and row_order is not None and shards_of_node is not None:
            # Split each node's rows by statement (one per shard, in order; counts from the tags),
            # then emit them in input-row order.
            per_shard: dict[int, list[bytes]] = {}
            for node, collector in collectors.items():
                node_tags = [t for t in results[list(per_node).index(node)].tags if t != "BEGIN"]
                pos = 0
                for shard, tag in zip(shards_of_node[node], node_tags, strict=False):
                    n = int(tag.split()[-1])
                    per_shard[shard] = collector.rows[pos : pos + n]
                    pos += n
            cursor = dict.fromkeys(per_shard, 0)
            ordered = []
            for shard in row_order:
                rows = per_shard.get(shard, [])
                i = cursor.get(shard, 0)
                if i < len(rows):
                    ordered.append(rows[i])
                    cursor[shard] = i + 1
            ctx.write(b"".join(ordered))
        if relay_rows_from is not None:
            node_tags = results[list(per_node).index(relay_rows_from)].tags
            tags = [t for t in node_tags if t != "BEGIN"]
        # All or nothing across nodes: two-phase commit with a durable decision (executor.twophase).
        open_tx.clear()
        if not in_block:
            await twophase.commit(list(conns.items()), ctx.decider or _NO_LOG)
        ctx.write(pg.command_complete(_sum_tags(tags, plan.command)))
    finally:
        for c in open_tx:
            if c.usable and c.tx_status != b"I":
                try:
                    await run_on(c, pg.query("ROLLBACK"))
                except PgError:
                    c.broken = True
        lease.release()


async def _run_lead_first(
    runs: list[Callable[[], Awaitable[TaskResult]]], lead: int | None
) -> list[TaskResult]:
    """Results of ``runs`` in order: ``runs[lead]`` alone first, the others then concurrently.

    The lead's row locks are taken before any other node is asked, so concurrent writers of
    the same rows queue on the lead and never hold copies on two nodes in opposite orders
    (a distributed deadlock no node's detector sees). A failing lead raises at once.
    """
    if lead is None or len(runs) < 2:
        return await _gather([run() for run in runs])
    first = await runs[lead]()
    _raise(first)
    rest = await _gather([run() for i, run in enumerate(runs) if i != lead])
    rest.insert(lead, first)
    return rest


def copies_in_lock_order(nodes: list[int], metadata_node_id: int | None) -> list[int]:
    """The nodes of a shard's copies (a reference table's), the one every writer locks first at
    the head.

    One rule for every proxy and every write path (statements, COPY, INSERT ... SELECT), inside
    blocks or not: the metadata node if it holds a copy (the copy reads go to as well, so
    ``SELECT ... FOR UPDATE`` queues there too), else the lowest node id; the rest by node id.
    A writer that reaches a later copy holds the rows on the first one, so writers of the same
    rows queue on that first copy and never wait on each other across two nodes.
    """
    ordered = sorted(nodes)
    if metadata_node_id in ordered:
        ordered.remove(metadata_node_id)  # type: ignore[arg-type]
        ordered.insert(0, metadata_node_id)  # type: ignore[arg-type]
    return ordered


async def _run_reference_write(plan: Plan, ctx: ExecContext) -> None:
    """A write to a reference table: on every copy, the lead copy first (fixed lock order)."""
    target = plan.tables[0]
    nodes = copies_in_lock_order(target.shards[0].node_ids, ctx.metadata_node_id)
    if not nodes:
        raise PgError("XX000", f"reference table {target.name} has no placement")
    sql = plan.sql_for_shard(plan.template, 0)
    lead = nodes[0]
    await _write_on_nodes(plan, ctx, {n: [sql] for n in nodes}, relay_rows_from=lead, lead=lead)


async def _fill_values(plan: Plan, ctx: ExecContext, n_rows: int) -> list[list[str]]:
    """Next values of the sequence-fed columns, ``n_rows`` of each, from the metadata node."""
    if not plan.insert_fill:
        return []
    pool = ctx.metadata_pool()
    conn = await pool.acquire()
    try:
        cols = ", ".join(f"({expr})::text" for expr in plan.insert_fill)
        rows = await conn.simple_query(f"SELECT {cols} FROM generate_series(1, {int(n_rows)})")
    finally:
        pool.release(conn, reset=not conn.usable)
    return [[r[j].decode() for r in rows] for j in range(len(plan.insert_fill))]  # type: ignore[union-attr]




async def _row_times(plan: Plan, ctx: ExecContext) -> list[tuple[str, int]]:
    """Each VALUES row's time (ISO/literal text, internal value) for a hypertable INSERT."""
    ht = plan.tables[0].hypertable
    assert ht is not None
    texts: list[str | None] = []
    expressions: list[str] = []
    for row in plan.insert_rows:
        k = row.time_key
        assert k is not None
        if k.kind == "expr":
            texts.append(None)
            expressions.append(k.text or "")
        elif k.kind == "const":
            texts.append(k.text)
        else:
            try:
                texts.append(_param_text(ctx, k.number))
            except UnknownValue as exc:
                raise PgError("0A000", f"cannot read the time value {exc} of a hypertable row", hint="Write it as a plain literal or use a parameter.") from None
    if any(t is None for t, row in zip(texts, plan.insert_rows, strict=True) if row.time_key.kind != "expr"):  # type: ignore[union-attr]
        raise PgError("23502", f'null value in column "{ht.time_column}" of relation "{plan.tables[0].name}" violates not-null constraint')
    evaluated = iter(await hypertime.evaluate(ctx.metadata_pool(), ht.time_type, expressions, ctx.settings))
    full = [t if t is not None else next(evaluated) for t in texts]
    internal = await hypertime.TimeValues(ht, ctx.settings).convert(ctx.metadata_pool(), full)
    return list(zip(full, internal, strict=True))


async def _run_insert(plan: Plan, ctx: ExecContext) -> None:
    table = plan.tables[0]
    fills = await _fill_values(plan, ctx, len(plan.insert_rows))
    times = await _row_times(plan, ctx) if table.hypertable is not None else None
    chunk_needs: list[tuple[int, int]] = []
    by_shard: dict[int, list[str]] = {}
    order: list[int] = []  # shard of each VALUES row, in input order
    for r, row in enumerate(plan.insert_rows):
        key = row.key
        text = None
        if key is not None:
            if key.kind == "const":
                text = key.text
            elif key.kind == "expr":
                text = times[r][0] if times is not None else None
            elif key.kind == "fill":
                text = fills[key.number][r]
            else:
                try:
                    text = _param_text(ctx, key.number)
                except UnknownValue as exc:
                    raise PgError("0A000", f"cannot route a row by the literal {exc} of the distribution column", hint="Write the value as a plain literal or use a parameter.") from None
        if text is None:
            raise PgError(
                "23502",
                f'null value in distribution column "{table.dist_column}" of relation "{table.name}"',
                hint="Every row of a distributed table needs a value in its distribution column.",
            )
        s = shard_of(plan.dist_type or "", text, plan.shard_count)
        if s is None or s < 0:
            raise PgError("22P02", f'invalid input for distribution column "{table.dist_column}": "{text}"')
        values_sql = row.values_sql
        for j, column in enumerate(fills):
            values_sql = values_sql.replace(f"__orochi_fill_{j}__", quote_literal(column[r]))
        if times is not None:
            chunk_needs.append((s, times[r][1]))
            if row.time_key is not None and row.time_key.kind == "expr":
                values_sql = values_sql.replace(TIME_PLACEHOLDER, quote_literal(times[r][0]))
        by_shard.setdefault(s, []).append(values_sql)
        order.append(s)
    if chunk_needs and ctx.ensure_chunks is not None:
        await ctx.ensure_chunks(table, chunk_needs)
    statements = {
        s: [plan.sql_for_shard(plan.insert_prefix + ", ".join(rows) + plan.insert_suffix, s)]
        for s, rows in by_shard.items()
    }
    if len(statements) == 1:
        (s, sqls), = statements.items()
        await _run_single(plan, ctx, table.shards[s].node_ids[0], sqls[0])
        return
    await _run_multi_write(plan, ctx, statements, row_order=order if plan.returning else None)
