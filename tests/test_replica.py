"""
Tests for L{ckv.chain.replica}: the I/O-free state machine of one chain
member, driven by hand.  Frames between replicas are carried explicitly
(L{tests.fakes.Harness}), and every commit is an explicit step.
"""

from __future__ import annotations

import random

import pytest

from ckv import wire
from ckv.chain.replica import (
    TO_CLIENT,
    TO_ORIGIN,
    TO_PREDECESSOR,
    TO_SUCCESSOR,
    Action,
    HelloRefused,
    Replica,
)
from ckv.config import Chain
from ckv.entry import Entry
from ckv.storage import Store, session_key
from ckv.wire import ErrorCode, MessageType, Op, Status
from tests.fakes import (
    CID_A,
    CID_B,
    CID_C,
    FakeStore,
    Harness,
    cas,
    commit,
    delete,
    get,
    make_chain,
    member,
    put,
    reply_of,
    seqs_of,
)

# -- helpers -----------------------------------------------------------------


def single(name: str = "n1") -> tuple[Replica, FakeStore]:
    store = FakeStore()
    r = Replica(name, store)
    r.on_config(make_chain([name]))
    commit(r, store)  # the epoch and chain id
    return r, store


def updates_entries(actions) -> list[Entry]:
    out = []
    for a in actions:
        assert a.kind == TO_SUCCESSOR
        mtype, body = wire.decode(a.frame)
        assert mtype == MessageType.UPDATES
        out += [Entry.from_wire(e) for e in body.entries]
    return out


def error_of(action) -> tuple[Status, str]:
    assert action.kind == TO_ORIGIN
    _, _, status, value = reply_of(action)
    return status, value.decode()


def wire_entry(seq: int, key: bytes = b"k", value: bytes = b"v", client_id=CID_A,
               request_id: int | None = None, op: Op = Op.PUT) -> dict:
    return Entry(seq, client_id, 0, request_id if request_id is not None else seq, int(op),
                 int(Status.OK), key, value).to_wire()


def parsed_entries(*entries: dict):
    """Entries as the replica receives them: parsed from an UPDATES frame."""
    frame = wire.encode(MessageType.UPDATES, epoch=1, entries=list(entries))
    return list(wire.decode(frame)[1].entries)


# -- roles and configuration -------------------------------------------------


def test_roles():
    h = Harness(["a", "b", "c"])
    assert [h.replicas[n].role for n in "abc"] == ["head", "middle", "tail"]
    assert h.replicas["b"].predecessor == "a"
    assert h.replicas["b"].successor == "c"
    assert h.replicas["a"].predecessor is None
    assert h.replicas["c"].successor is None
    r, _ = single()
    assert r.role == "head+tail"
    loner = Replica("x", FakeStore())
    assert loner.role == "none"
    assert loner.on_config(make_chain(["a", "b"])) == []
    assert loner.role == "none"


def test_on_config_ignores_older_epoch_and_records_meta():
    store = FakeStore()
    r = Replica("a", store)
    r.on_config(make_chain(["a", "b"], epoch=5, chain_id=3))
    batch = r.take_batch()
    assert batch is not None and batch.entries == []
    assert (batch.epoch, batch.chain_id) == (5, 3)
    store.commit(batch)
    r.batch_committed(batch)
    assert (store.epoch, store.chain_id) == (5, 3)
    assert r.take_batch() is None
    # An older configuration is ignored.
    r.on_config(make_chain(["b", "a"], epoch=4, chain_id=3))
    assert r.role == "head" and r.epoch == 5
    assert r.take_batch() is None


# -- the head decides ----------------------------------------------------------


def test_head_assigns_consecutive_seqs_and_decides():
    r, store = single()
    r.on_client_update(put(b"k", b"v1", request_id=1))
    r.on_client_update(put(b"j", b"w", request_id=2))
    r.on_client_update(delete(b"k", request_id=3))
    r.on_client_update(delete(b"absent", request_id=4))
    assert [e.seq for e in r.pending] == [1, 2, 3, 4]
    assert [(Op(e.op), Status(e.status)) for e in r.pending] == [
        (Op.PUT, Status.OK),
        (Op.PUT, Status.OK),
        (Op.DELETE, Status.OK),
        (Op.NOOP, Status.NOT_FOUND),
    ]
    assert r.applied_seq == 4
    assert r.updates_decided == 4
    actions = commit(r, store)
    assert store.data == {b"j": b"w"}
    assert [reply_of(a)[1:3] for a in actions] == [
        (1, Status.OK), (2, Status.OK), (3, Status.OK), (4, Status.NOT_FOUND),
    ]


@pytest.mark.parametrize(
    "current, expected, new, status, after",
    [
        (None, None, b"n", Status.OK, b"n"),  # only if absent: absent
        (b"x", None, b"n", Status.CAS_FAILED, b"x"),  # only if absent: present
        (b"x", b"x", b"n", Status.OK, b"n"),  # match
        (b"x", b"y", b"n", Status.CAS_FAILED, b"x"),  # mismatch
        (None, b"y", b"n", Status.CAS_FAILED, None),  # expected a value, absent
        (b"x", b"x", None, Status.OK, None),  # new=None deletes
        (b"x", b"y", None, Status.CAS_FAILED, b"x"),  # failed delete
        (b"", b"", b"n", Status.OK, b"n"),  # the empty value is a value
        (None, b"", b"n", Status.CAS_FAILED, None),  # ...and is not absence
    ],
)
def test_cas(current, expected, new, status, after):
    r, store = single()
    if current is not None:
        store.data[b"k"] = current
    r.on_client_update(cas(b"k", expected, new, request_id=7))
    (entry,) = r.pending
    assert Status(entry.status) == status
    if status != Status.OK:
        assert entry.op == Op.NOOP
    (action,) = commit(r, store)
    assert reply_of(action) == (CID_A, 7, status, b"")
    assert store.data.get(b"k") == after


def test_cas_decided_against_pending_state():
    r, store = single()
    r.on_client_update(cas(b"k", None, b"v1", request_id=1))
    r.on_client_update(cas(b"k", b"v1", b"v2", request_id=2))
    r.on_client_update(cas(b"k", b"v1", b"v3", request_id=3))  # v1 is gone already
    r.on_client_update(delete(b"k", request_id=4))
    r.on_client_update(cas(b"k", None, b"v5", request_id=5))  # absent again
    assert store.data == {}  # nothing committed yet
    assert [Status(e.status) for e in r.pending] == [
        Status.OK, Status.OK, Status.CAS_FAILED, Status.OK, Status.OK,
    ]
    batch = r.take_batch()
    assert len(batch.entries) == 5  # one batch
    store.commit(batch)
    r.batch_committed(batch)
    assert store.data == {b"k": b"v5"}
    # The overlay is gone once committed: decisions read the store again.
    store.data[b"k"] = b"changed"
    r.on_client_update(cas(b"k", b"changed", b"v6", request_id=6))
    assert Status(r.pending[-1].status) == Status.OK


