"""Edge weights of the traffic objective, aggregated over tokens (never one variable per token).

The metrics (eval/metrics.py) place a token at layer l+1 on the GPU of its top-1 expert at layer
l, and count (a) whether its top-1 expert at l+1 is elsewhere and (b) how many other GPUs hold
its k experts at l+1. Both shrink when, for every token,

    * its top-1 expert at l shares a GPU with its experts at l+1      (inter-layer edges), and
    * its k experts at l+1 share GPUs with each other                 (intra-layer edges).

So the graph has two kinds of weighted edges (float64):

    inter [L-1, E, E]  inter[l, i, j]: (layer l, expert i) -> (layer l+1, expert j)
    intra [L, E, E]    intra[l, j, j']: experts j, j' both chosen at layer l (symmetric, 0 diag)

Weights (see docs/solver.md for the exact objective), per token t and layer pair l -> l+1:

    inter[l, top1_l(t), j] += top1_weight * [j = top1_{l+1}(t)] + [j in topk_{l+1}(t)]
    intra[l+1, j, j']      += coselect_weight / (k - 1)      for j != j' in topk_{l+1}(t)

plus two regularisers, because 320 training tokens give at most 320 top-1 sources per layer for
64 x 64 expert pairs and the raw counts are noisy:

    smoothing: each token's edges are also spread over its k experts at layer l, weighted by the
               renormalised gate weights, so a rarely-top-1 expert still gets an estimate:
               inter[l, i, :] += smoothing * sum_t gate_l(t, i) * (destination term above)
    prior:     the gate-weighted transitions of all k x k pairs (gate_weighted_transitions),
               rescaled to the same total as the metric-aligned inter weights, times `prior`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeplace.trace.format import Trace

PAIR_CHUNK = 1 << 18  # token-expert pairs per chunk of pair_weights: a few MB of temporaries


@dataclass(frozen=True)
class AffinityGraph:
    """Weighted edges of the traffic objective; see the module docstring."""

    inter: np.ndarray  # float64 [L-1, E, E]
    intra: np.ndarray  # float64 [L, E, E], symmetric, zero diagonal

    @property
    def num_layers(self) -> int:
        return int(self.intra.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.intra.shape[1])

    def total_weight(self) -> float:
        """Sum of all edge weights (each intra pair once)."""
        return float(self.inter.sum() + self.intra.sum() / 2)


def pair_weights(src: np.ndarray, src_w: np.ndarray, dst: np.ndarray, dst_w: np.ndarray,
                 num_experts: int) -> np.ndarray:
    """sum_t src_w[t, a] * dst_w[t, b] on edge (src[t, a], dst[t, b]). [T, A], [T, B] -> [E, E].

    Accumulated in token order (np.add.at) over chunks of tokens: the same sums, bit for bit,
    as one bincount over all T x A x B pairs, without its [T, A, B] temporaries (512 MB each
    for a million tokens at top-8)."""
    out = np.zeros(num_experts * num_experts)
    chunk = max(1, PAIR_CHUNK // (src.shape[1] * dst.shape[1]))
    for lo in range(0, src.shape[0], chunk):
        hi = lo + chunk
        index = src[lo:hi, :, None] * num_experts + dst[lo:hi, None, :]
        np.add.at(out, index.ravel(), (src_w[lo:hi, :, None] * dst_w[lo:hi, None, :]).ravel())
    return out.reshape(num_experts, num_experts)


def coselection(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """Tokens choosing both experts i and j (i != j) of one layer: ids int [T, k] -> float64 [E, E]."""
    ones = np.ones(ids.shape)
    out = pair_weights(ids, ones, ids, ones, num_experts)
    np.fill_diagonal(out, 0.0)
    return out


@dataclass(frozen=True)
class EdgeTerms:
    """The sums over tokens behind edge_weights, before the regularisation is chosen (float64).

    Cross-validation scores several (coselect_weight, smoothing, prior) on one set of tokens:
    the token sums are taken once here, and each weighting is a few array operations (`graph`).

        top1     [L-1, E, E]  sources: the top-1 expert at layer l
        smooth   [L-1, E, E]  sources: all k experts at layer l, renormalised gate weights
        pairs    [L-1, E, E]  gate_weighted_transitions (the prior)
        coselect [L, E, E]    co-selection counts at layer l (zero diagonal, zero at layer 0)

    Destinations of top1/smooth are the k experts at l+1, weight 1 (+ top1_weight for top-1).
    Every term is a sum over tokens, so the terms of disjoint token sets add up (`+`).
    """

    top1: np.ndarray
    smooth: np.ndarray
    pairs: np.ndarray
    coselect: np.ndarray
    top_k: int

    def __add__(self, other: EdgeTerms) -> EdgeTerms:
        return EdgeTerms(self.top1 + other.top1, self.smooth + other.smooth, self.pairs + other.pairs,
                         self.coselect + other.coselect, self.top_k)

    def graph(self, coselect_weight: float = 2.0, smoothing: float = 0.5, prior: float = 0.5) -> AffinityGraph:
        """The AffinityGraph of one weighting (module docstring)."""
        inter = self.top1.copy()
        if smoothing > 0:
            inter += smoothing * self.smooth
        if prior > 0 and inter.shape[0] > 0:
            inter += prior * (inter.sum() / max(self.pairs.sum(), 1e-300)) * self.pairs
        intra = self.coselect * (coselect_weight / (self.top_k - 1)) if self.top_k > 1 else np.zeros_like(self.coselect)
        return AffinityGraph(inter=inter, intra=intra)


def edge_terms(trace: Trace, top1_weight: float = 1.0) -> EdgeTerms:
    """The token sums of a trace [T, L, k] that every weighting of edge_weights combines.

    1. destinations of a token at layer l+1: its k experts, weight 1 (+ top1_weight for top-1);
    2. sources at layer l: its top-1 (weight 1) -> `top1`; all k experts with renormalised gate
       weights -> `smooth`;
    3. co-selection counts of the k experts at each layer but the first -> `coselect`;
    4. gate-weighted transitions of all k x k pairs -> `pairs`.
    """
    t, num_layers, k = trace.topk_ids.shape
    e = trace.num_experts
    ids = trace.topk_ids
    gate = trace.gate_shares()  # float64 [T, L, k]
    dst_w = np.ones((t, k))
    dst_w[:, 0] += top1_weight
    ones = np.ones((t, 1))

    top1 = np.zeros((max(num_layers - 1, 0), e, e))
    smooth = np.zeros_like(top1)
    coselect = np.zeros((num_layers, e, e))
    for layer in range(1, num_layers):  # layer 0 is nobody's destination in the metrics
        dst = ids[:, layer]
        if k > 1:
            coselect[layer] = coselection(dst, e)
        top1[layer - 1] = pair_weights(ids[:, layer - 1, :1], ones, dst, dst_w, e)
        smooth[layer - 1] = pair_weights(ids[:, layer - 1], gate[:, layer - 1], dst, dst_w, e)
    return EdgeTerms(top1=top1, smooth=smooth, pairs=gate_weighted_transitions(trace).inter, coselect=coselect,
                     top_k=k)


def edge_weights(
    trace: Trace,
    top1_weight: float = 1.0,
    coselect_weight: float = 2.0,  # the defaults are solve's (solver.DEFAULT_WEIGHTS)
    smoothing: float = 0.5,
    prior: float = 0.5,
) -> AffinityGraph:
    """Aggregate a trace [T, L, k] into an AffinityGraph (weights per token as in the docstring):
    edge_terms(trace, top1_weight).graph(coselect_weight, smoothing, prior)."""
    return edge_terms(trace, top1_weight).graph(coselect_weight, smoothing, prior)


def gate_weighted_transitions(trace: Trace) -> AffinityGraph:
    """The plain reference weighting: inter[l, i, j] = sum_t gate_l(t, i) * gate_{l+1}(t, j).

    All k x k pairs weighted by the product of (raw) gate weights, no intra-layer term: the
    `prior` of edge_weights, and alone the plain reference heuristic of the benchmark.
    """
    num_layers, e = trace.num_layers, trace.num_experts
    w = trace.weights_or_uniform().astype(np.float64)
    ids = trace.topk_ids
    inter = np.stack([pair_weights(ids[:, l], w[:, l], ids[:, l + 1], w[:, l + 1], e) for l in range(num_layers - 1)]) \
        if num_layers > 1 else np.zeros((0, e, e))
    return AffinityGraph(inter=inter, intra=np.zeros((num_layers, e, e)))


def distance_matrix(num_gpus: int, gpus_per_node: int, node_cost: float) -> np.ndarray:
    """Cost of moving a token between GPUs, float64 [G, G]: 0 same GPU, 1 same node, node_cost."""
    gpu = np.arange(num_gpus)
    same_node = gpu[:, None] // gpus_per_node == gpu[None, :] // gpus_per_node
    d = np.where(same_node, 1.0, float(node_cost))
    np.fill_diagonal(d, 0.0)
    return d


def one_hot(expert_to_gpu: np.ndarray, num_gpus: int) -> np.ndarray:
    """[..., E] GPU ids -> float64 [..., E, G] one-hot."""
    return (expert_to_gpu[..., None] == np.arange(num_gpus)).astype(np.float64)


def placement_cost(graph: AffinityGraph, expert_to_gpu: np.ndarray, distance: np.ndarray) -> float:
    """The traffic objective (minimised): sum of edge weight x distance between endpoint GPUs.

    cost = sum_l sum_ij inter[l,i,j] D[g_l(i), g_{l+1}(j)] + sum_l sum_{j<j'} intra[l,j,j'] D[g_l(j), g_l(j')]
    """
    x = one_hot(expert_to_gpu, distance.shape[0])  # [L, E, G]
    inter = np.einsum("lig,lij,ljh,gh->", x[:-1], graph.inter, x[1:], distance, optimize=True)
    intra = np.einsum("lig,lij,ljh,gh->", x, graph.intra, x, distance, optimize=True) / 2
    return float(inter + intra)
