"""`moeplace import ...`: other tools' routing dumps -> a v1 trace or a load-only file."""

from __future__ import annotations

import json
import os
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import click
import numpy as np

from moeplace.cli import SuggestingGroup
from moeplace.errors import MoeplaceError, warn
from moeplace.io import loads_json
from moeplace.options import NPZ_OUTPUT, check_writable, plural, writing
from moeplace.progress import silenced
from moeplace.trace.format import ExpertLoads, Trace, layer_ranges, make_trace, save_loads, save_trace
from moeplace.trace.importers import check_num_experts, import_csv, import_loads_json, import_sglang

_OUTPUT = click.option(
    "-o", "--output", required=True, type=NPZ_OUTPUT, metavar="OUT.npz",
    help="Where to write the result (written atomically); its name must end in .npz (an existing pipe or "
         "device, e.g. /dev/null, is written through whatever its name).",
)
_QUIET = click.option("-q", "--quiet", is_flag=True, help="No progress on stderr, no summary line.")
_META = click.option(
    "--meta", "meta", multiple=True, metavar="KEY=VALUE",
    help="Extra provenance stored in the file's meta (repeatable, each KEY once; VALUE parsed as JSON when it is, "
         "NaN/Infinity refused; moe_layers: one ascending decoder layer id per MoE layer).",
)
_NUM_EXPERTS = click.option(
    "--num-experts", type=click.IntRange(min=1), default=None,
    help="Experts per layer. Default: from the dump (per_token: the physical-to-logical map; stat: "
         "logical_count's width).",
)
_EXFLOW_NUM_EXPERTS = click.option(
    "--num-experts", type=click.IntRange(min=1), default=None,
    help="Experts per layer. Default: max id + 1 (an ExFlow .npy holds no count; too low if the "
         "last expert is never selected).",
)


def _parse_meta(pairs: Sequence[str]) -> dict[str, Any]:
    """KEY=VALUE pairs, VALUE as JSON when it parses; a key given twice or a non-finite number
    (NaN, Infinity: not standard JSON, which other readers of the meta refuse) is refused."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MoeplaceError(f"--meta expects KEY=VALUE, got {pair!r}")
        if key in out:
            raise MoeplaceError(f"--meta {key}: given twice ({json.dumps(out[key])} and {value}); give each key once")
        try:
            parsed = loads_json(value)
        except ValueError:  # text, and JSON nested too deeply to be meant as JSON
            parsed = value
        if not _finite(parsed):
            raise MoeplaceError(f"--meta {pair}: NaN and Infinity are not standard JSON; quote the value "
                                f"(--meta '{key}=\"{value}\"') to store it as text")
        out[key] = parsed
    return out


def _finite(value: Any) -> bool:
    """No NaN or infinity anywhere in a parsed JSON value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(map(_finite, value))
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    return True


