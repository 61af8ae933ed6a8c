"""DeepSeek EPLB's arrays: the physical-expert layout every engine format is built from.

DeepSeek's `eplb.rebalance_experts` (github.com/deepseek-ai/EPLB, eplb.py) returns, per MoE layer:

    phy2log  int [layers, physical]                 logical expert held by each physical slot
    log2phy  int [layers, logical, physical-logical+1]  physical slots of each logical expert, -1 padded
    logcnt   int [layers, logical]                  number of copies of each logical expert

Physical slot s lives on GPU s // (physical / gpus): every GPU holds the same number of slots.
A moeplace placement numbers its slots the same way (`Placement.physical_slots`: GPU-major,
on each GPU its primary experts in ascending id, then its replicas), so

    phy2log[l] = [expert for gpu, expert in placement.physical_slots(l)]

File forms written here: JSON {"phy2log", "log2phy", "logcnt", "num_gpus", "gpus_per_node"} or,
for an output path ending in .npz, the same arrays in an .npz.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import PlacementError, warn
from moeplace.io import existing_file, read_json, read_npz, save_npz_atomic, write_json_atomic
from moeplace.placement import Placement, validate_placement
from moeplace.trace.format import MAX_EXPERTS


def physical_to_logical(placement: Placement) -> np.ndarray:
    """phy2log int64 [L, P] of a placement whose GPUs all hold the same number of slots.

    Engines infer a slot's GPU from its index alone (s // (P / G)), so a placement with
    unequal slot counts per GPU, or a different slot count per layer, has no engine form.
    """
    rows: list[list[int]] = []
    for layer in range(placement.num_layers):
        per_gpu = [placement.experts_on_gpu(layer, gpu) for gpu in range(placement.num_gpus)]
        counts = {len(experts) for experts in per_gpu}
        if len(counts) > 1:
            fewest = min(range(placement.num_gpus), key=lambda g: len(per_gpu[g]))
            most = max(range(placement.num_gpus), key=lambda g: len(per_gpu[g]))
            raise PlacementError(
                f"layer {layer}: GPU {most} holds {len(per_gpu[most])} physical experts but GPU {fewest} "
                f"holds {len(per_gpu[fewest])}; engines give every GPU the same number of slots "
                "(slot s on GPU s // slots_per_gpu): re-solve with an equal number of copies per GPU"
            )
        rows.append([expert for experts in per_gpu for expert in experts])
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise PlacementError(
            f"layers have different numbers of physical experts ({sorted(widths)}); engines use one "
            "count for every layer (logical experts + redundant experts): give every layer the same "
            "number of replicas"
        )
    return np.asarray(rows, dtype=np.int64)


def logical_to_physical(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2phy int64 [L, E, P - E + 1] -1 padded, slots ascending; logcnt int64 [L, E])."""
    num_layers, num_physical = phy2log.shape
    log2phy = np.full((num_layers, num_experts, num_physical - num_experts + 1), -1, dtype=np.int64)
    logcnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    for layer in range(num_layers):
        for slot, expert in enumerate(phy2log[layer]):
            log2phy[layer, expert, logcnt[layer, expert]] = slot
            logcnt[layer, expert] += 1
    return log2phy, logcnt


