"""
The Twisted client: L{connect}, L{Client} and L{fetch_config}.

The session: one connection to the dispatcher (WATCH, then CONFIG pushes;
REQUEST frames go out on it) and one reply channel to each chain's tail
(CLIENT_HELLO, WELCOME; REPLY frames come back on it).  The request logic
lives in L{ckv.client.engine}; the connections in L{ckv.client.protocol}.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from construct import Container
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from ckv import wire
from ckv.client.engine import RequestEngine, check_sizes
from ckv.client.protocol import Link
from ckv.config import EMPTY, ClusterConfig, Member
from ckv.errors import CkvError, ProtocolError, Unavailable
from ckv.wire import MessageType, Op, Status

#: Builds a client endpoint from an endpoint string (injectable for tests).
EndpointFactory = Callable[[str], IStreamClientEndpoint]

#: The name a client gives in its WATCH.
WATCH_NAME = b"client"


def _default_endpoints(reactor: Any) -> EndpointFactory:
    return lambda description: clientFromString(reactor, description)


def _log_error_frame(log: Logger, link: Link, body: Container) -> None:
    try:
        code = wire.ErrorCode(body.code).name
    except ValueError:
        code = str(body.code)
    log.warn(
        "ERROR frame from {peer}: {code}: {message}; dropping the connection",
        peer=link.description,
        code=code,
        message=body.message.decode("utf-8", "replace"),
    )


class Client:
    """
    A ckv client session (Twisted flavour): every method returns a Deferred.

    Build it with L{connect}.  Errors: L{ckv.errors.Unavailable} when no
    answer came in time (the outcome is unknown), L{ckv.errors.RequestError}
    (or L{ckv.errors.TooLarge}) when the store refused the request.

    @ivar config: the latest L{ClusterConfig} from the dispatcher.
    @ivar client_id: this session's random 16-byte id.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        endpoint: str,
        timeout: float = 10.0,
        *,
        endpoint_factory: EndpointFactory | None = None,
        attempt_interval: float = 1.0,
        client_id: bytes | None = None,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.timeout = timeout
        self.client_id = client_id if client_id is not None else os.urandom(wire.CLIENT_ID_LEN)
        self.config: ClusterConfig = EMPTY
        self.closed = False
        self._endpoints = endpoint_factory or _default_endpoints(reactor)
        self._engine = RequestEngine(
            reactor, self.client_id, self, attempt_interval=attempt_interval
        )
        self._dispatcher = Link(reactor, self._endpoints(endpoint), self, f"dispatcher {endpoint}")
        self._has_config = False
        self._tails: dict[Member, Link] = {}
        self._ready_waiters: list[Deferred[Client]] = []

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Connect to the dispatcher (and, once it answers, to the tails)."""
        self._dispatcher.start()

    @property
    def ready(self) -> bool:
        """The dispatcher sent a CONFIG and every tail of it welcomed us."""
        if self.closed or not self._dispatcher_ready():
            return False
        return all(
            (link := self._tails.get(m)) is not None and link.ready for m in self._wanted_tails()
        )

    def when_ready(self, timeout: float | None = None) -> Deferred[Client]:
        """
        A Deferred firing with this client once L{ready}, failing with
        L{Unavailable} after C{timeout} seconds (default: the client's).
        """
        if self.ready:
            d: Deferred[Client] = Deferred()
            d.callback(self)
            return d
        if self.closed:
            return fail(CkvError("the client is closed"))
        timeout = self.timeout if timeout is None else timeout
        timer: list[IDelayedCall] = []

        def cancel(d: Deferred[Client]) -> None:
            if d in self._ready_waiters:
                self._ready_waiters.remove(d)
            if timer and timer[0].active():
                timer[0].cancel()

        d = Deferred(cancel)

        def expire() -> None:
            if d in self._ready_waiters:
                self._ready_waiters.remove(d)
                d.errback(
                    Unavailable(
                        f"{self.endpoint}: no configuration and welcome from every tail "
                        f"within {timeout:g} s"
                    )
                )

        def disarm(result: Any) -> Any:
            if timer and timer[0].active():
                timer[0].cancel()
            return result

        timer.append(self.reactor.callLater(timeout, expire))
        d.addBoth(disarm)
        self._ready_waiters.append(d)
        return d

    def close(self) -> Deferred[None]:
        """
        End the session: outstanding requests fail with L{Unavailable}, every
        connection is closed; the Deferred fires when they all are.
        """
        if not self.closed:
            self.closed = True
            self._engine.fail_all(Unavailable("the client was closed; the outcome is unknown"))
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                w.errback(CkvError("the client was closed"))
        links = [self._dispatcher, *self._tails.values()]
        self._tails = {}
        done = DeferredList([link.stop() for link in links], consumeErrors=True)
        return done.addCallback(lambda _: None)

    # -- the public operations ---------------------------------------------

    def get(self, key: bytes, *, timeout: float | None = None) -> Deferred[bytes | None]:
        """The value of C{key}, or None if it is absent."""
        return self._op(Op.GET, key, timeout, _get_result)

    def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> Deferred[None]:
        """Set C{key} to C{value}."""
        if value is None:
            raise TypeError("put needs a value (use delete to remove a key)")
        return self._op(Op.PUT, key, timeout, _put_result, value=value)

    def delete(self, key: bytes, *, timeout: float | None = None) -> Deferred[bool]:
        """Remove C{key}; True if it existed."""
        return self._op(Op.DELETE, key, timeout, _delete_result)

    def cas(
        self,
        key: bytes,
        expected: bytes | None,
        new: bytes | None,
        *,
        timeout: float | None = None,
    ) -> Deferred[bool]:
        """
        Compare and set: if C{key} holds C{expected} (None: is absent), set it
        to C{new} (None: delete it).  True if it matched and was changed.
        """
        return self._op(
            Op.CAS,
            key,
            timeout,
            _cas_result,
            value=new,
            expected=expected,
            has_expected=expected is not None,
        )

    def _op(
        self,
        op: Op,
        key: bytes,
        timeout: float | None,
        result: Callable[[tuple[Status, bytes]], Any],
        **kw: Any,
    ) -> Deferred[Any]:
        try:
            check_sizes(key, kw.get("value"), kw.get("expected"))
        except CkvError as e:
            return fail(e)
        if self.closed:
            return fail(CkvError("the client is closed"))
        t = self.timeout if timeout is None else timeout
        return self._engine.submit(op, key, timeout=t, **kw).addCallback(result)

    # -- Path (for the engine) ---------------------------------------------

    def transmit(self, key: bytes, frame: bytes) -> bool:
        if not self._dispatcher_ready():
            return False
        tail = self._tail_for(key)
        if tail is not None:
            link = self._tails.get(tail)
            if link is None or not link.ready:
                return False
        # No chain for the key: let the dispatcher answer (it knows better).
        return self._dispatcher.send(frame)

    def _dispatcher_ready(self) -> bool:
        return self._has_config and self._dispatcher.protocol is not None

    def _tail_for(self, key: bytes, config: ClusterConfig | None = None) -> Member | None:
        chain = (config or self.config).chain_for_key(key)
        return chain.tail if chain is not None else None

    def _wanted_tails(self) -> set[Member]:
        return {c.tail for c in self.config.chains if c.tail is not None}

    # -- LinkHandler --------------------------------------------------------

    def link_up(self, link: Link) -> None:
        if link is self._dispatcher:
            link.send(wire.encode(MessageType.WATCH, name=WATCH_NAME))
        else:
            link.send(wire.encode(MessageType.CLIENT_HELLO, client_id=self.client_id))

    def link_frame(self, link: Link, mtype: int, body: Container) -> None:
        if mtype == MessageType.REPLY:
            if body.client_id != self.client_id:
                self.log.warn("{peer} sent a reply meant for another client", peer=link.description)
                return
            self._engine.reply_received(body.request_id, body.status, body.value)
        elif mtype == MessageType.CONFIG and link is self._dispatcher:
            self._config_received(ClusterConfig.from_wire(body))
        elif mtype == MessageType.WELCOME and link is not self._dispatcher:
            self.log.debug(
                "{peer} welcomed us as {name} at epoch {epoch}",
                peer=link.description,
                name=body.name.decode("utf-8", "replace"),
                epoch=body.epoch,
            )
            link.established()
            self._progress()
        elif mtype == MessageType.ERROR:
            _log_error_frame(self.log, link, body)
            link.drop()
        else:
            self.log.warn(
                "unexpected {type} frame from {peer}, ignored",
                type=_type_name(mtype),
                peer=link.description,
            )

    def link_down(self, link: Link, reason: Failure) -> None:
        self.log.info(
            "lost the connection to {peer}: {reason}",
            peer=link.description,
            reason=reason.getErrorMessage(),
        )
        if link is self._dispatcher:
            self._has_config = False
            self._engine.path_lost()
        else:
            member = link.tag
            self._engine.path_lost(lambda key: self._tail_for(key) == member)

    # -- configuration ------------------------------------------------------

    def _config_received(self, config: ClusterConfig) -> None:
        old = self.config
        self.config = config
        self._has_config = True
        self._dispatcher.established()
        self.log.debug("configuration version {version}", version=config.version)
        wanted = self._wanted_tails()
        for member in list(self._tails):
            if member not in wanted:
                # Not a tail any more: replies will come from the new tail.
                self._tails.pop(member).stop()
                self._engine.path_lost(lambda key, m=member: self._tail_for(key, old) == m)
        for member in wanted:
            if member not in self._tails:
                link = Link(
                    self.reactor,
                    self._endpoints(member.endpoint()),
                    self,
                    f"tail {member.name} ({member.endpoint()})",
                    tag=member,
                )
                self._tails[member] = link
                link.start()
        self._progress()

    def _progress(self) -> None:
        """Something became ready: send what waits, fire L{when_ready}."""
        if self.closed:
            return
        self._engine.path_ready()
        if self.ready:
            waiters, self._ready_waiters = self._ready_waiters, []
            for w in waiters:
                w.callback(self)


def _type_name(mtype: int) -> str:
    try:
        return MessageType(mtype).name
    except ValueError:
        return str(mtype)


def _unexpected(op: str, status: Status) -> ProtocolError:
    return ProtocolError(f"unexpected status {status.name} in the reply to {op}")


def _get_result(r: tuple[Status, bytes]) -> bytes | None:
    status, value = r
    if status is Status.OK:
        return value
    if status is Status.NOT_FOUND:
        return None
    raise _unexpected("get", status)


def _put_result(r: tuple[Status, bytes]) -> None:
    if r[0] is not Status.OK:
        raise _unexpected("put", r[0])


def _delete_result(r: tuple[Status, bytes]) -> bool:
    if r[0] is Status.OK:
        return True
    if r[0] is Status.NOT_FOUND:
        return False
    raise _unexpected("delete", r[0])


def _cas_result(r: tuple[Status, bytes]) -> bool:
    if r[0] is Status.OK:
        return True
    if r[0] is Status.CAS_FAILED:
        return False
    raise _unexpected("cas", r[0])


def connect(
    reactor: Any,
    endpoint: str,
    timeout: float = 10.0,
    *,
    endpoint_factory: EndpointFactory | None = None,
    attempt_interval: float = 1.0,
) -> Deferred[Client]:
    """
    Open a client session through the dispatcher at C{endpoint} (a Twisted
    client endpoint string, e.g. C{tcp:127.0.0.1:7200}).

    @param timeout: the default deadline of every request, and of this
        connection attempt.
    @return: a Deferred firing with a ready L{Client} once the dispatcher sent
        its configuration and every tail welcomed the client; failing with
        L{Unavailable} if that does not happen within C{timeout}.
    """
    client = Client(
        reactor,
        endpoint,
        timeout,
        endpoint_factory=endpoint_factory,
        attempt_interval=attempt_interval,
    )
    client.start()
    d = client.when_ready(timeout)

    def failed(f: Failure) -> Failure:
        return client.close().addCallback(lambda _: f)

    return d.addErrback(failed)


def fetch_config(
    reactor: Any,
    endpoint: str,
    timeout: float = 10.0,
    *,
    endpoint_factory: EndpointFactory | None = None,
    name: bytes = b"ckv-status",
) -> Deferred[ClusterConfig]:
    """
    Ask a master or a dispatcher for the cluster configuration: connect (with
    retries), send WATCH, return the first CONFIG, disconnect.

    @raise Unavailable: (as a failure) no CONFIG within C{timeout} seconds.
    @raise ProtocolError: (as a failure) the peer answered with an ERROR.
    """
    endpoints = endpoint_factory or _default_endpoints(reactor)
    result: Deferred[ClusterConfig] = Deferred()
    log = Logger()
    finished: list[bool] = []

    def finish(outcome: ClusterConfig | Failure | Exception) -> None:
        if timer.active():
            timer.cancel()
        if finished:
            return
        finished.append(True)

        def fire(_: Any) -> None:
            if isinstance(outcome, ClusterConfig):
                result.callback(outcome)
            else:
                result.errback(outcome)

        link.stop().addBoth(fire)

    class Handler:
        def link_up(self, link: Link) -> None:
            link.send(wire.encode(MessageType.WATCH, name=name))

        def link_frame(self, link: Link, mtype: int, body: Container) -> None:
            if mtype == MessageType.CONFIG:
                finish(ClusterConfig.from_wire(body))
            elif mtype == MessageType.ERROR:
                _log_error_frame(log, link, body)
                finish(
                    ProtocolError(
                        f"{endpoint} refused WATCH: {body.message.decode('utf-8', 'replace')}"
                    )
                )

        def link_down(self, link: Link, reason: Failure) -> None:
            pass

    link = Link(reactor, endpoints(endpoint), Handler(), endpoint)
    timer = reactor.callLater(
        timeout,
        lambda: finish(Unavailable(f"no configuration from {endpoint} within {timeout:g} s")),
    )
    link.start()
    return result
