"""Rank-local model loading: only this rank's experts, per-expert and fused checkpoints, bad files."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moeplace.errors import MoeplaceError
from moeplace.models.tiny import build_tiny_model
from moeplace.serve.coherent import moe_coherent
from moeplace.serve.counters import Counters
from moeplace.serve.dist import Comm
from moeplace.serve.generate import Runtime
from moeplace.serve.model import KVCache, RankModel, read_spec, rms_norm
from moeplace.serve.replicas import ExpertMap
from moeplace.serve.standard import moe_standard

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


def test_generate_refuses_no_prompt_and_an_empty_prompt(mixtral: Path) -> None:
    rt = runtime(mixtral)
    for prompts in ([], [[3, 4], []], [[], [5]]):
        with pytest.raises(ValueError, match="at least one prompt and no empty prompt"):
            rt.generate(prompts, [2] * len(prompts))


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
    # a bound past the cache's end (generate's grows by one per step, past a short-budget longest prompt)
    check([(2, 6), (0, 9)], one_per_slot=True, context=20)
    check([(0, p) for p in range(10)])  # a whole prefill in order: the is_causal path unless a window


def test_counters_merged_over_ranks_and_summarised() -> None:
    """Two ranks' counters summed as merged_counters does (one all-reduce of as_vector): a
    collective and a step are counted once, rows and bytes add up. Figures by hand."""
    vectors = []
    for rank in range(2):
        c = Counters(num_moe_layers=2)
        c.phase = "prefill"
        c.record("dispatch", 1, 10, 0)
        c.steps["prefill"], c.tokens["prefill"] = 1, 5
        c.phase = "decode"
        for _ in range(3):
            for layer in range(2):
                c.record("dispatch", rank + layer + 1, 100 * (rank + layer + 1), layer)
                c.record("combine", 1, 100, layer)
            c.record("tokens", 0, 8)
        c.record("counts", 1, 8)  # no layer: totals only
        c.steps["decode"], c.tokens["decode"] = 3, 6
        for layer in range(2):  # expert load: an int here, a 0-d tensor in the runtime (kept on its device)
            c.record_served(layer, torch.tensor(4 * rank + layer + 1))
            c.record_served(layer, 1)
        vectors.append(c.as_vector(rank, 2))
    merged = Counters.from_vector(2, [a + b for a, b in zip(*vectors)], world=2)
    s = merged.summary("decode", per_token=True)
    assert (s["steps"], s["tokens_processed"]) == (3, 6)
    assert s["dispatch"] == {"collectives": 6, "rows": 24, "bytes": 2400}  # 3 steps x (1+2 + 2+3) rows
    assert s["combine"] == {"collectives": 6, "rows": 12, "bytes": 1200}
    assert s["tokens"] == {"collectives": 3, "rows": 0, "bytes": 48}
    assert s["counts"] == {"collectives": 1, "rows": 2, "bytes": 16}
    assert s["kv_sync"] == s["routing"] == {"collectives": 0, "rows": 0, "bytes": 0}
    assert s["alltoall_bytes"] == 3600 and s["alltoall_bytes_per_step"] == 1200
    assert s["alltoalls_per_layer_step"] == 2.0  # (6 dispatch + 6 combine) / (3 steps x 2 layers)
    assert s["collectives_per_step"] == pytest.approx(16 / 3)
    assert s["cross_rank_rows_per_layer"] == [15, 21]  # dispatch 9 + combine 6; 15 + 6
    assert s["alltoall_bytes_per_token"] == 600 and s["all_bytes_per_token"] == pytest.approx(3664 / 6)
    # each rank's load in its own column, summed by the same all-reduce: [layer][rank]
    assert s["rank_expert_tokens_per_layer"] == [[2, 6], [3, 7]] and s["rank_expert_tokens"] == [5, 13]
    assert s["imbalance_per_layer"] == [1.5, 1.4]  # max / mean, eval's definition
    assert merged.summary("prefill")["rank_expert_tokens_per_layer"] == [[0, 0], [0, 0]]
    p = merged.summary("prefill")
    assert (p["steps"], p["tokens_processed"], p["dispatch"]["collectives"], p["dispatch"]["bytes"]) == (1, 5, 1, 20)
    assert p["cross_rank_rows_per_layer"] == [2, 0] and p["combine"]["collectives"] == 0
    assert p["alltoalls_per_layer_step"] == 0.5  # 1 dispatch, no combine / (1 step x 2 layers)
    # before any request (what /metrics shows at start): zeros, no division by 0, also once merged
    for empty in (Counters(2), Counters.from_vector(2, [2 * x for x in Counters(2).as_vector(0, 2)], world=2)):
        e = empty.summary("decode", per_token=True)
        assert (e["steps"], e["tokens_processed"], e["alltoall_bytes"], e["alltoall_bytes_per_step"]) == (0, 0, 0, 0)
        assert e["cross_rank_rows_per_layer"] == [0, 0] and "alltoall_bytes_per_token" not in e
        assert e["alltoalls_per_layer_step"] == e["collectives_per_step"] == 0
        assert e.get("imbalance_per_layer", [1.0, 1.0]) == [1.0, 1.0]  # no load: balanced, as eval says
    with pytest.raises(ValueError, match="longer than its layout"):  # a vector of another world size
        Counters.from_vector(2, Counters(2).as_vector(0, 4), world=2)
    assert Counters(0).summary("decode")["alltoalls_per_layer_step"] == 0  # no MoE layer: no division by 0
    assert {key[2] for key in c.per_layer} == {0, 1}  # the counts collective has no layer entry
    assert merged.per_layer[("decode", "dispatch", 0)] == [3, 9, 900]  # [collectives, rows, bytes]


def serving_on_all_ranks(emap: ExpertMap, ids: list[list[int]], rows: list[list[int]],
                         batch_size: int) -> list[list[list[int]]]:
    """ExpertMap.serving of MoE layer 0 on each rank of len(ids), in one process: a first pass
    collects each rank's routing table, a second gives every rank their all-reduced max."""
    world, cpu, tables = len(ids), torch.device("cpu"), []

    class Collect(Comm):
        def max_reduce(self, values: torch.Tensor, kind: str) -> torch.Tensor:
            tables.append(values.clone())
            return values

    class Reduced(Comm):
        def max_reduce(self, values: torch.Tensor, kind: str) -> torch.Tensor:
            return torch.stack(tables).amax(0)

    out = []
    for comm_type in (Collect, Reduced):
        out = [emap.serving(comm_type(r, world, cpu, Counters(1)), 0, torch.tensor(ids[r]).view(-1, 1),
                            torch.tensor(rows[r]), batch_size).tolist() for r in range(world)]
    return out


