"""
State transfer to a joining node (chain extension, DESIGN.md "Joining and
rejoining").

The tail streams a consistent snapshot of its store (one LMDB read
transaction) in chunks: SNAPSHOT BEGIN (the joining node wipes its store),
DATA chunks, END (the snapshot is the tail's state at that seq).  Every
chunk is acknowledged; at most L{WINDOW} are unacknowledged at a time, so a
slow receiver slows the sender instead of filling memory, and building one
chunk never blocks the reactor for long.  Meanwhile the tail keeps every
update after the snapshot in its sent list, and streams them once the END is
acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.logger import Logger

from ckv import wire
from ckv.storage import Store
from ckv.wire import MessageType as T

#: Bytes of keys and values per DATA chunk.
CHUNK_BYTES = 128 * 1024
#: Chunks in flight (sent, not yet acknowledged).
WINDOW = 4


class SnapshotSender:
    """
    Streams one snapshot over one link.

    @param send: writes a frame to the joining node.
    @param done: called with the snapshot seq once the END is acknowledged.
    """

    log = Logger()

    def __init__(
        self,
        store: Store,
        epoch: int,
        send: Callable[[bytes], None],
        done: Callable[[int], None],
        chunk_bytes: int = CHUNK_BYTES,
        window: int = WINDOW,
    ) -> None:
        self.epoch = epoch
        self._send = send
        self._done = done
        self._window = window
        self.seq, self._chunks = store.snapshot(chunk_bytes)
        self._iter: Iterator[list[tuple[int, bytes, bytes]]] | None = self._chunks
        self._next_chunk = 1
        self._in_flight = 0
        self._end_chunk: int | None = None
        self.items_sent = 0
        self.bytes_sent = 0
        self.finished = False

    def start(self) -> None:
        self._frame(wire.SNAPSHOT_BEGIN, 0, [])
        self._in_flight += 1
        self._pump()

    def on_ack(self, chunk: int) -> None:
        """The joining node has written chunk C{chunk}."""
        if self.finished:
            return
        self._in_flight = max(0, self._in_flight - 1)
        if self._end_chunk is not None and chunk == self._end_chunk:
            self.finished = True
            self.log.info(
                "snapshot at seq {seq} transferred: {items} items, {size} bytes",
                seq=self.seq,
                items=self.items_sent,
                size=self.bytes_sent,
            )
            self._done(self.seq)
            return
        self._pump()

    def _pump(self) -> None:
        while self._iter is not None and self._in_flight < self._window:
            try:
                items = next(self._iter)
            except StopIteration:
                self._iter = None
                self._end_chunk = self._next_chunk
                self._frame(wire.SNAPSHOT_END, self._end_chunk, [])
                self._in_flight += 1
                return
            self._frame(wire.SNAPSHOT_DATA, self._next_chunk, items)
            self._next_chunk += 1
            self._in_flight += 1
            self.items_sent += len(items)
            self.bytes_sent += sum(len(k) + len(v) for _, k, v in items)

    def _frame(self, phase: int, chunk: int, items: list[tuple[int, bytes, bytes]]) -> None:
        self._send(
            wire.encode(
                T.SNAPSHOT,
                epoch=self.epoch,
                phase=phase,
                seq=self.seq,
                chunk=chunk,
                records=[{"db": d, "key": k, "value": v} for d, k, v in items],
            )
        )

    def cancel(self) -> None:
        """The link is gone: release the read transaction."""
        if self._iter is not None:
            self._iter.close()  # type: ignore[attr-defined]
            self._iter = None
        self.finished = True


def snapshot_ack(epoch: int, chunk: int) -> bytes:
    return wire.encode(T.SNAPSHOT_ACK, epoch=epoch, chunk=chunk)


def apply_snapshot_frame(store: Store, body: Any) -> bool:
    """
    Apply one SNAPSHOT frame to a joining node's store.  Returns True when it
    was the END (the caller then rebuilds its replica from the store).
    """
    phase = body.phase
    if phase == wire.SNAPSHOT_BEGIN:
        store.wipe()
        return False
    if phase == wire.SNAPSHOT_DATA:
        store.put_snapshot_items((r.db, r.key, r.value) for r in body.records)
        return False
    if phase == wire.SNAPSHOT_END:
        return True
    raise ValueError(f"unknown snapshot phase {phase}")
