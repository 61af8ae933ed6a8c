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

from moeplace.errors import PlacementError
from moeplace.export.eplb import logical_to_physical, physical_to_logical, placement_from_physical, read_document
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

    The expert map says its device count and the state file its ep_size; --gpus must agree.
    """
    p = Path(path)
    doc = read_document(p)
    file_gpus: Any
    if "layer_list" in doc:
        table, file_gpus = _ascend_table(doc, p)
    elif "physical_to_logical_map" in doc:
        table, file_gpus = doc["physical_to_logical_map"], doc.get("ep_size")
    else:
        raise PlacementError(f"{p}: neither a vLLM EPLB state ('physical_to_logical_map') nor a vllm-ascend "
                             f"expert map ('layer_list'); keys: {sorted(doc)}")
    file_gpus = file_gpus if isinstance(file_gpus, int) else None
    if num_gpus and file_gpus and num_gpus != file_gpus:
        raise PlacementError(f"{p}: the file is for {file_gpus} GPUs but --gpus is {num_gpus}")
    num_gpus = num_gpus or file_gpus
    if num_gpus is None:
        raise PlacementError(f"{p}: the file does not say how many GPUs it is for: pass --gpus")
    gpus_per_node = gpus_per_node or doc.get("gpus_per_node") or num_gpus
    return placement_from_physical(table, num_gpus, int(gpus_per_node), name=str(p), source="vllm")


def _ascend_table(doc: dict[str, Any], p: Path) -> tuple[list[list[int]], int]:
    """[layers][devices * experts per device] from an expert map, devices in device_id order."""
    try:
        layers = sorted(doc["layer_list"], key=lambda layer: int(layer.get("layer_id", 0)))
        rows, counts = [], set()
        for layer in layers:
            devices = sorted(layer["device_list"], key=lambda d: int(d.get("device_id", 0)))
            counts.add(len(devices))
            rows.append([int(e) for d in devices for e in d["device_expert"]])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PlacementError(f"{p}: malformed vllm-ascend expert map ({e!r})") from None
    if len(counts) != 1:
        raise PlacementError(f"{p}: layers list different device counts {sorted(counts)}")
    if int(doc.get("moe_layer_count", len(rows))) != len(rows):
        raise PlacementError(f"{p}: moe_layer_count is {doc.get('moe_layer_count')} but layer_list has {len(rows)} layers")
    return rows, counts.pop()

