"""
The master's decisions (MasterState) and its service over StringTransport,
with time driven by hand: chain formation, persistence, heartbeats, failure
detection and the read lease.
"""

from __future__ import annotations

import pytest
from twisted.internet.testing import MemoryReactorClock, StringTransport

from ckv import wire
from ckv.config import ClusterConfig
from ckv.master.service import MasterService
from ckv.master.state import MasterState
from ckv.wire import MessageType as T
from tests.fakes import framed, unframe


def formed(n: int = 3) -> MasterState:
    s = MasterState(chains=1, chain_length=n)
    for i in range(n):
        s.register(f"n{i + 1}", "127.0.0.1", 7001 + i, now=0.0)
    return s


def members(state: MasterState) -> list[str]:
    return [m.name for m in state.config().chains[0].members]


# -- MasterState -------------------------------------------------------------------


def test_chain_forms_in_join_order_and_serves_at_full_length():
    s = MasterState(chains=1, chain_length=3)
    s.register("a", "h", 1, now=0)
    s.register("b", "h", 2, now=0)
    assert members(s) == []  # forming: nobody serves yet
    assert [m.name for m in s.config().spares] == ["a", "b"]
    s.register("c", "h", 3, now=0)
    assert members(s) == ["a", "b", "c"]
    assert s.config().chains[0].epoch == 3


def test_reregistration_keeps_the_place_and_bumps_the_epoch_on_a_new_address():
    s = formed()
    epoch = s.config().chains[0].epoch
    assert not s.register("n2", "127.0.0.1", 7002, now=1)  # same address: nothing new
    assert s.register("n2", "127.0.0.1", 9999, now=1)
    cfg = s.config()
    assert members(s) == ["n1", "n2", "n3"]
    assert cfg.chains[0].epoch == epoch + 1
    assert cfg.chains[0].members[1].port == 9999


def test_a_new_node_after_formation_is_a_spare():
    s = formed()
    s.register("n4", "h", 4, now=0)
    assert members(s) == ["n1", "n2", "n3"]
    assert [m.name for m in s.config().spares] == ["n4"]


@pytest.mark.parametrize("dead, left", [
    ("n1", ["n2", "n3"]),  # head: its successor becomes head
    ("n2", ["n1", "n3"]),  # middle: neighbours linked
    ("n3", ["n1", "n2"]),  # tail: its predecessor becomes tail
])  # fmt: skip
def test_a_silent_member_is_removed(dead, left):
    s = formed()
    epoch = s.config().chains[0].epoch
    for name in ("n1", "n2", "n3"):
        if name != dead:
            s.heartbeat(name, 4.0)
    assert s.failed(4.5, timeout=5.0) == []  # not yet
    assert s.failed(5.5, timeout=5.0) == [dead]
    assert s.remove(dead)
    assert members(s) == left
    assert s.config().chains[0].epoch == epoch + 1
    assert dead in [m.name for m in s.config().spares]


def test_two_failures_leave_one_and_the_last_member_is_never_removed():
    s = formed()
    s.heartbeat("n2", 10.0)
    assert sorted(s.failed(10.0, timeout=5.0)) == ["n1", "n3"]
    for name in s.failed(10.0, timeout=5.0):
        assert s.remove(name)
    assert members(s) == ["n2"]
    assert not s.remove("n2")
    assert members(s) == ["n2"]


def test_a_whole_silent_chain_is_left_alone():
    s = formed()
    # Every member stopped at once: wait for them, in their old order.
    assert s.failed(100.0, timeout=5.0) == []
    assert members(s) == ["n1", "n2", "n3"]


def test_after_a_whole_chain_stop_the_others_get_time_to_come_back():
    s = formed()
    assert s.failed(100.0, timeout=5.0) == []  # every member stopped
    s.heartbeat("n2", 101.0)  # the first one is back
    # The others were silent for long, but get one more timeout from now.
    assert s.failed(101.5, timeout=5.0) == []
    s.heartbeat("n1", 103.0)
    assert s.failed(105.0, timeout=5.0) == []
    assert members(s) == ["n1", "n2", "n3"]  # nobody replaced so far
    s.heartbeat("n1", 106.0)
    s.heartbeat("n2", 106.0)
    # n3 never comes back: replaced once its extra time is over.
    assert s.failed(106.6, timeout=5.0) == ["n3"]


