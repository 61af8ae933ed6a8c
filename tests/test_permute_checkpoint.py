"""permute-checkpoint: the renumbered model computes the same logits and realises the placement."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from moeplace.cli import run
from moeplace.errors import PlacementError
from moeplace.export.permute import check_group_routing, check_not_applied, ep_size_note, permute_checkpoint
from moeplace.models.checkpoint import CheckpointError, moe_blocks, open_checkpoint
from moeplace.models.tiny import build_tiny_model
from moeplace.placement import Placement
from moeplace.serve.engine import check_placement
from moeplace.serve.model import read_spec
from moeplace.solve.baselines import random_balanced


NUM_EXPERTS = 8
# decoder layer ids of the MoE layers of each 3-layer tiny model (Qwen: layer 1 dense; DeepSeek: layer 0)
MOE_LAYERS = {"mixtral": [0, 1, 2], "qwen2_moe": [0, 2], "qwen3_moe": [0, 2], "olmoe": [0, 1, 2],
              "deepseek_v2": [1, 2], "deepseek_v3": [1, 2], "gpt_oss": [0, 1, 2]}


def build(family: str, out: Path, fused: bool = False, shard_size: str | None = None) -> Path:
    """The tiny `family` model in hub layout (per-expert keys; GPT-OSS fused), or re-saved
    sharded, or fused (transformers 5 in-memory names: experts.gate_up_proj [E, ...])."""
    build_tiny_model(family, out, num_experts=NUM_EXPERTS, num_layers=3, seed=0)
    if fused or shard_size:
        model = AutoModelForCausalLM.from_pretrained(out)
        if shard_size:
            (out / "model.safetensors").unlink()
            model.save_pretrained(out, max_shard_size=shard_size)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"),
                      metadata={"format": "pt"})
    return out


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(ids).logits


def group_preserving(num_layers: int, num_gpus: int, num_groups: int, seed: int) -> np.ndarray:
    """Balanced expert_to_gpu whose GPU blocks keep DeepSeek's routing groups (contiguous ids) whole."""
    rng = np.random.default_rng(seed)
    size, per_gpu = NUM_EXPERTS // num_groups, NUM_EXPERTS // num_gpus
    out = np.empty((num_layers, NUM_EXPERTS), dtype=np.int64)
    for layer in range(num_layers):
        order = np.concatenate([rng.permutation(np.arange(g * size, (g + 1) * size)) for g in rng.permutation(num_groups)])
        out[layer, order] = np.arange(NUM_EXPERTS) // per_gpu
    return out


def router_rows(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(("gate.weight", "router.weight"))
                        and "shared_expert_gate" not in k and "mlp.gate_proj" not in k})
    return out


