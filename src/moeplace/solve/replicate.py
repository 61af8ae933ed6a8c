"""`--redundant-experts R`: extra copies of hot experts, chosen on the exact predicted cost.

Per layer, in order (a layer's replicas move its tokens' top-1 GPUs, hence the next layer's
traffic), given the placement of the primaries:
1. propose R copies one at a time: the expert with the highest load per copy (EPLB's rule)
   goes to the GPU with a free slot that sends it the most tokens (affinity: the copy serves
   tokens where they are), ties to the least-loaded GPU;
2. keep the prefix of those proposals (0, R/4, R/2, 3R/4 or R copies) whose exact cost of this
   layer and the next is lowest, served by eval/metrics.serve_layer (own GPU, own node, else
   the least-loaded copy), among those that also cut the cost of each given half of the tokens
   by `margin` (latency.HALF_MARGIN: a guard against fitting counting noise).
Slots: every GPU holds at most ceil((E + R) / G) experts of a layer.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np

from moeplace.eval.metrics import serve_layer
from moeplace.solve.costmodel import layer_time, token_scale

if TYPE_CHECKING:
    from moeplace.solve.latency import LatencyModel


def propose(homed: np.ndarray, load: np.ndarray, e2g_row: np.ndarray, redundant: int, slots: int) -> list[tuple[int, int]]:
    """Step 1 for one layer. homed float [G, E] tokens at GPU g selecting e; load float [E]."""
    num_gpus, num_experts = homed.shape
    copies = [[int(g)] for g in e2g_row]
    used = np.bincount(e2g_row, minlength=num_gpus)
    gpu_load = np.bincount(e2g_row, weights=load, minlength=num_gpus)
    out: list[tuple[int, int]] = []
    for _ in range(redundant):
        per_copy = load / np.array([len(c) for c in copies])
        for e in np.argsort(-per_copy, kind="stable"):
            free = np.flatnonzero((used < slots) & ~np.isin(np.arange(num_gpus), copies[e]))
            if len(free):
                break
        else:
            break
        g = int(free[np.lexsort((gpu_load[free], -homed[free, e]))[0]])
        share = load[e] / (len(copies[e]) + 1)
        gpu_load[copies[e]] -= load[e] / len(copies[e]) - share
        gpu_load[g] += share
        copies[e].append(g)
        used[g] += 1
        out.append((int(e), g))
    return out


def add_replicas(model: "LatencyModel", e2g: np.ndarray, redundant: int, deadline: float,
                 halves: tuple[np.ndarray, ...] = (), margin: float = 0.0) -> tuple[list[list[tuple[int, int]]], float]:
    """Replicas per layer [(expert, gpu)] and the weighted cost with them (module docstring)."""
    trace, cost = model.trace, model.cost
    num_layers, num_experts = e2g.shape
    num_gpus, gpn = cost.cluster.num_gpus, cost.cluster.gpus_per_node
    slots = math.ceil((num_experts + redundant) / num_gpus)
    ids = trace.topk_ids
    replicas: list[list[tuple[int, int]]] = [[] for _ in range(num_layers)]
    served = e2g[np.arange(num_layers)[None, :, None], ids]  # [T, L, k], updated layer by layer
    home = model.home0
    for layer in range(num_layers):
        homed = np.zeros((num_gpus, num_experts))
        np.add.at(homed, (np.repeat(home, trace.top_k), ids[:, layer].ravel()), 1.0)
        proposals = propose(homed, homed.sum(0), e2g[layer], redundant, slots) if time.monotonic() < deadline else []
        best: tuple[float, list[tuple[int, int]], np.ndarray] | None = None
        base: list[float] = []  # cost of each half without replicas
        for n in sorted({len(proposals) * q // 4 for q in range(5)}):
            chosen = proposals[:n]
            holders = [[int(g)] for g in e2g[layer]]
            for e, g in chosen:
                holders[e].append(g)
            gpus = serve_layer(holders, ids[:, layer], served[:, layer], home, gpn, num_gpus) if chosen else served[:, layer]
            value, *by_half = (_pair_cost(model, home, gpus, served, layer, idx) for idx in (slice(None), *halves))
            if n == 0:
                base = by_half
            elif any(h > (1 - margin) * b for h, b in zip(by_half, base)):
                continue  # must help each half of the tokens too: a guard against fitting noise
            if best is None or value < best[0] - 1e-9:
                best = (value, chosen, gpus)
        assert best is not None
        replicas[layer] = best[1]
        served[:, layer] = best[2]
        home = served[:, layer, 0]
    value = model.weighted(np.stack([
        layer_time(cost, model.home0 if l == 0 else served[:, l - 1, 0], served[:, l], ids[:, l], model.scale, model.links)
        for l in range(num_layers)]))
    return replicas, value


def _pair_cost(model: "LatencyModel", home: np.ndarray, gpus: np.ndarray, served: np.ndarray, layer: int,
               idx: slice | np.ndarray) -> float:
    """Weighted cost of `layer` (served by gpus [T, k]) and the next, on the tokens `idx`."""
    ids = model.trace.topk_ids[idx]
    scale = token_scale(model.cost, len(ids))
    parts = [layer_time(model.cost, home[idx], gpus[idx], ids[:, layer], scale, model.links)]
    if layer + 1 < ids.shape[1]:
        parts.append(layer_time(model.cost, gpus[idx][:, 0], served[idx][:, layer + 1], ids[:, layer + 1], scale, model.links))
    return model.weighted(np.array(parts))
