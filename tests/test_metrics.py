"""eval metrics on hand-computed cases, and the baselines' invariants."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.eval.metrics import _fill, evaluate, gpu_loads, imbalance, serve_layer, token_gpus
from moeplace.placement import Placement
from moeplace.solve.baselines import all_baselines, contiguous, experts_per_gpu, greedy_load, random_balanced, round_robin
from moeplace.trace.format import make_trace


def test_hand_computed_metrics() -> None:
    # 4 experts on 2 GPUs (0,1 -> gpu0; 2,3 -> gpu1), 2 nodes of 1 GPU.
    p = Placement(np.array([[0, 0, 1, 1]] * 3), num_gpus=2, gpus_per_node=1)
    ids = np.array([
        [[0, 1], [1, 2], [3, 2]],  # top1 gpus 0,0,1: one cross of two; dest: l1 {0,1}-0 -> 1, l2 {1} - 0 -> 1
        [[2, 3], [3, 0], [2, 3]],  # top1 gpus 1,1,1: zero cross; dest: l1 {1,0}-1 -> 1, l2 {1}-1 -> 0
    ])
    m = evaluate(p, make_trace(ids, num_experts=4))
    assert m["cross_gpu_top1"] == pytest.approx(1 / 4)
    assert m["cross_node_top1"] == pytest.approx(1 / 4)
    assert m["dest_gpus_topk"] == pytest.approx(3 / 4)
    # loads layer0: gpu0 gets 2, gpu1 gets 2 -> 1.0; layer1: gpu0 {1,0}=2, gpu1 {2,3}=2; layer2: gpu1 4 -> 2.0
    assert m["imbalance_per_layer"] == pytest.approx([1.0, 1.0, 2.0])


def test_replica_on_current_gpu_is_used() -> None:
    p = Placement(np.array([[0, 1], [0, 1]]), num_gpus=2, gpus_per_node=2, replicas=[[], [(1, 0)]])
    t = make_trace(np.array([[[0], [1]], [[1], [1]]]), num_experts=2)
    g = token_gpus(p, t)
    assert g[0, 1, 0] == 0  # token on gpu0 uses the local replica of expert 1
    assert g[1, 1, 0] == 1  # token on gpu1 uses the primary
    assert evaluate(p, t)["cross_gpu_top1"] == 0.0


def test_baselines_are_balanced_layouts() -> None:
    loads = np.random.default_rng(1).random((3, 16))
    for name, layout in all_baselines(loads, 4).items():
        for layer in layout:
            assert np.bincount(layer, minlength=4).tolist() == [4] * 4, name


def test_greedy_load_beats_contiguous_on_skew() -> None:
    loads = np.array([[100.0, 90, 1, 1, 1, 1, 1, 1]])
    g = greedy_load(loads, 2)
    assert g[0, 0] != g[0, 1]  # the two hot experts are split


def test_imbalance_is_max_over_mean_per_layer() -> None:
    loads = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 0.0], [0.0, 5.0]])
    # the same values the eval report shows (one definition, shared with solve's EPLB comparison)
    assert imbalance(loads).tolist() == [1.5, 1.0, 1.0, 2.0]  # an empty layer counts as balanced
    assert imbalance(loads.astype(np.int64)).dtype == np.float64
    p = Placement(np.array([[0, 0, 1, 1]] * 2), num_gpus=2, gpus_per_node=1)
    t = make_trace(np.array([[[0], [2]], [[1], [3]], [[2], [3]]]), num_experts=4)
    assert evaluate(p, t)["imbalance_per_layer"] == imbalance(gpu_loads(p, t)).tolist() == [4 / 3, 2.0]


def test_node_metrics_on_two_nodes() -> None:
    # expert e on GPU e, 2 nodes x 2 GPUs; 3 tokens (not k of them, so no axis can stand in for another)
    p = Placement(np.array([[0, 1, 2, 3]] * 2), num_gpus=4, gpus_per_node=2)
    ids = np.array([
        [[0, 1], [1, 0]],  # gpu 0 -> 1: cross GPU, same node; dest {1,0}-0 -> 1 GPU, {0}-0 -> 0 nodes
        [[2, 0], [3, 0]],  # gpu 2 -> 3: cross GPU, same node; dest {3,0}-2 -> 2 GPUs, {1,0}-1 -> 1 node
        [[3, 1], [0, 3]],  # gpu 3 -> 0: cross node;           dest {0,3}-3 -> 1 GPU, {0,1}-1 -> 1 node
    ])
    m = evaluate(p, make_trace(ids, num_experts=4))
    assert m["cross_gpu_top1"] == 1.0
    assert m["cross_node_top1"] == pytest.approx(1 / 3)
    assert m["dest_gpus_topk"] == pytest.approx(4 / 3)
    assert m["dest_nodes_topk"] == pytest.approx(2 / 3)
    # loads: layer 0 [2, 2, 1, 1] -> 2 / 1.5; layer 1 [3, 1, 0, 2] -> 3 / 1.5
    assert m["imbalance_per_layer"] == pytest.approx([4 / 3, 2.0])
    assert m["imbalance_mean"] == pytest.approx(5 / 3) and m["imbalance_max"] == 2.0


def test_single_layer_has_no_transitions() -> None:
    p = Placement(np.array([[0, 1]]), num_gpus=2, gpus_per_node=1)
    m = evaluate(p, make_trace(np.array([[[0]], [[1]], [[1]]]), num_experts=2))
    assert (m["cross_gpu_top1"], m["cross_node_top1"], m["dest_gpus_topk"], m["dest_nodes_topk"]) == (0.0,) * 4
    assert m["imbalance_per_layer"] == pytest.approx([4 / 3])


def test_imbalance_below_one_selection_per_gpu() -> None:
    # one top-1 token on 4 GPUs: mean load 0.25, max 1 -> 4.0 (a mean under 1 is still a mean)
    assert imbalance(np.array([[0.0, 1.0, 0.0, 0.0]])).tolist() == [4.0]


def test_single_copy_load_counts_before_replicas_are_chosen() -> None:
    # 3 GPUs on one node; expert 0 on GPU 0 with a replica on GPU 1, expert 1 only on GPU 0.
    # Both tokens sit on GPU 2 (no copy): token 0's expert 1 loads GPU 0 first, so token 1's
    # expert 0 goes to the idle replica on GPU 1, not to its primary.
    gpus = serve_layer([[0, 1], [0]], np.array([[1], [0]]), np.array([[0], [0]]), np.array([2, 2]), 3, 3)
    assert gpus.tolist() == [[0], [1]]


def test_equal_groups_are_served_by_expert_id_then_node() -> None:
    # 2 nodes x 3 GPUs; experts 0 and 1 both on GPUs 0 (primary) and 1. Token 0 (expert 1, on
    # GPU 2: node 0, no copy there) and token 1 (expert 0, on GPU 3: node 1, none on its node)
    # are groups of one: expert 0's goes first and takes the primary, expert 1's the replica.
    gpus = serve_layer([[0, 1], [0, 1]], np.array([[1], [0]]), np.array([[0], [0]]), np.array([2, 3]), 3, 6)
    assert gpus.tolist() == [[1], [0]]


def test_water_fill_by_hand() -> None:
    # 2 units on levels [0, 0, 3]: one each to the empty bins (common level 1 stays below 3)
    assert _fill([0.0, 0.0, 3.0], 2) == [1, 1, 0]
    # 3 units on [2, 1, 2]: bin 1 rises to 2, then the 2 left go one each to the least-loaded
    # bins, bin 1 first, then by bin order: levels end at [3, 3, 2], the lowest maximum
    assert _fill([2.0, 1.0, 2.0], 3) == [1, 2, 0]
    # one unit: the least-loaded bin, the earliest among equals (the decode-step fast path)
    assert _fill([2.0, 1.0, 1.0], 1) == [0, 1, 0] and _fill([0.0], 1) == [1]
    # the lowest bins rise to a common level below the next; what is left goes to the bins that
    # were lowest before, by bin order: [1, 0] + 2 -> [0, 2] (not [1, 1], which ties on the max)
    assert _fill([1.0, 0.0], 2) == [0, 2] and _fill([0.0, 5.0, 0.0], 7) == [4, 0, 3]


def test_baselines_when_gpus_do_not_divide_experts() -> None:
    # 10 experts on 4 GPUs: the first 10 % 4 = 2 GPUs hold one more (vLLM's expert map)
    assert experts_per_gpu(10, 4).tolist() == [3, 3, 2, 2]
    assert contiguous(2, 10, 4).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 3, 3]] * 2
    assert round_robin(1, 5, 2).tolist() == [[0, 1, 0, 1, 0]]
    for layer in random_balanced(3, 10, 4, seed=2):
        assert np.bincount(layer, minlength=4).tolist() == [3, 3, 2, 2]
    # 7 experts on 3 GPUs (2 each, one GPU 3), heaviest first to the lightest GPU with room:
    # 10 -> 0; 1s -> 1, 2, 1, 2, 1 (GPU 1 reaches 3 first and is the one that holds 3); the last
    # 1 may not go to GPU 2 (weight 2, but a third expert there would make two GPUs of 3): GPU 0
    assert greedy_load(np.array([[10.0, 1, 1, 1, 1, 1, 1]]), 3).tolist() == [[0, 1, 2, 1, 2, 1, 0]]
    # one expert per GPU: EPLB's balanced packing keeps expert e on GPU e, whatever the loads
    assert greedy_load(np.array([[1.0, 5.0, 3.0]]), 3).tolist() == [[0, 1, 2]]
