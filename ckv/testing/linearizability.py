"""Linearizability checker for ckv key-value histories (standard library only).

The nemesis tests (fault injection against real processes, and the
deterministic simulation) record every client operation and then ask
:func:`check` whether the recorded history is linearizable with respect to a
sequential key-value map.

Model
-----
A map from ``bytes`` keys to ``bytes`` values; an absent key reads as
``None``. The operations are those of the client API (DESIGN.md section 3):

- ``get(key) -> bytes | None``
- ``put(key, value) -> None``
- ``delete(key) -> bool``: True iff the key existed (it is absent afterwards).
- ``cas(key, expected, new) -> bool``: applies iff the current value equals
  ``expected`` (``expected=None``: only if absent); ``new=None`` deletes on a
  match. True iff it applied.

History format
--------------
A history is any iterable of :class:`Operation` (fields are keyword-only)::

    Operation(
        client=3,            # process / worker id (ops of one client never overlap)
        kind="cas",          # "get" | "put" | "delete" | "cas"
        key=b"k",
        value=b"new",        # put: the value; cas: the new value (None = delete)
        expected=b"old",     # cas only
        call=12.5,           # invocation time (any monotonic clock, same for all ops)
        ret=12.7,            # completion time; None = no answer (timeout,
                             #   Unavailable, crash): the outcome is unknown
        result=True,         # get: bytes | None; delete/cas: bool; put: None;
                             #   ignored when ret is None
    )

Operation A precedes operation B in real time iff ``A.ret < B.call``; if
``A.ret == B.call`` the two count as concurrent (the lenient choice: equal
timestamps never cause a false alarm).

An operation whose outcome is unknown (``ret is None``) may have taken effect
at any single point after its call, with whatever result the model gives
there, or never. Its return time is treated as +infinity, which makes "never"
the same as "at the very end". An unknown ``get`` has no effect and is
dropped. :class:`Recorder` builds histories from a test's client calls.

Algorithm
---------
Every operation touches one key and keys are independent, so linearizability
is P-compositional: the history is split per key and each sub-history is
checked on its own (Horn & Kroening). Each sub-history is checked with the
Wing & Gong search as improved by Lowe and used by Porcupine: the call and
return events are sorted by time into a doubly linked list; a depth-first
search repeatedly picks, among the operations called before the first
pending return event, one whose recorded result agrees with the model,
linearizes it (unlinking its two events) and descends; on a dead end it
backtracks (relinking, "dancing links"). A cache of visited (set of
linearized operations as a bitset, model value) pairs prunes every
configuration already explored.

On top of that, all sound (each keeps some linearization whenever one
exists; a brute-force checker in the tests agrees on thousands of random
histories):

- Read-only moves are forced: a completed get, failed cas or delete that
  returned False which fits the current value is linearized at once, with
  no alternatives tried (it can always be moved to the front).
- Value abstraction: a value that no operation still to be placed reads or
  expects behaves like any other such value, so those are merged in the
  cached state.
- Unknown outcomes: known operations are tried first; a run of unknown
  operations is only placed if it matters to the known operation right after
  it (no no-ops, no blind write after the start of a run, no return to the
  value before the run); pending unknown operations with the same effect are
  interchangeable, so only one is tried; and a configuration is pruned when
  one with the same known operations and value but a subset of the unknown
  ones was already explored.

The search succeeds as soon as every operation with a known outcome is
linearized (the remaining unknown ones go at the end, i.e. never happened).
Linearizable histories of thousands of operations per key check in well
under a second. Proving a history NOT linearizable needs an exhaustive search
up to the failure, which can be slow when many unknown-outcome writes
overlap a small set of values; ``timeout`` bounds it (verdict ``ok=None``).
Workloads that write unique values check fastest and explain best.

When a key fails, the result reports the deepest linearization found (the
longest linearizable prefix), the model value after it, and the operations
that would have to come next, each with the reason it cannot.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

__all__ = ["KINDS", "Operation", "Recorder", "Result", "check"]

KINDS = ("get", "put", "delete", "cas")
_GET, _PUT, _DELETE, _CAS = range(4)
_CODES = {kind: code for code, kind in enumerate(KINDS)}
_BYTES_LIKE = (bytes, bytearray, memoryview)
# Stands for every written value that no get returns and no cas expects.
_UNOBSERVED = object()
_NO_RUN = object()


def _as_bytes(value: object, what: str, optional: bool = True) -> bytes | None:
    """Return ``value`` as bytes (or None when allowed), or raise TypeError."""
    if value is None and optional:
        return None
    if isinstance(value, _BYTES_LIKE):
        return bytes(value)
    raise TypeError(f"{what} must be bytes{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One client operation of a history (see the module docstring)."""

    client: int
    kind: str
    key: bytes
    value: bytes | None = None
    expected: bytes | None = None
    call: float
    ret: float | None
    result: object = None

    def __post_init__(self) -> None:
        """Validate the fields and normalise bytes-like values to bytes."""
        if self.kind not in _CODES:
            raise ValueError(f"unknown operation kind {self.kind!r}")
        object.__setattr__(self, "key", _as_bytes(self.key, "key", optional=False))
        object.__setattr__(self, "value", _as_bytes(self.value, "value"))
        object.__setattr__(self, "expected", _as_bytes(self.expected, "expected"))
        if self.kind == "put" and self.value is None:
            raise ValueError("put needs a value")
        if self.ret is not None and self.ret < self.call:
            raise ValueError(f"operation returns before its call: {self!r}")
        if self.ret is None:
            return
        if self.kind == "get":
            object.__setattr__(self, "result", _as_bytes(self.result, "get result"))
        elif self.kind in ("delete", "cas"):
            if not isinstance(self.result, bool):
                raise TypeError(f"{self.kind} result must be a bool, got {self.result!r}")

    @property
    def known(self) -> bool:
        """True if the operation completed (its result is known)."""
        return self.ret is not None

    def describe(self, t0: float = 0.0) -> str:
        """A one-line human-readable form; times are shown relative to ``t0``."""
        if self.kind == "get":
            args = f"{self.key!r}"
        elif self.kind == "put":
            args = f"{self.key!r}, {self.value!r}"
        elif self.kind == "delete":
            args = f"{self.key!r}"
        else:
            args = f"{self.key!r}, {self.expected!r}, {self.value!r}"
        if self.ret is None:
            outcome = "?? (unknown)"
            ret = "?"
        else:
            outcome = repr(self.result)
            ret = f"{self.ret - t0:.6f}"
        return (
            f"client {self.client}: {self.kind}({args}) -> {outcome} "
            f"[{self.call - t0:.6f} .. {ret}]"
        )

    def __str__(self) -> str:
        """Same as :meth:`describe` with absolute times."""
        return self.describe()


