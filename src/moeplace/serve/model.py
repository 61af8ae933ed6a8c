"""The rank-local model: replicated non-expert weights plus only this rank's experts.

Small direct torch (gpt-fast style) for the Mixtral / Qwen3-MoE / OLMoE family: pre-norm
decoder layers of RoPE attention (GQA, optional q/k RMSNorm) and a top-k softmax router over
SwiGLU experts. Weights are read straight from the checkpoint's safetensors with `safe_open`,
key by key (or slice by slice for fused [E, ...] expert tensors), so no rank ever holds the
experts of other ranks. `read_spec` needs only config.json and the safetensors headers: it runs
before any weight is read, which is when a placement for another model is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open

from moeplace.errors import MoeplaceError
from moeplace.io import read_json
from moeplace.models.checkpoint import moe_blocks, open_checkpoint
from moeplace.models.config import attention_shape, config_size

# model_type -> (q/k norm kind, top-k weights renormalised when config lacks norm_topk_prob)
FAMILIES: dict[str, tuple[str, bool]] = {
    "mixtral": ("none", True),
    "qwen3_moe": ("head", False),
    "olmoe": ("full", False),
}
# per-expert weight names: (gate, up, down)
_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and key names of a checkpoint; built without reading a single weight."""

    path: Path
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int  # decoder layers
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    qk_norm: str  # "none" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    clip_qkv: float | None
    sliding_window: int | None
    moe_layers: tuple[int, ...]  # decoder layer index of each MoE layer
    moe_prefix: tuple[str, ...]  # key prefix of each MoE block ("model.layers.3.mlp")
    num_experts: int
    top_k: int
    renormalize: bool  # divide the top-k gate weights by their sum
    fused_experts: bool  # experts stored as [E, 2I, H] gate_up_proj + [E, H, I] down_proj
    expert_names: tuple[str, str, str]
    tie_embeddings: bool
    eos_token_ids: tuple[int, ...]
    max_positions: int  # context limit (max_position_embeddings)
    files: dict[str, str]  # tensor key -> safetensors file


def read_spec(model_dir: str | Path) -> ModelSpec:
    """Parse config.json and the safetensors headers of `model_dir` (no weights are read)."""
    try:
        return _read_spec(Path(model_dir))
    except (KeyError, TypeError, ValueError) as e:
        raise MoeplaceError(f"{model_dir}: config.json lacks or mistypes a field ({type(e).__name__}: {e})") from None


