"""`moeplace export` and `moeplace permute-checkpoint`: hand a placement to the engines people run."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import click

from moeplace.errors import MoeplaceError, PlacementError
from moeplace.export.sglang import MAX_DECODER_LAYERS
from moeplace.placement import Placement, load_placement
from moeplace.options import OUTPUT_FILE, check_outside, check_writable, plural

TO_FORMATS = ("sglang", "vllm", "vllm-ascend", "eplb")


@contextlib.contextmanager
def _os_errors(output: Path, directory: bool = False) -> Iterator[None]:
    """Turn an OS failure (output is a directory, no permission, disk full) into one clear line."""
    if output.is_dir() and not directory:
        raise MoeplaceError(f"-o {output}: is a directory")
    try:
        yield
    except OSError as e:
        raise MoeplaceError(f"{e.filename or output}: {e.strerror or e}") from None


def parse_layers(spec: str, limit: int = MAX_DECODER_LAYERS, limit_from: str = "") -> list[int]:
    """'3-60' or '0,2,4-7' -> decoder layer ids (ranges inclusive), ascending, each below `limit`
    (the model's decoder layers, `limit_from` saying where that count came from; default: the most
    moeplace handles), checked before a range is expanded: '0-99999999999' is refused, not built."""
    layers: list[int] = []
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first > last:
                raise MoeplaceError(f"--moe-layers {spec!r}: range {part.strip()!r} runs backwards")
            if last >= limit:
                raise MoeplaceError(f"--moe-layers {spec!r}: layer {last} is beyond the model's {limit} decoder layers "
                                    f"({limit_from})" if limit_from else
                                    f"--moe-layers {spec!r}: layer {last} is beyond {limit - 1}, the largest decoder layer id "
                                    "moeplace handles")
            layers.extend(range(first, last + 1))
    except ValueError:
        raise MoeplaceError(f"--moe-layers {spec!r}: expected ids and inclusive ranges like '3-60' or '0,2,4-7'") from None
    if len(set(layers)) != len(layers):
        raise MoeplaceError(f"--moe-layers {spec!r}: a layer is listed twice")
    if layers != sorted(layers):  # MoE layer i goes to row layers[i]: 7,6,5 would reverse the model
        raise MoeplaceError(f"--moe-layers {spec!r}: list the layers in ascending order (MoE layer i is the i-th id)")
    return layers


def _check_layers(layers: list[int], depth: int | None, layers_from: str, depth_from: str) -> None:
    """Decoder layer ids from a model, a trace's meta or a placement's record, and the decoder
    depth, checked before the SGLang rows are sized by them: ascending, each once, within the
    depth (or what moeplace handles)."""
    if depth is not None and depth > MAX_DECODER_LAYERS:
        raise MoeplaceError(f"{depth_from}: {depth} decoder layers, more than the {MAX_DECODER_LAYERS} moeplace handles")
    if any(x < 0 for x in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
        raise MoeplaceError(f"{layers_from}: MoE layers {layers[:8]}{'...' if len(layers) > 8 else ''}: decoder layer "
                            "ids must be non-negative and ascending, each once")
    limit, limit_from = (depth, depth_from) if depth is not None else (MAX_DECODER_LAYERS, "what moeplace handles")
    if layers and layers[-1] >= limit:
        raise MoeplaceError(f"{layers_from}: MoE layer at decoder layer {layers[-1]}, beyond the {limit} decoder layers "
                            f"({limit_from})")


def _model_layers(model: Path | None, trace: Path | None, moe_layers: str | None, num_hidden_layers: int | None,
                  placement: Placement | None) -> tuple[list[int] | None, int | None, int | None, str | None]:
    """(decoder layer ids of the MoE layers, decoder depth, experts per layer, the model's
    `model_type`) from --model, --trace (the meta `moeplace trace` records) or --moe-layers; with
    none of them, from the placement's record of its fit trace (trace_model), else unknown."""
    if sum(x is not None for x in (model, trace, moe_layers)) > 1:
        raise MoeplaceError("give one of --model, --trace or --moe-layers")
    if num_hidden_layers is not None and num_hidden_layers > MAX_DECODER_LAYERS:
        raise MoeplaceError(f"--num-hidden-layers {num_hidden_layers}: more than the {MAX_DECODER_LAYERS} decoder layers "
                            "moeplace handles")
    found = _model_layers_unchecked(model, trace, moe_layers, num_hidden_layers, placement)
    layers, depth = found[0], found[1]
    if layers is not None:
        depth_from = "--num-hidden-layers" if num_hidden_layers is not None else (
            f"--trace {trace}: meta.num_decoder_layers" if trace is not None else f"--model {model}: num_hidden_layers")
        _check_layers(layers, depth, _layers_source(model, trace, moe_layers), depth_from)
    return found


