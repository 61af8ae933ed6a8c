"""Re-placement: `moeplace solve --from CURRENT.json [--move-cost W] [--max-moves N]` (solve/migrate.py)."""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.errors import MoeplaceError
from moeplace.eval.metrics import evaluate
from moeplace.placement import Placement, load_placement
from moeplace.solve import chain, ilp
from moeplace.solve.affinity import distance_matrix, edge_weights, placement_cost
from moeplace.solve.baselines import random_balanced
from moeplace.solve.costmodel import load_cost_model, predict
from moeplace.solve.heuristics import (
    MoveLimit, coordinate_descent, layer_costs, objective_cost, repair_layer, swap_deltas, swap_descent, with_move_cost,
)
from moeplace.solve.migrate import best_relabeling, moves, relabel
from moeplace.solve.solver import SearchResult, _search_limited, solve_placement
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import save_trace

from conftest import ROOT

FAST: dict[str, Any] = {"time_limit": 20.0, "restarts": 2, "kicks": 4}  # deterministic work, well inside the limit


def group(num_gpus: int, gpus_per_node: int) -> list[np.ndarray]:
    """Every permutation of whole nodes and of GPUs within each node, label int [G] each."""
    nodes = num_gpus // gpus_per_node
    out = []
    for node_perm in itertools.permutations(range(nodes)):
        for inner in itertools.product(*[list(itertools.permutations(range(gpus_per_node)))] * nodes):
            label = np.empty(num_gpus, dtype=np.int64)
            for n in range(nodes):
                label[n * gpus_per_node + np.arange(gpus_per_node)] = node_perm[n] * gpus_per_node + np.array(inner[n])
            out.append(label)
    return out


@pytest.mark.parametrize("num_gpus,gpus_per_node", [(4, 4), (4, 2), (6, 3), (6, 2), (8, 2)])
def test_relabeling_is_the_best_of_all_node_and_gpu_permutations(num_gpus: int, gpus_per_node: int) -> None:
    for seed in range(4):
        new = random_balanced(5, 2 * num_gpus, num_gpus, seed)
        current = random_balanced(5, 2 * num_gpus, num_gpus, seed + 100)
        if seed == 3:  # CURRENT close to a relabelled `new`: the optimum is unique and large
            current = group(num_gpus, gpus_per_node)[-1][new]
            current[0, :2] = current[0, 1::-1]
        label = best_relabeling(new, current, num_gpus, gpus_per_node)
        assert any(np.array_equal(label, g) for g in group(num_gpus, gpus_per_node))  # a valid relabelling
        kept = int((label[new] == current).sum())
        assert kept == max(int((g[new] == current).sum()) for g in group(num_gpus, gpus_per_node))


def test_traffic_and_metrics_are_blind_to_the_relabeling() -> None:
    trace, _ = planted_trace(300, 4, 16, 2, 8, 4, seed=2)
    graph = edge_weights(trace)
    distance = distance_matrix(8, 4, 2.0)
    layout = random_balanced(4, 16, 8, 1)
    base = evaluate(Placement(layout, 8, 4), trace)
    for label in group(8, 4)[::97]:
        assert placement_cost(graph, label[layout], distance) == pytest.approx(placement_cost(graph, layout, distance),
                                                                              rel=1e-12)
        assert evaluate(Placement(label[layout], 8, 4), trace) == base