def test_replica_choice_ignores_the_rows_of_finished_sequences() -> None:
    """A decode step's global batch has one row per slot; a finished sequence's row is absent (-1
    in the all-reduced table) and must not count as load. Expert 0: primary on rank 1, copy on
    rank 2; rank 0 holds neither, so its token goes to the least-loaded copy: ranks 1 and 2 each
    serve one single-copy expert, the tie goes to the primary. Counting the absent row 0 (as
    rank 0's, expert 0, taking rank 1 first) would send it to rank 2."""
    emap = ExpertMap(torch.tensor([[1, 1, 2]]), [[[1, 2], [1], [2]]], gpus_per_node=3)
    ids, rows = [[0], [1], [2]], [[1], [2], [3]]  # rank r: one token of expert r, global row r + 1
    assert serving_on_all_ranks(emap, ids, rows, 4) == [[[1]], [[1]], [[2]]]
    # the same as the batch without the absent row
    assert serving_on_all_ranks(emap, ids, [[0], [1], [2]], 3) == [[[1]], [[1]], [[2]]]
    # two tokens of expert 0 on rank 0 split over its copies, in batch order
    assert serving_on_all_ranks(emap, [[0, 0], [1], [2]], [[1, 3], [2], [4]], 5) == [[[1], [2]], [[1]], [[2]]]


@dataclasses.dataclass
class ThreadComm(Comm):
    """A rank run as a thread of this process: Alltoalls through a mailbox all ranks share."""

    mailbox: dict[int, tuple[torch.Tensor, ...]] = dataclasses.field(default_factory=dict)
    barrier: threading.Barrier = dataclasses.field(default_factory=lambda: threading.Barrier(1))

    def alltoall(self, rows: torch.Tensor, send_counts: list[int], kind: str, layer: int | None = None,
                 recv_counts: list[int] | None = None) -> tuple[torch.Tensor, list[int]]:
        self.mailbox[self.rank] = rows.split(send_counts)
        self.barrier.wait()
        got = [self.mailbox[src][self.rank] for src in range(self.world)]
        self.barrier.wait()  # every rank has read its rows before the next Alltoall refills the mailbox
        counts = [g.shape[0] for g in got]
        # a receiver that says what arrives (combine) must expect exactly what the senders send
        assert recv_counts is None or recv_counts == counts, (kind, self.rank, recv_counts, counts)
        remote = sum(send_counts) - send_counts[self.rank]
        self.counters.record(kind, remote, remote * rows.shape[1] * rows.element_size(), layer)
        return torch.cat(got), counts


