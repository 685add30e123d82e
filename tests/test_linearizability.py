"""Tests for ckv.testing.linearizability: hand-written, randomized and cross-checked histories."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

import pytest

from ckv.testing.linearizability import Operation, Recorder, Result, check

K = b"k"


def op(
    client: int,
    kind: str,
    call: float,
    ret: float | None,
    result: object = None,
    *,
    key: bytes = K,
    value: bytes | None = None,
    expected: bytes | None = None,
) -> Operation:
    """Shorthand for an Operation."""
    return Operation(
        client=client, kind=kind, key=key, value=value, expected=expected,
        call=call, ret=ret, result=result,
    )


def put(c: int, call: float, ret: float | None, value: bytes, key: bytes = K) -> Operation:
    """A put operation."""
    return op(c, "put", call, ret, key=key, value=value)


def get(c: int, call: float, ret: float | None, result: bytes | None, key: bytes = K) -> Operation:
    """A get operation."""
    return op(c, "get", call, ret, result, key=key)


def delete(
    c: int, call: float, ret: float | None, result: bool | None, key: bytes = K
) -> Operation:
    """A delete operation."""
    return op(c, "delete", call, ret, result, key=key)


def cas(
    c: int, call: float, ret: float | None, expected: bytes | None, new: bytes | None,
    result: bool | None, key: bytes = K,
) -> Operation:
    """A cas operation."""
    return op(c, "cas", call, ret, result, key=key, value=new, expected=expected)


def assert_ok(history: list[Operation]) -> Result:
    """Check that ``history`` is linearizable."""
    res = check(history)
    assert res.ok is True, res.explanation
    return res


def assert_bad(history: list[Operation], key: bytes = K) -> Result:
    """Check that ``history`` is not linearizable, blaming ``key``."""
    res = check(history)
    assert res.ok is False, res.explanation
    assert res.key == key
    assert res.unplaced, res.explanation
    assert repr(key) in res.explanation
    return res


# --- hand-written histories -------------------------------------------------


def test_empty_history() -> None:
    res = assert_ok([])
    assert res.keys == 0 and res.operations == 0


def test_sequential_put_get() -> None:
    assert_ok([
        get(0, 0, 1, None),
        put(0, 2, 3, b"a"),
        get(1, 4, 5, b"a"),
        put(1, 6, 7, b"b"),
        get(0, 8, 9, b"b"),
    ])


def test_stale_read_after_completed_put() -> None:
    res = assert_bad([
        put(0, 0, 1, b"a"),
        put(0, 2, 3, b"b"),
        get(1, 4, 5, b"a"),
    ])
    assert [o.kind for o in res.unplaced] == ["get"]
    assert res.state == b"b"
    assert len(res.prefix) == 2


def test_concurrent_put_get_may_see_either() -> None:
    base = [put(0, 0, 1, b"a"), put(1, 2, 6, b"b")]
    assert_ok([*base, get(2, 3, 4, b"a")])
    assert_ok([*base, get(2, 3, 4, b"b")])


def test_read_of_value_never_written() -> None:
    res = assert_bad([put(0, 0, 1, b"a"), get(1, 0.5, 2, b"zzz")])
    assert "never written" in res.explanation


def test_read_from_the_future() -> None:
    # b"a" is written, but only after the read returned.
    assert_bad([get(0, 0, 1, b"a"), put(1, 2, 3, b"a")])


def test_touching_intervals_count_as_concurrent() -> None:
    assert_ok([get(0, 0, 1, b"a"), put(1, 1, 2, b"a")])


def test_two_concurrent_cas_both_succeed() -> None:
    res = assert_bad([
        put(0, 0, 1, b"a"),
        cas(1, 2, 4, b"a", b"b", True),
        cas(2, 2.5, 4.5, b"a", b"c", True),
    ])
    assert all(o.kind == "cas" for o in res.unplaced)
    assert "cas returns False" in res.explanation


def test_two_concurrent_cas_one_succeeds() -> None:
    assert_ok([
        put(0, 0, 1, b"a"),
        cas(1, 2, 4, b"a", b"b", True),
        cas(2, 2.5, 4.5, b"a", b"c", False),
        get(0, 5, 6, b"b"),
    ])


def test_cas_failure_consistent() -> None:
    assert_ok([
        put(0, 0, 1, b"a"),
        cas(1, 2, 3, b"x", b"y", False),
        cas(1, 4, 5, None, b"y", False),  # not absent
        get(0, 6, 7, b"a"),
    ])


def test_cas_failure_inconsistent() -> None:
    assert_bad([put(0, 0, 1, b"a"), cas(1, 2, 3, b"a", b"b", False)])


def test_cas_failure_explained_by_concurrent_write() -> None:
    assert_ok([
        put(0, 0, 1, b"a"),
        put(2, 1.5, 3.5, b"z"),
        cas(1, 2, 3, b"a", b"b", False),
    ])


def test_cas_success_inconsistent() -> None:
    assert_bad([put(0, 0, 1, b"a"), cas(1, 2, 3, b"x", b"b", True)])


def test_cas_expected_none_and_delete_on_match() -> None:
    assert_ok([
        cas(0, 0, 1, None, b"a", True),
        cas(1, 2, 3, None, b"b", False),
        cas(0, 4, 5, b"a", None, True),  # delete on match
        get(1, 6, 7, None),
        delete(0, 8, 9, False),
    ])
    assert_bad([cas(0, 0, 1, b"a", None, True), get(1, 2, 3, None)])


def test_delete_true_on_absent_key() -> None:
    assert_bad([delete(0, 0, 1, True)])
    assert_bad([put(0, 0, 1, b"a"), delete(0, 2, 3, True), delete(1, 4, 5, True)])


def test_delete_semantics_ok() -> None:
    assert_ok([
        delete(0, 0, 1, False),
        put(0, 2, 3, b"a"),
        delete(1, 4, 5, True),
        get(0, 6, 7, None),
        delete(1, 8, 9, False),
    ])


def test_read_after_delete_sees_old_value() -> None:
    assert_bad([put(0, 0, 1, b"a"), delete(0, 2, 3, True), get(1, 4, 5, b"a")])


def test_unknown_put_observed_by_later_reads() -> None:
    assert_ok([
        put(0, 0, 1, b"a"),
        put(1, 2, None, b"b"),
        get(2, 10, 11, b"b"),
        get(0, 12, 13, b"b"),
    ])


def test_unknown_put_observed_then_old_value_again() -> None:
    res = assert_bad([
        put(0, 0, 1, b"a"),
        put(1, 2, None, b"b"),
        get(2, 10, 11, b"b"),
        get(0, 12, 13, b"a"),
    ])
    assert [o.result for o in res.unplaced] == [b"a"]


def test_unknown_put_never_observed() -> None:
    assert_ok([
        put(0, 0, 1, b"a"),
        put(1, 2, None, b"b"),
        get(2, 10, 11, b"a"),
        get(0, 12, 13, b"a"),
    ])


def test_unknown_put_cannot_take_effect_before_its_call() -> None:
    assert_bad([get(0, 0, 1, b"b"), put(1, 2, None, b"b")])


def test_unknown_cas_and_delete_take_effect_with_model_result() -> None:
    # The unknown cas applied (the reads see b"b").
    assert_ok([put(0, 0, 1, b"a"), cas(1, 2, None, b"a", b"b", None), get(2, 5, 6, b"b")])
    # It cannot have applied: the value was never b"x".
    assert_bad([put(0, 0, 1, b"a"), cas(1, 2, None, b"x", b"b", None), get(2, 5, 6, b"b")])
    # An unknown delete that took effect.
    assert_ok([put(0, 0, 1, b"a"), delete(1, 2, None, None), get(2, 5, 6, None)])


def test_unknown_result_is_ignored() -> None:
    # ret=None: whatever sits in result does not count.
    assert_ok([put(0, 0, 1, b"a"), delete(1, 2, None, True), get(2, 5, 6, b"a")])


def test_history_with_timeouts_only() -> None:
    res = assert_ok([
        put(0, 0, None, b"a"),
        get(1, 1, None, None),
        cas(2, 2, None, b"a", b"b", None),
        delete(3, 3, None, None),
        put(4, 4, None, b"c", key=b"other"),
    ])
    assert res.operations == 5


def test_many_unknown_writes_stay_fast() -> None:
    history = [put(0, 0, 1, b"init")]
    for i in range(200):
        history.append(put(1 + i % 7, 2 + i, None, b"lost%d" % i))
    for i in range(300):
        history.append(get(100, 1000 + 2 * i, 1001 + 2 * i, b"init"))
    start = time.monotonic()
    assert_ok(history)
    assert time.monotonic() - start < 5


def test_multi_key_history_reports_the_bad_key() -> None:
    history = []
    for i, key in enumerate([b"a", b"b", b"c", b"d"]):
        history += [put(i, 0, 1, b"x", key=key), get(i, 2, 3, b"x", key=key)]
    history += [put(9, 4, 5, b"y", key=b"c"), get(8, 6, 7, b"x", key=b"c")]
    res = assert_bad(history, key=b"c")
    assert res.bad_keys == [b"c"]
    assert all(o.key == b"c" for o in res.prefix + res.unplaced)


def test_multi_key_history_reports_every_bad_key() -> None:
    history = [put(0, 0, 1, b"x", key=b"b"), get(1, 2, 3, None, key=b"b")]
    history += [put(0, 0, 1, b"x", key=b"a"), get(1, 2, 3, None, key=b"a")]
    history += [put(0, 0, 1, b"x", key=b"ok"), get(1, 2, 3, b"x", key=b"ok")]
    res = check(history)
    assert res.ok is False
    assert res.key == b"a"
    assert res.bad_keys == [b"a", b"b"]


def test_new_read_old_read_inversion() -> None:
    base = [put(0, 0, 1, b"old"), put(1, 2, 20, b"new")]
    # A read sees the new value, a later read (another client) the old one.
    res = assert_bad([*base, get(2, 3, 4, b"new"), get(3, 5, 6, b"old")])
    assert "b'new'" in res.explanation
    # In the other order it is fine.
    assert_ok([*base, get(2, 3, 4, b"old"), get(3, 5, 6, b"new")])
    # And it is fine if the two reads overlap.
    assert_ok([*base, get(2, 3, 5.5, b"new"), get(3, 5, 6, b"old")])


def test_explanation_is_useful() -> None:
    history = [put(0, float(i), i + 0.5, b"v%d" % i) for i in range(30)]
    history.append(get(1, 100, 101, b"v3"))
    res = check(history, show=5)
    assert res.ok is False
    text = str(res)
    assert "longest linearizable prefix: 30 of 31" in text
    assert "get(b'k') -> b'v3'" in text
    assert "the value is b'v29'" in text
    assert "25 earlier not shown" in text
    assert len(res.prefix) == 30 and res.state == b"v29"


def test_timeout_returns_unknown() -> None:
    # 30 fully concurrent puts followed by two reads that no order explains:
    # the search has to try exponentially many subsets before giving up.
    n = 30
    history = [put(i, i * 0.01, 100 + i * 0.01, b"v%d" % i) for i in range(n)]
    history += [get(99, 200, 201, b"v0"), get(99, 202, 203, b"v1")]
    history += [put(0, 0, 1, b"x", key=b"a-fine-key")]
    start = time.monotonic()
    res = check(history, timeout=0.5)
    elapsed = time.monotonic() - start
    assert res.ok is None, res.explanation
    assert res.key == K
    assert res.unknown_keys == [K]
    assert "timeout" in res.explanation
    assert elapsed < 3


def test_timeout_still_reports_a_bad_key_found_first() -> None:
    n = 30
    history = [put(i, i * 0.01, 100 + i * 0.01, b"v%d" % i) for i in range(n)]
    history += [get(99, 200, 201, b"v0"), get(99, 202, 203, b"v1")]
    history += [put(0, 0, 1, b"x", key=b"a"), get(0, 2, 3, None, key=b"a")]
    res = check(history, timeout=0.3)
    assert res.ok is False
    assert res.key == b"a"
    assert res.unknown_keys == [K]


# --- validation and the Recorder ---------------------------------------------


def test_operation_validation() -> None:
    with pytest.raises(ValueError):
        op(0, "scan", 0, 1)
    with pytest.raises(ValueError):
        op(0, "get", 2, 1)
    with pytest.raises(ValueError):
        op(0, "put", 0, 1)
    with pytest.raises(TypeError):
        op(0, "cas", 0, 1, "yes", expected=b"a", value=b"b")
    with pytest.raises(TypeError):
        op(0, "get", 0, 1, "text")
    with pytest.raises(TypeError):
        check([("not", "an", "op")])  # type: ignore[list-item]
    o = op(0, "get", 0, 1, bytearray(b"x"), key=bytearray(b"k"))  # type: ignore[arg-type]
    assert o.result == b"x" and o.key == b"k" and isinstance(o.key, bytes)
    assert "get(b'k') -> b'x'" in str(o)


def test_recorder() -> None:
    now = [0.0]

    def clock() -> float:
        now[0] += 1.0
        return now[0]

    rec = Recorder(clock=clock)
    t1 = rec.invoke(1, "put", b"k", b"a")
    t2 = rec.invoke(2, "get", b"k")
    t3 = rec.invoke(3, "cas", b"k", b"a", expected=None)
    t4 = rec.invoke(4, "delete", b"k")
    rec.invoke(5, "put", b"k", b"z")
    done = rec.ok(t1)
    assert (done.call, done.ret) == (1.0, 6.0)
    rec.ok(t2, b"a")
    rec.unknown(t3)
    rec.fail(t4)
    with pytest.raises(KeyError):
        rec.ok(t4, True)
    history = rec.history
    assert [o.client for o in history] == [1, 2, 3, 5]
    assert [o.ret for o in history] == [6.0, 7.0, None, None]  # t5 still pending
    assert history[1].result == b"a"
    assert check(history).ok is True


def test_recorder_default_clock() -> None:
    rec = Recorder()
    tok = rec.invoke(0, "put", b"k", b"v")
    rec.ok(tok, None)
    tok = rec.invoke(0, "get", b"k")
    rec.ok(tok, b"v")
    tok = rec.invoke(1, "get", b"k")
    rec.ok(tok, None)  # stale: after the put completed
    res = check(rec.history)
    assert res.ok is False


# --- randomized: linearizable by construction ------------------------------------


def simulate(
    rng: random.Random,
    n_ops: int,
    keys: list[bytes],
    clients: int,
    p_unknown: float = 0.0,
    values: int = 0,
) -> list[Operation]:
    """A history of ``clients`` sequential clients on a linearizable map.

    Each operation gets a random interval and a linearization point inside
    it; results come from applying the operations to a sequential model in
    linearization-point order. ``values`` > 0 draws written values from that
    many (to make cas succeed often); 0 writes unique values. An unknown
    operation takes effect (inside its original interval) or not, at random.
    """
    clock = [rng.uniform(0, 1) for _ in range(clients)]
    planned: list[tuple[float, int, dict]] = []
    written: dict[bytes, list[bytes]] = {k: [] for k in keys}
    counter = itertools.count()
    for n in range(n_ops):
        c = min(range(clients), key=lambda i: clock[i])
        call = clock[c] + rng.expovariate(4.0)
        ret = call + rng.expovariate(1.0)
        clock[c] = ret
        key = rng.choice(keys)
        kind = rng.choices(["get", "put", "delete", "cas"], [4, 3, 1, 2])[0]
        spec: dict = dict(client=c, kind=kind, key=key, call=call, ret=ret)
        new = b"%d" % rng.randrange(values) if values else b"v%d" % next(counter)
        if kind == "put":
            spec["value"] = new
        elif kind == "cas":
            pool = [None, *written[key][-3:]]
            spec["expected"] = rng.choice(pool)
            spec["value"] = None if rng.random() < 0.1 else new
        if kind in ("put", "cas") and spec["value"] is not None:
            written[key].append(spec["value"])
        unknown = kind != "get" and rng.random() < p_unknown
        applied = not unknown or rng.random() < 0.5
        if unknown:
            spec["ret"] = None
        lin = rng.uniform(call, ret)
        planned.append((lin if applied else float("inf"), n, spec))
    planned.sort(key=lambda p: (p[0], p[1]))
    model: dict[bytes, bytes | None] = {}
    history: list[tuple[int, Operation]] = []
    for lin, n, spec in planned:
        if lin == float("inf"):
            history.append((n, Operation(**spec)))
            continue
        key = spec["key"]
        cur = model.get(key)
        kind = spec["kind"]
        if kind == "get":
            result: object = cur
        elif kind == "put":
            model[key] = spec["value"]
            result = None
        elif kind == "delete":
            result = cur is not None
            model[key] = None
        else:
            result = cur == spec["expected"]
            if result:
                model[key] = spec["value"]
        history.append((n, Operation(**spec, result=result if spec["ret"] else None)))
    history.sort(key=lambda p: p[0])
    return [o for _, o in history]


@pytest.mark.parametrize("seed", range(40))
def test_random_linearizable_histories_pass(seed: int) -> None:
    rng = random.Random(seed)
    history = simulate(
        rng, n_ops=rng.randrange(20, 300), keys=[b"a", b"b", b"c"][: 1 + seed % 3],
        clients=rng.randrange(1, 9), p_unknown=0.1 if seed % 2 else 0.0,
        values=[0, 2, 4][seed % 3],
    )
    res = check(history, timeout=30)
    assert res.ok is True, res.explanation


def _known_gets(history: list[Operation]) -> list[int]:
    return [i for i, o in enumerate(history) if o.kind == "get" and o.known]


@pytest.mark.parametrize("seed", range(20))
def test_random_history_with_a_never_written_read_fails(seed: int) -> None:
    rng = random.Random(1000 + seed)
    history = simulate(rng, 200, [b"a", b"b", b"c"], 6, p_unknown=0.05, values=3)
    i = rng.choice(_known_gets(history))
    bad = history[i]
    history[i] = Operation(
        client=bad.client, kind="get", key=bad.key, call=bad.call, ret=bad.ret,
        result=b"never-written",
    )
    res = check(history, timeout=30)
    assert res.ok is False
    assert res.key == bad.key
    assert history[i] in res.unplaced


@pytest.mark.parametrize("seed", range(20))
def test_random_history_with_a_read_from_the_future_fails(seed: int) -> None:
    # The value was written, but only after everything else: the search (not
    # the never-written shortcut) must find the contradiction.
    rng = random.Random(2000 + seed)
    history = simulate(rng, 200, [b"a", b"b"], 6, p_unknown=0.05, values=3)
    i = rng.choice(_known_gets(history))
    bad = history[i]
    history[i] = Operation(
        client=bad.client, kind="get", key=bad.key, call=bad.call, ret=bad.ret,
        result=b"future",
    )
    end = max(o.ret or o.call for o in history) + 1
    history.append(put(99, end, end + 1, b"future", key=bad.key))
    res = check(history, timeout=30)
    assert res.ok is False
    assert res.key == bad.key
    assert "longest linearizable prefix" in res.explanation


# --- randomized: cross-check against brute force on small histories ----------------


def brute_force(history: list[Operation]) -> bool:
    """Linearizability by enumeration (for tiny single-key histories)."""
    ops = [o for o in history if o.known or o.kind != "get"]
    unknown = [i for i, o in enumerate(ops) if not o.known]
    known = [i for i, o in enumerate(ops) if o.known]
    inf = float("inf")
    for r in range(len(unknown) + 1):
        for chosen in itertools.combinations(unknown, r):
            subset = known + list(chosen)
            for perm in itertools.permutations(subset):
                if _valid(ops, perm, inf):
                    return True
    return False


def _valid(ops: list[Operation], perm: tuple[int, ...], inf: float) -> bool:
    # Real-time order: if a returned before b was called, a comes first.
    for x in range(len(perm)):
        for y in range(x + 1, len(perm)):
            a, b = ops[perm[x]], ops[perm[y]]
            if (b.ret if b.ret is not None else inf) < a.call:
                return False
    state: bytes | None = None
    for i in perm:
        o = ops[i]
        state, res = _model_step(o, state)
        if o.known and o.kind != "put" and res != o.result:
            return False
    return True


def _model_step(o: Operation, state: bytes | None) -> tuple[bytes | None, object]:
    """The sequential model: (new value, result) of ``o`` on value ``state``."""
    if o.kind == "get":
        return state, state
    if o.kind == "put":
        return o.value, None
    if o.kind == "delete":
        return None, state is not None
    if state == o.expected:
        return o.value, True
    return state, False


def reference_check(history: list[Operation]) -> bool:
    """Plain Wing & Gong search with memoization and no other pruning."""
    ops = [o for o in history if o.known or o.kind != "get"]
    failed: set[tuple[frozenset[int], bytes | None]] = set()

    def search(remaining: frozenset[int], state: bytes | None) -> bool:
        if not any(ops[i].known for i in remaining):
            return True  # unknown operations left over did not take effect
        if (remaining, state) in failed:
            return False
        first_ret = min(ops[i].ret for i in remaining if ops[i].ret is not None)
        for i in remaining:
            o = ops[i]
            if o.call > first_ret:
                continue
            new_state, res = _model_step(o, state)
            if o.known and o.kind != "put" and res != o.result:
                continue
            if search(remaining - {i}, new_state):
                return True
        failed.add((remaining, state))
        return False

    return search(frozenset(range(len(ops))), None)


def random_small_history(rng: random.Random) -> list[Operation]:
    """A random (usually not linearizable) history of up to 6 operations."""
    vals = [None, b"a", b"b"]
    history = []
    for _ in range(rng.randrange(1, 7)):
        call = rng.uniform(0, 10)
        ret = None if rng.random() < 0.2 else call + rng.uniform(0, 4)
        kind = rng.choice(["get", "put", "delete", "cas"])
        if kind == "get":
            history.append(get(0, call, ret, rng.choice(vals)))
        elif kind == "put":
            history.append(put(0, call, ret, rng.choice([b"a", b"b"])))
        elif kind == "delete":
            history.append(delete(0, call, ret, rng.random() < 0.5))
        else:
            history.append(
                cas(0, call, ret, rng.choice(vals), rng.choice(vals), rng.random() < 0.5)
            )
    return history


def assert_agrees(
    make: Callable[[random.Random], list[Operation]],
    oracle: Callable[[list[Operation]], bool],
    seed: int,
    runs: int,
    least_of_each: int,
) -> None:
    """check() gives the oracle's verdict on C{runs} histories from C{make}."""
    rng = random.Random(seed)
    verdicts = {True: 0, False: 0}
    for _ in range(runs):
        history = make(rng)
        expected = oracle(history)
        res = check(history)
        assert res.ok is expected, (history, res.explanation)
        verdicts[expected] += 1
    # Both verdicts are well represented.
    assert min(verdicts.values()) > least_of_each, verdicts


