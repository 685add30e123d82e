"""
Tests for L{ckv.chain.service}: the Twisted adapters around the replica,
over in-memory transports (StringTransport, iosim), with a MemoryReactorClock
so that nothing real listens or connects, and commits inline.
"""

from __future__ import annotations

import struct
from typing import Any

import lmdb
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test import iosim

from ckv import wire
from ckv.chain.replica import Replica
from ckv.chain.service import NodeProtocol, NodeService, _Factory, session_sweep_interval
from ckv.config import ClusterConfig
from ckv.entry import Entry
from ckv.framing import error_text
from ckv.storage import Batch, Store, session_key
from ckv.wire import ErrorCode, MessageType, Op, Status
from tests.fakes import CID_A, CID_B, framed, make_chain, unframe

ADDR = IPv4Address("TCP", "127.0.0.1", 40000)


def make_node(tmp_path, request, name: str, reactor=None) -> NodeService:
    """A node set up by hand, as startService would, without sockets or threads."""
    node = NodeService(
        name=name,
        listen="tcp:0:interface=127.0.0.1",
        master="tcp:127.0.0.1:1",
        data_dir=str(tmp_path / name),
        reactor=reactor or MemoryReactorClock(),
        commit_inline=True,
    )
    node.store = Store(node.data_dir)
    node.store.open()
    node.replica = Replica(name, node.store, node.store.recover())

    def cleanup():
        if node._succ_service is not None:
            node._succ_service.stopService()
        node.store.close()

    request.addfinalizer(cleanup)
    return node


def config(*names: str, epoch: int = 1, version: int = 1) -> ClusterConfig:
    return ClusterConfig(version, (0,), (make_chain(names, epoch=epoch),))


def connect(node: NodeService) -> tuple[NodeProtocol, StringTransport]:
    proto = _Factory(NodeProtocol, node).buildProtocol(ADDR)
    tr = StringTransport(peerAddress=ADDR)
    proto.makeConnection(tr)
    return proto, tr


def received(tr: StringTransport) -> list:
    """Every frame written to C{tr} since the last call."""
    frames = unframe(tr.value())
    tr.clear()
    return frames


def hello(proto: NodeProtocol, tr: StringTransport, client_id: bytes = CID_A):
    proto.dataReceived(framed(wire.encode(MessageType.CLIENT_HELLO, client_id=client_id)))
    return received(tr)


def request(client_id=CID_A, request_id=1, op=Op.PUT, key=b"k", value=None, **kw) -> bytes:
    return framed(wire.request(client_id, 0, request_id, op, key, value=value, **kw))


def assert_error(tr: StringTransport, code: ErrorCode) -> str:
    (frame,) = received(tr)
    mtype, body = frame
    assert mtype == MessageType.ERROR
    assert body.code == code
    assert tr.disconnecting
    return error_text(body)


@pytest.fixture
def single(tmp_path, request) -> NodeService:
    node = make_node(tmp_path, request, "n1")
    node.on_config(config("n1"))
    return node


# -- one node, head and tail -------------------------------------------------------


def test_client_hello_gets_welcome(single):
    proto, tr = connect(single)
    ((mtype, body),) = hello(proto, tr)
    assert mtype == MessageType.WELCOME
    assert (bytes(body.name), body.epoch) == (b"n1", 1)
    assert single.client_channels[CID_A] is proto
    assert not tr.disconnecting


def test_put_then_get(single):
    proto, tr = connect(single)
    hello(proto, tr)
    proto.dataReceived(request(request_id=1, key=b"k", value=b"v"))
    ((mtype, body),) = received(tr)
    assert mtype == MessageType.REPLY
    assert (bytes(body.client_id), body.request_id, body.status) == (CID_A, 1, Status.OK)
    assert single.store.get(b"k") == b"v"
    proto.dataReceived(request(request_id=2, op=Op.GET, key=b"k"))
    ((mtype, body),) = received(tr)
    assert (mtype, body.request_id, body.status, bytes(body.value)) == (
        MessageType.REPLY, 2, Status.OK, b"v",
    )
    proto.dataReceived(request(request_id=3, op=Op.GET, key=b"nope"))
    ((_, body),) = received(tr)
    assert body.status == Status.NOT_FOUND
    stats = single.stats()
    assert stats["updates_decided"] == 1 and stats["queries_answered"] == 2
    assert stats["keys"] == 1


