"""eval/traffic.py: the cross-rank bytes `moeplace serve` must match, on a hand-worked case."""

from __future__ import annotations

import numpy as np
import pytest

from moeplace.errors import MoeplaceError
from moeplace.eval.metrics import evaluate
from moeplace.eval.traffic import predict_traffic, serving_gpus
from moeplace.placement import Placement
from moeplace.trace.format import make_trace

# 2 GPUs, 4 experts, 2 MoE layers: layer 0 experts {0,1} on GPU 0; layer 1 experts {0,2} on GPU 0
PLACEMENT = Placement(np.array([[0, 0, 1, 1], [0, 1, 0, 1]]), num_gpus=2, gpus_per_node=2)
# sequence 0 (home rank 0), listed out of order: position 6 first, then position 5
IDS = np.array([
    [[0, 1], [0, 2]],  # pos 6: layer 0 on {0}, layer 1 on {0}
    [[2, 0], [1, 3]],  # pos 5: layer 0 on {1, 0} (top-1 on 1), layer 1 on {1}
])
TRACE = make_trace(IDS, None, 4, sequence_ids=np.array([0, 0]), positions=np.array([6, 5]))
DISPATCH_ROW = 8 * 4 + 4 * (2 * 2 + 1)  # hidden 8 float32 + 2 ids + 2 weights + slot
COMBINE_ROW = 8 * 4


def test_standard_rows_go_home_and_back() -> None:
    # pos 5: layer 0 needs rank 1, layer 1 needs rank 1; pos 6 is all home -> 2 rows each way
    p = predict_traffic(PLACEMENT, TRACE, "standard", hidden_size=8, element_bytes=4)
    assert (p["dispatch_rows"], p["combine_rows"]) == (2, 2)
    assert p["alltoall_bytes"] == 2 * DISPATCH_ROW + 2 * COMBINE_ROW
    assert p["cross_rank_rows_per_layer"] == [2, 2]
    assert p["alltoalls_per_layer"] == 2


def test_coherent_token_follows_its_top1_expert() -> None:
    # pos 5 starts home (0): layer 0 dispatches to 1, combine of rank 0's partial to 1 (top-1);
    # layer 1 is all on rank 1 where it now is -> nothing. pos 6 starts on rank 1 (where pos 5
    # ended): layer 0 is on rank 0 -> 1 dispatch; layer 1 on rank 0 where it now is -> nothing.
    p = predict_traffic(PLACEMENT, TRACE, "coherent", hidden_size=8, element_bytes=4)
    assert (p["dispatch_rows"], p["combine_rows"]) == (2, 1)
    assert p["alltoall_bytes"] == 2 * DISPATCH_ROW + COMBINE_ROW
    assert p["cross_rank_rows_per_layer"] == [3, 0]
    # layers after the first: dispatch rows per token are eval's dest_gpus_topk
    assert evaluate(PLACEMENT, TRACE)["dest_gpus_topk"] == 0.0


def test_top1_coherent_has_no_combine() -> None:
    top1 = make_trace(IDS[:, :, :1], None, 4, sequence_ids=np.array([0, 0]), positions=np.array([6, 5]))
    p = predict_traffic(PLACEMENT, top1, "coherent", hidden_size=8, element_bytes=2)
    assert p["combine_rows"] == 0 and p["alltoalls_per_layer"] == 1
    # pos 5: home 0 -> expert 2 on rank 1 (1 row); layer 1 expert 1 on rank 1 (0); pos 6 starts on
    # rank 1 -> expert 0 on rank 0 (1 row); layer 1 expert 0 on rank 0 (0)
    assert p["dispatch_rows"] == 2
    assert p["dispatch_bytes"] == 2 * (8 * 2 + 4 * 3)


def test_needs_sequences_and_matching_model() -> None:
    bare = make_trace(IDS, None, 4)
    with pytest.raises(MoeplaceError, match="sequence_ids"):
        predict_traffic(PLACEMENT, bare, "coherent", 8, 4)
    other = make_trace(np.zeros((1, 3, 2), dtype=int) + [0, 1], None, 4, sequence_ids=[0], positions=[0])
    with pytest.raises(MoeplaceError, match="placement is for 2 MoE layers"):
        predict_traffic(PLACEMENT, other, "standard", 8, 4)


# the same, with expert 2 of layer 0 copied onto GPU 0 (sequence 0's home)
REPLICATED = Placement(PLACEMENT.expert_to_gpu, num_gpus=2, gpus_per_node=1, replicas=[[(2, 0)], []])


def test_replica_on_own_rank_saves_traffic() -> None:
    # standard: pos 5 layer 0 [2, 0] is now all at home (0 rows, was 1); layer 1 [1, 3] -> 1 row
    p = predict_traffic(REPLICATED, TRACE, "standard", hidden_size=8, element_bytes=4)
    assert (p["dispatch_rows"], p["combine_rows"]) == (1, 1)
    assert p["cross_rank_rows_per_layer"] == [0, 2]
    # coherent: pos 5 stays on 0 at layer 0 (top-1 copy at home), then 1 dispatch to rank 1;
    # pos 6 starts on 1: layer 0 [0, 1] on rank 0 -> 1 dispatch; layer 1 [0, 2] on 0 -> none.
    # Only one rank per layer serves each token: no combine (it was 1 without the replica)
    p = predict_traffic(REPLICATED, TRACE, "coherent", hidden_size=8, element_bytes=4)
    assert (p["dispatch_rows"], p["combine_rows"]) == (2, 0)
    assert p["alltoall_bytes"] == 2 * DISPATCH_ROW


def test_replicas_least_loaded_per_decode_step() -> None:
    # 2 nodes of 2 GPUs; expert 0 on GPU 0 with a copy on GPU 1. Sequences 2, 3, 6 (homes 2, 3, 2,
    # node 1) all pick expert 0: no copy on their GPU or node, so each decode step fills the
    # copies evenly (ties: lower GPU id, tokens by sequence). Step 0 holds the three first tokens
    # (2 -> GPU 0, 3 -> GPU 0, 6 -> GPU 1); step 1 only sequence 2's second token (-> GPU 0).
    placement = Placement(np.array([[0, 1, 2, 3]]), num_gpus=4, gpus_per_node=2, replicas=[[(0, 1)]])
    trace = make_trace(np.zeros((4, 1, 1), dtype=np.int64), None, 4, sequence_ids=np.array([6, 2, 2, 3]),
                       positions=np.array([9, 4, 3, 7]))
    for mode in ("standard", "coherent"):
        assert serving_gpus(placement, trace, mode)[:, 0, 0].tolist() == [1, 0, 0, 0]
    assert predict_traffic(placement, trace, "standard", 8, 4)["dispatch_rows"] == 4
    # coherent: sequence 2's second token starts on GPU 0, where its first ended: no row
    assert predict_traffic(placement, trace, "coherent", 8, 4)["dispatch_rows"] == 3
