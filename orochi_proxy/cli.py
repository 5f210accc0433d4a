"""The ``orochi-proxy`` command line (typer). Errors are one clear line, never a traceback."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from orochi_proxy.config import ConfigError, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help="orochi-proxy: one distributed PostgreSQL from many.")


@app.callback()
def main() -> None:
    """orochi-proxy: one distributed PostgreSQL from many stock PostgreSQL servers."""


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)


@app.command()
def serve(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning")] = "info",
) -> None:
    """Run the proxy server (config file plus OROCHI_* environment variables)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
