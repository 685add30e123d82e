"""
A write stream for fault tests, run as its own process:

    python -m tests.workload --connect EP --prefix P --count N --out FILE

It writes keys P0, P1, ... with the value "v<i>" through the Twisted client,
keeping --concurrency requests in flight, and appends one line per
*acknowledged* write to FILE ("<i>\\n", written unbuffered the moment the
reply arrives), and "?<i>\\n" for a write whose outcome is unknown
(Unavailable).  A test kills the cluster under it and later checks that
every acknowledged key is still there.
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import defer, task

from ckv.errors import CkvError


async def run(reactor: object, args: argparse.Namespace) -> int:
    from ckv.client import connect

    client = await connect(reactor, args.connect, timeout=args.timeout)
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    next_index = 0
    failures = 0

    async def worker() -> None:
        nonlocal next_index, failures
        while next_index < args.count:
            i = next_index
            next_index += 1
            key = f"{args.prefix}{i}".encode()
            try:
                await client.put(key, f"v{i}".encode())
            except CkvError:
                failures += 1
                os.write(fd, f"?{i}\n".encode())
            else:
                os.write(fd, f"{i}\n".encode())

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker()) for _ in range(args.concurrency)]
    )
    os.close(fd)
    await client.close()
    print(f"done: {args.count} writes, {failures} with unknown outcome", flush=True)
    return 0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True)
    p.add_argument("--prefix", default="k")
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    def go(reactor: object) -> defer.Deferred[int]:
        return defer.Deferred.fromCoroutine(run(reactor, args))

    task.react(go)


if __name__ == "__main__":
    sys.exit(main())
