"""
A recorded workload for nemesis tests, run as its own process:

    python -m tests.historyload --connect EP --duration S --out FILE.jsonl
                                [--workers 6] [--keys 4] [--seed N]

Each worker is a Twisted client issuing random get/put/cas/delete on a few
keys, one at a time.  Every invocation is written (unbuffered) as a "call"
line before it is sent and a "ret" line when it completes, so an operation
cut short by a crash or a timeout is still in the history, with an unknown
outcome.  At the end (--final-read) one more client reads every key.
L{load} turns the file into L{ckv.testing.linearizability.Operation}s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

from twisted.internet import defer, task

from ckv.errors import CkvError, RequestError


def _enc(v: bytes | None) -> str | None:
    return None if v is None else v.decode()


class Log:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.next_id = 0

    def write(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode())

    def call(self, client: int, kind: str, key: bytes, value: bytes | None = None,
             expected: bytes | None = None) -> int:  # fmt: skip
        self.next_id += 1
        self.write(
            {
                "ev": "call", "id": self.next_id, "client": client, "kind": kind,
                "key": key.decode(), "value": _enc(value), "expected": _enc(expected),
                "t": time.monotonic(),
            }
        )  # fmt: skip
        return self.next_id

    def ret(self, op_id: int, result: Any) -> None:
        if isinstance(result, bytes):
            result = {"bytes": result.decode()}
        self.write({"ev": "ret", "id": op_id, "result": result, "t": time.monotonic()})


async def worker(client: Any, n: int, log: Log, rng: random.Random, keys: list[bytes],
                 deadline: float) -> None:  # fmt: skip
    count = 0
    while time.monotonic() < deadline:
        count += 1
        key = rng.choice(keys)
        x = rng.random()
        value = f"w{n}-{count}".encode()
        try:
            if x < 0.45:
                op = log.call(n, "get", key)
                result: Any = await client.get(key)
            elif x < 0.75:
                op = log.call(n, "put", key, value)
                result = await client.put(key, value)
            elif x < 0.93:
                expected: bytes | None = None  # "only if absent"
                if rng.random() < 0.7:
                    # A cas on the value just read; the read is recorded too.
                    op = log.call(n, "get", key)
                    expected = await client.get(key)
                    log.ret(op, expected)
                op = log.call(n, "cas", key, value, expected)
                result = await client.cas(key, expected, value)
            else:
                op = log.call(n, "delete", key)
                result = await client.delete(key)
        except RequestError:
            continue  # refused before it could apply: leave the call unanswered
        except CkvError:
            continue  # unknown outcome: the call line stays without a ret
        log.ret(op, result)


async def run(reactor: Any, args: argparse.Namespace) -> None:
    from ckv.client import connect

    log = Log(args.out)
    rng = random.Random(args.seed)
    keys = [f"key{i}".encode() for i in range(args.keys)]
    deadline = time.monotonic() + args.duration
    clients = [await connect(reactor, args.connect, timeout=args.timeout)
               for _ in range(args.workers)]  # fmt: skip
    await defer.gatherResults(
        [
            defer.Deferred.fromCoroutine(
                worker(c, i, log, random.Random(rng.random()), keys, deadline)
            )
            for i, c in enumerate(clients)
        ]
    )
    if args.final_read:
        for key in keys:
            for _ in range(10):
                op = log.call(1000, "get", key)
                try:
                    log.ret(op, await clients[0].get(key, timeout=args.timeout))
                    break
                except CkvError:
                    continue
    for c in clients:
        await c.close()
    print("done", flush=True)


def load(path: str) -> list[Any]:
    """The recorded history as linearizability.Operation objects."""
    from ckv.testing.linearizability import Operation

    calls: dict[int, dict[str, Any]] = {}
    rets: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            (calls if rec["ev"] == "call" else rets)[rec["id"]] = rec
    ops = []
    for op_id, c in calls.items():
        r = rets.get(op_id)
        result = None
        if r is not None:
            result = r["result"]
            if isinstance(result, dict):
                result = result["bytes"].encode()
        ops.append(
            Operation(
                client=c["client"],
                kind=c["kind"],
                key=c["key"].encode(),
                value=None if c["value"] is None else c["value"].encode(),
                expected=None if c["expected"] is None else c["expected"].encode(),
                call=c["t"],
                ret=None if r is None else r["t"],
                result=result,
            )
        )
    return ops


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--keys", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--final-read", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    task.react(lambda r: defer.Deferred.fromCoroutine(run(r, args)))


if __name__ == "__main__":
    sys.exit(main())
