"""Jobs: the procedures a job can run, and the catalog rows that schedule them.

TimescaleDB runs retention, compression and continuous-aggregate refresh as *jobs*: a row that
names a procedure, its ``config`` (jsonb) and a schedule, run by a background worker. Stock
PostgreSQL has no background worker we could load, so here the proxy replicas run them
(``policies/jobscheduler.py`` elects one), and this module is the part everyone shares:

* :data:`REGISTRY` maps procedure names to Python coroutines. A policy registers its procedure
  once, at import::

      @job_proc("policy_retention", application_name="Retention Policy", check=check_retention)
      async def policy_retention(ctx: JobContext, config: dict[str, Any]) -> None: ...

  and schedules it with :func:`add_job` (``proc_schema`` defaults to
  :data:`BUILTIN_SCHEMA`, TimescaleDB's ``_timescaledb_functions``). A job whose procedure is
  not registered is a *user-defined action*: a SQL procedure or function on the metadata
  database, run as ``CALL schema.proc(job_id, config)`` (``SELECT`` for a function).
* :func:`add_job`, :func:`alter_job`, :func:`delete_job`, :func:`get_job`, :func:`find_jobs`,
  :func:`job_history` write and read ``orochi_catalog.jobs`` / ``job_runs``. They take a
  :data:`SqlRunner` (SQL text in, rows of text out) rather than a connection, so the same code
  serves a client's own session (``alter_job`` in a client transaction commits or rolls back
  with it, and prints times in the client's TimeZone) and the control plane's asyncpg
  connections (:func:`asyncpg_runner`).

A procedure must be safe to run again after a crash at any point: a run whose runner died is
re-run by the next one (see ``policies/jobrun.py``). It raises on failure; the exception's
``sqlstate`` (asyncpg and ``PgError`` errors carry one) is recorded with its message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg

from rewriter.errors import PgError
from rewriter.quoting import qualified_name, quote_literal

SCHEMA = "orochi_catalog"
BUILTIN_SCHEMA = "_timescaledb_functions"  # where TimescaleDB 2.12+ keeps its policy procedures
USER_ACTION = "User-Defined Action"  # TimescaleDB's application_name of add_job() jobs

#: SQL text in, rows of text (``None`` for NULL) out: ``session.dist.text_rows`` or
#: :func:`asyncpg_runner`. Statements built here select text so both give the same rows.
SqlRunner = Callable[[str], Awaitable[list[list[str | None]]]]
#: Opens a new asyncpg connection to the metadata database.
ConnectFactory = Callable[[], Awaitable[asyncpg.Connection]]
#: A value PostgreSQL reads as an interval: its text (``'1 day'``) or a timedelta.
IntervalLike = str | timedelta


@dataclass
class JobContext:
    """What a running procedure gets besides its config.

    ``conn`` is the run's own connection to the metadata database; the runner holds the job's
    lease on it, so it stays valid exactly as long as the run does (if it drops, the run is
    cancelled and another runner re-runs the job). Use it freely; leave it outside a
    transaction when you return. ``connect`` opens more connections. ``app`` is what the
    process hosting the runner provides (the proxy passes its ``ProxyServer``: node pools,
    catalog) and is ``None`` where nothing was given.
    """

    job_id: int
    run_id: int
    proc_schema: str
    proc_name: str
    hypertable_id: int | None
    conn: asyncpg.Connection
    connect: ConnectFactory
    app: Any = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("policies.jobs"))


JobProcFn = Callable[[JobContext, dict[str, Any]], Awaitable[None]]
#: Validates a config before it is stored (add_job/alter_job); raises ``PgError`` 22023.
ConfigCheck = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class JobProc:
    """A registered procedure: what runs, how its jobs are named, how configs are checked."""

    name: str
    run: JobProcFn
    application_name: str
    check: ConfigCheck | None = None
    schema: str = BUILTIN_SCHEMA


class JobRegistry:
    """Procedures by (schema, name); the runner looks a job's procedure up here first."""

    def __init__(self) -> None:
        self._procs: dict[tuple[str, str], JobProc] = {}

    def register(self, proc: JobProc) -> None:
        """Add ``proc``; registering the same name twice is a programming error."""
        key = (proc.schema, proc.name)
        if key in self._procs and self._procs[key].run is not proc.run:
            raise ValueError(f"job procedure {proc.schema}.{proc.name} is already registered")
        self._procs[key] = proc

    def get(self, schema: str, name: str) -> JobProc | None:
        return self._procs.get((schema, name))

    def names(self) -> list[str]:
        return sorted(f"{s}.{n}" for s, n in self._procs)


