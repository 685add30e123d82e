"""
The Twisted client: L{connect}, L{Client} and L{fetch_config}.

The session: one connection to the dispatcher (WATCH, then CONFIG pushes;
REQUEST frames go out on it) and one reply channel to each chain's tail
(CLIENT_HELLO, WELCOME; REPLY frames come back on it).  The request logic
lives in L{ckv.client.engine}; the connections in L{ckv.client.protocol}.

Direct mode (C{direct=True}): the configuration still comes from the
endpoint (a dispatcher or the master: both answer WATCH with CONFIG and push
every change), but the client routes each request itself by the slot map:
updates to the head of the key's chain (one plain connection per head; its
error replies come back on it) stamped with the chain's epoch, gets to the
tail of the key's chain over the reply channel it already has.  A head
answers STALE_EPOCH when the epoch differs; that, NOT_HEAD, NOT_TAIL and
UNAVAILABLE are retried with the same lane and request id once the next
configuration arrives (the client also asks its source again, at most once
per C{refresh_after} seconds, after such an answer).
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
from ckv.client.engine import RequestEngine, check_sizes, request_op, with_epoch
from ckv.client.protocol import Link
from ckv.config import EMPTY, ClusterConfig, Member
from ckv.errors import CkvError, ProtocolError, Unavailable
from ckv.wire import MessageType, Op, Status

#: Builds a client endpoint from an endpoint string (injectable for tests).
EndpointFactory = Callable[[str], IStreamClientEndpoint]

#: The name a client gives in its WATCH.
WATCH_NAME = b"client"

#: Answers that mean the client's configuration may be out of date.
STALE_HINTS = frozenset({Status.STALE_EPOCH, Status.NOT_HEAD, Status.NOT_TAIL})


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
    @ivar direct: True if the client sends each request to the head or tail
        of its key's chain itself, rather than through the dispatcher.
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
        direct: bool = False,
        refresh_after: float = 1.0,
    ) -> None:
        self.reactor = reactor
        self.endpoint = endpoint
        self.timeout = timeout
        self.direct = direct
        self.refresh_after = refresh_after
        self.client_id = client_id if client_id is not None else os.urandom(wire.CLIENT_ID_LEN)
        self.config: ClusterConfig = EMPTY
        self.closed = False
        self._endpoints = endpoint_factory or _default_endpoints(reactor)
        self._engine = RequestEngine(
            reactor, self.client_id, self, attempt_interval=attempt_interval
        )
        source = "configuration source" if direct else "dispatcher"
        self._dispatcher = Link(reactor, self._endpoints(endpoint), self, f"{source} {endpoint}")
        #: A CONFIG arrived on the current connection to the endpoint.
        self._has_config = False
        #: A CONFIG arrived at some point (direct mode keeps using the last
        #: one while the endpoint is away).
        self._config_seen = False
        self._tails: dict[Member, Link] = {}
        #: Direct mode: one plain connection to each chain's head.
        self._heads: dict[Member, Link] = {}
        self._last_refresh: float | None = None
        self._ready_waiters: list[Deferred[Client]] = []

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Connect to the dispatcher (and, once it answers, to the tails)."""
        self._dispatcher.start()

    @property
    def ready(self) -> bool:
        """
        The dispatcher sent a CONFIG and every tail of it welcomed us (direct
        mode: a CONFIG arrived, every tail welcomed us and every head
        accepted our connection).
        """
        if self.closed:
            return False
        if self.direct:
            if not self._config_seen:
                return False
            heads = self._wanted_heads()
            if not all((link := self._heads.get(m)) is not None and link.ready for m in heads):
                return False
        elif not self._dispatcher_ready():
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
        links = [self._dispatcher, *self._tails.values(), *self._heads.values()]
        self._tails = {}
        self._heads = {}
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
        return self._engine.submit(op, key, timeout=t, result=result, **kw)

    # -- Path (for the engine) ---------------------------------------------

    def transmit(self, key: bytes, frame: bytes) -> bool:
        if self.direct:
            return self._transmit_direct(key, frame)
        if not self._dispatcher_ready():
            return False
        tail = self._tail_for(key)
        if tail is not None:
            link = self._tails.get(tail)
            if link is None or not link.ready:
                return False
        # No chain for the key: let the dispatcher answer (it knows better).
        return self._dispatcher.send(frame)

    def _transmit_direct(self, key: bytes, frame: bytes) -> bool:
        """
        Direct mode: a get to the tail of the key's chain, an update to its
        head with the chain's epoch.  Not ready (so the engine waits and
        retries) while the chain has no members yet, or the tail has not
        welcomed us (the reply would have nowhere to go), or the head's
        connection is down.
        """
        chain = self.config.chain_for_key(key)
        if chain is None or not chain.members:
            return False
        tail = self._tails.get(chain.tail)  # type: ignore[arg-type]
        if tail is None or not tail.ready:
            return False
        if request_op(frame) == Op.GET:
            return tail.send(frame)
        head = self._heads.get(chain.head)  # type: ignore[arg-type]
        if head is None or not head.ready:
            return False
        return head.send(with_epoch(frame, chain.epoch))

    def _dispatcher_ready(self) -> bool:
        return self._has_config and self._dispatcher.protocol is not None

    def _tail_for(self, key: bytes, config: ClusterConfig | None = None) -> Member | None:
        chain = (config or self.config).chain_for_key(key)
        return chain.tail if chain is not None else None

    def _head_for(self, key: bytes, config: ClusterConfig | None = None) -> Member | None:
        chain = (config or self.config).chain_for_key(key)
        return chain.head if chain is not None else None

    def _wanted_tails(self) -> set[Member]:
        return {c.tail for c in self.config.chains if c.tail is not None}

    def _wanted_heads(self) -> set[Member]:
        return {c.head for c in self.config.chains if c.head is not None}

    def _refresh_config(self) -> None:
        """
        Direct mode, after an answer that says our configuration may be old:
        WATCH again (the source answers with its current CONFIG), at most
        once per C{refresh_after} seconds.  Pushes normally come first.
        """
        now = self.reactor.seconds()
        if self._last_refresh is not None and now - self._last_refresh < self.refresh_after:
            return
        if self._dispatcher.protocol is None:
            return
        self._last_refresh = now
        self._dispatcher.send(wire.encode(MessageType.WATCH, name=WATCH_NAME))

    # -- LinkHandler --------------------------------------------------------

    def link_up(self, link: Link) -> None:
        if link is self._dispatcher:
            link.send(wire.encode(MessageType.WATCH, name=WATCH_NAME))
        elif link.tag is not None and link.tag[0] == "head":
            # A head needs no greeting: requests go out at once.
            link.established()
            self._progress()
        else:
            link.send(wire.encode(MessageType.CLIENT_HELLO, client_id=self.client_id))

    def link_frame(self, link: Link, mtype: int, body: Container) -> None:
        if mtype == MessageType.REPLY:
            if body.client_id != self.client_id:
                self.log.warn("{peer} sent a reply meant for another client", peer=link.description)
                return
            if self.direct and body.status in STALE_HINTS:
                self._refresh_config()
            self._engine.reply_received(body.request_id, body.status, body.value)
        elif mtype == MessageType.CONFIG and link is self._dispatcher:
            self._config_received(ClusterConfig.from_wire(body))
        elif mtype == MessageType.WELCOME and link.tag is not None and link.tag[0] == "tail":
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
            if not self.direct:
                self._engine.path_lost()
            # Direct mode: nothing was sent on it; the last configuration
            # stays in use until the endpoint is back.
        else:
            role, member = link.tag
            owner = self._tail_for if role == "tail" else self._head_for
            self._engine.path_lost(lambda key: owner(key) == member)

    # -- configuration ------------------------------------------------------

    def _config_received(self, config: ClusterConfig) -> None:
        old = self.config
        self.config = config
        self._has_config = True
        self._config_seen = True
        self._dispatcher.established()
        self.log.debug("configuration version {version}", version=config.version)
        # Not a tail any more: replies will come from the new tail.
        self._follow("tail", self._tails, self._wanted_tails(), self._tail_for, old)
        if self.direct:
            # Not a head any more: updates go to the new head.
            self._follow("head", self._heads, self._wanted_heads(), self._head_for, old)
        self._progress()

    def _follow(
        self,
        role: str,
        links: dict[Member, Link],
        wanted: set[Member],
        owner: Callable[[bytes, ClusterConfig | None], Member | None],
        old: ClusterConfig,
    ) -> None:
        """Close the links to members that left C{role}, open the new ones."""
        for member in list(links):
            if member not in wanted:
                links.pop(member).stop()
                # What was out on it gets no answer there: send it again.
                self._engine.path_lost(lambda key, m=member: owner(key, old) == m)
        for member in wanted:
            if member not in links:
                link = Link(
                    self.reactor,
                    self._endpoints(member.endpoint()),
                    self,
                    f"{role} {member.name} ({member.endpoint()})",
                    tag=(role, member),
                )
                links[member] = link
                link.start()

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
    direct: bool = False,
) -> Deferred[Client]:
    """
    Open a client session through the dispatcher at C{endpoint} (a Twisted
    client endpoint string, e.g. C{tcp:127.0.0.1:7200}).

    @param timeout: the default deadline of every request, and of this
        connection attempt.
    @param direct: take only the configuration from C{endpoint} (a dispatcher
        or the master) and send every request straight to the head (updates)
        or tail (gets) of its key's chain.
    @return: a Deferred firing with a ready L{Client} once the dispatcher sent
        its configuration and every tail welcomed the client (direct mode:
        and every head accepted its connection); failing with
        L{Unavailable} if that does not happen within C{timeout}.
    """
    client = Client(
        reactor,
        endpoint,
        timeout,
        endpoint_factory=endpoint_factory,
        attempt_interval=attempt_interval,
        direct=direct,
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
