"""
The node: a L{Replica} wired to LMDB, to its neighbours, to the master and
to clients.  Everything here is plumbing; decisions live in the replica.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

import lmdb
from construct import Container
from twisted.application import service
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread, deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ckv import wire
from ckv.chain.replica import (
    TO_CLIENT,
    TO_ORIGIN,
    TO_PREDECESSOR,
    TO_SUCCESSOR,
    Action,
    HelloRefused,
    Replica,
)
from ckv.chain.tap import DEFAULT_SESSION_TTL
from ckv.chain.transfer import SnapshotSender, apply_snapshot_frame, snapshot_ack
from ckv.config import EMPTY, ClusterConfig, Member
from ckv.framing import FrameProtocol, error_text
from ckv.storage import Batch, Store
from ckv.wal import LogFailed
from ckv.wire import MessageType as T

#: Sessions looked at per write transaction of a sweep (about a millisecond).
SWEEP_CHUNK = 1000

#: How soon a sweep chunk held back by a checkpoint in progress tries again.
SWEEP_RETRY = 0.05

#: A chunk is held back by checkpoints for this long at most, then runs
#: anyway: when the disk cannot keep up they run back to back, and the
#: sweep would never get its turn (commits wait for them then anyway).
SWEEP_HOLD_MAX = 2.0


def session_sweep_interval(ttl: float) -> float:
    """How often to look for expired sessions: a tenth of the TTL, 1 s to 10 min."""
    return min(600.0, max(1.0, ttl / 10))


#: Reconnection to the successor and the master: fast first, then backing off.
LINK_RETRY = backoffPolicy(initialDelay=0.05, maxDelay=2.0, factor=2.0)


class NodeProtocol(FrameProtocol):
    """
    A connection accepted by a node: from a client (reply channel, direct
    requests), a dispatcher (forwarded requests) or the predecessor (the
    chain link, after CHAIN_HELLO).
    """

    peer_kind = "connection"

    def __init__(self, node: NodeService) -> None:
        self.node = node
        self.client_id: bytes | None = None
        self.is_predecessor = False

    def dataReceived(self, data: bytes) -> None:
        # Decide on the frames of this read, then commit them as one batch
        # (group commit): one transaction and one forwarded frame for
        # everything that arrived together, or for every FLUSH_EVERY of them
        # when many arrive at once (see flush_point).
        super().dataReceived(data)
        self.node.kick()

    def flush_point(self) -> None:
        # Commit (or queue) what was decided so far, and send it on now: the
        # successor starts on it while we handle the rest of this read.
        self.node.kick()
        super().flush_point()

    def frameReceived(self, mtype: int, body: Container) -> None:
        node = self.node
        if mtype == T.REQUEST:
            if body.op == wire.Op.GET:
                node.execute(node.replica.on_query(body, self))
            else:
                node.execute(node.replica.on_client_update(body, self))
        elif mtype == T.UPDATES:
            if not self.is_predecessor:
                self.unexpected(mtype)
                return
            if body.epoch < node.replica.epoch:
                # Fenced: the sender has not learnt our newer configuration.
                # It will ask the master and come back with a new hello.
                self.protocol_error(
                    wire.ErrorCode.STALE_EPOCH,
                    f"updates of epoch {body.epoch}; {node.name} is at epoch {node.replica.epoch}",
                )
                return
            if body.epoch > node.replica.epoch:
                node.master_link_refresh()
            node.replica.on_updates(body.epoch, body.entries, body.raws)
            # Weigh by entries (the frame itself counts one more once handled).
            self.weigh(len(body.entries) - 1)
        elif mtype == T.SNAPSHOT:
            if not self.is_predecessor or not node.replica.is_joining:
                self.unexpected(mtype)
                return
            node.on_snapshot_frame(self, body)
        elif mtype == T.COMMITTED:
            if not self.is_predecessor:
                self.unexpected(mtype)
                return
            node.execute(node.replica.on_committed(body.epoch, body.seq))
        elif mtype == T.FENCE:
            if not self.is_predecessor:
                self.unexpected(mtype)
                return
            node.replica.on_fence(body.epoch, body.seq)
        elif mtype == T.CLIENT_HELLO:
            if self.client_id is not None and node.client_channels.get(self.client_id) is self:
                del node.client_channels[self.client_id]
            self.client_id = bytes(body.client_id)
            node.client_channels[self.client_id] = self
            self.send(wire.encode(T.WELCOME, name=node.name.encode(), epoch=node.replica.epoch))
        elif mtype == T.CHAIN_HELLO:
            node.predecessor_hello(self, body)
        else:
            self.unexpected(mtype)

    def connection_lost(self, reason: Failure) -> None:
        node = self.node
        if self.client_id is not None and node.client_channels.get(self.client_id) is self:
            del node.client_channels[self.client_id]
        if node.pred_proto is self:
            node.pred_proto = None


class SuccessorProtocol(FrameProtocol):
    """Our end of the link to the successor: hello, then updates out and acks in."""

    peer_kind = "successor"

    def __init__(self, node: NodeService) -> None:
        self.node = node
        self.ready = False
        self.sender: SnapshotSender | None = None

    def connectionMade(self) -> None:
        self.send(self.node.replica.hello_frame())

    def frameReceived(self, mtype: int, body: Container) -> None:
        node = self.node
        if mtype == T.CHAIN_HELLO_REPLY:
            if body.epoch != node.replica.epoch:
                # Our configuration moved while the hello was in flight:
                # start over with a hello at the current epoch.
                self.transport.loseConnection()
                return
            self.ready = True
            node.succ_proto = self
            if node.replica.successor_is_joining:
                node.start_transfer(self)
                return
            node.execute(node.replica.on_successor_ready(body.epoch, body.applied_seq))
            if node.replica.left:
                node.leave_chain()
                return
            if node.replica.forward_cursor is None:
                # Refused (logged by the replica): retry later on a new link
                # rather than sit on one that carries nothing.
                self.transport.loseConnection()
        elif mtype == T.SNAPSHOT_ACK and self.sender is not None:
            self.sender.on_ack(body.chunk)
        elif mtype == T.ACK and self.ready:
            node.execute(node.replica.on_ack(body.epoch, body.seq))
            node.kick()
        elif mtype == T.ERROR:
            self.log.warn("successor refused the link: {message}", message=error_text(body))
            node.master_link_refresh()
            self.transport.loseConnection()
        else:
            self.unexpected(mtype)

    def connection_lost(self, reason: Failure) -> None:
        if self.sender is not None:
            self.sender.cancel()
        if self.node.succ_proto is self:
            self.node.succ_proto = None
            self.node.replica.on_successor_lost()


class MasterProtocol(FrameProtocol):
    """The node's connection to the master: register, then receive configurations."""

    peer_kind = "master"

    def __init__(self, node: NodeService) -> None:
        self.node = node

    def connectionMade(self) -> None:
        self.node.master_proto = self
        self.node.heartbeats_sent.clear()
        self.node.send_register()

    def frameReceived(self, mtype: int, body: Container) -> None:
        if mtype == T.CONFIG:
            self.node.on_config(ClusterConfig.from_wire(body))
        elif mtype == T.HEARTBEAT_REPLY:
            self.node.on_heartbeat_reply(body)
        elif mtype == T.ERROR:
            self.log.error("master refused us: {message}", message=error_text(body))
        else:
            self.unexpected(mtype)

    def connection_lost(self, reason: Failure) -> None:
        if self.node.master_proto is self:
            self.node.master_proto = None
            self.node.heartbeats_sent.clear()