def placement_from_physical(
    phy2log: Any, num_gpus: int, gpus_per_node: int, num_experts: int | None = None,
    name: str = "file", source: str = "engine", what: str = "physical_to_logical map", experts_from: str = "",
) -> Placement:
    """Read a [layers, physical] slot table back into a placement.

    1. slot s lives on GPU s // (P / G);
    2. an expert's first slot is its primary copy, later slots on other GPUs its replicas;
    3. a second copy on the same GPU adds nothing (DeepSeek EPLB can emit one,
       deepseek-ai/EPLB#22): it is dropped with a note on stderr.

    `num_experts` defaults to the largest id + 1; `experts_from` says where a given one came from.
    """
    table = int_table(phy2log, name, what)
    num_layers, num_physical = table.shape
    if num_gpus < 1 or gpus_per_node < 1 or num_gpus % gpus_per_node:  # callers that read counts use resolve_gpus
        raise PlacementError(f"--gpus {num_gpus} must be >= 1 and a multiple of --gpus-per-node {gpus_per_node}")
    if num_physical % num_gpus:
        raise PlacementError(
            f"{name}: {num_physical} physical experts per layer cannot be split equally over {num_gpus} GPUs; "
            "is --gpus the engine's expert-parallel size?"
        )
    inferred = num_experts is None
    if (table >= MAX_EXPERTS).any() or (num_experts is not None and num_experts > MAX_EXPERTS):
        # before anything is sized by the count: an id of 1e9 would make a [layers, 1e9] table
        big = np.argwhere(table >= MAX_EXPERTS)
        where = (f"layer {int(big[0][0])} slot {int(big[0][1])} holds expert id {int(table[tuple(big[0])])}"
                 if len(big) else f"{num_experts} experts" + (f" ({experts_from})" if experts_from else ""))
        raise PlacementError(f"{name}: {where}: moeplace handles at most {MAX_EXPERTS} experts per layer")
    num_experts = int(table.max()) + 1 if num_experts is None else num_experts
    if table.min() < 0 or table.max() >= num_experts:
        layer, slot = (int(i[0]) for i in np.nonzero((table < 0) | (table >= num_experts)))
        raise PlacementError(f"{name}: layer {layer} slot {slot} holds expert id {int(table[layer, slot])}, "
                             f"outside [0, {num_experts})" + (f" ({experts_from})" if experts_from else ""))
    slots_per_gpu = num_physical // num_gpus
    expert_to_gpu = np.full((num_layers, num_experts), -1, dtype=np.int64)
    replicas: list[list[tuple[int, int]]] = []
    dropped = 0
    for layer in range(num_layers):
        seen: set[tuple[int, int]] = set()
        reps: list[tuple[int, int]] = []
        for slot, expert in enumerate(table[layer].tolist()):
            gpu = slot // slots_per_gpu
            if (expert, gpu) in seen:
                dropped += 1
            elif expert_to_gpu[layer, expert] < 0:
                expert_to_gpu[layer, expert] = gpu
            else:
                reps.append((expert, gpu))
            seen.add((expert, gpu))
        missing = np.flatnonzero(expert_to_gpu[layer] < 0)
        if missing.size:
            # with the count inferred from the largest id, one id out of range shows up as a missing expert
            hint = (f" (the expert count is taken as the largest id + 1 = {num_experts}: is id {num_experts - 1} "
                    "out of range?)" if inferred else "")
            raise PlacementError(f"{name}: layer {layer} has no physical copy of expert {int(missing[0])}{hint}")
        replicas.append(reps)
    if dropped:
        warn(f"{name}: {dropped} second copies of an expert on the same GPU counted once")
    if inferred and num_physical >= 2 * num_experts:  # engines add fewer redundant slots than experts
        warn(f"{name}: the map names only {num_experts} logical expert{'s' * (num_experts != 1)} (largest id + 1) for "
             f"{num_physical} physical slots per layer, so most slots would be copies: is it the right map? "
             "--model or --trace gives the model's expert count")
    placement = Placement(expert_to_gpu=expert_to_gpu, num_gpus=num_gpus, gpus_per_node=gpus_per_node,
                          replicas=replicas, solver={"name": f"{source} import", "file": name})
    return validate_placement(placement, name)


def resolve_gpus(name: str, gpus: int | None, gpus_per_node: int | None, file_gpus: int | None,
                 file_gpus_per_node: int | None, gpus_field: str, gpus_per_node_field: str) -> tuple[int, int, str]:
    """(GPUs, GPUs per node, note) from --gpus / --gpus-per-node, else the file's fields, checked,
    with errors naming where each count came from. No GPUs-per-node anywhere means one node; the
    note says so, for the caller to print once the file is read (the cross-node metrics depend on it)."""
    if gpus is not None and file_gpus is not None and gpus != file_gpus:
        raise PlacementError(f"{name}: the file is for {file_gpus} GPUs but --gpus is {gpus}")
    if gpus is None and file_gpus is None:
        raise PlacementError(f"{name}: the file does not say how many GPUs it is for: pass --gpus")
    num_gpus, gpus_from = (gpus, f"--gpus {gpus}") if gpus is not None else (file_gpus, f"{gpus_field} = {file_gpus}")
    assert num_gpus is not None  # one of the two, checked above
    note = ""
    if gpus_per_node is not None:
        per_node, per_node_from = gpus_per_node, f"--gpus-per-node {gpus_per_node}"
    elif file_gpus_per_node is not None:
        per_node, per_node_from = file_gpus_per_node, f"{gpus_per_node_field} = {file_gpus_per_node}"
    else:
        per_node, per_node_from = num_gpus, ""
        note = (f"{name} does not say how many GPUs a node has: all {num_gpus} taken as one node "
                "(pass --gpus-per-node)")
    if num_gpus < 1:
        raise PlacementError(f"{name}: {gpus_from} must be >= 1")
    if per_node < 1 or num_gpus % per_node:
        raise PlacementError(f"{name}: {gpus_from} must be a multiple of {per_node_from} (GPUs per node)")
    return num_gpus, per_node, note


def print_note(note: str) -> None:
    if note:
        warn(note)