REGISTRY = JobRegistry()


def job_proc(
    name: str,
    *,
    application_name: str,
    check: ConfigCheck | None = None,
    schema: str = BUILTIN_SCHEMA,
    registry: JobRegistry = REGISTRY,
) -> Callable[[JobProcFn], JobProcFn]:
    """Decorator: register a coroutine ``(ctx, config) -> None`` as job procedure ``name``."""

    def deco(fn: JobProcFn) -> JobProcFn:
        registry.register(JobProc(name, fn, application_name, check, schema))
        return fn

    return deco


# ------------------------------------------------------------------------------ SQL runners


def asyncpg_runner(conn: asyncpg.Connection) -> SqlRunner:
    """A :data:`SqlRunner` on an asyncpg connection (the statements here select only text)."""

    async def run(sql: str) -> list[list[str | None]]:
        return [[None if v is None else str(v) for v in r] for r in await conn.fetch(sql)]

    return run


def interval_sql(value: IntervalLike) -> str:
    """A SQL interval expression for a text or timedelta value."""
    if isinstance(value, timedelta):
        return f"interval '{value.total_seconds()!r} seconds'"
    return f"{quote_literal(str(value))}::interval"


def _opt(value: Any, cast: str) -> str:
    """A SQL literal of type ``cast`` for a Python value (NULL for None)."""
    if value is None:
        return f"NULL::{cast}"
    if cast == "interval":
        return interval_sql(value)
    if cast == "jsonb" and not isinstance(value, str):
        value = json.dumps(dict(value))
    elif isinstance(value, bool):
        return "true" if value else "false"
    elif isinstance(value, int):
        return str(value)
    return f"{quote_literal(str(value))}::{cast}"


# alter_job's result (TimescaleDB's RETURNS TABLE): name, SQL expression, type.
ALTER_JOB_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("job_id", "job_id", "int4"),
    ("schedule_interval", "schedule_interval", "interval"),
    ("max_runtime", "max_runtime", "interval"),
    ("max_retries", "max_retries", "int4"),
    ("retry_period", "retry_period", "interval"),
    ("scheduled", "scheduled", "bool"),
    ("config", "config", "jsonb"),
    ("next_start", "next_start", "timestamptz"),
    ("check_config", "CASE WHEN check_name IS NOT NULL THEN format('%I.%I', check_schema, check_name) END", "text"),
    ("fixed_schedule", "fixed_schedule", "bool"),
    ("initial_start", "initial_start", "timestamptz"),
    ("timezone", "timezone", "text"),
)
_SEND = {
    "int4": "int4send", "bool": "boolsend", "text": "textsend", "interval": "interval_send",
    "jsonb": "jsonb_send", "timestamptz": "timestamptz_send",
}


def wire_select(columns: tuple[tuple[str, str, str], ...]) -> str:
    """A select list with each column as text, then each as hex of its binary (typsend) form.

    Admin functions answer clients that may ask for either format; PostgreSQL's own output
    and send functions make both exactly what the server would have sent.
    """
    text = [f"({expr})::text" for _, expr, _ in columns]
    binary = [f"encode(pg_catalog.{_SEND[t]}(({expr})::{t}), 'hex')" for _, expr, t in columns]
    return ", ".join(text + binary)


def text_select(columns: tuple[tuple[str, str, str], ...]) -> str:
    return ", ".join(f"({expr})::text" for _, expr, _ in columns)


# ------------------------------------------------------------------------------ catalog writes

JsonConfig = Mapping[str, Any] | str  # a mapping, or JSON text as a client wrote it


