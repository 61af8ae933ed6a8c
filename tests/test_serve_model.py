"""Rank-local model loading: only this rank's experts, per-expert and fused checkpoints, bad files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeplace.errors import MoeplaceError
from moeplace.models.tiny import build_tiny_model
from moeplace.serve.counters import Counters
from moeplace.serve.dist import Comm
from moeplace.serve.generate import Runtime
from moeplace.serve.model import RankModel, read_spec
from moeplace.serve.replicas import ExpertMap

PROMPTS = [[3, 4, 5], [9, 8]]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("serve-model") / "mixtral", num_experts=8, top_k=2,
                            num_layers=2, seed=4)


def greedy(path: Path, experts: list[list[int]] | None = None) -> tuple[RankModel, list[list[int]]]:
    spec = read_spec(path)
    local = experts or [list(range(spec.num_experts))] * len(spec.moe_layers)
    model = RankModel(spec, local, torch.device("cpu"), torch.float32)
    rt = Runtime(model, Comm(0, 1, torch.device("cpu"), Counters(len(spec.moe_layers))),
                 ExpertMap(torch.zeros(len(spec.moe_layers), spec.num_experts, dtype=torch.int64),
                           [None] * len(spec.moe_layers), 1))
    return model, rt.generate(PROMPTS, [4, 4], ignore_eos=True).tokens


def test_mixtral_renormalises_whatever_its_config_says(mixtral: Path, tmp_path: Path) -> None:
    import json
    import shutil

    # transformers' Mixtral router always divides the top-k weights by their sum; a config with
    # norm_topk_prob false (which it saves if given) must not switch that off here
    copy = tmp_path / "m"
    shutil.copytree(mixtral, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(cfg | {"norm_topk_prob": False}))
    assert read_spec(mixtral).renormalize and read_spec(copy).renormalize


def test_rank_holds_only_its_experts(mixtral: Path) -> None:
    spec = read_spec(mixtral)
    assert spec.moe_layers == (0, 1) and spec.top_k == 2 and not spec.fused_experts
    model = RankModel(spec, [[1, 6], [0, 7]], torch.device("cpu"), torch.float32)
    full = load_file(mixtral / "model.safetensors")
    for m, experts in enumerate([[1, 6], [0, 7]]):
        assert model.w_gate[m].shape[0] == 2
        for slot, e in enumerate(experts):
            prefix = f"model.layers.{m}.block_sparse_moe.experts.{e}"
            torch.testing.assert_close(model.w_gate[m][slot], full[f"{prefix}.w1.weight"])
            torch.testing.assert_close(model.w_down[m][slot], full[f"{prefix}.w2.weight"])


def test_fused_expert_checkpoint_loads_slices(mixtral: Path, tmp_path: Path) -> None:
    """Experts stored as [E, 2I, H] gate_up_proj + [E, H, I] down_proj give the same model."""
    fused_dir = tmp_path / "fused"
    shutil.copytree(mixtral, fused_dir)
    tensors = load_file(mixtral / "model.safetensors")
    for layer in range(2):
        prefix = f"model.layers.{layer}.block_sparse_moe.experts"
        gate_up, down = [], []
        for e in range(8):
            gate_up.append(torch.cat([tensors.pop(f"{prefix}.{e}.w1.weight"), tensors.pop(f"{prefix}.{e}.w3.weight")]))
            down.append(tensors.pop(f"{prefix}.{e}.w2.weight"))
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        tensors[f"{prefix}.down_proj"] = torch.stack(down)
    save_file(tensors, fused_dir / "model.safetensors")
    assert read_spec(fused_dir).fused_experts
    assert greedy(fused_dir)[1] == greedy(mixtral)[1]


def test_unsupported_and_broken_checkpoints(mixtral: Path, tmp_path: Path) -> None:
    deepseek = build_tiny_model("deepseek_v3", tmp_path / "ds", num_experts=8, top_k=2, num_layers=2)
    with pytest.raises(MoeplaceError, match="not served"):
        read_spec(deepseek)
    broken = tmp_path / "broken"
    shutil.copytree(mixtral, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoeplaceError):
        greedy(broken)
    shutil.copy(mixtral / "model.safetensors", broken / "model.safetensors")
    config = json.loads((mixtral / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_local_experts": 4}))
    with pytest.raises(MoeplaceError, match="config.json num_local_experts is 4, but the weights hold 8 experts"):
        read_spec(broken)  # served by the weights' count, it ran and routed over 8 (found 2026-11-23)
    (broken / "config.json").write_text("{")
    with pytest.raises(MoeplaceError, match="not valid JSON"):
        read_spec(broken)
