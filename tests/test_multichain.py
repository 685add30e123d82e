"""
Many chains with real processes: a master, six nodes in two chains of three
and a dispatcher, each a `twistd -n ckv-...` process on ephemeral loopback
ports.  Clients run in their own processes (tests.multicheck), through the
dispatcher and in direct mode (configuration from a dispatcher or the
master, requests straight to each key's head or tail).

The tests share one cluster and run in file order: the last one kills a
member of chain 0.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from ckv.config import slot_of
from tests.harness import (
    LOOPBACK,
    REPO,
    Cluster,
    Process,
    env,
    replica_get,
    running,
    wait_for,
)

pytestmark = pytest.mark.integration

MASTER_ARGS = ["--heartbeat-interval", "0.2", "--failure-timeout", "2"]


def multicheck(*args: str, timeout: float = 120) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "tests.multicheck", *args],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_stream(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.multicheck", "stream", *args],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str], timeout: float = 90) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def acked(path: str) -> dict[int, float]:
    from tests.multicheck import read_acked

    try:
        return read_acked(path)
    except FileNotFoundError:
        return {}


def verify(endpoint: str, path: str, prefix: str, *extra: str) -> None:
    result = multicheck("verify", "--connect", endpoint, "--acked", path, "--prefix", prefix,
                        *extra)  # fmt: skip
    assert result["missing"] == [] and result["wrong"] == [], result
    assert result["checked"] == len(acked(path)) > 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("multi"))
    with running(Cluster(workdir, nodes=6, chains=2, master_args=MASTER_ARGS)) as c:
        yield c


def test_two_chains_of_three_share_the_slots(cluster):
    cfg = cluster.config()
    assert [c.chain_id for c in cfg.chains] == [0, 1]
    assert all(len(c.members) == 3 for c in cfg.chains)
    assert sorted(m.name for c in cfg.chains for m in c.members) == [f"n{i}" for i in range(1, 7)]
    assert Counter(cfg.slots) == {0: 512, 1: 512}


def test_keys_spread_evenly_over_the_chains(cluster):
    cfg = cluster.config()
    rng = random.Random(20240)
    keys = [rng.randbytes(rng.randrange(1, 40)) for _ in range(20000)]
    per_chain = Counter(cfg.slots[slot_of(k, len(cfg.slots))] for k in keys)
    for chain_id in (0, 1):
        assert 0.48 <= per_chain[chain_id] / len(keys) <= 0.52, per_chain
    # chain_for_key agrees with the map.
    assert all(cfg.chain_for_key(k).chain_id == cfg.slots[slot_of(k)] for k in keys[:500])


@pytest.mark.parametrize("how", ["dispatcher", "direct-via-master", "direct-via-dispatcher"])
def test_put_get_land_on_the_right_chain(cluster, how):
    via_master = how == "direct-via-master"
    endpoint = cluster.master.endpoint if via_master else cluster.dispatcher.endpoint
    extra = ["--direct"] if how.startswith("direct") else []
    prefix = f"{how}:"
    result = multicheck("roundtrip", "--connect", endpoint, "--prefix", prefix, "--count", "40",
                        *extra)  # fmt: skip
    assert result["wrong"] == [] and result["direct"] == bool(extra)
    cfg = cluster.config()
    assert set(result["chains"].values()) == {0, 1}
    for key, chain_id in result["chains"].items():
        assert cfg.chain_for_key(key.encode()).chain_id == chain_id
    # On the owning chain's tail, and on no member of the other chain.
    for i in (0, 1, 2, 3, 39):
        key = f"{prefix}{i}".encode()
        owner = cfg.chain_for_key(key)
        other = cfg.chain(1 - owner.chain_id)
        assert replica_get(cluster.node(owner.tail.name), key) == f"v{i}"
        for m in other.members:
            assert replica_get(cluster.node(m.name), key).startswith("(not found)")


def test_two_dispatchers_serve_the_same_data(cluster, tmp_path):
    second = Process("dispatcher2", "dispatcher", [
        "--listen", LOOPBACK, "--admin", LOOPBACK, "--master", cluster.master.endpoint,
    ], cluster.workdir)  # fmt: skip
    second.start()
    try:
        one, two = cluster.dispatcher.endpoint, second.endpoint
        for src, dst, prefix in ((one, two, "two-a:"), (two, one, "two-b:")):
            out = str(tmp_path / prefix.rstrip(":"))
            w = start_stream("--connect", src, "--prefix", prefix, "--out", out, "--count", "300")
            assert finish(w)["failures"] == 0
            assert sorted(acked(out)) == list(range(300))
            verify(dst, out, prefix)
        # Both at once, on the same keys: every key ends up with its value.
        ws = [
            start_stream("--connect", ep, "--prefix", "two-c:", "--out",
                         str(tmp_path / f"c{n}"), "--count", "300")  # fmt: skip
            for n, ep in enumerate((one, two))
        ]
        for w in ws:
            assert finish(w)["failures"] == 0
        verify(one, str(tmp_path / "c0"), "two-c:")
        verify(two, str(tmp_path / "c1"), "two-c:", "--direct")
    finally:
        second.stop()


def restart_dispatcher_on_its_port(cluster: Cluster) -> None:
    d = cluster.dispatcher
    assert d is not None
    d.args = [
        "--listen", f"tcp:{d.port}:interface=127.0.0.1",
        "--admin", f"tcp:{d.admin_port}:interface=127.0.0.1",
        "--master", cluster.master.endpoint,
    ]  # fmt: skip
    d.start()


def test_dispatcher_killed_and_restarted_under_load(cluster, tmp_path):
    ep = cluster.dispatcher.endpoint
    out_d, out_x = str(tmp_path / "through"), str(tmp_path / "direct")
    through = start_stream("--connect", ep, "--prefix", "dr:", "--out", out_d,
                           "--count", "3000", "--concurrency", "16")  # fmt: skip
    direct = start_stream("--connect", ep, "--direct", "--prefix", "drx:", "--out", out_x,
                          "--count", "3000", "--concurrency", "16")  # fmt: skip
    wait_for(lambda: len(acked(out_d)) >= 300 and len(acked(out_x)) >= 300, 60, "writes to flow")
    cluster.dispatcher.kill()
    at_kill = len(acked(out_x))
    time.sleep(0.5)
    # Direct clients do not need the dispatcher once they have the configuration.
    wait_for(lambda: len(acked(out_x)) >= at_kill + 100 or direct.poll() is not None, 10,
             "direct writes while the dispatcher is down")  # fmt: skip
    restart_dispatcher_on_its_port(cluster)
    r_through, r_direct = finish(through), finish(direct)
    assert r_through["failures"] == 0 and r_direct["failures"] == 0
    assert sorted(acked(out_d)) == list(range(3000))
    assert sorted(acked(out_x)) == list(range(3000))
    cluster.wait_serving()
    verify(ep, out_d, "dr:")
    verify(cluster.master.endpoint, out_x, "drx:", "--direct")


def test_node_failure_in_chain_0_leaves_chain_1_undisturbed(cluster, tmp_path):
    cfg = cluster.config()
    chain0, chain1 = cfg.chain(0), cfg.chain(1)
    victim = cluster.node(chain0.head.name)
    streams = {
        "c1d:": ["--connect", cluster.dispatcher.endpoint, "--chain", "1"],
        "c1x:": ["--connect", cluster.master.endpoint, "--direct", "--chain", "1"],
        "c0d:": ["--connect", cluster.dispatcher.endpoint, "--chain", "0"],
        "c0x:": ["--connect", cluster.master.endpoint, "--direct", "--chain", "0"],
    }
    outs = {p: str(tmp_path / p.rstrip(":")) for p in streams}
    procs = {
        p: start_stream(*a, "--prefix", p, "--out", outs[p], "--duration", "7")
        for p, a in streams.items()
    }
    wait_for(lambda: all(len(acked(o)) >= 100 for o in outs.values()), 30, "writes to flow")
    victim.signal(signal.SIGKILL)
    killed = time.monotonic()
    victim.popen.wait(10)
    new = wait_for(
        lambda: (c := cluster.config()).chain(0).epoch > chain0.epoch and c, 20,
        "chain 0 to be reconfigured",
    )
    reconfigured = time.monotonic() - killed
    assert [m.name for m in new.chain(0).members] == [m.name for m in chain0.members[1:]]
    assert new.chain(1) == chain1  # same members, same epoch
    results = {p: finish(proc) for p, proc in procs.items()}
    for p, r in results.items():
        assert r["failures"] == 0, (p, r)
    # Chain 1's writers never waited long, though chain 0 stalled (its
    # writes wait out the failure timeout).
    for p in ("c1d:", "c1x:"):
        assert results[p]["slowest_s"] < 1.0, (p, results[p])
    assert max(results[p]["slowest_s"] for p in ("c0d:", "c0x:")) > 0.5, results
    print(f"chain 0 reconfigured {reconfigured:.2f}s after the kill; {json.dumps(results)}")
    for p in streams:
        verify(cluster.dispatcher.endpoint, outs[p], p)
    assert os.path.exists(victim.log_path)
