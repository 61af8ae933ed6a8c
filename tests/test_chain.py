"""The exact shortest path through whole-layer layouts (solve/chain.py) against brute force."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from moeplace.solve import chain
from moeplace.solve.affinity import AffinityGraph, distance_matrix, placement_cost
from moeplace.solve.heuristics import LoadCap, MoveLimit, MovingGraph, objective_cost
from moeplace.solve.solver import search_traffic


def random_graph(rng: np.random.Generator, layers: int, experts: int) -> AffinityGraph:
    inter = rng.random((layers - 1, experts, experts)) * (rng.random((layers - 1, experts, experts)) < 0.6)
    intra = np.triu(rng.random((layers, experts, experts)) * (rng.random((layers, experts, experts)) < 0.5), 1)
    return AffinityGraph(inter, intra + intra.transpose(0, 2, 1))


def brute_force(graph: AffinityGraph, d: np.ndarray, allowed) -> float:
    """The least objective_cost over every product of allowed layouts (allowed(layer, layout) -> bool)."""
    per_gpu = graph.num_experts // d.shape[0]
    layouts = sorted(set(itertools.permutations(np.repeat(np.arange(d.shape[0]), per_gpu))))
    options = [[np.array(a) for a in layouts if allowed(l, np.array(a))] for l in range(graph.num_layers)]
    return min((objective_cost(graph, np.stack(x), d) for x in itertools.product(*options)), default=math.inf)


@pytest.mark.parametrize("experts,gpus", [(4, 2), (6, 3), (6, 2), (8, 4), (6, 6)])
def test_layouts_are_every_balanced_assignment_once_in_order(experts, gpus):
    got = chain.all_layouts(experts, gpus)
    assert len(got) == chain.num_layouts(experts, gpus) == len({tuple(r) for r in got})
    assert (np.stack([np.bincount(r, minlength=gpus) for r in got]) == experts // gpus).all()
    assert [tuple(r) for r in got] == sorted(tuple(r) for r in got)


def test_tractable_only_where_g_divides_e_and_layouts_are_few():
    assert chain.tractable(8, 4) and chain.tractable(8, 2) and chain.tractable(6, 6)
    assert not chain.tractable(8, 8)  # 40,320 layouts
    assert not chain.tractable(16, 4) and not chain.tractable(6, 4)


@pytest.mark.parametrize("experts,gpus,gpn,layers", [(4, 2, 2, 4), (6, 3, 3, 2), (4, 4, 2, 2), (6, 2, 1, 3)])
def test_optimum_equals_brute_force_with_nodes_and_intra_edges(experts, gpus, gpn, layers):
    rng = np.random.default_rng(experts * 100 + gpus * 10 + layers)
    graph = random_graph(rng, layers, experts)
    d = distance_matrix(gpus, gpn, 3.0)
    got = chain.solve_chain(graph, d, time.monotonic() + 60)
    best = brute_force(graph, d, lambda l, a: True)
    assert objective_cost(graph, got.expert_to_gpu, d) == pytest.approx(best, rel=1e-12)
    assert got.value == pytest.approx(best, rel=1e-12)
    assert (np.stack([np.bincount(r, minlength=gpus) for r in got.expert_to_gpu]) == experts // gpus).all()


def test_move_costs_caps_and_move_limits_are_honoured_exactly():
    rng = np.random.default_rng(11)
    graph = random_graph(rng, 2, 6)
    d = distance_matrix(2, 2, 1.0)
    current = np.stack([rng.permutation(np.repeat(np.arange(2), 3)) for _ in range(2)])
    moving = MovingGraph(graph.inter, graph.intra, 0.4 * (current[..., None] != np.arange(2)))
    got = chain.solve_chain(moving, d, time.monotonic() + 60)
    assert got.value == pytest.approx(brute_force(moving, d, lambda l, a: True), rel=1e-12)
    assert got.value > placement_cost(graph, chain.solve_chain(graph, d, time.monotonic() + 60).expert_to_gpu, d)

    loads = rng.integers(1, 20, size=(2, 6)).astype(float)
    cap = LoadCap.from_ratio(loads, 1.1, 2)
    under = lambda l, a: np.bincount(a, weights=loads[l], minlength=2).max() <= cap.limits[l]  # noqa: E731
    free = chain.solve_chain(graph, d, time.monotonic() + 60)
    capped = chain.solve_chain(graph, d, time.monotonic() + 60, cap=cap)
    assert cap.above(free.expert_to_gpu, 2) != []  # the cap binds
    assert capped is not None and cap.above(capped.expert_to_gpu, 2) == []
    assert capped.value == pytest.approx(brute_force(graph, d, under), rel=1e-12) and capped.value > free.value

    deployed = np.array([[0, 0, 0, 1, 1, 1]] * 2)  # GPU names count here: the limit is in CURRENT's names
    limit = MoveLimit(deployed, 2)
    within = lambda l, a: (a != deployed[l]).sum() <= 2  # noqa: E731
    limited = chain.solve_chain(graph, d, time.monotonic() + 60, moves=limit)
    assert limit.over(free.expert_to_gpu) != [] and limit.over(limited.expert_to_gpu) == []
    assert limited.value == pytest.approx(brute_force(graph, d, within), rel=1e-12) and limited.value > free.value


def test_no_layout_within_the_cap_or_past_the_deadline_is_none():
    graph = random_graph(np.random.default_rng(2), 3, 4)
    d = distance_matrix(2, 2, 1.0)
    loads = np.array([[10.0, 1, 1, 1]] * 3)  # the hot expert alone is above a 1.0 cap
    assert chain.solve_chain(graph, d, time.monotonic() + 60, cap=LoadCap.from_ratio(loads, 1.0, 2)) is None
    assert chain.solve_chain(graph, d, time.monotonic() - 1) is None


def test_search_uses_it_proves_the_optimum_and_keeps_a_tied_incumbent(monkeypatch):
    """6 experts on 2 GPUs: the search reports exact-dp with gap 0 at the brute-force optimum; the
    whole-model ILP (the path turned off) proves the same value; an optimal incumbent is kept."""
    graph = random_graph(np.random.default_rng(5), 3, 6)
    found = search_traffic(graph, 2, 2, 2.0, time.monotonic() + 60, 0, restarts=2, kicks=4)
    assert found.method == "exact-dp" and found.bound == pytest.approx(found.cost, rel=1e-12) and not found.cut
    assert found.cost == pytest.approx(brute_force(graph, distance_matrix(2, 2, 2.0), lambda l, a: True), rel=1e-12)
    monkeypatch.setattr(chain, "MAX_LAYOUTS", 0)
    by_ilp = search_traffic(graph, 2, 2, 2.0, time.monotonic() + 60, 0, restarts=2, kicks=4)
    assert by_ilp.method == "exact-ilp" and by_ilp.cost == pytest.approx(found.cost, rel=1e-9)
    monkeypatch.setattr(chain, "MAX_LAYOUTS", 4096)
    # GPU names swapped: the same cost, so the path's own optimum (a tie) does not replace it
    renamed = 1 - by_ilp.expert_to_gpu
    kept = search_traffic(graph, 2, 2, 2.0, time.monotonic() + 60, 0, restarts=0, kicks=0, incumbent=renamed)
    assert kept.method == "exact-dp"
    np.testing.assert_array_equal(kept.expert_to_gpu, renamed)
