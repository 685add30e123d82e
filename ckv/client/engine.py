"""
Request correlation, retries and lanes: the client's logic, without sockets.

L{RequestEngine} turns an operation into a REQUEST frame, hands it to a
L{Path} (the session layer, which knows which connections are up), matches
REPLY frames to requests by request id, resends on silence, on retryable
statuses and on lost connections, and fails each request with
L{Unavailable} at its deadline.  Time comes from an injected
L{IReactorTime}, so tests drive it with L{twisted.internet.task.Clock}.

Exactly once: every update occupies a I{lane} while it is outstanding; a
retry resends the same lane and request id, so the chain recognises it and
returns the recorded result instead of applying it again.  Request ids come
from one strictly increasing counter per client, queries included (they use
lane 0).
"""

from __future__ import annotations

import heapq
import itertools
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from ckv import wire
from ckv.errors import ProtocolError, RequestError, TooLarge, Unavailable
from ckv.wire import Op, Status

#: Statuses after which the same request is sent again (after a backoff).
RETRYABLE = frozenset({Status.UNAVAILABLE, Status.NOT_HEAD, Status.NOT_TAIL, Status.STALE_EPOCH})
#: Statuses that are a result, not an error.
RESULTS = frozenset({Status.OK, Status.NOT_FOUND, Status.CAS_FAILED})
#: The lane of queries (they need no deduplication).
QUERY_LANE = 0

# Fixed offsets in a REQUEST frame body (see L{ckv.wire.Request}): version,
# type, client id (16), lane (4), request id (8), then the epoch (8) and the
# operation (1).  Direct mode reads the operation and stamps the epoch of the
# key's chain at each send, without re-encoding the frame.
_EPOCH_OFFSET = 2 + wire.CLIENT_ID_LEN + 4 + 8
_OP_OFFSET = _EPOCH_OFFSET + 8
_EPOCH = struct.Struct(">Q")


def request_op(frame: bytes) -> int:
    """The operation of an encoded REQUEST frame."""
    return frame[_OP_OFFSET]


def with_epoch(frame: bytes, epoch: int) -> bytes:
    """The encoded REQUEST frame C{frame} with its epoch field set to C{epoch}."""
    return frame[:_EPOCH_OFFSET] + _EPOCH.pack(epoch) + frame[_OP_OFFSET:]


class Path(Protocol):
    """Where the engine sends frames: implemented by the session layer."""

    def transmit(self, key: bytes, frame: bytes) -> bool:
        """
        Send the REQUEST frame for C{key} now if its path is ready (the
        dispatcher connected and the tail that will answer welcomed us).

        @return: True if sent, False if the path is not ready (the engine
            keeps the request and sends it on L{RequestEngine.path_ready}).
        """


def check_sizes(key: bytes, value: bytes | None = None, expected: bytes | None = None) -> None:
    """
    Check the limits of L{ckv.wire} before anything is sent.

    @raise TypeError: a key or value is not bytes.
    @raise TooLarge: the key or a value exceeds its limit.
    @raise RequestError: the key is empty.
    """
    # The common case in one expression (this runs for every request).
    if (
        type(key) is bytes
        and 0 < len(key) <= wire.MAX_KEY
        and (value is None or (type(value) is bytes and len(value) <= wire.MAX_VALUE))
        and expected is None
    ):
        return
    for name, v in (("key", key), ("value", value), ("expected value", expected)):
        if v is not None and not isinstance(v, bytes):
            raise TypeError(f"the {name} must be bytes, not {type(v).__name__}")
    if len(key) > wire.MAX_KEY:
        raise TooLarge(
            Status.TOO_LARGE, f"key of {len(key)} bytes exceeds the limit of {wire.MAX_KEY}"
        )
    if not key:
        raise RequestError(Status.BAD_REQUEST, "the empty key is not allowed")
    for name, v in (("value", value), ("expected value", expected)):
        if v is not None and len(v) > wire.MAX_VALUE:
            raise TooLarge(
                Status.TOO_LARGE,
                f"{name} of {len(v)} bytes exceeds the limit of {wire.MAX_VALUE}",
            )


#: An entry of the deadline heap: C{[when, tie-breaker, request, action]};
#: the tie-breaker (the order of arming, as the reactor orders calls due at
#: the same time) is unique, so the request is never compared.  Stopping a
#: timer empties the request's slot: the stale entry, skipped when it
#: reaches the top, then holds no reference to the request (its frame may
#: be large).
_Deadline = list[Any]


@dataclass(eq=False, slots=True)
class _Pending:
    """One outstanding request."""

    request_id: int
    lane: int
    op: Op
    key: bytes
    frame: bytes
    timeout: float
    interval: float
    backoff: float
    deferred: Deferred[Any] = field(repr=False)
    #: Turns a result status and value into what the Deferred fires with.
    result: Callable[[tuple[Status, bytes]], Any] | None = field(default=None, repr=False)
    #: When the request fails with Unavailable (clock seconds).
    expires_at: float = 0.0
    #: The one timer of a request: what is due next (resend, retry after a
    #: backoff, or expire, whichever comes first), as the entry in the
    #: engine's deadline heap that stands for it (None: nothing is due).
    timer: _Deadline | None = field(default=None, repr=False)
    #: True while the frame is out and we wait for its reply.
    sent: bool = False
    #: How many times the frame was handed to the transport.
    sends: int = 0