def _read_spec(path: Path) -> ModelSpec:
    if not (path / "config.json").is_file():
        raise MoeplaceError(f"{path}: no config.json (expected a save_pretrained checkpoint directory)")
    ckpt = open_checkpoint(path)  # the same reader as `moeplace permute-checkpoint`
    cfg: dict[str, Any] = ckpt.config
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise MoeplaceError(f"{path}: model_type {family!r} is not served (supported: {', '.join(FAMILIES)})")
    files = {k: str(f) for k, f in ckpt.files().items()}
    qk_norm, renorm_default = FAMILIES[family]
    where = f"{path}: config.json"
    num_layers = config_size(cfg, where, "num_hidden_layers")
    rope = cfg.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise MoeplaceError(f"{path}: rope_type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    blocks = moe_blocks(ckpt)
    moe_layers = tuple(b.layer for b in blocks)
    prefixes = tuple(b.prefix for b in blocks)
    for i in range(num_layers):
        if i not in moe_layers and f"model.layers.{i}.mlp.gate_proj.weight" not in files:
            raise MoeplaceError(f"{path}: decoder layer {i} has neither routed experts nor a dense MLP")
    fused = not blocks[0].per_expert
    names = next((n for n in _EXPERT_NAMES if f"{prefixes[0]}.experts.0.{n[0]}.weight" in files), None)
    if not fused and names is None:
        raise MoeplaceError(f"{path}: unrecognised expert weights under {prefixes[0]}.experts")
    hidden, heads, kv_heads, head_dim = attention_shape(cfg, where)
    vocab = config_size(cfg, where, "vocab_size")
    eos = _eos_token_id(path, cfg)
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    spec = ModelSpec(
        path=path,
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        qk_norm=qk_norm,
        clip_qkv=cfg.get("clip_qkv"),
        sliding_window=int(window) if window else None,
        moe_layers=moe_layers,
        moe_prefix=prefixes,
        num_experts=blocks[0].num_experts,
        top_k=config_size(cfg, where, "num_experts_per_tok"),
        # Mixtral always renormalises its top-k gate weights (transformers has no switch for it,
        # even when a config carries norm_topk_prob); the others follow norm_topk_prob
        renormalize=True if family == "mixtral" else bool(cfg.get("norm_topk_prob", renorm_default)),
        fused_experts=fused,
        expert_names=names or _EXPERT_NAMES[0],
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in files,
        eos_token_ids=tuple(e for e in eos_ids if 0 <= e < vocab),
        max_positions=config_size(cfg, where, "max_position_embeddings", default=4096),
        files=files,
    )
    _check_config(spec, ckpt.shapes())
    return spec


def _eos_token_id(path: Path, cfg: dict[str, Any]) -> Any:
    """The EOS id(s) transformers' `generate` stops at: generation_config.json's when the file
    exists (Qwen3 lists two there, one in config.json; none there means none), else config.json's."""
    gen = path / "generation_config.json"
    if gen.is_file():
        gen_cfg = read_json(gen, MoeplaceError)
        return gen_cfg.get("eos_token_id") if isinstance(gen_cfg, dict) else None
    return cfg.get("eos_token_id")


def _check_config(s: ModelSpec, shapes: dict[str, tuple[int, ...]]) -> None:
    """config.json against the tensors the checkpoint holds (headers only): a mismatch would
    otherwise surface mid-forward as a shape error, or not at all (a wrong vocab_size)."""
    if not 1 <= s.top_k <= s.num_experts:
        raise MoeplaceError(f"{s.path}: config.json num_experts_per_tok {s.top_k} is not in [1, {s.num_experts}] "
                            f"(the checkpoint's routers have {s.num_experts} experts)")
    p = "model.layers.0"
    expect: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (s.vocab_size, s.hidden_size),
        f"{p}.self_attn.q_proj.weight": (s.num_heads * s.head_dim, s.hidden_size),
        f"{p}.self_attn.k_proj.weight": (s.num_kv_heads * s.head_dim, s.hidden_size),
        f"{s.moe_prefix[0]}.gate.weight": (s.num_experts, s.hidden_size),
    }
    if s.qk_norm != "none":  # the family decides which norms exist: a wrong model_type shows here
        q_norm = f"{p}.self_attn.q_norm.weight"
        expect[q_norm] = (s.head_dim,) if s.qk_norm == "head" else (s.num_heads * s.head_dim,)
    for key, shape in expect.items():
        found = shapes.get(key)
        if found is None:
            raise MoeplaceError(f"{s.path}: tensor {key} is missing (model_type {s.family!r} expects it)")
        if tuple(found) != shape:
            raise MoeplaceError(f"{s.path}: tensor {key} is {list(found)}, config.json implies {list(shape)} "
                                "(config.json does not match the weights)")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys (post-RoPE) and values: [layers, rows, kv_heads, max_len, head_dim].

    Sequence slot s lives in row s // stride: stride 1 holds every sequence (context-coherent
    mode replicates all contexts on every rank); stride = world holds only the slots homed on
    this rank (s % world == rank), as classic expert parallelism needs.
    """

    def __init__(self, spec: ModelSpec, num_slots: int, max_len: int, device: torch.device, dtype: torch.dtype,
                 stride: int = 1):
        shape = (spec.num_layers, -(-num_slots // stride), spec.num_kv_heads, max_len, spec.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.stride = stride

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [n, kv_heads, head_dim] of tokens at (slot, position)."""
        rows = slots // self.stride
        self.k[layer, rows, :, positions] = k
        self.v[layer, rows, :, positions] = v

    def read(self, layer: int, slots: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the given slots' first `length` positions (default all): [n, kv_heads, length, head_dim] each."""
        rows = slots // self.stride
        length = self.max_len if length is None else length
        return self.k[layer, rows, :, :length], self.v[layer, rows, :, :length]

    def sequence(self, layer: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of K, V of one slot's first `length` positions: [kv_heads, length, head_dim]."""
        row = slot // self.stride
        return self.k[layer, row, :, :length], self.v[layer, row, :, :length]


class RankModel:
    """Weights one rank holds; `local_experts[m]` lists the experts of MoE layer m it serves."""

    def __init__(self, spec: ModelSpec, local_experts: list[list[int]], device: torch.device, dtype: torch.dtype):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.local_experts = local_experts
        self._handles: dict[str, Any] = {}
        try:
            self._load()
        except MoeplaceError:
            raise
        except Exception as e:  # a corrupt or truncated shard: one line, not a traceback
            raise MoeplaceError(f"{spec.path}: cannot read weights ({type(e).__name__}: {e})") from None
        finally:
            self._handles.clear()
        inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float) / spec.head_dim))
        self.inv_freq = inv_freq.to(device)

    # -- loading -----------------------------------------------------------------------------
    def _file(self, key: str) -> Any:
        name = self.spec.files.get(key)
        if name is None:
            raise MoeplaceError(f"{self.spec.path}: tensor {key} is missing")
        if name not in self._handles:
            self._handles[name] = safe_open(name, "pt", device="cpu")
        return self._handles[name]

    def _get(self, key: str, index: int | None = None) -> torch.Tensor:
        f = self._file(key)
        t = f.get_tensor(key) if index is None else f.get_slice(key)[index]
        return t.to(device=self.device, dtype=self.dtype)

    def _maybe(self, key: str) -> torch.Tensor | None:
        return self._get(key) if key in self.spec.files else None

    def _load(self) -> None:
        s = self.spec
        self.embed = self._get("model.embed_tokens.weight")
        self.lm_head = self.embed if s.tie_embeddings else self._get("lm_head.weight")
        self.final_norm = self._get("model.norm.weight")
        # per decoder layer; optional tensors (biases, q/k norms) are absent keys, read with .get
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(s.num_layers):
            p = f"model.layers.{i}"
            w: dict[str, torch.Tensor] = {
                "in_norm": self._get(f"{p}.input_layernorm.weight"),
                "post_norm": self._get(f"{p}.post_attention_layernorm.weight"),
            }
            for n in ("q", "k", "v", "o"):
                w[n] = self._get(f"{p}.self_attn.{n}_proj.weight")
            optional = {n + "_bias": f"{p}.self_attn.{n}_proj.bias" for n in ("q", "k", "v", "o")}
            optional |= {"q_norm": f"{p}.self_attn.q_norm.weight", "k_norm": f"{p}.self_attn.k_norm.weight"}
            w |= {name: t for name, key in optional.items() if (t := self._maybe(key)) is not None}
            if i not in s.moe_layers:
                for n in ("gate", "up", "down"):
                    w[n] = self._get(f"{p}.mlp.{n}_proj.weight")
            self.layers.append(w)
        # MoE: router replicated, experts only local, stacked [E_local, ...] in local order
        self.router: list[torch.Tensor] = []
        self.w_gate: list[torch.Tensor] = []
        self.w_up: list[torch.Tensor] = []
        self.w_down: list[torch.Tensor] = []
        for m, prefix in enumerate(s.moe_prefix):
            self.router.append(self._get(f"{prefix}.gate.weight"))
            gates, ups, downs = [], [], []
            for e in self.local_experts[m]:
                if s.fused_experts:
                    gate_up = self._get(f"{prefix}.experts.gate_up_proj", e)
                    g, u = gate_up.chunk(2, dim=0)
                    d = self._get(f"{prefix}.experts.down_proj", e)
                else:
                    g, u, d = (self._get(f"{prefix}.experts.{e}.{n}.weight") for n in s.expert_names)
                gates.append(g)
                ups.append(u)
                downs.append(d)
            for table, ws in ((self.w_gate, gates), (self.w_up, ups), (self.w_down, downs)):
                table.append(torch.stack(ws) if ws else torch.empty(0, device=self.device, dtype=self.dtype))

    # -- forward pieces (tokens are rows: h [n, H]) ------------------------------------------
    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.embed[token_ids]

    def attention(self, layer: int, h: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                  cache: KVCache, one_per_slot: bool = False,
                  context: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual attention block for n tokens at (slot, position); writes their K/V first.

        one_per_slot: no slot has two rows (a decode step), which allows one batched attention
        without reading the rows to the host. context (with one_per_slot): a host-known bound,
        every position < context, so the batched attention reads only that much of the cache.
        Returns (h + attn [n, H], k [n, kv_heads, head_dim], v [n, kv_heads, head_dim]): the new
        cache entries, so context-coherent mode can share them with the other ranks.
        """
        s, w = self.spec, self.layers[layer]
        n = h.shape[0]
        x = rms_norm(h, w["in_norm"], s.rms_eps)
        q, k, v = (F.linear(x, w[c], w.get(c + "_bias")) for c in ("q", "k", "v"))
        if s.qk_norm == "full":
            q, k = rms_norm(q, w["q_norm"], s.rms_eps), rms_norm(k, w["k_norm"], s.rms_eps)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q = q.view(n, s.num_heads, s.head_dim)
        k = k.view(n, s.num_kv_heads, s.head_dim)
        v = v.view(n, s.num_kv_heads, s.head_dim)
        if s.qk_norm == "head":
            q, k = rms_norm(q, w["q_norm"], s.rms_eps), rms_norm(k, w["k_norm"], s.rms_eps)
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [n, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype)[:, None, :], emb.sin().to(h.dtype)[:, None, :]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        cache.write(layer, slots, positions, k, v)
        if one_per_slot:
            out = self._attend_one_per_slot(layer, q, slots, positions, cache, context)
        else:
            out = self._attend_by_sequence(layer, q, slots, positions, cache)
        out = out.reshape(n, s.num_heads * s.head_dim)
        return h + F.linear(out, w["o"], w.get("o_bias")), k, v

    def _allowed(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Which of the first `length` cache positions each query position sees: bool [n, length]."""
        j = torch.arange(length, device=positions.device)[None, :]
        allowed = j <= positions[:, None]
        if self.spec.sliding_window is not None:
            allowed &= j > positions[:, None] - self.spec.sliding_window
        return allowed

    def _attend_one_per_slot(self, layer: int, q: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                             cache: KVCache, context: int | None = None) -> torch.Tensor:
        """Attention of q [n, heads, D], one row per slot, over each row's cache: [n, heads, D].

        One batched call over the first `context` cache positions (default the whole cache), masked
        per row: the caller's host-side bound, since reading the rows' lengths from the device would
        cost a sync per layer and step. K/V stay at kv_heads (enable_gqa)."""
        context = cache.max_len if context is None else min(context, cache.max_len)
        keys, values = cache.read(layer, slots, context)  # [n, kv_heads, context, D]: one copy of n contexts
        mask = self._allowed(positions, context)[:, None, None, :]
        out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, enable_gqa=True)
        return out[:, :, 0]

    def _attend_by_sequence(self, layer: int, q: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
                            cache: KVCache) -> torch.Tensor:
        """Attention of q [n, heads, D] (any rows: a prefill, or a chunk after cached tokens), one
        call per sequence over a view of that sequence's cache up to its last query: [n, heads, D].

        Memory is one sequence's scores, never a copy of K/V per token."""
        out = torch.empty_like(q)
        order = torch.argsort(slots, stable=True)  # a sequence's rows side by side
        seqs, counts = torch.unique_consecutive(slots[order], return_counts=True)
        pos_list = positions[order].tolist()
        start = 0
        for slot, count in zip(seqs.tolist(), counts.tolist()):
            pos, rows = pos_list[start:start + count], order[start:start + count]
            keys, values = cache.sequence(layer, slot, max(pos) + 1)
            # is_causal aligns the top-left corner: right only for a chunk from position 0
            causal = self.spec.sliding_window is None and pos == list(range(count))
            mask = None if causal else self._allowed(positions[rows], keys.shape[1])
            y = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], keys[None], values[None],
                                               attn_mask=mask, is_causal=causal, enable_gqa=True)
            out[rows] = y[0].transpose(0, 1)
            start += count
        return out

    def dense_mlp(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        w = self.layers[layer]
        x = rms_norm(h, w["post_norm"], self.spec.rms_eps)
        return h + F.linear(F.silu(F.linear(x, w["gate"])) * F.linear(x, w["up"]), w["down"])

    def route(self, moe: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts of each token at MoE layer `moe`: ids int64 [n, k], weights float32 [n, k]."""
        s = self.spec
        x = rms_norm(h, self.layers[s.moe_layers[moe]]["post_norm"], s.rms_eps)
        probs = torch.softmax(F.linear(x, self.router[moe]), dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, s.top_k, dim=-1)
        if s.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights

    def experts(self, moe: int, h: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's experts of gate_weight * expert(norm(h)), [n, H] (0 for others).

        ids [n, k]: a negative id is a choice another rank serves (see standard.row_ids); skipped."""
        s = self.spec
        x = rms_norm(h, self.layers[s.moe_layers[moe]]["post_norm"], s.rms_eps)
        out = torch.zeros_like(x)
        for slot, e in enumerate(self.local_experts[moe]):  # ascending ids, like transformers
            token, which = torch.nonzero(ids == e, as_tuple=True)
            if token.numel() == 0:
                continue
            xe = x[token]
            y = F.linear(F.silu(F.linear(xe, self.w_gate[moe][slot])) * F.linear(xe, self.w_up[moe][slot]),
                         self.w_down[moe][slot])
            out.index_add_(0, token, y * weights[token, which, None].to(x.dtype))
        return out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(rms_norm(h, self.final_norm, self.spec.rms_eps), self.lm_head).float()
