"""Replay a trace against a placement: the one definition of every metric moeplace reports.

Where a token "is": in context-coherent expert parallelism a token continues on the GPU of its
top-1 expert, so at layer l it sits on the GPU that served its top-1 expert at layer l-1.

Metrics (averaged over tokens and the L-1 consecutive layer pairs):
    cross_gpu_top1    fraction of top-1 transitions l -> l+1 whose experts sit on different GPUs
    cross_node_top1   the same across nodes
    dest_gpus_topk    mean number of GPUs, other than the token's current GPU, holding at least
                      one of its k experts at layer l+1 (the Alltoall destinations per token)
    dest_nodes_topk   mean number of nodes, other than the token's current node, likewise
    imbalance         per layer, max / mean token-expert load per GPU (1.0 = perfect)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeplace.placement import Placement
from moeplace.trace.format import Trace, layer_counts


def initial_homes(num_tokens: int, num_gpus: int) -> np.ndarray:
    """GPU each token sits on before the first MoE layer, int64 [T]: data-parallel attention
    spreads tokens round-robin (the trace has no earlier expert to place them)."""
    return np.arange(num_tokens, dtype=np.int64) % num_gpus


def token_gpus(placement: Placement, trace: Trace) -> np.ndarray:
    """GPU that serves each token-expert choice, int64 [T, L, k].

    Without replicas it is the expert's GPU. With replicas (the rule eval, the cost model and
    the runtime share, see `serve_layer`) a token uses the copy on its current GPU (top-1 GPU
    of the previous layer; `initial_homes` at layer 0), else the least-loaded copy on its
    current node, else the least-loaded copy.
    """
    layers = np.arange(trace.num_layers)[None, :, None]
    gpus = placement.expert_to_gpu[layers, trace.topk_ids]
    if not any(placement.replicas):
        return gpus
    home = initial_homes(trace.num_tokens, placement.num_gpus)
    for layer in range(trace.num_layers):
        if placement.replicas[layer]:
            gpus[:, layer] = serve_layer(placement.holders(layer), trace.topk_ids[:, layer], gpus[:, layer], home,
                                         placement.gpus_per_node, placement.num_gpus)
        home = gpus[:, layer, 0]
    return gpus


def serve_layer(holders: list[list[int]], ids: np.ndarray, primary_gpus: np.ndarray, home: np.ndarray,
                gpus_per_node: int, num_gpus: int) -> np.ndarray:
    """Replica choice of one layer: GPU serving each token-expert choice, int64 [T, k].

    holders: GPUs of each expert's copies (primary first); ids/primary_gpus [T, k]; home [T].
    1. a token whose current GPU holds a copy uses it (no transfer at all);
    2. the other tokens of an expert go to its least-loaded copies on their own node when the
       node holds any (an intra-node move instead of a cross-node one), else to its least-loaded
       copies anywhere: counting the load of step 1 and of single-copy experts, groups (expert,
       node) with the most such tokens first fill their copies' GPUs up to a common level (ties:
       lower load, then copy order, primary first; tokens in trace order).
    On one node every copy is on the token's node, so step 2 is plain least-loaded balancing,
    which is what replicas of a hot expert are for.
    """
    gpus = primary_gpus.copy()
    node = home // gpus_per_node
    free: list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]] = []  # (expert, node, tok, slot, copies)
    for expert in np.unique(ids).tolist():  # only the experts chosen: a decode step's batch is small
        copies = holders[expert]
        if len(copies) < 2:
            continue
        copies_arr = np.asarray(copies)
        tok, slot = np.nonzero(ids == expert)
        own = (copies_arr[None, :] == home[tok, None]).any(1)
        gpus[tok[own], slot[own]] = home[tok[own]]  # step 1
        tok, slot = tok[~own], slot[~own]
        gpus[tok, slot] = -1
        copy_node = copies_arr // gpus_per_node
        for n in np.unique(node[tok]):
            mine = node[tok] == n
            local = copies_arr[copy_node == n]
            free.append((expert, int(n), tok[mine], slot[mine], local if len(local) else copies_arr))
    load = np.bincount(gpus[gpus >= 0], minlength=num_gpus).astype(np.float64)
    for _, _, tok, slot, copies_arr in sorted(free, key=lambda f: (-len(f[2]), f[0], f[1])):  # step 2
        counts = _water_fill(load[copies_arr], len(tok))
        gpus[tok, slot] = np.repeat(copies_arr, counts)
        load[copies_arr] += counts
    return gpus


def _water_fill(level: np.ndarray, n: int) -> np.ndarray:
    """Split n units over bins at `level` [c] so the fullest ends as low as possible. int [c]."""
    order = np.lexsort((np.arange(len(level)), level))
    lv = level[order]
    c = len(lv)
    m = c
    for i in range(1, c):  # fewest bins whose common level stays below the next bin's
        if (n + lv[:i].sum()) / i <= lv[i]:
            m = i
            break
    top = (n + lv[:m].sum()) / m
    take = np.zeros(c, dtype=np.int64)
    take[:m] = np.floor(top - lv[:m] + 1e-9).astype(np.int64)
    take[: n - take.sum()] += 1  # the remainder, one each, to the least-loaded bins
    out = np.empty(c, dtype=np.int64)
    out[order] = take
    return out


def gpu_loads(placement: Placement, trace: Trace, gpus: np.ndarray | None = None) -> np.ndarray:
    """Token-expert selections served by each GPU, float64 [L, G]."""
    if gpus is None:
        gpus = token_gpus(placement, trace)
    return layer_counts(gpus, placement.num_gpus)


def imbalance(gpu_loads: np.ndarray) -> np.ndarray:
    """Max / mean load per GPU of each layer: gpu_loads float [L, G] -> float64 [L].

    1.0 is perfect balance; a layer with no load at all counts as balanced (1.0, not 0/0).
    """
    loads = np.asarray(gpu_loads, dtype=np.float64)
    mean = loads.mean(axis=1)
    return np.divide(loads.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)


def evaluate(placement: Placement, trace: Trace) -> dict[str, Any]:
    """All metrics of `placement` replayed on `trace` (see the module docstring)."""
    placement.check_fits(trace.num_layers, trace.num_experts)
    gpus = token_gpus(placement, trace)  # [T, L, k]
    gpn = placement.gpus_per_node
    nodes = gpus // gpn
    out: dict[str, Any] = {"tokens": trace.num_tokens, "layers": trace.num_layers, "top_k": trace.top_k}
    if trace.num_layers > 1:
        here, nxt = gpus[:, :-1, 0], gpus[:, 1:, 0]
        out["cross_gpu_top1"] = float((here != nxt).mean())
        out["cross_node_top1"] = float((here // gpn != nxt // gpn).mean())
        out["dest_gpus_topk"] = float(remote_destinations(gpus[:, 1:, :], here).mean())
        out["dest_nodes_topk"] = float(remote_destinations(nodes[:, 1:, :], here // gpn).mean())
    else:
        out.update(cross_gpu_top1=0.0, cross_node_top1=0.0, dest_gpus_topk=0.0, dest_nodes_topk=0.0)
    imb = imbalance(gpu_loads(placement, trace, gpus))
    out["imbalance_per_layer"] = imb.tolist()
    out["imbalance_mean"] = float(imb.mean())
    out["imbalance_max"] = float(imb.max())
    return out


def remote_mask(dest: np.ndarray, here: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dest sorted along its last axis, and which of its entries are distinct values other than
    `here`: the Alltoall destinations. dest int [..., k]; here int [...]; both results [..., k]."""
    s = np.sort(dest, axis=-1)
    distinct = np.concatenate([np.ones_like(s[..., :1], dtype=bool), s[..., 1:] != s[..., :-1]], axis=-1)
    return s, distinct & (s != here[..., None])


def remote_destinations(dest: np.ndarray, here: np.ndarray) -> np.ndarray:
    """Number of distinct values in dest[..., k] other than `here`. int [...]"""
    return remote_mask(dest, here)[1].sum(axis=-1)
