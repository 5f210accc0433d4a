"""``python -m orochi_proxy`` runs the CLI (same as the ``orochi-proxy`` script)."""

from orochi_proxy.cli import app

app()