def test_cas_decided_against_committing_batch():
    """A batch being committed still counts for decisions."""
    r, store = single()
    r.on_client_update(put(b"k", b"v1", request_id=1))
    batch = r.take_batch()
    r.on_client_update(cas(b"k", b"v1", b"v2", request_id=2))
    assert Status(r.pending[-1].status) == Status.OK
    store.commit(batch)
    r.batch_committed(batch)
    # The newer pending decision survives the older commit's overlay cleanup.
    r.on_client_update(cas(b"k", b"v2", b"v3", request_id=3))
    assert Status(r.pending[-1].status) == Status.OK
    commit(r, store)
    assert store.data == {b"k": b"v3"}


# -- validation ----------------------------------------------------------------


def test_not_head():
    h = Harness(["a", "b"])
    actions = h.replicas["b"].on_client_update(put(b"k", b"v", request_id=9), "conn")
    (a,) = actions
    assert a.target == "conn"
    status, message = error_of(a)
    assert status == Status.NOT_HEAD and "b" in message
    assert reply_of(a)[:2] == (CID_A, 9)
    assert h.replicas["b"].pending == []


def test_not_tail():
    h = Harness(["a", "b"])
    (a,) = h.replicas["a"].on_query(get(b"k", request_id=3), "conn")
    assert a.target == "conn"
    assert error_of(a)[0] == Status.NOT_TAIL


def test_query_of_a_key_with_an_unsettled_write_waits_for_it():
    r, store = single()
    (a,) = r.on_query(get(b"k", request_id=1), "conn")
    assert a.kind == TO_CLIENT and a.target == CID_A and a.origin == "conn"
    assert reply_of(a) == (CID_A, 1, Status.NOT_FOUND, b"")
    r.on_client_update(put(b"k", b"v", request_id=2))
    # The write may reach the tail's store before every disk has it: a
    # query of its key waits, and is answered with it once settled.
    assert r.on_query(get(b"k", request_id=3), "conn") == []
    (other,) = r.on_query(get(b"other", request_id=4))
    assert reply_of(other)[2] == Status.NOT_FOUND
    actions = commit(r, store)
    assert [reply_of(x)[1:] for x in actions] == [
        (2, Status.OK, b""), (3, Status.OK, b"v")]
    assert actions[1].origin == "conn"
    (a,) = r.on_query(get(b"k", request_id=5))
    assert reply_of(a) == (CID_A, 5, Status.OK, b"v")
    assert r.queries_answered == 4


def test_a_waiting_query_is_answered_with_its_write_not_a_later_one():
    r, store = single()
    r.on_client_update(put(b"k", b"1", request_id=1))
    assert r.on_query(get(b"k", request_id=2)) == []
    batch = r.take_batch()
    r.on_client_update(delete(b"k", request_id=3))
    assert r.on_query(get(b"k", request_id=4)) == []
    store.commit(batch)
    actions = r.batch_committed(batch)
    assert [reply_of(x)[1:3] for x in actions] == [(1, Status.OK), (2, Status.OK)]
    assert reply_of(actions[1])[3] == b"1"
    actions = commit(r, store)
    assert [reply_of(x)[1:3] for x in actions] == [(3, Status.OK), (4, Status.NOT_FOUND)]


def test_a_waiting_query_is_refused_when_the_lease_is_gone_or_the_tail_moves():
    lease = [True]
    store = FakeStore()
    r = Replica("b", store, lease_ok=lambda: lease[0])
    r.on_config(make_chain(["a", "b"]))
    r.on_chain_hello(0, 1, "a")
    r.on_updates(1, parsed_entries(wire_entry(1, key=b"k"), wire_entry(2, key=b"j")))
    assert r.on_query(get(b"k", request_id=7)) == []
    assert r.on_query(get(b"j", request_id=8)) == []
    commit(r, store)
    lease[0] = False
    actions = r.on_committed(1, 1)
    (q,) = [x for x in actions if x.kind != TO_PREDECESSOR and reply_of(x)[1] == 7]
    assert reply_of(q)[2] == Status.UNAVAILABLE
    # A joining node is promoted after us: the other query goes there.
    actions = r.on_config(Chain(0, 2, (member("a"), member("b")), (member("j"),)))
    assert actions == []
    actions = r.on_config(Chain(0, 3, (member("a"), member("b"), member("j"))))
    (q,) = [x for x in actions if x.kind == TO_ORIGIN]
    assert reply_of(q)[1:3] == (8, Status.NOT_TAIL)


def test_query_without_lease():
    store = FakeStore()
    r = Replica("n1", store, lease_ok=lambda: False)
    r.on_config(make_chain(["n1"]))
    (a,) = r.on_query(get(b"k"), "conn")
    assert error_of(a)[0] == Status.UNAVAILABLE


@pytest.mark.parametrize(
    "request_, status",
    [
        (put(b"k" * (wire.MAX_KEY + 1), b"v"), Status.TOO_LARGE),
        (put(b"k", b"v" * (wire.MAX_VALUE + 1)), Status.TOO_LARGE),
        (cas(b"k", b"e" * (wire.MAX_VALUE + 1), b"v"), Status.TOO_LARGE),
        (put(b"k", None), Status.BAD_REQUEST),  # a put without a value
        (put(b"k", b"v", epoch=99), Status.STALE_EPOCH),
    ],
    ids=["key", "value", "expected", "no-value", "epoch"],
)
def test_bad_updates(request_, status):
    r, store = single()
    (a,) = r.on_client_update(request_, "conn")
    assert a.target == "conn"
    assert error_of(a)[0] == status
    assert r.pending == [] and r.applied_seq == 0


def test_bad_ops():
    r, _ = single()
    for op in (Op.NOOP, 77):
        body = put(b"k", b"v")
        body = body._replace(op=int(op))
        (a,) = r.on_client_update(body, "conn")
        assert error_of(a)[0] == Status.BAD_REQUEST
    (a,) = r.on_query(get(b"k" * (wire.MAX_KEY + 1)), "conn")
    assert error_of(a)[0] == Status.TOO_LARGE


