"""Tiny randomly-initialised MoE models of each supported family: used by tests and demos.

`build_tiny_model("deepseek_v3", out_dir)` writes a few-hundred-KB checkpoint with
`save_pretrained` (safetensors + config.json), so callers exercise the real loading path:
`AutoModelForCausalLM.from_pretrained(out_dir)`. Each config keeps the family's routing
features switched on so that code paths are exercised, not just the Mixtral-like common case:

    family       router                                  dense layers     extras
    mixtral      softmax -> top-k -> renormalise         none             -
    qwen2_moe    softmax -> top-k (norm_topk_prob off)   mlp_only_layers  shared expert + gate
    qwen3_moe    softmax -> top-k -> renormalise         mlp_only_layers  -
    olmoe        softmax -> top-k                        none             -
    deepseek_v2  softmax -> group-limited top-k, scaled  first_k_dense    shared experts
    deepseek_v3  sigmoid + correction bias, grouped      first_k_dense    shared experts
    gpt_oss      logits + bias -> top-k -> softmax        none             expert biases

Weights depend only on (family, sizes, seed). A byte-level tokenizer (256 byte tokens, no
merges) is saved beside the weights, so `AutoTokenizer.from_pretrained(out_dir)` and
`moeplace trace --model out_dir` work; input ids in [0, 256) can also be fed directly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moeplace.errors import MoeplaceError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss")

# Sizes shared by every family: small enough to build, save and load in well under a second.
_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)


def tiny_config_kwargs(family: str, num_experts: int, top_k: int, num_layers: int) -> dict[str, Any]:
    """Config keyword arguments of the tiny `family` model (before user overrides)."""
    if family == "mixtral":
        return dict(_COMMON, num_hidden_layers=num_layers, intermediate_size=48,
                    num_local_experts=num_experts, num_experts_per_tok=top_k)
    if family in ("qwen2_moe", "qwen3_moe"):
        extra = dict(shared_expert_intermediate_size=48, norm_topk_prob=False) if family == "qwen2_moe" \
            else dict(norm_topk_prob=True, head_dim=8)
        return dict(_COMMON, num_hidden_layers=num_layers, intermediate_size=48, moe_intermediate_size=16,
                    num_experts=num_experts, num_experts_per_tok=top_k, mlp_only_layers=[1], **extra)
    if family == "olmoe":
        return dict(_COMMON, num_hidden_layers=num_layers, intermediate_size=16,
                    num_experts=num_experts, num_experts_per_tok=top_k)
    if family in ("deepseek_v2", "deepseek_v3"):
        n_group = 4 if num_experts % 4 == 0 and num_experts >= 8 else 1
        mla = dict(kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
        routing = dict(topk_method="group_limited_greedy", routed_scaling_factor=1.5) if family == "deepseek_v2" \
            else dict(norm_topk_prob=True, routed_scaling_factor=2.5)
        return dict(_COMMON, num_hidden_layers=num_layers, intermediate_size=48, moe_intermediate_size=16,
                    n_routed_experts=num_experts, num_experts_per_tok=top_k, n_shared_experts=1,
                    first_k_dense_replace=1, n_group=n_group, topk_group=max(1, n_group // 2),
                    **mla, **routing)
    if family == "gpt_oss":
        return dict(_COMMON, num_hidden_layers=num_layers, intermediate_size=16, head_dim=8,
                    num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=16,
                    rope_parameters=dict(rope_type="default", rope_theta=150000.0),
                    layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)])
    raise MoeplaceError(f"unknown tiny model family {family!r} (known: {', '.join(FAMILIES)})")


def build_tiny_model(
    family: str,
    out_dir: str | Path,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    num_layers: int = 4,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """Build a tiny random `family` causal LM and `save_pretrained` it (safetensors) to `out_dir`.

    `overrides` replace config fields (e.g. `mlp_only_layers=[]`). Families with dense layers get
    one (layer 1 for Qwen, layer 0 for DeepSeek), so MoE layer discovery must skip it.
    Returns `out_dir`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if top_k > num_experts:
        raise MoeplaceError(f"top_k={top_k} exceeds num_experts={num_experts}")
    if num_layers < 2:
        raise MoeplaceError(f"num_layers must be >= 2 (Qwen and DeepSeek tiny models make one layer dense), got {num_layers}")
    kwargs = {**tiny_config_kwargs(family, num_experts, top_k, num_layers), **overrides}
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        _randomise_routing_extras(model, seed)
    out = Path(out_dir)
    with _no_progress_bars():  # transformers' "Writing model shards" bar, for a file of a few KB
        model.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def byte_tokenizer() -> Any:
    """A 256-token byte-level tokenizer (id = byte value): every UTF-8 text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in enumerate(_bytes_to_unicode())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map, in byte order (what ByteLevel pre-tokenisation emits)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _randomise_routing_extras(model: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised routing terms (DeepSeek-V3 correction bias, GPT-OSS router bias)
    non-trivial values, so that a collector ignoring them would record different experts."""
    g = torch.Generator().manual_seed(seed + 1)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith("e_score_correction_bias") or name.endswith("router.bias"):
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.1)
