"""Prometheus metrics for the proxy.

Each :class:`ProxyMetrics` owns its own ``CollectorRegistry`` rather than the global
default one, so several proxies (or test cases) in one process never collide with
"Duplicated timeseries" errors and tests can read exact values.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client import (
    start_http_server as _start_http_server,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

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


class _HotCounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HotHistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last slot: above the largest bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class HotCounter:
    """A labelled counter for the per-statement hot path: a plain ``+=``, no lock.

    prometheus-client's Counter takes a mutex and resolves labels on every call; measured here
    that was ~40% of the Python time of a relayed statement. These values are only written from
    the event loop thread and read (atomically per int/float under the GIL) at scrape time.
    Callers should keep the child from ``labels()`` and call ``inc()`` on it.
    """

    def __init__(self, name: str, documentation: str, labelname: str) -> None:
        self.name = name
        self.documentation = documentation
        self.labelname = labelname
        self._children: dict[str, _HotCounterChild] = {}

    def labels(self, *values: str, **kw: str) -> _HotCounterChild:
        value = values[0] if values else kw[self.labelname]
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = _HotCounterChild()
        return child

    def collect(self) -> Iterator[Metric]:
        fam = CounterMetricFamily(self.name, self.documentation, labels=[self.labelname])
        for value, child in list(self._children.items()):
            fam.add_metric([value], child.value)
        yield fam


class HotHistogram:
    """Like :class:`HotCounter`, for a labelled histogram (``observe`` is a bisect and two adds)."""

    def __init__(self, name: str, documentation: str, labelname: str, buckets: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelname = labelname
        self.buckets = tuple(buckets)
        self._children: dict[str, _HotHistogramChild] = {}

    def labels(self, *values: str, **kw: str) -> _HotHistogramChild:
        value = values[0] if values else kw[self.labelname]
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = _HotHistogramChild(self.buckets)
        return child

    def collect(self) -> Iterator[Metric]:
        fam = HistogramMetricFamily(self.name, self.documentation, labels=[self.labelname])
        for value, child in list(self._children.items()):
            counts = list(child.counts)
            cumulative, running = [], 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                running += n
                cumulative.append((_bucket_label(bound), running))
            fam.add_metric([value], cumulative, child.sum)
        yield fam


def _bucket_label(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


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
        self.statements = HotCounter(
            "orochi_statements", "Statements executed, by execution strategy.", "strategy"
        )
        r.register(self.statements)  # type: ignore[arg-type]
        self.statement_seconds = HotHistogram(
            "orochi_statement_duration_seconds",
            "Statement execution time as seen by the proxy, by execution strategy.",
            "strategy",
            STATEMENT_BUCKETS,
        )
        r.register(self.statement_seconds)  # type: ignore[arg-type]
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
