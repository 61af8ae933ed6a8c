"""`solve_placement`: fit a placement on (a split of) a trace, with baselines and held-out metrics.

Objectives are pluggable: OBJECTIVES maps an `--objective` name to a function
(trace, num_gpus, gpus_per_node, time_limit, seed, progress, **options) -> SolveOutcome. This
module implements `traffic` (docs/solver.md states it exactly):

    0. the regularisation of the edge weights (co-selection weight, smoothing = prior) chosen
       per trace by cross-validation inside the training tokens (select_weights), unless fixed;
    1. edge weights from the training tokens (affinity.edge_terms, the token sums, re-weighted);
       steps 2-5 are search_traffic on that graph, which cross-validation also runs per candidate;
    2. the incumbent: `restarts` greedy chainings, each improved by coordinate descent (optimal
       per-layer transport re-assignment + Kernighan-Lin swaps), the best kept;
    3. the exact optimum when the model is small: a shortest path through whole-layer layouts
       where a layer has few of them (chain.solve_chain), else the integer program
       (ilp.solve_window over all layers) from that incumbent;
    4. `kicks` rounds of iterated local search (perturb a window of layers, descend, keep if
       better), then ILP re-optimisation of single layers where tractable (each capped at
       LAYER_ILP_SECONDS; only a proven optimum is taken, so the result does not depend on how
       fast the machine got near one; a capped ILP is recorded as a cut);
    5. a valid lower bound (ILP dual bound or ilp.combinatorial_bound) and the gap;
    6. only with max_imbalance (a token-load cap): steps 2-5 in half the time, their layout
       brought under the cap (cap_imbalance), then steps 2-5 again from it with the cap in
       every move and in the whole-model ILP (heuristics.LoadCap), and cap_imbalance again.
    7. only with --from (solve_placement's `current`): the GPUs renamed to keep the most experts
       where the deployed placement has them (relabel_outcome, migrate.py); with move_cost the
       search also prices each move, with max_moves it keeps every layer within N moves
       (solve_traffic, _search_limited; docs/solver.md, "Re-placement").

Determinism: every random choice comes from `seed`; the amount of work is fixed by `restarts`
and `kicks`. `time_limit` (and the per-layer ILP cap of step 4) only cuts work short, recorded as
solver.stopped_by_time_limit, and the best placement found so far is always returned.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from moeplace.errors import MoeplaceError
from moeplace.eval.metrics import evaluate
from moeplace.parallel import thread_map
from moeplace.placement import Placement, check_topology
from moeplace.progress import Progress
from moeplace.solve import chain, ilp
from moeplace.solve.affinity import (
    AffinityGraph, EdgeTerms, distance_matrix, edge_terms, gate_weighted_transitions, placement_cost,
)
from moeplace.solve.baselines import all_baselines, contiguous, greedy_load, random_balanced
from moeplace.solve.heuristics import (
    LoadCap, MoveLimit, chain_init, coordinate_descent, layer_costs, meet_cap, meet_limit, objective_cost, perturb,
    relieve_layer, swap_descent, with_move_cost,
)
from moeplace.solve.migrate import best_relabeling, check_current, check_equal_counts, move_unit, moves, record, relabel
from moeplace.trace import paths
from moeplace.trace.format import SPLIT_BY, Trace, split_trace

EXACT_MAX_VARS = 1_500  # window_size of the whole model below which the exact ILP is tried
EXACT_METHODS = ("exact-dp", "exact-ilp")  # a proven optimum: no time limit cut it
LAYER_ILP_MAX_VARS = 3_000  # window_size of one layer below which it is re-solved by ILP
LAYER_ILP_SECONDS = 5.0  # cap on one layer's ILP (step 4)
# Cross-validated regularisation (select_weights). The grid spans the estimators that the
# held-out results of different traces favour (docs/benchmarks.md); the default comes first, so
# it wins ties. "shrinkage" sets smoothing = prior: how far the sparse top-1 counts are pulled
# toward the gate-weighted all-pairs estimate.
DEFAULT_WEIGHTS = {"coselect_weight": 2.0, "smoothing": 0.5, "prior": 0.5}  # also edge_weights' defaults
CV_GRID = {"coselect_weight": (2.0, 1.0, 4.0), "shrinkage": (0.5, 2.0)}
CV_FOLDS = 2
CV_MAX_TOKENS_PER_PAIR = 50.0  # above this many training tokens per expert pair, noise is small: no CV
CV_TIME_SHARE = 0.5  # at most this share of the time limit goes to cross-validation


@dataclass
class SolveOutcome:
    """What an objective returns; solve_placement wraps it into a Placement."""

    expert_to_gpu: np.ndarray  # int64 [L, E]
    objective: dict[str, Any]  # name, exact formula parameters, value
    solver: dict[str, Any]  # method, settings, timings
    bound: float | None = None
    gap: float | None = None
    replicas: Sequence[Sequence[tuple[int, int]]] = field(default_factory=list)
    starts: dict[str, np.ndarray] = field(default_factory=dict)  # latency: its start layouts [L, E] (not saved)


def relative_gap(cost: float, bound: float | None) -> float | None:
    if bound is None:
        return None
    return max(0.0, cost - bound) / max(abs(cost), 1e-12)


def cv_folds(trace: Trace, folds: int, rng: np.random.Generator) -> np.ndarray | None:
    """Fold of each token, int [T], by sequence when sequence_ids exist (tokens of one sequence
    route alike, so splitting them would flatter the less regularised candidates); None when
    there are too few sequences (or tokens) for every fold to be non-empty."""
    if trace.sequence_ids is not None:
        sequences, inverse = np.unique(trace.sequence_ids, return_inverse=True)
        if len(sequences) < folds:
            return None
        return rng.permutation(len(sequences))[inverse] % folds
    return rng.permutation(trace.num_tokens) % folds if trace.num_tokens >= folds else None


def select_weights(
    trace: Trace,
    num_gpus: int,
    gpus_per_node: int,
    seed: int,
    deadline: float,
    fixed: dict[str, float | None],
    progress: bool = False,
    *,
    node_cost: float = 2.0,
    top1_weight: float = 1.0,
) -> tuple[dict[str, float], dict[str, Any] | None, EdgeTerms | None]:
    """Edge-weight regularisation for `trace` [T, L, k], chosen by cross-validation on its tokens.

    How much to smooth the sparse transition counts depends on the trace (tokens per expert
    pair, strength of the affinity, k), so it is estimated, not fixed:

    1. candidates: CV_GRID over the weights that `fixed` leaves None (fixed ones are kept);
    2. the tokens are split into CV_FOLDS folds (cv_folds);
    3. every candidate is solved on all folds but one (short heuristic search: 2 restarts,
       4 kicks, no ILP) and scored on the one left out: the metrics the objective
       targets (cross_gpu_top1 and dest_gpus_topk, plus their node versions with several
       nodes), each as a ratio to the contiguous layout, summed over metrics, averaged over folds;
    4. the lowest score wins; the default candidate comes first and wins ties.

    Skipped (defaults, or the fixed values) when nothing is left to choose, when the trace has
    more than CV_MAX_TOKENS_PER_PAIR tokens per expert pair, when the model is large (L x E >
    4096, where one solve is expensive) or when the folds cannot be formed. Stops early, keeping
    the best candidate so far, at `deadline`. node_cost and top1_weight are those of the final solve.

    Returns (weights: coselect_weight, smoothing, prior; a record for the placement JSON or None;
    the edge_terms of the whole trace when cross-validation computed them, else None).
    """
    free = [name for name, unset in (("coselect_weight", fixed["coselect_weight"] is None),
                                     ("shrinkage", fixed["smoothing"] is None or fixed["prior"] is None)) if unset]
    weights = {name: DEFAULT_WEIGHTS[name] if value is None else value for name, value in fixed.items()}
    tokens_per_pair = trace.num_tokens / trace.num_experts ** 2
    fold = cv_folds(trace, CV_FOLDS, np.random.default_rng(seed))
    if not free or tokens_per_pair > CV_MAX_TOKENS_PER_PAIR or trace.num_layers * trace.num_experts > 4096 \
            or fold is None:
        return weights, None, None

    # 1. candidates over the free knobs; "shrinkage" fills whichever of smoothing/prior is free
    candidates = []
    for values in itertools.product(*(CV_GRID[name] for name in free)):
        cand = dict(weights)
        for name, value in zip(free, values):
            if name == "shrinkage":
                cand.update({k: value for k in ("smoothing", "prior") if fixed[k] is None})
            else:
                cand[name] = value
        candidates.append(cand)
    metrics = ("cross_gpu_top1", "dest_gpus_topk") + (
        ("cross_node_top1", "dest_nodes_topk") if num_gpus > gpus_per_node else ())
    contiguous_layout = contiguous(trace.num_layers, trace.num_experts, num_gpus)

    # 2-3. fit on the other folds, score on the left-out one; the token sums of each fit are
    # taken once (affinity.edge_terms) and every candidate only re-weights them
    bar = Progress("cross-validation", total=len(candidates), enabled=progress)
    held_out = [trace.select_tokens(np.flatnonzero(fold == f)) for f in range(CV_FOLDS)]
    own = list(thread_map(functools.partial(edge_terms, top1_weight=top1_weight), held_out))  # each fold's token sums
    splits = []
    for f, held in enumerate(held_out):
        base = evaluate(Placement(contiguous_layout, num_gpus, gpus_per_node), held)
        splits.append((functools.reduce(operator.add, own[:f] + own[f + 1:]), held, base))
    scores: list[float] = []
    for cand in candidates:
        if time.monotonic() > deadline:
            break  # out of time: compare the candidates scored so far
        score = 0.0
        for terms, held, base in splits:
            found = search_traffic(terms.graph(cand["coselect_weight"], cand["smoothing"], cand["prior"]),
                                   num_gpus, gpus_per_node, node_cost, deadline, seed, restarts=2, kicks=4,
                                   exact=False, layer_ilps=False)
            m = evaluate(Placement(found.expert_to_gpu, num_gpus, gpus_per_node), held)
            score += sum(m[k] / max(base[k], 1e-12) for k in metrics) / CV_FOLDS
        scores.append(score)
        bar.update(len(scores), f"candidate {len(scores)}/{len(candidates)}")

    # 4. the best (the default when time ran out before any was scored)
    best = int(np.argmin(scores)) if scores else 0
    chose = f"chose {candidates[best]}" if scores else "cut by the time limit before any candidate: the defaults"
    bar.close(chose if time.monotonic() - bar.start > bar.after else "")
    record = {"folds": CV_FOLDS, "by": "sequence" if trace.sequence_ids is not None else "token",
              "candidates": candidates, "scores": [round(x, 5) for x in scores], "chosen": best,
              "stopped_by_time_limit": len(scores) < len(candidates)}
    return candidates[best], record, functools.reduce(operator.add, own)


@dataclass
class SearchResult:
    """What search_traffic found for one AffinityGraph."""

    expert_to_gpu: np.ndarray  # int64 [L, E]
    cost: float
    bound: float
    method: str
    stats: dict[str, Any]
    cut: bool  # work left undone at the deadline


def search_traffic(
    graph: AffinityGraph,
    num_gpus: int,
    gpus_per_node: int,
    node_cost: float,
    deadline: float,
    seed: int,
    restarts: int,
    kicks: int,
    exact: bool = True,
    progress: bool = False,
    layer_ilps: bool = True,
    cap: LoadCap | None = None,
    incumbent: np.ndarray | None = None,
    descend_incumbent: bool = False,
    moves: MoveLimit | None = None,
) -> SearchResult:
    """Steps 1-5 of the module docstring on a fixed graph: the placement of least
    placement_cost, int64 [L, E], with a valid lower bound. exact=False skips step 2's
    whole-model ILP, layer_ilps=False step 4's single-layer ones (cross-validation's short
    searches skip both: on traces with few distinct co-selected pairs the layer ILPs are most
    of the time of a solve). `incumbent` int [L, E]: the start to beat instead of contiguous;
    `descend_incumbent`: coordinate descent from it too, before the restarts (--move-cost: the
    local optimum next to the deployed placement).
    On a heuristics.MovingGraph every cost here includes its unary costs (objective_cost).

    With `cap` (step 6): every descent keeps each layer's token load per GPU under its limit
    (heuristics.improve_layer), the ILPs carry it as constraints, and a placement with fewer
    layers above their limit always wins over one with less traffic. The bound is then one of
    the capped problem (the uncapped bound bounds it too).

    With `moves` (--max-moves; the incumbent must be within it): every layout is kept within N
    moves per layer of moves.current: the descents' swaps keep it, a chaining is renamed to
    CURRENT's GPUs (migrate.best_relabeling) and a kicked window brought within it by the cheapest
    exchanges back (heuristics.meet_limit), and the ILPs carry it as one row per layer. The bound
    is then one of the limited problem (the unlimited one bounds it too).

    The first greedy chaining always runs, even past `deadline` (it takes milliseconds), so a
    time limit spent elsewhere (e.g. on cross-validation of a large trace) still returns a
    placement built from the graph, never the bare contiguous start (given an incumbent, it
    runs only within the deadline).
    """
    distance = distance_matrix(num_gpus, gpus_per_node, node_cost)
    num_nodes = num_gpus // gpus_per_node
    rng = np.random.default_rng(seed)
    start = time.monotonic()
    bar = Progress("solve" if cap is None else "solve under the load cap", total=restarts + kicks, enabled=progress)
    stats: dict[str, Any] = {"restarts_run": 0, "kicks_run": 0, "kicks_accepted": 0, "layer_ilps": 0,
                             "layer_ilps_cut": 0}

    def above(x: np.ndarray) -> int:  # layers over their load limit: fewer wins before traffic does
        return 0 if cap is None else len(cap.above(x, num_gpus))

    # 1. incumbent: contiguous (or the one given), then greedy chaining + coordinate descent from `restarts` seeds
    best = contiguous(graph.num_layers, graph.num_experts, num_gpus) if incumbent is None else incumbent.copy()
    best_cost, best_above = objective_cost(graph, best, distance), above(best)
    if incumbent is not None and descend_incumbent:
        x = incumbent.copy()
        coordinate_descent(graph, x, distance, deadline=deadline, cap=cap, moves=moves)
        cost, x_above = objective_cost(graph, x, distance), above(x)
        if (x_above, cost) < (best_above, best_cost):
            best, best_cost, best_above = x, cost, x_above
    for r in range(restarts):
        if (r > 0 or incumbent is not None) and time.monotonic() > deadline:
            break
        anchor = None if r == 0 else int(rng.integers(graph.num_layers))  # diversify restarts
        x = chain_init(graph, num_gpus, gpus_per_node, distance, rng, anchor)
        if moves is not None:
            x = within_limit(graph, x, distance, gpus_per_node, moves)
        coordinate_descent(graph, x, distance, deadline=deadline, cap=cap, moves=moves)
        cost, x_above = objective_cost(graph, x, distance), above(x)
        if (x_above, cost) < (best_above, best_cost):
            best, best_cost, best_above = x, cost, x_above
        stats["restarts_run"] = r + 1
        bar.update(r + 1, f"restart {r + 1}/{restarts} cost {best_cost:.4g}")

    # 2. exact model when small enough; it also gives the bound
    bound = ilp.combinatorial_bound(graph, num_gpus, gpus_per_node, node_cost)
    all_layers = range(graph.num_layers)
    method = "chain+coordinate-descent+ils"
    path = None
    if exact and chain.tractable(graph.num_experts, num_gpus) and time.monotonic() < deadline:
        # few layouts per layer: the shortest path through them is the optimum (chain.py)
        path = chain.solve_chain(graph, distance, deadline, cap=None if cap is None else cap.kept(best, num_gpus),
                                 moves=moves)
    if path is not None:
        cost = objective_cost(graph, path.expert_to_gpu, distance)
        if cost < best_cost - 1e-9:  # ties keep the incumbent, as the ILP's do
            best, best_cost, best_above = path.expert_to_gpu, cost, above(path.expert_to_gpu)
        bound = max(bound, min(path.value, best_cost))  # the optimum (the two sums differ in rounding only)
        method = "exact-dp"
    elif exact and ilp.window_size(graph, all_layers, num_gpus, num_nodes) <= EXACT_MAX_VARS \
            and time.monotonic() < deadline:
        # the cap as the incumbent keeps it (its peak where it is above): the model stays
        # feasible, and a bound under a looser cap still bounds the capped problem
        res = ilp.solve_window(graph, best, all_layers, distance, gpus_per_node, deadline - time.monotonic(),
                               pin_first=True, cap=None if cap is None else cap.kept(best, num_gpus), moves=moves)
        if res.cost is not None and res.cost < best_cost - 1e-9:
            best, best_cost = res.expert_to_gpu, objective_cost(graph, res.expert_to_gpu, distance)
            best_above = above(best)
        if res.bound is not None:
            bound = max(bound, res.bound)
        method = "exact-ilp" if res.optimal else "ilp(time-limited)+heuristic"
    else:
        # 3. iterated local search: kick a window of layers, descend, keep if better
        for k in range(kicks):
            if time.monotonic() > deadline:
                break
            x = best.copy()
            touched = perturb(x, rng, window=2, strength=0.3)
            if moves is not None:  # the kicked window within the limit before its descent
                for layer in touched:
                    meet_limit(graph, x, layer, distance, moves)
            span = range(max(touched.start - 1, 0), min(touched.stop + 1, graph.num_layers))
            coordinate_descent(graph, x, distance, layers=span, deadline=deadline, cap=cap, moves=moves)
            cost, x_above = objective_cost(graph, x, distance), above(x)
            if (x_above, cost) < (best_above, best_cost - 1e-9):
                best, best_cost, best_above = x, cost, x_above
                stats["kicks_accepted"] += 1
            stats["kicks_run"] = k + 1
            bar.update(restarts + k + 1, f"kick {k + 1}/{kicks} cost {best_cost:.4g}")
        # 4. single layers with their intra-layer edges, exactly, where the ILP is small
        for layer in all_layers if layer_ilps else ():
            if time.monotonic() > deadline:
                break
            one = range(layer, layer + 1)
            # without intra edges a layer is a transport problem, already solved exactly
            if not graph.intra[layer].any() or ilp.window_size(graph, one, num_gpus, num_nodes) > LAYER_ILP_MAX_VARS:
                continue
            res = ilp.solve_window(graph, best, one, distance, gpus_per_node,
                                   min(deadline - time.monotonic(), LAYER_ILP_SECONDS),
                                   cap=None if cap is None else cap.kept(best, num_gpus), moves=moves)
            stats["layer_ilps"] += 1
            if not res.optimal:  # HiGHS' incumbent at the cap: how good it is depends on the machine
                stats["layer_ilps_cut"] += 1
            elif res.cost is not None:
                cost = objective_cost(graph, res.expert_to_gpu, distance)
                if cost < best_cost - 1e-9:  # under the kept cap: no layer goes above its limit
                    best, best_cost = res.expert_to_gpu, cost
    bar.close(f"cost {best_cost:.6g}, bound {bound:.6g}" if time.monotonic() - start > bar.after else "")
    cut = method not in EXACT_METHODS and (stats["restarts_run"] < restarts or time.monotonic() > deadline
                                     or method.startswith("ilp(time-limited)")
                                     or (method.startswith("chain") and stats["kicks_run"] < kicks)
                                     or stats["layer_ilps_cut"] > 0)
    return SearchResult(best, best_cost, bound, method, stats, cut)


def within_limit(graph: AffinityGraph, expert_to_gpu: np.ndarray, distance: np.ndarray, gpus_per_node: int,
                 moves: MoveLimit) -> np.ndarray:
    """expert_to_gpu int [L, E] renamed to keep the most experts on their CURRENT GPU
    (migrate.best_relabeling: free for the traffic objective), then every layer over the move
    limit brought within it by the cheapest exchanges back (heuristics.meet_limit). A new array."""
    num_gpus = distance.shape[0]
    x = relabel(expert_to_gpu, [], best_relabeling(expert_to_gpu, moves.current, num_gpus, gpus_per_node))[0]
    for layer in moves.over(x):
        meet_limit(graph, x, layer, distance, moves)
    return x


def cap_imbalance(graph: AffinityGraph, expert_to_gpu: np.ndarray, cap: LoadCap, distance: np.ndarray,
                  sweeps: int = 3) -> list[int]:
    """Bring every layer's largest token load per GPU to its cap's limit or under, in place, at
    the least traffic cost the swaps find. expert_to_gpu int [L, E]. Returns the layers left above.

    1. each layer over its limit: heuristics.meet_cap (the cheapest swaps per unit of peak load
       taken off, from the layout and, where those stop above, from the load-balanced packings);
    2. `sweeps` passes of swap descent that keep every layer under its limit (the traffic search
       before it never looked at loads, so it may have more to give back under the cap); a
       layer left above keeps its peak as its limit;
    3. each layer still above: relieve_layer once more, since step 2 may have moved its peak to
       another GPU. So no single swap brings a layer that is returned as above under its limit.
    """
    num_gpus = distance.shape[0]
    for layer in range(expert_to_gpu.shape[0]):  # 1.
        if cap.peak(expert_to_gpu[layer], layer, num_gpus) > cap.limits[layer]:
            meet_cap(graph, expert_to_gpu, layer, distance, cap)
    kept = cap.kept(expert_to_gpu, num_gpus)
    for _ in range(sweeps):  # 2.
        for layer in range(expert_to_gpu.shape[0]):
            gpus = expert_to_gpu[layer].copy()
            swap_descent(layer_costs(graph, expert_to_gpu, layer, distance), gpus, graph.intra[layer], distance,
                         weight=cap.loads[layer], limit=float(kept.limits[layer]))
            expert_to_gpu[layer] = gpus
    for layer in cap.above(expert_to_gpu, num_gpus):  # 3.
        gpus = expert_to_gpu[layer].copy()
        relieve_layer(layer_costs(graph, expert_to_gpu, layer, distance), gpus, graph.intra[layer], distance,
                      cap.loads[layer], float(cap.limits[layer]))
        expert_to_gpu[layer] = gpus
    return cap.above(expert_to_gpu, num_gpus)


def solve_traffic(
    trace: Trace,
    num_gpus: int,
    gpus_per_node: int,
    time_limit: float,
    seed: int,
    progress: bool = False,
    *,
    node_cost: float = 2.0,
    top1_weight: float = 1.0,
    coselect_weight: float | None = None,
    smoothing: float | None = None,
    prior: float | None = None,
    restarts: int | None = None,
    kicks: int | None = None,
    exact: bool = True,
    max_imbalance: float | None = None,
    current: np.ndarray | None = None,
    move_cost: float | None = None,
    max_moves: int | None = None,
) -> SolveOutcome:
    """Minimise the traffic objective (affinity.placement_cost) of `trace`; see the module doc.

    coselect_weight/smoothing/prior: None = chosen by select_weights (cross-validation).
    restarts/kicks default by size (deterministic): 8/20 up to 4096 experts in all layers, else 2/4.
    exact=False skips the whole-model ILP of step 2 (step 4's single-layer ILPs still run).
    max_imbalance: a cap on every layer's max / mean token load per GPU (step 6; docs/solver.md
    states when the second search runs): the search runs without it, its layout is brought
    under it (cap_imbalance), a second search keeps it throughout from there, and cap_imbalance
    tries again where a layer is still above; the bound is the better of the two searches'
    (each bounds the capped problem).
    move_cost W (with current int [L, E], the deployed primaries): the plain search in half the
    time left, then a search on the graph plus W x migrate.move_unit per (layer, expert) off its
    CURRENT GPU (heuristics.MovingGraph), started from the better of CURRENT and the plain
    result relabelled to it; the value is that penalised cost, objective.move_cost records its
    traffic and the plain solve's. The bounds stay traffic-only ones (or the ILP's of the
    penalised model): a non-negative unary term only raises the optimum, so they stay valid.
    max_moves N (with current): at most N experts of each layer off their CURRENT GPU, counted
    in CURRENT's GPU names: the solve above (plain, or with move_cost) in half the time left,
    then _search_limited in the rest; with move_cost both apply. Not with max_imbalance (the
    cap's swaps move experts the limit does not allow, and N = 0 may leave a layer above it).
    """
    start = time.monotonic()
    if not node_cost >= 1.0:  # the ILP and the bound take the dearest move to be the cross-node one
        raise MoeplaceError(f"--node-cost {node_cost}: must be >= 1 (a cross-node move costs at least a "
                            "cross-GPU move inside a node)")
    if (move_cost is not None or max_moves is not None) and current is None:
        raise MoeplaceError(f"{'--move-cost prices' if max_moves is None else '--max-moves limits'} moves away from "
                            "a deployed placement: add --from CURRENT.json")
    if max_moves is not None and max_imbalance is not None:
        raise MoeplaceError("--max-moves with --max-imbalance: the load cap's swaps would move experts the limit does "
                            "not allow (and with few moves a layer may stay above the cap); drop one of them")
    if trace.num_layers < 2:
        out = _no_layer_pairs(trace, num_gpus, node_cost, top1_weight, seed, time_limit, start, max_imbalance)
        if current is not None and max_imbalance is None and (move_cost or max_moves is not None):
            # every layout costs 0: keep CURRENT's where a move is priced or the load-balanced
            # layout (renamed to CURRENT's GPUs) moves more than the limit allows
            free = relabel(out.expert_to_gpu, [], best_relabeling(out.expert_to_gpu, current, num_gpus,
                                                                  gpus_per_node))[0]
            if move_cost or (max_moves is not None and (moves(free, current) > max_moves).any()):
                out.expert_to_gpu, out.solver["method"] = current.copy(), "kept --from: one MoE layer, no layer pairs"
            else:
                out.expert_to_gpu = free
            if max_moves is not None:
                out.objective["max_moves"] = _limit_record(max_moves, out.expert_to_gpu, current, 0.0, 0.0, free)
        return out
    large = trace.num_layers * trace.num_experts > 4096
    restarts = (2 if large else 8) if restarts is None else restarts
    kicks = (4 if large else 20) if kicks is None else kicks
    deadline = start + time_limit
    fixed = {"coselect_weight": coselect_weight, "smoothing": smoothing, "prior": prior}
    weights, cv, terms = select_weights(trace, num_gpus, gpus_per_node, seed, start + CV_TIME_SHARE * time_limit,
                                        fixed, progress, node_cost=node_cost, top1_weight=top1_weight)
    chosen_by = ("cross-validation" if cv["scores"] else "defaults (the time limit cut cross-validation before "
                 "any candidate was scored)") if cv else "given" if None not in fixed.values() else "defaults"
    coselect_weight, smoothing, prior = weights["coselect_weight"], weights["smoothing"], weights["prior"]
    terms = edge_terms(trace, top1_weight) if terms is None else terms  # the folds' sums add up to the trace's
    graph = terms.graph(coselect_weight, smoothing, prior)
    del terms  # four [L, E, E] arrays the search does not need
    search = functools.partial(_search_capped, trace, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                               node_cost=node_cost, seed=seed, restarts=restarts, kicks=kicks, exact=exact,
                               progress=progress, max_imbalance=max_imbalance)
    distance = distance_matrix(num_gpus, gpus_per_node, node_cost)
    # with --max-moves, the solve without the limit gets half the time left: its layout, renamed
    # and brought within the limit, is one start of the limited search
    free_deadline = deadline if max_moves is None else (time.monotonic() + deadline) / 2
    moving: dict[str, Any] = {}
    scored = graph  # what the search minimises: the traffic graph, or it plus the move cost
    if move_cost is None:
        found, capped = search(graph, free_deadline)
    else:  # the plain solve in half the time left, then the penalised one from the better start
        assert current is not None
        plain, _ = search(graph, (time.monotonic() + free_deadline) / 2)
        plain_layout = relabel(plain.expert_to_gpu, [], best_relabeling(plain.expert_to_gpu, current, num_gpus,
                                                                        gpus_per_node))[0]
        unit = move_unit(graph.total_weight(), trace.num_tokens, trace.num_layers)
        scored = with_move_cost(graph, current, move_cost * unit, num_gpus)
        # keeping CURRENT is always a candidate; the plain solve's layout (relabelled) another
        start_layout = min((current, plain_layout), key=lambda x: objective_cost(scored, x, distance))
        found, capped = search(scored, free_deadline, incumbent=start_layout)
        moving = {"move_cost": {"W": move_cost, "unit": unit, "per_move": move_cost * unit,
                                "unit_means": "one token transition: the mean edge weight of one fit token at one "
                                              "layer pair (docs/solver.md, Re-placement)",
                                "without_move_cost": {"value": plain.cost,
                                                      "moved": int(moves(plain_layout, current).sum())}}}
    if max_moves is not None:
        assert current is not None
        found, limited = _search_limited(graph, scored, found, current, max_moves, deadline, num_gpus=num_gpus,
                                         gpus_per_node=gpus_per_node, node_cost=node_cost, seed=seed, kicks=kicks,
                                         exact=exact, progress=progress)
        capped = {**capped, "max_moves": limited}
    if move_cost is not None:
        moving["move_cost"]["traffic"] = placement_cost(graph, found.expert_to_gpu, distance)

    elapsed = time.monotonic() - start
    return SolveOutcome(
        expert_to_gpu=found.expert_to_gpu,
        objective={
            "name": "traffic",
            "value": found.cost,
            **capped,
            **moving,
            "node_cost": node_cost,
            "top1_weight": top1_weight,
            "coselect_weight": coselect_weight,
            "smoothing": smoothing,
            "prior": prior,
            "weights_chosen_by": chosen_by,
            "total_edge_weight": graph.total_weight(),
            "definition": "docs/solver.md",
        },
        solver={
            "method": found.method,
            "restarts": restarts,
            "kicks": kicks,
            "seed": seed,
            "time_limit_s": time_limit,
            "seconds": round(elapsed, 3),
            "cross_validation": cv,
            "stopped_by_time_limit": bool(cv and cv["stopped_by_time_limit"]) or found.cut,
            **found.stats,
        },
        bound=found.bound,
        gap=relative_gap(found.cost, found.bound),
    )


def _search_limited(graph: AffinityGraph, scored: AffinityGraph, free: SearchResult, current: np.ndarray,
                    max_moves: int, deadline: float, *, num_gpus: int, gpus_per_node: int, node_cost: float,
                    seed: int, kicks: int, exact: bool, progress: bool) -> tuple[SearchResult, dict[str, Any]]:
    """The search under --max-moves N (heuristics.MoveLimit: per layer at most N experts off
    their GPU in current int [L, E], in CURRENT's GPU names), by `deadline`, on `scored` (the
    traffic `graph`, or it plus --move-cost's unary term). Returns the result, in CURRENT's GPU
    names, and the objective's "max_moves" record.

    1. starts: CURRENT itself (0 moves), and the solve without the limit (`free`) renamed to
       CURRENT's GPUs (migrate.best_relabeling) and brought within the limit by the exchanges
       back of least cost per move reverted (within_limit); each coordinate-descended with swaps
       that keep every layer within N, the better kept (CURRENT on a tie);
    2. search_traffic from it with no restarts: the kicks (each kicked window brought within
       the limit before its descent) and the whole-model or single-layer ILPs, which carry the
       limit as sum_e x[l, e, current(l, e)] >= E - N.
    The bound is the better of the free solve's (a relaxation of the limited problem, so still
    a lower bound) and the limited search's (its own combinatorial bound, or the ILP's)."""
    distance = distance_matrix(num_gpus, gpus_per_node, node_cost)
    limit = MoveLimit(current, max_moves)
    renamed = relabel(free.expert_to_gpu, [], best_relabeling(free.expert_to_gpu, current, num_gpus,
                                                              gpus_per_node))[0]
    best, best_cost = current.copy(), np.inf
    for x in (current.copy(), within_limit(scored, renamed, distance, gpus_per_node, limit)):
        coordinate_descent(scored, x, distance, deadline=deadline, moves=limit)
        if (cost := objective_cost(scored, x, distance)) < best_cost - 1e-9:
            best, best_cost = x, cost
    found = search_traffic(scored, num_gpus, gpus_per_node, node_cost, deadline, seed, restarts=0, kicks=kicks,
                           exact=exact, progress=progress, incumbent=best, moves=limit)
    found.stats = {**found.stats, "search_without_max_moves": {"method": free.method, "bound": free.bound,
                                                               **free.stats}}
    found.bound = max(found.bound, free.bound)
    method = found.method.removeprefix("chain+")  # no restarts: no chaining ran
    found.method, found.cut = f"{free.method}, then within --max-moves: {method}", free.cut or found.cut
    traffic, free_traffic = (placement_cost(graph, x, distance) for x in (found.expert_to_gpu, renamed))
    return found, _limit_record(max_moves, found.expert_to_gpu, current, traffic, free_traffic, renamed,
                                objective_cost(scored, renamed, distance))


def _limit_record(max_moves: int, layout: np.ndarray, current: np.ndarray, traffic: float, free_traffic: float,
                  free_layout: np.ndarray, free_value: float | None = None) -> dict[str, Any]:
    """The objective's "max_moves": N, the moves per layer of `layout` against `current` (both
    int [L, E], in CURRENT's GPU names), whether every layer is within N, the result's traffic,
    and the solve without the limit's traffic, value and moves (free_layout, renamed to CURRENT)."""
    per_layer, free_per_layer = moves(layout, current), moves(free_layout, current)
    return {"N": max_moves, "moved": int(per_layer.sum()), "of": int(layout.size),
            "moved_per_layer": per_layer.tolist(), "held": bool((per_layer <= max_moves).all()),
            "traffic": traffic,
            "definition": "per layer, experts off their CURRENT GPU after the GPU renaming; with E/G experts per GPU a "
                          "layer moves 0 or at least 2, so N = 1 allows no move",
            "without_max_moves": {"traffic": free_traffic, "value": free_traffic if free_value is None else free_value,
                                  "moved": int(free_per_layer.sum()), "moved_per_layer": free_per_layer.tolist()}}


