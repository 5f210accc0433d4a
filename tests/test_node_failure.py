"""A node that is down, dies mid-query, or accepts TCP and then says nothing.

The standard: the client gets a clear class-08 error within a bounded time (``[backend]
connect_timeout``), never a hang; the proxy process stays up and serves others; when the node
is back, new connections work without restarting the proxy.

These tests stop nodes, so they run against their own one-node LocalCluster and their own proxy
(never the session's shared ``cluster``). The silent node is a TCP relay in front of the real
node: it forwards while the proxy starts (its catalog needs the metadata database), then swallows
every new connection without a byte, like a node behind a firewall that drops packets.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import psycopg
import pytest
from conftest import pg_base_dir
from proxyproc import ProxyProcess, start_proxy
from rawpg import RawClient, ServerClosed, error_fields

from executor import protocol as pg
from orochi_proxy.localcluster import LocalCluster

CONNECT_TIMEOUT = 1.0
#: What "promptly" means: the configured timeout plus scheduling slack on a busy machine.
PROMPT = CONNECT_TIMEOUT + 3.0


@pytest.fixture(scope="module")
def node() -> Iterator[LocalCluster]:
    c = LocalCluster(pg_base_dir("nodefail"), 1)
    try:
        c.start()
        yield c
    finally:
        c.destroy()


@pytest.fixture(scope="module")
def fproxy(node: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyProcess]:
    proc = start_proxy(
        tmp_path_factory.mktemp("nodefail"),
        node,
        name="nodefail",
        backend={"connect_timeout": CONNECT_TIMEOUT, "acquire_timeout": 5.0},
    )
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def node_back(node: LocalCluster) -> Iterator[None]:
    """Whatever a test does to the node, it is running again (on the same port) afterwards."""
    port = node.nodes[0].port
    yield
    if not node.is_running(0):
        node.start_node(0)
    assert node.nodes[0].port == port, "the node came back on another port; the proxy cannot follow"


def _login_error(proxy: ProxyProcess) -> tuple[dict[str, str], float]:
    """Log in with the raw client; return the ErrorResponse fields and the seconds it took."""
    t0 = time.monotonic()
    with RawClient(proxy.host, proxy.port, timeout=30) as c:
        with pytest.raises(AssertionError) as info:
            c.login(proxy.user, proxy.password, proxy.dbname)
        c.expect_closed(5)
    elapsed = time.monotonic() - t0
    text = str(info.value)
    assert text.startswith("login failed: "), text
    return eval(text.removeprefix("login failed: ")), elapsed  # noqa: S307 - our own repr


def _works(proxy: ProxyProcess, deadline: float = 15.0) -> None:
    """A normal client gets an answer again (retrying while the node finishes recovery)."""
    end = time.monotonic() + deadline
    while True:
        try:
            with psycopg.connect(proxy.dsn(), connect_timeout=5) as conn:
                assert conn.execute("SELECT 'back'").fetchone() == ("back",)
                return
        except psycopg.OperationalError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)


def _alive(proxy: ProxyProcess) -> None:
    assert proxy.process.poll() is None, f"proxy exited:\n{proxy.log_tail()}"


# ------------------------------------------------------------------------------ node down


def test_node_down_fails_fast_with_08006(
    node: LocalCluster, fproxy: ProxyProcess, node_back: None
) -> None:
    _works(fproxy)  # leaves an idle pooled connection, which must not be handed out dead
    node.stop_node(0, "immediate")

    fields, elapsed = _login_error(fproxy)
    assert fields["C"] == "08006", fields
    assert fields["S"] == "FATAL"
    assert "connection to node" in fields["M"]
    assert elapsed < PROMPT, f"took {elapsed:.1f}s"

    t0 = time.monotonic()
    with pytest.raises(psycopg.OperationalError) as pinfo:
        psycopg.connect(fproxy.dsn(), connect_timeout=30)
    assert time.monotonic() - t0 < PROMPT
    assert "connection to node" in str(pinfo.value)

    async def via_asyncpg() -> None:
        await asyncpg.connect(
            host=fproxy.host,
            port=fproxy.port,
            user=fproxy.user,
            password=fproxy.password,
            database="postgres",
            timeout=30,
        )

    t0 = time.monotonic()
    with pytest.raises(asyncpg.PostgresError) as ainfo:
        asyncio.run(via_asyncpg())
    assert ainfo.value.sqlstate == "08006"
    assert time.monotonic() - t0 < PROMPT

    _alive(fproxy)
    node.start_node(0)
    _works(fproxy)


# ------------------------------------------------------------------------------ dies mid-query


def test_node_dies_mid_query(node: LocalCluster, fproxy: ProxyProcess, node_back: None) -> None:
    _works(fproxy)
    raw = RawClient(fproxy.host, fproxy.port, timeout=30)
    raw.login(fproxy.user, fproxy.password, fproxy.dbname)
    idle = psycopg.connect(fproxy.dsn(), autocommit=True)
    sleeper = psycopg.connect(fproxy.dsn(), autocommit=True)
    try:
        with ThreadPoolExecutor(1) as ex:

            def sleep_query() -> BaseException | None:
                try:
                    sleeper.execute("SELECT pg_sleep(10)")
                except BaseException as exc:  # noqa: BLE001 - the test inspects it
                    return exc
                return None

            fut = ex.submit(sleep_query)
            raw.send(pg.query("SELECT pg_sleep(10)"))
            time.sleep(0.5)
            t0 = time.monotonic()
            node.stop_node(0, "immediate")

            # The raw client: the node's goodbye notice may be relayed, then our FATAL 08006, EOF.
            msgs: list[tuple[bytes, bytes]] = []
            try:
                while True:
                    msgs.append(raw.read_message(PROMPT))
            except ServerClosed:
                pass
            elapsed = time.monotonic() - t0
            errors = [error_fields(p) for t, p in msgs if t == b"E"]
            assert errors, msgs
            assert errors[-1]["C"].startswith("08"), errors
            assert errors[-1]["S"] == "FATAL"
            assert elapsed < PROMPT, f"error after {elapsed:.1f}s"

            # psycopg sees a class-08 SQLSTATE on its running query.
            exc = fut.result(timeout=PROMPT)
            assert isinstance(exc, psycopg.OperationalError), exc
            assert (exc.sqlstate or "").startswith("08"), (exc.sqlstate, exc)
            assert time.monotonic() - t0 < PROMPT

        # A client that was idle learns about it on its next statement, promptly.
        t1 = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            idle.execute("SELECT 1")
        assert time.monotonic() - t1 < PROMPT
    finally:
        raw.close()
        idle.close()
        sleeper.close()

    _alive(fproxy)
    node.start_node(0)
    _works(fproxy)
    # And the pool did not keep dead connections: several clients at once all work.
    conns = [psycopg.connect(fproxy.dsn(), autocommit=True) for _ in range(5)]
    try:
        for c in conns:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        for c in conns:
            c.close()


# ------------------------------------------------------------------------------ silent node


class Relay:
    """A TCP relay to ``target``; in ``silent`` mode new connections are accepted and ignored."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.silent = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        self.accepted_silently = 0
        self._stop = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(client)
            if self.silent:
                self.accepted_silently += 1
                continue  # hold it open, never answer
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.socks.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for s in self.socks:
            s.close()


