"""
The generated hot-path codecs (ckv.fastcodec) against construct: the same
bytes out, the same values in, the same errors.
"""

from __future__ import annotations

import random

import pytest
from construct import (
    Array,
    Bytes,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int32ul,
    Int64ub,
    Prefixed,
    Struct,
)

from ckv import wire
from ckv.entry import Entry
from ckv.fastcodec import Codec, Trailing, Truncated, Unsupported
from ckv.wire import MessageType as T
from ckv.wire import Op, Status


def reference(mtype: T, **fields: object) -> bytes:
    """The frame as the interpreted construct declaration builds it."""
    return wire.Frame.build({"version": wire.PROTOCOL_VERSION, "type": int(mtype), "body": fields})


def random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


@pytest.mark.parametrize("seed", range(20))
def test_request_encoder_matches_construct(seed):
    rng = random.Random(seed)
    cid = random_bytes(rng, 16)
    key = random_bytes(rng, rng.randrange(0, 300))
    value = random_bytes(rng, rng.randrange(0, 2000)) if rng.random() < 0.7 else None
    expected = random_bytes(rng, rng.randrange(0, 50)) if rng.random() < 0.5 else None
    lane, rid, epoch = rng.getrandbits(32), rng.getrandbits(64), rng.getrandbits(64)
    op = rng.choice(list(Op))
    frame = wire.request(
        cid, lane, rid, op, key, value=value, expected=expected,
        has_expected=expected is not None, epoch=epoch,
    )  # fmt: skip
    flags = (wire.FLAG_HAS_EXPECTED if expected is not None else 0) | (
        wire.FLAG_HAS_VALUE if value is not None else 0
    )
    assert frame == reference(
        T.REQUEST, client_id=cid, lane=lane, request_id=rid, epoch=epoch, op=int(op),
        flags=flags, key=key, expected=expected or b"", value=value or b"",
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(10))
def test_reply_ack_entry_and_updates_encoders_match_construct(seed):
    rng = random.Random(seed)
    cid = random_bytes(rng, 16)
    value = random_bytes(rng, rng.randrange(0, 500))
    status = rng.choice(list(Status))
    assert wire.reply(cid, 7, status, value) == reference(
        T.REPLY, client_id=cid, request_id=7, status=int(status), value=value
    )
    epoch, seq = rng.getrandbits(64), rng.getrandbits(64)
    assert wire.ack(epoch, seq) == reference(T.ACK, epoch=epoch, seq=seq)
    entries = [
        Entry(
            rng.getrandbits(64), random_bytes(rng, 16), rng.getrandbits(32), rng.getrandbits(64),
            rng.choice([2, 3, 5]), rng.choice([0, 1, 2]),
            random_bytes(rng, rng.randrange(0, 40)), random_bytes(rng, rng.randrange(0, 300)),
        )  # fmt: skip
        for _ in range(rng.randrange(0, 6))
    ]
    for e in entries:
        assert e.encode() == wire.Entry.build(e.to_wire())
    frame = wire.updates_frame(epoch, [e.encode() for e in entries])
    assert frame == reference(T.UPDATES, epoch=epoch, entries=[e.to_wire() for e in entries])
    t, body = wire.decode(frame)
    assert t == T.UPDATES and body.epoch == epoch
    assert body.raws == [e.encode() for e in entries]
    pairs = zip(body.entries, body.raws, strict=True)
    assert [Entry.from_wire(c, raw) for c, raw in pairs] == entries


def test_updates_raws_are_the_entries():
    a = Entry(1, b"a" * 16, 1, 1, 2, 0, b"k1", b"v1")
    b = Entry(2, b"b" * 16, 2, 9, 3, 0, b"key-two", b"")
    _, body = wire.decode(wire.updates_frame(3, [a.encode(), b.encode()]))
    assert body.raws == [a.encode(), b.encode()]
    assert [Entry.decode(r) for r in body.raws] == [a, b]


