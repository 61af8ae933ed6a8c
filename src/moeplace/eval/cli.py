"""`moeplace eval` (replay a trace against a placement, beside the baselines) and `moeplace check`
(the same, for a list of placements and thresholds read from YAML: a CI regression gate)."""

from __future__ import annotations

import difflib
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import click
import numpy as np

from moeplace.errors import AlreadyReported, MoeplaceError, warn
from moeplace.eval.metrics import evaluate, imbalance
from moeplace.eval.report import (COLUMNS, PER_LAYER, MetricFn, add_traffic_ratios, build_load_report, build_report,
                                  render_table, token_subsets, traffic_metric_fn)
from moeplace.io import atomic_path, loads_json, read_yaml, write_json_atomic
from moeplace.models.config import attention_shape, config_size
from moeplace.options import (DTYPE_BYTES, MAX_HIDDEN_SIZE, NON_NEGATIVE, OUTPUT_FILE, Count, DtypeChoice, brief,
                               check_writable, plural, writing, yaml_number)
from moeplace.placement import Placement, load_placement
from moeplace.solve.balance import expected_gpu_loads
from moeplace.solve.costmodel import COST_COLUMNS, COST_PER_LAYER, CostModel, ModelFacts
from moeplace.trace.format import Trace, is_load_only, load_loads, load_trace

# threshold name (CLI --max-NAME, YAML max_NAME[_vs_contiguous]) -> metric it bounds
THRESHOLDS: dict[str, str] = {
    "cross_gpu": "cross_gpu_top1",
    "cross_node": "cross_node_top1",
    "dest_gpus": "dest_gpus_topk",
    "dest_nodes": "dest_nodes_topk",
    "imbalance": "imbalance_max",
}
# ratio-only thresholds (CLI --max-NAME, YAML max_NAME) -> metric whose ratio to contiguous they bound;
# the predicted MoE time needs a cost model (--cluster), and only its ratio travels between clusters
RATIO_THRESHOLDS: dict[str, str] = {"moe_time_ratio": "moe_time_us"}
_VS = "_vs_contiguous"
# `moeplace check`'s max_NAME_vs_baseline: the metric's ratio to another placement's (a check's
# `baseline:`) on the same tokens; every metric with a _vs_contiguous form, and the predicted MoE time
_VS_BASE = "_vs_baseline"
BASELINE_METRICS: dict[str, str] = {**THRESHOLDS, "moe_time": "moe_time_us"}
# how a gate line names a metric
LABELS: dict[str, str] = {
    "cross_gpu_top1": "cross-GPU top-1", "cross_node_top1": "cross-node top-1", "dest_gpus_topk": "dest GPUs top-k",
    "dest_nodes_topk": "dest nodes top-k", "imbalance_max": "imbalance max", "moe_time_us": "predicted MoE time",
}


class Verdict(NamedTuple):
    what: str  # the metric, or "metric/contiguous" for a ratio
    value: float | None  # None: not applicable (a node ratio on one node)
    limit: float
    passed: bool
    key: str = ""  # the threshold: max_NAME[_vs_contiguous|_vs_baseline]
    baseline: float | None = None  # _vs_baseline: the baseline placement's own value
    note: str = ""  # shown instead of the value when it is None (a ratio to a zero baseline)


def gate_metric(key: str) -> tuple[str, bool]:
    """(metric, whether the threshold bounds its ratio to contiguous) of a `max_...` threshold."""
    name = key.removeprefix("max_")
    if name in RATIO_THRESHOLDS:
        return RATIO_THRESHOLDS[name], True
    if name.endswith(_VS_BASE):
        return BASELINE_METRICS[name.removesuffix(_VS_BASE)], True
    return THRESHOLDS[name.removesuffix(_VS)], name.endswith(_VS)


def threshold_results(report: dict[str, Any], limits: dict[str, float]) -> list[Verdict]:
    """The verdict of each limit on the report's placement.

    `limits` keys: `max_NAME` bounds the metric, `max_NAME_vs_contiguous` its ratio to contiguous,
    `max_moe_time_ratio` the predicted MoE time's ratio (the report needs the cost model's metrics).
    """
    out = []
    for key, limit in limits.items():
        metric, ratio = gate_metric(key)
        if metric not in report["layouts"]["placement"]:
            if "loads" in report:
                raise MoeplaceError(f"{key}: {report['trace']} is a load-only file (no token paths): only the "
                                    "imbalance thresholds apply to it")
            raise MoeplaceError(f"{key}: the report has no {metric} (the predicted MoE time needs a cluster config)")
        if key.endswith(_VS_BASE):
            out.append(baseline_verdict(report, key, float(limit)))
            continue
        if ratio:
            ratios = report["vs_contiguous"].get("placement", {})
            if metric not in ratios and metric in NODE_METRICS and not report["layouts"]["placement"].get(metric):
                # one node: nothing crosses nodes in any layout, so there is no ratio and nothing to regress
                # (a shared YAML's cross-node gate then holds, shown as n/a, rather than failing the run)
                out.append(Verdict(f"{metric}/contiguous", None, float(limit), True, key))
                continue
            if metric not in ratios:
                raise MoeplaceError(f"{key}: no contiguous {metric} to compare with on this trace")
            what, value = f"{metric}/contiguous", ratios[metric]
        else:
            what, value = metric, report["layouts"]["placement"][metric]
        out.append(Verdict(what, float(value), float(limit), value <= limit, key))
    return out


NODE_METRICS = ("cross_node_top1", "dest_nodes_topk")


