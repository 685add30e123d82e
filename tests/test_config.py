"""Tests for L{ckv.config}: the slot hash and the cluster configuration."""

from __future__ import annotations

import json
import random
import zlib

import pytest

from ckv import config, wire
from ckv.config import EMPTY, SLOT_COUNT, Chain, ClusterConfig, Member, slot_of

# -- slot_of -------------------------------------------------------------------

#: Fixed answers.  CRC-32 (IEEE, as zlib.crc32) of the key, modulo 1024.
#: Every client, dispatcher and master must agree on these forever: a change
#: of the hash moves every key to another chain.
KNOWN_SLOTS = [
    (b"", 0x00000000, 0),
    (b"a", 0xE8B7BE43, 579),
    (b"foo", 0x8C736521, 289),
    (b"hello", 0x3610A686, 646),
    (b"123456789", 0xCBF43926, 294),  # the standard CRC-32 check value
    (b"user:1000", 0x9F7417E3, 995),
    (bytes(range(256)), 0x29058C73, 115),
]


def test_slot_count():
    assert SLOT_COUNT == 1024


@pytest.mark.parametrize("key,crc,slot", KNOWN_SLOTS)
def test_slot_of_is_stable(key, crc, slot):
    assert zlib.crc32(key) == crc
    assert slot_of(key) == slot
    assert slot_of(key, 1024) == slot
    assert slot_of(key) == crc % 1024


def test_slot_of_other_slot_counts():
    assert slot_of(b"hello", 16) == 0x3610A686 % 16 == 6
    assert slot_of(b"123456789", 7) == 0xCBF43926 % 7 == 5
    assert slot_of(b"anything", 1) == 0


def test_slot_of_is_in_range():
    rng = random.Random(1)
    for _ in range(1000):
        key = rng.randbytes(rng.randrange(0, 40))
        assert 0 <= slot_of(key) < SLOT_COUNT


def test_slot_spread_is_even():
    rng = random.Random(424242)
    counts = [0] * SLOT_COUNT
    n = 100_000
    for _ in range(n):
        counts[slot_of(rng.randbytes(rng.randrange(1, 33)))] += 1
    mean = n / SLOT_COUNT  # about 97.7; the standard deviation is about 9.9
    assert min(counts) > 0.5 * mean, min(counts)
    assert max(counts) < 1.5 * mean, max(counts)
    assert max(counts) / min(counts) < 2.5


def test_slot_spread_of_sequential_keys():
    """Keys that differ only in a counter (the common case) spread too."""
    counts = [0] * SLOT_COUNT
    n = 100_000
    for i in range(n):
        counts[slot_of(b"user:%d" % i)] += 1
    mean = n / SLOT_COUNT
    assert min(counts) > 0.5 * mean
    assert max(counts) < 1.5 * mean


# -- fixtures ------------------------------------------------------------------


def m(name: str, port: int = 7000, host: str = "127.0.0.1") -> Member:
    return Member(name, host, port)


CHAIN0 = Chain(0, 5, (m("a", 7001), m("b", 7002), m("c", 7003)))
CHAIN1 = Chain(1, 9, (m("d", 7004), m("e", 7005)))
CHAIN2 = Chain(2, 1, (m("f", 7006),))
CHAIN3 = Chain(7, 2**64 - 1, ())
SPARES = (m("s1", 7100), Member("s2", "::1", 7101))


