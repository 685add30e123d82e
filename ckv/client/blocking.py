"""
The blocking client: L{BlockingClient}, for ordinary synchronous code.

It runs a Twisted reactor in a background daemon thread (started once per
process and reactor, shared by every BlockingClient) and waits for each
Deferred of a L{ckv.client.api.Client} with a L{threading.Event}.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from twisted.internet.defer import maybeDeferred
from twisted.python.failure import Failure

from ckv.client.api import Client, connect
from ckv.config import ClusterConfig
from ckv.errors import Unavailable

T = TypeVar("T")

#: Extra seconds to wait for the reactor thread beyond a request's own
#: deadline (which always fires first unless the reactor is stuck).
GRACE = 5.0

_lock = threading.Lock()
_threads: dict[int, threading.Thread] = {}


def reactor_thread(reactor: Any) -> threading.Thread | None:
    """The thread this module started to run C{reactor}, if any."""
    return _threads.get(id(reactor))


def ensure_running(reactor: Any) -> None:
    """
    Run C{reactor} in a daemon thread unless it already runs (ours, or one
    run by the application in some other thread).
    """
    with _lock:
        thread = _threads.get(id(reactor))
        if thread is not None and thread.is_alive():
            return
        if getattr(reactor, "running", False):
            return
        thread = threading.Thread(
            target=reactor.run,
            kwargs={"installSignalHandlers": False},
            name="ckv-reactor",
            daemon=True,
        )
        _threads[id(reactor)] = thread
        thread.start()


def call_blocking(reactor: Any, wait: float, f: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    """
    Call C{f} in the reactor thread and wait for its (Deferred) result.

    @raise Unavailable: nothing came back within C{wait} seconds.
    """
    if threading.current_thread() is reactor_thread(reactor):
        raise RuntimeError("BlockingClient cannot be used from the reactor thread")
    done = threading.Event()
    box: list[Any] = []

    def start() -> None:
        def keep(result: Any) -> None:
            box.append(result)
            done.set()

        maybeDeferred(f, *a, **kw).addBoth(keep)

    reactor.callFromThread(start)
    if not done.wait(wait):
        raise Unavailable(f"the reactor thread did not answer within {wait:g} s")
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


class BlockingClient:
    """
    A ckv client for synchronous code: the methods of L{Client}, returning
    plain values and raising L{ckv.errors.CkvError} subclasses.

    @param endpoint: the dispatcher, a Twisted client endpoint string (with
        C{direct}: a dispatcher or the master).
    @param timeout: deadline of connecting and of every request, in seconds.
    @param reactor: the reactor to run in the background (default: the
        global one).
    @param direct: take only the configuration from C{endpoint} and send
        each request straight to the head or tail of its key's chain.
    """

    def __init__(
        self, endpoint: str, timeout: float = 10.0, *, reactor: Any = None, direct: bool = False
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._reactor = reactor
        self.timeout = timeout
        ensure_running(reactor)
        self.direct = direct
        self._client: Client = call_blocking(
            reactor, timeout + GRACE, connect, reactor, endpoint, timeout, direct=direct
        )

    @property
    def config(self) -> ClusterConfig:
        """The latest cluster configuration."""
        return self._client.config

    @property
    def client(self) -> Client:
        """The underlying Twisted client (use it only from the reactor thread)."""
        return self._client

    def _call(self, f: Callable[..., Any], *a: Any, timeout: float | None = None) -> Any:
        wait = (self.timeout if timeout is None else timeout) + GRACE
        kw = {} if timeout is None else {"timeout": timeout}
        return call_blocking(self._reactor, wait, f, *a, **kw)

    def get(self, key: bytes, *, timeout: float | None = None) -> bytes | None:
        """The value of C{key}, or None if it is absent."""
        return self._call(self._client.get, key, timeout=timeout)

    def put(self, key: bytes, value: bytes, *, timeout: float | None = None) -> None:
        """Set C{key} to C{value}."""
        self._call(self._client.put, key, value, timeout=timeout)

    def delete(self, key: bytes, *, timeout: float | None = None) -> bool:
        """Remove C{key}; True if it existed."""
        return self._call(self._client.delete, key, timeout=timeout)

    def cas(
        self, key: bytes, expected: bytes | None, new: bytes | None, *, timeout: float | None = None
    ) -> bool:
        """Compare and set (C{expected}=None: absent; C{new}=None: delete)."""
        return self._call(self._client.cas, key, expected, new, timeout=timeout)

    def close(self) -> None:
        """Close the session (the shared reactor thread keeps running)."""
        if not self._client.closed:
            call_blocking(self._reactor, GRACE + 5.0, self._client.close)

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
