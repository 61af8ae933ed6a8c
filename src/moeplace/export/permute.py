"""Renumber a safetensors checkpoint's experts so a contiguous expert-parallel layout realises a placement.

Engines without a placement option (or with pitfalls in theirs) give EP rank g the experts
[g * E/G, (g+1) * E/G). Renumbering each MoE layer's experts in the placement's physical slot
order puts exactly the placement's experts in each block:

    new_to_old[l] = [expert for gpu, expert in placement.physical_slots(l)]   # [E]
    new expert j  = old expert new_to_old[l][j]

and the router's rows (weight, bias, e_score_correction_bias) are permuted the same way, so the
model computes the same function: logits are unchanged, only expert ids move.

Each MoE block's tensors, as `moeplace.models.checkpoint.moe_blocks` finds them, are rewritten:

    per-expert  {block}.experts.{e}.{rest}      renamed to {block}.experts.{j}.{rest}, bytes untouched
    fused       {block}.experts.{name} [E, ...]  rows reordered along dim 0
    router      {block}.{gate|router}.{param} [E, ...]  rows reordered along dim 0
    shared      either of the last two, [] or [1, ...]  copied as they are (one value for all experts)

The rewrite streams bytes: a tensor's rows are contiguous in a safetensors file, so reordering
is copying row ranges. No tensor is decoded (any dtype, fp8 and MXFP4 blocks included) and memory
stays at one copy buffer whatever the checkpoint size. The output goes to a temp directory beside
OUT_DIR that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import PlacementError
from moeplace.export.eplb import physical_to_logical
from moeplace.io import current_umask, locked_stage, read_json, write_json_atomic
from moeplace.models.checkpoint import (
    INDEX_NAME,
    PICKLED_WEIGHTS,
    Checkpoint,
    CheckpointError,
    MoeBlock,
    TensorEntry,
    moe_blocks,
    open_checkpoint,
    text_config,
)
from moeplace.placement import Placement
from moeplace.progress import Progress

PERMUTATION_NAME = "moeplace_permutation.json"
PERMUTATION_FORMAT = "moeplace.permutation/v1"
_COPY_CHUNK = 64 * 2**20


def permutation(placement: Placement, model_type: str | None = None) -> np.ndarray:
    """new_to_old int64 [L, E] realising `placement` under a contiguous layout, or a clear error
    (`model_type`, when known, narrows the ways out it names)."""
    if placement.num_replicas:
        layer = next(i for i, r in enumerate(placement.replicas) if r)
        raise PlacementError(
            f"the placement replicates experts (layer {layer} has {len(placement.replicas[layer])} extra copies): "
            f"renumbering a checkpoint cannot create copies. {replicas_way_out(model_type)}"
        )
    return physical_to_logical(placement)


def replicas_way_out(model_type: str | None) -> str:
    """How to run a placement with replicas, for `model_type` (None: any model). permute-checkpoint
    cannot make copies and SGLang ignores maps for some families, so each names only what works."""
    from moeplace.export.sglang import MAP_IGNORED
    from moeplace.serve.model import FAMILIES  # torch: imported only on this error path

    ways = []
    if model_type is None or model_type in FAMILIES:
        ways.append("`moeplace serve --placement` (copies included"
                    + ("" if model_type else f"; {', '.join(FAMILIES)} models") + ")")
    if model_type not in MAP_IGNORED:
        ignored = "" if model_type else f" (not for {' or '.join(MAP_IGNORED.values())} models)"
        ways.append(f"`moeplace export --to sglang`, for SGLang, which loads the copies{ignored}")
    ways.append("drop the copies: solve again without --redundant-experts, then `moeplace permute-checkpoint`")
    return "Ways to run it: " + "; ".join(ways[:-1]) + "; or " + ways[-1] + " (docs/engines/checkpoint.md)"


def permutation_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The PERMUTATION_NAME record `permute-checkpoint` left in `model_dir`, or None."""
    path = Path(model_dir) / PERMUTATION_NAME
    if not path.is_file():
        return None
    record = read_json(path, CheckpointError)
    return record if isinstance(record, dict) and record.get("format") == PERMUTATION_FORMAT else None


