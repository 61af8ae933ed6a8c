"""Renumber a safetensors checkpoint's experts so a contiguous expert-parallel layout realises a placement.

Engines without a placement option (or with pitfalls in theirs) give EP rank g the experts
[g * E/G, (g+1) * E/G). Renumbering each MoE layer's experts in the placement's physical slot
order puts exactly the placement's experts in each block:

    new_to_old[l] = [expert for gpu, expert in placement.physical_slots(l)]   # [E]
    new expert j  = old expert new_to_old[l][j]

and the router's rows (weight, bias, e_score_correction_bias) are permuted the same way, so the
model computes the same function: logits are unchanged, only expert ids move.

Both checkpoint layouts are handled, told apart per tensor name:

    per-expert  {block}.experts.{e}.{rest}      renamed to {block}.experts.{j}.{rest}, bytes untouched
    fused       {block}.experts.{name} [E, ...]  rows reordered along dim 0
    router      {block}.{gate|router}.{param} [E, ...]  rows reordered along dim 0

The rewrite streams bytes: a tensor's rows are contiguous in a safetensors file, so reordering
is copying row ranges. No tensor is decoded (any dtype, fp8 and MXFP4 blocks included) and memory
stays at one copy buffer whatever the checkpoint size. The output goes to a temp directory beside
OUT_DIR that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moeplace.errors import MoeplaceError, PlacementError
from moeplace.export.eplb import physical_to_logical
from moeplace.io import current_umask, read_json, write_json_atomic
from moeplace.placement import Placement
from moeplace.progress import Progress

INDEX_NAME = "model.safetensors.index.json"
PERMUTATION_NAME = "moeplace_permutation.json"
PERMUTATION_FORMAT = "moeplace.permutation/v1"
_HEADER_LIMIT = 100 * 2**20  # the safetensors library's own cap on a header
_COPY_CHUNK = 64 * 2**20
_PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")  # never read; never copied next to permuted weights
# {block}.experts.{rest}, where block is one decoder layer's MoE module (mlp, block_sparse_moe, ...)
_EXPERTS = re.compile(r"^(?P<block>(?:.*\.)?layers\.(?P<layer>\d+)\.[^.]+)\.experts\.(?P<rest>.+)$")
_PER_EXPERT = re.compile(r"^(?P<expert>\d+)\.(?P<rest>.+)$")
_ROUTER_MODULES = ("gate", "router")


class CheckpointError(MoeplaceError):
    """A checkpoint directory or safetensors file is missing, malformed or truncated."""


@dataclass(frozen=True)
class TensorEntry:
    """Where a tensor's bytes are in its safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


@dataclass(frozen=True)
class MoeBlock:
    """One MoE layer of a checkpoint."""

    layer: int  # decoder layer index
    prefix: str  # e.g. "model.layers.3.mlp"
    num_experts: int


