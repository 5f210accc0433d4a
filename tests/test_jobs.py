"""The job runner against real PostgreSQL and real proxy processes.

Jobs here are TimescaleDB user-defined actions — plain SQL procedures on the metadata database
scheduled with ``add_job`` — so every test drives the real path: the proxy's admin SQL, the
leader's scheduler, the lease and the history in ``orochi_catalog``. What a test checks is read
from the metadata database directly (``job_runs``, rows the procedures inserted), not from the
proxy that ran the jobs.

Each group of tests has a database of its own as its metadata database, so their jobs, leaders
and histories never meet (advisory locks are per database). Schedules are a second or so and
proxies poll every 0.2 s to keep the module short.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from proxyproc import ProxyProcess, default_config, render_toml, start_proxy
from typer.testing import CliRunner

from orochi_proxy.catalog import migrate
from orochi_proxy.cli import app
from orochi_proxy.localcluster import LocalCluster
from policies import jobs

POLL = 0.2

PROCEDURES = """
CREATE TABLE ticks (job_id int, tag text, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE PROCEDURE tick(job_id int, config jsonb) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ticks (job_id, tag) VALUES (job_id, config->>'tag');
END $$;
CREATE PROCEDURE boom(job_id int, config jsonb) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 / 0;
END $$;
-- TimescaleDB's check_config: validates a config before add_job/alter_job store it.
CREATE FUNCTION needs_tag(config jsonb) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF config->>'tag' IS NULL THEN
        RAISE EXCEPTION 'config needs a tag' USING ERRCODE = '22023';
    END IF;
END $$;
-- Sleeps, then records itself: a run cut short leaves no row.
CREATE PROCEDURE sleepy(job_id int, config jsonb) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep((config->>'sleep')::float8);
    INSERT INTO ticks (job_id, tag) VALUES (job_id, config->>'tag');
END $$;
"""


# ------------------------------------------------------------------------------ helpers


def _admin(cluster: LocalCluster, sql: str) -> None:
    with psycopg.connect(cluster.nodes[0].dsn(), autocommit=True) as c:
        c.execute(sql)


@pytest.fixture(scope="module")
def make_db(cluster: LocalCluster) -> Iterator[Callable[[], str]]:
    """Creates fresh metadata databases (with the test procedures) on node 0; drops them after."""
    made: list[str] = []

    def make() -> str:
        name = f"jobs_{secrets.token_hex(4)}"
        _admin(cluster, f"CREATE DATABASE {name}")
        made.append(name)
        with psycopg.connect(cluster.nodes[0].dsn(name), autocommit=True) as c:
            c.execute(PROCEDURES)
        return name

    yield make
    for name in made:
        _admin(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Env:
    """Proxies on one metadata database, a client of the first, and the database itself."""

    def __init__(self, cluster: LocalCluster, db: str, proxies: list[ProxyProcess]) -> None:
        self.db = db
        self.proxies = proxies
        self.client = psycopg.connect(proxies[0].dsn(db), autocommit=True)
        self.meta = psycopg.connect(cluster.nodes[0].dsn(db), autocommit=True)

    def q(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Through the proxy."""
        cur = self.client.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def m(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """On the metadata database directly."""
        return self.meta.execute(sql, params).fetchall()

    def runs(self, job_id: int) -> list[tuple[Any, ...]]:
        """(started_at, succeeded, sqlerrcode, err_message, run_by) of each run, oldest first."""
        return self.m(
            "SELECT started_at, succeeded, sqlerrcode, err_message, run_by FROM orochi_catalog.job_runs "
            "WHERE job_id = %s ORDER BY run_id",
            (job_id,),
        )

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                logs = "\n".join(p.log_tail(1500) for p in self.proxies)
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; proxy logs:\n{logs}")
            time.sleep(0.05)

    def close(self) -> None:
        self.client.close()
        self.meta.close()
        for p in self.proxies:
            p.stop()


def _start(tmp: Path, cluster: LocalCluster, db: str, name: str) -> ProxyProcess:
    return start_proxy(tmp, cluster, name=name, metadata={"dbname": db}, jobs={"poll_interval": POLL})


@pytest.fixture(scope="module")
def env(cluster: LocalCluster, make_db: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    db = make_db()
    e = Env(cluster, db, [_start(tmp_path_factory.mktemp("jobs"), cluster, db, "jobs-proxy")])
    try:
        yield e
    finally:
        e.close()


def _gaps(times: list[Any]) -> list[float]:
    return [(b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)]


# ------------------------------------------------------------------------------ scheduling


def test_schedule_is_honoured(env: Env) -> None:
    (job,) = env.q("SELECT add_job('tick', '1 s', config => '{\"tag\": \"sched\"}')")[0]
    assert job >= 1000
    try:
        def finished() -> list[tuple[Any, ...]]:
            return [r for r in env.runs(job) if r[1] is not None]

        env.wait_for("4 finished runs", lambda: len(finished()) >= 4, timeout=8)
        runs = finished()
        assert all(r[1] is True for r in runs), runs
        starts = [r[0] for r in runs]
        # a fixed schedule: one run per 1 s slot from initial_start, never two in one slot
        (origin,) = env.m("SELECT initial_start FROM orochi_catalog.jobs WHERE job_id = %s", (job,))[0]
        slots = [int((s - origin).total_seconds()) for s in starts]
        assert slots == sorted(set(slots)), (slots, starts)
        assert all(g > 0.6 for g in _gaps(starts)), _gaps(starts)
        assert len(env.m("SELECT 1 FROM ticks WHERE job_id = %s", (job,))) >= 4
        stats = env.q(
            "SELECT last_run_status, job_status, total_runs, total_failures, next_start > now() "
            "FROM timescaledb_information.job_stats WHERE job_id = %s",
            (job,),
        )
        assert stats[0][0] == "Success" and stats[0][1] in ("Scheduled", "Running"), stats
        assert stats[0][2] >= 4 and stats[0][3] == 0
    finally:
        env.q("SELECT delete_job(%s)", (job,))


def test_failure_is_recorded_retried_and_stopped_by_max_retries(env: Env) -> None:
    (job,) = env.q("SELECT add_job('boom', '1 h', scheduled => false)")[0]
    try:
        env.q("SELECT alter_job(%s, retry_period => '1 s', max_retries => 3, scheduled => true)", (job,))
        env.wait_for(
            "the job to be paused by max_retries",
            lambda: env.m("SELECT NOT scheduled FROM orochi_catalog.jobs WHERE job_id = %s", (job,))[0][0],
        )
        runs = env.runs(job)
        assert len(runs) == 3, runs
        assert [(r[1], r[2], r[3]) for r in runs] == [(False, "22012", "division by zero")] * 3
        # retried after retry_period * consecutive failures (+-12.5% jitter): ~1 s, then ~2 s
        g1, g2 = _gaps([r[0] for r in runs])
        assert 0.8 < g1 < 1.6 and 1.7 < g2 < 2.8, (g1, g2)
        errors = env.q(
            "SELECT proc_schema, proc_name, sqlerrcode, err_message, pid IS NOT NULL, finish_time >= start_time "
            "FROM timescaledb_information.job_errors WHERE job_id = %s",
            (job,),
        )
        assert errors == [("public", "boom", "22012", "division by zero", True, True)] * 3
        stats = env.q(
            "SELECT last_run_status, job_status, next_start, total_runs, total_successes, total_failures "
            "FROM timescaledb_information.job_stats WHERE job_id = %s",
            (job,),
        )
        assert stats == [("Failed", "Paused", None, 3, 0, 3)]
        time.sleep(1.0)
        assert len(env.runs(job)) == 3  # stopped retrying
    finally:
        env.q("SELECT delete_job(%s)", (job,))


def test_max_runtime_cancels_the_run(env: Env) -> None:
    (job,) = env.q("SELECT add_job('sleepy', '1 h', config => '{\"sleep\": 30, \"tag\": \"slow\"}', scheduled => false)")[0]
    try:
        env.q("SELECT alter_job(%s, max_runtime => '1 s')", (job,))
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled) as err:
            env.client.execute("CALL run_job(%s)", (job,))
        assert time.monotonic() - started < 5
        assert "exceeded max_runtime" in str(err.value)
        (run,) = env.runs(job)
        assert run[1:4] == (False, "57014", f"job {job} exceeded max_runtime (1 s) and was canceled")
        # the server-side CALL was canceled too: nothing inserted, nothing still sleeping
        assert env.m("SELECT count(*) FROM ticks WHERE job_id = %s", (job,)) == [(0,)]
        env.wait_for(
            "the canceled CALL to end",
            lambda: env.m("SELECT count(*) = 0 FROM pg_stat_activity WHERE query LIKE 'CALL public.sleepy%%'")[0][0],
            timeout=3,
        )
    finally:
        env.q("SELECT delete_job(%s)", (job,))


def test_alter_job_changes_take_effect(env: Env) -> None:
    (job,) = env.q("SELECT add_job('tick', '1 h', config => '{\"tag\": \"a\"}')")[0]
    try:
        env.wait_for("the first run", lambda: env.m("SELECT count(*) FROM ticks WHERE job_id = %s", (job,))[0][0] == 1)
        row = env.q(
            "SELECT * FROM alter_job(%s, schedule_interval => '1 s', config => '{\"tag\": \"b\"}')", (job,)
        )
        assert row[0][:4] == (job, timedelta(seconds=1), timedelta(0), -1)
        assert row[0][5:7] == (True, {"tag": "b"})
        # rescheduled from the last finish with the new interval, new config passed to the proc
        env.wait_for(
            "two runs with the new config",
            lambda: env.m("SELECT count(*) FROM ticks WHERE job_id = %s AND tag = 'b'", (job,))[0][0] >= 2,
            timeout=5,
        )
        env.q("SELECT alter_job(%s, scheduled => false)", (job,))
        time.sleep(0.5)  # a run that had started finishes
        before = len(env.runs(job))
        time.sleep(1.5)
        assert len(env.runs(job)) == before
        # next_start => moves the next run; resuming runs it then
        (soon,) = env.m("SELECT (now() + interval '0.5 s')::text")[0]
        env.q("SELECT alter_job(%s, scheduled => true, schedule_interval => '1 h', next_start => %s)", (job, soon))
        env.wait_for("the run at next_start", lambda: len(env.runs(job)) == before + 1, timeout=4)
        time.sleep(0.8)
        assert len(env.runs(job)) == before + 1  # and then not again for an hour
    finally:
        env.q("SELECT delete_job(%s)", (job,))


def test_alter_job_answers_like_timescaledb(env: Env) -> None:
    (job,) = env.q("SELECT add_job('tick', '1 h', scheduled => false, config => '{\"tag\": \"x\"}')")[0]
    try:
        # SELECT alter_job(...) is one record; SELECT * FROM alter_job(...) its columns
        cur = env.client.execute("SELECT * FROM alter_job(%s, max_retries => 2)", (job,))
        assert [d.name for d in cur.description] == [
            "job_id", "schedule_interval", "max_runtime", "max_retries", "retry_period", "scheduled",
            "config", "next_start", "check_config", "fixed_schedule", "initial_start", "timezone",
        ]
        record = env.q("SELECT alter_job(%s)", (job,))[0][0]
        assert record[0] == str(job) and record[1] == "01:00:00" and record[3] == "2"
        # binary results (what asyncpg asks for) are PostgreSQL's own encodings
        proxy = env.proxies[0]

        async def binary() -> asyncpg.Record:
            conn = await asyncpg.connect(host=proxy.host, port=proxy.port, user=proxy.user, password=proxy.password, database=env.db)
            try:
                return await conn.fetchrow("SELECT * FROM alter_job($1::int, retry_period => '90 s')", job)
            finally:
                await conn.close()

        row = asyncio.run(binary())
        assert row["retry_period"] == timedelta(seconds=90) and row["max_retries"] == 2
        assert row["config"] == '{"tag": "x"}' and row["next_start"].tzinfo is not None

        with pytest.raises(psycopg.errors.UndefinedObject, match=r"job 999999 not found"):
            env.q("SELECT alter_job(999999, scheduled => true)")
        assert env.q("SELECT * FROM alter_job(999999, scheduled => true, if_exists => true)") == [(None,) * 12]
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="schedule_interval must be positive"):
            env.q("SELECT alter_job(%s, schedule_interval => '0 s')", (job,))
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            env.q("SELECT alter_job(%s, config => 'not json')", (job,))
        # a check_config function sees every new config first
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="config needs a tag"):
            env.q("SELECT add_job('tick', '1 h', config => '{}', check_config => 'needs_tag')")
        (checked,) = env.q("SELECT add_job('tick', '1 h', config => '{\"tag\": \"c\"}', check_config => 'needs_tag', scheduled => false)")[0]
        try:
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="config needs a tag"):
                env.q("SELECT alter_job(%s, config => '{\"other\": 1}')", (checked,))
            assert env.q("SELECT check_schema, check_name FROM timescaledb_information.jobs WHERE job_id = %s", (checked,)) == [
                ("public", "needs_tag")
            ]
            assert env.q("SELECT * FROM alter_job(%s)", (checked,))[0][8] == "public.needs_tag"
        finally:
            env.q("SELECT delete_job(%s)", (checked,))
        # inside a transaction block alter_job is part of it: committed or rolled back with it
        with env.client.transaction():
            env.q("SELECT alter_job(%s, max_retries => 7)", (job,))
        assert env.m("SELECT max_retries FROM orochi_catalog.jobs WHERE job_id = %s", (job,)) == [(7,)]
        try:
            with env.client.transaction():
                env.q("SELECT alter_job(%s, max_retries => 9)", (job,))
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert env.m("SELECT max_retries FROM orochi_catalog.jobs WHERE job_id = %s", (job,)) == [(7,)]
    finally:
        env.q("SELECT delete_job(%s)", (job,))


