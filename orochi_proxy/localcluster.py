"""Start and stop real PostgreSQL servers on loopback ports, for tests and ``orochi-proxy demo``.

Why real servers: the proxy's value is exact PostgreSQL semantics, and its backend side speaks the
wire protocol itself (SCRAM, 2PC, COPY, postgres_fdw). Mocks would test our assumptions, not
PostgreSQL. A local cluster is N ordinary ``initdb`` + ``pg_ctl`` data directories, each on a free
port of 127.0.0.1, with settings the proxy needs (``max_prepared_transactions`` for two-phase
commit, ``wal_level=logical`` for shard moves) and settings that make throw-away nodes fast
(``fsync=off`` and friends).

Facts of the machines this runs on (see ENVIRONMENT.md) shape the code:

* ``initdb`` and ``pg_ctl`` refuse to run as root, so as root every PostgreSQL program runs as the
  ``postgres`` OS user, and the directories it writes are given to that user first.
* Only C locales exist: ``--locale=C`` and ``LC_ALL=C.UTF-8``.
* Unix socket paths are limited to 107 bytes, so sockets go to a short ``/tmp/oro-*`` directory
  rather than next to a (possibly deep) data directory.
* Fixed ports collide with other servers (5432 has Debian's default cluster): ports are picked
  free, and a start that loses the race for its port retries on another one.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .config import node_dsn

__all__ = [
    "DEFAULT_SETTINGS",
    "ClusterError",
    "LocalCluster",
    "LocalNode",
    "PostgresNotFoundError",
    "find_pg_bindir",
    "free_port",
]

INSTALL_HINT = "apt-get install -y postgresql-15 postgresql-contrib"

#: Settings every node gets; ``LocalCluster(settings=...)`` overrides or extends them.
DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "300",
    # Two-phase commit across nodes needs prepared transactions (PostgreSQL's default is 0).
    "max_prepared_transactions": "100",
    # Shard moves use logical replication.
    "wal_level": "logical",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    # Throw-away nodes: durability costs time and buys nothing here.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
}

#: Log lines that mean "someone else has this port": start again on another port.
_PORT_IN_USE = re.compile(
    r"Address already in use|could not create any TCP/IP sockets|could not bind IPv4 address",
)

#: Ports handed out by this process and not yet known to be free again; two nodes started in the
#: same instant must not be given the same "free" port.
_reserved_ports: set[int] = set()
_ports_lock = threading.Lock()

_CONF_FILE = "orochi.conf"
_INCLUDE_LINE = f"include '{_CONF_FILE}'"


class ClusterError(RuntimeError):
    """A PostgreSQL program failed; the message carries its output or the server log's tail."""


class PostgresNotFoundError(ClusterError):
    """No PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``) were found."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a loopback TCP port that is free now and not handed out before by this process.

    Binding port 0 lets the kernel choose; the port is closed again before the server binds it,
    so another process can still take it in between. Callers that start servers must therefore
    retry on "address in use" (``LocalCluster`` does). Port 5432 is never returned.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        with _ports_lock:
            if port != 5432 and port not in _reserved_ports:
                _reserved_ports.add(port)
                return port
    raise ClusterError("could not find a free loopback port")


def _bindir_has_server(path: Path) -> bool:
    return all((path / prog).is_file() for prog in ("initdb", "pg_ctl", "postgres"))


def _version_key(path: Path) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<version>/bin``: numeric version, newest last."""
    return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)


def find_pg_bindir() -> Path:
    """Locate the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: ``$OROCHI_PG_BINDIR``; ``pg_config --bindir`` (Debian's points at the versioned
    directory, but ``pg_config`` may come from ``libpq-dev`` alone, so the server programs must
    really be there); the newest ``/usr/lib/postgresql/*/bin``; finally ``initdb`` on ``PATH``.
    Raises :class:`PostgresNotFoundError` saying how to install PostgreSQL when nothing fits.
    """
    override = os.environ.get("OROCHI_PG_BINDIR")
    if override:
        path = Path(override)
        if _bindir_has_server(path):
            return path
        raise PostgresNotFoundError(
            f"OROCHI_PG_BINDIR={override} does not contain initdb, pg_ctl and postgres"
        )
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out and _bindir_has_server(Path(out)):
            return Path(out)
    candidates = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if _bindir_has_server(p)),
        key=_version_key,
    )
    if candidates:
        return candidates[-1]
    initdb = shutil.which("initdb")
    if initdb:
        path = Path(initdb).resolve().parent
        if _bindir_has_server(path):
            return path
    raise PostgresNotFoundError(
        "PostgreSQL server programs (initdb, pg_ctl, postgres) were not found via pg_config, "
        f"/usr/lib/postgresql/*/bin or PATH. Install them with: {INSTALL_HINT} "
        "(as root, after apt-get update), or set OROCHI_PG_BINDIR."
    )