def test_replies_go_to_the_client_channel_not_the_relay(single):
    """A dispatcher relays requests; the reply goes to the client's own channel."""
    client, ctr = connect(single)
    hello(client, ctr)
    relay, rtr = connect(single)
    relay.dataReceived(request(request_id=1, key=b"k", value=b"v"))
    relay.dataReceived(request(request_id=2, op=Op.GET, key=b"k"))
    assert rtr.value() == b""
    assert [(m, b.request_id) for m, b in received(ctr)] == [
        (MessageType.REPLY, 1), (MessageType.REPLY, 2),
    ]


def test_query_without_client_channel_answered_on_origin(single):
    proto, tr = connect(single)
    proto.dataReceived(request(client_id=CID_B, request_id=4, op=Op.GET, key=b"k"))
    ((mtype, body),) = received(tr)
    assert mtype == MessageType.REPLY and body.request_id == 4
    assert body.status == Status.NOT_FOUND


def test_request_errors_are_replies_not_disconnects(single):
    proto, tr = connect(single)
    hello(proto, tr)
    proto.dataReceived(request(key=b"k" * (wire.MAX_KEY + 1), value=b"v"))
    ((mtype, body),) = received(tr)
    assert mtype == MessageType.REPLY and body.status == Status.TOO_LARGE
    assert not tr.disconnecting
    proto.dataReceived(request(request_id=2, key=b"k", value=b"v"))
    assert received(tr)[0][1].status == Status.OK


def test_retry_gets_recorded_status(single):
    proto, tr = connect(single)
    hello(proto, tr)
    cas = request(request_id=1, op=Op.CAS, key=b"k", value=b"v")  # only if absent
    proto.dataReceived(cas)
    proto.dataReceived(cas)
    statuses = [b.status for _, b in received(tr)]
    assert statuses == [Status.OK, Status.OK]
    assert single.replica.duplicates == 1


def test_client_channel_removed_on_disconnect(single):
    proto, tr = connect(single)
    hello(proto, tr)
    proto.connectionLost(None)
    assert CID_A not in single.client_channels


# -- bad input -------------------------------------------------------------------------


def test_garbage_closes_only_that_connection(single):
    good, gtr = connect(single)
    hello(good, gtr)
    bad, btr = connect(single)
    bad.dataReceived(framed(b"\x07garbage"))
    assert "version" in assert_error(btr, ErrorCode.BAD_VERSION)
    bad2, btr2 = connect(single)
    bad2.dataReceived(framed(bytes([wire.PROTOCOL_VERSION, MessageType.REQUEST]) + b"\x01\x02"))
    assert_error(btr2, ErrorCode.MALFORMED)
    # The others go on.
    good.dataReceived(request(request_id=1, key=b"k", value=b"v"))
    ((_, body),) = received(gtr)
    assert body.status == Status.OK
    assert not gtr.disconnecting


def test_short_frame(single):
    proto, tr = connect(single)
    proto.dataReceived(framed(b"\x01"))
    assert_error(tr, ErrorCode.MALFORMED)


def test_oversized_length_prefix(single):
    proto, tr = connect(single)
    proto.dataReceived(struct.pack(">I", wire.MAX_FRAME + 1) + b"xxxx")
    assert "exceeds" in assert_error(tr, ErrorCode.TOO_LARGE)


def test_unknown_message_type(single):
    proto, tr = connect(single)
    proto.dataReceived(framed(bytes([wire.PROTOCOL_VERSION, 200])))
    assert_error(tr, ErrorCode.UNKNOWN_TYPE)


def test_unexpected_message_type(single):
    proto, tr = connect(single)
    proto.dataReceived(framed(wire.encode(MessageType.ACK, epoch=1, seq=1)))
    assert_error(tr, ErrorCode.UNEXPECTED)


def test_updates_without_chain_hello(single):
    proto, tr = connect(single)
    entry = Entry(1, CID_A, 0, 1, int(Op.PUT), int(Status.OK), b"k", b"v")
    proto.dataReceived(framed(wire.encode(MessageType.UPDATES, epoch=1,
                                          entries=[entry.to_wire()])))
    assert_error(tr, ErrorCode.UNEXPECTED)
    assert single.replica.applied_seq == 0


def test_nothing_is_handled_after_a_protocol_error(single):
    proto, tr = connect(single)
    proto.dataReceived(framed(b"\x07garbage") + request(request_id=1, key=b"k", value=b"v"))
    assert_error(tr, ErrorCode.BAD_VERSION)  # one frame only: the ERROR
    assert single.replica.applied_seq == 0
    assert single.store.get(b"k") is None


