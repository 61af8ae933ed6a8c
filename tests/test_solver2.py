"""Solver II: balance (vs EPLB), latency objective with bound, replicas, MoETuner, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.placement import load_placement
from moeplace.solve import eplb
from moeplace.solve.balance import balance_placement, expected_gpu_loads, layer_loads
from moeplace.solve.costmodel import load_cost_model, predict
from moeplace.solve.moetuner import moetuner_placement
from moeplace.solve.solver import solve_placement
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import make_loads, save_loads

from conftest import ROOT, SHARED_DATA

MIXTRAL = SHARED_DATA / "mixtral-8x7b-expert-loads" / "mixtral_8x7b_instruct" / "expert_popularity_international_law.json"
CLUSTER = ROOT / "configs" / "cluster" / "h100-1x8-nvlink.yaml"
MODEL = ROOT / "configs" / "model" / "flame-moe-290m.yaml"


def test_layer_loads_fill_replicas_to_a_common_level() -> None:
    load = layer_loads(np.array([10.0, 4.0, 2.0]), [[0, 1], [0], [1]], num_gpus=2)
    assert load.tolist() == pytest.approx([8.0, 8.0])  # 4 + 4 of expert 0 and 2 + 6 of it


@pytest.mark.skipif(not MIXTRAL.exists(), reason="shared data absent")
@pytest.mark.parametrize("gpus, redundant", [(4, 8), (8, 8), (4, 0)])
def test_balance_no_worse_than_eplb_on_real_loads(gpus: int, redundant: int) -> None:
    w = np.array(json.loads(MIXTRAL.read_text())["expert_popularity"], dtype=float)[:4]
    p = balance_placement(w, gpus, gpus, redundant, time_limit=2.0, progress=False)
    ours = expected_gpu_loads(p, w).max(1)
    for policy in eplb.POLICIES:
        _, own = eplb.eplb_placement(w, gpus, gpus, redundant, 1, policy)
        assert (ours <= own.max(1) + 1e-6).all()
    mean = w.sum(1) / gpus
    assert p.bound <= p.objective["value"] + 1e-9
    assert p.objective["value"] == pytest.approx((ours / mean).mean())
    slots = np.array([[len(p.experts_on_gpu(layer, g)) for g in range(gpus)] for layer in range(4)])
    assert (slots == (8 + redundant) // gpus).all()


def test_latency_reports_valid_bound_and_is_no_worse_than_its_starts() -> None:
    trace, _ = planted_trace(256, 4, 16, 2, 8, seed=3)
    cm = load_cost_model(CLUSTER, MODEL)
    p = solve_placement(trace, 8, 8, time_limit=6, seed=0, objective="latency", cost=cm)
    assert 0 < p.bound <= p.objective["value"] and 0 <= p.gap < 1
    assert p.objective["value"] == pytest.approx(predict(cm, p, trace).total_us.sum(), rel=1e-6)
    assert p.objective["value"] <= min(p.solver["start_costs"].values()) + 1e-6
    assert (np.bincount(p.expert_to_gpu[0], minlength=8) == 2).all()


def test_latency_with_replicas_respects_slots() -> None:
    trace, _ = planted_trace(256, 3, 16, 2, 8, seed=4, zipf=1.2)
    cm = load_cost_model(CLUSTER, MODEL)
    p = solve_placement(trace, 8, 8, time_limit=4, seed=0, objective="latency", cost=cm, redundant=8)
    for layer in range(3):
        assert max(len(p.experts_on_gpu(layer, g)) for g in range(8)) <= 3
    assert p.objective["value"] == pytest.approx(predict(cm, p, trace).total_us.sum(), rel=1e-6)


def test_moetuner_is_balanced_per_layer() -> None:
    trace, _ = planted_trace(200, 3, 16, 2, 4, seed=5)
    p = moetuner_placement(trace, 4, 4, time_limit=2)
    assert all((np.bincount(row, minlength=4) == 4).all() for row in p.expert_to_gpu)


def test_cli_latency_eval_and_load_only_balance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, _ = planted_trace(128, 3, 16, 2, 8, seed=6)
    from moeplace.trace.format import save_trace
    save_trace(trace, tmp_path / "t.npz")
    out = tmp_path / "p.json"
    assert run(["solve", str(tmp_path / "t.npz"), "--gpus", "8", "--objective", "latency", "--time-limit", "3",
                "--cluster", str(CLUSTER), "--model-config", str(MODEL), "-q", "-o", str(out)]) == 0
    assert load_placement(out).objective["name"] == "latency"
    assert run(["eval", str(out), str(tmp_path / "t.npz"), "--cluster", str(CLUSTER), "--model-config", str(MODEL)]) == 0
    assert "predicted MoE-layer time" in capsys.readouterr().out
    assert run(["eval", str(out), str(tmp_path / "t.npz"), "--model-config", str(MODEL)]) == 2
    assert run(["solve", str(tmp_path / "t.npz"), "--gpus", "8", "--objective", "latency", "-q", "-o", str(out)]) == 2
    save_loads(make_loads(np.random.default_rng(0).random((2, 8)) * 100), tmp_path / "l.npz")
    assert run(["solve", str(tmp_path / "l.npz"), "--gpus", "4", "--objective", "balance", "--redundant-experts", "4",
                "--time-limit", "2", "-q", "-o", str(out)]) == 0
    assert sum(len(r) for r in load_placement(out).replicas) == 8
    loads10 = tmp_path / "l10.npz"
    save_loads(make_loads(np.random.default_rng(1).random((2, 10)) * 100), loads10)
    assert run(["solve", str(loads10), "--gpus", "4", "-q", "-o", str(out)]) == 2  # traffic needs token paths
    assert run(["solve", str(loads10), "--gpus", "4", "--objective", "balance", "-q", "-o", str(out)]) == 2  # 10 % 4
    assert run(["solve", str(loads10), "--gpus", "4", "--objective", "balance", "--max-experts-per-gpu", "3",
                "--time-limit", "1", "-q", "-o", str(out)]) == 0
    assert max(len(load_placement(out).experts_on_gpu(0, g)) for g in range(4)) <= 3