def _search_capped(trace: Trace, graph: AffinityGraph, deadline: float, *, num_gpus: int, gpus_per_node: int,
                   node_cost: float, seed: int, restarts: int, kicks: int, exact: bool, progress: bool,
                   max_imbalance: float | None, incumbent: np.ndarray | None = None) -> tuple[SearchResult, dict[str, Any]]:
    """search_traffic on `graph` by `deadline`, then (max_imbalance) step 6: the search under the
    load cap. Returns the result and the objective's cap record. `incumbent` int [L, E]: a start
    the first search also descends from (--move-cost)."""
    # with a cap the uncapped search gets half the time left: its layout, brought under the cap,
    # is the capped search's incumbent (and what the cap cost is measured against)
    uncapped_deadline = deadline if max_imbalance is None else (time.monotonic() + deadline) / 2
    found = search_traffic(graph, num_gpus, gpus_per_node, node_cost, uncapped_deadline, seed, restarts, kicks, exact,
                           progress, incumbent=incumbent, descend_incumbent=incumbent is not None)
    capped: dict[str, Any] = {}
    if max_imbalance is not None:
        distance = distance_matrix(num_gpus, gpus_per_node, node_cost)
        cap = LoadCap.from_ratio(trace.expert_loads(), max_imbalance, num_gpus)
        capped = {"max_imbalance": max_imbalance, "value_without_cap": found.cost}
        binds = bool(cap.above(found.expert_to_gpu, num_gpus))
        # Not binding and not cut short: a search under the cap would retrace the one just run.
        # One expert per GPU: every layout carries the same loads.
        if (binds or found.cut) and trace.num_experts > num_gpus:
            start_layout = found.expert_to_gpu.copy()
            cap_imbalance(graph, start_layout, cap, distance)
            # A layer the swaps could not bring under the cap keeps the least peak they reached.
            # Single-layer ILPs are left out: the cap's knapsack rows make them slow, and a 5 s
            # cap on each would let the machine's speed decide the result. Where the cap did not
            # bind, the first search was cut short: the rest of the time goes on another seed.
            under = search_traffic(graph, num_gpus, gpus_per_node, node_cost, deadline, seed if binds else seed + 1,
                                   restarts, kicks, exact, progress, layer_ilps=False,
                                   cap=cap.kept(start_layout, num_gpus), incumbent=start_layout)
            cap_imbalance(graph, under.expert_to_gpu, cap, distance)  # tries the cap again where a layer is above it
            under.cost = objective_cost(graph, under.expert_to_gpu, distance)
            under.stats = {**under.stats, "search_without_cap": {"method": found.method, "bound": found.bound,
                                                                 **found.stats}}
            under.bound = max(under.bound, found.bound)
            under.method, under.cut = f"{found.method}, then under the load cap: {under.method}", found.cut or under.cut
            found = under
        capped["layers_above_max_imbalance"] = cap.above(found.expert_to_gpu, num_gpus)
        capped["layers_at_least_imbalance"] = cap.at_floor(found.expert_to_gpu, num_gpus)
    return found, capped