def _layers_source(model: Path | None, trace: Path | None, moe_layers: str | None) -> str:
    """Where the MoE layers' decoder ids came from, for errors (the first of _model_layers' sources)."""
    if trace is not None:
        return f"--trace {trace}: meta.moe_layers"
    if model is not None:
        return f"--model {model}"
    return f"--moe-layers {moe_layers}" if moe_layers else "the placement's trace_model.moe_layers"


def _model_layers_unchecked(model: Path | None, trace: Path | None, moe_layers: str | None,
                            num_hidden_layers: int | None, placement: Placement | None
                            ) -> tuple[list[int] | None, int | None, int | None, str | None]:
    if trace is not None:
        from moeplace.trace.format import ExpertLoads, Trace, is_load_only, load_loads, load_trace

        t: Trace | ExpertLoads = load_loads(trace) if is_load_only(trace) else load_trace(trace)
        if placement is not None:
            placement.check_fits(t.num_layers, t.num_experts, what=f"trace {trace}")
            here = t.model_identity() or {}
            placement.check_model(here.get("model_type"), here.get("moe_layers"), what=f"trace {trace}")
        layers, depth = t.meta.get("moe_layers"), t.meta.get("num_decoder_layers")
        if not isinstance(layers, list) or len(layers) != t.num_layers \
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise MoeplaceError(f"{trace}: its meta does not list the decoder layer of each MoE layer "
                                "(traces from `moeplace trace` do): use --model or --moe-layers")
        model_type = t.meta.get("model_type")
        return ([int(x) for x in layers], num_hidden_layers or (int(depth) if isinstance(depth, int) else None),
                t.num_experts, model_type if isinstance(model_type, str) else None)
    if model is not None:
        from moeplace.export.permute import require_config
        from moeplace.models.checkpoint import moe_blocks, open_checkpoint, text_config

        ckpt = open_checkpoint(model)
        # without it the family check passed unseen and the SGLang rows ended at the last MoE layer
        require_config(ckpt, "export reads the model family and its decoder layer count (num_hidden_layers) "
                             "there, to check the placement is of this model and to give SGLang a row per decoder "
                             "layer")
        blocks = moe_blocks(ckpt)
        config = text_config(ckpt.config)
        depth, model_type = config.get("num_hidden_layers"), config.get("model_type")
        if placement is not None:
            placement.check_fits(len(blocks), blocks[0].num_experts, what=f"model {model}")
            # the top-level config's model_type, as `trace` records it
            placement.check_model(ckpt.config.get("model_type"), [b.layer for b in blocks], what=f"model {model}")
        depth = num_hidden_layers or (int(depth) if isinstance(depth, int) else None)
        return [b.layer for b in blocks], depth, blocks[0].num_experts, model_type if isinstance(model_type, str) else None
    if moe_layers:
        limit_from = f"--num-hidden-layers {num_hidden_layers}" if num_hidden_layers is not None else ""
        return parse_layers(moe_layers, num_hidden_layers or MAX_DECODER_LAYERS, limit_from), num_hidden_layers, None, None
    fitted = placement.trace_model if placement is not None else None  # what the fit trace's meta said
    layers = fitted.get("moe_layers") if fitted else None
    if isinstance(layers, list) and placement is not None and len(layers) == placement.num_layers \
            and all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        model_type = fitted.get("model_type") if fitted else None
        return [int(x) for x in layers], num_hidden_layers, None, model_type if isinstance(model_type, str) else None
    return None, num_hidden_layers, None, None


