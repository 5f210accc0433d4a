"""The proxy's Prometheus endpoint, scraped over HTTP from the running process after real traffic.

``test_metrics.py`` checks the metric objects in-process; this checks the wiring: that the
session and server actually move them (connections, statements by strategy, errors by SQLSTATE,
the latency histogram, pool gauges per node) and that ``/metrics`` serves them. The shared proxy
also serves other tests, so counters are compared as deltas.
"""

from __future__ import annotations

import time
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from proxyproc import ProxyProcess

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(proxy: ProxyProcess) -> tuple[Samples, str]:
    url = f"http://{proxy.host}:{proxy.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    return samples, text


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_after_traffic(proxy: ProxyProcess) -> None:
    before, _ = scrape(proxy)
    node = f"{proxy.config['metadata']['host']}:{proxy.config['metadata']['port']}"
    n_queries = 7
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for i in range(n_queries):
            assert conn.execute("SELECT %s::int", (i,)).fetchone() == (i,)
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        during, text = scrape(proxy)

    # Connections: this one is open (the gauge), and was counted (the counter).
    assert get(during, "orochi_client_connections_open") >= 1
    assert (
        get(during, "orochi_client_connections_total")
        >= get(before, "orochi_client_connections_total") + 1
    )

    # Statements by strategy: psycopg's parameterised queries are extended-protocol Executes.
    passthrough = get(during, "orochi_statements_total", strategy="passthrough")
    assert passthrough >= get(before, "orochi_statements_total", strategy="passthrough") + n_queries
    assert passthrough > 0

    # Errors by SQLSTATE.
    assert (
        get(during, "orochi_errors_total", sqlstate="22012")
        >= get(before, "orochi_errors_total", sqlstate="22012") + 1
    )

    # The latency histogram: buckets, count and sum for the strategy that ran.
    count = get(during, "orochi_statement_duration_seconds_count", strategy="passthrough")
    assert (
        count
        >= get(before, "orochi_statement_duration_seconds_count", strategy="passthrough")
        + n_queries
    )
    assert get(during, "orochi_statement_duration_seconds_sum", strategy="passthrough") > 0
    inf = get(during, "orochi_statement_duration_seconds_bucket", strategy="passthrough", le="+Inf")
    assert inf == count
    assert 'orochi_statement_duration_seconds_bucket{le="0.001",strategy="passthrough"}' in text

    # Pool gauges per node, while the client held its connection.
    assert get(during, "orochi_backend_pool_connections_open", node=node) >= 1
    assert get(during, "orochi_backend_pool_connections_in_use", node=node) >= 1
    assert ("orochi_backend_pool_waiters", frozenset({("node", node)})) in during

    # After the client left, the connection is back in the pool (the reset is asynchronous).

    deadline = time.monotonic() + 5
    while True:
        after, _ = scrape(proxy)
        if get(after, "orochi_backend_pool_connections_in_use", node=node) < get(
            during, "orochi_backend_pool_connections_in_use", node=node
        ):
            break
        assert time.monotonic() < deadline, "the pool gauge did not go down after the client left"
        time.sleep(0.1)
    assert get(after, "orochi_backend_pool_connections_open", node=node) >= 1