def slot_map(chain_ids, slot_count=SLOT_COUNT):
    return tuple(chain_ids[s * len(chain_ids) // slot_count] for s in range(slot_count))


CONFIG = ClusterConfig(
    version=17,
    slots=slot_map([0, 1, 2]),
    chains=(CHAIN0, CHAIN1, CHAIN2, CHAIN3),
    spares=SPARES,
)


# -- Member --------------------------------------------------------------------


def test_member_address_and_endpoint():
    assert m("a", 7001).address == "127.0.0.1:7001"
    assert m("a", 7001).endpoint() == "tcp:127.0.0.1:7001"
    assert Member("x", "::1", 7000).endpoint() == "tcp:\\:\\:1:7000"


# -- wire round trip -------------------------------------------------------------


def round_trip(cfg: ClusterConfig) -> ClusterConfig:
    frame = cfg.to_frame()
    t, body = wire.decode(frame)
    assert t == wire.MessageType.CONFIG
    # The compiled encoder agrees with the interpreted reference.
    assert wire.Frame.build(wire.Frame.parse(frame)) == frame
    return ClusterConfig.from_wire(body)


@pytest.mark.parametrize("cfg", [
    CONFIG,
    EMPTY,
    ClusterConfig(1, (0,) * SLOT_COUNT, (CHAIN2,)),
    ClusterConfig(2**64 - 1, slot_map([7, 1], 8), (CHAIN3, CHAIN1), SPARES),
    ClusterConfig(3, (), (), SPARES),
    ClusterConfig(4, slot_map(list(range(64))),
                  tuple(Chain(c, c, tuple(m(f"n{c}-{i}", 7000 + i) for i in range(3)))
                        for c in range(64))),
], ids=["several-chains", "empty", "one-chain", "edge", "spares-only", "64-chains"])
def test_round_trip(cfg):
    back = round_trip(cfg)
    assert back == cfg
    assert isinstance(back.slots, tuple)
    assert isinstance(back.chains, tuple)
    assert all(isinstance(c.members, tuple) for c in back.chains)


def test_round_trip_with_non_ascii_names():
    cfg = ClusterConfig(1, (0,), (Chain(0, 1, (Member("nœud-1", "hôte.example", 7000),)),))
    assert round_trip(cfg) == cfg


def test_to_frame_size():
    frame = CONFIG.to_frame()
    member_bytes = sum(1 + len(x.name) + 1 + len(x.host) + 2
                       for c in CONFIG.chains for x in c.members)
    spare_bytes = sum(1 + len(x.name.encode()) + 1 + len(x.host) + 2 for x in SPARES)
    assert len(frame) == (2 + 8 + 2 + 2 * SLOT_COUNT + 2 + len(CONFIG.chains) * (2 + 8 + 1 + 1)
                          + member_bytes + 2 + spare_bytes)


# -- lookups -------------------------------------------------------------------


def test_head_and_tail():
    assert CHAIN0.head == m("a", 7001)
    assert CHAIN0.tail == m("c", 7003)
    assert CHAIN2.head == CHAIN2.tail == m("f", 7006)
    assert CHAIN3.head is None and CHAIN3.tail is None


def test_predecessor_and_successor():
    assert CHAIN0.predecessor_of("a") is None
    assert CHAIN0.predecessor_of("b") == m("a", 7001)
    assert CHAIN0.predecessor_of("c") == m("b", 7002)
    assert CHAIN0.successor_of("a") == m("b", 7002)
    assert CHAIN0.successor_of("b") == m("c", 7003)
    assert CHAIN0.successor_of("c") is None
    assert CHAIN2.predecessor_of("f") is None
    assert CHAIN2.successor_of("f") is None
    for fn in (CHAIN0.predecessor_of, CHAIN0.successor_of, CHAIN3.successor_of):
        assert fn("nobody") is None
    assert CHAIN3.predecessor_of("nobody") is None


def test_index_of():
    assert [CHAIN0.index_of(n) for n in "abcx"] == [0, 1, 2, None]


def test_chain_lookups():
    assert CONFIG.chain(0) is CHAIN0
    assert CONFIG.chain(7) is CHAIN3
    assert CONFIG.chain(3) is None
    assert CONFIG.chain_of_node("e") is CHAIN1
    assert CONFIG.chain_of_node("s1") is None  # spares belong to no chain
    assert CONFIG.chain_of_node("nobody") is None


def test_chain_for_key():
    for key, _, slot in KNOWN_SLOTS:
        expected = CONFIG.chain(CONFIG.slots[slot])
        assert CONFIG.chain_for_key(key) is expected
    # b"a" is slot 579 of 1024: the second third of the map, chain 1.
    assert CONFIG.chain_for_key(b"a") is CHAIN1
    assert CONFIG.chain_for_key(b"") is CHAIN0
    # A map of another size hashes modulo its own length.
    small = ClusterConfig(1, (0, 1, 0, 1, 0, 1, 0), (CHAIN0, CHAIN1))
    assert small.chain_for_key(b"123456789") is CHAIN1  # 0xCBF43926 % 7 == 5


def test_chain_for_key_empty_map():
    assert EMPTY.chain_for_key(b"k") is None
    assert ClusterConfig(1, (), (CHAIN0,)).chain_for_key(b"k") is None


def test_chain_for_key_unknown_chain():
    cfg = ClusterConfig(1, (wire.NO_CHAIN,) * 4, (CHAIN0,))
    assert cfg.chain_for_key(b"k") is None


def test_slots_of():
    assert CONFIG.slots_of(0) == list(range(0, 342))
    assert CONFIG.slots_of(1) == list(range(342, 683))
    assert CONFIG.slots_of(2) == list(range(683, 1024))
    assert CONFIG.slots_of(7) == []


# -- JSON ----------------------------------------------------------------------


def test_to_json_contract():
    """`ckv status --json`: a `chains` list, each with id, epoch, nodes."""
    j = CONFIG.to_json()
    assert json.loads(json.dumps(j)) == j
    assert isinstance(j["chains"], list)
    assert [c["id"] for c in j["chains"]] == [0, 1, 2, 7]
    assert [c["epoch"] for c in j["chains"]] == [5, 9, 1, 2**64 - 1]
    assert [c["nodes"] for c in j["chains"]] == [["a", "b", "c"], ["d", "e"], ["f"], []]


def test_to_json_details():
    j = CONFIG.to_json()
    assert j["version"] == 17
    assert j["slot_count"] == SLOT_COUNT
    assert j["spares"] == ["s1", "s2"]
    c0, c1, c2, c3 = j["chains"]
    assert c0["head"] == "a" and c0["tail"] == "c"
    assert c2["head"] == c2["tail"] == "f"
    assert c3["head"] is None and c3["tail"] is None
    assert c0["members"][0] == {"name": "a", "host": "127.0.0.1", "port": 7001}
    assert c0["slots"] == [[0, 341]]
    assert c1["slots"] == [[342, 682]]
    assert c3["slots"] == []


def test_to_json_slot_ranges():
    cfg = ClusterConfig(1, (0, 0, 1, 0, 1, 1, 0), (Chain(0, 1, ()), Chain(1, 1, ())))
    j = cfg.to_json()
    assert j["chains"][0]["slots"] == [[0, 1], [3, 3], [6, 6]]
    assert j["chains"][1]["slots"] == [[2, 2], [4, 5]]
    assert config._ranges([]) == []


def test_empty_config():
    assert EMPTY.version == 0
    assert EMPTY.to_json() == {"version": 0, "slot_count": 0, "chains": [], "spares": []}
