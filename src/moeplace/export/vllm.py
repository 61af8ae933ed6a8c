"""vLLM: its EPLB state arrays, and vllm-ascend's static `expert_map_path` file.

Upstream vLLM (vllm/config/parallel.py, `ParallelConfig`) has no file option for an initial
expert placement: `--expert-placement-strategy` is `linear` (contiguous, the default) or
`round_robin`, and `--enable-eplb` starts from the linear layout plus redundant slots
(`EplbState.build_initial_global_physical_to_logical_map`) and rebalances by measured load.
So for upstream vLLM the way to run a moeplace placement is `moeplace permute-checkpoint`
(a renumbered checkpoint under the default linear layout). `--to vllm` writes the arrays of
vLLM's `EplbState` (vllm/distributed/eplb/eplb_state.py), for tooling that sets that state:

    physical_to_logical_map  [moe_layers, physical]                     (MoE layers only)
    logical_to_physical_map  [moe_layers, logical, redundant + 1], -1 padded
    logical_replica_count    [moe_layers, logical]

Physical expert s lives on EP rank s // (physical / ep_size), as in SGLang and DeepSeek EPLB.

vllm-ascend reads a static placement from `--additional-config '{"expert_map_path": FILE}'`
(0.23: vllm_ascend/eplb/core/eplb_utils.py, `expert_file_to_tensor` / `init_eplb_config`; run
against it by scripts/check_engines.py):

    {"moe_layer_count": L, "layer_list": [{"layer_id": l, "device_count": G,
      "device_list": [{"device_id": g, "device_expert": [logical experts on g]}]}]}

It takes the i-th MoE layer's entry and the devices by list position (the ids are labels), and
stacks the lists into one tensor, so every device holds the same number of experts. FILE must
end in .json (vllm_ascend/ascend_config.py refuses any other name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import PlacementError
from moeplace.export.eplb import (check_slot_lists, int_field, int_table, logical_to_physical, physical_to_logical,
                                  placement_from_physical, print_note, read_document, resolve_gpus)
from moeplace.io import write_json_atomic
from moeplace.placement import Placement

VLLM_FORMAT = "moeplace.vllm-eplb-state/v1"


def write_vllm(placement: Placement, path: str | Path) -> None:
    phy2log = physical_to_logical(placement)
    log2phy, count = logical_to_physical(phy2log, placement.num_experts)
    write_json_atomic(path, {
        "format": VLLM_FORMAT,
        "ep_size": placement.num_gpus,
        "gpus_per_node": placement.gpus_per_node,
        "num_moe_layers": placement.num_layers,
        "num_logical_experts": placement.num_experts,
        "num_redundant_experts": int(phy2log.shape[1] - placement.num_experts),
        "physical_to_logical_map": phy2log,
        "logical_to_physical_map": log2phy,
        "logical_replica_count": count,
    })


def write_vllm_ascend(placement: Placement, path: str | Path) -> None:
    if not str(path).endswith(".json"):
        raise PlacementError(f"-o {path}: vllm-ascend refuses an expert_map_path whose name does not end in .json")
    phy2log = physical_to_logical(placement)
    per_gpu = phy2log.shape[1] // placement.num_gpus
    write_json_atomic(path, {
        "moe_layer_count": placement.num_layers,
        "layer_list": [
            {
                "layer_id": layer,
                "device_count": placement.num_gpus,
                "device_list": [
                    {"device_id": gpu, "device_expert": row[gpu * per_gpu:(gpu + 1) * per_gpu]}
                    for gpu in range(placement.num_gpus)
                ],
            }
            for layer, row in enumerate(phy2log.tolist())
        ],
    })


def read_vllm(path: str | Path, num_gpus: int | None, gpus_per_node: int | None) -> Placement:
    """Read a `--to vllm` state file or a vllm-ascend expert map into a placement.

    The expert map says its device count and the state file its ep_size; --gpus must agree. An
    expert map says nothing of nodes: --gpus-per-node gives it (default: one node). The state
    file's other arrays and counts, when present, must agree with its physical_to_logical_map.
    """
    p = Path(path)
    doc = read_document(p)
    if "layer_list" in doc:
        table, devices = _ascend_table(doc, p)
        num_gpus, gpus_per_node, note = resolve_gpus(str(p), num_gpus, gpus_per_node, devices, None,
                                                     "devices per layer in layer_list", "")
        placement = placement_from_physical(table, num_gpus, gpus_per_node, name=str(p), source="vllm",
                                            what="expert map (device_expert lists)")
        print_note(note)
        return placement
    if "physical_to_logical_map" not in doc:
        raise PlacementError(f"{p}: neither a vLLM EPLB state ('physical_to_logical_map') nor a vllm-ascend "
                             f"expert map ('layer_list'); keys: {sorted(doc)}")
    counts = {key: int_field(doc, key, str(p)) for key in ("ep_size", "gpus_per_node", "num_logical_experts",
                                                    "num_moe_layers", "num_redundant_experts")}
    num_gpus, gpus_per_node, note = resolve_gpus(str(p), num_gpus, gpus_per_node, counts["ep_size"],
                                                 counts["gpus_per_node"], "ep_size", "gpus_per_node")
    placement = placement_from_physical(doc["physical_to_logical_map"], num_gpus, gpus_per_node,
                                        counts["num_logical_experts"], name=str(p), source="vllm",
                                        experts_from=f"num_logical_experts = {counts['num_logical_experts']}"
                                        if counts["num_logical_experts"] is not None else "")
    _check_state(doc, counts, p, placement.num_experts)
    print_note(note)
    return placement


def _check_state(doc: dict[str, Any], counts: dict[str, int | None], p: Path, num_experts: int) -> None:
    """Refuse a state file whose counts or derived arrays contradict its physical_to_logical_map:
    vLLM reads each array as given, so a mismatch means the file is not one EplbState."""
    phy2log = int_table(doc["physical_to_logical_map"], str(p), "physical_to_logical_map")
    layers, physical = phy2log.shape
    for key, expected in (("num_moe_layers", layers), ("num_redundant_experts", physical - num_experts)):
        if counts[key] is not None and counts[key] != expected:
            raise PlacementError(f"{p}: '{key}' is {counts[key]} but physical_to_logical_map has {expected}")
    log2phy, replica_count = logical_to_physical(phy2log, num_experts)
    if "logical_replica_count" in doc:
        given = int_table(doc["logical_replica_count"], str(p), "logical_replica_count")
        if not np.array_equal(given, replica_count):
            raise PlacementError(f"{p}: 'logical_replica_count' does not match the copies counted in "
                                 "'physical_to_logical_map'")
    if "logical_to_physical_map" in doc:
        check_slot_lists(doc["logical_to_physical_map"], log2phy, str(p), "logical_to_physical_map",
                         "physical_to_logical_map")


def _ascend_table(doc: dict[str, Any], p: Path) -> tuple[list[list[int]], int]:
    """[layers][devices * experts per device] from an expert map, layers and devices in list order:
    vllm-ascend's expert_file_to_tensor indexes layer_list and device_list by position and never
    reads layer_id or device_id (labels), so neither does this."""
    try:
        rows, counts = [], set()
        sizes: list[list[int]] = []
        if not isinstance(doc["layer_list"], list):
            raise TypeError(f"layer_list is {type(doc['layer_list']).__name__}, not a list")
        for layer in doc["layer_list"]:
            devices = layer["device_list"]
            if not isinstance(devices, list):
                raise TypeError(f"device_list is {type(devices).__name__}, not a list")
            counts.add(len(devices))
            experts = [e for d in devices for e in d["device_expert"]]
            if not all(isinstance(e, int) and not isinstance(e, bool) for e in experts):
                raise TypeError(f"device_expert holds {next(e for e in experts if not isinstance(e, int) or isinstance(e, bool))!r}, "
                                "not an expert id")
            rows.append(experts)
            sizes.append([len(d["device_expert"]) for d in devices])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PlacementError(f"{p}: malformed vllm-ascend expert map ({e!r})") from None
    if not rows:
        raise PlacementError(f"{p}: layer_list is empty: the expert map places no MoE layer")
    if len(counts) != 1:
        raise PlacementError(f"{p}: layers list different device counts {sorted(counts)}")
    layer_count = int_field(doc, "moe_layer_count", str(p))
    if layer_count is not None and layer_count != len(rows):
        raise PlacementError(f"{p}: moe_layer_count is {doc.get('moe_layer_count')} but layer_list has {len(rows)} layers")
    # vllm-ascend stacks the device_expert lists into one tensor: every list has one length
    first = sizes[0][0] if sizes and sizes[0] else 0
    for i, per_device in enumerate(sizes):
        odd = next((d for d, n in enumerate(per_device) if n != first), None)
        if odd is not None:
            raise PlacementError(f"{p}: MoE layer {i}, device {odd}: device_expert lists {per_device[odd]} experts but "
                                 f"MoE layer 0, device 0 lists {first}; vllm-ascend stacks the lists into one tensor, "
                                 "so every device of every layer needs the same number")
    return rows, counts.pop()