EXPORT_HELP = """Write a placement in the format an engine reads, or read an engine's file back.

\b
--to FORMAT: INPUT is a moeplace placement (v1 JSON); -o gets:
  sglang       {"physical_to_logical_map": [decoder layers][physical]} for SGLang's
               --init-expert-location (rows for every decoder layer: give --model, --trace
               or --moe-layers/--num-hidden-layers when some layers are dense)
  vllm         vLLM EplbState arrays (physical_to_logical_map, logical_to_physical_map,
               logical_replica_count) with ep_size, as JSON (an .npz name is refused); upstream
               vLLM has no file option: see docs/engines/vllm.md (use permute-checkpoint)
  vllm-ascend  the expert map read by vllm-ascend's expert_map_path
  eplb         DeepSeek EPLB phy2log / log2phy / logcnt (JSON; .npz when -o ends in .npz;
               a .npy name is refused)
--from FORMAT (sglang, vllm, vllm-ascend, eplb): INPUT is that engine's file; -o gets a
  moeplace placement for `moeplace eval`. Give --gpus (the engine's EP size) unless the file
  says it, and --gpus-per-node unless the file says it (sglang and vllm-ascend files never do;
  default: one node); --model/--trace check the placement fits the model and, with
  --moe-layers, select the MoE rows of an SGLang map.

Physical expert s is on GPU s // (physical / GPUs) in every format, so each GPU must hold the
same number of copies. Docs: docs/engines/{sglang,vllm,eplb}.md.

\b
Examples:
  moeplace export placement.json --to sglang --model ./DeepSeek-V3 -o expert_location.json
  moeplace export placement.json --to eplb -o eplb.npz
  moeplace export --from sglang expert_location.json --gpus 8 --moe-layers 3-60 -o running.json
"""


@click.command("export", help=EXPORT_HELP, no_args_is_help=True)
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=Path))
@click.option("--to", "to_format", type=click.Choice(TO_FORMATS), help="Write INPUT (a placement) in this format.")
@click.option("--from", "from_format", type=click.Choice(TO_FORMATS), help="Read INPUT (this engine's file) into a placement.")
@click.option("-o", "--output", type=OUTPUT_FILE, required=True, help="File to write (atomically).")
@click.option("--model", type=click.Path(path_type=Path),
              help="Hugging Face model dir (save_pretrained: config.json and safetensors weights; one without "
                   "config.json is refused): checks the placement (written or read, any format) fits it; for sglang "
                   "also which decoder layers are MoE. --to: refuses a `permute-checkpoint` output already "
                   "renumbered for this placement. -o may not be inside it.")
@click.option("--trace", type=click.Path(path_type=Path),
              help="A trace of this model (`moeplace trace`, or a load-only file `moeplace import` wrote): checks the "
                   "placement (written or read, any format) fits it; for sglang its meta also says which decoder "
                   "layers are MoE.")
@click.option("--moe-layers", help="sglang only: decoder layer ids of the MoE layers, e.g. '3-60' (default: all "
                                   "layers, in order).")
@click.option("--num-hidden-layers", type=click.IntRange(min=1), help="Decoder layers for SGLang rows (default: from --model, else the last MoE layer + 1).")
@click.option("--gpus", type=click.IntRange(min=1), help="--from: the engine's expert-parallel size (default: from the file).")
@click.option("--gpus-per-node", type=click.IntRange(min=1),
              help="--from: GPUs per node (default: from the file, else one node; sglang maps and vllm-ascend "
                   "expert maps carry none).")
def export(input_path: Path, to_format: str | None, from_format: str | None, output: Path, model: Path | None,
           trace: Path | None, moe_layers: str | None, num_hidden_layers: int | None, gpus: int | None, gpus_per_node: int | None) -> None:
    if (to_format is None) == (from_format is None):
        raise MoeplaceError("give exactly one of --to FORMAT (write a placement) or --from FORMAT (read an engine file)")
    check_writable(output, inputs=[input_path, trace])
    if model is not None:  # -o MODEL/config.json would replace the checkpoint's config (or weights) with the map
        check_outside(output, "-o", model, "--model")
    if to_format:
        if to_format == "eplb" and output.suffix.lower() == ".npy":  # numpy's np.load would find JSON there
            raise MoeplaceError(f"-o {output}: --to eplb writes JSON, or an .npz archive of its arrays when -o ends in "
                                ".npz; a .npy file holds one array: name it .npz or .json")
        if to_format == "vllm" and output.suffix.lower() == ".npz":  # --from reads an .npz name as an archive
            raise MoeplaceError(f"-o {output}: --to vllm writes JSON, and an .npz name is read back (--from vllm) as a "
                                "numpy archive: name it .json")
        if gpus is not None or gpus_per_node is not None:
            raise MoeplaceError("--gpus/--gpus-per-node are for --from; --to uses the placement's own topology")
        placement = load_placement(input_path)
        with _os_errors(output):
            _write(placement, to_format, output, model, trace, moe_layers, num_hidden_layers)
    else:
        assert from_format is not None
        with _os_errors(output):
            _read(input_path, from_format, output, model, trace, moe_layers, gpus, gpus_per_node)


