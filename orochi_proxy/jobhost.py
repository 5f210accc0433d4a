"""Where jobs run: the job runner and scheduler of a proxy process, and of the CLI.

``policies`` may not import ``orochi_proxy``, so this module hands them what they need: a
connection factory for the metadata database (the catalog's credentials), the procedure
registry, and ``app`` — the ``ProxyServer`` — which every running procedure finds as
``ctx.app`` (node pools, the catalog). The proxy creates one :class:`JobHost` always (so
``CALL run_job`` works) and starts its scheduler when ``[jobs] enabled``; ``orochi-proxy jobs
run`` builds a ``ProxyServer`` without listening and runs jobs in the CLI process with the
same code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import asyncpg

from policies.jobrun import JobRunner
from policies.jobs import REGISTRY, JobRegistry
from policies.jobscheduler import JobScheduler

if TYPE_CHECKING:
    from orochi_proxy.server import ProxyServer


class JobHost:
    """A process's job runner, and its scheduler when enabled."""

    def __init__(self, server: ProxyServer, *, schedule: bool, registry: JobRegistry = REGISTRY) -> None:
        settings = server.config.jobs
        self.server = server
        self.runner = JobRunner(self._connect, registry=registry, app=server)
        self.scheduler = (
            JobScheduler(self.runner, poll_interval=settings.poll_interval, max_workers=settings.max_workers)
            if schedule
            else None
        )

    async def _connect(self) -> asyncpg.Connection:
        return await self.server.catalog.connect()

    def start(self) -> None:
        if self.scheduler is not None:
            self.scheduler.start()

    def wake(self) -> None:
        """Let the scheduler look at the jobs now (one was added or changed here)."""
        if self.scheduler is not None:
            self.scheduler.wake()

    async def close(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.close()