def test_latency_is_blind_to_the_relabeling_except_layer_zero_dispatch() -> None:
    """costmodel.py: every layer's compute and combine, and the dispatch of layers >= 1, are
    per-GPU maxima over a link class that a node / GPU-within-node permutation keeps. Layer 0's
    dispatch is not: tokens start on GPU t % G (eval.metrics.initial_homes), a fixed labelling."""
    cost = load_cost_model(ROOT / "configs" / "cluster" / "h100-2x8-ib.yaml",
                           ROOT / "configs" / "model" / "flame-moe-290m.yaml")
    trace, _ = planted_trace(400, 4, 32, 2, 16, 8, seed=4)
    layout = random_balanced(4, 32, 16, 0)
    base = predict(cost, Placement(layout, 16, 8), trace)
    changed = False
    rng = np.random.default_rng(0)  # the group (2 x 8!^2 members) is too large to list: draw some
    for _ in range(5):
        nodes = rng.permutation(2)
        label = np.concatenate([nodes[n] * 8 + rng.permutation(8) for n in range(2)])
        t = predict(cost, Placement(label[layout], 16, 8), trace)
        np.testing.assert_allclose(t.compute_us, base.compute_us, rtol=1e-12)
        np.testing.assert_allclose(t.combine_us, base.combine_us, rtol=1e-12)
        np.testing.assert_allclose(t.dispatch_us[1:], base.dispatch_us[1:], rtol=1e-12)
        changed |= not np.isclose(t.dispatch_us[0], base.dispatch_us[0], rtol=1e-12)
    assert changed  # the exception is real: the latency value is re-predicted after relabelling


def test_solve_from_its_own_output_moves_nothing_and_changes_no_figure() -> None:
    trace, _ = planted_trace(400, 4, 16, 2, 8, 4, seed=1)
    first = solve_placement(trace, 8, 4, seed=0, **FAST)
    # CURRENT: the same layout with nodes and GPUs renamed; the plain solve would move almost all
    shuffled = Placement(group(8, 4)[-1][first.expert_to_gpu], 8, 4)
    assert moves(first.expert_to_gpu, shuffled.expert_to_gpu).sum() > 40
    again = solve_placement(trace, 8, 4, seed=0, current=shuffled, **FAST)
    assert again.extra["migration"]["moved"] == 0
    np.testing.assert_array_equal(again.expert_to_gpu, shuffled.expert_to_gpu)
    assert again.objective["value"] == pytest.approx(first.objective["value"], rel=1e-12)
    assert again.metrics == first.metrics  # every metric of the relabelled placement, train and held out
    priced = solve_placement(trace, 8, 4, seed=0, current=shuffled, move_cost=1.0, **FAST)
    assert priced.extra["migration"]["moved"] == 0
    assert priced.objective["move_cost"]["traffic"] == pytest.approx(first.objective["value"], rel=1e-9)


def test_move_cost_trades_moves_for_traffic_on_a_shifted_trace() -> None:
    old, _ = planted_trace(600, 4, 16, 2, 4, seed=7)
    new, _ = planted_trace(600, 4, 16, 2, 4, seed=8)  # another planted layout: the traffic moved
    current = solve_placement(old, 4, seed=0, **FAST)
    results = {w: solve_placement(new, 4, seed=0, current=current, move_cost=w, **FAST) for w in (0.0, 0.05, 1e4)}
    moved = {w: p.extra["migration"]["moved"] for w, p in results.items()}
    traffic = {w: p.objective["move_cost"]["traffic"] for w, p in results.items()}
    assert moved[0.0] > 16 and moved[1e4] == 0
    assert moved[0.05] <= moved[0.0]
    assert traffic[0.0] < traffic[1e4]
    np.testing.assert_array_equal(results[1e4].expert_to_gpu, current.expert_to_gpu)
    for p in results.values():  # the value is the penalised cost; the traffic-only bound stays under it
        mc = p.objective["move_cost"]
        assert p.objective["value"] == pytest.approx(mc["traffic"] + mc["per_move"] * p.extra["migration"]["moved"])
        assert p.bound <= mc["traffic"] + 1e-6
    assert results[0.0].objective["move_cost"]["without_move_cost"]["value"] <= traffic[0.0] + 1e-6