def _write(placement: Placement, fmt: str, output: Path, model: Path | None, trace: Path | None,
           moe_layers: str | None, num_hidden_layers: int | None) -> None:
    from moeplace.export import eplb, sglang, vllm
    from moeplace.export.permute import check_not_applied

    if fmt != "sglang" and (moe_layers or num_hidden_layers):
        raise MoeplaceError(f"--moe-layers/--num-hidden-layers only apply to sglang ({fmt} files hold MoE layers only)")
    if model is not None:  # as serve and permute-checkpoint do: never apply a placement twice
        check_not_applied(model, placement)
    if fmt != "sglang" and (model or trace):
        _model_layers(model, trace, None, None, placement)  # the fit check alone
    redundant = placement.num_replicas  # the same in every layer once written
    ep = f"EP size {placement.num_gpus}"
    if fmt == "sglang":
        layers, depth, _, model_type = _model_layers(model, trace, moe_layers, num_hidden_layers, placement)
        table = sglang.write_sglang(placement, output, layers, depth)
        if layers is not None and model is None and trace is None and moe_layers is None:
            click.echo(f"moeplace export: note: MoE layers {layers} from the placement's fit trace "
                       "(trace_model.moe_layers); --model, --trace or --moe-layers overrides them", err=True)
        if layers is None:
            click.echo("moeplace export: note: no --model, --trace or --moe-layers: MoE layer i taken as decoder "
                       f"layer i, so decoder layers 0-{placement.num_layers - 1} are all MoE; give one of them if the "
                       "model has dense layers", err=True)
        click.echo(f"wrote {output}: {table.shape[0]} decoder layers x {table.shape[1]} physical experts "
                   f"({placement.num_experts} logical + {redundant} redundant). SGLang: --ep-size {placement.num_gpus} "
                   f"--ep-num-redundant-experts {redundant} --init-expert-location {output} --ep-dispatch-algorithm static "
                   "with an all-to-all backend (--moe-a2a-backend deepep), dynamic without one (docs/engines/sglang.md)")
        if family := sglang.MAP_IGNORED.get(str(model_type)):
            if redundant:  # permute-checkpoint cannot make copies either: name what can run them
                from moeplace.export.permute import replicas_way_out

                click.echo(f"moeplace export: note: SGLang (0.5.23) does not use an expert map for {family} models, "
                           f"and `moeplace permute-checkpoint` cannot create this placement's "
                           f"{plural(redundant, 'redundant expert')}. {replicas_way_out(str(model_type))}", err=True)
            else:
                click.echo(f"moeplace export: note: SGLang (0.5.23) does not use an expert map for {family} models; "
                           "realise the placement with `moeplace permute-checkpoint` instead "
                           "(docs/engines/checkpoint.md)", err=True)
    elif fmt == "vllm":
        vllm.write_vllm(placement, output)
        way = ("see docs/engines/vllm.md (moeplace permute-checkpoint)" if not redundant else
               "see docs/engines/vllm.md; `moeplace permute-checkpoint` cannot make this placement's copies")
        click.echo(f"wrote {output}: vLLM EplbState arrays for {ep}; upstream vLLM cannot load them from a file: {way}")
    elif fmt == "vllm-ascend":
        vllm.write_vllm_ascend(placement, output)
        click.echo(f"wrote {output}: vllm-ascend expert map for {ep}: --additional-config "
                   f"'{{\"expert_map_path\": \"{output}\"}}'")
    else:
        eplb.write_eplb(placement, output)
        click.echo(f"wrote {output}: phy2log/log2phy/logcnt for {placement.num_layers} MoE layers, {ep}, "
                   f"{plural(redundant, 'redundant expert')}")


