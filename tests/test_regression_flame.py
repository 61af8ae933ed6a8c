"""CI regression: solve the saved real trace(s) and gate the held-out metrics on
tests/regression_thresholds.yaml: issue 2's `targets` where they are met, and a regression guard
at the measured ratio (`regression_max_ratio` + tolerance) where they are not met yet."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import yaml

from moeplace.solve.solver import solve_placement
from moeplace.trace.format import load_trace

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load(Path(__file__).with_name("regression_thresholds.yaml").read_text())
THRESHOLDS = CONFIG["traces"]
CASES = [(name, int(gpus)) for name, spec in THRESHOLDS.items() for gpus in spec["targets"]]


def limits(spec: dict, gpus: int) -> dict[str, tuple[float, str]]:
    """metric -> (the gate, what it is): the target, or the regression guard of an unmet target."""
    guards = (spec.get("regression_max_ratio") or {}).get(gpus, {})
    return {metric: (guards[metric] + CONFIG["tolerance"], f"regression guard {guards[metric]} + {CONFIG['tolerance']}")
            if metric in guards else (target, f"target {target}") for metric, target in spec["targets"][gpus].items()}


def test_regression_guards_only_cover_unmet_targets() -> None:
    """A guard above its target is an unmet target; a guard at or below it would hide a met one."""
    for spec in THRESHOLDS.values():
        for gpus, guards in (spec.get("regression_max_ratio") or {}).items():
            for metric, guard in guards.items():
                assert guard > spec["targets"][gpus][metric], f"{gpus} GPUs {metric}: target met, drop its guard"


@pytest.mark.parametrize("name,gpus", CASES, ids=[f"{n}-{g}gpu" for n, g in CASES])
def test_held_out_ratios_within_thresholds(name: str, gpus: int) -> None:
    path = ROOT / "traces" / name
    assert path.is_file(), f"{path}: the regression gate's trace is missing (it is committed under traces/)"
    spec = THRESHOLDS[name]
    trace = load_trace(path)
    gates = limits(spec, gpus)
    ratios: dict[str, list[float]] = {metric: [] for metric in gates}
    for seed in range(spec["splits"]):
        held = solve_placement(trace, gpus, time_limit=60, seed=seed,
                               train_fraction=spec["train_fraction"]).metrics["held_out"]
        for metric in gates:
            ratios[metric].append(held["placement"][metric] / held["contiguous"][metric])
    for metric, (limit, what) in gates.items():
        mean = float(np.mean(ratios[metric]))
        where = f"{name} at {gpus} GPUs: held-out {metric} ratio {mean:.4f}"
        assert mean <= limit, f"{where} > {what}"
        target = spec["targets"][gpus][metric]
        if mean > target:
            warnings.warn(f"{where} misses issue 2's target {target}", stacklevel=1)
