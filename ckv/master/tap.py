"""
C{twistd ckv-master}: the command line of the master, and the service it runs.

    twistd -n ckv-master --listen tcp:7000:interface=127.0.0.1 \\
        --data-dir ./ckv-data/master [--admin tcp:7001:interface=127.0.0.1] \\
        [--chains 1] [--chain-length 3] [--heartbeat-interval 1] [--failure-timeout 5] \\
        [--port-file PATH]

L{makeService} only builds the service: sockets and LMDB are opened in
C{startService}, after twistd has daemonized.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from ckv.portfile import check_role_endpoints

DEFAULT_LISTEN = "tcp:7000:interface=127.0.0.1"
DEFAULT_DATA_DIR = "./ckv-data/master"


def _int(value: str) -> int:
    return int(value)


_int.coerceDoc = "An integer."  # type: ignore[attr-defined]


def _float(value: str) -> float:
    return float(value)


_float.coerceDoc = "A number of seconds."  # type: ignore[attr-defined]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the ckv master: it forms chains from registering nodes (a chain serves once "
        "it has --chain-length members), tells every node, dispatcher and client the "
        "configuration, and keeps its state in LMDB under --data-dir. A chain member "
        "silent for --failure-timeout is removed from its chain; a live spare extends a "
        "short chain by state transfer. Tails get read leases of "
        "max(failure-timeout - 2 x heartbeat-interval, heartbeat-interval). "
        "Endpoints are Twisted endpoint strings; a bare "
        "port number N means tcp:N:interface=127.0.0.1."
    )
    optParameters = [
        ["listen", "l", DEFAULT_LISTEN, "Server endpoint for nodes, dispatchers and clients."],
        ["data-dir", "d", DEFAULT_DATA_DIR, "Directory of the master's LMDB store."],
        ["admin", "a", None, "Server endpoint of the admin console (default: no console)."],
        ["chains", None, 1, "Number of chains to form.", _int],
        ["chain-length", None, 3, "Members per chain.", _int],
        ["heartbeat-interval", None, 1.0, "Seconds between node heartbeats.", _float],
        [
            "failure-timeout",
            None,
            5.0,
            "Seconds without a heartbeat before a chain member is removed.",
            _float,
        ],
        [
            "port-file",
            None,
            None,
            'Write {"listen": PORT, "admin": PORT, "pid": PID} here once listening.',
        ],
    ]

    def postOptions(self) -> None:
        check_role_endpoints(self)
        if not self["data-dir"]:
            raise usage.UsageError("--data-dir must not be empty")
        for option in ("chains", "chain-length"):
            if self[option] < 1:
                raise usage.UsageError(f"--{option} must be at least 1, not {self[option]}")
        for option in ("heartbeat-interval", "failure-timeout"):
            if not self[option] > 0:
                raise usage.UsageError(f"--{option} must be a positive number of seconds")
        if not self["failure-timeout"] > self["heartbeat-interval"]:
            raise usage.UsageError(
                f"--failure-timeout ({self['failure-timeout']:g}s) must be longer than "
                f"--heartbeat-interval ({self['heartbeat-interval']:g}s)"
            )


def serviceKwargs(options: Options) -> dict[str, Any]:
    """The keyword arguments of C{MasterService} for parsed C{options}."""
    return {
        "listen": options["listen"],
        "data_dir": options["data-dir"],
        "admin": options["admin"],
        "chains": options["chains"],
        "chain_length": options["chain-length"],
        "heartbeat_interval": options["heartbeat-interval"],
        "failure_timeout": options["failure-timeout"],
        "port_file": options["port-file"],
    }


def makeService(options: Options) -> Any:
    """Build (but do not start) the master's service."""
    from ckv.master.service import MasterService

    return MasterService(**serviceKwargs(options))