async def check_config(
    sql: SqlRunner,
    proc_schema: str,
    proc_name: str,
    config: JsonConfig | None,
    check: tuple[str, str] | None = None,
    registry: JobRegistry = REGISTRY,
) -> None:
    """Validate ``config`` as the job's procedure expects it, before it is stored.

    The registered procedure's ``check`` (Python), and ``check`` — a SQL function or procedure
    ``(config jsonb)``, TimescaleDB's ``check_config`` — called through ``sql``.
    """
    proc = registry.get(proc_schema, proc_name)
    if proc is not None and proc.check is not None:
        if isinstance(config, str):
            try:
                parsed = json.loads(config)
            except ValueError as exc:
                raise PgError("22P02", f"invalid input syntax for type json: {exc}") from None
        else:
            parsed = dict(config) if config is not None else {}
        proc.check(parsed or {})
    if check is not None:
        kind = await sql(
            "SELECT p.prokind::text FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n "
            f"ON n.oid = p.pronamespace WHERE n.nspname = {quote_literal(check[0])} "
            f"AND p.proname = {quote_literal(check[1])} LIMIT 1"
        )
        verb = "CALL" if kind and kind[0][0] == "p" else "SELECT"
        await sql(f"{verb} {qualified_name(*check)}({_opt(config, 'jsonb')})")


async def add_job(
    sql: SqlRunner,
    proc_name: str,
    schedule_interval: IntervalLike,
    *,
    proc_schema: str = BUILTIN_SCHEMA,
    config: JsonConfig | None = None,
    hypertable_id: int | None = None,
    initial_start: str | None = None,
    scheduled: bool = True,
    fixed_schedule: bool = True,
    max_runtime: IntervalLike = "0",
    max_retries: int = -1,
    retry_period: IntervalLike = "5 minutes",
    application_name: str | None = None,
    owner: str | None = None,
    check_schema: str | None = None,
    check_name: str | None = None,
    registry: JobRegistry = REGISTRY,
) -> int:
    """Schedule a job; returns its id (1000, 1001, ... as in TimescaleDB).

    The first run is due at ``initial_start`` or now. With ``fixed_schedule`` runs start on
    the slots ``initial_start + k * schedule_interval`` (``initial_start`` defaults to now);
    otherwise ``schedule_interval`` after the previous run finished. The config is validated
    first (:func:`check_config`); a registered procedure's ``application_name`` names the job
    (``"Retention Policy [1000]"``). The owner is ``current_user`` of ``sql``'s session.
    """
    proc = registry.get(proc_schema, proc_name)
    check = (check_schema, check_name) if check_name is not None else None
    await check_config(sql, proc_schema, proc_name, config, check, registry)
    cfg = config
    label = application_name or (proc.application_name if proc else USER_ACTION)
    start = _opt(initial_start, "timestamptz")
    first = f"coalesce({start}, now())"
    rows = await sql(
        f"INSERT INTO {SCHEMA}.jobs (job_id, application_name, proc_schema, proc_name, hypertable_id, "
        "schedule_interval, max_runtime, max_retries, retry_period, scheduled, fixed_schedule, config, "
        "initial_start, next_start, owner, check_schema, check_name) "
        f"SELECT id, format('%s [%s]', {quote_literal(label)}, id), {quote_literal(proc_schema)}, "
        f"{quote_literal(proc_name)}, {_opt(hypertable_id, 'int4')}, {interval_sql(schedule_interval)}, "
        f"{interval_sql(max_runtime)}, {int(max_retries)}, {interval_sql(retry_period)}, "
        f"{_opt(bool(scheduled), 'bool')}, {_opt(bool(fixed_schedule), 'bool')}, {_opt(cfg, 'jsonb')}, "
        f"CASE WHEN {_opt(bool(fixed_schedule), 'bool')} THEN {first} ELSE {start} END, {first}, "
        f"coalesce({_opt(owner, 'text')}, current_user), {_opt(check_schema, 'text')}, {_opt(check_name, 'text')} "
        f"FROM (SELECT nextval(pg_get_serial_sequence('{SCHEMA}.jobs', 'job_id'))::int AS id) s "
        "RETURNING job_id::text"
    )
    return int(rows[0][0])  # type: ignore[arg-type]


