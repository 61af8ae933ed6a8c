"""Sizes read from a Hugging Face config.json, checked once for every stage that reads them
(`moeplace eval --model`'s traffic prediction, `moeplace serve`'s model spec, the cost model
estimated from a checkpoint: solve/costmodel.py). No torch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeplace.errors import MoeplaceError
from moeplace.io import loads_json
from moeplace.options import MAX_HIDDEN_SIZE, brief


def config_size(cfg: dict[str, Any], where: str, *keys: str, default: int | None = None, needed_for: str = "") -> int:
    """The first of `keys` present in `cfg` (null counts as absent) as a JSON integer >= 1, else
    `default`; `where` starts each one-line error (e.g. "DIR: config.json"), `needed_for` ends the
    missing-key one. Strings, floats and booleans are refused: int("64") or int(64.5) would pass a
    mistyped config as a real model."""
    key = next((k for k in keys if cfg.get(k) is not None), None)
    if key is None:
        if default is None:
            raise MoeplaceError(f"{where} has no {' or '.join(keys)}{f' (needed for {needed_for})' if needed_for else ''}")
        return default
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise MoeplaceError(f"{where} {key} must be an integer, got {value!r}")
    if value < 1:
        raise MoeplaceError(f"{where} {key} must be >= 1, got {value}")
    return value


def attention_shape(cfg: dict[str, Any], where: str, needed_for: str = "") -> tuple[int, int, int, int]:
    """(hidden_size, num_attention_heads, num_key_value_heads, head_dim), checked: kv heads divide
    heads; head_dim defaults to hidden // heads, as transformers takes it (so heads <= hidden)."""
    hidden = config_size(cfg, where, "hidden_size", needed_for=needed_for)
    heads = config_size(cfg, where, "num_attention_heads", needed_for=needed_for)
    kv_heads = config_size(cfg, where, "num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise MoeplaceError(f"{where} num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}")
    if cfg.get("head_dim") is None and hidden < heads:
        raise MoeplaceError(f"{where} has no head_dim and hidden_size {hidden} < num_attention_heads {heads}")
    return hidden, heads, kv_heads, config_size(cfg, where, "head_dim", default=hidden // heads)


def read_config_json(model_dir: Path, label: str) -> dict[str, Any]:
    """A checkpoint's config.json as a dict; `label` (e.g. "--model DIR") starts each one-line error."""
    try:
        cfg = loads_json((model_dir / "config.json").read_text())
    except OSError as e:
        config = model_dir / "config.json"
        if model_dir.is_dir() and not (config.exists() or config.is_symlink()):  # a directory of model YAMLs, say
            raise MoeplaceError(f"{label}: cannot read config.json: this directory has none (a Hugging Face "
                                "checkpoint directory holds one)") from None
        raise MoeplaceError(f"{label}: cannot read config.json: {e.strerror or e}") from None
    except ValueError as e:
        raise MoeplaceError(f"{label}: config.json is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise MoeplaceError(f"{label}: config.json is not a JSON object")
    return cfg


def check_width(where: str, what: str, width: int) -> int:
    """`width` if at most MAX_HIDDEN_SIZE: past any model's bytes, and past float range for a 1e300 one."""
    if width > MAX_HIDDEN_SIZE:
        raise MoeplaceError(f"{where} {what} {brief(width)} is more than {MAX_HIDDEN_SIZE} (2**20)")
    return width


def moe_shape(cfg: dict[str, Any], where: str, needed_for: str) -> dict[str, int]:
    """hidden_size, num_experts (num_local_experts / num_experts / n_routed_experts, at most
    MAX_EXPERTS, what a trace and a cost model hold) and top_k (num_experts_per_tok, in [1,
    experts]) of a config.json, checked."""
    from moeplace.trace.format import MAX_EXPERTS

    hidden = check_width(where, "hidden_size", config_size(cfg, where, "hidden_size", needed_for=needed_for))
    expert_keys = ("num_local_experts", "num_experts", "n_routed_experts")
    experts = config_size(cfg, where, *expert_keys, needed_for=needed_for)
    if experts > MAX_EXPERTS:  # a cost model records it, and a record past the bound is refused when read back
        key = next(k for k in expert_keys if cfg.get(k) is not None)
        raise MoeplaceError(f"{where} {key} {brief(experts)} is more than {MAX_EXPERTS} (2**16), the most experts per "
                            "layer moeplace handles")
    top_k = config_size(cfg, where, "num_experts_per_tok", needed_for=needed_for)
    if top_k > experts:
        raise MoeplaceError(f"{where} num_experts_per_tok {top_k} is not in [1, {experts}] "
                            f"(config.json gives {experts} experts per layer)")
    return {"hidden_size": hidden, "num_experts": experts, "top_k": top_k}


def read_model_shape(model_dir: Path) -> dict[str, int]:
    """hidden_size and the K/V shape from a checkpoint's config.json (no torch, no transformers).

    Sizes are checked as `moeplace serve` checks them (config_size): JSON integers >= 1,
    null is absent, num_key_value_heads divides num_attention_heads; here also
    num_experts_per_tok in [1, experts] (serve checks it against the routers' weights).
    """
    label = f"--model {model_dir}"  # `moeplace eval`'s option
    cfg = read_config_json(model_dir, label)
    where, need = f"{label}: config.json", "the traffic prediction"
    hidden, _, kv_heads, head_dim = attention_shape(cfg, where, need)
    check_width(where, "hidden_size", hidden)
    check_width(where, "num_key_value_heads x head_dim", kv_heads * head_dim)
    moe = moe_shape(cfg, where, need)
    return {"hidden_size": hidden, "num_layers": config_size(cfg, where, "num_hidden_layers", needed_for=need),
            "num_kv_heads": kv_heads, "head_dim": head_dim, "num_experts": moe["num_experts"], "top_k": moe["top_k"]}