@dataclass
class LocalNode:
    """One PostgreSQL server of a :class:`LocalCluster`, with what a client needs to reach it."""

    name: str
    host: str
    port: int
    data_dir: Path
    socket_dir: Path
    user: str = "postgres"
    password: str = "orochi"

    @property
    def log_path(self) -> Path:
        """The server's log (stderr of the postmaster), read when a start fails."""
        return self.data_dir / "logfile"

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq key=value DSN over TCP with user and password (so SCRAM is exercised)."""
        return node_dsn(self.host, self.port, dbname, self.user, self.password)

    def connect_kwargs(self, dbname: str = "postgres") -> dict[str, Any]:
        """Keyword arguments for ``asyncpg.connect(**kw)``."""
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": dbname,
        }


def _conf_quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "''") + "'"


class LocalCluster:
    """N PostgreSQL servers in ``base_dir/node<i>``, each on its own free port of 127.0.0.1.

    ``start()`` initialises data directories that are not initialised yet (in parallel) and
    starts every node; ``stop()`` stops them and can be called any number of times. Data
    directories survive ``stop()``, so a later ``start()`` reuses them (on possibly new ports);
    ``destroy()`` removes everything.

    TCP connections need SCRAM-SHA-256 with ``password``; local (unix socket) connections are
    trusted, which is how the cluster itself could administer nodes without a password.
    """

    def __init__(
        self,
        base_dir: Path | str,
        n_nodes: int = 3,
        *,
        user: str = "postgres",
        password: str = "orochi",
        settings: dict[str, str] | None = None,
    ) -> None:
        if n_nodes < 1:
            raise ValueError("n_nodes must be at least 1")
        if not password:
            raise ValueError("a password is required: TCP connections use scram-sha-256")
        self.base_dir = Path(base_dir).absolute()
        self.n_nodes = n_nodes
        self.user = user
        self.password = password
        self.settings: dict[str, str] = {**DEFAULT_SETTINGS, **(settings or {})}
        self._as_root = os.geteuid() == 0
        self._bindir: Path | None = None
        # A short directory for unix sockets: paths under a pytest tmp dir exceed 107 bytes.
        self._socket_root = Path(tempfile.mkdtemp(prefix="oro-", dir="/tmp"))
        self.nodes: list[LocalNode] = [
            LocalNode(
                name=f"node{i}",
                host="127.0.0.1",
                port=0,
                data_dir=self.base_dir / f"node{i}",
                socket_dir=self._socket_root / f"n{i}",
                user=user,
                password=password,
            )
            for i in range(n_nodes)
        ]
        self._running: set[int] = set()
        self._lock = threading.Lock()
        # Servers are daemons and would outlive this process; the socket directory would stay
        # in /tmp. Clean both up at least on a normal interpreter exit (destroy() unregisters).
        atexit.register(self._at_exit)

    # ----------------------------------------------------------------- context manager

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ----------------------------------------------------------------- public API

    @property
    def bindir(self) -> Path:
        """The PostgreSQL bin directory in use (found lazily, so constructing never fails)."""
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    def start(self) -> list[LocalNode]:
        """Initialise missing data directories, then start every node; return the nodes.

        initdb and start run for all nodes concurrently: each is mostly waiting on its child
        process, and three sequential initdbs would triple the suite's start-up time. If any
        node fails, the ones that did start are stopped again before the error propagates, so
        a failed start leaves no servers behind.
        """
        # Fail early, with the install hint, before touching the disk.
        self._bindir = self._bindir or find_pg_bindir()
        self._prepare_dirs()
        try:
            with ThreadPoolExecutor(max_workers=self.n_nodes) as pool:
                list(pool.map(self._init_and_start, range(self.n_nodes)))
        except BaseException:
            self.stop()
            raise
        return self.nodes

    def stop(self) -> None:
        """Stop every node (``pg_ctl -m fast``, then ``immediate`` if that fails); idempotent."""
        todo = [i for i in range(self.n_nodes) if self._may_run(i)]
        if len(todo) <= 1:
            for i in todo:
                self._stop(i, "fast")
            return
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            list(pool.map(lambda i: self._stop(i, "fast"), todo))

    def _at_exit(self) -> None:
        """atexit hook: stop sequentially (no new threads can start during interpreter exit),
        then remove the socket directory."""
        with self._lock:
            started = sorted(self._running)
        for i in started:
            try:
                self._stop(i, "fast")
            except Exception:  # best effort while the interpreter exits
                pass
        shutil.rmtree(self._socket_root, ignore_errors=True)

    def _may_run(self, i: int) -> bool:
        """Whether node ``i`` was started by us or has a postmaster.pid (cheap, no subprocess)."""
        with self._lock:
            if i in self._running:
                return True
        return (self.nodes[i].data_dir / "postmaster.pid").exists()

    def stop_node(self, i: int, mode: str = "immediate") -> None:
        """Stop node ``i`` (``immediate`` simulates a crash: no shutdown checkpoint)."""
        if mode not in ("smart", "fast", "immediate"):
            raise ValueError(f"mode must be smart, fast or immediate, not {mode!r}")
        self._stop(i, mode)

    def start_node(self, i: int) -> None:
        """Start node ``i`` again, on its previous port if that is still free."""
        self._prepare_dirs()
        self._init_and_start(i)

    def is_running(self, i: int) -> bool:
        """Whether node ``i``'s postmaster is alive (``pg_ctl status``)."""
        node = self.nodes[i]
        if not (node.data_dir / "postmaster.pid").exists():
            return False
        res = self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(node.data_dir), "status"], check=False
        )
        return res.returncode == 0

    def destroy(self) -> None:
        """Stop all nodes and remove ``base_dir`` and the socket directories."""
        self.stop()
        atexit.unregister(self._at_exit)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        shutil.rmtree(self._socket_root, ignore_errors=True)

    # ----------------------------------------------------------------- internals

    def _child_env(self) -> dict[str, str]:
        """Environment for PostgreSQL programs: C.UTF-8 locale, no stray PG* variables.

        ``PGPORT``, ``PGDATA``, ``PGOPTIONS`` and the like from the caller's environment would
        silently change what the server does, so they are dropped.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C.UTF-8"
        env["LANG"] = "C.UTF-8"
        if self._as_root:
            pw = pwd.getpwnam("postgres")
            env["HOME"] = pw.pw_dir
            env["USER"] = env["LOGNAME"] = "postgres"
        return env

    def _run(
        self, args: list[str], *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program, as the ``postgres`` user when we are root."""
        kwargs: dict[str, Any] = {}
        if self._as_root:
            kwargs.update(user="postgres", group="postgres", extra_groups=[])
        res = subprocess.run(
            args,
            env=self._child_env(),
            cwd=str(self.base_dir) if self.base_dir.is_dir() else "/",
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            **kwargs,
        )
        if check and res.returncode != 0:
            raise ClusterError(
                f"{' '.join(args)} exited with {res.returncode}:\n{res.stdout}{res.stderr}"
            )
        return res

    def _chown(self, paths: Iterable[Path]) -> None:
        if not self._as_root:
            return
        pw = pwd.getpwnam("postgres")
        for p in paths:
            os.chown(p, pw.pw_uid, pw.pw_gid)

    def _prepare_dirs(self) -> None:
        """Create base and socket directories and make them usable by the server's user.

        As root, the ``postgres`` user must own ``base_dir`` (initdb creates the data
        directories in it) and be able to *traverse* every ancestor. pytest's temporary root
        (``/tmp/pytest-of-root``) is mode 0700, so ancestors owned by root get the search bit
        for others (``o+x``: enter, not list) when they lack it.
        """
        if self._as_root:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise ClusterError(
                    "running as root needs the 'postgres' OS user to run initdb/pg_ctl; it is "
                    f"created by Debian's PostgreSQL packages: {INSTALL_HINT}"
                ) from None
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._socket_root.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            node.socket_dir.mkdir(exist_ok=True)
        if self._as_root:
            self._chown([self.base_dir, self._socket_root, *(n.socket_dir for n in self.nodes)])
            for directory in (self.base_dir, self._socket_root):
                for parent in directory.parents:
                    mode = parent.stat().st_mode
                    if not mode & stat.S_IXOTH:
                        os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)

    def _initdb(self, node: LocalNode) -> None:
        """Create the data directory: UTF8, C locale, SCRAM for TCP, trust for the socket."""
        if (node.data_dir / "PG_VERSION").exists():
            return
        if node.data_dir.exists():
            # A half-initialised directory from an interrupted initdb: initdb needs it empty.
            shutil.rmtree(node.data_dir)
        # The password goes through a file, never the command line (visible in ps).
        fd, pwfile_name = tempfile.mkstemp(prefix=".pw-", dir=self.base_dir)
        pwfile = Path(pwfile_name)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.password + "\n")
            self._chown([pwfile])
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(node.data_dir),
                    "--locale=C",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-U",
                    self.user,
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    f"--pwfile={pwfile}",
                ],
                timeout=300,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        conf = node.data_dir / "postgresql.conf"
        text = conf.read_text()
        if _INCLUDE_LINE not in text:
            conf.write_text(text + f"\n# orochi-proxy LocalCluster settings\n{_INCLUDE_LINE}\n")

    def _write_conf(self, node: LocalNode) -> None:
        """(Re)write ``orochi.conf``: the port may change between starts, settings may too."""
        values = {
            **self.settings,
            "port": str(node.port),
            "unix_socket_directories": str(node.socket_dir),
            "password_encryption": "scram-sha-256",
        }
        lines = [f"{k} = {_conf_quote(v)}" for k, v in values.items()]
        path = node.data_dir / _CONF_FILE
        path.write_text(
            "# written by orochi_proxy.localcluster; rewritten on every start\n"
            + "\n".join(lines)
            + "\n"
        )
        self._chown([path])

    def _init_and_start(self, i: int) -> None:
        node = self.nodes[i]
        self._initdb(node)
        if self.is_running(i):
            # A server left over from an earlier process: its port and socket are unknown to
            # us, so stop it and start it under our current configuration.
            self._stop(i, "immediate", force=True)
        attempts = 5
        for attempt in range(attempts):
            if node.port == 0 or attempt > 0 or not self._port_free(node.port):
                node.port = free_port(node.host)
            self._write_conf(node)
            log = node.log_path
            offset = log.stat().st_size if log.exists() else 0
            res = self._run(
                [
                    str(self.bindir / "pg_ctl"),
                    "-D",
                    str(node.data_dir),
                    "-l",
                    str(log),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
                check=False,
                timeout=90,
            )
            if res.returncode == 0:
                with self._lock:
                    self._running.add(i)
                return
            tail = self._log_since(log, offset)
            if _PORT_IN_USE.search(tail) and attempt < attempts - 1:
                continue
            raise ClusterError(
                f"{node.name} did not start on port {node.port} "
                f"(pg_ctl exit {res.returncode}):\n{res.stdout}{res.stderr}\n"
                f"--- {log} ---\n{tail[-4000:]}"
            )

    @staticmethod
    def _port_free(port: int, host: str = "127.0.0.1") -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # PostgreSQL binds with SO_REUSEADDR, so connections of the previous run still in
            # TIME_WAIT do not keep it off its port; without the flag here a node restarted
            # after a crash always moved to a new port, and clients configured with the old
            # one (a proxy) could not reach it again.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                return False
        return True

    @staticmethod
    def _log_since(log: Path, offset: int) -> str:
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _stop(self, i: int, mode: str, *, force: bool = False) -> None:
        """Stop node ``i`` with ``mode``; if that fails or times out, stop it immediately."""
        node = self.nodes[i]
        if not (force or self._may_run(i)):
            return
        with self._lock:
            self._running.discard(i)
        if not node.data_dir.exists():
            return
        pg_ctl = str(self.bindir / "pg_ctl")
        modes = [mode] if mode == "immediate" else [mode, "immediate"]
        for m in modes:
            try:
                res = self._run(
                    [pg_ctl, "-D", str(node.data_dir), "-m", m, "-w", "-t", "30", "stop"],
                    check=False,
                    timeout=45,
                )
            except subprocess.TimeoutExpired:
                continue
            out = res.stdout + res.stderr
            if res.returncode == 0 or "Is server running?" in out or "No such file" in out:
                return
        # Last resort: the postmaster ignores pg_ctl; kill it so no server outlives the cluster.
        self._kill_postmaster(node)

    @staticmethod
    def _kill_postmaster(node: LocalNode) -> None:
        pidfile = node.data_dir / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
