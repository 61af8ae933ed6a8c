"""`moeplace eval`: replay a trace against a placement, beside the baselines, with optional
regression gates (eval/gates.py). `moeplace check` (eval/check.py) runs it from a YAML list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np

from moeplace.errors import AlreadyReported, MoeplaceError, warn
from moeplace.eval.gates import (BASELINE_METRICS, LABELS, VS_BASELINE, check_limit_range, gate_line, gate_metric, gates,
                                 scored, threshold_results)
from moeplace.eval.metrics import evaluate, imbalance
from moeplace.eval.report import (COLUMNS, PER_LAYER, MetricFn, add_traffic_ratios, build_load_report, build_report,
                                  render_table, token_subsets, traffic_metric_fn, vs_baseline)
from moeplace.eval.traffic import traffic_scope_note
from moeplace.io import write_json_atomic
from moeplace.models.config import read_model_shape
from moeplace.options import (DTYPE_BYTES, MAX_HIDDEN_SIZE, NON_NEGATIVE, OUTPUT_FILE, Count, DtypeChoice,
                               check_output, plural, writing)
from moeplace.placement import Placement, load_placement
from moeplace.solve.balance import expected_gpu_loads
from moeplace.solve.costmodel import COST_COLUMNS, COST_PER_LAYER, CostModel, ModelFacts, checkpoint_dir
from moeplace.trace.format import Trace, is_load_only, load_loads, load_trace, trace_shape


def cost_metric_fn(cluster: Path, model_config: Path | None, command: str = "eval", said: set[str] | None = None,
                   labels: tuple[str, str] = ("--cluster", "--model-config")
                   ) -> tuple[MetricFn, ModelFacts, dict[str, Any], CostModel]:
    """The predicted MoE time metric of a cluster (+ model) config, what it assumes of the model,
    the report's `cost_model` record of where it came from, and the cost model itself (whose
    cluster a placement must be on: evaluate_files's `cluster`). A model section estimated from a
    checkpoint is said on stderr (`moeplace COMMAND: note:`) and recorded as `model_estimate`.
    labels: what named the two files (options, or `moeplace check`'s keys), for the errors."""
    from moeplace.solve.costmodel import cost_metric, estimate_lines, estimate_record, load_cost_model, model_facts

    cost = load_cost_model(cluster, model_config, *labels)
    for line in estimate_lines(cost):
        if said is None or line not in said:  # `said`: lines an earlier check of one run printed
            click.echo(f"moeplace {command}: note: {line}", err=True)
        if said is not None:
            said.add(line)
    source: dict[str, Any] = {"source": "config", "cluster_config": str(cluster),
                              "model_config": None if model_config is None else str(model_config)}
    if cost.estimate is not None:
        source["model_estimate"] = estimate_record(cost)
    return cost_metric(cost), model_facts(cost), {**source, **_cost_names(cost)}, cost


def _cost_names(cost: CostModel) -> dict[str, Any]:
    return {"cluster": cost.cluster.name, "model": cost.model.name, "batch_tokens": cost.model.batch_tokens}


# why a placement's predicted MoE time needs a cluster config: it records no cost model (str.format template)
NO_RECORD = "{placement} records no cost model (`moeplace solve --objective latency --cluster ...` records one)"


def recorded_cost_model(placement: Placement, name: Path) -> CostModel | None:
    """The cost model a latency solve recorded in the placement (objective.cost_model), or None
    when it records none; a malformed record (edited by hand) is one line naming the field."""
    from moeplace.solve.costmodel import cost_model_from_record

    record = placement.objective.get("cost_model")
    return None if record is None else cost_model_from_record(record, f"{name}: objective.cost_model",
                                                              f"the cost model {name} records")


def recorded_mismatch(cost: CostModel, trace: Trace, placement_path: Path, trace_path: Path,
                      cost_keys: tuple[str, str] = ("--cluster", "--model-config")) -> str:
    """A line saying the model a placement's recorded cost model describes is not the trace's
    (num_experts, top_k, hidden size in the trace meta; what either side does not state is not
    compared), else "". Unlike model_mismatch's what-if, nobody chose this model for this trace:
    its times would be another model's, so they are left out (an error when a gate needs them).
    cost_keys: what names the cluster and model configs to give instead (eval's options, or
    `moeplace check`'s keys)."""
    m = cost.model
    traced = {"num_experts": trace.num_experts, "top_k": trace.top_k, "hidden_size": trace.meta_hidden_size()}
    stated = {"num_experts": m.num_experts, "top_k": m.top_k, "hidden_size": m.hidden_size}
    differ = [k for k in traced if traced[k] is not None and stated[k] is not None and traced[k] != stated[k]]
    if not differ:
        return ""
    return (f"{placement_path} records the cost model of {m.name} ("
            + ", ".join(f"{k} {stated[k]}" for k in differ) + f"), but {trace_path} has "
            + ", ".join(f"{k} {traced[k]}" for k in differ)
            + f": give {cost_keys[0]} (and {cost_keys[1]}) for this trace's model to predict its MoE time")


def evaluate_files(placement_path: Path, trace_path: Path, all_tokens: bool, metric_fns: Sequence[MetricFn] = (),
              assumed: Sequence[ModelFacts] = (), recorded: bool = False, none_recorded: str = "",
              cost_source: dict[str, Any] | None = None, baseline: Path | None = None, cluster: CostModel | None = None,
              check_routing: Callable[[int, int], None] | None = None, needs_sequences: str = "",
              cost_keys: tuple[str, str] = ("--cluster", "--model-config")) -> dict[str, Any]:
    """Load both files and build the report (`metric_fns` add metrics to every layout); a
    load-only TRACE (moeplace.loads/v1) gets build_load_report's, load balance only.
    assumed: what the metrics assume of the model; one warning line each that the trace contradicts.
    recorded: add the predicted MoE time of the cost model the placement records, if any (not
    on a load-only TRACE); none_recorded: "" when no gate needs that time, else the error (a
    template of {placement}) when the placement records none. A record that is malformed or of
    another model than the trace's is then that error's reason; with no gate, a warning, and
    the report has no MoE time. cost_keys: what names a cluster and a model config in that error
    (eval's options, or check's keys).
    cost_source: the report's `cost_model` (where the MoE time's cost model came from).
    baseline (eval --baseline, `moeplace check`'s baseline:): another placement of the model, scored
    on the same tokens or loads as the report's `baseline` (see baseline_record).
    cluster: the cost model of `metric_fns` (--cluster), whose GPUs the placement's must be;
    check_routing(num_experts, top_k): raises when the trace is not of the model another input
    describes (eval --model); needs_sequences: the options whose metrics need the trace's
    sequence ids (eval's traffic prediction), refused once the trace is read, before the replay.
    What the trace's headers state (moeplace.trace.format.trace_shape: layers, experts, top-k) is
    checked before its tokens are read, seconds on a large trace; a file that stores no expert
    count (an ExFlow .npy) is checked once read, with the same messages."""
    from moeplace.solve.costmodel import cost_metric, model_mismatch

    placement = load_placement(placement_path)
    cost, unusable = None, ""
    if recorded:
        try:
            cost = recorded_cost_model(placement, placement_path)
        except MoeplaceError as e:  # e.g. a record edited by hand, or of an older moeplace
            unusable = str(e)
        if cost is None and none_recorded:
            raise MoeplaceError(unusable or none_recorded.format(placement=placement_path))

    def check_fits(num_layers: int, num_experts: int, what: str = "trace") -> None:
        try:
            placement.check_fits(num_layers, num_experts, what=what)
        except MoeplaceError as e:
            raise type(e)(f"{placement_path} does not fit {trace_path}: {e}") from None

    if is_load_only(trace_path):
        if metric_fns:
            raise MoeplaceError(f"{trace_path} is a load-only file (expert loads, no token paths): the predicted "
                                "time and traffic need a routing trace; drop --cluster/--hidden-size/--model (in "
                                "`moeplace check`: `cluster: null` in that check)")
        loads = load_loads(trace_path)
        check_fits(loads.loads.shape[0], loads.loads.shape[1], what="loads")
        report = build_load_report(placement, loads.loads, placement_name=str(placement_path),
                                   loads_name=str(trace_path), num_groups=loads.meta.get("num_groups", 1))
        if baseline is not None:
            report["baseline"] = baseline_record(baseline, baseline_placement(baseline, placement, placement_path),
                                                 placement, loads.loads)
        return report
    # the shape from the file's headers, so a misfit is refused before its tokens are read; a file
    # that stores no expert count (an ExFlow .npy) is read first, its count inferred from the ids
    _, layers, top_k, num_experts = trace_shape(trace_path)
    trace = None
    if num_experts is None:
        trace = load_trace(trace_path)
        layers, num_experts, top_k = trace.num_layers, trace.num_experts, trace.top_k
    check_fits(layers, num_experts)
    base = None if baseline is None else baseline_placement(baseline, placement, placement_path)
    if cluster is not None:  # a cost model of another cluster cannot time it
        cluster.check(placement.num_gpus, placement.gpus_per_node)
    if check_routing is not None:
        check_routing(num_experts, top_k)
    if trace is None:
        trace = load_trace(trace_path)
    if needs_sequences and trace.sequence_ids is None:  # said now, not after the placement's replay
        raise MoeplaceError(f"{needs_sequences}: the traffic prediction needs the sequence of each token (home rank = "
                            f"sequence % GPUs), and {trace_path} has no sequence_ids (an ExFlow .npy or an import "
                            "without them; `moeplace trace` and `serve --routing-out` record them)")
    if needs_sequences and (note := traffic_scope_note(trace, str(trace_path))):  # a serve --routing-prefill file
        click.echo(f"moeplace eval: note: {note}", err=True)
    if cost is not None and (unusable := recorded_mismatch(cost, trace, placement_path, trace_path, cost_keys)):
        if none_recorded:
            raise MoeplaceError(unusable)
        cost = None
    if cost is not None:
        metric_fns = [cost_metric(cost), *metric_fns]
        cost_source = {"source": "placement", **_cost_names(cost)}
    elif unusable:
        warn(f"{unusable} (no predicted MoE time in this report)")
    for facts in assumed:
        if line := model_mismatch(trace, str(trace_path), facts):
            warn(line)
    report = build_report(placement, trace, all_tokens=all_tokens, placement_name=str(placement_path),
                          trace_name=str(trace_path), metric_fns=metric_fns)
    if cost_source is not None:
        report["cost_model"] = cost_source
    if baseline is not None and base is not None:
        report["baseline"] = baseline_record(baseline, base, placement, trace, all_tokens, metric_fns)
    return report


def baseline_placement(path: Path, placement: Placement, placement_path: Path) -> Placement:
    """A check's `baseline:` placement, read and checked against the placement (which fits the
    trace, or is checked against it before the baseline is used): another shape (layers,
    experts) or model is an error; another GPU count is a fair comparison (baseline_record)."""
    base = load_placement(path, "baseline")
    shape = (placement.num_layers, placement.num_experts)
    if (base.num_layers, base.num_experts) != shape:
        raise MoeplaceError(f"baseline {path} is for {base.num_layers} MoE layers x {base.num_experts} experts, but "
                            f"{placement_path} for {shape[0]} x {shape[1]}: a baseline is a placement of the same model")
    mine, theirs = placement.trace_model or {}, base.trace_model or {}
    for key in ("model_type", "moe_layers"):  # one shape, two models: their expert ids number other experts
        if key in mine and key in theirs and mine[key] != theirs[key]:
            raise MoeplaceError(f"baseline {path} was fitted on another model than {placement_path}: {key} "
                                f"{theirs[key]} (the placement's: {mine[key]})")
    return base


def baseline_record(path: Path, base: Placement, placement: Placement, data: Trace | np.ndarray,
                    all_tokens: bool = False, metric_fns: Sequence[MetricFn] = ()) -> dict[str, Any]:
    """The report's `baseline` (eval --baseline, `moeplace check`'s baseline:): {placement, num_gpus,
    gpus_per_node, copies, metrics (scalars), per_layer (the per-layer lists: imbalance_per_layer, ...),
    note, and traffic when a metric fn predicts it},
    scored on exactly the tokens the placement's report scored (its held-out split, whatever split
    the baseline was fitted on), or on the same expert loads [L, E].

    Another GPU count is a fair comparison (the note says so), though the cost model of the
    placement's cluster then cannot time it (nor are `metric_fns` run on it)."""
    same_cluster = (base.num_gpus, base.gpus_per_node) == (placement.num_gpus, placement.gpus_per_node)
    note = "" if same_cluster else (
        f"{path} is for {plural(base.num_gpus, 'GPU')} ({plural(base.num_nodes, 'node')}), this one for "
        f"{placement.num_gpus} ({plural(placement.num_nodes, 'node')}); compared on the same "
        + ("loads" if isinstance(data, np.ndarray) else "tokens"))
    if isinstance(data, np.ndarray):
        imb = imbalance(expected_gpu_loads(base, data))
        metrics: dict[str, Any] = {"imbalance_per_layer": imb.tolist(), "imbalance_mean": float(imb.mean()),
                                   "imbalance_max": float(imb.max())}
    else:
        held = token_subsets(placement, data, all_tokens).evaluated  # the report's tokens: build_report's rule
        tokens = data if held is None else data.select_tokens(held)
        metrics = evaluate(base, tokens)
        if same_cluster:  # a cost model is of the placement's cluster: it cannot time another GPU count
            for fn in metric_fns:
                metrics.update(fn(base, tokens))
    return {"placement": str(path), "num_gpus": base.num_gpus, "gpus_per_node": base.gpus_per_node,
            "copies": sum(len(r) for r in base.replicas),
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (float, int)) and not isinstance(v, bool)},
            "per_layer": {k: v for k, v in metrics.items() if isinstance(v, list)},
            "note": note, **({"traffic": metrics["traffic"]} if "traffic" in metrics else {})}


