"""
What one durable batch costs the disk: an fsynced LMDB commit of a batch of
random puts, against appending the same batch to a write-ahead log and
syncing it (L{ckv.wal}), with as many processes at once as a chain has
replicas on one machine.  Prints the time per commit and the CPU it takes.

    python benchmarks/wal_bench.py [--writers 3] [--puts 16] [--seconds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lmdb  # noqa: E402

from ckv.wal import WriteAheadLog  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def lmdb_writer(path: str, puts: int, seconds: float, out: multiprocessing.Queue) -> None:
    env = lmdb.open(path, map_size=1 << 30, max_dbs=4)
    db = env.open_db(b"data")
    with env.begin(write=True) as txn:
        for k in range(10_000):
            txn.put(b"key%08d" % k, os.urandom(100), db=db)
    n, cpu, t0 = 0, _cpu(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        with env.begin(write=True) as txn:
            for _ in range(puts):
                txn.put(b"key%08d" % random.randrange(10_000), os.urandom(100), db=db)
        n += 1
    out.put((n, time.perf_counter() - t0, _cpu() - cpu))


def wal_writer(path: str, puts: int, seconds: float, out: multiprocessing.Queue) -> None:
    log = WriteAheadLog(os.path.join(path, "wal.0"))  # named as a node names its first log
    log.open()
    record = os.urandom(puts * 150)
    n, cpu, t0 = 0, _cpu(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += 1
        log.append(n, record)
        if log.offset > 4 << 20:  # as after a checkpoint: rewrite from the start
            log.rewind()
    out.put((n, time.perf_counter() - t0, _cpu() - cpu))
    log.close()


def run(target, writers: int, puts: int, seconds: float) -> tuple[float, float]:
    """Milliseconds per commit (each writer) and CPU microseconds per commit."""
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", HERE)) as work:
        procs = []
        for i in range(writers):
            os.makedirs(os.path.join(work, str(i)))
            procs.append(
                ctx.Process(target=target, args=(os.path.join(work, str(i)), puts, seconds, out))
            )
        for p in procs:
            p.start()
        results = [out.get(timeout=seconds + 120) for _ in procs]
        for p in procs:
            p.join(60)
    commits = sum(n for n, _, _ in results)
    elapsed = max(t for _, t, _ in results)
    cpu = sum(c for _, _, c in results)
    return 1000.0 * writers * elapsed / commits, 1e6 * cpu / commits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--puts", type=int, default=16, help="puts per batch")
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    print(f"# {args.writers} writers at once, {args.puts} puts of 100 bytes per batch")
    kinds = (("lmdb commit (fsync)", lmdb_writer), ("log append + fdatasync", wal_writer))
    for name, target in kinds:
        ms, cpu = run(target, args.writers, args.puts, args.seconds)
        print(f"{name:24s} {ms:6.2f} ms per commit, {cpu:5.0f} us CPU per commit", flush=True)


if __name__ == "__main__":
    main()
