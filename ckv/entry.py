"""One update of a chain, as decided by the head."""

from __future__ import annotations

from typing import Any

from ckv import wire


class Entry:
    """
    An update with its place in the chain's history.

    The head turns every client update into an entry carrying its
    I{effect} (C{op}: PUT, DELETE or NOOP) and the I{result} the client will
    receive (C{status}), so that every replica applies the same thing
    without deciding anything again (a cas is decided once, at the head).
    """

    __slots__ = ("seq", "client_id", "lane", "request_id", "op", "status", "key", "value", "raw")

    def __init__(
        self,
        seq: int,
        client_id: bytes,
        lane: int,
        request_id: int,
        op: int,
        status: int,
        key: bytes,
        value: bytes,
        raw: bytes | None = None,
    ) -> None:
        self.seq = seq
        self.client_id = client_id
        self.lane = lane
        self.request_id = request_id
        self.op = op
        self.status = status
        self.key = key
        self.value = value
        #: The encoded entry, once known (received, or built once).
        self.raw = raw

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "client_id": self.client_id,
            "lane": self.lane,
            "request_id": self.request_id,
            "op": self.op,
            "status": self.status,
            "key": self.key,
            "value": self.value,
        }

    @classmethod
    def from_wire(cls, c: Any, raw: bytes | None = None) -> Entry:
        return cls(c.seq, c.client_id, c.lane, c.request_id, c.op, c.status, c.key, c.value, raw)

    def encode(self) -> bytes:
        """
        The entry alone, in the layout of an UPDATES entry (for the sent
        list and for forwarding).  Built once, then reused.
        """
        if self.raw is None:
            self.raw = wire.encode_entry(self)
        return self.raw

    @classmethod
    def decode(cls, raw: bytes) -> Entry:
        """An entry from its bytes (as kept in the sent list)."""
        return cls.from_wire(wire.ENTRY_CODEC.decode(raw), raw)

    @property
    def size(self) -> int:
        """Rough encoded size, for batching."""
        return 48 + len(self.key) + len(self.value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Entry):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__ if s != "raw")

    def __hash__(self) -> int:
        return hash((self.seq, self.key))

    def __repr__(self) -> str:
        op = wire.Op(self.op).name if self.op in wire.Op._value2member_map_ else self.op
        return f"Entry(seq={self.seq}, op={op}, key={self.key!r}, status={self.status})"