_LIMIT: dict[str, Any] = dict(type=NON_NEGATIVE, default=None, metavar="X")


def _vs_baseline_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--max-NAME-vs-baseline for each metric check's max_NAME_vs_baseline bounds (gates.BASELINE_METRICS)."""
    for name, metric in reversed(BASELINE_METRICS.items()):
        f = click.option(f"--max-{name.replace('_', '-')}-vs-baseline", **_LIMIT,
                         help=f"Exit 1 if the placement's {LABELS[metric]} over --baseline's exceeds X.")(f)
    return f


def traffic_options(model_dir: Path | None, hidden_size: int | None, dtype: str | None,
                    runtime_mode: str | None) -> dict[str, Any] | None:
    """The traffic settings of `eval` (None when no prediction is asked), validated."""
    if model_dir is None and hidden_size is None:
        if dtype is not None or runtime_mode is not None:
            raise MoeplaceError("--dtype and --runtime-mode need --hidden-size or --model")
        return None
    if model_dir is not None and hidden_size is not None:
        raise MoeplaceError("give --hidden-size or --model, not both")
    dtype = dtype or "bfloat16"  # DtypeChoice gives torch's name (options.DTYPE_SPELLINGS)
    b = DTYPE_BYTES[dtype]
    if model_dir is not None:
        shape = read_model_shape(model_dir)
    else:
        assert hidden_size is not None  # one of the two, checked above
        shape = {"hidden_size": hidden_size}
    kv = None
    if "num_kv_heads" in shape:  # kv_sync row per decoder layer: [k | v] + int32 slot, position, layer
        kv = shape["num_layers"] * (2 * shape["num_kv_heads"] * shape["head_dim"] * b + 12)
    return {"hidden_size": shape["hidden_size"], "dtype": dtype, "element_bytes": b,
            "modes": ["standard", "coherent"] if runtime_mode in (None, "both") else [runtime_mode],
            "kv_bytes_per_rank": kv, "model": None if model_dir is None else str(model_dir),
            "model_routing": (shape["num_experts"], shape["top_k"]) if model_dir is not None else None}


