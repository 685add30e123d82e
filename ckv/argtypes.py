"""argparse types shared by the ckv command line (ckv.cli) and ckv bench."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: a number of C{kind} (int or float) above zero."""

    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return convert


def ratio(text: str) -> float:
    """An argparse type: a number between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return value
