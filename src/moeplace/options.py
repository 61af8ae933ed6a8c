"""Option types shared by the sub-commands: numbers a solver can use, checked at the command line.

click's FloatRange lets nan and inf through (every comparison with nan is false), and a nan time
limit or an infinite edge weight only fails deep inside a solver; these fail as a usage error.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import click

from moeplace.errors import MoeplaceError


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf."""

    name = "number"  # click words a parse failure as "'x' is not a valid {name}"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class Count(click.IntRange):
    name = "integer"  # not click's "integer range"


SEED = Count(min=0)
NON_NEGATIVE_INT = Count(min=0)
POSITIVE_INT = Count(min=1)
NON_NEGATIVE = FiniteFloat(min=0.0)
POSITIVE = FiniteFloat(min=0.0, min_open=True)


def check_writable(path: Path, option: str = "-o") -> None:
    """Fail before a long run, not after it, when `path` cannot be written (atomic_path makes
    missing parent directories, so the nearest existing ancestor decides)."""
    if path.is_dir():
        raise MoeplaceError(f"{option} {path}: is a directory")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise MoeplaceError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MoeplaceError(f"{option} {path}: no permission to write in {parent}")