def test_request_for_current_epoch_accepted():
    r, _ = single()
    assert r.on_client_update(put(b"k", b"v", epoch=1)) == []
    assert r.applied_seq == 1


# -- exactly once ----------------------------------------------------------------


@pytest.mark.parametrize("commit_between", [False, True])
def test_retry_is_a_noop_carrying_the_recorded_status(commit_between):
    h = Harness(["a", "b", "c"])
    h.connect_all()
    h.submit(put(b"n", b"1", request_id=5))
    h.submit(cas(b"k", None, b"first", request_id=6))
    if commit_between:
        h.settle()
    h.submit(cas(b"k", None, b"first", request_id=6))  # a retry
    head = h.head
    assert head.duplicates == 1
    h.settle()
    expected = [(1, Op.PUT, Status.OK, 5), (2, Op.PUT, Status.OK, 6)]
    if commit_between:
        # The original was answered already (its reply may have been lost):
        # the retry is re-answered through a NOOP carrying the result.
        expected.append((3, Op.NOOP, Status.OK, 6))
    # (Otherwise the original is still on its way to the tail, which will
    # answer it: the retry adds nothing.)
    for n in "abc":
        entries = h.history(n)
        assert [(e.seq, Op(e.op), Status(e.status), e.request_id) for e in entries] == expected
        assert h.stores[n].data == {b"n": b"1", b"k": b"first"}
        assert h.stores[n].sessions[session_key(CID_A, 0)] == (6, Status.OK)
    # Every answer carries the status of the original (OK), not CAS_FAILED.
    assert h.reply_statuses() == [
        (CID_A, 5, Status.OK), (CID_A, 6, Status.OK),
    ] + ([(CID_A, 6, Status.OK)] if commit_between else [])


def test_retry_of_failed_cas_stays_failed():
    r, store = single()
    store.data[b"k"] = b"x"
    r.on_client_update(cas(b"k", b"nope", b"v", request_id=1))
    commit(r, store)
    store.data[b"k"] = b"nope"  # now the cas would succeed if decided again
    r.on_client_update(cas(b"k", b"nope", b"v", request_id=1))
    (e,) = r.pending
    assert (Op(e.op), Status(e.status)) == (Op.NOOP, Status.CAS_FAILED)
    (a,) = commit(r, store)
    assert reply_of(a)[2] == Status.CAS_FAILED
    assert store.data[b"k"] == b"nope"


def test_stale_request():
    r, store = single()
    r.on_client_update(put(b"k", b"v", request_id=10))
    (a,) = r.on_client_update(put(b"k", b"old", request_id=9), "conn")  # against pending
    assert a.target == "conn" and error_of(a)[0] == Status.STALE_REQUEST
    commit(r, store)
    (a,) = r.on_client_update(put(b"k", b"old", request_id=3), "conn")  # against the store
    assert error_of(a)[0] == Status.STALE_REQUEST
    assert r.applied_seq == 1 and r.pending == []
    assert store.data == {b"k": b"v"}


def test_sessions_are_per_client_and_lane():
    r, store = single()
    r.on_client_update(put(b"k", b"1", request_id=5, lane=0))
    r.on_client_update(put(b"k", b"2", request_id=1, lane=1))  # other lane: not stale
    r.on_client_update(put(b"k", b"3", request_id=1, client_id=CID_B))  # other client
    r.on_client_update(put(b"k", b"4", request_id=6, lane=0))
    assert [Op(e.op) for e in r.pending] == [Op.PUT] * 4
    commit(r, store)
    assert store.sessions == {
        session_key(CID_A, 0): (6, Status.OK),
        session_key(CID_A, 1): (1, Status.OK),
        session_key(CID_B, 0): (1, Status.OK),
    }


def test_no_client_entries_record_no_session_and_get_no_reply():
    r, store = single()
    r.on_client_update(put(b"k", b"v", client_id=wire.NO_CLIENT, request_id=1))
    r.on_client_update(put(b"k", b"w", client_id=wire.NO_CLIENT, request_id=1))
    assert [Op(e.op) for e in r.pending] == [Op.PUT, Op.PUT]  # no dedup without a client
    assert commit(r, store) == []
    assert store.sessions == {}
    assert store.data == {b"k": b"w"}


# -- the chain: forwarding, replies, acks -------------------------------------


def committed_frames(h: Harness, src: str, dst: str) -> list[int]:
    """The seqs of the COMMITTED frames in flight from C{src} to C{dst}."""
    out = []
    for frame in h.links[(src, dst)]:
        mtype, body = wire.decode(frame)
        if mtype == MessageType.COMMITTED:
            out.append(body.seq)
    return out


def test_updates_flow_before_commit_and_the_tail_replies_once_every_disk_has_them():
    h = Harness(["a", "b", "c"])
    h.connect_all()
    a, b, c = (h.replicas[n] for n in "abc")
    h.submit(put(b"k", b"v", request_id=1))
    h.submit(put(b"j", b"w", request_id=2))
    # Forwarded at once: the disks of the chain work in parallel.
    assert len(h.links[("a", "b")]) == 2 and committed_frames(h, "a", "b") == []
    assert h.deliver_all("a", "b") == 2
    assert b.applied_seq == 2 and b.committed_seq == 0
    assert h.deliver_all("b", "c") == 2
    h.commit("c")
    assert c.committed_seq == 2
    assert h.replies == [] and not h.links[("c", "b")]  # not on every disk yet
    h.commit("b")
    assert committed_frames(h, "b", "c") == []  # a has not committed yet
    assert h.commit("a")
    assert h.stores["a"].data == {b"k": b"v", b"j": b"w"}
    assert list(e.seq for e in a.sent) == [1, 2]
    assert committed_frames(h, "a", "b") == [2]
    h.deliver_all("a", "b")
    assert committed_frames(h, "b", "c") == [2]
    assert [e.seq for e in b.sent] == [1, 2]
    assert h.replies == []
    h.deliver_all("b", "c")
    assert h.reply_statuses() == [(CID_A, 1, Status.OK), (CID_A, 2, Status.OK)]
    assert all(x.target == CID_A for x in h.replies)
    assert list(c.sent) == [] and c.acked_seq == 2 and c.frontier() == 2
    # The ack travels upstream, pruning sent on the way.
    (ack,) = h.links[("c", "b")]
    mtype, body = wire.decode(ack)
    assert mtype == MessageType.ACK and (body.epoch, body.seq) == (1, 2)
    h.deliver("c", "b")
    assert list(b.sent) == [] and b.acked_seq == 2
    assert len(h.links[("b", "a")]) == 1
    h.deliver("b", "a")
    assert list(a.sent) == [] and a.acked_seq == 2
    # The prune is persisted with the next batch.
    assert h.stores["a"].sent and h.stores["b"].sent
    assert h.commit("a") and h.commit("b")
    assert h.stores["a"].sent == {} and h.stores["b"].sent == {}
    assert h.stores["c"].sent == {}  # the tail never keeps sent
    for n in "abc":
        assert h.stores[n].data == {b"k": b"v", b"j": b"w"}