def test_handler_exception_is_an_error_frame(single, monkeypatch):
    def boom(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(single.replica, "on_query", boom)
    proto, tr = connect(single)
    proto.dataReceived(request(op=Op.GET))
    assert_error(tr, ErrorCode.UNEXPECTED)


# -- chain membership ------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path, request) -> tuple[NodeService, NodeService]:
    head = make_node(tmp_path, request, "h")
    tail = make_node(tmp_path, request, "t")
    cfg = config("h", "t")
    tail.on_config(cfg)
    head.on_config(cfg)
    return head, tail


def chain_hello(name: str, epoch: int = 1, chain_id: int = 0) -> bytes:
    return framed(wire.encode(MessageType.CHAIN_HELLO, chain_id=chain_id, epoch=epoch,
                              name=name.encode(), committed_seq=0))


def test_chain_hello_from_wrong_name(pair):
    _, tail = pair
    proto, tr = connect(tail)
    proto.dataReceived(chain_hello("mallory"))
    assert "mallory" in assert_error(tr, ErrorCode.NOT_MEMBER)
    assert tail.pred_proto is None


@pytest.mark.parametrize("epoch", [0, 2])
def test_chain_hello_with_other_epoch(pair, epoch):
    _, tail = pair
    proto, tr = connect(tail)
    proto.dataReceived(chain_hello("h", epoch=epoch))
    assert_error(tr, ErrorCode.STALE_EPOCH)
    assert tail.pred_proto is None


def test_status_says_which_links_exist_and_which_are_up(pair):
    """A head has no predecessor link and a tail no successor link: "none", not "down"."""
    head, tail = pair
    assert (head.status()["predecessor_link"], tail.status()["successor_link"]) == ("none", "none")
    assert tail.status()["predecessor_link"] == "down"
    proto, tr = connect(tail)
    proto.dataReceived(chain_hello("h"))
    assert tail.status()["predecessor_link"] == "up"


def test_chain_hello_then_updates(pair):
    _, tail = pair
    client, ctr = connect(tail)
    hello(client, ctr)
    proto, tr = connect(tail)
    proto.dataReceived(chain_hello("h"))
    ((mtype, body),) = received(tr)
    assert mtype == MessageType.CHAIN_HELLO_REPLY and (body.epoch, body.applied_seq) == (1, 0)
    assert tail.pred_proto is proto
    entries = [Entry(i, CID_A, 0, i, int(Op.PUT), int(Status.OK), b"k", b"%d" % i).to_wire()
               for i in (1, 2)]
    proto.dataReceived(framed(wire.encode(MessageType.UPDATES, epoch=1, entries=entries)))
    # Committed inline, but not known to be on the predecessor's disk yet.
    assert received(ctr) == [] and received(tr) == []
    assert tail.store.get(b"k") == b"2"
    # Now it is: the tail replies to the client and acks upstream.
    proto.dataReceived(framed(wire.committed(1, 2)))
    assert [(m, b.request_id) for m, b in received(ctr)] == [
        (MessageType.REPLY, 1), (MessageType.REPLY, 2),
    ]
    ((mtype, body),) = received(tr)
    assert mtype == MessageType.ACK and body.seq == 2
    assert tail.store.get(b"k") == b"2"
    # A second predecessor link replaces the first.
    proto2, tr2 = connect(tail)
    proto2.dataReceived(chain_hello("h"))
    assert tail.pred_proto is proto2 and tr.disconnecting
    (_, reply), (mtype, ack) = received(tr2)
    assert reply.applied_seq == 2
    # The ack of the old link may be lost with it: it is sent again.
    assert mtype == MessageType.ACK and ack.seq == 2


def test_not_head_and_not_tail(pair):
    head, tail = pair
    proto, tr = connect(tail)
    proto.dataReceived(request(key=b"k", value=b"v"))
    ((_, body),) = received(tr)
    assert body.status == Status.NOT_HEAD
    proto, tr = connect(head)
    proto.dataReceived(request(op=Op.GET))
    ((_, body),) = received(tr)
    assert body.status == Status.NOT_TAIL
    assert not tr.disconnecting


def test_on_config_starts_a_successor_link(pair):
    head, _ = pair
    reactor = head.reactor
    (client,) = reactor.tcpClients
    assert client[:2] == ("127.0.0.1", make_chain(["h", "t"]).members[1].port)
    # An older configuration is ignored.
    head.on_config(config("t", "h", version=0))
    assert head.replica.role == "head"


def iosim_link(head: NodeService, tail: NodeService) -> iosim.IOPump:
    """Complete the head's pending connection to the tail in memory."""
    host, port, factory, _, _ = head.reactor.tcpClients[-1]
    cproto = factory.buildProtocol(IPv4Address("TCP", host, port))
    sproto = _Factory(NodeProtocol, tail).buildProtocol(ADDR)
    return iosim.connect(sproto, iosim.makeFakeServer(sproto), cproto,
                         iosim.makeFakeClient(cproto), greet=True)


def test_head_to_tail_over_iosim(pair):
    head, tail = pair
    pump = iosim_link(head, tail)
    assert head.succ_proto is not None
    assert tail.pred_proto is not None
    assert head.replica.forward_cursor == 0
    client, ctr = connect(tail)
    hello(client, ctr)
    writer, wtr = connect(head)
    for i in range(1, 4):
        writer.dataReceived(request(request_id=i, key=b"k%d" % i, value=b"v%d" % i))
    assert wtr.value() == b""  # replies come from the tail
    pump.flush()
    assert [(m, b.request_id, b.status) for m, b in received(ctr)] == [
        (MessageType.REPLY, i, Status.OK) for i in (1, 2, 3)
    ]
    assert dict(tail.store.items()) == {b"k%d" % i: b"v%d" % i for i in (1, 2, 3)}
    # The ack came back and the head pruned its sent list, on disk too.
    assert list(head.replica.sent) == [] and head.replica.acked_seq == 3
    assert head.store.stats()["sent_on_disk"] == 0
    client.dataReceived(request(request_id=4, op=Op.GET, key=b"k2"))
    ((_, body),) = received(ctr)
    assert bytes(body.value) == b"v2"

    # Cut the link: updates accumulate in sent, then the reconnection resends them.
    pump.clientIO.loseConnection()
    pump.flush()
    assert head.succ_proto is None and tail.pred_proto is None
    assert head.replica.forward_cursor is None
    writer.dataReceived(request(request_id=5, key=b"k5", value=b"v5"))
    assert [e.seq for e in head.replica.sent] == [4]
    assert tail.replica.applied_seq == 3
    assert len(head.reactor.tcpClients) == 1
    head.reactor.advance(5)  # the ClientService retries
    assert len(head.reactor.tcpClients) == 2
    pump = iosim_link(head, tail)
    pump.flush()
    assert tail.store.get(b"k5") == b"v5"
    assert [b.request_id for _, b in received(ctr)] == [5]
    assert list(head.replica.sent) == []


def test_successor_refusal_closes_the_link(tmp_path, request):
    head = make_node(tmp_path, request, "h")
    tail = make_node(tmp_path, request, "t")
    head.on_config(config("h", "t", epoch=2))
    tail.on_config(config("h", "t", epoch=1))  # behind
    pump = iosim_link(head, tail)
    pump.flush()
    assert head.succ_proto is None
    assert head.replica.forward_cursor is None
    assert pump.clientIO.disconnecting or pump.clientIO.disconnected


# -- heartbeats and the read lease ----------------------------------------------------


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_tail_serves_reads_only_while_it_holds_a_lease(tmp_path, request):
    from ckv.chain.service import MasterProtocol

    reactor = MemoryReactorClock()
    node = make_node(tmp_path, request, "n1", reactor=reactor)
    mono = FakeMonotonic()
    node.clock = mono
    node.replica = Replica("n1", node.store, node.store.recover(), lease_ok=node.holds_lease)
    node.on_config(config("n1"))
    proto, tr = connect(node)
    hello(proto, tr)

    def query():
        proto.dataReceived(framed(wire.request(CID_A, 0, 7, Op.GET, b"k")))
        ((mtype, body),) = received(tr)
        assert mtype == MessageType.REPLY
        return body.status

    assert query() == Status.UNAVAILABLE  # no lease yet

    mp = MasterProtocol(node)
    mt = StringTransport()
    mp.makeConnection(mt)  # sends REGISTER, which counts as a heartbeat
    assert [f[0] for f in unframe(mt.value())] == [MessageType.REGISTER]
    mt.clear()
    mono.now += 0.5  # the reply arrives later; the lease counts from the send
    mp.dataReceived(framed(wire.encode(MessageType.HEARTBEAT_REPLY, lease_ms=3000,
                                       interval_ms=500)))  # fmt: skip
    assert node.holds_lease()
    assert query() == Status.NOT_FOUND  # served
    mono.now = 1000.0 + 3.0 + 0.01  # 3 s after the REGISTER left
    assert not node.holds_lease()
    assert query() == Status.UNAVAILABLE

    # The node beats at the interval the master asked for.
    node._start_heartbeats(node.heartbeat_interval)
    request.addfinalizer(lambda: node._heartbeat_loop.stop())
    reactor.advance(0.5)
    reactor.advance(0.5)
    beats = [f for f in unframe(mt.value()) if f[0] == MessageType.HEARTBEAT]
    assert len(beats) == 2 and beats[0][1].name == b"n1"
    # Their replies renew the lease, counted from each send.
    mono.now += 1.0
    mp.dataReceived(framed(wire.encode(MessageType.HEARTBEAT_REPLY, lease_ms=3000,
                                       interval_ms=500)))  # fmt: skip
    assert node.holds_lease()
    assert query() == Status.NOT_FOUND


def test_a_hello_reply_from_an_older_epoch_drops_the_link(tmp_path, request):
    """The configuration moved while our hello was in flight: retry, don't sit idle."""
    head = make_node(tmp_path, request, "h")
    tail = make_node(tmp_path, request, "t")
    c1 = config("h", "t", epoch=1, version=1)
    tail.on_config(c1)
    head.on_config(c1)
    host, port, factory, _, _ = head.reactor.tcpClients[-1]
    cproto = factory.buildProtocol(IPv4Address("TCP", host, port))
    ctr = StringTransport()
    cproto.makeConnection(ctr)
    sproto, str_ = connect(tail)
    sproto.dataReceived(ctr.value())
    reply = str_.value()  # CHAIN_HELLO_REPLY at epoch 1, still in flight
    c2 = config("h", "t", epoch=2, version=2)
    head.on_config(c2)
    tail.on_config(c2)
    cproto.dataReceived(reply)
    assert head.succ_proto is None
    assert ctr.disconnecting  # the ClientService reconnects with a hello at epoch 2


# -- session expiry -----------------------------------------------------------------


def request_frame(client_id: bytes, request_id: int, key: bytes, value: bytes) -> bytes:
    return request(client_id=client_id, request_id=request_id, key=key, value=value)


def test_expire_sessions_deletes_idle_sessions(tmp_path, request):
    now = [1_000_000.0]
    node = make_node(tmp_path, request, "n1")
    node.session_ttl = 100.0
    node.store.clock = lambda: now[0]
    node.on_config(config("n1"))
    proto, tr = connect(node)
    hello(proto, tr)
    proto.dataReceived(request_frame(CID_A, 1, b"k", b"v"))
    now[0] += 50
    proto.dataReceived(request_frame(CID_B, 1, b"j", b"w"))
    skey_a, skey_b = session_key(CID_A, 0), session_key(CID_B, 0)
    assert node.store.session(skey_a) and node.store.session(skey_b)
    now[0] += 60
    d = node.expire_sessions()
    assert d.result == 1
    assert node.store.session(skey_a) is None
    assert node.store.session(skey_b) == (1, Status.OK)
    assert node.stats()["sessions_expired"] == 1
    assert node.store.get(b"k") == b"v"


def test_the_sweeper_runs_every_tenth_of_the_ttl(tmp_path):
    reactor = MemoryReactorClock()
    now = [1_000_000.0]
    node = NodeService(
        name="n1",
        listen="tcp:0:interface=127.0.0.1",
        master="tcp:127.0.0.1:1",
        data_dir=str(tmp_path / "n1"),
        reactor=reactor,
        commit_inline=True,
        session_ttl=100.0,
        wall_clock=lambda: now[0],
    )
    node.startService()
    try:
        node.store.commit(Batch([Entry(1, CID_A, 0, 1, int(Op.PUT), 0, b"k", b"v")]))
        now[0] += 101
        reactor.advance(9.9)
        assert node.store.session(session_key(CID_A, 0)) is not None
        reactor.advance(0.2)  # 10 s: a tenth of the TTL
        assert node.store.session(session_key(CID_A, 0)) is None
    finally:
        node.stopService()
    assert [session_sweep_interval(t) for t in (5, 100, 86400)] == [1.0, 10.0, 600.0]


def test_sweep_chunks_and_commits_take_turns(tmp_path, request, monkeypatch):
    """
    A sweep chunk never runs while a commit is being written, nor a commit
    while a chunk is (a failed commit may then grow the map, which LMDB
    allows only with no write transaction open); under load they alternate.
    """
    from twisted.internet.defer import Deferred

    from ckv.chain import service as service_module

    monkeypatch.setattr(service_module, "SWEEP_CHUNK", 1)
    now = [1_000_000.0]
    node = make_node(tmp_path, request, "n1")
    node.session_ttl = 100.0
    node.store.clock = lambda: now[0]
    node.on_config(config("n1"))
    node.store.commit(Batch([Entry(i, CID_B, i, 1, int(Op.PUT), 0, b"x", b"v") for i in (1, 2)]))
    now[0] += 200
    writes: list[tuple[str, Any, tuple, Deferred]] = []

    def store_call(f, *args):
        d: Deferred = Deferred()
        writes.append((f.__name__, f, args, d))
        return d

    def finish(i: int) -> None:
        _, f, args, d = writes[i]
        d.callback(f(*args))

    node._store_call = store_call  # type: ignore[method-assign]
    proto, tr = connect(node)
    hello(proto, tr)
    done = node.expire_sessions()
    assert [w[0] for w in writes] == ["expire_sessions"]
    proto.dataReceived(request_frame(CID_A, 1, b"k", b"v"))
    assert [w[0] for w in writes] == ["expire_sessions"]  # the commit waits
    finish(0)
    assert [w[0] for w in writes] == ["expire_sessions", "commit"]
    proto.dataReceived(request_frame(CID_A, 2, b"k", b"w"))
    finish(1)  # the commit ends: the sweep's turn, the new update waits
    assert [w[0] for w in writes] == ["expire_sessions", "commit", "expire_sessions"]
    finish(2)
    assert [w[0] for w in writes][3] == "commit"
    finish(3)
    node.reactor.advance(0)
    while not done.called:
        assert writes[-1][3].called is False
        finish(len(writes) - 1)
        node.reactor.advance(0)
    assert done.result == 2
    assert node.store.get(b"k") == b"w"


def sweep_under_checkpoints(tmp_path, request, monkeypatch, busy: list[bool]) -> tuple:
    """
    A node holding one session older than its TTL, and the sweep started
    for it; a checkpoint is being written as long as C{busy[0]}.
    """
    monkeypatch.setattr(Store, "checkpointing", property(lambda self: busy[0]))
    now = [1_000_000.0]
    node = make_node(tmp_path, request, "n1")
    node.session_ttl = 100.0
    node.store.clock = lambda: now[0]
    node.on_config(config("n1"))
    node.store.commit(Batch([Entry(1, CID_A, 0, 1, int(Op.PUT), 0, b"k", b"v")]))
    now[0] += 200
    return node, node.expire_sessions()


def test_a_sweep_chunk_waits_for_a_checkpoint_in_progress(tmp_path, request, monkeypatch):
    """
    A chunk's write transaction would wait for the checkpoint's, and every
    commit behind it: it runs once the checkpoint is over; commits go on.
    """
    from ckv.chain.service import SWEEP_RETRY

    busy = [True]
    node, done = sweep_under_checkpoints(tmp_path, request, monkeypatch, busy)
    node.reactor.advance(SWEEP_RETRY)
    assert not done.called and not node._sweeping
    retry = node._sweep_retry
    assert retry is not None and retry.active()
    proto, tr = connect(node)
    hello(proto, tr)
    proto.dataReceived(request_frame(CID_B, 1, b"j", b"w"))
    assert node.store.get(b"j") == b"w"
    assert node._sweep_retry is retry  # the commit's end armed no second timer
    busy[0] = False
    node.reactor.advance(SWEEP_RETRY)
    assert done.result == 1
    assert node.store.session(session_key(CID_A, 0)) is None


def test_checkpoints_back_to_back_hold_a_sweep_chunk_back_for_a_while_only(
    tmp_path, request, monkeypatch
):
    """When the disk cannot keep up, checkpoints never stop: the chunk runs anyway."""
    from ckv.chain.service import SWEEP_HOLD_MAX, SWEEP_RETRY

    node, done = sweep_under_checkpoints(tmp_path, request, monkeypatch, [True])
    tries = round(SWEEP_HOLD_MAX / SWEEP_RETRY)
    node.reactor.pump([SWEEP_RETRY] * (tries - 2))
    assert not done.called
    node.reactor.pump([SWEEP_RETRY] * 4)
    assert done.result == 1


def test_a_stopping_node_drops_a_held_sweep(tmp_path, monkeypatch):
    """No chunk and no timer outlive the stop; whoever waits for the sweep is answered."""
    monkeypatch.setattr(Store, "checkpointing", property(lambda self: True))
    node = started_node(tmp_path, in_thread=None)
    done = node.expire_sessions()
    retry = node._sweep_retry
    assert retry is not None and retry.active() and not done.called
    stopped = node.stopService()
    assert stopped.called and not retry.active()
    assert done.result == 0
    # Neither a commit nor a chunk that ends after the stop starts anything.
    assert node._sweep_step() is False
    node._sweeping = True
    node._swept((0, b"the next key"))
    node.reactor.advance(1.0)
    assert node._sweep_retry is retry and not node._sweeping


def test_a_sweep_held_back_by_a_state_transfer_goes_on_when_it_ends(tmp_path, request):
    """An idle joining node: no commit ends to start the sweep, so the transfer's end does."""
    from ckv.config import Chain
    from ckv.storage import _SESSION
    from tests.fakes import member

    node = make_node(tmp_path, request, "j")
    node.session_ttl = 100.0
    node.on_config(ClusterConfig(1, (0,), (Chain(0, 4, (member("t"),), (member("j"),)),)))
    proto, tr = connect(node)
    proto.dataReceived(framed(wire.encode(MessageType.CHAIN_HELLO, chain_id=0, epoch=4,
                                          name=b"t", committed_seq=0)))
    received(tr)

    def snapshot(phase: int, chunk: int, records: list) -> bytes:
        return framed(wire.encode(MessageType.SNAPSHOT, epoch=4, phase=phase, seq=1,
                                  chunk=chunk, records=records))

    proto.dataReceived(snapshot(wire.SNAPSHOT_BEGIN, 0, []))
    assert node.receiving_snapshot
    done = node.expire_sessions()
    stale = {"db": wire.SNAPSHOT_DB_SESSIONS, "key": session_key(CID_A, 0),
             "value": _SESSION.pack(1, int(Status.OK), 0)}  # recorded at time 0
    proto.dataReceived(snapshot(wire.SNAPSHOT_DATA, 1, [stale]))
    assert not done.called
    proto.dataReceived(snapshot(wire.SNAPSHOT_END, 2, []))
    assert not node.receiving_snapshot
    assert done.result == 1
    assert node.store.session(session_key(CID_A, 0)) is None


def test_a_failed_sweep_is_given_up_and_the_node_goes_on(tmp_path, request, monkeypatch):
    """A sweep whose transaction fails (map full, store closing) ends; commits go on."""
    node = make_node(tmp_path, request, "n1")
    node.session_ttl = 100.0
    node.on_config(config("n1"))

    def broken(*args: Any) -> Any:
        raise lmdb.MapFullError("full")

    monkeypatch.setattr(node.store, "expire_sessions", broken)
    d = node.expire_sessions()
    assert d.result == 0
    assert node._sweep_start is None and not node._sweeping
    proto, tr = connect(node)
    hello(proto, tr)
    proto.dataReceived(request_frame(CID_A, 1, b"k", b"v"))
    assert node.store.get(b"k") == b"v"
    monkeypatch.undo()
    assert node.expire_sessions().result == 0  # a later sweep starts afresh


def test_a_joining_node_that_holds_its_snapshot_refuses_another(tmp_path, request):
    """
    Once it has told the master it caught up, the master may promote it any
    moment: a second transfer (the tail reconnected) must not wipe it.
    """
    from ckv.config import Chain
    from tests.fakes import member

    node = make_node(tmp_path, request, "j")
    node.store.commit(Batch(entries=[Entry(1, CID_A, 0, 1, int(Op.PUT), 0, b"k", b"v")]))
    joining = Chain(0, 4, (member("t"),), (member("j"),))
    node.on_config(ClusterConfig(1, (0,), (joining,)))
    assert node.replica.role == "joining"
    proto, tr = connect(node)
    proto.dataReceived(framed(wire.encode(MessageType.CHAIN_HELLO, chain_id=0, epoch=4,
                                          name=b"t", committed_seq=0)))
    received(tr)
    begin = framed(wire.encode(MessageType.SNAPSHOT, epoch=4, phase=wire.SNAPSHOT_BEGIN,
                               seq=1, chunk=0, records=[]))
    node.joined = (0, 4)
    proto.dataReceived(begin)
    assert "already holds a snapshot" in assert_error(tr, ErrorCode.REJECTED)
    assert node.store.get(b"k") == b"v" and not node.receiving_snapshot
    assert node.joined == (0, 4)
    # A snapshot of an older epoch does not count: a new transfer starts.
    node.joined = (0, 3)
    proto2, tr2 = connect(node)
    proto2.dataReceived(framed(wire.encode(MessageType.CHAIN_HELLO, chain_id=0, epoch=4,
                                           name=b"t", committed_seq=0)))
    proto2.dataReceived(begin)
    assert node.joined is None and node.receiving_snapshot


class HeldThreads:
    """A NodeService C{in_thread}: each call waits until the test runs it."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Any]] = []

    def __call__(self, f: Any) -> Any:
        from twisted.internet.defer import Deferred

        d: Deferred = Deferred()
        self.calls.append((f, d))
        return d

    def run_all(self) -> None:
        calls, self.calls = self.calls, []
        for f, d in calls:
            d.callback(f())


def started_node(tmp_path, in_thread: Any) -> NodeService:
    node = NodeService(
        name="n1",
        listen="tcp:0:interface=127.0.0.1",
        master="tcp:127.0.0.1:1",
        data_dir=str(tmp_path / "n1"),
        reactor=MemoryReactorClock(),
        commit_inline=True,
        in_thread=in_thread,
    )
    node.startService()
    return node


def test_digest_runs_off_the_reactor_and_holds_the_store_open(tmp_path):
    """
    The admin digest is computed through C{in_thread} (a thread in a real
    node), from one snapshot; stopping the node waits for a digest still
    running before closing the store.
    """
    threads = HeldThreads()
    node = started_node(tmp_path, threads)
    node.store.commit(Batch([Entry(1, CID_A, 1, 1, int(Op.PUT), 0, b"k", b"v")]))
    d = node.digest()
    assert not d.called and len(threads.calls) == 1
    stopped = node.stopService()
    assert not stopped.called and node.store.env is not None  # still open for the reader
    threads.run_all()
    keys, sha, seq = d.result
    assert (keys, seq) == (1, 1) and len(sha) == 64
    assert stopped.called and node.store.env is None



def test_a_full_map_grows_only_once_the_digests_are_done(single, monkeypatch):
    """
    LMDB resizes its map only with no transaction open in the process: with
    a digest reading on a thread, a commit that finds the map full waits
    (no commit is tried meanwhile), then the map grows and the write goes
    through.
    """
    import lmdb

    threads = HeldThreads()
    single._in_thread = threads
    single.running = True
    digest = single.digest()
    store = single.store
    real_commit, grown, commits = store.commit, [], []

    def commit(batch):
        commits.append(batch)
        if not grown:
            raise lmdb.MapFullError("full")
        real_commit(batch)

    monkeypatch.setattr(store, "commit", commit)
    monkeypatch.setattr(store, "grow", lambda: grown.append(True))
    proto, tr = connect(single)
    hello(proto, tr)
    proto.dataReceived(request(request_id=1, key=b"k", value=b"v"))
    assert len(commits) == 1 and not grown and received(tr) == []
    proto.dataReceived(request(request_id=2, key=b"k2", value=b"v"))
    assert len(commits) == 1  # nothing is tried while the digest reads
    threads.run_all()
    assert digest.called
    assert grown == [True] and len(commits) == 2
    replies = [body.request_id for _, body in received(tr)]
    assert replies == [1, 2]
    assert store.get(b"k") == b"v" and store.get(b"k2") == b"v"


def test_no_digest_starts_once_the_node_is_stopping(tmp_path):
    """
    While a stop waits for a running digest, a new one (from an admin
    connection still open) is refused: the store is about to close.
    """
    threads = HeldThreads()
    node = started_node(tmp_path, threads)
    first = node.digest()
    stopped = node.stopService()
    refused = node.digest()
    assert "n1 is stopping" in refused.result.getErrorMessage()
    refused.addErrback(lambda f: None)
    assert len(threads.calls) == 1 and not stopped.called
    threads.run_all()
    assert first.result[0] == 0
    assert stopped.called and node.store.env is None


def test_a_failed_log_write_stops_the_node(tmp_path, request, monkeypatch):
    """
    A failed write or sync of the write-ahead log leaves the disk in an
    unknown state: the node stops (logged as critical) rather than go on, so
    the master takes it out and a restart recovers from its log.
    """
    import ckv.wal

    reactor = MemoryReactorClock()
    reactor.running = True
    stopped: list[bool] = []
    monkeypatch.setattr(reactor, "stop", lambda: stopped.append(True))
    node = make_node(tmp_path, request, "n1", reactor=reactor)
    node.on_config(config("n1"))
    proto, tr = connect(node)
    hello(proto, tr)

    def broken(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ckv.wal, "_datasync", broken)
    proto.dataReceived(request_frame(CID_A, 1, b"k", b"v"))
    assert stopped == [True]
    assert node.store.get(b"k") is None
