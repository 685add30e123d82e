"""
Packaging: the twistd plugins are found, the dropin directory stays a
namespace, and a built wheel holds what it should.

The "installed" test checks an installed ckv (as .ci/run makes with
`pip install '.[test]'`) from outside the source tree; it is skipped when ckv
is not installed, e.g. when running from a checkout with PYTHONPATH=.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ("ckv-node", "ckv-master", "ckv-dispatcher")


def twistd() -> list[str]:
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def test_no_init_under_twisted() -> None:
    assert (ROOT / "twisted" / "plugins" / "ckv_plugins.py").exists()
    inits = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "twisted").rglob("__init__.py"))
    assert inits == [], "an __init__.py under twisted/ hides Twisted from Python"


def test_dropin_does_not_import_the_reactor() -> None:
    code = (
        "import sys\n"
        "from twisted.plugin import IPlugin, getPlugins\n"
        "from twisted.application.service import IServiceMaker\n"
        "names = sorted(p.tapname for p in getPlugins(IServiceMaker))\n"
        "print(json.dumps([names, 'twisted.internet.reactor' in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json\n" + code],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert out.returncode == 0, out.stderr
    names, reactor_imported = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(PLUGINS) <= set(names)
    assert not reactor_imported


def test_twistd_help_lists_plugins() -> None:
    """`twistd --help` in this environment (source tree on the path) lists the three roles."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([*twistd(), "--help"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    for name in PLUGINS:
        assert name in out.stdout


@pytest.mark.parametrize("role", PLUGINS)
def test_twistd_role_help(role: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([*twistd(), role, "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    assert "--listen" in out.stdout and "--port-file" in out.stdout


def test_twistd_bad_flag_is_a_usage_error() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [*twistd(), "-n", "--pidfile=", "ckv-master", "--failure-timeout", "0.1"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert out.returncode != 0
    assert "must be longer than" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def _installed_for_real() -> bool:
    """An installed (not in-tree, not editable) ckv distribution holding the dropin."""
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower() != "ckv":
            continue
        # A build leaves ckv.egg-info in the source tree; that is not an install.
        if Path(str(dist.locate_file(""))).resolve() == ROOT:
            continue
        files = [str(f).replace(os.sep, "/") for f in (dist.files or [])]
        if any(f.endswith("twisted/plugins/ckv_plugins.py") for f in files):
            return True
    return False


@pytest.mark.skipif(not _installed_for_real(),
                    reason="ckv is not installed with `pip install .` (.ci/run does that)")
def test_installed_package_outside_the_tree(tmp_path: Path) -> None:
    """From an unrelated directory with no PYTHONPATH: the installed plugins and script."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([*twistd(), "--help"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    for name in PLUGINS:
        assert name in out.stdout
    ckv = Path(sys.executable).parent / "ckv"
    assert ckv.exists()
    out = subprocess.run([str(ckv), "--help"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "local" in out.stdout and "bench" in out.stdout


def test_wheel_contents(tmp_path: Path) -> None:
    """Build a wheel (offline, with the setuptools at hand) and look inside."""
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError:
        pytest.skip("setuptools and wheel are needed to build a wheel offline")
    src = tmp_path / "src"
    shutil.copytree(
        ROOT, src,
        ignore=shutil.ignore_patterns(".git", ".ci-venv", ".venv", "venv", "build", "dist",
                                      "*.egg-info", "__pycache__", "ckv-data*", "dropin.cache",
                                      "_trial_temp*", ".pytest_cache", ".ruff_cache"),
    )
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = (tmp_path / "dist").glob("ckv-*.whl")
    names = set(zipfile.ZipFile(whl).namelist())
    assert "twisted/plugins/ckv_plugins.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "ckv/__init__.py" in names and "ckv/cli.py" in names
    assert "ckv/chain/tap.py" in names and "ckv/master/tap.py" in names
    assert not any(n.startswith("tests/") for n in names)
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "ckv = ckv.cli:main" in zipfile.ZipFile(whl).read(entry_points).decode()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    text = zipfile.ZipFile(whl).read(metadata).decode()
    for requirement in ("twisted>=24", "construct==2.10.*", "lmdb>=3"):
        assert requirement in text.lower().replace(" ", "")
