"""MoETuner's two-stage placement (arXiv 2502.06643), for comparison on the same inputs.

1. per layer, cluster the experts into G groups of E/G with balanced token load (MoETuner's
   first ILP; here moeplace's balance ILP/heuristics without replicas);
2. assign the clusters to GPUs so that tokens moving from layer l to layer l+1 stay on their
   GPU: with F[c, d] the top-k transitions from cluster c of layer l to cluster d of layer l+1,
   layer l+1's clusters take the GPUs of layer l's by a maximum-weight assignment (an ILP on
   G x G binaries; MoETuner solves all layers in one ILP, a chain of exact pairwise assignments
   is what stays tractable at DeepSeek size).
Shapes: topk_ids int [T, L, k]; result int [L, E] GPU ids.
"""

from __future__ import annotations

import highspy
import numpy as np
import pulp

from moeplace.errors import MoeplaceError
from moeplace.placement import Placement
from moeplace.solve.balance import balance_placement
from moeplace.solve.ilp import highs, highs_status
from moeplace.trace.format import Trace, flow_counts


def assign_clusters(flow: np.ndarray, layer: int | None = None) -> np.ndarray:
    """Maximum-weight perfect matching of clusters: flow float [G, G] -> perm int [G], perm[d] = c.
    Raises MoeplaceError (naming stage 2 and `layer`) unless HiGHS proves an optimum."""
    g_count = flow.shape[0]
    prob = pulp.LpProblem("moetuner_stage2", pulp.LpMaximize)
    x = {(c, d): pulp.LpVariable(f"x_{c}_{d}", cat="Binary") for c in range(g_count) for d in range(g_count)}
    prob += pulp.lpSum(float(flow[c, d]) * x[c, d] for c in range(g_count) for d in range(g_count))
    for i in range(g_count):
        prob += pulp.lpSum(x[i, d] for d in range(g_count)) == 1
        prob += pulp.lpSum(x[c, i] for c in range(g_count)) == 1
    prob.solve(highs())
    status = highs_status(prob)
    where = "" if layer is None else f", layer {layer}"
    if status != highspy.HighsModelStatus.kOptimal:
        name = getattr(status, "name", None) or "no solve"
        raise MoeplaceError(f"moetuner stage 2 (cluster-to-GPU assignment{where}): HiGHS ended with {name}, "
                            "not an optimum")
    perm = np.full(g_count, -1, dtype=np.int64)
    for (c, d), var in x.items():
        if (var.varValue or 0) > 0.5:
            perm[d] = c
    if (perm < 0).any() or len(set(perm.tolist())) != g_count:  # a matching: every cluster on its own GPU
        raise MoeplaceError(f"moetuner stage 2 (cluster-to-GPU assignment{where}): HiGHS' solution is not "
                            "a one-to-one assignment")
    return perm


def moetuner_placement(trace: Trace, num_gpus: int, gpus_per_node: int, time_limit: float = 10.0) -> Placement:
    """MoETuner's two stages on a per-token trace (no replicas, E/G experts per GPU)."""
    clusters = balance_placement(trace.expert_loads(), num_gpus, gpus_per_node, 0, time_limit, progress=False).expert_to_gpu
    e2g = clusters.copy()
    ids = trace.topk_ids
    for layer in range(1, trace.num_layers):
        src = e2g[layer - 1][ids[:, layer - 1, 0]]  # GPU of each token's top-1 at the previous layer
        flow = flow_counts(src, clusters[layer][ids[:, layer]], num_gpus, num_gpus)
        perm = assign_clusters(flow, layer)  # cluster d of this layer goes to GPU perm[d]
        e2g[layer] = perm[clusters[layer]]
    return Placement(e2g, num_gpus, gpus_per_node, objective={"name": "moetuner"},
                     solver={"name": "moetuner-two-stage", "stage1": "balance", "stage2": "chained assignment ILP"})
