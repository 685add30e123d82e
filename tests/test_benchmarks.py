"""The helpers of benchmarks/chain_bench.py that do not need a cluster."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_chain_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "chain_bench", ROOT / "benchmarks" / "chain_bench.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
