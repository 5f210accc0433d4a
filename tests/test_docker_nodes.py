"""PostgreSQL nodes from ``compose.yaml`` via pytest-docker, where a Docker engine is usable.

Opt-in (``OROCHI_TEST_DOCKER=1``): the default suite uses ``LocalCluster`` nodes, which need no
Docker. This module checks that ``compose.yaml``'s nodes are what the proxy needs (2PC, logical
WAL, SCRAM password), so the compose file cannot rot unnoticed on machines that can run it.

The skip is decided at import time and applied as a ``skipif`` mark, which pytest evaluates
before any fixture is set up: pytest-docker's ``docker_services`` fails at setup (rather than
skipping) when ``docker compose`` is missing ("unknown shorthand flag: 'f'"), so it must never
be reached on such machines.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
#: Host ports that compose.yaml publishes node0..node2 on.
NODE_PORTS = (15432, 15433, 15434)
PASSWORD = "orochi"


def _docker_unavailable_reason() -> str | None:
    """Why the Docker path cannot run here, or None when it can."""
    if os.environ.get("OROCHI_TEST_DOCKER") != "1":
        return "Docker-based nodes are opt-in: set OROCHI_TEST_DOCKER=1"
    if importlib.util.find_spec("pytest_docker") is None:
        return "pytest-docker is not installed"
    if shutil.which("docker") is None:
        return "no docker CLI on PATH"
    for args, what in (
        (["docker", "info"], "no Docker engine answers `docker info`"),
        (["docker", "compose", "version"], "no compose plugin (`docker compose version` fails)"),
    ):
        try:
            res = subprocess.run(args, capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError) as exc:
            return f"{what}: {exc}"
        if res.returncode != 0:
            err = res.stderr.decode(errors="replace").strip().splitlines()
            return f"{what}: {err[-1] if err else 'exit ' + str(res.returncode)}"
    return None


_SKIP_REASON = _docker_unavailable_reason()

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or ""),
]


@pytest.fixture(scope="session")
def docker_compose_file() -> str:
    """pytest-docker hook: the repository's compose.yaml (not tests/docker-compose.yml)."""
    return str(COMPOSE_FILE)


@pytest.fixture(scope="session")
def docker_setup() -> list[str]:
    """pytest-docker hook: start only the database nodes (the proxy has its own profile)."""
    return ["up -d node0 node1 node2"]


def _node_dsn(port: int) -> str:
    return f"host=127.0.0.1 port={port} dbname=postgres user=postgres password={PASSWORD}"


def _responsive(port: int) -> bool:
    try:
        with psycopg.connect(_node_dsn(port), connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@pytest.fixture(scope="session")
def compose_nodes(docker_services: Any) -> list[str]:
    """DSNs of compose.yaml's three nodes, once each accepts a password login."""
    for port in NODE_PORTS:
        docker_services.wait_until_responsive(
            check=lambda port=port: _responsive(port), timeout=120.0, pause=1.0
        )
    return [_node_dsn(port) for port in NODE_PORTS]


def test_compose_nodes_have_proxy_settings(compose_nodes: list[str]) -> None:
    for dsn in compose_nodes:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT current_setting('max_prepared_transactions')::int, "
                "current_setting('wal_level'), current_setting('server_version_num')::int"
            ).fetchone()
        assert row is not None
        prepared, wal_level, version = row
        assert prepared >= 64
        assert wal_level == "logical"
        assert 150000 <= version < 160000


def test_compose_nodes_reject_a_wrong_password(compose_nodes: list[str]) -> None:
    for dsn in compose_nodes:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(
                dsn.replace(f"password={PASSWORD}", "password=wrong"), connect_timeout=5
            )
