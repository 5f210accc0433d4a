"""Running one job: the lease, the procedure under ``max_runtime``, and the record of the run.

A run owns a connection to the metadata database (its *lease connection*) and, on it, the
session-level advisory lock :func:`job_lock_key` of its job. Whoever holds that lock is the
only runner of the job, wherever it runs (the leader's scheduler, ``CALL run_job``, the CLI).
On that connection, in one transaction each:

1. **claim**: lock the job's row; if it still names a run in progress, that runner is gone
   (it would hold the lock), so its run is recorded as crashed and the job rescheduled as after
   a failure (:meth:`JobRunner.settle_crash`); then insert the ``job_runs`` row and mark the
   job running (``running_by``, ``running_since``, ``running_run_id``);
2. run the procedure (Python from the registry, or ``CALL schema.proc(job_id, config)``),
   cancelled when it exceeds ``max_runtime`` or when the lease connection drops;
3. **finish**: record the outcome and the next start, TimescaleDB's way: after a success the
   next slot (fixed schedules) or finish + ``schedule_interval``; after a failure finish +
   ``retry_period`` * consecutive failures (at most 20), capped at 5 * ``schedule_interval``,
   +-12.5% jitter, and never later than the next fixed slot; ``max_retries`` > 0 consecutive
   failures unschedule the job (``alter_job(id, scheduled => true)`` resumes it).

A crash anywhere leaves the row marked running with no lock behind it, which the next claimant
(or the leader's orphan sweep) settles, so the job runs again. Unlike TimescaleDB a crash also
counts as a failure (so ``max_retries`` stops a job that keeps killing its runner) and has no
five-minute minimum wait: here a crash is mostly a proxy replica being replaced, not a job
crashing the database. The end is written on the lease connection, so a runner that lost its
lease cannot overwrite what the next runner decided.

All times are the metadata database's ``now()``: proxies on different machines share one clock.
User-defined SQL actions run on the lease connection with ``client_connection_check_interval``
(PostgreSQL 14+), so a procedure whose runner died is aborted by the server within a second
instead of running on beside its re-run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import asyncpg

from policies.jobs import REGISTRY, SCHEMA, ConnectFactory, JobContext, JobRegistry
from rewriter.errors import PgError
from rewriter.quoting import qualified_name, quote_ident

log = logging.getLogger(__name__)

JOB_LOCK_SPACE = 0x0C0D_0000_0000_0000  # high bits of the per-job advisory locks (2PC uses 0x0C0C)
CRASH_MESSAGE = "job crash detected"  # TimescaleDB's words for a run that never recorded its end

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
)


def job_lock_key(job_id: int) -> int:
    return JOB_LOCK_SPACE | int(job_id)


def process_identity() -> str:
    """``host:pid`` of this process, as ``job_runs.run_by`` records it."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class RunResult:
    """What became of one attempt to run a job."""

    job_id: int
    run_id: int | None = None
    succeeded: bool = False
    sqlerrcode: str | None = None
    message: str | None = None
    seconds: float = 0.0
    next_start: str | None = None
    unscheduled: bool = False  # max_retries reached: the job will not run again by itself
    skipped: str | None = None  # "running" | "not due" | "not found": it did not run

    @property
    def ran(self) -> bool:
        return self.skipped is None


@dataclass(frozen=True)
class _Claim:
    job_id: int
    run_id: int
    proc_schema: str
    proc_name: str
    hypertable_id: int | None
    config: dict[str, Any] | None
    max_runtime: float  # seconds; 0 = no limit
    owner: str
    next_start: Any  # the value at claim time: a procedure or alter_job may set another


# Next start after a failure; ``n`` is the number of consecutive failures including this one.
def _failure_next_start(n: str) -> str:
    return (
        f"least(now() + least(retry_period * least({n}, 20), schedule_interval * 5) "
        "* (0.875 + random() * 0.25), "
        f"CASE WHEN fixed_schedule THEN {SCHEMA}.job_next_slot(coalesce(initial_start, created_at), "
        "schedule_interval, now()) END)"
    )


_SUCCESS_NEXT_START = (
    f"CASE WHEN fixed_schedule THEN {SCHEMA}.job_next_slot(coalesce(initial_start, created_at), "
    "schedule_interval, now()) ELSE now() + schedule_interval END"
)
# max_retries as TimescaleDB applies it: > 0 stops after that many consecutive failures.
_GIVES_UP = "max_retries > 0 AND consecutive_failures + 1 >= max_retries"


