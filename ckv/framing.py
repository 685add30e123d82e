"""
Framing shared by every role: 32-bit length-prefixed frames decoded with
L{ckv.wire}.  Bad input gets an ERROR frame and the connection is closed;
the process goes on serving everyone else.
"""

from __future__ import annotations

from typing import Any

from construct import Container
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver
from twisted.python.failure import Failure

from ckv import wire

#: How many frames (or chain entries) a protocol handles from one read
#: before it reaches a I{flush point}: it finishes what those frames started
#: (a node commits them as one batch) and hands every frame written so far to
#: the kernel, instead of only when the whole read is handled.  The next
#: process on the path then starts on the first requests while this one
#: handles the rest: with 32 requests arriving together, two cores work at
#: once instead of one stage at a time.  Smaller means more overlap but more
#: system calls (a send that wakes another process costs tens of
#: microseconds).  On 2 cores with 32 in flight, 16 did best of 2, 4, 8, 12,
#: 16 and never (doc/operations.md, "Performance").
FLUSH_EVERY = 16

#: Transports written to since the last flush point (one reactor per process).
_unflushed: set[Any] = set()


def note_written(transport: Any) -> None:
    """Record that C{transport} has bytes waiting for L{flush_written}."""
    _unflushed.add(transport)


def flush_written() -> None:
    """
    Hand every frame written since the last call to the kernel now, rather
    than at the reactor's next turn.

    A transport that is closing is left to the reactor (its last write also
    ends the connection); so is one whose write fails: its descriptor is
    still registered for writing, and the reactor's own write reports the
    loss.  Transports without a socket (tests) are skipped.
    """
    if not _unflushed:
        return
    transports = list(_unflushed)
    _unflushed.clear()
    for t in transports:
        do_write = getattr(t, "doWrite", None)
        if (
            do_write is None
            or not getattr(t, "connected", False)
            or getattr(t, "disconnecting", True)
            or getattr(t, "_writeDisconnecting", True)
            or not (getattr(t, "_tempDataBuffer", None) or getattr(t, "dataBuffer", None))
        ):
            continue
        do_write()


class FlushingReceiver(Int32StringReceiver):
    """
    An L{Int32StringReceiver} with flush points: L{flush_point} runs after
    every L{FLUSH_EVERY} frames of one read (see L{FLUSH_EVERY}); L{weigh}
    lets a frame count for more than one (an UPDATES frame counts its
    entries).
    """

    _weight = 0

    def dataReceived(self, data: bytes) -> None:
        self._weight = 0
        super().dataReceived(data)
        # The reactor writes everything out once this read is handled:
        # forget the transports (a closed one must not be kept alive here).
        _unflushed.clear()

    def sendString(self, string: bytes) -> None:
        super().sendString(string)
        note_written(self.transport)

    def weigh(self, n: int = 1) -> None:
        """Count C{n} units of work; reach a flush point every L{FLUSH_EVERY}."""
        self._weight += n
        if self._weight >= FLUSH_EVERY:
            self._weight = 0
            self.flush_point()

    def flush_point(self) -> None:
        """Finish what the frames so far started, and send what they produced."""
        flush_written()


class FrameProtocol(FlushingReceiver):
    """
    Decode frames and hand them to L{frameReceived}.  Subclasses implement
    L{frameReceived}; an exception there is logged and answered with an
    ERROR frame, and the connection is closed.  Every frame reaches a flush
    point (L{FlushingReceiver}) once handled.
    """

    MAX_LENGTH = wire.MAX_FRAME
    log = Logger()
    peer_kind = "peer"

    #: The raw body of the frame being handled (for relaying it unchanged).
    current_frame = b""
    #: Set by protocol_error: the rest of the input is ignored.
    _failed = False

    def makeConnection(self, transport: Any) -> None:
        # Small frames, many in flight: never let Nagle hold one back.
        set_no_delay(transport)
        super().makeConnection(transport)

    def stringReceived(self, data: bytes) -> None:
        if self._failed:
            return
        self.current_frame = data
        try:
            mtype, body = wire.decode(data)
        except wire.WireError as e:
            self.protocol_error(e.code, e.message)
            return
        try:
            self.frameReceived(mtype, body)
        except Exception:
            self.log.failure(
                "error handling a {mtype} frame from {peer}",
                mtype=_type_name(mtype),
                peer=self._peer(),
            )
            self.protocol_error(wire.ErrorCode.UNEXPECTED, "internal error handling the frame")
            return
        self.weigh()

    def frameReceived(self, mtype: int, body: Container) -> None:
        raise NotImplementedError

    def lengthLimitExceeded(self, length: int) -> None:
        self.protocol_error(
            wire.ErrorCode.TOO_LARGE,
            f"frame of {length} bytes exceeds the limit of {self.MAX_LENGTH}",
        )

    def unexpected(self, mtype: int) -> None:
        self.protocol_error(
            wire.ErrorCode.UNEXPECTED,
            f"unexpected {_type_name(mtype)} frame on this connection",
        )

    def protocol_error(self, code: wire.ErrorCode, message: str) -> None:
        """Tell the peer what was wrong, log it, and close the connection."""
        if self._failed:
            return
        self._failed = True
        self.log.warn(
            "closing connection from {peer}: {message}", peer=self._peer(), message=message
        )
        if self.transport is not None:
            self.sendString(wire.error_frame(code, message))
            self.transport.loseConnection()

    def send(self, frame: bytes) -> None:
        if self.transport is not None and self.connected:
            self.sendString(frame)

    def _peer(self) -> str:
        if self.transport is None:
            return "?"
        try:
            p = self.transport.getPeer()
            return f"{self.peer_kind} {getattr(p, 'host', '?')}:{getattr(p, 'port', '?')}"
        except Exception:
            return self.peer_kind

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connection_lost(reason)

    def connection_lost(self, reason: Failure) -> None:
        """Override to react to a lost connection."""


def set_no_delay(transport: Any) -> None:
    """Disable Nagle's algorithm on a TCP transport (a no-op on others)."""
    set_delay = getattr(transport, "setTcpNoDelay", None)
    if set_delay is not None:
        try:
            set_delay(True)
        except OSError:
            pass


def _type_name(mtype: int) -> str:
    try:
        return wire.MessageType(mtype).name
    except ValueError:
        return str(mtype)


def error_text(body: Any) -> str:
    """The message of an ERROR frame as text."""
    return bytes(body.message).decode("utf-8", "replace")
