"""Load skew and inter-layer affinity of a routing trace: pure numpy statistics.

Shapes: T tokens, L MoE layers, k experts per token, E experts per layer. A "pair" is a
consecutive layer pair (l, l+1); there are L-1 of them.

Transition counts come in three modes, each a joint distribution over (expert i at l, expert j
at l+1) in which every token carries mass 1 per layer pair:
    top1   the token's top-1 expert at l and at l+1;
    topk   every (i, j) of its k x k top-k pairs, 1/k^2 each;
    gated  every pair weighted by w_i * w_j, the gate weights renormalised over each top-k.

Mutual information has an upward bias with few tokens per (i, j) cell (the plug-in estimate
exceeds the truth by about (E-1)^2 / 2T nats when T >> E^2, more below), so it is always reported
beside a token-shuffled baseline: the same statistic after permuting tokens at l+1, which keeps
both marginals and the sample size and destroys the pairing.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import numpy as np

from moeplace.parallel import thread_map
from moeplace.trace.format import Trace

MODES = ("top1", "topk", "gated")
CAPTURE_M = (1, 2, 4)
_CHUNK_PAIRS = 1 << 20  # (token, pair, slot, slot) entries per bincount call: bounds memory


def trace_modes(trace: Trace) -> tuple[str, ...]:
    """The modes that differ for this trace: topk needs k > 1, gated also needs gate weights."""
    if trace.top_k == 1:
        return ("top1",)
    return MODES if trace.topk_weights is not None else ("top1", "topk")


# ---------------------------------------------------------------------------------------------
# Load skew
# ---------------------------------------------------------------------------------------------


def gini(loads: np.ndarray) -> np.ndarray:
    """Gini coefficient of each row of loads [..., E]: 0 = equal, (E-1)/E = one expert has all."""
    x = np.sort(loads, axis=-1)
    n = x.shape[-1]
    total = x.sum(axis=-1)
    rank = np.arange(1, n + 1)
    g = 2.0 * (x * rank).sum(axis=-1) / (n * np.where(total > 0, total, 1.0)) - (n + 1) / n
    return np.where(total > 0, g, 0.0)


def entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of distributions along `axis` (need not be normalised)."""
    total = p.sum(axis=axis, keepdims=True)
    q = np.divide(p, total, out=np.zeros_like(p, dtype=np.float64), where=total > 0)
    return 0.0 - (q * np.log(np.where(q > 0, q, 1.0))).sum(axis=axis)  # 0 - x, not -x: -0.0 printed '-0.00'


def load_skew(loads: np.ndarray, hottest: int = 4) -> list[dict[str, Any]]:
    """Per-layer skew of token-expert loads [L, E].

    max_over_mean  hottest expert's load over the mean (1.0 = perfectly even)
    cv             coefficient of variation (std / mean)
    gini           Gini coefficient
    entropy_frac   entropy of the load share over log E (1.0 = uniform)
    unused         experts no token chose
    hottest        the `hottest` busiest experts with their share of the layer's selections
    """
    num_experts = loads.shape[1]
    mean = loads.mean(axis=1)
    safe_mean = np.where(mean > 0, mean, 1.0)
    max_over_mean = loads.max(axis=1) / safe_mean
    cv = loads.std(axis=1) / safe_mean
    g = gini(loads)
    ent = entropy(loads) / np.log(num_experts) if num_experts > 1 else np.ones(len(loads))
    out = []
    for layer, row in enumerate(loads):
        total = row.sum()
        top = np.argsort(-row, kind="stable")[:hottest]
        out.append({
            "layer": layer,
            "max_over_mean": float(max_over_mean[layer]),
            "cv": float(cv[layer]),
            "gini": float(g[layer]),
            "entropy_frac": float(ent[layer]),
            "unused": int((row == 0).sum()),
            "hottest": [{"expert": int(e), "share": float(row[e] / total) if total else 0.0} for e in top],
        })
    return out


# ---------------------------------------------------------------------------------------------
# Transition counts
# ---------------------------------------------------------------------------------------------