def test_unary_cost_enters_layer_scores_swaps_and_the_ilp() -> None:
    trace, _ = planted_trace(200, 2, 4, 2, 2, seed=3)
    graph = edge_weights(trace)
    distance = distance_matrix(2, 2, 1.0)
    current = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])  # expert 0 on GPU 1: what pin_first would forbid
    moving = with_move_cost(graph, current, 5.0, 2)
    x = np.array([[0, 1, 0, 1], [1, 0, 1, 0]])
    assert objective_cost(moving, x, distance) == pytest.approx(placement_cost(graph, x, distance) + 4 * 5.0)
    # a swap's delta (layer_costs -> swap_deltas) is the change of the penalised objective
    delta = swap_deltas(layer_costs(moving, x, 1, distance), x[1], graph.intra[1], distance)
    y = x.copy()
    y[1, [1, 2]] = y[1, [2, 1]]  # layer 1 back to CURRENT's
    assert delta[1, 2] == pytest.approx(objective_cost(moving, y, distance) - objective_cost(moving, x, distance))
    # the whole-model ILP (pin_first dropped: the unary names GPUs) finds the brute-force optimum
    rows = [np.array(r) for r in itertools.product(range(2), repeat=4) if sum(r) == 2]
    best = min(objective_cost(moving, np.stack([a, b]), distance) for a in rows for b in rows)
    heavy = with_move_cost(graph, current, 1e3, 2)  # keeping CURRENT is the optimum, expert 0 on GPU 1
    assert ilp.solve_window(heavy, x, range(2), distance, 2, 30.0, pin_first=True).expert_to_gpu.tolist() == current.tolist()
    res = ilp.solve_window(moving, x, range(2), distance, 2, 30.0, pin_first=True)
    assert res.cost == pytest.approx(best)
    assert objective_cost(moving, res.expert_to_gpu, distance) == pytest.approx(best)


def test_refusals_name_the_difference(tmp_path: Path) -> None:
    trace, _ = planted_trace(200, 3, 16, 2, 4, seed=0)
    save_trace(trace, tmp_path / "t.npz")
    out = str(tmp_path / "p.json")
    assert run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", "-q", "-o", str(tmp_path / "cur.json")]) == 0
    cur = load_placement(tmp_path / "cur.json")
    with pytest.raises(MoeplaceError, match="it has 4 GPUs, this solve 8"):
        solve_placement(trace, 8, current=cur, **FAST)
    with pytest.raises(MoeplaceError, match="it has 4 GPUs per node, this solve 2"):
        solve_placement(trace, 4, 2, current=cur, **FAST)
    other, _ = planted_trace(200, 2, 16, 2, 4, seed=0)
    with pytest.raises(MoeplaceError, match="it has 3 MoE layers, this solve 2"):
        solve_placement(other, 4, current=cur, **FAST)
    with pytest.raises(MoeplaceError, match="add --from"):
        solve_placement(trace, 4, move_cost=1.0, **FAST)
    args = ["solve", str(tmp_path / "t.npz"), "--gpus", "4", "-q", "-o", out]
    for extra in (["--move-cost", "1"], ["--from", str(tmp_path / "cur.json"), "--move-cost", "1", "--objective",
                                         "balance"],
                  ["--from", str(tmp_path / "cur.json"), "--gpus-per-node", "2"]):
        assert run(args + extra) == 2
    assert run(args + ["--from", str(tmp_path / "cur.json"), "-o", str(tmp_path / "cur.json")]) == 2  # an input
    assert not Path(out).exists()


def deployed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A traffic shift: cur.json solved on old.npz (planted, 16 experts, 4 GPUs), new.npz the
    new routing of the same shape; returns cur.json's path."""
    old, _ = planted_trace(300, 3, 16, 2, 4, seed=5)
    new, _ = planted_trace(300, 3, 16, 2, 4, seed=6)
    save_trace(old, tmp_path / "old.npz")
    save_trace(new, tmp_path / "new.npz")
    cur = tmp_path / "cur.json"
    assert run(["solve", str(tmp_path / "old.npz"), "--gpus", "4", "-q", "-o", str(cur)]) == 0
    capsys.readouterr()
    return cur


