"""
Tests of ckv.client: the request engine alone, the Twisted client against a
fake dispatcher and fake tails over iosim, and the blocking client over real
loopback sockets.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

from construct import Container
from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory
from twisted.protocols.basic import Int32StringReceiver
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from ckv import wire
from ckv.client import BlockingClient, Client, connect, fetch_config
from ckv.client.blocking import call_blocking, ensure_running, reactor_thread
from ckv.client.engine import RequestEngine, request_op, with_epoch
from ckv.config import Chain, ClusterConfig, Member, slot_of
from ckv.errors import CkvError, RequestError, TooLarge, Unavailable
from ckv.wire import MessageType, Op, Status

DISPATCHER = "tcp:127.0.0.1:7200"
HEAD = Member("h", "127.0.0.1", 7001)
T1 = Member("t1", "127.0.0.1", 7002)
T2 = Member("t2", "127.0.0.1", 7003)


def make_config(version: int, *members: Member, epoch: int = 1) -> ClusterConfig:
    """One chain (id 0) owning all 16 slots."""
    return ClusterConfig(version, (0,) * 16, (Chain(0, epoch, tuple(members)),))


# -- fake servers -------------------------------------------------------------


class FakeCluster:
    """
    The state behind the fake dispatcher and tails: a dict store with the
    exactly-once table, the requests seen, the connected peers.

    With C{auto} set, every REQUEST is executed and answered via the tail of
    its key's chain; otherwise the test answers with L{reply}.
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.auto = True
        self.welcome = True
        self.store: dict[bytes, bytes] = {}
        self.done: dict[tuple[bytes, int], tuple[int, Status, bytes]] = {}
        self.applied = 0
        self.requests: list[Container] = []
        #: REQUESTs sent straight to a node (direct mode): (node name, request).
        self.node_requests: list[tuple[str, Container]] = []
        self.dispatchers: list[DispatcherPeer] = []
        self.tails: dict[str, list[TailPeer]] = {}

    def push_config(self, config: ClusterConfig) -> None:
        self.config = config
        for d in self.dispatchers:
            if d.watching:
                d.sendString(config.to_frame())

    def tail_peer(self, client_id: bytes, key: bytes) -> TailPeer:
        chain = self.config.chain_for_key(key)
        assert chain is not None and chain.tail is not None
        peers = [
            p for p in self.tails.get(chain.tail.name, []) if p.client_id == client_id and p.alive
        ]
        assert peers, f"no reply channel from {chain.tail.name}"
        return peers[-1]

    def node_request(self, peer: TailPeer, req: Container) -> None:
        """A REQUEST that reached node C{peer} directly: act as a chain would."""
        self.node_requests.append((peer.name, req))
        chain = self.config.chain_for_key(req.key)
        assert chain is not None
        if req.op == Op.GET:
            if chain.tail is None or chain.tail.name != peer.name:
                self.reply(req, Status.NOT_TAIL, peer.name.encode() + b" is not the tail", via=peer)
            elif self.auto:
                self.reply(req, *self.execute(req), via=peer)
        elif chain.head is None or chain.head.name != peer.name:
            self.reply(req, Status.NOT_HEAD, peer.name.encode() + b" is not the head", via=peer)
        elif req.epoch and req.epoch != chain.epoch:
            self.reply(req, Status.STALE_EPOCH, b"stale", via=peer)
        elif self.auto:
            status, value = self.execute(req)
            self.reply(req, status, value)

    def reply(self, req: Container, status: Status, value: bytes = b"", via: Any = None) -> None:
        peer = via if via is not None else self.tail_peer(req.client_id, req.key)
        peer.sendString(wire.reply(req.client_id, req.request_id, status, value))

    def execute(self, req: Container) -> tuple[Status, bytes]:
        op = Op(req.op)
        if op is Op.GET:
            if req.key in self.store:
                return Status.OK, self.store[req.key]
            return Status.NOT_FOUND, b""
        seen = self.done.get((req.client_id, req.lane))
        if seen is not None and seen[0] == req.request_id:
            return seen[1], seen[2]
        present = req.key in self.store
        status = Status.OK
        if op is Op.PUT:
            self.store[req.key] = req.value
        elif op is Op.DELETE:
            status = Status.OK if present else Status.NOT_FOUND
            self.store.pop(req.key, None)
        elif op is Op.CAS:
            if req.flags & wire.FLAG_HAS_EXPECTED:
                match = present and self.store[req.key] == req.expected
            else:
                match = not present
            if not match:
                status = Status.CAS_FAILED
            elif req.flags & wire.FLAG_HAS_VALUE:
                self.store[req.key] = req.value
            else:
                self.store.pop(req.key, None)
        if status is not Status.CAS_FAILED:
            self.applied += 1
        self.done[(req.client_id, req.lane)] = (req.request_id, status, b"")
        return status, b""


class FakePeer(Int32StringReceiver):
    MAX_LENGTH = wire.MAX_FRAME

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.alive = False
        self.frames: list[tuple[int, Container]] = []

    def connectionMade(self) -> None:
        self.alive = True

    def connectionLost(self, reason: Any = None) -> None:
        self.alive = False

    def stringReceived(self, data: bytes) -> None:
        mtype, body = wire.decode(data)
        self.frames.append((mtype, body))
        self.frame(mtype, body)

    def frame(self, mtype: int, body: Container) -> None:
        raise NotImplementedError


class DispatcherPeer(FakePeer):
    watching = False

    def frame(self, mtype: int, body: Container) -> None:
        if mtype == MessageType.WATCH:
            self.watching = True
            self.cluster.dispatchers.append(self)
            self.sendString(self.cluster.config.to_frame())
        elif mtype == MessageType.REQUEST:
            self.cluster.requests.append(body)
            if self.cluster.auto:
                status, value = self.cluster.execute(body)
                self.cluster.reply(body, status, value)


