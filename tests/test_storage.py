"""Tests for L{ckv.storage}: the LMDB store of one replica, in a temporary directory."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import lmdb
import pytest

from ckv import wire
from ckv.dirlock import DirectoryInUse
from ckv.entry import Entry
from ckv.storage import SYNC_MODES, Batch, Recovered, Store, session_key
from ckv.wire import Op, Status

CID = b"c" * wire.CLIENT_ID_LEN
CID2 = b"d" * wire.CLIENT_ID_LEN


def entry(seq, op=Op.PUT, key=b"k", value=b"v", client_id=CID, lane=0, request_id=None,
          status=Status.OK) -> Entry:
    rid = seq if request_id is None else request_id
    return Entry(seq, client_id, lane, rid, int(op), int(status), key, value)


#: How a store may be set up: durable with everything still in the log and
#: the overlay, durable with a checkpoint before every commit (so everything
#: but the last batch is in LMDB), and replicated (no log).
CONFIGS = {
    "durable": {},
    "durable-checkpointing": {"checkpoint_entries": 1, "checkpoint_bytes": 1},
    "replicated": {"sync": "replicated"},
}


def make_store(path, config: str = "durable", **kw) -> Store:
    s = Store(str(path), **{**CONFIGS[config], **kw})
    s.open()
    return s


@contextmanager
def opened(path, config: str = "durable", **kw) -> Iterator[Store]:
    """A store made with L{make_store}, closed at the end of the block."""
    s = make_store(path, config, **kw)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(params=list(CONFIGS))
def store(tmp_path, request):
    with opened(tmp_path / "db", request.param) as s:
        yield s


def reopen(s: Store) -> Store:
    s.close()
    again = Store(
        s.path,
        s.sync_mode,
        checkpoint_entries=s.checkpoint_entries,
        checkpoint_bytes=s.checkpoint_bytes,
    )
    again.open()
    return again


def test_fresh_store(store):
    assert store.get(b"k") is None
    assert store.session(session_key(CID, 0)) is None
    assert store.recover() == Recovered(0, 0, wire.NO_CHAIN, [])
    assert store.items() == []


def test_commit_applies_put_delete_noop(store):
    store.commit(Batch([
        entry(1, key=b"a", value=b"1"),
        entry(2, key=b"b", value=b"2"),
        entry(3, key=b"a", value=b"1bis"),
        entry(4, Op.DELETE, key=b"b", value=b""),
        entry(5, Op.NOOP, key=b"c", value=b"", status=Status.CAS_FAILED),
        entry(6, Op.DELETE, key=b"never", value=b""),  # deleting an absent key is harmless
        entry(7, key=b"empty", value=b""),
    ]))
    assert store.get(b"a") == b"1bis"
    assert store.get(b"b") is None
    assert store.get(b"c") is None
    assert store.get(b"empty") == b""
    assert dict(store.items()) == {b"a": b"1bis", b"empty": b""}
    assert store.recover().applied_seq == 7
    assert isinstance(store.get(b"a"), bytes)


def test_sessions(store):
    store.commit(Batch([
        entry(1, request_id=10),
        entry(2, request_id=3, lane=1, op=Op.NOOP, status=Status.CAS_FAILED),
        entry(3, request_id=11, status=Status.NOT_FOUND, op=Op.NOOP),
        entry(4, client_id=wire.NO_CLIENT, request_id=99),
        entry(5, client_id=CID2, request_id=1),
    ]))
    assert store.session(session_key(CID, 0)) == (11, Status.NOT_FOUND)
    assert store.session(session_key(CID, 1)) == (3, Status.CAS_FAILED)
    assert store.session(session_key(CID2, 0)) == (1, Status.OK)
    assert store.session(session_key(wire.NO_CLIENT, 0)) is None
    assert store.stats()["sessions"] == 3


def test_session_key():
    assert session_key(CID, 0x01020304) == CID + b"\x01\x02\x03\x04"
    assert len(session_key(CID, 0)) == 20


def test_keep_sent_and_prune(store):
    store.commit(Batch([entry(i) for i in range(1, 6)], keep_sent=True))
    assert [e.seq for e in store.recover().sent] == [1, 2, 3, 4, 5]
    store.commit(Batch([entry(6)], keep_sent=False))  # the tail keeps nothing
    assert [e.seq for e in store.recover().sent] == [1, 2, 3, 4, 5]
    store.commit(Batch(prune_sent_upto=3))
    assert [e.seq for e in store.recover().sent] == [4, 5]
    store.commit(Batch(prune_sent_upto=3))  # idempotent
    assert [e.seq for e in store.recover().sent] == [4, 5]
    store.commit(Batch([entry(7), entry(8)], prune_sent_upto=4))
    assert [e.seq for e in store.recover().sent] == [5, 7, 8]
    store.commit(Batch(prune_sent_upto=100))  # everything
    assert store.recover().sent == []
    store.commit(Batch(prune_sent_upto=100))  # nothing left to prune
    assert store.recover().sent == []
    assert store.recover().applied_seq == 8


def test_prune_across_byte_boundaries(store):
    """Seqs are big-endian so that byte order is numeric order (255 < 256)."""
    store.commit(Batch([entry(i) for i in (250, 255, 256, 257, 70000)]))
    store.commit(Batch(prune_sent_upto=256))
    assert [e.seq for e in store.recover().sent] == [257, 70000]


def test_sent_entries_round_trip(store):
    e = entry(9, Op.NOOP, key=b"\x00key", value=b"", client_id=CID2, lane=3, request_id=2**63,
              status=Status.CAS_FAILED)
    store.commit(Batch([e]))
    (back,) = store.recover().sent
    assert back == e


def test_recover_after_reopen(tmp_path):
    s = Store(str(tmp_path / "db"))
    s.open()
    try:
        s.commit(Batch([entry(1), entry(2)], epoch=3, chain_id=5))
        s.commit(Batch([entry(3, key=b"x", value=b"y")], prune_sent_upto=1))
        s.commit(Batch(epoch=4))  # meta only: the applied seq stays
        s = reopen(s)
        rec = s.recover()
        assert rec.applied_seq == 3
        assert rec.epoch == 4
        assert rec.chain_id == 5
        assert [e.seq for e in rec.sent] == [2, 3]
        assert rec.sent[1] == entry(3, key=b"x", value=b"y")
        assert s.get(b"x") == b"y"
        assert s.session(session_key(CID, 0)) == (3, Status.OK)
    finally:
        s.close()


def test_chain_id_zero_is_recorded(store):
    store.commit(Batch(chain_id=0, epoch=1))
    rec = store.recover()
    assert (rec.chain_id, rec.epoch) == (0, 1)


@pytest.mark.parametrize("sync", SYNC_MODES)
def test_sync_modes(tmp_path, sync):
    s = Store(str(tmp_path / "db"), sync=sync)
    s.open()
    try:
        s.commit(Batch([entry(1, key=b"k", value=b"v")]))
        s.sync()
        s = reopen(s)
        assert s.sync_mode == sync
        assert s.get(b"k") == b"v"
    finally:
        s.close()


def test_unknown_sync_mode(tmp_path):
    with pytest.raises(ValueError, match="unknown sync mode"):
        Store(str(tmp_path / "db"), sync="sometimes")


def test_closed_store(tmp_path):
    s = Store(str(tmp_path / "db"))
    with pytest.raises(RuntimeError):
        s.get(b"k")
    s.open()
    s.close()
    s.close()  # twice is fine
    with pytest.raises(RuntimeError):
        s.commit(Batch([entry(1)]))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_directory_in_use_is_refused_until_it_is_closed(tmp_path, config):
    first = make_store(tmp_path / "db", config)
    first.commit(Batch([entry(1, key=b"a", value=b"1")]))
    second = Store(str(tmp_path / "db"), **CONFIGS[config])
    with pytest.raises(DirectoryInUse, match=rf"in use by another process \(pid {os.getpid()}\)"):
        second.open()
    assert second.env is None
    # The refused open touched nothing: the holder goes on.
    first.commit(Batch([entry(2, key=b"b", value=b"2")]))
    first.close()
    second.open()
    try:
        assert second.items() == [(b"a", b"1"), (b"b", b"2")]
    finally:
        second.close()


def test_an_open_that_fails_leaves_nothing_open(tmp_path, monkeypatch):
    """The lock goes last: nothing of the store may stay open in this process."""
    path = tmp_path / "db"
    make_store(path).close()

    def broken_replay(self):
        raise OSError("disk gone")

    monkeypatch.setattr(Store, "_replay", broken_replay)
    s = Store(str(path))
    with pytest.raises(OSError, match="disk gone"):
        s.open()
    assert s.env is None and s._wals == [] and s._lock_fd is None
    monkeypatch.undo()
    # LMDB would refuse a second open of an environment this process still
    # has open; the directory is free and whole.
    again = make_store(path)
    again.close()


def test_the_lock_goes_with_a_killed_process(tmp_path):
    """Held by a process until it dies, however it dies (the pid file stays)."""
    import signal
    import subprocess
    import sys

    from tests import harness

    path = str(tmp_path / "db")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from ckv.storage import Store; s = Store(sys.argv[1]); s.open(); "
         "print('open', flush=True); sys.stdin.read()", path],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=harness.env(),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(DirectoryInUse, match=rf"pid {holder.pid}\b"):
            Store(path).open()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    s = Store(path)
    s.open()
    s.close()


def test_open_creates_directory(tmp_path):
    path = tmp_path / "a" / "b" / "c"
    s = Store(str(path))
    s.open()
    try:
        assert path.is_dir()
    finally:
        s.close()


@pytest.mark.parametrize("config", ["durable-checkpointing", "replicated"])
def test_map_growth(tmp_path, config):
    """
    A full map fails the commit and leaves nothing of its batch behind;
    after a grow, the same batch commits.  (Durable: the map fills when a
    checkpoint runs, at the start of a commit, before the batch is logged.)
    """
    s = make_store(tmp_path / "db", config, map_size=64 * 1024)
    try:
        small = s.map_size
        assert small >= 64 * 1024
        seq = 0
        with pytest.raises(lmdb.MapFullError):
            for _ in range(10_000):
                seq += 1
                s.commit(Batch([entry(seq, key=b"k%d" % seq, value=b"x" * 2000)]))
        committed = seq - 1
        assert s.stats()["keys"] == committed
        # The failed transaction left nothing behind.
        assert s.get(b"k%d" % seq) is None
        assert s.digest()[2] == committed  # the applied seq, without writing
        s.grow()
        assert s.map_size == 2 * small
        assert s.stats()["map_size"] == 2 * small
        s.commit(Batch([entry(seq, key=b"k%d" % seq, value=b"x" * 2000)]))
        assert s.get(b"k%d" % seq) == b"x" * 2000
        for i in range(1, seq + 1):
            assert s.get(b"k%d" % i) == b"x" * 2000
        assert [e.seq for e in s.recover().sent] == list(range(1, seq + 1))
        s = reopen(s)
        assert s.stats()["keys"] == seq
        assert s.recover().applied_seq == seq
    finally:
        s.close()


def test_stats(store):
    durable = store.sync_mode == "durable"
    st = store.stats()
    assert st["keys"] == 0 and st["sessions"] == 0 and st["sent_on_disk"] == 0
    assert st["commits"] == 0 and st["committed_entries"] == 0
    store.commit(Batch([entry(1, key=b"a"), entry(2, key=b"b", client_id=wire.NO_CLIENT)]))
    store.commit(Batch([entry(3, key=b"a")], keep_sent=False))
    store.commit(Batch(prune_sent_upto=1))
    st = store.stats()
    assert st == {
        "keys": 2,
        "sessions": 1,
        "sent_on_disk": 1,
        "map_size": store.map_size,
        "used_bytes": st["used_bytes"],
        "commits": 3,
        "committed_entries": 3,
        "commit_ms_avg": st["commit_ms_avg"],
        "commit_ms_max": st["commit_ms_max"],
        "sessions_expired": 0,
        "wal_bytes": st["wal_bytes"],
        "wal_entries": st["wal_entries"],
        "checkpoints": st["checkpoints"],
        "checkpoint_ms_avg": st["checkpoint_ms_avg"],
        "checkpoint_ms_max": st["checkpoint_ms_max"],
    }
    assert (st["wal_bytes"] > 0) == durable
    if durable:
        store.checkpoint()
        after = store.stats()
        assert (after["keys"], after["sessions"], after["sent_on_disk"]) == (2, 1, 1)
        assert (after["wal_bytes"], after["wal_entries"]) == (0, 0)
        assert after["checkpoints"] > st["checkpoints"]
    else:
        assert st["wal_entries"] == st["checkpoints"] == 0
    assert 0 < st["used_bytes"] <= st["map_size"]
    assert 0 < st["commit_ms_avg"] <= st["commit_ms_max"]


# -- session expiry ------------------------------------------------------------------


class FakeWallClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=list(CONFIGS))
def timed_store(tmp_path, request):
    clock = FakeWallClock()
    with opened(tmp_path / "db", request.param, clock=clock) as s:
        yield s, clock


def sessions_of(store: Store) -> dict[bytes, tuple[int, int]]:
    """Every session the store holds, in LMDB or still in the log, as reads see it."""
    txn, _, _, logged, _ = store._view()
    try:
        keys = {bytes(k) for k, _ in txn.cursor(db=store._sessions)} | set(logged)
    finally:
        txn.abort()
    return {k: s for k in keys if (s := store.session(k)) is not None}


def test_sessions_idle_longer_than_the_ttl_are_deleted(timed_store):
    store, clock = timed_store
    store.commit(Batch([entry(1, lane=1), entry(2, lane=2)]))
    clock.now += 50
    store.commit(Batch([entry(3, lane=2), entry(4, lane=3)]))  # lane 2 used again
    clock.now += 60
    # Lane 1 was last used 110 s ago; lanes 2 and 3 60 s ago.  (With a
    # checkpoint before every commit, LMDB now holds lane 2 as of 110 s ago
    # and the log holds it as of 60 s ago: not expired.)
    store._join_checkpointer()
    assert store.expire_sessions(ttl=100) == (1, None)
    assert sessions_of(store) == {
        session_key(CID, 2): (3, int(Status.OK)),
        session_key(CID, 3): (4, int(Status.OK)),
    }
    assert store.expire_sessions(ttl=100) == (0, None)
    clock.now += 41
    assert store.expire_sessions(ttl=100) == (2, None)
    assert sessions_of(store) == {}
    assert store.stats()["sessions_expired"] == 3
    # The data itself is untouched.
    assert store.get(b"k") == b"v"


def test_a_sweep_checkpoints_first_only_if_the_log_may_hold_expired_sessions(tmp_path):
    """A checkpoint holds up every commit: a pass starts with one only when it can matter."""
    clock = FakeWallClock()
    store = make_store(tmp_path / "db", clock=clock)
    try:
        store.commit(Batch([entry(1, lane=1)]))
        clock.now += 50
        store.commit(Batch([entry(2, lane=2)]))
        clock.now += 40
        # Nothing logged is older than 100 s: the log stays as it is.
        assert store.expire_sessions(ttl=100) == (0, None)
        assert store.stats()["checkpoints"] == 0 and store.stats()["wal_entries"] == 2
        clock.now += 20
        # Lane 1 was logged 110 s ago: into LMDB, and deleted there.
        assert store.expire_sessions(ttl=100) == (1, None)
        assert store.stats()["checkpoints"] == 1 and store.stats()["wal_entries"] == 0
        assert store.session(session_key(CID, 1)) is None
        assert store.session(session_key(CID, 2)) == (2, int(Status.OK))
    finally:
        store.close()


def test_expiry_goes_a_chunk_at_a_time(timed_store):
    store, clock = timed_store
    store.commit(Batch([entry(i, lane=i) for i in range(1, 26)]))
    clock.now += 1000
    start, rounds, deleted = b"", 0, 0
    while start is not None:
        n, start = store.expire_sessions(ttl=10, start=start, limit=10)
        deleted += n
        rounds += 1
    assert (deleted, rounds) == (25, 3)
    assert sessions_of(store) == {}


def test_a_session_without_a_time_is_stamped_not_deleted(timed_store):
    """Sessions written before they carried a time expire a TTL after the first sweep."""
    store, clock = timed_store
    skey = session_key(CID, 7)
    with store.env.begin(write=True, db=store._sessions) as txn:
        txn.put(skey, struct.pack(">QB", 42, int(Status.CAS_FAILED)))
    assert store.session(skey) == (42, int(Status.CAS_FAILED))
    assert store.expire_sessions(ttl=10) == (0, None)
    assert store.session(skey) == (42, int(Status.CAS_FAILED))
    clock.now += 11
    assert store.expire_sessions(ttl=10) == (1, None)
    assert store.session(skey) is None


def test_digest_covers_data_only_with_its_last_seq(tmp_path):
    """
    Two stores with the same keys and values have the same digest, whatever
    their sessions and sent lists; the digest carries the last applied seq of
    the same snapshot, and changes with any value.
    """
    import hashlib
    import threading

    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    a.open()
    b.open()
    assert a.digest() == (0, hashlib.sha256().hexdigest(), 0)
    a.commit(Batch([entry(1, key=b"x", value=b"1"), entry(2, key=b"y", value=b"2")]))
    b.commit(Batch([entry(5, key=b"y", value=b"2", client_id=CID2)], keep_sent=False))
    b.commit(Batch([entry(9, key=b"x", value=b"1")], keep_sent=False))
    n, h, seq = a.digest()
    assert (n, seq) == (2, 2)
    assert b.digest() == (2, h, 9)
    # From another thread (the node computes it off the reactor thread).
    out = []
    t = threading.Thread(target=lambda: out.append(a.digest()))
    t.start()
    t.join()
    assert out == [(2, h, 2)]
    a.commit(Batch([entry(3, key=b"x", value=b"1!")]))
    assert a.digest()[1] != h and a.digest()[2] == 3
    a.close()
    b.close()


# -- the write-ahead log of the durable mode --------------------------------


def crash(s: Store) -> None:
    """
    Stop as a killed process would: nothing flushed, the log not applied
    (a checkpoint already running is let finish, to keep the test exact).
    """
    assert s._wals and s.env is not None
    s._join_checkpointer()
    for w in s._wals:
        w.close()
    s.env.close()
    s._wals, s.env, s._active = [], None, None
    s._unlock()  # a dead process holds no lock


def some_batches() -> list[Batch]:
    return [
        Batch([entry(1, key=b"a", value=b"1"), entry(2, key=b"b", value=b"2")],
              epoch=3, chain_id=5),
        Batch([entry(3, Op.DELETE, key=b"a", value=b""), entry(4, key=b"c", value=b"3", lane=1)]),
        Batch([entry(5, Op.NOOP, key=b"b", value=b"", status=Status.CAS_FAILED, client_id=CID2)],
              prune_sent_upto=2),
        Batch(epoch=4),
        Batch([entry(6, key=b"d", value=b"x" * 3000)], keep_sent=False),
    ]


def state_of(s: Store) -> tuple:
    """
    What reads see: data, sessions, digest and applied seq.  (Not
    L{Store.recover}, which checkpoints: a crash test would test nothing.)
    """
    sessions = [s.session(session_key(c, lane)) for c in (CID, CID2) for lane in (0, 1)]
    return s.items(), sessions, s.digest()


@pytest.fixture
def reference(tmp_path):
    """The state some_batches() leave in a store that was closed cleanly."""
    s = make_store(tmp_path / "reference", "replicated")
    for b in some_batches():
        s.commit(b)
    s = reopen(s)
    yield state_of(s), s.recover()
    s.close()


@pytest.mark.parametrize("checkpoint_entries", [1, 3, 100])
def test_a_crash_loses_nothing_that_was_logged(tmp_path, reference, checkpoint_entries):
    """
    Killed with batches in the log only, in LMDB only, or both: opening the
    store again applies the log, and the store is what a clean close leaves.
    """
    s = make_store(tmp_path / "db", checkpoint_entries=checkpoint_entries)
    for b in some_batches():
        s.commit(b)
    assert state_of(s) == reference[0]  # reads see the log before any checkpoint
    crash(s)
    s = make_store(tmp_path / "db")
    try:
        assert (state_of(s), s.recover()) == reference
        assert s.stats()["wal_entries"] == 0 and s._active.wal.offset == 0
        # ... and the store goes on from there, through another crash.
        s.commit(Batch([entry(7, key=b"e", value=b"5")]))
        crash(s)
        s = make_store(tmp_path / "db")
        assert s.get(b"e") == b"5" and s.recover().applied_seq == 7
    finally:
        s.close()


def test_a_torn_last_record_loses_only_that_batch(tmp_path):
    """A record not fully on disk was never reported durable: the batches before it stay."""
    s = make_store(tmp_path / "db")
    batches = some_batches()
    for b in batches[:3]:
        s.commit(b)
    path = s._active.wal.path
    end = s._active.wal.offset
    crash(s)
    os.truncate(path, end - 3)
    with opened(tmp_path / "db") as s:
        rec = s.recover()
        assert rec.applied_seq == 4
        assert s.get(b"c") == b"3" and s.get(b"a") is None
        assert s.session(session_key(CID2, 0)) is None  # the third batch's


def test_a_clean_close_leaves_nothing_to_replay(tmp_path, reference):
    s = make_store(tmp_path / "db")
    for b in some_batches():
        s.commit(b)
    s = reopen(s)
    try:
        assert s.checkpoints == 0  # nothing was replayed
        assert (state_of(s), s.recover()) == reference
    finally:
        s.close()


def test_a_checkpoint_moves_the_log_into_lmdb(tmp_path):
    with opened(tmp_path / "db", checkpoint_entries=4) as s:
        for seq in range(1, 4):
            s.commit(Batch([entry(seq, key=b"k%d" % seq)]))
        assert (s.checkpoints, s.stats()["wal_entries"]) == (0, 3)
        with s.env.begin() as txn:  # LMDB alone has none of it yet
            assert txn.get(b"k1", db=s._data) is None
        s.commit(Batch([entry(4, key=b"k4"), entry(5, key=b"k5")]))
        s.commit(Batch([entry(6, key=b"k6")]))  # finds 5 waiting: checkpoints them, on a thread
        s._join_checkpointer()
        assert (s.checkpoints, s.stats()["wal_entries"]) == (1, 1)
        with s.env.begin() as txn:
            assert [txn.get(b"k%d" % i, db=s._data) for i in range(1, 7)] == [b"v"] * 5 + [None]
            assert s._meta_u64(txn, b"wal_lsn") == 4  # the four records checkpointed
        assert [s.get(b"k%d" % i) for i in range(1, 7)] == [b"v"] * 6


def test_a_checkpoint_by_bytes(tmp_path):
    with opened(tmp_path / "db", checkpoint_bytes=10_000) as s:
        for seq in range(1, 8):
            s.commit(Batch([entry(seq, key=b"k%d" % seq, value=b"x" * 4000)]))
            s._join_checkpointer()
        # Three records pass 10,000 bytes: the 4th and the 7th commit checkpoint first.
        assert s.checkpoints == 2
        assert s.stats()["keys"] == 7


def test_a_wipe_forgets_what_was_logged(tmp_path):
    """A joining node wipes its store: nothing logged before may come back after a crash."""
    s = make_store(tmp_path / "db")
    s.commit(Batch([entry(1, key=b"old")], epoch=2, chain_id=1))
    s.wipe()
    assert s.get(b"old") is None and s.items() == []
    crash(s)
    s = make_store(tmp_path / "db")
    assert s.recover() == Recovered(0, 0, wire.NO_CHAIN, [])
    s.put_snapshot_items([(wire.SNAPSHOT_DB_DATA, b"new", b"1")])
    s.finish_snapshot(10, 3, 1)
    s.commit(Batch(epoch=4))  # logged, with no entry: the applied seq is the snapshot's
    assert s.digest()[2] == 10 and s.snapshot(100)[0] == 10
    s.commit(Batch([entry(11, key=b"newer")]))
    crash(s)
    with opened(tmp_path / "db") as s:
        assert s.items() == [(b"new", b"1"), (b"newer", b"v")]
        assert s.recover().applied_seq == 11


def test_snapshot_and_digest_include_the_log(tmp_path):
    """A state transfer from a durable tail sends what its log holds too, at its seq."""
    clock = FakeWallClock()  # one time for both: sessions carry it
    a = make_store(tmp_path / "a", checkpoint_entries=2, clock=clock)
    b = make_store(tmp_path / "b", "replicated", clock=clock)
    try:
        for batch in some_batches():
            a.commit(batch)
            b.commit(batch)
        a._join_checkpointer()  # the last one started has ended
        assert a.stats()["wal_entries"] > 0 and a.checkpoints > 0  # some of each
        for s in (a, b):
            seq, chunks = s.snapshot(64)
            assert seq == 6
        seqs_items = [(s.snapshot(64)[0], sorted(i for c in s.snapshot(64)[1] for i in c))
                      for s in (a, b)]
        assert seqs_items[0] == seqs_items[1]
        assert a.digest() == b.digest()
        assert a.stats()["keys"] == b.stats()["keys"] == 3
        assert a.stats()["sessions"] == b.stats()["sessions"]
        assert a.stats()["sent_on_disk"] == b.stats()["sent_on_disk"]
    finally:
        a.close()
        b.close()


def test_readers_never_see_a_checkpoint_half_done(tmp_path):
    """
    Another thread reading while commits checkpoint every batch: a key once
    committed is always there, and a digest's key count always matches the
    seq it reports (one new key per batch).
    """
    import threading

    s = make_store(tmp_path / "db", checkpoint_entries=1)
    s.commit(Batch([entry(1, key=b"k1")]))
    done = threading.Event()
    problems: list[str] = []

    def read() -> None:
        while not done.is_set():
            if s.get(b"k1") != b"v":
                problems.append("k1 missing")
            n, _, seq = s.digest()
            if n != seq:
                problems.append(f"{n} keys at seq {seq}")

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for seq in range(2, 300):
            s.commit(Batch([entry(seq, key=b"k%d" % seq)]))
    finally:
        done.set()
        reader.join()
        s.close()
    assert problems == []


@pytest.mark.parametrize("crash_point", ["frozen, not written", "written, log rotated",
                                         "second rotation, not written"])
def test_a_crash_around_a_background_checkpoint_loses_nothing(tmp_path, crash_point):
    """
    A checkpoint hands the batches logged so far to its thread and new ones
    go to the other log file.  Wherever the process stops, opening the
    store finds every batch: in LMDB, in one file, or continued into the
    other.
    """
    s = make_store(tmp_path / "db")  # never checkpoints by itself here
    seq = 0

    def commit_some(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            s.commit(Batch([entry(seq, key=b"k%d" % (seq % 7), value=b"%d" % seq)],
                           prune_sent_upto=max(0, seq - 3)))

    write_checkpoint = s._write_checkpoint
    s._write_checkpoint = lambda logged: None  # a checkpoint thread that has not got far yet
    commit_some(5)
    s._freeze()  # what a due checkpoint does first
    commit_some(4)
    if crash_point != "frozen, not written":
        write_checkpoint(s._frozen)  # what its thread does
        commit_some(3)
    if crash_point == "second rotation, not written":
        s._freeze()  # the first file again, from its start
        commit_some(2)
    s._join_checkpointer()
    del s._write_checkpoint
    assert s.checkpoints == (0 if crash_point == "frozen, not written" else 1)
    expected = state_of(s)
    crash(s)
    with opened(tmp_path / "db") as s:
        assert state_of(s) == expected
        assert s.recover().applied_seq == seq
        assert [e.seq for e in s.recover().sent] == list(range(seq - 2, seq + 1))


def test_a_full_map_in_a_background_checkpoint(tmp_path):
    """
    The checkpoint thread fails: nothing is lost (the batches stay logged
    and readable); the next commit reports the full map without logging its
    batch; after a grow the checkpoint is written again.
    """
    s = make_store(tmp_path / "db", map_size=64 * 1024, checkpoint_entries=8)
    try:
        seq = 0
        with pytest.raises(lmdb.MapFullError):
            for _ in range(1000):
                s._join_checkpointer()  # one at a time, to know which commit reports it
                seq += 1
                s.commit(Batch([entry(seq, key=b"k%d" % seq, value=b"x" * 2000)]))
        failed = seq
        assert s.get(b"k%d" % failed) is None  # not logged
        assert all(s.get(b"k%d" % i) == b"x" * 2000 for i in range(1, failed))
        assert s.digest()[2] == failed - 1
        s.grow()
        s.commit(Batch([entry(failed, key=b"k%d" % failed, value=b"x" * 2000)]))
        s._join_checkpointer()
        assert s._checkpoint_error is None and s._frozen is None
        crash(s)
        s = make_store(tmp_path / "db", map_size=s.map_size)
        assert s.recover().applied_seq == failed
        assert all(s.get(b"k%d" % i) == b"x" * 2000 for i in range(1, failed + 1))
    finally:
        s.close()


@pytest.mark.parametrize("key", [b"", b"k" * (wire.MAX_KEY + 1)])
def test_a_key_lmdb_cannot_store_is_never_logged(tmp_path, key):
    """
    The head refuses such keys; if one got this far, logging it would make
    every checkpoint, and every later open, fail.  The commit fails instead.
    """
    s = make_store(tmp_path / "db", checkpoint_entries=1)
    try:
        with pytest.raises(ValueError, match="LMDB cannot store it"):
            s.commit(Batch([entry(1, key=key)]))
        s.commit(Batch([entry(1, key=b"fine")]))
        s.commit(Batch([entry(2, key=b"fine2")]))
        s = reopen(s)
        assert [k for k, _ in s.items()] == [b"fine", b"fine2"]
    finally:
        s.close()


def test_checkpointing_is_true_while_the_checkpoint_thread_runs(tmp_path):
    """What a session sweep asks before it opens a write transaction."""
    import threading

    s = make_store(tmp_path / "db", checkpoint_entries=2)
    release = threading.Event()
    write = s._write_checkpoint
    s._write_checkpoint = lambda logged: (release.wait(10), write(logged))  # type: ignore[method-assign]
    try:
        s.commit(Batch([entry(1, key=b"a")]))
        s.commit(Batch([entry(2, key=b"b")]))
        assert not s.checkpointing
        s.commit(Batch([entry(3, key=b"c")]))  # two entries due: a checkpoint starts
        assert s.checkpointing
        release.set()
        s._checkpointer.join()  # over, though the store has not joined it yet
        assert s._checkpointer is not None and not s.checkpointing
    finally:
        release.set()
        s.close()


def test_commits_wait_for_a_checkpoint_that_falls_far_behind(tmp_path):
    """Backpressure: the next layer grows to FAR_BEHIND times the bound, no further."""
    from ckv.storage import FAR_BEHIND

    s = make_store(tmp_path / "db", checkpoint_entries=2)
    waited_at: list[int] = []

    class Stuck:  # a checkpoint that does not end until waited for
        def is_alive(self) -> bool:
            return True

        def join(self) -> None:
            waited_at.append(s._active.entries)

    s._checkpointer = Stuck()
    try:
        for seq in range(1, FAR_BEHIND * 2 + 1):
            s.commit(Batch([entry(seq, key=b"k%d" % seq)]))
        assert waited_at == []  # up to the limit, commits go on
        s.commit(Batch([entry(FAR_BEHIND * 2 + 1, key=b"last")]))
        assert waited_at == [FAR_BEHIND * 2]
        s._join_checkpointer()
        assert s.get(b"k1") == b"v" and s.get(b"last") == b"v"
    finally:
        s.close()


def test_after_a_failed_sync_nothing_more_is_logged(tmp_path, monkeypatch):
    """
    The record of a failed append may be on the disk anyway: no other
    record may ever take its LSN, in either file, or replay would stop at
    the wrong one.  Here the retry would find a checkpoint due and log to
    the other file, were the store not to refuse every commit from then on.
    """
    import ckv.wal

    class Busy:  # a checkpoint still running
        def is_alive(self) -> bool:
            return True

        def join(self) -> None:
            pass

    s = make_store(tmp_path / "db", checkpoint_entries=2)
    for seq in (1, 2, 3, 4):
        s._join_checkpointer()
        s.commit(Batch([entry(seq, key=b"k%d" % seq)]))
    s._join_checkpointer()
    assert s._active.entries == 2  # 3 and 4: due for a checkpoint
    s._checkpointer = Busy()
    monkeypatch.setattr(ckv.wal, "_datasync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(ckv.wal.LogFailed):
        s.commit(Batch([entry(5, key=b"k5")]))
    monkeypatch.undo()
    s._checkpointer = None  # the checkpoint ended
    with pytest.raises(ckv.wal.LogFailed):
        s.commit(Batch([entry(5, key=b"k5")]))
    assert s._frozen is None  # nothing was handed over: still one file
    crash(s)
    with opened(tmp_path / "db") as s:
        assert s.recover().applied_seq in (4, 5)  # the failed record may or may not count
        assert [s.get(b"k%d" % i) for i in (1, 2, 3, 4)] == [b"v"] * 4


def test_a_wipe_skips_the_lsn_a_failed_append_may_have_left(tmp_path, monkeypatch):
    import ckv.wal

    s = make_store(tmp_path / "db")
    monkeypatch.setattr(ckv.wal, "_datasync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(ckv.wal.LogFailed):
        s.commit(Batch([entry(1, key=b"old")]))  # written, not synced: on the disk all the same
    monkeypatch.undo()
    s.wipe()
    s.put_snapshot_items([(wire.SNAPSHOT_DB_DATA, b"k", b"from-snapshot")])
    s.finish_snapshot(10, 3, 1)
    crash(s)
    with opened(tmp_path / "db") as s:
        assert s.items() == [(b"k", b"from-snapshot")] and s.recover().applied_seq == 10


def test_a_log_left_by_a_durable_run_is_replayed_in_replicated_mode(tmp_path):
    """Switching --sync after a crash loses nothing, and leaves no log to replay later."""
    s = make_store(tmp_path / "db")
    s.commit(Batch([entry(1, key=b"k", value=b"one")]))
    s.commit(Batch([entry(2, key=b"k", value=b"two")]))
    crash(s)
    s = make_store(tmp_path / "db", "replicated")
    assert s.get(b"k") == b"two" and s.recover().applied_seq == 2
    assert not [n for n in os.listdir(s.path) if n.startswith("wal.")]
    s.commit(Batch([entry(3, key=b"k", value=b"three")]))
    s.close()
    with opened(tmp_path / "db") as s:
        assert s.get(b"k") == b"three" and s.recover().applied_seq == 3


def test_a_log_left_next_to_new_lmdb_files_is_not_replayed(tmp_path):
    """
    An operator deletes data.mdb (not the whole directory) after a crash:
    the new environment has a new id, and the old log's records, salted
    with the old one, bring nothing back.
    """
    s = make_store(tmp_path / "db")
    s.commit(Batch([entry(1, key=b"deleted")]))
    crash(s)
    for name in ("data.mdb", "lock.mdb"):
        os.remove(tmp_path / "db" / name)
    s = make_store(tmp_path / "db")
    try:
        assert s.items() == [] and s.recover().applied_seq == 0
        s.commit(Batch([entry(1, key=b"new")]))  # and the log goes on from there
        crash(s)
        s = make_store(tmp_path / "db")
        assert s.items() == [(b"new", b"v")]
    finally:
        s.close()


def test_the_log_layer_gives_the_garbage_collector_little_to_walk(tmp_path):
    """
    Every full collection walks every tracked object: a layer of logged
    batches keeps plain tuples of the entries' seqs and bytes, not the
    entries (at 65,536 entries a layer, a full collection took 60-70 ms
    with them, 11-12 ms without).
    """
    import gc

    with opened(tmp_path / "db", checkpoint_entries=10**6) as s:
        s.commit(Batch([entry(1, key=b"first")]))
        gc.collect()
        before = len(gc.get_objects())
        for b in range(100):
            s.commit(Batch([entry(2 + 10 * b + i, key=b"k%d" % i) for i in range(10)]))
        gc.collect()
        gc.collect()
        grown = len(gc.get_objects()) - before
        assert s.get(b"k9") == b"v" and s.stats()["wal_entries"] == 1001
    assert grown < 300  # one per batch at most, with some slack; 1,000 entries would be more
