"""
Nemesis runs: a real cluster (master, dispatcher, three nodes as twistd
processes), a recorded concurrent workload (tests.historyload), and faults
injected at random: SIGKILL and restart of a node, SIGSTOP/SIGCONT of a node
past the failure timeout, SIGKILL and restart of the master.  At the end
everything is healed, every key is read once more, and the whole history is
checked for linearizability.

The CI runs a short one (tests/test_nemesis.py).  The soak, not run by CI:

    python -m tests.nemesis --duration 600 [--seed N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from tests.harness import REPO, Cluster, env, parse_kv, wait_for
from tests.historyload import load

#: Heartbeats every 0.2 s, failure declared after 2 s (read lease 1.6 s).
FAST = ["--heartbeat-interval", "0.2", "--failure-timeout", "2"]
FAULTS = ("kill", "pause", "master")


def _members(c: Cluster) -> list[str]:
    """Every chain member, in every chain."""
    return [m.name for chain in c.config().chains for m in chain.members]


def _whole(c: Cluster) -> bool:
    return all(len(chain.members) == c.chain_length for chain in c.config().chains)


def run_nemesis(
    workdir: str,
    duration: float,
    seed: int,
    faults: tuple[str, ...] = FAULTS,
    log: Any = print,
    chains: int = 1,
) -> dict[str, Any]:
    """Run one nemesis; returns the checker's verdict and what happened."""
    from ckv.testing.linearizability import check

    rng = random.Random(seed)
    c = Cluster(workdir, nodes=3 * chains, chains=chains, master_args=FAST)
    history = os.path.join(workdir, "history.jsonl")
    events: list[str] = []
    try:
        c.start()
        assert c.dispatcher is not None
        load_proc = subprocess.Popen(
            [
                sys.executable, "-m", "tests.historyload",
                "--connect", c.dispatcher.endpoint,
                "--duration", str(duration), "--seed", str(seed),
                "--keys", str(4 * chains),
                "--final-read", "--out", history,
            ],
            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + duration - 2.0
        while time.monotonic() < deadline:
            # The pace of the faults is the schedule itself, not a wait for state.
            time.sleep(rng.uniform(0.5, 1.5))
            fault = rng.choice(faults)
            t0 = time.monotonic()
            if fault == "kill":
                victim = c.node(rng.choice(_members(c)))
                victim.kill()
                events.append(f"{t0:.1f} kill {victim.name}")
                time.sleep(rng.uniform(0.2, 2.5))
                c.start_node(victim)
                events.append(f"{time.monotonic():.1f} restart {victim.name}")
            elif fault == "pause":
                victim = c.node(rng.choice(_members(c)))
                victim.signal(signal.SIGSTOP)
                events.append(f"{t0:.1f} pause {victim.name}")
                time.sleep(rng.uniform(0.5, 3.0))
                victim.signal(signal.SIGCONT)
                events.append(f"{time.monotonic():.1f} resume {victim.name}")
            elif fault == "master":
                c.master.kill()
                events.append(f"{t0:.1f} kill master")
                time.sleep(rng.uniform(0.1, 1.0))
                c.restart_master()
                events.append(f"{time.monotonic():.1f} restart master")
            # Let the chain heal before the next fault: at most one at a time.
            wait_for(lambda: _whole(c) and _all_members_know(c), 60,
                     "the chains to heal")  # fmt: skip
        out, _ = load_proc.communicate(timeout=duration + 120)
        if load_proc.returncode != 0:
            raise AssertionError(f"workload failed: {out}")
        ops = load(history)
        result = check(ops, timeout=120)
        unknown = sum(1 for o in ops if o.ret is None)
        log(f"nemesis seed {seed}: {len(ops)} operations ({unknown} with unknown outcome), "
            f"{len(events)} fault events; linearizable: {result.ok}")  # fmt: skip
        return {"ok": result.ok, "result": result, "ops": len(ops), "unknown": unknown,
                "events": events}  # fmt: skip
    except BaseException:
        log(c.logs())
        log("\n".join(events))
        raise
    finally:
        c.stop()


def _all_members_know(c: Cluster) -> bool:
    return all(
        parse_kv(c.node(m.name).admin("status")).get("epoch") == str(chain.epoch)
        for chain in c.config().chains
        for m in chain.members
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--chains", type=int, default=1)
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="ckv-nemesis-")
    r = run_nemesis(
        workdir, args.duration, args.seed, tuple(args.faults.split(",")), chains=args.chains
    )
    print(json.dumps({k: v for k, v in r.items() if k != "result"}, indent=2))
    if not r["ok"]:
        print(r["result"])
        sys.exit(1)


if __name__ == "__main__":
    main()