class Recorder:
    """Records client operations into a history (thread-safe).

    ``token = rec.invoke(client, kind, key, value=..., expected=...)`` before
    sending a request; then exactly one of ``rec.ok(token, result)`` (an
    answer arrived), ``rec.unknown(token)`` (timeout, Unavailable, crash: the
    outcome is unknown) or ``rec.fail(token)`` (a definite error: the
    operation certainly had no effect, so it is left out of the history).
    Operations still pending when :attr:`history` is read count as unknown.
    ``clock`` defaults to :func:`time.monotonic`.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Create an empty recorder using ``clock`` for timestamps."""
        self._clock = clock
        self._lock = threading.Lock()
        self._next = 0
        self._pending: dict[int, Operation] = {}
        self._done: dict[int, Operation] = {}

    def invoke(
        self,
        client: int,
        kind: str,
        key: bytes,
        value: bytes | None = None,
        expected: bytes | None = None,
    ) -> int:
        """Record the invocation of an operation; return a token for its completion."""
        now = self._clock()
        op = Operation(
            client=client, kind=kind, key=key, value=value, expected=expected,
            call=now, ret=None,
        )
        with self._lock:
            token = self._next
            self._next += 1
            self._pending[token] = op
        return token

    def _finish(self, token: int) -> Operation:
        with self._lock:
            try:
                return self._pending.pop(token)
            except KeyError:
                raise KeyError(f"unknown or already completed token {token!r}") from None

    def ok(self, token: int, result: object = None) -> Operation:
        """Record that the operation completed with ``result``; return the operation."""
        now = self._clock()
        op = self._finish(token)
        done = Operation(
            client=op.client, kind=op.kind, key=op.key, value=op.value,
            expected=op.expected, call=op.call, ret=now, result=result,
        )
        with self._lock:
            self._done[token] = done
        return done

    def unknown(self, token: int) -> Operation:
        """Record that no answer came: the operation may or may not have taken effect."""
        op = self._finish(token)
        with self._lock:
            self._done[token] = op
        return op

    def fail(self, token: int) -> None:
        """Record a definite failure: the operation had no effect; drop it."""
        self._finish(token)

    @property
    def history(self) -> list[Operation]:
        """All recorded operations in invocation order (pending ones as unknown)."""
        with self._lock:
            ops = {**self._pending, **self._done}
        return [ops[token] for token in sorted(ops)]


