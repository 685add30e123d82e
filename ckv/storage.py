"""
The LMDB store of one replica.

Four named databases in one environment:

  - C{data}: key -> value, the replicated map.
  - C{sessions}: client_id + lane (20 bytes) -> last request id (u64), its
    result status (u8) and when this replica recorded it (u32, Unix
    seconds): what makes retries exactly once.  Sessions idle for longer
    than the node's session TTL are deleted (L{Store.expire_sessions}).
  - C{sent}: seq (u64, big-endian) -> encoded update entry: updates this
    node has applied and forwarded but the tail has not acknowledged yet.
    Durable so that a whole-chain restart loses nothing.
  - C{meta}: applied seq, epoch, chain id.

Every batch of updates is applied in one write transaction (group commit),
together with its sessions, its sent entries and the new applied seq, so a
crash leaves the store at a batch boundary.

Reads run inline on the reactor thread (a read transaction plus a get is
well under a microsecond); write transactions run wherever L{Store.commit}
is called: a single dedicated thread in C{durable} mode, so the reactor keeps
working during the fsync, and the reactor thread itself in C{replicated}
mode, where a commit takes microseconds (LMDB requires a write transaction
to stay on the thread that began it).
"""

from __future__ import annotations

import hashlib
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import lmdb
from twisted.logger import Logger

from ckv import wire
from ckv.entry import Entry

SYNC_MODES = ("durable", "replicated")

_U64 = struct.Struct(">Q")
_SESSION = struct.Struct(">QBI")
#: A session recorded before sessions had a time (request id, status).
_LEGACY_SESSION = struct.Struct(">QB")

_APPLIED = b"applied_seq"
_EPOCH = b"epoch"
_CHAIN = b"chain_id"

#: Initial map size.  On 64-bit systems a large map costs nothing until used.
DEFAULT_MAP_SIZE = 1 << 30


def session_key(client_id: bytes, lane: int) -> bytes:
    """The key of a client session: client id followed by the lane (u32)."""
    return client_id + lane.to_bytes(4, "big")


@dataclass
class Batch:
    """What one write transaction does."""

    entries: list[Entry] = field(default_factory=list)
    #: Record the entries in the sent list (every member but the tail).
    keep_sent: bool = True
    #: Remove sent entries with seq <= this (acknowledged by the tail).
    prune_sent_upto: int = 0
    #: New epoch and chain id to record, if any.
    epoch: int | None = None
    chain_id: int | None = None

    @property
    def last_seq(self) -> int | None:
        return self.entries[-1].seq if self.entries else None


@dataclass
class Recovered:
    """What a replica reads back from its store when it starts."""

    applied_seq: int = 0
    epoch: int = 0
    chain_id: int = wire.NO_CHAIN
    sent: list[Entry] = field(default_factory=list)


