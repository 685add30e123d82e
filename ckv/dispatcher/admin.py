"""The dispatcher's admin console commands: status, stats."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.protocol import ServerFactory

from ckv.admin import AdminCommand, admin_factory, format_kv

if TYPE_CHECKING:
    from ckv.dispatcher.service import DispatcherService


def dispatcher_admin_factory(d: DispatcherService) -> ServerFactory:
    def status(args: list[str]) -> str:
        return format_kv(list(d.status().items()))

    def stats(args: list[str]) -> str:
        return format_kv(list(d.stats().items()))

    return admin_factory(
        "dispatcher",
        [
            AdminCommand(
                "status", "status", "master link, configuration, node links", status, max_args=0
            ),
            AdminCommand("stats", "stats", "requests routed and refused", stats, max_args=0),
        ],
    )
