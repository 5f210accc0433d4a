"""Proxy metrics: values move, and the HTTP endpoint serves valid exposition text."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from orochi_proxy.metrics import STATEMENT_BUCKETS, ProxyMetrics

FAMILIES = {
    "orochi_client_connections_open",
    "orochi_client_connections",  # counter family; samples are orochi_client_connections_total
    "orochi_statements",
    "orochi_statement_duration_seconds",
    "orochi_errors",
    "orochi_protocol_errors",
    "orochi_backend_pool_connections_in_use",
    "orochi_backend_pool_connections_open",
    "orochi_backend_pool_waiters",
}


@pytest.fixture
def metrics() -> Iterator[ProxyMetrics]:
    m = ProxyMetrics()
    yield m
    m.stop_http_server()


def value(m: ProxyMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def exercise(m: ProxyMetrics) -> None:
    m.client_connections_total.inc()
    m.client_connections.inc()
    m.statements.labels(strategy="router").inc()
    m.statement_seconds.labels(strategy="router").observe(0.0003)
    m.errors.labels(sqlstate="0A000").inc()
    m.protocol_errors.labels(kind="bad_startup").inc()
    m.backend_pool_in_use.labels(node="n1").set(2)
    m.backend_pool_open.labels(node="n1").set(5)
    m.backend_pool_waiting.labels(node="n1").set(1)


def test_counters_move(metrics: ProxyMetrics) -> None:
    exercise(metrics)
    metrics.statements.labels(strategy="router").inc()
    assert value(metrics, "orochi_client_connections_total") == 1
    assert value(metrics, "orochi_client_connections_open") == 1
    assert value(metrics, "orochi_statements_total", strategy="router") == 2
    assert value(metrics, "orochi_errors_total", sqlstate="0A000") == 1
    assert value(metrics, "orochi_protocol_errors_total", kind="bad_startup") == 1
    assert value(metrics, "orochi_backend_pool_connections_in_use", node="n1") == 2
    assert value(metrics, "orochi_backend_pool_connections_open", node="n1") == 5
    assert value(metrics, "orochi_backend_pool_waiters", node="n1") == 1
    h = "orochi_statement_duration_seconds"
    assert value(metrics, f"{h}_count", strategy="router") == 1
    assert value(metrics, f"{h}_bucket", strategy="router", le="0.0001") == 0
    assert value(metrics, f"{h}_bucket", strategy="router", le="0.0005") == 1
    metrics.client_connections.dec()
    assert value(metrics, "orochi_client_connections_open") == 0


def test_strategies_start_at_zero(metrics: ProxyMetrics) -> None:
    for strategy in ("passthrough", "router", "multi_shard", "local", "admin"):
        assert value(metrics, "orochi_statements_total", strategy=strategy) == 0
        assert value(metrics, "orochi_statement_duration_seconds_count", strategy=strategy) == 0


def test_histogram_buckets_span_100us_to_10s() -> None:
    assert STATEMENT_BUCKETS[0] == 0.0001 and STATEMENT_BUCKETS[-1] == 10.0
    assert list(STATEMENT_BUCKETS) == sorted(STATEMENT_BUCKETS)


def test_registries_are_independent() -> None:
    a, b = ProxyMetrics(), ProxyMetrics()  # would raise DuplicateTimeseries on a shared registry
    a.client_connections_total.inc()
    assert value(b, "orochi_client_connections_total") == 0
    shared = CollectorRegistry()
    assert ProxyMetrics(shared).registry is shared


def test_render_is_valid_exposition(metrics: ProxyMetrics) -> None:
    exercise(metrics)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert FAMILIES <= families.keys()
    assert families["orochi_statement_duration_seconds"].type == "histogram"
    assert families["orochi_client_connections"].type == "counter"


def test_http_endpoint(metrics: ProxyMetrics) -> None:
    exercise(metrics)
    metrics.start_http_server(0)
    port = metrics.http_port
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    for name in [
        "orochi_client_connections_open",
        "orochi_client_connections_total",
        'orochi_statements_total{strategy="router"} 1.0',
        "orochi_statement_duration_seconds_bucket",
        "orochi_errors_total",
        "orochi_protocol_errors_total",
        'orochi_backend_pool_connections_in_use{node="n1"} 2.0',
        "orochi_backend_pool_connections_open",
        "orochi_backend_pool_waiters",
    ]:
        assert name in body
    assert FAMILIES <= {f.name for f in text_string_to_metric_families(body)}
    with pytest.raises(RuntimeError):
        metrics.start_http_server(0)
    metrics.stop_http_server()
    assert metrics.http_port is None