@dataclass
class Result:
    """The verdict of :func:`check`.

    ``ok`` is True (linearizable), False (not linearizable: ``key`` is the
    first bad key, ``bad_keys`` all of them) or None (the timeout expired
    before a verdict; ``unknown_keys`` are the keys left undecided).
    For a bad key, ``prefix`` is the longest linearization found, ``state``
    the key's value after it, and ``unplaced`` the operations that would have
    to come next, none of which fits. ``explanation`` says all that in text;
    ``str(result)`` gives it too.
    """

    ok: bool | None
    key: bytes | None = None
    explanation: str = ""
    prefix: list[Operation] = field(default_factory=list)
    state: bytes | None = None
    unplaced: list[Operation] = field(default_factory=list)
    bad_keys: list[bytes] = field(default_factory=list)
    unknown_keys: list[bytes] = field(default_factory=list)
    operations: int = 0
    keys: int = 0
    elapsed: float = 0.0

    def __str__(self) -> str:
        """The explanation (or a one-line summary when linearizable)."""
        return self.explanation


class _Timeout(Exception):
    """The deadline passed during a search."""


class _Entry:
    """A call or return event in the doubly linked event list."""

    __slots__ = ("op", "is_call", "match", "prev", "next")

    def __init__(self, op: int, is_call: bool) -> None:
        self.op = op
        self.is_call = is_call
        # For a call entry: its return entry (None for an unknown outcome).
        self.match: _Entry | None = None
        self.prev: _Entry | None = None
        self.next: _Entry | None = None


@dataclass
class _KeyOutcome:
    ok: bool | None
    prefix: list[int] = field(default_factory=list)
    state: bytes | None = None
    unplaced: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    note: str = ""


def _apply(op: Operation, state: bytes | None) -> tuple[bytes | None, object]:
    """Apply ``op`` to the value ``state``: return (new value, model result)."""
    kind = op.kind
    if kind == "get":
        return state, state
    if kind == "put":
        return op.value, None
    if kind == "delete":
        return None, state is not None
    if state == op.expected:
        return op.value, True
    return state, False


def _reason(op: Operation, state: bytes | None) -> str:
    """Why ``op`` cannot be linearized when the key holds ``state``."""
    _, model = _apply(op, state)
    if model == op.result or op.kind == "put":
        return "it fits here, but no continuation after it works"
    if op.kind == "get":
        return f"the value is {state!r}, but the get returned {op.result!r}"
    if op.kind == "delete":
        return f"the key is {'present' if state is not None else 'absent'}, " \
            f"so delete returns {model!r}, but it returned {op.result!r}"
    return f"the value is {state!r}, so cas returns {model!r}, but it returned {op.result!r}"