@pytest.mark.parametrize("family,fused,shards", [
    ("mixtral", False, "40KB"),  # sharded: the index is rewritten
    ("qwen2_moe", False, None),
    ("qwen3_moe", True, None),
    ("olmoe", False, None),
    ("deepseek_v2", False, None),
    ("deepseek_v3", False, "40KB"),
    ("gpt_oss", False, None),
])
def test_permuted_model_has_same_logits(tmp_path: Path, family: str, fused: bool, shards: str | None) -> None:
    src = build(family, tmp_path / "src", fused=fused, shard_size=shards)
    num_layers, num_gpus = len(MOE_LAYERS[family]), 4
    num_groups = json.loads((src / "config.json").read_text()).get("n_group") or 1
    e2g = group_preserving(num_layers, num_gpus, num_groups, seed=1)
    placement = Placement(expert_to_gpu=e2g, num_gpus=num_gpus, gpus_per_node=2)
    record = permute_checkpoint(src, placement, tmp_path / "out", progress=False)
    assert record["moe_layers"] == MOE_LAYERS[family]

    new_to_old = np.asarray(record["new_to_old"])
    assert new_to_old.tolist() != np.tile(np.arange(NUM_EXPERTS), (num_layers, 1)).tolist(), "test needs a real permutation"
    for layer in range(num_layers):  # contiguous block g of new ids = the placement's experts on GPU g
        for gpu in range(num_gpus):
            block = new_to_old[layer, gpu * 2:(gpu + 1) * 2]
            assert sorted(block.tolist()) == placement.experts_on_gpu(layer, gpu)
    before, after = router_rows(src), router_rows(tmp_path / "out")
    for i, name in enumerate(sorted(before, key=lambda k: int(k.split("layers.")[1].split(".")[0]))):
        torch.testing.assert_close(after[name], before[name][torch.as_tensor(new_to_old[i])], rtol=0, atol=0)

    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    reference = logits(src, ids)
    torch.testing.assert_close(logits(tmp_path / "out", ids), reference, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp directory left behind"


def test_any_dtype_is_permuted_by_bytes_and_extra_layers_are_left_alone(tmp_path: Path) -> None:
    """Fused uint8 blocks (MXFP4-like), a shared 0-d scale, per-expert fp16 + fp8-style scales,
    and a layer past num_hidden_layers (DeepSeek's MTP layer), which is not part of the placement."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    experts = np.arange(4)
    tensors = {
        "model.layers.0.mlp.router.weight": np.repeat(experts[:, None], 3, 1).astype(np.float32),
        "model.layers.0.mlp.router.bias": experts.astype(np.float32),
        "model.layers.0.mlp.experts.gate_up_proj_blocks": np.broadcast_to(experts[:, None, None], (4, 2, 5)).astype(np.uint8),
        "model.layers.0.mlp.experts.input_scale": np.array(7.0, np.float32),
    }
    for layer in (1, 2):
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = np.repeat(experts[:, None], 3, 1).astype(np.float32)
        for e in experts:
            tensors[f"model.layers.{layer}.mlp.experts.{e}.weight"] = np.full((2, 2), e, np.float16)
            tensors[f"model.layers.{layer}.mlp.experts.{e}.weight_scale_inv"] = np.full((1, 1), e, np.float32)
    save_numpy(tensors, str(src / "model.safetensors"))
    placement = Placement(expert_to_gpu=np.array([[1, 0, 1, 0], [0, 1, 1, 0]]), num_gpus=2, gpus_per_node=2)
    record = permute_checkpoint(src, placement, tmp_path / "out", progress=False)
    assert record["moe_layers"] == [0, 1] and np.asarray(record["new_to_old"]).tolist() == [[1, 3, 0, 2], [0, 3, 1, 2]]

    out = load_numpy(str(tmp_path / "out" / "model.safetensors"))
    assert out.keys() == tensors.keys()
    assert out["model.layers.0.mlp.experts.gate_up_proj_blocks"][:, 0, 0].tolist() == [1, 3, 0, 2]
    assert out["model.layers.0.mlp.router.bias"].tolist() == [1, 3, 0, 2]
    assert out["model.layers.0.mlp.router.weight"][:, 0].tolist() == [1, 3, 0, 2]
    assert out["model.layers.0.mlp.experts.input_scale"] == 7.0
    assert out["model.layers.1.mlp.gate.weight"][:, 0].tolist() == [0, 3, 1, 2]
    assert [out[f"model.layers.1.mlp.experts.{j}.weight_scale_inv"].item() for j in range(4)] == [0, 3, 1, 2]
    assert [out[f"model.layers.1.mlp.experts.{j}.weight"][0, 0] for j in range(4)] == [0, 3, 1, 2]
    for name, value in tensors.items():
        if name.startswith("model.layers.2."):  # the extra layer is untouched
            np.testing.assert_array_equal(out[name], value)


def test_fp8_scales_move_with_their_experts_and_per_tensor_ones_stay(tmp_path: Path) -> None:
    """fp8 checkpoints: per-expert scales of shape [] (neuralmagic Mixtral FP8) or [1] and block
    scales move with their expert; a per-tensor scale of a fused experts module or of a quantized
    router, shape [1] or [1, hidden/128] (all experts in one block), is one value for every expert
    and stays as it is, as a 0-d one does. Run through the CLI."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    experts = np.arange(4)
    rows = np.repeat(experts[:, None], 3, 1)
    tensors: dict[str, np.ndarray] = {"model.layers.0.block_sparse_moe.gate.weight": rows.astype(np.float32)}
    for e in experts:
        moe = f"model.layers.0.block_sparse_moe.experts.{e}"
        tensors[f"{moe}.w1.weight"] = np.full((2, 2), e, np.uint8)  # fp8 bytes
        tensors[f"{moe}.w1.weight_scale"] = np.array(e + 10.0, np.float32)  # shape []
        tensors[f"{moe}.w1.input_scale"] = np.array([e + 20.0], np.float32)  # shape [1]
        tensors[f"{moe}.w1.weight_scale_inv"] = np.full((1, 1), e + 30.0, np.float32)
    tensors |= {
        "model.layers.1.mlp.gate.weight": rows.astype(np.uint8),  # an fp8 router
        "model.layers.1.mlp.gate.weight_scale": np.array([5.0], np.float32),
        "model.layers.1.mlp.gate.input_scale": np.array([6.0], np.float32),
        "model.layers.1.mlp.gate.weight_scale_inv": np.array([[7.0]], np.float32),
        "model.layers.1.mlp.gate.e_score_correction_bias": experts.astype(np.float32),
        "model.layers.1.mlp.experts.gate_up_proj": np.broadcast_to(experts[:, None, None], (4, 2, 2)).astype(np.uint8),
        "model.layers.1.mlp.experts.gate_up_proj_scale": np.broadcast_to(experts[:, None, None], (4, 1, 2)).astype(np.float32),
        "model.layers.1.mlp.experts.gate_up_proj_input_scale": np.array([8.0], np.float32),
        "model.layers.1.mlp.experts.down_proj_input_scale": np.array(9.0, np.float32),
    }
    save_numpy(tensors, str(src / "model.safetensors"))
    placement = Placement(expert_to_gpu=np.array([[1, 0, 1, 0], [0, 1, 1, 0]]), num_gpus=2, gpus_per_node=2)
    placement.save(tmp_path / "p.json")
    assert run(["permute-checkpoint", str(src), str(tmp_path / "p.json"), "-o", str(tmp_path / "out"), "--quiet"]) == 0

    out = load_numpy(str(tmp_path / "out" / "model.safetensors"))
    assert out.keys() == tensors.keys()
    order = [[1, 3, 0, 2], [0, 3, 1, 2]]  # new expert j = old expert order[layer][j]
    moe = "model.layers.0.block_sparse_moe"
    assert out[f"{moe}.gate.weight"][:, 0].tolist() == order[0]
    for j, old in enumerate(order[0]):
        assert out[f"{moe}.experts.{j}.w1.weight"][0, 0] == old
        assert out[f"{moe}.experts.{j}.w1.weight_scale"].shape == () and out[f"{moe}.experts.{j}.w1.weight_scale"] == old + 10
        assert out[f"{moe}.experts.{j}.w1.input_scale"].tolist() == [old + 20]
        assert out[f"{moe}.experts.{j}.w1.weight_scale_inv"].tolist() == [[old + 30]]
    assert out["model.layers.1.mlp.gate.weight"][:, 0].tolist() == order[1]
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].tolist() == order[1]
    assert out["model.layers.1.mlp.experts.gate_up_proj"][:, 0, 0].tolist() == order[1]
    assert out["model.layers.1.mlp.experts.gate_up_proj_scale"][:, 0, 0].tolist() == order[1]
    for name in ("gate.weight_scale", "gate.input_scale", "gate.weight_scale_inv", "experts.gate_up_proj_input_scale",
                 "experts.down_proj_input_scale"):
        np.testing.assert_array_equal(out[f"model.layers.1.mlp.{name}"], tensors[f"model.layers.1.mlp.{name}"])