def _no_layer_pairs(trace: Trace, num_gpus: int, node_cost: float, top1_weight: float, seed: int,
                    time_limit: float, start: float, max_imbalance: float | None = None) -> SolveOutcome:
    """A one-layer trace has no layer pairs, so every placement has traffic cost 0: of those,
    take the one that balances token load (greedy_load, equal counts per GPU) rather than the
    arbitrary contiguous start; with a cap, the balance objective's descent and then the
    relieving swaps lower its peak further (LoadCap.packings, relieve_layer at no traffic
    cost), kept where lower."""
    loads = trace.expert_loads()
    layout = greedy_load(loads, num_gpus)
    cap: dict[str, Any] = {}
    if max_imbalance is not None:
        load_cap = LoadCap.from_ratio(loads, max_imbalance, num_gpus)
        free = distance_matrix(num_gpus, num_gpus, 1.0)
        for layer in range(trace.num_layers):
            gpus = load_cap.packings(layer, num_gpus)[-1]
            relieve_layer(np.zeros((trace.num_experts, num_gpus)), gpus, np.zeros((trace.num_experts,) * 2), free,
                          loads[layer], float(load_cap.limits[layer]))
            if load_cap.peak(gpus, layer, num_gpus) < load_cap.peak(layout[layer], layer, num_gpus):
                layout[layer] = gpus
        cap = {"max_imbalance": max_imbalance, "value_without_cap": 0.0,
               "layers_above_max_imbalance": load_cap.above(layout, num_gpus),
               "layers_at_least_imbalance": load_cap.at_floor(layout, num_gpus)}
    return SolveOutcome(
        expert_to_gpu=layout,
        objective={"name": "traffic", "value": 0.0, "node_cost": node_cost, "top1_weight": top1_weight, **cap,
                   "total_edge_weight": 0.0, "definition": "docs/solver.md"},
        solver={"method": "greedy-load: one MoE layer, no layer pairs",
                "seed": seed, "time_limit_s": time_limit, "seconds": round(time.monotonic() - start, 3),
                "cross_validation": None, "stopped_by_time_limit": False},
        bound=0.0,
        gap=0.0,
    )