def _check_key(ops: list[Operation], deadline: float | None) -> _KeyOutcome:
    """Check the sub-history ``ops`` of one key (unknown gets already removed)."""
    n = len(ops)
    # Quick check with a clear message: a get must return a value some write wrote.
    written = {op.value for op in ops if op.kind in ("put", "cas") and op.value is not None}
    for i, op in enumerate(ops):
        if op.kind == "get" and op.known and op.result is not None and op.result not in written:
            return _KeyOutcome(
                ok=False, unplaced=[i],
                reasons=[f"no operation ever wrote {op.result!r}"],
                note="a get returned a value that was never written",
            )

    # Value abstraction: the model only ever compares the value with get
    # results and cas expectations (and with None), so a value that no
    # operation still to be linearized compares it with ("dead") behaves like
    # any other: the state is kept canonical by mapping dead values to one
    # token. ``watch[i]`` is the value op i compares with; ``observers``
    # counts, per value, the operations not yet linearized that compare with it.
    watch: list[bytes | None] = [
        op.result if op.kind == "get" and op.known
        else op.expected if op.kind == "cas" else None
        for op in ops
    ]
    observers: dict[bytes, int] = defaultdict(int)
    for value in watch:
        if value is not None:
            observers[value] += 1

    def abstract(value: bytes | None) -> object:
        return value if value is None or value in observers else _UNOBSERVED

    def canon(value: object) -> object:
        return value if value is None or observers.get(value) else _UNOBSERVED

    # Per-op specs for the hot loop: (code, value, expected, result, known).
    specs = [
        (
            _CODES[op.kind],
            abstract(op.value) if op.kind in ("put", "cas") else None,
            op.expected if op.kind == "cas" else None,
            op.result if op.known else None,
            op.known,
        )
        for op in ops
    ]
    # Known operations that never change the value wherever they fit: a get,
    # a delete that returned False, a cas that returned False (or that
    # replaced a value with itself).
    readonly = [
        op.known and (
            op.kind == "get"
            or (op.kind in ("delete", "cas") and op.result is False)
            or (op.kind == "cas" and op.expected == op.value)
        )
        for op in ops
    ]
    # Known and unknown operations get bits in separate bitsets.
    bits = [0] * n
    n_known = n_unknown = 0
    for i, op in enumerate(ops):
        if op.known:
            bits[i] = 1 << n_known
            n_known += 1
        else:
            bits[i] = 1 << n_unknown
            n_unknown += 1

    # Events: (time, 0=call/1=return, op). Calls sort before returns at equal
    # times. Unknown operations have no return event (it would be at +inf).
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.call, 0, i))
        if op.ret is not None:
            events.append((op.ret, 1, i))
    events.sort()
    head = _Entry(-1, False)
    calls: list[_Entry | None] = [None] * n
    prev = head
    for _, kind, i in events:
        entry = _Entry(i, kind == 0)
        if kind == 0:
            calls[i] = entry
        else:
            call_entry = calls[i]
            assert call_entry is not None
            call_entry.match = entry
        prev.next = entry
        entry.prev = prev
        prev = entry

    def step(spec: tuple, state: object) -> tuple[bool, object]:
        code, value, expected, result, known = spec
        if code == _GET:
            return (not known or result == state), state
        if code == _PUT:
            return True, value
        if code == _DELETE:
            return (not known or result == (state is not None)), None
        applies = state == expected
        return (not known or result == applies), (value if applies else state)

    def candidates(state: object) -> list[_Entry]:
        """Operations that may be linearized next: those called before the
        first pending return, known ones first. A known read-only one that
        fits is forced: if any order works, one with it first works (it can
        move to the front without changing what the others see), so it is
        the only one tried."""
        known: list[_Entry] = []
        unknown: list[_Entry] = []
        effects: set[tuple] = set()
        entry = head.next
        while entry is not None and entry.is_call:
            if entry.match is not None:
                if readonly[entry.op] and step(specs[entry.op], state)[0]:
                    return [entry]
                known.append(entry)
            else:
                # Pending unknown operations with the same effect are
                # interchangeable (no return time constrains them): try one.
                code, value, expected = specs[entry.op][:3]
                effect = (code, canon(value), expected)
                if effect not in effects:
                    effects.add(effect)
                    unknown.append(entry)
            entry = entry.next
        return known + unknown

    remaining_known = n_known
    state: object = None
    lin_known = 0  # bitset of linearized known operations
    lin_unknown = 0  # bitset of linearized unknown operations
    # The value before the current run of unknown operations (_NO_RUN when
    # the last operation linearized is a known one). A run must be useful:
    # every operation in it changes the value, no value in it is the one
    # before the run, a blind write (put, delete) can only start a run, and
    # the known operation after the run must behave differently than it
    # would without the run. Otherwise the run (or a prefix of it) could be
    # moved to the very end of the history, i.e. left out, changing nothing.
    run_start: object = _NO_RUN
    # Visited configurations: (lin_known, state, run_start) -> the
    # lin_unknown sets seen with it. Having linearized a superset of unknown
    # operations (which are optional) is never better, so such a
    # configuration is pruned.
    cache: dict[tuple[int, object, object], list[int]] = {}
    order: list[int] = []
    undo: list[tuple[_Entry, object, object]] = []
    best_order: list[int] = []
    best_known = -1

    frames: list[list] = [[candidates(state), 0]]
    steps = 0
    while True:
        if remaining_known == 0:
            return _KeyOutcome(ok=True, prefix=order[:])
        frame = frames[-1]
        cands, idx = frame
        descended = False
        while idx < len(cands):
            entry = cands[idx]
            idx += 1
            spec = specs[entry.op]
            ok, new_state = step(spec, state)
            if not ok:
                continue
            watched = watch[entry.op]
            if watched is not None:
                observers[watched] -= 1
            new_state = canon(new_state)
            bit = bits[entry.op]
            known = spec[4]
            prune = False
            if known:
                new_known = lin_known | bit
                new_unknown = lin_unknown
                new_run = _NO_RUN
                if run_start is not _NO_RUN:
                    ok, alt_state = step(spec, run_start)
                    # The run of unknown operations before it is useless?
                    prune = ok and canon(alt_state) == new_state
            else:
                new_known = lin_known
                new_unknown = lin_unknown | bit
                new_run = run_start
                if new_state == state:
                    prune = True  # a no-op
                elif run_start is _NO_RUN:
                    new_run = state
                elif spec[0] in (_PUT, _DELETE) or new_state == run_start:
                    prune = True  # makes the run so far useless
            if not prune:
                cache_key = (new_known, new_state, new_run)
                seen = cache.get(cache_key)
                if seen is None:
                    cache[cache_key] = [new_unknown]
                elif any(u & ~new_unknown == 0 for u in seen):
                    prune = True  # a configuration at least as good was explored
                else:
                    seen.append(new_unknown)
            if prune:
                if watched is not None:
                    observers[watched] += 1
                continue
            frame[1] = idx
            undo.append((entry, state, run_start))
            order.append(entry.op)
            state = new_state
            lin_known = new_known
            lin_unknown = new_unknown
            run_start = new_run
            # Lift the call entry and its return entry out of the list.
            entry.prev.next = entry.next
            if entry.next is not None:
                entry.next.prev = entry.prev
            match = entry.match
            if match is not None:
                remaining_known -= 1
                match.prev.next = match.next
                if match.next is not None:
                    match.next.prev = match.prev
                if n_known - remaining_known > best_known:
                    best_known = n_known - remaining_known
                    best_order = order[:]
            frames.append([candidates(state), 0])
            descended = True
            break
        if descended:
            steps += 1
            if deadline is not None and steps & 1023 == 0 and time.monotonic() > deadline:
                raise _Timeout
            continue
        # Dead end: backtrack (relink in reverse order of the lift).
        frames.pop()
        if not undo:
            break
        entry, state, run_start = undo.pop()
        order.pop()
        watched = watch[entry.op]
        if watched is not None:
            observers[watched] += 1
        match = entry.match
        if match is not None:
            lin_known &= ~bits[entry.op]
            remaining_known += 1
            match.prev.next = match
            if match.next is not None:
                match.next.prev = match
        else:
            lin_unknown &= ~bits[entry.op]
        entry.prev.next = entry
        if entry.next is not None:
            entry.next.prev = entry

    # Not linearizable. Report the deepest point reached: the value after
    # that prefix, and the known operations that would have to come next
    # (those called before the first pending return), none of which fits
    # there or leads anywhere.
    best_state: bytes | None = None
    for i in best_order:
        best_state, _ = _apply(ops[i], best_state)
    done = set(best_order)
    position = {(kind, i): pos for pos, (_, kind, i) in enumerate(events)}
    rest = [i for i in range(n) if i not in done and ops[i].known]
    first_return = min(position[(1, i)] for i in rest)
    unplaced = [i for i in rest if position[(0, i)] < first_return]
    unplaced.sort(key=lambda i: (ops[i].call, i))
    reasons = [_reason(ops[i], best_state) for i in unplaced]
    return _KeyOutcome(
        ok=False, prefix=best_order, state=best_state, unplaced=unplaced, reasons=reasons,
    )