class RequestEngine:
    """
    Outstanding requests of one client: ids, lanes, deadlines, retries.

    @ivar attempt_interval: longest wait for a reply before the same frame is
        sent again (per request: at most a third of its timeout).
    @ivar min_backoff: first wait before resending after a retryable status
        or while the path is down; doubles up to C{max_backoff}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        client_id: bytes,
        path: Path,
        *,
        attempt_interval: float = 1.0,
        min_backoff: float = 0.05,
        max_backoff: float = 1.0,
    ) -> None:
        if len(client_id) != wire.CLIENT_ID_LEN:
            raise ValueError(f"a client id is {wire.CLIENT_ID_LEN} bytes")
        self.clock = clock
        self.client_id = client_id
        self.path = path
        self.attempt_interval = attempt_interval
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self._next_request_id = 1
        self._next_lane = 1
        self._free_lanes: list[int] = []
        self._pending: dict[int, _Pending] = {}
        # Timers: one heap of deadlines and one reactor call for the earliest,
        # not a reactor call per request (creating and cancelling one for
        # every request cost the client a tenth of its time under load).
        self._deadlines: list[_Deadline] = []
        self._armed = itertools.count()
        self._wakeup: IDelayedCall | None = None
        self._wakeup_at = math.inf

    # -- introspection (tests, status) -----------------------------------

    @property
    def outstanding(self) -> int:
        """Number of requests waiting for their outcome."""
        return len(self._pending)

    @property
    def lanes_in_use(self) -> set[int]:
        return {p.lane for p in self._pending.values() if p.lane != QUERY_LANE}

    # -- lanes --------------------------------------------------------------

    def _take_lane(self) -> int:
        if self._free_lanes:
            return heapq.heappop(self._free_lanes)
        lane = self._next_lane
        self._next_lane += 1
        return lane

    def _release_lane(self, lane: int) -> None:
        if lane != QUERY_LANE:
            heapq.heappush(self._free_lanes, lane)

    # -- submitting ---------------------------------------------------------

    def submit(
        self,
        op: Op,
        key: bytes,
        *,
        value: bytes | None = None,
        expected: bytes | None = None,
        has_expected: bool = False,
        timeout: float,
        result: Callable[[tuple[Status, bytes]], Any] | None = None,
    ) -> Deferred[Any]:
        """
        Send one request and wait for its outcome.

        @param result: if given, the Deferred fires with C{result((status,
            value))} instead (an exception it raises fails the Deferred):
            the caller's conversion without one more callback per request.
        @return: a Deferred firing with C{(status, value)} for a result
            status (OK, NOT_FOUND, CAS_FAILED), failing with
            L{RequestError}/L{TooLarge} for an error status, with
            L{Unavailable} when C{timeout} seconds pass without an answer.
        """
        lane = QUERY_LANE if op is Op.GET else self._take_lane()
        request_id = self._next_request_id
        self._next_request_id += 1
        frame = wire.request(
            self.client_id,
            lane,
            request_id,
            op,
            key,
            value=value,
            expected=expected,
            has_expected=has_expected,
        )
        p = _Pending(
            request_id=request_id,
            lane=lane,
            op=op,
            key=key,
            frame=frame,
            timeout=timeout,
            interval=max(0.001, min(self.attempt_interval, timeout / 3)),
            backoff=self.min_backoff,
            deferred=Deferred(lambda d: self._cancel(request_id)),
            result=result,
        )
        self._pending[request_id] = p
        p.expires_at = self.clock.seconds() + timeout
        self._attempt(p)
        return p.deferred

    def _attempt(self, p: _Pending) -> None:
        """Hand the frame to the path; arm the resend timer either way."""
        self._stop_timer(p)
        if self._pending.get(p.request_id) is not p:
            return
        if self.clock.seconds() >= p.expires_at:
            self._expire(p)
            return
        if self.path.transmit(p.key, p.frame):
            p.sent = True
            p.sends += 1
            self._arm(p, p.interval, self._silence)
        else:
            p.sent = False
            self._retry_later(p)

    def _arm(self, p: _Pending, delay: float, action: Callable[[_Pending], None]) -> None:
        """One timer per request: C{action} after C{delay}, or expiry if sooner."""
        now = self.clock.seconds()
        left = p.expires_at - now
        if left <= delay:
            action, delay = self._expire, max(0.0, left)
        due = now + delay
        entry = [due, next(self._armed), p, action]
        p.timer = entry
        heapq.heappush(self._deadlines, entry)
        if due < self._wakeup_at:
            self._schedule_wakeup(due, now)

    def _schedule_wakeup(self, due: float, now: float) -> None:
        self._cancel_wakeup()
        self._wakeup = self.clock.callLater(max(0.0, due - now), self._wake)
        self._wakeup_at = due

    def _cancel_wakeup(self) -> None:
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.cancel()
        self._wakeup, self._wakeup_at = None, math.inf

    def _wake(self) -> None:
        """Run every action that is due, in order; then wait for the next."""
        # Everything due by the time this call was scheduled for is due, even
        # if the clock reads a hair earlier (float rounding of the delay).
        now = max(self.clock.seconds(), self._wakeup_at)
        self._wakeup, self._wakeup_at = None, math.inf
        heap = self._deadlines
        try:
            while heap:
                entry = heap[0]
                p = entry[2]
                if p is None:
                    heapq.heappop(heap)  # stale: stopped or armed again since
                    continue
                if entry[0] > now:
                    break
                heapq.heappop(heap)
                entry[2] = p.timer = None
                entry[3](p)
        finally:
            # Wait for the earliest live deadline (sooner than one an action
            # may have armed meanwhile), even if an action raised.
            while heap and heap[0][2] is None:
                heapq.heappop(heap)
            if heap and heap[0][0] < self._wakeup_at:
                self._schedule_wakeup(heap[0][0], self.clock.seconds())

    def _silence(self, p: _Pending) -> None:
        self.log.debug(
            "no reply to request {request_id} (lane {lane}) yet, resending",
            request_id=p.request_id,
            lane=p.lane,
        )
        self._attempt(p)

    def _retry_later(self, p: _Pending) -> None:
        self._stop_timer(p)
        self._arm(p, p.backoff, self._attempt)
        p.backoff = min(p.backoff * 2, self.max_backoff)

    @staticmethod
    def _stop_timer(p: _Pending) -> None:
        # Its heap entry goes stale; it is dropped when it reaches the top.
        if p.timer is not None:
            p.timer[2] = None
        p.timer = None

    # -- events from the session layer -------------------------------------

    def path_ready(self) -> None:
        """A connection came up: send every request that is not out."""
        for p in sorted(self._pending.values(), key=lambda p: p.request_id):
            if not p.sent and self._pending.get(p.request_id) is p:
                self._attempt(p)

    def path_lost(self, affects: Callable[[bytes], bool] | None = None) -> None:
        """
        A connection went down: requests that were out on it (those whose key
        C{affects}, or all) will get no reply; send them again when possible.
        """
        for p in sorted(self._pending.values(), key=lambda p: p.request_id):
            if p.sent and (affects is None or affects(p.key)):
                p.sent = False
                if self._pending.get(p.request_id) is p:
                    self._attempt(p)

    def reply_received(self, request_id: int, status: int, value: bytes) -> bool:
        """
        A REPLY arrived (on any connection).

        @return: False if no outstanding request has this id (a late
            duplicate, ignored).
        """
        p = self._pending.get(request_id)
        if p is None:
            self.log.debug(
                "ignoring a reply to unknown request {request_id}", request_id=request_id
            )
            return False
        if status in RETRYABLE:
            self.log.debug(
                "request {request_id}: {status}, retrying",
                request_id=request_id,
                status=Status(status).name,
                message=value.decode("utf-8", "replace"),
            )
            p.sent = False
            self._retry_later(p)
            return True
        self._finish(p)
        if status in RESULTS:
            outcome: Any = (Status(status), value)
            if p.result is not None:
                try:
                    outcome = p.result(outcome)
                except Exception:
                    p.deferred.errback()
                    return True
            p.deferred.callback(outcome)
        elif status >= 16:
            message = value.decode("utf-8", "replace")
            cls = TooLarge if status == Status.TOO_LARGE else RequestError
            p.deferred.errback(cls(status, message))
        else:
            p.deferred.errback(ProtocolError(f"unknown status {status} in a reply"))
        return True

    def fail_all(self, exc: Exception) -> None:
        """Fail every outstanding request with C{exc} (the client closes)."""
        for p in list(self._pending.values()):
            # A callback of an earlier one may have cancelled this one.
            if self._pending.get(p.request_id) is p:
                self._finish(p)
                p.deferred.errback(exc)

    # -- endings ------------------------------------------------------------

    def _finish(self, p: _Pending) -> None:
        del self._pending[p.request_id]
        self._stop_timer(p)
        self._release_lane(p.lane)
        if not self._pending:
            # Nothing outstanding: no timer is needed (and none is left
            # behind in the reactor).
            self._deadlines.clear()
            self._cancel_wakeup()

    def _expire(self, p: _Pending) -> None:
        if self._pending.get(p.request_id) is not p:
            return
        self._finish(p)
        p.deferred.errback(
            Unavailable(
                f"no answer to {p.op.name} (request {p.request_id}) within {p.timeout:g} s; "
                "the outcome is unknown"
            )
        )

    def _cancel(self, request_id: int) -> None:
        p = self._pending.get(request_id)
        if p is not None:
            self._finish(p)
