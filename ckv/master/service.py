"""
The master as a Twisted service: nodes register, dispatchers and clients
watch, and every configuration change is persisted, then pushed to all.
"""

from __future__ import annotations

import os
import time
from typing import Any

import lmdb
from construct import Container
from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ckv import wire
from ckv.dirlock import lock_directory, unlock_directory
from ckv.framing import FrameProtocol
from ckv.master.state import MasterState
from ckv.wire import MessageType as T

_STATE_KEY = b"state"


class MasterProtocol(FrameProtocol):
    """One connection to the master: a node, a dispatcher or a client."""

    peer_kind = "master peer"

    def __init__(self, master: MasterService) -> None:
        self.master = master
        self.node_name: str | None = None

    def frameReceived(self, mtype: int, body: Container) -> None:
        m = self.master
        if mtype == T.REGISTER:
            name = bytes(body.name).decode("utf-8", "replace")
            host = bytes(body.host).decode("utf-8", "replace")
            if not name:
                self.protocol_error(wire.ErrorCode.REJECTED, "a node needs a non-empty name")
                return
            self.node_name = name
            m.subscribers.add(self)
            if not m.register(name, host, body.port, body):
                # Nothing changed, so nothing was pushed: answer this node.
                self.send(m.config_frame())
            # A registration counts as a heartbeat: the node learns the
            # interval and holds a lease from when it sent the REGISTER.
            self.send(m.heartbeat_reply(name))
        elif mtype == T.WATCH:
            m.subscribers.add(self)
            self.send(m.config_frame())
        elif mtype == T.JOINED:
            name = bytes(body.name).decode("utf-8", "replace")
            m.state.heartbeat(name, m.clock())
            if m.state.joined(name, body.chain_id, body.epoch):
                m.log.info(
                    "node {name} caught up with chain {chain}: it is the new tail; "
                    "chains: {chains}",
                    name=name,
                    chain=body.chain_id,
                    chains=m.state.describe(),
                )
                m.changed()
        elif mtype == T.HEARTBEAT:
            name = bytes(body.name).decode("utf-8", "replace")
            m.state.heartbeat(name, m.clock(), body.applied_seq)
            self.send(m.heartbeat_reply(name))
        else:
            self.unexpected(mtype)

    def connection_lost(self, reason: Failure) -> None:
        self.master.subscribers.discard(self)


class _Factory(Factory):
    def __init__(self, master: MasterService) -> None:
        self.master = master

    def buildProtocol(self, addr: Any) -> MasterProtocol:
        p = MasterProtocol(self.master)
        p.factory = self
        return p