def plain_coordinate_ascent(trace: Trace, num_gpus: int, restarts: int = 8, seed: int = 0,
                            max_sweeps: int = 50) -> np.ndarray:
    """The plain reference heuristic of the benchmark: coordinate ascent on gate-weighted
    transitions (no intra-layer edges, no regularisation) from `restarts` seeded random
    balanced layouts, the best on the trace kept. With 8 starts it reproduces the reference
    figures issue 2 quotes for FLAME (about 0.60x, 0.66x, 0.67x); from the contiguous layout
    alone it is ~0.01 worse on each (docs/benchmarks.md).

    Returns int64 [L, E]."""
    graph = gate_weighted_transitions(trace)
    distance = distance_matrix(num_gpus, num_gpus, 1.0)
    best, best_cost = contiguous(trace.num_layers, trace.num_experts, num_gpus), float("inf")
    for r in range(restarts):
        x = random_balanced(trace.num_layers, trace.num_experts, num_gpus, seed * restarts + r)
        coordinate_descent(graph, x, distance, max_sweeps=max_sweeps)
        cost = placement_cost(graph, x, distance)
        if cost < best_cost:
            best, best_cost = x, cost
    return best


ObjectiveFn = Callable[..., SolveOutcome]
OBJECTIVES: dict[str, ObjectiveFn] = {"traffic": solve_traffic}


