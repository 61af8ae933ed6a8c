"""What is in a safetensors checkpoint directory: shards, tensor byte ranges and the MoE layout.

Torch-free: headers are parsed here (8-byte little-endian length, JSON header, raw data), so
opening a checkpoint reads no tensor data, whatever its size or dtype (fp8, MXFP4 blocks).
Pickled weights (.bin, .pt, ...) are never read.

The MoE layout comes from tensor names and shapes, not from a per-family table. A decoder
layer's MoE block is the module holding an `experts` child; its keys take two forms:

    per-expert  {block}.experts.{e}.{rest}                 one set of tensors per expert id e, any
                                                           shape (fp8 weight_scale/input_scale [] or
                                                           [1], weight_scale_inv blocks)
    fused       {block}.experts.{name} [E, ...]            expert dim 0
    router      {block}.{gate|router}.{param} [E, ...]     weight [E, hidden], bias,
                                                           e_score_correction_bias
    shared      either of the last two, 0-d or [1, ...]    broadcast over the experts: a per-tensor
                                                           fp8 scale, a router's weight_scale_inv
                                                           [1, hidden/128] when E <= 128

Layout written by `save_pretrained` in transformers 5.23 (it converts back to each family's hub
format, so the files do NOT mirror the module tree of `moeplace.models.discovery`):

    mixtral       model.layers.{l}.block_sparse_moe.gate.weight
                  model.layers.{l}.block_sparse_moe.experts.{e}.w1|w2|w3.weight   (w1 gate, w2 down, w3 up)
    qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3
                  model.layers.{l}.mlp.gate.weight (+ .e_score_correction_bias for deepseek_v3)
                  model.layers.{l}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight
    gpt_oss       model.layers.{l}.mlp.router.weight|bias
                  model.layers.{l}.mlp.experts.gate_up_proj|gate_up_proj_bias|down_proj|down_proj_bias

Renumbering experts must permute, with the same permutation, the router rows, every per-expert
router vector and the experts; `moeplace.export.permute` does that from these key lists.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeplace.errors import MoeplaceError
from moeplace.io import loads_json, read_json

INDEX_NAME = "model.safetensors.index.json"
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")  # never read
_HEADER_LIMIT = 100 * 2**20  # the safetensors library's own cap on a header
# {block}.experts.{rest}, where block is one decoder layer's MoE module (mlp, block_sparse_moe, ...)
_EXPERTS = re.compile(r"^(?P<block>(?:.*\.)?layers\.(?P<layer>\d+)\.[^.]+)\.experts\.(?P<rest>.+)$")
_PER_EXPERT = re.compile(r"^(?P<expert>\d+)\.(?P<rest>.+)$")
_ROUTER_MODULES = ("gate", "router")


class CheckpointError(MoeplaceError):
    """A checkpoint directory or safetensors file is missing, malformed, truncated or inconsistent."""


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor's bytes are in its safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


@dataclass
class Checkpoint:
    root: Path
    config: dict[str, Any]  # config.json ({} when absent)
    shards: dict[str, dict[str, TensorEntry]]  # shard file name -> tensor name -> entry
    metadata: dict[str, dict[str, str] | None]  # shard file name -> its __metadata__
    index: dict[str, Any] | None  # model.safetensors.index.json, when sharded

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for tensors in self.shards.values() for name, e in tensors.items()}

    def files(self) -> dict[str, Path]:
        """Tensor name -> path of the shard holding it."""
        return {name: self.root / shard for shard, tensors in self.shards.items() for name in tensors}


@dataclass(frozen=True)
class MoeBlock:
    """One MoE layer of a checkpoint: its decoder layer and the names of its expert and router tensors."""

    layer: int  # decoder layer index
    prefix: str  # e.g. "model.layers.3.mlp" or "model.layers.3.block_sparse_moe"
    num_experts: int  # E, rows of the router weight
    per_expert: dict[int, tuple[str, ...]]  # expert id -> its {prefix}.experts.{e}.* tensors ({} when fused)
    fused: tuple[str, ...]  # {prefix}.experts.{name} tensors [E, ...]
    router: tuple[str, ...]  # {prefix}.{gate|router}.{param} tensors [E, ...] (weight [E, hidden], bias, ...)
    # experts or router tensors of shape [] or [1, ...] (E > 1): one value for all experts, left as they are
    shared: tuple[str, ...] = ()


# bits per element of every safetensors dtype (safetensors' Dtype enum)
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
               "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str] | None]:
    """Parse a safetensors header; reject truncated or inconsistent files before any data is read."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header of {length} bytes)")
        try:
            header = loads_json(f.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header")
    metadata = header.pop("__metadata__", None)
    base = 8 + length
    entries: dict[str, TensorEntry] = {}
    try:
        for name, info in header.items():
            begin, end = (int(x) for x in info["data_offsets"])
            entries[name] = TensorEntry(str(info["dtype"]), tuple(int(d) for d in info["shape"]), base + begin, base + end)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header entry ({e!r})") from None
    for name, entry in entries.items():
        bits = _DTYPE_BITS.get(entry.dtype)
        if bits is None:
            raise CheckpointError(f"{path}: tensor {name} has unknown dtype {entry.dtype!r}")
        nbytes, shape = entry.end - entry.begin, list(entry.shape)
        if nbytes * 8 != bits * math.prod(shape):
            raise CheckpointError(f"{path}: tensor {name} holds {nbytes} bytes, but {entry.dtype} "
                                  f"{shape} needs {bits * math.prod(shape) / 8:g} (corrupt header)")
    end = max((e.end for e in entries.values()), default=base)
    if end > size or any(e.begin > e.end or e.begin < base for e in entries.values()):
        raise CheckpointError(f"{path}: truncated or corrupt: tensor data runs past the end of the file ({size} bytes)")
    # as the safetensors library requires: the tensors tile the data, each starting where the one
    # before ends; two that share bytes would be written out as two copies of one tensor's data
    at = base
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != at:
            raise CheckpointError(f"{path}: corrupt header: tensor {name} starts at byte {entry.begin - base} of the "
                                  f"data, not {at - base} where the tensor before it ends ("
                                  + ("it overlaps that one)" if entry.begin < at else "a gap between them)"))
        at = entry.end
    if at != size:
        raise CheckpointError(f"{path}: corrupt: {size - at} bytes after the last tensor's data")
    return entries, metadata


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Read config.json, the shard index (if any) and every shard's header; no tensor data."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such model directory")
    config_path = root / "config.json"
    config = read_json(config_path, CheckpointError) if config_path.is_file() else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a JSON object")
    index = None
    if (root / INDEX_NAME).is_file():
        try:
            index = loads_json((root / INDEX_NAME).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{root / INDEX_NAME}: malformed shard index ({e!r})") from None
    else:
        names = sorted(p.name for p in root.glob("*.safetensors"))
        if len(names) > 1:
            raise CheckpointError(f"{root}: {len(names)} .safetensors files but no {INDEX_NAME} to say which form the model")
    if not names:
        pickled = [p.name for p in root.iterdir() if p.suffix in PICKLED_WEIGHTS]
        hint = " (found pickled weights, which moeplace never loads: convert them to safetensors first)" if pickled else ""
        raise CheckpointError(f"{root}: no .safetensors weights{hint}")
    shards, metadata = {}, {}
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise CheckpointError(f"{root / INDEX_NAME}: shard {name!r} is not a file name inside {root}")
        if not (root / name).is_file():
            raise CheckpointError(f"{root}: shard {name} listed in {INDEX_NAME} is missing")
        shards[name], metadata[name] = read_safetensors_header(root / name)
    if index is not None:
        listed = set(index["weight_map"])
        present = {k for tensors in shards.values() for k in tensors}
        if listed != present:
            missing = sorted(listed - present)[:3] or sorted(present - listed)[:3]
            raise CheckpointError(f"{root}: {INDEX_NAME} and the shards disagree (e.g. {missing})")
    return Checkpoint(root, config, shards, metadata, index)


# where each family's config.json states its routed experts per MoE layer (Mixtral/GPT-OSS,
# Qwen-MoE/OLMoE, DeepSeek)
_CONFIG_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config of a possibly multimodal config."""
    sub = config.get("text_config")
    return sub if isinstance(sub, dict) else config


def moe_blocks(ckpt: Checkpoint) -> list[MoeBlock]:
    """The checkpoint's MoE layers in decoder order, found from tensor names and shapes.

    1. group `{block}.experts.*` tensors by block: per-expert `{e}.*` or fused;
    2. collect each block's router tensors `{block}.{gate|router}.{param}`; the router weight
       [E, hidden] gives E (a dense layer's `mlp.gate_proj` is no router);
    3. check the per-expert ids are 0..E-1 and fused/router tensors have a leading E; those of
       shape [] or [1, ...] are broadcast over the experts (per-tensor fp8 scales) and go to `shared`.

    Layers at or past config.num_hidden_layers (DeepSeek's multi-token-prediction layer) are
    not part of the decoder stack a placement is made for and are left out.
    """
    cfg = text_config(ckpt.config)
    num_hidden = cfg.get("num_hidden_layers")
    shapes = ckpt.shapes()
    # 1. expert tensors: block prefix -> (decoder layer, {expert: names}, fused names)
    found: dict[str, tuple[int, dict[int, list[str]], list[str]]] = {}
    routers: dict[str, list[str]] = {}
    for name in sorted(shapes):
        if m := _EXPERTS.match(name):
            if isinstance(num_hidden, int) and int(m["layer"]) >= num_hidden:
                continue
            _, per_expert, fused = found.setdefault(m["block"], (int(m["layer"]), {}, []))
            if pm := _PER_EXPERT.match(m["rest"]):
                per_expert.setdefault(int(pm["expert"]), []).append(name)
            else:
                fused.append(name)
            continue
        # 2. router candidates, keyed by the block prefix they would belong to
        prefix, _, module = name.rpartition(".")[0].rpartition(".")
        if module in _ROUTER_MODULES:
            routers.setdefault(prefix, []).append(name)
    blocks = []
    for prefix, (layer, per_expert, fused) in sorted(found.items(), key=lambda kv: kv[1][0]):
        weight = next((shapes[w] for w in (f"{prefix}.{m}.weight" for m in _ROUTER_MODULES) if w in shapes), None)
        if weight is None or len(weight) != 2 or not weight[0]:
            raise CheckpointError(f"{ckpt.root}: MoE block {prefix} has experts but no [experts, hidden] router "
                                  f"({prefix}.gate.weight or .router.weight)")
        num_experts = weight[0]
        # 3. consistency
        if per_expert and set(per_expert) != set(range(num_experts)):
            missing = sorted(set(range(num_experts)) - set(per_expert))
            raise CheckpointError(
                f"{ckpt.root}: {prefix} has expert ids {min(per_expert)}..{max(per_expert)} ({len(per_expert)} experts) "
                f"but its router scores {num_experts}"
                + (f": no tensors of expert {', '.join(map(str, missing[:3]))}{'...' if len(missing) > 3 else ''}"
                   if missing else "")
            )
        # every expert has the same tensors (w1, w2, w3; weight_scale ...): renumbering one that lacks
        # one would move the hole to another id, in a checkpoint transformers refuses to load
        kinds = {e: {n.removeprefix(f"{prefix}.experts.{e}.") for n in names} for e, names in per_expert.items()}
        every = set().union(*kinds.values()) if kinds else set()
        if lacking := next(((e, sorted(every - k)) for e, k in sorted(kinds.items()) if k != every), None):
            raise CheckpointError(f"{ckpt.root}: {prefix}.experts.{lacking[0]} has no {lacking[1][0]} tensor, which "
                                  "other experts of the layer have: a missing or truncated shard?")
        router = routers.get(prefix, [])
        # a per-tensor scale is saved as [] or [1] (both occur in fp8 checkpoints): either way one value
        # for every expert, which renumbering leaves alone; with E = 1 the order is the identity anyway
        shared = [n for n in (*fused, *router) if not shapes[n] or (shapes[n][0] == 1 != num_experts)]
        for name in (*fused, *router):
            if name not in shared and shapes[name][0] != num_experts:
                raise CheckpointError(f"{ckpt.root}: {name} of shape {list(shapes[name])} has no leading expert "
                                      f"dimension of {num_experts} (nor 1, one value for all experts): don't know "
                                      "how to renumber it")
        blocks.append(MoeBlock(layer, prefix, num_experts, {e: tuple(k) for e, k in sorted(per_expert.items())},
                               tuple(n for n in fused if n not in shared), tuple(n for n in router if n not in shared),
                               tuple(shared)))
    if not blocks:
        raise CheckpointError(f"{ckpt.root}: no MoE layers found (no '...layers.N.<block>.experts...' tensors)")
    if len({b.layer for b in blocks}) != len(blocks):
        raise CheckpointError(f"{ckpt.root}: more than one MoE block in a decoder layer is not supported")
    if len({b.num_experts for b in blocks}) > 1:
        raise CheckpointError(f"{ckpt.root}: MoE layers have different expert counts; not supported")
    # a config.json edited apart from its weights: the weights are what routing and a placement see
    for key in _CONFIG_EXPERT_KEYS:
        if isinstance(cfg.get(key), int) and cfg[key] != blocks[0].num_experts:
            raise CheckpointError(f"{ckpt.root}: config.json {key} is {cfg[key]}, but the weights hold "
                                  f"{blocks[0].num_experts} experts per MoE layer")
    return blocks
