"""
The ckv wire format: every frame, declared once with construct.

A frame on any ckv TCP port (node, master, dispatcher) is a 32-bit big-endian
length followed by that many bytes of body.  The length prefix is handled by
L{twisted.protocols.basic.Int32StringReceiver}; this module describes the
body::

    version  u8     PROTOCOL_VERSION (1)
    type     u8     a MessageType value
    payload  ...    laid out by type, see MESSAGES below

The message type is a plain integer: construct 2.10 miscompiles a C{Switch}
keyed by an C{Enum} (see the test suite, which round-trips every message
through both the compiled and the interpreted parser).

C{doc/protocol.md} describes every frame byte by byte.
"""

from __future__ import annotations

import enum
import io
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from construct import (
    Array,
    Bytes,
    Construct,
    ConstructError,
    Container,
    Error,
    GreedyBytes,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Prefixed,
    PrefixedArray,
    StreamError,
    Struct,
    Switch,
    this,
)

from ckv.fastcodec import Codec, Trailing, Truncated, array_count_field, struct_format

PROTOCOL_VERSION = 1

#: Largest frame body accepted on any port, in bytes.
MAX_FRAME = 4 * 1024 * 1024
#: Largest key, in bytes: the largest key LMDB stores (with its default
#: build).  The empty key is refused too (LMDB cannot store it).  Both are
#: checked before an update is decided: a key the store cannot hold would
#: otherwise be accepted by the chain and then fail every replica's commit.
MAX_KEY = 511
#: Largest value, in bytes.
MAX_VALUE = 1024 * 1024
#: A batch of chain updates is closed once its keys and values pass this size.
MAX_BATCH_BYTES = 512 * 1024
#: Length of a client id.
CLIENT_ID_LEN = 16
#: The client id of entries that belong to no client session.
NO_CLIENT = b"\x00" * CLIENT_ID_LEN
#: A chain id meaning "no chain".
NO_CHAIN = 0xFFFF


class MessageType(enum.IntEnum):
    """Every frame type.  The numbers are the protocol; never reuse one."""

    REQUEST = 1
    REPLY = 2
    CLIENT_HELLO = 3
    WELCOME = 4
    ERROR = 5
    WATCH = 6
    CONFIG = 7
    REGISTER = 10
    HEARTBEAT = 11
    HEARTBEAT_REPLY = 12
    JOINED = 13
    CHAIN_HELLO = 20
    CHAIN_HELLO_REPLY = 21
    UPDATES = 22
    ACK = 23
    SNAPSHOT = 24
    SNAPSHOT_ACK = 25
    FENCE = 26
    COMMITTED = 27


class Op(enum.IntEnum):
    """Operations in a REQUEST, and effects in an update entry."""

    GET = 1
    PUT = 2
    DELETE = 3
    CAS = 4
    #: An entry that changes no data: a failed cas, a delete of an absent
    #: key, or the re-reply of a retried request.
    NOOP = 5


class Status(enum.IntEnum):
    """Outcome of a request, in a REPLY and in an update entry."""

    OK = 0
    NOT_FOUND = 1
    CAS_FAILED = 2
    # Errors: the value of the REPLY holds a UTF-8 message.
    BAD_REQUEST = 16
    NOT_HEAD = 17
    NOT_TAIL = 18
    UNAVAILABLE = 19
    STALE_REQUEST = 20
    TOO_LARGE = 21
    INTERNAL = 22
    STALE_EPOCH = 23


class ErrorCode(enum.IntEnum):
    """Codes of the connection-level ERROR frame."""

    MALFORMED = 1
    UNKNOWN_TYPE = 2
    BAD_VERSION = 3
    TOO_LARGE = 4
    STALE_EPOCH = 5
    NOT_MEMBER = 6
    UNEXPECTED = 7
    REJECTED = 8


# Flags of a REQUEST.
FLAG_HAS_EXPECTED = 0x01
FLAG_HAS_VALUE = 0x02

