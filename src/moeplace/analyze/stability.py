"""Is the affinity stable? Compare two traces (or two halves of one) on the same model.

Four answers, from cheapest to the one that matters:
    load correlation  per layer, Pearson correlation of the expert loads (are the same experts
                 hot?), the only one that load-only inputs allow;
    correlation  Pearson correlation of the joint transition matrices [E, E] of each layer pair,
                 raw (`corr_joint`, which load skew alone makes high) and of the excess over
                 independence P(i, j) - P(i) P(j) (`corr_excess`, the affinity itself);
    held-out capture  share of B's transitions that go to the top-m successors learnt on A,
                 beside B's in-sample capture (what a perfect fit to B would get) and the
                 capture of a no-affinity predictor (A's m busiest experts at l+1 for every i);
    placement gain transferred  a placement solved on A, replayed on B, against one solved on B
                 (and B -> A from the same two solves): gain = contiguous layout's metric on B
                 minus the placement's metric on B, and transferred = gain(solved on A) /
                 gain(solved on B) (1.0 = nothing lost).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeplace.analyze.affinity import (
    CAPTURE_M,
    capture,
    mean_stats,
    mode_arrays,
    mode_counts,
    topm_successors,
    trace_modes,
)
from moeplace.errors import MoeplaceError
from moeplace.eval.metrics import evaluate
from moeplace.parallel import thread_map
from moeplace.placement import Placement
from moeplace.solve.baselines import contiguous, greedy_load
from moeplace.trace.format import Trace, split_tokens

TRANSFER_METRICS = ("cross_gpu_top1", "dest_gpus_topk")
# Fewest tokens a side of a comparison (a half, or a --compare input) needs for figures that mean
# something. A capture share measured on n tokens has a standard error up to 1 / (2 sqrt(n)): 25
# tokens keep it within 0.1 (the report prints two decimals). And at least one token per expert:
# with fewer, most rows of the side's successor table (and of the loads a placement is solved on)
# are empty by construction, so capture and placement transfer follow tie-breaking, not routing.
MIN_SIDE_TOKENS = 25


def split_halves(trace: Trace, seed: int) -> tuple[Trace, Trace, dict[str, Any]]:
    """Two seeded halves: by sequence when the trace has two or more, else by token.

    Splitting by sequence keeps a sequence's tokens together, so the halves do not share
    context (neighbouring tokens of one text route alike and would flatter the stability).
    Half of the sequences each, not trace.format.split_sequences' half of the tokens: that rule
    would move the halves of every report already written (and the shipped stability figures).
    """
    seq_ids = trace.sequence_ids
    seqs = None if seq_ids is None else np.unique(seq_ids)
    if seq_ids is not None and seqs is not None and len(seqs) >= 2:
        perm = np.random.default_rng(seed).permutation(seqs)
        in_a = np.isin(seq_ids, perm[: len(seqs) // 2])
        idx_a, idx_b = np.flatnonzero(in_a), np.flatnonzero(~in_a)
        by = "sequence"
    else:
        idx_a, idx_b = split_tokens(trace.num_tokens, 0.5, seed)
        by = "token"
    info = {"by": by, "seed": seed, "tokens": [len(idx_a), len(idx_b)]}
    return trace.select_tokens(idx_a), trace.select_tokens(idx_b), info


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else None


def load_correlation(loads_a: np.ndarray, loads_b: np.ndarray) -> dict[str, Any]:
    """Per layer, correlation of the expert loads [L, E] of A and B: are the same experts hot?"""
    per_layer = [_pearson(a, b) for a, b in zip(loads_a, loads_b)]
    known = [c for c in per_layer if c is not None]
    return {"per_layer": per_layer, "mean": float(np.mean(known)) if known else None}


def matrix_correlations(counts_a: np.ndarray, counts_b: np.ndarray) -> list[dict[str, Any]]:
    """Per layer pair, correlation of joint counts [P, E, E] of A and B (raw and excess)."""
    out = []
    for pair, (a, b) in enumerate(zip(counts_a, counts_b)):
        pa, pb = a / max(a.sum(), 1e-300), b / max(b.sum(), 1e-300)
        ea = pa - np.outer(pa.sum(1), pa.sum(0))
        eb = pb - np.outer(pb.sum(1), pb.sum(0))
        out.append({"pair": [pair, pair + 1], "corr_joint": _pearson(pa, pb), "corr_excess": _pearson(ea, eb)})
    return out


def compare_affinity(trace_a: Trace, trace_b: Trace) -> dict[str, Any]:
    """Correlation and held-out top-m capture per mode and layer pair, A -> B."""
    modes = [m for m in trace_modes(trace_a) if m in trace_modes(trace_b)]
    # the two traces are counted on a thread each (np.bincount releases the GIL); their mode
    # arrays are made one after the other, so only one trace's temporaries are alive at a time
    arrays = [{mode: mode_arrays(t, mode) for mode in modes} for t in (trace_a, trace_b)]
    counts_a, counts_b = thread_map(lambda job: mode_counts(job[0], modes, arrays=job[1]),
                                    list(zip((trace_a, trace_b), arrays)))
    out: dict[str, Any] = {}
    for mode in modes:
        ca, cb = counts_a[mode], counts_b[mode]
        rows = matrix_correlations(ca, cb)
        for m in CAPTURE_M:
            if m > trace_a.num_experts:
                continue
            held = capture(cb, topm_successors(ca, m))
            own = capture(cb, topm_successors(cb, m))
            # no-affinity predictor: every expert's successors are A's m busiest experts at l+1
            busiest = topm_successors(ca.sum(axis=1, keepdims=True), m)  # [P, 1, m]
            marginal = capture(cb, np.broadcast_to(busiest, (*cb.shape[:2], m)))
            for pair, row in enumerate(rows):
                row.setdefault("capture_heldout", {})[str(m)] = float(held[pair])
                row.setdefault("capture_heldout_marginal", {})[str(m)] = float(marginal[pair])
                row.setdefault("capture_in_sample", {})[str(m)] = float(own[pair])
        out[mode] = {"per_pair": rows, "mean": mean_stats(rows)}
    return out


def placement_transfer(
    trace_a: Trace,
    trace_b: Trace,
    num_gpus: int,
    gpus_per_node: int,
    time_limit: float,
    seed: int,
) -> dict[str, Any]:
    """Placements solved on A and on B, each replayed on the other trace: {"a_to_b", "b_to_a"}.

    1. solve on A and on B with the project's solver (same GPUs, time limit and seed);
    2. per direction source -> target: evaluate on the target the contiguous layout (engines'
       default), greedy_load fitted on the source's loads (EPLB without replicas), the
       placement solved on the source and the one solved on the target;
    3. gain = contiguous - placement (per metric; lower metric is better), and
       transferred = gain(solved on source) / gain(solved on target).
    """
    try:
        from moeplace.solve.solver import solve_placement  # the solver is the heaviest import
    except ImportError as e:
        raise MoeplaceError(f"the placement solver is unavailable ({e}); rerun with --no-solve") from None

    solved_a = solve_placement(trace_a, num_gpus, gpus_per_node, time_limit, seed)
    solved_b = solve_placement(trace_b, num_gpus, gpus_per_node, time_limit, seed)
    return {
        "num_gpus": num_gpus,
        "gpus_per_node": gpus_per_node,
        "time_limit": time_limit,
        "seed": seed,
        "solver": solved_a.solver,
        "a_to_b": _replay(trace_a, trace_b, solved_a, solved_b),
        "b_to_a": _replay(trace_b, trace_a, solved_b, solved_a),
    }


def _replay(source: Trace, target: Trace, solved_source: Placement, solved_target: Placement) -> dict[str, Any]:
    num_gpus, gpn = solved_source.num_gpus, solved_source.gpus_per_node
    layers, experts = target.num_layers, target.num_experts
    placed = lambda e2g: Placement(e2g, num_gpus=num_gpus, gpus_per_node=gpn)  # noqa: E731
    metrics = {
        "contiguous": evaluate(placed(contiguous(layers, experts, num_gpus)), target),
        "greedy_load_from_source": evaluate(placed(greedy_load(source.expert_loads(), num_gpus)), target),
        "solved_on_source": evaluate(solved_source, target),
        "solved_on_target": evaluate(solved_target, target),
    }
    keep = (*TRANSFER_METRICS, "imbalance_max")
    out: dict[str, Any] = {
        "evaluated": {name: {k: m[k] for k in keep} for name, m in metrics.items()},
        "gain": {},
        "transferred": {},
    }
    for metric in TRANSFER_METRICS:
        base = metrics["contiguous"][metric]
        own = base - metrics["solved_on_target"][metric]
        moved = base - metrics["solved_on_source"][metric]
        out["gain"][metric] = {"solved_on_source": moved, "solved_on_target": own}
        # undefined when solving on the target itself gains nothing over the contiguous layout
        out["transferred"][metric] = moved / own if own > 1e-12 else None
    return out


def stability(
    trace_a: Trace,
    trace_b: Trace,
    num_gpus: int | None,
    gpus_per_node: int,
    time_limit: float,
    seed: int,
) -> dict[str, Any]:
    """Affinity correlation and held-out capture A -> B; placement transfer unless num_gpus is None.
    Skipped, with the reason, when a side is too small (too_few_tokens): the rest of analyze stands."""
    tokens = [trace_a.num_tokens, trace_b.num_tokens]
    if reason := too_few_tokens(tokens, trace_a.num_experts):
        return {"tokens": tokens, "skipped": reason}
    out: dict[str, Any] = {
        "tokens": tokens,
        "load_corr": load_correlation(trace_a.expert_loads(), trace_b.expert_loads()),
        "modes": compare_affinity(trace_a, trace_b),
    }
    if num_gpus is not None and trace_a.num_layers > 1:
        out["placement"] = placement_transfer(trace_a, trace_b, num_gpus, gpus_per_node, time_limit, seed)
    return out


def too_few_tokens(tokens: list[int], num_experts: int) -> str | None:
    """Why sides of these token counts are too small to compare (MIN_SIDE_TOKENS), else None:
    a lopsided split (49 tokens and 1) or a tiny trace gave figures that meant nothing."""
    need = max(MIN_SIDE_TOKENS, num_experts)
    if min(tokens) >= need:
        return None
    return (f"too few tokens to compare ({tokens[0]} and {tokens[1]}): each side needs at least {need}, the larger "
            f"of {MIN_SIDE_TOKENS} (a share within +-0.1) and one per expert ({num_experts})")