def _read(path: Path, fmt: str, output: Path, model: Path | None, trace: Path | None, moe_layers: str | None,
          gpus: int | None, gpus_per_node: int | None) -> None:
    from moeplace.export import eplb, sglang, vllm

    if fmt != "sglang" and moe_layers:
        raise MoeplaceError(f"--moe-layers only applies to --from sglang ({fmt} files hold MoE layers only)")
    if fmt == "sglang":
        if gpus is None:
            raise PlacementError("--from sglang needs --gpus (the --ep-size the map is for)")
        layers, _, num_experts, _ = _model_layers(model, trace, moe_layers, None, None)
        gpus, gpus_per_node, note = eplb.resolve_gpus(str(path), gpus, gpus_per_node, None, None, "", "")
        experts_from = f"{'--model' if model is not None else '--trace'}: {num_experts} experts" if num_experts else ""
        placement = sglang.read_sglang(path, gpus, gpus_per_node, layers, num_experts, experts_from,
                                       _layers_source(model, trace, moe_layers))
        eplb.print_note(note)
        if layers is None:
            click.echo(f"moeplace export: note: {sglang.rows_note(placement)}", err=True)
    else:
        placement = (eplb.read_eplb if fmt == "eplb" else vllm.read_vllm)(path, gpus, gpus_per_node)
        if model is not None or trace is not None:
            _model_layers(model, trace, None, None, placement)  # the fit check alone
    placement.save(output)
    redundant = {len(r) for r in placement.replicas}  # an engine file holds as many in every layer
    per_layer = f"{redundant.pop()}" if len(redundant) == 1 else f"{min(redundant)}-{max(redundant)}"
    click.echo(f"wrote {output}: {placement.num_layers} MoE layers x {placement.num_experts} experts on "
               f"{placement.num_gpus} GPUs, {per_layer} redundant expert{'' if per_layer == '1' else 's'} per layer (extra copies, as eval's copies "
               f"column counts: {sum(map(len, placement.replicas))} in all)")


PERMUTE_HELP = """Renumber a Hugging Face safetensors checkpoint's experts so that a plain
contiguous expert-parallel layout (rank g holds experts [g*E/G, (g+1)*E/G)) realises PLACEMENT.

\b
Inputs:  MODEL_DIR  config.json + model.safetensors (or shards + model.safetensors.index.json),
                    per-expert (experts.{e}.*) or fused (experts.gate_up_proj [E, ...]) layout
         PLACEMENT  moeplace placement for this model, no replicas, E/G experts per GPU
Output:  OUT_DIR    same files, each MoE layer's experts and router rows (weight, bias,
                    e_score_correction_bias) in the placement's order; config and tokenizer
                    copied; moeplace_permutation.json records new_to_old per MoE layer

The model computes the same function (same logits); expert ids change, so serve OUT_DIR with
expert parallelism of size G and the engine's default layout. Streams byte ranges shard by
shard: memory stays flat whatever the checkpoint size. OUT_DIR appears only when complete.

\b
Example:
  moeplace permute-checkpoint ./Qwen3-30B-A3B placement.json -o ./Qwen3-30B-A3B-placed
"""


@click.command("permute-checkpoint", help=PERMUTE_HELP, no_args_is_help=True)
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("placement_path", metavar="PLACEMENT", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), required=True, help="Directory to create.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it is an earlier permute-checkpoint output (only once the new one is "
              "complete); any other existing directory is refused.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
def permute_checkpoint(model_dir: Path, placement_path: Path, out_dir: Path, overwrite: bool, quiet: bool) -> None:
    from moeplace.export.permute import permute_checkpoint as run

    if model_dir.is_file() and placement_path.is_dir():
        raise MoeplaceError(f"{model_dir} is a file and {placement_path} a directory: arguments swapped? "
                            "permute-checkpoint takes MODEL_DIR first, then PLACEMENT")
    placement = load_placement(placement_path)
    with _os_errors(out_dir, directory=True):
        record = run(model_dir, placement, out_dir, overwrite=overwrite, progress=not quiet,
                     inputs=[placement_path])
    skipped = f"; not copied (unpermuted weights): {', '.join(record['skipped'])}" if record["skipped"] else ""
    click.echo(f"wrote {out_dir}: {plural(len(record['moe_layers']), 'MoE layer')} renumbered, "
               f"{plural(record['experts_per_gpu'], 'expert')} per GPU on {plural(placement.num_gpus, 'GPU')}: serve "
               f"with expert parallelism of size {placement.num_gpus}{skipped}")