def _solve_latency(*args: Any, **options: Any) -> SolveOutcome:  # imported late: latency builds on this module
    from moeplace.solve.latency import solve_latency
    return solve_latency(*args, **options)


def _solve_balance(trace: Trace, num_gpus: int, gpus_per_node: int, time_limit: float, seed: int,
                   progress: bool = False, *, redundant: int = 0, max_experts_per_gpu: int | None = None,
                   max_experts_per_gpu_total: int | None = None, max_moves: int | None = None,
                   current: Placement | None = None) -> SolveOutcome:
    from moeplace.solve.balance import balance_moves_placement, balance_placement
    if max_moves is not None and current is not None:  # in CURRENT's GPU names: relabel_outcome keeps them
        if max_experts_per_gpu_total is not None:
            raise MoeplaceError("--max-moves with --max-experts-per-gpu-total: drop one of them")
        p = balance_moves_placement(trace.expert_loads(), num_gpus, gpus_per_node, redundant, time_limit,
                                    max_experts_per_gpu, current, max_moves, progress)
        return SolveOutcome(p.expert_to_gpu, p.objective, p.solver, p.bound, p.gap, p.replicas)
    p = balance_placement(trace.expert_loads(), num_gpus, gpus_per_node, redundant, time_limit,
                          max_experts_per_gpu, progress=progress, max_experts_per_gpu_total=max_experts_per_gpu_total)
    return SolveOutcome(p.expert_to_gpu, p.objective, p.solver, p.bound, p.gap, p.replicas)


