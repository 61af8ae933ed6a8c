"""SGLang's `--init-expert-location` file: {"physical_to_logical_map": [layers][physical experts]}.

Source: sgl-project/sglang python/sglang/srt/eplb/expert_location.py,
`compute_initial_expert_location_metadata`: a .json (or .pt, or inline JSON) object holding
`physical_to_logical_map` is passed as keyword arguments to `ExpertLocationMetadata.init_by_mapping`,
so it must hold that key and nothing else; SGLang derives `logical_to_all_physical_map` itself.
(An object holding `logical_count` instead makes SGLang run its own EPLB on those loads.)

Layout SGLang assumes:
    rows      one per decoder layer, `config.num_hidden_layers` of them, dense layers included
              (DeepSeek-V3's first_k_dense_replace layers); those rows are never read, and get
              SGLang's trivial map (slot s -> expert s % E). SGLang checks no row count:
              `init_by_mapping` takes the table as given (metadata.num_layers = its rows) and each
              lookup indexes it by the MoE layer's decoder id, so a map ending at the last MoE
              layer (no depth known) runs the same; only `init_trivial`'s shape has more rows.
    columns   num_physical = num_logical + --ep-num-redundant-experts, divisible by --ep-size;
              physical expert s lives on EP rank s // (num_physical / ep_size).
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import PlacementError
from moeplace.export.eplb import holds_bool, physical_to_logical, placement_from_physical, read_document
from moeplace.io import write_json_atomic
from moeplace.placement import Placement
from moeplace.trace.format import layer_ranges

KEY = "physical_to_logical_map"
# model_type of the SGLang model classes without `get_model_config_for_expert_location` (0.5.23,
# run by scripts/check_engines.py): SGLang builds no expert-location metadata for them, so it
# never reads an --init-expert-location map.
MAP_IGNORED = {"mixtral": "Mixtral", "olmoe": "OLMoE"}
# Decoder layers a map may have rows for: far above any model (DeepSeek-V3 has 61), low enough
# that a typo (--num-hidden-layers 100000000) is refused instead of sizing a table by it.
MAX_DECODER_LAYERS = 1 << 16


def sglang_map(placement: Placement, moe_layers: list[int] | None = None, num_hidden_layers: int | None = None) -> np.ndarray:
    """physical_to_logical_map int64 [num_hidden_layers, P]: MoE layer i in row moe_layers[i].

    Defaults: MoE layer i is decoder layer i and there are no other layers.
    """
    phy2log = physical_to_logical(placement)
    if moe_layers is None:
        if num_hidden_layers is not None and num_hidden_layers < placement.num_layers:
            raise PlacementError(f"{num_hidden_layers} decoder layers cannot hold the placement's {placement.num_layers} "
                                 "MoE layers")
        moe_layers = list(range(placement.num_layers))
    # without the depth, rows end at the last MoE layer: trailing dense rows are never read by SGLang
    rows = max(moe_layers, default=-1) + 1 if num_hidden_layers is None else num_hidden_layers
    if rows > MAX_DECODER_LAYERS:
        raise PlacementError(f"{rows} decoder layers: more than the {MAX_DECODER_LAYERS} moeplace handles")
    _check_layers(moe_layers, placement.num_layers, rows)
    num_physical = phy2log.shape[1]
    table = np.tile(np.arange(num_physical) % placement.num_experts, (rows, 1))
    table[moe_layers] = phy2log
    return table


def write_sglang(placement: Placement, path: str | Path, moe_layers: list[int] | None = None,
                 num_hidden_layers: int | None = None) -> np.ndarray:
    if not str(path).endswith(".json"):
        raise PlacementError(f"-o {path}: SGLang reads --init-expert-location as a JSON file only when its name "
                             "ends in .json (.pt means torch.load, anything else is parsed as inline JSON)")
    table = sglang_map(placement, moe_layers, num_hidden_layers)
    write_json_atomic(path, {KEY: table})
    return table


def read_sglang(path: str | Path, num_gpus: int, gpus_per_node: int, moe_layers: list[int] | None = None,
                num_experts: int | None = None, experts_from: str = "", layers_from: str = "") -> Placement:
    """Read an `--init-expert-location` file (.json, or .pt read with weights_only) into a placement.

    `moe_layers` picks the rows of MoE layers (default: every row is one), `layers_from` says
    where they came from (e.g. "--trace t.npz's meta.moe_layers"), for errors; `num_experts`
    defaults to the largest id + 1.
    """
    p = Path(path)
    doc = _load(p)
    if KEY not in doc:
        if "logical_count" in doc:
            raise PlacementError(
                f"{p}: holds 'logical_count' (expert loads, from which SGLang computes its own EPLB placement), "
                "not a placement; import it as loads with `moeplace import` and solve"
            )
        raise PlacementError(f"{p}: no '{KEY}' (keys: {sorted(map(str, doc))})")  # a .pt dict may have int keys
    table = doc[KEY]
    if holds_bool(table):
        raise PlacementError(f"{p}: '{KEY}' must be a table of integers (it holds true/false)")
    try:
        # a .pt tensor: detached (one saved with requires_grad refuses .numpy()); bfloat16 and sparse raise
        table = table.detach().numpy() if hasattr(table, "numpy") else np.asarray(table)
    except (TypeError, ValueError, RuntimeError) as e:  # ragged lists, tensor kinds numpy lacks
        why = (str(e).splitlines() or [type(e).__name__])[0]  # torch's messages may run over several lines
        raise PlacementError(f"{p}: '{KEY}' must be a rectangular [layers][physical experts] table of integers "
                             f"({why})") from None
    if moe_layers is not None:
        if table.ndim != 2:
            raise PlacementError(f"{p}: '{KEY}' must be a [layers][physical experts] table")
        rows = table.shape[0]
        if moe_layers and max(moe_layers) >= rows:
            source = layers_from or "the moe_layers given"
            found = (f"{p}: {rows} row{'s' * (rows != 1)} (SGLang writes one per decoder layer), but the MoE layers are "
                     f"decoder layers {layer_ranges(moe_layers)} (from {source}), and there is no row "
                     f"{layer_ranges([n for n in moe_layers if n >= rows])}")
            if len(moe_layers) != rows or source.startswith("--moe-layers"):
                raise PlacementError(f"{found}: a map of another model?")
            raise PlacementError(f"{found}: a map of another model, or of the MoE layers only (MoE layer i in row i, "
                                 "as `export --to sglang` writes without --model, --trace or --moe-layers)? For the "
                                 f"latter give --moe-layers 0-{rows - 1}")
        _check_layers(moe_layers, len(moe_layers), rows)
        table = table[moe_layers]
    return placement_from_physical(table, num_gpus, gpus_per_node, num_experts, name=str(p), source="sglang",
                                   experts_from=experts_from)


def rows_note(placement: Placement) -> str:
    """What reading every row of a map as an MoE layer assumed, naming the leading rows that hold
    the default layout: `export --to sglang` fills dense decoder layers' rows with it
    (DeepSeek-V3's first 3), so such a prefix is likely dense layers read as MoE ones."""
    phy2log = physical_to_logical(placement)
    default = np.arange(phy2log.shape[1]) % placement.num_experts
    prefix = 0
    while prefix < len(phy2log) and np.array_equal(phy2log[prefix], default):
        prefix += 1
    note = (f"no --model, --trace or --moe-layers: each of the map's {placement.num_layers} rows taken as an MoE "
            "layer")
    if 0 < prefix < len(phy2log):
        rows = "row 0 holds" if prefix == 1 else f"rows 0-{prefix - 1} hold"
        note += (f"; {rows} the default layout, as dense layers do in the maps "
                 f"`export --to sglang` writes: if they are dense, give --moe-layers {prefix}-{len(phy2log) - 1}")
    return note + " (or --model/--trace, which say which layers are MoE)"


def _load(p: Path) -> dict[str, Any]:
    if p.suffix.lower() == ".pt" and p.is_file():
        import torch  # only here: a .pt map is rare and torch is slow to import

        try:
            with warnings.catch_warnings():  # torch warns about the file before refusing it: the error says it all
                warnings.simplefilter("ignore")
                doc = torch.load(p, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's own text says to retry with weights_only=False: never here
            raise PlacementError(f"{p}: a weights-only load refuses it (it holds Python objects, or is no torch file); "
                                 "moeplace never unpickles: save the map as JSON, or as a dict of tensors "
                                 "(torch.save({'physical_to_logical_map': tensor}))") from None
        except Exception as e:  # torch raises many types for a bad or unsafe file
            raise PlacementError(f"{p}: not a readable weights-only torch file ({type(e).__name__}: {e})") from None
        if not isinstance(doc, dict):
            raise PlacementError(f"{p}: expected a dict with '{KEY}'")
        return doc
    return read_document(p)


def _check_layers(moe_layers: list[int], num_moe_layers: int, rows: int) -> None:
    if len(moe_layers) != num_moe_layers:
        raise PlacementError(f"{len(moe_layers)} MoE layer ids given for a placement of {num_moe_layers} MoE layers")
    if len(set(moe_layers)) != len(moe_layers) or min(moe_layers) < 0 or max(moe_layers) >= rows:
        raise PlacementError(f"MoE layer ids must be distinct and within [0, {rows}) decoder layers")
