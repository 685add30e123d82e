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


class FrameProtocol(Int32StringReceiver):
    """
    Decode frames and hand them to L{frameReceived}.  Subclasses implement
    L{frameReceived}; an exception there is logged and answered with an
    ERROR frame, and the connection is closed.
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