def write_eplb(placement: Placement, path: str | Path) -> None:
    """Write phy2log / log2phy / logcnt as JSON, or .npz when `path` ends in .npz."""
    phy2log = physical_to_logical(placement)
    log2phy, logcnt = logical_to_physical(phy2log, placement.num_experts)
    meta = {"num_gpus": placement.num_gpus, "gpus_per_node": placement.gpus_per_node}
    if str(path).lower().endswith(".npz"):  # OUT.NPZ too: the name says the format
        save_npz_atomic(path, {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt,
                               **{k: np.asarray(v) for k, v in meta.items()}})
    else:
        write_json_atomic(path, {"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt, **meta})


def read_eplb(path: str | Path, num_gpus: int | None, gpus_per_node: int | None) -> Placement:
    """Read an EPLB file (JSON or .npz with at least `phy2log`) into a placement.

    --gpus / --gpus-per-node default to the file's num_gpus / gpus_per_node when it has them.
    """
    p = Path(path)
    doc = read_document(p)
    if "phy2log" not in doc:
        raise PlacementError(f"{p}: no 'phy2log' array (keys: {sorted(doc)})")
    num_gpus, gpus_per_node, note = resolve_gpus(str(p), num_gpus, gpus_per_node, int_field(doc, "num_gpus", str(p)),
                                           int_field(doc, "gpus_per_node", str(p)), "num_gpus", "gpus_per_node")
    num_experts = None
    if "logcnt" in doc:
        num_experts = int_table(doc["logcnt"], str(p), "logcnt").shape[1]
    placement = placement_from_physical(doc["phy2log"], num_gpus, gpus_per_node, num_experts, str(p), "eplb",
                                        experts_from="the width of logcnt" if num_experts else "")
    phy2log = int_table(doc["phy2log"], str(p), "phy2log")
    log2phy, logcnt = logical_to_physical(phy2log, placement.num_experts)
    if "logcnt" in doc:
        if not np.array_equal(logcnt, int_table(doc["logcnt"], str(p), "logcnt")):
            raise PlacementError(f"{p}: 'logcnt' does not match the copies counted in 'phy2log'")
    if "log2phy" in doc:
        check_slot_lists(doc["log2phy"], log2phy, str(p), "log2phy", "phy2log")
    print_note(note)
    return placement


def check_slot_lists(value: Any, log2phy: np.ndarray, name: str, key: str, phy_key: str) -> None:
    """A file's logical-to-physical array [layers, logical, width] must list, per (layer, expert),
    the slots `log2phy` (derived from its physical-to-logical map) lists: in any order, padded
    with -1 to any width. Engines read each array as given, so a mismatch is not one layout."""
    try:
        given = np.asarray(value)
    except (TypeError, ValueError):  # ragged nested lists
        given = np.asarray(None)
    if (given.ndim != 3 or given.shape[:2] != log2phy.shape[:2] or not np.issubdtype(given.dtype, np.integer)
            or not _same_slots(given, log2phy)):
        raise PlacementError(f"{name}: '{key}' does not list the slots of each expert in '{phy_key}' (expected an "
                             f"integer [layers={log2phy.shape[0]}][experts={log2phy.shape[1]}][copies] table, -1 padded)")


def _same_slots(given: np.ndarray, log2phy: np.ndarray) -> bool:
    """Same slots per (layer, expert) in any order, -1 padding of any width."""
    width = max(given.shape[2], log2phy.shape[2])
    pad = [(0, 0), (0, 0)]
    a = np.pad(given.astype(np.int64), [*pad, (0, width - given.shape[2])], constant_values=-1)
    b = np.pad(log2phy, [*pad, (0, width - log2phy.shape[2])], constant_values=-1)
    a = np.where(a < 0, -1, a)
    return bool(np.array_equal(np.sort(a, axis=-1), np.sort(b, axis=-1)))


def read_document(p: Path) -> dict[str, Any]:
    """A JSON object, or the arrays of an .npz (never unpickled), or one clear error."""
    existing_file(p, "EPLB", PlacementError)
    if p.suffix.lower() == ".npz":
        return read_npz(p, "EPLB", PlacementError)
    doc = read_json(p, PlacementError)
    if not isinstance(doc, dict):
        raise PlacementError(f"{p}: expected a JSON object")
    return doc


def int_table(value: Any, name: str, what: str) -> np.ndarray:
    """A rectangular 2-D integer table, or one clear error. true/false in a JSON table are refused:
    numpy would read [[0, true]] as the ids [[0, 1]]."""
    try:
        table = np.asarray(value)
    except (TypeError, ValueError):
        table = np.asarray(None)
    if holds_bool(value):
        table = np.asarray(None)
    if table.ndim != 2 or 0 in table.shape or not np.issubdtype(table.dtype, np.integer):
        raise PlacementError(f"{name}: {what} must be a non-empty rectangular [layers][experts] table of integers")
    return table.astype(np.int64)


def holds_bool(value: Any) -> bool:
    """Whether a JSON [rows][columns] list holds a true/false, which numpy would read as 1/0."""
    return isinstance(value, list) and any(isinstance(x, bool) for row in value if isinstance(row, list) for x in row)


def int_field(doc: dict[str, Any], key: str, name: str) -> int | None:
    """An integer field of a JSON or .npz document: None when absent or null, else an integer (a
    0-d or 1-element integer array from an .npz) or one clear error. 2.9, true and "4" are
    refused: int() would quietly make them 2, 1 and 4 GPUs."""
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1 and np.issubdtype(value.dtype, np.integer):
        return int(value.reshape(()))
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    shown = value if not isinstance(value, np.ndarray) else f"an array of {value.dtype} {list(value.shape)}"
    raise PlacementError(f"{name}: '{key}' must be an integer, got {shown!r}")
