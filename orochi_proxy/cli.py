"""The ``orochi-proxy`` command line (typer). Errors are one clear line, never a traceback.

Why the admin commands (``nodes``, ``status``) talk to the metadata database directly through
:class:`~orochi_proxy.catalog.Catalog` rather than through a running proxy: an operator reaches
for them exactly when something is wrong, often when the proxy is down. Every catalog change is
announced with NOTIFY, so running proxies pick up what the CLI changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn, TypeVar

import typer

from orochi_proxy.config import ConfigError, ProxyConfig, load_config

if TYPE_CHECKING:
    from orochi_proxy.catalog import Catalog, NodeInfo

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="orochi-proxy: one distributed PostgreSQL from many.",
)
nodes_app = typer.Typer(
    no_args_is_help=True, help="List, add and remove the PostgreSQL nodes of the cluster."
)
app.add_typer(nodes_app, name="nodes")

T = TypeVar("T")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (OROCHI_* variables override it)"),
]

#: How long ``nodes list`` and ``status`` wait for one node or the proxy before calling it
#: unreachable: an operator's command must answer quickly even when a host black-holes packets.
PROBE_TIMEOUT = 3.0


@app.callback()
def main() -> None:
    """orochi-proxy: one distributed PostgreSQL from many stock PostgreSQL servers."""


def _fail(msg: str) -> NoReturn:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


# ------------------------------------------------------------------------------ error handling


def _one_line(text: str) -> str:
    """Collapse a multi-line message (server errors, pg_ctl output) to one line."""
    return " ".join(text.split())


def _catalog_advice(sqlstate: str) -> str:
    """What to do about a catalog error, by SQLSTATE class."""
    if sqlstate.startswith("08"):
        return (
            "check [metadata] host/port in the config (or OROCHI_METADATA_*) and that this "
            "PostgreSQL server is running"
        )
    if sqlstate.startswith("28"):
        return "check [backend] user and password in the config (or OROCHI_BACKEND_*)"
    if sqlstate == "3D000":
        return "create that database or fix [metadata] dbname in the config"
    if sqlstate == "42704":
        return "see `orochi-proxy nodes list` for the registered nodes"
    return "see `orochi-proxy status`"


@contextlib.contextmanager
def _errors(
    config: Path | None = None,
    os_advice: str = "check the addresses in the config and the network",
) -> Iterator[None]:
    """Turn every expected failure into ``error: <what>; <what to do>`` and exit code 1.

    The imports are local so that ``orochi-proxy --help`` stays fast and works even when an
    optional part of the stack is broken.
    """
    import asyncpg

    from executor.protocol import PgError
    from orochi_proxy.catalog import CatalogError
    from orochi_proxy.localcluster import ClusterError

    where = f" --config {config}" if config else ""
    try:
        yield
    except typer.Exit:
        raise
    except ConfigError as exc:
        _fail(f"{exc}; fix the config file or the OROCHI_* variables")
    except CatalogError as exc:
        _fail(f"{_one_line(exc.message)}; {_catalog_advice(exc.sqlstate)}")
    except PgError as exc:
        hint = f"; {exc.hint}" if exc.hint else ""
        _fail(f"{_one_line(exc.message)}{hint}")
    except asyncpg.PostgresError as exc:
        sqlstate = getattr(exc, "sqlstate", "") or ""
        _fail(f"{_one_line(str(exc))}; {_catalog_advice(sqlstate)}")
    except (asyncpg.InterfaceError, TimeoutError) as exc:
        _fail(
            f"{_one_line(str(exc)) or type(exc).__name__}; "
            f"check that the servers in the config are up (orochi-proxy status{where})"
        )
    except ClusterError as exc:
        _fail(_one_line(str(exc)))
    except OSError as exc:
        _fail(f"{_one_line(str(exc))}; {os_advice}")


def _load(config: Path | None) -> ProxyConfig:
    with _errors():
        return load_config(config)


def _run(coro: Awaitable[T]) -> T:
    """Run one command's coroutine (a fresh loop per command; they are short-lived)."""
    return asyncio.run(coro)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ probes


@dataclass(frozen=True)
class Probe:
    """Result of trying to log in somewhere: ``ok`` and, if not, why."""

    ok: bool
    detail: str = ""

    def __str__(self) -> str:
        return "yes" if self.ok else f"no ({self.detail})"


def _catalog_for(cfg: ProxyConfig) -> Catalog:
    """A Catalog on the configured metadata database, with the proxy's backend credentials."""
    from orochi_proxy.catalog import Catalog

    return Catalog(
        {
            "host": cfg.metadata.host,
            "port": cfg.metadata.port,
            "user": cfg.backend.user,
            "password": cfg.backend.password or None,
            "database": cfg.metadata.dbname,
            "timeout": cfg.backend.connect_timeout,
        },
        metadata_host=cfg.metadata.host,
        metadata_port=cfg.metadata.port,
    )