Key = Prefixed(Int16ub, GreedyBytes)
Blob = Prefixed(Int32ub, GreedyBytes)
ShortText = Prefixed(Int8ub, GreedyBytes)
Text = Prefixed(Int16ub, GreedyBytes)
ClientId = Bytes(CLIENT_ID_LEN)

Request = Struct(
    "client_id" / ClientId,
    "lane" / Int32ub,
    "request_id" / Int64ub,
    "epoch" / Int64ub,
    "op" / Int8ub,
    "flags" / Int8ub,
    "key" / Key,
    "expected" / Blob,
    "value" / Blob,
)

Reply = Struct(
    "client_id" / ClientId,
    "request_id" / Int64ub,
    "status" / Int8ub,
    "value" / Blob,
)

ClientHello = Struct("client_id" / ClientId)

Welcome = Struct("name" / ShortText, "epoch" / Int64ub)

ErrorFrame = Struct("code" / Int16ub, "message" / Text)

Watch = Struct("name" / ShortText)

Member = Struct("name" / ShortText, "host" / ShortText, "port" / Int16ub)

ChainConfig = Struct(
    "chain_id" / Int16ub,
    "epoch" / Int64ub,
    "members" / PrefixedArray(Int8ub, Member),
    "joining" / PrefixedArray(Int8ub, Member),
)

Config = Struct(
    "version" / Int64ub,
    "slot_count" / Int16ub,
    "slots" / Array(this.slot_count, Int16ub),
    "chains" / PrefixedArray(Int16ub, ChainConfig),
    "spares" / PrefixedArray(Int16ub, Member),
)

Register = Struct(
    "name" / ShortText,
    "host" / ShortText,
    "port" / Int16ub,
    "chain_id" / Int16ub,
    "epoch" / Int64ub,
    "applied_seq" / Int64ub,
)

Heartbeat = Struct("name" / ShortText, "epoch" / Int64ub, "applied_seq" / Int64ub)

HeartbeatReply = Struct("lease_ms" / Int32ub, "interval_ms" / Int32ub)

ChainHello = Struct(
    "chain_id" / Int16ub,
    "epoch" / Int64ub,
    "name" / ShortText,
    # Everything up to here will reach the successor on this link (a new
    # tail's read fence: see FENCE).
    "committed_seq" / Int64ub,
)

ChainHelloReply = Struct("epoch" / Int64ub, "applied_seq" / Int64ub)

Entry = Struct(
    "seq" / Int64ub,
    "client_id" / ClientId,
    "lane" / Int32ub,
    "request_id" / Int64ub,
    "op" / Int8ub,
    "status" / Int8ub,
    "key" / Key,
    "value" / Blob,
)

Updates = Struct("epoch" / Int64ub, "entries" / PrefixedArray(Int32ub, Entry))

Ack = Struct("epoch" / Int64ub, "seq" / Int64ub)

Joined = Struct("name" / ShortText, "chain_id" / Int16ub, "epoch" / Int64ub)

# State transfer to a joining node: BEGIN (its store is wiped), DATA chunks,
# END (the snapshot is complete at seq); each chunk is acknowledged.
SNAPSHOT_BEGIN = 0
SNAPSHOT_DATA = 1
SNAPSHOT_END = 2
#: Databases a snapshot item belongs to.
SNAPSHOT_DB_DATA = 0
SNAPSHOT_DB_SESSIONS = 1

SnapshotItem = Struct("db" / Int8ub, "key" / Key, "value" / Blob)

Snapshot = Struct(
    "epoch" / Int64ub,
    "phase" / Int8ub,
    "seq" / Int64ub,
    "chunk" / Int32ub,
    "records" / PrefixedArray(Int32ub, SnapshotItem),
)

SnapshotAck = Struct("epoch" / Int64ub, "chunk" / Int32ub)

Fence = Struct("epoch" / Int64ub, "seq" / Int64ub)

