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

import math
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

    The runtime applies this to every replicated layer of every decode step, so the choices of
    all replicated experts are handled in one vectorised pass and only the water filling of the
    (expert, node) groups, a few copies each, is a Python loop.
    """
    gpus = primary_gpus.copy()
    replicated = [e for e in np.unique(ids).tolist() if len(holders[e]) > 1]
    if not replicated:
        return gpus
    num_nodes = -(-num_gpus // gpus_per_node)
    row = np.full(len(holders), -1, dtype=np.int64)  # expert -> its row in `holds`
    row[replicated] = np.arange(len(replicated))
    holds = np.zeros((len(replicated), num_gpus), dtype=bool)  # GPUs with a copy
    for r, expert in enumerate(replicated):
        holds[r, holders[expert]] = True
    tok, slot = np.nonzero(row[ids] >= 0)  # choices of a replicated expert, in trace order
    expert_of = ids[tok, slot]
    own = holds[row[expert_of], home[tok]]
    gpus[tok[own], slot[own]] = home[tok[own]]  # step 1
    tok, slot, expert_of = tok[~own], slot[~own], expert_of[~own]
    gpus[tok, slot] = -1
    load = np.bincount(gpus[gpus >= 0], minlength=num_gpus).astype(np.float64).tolist()
    # step 2: one group per (expert, node); a stable sort keeps each group's tokens in trace order
    key = expert_of * num_nodes + home[tok] // gpus_per_node
    order = np.argsort(key, kind="stable")
    keys, first, size = np.unique(key[order], return_index=True, return_counts=True)
    served = [0] * len(order)
    group_order = np.lexsort((keys, -size)).tolist()  # most tokens first, then expert, then node
    keys, first, size = keys.tolist(), first.tolist(), size.tolist()
    for g in group_order:
        expert, node = divmod(keys[g], num_nodes)
        copies = holders[expert]
        local = [c for c in copies if c // gpus_per_node == node] or copies
        counts = _fill([load[c] for c in local], size[g])
        for c, n in zip(local, counts):
            load[c] += n
        served[first[g]: first[g] + size[g]] = [c for c, n in zip(local, counts) for _ in range(n)]
    gpus[tok[order], slot[order]] = served
    return gpus


def _fill(level: list[float], n: int) -> list[int]:
    """Split n units over bins at `level` [c] so the fullest ends as low as possible; units per bin.

    Water filling: the lowest bins rise to a common level that stays at or below the next bin's,
    the units that rounding leaves go one each to the bins that were lowest (ties: earlier bin).
    Plain Python: a group's copies are a few bins, and numpy's per-call overhead would dominate.
    """
    c = len(level)
    if n == 1:  # most groups of a decode step: the unit goes to the least-loaded, earliest bin
        out = [0] * c
        out[min(range(c), key=lambda i: (level[i], i))] = 1
        return out
    order = sorted(range(c), key=lambda i: (level[i], i))  # ties: earlier bin first
    lv = [level[i] for i in order]
    m = c
    for i in range(1, c):  # fewest bins whose common level stays below the next bin's
        if (n + sum(lv[:i])) / i <= lv[i]:
            m = i
            break
    top = (n + sum(lv[:m])) / m
    take = [math.floor(top - lv[j] + 1e-9) for j in range(m)] + [0] * (c - m)
    for j in range(n - sum(take)):  # the remainder, one each, to the least-loaded bins
        take[j] += 1
    out = [0] * c
    for j, i in enumerate(order):
        out[i] = take[j]
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
