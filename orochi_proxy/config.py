"""Proxy configuration: a TOML file overlaid with ``OROCHI_*`` environment variables.

Why TOML: it is in the standard library (``tomllib``), typed, and readable by operators; the
environment overlay lets containers (compose, Helm) change a setting without a new file.

Example file::

    [server]
    host = "127.0.0.1"
    port = 6432
    tls_cert = "/etc/orochi/server.crt"   # optional; TLS is offered only when set
    tls_key = "/etc/orochi/server.key"
    auth = "scram-sha-256"                 # or "trust"
    metrics_port = 9187                    # 0 disables the Prometheus endpoint
    startup_timeout = 60.0                 # seconds from connect to ReadyForQuery
    pool_mode = "session"                  # or "transaction": node connections shared between transactions

    [users]                                # client users of the proxy: name = password
    app = "secret"                         # (or a SCRAM verifier "SCRAM-SHA-256$...")

    [metadata]                             # the metadata database (default: the first node)
    host = "127.0.0.1"
    port = 5432
    dbname = "postgres"

    [backend]                              # credentials the proxy uses on every node
    user = "postgres"
    password = ""
    pool_size = 50
    connect_timeout = 5.0

    [jobs]                                 # retention, compression, refresh, user-defined actions
    enabled = true                         # run scheduled jobs (one replica at a time leads)
    poll_interval = 1.0                    # seconds between looks at due jobs (and leader checks)
    max_workers = 4                        # jobs this process runs at once

Environment variables override single keys: ``OROCHI_SERVER_PORT=7000``,
``OROCHI_BACKEND_PASSWORD=...``, ``OROCHI_METADATA_HOST=...``; ``OROCHI_USERS="app:secret,bob:pw"``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The configuration is unusable; the message says which key and why."""


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 6432
    tls_cert: str | None = None
    tls_key: str | None = None
    auth: str = "trust"  # "trust" | "scram-sha-256"
    metrics_port: int = 0
    max_message_size: int = 64 * 1024 * 1024
    server_version: str | None = None  # reported to clients; default: the metadata node's
    # Seconds a client may take from connect to ReadyForQuery (PostgreSQL's
    # authentication_timeout): a client that never finishes start-up must not hold a slot.
    startup_timeout: float = 60.0
    # "session": a client keeps one metadata-node connection from start-up to exit.
    # "transaction": only inside a transaction; between them it serves other clients
    # (orochi_proxy.txpool says what is reproduced and what pins a session).
    pool_mode: str = "session"


@dataclass
class MetadataSettings:
    host: str = "127.0.0.1"
    port: int = 5432
    dbname: str = "postgres"


@dataclass
class BackendSettings:
    user: str = "postgres"
    password: str = ""
    pool_size: int = 50
    connect_timeout: float = 5.0
    acquire_timeout: float = 30.0
    recovery_interval: float = 30.0  # seconds between runs of prepared-transaction recovery
    # lock_timeout on the nodes of a distributed transaction when the client set none: a lock
    # wait across nodes (a distributed deadlock) is invisible to each node's deadlock detector.
    transaction_lock_timeout: str = "30s"


@dataclass
class JobsSettings:
    # Whether this process may run scheduled jobs. Replicas elect one leader among themselves
    # (policies/jobscheduler.py), so enabling it everywhere is the normal setting; false leaves
    # scheduling to the others (CALL run_job and `orochi-proxy jobs run` still work).
    enabled: bool = True
    poll_interval: float = 1.0  # seconds; also how soon a replica takes over from a dead leader
    max_workers: int = 4  # jobs run at once by the leader (TimescaleDB's max_background_workers)


@dataclass
class ProxyConfig:
    server: ServerSettings = field(default_factory=ServerSettings)
    metadata: MetadataSettings = field(default_factory=MetadataSettings)
    backend: BackendSettings = field(default_factory=BackendSettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    users: dict[str, str] = field(default_factory=dict)

    def metadata_dsn(self, dbname: str | None = None) -> str:
        """A libpq/asyncpg DSN for the metadata database with the backend credentials."""
        return node_dsn(
            self.metadata.host,
            self.metadata.port,
            dbname or self.metadata.dbname,
            self.backend.user,
            self.backend.password,
        )


def node_dsn(host: str, port: int, dbname: str, user: str, password: str = "") -> str:
    """Build a key=value libpq DSN (accepted by psycopg, and by asyncpg via ``connect(**kw)``)."""
    parts = [f"host={host}", f"port={port}", f"dbname={dbname}", f"user={user}"]
    if password:
        escaped = password.replace("\\", "\\\\").replace("'", "\\'")
        parts.append(f"password='{escaped}'")
    return " ".join(parts)


def _coerce(value: str, target: Any) -> Any:
    if isinstance(target, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(target, int):
        return int(value)
    if isinstance(target, float):
        return float(value)
    return value


def _apply_section(obj: Any, section: str, values: dict[str, Any]) -> None:
    known = {f.name for f in fields(obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown setting [{section}] {key}; known: {', '.join(sorted(known))}")
        setattr(obj, key, value)


_SECTIONS = ("server", "metadata", "backend", "jobs")


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None) -> ProxyConfig:
    """Read ``path`` (TOML; optional) and overlay ``OROCHI_<SECTION>_<KEY>`` variables from ``env``."""
    env = dict(os.environ if env is None else env)
    cfg = ProxyConfig()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {p}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
        for section, values in data.items():
            if section == "users":
                cfg.users.update({str(k): str(v) for k, v in values.items()})
            elif section in _SECTIONS:
                _apply_section(getattr(cfg, section), section, values)
            else:
                raise ConfigError(f"unknown config section [{section}]")
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        for f in fields(obj):
            var = f"OROCHI_{section.upper()}_{f.name.upper()}"
            if var in env:
                current = getattr(obj, f.name)
                try:
                    setattr(obj, f.name, _coerce(env[var], current if current is not None else ""))
                except ValueError:
                    raise ConfigError(f"{var}={env[var]!r} is not a valid {type(current).__name__}") from None
    if env.get("OROCHI_USERS"):
        for pair in env["OROCHI_USERS"].split(","):
            name, sep, pw = pair.partition(":")
            if not sep:
                raise ConfigError("OROCHI_USERS must look like 'user:password,user2:password2'")
            cfg.users[name.strip()] = pw
    if cfg.server.auth not in ("trust", "scram-sha-256"):
        raise ConfigError(f"[server] auth must be 'trust' or 'scram-sha-256', not {cfg.server.auth!r}")
    if cfg.server.auth == "scram-sha-256" and not cfg.users:
        raise ConfigError("[server] auth = 'scram-sha-256' needs at least one entry in [users]")
    if not cfg.server.startup_timeout > 0:
        raise ConfigError(f"[server] startup_timeout must be > 0 seconds, not {cfg.server.startup_timeout!r}")
    if cfg.server.pool_mode not in ("session", "transaction"):
        raise ConfigError(f"[server] pool_mode must be 'session' or 'transaction', not {cfg.server.pool_mode!r}")
    if not cfg.jobs.poll_interval > 0:
        raise ConfigError(f"[jobs] poll_interval must be > 0 seconds, not {cfg.jobs.poll_interval!r}")
    if cfg.jobs.max_workers < 1:
        raise ConfigError(f"[jobs] max_workers must be at least 1, not {cfg.jobs.max_workers!r}")
    if bool(cfg.server.tls_cert) != bool(cfg.server.tls_key):
        raise ConfigError("[server] tls_cert and tls_key must be set together")
    return cfg