@pytest.mark.parametrize("tensors,index,message", [
    ({"model.layers.0.mlp.gate.weight": (4, 3), **{f"model.layers.0.mlp.experts.{e}.w": (2,) for e in range(3)}},
     None, "expert ids 0..2 (3 experts) but its router scores 4"),
    ({"model.layers.0.mlp.experts.0.w": (2,)}, None, "no [experts, hidden] router"),
    ({"model.layers.0.mlp.gate.weight": (4, 3), "model.layers.0.mlp.experts.down_proj": (3, 2)}, None,
     "no leading expert dimension of 4"),
    # DeepSeek-style block scale of an fp8 router with more than 128 experts in blocks of 2: rows cannot move alone
    ({"model.layers.0.mlp.gate.weight": (4, 3), "model.layers.0.mlp.gate.weight_scale_inv": (2, 1),
      "model.layers.0.mlp.experts.down_proj": (4, 2)}, None,
     "gate.weight_scale_inv of shape [2, 1] has no leading expert dimension of 4 (nor 1"),
    ({"model.layers.0.mlp.gate.weight": (4, 3), "model.layers.0.mlp.experts.down_proj": (4, 2)},
     {"model.layers.0.mlp.gate.weight": "model.safetensors"}, "index.json and the shards disagree"),
    ({"model.norm.weight": (3,)}, None, "no MoE layers found"),
])
def test_inconsistent_checkpoints_are_refused(tmp_path: Path, tensors: dict, index: dict | None, message: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    save_numpy({k: np.zeros(shape, np.float32) for k, shape in tensors.items()}, str(src / "model.safetensors"))
    if index is not None:
        (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    placement = Placement(expert_to_gpu=np.array([[0, 0, 1, 1]]), num_gpus=2, gpus_per_node=2)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        permute_checkpoint(src, placement, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build("qwen3_moe", tmp_path_factory.mktemp("qwen") / "model", shard_size="40KB")


def _placement(num_layers: int = 2, **kw) -> Placement:
    return Placement(expert_to_gpu=random_balanced(num_layers, NUM_EXPERTS, 4, seed=2), num_gpus=4, gpus_per_node=4, **kw)


def test_a_wrong_order_is_caught_by_the_logits(qwen: Path, tmp_path: Path) -> None:
    """Guard on the logits test itself: renumbering experts without their router rows changes logits."""
    out = tmp_path / "out"
    permute_checkpoint(qwen, _placement(), out, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = out / index["weight_map"]["model.layers.0.mlp.gate.weight"]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["model.layers.0.mlp.gate.weight"] = torch.flip(tensors["model.layers.0.mlp.gate.weight"], [0])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(logits(out, ids), logits(qwen, ids), atol=1e-4)


def test_replicas_uneven_and_foreign_placements_are_refused(qwen: Path, tmp_path: Path) -> None:
    with pytest.raises(PlacementError, match="replicates experts.*--to sglang"):
        other_gpu = (int(_placement().expert_to_gpu[0, 0]) + 1) % 4  # a copy of expert 0 where it is not
        permute_checkpoint(qwen, _placement(replicas=[[(0, other_gpu)], []]), tmp_path / "a", progress=False)
    layout = _placement().expert_to_gpu.copy()
    layout[1] = [0, 0, 0, 1, 1, 2, 2, 3]
    uneven = replace(_placement(), expert_to_gpu=layout)
    with pytest.raises(PlacementError, match="layer 1: GPU 0 holds 3 physical experts but GPU 3 holds 1"):
        permute_checkpoint(qwen, uneven, tmp_path / "b", progress=False)
    with pytest.raises(PlacementError, match="placement is for 3 MoE layers x 8 experts, but the checkpoint has 2 x 8"):
        permute_checkpoint(qwen, _placement(num_layers=3), tmp_path / "c", progress=False)
    assert not list(tmp_path.iterdir()), "a refused request wrote something"


def test_replicas_on_mixtral_name_the_ways_that_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "use `moeplace export --to sglang`", which for Mixtral says to use permute-checkpoint."""
    model = build("mixtral", tmp_path / "mixtral")
    other_gpu = (int(_placement(3).expert_to_gpu[0, 0]) + 1) % 4
    placement = tmp_path / "p.json"
    _placement(3, replicas=[[(0, other_gpu)], [], []]).save(placement)
    capsys.readouterr()  # building the model prints transformers' progress
    assert run(["permute-checkpoint", str(model), str(placement), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "renumbering a checkpoint cannot create copies" in err[0], err
    assert "Ways to run it: `moeplace serve --placement` (copies included" in err[0]
    assert "solve again without --redundant-experts" in err[0] and "--to sglang" not in err[0]
    assert not (tmp_path / "out").exists()


def test_a_placement_is_not_applied_twice(qwen: Path, tmp_path: Path) -> None:
    """Serving (or permuting) a renumbered checkpoint with the placement it realises moved the
    experts twice and silently lost the gain (found 2026-11-23)."""
    sha = "ab" * 32
    placed = _placement(trace_sha256=sha)
    permute_checkpoint(qwen, placed, tmp_path / "out", progress=False)
    with pytest.raises(PlacementError, match="renumbered by `moeplace permute-checkpoint` for this placement"):
        permute_checkpoint(tmp_path / "out", placed, tmp_path / "again", progress=False)
    with pytest.raises(PlacementError, match="for this placement"):
        check_placement(read_spec(tmp_path / "out"), _placement(), world=4)  # same layout, no trace recorded
    other = random_balanced(2, NUM_EXPERTS, 4, seed=7)
    with pytest.raises(PlacementError, match="for a placement fitted on the same trace as this one .* numbers the "
                                             "experts as the original checkpoint does"):
        check_not_applied(tmp_path / "out", Placement(other, num_gpus=4, gpus_per_node=4, trace_sha256=sha))
    # a placement of the renumbered model (another layout, fitted on its own trace), or the original model
    fresh = Placement(other, num_gpus=4, gpus_per_node=4, trace_sha256="cd" * 32)
    assert check_placement(read_spec(tmp_path / "out"), fresh, world=4) is fresh
    check_not_applied(qwen, placed)


def test_group_check_follows_the_routing_config() -> None:
    mixing = np.array([[0, 2, 1, 3, 4, 6, 5, 7]])  # new group 0 = old experts 0, 2 (groups of 2)
    check_group_routing({"n_group": 4, "topk_group": 4}, mixing)  # every group kept: no constraint
    check_group_routing({"n_group": 4, "topk_group": 2, "topk_method": "greedy"}, mixing)  # V2 greedy ignores groups
    check_group_routing({"text_config": {"n_group": 4, "topk_group": 2}}, np.array([[2, 3, 0, 1, 6, 7, 4, 5]]))
    with pytest.raises(PlacementError, match=r"mix old groups \[0, 1\] in new group 0"):
        check_group_routing({"text_config": {"n_group": 4, "topk_group": 2}}, mixing)


def test_group_breaking_renumbering_is_refused(tmp_path: Path) -> None:
    src = build("deepseek_v3", tmp_path / "ds")
    e2g = np.tile(np.arange(NUM_EXPERTS) % 4, (2, 1))  # round robin: every GPU block mixes two groups
    with pytest.raises(PlacementError, match="n_group=4, topk_group=2.*mix old groups"):
        permute_checkpoint(src, Placement(expert_to_gpu=e2g, num_gpus=4, gpus_per_node=4), tmp_path / "o", progress=False)


def test_bad_checkpoints_and_outputs_get_one_line(qwen: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    placement = tmp_path / "p.json"
    _placement().save(placement)

    def fails(*args: str) -> str:
        assert run(["permute-checkpoint", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moeplace: error:") and "\n" not in err and "Traceback" not in err
        return err

    assert "no such model directory" in fails(str(tmp_path / "nope"), str(placement), "-o", str(tmp_path / "o"))
    assert "outside MODEL_DIR" in fails(str(qwen), str(placement), "-o", str(qwen / "sub"))
    (tmp_path / "exists").mkdir()
    assert "is not a permute-checkpoint output" in fails(str(qwen), str(placement), "-o", str(tmp_path / "exists"))
    (tmp_path / "file").write_text("x")
    assert "exists and is not a directory" in fails(str(qwen), str(placement), "-o", str(tmp_path / "file"))

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert "pickled weights" in fails(str(pickled), str(placement), "-o", str(tmp_path / "o"))

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in qwen.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert "truncated" in fails(str(truncated), str(placement), "-o", str(tmp_path / "o"))
    config = json.loads((qwen / "config.json").read_text())
    key = next(k for k in ("num_experts", "num_local_experts") if k in config)  # as transformers saves it
    (truncated / "config.json").write_text(json.dumps({**config, key: NUM_EXPERTS // 2}))
    for f in qwen.glob("*.safetensors"):  # whole weights, config edited apart from them
        (truncated / f.name).write_bytes(f.read_bytes())
    assert (f"config.json {key} is {NUM_EXPERTS // 2}, but the weights hold {NUM_EXPERTS} experts"
            in fails(str(truncated), str(placement), "-o", str(tmp_path / "o")))
    (truncated / "config.json").write_text(json.dumps(config))
    shard.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    assert "not a safetensors file or truncated" in fails(str(truncated), str(placement), "-o", str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def _rewrite_header(path: Path, edit) -> None:
    """Edit one tensor's header entry in place, padding the header to its old length."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    edit(header[name])
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    path.write_bytes(data[:8] + raw + b" " * (length - len(raw)) + data[8 + length:])


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.update(dtype="Q9"), "unknown dtype 'Q9'"),
    (lambda e: e.update(data_offsets=[e["data_offsets"][0], e["data_offsets"][1] - 2]), "(corrupt header)"),
])
def test_corrupt_safetensors_headers_are_refused(qwen: Path, tmp_path: Path, edit, message: str) -> None:
    """A header whose dtype or byte range does not match its shape was copied into a corrupt output."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in qwen.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    _rewrite_header(sorted(bad.glob("*.safetensors"))[0], edit)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        permute_checkpoint(bad, _placement(), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_index_may_not_point_outside_the_model(qwen: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in qwen.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape("shard '../../etc/passwd' is not a file name inside")):
        permute_checkpoint(bad, _placement(), tmp_path / "out", progress=False)


def _cli(qwen: Path, placement: Path, out: Path | str, *flags: str) -> int:
    return run(["permute-checkpoint", str(qwen), str(placement), "-o", str(out), "--quiet", *flags])


def test_overwrite_replaces_only_when_done(qwen: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    placement = tmp_path / "p.json"
    _placement().save(placement)
    assert _cli(qwen, placement, out) == 0
    (out / "stale.txt").write_text("old")
    capsys.readouterr()
    assert _cli(qwen, placement, out) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert _cli(qwen, placement, out, "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "moeplace_permutation.json").is_file()
    assert "experts per GPU on 4 GPUs" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.json"]


def test_overwrite_refuses_what_is_not_an_earlier_output(qwen: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--overwrite deleted any directory wholesale: unrelated files, the placement input (found 2026-11-23)."""
    placement = tmp_path / "p.json"
    _placement().save(placement)

    def refused(out: Path, *args: str, placement: Path = placement) -> str:
        files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert _cli(qwen, placement, out, "--overwrite", *args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("moeplace: error:") and "\n" not in err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files, "a refused output was changed"
        assert not [p for p in tmp_path.rglob(".*")], "temp directory left behind"
        return err

    unrelated = tmp_path / "unrelated"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("keep")
    assert "not a permute-checkpoint output (no valid moeplace_permutation.json); remove it" in refused(unrelated)
    (unrelated / "moeplace_permutation.json").write_text("{not json")
    assert "not a permute-checkpoint output" in refused(unrelated)

    scratch = tmp_path / "scratch"  # the reported case: the placement input inside -o
    scratch.mkdir()
    (scratch / "p.json").write_bytes(placement.read_bytes())
    assert "holds" in refused(scratch, placement=scratch / "p.json")  # the CLI names its placement input

    # an earlier output that now holds the placement: refused too, by the CLI and by the library
    # when told its inputs
    earlier = tmp_path / "earlier"
    permute_checkpoint(qwen, _placement(), earlier, progress=False)
    (earlier / "p.json").write_bytes(placement.read_bytes())
    assert "p.json, an input of this run" in refused(earlier, placement=earlier / "p.json")
    with pytest.raises(CheckpointError, match="holds .*p.json, an input of this run"):
        permute_checkpoint(qwen, _placement(), earlier, overwrite=True, progress=False, inputs=[earlier / "p.json"])
    assert (earlier / "p.json").read_bytes() == placement.read_bytes()
    assert "an input of this run" in refused(tmp_path)  # holds all of the above, the placement too


def test_overwrite_of_the_cwd_is_refused_up_front(qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`-o . --overwrite` did the work, then failed with 'Device or resource busy' and left `..XXXX.old/`."""
    placement = tmp_path / "p.json"
    _placement().save(placement)
    earlier = tmp_path / "work" / "earlier"
    permute_checkpoint(qwen, _placement(), earlier, progress=False)  # passes the marker check: only the cwd rule stops it
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(earlier)
    for out in (".", "..", str(earlier), str(tmp_path)):
        assert _cli(qwen, placement, out, "--overwrite") == 2
        err = capsys.readouterr().err.strip()
        assert f"-o {out}: is the current directory or contains it ({earlier})" in err and "\n" not in err
    assert _cli(qwen, placement, "/", "--overwrite") == 2  # also holds MODEL_DIR, which that rule names
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "something was created or removed"


def test_a_failed_swap_puts_the_earlier_output_back(qwen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    permute_checkpoint(qwen, _placement(), out, progress=False)
    (out / "mine.txt").write_text("earlier")
    real = os.replace

    def failing(src: str | Path, dst: str | Path) -> None:  # the new output cannot be renamed into place
        if str(src).endswith(".tmp") and Path(dst) == out:
            raise OSError(5, "Input/output error", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):
        permute_checkpoint(qwen, _placement(), out, overwrite=True, progress=False)
    assert (out / "mine.txt").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "temp or .old directory left behind"


def test_another_ep_size_gets_a_note(qwen: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A renumbered checkpoint served on another number of ranks runs, but no longer as the placement."""
    permute_checkpoint(qwen, _placement(), tmp_path / "out", progress=False)  # for 4 GPUs
    (tmp_path / "prompts.jsonl").write_text('{"prompt": [1, 2, 3]}\n')
    assert run(["serve", "--model", str(tmp_path / "out"), "--prompts", str(tmp_path / "prompts.jsonl"),
                "--out", str(tmp_path / "gen.jsonl"), "--max-new-tokens", "1"]) == 0  # one rank, no torchrun
    assert "note: " + ep_size_note(tmp_path / "out", 1) in capsys.readouterr().err
    assert ep_size_note(tmp_path / "out", 4) is None
    assert ep_size_note(qwen, 2) is None  # not renumbered: nothing to say
    assert ep_size_note(tmp_path / "out", 2).endswith("runs on 2 ranks: each rank holds 2 of the placement's GPUs whole")
    assert "each of the placement's GPUs is split over 2 ranks; solve for 8 GPUs" in ep_size_note(tmp_path / "out", 8)
    assert "its GPUs do not map onto the ranks; solve for 3 GPUs" in ep_size_note(tmp_path / "out", 3)


def test_the_stage_of_a_killed_run_is_removed_never_a_live_one(qwen: Path, tmp_path: Path) -> None:
    """Before: a SIGKILLed run's `.OUT.xxxx.tmp` (a whole checkpoint, hidden) stayed forever."""
    placement = tmp_path / "p.json"
    _placement().save(placement)
    dead = tmp_path / ".out.k1ll3d.tmp"  # what a run killed outright leaves (no lock held)
    dead.mkdir()
    (dead / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 4096)
    code = ("import sys, time; from pathlib import Path; from moeplace.io import locked_stage\n"
            "with locked_stage(Path(sys.argv[1]), '.out.') as stage:\n"
            "    print(stage, flush=True); time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        live = Path(holder.stdout.readline().strip())  # type: ignore[union-attr]
        assert live.name.startswith(".out.") and live.is_dir()
        assert _cli(qwen, placement, tmp_path / "out") == 0
        assert not dead.exists() and live.is_dir()  # a concurrent live run's stage is kept
    finally:
        holder.kill()  # SIGKILL: its stage stays behind, unlocked
        holder.wait()
    assert _cli(qwen, placement, tmp_path / "out", "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.json"]


def _small(root: Path, extra: dict[str, np.ndarray] | None = None) -> Path:
    """One MoE layer of 4 per-expert experts (expert e's bytes all e) and a router whose row e is e."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    tensors: dict[str, np.ndarray] = {
        "model.layers.0.mlp.gate.weight": np.repeat(np.arange(4)[:, None], 3, 1).astype(np.float32),
        **{f"model.layers.0.mlp.experts.{e}.w": np.full(5, e, np.uint8) for e in range(4)}, **(extra or {})}
    save_numpy(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
    return root


_SMALL_PLACEMENT = Placement(expert_to_gpu=np.array([[1, 0, 0, 1]]), num_gpus=2, gpus_per_node=2, trace_sha256="ef" * 32)


def test_the_record_other_files_and_output_shards(tmp_path: Path) -> None:
    """The record names what the run did; other files are copied, pickled weights skipped (even
    in a sub-directory); every shard keeps its metadata and 8-byte aligned data, as the
    safetensors library writes it; the directory gets the umask's mode, not mkdtemp's 0o700."""
    src = _small(tmp_path / "src", {"model.embed.weight": np.arange(3, dtype=np.uint8),
                                    "model.layers.0.mlp.experts.scale": np.arange(4, dtype=np.uint8)[:, None]})
    (src / "tokenizer").mkdir()
    (src / "tokenizer" / "vocab.txt").write_text("a b")
    (src / "old").mkdir()
    (src / "old" / "weights.pt").write_bytes(b"\x80")
    (src / "pytorch_model.bin").write_bytes(b"\x80")
    scale = "model.layers.0.mlp.experts.scale"  # fused [4, 1] uint8, after 23 bytes of uint8 data: an odd offset
    assert open_checkpoint(src).shards["model.safetensors"][scale].begin % 2 == 1
    record = permute_checkpoint(src, _SMALL_PLACEMENT, tmp_path / "out", progress=False)
    expected = {"format": "moeplace.permutation/v1", "source": str(src), "num_gpus": 2, "experts_per_gpu": 2,
                "moe_layers": [0], "new_to_old": [[1, 2, 0, 3]], "placement_trace_sha256": "ef" * 32,
                "skipped": ["old", "pytorch_model.bin"]}
    assert {**record, "new_to_old": np.asarray(record["new_to_old"]).tolist()} == expected
    assert json.loads((tmp_path / "out" / "moeplace_permutation.json").read_text()) == expected
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "moeplace_permutation.json",
                                                     "tokenizer"]
    assert (out / "tokenizer" / "vocab.txt").read_text() == "a b"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o7777 == 0o777 & ~umask
    data = (out / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert length % 8 == 0 and json.loads(data[8:8 + length])["__metadata__"] == {"format": "pt"}
    tensors = load_numpy(str(out / "model.safetensors"))
    assert [tensors[f"model.layers.0.mlp.experts.{j}.w"][0] for j in range(4)] == [1, 2, 0, 3]
    assert tensors["model.layers.0.mlp.gate.weight"][:, 0].tolist() == [1, 2, 0, 3]
    assert tensors[scale][:, 0].tolist() == [1, 2, 0, 3] and tensors["model.embed.weight"].tolist() == [0, 1, 2]


def test_rows_that_do_not_split_into_bytes_and_a_full_disk_are_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fused F6 tensor [4, 1] is 3 bytes: its rows share bytes, so copying byte rows would write
    an empty tensor. A disk with less free space than the tensors is refused before writing."""
    src = _small(tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    header["model.layers.0.mlp.experts.w6"] = {"dtype": "F6_E2M3", "shape": [4, 1], "data_offsets": [end, end + 3]}
    raw = json.dumps(header).encode()
    packed = tmp_path / "packed"
    packed.mkdir()
    (packed / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + length:] + bytes(3))
    with pytest.raises(CheckpointError, match=re.escape("experts.w6: 3 bytes do not split into 4 expert rows")):
        permute_checkpoint(packed, _SMALL_PLACEMENT, tmp_path / "out", progress=False)

    total = end  # bytes of tensor data in the shard
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=total - 1))
    with pytest.raises(CheckpointError, match=r": 0\.0 GiB free, the permuted checkpoint needs 0\.0 GiB"):
        permute_checkpoint(src, _SMALL_PLACEMENT, tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed", "src"], "a refused run left something"
    monkeypatch.setattr("shutil.disk_usage", lambda path: SimpleNamespace(free=2 * total))  # the need is the tensors
    permute_checkpoint(src, _SMALL_PLACEMENT, tmp_path / "out", progress=False)


def test_a_file_cut_while_copying_is_an_error_not_a_hang(tmp_path: Path) -> None:
    from moeplace.export.permute import _copy_range

    (tmp_path / "short").write_bytes(b"0123456789")
    with open(tmp_path / "short", "rb") as fin, open(tmp_path / "copy", "wb") as fout:
        _copy_range(fin, fout, 4, 3)
        with pytest.raises(CheckpointError, match="short: truncated while copying"):
            _copy_range(fin, fout, 8, 5)
    assert (tmp_path / "copy").read_bytes() == b"45689"


def test_a_placement_fitted_on_another_model_is_refused(qwen: Path, tmp_path: Path) -> None:
    """Same shape is not the same model: the fit trace's model_type and MoE layers must match the
    checkpoint's where the placement records them; a matching record (or none) passes."""
    layers = [b.layer for b in moe_blocks(open_checkpoint(qwen))]
    with pytest.raises(PlacementError, match=r"fitted on the routing of a mixtral model \(hub/mix\), but the "
                                             r"checkpoint is a qwen3_moe model"):
        permute_checkpoint(qwen, _placement(trace_model={"model": "hub/mix", "model_type": "mixtral"}),
                           tmp_path / "a", progress=False)
    shifted = [x + 1 for x in layers]
    with pytest.raises(PlacementError, match=rf"MoE layers at decoder layers \[{shifted[0]}, {shifted[1]}\], but the "
                                             rf"checkpoint has them at \[{layers[0]}, {layers[1]}\]"):
        permute_checkpoint(qwen, _placement(trace_model={"model_type": "qwen3_moe", "moe_layers": shifted}),
                           tmp_path / "b", progress=False)
    assert not list(tmp_path.iterdir()), "a refused request wrote something"
    permute_checkpoint(qwen, _placement(trace_model={"model_type": "qwen3_moe", "moe_layers": layers}),
                       tmp_path / "c", progress=False)
    assert (tmp_path / "c" / "config.json").exists()


def test_serve_refuses_a_placement_fitted_on_another_model(qwen: Path) -> None:
    """serve's check before any weight is read: the same record as permute-checkpoint's."""
    spec = read_spec(qwen)
    with pytest.raises(PlacementError, match=rf"a mixtral model, but the model {qwen} is a qwen3_moe model"):
        check_placement(spec, _placement(trace_model={"model_type": "mixtral"}), 4)
    with pytest.raises(PlacementError, match=r"MoE layers at decoder layers \[7, 8\]"):
        check_placement(spec, _placement(trace_model={"moe_layers": [7, 8]}), 4)
    fitted = _placement(trace_model={"model_type": "qwen3_moe", "moe_layers": list(spec.moe_layers)})
    assert check_placement(spec, fitted, 4) is fitted


def test_swapped_arguments_are_named(qwen: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "MODEL_DIR: is a directory, not a JSON file", read as the placement."""
    placement = tmp_path / "p.json"
    _placement().save(placement)
    assert run(["permute-checkpoint", str(placement), str(qwen), "-o", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"moeplace: error: {placement} is a file and {qwen} a directory: arguments swapped? permute-checkpoint "
        "takes MODEL_DIR first, then PLACEMENT")
    assert not (tmp_path / "out").exists()