def ep_size_note(model_dir: str | Path, world: int) -> str | None:
    """A note when a renumbered checkpoint runs contiguous on another number of ranks than the
    placement it realises was made for, else None.

    That is legal, but the layout is then no longer the placement: with fewer ranks each holds
    several of its GPUs whole (the gain stays); with more, each GPU's experts are cut in
    contiguous blocks that the solver never chose.
    """
    record = permutation_record(model_dir)
    num_gpus = record.get("num_gpus") if record else None
    if not isinstance(num_gpus, int) or num_gpus == world:
        return None
    head = f"{model_dir} was renumbered for {num_gpus} GPUs and runs on {world} rank{'s' if world > 1 else ''}: "
    if num_gpus % world == 0:
        return head + f"each rank holds {num_gpus // world} of the placement's GPUs whole"
    return head + (f"each of the placement's GPUs is split over {world // num_gpus} ranks" if world % num_gpus == 0
                   else "its GPUs do not map onto the ranks") + f"; solve for {world} GPUs to keep the gain"


def check_not_applied(model_dir: str | Path, placement: Placement) -> None:
    """Refuse `placement` on a checkpoint that `permute-checkpoint` already renumbered for it.

    The renumbered checkpoint realises the placement under a contiguous layout; applying the
    placement again moves experts a second time and silently loses its gain. "For it" means the
    same layout, or a placement fitted on the same trace (so written in the original numbering).
    """
    record = permutation_record(model_dir)
    if record is None:
        return
    same_trace = placement.trace_sha256 is not None and placement.trace_sha256 == record.get("placement_trace_sha256")
    try:
        same_layout = np.array_equal(permutation(placement), np.asarray(record.get("new_to_old")))
    except PlacementError:  # replicas or uneven counts: not a layout permute-checkpoint writes
        same_layout = False
    if same_layout:
        raise PlacementError(
            f"{model_dir} was renumbered by `moeplace permute-checkpoint` for this placement ({PERMUTATION_NAME}): "
            f"its contiguous layout already realises it, and applying it again would move the experts a second "
            f"time. Use this checkpoint without the placement, or the original ({record.get('source')}) with it")
    if same_trace:
        raise PlacementError(
            f"{model_dir} was renumbered by `moeplace permute-checkpoint` for a placement fitted on the same trace "
            f"as this one ({PERMUTATION_NAME}): this placement numbers the experts as the original checkpoint does, "
            f"not as this one, so applying it here would put other experts on each GPU. Use the original "
            f"({record.get('source')}) with it")


def require_config(ckpt: Checkpoint, why: str) -> None:
    """Refuse a model directory without config.json (open_checkpoint reads it as {}: every check
    of the family or the layer count then passes unseen). `why`: what the command reads there,
    "COMMAND reads ... there, to ...", for the one line."""
    if not (ckpt.root / "config.json").is_file():
        raise CheckpointError(f"{ckpt.root}: no config.json: {why}; give the save_pretrained directory")


def check_group_routing(config: dict[str, Any], new_to_old: np.ndarray, where: str = "config.json") -> None:
    """Reject a renumbering that breaks group-limited routing (DeepSeek n_group / topk_group).

    Such routers score contiguous id blocks of E / n_group experts as groups and keep the best
    topk_group groups, so each new group must be exactly one old group, or routing changes.
    A field the config leaves out is what transformers gives it (_class_defaults): a DeepSeek-V3
    config without n_group routes over 8 groups. `where` names the config in the one-line error
    for a count that is not an integer.
    """
    cfg = {**_class_defaults(text_config(config)), **text_config(config)}
    n_group, topk_group = _group_count(cfg, "n_group", where), _group_count(cfg, "topk_group", where)
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