def test_cli_records_the_from_placement_and_the_moves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cur = deployed(tmp_path, capsys)  # new.npz beside it
    assert run(["solve", str(tmp_path / "new.npz"), "--gpus", "4", "--from", str(cur), "--move-cost", "0.5",
                "-o", str(tmp_path / "p.json")]) == 0
    text = capsys.readouterr().out
    doc = json.loads((tmp_path / "p.json").read_text())
    m = doc["migration"]
    assert m["from"] == {"path": str(cur), "sha256": hashlib.sha256(cur.read_bytes()).hexdigest()}
    assert m["of"] == 48 and sum(m["moved_per_layer"]) == m["moved"] and len(m["moved_per_layer"]) == 3
    assert m["moved"] == int((np.array(doc["expert_to_gpu"]) != np.array(json.loads(cur.read_text())["expert_to_gpu"])).sum())
    assert f"moved {m['moved']} of 48 experts ({m['moved'] / 48:.1%}) from {cur}" in text
    assert "for the unpenalised solve" in text and "--move-cost 0.5 token transitions" in text
    assert load_placement(tmp_path / "p.json").extra["migration"] == m  # kept on a round trip
    # balance on the same trace: free relabelling only, same figure as without --from
    assert run(["solve", str(tmp_path / "new.npz"), "--gpus", "4", "--objective", "balance", "-q",
                "-o", str(tmp_path / "b0.json")]) == 0
    assert run(["solve", str(tmp_path / "new.npz"), "--gpus", "4", "--objective", "balance", "--from", str(cur), "-q",
                "-o", str(tmp_path / "b1.json")]) == 0
    b0, b1 = (json.loads((tmp_path / f"b{i}.json").read_text()) for i in (0, 1))
    assert b1["objective"]["value"] == b0["objective"]["value"] and b1["metrics"] == b0["metrics"]
    assert b1["migration"]["moved"] <= int((np.array(b0["expert_to_gpu"]) != np.array(
        json.loads(cur.read_text())["expert_to_gpu"])).sum())
    label = best_relabeling(np.array(b0["expert_to_gpu"]), np.array(json.loads(cur.read_text())["expert_to_gpu"]), 4, 4)
    assert relabel(np.array(b0["expert_to_gpu"]), [], label)[0].tolist() == b1["expert_to_gpu"]


def test_latency_from_keeps_its_value_the_predicted_time_of_the_relabelled_placement() -> None:
    cost = load_cost_model(ROOT / "configs" / "cluster" / "h100-1x4-nvlink.yaml",
                           ROOT / "configs" / "model" / "flame-moe-290m.yaml")
    trace, _ = planted_trace(300, 3, 16, 2, 4, seed=9)
    cur = Placement(random_balanced(3, 16, 4, 3), 4, 4)
    p = solve_placement(trace, 4, objective="latency", cost=cost, current=cur, time_limit=20.0, seed=0)
    plain = solve_placement(trace, 4, objective="latency", cost=cost, time_limit=20.0, seed=0)
    t = predict(cost, p, trace)
    assert p.objective["value"] == pytest.approx(float(t.total_us.sum()), rel=1e-9)
    assert p.objective["value"] - plain.objective["value"] == pytest.approx(p.objective["relabeling_delta_us"], abs=1e-6)
    assert p.extra["migration"]["moved"] <= int((plain.expert_to_gpu != cur.expert_to_gpu).sum())


# --- --max-moves N with the traffic objective ---------------------------------------------------


def per_gpu_counts(layout: np.ndarray, num_gpus: int) -> list[list[int]]:
    return [np.bincount(row, minlength=num_gpus).tolist() for row in layout]


