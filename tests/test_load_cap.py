"""`moeplace solve --max-imbalance`: the traffic objective under a cap on max/mean token load per GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.eval.metrics import evaluate
from moeplace.placement import Placement
import itertools
import time

from moeplace.solve import chain, ilp
from moeplace.solve.affinity import distance_matrix, edge_weights, placement_cost
from moeplace.solve.summary import summary
from moeplace.solve.baselines import random_balanced
from moeplace.solve.heuristics import (
    LoadCap, coordinate_descent, layer_costs, meet_cap, relieve_layer, swap_deltas, swap_descent,
)
from moeplace.solve.solver import cap_imbalance, search_traffic, solve_placement
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import Trace, save_trace


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
    assert free.bound <= capped.bound <= o["value"]  # the uncapped bound holds under the cap; the capped one is tighter
    assert ", then under the load cap: " in capped.solver["method"]
    assert capped.solver["search_without_cap"]["bound"] == free.bound
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
    assert cap_imbalance(graph, x, LoadCap.from_ratio(loads, 1.5, 2), d) == [1]
    peaks = np.array([loads_of(x[layer], loads[layer], 2).max() for layer in range(3)])
    assert peaks[1] == 103.0  # the least there is (the packed layer): 100 + the three lightest
    assert (peaks[[0, 2]] <= 1.5 * loads[[0, 2]].sum(axis=1) / 2 + 1e-9).all()
    assert all((np.bincount(row, minlength=2) == 4).all() for row in x)


def _capped_optimum(graph, cap: LoadCap, num_gpus: int, d: np.ndarray) -> float:
    """Brute force: the least traffic cost over every equal-count layout under the cap."""
    experts = graph.num_experts
    per_layer = []
    for layer in range(graph.num_layers):
        rows = []
        for first in itertools.combinations(range(experts), experts // num_gpus):  # two GPUs
            row = np.ones(experts, dtype=np.int64)
            row[list(first)] = 0
            if cap.peak(row, layer, num_gpus) <= cap.limits[layer]:
                rows.append(row)
        per_layer.append(rows)
    return min(placement_cost(graph, np.stack(rows), d) for rows in itertools.product(*per_layer))


@pytest.mark.parametrize("method", ["exact-dp", "exact-ilp"])
@pytest.mark.parametrize("seed", range(4))
def test_capped_search_reaches_the_capped_optimum_of_a_small_model(seed: int, method: str, monkeypatch) -> None:
    """3 layers x 6 experts on 2 GPUs: the shortest path over the layouts under the cap, or (with
    it turned off) the whole-model ILP with the cap's rows from the capped descent's incumbent,
    ends at the brute-force optimum over the layouts under the cap."""
    if method == "exact-ilp":
        monkeypatch.setattr(chain, "MAX_LAYOUTS", 0)
    trace, _ = planted_trace(200, 3, 6, 2, 2, zipf=1.2, seed=seed)
    graph, d = edge_weights(trace), distance_matrix(2, 2, 1.0)
    cap = LoadCap.from_ratio(trace.expert_loads(), 1.1, 2)
    best = _capped_optimum(graph, cap, 2, d)
    free = search_traffic(graph, 2, 2, 1.0, time.monotonic() + 60, 0, 4, 4)
    assert free.cost < best - 1e-9  # the cap binds
    got = search_traffic(graph, 2, 2, 1.0, time.monotonic() + 60, 0, 4, 4, cap=cap)
    assert got.method == method and cap.above(got.expert_to_gpu, 2) == []
    assert got.cost == pytest.approx(best) and got.bound == pytest.approx(best, abs=1e-6)


def test_window_ilp_with_an_unreachable_cap_returns_no_layout() -> None:
    trace, _ = planted_trace(200, 2, 4, 2, 2, seed=0)
    graph, d = edge_weights(trace), distance_matrix(2, 2, 1.0)
    loads = np.array([[10.0, 1, 1, 1], [1, 1, 1, 1]])  # layer 0: 11 is the least a GPU can carry
    start = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])
    res = ilp.solve_window(graph, start, range(2), d, 2, 30, cap=LoadCap(loads, np.array([10.5, 2.0])))
    assert res.cost is None and np.array_equal(res.expert_to_gpu, start)
    res = ilp.solve_window(graph, start, range(2), d, 2, 30, cap=LoadCap(loads, np.array([11.0, 2.0])))
    assert res.optimal and LoadCap(loads, np.array([11.0, 2.0])).above(res.expert_to_gpu, 2) == []


def _capped_start(seed: int) -> tuple:
    """Skewed planted routing (16 experts x 4 layers, 4 GPUs), its graph and distances, a cap of
    1.1, and the uncapped search's layout brought under it (what the search under the cap starts from)."""
    trace, _ = planted_trace(400, 4, 16, 2, 4, zipf=1.2, seed=seed)
    graph, d = edge_weights(trace), distance_matrix(4, 4, 2.0)
    cap = LoadCap.from_ratio(trace.expert_loads(), 1.1, 4)
    start = search_traffic(graph, 4, 4, 2.0, time.monotonic() + 60, 0, 8, 20, exact=False).expert_to_gpu.copy()
    cap_imbalance(graph, start, cap, d)
    return graph, d, cap, start