OBJECTIVES["latency"] = _solve_latency
OBJECTIVES["balance"] = _solve_balance


# what each number may be: the CLI's option types say the same; a library caller gets the same
# one-line MoeplaceError instead of a NaN in the placement JSON or a numpy error from deep inside
_WHOLE = {"num_gpus": 1, "gpus_per_node": 1, "seed": 0, "restarts": 0, "kicks": 0, "redundant": 0,
          "max_experts_per_gpu": 1, "max_experts_per_gpu_total": 1, "max_moves": 0}
_WEIGHTS = ("node_cost", "top1_weight", "coselect_weight", "smoothing", "prior", "compute_weight", "max_imbalance",
            "move_cost")


def check_arguments(**values: Any) -> None:
    """Refuse arguments of solve_placement that are not what the CLI's options allow: whole
    numbers (at least _WHOLE's minimum), finite weights in [0, MAX_WEIGHT] (node_cost from 1), a
    finite positive time limit, a train fraction in (0, 1]. None means "not given"."""
    from moeplace.options import MAX_WEIGHT

    for name, value in values.items():
        if value is None:
            continue
        if name in _WHOLE:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < _WHOLE[name]:
                raise MoeplaceError(f"{name} must be a whole number >= {_WHOLE[name]}, got {value!r}")
            continue
        number = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        low = 1.0 if name in ("node_cost", "max_imbalance") else 0.0  # no GPU carries less than the mean at its peak
        if name in _WEIGHTS and not (number and low <= value <= MAX_WEIGHT):
            raise MoeplaceError(f"{name} must be a number in [{low:g}, {MAX_WEIGHT:g}], got {value!r}")
        if name == "time_limit" and not (number and 0 < value < float("inf")):
            raise MoeplaceError(f"time_limit (--time-limit) must be a positive number of seconds, got {value!r}")
        if name == "train_fraction" and not (number and 0 < value <= 1):
            raise MoeplaceError(f"train_fraction must be in (0, 1], got {value!r}")


