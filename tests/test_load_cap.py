"""`moeplace solve --max-imbalance`: the traffic objective under a cap on max/mean token load per GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.eval.metrics import evaluate
from moeplace.placement import Placement
from moeplace.solve.affinity import distance_matrix, edge_weights
from moeplace.solve.cli import summary
from moeplace.solve.heuristics import relieve_layer, swap_deltas, swap_descent
from moeplace.solve.solver import cap_imbalance, solve_placement
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import save_trace


def loads_of(gpus: np.ndarray, weight: np.ndarray, num_gpus: int) -> np.ndarray:
    return np.bincount(gpus, weights=weight, minlength=num_gpus)


def test_relieve_layer_takes_the_cheapest_swap_per_unit_of_peak_relief() -> None:
    # GPU 0 holds experts 0, 1 (loads 10, 9: 19), GPU 1 experts 2, 3 (1, 1); mean 10.5, limit 11.
    # Every swap of a GPU-0 expert with a GPU-1 one leaves loads 10 / 11 or 11 / 10; expert 3 is
    # the only one that costs nothing to move to GPU 0, expert 1 the cheaper of the two to send.
    weight = np.array([10.0, 9.0, 1.0, 1.0])
    gpus = np.array([0, 0, 1, 1])
    cost = np.array([[0.0, 5.0], [0.0, 2.0], [3.0, 0.0], [0.0, 0.0]])  # [expert, GPU]
    d = distance_matrix(2, 2, 1.0)
    assert relieve_layer(cost, gpus, np.zeros((4, 4)), d, weight, limit=11.0)
    assert gpus.tolist() == [0, 1, 1, 0]
    assert loads_of(gpus, weight, 2).max() <= 11.0


def test_relieve_layer_says_when_no_equal_count_layout_gets_under_the_limit() -> None:
    weight = np.array([30.0, 1.0, 1.0, 1.0])  # {30, 1} on one GPU is the best there is: 31 > 1.2 x 16.5
    gpus = np.array([0, 0, 1, 1])
    d = distance_matrix(2, 2, 1.0)
    assert not relieve_layer(np.zeros((4, 2)), gpus, np.zeros((4, 4)), d, weight, limit=1.2 * 16.5)
    assert gpus.tolist() == [0, 0, 1, 1]  # no swap lowers the peak, so none is made (a 1 <-> 1 swap would cycle)


@pytest.mark.parametrize("seed", range(6))
def test_capped_swap_descent_keeps_the_cap_and_gains_what_its_deltas_say(seed: int) -> None:
    rng = np.random.default_rng(seed)
    experts, gpus_n = 12, 3
    cost = rng.random((experts, gpus_n)) * 10
    intra = rng.random((experts, experts))
    intra = np.triu(intra, 1) + np.triu(intra, 1).T
    weight = rng.integers(1, 20, experts).astype(float)
    d = distance_matrix(gpus_n, gpus_n, 1.0)
    gpus = np.repeat(np.arange(gpus_n), experts // gpus_n)
    start_peak = loads_of(gpus, weight, gpus_n).max()
    limit = max(start_peak, weight.sum() / gpus_n * 1.05)

    def exact(g: np.ndarray) -> float:  # the layer's cost from scratch: one-sided costs plus intra pairs apart
        return float(cost[np.arange(experts), g].sum() + (intra * d[g][:, g]).sum() / 2)

    before = exact(gpus)
    table = cost + intra @ (np.eye(gpus_n)[gpus] @ d)  # what layer_costs adds for the intra edges
    gained = swap_descent(table, gpus, intra, d, weight=weight, limit=limit)
    assert loads_of(gpus, weight, gpus_n).max() <= limit + 1e-9
    assert np.bincount(gpus).tolist() == [experts // gpus_n] * gpus_n
    assert gained >= 0 and exact(gpus) == pytest.approx(before - gained)
    # no single swap that keeps the cap is left that would lower the cost
    delta = swap_deltas(table, gpus, intra, d)
    load = loads_of(gpus, weight, gpus_n)
    for a in range(experts):
        for b in range(experts):
            if gpus[a] != gpus[b]:
                la = load[gpus[a]] - weight[a] + weight[b]
                lb = load[gpus[b]] - weight[b] + weight[a]
                if la <= limit and lb <= limit:
                    assert delta[a, b] >= -1e-9


def test_solve_traffic_with_max_imbalance_meets_it_on_the_fit_tokens() -> None:
    trace, _ = planted_trace(400, 4, 16, 2, 4, seed=3)
    free = solve_placement(trace, 4, time_limit=10, seed=0)
    assert free.metrics["train"]["placement"]["imbalance_max"] > 1.05  # so the cap binds
    capped = solve_placement(trace, 4, time_limit=10, seed=0, max_imbalance=1.05)
    o = capped.objective
    assert capped.metrics["train"]["placement"]["imbalance_max"] <= 1.05 + 1e-9
    assert evaluate(Placement(capped.expert_to_gpu, 4, 4), trace)["imbalance_max"] <= 1.05 + 1e-9
    assert o["max_imbalance"] == 1.05 and o["layers_above_max_imbalance"] == []
    assert o["value_without_cap"] == pytest.approx(free.objective["value"])
    assert o["value"] >= o["value_without_cap"] - 1e-9
    assert capped.bound == free.bound and capped.bound <= o["value"]  # the uncapped bound holds under the cap
    assert capped.solver["method"].endswith("+load-cap")
    assert (np.bincount(capped.expert_to_gpu[2], minlength=4) == 4).all()  # still E/G experts per GPU
    assert "load cap --max-imbalance 1.05 (fit tokens)" in summary(capped, "t.npz")
    # a cap the uncapped placement already meets changes nothing but the record
    loose = solve_placement(trace, 4, time_limit=10, seed=0, max_imbalance=5.0)
    assert np.array_equal(loose.expert_to_gpu, free.expert_to_gpu)


def test_cap_imbalance_lists_the_layers_no_swap_can_bring_under_the_cap() -> None:
    trace, _ = planted_trace(300, 3, 8, 2, 2, seed=1)
    loads = trace.expert_loads()
    loads[1] = [100.0, 1, 1, 1, 1, 1, 1, 1]  # layer 1: the hot expert alone is over 1.5x the mean
    graph = edge_weights(trace)
    d = distance_matrix(2, 2, 2.0)
    x = solve_placement(trace, 2, time_limit=5, seed=0).expert_to_gpu.copy()
    assert cap_imbalance(graph, x, loads, 1.5, d) == [1]
    peaks = np.array([loads_of(x[layer], loads[layer], 2).max() for layer in range(3)])
    assert peaks[1] == 103.0  # the least there is (the packed layer): 100 + the three lightest
    assert (peaks[[0, 2]] <= 1.5 * loads[[0, 2]].sum(axis=1) / 2 + 1e-9).all()
    assert all((np.bincount(row, minlength=2) == 4).all() for row in x)


def test_cli_max_imbalance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, _ = planted_trace(400, 4, 16, 2, 4, seed=3)
    path, out = tmp_path / "t.npz", tmp_path / "p.json"
    save_trace(trace, path)
    base = ["solve", str(path), "--gpus", "4", "--time-limit", "10"]
    assert run(base + ["--max-imbalance", "1.05", "-o", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["objective"]["max_imbalance"] == 1.05
    assert saved["metrics"]["train"]["placement"]["imbalance_max"] <= 1.05 + 1e-9
    assert "load cap --max-imbalance 1.05" in capsys.readouterr().out
    # a cap no equal-count layout of some layers reaches: written anyway, one warning line naming them
    assert run(base + ["--max-imbalance", "1", "-q", "-o", str(out)]) == 0
    above = json.loads(out.read_text())["objective"]["layers_above_max_imbalance"]
    assert above
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"moeplace: warning: --max-imbalance 1: {len(above)} MoE layers ({above}) "
                                               "stay above it on the fit tokens")
    for objective in ("balance", "latency"):
        assert run(base + ["--objective", objective, "--max-imbalance", "1.2", "-o", str(tmp_path / "q.json")]) == 2
        assert "--max-imbalance caps the traffic objective's load" in capsys.readouterr().err
        assert not (tmp_path / "q.json").exists()
    assert run(base + ["--max-imbalance", "0.9", "-o", str(tmp_path / "q.json")]) == 2
    assert "--max-imbalance" in capsys.readouterr().err


def test_load_note_suggests_the_cap_and_goes_when_one_is_set() -> None:
    from moeplace.solve.baselines import contiguous

    def placement(objective: dict) -> Placement:
        row = {"cross_gpu_top1": 0.5, "cross_node_top1": 0.2, "dest_gpus_topk": 2.0, "imbalance_max": 3.0, "tokens": 10}
        return Placement(contiguous(2, 8, 4), 4, 4, objective=objective,
                         metrics={"train": {"placement": row, "contiguous": {**row, "imbalance_max": 1.934}}})
    assert "--max-imbalance 1.94 (contiguous's) caps it" in summary(placement({"name": "traffic"}), "t.npz")
    capped = summary(placement({"name": "traffic", "max_imbalance": 1.5, "value": 2.0, "value_without_cap": 1.0,
                                "layers_above_max_imbalance": [1]}), "t.npz")
    assert "note:" not in capped and "layers [1] stay above it" in capped
