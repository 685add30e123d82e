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

Every batch of updates is one commit (group commit), together with its
sessions, its sent entries and the new applied seq, so a crash leaves the
store at a batch boundary.  In C{replicated} mode a commit is one LMDB write
transaction.

In C{durable} mode a batch is appended to a write-ahead log (L{ckv.wal})
and synced there: that is the moment it is durable.  It also goes into an
in-memory layer (L{_Logged}: the batches, and the data and sessions they
leave) that reads consult before LMDB.  A I{checkpoint} puts the layer into
LMDB: once a commit finds L{CHECKPOINT_ENTRIES} entries or
L{CHECKPOINT_BYTES} bytes logged, it freezes the layer and a thread writes
its end state in one fsynced LMDB transaction, with the last LSN it holds
(C{wal_lsn} in C{meta}), while new batches log to the other of two files.
Opening the store applies the records after that LSN.  One synced append
instead of one LMDB commit per batch: LMDB writes every page a batch
touched, at random places, and syncs twice, which costs three to four times
as much disk time and CPU (see L{ckv.wal}).

Reads run inline on the reactor thread (a read transaction plus a get is
well under a microsecond).  Commits run wherever L{Store.commit} is called:
a single dedicated thread in C{durable} mode, so the reactor keeps working
during the sync, and the reactor thread itself in C{replicated} mode, where
a commit takes microseconds.  In C{durable} mode LMDB write transactions run
on the checkpoint thread, or where commits run when something needs LMDB
complete (LMDB requires a write transaction to stay on the thread that
began it).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import lmdb
from twisted.logger import Logger

from ckv import wire
from ckv.dirlock import lock_directory, unlock_directory
from ckv.entry import Entry
from ckv.wal import LogFailed, WriteAheadLog

SYNC_MODES = ("durable", "replicated")

_U64 = struct.Struct(">Q")
_SESSION = struct.Struct(">QBI")
#: A session recorded before sessions had a time (request id, status).
_LEGACY_SESSION = struct.Struct(">QB")

_APPLIED = b"applied_seq"
_EPOCH = b"epoch"
_CHAIN = b"chain_id"
_WAL_LSN = b"wal_lsn"
#: Random, made with the environment: the salt of its log's records.
_STORE_ID = b"store_id"

#: A commit that finds this many logged entries not yet in LMDB checkpoints
#: them first.  Random keys dirty about one LMDB page each, so the first
#: thousands of entries cost nearly the whole write of a small store: few
#: large checkpoints cost less than many small ones.  And each checkpoint
#: ends with an fsync of every page it wrote, which delays the log syncs of
#: every replica sharing the disk for tens of milliseconds: 65,536 rather
#: than 16,384 took the write p99 from 15.1 to 13.5 ms (median of 5 paired
#: 30 s runs, doc/operations.md).  Bounds the memory of the overlay (two
#: layers: about 20 MB more RSS than 16,384) and the work of a recovery
#: (0.6 s to replay a full layer).
CHECKPOINT_ENTRIES = 65536
#: The same bound in bytes of log (large values).
CHECKPOINT_BYTES = 16 << 20
#: While a checkpoint runs, the next layer may grow to this many times the
#: bounds above; then commits wait for the checkpoint.  It never comes to
#: that unless the disk is far too slow for the write rate, and it bounds
#: what memory holds and a crash replays to two layers of twice the bounds.
FAR_BEHIND = 2

_WAL_FILES = ("wal.0", "wal.1")
#: Log record payload: flags, prune_sent_upto, epoch, chain_id, session time, entry count.
_RECORD = struct.Struct(">BQQQII")
_U32 = struct.Struct(">I")
_KEEP_SENT, _HAS_EPOCH, _HAS_CHAIN = 1, 2, 4

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