async def probe_node(cfg: ProxyConfig, host: str, port: int, timeout: float) -> Probe:
    """Log in to a node with the backend credentials, as the proxy's data path would.

    The login goes to the metadata database's name. "database does not exist" (3D000) still
    counts as reachable: PostgreSQL checks the password before it looks up the database, so the
    credentials worked; the proxy only needs that database on nodes where clients use it.
    """
    from executor.backend import connect_backend
    from executor.protocol import PgError

    try:
        conn = await connect_backend(
            host,
            port,
            user=cfg.backend.user,
            password=cfg.backend.password,
            database=cfg.metadata.dbname,
            timeout=timeout,
        )
    except PgError as exc:
        if exc.sqlstate == "3D000":
            return Probe(True)
        return Probe(False, _one_line(exc.message))
    except (OSError, TimeoutError) as exc:
        return Probe(False, _one_line(str(exc)) or type(exc).__name__)
    conn.close()
    return Probe(True)


def _client_host(host: str) -> str:
    """Where to connect to reach a server listening on ``host`` (wildcards mean loopback)."""
    if host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _proxy_login(cfg: ProxyConfig) -> tuple[str, str | None] | None:
    """A user and password to log in through the proxy, or None if only TCP can be checked.

    The first ``[users]`` entry with a plain password; with no users the proxy runs trust auth
    and any name works, so the backend user is used. SCRAM verifiers cannot be logged in with.
    """
    for user, secret in cfg.users.items():
        if not secret.startswith("SCRAM-SHA-256$"):
            return user, secret
    if not cfg.users:
        return cfg.backend.user, None
    return None


