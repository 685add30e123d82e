"""
The cluster configuration: chains, their members head first, epochs, and the
slot map.  The master owns it; nodes, dispatchers and clients receive copies
in CONFIG frames.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from ckv import wire

#: Number of slots the key space is split into.  Fixed for the life of a
#: cluster: changing it moves every key.
SLOT_COUNT = 1024


def slot_of(key: bytes, slot_count: int = SLOT_COUNT) -> int:
    """
    The slot of C{key}: CRC-32 (zlib, IEEE polynomial) of the key bytes
    modulo the slot count.  Stable across processes, machines and Python
    versions (unlike C{hash()}).
    """
    return zlib.crc32(key) % slot_count


@dataclass(frozen=True)
class Member:
    """One node as the cluster knows it."""

    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def endpoint(self) -> str:
        """A Twisted client endpoint string for this node."""
        host = self.host.replace(":", "\\:")
        return f"tcp:{host}:{self.port}"

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name.encode(), "host": self.host.encode(), "port": self.port}

    @classmethod
    def from_wire(cls, c: Any) -> Member:
        return cls(c.name.decode("utf-8", "replace"), c.host.decode("utf-8", "replace"), c.port)


@dataclass(frozen=True)
class Chain:
    """One chain: its id, its epoch, its members from head to tail."""

    chain_id: int
    epoch: int
    members: tuple[Member, ...]
    #: A node being added after the tail (state transfer in progress); it
    #: serves nothing until the master makes it the tail.
    joining: tuple[Member, ...] = ()

    @property
    def head(self) -> Member | None:
        return self.members[0] if self.members else None

    @property
    def tail(self) -> Member | None:
        return self.members[-1] if self.members else None

    def is_joining(self, name: str) -> bool:
        return any(m.name == name for m in self.joining)

    def index_of(self, name: str) -> int | None:
        for i, m in enumerate(self.members):
            if m.name == name:
                return i
        return None

    def predecessor_of(self, name: str) -> Member | None:
        if self.is_joining(name):
            return self.tail
        i = self.index_of(name)
        return self.members[i - 1] if i else None

    def successor_of(self, name: str) -> Member | None:
        """The next node down the chain (the joining node, for the tail)."""
        i = self.index_of(name)
        if i is None:
            return None
        if i + 1 >= len(self.members):
            return self.joining[0] if self.joining else None
        return self.members[i + 1]

    def to_wire(self) -> dict[str, Any]:
        return {
            "chain_id": self.chain_id,
            "epoch": self.epoch,
            "members": [m.to_wire() for m in self.members],
            "joining": [m.to_wire() for m in self.joining],
        }

    @classmethod
    def from_wire(cls, c: Any) -> Chain:
        return cls(
            c.chain_id,
            c.epoch,
            tuple(Member.from_wire(m) for m in c.members),
            tuple(Member.from_wire(m) for m in c.joining),
        )


@dataclass(frozen=True)
class ClusterConfig:
    """Everything the master tells the others."""

    version: int
    slots: tuple[int, ...]
    chains: tuple[Chain, ...]
    spares: tuple[Member, ...] = field(default=())

    def chain(self, chain_id: int) -> Chain | None:
        for c in self.chains:
            if c.chain_id == chain_id:
                return c
        return None

    def chain_for_key(self, key: bytes) -> Chain | None:
        """The chain that owns C{key}, or None if the map is empty."""
        if not self.slots:
            return None
        return self.chain(self.slots[slot_of(key, len(self.slots))])

    def chain_of_node(self, name: str) -> Chain | None:
        """The chain C{name} belongs to, as a member or as its joining node."""
        for c in self.chains:
            if c.index_of(name) is not None or c.is_joining(name):
                return c
        return None

    def slots_of(self, chain_id: int) -> list[int]:
        return [s for s, c in enumerate(self.slots) if c == chain_id]

    def to_frame(self) -> bytes:
        return wire.encode(
            wire.MessageType.CONFIG,
            version=self.version,
            slot_count=len(self.slots),
            slots=list(self.slots),
            chains=[c.to_wire() for c in self.chains],
            spares=[m.to_wire() for m in self.spares],
        )

    @classmethod
    def from_wire(cls, c: Any) -> ClusterConfig:
        return cls(
            c.version,
            tuple(c.slots),
            tuple(Chain.from_wire(x) for x in c.chains),
            tuple(Member.from_wire(m) for m in c.spares),
        )

    def to_json(self) -> dict[str, Any]:
        """The form `ckv status --json` prints."""
        return {
            "version": self.version,
            "slot_count": len(self.slots),
            "chains": [
                {
                    "id": c.chain_id,
                    "epoch": c.epoch,
                    "nodes": [m.name for m in c.members],
                    "members": [
                        {"name": m.name, "host": m.host, "port": m.port} for m in c.members
                    ],
                    "joining": [m.name for m in c.joining],
                    "head": c.head.name if c.head else None,
                    "tail": c.tail.name if c.tail else None,
                    "slots": _ranges(self.slots_of(c.chain_id)),
                }
                for c in self.chains
            ],
            "spares": [m.name for m in self.spares],
        }


def _ranges(slots: list[int]) -> list[list[int]]:
    """Compress a sorted list of slots into [first, last] ranges."""
    out: list[list[int]] = []
    for s in slots:
        if out and out[-1][1] == s - 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


EMPTY = ClusterConfig(0, (), ())
