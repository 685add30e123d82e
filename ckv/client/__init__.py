"""
The ckv client library.

Twisted: C{d = connect(reactor, "tcp:127.0.0.1:7200")} gives a L{Client}
whose C{get}, C{put}, C{delete}, C{cas} and C{close} return Deferreds.
Synchronous code: C{with BlockingClient("tcp:127.0.0.1:7200") as c: ...}.
L{fetch_config} asks a master or a dispatcher for the configuration.
"""

from ckv.client.api import Client, connect, fetch_config
from ckv.client.blocking import BlockingClient

__all__ = ["BlockingClient", "Client", "connect", "fetch_config"]
