"""The master's admin console commands: status, stats, chains, nodes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.protocol import ServerFactory

from ckv.admin import AdminCommand, admin_factory, format_kv, format_table

if TYPE_CHECKING:
    from ckv.master.service import MasterService


def _slots_summary(slots: list[int]) -> str:
    """A short description of a chain's slots: a range, or every Nth slot."""
    if not slots:
        return "none"
    if len(slots) == 1:
        return str(slots[0])
    step = slots[1] - slots[0]
    if all(b - a == step for a, b in zip(slots, slots[1:], strict=False)):
        if step == 1:
            return f"{slots[0]}-{slots[-1]}"
        return f"{len(slots)} ({slots[0]}, {slots[1]}, ... {slots[-1]})"
    return f"{len(slots)} slots"


def master_admin_factory(master: MasterService) -> ServerFactory:
    def status(args: list[str]) -> str:
        return format_kv(list(master.status().items()))

    def stats(args: list[str]) -> str:
        return format_kv(
            [
                ("config_version", master.state.version),
                ("subscribers", len(master.subscribers)),
                ("registered_nodes", len(master.state.nodes)),
            ]
        )

    def chains(args: list[str]) -> str:
        slots = master.state.slots()
        rows = [
            [
                str(c["id"]),
                str(c["epoch"]),
                c["state"],
                _slots_summary([s for s, owner in enumerate(slots) if owner == c["id"]]),
                (" -> ".join(c["members"]) or "-")
                + (f"  (+ {c['joining']} joining)" if c["joining"] else ""),
            ]
            for c in master.state.describe()
        ]
        return format_table(rows, ["chain", "epoch", "state", "slots", "members (head -> tail)"])

    def nodes(args: list[str]) -> str:
        now = master.clock()
        rows = []
        for name, m in sorted(master.state.nodes.items()):
            chain = master.state.chain_of(name)
            joining = [c.chain_id for c in master.state.chains if c.joining == name]
            if joining:
                place = f"chain {joining[0]} joining"
            elif chain is None:
                place = "spare"
            else:
                i = chain.members.index(name)
                role = "head" if i == 0 else "tail" if i == len(chain.members) - 1 else "middle"
                if len(chain.members) == 1:
                    role = "head+tail"
                place = f"chain {chain.chain_id} {role}"
            seen = master.state.last_seen.get(name)
            age = f"{now - seen:.1f}s" if seen is not None else "-"
            rows.append([name, f"{m.host}:{m.port}", place, age])
        return format_table(rows, ["node", "address", "place", "last seen"])

    def remove(args: list[str]) -> str:
        return master.planned_remove(args[0])

    return admin_factory(
        "master",
        [
            AdminCommand(
                "status", "status", "listen port, config version, counts", status, max_args=0
            ),
            AdminCommand("stats", "stats", "counters", stats, max_args=0),
            AdminCommand(
                "chains", "chains", "every chain, its epoch and members", chains, max_args=0
            ),
            AdminCommand(
                "remove",
                "remove NODE",
                "take NODE out of its chain and forget it (a tail first lets its read "
                "lease expire); if it registers again it is a new node",
                remove,
                min_args=1,
                max_args=1,
            ),
            AdminCommand(
                "nodes", "nodes", "every known node, its place and last contact", nodes, max_args=0
            ),
        ],
    )