def test_repair_and_limited_swaps_keep_the_limit_and_equal_counts() -> None:
    rng = np.random.default_rng(0)
    distance = distance_matrix(4, 2, 2.0)
    home = random_balanced(1, 16, 4, 1)[0]
    for seed in range(5):
        gpus = random_balanced(1, 16, 4, 10 + seed)[0]
        cost = rng.random((16, 4)) * 10
        intra = np.triu(rng.random((16, 16)) * (rng.random((16, 16)) < 0.2), 1)
        intra = intra + intra.T
        before = int((gpus != home).sum())
        assert before > 4
        for n in (4, 2, 1, 0):
            x, c = gpus.copy(), cost.copy()
            for a in range(16):  # the cost table with intra edges at x's GPUs, as layer_costs builds it
                c[a] += intra[a] @ distance[x]
            repair_layer(c, x, intra, distance, home, n)
            moved = int((x != home).sum())
            assert moved <= n and moved >= n - 1  # exchanges back revert one or two moves at a time, and stop at N
            assert moved != 1  # equal counts: no layer moves exactly one expert
            assert np.bincount(x, minlength=4).tolist() == [4] * 4
            swap_descent(c, x, intra, distance, home=home, max_moves=n)
            assert int((x != home).sum()) <= n and np.bincount(x, minlength=4).tolist() == [4] * 4
        y, c = gpus.copy(), cost.copy()
        # over the limit: no swap adds a move, but swaps that keep the layer as far over it still improve it
        # (one swap reverts at most two moves, so none of them brings `before` > 4 moves within N = 2)
        assert swap_descent(c, y, intra, distance, home=home, max_moves=2) > 0
        assert int((y != home).sum()) <= before


def test_limited_ilp_and_descent_against_brute_force() -> None:
    """The single-layer and whole-model ILP take sum_e x[l, e, current(l, e)] >= E - N as a
    constraint (and drop the GPU-symmetry pin: the limit names CURRENT's GPUs)."""
    trace, _ = planted_trace(300, 2, 6, 2, 2, seed=11)
    graph = edge_weights(trace)
    distance = distance_matrix(2, 2, 1.0)
    current = np.array([[1, 1, 1, 0, 0, 0], [0, 1, 0, 1, 0, 1]])
    rows = [np.array(r) for r in itertools.product(range(2), repeat=6) if sum(r) == 3]
    for n in (0, 2, 4):
        limit = MoveLimit(current, n)
        best = min(placement_cost(graph, np.stack([a, b]), distance) for a in rows for b in rows
                   if (a != current[0]).sum() <= n and (b != current[1]).sum() <= n)
        res = ilp.solve_window(graph, current, range(2), distance, 2, 30.0, pin_first=True, moves=limit)
        assert res.optimal and res.cost == pytest.approx(best)
        assert limit.over(res.expert_to_gpu) == []
        one = ilp.solve_window(graph, current, range(1), distance, 2, 30.0, moves=limit)  # layer 1 fixed at CURRENT
        assert limit.moves(one.expert_to_gpu[0], 0) <= n and one.expert_to_gpu[1].tolist() == current[1].tolist()
        x = current.copy()
        coordinate_descent(graph, x, distance, moves=limit)
        assert limit.over(x) == [] and placement_cost(graph, x, distance) >= best - 1e-9
    free = min(placement_cost(graph, np.stack([a, b]), distance) for a in rows for b in rows)
    assert best == pytest.approx(free)  # N = 4 of 6: no limit here, the unlimited optimum


def shifted(layers: int = 4, experts: int = 16, gpus: int = 4) -> tuple[Placement, Any]:
    """CURRENT fitted on one planted trace, and another planted trace (the traffic moved)."""
    old, _ = planted_trace(600, layers, experts, 2, gpus, seed=7)
    new, _ = planted_trace(600, layers, experts, 2, gpus, seed=8)
    return solve_placement(old, gpus, seed=0, **FAST), new


