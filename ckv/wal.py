"""
The write-ahead log of a durable replica: one file, records appended and
made durable with one C{fdatasync} each, rewritten from the start once a
checkpoint has put everything it holds into LMDB.

Why: a durable LMDB commit writes every B-tree page the batch touched, at
random places in the file, and syncs twice (pages, then the meta page).  On
this project's build machine, with three replicas writing at once, that
costs about 1 ms and 300 us of CPU per commit; appending the same batch to
this log and syncing it, 0.3 ms and 80 us (C{benchmarks/wal_bench.py}).
LMDB still holds the store: the log only carries the batches since the
last checkpoint (L{ckv.storage.Store}).

Record layout (big-endian)::

    magic u32 | crc32 u32 | lsn u64 | length u32 | payload (length bytes)

The CRC covers the log's salt (an identifier of the store it belongs to,
kept by the store), the LSN, the length and the payload: records of
another store, say one whose LMDB files were deleted and made again next to
an old log, do not check.  LSNs are consecutive.
Reading stops at the first record that is torn (bad magic, length or CRC),
or whose LSN is not the next one: after a checkpoint the file is rewritten
from offset 0, so what follows the newest record is an older generation
(smaller LSNs) or zeros.  A record torn by a crash was never reported
durable, so nothing acknowledged is ever behind the point where reading
stops.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator

MAGIC = 0x434B5657  # "CKVW"
_HEADER = struct.Struct(">IIQI")
_CRC_PART = struct.Struct(">QI")  # lsn, length: covered by the CRC with the payload

#: A record larger than this is taken as torn (a batch is far smaller: the
#: node's batches are bounded by the frame size limit).
MAX_RECORD = 1 << 30

_datasync = getattr(os, "fdatasync", os.fsync)


class LogFailed(OSError):
    """
    A write or sync of the log failed: what the disk holds is unknown, so
    nothing more may be logged (a record that did reach the disk could be
    shadowed by another with the same LSN).  The process should stop and
    recover from the log when it starts again.
    """


class WriteAheadLog:
    """
    One log file.  Not thread-safe: one thread appends (the one that
    commits), and reading happens at open, before any append.
    """

    def __init__(self, path: str, salt: bytes = b"") -> None:
        """
        @param salt: mixed into every record's CRC: only a log opened with
            the same salt reads the records back.
        """
        self.path = path
        self._crc_seed = zlib.crc32(salt)
        self._fd: int | None = None
        #: Where the next record goes.
        self.offset = 0
        self.appends = 0
        #: Set once an append failed: every later append raises it.
        self.failed: LogFailed | None = None

    def open(self) -> None:
        created = not os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if created:
            # The file's name must survive a power loss too.
            dirfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
            try:
                os.fsync(dirfd)
            finally:
                os.close(dirfd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _fileno(self) -> int:
        if self._fd is None:
            raise RuntimeError("write-ahead log is not open")
        return self._fd

    def records(self, after: int) -> Iterator[tuple[int, bytes]]:
        """
        The records from LSN C{after + 1} on, in order, up to the first one
        that is torn or out of sequence.  Leaves C{offset} after the last
        record returned.
        """
        fd = self._fileno()
        size = os.fstat(fd).st_size
        offset = 0
        expected = after + 1
        self.offset = 0
        while offset + _HEADER.size <= size:
            magic, crc, lsn, length = _HEADER.unpack(os.pread(fd, _HEADER.size, offset))
            if magic != MAGIC or length > MAX_RECORD or offset + _HEADER.size + length > size:
                return
            if lsn != expected:
                return  # an older generation, or a record not covered by this checkpoint
            payload = os.pread(fd, length, offset + _HEADER.size)
            if self._crc(lsn, payload) != crc:
                return
            offset += _HEADER.size + length
            self.offset = offset
            expected += 1
            yield lsn, payload

    def append(self, lsn: int, payload: bytes) -> int:
        """
        Write one record and make it durable.  Returns its size in bytes.

        @raise LogFailed: this append failed, or an earlier one did.
        """
        fd = self._fileno()
        if self.failed is not None:
            raise self.failed
        crc = self._crc(lsn, payload)
        record = _HEADER.pack(MAGIC, crc, lsn, len(payload)) + payload
        try:
            written = os.pwrite(fd, record, self.offset)
            if written != len(record):
                raise OSError(f"short write: {written} of {len(record)} bytes")
            _datasync(fd)
        except OSError as e:
            self.failed = LogFailed(f"write-ahead log {self.path} failed at LSN {lsn}: {e}")
            raise self.failed from e
        self.offset += len(record)
        self.appends += 1
        return len(record)

    def _crc(self, lsn: int, payload: bytes) -> int:
        return zlib.crc32(payload, zlib.crc32(_CRC_PART.pack(lsn, len(payload)), self._crc_seed))

    def rewind(self) -> None:
        """
        Everything logged so far is in a durable checkpoint: the next
        record goes to the start of the file again (rewriting blocks that
        are already allocated keeps C{fdatasync} from touching metadata).
        """
        self.offset = 0