# The durability frontier, sent down the chain: every entry up to seq is
# committed on the sender and on every node before it.
Committed = Struct("epoch" / Int64ub, "seq" / Int64ub)

#: Payload layout of every message type.
MESSAGES: dict[int, Construct] = {
    MessageType.REQUEST.value: Request,
    MessageType.REPLY.value: Reply,
    MessageType.CLIENT_HELLO.value: ClientHello,
    MessageType.WELCOME.value: Welcome,
    MessageType.ERROR.value: ErrorFrame,
    MessageType.WATCH.value: Watch,
    MessageType.CONFIG.value: Config,
    MessageType.REGISTER.value: Register,
    MessageType.HEARTBEAT.value: Heartbeat,
    MessageType.HEARTBEAT_REPLY.value: HeartbeatReply,
    MessageType.JOINED.value: Joined,
    MessageType.CHAIN_HELLO.value: ChainHello,
    MessageType.CHAIN_HELLO_REPLY.value: ChainHelloReply,
    MessageType.UPDATES.value: Updates,
    MessageType.ACK.value: Ack,
    MessageType.SNAPSHOT.value: Snapshot,
    MessageType.SNAPSHOT_ACK.value: SnapshotAck,
    MessageType.FENCE.value: Fence,
    MessageType.COMMITTED.value: Committed,
}

#: The whole frame body, interpreted (slow, used as the reference in tests).
Frame = Struct(
    "version" / Int8ub,
    "type" / Int8ub,
    "body" / Switch(this.type, MESSAGES, default=Error),
)

#: The same, compiled (kept as a second reference for the tests).
CompiledFrame = Frame.compile()

#: One compiled frame per message type: what the processes use.  The bytes
#: are those of L{Frame}; dispatching on the type in Python first spares the
#: compiled C{Switch} and the nested body container on every frame.
_FRAMES: dict[int, Any] = {
    t: Struct("version" / Int8ub, "type" / Int8ub, "body" / body).compile()
    for t, body in MESSAGES.items()
}

# -- the hot path ------------------------------------------------------------
#
# The frames every request crosses (REQUEST, REPLY, ACK, UPDATES) are
# decoded and encoded by codecs that ckv.fastcodec generates from the
# declarations above (one struct call per run of fixed fields instead of a
# construct Container per field: about 1-2 instead of 7-12 microseconds).
# The tests check them byte for byte against construct.


def _frame_codec(mtype: MessageType) -> Codec:
    return Codec(
        mtype.name.title(),
        MESSAGES[mtype.value],
        prefix=[("version", PROTOCOL_VERSION), ("type", mtype.value)],
    )


_REQUEST_CODEC = _frame_codec(MessageType.REQUEST)
_REPLY_CODEC = _frame_codec(MessageType.REPLY)
_ACK_CODEC = _frame_codec(MessageType.ACK)
#: One entry of an UPDATES frame (also the layout of the sent list).
ENTRY_CODEC = Codec("Entry", Entry)
#: Header of an UPDATES frame: version, type, epoch, entry count (the
#: count's format comes from the PrefixedArray of L{Updates}).
_UPDATES_HEAD = struct.Struct(
    ">BB"
    + struct_format(Updates.subcons[0].subcon)
    + struct_format(array_count_field(Updates.subcons[1].subcon))
)


class UpdatesBody(NamedTuple):
    """A decoded UPDATES frame: the entries, and each entry's encoded bytes."""

    epoch: int
    entries: list[Any]
    raws: list[bytes]


def _decode_updates(data: bytes) -> UpdatesBody:
    try:
        _, _, epoch, count = _UPDATES_HEAD.unpack_from(data, 0)
    except struct.error:
        raise Truncated("truncated frame: a field runs past the end of the frame") from None
    o = _UPDATES_HEAD.size
    n = len(data)
    read = ENTRY_CODEC.read
    entries = []
    raws = []
    for _ in range(count):
        entry, end = read(data, o)
        if end > n:
            raise Truncated("truncated frame: a field runs past the end of the frame")
        entries.append(entry)
        raws.append(data[o:end])
        o = end
    if o < n:
        raise Trailing(f"{n - o} unexpected bytes after the payload")
    return UpdatesBody(epoch, entries, raws)


