"""``orochi-proxy demo``: a local cluster, the proxy in front of it and sample data, in one command.

What it does, in order: start (or reuse) N PostgreSQL nodes in a data directory with
:class:`~orochi_proxy.localcluster.LocalCluster`, start the proxy in this process on 127.0.0.1
with trust auth (the first node holds the metadata database), make the catalog list exactly the
running nodes, load :mod:`orochi_proxy.demo_data` through the proxy, run the example queries,
print how to connect, and wait for Ctrl-C or SIGTERM. Every exit path stops the proxy and the
nodes: a demo must never leave PostgreSQL servers running behind the user's back.

Why the catalog is reconciled rather than just added to: a reused data directory keeps the
catalog of the previous run, and the nodes come back on new free ports, so old entries would name
addresses where nothing (or something else) listens now.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import asyncpg

from orochi_proxy.config import BackendSettings, MetadataSettings, ProxyConfig, ServerSettings
from orochi_proxy.demo_data import (
    DISTRIBUTE_SQL,
    EXAMPLE_QUERIES,
    EXPECTED_ROWS,
    LOAD_SQL_BY_TABLE,
    SCHEMA_SQL,
)
from orochi_proxy.localcluster import ClusterError, LocalCluster, PostgresNotFoundError
from orochi_proxy.server import ProxyServer

HOST = "127.0.0.1"
USER = "postgres"
DBNAME = "postgres"
#: Password of the demo nodes' ``postgres`` user over TCP (the proxy logs in with it). The nodes
#: listen on loopback only; clients of the proxy need no password (trust).
NODE_PASSWORD = "orochi"
LOCK_FILE = "demo.lock"
EXAMPLE_ROWS_SHOWN = 5

INSTALL_ADVICE = (
    "run `scripts/dev.sh demo` (it installs them), or install them with "
    "`apt-get install -y postgresql-15 postgresql-contrib`"
)

Output = Callable[[str], None]


class DemoError(Exception):
    """The demo cannot run; the message is one line that says what to do."""


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/orochi-proxy/demo``, else ``~/.local/share/orochi-proxy/demo``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "orochi-proxy" / "demo"


@dataclass
class DemoOptions:
    """What ``orochi-proxy demo`` was asked for."""

    nodes: int = 3
    port: int = 6432
    data_dir: Path = field(default_factory=default_data_dir)
    wait: bool = True


def psql_conninfo(port: int, host: str = HOST, user: str = USER, dbname: str = DBNAME) -> str:
    """The libpq connection string of the demo proxy, as printed in the banner."""
    return f"host={host} port={port} user={user} dbname={dbname}"


# ------------------------------------------------------------------------------ preparation


@contextlib.contextmanager
def _exclusive(data_dir: Path) -> Iterator[None]:
    """Hold a lock on the data directory for the demo's lifetime.

    A second demo on the same directory would restart the first one's nodes under it
    (LocalCluster stops servers it finds running in its directories), so it is refused.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    lock: IO[str] = open(data_dir / LOCK_FILE, "a")  # noqa: SIM115 - held until the demo ends
    try:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(
                f"another orochi-proxy demo is running with data directory {data_dir}; stop it "
                "or choose another directory with --data-dir"
            ) from None
        yield
    finally:
        lock.close()  # closing releases the lock


def _check_port_free(port: int) -> None:
    """Fail before starting any node if the proxy's port is taken (the common mistake)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # The proxy binds with SO_REUSEADDR too: connections in TIME_WAIT don't count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            raise _port_error(port, exc) from None


def _port_error(port: int, exc: OSError) -> DemoError:
    if exc.errno == errno.EADDRINUSE:
        why = "is already in use"
    else:
        why = f"cannot be used ({exc.strerror or exc})"
    return DemoError(f"port {port} on {HOST} {why}; choose another one with --port")


def _start_cluster(cluster: LocalCluster) -> None:
    """Start the nodes (blocking; run in a thread) with errors turned into one-line advice."""
    try:
        cluster.start()
    except PostgresNotFoundError:
        raise DemoError(f"PostgreSQL server programs were not found; {INSTALL_ADVICE}") from None
    except ClusterError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DemoError(
            f"could not start the local PostgreSQL nodes: {first}; see the logs "
            f"{cluster.base_dir}/node*/logfile, or start afresh with another --data-dir"
        ) from None


def proxy_config(cluster: LocalCluster, port: int) -> ProxyConfig:
    """The in-process proxy's config: trust auth on loopback, metadata on the first node."""
    node0 = cluster.nodes[0]
    return ProxyConfig(
        server=ServerSettings(host=HOST, port=port, auth="trust"),
        metadata=MetadataSettings(host=node0.host, port=node0.port, dbname=DBNAME),
        backend=BackendSettings(user=cluster.user, password=cluster.password, pool_size=10),
    )


# ------------------------------------------------------------------------------ the run


