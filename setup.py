"""
Packaging for ckv.

The twistd plugin dropin lives in twisted/plugins/ckv_plugins.py.  That
directory has no __init__.py (Twisted requires it to be a namespace that
every installed package can add files to), so find_packages() cannot see it
and it is listed by hand.  Never list "twisted" itself.

Install with `pip install .` for twistd to find the plugins.  A plain
`pip install -e .` installs an import hook that twistd's plugin scan does not
follow; use `pip install -e . --config-settings editable_mode=compat`, or run
from the source tree with PYTHONPATH=. instead.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def _version() -> str:
    text = (HERE / "ckv" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if not match:
        raise RuntimeError("ckv/__init__.py has no __version__")
    return match.group(1)


def _long_description() -> str:
    readme = HERE / "README.md"
    return readme.read_text(encoding="utf-8") if readme.exists() else ""


setup(
    name="ckv",
    version=_version(),
    description="A strongly consistent key-value store built on chain replication (Twisted, LMDB)",
    long_description=_long_description(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    install_requires=[
        "twisted>=24",
        "construct==2.10.*",
        # 3.x: closing or resizing an environment while another thread
        # reads (an admin digest, a state transfer) fails that read cleanly;
        # 1.4 could crash the process.
        "lmdb>=3",
    ],
    extras_require={
        # setuptools and wheel: tests/test_packaging.py builds a wheel offline
        # (venvs of Python 3.12 and later come without setuptools).
        "test": ["pytest", "pytest-twisted", "ruff", "setuptools>=61", "wheel"],
    },
    entry_points={
        "console_scripts": ["ckv=ckv.cli:main"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: Database",
    ],
)

# Refresh Twisted's plugin cache (plugin.rst: "regenerate the cache after
# installing").  Best effort only: under pip's build isolation this runs
# before anything is installed and Twisted may not even be importable.  After
# `pip install .`, run
#     python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
# (.ci/run does); otherwise twistd rebuilds the cache on first use, or just
# scans the directory if site-packages is not writable.
try:
    from twisted.plugin import IPlugin, getPlugins

    list(getPlugins(IPlugin))
except Exception:  # best effort only
    pass
