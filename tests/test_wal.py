"""Tests for L{ckv.wal}: the write-ahead log's records, torn tails and generations."""

from __future__ import annotations

import os

import pytest

from ckv.wal import _HEADER, WriteAheadLog


@pytest.fixture
def log(tmp_path):
    w = WriteAheadLog(str(tmp_path / "wal.log"))
    w.open()
    yield w
    w.close()


def reread(w: WriteAheadLog, after: int = 0) -> list[tuple[int, bytes]]:
    again = WriteAheadLog(w.path)
    again.open()
    try:
        return list(again.records(after))
    finally:
        again.close()


def test_records_round_trip(log):
    sizes = [log.append(lsn, b"payload %d" % lsn * lsn) for lsn in (1, 2, 3)]
    assert sizes == [_HEADER.size + len(b"payload %d" % n * n) for n in (1, 2, 3)]
    assert log.offset == sum(sizes) == os.path.getsize(log.path)
    assert reread(log) == [(n, b"payload %d" % n * n) for n in (1, 2, 3)]
    # Reading leaves the offset after the last good record.
    again = WriteAheadLog(log.path)
    again.open()
    list(again.records(0))
    assert again.offset == log.offset
    again.close()


def test_an_empty_or_missing_log_has_no_records(log):
    assert reread(log) == []
    assert list(log.records(0)) == [] and log.offset == 0


def test_reading_stops_at_a_torn_record(log):
    for lsn in (1, 2, 3):
        log.append(lsn, b"x" * 100)
    os.truncate(log.path, log.offset - 1)  # the last record lost its last byte
    assert [lsn for lsn, _ in reread(log)] == [1, 2]


def test_reading_stops_at_a_damaged_record(log):
    for lsn in (1, 2, 3):
        log.append(lsn, b"x" * 100)
    with open(log.path, "r+b") as f:
        f.seek(_HEADER.size + 100 + _HEADER.size + 50)  # inside the second payload
        f.write(b"y")
    assert [lsn for lsn, _ in reread(log)] == [1]


def test_reading_stops_at_a_huge_length(log):
    log.append(1, b"a")
    with open(log.path, "r+b") as f:
        f.seek(log.offset)
        f.write(_HEADER.pack(0x434B5657, 0, 2, 0xFFFFFFFF))
    assert reread(log) == [(1, b"a")]


def test_zeros_and_garbage_are_not_records(log):
    with open(log.path, "wb") as f:
        f.write(b"\0" * 4096 + os.urandom(4096))
    assert reread(log) == []


def test_records_before_the_checkpoint_are_not_read(log):
    """After a checkpoint at LSN 2 the log is rewound: its next record is 3."""
    log.append(1, b"a")
    log.append(2, b"b")
    assert reread(log, after=2) == []


def test_a_rewound_log_ends_where_the_older_generation_begins(log):
    for lsn in (1, 2, 3, 4):
        log.append(lsn, b"old" * 10)
    log.rewind()
    log.append(5, b"new")
    log.append(6, b"new" * 20)  # longer: overwrites record 2 and part of 3
    assert reread(log, after=4) == [(5, b"new"), (6, b"new" * 20)]
    log.rewind()
    log.append(7, b"n")  # shorter than what it overwrites
    assert reread(log, after=6) == [(7, b"n")]


def test_append_needs_an_open_log(tmp_path):
    w = WriteAheadLog(str(tmp_path / "wal.log"))
    with pytest.raises(RuntimeError, match="not open"):
        w.append(1, b"x")


def test_records_check_only_with_the_salt_they_were_written_with(tmp_path):
    """A store's log is salted with its id: another store's records are not its own."""
    w = WriteAheadLog(str(tmp_path / "wal.log"), salt=b"store A")
    w.open()
    w.append(1, b"a")
    w.close()
    for salt, expected in ((b"store A", [(1, b"a")]), (b"store B", []), (b"", [])):
        again = WriteAheadLog(w.path, salt=salt)
        again.open()
        assert list(again.records(0)) == expected
        again.close()