def on_ranks(world: int, fn: Callable[[ThreadComm], Any]) -> list[Any]:
    """fn(comm) on each of `world` ranks at once (threads); a rank that raises fails the others."""
    mailbox: dict[int, tuple[torch.Tensor, ...]] = {}
    barrier = threading.Barrier(world, timeout=60)
    comms = [ThreadComm(r, world, torch.device("cpu"), Counters(1), mailbox, barrier) for r in range(world)]

    def body(comm: ThreadComm) -> Any:
        try:
            return fn(comm)
        except BaseException:
            barrier.abort()
            raise

    with ThreadPoolExecutor(world) as pool:
        return [f.result() for f in [pool.submit(body, c) for c in comms]]


@pytest.mark.parametrize("mode, top_k", [("standard", 2), ("coherent", 2), ("coherent", 1)])
def test_moe_layer_on_three_ranks_matches_one_rank_holding_every_expert(mixtral: Path, mode: str, top_k: int) -> None:
    """One top-k MoE layer, expert e on rank e % 3, token t (slot t) on rank t % 3, routing drawn
    at random: h + moe(h) equals one rank holding every expert; standard keeps each token where it
    is, coherent moves it to its top-1 expert's rank (slot-sorted); cross-rank rows per token are
    the modules' figures: |D - {here}| each way in standard, |D - {here}| dispatch and |D| - 1
    combine in coherent (D = the ranks serving its choices); coherent top-1 has no combine at all."""
    spec = dataclasses.replace(read_spec(mixtral), top_k=top_k)
    world, n, k, experts = 3, 24, spec.top_k, spec.num_experts
    gen = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(n)])
    # rank 2 computes partials of slot 23 (the largest) for rank 0 and of slot 0 for rank 1: its
    # combine rows must go grouped by rank, then by slot
    ids[0], ids[n - 1] = torch.tensor([1, 2]), torch.tensor([0, 2])
    ids = ids[:, :k]
    weights, h = torch.rand(n, k, generator=gen), torch.randn(n, spec.hidden_size, generator=gen)
    full = RankModel(spec, [list(range(experts))] * len(spec.moe_layers), torch.device("cpu"), torch.float32)
    want = h + full.experts(0, h, ids, weights)
    rank_of = torch.arange(experts) % world
    here = torch.arange(n) % world
    models = [RankModel(spec, [[e for e in range(experts) if e % world == r]] * len(spec.moe_layers),
                        torch.device("cpu"), torch.float32) for r in range(world)]

    def layer(comm: ThreadComm) -> tuple[torch.Tensor, torch.Tensor, Counters]:
        mine = torch.nonzero(here == comm.rank)[:, 0]
        args = (models[comm.rank], comm, 0, h[mine], mine, ids[mine], weights[mine], rank_of[ids[mine]])
        if mode == "standard":
            return moe_standard(*args), mine, comm.counters
        return (*moe_coherent(*args), comm.counters)

    results = on_ranks(world, layer)
    top1_rank = rank_of[ids[:, 0]]
    for rank, (out, slots, _) in enumerate(results):
        where = here if mode == "standard" else top1_rank
        assert slots.tolist() == torch.nonzero(where == rank)[:, 0].tolist()
        torch.testing.assert_close(out, want[slots])
    serving = [set(rank_of[ids[t]].tolist()) for t in range(n)]
    away = sum(len(d - {int(here[t])}) for t, d in enumerate(serving))
    back = away if mode == "standard" else sum(len(d) - 1 for d in serving)
    assert 0 < back != away or mode == "standard" or top_k == 1  # the draw has tokens where the figures differ
    rows = {kind: sum(c.totals[("decode", kind)][1] for _, _, c in results) for kind in ("dispatch", "combine")}
    assert rows == {"dispatch": away, "combine": back}
    combines = 0 if mode == "coherent" and top_k == 1 else 1  # collectives each rank issues
    assert [c.totals[("decode", "combine")][0] for _, _, c in results] == [combines] * world


def test_rms_norm_by_hand() -> None:
    # mean square of [3, 4] is 12.5; with eps 3.5 the scale is 1 / sqrt(16) = 0.25, then the weight
    x, weight = torch.tensor([[3.0, 4.0]]), torch.tensor([1.0, 2.0])
    torch.testing.assert_close(rms_norm(x, weight, 3.5), torch.tensor([[0.75, 2.0]]))
    # computed in float32, returned in the input's dtype
    half = rms_norm(x.to(torch.bfloat16), weight.to(torch.bfloat16), 3.5)
    assert half.dtype == torch.bfloat16 and half.tolist() == [[0.75, 2.0]]