def test_members_stopped_a_little_apart_are_a_whole_chain_stop():
    """Killed together, they fall silent a heartbeat or two apart."""
    s = formed()
    s.heartbeat("n1", 10.0)
    s.heartbeat("n2", 10.3)
    s.heartbeat("n3", 10.6)
    # n1 is past the timeout while n2 and n3 are not yet: nobody was heard
    # from for half of it, so this is a stop, not a failure of n1.
    assert s.failed(15.2, timeout=5.0) == []
    assert s.failed(30.0, timeout=5.0) == []
    assert members(s) == ["n1", "n2", "n3"]


def test_without_a_whole_chain_stop_there_is_no_extra_time():
    s = formed()
    s.heartbeat("n1", 4.0)
    s.heartbeat("n2", 4.0)
    assert s.failed(5.5, timeout=5.0) == ["n3"]
    assert s.failed(6.0, timeout=5.0) == ["n3"]


def test_grace_after_a_master_restart():
    s = formed()
    raw = s.to_json()
    t = MasterState.from_json(raw, chains=1, chain_length=3)
    assert members(t) == ["n1", "n2", "n3"]
    t.grace(50.0)
    t.heartbeat("n1", 52.0)
    t.heartbeat("n2", 52.0)
    assert t.failed(54.0, timeout=5.0) == []  # n3 is within its grace period
    t.heartbeat("n1", 55.0)
    t.heartbeat("n2", 55.0)
    assert t.failed(56.0, timeout=5.0) == ["n3"]


def test_persistence_round_trip_keeps_epochs_and_spares():
    s = formed()
    s.register("n4", "h", 4, now=0)
    s.heartbeat("n1", 6)
    s.heartbeat("n2", 6)
    s.heartbeat("n4", 6)
    s.remove("n3")
    t = MasterState.from_json(s.to_json(), chains=1, chain_length=3)
    assert t.config() == s.config()


# -- MasterService over StringTransport ----------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def master(tmp_path):
    reactor = MemoryReactorClock()
    clock = _Clock()
    m = MasterService(
        listen="tcp:0:interface=127.0.0.1",
        data_dir=str(tmp_path / "master"),
        chain_length=2,
        heartbeat_interval=1.0,
        failure_timeout=5.0,
        reactor=reactor,
        clock=clock,
    )
    m.startService()
    yield m, reactor, clock
    m.stopService()


def connect(m: MasterService):
    from ckv.master.service import MasterProtocol

    p = MasterProtocol(m)
    t = StringTransport()
    p.makeConnection(t)
    return p, t


def register(p, name: str, port: int) -> None:
    p.dataReceived(
        framed(
            wire.encode(
                T.REGISTER, name=name.encode(), host=b"127.0.0.1", port=port,
                chain_id=wire.NO_CHAIN, epoch=0, applied_seq=0,
            )  # fmt: skip
        )
    )


def chain_a_b(m: MasterService):
    """Nodes a and b register: the chain a -> b.  Their connections and transports."""
    a, ta = connect(m)
    b, tb = connect(m)
    register(a, "a", 7001)
    register(b, "b", 7002)
    return a, ta, b, tb


def restarted(m: MasterService, clock) -> tuple[MasterService, MemoryReactorClock]:
    """Stop C{m}, then start a new master on its directory (stop it when done)."""
    m.stopService()
    reactor = MemoryReactorClock()
    again = MasterService(
        listen="tcp:0:interface=127.0.0.1", data_dir=m.data_dir, chain_length=2,
        heartbeat_interval=1.0, failure_timeout=5.0, reactor=reactor, clock=clock,
    )  # fmt: skip
    again.startService()
    return again, reactor


def test_a_second_master_on_the_same_directory_is_refused(master, tmp_path):
    from ckv.dirlock import DirectoryInUse

    m, reactor, clock = master
    other = MasterService(
        listen="tcp:0:interface=127.0.0.1", data_dir=m.data_dir, chain_length=2,
        reactor=MemoryReactorClock(),
    )  # fmt: skip
    with pytest.raises(DirectoryInUse, match="is in use by another process"):
        other.startService()
    # Once the first one stops, the directory is free.
    m.stopService()
    other.startService()
    other.stopService()


