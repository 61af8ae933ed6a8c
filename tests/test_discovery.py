"""MoE layer discovery and tiny models, on every supported transformers family."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
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


def test_building_a_tiny_model_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Demos and tests build these often: no "Writing model shards" bar from transformers, and
    its progress bars are left as they were."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()  # an in-process `trace` run earlier turns them off
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        build_tiny_model("olmoe", tmp_path / "m")
        assert capfd.readouterr() == ("", "")
        assert hf_logging.is_progress_bar_enabled()
    finally:
        if not was:
            hf_logging.disable_progress_bar()


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


def _shard(path: Path, header: dict | list, data: bytes) -> Path:
    """A safetensors file written by hand, so that a header may lie about its data."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(begin: int, end: int, *shape: int) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


def test_safetensors_header_edge_cases(tmp_path: Path) -> None:
    """What the safetensors library writes is read (no tensors at all, a 0-size tensor); a tensor
    that starts before the data, or a later one cut off by a truncated file, is refused."""
    from safetensors.numpy import save_file

    from moeplace.models.checkpoint import read_safetensors_header

    save_file({}, str(tmp_path / "empty.safetensors"), metadata={"format": "pt"})  # header fills the file
    assert read_safetensors_header(tmp_path / "empty.safetensors") == ({}, {"format": "pt"})
    save_file({"a": np.zeros((0, 3), np.float32), "b": np.ones(2, np.float32)}, str(tmp_path / "zero.safetensors"))
    entries, metadata = read_safetensors_header(tmp_path / "zero.safetensors")
    base = (tmp_path / "zero.safetensors").stat().st_size - 8  # data section: b's 8 bytes at the end
    assert metadata is None and entries["a"].begin == entries["a"].end == base and entries["b"].end == base + 8
    assert entries["b"].shape == (2,) and entries["a"].shape == (0, 3)

    before = _shard(tmp_path / "before.safetensors", {"a": _f32(0, 8, 2), "b": _f32(-4, 4, 2)}, bytes(8))
    with pytest.raises(CheckpointError, match="before.safetensors: truncated or corrupt"):
        read_safetensors_header(before)
    cut = _shard(tmp_path / "cut.safetensors", {"a": _f32(0, 8, 2), "b": _f32(8, 16, 2)}, bytes(12))
    size = cut.stat().st_size  # b's data is 4 bytes short
    with pytest.raises(CheckpointError, match=rf"cut.safetensors: truncated or corrupt: .* \({size} bytes\)"):
        read_safetensors_header(cut)
    short = tmp_path / "short.safetensors"  # a header 4 bytes longer than the file holds (under the cap)
    short.write_bytes(struct.pack("<Q", 12) + b'{"a": 1}')
    with pytest.raises(CheckpointError, match=r"not a safetensors file or truncated \(header of 12 bytes\)"):
        read_safetensors_header(short)
    short.write_bytes(b"\x08\x00\x00")
    with pytest.raises(CheckpointError, match=r"short.safetensors: truncated \(no safetensors header\)"):
        read_safetensors_header(short)
    listed = _shard(tmp_path / "list.safetensors", [], b"")
    with pytest.raises(CheckpointError, match=r"list.safetensors: malformed safetensors header$"):
        read_safetensors_header(listed)
    bad = _shard(tmp_path / "bad.safetensors", {"a": _f32(0, 6, 2)}, bytes(6))
    with pytest.raises(CheckpointError, match=r"tensor a holds 6 bytes, but F32 \[2\] needs 8 \(corrupt header\)"):
        read_safetensors_header(bad)


def _moe_dir(root: Path, tensors: dict[str, tuple[int, ...]], config: dict | None = None) -> Path:
    from safetensors.numpy import save_file

    root.mkdir()
    save_file({k: np.zeros(shape, np.float32) for k, shape in tensors.items()}, str(root / "model.safetensors"))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def _layer(layer: int, experts: int = 4, block: str = "mlp") -> dict[str, tuple[int, ...]]:
    return {f"model.layers.{layer}.{block}.gate.weight": (experts, 3),
            **{f"model.layers.{layer}.{block}.experts.{e}.w": (2,) for e in range(experts)}}