def _once(ctx: click.Context, param: click.Parameter, values: tuple[Path, ...]) -> Path | None:
    """The one value of a single-file option declared multiple=True, so that a repeat is seen:
    click keeps the last of a repeated option silently, and `--baseline A --baseline B` scored B
    alone while the user may have meant A, or both."""
    if len(values) > 1:
        raise click.BadParameter(f"given {len(values)} times ({', '.join(map(str, values))}): one placement "
                                 "is compared; give it once", ctx, param)
    return values[0] if values else None


@click.command("eval")
@click.argument("placement", type=click.Path(path_type=Path))
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@click.option("-o", "--output", type=OUTPUT_FILE, default=None,
              help="Also write the JSON report to this file (atomically); not a file the run reads, nor inside "
                   "a checkpoint directory it reads (--model, --model-config DIR).")
@click.option("--all-tokens", is_flag=True,
              help="Evaluate every token, even when the placement was fitted on part of this trace.")
@click.option("--baseline", type=click.Path(path_type=Path), multiple=True, callback=_once, metavar="OTHER.json",
              help="Also score another placement of the same model (the one deployed) on exactly PLACEMENT's "
                   "tokens: a `baseline` row, and PLACEMENT's values over the baseline's. Given once.")
@click.option("--max-cross-gpu", **_LIMIT, help="Exit 1 if the fraction of top-1 transitions crossing GPUs exceeds X.")
@click.option("--max-cross-node", **_LIMIT, help="Exit 1 if the fraction crossing nodes exceeds X.")
@click.option("--max-dest-gpus", **_LIMIT, help="Exit 1 if the mean remote GPUs per token (top-k) exceeds X.")
@click.option("--max-dest-nodes", **_LIMIT, help="Exit 1 if the mean remote nodes per token (top-k) exceeds X.")
@click.option("--max-imbalance", **_LIMIT, help="Exit 1 if the worst layer's max/mean load per GPU exceeds X.")
@click.option("--max-moe-time-ratio", **_LIMIT,
              help="Exit 1 if the placement's predicted MoE time over contiguous's exceeds X (needs --cluster, "
                   "or a placement that records its cost model).")