def test_new_reports_are_saved_once_per_detection_round(master):
    """Between configuration changes, reports reach the disk every heartbeat interval."""
    m, reactor, clock = master
    chain_a_b(m)
    for name in ("a", "b"):
        m.state.heartbeat(name, clock(), committed_seq=40)
    assert m.state.reports_unsaved
    clock.now += 1.0
    reactor.advance(1.0)  # one failure-detection round
    assert not m.state.reports_unsaved
    again, _ = restarted(m, clock)
    try:
        assert again.state.reported == {"a": 40, "b": 40}
        assert again.state.lost_data("b", 0, 39)
    finally:
        again.stopService()


def test_register_gets_config_and_a_lease(master):
    m, reactor, clock = master
    p, t = connect(m)
    register(p, "a", 7001)
    frames = unframe(t.value())
    assert [f[0] for f in frames] == [T.CONFIG, T.HEARTBEAT_REPLY]
    reply = frames[1][1]
    assert reply.interval_ms == 1000
    assert reply.lease_ms == 3000  # failure timeout 5 s less two intervals
    assert reply.lease_ms < 5000


def test_a_node_that_stops_heartbeating_is_removed_and_everyone_is_told(master):
    m, reactor, clock = master
    _, _, b, _ = chain_a_b(m)
    watcher, tw = connect(m)
    watcher.dataReceived(framed(wire.encode(T.WATCH, name=b"d")))
    first = ClusterConfig.from_wire(unframe(tw.value())[-1][1])
    assert [x.name for x in first.chains[0].members] == ["a", "b"]
    tw.clear()
    # b keeps beating, a falls silent.
    for _ in range(6):
        clock.now += 1.0
        b.dataReceived(framed(wire.encode(T.HEARTBEAT, name=b"b", epoch=2, applied_seq=0)))
        reactor.advance(1.0)
    cfg = ClusterConfig.from_wire(unframe(tw.value())[-1][1])
    assert [x.name for x in cfg.chains[0].members] == ["b"]
    assert [x.name for x in cfg.spares] == ["a"]
    # Persisted: a restarted master starts from the shrunk chain.
    assert b'"members": ["b"]' in m.state.to_json()


def test_the_failure_detector_survives_an_error(master, monkeypatch):
    m, reactor, clock = master

    def boom(*a):
        raise RuntimeError("boom")

    monkeypatch.setattr(m.state, "failed", boom)
    reactor.advance(1.0)
    monkeypatch.undo()
    assert m._detector is not None and m._detector.running


def test_planned_removal_of_a_middle_is_immediate_and_forgets_the_node(master):
    m, reactor, clock = master
    m.state.chain_length = 3
    for i, name in enumerate(("a", "b", "c")):
        p, _ = connect(m)
        register(p, name, 7001 + i)
    assert members(m.state) == ["a", "b", "c"]
    assert m.planned_remove("b") == "b removed"
    assert members(m.state) == ["a", "c"]
    assert "b" not in m.state.nodes
    # Registering again, it is a new node: a spare that may extend the chain.
    p, _ = connect(m)
    register(p, "b", 9000)
    assert [x.name for x in m.state.config().spares] == ["b"]


def test_planned_removal_of_the_tail_waits_for_its_lease(master):
    m, reactor, clock = master
    a, _, b, tb = chain_a_b(m)
    assert members(m.state) == ["a", "b"]
    answer = m.planned_remove("b")
    assert "read lease is no longer renewed" in answer
    tb.clear()
    b.dataReceived(framed(wire.encode(T.HEARTBEAT, name=b"b", epoch=2, applied_seq=0)))
    ((mtype, reply),) = unframe(tb.value())
    assert mtype == T.HEARTBEAT_REPLY and reply.lease_ms == 0
    reactor.advance(m.lease_ms / 1000.0)  # its last lease may still run
    assert members(m.state) == ["a", "b"]
    reactor.advance(m.heartbeat_interval)
    assert members(m.state) == ["a"]


