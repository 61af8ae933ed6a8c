"""Placements that engines use today, computed alongside every solve for comparison.

All keep E/G experts of each layer per GPU; when G does not divide E (only `balance` solves
such layouts), the first E % G GPUs hold one more, as vLLM's expert map does. Shapes: loads
float [L, E]; result int [L, E] GPU ids.
"""

from __future__ import annotations

import numpy as np

from moeplace.solve.eplb import balanced_packing


def experts_per_gpu(num_experts: int, num_gpus: int) -> np.ndarray:
    """Experts per GPU in each layer, int [G]: E // G, plus one on the first E % G GPUs."""
    return num_experts // num_gpus + (np.arange(num_gpus) < num_experts % num_gpus)


def contiguous(num_layers: int, num_experts: int, num_gpus: int) -> np.ndarray:
    """Experts [g*E/G, (g+1)*E/G) on GPU g: the default of Megatron, DeepSpeed, vLLM, SGLang."""
    row = np.repeat(np.arange(num_gpus), experts_per_gpu(num_experts, num_gpus))
    return np.tile(row, (num_layers, 1))


def round_robin(num_layers: int, num_experts: int, num_gpus: int) -> np.ndarray:
    """Expert e on GPU e % G."""
    return np.tile(np.arange(num_experts) % num_gpus, (num_layers, 1))


def random_balanced(num_layers: int, num_experts: int, num_gpus: int, seed: int = 0) -> np.ndarray:
    """A seeded random permutation of the contiguous layout, per layer."""
    rng = np.random.default_rng(seed)
    base = contiguous(1, num_experts, num_gpus)[0]
    return np.stack([rng.permutation(base) for _ in range(num_layers)])


def greedy_load(loads: np.ndarray, num_gpus: int) -> np.ndarray:
    """Load-only balancing (EPLB without replicas): heaviest expert to the lightest GPU with room.

    EPLB's balanced packing of each layer's experts into G GPUs of E/G experts each; when G
    does not divide E, the same rule with the per-GPU counts of `experts_per_gpu` (the GPUs
    that take one more are the ones the rule reaches first).
    """
    num_layers, num_experts = loads.shape
    if num_experts % num_gpus == 0:
        return balanced_packing(loads, num_gpus)[0]
    small, extra = num_experts // num_gpus, num_experts % num_gpus
    out = np.empty((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        weight, used = np.zeros(num_gpus), np.zeros(num_gpus, dtype=np.int64)
        for e in np.argsort(-loads[layer], kind="stable"):
            room = np.flatnonzero((used < small) | ((used == small) & ((used > small).sum() < extra)))
            g = room[np.argmin(weight[room])]
            out[layer, e] = g
            weight[g] += loads[layer, e]
            used[g] += 1
    return out


def all_baselines(loads: np.ndarray, num_gpus: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every baseline layout for loads [L, E], keyed by name."""
    num_layers, num_experts = loads.shape
    return {
        "contiguous": contiguous(num_layers, num_experts, num_gpus),
        "round_robin": round_robin(num_layers, num_experts, num_gpus),
        "random": random_balanced(num_layers, num_experts, num_gpus, seed),
        "greedy_load": greedy_load(loads, num_gpus),
    }
