"""pgbench select-only through orochi-proxy vs directly vs PgBouncer, in one run, as ratios.

Why ratios from one run: on a shared 2-core machine absolute TPS drifts ±40% between runs;
the three targets are measured interleaved (round-robin, several rounds, median per target) so
drift hits them alike. Client (pgbench), proxy and PostgreSQL share the same two cores.

Usage::

    python3 bench/pgbench_proxy.py [--clients 8] [--seconds 10] [--rounds 3] [--scale 10]

Needs ``pgbench`` and ``pgbouncer`` (Debian: ``apt-get install -y pgbouncer``); starts its own
PostgreSQL node with ``LocalCluster`` and removes everything at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orochi_proxy.localcluster import LocalCluster  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def start_proxy(workdir: Path, node_port: int, password: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = workdir / "proxy.toml"
    cfg.write_text(
        f"""
[server]
host = "127.0.0.1"
port = {port}
auth = "trust"
[metadata]
host = "127.0.0.1"
port = {node_port}
dbname = "postgres"
[backend]
user = "postgres"
password = "{password}"
pool_size = 64
"""
    )
    log = open(workdir / "proxy.log", "w")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "orochi_proxy", "serve", "--config", str(cfg), "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_port(port)
    return proc, port


def start_pgbouncer(workdir: Path, node_port: int, password: str, pool_mode: str) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.path.exists(exe):
        raise SystemExit("pgbouncer not found: apt-get install -y pgbouncer")
    port = free_port()
    d = workdir / f"pgbouncer-{pool_mode}"
    d.mkdir(exist_ok=True)
    (d / "userlist.txt").write_text(f'"postgres" "{password}"\n')
    (d / "pgbouncer.ini").write_text(
        f"""[databases]
postgres = host=127.0.0.1 port={node_port} dbname=postgres user=postgres password={password}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {d / "userlist.txt"}
pool_mode = {pool_mode}
default_pool_size = 64
max_client_conn = 1000
logfile = {d / "pgbouncer.log"}
pidfile = {d / "pgbouncer.pid"}
"""
    )
    cmd = [exe, str(d / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        shutil.chown(d, "postgres", "postgres")
        for f in d.iterdir():
            shutil.chown(f, "postgres", "postgres")
        cmd = ["runuser", "-u", "postgres", "--", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc, port


def pgbench(port: int, mode: str, clients: int, seconds: int, password: str) -> float:
    env = dict(os.environ, PGPASSWORD=password)
    out = subprocess.run(
        [
            "pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", str(min(clients, 2)),
            "-T", str(seconds), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    m = re.search(r"tps = ([0-9.]+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"pgbench failed on port {port} ({mode}):\n{out.stdout}\n{out.stderr}")
    return float(m.group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=10)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="orochi-bench-"))
    cluster = LocalCluster(work / "nodes", 1, password="orochi")
    procs: list[subprocess.Popen] = []
    try:
        node = cluster.start()[0]
        subprocess.run(
            ["pgbench", "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p", str(node.port), "-U", "postgres", "postgres"],
            check=True, capture_output=True, env=dict(os.environ, PGPASSWORD="orochi"),
        )
        proxy, proxy_port = start_proxy(work, node.port, "orochi")
        procs.append(proxy)
        bouncer_tx, bouncer_tx_port = start_pgbouncer(work, node.port, "orochi", "transaction")
        bouncer_s, bouncer_s_port = start_pgbouncer(work, node.port, "orochi", "session")
        procs += [bouncer_tx, bouncer_s]
        # PgBouncer 1.18 cannot serve -M prepared in transaction mode (support came in 1.21):
        # compare prepared runs against its session mode.
        targets = {
            "simple": {"direct": node.port, "orochi-proxy": proxy_port, "pgbouncer": bouncer_tx_port},
            "prepared": {"direct": node.port, "orochi-proxy": proxy_port, "pgbouncer": bouncer_s_port},
        }
        print(f"pgbench -S -c {args.clients} -j {min(args.clients, 2)} -T {args.seconds}, scale {args.scale}, "
              f"{args.rounds} interleaved rounds, median TPS; {os.cpu_count()} cores shared by all processes")
        for mode, tg in targets.items():
            results: dict[str, list[float]] = {name: [] for name in tg}
            for _ in range(args.rounds):
                for name, port in tg.items():
                    results[name].append(pgbench(port, mode, args.clients, args.seconds, "orochi"))
            med = {name: statistics.median(v) for name, v in results.items()}
            pgb_mode = "transaction" if mode == "simple" else "session"
            print(f"\n-M {mode} (PgBouncer {pgb_mode} mode)")
            for name, v in med.items():
                runs = ", ".join(f"{x:,.0f}" for x in results[name])
                print(f"  {name:13s} {v:>10,.0f} tps   (runs: {runs})")
            print(f"  ratio proxy/direct    = {med['orochi-proxy'] / med['direct']:.2f}")
            print(f"  ratio proxy/pgbouncer = {med['orochi-proxy'] / med['pgbouncer']:.2f}")
            print(f"  ratio pgbouncer/direct = {med['pgbouncer'] / med['direct']:.2f}")
    finally:
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(10)
            except Exception:  # noqa: BLE001
                p.kill()
        subprocess.run(["pkill", "-f", str(work)], check=False)
        cluster.destroy()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
