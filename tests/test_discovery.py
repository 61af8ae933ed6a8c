"""MoE layer discovery and tiny models, on every supported transformers family."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from moeplace.errors import MoeplaceError
from moeplace.models.checkpoint import CheckpointError, moe_blocks, open_checkpoint
from moeplace.models.discovery import find_moe_layers, num_decoder_layers
from moeplace.models.tiny import FAMILIES, build_tiny_model


# decoder layers that the tiny config makes dense (see moeplace.models.tiny)
DENSE = {"qwen2_moe": {1}, "qwen3_moe": {1}, "deepseek_v2": {0}, "deepseek_v3": {0}}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_model(f, root / f) for f in FAMILIES}


def load(path: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_find_moe_layers_each_family(tiny_dirs: dict[str, Path], family: str) -> None:
    model = load(tiny_dirs[family])
    layers = find_moe_layers(model)
    n = num_decoder_layers(model)
    expected = [i for i in range(n) if i not in DENSE.get(family, set())]
    assert [m.layer_index for m in layers] == expected
    assert [m.moe_index for m in layers] == list(range(len(expected)))
    for m in layers:
        assert model.get_submodule(m.path) is m.block
        assert model.get_submodule(m.router_path) is m.router
        assert model.get_submodule(m.experts_path) is m.experts
        assert (m.num_experts, m.top_k) == (8, 2)
        assert "weight" in m.router_expert_params
        for name in m.expert_params:
            assert getattr(m.experts, name).shape[0] == 8
        # the router returns the family's (logits, weights, ids)
        x = torch.randn(5, model.config.hidden_size)
        logits, weights, ids = m.router(x)
        assert logits.shape == (5, 8) and weights.shape == ids.shape == (5, 2)
    assert bool(layers[0].shared_experts) == (family in ("qwen2_moe", "deepseek_v2", "deepseek_v3"))
    assert layers[0].num_groups == (4 if family.startswith("deepseek") else 1)
    if family == "deepseek_v3":
        assert "e_score_correction_bias" in layers[0].router_expert_params
    if family == "gpt_oss":
        assert layers[0].router_name == "router" and "bias" in layers[0].router_expert_params


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_layout_agrees_with_the_module_tree(tiny_dirs: dict[str, Path], family: str) -> None:
    """The torch-free reader of the files finds the same MoE layers, expert counts and router
    parameters as discovery on the loaded model, though the files use the hub layout."""
    blocks = moe_blocks(open_checkpoint(tiny_dirs[family]))
    modules = find_moe_layers(load(tiny_dirs[family]))
    assert [b.layer for b in blocks] == [m.layer_index for m in modules]
    for block, module in zip(blocks, modules):
        assert block.num_experts == module.num_experts == 8
        assert all(k.startswith(f"{block.prefix}.{module.router_name}.") for k in block.router)
        assert {k.rpartition(".")[2] for k in block.router} == set(module.router_expert_params)
        if family == "gpt_oss":
            assert not block.per_expert
            assert {k.rpartition(".")[2] for k in block.fused} == set(module.expert_params)
        else:
            assert sorted(block.per_expert) == list(range(8)) and not block.fused
            assert all(len(keys) == 3 and all(k.startswith(f"{block.prefix}.experts.{e}.") for k in keys)
                       for e, keys in block.per_expert.items())


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = load(build_tiny_model("deepseek_v3", tmp_path / "a", seed=3))
    b = load(build_tiny_model("deepseek_v3", tmp_path / "b", seed=3))
    c = load(build_tiny_model("deepseek_v3", tmp_path / "c", seed=4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # the correction bias is non-zero, so biased routing is exercised
    assert find_moe_layers(a)[0].router.e_score_correction_bias.abs().sum() > 0


def test_not_a_moe_model_names_what_is_missing() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(MoeplaceError, match="no sparse MoE block"):
        find_moe_layers(model)


def test_checkpoint_without_experts(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        open_checkpoint(tmp_path)
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(CheckpointError, match="no MoE layers found"):
        moe_blocks(open_checkpoint(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("family, kwargs, match", [
    ("llama", {}, "unknown tiny model family"),
    ("mixtral", {"top_k": 9}, "exceeds num_experts"),
    ("qwen3_moe", {"num_layers": 1}, "num_layers must be >= 2"),
])
def test_bad_tiny_model_request(tmp_path: Path, family: str, kwargs: dict, match: str) -> None:
    with pytest.raises(MoeplaceError, match=match):
        build_tiny_model(family, tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


class _Router(nn.Module):
    def __init__(self, experts: int, hidden: int, full: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden))
        self.top_k, self.full = 2, full

    def forward(self, x: torch.Tensor):  # noqa: ANN201
        logits = x @ self.weight.T
        if not self.full:  # an old-style router: logits only
            return logits
        w, ids = logits.softmax(-1).topk(self.top_k, dim=-1)
        return logits, w, ids


class _Block(nn.Module):
    def __init__(self, full: bool) -> None:
        super().__init__()
        self.gate = _Router(4, 6, full)
        self.experts = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.gate(x)
        return x


class _Model(nn.Module):
    """Per-expert ModuleList experts (the pre-fusion layout of remote-code models)."""

    def __init__(self, full: bool = True) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(6, 6)), _Block(full), _Block(full)])

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        x = torch.randn(input_ids.numel(), 6)
        for layer in self.layers:
            x = layer(x)
        return x


def test_modulelist_experts_are_found() -> None:
    layers = find_moe_layers(_Model())
    assert [(m.layer_index, m.path, m.fused, m.num_experts, m.top_k) for m in layers] == [
        (1, "layers.1", False, 4, 2), (2, "layers.2", False, 4, 2)]
    assert layers[0].expert_params == () and layers[0].router_expert_params == ("weight",)


def test_router_returning_logits_only_is_refused() -> None:
    from moeplace.trace.collect import RouterRecorder, route_batch

    model = _Model(full=False)
    with RouterRecorder(find_moe_layers(model)) as rec, pytest.raises(MoeplaceError, match="does not return"):
        route_batch(model, rec, torch.zeros(1, 3, dtype=torch.long))
    model = _Model()
    with RouterRecorder(find_moe_layers(model)) as rec:
        ids, weights = route_batch(model, rec, torch.zeros(1, 3, dtype=torch.long))
        assert ids.shape == weights.shape == (3, 2, 2)
        # routers bypassed (e.g. a fused kernel replacing the block's forward): an error, not a silent gap
        with pytest.raises(MoeplaceError, match="did not run"):
            route_batch(_Model(), rec, torch.zeros(1, 3, dtype=torch.long))
