"""
A fault-injection TCP proxy, run as its own process:

    python -m tests.proxy --port-file F --target-file T

It listens on an ephemeral loopback port (written to F as a port file) and
forwards every connection (L{twisted.protocols.portforward}) to the port
named in T, read at each new connection (so the target may start after the
proxy).  SIGUSR1 cuts every open connection at once (abortConnection, as a
network failure would); new connections are accepted as before.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import serverFromString
from twisted.protocols import portforward

from ckv.portfile import write_port_file

_open: set[portforward.Proxy] = set()


class ServerSide(portforward.ProxyServer):
    def connectionMade(self) -> None:
        try:
            with open(self.factory.target_file) as f:
                port = int(f.read().strip())
        except (OSError, ValueError):
            self.transport.loseConnection()
            return
        self.factory.port = port
        _open.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Any) -> None:
        _open.discard(self)
        super().connectionLost(reason)


class Factory(portforward.ProxyFactory):
    protocol = ServerSide

    def __init__(self, target_file: str) -> None:
        super().__init__("127.0.0.1", 0)
        self.target_file = target_file


def cut(*_: Any) -> None:
    for p in list(_open):
        p.transport.abortConnection()
        if p.peer is not None and p.peer.transport is not None:
            p.peer.transport.abortConnection()
    print(f"cut {len(_open)} connections", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--target-file", required=True)
    args = ap.parse_args()

    def started(port: Any) -> None:
        write_port_file(args.port_file, port.getHost().port, None)

    d = serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
        Factory(os.path.abspath(args.target_file))
    )
    d.addCallback(started)
    signal.signal(signal.SIGUSR1, lambda *a: reactor.callFromThread(cut))
    reactor.run()


if __name__ == "__main__":
    main()
