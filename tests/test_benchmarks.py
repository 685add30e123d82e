"""The helpers of benchmarks/chain_bench.py and etcd_compare.py that need no cluster."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_chain_bench() -> ModuleType:
    return load_benchmark("chain_bench")


def test_disk_calibration_measures_synced_log_appends(tmp_path: Path) -> None:
    """Three writers append for a moment: a positive rate, a plausible time per commit."""
    cb = load_chain_bench()
    rate, ms = cb.disk_calibration(str(tmp_path), writers=3, seconds=0.3)
    assert rate > 0
    # Three writers at `rate` commits/s in all: each commit takes 3000/rate ms.
    assert abs(ms - 3000.0 / rate) < 1e-6
    assert 0 < ms < 1000
    # Each writer had its own log in the work directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0", "w1", "w2"]
    assert all((tmp_path / w / "wal.0").stat().st_size > 0 for w in ("w0", "w1", "w2"))


def test_the_processes_run_from_this_checkout(monkeypatch, tmp_path: Path) -> None:
    """
    `python -m ckv.cli` puts the working directory first on sys.path: run
    from another checkout, the benchmark would measure that one's code.  So
    every process starts in this repository.
    """
    import json
    import subprocess

    cb = load_chain_bench()
    seen: list[dict] = []

    class Done:
        returncode = 0
        stdout = json.dumps({"ops_per_s": 1.0})

        def poll(self) -> None:
            return None

    def fake(args: list[str], **kw: object) -> Done:
        seen.append(kw)
        (tmp_path / "ready.json").write_text(json.dumps({"connect": "tcp:x"}))
        return Done()

    monkeypatch.setattr(subprocess, "Popen", fake)
    monkeypatch.setattr(subprocess, "run", fake)
    monkeypatch.chdir(tmp_path)
    cb.start_cluster(str(tmp_path), "durable", 1)
    cb.bench("tcp:x", "write", 1.0, 1, False)
    assert [kw["cwd"] for kw in seen] == [str(ROOT), str(ROOT)]


def test_repeated_runs_are_summed_up_by_their_spread() -> None:
    """--repeat: the median, min and max of a workload's runs, and the worst p99."""
    import argparse

    import pytest

    cb = load_chain_bench()
    runs = [
        {"ops_per_s": 5100.0, "p99_ms": 11.0},
        {"ops_per_s": 4300.0, "p99_ms": 16.5},
        {"ops_per_s": 4800.0, "p99_ms": 12.0},
    ]
    line = cb.summary_line("durable", "write", runs)
    assert "median   4800 ops/s (min 4300, max 5100)" in line
    assert "p99 median  12.00 ms (max 16.50)" in line
    assert line.endswith("over 3 runs")
    assert cb.positive_int("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        cb.positive_int("0")


def test_a_cluster_that_does_not_start_says_why(monkeypatch, tmp_path: Path) -> None:
    """What ckv local printed on its standard error is the benchmark's error message."""
    import subprocess

    import pytest

    cb = load_chain_bench()

    class Died:
        returncode = 1

        def __init__(self, args: list[str], **kw: object) -> None:
            kw["stderr"].write(b"ckv local: n2 (pid 42) exited with status 1\n")  # type: ignore[union-attr]

        def poll(self) -> int:
            return 1

    monkeypatch.setattr(subprocess, "Popen", Died)
    with pytest.raises(SystemExit) as e:
        cb.start_cluster(str(tmp_path), "durable", 1)
    assert str(e.value) == (
        "ckv local exited with status 1:\nckv local: n2 (pid 42) exited with status 1"
    )


def test_etcd_members_each_have_their_own_ports_and_directory(tmp_path: Path) -> None:
    """The comparison's etcd: three members that name each other as one cluster."""
    ec = load_benchmark("etcd_compare")
    ports = ec.free_ports(6)
    assert len(set(ports)) == 6 and all(p > 0 for p in ports)
    cmds = ec.etcd_commands("/usr/bin/etcd", str(tmp_path), ports)
    assert len(cmds) == 3
    cluster = ",".join(f"e{i}=http://127.0.0.1:{ports[3 + i]}" for i in range(3))
    for i, cmd in enumerate(cmds):
        opts = dict(zip(cmd[1::2], cmd[2::2], strict=True))
        assert cmd[0] == "/usr/bin/etcd"
        assert opts["--name"] == f"e{i}"
        assert opts["--data-dir"] == str(tmp_path / f"e{i}")
        assert opts["--listen-client-urls"] == f"http://127.0.0.1:{ports[i]}"
        assert opts["--listen-peer-urls"] == f"http://127.0.0.1:{ports[3 + i]}"
        assert opts["--initial-cluster"] == cluster
        assert opts["--initial-cluster-state"] == "new"


def test_the_etcd_loader_needs_go_and_says_how_to_get_it(monkeypatch, tmp_path: Path) -> None:
    """Without Go the comparison stops with the packages to install, not a traceback."""
    import shutil

    import pytest

    ec = load_benchmark("etcd_compare")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as e:
        ec.build_loader(str(tmp_path))
    assert "apt install golang-go golang-etcd-server-dev" in str(e.value)
    assert "--loader" in str(e.value)


def test_both_systems_are_reported_alike() -> None:
    """
    etcd's loader prints the fields of `ckv bench --json` that the report
    reads, so one line format serves both; ckv's timeouts count as errors,
    as the loader's do.
    """
    import re

    from ckv import bench

    ec = load_benchmark("etcd_compare")
    r = {"ops_per_s": 2124.4, "p50_ms": 13.79, "p99_ms": 38.34, "p999_ms": 51.7, "errors": 0}
    assert ec.result_line("etcd", "write", r) == (
        "etcd       write      2124 ops/s  p50  13.79 ms  p99  38.34 ms  p99.9  51.70 ms  errors 0"
    )
    assert ec.result_line("ckv", "write", {**r, "errors": 2, "unavailable": 3}).endswith(
        "errors 5"
    )
    read = {"ops_per_s", "p50_ms", "p99_ms", "p999_ms", "errors"}
    go = (ROOT / "benchmarks" / "etcd" / "main.go").read_text()
    emitted = set(re.findall(r'"(\w+)":', go.split("Encode(map[string]any{", 1)[1]))
    assert read <= emitted
    # The same names as ckv bench's JSON, for the figures both report.
    summary = bench.summarize(bench.Recorder(), 1.0)
    assert emitted & set(summary) >= read | {"ops", "duration_s"}


def test_a_cluster_that_will_not_stop_is_killed(monkeypatch) -> None:
    """Ctrl-C first; if `ckv local` is still there after 60 s, SIGKILL (no cluster left behind)."""
    import signal
    import subprocess

    cb = load_chain_bench()
    seen: list[object] = []

    class Stuck:
        def send_signal(self, sig: int) -> None:
            seen.append(sig)

        def wait(self, timeout: float | None = None) -> int:
            seen.append(("wait", timeout))
            if timeout is not None:
                raise subprocess.TimeoutExpired("ckv local", timeout)
            return -9

        def kill(self) -> None:
            seen.append("kill")

    cb.stop_cluster(Stuck())
    assert seen == [signal.SIGINT, ("wait", 60), "kill", ("wait", None)]


def test_ckv_goes_direct_when_asked(monkeypatch) -> None:
    """--direct reaches `ckv bench`: the like-for-like case of etcd's client at its leader."""
    import argparse

    ec = load_benchmark("etcd_compare")
    calls: list[tuple] = []

    class Proc:
        def send_signal(self, sig: int) -> None:
            calls.append(("signal", sig))

        def wait(self, timeout: float) -> int:
            return 0

    def bench(connect: str, workload: str, duration: float, conc: int, direct: bool) -> dict:
        calls.append((workload, direct))
        return {"ops_per_s": 1.0, "p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0, "errors": 0}

    monkeypatch.setattr(ec.chain_bench, "start_cluster", lambda *a: (Proc(), {"connect": "x"}))
    monkeypatch.setattr(ec.chain_bench, "bench", bench)
    for direct in (False, True):
        calls.clear()
        args = argparse.Namespace(duration=1.0, concurrency=32, direct=direct)
        assert set(ec.run_ckv(args)) == {"write", "read"}
        assert calls[:2] == [("write", direct), ("read", direct)]
        assert calls[2][0] == "signal"  # the cluster is stopped