@dataclass
class Checkpoint:
    root: Path
    config: dict[str, Any]
    shards: dict[str, dict[str, TensorEntry]]  # shard file name -> tensor name -> entry
    metadata: dict[str, dict[str, str] | None]  # shard file name -> its __metadata__
    index: dict[str, Any] | None  # model.safetensors.index.json, when sharded

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: e.shape for tensors in self.shards.values() for name, e in tensors.items()}


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str] | None]:
    """Parse a safetensors header; reject truncated or inconsistent files before any copy."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(_HEADER_LIMIT, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
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
    end = max((e.end for e in entries.values()), default=base)
    if end > size or any(e.begin > e.end or e.begin < base for e in entries.values()):
        raise CheckpointError(f"{path}: truncated or corrupt: tensor data runs past the end of the file ({size} bytes)")
    return entries, metadata


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """Read config.json, the shard index (if any) and every shard's header; no tensor data."""
    root = Path(model_dir)
    if not root.is_dir():
        raise CheckpointError(f"{root}: no such model directory")
    config_path = root / "config.json"
    config = read_json(config_path, CheckpointError) if config_path.is_file() else {}
    index = None
    if (root / INDEX_NAME).is_file():
        try:
            index = json.loads((root / INDEX_NAME).read_text())
            names = sorted(set(index["weight_map"].values()))
        except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{root / INDEX_NAME}: malformed shard index ({e!r})") from None
    else:
        names = sorted(p.name for p in root.glob("*.safetensors"))
        if len(names) > 1:
            raise CheckpointError(f"{root}: {len(names)} .safetensors files but no {INDEX_NAME} to say which form the model")
    if not names:
        pickled = [p.name for p in root.iterdir() if p.suffix in _PICKLED_WEIGHTS]
        hint = " (found pickled weights, which moeplace never loads: convert them to safetensors first)" if pickled else ""
        raise CheckpointError(f"{root}: no .safetensors weights{hint}")
    shards, metadata = {}, {}
    for name in names:
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


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config of a possibly multimodal config."""
    sub = config.get("text_config")
    return sub if isinstance(sub, dict) else config


def moe_blocks(ckpt: Checkpoint) -> list[MoeBlock]:
    """The checkpoint's MoE layers in decoder order, found from tensor names and shapes.

    Layers at or past config.num_hidden_layers (DeepSeek's multi-token-prediction layer) are
    not part of the decoder stack a placement is made for and are left as they are.
    """
    num_hidden = text_config(ckpt.config).get("num_hidden_layers")
    shapes = ckpt.shapes()
    per_expert: dict[str, set[int]] = {}
    layers: dict[str, int] = {}
    for name in shapes:
        m = _EXPERTS.match(name)
        if not m or (isinstance(num_hidden, int) and int(m["layer"]) >= num_hidden):
            continue
        layers[m["block"]] = int(m["layer"])
        pm = _PER_EXPERT.match(m["rest"])
        if pm:
            per_expert.setdefault(m["block"], set()).add(int(pm["expert"]))
    blocks = []
    for prefix, layer in sorted(layers.items(), key=lambda kv: kv[1]):
        router = [shapes[f"{prefix}.{mod}.weight"] for mod in _ROUTER_MODULES if f"{prefix}.{mod}.weight" in shapes]
        if not router or len(router[0]) != 2:
            raise CheckpointError(f"{ckpt.root}: MoE block {prefix} has experts but no [experts, hidden] router "
                                  f"({prefix}.gate.weight or .router.weight)")
        num_experts = router[0][0]
        ids = per_expert.get(prefix)
        if ids is not None and ids != set(range(num_experts)):
            raise CheckpointError(
                f"{ckpt.root}: {prefix} has expert ids {min(ids)}..{max(ids)} ({len(ids)} experts) but its router "
                f"scores {num_experts}"
            )
        blocks.append(MoeBlock(layer, prefix, num_experts))
    if not blocks:
        raise CheckpointError(f"{ckpt.root}: no MoE layers found (no '...layers.N.<block>.experts...' tensors)")
    if len({b.layer for b in blocks}) != len(blocks):
        raise CheckpointError(f"{ckpt.root}: more than one MoE block in a decoder layer is not supported")
    if len({b.num_experts for b in blocks}) > 1:
        raise CheckpointError(f"{ckpt.root}: MoE layers have different expert counts; not supported")
    return blocks


def permutation(placement: Placement) -> np.ndarray:
    """new_to_old int64 [L, E] realising `placement` under a contiguous layout, or a clear error."""
    if placement.num_replicas:
        layer = next(i for i, r in enumerate(placement.replicas) if r)
        raise PlacementError(
            f"the placement replicates experts (layer {layer} has {len(placement.replicas[layer])} extra copies): "
            "renumbering a checkpoint cannot create copies. Use `moeplace export --to sglang` (SGLang loads "
            "replicas from --init-expert-location) or re-solve without replicas"
        )
    return physical_to_logical(placement)


def check_group_routing(config: dict[str, Any], new_to_old: np.ndarray) -> None:
    """Reject a renumbering that breaks group-limited routing (DeepSeek n_group / topk_group).

    Such routers score contiguous id blocks of E / n_group experts as groups and keep the best
    topk_group groups, so each new group must be exactly one old group, or routing changes.
    """
    cfg = text_config(config)
    n_group, topk_group = int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1)
    num_experts = new_to_old.shape[1]
    # DeepSeek-V2's plain "greedy" top-k ignores the groups
    if n_group <= 1 or topk_group >= n_group or num_experts % n_group or cfg.get("topk_method") == "greedy":
        return
    size = num_experts // n_group
    for layer, order in enumerate(new_to_old):
        old_groups = (order // size).reshape(n_group, size)
        bad = np.flatnonzero((old_groups != old_groups[:, :1]).any(axis=1))
        if bad.size:
            g = int(bad[0])
            raise PlacementError(
                f"MoE layer {layer}: the model routes over {n_group} groups of {size} experts "
                f"(n_group={n_group}, topk_group={topk_group}) and the placement would mix old groups "
                f"{sorted(set(old_groups[g].tolist()))} in new group {g}: renumbering would change routing. "
                "Solve with whole groups per GPU block, or use `moeplace export --to sglang`"
            )


def permute_checkpoint(
    model_dir: str | Path, placement: Placement, out_dir: str | Path, overwrite: bool = False, progress: bool = True,
) -> dict[str, Any]:
    """Write the renumbered checkpoint to `out_dir` atomically; return the permutation record.

    1. read headers, find the MoE layers, check the placement fits the model;
    2. new_to_old from the placement (no replicas, E/G experts per GPU; group routing kept);
    3. copy non-weight files, rewrite each shard by byte ranges, rewrite the index;
    4. rename the finished temp directory onto `out_dir`.
    """
    ckpt = open_checkpoint(model_dir)
    out = Path(out_dir)
    _check_output(ckpt.root, out, overwrite)
    blocks = moe_blocks(ckpt)
    placement.check_fits(len(blocks), blocks[0].num_experts, what="checkpoint")
    new_to_old = permutation(placement)
    check_group_routing(ckpt.config, new_to_old)
    total = sum(e.end - e.begin for tensors in ckpt.shards.values() for e in tensors.values())
    free = shutil.disk_usage(out.parent if out.parent.exists() else Path.cwd()).free
    if free < total:
        raise CheckpointError(f"{out.parent}: {free / 2**30:.1f} GiB free, the permuted checkpoint needs {total / 2**30:.1f} GiB")

    plan = _Plan(blocks, new_to_old)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        skipped = _copy_other_files(ckpt, tmp)
        bar = Progress("permute-checkpoint", total=total, enabled=progress)
        done = 0
        renamed: dict[str, str] = {}
        for shard, tensors in ckpt.shards.items():
            for old, new, nbytes in _write_shard(ckpt.root / shard, tensors, ckpt.metadata[shard], plan, tmp / shard):
                renamed[old] = new
                done += nbytes
                bar.update(done, shard)
        bar.close(f"{total / 2**20:.1f} MiB in {len(ckpt.shards)} shard(s)")
        if ckpt.index is not None:
            index = dict(ckpt.index)
            index["weight_map"] = {renamed[k]: v for k, v in ckpt.index["weight_map"].items()}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        record = {
            "format": PERMUTATION_FORMAT,
            "source": str(ckpt.root),
            "num_gpus": placement.num_gpus,
            "experts_per_gpu": blocks[0].num_experts // placement.num_gpus,
            "moe_layers": [b.layer for b in blocks],
            "new_to_old": new_to_old,
            "placement_trace_sha256": placement.trace_sha256,
            "skipped": skipped,
        }
        write_json_atomic(tmp / PERMUTATION_NAME, record)
        os.chmod(tmp, 0o777 & ~current_umask())
        _swap_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return record


class _Plan:
    """What happens to each tensor name: (new name, row order or None)."""

    def __init__(self, blocks: list[MoeBlock], new_to_old: np.ndarray) -> None:
        self.by_prefix = {b.prefix: (b, new_to_old[i]) for i, b in enumerate(blocks)}
        self.old_to_new = {b.prefix: np.argsort(new_to_old[i]) for i, b in enumerate(blocks)}

    def __call__(self, name: str, entry: TensorEntry) -> tuple[str, np.ndarray | None]:
        m = _EXPERTS.match(name)
        if m and m["block"] in self.by_prefix:
            block, order = self.by_prefix[m["block"]]
            pm = _PER_EXPERT.match(m["rest"])
            if pm:
                new_id = int(self.old_to_new[block.prefix][int(pm["expert"])])
                return f"{block.prefix}.experts.{new_id}.{pm['rest']}", None
            return name, self._rows(name, entry, block, order)
        module, _, param = name.rpartition(".")
        prefix, _, leaf = module.rpartition(".")
        if leaf in _ROUTER_MODULES and prefix in self.by_prefix:
            block, order = self.by_prefix[prefix]
            return name, self._rows(name, entry, block, order)
        return name, None

    @staticmethod
    def _rows(name: str, entry: TensorEntry, block: MoeBlock, order: np.ndarray) -> np.ndarray | None:
        if not entry.shape:
            return None  # a scalar shared by all experts (e.g. a quantisation scale)
        if entry.shape[0] != block.num_experts or (entry.end - entry.begin) % block.num_experts:
            raise CheckpointError(
                f"{name}: shape {list(entry.shape)} has no leading expert dimension of {block.num_experts}; "
                "don't know how to renumber it"
            )
        return order


def _write_shard(
    src: Path, tensors: dict[str, TensorEntry], metadata: dict[str, str] | None, plan: _Plan, dst: Path,
) -> Iterator[tuple[str, str, int]]:
    """Write one shard with renamed / row-reordered tensors; yield (old, new, bytes) per tensor."""
    ordered = sorted(tensors.items(), key=lambda kv: kv[1].begin)
    jobs = [(name, *plan(name, entry), entry) for name, entry in ordered]
    header: dict[str, Any] = {"__metadata__": metadata} if metadata is not None else {}
    offset = 0
    for _, new, _, entry in jobs:
        nbytes = entry.end - entry.begin
        header[new] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the library pads so tensor data starts 8-byte aligned
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(struct.pack("<Q", len(raw)) + raw)
        for old, new, order, entry in jobs:
            nbytes = entry.end - entry.begin
            if order is None:
                _copy_range(fin, fout, entry.begin, nbytes)
            else:
                row = nbytes // entry.shape[0]
                for old_row in order.tolist():
                    _copy_range(fin, fout, entry.begin + old_row * row, row)
            yield old, new, nbytes


def _copy_range(fin: Any, fout: Any, begin: int, nbytes: int) -> None:
    fin.seek(begin)
    while nbytes > 0:
        chunk = fin.read(min(nbytes, _COPY_CHUNK))
        if not chunk:
            raise CheckpointError(f"{fin.name}: truncated while copying")
        fout.write(chunk)
        nbytes -= len(chunk)


def _copy_other_files(ckpt: Checkpoint, dst: Path) -> list[str]:
    """Copy config, tokenizer and other files; skip weights that would contradict the permuted ones."""
    skipped = []
    for path in sorted(ckpt.root.iterdir()):
        name = path.name
        if name in ckpt.shards or name == INDEX_NAME or name.startswith("."):
            continue
        holds_weights = path.suffix in _PICKLED_WEIGHTS + (".safetensors",) or (
            path.is_dir() and any(p.suffix in _PICKLED_WEIGHTS + (".safetensors",) for p in path.rglob("*"))
        )
        if holds_weights:
            skipped.append(name)
        elif path.is_dir():
            shutil.copytree(path, dst / name)
        else:
            shutil.copy2(path, dst / name)
    return skipped


def _check_output(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise CheckpointError(f"-o {out}: must be a directory outside MODEL_DIR {src} (and not containing it)")
    if out.exists() and not overwrite:
        raise CheckpointError(f"-o {out}: already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"-o {out}: exists and is not a directory")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` onto `out`; an existing `out` is replaced only after the new one is complete."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
