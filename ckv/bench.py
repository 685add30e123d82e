"""
ckv bench: throughput and latency of a running cluster.

Keeps CONCURRENCY requests in flight for DURATION seconds through the Twisted
client (one connection, pipelined), and reports operations per second, the
50th, 99th and 99.9th percentile latency, how many requests failed (errors)
or got no answer in time (unavailable), and the operations per second of
each chain (by the chain that owns each key).

Through the dispatcher by default; with --direct the client takes only the
configuration from --connect (a dispatcher or the master) and sends updates
to the head and reads to the tail of each key's chain itself.

Workloads:
  write   put to random keys among KEYS
  read    get random keys among KEYS (preloaded with puts first; the preload
          is reported separately)
  mixed   a get with probability READ_RATIO, else a put (also preloaded)

A progress line is printed on stderr every second; --json prints the result
as one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ckv.argtypes import positive, ratio

DESCRIPTION = __doc__.split("\n", 2)[2] if __doc__ else ""

WORKLOADS = ("write", "read", "mixed")


# -- statistics: plain functions ------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """
    The C{p}th percentile (0 < p <= 100) of C{sorted_values} (ascending) by
    the nearest-rank method: the smallest value such that at least p% of the
    values are less than or equal to it.  0.0 for an empty list.
    """
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} is not between 0 and 100")
    n = len(sorted_values)
    if n == 0:
        return 0.0
    # The epsilon absorbs float error: 99.9% of 1000 is rank 999, not 1000.
    rank = max(1, math.ceil(p * n / 100.0 - 1e-9))
    return float(sorted_values[min(rank, n) - 1])


def rate(count: int, seconds: float) -> float:
    """Events per second; 0.0 when no time has passed."""
    return count / seconds if seconds > 0 else 0.0


@dataclass
class Recorder:
    """Latencies (in seconds) of the successful operations, and failure counts."""

    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    unavailable: int = 0
    #: Successful operations per chain id (keys whose chain is known).
    per_chain: dict[int, int] = field(default_factory=dict)

    @property
    def ops(self) -> int:
        return len(self.latencies)

    def success(self, seconds: float, chain: int | None = None) -> None:
        self.latencies.append(seconds)
        if chain is not None:
            self.per_chain[chain] = self.per_chain.get(chain, 0) + 1

    def failure(self, unavailable: bool) -> None:
        if unavailable:
            self.unavailable += 1
        else:
            self.errors += 1


def summarize(recorder: Recorder, elapsed: float, **meta: Any) -> dict[str, Any]:
    """The result object of a phase (what --json prints)."""
    lat = sorted(recorder.latencies)
    result: dict[str, Any] = dict(meta)
    result.update(
        ops=recorder.ops,
        ops_per_s=round(rate(recorder.ops, elapsed), 1),
        p50_ms=round(percentile(lat, 50) * 1000, 3),
        p99_ms=round(percentile(lat, 99) * 1000, 3),
        p999_ms=round(percentile(lat, 99.9) * 1000, 3),
        max_ms=round((lat[-1] if lat else 0.0) * 1000, 3),
        errors=recorder.errors,
        unavailable=recorder.unavailable,
        duration_s=round(elapsed, 3),
    )
    if recorder.per_chain:
        result["per_chain"] = {
            str(c): round(rate(n, elapsed), 1) for c, n in sorted(recorder.per_chain.items())
        }
    return result


def format_result(result: dict[str, Any], label: str = "") -> str:
    head = f"{label}: " if label else ""
    return (
        f"{head}{result['ops']} ops in {result['duration_s']:.2f}s = "
        f"{result['ops_per_s']:.1f} ops/s; latency p50 {result['p50_ms']:.2f} ms, "
        f"p99 {result['p99_ms']:.2f} ms, p99.9 {result['p999_ms']:.2f} ms, "
        f"max {result['max_ms']:.2f} ms; errors {result['errors']}, "
        f"unavailable {result['unavailable']}"
    ) + format_per_chain(result)


def format_per_chain(result: dict[str, Any]) -> str:
    """The per-chain line (with a leading newline), or '' without chain counts."""
    per_chain = result.get("per_chain")
    if not per_chain:
        return ""
    total = sum(per_chain.values()) or 1.0
    parts = [
        f"chain {c} {v:.1f} ops/s ({100.0 * v / total:.1f}%)" for c, v in per_chain.items()
    ]
    return "\n  per chain: " + ", ".join(parts)


def progress_line(elapsed: float, ops: int, ops_last_second: float, rec: Recorder) -> str:
    return (
        f"[{elapsed:5.1f}s] {ops:>9} ops  {ops_last_second:>9.0f} ops/s  "
        f"errors {rec.errors}  unavailable {rec.unavailable}"
    )


def make_key(i: int) -> bytes:
    return b"bench-%08d" % i


# -- arguments ---------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The bench flags (the caller adds --connect and --timeout)."""
    p.add_argument("--workload", "-w", choices=WORKLOADS, default="write",
                   help="what to measure (default: %(default)s)")
    p.add_argument("--concurrency", type=positive(int), default=32, metavar="N",
                   help="requests in flight (default: %(default)s)")
    p.add_argument("--keys", type=positive(int), default=10000, metavar="N",
                   help="size of the key space (default: %(default)s)")
    p.add_argument("--value-size", type=positive(int), default=100, metavar="BYTES",
                   help="bytes per value (default: %(default)s)")
    p.add_argument("--duration", type=positive(float), default=10.0, metavar="S",
                   help="seconds to measure (default: %(default)s)")
    p.add_argument("--read-ratio", type=ratio, default=0.5, metavar="R",
                   help="fraction of gets in the mixed workload (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")


