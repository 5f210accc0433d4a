"""TimescaleDB's job API as admin SQL: add_job, alter_job, delete_job and ``CALL run_job``.

``add_job``/``alter_job``/``delete_job`` write ``orochi_catalog.jobs`` through the client's own
metadata-node connection (``session.dist.text_rows``): as in TimescaleDB they take part in the
client's transaction, run with its role (a job is owned by ``current_user``) and print times in
its TimeZone. ``run_job`` runs the job in this proxy process, outside the client's transaction
(as TimescaleDB's procedure, it refuses to run inside a transaction block), and raises the
job's own error. Arguments of type interval, jsonb and timestamptz are declared ``text`` for
``$n`` parameters: PostgreSQL reads them with the casts, and clients bind them as strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg

from executor import protocol as pg
from executor.protocol import PgError
from orochi_proxy.localexec import (
    BOOL,
    INT4,
    INTERVAL,
    JSONB,
    TEXT,
    TIMESTAMPTZ,
    VOID,
    ParamSpec,
    WireValue,
    admin_function,
)
from policies import jobs
from rewriter.quoting import quote_literal

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from orochi_proxy.session import Session

_TYPE_OIDS = {"int4": INT4, "interval": INTERVAL, "bool": BOOL, "jsonb": JSONB, "timestamptz": TIMESTAMPTZ, "text": TEXT}
ALTER_JOB_RESULT = [(name, _TYPE_OIDS[t]) for name, _, t in jobs.ALTER_JOB_COLUMNS]


def _session(session: Session | None, fn: str) -> Session:
    if session is None:
        raise PgError("0A000", f"{fn}() needs a client session")
    return session


def _no_timezone(value: str | None) -> None:
    if value is not None:
        raise PgError(
            "0A000",
            "time-zone-aware job schedules are not supported by orochi-proxy",
            hint="Leave timezone NULL; fixed schedules follow the server's time zone.",
        )


async def _resolve_proc(sql: jobs.SqlRunner, name: str, what: str) -> tuple[str, str]:
    """(schema, name) of a procedure argument, as PostgreSQL resolves a regproc.

    A registered procedure (``_timescaledb_functions.policy_retention``) has no SQL function
    behind it, so its qualified name is looked up in the registry first.
    """
    parts = await sql(f"SELECT unnest(parse_ident({quote_literal(name)}))")
    idents = [p[0] or "" for p in parts]
    if len(idents) == 2 and jobs.REGISTRY.get(idents[0], idents[1]) is not None:
        return idents[0], idents[1]
    rows = await sql(
        "SELECT n.nspname, p.proname FROM pg_catalog.pg_proc p "
        "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
        f"WHERE p.oid = {quote_literal(name)}::regproc"
    )
    if not rows:
        raise PgError("42883", f"{what} {name} does not exist")
    return rows[0][0] or "", rows[0][1] or ""


@admin_function(
    "add_job",
    [
        ParamSpec("proc", TEXT),
        ParamSpec("schedule_interval", TEXT),
        ParamSpec("config", TEXT, None),
        ParamSpec("initial_start", TEXT, None),
        ParamSpec("scheduled", BOOL, True),
        ParamSpec("check_config", TEXT, None),
        ParamSpec("fixed_schedule", BOOL, True),
        ParamSpec("timezone", TEXT, None),
    ],
    [("add_job", INT4)],
    needs_session=True,
)
async def add_job(server: ProxyServer, a: dict[str, Any], session: Session | None) -> list[tuple[Any, ...]]:
    """Schedule a user-defined action: ``CALL proc(job_id, config)`` every schedule_interval."""
    sql = _session(session, "add_job").dist.text_rows
    if a["proc"] is None or a["schedule_interval"] is None:
        raise PgError("22004", "proc and schedule_interval must not be NULL")
    _no_timezone(a["timezone"])
    schema, name = await _resolve_proc(sql, a["proc"], "function or procedure")
    check = await _resolve_proc(sql, a["check_config"], "check function") if a["check_config"] else None
    job_id = await jobs.add_job(
        sql,
        name,
        a["schedule_interval"],
        proc_schema=schema,
        config=a["config"],
        initial_start=a["initial_start"],
        scheduled=bool(a["scheduled"]) if a["scheduled"] is not None else True,
        fixed_schedule=bool(a["fixed_schedule"]) if a["fixed_schedule"] is not None else True,
        check_schema=check[0] if check else None,
        check_name=check[1] if check else None,
    )
    server.jobs.wake()
    return [(job_id,)]


@admin_function(
    "alter_job",
    [
        ParamSpec("job_id", INT4),
        ParamSpec("schedule_interval", TEXT, None),
        ParamSpec("max_runtime", TEXT, None),
        ParamSpec("max_retries", INT4, None),
        ParamSpec("retry_period", TEXT, None),
        ParamSpec("scheduled", BOOL, None),
        ParamSpec("config", TEXT, None),
        ParamSpec("next_start", TEXT, None),
        ParamSpec("if_exists", BOOL, False),
        ParamSpec("check_config", TEXT, None),
        ParamSpec("fixed_schedule", BOOL, None),
        ParamSpec("initial_start", TEXT, None),
        ParamSpec("timezone", TEXT, None),
    ],
    ALTER_JOB_RESULT,
    needs_session=True,
)
async def alter_job(server: ProxyServer, a: dict[str, Any], session: Session | None) -> list[tuple[Any, ...]]:
    """Change a job's schedule, retries, config or state; returns the job's settings."""
    sql = _session(session, "alter_job").dist.text_rows
    if a["job_id"] is None:
        raise PgError("22004", "job_id must not be NULL")
    _no_timezone(a["timezone"])
    job = await jobs.get_job(sql, a["job_id"])
    if job is None:
        if a["if_exists"]:
            return [tuple(None for _ in ALTER_JOB_RESULT)]
        raise jobs.not_found(a["job_id"])
    check = await _resolve_proc(sql, a["check_config"], "check function") if a["check_config"] else None
    row = await jobs.alter_job(
        sql,
        a["job_id"],
        schedule_interval=a["schedule_interval"],
        max_runtime=a["max_runtime"],
        max_retries=a["max_retries"],
        retry_period=a["retry_period"],
        scheduled=a["scheduled"],
        config=a["config"],
        next_start=a["next_start"],
        fixed_schedule=a["fixed_schedule"],
        initial_start=a["initial_start"],
        check=check,
        wire=True,
    )
    if row is None:  # deleted in between
        raise jobs.not_found(a["job_id"])
    server.jobs.wake()
    n = len(ALTER_JOB_RESULT)
    return [
        tuple(
            None if text is None else WireValue(text.encode(), bytes.fromhex(binary or ""))
            for text, binary in zip(row[:n], row[n:], strict=True)
        )
    ]


@admin_function("delete_job", [ParamSpec("job_id", INT4)], [("delete_job", VOID)], needs_session=True)
async def delete_job(server: ProxyServer, a: dict[str, Any], session: Session | None) -> list[tuple[Any, ...]]:
    """Remove a job; its run history stays in timescaledb_information.job_history."""
    if a["job_id"] is None:
        return [(None,)]  # STRICT, as in TimescaleDB
    if not await jobs.delete_job(_session(session, "delete_job").dist.text_rows, a["job_id"]):
        raise jobs.not_found(a["job_id"])
    return [("",)]


@admin_function("run_job", [ParamSpec("job_id", INT4)], [], needs_session=True, procedure=True)
async def run_job(server: ProxyServer, a: dict[str, Any], session: Session | None) -> list[tuple[Any, ...]]:
    """Run a job now, whatever its schedule, and wait for it; its error becomes this call's."""
    s = _session(session, "run_job")
    if s.tx_status != pg.TX_IDLE:
        raise PgError("25001", "run_job() cannot run inside a transaction block")
    job_id = a["job_id"]
    if job_id is None:
        raise PgError("22004", "job_id must not be NULL")
    try:
        result = await server.jobs.runner.run(job_id, origin="run_job")
    except asyncpg.PostgresError as exc:  # claiming or recording the run failed, not the job
        raise PgError(getattr(exc, "sqlstate", None) or "XX000", f"could not run job {job_id}: {exc}") from None
    except (OSError, asyncpg.InterfaceError) as exc:
        raise PgError("08006", f"could not run job {job_id}: lost the metadata database ({exc})") from None
    if result.skipped == "not found":
        raise jobs.not_found(job_id)
    if result.skipped == "running":
        raise PgError(
            "55P03",
            f"job {job_id} is running already",
            hint="Wait for that run to finish; timescaledb_information.job_stats shows it as Running.",
        )
    if not result.succeeded:
        raise PgError(
            result.sqlerrcode or "XX000",
            result.message or f"job {job_id} failed",
            hint=f"The run is recorded in timescaledb_information.job_errors (job_id {job_id}).",
        )
    return []