class TailPeer(FakePeer):
    client_id: bytes | None = None

    def __init__(self, cluster: FakeCluster, name: str) -> None:
        super().__init__(cluster)
        self.name = name

    def frame(self, mtype: int, body: Container) -> None:
        if mtype == MessageType.CLIENT_HELLO:
            self.client_id = body.client_id
            self.cluster.tails.setdefault(self.name, []).append(self)
            if self.cluster.welcome:
                self.send_welcome()
        elif mtype == MessageType.REQUEST:
            self.cluster.node_request(self, body)

    def send_welcome(self) -> None:
        self.sendString(wire.encode(MessageType.WELCOME, name=self.name.encode(), epoch=1))


class FakeNet:
    """Endpoint strings -> fake servers, connected with iosim pumps."""

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.servers: dict[str, Callable[[], FakePeer]] = {}
        self.pumps: list[iosim.IOPump] = []
        self.connects: list[str] = []

    def endpoint(self, description: str) -> FakeEndpoint:
        return FakeEndpoint(self, description)

    def flush(self) -> None:
        for _ in range(1000):
            moved = False
            for pump in list(self.pumps):
                if pump.pump(advanceClock=False):
                    moved = True
            if not moved:
                return
        raise AssertionError("the fake network never settles")

    def peers(self, kind: type[FakePeer]) -> list[FakePeer]:
        return [p.server for p in self.pumps if isinstance(p.server, kind)]


class FakeEndpoint:
    def __init__(self, net: FakeNet, description: str) -> None:
        self.net = net
        self.description = description

    def connect(self, factory: Factory) -> Deferred[Any]:
        self.net.connects.append(self.description)
        make = self.net.servers.get(self.description)
        if make is None:
            return fail(ConnectionRefusedError(self.description))
        client = factory.buildProtocol(None)
        server = make()
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=self.net.clock,
        )
        self.net.pumps.append(pump)
        return succeed(client)


# -- the engine alone ---------------------------------------------------------


class FakePath:
    def __init__(self) -> None:
        self.up = True
        self.sent: list[Container] = []

    def transmit(self, key: bytes, frame: bytes) -> bool:
        if not self.up:
            return False
        self.sent.append(wire.decode(frame)[1])
        return True


class EngineTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.path = FakePath()
        self.engine = RequestEngine(self.clock, b"C" * 16, self.path)

    def submit(self, op: Op, key: bytes = b"k", **kw: Any) -> Deferred[Any]:
        return self.engine.submit(op, key, timeout=kw.pop("timeout", 3.0), **kw)

    def test_lanes_reused_only_after_completion(self) -> None:
        """
        Concurrent updates get distinct lanes; a lane is free again only once
        its update completed; gets use lane 0; request ids always increase.
        """
        a = self.submit(Op.PUT, value=b"1")
        b = self.submit(Op.PUT, value=b"2")
        g = self.submit(Op.GET)
        self.assertEqual([r.lane for r in self.path.sent], [1, 2, 0])
        self.engine.reply_received(self.path.sent[0].request_id, Status.OK, b"")
        self.assertEqual(self.successResultOf(a), (Status.OK, b""))
        c = self.submit(Op.DELETE)
        d = self.submit(Op.CAS, value=b"x")
        self.assertEqual([r.lane for r in self.path.sent[3:]], [1, 3])
        ids = [r.request_id for r in self.path.sent]
        self.assertEqual(ids, sorted(set(ids)))
        self.assertEqual(self.engine.lanes_in_use, {1, 2, 3})
        for r in self.path.sent[1:]:
            self.engine.reply_received(r.request_id, Status.OK, b"")
        for x in (b, g, c, d):
            self.successResultOf(x)
        self.assertEqual(self.engine.lanes_in_use, set())
        self.assertEqual(self.engine.outstanding, 0)

    def test_timeout_resends_then_unavailable(self) -> None:
        """
        Silence: the same frame (lane, request id) is resent each attempt
        interval; at the deadline the request fails with Unavailable and
        its lane is released; a late reply is then ignored.
        """
        d = self.submit(Op.PUT, value=b"v", timeout=3.0)
        self.clock.advance(0.999)
        self.assertNoResult(d)
        self.clock.advance(0.001)
        self.clock.advance(1.0)
        self.assertEqual(len(self.path.sent), 3)
        self.assertEqual({(r.lane, r.request_id) for r in self.path.sent}, {(1, 1)})
        self.clock.advance(1.0)
        self.failureResultOf(d, Unavailable)
        self.assertEqual(self.engine.lanes_in_use, set())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.engine.reply_received(1, Status.OK, b""))
        self.submit(Op.PUT, value=b"w")
        self.assertEqual((self.path.sent[-1].lane, self.path.sent[-1].request_id), (1, 2))

    def test_retryable_status_backs_off(self) -> None:
        """NOT_HEAD and friends: resend the same frame after a growing backoff."""
        d = self.submit(Op.PUT, value=b"v", timeout=10.0)
        self.engine.reply_received(1, Status.NOT_HEAD, b"moved")
        self.clock.advance(0.049)
        self.assertEqual(len(self.path.sent), 1)
        self.clock.advance(0.001)
        self.assertEqual(len(self.path.sent), 2)
        self.engine.reply_received(1, Status.UNAVAILABLE, b"")
        self.clock.advance(0.05)
        self.assertEqual(len(self.path.sent), 2)
        self.clock.advance(0.05)
        self.assertEqual(len(self.path.sent), 3)
        self.assertEqual({(r.lane, r.request_id) for r in self.path.sent}, {(1, 1)})
        self.engine.reply_received(1, Status.OK, b"")
        self.assertEqual(self.successResultOf(d), (Status.OK, b""))

    def test_waits_for_path(self) -> None:
        """While the path is down nothing is sent; path_ready sends in order."""
        self.path.up = False
        d1 = self.submit(Op.PUT, value=b"1")
        d2 = self.submit(Op.GET)
        self.assertEqual(self.path.sent, [])
        self.path.up = True
        self.engine.path_ready()
        self.assertEqual([r.request_id for r in self.path.sent], [1, 2])
        self.engine.path_lost(lambda key: True)
        self.assertEqual([r.request_id for r in self.path.sent], [1, 2, 1, 2])
        self.engine.reply_received(2, Status.NOT_FOUND, b"")
        self.engine.reply_received(1, Status.OK, b"")
        self.successResultOf(d1)
        self.successResultOf(d2)

    def test_cancel_releases_lane(self) -> None:
        d = self.submit(Op.PUT, value=b"1")
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.engine.outstanding, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_reactor_timer_for_many_requests(self) -> None:
        """
        Many outstanding requests share one reactor call (for the earliest
        deadline), yet each is resent at its own time, and none is left
        once every request is answered.
        """
        ds = [self.submit(Op.PUT, key=b"k%d" % i, value=b"v") for i in range(50)]
        self.clock.advance(0.5)
        ds += [self.submit(Op.PUT, key=b"l%d" % i, value=b"v") for i in range(50)]
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(len(self.path.sent), 100)
        # The first 50 answered before their resend: only the others go again.
        for r in self.path.sent[:50]:
            self.engine.reply_received(r.request_id, Status.OK, b"")
        self.clock.advance(0.999)
        self.assertEqual(len(self.path.sent), 100)
        self.clock.advance(0.001)
        self.assertEqual([r.request_id for r in self.path.sent[100:]], list(range(51, 101)))
        # A retry after a backoff comes before the next resend of the rest.
        self.engine.reply_received(51, Status.NOT_HEAD, b"")
        self.clock.advance(0.05)
        self.assertEqual(self.path.sent[-1].request_id, 51)
        self.assertEqual(len(self.path.sent), 151)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        for r in self.path.sent[100:]:
            self.engine.reply_received(r.request_id, Status.OK, b"")
        for d in ds:
            self.successResultOf(d)
        self.assertEqual(self.engine.outstanding, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_timer_armed_while_waking_does_not_delay_an_earlier_one(self) -> None:
        """
        At t=1 the first request is resent and armed again for t=2; the
        second, due at t=1.2, is still resent at t=1.2.
        """
        self.submit(Op.PUT, value=b"1", timeout=10.0)
        self.clock.advance(0.2)
        self.submit(Op.PUT, key=b"j", value=b"2", timeout=10.0)
        self.clock.advance(0.8)
        self.assertEqual([r.request_id for r in self.path.sent], [1, 2, 1])
        self.clock.advance(0.2)
        self.assertEqual([r.request_id for r in self.path.sent], [1, 2, 1, 2])

    def test_an_action_that_raises_leaves_the_other_timers(self) -> None:
        """A resend that raises (a bug below the engine) does not stop the others' timers."""
        a = self.submit(Op.PUT, value=b"1", timeout=3.0)
        b = self.submit(Op.PUT, key=b"j", value=b"2", timeout=3.0)
        transmit = self.path.transmit

        def broken(key: bytes, frame: bytes) -> bool:
            self.path.transmit = transmit
            raise RuntimeError("transport bug")

        self.path.transmit = broken  # type: ignore[method-assign]
        self.assertRaises(RuntimeError, self.clock.advance, 1.0)
        self.clock.advance(2.0)
        self.failureResultOf(b, Unavailable)
        self.assertNoResult(a)  # its own resend failed: as before, it waits for a reply
        self.engine.reply_received(1, Status.OK, b"")
        self.successResultOf(a)

    def test_finished_requests_are_not_kept_by_their_timers(self) -> None:
        """A request answered long before its resend time is not held by the timer heap."""
        for i in range(20):
            self.submit(Op.PUT, key=b"k%d" % i, value=b"v" * 1000)
        for r in self.path.sent[:19]:
            self.engine.reply_received(r.request_id, Status.OK, b"")
        held = [e[2] for e in self.engine._deadlines if e[2] is not None]
        self.assertEqual([p.request_id for p in held], [20])

    def test_fail_all_survives_a_callback_that_cancels_another_request(self) -> None:
        a = self.submit(Op.PUT, value=b"1")
        b = self.submit(Op.PUT, key=b"j", value=b"2")
        a.addErrback(lambda f: b.cancel())
        self.engine.fail_all(Unavailable("closed"))
        self.failureResultOf(b)
        self.assertEqual(self.engine.outstanding, 0)

    def test_expiry_among_many_timers(self) -> None:
        """Requests with different timeouts expire each at its own deadline."""
        short = self.submit(Op.PUT, value=b"1", timeout=0.3)
        long = self.submit(Op.PUT, key=b"j", value=b"2", timeout=3.0)
        self.clock.advance(0.299)
        self.assertNoResult(short)
        self.clock.advance(0.001)
        self.failureResultOf(short, Unavailable)
        self.assertNoResult(long)
        self.clock.advance(2.7)
        self.failureResultOf(long, Unavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_result_conversion(self) -> None:
        """
        With C{result}, the Deferred fires with the converted outcome; a
        conversion that raises fails it, and the request is over either way.
        """
        ok = self.submit(Op.GET, result=lambda r: r[1].upper())
        bad = self.submit(Op.GET, key=b"j", result=lambda r: 1 // 0)
        self.engine.reply_received(1, Status.OK, b"abc")
        self.engine.reply_received(2, Status.OK, b"abc")
        self.assertEqual(self.successResultOf(ok), b"ABC")
        self.failureResultOf(bad, ZeroDivisionError)
        self.assertEqual(self.engine.outstanding, 0)


# -- the Twisted client against fakes ----------------------------------------


class FakeNetTestCase(SynchronousTestCase):
    """Clients on a task.Clock against the fakes above (set up by subclasses)."""

    #: Open clients in direct mode.
    direct = False
    clock: task.Clock
    net: FakeNet

    def connect(self, timeout: float = 5.0) -> Client:
        d = connect(
            self.clock, DISPATCHER, timeout, endpoint_factory=self.net.endpoint, direct=self.direct
        )
        self.net.flush()
        client = self.successResultOf(d)
        self.addCleanup(self.close, client)
        return client

    def close(self, client: Client) -> None:
        d = client.close()
        self.net.flush()
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def run_op(self, d: Deferred[Any]) -> Any:
        self.net.flush()
        return self.successResultOf(d)


class ClientTests(FakeNetTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.net = FakeNet(self.clock)
        self.cluster = FakeCluster(make_config(1, HEAD, T1))
        self.net.servers[DISPATCHER] = lambda: DispatcherPeer(self.cluster)
        for m in (T1, T2):
            self.net.servers[m.endpoint()] = lambda name=m.name: TailPeer(self.cluster, name)


    def dispatcher_peer(self) -> DispatcherPeer:
        return [p for p in self.net.peers(DispatcherPeer) if p.alive][-1]

    def test_connect(self) -> None:
        """connect() fires once the config came and the tail welcomed us."""
        client = self.connect()
        self.assertEqual(client.config, self.cluster.config)
        self.assertEqual(self.net.connects, [DISPATCHER, T1.endpoint()])
        (hello,) = self.cluster.tails["t1"]
        self.assertEqual(hello.client_id, client.client_id)
        self.assertEqual(self.dispatcher_peer().frames[0][1].name, b"client")

    def test_result_mapping(self) -> None:
        """put/get/delete/cas return what the contract says."""
        c = self.connect()
        self.assertIsNone(self.run_op(c.get(b"k")))
        self.assertIsNone(self.run_op(c.put(b"k", b"v")))
        self.assertEqual(self.run_op(c.get(b"k")), b"v")
        self.assertEqual(self.run_op(c.put(b"e", b"")), None)
        self.assertEqual(self.run_op(c.get(b"e")), b"")
        self.assertTrue(self.run_op(c.delete(b"k")))
        self.assertFalse(self.run_op(c.delete(b"k")))
        self.assertIsNone(self.run_op(c.get(b"k")))
        # cas: expected None = only if absent
        self.assertTrue(self.run_op(c.cas(b"k", None, b"1")))
        self.assertFalse(self.run_op(c.cas(b"k", None, b"2")))
        self.assertFalse(self.run_op(c.cas(b"k", b"0", b"2")))
        self.assertTrue(self.run_op(c.cas(b"k", b"1", b"2")))
        self.assertEqual(self.run_op(c.get(b"k")), b"2")
        # new None = delete on match
        self.assertTrue(self.run_op(c.cas(b"k", b"2", None)))
        self.assertIsNone(self.run_op(c.get(b"k")))
        flags = [(Op(r.op), r.flags) for r in self.cluster.requests if r.op == Op.CAS]
        self.assertEqual(
            flags,
            [
                (Op.CAS, wire.FLAG_HAS_VALUE),
                (Op.CAS, wire.FLAG_HAS_VALUE),
                (Op.CAS, wire.FLAG_HAS_VALUE | wire.FLAG_HAS_EXPECTED),
                (Op.CAS, wire.FLAG_HAS_VALUE | wire.FLAG_HAS_EXPECTED),
                (Op.CAS, wire.FLAG_HAS_EXPECTED),
            ],
        )
        self.assertTrue(all(r.epoch == 0 for r in self.cluster.requests))

    def test_out_of_order_pipelined(self) -> None:
        """Many requests in flight at once; replies in any order reach their callers."""
        c = self.connect()
        self.cluster.auto = False
        calls = []
        for i in range(60):
            if i % 3 == 0:
                calls.append(("put", c.put(b"k%d" % i, b"v")))
            else:
                calls.append(("get", c.get(b"k%d" % i)))
        self.net.flush()
        self.assertEqual(len(self.cluster.requests), 60)
        for _, d in calls:
            self.assertNoResult(d)
        order = list(self.cluster.requests)
        random.Random(7).shuffle(order)
        for req in order:
            if req.op == Op.GET:
                self.cluster.reply(req, Status.OK, b"value of " + req.key)
            else:
                self.cluster.reply(req, Status.OK)
        self.net.flush()
        for i, (kind, d) in enumerate(calls):
            if kind == "get":
                self.assertEqual(self.successResultOf(d), b"value of k%d" % i)
            else:
                self.assertIsNone(self.successResultOf(d))
        lanes = [r.lane for r in self.cluster.requests if r.op == Op.PUT]
        self.assertEqual(lanes, list(range(1, 21)))

    def test_error_reply_via_dispatcher(self) -> None:
        """An error REPLY on the dispatcher connection fails the request."""
        c = self.connect()
        self.cluster.auto = False
        d1 = c.put(b"k", b"v")
        d2 = c.get(b"k")
        self.net.flush()
        r1, r2 = self.cluster.requests
        via = self.dispatcher_peer()
        self.cluster.reply(r1, Status.BAD_REQUEST, b"bad key", via=via)
        self.cluster.reply(r2, Status.TOO_LARGE, b"too big", via=via)
        self.net.flush()
        e = self.failureResultOf(d1, RequestError).value
        self.assertEqual((e.status, e.message), (Status.BAD_REQUEST, "bad key"))
        e = self.failureResultOf(d2, TooLarge).value
        self.assertEqual(e.message, "too big")

    def test_the_empty_key_is_refused_client_side(self) -> None:
        """LMDB cannot store the empty key: every operation refuses it before sending."""
        c = self.connect()
        for d in (c.get(b""), c.put(b"", b"v"), c.delete(b""), c.cas(b"", None, b"v")):
            e = self.failureResultOf(d, RequestError).value
            self.assertEqual(e.status, Status.BAD_REQUEST)
            self.assertIn("empty key", e.message)
        self.net.flush()
        self.assertEqual(self.cluster.requests, [])

    def test_too_large_client_side(self) -> None:
        """Oversized keys and values fail with TooLarge, and nothing is sent."""
        c = self.connect()
        big = b"x" * (wire.MAX_VALUE + 1)
        for d in (
            c.get(b"k" * (wire.MAX_KEY + 1)),
            c.put(b"k", big),
            c.cas(b"k", big, b"v"),
            c.cas(b"k", None, big),
        ):
            self.failureResultOf(d, TooLarge)
        self.net.flush()
        self.assertEqual(self.cluster.requests, [])
        # The limits themselves are fine.
        self.run_op(c.put(b"k" * wire.MAX_KEY, b"x" * wire.MAX_VALUE))

    def test_timeout_unavailable(self) -> None:
        """No reply: resends of the same frame, then Unavailable at the deadline."""
        c = self.connect(timeout=3.0)
        self.cluster.auto = False
        d = c.put(b"k", b"v")
        self.net.flush()
        for _ in range(3):
            self.assertNoResult(d)
            self.clock.advance(1.0)
            self.net.flush()
        self.failureResultOf(d, Unavailable)
        self.assertEqual(len(self.cluster.requests), 3)
        self.assertEqual({(r.lane, r.request_id) for r in self.cluster.requests}, {(1, 1)})

    def test_late_duplicate_ignored(self) -> None:
        c = self.connect()
        self.cluster.auto = False
        d = c.get(b"k")
        self.net.flush()
        (req,) = self.cluster.requests
        self.cluster.reply(req, Status.OK, b"1")
        self.cluster.reply(req, Status.OK, b"2")
        self.net.flush()
        self.assertEqual(self.successResultOf(d), b"1")

    def test_retry_after_lost_dispatcher(self) -> None:
        """
        The dispatcher connection drops with an update outstanding: the
        client reconnects, re-WATCHes and resends the same lane/request id.
        """
        c = self.connect()
        self.cluster.auto = False
        d = c.put(b"k", b"v")
        self.net.flush()
        old = self.dispatcher_peer()
        old.transport.loseConnection()
        self.net.flush()
        self.assertNoResult(d)
        self.clock.advance(0.05)
        self.net.flush()
        self.assertEqual(self.net.connects.count(DISPATCHER), 2)
        self.assertIsNot(self.dispatcher_peer(), old)
        first, again = self.cluster.requests
        self.assertEqual((again.lane, again.request_id), (first.lane, first.request_id))
        self.assertEqual(again.client_id, c.client_id)
        self.cluster.auto = True
        self.cluster.reply(again, *self.cluster.execute(again))
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))

    def test_retry_after_lost_tail(self) -> None:
        """The tail channel drops: reconnect, hello again, resend the request."""
        c = self.connect()
        self.cluster.auto = False
        d = c.get(b"k")
        self.net.flush()
        self.cluster.tails["t1"][0].transport.loseConnection()
        self.net.flush()
        self.clock.advance(0.05)
        self.net.flush()
        self.assertEqual(self.net.connects.count(T1.endpoint()), 2)
        first, again = self.cluster.requests
        self.assertEqual((again.lane, again.request_id), (0, first.request_id))
        self.cluster.reply(again, Status.OK, b"v")
        self.net.flush()
        self.assertEqual(self.successResultOf(d), b"v")

    def test_exactly_once_through_retry(self) -> None:
        """
        The update is applied but its reply is lost: the resend (same lane
        and request id) gets the recorded result and is not applied again.
        """
        c = self.connect()
        self.cluster.auto = False
        d = c.cas(b"k", None, b"v")
        self.net.flush()
        self.assertEqual(self.cluster.execute(self.cluster.requests[0]), (Status.OK, b""))
        self.clock.advance(1.0)  # silence: resend
        self.net.flush()
        again = self.cluster.requests[1]
        # Executed again it would fail (the key now exists); deduplicated it is OK.
        self.cluster.reply(again, *self.cluster.execute(again))
        self.net.flush()
        self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.cluster.applied, 1)
        self.assertEqual(self.cluster.store, {b"k": b"v"})

    def test_retryable_status(self) -> None:
        c = self.connect()
        self.cluster.auto = False
        d = c.put(b"k", b"v")
        self.net.flush()
        self.cluster.reply(
            self.cluster.requests[0], Status.NOT_HEAD, b"", via=self.dispatcher_peer()
        )
        self.net.flush()
        self.clock.advance(0.05)
        self.net.flush()
        first, again = self.cluster.requests
        self.assertEqual((again.lane, again.request_id), (first.lane, first.request_id))
        self.cluster.reply(again, Status.OK)
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))

    def test_config_push_switches_tail(self) -> None:
        """
        A new tail in a pushed config: the client says hello to it, drops
        the old channel, and resends what was waiting for the old tail.
        """
        c = self.connect()
        self.cluster.auto = False
        d = c.put(b"k", b"v")
        self.net.flush()
        old = self.cluster.tails["t1"][0]
        self.cluster.push_config(make_config(2, T1, T2, epoch=2))
        self.net.flush()
        self.assertEqual(c.config.version, 2)
        self.assertFalse(old.alive)
        (new,) = self.cluster.tails["t2"]
        self.assertEqual(new.client_id, c.client_id)
        first, again = self.cluster.requests
        self.assertEqual((again.lane, again.request_id), (first.lane, first.request_id))
        self.cluster.reply(again, Status.OK)  # via t2, the tail now
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))
        self.cluster.auto = True
        self.assertIsNone(self.run_op(c.put(b"a", b"b")))
        self.assertEqual(self.run_op(c.get(b"a")), b"b")

    def test_requests_wait_for_welcome(self) -> None:
        """Nothing is sent for a chain before its tail welcomed the client."""
        c = self.connect()
        self.cluster.welcome = False
        self.cluster.push_config(make_config(2, T1, T2, epoch=2))
        self.net.flush()
        d = c.get(b"k")
        self.net.flush()
        self.assertEqual(self.cluster.requests, [])
        self.cluster.tails["t2"][0].send_welcome()
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))

    def test_error_frame_drops_connection(self) -> None:
        """An ERROR frame: the connection is treated as failed and remade."""
        c = self.connect()
        peer = self.dispatcher_peer()
        peer.sendString(wire.error_frame(wire.ErrorCode.UNEXPECTED, "go away"))
        self.net.flush()
        self.assertFalse(peer.alive)
        self.clock.advance(0.05)
        self.net.flush()
        self.assertEqual(self.net.connects.count(DISPATCHER), 2)
        self.assertIsNone(self.run_op(c.put(b"k", b"v")))

    def test_connect_timeout_no_dispatcher(self) -> None:
        del self.net.servers[DISPATCHER]
        d = connect(self.clock, DISPATCHER, 2.0, endpoint_factory=self.net.endpoint)
        self.clock.pump([0.1] * 19)
        self.assertNoResult(d)
        self.assertGreater(len(self.net.connects), 3)
        self.clock.advance(0.1)
        self.net.flush()
        self.failureResultOf(d, Unavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connect_timeout_no_welcome(self) -> None:
        self.cluster.welcome = False
        d = connect(self.clock, DISPATCHER, 2.0, endpoint_factory=self.net.endpoint)
        self.net.flush()
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.net.flush()
        self.failureResultOf(d, Unavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_fails_outstanding(self) -> None:
        c = self.connect()
        self.cluster.auto = False
        d = c.put(b"k", b"v")
        self.net.flush()
        self.close(c)
        self.failureResultOf(d, Unavailable)
        self.failureResultOf(c.get(b"k"), CkvError)
        self.assertFalse(self.dispatcher_peer_alive())

    def dispatcher_peer_alive(self) -> bool:
        return any(p.alive for p in self.net.peers(DispatcherPeer))

    def test_fetch_config(self) -> None:
        d = fetch_config(self.clock, DISPATCHER, 2.0, endpoint_factory=self.net.endpoint)
        self.net.flush()
        self.assertEqual(self.successResultOf(d), self.cluster.config)
        self.assertFalse(self.dispatcher_peer_alive())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_fetch_config_timeout(self) -> None:
        del self.net.servers[DISPATCHER]
        d = fetch_config(self.clock, DISPATCHER, 2.0, endpoint_factory=self.net.endpoint)
        self.clock.pump([0.5] * 4)
        self.failureResultOf(d, Unavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- direct mode: requests straight to heads and tails -------------------------

H2 = Member("h2", "127.0.0.1", 7004)
J = Member("j", "127.0.0.1", 7005)


def two_chains(
    version: int,
    chain0: tuple[Member, ...] = (HEAD, T1),
    chain1: tuple[Member, ...] = (H2, T2),
    epochs: tuple[int, int] = (1, 1),
    joining1: tuple[Member, ...] = (),
) -> ClusterConfig:
    """Two chains over 16 slots: even slots chain 0, odd slots chain 1."""
    return ClusterConfig(
        version,
        (0, 1) * 8,
        (Chain(0, epochs[0], chain0), Chain(1, epochs[1], chain1, joining1)),
    )


def key_of(chain_id: int, n: int = 0) -> bytes:
    """The n-th key k0, k1, ... whose slot (of 16) belongs to chain C{chain_id}."""
    found = [k for k in (b"k%d" % i for i in range(1000)) if slot_of(k, 16) % 2 == chain_id]
    return found[n]


class DirectClientTests(FakeNetTestCase):
    direct = True

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.net = FakeNet(self.clock)
        self.cluster = FakeCluster(two_chains(1))
        self.net.servers[DISPATCHER] = lambda: DispatcherPeer(self.cluster)
        for m in (HEAD, T1, H2, T2, J):
            self.net.servers[m.endpoint()] = lambda name=m.name: TailPeer(self.cluster, name)


    def sent_to(self) -> list[tuple[str, int, int, int, int]]:
        """(node, op, lane, request id, epoch) of every direct request so far."""
        return [(n, r.op, r.lane, r.request_id, r.epoch) for n, r in self.cluster.node_requests]

    def test_epoch_helpers(self) -> None:
        """The epoch is stamped into an encoded REQUEST in place of a re-encoding."""
        for op, value in ((Op.PUT, b"v"), (Op.GET, None), (Op.CAS, b"")):
            frame = wire.request(b"C" * 16, 3, 9, op, b"key", value=value)
            self.assertEqual(request_op(frame), op)
            self.assertEqual(
                with_epoch(frame, 2**40 + 5),
                wire.request(b"C" * 16, 3, 9, op, b"key", value=value, epoch=2**40 + 5),
            )

    def test_routes_by_chain(self) -> None:
        """
        Updates go to the head of the key's chain with its epoch, gets to its
        tail; the dispatcher (only the configuration source) sees no request.
        """
        self.cluster.config = two_chains(1, epochs=(4, 7))
        c = self.connect()
        self.assertTrue(c.direct)
        self.assertEqual(
            sorted(self.net.connects),
            sorted([DISPATCHER, HEAD.endpoint(), T1.endpoint(), H2.endpoint(), T2.endpoint()]),
        )
        a, b = key_of(0), key_of(1)
        self.assertIsNone(self.run_op(c.put(a, b"A")))
        self.assertIsNone(self.run_op(c.put(b, b"B")))
        self.assertEqual(self.run_op(c.get(a)), b"A")
        self.assertEqual(self.run_op(c.get(b)), b"B")
        self.assertTrue(self.run_op(c.cas(b, b"B", b"C")))
        self.assertTrue(self.run_op(c.delete(a)))
        self.assertEqual(
            self.sent_to(),
            [
                ("h", Op.PUT, 1, 1, 4),
                ("h2", Op.PUT, 1, 2, 7),
                ("t1", Op.GET, 0, 3, 0),
                ("t2", Op.GET, 0, 4, 0),
                ("h2", Op.CAS, 1, 5, 7),
                ("h", Op.DELETE, 1, 6, 4),
            ],
        )
        self.assertEqual(self.cluster.requests, [])

    def test_stale_epoch_retried_with_the_new_epoch(self) -> None:
        """
        STALE_EPOCH from the head: the client asks its source again, and
        resends the same lane and request id with the new epoch.
        """
        c = self.connect()
        # The chain moved on; the push has not reached the client yet.
        self.cluster.config = two_chains(2, epochs=(2, 1))
        d = c.put(key_of(0), b"v")
        self.net.flush()
        self.assertEqual(c.config.version, 2)  # re-fetched after STALE_EPOCH
        self.clock.advance(0.05)
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.sent_to(), [("h", Op.PUT, 1, 1, 1), ("h", Op.PUT, 1, 1, 2)])
        watches = [b for t, b in self.cluster.dispatchers[0].frames if t == MessageType.WATCH]
        self.assertEqual(len(watches), 2)

    def test_new_head_gets_the_outstanding_update(self) -> None:
        """The head changes: an update out on the old head goes to the new one, same ids."""
        c = self.connect()
        self.cluster.auto = False
        d = c.put(key_of(1), b"v")
        self.net.flush()
        self.cluster.push_config(two_chains(2, chain1=(T2,), epochs=(1, 2)))
        self.net.flush()
        self.assertFalse(any(p.alive for p in self.cluster.tails.get("h2", [])))
        self.assertEqual(self.sent_to(), [("h2", Op.PUT, 1, 1, 1), ("t2", Op.PUT, 1, 1, 2)])
        self.cluster.reply(self.cluster.node_requests[-1][1], Status.OK)
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))

    def test_not_head_is_retried(self) -> None:
        """A NOT_HEAD answer on the head connection is retried after a backoff."""
        c = self.connect()
        self.cluster.config = two_chains(1, chain0=(T1,))  # T1 alone; not pushed
        d = c.put(key_of(0), b"v")
        self.net.flush()
        self.assertEqual(self.sent_to()[0][:2], ("h", Op.PUT))
        self.assertEqual(c.config.chains[0].members, (T1,))  # re-fetched
        self.clock.advance(0.05)
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.sent_to()[-1], ("t1", Op.PUT, 1, 1, 1))

    def test_forming_chain_waits_then_serves(self) -> None:
        """A chain without members: its requests wait; the other chain serves."""
        self.cluster.config = two_chains(1, chain1=())
        c = self.connect()
        d = c.put(key_of(1), b"v")
        self.assertIsNone(self.run_op(c.put(key_of(0), b"w")))
        self.clock.advance(0.5)
        self.net.flush()
        self.assertNoResult(d)
        self.cluster.push_config(two_chains(2))
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.cluster.store, {key_of(0): b"w", key_of(1): b"v"})

    def test_forming_chain_times_out(self) -> None:
        self.cluster.config = two_chains(1, chain1=())
        c = self.connect(timeout=2.0)
        d = c.get(key_of(1))
        for _ in range(20):
            self.clock.advance(0.1)
            self.net.flush()
        self.failureResultOf(d, Unavailable)

    def test_joining_node_ignored(self) -> None:
        """A chain's joining node gets no connection and no request."""
        self.cluster.config = two_chains(1, joining1=(J,))
        c = self.connect()
        self.assertNotIn(J.endpoint(), self.net.connects)
        self.assertEqual(self.run_op(c.get(key_of(1))), None)
        self.assertEqual(self.sent_to()[-1][0], "t2")

    def test_carries_on_without_the_configuration_source(self) -> None:
        """The dispatcher goes away: requests keep flowing on the last configuration."""
        c = self.connect()
        del self.net.servers[DISPATCHER]
        for p in self.cluster.dispatchers:
            p.transport.loseConnection()
        self.net.flush()
        for i in range(4):
            self.assertIsNone(self.run_op(c.put(key_of(i % 2, i), b"%d" % i)))
            self.assertEqual(self.run_op(c.get(key_of(i % 2, i))), b"%d" % i)
        # It comes back; the client watches it again.
        self.net.servers[DISPATCHER] = lambda: DispatcherPeer(self.cluster)
        self.clock.advance(2.0)
        self.net.flush()
        self.cluster.push_config(two_chains(3, epochs=(2, 2)))
        self.net.flush()
        self.assertEqual(c.config.version, 3)
        self.assertIsNone(self.run_op(c.put(key_of(0), b"x")))
        self.assertEqual(self.sent_to()[-1][-1], 2)

    def test_lost_head_connection_resends(self) -> None:
        """The head connection drops with an update out: reconnect and resend it."""
        c = self.connect()
        self.cluster.auto = False
        d = c.put(key_of(0), b"v")
        self.net.flush()
        heads = [p for p in self.net.peers(TailPeer) if p.name == "h" and p.alive]
        heads[0].transport.loseConnection()
        self.net.flush()
        self.clock.advance(0.05)
        self.net.flush()
        self.assertEqual(self.net.connects.count(HEAD.endpoint()), 2)
        first, again = self.cluster.node_requests
        self.assertEqual((again[1].lane, again[1].request_id), (first[1].lane, first[1].request_id))
        self.cluster.reply(again[1], Status.OK)
        self.net.flush()
        self.assertIsNone(self.successResultOf(d))

    def test_ready_needs_every_head(self) -> None:
        """connect() waits for every head's connection as well as every tail's welcome."""
        del self.net.servers[H2.endpoint()]
        d = connect(self.clock, DISPATCHER, 1.0, endpoint_factory=self.net.endpoint, direct=True)
        self.net.flush()
        self.assertNoResult(d)
        self.clock.pump([0.1] * 9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.net.flush()
        self.failureResultOf(d, Unavailable)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# -- the blocking client over real sockets -------------------------------------


class BlockingClientTests(SynchronousTestCase):
    """
    BlockingClient against the fake servers on loopback TCP.  It runs its own
    (non-global) reactor in a thread, so trial's global reactor stays clean.
    """

    def setUp(self) -> None:
        from twisted.internet.selectreactor import SelectReactor

        self.reactor = SelectReactor()
        ensure_running(self.reactor)
        self.addCleanup(self.stop_reactor)
        self.cluster = FakeCluster(make_config(1))

        def listen(make: Callable[[], FakePeer]) -> Deferred[Any]:
            ep = serverFromString(self.reactor, "tcp:0:interface=127.0.0.1")
            return ep.listen(Factory.forProtocol(make))

        tail_port = call_blocking(self.reactor, 5, listen, lambda: TailPeer(self.cluster, "t1"))
        tail = Member("t1", "127.0.0.1", tail_port.getHost().port)
        self.cluster.config = make_config(1, tail)
        disp_port = call_blocking(self.reactor, 5, listen, lambda: DispatcherPeer(self.cluster))
        self.ports = [tail_port, disp_port]
        self.endpoint = f"tcp:127.0.0.1:{disp_port.getHost().port}"

    def stop_reactor(self) -> None:
        for port in self.ports:
            call_blocking(self.reactor, 5, port.stopListening)
        thread = reactor_thread(self.reactor)
        self.reactor.callFromThread(self.reactor.stop)
        assert thread is not None
        thread.join(5)
        self.assertFalse(thread.is_alive())

    def test_blocking_client(self) -> None:
        with BlockingClient(self.endpoint, timeout=5.0, reactor=self.reactor) as c:
            self.assertEqual(c.config, self.cluster.config)
            self.assertIsNone(c.get(b"k"))
            self.assertIsNone(c.put(b"k", b"v"))
            self.assertEqual(c.get(b"k"), b"v")
            self.assertTrue(c.cas(b"k", b"v", b"w"))
            self.assertFalse(c.cas(b"k", None, b"x"))
            self.assertTrue(c.delete(b"k"))
            self.assertFalse(c.delete(b"k"))
            self.assertRaises(TooLarge, c.put, b"k" * (wire.MAX_KEY + 1), b"v")
            # Several clients, and several threads, share the reactor thread.
            with BlockingClient(self.endpoint, timeout=5.0, reactor=self.reactor) as c2:
                errors: list[Exception] = []

                def work(n: int) -> None:
                    try:
                        for i in range(20):
                            c2.put(b"t%d-%d" % (n, i), b"%d" % i)
                    except Exception as e:
                        errors.append(e)

                threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(30)
                self.assertEqual(errors, [])
                self.assertEqual(c.get(b"t3-19"), b"19")
        self.assertTrue(c.client.closed)

    def test_blocking_client_direct(self) -> None:
        """direct=True: the same calls, sent straight to the chain's node."""
        with BlockingClient(self.endpoint, timeout=5.0, reactor=self.reactor, direct=True) as c:
            self.assertTrue(c.direct and c.client.direct)
            self.assertIsNone(c.put(b"k", b"v"))
            self.assertEqual(c.get(b"k"), b"v")
            self.assertTrue(c.cas(b"k", b"v", b"w"))
            self.assertTrue(c.delete(b"k"))
        self.assertEqual(
            [(n, Op(r.op)) for n, r in self.cluster.node_requests],
            [("t1", Op.PUT), ("t1", Op.GET), ("t1", Op.CAS), ("t1", Op.DELETE)],
        )
        self.assertEqual(self.cluster.requests, [])

    def test_blocking_unavailable(self) -> None:
        """No dispatcher listening: the constructor raises Unavailable in time."""
        port = self.ports.pop()
        call_blocking(self.reactor, 5, port.stopListening)
        with self.assertRaises(Unavailable):
            BlockingClient(self.endpoint, timeout=0.5, reactor=self.reactor)