def _class_defaults(cfg: dict[str, Any]) -> dict[str, Any]:
    """The routing fields a config leaves out, as transformers fills them when it loads the model:
    its config class's defaults (DeepseekV3Config: n_group 8, topk_group 4; DeepSeek-V2's: no
    groups, "greedy"), for n_group, topk_group and topk_method only. {} for a family transformers
    does not know, or a config that writes all three (transformers is then not imported)."""
    keys = ("n_group", "topk_group", "topk_method")
    if all(k in cfg for k in keys) or not isinstance(cfg.get("model_type"), str):
        return {}
    try:
        from transformers import CONFIG_MAPPING

        defaults = CONFIG_MAPPING[cfg["model_type"]]()
    except Exception:  # an unknown family (KeyError), or a class that cannot be built bare: no defaults
        return {}
    return {k: getattr(defaults, k) for k in keys if k not in cfg and hasattr(defaults, k)}


def _group_count(cfg: dict[str, Any], key: str, where: str) -> int:
    """n_group / topk_group of a config: a JSON integer (absent, null or 0: no groups, 1). A string,
    float or list is refused, not cast: int("x") failed, int(4.5) would check groups of another size."""
    value = cfg.get(key)
    if value is None:
        return 1
    if not isinstance(value, int) or isinstance(value, bool):
        raise CheckpointError(f"{where}: {key} must be an integer, got {json.dumps(value)[:40]}")
    return value or 1


