"""Prometheus metrics for the proxy.

Each :class:`ProxyMetrics` owns its own ``CollectorRegistry`` rather than the global
default one, so several proxies (or test cases) in one process never collide with
"Duplicated timeseries" errors and tests can read exact values.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import (
    start_http_server as _start_http_server,
)

__all__ = ["CONTENT_TYPE", "STATEMENT_BUCKETS", "STRATEGIES", "ProxyMetrics"]

STRATEGIES = ("passthrough", "router", "multi_shard", "local", "admin")

# 100 µs .. 10 s, roughly three buckets per decade: a relayed router query sits near the
# bottom, a multi-shard aggregate or fallback query near the top.
STATEMENT_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ProxyMetrics:
    """All proxy metrics, registered on one registry.

    Label values are left to the caller (a strategy name, a SQLSTATE, a node name), but
    keep them to small fixed sets: every distinct value is a new time series.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._http: tuple[WSGIServer, threading.Thread] | None = None
        r = self.registry
        # Not "orochi_client_connections": that is the counter's family name (its samples
        # are ..._total), and one registry cannot hold a gauge and a counter under it.
        self.client_connections = Gauge(
            "orochi_client_connections_open", "Client connections currently open.", registry=r
        )
        self.client_connections_total = Counter(
            "orochi_client_connections", "Client connections accepted.", registry=r
        )
        self.statements = Counter(
            "orochi_statements",
            "Statements executed, by execution strategy.",
            ["strategy"],
            registry=r,
        )
        self.statement_seconds = Histogram(
            "orochi_statement_duration_seconds",
            "Statement execution time as seen by the proxy, by execution strategy.",
            ["strategy"],
            buckets=STATEMENT_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "orochi_errors",
            "Error responses sent to clients, by SQLSTATE.",
            ["sqlstate"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "orochi_protocol_errors",
            "Client protocol violations and aborted connections, by kind.",
            ["kind"],
            registry=r,
        )
        self.backend_pool_in_use = Gauge(
            "orochi_backend_pool_connections_in_use",
            "Backend connections checked out of the pool, per node.",
            ["node"],
            registry=r,
        )
        self.backend_pool_open = Gauge(
            "orochi_backend_pool_connections_open",
            "Backend connections open (idle or in use), per node.",
            ["node"],
            registry=r,
        )
        self.backend_pool_waiting = Gauge(
            "orochi_backend_pool_waiters",
            "Tasks waiting for a backend connection, per node.",
            ["node"],
            registry=r,
        )

        # Create every strategy's series up front: a series that appears only on its first
        # statement makes rate() and absent() alerts misbehave until then.
        for strategy in STRATEGIES:
            self.statements.labels(strategy=strategy)
            self.statement_seconds.labels(strategy=strategy)

    def start_http_server(self, port: int, addr: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` from prometheus_client's own daemon thread.

        A thread, not the event loop: scrapes then never delay client traffic, and a slow
        scraper cannot stall the proxy. Binds to loopback unless told otherwise. ``port=0``
        picks a free port; read it back from :attr:`http_port`.
        """
        if self._http is not None:
            raise RuntimeError("metrics HTTP server already running")
        self._http = _start_http_server(port, addr=addr, registry=self.registry)

    @property
    def http_port(self) -> int | None:
        """The port the metrics endpoint listens on, or None when not serving."""
        return None if self._http is None else self._http[0].server_port

    def stop_http_server(self) -> None:
        """Stop serving (for shutdown and tests); a no-op when not running."""
        if self._http is not None:
            server, thread = self._http
            self._http = None
            server.shutdown()
            server.server_close()
            thread.join(5)

    def render(self) -> bytes:
        """The text exposition format (:data:`CONTENT_TYPE`), e.g. for an admin command."""
        return generate_latest(self.registry)