def test_max_moves_holds_on_every_layer_and_zero_keeps_current() -> None:
    current, new = shifted()
    free = solve_placement(new, 4, seed=0, current=current, **FAST)
    assert min(free.extra["migration"]["moved_per_layer"]) > 4  # the limits below bind
    values = {}
    for n in (0, 1, 2, 4):
        p = solve_placement(new, 4, seed=0, current=current, max_moves=n, **FAST)
        recount = moves(p.expert_to_gpu, current.expert_to_gpu).tolist()
        mm = p.objective["max_moves"]
        assert max(recount) <= n and mm["held"] and mm["N"] == n
        assert mm["moved_per_layer"] == recount == p.extra["migration"]["moved_per_layer"]
        assert per_gpu_counts(p.expert_to_gpu, 4) == [[4] * 4] * 4  # equal counts per GPU
        assert p.objective["value"] == pytest.approx(placement_cost(
            edge_weights(new, 1.0, p.objective["coselect_weight"], p.objective["smoothing"], p.objective["prior"]),
            p.expert_to_gpu, distance_matrix(4, 4, 2.0)), rel=1e-9)
        assert p.bound <= p.objective["value"] + 1e-6  # the unlimited bound stays a lower bound
        assert mm["without_max_moves"]["traffic"] == pytest.approx(free.objective["value"], rel=1e-9)
        values[n] = p.objective["value"]
        if n <= 1:  # N = 1 allows no move either: CURRENT exactly, in its own GPU names
            np.testing.assert_array_equal(p.expert_to_gpu, current.expert_to_gpu)
    # CURRENT is a start of every N, so N > 0 is never worse than N = 0; here the limit binds
    assert values[0] > values[2] > free.objective["value"] and values[0] > values[4] > free.objective["value"]
    # both limits: the value is traffic + the move price, the moves within N
    both = solve_placement(new, 4, seed=0, current=current, max_moves=2, move_cost=0.05, **FAST)
    mc = both.objective["move_cost"]
    assert max(moves(both.expert_to_gpu, current.expert_to_gpu)) <= 2
    assert both.objective["value"] == pytest.approx(mc["traffic"] + mc["per_move"] * both.extra["migration"]["moved"])
    assert both.objective["max_moves"]["traffic"] == pytest.approx(mc["traffic"])


def test_limited_search_is_never_worse_than_current_descended_within_the_limit() -> None:
    """CURRENT is a start of the limited search: however poor the free solve's layout (here a random
    one, as a free solve cut short by its time limit may leave), the result is at least as good as
    CURRENT improved by swaps within N (a search from the repaired free layout alone ends worse)."""
    new, _ = planted_trace(400, 4, 16, 2, 4, seed=210)
    graph, distance = edge_weights(new), distance_matrix(4, 4, 2.0)
    current, poor = random_balanced(4, 16, 4, 10), random_balanced(4, 16, 4, 60)
    free = SearchResult(poor, objective_cost(graph, poor, distance), 0.0, "random", {}, False)
    limit = MoveLimit(current, 6)
    x = current.copy()
    coordinate_descent(graph, x, distance, moves=limit)
    found, record = _search_limited(graph, graph, free, current, 6, time.monotonic() + 60, num_gpus=4, gpus_per_node=4,
                                    node_cost=2.0, seed=0, kicks=0, exact=False, progress=False)
    assert limit.over(found.expert_to_gpu) == [] and record["held"]
    assert found.cost <= objective_cost(graph, x, distance) + 1e-9


@pytest.mark.parametrize("method", ["exact-dp", "exact-ilp"])
def test_max_moves_is_monotone_and_large_n_is_the_unlimited_optimum(method: str, monkeypatch) -> None:
    """Small enough for an exact method with and without the limit (the shortest path over
    layouts, or with it turned off the whole-model ILP): the optimum falls as N grows, and N = E
    (every layer free) gives the unlimited one."""
    if method == "exact-ilp":
        monkeypatch.setattr(chain, "MAX_LAYOUTS", 0)
    old, _ = planted_trace(300, 3, 8, 2, 2, seed=7)
    new, _ = planted_trace(300, 3, 8, 2, 2, seed=8)
    current = solve_placement(old, 2, seed=0, **FAST)
    free = solve_placement(new, 2, seed=0, current=current, **FAST)
    assert free.solver["method"] == method and max(free.extra["migration"]["moved_per_layer"]) > 2
    values = []
    for n in (0, 2, 4, 8):
        p = solve_placement(new, 2, seed=0, current=current, max_moves=n, **FAST)
        assert p.solver["method"].endswith(f"within --max-moves: {method}")
        assert max(moves(p.expert_to_gpu, current.expert_to_gpu)) <= n
        # the bound is the better of the unlimited one and the limited ILP's, which proves this optimum
        assert p.objective["value"] * (1 - 1e-4) <= p.bound <= p.objective["value"] + 1e-6
        values.append(p.objective["value"])
    # HiGHS proves optimality to its relative MIP gap (1e-4), so "equal" and "not above" are within it
    assert all(later <= earlier * (1 + 1e-4) for earlier, later in zip(values, values[1:]))
    assert values[0] > values[-1] * 1.5  # the limit binds at N = 0
    assert values[-1] == pytest.approx(free.objective["value"], rel=1e-4)


