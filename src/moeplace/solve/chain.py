"""The exact traffic optimum as a shortest path through whole-layer layouts, where layers are small.

The traffic objective is a chain: each of its terms touches one layer (intra edges, unary move
costs) or two consecutive ones (inter edges). When a layer has few labelled layouts (E experts on
G GPUs, E/G on each: S = E! / ((E/G)!^G), e.g. 70 for 8 experts on 2 GPUs, 2,520 on 4) the
optimum is a shortest path through one layout per layer, found exactly in O(L S^2) small matrix
products: Mixtral's 32 layers of 8 experts on 2 or 4 GPUs in about a second, where the
whole-model ILP (ilp.solve_window) is far too large, and a 4-layer toy in milliseconds, where the
ILP takes seconds to prove its optimum.

    value_0(s)     = own_0(s)
    value_{l+1}(t) = own_{l+1}(t) + min_s [value_l(s) + pair_l(s, t)]
    own_l(s)       = sum_{a<b} intra[l, a, b] D[s_a, s_b] + sum_a unary[l, a, s_a]
    pair_l(s, t)   = sum_{a, b} inter[l, a, b] D[s_a, t_b] = vec(X_s)^T (inter[l] (x) D) vec(X_t)

with X_s the one-hot [E, G] of layout s and D the GPU distance (affinity.distance_matrix). A load
cap and a move limit only remove layouts: a layer's candidates are the layouts within them. Ties go
to the lowest layout index (layouts are enumerated in lexicographic order), so the result is
deterministic.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from moeplace.solve.affinity import AffinityGraph, one_hot
from moeplace.solve.heuristics import LoadCap, MoveLimit, unary_of

MAX_LAYOUTS = 4_096  # labelled layouts per layer up to which the shortest path is used (S^2 = 16.8M pairs)
COLUMN_BLOCK = 512  # layouts of layer l+1 scored at once: [512, S] float64, 16 MB at the largest S


def num_layouts(num_experts: int, num_gpus: int) -> int:
    """Labelled layouts of one layer with E/G experts on every GPU: E! / ((E/G)!^G)."""
    per_gpu = num_experts // num_gpus
    return math.factorial(num_experts) // math.factorial(per_gpu) ** num_gpus


def tractable(num_experts: int, num_gpus: int) -> bool:
    """Whether solve_chain applies: G divides E and a layer has at most MAX_LAYOUTS layouts."""
    return num_experts % num_gpus == 0 and num_layouts(num_experts, num_gpus) <= MAX_LAYOUTS


def all_layouts(num_experts: int, num_gpus: int) -> np.ndarray:
    """Every layout of one layer with E/G experts per GPU, in lexicographic order. int64 [S, E]."""
    per_gpu = num_experts // num_gpus
    rows = np.zeros((1, 0), dtype=np.int64)
    for _ in range(num_experts):
        # append every GPU that still has room to every partial layout; row-major order keeps
        # the lexicographic order of the prefixes
        counts = (rows[:, :, None] == np.arange(num_gpus)).sum(axis=1)  # [S', G]
        parent, gpu = np.nonzero(counts < per_gpu)
        rows = np.concatenate([rows[parent], gpu[:, None]], axis=1)
    return rows


@dataclass(frozen=True)
class ChainResult:
    expert_to_gpu: np.ndarray  # int64 [L, E], an optimal placement
    value: float  # its objective value as the recursion summed it


def solve_chain(graph: AffinityGraph, distance: np.ndarray, deadline: float, cap: LoadCap | None = None,
                moves: MoveLimit | None = None) -> ChainResult | None:
    """The placement of least objective_cost (placement_cost plus unary costs), int64 [L, E],
    exactly. None where a layer has no layout within `cap` / `moves`, or past `deadline` (checked
    between layers; the caller keeps what it had). Requires tractable(E, G)."""
    num_layers, num_experts = graph.num_layers, graph.num_experts
    num_gpus = distance.shape[0]
    layouts = all_layouts(num_experts, num_gpus)  # [S, E]
    onehot = one_hot(layouts, num_gpus).reshape(len(layouts), num_experts * num_gpus)  # [S, E*G]
    unary = unary_of(graph)

    # 1. each layer's candidates (the layouts within its cap and move limit) and their own cost
    candidates: list[np.ndarray] = []
    own: list[np.ndarray] = []
    for layer in range(num_layers):
        keep = np.ones(len(layouts), dtype=bool)
        if cap is not None:
            gpu_loads = onehot.reshape(-1, num_experts, num_gpus).transpose(0, 2, 1) @ cap.loads[layer]  # [S, G]
            keep &= gpu_loads.max(axis=1) <= cap.limits[layer]
        if moves is not None:
            keep &= (layouts != moves.current[layer]).sum(axis=1) <= moves.max_moves
        index = np.flatnonzero(keep)
        if len(index) == 0:
            return None
        x = onehot[index]
        cost = 0.5 * np.einsum("si,ij,sj->s", x, np.kron(graph.intra[layer], distance), x)
        if unary is not None:
            cost = cost + x @ unary[layer].reshape(-1)
        candidates.append(index)
        own.append(cost)

    # 2. forward: the least cost of layers 0..l ending in each candidate of layer l
    value = own[0]
    came_from: list[np.ndarray] = []
    for layer in range(num_layers - 1):
        if time.monotonic() > deadline:
            return None
        src, dst = onehot[candidates[layer]], onehot[candidates[layer + 1]]
        weighted = src @ np.kron(graph.inter[layer], distance)  # [S_l, E*G]
        best = np.empty(len(dst))
        arg = np.empty(len(dst), dtype=np.int64)
        for lo in range(0, len(dst), COLUMN_BLOCK):
            # [block, S_l]: a row per layout of layer l+1, so argmin reads contiguous memory
            total = dst[lo:lo + COLUMN_BLOCK] @ weighted.T + value
            arg[lo:lo + COLUMN_BLOCK] = total.argmin(axis=1)  # first minimum: the lowest layout wins ties
            best[lo:lo + COLUMN_BLOCK] = total[np.arange(total.shape[0]), arg[lo:lo + COLUMN_BLOCK]]
        came_from.append(arg)
        value = own[layer + 1] + best

    # 3. back: the optimal layout of every layer
    pick = int(value.argmin())
    total_value = float(value[pick])
    out = np.empty((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers - 1, -1, -1):
        out[layer] = layouts[candidates[layer][pick]]
        if layer > 0:
            pick = int(came_from[layer - 1][pick])
    return ChainResult(out, total_value)