@pytest.mark.parametrize("seed", range(3))
def test_capped_search_beats_capping_the_uncapped_layout(seed: int) -> None:
    """Without the whole-model ILP (16 experts x 4 layers): the search under the cap starts from
    the uncapped layout brought under it, keeps every layer at or under what that start reached,
    and on these traces ends with less traffic than the start (what solve did before the cap
    went into the search)."""
    graph, d, cap, start = _capped_start(seed)
    kept, far = cap.kept(start, 4), time.monotonic() + 60
    got = search_traffic(graph, 4, 4, 2.0, far, 0, 8, 20, exact=False, cap=kept, incumbent=start)
    assert kept.above(got.expert_to_gpu, 4) == [] and cap.above(got.expert_to_gpu, 4) == cap.above(start, 4)
    assert got.cost == pytest.approx(placement_cost(graph, got.expert_to_gpu, d))
    assert got.cost < placement_cost(graph, start, d) - 1e-6
    assert all((np.bincount(row, minlength=4) == 4).all() for row in got.expert_to_gpu)


def test_capped_search_never_trades_a_layer_above_the_cap_for_less_traffic(monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarts and kicks whose descent ignores the cap find cheaper layouts with layers above
    it; the search keeps the one with fewer layers above, whatever they cost."""
    from moeplace.solve import solver

    graph, d, cap, start = _capped_start(0)
    kept, far = cap.kept(start, 4), time.monotonic() + 60
    real = solver.coordinate_descent
    monkeypatch.setattr(solver, "coordinate_descent", lambda *args, cap=None, **kwargs: real(*args, **kwargs))
    got = search_traffic(graph, 4, 4, 2.0, far, 0, 8, 20, exact=False, layer_ilps=False, cap=kept, incumbent=start)
    assert kept.above(got.expert_to_gpu, 4) == [] and np.array_equal(got.expert_to_gpu, start)
    assert got.stats["kicks_accepted"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_capped_coordinate_descent_brings_layers_under_and_keeps_them(seed: int) -> None:
    rng = np.random.default_rng(seed)
    trace, _ = planted_trace(300, 4, 12, 2, 3, zipf=1.0, seed=seed)
    graph, d = edge_weights(trace), distance_matrix(3, 3, 1.0)
    cap = LoadCap.from_ratio(trace.expert_loads(), 1.2, 3)
    x = np.stack([rng.permutation(np.repeat(np.arange(3), 4)) for _ in range(4)])
    coordinate_descent(graph, x, d, cap=cap)
    reachable = [layer for layer in range(4) if layer not in cap.above(x, 3)]
    assert len(reachable) >= 3  # a random start is brought under wherever the swaps can
    kept = cap.kept(x, 3)
    before = placement_cost(graph, x, d)
    coordinate_descent(graph, x, d, cap=kept)  # from a layout under its cap: moves keep it there
    assert kept.above(x, 3) == [] and placement_cost(graph, x, d) <= before + 1e-9
    assert all((np.bincount(row, minlength=3) == 4).all() for row in x)


def _no_swap_meets(row: np.ndarray, loads: np.ndarray, limit: float, num_gpus: int) -> bool:
    """No swap of two experts on different GPUs brings the layer's largest load to `limit`."""
    for a, b in itertools.combinations(range(len(row)), 2):
        if row[a] != row[b]:
            swapped = row.copy()
            swapped[[a, b]] = row[[b, a]]
            if np.bincount(swapped, weights=loads, minlength=num_gpus).max() <= limit:
                return False
    return True


def test_meet_cap_says_whether_the_layer_it_leaves_is_under_the_cap() -> None:
    """The fallback from the load-balanced packing is the layout left in the row (it once left
    the raw packing there, 4% above a cap it reported met)."""
    trace, _ = planted_trace(4000, 6, 32, 2, 8, zipf=1.2, seed=3)
    graph, d = edge_weights(trace), distance_matrix(4, 4, 2.0)
    fallbacks = 0
    for cap_ratio in (1.001, 1.003, 1.01):
        cap = LoadCap.from_ratio(trace.expert_loads(), cap_ratio, 4)
        for seed in range(4):
            x = random_balanced(6, 32, 4, seed=seed)
            for layer in range(6):
                first = x[layer].copy()
                fallbacks += not relieve_layer(layer_costs(graph, x, layer, d), first, graph.intra[layer], d,
                                               cap.loads[layer], float(cap.limits[layer]))
                met = meet_cap(graph, x, layer, d, cap)
                assert met == (cap.peak(x[layer], layer, 4) <= cap.limits[layer])
                assert cap.peak(x[layer], layer, 4) <= cap.peak(first, layer, 4)  # never above the first try's
                assert (np.bincount(x[layer], minlength=4) == 8).all()
    assert fallbacks > 10  # the packing path ran


def test_meet_cap_falls_back_to_the_balance_objectives_layout_where_the_swaps_stop() -> None:
    """16 experts of one skewed layer on 4 GPUs, no edges: the relieving swaps stop at 1.012 from
    the current layout and from the packing (1.048); the balance descent's layout gets under 1.01."""
    from moeplace.solve.affinity import AffinityGraph
    from moeplace.solve.baselines import greedy_load

    trace, _ = planted_trace(2000, 1, 16, 2, 4, zipf=1.2, seed=3)
    loads = np.repeat(trace.expert_loads(), 2, axis=0)  # two equal layers, so the graph has a layer pair
    graph = AffinityGraph(np.zeros((1, 16, 16)), np.zeros((2, 16, 16)))
    cap = LoadCap.from_ratio(loads, 1.01, 4)
    x = greedy_load(loads, 4)
    assert cap.peak(x[0], 0, 4) > 1.04 * loads[0].sum() / 4
    assert meet_cap(graph, x, 0, distance_matrix(4, 4, 1.0), cap)
    assert cap.above(x, 4) == [1] and (np.bincount(x[0], minlength=4) == 4).all()


def test_solve_retries_the_cap_on_layers_left_above_it(tmp_path: Path) -> None:
    """Skewed planted routing at 2 GPUs, cap 1.0 (perfect balance on the fit tokens): every
    layer gets there (the search under the cap once kept four layers at the peak its first
    pass reached, a single swap away from it); wherever a layer stays above a cap, no single
    swap would bring it under."""
    trace, _ = planted_trace(4000, 6, 32, 2, 8, zipf=1.2, seed=3)
    p = solve_placement(trace, 2, time_limit=30, seed=0, max_imbalance=1.0)
    assert p.objective["layers_above_max_imbalance"] == []
    assert p.metrics["train"]["placement"]["imbalance_max"] == pytest.approx(1.0)
    loads = trace.expert_loads()
    tight = solve_placement(trace, 4, time_limit=30, seed=0, max_imbalance=1.0)
    cap = LoadCap.from_ratio(loads, 1.0, 4)
    assert tight.objective["layers_above_max_imbalance"] == cap.above(tight.expert_to_gpu, 4)
    for layer in tight.objective["layers_above_max_imbalance"]:
        assert _no_swap_meets(tight.expert_to_gpu[layer], loads[layer], float(cap.limits[layer]), 4)


def test_one_layer_trace_swaps_its_packing_toward_the_cap() -> None:
    """Any layout of one layer is free of traffic: the packing (1.048) goes to the cap 1.01 (it
    once stayed at the packing, then at 1.012, where the swaps from it stopped); at cap 1.0 it
    ends at 1.003, the least any equal-count layout has (the balance objective proves it), listed above."""
    trace, _ = planted_trace(2000, 1, 16, 2, 4, zipf=1.2, seed=3)
    packed = solve_placement(trace, 4, time_limit=10, seed=0)
    capped = solve_placement(trace, 4, time_limit=10, seed=0, max_imbalance=1.01)
    assert packed.metrics["train"]["placement"]["imbalance_max"] > 1.04
    assert capped.metrics["train"]["placement"]["imbalance_max"] <= 1.01
    assert capped.objective["layers_above_max_imbalance"] == []
    exact = solve_placement(trace, 4, time_limit=10, seed=0, max_imbalance=1.0)
    loads = trace.expert_loads()[0]
    assert exact.objective["layers_above_max_imbalance"] == [0]
    assert _no_swap_meets(exact.expert_to_gpu[0], loads, loads.sum() / 4, 4)
    least = solve_placement(trace, 4, time_limit=10, seed=0, objective="balance")
    assert least.gap == 0.0 and exact.metrics["train"]["placement"]["imbalance_max"] == \
        least.metrics["train"]["placement"]["imbalance_max"]


def test_a_peak_of_exactly_the_cap_is_under_it_as_eval_counts() -> None:
    """Loads 80 / 35 / 45 / 40 on 2 GPUs: {80, 35} carries 115 = 1.15 x the mean 100, but
    1.15 * 100 is 114.99999999999999 in floating point."""
    ids = np.concatenate([np.full(n, e) for e, n in enumerate([80, 35, 45, 40])])
    rng = np.random.default_rng(0)
    trace = Trace(topk_ids=np.stack([rng.permutation(ids) for _ in range(2)], axis=1)[:, :, None], num_experts=4)
    p = solve_placement(trace, 2, time_limit=10, seed=0, max_imbalance=1.15)
    assert p.objective["layers_above_max_imbalance"] == []
    assert evaluate(p, trace)["imbalance_max"] == pytest.approx(1.15)


def test_a_cap_that_does_not_bind_gives_a_cut_search_the_rest_of_the_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from moeplace.solve import solver

    trace, _ = planted_trace(400, 4, 16, 2, 4, seed=3)
    real, calls = solver.search_traffic, []

    def first_cut(*args: object, **kwargs: object) -> solver.SearchResult:
        found = real(*args, **kwargs)
        calls.append((args[5], kwargs.get("incumbent") is not None))  # (seed, continued from a layout)
        found.cut = len(calls) == 1  # as if the time limit had stopped the uncapped search
        return found

    monkeypatch.setattr(solver, "search_traffic", first_cut)
    p = solve_placement(trace, 4, time_limit=30, seed=0, coselect_weight=2.0, smoothing=0.5, prior=0.5,
                        max_imbalance=5.0)
    assert calls == [(0, False), (1, True)]  # the rest on another seed, from the first layout
    assert p.objective["value"] <= p.objective["value_without_cap"] + 1e-9
    calls.clear()
    monkeypatch.setattr(solver, "search_traffic", real)
    free = solve_placement(trace, 4, time_limit=30, seed=0, coselect_weight=2.0, smoothing=0.5, prior=0.5)
    loose = solve_placement(trace, 4, time_limit=30, seed=0, coselect_weight=2.0, smoothing=0.5, prior=0.5,
                            max_imbalance=5.0)
    assert np.array_equal(loose.expert_to_gpu, free.expert_to_gpu) and "load cap" not in loose.solver["method"]


def test_layers_at_their_floor_are_told_apart_and_the_summary_says_what_helps() -> None:
    """Layer 0 (loads 30 / 1 / 1 / 1, 2 GPUs): the hot expert's GPU carries at least 30 + 1, so
    31 is the least any equal-count layout has; layer 1 (10 / 9 / 1 / 1 as {10, 9} | {1, 1})
    could go to 11. Both are above a cap of 1.0."""
    from moeplace.solve.summary import cap_line, cap_remedy

    cap = LoadCap.from_ratio(np.array([[30.0, 1, 1, 1], [10, 9, 1, 1]]), 1.0, 2)
    x = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    assert cap.above(x, 2) == [0, 1] and cap.at_floor(x, 2) == [0]
    objective = {"name": "traffic", "max_imbalance": 1.0, "value": 2.0, "value_without_cap": 1.0,
                 "layers_above_max_imbalance": [0, 1], "layers_at_least_imbalance": [0]}
    remedy = cap_remedy(objective)
    assert remedy.startswith("layers [0] cannot go lower with equal expert counts (--redundant-experts R")
    assert "for layers [1], the swaps found no layout of equal expert counts under it: --objective balance" in remedy
    assert cap_remedy({**objective, "layers_at_least_imbalance": [0, 1]}).startswith("no layout of equal expert counts")
    placed = Placement(x, 2, 2, objective=objective, metrics={"held_out": {"placement": {"imbalance_max": 1.4}}})
    line = cap_line(placed)[0]
    assert "on the held-out tokens the worst layer is at 1.400 (the cap holds on the fit tokens only)" in line
    placed.metrics["held_out"]["placement"]["imbalance_max"] = 1.0
    assert cap_line(placed)[0].endswith("worst layer is at 1.000")


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
    # one expert per GPU: no layout changes a GPU's load, and the warning says what does
    few, _ = planted_trace(400, 3, 4, 2, 4, zipf=1.2, seed=3)
    save_trace(few, tmp_path / "few.npz")
    assert run(["solve", str(tmp_path / "few.npz"), "--gpus", "4", "--max-imbalance", "1.1", "-q", "-o", str(out)]) == 0
    assert "load cap" not in json.loads(out.read_text())["solver"]["method"]  # no second search to run
    err = capsys.readouterr().err
    assert "(no layout of equal expert counts goes lower" in err and "--redundant-experts R" in err
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
