"""The latency search's incremental token counts (SearchModels._delta) against full recounts."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.solve.costmodel import Cluster, CostModel, ModelCost, load_cost_model
from moeplace.solve import latency
from moeplace.solve.latency import LatencyModel, SearchModels, fold_tokens
from moeplace.solve.solver import solve_placement
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import Trace, make_trace

from conftest import ROOT

MODEL = ROOT / "configs" / "model" / "flame-moe-290m.yaml"


def _moves(rng: np.random.Generator, e2g: np.ndarray, num_gpus: int) -> list[tuple[np.ndarray, list[int]]]:
    """Candidate placements of every kind the search proposes, each with the layers it changes:
    a swap at each layer, a single expert moved (cap move), a cap move paired at another layer,
    a whole new row (LP step), and no change at all."""
    num_layers, num_experts = e2g.shape
    out = []
    for layer in range(num_layers):
        cand = e2g.copy()
        a = int(rng.integers(num_experts))
        b = int(rng.choice(np.flatnonzero(e2g[layer] != e2g[layer, a])))
        cand[layer, [a, b]] = cand[layer, [b, a]]
        out.append((cand, [layer]))
        cand = e2g.copy()
        cand[layer, a] = (e2g[layer, a] + 1 + rng.integers(num_gpus - 1)) % num_gpus
        out.append((cand, [layer]))
        partner = int((layer + 1 + rng.integers(num_layers - 1)) % num_layers)
        cand = cand.copy()
        cand[partner, rng.integers(num_experts)] = rng.integers(num_gpus)
        out.append((cand, [layer, partner]))
        cand = e2g.copy()
        cand[layer] = rng.permutation(cand[layer])
        out.append((cand, [layer]))
    out.append((e2g.copy(), [0]))
    return out


@pytest.mark.parametrize("tokens, gpus, use_folds", [(203, 4, True), (203, 4, False), (600, 8, True), (64, 16, True)])
def test_delta_equals_full_recount_of_touched_tokens(tokens: int, gpus: int, use_folds: bool) -> None:
    """The sort-free difference of counts (per fold, whole set, layer 0 on its own homes) is the
    difference of two full passes over the same tokens, for every kind of move, on random
    placements (uneven per-GPU counts included) and random token subsets as well as all tokens."""
    trace, _ = planted_trace(tokens, 3, 16, 4, gpus, seed=tokens + gpus)
    cm = load_cost_model(ROOT / "configs/cluster/h100-2x8-ib.yaml", MODEL)
    rng = np.random.default_rng(gpus)
    folds = fold_tokens(trace.num_tokens, seed=2) if use_folds else []
    models = SearchModels(LatencyModel(cm, trace, 1.0, smooth=True), folds)
    for trial in range(6):
        e2g = rng.integers(0, gpus, (3, 16)) if trial % 2 else np.stack(
            [rng.permutation(np.arange(16) % gpus) for _ in range(3)])
        models.reset(e2g)
        for cand, changed in _moves(rng, e2g, gpus):
            for layer in sorted({t for c in changed for t in (c, c + 1) if t < 3}):
                touched, moved = models._touched(e2g, cand, layer)
                extra = np.union1d(touched, rng.choice(trace.num_tokens, 17))  # untouched tokens count 0
                for tokens_used in (touched, extra, np.arange(trace.num_tokens)):
                    if len(tokens_used) == 0:
                        continue
                    got = models._delta(e2g, cand, layer, tokens_used, moved)
                    want = models._count(e2g, layer, tokens_used, cand)
                    assert got.shape == want.shape == (2, 1 + len(folds), models.num_gpus, models.num_gpus)
                    np.testing.assert_array_equal(got, want)
                # and the current counts plus the delta are the candidate's full count
                full = models.counts[layer] + models._delta(e2g, cand, layer, touched, moved)
                np.testing.assert_array_equal(full, models._count(cand, layer))


def test_commit_keeps_counts_and_multiplicities_of_the_current_placement() -> None:
    """A chain of proposed and committed moves (kept or not) leaves the kept counts and GPU
    multiplicities those of a fresh `reset` on the placement reached."""
    trace, _ = planted_trace(300, 4, 16, 4, 8, seed=9)
    cm = load_cost_model(ROOT / "configs/cluster/h100-1x8-nvlink.yaml", MODEL)
    rng = np.random.default_rng(3)
    models = SearchModels(LatencyModel(cm, trace, 1.0, smooth=True), fold_tokens(trace.num_tokens, seed=0))
    fresh = SearchModels(LatencyModel(cm, trace, 1.0, smooth=True), fold_tokens(trace.num_tokens, seed=0))
    best = np.stack([rng.permutation(np.arange(16) % 8) for _ in range(4)])
    parts = models.reset(best)
    for step in range(40):
        cand, changed = _moves(rng, best, 8)[rng.integers(16)]
        touched = sorted({t for c in changed for t in (c, c + 1) if t < 4})
        costs, counts = models.propose(best, cand, touched)
        for got, want in zip(costs, models.layers(cand, touched)):
            np.testing.assert_array_equal(got, want)
        if step % 3:
            models.commit(touched, counts)
            best = cand
            for p, c in zip(parts, costs):
                p[touched] = c
    for got, want in zip(parts, fresh.reset(best)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(models.e2g, best)
    for mine, theirs in zip(models.mult + models.counts, fresh.mult + fresh.counts):
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("options", [{}, {"max_experts_per_gpu_total": 18}])
def test_solve_is_the_same_as_with_full_recounts(monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    """A latency solve (not cut by its time limit) places every expert as it does when each trial
    move is counted by two passes of costmodel.layer_traffic (the sort-based reference)."""
    trace, _ = planted_trace(1000, 4, 32, 4, 8, seed=5)
    cm = load_cost_model(ROOT / "configs/cluster/h100-1x8-nvlink.yaml", MODEL)

    def solve() -> tuple[list[list[int]], float, dict]:
        p = solve_placement(trace, 8, 8, time_limit=120, seed=1, objective="latency", cost=cm, train_fraction=0.5,
                            **options)
        assert not p.solver["stopped_by_time_limit"]
        return p.expert_to_gpu.tolist(), p.objective["value"], p.solver

    fast = solve()
    monkeypatch.setattr(SearchModels, "_delta", lambda self, e2g, cand, layer, tokens, moved:
                        self._count(e2g, layer, tokens, cand))
    slow = solve()
    assert fast[0] == slow[0] and fast[1] == slow[1]
    moves = ("swaps_accepted", "lp_accepted", "cap_moves_accepted")
    assert [fast[2].get(m) for m in moves] == [slow[2].get(m) for m in moves]
    assert fast[2]["swaps_accepted"] > 0  # the descent's trial moves were counted, and some kept


def test_multiplicities_hold_a_token_with_128_experts_on_one_gpu() -> None:
    """int8 holds a token's count of experts on a GPU up to k = 127; at k = 128 all of a token's
    experts on one GPU count 128 (int16), not -128."""
    ids = np.tile(np.arange(128), (8, 1, 1))  # 8 tokens, 1 layer, each selecting all 128 experts
    cm = load_cost_model(ROOT / "configs/cluster/h100-1x8-nvlink.yaml", MODEL)
    models = SearchModels(LatencyModel(cm, make_trace(ids, num_experts=128), 1.0, smooth=True), [])
    mult = models._multiplicities(np.zeros(128, dtype=np.int64), 0)
    assert mult.shape == (8, 8) and mult[0].tolist() == [128] * 8 and not mult[1:].any()
    one_each = models._multiplicities(np.arange(128) % 8, 0)
    assert (one_each == 16).all()


def test_touched_tokens_select_a_moved_expert_or_start_on_one() -> None:
    """_touched at a layer: the tokens selecting an expert moved there, and those whose top-1
    expert of the layer before moved (their home); layer 0 has no layer before (its homes are
    round-robin), so a move at the last layer touches nothing there."""
    t = np.arange(8)
    ids = np.stack([np.stack([t % 4, (t + 1) % 4], 1), np.stack([(t + 2) % 4, (t + 3) % 4], 1)], 1)  # [8, 2, 2]
    cm = load_cost_model(ROOT / "configs/cluster/h100-1x8-nvlink.yaml", MODEL)
    models = SearchModels(LatencyModel(cm, make_trace(ids, num_experts=4), 1.0, smooth=True), [])
    e2g = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    last = e2g.copy()
    last[1, 0] = 5  # expert 0 of layer 1, selected by tokens with t % 4 in (1, 2)
    assert [x.tolist() for x in models._touched(e2g, last, 1)] == [[1, 2, 5, 6], [0]]
    assert [x.tolist() for x in models._touched(e2g, last, 0)] == [[], []]
    first = e2g.copy()
    first[0, 1] = 5  # expert 1 of layer 0: selected by t % 4 in (0, 1), the top-1 of t % 4 == 1
    assert [x.tolist() for x in models._touched(e2g, first, 0)] == [[0, 1, 4, 5], [1]]
    assert [x.tolist() for x in models._touched(e2g, first, 1)] == [[1, 5], []]


def test_commit_takes_only_the_counts_of_the_last_proposal() -> None:
    """Counts of an earlier proposal, or a commit with none since `reset`, would make another
    placement's counts current: refused."""
    trace, _ = planted_trace(64, 2, 16, 2, 8, seed=1)
    cm = load_cost_model(ROOT / "configs/cluster/h100-1x8-nvlink.yaml", MODEL)
    models = SearchModels(LatencyModel(cm, trace, 1.0, smooth=True), fold_tokens(trace.num_tokens, seed=0))
    e2g = np.tile(np.arange(16) % 8, (2, 1))
    models.reset(e2g)
    with pytest.raises(AssertionError, match="commit what propose just gave"):
        models.commit([0, 1], [c.copy() for c in models.counts])
    first, second = e2g.copy(), e2g.copy()
    first[0, [0, 1]], second[0, [0, 2]] = [1, 0], [2, 0]
    _, stale = models.propose(e2g, first, [0, 1])
    _, fresh = models.propose(e2g, second, [0, 1])
    with pytest.raises(AssertionError, match="commit what propose just gave"):
        models.commit([0, 1], stale)
    models.commit([0, 1], fresh)
    np.testing.assert_array_equal(models.e2g, second)


