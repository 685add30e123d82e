"""
Failures with real processes: SIGKILL a chain member in the middle of a
stream of writes; the master notices the missing heartbeats, removes it, the
chain carries on shorter, and no acknowledged write is lost.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.harness import Cluster, parse_kv, running, wait_for
from tests.test_integration import acked, start_workload, verify

pytestmark = pytest.mark.integration

#: Fast failure detection for tests: heartbeats every 0.2 s, declared failed
#: after 2 s of silence (the read lease is then 1.6 s).
FAST = ["--heartbeat-interval", "0.2", "--failure-timeout", "2"]


def chain_names(c: Cluster) -> list[str]:
    return [m.name for m in c.config().chains[0].members]


def wait_chain(c: Cluster, names: list[str]) -> None:
    def ready():
        if chain_names(c) != names:
            return False
        epoch = str(c.config().chains[0].epoch)
        for name in names:
            st = parse_kv(c.node(name).admin("status"))
            if st["epoch"] != epoch:
                return False
        return True

    wait_for(ready, what=f"the chain to become {names}")


def identical(c: Cluster, names: list[str]) -> None:
    def same():
        d = {n: parse_kv(c.node(n).admin("digest")) for n in names}
        return len({(v["sha256"], v["committed_seq"]) for v in d.values()}) == 1

    wait_for(same, what=f"{names} to hold identical data")


@pytest.mark.parametrize("victims", [["n3"], ["n2"], ["n1"], ["n3", "n1"]])
def test_killed_members_are_removed_and_no_acknowledged_write_is_lost(tmp_path, victims):
    with running(Cluster(str(tmp_path), master_args=FAST)) as c:
        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=2500, concurrency=8)
        survivors = ["n1", "n2", "n3"]
        for i, victim in enumerate(victims):
            wait_for(lambda i=i: len(acked(out)) >= 400 * (i + 1), what="writes to flow")
            killed_at = time.monotonic()
            c.node(victim).signal(signal.SIGKILL)
            c.node(victim).popen.wait(10)
            survivors.remove(victim)
            wait_chain(c, survivors)
            n_before = len(acked(out))
            wait_for(lambda n=n_before: len(acked(out)) > n, what="writes to resume")
            print(f"{victim}: writes resumed {time.monotonic() - killed_at:.2f}s after the kill")
        assert w.wait(120) == 0, w.stdout.read()
        done = acked(out)
        assert len(done) >= 2400, "most writes complete despite the failures"
        result = verify(c, out)
        assert result["missing"] == [] and result["wrong"] == []
        assert result["checked"] == len(done)
        identical(c, survivors)
        # The survivors know their new roles.
        head = parse_kv(c.node(survivors[0]).admin("status"))
        assert head["role"] in ("head", "head+tail")


def test_a_paused_tail_is_removed_and_comes_back_as_a_new_member(tmp_path):
    """
    SIGSTOP past the failure timeout, then SIGCONT: the old tail was removed
    (its lease ran out before that, so it answered no read meanwhile); awake,
    it learns the new epoch, and comes back only through a state transfer.
    """
    with running(Cluster(str(tmp_path), master_args=FAST)) as c:
        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=2000, concurrency=8)
        wait_for(lambda: len(acked(out)) >= 300, what="writes to flow")
        tail = c.node("n3")
        tail.signal(signal.SIGSTOP)
        try:
            wait_chain(c, ["n1", "n2"])
        finally:
            tail.signal(signal.SIGCONT)
        # Back as a new member: wiped, refilled from the tail, then the tail.
        wait_chain(c, ["n1", "n2", "n3"])
        assert w.wait(120) == 0, w.stdout.read()
        with open(tail.log_path) as f:
            log = f.read()
        assert "role none" in log or "role joining" in log
        assert "holds the snapshot at seq" in log
        result = verify(c, out)
        assert result["missing"] == [] and result["wrong"] == []
        identical(c, ["n1", "n2", "n3"])


def test_a_failure_while_the_master_is_down_is_handled_once_it_is_back(tmp_path):
    with running(Cluster(str(tmp_path), master_args=FAST)) as c:
        c.master.kill()
        c.node("n2").kill()
        c.restart_master()
        # Reloaded from LMDB: the chain as it was, then n2's silence is noticed
        # after the grace period.
        wait_chain(c, ["n1", "n3"])
        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=300, concurrency=8)
        assert w.wait(60) == 0, w.stdout.read()
        assert len(acked(out)) == 300


def test_a_restarted_node_rejoins_at_the_tail_by_state_transfer_under_writes(tmp_path):
    """Kill the tail, let the chain shrink, restart it: it catches up and is tail again."""
    with running(Cluster(str(tmp_path), master_args=FAST)) as c:
        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=4000, concurrency=8)
        wait_for(lambda: len(acked(out)) >= 500, what="writes to flow")
        n3 = c.node("n3")
        n3.kill()
        wait_chain(c, ["n1", "n2"])
        wait_for(lambda: len(acked(out)) >= 1500, what="writes on the shorter chain")
        # Back with its old data: never trusted, it is wiped and refilled by
        # a state transfer from the tail, then made the tail again.
        c.start_node(n3)
        wait_chain(c, ["n1", "n2", "n3"])
        assert w.wait(120) == 0, w.stdout.read()
        result = verify(c, out)
        assert result["missing"] == [] and result["wrong"] == []
        identical(c, ["n1", "n2", "n3"])
        with open(n3.log_path) as f:
            log = f.read()
        assert "holds the snapshot at seq" in log
        with open(c.node("n2").log_path) as f:
            assert "snapshot at seq" in f.read()


def test_a_new_node_extends_a_short_chain(tmp_path):
    with running(Cluster(str(tmp_path), master_args=FAST)) as c:
        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=1500, concurrency=8)
        wait_for(lambda: len(acked(out)) >= 300, what="writes to flow")
        c.node("n2").kill()
        wait_chain(c, ["n1", "n3"])
        n4 = c._node("n4")
        c.nodes.append(n4)
        c.start_node(n4)
        wait_chain(c, ["n1", "n3", "n4"])
        assert w.wait(120) == 0, w.stdout.read()
        result = verify(c, out)
        assert result["missing"] == [] and result["wrong"] == []
        identical(c, ["n1", "n3", "n4"])


def test_a_member_restarted_with_a_wiped_store_never_serves_from_it(tmp_path):
    """Same name, empty data directory: taken out at once, back only by state transfer."""
    import shutil

    slow = ["--heartbeat-interval", "0.2", "--failure-timeout", "8"]
    with running(Cluster(str(tmp_path), master_args=slow)) as c:
        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=600, concurrency=8)
        assert w.wait(60) == 0, w.stdout.read()
        n3 = c.node("n3")
        n3.kill()
        shutil.rmtree(os.path.join(str(tmp_path), "n3"))
        c.start_node(n3)  # well before the failure timeout
        wait_chain(c, ["n1", "n2", "n3"])
        with open(n3.log_path) as f:
            assert "holds the snapshot at seq" in f.read()
        result = verify(c, out)
        assert result["missing"] == [] and result["wrong"] == []
        identical(c, ["n1", "n2", "n3"])


def last_seen_ages(c: Cluster) -> dict[str, float]:
    """Seconds since the master last heard from each node (admin `nodes`)."""
    ages = {}
    for line in c.master.admin("nodes").splitlines()[1:]:
        cols = line.split()
        if cols and cols[-1].endswith("s"):
            ages[cols[0]] = float(cols[-1][:-1])
    return ages


def test_a_chain_stopped_whole_comes_back_in_its_old_order_one_node_at_a_time(tmp_path):
    """
    Every node killed, the master left running: the nodes restarted one after
    the other (within a failure timeout of the first) keep their places, and
    nothing acknowledged is lost; nobody is replaced or rejoins by transfer.
    """
    slow = ["--heartbeat-interval", "0.2", "--failure-timeout", "4"]
    with running(Cluster(str(tmp_path), master_args=slow)) as c:
        out = str(tmp_path / "acked")
        w = start_workload(c, out, count=300, concurrency=8)
        assert w.wait(60) == 0, w.stdout.read()
        for node in c.nodes:
            node.signal(signal.SIGKILL)
            node.popen.wait(10)
        # Long enough for the master to see the whole chain silent.
        wait_for(
            lambda: all(age > 4.5 for age in last_seen_ages(c).values()),
            timeout=30,
            what="every node silent for longer than the failure timeout",
        )
        for name in ("n3", "n1", "n2"):
            c.start_node(c.node(name))
        wait_chain(c, ["n1", "n2", "n3"])
        assert c.config().spares == ()
        result = verify(c, out)
        assert result["missing"] == [] and result["wrong"] == []
        identical(c, ["n1", "n2", "n3"])
