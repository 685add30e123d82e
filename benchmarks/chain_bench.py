"""
Benchmark a chain of three on this machine, the way the README quotes it:

    python benchmarks/chain_bench.py [--sync durable|replicated|both]
                                     [--duration 10] [--concurrency 32]

For each sync mode it starts `ckv local --base-port 0` in a temporary
directory (a master, three nodes and a dispatcher, each its own process),
runs `ckv bench --workload write` then `--workload read` through the
dispatcher, and prints throughput, latency percentiles, errors and the
resident memory of every process afterwards.  Everything runs on loopback
and stops by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def start_cluster(workdir: str, sync: str, chains: int) -> tuple[subprocess.Popen[bytes], dict]:
    ready = os.path.join(workdir, "ready.json")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "ckv.cli", "local", "-q",
            "--data-dir", os.path.join(workdir, "data"),
            "--base-port", "0", "--sync", sync, "--ready-file", ready,
            "--chains", str(chains), "--nodes", str(3 * chains),
        ],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ckv local exited with status {proc.returncode}")
        try:
            with open(ready) as f:
                return proc, json.load(f)
        except (OSError, ValueError):
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("ckv local did not become ready within 60 s")


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
        env=_env(), capture_output=True, text=True, timeout=duration * 3 + 120,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"ckv bench failed: {out.stderr}")
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sync", choices=["durable", "replicated", "both"], default="both")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--chains", type=int, default=1, help="chains of 3 (default 1)")
    ap.add_argument("--direct", action="store_true", help="clients talk to heads and tails")
    args = ap.parse_args()
    modes = ["durable", "replicated"] if args.sync == "both" else [args.sync]
    print(f"# {args.chains} chain(s) of 3 on loopback, {os.cpu_count()} cores, "
          f"{args.concurrency} in flight, 100-byte values, {args.duration:g} s per workload, "
          f"{'direct' if args.direct else 'through the dispatcher'}")  # fmt: skip
    for sync in modes:
        with tempfile.TemporaryDirectory(prefix="ckv-bench-") as work:
            proc, info = start_cluster(work, sync, args.chains)
            try:
                for workload in ("write", "read"):
                    r = bench(
                        info["connect"], workload, args.duration, args.concurrency, args.direct
                    )
                    print(
                        f"{sync:10s} {workload:5s} {r['ops_per_s']:9.0f} ops/s  "
                        f"p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:6.2f} ms  "
                        f"p99.9 {r['p999_ms']:6.2f} ms  errors {r['errors']}  "
                        f"unavailable {r['unavailable']}",
                        flush=True,
                    )
                pids = {name: n["pid"] for name, n in info["nodes"].items()}
                pids.update({k: info[k]["pid"] for k in ("master", "dispatcher")})
                mem = ", ".join(f"{k} {rss_mb(p) or 0:.0f} MB" for k, p in sorted(pids.items()))
                print(f"{sync:10s} rss   {mem}", flush=True)
            finally:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)


if __name__ == "__main__":
    main()