@pytest.fixture
def silent_env(
    node: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Relay, ProxyProcess]]:
    n = node.nodes[0]
    relay = Relay((n.host, n.port))
    try:
        proc = start_proxy(
            tmp_path_factory.mktemp("silent"),
            node,
            name="silent",
            metadata={"host": "127.0.0.1", "port": relay.port, "dbname": "postgres"},
            backend={"connect_timeout": CONNECT_TIMEOUT, "acquire_timeout": 5.0},
        )
        try:
            yield relay, proc
        finally:
            proc.stop()
    finally:
        relay.close()


def test_silent_node_times_out_with_08006(silent_env: tuple[Relay, ProxyProcess]) -> None:
    relay, proxy = silent_env
    relay.silent = True  # no client has logged in yet, so the pool holds no connection

    fields, elapsed = _login_error(proxy)
    assert fields["C"] == "08006", fields
    assert "timeout" in fields["M"], fields
    assert CONNECT_TIMEOUT * 0.9 <= elapsed < PROMPT, f"took {elapsed:.1f}s"
    assert relay.accepted_silently >= 1

    # Many clients at once: each gets its error within the bound; none waits for another.
    t0 = time.monotonic()
    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(lambda _: _login_error(proxy), range(20)))
    assert all(f["C"] == "08006" for f, _ in results), results
    assert time.monotonic() - t0 < PROMPT + 2
    _alive(proxy)

    relay.silent = False
    _works(proxy)