def permute_checkpoint(
    model_dir: str | Path, placement: Placement, out_dir: str | Path, overwrite: bool = False, progress: bool = False,
    inputs: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Write the renumbered checkpoint to `out_dir` atomically; return the permutation record.

    `overwrite` replaces only an earlier output of this function (it holds PERMUTATION_NAME);
    `inputs` are the other files this run reads (the placement file): `out_dir` may not hold them.

    1. read headers, find the MoE layers, check the placement fits the model;
    2. new_to_old from the placement (no replicas, E/G experts per GPU; group routing kept);
    3. copy non-weight files, rewrite each shard by byte ranges, rewrite the index;
    4. rename the finished temp directory onto `out_dir`.
    """
    ckpt = open_checkpoint(model_dir)
    shown = Path(out_dir)
    out = _check_output(ckpt.root, shown, overwrite, [Path(p) for p in inputs])  # resolved
    blocks = moe_blocks(ckpt)
    placement.check_fits(len(blocks), blocks[0].num_experts, what="checkpoint")
    model_type = ckpt.config.get("model_type")
    placement.check_model(model_type, [b.layer for b in blocks], what="checkpoint")
    check_not_applied(ckpt.root, placement)
    new_to_old = permutation(placement, model_type)
    config_path = ckpt.root / "config.json"
    check_group_routing(ckpt.config, new_to_old, str(config_path))
    total = sum(e.end - e.begin for tensors in ckpt.shards.values() for e in tensors.values())
    plan = _plan(ckpt, blocks, new_to_old)
    # the checks above found no family and no groups in a missing config: they did not run
    require_config(ckpt, "permute-checkpoint reads the model family and its group-limited routing (n_group, "
                         "topk_group) there, to refuse a renumbering that would change routing, and copies it beside "
                         "the renumbered weights")

    with contextlib.ExitStack() as stack:
        try:  # where it cannot be written, say so (not "0.0 GiB free" as a pseudo-filesystem reports)
            out.parent.mkdir(parents=True, exist_ok=True)
            # removed on the way out unless renamed into place; first sweeps the stages of killed runs
            tmp = stack.enter_context(locked_stage(out.parent, f".{out.name}."))
        except OSError as e:
            raise CheckpointError(f"-o {shown}: cannot create it ({e.strerror or e})") from None
        free = shutil.disk_usage(out.parent).free  # after the sweep: a killed run's stage is free space again
        if free < total:
            raise CheckpointError(f"{out.parent}: {free / 2**30:.1f} GiB free, the permuted checkpoint needs "
                                  f"{total / 2**30:.1f} GiB")
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
    return record


def _plan(ckpt: Checkpoint, blocks: list[MoeBlock], new_to_old: np.ndarray) -> dict[str, tuple[str, np.ndarray | None]]:
    """MoE tensor name -> (new name, row order [E] or None); tensors not listed are copied as they are.

    new_to_old int64 [L, E]: per-expert tensors are renamed to their new id, fused and router
    tensors [E, ...] keep their name and have their rows reordered.
    """
    entries = {name: e for tensors in ckpt.shards.values() for name, e in tensors.items()}
    plan: dict[str, tuple[str, np.ndarray | None]] = {}
    for block, order in zip(blocks, new_to_old):
        old_to_new = np.argsort(order)
        for expert, names in block.per_expert.items():
            old, new = f"{block.prefix}.experts.{expert}.", f"{block.prefix}.experts.{int(old_to_new[expert])}."
            plan.update({name: (new + name[len(old):], None) for name in names})
        for name in (*block.fused, *block.router):
            entry = entries[name]  # [E, ...]: moe_blocks put the [] and [1, ...] ones in block.shared
            if (entry.end - entry.begin) % block.num_experts:  # sub-byte packing across rows
                raise CheckpointError(f"{name}: {entry.end - entry.begin} bytes do not split into "
                                      f"{block.num_experts} expert rows; don't know how to renumber it")
            plan[name] = (name, order)
    return plan


def _write_shard(
    src: Path, tensors: dict[str, TensorEntry], metadata: dict[str, str] | None,
    plan: dict[str, tuple[str, np.ndarray | None]], dst: Path,
) -> Iterator[tuple[str, str, int]]:
    """Write one shard with renamed / row-reordered tensors; yield (old, new, bytes) per tensor."""
    ordered = sorted(tensors.items(), key=lambda kv: kv[1].begin)
    jobs = [(name, *plan.get(name, (name, None)), entry) for name, entry in ordered]
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
        holds_weights = path.suffix in PICKLED_WEIGHTS + (".safetensors",) or (
            path.is_dir() and any(p.suffix in PICKLED_WEIGHTS + (".safetensors",) for p in path.rglob("*"))
        )
        if holds_weights:
            skipped.append(name)
        elif path.is_dir():
            shutil.copytree(path, dst / name)
        else:
            shutil.copy2(path, dst / name)
    return skipped


def _check_output(src: Path, out: Path, overwrite: bool, inputs: list[Path]) -> Path:
    """The resolved output directory, or a one-line refusal before any work.

    Replacing a directory deletes it, so only an earlier permute-checkpoint output (it holds
    PERMUTATION_NAME) may be replaced, never one holding an input of this run or the cwd; and the
    temp siblings get a real name (`-o .` has none).
    """
    src_r, out_r, cwd = src.resolve(), out.resolve(), Path.cwd().resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise CheckpointError(f"-o {out}: must be a directory outside MODEL_DIR {src} (and not containing it)")
    if out_r == cwd or out_r in cwd.parents:
        raise CheckpointError(f"-o {out}: is the current directory or contains it ({cwd}); pick another path")
    for path in inputs:
        if out_r in path.resolve().parents:
            raise CheckpointError(f"-o {out}: holds {path}, an input of this run; pick another path")
    if not out_r.exists():  # resolved: a dangling link is its missing target
        return out_r
    if not out_r.is_dir():
        raise CheckpointError(f"-o {out}: exists and is not a directory")
    try:
        ours = permutation_record(out_r) is not None
    except CheckpointError:  # an unreadable marker is not ours either
        ours = False
    if not ours:
        raise CheckpointError(f"-o {out}: exists and is not a permute-checkpoint output (no valid {PERMUTATION_NAME}); "
                              "remove it or pick another path")
    if not overwrite:
        raise CheckpointError(f"-o {out}: already exists; pass --overwrite to replace it")
    return out_r


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename `tmp` onto the resolved `out`; an existing `out` is replaced only after the new one
    is complete, and is put back if the swap fails, so no .old directory is left behind."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    moved = old / out.name
    try:
        os.replace(out, moved)
    except OSError:
        old.rmdir()
        raise
    try:
        os.replace(tmp, out)
    except OSError:
        try:
            os.replace(moved, out)
        except OSError as e:
            raise CheckpointError(f"{out}: replacing it failed and the earlier output is left in {moved} "
                                  f"({e.strerror or e})") from None
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)
