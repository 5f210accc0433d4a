"""What a test module that checks the proxy against the nodes holds open: ``ClusterEnv``.

One autocommit connection through the proxy (``admin``, for setup and ``q``), one directly to
each node (``nodes``, in the cluster's order), the nodes registered with ``citus_add_node``.
Modules add their own checks by subclassing; their fixture drops what they created and calls
``close``.
"""

from __future__ import annotations

from typing import Any

import psycopg
from proxyproc import ProxyProcess

from orochi_proxy.localcluster import LocalCluster


class ClusterEnv:
    def __init__(self, proxy: ProxyProcess, cluster: LocalCluster) -> None:
        self.proxy = proxy
        self.cluster = cluster
        self.admin = psycopg.connect(proxy.dsn(), autocommit=True)
        self.nodes = [psycopg.connect(n.dsn(), autocommit=True) for n in cluster.nodes]

    def register_nodes(self) -> None:
        for n in self.cluster.nodes:
            self.admin.execute("SELECT citus_add_node(%s, %s)", (n.host, n.port))

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        """A new connection through the proxy."""
        return psycopg.connect(self.proxy.dsn(), **kw)

    def q(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Rows of ``sql`` through the proxy (empty for a statement without rows)."""
        cur = self.admin.execute(sql, params)
        return cur.fetchall() if cur.description else []

    def close(self) -> None:
        self.admin.close()
        for c in self.nodes:
            c.close()
