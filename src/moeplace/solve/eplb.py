"""DeepSeek's expert-parallelism load balancer (EPLB), written from its published description.

The algorithm of deepseek-ai/EPLB (eplb.py), as pure numpy functions, so that moeplace can
compare with it on the same inputs and use it as the warm start / fallback of `balance`:

- hierarchical policy (expert groups divide evenly over nodes): 1. pack expert groups to nodes,
  balancing their load; 2. inside each node, replicate the experts whose load per replica is
  highest until the node's physical slots are used; 3. pack the node's physical experts to its
  GPUs, balancing load, the same number of slots per GPU;
- global policy (otherwise): the same with one group and one node: replicate over all slots,
  then pack to GPUs.

Run side by side with SGLang 0.5.23's and vLLM 0.33's copies (scripts/check_engines.py,
docs/engines/eplb.md): the same per-GPU loads on every layer tried, and SGLang's phy2log on every
Mixtral layer. Tied experts are visited in ascending id here (stable sort); upstream's order for
ties is whatever torch.sort / np.argsort give, so tied experts (many in small counts) may swap
GPUs, the loads unchanged.

Load model (EPLB's): an expert's load is split equally over its replicas.
Shapes: weight float [L, E]; phy2log int [L, P] (P = physical slots, GPU-major: slot s is on GPU
s // (P / G)); logcnt int [L, E] replicas per expert.
"""

from __future__ import annotations

import numpy as np

from moeplace.errors import PlacementError
from moeplace.placement import Placement

POLICIES = ("hierarchical", "global")