def baseline_verdict(report: dict[str, Any], key: str, limit: float) -> Verdict:
    """A max_NAME_vs_baseline verdict: the placement's value over the baseline's (report["baseline"],
    on the same tokens). A zero baseline has no ratio: it holds when the placement's is 0 too, and
    fails otherwise (anything is worse than nothing)."""
    metric = gate_metric(key)[0]
    base = report.get("baseline")
    if base is None:
        raise MoeplaceError(f"{key}: no baseline to compare with (the check's 'baseline:')")
    if metric not in base["metrics"]:
        why = f"; {base['note']}" if base["note"] else ""
        raise MoeplaceError(f"{key}: the baseline {base['placement']} has no {metric}{why}")
    value, theirs = float(report["layouts"]["placement"][metric]), float(base["metrics"][metric])
    what = f"{metric}/baseline"
    if theirs > 0:
        return Verdict(what, value / theirs, limit, value / theirs <= limit, key, theirs)
    if value == 0:
        return Verdict(what, None, limit, True, key, theirs, "n/a (0 here and in the baseline)")
    return Verdict(what, None, limit, False, key, theirs, f"n/a: {value:.4g} where the baseline has 0, worse at any ratio")


def shown(v: Verdict) -> tuple[str, str]:
    """(value, limit) as printed: 4 decimals and %g, unless that rounding would contradict the
    verdict ("0.5839 > 0.5839"); then with as many significant digits as it takes (17 always do)."""
    if v.value is None:
        return "n/a", f"{v.limit:g}"
    value, limit = f"{v.value:.4f}", f"{v.limit:g}"
    digits = 6
    while (float(value) <= float(limit)) != v.passed and digits <= 17:
        value, limit = f"{v.value:.{digits}g}", f"{v.limit:.{digits}g}"
        digits += 1
    return value, limit


def _describe(verdicts: list[Verdict]) -> str:
    """A check's verdicts in one line; when some fail, those first and the rest after "within:",
    so the line says which thresholds broke without reading every sign."""
    def one(v: Verdict) -> str:
        value, limit = shown(v)
        if v.value is None:
            return f"{v.what} {v.note or 'n/a (one node)'}"
        return f"{v.what} {value} {'<=' if v.passed else '>'} {limit}"

    over = [one(v) for v in verdicts if not v.passed]
    within = [one(v) for v in verdicts if v.passed]
    if not over:
        return ", ".join(within)
    return ", ".join(over) + (f"; within: {', '.join(within)}" if within else "")


def gate_line(v: Verdict, tokens: str) -> str:
    """`moeplace eval`'s line for one gate: `moeplace eval: FAIL: cross-GPU top-1 0.7100 > 0.6 (--max-cross-gpu; ...)`."""
    metric, ratio = gate_metric(v.key)
    what = LABELS[metric] + (" / contiguous" if ratio else "")
    value, limit = shown(v)
    verdict = "n/a (one node)" if v.value is None else f"{value} {'<=' if v.passed else '>'} {limit}"
    return f"moeplace eval: {'PASS' if v.passed else 'FAIL'}: {what} {verdict} (--{v.key.replace('_', '-')}; {tokens})"


def _scored(report: dict[str, Any]) -> str:
    """What the gates judged: '320 held-out tokens', or 'expert loads' for a load-only file."""
    t = report.get("tokens")
    return "expert loads" if t is None else f"{t['evaluated']} {t['subset']} tokens"


def gates(results: list[Verdict], limits: dict[str, float]) -> dict[str, Any]:
    """The report's record of the regression gate: thresholds given, each verdict, overall."""
    return {"thresholds": limits, "passed": all(v.passed for v in results),
            "results": [{"threshold": v.key, "metric": v.what, "value": v.value, "limit": v.limit, "passed": v.passed}
                        for v in results]}


def _cost_metric(cluster: Path, model_config: Path | None) -> tuple[MetricFn, ModelFacts, dict[str, Any]]:
    """The predicted MoE time metric of a cluster (+ model) config, what it assumes of the model,
    and the report's `cost_model` record of where it came from."""
    from moeplace.solve.costmodel import cost_metric, load_cost_model, model_facts

    cost = load_cost_model(cluster, model_config)
    source = {"source": "config", "cluster_config": str(cluster),
              "model_config": None if model_config is None else str(model_config)}
    return cost_metric(cost), model_facts(cost), {**source, **_cost_names(cost)}


def _cost_names(cost: CostModel) -> dict[str, Any]:
    return {"cluster": cost.cluster.name, "model": cost.model.name, "batch_tokens": cost.model.batch_tokens}


def _check_metric_fns(check: dict[str, Any]) -> dict[str, Any]:
    """_evaluate's keyword arguments for a check's cost model: its cluster config's, or, when it
    names none, the one its placement records (max_moe_time_ratio then needs one there)."""
    if "cluster" not in check:
        needs = [k for k in check["limits"] if gate_metric(k)[0] == "moe_time_us"]
        return {"recorded": True, "none_recorded": f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''} "
                                                   "'cluster' (a cluster config YAML; model_config too when it has "
                                                   f"no model section): {NO_RECORD}" if needs else ""}
    fn, facts, source = _cost_metric(check["cluster"], check.get("model_config"))
    return {"metric_fns": [fn], "assumed": [facts], "cost_source": source}


# why a placement's predicted MoE time needs a cluster config: it records no cost model (str.format template)
NO_RECORD = "{placement} records no cost model (`moeplace solve --objective latency --cluster ...` records one)"


def recorded_cost_model(placement: Placement, name: Path) -> CostModel | None:
    """The cost model a latency solve recorded in the placement (objective.cost_model), or None
    when it records none; a malformed record (edited by hand) is one line naming the field."""
    from moeplace.solve.costmodel import cost_model_from_record

    record = placement.objective.get("cost_model")
    return None if record is None else cost_model_from_record(record, f"{name}: objective.cost_model",
                                                              f"the cost model {name} records")


