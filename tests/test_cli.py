"""The ``orochi-proxy`` command line against real nodes: nodes, status, errors and the demo.

Each test that touches the catalog gets a database of its own on node 0 of the session cluster
and points the CLI at it through a config file, so tests never see each other's nodes. The demo
runs as a real subprocess (``python -m orochi_proxy demo``): it starts PostgreSQL servers and
handles signals, which is exactly what must be seen from outside.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from proxyproc import REPO_ROOT, default_config, render_toml, start_proxy
from typer.testing import CliRunner

from orochi_proxy.cli import app
from orochi_proxy.localcluster import LocalCluster, free_port

runner = CliRunner()

PSQL_LINE = re.compile(r'psql "([^"]+)"')


# ------------------------------------------------------------------------------ helpers


async def _admin(kw: dict[str, Any], sql: str) -> None:
    conn = await asyncpg.connect(**kw)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def catalog_db(cluster: LocalCluster) -> Iterator[str]:
    """A fresh database on node 0 to hold this test's catalog; dropped afterwards."""
    admin = cluster.nodes[0].connect_kwargs("postgres")
    name = f"cli_test_{secrets.token_hex(4)}"
    asyncio.run(_admin(admin, f"CREATE DATABASE {name}"))
    try:
        yield name
    finally:
        asyncio.run(_admin(admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def write_config(tmp_path: Path, cluster: LocalCluster, dbname: str, **sections: Any) -> Path:
    """The suite's default proxy config with its catalog in ``dbname``; ``sections`` merge in."""
    config = default_config(cluster)
    config["metadata"]["dbname"] = dbname
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    path = tmp_path / "orochi.toml"
    path.write_text(render_toml(config))
    return path


def cli(*args: str) -> Any:
    """Invoke the CLI in-process; an uncaught exception (a traceback for users) fails the test."""
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    return result


def assert_one_line_error(result: Any, *fragments: str) -> str:
    """Exit code 1, nothing on stdout but a single ``error: ...`` line on stderr."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    err = result.stderr.strip()
    assert "\n" not in err, err
    assert err.startswith("error: "), err
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in err, err
    return err


def node_ids(list_output: str) -> dict[tuple[str, int], list[str]]:
    """Parse ``nodes list``: (host, port) -> the row's cells."""
    rows = [line.split() for line in list_output.strip().splitlines()[1:]]
    return {(r[1], int(r[2])): r for r in rows}


# ------------------------------------------------------------------------------ nodes


def test_nodes_add_list_remove(tmp_path: Path, cluster: LocalCluster, catalog_db: str) -> None:
    config = str(write_config(tmp_path, cluster, catalog_db))
    n0, n1 = cluster.nodes[0], cluster.nodes[1]

    empty = cli("nodes", "list", "--config", config)
    assert empty.exit_code == 0, empty.output
    assert "no nodes registered" in empty.stdout

    first = cli("nodes", "add", n0.host, str(n0.port), "--config", config)
    assert first.exit_code == 0, first.output
    second = cli("nodes", "add", n1.host, str(n1.port), "--config", config)
    assert second.exit_code == 0, second.output
    id0, id1 = int(first.stdout.strip()), int(second.stdout.strip())
    assert id0 != id1
    again = cli("nodes", "add", n1.host, str(n1.port), "--config", config)
    assert again.exit_code == 0 and int(again.stdout.strip()) == id1  # idempotent

    listed = cli("nodes", "list", "--config", config)
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.splitlines()[0].split()[:2] == ["NODE", "ID"]
    rows = node_ids(listed.stdout)
    assert set(rows) == {(n0.host, n0.port), (n1.host, n1.port)}
    # columns: id host port active metadata reachable
    assert rows[(n0.host, n0.port)][0] == str(id0)
    assert rows[(n0.host, n0.port)][3:6] == ["yes", "yes", "yes"]
    # node1 has no database named like the catalog's: login still works, so it is reachable
    assert rows[(n1.host, n1.port)][3:6] == ["yes", "no", "yes"]

    removed = cli("nodes", "remove", n1.host, str(n1.port), "--config", config)
    assert removed.exit_code == 0, removed.output
    assert set(node_ids(cli("nodes", "list", "--config", config).stdout)) == {(n0.host, n0.port)}

    gone = cli("nodes", "remove", n1.host, str(n1.port), "--config", config)
    assert_one_line_error(gone, "not in the cluster", "nodes list")


def test_nodes_list_shows_unreachable_node(
    tmp_path: Path, cluster: LocalCluster, catalog_db: str
) -> None:
    """A registered node that went away is listed as unreachable, with the reason."""
    config = str(write_config(tmp_path, cluster, catalog_db))

    async def register_closed_port() -> int:
        from orochi_proxy.catalog import Catalog

        n0 = cluster.nodes[0]
        cat = Catalog(n0.connect_kwargs(catalog_db), metadata_host=n0.host, metadata_port=n0.port)
        async with cat:
            return await cat.add_node("127.0.0.1", port)

    port = free_port()
    asyncio.run(register_closed_port())
    listed = cli("nodes", "list", "--config", config)
    assert listed.exit_code == 0, listed.output
    row = node_ids(listed.stdout)[("127.0.0.1", port)]
    assert row[5] == "no", listed.stdout
    assert "failed" in listed.stdout.lower()


def test_add_unreachable_node_fails(tmp_path: Path, cluster: LocalCluster, catalog_db: str) -> None:
    config = str(write_config(tmp_path, cluster, catalog_db))
    closed = free_port()  # nothing listens there
    result = cli("nodes", "add", "127.0.0.1", str(closed), "--config", config)
    assert_one_line_error(result, f"127.0.0.1:{closed}", "check that it is running")
    assert result.stdout == ""
    assert "no nodes registered" in cli("nodes", "list", "--config", config).stdout


def test_add_node_with_wrong_password_fails(
    tmp_path: Path, cluster: LocalCluster, catalog_db: str
) -> None:
    """The node answers but refuses the backend credentials: refused before the catalog."""
    config = str(write_config(tmp_path, cluster, catalog_db))
    bad = tmp_path / "bad"
    bad.mkdir()
    bad_config = str(write_config(bad, cluster, catalog_db, backend={"password": "wrong"}))
    n1 = cluster.nodes[1]
    result = cli("nodes", "add", n1.host, str(n1.port), "--config", bad_config)
    assert_one_line_error(result, "password authentication failed")
    assert "no nodes registered" in cli("nodes", "list", "--config", config).stdout


# ------------------------------------------------------------------------------ status


def test_status_follows_the_proxy(tmp_path: Path, cluster: LocalCluster, catalog_db: str) -> None:
    proxy = start_proxy(tmp_path, cluster, metadata={"dbname": catalog_db})
    config = str(proxy.config_path)
    try:
        for node in cluster.nodes[:2]:
            added = cli("nodes", "add", node.host, str(node.port), "--config", config)
            assert added.exit_code == 0, added.output
        up = cli("status", "--config", config)
        assert up.exit_code == 0, up.output
        assert "reachable, catalog version" in up.stdout
        assert f"{proxy.port}: answers (SELECT 1 as app)" in up.stdout
        assert up.stderr == ""
    finally:
        proxy.stop()
    down = cli("status", "--config", config)
    assert_one_line_error(down, "proxy does not answer")
    assert "reachable, catalog version" in down.stdout  # the rest is still reported


def test_status_with_metadata_down(tmp_path: Path, cluster: LocalCluster) -> None:
    config = str(write_config(tmp_path, cluster, "postgres", metadata={"port": free_port()}))
    result = cli("status", "--config", config)
    assert_one_line_error(result, "metadata database")
    assert "unreachable" in result.stdout


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "config file not found"),
        ("[server\nport = 1", "not valid TOML"),
        ("[nonsense]\nx = 1\n", "unknown config section"),
        ("[server]\nauth = 'md5'\n", "auth must be"),
    ],
)
def test_bad_config_is_one_line(tmp_path: Path, content: str | None, fragment: str) -> None:
    path = tmp_path / "broken.toml"
    if content is not None:
        path.write_text(content)
    for args in (["nodes", "list"], ["status"], ["nodes", "add", "127.0.0.1", "5"]):
        result = cli(*args, "--config", str(path))
        assert_one_line_error(result, fragment, "fix the config file")


