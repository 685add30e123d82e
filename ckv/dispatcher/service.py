"""
The dispatcher: the clients' entry point.  It routes every request by its
key's slot to the owning chain's head (updates) or tail (queries), passing
the frame on unchanged.  It keeps no state of its own: everything it knows
comes from the master.

The reply path: the tail answers the client directly on the client's own
connection to the tail (CLIENT_HELLO), never through the dispatcher.  Only
error replies produced before a request reaches its chain (no chain
configured, head or tail unreachable) or by a node that cannot reach the
client come back through here, matched to the client by its client id.
"""

from __future__ import annotations

from typing import Any

from construct import Container
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ckv import wire
from ckv.config import EMPTY, ClusterConfig, Member
from ckv.framing import FrameProtocol, error_text
from ckv.wire import MessageType as T
from ckv.wire import Status

LINK_RETRY = backoffPolicy(initialDelay=0.05, maxDelay=2.0, factor=2.0)


class ClientProtocol(FrameProtocol):
    """A client's connection to the dispatcher."""

    peer_kind = "client"

    def __init__(self, d: DispatcherService) -> None:
        self.d = d
        self.client_ids: set[bytes] = set()
        self.watching = False

    def frameReceived(self, mtype: int, body: Container) -> None:
        d = self.d
        if mtype == T.REQUEST:
            cid = bytes(body.client_id)
            if cid not in self.client_ids:
                self.client_ids.add(cid)
                d.clients[cid] = self
            d.route(body, self.current_frame, self)
        elif mtype == T.WATCH:
            self.watching = True
            d.watchers.add(self)
            if d.config_frame is not None:
                self.send(d.config_frame)
        else:
            self.unexpected(mtype)

    def connection_lost(self, reason: Failure) -> None:
        self.d.watchers.discard(self)
        for cid in self.client_ids:
            if self.d.clients.get(cid) is self:
                del self.d.clients[cid]


class NodeLinkProtocol(FrameProtocol):
    """The dispatcher's connection to one node (head or tail of a chain)."""

    peer_kind = "node"

    def __init__(self, link: NodeLink) -> None:
        self.link = link

    def connectionMade(self) -> None:
        self.link.proto = self

    def frameReceived(self, mtype: int, body: Container) -> None:
        if mtype == T.REPLY:
            client = self.link.d.clients.get(bytes(body.client_id))
            if client is not None:
                client.send(self.current_frame)
        elif mtype == T.ERROR:
            self.log.warn(
                "node {name} closed our link: {message}",
                name=self.link.member.name,
                message=error_text(body),
            )
        else:
            self.unexpected(mtype)

    def connection_lost(self, reason: Failure) -> None:
        if self.link.proto is self:
            self.link.proto = None


class NodeLink:
    """A reconnecting connection to one node."""

    def __init__(self, d: DispatcherService, member: Member) -> None:
        self.d = d
        self.member = member
        self.proto: NodeLinkProtocol | None = None
        factory = Factory.forProtocol(lambda: NodeLinkProtocol(self))
        self.service = ClientService(
            clientFromString(d.reactor, member.endpoint()),
            factory,
            retryPolicy=LINK_RETRY,
            clock=d.reactor,
        )
        self.service.startService()

    def close(self) -> None:
        self.service.stopService()
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.loseConnection()


class MasterLinkProtocol(FrameProtocol):
    """The dispatcher's subscription to the master's configuration."""

    peer_kind = "master"

    def __init__(self, d: DispatcherService) -> None:
        self.d = d

    def connectionMade(self) -> None:
        self.d.master_proto = self
        self.send(wire.encode(T.WATCH, name=b"dispatcher"))

    def frameReceived(self, mtype: int, body: Container) -> None:
        if mtype == T.CONFIG:
            self.d.on_config(ClusterConfig.from_wire(body), self.current_frame)
        else:
            self.unexpected(mtype)

    def connection_lost(self, reason: Failure) -> None:
        if self.d.master_proto is self:
            self.d.master_proto = None