def recorded_mismatch(cost: CostModel, trace: Trace, placement_path: Path, trace_path: Path) -> str:
    """A line saying the model a placement's recorded cost model describes is not the trace's
    (num_experts, top_k, hidden size in the trace meta; what either side does not state is not
    compared), else "". Unlike model_mismatch's what-if, nobody chose this model for this trace:
    its times would be another model's, so they are left out (an error when a gate needs them)."""
    m = cost.model
    traced = {"num_experts": trace.num_experts, "top_k": trace.top_k, "hidden_size": trace.meta_hidden_size()}
    stated = {"num_experts": m.num_experts, "top_k": m.top_k, "hidden_size": m.hidden_size}
    differ = [k for k in traced if traced[k] is not None and stated[k] is not None and traced[k] != stated[k]]
    if not differ:
        return ""
    return (f"{placement_path} records the cost model of {m.name} ("
            + ", ".join(f"{k} {stated[k]}" for k in differ) + f"), but {trace_path} has "
            + ", ".join(f"{k} {traced[k]}" for k in differ)
            + ": give --cluster (and --model-config) for this trace's model to predict its MoE time")


def _evaluate(placement_path: Path, trace_path: Path, all_tokens: bool, metric_fns: Sequence[MetricFn] = (),
              assumed: Sequence[ModelFacts] = (), recorded: bool = False, none_recorded: str = "",
              cost_source: dict[str, Any] | None = None, baseline: Path | None = None) -> dict[str, Any]:
    """Load both files and build the report (`metric_fns` add metrics to every layout); a
    load-only TRACE (moeplace.loads/v1) gets build_load_report's, load balance only.
    assumed: what the metrics assume of the model; one warning line each that the trace contradicts.
    recorded: add the predicted MoE time of the cost model the placement records, if any (not
    on a load-only TRACE); none_recorded: "" when no gate needs that time, else the error (a
    template of {placement}) when the placement records none. A record that is malformed or of
    another model than the trace's is then that error's reason; with no gate, a warning, and
    the report has no MoE time.
    cost_source: the report's `cost_model` (where the MoE time's cost model came from).
    baseline (`moeplace check`): another placement of the model, scored on the same tokens or loads
    as the report's `baseline` (see baseline_record)."""
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
            report["baseline"] = baseline_record(baseline, placement, placement_path, loads.loads)
        return report
    trace = load_trace(trace_path)
    check_fits(trace.num_layers, trace.num_experts)
    if cost is not None and (unusable := recorded_mismatch(cost, trace, placement_path, trace_path)):
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
    if baseline is not None:
        report["baseline"] = baseline_record(baseline, placement, placement_path, trace, all_tokens, metric_fns)
    return report


def baseline_record(path: Path, placement: Placement, placement_path: Path, data: Trace | np.ndarray,
                    all_tokens: bool = False, metric_fns: Sequence[MetricFn] = ()) -> dict[str, Any]:
    """The report's `baseline` (`moeplace check`'s baseline:): {placement, num_gpus, gpus_per_node,
    metrics (scalars), note}, scored on exactly the tokens the placement's report scored (its held-out
    split, whatever split the baseline was fitted on), or on the same expert loads [L, E].

    Another model or shape (layers, experts) is an error; another GPU count is a fair comparison
    (the note says so), though the cost model of the placement's cluster then cannot time it."""
    try:
        base = load_placement(path)
    except MoeplaceError as e:
        raise type(e)(f"baseline {e}") from None
    shape = data.shape if isinstance(data, np.ndarray) else (data.num_layers, data.num_experts)
    if (base.num_layers, base.num_experts) != shape:
        raise MoeplaceError(f"baseline {path} is for {base.num_layers} MoE layers x {base.num_experts} experts, but "
                            f"{placement_path} for {shape[0]} x {shape[1]}: a baseline is a placement of the same model")
    mine, theirs = placement.trace_model or {}, base.trace_model or {}
    for key in ("model_type", "moe_layers"):  # one shape, two models: their expert ids number other experts
        if key in mine and key in theirs and mine[key] != theirs[key]:
            raise MoeplaceError(f"baseline {path} was fitted on another model than {placement_path}: {key} "
                                f"{theirs[key]} (the placement's: {mine[key]})")
    same_cluster = (base.num_gpus, base.gpus_per_node) == (placement.num_gpus, placement.gpus_per_node)
    note = "" if same_cluster else (
        f"{path} is for {base.num_gpus} GPUs ({plural(base.num_nodes, 'node')}), this one for "
        f"{placement.num_gpus} ({plural(placement.num_nodes, 'node')}); compared on the same tokens")
    if isinstance(data, np.ndarray):
        imb = imbalance(expected_gpu_loads(base, data))
        metrics: dict[str, Any] = {"imbalance_mean": float(imb.mean()), "imbalance_max": float(imb.max())}
    else:
        held = token_subsets(placement, data, all_tokens).evaluated  # the report's tokens: build_report's rule
        tokens = data if held is None else data.select_tokens(held)
        metrics = evaluate(base, tokens)
        if same_cluster:  # a cost model is of the placement's cluster: it cannot time another GPU count
            for fn in metric_fns:
                metrics.update(fn(base, tokens))
    return {"placement": str(path), "num_gpus": base.num_gpus, "gpus_per_node": base.gpus_per_node,
            "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (float, int)) and not isinstance(v, bool)},
            "note": note}


_LIMIT: dict[str, Any] = dict(type=NON_NEGATIVE, default=None, metavar="X")