def _record_tries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[np.ndarray, list[int]]]:
    """latency._accept replaced by a stand-in that notes each (candidate, layers) and keeps none."""
    tried: list[tuple[np.ndarray, list[int]]] = []

    def record(models: SearchModels, best: np.ndarray, cand: np.ndarray, parts: list[np.ndarray], layers: list[int]) -> bool:
        tried.append((cand, layers))
        return False

    monkeypatch.setattr(latency, "_accept", record)
    return tried


def _recorded_search(monkeypatch: pytest.MonkeyPatch, num_layers: int, seed: int
                     ) -> tuple[Trace, SearchModels, np.ndarray, list[np.ndarray], list[tuple[np.ndarray, list[int]]]]:
    """A skewed 16-expert trace on 8 GPUs, its search models, a random 2-per-GPU layout, its
    parts, and the tries of a search (`_record_tries`)."""
    trace, _ = planted_trace(200, num_layers, 16, 2, 8, seed=seed, zipf=1.2)
    cm = load_cost_model(ROOT / "configs/cluster/h100-1x8-nvlink.yaml", MODEL)
    models = SearchModels(LatencyModel(cm, trace, 1.0, smooth=True), fold_tokens(trace.num_tokens, seed=0))
    best = np.stack([np.random.default_rng(layer).permutation(np.arange(16) % 8) for layer in range(num_layers)])
    return trace, models, best, models.reset(best), _record_tries(monkeypatch)