class Store:
    """
    One replica's LMDB environment.

    @param path: directory of the environment (created if missing).
    @param sync: C{"durable"} (fsync at every commit, the default) or
        C{"replicated"} (no fsync per commit; call L{sync} periodically;
        a power loss of the machine may lose the last commits, which the
        chain's other replicas still hold).
    """

    log = Logger()

    def __init__(
        self,
        path: str,
        sync: str = "durable",
        map_size: int = DEFAULT_MAP_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """
        @param clock: wall-clock seconds, stamped on the sessions a commit
            records (their age decides when they expire).
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"unknown sync mode {sync!r}; expected one of {', '.join(SYNC_MODES)}")
        self.path = path
        self.sync_mode = sync
        self.map_size = map_size
        self.env: lmdb.Environment | None = None
        self.commits = 0
        self.committed_entries = 0
        self.commit_seconds = 0.0
        self.commit_max_seconds = 0.0
        self.clock = clock
        self.sessions_expired = 0

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        os.makedirs(self.path, exist_ok=True)
        self.env = lmdb.open(
            self.path,
            map_size=self.map_size,
            max_dbs=8,
            sync=self.sync_mode == "durable",
            metasync=self.sync_mode == "durable",
            # A node holds one environment; readers are the reactor thread
            # and the thread of an admin digest.
            max_readers=64,
        )
        self.map_size = self.env.info()["map_size"]
        self._data = self.env.open_db(b"data")
        self._sessions = self.env.open_db(b"sessions")
        self._sent = self.env.open_db(b"sent")
        self._meta = self.env.open_db(b"meta")

    def close(self) -> None:
        if self.env is not None:
            if self.sync_mode != "durable":
                self.env.sync(True)
            self.env.close()
            self.env = None

    def _env(self) -> lmdb.Environment:
        if self.env is None:
            raise RuntimeError("store is not open")
        return self.env

    # -- reads -------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        with self._env().begin(db=self._data, buffers=False) as txn:
            return txn.get(key)

    def session(self, skey: bytes) -> tuple[int, int] | None:
        """The last (request id, status) recorded for a session, if any."""
        with self._env().begin(db=self._sessions) as txn:
            raw = txn.get(skey)
        if raw is None:
            return None
        return _LEGACY_SESSION.unpack_from(raw)  # type: ignore[return-value]

    def recover(self) -> Recovered:
        """Read back the replica's durable state."""
        env = self._env()
        with env.begin() as txn:
            return Recovered(
                applied_seq=self._meta_u64(txn, _APPLIED),
                epoch=self._meta_u64(txn, _EPOCH),
                chain_id=self._meta_u64(txn, _CHAIN, wire.NO_CHAIN),
                sent=[Entry.decode(v) for _, v in txn.cursor(db=self._sent)],
            )

    def _meta_u64(self, txn: lmdb.Transaction, key: bytes, default: int = 0) -> int:
        """A number of the meta database (applied seq, epoch, chain id), read in C{txn}."""
        raw = txn.get(key, db=self._meta)
        return _U64.unpack(raw)[0] if raw else default

    def stats(self) -> dict[str, int]:
        env = self._env()
        with env.begin() as txn:
            keys = txn.stat(self._data)["entries"]
            sessions = txn.stat(self._sessions)["entries"]
            sent = txn.stat(self._sent)["entries"]
        info = env.info()
        return {
            "keys": keys,
            "sessions": sessions,
            "sent_on_disk": sent,
            "map_size": info["map_size"],
            "used_bytes": (info["last_pgno"] + 1) * env.stat()["psize"],
            "commits": self.commits,
            "committed_entries": self.committed_entries,
            "commit_ms_avg": round(1000 * self.commit_seconds / max(1, self.commits), 3),
            "commit_ms_max": round(1000 * self.commit_max_seconds, 3),
            "sessions_expired": self.sessions_expired,
        }

    # -- state transfer ----------------------------------------------------

    def snapshot(self, chunk_bytes: int) -> tuple[int, Iterator[list[tuple[int, bytes, bytes]]]]:
        """
        A consistent snapshot for a joining node: the applied seq it is at,
        and an iterator of chunks of (database, key, value) items (data
        first, then sessions), each about C{chunk_bytes}.  One read
        transaction is held until the iterator is exhausted or closed, so the
        snapshot does not move while writes go on.
        """
        env = self._env()
        txn = env.begin(buffers=False)
        seq = self._meta_u64(txn, _APPLIED)

        def chunks() -> Iterator[list[tuple[int, bytes, bytes]]]:
            try:
                batch: list[tuple[int, bytes, bytes]] = []
                size = 0
                for code, db in ((wire.SNAPSHOT_DB_DATA, self._data),
                                 (wire.SNAPSHOT_DB_SESSIONS, self._sessions)):  # fmt: skip
                    for k, v in txn.cursor(db=db):
                        batch.append((code, k, v))
                        size += len(k) + len(v) + 8
                        if size >= chunk_bytes:
                            yield batch
                            batch, size = [], 0
                if batch:
                    yield batch
            finally:
                txn.abort()

        return seq, chunks()

    def wipe(self) -> None:
        """Forget everything (a joining node, before its state transfer)."""
        with self._env().begin(write=True) as txn:
            for db in (self._data, self._sessions, self._sent, self._meta):
                txn.drop(db, delete=False)

    def put_snapshot_items(self, items: Iterable[tuple[int, bytes, bytes]]) -> None:
        dbs = {wire.SNAPSHOT_DB_DATA: self._data, wire.SNAPSHOT_DB_SESSIONS: self._sessions}
        with self._env().begin(write=True) as txn:
            for code, k, v in items:
                txn.put(k, v, db=dbs[code])

    def finish_snapshot(self, seq: int, epoch: int, chain_id: int) -> None:
        """The snapshot is complete: this store is the source's state at C{seq}."""
        with self._env().begin(write=True) as txn:
            txn.put(_APPLIED, _U64.pack(seq), db=self._meta)
            txn.put(_EPOCH, _U64.pack(epoch), db=self._meta)
            txn.put(_CHAIN, _U64.pack(chain_id), db=self._meta)
        if self.sync_mode != "durable":
            self._env().sync(True)

    def digest(self) -> tuple[int, str, int]:
        """
        Number of keys, a SHA-256 over every key and value in key order, and
        the last applied seq, all from one read snapshot.  Any thread may
        call it (it opens its own read transaction).
        """
        h = hashlib.sha256()
        n = 0
        with self._env().begin(db=self._data) as txn:
            applied = self._meta_u64(txn, _APPLIED)
            for k, v in txn.cursor():
                h.update(len(k).to_bytes(4, "big") + k + len(v).to_bytes(4, "big") + v)
                n += 1
        return n, h.hexdigest(), applied

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        """Every key and value (a snapshot; for tests and small tools)."""
        with self._env().begin(db=self._data) as txn:
            return list(txn.cursor())

    # -- writes ------------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """
        Apply a batch in one write transaction.

        @raise lmdb.MapFullError: the map is full; call L{grow} (with no
            transaction open in this process) and commit the batch again.
        """
        env = self._env()
        data, sessions, sent = self._data, self._sessions, self._sent
        now = int(self.clock()) & 0xFFFFFFFF
        started = time.perf_counter()
        with env.begin(write=True) as txn:
            for e in batch.entries:
                if e.op == wire.Op.PUT:
                    txn.put(e.key, e.value, db=data)
                elif e.op == wire.Op.DELETE:
                    txn.delete(e.key, db=data)
                if e.client_id != wire.NO_CLIENT:
                    txn.put(
                        session_key(e.client_id, e.lane),
                        _SESSION.pack(e.request_id, e.status, now),
                        db=sessions,
                    )
                if batch.keep_sent:
                    txn.put(_U64.pack(e.seq), e.encode(), db=sent)
            if batch.prune_sent_upto:
                self._prune(txn, batch.prune_sent_upto)
            if batch.entries:
                txn.put(_APPLIED, _U64.pack(batch.entries[-1].seq), db=self._meta)
            if batch.epoch is not None:
                txn.put(_EPOCH, _U64.pack(batch.epoch), db=self._meta)
            if batch.chain_id is not None:
                txn.put(_CHAIN, _U64.pack(batch.chain_id), db=self._meta)
        elapsed = time.perf_counter() - started
        self.commits += 1
        self.committed_entries += len(batch.entries)
        self.commit_seconds += elapsed
        self.commit_max_seconds = max(self.commit_max_seconds, elapsed)

    def expire_sessions(
        self, ttl: float, start: bytes = b"", limit: int = 10_000
    ) -> tuple[int, bytes | None]:
        """
        Delete the sessions recorded more than C{ttl} seconds ago, looking
        at no more than C{limit} of them from key C{start} on, in one write
        transaction (so call it where commits run).  A session recorded
        before sessions had a time is given the current time instead (it
        expires C{ttl} from now).

        A client retries a request only until its own timeout, so a
        session idle for far longer than any client timeout is never
        needed again; keeping it would let the table grow by one record
        per client that ever connected.

        @return: how many were deleted, and the key to start the next call
            from (None once the whole table was looked at).
        """
        now = int(self.clock())
        cutoff = now - ttl
        deleted = 0
        seen = 0
        with self._env().begin(write=True, db=self._sessions) as txn:
            cursor = txn.cursor()
            found = cursor.set_range(start) if start else cursor.first()
            while found:
                if seen >= limit:
                    next_key: bytes | None = cursor.key()
                    break
                seen += 1
                raw = cursor.value()
                if len(raw) == _LEGACY_SESSION.size:
                    rid, status = _LEGACY_SESSION.unpack(raw)
                    cursor.put(cursor.key(), _SESSION.pack(rid, status, now & 0xFFFFFFFF))
                    found = cursor.next()
                elif len(raw) == _SESSION.size and _SESSION.unpack(raw)[2] < cutoff:
                    # delete() moves to the next record; after the last one
                    # the cursor is unpositioned and its key is empty.
                    cursor.delete()
                    deleted += 1
                    found = bool(cursor.key())
                else:
                    found = cursor.next()
            else:
                next_key = None
        self.sessions_expired += deleted
        return deleted, next_key

    def _prune(self, txn: lmdb.Transaction, upto: int) -> None:
        cursor = txn.cursor(db=self._sent)
        limit = _U64.pack(upto)
        if not cursor.first():
            return
        while cursor.key() <= limit:
            if not cursor.delete():
                break

    def grow(self) -> None:
        """Double the map size.  No transaction may be open in this process."""
        env = self._env()
        new = env.info()["map_size"] * 2
        env.set_mapsize(new)
        self.map_size = new
        self.log.info("LMDB map grown to {size} bytes", size=new)

    def sync(self) -> None:
        """Flush to disk (the periodic flush of the C{replicated} mode)."""
        self._env().sync(True)