async def alter_job(
    sql: SqlRunner,
    job_id: int,
    *,
    schedule_interval: IntervalLike | None = None,
    max_runtime: IntervalLike | None = None,
    max_retries: int | None = None,
    retry_period: IntervalLike | None = None,
    scheduled: bool | None = None,
    config: JsonConfig | None = None,
    next_start: str | None = None,
    fixed_schedule: bool | None = None,
    initial_start: str | None = None,
    check: tuple[str, str] | None = None,
    wire: bool = False,
    registry: JobRegistry = REGISTRY,
) -> list[str | None] | None:
    """Change a job (``None`` leaves a setting alone); returns alter_job's row, None if no job.

    As TimescaleDB: a new ``schedule_interval`` reschedules from the last finish (unless
    ``next_start`` is given too); ``scheduled => true`` resumes a job that ``max_retries``
    stopped; a new ``config`` (or ``check``, a SQL check function) is validated first. The row
    is :data:`ALTER_JOB_COLUMNS` as text; with ``wire`` each column's binary form follows as
    hex (for answering a client in either format).
    """
    if config is not None or check is not None:
        job = await get_job(sql, job_id)
        if job is None:
            return None
        await check_config(sql, job.proc_schema, job.proc_name, config, check or job.check, registry)
    si = _opt(schedule_interval, "interval")
    fixed = f"coalesce({_opt(fixed_schedule, 'bool')}, fixed_schedule)"
    origin = f"coalesce({_opt(initial_start, 'timestamptz')}, initial_start, created_at)"
    rescheduled = (
        f"CASE WHEN {si} IS NULL OR {si} = schedule_interval OR last_finish IS NULL THEN next_start "
        f"WHEN {fixed} THEN {SCHEMA}.job_next_slot({origin}, {si}, last_finish) "
        f"ELSE last_finish + {si} END"
    )
    cfg = config
    select = wire_select(ALTER_JOB_COLUMNS) if wire else text_select(ALTER_JOB_COLUMNS)
    rows = await sql(
        f"UPDATE {SCHEMA}.jobs SET "
        f"schedule_interval = coalesce({si}, schedule_interval), "
        f"max_runtime = coalesce({_opt(max_runtime, 'interval')}, max_runtime), "
        f"max_retries = coalesce({_opt(max_retries, 'int4')}, max_retries), "
        f"retry_period = coalesce({_opt(retry_period, 'interval')}, retry_period), "
        f"scheduled = coalesce({_opt(scheduled, 'bool')}, scheduled), "
        f"config = CASE WHEN {_opt(cfg, 'jsonb')} IS NULL THEN config ELSE {_opt(cfg, 'jsonb')} END, "
        f"fixed_schedule = {fixed}, "
        f"initial_start = coalesce({_opt(initial_start, 'timestamptz')}, initial_start), "
        f"check_schema = coalesce({_opt(check and check[0], 'text')}, check_schema), "
        f"check_name = coalesce({_opt(check and check[1], 'text')}, check_name), "
        f"next_start = coalesce({_opt(next_start, 'timestamptz')}, {rescheduled}) "
        f"WHERE job_id = {int(job_id)} RETURNING {select}"
    )
    return rows[0] if rows else None


async def delete_job(sql: SqlRunner, job_id: int) -> bool:
    """Remove a job (its history stays in ``job_runs``); False if there was none.

    A run in progress finishes (its procedure must be crash-safe anyway); its end is recorded
    in the history only.
    """
    rows = await sql(f"DELETE FROM {SCHEMA}.jobs WHERE job_id = {int(job_id)} RETURNING job_id::text")
    return bool(rows)


# ------------------------------------------------------------------------------ catalog reads


@dataclass(frozen=True)
class JobRow:
    """A job as the CLI and the policies read it (times as PostgreSQL prints them)."""

    job_id: int
    application_name: str
    proc_schema: str
    proc_name: str
    hypertable_id: int | None
    schedule_interval: str
    scheduled: bool
    config: dict[str, Any] | None
    next_start: str
    running_by: str | None
    last_run_status: str | None
    total_runs: int
    total_failures: int
    consecutive_failures: int
    check: tuple[str, str] | None = None  # SQL check_config function, (schema, name)