def test_unreachable_metadata_is_one_line(tmp_path: Path, cluster: LocalCluster) -> None:
    config = str(write_config(tmp_path, cluster, "postgres", metadata={"port": free_port()}))
    for args in (["nodes", "list"], ["nodes", "remove", "127.0.0.1", "5432"]):
        result = cli(*args, "--config", config)
        assert_one_line_error(result, "cannot connect to the metadata database", "[metadata]")


def test_wrong_backend_password_is_one_line(
    tmp_path: Path, cluster: LocalCluster, catalog_db: str
) -> None:
    config = str(write_config(tmp_path, cluster, catalog_db, backend={"password": "wrong"}))
    result = cli("nodes", "list", "--config", config)
    assert_one_line_error(result, "password authentication failed", "[backend]")


# ------------------------------------------------------------------------------ demo


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _demo_cmd(data_dir: Path, port: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "orochi_proxy", "demo",
        "--nodes", "2", "--port", str(port), "--data-dir", str(data_dir), *extra,
    ]  # fmt: skip


def _postgres_processes(data_dir: Path) -> str:
    """``pgrep -f`` lines of processes whose command line names ``data_dir``."""
    res = subprocess.run(["pgrep", "-af", str(data_dir)], capture_output=True, text=True)
    return res.stdout.strip()