class MasterService(service.MultiService):
    """
    The control plane.  Opens its LMDB store and its ports in
    L{startService}.
    """

    log = Logger()

    def __init__(
        self,
        *,
        listen: str,
        data_dir: str,
        admin: str | None = None,
        chains: int = 1,
        chain_length: int = 3,
        heartbeat_interval: float = 1.0,
        failure_timeout: float = 5.0,
        port_file: str | None = None,
        reactor: Any = None,
        clock: Any = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.listen = listen
        self.data_dir = data_dir
        self.admin = admin
        self.chains = chains
        self.chain_length = chain_length
        self.heartbeat_interval = heartbeat_interval
        self.failure_timeout = failure_timeout
        self.port_file = port_file
        self.reactor = reactor
        #: Monotonic seconds, for failure detection.
        self.clock = clock or time.monotonic
        self.state = MasterState(chains, chain_length)
        self._detector: LoopingCall | None = None
        self.subscribers: set[MasterProtocol] = set()
        self._env: lmdb.Environment | None = None
        self._lock_fd: int | None = None
        self._ports: list[IListeningPort] = []
        self._frame: bytes | None = None
        self.listen_port = 0
        self.admin_port: int | None = None

    @property
    def lease_ms(self) -> int:
        """
        The read lease granted with every heartbeat reply: the failure
        timeout less two heartbeat intervals.  A node counts it from when it
        sent its heartbeat, and the master declares a node failed only a
        whole failure timeout after it last heard from it, so a removed tail
        has stopped serving reads before its successor takes over.
        """
        return int(
            max(self.failure_timeout - 2 * self.heartbeat_interval, self.heartbeat_interval) * 1000
        )

    def heartbeat_reply(self, name: str = "") -> bytes:
        return wire.encode(
            T.HEARTBEAT_REPLY,
            lease_ms=0 if name in self.state.draining else self.lease_ms,
            interval_ms=int(self.heartbeat_interval * 1000),
        )

    def planned_remove(self, name: str) -> str:
        """
        Remove a node on purpose (admin `remove NODE`).  A tail first stops
        getting read leases; the new configuration is published once its
        last lease has surely run out, so no read is ever answered by the
        old tail after the new one has answered a newer value.
        """
        state = self.state
        if name not in state.nodes:
            return f"error: no node named {name!r}"
        chain = state.chain_of(name)
        if chain is not None and len(chain.members) <= 1:
            return f"error: {name} is the last member of chain {chain.chain_id}; not removed"
        if chain is not None and chain.members[-1] == name:
            self.state.draining.add(name)
            self.save()
            delay = self._drain_delay()
            self.reactor.callLater(delay, self._finish_removal, name)
            return (
                f"{name} is the tail of chain {chain.chain_id}: its read lease is no longer "
                f"renewed; it leaves the chain in {delay:.1f}s"
            )
        self._finish_removal(name)
        return f"{name} removed"

    def _drain_delay(self) -> float:
        """How long a draining tail's last lease may still run."""
        return self.lease_ms / 1000.0 + self.heartbeat_interval

    def _finish_removal(self, name: str) -> None:
        drained = name in self.state.draining
        self.state.draining.discard(name)
        if self.state.forget(name):
            self.log.info(
                "node {name} removed on request; chains: {chains}",
                name=name,
                chains=self.state.describe(),
            )
            self.changed()
        elif drained:
            self.save()  # refused meanwhile (now the last member): not draining any more

    def startService(self) -> None:
        super().startService()
        os.makedirs(self.data_dir, exist_ok=True)
        # Raises DirectoryInUse: two masters on one directory would each
        # overwrite the other's configuration.
        self._lock_fd = lock_directory(self.data_dir)
        self._env = lmdb.open(self.data_dir, map_size=64 << 20, max_dbs=2)
        self._db = self._env.open_db(b"master")
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(_STATE_KEY)
        if raw is not None:
            self.state = MasterState.from_json(raw, self.chains, self.chain_length)
            self.log.info(
                "master reloaded configuration version {v}: {chains}",
                v=self.state.version,
                chains=self.state.describe(),
            )
        # Nobody is blamed for the time the master itself was away.
        self.state.grace(self.clock())
        # Removals on request that a stop interrupted: the tails get no
        # lease from us from now on; their last one from before runs out
        # within the same delay.
        for name in sorted(self.state.draining):
            self.reactor.callLater(self._drain_delay(), self._finish_removal, name)
        self._detector = LoopingCall(self.detect_failures)
        self._detector.clock = self.reactor
        self._detector.start(self.heartbeat_interval, now=False).addErrback(
            lambda f: self.log.failure("failure detector stopped", f)
        )
        self._started = defer.ensureDeferred(self._listen())
        self._started.addErrback(self._start_failed)

    async def _listen(self) -> None:
        port = await serverFromString(self.reactor, self.listen).listen(_Factory(self))
        self._ports.append(port)
        self.listen_port = port.getHost().port
        if self.admin:
            from ckv.master.admin import master_admin_factory

            aport = await serverFromString(self.reactor, self.admin).listen(
                master_admin_factory(self)
            )
            self._ports.append(aport)
            self.admin_port = aport.getHost().port
        if self.port_file:
            from ckv.portfile import write_port_file

            write_port_file(self.port_file, self.listen_port, self.admin_port)
        self.log.info(
            "master listening on port {port}, admin {admin}",
            port=self.listen_port,
            admin=self.admin_port,
        )

    def _start_failed(self, f: Failure) -> None:
        self.log.failure("master failed to start", f)
        if self.reactor.running:
            self.reactor.stop()

    async def _stop(self) -> None:
        if self._detector is not None and self._detector.running:
            self._detector.stop()
        for port in self._ports:
            await defer.maybeDeferred(port.stopListening)
        for p in list(self.subscribers):
            if p.transport is not None:
                p.transport.loseConnection()
        if self._env is not None:
            self._env.close()
            self._env = None
        unlock_directory(self._lock_fd)
        self._lock_fd = None

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.ensureDeferred(self._stop())

    # -- decisions ---------------------------------------------------------

    def register(self, name: str, host: str, port: int, body: Container) -> bool:
        """Record a registration; True if the new configuration was pushed."""
        lost = self.state.lost_data(name, body.chain_id, body.applied_seq)
        reported = self.state.reported.get(name, 0)
        changed = self.state.register(
            name,
            host,
            port,
            now=self.clock(),
            chain_id=body.chain_id,
            committed_seq=body.applied_seq,
        )
        if lost:
            self._log_lost_data(name, body, reported)
        if changed:
            self.log.info(
                "node {name} registered at {host}:{port} (applied seq {seq}); chains: {chains}",
                name=name,
                host=host,
                port=port,
                seq=body.applied_seq,
                chains=self.state.describe(),
            )
            self.changed()
            return True
        return False

    def _log_lost_data(self, name: str, body: Container, reported: int) -> None:
        fields = {
            "name": name,
            "chain_id": body.chain_id,
            "seq": body.applied_seq,
            "reported": reported,
        }
        if self.state.chain_of(name) is not None:
            # Still a member: the last of its chain, which is never removed.
            self.log.critical(
                "node {name} comes back without the data it had (chain {chain_id}, "
                "applied seq {seq}, last reported {reported}) but is the last member "
                "of its chain: it keeps its place; acknowledged writes may be lost",
                **fields,
            )
            return
        self.log.warn(
            "node {name} comes back without the data it had (chain {chain_id}, "
            "applied seq {seq}, last reported {reported}): taken out of its chain, "
            "it rejoins by state transfer",
            **fields,
        )

    def detect_failures(self) -> None:
        """
        Remove every chain member silent for longer than the failure
        timeout, then extend every short chain with a live spare.
        """
        try:
            removed = []
            for name in self.state.failed(self.clock(), self.failure_timeout):
                if self.state.remove(name):
                    removed.append(name)
            if removed:
                self.log.warn(
                    "removed {nodes}: no heartbeat for {timeout}s; chains: {chains}",
                    nodes=removed,
                    timeout=self.failure_timeout,
                    chains=self.state.describe(),
                )
            started = self.state.plan_joins(self.clock(), self.failure_timeout)
            for chain_id, name in started:
                self.log.info(
                    "chain {chain} is short: node {name} joins after its tail (state transfer)",
                    chain=chain_id,
                    name=name,
                )
            if removed or started:
                self.changed()
            elif self.state.reports_unsaved:
                self.save()
        except Exception:
            # Keep the loop alive: one bad round must not stop detection.
            self.log.failure("failure detection round failed")

    def save(self) -> None:
        """
        Persist the state: at every configuration change, when a drain
        starts or ends, and once per failure-detection round if nodes
        reported new committed seqs (so a master restart forgets at most
        one heartbeat interval of reports).
        """
        assert self._env is not None
        with self._env.begin(write=True, db=self._db) as txn:
            txn.put(_STATE_KEY, self.state.to_json())
        self.state.reports_unsaved = False

    def changed(self) -> None:
        """Persist the state, then push the new configuration to everyone."""
        self.save()
        self._frame = None
        frame = self.config_frame()
        for p in list(self.subscribers):
            p.send(frame)

    def config_frame(self) -> bytes:
        if self._frame is None:
            self._frame = self.state.config().to_frame()
        return self._frame

    def status(self) -> dict[str, Any]:
        return {
            "listen": self.listen_port,
            "data_dir": os.path.abspath(self.data_dir),
            "config_version": self.state.version,
            "chains": len(self.state.chains),
            "chain_length": self.chain_length,
            "nodes": len(self.state.nodes),
            "spares": len(self.state.spares),
            "subscribers": len(self.subscribers),
            "heartbeat_interval": self.heartbeat_interval,
            "failure_timeout": self.failure_timeout,
        }