@pytest.mark.parametrize("num_layers, cap", [(3, 7), (3, 6), (2, 4)])
def test_cap_moves_take_an_expert_off_the_hottest_gpu_and_pair_it_where_b_is_full(
        monkeypatch: pytest.MonkeyPatch, num_layers: int, cap: int) -> None:
    """Each cap move (latency._cap_moves) takes one expert off the layer's GPU with the most
    selections to another GPU b; under a cap of 7 (6 held each) b has room and the move is alone;
    at a cap of 6 b is full, so one of b's experts goes to a at the other layer where a has the
    most spare load (the hottest GPU's load less a's), b's least selected expert there (also
    with 2 layers, where the other layer is the one partner)."""
    trace, models, best, parts, tried = _recorded_search(monkeypatch, num_layers, seed=7)
    loads = trace.expert_loads()
    gpu_load = np.stack([np.bincount(row, weights=w, minlength=8) for row, w in zip(best, loads)])  # [L, G]
    layer = 1
    a = int(np.argmax(gpu_load[layer]))
    assert latency._cap_moves(models, best, parts, layer, cap, np.random.default_rng(0), 0.0) == 0 and tried == []
    assert latency._cap_moves(models, best, parts, layer, cap, np.random.default_rng(0), float("inf")) == 0
    assert len(tried) == 16
    for cand, layers in tried:
        moved = np.flatnonzero(cand[layer] != best[layer])
        assert len(moved) == 1 and best[layer, moved[0]] == a and cand[layer, moved[0]] != a
        b = int(cand[layer, moved[0]])
        others = [t for t in range(num_layers) if t != layer]
        if cap > 2 * num_layers:
            assert layers == [layer] and (cand[others] == best[others]).all()
            continue
        partner = others[int(np.argmax([gpu_load[t].max() - gpu_load[t, a] for t in others]))]
        assert layers == [layer, partner]
        mine = np.flatnonzero(best[partner] == b)
        back = mine[np.argmin(loads[partner, mine])]
        assert np.flatnonzero(cand[partner] != best[partner]).tolist() == [back] and cand[partner, back] == a
        assert (np.bincount(cand.ravel(), minlength=8) == cap).all()  # totals stay at the cap


