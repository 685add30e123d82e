"""
The replica: chain replication's state machine for one node, without I/O.

It is fed events (a client update arrived, updates arrived from the
predecessor, an ack arrived from the successor, a batch was committed, the
configuration changed, a link came up or went down) and returns
L{Action}s: frames to send and to whom.  Committing to the store is a
separate step (L{Replica.take_batch} / L{Replica.batch_committed}) so the
adapter can run it on a thread and group many updates in one transaction.

Histories and invariants (DESIGN.md section 1):

  - C{applied_seq}: the highest seq accepted into this node's history (in
    seq order, no gaps).  Updates are accepted in memory, forwarded at once
    (L{Replica.forward}) and committed in batches meanwhile: the nodes of a
    chain write the same update to their disks in parallel (pipelined
    durability, doc/design.md).
  - C{sent}: entries accepted here and not yet settled: meant for the
    successor, not yet acknowledged.  C{history(pred) = history(succ) +
    sent(pred)} for the accepted histories of running nodes.
  - The durability frontier flows down the chain in COMMITTED frames: a
    node sends C{min(its committed seq, its predecessor's frontier)}.  The
    tail settles an entry (replies to its client, acknowledges upstream)
    only once the entry is within its own frontier, so an acknowledged
    update is on the disk of every member.
  - A node that restarts lost what it had accepted but not committed, and
    its successor may hold some of it.  So a restarted node is not
    C{verified}: it decides nothing and accepts nothing until its
    successor's CHAIN_HELLO_REPLY shows it is not ahead; if it is ahead,
    the node C{left}: it registers as having lost its chain, the master
    removes it, and it rejoins by state transfer.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.logger import Logger

from ckv import wire
from ckv.config import Chain
from ckv.entry import Entry
from ckv.storage import Batch, Recovered, session_key
from ckv.wire import Op, Status

#: read_fence value meaning "wait for the predecessor's FENCE".
FENCE_PENDING = -1

#: Committed client sessions kept in memory (the rest are read from LMDB).
SESSION_CACHE_SIZE = 100_000

# Action kinds.
TO_SUCCESSOR = "successor"
TO_PREDECESSOR = "predecessor"
TO_CLIENT = "client"  # target: client id; the tail's direct reply channel
TO_ORIGIN = "origin"  # target: the connection the request came from


@dataclass(frozen=True)
class Action:
    """Send C{frame} to C{kind} (and C{target}, for clients and origins)."""

    kind: str
    frame: bytes
    target: Any = None
    #: For client replies: the connection the request came from, used when
    #: the client has no reply channel to this node.
    origin: Any = None


class StoreReader(Protocol):
    """The reads the replica needs from its committed store."""

    def get(self, key: bytes) -> bytes | None: ...

    def session(self, skey: bytes) -> tuple[int, int] | None: ...


class HelloRefused(Exception):
    """A CHAIN_HELLO was refused; C{code} and C{message} go in the ERROR frame."""

    def __init__(self, code: wire.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Replica:
    """
    The state of one chain member.

    @param name: this node's name.
    @param store: committed reads (data and sessions).
    @param recovered: durable state read back at start.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        store: StoreReader,
        recovered: Recovered | None = None,
        lease_ok: Callable[[], bool] | None = None,
        restarted: bool = False,
    ) -> None:
        rec = recovered or Recovered()
        self.name = name
        self.store = store
        self.epoch = rec.epoch
        self.chain_id = rec.chain_id
        self.chain: Chain | None = None
        self.applied_seq = rec.applied_seq
        self.committed_seq = rec.applied_seq
        sent = list(rec.sent)
        #: The highest seq written to the sent list on disk (what a prune
        #: could still have to remove).
        self._sent_on_disk = sent[-1].seq if sent else 0
        if sent and sent[-1].seq != rec.applied_seq:
            # Left over from before this node was a tail (a tail keeps no
            # sent list on disk): nothing to resend from there.
            sent = []
        #: Highest seq settled: on every member's disk and answered (a
        #: tail: its own frontier).  After a restart only what the sent
        #: list proves: the frontier of a tail's last commits is unknown.
        if rec.sent:
            self.acked_seq = rec.sent[0].seq - 1
        else:
            self.acked_seq = 0 if restarted else rec.applied_seq
        #: Highest seq our successor acknowledged: what `sent` is pruned by.
        self.succ_acked = self.acked_seq
        self.sent: deque[Entry] = deque(sent)
        #: The frontier received from the predecessor: every entry up to it
        #: is on the disk of every node before us.
        self.pred_durable = 0
        #: The frontier last sent on the current successor link.
        self._frontier_sent = 0
        #: False after a restart until the successor is known not to be
        #: ahead (see the module docstring).
        self.verified = not restarted
        #: The successor was ahead after a restart: leave and rejoin.
        self.left = False
        #: As the tail: key -> seq of the last unsettled entry writing it;
        #: a query for such a key waits until that entry settles.
        self._unsettled: dict[bytes, int] = {}
        self._parked: dict[int, list[tuple[Any, Any]]] = {}
        self._tracking = False
        #: Part of the read fence that FENCE_PENDING stands for (see
        #: _fence_unsettled_store).
        self._store_fence = 0
        self.pending: list[Entry] = []
        self.committing: list[Entry] | None = None
        self._overlay: dict[bytes, tuple[int, bytes | None]] = {}
        self._session_overlay: dict[bytes, tuple[int, int, int]] = {}
        #: Committed sessions, read-through (bounded: cleared when too big).
        self._session_cache: dict[bytes, tuple[int, int, int]] = {}
        self._held: dict[int, Entry] = {}
        #: Highest seq sent on the current successor link; None: no link.
        self.forward_cursor: int | None = None
        self._prune_persisted = self.succ_acked
        self._meta_dirty = False
        #: A node made tail after joining serves no read until it holds
        #: everything the old tail may have answered: None, no fence; an int,
        #: wait until that seq is committed; FENCE_PENDING, wait for the
        #: predecessor's FENCE marker.
        self.read_fence: int | None = None
        self._tail_since_epoch = 0
        #: The latest FENCE (epoch, seq) received, kept in case it arrives
        #: before the configuration that makes us the tail.
        self._fence_seen: tuple[int, int] | None = None
        self._lease_ok = lease_ok or (lambda: True)
        # Counters for stats.
        self.updates_decided = 0
        self.queries_answered = 0
        self.duplicates = 0

    # -- role --------------------------------------------------------------

    @property
    def is_member(self) -> bool:
        return self.chain is not None and self.chain.index_of(self.name) is not None

    @property
    def is_head(self) -> bool:
        return self.is_member and self.chain.members[0].name == self.name  # type: ignore[union-attr]

    @property
    def is_tail(self) -> bool:
        return self.is_member and self.chain.members[-1].name == self.name  # type: ignore[union-attr]

    @property
    def is_joining(self) -> bool:
        """Being added after the tail: receives a state transfer, serves nothing."""
        return self.chain is not None and self.chain.is_joining(self.name)

    @property
    def successor_is_joining(self) -> bool:
        """We are the tail and extend the chain to a joining node."""
        return self.is_tail and bool(self.chain and self.chain.joining)

    @property
    def role(self) -> str:
        if self.is_joining:
            return "joining"
        if not self.is_member:
            return "none"
        if self.is_head and self.is_tail:
            return "head+tail"
        if self.is_head:
            return "head"
        if self.is_tail:
            return "tail"
        return "middle"

    @property
    def predecessor(self) -> str | None:
        if self.chain is None:
            return None
        m = self.chain.predecessor_of(self.name)
        return m.name if m else None

    @property
    def successor(self) -> str | None:
        if self.chain is None:
            return None
        m = self.chain.successor_of(self.name)
        return m.name if m else None

    # -- configuration -----------------------------------------------------

    def on_config(self, chain: Chain | None) -> list[Action]:
        """
        A new configuration of this node's chain arrived (None: the node is
        in no chain).  Older epochs are ignored.
        """
        if chain is not None and self.chain is not None and chain.epoch < self.chain.epoch:
            return []
        was_tail = self.is_tail
        was_joining = self.is_joining
        self.chain = chain
        if chain is not None and (chain.epoch != self.epoch or chain.chain_id != self.chain_id):
            self.epoch = chain.epoch
            self.chain_id = chain.chain_id
            self._meta_dirty = True
        actions: list[Action] = []
        if self.is_tail and not was_tail:
            self._tail_since_epoch = self.epoch
            if was_joining:
                # Promoted: the old tail may have answered entries we lack.
                self.read_fence = FENCE_PENDING
                # Its FENCE may have come before this configuration did.
                if self._fence_seen is not None and self._fence_seen[0] >= self.epoch:
                    self.read_fence = self._fence_seen[1]
            if self.successor is None:
                self.forward_cursor = None
            # Entries not settled yet (our old successor's, or accepted
            # before this configuration) are answered as they settle; their
            # keys are read only once they have.
            self._tracking = True
            self._unsettled = {
                e.key: e.seq for e in self.sent if e.seq > self.acked_seq and e.op != Op.NOOP
            }
            self._fence_unsettled_store()
        elif was_tail and not self.is_tail:
            actions += self._stop_tracking()
            if self.is_member:
                # No longer the tail: tell the new tail what we may have answered.
                actions += self._fence()
        if self.is_joining and not was_joining:
            # What we held before belongs to another chain or epoch: the
            # snapshot replaces it, and no frontier of then counts now (so
            # nothing of it is acknowledged to our new predecessor).
            self.pred_durable = 0
            self._held.clear()
        if (self.is_member or self.is_joining) and self.successor is None:
            # Nobody after us can be ahead of us.  (A joining successor is
            # no proof: after our restart it may hold a snapshot and updates
            # we lost; it is checked like any successor once promoted.)
            self.verified = True
            self.left = False
        return actions + self._settle()

    def _stop_tracking(self) -> list[Action]:
        """We stop being the tail: queries waiting for an entry are refused (retried)."""
        self._tracking = False
        self._unsettled = {}
        parked, self._parked = self._parked, {}
        return [
            self._error(req, origin, Status.NOT_TAIL, f"{self.name} is no longer the tail")
            for waiting in parked.values()
            for req, origin in waiting
        ]

    def _fence(self) -> list[Action]:
        """A FENCE marker after everything we committed (only once forwarded)."""
        if self.forward_cursor is None or self.is_tail:
            return []
        return [
            Action(
                TO_SUCCESSOR,
                wire.encode(wire.MessageType.FENCE, epoch=self.epoch, seq=self.committed_seq),
            )
        ]

    def on_fence(self, epoch: int, seq: int) -> None:
        """The predecessor has sent us everything up to C{seq}."""
        if self._fence_seen is None or epoch >= self._fence_seen[0]:
            self._fence_seen = (epoch, seq)
        if self.read_fence is not None and epoch >= self._tail_since_epoch:
            self.read_fence = max(seq, self._store_fence)

    def _fenced(self) -> bool:
        fence = self.read_fence
        if fence is None:
            return False
        if fence != FENCE_PENDING and self.acked_seq >= fence:
            self.read_fence = None
            return False
        return True

    def _fence_unsettled_store(self) -> None:
        """
        We start answering reads: entries already in our store but not in
        C{sent} (so not in C{_unsettled}) may not be settled (a restarted
        tail, a node holding a snapshot): no read before they are.
        """
        start = self.sent[0].seq - 1 if self.sent else self.applied_seq
        if start > self.acked_seq:
            fence = self.read_fence
            if fence is None:
                self.read_fence = start
            elif fence != FENCE_PENDING:
                self.read_fence = max(fence, start)
            else:
                self._store_fence = start

    # -- client requests ---------------------------------------------------

    def on_client_update(self, req: Any, origin: Any = None) -> list[Action]:
        """A put, delete or cas from a client (through the dispatcher or direct)."""
        if not self.is_head:
            return [self._error(req, origin, Status.NOT_HEAD, f"{self.name} is not the head")]
        if not self.verified:
            return [
                self._error(
                    req,
                    origin,
                    Status.UNAVAILABLE,
                    f"{self.name} restarted and is checking its successor",
                )
            ]
        bad = wire.check_request(req)
        if bad is not None:
            return [self._error(req, origin, bad[0], bad[1])]
        if req.epoch and req.epoch != self.epoch:
            return [
                self._error(
                    req,
                    origin,
                    Status.STALE_EPOCH,
                    f"request for epoch {req.epoch}, chain is at epoch {self.epoch}",
                )
            ]
        skey = b""
        if req.client_id != wire.NO_CLIENT:
            skey = session_key(req.client_id, req.lane)
            last = self._session_with_seq(skey)
            if last is not None:
                last_rid, last_status, last_seq = last
                if req.request_id < last_rid:
                    return [
                        self._error(
                            req,
                            origin,
                            Status.STALE_REQUEST,
                            f"request {req.request_id} on lane {req.lane} is older than "
                            f"request {last_rid}, already applied",
                        )
                    ]
                if req.request_id == last_rid:
                    self.duplicates += 1
                    if last_seq > self.acked_seq:
                        # The original is still on its way to the tail,
                        # which will answer it: one reply is enough.
                        return []
                    # A retry of a finished request (its reply was lost):
                    # re-reply the recorded result, after the original.
                    self._accept_new(req, Op.NOOP, Status(last_status), b"", skey)
                    return []
        op, status, value = self._decide(req)
        self._accept_new(req, op, status, value, skey)
        self.updates_decided += 1
        return []

    def _decide(self, req: Any) -> tuple[Op, Status, bytes]:
        op = req.op
        if op == Op.PUT:
            return Op.PUT, Status.OK, req.value
        current = self._get(req.key)
        if op == Op.DELETE:
            if current is None:
                return Op.NOOP, Status.NOT_FOUND, b""
            return Op.DELETE, Status.OK, b""
        # CAS
        expected = req.expected if req.flags & wire.FLAG_HAS_EXPECTED else None
        if current != expected:
            return Op.NOOP, Status.CAS_FAILED, b""
        if req.flags & wire.FLAG_HAS_VALUE:
            return Op.PUT, Status.OK, req.value
        return Op.DELETE, Status.OK, b""

    def _accept_new(self, req: Any, op: Op, status: Status, value: bytes, skey: bytes) -> None:
        entry = Entry(
            self.applied_seq + 1,
            req.client_id,
            req.lane,
            req.request_id,
            int(op),
            int(status),
            req.key,
            value,
        )
        self._accept(entry, skey)

    def on_query(self, req: Any, origin: Any = None) -> list[Action]:
        """A get: answered by the tail alone, from its committed store."""
        if not self.is_tail:
            return [self._error(req, origin, Status.NOT_TAIL, f"{self.name} is not the tail")]
        if not self._lease_ok():
            return [
                self._error(req, origin, Status.UNAVAILABLE, f"{self.name} holds no read lease")
            ]
        if self._fenced():
            return [
                self._error(
                    req, origin, Status.UNAVAILABLE, f"{self.name} is catching up as the new tail"
                )
            ]
        bad = wire.check_request(req)
        if bad is not None:
            return [self._error(req, origin, bad[0], bad[1])]
        waiting_for = self._unsettled.get(req.key)
        if waiting_for is not None:
            # The store may hold a write of this key that is not on every
            # disk yet: answer with that write once it is.
            self._parked.setdefault(waiting_for, []).append((req, origin))
            return []
        value = self.store.get(req.key)
        self.queries_answered += 1
        if value is None:
            frame = wire.reply(req.client_id, req.request_id, Status.NOT_FOUND)
        else:
            frame = wire.reply(req.client_id, req.request_id, Status.OK, value)
        return [Action(TO_CLIENT, frame, req.client_id, origin)]

    def _error(self, req: Any, origin: Any, status: Status, message: str) -> Action:
        return Action(
            TO_ORIGIN, wire.error_reply(req.client_id, req.request_id, status, message), origin
        )

    # -- the chain ---------------------------------------------------------

    def on_chain_hello(
        self, chain_id: int, epoch: int, name: str, committed_seq: int | None = None
    ) -> bytes:
        """
        A predecessor introduces itself.  Returns the CHAIN_HELLO_REPLY frame.

        @raise HelloRefused: the sender is not our predecessor in our epoch.
        """
        if self.chain is None:
            raise HelloRefused(wire.ErrorCode.NOT_MEMBER, f"{self.name} has no configuration yet")
        if epoch < self.epoch:
            raise HelloRefused(
                wire.ErrorCode.STALE_EPOCH,
                f"stale epoch {epoch}: chain {self.chain_id} is at epoch {self.epoch}",
            )
        if epoch > self.epoch:
            raise HelloRefused(
                wire.ErrorCode.STALE_EPOCH,
                f"{self.name} is at epoch {self.epoch}, behind {epoch}; retry shortly",
            )
        if chain_id != self.chain_id or self.predecessor != name:
            raise HelloRefused(
                wire.ErrorCode.NOT_MEMBER,
                f"{name} is not the predecessor of {self.name} in chain {self.chain_id} "
                f"epoch {self.epoch}",
            )
        if not self.verified:
            raise HelloRefused(
                wire.ErrorCode.REJECTED,
                f"{self.name} restarted and is checking its successor; retry shortly",
            )
        self._held.clear()
        if committed_seq is not None:
            # The predecessor resends everything up to there on this link.
            self.on_fence(epoch, committed_seq)
        return wire.encode(
            wire.MessageType.CHAIN_HELLO_REPLY, epoch=self.epoch, applied_seq=self.applied_seq
        )

    def hello_frame(self) -> bytes:
        """The CHAIN_HELLO this node sends on a new link to its successor."""
        return wire.encode(
            wire.MessageType.CHAIN_HELLO,
            chain_id=self.chain_id,
            epoch=self.epoch,
            name=self.name.encode(),
            committed_seq=self.committed_seq,
        )

    def on_successor_ready(self, epoch: int, successor_applied: int) -> list[Action]:
        """The successor answered our hello: resend what it lacks, then stream."""
        if epoch != self.epoch:
            return []
        if successor_applied > self.applied_seq:
            if not self.verified:
                # We lost, in a restart, updates we had forwarded: leave, and
                # come back by state transfer (none of them was acknowledged).
                self.log.warn(
                    "successor {succ} is ahead of {name} after a restart (seq {theirs} against "
                    "{ours}): leaving the chain to rejoin by state transfer",
                    succ=self.successor,
                    name=self.name,
                    theirs=successor_applied,
                    ours=self.applied_seq,
                )
                self.left = True
                return []
            self.log.critical(
                "successor {succ} is ahead of {name}: it has seq {theirs}, we have {ours}; "
                "not forwarding",
                succ=self.successor,
                name=self.name,
                theirs=successor_applied,
                ours=self.applied_seq,
            )
            return []
        if successor_applied < self.succ_acked:
            self.log.critical(
                "successor {succ} lacks seq {first}..: it has {theirs}, already acknowledged; "
                "it needs a state transfer",
                succ=self.successor,
                first=self.succ_acked + 1,
                theirs=successor_applied,
            )
            return []
        self.verified = True
        self.forward_cursor = successor_applied
        return self.forward()

    def on_transfer_done(self, epoch: int, snapshot_seq: int) -> list[Action]:
        """
        The joining successor holds our snapshot up to C{snapshot_seq}:
        stream everything after it (kept in `sent` since it started joining).
        """
        if epoch != self.epoch:
            return []
        if self.sent and self.sent[0].seq > snapshot_seq + 1:
            self.log.critical(
                "cannot stream to {succ} after its snapshot at {snap}: sent starts at {first}",
                succ=self.successor,
                snap=snapshot_seq,
                first=self.sent[0].seq,
            )
            return []
        self.forward_cursor = snapshot_seq
        return self.forward()

    def on_successor_lost(self) -> None:
        self.forward_cursor = None
        self._frontier_sent = 0

    def on_updates(
        self, epoch: int, entries: list[Any], raws: list[bytes] | None = None
    ) -> list[Action]:
        """
        Updates from the predecessor, in seq order (duplicates ignored, gaps
        held).  C{raws}, each entry's bytes in the UPDATES frame they came
        in, lets the entries keep them for the sent list and the next hop.
        """
        for i, c in enumerate(entries):
            seq = c.seq
            if seq <= self.applied_seq:
                continue
            entry = Entry.from_wire(c, raws[i] if raws is not None else None)
            if seq == self.applied_seq + 1:
                self._accept(entry)
                while self.applied_seq + 1 in self._held:
                    self._accept(self._held.pop(self.applied_seq + 1))
            else:
                self._held[seq] = entry
        return []

    def on_ack(self, epoch: int, seq: int) -> list[Action]:
        """A cumulative ack from the successor: drop acked entries, pass it on."""
        if seq <= self.succ_acked:
            return []
        if self.successor_is_joining and self.forward_cursor is None:
            return []  # from a joining node before its transfer: not ours
        self.succ_acked = seq
        if self.is_tail or seq <= self.acked_seq:
            # A tail settles by its own frontier (this ack is from a joining
            # node); an older ack was already passed on.
            self._prune_sent()
            return []
        self.acked_seq = seq
        self._prune_sent()
        return self._ack_upstream(seq)

    def on_committed(self, epoch: int, seq: int) -> list[Action]:
        """The predecessor's durability frontier: everything up to C{seq} is on disk before us."""
        if seq <= self.pred_durable:
            return []
        self.pred_durable = seq
        return self._settle()

    def frontier(self) -> int:
        """Every entry up to this seq is on our disk and on every disk before us."""
        if self.predecessor is None:
            return self.committed_seq
        return min(self.committed_seq, self.pred_durable)

    def _sent_floor(self) -> int:
        """Entries of C{sent} up to this seq are no longer needed."""
        if self.is_tail:
            if self.successor is not None:
                # Kept for the joining node too, until it has them.
                return min(self.acked_seq, self.succ_acked)
            return self.acked_seq
        if self.is_joining:
            return self.acked_seq
        return self.succ_acked

    def _prune_sent(self) -> None:
        floor = self._sent_floor()
        sent = self.sent
        while sent and sent[0].seq <= floor:
            sent.popleft()

    def _settle(self) -> list[Action]:
        """
        The tail (or a joining node): settle every entry within our
        frontier.  The tail answers its clients and the queries waiting
        for those entries; both acknowledge upstream.
        """
        if not (self._tracking or self.is_joining):
            return []
        f = self.frontier()
        if f <= self.acked_seq:
            return []
        actions: list[Action] = []
        if self._tracking:
            sent = self.sent
            i = max(0, self.acked_seq + 1 - sent[0].seq) if sent else 0
            unsettled, parked = self._unsettled, self._parked
            while i < len(sent):
                e = sent[i]
                if e.seq > f:
                    break
                i += 1
                if e.client_id != wire.NO_CLIENT:
                    actions.append(
                        Action(
                            TO_CLIENT,
                            wire.reply(e.client_id, e.request_id, Status(e.status)),
                            e.client_id,
                        )
                    )
                if e.op == Op.NOOP:
                    continue
                if unsettled.get(e.key) == e.seq:
                    del unsettled[e.key]
                waiting = parked.pop(e.seq, None)
                if waiting:
                    actions += self._answer_parked(waiting, e)
        self.acked_seq = f
        if self.successor is None:
            self.succ_acked = f
        self._prune_sent()
        return actions + self._ack_upstream(f)

    def _answer_parked(self, waiting: list[tuple[Any, Any]], e: Entry) -> list[Action]:
        out = []
        for req, origin in waiting:
            if not self._lease_ok():
                out.append(
                    self._error(req, origin, Status.UNAVAILABLE, f"{self.name} holds no read lease")
                )
                continue
            self.queries_answered += 1
            if e.op == Op.PUT:
                frame = wire.reply(req.client_id, req.request_id, Status.OK, e.value)
            else:
                frame = wire.reply(req.client_id, req.request_id, Status.NOT_FOUND)
            out.append(Action(TO_CLIENT, frame, req.client_id, origin))
        return out

    def _ack_upstream(self, seq: int) -> list[Action]:
        if self.predecessor is None:
            return []
        return [Action(TO_PREDECESSOR, wire.ack(self.epoch, seq))]

    # -- accepting and committing ------------------------------------------

    def _accept(self, entry: Entry, skey: bytes | None = None) -> None:
        self.applied_seq = entry.seq
        self.pending.append(entry)
        self.sent.append(entry)
        if entry.op == Op.PUT:
            self._overlay[entry.key] = (entry.seq, entry.value)
        elif entry.op == Op.DELETE:
            self._overlay[entry.key] = (entry.seq, None)
        if self._tracking and entry.op != Op.NOOP:
            self._unsettled[entry.key] = entry.seq
        if entry.client_id != wire.NO_CLIENT:
            if skey is None:
                skey = session_key(entry.client_id, entry.lane)
            self._session_overlay[skey] = (entry.request_id, entry.status, entry.seq)

    def _get(self, key: bytes) -> bytes | None:
        hit = self._overlay.get(key)
        if hit is not None:
            return hit[1]
        return self.store.get(key)

    def _session(self, skey: bytes) -> tuple[int, int] | None:
        found = self._session_with_seq(skey)
        return None if found is None else (found[0], found[1])

    def _session_with_seq(self, skey: bytes) -> tuple[int, int, int] | None:
        """
        The last request id, status and seq of a session.  The seq is 0 when
        only the store knew it (long since at the tail, as far as we know).
        """
        hit = self._session_overlay.get(skey)
        if hit is not None:
            return hit
        cached = self._session_cache.get(skey)
        if cached is not None:
            return cached
        found = self.store.session(skey)
        if found is None:
            return None
        value = (found[0], found[1], 0)
        self._cache_session(skey, value)
        return value

    def _cache_session(self, skey: bytes, value: tuple[int, int, int]) -> None:
        cache = self._session_cache
        if len(cache) >= SESSION_CACHE_SIZE:
            cache.clear()
        cache[skey] = value

    @property
    def busy(self) -> bool:
        """A batch is being committed."""
        return self.committing is not None

    def take_batch(self) -> Batch | None:
        """
        The next batch to commit, or None (nothing to do, or a batch is
        already in flight: batches commit one at a time, in order).
        """
        if self.committing is not None:
            return None
        floor = self._sent_floor()
        prune = 0
        if floor > self._prune_persisted and self._sent_on_disk > self._prune_persisted:
            prune = floor
        if not self.pending and not prune and not self._meta_dirty:
            return None
        self.committing, self.pending = self.pending, []
        batch = Batch(
            entries=self.committing,
            keep_sent=self.successor is not None,
            prune_sent_upto=prune,
        )
        if batch.keep_sent and batch.entries:
            self._sent_on_disk = batch.entries[-1].seq
        if self._meta_dirty:
            batch.epoch = self.epoch
            batch.chain_id = self.chain_id
            self._meta_dirty = False
        return batch

    def batch_committed(self, batch: Batch) -> list[Action]:
        """The batch is on disk: the tail settles what is now within its frontier."""
        entries = self.committing or []
        self.committing = None
        if batch.prune_sent_upto:
            self._prune_persisted = max(self._prune_persisted, batch.prune_sent_upto)
        if not entries:
            return []
        self.committed_seq = entries[-1].seq
        overlay, soverlay = self._overlay, self._session_overlay
        for e in entries:
            hit = overlay.get(e.key)
            if hit is not None and hit[0] == e.seq:
                del overlay[e.key]
            if e.client_id != wire.NO_CLIENT:
                skey = session_key(e.client_id, e.lane)
                shit = soverlay.get(skey)
                if shit is not None and shit[2] == e.seq:
                    del soverlay[skey]
                    self._cache_session(skey, shit)
        return self._settle()

    def batch_failed(self, batch: Batch) -> None:
        """The commit failed (for example the map was full): retry it next."""
        if self.committing is not None:
            self.pending = self.committing + self.pending
            self.committing = None
        if batch.epoch is not None:
            self._meta_dirty = True

    def forward(self) -> list[Action]:
        """
        What the successor has not been sent yet: UPDATES for the entries
        accepted since, and a COMMITTED frame if our frontier moved.
        """
        actions = self._forward()
        if self.forward_cursor is not None:
            f = self.frontier()
            if f > self._frontier_sent:
                self._frontier_sent = f
                actions.append(Action(TO_SUCCESSOR, wire.committed(self.epoch, f)))
        return actions

    def _forward(self) -> list[Action]:
        """UPDATES frames for every accepted entry the successor has not been sent."""
        cursor = self.forward_cursor
        if cursor is None or not self.sent or self.sent[-1].seq <= cursor:
            return []
        first = self.sent[0].seq
        start = max(0, cursor - first + 1)
        actions = []
        batch: list[bytes] = []
        size = 0
        for i in range(start, len(self.sent)):
            raw = self.sent[i].encode()
            batch.append(raw)
            size += len(raw)
            if size >= wire.MAX_BATCH_BYTES:
                actions.append(self._updates_frame(batch))
                batch, size = [], 0
        if batch:
            actions.append(self._updates_frame(batch))
        self.forward_cursor = self.sent[-1].seq
        return actions

    def _updates_frame(self, batch: list[bytes]) -> Action:
        return Action(TO_SUCCESSOR, wire.updates_frame(self.epoch, batch))

    # -- introspection -----------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "chain": self.chain_id if self.chain_id != wire.NO_CHAIN else None,
            "epoch": self.epoch,
            "predecessor": self.predecessor,
            "successor": self.successor,
            "applied_seq": self.applied_seq,
            "committed_seq": self.committed_seq,
            "acked_seq": self.acked_seq,
            "read_fence": "none"
            if self.read_fence is None
            else ("pending" if self.read_fence == FENCE_PENDING else self.read_fence),
            "sent": len(self.sent),
            "pending": len(self.pending) + len(self.committing or ()),
            "held": len(self._held),
            "frontier": self.frontier(),
            "verified": self.verified,
            # "none" at the tail: no link is expected, so none is down.
            "successor_link": "none"
            if self.successor is None
            else ("up" if self.forward_cursor is not None else "down"),
        }
