"""Retention and compression policies with TimescaleDB's names, and the chunk operations the
policy jobs (``policies.lifecycle``) run with in a proxy process.

``add_retention_policy(relation, drop_after, ...)`` / ``add_compression_policy(hypertable,
compress_after, ...)`` schedule a job (``policies.jobs.add_job``) and return its id;
``remove_*_policy`` delete it. The job runs on exactly one proxy replica at a time, on demand
with ``orochi-proxy jobs run`` or ``CALL run_job(id)``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from executor import protocol as pg
from executor.protocol import PgError
from orochi_proxy.chunkadmin import age_cutoff_sql, drop_chunk_tables
from orochi_proxy.compressadmin import compress, settings_of
from orochi_proxy.distribute import resolve_table
from orochi_proxy.hypertable import hypertable_of
from orochi_proxy.localexec import BOOL, INT4, TEXT, VOID, ParamSpec, admin_function
from policies import jobs, lifecycle
from rewriter.model import ChunkInfo, TableInfo
from rewriter.quoting import quote_literal

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session


class ServerChunkOps:
    """``policies.lifecycle.ChunkOps`` on a ProxyServer (catalog + node pools of the metadata database)."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.database = server.config.metadata.dbname

    def table(self, hypertable_id: int) -> TableInfo | None:
        for t in self.server.catalog.model.tables.values():
            if t.hypertable is not None and t.hypertable.hypertable_id == hypertable_id:
                return t
        return None

    async def cutoff(self, table: TableInfo, age: Any) -> int:
        ht = table.hypertable
        assert ht is not None
        if not ht.is_time_type:
            raise PgError("0A000", f"policies on integer time column {ht.time_column} are not supported", hint="Call drop_chunks()/compress_chunk() yourself.")
        pool = self.server.metadata_pool(self.database)
        async with pool.connection() as conn:
            rows = await conn.simple_query(age_cutoff_sql(ht, str(age)))
        return int(rows[0][0])  # type: ignore[arg-type]

    async def drop(self, table: TableInfo, chunks: list[ChunkInfo]) -> None:
        await drop_chunk_tables(self.server, self.database, table, chunks)

    def _live(self, table: TableInfo, chunk: ChunkInfo) -> ChunkInfo | None:
        current = self.server.catalog.model.tables.get((table.schema, table.name))
        ht = current.hypertable if current is not None else None
        return next((c for c in ht.chunks if c.chunk_id == chunk.chunk_id), None) if ht is not None else None

    async def _exists_on_node(self, table: TableInfo, chunk: ChunkInfo) -> bool:
        pool = self.server.node_pool(table.chunk_node(chunk), self.database)
        async with pool.connection() as conn:
            rows = await conn.simple_query(f"SELECT to_regclass({quote_literal(chunk.qualified)}) IS NOT NULL")
        return rows[0][0] == b"t"

    async def compress(self, table: TableInfo, chunk: ChunkInfo) -> None:
        """Compress ``chunk`` unless it is gone: a retention run (or drop_chunks) may drop it
        between the policy's chunk list and this call; that is not a failure of the policy."""
        live = self._live(table, chunk)
        if live is None:
            return
        try:
            await compress(self.server, self.database, table, live)
        except PgError as exc:
            if exc.sqlstate != "42P01" or await self._exists_on_node(table, live):
                raise
            # Dropped on its node by a concurrent retention run, which forgets it next.


    async def refresh_continuous_aggregate(self, cagg_id: int, start_offset: Any, end_offset: Any) -> None:
        from orochi_proxy import caggs

        async def sql(text: str) -> list[list[str | None]]:
            pool = self.server.metadata_pool(self.database)
            async with pool.connection() as conn:
                rows = await conn.simple_query(text)
            return [[None if v is None else v.decode() for v in r] for r in rows]

        cagg = await caggs.load_by_id(sql, cagg_id)
        edges = []
        for offset in (start_offset, end_offset):
            if offset is None:
                edges.append(None)
            else:
                rows = await sql(f"SELECT (now() - {quote_literal(str(offset))}::interval)::text")
                edges.append(rows[0][0])
        await caggs.refresh(self.server, self.database, cagg, edges[0], edges[1])


lifecycle.set_ops_factory(ServerChunkOps)


def _check_interval(ht_table: TableInfo, value: str | None, name: str) -> str:
    if value is None:
        raise PgError("22004", f"{name} cannot be NULL")
    ht = ht_table.hypertable
    assert ht is not None
    if not ht.is_time_type:
        raise PgError("0A000", f"{name} for an integer time column needs an integer_now function, which is not supported")
    return value