def test_cumulative_acks_prune_partially():
    h = Harness(["a", "b", "c"])
    h.connect_all()
    b = h.replicas["b"]
    for i in range(1, 6):
        h.submit(put(b"k%d" % i, b"v", request_id=i))
        h.commit("a")
    assert [e.seq for e in h.head.sent] == [1, 2, 3, 4, 5]
    assert seqs_of([Action(TO_SUCCESSOR, f) for f in h.links[("a", "b")]]) == [1, 2, 3, 4, 5]
    assert committed_frames(h, "a", "b") == [1, 2, 3, 4, 5]
    assert h.replicas["a"].on_ack(1, 3) == []  # the head acks no one
    assert [e.seq for e in h.head.sent] == [4, 5]
    assert h.replicas["a"].on_ack(1, 2) == []  # older ack: ignored
    assert [e.seq for e in h.head.sent] == [4, 5]
    # A middle passes acks upstream.
    for _ in range(4):  # UPDATES 1, COMMITTED 1, UPDATES 2, COMMITTED 2
        h.deliver("a", "b")
    h.commit("b")
    (up,) = b.on_ack(1, 1)
    assert up.kind == TO_PREDECESSOR
    assert wire.decode(up.frame)[1].seq == 1
    assert [e.seq for e in b.sent] == [2]
    assert b.on_ack(1, 1) == []


def test_gap_is_held_until_filled():
    store = FakeStore()
    r = Replica("b", store)
    r.on_config(make_chain(["a", "b", "c"]))
    r.on_chain_hello(0, 1, "a")
    e1, e2, e3, e4 = (wire_entry(i, key=b"k%d" % i) for i in range(1, 5))
    r.on_updates(1, parsed_entries(e3))
    assert r.applied_seq == 0 and r.pending == []
    assert r.status()["held"] == 1
    r.on_updates(1, parsed_entries(e4))
    assert r.applied_seq == 0
    r.on_updates(1, parsed_entries(e1))
    assert r.applied_seq == 1
    r.on_updates(1, parsed_entries(e2))
    assert r.applied_seq == 4
    assert [e.seq for e in r.pending] == [1, 2, 3, 4]
    assert r.status()["held"] == 0


def test_duplicates_ignored():
    store = FakeStore()
    r = Replica("b", store)
    r.on_config(make_chain(["a", "b"]))
    es = parsed_entries(*(wire_entry(i, key=b"k", value=b"%d" % i) for i in (1, 2)))
    r.on_updates(1, es)
    r.on_updates(1, es)
    r.on_updates(1, parsed_entries(wire_entry(2, key=b"k", value=b"other")))
    assert [e.seq for e in r.pending] == [1, 2]
    commit(r, store)
    r.on_updates(1, es)
    assert r.pending == []
    assert store.data == {b"k": b"2"}
    assert [e.seq for e in store.history] == [1, 2]


def test_hello_clears_held_entries():
    r = Replica("b", FakeStore())
    r.on_config(make_chain(["a", "b"]))
    r.on_updates(1, parsed_entries(wire_entry(3)))
    assert r.status()["held"] == 1
    frame = r.on_chain_hello(0, 1, "a")
    assert r.status()["held"] == 0
    mtype, body = wire.decode(frame)
    assert mtype == MessageType.CHAIN_HELLO_REPLY
    assert (body.epoch, body.applied_seq) == (1, 0)


def test_forwarding_waits_for_link_and_resends_exactly_the_missing_entries():
    h = Harness(["a", "b"])
    a, b = h.replicas["a"], h.replicas["b"]
    for i in range(1, 4):
        h.submit(put(b"k", b"%d" % i, request_id=i))
    h.commit("a")  # no link yet: nothing is sent
    assert a.forward_cursor is None
    resend = h.connect("a", "b")
    assert seqs_of(resend) == [1, 2, 3]
    h.deliver_all("a", "b")
    h.commit("b")
    h.submit(put(b"k", b"4", request_id=4))
    h.submit(put(b"k", b"5", request_id=5))
    h.commit("a")
    assert len(h.links[("a", "b")]) == 3  # 4, 5 and a's frontier in flight
    h.drop("a", "b")  # ... and lost, with the ack for 1..3
    assert b.applied_seq == 3 and a.acked_seq == 0
    resend = h.connect("a", "b")
    assert seqs_of(resend) == [4, 5]
    h.settle()
    assert [e.seq for e in h.history("b")] == [1, 2, 3, 4, 5]
    assert list(a.sent) == []


def test_resend_above_uncommitted_successor_state():
    """The successor's applied seq counts its pending entries: they are not resent."""
    h = Harness(["a", "b"])
    h.connect_all()
    for i in range(1, 4):
        h.submit(put(b"k", b"%d" % i, request_id=i))
    h.deliver_all("a", "b")  # b holds 1..3 uncommitted
    h.submit(put(b"k", b"4", request_id=4))
    h.commit("a")
    h.drop("a", "b")
    assert seqs_of(h.connect("a", "b")) == [4]


def test_successor_ready_refusals():
    h = Harness(["a", "b"])
    h.connect_all()
    a = h.replicas["a"]
    for i in range(1, 4):
        h.submit(put(b"k", b"%d" % i, request_id=i))
    h.commit("a")
    a.on_ack(1, 2)
    a.on_successor_lost()
    assert a.on_successor_ready(2, 0) == []  # another epoch
    assert a.forward_cursor is None
    assert a.on_successor_ready(1, 9) == []  # successor ahead of us
    assert a.forward_cursor is None
    assert a.on_successor_ready(1, 1) == []  # it lacks acknowledged entries
    assert a.forward_cursor is None
    assert seqs_of(a.on_successor_ready(1, 2)) == [3]
    a.on_successor_lost()
    assert seqs_of(a.on_successor_ready(1, 3)) == []
    assert a.forward_cursor == 3