def test_max_moves_on_one_layer_keeps_current_where_the_free_layout_moves_more() -> None:
    old, _ = planted_trace(200, 1, 8, 2, 2, seed=1)
    new, _ = planted_trace(200, 1, 8, 2, 2, seed=2)
    current = Placement(np.array([[0, 1, 0, 1, 0, 1, 0, 1]]), 2, 2)
    p = solve_placement(new, 2, current=current, max_moves=0, **FAST)
    np.testing.assert_array_equal(p.expert_to_gpu, current.expert_to_gpu)
    assert p.objective["max_moves"]["moved_per_layer"] == [0]
    assert p.objective["max_moves"]["without_max_moves"]["moved"] > 0


def test_cli_max_moves_records_moves_that_a_recount_confirms(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    cur = deployed(tmp_path, capsys)  # new.npz beside it
    current = np.array(json.loads(cur.read_text())["expert_to_gpu"])
    for n in (2, 1):
        out = tmp_path / f"p{n}.json"
        assert run(["solve", str(tmp_path / "new.npz"), "--gpus", "4", "--from", str(cur), "--max-moves", str(n),
                    "--train-fraction", "0.5", "-o", str(out)]) == 0
        text = capsys.readouterr().out
        doc = json.loads(out.read_text())
        recount = (np.array(doc["expert_to_gpu"]) != current).sum(axis=1).tolist()
        mm = doc["objective"]["max_moves"]
        assert mm["moved_per_layer"] == recount == doc["migration"]["moved_per_layer"] and max(recount) <= n
        assert mm["N"] == n and mm["of"] == 48
        mean = f"{sum(recount) / 3:.2f}"
        assert (f"--max-moves {n} (experts off their CURRENT GPU, per layer): moved per layer mean {mean}, "
                f"max {max(recount)}; the limit held on every layer") in text
        assert ("N = 1 allows no move" in text) == (n == 1)
        assert load_placement(out).objective["max_moves"] == mm  # kept on a round trip
    assert recount == [0, 0, 0]  # N = 1: no move
    assert mm["without_max_moves"]["moved"] > 0  # ... where the solve without the limit moves some


def test_max_moves_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, _ = planted_trace(200, 2, 8, 2, 4, seed=1)
    save_trace(trace, tmp_path / "t.npz")
    cur = tmp_path / "cur.json"
    assert run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", "-q", "-o", str(cur)]) == 0
    capsys.readouterr()
    out = tmp_path / "p.json"
    cluster = str(ROOT / "configs" / "cluster" / "h100-1x4-nvlink.yaml")
    for extra, says in ((["--max-moves", "2"], "add --from CURRENT.json"),
                        (["--objective", "latency", "--cluster", cluster, "--from", str(cur), "--max-moves", "2"],
                         "traffic and balance"),
                        (["--from", str(cur), "--max-moves", "2", "--max-imbalance", "1.2"], "drop one of them")):
        assert run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", *extra, "-q", "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
    with pytest.raises(MoeplaceError, match="add --from CURRENT.json"):  # the library says the same
        solve_placement(trace, 4, max_moves=2, **FAST)
    with pytest.raises(MoeplaceError, match="traffic and balance"):
        solve_placement(trace, 4, objective="latency", current=load_placement(cur), max_moves=2, cluster=cluster,
                        time_limit=5.0)
    with pytest.raises(MoeplaceError, match="drop one of them"):
        solve_placement(trace, 4, current=load_placement(cur), max_moves=2, max_imbalance=1.2, **FAST)
