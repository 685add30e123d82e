"""
C{twistd ckv-dispatcher}: the command line of the dispatcher, and the service
it runs.

    twistd -n ckv-dispatcher --listen tcp:7200:interface=127.0.0.1 \\
        --master tcp:127.0.0.1:7000 [--admin tcp:7201:interface=127.0.0.1] [--port-file PATH]

L{makeService} only builds the service: sockets are opened in
C{startService}, after twistd has daemonized.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from ckv.portfile import check_role_endpoints

DEFAULT_LISTEN = "tcp:7200:interface=127.0.0.1"
DEFAULT_MASTER = "tcp:127.0.0.1:7000"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run a ckv dispatcher: the clients' entry point. It learns the slot map from the "
        "master and routes each request to its chain's head (updates) or tail (queries). "
        "Endpoints are Twisted endpoint strings; a bare port number N means "
        "tcp:N:interface=127.0.0.1."
    )
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN, "Server endpoint for clients."],
        ["master", "m", DEFAULT_MASTER, "Client endpoint of the master."],
        ["admin", "a", None, "Server endpoint of the admin console (default: no console)."],
        [
            "port-file",
            None,
            None,
            'Write {"listen": PORT, "admin": PORT, "pid": PID} here once listening.',
        ],
    ]

    def postOptions(self) -> None:
        check_role_endpoints(self, client=("master",))


def serviceKwargs(options: Options) -> dict[str, Any]:
    """The keyword arguments of C{DispatcherService} for parsed C{options}."""
    return {
        "listen": options["listen"],
        "master": options["master"],
        "admin": options["admin"],
        "port_file": options["port-file"],
    }


def makeService(options: Options) -> Any:
    """Build (but do not start) the dispatcher's service."""
    from ckv.dispatcher.service import DispatcherService

    return DispatcherService(**serviceKwargs(options))
