"""
`ckv local` for real: it starts a master, nodes and a dispatcher as
processes on ephemeral ports, the `ckv` CLI talks to it, SIGINT (Ctrl-C)
stops everything cleanly, and a second start on the same data directory
gives back what was written.  One chain of three (`--chains 1 --nodes 3`),
and the default: two chains of three.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.harness import REPO, admin_command, env, wait_for

pytestmark = pytest.mark.integration


def ckv(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckv.cli", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ckv_bytes(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """`ckv` with bytes in and out (binary values)."""
    return subprocess.run(
        [sys.executable, "-m", "ckv.cli", *args],
        cwd=REPO, env=env(), input=stdin, capture_output=True, timeout=60,
    )  # fmt: skip


def start_local(data_dir: str, ready: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "ckv.cli", "local",
            "--data-dir", data_dir,
            "--base-port", "0",
            "--ready-file", ready,
            *extra,
        ],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def read_ready(path: str, proc: subprocess.Popen[str]) -> dict:
    def ready():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
        with open(path) as f:
            return json.load(f)

    return wait_for(ready, 90, "ckv local to be ready")


def stop_local(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return out


def test_ckv_local_cli_and_clean_restart(tmp_path):
    data = str(tmp_path / "ckv-data")
    ready = str(tmp_path / "ready.json")
    proc = start_local(data, ready, "--chains", "1", "--nodes", "3")
    try:
        info = read_ready(ready, proc)
        conn = ["--connect", info["connect"]]

        r = ckv("put", "greeting", "hello", *conn)
        assert (r.returncode, r.stdout.strip()) == (0, "OK"), r.stderr
        r = ckv("get", "greeting", *conn)
        assert (r.returncode, r.stdout.strip()) == (0, "hello"), r.stderr
        r = ckv("cas", "greeting", "nope", "x", *conn)
        assert r.returncode == 1 and "cas failed" in r.stdout + r.stderr
        r = ckv("cas", "greeting", "hello", "hi", *conn)
        assert r.returncode == 0, r.stderr
        r = ckv("cas", "fresh", "--if-absent", "new", *conn)
        assert r.returncode == 0, r.stderr
        r = ckv("cas", "fresh", "--if-absent", "again", *conn)
        assert r.returncode == 1
        r = ckv("delete", "fresh", *conn)
        assert (r.returncode, r.stdout.strip()) == (0, "deleted")
        r = ckv("get", "fresh", *conn)
        assert r.returncode == 1 and "not found" in r.stderr
        r = ckv("delete", "fresh", *conn)
        assert r.returncode == 1

        # A binary value longer than a command line may be (128 KiB per
        # argument on Linux), from standard input; read back byte for byte.
        blob = bytes(range(256)) * 1200 + b"\n"
        b = ckv_bytes("put", "blob", "--stdin", *conn, stdin=blob)
        assert (b.returncode, b.stdout) == (0, b"OK\n"), b.stderr
        b = ckv_bytes("get", "-n", "blob", *conn)
        assert (b.returncode, b.stdout) == (0, blob), b.stderr

        r = ckv("status", "--json", "--master", info["master_endpoint"])
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        # ckv local starts the nodes together: the chain is in join order.
        assert [sorted(c["nodes"]) for c in status["chains"]] == [["n1", "n2", "n3"]]
        assert all(c["epoch"] >= 1 and "id" in c for c in status["chains"])
        r = ckv("status", "--master", info["master_endpoint"])
        assert r.returncode == 0 and "n1" in r.stdout and "n3" in r.stdout

        # The write is on every replica, each read through its admin console.
        for name, node in info["nodes"].items():
            assert admin_command(node["admin"], "get greeting") == "hi", name
        assert "serving" in admin_command(info["master"]["admin"], "chains")
    finally:
        out = stop_local(proc)
    assert "stopped" in out
    # Every child is gone.
    for pid in [n["pid"] for n in info["nodes"].values()]:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    # Second start on the same data (its shape is kept): nothing was lost.
    proc = start_local(data, ready)
    try:
        info = read_ready(ready, proc)
        r = ckv("get", "greeting", "--connect", info["connect"])
        assert (r.returncode, r.stdout.strip()) == (0, "hi"), r.stderr
    finally:
        stop_local(proc)


def test_ckv_local_default_is_two_chains_of_three(tmp_path):
    """The default shape; keys of both chains, through the dispatcher and --direct."""
    from ckv.config import ClusterConfig, slot_of

    data = str(tmp_path / "ckv-data")
    ready = str(tmp_path / "ready.json")
    proc = start_local(data, ready)
    try:
        info = read_ready(ready, proc)
        assert sorted(info["nodes"]) == [f"n{i}" for i in range(1, 7)]
        r = ckv("status", "--json", "--master", info["master_endpoint"])
        assert r.returncode == 0, r.stderr
        status = json.loads(r.stdout)
        chains = status["chains"]
        assert [c["id"] for c in chains] == [0, 1]
        assert all(len(c["nodes"]) == 3 for c in chains)
        assert sorted(n for c in chains for n in c["nodes"]) == [f"n{i}" for i in range(1, 7)]
        assert status["spares"] == []

        # Keys on both chains, written through the dispatcher and directly
        # (the configuration from the master), each read back both ways.
        slots = [0] * status["slot_count"]
        for c in chains:
            for first, last in c["slots"]:
                for s in range(first, last + 1):
                    slots[s] = c["id"]
        config = ClusterConfig(status["version"], tuple(slots), ())
        keys = [f"key{i}" for i in range(8)]
        owners = {k: config.slots[slot_of(k.encode())]
                  for k in keys}
        assert set(owners.values()) == {0, 1}
        via = {
            "dispatcher": ["--connect", info["connect"]],
            "direct": ["--connect", info["master_endpoint"], "--direct"],
        }
        for i, k in enumerate(keys):
            r = ckv("put", k, f"v{i}", *via["direct" if i % 2 else "dispatcher"])
            assert (r.returncode, r.stdout.strip()) == (0, "OK"), r.stderr
        for k in keys:
            for how in via.values():
                r = ckv("get", k, *how)
                assert (r.returncode, r.stdout.strip()) == (0, f"v{keys.index(k)}"), r.stderr
        # Each key is on the members of its own chain only.
        for k in keys:
            owner = chains[owners[k]]
            for name, node in info["nodes"].items():
                got = admin_command(node["admin"], f"get {k}")
                expected = f"v{keys.index(k)}" if name in owner["nodes"] else "(not found)"
                assert got.startswith(expected), (k, name, got)
    finally:
        stop_local(proc)


def test_cli_reports_an_unreachable_store_clearly(tmp_path):
    # Nothing listens on this freshly released port.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = ckv("get", "k", "--connect", f"tcp:127.0.0.1:{port}", "--timeout", "1")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    assert "outcome is unknown" in r.stderr or "no answer" in r.stderr
