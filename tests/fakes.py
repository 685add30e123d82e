"""
Shared test helpers for the replica and node tests: an in-memory store with
the semantics of L{ckv.storage.Store}, request builders, and a hand-driven
chain of L{Replica}s whose links are explicit frame queues.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from construct import Container

from ckv import wire
from ckv.chain.replica import (
    TO_CLIENT,
    TO_ORIGIN,
    TO_PREDECESSOR,
    TO_SUCCESSOR,
    Action,
    Replica,
)
from ckv.config import Chain, Member
from ckv.entry import Entry
from ckv.storage import Batch, Recovered, session_key
from ckv.wire import MessageType, Op

CID_A = b"A" * wire.CLIENT_ID_LEN
CID_B = b"B" * wire.CLIENT_ID_LEN
CID_C = b"C" * wire.CLIENT_ID_LEN


# -- configuration -----------------------------------------------------------


def member(name: str, port: int = 0) -> Member:
    return Member(name, "127.0.0.1", port or 7000 + (sum(name.encode()) % 900))


def make_chain(names: Sequence[str], epoch: int = 1, chain_id: int = 0) -> Chain:
    return Chain(chain_id, epoch, tuple(member(n) for n in names))


# -- requests and frames -----------------------------------------------------


def decode(frame: bytes) -> tuple[int, Container]:
    return wire.decode(frame)


def req(
    op: Op,
    key: bytes,
    value: bytes | None = None,
    *,
    expected: bytes | None = None,
    has_expected: bool = False,
    client_id: bytes = CID_A,
    lane: int = 0,
    request_id: int = 1,
    epoch: int = 0,
) -> Container:
    """A decoded REQUEST body, as the replica receives it from the adapter."""
    frame = wire.request(
        client_id, lane, request_id, op, key, value=value, expected=expected,
        has_expected=has_expected, epoch=epoch,
    )
    mtype, body = wire.decode(frame)
    assert mtype == MessageType.REQUEST
    return body


def put(key: bytes, value: bytes, **kw: Any) -> Container:
    return req(Op.PUT, key, value, **kw)


def delete(key: bytes, **kw: Any) -> Container:
    return req(Op.DELETE, key, **kw)


def cas(key: bytes, expected: bytes | None, new: bytes | None, **kw: Any) -> Container:
    return req(Op.CAS, key, new, expected=expected, has_expected=expected is not None, **kw)


def get(key: bytes, **kw: Any) -> Container:
    return req(Op.GET, key, **kw)


def framed(body: bytes) -> bytes:
    """A frame body with its 32-bit length prefix, as it goes on the wire."""
    return struct.pack(">I", len(body)) + body


def unframe(data: bytes) -> list[tuple[int, Container]]:
    """Split a byte stream into frames and decode each."""
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(wire.decode(data[4 : 4 + n]))
        data = data[4 + n :]
    return out


def reply_of(action: Action) -> tuple[bytes, int, wire.Status, bytes]:
    mtype, body = wire.decode(action.frame)
    assert mtype == MessageType.REPLY, mtype
    return bytes(body.client_id), body.request_id, wire.Status(body.status), bytes(body.value)


# -- the fake store ----------------------------------------------------------


class FakeStore:
    """
    An in-memory store with the commit semantics of L{ckv.storage.Store},
    plus C{history}: every committed entry in order.
    """

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.sessions: dict[bytes, tuple[int, int]] = {}
        self.sent: dict[int, Entry] = {}
        self.history: list[Entry] = []
        self.applied_seq = 0
        self.epoch = 0
        self.chain_id = wire.NO_CHAIN
        self.commits = 0
        self.fail_next = 0

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def session(self, skey: bytes) -> tuple[int, int] | None:
        return self.sessions.get(skey)

    def commit(self, batch: Batch) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected commit failure")
        for e in batch.entries:
            if e.op == Op.PUT:
                self.data[e.key] = e.value
            elif e.op == Op.DELETE:
                self.data.pop(e.key, None)
            if e.client_id != wire.NO_CLIENT:
                self.sessions[session_key(e.client_id, e.lane)] = (e.request_id, e.status)
            if batch.keep_sent:
                self.sent[e.seq] = e
            self.history.append(e)
        if batch.prune_sent_upto:
            for s in [s for s in self.sent if s <= batch.prune_sent_upto]:
                del self.sent[s]
        if batch.entries:
            self.applied_seq = batch.entries[-1].seq
        if batch.epoch is not None:
            self.epoch = batch.epoch
        if batch.chain_id is not None:
            self.chain_id = batch.chain_id
        self.commits += 1

    def recover(self) -> Recovered:
        return Recovered(
            self.applied_seq, self.epoch, self.chain_id, [self.sent[s] for s in sorted(self.sent)]
        )


def commit(replica: Replica, store: Any) -> list[Action] | None:
    """One explicit commit step: take a batch, commit it, report it.  None: nothing to do."""
    batch = replica.take_batch()
    if batch is None:
        return None
    store.commit(batch)
    return replica.batch_committed(batch)


def seqs_of(actions: Iterable[Action]) -> list[int]:
    """The seqs of every entry in the UPDATES frames among C{actions}."""
    out = []
    for a in actions:
        if a.kind == TO_SUCCESSOR:
            mtype, body = wire.decode(a.frame)
            if mtype == MessageType.COMMITTED:
                continue
            assert mtype == MessageType.UPDATES
            out += [e.seq for e in body.entries]
    return out


# -- a hand-driven chain ------------------------------------------------------


class Harness:
    """
    Replicas of one chain with explicit links: C{links[(src, dst)]} is the
    queue of frames in flight from C{src} to C{dst}.  Nothing happens unless
    a test calls a step: L{submit}, L{commit}, L{deliver}, L{drop},
    L{connect}.
    """

    def __init__(self, names: Sequence[str], epoch: int = 1, chain_id: int = 0,
                 stores: dict[str, Any] | None = None) -> None:
        self.names = list(names)
        self.chain = make_chain(names, epoch, chain_id)
        self.stores: dict[str, Any] = stores or {n: FakeStore() for n in names}
        self.replicas: dict[str, Replica] = {}
        for n in names:
            s = self.stores[n]
            rec = s.recover() if hasattr(s, "recover") else None
            self.replicas[n] = Replica(n, s, rec)
        self.links: dict[tuple[str, str], deque[bytes]] = {}
        self.up: set[tuple[str, str]] = set()
        self.replies: list[Action] = []
        self.errors: list[Action] = []
        for n in names:
            self.route(n, self.replicas[n].on_config(self.chain))
        for p, s in self.pairs():
            self.links[(p, s)] = deque()
            self.links[(s, p)] = deque()

    def pairs(self) -> list[tuple[str, str]]:
        names = [m.name for m in self.chain.members]
        return list(zip(names, names[1:], strict=False))

    @property
    def head(self) -> Replica:
        return self.replicas[self.chain.members[0].name]

    @property
    def tail(self) -> Replica:
        return self.replicas[self.chain.members[-1].name]

    def route(self, name: str, actions: list[Action] | None) -> None:
        r = self.replicas[name]
        for a in actions or ():
            if a.kind == TO_SUCCESSOR:
                link = (name, r.successor)
                assert link in self.up, f"{name} sent to its successor on a link that is down"
                self.links[link].append(a.frame)
            elif a.kind == TO_PREDECESSOR:
                link = (name, r.predecessor)
                if link[::-1] in self.up:
                    self.links[link].append(a.frame)
            elif a.kind == TO_CLIENT:
                self.replies.append(a)
            elif a.kind == TO_ORIGIN:
                self.errors.append(a)
            else:  # pragma: no cover
                raise AssertionError(a)

    # -- steps -------------------------------------------------------------

    def submit(self, request: Container, origin: Any = "origin") -> None:
        head = self.chain.members[0].name
        self.route(head, self.replicas[head].on_client_update(request, origin))
        self.forward(head)

    def forward(self, name: str) -> None:
        """What the node sends on at the end of every step (as NodeService.kick)."""
        self.route(name, self.replicas[name].forward())

    def commit(self, name: str) -> bool:
        actions = commit(self.replicas[name], self.stores[name])
        self.route(name, actions)
        self.forward(name)
        return actions is not None

    def connect(self, pred: str, succ: str) -> list[Action]:
        """The hello round trip on a new link; returns the predecessor's resend."""
        p, s = self.replicas[pred], self.replicas[succ]
        self.links[(pred, succ)].clear()
        self.links[(succ, pred)].clear()
        self.up.add((pred, succ))
        mtype, body = wire.decode(s.on_chain_hello(p.chain_id, p.epoch, pred))
        assert mtype == MessageType.CHAIN_HELLO_REPLY
        actions = p.on_successor_ready(body.epoch, body.applied_seq)
        self.route(pred, actions)
        return actions

    def drop(self, pred: str, succ: str) -> None:
        """The TCP connection dies: frames in flight both ways are lost."""
        self.up.discard((pred, succ))
        self.links[(pred, succ)].clear()
        self.links[(succ, pred)].clear()
        self.replicas[pred].on_successor_lost()

    def deliver(self, src: str, dst: str) -> bool:
        q = self.links.get((src, dst))
        if not q:
            return False
        mtype, body = wire.decode(q.popleft())
        r = self.replicas[dst]
        if mtype == MessageType.UPDATES:
            self.route(dst, r.on_updates(body.epoch, list(body.entries)))
        elif mtype == MessageType.ACK:
            self.route(dst, r.on_ack(body.epoch, body.seq))
        elif mtype == MessageType.COMMITTED:
            self.route(dst, r.on_committed(body.epoch, body.seq))
        elif mtype == MessageType.FENCE:
            r.on_fence(body.epoch, body.seq)
        else:  # pragma: no cover
            raise AssertionError(mtype)
        self.forward(dst)
        return True

    def deliver_all(self, src: str, dst: str) -> int:
        """Deliver every frame in flight from C{src} to C{dst}; how many."""
        n = 0
        while self.deliver(src, dst):
            n += 1
        return n

    def connect_all(self) -> None:
        for p, s in self.pairs():
            self.connect(p, s)

    def settle(self) -> None:
        """Commit and deliver until nothing moves."""
        moved = True
        while moved:
            moved = False
            for n in self.names:
                moved |= self.commit(n)
            for link in list(self.links):
                while self.deliver(*link):
                    moved = True

    # -- observations ------------------------------------------------------

    def history(self, name: str) -> list[Entry]:
        """Committed history of a node."""
        return list(self.stores[name].history)

    def accepted(self, name: str) -> list[Entry]:
        """Committed, committing and pending entries of a node, in order."""
        r = self.replicas[name]
        return self.history(name) + list(r.committing or []) + list(r.pending)

    def reply_statuses(self) -> list[tuple[bytes, int, wire.Status]]:
        return [reply_of(a)[:3] for a in self.replies]
