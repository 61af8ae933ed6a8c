"""Sizes read from a Hugging Face config.json, checked once for every stage that reads them
(`moeplace eval --model`'s traffic prediction, `moeplace serve`'s model spec). No torch."""

from __future__ import annotations

from typing import Any

from moeplace.errors import MoeplaceError


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