@_vs_baseline_options
@click.option("--cluster", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cluster config YAML (configs/cluster/*.yaml): adds the predicted MoE-layer time, per layer too "
                   "(without it: with the cost model a latency solve recorded in PLACEMENT, if any).")
@click.option("--model-config", type=click.Path(path_type=Path), default=None,
              help="Model config YAML (configs/model/*.yaml) for --cluster, when the cluster file has no model section; "
                   "or a checkpoint directory (or its config.json): expert costs estimated from its shape and the "
                   "cluster file's gpu: figures (docs/cost-model.md), printed on stderr.")
@click.option("--hidden-size", type=Count(min=1, max=MAX_HIDDEN_SIZE), default=None, metavar="H",
              help=f"Predict `moeplace serve`'s decode Alltoall bytes for activations of width H (at most {MAX_HIDDEN_SIZE}).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Checkpoint folder: hidden size and K/V shape from its config.json (adds the kv_sync column).")
@click.option("--dtype", type=DtypeChoice(), default=None,
              help="Activation dtype of the run predicted (bytes per element), as serve's --dtype or short "
                   "(bf16, fp16, fp32): serve runs bfloat16 on CUDA, float32 on CPU.  [default: bfloat16]")
@click.option("--runtime-mode", type=click.Choice(["standard", "coherent", "both"]), default=None,
              help="Runtime mode(s) to predict.  [default: both]")
def eval_(placement: Path, trace: Path, as_json: bool, output: Path | None, all_tokens: bool,
          baseline: Path | None = None, cluster: Path | None = None, model_config: Path | None = None,
          hidden_size: int | None = None, model_dir: Path | None = None, dtype: str | None = None,
          runtime_mode: str | None = None,
          **limits: float | None) -> None:
    """Replay TRACE against PLACEMENT, side by side with the baseline layouts.

    \b
    Inputs: PLACEMENT (moeplace.placement/v1 JSON, from `moeplace solve`); TRACE (v1 .npz or
    ExFlow .npy) of the same model (same MoE layers and experts), or a load-only .npz
    (moeplace.loads/v1, `moeplace import loads-json`): then load balance only (imbalance
    columns and gates), against contiguous, greedy_load and eplb. A TRACE of another model
    than the placement's (trace meta) is evaluated with a warning.
    Tokens: when PLACEMENT was fitted on a split of this very trace (the same file, or the same
    routing in another file: a copy, a re-import, a re-save with other meta), only the
    held-out tokens are evaluated (--all-tokens: all), re-drawn with its seeded split: by token, or
    whole held-out sequences for `solve --split-by sequence`; any other trace is evaluated whole.
    Baselines, on the same GPUs and tokens: contiguous, round_robin, random (the solve's seed) and
    greedy_load (load balancing fitted on the tokens the placement was fitted on); with replicas
    also eplb (DeepSeek's EPLB with as many redundant experts), and a `copies` column.
    --baseline OTHER.json: another placement of the same model (the one deployed), scored on
    exactly PLACEMENT's tokens (or loads), whatever it was fitted on; another shape or model is
    one error line (exit 2), another GPU count is compared and said so (no MoE time for it).

    \b
    Metrics (per layout; definitions in docs/eval.md):
      cross-GPU / cross-node top-1   fraction of top-1 transitions l -> l+1 that change GPU / node
      dest GPUs / nodes top-k        mean Alltoall destinations per token: GPUs (nodes) other
                                     than the token's own that hold one of its k experts
      imbalance                      per layer max/mean token load per GPU (max and mean over layers)
    Output: tables with the ratio to contiguous (lower is better), or JSON with --json.
    With --baseline: a `baseline` row, and a line `vs baseline OTHER.json (on the same tokens):
    cross-GPU top-1 0.5839 vs 0.6012 (0.971x); ...` (PLACEMENT's value vs OTHER's, and their
    ratio); JSON `baseline` (its metrics) and `vs_baseline` {metric: ratio, null where OTHER's is 0}.

    \b
    Traffic prediction (--hidden-size H or --model DIR; --dtype, --runtime-mode): for every
    layout and runtime mode, the cross-rank rows and bytes that `moeplace serve` would send to
    decode TRACE's tokens, with the rules of docs/runtime.md (home rank = sequence % GPUs; TRACE
    needs sequence ids and positions, as `serve --routing-out` writes them):
      standard   dispatch + combine Alltoall per MoE layer (to the home rank and back)
      coherent   dispatch Alltoall (+ combine to the top-1 rank when k > 1), the token follows
                 its top-1 expert; its K/V replication (kv_sync, once per step) is its own column
    Shown per decoded token, with the ratio to standard + contiguous (the runtime's baseline);
    JSON adds totals and cross-rank rows per layer. Measured bytes of a run equal the prediction
    on the routing it recorded.

    \b
    Predicted MoE time: with --cluster (+ --model-config), else with the cost model PLACEMENT
    records (`solve --objective latency --cluster ...` does); the header says which.

    \b
    Regression gate: --max-* thresholds bound the placement's metrics (--max-moe-time-ratio: its
    predicted MoE time over contiguous's; --max-*-vs-baseline: its value over --baseline's, which
    they need; a baseline value of 0 has no ratio: the gate holds if the placement's is 0 too,
    else it fails). One line per gate after the report,
    `moeplace eval: PASS: ...` (stdout; not with --json, whose report gets `gates`) or
    `moeplace eval: FAIL: cross-GPU top-1 0.7100 > 0.6 (--max-cross-gpu; ...)` (stderr).
    Exit 0 all pass, 1 any fails, 2 bad input (also a limit no placement passes: --max-imbalance
    below 1, a zero --max-moe-time-ratio; a --max-*-vs-baseline without --baseline).

    \b
    Example:
      moeplace eval out/placement.json traces/flame-moe-290m-decoder.npz --max-cross-gpu 0.5
      moeplace solve traces/flame-moe-290m-decoder.npz --gpus 8 --train-fraction 0.5 -o out/p1x8.json
      moeplace eval out/p1x8.json traces/flame-moe-290m-decoder.npz \\
          --cluster configs/cluster/h100-1x8-nvlink.yaml --model-config configs/model/flame-moe-290m.yaml \\
          --max-moe-time-ratio 0.95
      moeplace serve ... --placement P.json --routing-out routing.npz   # then:
      moeplace eval P.json routing.npz --model MODEL_DIR --dtype fp32
      # re-placement: what the moves buy over the placement served (docs/solver.md)
      moeplace solve live.npz --from placement.json --max-moves 2 -o new.json
      moeplace eval new.json live.npz --baseline placement.json --max-cross-gpu-vs-baseline 1
    """
    if output is not None:
        check_output(output, "-o", [placement, trace, baseline, cluster, model_config],
                     [(model_dir, "--model"), (checkpoint_dir(model_config), "--model-config")])
    given = {key: v for key, v in limits.items() if v is not None}
    for key, limit in given.items():
        check_limit_range(key, limit, _flag(key))
    against = [_flag(key) for key in given if key.endswith(VS_BASELINE)]
    if against and baseline is None:
        raise MoeplaceError(f"{' and '.join(against)} need{'s' if len(against) == 1 else ''} --baseline "
                            "(a placement file of the same model to compare with)")
    timed = [_flag(key) for key in given if gate_metric(key)[0] == "moe_time_us"]
    # the cost model columns show when the report has them: --cluster's, or the one the placement records
    columns, per_layer = [*COLUMNS, *COST_COLUMNS], [*PER_LAYER, *COST_PER_LAYER]
    fns: list[MetricFn] = []
    assumed: list[ModelFacts] = []
    cost: dict[str, Any] = {"recorded": True, "none_recorded": (
        f"{' and '.join(timed)} need{'s' if len(timed) == 1 else ''} --cluster (the cost model predicts the MoE "
        f"time): {NO_RECORD}" if timed else "")}
    if cluster is not None:  # an explicit cluster config wins over a recorded cost model
        fn, facts, source, model = cost_metric_fn(cluster, model_config)
        fns, assumed, cost = [fn], [facts], {"cost_source": source, "cluster": model}
    elif model_config is not None:
        raise MoeplaceError("--model-config needs --cluster")
    traffic = traffic_options(model_dir, hidden_size, dtype, runtime_mode)
    if traffic is not None:
        fns.append(traffic_metric_fn(traffic["hidden_size"], traffic["element_bytes"], traffic["modes"],
                                     traffic["kv_bytes_per_rank"]))
        assumed.append(ModelFacts("--hidden-size" if model_dir is None else f"--model {model_dir}",
                                  traffic["hidden_size"]))
    routing = None if traffic is None else traffic.pop("model_routing")

    def check_routing(num_experts: int, top_k: int) -> None:  # from the trace's headers when they say
        if routing is not None and routing != (num_experts, top_k):
            raise MoeplaceError(f"--model {model_dir} is not the model of {trace}: {routing[0]} experts top-{routing[1]}, "
                                f"the trace {num_experts} experts top-{top_k}")

    report = evaluate_files(placement, trace, all_tokens, fns, assumed, **cost, baseline=baseline,
                            check_routing=check_routing,
                            needs_sequences="" if traffic is None else "--model" if model_dir else "--hidden-size")
    if baseline is not None:
        report["vs_baseline"] = vs_baseline(report)
    if traffic is not None:
        report["traffic"] = traffic
        add_traffic_ratios(report)
    results = threshold_results(report, given, _flag)  # errors name the option, not check's YAML key
    if given:
        report["gates"] = gates(results, given)
    if output is not None:
        with writing(output):
            write_json_atomic(output, report)
    click.echo(json.dumps(report, indent=2) if as_json else render_table(report, columns, per_layer))
    tokens = scored(report)
    for v in results:  # a failure on stderr, so that --json's stdout stays the report alone
        if not v.passed or not as_json:
            click.echo(gate_line(v, tokens), err=not v.passed)
    if not all(v.passed for v in results):
        raise AlreadyReported(1)  # said above, one line per failed gate


def _flag(key: str) -> str:
    """The option of a threshold: max_cross_gpu_vs_baseline -> --max-cross-gpu-vs-baseline."""
    return "--" + key.replace("_", "-")