def test_agrees_with_brute_force() -> None:
    assert_agrees(random_small_history, brute_force, seed=7, runs=1500, least_of_each=300)


def perturbed_history(rng: random.Random) -> list[Operation]:
    """A simulated history (up to ~30 operations, many unknown) with some
    results changed at random: linearizable or not."""
    history = simulate(
        rng, rng.randrange(5, 30), [K], rng.randrange(2, 6), p_unknown=0.3,
        values=rng.choice([1, 2, 3]),
    )
    for _ in range(rng.randrange(0, 3)):
        i = rng.randrange(len(history))
        o = history[i]
        if not o.known or o.kind == "put":
            continue
        if o.kind == "get":
            result: object = rng.choice([None, b"0", b"1", b"2"])
        else:
            result = not o.result
        history[i] = Operation(
            client=o.client, kind=o.kind, key=o.key, value=o.value, expected=o.expected,
            call=o.call, ret=o.ret, result=result,
        )
    return history


def test_agrees_with_reference_on_medium_histories() -> None:
    assert_agrees(perturbed_history, reference_check, seed=11, runs=400, least_of_each=80)


# --- performance -----------------------------------------------------------------


def test_bench_2000_ops_5_keys_concurrency_8() -> None:
    rng = random.Random(42)
    history = simulate(rng, 2000, [b"k%d" % i for i in range(5)], 8, values=0)
    start = time.monotonic()
    res = check(history, timeout=60)
    elapsed = time.monotonic() - start
    assert res.ok is True, res.explanation
    assert elapsed < 10, elapsed


def test_bench_3000_ops_one_key_with_unknowns() -> None:
    rng = random.Random(43)
    history = simulate(rng, 3000, [b"k"], 8, p_unknown=0.02, values=4)
    start = time.monotonic()
    res = check(history, timeout=60)
    elapsed = time.monotonic() - start
    assert res.ok is True, res.explanation
    assert elapsed < 10, elapsed
