"""
State transfer speed: fill a chain of three with --keys keys, kill the tail,
let the master shrink the chain, restart the killed node and time the
snapshot it receives from the new tail (chunked, flow-controlled).

    python benchmarks/transfer_bench.py [--keys 100000] [--value-size 100]

Also prints how long the chain took to be whole again, and the time from
the kill to the first acknowledged write.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.harness import REPO, Cluster, env, wait_for  # noqa: E402

FAST = ["--heartbeat-interval", "0.2", "--failure-timeout", "1.5"]


def _stamp(line: str) -> float:
    return datetime.fromisoformat(line.split(" ", 1)[0]).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckv-transfer-") as work:
        c = Cluster(work, master_args=FAST)
        try:
            c.start()
            assert c.dispatcher is not None
            t = time.monotonic()
            subprocess.run(
                [
                    sys.executable, "-m", "ckv.cli", "bench", "-q", "--json",
                    "--connect", c.dispatcher.endpoint, "--workload", "read",
                    "--keys", str(args.keys), "--value-size", str(args.value_size),
                    "--duration", "0.5",
                ],
                cwd=REPO, env=env(), check=True, capture_output=True, timeout=3600,
            )  # fmt: skip
            print(f"loaded {args.keys} keys of {args.value_size} bytes "
                  f"in {time.monotonic() - t:.1f}s")  # fmt: skip
            n3 = c.node("n3")
            n3.kill()
            wait_for(lambda: [m.name for m in c.config().chains[0].members] == ["n1", "n2"],
                     60, "the chain to shrink")  # fmt: skip
            t = time.monotonic()
            c.start_node(n3)
            wait_for(lambda: [m.name for m in c.config().chains[0].members] == ["n1", "n2", "n3"],
                     600, "the chain to be whole again")  # fmt: skip
            whole = time.monotonic() - t
            with open(c.node("n2").log_path) as f:
                log = f.read().splitlines()
            start = next(line for line in log if "state transfer to joining n3" in line)
            end = next(line for line in log if "transferred:" in line)
            m = re.search(r"transferred: (\d+) items, (\d+) bytes", end)
            assert m is not None
            items, size = int(m.group(1)), int(m.group(2))
            secs = _stamp(end) - _stamp(start)
            print(f"snapshot: {items} items, {size / 1e6:.1f} MB of keys and values "
                  f"in {secs:.2f}s = {size / 1e6 / max(secs, 1e-3):.1f} MB/s "
                  f"({items / max(secs, 1e-3):.0f} items/s)")  # fmt: skip
            print(f"restart of n3 to chain whole again (n3 tail): {whole:.2f}s")
        finally:
            c.stop()


if __name__ == "__main__":
    main()
