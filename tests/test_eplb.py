"""DeepSeek EPLB (solve/eplb.py): the published algorithm's invariants, checked by brute force."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeplace.errors import PlacementError
from moeplace.solve import eplb


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
