"""Run ``orochi-proxy serve`` as a real subprocess in tests.

Why a subprocess and not an in-process server: tests then see exactly what a deployment sees
(the CLI, config loading, signal handling, uvloop), and a hung or crashed proxy cannot take the
test runner with it. ``start_proxy`` is a plain function so tests can start extra proxies (TLS,
trust auth, a second replica) besides the session's ``proxy`` fixture.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orochi_proxy.config import node_dsn
from orochi_proxy.localcluster import LocalCluster, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Section names of the proxy's TOML config (see ``orochi_proxy/config.py``).
SECTIONS = ("server", "users", "metadata", "backend", "jobs")


class ProxyStartError(RuntimeError):
    """The proxy exited or did not accept connections in time; the message has the log's tail."""


@dataclass
class ProxyProcess:
    """A running proxy and what a client needs to reach it."""

    host: str
    port: int
    user: str
    password: str
    dbname: str
    metrics_port: int
    log_path: Path
    config_path: Path
    process: subprocess.Popen[bytes]
    config: dict[str, dict[str, Any]] = field(default_factory=dict)

    def dsn(self, dbname: str | None = None, **extra: str) -> str:
        """A libpq key=value DSN for the proxy; ``extra`` adds options such as ``sslmode``."""
        dsn = node_dsn(self.host, self.port, dbname or self.dbname, self.user, self.password)
        return " ".join([dsn, *(f"{k}={v}" for k, v in extra.items())])

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the proxy's combined stdout/stderr, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Idempotent."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        s = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{s}"'
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to the proxy's TOML config")


def _toml_key(key: str) -> str:
    if key.replace("_", "").replace("-", "").isalnum():
        return key
    return _toml_value(key)


def render_toml(config: dict[str, dict[str, Any]]) -> str:
    """Write the proxy's config (sections of scalar values) as TOML; ``tomllib`` only reads."""
    out: list[str] = []
    for section, values in config.items():
        out.append(f"[{section}]")
        out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in values.items() if v is not None)
        out.append("")
    return "\n".join(out)


def default_config(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    """The proxy config the test suite uses: SCRAM for clients, metadata on node0."""
    node0 = cluster.nodes[0]
    return {
        "server": {
            "host": "127.0.0.1",
            "port": free_port(),
            "auth": "scram-sha-256",
            "metrics_port": free_port(),
        },
        "users": {"app": "app-secret"},
        "metadata": {"host": node0.host, "port": node0.port, "dbname": "postgres"},
        "backend": {"user": cluster.user, "password": cluster.password},
    }


def _wait_for_port(proc: ProxyProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.process.poll()
        if code is not None:
            raise ProxyStartError(
                f"orochi-proxy exited with {code} before accepting connections on "
                f"{proc.host}:{proc.port}; log {proc.log_path}:\n{proc.log_tail()}"
            )
        try:
            with socket.create_connection((proc.host, proc.port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.stop()
            raise ProxyStartError(
                f"orochi-proxy did not accept connections on {proc.host}:{proc.port} within "
                f"{timeout:.0f}s; log {proc.log_path}:\n{proc.log_tail()}"
            )
        time.sleep(0.1)


def start_proxy(
    tmp_dir: Path | str,
    cluster: LocalCluster,
    *,
    name: str = "proxy",
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    **overrides: dict[str, Any],
) -> ProxyProcess:
    """Write a config to ``tmp_dir/<name>.toml`` and start ``python -m orochi_proxy serve``.

    ``overrides`` are config sections merged over :func:`default_config`, e.g.
    ``start_proxy(tmp, cluster, server={"auth": "trust"})`` or
    ``server={"tls_cert": str(cert), "tls_key": str(key)}``; a value of ``None`` removes a key.
    ``users=`` replaces the user table; the first user becomes the client identity of the
    returned object. ``env`` adds environment variables (``OROCHI_*`` overrides work too).
    Blocks until the proxy's port accepts TCP connections, or raises :class:`ProxyStartError`
    with the log's tail. The caller must ``stop()`` the result.
    """
    unknown = set(overrides) - set(SECTIONS)
    if unknown:
        raise TypeError(f"unknown config sections {sorted(unknown)}; known: {SECTIONS}")
    tmp = Path(tmp_dir)
    tmp.mkdir(parents=True, exist_ok=True)
    config = default_config(cluster)
    for section, values in overrides.items():
        if section == "users":
            config["users"] = dict(values)
        else:
            merged = {**config.get(section, {}), **values}
            config[section] = {k: v for k, v in merged.items() if v is not None}

    config_path = tmp / f"{name}.toml"
    config_path.write_text(render_toml(config))
    log_path = tmp / f"{name}.log"

    child_env = dict(os.environ)
    # Import the working tree even if the package is not installed (or installed elsewhere).
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), child_env.get("PYTHONPATH", "")) if p
    )
    child_env["PYTHONUNBUFFERED"] = "1"
    child_env.update(env or {})

    users = config.get("users") or {"postgres": cluster.password}
    user, password = next(iter(users.items()))
    server = config["server"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "orochi_proxy", "serve", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=str(tmp),
        )
    proc = ProxyProcess(
        host=str(server.get("host", "127.0.0.1")),
        port=int(server["port"]),
        user=user,
        password=password,
        dbname="postgres",
        metrics_port=int(server.get("metrics_port", 0)),
        log_path=log_path,
        config_path=config_path,
        process=process,
        config=config,
    )
    try:
        _wait_for_port(proc, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc
