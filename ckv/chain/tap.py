"""
C{twistd ckv-node}: the command line of a replica, and the service it runs.

    twistd -n ckv-node --name n1 --listen tcp:7011:interface=127.0.0.1 \\
        --master tcp:127.0.0.1:7000 --data-dir ./ckv-data/n1 \\
        [--admin tcp:7021:interface=127.0.0.1] [--sync durable|replicated] \\
        [--advertise HOST:PORT] [--port-file PATH] [--session-ttl SECONDS]

L{makeService} only builds the service: sockets and LMDB are opened in
C{startService}, after twistd has daemonized.
"""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from ckv.portfile import check_host_port, check_name, check_role_endpoints

DEFAULT_MASTER = "tcp:127.0.0.1:7000"
#: Default --session-ttl (seconds): a day, far longer than any client timeout.
DEFAULT_SESSION_TTL = 86400.0

#: --sync modes and what they mean.
SYNC_MODES = {
    "durable": "fsync every batch before acknowledging it (the default)",
    "replicated": "no fsync per batch; LMDB is synced once a second and "
    "durability relies on the other replicas",
}


def _session_ttl(value: str) -> float:
    ttl = float(value)
    if not ttl >= 0 or ttl == float("inf"):
        raise ValueError(f"must be a number of seconds >= 0, not {value!r}")
    return ttl


class Options(usage.Options):
    synopsis = "--name NAME --listen ENDPOINT --data-dir DIR [options]"
    longdesc = (
        "Run a ckv node: one replica of one chain, storing its data in LMDB under "
        "--data-dir. It registers with the master under --name; a restarted node keeps "
        "its name and data directory and takes its old place in its chain. Endpoints are Twisted "
        "endpoint strings; a bare port number N means tcp:N:interface=127.0.0.1. "
        "Sync modes: " + "; ".join(f"{mode}: {doc}" for mode, doc in SYNC_MODES.items()) + "."
    )
    optParameters = [
        ["name", "n", None, "This node's name, unique in the cluster (required, <= 64 bytes)."],
        [
            "listen",
            "l",
            None,
            "Server endpoint for chain peers, the dispatcher and clients (required; "
            "tcp:0:interface=127.0.0.1 picks a free port).",
        ],
        ["master", "m", DEFAULT_MASTER, "Client endpoint of the master."],
        ["data-dir", "d", None, "Directory of this node's LMDB store (required)."],
        ["admin", "a", None, "Server endpoint of the admin console (default: no console)."],
        ["sync", "s", "durable", "Durability mode: durable or replicated."],
        [
            "advertise",
            None,
            None,
            "HOST:PORT other processes should use to reach this node (default: the "
            "--listen interface and the port actually bound).",
        ],
        [
            "port-file",
            None,
            None,
            'Write {"listen": PORT, "admin": PORT, "pid": PID} here once listening.',
        ],
        [
            "session-ttl",
            None,
            DEFAULT_SESSION_TTL,
            "Seconds a client session (what makes that client's retries exactly once) is "
            "kept after its last update; 0 keeps every session forever. Keep it far longer "
            "than any client's timeout.",
            _session_ttl,
        ],
    ]

    def postOptions(self) -> None:
        for option in ("name", "listen", "data-dir"):
            if self[option] is None:
                raise usage.UsageError(f"--{option} is required")
        error = check_name("name", self["name"])
        if error:
            raise usage.UsageError(error)
        if not self["data-dir"]:
            raise usage.UsageError("--data-dir must not be empty")
        check_role_endpoints(self, client=("master",))
        if self["sync"] not in SYNC_MODES:
            raise usage.UsageError(
                f"--sync: unknown mode {self['sync']!r}; choose one of " + ", ".join(SYNC_MODES)
            )
        if self["advertise"] is not None:
            error = check_host_port("advertise", self["advertise"])
            if error:
                raise usage.UsageError(error)


def serviceKwargs(options: Options) -> dict[str, Any]:
    """The keyword arguments of C{NodeService} for parsed C{options}."""
    return {
        "name": options["name"],
        "listen": options["listen"],
        "master": options["master"],
        "data_dir": options["data-dir"],
        "sync": options["sync"],
        "admin": options["admin"],
        "advertise": options["advertise"],
        "port_file": options["port-file"],
        "session_ttl": options["session-ttl"],
    }


def makeService(options: Options) -> Any:
    """Build (but do not start) the node's service."""
    from ckv.chain.service import NodeService

    return NodeService(**serviceKwargs(options))
