"""The job scheduler: one leader among the proxy replicas starts the jobs that are due.

Leadership is PostgreSQL's session-level advisory lock :data:`LEADER_LOCK_KEY`, held on a
connection of its own to the metadata database: every replica tries to take it at each poll,
one holds it. If that connection drops (the process died, the network or the metadata node
failed), PostgreSQL releases the lock and another replica takes it at its next poll; the old
leader notices at its next poll (the query fails), stops starting jobs and tries to lead again.

Each poll the leader

1. settles orphaned runs (a job marked running whose lock nobody holds: its runner died), which
   reschedules them as after a failure (``JobRunner.settle_orphans``), and
2. starts, up to ``max_workers`` at a time, every job that is scheduled and due.

Each run holds its own lease (``policies/jobrun.py``): a run in progress is not disturbed when
its process loses leadership, and a due job that something else is running (``CALL run_job``,
``orochi-proxy jobs run``) is skipped. So each due run happens once, whatever the number of
replicas. Everything a poll compares uses the metadata database's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from policies.jobrun import JobRunner
from policies.jobs import SCHEMA

log = logging.getLogger(__name__)

LEADER_LOCK_KEY = 0x6F726F6368690002  # "orochi" + 0x0002 (0x0001 serialises catalog migrations)


class JobScheduler:
    """Leader election plus the poll loop; :meth:`start` once, :meth:`close` at shutdown."""

    def __init__(
        self,
        runner: JobRunner,
        *,
        poll_interval: float = 1.0,
        max_workers: int = 4,
        leader_key: int = LEADER_LOCK_KEY,
        max_backoff: float = 10.0,
    ) -> None:
        self.runner = runner
        self.poll_interval = poll_interval
        self.max_workers = max_workers
        self.leader_key = leader_key
        self.max_backoff = max_backoff
        self.is_leader = False
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._running: dict[int, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Start polling in the background (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="orochi-jobs")

    def wake(self) -> None:
        """Poll now instead of at the next interval (a job finished or was changed)."""
        self._wake.set()

    async def close(self) -> None:
        """Stop polling and the runs of this process; give up leadership.

        Runs cut short are left marked running: the next leader records them as crashed and
        runs the jobs again, as TimescaleDB treats jobs of a scheduler that got SIGTERM.
        """
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 5)
        self._drop_connection()

    # ------------------------------------------------------------------------------ loop

    async def _loop(self) -> None:
        backoff = self.poll_interval
        while True:
            try:
                await self.poll()
                backoff = self.poll_interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the metadata node may be away; retry
                if self.is_leader:
                    log.warning("job scheduler lost leadership: %s", exc or type(exc).__name__)
                else:
                    log.debug("job scheduler poll failed: %s", exc)
                self._drop_connection()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.max_backoff)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def poll(self) -> list[int]:
        """One round: become or stay leader, settle orphans, start due jobs; the ids started."""
        conn = self._conn
        if conn is None or conn.is_closed():
            self._drop_connection()
            conn = self._conn = await self.runner.connect()
            await conn.execute("SET application_name = 'orochi-proxy job scheduler'")
        if not self.is_leader:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.leader_key):
                return []
            self.is_leader = True
            log.info("this process now runs the scheduled jobs (job leader)")
        await self.runner.settle_orphans(conn, exclude=set(self._running))
        free = self.max_workers - len(self._running)
        if free <= 0:
            return []
        rows = await conn.fetch(
            f"SELECT job_id FROM {SCHEMA}.jobs WHERE scheduled AND next_start <= now() "
            "AND running_run_id IS NULL AND NOT job_id = ANY($1::int[]) ORDER BY next_start LIMIT $2",
            list(self._running), free,
        )
        started = [r["job_id"] for r in rows]
        for job_id in started:
            task = asyncio.get_running_loop().create_task(self._run(job_id), name=f"orochi-job-{job_id}")
            self._running[job_id] = task
        return started

    async def _run(self, job_id: int) -> None:
        try:
            result = await self.runner.run(job_id, origin="schedule", only_if_due=True)
            if result.ran and not result.succeeded:
                log.warning("job %d failed: %s %s", job_id, result.sqlerrcode, result.message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the next poll (or leader) settles it
            log.warning("job %d could not run: %s", job_id, exc or type(exc).__name__)
        finally:
            self._running.pop(job_id, None)
            self.wake()

    def _drop_connection(self) -> None:
        self.is_leader = False
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()  # ends the session: the leader lock is released at once
