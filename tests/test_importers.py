"""`moeplace import`: CSV layers, ExFlow .npy, SGLang recorder dumps, per-layer count JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA
from moeplace.cli import run
from moeplace.errors import TraceError
from moeplace.trace.format import load_loads, load_trace
from moeplace.trace.importers import import_csv, import_loads_json, import_sglang

FLAME = SHARED_DATA / "flame-moe-290m-decoder"
MIXTRAL = SHARED_DATA / "mixtral-8x7b-expert-loads"


def write_layer_csv(path: Path, dense: np.ndarray, token_ids: np.ndarray | None = None) -> Path:
    header = (["token_id"] if token_ids is not None else []) + [f"expert_{e}" for e in range(dense.shape[1])]
    lines = [",".join(header)]
    for r, row in enumerate(dense):
        lines.append(",".join(([str(token_ids[r])] if token_ids is not None else []) + [repr(float(x)) for x in row]))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(not FLAME.is_dir(), reason="shared FLAME data absent")
def test_flame_reimport_matches_committed_trace(tmp_path: Path) -> None:
    out = tmp_path / "flame.npz"
    assert run(["import", "csv", str(FLAME), "-o", str(out), "--meta", "model=flame-moe-290m"]) == 0
    new, committed = load_trace(out), load_trace(ROOT / "traces" / "flame-moe-290m-decoder.npz")
    for key in ("topk_ids", "topk_weights", "token_ids", "sequence_ids", "positions"):
        np.testing.assert_array_equal(getattr(new, key), getattr(committed, key), err_msg=key)
    assert new.num_experts == committed.num_experts == 64
    assert new.meta["moe_layers"] == committed.meta["moe_layers"] == list(range(2, 10))
    assert new.meta["model"] == "flame-moe-290m"


def test_csv_files_are_ordered_by_layer_number(tmp_path: Path) -> None:
    # layer 2: token 0 -> experts (1, 0), token 1 -> (2, 3); layer 10: token 0 -> (3, 2), token 1 -> (0, 1)
    l2 = np.array([[0.3, 0.6, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]])
    l10 = np.array([[0.0, 0.0, 0.1, 0.7], [0.8, 0.1, 0.0, 0.0]])
    f2 = write_layer_csv(tmp_path / "layer2.csv", l2, np.array([5, 6]))
    f10 = write_layer_csv(tmp_path / "layer10.csv", l10, np.array([5, 6]))
    t = import_csv([f10, f2])  # glob order: layer10 first
    assert t.meta["moe_layers"] == [2, 10]
    np.testing.assert_array_equal(t.topk_ids, [[[1, 0], [3, 2]], [[2, 3], [0, 1]]])
    np.testing.assert_allclose(t.topk_weights[:, 0], [[0.6, 0.3], [0.5, 0.2]])
    np.testing.assert_array_equal(t.sequence_ids, [5, 6])
    assert t.positions is None and t.num_experts == 4


def test_csv_ignores_other_columns(tmp_path: Path) -> None:
    f = tmp_path / "layer0.csv"
    f.write_text("text,expert_1,expert_0,token_id\nhello,0.2,0.7,4\n\"a, b\",0.9,0.0,5\n")
    t = import_csv([f], k=1)
    np.testing.assert_array_equal(t.topk_ids[:, 0, 0], [0, 1])  # columns mapped by expert number
    np.testing.assert_allclose(t.topk_weights[:, 0, 0], [0.7, 0.9])
    np.testing.assert_array_equal(t.sequence_ids, [4, 5])


@pytest.mark.parametrize(
    "second, message",
    [
        (np.array([[0.3, 0.6, 0.0, 0.0]]), "1 rows, but"),
        (np.array([[0.3, 0.6, 0.0], [0.0, 0.5, 0.2]]), "3 expert columns"),
        (np.array([[0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]]), "row 0 selects 1 experts, expected top-2"),
        (np.array([[0.3, -0.6, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]]), "finite and non-negative"),
    ],
)
def test_csv_layers_must_agree(tmp_path: Path, second: np.ndarray, message: str) -> None:
    f0 = write_layer_csv(tmp_path / "layer0.csv", np.array([[0.3, 0.6, 0.0, 0.0], [0.0, 0.0, 0.5, 0.2]]))
    f1 = write_layer_csv(tmp_path / "layer1.csv", second)
    with pytest.raises(TraceError, match=message):
        import_csv([f0, f1])


def test_exflow_import_records_num_experts(tmp_path: Path) -> None:
    src = tmp_path / "exflow.npy"
    np.save(src, np.array([[0, 3], [2, 1], [3, 3]], dtype=np.int32))
    out = tmp_path / "t.npz"
    assert run(["import", "exflow", str(src), "--num-experts", "8", "-o", str(out)]) == 0
    t = load_trace(out)
    assert t.num_experts == 8 and t.topk_ids.shape == (3, 2, 1) and t.topk_weights is None
    np.testing.assert_array_equal(t.topk_ids[:, :, 0], [[0, 3], [2, 1], [3, 3]])


# --- SGLang dumps: fixtures with the layout of sglang/srt/eplb/expert_distribution.py ---------------

# 4 model layers (layer 0 dense), 4 logical experts, 6 physical slots: physical 4 and 5 are
# redundant copies of logical 1 and 2. Top-2 in SGLang's 8-wide buffer, -1 elsewhere.
P2L = np.array([[0, 1, 2, 3, 1, 2]] * 4)


def _record(pass_id: int, rank: int, physical: list[list[list[int]]], input_ids: list[int], positions: list[int]) -> dict:
    import torch

    n = len(input_ids)
    ids = torch.full((4, n, 8), -1, dtype=torch.int32)
    ids[1:, :, :2] = torch.tensor(physical, dtype=torch.int32).transpose(0, 1)  # [tokens, 3, 2] -> [3, tokens, 2]
    return {
        "forward_pass_id": pass_id, "rank": rank, "gatherer_key": "primary",
        "input_ids": input_ids, "positions": positions, "extend_seq_lens": [n], "forward_mode": 1,
        "topk_ids_of_layer": ids, "misc_objects": [], "global_physical_count": torch.zeros(4, 6, dtype=torch.int32),
    }


def _per_token_dumps(tmp_path: Path) -> list[Path]:
    import torch

    a = _record(0, 0, [[[0, 4], [5, 3], [1, 0]], [[2, 3], [3, 0], [4, 5]]], [11, 12], [0, 1])
    b = _record(1, 0, [[[3, 2], [0, 1], [2, 3]]], [13], [2])
    c = _record(0, 1, [[[1, 2], [2, 1], [3, 2]], [[-1, -1], [-1, -1], [-1, -1]]], [21, 0], [0, 0])  # DP rank 1 + padding row
    dup = {**a, "rank": 1}  # without DP attention, rank 1 records rank 0's batch again
    paths = []
    for rank, records in ((0, [b, a]), (1, [dup, c])):
        path = tmp_path / f"expert_distribution_recorder_1700000000.0_{rank}.pt"
        torch.save({"records": records, "last_physical_to_logical_map": torch.tensor(P2L)}, path)
        paths.append(path)
    return paths


def test_sglang_per_token_to_trace(tmp_path: Path) -> None:
    t = import_sglang(_per_token_dumps(tmp_path))
    assert t.meta["moe_layers"] == [1, 2, 3] and t.meta["dropped_tokens"] == 1 and t.meta["records"] == 3
    assert t.num_experts == 4 and t.top_k == 2 and t.topk_weights is None
    # order: pass 0 rank 0 (tokens 11, 12), pass 0 rank 1 (21; padding dropped), pass 1 (13)
    np.testing.assert_array_equal(t.token_ids, [11, 12, 21, 13])
    np.testing.assert_array_equal(t.positions, [0, 1, 0, 2])
    expected_physical = np.array([
        [[0, 4], [5, 3], [1, 0]], [[2, 3], [3, 0], [4, 5]], [[1, 2], [2, 1], [3, 2]], [[3, 2], [0, 1], [2, 3]],
    ])
    np.testing.assert_array_equal(t.topk_ids, P2L[0][expected_physical])


def test_sglang_cli_writes_trace(tmp_path: Path) -> None:
    _per_token_dumps(tmp_path)
    out = tmp_path / "t.npz"
    assert run(["import", "sglang", str(tmp_path), "-o", str(out)]) == 0
    assert load_trace(out).num_tokens == 4


def test_sglang_stat_to_loads(tmp_path: Path) -> None:
    import torch

    rng = np.random.default_rng(0)
    count = rng.integers(0, 50, size=(5, 3, 8))
    count[:, 0] = 0  # a dense layer
    path = tmp_path / "expert_distribution_recorder_1700000000.0.pt"
    torch.save({"rank": 0, "logical_count": torch.tensor(count, dtype=torch.int32),
                "average_utilization_rate_over_window": None}, path)
    out = tmp_path / "loads.npz"
    assert run(["import", "sglang", str(path), "-o", str(out)]) == 0
    loads = load_loads(out)
    np.testing.assert_array_equal(loads.loads, count.sum(axis=0)[1:])
    assert loads.meta["moe_layers"] == [1, 2] and loads.meta["source"] == "sglang-stat"


def test_sglang_refuses_arbitrary_objects(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"records": [], "payload": Path("x")}, path)  # a pathlib object needs real unpickling
    with pytest.raises(TraceError, match="refused: loading needs unpickling of arbitrary Python objects"):
        import_sglang([path])


def test_sglang_physical_id_out_of_range(tmp_path: Path) -> None:
    import torch

    rec = _record(0, 0, [[[0, 6], [1, 2], [3, 0]]], [1], [0])
    path = tmp_path / "d.pt"
    torch.save({"records": [rec], "last_physical_to_logical_map": torch.tensor(P2L)}, path)
    with pytest.raises(TraceError, match="physical expert id 6 out of range"):
        import_sglang([path])


@pytest.mark.skipif(not MIXTRAL.is_dir(), reason="shared Mixtral loads absent")
def test_mixtral_popularity_files_are_summed(tmp_path: Path) -> None:
    files = sorted((MIXTRAL / "mixtral_8x7b_original").glob("*.json"))[:2]
    docs = [json.loads(f.read_text()) for f in files]
    loads = import_loads_json(files)
    np.testing.assert_array_equal(loads.loads, np.add(*[np.array(d["expert_popularity"]) for d in docs]))
    assert loads.loads.shape == (32, 8)
    assert loads.meta["total_input_tokens"] == sum(d["total_input_tokens"] for d in docs)


def test_loads_json_shapes_must_agree(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"expert_popularity": [[1, 2], [3, 4]]}))
    b.write_text(json.dumps({"expert_loads": [[1, 2, 3], [3, 4, 5]]}))
    with pytest.raises(TraceError, match=r"is \[2, 3\], but"):
        import_loads_json([a, b])
