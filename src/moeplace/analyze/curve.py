"""Learning curve: is a trace long enough to solve a placement on?

On a short trace the held-out gain of a traffic placement is set by how well the co-selections
are estimated, not by the search (docs/benchmarks.md, "Learning curve": on FLAME's 640 tokens
the held-out ratio still falls at every step while the in-sample one rises towards it). This
module measures that curve on the user's own trace, with `moeplace solve`'s solver as shipped.

Protocol, per split s = 0 .. S-1 (seeded by (seed, s)):
    1. order the tokens at random: by whole sequences (in trace order inside each) when the
       trace has sequence ids, at least MIN_SEQUENCES of them and none longer than an eighth of
       the tokens, else token by token (`curve_splits`);
    2. hold out the first tokens of that order as the test set: whole sequences until
       TEST_SHARE of the tokens is reached, or that many tokens; at least max(MIN_SIDE_TOKENS, E)
       (analyze's floor for a side it compares, stability.too_few_tokens);
    3. the rest, in that order, is the training pool; the training set of size n is its first n
       tokens, so each smaller set is a subset of every larger one (nested by construction) and
       none contains a test token;
    4. for every n in `curve_sizes` (FRACTIONS of the smallest pool over the splits, the sizes
       too_few_tokens refuses skipped): solve_placement (traffic objective, default settings,
       `time_limit` per solve, the run's seed) on the n training tokens, then replay the
       placement and the contiguous layout on the split's test tokens with eval.metrics.evaluate
       (as `moeplace eval` does): held-out ratio = placement / contiguous, per METRICS; the
       in-sample ratio is the same on the n training tokens (solve's metrics["train"]).
Per n: mean and standard error (std over splits, ddof 1, / sqrt S) of the held-out ratios, mean
in-sample ratio. Every n of a split is scored on the same test tokens, so the differences
between sizes are not test-set noise; `curve_verdict` reads the last doubling of n.

Shapes: test indices int [T_test] and training order int [T_pool] per split, indices into the
trace's T tokens; ratios are floats (1.0 = contiguous, lower is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from moeplace.analyze.stability import MIN_SIDE_TOKENS, too_few_tokens
from moeplace.errors import MoeplaceError
from moeplace.eval.metrics import evaluate
from moeplace.options import plural
from moeplace.placement import Placement
from moeplace.solve.baselines import contiguous
from moeplace.trace.format import Trace

METRICS = ("cross_gpu_top1", "dest_gpus_topk")  # as ratios to contiguous, as solve and eval print them
FRACTIONS = (0.125, 0.25, 0.5, 1.0)  # of the training pool: three doublings ending at the whole pool
# A quarter of the tokens held out: the largest training set keeps three quarters of the trace, so
# the curve ends close to the length the user has, and the test set is large enough that every
# size's ratio averages over many transitions; fixed per split, so all sizes share its noise.
TEST_SHARE = 0.25
MIN_SEQUENCES = 8  # fewer sequences: a quarter of them is one or two texts, too lumpy a test set
# The verdict: the last doubling of n counts as an improvement when the held-out top-1 ratio fell
# by more than SE_FACTOR standard errors of that drop AND by at least MIN_GAIN (1% of contiguous's
# cross-GPU transitions): with 2 splits the standard error has one degree of freedom and can come
# out near 0 by chance, and a drop under 0.01 per doubling is worth little more tracing (8 GPUs,
# docs/benchmarks.md: FLAME's 80 -> 160 tokens gained 0.034, 160 -> 320 0.014; a 20,000-token
# trace's 5,000 -> 10,000 0.001).
SE_FACTOR = 2.0
MIN_GAIN = 0.01
VERDICT_METRIC = "cross_gpu_top1"


@dataclass(frozen=True)
class CurveSplit:
    """One split: the held-out tokens and the training pool in the order sets are taken from it."""

    index: int  # the split's number s (its seed is (seed, s))
    test: np.ndarray  # int [T_test], sorted
    order: np.ndarray  # int [T_pool]: training set of size n = order[:n]

    def train(self, n: int) -> np.ndarray:
        """Indices of the n-token training set, sorted (trace order, as a shorter trace has it)."""
        return np.sort(self.order[:n])


@dataclass
class CurveResult:
    """The JSON-ready `report` and, for checks, the splits and the placement of every (split, n)."""

    report: dict[str, Any]
    splits: list[CurveSplit]
    placements: dict[tuple[int, int], Placement] = field(default_factory=dict)


def min_side(num_experts: int) -> int:
    """Fewest tokens a test or training set may have (stability.too_few_tokens' floor)."""
    return max(MIN_SIDE_TOKENS, num_experts)


def min_curve_tokens(num_experts: int) -> int:
    """Fewest tokens that give a curve of two sizes (one doubling): the test set's floor plus a
    pool whose half reaches it (a quarter of 3 x floor tokens is below the floor)."""
    return 3 * min_side(num_experts)


def by_sequence(trace: Trace) -> bool:
    """Whether splits keep sequences whole: neighbouring tokens of one text route alike, so a test
    set sharing texts with the training set would flatter the held-out ratio."""
    if trace.sequence_ids is None:
        return False
    _, sizes = np.unique(trace.sequence_ids, return_counts=True)
    # none longer than an eighth: a whole-sequence test set then overshoots its quarter by less
    return len(sizes) >= MIN_SEQUENCES and int(sizes.max()) * 8 <= trace.num_tokens


def curve_splits(trace: Trace, num_splits: int, seed: int) -> list[CurveSplit]:
    """Steps 1-3 of the protocol for each split: test indices and the training pool's order."""
    num_tokens = trace.num_tokens
    target = max(math.ceil(TEST_SHARE * num_tokens), min_side(trace.num_experts))
    whole = by_sequence(trace)
    out = []
    for s in range(num_splits):
        rng = np.random.default_rng([seed, s])
        if whole:
            seq = np.asarray(trace.sequence_ids)
            ids, inverse = np.unique(seq, return_inverse=True)
            rank = np.empty(len(ids), dtype=np.int64)
            rank[rng.permutation(len(ids))] = np.arange(len(ids))
            order = np.lexsort((np.arange(num_tokens), rank[inverse]))  # sequence by sequence, in trace order
            # whole sequences until the target: the test set ends where a sequence ends. Not
            # trace.format.split_sequences: this order also ranks the training pool (nested sets),
            # the test set comes first and is seeded by (seed, s), so sharing it would move every curve
            ends = np.flatnonzero(np.diff(rank[inverse][order], append=len(ids)) != 0) + 1
            cut = int(ends[min(int(np.searchsorted(ends, target)), len(ends) - 1)])
        else:
            order = rng.permutation(num_tokens)
            cut = target
        out.append(CurveSplit(index=s, test=np.sort(order[:cut]), order=order[cut:]))
    return out


def curve_sizes(pool: int, test: int, num_experts: int) -> tuple[list[int], list[dict[str, Any]]]:
    """Training sizes FRACTIONS of `pool` tokens (the smallest pool over the splits), and the
    sizes skipped with the reason (too_few_tokens against the smallest test set of `test`)."""
    sizes, skipped = [], []
    for fraction in FRACTIONS:
        n = max(1, int(round(fraction * pool)))
        if reason := too_few_tokens([n, test], num_experts):
            skipped.append({"tokens": n, "reason": reason})
        elif n not in sizes:
            sizes.append(n)
    return sizes, skipped


def plan(trace: Trace, num_splits: int, seed: int) -> tuple[list[CurveSplit], list[int], list[dict[str, Any]]]:
    """The splits and sizes of a curve, or MoeplaceError when it cannot be measured (checked
    before any work: one MoE layer, fewer than two sizes)."""
    if trace.num_layers < 2:
        raise MoeplaceError("--learning-curve: the trace has one MoE layer, so no layer transitions for a placement "
                            "to reduce; drop --learning-curve")
    splits = curve_splits(trace, num_splits, seed) if trace.num_tokens >= min_curve_tokens(trace.num_experts) else []
    pool, test = min((len(s.order) for s in splits), default=0), min((len(s.test) for s in splits), default=0)
    sizes, skipped = curve_sizes(pool, test, trace.num_experts) if splits else ([], [])
    if len(sizes) < 2:
        need = min_side(trace.num_experts)
        short = ("" if not splits else f": whole-sequence test sets of up to {max(len(s.test) for s in splits)} "
                 f"leave {pool} for training")
        raise MoeplaceError(
            f"--learning-curve: {trace.num_tokens} tokens are too few for a curve{short}; it needs a test set and two "
            f"training sets (n and 2n) of at least {need} tokens each (the larger of {MIN_SIDE_TOKENS} and one per "
            f"expert), at least {min_curve_tokens(trace.num_experts)} tokens; trace more or drop --learning-curve")
    return splits, sizes, skipped


def _ratios(metrics: dict[str, Any], base: dict[str, Any]) -> list[float | None]:
    return [metrics[m] / base[m] if base[m] > 0 else None for m in METRICS]


def _mean_se(values: list[float | None]) -> dict[str, Any]:
    known = np.array([v for v in values if v is not None], dtype=np.float64)
    mean = float(known.mean()) if len(known) else None
    se = float(known.std(ddof=1) / np.sqrt(len(known))) if len(known) > 1 else None
    return {"mean": mean, "se": se, "per_split": values}


def learning_curve(
    trace: Trace,
    num_gpus: int,
    gpus_per_node: int,
    time_limit: float,
    seed: int,
    num_splits: int = 2,
    on_solve: Callable[[int, int, int], None] | None = None,
) -> CurveResult:
    """The protocol of the module docstring on `trace` [T, L, k]: {num_gpus, ..., points, verdict}.

    `on_solve(done, split, n)` is called before each solve (progress). Deterministic for `seed`
    unless a solve is stopped by its time limit (counted in `stopped_by_time_limit`).
    """
    from moeplace.solve.solver import solve_placement  # the solver is the heaviest import

    splits, sizes, skipped = plan(trace, num_splits, seed)
    layout = Placement(contiguous(trace.num_layers, trace.num_experts, num_gpus), num_gpus, gpus_per_node)
    held: dict[int, list[list[float | None]]] = {n: [] for n in sizes}
    own: dict[int, list[list[float | None]]] = {n: [] for n in sizes}
    result = CurveResult(report={}, splits=splits)
    cut = 0
    for split in splits:
        test = trace.select_tokens(split.test)
        base = evaluate(layout, test)
        for n in sizes:
            if on_solve is not None:
                on_solve(len(result.placements), split.index, n)
            placement = solve_placement(trace.select_tokens(split.train(n)), num_gpus, gpus_per_node, time_limit, seed)
            result.placements[(split.index, n)] = placement
            cut += bool(placement.solver.get("stopped_by_time_limit"))
            held[n].append(_ratios(evaluate(placement, test), base))
            fit = placement.metrics["train"]
            own[n].append(_ratios(fit["placement"], fit["contiguous"]))
    points = [{
        "tokens": n,
        "held_out": {m: _mean_se([r[i] for r in held[n]]) for i, m in enumerate(METRICS)},
        "in_sample": {m: _mean_se([r[i] for r in own[n]]) for i, m in enumerate(METRICS)},
    } for n in sizes]
    result.report = {
        "num_gpus": num_gpus,
        "gpus_per_node": gpus_per_node,
        "time_limit": time_limit,
        "seed": seed,
        "splits": num_splits,
        "split_by": "sequence" if by_sequence(trace) else "token",
        "test_tokens": [len(s.test) for s in splits],
        "pool_tokens": min(len(s.order) for s in splits),
        "test_share": TEST_SHARE,
        "sizes": sizes,
        "skipped_sizes": skipped,
        "solves": len(result.placements),
        "stopped_by_time_limit": cut,
        "points": points,
        "verdict": curve_verdict(points, num_gpus),
    }
    return result


def curve_verdict(points: list[dict[str, Any]], num_gpus: int) -> dict[str, Any]:
    """One line from the last doubling of n (the last two points): status "improving" when the
    held-out VERDICT_METRIC ratio fell by more than max(SE_FACTOR x its standard error, MIN_GAIN),
    else "flat". The standard error is that of the paired drop (per split, the same test tokens
    score both sizes): std over splits (ddof 1) / sqrt(S); None with one split (MIN_GAIN alone).

    points: [{"tokens": n, "held_out": {metric: {"per_split": [ratio | None] x S}}}] by n."""
    small, large = points[-2], points[-1]
    a = small["held_out"][VERDICT_METRIC]["per_split"]
    b = large["held_out"][VERDICT_METRIC]["per_split"]
    drops = np.array([x - y for x, y in zip(a, b) if x is not None and y is not None], dtype=np.float64)
    out: dict[str, Any] = {"metric": VERDICT_METRIC, "from_tokens": small["tokens"], "to_tokens": large["tokens"],
                           "se_factor": SE_FACTOR, "min_gain": MIN_GAIN, "gain": None, "se": None}
    if not len(drops):  # contiguous has no cross-GPU transitions to reduce
        out["status"] = "flat"
        out["text"] = f"flat: no cross-GPU traffic to reduce on {plural(num_gpus, 'GPU')}, whatever the trace length."
        return out
    gain = float(drops.mean())
    se = float(drops.std(ddof=1) / np.sqrt(len(drops))) if len(drops) > 1 else None
    out["gain"], out["se"] = gain, se
    threshold = max(SE_FACTOR * (se or 0.0), MIN_GAIN)
    said = (f"the last doubling, {small['tokens']} -> {large['tokens']} training tokens, "
            f"{'gained' if gain >= 0 else 'lost'} {abs(gain):.3f}" + (f" +- {se:.3f}" if se is not None else "")
            + f" in held-out {VERDICT_METRIC} ratio to contiguous; improving means > max({SE_FACTOR:g} SE, "
            f"{MIN_GAIN:g})")
    if gain > threshold:
        out["status"] = "improving"
        out["text"] = (f"still improving: a longer trace should give a better placement on {plural(num_gpus, 'GPU')} "
                       f"({said}).")
    else:
        out["status"] = "flat"
        out["text"] = f"flat: the trace is long enough for {plural(num_gpus, 'GPU')} ({said})."
    return out