def test_swap_descent_swaps_across_gpus_mostly_off_the_hottest_and_stops_at_the_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """64 tries per call, each a swap of two experts of the layer on different GPUs, one of them
    on the GPU with the most selections in about half the tries (the other half at random: an
    expert there 1 time in 8, or its partner); none once the deadline has passed."""
    trace, models, best, parts, tried = _recorded_search(monkeypatch, 3, seed=6)
    assert latency._swap_descent(models, best, parts, 2, np.random.default_rng(0), 0.0) == 0 and tried == []
    assert latency._swap_descent(models, best, parts, 2, np.random.default_rng(0), float("inf")) == 0
    hottest = int(np.argmax(np.bincount(best[2], weights=trace.expert_loads()[2], minlength=8)))
    on_hottest = 0
    assert len(tried) == 64
    for cand, layers in tried:
        a, b = np.flatnonzero(cand[2] != best[2])
        assert layers == [2] and (cand[:2] == best[:2]).all() and best[2, a] != best[2, b]
        assert (cand[2, a], cand[2, b]) == (best[2, b], best[2, a])
        on_hottest += hottest in (best[2, a], best[2, b])
    assert on_hottest > 0.5 * 64


def test_cap_moves_on_one_gpu_try_nothing() -> None:
    """A single GPU has nowhere to move an expert to: no tries (and no error)."""
    trace, _ = planted_trace(64, 2, 4, 2, 1, seed=2)
    mc = ModelCost("m", 1000, 2.0, 2.0, expert_us_per_token=1.0, expert_fixed_us=1.0, batch_tokens=None)
    cost = CostModel(Cluster("1x1", 1, 1, 1.0, 0.0, 1.0, 0.0), mc)
    models = SearchModels(LatencyModel(cost, trace, 1.0, smooth=True), fold_tokens(trace.num_tokens, seed=0))
    best = np.zeros((2, 4), dtype=np.int64)
    parts = models.reset(best)
    assert latency._cap_moves(models, best, parts, 0, 8, np.random.default_rng(0), float("inf")) == 0
    assert (best == 0).all()


def test_cap_moves_leave_a_hottest_gpu_holding_one_expert_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every GPU keeps at least one expert of each layer: when the hottest GPU holds a single
    expert (expert 0, chosen by every token), no move is tried."""
    t = np.arange(64)
    layer_ids = np.stack([np.zeros(64, dtype=np.int64), 1 + t % 15], 1)
    trace = make_trace(np.stack([layer_ids, layer_ids], 1), num_experts=16)
    cm = load_cost_model(ROOT / "configs/cluster/h100-1x8-nvlink.yaml", MODEL)
    models = SearchModels(LatencyModel(cm, trace, 1.0, smooth=True), fold_tokens(trace.num_tokens, seed=0))
    row = np.concatenate([[0], 1 + np.arange(15) % 7])  # expert 0 alone on GPU 0, 2 or 3 on the others
    best = np.stack([row, row])
    parts = models.reset(best)
    tried = _record_tries(monkeypatch)
    assert latency._cap_moves(models, best, parts, 0, 6, np.random.default_rng(0), float("inf")) == 0
    assert tried == []


def test_cap_moves_skip_a_full_b_with_no_expert_to_give_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full GPU b that holds a single expert at every other layer has none to give back to a:
    that try is skipped (np.argmax of no partner layers raised), the others still run. 6 experts
    on 3 GPUs, 4 each (the cap); layer 0 holds 2/3/1, layer 1 2/1/3, and GPU 0 (experts 0, 1,
    chosen by every token) is the hottest: a move to GPU 1 is skipped, one to GPU 2 is paired at layer 1."""
    t = np.arange(64)
    layer_ids = np.stack([t % 2, 2 + t % 4], 1)  # experts 0/1 on GPU 0 take 32 each, 2..5 16 each
    trace = make_trace(np.stack([layer_ids, layer_ids], 1), num_experts=6)
    mc = ModelCost("m", 1000, 2.0, 2.0, expert_us_per_token=1.0, expert_fixed_us=1.0, batch_tokens=None)
    cost = CostModel(Cluster("1x3", 1, 3, 1.0, 0.0, 1.0, 0.0), mc)
    models = SearchModels(LatencyModel(cost, trace, 1.0, smooth=True), fold_tokens(trace.num_tokens, seed=0))
    best = np.array([[0, 0, 1, 1, 1, 2], [0, 0, 1, 2, 2, 2]])
    parts = models.reset(best)
    tried = _record_tries(monkeypatch)
    assert latency._cap_moves(models, best, parts, 0, 4, np.random.default_rng(0), float("inf")) == 0
    assert 0 < len(tried) < 16  # 16 tries, b drawn from GPUs 1 and 2
    for cand, layers in tried:
        assert layers == [0, 1]
        moved = np.flatnonzero(cand[0] != best[0])
        assert len(moved) == 1 and moved[0] in (0, 1) and cand[0, moved[0]] == 2
        assert np.flatnonzero(cand[1] != best[1]).tolist() == [3] and cand[1, 3] == 0  # ties: the first of 3, 4, 5
        assert (np.bincount(cand.ravel(), minlength=3) == 4).all()
    np.testing.assert_array_equal(best, [[0, 0, 1, 1, 1, 2], [0, 0, 1, 2, 2, 2]])


