"""
ckv against a 3-member etcd, on this machine, with the same workload:

    python benchmarks/etcd_compare.py [--duration 10] [--concurrency 32]
                                      [--repeat 3] [--etcd etcd]
                                      [--direct] [--all-members]
                                      [--loader PATH]

The issue that set ckv's performance target measured etcd "on this kind of
machine".  This measures both here, now, taking turns: per round, a fresh
`ckv local` (a chain of 3, durable default, through the dispatcher as
chain_bench.py runs it, or with --direct straight to the head and the
tail) and a fresh 3-member etcd on loopback (fsync per batch, its only
mode), each given the write workload then the read workload of `ckv
bench`: 100-byte values, 10,000 keys, 32 requests in flight, reads
preloaded, etcd's reads linearizable.  etcd's requests go to its leader,
its best case (a follower forwards writes to the leader and asks it
before a linearizable read); --all-members spreads them over the three.
Then the median, min and max of each.  Both keep their data under the same
temporary directory ($TMPDIR, else /tmp), so on the same disk: it must be a
real disk, not a tmpfs, or neither side's fsyncs mean anything.

etcd's side is driven by benchmarks/etcd/main.go (etcdload), a closed-loop
Go client; the script builds it unless --loader names a built one.  On
Debian 12:

    apt install etcd-server golang-go golang-etcd-server-dev

(the loader builds against Debian's etcd 3.4 sources, with GO111MODULE=off,
so nothing is downloaded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import chain_bench  # noqa: E402  (it puts the repository on sys.path)

from ckv.argtypes import positive  # noqa: E402

#: Where Debian's golang-* packages put their Go sources.
DEBIAN_GOPATH = "/usr/share/gocode"
WORKLOADS = ("write", "read")


def free_ports(n: int) -> list[int]:
    """C{n} distinct loopback ports that were free a moment ago (etcd takes no port 0)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def etcd_commands(etcd: str, workdir: str, ports: list[int]) -> list[list[str]]:
    """The command lines of a 3-member etcd: client ports C{ports[:3]}, peer ports C{ports[3:]}."""
    client, peer = ports[:3], ports[3:6]
    cluster = ",".join(f"e{i}=http://127.0.0.1:{peer[i]}" for i in range(3))
    return [
        [
            etcd, "--name", f"e{i}", "--data-dir", os.path.join(workdir, f"e{i}"),
            "--listen-client-urls", f"http://127.0.0.1:{client[i]}",
            "--advertise-client-urls", f"http://127.0.0.1:{client[i]}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer[i]}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "ckv-compare", "--log-level", "error",
        ]
        for i in range(3)
    ]  # fmt: skip


def build_loader(outdir: str) -> str:
    """Build benchmarks/etcd/main.go against Debian's etcd sources; the binary's path."""
    if shutil.which("go") is None or not os.path.isdir(
        os.path.join(DEBIAN_GOPATH, "src", "go.etcd.io", "etcd", "clientv3")
    ):
        raise SystemExit(
            "building the etcd loader needs Go and etcd's sources: "
            "apt install golang-go golang-etcd-server-dev (or pass --loader)"
        )
    binary = os.path.join(outdir, "etcdload")
    env = dict(
        os.environ,
        GO111MODULE="off",
        GOPATH=os.path.join(outdir, "gopath") + os.pathsep + DEBIAN_GOPATH,
        GOCACHE=os.path.join(outdir, "gocache"),
    )
    out = subprocess.run(
        ["go", "build", "-o", binary, "."],
        cwd=os.path.join(HERE, "etcd"), env=env, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"building the etcd loader failed:\n{out.stderr}")
    return binary