def test_run_job_is_a_procedure(env: Env) -> None:
    (ok,) = env.q("SELECT add_job('tick', '1 h', scheduled => false, config => '{\"tag\": \"manual\"}')")[0]
    (bad,) = env.q("SELECT add_job('boom', '1 h', scheduled => false)")[0]
    try:
        cur = env.client.execute(f"CALL run_job({ok})")
        assert cur.statusmessage == "CALL" and cur.description is None
        cur = env.client.execute("CALL run_job(%s)", (ok,))  # extended protocol, $1
        assert cur.statusmessage == "CALL"
        assert env.m("SELECT count(*) FROM ticks WHERE job_id = %s AND tag = 'manual'", (ok,)) == [(2,)]
        assert [r[1] for r in env.runs(ok)] == [True, True]
        with pytest.raises(psycopg.errors.DivisionByZero, match="division by zero"):
            env.client.execute(f"CALL run_job({bad})")
        with pytest.raises(psycopg.errors.WrongObjectType, match=r"run_job\(integer\) is a procedure"):
            env.q(f"SELECT run_job({ok})")
        with pytest.raises(psycopg.errors.WrongObjectType, match="is not a procedure"):
            env.client.execute(f"CALL alter_job({ok})")
        with pytest.raises(psycopg.errors.UndefinedObject, match="job 999999 not found"):
            env.client.execute("CALL run_job(999999)")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction):
            with env.client.transaction():
                env.client.execute(f"CALL run_job({ok})")
    finally:
        env.q("SELECT delete_job(%s)", (ok,))
        env.q("SELECT delete_job(%s)", (bad,))
    # the history outlives the job, as job_errors does in TimescaleDB
    assert env.q("SELECT count(*) FROM timescaledb_information.job_history WHERE job_id = %s", (ok,)) == [(2,)]
    assert env.q("SELECT count(*) FROM timescaledb_information.jobs WHERE job_id IN (%s, %s)", (ok, bad)) == [(0,)]
    with pytest.raises(psycopg.errors.UndefinedObject):
        env.q("SELECT delete_job(%s)", (ok,))


