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
from ckv.client.engine import RequestEngine
from ckv.config import Chain, ClusterConfig, Member
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


# -- the Twisted client against fakes ----------------------------------------


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.net = FakeNet(self.clock)
        self.cluster = FakeCluster(make_config(1, HEAD, T1))
        self.net.servers[DISPATCHER] = lambda: DispatcherPeer(self.cluster)
        for m in (T1, T2):
            self.net.servers[m.endpoint()] = lambda name=m.name: TailPeer(self.cluster, name)

    def connect(self, timeout: float = 5.0) -> Client:
        d = connect(self.clock, DISPATCHER, timeout, endpoint_factory=self.net.endpoint)
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

    def test_blocking_unavailable(self) -> None:
        """No dispatcher listening: the constructor raises Unavailable in time."""
        port = self.ports.pop()
        call_blocking(self.reactor, 5, port.stopListening)
        with self.assertRaises(Unavailable):
            BlockingClient(self.endpoint, timeout=0.5, reactor=self.reactor)
