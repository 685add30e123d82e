"""The node's admin console commands: status, stats, get KEY."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory

from ckv.admin import KEY_HELP, AdminCommand, admin_factory, format_key, format_kv, parse_key

if TYPE_CHECKING:
    from ckv.chain.service import NodeService


def node_admin_factory(node: NodeService) -> ServerFactory:
    def status(args: list[str]) -> str:
        return format_kv(list(node.status().items()))

    def stats(args: list[str]) -> str:
        return format_kv(list(node.stats().items()))

    def get(args: list[str]) -> str:
        key = parse_key(args[0])
        assert node.store is not None
        value = node.store.get(key)
        if value is None:
            return f"(not found) {format_key(key)}"
        return format_key(value)

    def digest(args: list[str]) -> Deferred[str]:
        # committed_seq: the last update in the data digested (same snapshot).
        return node.digest().addCallback(
            lambda r: format_kv([("keys", r[0]), ("sha256", r[1]), ("committed_seq", r[2])])
        )

    return admin_factory(
        f"node {node.name}",
        [
            AdminCommand(
                "status", "status", "role, chain, epoch, seqs and links", status, max_args=0
            ),
            AdminCommand("stats", "stats", "counters and storage figures", stats, max_args=0),
            AdminCommand(
                "get",
                "get KEY",
                f"this replica's own committed copy of KEY ({KEY_HELP})",
                get,
                min_args=1,
                max_args=1,
            ),
            AdminCommand(
                "digest",
                "digest",
                "key count and a SHA-256 of every committed key and value (compare replicas)",
                digest,
                max_args=0,
            ),
        ],
    )