def read_model_shape(model_dir: Path) -> dict[str, int]:
    """hidden_size and the K/V shape from a checkpoint's config.json (no torch, no transformers).

    Sizes are checked as `moeplace serve` checks them (models/config.py): JSON integers >= 1,
    null is absent, num_key_value_heads divides num_attention_heads; here also
    num_experts_per_tok in [1, experts] (serve checks it against the routers' weights).
    """
    path = model_dir / "config.json"
    try:
        cfg = loads_json(path.read_text())
    except OSError as e:
        raise MoeplaceError(f"--model {model_dir}: cannot read config.json: {e.strerror or e}") from None
    except ValueError as e:
        raise MoeplaceError(f"--model {model_dir}: config.json is not valid JSON ({e})") from None
    where = f"--model {model_dir}: config.json"
    if not isinstance(cfg, dict):
        raise MoeplaceError(f"{where} is not a JSON object")
    need = "the traffic prediction"
    hidden, _, kv_heads, head_dim = attention_shape(cfg, where, need)
    for what, width in (("hidden_size", hidden), ("num_key_value_heads x head_dim", kv_heads * head_dim)):
        if width > MAX_HIDDEN_SIZE:  # bytes past any model's, and past float range for a 1e300 one
            raise MoeplaceError(f"{where} {what} {brief(width)} is more than {MAX_HIDDEN_SIZE} (2**20)")
    experts = config_size(cfg, where, "num_local_experts", "num_experts", "n_routed_experts", needed_for=need)
    top_k = config_size(cfg, where, "num_experts_per_tok", needed_for=need)
    if top_k > experts:
        raise MoeplaceError(f"{where} num_experts_per_tok {top_k} is not in [1, {experts}] "
                            f"(config.json gives {experts} experts per layer)")
    return {"hidden_size": hidden, "num_layers": config_size(cfg, where, "num_hidden_layers", needed_for=need),
            "num_kv_heads": kv_heads, "head_dim": head_dim, "num_experts": experts, "top_k": top_k}


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


