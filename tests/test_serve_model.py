"""Rank-local model loading: only this rank's experts, per-expert and fused checkpoints, bad files."""

from __future__ import annotations

import dataclasses
import json
import math
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
from moeplace.serve.model import KVCache, RankModel, read_spec, rms_norm
from moeplace.serve.replicas import ExpertMap

PROMPTS = [[3, 4, 5], [9, 8]]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("serve-model") / "mixtral", num_experts=8, top_k=2,
                            num_layers=2, seed=4)


def runtime(path: Path, experts: list[list[int]] | None = None) -> Runtime:
    spec = read_spec(path)
    local = experts or [list(range(spec.num_experts))] * len(spec.moe_layers)
    model = RankModel(spec, local, torch.device("cpu"), torch.float32)
    return Runtime(model, Comm(0, 1, torch.device("cpu"), Counters(len(spec.moe_layers))),
                   ExpertMap(torch.zeros(len(spec.moe_layers), spec.num_experts, dtype=torch.int64),
                             [None] * len(spec.moe_layers), 1))


def greedy(path: Path, experts: list[list[int]] | None = None) -> tuple[RankModel, list[list[int]]]:
    rt = runtime(path, experts)
    return rt.model, rt.generate(PROMPTS, [4, 4], ignore_eos=True).tokens


def test_mixtral_renormalises_whatever_its_config_says(mixtral: Path, tmp_path: Path) -> None:
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


def test_generate_refuses_more_positions_than_the_model_has(mixtral: Path) -> None:
    rt = runtime(mixtral)
    assert rt.model.spec.max_positions == 256
    # RoPE past max_position_embeddings is silently wrong: the Python API refuses like the CLI/HTTP do
    with pytest.raises(MoeplaceError, match="prompt 1: 250 prompt tokens [+] 7 new exceed the model's 256 positions"):
        rt.generate([[3, 4], [5] * 250], [7, 7], ignore_eos=True)
    assert [len(t) for t in rt.generate([[3, 4], [5] * 250], [7, 6], ignore_eos=True).tokens] == [7, 6]


def naive_attention(model: RankModel, layer: int, h: torch.Tensor) -> torch.Tensor:
    """h + attention of one whole sequence h [L, H] from position 0: a loop per token and head."""
    s, w = model.spec, model.layers[layer]
    n, group = h.shape[0], s.num_heads // s.num_kv_heads
    x = rms_norm(h, w["in_norm"], s.rms_eps)
    q, k, v = ((x @ w[c].T).view(n, -1, s.head_dim) for c in ("q", "k", "v"))
    inv_freq = s.rope_theta ** (-torch.arange(0, s.head_dim, 2).double() / s.head_dim)
    angle = torch.arange(n).double()[:, None] * inv_freq
    cos, sin = (torch.cat([f(angle), f(angle)], dim=-1).float()[:, None] for f in (torch.cos, torch.sin))

    def rope(t: torch.Tensor) -> torch.Tensor:
        half = s.head_dim // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    q, k = rope(q), rope(k)
    out = torch.zeros(n, s.num_heads, s.head_dim)
    for i in range(n):
        lo = 0 if s.sliding_window is None else max(0, i - s.sliding_window + 1)
        for head in range(s.num_heads):
            kv = head // group  # GQA: consecutive query heads share a K/V head
            probs = torch.softmax(k[lo:i + 1, kv] @ q[i, head] / math.sqrt(s.head_dim), dim=0)
            out[i, head] = probs @ v[lo:i + 1, kv]
    return h + out.flatten(1) @ w["o"].T


@pytest.mark.parametrize("window, stride", [(None, 1), (3, 2)])
def test_attention_matches_naive_reference(mixtral: Path, window: int | None, stride: int) -> None:
    """Prefill (rows shuffled across sequences), a chunk after cached tokens, then decode steps."""
    spec = dataclasses.replace(read_spec(mixtral), sliding_window=window)
    assert spec.num_heads == 2 * spec.num_kv_heads  # GQA
    model = RankModel(spec, [[] for _ in spec.moe_layers], torch.device("cpu"), torch.float32)
    lengths = {0: 10, 2: 7}  # with stride 2 both slots are homed on rank 0: cache rows 0 and 1
    gen = torch.Generator().manual_seed(0)
    hidden = {slot: torch.randn(n, spec.hidden_size, generator=gen) for slot, n in lengths.items()}
    layer = 1
    want = {slot: naive_attention(model, layer, h) for slot, h in hidden.items()}
    cache = KVCache(spec, 3, 12, torch.device("cpu"), torch.float32, stride=stride)

    def check(rows: list[tuple[int, int]], one_per_slot: bool = False, context: int | None = None) -> None:
        slots, positions = (torch.tensor(c) for c in zip(*rows))
        h = torch.stack([hidden[s][p] for s, p in rows])
        got, _, _ = model.attention(layer, h, slots, positions, cache, one_per_slot=one_per_slot, context=context)
        torch.testing.assert_close(got, torch.stack([want[s][p] for s, p in rows]))

    prefill = [(0, p) for p in range(5)] + [(2, p) for p in range(4)]
    check([prefill[i] for i in torch.randperm(len(prefill), generator=gen).tolist()])
    check([(2, 4), (0, 5), (0, 6), (0, 7)])  # chunks that start after cached positions
    for step in range(2):
        check([(2, 5 + step), (0, 8 + step)], one_per_slot=True)
    # a decode step reading only the cache positions a host-side bound allows (here the tight one)
    check([(2, 6), (0, 9)], one_per_slot=True, context=10)  # the last step again: same K/V written
