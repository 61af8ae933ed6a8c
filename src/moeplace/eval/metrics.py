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
from moeplace.trace.format import Trace


def token_gpus(placement: Placement, trace: Trace) -> np.ndarray:
    """GPU that serves each token-expert choice, int64 [T, L, k].

    Without replicas it is the expert's GPU. With replicas a token uses the copy on its current
    GPU (top-1 GPU of the previous layer), else one on its current node, else the primary.
    """
    layers = np.arange(trace.num_layers)[None, :, None]
    gpus = placement.expert_to_gpu[layers, trace.topk_ids]
    if not any(placement.replicas):
        return gpus
    gpus = gpus.copy()
    gpn = placement.gpus_per_node
    for layer in range(1, trace.num_layers):
        here = gpus[:, layer - 1, 0]
        for expert, copies in enumerate(placement.holders(layer)):
            if len(copies) == 1:
                continue
            copies_arr = np.asarray(copies)
            hit = trace.topk_ids[:, layer, :] == expert  # [T, k]
            tok, slot = np.nonzero(hit)
            cur = here[tok]
            same_gpu = copies_arr[None, :] == cur[:, None]
            same_node = copies_arr[None, :] // gpn == cur[:, None] // gpn
            # first matching copy by preference: same GPU, same node, primary
            pick = np.where(same_gpu.any(1), same_gpu.argmax(1), np.where(same_node.any(1), same_node.argmax(1), 0))
            gpus[tok, layer, slot] = copies_arr[pick]
    return gpus


def gpu_loads(placement: Placement, trace: Trace, gpus: np.ndarray | None = None) -> np.ndarray:
    """Token-expert selections served by each GPU, float64 [L, G]."""
    if gpus is None:
        gpus = token_gpus(placement, trace)
    loads = np.zeros((trace.num_layers, placement.num_gpus))
    layer = np.broadcast_to(np.arange(trace.num_layers)[None, :, None], gpus.shape)
    np.add.at(loads, (layer.ravel(), gpus.ravel()), 1.0)
    return loads


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
        out["dest_gpus_topk"] = float(_remote_destinations(gpus[:, 1:, :], here).mean())
        out["dest_nodes_topk"] = float(_remote_destinations(nodes[:, 1:, :], here // gpn).mean())
    else:
        out.update(cross_gpu_top1=0.0, cross_node_top1=0.0, dest_gpus_topk=0.0, dest_nodes_topk=0.0)
    loads = gpu_loads(placement, trace, gpus)
    mean = loads.mean(axis=1)
    imb = np.divide(loads.max(axis=1), mean, out=np.ones_like(mean), where=mean > 0)
    out["imbalance_per_layer"] = imb.tolist()
    out["imbalance_mean"] = float(imb.mean())
    out["imbalance_max"] = float(imb.max())
    return out


def _remote_destinations(dest: np.ndarray, here: np.ndarray) -> np.ndarray:
    """Distinct values in dest[..., k] other than `here`, per token-layer. [T, L-1]"""
    s = np.sort(dest, axis=-1)
    distinct = np.concatenate([np.ones_like(s[..., :1], dtype=bool), s[..., 1:] != s[..., :-1]], axis=-1)
    remote = distinct & (s != here[..., None])
    return remote.sum(axis=-1)
