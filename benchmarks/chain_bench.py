"""
Benchmark a chain of three on this machine, the way the README quotes it:

    python benchmarks/chain_bench.py [--sync durable|replicated|both]
                                     [--duration 10] [--concurrency 32]
                                     [--chains N] [--direct] [--cpu]
                                     [--repeat N]

For each sync mode it starts `ckv local --base-port 0` in a temporary
directory (a master, three nodes and a dispatcher, each its own process),
runs `ckv bench --workload write` then `--workload read` through the
dispatcher, and prints throughput, latency percentiles, errors and the
resident memory of every process afterwards.  With --cpu it also prints,
per workload, how much of one core each process used and its CPU time per
operation (from /proc; Linux only): where the time goes.  Everything runs
on loopback and stops by itself.

Before the durable runs it prints what the disk gives right now: three
processes appending a batch of 16 updates to a write-ahead log and syncing
it, at once, as durable nodes commit (--no-disk skips it).  Durable
throughput follows that figure, and on a shared virtual disk it moves by a
third from one minute to the next: quote it with the results.  So does
the throughput of a single run: --repeat N runs each mode N times on
fresh clusters, the modes taking turns, and ends with the median, min and
max of each workload.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from ckv.argtypes import positive  # noqa: E402

#: --repeat and --concurrency: a whole number above zero.
positive_int = positive(int)


def _env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = REPO + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time of a process so far, from /proc (Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def children_cpu_seconds() -> float:
    """CPU time of the finished child processes (here: the ckv bench client)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def cpu_line(before: dict[str, float | None], after: dict[str, float | None],
             elapsed: float, ops: int) -> str:
    """Each process's share of one core and CPU per operation, over one workload."""
    parts = []
    for name in before:
        b, a = before[name], after[name]
        if a is None or b is None or elapsed <= 0:
            continue
        used = a - b
        per_op = f" {used / ops * 1e6:.0f} us/op" if ops else ""
        parts.append(f"{name} {100 * used / elapsed:.0f}%{per_op}")
    return ", ".join(parts)


def _disk_writer(path: str, seconds: float, puts: int, out: Any) -> None:
    """One writer as a durable node commits: wal_bench's log writer (records of `puts` updates)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from wal_bench import wal_writer

    wal_writer(path, puts, seconds, out)


def disk_calibration(workdir: str, writers: int = 3, seconds: float = 3.0,
                     puts: int = 16) -> tuple[float, float]:
    """
    What the disk gives durable nodes right now: `writers` processes (one
    per node of a chain) append records of `puts` updates to a write-ahead
    log and sync each, for `seconds`.  Returns the commits per second of all of
    them together and the milliseconds one commit takes.  Durable
    throughput follows this number: on a shared virtual disk it moves by a
    third from one minute to the next, so quote it with the results.
    """
    # fork: this script may have been loaded from a path that a spawned
    # child could not import.
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_disk_writer, args=(os.path.join(workdir, f"w{i}"), seconds, puts, out))
        for i in range(writers)
    ]
    for i, p in enumerate(procs):
        os.makedirs(os.path.join(workdir, f"w{i}"), exist_ok=True)
        p.start()
    try:
        # Each reports (commits, seconds, CPU seconds).
        rates = [n / elapsed for n, elapsed, _ in (out.get(timeout=seconds + 60) for _ in procs)]
    except queue.Empty:
        codes = [p.exitcode for p in procs]
        raise RuntimeError(
            f"disk calibration: a writer did not report (exit codes {codes})"
        ) from None
    finally:
        for p in procs:
            p.join(60)
    total = sum(rates)
    return total, 1000.0 * writers / total if total else float("inf")


def start_cluster(workdir: str, sync: str, chains: int) -> tuple[subprocess.Popen[bytes], dict]:
    ready = os.path.join(workdir, "ready.json")
    # What ckv local prints on its standard error (say a process that died
    # while starting, with its log's tail) is shown if it does not start.
    errors = os.path.join(workdir, "local.err")
    with open(errors, "wb") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "ckv.cli", "local", "-q",
                "--data-dir", os.path.join(workdir, "data"),
                "--base-port", "0", "--sync", sync, "--ready-file", ready,
                "--chains", str(chains), "--nodes", str(3 * chains),
            ],
            # cwd: `python -m` puts the working directory first on sys.path,
            # so run from another checkout this would benchmark that one's code.
            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"ckv local exited with status {proc.returncode}:\n{_read(errors)}"
            )
        try:
            with open(ready) as f:
                return proc, json.load(f)
        except (OSError, ValueError):
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise SystemExit(f"ckv local did not become ready within 60 s:\n{_read(errors)}")


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read().strip()


def bench(
    connect: str, workload: str, duration: float, concurrency: int, direct: bool
) -> dict:
    out = subprocess.run(
        [
            sys.executable, "-m", "ckv.cli", "bench", "--json", "-q",
            "--connect", connect, "--workload", workload,
            "--duration", str(duration), "--concurrency", str(concurrency),
            *(["--direct"] if direct else []),
        ],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=duration * 3 + 120,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"ckv bench failed: {out.stderr}")
    return json.loads(out.stdout)


def run_mode(sync: str, args: argparse.Namespace) -> dict[str, dict]:
    """One fresh cluster in C{sync} mode: the write then the read workload; their results."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ckv-bench-") as work:
        if sync == "durable" and not args.no_disk:
            rate, ms = disk_calibration(work)
            print(f"# disk now: 3 writers, log append + fdatasync, 16 updates per commit: "
                  f"{rate:.0f} commits/s in all, {ms:.2f} ms per commit", flush=True)
        proc, info = start_cluster(work, sync, args.chains)
        try:
            pids = {name: n["pid"] for name, n in info["nodes"].items()}
            pids.update({k: info[k]["pid"] for k in ("master", "dispatcher")})
            for workload in ("write", "read"):
                cpu_before = {"client": children_cpu_seconds()}
                cpu_before.update({k: cpu_seconds(p) for k, p in sorted(pids.items())})
                started = time.monotonic()
                r = bench(info["connect"], workload, args.duration, args.concurrency, args.direct)
                # The client's share counts its start-up and, for reads,
                # the preload; the servers' counts the preload too.
                elapsed = time.monotonic() - started
                cpu_after = {"client": children_cpu_seconds()}
                cpu_after.update({k: cpu_seconds(p) for k, p in sorted(pids.items())})
                results[workload] = r
                print(
                    f"{sync:10s} {workload:5s} {r['ops_per_s']:9.0f} ops/s  "
                    f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                    f"p99.9 {r['p999_ms']:6.2f} ms  errors {r['errors']}  "
                    f"unavailable {r['unavailable']}",
                    flush=True,
                )
                if args.cpu:
                    ops = r["ops"] + (r.get("preload", {}).get("ops", 0))
                    line = cpu_line(cpu_before, cpu_after, elapsed, ops)
                    print(f"{sync:10s} cpu   {line}", flush=True)
            mem = ", ".join(f"{k} {rss_mb(p) or 0:.0f} MB" for k, p in sorted(pids.items()))
            print(f"{sync:10s} rss   {mem}", flush=True)
        finally:
            stop_cluster(proc)
    return results