def test_a_master_restarted_while_a_tail_drains_finishes_the_removal(master):
    """The removal on request outlives a master restart: no lease, then out."""
    m, reactor, clock = master
    chain_a_b(m)
    assert "read lease is no longer renewed" in m.planned_remove("b")
    again, reactor2 = restarted(m, clock)
    try:
        assert again.state.draining == {"b"}
        b2, tb2 = connect(again)
        b2.dataReceived(framed(wire.encode(T.HEARTBEAT, name=b"b", epoch=2, applied_seq=0)))
        ((mtype, reply),) = unframe(tb2.value())
        assert mtype == T.HEARTBEAT_REPLY and reply.lease_ms == 0
        reactor2.advance(again.lease_ms / 1000.0)
        assert members(again.state) == ["a", "b"]
        reactor2.advance(again.heartbeat_interval)
        assert members(again.state) == ["a"] and "b" not in again.state.nodes
        assert again.state.draining == set()
        assert b'"draining": []' in again.state.to_json()
    finally:
        again.stopService()


def test_the_last_member_is_not_removed_on_request(master):
    m, reactor, clock = master
    m.state.chain_length = 1
    p, _ = connect(m)
    register(p, "a", 7001)
    assert m.planned_remove("a").startswith("error: a is the last member")
    assert m.planned_remove("zz").startswith("error: no node")
    assert members(m.state) == ["a"]


def test_a_member_back_without_its_data_is_taken_out_and_rejoins_later():
    s = formed()
    s.heartbeat("n3", 1.0, committed_seq=50)
    # Back with a wiped store: it knows no chain.
    assert s.register("n3", "127.0.0.1", 9003, now=2.0, chain_id=wire.NO_CHAIN, committed_seq=0)
    assert members(s) == ["n1", "n2"]
    assert "n3" in [m.name for m in s.config().spares]
    # A live spare: it extends the chain again, through a state transfer.
    assert s.plan_joins(2.0, timeout=5.0) == [(0, "n3")]


def test_a_member_back_with_less_than_it_reported_is_taken_out():
    s = formed()
    s.heartbeat("n2", 1.0, committed_seq=80)
    assert s.register("n2", "127.0.0.1", 9002, now=2.0, chain_id=0, committed_seq=60)
    assert members(s) == ["n1", "n3"]


def test_reported_seqs_survive_a_master_restart():
    """A store behind its reports is caught after a master restart too."""
    s = formed()
    assert not s.reports_unsaved
    s.heartbeat("n2", 1.0, committed_seq=80)
    s.heartbeat("n2", 1.5, committed_seq=70)  # an older report changes nothing
    assert s.reports_unsaved and s.reported["n2"] == 80
    t = MasterState.from_json(s.to_json(), chains=1, chain_length=3)
    assert t.reported == {"n2": 80} and not t.reports_unsaved
    t.grace(2.0)
    assert t.register("n2", "127.0.0.1", 9002, now=2.0, chain_id=0, committed_seq=60)
    assert members(t) == ["n1", "n3"]


def test_a_state_saved_without_reports_loads():
    import json

    d = json.loads(formed().to_json())
    del d["reported"]
    t = MasterState.from_json(json.dumps(d).encode(), chains=1, chain_length=3)
    assert t.reported == {} and members(t) == ["n1", "n2", "n3"]


def test_a_forgotten_node_leaves_no_report():
    s = formed()
    s.heartbeat("n3", 1.0, committed_seq=50)
    assert s.forget("n3")
    assert "n3" not in s.reported


def test_a_last_member_kept_without_its_data_is_judged_by_what_it_has_now():
    s = formed(2)
    s.heartbeat("n2", 1.0, committed_seq=1000)
    assert s.remove("n1")
    # Back with less than it reported, but the chain's only copy: it stays.
    s.register("n2", "127.0.0.1", 7002, now=2.0, chain_id=0, committed_seq=940)
    assert members(s) == ["n2"]
    assert s.reported["n2"] == 940 and s.reports_unsaved
    # A clean restart later (after a master restart too) is no loss.
    t = MasterState.from_json(s.to_json(), chains=1, chain_length=2)
    assert not t.lost_data("n2", 0, 980)
    assert not t.register("n2", "127.0.0.1", 7002, now=3.0, chain_id=0, committed_seq=980)
    assert members(t) == ["n2"]


