"""DeepSeek EPLB (solve/eplb.py): the published algorithm's invariants, checked by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeplace.errors import PlacementError
from moeplace.solve import eplb
from moeplace.solve.balance import _fill_free_slots, lpt_layer, replication_bound
from moeplace.solve.replicate import propose


def test_replicate_minimises_max_load_per_replica() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(1, 100, (3, 5)).astype(float)
    _, _, logcnt = eplb.replicate_experts(w, 9)
    for row in range(3):
        best = min((w[row] / np.array(c)).max() for c in itertools.product(range(1, 6), repeat=5) if sum(c) == 9)
        assert (w[row] / logcnt[row]).max() == pytest.approx(best)
        assert logcnt[row].sum() == 9


def test_balanced_packing_fills_every_pack_equally() -> None:
    w = np.random.default_rng(1).random((4, 12))
    pack, rank = eplb.balanced_packing(w, 3)
    for row in range(4):
        assert np.bincount(pack[row], minlength=3).tolist() == [4, 4, 4]
        assert sorted(zip(pack[row], rank[row])) == sorted((p, r) for p in range(3) for r in range(4))


def test_hierarchical_keeps_groups_on_one_node_and_slots_equal() -> None:
    w = np.random.default_rng(2).random((2, 16)) * 100
    phy2log, logcnt, policy = eplb.rebalance_experts(w, 24, num_groups=4, num_nodes=2, num_gpus=4)
    assert policy == "hierarchical"
    assert phy2log.shape == (2, 24) and (logcnt.sum(1) == 24).all()
    node_of_slot = np.arange(24) // 12
    for layer in range(2):
        for group in range(4):
            nodes = {node_of_slot[s] for s in range(24) if phy2log[layer, s] // 4 == group}
            assert len(nodes) == 1
    loads = eplb.eplb_gpu_loads(w, phy2log, logcnt, 4)
    assert loads.sum(1) == pytest.approx(w.sum(1))


def test_auto_falls_back_to_global_and_rejects_bad_topology() -> None:
    w = np.ones((1, 8))
    assert eplb.rebalance_experts(w, 8, num_groups=1, num_nodes=2, num_gpus=4)[2] == "global"
    with pytest.raises(PlacementError):
        eplb.rebalance_experts(w, 10, num_groups=1, num_nodes=1, num_gpus=4)
    with pytest.raises(PlacementError):
        eplb.rebalance_experts(w, 8, num_groups=1, num_nodes=2, num_gpus=4, policy="hierarchical")


def test_eplb_placement_is_valid_and_counts_replicas() -> None:
    w = np.array([[50.0, 10, 10, 10, 5, 5, 5, 5]])
    placement, loads = eplb.eplb_placement(w, num_gpus=4, gpus_per_node=4, redundant=4)
    assert len(placement.replicas[0]) + placement.solver["merged_duplicates"] == 4
    assert loads.max() < w.max()  # the hot expert was split


def test_balanced_packing_greedy_by_hand() -> None:
    """Heaviest first into the lightest pack with room: [4,3,2,1] -> {4,1},{3,2}; the room limit binds on
    [10,1,1,1] (the third 1 must go to the heavy pack). One item per pack is upstream's identity shortcut."""
    pack, rank = eplb.balanced_packing(np.array([[4.0, 3, 2, 1], [10, 1, 1, 1]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0], [0, 1, 1, 0]]
    assert rank.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]
    pack, rank = eplb.balanced_packing(np.array([[1.0, 3, 2]]), 3)
    assert pack.tolist() == [[0, 1, 2]] and rank.tolist() == [[0, 0, 0]]


def test_global_policy_layout_by_hand() -> None:
    """[12,6,2,1] on 2 GPUs x 3 slots: expert 0 gets both spare slots (12/3 = 4 per replica); the
    replicas 6,4,4,4,2,1 pack heaviest-first to GPU loads 11 and 10, slots GPU-major."""
    w = np.array([[12.0, 6, 2, 1]])
    phy2log, logcnt, policy = eplb.rebalance_experts(w, 6, num_groups=1, num_nodes=1, num_gpus=2, policy="global")
    assert policy == "global"
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    assert phy2log.tolist() == [[1, 0, 3, 0, 0, 2]]
    assert eplb.eplb_gpu_loads(w, phy2log, logcnt, 2).tolist() == [[11.0, 10.0]]
    placement, loads = eplb.eplb_placement(w, num_gpus=2, gpus_per_node=2, redundant=2)
    assert placement.expert_to_gpu.tolist() == [[0, 0, 1, 0]] and placement.replicas == (((0, 1),),)
    assert placement.solver["merged_duplicates"] == 1  # GPU 1's two replicas of expert 0
    assert loads.tolist() == [[11.0, 10.0]]