def _check_meta(extra: dict[str, Any], result: Trace | ExpertLoads) -> None:
    """--meta is free-form provenance, but may not contradict what the file itself holds."""
    if "format" in extra:
        raise MoeplaceError("--meta format: the format is set by moeplace, not by --meta")
    own: dict[str, int] = {"num_experts": result.num_experts, "num_layers": result.num_layers}
    if isinstance(result, Trace):
        own.update(top_k=result.top_k, num_tokens=result.num_tokens)
    for key, value in own.items():
        if key in extra and extra[key] != value:
            raise MoeplaceError(f"--meta {key}={json.dumps(extra[key])} contradicts the imported data ({key} {value})")
    if "moe_layers" in extra:  # read by export --trace, analyze and eval as the decoder layer of each MoE layer
        layers = extra["moe_layers"]
        shown = f"--meta moe_layers={json.dumps(layers)}"
        if not isinstance(layers, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise MoeplaceError(f"{shown}: must be a JSON list of decoder layer ids, e.g. [1,3,5]")
        if len(layers) != result.num_layers:
            raise MoeplaceError(f"{shown}: lists {len(layers)} layer{'s' * (len(layers) != 1)}, but the imported data "
                                f"has {result.num_layers} MoE layers (one decoder layer id each)")
        if any(x < 0 for x in layers) or any(b <= a for a, b in zip(layers, layers[1:])):
            raise MoeplaceError(f"{shown}: decoder layer ids must be non-negative and ascending, each once")


def _check_run(output: Path, inputs: Sequence[Path], meta: Sequence[str], reads: Sequence[str] = ()) -> None:
    """Before reading anything: -o can be written and is no input, and --meta parses. `reads`:
    the names an input directory's files are read by (".csv", "tokens.txt"): -o with one of them
    inside an input directory (DIR/layer5.csv, DIR/tokens.txt, also through a link) would replace
    a file the run reads from the directory, or be read by the next import of it (a link named
    out.npz to one of them alike). Another name there (DIR/trace.npz) is left alone."""
    check_writable(output, inputs=inputs)
    # the name as given and the one a link resolves to: the write goes through a link (atomic_path),
    # so `-o out.npz` linked to DIR/layer0.csv would replace that input
    names = {output.name.lower(), output.resolve().name.lower()}
    if any(name == r or name.endswith(r) for r in reads for name in names):
        for p in inputs:
            if p.is_dir() and _inside(output, p):
                raise MoeplaceError(f"-o {output}: is inside the input directory {p}, where this import reads "
                                    f"{' and '.join(reads)} files: write the output elsewhere")
    _parse_meta(meta)


def _inside(path: Path, directory: Path) -> bool:
    """`path` lies under `directory`, as spelled or once links are resolved."""
    return (Path(os.path.abspath(path)).is_relative_to(os.path.abspath(directory))
            or path.resolve().is_relative_to(directory.resolve()))


def _write(result: Trace | ExpertLoads, output: Path, meta: Sequence[str], quiet: bool) -> None:
    """Save a trace or a load-only file with the user's meta, and say what was written."""
    extra = _parse_meta(meta)
    _check_meta(extra, result)
    with writing(output):
        if isinstance(result, Trace):
            save_trace(replace(result, meta={**result.meta, **extra}), output)
        else:
            save_loads(replace(result, meta={**result.meta, **extra}), output)
    if quiet:
        return
    if isinstance(result, Trace):
        click.echo(
            f"wrote {output}: trace of {plural(result.num_tokens, 'token')} x {plural(result.num_layers, 'MoE layer')} x "
            f"top-{result.top_k} over {plural(result.num_experts, 'expert')}"
            f"{'' if result.topk_weights is not None else ' (no gate weights)'}{_sglang_note(result.meta)}"
            f"{_merge_note(result.meta)}"
        )
    else:
        click.echo(
            f"wrote {output}: load-only file, {plural(result.num_layers, 'MoE layer')} x {plural(result.num_experts, 'expert')}, "
            f"{result.loads.sum():.0f} token-expert selections (usable where expert loads are accepted)"
        )


def _merge_note(meta: dict[str, Any]) -> str:
    """Where a merged trace came from."""
    if meta.get("source") != "moeplace import merge":
        return ""
    return f", merged from {plural(len(meta.get('inputs', [])), 'trace')} (corpus {meta.get('corpus')})"


def _sglang_note(meta: dict[str, Any]) -> str:
    """What an SGLang per_token import left out: records recorded twice, padding rows."""
    if meta.get("source") != "sglang-per_token":
        return ""
    dup, pad = meta.get("duplicate_records", 0), meta.get("dropped_tokens", 0)
    return (f"; {meta.get('records')} records kept, {dup} duplicate record{'s' * (dup != 1)} dropped (the same "
            f"batch recorded by several ranks), {pad} padding token{'s' * (pad != 1)} dropped")


@click.group("import", cls=SuggestingGroup)
def import_() -> None:
    """Convert routing recorded by other tools into moeplace's formats.

    \b
    Per-token paths become a v1 trace (.npz: topk_ids [tokens, moe_layers, k], ...), usable by
    every stage. Counts without paths become a load-only file (.npz: expert_loads
    [moe_layers, experts]), usable where balancing needs only loads. `merge` joins v1 traces
    of one model into one. Layouts: docs/import.md.
    """


@import_.command("csv")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=None,
              help="Experts per token: each row's k highest entries (a row with fewer non-zero is an error). "
                   "Default: the most non-zero entries in any row of any file, which every row must then have.")