def _explain(
    key: bytes, ops: list[Operation], outcome: _KeyOutcome, t0: float, show: int
) -> str:
    """Text for a non-linearizable key."""
    lines = [f"key {key!r}: not linearizable ({len(ops)} operations on this key)"]
    if outcome.note:
        lines.append(f"  {outcome.note}:")
    else:
        lines.append(
            f"  longest linearizable prefix: {len(outcome.prefix)} of {len(ops)} operations, "
            f"after which the value is {outcome.state!r}"
        )
        lines.append("  none of the operations that must come next can be placed:")
    for i, reason in zip(outcome.unplaced, outcome.reasons, strict=True):
        lines.append(f"    {ops[i].describe(t0)}")
        lines.append(f"      {reason}")
    if outcome.prefix:
        tail = outcome.prefix[-show:]
        skipped = len(outcome.prefix) - len(tail)
        lines.append(
            "  end of that prefix, in linearization order"
            + (f" ({skipped} earlier not shown):" if skipped else ":")
        )
        for i in tail:
            lines.append(f"    {ops[i].describe(t0)}")
    return "\n".join(lines)


def check(
    history: Iterable[Operation], timeout: float | None = None, show: int = 10
) -> Result:
    """Check that ``history`` is linearizable for the key-value model.

    ``timeout`` (seconds, for the whole check) bounds the search: when it
    runs out before a verdict, the result has ``ok=None``. ``show`` is how
    many operations of the longest prefix a failure explanation lists.
    """
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    ops = list(history)
    for op in ops:
        if not isinstance(op, Operation):
            raise TypeError(f"not an Operation: {op!r}")
    t0 = min((op.call for op in ops), default=0.0)
    per_key: dict[bytes, list[Operation]] = defaultdict(list)
    for op in ops:
        if op.kind == "get" and not op.known:
            continue  # no effect, no result: nothing to check
        per_key[op.key].append(op)
    keys = sorted(per_key)
    result = Result(ok=True, operations=len(ops), keys=len(keys))
    first_bad: tuple[bytes, list[Operation], _KeyOutcome] | None = None
    explanations: list[str] = []
    for n, key in enumerate(keys):
        key_ops = sorted(per_key[key], key=lambda op: op.call)
        try:
            if deadline is not None and time.monotonic() > deadline:
                raise _Timeout
            outcome = _check_key(key_ops, deadline)
        except _Timeout:
            result.unknown_keys = keys[n:]
            break
        if outcome.ok is False:
            result.bad_keys.append(key)
            explanations.append(_explain(key, key_ops, outcome, t0, show))
            if first_bad is None:
                first_bad = (key, key_ops, outcome)
    result.elapsed = time.monotonic() - start
    if first_bad is not None:
        key, key_ops, outcome = first_bad
        result.ok = False
        result.key = key
        result.prefix = [key_ops[i] for i in outcome.prefix]
        result.state = outcome.state
        result.unplaced = [key_ops[i] for i in outcome.unplaced]
        head = f"history NOT linearizable: bad keys {result.bad_keys!r}"
        if result.unknown_keys:
            head += f" (timed out before checking {len(result.unknown_keys)} keys)"
        result.explanation = "\n".join([head, *explanations])
    elif result.unknown_keys:
        result.ok = None
        result.key = result.unknown_keys[0]
        result.explanation = (
            f"unknown: the {timeout} s timeout expired while checking key {result.key!r}; "
            f"{len(keys) - len(result.unknown_keys)} of {len(keys)} keys were linearizable"
        )
    else:
        result.explanation = (
            f"linearizable: {len(ops)} operations on {len(keys)} keys "
            f"(checked in {result.elapsed:.3f} s)"
        )
    return result