def run_etcd(etcd: str, loader: str, args: argparse.Namespace) -> dict[str, dict]:
    """A fresh 3-member etcd: the write then the read workload; their results."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="etcd-bench-") as work:
        ports = free_ports(6)
        procs = []
        try:
            for i, cmd in enumerate(etcd_commands(etcd, work, ports)):
                with open(os.path.join(work, f"e{i}.log"), "wb") as log:
                    procs.append(subprocess.Popen(cmd, stdout=log, stderr=log))
            endpoints = ",".join(f"127.0.0.1:{p}" for p in ports[:3])
            for workload in WORKLOADS:
                dead = [f"e{i}" for i, p in enumerate(procs) if p.poll() is not None]
                if dead:
                    raise SystemExit(f"etcd member(s) {', '.join(dead)} exited:\n{_logs(work)}")
                out = subprocess.run(
                    [
                        loader, "--endpoints", endpoints, "--workload", workload,
                        "--duration", f"{round(args.duration * 1000)}ms",
                        "--concurrency", str(args.concurrency),
                        *(["--all-members"] if args.all_members else []),
                    ],
                    capture_output=True, text=True, timeout=args.duration * 3 + 120,
                )  # fmt: skip
                if out.returncode != 0:
                    raise SystemExit(f"etcdload failed: {out.stderr}\netcd logs:\n{_logs(work)}")
                results[workload] = json.loads(out.stdout)
                print(result_line("etcd", workload, results[workload]), flush=True)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    return results


def _logs(work: str) -> str:
    return "\n".join(chain_bench._read(os.path.join(work, f"e{i}.log")) for i in range(3))


def run_ckv(args: argparse.Namespace) -> dict[str, dict]:
    """A fresh `ckv local`, durable: the write then the read workload; their results."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="ckv-bench-") as work:
        proc, info = chain_bench.start_cluster(work, "durable", 1)
        try:
            for workload in WORKLOADS:
                r = chain_bench.bench(
                    info["connect"], workload, args.duration, args.concurrency, args.direct
                )
                results[workload] = r
                print(result_line("ckv", workload, r), flush=True)
        finally:
            chain_bench.stop_cluster(proc)
    return results


def result_line(system: str, workload: str, r: dict[str, Any]) -> str:
    """One run; errors count every failed request (ckv bench's timeouts are apart)."""
    errors = r["errors"] + r.get("unavailable", 0)
    return (
        f"{system:10s} {workload:5s} {r['ops_per_s']:9.0f} ops/s  p50 {r['p50_ms']:6.2f} ms  "
        f"p99 {r['p99_ms']:6.2f} ms  p99.9 {r['p999_ms']:6.2f} ms  errors {errors}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=positive(float), default=10.0)
    ap.add_argument("--concurrency", type=chain_bench.positive_int, default=32)
    ap.add_argument("--repeat", type=chain_bench.positive_int, default=3, metavar="N",
                    help="rounds, each on fresh clusters, the systems taking turns (default 3)")
    ap.add_argument("--etcd", default="etcd", help="the etcd server binary (default: on PATH)")
    ap.add_argument("--direct", action="store_true",
                    help="ckv's client goes to the head and the tail itself, not through the "
                         "dispatcher (as etcd's goes to its leader)")
    ap.add_argument("--all-members", action="store_true",
                    help="etcd's requests spread over its three members, not all to the leader")
    ap.add_argument("--loader", help="a built benchmarks/etcd/main.go (default: build it now)")
    args = ap.parse_args()
    etcd = shutil.which(args.etcd)
    if etcd is None:
        raise SystemExit(f"no etcd server binary {args.etcd!r}: apt install etcd-server")
    version = subprocess.run([etcd, "--version"], capture_output=True, text=True).stdout.split()
    where = "requests spread over its members" if args.all_members else "requests to its leader"
    path = "direct to the chain" if args.direct else "through the dispatcher"
    print(f"# ckv (chain of 3, durable, {path}) against etcd "
          f"{version[2] if len(version) > 2 else '?'} (3 members, fsync per batch, {where}): "
          f"{os.cpu_count()} cores, {args.concurrency} in flight, 100-byte values, "
          f"10,000 keys, {args.duration:g} s per workload")  # fmt: skip
    with contextlib.ExitStack() as stack:
        loader = args.loader or build_loader(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="etcdload-"))
        )
        runs: dict[tuple[str, str], list[dict]] = {}
        for round_ in range(args.repeat):
            # Taking turns, so that neither always runs first after a pause.
            order = ("ckv", "etcd") if round_ % 2 == 0 else ("etcd", "ckv")
            for system in order:
                rs = run_ckv(args) if system == "ckv" else run_etcd(etcd, loader, args)
                for workload, r in rs.items():
                    runs.setdefault((system, workload), []).append(r)
    print("# summary")
    for (system, workload), rs in sorted(runs.items()):
        print(chain_bench.summary_line(system, workload, rs), flush=True)


if __name__ == "__main__":
    main()