def balanced_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack n items into num_packs packs of exactly n / num_packs items, balancing weight.

    weight float [X, n] -> (pack_index int [X, n], rank_in_pack int [X, n]).
    Heaviest item first, into the lightest pack that still has room.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (rows, 1)), np.zeros((rows, n), dtype=np.int64)
    pack_index = np.empty((rows, n), dtype=np.int64)
    rank_in_pack = np.empty((rows, n), dtype=np.int64)
    for row in range(rows):
        pack_weight = np.zeros(num_packs)
        pack_items = np.zeros(num_packs, dtype=np.int64)
        for item in np.argsort(-weight[row], kind="stable"):
            room = np.flatnonzero(pack_items < per_pack)
            pack = room[np.argmin(pack_weight[room])]
            pack_index[row, item] = pack
            rank_in_pack[row, item] = pack_items[pack]
            pack_weight[pack] += weight[row, item]
            pack_items[pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replicate n logical experts into num_physical slots minimising the max load per replica.

    weight float [X, n] -> (phy2log int [X, P], rank int [X, P], logcnt int [X, n]).
    Each extra slot goes to the expert with the highest load per replica.
    """
    rows, n = weight.shape
    phy2log = np.tile(np.arange(num_physical), (rows, 1))
    rank = np.zeros((rows, num_physical), dtype=np.int64)
    logcnt = np.ones((rows, n), dtype=np.int64)
    r = np.arange(rows)
    for slot in range(n, num_physical):
        hot = np.argmax(weight / logcnt, axis=1)
        phy2log[:, slot] = hot
        rank[:, slot] = logcnt[r, hot]
        logcnt[r, hot] += 1
    return phy2log, rank, logcnt


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def rebalance_hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                           num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's hierarchical policy. weight [L, E] -> (phy2log [L, P], phyrank [L, P], logcnt [L, E])."""
    num_layers, num_experts = weight.shape
    group_size = num_experts // num_groups
    groups_per_node = num_groups // num_nodes
    slots_per_gpu = num_physical // num_gpus
    per_node = num_experts // num_nodes

    # 1. pack expert groups to nodes; mlog numbers experts node-major ("meta-logical")
    group_load = weight.reshape(num_layers, num_groups, group_size).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[:, :, None]
                + np.arange(group_size)).reshape(num_layers, num_experts)
    mlog2log = _inverse(log2mlog)

    # 2. replicate experts inside each node: rows are (layer, node) [L * N, E / N]
    mlog_load = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, per_node)
    phy2mlog, phyrank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)

    # 3. pack each node's physical experts to its GPUs
    phy_load = np.take_along_axis(mlog_load / mlogcnt, phy2mlog, axis=1)
    pack, rank = balanced_packing(phy_load, num_gpus // num_nodes)
    pphy2phy = _inverse(pack * slots_per_gpu + rank)

    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(num_layers, num_nodes, -1) + (np.arange(num_nodes) * per_node)[None, :, None])
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog.reshape(num_layers, -1), axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(num_layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(num_layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int,
                      policy: str = "auto") -> tuple[np.ndarray, np.ndarray, str]:
    """EPLB's entry point. weight [L, E] -> (phy2log [L, P], logcnt [L, E], policy used).

    policy "auto" is EPLB's rule: hierarchical when groups divide evenly over nodes, else global.
    """
    num_layers, num_experts = weight.shape
    if num_physical < num_experts or num_physical % num_gpus or num_gpus % num_nodes:
        raise PlacementError(
            f"EPLB needs physical slots ({num_physical}) >= experts ({num_experts}) and a multiple of "
            f"GPUs ({num_gpus}), and GPUs a multiple of nodes ({num_nodes})"
        )
    hierarchical_ok = num_experts % num_groups == 0 and num_groups % num_nodes == 0 and num_physical % num_nodes == 0
    if policy == "auto":
        policy = "hierarchical" if hierarchical_ok else "global"
    if policy == "hierarchical" and not hierarchical_ok:
        raise PlacementError(f"EPLB hierarchical policy needs {num_groups} expert groups divisible over {num_nodes} nodes")
    if policy not in POLICIES:
        raise PlacementError(f"unknown EPLB policy {policy!r} (choose from {', '.join(POLICIES)})")
    w = weight.astype(np.float64)
    if policy == "hierarchical":
        phy2log, _, logcnt = rebalance_hierarchical(w, num_physical, num_groups, num_nodes, num_gpus)
    else:
        phy2log, _, logcnt = rebalance_hierarchical(w, num_physical, 1, 1, num_gpus)
    return phy2log, logcnt, policy


def eplb_gpu_loads(weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int) -> np.ndarray:
    """Load per GPU under EPLB's model (equal split over replicas), float [L, G]."""
    per_replica = weight / logcnt
    slot_load = np.take_along_axis(per_replica, phy2log, axis=1)
    return slot_load.reshape(weight.shape[0], num_gpus, -1).sum(-1)


def eplb_placement(weight: np.ndarray, num_gpus: int, gpus_per_node: int, redundant: int = 0,
                   num_groups: int = 1, policy: str = "auto") -> tuple[Placement, np.ndarray]:
    """EPLB's layout as a moeplace Placement, and EPLB's own GPU loads float [L, G].

    EPLB may put two replicas of one expert on the same GPU; a placement holds one copy per GPU,
    so such duplicates merge (counted in solver["merged_duplicates"]).
    """
    num_layers, num_experts = weight.shape
    num_nodes = num_gpus // gpus_per_node
    phy2log, logcnt, used = rebalance_experts(weight, num_experts + redundant, num_groups, num_nodes, num_gpus, policy)
    slots_per_gpu = phy2log.shape[1] // num_gpus
    e2g = np.empty((num_layers, num_experts), dtype=np.int64)
    replicas: list[list[tuple[int, int]]] = []
    merged = 0
    for layer in range(num_layers):
        seen: set[tuple[int, int]] = set()
        first: dict[int, int] = {}
        reps: list[tuple[int, int]] = []
        for slot, expert in enumerate(phy2log[layer].tolist()):
            gpu = slot // slots_per_gpu
            if (expert, gpu) in seen:
                merged += 1
                continue
            seen.add((expert, gpu))
            if expert in first:
                reps.append((expert, gpu))
            else:
                first[expert] = gpu
        e2g[layer] = [first[e] for e in range(num_experts)]
        replicas.append(reps)
    placement = Placement(
        e2g, num_gpus, gpus_per_node, replicas,
        objective={"name": "balance", "load_model": "equal split over replicas"},
        solver={"name": f"eplb-{used}", "redundant_experts": redundant, "num_groups": num_groups, "merged_duplicates": merged},
    )
    return placement, eplb_gpu_loads(weight, phy2log, logcnt, num_gpus)