@click.command("eval")
@click.argument("placement", type=click.Path(path_type=Path))
@click.argument("trace", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@click.option("-o", "--output", type=OUTPUT_FILE, default=None,
              help="Also write the JSON report to this file (atomically).")
@click.option("--all-tokens", is_flag=True,
              help="Evaluate every token, even when the placement was fitted on part of this trace.")
@click.option("--max-cross-gpu", **_LIMIT, help="Exit 1 if the fraction of top-1 transitions crossing GPUs exceeds X.")
@click.option("--max-cross-node", **_LIMIT, help="Exit 1 if the fraction crossing nodes exceeds X.")
@click.option("--max-dest-gpus", **_LIMIT, help="Exit 1 if the mean remote GPUs per token (top-k) exceeds X.")
@click.option("--max-dest-nodes", **_LIMIT, help="Exit 1 if the mean remote nodes per token (top-k) exceeds X.")
@click.option("--max-imbalance", **_LIMIT, help="Exit 1 if the worst layer's max/mean load per GPU exceeds X.")
@click.option("--max-moe-time-ratio", **_LIMIT,
              help="Exit 1 if the placement's predicted MoE time over contiguous's exceeds X (needs --cluster, "
                   "or a placement that records its cost model).")
@click.option("--cluster", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Cluster config YAML (configs/cluster/*.yaml): adds the predicted MoE-layer time, per layer too "
                   "(without it: with the cost model a latency solve recorded in PLACEMENT, if any).")
@click.option("--model-config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Model config YAML (configs/model/*.yaml) for --cluster, when the cluster file has no model section.")
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
          cluster: Path | None = None, model_config: Path | None = None, hidden_size: int | None = None,
          model_dir: Path | None = None, dtype: str | None = None, runtime_mode: str | None = None,
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
    held-out tokens are evaluated (--all-tokens: all); any other trace is evaluated whole.
    Baselines, on the same GPUs and tokens: contiguous, round_robin, random (the solve's seed) and
    greedy_load (load balancing fitted on the tokens the placement was fitted on); with replicas
    also eplb (DeepSeek's EPLB with as many redundant experts), and a `copies` column.

    \b
    Metrics (per layout; definitions in docs/eval.md):
      cross-GPU / cross-node top-1   fraction of top-1 transitions l -> l+1 that change GPU / node
      dest GPUs / nodes top-k        mean Alltoall destinations per token: GPUs (nodes) other
                                     than the token's own that hold one of its k experts
      imbalance                      per layer max/mean token load per GPU (max and mean over layers)
    Output: tables with the ratio to contiguous (lower is better), or JSON with --json.

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
    predicted MoE time over contiguous's). One line per gate after the report,
    `moeplace eval: PASS: ...` (stdout; not with --json, whose report gets `gates`) or
    `moeplace eval: FAIL: cross-GPU top-1 0.7100 > 0.6 (--max-cross-gpu; ...)` (stderr).
    Exit 0 all pass, 1 any fails, 2 bad input (also a limit no placement passes: --max-imbalance
    below 1, a zero --max-moe-time-ratio).

    \b
    Example:
      moeplace eval out/placement.json traces/flame-moe-290m-decoder.npz --max-cross-gpu 0.5
      moeplace solve traces/flame-moe-290m-decoder.npz --gpus 8 --train-fraction 0.5 -o out/p1x8.json
      moeplace eval out/p1x8.json traces/flame-moe-290m-decoder.npz \\
          --cluster configs/cluster/h100-1x8-nvlink.yaml --model-config configs/model/flame-moe-290m.yaml \\
          --max-moe-time-ratio 0.95
      moeplace serve ... --placement P.json --routing-out routing.npz   # then:
      moeplace eval P.json routing.npz --model MODEL_DIR --dtype fp32
    """
    if output is not None:
        check_writable(output, inputs=[placement, trace])
    given = {key: v for key, v in limits.items() if v is not None}
    for key, limit in given.items():
        check_limit_range(key, limit, "--" + key.replace("_", "-"))
    needs_time = any(gate_metric(key)[0] == "moe_time_us" for key in given)
    # the cost model columns show when the report has them: --cluster's, or the one the placement records
    columns, per_layer = [*COLUMNS, *COST_COLUMNS], [*PER_LAYER, *COST_PER_LAYER]
    fns: list[MetricFn] = []
    assumed: list[ModelFacts] = []
    cost: dict[str, Any] = {"recorded": True, "none_recorded": (
        f"--max-moe-time-ratio needs --cluster (the cost model predicts the MoE time): {NO_RECORD}"
        if needs_time else "")}
    if cluster is not None:  # an explicit cluster config wins over a recorded cost model
        fn, facts, source = _cost_metric(cluster, model_config)
        fns, assumed, cost = [fn], [facts], {"cost_source": source}
    elif model_config is not None:
        raise MoeplaceError("--model-config needs --cluster")
    traffic = traffic_options(model_dir, hidden_size, dtype, runtime_mode)
    if traffic is not None:
        fns.append(traffic_metric_fn(traffic["hidden_size"], traffic["element_bytes"], traffic["modes"],
                                     traffic["kv_bytes_per_rank"]))
        assumed.append(ModelFacts("--hidden-size" if model_dir is None else f"--model {model_dir}",
                                  traffic["hidden_size"]))
    report = _evaluate(placement, trace, all_tokens, fns, assumed, **cost)
    if traffic is not None:
        routing = traffic.pop("model_routing")
        if routing not in (None, (report["num_experts"], report["top_k"])):
            raise MoeplaceError(f"--model {model_dir} is not the model of {trace}: {routing[0]} experts top-{routing[1]}, "
                                f"the trace {report['num_experts']} experts top-{report['top_k']}")
        report["traffic"] = traffic
        add_traffic_ratios(report)
    results = threshold_results(report, given)
    if given:
        report["gates"] = gates(results, given)
    if output is not None:
        with writing(output):
            write_json_atomic(output, report)
    click.echo(json.dumps(report, indent=2) if as_json else render_table(report, columns, per_layer))
    tokens = _scored(report)
    for v in results:  # a failure on stderr, so that --json's stdout stays the report alone
        if not v.passed or not as_json:
            click.echo(gate_line(v, tokens), err=not v.passed)
    if not all(v.passed for v in results):
        raise AlreadyReported(1)  # said above, one line per failed gate


# --- moeplace check ------------------------------------------------------------------------------

_CHECK_KEYS = {"name", "placement", "trace", "all_tokens", "cluster", "model_config", "baseline"}
_CHECK_FILES = ("placement", "trace", "cluster", "model_config", "baseline")  # the paths a check reads
_BASELINE_KEYS = {f"max_{n}{_VS_BASE}" for n in BASELINE_METRICS}
_LIMIT_KEYS = ({f"max_{n}{vs}" for n in THRESHOLDS for vs in ("", _VS)} | {f"max_{n}" for n in RATIO_THRESHOLDS}
               | _BASELINE_KEYS)
_THRESHOLD_NAMES = (f"max_<{'|'.join(THRESHOLDS)}>[{_VS}|{_VS_BASE}], "
                    f"{', '.join(f'max_{n}' for n in RATIO_THRESHOLDS)}, max_moe_time{_VS_BASE}")


def read_checks(path: Path) -> list[dict[str, Any]]:
    """The checks of a YAML file, validated, with `defaults` merged and paths made absolute.

    Paths are relative to the YAML file's folder, so a config works from any directory.
    """
    doc = read_yaml(path, MoeplaceError)
    if isinstance(doc, dict) and isinstance(doc.get("format"), str) and "checks" not in doc:  # JSON is YAML
        raise MoeplaceError(f"{path}: a {doc['format']} file, not a list of checks (a YAML file with a 'checks:' "
                            "list, e.g. configs/check-example.yaml)")
    if not isinstance(doc, dict) or not isinstance(doc.get("checks"), list) or not doc["checks"]:
        raise MoeplaceError(f"{path}: expected a mapping with a non-empty 'checks' list")
    unknown_top = set(doc) - {"checks", "defaults"}
    if unknown_top:
        raise MoeplaceError(f"{path}: unknown top-level keys {_names(unknown_top)} (expected checks, defaults)")
    defaults = {} if doc.get("defaults") is None else doc["defaults"]  # `defaults:` with nothing after it
    if not isinstance(defaults, dict):
        raise MoeplaceError(f"{path}: 'defaults' must be a mapping")
    unknown = set(defaults) - _CHECK_KEYS - _LIMIT_KEYS
    if unknown:  # said here, not blamed on the first check it is merged into
        raise MoeplaceError(f"{path}: defaults: unknown keys {_names(unknown)}; thresholds are {_THRESHOLD_NAMES}")
    checks: list[dict[str, Any]] = []
    for i, raw in enumerate(doc["checks"]):
        if not isinstance(raw, dict):
            raise MoeplaceError(f"{path}: check {i + 1} must be a mapping")
        check = {**defaults, **raw}
        label = f"{path}: check {i + 1} ({check.get('name', 'unnamed')})"
        if "cluster" in raw and raw["cluster"] is None:  # no cost model here: nor the defaults' parts of one
            for key in ("model_config", *(k for k in _LIMIT_KEYS if gate_metric(k)[0] == "moe_time_us")):
                if key not in raw:
                    check.pop(key, None)
        if "baseline" in raw and raw["baseline"] is None:  # likewise the defaults' thresholds on a baseline
            for key in _BASELINE_KEYS - set(raw):
                check.pop(key, None)
        unknown = set(check) - _CHECK_KEYS - _LIMIT_KEYS
        if unknown:
            raise MoeplaceError(f"{label}: unknown keys {_names(unknown)}; thresholds are {_THRESHOLD_NAMES}")
        for key in _CHECK_FILES:
            if check.get(key) is None:
                if key in ("placement", "trace"):
                    raise MoeplaceError(f"{label}: '{key}' (a path) is required")
                check.pop(key, None)  # `cluster: null` drops a default's
                continue
            if not isinstance(check[key], str) or not check[key].strip():
                raise MoeplaceError(f"{label}: '{key}' must be a path (a non-empty string), got {check[key]!r}")
            check[key] = Path(os.path.normpath(path.parent / Path(check[key]).expanduser()))
        if "model_config" in check and "cluster" not in check:
            raise MoeplaceError(f"{label}: model_config needs cluster")
        # `max_x: null` in a check drops a threshold its defaults set
        limits = {k: _threshold(v, k, label) for k in list(check) if k in _LIMIT_KEYS and (v := check.pop(k)) is not None}
        if not limits:
            raise MoeplaceError(f"{label}: no thresholds; set at least one of {sorted(_LIMIT_KEYS)}")
        against = sorted(k for k in limits if k in _BASELINE_KEYS)
        if against and "baseline" not in check:
            raise MoeplaceError(f"{label}: {', '.join(against)} need{'s' if len(against) == 1 else ''} 'baseline' "
                                "(a placement file of the same model to compare with)")
        if "baseline" in check and not against:
            if "baseline" in raw:  # a baseline that gates nothing: `max_cross_gpu` meant as a ratio?
                raise MoeplaceError(f"{label}: baseline is set but no max_<metric>{_VS_BASE} threshold uses it")
            del check["baseline"]  # the defaults' baseline, for the checks that gate against it
        if not isinstance(check.get("all_tokens", False), bool):
            raise MoeplaceError(f"{label}: all_tokens must be true or false")
        check["limits"] = limits
        check.setdefault("name", f"check {i + 1}")
        if isinstance(check["name"], (int, float)) and not isinstance(check["name"], bool):
            check["name"] = str(check["name"])  # `name: 2026` is a fine name
        if not isinstance(check["name"], str):
            raise MoeplaceError(f"{label}: name must be a string, got {check['name']!r}")
        twice = next((c for c in checks if c["name"] == check["name"]), None)
        if twice is not None:  # the PASS/FAIL lines and the JSON report name checks: one name, one check
            raise MoeplaceError(f"{path}: checks {checks.index(twice) + 1} and {i + 1} are both named {check['name']!r}")
        checks.append(check)
    return checks


def _names(keys: set[Any]) -> list[str]:
    """Keys of a YAML mapping, sorted for a message: `1: x` beside `foo: y` is an int beside a str."""
    return sorted(map(str, keys))


def _threshold(value: Any, key: str, label: str) -> float:
    """A threshold as a float: a number, or a string holding one (YAML 1.1 reads `1e-1`, with no
    dot, as a string); finite (a 400-digit integer is not) and non-negative."""
    number = yaml_number(value)
    if number is None or not 0 <= number < float("inf"):
        raise MoeplaceError(f"{label}: {key} must be a non-negative number, got {brief(value)}")
    check_limit_range(key, number, f"{label}: {key}")
    return number


FRACTIONS = {"max_cross_gpu", "max_cross_node"}  # limits on a share of transitions, in [0, 1]


def check_limit_range(key: str, limit: float, named: str) -> None:
    """Refuse a (non-negative) limit that no placement can pass or fail, rather than gate forever:
    a cross-GPU or cross-node share above 1 (a share never exceeds 1: almost surely a
    percentage, 60 for 0.60); an imbalance below 1 (max/mean is at least 1: 0.1 for 10% above
    the mean?); a zero limit on a metric that is always positive (an imbalance ratio, a
    predicted time ratio). Every other non-negative limit can pass (0 traffic on a layout that
    keeps every token on its GPU)."""
    if key in FRACTIONS and limit > 1:
        raise MoeplaceError(f"{named} {limit:g}: the {LABELS[THRESHOLDS[key.removeprefix('max_')]]} share is a "
                            f"fraction in [0, 1], so this limit checks nothing; a percentage? give {limit / 100:g}")
    if key == "max_imbalance" and limit < 1:
        meant = f"; {limit:.0%} above the mean is {1 + limit:g}" if 0 < limit < 0.5 else ""  # 0.1 for 10%, likely
        raise MoeplaceError(f"{named} {limit:g}: the imbalance (max/mean load per GPU) is at least 1 (1: every GPU "
                            f"at the mean), so no placement passes{meant}")
    if key in ("max_imbalance_vs_contiguous", "max_moe_time_ratio", "max_imbalance_vs_baseline",
               "max_moe_time_vs_baseline") and limit == 0:
        raise MoeplaceError(f"{named} 0: the ratio of two positive {'imbalances' if 'imbalance' in key else 'times'} "
                            "is above 0, so no placement passes; give a positive ratio")


def _why(e: BaseException, check: dict[str, Any]) -> str:
    """A check's failure in one line; out of memory and too deep a nesting name its files."""
    files = f"{check['placement']} on {check['trace']}"
    if isinstance(e, MemoryError):
        return f"out of memory evaluating {files} (is an input far larger than intended?)"
    if isinstance(e, RecursionError):
        return f"input nested too deeply, evaluating {files}"
    return str(e)


class CheckRun(NamedTuple):
    """One check's outcome: its report and verdicts, or the one line saying why it could not run."""
    check: dict[str, Any]
    report: dict[str, Any] | None  # None: it could not run
    verdicts: list[Verdict]
    error: str  # "" when it ran
    seconds: float

    @property
    def status(self) -> str:
        return "error" if self.report is None else "pass" if all(v.passed for v in self.verdicts) else "fail"


def run_check(c: dict[str, Any]) -> CheckRun:
    """Evaluate one check; one bad input stops its check, not the gate."""
    start = time.perf_counter()
    try:
        report = _evaluate(c["placement"], c["trace"], c.get("all_tokens", False), **_check_metric_fns(c),
                           baseline=c.get("baseline"))
        verdicts = threshold_results(report, c["limits"])
    except (MoeplaceError, MemoryError, RecursionError) as e:
        return CheckRun(c, None, [], _why(e, c), time.perf_counter() - start)
    return CheckRun(c, report, verdicts, "", time.perf_counter() - start)


def check_lines(r: CheckRun) -> list[str]:
    """The text lines of a check: PASS/FAIL/ERROR, then what the tokens are when not a held-out split."""
    if r.report is None:
        return [f"ERROR {r.check['name']}: {r.error}"]
    lines = [f"{r.status.upper():<4}  {r.check['name']} ({_scored(r.report)}): {_describe(r.verdicts)}"]
    t = r.report.get("tokens")
    if t is None:
        lines.append(f"      loads: {r.report['loads']['note']}")
    elif t["subset"] != "held-out":  # what eval says of these tokens (in-sample, another trace, another model)
        lines.append(f"      tokens: {t['note']}")
    if r.report.get("baseline", {}).get("note"):  # a baseline on another GPU count
        lines.append(f"      baseline: {r.report['baseline']['note']}")
    return lines


def select_checks(checks: list[dict[str, Any]], only: Sequence[str], config: Path) -> list[dict[str, Any]]:
    """The checks --only names, in the YAML's order (all of them without --only); an unknown name
    is an error before anything runs, so a typo never gates nothing."""
    names = [c["name"] for c in checks]
    for name in only:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise MoeplaceError(f"--only {name!r}: {config} has no such check; {hint}its checks: "
                                + ", ".join(map(repr, names)))
    return [c for c in checks if not only or c["name"] in only]


def check_json(r: CheckRun) -> dict[str, Any]:
    """A check in --json's document: status, inputs, what was scored, each threshold's verdict."""
    out: dict[str, Any] = {"name": r.check["name"], "status": r.status, "placement": str(r.check["placement"]),
                           "trace": str(r.check["trace"])}
    if "baseline" in r.check:  # with what it is when the check ran: its GPUs, and a note on another count
        out["baseline"] = {"placement": str(r.check["baseline"])}
        if r.report is not None:
            out["baseline"].update({k: r.report["baseline"][k] for k in ("num_gpus", "gpus_per_node", "note")})
    if r.report is None:
        return {**out, "error": r.error}
    t = r.report.get("tokens")
    out["tokens"] = None if t is None else {k: t[k] for k in ("subset", "evaluated", "total", "note")}
    if t is None:
        out["loads"] = {"total": r.report["loads"]["total"], "note": r.report["loads"]["note"]}
    out["thresholds"] = [{"threshold": v.key, "metric": v.what, "limit": v.limit, "value": v.value,
                          **({"baseline_value": v.baseline} if v.key.endswith(_VS_BASE) else {}),
                          **({"note": v.note} if v.note else {}), "passed": v.passed} for v in r.verdicts]
    return out


def summary_counts(runs: list[CheckRun], skipped: int) -> dict[str, int]:
    statuses = [r.status for r in runs]
    return {"checks": len(runs), "passed": statuses.count("pass"), "failed": statuses.count("fail"),
            "errors": statuses.count("error"), "not_selected": skipped}


# XML 1.0 has no way to write these (not even escaped): ElementTree would write them as they are
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml(text: str) -> str:
    """Text an XML 1.0 parser accepts: control characters and lone surrogates (a path's
    undecodable bytes) as U+FFFD; ElementTree escapes <, & and quotes itself."""
    return _NOT_XML.sub("\ufffd", text)


def junit_xml(runs: list[CheckRun], config: Path) -> ET.Element:
    """A JUnit report: one testsuite "moeplace check", one testcase per check; a <failure> names
    the broken thresholds, an <error> says why a check could not run."""
    counts = summary_counts(runs, 0)
    total = f"{sum(r.seconds for r in runs):.3f}"
    attrs = {"name": "moeplace check", "tests": str(counts["checks"]), "failures": str(counts["failed"]),
             "errors": str(counts["errors"]), "time": total}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", {**attrs, "skipped": "0", "file": _xml(str(config))})
    for r in runs:
        case = ET.SubElement(suite, "testcase", {"name": _xml(r.check["name"]), "classname": "moeplace check",
                                                 "time": f"{r.seconds:.3f}"})
        if r.report is None:
            ET.SubElement(case, "error", {"message": _xml(r.error), "type": "error"}).text = _xml(r.error)
            continue
        lines = "\n".join(check_lines(r))
        if r.status == "fail":
            broken = _describe([v for v in r.verdicts if not v.passed])
            ET.SubElement(case, "failure", {"message": _xml(broken), "type": "threshold"}).text = _xml(lines)
        else:
            ET.SubElement(case, "system-out").text = _xml(lines)
    ET.indent(root)
    return root


def write_junit(path: Path, root: ET.Element) -> None:
    with writing(path), atomic_path(path) as tmp:  # bytes: the declaration says UTF-8 whatever the locale
        tmp.write_bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n")


@click.command("check")
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document (each check's status, files, tokens, thresholds; the counts) instead "
                   "of the lines.")
@click.option("--junit-xml", "junit", type=OUTPUT_FILE, default=None, metavar="FILE",
              help="Also write a JUnit XML report (a testcase per check) for CI test reporters.")
@click.option("--only", multiple=True, metavar="NAME", help="Run only the check NAME (repeatable).")
def check(config: Path, as_json: bool, junit: Path | None, only: tuple[str, ...]) -> None:
    """CI regression gate: run the checks of a YAML file; exit 1 if any fails.

    \b
    Each check evaluates one placement on one trace (as `moeplace eval` does: held-out tokens
    when the placement was fitted on a split of that trace) and compares the placement's
    metrics with thresholds. Output: one PASS/FAIL/ERROR line per check, then a summary counting
    each kind. Exit 0 all pass, 1 any fails, 2 a check could not run (missing or malformed file;
    2 wins over 1) or the YAML is malformed.

    \b
    YAML (paths relative to the YAML file; `defaults` apply to every check):
      defaults:
        trace: ../traces/flame-moe-290m-decoder.npz
      checks:
        - name: flame-8gpu
          placement: ../out/placement.json
          all_tokens: false                    # optional
          max_cross_gpu_vs_contiguous: 0.70    # ratio to the contiguous layout
          max_dest_gpus: 3.0                   # absolute
        - name: flame-1x8-latency              # cluster adds the predicted MoE time
          placement: ../out/p1x8.json
          cluster: ../configs/cluster/h100-1x8-nvlink.yaml
          model_config: ../configs/model/flame-moe-290m.yaml   # when the cluster file has no model
          max_moe_time_ratio: 0.95             # placement's MoE time / contiguous's
        - name: no-worse-than-released         # against the placement shipped last
          placement: ../out/placement.json
          baseline: ../placements/released.json
          max_cross_gpu_vs_baseline: 1.0       # placement's value / baseline's, same tokens
    Thresholds: max_cross_gpu, max_cross_node, max_dest_gpus, max_dest_nodes, max_imbalance
    (worst layer's max/mean load), each also as max_<name>_vs_contiguous and
    max_<name>_vs_baseline, and max_moe_time_ratio, max_moe_time_vs_baseline (with cluster, or
    the cost model the placement records when the check names no cluster); `null` in a check
    drops a default's threshold (or cluster, or baseline, with the defaults' thresholds on it);
    a node ratio to contiguous on a one-node placement is n/a and holds. When the tokens are
    not a held-out split, a `tokens:` line under the check says what they are.

    \b
    baseline: another placement of the same model (layers, experts; else the check is an
    ERROR), scored on exactly the placement's tokens; a _vs_baseline threshold needs one. A
    baseline on another GPU count is compared, with a `baseline:` line saying so (its MoE time
    is not predicted: the cost model is the placement's cluster). Where the baseline's value is
    0 there is no ratio: the threshold holds if the placement's is 0 too, else it fails.

    \b
    For CI: --json prints one JSON document on stdout instead of the lines (per check: name,
    status pass/fail/error, placement, trace, baseline, tokens, each threshold's limit, value,
    verdict and, for a _vs_baseline one, the baseline's own value; or the error; then the
    counts); the FAIL or error summary line still goes to stderr, and the exit codes are the
    same. --junit-xml FILE also writes a JUnit report (a <failure> names the broken thresholds,
    an <error> a check that could not run) for GitLab, Jenkins or GitHub test reporters.
    --only NAME runs only that check (repeatable; an unknown name is an error listing the
    YAML's names). A malformed YAML or an unknown --only name is one error line on
    stderr and exit 2, before any check runs: no JSON, no XML file.

    \b
    Example (after `make demo`):
      moeplace check configs/check-example.yaml
      moeplace check configs/check-example.yaml --only flame-decoder-8gpu-2node \\
          --junit-xml out/check.xml --json > out/check.json
    """
    every = read_checks(config)
    checks = select_checks(every, only, config)
    if junit is not None:  # fail now, not after the checks have run
        check_writable(junit, "--junit-xml", [config, *(c.get(k) for c in checks for k in _CHECK_FILES)])
    runs = []
    for c in checks:
        runs.append(run_check(c))
        if not as_json:  # each line as its check ends: a long gate shows progress
            click.echo("\n".join(check_lines(runs[-1])))
    if junit is not None:
        write_junit(junit, junit_xml(runs, config))
    counts = summary_counts(runs, len(every) - len(checks))
    n, passed, failed, broken = counts["checks"], counts["passed"], counts["failed"], counts["errors"]
    if as_json:
        click.echo(json.dumps({"config": str(config), "passed": not failed and not broken, "summary": counts,
                               "checks": [check_json(r) for r in runs]}, indent=2))
    if broken:  # exit 2 wins: the gate did not run whole, whatever the others say
        raise MoeplaceError(f"{broken} of {plural(n, 'check')} could not run ({passed} passed, {failed} failed)")
    if failed:  # a verdict, not bad input: not the `moeplace: error:` line
        click.echo(f"moeplace check: FAIL: {failed} of {plural(n, 'check')} failed ({passed} passed)", err=True)
        raise AlreadyReported(1)
    if not as_json:
        click.echo(f"moeplace check: PASS: {f'all {n} checks' if n > 1 else 'the 1 check'} passed")