class _Factory(Factory):
    def __init__(self, cls: type, node: NodeService) -> None:
        self.cls = cls
        self.node = node

    def buildProtocol(self, addr: Any) -> FrameProtocol:
        p = self.cls(self.node)
        p.factory = self
        return p


class NodeService(service.MultiService):
    """
    One chain replica as a Twisted service.

    LMDB, the listening sockets and the writer thread are opened in
    L{startService} (never in the constructor: twistd may fork after it).
    """

    log = Logger()

    def __init__(
        self,
        *,
        name: str,
        listen: str,
        master: str,
        data_dir: str,
        sync: str = "durable",
        admin: str | None = None,
        advertise: str | None = None,
        port_file: str | None = None,
        reactor: Any = None,
        commit_inline: bool = False,
        clock: Any = None,
        session_ttl: float = DEFAULT_SESSION_TTL,
        wall_clock: Any = None,
        in_thread: Any = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.name = name
        self.listen = listen
        self.master = master
        self.data_dir = data_dir
        self.sync = sync
        self.admin = admin
        self.advertise = advertise
        self.port_file = port_file
        self.reactor = reactor
        self.commit_inline = commit_inline
        #: Monotonic seconds, for the read lease.
        self.clock = clock or time.monotonic
        #: Wall-clock seconds, stamped on sessions (see L{expire_sessions}).
        self.wall_clock = wall_clock or time.time
        #: Sessions idle for longer than this are deleted; 0 keeps them.
        self.session_ttl = session_ttl
        #: Runs a long read (a digest) off the reactor thread: f -> Deferred.
        self._in_thread = in_thread or self._in_reactor_pool
        #: Digests being computed (the store stays open until they finish).
        self._digests: set[defer.Deferred[Any]] = set()
        #: The map is full and waits for the digests to end to grow.
        self._growing = False
        self._session_sweeper: LoopingCall | None = None
        #: The sweep in progress: where the next chunk starts (None: none).
        self._sweep_start: bytes | None = None
        self._sweep_deleted = 0
        #: A sweep chunk is being written (no commit may start meanwhile).
        self._sweeping = False
        self._sweep_waiters: list[defer.Deferred[int]] = []
        #: The next try of a chunk held back by a checkpoint, and since when
        #: it is held back.
        self._sweep_retry: IDelayedCall | None = None
        self._sweep_held_since: float | None = None
        #: Set when the service stops: no sweep chunk starts any more.
        self._stopping = False
        #: When each REGISTER/HEARTBEAT still unanswered was sent (the
        #: master answers in order on one connection).
        self.heartbeats_sent: deque[float] = deque()
        #: The read lease: queries are answered only before this instant.
        self.lease_until = 0.0
        self.heartbeat_interval = 1.0
        self._heartbeat_loop: LoopingCall | None = None
        #: A state transfer is being written to our store.
        self.receiving_snapshot = False
        #: (chain, epoch) at which we completed a state transfer as a joiner.
        self.joined: tuple[int, int] | None = None
        #: The transfer in progress: its link and the last chunk taken.
        self._transfer: tuple[NodeProtocol, int] | None = None
        self.config: ClusterConfig = EMPTY
        self.client_channels: dict[bytes, NodeProtocol] = {}
        self.pred_proto: NodeProtocol | None = None
        self.succ_proto: SuccessorProtocol | None = None
        self.master_proto: MasterProtocol | None = None
        self._succ_member: Member | None = None
        self._succ_service: ClientService | None = None
        self._master_service: ClientService | None = None
        self._ports: list[IListeningPort] = []
        self._pool: ThreadPool | None = None
        self._syncer: LoopingCall | None = None
        self.store: Store | None = None
        self.replica: Replica = None  # type: ignore[assignment]
        self.listen_port = 0
        self.admin_port: int | None = None
        self.host = "127.0.0.1"

    # -- lifecycle ---------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.store = Store(self.data_dir, self.sync, clock=self.wall_clock)
        self.store.open()
        recovered = self.store.recover()
        # Restarted: what we had accepted but not committed is gone, and our
        # successor may hold some of it (see Replica.verified).
        self.replica = Replica(
            self.name, self.store, recovered, lease_ok=self.holds_lease, restarted=True
        )
        self.log.info(
            "node {name} opened {path}: applied seq {seq}, epoch {epoch}, {sent} unacknowledged",
            name=self.name,
            path=self.data_dir,
            seq=recovered.applied_seq,
            epoch=recovered.epoch,
            sent=len(recovered.sent),
        )
        # Without fsync a commit takes microseconds: do it on the reactor
        # thread.  With fsync, a dedicated thread, so the reactor keeps
        # receiving and forwarding while the disk works.
        if not self.commit_inline and self.sync == "durable":
            self._pool = ThreadPool(minthreads=1, maxthreads=1, name=f"ckv-lmdb-{self.name}")
            self._pool.start()
        if self.sync == "replicated":
            self._syncer = LoopingCall(self._periodic_sync)
            self._syncer.clock = self.reactor
            self._syncer.start(1.0, now=False)
        if self.session_ttl > 0:
            self._session_sweeper = LoopingCall(self.expire_sessions)
            self._session_sweeper.clock = self.reactor
            self._session_sweeper.start(session_sweep_interval(self.session_ttl), now=False)
        self._started = defer.ensureDeferred(self._listen())
        self._started.addErrback(self._start_failed)

    async def _listen(self) -> None:
        ep = serverFromString(self.reactor, self.listen)
        port = await ep.listen(_Factory(NodeProtocol, self))
        self._ports.append(port)
        addr = port.getHost()
        self.listen_port = addr.port
        if self.advertise:
            from ckv.portfile import split_host_port

            self.host, self.listen_port = split_host_port(self.advertise)
        elif addr.host not in ("0.0.0.0", "::", ""):
            self.host = addr.host
        if self.admin:
            from ckv.chain.admin import node_admin_factory

            aport = await serverFromString(self.reactor, self.admin).listen(
                node_admin_factory(self)
            )
            self._ports.append(aport)
            self.admin_port = aport.getHost().port
        if self.port_file:
            from ckv.portfile import write_port_file

            write_port_file(self.port_file, addr.port, self.admin_port)
        self.log.info(
            "node {name} listening on {host}:{port}, admin {admin}",
            name=self.name,
            host=self.host,
            port=self.listen_port,
            admin=self.admin_port,
        )
        self._master_service = ClientService(
            clientFromString(self.reactor, self.master),
            _Factory(MasterProtocol, self),
            retryPolicy=LINK_RETRY,
            clock=self.reactor,
        )
        self._master_service.startService()
        self._start_heartbeats(self.heartbeat_interval)

    def _start_heartbeats(self, interval: float) -> None:
        if self._heartbeat_loop is not None and self._heartbeat_loop.running:
            self._heartbeat_loop.stop()
        self.heartbeat_interval = interval
        self._heartbeat_loop = LoopingCall(self.send_heartbeat)
        self._heartbeat_loop.clock = self.reactor
        self._heartbeat_loop.start(interval, now=False).addErrback(
            lambda f: self.log.failure("heartbeat loop stopped", f)
        )

    def _start_failed(self, f: Failure) -> None:
        self.log.failure("node {name} failed to start", f, name=self.name)
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self) -> None:
        self._stopping = True
        if self._heartbeat_loop is not None and self._heartbeat_loop.running:
            self._heartbeat_loop.stop()
        for svc in (self._master_service, self._succ_service):
            if svc is not None:
                await svc.stopService()
        for port in self._ports:
            await defer.maybeDeferred(port.stopListening)
        for proto in list(self.client_channels.values()) + [self.pred_proto]:
            if proto is not None and proto.transport is not None:
                proto.transport.loseConnection()
        if self._syncer is not None and self._syncer.running:
            self._syncer.stop()
        if self._session_sweeper is not None and self._session_sweeper.running:
            self._session_sweeper.stop()
        if self._sweep_retry is not None and self._sweep_retry.active():
            self._sweep_retry.cancel()
        if self._sweep_start is not None:
            self._sweep_start = None
            self._sweep_over()  # its waiters get what was deleted so far
        if self._pool is not None:
            self._pool.stop()
        while self._digests:
            # A thread is reading the store: closing it under that thread
            # would pull the memory map from under its feet.  (No new digest
            # starts once stopping, but one may have started during the
            # awaits above.)
            await self._digests_done()
        if self.store is not None:
            self.store.close()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    # -- configuration -----------------------------------------------------

    def register_frame(self) -> bytes:
        r = self.replica
        return wire.encode(
            T.REGISTER,
            name=self.name.encode(),
            host=self.host.encode(),
            port=self.listen_port,
            # A node that left its chain says it has none: the master takes
            # it out, and it comes back by state transfer.
            chain_id=wire.NO_CHAIN if r.left else r.chain_id,
            epoch=r.epoch,
            # What the store holds for sure: the master checks that a
            # restarted member did not come back with less.
            applied_seq=r.committed_seq,
        )

    def on_config(self, config: ClusterConfig) -> None:
        if config.version < self.config.version:
            return
        self.config = config
        chain = config.chain_of_node(self.name)
        before = (self.replica.role, self.replica.epoch)
        self.execute(self.replica.on_config(chain))
        if (self.replica.role, self.replica.epoch) != before:
            self.log.info(
                "node {name}: chain {chain} epoch {epoch}, role {role}",
                name=self.name,
                chain=self.replica.chain_id,
                epoch=self.replica.epoch,
                role=self.replica.role,
            )
        # The predecessor link stays only if its sender is still our predecessor.
        pred = self.pred_proto
        if pred is not None and getattr(pred, "peer_name", None) != self.replica.predecessor:
            pred.transport.loseConnection()
            self.pred_proto = None
        succ = chain.successor_of(self.name) if chain is not None else None
        if succ != self._succ_member:
            self._connect_successor(succ)
        self.kick()

    def _connect_successor(self, member: Member | None) -> None:
        if self._succ_service is not None:
            self._succ_service.stopService()
            self._succ_service = None
        if self.succ_proto is not None:
            self.succ_proto.transport.loseConnection()
            self.succ_proto = None
        self.replica.on_successor_lost()
        self._succ_member = member
        if member is None:
            return
        self._succ_service = ClientService(
            clientFromString(self.reactor, member.endpoint()),
            _Factory(SuccessorProtocol, self),
            retryPolicy=LINK_RETRY,
            clock=self.reactor,
        )
        self._succ_service.startService()

    def leave_chain(self) -> None:
        """
        Our successor is ahead of us after a restart (see Replica.left):
        stop linking to it and tell the master we lost our chain.  It
        removes us; we come back as a spare and rejoin by state transfer.
        """
        self.log.warn(
            "node {name} leaves chain {chain}", name=self.name, chain=self.replica.chain_id
        )
        self._connect_successor(None)
        self.send_register()

    def master_link_refresh(self) -> None:
        """Ask the master for the configuration again (we may be behind)."""
        self.send_register()

    def send_register(self) -> None:
        if self.master_proto is not None:
            self.heartbeats_sent.append(self.clock())
            self.master_proto.send(self.register_frame())

    def send_heartbeat(self) -> None:
        try:
            if self.master_proto is None or self.replica is None:
                return
            self.heartbeats_sent.append(self.clock())
            r = self.replica
            self.master_proto.send(
                wire.encode(
                    T.HEARTBEAT,
                    name=self.name.encode(),
                    epoch=r.epoch,
                    applied_seq=r.committed_seq,
                )
            )
            self.send_joined()
        except Exception:
            self.log.failure("sending a heartbeat failed")

    def on_heartbeat_reply(self, body: Container) -> None:
        """The master heard us: a read lease from when that heartbeat left."""
        if not self.heartbeats_sent:
            return
        sent = self.heartbeats_sent.popleft()
        self.lease_until = max(self.lease_until, sent + body.lease_ms / 1000.0)
        interval = body.interval_ms / 1000.0
        if interval > 0 and interval != self.heartbeat_interval:
            self._start_heartbeats(interval)

    def holds_lease(self) -> bool:
        return self.clock() < self.lease_until

    def predecessor_hello(self, proto: NodeProtocol, body: Container) -> None:
        name = bytes(body.name).decode("utf-8", "replace")
        try:
            frame = self.replica.on_chain_hello(body.chain_id, body.epoch, name, body.committed_seq)
        except HelloRefused as e:
            if e.code == wire.ErrorCode.STALE_EPOCH and body.epoch > self.replica.epoch:
                self.master_link_refresh()
            proto.protocol_error(e.code, e.message)
            return
        if self.pred_proto is not None and self.pred_proto is not proto:
            self.pred_proto.transport.loseConnection()
        proto.is_predecessor = True
        proto.peer_name = name  # type: ignore[attr-defined]
        self.pred_proto = proto
        proto.send(frame)
        # An ack lost with the previous link is not lost for good: tell the
        # predecessor again how far the tail has got.
        r = self.replica
        if r.acked_seq and not r.is_joining:
            proto.send(wire.ack(r.epoch, r.acked_seq))
        self.log.info(
            "predecessor {pred} linked at epoch {epoch}; we have seq {seq}",
            pred=name,
            epoch=body.epoch,
            seq=self.replica.applied_seq,
        )

    # -- state transfer ----------------------------------------------------

    def start_transfer(self, proto: SuccessorProtocol) -> None:
        """Our successor is joining: send it a snapshot, then stream after it."""
        assert self.store is not None
        if proto.sender is not None:
            proto.sender.cancel()

        def done(seq: int) -> None:
            if proto is self.succ_proto:
                self.execute(self.replica.on_transfer_done(self.replica.epoch, seq))

        proto.sender = SnapshotSender(self.store, self.replica.epoch, proto.send, done)
        self.log.info(
            "node {name}: state transfer to joining {succ} from seq {seq}",
            name=self.name,
            succ=self.replica.successor,
            seq=proto.sender.seq,
        )
        proto.sender.start()

    def on_snapshot_frame(self, proto: NodeProtocol, body: Container) -> None:
        """
        A chunk of the tail's snapshot (we are joining).  Chunks must come
        in order (BEGIN 0, DATA 1..n, END n+1) on one link; anything else
        abandons the transfer, and the tail starts a new one on a new link.
        """
        assert self.store is not None
        phase, chunk, seq = body.phase, body.chunk, body.seq
        if phase == wire.SNAPSHOT_BEGIN:
            r = self.replica
            if self.joined == (r.chain_id, r.epoch):
                # We hold a snapshot of this join and told the master: it may
                # promote us any moment, so our store must stay whole.  The
                # tail resends what we lack once we are its successor.
                proto.protocol_error(
                    wire.ErrorCode.REJECTED,
                    f"{self.name} already holds a snapshot for epoch {r.epoch}; "
                    "waiting to be made tail",
                )
                return
            self.joined = None
            # From now on nothing of ours may reach the store: it is wiped.
            self.receiving_snapshot = True
            self.replica.pending.clear()
            self._transfer = (proto, 0)
        elif self._transfer != (proto, chunk - 1):
            self._abort_transfer(proto, f"snapshot chunk {chunk} out of order")
            return
        self._transfer = (proto, chunk)
        d = self._store_call(apply_snapshot_frame, self.store, body)

        def applied(end: bool) -> defer.Deferred[Any] | None:
            if self._transfer is None or self._transfer[0] is not proto:
                return None  # abandoned meanwhile
            if not end:
                proto.send(snapshot_ack(body.epoch, chunk))
                return None
            return self._store_call(
                self.store.finish_snapshot,  # type: ignore[union-attr]
                seq,
                self.replica.epoch,
                self.replica.chain_id,
            ).addCallback(lambda _: self._snapshot_complete(proto, body.epoch, chunk, seq))

        d.addCallback(applied)
        d.addErrback(self._snapshot_failed, proto)

    def _snapshot_complete(self, proto: NodeProtocol, epoch: int, chunk: int, seq: int) -> None:
        assert self.store is not None
        if self._transfer is None or self._transfer[0] is not proto:
            return
        self._transfer = None
        chain = self.replica.chain
        # Our memory starts from the store, as after a restart: the snapshot
        # may hold writes of the tail that are not on every disk yet, so
        # nothing of it counts as settled before the tail's frontier says so.
        self.replica = Replica(
            self.name, self.store, self.store.recover(), lease_ok=self.holds_lease, restarted=True
        )
        self.execute(self.replica.on_config(chain))
        self.receiving_snapshot = False
        self.joined = (self.replica.chain_id, self.replica.epoch)
        proto.send(snapshot_ack(epoch, chunk))
        self.log.info(
            "node {name} holds the snapshot at seq {seq}; following the tail",
            name=self.name,
            seq=seq,
        )
        self.send_joined()
        # A sweep held back by the transfer goes on now (no commit may end
        # to start it on an idle node).
        if not self._sweep_step():
            self.kick()

    def _snapshot_failed(self, f: Failure, proto: NodeProtocol) -> None:
        self.log.failure("applying a snapshot chunk failed", f)
        self._abort_transfer(proto, "applying a snapshot chunk failed")

    def _abort_transfer(self, proto: NodeProtocol, why: str) -> None:
        """Give up this transfer; our store stays marked incomplete until a new one."""
        self._transfer = None
        self.joined = None
        proto.protocol_error(wire.ErrorCode.REJECTED, f"state transfer abandoned: {why}")

    def send_joined(self) -> None:
        """Tell the master we caught up (again with every heartbeat until promoted)."""
        if self.joined is None or not self.replica.is_joining or self.master_proto is None:
            return
        chain_id, epoch = self.joined
        if epoch != self.replica.epoch:
            return
        self.master_proto.send(
            wire.encode(T.JOINED, name=self.name.encode(), chain_id=chain_id, epoch=epoch)
        )

    # -- actions and commits -----------------------------------------------

    def execute(self, actions: list[Action]) -> None:
        for a in actions:
            kind = a.kind
            if kind == TO_CLIENT:
                channel = self.client_channels.get(a.target)
                if channel is not None:
                    channel.send(a.frame)
                elif a.origin is not None:
                    a.origin.send(a.frame)
            elif kind == TO_SUCCESSOR:
                if self.succ_proto is not None:
                    self.succ_proto.send(a.frame)
            elif kind == TO_PREDECESSOR:
                if self.pred_proto is not None:
                    self.pred_proto.send(a.frame)
            elif kind == TO_ORIGIN:
                if a.target is not None:
                    a.target.send(a.frame)

    def kick(self) -> None:
        """
        Start committing the next batch, unless one is in flight, and send
        the successor what it has not had yet: the accepted entries go on
        while the disk works (pipelined durability), then our frontier.
        """
        if not (self.receiving_snapshot or self._sweeping or self._growing):
            batch = self.replica.take_batch()
            if batch is not None:
                replica = self.replica
                # Inline (replicated mode) this commits, and kicks again,
                # before the forward below: one burst carries the entries
                # and the frontier that covers them.
                d = self._store_call(self.store.commit, batch)  # type: ignore[union-attr]
                d.addCallbacks(
                    self._committed,
                    self._commit_failed,
                    callbackArgs=(batch, replica),
                    errbackArgs=(batch, replica),
                )
        self.execute(self.replica.forward())

    def _store_call(self, f: Any, *args: Any) -> defer.Deferred[Any]:
        """Run a store write: on the writer thread (in order) or inline."""
        if self._pool is None:
            return defer.maybeDeferred(f, *args)
        return deferToThreadPool(self.reactor, self._pool, f, *args)

    def _committed(self, _: Any, batch: Batch, replica: Replica) -> None:
        if replica is not self.replica:
            return  # superseded by a state transfer
        self.execute(self.replica.batch_committed(batch))
        # A session sweep in progress takes its turn between two commits.
        if not self._sweep_step():
            self.kick()

    def _commit_failed(self, f: Failure, batch: Batch, replica: Replica) -> None:
        if replica is not self.replica:
            return
        self.replica.batch_failed(batch)
        if f.check(lmdb.MapFullError):
            self._grow()
            return
        if f.check(LogFailed):
            # What the disk holds is unknown: stop, so the master takes the
            # node out; started again, it recovers from what its log holds.
            self.log.critical(
                "node {name} stops: {error}", name=self.name, error=f.getErrorMessage()
            )
            if self.reactor.running:
                self.reactor.stop()
            return
        self.log.failure("commit of {n} entries failed; retrying in 1s", f, n=len(batch.entries))
        self.reactor.callLater(1.0, self.kick)

    def _grow(self) -> None:
        """
        Grow the full map, then commit again.  LMDB resizes the map only
        with no transaction open in the process, and a digest thread holds
        one: until the digests are done, no commit starts (C{_growing}).
        """
        if self._digests:
            self._growing = True
            self._digests_done().addCallback(lambda _: self._grow())
            return
        self._growing = False
        if self.store is not None and self.store.env is not None:
            self.store.grow()
        self.kick()

    def expire_sessions(self) -> defer.Deferred[int]:
        """
        Delete the sessions idle for longer than C{session_ttl}: one pass
        over the table, L{SWEEP_CHUNK} records per write transaction.  A
        chunk runs where commits run and never while one is in flight (so a
        failed commit can grow the map: LMDB allows that only with no write
        transaction open); under load chunks alternate with commits.  Fires
        with how many were deleted once the pass is over.
        """
        d: defer.Deferred[int] = defer.Deferred()
        self._sweep_waiters.append(d)
        if self._sweep_start is None:
            self._sweep_start = b""
            self._sweep_deleted = 0
            self._sweep_step()
        return d

    def _sweep_step(self) -> bool:
        """Run the next chunk of a sweep if one is due and nothing is being written."""
        if (
            self._sweep_start is None
            or self._sweeping
            or self._growing
            or self._stopping
            or self.store is None
            or self.replica.busy
            or self.receiving_snapshot
        ):
            return False
        if self._held_by_checkpoint():
            if self._sweep_retry is None or not self._sweep_retry.active():
                self._sweep_retry = self.reactor.callLater(SWEEP_RETRY, self._sweep_step)
            return False
        self._sweep_held_since = None
        self._sweeping = True
        d = self._store_call(
            self.store.expire_sessions, self.session_ttl, self._sweep_start, SWEEP_CHUNK
        )
        d.addCallbacks(self._swept, self._sweep_failed)
        return True

    def _held_by_checkpoint(self) -> bool:
        """
        Hold the next chunk back while a checkpoint is being written: its
        write transaction would wait for the checkpoint's (about 0.1 s for
        65,536 entries here, more on a busy disk), and every commit behind it.
        But not for longer than L{SWEEP_HOLD_MAX}.
        """
        assert self.store is not None
        if not self.store.checkpointing:
            return False
        now = self.reactor.seconds()
        if self._sweep_held_since is None:
            self._sweep_held_since = now
        return now - self._sweep_held_since < SWEEP_HOLD_MAX

    def _swept(self, result: tuple[int, bytes | None]) -> None:
        self._sweeping = False
        deleted, self._sweep_start = result
        self._sweep_deleted += deleted
        if self._sweep_start is None:
            self._sweep_over()
        # Pending updates first; the sweep goes on after their commit, or
        # at the reactor's next turn if there is nothing to commit (never
        # in a loop here: inline, a whole pass would block the reactor).
        self.kick()
        if self._sweep_start is not None:
            self.reactor.callLater(0, self._sweep_step)

    def _sweep_failed(self, f: Failure) -> None:
        # Map full, a store closed at shutdown: try again at the next sweep.
        self._sweeping = False
        self._sweep_start = None
        self.log.failure("expiring sessions failed", f)
        self._sweep_over()
        self.kick()

    def _sweep_over(self) -> None:
        total = self._sweep_deleted
        if total:
            self.log.info(
                "expired {n} client sessions idle for more than {ttl:g}s",
                n=total,
                ttl=self.session_ttl,
            )
        waiters, self._sweep_waiters = self._sweep_waiters, []
        for d in waiters:
            d.callback(total)

    def _periodic_sync(self) -> defer.Deferred[None] | None:
        if self.store is None:
            return None
        d = deferToThread(self.store.sync)
        d.addErrback(lambda f: self.log.failure("periodic sync failed", f))
        return d

    # -- introspection -----------------------------------------------------

    def digest(self) -> defer.Deferred[tuple[int, str, int]]:
        """
        Key count, SHA-256 and last applied seq of this replica's data, from
        one read snapshot.  Computed on a thread: over a big store it takes
        seconds, and the node keeps serving (and sending heartbeats, so the
        master does not take it for dead) meanwhile.
        """
        if self.store is None or self.store.env is None:
            return defer.fail(RuntimeError("the store is not open"))
        if not self.running:
            return defer.fail(RuntimeError(f"node {self.name} is stopping"))
        d = self._in_thread(self.store.digest)
        self._digests.add(d)

        def done(result: Any) -> Any:
            self._digests.discard(d)
            return result

        return d.addBoth(done)

    def _digests_done(self) -> defer.Deferred[Any]:
        """Fires once the digests running now have ended (whatever their outcome)."""
        return defer.DeferredList(list(self._digests), consumeErrors=True)

    def _in_reactor_pool(self, f: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f)

    def status(self) -> dict[str, Any]:
        s = self.replica.status()
        s.update(
            {
                "listen": f"{self.host}:{self.listen_port}",
                "data_dir": os.path.abspath(self.data_dir),
                "sync": self.sync,
                "master": "connected" if self.master_proto is not None else "disconnected",
                "lease_remaining": f"{max(0.0, self.lease_until - self.clock()):.1f}s",
                # "none" at the head: no link is expected, so none is down.
                "predecessor_link": "none"
                if self.replica.predecessor is None
                else ("up" if self.pred_proto is not None else "down"),
                "clients": len(self.client_channels),
            }
        )
        return s

    def stats(self) -> dict[str, Any]:
        r = self.replica
        s: dict[str, Any] = {
            "updates_decided": r.updates_decided,
            "queries_answered": r.queries_answered,
            "duplicates": r.duplicates,
        }
        if self.store is not None:
            s.update(self.store.stats())
        return s