def stop_cluster(proc: subprocess.Popen[bytes]) -> None:
    """Stop `ckv local` as Ctrl-C does; kill it if it has not stopped within 60 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def summary_line(sync: str, workload: str, runs: list[dict]) -> str:
    """The spread of C{runs} of one workload (one run alone says little on a drifting machine)."""
    ops = sorted(r["ops_per_s"] for r in runs)
    p99 = sorted(r["p99_ms"] for r in runs)
    return (
        f"{sync:10s} {workload:5s} median {statistics.median(ops):6.0f} ops/s "
        f"(min {ops[0]:.0f}, max {ops[-1]:.0f})  p99 median {statistics.median(p99):6.2f} ms "
        f"(max {p99[-1]:.2f})  over {len(runs)} runs"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sync", choices=["durable", "replicated", "both"], default="both")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--chains", type=int, default=1, help="chains of 3 (default 1)")
    ap.add_argument("--direct", action="store_true", help="clients talk to heads and tails")
    ap.add_argument("--cpu", action="store_true",
                    help="also print each process's CPU: share of one core, and per operation")
    ap.add_argument("--no-disk", action="store_true",
                    help="skip the disk calibration printed before the durable runs")
    ap.add_argument("--repeat", type=positive_int, default=1, metavar="N",
                    help="N runs per mode, each on a fresh cluster, modes taking turns; "
                         "then the median, min and max of each workload")
    args = ap.parse_args()
    modes = ["durable", "replicated"] if args.sync == "both" else [args.sync]
    print(f"# {args.chains} chain(s) of 3 on loopback, {os.cpu_count()} cores, "
          f"{args.concurrency} in flight, 100-byte values, {args.duration:g} s per workload, "
          f"{'direct' if args.direct else 'through the dispatcher'}")  # fmt: skip
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeat):
        for sync in modes:
            for workload, r in run_mode(sync, args).items():
                runs.setdefault((sync, workload), []).append(r)
    if args.repeat > 1:
        print("# summary")
        for (sync, workload), rs in runs.items():
            print(summary_line(sync, workload, rs), flush=True)


if __name__ == "__main__":
    main()