def test_successor_behind_acked_with_empty_sent_is_refused():
    h = Harness(["a", "b"])
    h.connect_all()
    a = h.replicas["a"]
    for i in range(1, 4):
        h.submit(put(b"k", b"%d" % i, request_id=i))
    h.settle()
    assert list(a.sent) == [] and a.acked_seq == 3
    a.on_successor_lost()
    # A successor (e.g. wiped and restarted) that has nothing:
    assert a.on_successor_ready(1, 0) == []
    assert a.forward_cursor is None


def test_large_batches_split_into_several_frames():
    h = Harness(["a", "b"])
    h.connect_all()
    big = b"x" * (wire.MAX_BATCH_BYTES // 2)
    for i in range(1, 6):
        h.submit(put(b"k%d" % i, big, request_id=i))
    h.commit("a")
    frames = list(h.links[("a", "b")])
    assert len(frames) >= 2
    assert all(len(f) <= wire.MAX_FRAME for f in frames)
    h.settle()
    assert [e.seq for e in h.history("b")] == [1, 2, 3, 4, 5]


# -- chain hello -------------------------------------------------------------------


def test_chain_hello_refusals():
    r = Replica("b", FakeStore())
    with pytest.raises(HelloRefused) as ei:
        r.on_chain_hello(0, 1, "a")
    assert ei.value.code == ErrorCode.NOT_MEMBER  # no configuration yet
    r.on_config(make_chain(["a", "b", "c"], epoch=4, chain_id=2))
    cases = [
        ((2, 3, "a"), ErrorCode.STALE_EPOCH),  # stale
        ((2, 5, "a"), ErrorCode.STALE_EPOCH),  # future
        ((2, 4, "c"), ErrorCode.NOT_MEMBER),  # our successor
        ((2, 4, "z"), ErrorCode.NOT_MEMBER),  # a stranger
        ((1, 4, "a"), ErrorCode.NOT_MEMBER),  # another chain
    ]
    for args, code in cases:
        with pytest.raises(HelloRefused) as ei:
            r.on_chain_hello(*args)
        assert ei.value.code == code, args
        assert ei.value.message
    mtype, body = wire.decode(r.on_chain_hello(2, 4, "a"))
    assert mtype == MessageType.CHAIN_HELLO_REPLY and body.epoch == 4
    head = Replica("a", FakeStore())
    head.on_config(make_chain(["a", "b"]))
    with pytest.raises(HelloRefused) as ei:
        head.on_chain_hello(0, 1, "b")
    assert ei.value.code == ErrorCode.NOT_MEMBER
    removed = Replica("x", FakeStore())
    removed.on_config(make_chain(["a", "b"]))
    with pytest.raises(HelloRefused) as ei:
        removed.on_chain_hello(0, 1, "a")
    assert ei.value.code == ErrorCode.NOT_MEMBER


def test_hello_frame():
    r = Replica("a", FakeStore())
    r.on_config(make_chain(["a", "b"], epoch=3, chain_id=7))
    mtype, body = wire.decode(r.hello_frame())
    assert mtype == MessageType.CHAIN_HELLO
    assert (body.chain_id, body.epoch, bytes(body.name)) == (7, 3, b"a")


# -- reconfiguration ---------------------------------------------------------------


def test_middle_becomes_tail_replies_for_sent_and_acks():
    h = Harness(["a", "b", "c"])
    h.connect_all()
    a, b = h.replicas["a"], h.replicas["b"]
    for i in range(1, 4):
        h.submit(put(b"k%d" % i, b"v", request_id=i))
    h.submit(put(b"n", b"v", client_id=wire.NO_CLIENT))
    h.commit("a")
    h.deliver_all("a", "b")
    h.commit("b")
    h.deliver_all("b", "c")
    h.commit("c")  # c replies 1..4 and acks 4... which is lost with c
    assert len(h.replies) == 3
    h.replies.clear()
    h.submit(put(b"k5", b"v", request_id=5))
    h.commit("a")
    h.deliver_all("a", "b")
    h.commit("b")  # 5 is in b's sent, not at c
    assert [e.seq for e in b.sent] == [1, 2, 3, 4, 5]
    h.drop("b", "c")
    actions = b.on_config(make_chain(["a", "b"], epoch=2))
    assert b.role == "tail" and b.epoch == 2
    replies = [x for x in actions if x.kind == TO_CLIENT]
    acks = [x for x in actions if x.kind == TO_PREDECESSOR]
    # Every entry with a client, including those c already replied to.
    assert [reply_of(x)[1:3] for x in replies] == [(i, Status.OK) for i in (1, 2, 3, 5)]
    (ack,) = acks
    mtype, body = wire.decode(ack.frame)
    assert mtype == MessageType.ACK and (body.epoch, body.seq) == (2, 5)
    assert list(b.sent) == [] and b.acked_seq == 5
    assert b.forward_cursor is None
    # The prune and the new epoch are persisted by the next batch.
    batch = b.take_batch()
    assert batch.prune_sent_upto == 5 and batch.epoch == 2 and not batch.keep_sent
    h.stores["b"].commit(batch)
    b.batch_committed(batch)
    assert h.stores["b"].sent == {}
    a.on_config(make_chain(["a", "b"], epoch=2))
    assert a.on_ack(2, 5) == []
    assert list(a.sent) == []
    # The new tail answers queries and replies to later updates itself.
    (q,) = b.on_query(get(b"k5"))
    assert reply_of(q)[2] == Status.OK


def test_becoming_tail_with_a_batch_in_flight():
    h = Harness(["a", "b", "c"])
    h.connect_all()
    b = h.replicas["b"]
    h.submit(put(b"k1", b"v", request_id=1))
    h.submit(put(b"k2", b"v", request_id=2))
    h.commit("a")
    h.deliver_all("a", "b")
    batch = b.take_batch()
    assert batch.keep_sent
    h.drop("b", "c")
    # Not on our disk yet: nothing settles before the batch is.
    assert b.on_config(make_chain(["a", "b"], epoch=2)) == []
    assert b.on_query(get(b"k1")) == []  # waits for seq 1
    h.stores["b"].commit(batch)
    actions = b.batch_committed(batch)
    # The replies to 1 and 2, and (after 1) the query of k1, answered.
    assert [reply_of(x)[1] for x in actions if x.kind == TO_CLIENT] == [1, 1, 2]
    (ack,) = [x for x in actions if x.kind == TO_PREDECESSOR]
    assert wire.decode(ack.frame)[1].seq == 2
    # The sent entries the batch stored are pruned next.
    assert sorted(h.stores["b"].sent) == [1, 2]
    batch = b.take_batch()
    assert batch is not None and batch.prune_sent_upto == 2
    h.stores["b"].commit(batch)
    b.batch_committed(batch)
    assert h.stores["b"].sent == {}


def test_middle_removed_then_resend_to_new_successor():
    h = Harness(["a", "b", "c"])
    h.connect_all()
    for i in range(1, 4):
        h.submit(put(b"k%d" % i, b"v", request_id=i))
    h.commit("a")
    h.deliver_all("a", "b")
    h.commit("b")
    h.deliver_all("b", "c")  # c has 1..3, a has them in sent
    a, c = h.replicas["a"], h.replicas["c"]
    new = make_chain(["a", "c"], epoch=2)
    a.on_config(new)
    c.on_config(new)
    a.on_successor_lost()
    mtype, body = wire.decode(c.on_chain_hello(0, 2, "a"))
    assert body.applied_seq == 3
    assert seqs_of(a.on_successor_ready(body.epoch, body.applied_seq)) == []
    a.on_client_update(put(b"k4", b"v", request_id=4))
    assert seqs_of(a.forward()) == [4]


# -- commit mechanics --------------------------------------------------------------


def test_take_batch_is_none_while_committing_and_batches_stay_ordered():
    r, store = single()
    assert r.take_batch() is None
    r.on_client_update(put(b"k", b"1", request_id=1))
    b1 = r.take_batch()
    assert r.busy
    r.on_client_update(put(b"k", b"2", request_id=2))
    assert r.take_batch() is None
    store.commit(b1)
    r.batch_committed(b1)
    assert not r.busy
    b2 = r.take_batch()
    assert [e.seq for e in b2.entries] == [2]


def test_batch_failed_puts_the_batch_back_in_front():
    store = FakeStore()
    r = Replica("n1", store)
    r.on_config(make_chain(["n1"], epoch=3))
    r.on_client_update(put(b"k", b"1", request_id=1))
    r.on_client_update(put(b"k", b"2", request_id=2))
    b1 = r.take_batch()
    assert b1.epoch == 3
    r.on_client_update(put(b"k", b"3", request_id=3))
    store.fail_next = 1
    with pytest.raises(RuntimeError):
        store.commit(b1)
    r.batch_failed(b1)
    assert not r.busy
    b2 = r.take_batch()
    assert [e.seq for e in b2.entries] == [1, 2, 3]
    assert b2.epoch == 3  # the meta is retried too
    store.commit(b2)
    actions = r.batch_committed(b2)
    assert [reply_of(a)[1] for a in actions] == [1, 2, 3]
    assert store.data == {b"k": b"3"}
    assert store.epoch == 3


def test_status():
    h = Harness(["a", "b"])
    s = h.replicas["a"].status()
    assert s["role"] == "head" and s["successor"] == "b" and s["successor_link"] == "down"
    h.connect_all()
    h.submit(put(b"k", b"v"))
    s = h.replicas["a"].status()
    assert s["successor_link"] == "up" and s["pending"] == 1 and s["applied_seq"] == 1
    # The tail has no successor: no link to be down.
    assert h.replicas["b"].status()["successor_link"] == "none"


# -- recovery --------------------------------------------------------------------------


def test_restart_from_a_real_store_resends_the_durable_sent_list(tmp_path):
    stores = {n: Store(str(tmp_path / n)) for n in "ab"}
    for s in stores.values():
        s.open()
    try:
        h = Harness(["a", "b"], stores=stores)
        h.connect_all()
        for n in "ab":
            h.commit(n)
        for i in range(1, 5):
            h.submit(put(b"k%d" % i, b"v%d" % i, request_id=i))
        h.commit("a")
        h.deliver_all("a", "b")
        h.commit("b")
        h.deliver("b", "a")  # ack 4
        h.drop("a", "b")
        h.submit(put(b"k5", b"v5", request_id=5))
        h.submit(put(b"k6", b"v6", request_id=6))
        h.commit("a")  # also persists the prune of 1..4
        assert [e.seq for e in stores["a"].recover().sent] == [5, 6]
        # The whole chain stops before 5 and 6 reach b.
        for s in stores.values():
            s.close()
        for s in stores.values():
            s.open()
        h2 = Harness(["a", "b"], stores=stores)
        a = h2.replicas["a"]
        assert a.applied_seq == 6 and a.acked_seq == 4
        assert [e.seq for e in a.sent] == [5, 6]
        assert h2.replicas["b"].applied_seq == 4
        assert seqs_of(h2.connect("a", "b")) == [5, 6]
        h2.settle()
        assert dict(stores["b"].items()) == {b"k%d" % i: b"v%d" % i for i in range(1, 7)}
        assert stores["a"].recover().sent == []
        # Exactly once survives the restart: the sessions are durable.
        h2.submit(put(b"k6", b"again", request_id=6))
        assert Op(h2.head.pending[-1].op) == Op.NOOP
    finally:
        for s in stores.values():
            s.close()


# -- random schedules --------------------------------------------------------------------


def check_invariants(h: Harness) -> None:
    names = [m.name for m in h.chain.members]
    for n in names:
        hist = h.accepted(n)
        assert [e.seq for e in hist] == list(range(1, len(hist) + 1)), n
    for i, p in enumerate(names):
        hp = h.accepted(p)
        for s in names[i + 1 :]:
            # Update propagation: a later node's history is a prefix.
            hs = h.accepted(s)
            assert hs == hp[: len(hs)], (p, s)
    for p, s in h.pairs():
        # In-process requests: history(pred) = history(succ) + sent(pred), where
        # the part of history(succ) that counts is what the tail acknowledged
        # (accepted histories: a node forwards before it commits).
        hp, hs = h.accepted(p), h.accepted(s)
        sent = list(h.replicas[p].sent)
        k = len(hp) - len(sent)
        assert len(hs) >= k, (p, s, len(hs), k)
        assert hp == hs[:k] + sent, (p, s)
        assert h.replicas[p].acked_seq == k


def random_request(rng: random.Random, rids: dict, history: list) -> object:
    client = rng.choice([CID_A, CID_B, CID_C, wire.NO_CLIENT])
    lane = rng.choice([0, 1])
    key = rng.choice([b"a", b"b", b"c"])
    if client != wire.NO_CLIENT and (client, lane) in rids and rng.random() < 0.1:
        rid = rids[(client, lane)]  # a retry
    else:
        rid = rids[(client, lane)] = rids.get((client, lane), 0) + 1
    kind = rng.choice(["put", "put", "delete", "cas"])
    kw = {"client_id": client, "lane": lane, "request_id": rid}
    if kind == "put":
        return put(key, b"%d" % rng.randrange(5), **kw)
    if kind == "delete":
        return delete(key, **kw)
    expected = rng.choice([None, b"0", b"1", b"2"])
    new = rng.choice([None, b"0", b"1", b"2", b"3"])
    return cas(key, expected, new, **kw)


def model_replies(requests: list) -> tuple[dict, list]:
    """The data and the reply of every request, processed one by one in order."""
    data: dict[bytes, bytes] = {}
    sessions: dict[tuple[bytes, int], tuple[int, Status]] = {}
    replies = []
    for r in requests:
        cid, lane, rid = bytes(r.client_id), r.lane, r.request_id
        if cid != wire.NO_CLIENT and (cid, lane) in sessions:
            last, st = sessions[(cid, lane)]
            if rid == last:
                replies.append((cid, rid, st))
                continue
        cur = data.get(r.key)
        if r.op == Op.PUT:
            data[r.key] = r.value
            st = Status.OK
        elif r.op == Op.DELETE:
            st = Status.OK if cur is not None else Status.NOT_FOUND
            data.pop(r.key, None)
        else:
            exp = r.expected if r.flags & wire.FLAG_HAS_EXPECTED else None
            if cur != exp:
                st = Status.CAS_FAILED
            else:
                st = Status.OK
                if r.flags & wire.FLAG_HAS_VALUE:
                    data[r.key] = r.value
                else:
                    data.pop(r.key, None)
        if cid != wire.NO_CLIENT:
            sessions[(cid, lane)] = (rid, st)
            replies.append((cid, rid, st))
    return data, replies


def first_replies(replies: list) -> list:
    """The replies without repeats of an earlier (client, request id, status), in order."""
    return list(dict.fromkeys(replies))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("length", [2, 3, 4])
def test_random_schedule_keeps_invariants(seed, length):
    rng = random.Random(seed * 1000 + length)
    names = [f"n{i}" for i in range(length)]
    h = Harness(names)
    h.connect_all()
    pairs = h.pairs()
    requests: list = []
    rids: dict = {}
    for _step in range(400):
        x = rng.random()
        if x < 0.25:
            request = random_request(rng, rids, requests)
            requests.append(request)
            h.submit(request)
        elif x < 0.5:
            h.commit(rng.choice(names))
        elif x < 0.9:
            live = [link for link, q in h.links.items() if q]
            if live:
                h.deliver(*rng.choice(live))
        elif x < 0.95:
            p, s = rng.choice(pairs)
            if (p, s) in h.up:
                h.drop(p, s)
        else:
            down = [pair for pair in pairs if pair not in h.up]
            if down:
                p, s = rng.choice(down)
                want = list(range(h.replicas[s].applied_seq + 1,
                                  h.replicas[p].applied_seq + 1))
                assert seqs_of(h.connect(p, s)) == want
        check_invariants(h)
    # Heal every link, then drain; one last update flushes the cumulative ack.
    for p, s in pairs:
        if (p, s) not in h.up:
            h.connect(p, s)
    last = put(b"z", b"end", client_id=CID_A, lane=7, request_id=1)
    requests.append(last)
    h.submit(last)
    h.settle()
    check_invariants(h)
    data, replies = model_replies(requests)
    for n in names:
        assert h.stores[n].data == data, n
        assert list(h.replicas[n].sent) == []
        assert h.stores[n].sent == {}
        assert h.history(n) == h.history(names[0])
    # Every request got its reply, from the tail, in the head's order; a
    # retry is answered again only if it came after the original was
    # answered (while the original is in flight, one answer is enough).
    got = h.reply_statuses()
    assert first_replies(got) == first_replies(replies)
    assert set(got) == set(replies)


def test_a_fence_that_comes_before_the_promotion_is_not_lost():
    """The old tail learns first and sends FENCE; the joiner learns it is tail later."""
    store = FakeStore()
    r = Replica("j", store)
    joining = Chain(0, 5, (member("a"), member("t")), (member("j"),))
    r.on_config(joining)
    assert r.role == "joining"
    promoted = Chain(0, 6, (member("a"), member("t"), member("j")))
    r.on_fence(6, 0)  # FENCE of the new epoch, before our CONFIG
    r.on_config(promoted)
    assert r.role == "tail"
    actions = r.on_query(get(b"k"))
    assert reply_of(actions[0])[2] == Status.NOT_FOUND  # served: nothing to wait for


def test_a_promoted_tail_waits_for_its_fence():
    store = FakeStore()
    r = Replica("j", store)
    r.on_config(Chain(0, 5, (member("a"), member("t")), (member("j"),)))
    r.on_config(Chain(0, 6, (member("a"), member("t"), member("j"))))
    (a,) = r.on_query(get(b"k"))
    assert reply_of(a)[2] == Status.UNAVAILABLE
    r.on_fence(6, 0)
    (a,) = r.on_query(get(b"k"))
    assert reply_of(a)[2] == Status.NOT_FOUND


# -- restarts under pipelined durability -------------------------------------------


def restarted(name: str, store: FakeStore, chain: Chain) -> Replica:
    r = Replica(name, store, store.recover(), restarted=True)
    r.on_config(chain)
    return r


def test_a_head_forwards_before_it_commits_and_a_restart_loses_the_uncommitted_part():
    """The successor may hold what the head lost: the restarted head must not reuse seqs."""
    h = Harness(["a", "b"])
    h.connect_all()
    for i in range(1, 4):
        h.submit(put(b"k", b"%d" % i, request_id=i))
    h.commit("a")
    h.submit(put(b"k", b"4", request_id=4))
    h.deliver_all("a", "b")
    h.commit("b")  # b has 1..4 on disk; a only 1..3
    assert h.stores["a"].applied_seq == 3 and h.stores["b"].applied_seq == 4
    a = restarted("a", h.stores["a"], h.chain)
    assert not a.verified and a.role == "head"
    # It decides nothing and accepts no predecessor until it has checked.
    (err,) = a.on_client_update(put(b"k", b"5", request_id=5), "o")
    assert error_of(err)[0] == Status.UNAVAILABLE
    assert a.applied_seq == 3 and a.pending == []
    with pytest.raises(HelloRefused) as refused:
        a.on_chain_hello(0, 1, "z")
    assert refused.value.code == ErrorCode.NOT_MEMBER  # not its predecessor: checked first
    # b is ahead: a leaves (the service re-registers it with no chain).
    assert a.on_successor_ready(1, 4) == []
    assert a.left and not a.verified and a.forward_cursor is None
    assert a.on_client_update(put(b"k", b"5", request_id=5), "o")[0].kind == TO_ORIGIN


def test_a_restarted_node_whose_successor_is_not_ahead_goes_on():
    h = Harness(["a", "b", "c"])
    h.connect_all()
    for i in range(1, 3):
        h.submit(put(b"k", b"%d" % i, request_id=i))
    h.settle()
    b = restarted("b", h.stores["b"], h.chain)
    with pytest.raises(HelloRefused) as refused:
        b.on_chain_hello(0, 1, "a")  # its predecessor waits...
    assert refused.value.code == ErrorCode.REJECTED
    assert "checking its successor" in refused.value.message
    resend = b.on_successor_ready(1, 2)  # ... until c is known not to be ahead
    assert b.verified and not b.left and seqs_of(resend) == []
    mtype, body = wire.decode(b.on_chain_hello(0, 1, "a"))
    assert mtype == MessageType.CHAIN_HELLO_REPLY and body.applied_seq == 2


def test_a_restarted_tail_is_verified_at_once_and_trusts_no_old_frontier():
    store = FakeStore()
    h = Harness(["a", "b"], stores={"a": FakeStore(), "b": store})
    h.connect_all()
    h.submit(put(b"k", b"1", request_id=1))
    h.deliver_all("a", "b")
    h.commit("b")  # on b's disk, not on a's: not settled
    b = restarted("b", store, h.chain)
    assert b.verified and b.role == "tail"
    assert b.acked_seq == 0  # nothing it could acknowledge yet
    assert b.frontier() == 0
    b.on_chain_hello(0, 1, "a")
    actions = b.on_committed(1, 1)
    (ack,) = [x for x in actions if x.kind == TO_PREDECESSOR]
    assert wire.decode(ack.frame)[1].seq == 1


def test_a_sent_list_left_from_before_a_node_was_tail_is_not_resent():
    store = FakeStore()
    store.applied_seq = 5
    store.sent = {2: Entry(2, CID_A, 0, 2, int(Op.PUT), 0, b"k", b"v")}
    r = Replica("a", store, store.recover(), restarted=True)
    assert list(r.sent) == [] and r.acked_seq == 1
    r.on_config(make_chain(["a", "b"]))
    r.on_ack(1, 5)
    batch = r.take_batch()
    assert batch is not None and batch.prune_sent_upto == 5  # removed from disk too


def test_the_frontier_is_the_minimum_down_the_chain():
    h = Harness(["a", "b", "c"])
    h.connect_all()
    a, b, c = (h.replicas[n] for n in "abc")
    for i in range(1, 4):
        h.submit(put(b"k%d" % i, b"v", request_id=i))
    h.deliver_all("a", "b")
    h.commit("b")
    assert a.frontier() == 0 and b.frontier() == 0  # a has not committed
    h.commit("a")
    h.deliver_all("a", "b")
    assert b.pred_durable == 3 and b.frontier() == 3
    assert c.frontier() == 0
    h.deliver_all("b", "c")
    assert c.frontier() == 0  # c's own disk
    h.commit("c")
    assert c.frontier() == 3 and c.acked_seq == 3
    assert len(h.replies) == 3


def settled_put(second: str, store: FakeStore) -> Harness:
    """A chain a -> C{second} (over C{store}) that settled put k=1."""
    h = Harness(["a", second], stores={"a": FakeStore(), second: store})
    h.connect_all()
    h.submit(put(b"k", b"1", request_id=1))
    h.settle()
    return h


def test_a_restarted_tail_reads_nothing_unsettled_from_its_store():
    """Its store may hold a write no other disk has: no read before it settles."""
    store = FakeStore()
    h = settled_put("b", store)
    h.submit(put(b"k", b"2", request_id=2))
    h.deliver_all("a", "b")
    h.commit("b")  # seq 2 on b's disk only
    b = restarted("b", store, h.chain)
    (q,) = b.on_query(get(b"k"))
    assert reply_of(q)[2] == Status.UNAVAILABLE
    b.on_chain_hello(0, 1, "a")
    b.on_committed(1, 1)
    (q,) = b.on_query(get(b"k"))
    assert reply_of(q)[2] == Status.UNAVAILABLE  # seq 2 is not on a's disk yet
    b.on_committed(1, 2)
    (q,) = b.on_query(get(b"k"))
    assert reply_of(q)[1:] == (1, Status.OK, b"2")


def test_a_restarted_tail_with_a_joining_successor_is_not_verified():
    """The joining node may hold what the tail lost; it is checked once promoted."""
    store = FakeStore()
    t = Replica("t", store, restarted=True)
    t.on_config(Chain(0, 5, (member("t"),), (member("j"),)))
    assert t.successor_is_joining and not t.verified
    (err,) = t.on_client_update(put(b"k", b"v", request_id=1), "o")
    assert error_of(err)[0] == Status.UNAVAILABLE
    t.on_config(Chain(0, 6, (member("t"), member("j"))))
    assert t.on_successor_ready(6, 1) == [] and t.left


def test_a_joining_node_acknowledges_nothing_from_its_past():
    h = settled_put("m", FakeStore())
    m = h.replicas["m"]
    assert m.pred_durable == 1
    # m is taken out, then joins another chain after its tail t.
    actions = m.on_config(Chain(1, 3, (member("t"),), (member("m"),)))
    assert [x for x in actions if x.kind == TO_PREDECESSOR] == []
    assert m.pred_durable == 0
    # And a tail ignores what a joining node acks before its transfer is done.
    t = Replica("t", FakeStore())
    t.on_config(Chain(1, 3, (member("t"),), (member("m"),)))
    t.on_client_update(put(b"x", b"1", request_id=1))
    commit(t, t.store)
    assert t.on_ack(3, 100) == [] and t.succ_acked == 0 and [e.seq for e in t.sent] == [1]
    t.on_transfer_done(3, 0)
    t.on_ack(3, 1)
    assert t.succ_acked == 1 and list(t.sent) == []