def mode_arrays(trace: Trace, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(ids [T, L, k'], per-slot mass [T, L, k'] or None for uniform) that define `mode`."""
    if mode == "top1":
        return trace.topk_ids[:, :, :1], None
    if mode == "topk":
        return trace.topk_ids, None
    if mode == "gated":
        return trace.topk_ids, trace.gate_shares(np.float32)
    raise ValueError(f"unknown transition mode {mode!r} (expected one of {MODES})")


def pair_counts(
    cur_ids: np.ndarray,
    nxt_ids: np.ndarray,
    num_experts: int,
    cur_mass: np.ndarray | None = None,
    nxt_mass: np.ndarray | None = None,
    perm: np.ndarray | None = None,
) -> np.ndarray:
    """Joint counts of (expert at l, expert at l+1), float64 [P, E, E].

    cur_ids, nxt_ids: int [T, P, k] the experts of each token on either side of each of P pairs
    (views are fine). cur_mass, nxt_mass: float [T, P, k] the mass of each slot (summing to 1 per
    token and side), both or neither; None means 1/k each. perm: int [T] or None; token t is
    paired with token perm[t] on the l+1 side (the shuffled baseline). Every token adds the outer
    product of its two sides' masses to its pair's matrix. Tokens go in chunks, so memory stays
    O(chunk * P * k^2) whatever T is.
    """
    if (cur_mass is None) != (nxt_mass is None):
        raise ValueError("pass both masses or neither")
    uniform, weighted = _count_pairs(cur_ids, nxt_ids, num_experts, cur_mass, nxt_mass, perm, cur_mass is None)
    out = uniform if cur_mass is None else weighted
    assert out is not None
    return out


def _count_pairs(
    cur_ids: np.ndarray,
    nxt_ids: np.ndarray,
    num_experts: int,
    cur_mass: np.ndarray | None,
    nxt_mass: np.ndarray | None,
    perm: np.ndarray | None,
    uniform: bool,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(counts with 1/k^2 per slot pair if `uniform`, counts weighted by the masses if given),
    each float64 [P, E, E] or None, from one pass that builds each chunk's bin index once.

    Each chunk's entries are laid out pair-major, [P, n, k, k], so a bincount walks one pair's
    E x E bins at a time (cache-resident; token-major scatters over all P E^2 bins at once and
    is ~3x slower). A bin only ever receives entries of its own pair, in token order then slot
    order either way, and the chunks are the same as a token-major pass's, so the weighted float
    sums are the same bit for bit; the uniform ones are exact integer counts until the division.
    """
    t, p, k = cur_ids.shape
    e = num_experts
    bins = p * e * e
    whole = np.zeros(bins, dtype=np.int64) if uniform else None
    weighted = np.zeros(bins, dtype=np.float64) if cur_mass is not None and nxt_mass is not None else None
    pair_base = (np.arange(p) * e * e)[:, None, None]  # [P, 1, 1] offset of each pair's matrix
    chunk = max(1, _CHUNK_PAIRS // (p * k * k))  # the chunks fix the float sums: keep them as they are
    size = min(chunk, t) * p * k * k
    index = np.empty(size, dtype=np.int64)  # reused buffers: no page faults per chunk
    weights = np.empty(size) if weighted is not None else None
    for start in range(0, t, chunk):
        sl = slice(start, start + chunk)
        rows = sl if perm is None else perm[sl]
        n = min(chunk, t - start)
        flat = index[: n * p * k * k]
        cell = cur_ids[sl].transpose(1, 0, 2) * e + pair_base  # [P, n, k]
        nxt = nxt_ids[rows].transpose(1, 0, 2)
        np.add(cell[:, :, :, None], nxt[:, :, None, :], out=flat.reshape(p, n, k, k))
        if whole is not None:
            whole += np.bincount(flat, minlength=bins)
        if weighted is not None and weights is not None and cur_mass is not None and nxt_mass is not None:
            cw, nw = cur_mass[sl].transpose(1, 0, 2), nxt_mass[rows].transpose(1, 0, 2)
            w = weights[: flat.size]
            np.multiply(cw[:, :, :, None], nw[:, :, None, :], out=w.reshape(p, n, k, k))
            weighted += np.bincount(flat, weights=w, minlength=bins)
    return (
        None if whole is None else (whole / (k * k)).reshape(p, e, e),
        None if weighted is None else weighted.reshape(p, e, e),
    )


def transition_counts(trace: Trace, mode: str, perm: np.ndarray | None = None,
                      arrays: tuple[np.ndarray, np.ndarray | None] | None = None) -> np.ndarray:
    """Joint counts [L-1, E, E] of `mode`; with `perm` [T], tokens at l+1 are permuted first.
    `arrays`: mode_arrays(trace, mode) when the caller already has them."""
    ids, mass = mode_arrays(trace, mode) if arrays is None else arrays
    cur_mass, nxt_mass = (None, None) if mass is None else (mass[:, :-1], mass[:, 1:])
    return pair_counts(ids[:, :-1], ids[:, 1:], trace.num_experts, cur_mass, nxt_mass, perm)


def mode_counts(trace: Trace, modes: Sequence[str], perm: np.ndarray | None = None,
                arrays: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None) -> dict[str, np.ndarray]:
    """transition_counts of each of `modes` (same values), with topk and gated counted in one
    pass: they pair the same top-k ids, so they share each chunk's bin index.
    `arrays`: mode_arrays of each mode when the caller already has them."""
    arrays = arrays if arrays is not None else {mode: mode_arrays(trace, mode) for mode in modes}
    out: dict[str, np.ndarray] = {}
    if "topk" in modes and "gated" in modes:
        ids, mass = arrays["gated"]
        assert mass is not None
        topk, gated = _count_pairs(ids[:, :-1], ids[:, 1:], trace.num_experts, mass[:, :-1], mass[:, 1:], perm, True)
        assert topk is not None and gated is not None
        out["topk"], out["gated"] = topk, gated
    for mode in modes:
        if mode not in out:
            out[mode] = transition_counts(trace, mode, perm, arrays[mode])
    return {mode: out[mode] for mode in modes}


def conditional(counts: np.ndarray) -> np.ndarray:
    """P(j at l+1 | i at l) from joint counts [..., E, E]; rows of unseen experts are 0."""
    rows = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)


def mutual_information(counts: np.ndarray) -> np.ndarray:
    """I(expert at l; expert at l+1) in nats of joint counts [..., E, E] (plug-in estimate)."""
    h_cur = entropy(counts.sum(axis=-1))
    h_nxt = entropy(counts.sum(axis=-2))
    h_joint = entropy(counts.reshape(*counts.shape[:-2], -1))
    return np.maximum(h_cur + h_nxt - h_joint, 0.0)


def conditional_entropy(counts: np.ndarray) -> np.ndarray:
    """H(expert at l+1 | expert at l) in nats of joint counts [..., E, E]."""
    h_joint = entropy(counts.reshape(*counts.shape[:-2], -1))
    return np.maximum(h_joint - entropy(counts.sum(axis=-1)), 0.0)


def topm_successors(counts: np.ndarray, m: int) -> np.ndarray:
    """The m most frequent successors j of each expert i, int [..., E, m] (ties: lower id)."""
    return np.argsort(-counts, axis=-1, kind="stable")[..., :m]


def capture(counts: np.ndarray, successors: np.ndarray) -> np.ndarray:
    """Share of the transitions in counts [P, E, E] that go to the given successors [P, E, m]."""
    kept = np.take_along_axis(counts, successors, axis=-1).sum(axis=(-1, -2))
    total = counts.sum(axis=(-1, -2))
    return np.divide(kept, total, out=np.zeros_like(total), where=total > 0)


def topm_capture(counts: np.ndarray, m: int) -> np.ndarray:
    """In-sample share of transitions [P] captured by each expert's own top-m successors."""
    return capture(counts, topm_successors(counts, m))


def shuffle_perms(num_tokens: int, num_shuffles: int, seed: int) -> list[np.ndarray]:
    """Seeded token permutations for the shuffled baseline."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(num_tokens) for _ in range(num_shuffles)]


def capture_depths(num_experts: int) -> list[int]:
    return [m for m in CAPTURE_M if m <= num_experts]


def shuffled_stats(counts: np.ndarray, num_experts: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(MI [P], top-m capture [P] per m) of one shuffled copy: all a baseline keeps of it."""
    return mutual_information(counts), {m: topm_capture(counts, m) for m in capture_depths(num_experts)}


def pair_stats(
    counts: np.ndarray,
    baseline: list[tuple[np.ndarray, dict[int, np.ndarray]]],
    num_experts: int,
) -> list[dict[str, Any]]:
    """Affinity statistics of each layer pair from joint counts [P, E, E] and shuffled baselines.

    1. MI, conditional entropy and top-m capture of the real counts;
    2. `baseline`: `shuffled_stats` of each token-shuffled copy; their mean and std per pair;
    3. excess = MI - baseline mean (nats), ratio = MI / baseline mean.
    """
    log_e = float(np.log(num_experts))
    mi = mutual_information(counts)
    h_cond = conditional_entropy(counts)
    h_nxt = entropy(counts.sum(axis=-2))
    caps = {m: topm_capture(counts, m) for m in capture_depths(num_experts)}
    if baseline:
        base_mi = np.stack([b[0] for b in baseline])  # [S, P]
        base_caps = {m: np.stack([b[1][m] for b in baseline]).mean(axis=0) for m in caps}
    out = []
    for pair in range(counts.shape[0]):
        row: dict[str, Any] = {
            "pair": [pair, pair + 1],
            "mi": float(mi[pair]),
            "mi_frac": float(mi[pair] / log_e) if log_e > 0 else 0.0,
            "next_entropy": float(h_nxt[pair]),
            "cond_entropy": float(h_cond[pair]),
            "cond_entropy_frac": float(h_cond[pair] / log_e) if log_e > 0 else 0.0,
            "capture": {str(m): float(c[pair]) for m, c in caps.items()},
        }
        if baseline:
            b, s = float(base_mi[:, pair].mean()), float(base_mi[:, pair].std())
            row.update(
                mi_baseline=b,
                mi_baseline_std=s,
                mi_excess=float(mi[pair]) - b,
                mi_ratio=float(mi[pair]) / b if b > 0 else None,
                capture_baseline={str(m): float(c[pair]) for m, c in base_caps.items()},
            )
        out.append(row)
    return out


def affinity(trace: Trace, num_shuffles: int = 8, seed: int = 0, progress: Any = None) -> dict[str, Any]:
    """Affinity statistics of every consecutive layer pair, per mode (see the module docstring).

    Returns {"modes": {mode: {"per_pair": [...], "mean": {...}}}, "log_num_experts": log E,
    "shuffles": S, "seed": seed}; and the conditional matrices P(j | i) float32 [L-1, E, E] per
    mode under "conditional" (arrays, for figures; not JSON). The shuffles are counted on up to
    one thread per CPU (parallel.thread_map), every mode of a shuffle in one task (mode_counts),
    with one shuffled [L-1, E, E] count array per mode alive per thread.
    """
    modes = trace_modes(trace) if trace.num_layers > 1 else ()
    perms = shuffle_perms(trace.num_tokens, num_shuffles, seed)
    out: dict[str, Any] = {"log_num_experts": float(np.log(trace.num_experts)), "shuffles": num_shuffles,
                           "seed": seed, "modes": {}, "conditional": {}}
    if not modes:
        return out
    arrays = {mode: mode_arrays(trace, mode) for mode in modes}
    counts = mode_counts(trace, modes, arrays=arrays)
    done = len(modes)
    baseline: dict[str, list[tuple[np.ndarray, dict[int, np.ndarray]]]] = {mode: [] for mode in modes}
    for shuffle, stats in enumerate(thread_map(partial(_shuffled, trace, modes, arrays), perms), 1):
        for mode in modes:
            baseline[mode].append(stats[mode])
        done += len(modes)
        if progress is not None:
            progress.update(done, f"shuffle {shuffle}/{num_shuffles}")
    for mode in modes:
        per_pair = pair_stats(counts[mode], baseline[mode], trace.num_experts)
        out["modes"][mode] = {"per_pair": per_pair, "mean": mean_stats(per_pair)}
        out["conditional"][mode] = conditional(counts[mode]).astype(np.float32)
    return out


def _shuffled(trace: Trace, modes: Sequence[str], arrays: dict[str, tuple[np.ndarray, np.ndarray | None]],
              perm: np.ndarray) -> dict[str, tuple[np.ndarray, dict[int, np.ndarray]]]:
    counts = mode_counts(trace, modes, perm, arrays)
    return {mode: shuffled_stats(c, trace.num_experts) for mode, c in counts.items()}


def mean_stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over rows of every numeric field (None values skipped) and of numeric dict fields."""
    if not rows:
        return {}
    out: dict[str, Any] = {}
    for key in rows[0]:
        if key in ("layer", "pair"):
            continue
        values = [r[key] for r in rows]
        if all(isinstance(v, dict) for v in values):
            out[key] = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
            continue
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers and all(v is None or isinstance(v, (int, float)) for v in values):
            out[key] = float(np.mean(numbers))
    return out