def test_encoders_reject_a_client_id_of_the_wrong_size():
    # struct's "16s" would pad or cut it silently.
    for cid in (b"short", b"x" * 17):
        with pytest.raises(ValueError, match="client_id must be 16 bytes"):
            wire.request(cid, 1, 1, Op.GET, b"k")
        with pytest.raises(ValueError, match="client_id must be 16 bytes"):
            wire.reply(cid, 1, Status.OK)
        with pytest.raises(ValueError, match="client_id must be 16 bytes"):
            Entry(1, cid, 1, 1, 2, 0, b"k", b"v").encode()


def test_encoders_reject_values_out_of_range():
    with pytest.raises(Exception):  # noqa: B017 - struct.error, whatever its text
        wire.request(b"c" * 16, 2**32, 1, Op.GET, b"k")
    with pytest.raises(Exception):  # noqa: B017
        wire.ack(-1, 0)


# -- the generator itself ------------------------------------------------------------

Sample = Struct(
    "a" / Int8ub,
    "b" / Int32ub,
    "tag" / Bytes(3),
    "name" / Prefixed(Int16ub, GreedyBytes),
    "c" / Int64ub,
    "blob" / Prefixed(Int8ub, GreedyBytes),
)


def test_generated_codec_round_trips_like_construct():
    codec = Codec("Sample", Sample)
    fields = {"a": 1, "b": 70000, "tag": b"xyz", "name": b"hello", "c": 2**40, "blob": b""}
    raw = Sample.build(fields)
    assert codec.encode(*fields.values()) == raw
    assert codec.decode(raw)._asdict() == fields
    assert codec.fixed_size == 1 + 4 + 3 + 2 + 8 + 1


def test_generated_codec_reads_at_an_offset():
    codec = Codec("Sample", Sample)
    raw = Sample.build({"a": 1, "b": 2, "tag": b"abc", "name": b"n", "c": 3, "blob": b"bb"})
    value, end = codec.read(b"junk" + raw + b"more", 4)
    assert end == 4 + len(raw)
    assert value.blob == b"bb"


def test_generated_codec_errors():
    codec = Codec("Sample", Sample)
    raw = Sample.build({"a": 1, "b": 2, "tag": b"abc", "name": b"name", "c": 3, "blob": b"bb"})
    for cut in range(len(raw)):
        with pytest.raises(Truncated, match="truncated frame"):
            codec.decode(raw[:cut])
    with pytest.raises(Trailing, match="2 unexpected bytes after the payload"):
        codec.decode(raw + b"!!")


def test_generated_codec_with_a_header_prefix():
    codec = Codec("Ack", wire.Ack, prefix=[("version", 1), ("type", int(T.ACK))])
    frame = codec.encode(5, 6)
    assert frame[:2] == bytes([1, int(T.ACK)])
    assert codec.decode(frame) == (5, 6)
    assert codec.names == ["epoch", "seq"]


@pytest.mark.parametrize(
    "declaration",
    [
        Struct("a" / Int32ul),  # little-endian
        Struct("a" / Array(2, Int8ub)),
        Struct("a" / Prefixed(Int8ub, Int8ub)),
        Struct("_private" / Int8ub),
        Struct(Int8ub),
        Struct(),
    ],
    ids=["little-endian", "array", "prefixed-non-bytes", "underscore-name", "unnamed", "empty"],
)
def test_unsupported_declarations_are_refused(declaration):
    with pytest.raises(Unsupported):
        Codec("X", declaration)


def test_hot_frames_decode_to_attribute_records():
    frame = wire.request(b"c" * 16, 3, 9, Op.PUT, b"k", value=b"v")
    t, body = wire.decode(frame)
    assert t == T.REQUEST
    assert (body.client_id, body.lane, body.request_id, body.op, body.key, body.value) == (
        b"c" * 16, 3, 9, int(Op.PUT), b"k", b"v",
    )  # fmt: skip