def test_information_views_have_timescaledb_columns(env: Env) -> None:
    (job,) = env.q("SELECT add_job('tick', '1 h', scheduled => false, config => '{\"tag\": \"v\"}')")[0]
    try:
        env.client.execute(f"CALL run_job({job})")
        expected = {
            "jobs": [
                ("job_id", "int4"), ("application_name", "name"), ("schedule_interval", "interval"),
                ("max_runtime", "interval"), ("max_retries", "int4"), ("retry_period", "interval"),
                ("proc_schema", "name"), ("proc_name", "name"), ("owner", "regrole"), ("scheduled", "bool"),
                ("fixed_schedule", "bool"), ("config", "jsonb"), ("next_start", "timestamptz"),
                ("initial_start", "timestamptz"), ("hypertable_schema", "name"), ("hypertable_name", "name"),
                ("check_schema", "name"), ("check_name", "name"),
            ],
            "job_stats": [
                ("hypertable_schema", "name"), ("hypertable_name", "name"), ("job_id", "int4"),
                ("last_run_started_at", "timestamptz"), ("last_successful_finish", "timestamptz"),
                ("last_run_status", "text"), ("job_status", "text"), ("last_run_duration", "interval"),
                ("next_start", "timestamptz"), ("total_runs", "int8"), ("total_successes", "int8"),
                ("total_failures", "int8"),
            ],
            "job_errors": [
                ("job_id", "int4"), ("proc_schema", "text"), ("proc_name", "text"), ("pid", "int4"),
                ("start_time", "timestamptz"), ("finish_time", "timestamptz"), ("sqlerrcode", "text"),
                ("err_message", "text"),
            ],
            "job_history": [
                ("id", "int8"), ("job_id", "int4"), ("succeeded", "bool"), ("proc_schema", "text"),
                ("proc_name", "text"), ("pid", "int4"), ("start_time", "timestamptz"),
                ("finish_time", "timestamptz"), ("config", "jsonb"), ("sqlerrcode", "text"), ("err_message", "text"),
            ],
        }
        for view, columns in expected.items():
            got = env.m(
                "SELECT a.attname::text, t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                "WHERE a.attrelid = %s::regclass AND a.attnum > 0 ORDER BY a.attnum",
                (f"timescaledb_information.{view}",),
            )
            assert got == columns, view
        row = env.q(
            "SELECT application_name, proc_schema, proc_name, owner::text, scheduled, config "
            "FROM timescaledb_information.jobs WHERE job_id = %s",
            (job,),
        )
        assert row == [(f"User-Defined Action [{job}]", "public", "tick", "postgres", False, {"tag": "v"})]
        stats = env.q(
            "SELECT last_run_status, job_status, total_runs, total_successes, last_run_duration IS NOT NULL "
            "FROM timescaledb_information.job_stats WHERE job_id = %s",
            (job,),
        )
        assert stats == [("Success", "Paused", 1, 1, True)]
    finally:
        env.q("SELECT delete_job(%s)", (job,))