class DispatcherService(service.MultiService):
    """The routing service; opens its ports in L{startService}."""

    log = Logger()

    def __init__(
        self,
        *,
        listen: str,
        master: str,
        admin: str | None = None,
        port_file: str | None = None,
        reactor: Any = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.listen = listen
        self.master = master
        self.admin = admin
        self.port_file = port_file
        self.reactor = reactor
        self.config: ClusterConfig = EMPTY
        self.config_frame: bytes | None = None
        self.links: dict[str, NodeLink] = {}
        self.clients: dict[bytes, ClientProtocol] = {}
        self.watchers: set[ClientProtocol] = set()
        self.master_proto: MasterLinkProtocol | None = None
        self._ports: list[IListeningPort] = []
        self._master_service: ClientService | None = None
        self.listen_port = 0
        self.admin_port: int | None = None
        self.routed = 0
        self.unavailable = 0

    def startService(self) -> None:
        super().startService()
        self._master_service = ClientService(
            clientFromString(self.reactor, self.master),
            Factory.forProtocol(lambda: MasterLinkProtocol(self)),
            retryPolicy=LINK_RETRY,
            clock=self.reactor,
        )
        self._master_service.startService()
        self._started = defer.ensureDeferred(self._listen())
        self._started.addErrback(self._start_failed)

    async def _listen(self) -> None:
        port = await serverFromString(self.reactor, self.listen).listen(
            Factory.forProtocol(lambda: ClientProtocol(self))
        )
        self._ports.append(port)
        self.listen_port = port.getHost().port
        if self.admin:
            from ckv.dispatcher.admin import dispatcher_admin_factory

            aport = await serverFromString(self.reactor, self.admin).listen(
                dispatcher_admin_factory(self)
            )
            self._ports.append(aport)
            self.admin_port = aport.getHost().port
        if self.port_file:
            from ckv.portfile import write_port_file

            write_port_file(self.port_file, self.listen_port, self.admin_port)
        self.log.info(
            "dispatcher listening on port {port}, admin {admin}",
            port=self.listen_port,
            admin=self.admin_port,
        )

    def _start_failed(self, f: Failure) -> None:
        self.log.failure("dispatcher failed to start", f)
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self) -> None:
        if self._master_service is not None:
            await self._master_service.stopService()
        for link in self.links.values():
            link.close()
        self.links.clear()
        for port in self._ports:
            await defer.maybeDeferred(port.stopListening)
        for p in set(self.clients.values()) | self.watchers:
            if p.transport is not None:
                p.transport.loseConnection()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    # -- configuration -----------------------------------------------------

    def on_config(self, config: ClusterConfig, frame: bytes) -> None:
        if config.version < self.config.version:
            return
        self.config = config
        self.config_frame = frame
        wanted: dict[str, Member] = {}
        for chain in config.chains:
            for m in (chain.head, chain.tail):
                if m is not None:
                    wanted[m.name] = m
        for name in list(self.links):
            if name not in wanted or self.links[name].member != wanted[name]:
                self.links.pop(name).close()
        for name, m in wanted.items():
            if name not in self.links:
                self.links[name] = NodeLink(self, m)
        for w in list(self.watchers):
            w.send(frame)
        self.log.info("dispatcher: configuration version {v}", v=config.version)

    # -- routing -----------------------------------------------------------

    def route(self, req: Container, frame: bytes, client: ClientProtocol) -> None:
        chain = self.config.chain_for_key(req.key)
        if chain is None or not chain.members:
            self._unavailable(req, client, "no chain serves this key yet")
            return
        member = chain.tail if req.op == wire.Op.GET else chain.head
        assert member is not None
        link = self.links.get(member.name)
        if link is None or link.proto is None:
            self._unavailable(req, client, f"node {member.name} is not reachable")
            return
        self.routed += 1
        link.proto.send(frame)

    def _unavailable(self, req: Container, client: ClientProtocol, message: str) -> None:
        self.unavailable += 1
        client.send(wire.error_reply(req.client_id, req.request_id, Status.UNAVAILABLE, message))

    def status(self) -> dict[str, Any]:
        return {
            "listen": self.listen_port,
            "master": "connected" if self.master_proto is not None else "disconnected",
            "config_version": self.config.version,
            "chains": len(self.config.chains),
            "links": ", ".join(
                f"{n}:{'up' if link.proto else 'down'}" for n, link in sorted(self.links.items())
            )
            or "-",
            "clients": len(self.clients),
            "watchers": len(self.watchers),
        }

    def stats(self) -> dict[str, Any]:
        return {"routed": self.routed, "unavailable": self.unavailable}