async def probe_proxy(cfg: ProxyConfig, timeout: float = PROBE_TIMEOUT) -> Probe:
    """Whether the proxy answers ``SELECT 1`` on its configured address (a real client login)."""
    import asyncpg

    host, port = _client_host(cfg.server.host), cfg.server.port
    login = _proxy_login(cfg)
    if login is None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            return Probe(False, _one_line(str(exc)) or "timeout")
        writer.close()
        return Probe(True, "TCP only: [users] holds only SCRAM verifiers")
    user, password = login
    try:
        conn = await asyncpg.connect(
            host=host,
            port=port,
            user=user,
            password=password,
            database=cfg.metadata.dbname,
            timeout=timeout,
            ssl="prefer" if cfg.server.tls_cert else False,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return Probe(False, _one_line(str(exc)) or type(exc).__name__)
    try:
        value = await asyncio.wait_for(conn.fetchval("SELECT 1"), timeout)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return Probe(False, f"logged in as {user} but SELECT 1 failed: {_one_line(str(exc))}")
    finally:
        conn.terminate()
    if value != 1:
        return Probe(False, f"SELECT 1 returned {value!r}")
    return Probe(True, f"SELECT 1 as {user}")


# ------------------------------------------------------------------------------ output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, like ``psql``'s aligned output minus rules."""
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


async def _node_rows(
    cfg: ProxyConfig, nodes: Sequence[NodeInfo]
) -> tuple[list[list[object]], bool]:
    """Table rows for registered nodes with reachability probed concurrently; and all-reachable."""
    timeout = min(cfg.backend.connect_timeout, PROBE_TIMEOUT)
    probes = await asyncio.gather(*(probe_node(cfg, n.host, n.port, timeout) for n in nodes))
    rows: list[list[object]] = [
        [n.node_id, n.host, n.port, _yes(n.is_active), _yes(n.is_metadata), p]
        for n, p in zip(nodes, probes, strict=True)
    ]
    ok = all(p.ok for n, p in zip(nodes, probes, strict=True) if n.is_active)
    return rows, ok


NODE_HEADERS = ("NODE ID", "HOST", "PORT", "ACTIVE", "METADATA", "REACHABLE")


# ------------------------------------------------------------------------------ nodes


@nodes_app.command("list")
def nodes_list(config: ConfigOption = None) -> None:
    """Show the registered nodes and whether each one accepts a login now."""
    cfg = _load(config)

    async def body() -> tuple[str, int]:
        catalog = _catalog_for(cfg)
        async with catalog:
            nodes = list(catalog.nodes)
        rows, _ = await _node_rows(cfg, nodes)
        return format_table(NODE_HEADERS, rows), len(nodes)

    with _errors(config):
        table, count = _run(body())
    if count == 0:
        typer.echo("no nodes registered; add one with `orochi-proxy nodes add HOST PORT`")
    else:
        typer.echo(table)


@nodes_app.command("add")
def nodes_add(
    host: Annotated[str, typer.Argument(help="host name or address of the PostgreSQL server")],
    port: Annotated[int, typer.Argument(help="its port", min=1, max=65535)],
    config: ConfigOption = None,
) -> None:
    """Register a node (like citus_add_node); prints its node id.

    The node must accept a login with the [backend] credentials: a node the proxy cannot use
    would only turn into errors later, on the data path.
    """
    cfg = _load(config)

    async def body() -> int:
        probe = await probe_node(cfg, host, port, cfg.backend.connect_timeout)
        if not probe.ok:
            _fail(
                f"cannot log in to node {host}:{port} as {cfg.backend.user!r}: {probe.detail}; "
                "check that it is running and accepts the [backend] user and password"
            )
        catalog = _catalog_for(cfg)
        async with catalog:
            return await catalog.add_node(host, port)

    with _errors(config):
        node_id = _run(body())
    typer.echo(node_id)


@nodes_app.command("remove")
def nodes_remove(
    host: Annotated[str, typer.Argument(help="host name or address as registered")],
    port: Annotated[int, typer.Argument(help="its port", min=1, max=65535)],
    config: ConfigOption = None,
) -> None:
    """Unregister a node (like citus_remove_node)."""
    cfg = _load(config)

    async def body() -> None:
        catalog = _catalog_for(cfg)
        async with catalog:
            await catalog.remove_node(host, port)

    with _errors(config):
        _run(body())
    typer.echo(f"removed node {host}:{port}")


# ------------------------------------------------------------------------------ status


@app.command()
def status(config: ConfigOption = None) -> None:
    """Check the metadata database, every node and the proxy; exit 1 if anything is down."""
    cfg = _load(config)

    async def body() -> tuple[list[str], list[str]]:
        from orochi_proxy.catalog import CatalogError

        lines: list[str] = []
        problems: list[str] = []
        md = cfg.metadata
        md_where = f"{md.host}:{md.port} dbname={md.dbname}"
        catalog = _catalog_for(cfg)
        try:
            await catalog.open()
        except CatalogError as exc:
            lines.append(f"metadata database  {md_where}: unreachable ({_one_line(exc.message)})")
            problems.append(f"metadata database {md.host}:{md.port} is unreachable")
        else:
            try:
                nodes = list(catalog.nodes)
                version = catalog.version
            finally:
                await catalog.close()
            lines.append(f"metadata database  {md_where}: reachable, catalog version {version}")
            if nodes:
                rows, nodes_ok = await _node_rows(cfg, nodes)
                lines.append(f"nodes              {len(nodes)} registered")
                lines.extend("  " + line for line in format_table(NODE_HEADERS, rows).splitlines())
                if not nodes_ok:
                    problems.append("an active node is unreachable")
            else:
                lines.append(
                    "nodes              none registered (orochi-proxy nodes add HOST PORT)"
                )
        proxy = await probe_proxy(cfg)
        where = f"{cfg.server.host}:{cfg.server.port}"
        if proxy.ok:
            lines.append(f"proxy              {where}: answers ({proxy.detail})")
        else:
            lines.append(f"proxy              {where}: does not answer ({proxy.detail})")
            problems.append(f"the proxy does not answer on {where}")
        return lines, problems

    with _errors(config):
        lines, problems = _run(body())
    typer.echo("\n".join(lines))
    if problems:
        _fail("; ".join(problems) + " (see above)")


# ------------------------------------------------------------------------------ serve, demo


@app.command()
def serve(
    config: ConfigOption = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the proxy server (config file plus OROCHI_* environment variables)."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        _fail(str(exc))
    from executor.protocol import PgError
    from orochi_proxy.catalog import CatalogError
    from orochi_proxy.server import run

    try:
        run(cfg)
    except PgError as exc:
        _fail(f"cannot start: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
    except CatalogError as exc:
        _fail(f"cannot start: {exc}")
    except OSError as exc:
        _fail(f"cannot start: {exc}")


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(help="number of local PostgreSQL nodes", min=1, max=16)] = 3,
    port: Annotated[
        int, typer.Option(help="port of the proxy on 127.0.0.1", min=1, max=65535)
    ] = 6432,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="where the nodes' data directories live "
            "(default: $XDG_DATA_HOME/orochi-proxy/demo or ~/.local/share/orochi-proxy/demo)"
        ),
    ] = None,
    no_wait: Annotated[
        bool,
        typer.Option(
            "--no-wait", help="set up, run the example queries, print the banner and stop again"
        ),
    ] = False,
) -> None:
    """Start a local cluster and the proxy in front of it, with sample data; Ctrl-C stops all."""
    from orochi_proxy.demo import DemoError, DemoOptions, default_data_dir, run_demo
    from orochi_proxy.server import install_uvloop

    logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
    opts = DemoOptions(
        nodes=nodes, port=port, data_dir=data_dir or default_data_dir(), wait=not no_wait
    )
    install_uvloop()
    with _errors(os_advice="check --data-dir (it must be writable) and --port"):
        try:
            _run(run_demo(opts, out=lambda line: typer.echo(line)))
        except DemoError as exc:
            _fail(str(exc))


# ------------------------------------------------------------------------------ jobs

from orochi_proxy.jobcli import jobs_app  # noqa: E402  (its commands use the helpers above)

app.add_typer(jobs_app, name="jobs")
