"""SYNTHETIC traces with planted inter-layer affinity (for tests and scripts/bench_solve.py).

Nothing here is real routing. A hidden "planted" placement [L, E] is drawn (a seeded random
balanced layout); each token walks over GPUs, staying on its GPU from one layer to the next with
probability `affinity` and jumping to a uniformly random GPU otherwise. At each layer it picks
k distinct experts by Gumbel-top-k over

    log popularity[l, e] + log(boost) * [e on the token's GPU] + log(sqrt(boost)) * [e on its node]

so its experts concentrate on the GPU (then the node) it walks on; popularity is Zipf-like
(load skew, as in real routers). Gate weights are a softmax of the noisy scores of the k picked. A placement
solver that recovers `planted` (up to GPU relabelling) captures the planted affinity.
"""

from __future__ import annotations

import numpy as np

from moeplace.solve.baselines import random_balanced
from moeplace.trace.format import Trace, make_trace


def planted_trace(
    num_tokens: int,
    num_layers: int,
    num_experts: int,
    top_k: int,
    num_gpus: int,
    gpus_per_node: int | None = None,
    affinity: float = 0.85,
    boost: float = 30.0,
    zipf: float = 0.6,
    seed: int = 0,
) -> tuple[Trace, np.ndarray]:
    """A SYNTHETIC trace [num_tokens, num_layers, top_k] and its planted placement int64 [L, E].

    1. planted = random balanced layout per layer; popularity ~ rank^-zipf, shuffled per layer;
    2. per token a GPU walk: stay with probability `affinity`, else a uniform random GPU;
    3. per layer: Gumbel-top-k of the scores in the module docstring, weights = softmax.
    """
    gpus_per_node = num_gpus if gpus_per_node is None else gpus_per_node
    rng = np.random.default_rng(seed)
    planted = random_balanced(num_layers, num_experts, num_gpus, seed=seed + 1)
    ranks = np.arange(1, num_experts + 1, dtype=np.float64)
    popularity = np.stack([rng.permutation(ranks**-zipf) for _ in range(num_layers)])
    log_pop = np.log(popularity / popularity.sum(axis=1, keepdims=True))

    walk = np.empty((num_tokens, num_layers), dtype=np.int64)
    walk[:, 0] = rng.integers(0, num_gpus, num_tokens)
    for layer in range(1, num_layers):
        stay = rng.random(num_tokens) < affinity
        walk[:, layer] = np.where(stay, walk[:, layer - 1], rng.integers(0, num_gpus, num_tokens))

    ids = np.empty((num_tokens, num_layers, top_k), dtype=np.int64)
    weights = np.empty((num_tokens, num_layers, top_k), dtype=np.float32)
    for layer in range(num_layers):
        gpu = planted[layer]  # [E]
        on_gpu = gpu[None, :] == walk[:, layer, None]  # [T, E]
        on_node = gpu[None, :] // gpus_per_node == walk[:, layer, None] // gpus_per_node
        score = log_pop[layer][None, :] + np.log(boost) * on_gpu + 0.5 * np.log(boost) * on_node
        noisy = score + rng.gumbel(size=score.shape)
        top = np.argpartition(-noisy, top_k - 1, axis=1)[:, :top_k]
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(noisy, top, 1), axis=1), 1)
        chosen = np.take_along_axis(noisy, top, 1)  # descending, like a router's top-k
        gate = np.exp(chosen - chosen.max(axis=1, keepdims=True))
        ids[:, layer] = top
        weights[:, layer] = gate / gate.sum(axis=1, keepdims=True)
    meta = {
        "source": "SYNTHETIC planted affinity (moeplace.solve.synthetic)",
        "synthetic": True,
        "affinity": affinity, "boost": boost, "zipf": zipf, "seed": seed,
        "num_gpus": num_gpus, "gpus_per_node": gpus_per_node,
    }
    return make_trace(ids, weights, num_experts, meta=meta, name="synthetic"), planted