class _SingleBlasThread:
    """BLAS limited to one thread while any solve runs, the caller's setting back when the last
    one ends: concurrent solves each saving and restoring the process-wide limit would undo each
    other and could leave it at 1 for good."""

    def __init__(self) -> None:
        self.lock, self.users, self.limiter = threading.Lock(), 0, None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.users == 0:
                self.limiter = threadpool_limits(limits=1, user_api="blas")
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0 and self.limiter is not None:
                    self.limiter.restore_original_limits()
                    self.limiter = None


single_blas_thread = _SingleBlasThread()


def check_layout(num_experts: int, num_gpus: int, gpus_per_node: int, objective: str, redundant: int,
                 total_cap: int | None) -> None:
    """The GPUs against the experts, for `objective`: E/G experts per GPU unless the objective
    places them unevenly (balance, a total cap, or latency's copies filling equal slots where G
    divides E + R but not E: latency.primary_slots), which check their own counts. `moeplace
    solve` runs it before its warnings, so that a refused run prints one line."""
    fills = objective == "latency" and redundant > 0 and (num_experts + redundant) % num_gpus == 0
    uneven = objective == "balance" or total_cap is not None or fills
    check_topology(num_experts, num_gpus, gpus_per_node, balanced=not uneven,
                   hint=f"--objective {objective} keeps E/G experts per GPU; --objective balance with "
                        "--redundant-experts, --max-experts-per-gpu or --max-experts-per-gpu-total, or latency with "
                        "--max-experts-per-gpu-total or with --redundant-experts R where E + R is a multiple of G, "
                        "places them unevenly",
                   redundant=redundant if objective == "balance" or fills else 0)


def solve_placement(
    trace: Trace,
    num_gpus: int,
    gpus_per_node: int | None = None,
    time_limit: float = 60.0,
    seed: int = 0,
    *,
    objective: str = "traffic",
    train_fraction: float = 1.0,
    split_by: str = "token",
    progress: bool = False,
    current: Placement | None = None,
    current_path: str | None = None,
    **options: Any,
) -> Placement:
    """Fit a placement of `trace` [T, L, k] on `num_gpus` GPUs (`gpus_per_node` per node,
    default all on one node), and report metrics of it and of every baseline.

    With train_fraction < 1 the objective sees only a seeded random split of the tokens
    (split_tokens(T, train_fraction, seed)), or with split_by="sequence" a seeded split of whole
    sequences (split_sequences; the trace needs sequence_ids and two or more sequences);
    metrics["held_out"] replays the rest.
    `options` go to the objective (e.g. node_cost, restarts for `traffic`).

    `current` (--from; read from `current_path`, recorded with its sha256): the deployed placement
    of the same shape and topology. The result is relabelled (migrate.best_relabeling) to keep
    most experts where `current` has them, and the JSON's "migration" records the moves;
    options["move_cost"] (traffic only) also prices each move in the search.
    """
    gpus_per_node = num_gpus if gpus_per_node is None else gpus_per_node
    if objective not in OBJECTIVES:
        raise MoeplaceError(f"unknown objective {objective!r} (choose from {', '.join(OBJECTIVES)})")
    check_arguments(num_gpus=num_gpus, gpus_per_node=gpus_per_node, time_limit=time_limit, seed=seed,
                    train_fraction=train_fraction, **options)
    check_layout(trace.num_experts, num_gpus, gpus_per_node, objective, options.get("redundant", 0),
                 options.get("max_experts_per_gpu_total"))
    move_cost = options.get("move_cost")
    if move_cost is not None and (objective != "traffic" or current is None):
        raise MoeplaceError("--move-cost prices moves of the traffic objective away from a deployed placement: "
                            + ("add --from CURRENT.json" if current is None else f"{objective} takes --from (free "
                               "relabelling only), not --move-cost; use --objective traffic"))
    if options.get("max_moves") is not None and (objective not in ("traffic", "balance") or current is None):
        raise MoeplaceError("--max-moves limits moves of the traffic and balance objectives away from a deployed "
                            "placement: " + ("add --from CURRENT.json" if current is None else
                                             f"{objective} takes --from (the free renaming of GPUs only); use "
                                             "--objective balance or --objective traffic"))
    if current is not None:
        check_current(current, current_path or "placement", trace.num_layers, trace.num_experts, num_gpus,
                      gpus_per_node)
        if objective == "traffic" and (move_cost is not None or options.get("max_moves") is not None):
            check_equal_counts(current, current_path or "placement",
                               "--move-cost" if move_cost is not None else "--max-moves")
            options = {**options, "current": current.expert_to_gpu}
        if objective == "balance" and options.get("max_moves") is not None:
            options = {**options, "current": current}
    if split_by not in SPLIT_BY:
        raise MoeplaceError(f"split_by must be one of {', '.join(SPLIT_BY)}, got {split_by!r}")
    # every token is fitted at fraction 1, whatever the split would keep whole
    train_idx, held_idx = split_trace(trace, train_fraction, seed, split_by if train_fraction < 1.0 else "token")
    fit = trace.select_tokens(train_idx) if train_fraction < 1.0 else trace
    held = trace.select_tokens(held_idx) if len(held_idx) else None

    # small dense products: threaded BLAS only adds sync overhead (16x slower on a busy 2-core box)
    with single_blas_thread():
        outcome = OBJECTIVES[objective](fit, num_gpus, gpus_per_node, time_limit, seed, progress, **options)
    migration = None if current is None else relabel_outcome(outcome, current, gpus_per_node, fit, options,
                                                              current_path)
    fit_loads = fit.expert_loads()
    placement = Placement(
        expert_to_gpu=outcome.expert_to_gpu,
        num_gpus=num_gpus,
        gpus_per_node=gpus_per_node,
        replicas=outcome.replicas,
        objective=outcome.objective,
        solver=outcome.solver | {"software": ilp.software()},
        bound=outcome.bound,
        gap=outcome.gap,
        trace_sha256=trace.sha256 or None,
        trace_routing_sha256=trace.routing_sha256(),
        trace_model=trace.model_identity(),
        split=split_record(train_fraction, seed, split_by),
        fit_paths=paths.sketch(fit.topk_ids),
        fit_loads=fit_loads,
        extra={} if migration is None else {"migration": migration},
    )
    baselines = all_baselines(fit_loads, num_gpus, seed)
    parts = {"train": fit, "held_out": held} if held is not None else {"train": fit}
    placement.metrics.update({  # (a record: the frozen placement's own dict, filled once it can be evaluated)
        part: {"placement": evaluate(placement, sub)} | {
            name: evaluate(Placement(layout, num_gpus, gpus_per_node), sub) for name, layout in baselines.items()
        }
        for part, sub in parts.items()
    })
    if objective == "latency":
        add_predicted_times(placement, baselines, parts, options, outcome.starts)
    return placement