class JobRunner:
    """Runs jobs in this process: one call of :meth:`run` is one run of one job."""

    def __init__(
        self,
        connect: ConnectFactory,
        *,
        registry: JobRegistry = REGISTRY,
        app: Any = None,
        identity: str | None = None,
        lease_check: float = 0.2,
        cancel_grace: float = 5.0,
    ) -> None:
        """``connect`` opens a metadata-database connection; ``app`` goes to every JobContext.

        ``lease_check``: how often a running procedure's lease connection is looked at;
        ``cancel_grace``: how long a cancelled procedure may take to stop before the run is
        recorded as failed anyway.
        """
        self.connect = connect
        self.registry = registry
        self.app = app
        self.identity = identity or process_identity()
        self.lease_check = lease_check
        self.cancel_grace = cancel_grace

    # ------------------------------------------------------------------------------ one run

    async def run(self, job_id: int, *, origin: str, only_if_due: bool = False) -> RunResult:
        """Run job ``job_id`` now (``only_if_due``: only if scheduled and due) and record it.

        Returns a skipped result when the job is running elsewhere, not due, or unknown;
        connection failures to the metadata database raise (the run, if it started, is then
        settled as crashed by the next claimant).
        """
        conn = await self._lease_connection()
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", job_lock_key(job_id)):
                return RunResult(job_id, skipped="running")
            claim, skipped = await self._claim(conn, job_id, origin, only_if_due)
            if claim is None:
                return RunResult(job_id, skipped=skipped)
            started = time.monotonic()
            ok, sqlstate, message = await self._execute(conn, claim)
            seconds = time.monotonic() - started
            try:
                next_start, unscheduled = await self._finish(conn, claim, ok, sqlstate, message)
            except _CONNECTION_ERRORS:
                next_start, unscheduled = await self._finish_elsewhere(claim, ok, sqlstate, message)
            if unscheduled:
                log.warning(
                    "job %d reached max_retries after consecutive failures and is no longer "
                    "scheduled; alter_job(%d, scheduled => true) resumes it", job_id, job_id,
                )
            return RunResult(job_id, claim.run_id, ok, sqlstate, message, seconds, next_start, unscheduled)
        finally:
            # Closing ends the session, which releases the job's lock.
            if not conn.is_closed():
                try:
                    await asyncio.wait_for(conn.close(), 2)
                except Exception:  # noqa: BLE001 - a dead connection releases its lock anyway
                    conn.terminate()

    async def _lease_connection(self) -> asyncpg.Connection:
        conn = await self.connect()
        try:
            if conn.get_server_version().major >= 14:
                # An orphaned CALL (its runner died) is aborted by the server within a second.
                await conn.execute("SET client_connection_check_interval = '1s'")
            await conn.execute("SET application_name = 'orochi-proxy job runner'")
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _claim(
        self, conn: asyncpg.Connection, job_id: int, origin: str, only_if_due: bool
    ) -> tuple[_Claim | None, str | None]:
        select = (
            "SELECT proc_schema, proc_name, hypertable_id, config::text AS config, owner, running_run_id, "
            "extract(epoch FROM max_runtime)::float8 AS max_runtime, scheduled, next_start, "
            f"next_start <= now() AS due FROM {SCHEMA}.jobs WHERE job_id = $1 FOR UPDATE"
        )
        async with conn.transaction():
            # A client transaction that altered the job and stays open must not stall a runner.
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            row = await conn.fetchrow(select, job_id)
            if row is None:
                return None, "not found"
            if row["running_run_id"] is not None:
                # We hold the job's lock, so the runner that marked this run is gone.
                await self.settle_crash(conn, job_id)
                if only_if_due:
                    return None, "not due"  # rescheduled as after a failure: that decides
                row = await conn.fetchrow(select, job_id)
                assert row is not None
            if only_if_due and not (row["scheduled"] and row["due"]):
                return None, "not due"
            run_id = await conn.fetchval(
                f"INSERT INTO {SCHEMA}.job_runs (job_id, proc_schema, proc_name, config, origin, run_by, pid) "
                f"SELECT job_id, proc_schema, proc_name, config, $2, $3, pg_backend_pid() FROM {SCHEMA}.jobs "
                "WHERE job_id = $1 RETURNING run_id",
                job_id, origin, self.identity,
            )
            await conn.execute(
                f"UPDATE {SCHEMA}.jobs SET running_by = $2, running_since = now(), running_run_id = $3, "
                "last_start = now(), last_finish = NULL, total_runs = total_runs + 1 WHERE job_id = $1",
                job_id, self.identity, run_id,
            )
        claim = _Claim(
            job_id=job_id,
            run_id=int(run_id),
            proc_schema=row["proc_schema"],
            proc_name=row["proc_name"],
            hypertable_id=row["hypertable_id"],
            config=json.loads(row["config"]) if row["config"] else None,
            max_runtime=float(row["max_runtime"] or 0.0),
            owner=row["owner"],
            next_start=row["next_start"],
        )
        return claim, None

    async def settle_crash(self, conn: asyncpg.Connection, job_id: int) -> None:
        """Record the job's run in progress as crashed and reschedule the job as after a failure.

        Only for a caller holding the job's lock, inside a transaction that locked its row.
        """
        await conn.execute(
            f"UPDATE {SCHEMA}.job_runs r SET finished_at = now(), succeeded = false, "
            "err_message = $2 || ': the run by ' || r.run_by || ' (metadata backend pid ' "
            "|| coalesce(r.pid::text, '?') || ') ended without recording its end; its process "
            "died or lost its connection to the metadata database, see its log' "
            f"FROM {SCHEMA}.jobs j WHERE j.job_id = $1 AND r.run_id = j.running_run_id "
            "AND r.finished_at IS NULL",
            job_id, CRASH_MESSAGE,
        )
        await conn.execute(
            f"UPDATE {SCHEMA}.jobs SET running_by = NULL, running_since = NULL, running_run_id = NULL, "
            "last_finish = now(), last_run_success = false, total_failures = total_failures + 1, "
            "total_crashes = total_crashes + 1, consecutive_crashes = consecutive_crashes + 1, "
            f"consecutive_failures = consecutive_failures + 1, next_start = {_failure_next_start('consecutive_failures + 1')}, "
            f"scheduled = scheduled AND NOT ({_GIVES_UP}) WHERE job_id = $1",
            job_id,
        )
        log.warning("job %d: %s; the run is recorded as failed and the job rescheduled", job_id, CRASH_MESSAGE)

    async def _execute(self, conn: asyncpg.Connection, claim: _Claim) -> tuple[bool, str | None, str | None]:
        """Run the procedure; (succeeded, sqlstate, message). Never raises but for cancellation."""
        ctx = JobContext(
            job_id=claim.job_id,
            run_id=claim.run_id,
            proc_schema=claim.proc_schema,
            proc_name=claim.proc_name,
            hypertable_id=claim.hypertable_id,
            conn=conn,
            connect=self.connect,
            app=self.app,
        )
        proc = self.registry.get(claim.proc_schema, claim.proc_name)
        body = proc.run(ctx, dict(claim.config or {})) if proc else self._user_action(ctx, claim)
        task = asyncio.ensure_future(body)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + claim.max_runtime if claim.max_runtime > 0 else None
        stop: tuple[str, str] | None = None
        try:
            while not task.done():
                wait = self.lease_check if deadline is None else min(self.lease_check, max(0.0, deadline - loop.time()))
                await asyncio.wait({task}, timeout=wait)
                if task.done():
                    break
                if deadline is not None and loop.time() >= deadline:
                    stop = ("57014", f"job {claim.job_id} exceeded max_runtime ({claim.max_runtime:g} s) and was canceled")
                    break
                if conn.is_closed():
                    stop = ("08006", f"job {claim.job_id} lost its lease: the connection to the metadata database broke")
                    break
        except BaseException:
            task.cancel()  # the runner itself is being cancelled (shutdown): stop the procedure too
            raise
        if stop is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=self.cancel_grace)
            if not task.done():
                log.error("job %d: procedure did not stop within %.0fs of being canceled", claim.job_id, self.cancel_grace)
            return False, stop[0], stop[1]
        exc = task.exception()
        if exc is None:
            return True, None, None
        sqlstate, message = describe_error(exc)
        if sqlstate == "XX000":
            log.error("job %d failed", claim.job_id, exc_info=exc)
        else:
            log.warning("job %d failed: %s %s", claim.job_id, sqlstate, message)
        return False, sqlstate, message

    async def _user_action(self, ctx: JobContext, claim: _Claim) -> None:
        """TimescaleDB's user-defined action: ``CALL proc(job_id, config)`` (SELECT if a function)."""
        conn = ctx.conn
        kind = await conn.fetchval(
            "SELECT p.prokind FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname = $1 AND p.proname = $2 ORDER BY p.oid LIMIT 1",
            claim.proc_schema, claim.proc_name,
        )
        target = qualified_name(claim.proc_schema, claim.proc_name)
        verb = "SELECT" if kind == "f" else "CALL"
        own = await conn.fetchval("SELECT current_user = $1", claim.owner)
        if not own:
            await conn.execute(f"SET ROLE {quote_ident(claim.owner)}")
        try:
            config = None if claim.config is None else json.dumps(claim.config)
            await conn.execute(f"{verb} {target}($1::integer, $2::jsonb)", claim.job_id, config)
        finally:
            if not own and not conn.is_closed():
                await conn.execute("RESET ROLE")

    async def _finish(
        self, conn: asyncpg.Connection, claim: _Claim, ok: bool, sqlstate: str | None, message: str | None
    ) -> tuple[str | None, bool]:
        """Record the outcome on the lease connection; (next start as text, unscheduled now)."""
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")  # a procedure left its transaction open: not ours to commit
        async with conn.transaction():
            await conn.execute(
                f"UPDATE {SCHEMA}.job_runs SET finished_at = now(), succeeded = $2, sqlerrcode = $3, "
                "err_message = $4 WHERE run_id = $1 AND finished_at IS NULL",
                claim.run_id, ok, sqlstate, message,
            )
            row = await conn.fetchrow(
                f"WITH old AS (SELECT scheduled AS was FROM {SCHEMA}.jobs WHERE job_id = $1) "
                f"UPDATE {SCHEMA}.jobs SET running_by = NULL, running_since = NULL, running_run_id = NULL, "
                "last_finish = now(), last_run_success = $2::boolean, consecutive_crashes = 0, "
                "total_duration = total_duration + (now() - coalesce(last_start, now())), "
                "total_successes = total_successes + CASE WHEN $2 THEN 1 ELSE 0 END, "
                "total_failures = total_failures + CASE WHEN $2 THEN 0 ELSE 1 END, "
                "last_successful_finish = CASE WHEN $2 THEN now() ELSE last_successful_finish END, "
                "consecutive_failures = CASE WHEN $2 THEN 0 ELSE consecutive_failures + 1 END, "
                "next_start = CASE WHEN next_start IS DISTINCT FROM $4 THEN next_start "
                f"WHEN $2 THEN {_SUCCESS_NEXT_START} ELSE {_failure_next_start('consecutive_failures + 1')} END, "
                f"scheduled = scheduled AND ($2 OR NOT ({_GIVES_UP})) "
                "FROM old WHERE job_id = $1 AND running_run_id = $3 "
                "RETURNING next_start::text AS next_start, old.was AND NOT scheduled AS unscheduled",
                claim.job_id, ok, claim.run_id, claim.next_start,
            )
        if row is None:
            return None, False  # deleted while running (or settled by someone else)
        return row["next_start"], bool(row["unscheduled"])

    async def _finish_elsewhere(
        self, claim: _Claim, ok: bool, sqlstate: str | None, message: str | None
    ) -> tuple[str | None, bool]:
        """The lease connection broke after the run: record the end on a new one, if still ours."""
        try:
            conn = await self.connect()
        except (*_CONNECTION_ERRORS, TimeoutError):
            return None, False  # the next claimant records a crash instead
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", job_lock_key(claim.job_id)):
                return None, False
            return await self._finish(conn, claim, ok, sqlstate, message)
        except _CONNECTION_ERRORS:
            return None, False
        finally:
            conn.terminate()

    # ------------------------------------------------------------------------------ orphans

    async def settle_orphans(self, conn: asyncpg.Connection, exclude: Collection[int] = ()) -> list[int]:
        """Settle runs whose runner is gone (job marked running, its lock free); their ids.

        ``conn`` is any metadata connection outside a transaction (the scheduler's own).
        """
        settled = []
        rows = await conn.fetch(f"SELECT job_id FROM {SCHEMA}.jobs WHERE running_run_id IS NOT NULL")
        for r in rows:
            job_id = r["job_id"]
            if job_id in exclude:
                continue
            key = job_lock_key(job_id)
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                continue  # its runner is alive
            try:
                async with conn.transaction():
                    running = await conn.fetchval(
                        f"SELECT running_run_id FROM {SCHEMA}.jobs WHERE job_id = $1 FOR UPDATE", job_id
                    )
                    if running is not None:
                        await self.settle_crash(conn, job_id)
                        settled.append(job_id)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", key)
        return settled


def describe_error(exc: BaseException) -> tuple[str, str]:
    """(SQLSTATE, message) of a procedure's exception, message + detail + hint as TimescaleDB joins them."""
    if isinstance(exc, PgError):
        parts = (exc.message, exc.detail, exc.hint)
        return exc.sqlstate, ". ".join(p for p in parts if p)
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(exc, asyncpg.PostgresError):
        parts = (getattr(exc, "message", None) or str(exc), getattr(exc, "detail", None), getattr(exc, "hint", None))
        return sqlstate or "XX000", ". ".join(p for p in parts if p)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return sqlstate, getattr(exc, "message", None) or str(exc)
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return "57014", f"timed out: {exc}" if str(exc) else "timed out"
    if isinstance(exc, _CONNECTION_ERRORS):
        return "08006", f"connection failure: {exc}"
    return "XX000", f"{type(exc).__name__}: {exc}"