@_OUTPUT
@_META
@_QUIET
def csv_cmd(paths: tuple[Path, ...], top_k: int | None, output: Path, meta: tuple[str, ...], quiet: bool) -> None:
    """Dense per-layer CSVs (one file per layer, one row per token, one column per expert).

    \b
    PATHS is either one directory or the layer files of one token set:
      DIR/layerN.csv ...            one token set; N is the MoE layer index
      DIR/<position>/layerN.csv     a folder per decode position (FLAME: 1st ... 10th); row r
                                    of every folder is sequence r, folders sorted by number
      layer2.csv layer3.csv ...     files, ordered by N when all are named layerN.csv
                                    (then all of one directory), else as given
    A directory of layer files may hold no other .csv file (a copy beside them is refused).
    Header: `expert_0 ... expert_{E-1}` columns (gate weight, 0 when not selected), optional
    `token_id` (row/sequence id). A `tokens.txt` beside the files gives token ids (FLAME).
    Layer numbers with gaps (layer2, layer9) are taken as consecutive MoE layers, with a warning.

    \b
    Example (the FLAME data the bundled trace was made from; docs/import.md has all its --meta):
      moeplace import csv ../shared/data/flame-moe-290m-decoder -o flame.npz \\
          --meta model=flame-moe-290m --meta phase=decode
    """
    _check_run(output, paths, meta, reads=(".csv", "tokens.txt"))
    with silenced(quiet):
        trace = import_csv(paths, top_k)
    warn_layer_gaps(trace.meta.get("moe_layers", []))
    warn_counts_table(trace)
    _write(trace, output, meta, quiet)


def warn_counts_table(trace: Trace) -> None:
    """One stderr line when the "gate weights" look like a per-layer table of expert counts (every
    row selects every expert, whole numbers above 1): imported, each layer row became a token."""
    w = trace.topk_weights
    if trace.top_k == trace.num_experts > 1 and w is not None and w.max() > 1 and np.array_equal(w, np.round(w)):
        warn(f"every row selects all {trace.num_experts} experts with whole numbers up to {w.max():g}: this looks like "
             "a table of expert counts, not per-token gate weights (each row was read as a token); per-layer counts "
             "belong in a load-only file: `moeplace import loads-json` (JSON [layers][experts])")


def warn_layer_gaps(layers: list[int]) -> None:
    """One stderr line when layer numbers skip some (layer2.csv, layer9.csv): the stages see
    adjacent trace layers, so 2 -> 9 is analysed and solved as one layer transition. Right when
    the layers between are dense (no router), as in some models, so a warning, not an error."""
    missing = sorted(set(range(min(layers, default=0), max(layers, default=0) + 1)) - set(layers))
    if missing:
        warn(f"no layer files for layers {layer_ranges(missing)}: layers {layer_ranges(layers)} are taken as "
             "consecutive MoE layers (meta.moe_layers keeps their numbers); right only if the missing layers are "
             "dense (no experts)")


@import_.command("exflow")
@click.argument("path", type=click.Path(path_type=Path))
@_EXFLOW_NUM_EXPERTS
@_OUTPUT
@_META
@_QUIET
def exflow_cmd(path: Path, num_experts: int | None, output: Path, meta: tuple[str, ...], quiet: bool) -> None:
    """ExFlow's trace: a .npy integer array [tokens, moe_layers] of top-1 expert ids.

    \b
    The result is a top-1 trace without gate weights (every stage also reads the .npy directly;
    importing records --num-experts and provenance once).
    Example:
      moeplace import exflow exflow_trace.npy --num-experts 8 -o trace.npz
    """
    from moeplace.trace.format import load_trace

    if path.suffix.lower() != ".npy":
        raise MoeplaceError(f"{path}: an ExFlow trace is a .npy file")
    check_num_experts(num_experts, "--num-experts")
    _check_run(output, [path], meta)
    trace = load_trace(path)
    if num_experts is not None and trace.num_experts > num_experts:
        raise MoeplaceError(f"{path}: --num-experts {num_experts}, but its expert ids go up to {trace.num_experts - 1}")
    if num_experts is not None:
        trace = make_trace(trace.topk_ids, None, num_experts, meta=trace.meta, name=str(path))
    _write(trace, output, meta, quiet)