def _chain_of(client: Any, key: bytes) -> int | None:
    """The id of the chain that owns C{key} in the client's configuration."""
    config = getattr(client, "config", None)
    if config is None:
        return None
    chains = config.chains
    if len(chains) == 1 and config.slots:
        return chains[0].chain_id  # the only chain owns every slot
    chain = config.chain_for_key(key)
    return chain.chain_id if chain is not None else None


# -- the run -----------------------------------------------------------------------


class _Run:
    def __init__(self, reactor: Any, client: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.client = client
        self.args = args
        self.rng = random.Random(args.seed)
        self.value = os.urandom(args.value_size)
        self.stopping = False

    def _choose(self) -> tuple[bytes, Callable[[], Any]]:
        key = make_key(self.rng.randrange(self.args.keys))
        workload = self.args.workload
        read = workload == "read" or (
            workload == "mixed" and self.rng.random() < self.args.read_ratio
        )
        if read:
            return key, lambda: self.client.get(key, timeout=self.args.timeout)
        return key, lambda: self.client.put(key, self.value, timeout=self.args.timeout)

    async def phase(
        self, rec: Recorder, next_op: Callable[[], tuple[bytes, Callable[[], Any]] | None]
    ) -> float:
        """Keep C{concurrency} operations going until C{next_op} returns None; the elapsed time."""
        from twisted.internet.defer import Deferred, fail
        from twisted.internet.defer import TimeoutError as DeferTimeout
        from twisted.internet.task import LoopingCall

        from ckv.errors import Unavailable

        # Plain callbacks, not a coroutine per operation: the client's CPU
        # is part of what this measures, so the loop itself stays cheap.
        finished: Deferred[None] = Deferred()
        running = [self.args.concurrency]
        perf_counter = time.perf_counter
        timeouts = (Unavailable, DeferTimeout, TimeoutError)

        # launch() only counts; the loop below starts the operations, so an
        # answer that comes at once (a fake client, a failure) does not
        # recurse.
        to_start = [0]
        starting = [False]

        def launch() -> None:
            to_start[0] += 1
            if starting[0]:
                return
            starting[0] = True
            try:
                while to_start[0]:
                    to_start[0] -= 1
                    start_one()
            finally:
                starting[0] = False

        def start_one() -> None:
            if finished.called:
                return  # stopped by a bug (see broken)
            chosen = None if self.stopping else next_op()
            if chosen is None:
                running[0] -= 1
                if running[0] == 0:
                    finished.callback(None)
                return
            key, op = chosen
            start = perf_counter()
            # An operation that raises counts as failed (as with
            # maybeDeferred, without its cost on every operation).
            try:
                d = op()
            except Exception:
                d = fail()
            d.addCallbacks(succeeded, failed, (key, start))
            d.addErrback(broken)

        def succeeded(_: Any, key: bytes, start: float) -> None:
            rec.success(perf_counter() - start, _chain_of(self.client, key))
            launch()

        def failed(f: Any) -> None:
            rec.failure(unavailable=f.check(*timeouts) is not None)
            # Back off a little: a failure that comes back at once would
            # otherwise spin without ever yielding to the reactor.
            self.reactor.callLater(0.01, launch)

        def broken(f: Any) -> None:
            # A bug in the loop itself: stop rather than hang.
            if not finished.called:
                finished.errback(f)

        started = time.monotonic()
        last = [started, 0]
        tty = sys.stderr.isatty()

        def progress() -> None:
            now = time.monotonic()
            done = rec.ops + rec.errors + rec.unavailable
            line = progress_line(now - started, rec.ops, rate(done - last[1], now - last[0]), rec)
            last[:] = [now, done]
            sys.stderr.write(("\r" + line) if tty else (line + "\n"))
            sys.stderr.flush()

        ticker = LoopingCall(progress)
        if not self.args.quiet:
            ticker.start(1.0, now=False)
        try:
            to_start[0] = self.args.concurrency - 1
            launch()
            await finished
        finally:
            if ticker.running:
                ticker.stop()
                if tty:
                    sys.stderr.write("\n")
        return time.monotonic() - started

    async def preload(self) -> dict[str, Any]:
        rec = Recorder()
        keys = iter(range(self.args.keys))

        def next_op() -> tuple[bytes, Callable[[], Any]] | None:
            i = next(keys, None)
            if i is None:
                return None
            key = make_key(i)
            return key, lambda: self.client.put(key, self.value, timeout=self.args.timeout)

        elapsed = await self.phase(rec, next_op)
        return summarize(rec, elapsed, phase="preload", keys=self.args.keys)

    async def measure(self) -> dict[str, Any]:
        rec = Recorder()
        deadline = time.monotonic() + self.args.duration

        def next_op() -> tuple[bytes, Callable[[], Any]] | None:
            if time.monotonic() >= deadline:
                return None
            return self._choose()

        elapsed = await self.phase(rec, next_op)
        args = self.args
        meta: dict[str, Any] = {
            "workload": args.workload,
            "concurrency": args.concurrency,
            "keys": args.keys,
            "value_size": args.value_size,
            "direct": bool(getattr(args, "direct", False)),
        }
        if args.workload == "mixed":
            meta["read_ratio"] = args.read_ratio
        return summarize(rec, elapsed, **meta)


async def _bench(reactor: Any, args: argparse.Namespace, out: dict[str, Any]) -> None:
    from ckv.client import connect

    client = await connect(reactor, args.connect, args.timeout, direct=args.direct)
    run = _Run(reactor, client, args)
    out["run"] = run
    try:
        if args.workload in ("read", "mixed"):
            if not args.quiet:
                print(f"preloading {args.keys} keys...", file=sys.stderr)
            out["preload"] = await run.preload()
            if not args.json:
                print(format_result(out["preload"], "preload"))
        if not run.stopping:
            if not args.quiet:
                how = "direct to the chains" if args.direct else "through the dispatcher"
                print(f"running {args.workload} for {args.duration:g}s "
                      f"with {args.concurrency} in flight, {how}...", file=sys.stderr)
            out["result"] = await run.measure()
    finally:
        await _close(client)


async def _close(client: Any) -> None:
    try:
        await client.close()
    except Exception:
        pass


def run(args: argparse.Namespace) -> int:
    """C{ckv bench}: runs the reactor in this thread; returns the exit status."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    out: dict[str, Any] = {}
    failure: list[Any] = []

    def start() -> None:
        d = Deferred.fromCoroutine(_bench(reactor, args, out))
        d.addErrback(failure.append)
        d.addBoth(lambda _: reactor.stop())

    def interrupt(signum: int, frame: Any) -> None:
        bench = out.get("run")
        if bench is None or bench.stopping:
            reactor.callFromThread(reactor.stop)
        else:
            # First Ctrl-C: finish the in-flight requests and report.
            bench.stopping = True

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        reactor.callWhenRunning(start)
        reactor.run(installSignalHandlers=False)
    finally:
        signal.signal(signal.SIGINT, previous)

    if failure:
        failure[0].raiseException()
    if "result" not in out:
        print("ckv bench: interrupted before measuring", file=sys.stderr)
        return 130
    result = out["result"]
    if "preload" in out:
        result["preload"] = out["preload"]
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_result(result, args.workload))
    return 0 if result["ops"] > 0 else 1
