"""
Framing and connections of the client: a thin frame protocol and a link that
keeps one connection up, reconnecting with backoff.

Nothing here knows what the frames mean; L{LinkHandler} (the session layer)
does.
"""

from __future__ import annotations

from typing import Any, Protocol

from construct import Container
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ckv import wire
from ckv.framing import FlushingReceiver, set_no_delay


class LinkHandler(Protocol):
    """What a L{Link} reports to."""

    def link_up(self, link: Link) -> None:
        """The connection is made: send the greeting."""

    def link_frame(self, link: Link, mtype: int, body: Container) -> None:
        """A decoded frame arrived."""

    def link_down(self, link: Link, reason: Failure) -> None:
        """The connection is lost (a new attempt is already scheduled)."""


class FrameProtocol(FlushingReceiver):
    """Length-prefixed ckv frames, decoded with L{ckv.wire}, passed to a link."""

    MAX_LENGTH = wire.MAX_FRAME
    log = Logger()

    def __init__(self, link: Link) -> None:
        self.link = link
        self.closing = False

    def connectionMade(self) -> None:
        set_no_delay(self.transport)
        self.link._made(self)

    def stringReceived(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            mtype, body = wire.decode(data)
        except wire.WireError as e:
            self.log.warn(
                "undecodable frame from {peer}: {message}",
                peer=self.link.description,
                code=e.code.name,
                message=e.message,
            )
            self.drop()
            return
        self.link._frame(self, mtype, body)
        # Requests sent in answer to these replies leave every few frames.
        self.weigh()

    def lengthLimitExceeded(self, length: int) -> None:
        self.log.warn(
            "frame of {length} bytes from {peer} exceeds the limit of {limit}",
            length=length,
            peer=self.link.description,
            limit=self.MAX_LENGTH,
        )
        self.drop()

    def send_frame(self, frame: bytes) -> None:
        if not self.closing:
            self.sendString(frame)

    def drop(self) -> None:
        """Close this connection; nothing more is read from it."""
        self.closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.closing = True
        self.link._lost(self, reason)


class Link:
    """
    One connection kept up to an endpoint: connects, and after a failure or a
    loss reconnects after a backoff (C{min_delay} doubling up to
    C{max_delay}; reset by L{established}).

    @ivar protocol: the connected L{FrameProtocol}, or None.
    @ivar ready: set by the handler once the peer answered the greeting.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        handler: LinkHandler,
        description: str,
        *,
        min_delay: float = 0.05,
        max_delay: float = 1.0,
        connect_timeout: float = 5.0,
        tag: Any = None,
    ) -> None:
        self.clock = clock
        self.endpoint = endpoint
        self.handler = handler
        self.description = description
        self.tag = tag
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.connect_timeout = connect_timeout
        self.protocol: FrameProtocol | None = None
        self.ready = False
        self.stopped = False
        self._delay = min_delay
        self._attempt: Deferred[Any] | None = None
        self._attempt_timer: IDelayedCall | None = None
        self._retry: IDelayedCall | None = None
        self._stop_waiters: list[Deferred[None]] = []

    def __repr__(self) -> str:
        return f"<Link {self.description} ready={self.ready}>"

    def start(self) -> None:
        if not self.stopped and self.protocol is None and self._attempt is None:
            self._connect()

    def send(self, frame: bytes) -> bool:
        """Send on the current connection; False if there is none."""
        if self.protocol is None or self.protocol.closing:
            return False
        self.protocol.send_frame(frame)
        return True

    def established(self) -> None:
        """The peer answered the greeting: mark ready, reset the backoff."""
        self.ready = True
        self._delay = self.min_delay

    def drop(self) -> None:
        """Drop the current connection (it will be re-established)."""
        if self.protocol is not None:
            self.protocol.drop()

    def stop(self) -> Deferred[None]:
        """Close for good; the Deferred fires once the connection is gone."""
        self.stopped = True
        self.ready = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._attempt is not None:
            self._attempt.cancel()
        if self.protocol is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        self.protocol.drop()
        return d

    # -- internals ----------------------------------------------------------

    def _connect(self) -> None:
        self._retry = None
        factory = Factory.forProtocol(lambda: FrameProtocol(self))
        d = self.endpoint.connect(factory)
        self._attempt = d
        self._attempt_timer = self.clock.callLater(self.connect_timeout, d.cancel)
        d.addCallbacks(self._connected, self._failed)

    def _end_attempt(self) -> None:
        self._attempt = None
        if self._attempt_timer is not None and self._attempt_timer.active():
            self._attempt_timer.cancel()
        self._attempt_timer = None

    def _connected(self, protocol: FrameProtocol) -> None:
        self._end_attempt()

    def _failed(self, reason: Failure) -> None:
        self._end_attempt()
        if self.stopped:
            return
        self.log.debug(
            "cannot connect to {peer}: {error}",
            peer=self.description,
            error=reason.getErrorMessage(),
        )
        self._schedule()

    def _schedule(self) -> None:
        if self.stopped or self._retry is not None:
            return
        self._retry = self.clock.callLater(self._delay, self._connect)
        self._delay = min(self._delay * 2, self.max_delay)

    def _made(self, protocol: FrameProtocol) -> None:
        if self.stopped:
            protocol.drop()
            return
        self.protocol = protocol
        self.ready = False
        self.handler.link_up(self)

    def _frame(self, protocol: FrameProtocol, mtype: int, body: Container) -> None:
        if protocol is self.protocol:
            self.handler.link_frame(self, mtype, body)

    def _lost(self, protocol: FrameProtocol, reason: Failure) -> None:
        if protocol is not self.protocol:
            return
        self.protocol = None
        self.ready = False
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)
        if self.stopped:
            return
        self._schedule()
        self.handler.link_down(self, reason)
