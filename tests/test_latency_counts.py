"""The latency search's incremental token counts (SearchModels._delta) against full recounts."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.solve.costmodel import load_cost_model
from moeplace.solve.latency import LatencyModel, SearchModels, fold_tokens
from moeplace.solve.solver import solve_placement
from moeplace.solve.synthetic import planted_trace

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
