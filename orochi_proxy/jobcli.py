"""``orochi-proxy jobs list | run [JOB_ID] | history [JOB_ID]``.

Why run jobs in the CLI process: an operator reaches for ``jobs run`` when a job is late or keeps
failing — possibly while no proxy runs at all — and wants to see that run's outcome on the
terminal. The CLI builds the same ``ProxyServer`` a proxy has (catalog, node pools; no listener)
and runs the job with the same runner, lease and history as the scheduler, so a run here and the
leader's scheduler never run one job at the same time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

# Defined before the import of orochi_proxy.cli below, which adds it to the main app at its end:
# so either module may be imported first.
jobs_app = typer.Typer(
    no_args_is_help=True,
    help="List, run and inspect scheduled jobs (retention, compression, refresh, user-defined actions).",
)

from orochi_proxy.cli import (  # noqa: E402
    ConfigOption,
    _catalog_for,
    _errors,
    _fail,
    _load,
    _one_line,
    _run,
    format_table,
)
from orochi_proxy.config import ProxyConfig  # noqa: E402
from policies.jobs import SqlRunner  # noqa: E402

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer
    from policies.jobrun import RunResult

T = TypeVar("T")

JobArgument = Annotated[int | None, typer.Argument(help="a job id (see `orochi-proxy jobs list`)")]


async def _with_host(cfg: ProxyConfig, body: Callable[[ProxyServer], Awaitable[T]]) -> T:
    """Run ``body(server)`` with a ProxyServer whose catalog is open (no listener, no scheduler)."""
    from orochi_proxy.server import ProxyServer  # imports every admin module: procedures register

    server = ProxyServer(cfg)
    await server.catalog.open()
    try:
        return await body(server)
    finally:
        await server.pools.close()
        await server.catalog.close()


async def _query(cfg: ProxyConfig, body: Callable[[SqlRunner], Awaitable[T]]) -> T:
    """Run ``body(sql)`` with a SqlRunner on a metadata connection (catalog migrated)."""
    from policies.jobs import asyncpg_runner

    catalog = _catalog_for(cfg)
    async with catalog:
        conn = await catalog.connect()
        try:
            return await body(asyncpg_runner(conn))
        finally:
            await conn.close()


@jobs_app.command("list")
def jobs_list(config: ConfigOption = None) -> None:
    """Show every job: schedule, next start, last result, whether a run is in progress."""
    from policies.jobs import find_jobs

    cfg = _load(config)
    with _errors(config):
        rows = _run(_query(cfg, find_jobs))
    if not rows:
        typer.echo("no jobs; policies (add_retention_policy, ...) and add_job() create them")
        return
    table = [
        [
            j.job_id,
            j.application_name,
            f"{j.proc_schema}.{j.proc_name}",
            j.schedule_interval,
            "yes" if j.scheduled else "no (paused)",
            j.next_start if j.scheduled else "-",
            j.last_run_status or "-",
            f"{j.total_runs} ({j.total_failures} failed)",
            j.running_by or "-",
        ]
        for j in rows
    ]
    headers = ("JOB ID", "NAME", "PROC", "SCHEDULE", "SCHEDULED", "NEXT START", "LAST RUN", "RUNS", "RUNNING ON")
    typer.echo(format_table(headers, table))


@jobs_app.command("run")
def jobs_run(job_id: JobArgument = None, config: ConfigOption = None) -> None:
    """Run one job now regardless of its schedule, or (without JOB_ID) every job that is due.

    Runs happen in this process, once, and are recorded like scheduled runs. Exit code 1 if a
    run failed.
    """
    from policies.jobs import SCHEMA

    cfg = _load(config)

    async def body(server: ProxyServer) -> list[RunResult]:
        runner = server.jobs.runner
        if job_id is not None:
            return [await runner.run(job_id, origin="cli")]
        conn = await server.catalog.connect()
        try:
            due = [
                r["job_id"]
                for r in await conn.fetch(
                    f"SELECT job_id FROM {SCHEMA}.jobs WHERE scheduled AND next_start <= now() ORDER BY next_start"
                )
            ]
        finally:
            await conn.close()
        return [await runner.run(j, origin="cli", only_if_due=True) for j in due]

    # Each outcome is printed below; the runner's own log lines would repeat them on stderr.
    logging.getLogger("policies.jobrun").setLevel(logging.ERROR)
    with _errors(config):
        results = _run(_with_host(cfg, body))
    if job_id is not None and results[0].skipped == "not found":
        _fail(f"job {job_id} not found; see `orochi-proxy jobs list{_where(config)}`")
    if job_id is not None and results[0].skipped == "running":
        _fail(
            f"job {job_id} is running elsewhere now; wait for it to finish "
            f"(`orochi-proxy jobs list{_where(config)}` shows where it runs)"
        )
    ran = [r for r in results if r.ran]
    if not ran:
        typer.echo(f"no jobs are due; `orochi-proxy jobs run JOB_ID{_where(config)}` runs one regardless")
        return
    for r in ran:
        if r.succeeded:
            typer.echo(f"job {r.job_id}: succeeded in {r.seconds:.2f}s (run {r.run_id}); next start {r.next_start}")
        else:
            typer.echo(
                f"job {r.job_id}: FAILED in {r.seconds:.2f}s (run {r.run_id}): "
                f"{r.sqlerrcode} {_one_line(r.message or '')}"
            )
            if r.unscheduled:
                typer.echo(f"job {r.job_id}: reached max_retries and is paused; SELECT alter_job({r.job_id}, scheduled => true) resumes it")
    failed = [r.job_id for r in ran if not r.succeeded]
    if failed:
        ids = ", ".join(str(j) for j in failed)
        _fail(
            f"{len(failed)} of {len(ran)} job run(s) failed (job {ids}); the error is above and in "
            f"`orochi-proxy jobs history {failed[0]}{_where(config)}`; fix its cause, then "
            f"`orochi-proxy jobs run {failed[0]}{_where(config)}`"
        )


@jobs_app.command("history")
def jobs_history(
    job_id: JobArgument = None,
    limit: Annotated[int, typer.Option(help="how many of the latest runs", min=1)] = 20,
    config: ConfigOption = None,
) -> None:
    """Show the latest runs (of one job, or of all): when, where, how long, and their errors."""
    from policies.jobs import job_history

    cfg = _load(config)
    with _errors(config):
        runs = _run(_query(cfg, lambda sql: job_history(sql, job_id, limit)))
    if not runs:
        typer.echo("no runs recorded" + (f" for job {job_id}" if job_id is not None else ""))
        return
    table = [
        [
            r.run_id,
            r.job_id,
            r.proc,
            r.origin,
            r.run_by,
            r.started_at,
            r.duration or "-",
            "running" if r.succeeded is None else "ok" if r.succeeded else f"failed: {r.sqlerrcode or '-'} {_one_line(r.err_message or '')}",
        ]
        for r in runs
    ]
    headers = ("RUN", "JOB ID", "PROC", "ORIGIN", "RUN BY", "STARTED", "DURATION", "RESULT")
    typer.echo(format_table(headers, table))


def _where(config: Path | None) -> str:
    return f" --config {config}" if config else ""
