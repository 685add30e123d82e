"""
A short nemesis in CI: real processes, a recorded concurrent workload, node
kills and restarts, pauses past the failure timeout, master kills; the whole
history must be linearizable (tests/nemesis.py; the long soak runs from
there by hand).
"""

from __future__ import annotations

import pytest

from tests.nemesis import run_nemesis

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("seed, chains", [(1, 1), (2, 1), (3, 2)])
def test_nemesis_history_is_linearizable(tmp_path, seed, chains):
    r = run_nemesis(str(tmp_path), duration=20.0, seed=seed, chains=chains)
    assert r["ops"] > 200, "the workload made progress"
    assert r["events"], "faults were injected"
    assert r["ok"] is True, str(r["result"])