class _LoggedBatch(NamedTuple):
    """
    What a checkpoint needs of a logged batch, not the batch itself: its
    entries as plain tuples of numbers and bytes, which the garbage
    collector stops tracking.  One tracked object per batch instead of
    about one per entry: with 65,000 entries logged, every full collection
    walked 78,000 more objects (60-70 ms here instead of 11-12 ms).
    """

    #: The session time it was logged with.
    now: int
    #: (seq, encoded entry) of the entries it adds to the sent list.
    sent: tuple[tuple[int, bytes], ...]
    #: Its last entry's seq (0: it has none).
    last_seq: int
    prune_sent_upto: int
    epoch: int | None
    chain_id: int | None


@dataclass(eq=False)
class _Logged:
    """
    Batches and what they do to the data and the sessions: in C{durable}
    mode those in one log file and not in LMDB yet (reads look here first);
    in C{replicated} mode the one batch being committed.
    """

    #: The log file they are in (None: not logged).
    wal: WriteAheadLog | None = None
    #: The batches, in order.
    batches: list[_LoggedBatch] = field(default_factory=list)
    #: key -> value, or None: deleted.
    data: dict[bytes, bytes | None] = field(default_factory=dict)
    sessions: dict[bytes, bytes] = field(default_factory=dict)
    entries: int = 0
    bytes: int = 0
    last_lsn: int = 0

    def add(self, batch: Batch, now: int) -> None:
        """One more batch, its sessions stamped C{now}."""
        data, sessions = self.data, self.sessions
        for e in batch.entries:
            if e.op == wire.Op.PUT:
                data[e.key] = e.value
            elif e.op == wire.Op.DELETE:
                data[e.key] = None
            if e.client_id != wire.NO_CLIENT:
                sessions[session_key(e.client_id, e.lane)] = _SESSION.pack(
                    e.request_id, e.status, now
                )
        entries = batch.entries
        self.batches.append(
            _LoggedBatch(
                now,
                tuple((e.seq, e.encode()) for e in entries) if batch.keep_sent else (),
                entries[-1].seq if entries else 0,
                batch.prune_sent_upto,
                batch.epoch,
                batch.chain_id,
            )
        )
        self.entries += len(entries)


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
        checkpoint_entries: int = CHECKPOINT_ENTRIES,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
    ) -> None:
        """
        @param clock: wall-clock seconds, stamped on the sessions a commit
            records (their age decides when they expire).
        @param checkpoint_entries: in C{durable} mode, checkpoint when this
            many logged entries are not in LMDB yet (see the module doc).
        @param checkpoint_bytes: or when the log holds this many bytes.
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
        self.checkpoint_entries = max(1, checkpoint_entries)
        self.checkpoint_bytes = max(1, checkpoint_bytes)
        #: The two log files (durable mode), in turns: one takes new
        #: batches while a checkpoint writes the other's to LMDB.
        self._wals: list[WriteAheadLog] = []
        #: Logged batches not in LMDB: those being logged now, and those a
        #: checkpoint is writing (or failed to write).
        self._active: _Logged | None = None
        self._frozen: _Logged | None = None
        self._checkpointer: threading.Thread | None = None
        self._store_id = b""
        self._log_failed: LogFailed | None = None
        self._checkpoint_error: BaseException | None = None
        #: Last LSN logged, and last applied seq (logged or in LMDB).
        self._lsn = 0
        self._applied = 0
        #: Held while the logged batches change hands or take a batch, and
        #: by whoever reads a consistent view of them and LMDB (snapshot,
        #: digest, stats).
        self._view_lock = threading.Lock()
        self.checkpoints = 0
        self.checkpoint_seconds = 0.0
        self.checkpoint_max_seconds = 0.0
        self._lock_fd: int | None = None

    # -- lifecycle ---------------------------------------------------------

    def open(self) -> None:
        """
        Open (or create) the store, and replay its log.

        @raise DirectoryInUse: another process has this directory open
            (L{ckv.dirlock}).
        """
        os.makedirs(self.path, exist_ok=True)
        self._lock_fd = lock_directory(self.path)
        try:
            self._open()
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        """
        Close the log files and the environment, then let the directory
        go (last: another process may take it as soon as it is free).
        """
        self._join_checkpointer()
        for w in self._wals:
            w.close()
        self._wals, self._active, self._frozen = [], None, None
        if self.env is not None:
            self.env.close()
            self.env = None
        self._unlock()

    def _unlock(self) -> None:
        unlock_directory(self._lock_fd)
        self._lock_fd = None

    def _open(self) -> None:
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
        with self.env.begin(write=True) as txn:
            self._applied = self._meta_u64(txn, _APPLIED)
            self._lsn = self._meta_u64(txn, _WAL_LSN)
            self._store_id = txn.get(_STORE_ID, db=self._meta)
            if self._store_id is None:
                self._store_id = os.urandom(16)
                txn.put(_STORE_ID, self._store_id, db=self._meta)
        paths = [os.path.join(self.path, name) for name in _WAL_FILES]
        if self.sync_mode == "durable" or any(os.path.exists(p) for p in paths):
            self._wals = [WriteAheadLog(p, salt=self._store_id) for p in paths]
            for w in self._wals:
                w.open()
            self._replay()
            if self.sync_mode != "durable":
                # Last run was durable: its log is in LMDB now.  Make that
                # durable before the log goes (this mode's commits do not
                # sync), so a later durable run starts from a clean log.
                self.env.sync(True)
                for w in self._wals:
                    w.close()
                    os.remove(w.path)
                self._wals = []
                self._active = None

    def _replay(self) -> None:
        """
        Apply the batches logged after the last checkpoint (after a crash).
        They continue from one file into the other at most once: the one a
        checkpoint was writing when the process stopped, then the newer.
        """
        self._active = _Logged(self._wals[0])
        progress = True
        while progress:
            progress = False
            for w in self._wals:
                for lsn, payload in w.records(self._lsn):
                    batch, now = _decode_record(payload)
                    self._lsn = lsn
                    self._remember(batch, now, len(payload))
                    progress = True
        n = len(self._active.batches)
        if n:
            self._checkpoint(grow_if_full=True)
            self.log.info(
                "replayed {n} logged batches into the store, up to seq {seq}",
                n=n,
                seq=self._applied,
            )
        self._active = _Logged(self._wals[0])
        self._wals[0].rewind()

    def close(self) -> None:
        if self.env is None:
            return
        try:
            if self._wals:
                # A clean stop leaves nothing to replay (if the checkpoint
                # fails, the log still holds everything: the next open
                # replays it).
                self._checkpoint(grow_if_full=True)
            else:
                self.env.sync(True)
        finally:
            self._release()

    def _env(self) -> lmdb.Environment:
        if self.env is None:
            raise RuntimeError("store is not open")
        return self.env

    # -- reads -------------------------------------------------------------

    def get(self, key: bytes) -> bytes | None:
        # The batches being logged, then those being checkpointed, then
        # LMDB, in this order: a checkpoint hands the first to the second
        # before it begins, and drops the second only once LMDB holds it.
        active = self._active
        if active is not None:
            if key in active.data:
                return active.data[key]
            frozen = self._frozen
            if frozen is not None and key in frozen.data:
                return frozen.data[key]
        with self._env().begin(db=self._data, buffers=False) as txn:
            return txn.get(key)

    def session(self, skey: bytes) -> tuple[int, int] | None:
        """The last (request id, status) recorded for a session, if any."""
        raw = None
        active = self._active
        if active is not None:
            raw = active.sessions.get(skey)
            frozen = self._frozen
            if raw is None and frozen is not None:
                raw = frozen.sessions.get(skey)
        if raw is None:
            with self._env().begin(db=self._sessions) as txn:
                raw = txn.get(skey)
        if raw is None:
            return None
        return _LEGACY_SESSION.unpack_from(raw)  # type: ignore[return-value]

    def recover(self) -> Recovered:
        """
        Read back the replica's durable state.  Checkpoints first, so call
        it where commits run, or with none in progress (a node calls it
        after L{open}, which applies the log, and after a state transfer).
        """
        self._checkpoint()
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

    def _view(
        self,
    ) -> tuple[
        lmdb.Transaction,
        int,
        dict[bytes, bytes | None],
        dict[bytes, bytes],
        list[_LoggedBatch],
    ]:
        """
        A read transaction, the overlay and the logged batches of one
        moment, and the applied seq of that moment.  The caller aborts the
        transaction.
        """
        with self._view_lock:
            txn = self._env().begin(buffers=False)
            layers = self._layers()
            data: dict[bytes, bytes | None] = {}
            sessions: dict[bytes, bytes] = {}
            pending: list[_LoggedBatch] = []
            for layer in layers:  # the newer on top
                data.update(layer.data)
                sessions.update(layer.sessions)
                pending.extend(layer.batches)
            applied = self._applied if pending else self._meta_u64(txn, _APPLIED)
            return txn, applied, data, sessions, pending

    def stats(self) -> dict[str, int]:
        env = self._env()
        txn, _, overlay, sessions_overlay, pending = self._view()
        try:
            keys = txn.stat(self._data)["entries"]
            for k, v in overlay.items():
                keys += (v is not None) - (txn.get(k, db=self._data) is not None)
            sessions = txn.stat(self._sessions)["entries"]
            sessions += sum(txn.get(k, db=self._sessions) is None for k in sessions_overlay)
            # What the sent list holds once the logged batches are applied
            # (LMDB may hold some of them already: a checkpoint that ended).
            sent = len(_sent_after(pending, _sent_seqs(txn, self._sent)))
        finally:
            txn.abort()
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
            "wal_bytes": sum(x.bytes for x in self._layers()),
            "wal_entries": sum(x.entries for x in self._layers()),
            "checkpoints": self.checkpoints,
            "checkpoint_ms_avg": round(
                1000 * self.checkpoint_seconds / max(1, self.checkpoints), 3
            ),
            "checkpoint_ms_max": round(1000 * self.checkpoint_max_seconds, 3),
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
        txn, seq, overlay, sessions_overlay, _ = self._view()

        def chunks() -> Iterator[list[tuple[int, bytes, bytes]]]:
            try:
                batch: list[tuple[int, bytes, bytes]] = []
                size = 0
                parts = (
                    (wire.SNAPSHOT_DB_DATA, self._data, overlay),
                    (wire.SNAPSHOT_DB_SESSIONS, self._sessions, sessions_overlay),
                )
                for code, db, over in parts:
                    for k, v in _merged(txn.cursor(db=db), over):
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
        self._join_checkpointer()
        self._checkpoint_error = None
        with self._env().begin(write=True) as txn:
            for db in (self._data, self._sessions, self._sent, self._meta):
                txn.drop(db, delete=False)
            # Nothing logged so far may be applied to what comes next, nor
            # a record of the next LSN that a failed append may have left.
            self._lsn += 1
            txn.put(_WAL_LSN, _U64.pack(self._lsn), db=self._meta)
            txn.put(_STORE_ID, self._store_id, db=self._meta)
        with self._view_lock:
            self._frozen = None
            if self._active is not None:
                self._active = _Logged(self._active.wal)
                self._active.wal.rewind()
            self._applied = 0

    def put_snapshot_items(self, items: Iterable[tuple[int, bytes, bytes]]) -> None:
        dbs = {wire.SNAPSHOT_DB_DATA: self._data, wire.SNAPSHOT_DB_SESSIONS: self._sessions}
        self._checkpoint()  # nothing is logged during a transfer; this keeps the order if it were
        with self._env().begin(write=True) as txn:
            for code, k, v in items:
                txn.put(k, v, db=dbs[code])

    def finish_snapshot(self, seq: int, epoch: int, chain_id: int) -> None:
        """The snapshot is complete: this store is the source's state at C{seq}."""
        self._checkpoint()
        with self._env().begin(write=True) as txn:
            txn.put(_APPLIED, _U64.pack(seq), db=self._meta)
            txn.put(_EPOCH, _U64.pack(epoch), db=self._meta)
            txn.put(_CHAIN, _U64.pack(chain_id), db=self._meta)
        self._applied = seq
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
        txn, applied, overlay, _, _ = self._view()
        try:
            for k, v in _merged(txn.cursor(db=self._data), overlay, ordered=True):
                h.update(len(k).to_bytes(4, "big") + k + len(v).to_bytes(4, "big") + v)
                n += 1
        finally:
            txn.abort()
        return n, h.hexdigest(), applied

    def items(self) -> Iterable[tuple[bytes, bytes]]:
        """Every key and value in key order (a snapshot; for tests and small tools)."""
        txn, _, overlay, _, _ = self._view()
        try:
            return list(_merged(txn.cursor(db=self._data), overlay, ordered=True))
        finally:
            txn.abort()

    # -- writes ------------------------------------------------------------

    def commit(self, batch: Batch) -> None:
        """
        Make a batch durable (C{durable}: in the log; C{replicated}: in one
        LMDB write transaction, flushed by L{sync}).  Reads see it once this
        returns.

        @raise lmdb.MapFullError: the map is full; call L{grow} (with no
            transaction open in this process) and commit the batch again.
            Nothing of the batch was logged or applied.
        """
        env = self._env()
        now = int(self.clock()) & 0xFFFFFFFF
        started = time.perf_counter()
        active = self._active
        if active is None:
            one = _Logged()
            one.add(batch, now)
            with env.begin(write=True) as txn:
                self._write_layer(txn, one)
        else:
            if self._log_failed is not None:
                raise self._log_failed
            self._background_checkpoint()
            active = self._active
            payload = _encode_record(batch, now)
            assert active.wal is not None
            try:
                size = active.wal.append(self._lsn + 1, payload)
            except LogFailed as e:
                # Never log again (in either file): that record may be on
                # the disk, and another with its LSN would shadow it.
                self._log_failed = e
                raise
            self._lsn += 1
            self._remember(batch, now, size)
        elapsed = time.perf_counter() - started
        self.commits += 1
        self.committed_entries += len(batch.entries)
        self.commit_seconds += elapsed
        self.commit_max_seconds = max(self.commit_max_seconds, elapsed)

    def _remember(self, batch: Batch, now: int, size: int) -> None:
        """A logged batch: into the active layer (for reads and the next checkpoint)."""
        active = self._active
        assert active is not None
        with self._view_lock:
            active.add(batch, now)
            if batch.entries:
                self._applied = batch.entries[-1].seq
            active.last_lsn = self._lsn
        active.bytes += size

    def _background_checkpoint(self) -> None:
        """
        Before a commit: start a checkpoint on its own thread if one is due
        and none is running, so commits go on meanwhile.  Raises what the
        last one failed with (once), so the caller can grow the map.
        """
        running = self._checkpointer
        if running is not None:
            if running.is_alive():
                active = self._active
                assert active is not None
                if (
                    active.entries < FAR_BEHIND * self.checkpoint_entries
                    and active.bytes < FAR_BEHIND * self.checkpoint_bytes
                ):
                    return
                running.join()  # far behind: wait rather than grow without bound
            self._checkpointer = None
        if self._checkpoint_error is not None:
            error, self._checkpoint_error = self._checkpoint_error, None
            raise error  # what it was writing stays frozen, and is retried next time
        if self._frozen is None:
            active = self._active
            assert active is not None
            if active.entries < self.checkpoint_entries and active.bytes < self.checkpoint_bytes:
                return
            self._freeze()
        frozen = self._frozen
        assert frozen is not None

        def write() -> None:
            try:
                self._write_checkpoint(frozen)
            except BaseException as e:
                self._checkpoint_error = e

        self._checkpointer = threading.Thread(target=write, name=f"ckv-checkpoint {self.path}")
        self._checkpointer.start()

    def _freeze(self) -> None:
        """Hand the active layer to a checkpoint; log to the other file from now on."""
        active = self._active
        assert active is not None and self._frozen is None
        other = self._wals[1] if active.wal is self._wals[0] else self._wals[0]
        other.rewind()
        with self._view_lock:
            self._frozen = active
            self._active = _Logged(other)

    @property
    def checkpointing(self) -> bool:
        """A checkpoint is being written on its own thread (holding LMDB's write lock)."""
        running = self._checkpointer
        return running is not None and running.is_alive()

    def _join_checkpointer(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.join()
            self._checkpointer = None

    def checkpoint(self) -> None:
        """Put every logged batch into LMDB now (where commits run)."""
        self._checkpoint()

    def _layers(self) -> list[_Logged]:
        """The layers of logged batches not in LMDB yet, the older first."""
        return [x for x in (self._frozen, self._active) if x is not None]

    def _oldest_logged(self) -> int | None:
        """The session time of the oldest batch not in LMDB yet (None: none)."""
        times = [x.batches[0].now for x in self._layers() if x.batches]
        return min(times) if times else None

    def _checkpoint(self, grow_if_full: bool = False) -> None:
        """
        Put every logged batch into LMDB before returning (waiting for a
        checkpoint in progress).  A no-op in C{replicated} mode.

        @raise lmdb.MapFullError: unless C{grow_if_full} (only with no other
            transaction open: at open and close); what was not written
            stays logged and readable.
        """
        if self._active is None:
            return
        self._join_checkpointer()
        self._checkpoint_error = None
        if self._frozen is None:
            if not self._active.batches:
                return
            self._freeze()
        assert self._frozen is not None
        while True:
            try:
                self._write_checkpoint(self._frozen)
                break
            except lmdb.MapFullError:
                if not grow_if_full:
                    raise
                self.grow()
        if self._active.batches:
            self._checkpoint(grow_if_full)

    def _write_checkpoint(self, logged: _Logged) -> None:
        """
        One fsynced LMDB transaction with what C{logged} did, and its last
        LSN; then reads no longer need it.  Runs on the checkpoint thread, or
        where commits run with none in progress.
        """
        started = time.perf_counter()
        with self._env().begin(write=True) as txn:
            self._write_layer(txn, logged)
        with self._view_lock:
            if self._frozen is logged:
                self._frozen = None
        elapsed = time.perf_counter() - started
        self.checkpoints += 1
        self.checkpoint_seconds += elapsed
        self.checkpoint_max_seconds = max(self.checkpoint_max_seconds, elapsed)

    def _write_layer(self, txn: lmdb.Transaction, layer: _Logged) -> None:
        """
        What the batches of C{layer} did, in C{txn}: their end state (a key
        written a hundred times is put once), the sent list, the meta, and
        the last LSN if they were logged.
        """
        for k, v in layer.data.items():
            if v is None:
                txn.delete(k, db=self._data)
            else:
                txn.put(k, v, db=self._data)
        for k, v in layer.sessions.items():
            txn.put(k, v, db=self._sessions)
        # The sent list: LMDB's entries are older than the batches', so the
        # highest prune covers all of LMDB's that any prune does; of the
        # batches' entries, those that no prune at or after them removed.
        pruned = max((b.prune_sent_upto for b in layer.batches), default=0)
        if pruned:
            self._prune(txn, pruned)
        kept = _sent_after(layer.batches, ())
        for b in layer.batches:
            for seq, raw in b.sent:
                if seq in kept:
                    txn.put(_U64.pack(seq), raw, db=self._sent)
        meta = {_WAL_LSN: layer.last_lsn} if layer.wal is not None else {}
        for b in layer.batches:
            if b.last_seq:
                meta[_APPLIED] = b.last_seq
            if b.epoch is not None:
                meta[_EPOCH] = b.epoch
            if b.chain_id is not None:
                meta[_CHAIN] = b.chain_id
        for k, n in meta.items():
            txn.put(k, _U64.pack(n), db=self._meta)

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
        if not start:
            oldest = self._oldest_logged()
            if oldest is not None and oldest < cutoff:
                # A pass starts: sessions still in the log that may have
                # expired go to LMDB first, where it looks.  Only then: a
                # checkpoint here holds up every commit meanwhile.
                self._checkpoint()
        # A session the log holds is newer than LMDB's record of it (the
        # next checkpoint overwrites that): not expired, whatever LMDB says.
        logged = [x.sessions for x in self._layers()]
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
                elif (
                    len(raw) == _SESSION.size
                    and _SESSION.unpack(raw)[2] < cutoff
                    and not any(cursor.key() in x for x in logged)
                ):
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
        """
        Double the map size.  No transaction may be open in this process:
        the caller sees to its readers; a checkpoint in progress is waited for.
        """
        self._join_checkpointer()
        env = self._env()
        new = env.info()["map_size"] * 2
        env.set_mapsize(new)
        self.map_size = new
        self.log.info("LMDB map grown to {size} bytes", size=new)

    def sync(self) -> None:
        """Flush to disk (the periodic flush of the C{replicated} mode)."""
        self._env().sync(True)


def _merged(
    cursor: Iterable[tuple[bytes, bytes]], overlay: dict[bytes, bytes | None], ordered: bool = False
) -> Iterator[tuple[bytes, bytes]]:
    """LMDB's items, the overlay's on top (deleted keys left out); in key order if C{ordered}."""
    below = ((k, v) for k, v in cursor if k not in overlay)
    above = [(k, v) for k, v in overlay.items() if v is not None]
    if ordered:
        above.sort()
        yield from heapq.merge(below, above, key=lambda kv: kv[0])
    else:
        yield from below
        yield from above


def _encode_record(batch: Batch, now: int) -> bytes:
    """A batch as a log record's payload (the entries as in the sent list)."""
    flags = (
        (_KEEP_SENT if batch.keep_sent else 0)
        | (_HAS_EPOCH if batch.epoch is not None else 0)
        | (_HAS_CHAIN if batch.chain_id is not None else 0)
    )
    parts = [
        _RECORD.pack(
            flags,
            batch.prune_sent_upto,
            batch.epoch or 0,
            batch.chain_id or 0,
            now,
            len(batch.entries),
        )
    ]
    for e in batch.entries:
        if e.op != wire.Op.NOOP and not 0 < len(e.key) <= wire.MAX_KEY:
            # The head refuses such keys; logged, one would make every
            # checkpoint and every replay of the log fail.
            raise ValueError(f"key of {len(e.key)} bytes: LMDB cannot store it")
        raw = e.encode()
        parts.append(_U32.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def _decode_record(payload: bytes) -> tuple[Batch, int]:
    flags, prune, epoch, chain_id, now, n = _RECORD.unpack_from(payload)
    offset = _RECORD.size
    entries = []
    for _ in range(n):
        (length,) = _U32.unpack_from(payload, offset)
        offset += _U32.size
        entries.append(Entry.decode(payload[offset : offset + length]))
        offset += length
    batch = Batch(
        entries,
        keep_sent=bool(flags & _KEEP_SENT),
        prune_sent_upto=prune,
        epoch=epoch if flags & _HAS_EPOCH else None,
        chain_id=chain_id if flags & _HAS_CHAIN else None,
    )
    return batch, now


def _sent_seqs(txn: lmdb.Transaction, db: Any) -> list[int]:
    """The seqs LMDB's sent list holds."""
    return [_U64.unpack(k)[0] for k in txn.cursor(db=db).iternext(values=False)]


def _sent_after(batches: Iterable[_LoggedBatch], seqs: Iterable[int]) -> set[int]:
    """
    The seqs a sent list holding C{seqs} holds once the batches are applied
    in order (each adds the entries it keeps, then prunes).  The list is
    the unacknowledged window, so the sets stay small.
    """
    held = set(seqs)
    for b in batches:
        held.update(seq for seq, _ in b.sent)
        if b.prune_sent_upto:
            held = {seq for seq in held if seq > b.prune_sent_upto}
    return held
