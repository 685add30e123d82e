"""
The master's decisions, without I/O: which node belongs to which chain, in
which order, at which epoch, and the slot map.  Persisted as one JSON
document in the master's LMDB store by the service.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ckv.config import SLOT_COUNT, Chain, ClusterConfig, Member


@dataclass
class ChainState:
    """One chain as the master keeps it."""

    chain_id: int
    epoch: int = 0
    members: list[str] = field(default_factory=list)
    #: A chain serves once it has reached the target length the first time;
    #: before that its members wait (nothing to transfer yet).
    formed: bool = False
    #: A node receiving a state transfer from the tail, to become the tail.
    joining: str | None = None


class MasterState:
    """
    Membership of every chain.

    @param chains: number of chains.
    @param chain_length: members per chain; a chain starts serving once it
        has that many.
    """

    def __init__(
        self, chains: int = 1, chain_length: int = 3, slot_count: int = SLOT_COUNT
    ) -> None:
        if chains < 1 or chain_length < 1:
            raise ValueError("chains and chain_length must be at least 1")
        self.chain_length = chain_length
        self.slot_count = slot_count
        self.version = 0
        self.chains = [ChainState(i) for i in range(chains)]
        self.nodes: dict[str, Member] = {}
        self.spares: list[str] = []
        self.last_seen: dict[str, float] = {}
        #: The highest committed seq each node has reported: what a store
        #: coming back with less has lost (L{lost_data}).  Persisted with
        #: the configuration, so it holds across a master restart.
        self.reported: dict[str, int] = {}
        #: C{reported} grew since it was last persisted.
        self.reports_unsaved = False
        #: Tails being removed on request (admin C{remove}): they get no
        #: more read leases until they are gone.  Persisted, so a master
        #: restarted meanwhile finishes the removal.
        self.draining: set[str] = set()
        #: Chains seen with every member silent (a whole-chain stop).
        self._stopped: set[int] = set()

    # -- events ------------------------------------------------------------

    def register(
        self,
        name: str,
        host: str,
        port: int,
        now: float | None = None,
        chain_id: int | None = None,
        committed_seq: int | None = None,
    ) -> bool:
        """
        A node (re)registers.  Returns True if the configuration changed.

        A known node keeps its place (a restarted node comes back where it
        was, so a whole chain restarts in its previous order) -- unless it
        comes back without the data it had: a store that knows no chain
        (C{chain_id}) or that has less than it reported before
        (C{committed_seq}).  Such a node is taken out of its chain and
        rejoins as a spare, by state transfer; it must never serve from a
        store that lost acknowledged writes.  A new node joins the forming
        chain with the fewest members, or else waits as a spare.
        """
        self.last_seen[name] = time.monotonic() if now is None else now
        member = Member(name, host, port)
        old = self.nodes.get(name)
        lost = self.lost_data(name, chain_id, committed_seq)
        self._report(name, committed_seq)
        if old is not None:
            if lost and self.remove(name):
                self.nodes[name] = member
                self.reported.pop(name, None)
                return True
            if lost:
                # Kept anyway (the last member of its chain): what it has
                # now is what later registrations are judged by, or its
                # next clean restart would count as a loss again.
                self.reported[name] = committed_seq or 0
                self.reports_unsaved = True
            if old == member:
                return False
            self.nodes[name] = member
            for c in self.chains:
                if name in c.members or c.joining == name:
                    c.epoch += 1
            self.version += 1
            return True
        self.nodes[name] = member
        forming = [c for c in self.chains if not c.formed]
        if forming:
            chain = min(forming, key=lambda c: (len(c.members), c.chain_id))
            chain.members.append(name)
            chain.epoch += 1
            if len(chain.members) >= self.chain_length:
                chain.formed = True
        else:
            self.spares.append(name)
        self.version += 1
        return True

    def lost_data(self, name: str, chain_id: int | None, committed_seq: int | None) -> bool:
        """
        Would a registration of chain member C{name} with this store take it
        out of its chain?  True if the store knows no chain or another one,
        or has less than C{name} reported before.
        """
        chain = self.chain_of(name)
        if chain is None or not chain.formed or chain_id is None:
            return False
        if chain_id != chain.chain_id:
            return True
        return committed_seq is not None and committed_seq < self.reported.get(name, 0)

    def heartbeat(self, name: str, now: float, committed_seq: int | None = None) -> None:
        """A sign of life from a node (with how far its store has got)."""
        if name in self.nodes:
            self.last_seen[name] = now
            self._report(name, committed_seq)

    def _report(self, name: str, committed_seq: int | None) -> None:
        if committed_seq is not None and committed_seq > self.reported.get(name, 0):
            self.reported[name] = committed_seq
            self.reports_unsaved = True

    def grace(self, now: float) -> None:
        """
        Count every node as seen now: after a master restart nobody is
        blamed for the time the master itself was away.
        """
        for name in self.nodes:
            self.last_seen[name] = now

    def failed(self, now: float, timeout: float) -> list[str]:
        """
        Members of serving chains not heard from within C{timeout}, to be
        removed -- but only from a chain with a member heard from within
        C{timeout / 2}.  A chain none of whose members is alive is left as
        it is: that is a whole-chain stop, and the members come back in
        their old order (nobody is left to take over anyway).  Members
        stopped together fall silent a little apart (a heartbeat interval,
        the time between the kills), so "everyone silent for C{timeout}" is
        never seen at once; "nobody heard from for half of it" is.  When the
        first member of a stopped chain is back, the others get one more
        C{timeout} to come back too before they are replaced: members
        restarted one after the other keep their places instead of
        rejoining by state transfer.
        """
        out = []
        for c in self.chains:
            if not c.formed:
                continue
            ages = [now - self.last_seen.get(n, now) for n in c.members]
            silent = [n for n, age in zip(c.members, ages, strict=True) if age > timeout]
            if not any(age <= timeout / 2 for age in ages):
                self._stopped.add(c.chain_id)
            elif c.chain_id in self._stopped:
                self._stopped.discard(c.chain_id)
                for n in silent:
                    self.last_seen[n] = now
            else:
                out.extend(silent)
            if c.joining is not None and now - self.last_seen.get(c.joining, now) > timeout:
                out.append(c.joining)
        return out

    def remove(self, name: str) -> bool:
        """
        Take a failed node out of its chain (new epoch); it waits as a spare.
        The last member of a chain is never removed: it holds the chain's
        only copy, and the chain is unavailable until it is back.  A joining
        node that fails, or whose source (the tail) fails, goes back to the
        spares.  Returns True if the configuration changed.
        """
        for c in self.chains:
            if c.joining == name:
                self._abort_join(c)
                self.version += 1
                return True
        chain = self.chain_of(name)
        if chain is None or len(chain.members) <= 1:
            return False
        if chain.joining is not None and chain.members[-1] == name:
            self._abort_join(chain)
        chain.members.remove(name)
        chain.epoch += 1
        if name not in self.spares:
            self.spares.append(name)
        self.version += 1
        return True

    def forget(self, name: str) -> bool:
        """
        A planned removal (admin `remove NODE`): take the node out of its
        chain and forget it.  If it registers again it is a new node.
        Refused for the last member of a chain.
        """
        if name not in self.nodes:
            return False
        chain = self.chain_of(name)
        if chain is not None and len(chain.members) <= 1:
            return False
        if chain is not None or any(c.joining == name for c in self.chains):
            self.remove(name)
        if name in self.spares:
            self.spares.remove(name)
        del self.nodes[name]
        self.last_seen.pop(name, None)
        self.reported.pop(name, None)
        self.version += 1
        return True

    def _abort_join(self, chain: ChainState) -> None:
        assert chain.joining is not None
        if chain.joining not in self.spares:
            self.spares.append(chain.joining)
        chain.joining = None
        chain.epoch += 1

    def plan_joins(self, now: float, timeout: float) -> list[tuple[int, str]]:
        """
        Start extending every serving chain shorter than the target length
        with a live spare (one join per chain at a time).  Returns the
        (chain id, node) pairs started.
        """
        started = []
        # The chain that most needs a member first.
        for c in sorted(self.chains, key=lambda c: (len(c.members), c.chain_id)):
            if not c.formed or c.joining is not None or len(c.members) >= self.chain_length:
                continue
            live = [n for n in self.spares if now - self.last_seen.get(n, -1e18) <= timeout]
            if not live:
                continue
            name = live[0]
            self.spares.remove(name)
            c.joining = name
            c.epoch += 1
            self.version += 1
            started.append((c.chain_id, name))
        return started

    def joined(self, name: str, chain_id: int, epoch: int) -> bool:
        """
        A joining node holds the tail's snapshot and follows its updates:
        it becomes the tail (new epoch).  Stale reports are ignored.
        """
        for c in self.chains:
            if c.chain_id == chain_id and c.joining == name and c.epoch == epoch:
                c.members.append(name)
                c.joining = None
                # Its store is now the tail's snapshot, which may be behind
                # what its old store had reported: count from the next report.
                self.reported.pop(name, None)
                c.epoch += 1
                self.version += 1
                return True
        return False

    def chain_of(self, name: str) -> ChainState | None:
        for c in self.chains:
            if name in c.members:
                return c
        return None

    # -- views -------------------------------------------------------------

    def slots(self) -> tuple[int, ...]:
        n = len(self.chains)
        return tuple(s % n for s in range(self.slot_count))

    def config(self) -> ClusterConfig:
        """The configuration sent to everyone.  Forming chains have no members yet."""
        chains = []
        waiting = []
        for c in self.chains:
            if c.formed:
                joining = (self.nodes[c.joining],) if c.joining is not None else ()
                chains.append(
                    Chain(c.chain_id, c.epoch, tuple(self.nodes[n] for n in c.members), joining)
                )
            else:
                chains.append(Chain(c.chain_id, c.epoch, ()))
                waiting.extend(c.members)
        spares = tuple(self.nodes[n] for n in waiting + self.spares)
        return ClusterConfig(self.version, self.slots(), tuple(chains), spares)

    def describe(self) -> list[dict[str, Any]]:
        """Chains with their state, for the admin console."""
        out = []
        for c in self.chains:
            out.append(
                {
                    "id": c.chain_id,
                    "epoch": c.epoch,
                    "state": "serving"
                    if c.formed
                    else f"forming ({len(c.members)}/{self.chain_length})",
                    "members": list(c.members),
                    "joining": c.joining,
                }
            )
        return out

    # -- persistence -------------------------------------------------------

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": self.version,
                "chain_length": self.chain_length,
                "slot_count": self.slot_count,
                "chains": [
                    {
                        "id": c.chain_id,
                        "epoch": c.epoch,
                        "members": c.members,
                        "formed": c.formed,
                        "joining": c.joining,
                    }
                    for c in self.chains
                ],
                "nodes": {n: {"host": m.host, "port": m.port} for n, m in self.nodes.items()},
                "spares": self.spares,
                "reported": self.reported,
                "draining": sorted(self.draining),
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes, chains: int, chain_length: int) -> MasterState:
        """
        Reload a persisted state.  The persisted chain count wins over the
        flags (changing it would move keys between chains); a larger
        chain length applies to chains still forming.
        """
        d = json.loads(raw)
        state = cls(len(d["chains"]), chain_length, d.get("slot_count", SLOT_COUNT))
        state.version = d["version"]
        state.nodes = {n: Member(n, v["host"], v["port"]) for n, v in d["nodes"].items()}
        state.chains = [
            ChainState(c["id"], c["epoch"], list(c["members"]), c["formed"], c.get("joining"))
            for c in d["chains"]
        ]
        state.spares = list(d["spares"])
        # Absent from a state saved before reports were persisted.
        state.reported = {n: int(v) for n, v in d.get("reported", {}).items()}
        state.draining = set(d.get("draining", ()))
        return state
