#!/usr/bin/env python
"""A two-node Ray cluster on one machine: a head (dashboard on 127.0.0.1) and a second raylet.

    python cluster/local/local_cluster.py start            # prints the dashboard URL; writes TEMP/cluster.json
    cullmt-ray submit --follow -- search --actors 2        # the default address is http://127.0.0.1:8265
    python cluster/local/local_cluster.py stop             # stops exactly the processes of this cluster

Token authentication is always on (RAY_AUTH_MODE=token). The token is RAY_AUTH_TOKEN when set,
else ~/.ray/auth_token (made with ``ray get-auth-token --generate`` when missing); it is never
printed. Every port is chosen free, except the dashboard's (8265 unless --dashboard-port). The
second node carries the custom resource ``node_b`` so you can pin work to it.

``stop`` never runs ``ray stop`` (which stops every Ray process of the machine, other people's
clusters too): it ends the processes whose command line names this cluster's temp dir or GCS
address, and their children, by pid. Linux only (it reads /proc). Also used by tests/test_cluster.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TEMP = "/tmp/cullmt-ray-local"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _ray(args: list[str], env: dict) -> None:
    exe = str(Path(sys.executable).with_name("ray"))
    exe = exe if Path(exe).exists() else "ray"
    out = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=300, check=False)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"ray {args[0]} {args[1] if len(args) > 1 else ''} failed: {' | '.join(tail)}")


def _node_flags(ports: list[int], temp_dir: Path, cpus: int, resources: dict, object_store: int) -> list[str]:
    metrics, agent, agent_grpc, runtime_env, node_manager, object_manager = ports
    return ["--temp-dir", str(temp_dir), "--num-cpus", str(cpus), "--resources", json.dumps(resources),
            "--metrics-export-port", str(metrics), "--dashboard-agent-listen-port", str(agent),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
            "--object-store-memory", str(object_store), "--disable-usage-stats"]


def start(temp_dir: str | Path = DEFAULT_TEMP, *, cpus: int = 1, dashboard_host: str = "127.0.0.1",
          dashboard_port: int | None = 8265, token: str | None = None, env: dict | None = None,
          object_store_bytes: int = 300_000_000) -> dict:
    """Start the head and a second node; return (and write to ``temp_dir/cluster.json``) their addresses."""
    temp_dir = Path(temp_dir).resolve()
    if temp_dir.is_dir() and any(temp_dir.iterdir()) and not (temp_dir / "cluster.json").is_file():
        raise RuntimeError(f"--temp-dir {temp_dir}: not empty and not made by this script; expected a new folder "
                           "(stop finds the cluster's processes by this path)")
    temp_dir.mkdir(parents=True, exist_ok=True)
    if not _is_loopback(dashboard_host):
        print(f"warning: the Ray dashboard will listen on {dashboard_host}: anyone who can reach it and holds the "
              "token can run code on this machine; prefer 127.0.0.1 and an SSH tunnel", file=sys.stderr)
    run_env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "token"}
    if token:
        run_env["RAY_AUTH_TOKEN"] = token
    elif not run_env.get("RAY_AUTH_TOKEN") and not (Path.home() / ".ray" / "auth_token").is_file():
        _ray(["get-auth-token", "--generate"], run_env)  # writes ~/.ray/auth_token; its output is not shown
    p = free_ports(16)
    dash = dashboard_port or p[15]
    (temp_dir / "cluster.json").write_text(json.dumps({"temp_dir": str(temp_dir), "gcs_address": None}))  # for stop()
    head = ["start", "--head", "--port", str(p[0]), "--include-dashboard", "true", "--dashboard-host", dashboard_host,
            "--dashboard-port", str(dash), "--ray-client-server-port", str(p[1]),
            *_node_flags(p[2:8], temp_dir, cpus, {"node_a": 1}, object_store_bytes)]
    _ray(head, run_env)
    gcs = (temp_dir / "ray_current_cluster").read_text().strip()
    info = {"temp_dir": str(temp_dir), "gcs_address": gcs, "dashboard": f"http://{dashboard_host}:{dash}",
            "client_address": f"ray://127.0.0.1:{p[1]}", "metrics_ports": {"head": p[2], "node_b": p[8]}}
    (temp_dir / "cluster.json").write_text(json.dumps(info, indent=2))  # before the worker: stop() needs it
    _ray(["start", "--address", gcs, *_node_flags(p[8:14], temp_dir, cpus, {"node_b": 1}, object_store_bytes)],
         run_env)
    return info


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _procs() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def cluster_pids(temp_dir: str | Path = DEFAULT_TEMP) -> list[int]:
    """Processes of the cluster in ``temp_dir``: those naming its temp dir or GCS address, and their children."""
    temp_dir = Path(temp_dir).resolve()
    info_file = temp_dir / "cluster.json"
    if not info_file.is_file():
        return []  # not a cluster started by this script: never match on an arbitrary path
    gcs = json.loads(info_file.read_text()).get("gcs_address")
    procs = _procs()
    me = {os.getpid(), os.getppid()}
    roots = {pid for pid, (_, cmd) in procs.items()
             if pid not in me and (f"{temp_dir}/" in cmd or f"={temp_dir} " in cmd or (gcs and f"={gcs} " in cmd))}
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier and pid not in found and pid not in me}
        found |= frontier
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop(temp_dir: str | Path = DEFAULT_TEMP, timeout: float = 15.0) -> list[int]:
    """End this cluster's processes (SIGTERM, then SIGKILL after ``timeout``); return their pids."""
    pids = cluster_pids(temp_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + timeout
    while time.time() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids + cluster_pids(temp_dir):  # and anything started meanwhile
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=["start", "stop"])
    ap.add_argument("--temp-dir", default=DEFAULT_TEMP, help=f"Ray's temp dir for this cluster (default {DEFAULT_TEMP})")
    ap.add_argument("--cpus", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="CPUs per node")
    ap.add_argument("--dashboard-host", default="127.0.0.1", help="interface of the dashboard (default 127.0.0.1)")
    ap.add_argument("--dashboard-port", type=int, default=8265)
    a = ap.parse_args()
    if a.action == "stop":
        pids = stop(a.temp_dir)
        print(f"stopped {len(pids)} processes of the cluster in {a.temp_dir}")
        return 0
    try:
        info = start(a.temp_dir, cpus=a.cpus, dashboard_host=a.dashboard_host, dashboard_port=a.dashboard_port)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        stop(a.temp_dir)
        print(f"local_cluster start: error: {e}", file=sys.stderr)
        return 1
    print(f"dashboard {info['dashboard']} (token: ray get-auth-token), GCS {info['gcs_address']}, "
          f"metrics {info['metrics_ports']}; details in {a.temp_dir}/cluster.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
