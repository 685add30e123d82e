"""
Client-side checks for the many-chains tests, run as their own process (like
tests.clientcheck), through the dispatcher or, with --direct, straight to
the chains (the configuration from --connect: a dispatcher or the master):

    python -m tests.multicheck roundtrip --connect EP [--direct] --prefix P --count N
        puts P0..P(N-1) = "v<i>", reads each back, deletes none; prints
        {"chains": {"P0": chain id, ...}, "wrong": [...], "direct": bool}.
    python -m tests.multicheck stream --connect EP [--direct] --prefix P --out FILE
            [--chain C] [--count N | --duration S] [--concurrency K]
        writes P<i> = "v<i>" (only keys of chain C with --chain), appending
        "<i> <seconds>\\n" to FILE the moment each write is acknowledged
        ("?<i>\\n" for an unknown outcome); prints a JSON summary with the
        slowest write.
    python -m tests.multicheck verify --connect EP [--direct] --prefix P --acked FILE
        reads every acknowledged key of FILE; prints
        {"checked": N, "missing": [...], "wrong": [...]}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from twisted.internet import defer, task

from ckv.errors import CkvError


async def connect(reactor: Any, args: argparse.Namespace) -> Any:
    from ckv.client import connect as ckv_connect

    return await ckv_connect(reactor, args.connect, timeout=args.timeout, direct=args.direct)


def chain_of(client: Any, key: bytes) -> int | None:
    chain = client.config.chain_for_key(key)
    return chain.chain_id if chain is not None else None


async def roundtrip(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    c = await connect(reactor, args)
    keys = [f"{args.prefix}{i}".encode() for i in range(args.count)]
    try:
        await defer.gatherResults(
            [defer.ensureDeferred(c.put(k, b"v%d" % i)) for i, k in enumerate(keys)]
        )
        values = await defer.gatherResults([defer.ensureDeferred(c.get(k)) for k in keys])
        wrong = [i for i, v in enumerate(values) if v != b"v%d" % i]
        chains = {k.decode(): chain_of(c, k) for k in keys}
    finally:
        await c.close()
    return {"chains": chains, "wrong": wrong, "direct": c.direct}


async def stream(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    c = await connect(reactor, args)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    deadline = time.monotonic() + args.duration if args.duration else None
    state = {"next": 0, "written": 0, "failures": 0, "slowest": 0.0}

    def next_index() -> int | None:
        while True:
            if deadline is not None and time.monotonic() >= deadline:
                return None
            if args.count is not None and state["written"] >= args.count:
                return None
            i = state["next"]
            state["next"] += 1
            if args.chain is None or chain_of(c, f"{args.prefix}{i}".encode()) == args.chain:
                state["written"] += 1
                return i

    async def worker() -> None:
        while (i := next_index()) is not None:
            start = time.monotonic()
            try:
                await c.put(f"{args.prefix}{i}".encode(), f"v{i}".encode())
            except CkvError:
                state["failures"] += 1
                os.write(fd, f"?{i}\n".encode())
            else:
                took = time.monotonic() - start
                state["slowest"] = max(state["slowest"], took)
                os.write(fd, f"{i} {took:.6f}\n".encode())

    try:
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)]
        )
    finally:
        os.close(fd)
        await c.close()
    return {
        "written": state["written"],
        "failures": state["failures"],
        "slowest_s": round(state["slowest"], 4),
        "direct": args.direct,
    }


def read_acked(path: str) -> dict[int, float]:
    """Acknowledged indexes of a stream's FILE, with their latency in seconds."""
    out: dict[int, float] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("?"):
                i, _, took = line.partition(" ")
                out[int(i)] = float(took or 0)
    return out


async def verify(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    from tests.clientcheck import check_acked

    acked = sorted(read_acked(args.acked))
    return await check_acked(await connect(reactor, args), acked, args.prefix)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["roundtrip", "stream", "verify"])
    p.add_argument("--connect", required=True)
    p.add_argument("--direct", action="store_true")
    p.add_argument("--prefix", default="k")
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--chain", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out")
    p.add_argument("--acked")
    p.add_argument("--timeout", type=float, default=20.0)
    args = p.parse_args()
    commands = {"roundtrip": roundtrip, "stream": stream, "verify": verify}
    if args.command == "roundtrip" and args.count is None:
        args.count = 20

    async def go(reactor: Any) -> None:
        # task.react exits the process when this returns: print here.
        print(json.dumps(await commands[args.command](reactor, args)), flush=True)

    task.react(lambda r: defer.Deferred.fromCoroutine(go(r)))


if __name__ == "__main__":
    sys.exit(main())