def test_hierarchical_packs_groups_to_nodes_by_load() -> None:
    """8 groups of 2 experts on 4 nodes: group loads 8,8,7,7,2,2,1,1 pack greedily to
    {g0,g6},{g1,g7},{g2,g4},{g3,g5}, 9 per node; each node's slots hold exactly its groups."""
    w = np.array([[5.0, 3, 4, 4, 6, 1, 4, 3, 1, 1, 1.5, 0.5, 0.75, 0.25, 0.5, 0.5]])
    phy2log, logcnt, policy = eplb.rebalance_experts(w, 24, num_groups=8, num_nodes=4, num_gpus=8)
    assert policy == "hierarchical" and logcnt.sum() == 24 and (logcnt >= 1).all()
    groups_on_node = [set((phy2log[0, n * 6:(n + 1) * 6] // 2).tolist()) for n in range(4)]
    assert groups_on_node == [{0, 6}, {1, 7}, {2, 4}, {3, 5}]
    node_loads = eplb.eplb_gpu_loads(w, phy2log, logcnt, 8).reshape(4, 2).sum(1)
    assert node_loads.tolist() == pytest.approx([9, 9, 9, 9])


def test_unknown_policy_and_default_redundancy() -> None:
    w = np.array([[3.0, 1, 2, 4]])
    with pytest.raises(PlacementError, match="unknown EPLB policy"):
        eplb.rebalance_experts(w, 4, num_groups=1, num_nodes=1, num_gpus=2, policy="greedy")
    placement, _ = eplb.eplb_placement(w, num_gpus=2, gpus_per_node=2)
    assert placement.solver["redundant_experts"] == 0 and placement.replicas == ((),)


def test_replicate_propose_rules_by_hand() -> None:
    """solve/replicate.propose, EPLB's copy rule (highest load per copy) on 3 GPUs x 2 slots, loads 9,5,1.
    `load` puts a copy on the least-loaded free GPU, `affinity` on the one sending the expert most
    tokens; 4 copies asked, the 3 free slots run out first."""
    homed = np.array([[3.0, 1, 0], [5, 2, 0], [1, 2, 1]])  # tokens on GPU g choosing expert e
    e2g = np.array([0, 1, 2])
    assert propose(homed, homed.sum(0), e2g, 4, 2, "load") == [(0, 2), (1, 0), (0, 1)]
    assert propose(homed, homed.sum(0), e2g, 4, 2, "affinity") == [(0, 1), (1, 2), (1, 0)]


def test_replicate_propose_splits_load_equally_over_copies() -> None:
    """Expert 0 (12) on GPUs 0 and 4, then GPU 3: each copy holds 4, so GPU 0 carries 4 and GPU 2 3.5,
    and expert 1's copy goes to GPU 2 (loads 12,5,3.5,1,0.5, one expert per GPU, 2 slots)."""
    load = np.array([12.0, 5, 3.5, 1, 0.5])
    assert propose(np.tile(load / 5, (5, 1)), load, np.arange(5), 3, 2, "load") == [(0, 4), (0, 3), (1, 2)]


def test_balance_replication_bound_by_hand() -> None:
    """balance's lower bound: max(mean load, least max load per replica for R copies, EPLB's rule).
    Loads 10, 2 on 4 GPUs (mean 3): one copy halves the 10 -> 5; two leave 10/3; none keeps 10."""
    w = np.array([10.0, 2])
    assert [replication_bound(w, 4, r) for r in (0, 1, 2)] == pytest.approx([10, 5, 10 / 3])
    assert replication_bound(w, 2, 2) == pytest.approx(6)  # the mean dominates


def test_balance_lpt_caps_eplb_counts_at_the_gpus() -> None:
    """Loads 100, 3, 2 with 4 copies on 3 GPUs x 3 slots: EPLB gives the 100 all four (5 copies), more
    than 3 GPUs can hold; the 2 lost go by load per copy: 3 (3 per copy), then 2 (2 > 1.5). Heaviest
    replica first onto the lightest GPU: 33.3 x 3 one per GPU, 1.5 x 2 on GPUs 0, 1, then 1 x 2."""
    assert lpt_layer(np.array([100.0, 3, 2]), 3, 3, 4) == [[0, 1, 2], [0, 1], [2, 0]]


def test_balance_refills_eplb_merged_slots_by_load_per_copy() -> None:
    """Slots EPLB left free (merged duplicates, 4 GPUs x 2 slots, GPUs 2 and 3 one free each) go to
    the most load per copy, on the lightest GPU with room: the 8 to GPU 2; then the 5.5 has no
    room left (GPU 2 is now full), and the 5 takes GPU 3, since the 8 carries only 4 per copy."""
    copies = _fill_free_slots(np.array([8.0, 5, 0.5, 5.5, 1, 1]), [[0], [1], [2], [3], [0], [1]], 4, 2, 8)
    assert copies == [[0, 2], [1, 3], [2], [3], [0], [1]]