def split_record(train_fraction: float, seed: int, split_by: str) -> dict[str, Any] | None:
    """The placement's split: None when fitted on every token; "by" only for a sequence split, so
    a token split reads as before this option (and as placements written before it)."""
    if train_fraction >= 1.0:
        return None
    return {"train_fraction": train_fraction, "seed": seed} | ({"by": "sequence"} if split_by == "sequence" else {})


def relabel_outcome(outcome: SolveOutcome, current: Placement, gpus_per_node: int, fit: Trace,
                    options: dict[str, Any], current_path: str | None) -> dict[str, Any]:
    """Rename the GPUs of `outcome` (layout and replicas) to keep the most primaries where
    `current` has them (migrate.best_relabeling), in place; returns the placement's "migration"
    record. Traffic and balance values are unchanged by it; with --move-cost the value is
    re-priced with the moves left. --max-moves results are in CURRENT's GPU names already, their
    limit counted there: balance keeps them; traffic takes the renaming only where it keeps every
    layer within the limit (it then moves fewer experts at the same traffic). Latency's predicted
    time may change at layer 0, whose tokens start on GPU t % G whatever the labels
    (costmodel.predict, initial_homes): the value takes that change, recorded as
    objective.relabeling_delta_us."""
    num_gpus = current.num_gpus
    label = best_relabeling(outcome.expert_to_gpu, current.expert_to_gpu, num_gpus, gpus_per_node)
    o = outcome.objective
    limited = o.get("max_moves")
    if limited is not None and not (o.get("name") == "traffic" and (
            moves(label[outcome.expert_to_gpu], current.expert_to_gpu) <= limited["N"]).all()):
        label = np.arange(num_gpus)
    before = Placement(outcome.expert_to_gpu, num_gpus, gpus_per_node, replicas=outcome.replicas)
    outcome.expert_to_gpu, outcome.replicas = relabel(outcome.expert_to_gpu, before.replicas, label)
    migration = record(outcome.expert_to_gpu, current.expert_to_gpu, current_path)
    if limited is not None and o.get("name") == "traffic":  # the moves as written (the renaming may keep more)
        limited |= {"moved": migration["moved"], "moved_per_layer": migration["moved_per_layer"],
                    "held": max(migration["moved_per_layer"], default=0) <= limited["N"]}
    if "move_cost" in o:
        o["value"] = o["move_cost"]["traffic"] + o["move_cost"]["per_move"] * migration["moved"]
        outcome.gap = relative_gap(o["value"], outcome.bound)
    if str(o.get("name", "")).startswith("latency"):
        from moeplace.solve.costmodel import load_cost_model, predict

        cost = options.get("cost") or load_cost_model(options["cluster"], options.get("model_config"))
        after = Placement(outcome.expert_to_gpu, num_gpus, gpus_per_node, replicas=outcome.replicas)
        weight = float(options.get("compute_weight", 1.0))

        def weighted(p: Placement) -> float:
            t = predict(cost, p, fit)
            return float(weight * t.compute_us.sum() + t.dispatch_us.sum() + t.combine_us.sum())

        delta = weighted(after) - weighted(before)
        o["value"], o["relabeling_delta_us"] = o["value"] + delta, delta
        outcome.gap = relative_gap(o["value"], outcome.bound)
    return migration


def add_predicted_times(placement: Placement, baselines: dict[str, np.ndarray], parts: dict[str, Trace],
                        options: dict[str, Any], starts: dict[str, np.ndarray] | None = None) -> None:
    """metrics[part][layout]["moe_time_us"]: the predicted MoE time (us, summed over layers;
    costmodel.predict, as `moeplace eval --cluster`) of the placement and of every baseline under
    the cost model the latency solve used, so its summary can say what the objective value buys;
    solver["start_times_us"][start][part] the same of the search's start layouts (the traffic
    placement: does the latency search beat it on tokens it did not see?)."""
    from moeplace.solve.costmodel import load_cost_model, predict

    cost = options.get("cost") or load_cost_model(options["cluster"], options.get("model_config"))
    g, gpn = placement.num_gpus, placement.gpus_per_node
    for part, sub in parts.items():
        for name, m in placement.metrics[part].items():
            layout = placement if name == "placement" else Placement(baselines[name], g, gpn)
            m["moe_time_us"] = float(predict(cost, layout, sub).total_us.sum())
    if starts:
        placement.solver["start_times_us"] = {
            name: {part: float(predict(cost, Placement(layout, g, gpn), sub).total_us.sum()) for part, sub in parts.items()}
            for name, layout in starts.items()}
