"""The private Ray that `ctssl` starts when no cluster is named listens on 127.0.0.1 only and needs a
token no other process knows; the driver can still use it, and no token file is written to $HOME
(a read-only root filesystem has no room for one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# Runs in a fresh interpreter: a Ray instance of the test process itself would turn connect() into a
# no-op, and the listening sockets must be those of the instance this code starts.
SCRIPT = r"""
import json, os, sys
import ray

def _descendants(root):
    # the process tree from /proc (psutil is not a dependency)
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out

def _hex_ip(h):
    if len(h) == 8:
        return ".".join(str(b) for b in bytes.fromhex(h)[::-1])
    words = [bytes.fromhex(h[i:i + 8])[::-1].hex() for i in range(0, 32, 8)]
    raw = bytes.fromhex("".join(words))
    if raw[:12] == bytes(10) + b"\xff\xff":
        return "::ffff:" + ".".join(str(b) for b in raw[12:])
    import ipaddress
    return str(ipaddress.IPv6Address(raw))

def listening():
    inodes = set()
    for pid in _descendants(os.getpid()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            pass
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A = LISTEN
                out.add(_hex_ip(f[1].split(":")[0]))
    return sorted(out)

report = {}
os.environ["CTSSL_TORCH_THREADS"] = "3"  # a listed setting
os.environ["AWS_SECRET_ACCESS_KEY"] = "probe-secret"  # a secret: never in a runtime env
from ctssl_base import ray_connect
if sys.argv[1] == "ray_cluster":
    ray_connect.connect(None)
else:  # as data_prep.prep's Ray executor connects
    ray_connect.connect(None, num_cpus=1, include_dashboard=False, configure_logging=False)
report["env_vars"] = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
ctx = ray.get_runtime_context()
report["gcs"] = ctx.gcs_address
report["node_ip"] = ray.util.get_node_ip_address()
report["dashboard"] = ray.worker.get_dashboard_url() if hasattr(ray, "worker") else ""
report["works"] = ray.get(ray.remote(lambda: 41 + 1).remote())
report["worker_nice"] = ray.get(ray.remote(lambda: os.nice(0)).remote())
report["listening"] = listening()
report["auth_mode"] = os.environ.get("RAY_AUTH_MODE")
report["token_len"] = len(os.environ.get("RAY_AUTH_TOKEN", ""))
report["single_node_env_left"] = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
from ray._private import ray_constants
report["cluster_flag_restored"] = ray_constants.ENABLE_RAY_CLUSTER
ray.shutdown()
print("REPORT " + json.dumps(report))
"""


def _start(which: str, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "CTSSL_")) and k not in ("MLFLOW_TRACKING_URI",)}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, which], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line[len("REPORT "):])


def _check(report: dict, home: Path) -> None:
    assert report["works"] == 42
    assert report["worker_nice"] == os.nice(0)  # workers at this process's priority, not Ray's default 15
    assert report["gcs"].startswith("127.0.0.1:"), report
    assert report["node_ip"] == "127.0.0.1"
    assert report["listening"] and set(report["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, report
    assert report["auth_mode"] == "token" and report["token_len"] == 64
    # the single-node switch is undone once the instance runs (a later cluster connection needs it off)
    assert report["single_node_env_left"] is None and report["cluster_flag_restored"] is True
    assert not (home / ".ray" / "auth_token").exists()
    assert report["env_vars"].get("CTSSL_TORCH_THREADS") == "3"  # the listed settings reach workers
    assert "AWS_SECRET_ACCESS_KEY" not in report["env_vars"]  # secrets do not (Ray logs runtime envs)


def test_ctssl_commands_start_ray_on_loopback_with_its_dashboard_there(tmp_path):
    report = _start("ray_cluster", tmp_path)
    _check(report, tmp_path)
    assert report["dashboard"].startswith("127.0.0.1:")


def test_prep_starts_ray_on_loopback(tmp_path):
    _check(_start("prep", tmp_path), tmp_path)
