"""
Flush points (ckv.framing): after every FLUSH_EVERY frames of one read a
protocol finishes what those frames started and sends what they produced,
without waiting for the rest of the read.
"""

from __future__ import annotations

import socket

import pytest
from twisted.internet import tcp
from twisted.internet.testing import MemoryReactor, StringTransport

from ckv import framing, wire
from ckv.chain.service import NodeProtocol
from ckv.framing import FLUSH_EVERY, FlushingReceiver, flush_written, note_written
from ckv.wire import MessageType, Op
from tests.fakes import CID_A, framed, unframe
from tests.test_node_protocol import config, connect, hello, make_node


class Counting(FlushingReceiver):
    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.flushes: list[int] = []

    def stringReceived(self, data: bytes) -> None:
        self.frames.append(data)
        self.weigh(len(data))

    def flush_point(self) -> None:
        self.flushes.append(len(self.frames))
        super().flush_point()


def frames(n: int, size: int = 1) -> bytes:
    return b"".join(framed(b"x" * size) for _ in range(n))


def test_a_flush_point_every_flush_every_frames_of_one_read():
    p = Counting()
    p.makeConnection(StringTransport())
    p.dataReceived(frames(2 * FLUSH_EVERY + FLUSH_EVERY // 2))
    assert p.flushes == [FLUSH_EVERY, 2 * FLUSH_EVERY]


def test_the_count_starts_again_with_every_read():
    # A read that is handled whole needs no flush point: the reactor sends
    # what it produced as soon as it returns.
    p = Counting()
    p.makeConnection(StringTransport())
    for _ in range(3):
        p.dataReceived(frames(FLUSH_EVERY - 1))
    assert p.flushes == []
    assert len(p.frames) == 3 * (FLUSH_EVERY - 1)


def test_a_frame_can_weigh_more_than_one():
    p = Counting()
    p.makeConnection(StringTransport())
    p.dataReceived(framed(b"x" * FLUSH_EVERY) + framed(b"y"))
    assert p.flushes == [1]


@pytest.fixture
def socket_pair(request):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    request.addfinalizer(a.close)
    request.addfinalizer(b.close)
    return a, b


def connection(sock: socket.socket) -> tcp.Connection:
    """A real TCP-style transport over C{sock}, driven by no running reactor."""
    proto = FlushingReceiver()
    conn = tcp.Connection(sock, proto, reactor=MemoryReactor())
    conn.connected = True
    proto.makeConnection(conn)
    return conn


def test_flush_written_hands_the_bytes_to_the_kernel_now(socket_pair):
    a, b = socket_pair
    conn = connection(a)
    conn.protocol.sendString(b"hello")
    # Written, but a transport only sends when its reactor gets to it.
    with pytest.raises(BlockingIOError):
        b.recv(100)
    flush_written()
    assert b.recv(100) == b"\x00\x00\x00\x05hello"
    assert not conn.dataBuffer and not conn._tempDataBuffer


def test_flush_written_leaves_closing_and_fake_transports_alone(socket_pair):
    a, b = socket_pair
    conn = connection(a)
    conn.protocol.sendString(b"bye")
    conn.disconnecting = True  # loseConnection: the reactor finishes it
    fake = StringTransport()
    note_written(fake)
    flush_written()
    with pytest.raises(BlockingIOError):
        b.recv(100)
    assert fake.value() == b""
    assert not framing._unflushed


def test_a_node_commits_and_replies_at_each_flush_point(tmp_path, request):
    """
    FLUSH_EVERY + 1 puts in one read: the first FLUSH_EVERY are committed as
    one batch and answered at the flush point, the last one at the end of
    the read.
    """
    node = make_node(tmp_path, request, "n1")
    node.on_config(config("n1"))
    proto, tr = connect(node)
    hello(proto, tr)
    assert isinstance(proto, NodeProtocol)
    seen_at_flush: list[int] = []
    original = proto.flush_point

    def flush_point() -> None:
        original()
        seen_at_flush.append(len(unframe(tr.value())))

    proto.flush_point = flush_point  # type: ignore[method-assign]
    commits = node.store.commits
    reqs = b"".join(
        framed(wire.request(CID_A, i + 1, 1, Op.PUT, b"k%d" % i, value=b"v"))
        for i in range(FLUSH_EVERY + 1)
    )
    proto.dataReceived(reqs)
    assert seen_at_flush == [FLUSH_EVERY]
    assert node.store.commits == commits + 2
    replies = unframe(tr.value())
    assert [m for m, _ in replies] == [MessageType.REPLY] * (FLUSH_EVERY + 1)
    assert node.store.get(b"k%d" % FLUSH_EVERY) == b"v"


def test_the_written_set_is_emptied_after_every_read():
    """Transports are not kept after the read that wrote to them (no leak)."""
    p = Counting()
    p.makeConnection(StringTransport())
    others = [StringTransport() for _ in range(3)]
    for t in others:
        note_written(t)
    p.dataReceived(frames(2))
    assert not framing._unflushed