async def _register_nodes(server: ProxyServer, cluster: LocalCluster, out: Output) -> None:
    """Make the catalog list exactly the running nodes (see the module docstring for why)."""
    wanted = {(n.host, n.port) for n in cluster.nodes}
    registered = {(n.host, n.port) for n in server.catalog.nodes}
    stale = [node for node in server.catalog.nodes if (node.host, node.port) not in wanted]
    fresh = [n for n in cluster.nodes if (n.host, n.port) not in registered]
    # A node restarted on another port keeps its id (and the shards placed on it).
    for node, n in zip(stale, fresh, strict=False):
        await server.catalog.update_node(node.node_id, n.host, n.port)
        out(f"  node {node.node_id} moved from {node.address} to {n.host}:{n.port}")
    for node in stale[len(fresh) :]:
        await server.remove_node(node.host, node.port)
        out(f"  removed stale node {node.address} (from an earlier run)")
    for n in cluster.nodes:
        await server.add_node(n.host, n.port)


async def _load_sample_data(conn: asyncpg.Connection, out: Output) -> None:
    """Create and fill the sample tables through the proxy; idempotent (see demo_data)."""
    await conn.execute(SCHEMA_SQL)
    for table, load_sql in LOAD_SQL_BY_TABLE.items():
        done = await conn.fetchval("SELECT count(*) FROM citus_tables WHERE table_name = $1", f"public.{table}")
        if done:
            continue  # distributed by an earlier run, rows included
        await conn.execute(load_sql)  # plain table still: idempotent ON CONFLICT DO NOTHING
        await conn.execute(DISTRIBUTE_SQL[table])
    out("  demo_devices: reference table; demo_metrics: distributed by device_id; demo_orders: by order_id")
    counts = []
    for table in EXPECTED_ROWS:
        n = await conn.fetchval(f"SELECT count(*) FROM {table}")
        counts.append(f"{table} {n} rows")
    out(f"  sample data: {', '.join(counts)}")


def _format_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "t" if value else "f"
    return str(value)


async def _run_examples(conn: asyncpg.Connection, out: Output) -> None:
    """Run every example query through the proxy and show its first rows (psql -At style)."""
    out("")
    out("Example queries, run through the proxy:")
    for example in EXAMPLE_QUERIES:
        rows = await conn.fetch(example.sql)
        out(f"  -- {example.title}")
        out(f"  {example.sql}")
        for row in rows[:EXAMPLE_ROWS_SHOWN]:
            out("    " + "|".join(_format_value(v) for v in row))
        if len(rows) > EXAMPLE_ROWS_SHOWN:
            out(f"    ... ({len(rows)} rows)")


def _banner(opts: DemoOptions, out: Output) -> None:
    out("")
    out(
        f"orochi-proxy demo: {opts.nodes} PostgreSQL node{'s' if opts.nodes != 1 else ''} "
        f"behind the proxy on {HOST}:{opts.port} (data in {opts.data_dir})"
    )
    out("")
    out("Connect with:")
    out(f'  psql "{psql_conninfo(opts.port)}"')
    out("")
    out("and try:")
    for example in EXAMPLE_QUERIES:
        out(f"  {example.sql}")
    out("")
    if opts.wait:
        out("Press Ctrl-C to stop the proxy and the nodes.")
    else:
        out("--no-wait: stopping the proxy and the nodes again.")


async def run_demo(opts: DemoOptions, out: Output = print) -> None:
    """Run the demo until Ctrl-C/SIGTERM (or right through with ``wait=False``).

    Raises :class:`DemoError` with a one-line message for the problems a user can fix (port
    taken, PostgreSQL missing, directory in use); catalog and protocol errors propagate as
    their own types for the CLI to report. The nodes are stopped on every path.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        _check_port_free(opts.port)
        with _exclusive(opts.data_dir):
            cluster = LocalCluster(opts.data_dir, opts.nodes, password=NODE_PASSWORD)
            try:
                out(f"Starting {opts.nodes} PostgreSQL node(s) in {opts.data_dir} ...")
                # Blocking subprocesses: in a thread, so signals are still noted meanwhile. The
                # start is never abandoned half-way (a cancelled to_thread keeps running).
                await asyncio.to_thread(_start_cluster, cluster)
                if stop.is_set():
                    return
                for n in cluster.nodes:
                    out(f"  {n.name}: {n.host}:{n.port}")
                await _serve(opts, cluster, stop, out)
            finally:
                await asyncio.to_thread(cluster.stop)
                out("Stopped the proxy and the nodes.")
    finally:
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def _serve(
    opts: DemoOptions,
    cluster: LocalCluster,
    stop: asyncio.Event,
    out: Output,
) -> None:
    """Start the proxy, register nodes, load data, show the banner, wait; close the proxy."""
    server = ProxyServer(proxy_config(cluster, opts.port))
    try:
        try:
            await server.start()
        except OSError as exc:
            raise _port_error(opts.port, exc) from None
        out(f"Proxy listening on {HOST}:{opts.port}; registering the nodes ...")
        await _register_nodes(server, cluster, out)
        if stop.is_set():
            return
        conn = await asyncpg.connect(
            host=HOST, port=opts.port, user=USER, database=DBNAME, ssl=False, timeout=30
        )
        try:
            out("Loading the sample data through the proxy ...")
            await _load_sample_data(conn, out)
            await _run_examples(conn, out)
        finally:
            conn.terminate()
        _banner(opts, out)
        if opts.wait:
            await stop.wait()
    finally:
        await server.close()