@import_.command("sglang")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_NUM_EXPERTS
@_OUTPUT
@_META
@_QUIET
def sglang_cmd(paths: tuple[Path, ...], num_experts: int | None, output: Path, meta: tuple[str, ...],
               quiet: bool) -> None:
    """SGLang expert-distribution recorder dumps (.pt files, or a directory of them).

    \b
    The mode is read from the files:
      per_token  (--expert-distribution-recorder-mode per_token): one file per rank ->
                 a v1 trace: logical expert ids, token ids, positions; no gate weights
      stat       (mode stat): logical_count [steps, layers, experts] summed over steps ->
                 a load-only file for balancing
    Layers that route no token (dense layers) are dropped; their indices go to meta.moe_layers.
    Files are read with torch.load(weights_only=True): a file needing arbitrary objects is refused.

    \b
    Example (SGLang writes the dumps to $SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR):
      moeplace import sglang $SGLANG_EXPERT_DISTRIBUTION_RECORDER_DIR -o trace.npz
    """
    check_num_experts(num_experts, "--num-experts")
    _check_run(output, paths, meta, reads=(".pt",))
    _write(import_sglang(paths, num_experts), output, meta, quiet)


@import_.command("loads-json")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_OUTPUT
@_META
@_QUIET
def loads_json_cmd(paths: tuple[Path, ...], output: Path, meta: tuple[str, ...], quiet: bool) -> None:
    """Per-layer expert counts in JSON -> a load-only file (several files are summed).

    \b
    Each file is an object with `expert_popularity` (fiddler's Mixtral-8x7B MMLU dumps) or
    `expert_loads`: [layers][experts] numbers of token selections; `total_input_tokens` is kept.
    Example:
      moeplace import loads-json ../shared/data/mixtral-8x7b-expert-loads/mixtral_8x7b_original/*.json \\
          -o mixtral-loads.npz
    """
    _check_run(output, paths, meta)
    _write(import_loads_json(paths), output, meta, quiet)


@import_.command("merge")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@_OUTPUT
@_META
@_QUIET
def merge_cmd(paths: tuple[Path, ...], output: Path, meta: tuple[str, ...], quiet: bool) -> None:
    """Concatenate v1 traces of one model (corpus shards traced apart, say) into one trace.

    \b
    The traces must agree on num_experts, MoE layers and k, and on meta model, model_type,
    moe_layers, renumbered_from, hidden_size and router_sha256 (the router weights `moeplace
    trace` hashed) where both record them; else refused, naming the files and the difference.
    A file given twice, or an input with the same routing as another (a copy under another name,
    the same text traced twice), is refused: its tokens would count twice.
    Tokens keep the inputs' order; sequence ids of later inputs are shifted past the earlier
    ones'. topk_weights, token_ids, sequence_ids and positions are kept when every input has them
    (dropped, with a warning naming them, when only some do); so is router_sha256. meta records
    the inputs (file, sha256, tokens) and joins their corpus labels.
    Example:
      moeplace import merge c4-part1.npz c4-part2.npz wiki.npz -o mixed.npz
    """
    from moeplace.trace.format import load_trace
    from moeplace.trace.importers import _refuse_repeated_files
    from moeplace.trace.merge import merge_traces

    if len(paths) < 2:
        raise MoeplaceError(f"import merge {paths[0]}: give at least two traces to merge")
    _check_run(output, paths, meta)
    _refuse_repeated_files(paths)  # its tokens would be counted twice
    traces = [(str(p), load_trace(p)) for p in paths]
    merged, dropped = merge_traces(traces)
    for key in dropped:  # said: a stage needing them (eval's sequences, affinity by position) would miss them
        lacking = [name for name, t in traces if getattr(t, key) is None]
        warn(f"{key} dropped from the merged trace: {', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} none")
    _write(merged, output, meta, quiet)
