"""
Client-side checks run as their own process (so the test process never
runs a reactor thread next to trial's):

    python -m tests.clientcheck roundtrip --connect EP
        put/get/delete/cas through BlockingClient and through the Twisted
        client; prints a JSON object of results.
    python -m tests.clientcheck verify --connect EP --prefix P --acked FILE
        reads every key listed as acknowledged in FILE (see tests.workload)
        and prints {"checked": N, "missing": [...], "wrong": [...]}.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import defer, task


def roundtrip_blocking(endpoint: str) -> dict[str, Any]:
    from ckv.client import BlockingClient

    out: dict[str, Any] = {}
    with BlockingClient(endpoint, timeout=10) as c:
        out["put"] = c.put(b"b:greeting", b"hello")
        out["get"] = c.get(b"b:greeting")
        out["cas_wrong"] = c.cas(b"b:greeting", b"nope", b"x")
        out["cas_right"] = c.cas(b"b:greeting", b"hello", b"hi")
        out["get_after_cas"] = c.get(b"b:greeting")
        out["cas_absent_on_present"] = c.cas(b"b:greeting", None, b"x")
        out["delete"] = c.delete(b"b:greeting")
        out["delete_again"] = c.delete(b"b:greeting")
        out["get_deleted"] = c.get(b"b:greeting")
        out["cas_absent"] = c.cas(b"b:greeting", None, b"new")
        out["cas_delete"] = c.cas(b"b:greeting", b"new", None)
        out["get_final"] = c.get(b"b:greeting")
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}


async def roundtrip_twisted(reactor: Any, endpoint: str) -> dict[str, Any]:
    from ckv.client import connect

    c = await connect(reactor, endpoint, timeout=10)
    out: dict[str, Any] = {}
    try:
        out["put"] = await c.put(b"t:greeting", b"hello")
        out["get"] = await c.get(b"t:greeting")
        out["cas_wrong"] = await c.cas(b"t:greeting", b"nope", b"x")
        out["cas_right"] = await c.cas(b"t:greeting", b"hello", b"hi")
        out["get_after_cas"] = await c.get(b"t:greeting")
        out["delete"] = await c.delete(b"t:greeting")
        out["delete_again"] = await c.delete(b"t:greeting")
        out["get_deleted"] = await c.get(b"t:greeting")
        # Pipelined: many in flight at once on one client.
        await defer.gatherResults(
            [defer.ensureDeferred(c.put(f"t:p{i}".encode(), b"%d" % i)) for i in range(200)]
        )
        values = await defer.gatherResults(
            [defer.ensureDeferred(c.get(f"t:p{i}".encode())) for i in range(200)]
        )
        out["pipelined_ok"] = values == [b"%d" % i for i in range(200)]
    finally:
        await c.close()
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}


async def check_acked(
    client: Any, acked: list[int], prefix: str, timeout: float | None = None
) -> dict[str, Any]:
    """
    Read every acknowledged key C{prefix}<i> (200 at a time) and compare it
    with the value the workloads write, "v<i>".  Closes the client.
    """
    missing: list[int] = []
    wrong: list[int] = []
    try:
        for start in range(0, len(acked), 200):
            chunk = acked[start : start + 200]
            values = await defer.gatherResults(
                [
                    defer.ensureDeferred(client.get(f"{prefix}{i}".encode(), timeout=timeout))
                    for i in chunk
                ]
            )
            for i, v in zip(chunk, values, strict=True):
                if v is None:
                    missing.append(i)
                elif v != f"v{i}".encode():
                    wrong.append(i)
    finally:
        await client.close()
    return {"checked": len(acked), "missing": missing, "wrong": wrong}


async def verify(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    from ckv.client import connect

    acked = []
    with open(args.acked) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("?"):
                acked.append(int(line))
    c = await connect(reactor, args.connect, timeout=args.timeout)
    return await check_acked(c, acked, args.prefix, args.timeout)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["roundtrip", "verify"])
    p.add_argument("--connect", required=True)
    p.add_argument("--prefix", default="k")
    p.add_argument("--acked")
    p.add_argument("--timeout", type=float, default=20.0)
    args = p.parse_args()
    result: dict[str, Any] = {}

    if args.command == "roundtrip":
        result["blocking"] = roundtrip_blocking(args.connect)

        async def tw(reactor: Any) -> None:
            result["twisted"] = await roundtrip_twisted(reactor, args.connect)

        # The blocking client already runs the global reactor in a thread;
        # drive the Twisted client on that same reactor from here.
        from twisted.internet import reactor
        from twisted.internet.threads import blockingCallFromThread

        blockingCallFromThread(reactor, lambda: defer.Deferred.fromCoroutine(tw(reactor)))
    else:

        async def go(reactor: Any) -> None:
            # task.react exits the process when this returns: print here.
            print(json.dumps(await verify(reactor, args)), flush=True)

        task.react(lambda r: defer.Deferred.fromCoroutine(go(r)))
        return
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