# ------------------------------------------------------------------------------ replicas


@pytest.fixture(scope="module")
def pair(cluster: LocalCluster, make_db: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    db = make_db()
    tmp = tmp_path_factory.mktemp("jobs-pair")
    with ThreadPoolExecutor(2) as pool:  # start both at once: each start waits for its port
        futures = [pool.submit(_start, tmp, cluster, db, name) for name in ("pair-a", "pair-b")]
    started = [f.result() for f in futures if f.exception() is None]
    if len(started) < 2:
        for p in started:
            p.stop()
        raise next(f.exception() for f in futures if f.exception() is not None)  # type: ignore[misc]
    e = Env(cluster, db, started)
    try:
        yield e
    finally:
        e.close()


def _runner_pid(run_by: str) -> int:
    return int(run_by.rsplit(":", 1)[1])


def test_two_proxies_run_each_due_run_once(pair: Env) -> None:
    (job,) = pair.q("SELECT add_job('tick', '1 s', config => '{\"tag\": \"pair\"}')")[0]
    try:
        pair.wait_for("5 runs", lambda: len(pair.runs(job)) >= 5, timeout=10)
        pair.q("SELECT alter_job(%s, scheduled => false)", (job,))
        time.sleep(0.5)
        runs = pair.runs(job)
        assert all(r[1] is True for r in runs), runs
        # one leader ran them all; each 1 s slot ran once; each run inserted exactly once
        assert len({r[4] for r in runs}) == 1, runs
        assert _runner_pid(runs[0][4]) in {p.process.pid for p in pair.proxies}
        (origin,) = pair.m("SELECT initial_start FROM orochi_catalog.jobs WHERE job_id = %s", (job,))[0]
        slots = [int((r[0] - origin).total_seconds()) for r in runs]
        assert slots == sorted(set(slots)), slots
        assert pair.m("SELECT count(*) FROM ticks WHERE job_id = %s", (job,)) == [(len(runs),)]
        # one session holds the leader lock
        assert _leader_backend(pair) is not None
    finally:
        pair.q("SELECT delete_job(%s)", (job,))


def _leader_backend(env: Env) -> int | None:
    rows = env.m(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND (classid::bigint << 32 | objid::bigint) = %s",
        (0x6F726F6368690002,),
    )
    return rows[0][0] if rows else None


def test_a_replica_takes_over_when_the_leader_connection_drops(pair: Env) -> None:
    (job,) = pair.q("SELECT add_job('tick', '1 s', config => '{\"tag\": \"takeover\"}')")[0]
    frozen: ProxyProcess | None = None
    try:
        first = pair.wait_for("a run", lambda: [r for r in pair.runs(job) if r[1] is not None])[0]
        leader = next(p for p in pair.proxies if p.process.pid == _runner_pid(first[4]))
        other = next(p for p in pair.proxies if p is not leader)
        old_backend = _leader_backend(pair)
        # Between two runs (a leader frozen mid-run would keep the job's lease), freeze the
        # leader so it cannot reconnect, then cut its leader connection.
        pair.wait_for(
            "a pause between runs",
            lambda: pair.m(
                "SELECT running_run_id IS NULL AND next_start > now() + interval '0.3 s' "
                "FROM orochi_catalog.jobs WHERE job_id = %s",
                (job,),
            )[0][0],
        )
        os.kill(leader.process.pid, signal.SIGSTOP)
        frozen = leader
        pair.m("SELECT pg_terminate_backend(%s)", (old_backend,))
        pair.wait_for(
            "a run by the other proxy",
            lambda: [r for r in pair.runs(job) if r[1] is True and _runner_pid(r[4]) == other.process.pid],
            timeout=5,
        )
        new_backend = _leader_backend(pair)
        assert new_backend not in (None, old_backend)
        # The old leader wakes up, finds its leadership gone, and does not run the job too.
        os.kill(leader.process.pid, signal.SIGCONT)
        frozen = None
        mark = len(pair.runs(job))
        time.sleep(2.5)
        later = pair.runs(job)[mark:]
        assert later and {_runner_pid(r[4]) for r in later} == {other.process.pid}, later
        assert _leader_backend(pair) == new_backend
        pair.q("SELECT alter_job(%s, scheduled => false)", (job,))
        time.sleep(0.5)
        runs = pair.runs(job)
        (origin,) = pair.m("SELECT initial_start FROM orochi_catalog.jobs WHERE job_id = %s", (job,))[0]
        slots = [int((r[0] - origin).total_seconds()) for r in runs]
        assert slots == sorted(set(slots)), slots
        assert pair.m("SELECT count(*) FROM ticks WHERE job_id = %s", (job,)) == [(len(runs),)]
    finally:
        if frozen is not None:
            os.kill(frozen.process.pid, signal.SIGCONT)
        pair.q("SELECT delete_job(%s)", (job,))


def test_killing_the_leader_mid_run_hands_the_job_to_the_other_proxy(pair: Env) -> None:
    (job,) = pair.q(
        "SELECT add_job('sleepy', '1 h', scheduled => false, config => '{\"sleep\": 2, \"tag\": \"kill\"}')"
    )[0]
    pair.q("SELECT alter_job(%s, retry_period => '1 s', scheduled => true)", (job,))
    first = pair.wait_for("the first run to start", lambda: pair.runs(job))[0]
    leader = next(p for p in pair.proxies if p.process.pid == _runner_pid(first[4]))
    other = next(p for p in pair.proxies if p is not leader)
    os.kill(leader.process.pid, signal.SIGKILL)
    leader.process.wait(timeout=10)
    done = pair.wait_for(
        "a successful run by the other proxy",
        lambda: [r for r in pair.runs(job) if r[1] is True],
        timeout=15,
    )
    runs = pair.runs(job)
    assert runs[0][1] is False and runs[0][3].startswith("job crash detected"), runs
    assert _runner_pid(runs[0][4]) == leader.process.pid
    assert _runner_pid(done[0][4]) == other.process.pid
    # the killed run's CALL was aborted by the server: only the re-run inserted its row
    assert pair.m("SELECT count(*) FROM ticks WHERE job_id = %s", (job,)) == [(1,)]
    stats = pair.m(
        "SELECT total_crashes, consecutive_crashes, running_by FROM orochi_catalog.jobs WHERE job_id = %s", (job,)
    )
    assert stats == [(1, 0, None)]
    with psycopg.connect(other.dsn(pair.db), autocommit=True) as c:
        c.execute("SELECT delete_job(%s)", (job,))


# ------------------------------------------------------------------------------ CLI

runner = CliRunner()


@pytest.fixture
def cli_db(cluster: LocalCluster, make_db: Callable[[], str], tmp_path: Path) -> tuple[str, str]:
    """A metadata database no proxy watches, and a config file for the CLI."""
    db = make_db()
    config = default_config(cluster)
    config["metadata"]["dbname"] = db
    path = tmp_path / "orochi.toml"
    path.write_text(render_toml(config))
    return db, str(path)


def test_cli_jobs_run_list_history(cluster: LocalCluster, cli_db: tuple[str, str]) -> None:
    db, config = cli_db

    async def setup() -> tuple[int, int]:
        # The API the policies use: add_job over an asyncpg connection.
        conn = await asyncpg.connect(**cluster.nodes[0].connect_kwargs(db))
        try:
            await migrate(conn)
            sql = jobs.asyncpg_runner(conn)
            ok = await jobs.add_job(sql, "tick", "1 h", proc_schema="public", config={"tag": "cli"})
            bad = await jobs.add_job(sql, "boom", timedelta(hours=1), proc_schema="public")
            return ok, bad
        finally:
            await conn.close()

    ok, bad = asyncio.run(setup())

    due = runner.invoke(app, ["jobs", "run", "--config", config])
    assert due.exit_code == 1, due.output
    assert f"job {ok}: succeeded" in due.stdout
    assert re.search(rf"job {bad}: FAILED in [0-9.]+s \(run \d+\): 22012 division by zero", due.stdout), due.stdout
    err = due.stderr.strip()
    assert err.startswith("error: 1 of 2 job run(s) failed") and "\n" not in err, err
    assert f"orochi-proxy jobs history {bad} --config {config}" in err
    assert f"orochi-proxy jobs run {bad} --config {config}" in err

    nothing = runner.invoke(app, ["jobs", "run", "--config", config])
    assert nothing.exit_code == 0 and "no jobs are due" in nothing.stdout, nothing.output

    again = runner.invoke(app, ["jobs", "run", str(ok), "--config", config])
    assert again.exit_code == 0 and f"job {ok}: succeeded" in again.stdout, again.output
    missing = runner.invoke(app, ["jobs", "run", "999999", "--config", config])
    assert missing.exit_code == 1 and "job 999999 not found" in missing.stderr, missing.output

    listed = runner.invoke(app, ["jobs", "list", "--config", config])
    assert listed.exit_code == 0, listed.output
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert "public.tick" in lines[str(ok)] and "Success" in lines[str(ok)]
    assert "public.boom" in lines[str(bad)] and "Failed" in lines[str(bad)]

    history = runner.invoke(app, ["jobs", "history", str(bad), "--config", config])
    assert history.exit_code == 0, history.output
    assert "failed: 22012 division by zero" in history.stdout and " cli " in history.stdout
    with psycopg.connect(cluster.nodes[0].dsn(db), autocommit=True) as c:
        assert c.execute("SELECT tag FROM ticks WHERE job_id = %s", (ok,)).fetchall() == [("cli",), ("cli",)]
        assert c.execute(
            "SELECT origin, succeeded FROM orochi_catalog.job_runs ORDER BY run_id"
        ).fetchall() == [("cli", True), ("cli", False), ("cli", True)]