def test_kv_cache_rows_follow_the_stride(mixtral: Path) -> None:
    """Stride = world keeps only ceil(slots / world) rows: slot s in row s // stride."""
    spec, cpu = read_spec(mixtral), torch.device("cpu")
    assert KVCache(spec, 5, 4, cpu, torch.float32).k.shape[1] == 5  # default stride 1: every slot
    cache = KVCache(spec, 5, 4, cpu, torch.float32, stride=2)
    assert cache.k.shape == (spec.num_layers, 3, spec.num_kv_heads, 4, spec.head_dim) and cache.max_len == 4
    k = torch.randn(2, spec.num_kv_heads, spec.head_dim)
    cache.write(1, torch.tensor([4, 2]), torch.tensor([3, 0]), k, -k)
    torch.testing.assert_close(cache.k[1, 2, :, 3], k[0])  # slot 4 -> row 2
    torch.testing.assert_close(cache.v[1, 1, :, 0], -k[1])  # slot 2 -> row 1
    keys, values = cache.read(1, torch.tensor([4]), 4)
    assert keys.shape == (1, spec.num_kv_heads, 4, spec.head_dim)
    torch.testing.assert_close(keys[0, :, 3], k[0])
    assert cache.read(1, torch.tensor([4]))[0].shape[2] == 4  # default: every position
    assert not cache.k[0].any() and not cache.k[1, 0].any()  # nothing else written


def _by_hand(path: Path, layer: int, h: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The checkpoint's tensors and the post-attention RMSNorm of h, computed from the file."""
    spec, tensors = read_spec(path), load_file(path / "model.safetensors")
    weight = tensors[f"model.layers.{layer}.post_attention_layernorm.weight"]
    return tensors, weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + spec.rms_eps)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_is_softmax_then_top_k(mixtral: Path, renormalize: bool) -> None:
    """Router logits -> softmax over all experts -> the k largest, descending; renormalised
    weights sum to 1 (Mixtral), raw ones are the softmax probabilities (OLMoE, Qwen3 off)."""
    spec = dataclasses.replace(read_spec(mixtral), renormalize=renormalize)
    model = RankModel(spec, [[] for _ in spec.moe_layers], torch.device("cpu"), torch.float32)
    h = torch.randn(6, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    tensors, x = _by_hand(mixtral, 1, h)
    probs = torch.softmax(x.double() @ tensors["model.layers.1.block_sparse_moe.gate.weight"].double().T, dim=1)
    ids, weights = model.route(1, h)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32 and ids.shape == (6, spec.top_k)
    want = probs.sort(dim=1, descending=True)
    assert ids.tolist() == want.indices[:, :2].tolist()
    top = want.values[:, :2]
    torch.testing.assert_close(weights.double(), top / top.sum(1, keepdim=True) if renormalize else top)


def test_renormalisation_follows_each_family(tmp_path: Path) -> None:
    # Qwen3-MoE follows norm_topk_prob (transformers' default False); OLMoE's tiny config leaves it False
    qwen = build_tiny_model("qwen3_moe", tmp_path / "qwen", num_experts=4, top_k=2, num_layers=2)
    olmoe = build_tiny_model("olmoe", tmp_path / "olmoe", num_experts=4, top_k=2, num_layers=2)
    assert read_spec(qwen).renormalize and not read_spec(olmoe).renormalize
    config = json.loads((qwen / "config.json").read_text())
    for value in (False, None):
        cfg = {k: v for k, v in config.items() if k != "norm_topk_prob"}
        (qwen / "config.json").write_text(json.dumps(cfg if value is None else cfg | {"norm_topk_prob": value}))
        assert not read_spec(qwen).renormalize


def test_experts_sum_the_weighted_swiglu_of_local_choices(mixtral: Path) -> None:
    """out[t] = sum over choices j of token t served here: weights[t, j] * down(silu(gate x) * up x);
    choices of other ranks' experts, and negative ids, add nothing."""
    spec = read_spec(mixtral)
    local = [[0, 2], [1, 6]]
    model = RankModel(spec, local, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(4, spec.hidden_size, generator=gen)
    ids = torch.tensor([[6, 1], [3, 6], [-1, 7], [0, 5]])  # expert 1 has one token; tokens 2, 3 none here
    weights = torch.rand(4, 2, generator=gen)
    tensors, x = _by_hand(mixtral, 1, h)
    want = torch.zeros_like(h)
    for t in range(4):
        for j, e in enumerate(ids[t].tolist()):
            if e in local[1]:
                w = {n: tensors[f"model.layers.1.block_sparse_moe.experts.{e}.{n}.weight"] for n in ("w1", "w2", "w3")}
                want[t] += weights[t, j] * (w["w2"] @ (F.silu(w["w1"] @ x[t]) * (w["w3"] @ x[t])))
    got = model.experts(1, h, ids, weights)
    torch.testing.assert_close(got, want)
    assert not got[2:].any() and want[0].abs().sum() > 0