_JOB_COLUMNS = (
    "job_id::text, application_name, proc_schema, proc_name, hypertable_id::text, "
    "schedule_interval::text, scheduled::text, config::text, next_start::text, running_by, "
    "CASE WHEN last_finish IS NULL THEN NULL WHEN last_run_success THEN 'Success' ELSE 'Failed' END, "
    "total_runs::text, total_failures::text, consecutive_failures::text, check_schema, check_name"
)


def _job_row(r: list[str | None]) -> JobRow:
    return JobRow(
        job_id=int(r[0]),  # type: ignore[arg-type]
        application_name=r[1] or "",
        proc_schema=r[2] or "",
        proc_name=r[3] or "",
        hypertable_id=int(r[4]) if r[4] is not None else None,
        schedule_interval=r[5] or "",
        scheduled=r[6] in ("true", "t"),
        config=json.loads(r[7]) if r[7] else None,
        next_start=r[8] or "",
        running_by=r[9],
        last_run_status=r[10],
        total_runs=int(r[11] or 0),
        total_failures=int(r[12] or 0),
        consecutive_failures=int(r[13] or 0),
        check=(r[14] or "", r[15]) if r[15] is not None else None,
    )


async def get_job(sql: SqlRunner, job_id: int) -> JobRow | None:
    rows = await sql(f"SELECT {_JOB_COLUMNS} FROM {SCHEMA}.jobs WHERE job_id = {int(job_id)}")
    return _job_row(rows[0]) if rows else None


async def find_jobs(
    sql: SqlRunner,
    *,
    proc_name: str | None = None,
    proc_schema: str | None = None,
    hypertable_id: int | None = None,
) -> list[JobRow]:
    """Jobs by procedure and/or hypertable (``remove_retention_policy`` finds its job so)."""
    where = ["true"]
    if proc_name is not None:
        where.append(f"proc_name = {quote_literal(proc_name)}")
    if proc_schema is not None:
        where.append(f"proc_schema = {quote_literal(proc_schema)}")
    if hypertable_id is not None:
        where.append(f"hypertable_id = {int(hypertable_id)}")
    rows = await sql(f"SELECT {_JOB_COLUMNS} FROM {SCHEMA}.jobs WHERE {' AND '.join(where)} ORDER BY job_id")
    return [_job_row(r) for r in rows]


@dataclass(frozen=True)
class RunRow:
    """One run from ``job_runs``."""

    run_id: int
    job_id: int
    proc: str
    origin: str
    run_by: str
    started_at: str
    finished_at: str | None
    succeeded: bool | None
    sqlerrcode: str | None
    err_message: str | None
    duration: str | None


async def job_history(sql: SqlRunner, job_id: int | None = None, limit: int = 20) -> list[RunRow]:
    """The latest ``limit`` runs (of one job, or of all), oldest first."""
    where = f"WHERE job_id = {int(job_id)}" if job_id is not None else ""
    rows = await sql(
        "SELECT * FROM (SELECT run_id::text, job_id::text, format('%s.%s', proc_schema, proc_name), origin, "
        "run_by, date_trunc('second', started_at)::text, date_trunc('second', finished_at)::text, "
        "succeeded::text, sqlerrcode, err_message, (finished_at - started_at)::text "
        f"FROM {SCHEMA}.job_runs {where} ORDER BY run_id DESC LIMIT {int(limit)}) r ORDER BY r.run_id::bigint"
    )
    return [
        RunRow(
            run_id=int(r[0]),  # type: ignore[arg-type]
            job_id=int(r[1]),  # type: ignore[arg-type]
            proc=r[2] or "",
            origin=r[3] or "",
            run_by=r[4] or "",
            started_at=r[5] or "",
            finished_at=r[6],
            succeeded=None if r[7] is None else r[7] in ("true", "t"),
            sqlerrcode=r[8],
            err_message=r[9],
            duration=r[10],
        )
        for r in rows
    ]


def not_found(job_id: int) -> PgError:
    """TimescaleDB's error for an unknown job id."""
    return PgError("42704", f"job {job_id} not found", hint="See timescaledb_information.jobs for the jobs.")
