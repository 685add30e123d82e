"""
A deterministic simulation of a whole ckv chain, with faults, checked for
linearizability.

Everything runs in one thread on a simulated clock, driven by one seeded
random generator, so a seed names a whole run and a failing seed replays
exactly::

    python -m ckv.testing.simulation --seed 1234 --steps 3000 [-v]

What is simulated
-----------------
- B{Nodes}: real L{Replica} objects (the I/O-free state machine), each over
  an in-memory durable store (L{SimStore}) with the commit/recover semantics
  of L{ckv.storage.Store}.  Commits are explicit and take a random time
  (C{take_batch}, later C{batch_committed}).  The plumbing around the
  replica mirrors L{ckv.chain.service.NodeService}: successor links with
  CHAIN_HELLO / CHAIN_HELLO_REPLY / C{on_successor_ready}, UPDATES fenced by
  epoch, predecessor links dropped when the predecessor changes, client
  reply channels, heartbeats and read leases.
- B{The master}: a real L{MasterState}, driven like
  L{ckv.master.service.MasterService} (register, heartbeat, periodic
  C{failed} + C{remove}, persistence as JSON before every push, restart
  from that JSON with C{grace}).
- B{The network}: connections are FIFO per direction with random delays
  (reordering only between connections).  A connection can be closed
  gracefully (frames already sent still arrive, then the close) or reset
  (frames in flight both ways are lost); both ends learn it.
- B{Clients}: each with one or two lanes, one operation in flight per lane,
  retrying the same (client id, lane, request id) on timeouts and on
  retryable statuses until a per-operation deadline; every operation is
  recorded with L{Recorder} on the simulated clock.
- B{Faults}, chosen by the random generator at every step: node crash
  (then restart from the durable store), node pause (a false suspicion when
  long enough), connection reset, master crash and restart, slow links.

What is checked
---------------
After every step (one event): the chain invariants of DESIGN.md section 1
(see L{Simulation.check_invariants}).  At the end the faults stop, every
process is healed, the run goes on until the cluster is idle, every client
reads every key, and then the history must be linearizable, every
acknowledged update must be in the tail's history with the status its
client received, and every live member must hold the same history.

Extending
---------
The processes are plain classes (L{SimNode}, L{SimMaster}, L{SimClient})
whose message handlers mirror the Twisted adapters; a new control message
(for example a state transfer to a joining node) is one more branch in
C{frame_received} of the node and, if the master decides it, of the master.
Faults are methods of L{Simulation} (L{Simulation.crash},
L{Simulation.pause}, ...) usable from scripted tests as well.
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
from ckv.config import EMPTY, ClusterConfig, Member
from ckv.entry import Entry
from ckv.master.state import MasterState
from ckv.storage import Batch, Recovered, session_key
from ckv.testing.linearizability import Operation, Recorder, check
from ckv.wire import MessageType as T
from ckv.wire import Op, Status

__all__ = [
    "SimConfig",
    "SimStore",
    "Simulation",
    "SimulationFailure",
    "main",
    "run",
]

MASTER = "master"
#: Statuses after which a client sends the same request again.
RETRYABLE = frozenset({Status.UNAVAILABLE, Status.NOT_HEAD, Status.NOT_TAIL, Status.STALE_EPOCH})
#: Statuses that are a result.
RESULTS = frozenset({Status.OK, Status.NOT_FOUND, Status.CAS_FAILED})
#: The lane of queries (as the client engine uses it).
QUERY_LANE = 0


class SimulationFailure(AssertionError):
    """An invariant was broken, or the run did not end well."""


# -- configuration -------------------------------------------------------------------------------


@dataclass
class SimConfig:
    """Every knob of a run.  Times are simulated seconds."""

    nodes: int = 3
    chain_length: int = 3
    clients: int = 3
    lanes: int = 2
    keys: int = 3
    heartbeat_interval: float = 0.2
    failure_timeout: float = 1.0
    #: None: as the master service computes it (timeout less two intervals).
    lease: float | None = None
    net_delay: tuple[float, float] = (0.0005, 0.005)
    #: Chance that one message is slow, and how slow.
    slow_message: float = 0.02
    slow_delay: tuple[float, float] = (0.02, 0.2)
    commit_delay: tuple[float, float] = (0.0002, 0.003)
    #: Chance that a commit fails (the replica puts the batch back).
    commit_failure: float = 0.005
    think: tuple[float, float] = (0.005, 0.05)
    attempt_timeout: float = 0.25
    op_deadline: float = 2.5
    retry_backoff: tuple[float, float] = (0.01, 0.04)
    #: Chance of a client sending its known epoch with an update.
    epoch_in_requests: float = 0.5
    #: The node re-sends its ack on every new predecessor link (as the service
    #: does since the fix of the lost-ack bug; False replays that bug).
    reack_on_hello: bool = True
    #: Faults: the chance, at each step, that one is injected.
    faults: bool = True
    fault_rate: float = 0.006
    crash_downtime: tuple[float, float] = (0.05, 3.0)
    #: Chance that a crashed node never comes back before the end.
    crash_forever: float = 0.1
    pause_time: tuple[float, float] = (0.05, 2.0)
    master_downtime: tuple[float, float] = (0.05, 2.0)
    slow_period: tuple[float, float] = (0.2, 2.0)
    slow_factor: tuple[float, float] = (5.0, 60.0)
    #: How long a partition holds frames between two processes.
    partition_time: tuple[float, float] = (0.2, 2.5)
    #: Relative weights of the faults.
    fault_weights: dict[str, float] = field(
        default_factory=lambda: {
            "crash": 3.0,
            "pause": 3.0,
            "cut": 3.0,
            "master": 1.0,
            "slow": 2.0,
            "partition": 2.0,
        }
    )
    #: Simulated seconds allowed for the cluster to settle at the end.
    quiesce_time: float = 40.0
    #: Seconds the linearizability check may take (None: no limit).
    check_timeout: float | None = 60.0

    @property
    def lease_time(self) -> float:
        """The read lease, as L{ckv.master.service.MasterService.lease_ms} computes it."""
        if self.lease is not None:
            return self.lease
        return max(
            self.failure_timeout - 2 * self.heartbeat_interval, self.heartbeat_interval
        )

    @classmethod
    def for_seed(cls, seed: int, **overrides: Any) -> SimConfig:
        """A configuration varied by the seed (chain length, clients, lanes)."""
        rng = random.Random(f"config-{seed}")
        n = rng.choice([2, 3, 3, 3, 4, 5])
        cfg = cls(
            nodes=n,
            chain_length=n,
            clients=rng.choice([2, 3, 4]),
            lanes=rng.choice([1, 2]),
            keys=rng.choice([2, 3, 3]),
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg


# -- the durable store -------------------------------------------------------------------------


class SimStore:
    """
    An in-memory store with the semantics of L{ckv.storage.Store}: a batch
    is applied atomically by L{commit}; L{recover} reads back the applied
    seq, epoch, chain id and sent list.  It survives a crash of its node.

    C{history} maps every committed seq to its entry (as a comparable
    tuple); C{generation} changes whenever the history is rewritten rather
    than appended to (never, today: a state transfer would).
    """

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.sessions: dict[bytes, tuple[int, int]] = {}
        self.sent: dict[int, Entry] = {}
        self.history: dict[int, tuple[Any, ...]] = {}
        self.entries: dict[int, Entry] = {}
        self.first_seq = 1
        self.applied_seq = 0
        self.epoch = 0
        self.chain_id = wire.NO_CHAIN
        self.generation = 0
        self.commits = 0
        #: A broken invariant found while committing (reported by the simulation).
        self.violation: str | None = None

    def get(self, key: bytes) -> bytes | None:
        """The committed value of C{key}."""
        return self.data.get(key)

    def session(self, skey: bytes) -> tuple[int, int] | None:
        """The last (request id, status) committed for a session."""
        return self.sessions.get(skey)

    def commit(self, batch: Batch) -> None:
        """Apply C{batch} atomically."""
        for e in batch.entries:
            if e.seq != self.applied_seq + 1 and self.violation is None:
                self.violation = (
                    f"committed seq {e.seq} after seq {self.applied_seq}: applied seqs not "
                    f"contiguous"
                )
            if e.op == Op.PUT:
                self.data[e.key] = e.value
            elif e.op == Op.DELETE:
                self.data.pop(e.key, None)
            if e.client_id != wire.NO_CLIENT:
                self.sessions[session_key(e.client_id, e.lane)] = (e.request_id, e.status)
            if batch.keep_sent:
                self.sent[e.seq] = e
            self.history[e.seq] = entry_key(e)
            self.entries[e.seq] = e
            self.applied_seq = e.seq
        if batch.prune_sent_upto:
            for s in [s for s in self.sent if s <= batch.prune_sent_upto]:
                del self.sent[s]
        if batch.epoch is not None:
            self.epoch = batch.epoch
        if batch.chain_id is not None:
            self.chain_id = batch.chain_id
        self.commits += 1

    def recover(self) -> Recovered:
        """The durable state, as the replica reads it at start."""
        return Recovered(
            self.applied_seq, self.epoch, self.chain_id, [self.sent[s] for s in sorted(self.sent)]
        )


def entry_key(e: Entry) -> tuple[Any, ...]:
    """An entry as a tuple: equal tuples, equal entries."""
    return (e.seq, e.client_id, e.lane, e.request_id, e.op, e.status, e.key, e.value)


# -- the event loop and the network ------------------------------------------------------------


@dataclass(order=True)
class _Event:
    time: float
    order: int
    fn: Callable[[], None] = field(compare=False)
    #: The process that runs it (None: the simulation itself).
    owner: str | None = field(compare=False, default=None)
    #: The owner's incarnation when the event was scheduled.
    inc: int = field(compare=False, default=0)


class Conn:
    """
    One TCP connection between two processes: C{ends[0]} connected to
    C{ends[1]}.  FIFO per direction; C{open[end]} is False once that end
    no longer reads (closed, reset, or crashed).
    """

    def __init__(self, cid: int, kind: str, a: str, b: str) -> None:
        self.id = cid
        self.kind = kind
        self.ends = (a, b)
        self.open = {a: True, b: True}
        self.last = {a: 0.0, b: 0.0}
        # Per-connection protocol state (mirrors the Twisted protocols).
        self.ready = False  # predecessor side: hello answered
        self.is_predecessor = False  # successor side: hello accepted
        self.peer_name: str | None = None
        self.client_id: bytes | None = None
        self.failed = False  # protocol_error: ignore further input

    def other(self, end: str) -> str:
        """The other end."""
        return self.ends[1] if end == self.ends[0] else self.ends[0]

    def __repr__(self) -> str:
        return f"<{self.kind} {self.ends[0]}->{self.ends[1]} #{self.id}>"


# -- nodes -------------------------------------------------------------------------------------


class SimNode:
    """One chain node: a L{Replica} wired as L{ckv.chain.service.NodeService} wires it."""

    def __init__(self, sim: Simulation, name: str, port: int) -> None:
        self.sim = sim
        self.name = name
        self.port = port
        self.store = SimStore()
        self.alive = False
        self.paused = False
        self.frozen: list[_Event] = []
        self.inc = 0
        self.replica: Replica | None = None
        self._reset_volatile()

    def _reset_volatile(self) -> None:
        self.config: ClusterConfig = EMPTY
        self.lease_until = float("-inf")
        self.hb_sent: deque[float] = deque()
        self.master_conn: Conn | None = None
        self.succ_member: Member | None = None
        self.succ_gen = 0
        self.succ_attempt: Conn | None = None
        self.succ_conn: Conn | None = None
        self.succ_retries = 0
        self.master_retries = 0
        self.pred_conn: Conn | None = None
        self.client_channels: dict[bytes, Conn] = {}
        self.inflight: Batch | None = None

    @property
    def r(self) -> Replica:
        """The replica (only while alive)."""
        assert self.replica is not None
        return self.replica

    # -- lifecycle -----------------------------------------------------------------------------

    def boot(self) -> None:
        """Start (or restart) from the durable store."""
        self.inc += 1
        self.alive = True
        self.paused = False
        self.frozen = []
        self._reset_volatile()
        rec = self.store.recover()
        self.replica = Replica(
            self.name, self.store, rec, lease_ok=self.holds_lease, restarted=True
        )
        self.sim.trace(
            f"{self.name} boots: applied {rec.applied_seq} epoch {rec.epoch} "
            f"sent {[e.seq for e in rec.sent]}"
        )
        self.connect_master()
        self.sim.after(self.sim.cfg.heartbeat_interval, self.heartbeat_tick, self.name)

    def crash(self) -> None:
        """Drop everything volatile; the store stays (an in-flight commit may land)."""
        sim = self.sim
        if self.inflight is not None and sim.rng.random() < 0.5:
            self.store.commit(self.inflight)
            sim.trace(f"{self.name}: the in-flight batch reached the disk before the crash")
        self.inc += 1
        self.alive = False
        self.paused = False
        self.frozen = []
        self.replica = None
        for conn in sorted(sim.conns_of(self.name), key=lambda c: c.id):
            sim.close(conn, self.name, reset=sim.rng.random() < 0.5, notify_self=False)
        self._reset_volatile()

    def holds_lease(self) -> bool:
        """The read lease (measured on the simulated clock)."""
        return self.sim.now < self.lease_until

    # -- the master link -----------------------------------------------------------------------

    def connect_master(self) -> None:
        self.sim.connect(self.name, MASTER, "master", self._master_made, self._master_failed)

    def _master_made(self, conn: Conn) -> None:
        self.master_conn = conn
        self.master_retries = 0
        self.hb_sent.clear()
        self.send_register()

    def _master_failed(self) -> None:
        self.master_retries += 1
        self.sim.after(self.sim.backoff(self.master_retries), self.connect_master, self.name)

    def send_register(self) -> None:
        r = self.r
        if self.master_conn is not None:
            self.hb_sent.append(self.sim.now)
            chain_id = wire.NO_CHAIN if r.left else r.chain_id
            self.sim.send(
                self.master_conn,
                self.name,
                ("REGISTER", self.name, "sim", self.port, chain_id, r.epoch, r.committed_seq),
            )

    def heartbeat_tick(self) -> None:
        if self.master_conn is not None:
            self.hb_sent.append(self.sim.now)
            # With how far the store has got, as NodeService.send_heartbeat.
            seq = self.replica.committed_seq if self.replica is not None else None
            self.sim.send(self.master_conn, self.name, ("HEARTBEAT", self.name, seq))
        self.sim.after(self.sim.cfg.heartbeat_interval, self.heartbeat_tick, self.name)

    # -- frames --------------------------------------------------------------------------------

    def frame_received(self, conn: Conn, msg: Any) -> None:
        if conn.failed:
            return
        if conn.kind == "master":
            self._from_master(msg)
            return
        mtype, body = wire.decode(msg)
        if conn.kind == "chain" and conn.ends[0] == self.name:
            self._from_successor(conn, mtype, body)
        else:
            self._from_peer(conn, mtype, body, msg)

    def _from_master(self, msg: tuple[Any, ...]) -> None:
        if msg[0] == "CONFIG":
            self.on_config(msg[1])
        elif msg[0] == "HB_REPLY":
            if self.hb_sent:
                sent = self.hb_sent.popleft()
                self.lease_until = max(self.lease_until, sent + msg[1])

    def _from_successor(self, conn: Conn, mtype: int, body: Any) -> None:
        r = self.r
        if mtype == T.CHAIN_HELLO_REPLY:
            if body.epoch != r.epoch:
                # Our configuration moved while the hello was in flight.
                self.sim.close(conn, self.name)
                return
            conn.ready = True
            self.succ_conn = conn
            self.succ_retries = 0
            self.sim.trace(
                f"{self.name}: successor {conn.ends[1]} ready at epoch {body.epoch}, "
                f"it has {body.applied_seq}"
            )
            self.execute(r.on_successor_ready(body.epoch, body.applied_seq))
            if r.left:
                # Ahead of us after our restart: leave; the master removes us.
                self.sim.trace(f"{self.name} leaves its chain: {conn.ends[1]} is ahead")
                self.sim.left += 1
                self._connect_successor(None)
                self.send_register()
                return
            if r.forward_cursor is None:
                # Refused by the replica: retry on a new link later.
                self.sim.close(conn, self.name)
        elif mtype == T.ACK and conn.ready:
            self.execute(r.on_ack(body.epoch, body.seq))
            self.kick()
        elif mtype == T.ERROR:
            self.sim.trace(f"{self.name}: successor refused: {bytes(body.message).decode()}")
            self.send_register()
            self.sim.close(conn, self.name)
        else:
            self.protocol_error(conn, wire.ErrorCode.UNEXPECTED, f"unexpected {mtype}")

    def _from_peer(self, conn: Conn, mtype: int, body: Any, frame: bytes) -> None:
        r = self.r
        if mtype == T.REQUEST:
            if body.op == Op.GET:
                self.execute(r.on_query(body, conn))
            else:
                self.execute(r.on_client_update(body, conn))
        elif mtype == T.UPDATES:
            if not conn.is_predecessor:
                self.protocol_error(conn, wire.ErrorCode.UNEXPECTED, "UPDATES before hello")
                return
            if body.epoch < r.epoch:
                self.protocol_error(
                    conn,
                    wire.ErrorCode.STALE_EPOCH,
                    f"updates of epoch {body.epoch}; {self.name} is at epoch {r.epoch}",
                )
                return
            if body.epoch > r.epoch:
                self.send_register()
            self.execute(r.on_updates(body.epoch, list(body.entries), body.raws))
        elif mtype == T.COMMITTED:
            if not conn.is_predecessor:
                self.protocol_error(conn, wire.ErrorCode.UNEXPECTED, "COMMITTED before hello")
                return
            self.execute(r.on_committed(body.epoch, body.seq))
        elif getattr(T, "FENCE", None) is not None and mtype == T.FENCE:
            if not conn.is_predecessor:
                self.protocol_error(conn, wire.ErrorCode.UNEXPECTED, "FENCE before hello")
                return
            r.on_fence(body.epoch, body.seq)
        elif mtype == T.CLIENT_HELLO:
            if conn.client_id is not None and self.client_channels.get(conn.client_id) is conn:
                del self.client_channels[conn.client_id]
            conn.client_id = bytes(body.client_id)
            self.client_channels[conn.client_id] = conn
        elif mtype == T.CHAIN_HELLO:
            self._predecessor_hello(conn, body)
        else:
            self.protocol_error(conn, wire.ErrorCode.UNEXPECTED, f"unexpected {mtype}")
        self.kick()

    def _predecessor_hello(self, conn: Conn, body: Any) -> None:
        name = bytes(body.name).decode()
        r = self.r
        try:
            if "committed_seq" in body:
                frame = r.on_chain_hello(body.chain_id, body.epoch, name, body.committed_seq)
            else:
                frame = r.on_chain_hello(body.chain_id, body.epoch, name)
        except HelloRefused as e:
            if e.code == wire.ErrorCode.STALE_EPOCH and body.epoch > r.epoch:
                self.send_register()
            self.protocol_error(conn, e.code, e.message)
            return
        if self.pred_conn is not None and self.pred_conn is not conn:
            self.sim.close(self.pred_conn, self.name)
        conn.is_predecessor = True
        conn.peer_name = name
        self.pred_conn = conn
        self.sim.send(conn, self.name, frame)
        if self.sim.cfg.reack_on_hello:
            # An ack lost with the previous link is not lost for good.
            if r.acked_seq:
                self.sim.send(conn, self.name, wire.ack(r.epoch, r.acked_seq))

    def protocol_error(self, conn: Conn, code: wire.ErrorCode, message: str) -> None:
        if conn.failed:
            return
        conn.failed = True
        self.sim.send(conn, self.name, wire.error_frame(code, message))
        self.sim.close(conn, self.name)

    def connection_lost(self, conn: Conn) -> None:
        if conn.kind == "master":
            if self.master_conn is conn:
                self.master_conn = None
                self.hb_sent.clear()
                self.master_retries += 1
                delay = self.sim.backoff(self.master_retries)
                self.sim.after(delay, self.connect_master, self.name)
            return
        if conn.kind == "chain" and conn.ends[0] == self.name:
            if self.succ_conn is conn:
                self.succ_conn = None
                self.r.on_successor_lost()
            if self.succ_attempt is conn:
                self.succ_attempt = None
                self._retry_successor()
            return
        if conn.client_id is not None and self.client_channels.get(conn.client_id) is conn:
            del self.client_channels[conn.client_id]
        if self.pred_conn is conn:
            self.pred_conn = None

    # -- configuration and the successor link --------------------------------------------------

    def on_config(self, config: ClusterConfig) -> None:
        if config.version < self.config.version:
            return
        self.config = config
        r = self.r
        chain = config.chain_of_node(self.name)
        before = (r.role, r.epoch)
        self.execute(r.on_config(chain))
        if (r.role, r.epoch) != before:
            self.sim.trace(f"{self.name}: epoch {r.epoch}, role {r.role}")
        pred = self.pred_conn
        if pred is not None and pred.peer_name != r.predecessor:
            self.pred_conn = None
            self.sim.close(pred, self.name)
        succ = chain.successor_of(self.name) if chain is not None else None
        if succ != self.succ_member:
            self._connect_successor(succ)
        self.kick()

    def _connect_successor(self, member: Member | None) -> None:
        self.succ_gen += 1
        for conn in (self.succ_attempt, self.succ_conn):
            if conn is not None:
                self.sim.close(conn, self.name, notify_self=False)
        self.succ_attempt = self.succ_conn = None
        self.r.on_successor_lost()
        self.succ_member = member
        self.succ_retries = 0
        if member is not None:
            self._attempt_successor(self.succ_gen)

    def _attempt_successor(self, gen: int) -> None:
        if gen != self.succ_gen or self.succ_member is None:
            return
        target = self.succ_member.name

        def made(conn: Conn) -> None:
            if gen != self.succ_gen:
                self.sim.close(conn, self.name, notify_self=False)
                return
            self.succ_attempt = conn
            self.sim.send(conn, self.name, self.r.hello_frame())

        def failed() -> None:
            if gen == self.succ_gen:
                self._retry_successor()

        self.sim.connect(self.name, target, "chain", made, failed)

    def _retry_successor(self) -> None:
        self.succ_retries += 1
        gen = self.succ_gen
        self.sim.after(
            self.sim.backoff(self.succ_retries), lambda: self._attempt_successor(gen), self.name
        )

    # -- actions and commits -------------------------------------------------------------------

    def execute(self, actions: list[Action]) -> None:
        sim = self.sim
        for a in actions:
            if a.kind == TO_CLIENT:
                channel = self.client_channels.get(a.target)
                if channel is not None:
                    sim.send(channel, self.name, a.frame)
                elif a.origin is not None:
                    sim.send(a.origin, self.name, a.frame)
            elif a.kind == TO_SUCCESSOR:
                if self.succ_conn is not None:
                    sim.send(self.succ_conn, self.name, a.frame)
            elif a.kind == TO_PREDECESSOR:
                if self.pred_conn is not None:
                    sim.send(self.pred_conn, self.name, a.frame)
            elif a.kind == TO_ORIGIN:
                if a.target is not None:
                    sim.send(a.target, self.name, a.frame)
            else:  # pragma: no cover
                raise SimulationFailure(f"unknown action {a!r}")

    def kick(self) -> None:
        """Start the next commit, unless one is in flight; send the successor what is new."""
        r = self.r
        if self.inflight is None:
            batch = r.take_batch()
            if batch is not None:
                self.inflight = batch
                sim = self.sim
                sim.after(
                    sim.uniform(sim.cfg.commit_delay), lambda: self._committed(batch), self.name
                )
        self.execute(r.forward())

    def _committed(self, batch: Batch) -> None:
        sim = self.sim
        self.inflight = None
        if sim.rng.random() < sim.cfg.commit_failure:
            sim.trace(f"{self.name}: commit of {len(batch.entries)} entries failed")
            self.r.batch_failed(batch)
            sim.after(0.01, self.kick, self.name)
            return
        self.store.commit(batch)
        self.execute(self.r.batch_committed(batch))
        self.kick()


# -- the master --------------------------------------------------------------------------------


class SimMaster:
    """The master: a L{MasterState} driven as L{ckv.master.service.MasterService} drives it."""

    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        self.name = MASTER
        self.alive = False
        self.paused = False
        self.frozen: list[_Event] = []
        self.inc = 0
        self.persisted: bytes | None = None
        self.state = MasterState(1, sim.cfg.chain_length, slot_count=16)
        self.subscribers: list[Conn] = []
        self.removed_at: dict[str, float] = {}

    def boot(self) -> None:
        sim = self.sim
        self.inc += 1
        self.alive = True
        self.subscribers = []
        if self.persisted is not None:
            self.state = MasterState.from_json(self.persisted, 1, sim.cfg.chain_length)
        self.state.grace(sim.now)
        sim.trace(f"master boots at version {self.state.version}")
        sim.after(sim.cfg.heartbeat_interval, self.detect, MASTER)

    def crash(self) -> None:
        self.inc += 1
        self.alive = False
        for conn in sorted(self.sim.conns_of(MASTER), key=lambda c: c.id):
            self.sim.close(conn, MASTER, reset=self.sim.rng.random() < 0.5, notify_self=False)
        self.subscribers = []

    def frame_received(self, conn: Conn, msg: tuple[Any, ...]) -> None:
        sim = self.sim
        if msg[0] == "REGISTER":
            name, host, port = msg[1], msg[2], msg[3]
            if conn not in self.subscribers:
                self.subscribers.append(conn)
            if self.state.register(
                name, host, port, now=sim.now, chain_id=msg[4], committed_seq=msg[6]
            ):
                self.changed()
            else:
                sim.send(conn, MASTER, ("CONFIG", self.state.config()))
            sim.send(conn, MASTER, ("HB_REPLY", sim.cfg.lease_time))
        elif msg[0] == "HEARTBEAT":
            self.state.heartbeat(msg[1], sim.now, msg[2])
            sim.send(conn, MASTER, ("HB_REPLY", sim.cfg.lease_time))
        elif msg[0] == "WATCH":
            if conn not in self.subscribers:
                self.subscribers.append(conn)
            sim.send(conn, MASTER, ("CONFIG", self.state.config()))

    def connection_lost(self, conn: Conn) -> None:
        if conn in self.subscribers:
            self.subscribers.remove(conn)

    def detect(self) -> None:
        sim = self.sim
        removed = []
        for name in self.state.failed(sim.now, sim.cfg.failure_timeout):
            if self.state.remove(name):
                removed.append(name)
                self.removed_at[name] = sim.now
        if removed:
            sim.trace(f"master removes {removed}: chains {self.state.describe()}")
            self.changed()
        elif self.state.reports_unsaved:
            self.save()
        sim.after(sim.cfg.heartbeat_interval, self.detect, MASTER)

    def save(self) -> None:
        self.persisted = self.state.to_json()
        self.state.reports_unsaved = False

    def changed(self) -> None:
        """Persist, then push the new configuration to every subscriber."""
        self.save()
        config = self.state.config()
        self.sim.trace(
            f"master config v{config.version}: "
            + "; ".join(f"chain {c.chain_id} e{c.epoch} {[m.name for m in c.members]}"
                        for c in config.chains)
        )
        for conn in list(self.subscribers):
            self.sim.send(conn, MASTER, ("CONFIG", config))


# -- clients -----------------------------------------------------------------------------------


@dataclass
class _Op:
    token: int
    kind: str
    key: bytes
    value: bytes | None
    expected: bytes | None
    request_id: int
    lane: int
    deadline: float
    frame: bytes = b""
    attempts: int = 0


class _Lane:
    def __init__(self, index: int) -> None:
        self.index = index
        self.op: _Op | None = None
        self.gen = 0


class SimClient:
    """A client with lanes; it learns the configuration by watching the master."""

    def __init__(self, sim: Simulation, index: int) -> None:
        self.sim = sim
        self.index = index
        self.name = f"client{index}"
        self.cid = f"c{index}".encode().ljust(wire.CLIENT_ID_LEN, b"-")
        self.alive = True
        self.paused = False
        self.frozen: list[_Event] = []
        self.inc = 1
        self.config: ClusterConfig = EMPTY
        self.master_conn: Conn | None = None
        self.master_retries = 0
        self.conns: dict[str, Conn] = {}
        self.connecting: set[str] = set()
        self.lanes = [_Lane(i) for i in range(sim.cfg.lanes)]
        self.next_rid = 1
        self.counter = 0
        self.stopping = False
        self.last_seen: dict[bytes, bytes | None] = {}
        self.send_epoch = sim.rng.random() < sim.cfg.epoch_in_requests

    def start(self) -> None:
        self.connect_master()
        for lane in self.lanes:
            self.sim.after(self.sim.uniform(self.sim.cfg.think), lambda ln=lane: self.next_op(ln),
                           self.name)

    # -- the master ----------------------------------------------------------------------------

    def connect_master(self) -> None:
        def made(conn: Conn) -> None:
            self.master_conn = conn
            self.master_retries = 0
            self.sim.send(conn, self.name, ("WATCH",))

        def failed() -> None:
            self.master_retries += 1
            self.sim.after(self.sim.backoff(self.master_retries), self.connect_master, self.name)

        self.sim.connect(self.name, MASTER, "master", made, failed)

    def refresh(self) -> None:
        if self.master_conn is not None:
            self.sim.send(self.master_conn, self.name, ("WATCH",))

    # -- connections to nodes ------------------------------------------------------------------

    def ensure_conn(self, node: str) -> Conn | None:
        conn = self.conns.get(node)
        if conn is not None and conn.open[self.name]:
            return conn
        if node not in self.connecting:
            self.connecting.add(node)

            def made(conn: Conn) -> None:
                self.connecting.discard(node)
                self.conns[node] = conn
                self.sim.send(conn, self.name, wire.encode(T.CLIENT_HELLO, client_id=self.cid))

            def failed() -> None:
                self.connecting.discard(node)

            self.sim.connect(self.name, node, "client", made, failed)
        return None

    def frame_received(self, conn: Conn, msg: Any) -> None:
        if conn.kind == "master":
            if msg[0] == "CONFIG" and msg[1].version >= self.config.version:
                self.config = msg[1]
            return
        mtype, body = wire.decode(msg)
        if mtype != T.REPLY:
            return
        for lane in self.lanes:
            op = lane.op
            if op is not None and op.request_id == body.request_id:
                self.on_reply(lane, op, Status(body.status), bytes(body.value))
                return

    def connection_lost(self, conn: Conn) -> None:
        if conn is self.master_conn:
            self.master_conn = None
            self.master_retries += 1
            self.sim.after(self.sim.backoff(self.master_retries), self.connect_master, self.name)

    # -- operations ----------------------------------------------------------------------------

    def next_op(self, lane: _Lane) -> None:
        if self.stopping or lane.op is not None:
            return
        sim = self.sim
        rng = sim.rng
        key = rng.choice(sim.keys)
        x = rng.random()
        value: bytes | None = None
        expected: bytes | None = None
        if x < 0.35:
            kind = "get"
        elif x < 0.7:
            kind = "put"
            value = self.fresh_value()
        elif x < 0.9:
            kind = "cas"
            choice = rng.random()
            if choice < 0.6:
                expected = self.last_seen.get(key)
            elif choice < 0.8:
                expected = None
            else:
                expected = rng.choice(sim.written) if sim.written else None
            value = None if rng.random() < 0.15 else self.fresh_value()
        else:
            kind = "delete"
        self.begin(lane, kind, key, value, expected)

    def fresh_value(self) -> bytes:
        self.counter += 1
        v = f"{self.index}.{self.counter}".encode()
        self.sim.written.append(v)
        return v

    def begin(
        self, lane: _Lane, kind: str, key: bytes, value: bytes | None = None,
        expected: bytes | None = None, deadline: float | None = None,
    ) -> None:
        """Start one operation on C{lane}."""
        sim = self.sim
        process = self.index * len(self.lanes) + lane.index
        token = sim.recorder.invoke(process, kind, key, value=value, expected=expected)
        rid = self.next_rid
        self.next_rid += 1
        wlane = QUERY_LANE if kind == "get" else lane.index + 1
        op = _Op(token, kind, key, value, expected, rid, wlane,
                 sim.now + (deadline or sim.cfg.op_deadline))
        if kind == "get":
            op.frame = wire.request(self.cid, wlane, rid, Op.GET, key)
        elif kind == "put":
            op.frame = wire.request(self.cid, wlane, rid, Op.PUT, key, value=value)
        elif kind == "delete":
            op.frame = wire.request(self.cid, wlane, rid, Op.DELETE, key)
        else:
            op.frame = wire.request(self.cid, wlane, rid, Op.CAS, key, value=value,
                                    expected=expected, has_expected=expected is not None)
        lane.op = op
        sim.trace(f"{self.name} lane {lane.index}: {kind} {key!r} {value!r} exp={expected!r} "
                  f"rid {rid}")
        self.attempt(lane)

    def attempt(self, lane: _Lane) -> None:
        op = lane.op
        if op is None:
            return
        sim = self.sim
        if sim.now >= op.deadline:
            sim.trace(f"{self.name}: rid {op.request_id} gives up (outcome unknown)")
            sim.recorder.unknown(op.token)
            sim.unknown_ops += 1
            self.finish(lane)
            return
        lane.gen += 1
        gen = lane.gen
        op.attempts += 1
        chain = self.config.chain_for_key(op.key)
        target = None
        tail = None
        if chain is not None and chain.members:
            tail = chain.members[-1].name
            target = tail if op.kind == "get" else chain.members[0].name
        conn = self.ensure_conn(target) if target is not None else None
        if tail is not None and tail != target:
            self.ensure_conn(tail)  # the tail's replies come back on this channel
        if conn is None:
            self.refresh()
            sim.after(sim.uniform(sim.cfg.retry_backoff), lambda: self._retry(lane, gen),
                      self.name)
            return
        frame = op.frame
        if op.kind != "get" and self.send_epoch and chain is not None:
            frame = _with_epoch(frame, chain.epoch)
        sim.send(conn, self.name, frame)
        sim.after(sim.cfg.attempt_timeout, lambda: self._timeout(lane, gen), self.name)

    def _retry(self, lane: _Lane, gen: int) -> None:
        if lane.gen == gen:
            self.attempt(lane)

    def _timeout(self, lane: _Lane, gen: int) -> None:
        if lane.gen == gen and lane.op is not None:
            self.refresh()
            self.attempt(lane)

    def on_reply(self, lane: _Lane, op: _Op, status: Status, value: bytes) -> None:
        sim = self.sim
        if status in RESULTS:
            if op.kind == "get":
                result: object = value if status == Status.OK else None
                self.last_seen[op.key] = value if status == Status.OK else None
            elif op.kind == "put":
                result = None
                self.last_seen[op.key] = op.value
            else:
                result = status == Status.OK
                if result:
                    self.last_seen[op.key] = None if op.kind == "delete" else op.value
            if op.kind == "put" and status != Status.OK:
                sim.fail(f"{self.name}: put rid {op.request_id} answered {status.name}")
            sim.recorder.ok(op.token, result)
            if op.kind != "get":
                sim.acked.append((self.cid, op.lane, op.request_id, int(status), self.name))
            sim.trace(f"{self.name}: rid {op.request_id} -> {status.name} {result!r}")
            self.finish(lane)
        elif status in RETRYABLE:
            lane.gen += 1
            gen = lane.gen
            self.refresh()
            sim.after(sim.uniform(sim.cfg.retry_backoff), lambda: self._retry(lane, gen),
                      self.name)
        else:
            sim.fail(
                f"{self.name}: rid {op.request_id} ({op.kind} {op.key!r}) got unexpected status "
                f"{status.name}: {value.decode(errors='replace')}"
            )

    def finish(self, lane: _Lane) -> None:
        lane.op = None
        lane.gen += 1
        if not self.stopping:
            self.sim.after(self.sim.uniform(self.sim.cfg.think), lambda: self.next_op(lane),
                           self.name)

    @property
    def idle(self) -> bool:
        return all(lane.op is None for lane in self.lanes)


def _with_epoch(frame: bytes, epoch: int) -> bytes:
    """The same REQUEST frame with its epoch field set."""
    _, body = wire.decode(frame)
    return wire.encode(T.REQUEST, **body._replace(epoch=epoch)._asdict())


# -- the simulation ----------------------------------------------------------------------------


class Simulation:
    """
    One seeded run.  L{run} injects faults and checks invariants; scripted
    tests call L{start}, L{run_until}, the fault methods and L{finish}.
    """

    def __init__(
        self,
        seed: int,
        cfg: SimConfig | None = None,
        verbose: bool = False,
        out: Any = None,
    ) -> None:
        self.seed = seed
        self.cfg = cfg or SimConfig.for_seed(seed)
        self.rng = random.Random(seed)
        self.verbose = verbose
        self.out = out or sys.stdout
        self.now = 0.0
        self.steps = 0
        self._order = 0
        self._events: list[_Event] = []
        self._conns: dict[str, set[Conn]] = {}
        self._conn_ids = 0
        self.log: deque[str] = deque(maxlen=60)
        self.master = SimMaster(self)
        self.nodes = {f"n{i + 1}": SimNode(self, f"n{i + 1}", 7001 + i)
                      for i in range(self.cfg.nodes)}
        self.clients = [SimClient(self, i) for i in range(self.cfg.clients)]
        self.procs: dict[str, Any] = {MASTER: self.master, **self.nodes}
        for c in self.clients:
            self.procs[c.name] = c
        self.keys = [f"k{i}".encode() for i in range(self.cfg.keys)]
        self.written: list[bytes] = []
        self.recorder = Recorder(clock=lambda: self.now)
        #: (client id, lane, request id, status, client) of every acknowledged update.
        self.acked: list[tuple[bytes, int, int, int, str]] = []
        self.unknown_ops = 0
        #: Restarted nodes that found their successor ahead and left.
        self.left = 0
        self.faults = 0
        self.fault_counts: dict[str, int] = {}
        self.slow_until: dict[str, tuple[float, float]] = {}
        #: Frames between two processes are held until then (a partition).
        self.partitions: dict[frozenset[str], float] = {}
        self._verified: dict[tuple[str, str], tuple[int, int, int]] = {}

    # -- tracing and failures ------------------------------------------------------------------

    def trace(self, text: str) -> None:
        line = f"[{self.steps:6d} t={self.now:8.4f}] {text}"
        self.log.append(line)
        if self.verbose:
            print(line, file=self.out)

    def fail(self, message: str) -> None:
        recent = "\n".join(self.log)
        raise SimulationFailure(
            f"seed {self.seed} step {self.steps} t={self.now:.4f}: {message}\n"
            f"replay: python -m ckv.testing.simulation --seed {self.seed} -v\n"
            f"recent events:\n{recent}\n{self.describe()}"
        )

    def describe(self) -> str:
        lines = [f"master: {'up' if self.master.alive else 'down'} "
                 f"{self.master.state.describe()}"]
        for n in self.nodes.values():
            state = "down" if not n.alive else ("paused" if n.paused else "up")
            info = n.replica.status() if n.replica is not None else {}
            lines.append(
                f"{n.name}: {state} store applied {n.store.applied_seq} epoch {n.store.epoch} "
                + " ".join(f"{k}={info[k]}" for k in ("role", "epoch", "applied_seq",
                                                      "committed_seq", "acked_seq", "sent",
                                                      "pending", "held", "successor_link")
                           if k in info)
            )
        return "\n".join(lines)

    # -- the event loop ------------------------------------------------------------------------

    def uniform(self, bounds: tuple[float, float]) -> float:
        return self.rng.uniform(*bounds)

    def backoff(self, attempt: int) -> float:
        """Reconnection delays, as the services' retry policy (scaled down)."""
        return min(0.01 * 2 ** min(attempt, 10), 0.5) * self.rng.uniform(0.8, 1.2)

    def at(self, time: float, fn: Callable[[], None], owner: str | None = None) -> None:
        inc = self.procs[owner].inc if owner is not None else 0
        self._order += 1
        heapq.heappush(self._events, _Event(time, self._order, fn, owner, inc))

    def after(self, delay: float, fn: Callable[[], None], owner: str | None = None) -> None:
        self.at(self.now + delay, fn, owner)

    def _run_event(self, ev: _Event) -> None:
        if ev.owner is not None:
            proc = self.procs[ev.owner]
            if not proc.alive or proc.inc != ev.inc:
                return
            if proc.paused:
                proc.frozen.append(ev)
                return
        ev.fn()

    def step(self) -> bool:
        """Process one event (and maybe inject a fault first); False: nothing left."""
        if self.cfg.faults and self.rng.random() < self.cfg.fault_rate:
            self.inject_fault()
        if not self._events:
            return False
        ev = heapq.heappop(self._events)
        self.now = max(self.now, ev.time)
        self._run_event(ev)
        self.steps += 1
        self.check_invariants()
        return True

    def run_until(self, time: float) -> None:
        """Process events up to simulated time C{time}."""
        while self._events and self._events[0].time <= time:
            self.step()
        self.now = max(self.now, time)

    def run_while(self, condition: Callable[[], bool], limit: float) -> bool:
        """Step while C{condition()} holds, at most C{limit} seconds; True if it ended."""
        end = self.now + limit
        while condition():
            if not self._events or self._events[0].time > end:
                return False
            self.step()
        return True

    # -- the network ---------------------------------------------------------------------------

    def conns_of(self, name: str) -> set[Conn]:
        return self._conns.setdefault(name, set())

    def delay(self, src: str, dst: str) -> float:
        d = self.uniform(self.cfg.net_delay)
        if self.rng.random() < self.cfg.slow_message:
            d += self.uniform(self.cfg.slow_delay)
        for end in (src, dst):
            slow = self.slow_until.get(end)
            if slow is not None and slow[0] > self.now:
                d *= slow[1]
        if self.partitions:
            until = self.partitions.get(frozenset((src, dst)))
            if until is not None and until > self.now + d:
                d = until - self.now + d
        return d

    def connect(
        self, a: str, b: str, kind: str, made: Callable[[Conn], None], failed: Callable[[], None]
    ) -> None:
        """A connection attempt from C{a} to C{b}: C{made(conn)} or C{failed()} after a while."""

        def attempt() -> None:
            if self.procs[b].alive:
                self._conn_ids += 1
                conn = Conn(self._conn_ids, kind, a, b)
                conn.last[a] = conn.last[b] = self.now
                self.conns_of(a).add(conn)
                self.conns_of(b).add(conn)
                made(conn)
            else:
                failed()

        self.after(self.delay(a, b), attempt, a)

    def send(self, conn: Conn, src: str, msg: Any) -> None:
        if not conn.open[src]:
            return
        dst = conn.other(src)
        t = max(self.now + self.delay(src, dst), conn.last[dst])
        conn.last[dst] = t

        def deliver() -> None:
            if conn.open[dst]:
                self.procs[dst].frame_received(conn, msg)

        self.at(t, deliver, dst)

    def close(self, conn: Conn, by: str, reset: bool = False, notify_self: bool = True) -> None:
        """
        C{by} closes C{conn}: gracefully (what it sent still arrives, then
        the close) or by a reset (everything in flight is lost).
        """
        if not conn.open[by]:
            return
        other = conn.other(by)
        conn.open[by] = False
        self._forget(conn)
        if notify_self:
            self.procs[by].connection_lost(conn)
        if not conn.open[other]:
            return
        if reset:
            conn.open[other] = False
            t = self.now + self.delay(by, other)
        else:
            t = max(self.now + self.delay(by, other), conn.last[other])
        conn.last[other] = t

        def lost() -> None:
            conn.open[other] = False
            self._forget(conn)
            self.procs[other].connection_lost(conn)

        self.at(t, lost, other)

    def _forget(self, conn: Conn) -> None:
        if not any(conn.open.values()):
            for end in conn.ends:
                self.conns_of(end).discard(conn)

    # -- faults --------------------------------------------------------------------------------

    def chain_members(self) -> list[str]:
        chains = self.master.state.chains
        return list(chains[0].members) if chains else []

    def inject_fault(self) -> None:
        weights = self.cfg.fault_weights
        kinds = sorted(weights)
        kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
        done = getattr(self, f"_fault_{kind}")()
        if done:
            self.faults += 1
            self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1

    def _fault_crash(self) -> bool:
        up = [n for n in self.nodes.values() if n.alive]
        members_up = [n for n in up if n.name in self.chain_members()]
        if len(members_up) <= 1:
            return False
        node = self.rng.choice(up)
        forever = self.rng.random() < self.cfg.crash_forever
        self.crash(node.name, None if forever else self.uniform(self.cfg.crash_downtime))
        return True

    def _fault_pause(self) -> bool:
        up = [n for n in self.nodes.values() if n.alive and not n.paused]
        if len(up) <= 1:
            return False
        self.pause(self.rng.choice(up).name, self.uniform(self.cfg.pause_time))
        return True

    def _fault_cut(self) -> bool:
        conns = sorted(
            {c for n in self.nodes for c in self.conns_of(n) if all(c.open.values())},
            key=lambda c: c.id,
        )
        chain = [c for c in conns if c.kind == "chain"]
        pool = chain if chain and self.rng.random() < 0.8 else conns
        if not pool:
            return False
        self.cut(self.rng.choice(pool))
        return True

    def _fault_master(self) -> bool:
        if not self.master.alive:
            return False
        self.crash_master(self.uniform(self.cfg.master_downtime))
        return True

    def _fault_slow(self) -> bool:
        node = self.rng.choice(sorted(self.nodes))
        until = self.now + self.uniform(self.cfg.slow_period)
        factor = self.uniform(self.cfg.slow_factor)
        self.slow_until[node] = (until, factor)
        self.trace(f"FAULT: {node}'s links are {factor:.0f}x slower until {until:.3f}")
        return True

    def _fault_partition(self) -> bool:
        node = self.rng.choice(sorted(self.nodes))
        duration = self.uniform(self.cfg.partition_time)
        self.partition(node, MASTER, duration)
        # Often some clients are cut off from the master too: they keep an
        # old configuration while the master reconfigures.
        for c in self.clients:
            if self.rng.random() < 0.5:
                self.partition(c.name, MASTER, duration)
        if self.rng.random() < 0.3:
            self.partition(node, self.rng.choice(sorted(set(self.nodes) - {node})), duration)
        return True

    def partition(self, a: str, b: str, duration: float) -> None:
        """Hold every frame between C{a} and C{b} for C{duration} seconds (TCP stalls)."""
        until = self.now + duration
        self.partitions[frozenset((a, b))] = until
        self.trace(f"FAULT: {a} and {b} partitioned until {until:.3f}")

    def crash(self, name: str, downtime: float | None = None) -> None:
        """Crash node C{name}; restart it after C{downtime} (None: not by itself)."""
        node = self.nodes[name]
        if not node.alive:
            return
        self.trace(f"FAULT: {name} crashes"
                   + (f", restarts in {downtime:.3f}" if downtime is not None else ""))
        node.crash()
        if downtime is not None:
            inc = node.inc
            self.after(downtime, lambda: self.restart(name) if node.inc == inc else None)

    def restart(self, name: str) -> None:
        """Restart a crashed node from its durable store."""
        node = self.nodes[name]
        if node.alive:
            return
        self.trace(f"{name} restarts")
        node.boot()

    def pause(self, name: str, duration: float) -> None:
        """Stop node C{name} from processing anything for C{duration} seconds."""
        node = self.nodes[name]
        if not node.alive or node.paused:
            return
        node.paused = True
        inc = node.inc
        self.trace(f"FAULT: {name} pauses for {duration:.3f}")
        self.after(duration, lambda: self.wake(name) if node.inc == inc else None)

    def wake(self, name: str) -> None:
        """End a pause: everything that arrived meanwhile is handled, in order."""
        node = self.nodes[name]
        if not node.paused:
            return
        node.paused = False
        self.trace(f"{name} wakes ({len(node.frozen)} events waiting)")
        frozen, node.frozen = node.frozen, []
        for ev in frozen:
            if node.paused or not node.alive:
                break
            self._run_event(ev)

    def cut(self, conn: Conn) -> None:
        """Reset a connection: frames in flight both ways are lost, both ends told."""
        self.trace(f"FAULT: connection {conn} reset")
        a, b = conn.ends
        if conn.open[a]:
            self.close(conn, a, reset=True, notify_self=False)
            t = self.now + self.delay(b, a)

            def lost() -> None:
                self.procs[a].connection_lost(conn)

            self.at(t, lost, a)
        elif conn.open[b]:
            self.close(conn, b, reset=True)

    def cut_link(self, pred: str, succ: str) -> bool:
        """Reset the chain connection from C{pred} to C{succ}, if there is one."""
        for conn in sorted(self.conns_of(pred), key=lambda c: c.id):
            if conn.kind == "chain" and conn.ends == (pred, succ) and any(conn.open.values()):
                self.cut(conn)
                return True
        return False

    def crash_master(self, downtime: float | None = None) -> None:
        """Crash the master; restart it after C{downtime} (None: not by itself)."""
        if not self.master.alive:
            return
        self.trace("FAULT: master crashes"
                   + (f", restarts in {downtime:.3f}" if downtime is not None else ""))
        self.master.crash()
        if downtime is not None:
            inc = self.master.inc
            self.after(downtime, lambda: self.restart_master() if self.master.inc == inc else None)

    def restart_master(self) -> None:
        if not self.master.alive:
            self.master.boot()

    # -- invariants ----------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """
        The chain invariants, after every step:

          - every store's applied seqs are contiguous;
          - a live replica's pending entries follow its committed seq without
            gaps, and its C{sent} list holds only entries above its acked seq,
            in seq order, contiguous, committed, and equal to its history;
          - for consecutive live members i -> j agreeing on the epoch,
            history(j) is a prefix of history(i);
          - no two members of the current chain (live or not) hold different
            entries for the same seq.
        """
        nodes = self.nodes
        for n in nodes.values():
            if n.store.violation is not None:
                self.fail(f"{n.name}: {n.store.violation}")
            r = n.replica
            if r is None:
                continue
            if n.paused:
                continue  # a frozen process: nothing it holds changes
            expect = r.committed_seq
            for e in list(r.committing or ()) + r.pending:
                if e.seq != expect + 1:
                    self.fail(f"{n.name}: uncommitted seq {e.seq} after {expect}")
                expect = e.seq
            if expect != r.applied_seq:
                self.fail(f"{n.name}: applied seq {r.applied_seq} but accepted up to {expect}")
            if r.sent and r.is_member:
                # Everything accepted and not settled, in order, up to the
                # applied seq (a restarted node knows less of what settled).
                floor = r._sent_floor()
                first = r.sent[0].seq
                if first <= floor:
                    self.fail(f"{n.name}: sent starts at seq {first}, settled up to {floor}")
                prev = first - 1
                for e in r.sent:
                    if e.seq != prev + 1:
                        self.fail(f"{n.name}: sent not contiguous: seq {e.seq} after {prev}")
                    prev = e.seq
                if prev != r.applied_seq:
                    self.fail(f"{n.name}: sent ends at seq {prev}, applied {r.applied_seq}")
                for e in (r.sent[0], r.sent[-1]):
                    if self._accepted_entry(n, e.seq) != entry_key(e):
                        self.fail(f"{n.name}: sent entry {e!r} differs from its history")
        # Consecutive live members at the same epoch.
        for n in nodes.values():
            r = n.replica
            if r is None or r.chain is None:
                continue
            succ = r.successor
            if succ is None:
                continue
            m = nodes[succ].replica
            if m is None or m.epoch != r.epoch or m.predecessor != n.name:
                continue
            if not r.verified or nodes[n.name].paused or nodes[succ].paused:
                continue  # a restarted node may be behind; it checks, then leaves
            self._accepted_prefix(succ, n.name)
        # Members of the current chain agree seq by seq.
        members = self.chain_members()
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                self._prefix(a, b, strict=False)

    def _accepted_entry(self, node: SimNode, seq: int) -> tuple[Any, ...] | None:
        """The entry a live node accepted at C{seq} (committed or not)."""
        r = node.replica
        assert r is not None
        if seq <= r.committed_seq:
            return node.store.history.get(seq)
        for e in list(r.committing or ()) + r.pending:
            if e.seq == seq:
                return entry_key(e)
        return None

    def _accepted_prefix(self, short: str, long: str) -> None:
        """The accepted history of C{short} is a prefix of C{long}'s (running nodes)."""
        ns, nl = self.nodes[short], self.nodes[long]
        rs, rl = ns.replica, nl.replica
        assert rs is not None and rl is not None
        if rs.applied_seq > rl.applied_seq:
            self.fail(
                f"history of {short} (up to {rs.applied_seq}) is not a prefix of the history of "
                f"its predecessor {long} (up to {rl.applied_seq})"
            )
        # The part beyond the committed histories (compared by _prefix).
        for s in range(max(1, min(rs.committed_seq, rl.committed_seq) + 1), rs.applied_seq + 1):
            if self._accepted_entry(ns, s) != self._accepted_entry(nl, s):
                self.fail(f"{short} and its predecessor {long} accepted different entries for "
                          f"seq {s}")

    def _prefix(self, short: str, long: str, strict: bool) -> None:
        """history(short) is a prefix of history(long) (strict) or they agree seq by seq."""
        hs, hl = self.nodes[short].store, self.nodes[long].store
        if strict and hs.applied_seq > hl.applied_seq:
            self.fail(
                f"history of {short} (up to {hs.applied_seq}) is not a prefix of the history of "
                f"its predecessor {long} (up to {hl.applied_seq})"
            )
        key = (short, long)
        gen = (hs.generation, hl.generation)
        done = self._verified.get(key)
        start = max(hs.first_seq, hl.first_seq)
        if done is not None and done[:2] == gen:
            start = max(start, done[2] + 1)
        upto = min(hs.applied_seq, hl.applied_seq)
        for s in range(start, upto + 1):
            if hs.history.get(s) != hl.history.get(s):
                self.fail(
                    f"{short} and {long} hold different entries for seq {s}: "
                    f"{hs.entries.get(s)!r} vs {hl.entries.get(s)!r}"
                )
        self._verified[key] = (*gen, max(upto, start - 1))

    # -- whole runs ----------------------------------------------------------------------------

    def start(self) -> None:
        """Boot the master, the nodes (in name order, so they form one chain) and the clients."""
        self.trace(f"seed {self.seed}: {self.cfg.nodes} nodes, chain of {self.cfg.chain_length}, "
                   f"{self.cfg.clients} clients x {self.cfg.lanes} lanes, keys {self.cfg.keys}")
        self.master.boot()
        for i, name in enumerate(sorted(self.nodes)):
            self.at(0.001 * (i + 1), self.nodes[name].boot)
        for c in self.clients:
            c.start()

    def run_steps(self, steps: int) -> None:
        """The faulty phase: C{steps} events."""
        end = self.steps + steps
        while self.steps < end and self.step():
            pass

    def heal(self) -> None:
        """Stop the faults and bring every process back."""
        self.cfg.faults = False
        self.slow_until.clear()
        self.partitions.clear()
        self.trace("HEAL: faults stop, everything comes back")
        if not self.master.alive:
            self.restart_master()
        for name, node in sorted(self.nodes.items()):
            if not node.alive:
                self.restart(name)
            elif node.paused:
                self.wake(name)

    def settled(self) -> bool:
        """Clients idle, every live member caught up and idle, everyone at the master's version."""
        if not all(c.idle for c in self.clients) or not self.master.alive:
            return False
        version = self.master.state.version
        seqs = set()
        for name in self.chain_members():
            n = self.nodes[name]
            r = n.replica
            if r is None or n.config.version != version:
                return False
            if r.pending or r.committing or r.sent or n.inflight is not None:
                return False
            seqs.add(r.applied_seq)
        return len(seqs) <= 1

    def finish(self) -> None:
        """Heal, settle, read every key, then check the whole run."""
        self.heal()
        for c in self.clients:
            c.stopping = True
        if not self.run_while(lambda: not self.settled(), self.cfg.quiesce_time):
            self.fail("the cluster did not settle after healing")
        reader = self.clients[0]
        reader.stopping = True
        for key in self.keys:
            lane = reader.lanes[0]
            reader.begin(lane, "get", key, deadline=self.cfg.quiesce_time)
            if not self.run_while(lambda ln=lane: ln.op is not None, self.cfg.quiesce_time):
                self.fail(f"the final read of {key!r} did not end")
        history = self.recorder.history
        finals = history[-len(self.keys):]
        for op in finals:
            if not op.known:
                self.fail(f"the final read of {op.key!r} got no answer after healing")
        self.check_final(history)

    def check_final(self, history: list[Operation]) -> None:
        """Linearizability, durability of acknowledged updates, convergence."""
        members = self.chain_members()
        tail = self.nodes[members[-1]]
        # Exactly once: a request is decided once; its retries are NOOPs
        # carrying the recorded status.
        by_session: dict[tuple[bytes, int, int], Entry] = {}
        for seq in sorted(tail.store.entries):
            e = tail.store.entries[seq]
            if e.client_id == wire.NO_CLIENT:
                continue
            first = by_session.setdefault((e.client_id, e.lane, e.request_id), e)
            if first is not e and (e.op != Op.NOOP or e.status != first.status):
                self.fail(f"request {e.request_id} of lane {e.lane} applied twice: {first!r} "
                          f"then {e!r} (status {Status(first.status).name} then "
                          f"{Status(e.status).name})")
        for cid, lane, rid, status, client in self.acked:
            e = by_session.get((cid, lane, rid))
            if e is None:
                self.fail(f"{client}'s acknowledged update rid {rid} (lane {lane}) is not in the "
                          f"tail {tail.name}'s history")
            if e.status != status:
                self.fail(f"{client}'s update rid {rid} was answered {Status(status).name} but "
                          f"the chain recorded {Status(e.status).name}")
        data = None
        for name in members:
            n = self.nodes[name]
            if data is None:
                data = n.store.data
            elif n.store.data != data:
                self.fail(f"member {name}'s data differs from {members[0]}'s after settling")
        result = check(history, timeout=self.cfg.check_timeout)
        if result.ok is None:
            self.fail(f"the linearizability check timed out: {result}")
        if not result.ok:
            self.fail(str(result))
        self.trace(f"OK: linearizable, {result.operations} operations")

    def summary(self) -> str:
        history = self.recorder.history
        known = sum(1 for op in history if op.known)
        members = self.chain_members()
        seq = self.nodes[members[-1]].store.applied_seq if members else 0
        return (
            f"seed {self.seed}: {self.steps} steps, t={self.now:.2f}s, {len(history)} ops "
            f"({known} answered, {self.unknown_ops} unknown), {seq} updates in the chain, "
            f"faults {dict(sorted(self.fault_counts.items()))}, {self.left} left, "
            f"final chain {members}"
        )


def run(seed: int, steps: int = 1500, verbose: bool = False, cfg: SimConfig | None = None,
        out: Any = None) -> Simulation:
    """
    One whole run: start, C{steps} events with faults, then heal and check.

    @raise SimulationFailure: something broke; the message says what, where, and
        how to replay it.
    """
    sim = Simulation(seed, cfg, verbose=verbose, out=out)
    sim.start()
    sim.run_steps(steps)
    sim.finish()
    return sim


def main(argv: Iterable[str] | None = None) -> int:
    """The command line: run seeds, print a summary, or the failure."""
    parser = argparse.ArgumentParser(
        prog="python -m ckv.testing.simulation",
        description="Deterministic simulation of a ckv chain with faults.",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1, help="run this many seeds from --seed")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("-v", "--verbose", action="store_true", help="print every event")
    args = parser.parse_args(list(argv) if argv is not None else None)
    failed = 0
    for seed in range(args.seed, args.seed + args.seeds):
        try:
            sim = run(seed, args.steps, verbose=args.verbose)
        except SimulationFailure as e:
            failed += 1
            print(f"FAILED: {e}")
            continue
        print(sim.summary())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