def test_cap_moves_pair_where_a_has_the_most_spare_load_not_the_most_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paired move lands where a's load is furthest below the layer's hottest GPU: 2 GPUs, 2
    experts each per layer (6 each, the cap), GPU 0 hottest at layer 0. Layer 1: GPU 0 carries 90
    of 100 tokens (spare 0); layer 2: 20 (spare 80 - 20 = 60), so layer 2 gives back b's least
    selected expert there (expert 2: 30 tokens against expert 3's 50)."""
    top1 = np.repeat([[0, 0, 1], [0, 0, 2], [0, 0, 3], [2, 0, 3], [2, 2, 3]], [20, 30, 10, 30, 10], axis=0)  # [100, 3]
    trace = make_trace(top1[:, :, None], num_experts=4)
    mc = ModelCost("m", 1000, 2.0, 2.0, expert_us_per_token=1.0, expert_fixed_us=1.0, batch_tokens=None)
    cost = CostModel(Cluster("1x2", 1, 2, 1.0, 0.0, 1.0, 0.0), mc)
    models = SearchModels(LatencyModel(cost, trace, 1.0, smooth=True), fold_tokens(trace.num_tokens, seed=0))
    np.testing.assert_array_equal(models.selections, [[60, 0, 40, 0], [90, 0, 10, 0], [0, 20, 30, 50]])
    best = np.tile([0, 0, 1, 1], (3, 1))
    parts = models.reset(best)
    tried = _record_tries(monkeypatch)
    assert latency._cap_moves(models, best, parts, 0, 6, np.random.default_rng(0), float("inf")) == 0
    assert len(tried) == 16
    for cand, layers in tried:
        assert layers == [0, 2] and (cand[1] == best[1]).all()
        moved = np.flatnonzero(cand[0] != best[0])
        assert len(moved) == 1 and moved[0] in (0, 1) and cand[0, moved[0]] == 1
        assert np.flatnonzero(cand[2] != best[2]).tolist() == [2] and cand[2, 2] == 0


def test_slot_moves_go_alone_to_a_gpu_with_a_free_slot_at_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """With per-layer slots (latency.primary_slots: G does not divide E, copies fill the rest) a
    slot move takes one expert off the layer's hottest GPU to another GPU with fewer than `slots`
    experts there, alone (no partner layer); with every GPU full, none is tried."""
    trace, models, best, parts, tried = _recorded_search(monkeypatch, 3, seed=7)
    best[1] = np.concatenate([np.repeat(np.arange(4), 3), np.arange(4, 8)])  # GPUs 0-3 hold 3, 4-7 one
    parts = models.reset(best)
    a = int(np.argmax(np.bincount(best[1], weights=trace.expert_loads()[1], minlength=8)))
    assert latency._cap_moves(models, best, parts, 1, None, np.random.default_rng(0), float("inf"), slots=3) == 0
    assert len(tried) == 16
    for cand, layers in tried:
        moved = np.flatnonzero(cand[1] != best[1])
        assert layers == [1] and (cand[[0, 2]] == best[[0, 2]]).all()
        assert len(moved) == 1 and best[1, moved[0]] == a and cand[1, moved[0]] in set(range(4, 8)) - {a}
    tried.clear()
    assert latency._cap_moves(models, best, parts, 0, None, np.random.default_rng(0), float("inf"), slots=2) == 0
    assert tried == []  # layer 0 holds 2 per GPU: no GPU has a free slot