async def _add_policy(
    server: ProxyServer,
    session: Session,
    relation: str | None,
    proc: str,
    key: str,
    age: str | None,
    if_not_exists: bool,
    schedule_interval: str | None,
    initial_start: str | None,
    what: str,
) -> list[tuple[Any, ...]]:
    if relation is None:
        raise PgError("22004", "invalid hypertable: cannot be NULL")
    schema, name = await resolve_table(session, relation)
    table = hypertable_of(server, schema, name)
    ht = table.hypertable
    assert ht is not None
    age = _check_interval(table, age, key)
    sql = session.dist.text_rows
    existing = await jobs.find_jobs(sql, proc_name=proc, hypertable_id=ht.hypertable_id)
    if existing:
        if if_not_exists:
            session.client.write(pg.notice_response(f'{what} policy already exists for hypertable "{name}", skipping'))
            return [(-1,)]
        raise PgError("42710", f'{what} policy already exists for hypertable "{name}"', hint="Use if_not_exists => true, or remove it first.")
    if schedule_interval is None:
        if proc == "policy_retention":
            schedule_interval = "1 day"
        else:
            # TimescaleDB: half the chunk interval, at most 12 hours.
            half = max(ht.chunk_interval // 2, 1)
            schedule_interval = f"{min(half, 12 * 3600 * 1_000_000)} microseconds"
    config = {"hypertable_id": ht.hypertable_id, key: age}
    job_id = await jobs.add_job(
        sql, proc, schedule_interval, config=json.dumps(config), hypertable_id=ht.hypertable_id,
        initial_start=initial_start, fixed_schedule=initial_start is not None,
    )
    server.jobs.wake()
    return [(job_id,)]


async def _remove_policy(server: ProxyServer, session: Session, relation: str | None, proc: str, if_exists: bool, what: str) -> bool:
    if relation is None:
        raise PgError("22004", "invalid hypertable: cannot be NULL")
    schema, name = await resolve_table(session, relation)
    table = hypertable_of(server, schema, name)
    assert table.hypertable is not None
    sql = session.dist.text_rows
    found = await jobs.find_jobs(sql, proc_name=proc, hypertable_id=table.hypertable.hypertable_id)
    if not found:
        if if_exists:
            return False
        raise PgError("42704", f'{what} policy not found for hypertable "{name}"')
    for job in found:
        await jobs.delete_job(sql, job.job_id)
    return True


@admin_function(
    "add_retention_policy",
    [
        ParamSpec("relation", TEXT),
        ParamSpec("drop_after", TEXT, None),
        ParamSpec("if_not_exists", BOOL, False),
        ParamSpec("schedule_interval", TEXT, None),
        ParamSpec("initial_start", TEXT, None),
        ParamSpec("timezone", TEXT, None),
        ParamSpec("drop_created_before", TEXT, None),
    ],
    [("add_retention_policy", INT4)],
    needs_session=True,
)
async def add_retention_policy(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Drop chunks older than drop_after on a schedule (default daily); returns the job id."""
    if a["drop_created_before"] is not None or a["timezone"] is not None:
        raise PgError("0A000", "drop_created_before and timezone are not supported", hint="Use drop_after.")
    return await _add_policy(
        server, session, a["relation"], "policy_retention", "drop_after", a["drop_after"], bool(a["if_not_exists"]),
        a["schedule_interval"], a["initial_start"], "retention",
    )


@admin_function(
    "remove_retention_policy",
    [ParamSpec("relation", TEXT), ParamSpec("if_exists", BOOL, False)],
    [("remove_retention_policy", VOID)],
    needs_session=True,
)
async def remove_retention_policy(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Remove the hypertable's retention policy (its job)."""
    await _remove_policy(server, session, a["relation"], "policy_retention", bool(a["if_exists"]), "retention")
    return [("",)]


@admin_function(
    "add_compression_policy",
    [
        ParamSpec("hypertable", TEXT),
        ParamSpec("compress_after", TEXT, None),
        ParamSpec("if_not_exists", BOOL, False),
        ParamSpec("schedule_interval", TEXT, None),
        ParamSpec("initial_start", TEXT, None),
        ParamSpec("timezone", TEXT, None),
        ParamSpec("compress_created_before", TEXT, None),
    ],
    [("add_compression_policy", INT4)],
    needs_session=True,
)
async def add_compression_policy(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Compress chunks older than compress_after on a schedule; returns the job id."""
    if a["compress_created_before"] is not None or a["timezone"] is not None:
        raise PgError("0A000", "compress_created_before and timezone are not supported", hint="Use compress_after.")
    if a["hypertable"] is not None:
        schema, name = await resolve_table(session, a["hypertable"])
        settings_of(hypertable_of(server, schema, name))  # compression must be enabled first
    return await _add_policy(
        server, session, a["hypertable"], "policy_compression", "compress_after", a["compress_after"],
        bool(a["if_not_exists"]), a["schedule_interval"], a["initial_start"], "compression",
    )


@admin_function(
    "remove_compression_policy",
    [ParamSpec("hypertable", TEXT), ParamSpec("if_exists", BOOL, False)],
    [("remove_compression_policy", BOOL)],
    needs_session=True,
)
async def remove_compression_policy(server: ProxyServer, a: dict[str, Any], session: Session) -> list[tuple[Any, ...]]:
    """Remove the hypertable's compression policy; false if there was none (with if_exists)."""
    return [(await _remove_policy(server, session, a["hypertable"], "policy_compression", bool(a["if_exists"]), "compression"),)]