def test_moe_blocks_come_in_decoder_order_past_ten_layers(tmp_path: Path) -> None:
    """A placement's row l is the l-th MoE layer in decoder order: layer 10 sorts after 9 and 2,
    not between them as its name does ("layers.10" < "layers.2")."""
    ckpt = open_checkpoint(_moe_dir(tmp_path / "m", {**_layer(2), **_layer(9), **_layer(10), **_layer(11)},
                                    {"num_hidden_layers": 12}))
    blocks = moe_blocks(ckpt)
    assert [(b.layer, b.prefix) for b in blocks] == [(layer, f"model.layers.{layer}.mlp") for layer in (2, 9, 10, 11)]
    assert blocks[2].per_expert[3] == ("model.layers.10.mlp.experts.3.w",)


@pytest.mark.parametrize("tensors, config, match", [
    ({**_layer(0), **_layer(0, block="moe")}, None, "more than one MoE block in a decoder layer"),
    ({**_layer(0), **_layer(1, experts=6)}, None, "MoE layers have different expert counts"),
    ({**_layer(0), **_layer(1)}, {"text_config": {"n_routed_experts": 8}},
     "config.json n_routed_experts is 8, but the weights hold 4 experts"),
    (_layer(0), {"num_local_experts": 6}, "config.json num_local_experts is 6, but the weights hold 4 experts"),
    ({"model.layers.0.mlp.gate.weight": (0, 3), "model.layers.0.mlp.experts.0.w": (2,)}, None,
     "no [experts, hidden] router"),
    ({"model.layers.0.mlp.gate.weight": (4,), "model.layers.0.mlp.experts.0.w": (2,)}, None,
     "no [experts, hidden] router"),
])
def test_moe_layouts_moeplace_cannot_renumber_are_refused(tmp_path: Path, tensors: dict, config: dict | None,
                                                          match: str) -> None:
    with pytest.raises(CheckpointError, match=re.escape(match)):
        moe_blocks(open_checkpoint(_moe_dir(tmp_path / "m", tensors, config)))


def test_index_disagreement_names_the_tensor(tmp_path: Path) -> None:
    root = _moe_dir(tmp_path / "m", _layer(0))
    weight_map = {k: "model.safetensors" for k in _layer(0)}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**weight_map, "ghost": "model.safetensors"}}))
    with pytest.raises(CheckpointError, match=re.escape("the shards disagree (e.g. ['ghost'])")):
        open_checkpoint(root)
    del weight_map["model.layers.0.mlp.experts.2.w"]  # a tensor in the shard that the index leaves out
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=re.escape("the shards disagree (e.g. ['model.layers.0.mlp.experts.2.w'])")):
        open_checkpoint(root)


def test_a_moe_block_lists_exactly_its_expert_and_router_tensors(tmp_path: Path) -> None:
    """Qwen2-MoE's shared_expert_gate [1, H] sits beside the router but scores no routed expert:
    it is neither renumbered nor counted as a per-tensor scale; nor is a dense layer's gate_proj."""
    from moeplace.models.checkpoint import MoeBlock

    moe = "model.layers.0.mlp"
    ckpt = open_checkpoint(_moe_dir(tmp_path / "m", {
        **_layer(0), f"{moe}.gate.e_score_correction_bias": (4,), f"{moe}.experts.input_scale": (),
        f"{moe}.shared_expert_gate.weight": (1, 3), f"{moe}.shared_expert.gate_proj.weight": (2, 3),
        "model.layers.1.mlp.gate_proj.weight": (2, 3)}, {"num_experts": 4}))
    assert moe_blocks(ckpt) == [MoeBlock(
        layer=0, prefix=moe, num_experts=4, per_expert={e: (f"{moe}.experts.{e}.w",) for e in range(4)}, fused=(),
        router=(f"{moe}.gate.e_score_correction_bias", f"{moe}.gate.weight"), shared=(f"{moe}.experts.input_scale",))]


def test_directories_that_do_not_say_which_files_form_the_model(tmp_path: Path) -> None:
    """Two shards and no index (e.g. model.safetensors beside consolidated.safetensors) would be
    merged into one model; an index naming a missing shard, or a config that is no object, is refused."""
    root = _moe_dir(tmp_path / "m", _layer(0))
    (root / "consolidated.safetensors").write_bytes((root / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="2 .safetensors files but no model.safetensors.index.json"):
        open_checkpoint(root)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard gone.safetensors listed in model.safetensors.index.json is missing"):
        open_checkpoint(root)
    (root / "model.safetensors.index.json").unlink()
    (root / "consolidated.safetensors").unlink()
    (root / "config.json").write_text("[4]")
    with pytest.raises(CheckpointError, match=r"config.json: not a JSON object"):
        open_checkpoint(root)
