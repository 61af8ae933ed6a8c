"""`--redundant-experts R`: extra copies of hot experts, chosen on the exact predicted cost.

Engines (SGLang `physical_to_logical_map`, vLLM, EPLB `phy2log`) need the same number of
physical slots in every layer and on every GPU, so each layer gets EXACTLY R copies, never two
of one expert on a GPU, and when G divides R (the primaries hold E / G per GPU) every GPU ends
with (E + R) / G experts. Otherwise (uneven mode, e.g. 256 + 32 experts on 64 GPUs) every GPU
holds ceil((E + R) / G) or one fewer: engines that need equal slots must pick R = multiple of G.
Per layer, in order (a layer's replicas move its tokens' top-1 GPUs, hence the next layer's
traffic), given the placement of the primaries:
1. propose R copies one at a time: the expert with the highest load per copy (EPLB's rule)
   goes to a GPU with a free slot that does not hold it: under the `load` rule the least-loaded
   one (EPLB), under the `affinity` rule the one that sends it the most tokens (the copy serves
   tokens where they are; ties to the least-loaded);
2. score both on the exact cost of this layer and the next, served by eval/metrics.serve_layer
   (own GPU, else the least-loaded copies on its node, else anywhere); `affinity` replaces `load` only if it passes
   latency's acceptance rule (latency.significant over the given token folds).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import numpy as np

from moeplace.eval.metrics import serve_layer
from moeplace.solve.costmodel import layer_time, token_scale
from moeplace.trace.format import flow_counts

if TYPE_CHECKING:
    from moeplace.solve.latency import LatencyModel


RULES = ("load", "affinity")


def propose(homed: np.ndarray, load: np.ndarray, e2g_row: np.ndarray, redundant: int, slots: int,
            rule: str = "affinity") -> list[tuple[int, int]]:
    """Step 1 for one layer. homed float [G, E] tokens at GPU g selecting e; load float [E].
    Returns `redundant` (expert, gpu) copies (fewer only if the slots run out)."""
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
        keys = (gpu_load[free], -homed[free, e]) if rule == "affinity" else (-homed[free, e], gpu_load[free])
        g = int(free[np.lexsort(keys)[0]])
        share = load[e] / (len(copies[e]) + 1)
        gpu_load[copies[e]] -= load[e] / len(copies[e]) - share
        gpu_load[g] += share
        copies[e].append(g)
        used[g] += 1
        out.append((int(e), g))
    return out


def add_replicas(model: "LatencyModel", e2g: np.ndarray, redundant: int, deadline: float,
                 folds: list[np.ndarray] | None = None) -> tuple[list[list[tuple[int, int]]], float]:
    """Replicas per layer [(expert, gpu)] and the weighted cost with them (module docstring).
    e2g int [L, E]; folds: token index arrays for the acceptance rule."""
    from moeplace.solve.latency import significant

    trace, cost = model.trace, model.cost
    num_layers, num_experts = e2g.shape
    num_gpus, gpn = cost.cluster.num_gpus, cost.cluster.gpus_per_node
    slots = math.ceil((num_experts + redundant) / num_gpus)
    ids = trace.topk_ids
    replicas: list[list[tuple[int, int]]] = [[] for _ in range(num_layers)]
    served = e2g[np.arange(num_layers)[None, :, None], ids]  # [T, L, k], updated layer by layer
    home = model.home0
    for layer in range(num_layers):
        homed = flow_counts(home, ids[:, layer], num_gpus, num_experts)
        rules = RULES if time.monotonic() < deadline else RULES[:1]
        scored = []  # (cost on all tokens, costs per fold, copies, serving GPUs [T, k])
        for rule in rules:
            chosen = propose(homed, homed.sum(0), e2g[layer], redundant, slots, rule)
            holders = [[int(g)] for g in e2g[layer]]
            for e, g in chosen:
                holders[e].append(g)
            gpus = serve_layer(holders, ids[:, layer], served[:, layer], home, gpn, num_gpus)
            value, *by_fold = (_pair_cost(model, home, gpus, served, layer, idx) for idx in (slice(None), *(folds or ())))
            scored.append((value, np.array(by_fold), chosen, gpus))
        pick = scored[0]
        if len(scored) > 1 and significant(scored[1][0] - pick[0], scored[1][1] - pick[1]):
            pick = scored[1]
        replicas[layer] = pick[2]
        served[:, layer] = pick[3]
        home = served[:, layer, 0]
    value = model.weighted(np.stack([
        layer_time(cost, model.home0 if l == 0 else served[:, l - 1, 0], served[:, l], ids[:, l], model.scale, model.links)
        for l in range(num_layers)]))
    return replicas, value


def _pair_cost(model: "LatencyModel", home: np.ndarray, gpus: np.ndarray, served: np.ndarray, layer: int,
               idx: slice | np.ndarray) -> float:
    """Weighted cost of `layer` (served by gpus [T, k]) and the next, on the tokens `idx`."""
    ids = model.trace.topk_ids[idx]
    scale = token_scale(model.cost, len(ids), stands_for=model.trace.num_tokens)
    parts = [layer_time(model.cost, home[idx], gpus[idx], ids[:, layer], scale, model.links)]
    if layer + 1 < ids.shape[1]:
        parts.append(layer_time(model.cost, gpus[idx][:, 0], served[idx][:, layer + 1], ids[:, layer + 1], scale, model.links))
    return model.weighted(np.array(parts))