def test_a_member_back_with_its_data_keeps_its_place():
    s = formed()
    s.heartbeat("n2", 1.0, committed_seq=80)
    assert s.register("n2", "127.0.0.1", 9002, now=2.0, chain_id=0, committed_seq=80)
    assert members(s) == ["n1", "n2", "n3"]


def test_a_spare_goes_to_the_chain_that_most_needs_a_member():
    s = MasterState(chains=2, chain_length=3)
    for i in range(6):
        s.register(f"n{i + 1}", "h", 7000 + i, now=0.0)
    c0 = [c for c in s.chains if c.chain_id == 0][0]
    c1 = [c for c in s.chains if c.chain_id == 1][0]
    for name in list(c1.members[:2]):  # chain 1 loses two members
        s.remove(name)
    s.remove(c0.members[0])  # chain 0 loses one
    s.register("fresh", "h", 9000, now=1.0)
    for name in s.spares:
        s.heartbeat(name, 1.0)
    started = s.plan_joins(1.0, timeout=5.0)
    assert started[0][0] == 1  # chain 1 (one member left) is served first


def b_back_without_its_data(m: MasterService, clock, remove_a: bool = False) -> list:
    """
    Chain a -> b; b reported seq 40, then registers again with a wiped
    store (no chain, seq 0).  The log events of that registration.
    """
    from twisted.logger import capturedLogs

    pa, _ = connect(m)
    register(pa, "a", 7001)
    pb, _ = connect(m)
    register(pb, "b", 7002)
    if remove_a:
        assert m.state.remove("a")
    m.state.heartbeat("b", clock(), committed_seq=40)
    assert m.state.lost_data("b", wire.NO_CHAIN, 0)
    assert not m.state.lost_data("b", 0, 40)
    with capturedLogs() as events:
        register(pb, "b", 7002)
    return [e for e in events if "without the data" in e.get("log_format", "")]


def test_a_member_back_without_its_data_is_logged(master):
    """The operator sees why a member left its chain: a warning with both seqs."""
    from twisted.logger import LogLevel

    m, reactor, clock = master
    [event] = b_back_without_its_data(m, clock)
    assert event["log_level"] == LogLevel.warn
    assert (event["name"], event["seq"], event["reported"]) == ("b", 0, 40)
    assert [mm.name for mm in m.state.config().chains[0].members] == ["a"]


def test_the_last_member_back_without_its_data_is_a_critical_log(master):
    """It cannot be taken out (nobody else holds the chain's data): say so loudly."""
    from twisted.logger import LogLevel

    m, reactor, clock = master
    [event] = b_back_without_its_data(m, clock, remove_a=True)
    assert event["log_level"] == LogLevel.critical
    assert [mm.name for mm in m.state.config().chains[0].members] == ["b"]


def test_a_member_back_by_state_transfer_is_judged_by_its_new_store():
    """
    A removed member that reported seq 1000 rejoins through a snapshot at a
    lower seq (its old head's unacknowledged updates were never the
    chain's); restarted before it passes 1000, it keeps its place.
    """
    s = formed()
    s.heartbeat("n3", 1.0, committed_seq=1000)
    assert s.remove("n3")
    s.heartbeat("n3", 2.0, committed_seq=1000)  # a spare, still on its old store
    [(chain_id, name)] = s.plan_joins(2.0, timeout=5.0)
    epoch = s.chains[0].epoch
    assert s.joined(name, chain_id, epoch)
    s.heartbeat("n3", 3.0, committed_seq=990)
    assert not s.register("n3", "127.0.0.1", 7003, now=4.0, chain_id=0, committed_seq=995)
    assert members(s) == ["n1", "n2", "n3"]
    # Less than what it reported since the join still counts as lost data.
    assert s.register("n3", "127.0.0.1", 7003, now=5.0, chain_id=0, committed_seq=980)
    assert members(s) == ["n1", "n2"]
