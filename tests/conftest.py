"""Shared fixtures: real PostgreSQL nodes and a real proxy process.

The suite tests against real servers (see DESIGN.md, "Testing with real parts"): ``cluster`` is
three PostgreSQL nodes started once per session (starting them costs seconds), ``proxy`` is one
``orochi-proxy serve`` subprocess in front of them. Neither registers the nodes in the proxy's
catalog; fixtures that need a populated catalog build on these.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _TESTS_DIR.parent
# Make the helpers in tests/ and the working tree importable however pytest was started
# (installed or not, with or without tests/__init__.py).
for _p in (str(_TESTS_DIR), str(_REPO_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from proxyproc import ProxyProcess, ProxyStartError, start_proxy  # noqa: E402

from orochi_proxy.localcluster import LocalCluster  # noqa: E402

N_NODES = 3


def pg_base_dir(label: str) -> Path:
    """A fresh directory for PostgreSQL data directories, outside pytest's ``tmp_path`` tree.

    Why not ``tmp_path_factory``: as root the servers run as the ``postgres`` user, which must
    traverse every parent directory. pytest's root (``/tmp/pytest-of-root``) is mode 0700, and
    every pytest session that starts (other developers' on a shared machine included) resets it
    to 0700, which cut a running initdb off from its directory here. ``LocalCluster.destroy()``
    removes the directory.
    """
    return Path(tempfile.mkdtemp(prefix=f"orochi-{label}-"))


@pytest.fixture(scope="session")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> LocalCluster:
    """Three started PostgreSQL 15 nodes (SCRAM over TCP, user postgres / password orochi).

    The finalizer is registered before ``start()``: stopping is idempotent, so even a start
    that fails half-way (or a test that fails later) never leaves servers running.
    """
    c = LocalCluster(pg_base_dir("cluster"), N_NODES)
    request.addfinalizer(c.destroy)
    c.start()
    return c


@pytest.fixture(scope="session")
def proxy(
    cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """One ``orochi-proxy serve`` subprocess (SCRAM, user app / app-secret) before ``cluster``."""
    tmp = tmp_path_factory.mktemp("proxy")
    try:
        proc = start_proxy(tmp, cluster)
    except ProxyStartError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield proc
    finally:
        proc.stop()