@pytest.fixture
def demo_dir() -> Iterator[Path]:
    """A data directory outside pytest's 0700 tmp tree (the nodes run as ``postgres``)."""
    path = Path(tempfile.mkdtemp(prefix="orochi-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _read_until_psql(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """Read the demo's output until the banner's psql line; returns (conninfo, output so far)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"no psql line within {timeout}s:\n{''.join(seen)}") from None
        if line is None:
            raise AssertionError(f"demo exited ({proc.wait()}) without a banner:\n{''.join(seen)}")
        seen.append(line)
        match = PSQL_LINE.search(line)
        if match:
            return match.group(1), "".join(seen)


def test_demo(demo_dir: Path) -> None:
    """--no-wait sets up and stops; a waiting demo (reusing the nodes) serves psql until SIGTERM."""
    port = free_port()
    quick = subprocess.run(
        _demo_cmd(demo_dir, port, "--no-wait"),
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=120,
    )
    assert quick.returncode == 0, quick.stdout + quick.stderr
    match = PSQL_LINE.search(quick.stdout)
    assert match, quick.stdout
    assert match.group(1) == f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
    assert "demo_devices 50 rows" in quick.stdout
    assert _postgres_processes(demo_dir) == ""

    proc = subprocess.Popen(
        _demo_cmd(demo_dir, port),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_child_env(),
    )
    try:
        conninfo, output = _read_until_psql(proc, timeout=90)
        assert "moved from" in output  # nodes came back on new ports and kept their ids (and shards)
        assert _postgres_processes(demo_dir) != ""
        res = subprocess.run(
            ["psql", conninfo, "-Atc", "select count(*) from demo_devices"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (res.returncode, res.stdout.strip()) == (0, "50"), res.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _postgres_processes(demo_dir) == ""


def test_demo_port_taken(demo_dir: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(
            _demo_cmd(demo_dir, port, "--no-wait"),
            capture_output=True, text=True, env=_child_env(), timeout=60,
        )  # fmt: skip
    assert res.returncode == 1
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert f"port {port}" in err and "--port" in err
    assert not (demo_dir / "node0").exists()  # refused before any node was created


def test_demo_without_postgres(demo_dir: Path) -> None:
    res = subprocess.run(
        _demo_cmd(demo_dir, free_port(), "--no-wait"),
        capture_output=True,
        text=True,
        env=_child_env(OROCHI_PG_BINDIR=str(demo_dir / "nowhere")),
        timeout=60,
    )
    assert res.returncode == 1
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "scripts/dev.sh demo" in err and "apt-get install -y postgresql-15" in err
