"""Retention and compression policies: the job procedures that age a hypertable's chunks.

``policy_retention`` drops whole chunks whose range ended before ``now() - drop_after``;
``policy_compression`` compresses hot chunks whose range ended before ``now() -
compress_after``. Both choose from the catalog's chunk list and act through a
:class:`ChunkOps` that the hosting process provides (the proxy: node pools and catalog, see
``orochi_proxy.policyadmin``), because ``policies`` does not import ``orochi_proxy``.

Both are safe to run again after a crash at any point: dropping goes node first, then catalog
(``DROP TABLE IF EXISTS`` on the rerun); each compression step leaves a readable chunk and a
rerun finishes it (``orochi_proxy.compressadmin``). Configs use TimescaleDB's keys
(``hypertable_id``, ``drop_after``, ``compress_after``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from policies.jobs import JobContext, job_proc
from rewriter.errors import PgError
from rewriter.model import ChunkInfo, TableInfo


class ChunkOps(Protocol):
    """What the policies need from the process that runs them."""

    def table(self, hypertable_id: int) -> TableInfo | None: ...

    async def cutoff(self, table: TableInfo, age: Any) -> int: ...

    async def drop(self, table: TableInfo, chunks: list[ChunkInfo]) -> None: ...

    async def compress(self, table: TableInfo, chunk: ChunkInfo) -> None: ...

    async def refresh_continuous_aggregate(self, cagg_id: int, start_offset: Any, end_offset: Any) -> None: ...


_ops_factory: Callable[[Any], ChunkOps] | None = None


def set_ops_factory(factory: Callable[[Any], ChunkOps]) -> None:
    """Called by the hosting process at import: ``factory(ctx.app)`` gives the ChunkOps."""
    global _ops_factory
    _ops_factory = factory


def _ops(ctx: JobContext) -> ChunkOps:
    if _ops_factory is None or ctx.app is None:
        raise PgError("55000", "chunk policies need a proxy process to run in (orochi-proxy serve or orochi-proxy jobs run)")
    return _ops_factory(ctx.app)


def _check(key: str) -> Callable[[dict[str, Any]], None]:
    def check(config: dict[str, Any]) -> None:
        if not isinstance(config.get("hypertable_id"), int):
            raise PgError("22023", "config must have an integer hypertable_id")
        if config.get(key) in (None, ""):
            raise PgError("22023", f"config must have {key}")

    return check


def _table(ops: ChunkOps, config: dict[str, Any]) -> TableInfo:
    table = ops.table(int(config["hypertable_id"]))
    if table is None or table.hypertable is None:
        raise PgError("TS001", f"hypertable {config['hypertable_id']} does not exist")
    return table


def chunks_older_than(table: TableInfo, cutoff: int, tier: str | None = None) -> list[ChunkInfo]:
    """Whole chunks whose range ends at or before ``cutoff`` (optionally of one tier)."""
    ht = table.hypertable
    assert ht is not None
    return [c for c in ht.chunks if c.range_end <= cutoff and (tier is None or c.tier == tier)]


@job_proc("policy_retention", application_name="Retention Policy", check=_check("drop_after"))
async def policy_retention(ctx: JobContext, config: dict[str, Any]) -> None:
    ops = _ops(ctx)
    table = _table(ops, config)
    cutoff = await ops.cutoff(table, config["drop_after"])
    chunks = chunks_older_than(table, cutoff)
    if chunks:
        ctx.log.info("retention job %s: dropping %d chunk(s) of %s", ctx.job_id, len(chunks), table.name)
        await ops.drop(table, chunks)


@job_proc("policy_compression", application_name="Compression Policy", check=_check("compress_after"))
async def policy_compression(ctx: JobContext, config: dict[str, Any]) -> None:
    ops = _ops(ctx)
    table = _table(ops, config)
    cutoff = await ops.cutoff(table, config["compress_after"])
    for chunk in chunks_older_than(table, cutoff, tier="hot"):
        ctx.log.info("compression job %s: compressing %s", ctx.job_id, chunk.qualified)
        await ops.compress(table, chunk)


def _check_cagg(config: dict[str, Any]) -> None:
    if not isinstance(config.get("mat_hypertable_id"), int):
        raise PgError("22023", "config must have an integer mat_hypertable_id")


@job_proc("policy_refresh_continuous_aggregate", application_name="Refresh Continuous Aggregate Policy", check=_check_cagg)
async def policy_refresh_continuous_aggregate(ctx: JobContext, config: dict[str, Any]) -> None:
    """Refresh the window ``[now() - start_offset, now() - end_offset)`` (NULL: unbounded)."""
    await _ops(ctx).refresh_continuous_aggregate(int(config["mat_hypertable_id"]), config.get("start_offset"), config.get("end_offset"))
