"""Re-placement from a deployed placement (`moeplace solve --from CURRENT.json`).

Every objective of `solve` scores a placement through the distance class of GPU pairs (same GPU,
same node, other node) and through per-GPU maxima and sums, so it is invariant under one
permutation of the nodes and, within a node, of its GPUs, applied to every layer at once (GPU g
is the same device in every layer; the shipped clusters are homogeneous). Two exceptions, both
of the cost model (costmodel.py, eval/metrics.py), not of the traffic objective: tokens start
layer 0 on GPU `t % G` (initial_homes), a fixed labelling, so the latency objective's layer-0
dispatch may change; and replica serving breaks ties by node id. docs/solver.md, "Re-placement".

`best_relabeling` picks, of those permutations, the one that keeps the most (layer, expert)
primaries on the GPU CURRENT has them on: exactly, as the best node matching (Hungarian) over the
best GPU matchings of every node pair (Hungarian on the overlap counts). `best_copy_relabeling`
does the same on (layer, expert, GPU) copies, replicas included: balance's --max-moves counts
its moves on copies (balance.balance_moves_placement).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from moeplace.errors import MoeplaceError
from moeplace.placement import Placement


def check_current(current: Placement, name: str, num_layers: int, num_experts: int, num_gpus: int,
                  gpus_per_node: int) -> None:
    """Refuse a from-placement of another model shape or GPU topology, in one line naming the difference."""
    for what, mine, theirs in (("MoE layers", current.num_layers, num_layers),
                               ("experts per layer", current.num_experts, num_experts),
                               ("GPUs", current.num_gpus, num_gpus), ("GPUs per node", current.gpus_per_node, gpus_per_node)):
        if mine != theirs:
            raise MoeplaceError(f"--from {name}: it has {mine} {what}, this solve {theirs} (a re-placement keeps the "
                                "model and the GPUs; solve without --from for another shape)")


def check_equal_counts(current: Placement, name: str, option: str) -> None:
    """Refuse, for the traffic objective's --move-cost or --max-moves (`option`), a from-placement
    whose primaries are not E/G per GPU in every layer (a balance or latency placement of uneven
    counts): traffic keeps E/G experts on every GPU, so CURRENT would be a start outside its
    layouts (--move-cost kept it, 7 experts on one GPU and none on two) and the moves back to it
    cannot end within N (--max-moves looped without end)."""
    per_gpu = current.num_experts // current.num_gpus
    for layer, row in enumerate(current.expert_to_gpu):
        counts = np.bincount(row, minlength=current.num_gpus)
        if (counts != per_gpu).any():
            gpu = int(np.argmax(counts != per_gpu))
            raise MoeplaceError(f"{option} with --from {name}: its layer {layer} holds {int(counts[gpu])} experts "
                                f"on GPU {gpu}, and the traffic objective keeps E/G = {per_gpu} on every GPU, so "
                                "the moves are counted from a layout it cannot hold; drop " + option
                                + " (--from alone renames the GPUs)"
                                + (", or use --objective balance --max-moves" if option == "--max-moves" else ""))


def overlap(new: np.ndarray, current: np.ndarray, num_gpus: int) -> np.ndarray:
    """count[c, n]: (layer, expert) pairs on GPU c in `current` and on GPU n in `new`, both int [L, E]. int [G, G]."""
    return np.bincount((current * num_gpus + new).ravel(), minlength=num_gpus * num_gpus).reshape(num_gpus, num_gpus)


def best_relabeling(new: np.ndarray, current: np.ndarray, num_gpus: int, gpus_per_node: int) -> np.ndarray:
    """The GPU permutation (nodes as wholes, GPUs within a node) that keeps the most primaries of
    `new` where `current` has them, both int [L, E]: label int [G], new GPU n becomes label[n].

    For a fixed node matching the GPU matchings of the node pairs are independent, so the optimum
    is the best node matching on the values of each pair's best GPU matching: exact."""
    return _best_matching(overlap(new, current, num_gpus), num_gpus, gpus_per_node)


def best_copy_relabeling(new: list[list[list[int]]], current: list[list[list[int]]], num_gpus: int,
                         gpus_per_node: int) -> np.ndarray:
    """As best_relabeling, on copies: the permutation that keeps the most (layer, expert, GPU)
    copies of `new` where `current` has one, both [L][E] lists of GPUs (Placement.holders). The
    copies kept under a permutation are the sum of count[c, n] over the GPUs n it sends to c, so
    the same matching is exact. label int [G]."""
    count = np.zeros((num_gpus, num_gpus), dtype=np.int64)
    for new_layer, cur_layer in zip(new, current):
        for n_gpus, c_gpus in zip(new_layer, cur_layer):
            for c in c_gpus:
                count[c, n_gpus] += 1
    return _best_matching(count, num_gpus, gpus_per_node)


def _best_matching(count: np.ndarray, num_gpus: int, gpus_per_node: int) -> np.ndarray:
    """The node-and-GPU permutation with the largest sum of count[label[n], n], int [G]."""
    num_nodes = num_gpus // gpus_per_node
    gpus = [np.arange(n * gpus_per_node, (n + 1) * gpus_per_node) for n in range(num_nodes)]
    value = np.zeros((num_nodes, num_nodes))
    match: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for c in range(num_nodes):
        for n in range(num_nodes):
            block = count[np.ix_(gpus[c], gpus[n])]
            rows, cols = linear_sum_assignment(block, maximize=True)
            value[c, n], match[c, n] = block[rows, cols].sum(), (rows, cols)
    label = np.empty(num_gpus, dtype=np.int64)
    for c, n in zip(*linear_sum_assignment(value, maximize=True)):
        rows, cols = match[int(c), int(n)]
        label[gpus[n][cols]] = gpus[c][rows]
    return label


def relabel(expert_to_gpu: np.ndarray, replicas: Sequence[Sequence[tuple[int, int]]], label: np.ndarray
            ) -> tuple[np.ndarray, list[list[tuple[int, int]]]]:
    """The layout (int [L, E]) and replicas with every GPU g renamed label[g]."""
    return label[expert_to_gpu], [[(int(e), int(label[g])) for e, g in layer] for layer in replicas]


def moves(new: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Primaries of each layer that are not on their CURRENT GPU, int [L] (replicas not compared)."""
    return (new != current).sum(axis=1)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def record(new: np.ndarray, current: np.ndarray, path: str | Path | None) -> dict[str, Any]:
    """The placement JSON's "migration": the from-placement (path and sha256 of its file; null
    for one given in memory) and the moves."""
    per_layer = moves(new, current)
    return {"from": {"path": None if path is None else str(path), "sha256": None if path is None else sha256(path)},
            "moved": int(per_layer.sum()), "of": int(new.size), "moved_per_layer": per_layer.tolist(),
            "compared": "primaries (expert_to_gpu); replicas are not counted"}


def move_unit(total_edge_weight: float, num_tokens: int, num_layers: int) -> float:
    """The traffic objective's cost of one token transition: the mean edge weight one fit token
    brings to one layer pair (all its edges crossing GPUs inside a node cost that much). `--move-cost W`
    penalises a moved expert by W of these."""
    return total_edge_weight / max(num_tokens * max(num_layers - 1, 1), 1)