_FAST_DECODERS: dict[int, Callable[[bytes], Any]] = {
    MessageType.REQUEST.value: _REQUEST_CODEC.decode,
    MessageType.REPLY.value: _REPLY_CODEC.decode,
    MessageType.ACK.value: _ACK_CODEC.decode,
    MessageType.UPDATES.value: _decode_updates,
}



class WireError(Exception):
    """A frame could not be decoded.  C{code} is an L{ErrorCode}."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode(mtype: MessageType, **fields: Any) -> bytes:
    """
    Build the body of one frame (without its length prefix).

    @raise ValueError: a fixed-size field has the wrong size (the compiled
        builder would silently write a shifted frame).
    """
    cid = fields.get("client_id")
    if cid is not None and len(cid) != CLIENT_ID_LEN:
        raise ValueError(f"client_id must be {CLIENT_ID_LEN} bytes, not {len(cid)}")
    if mtype == MessageType.CONFIG and fields.get("slot_count") != len(fields.get("slots", ())):
        raise ValueError("CONFIG slot_count must equal the number of slots")
    return _FRAMES[mtype].build({"version": PROTOCOL_VERSION, "type": int(mtype), "body": fields})


def updates_frame(epoch: int, raw_entries: list[bytes]) -> bytes:
    """An UPDATES frame from entries already encoded (see L{encode_entry})."""
    return (
        _UPDATES_HEAD.pack(PROTOCOL_VERSION, MessageType.UPDATES.value, epoch, len(raw_entries))
        + b"".join(raw_entries)
    )


def encode_entry(e: Any) -> bytes:
    """
    One UPDATES entry (the layout of L{Entry}) from an object with those
    fields as attributes (a L{ckv.entry.Entry}).
    """
    if len(e.client_id) != CLIENT_ID_LEN:
        raise ValueError(f"client_id must be {CLIENT_ID_LEN} bytes, not {len(e.client_id)}")
    return ENTRY_CODEC.encode(
        e.seq, e.client_id, e.lane, e.request_id, e.op, e.status, e.key, e.value
    )


def ack(epoch: int, seq: int) -> bytes:
    """Build an ACK frame."""
    return _ACK_CODEC.encode(epoch, seq)


def committed(epoch: int, seq: int) -> bytes:
    """Build a COMMITTED frame (the durability frontier, sent down the chain)."""
    return encode(MessageType.COMMITTED, epoch=epoch, seq=seq)


def decode(data: bytes) -> tuple[int, Container]:
    """
    Parse the body of one frame.

    @return: the message type (an int, compare with L{MessageType}) and the
        payload as a construct Container.
    @raise WireError: the frame is truncated, malformed, of an unknown type
        or of another protocol version.
    """
    if len(data) > MAX_FRAME:
        raise WireError(ErrorCode.TOO_LARGE, f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    if len(data) < 2:
        raise WireError(ErrorCode.MALFORMED, f"truncated frame: {len(data)} bytes, need at least 2")
    if data[0] != PROTOCOL_VERSION:
        raise WireError(
            ErrorCode.BAD_VERSION,
            f"unsupported protocol version {data[0]}, this server speaks {PROTOCOL_VERSION}",
        )
    mtype = data[1]
    fast = _FAST_DECODERS.get(mtype)
    if fast is not None:
        try:
            return mtype, fast(data)
        except (Truncated, Trailing) as e:
            name = MessageType(mtype).name
            raise WireError(ErrorCode.MALFORMED, f"malformed {name} frame: {e}") from None
    if mtype not in MESSAGES:
        raise WireError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {mtype}")
    try:
        # Compiled construct reads length-prefixed fields with a bare
        # io.read(n), which silently returns less at the end of the stream.
        # Parsing over a padded copy turns any short read into "consumed
        # more than the frame", which the position check below catches.
        reader = io.BytesIO(data + _PAD)
        frame = _FRAMES[mtype].parse_stream(reader)
        end = reader.tell()
        if end > len(data):
            raise StreamError("truncated frame: a field runs past the end of the frame")
        if end < len(data):
            raise StreamError(f"{len(data) - end} unexpected bytes after the payload")
    except (ConstructError, struct.error, ValueError) as e:
        name = MessageType(mtype).name
        raise WireError(ErrorCode.MALFORMED, f"malformed {name} frame: {_short(e)}") from None
    return mtype, frame.body


_PAD = b"\x00" * 8


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1][:200] if text else e.__class__.__name__


def error_frame(code: ErrorCode, message: str) -> bytes:
    """An ERROR frame carrying C{message} (truncated to fit)."""
    raw = _utf8_prefix(message, 1000)
    return encode(MessageType.ERROR, code=int(code), message=raw)


def request(
    client_id: bytes,
    lane: int,
    request_id: int,
    op: Op,
    key: bytes,
    value: bytes | None = None,
    expected: bytes | None = None,
    has_expected: bool = False,
    epoch: int = 0,
) -> bytes:
    """Build a REQUEST frame."""
    flags = 0
    if has_expected and expected is not None:
        flags |= FLAG_HAS_EXPECTED
    if value is not None:
        flags |= FLAG_HAS_VALUE
    if len(client_id) != CLIENT_ID_LEN:
        raise ValueError(f"client_id must be {CLIENT_ID_LEN} bytes, not {len(client_id)}")
    return _REQUEST_CODEC.encode(
        client_id, lane, request_id, epoch, int(op), flags, key, expected or b"", value or b""
    )


def reply(client_id: bytes, request_id: int, status: Status, value: bytes = b"") -> bytes:
    """Build a REPLY frame."""
    if len(client_id) != CLIENT_ID_LEN:
        raise ValueError(f"client_id must be {CLIENT_ID_LEN} bytes, not {len(client_id)}")
    return _REPLY_CODEC.encode(client_id, request_id, int(status), value)


def error_reply(client_id: bytes, request_id: int, status: Status, message: str) -> bytes:
    """A REPLY whose status is an error, with a human-readable message."""
    return reply(client_id, request_id, status, _utf8_prefix(message, 4096))


def _utf8_prefix(text: str, limit: int) -> bytes:
    """At most C{limit} bytes of C{text} in UTF-8, never cutting a character."""
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore").encode("utf-8")


_CLIENT_OPS = frozenset({Op.GET.value, Op.PUT.value, Op.DELETE.value, Op.CAS.value})


def check_request(req: Container) -> tuple[Status, str] | None:
    """
    Validate a decoded REQUEST against the limits.

    @return: None if it is acceptable, else the error status and a message.
    """
    if len(req.key) > MAX_KEY:
        return Status.TOO_LARGE, f"key of {len(req.key)} bytes exceeds the limit of {MAX_KEY}"
    if not req.key:
        return Status.BAD_REQUEST, "the empty key is not allowed"
    if len(req.value) > MAX_VALUE:
        return Status.TOO_LARGE, f"value of {len(req.value)} bytes exceeds the limit of {MAX_VALUE}"
    if len(req.expected) > MAX_VALUE:
        return (
            Status.TOO_LARGE,
            f"expected value of {len(req.expected)} bytes exceeds the limit of {MAX_VALUE}",
        )
    op = req.op
    if op not in _CLIENT_OPS:
        if op == Op.NOOP:
            return Status.BAD_REQUEST, "NOOP is not a client operation"
        return Status.BAD_REQUEST, f"unknown operation {op}"
    if op == Op.PUT and not req.flags & FLAG_HAS_VALUE:
        return Status.BAD_REQUEST, "put without a value"
    return None
