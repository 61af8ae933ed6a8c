"""The eval report: a placement and the baselines replayed on the same tokens, as data and as text.

The report is a plain dict (what `--json` prints):

    placement, trace                     paths as given
    num_layers, num_experts, top_k, num_gpus, gpus_per_node, num_nodes
    tokens      {"subset": "held-out" | "all", "evaluated": n, "total": T, "note": why,
                 "split_by": "token" | "sequence" (the placement's split of this trace; null: none),
                 "fit_path_share": share of the evaluated tokens whose routing path is a fit token's
                                   (exact, or estimated from the placement's fit_paths; null if unknown)}
    layouts     {name: metrics}          "placement" first, then each baseline; metrics are
                                         metrics.evaluate()'s plus those of any `metric_fns`
    vs_contiguous {name: {metric: value / contiguous value}}   scalar float metrics only
    copies      {name: extra expert copies (replicas), summed over layers}
    cost_model  (with the predicted MoE time) where its cost model came from: {"source": "placement"
                (recorded by a latency solve) | "config", "cluster", "model": their names,
                "batch_tokens": the step the times are for (None: the tokens scored),
                "cluster_config", "model_config": the files (config only)}
    baselines_note  on which loads the load baselines (greedy_load, eplb) were fitted; eplb's policy
    baseline    (eval --baseline, check's baseline:) another placement scored on exactly these tokens
                or loads: {placement, num_gpus, gpus_per_node, copies, metrics (scalars), per_layer
                (lists), note, traffic (with a traffic_metric_fn, on the same cluster)}; eval/cli.py's
                baseline_record
    vs_baseline (eval --baseline) {metric: placement value / baseline value}, None where the baseline's is 0

With a `traffic_metric_fn` (eval --hidden-size/--model), each layout's metrics also hold
`traffic` {mode: eval/traffic.py's prediction + `kv_sync_bytes_per_token` (coherent, when the
K/V shape is known) + `vs_standard_contiguous` (after `add_traffic_ratios`)}.

Columns and per-layer sections are lists of data (`COLUMNS`, `PER_LAYER`): a new metric (e.g. the
cost model's predicted MoE-layer time) is a `metric_fns` entry plus a Column, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from moeplace.errors import MoeplaceError, warn
from moeplace.eval.gates import LABELS
from moeplace.eval.metrics import evaluate, imbalance
from moeplace.eval.traffic import predict_traffic
from moeplace.export.permute import permutation_record
from moeplace.options import plural
from moeplace.placement import Placement
from moeplace.progress import Progress
from moeplace.solve.balance import expected_gpu_loads
from moeplace.solve.baselines import all_baselines, contiguous, greedy_load
from moeplace.solve.eplb import eplb_placement
from moeplace.trace import paths
from moeplace.trace.format import Trace, sequence_split_problem, split_trace

MetricFn = Callable[[Placement, Trace], dict[str, Any]]


@dataclass(frozen=True)
class Column:
    key: str  # metric name in each layout's metrics
    label: str
    fmt: str = ".4f"
    multi_node: bool = False  # shown only when the cluster has more than one node


COLUMNS: list[Column] = [
    Column("cross_gpu_top1", "cross-GPU top-1"),
    Column("cross_node_top1", "cross-node top-1", multi_node=True),
    Column("dest_gpus_topk", "dest GPUs top-k", ".3f"),
    Column("dest_nodes_topk", "dest nodes top-k", ".3f", multi_node=True),
    Column("imbalance_max", "imbalance max", ".3f"),
    Column("imbalance_mean", "imbalance mean", ".3f"),
]

# (per-layer metric [L], title) shown as one table of layers x layouts
PER_LAYER: list[tuple[str, str]] = [("imbalance_per_layer", "max/mean token load per GPU, per layer")]


def traffic_metric_fn(hidden_size: int, element_bytes: int, modes: Sequence[str],
                      kv_bytes_per_rank: int | None = None) -> MetricFn:
    """A metric fn adding `traffic` {mode: predict_traffic(...)} to every layout.

    kv_bytes_per_rank: K/V bytes one decoded token sends to each other rank in coherent mode's
    kv_sync (all decoder layers, metadata included); None when the model's K/V shape is unknown.
    """
    def fn(layout: Placement, trace: Trace) -> dict[str, Any]:
        out = {}
        for mode in modes:
            p = predict_traffic(layout, trace, mode, hidden_size, element_bytes)
            if mode == "coherent" and kv_bytes_per_rank is not None:
                p["kv_sync_bytes_per_token"] = float(kv_bytes_per_rank * (layout.num_gpus - 1))
            out[mode] = p
        return {"traffic": out}
    return fn


def add_traffic_ratios(report: dict[str, Any]) -> None:
    """Each layout's and mode's predicted bytes per token over standard + contiguous (the
    runtime's baseline: classic expert parallelism, default layout), in place; the --baseline
    placement's too, when it was predicted. None without a contiguous baseline (uneven placement)
    or without the standard mode (--runtime-mode coherent)."""
    base = report["layouts"].get("contiguous", {}).get("traffic", {}).get("standard")
    if base is None or base["alltoall_bytes_per_token"] == 0:
        return
    for _, m in table_layouts(report):
        for p in m.get("traffic", {}).values():
            p["vs_standard_contiguous"] = p["alltoall_bytes_per_token"] / base["alltoall_bytes_per_token"]


@dataclass
class TokenSubsets:
    """Which tokens eval replays and what it knows of them (see token_subsets)."""

    evaluated: np.ndarray | None  # token indices to evaluate; None: all
    fit: np.ndarray | None  # token indices the placement was fitted on; None: all, or unknown
    note: str
    fit_path_share: float | None  # share of the evaluated tokens whose routing path is a fit token's
    split_by: str | None = None  # "token" | "sequence": how the placement's split of this trace was drawn


def token_subsets(placement: Placement, trace: Trace, all_tokens: bool) -> TokenSubsets:
    """The tokens to evaluate and to fit the load baseline on, with a note for the report.

    Held-out by default when the placement was fitted on a split of this very trace (the same
    file, or the same routing in another file: a copy, a re-import, a re-save with other meta);
    a different trace is evaluated whole, and the fit tokens are then unknown: the placement's
    fit_paths sketch then estimates how many of them repeat a fit token's routing path (a
    subset or a re-ordering of the fit trace: all of them).
    """
    same_file = bool(placement.trace_sha256) and placement.trace_sha256 == trace.sha256
    if not same_file and (not placement.trace_routing_sha256 or placement.trace_routing_sha256 != trace.routing_sha256()):
        recorded = placement.trace_sha256 or placement.trace_routing_sha256
        why = ("not the trace the placement was fitted on, by file and routing hash; tokens it shares with that "
               "trace score in-sample") if recorded else "the placement records no trace"
        fit_k = _fit_top_k(placement)
        if placement.fit_paths is not None and fit_k not in (None, trace.top_k):
            # a path is the k experts of every layer: a top-1 re-import (ExFlow .npy) of the fit trace
            # matches none of its top-k paths, which would read as "0% in-sample"
            share, repeats = None, (f"; the placement was fitted on top-{fit_k} routing and this trace is "
                                    f"top-{trace.top_k}: its tokens' paths cannot be compared with the fit tokens'")
        else:
            share = None if placement.fit_paths is None else paths.fit_path_share(trace.topk_ids, placement.fit_paths)[0]
            repeats = "" if share is None else f"; {share:.0%} of them repeat a fit token's routing path (fit_paths)"
        return TokenSubsets(None, None, f"all tokens ({why}){repeats}", share)
    split = placement.split
    if not split:
        return TokenSubsets(None, None, "all tokens: in-sample, the placement was fitted on all of them "
                                        "(solve --train-fraction holds some out)", 1.0)
    fraction, seed = split["train_fraction"], split["seed"]  # checked when the placement was loaded
    by = split.get("by", "token")  # placements before --split-by: a token split
    if by == "sequence" and sequence_split_problem(trace):
        # the same routing without its sequence ids (an ExFlow .npy, some imports): the held-out
        # sequences cannot be re-drawn; the fit loads still give the load baselines with --all-tokens
        if all_tokens:
            return TokenSubsets(None, None, "all tokens (--all-tokens); the placement was fitted on whole sequences "
                                            "of this routing, which this file cannot name (no sequence ids)", None, by)
        lacks = "has no sequence_ids" if trace.sequence_ids is None else "holds one sequence"
        raise MoeplaceError(f"the placement was fitted on a split by sequence of this trace's routing, and this file "
                            f"{lacks}: its held-out sequences cannot be re-drawn; evaluate the trace file it was "
                            "fitted on, or use --all-tokens")
    train, held = split_trace(trace, fraction, seed, by)
    evaluated = None if all_tokens or len(held) == 0 else held
    hashes = paths.path_hashes(trace.topk_ids)  # [T]: the fit tokens are known, so the share is exact
    scored = hashes if evaluated is None else hashes[evaluated]
    share = float(np.isin(scored, hashes[train]).mean()) if len(scored) else None
    if all_tokens:
        return TokenSubsets(None, train, f"all tokens (--all-tokens), {len(train)} of them seen by the solver", share,
                            by)
    if len(held) == 0:
        return TokenSubsets(None, train, f"all tokens: in-sample (train_fraction {fraction} leaves none held out)",
                            share, by)
    if by == "sequence":
        assert trace.sequence_ids is not None  # sequence_split_problem said so
        count = len(np.unique(trace.sequence_ids[held]))
        return TokenSubsets(held, train, (
            f"held-out sequences, {count} of them, not seen by the solver (split by sequence, train_fraction "
            f"{fraction}, seed {seed}); --all-tokens to use every token"), share, by)
    return TokenSubsets(held, train, (
        f"held-out tokens, not seen by the solver (split train_fraction {fraction}, seed {seed}); "
        "--all-tokens to use every token"
    ), share, by)


def _fit_top_k(placement: Placement) -> int | None:
    """The fit trace's top-k as solve records it (metrics.train.placement.top_k), else None."""
    train = placement.metrics.get("train") if isinstance(placement.metrics, dict) else None
    layout = train.get("placement") if isinstance(train, dict) else None
    k = layout.get("top_k") if isinstance(layout, dict) else None
    return k if isinstance(k, int) and not isinstance(k, bool) else None


def eplb_baseline(loads: np.ndarray, placement: Placement, num_groups: Any = 1) -> tuple[Placement | None, str]:
    """DeepSeek's EPLB (solve/eplb.py) with as many redundant experts per layer as `placement`
    holds (its largest layer's), on `loads` [L, E]; (None, why) when EPLB cannot take the shape."""
    redundant = placement.num_replicas
    groups = num_groups if isinstance(num_groups, int) and num_groups > 0 and loads.shape[1] % num_groups == 0 else 1
    try:
        layout, _ = eplb_placement(loads, placement.num_gpus, placement.gpus_per_node, redundant, groups)
    except MoeplaceError as e:
        return None, f"no eplb baseline ({e})"
    merged = layout.solver.get("merged_duplicates", 0)
    copies = "1 copy" if merged == 1 else f"{merged} copies"
    return layout, (f"eplb: DeepSeek's EPLB with {redundant} redundant experts per layer ({layout.solver['name']}"
                    + (f"; {copies} it put on a GPU already holding the expert merged" if merged else "") + ")")


def _other_model(fitted: dict[str, Any] | None, here: dict[str, Any] | None) -> str:
    """A note when the placement was fitted on another model's routing of the same shape (the
    shapes themselves are checked): model_type or MoE layer indices differ where both are known."""
    if not fitted or not here:
        return ""
    differ = _differing(fitted, here)
    if not differ:
        return ""
    what = ", ".join(f"{key} {fitted[key]} (this trace: {here[key]})" for key in differ)
    return f"; NOTE: the placement was fitted on another model's routing: {what}"


def _differing(fitted: dict[str, Any], here: dict[str, Any]) -> list[str]:
    """The model-identity keys (model_type, moe_layers) both sides know and disagree on."""
    return [key for key in ("model_type", "moe_layers") if key in fitted and key in here and fitted[key] != here[key]]


def _copies(layouts: dict[str, Placement]) -> dict[str, int]:
    """Extra expert copies (replicas) of each layout, summed over layers: the report's `copies`."""
    return {name: sum(len(r) for r in layout.replicas) for name, layout in layouts.items()}


def build_report(
    placement: Placement,
    trace: Trace,
    *,
    all_tokens: bool = False,
    placement_name: str = "placement",
    trace_name: str = "trace",
    metric_fns: Sequence[MetricFn] = (),
    seed: int | None = None,
) -> dict[str, Any]:
    """Replay `trace` on `placement` and on every baseline (module docstring: the layout).

    1. pick the tokens (held-out when the placement was fitted on a split of this trace);
    2. baselines on the same cluster; greedy_load balances the loads of the fit tokens, random
       is seeded as the solve was (its `solver.seed`, else 0) unless `seed` is given;
    3. evaluate each layout, add `metric_fns` metrics, and ratios against contiguous.
    """
    placement.check_fits(trace.num_layers, trace.num_experts)
    subsets = token_subsets(placement, trace, all_tokens)
    eval_idx, fit_idx = subsets.evaluated, subsets.fit
    note = subsets.note + _other_model(placement.trace_model, trace.model_identity())
    evaluated = trace if eval_idx is None else trace.select_tokens(eval_idx)
    fit = evaluated if fit_idx is None else trace.select_tokens(fit_idx)

    warning = model_mismatch(placement, trace, trace_name)
    if warning:
        warn(warning)
    layouts: dict[str, Placement] = {"placement": placement}
    g, gpn = placement.num_gpus, placement.gpus_per_node
    if seed is None:
        fitted_seed = placement.solver.get("seed")
        seed = fitted_seed if isinstance(fitted_seed, int) else 0
    baselines_note = ""
    if g <= trace.num_experts:  # uneven E / G: the first E % G GPUs hold one more (baselines.py)
        # the load baselines see what the placement saw: its fit tokens, not the replayed ones
        if fit_idx is not None:
            fit_loads, fitted = fit.expert_loads(), "the placement's fit tokens"
        elif placement.fit_loads is not None:
            fit_loads, fitted = placement.fit_loads, "the placement's recorded fit loads"
        else:
            fit_loads, fitted = fit.expert_loads(), "the evaluated tokens (the placement records no fit loads)"
        for name, e2g in all_baselines(fit_loads, g, seed).items():
            layouts[name] = Placement(e2g, num_gpus=g, gpus_per_node=gpn)
        baselines_note = f"greedy_load fitted on {fitted}"
        if placement.num_replicas:  # like for like: a load balancer given the same copies
            eplb, eplb_note = eplb_baseline(fit_loads, placement, trace.meta.get("num_groups", 1))
            baselines_note = f"{eplb_note}; greedy_load and eplb fitted on {fitted}"
            if eplb is not None:
                layouts["eplb"] = eplb
    else:
        note += f"; no baselines: {g} GPUs for {trace.num_experts} experts leave some GPU without one"

    metrics: dict[str, dict[str, Any]] = {}
    progress = Progress("eval: replaying layouts", total=len(layouts))
    for i, (name, layout) in enumerate(layouts.items()):
        m = evaluate(layout, evaluated)
        for fn in metric_fns:
            m.update(fn(layout, evaluated))
        metrics[name] = m
        progress.update(i + 1, name)
    progress.close()
    return {
        "placement": placement_name,
        "trace": trace_name,
        "num_layers": trace.num_layers,
        "num_experts": trace.num_experts,
        "top_k": trace.top_k,
        "num_gpus": g,
        "gpus_per_node": gpn,
        "num_nodes": placement.num_nodes,
        "tokens": {
            "subset": "all" if eval_idx is None else "held-out",
            "evaluated": evaluated.num_tokens,
            "total": trace.num_tokens,
            "fit_path_share": subsets.fit_path_share,
            "split_by": subsets.split_by,
            "note": note,
        },
        "layouts": metrics,
        "vs_contiguous": _ratios(metrics),
        "copies": _copies(layouts),
        "baselines_note": baselines_note,
    }


def build_load_report(placement: Placement, loads: np.ndarray, *, placement_name: str = "placement",
                      loads_name: str = "loads", num_groups: Any = 1) -> dict[str, Any]:
    """The report on a load-only input (moeplace.loads/v1: expert loads [L, E], no token paths).

    Per layer max/mean load per GPU (the serving rule on aggregate loads, solve/balance.py's
    `expected_gpu_loads`) of the placement, contiguous, greedy_load and eplb (with the placement's
    redundant experts); the traffic metrics need token paths and are absent. Same layout as
    build_report's, with `tokens` replaced by `loads` {total, note}.
    """
    num_layers, num_experts = loads.shape
    placement.check_fits(num_layers, num_experts, what="loads")
    g, gpn = placement.num_gpus, placement.gpus_per_node
    layouts: dict[str, Placement] = {"placement": placement}
    baselines_note = ""
    if g <= loads.shape[1]:
        fit_loads, fitted = ((loads, "these loads") if placement.fit_loads is None
                             else (placement.fit_loads, "the placement's recorded fit loads"))
        layouts["contiguous"] = Placement(contiguous(num_layers, num_experts, g), g, gpn)
        layouts["greedy_load"] = Placement(greedy_load(fit_loads, g), g, gpn)
        eplb, eplb_note = eplb_baseline(fit_loads, placement, num_groups)
        baselines_note = f"{eplb_note}; greedy_load and eplb fitted on {fitted}"
        if eplb is not None:
            layouts["eplb"] = eplb
    metrics = {}
    for name, layout in layouts.items():
        imb = imbalance(expected_gpu_loads(layout, loads))
        metrics[name] = {"imbalance_per_layer": imb.tolist(), "imbalance_mean": float(imb.mean()),
                         "imbalance_max": float(imb.max())}
    return {
        "placement": placement_name, "trace": loads_name,
        "num_layers": loads.shape[0], "num_experts": loads.shape[1], "top_k": None,
        "num_gpus": g, "gpus_per_node": gpn, "num_nodes": placement.num_nodes,
        "loads": {"total": float(loads.sum()), "note": (
            "a load-only file (expert loads, no token paths): load balance only; the traffic metrics "
            "(cross-GPU/node, destinations, predicted time and bytes) need a routing trace"
            + _loads_sample(placement, loads))},
        "layouts": metrics,
        "vs_contiguous": _ratios(metrics),
        "copies": _copies(layouts),
        "baselines_note": baselines_note,
    }


def _loads_sample(placement: Placement, loads: np.ndarray) -> str:
    """Whether the loads scored are those the placement was fitted on (its recorded fit_loads),
    as the tokens line says in-sample or held-out for a trace."""
    if placement.fit_loads is None:
        return ""
    if placement.fit_loads.shape == loads.shape and np.allclose(placement.fit_loads, loads):
        return "; in-sample: the placement was fitted on these loads"
    return "; other loads than the placement was fitted on"


def model_mismatch(placement: Placement, trace: Trace, trace_name: str) -> str:
    """A one-line warning when `trace` is of another model than the placement was fitted on, else "".

    Another model_type or MoE layers, another checkpoint name (the last part of meta.model: the
    same checkpoint moved or re-downloaded keeps it), or a traced directory renumbered by
    `moeplace permute-checkpoint` (meta.renumbered_from, which `trace` records, or for older traces
    the directory's moeplace_permutation.json when it is here):
    its expert ids are not the placement's. Never an error: another model's traffic is a
    legitimate test of a placement, but its ratios to the baselines then mean something else.
    """
    fitted, here = placement.trace_model or {}, trace.model_identity() or {}
    fitted_model, here_model = fitted.get("model"), here.get("model")
    # trace meta says it since `trace` records it; older traces: the directory, when it is here
    renumbered = here.get("renumbered_from") or _permutation_source(here_model)
    if renumbered == (fitted.get("renumbered_from") or _permutation_source(fitted_model)):
        renumbered = None  # both renumbered alike (or neither): the same expert ids
    differ = _differing(fitted, here)
    names_differ = (isinstance(fitted_model, str) and isinstance(here_model, str)
                    and Path(fitted_model).name != Path(here_model).name)
    if not (differ or names_differ or renumbered is not None):
        return ""
    line = (f"{trace_name} is a trace of {here_model or 'another model'}, the placement was fitted on "
            f"{fitted_model or 'another model'}'s routing")
    if differ:
        line += " (" + ", ".join(f"{key} {fitted[key]} vs {here[key]}" for key in differ) + ")"
    if renumbered is not None:
        return (line + f"; {here_model} was renumbered by `moeplace permute-checkpoint` (from {renumbered}): the "
                "trace uses its re-ordered expert ids, in which the identity layout (the contiguous row) is the "
                "placement, so evaluate that, or evaluate on a trace of the original checkpoint")
    return line + "; if its expert ids number other experts the comparison with the baselines means little"


def _permutation_source(model: Any) -> str | None:
    """The original checkpoint of a traced directory `permute-checkpoint` renumbered (its record's
    source), or None: not a local directory, or not renumbered (the trace itself does not say)."""
    if not isinstance(model, str) or not Path(model).is_dir():
        return None
    try:
        record = permutation_record(model)
    except MoeplaceError:
        return None  # an unreadable record: the warning about the name still applies
    return None if record is None else str(record.get("source", "the original"))


def _ratios(metrics: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    base = metrics.get("contiguous")
    if base is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    for name, m in metrics.items():
        out[name] = {
            k: v / base[k]
            for k, v in m.items()
            if isinstance(v, float) and isinstance(base.get(k), float) and base[k] > 0
        }
    return out


def vs_baseline(report: dict[str, Any]) -> dict[str, float | None]:
    """The report's `vs_baseline`: the placement's value over the --baseline placement's (scored on
    the same tokens or loads) for every scalar metric both have. None where the baseline's value
    is 0: there is no ratio (a gate on it holds when the placement's is 0 too, gates.baseline_verdict)."""
    mine, theirs = report["layouts"]["placement"], report["baseline"]["metrics"]
    return {k: v / theirs[k] if theirs[k] > 0 else None for k, v in mine.items() if isinstance(v, float) and k in theirs}


# the row name of eval --baseline's placement: a fixed name, not the file's stem, which is often
# `placement` (the re-placement workflow's deployed placement.json) or a baseline's own name
BASELINE_ROW = "baseline"


def table_layouts(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, metrics) in table order: the placement, then the --baseline placement when the report
    has one (its record's metrics, per-layer lists and traffic when predicted), then the others."""
    rows = list(report["layouts"].items())
    base = report.get("baseline")
    if base is None:
        return rows
    extra = {"traffic": base["traffic"]} if "traffic" in base else {}
    return rows[:1] + [(BASELINE_ROW, {**base["metrics"], **base.get("per_layer", {}), **extra})] + rows[1:]


def visible_columns(report: dict[str, Any], columns: Sequence[Column] = COLUMNS) -> list[Column]:
    """Columns this report can fill (node columns only for multi-node clusters)."""
    first = next(iter(report["layouts"].values()))
    return [c for c in columns if c.key in first and (report["num_nodes"] > 1 or not c.multi_node)]


def render_table(
    report: dict[str, Any],
    columns: Sequence[Column] = COLUMNS,
    per_layer: Sequence[tuple[str, str]] = PER_LAYER,
) -> str:
    """Human-readable report: a summary table (value and x contiguous) and per-layer tables."""
    cols = visible_columns(report, columns)
    loads = report.get("loads")
    top_k = "" if report["top_k"] is None else f", top-{report['top_k']}"
    lines = [
        f"placement {report['placement']} on {'loads' if loads else 'trace'} {report['trace']}",
        f"  {report['num_layers']} MoE layers x {report['num_experts']} experts{top_k}; "
        f"{plural(report['num_gpus'], 'GPU')}, {report['gpus_per_node']} per node ({report['num_nodes']} node"
        f"{'s' if report['num_nodes'] > 1 else ''})",
        f"  loads: {_count(loads['total'])} token-expert selections, {loads['note']}" if loads else
        f"  tokens: {report['tokens']['evaluated']} of {report['tokens']['total']}, {report['tokens']['note']}",
        *([f"  predicted MoE time: {cost_model_line(report['cost_model'])}"] if "cost_model" in report else []),
        "",
    ]
    ratios = dict(report["vs_contiguous"])
    copies = dict(report.get("copies", {}))
    base = report.get("baseline")
    if base is not None:
        copies[BASELINE_ROW] = base.get("copies", 0)
        if "contiguous" in report["layouts"]:  # the baseline's ratio to contiguous, as the others'
            ratios[BASELINE_ROW] = _ratios({"contiguous": report["layouts"]["contiguous"],
                                            BASELINE_ROW: base["metrics"]})[BASELINE_ROW]
    with_copies = any(copies.values())
    rows = [["layout"] + (["copies"] if with_copies else []) + [c.label for c in cols]]
    for name, m in table_layouts(report):
        cells = [name] + ([str(copies.get(name, 0))] if with_copies else [])
        for c in cols:
            if c.key not in m:  # the baseline's MoE time on another GPU count: not predicted
                cells.append("-")
                continue
            cell = format(m[c.key], c.fmt)
            r = ratios.get(name, {}).get(c.key)
            cells.append(cell + (f" ({r:.2f}x)" if r is not None else ""))
        rows.append(cells)
    lines += _align(rows)
    if ratios:
        lines.append("  (x: ratio to contiguous, the default layout of Megatron, DeepSpeed, vLLM and SGLang; lower is better)")
    if with_copies:
        lines.append("  (copies: extra expert copies, summed over layers; layouts with 0 hold one copy of each expert"
                     + (f"; {report['baselines_note']})" if report.get("baselines_note") else ")"))
    elif report.get("baselines_note"):
        lines.append(f"  ({report['baselines_note']})")
    if short := in_short(report):
        lines.append(f"  in short: {short}")
    if base is not None:
        lines += against_baseline(report, cols)
    for key, title in per_layer:
        if key not in next(iter(report["layouts"].values())):
            continue
        lines += ["", title + ":"]
        shown = [(name, m[key]) for name, m in table_layouts(report) if key in m]  # a baseline's: not on other GPUs
        table = [["layer"] + [name for name, _ in shown]]
        for layer in range(report["num_layers"]):
            table.append([str(layer)] + [f"{values[layer]:.3f}" for _, values in shown])
        lines += _align(table)
    if "traffic" in next(iter(report["layouts"].values())):
        lines += ["", *render_traffic(report)]
    return "\n".join(lines)


# (metric, what it counts, words for lower / higher): the placement's row against contiguous, in words
_SHORT = [("cross_gpu_top1", "cross-GPU top-1 transitions", "fewer", "more"),
          ("cross_node_top1", "cross-node top-1 transitions", "fewer", "more"),
          ("dest_gpus_topk", "other GPUs per token (top-k)", "fewer", "more"),
          ("moe_time_us", "predicted MoE time", "lower", "higher"),
          ("imbalance_max", "worst layer's max/mean load per GPU", "lower", "higher")]


def in_short(report: dict[str, Any]) -> str:
    """The placement against contiguous in one sentence (the table's x column in words): what a
    reader of `make demo` or a CI log wants first; "" without a contiguous row."""
    ratios = report["vs_contiguous"].get("placement", {})
    said = []
    for key, what, lower, higher in _SHORT:
        r = ratios.get(key)
        if r is None or (key == "cross_node_top1" and report["num_nodes"] == 1):
            continue
        change = ("the same" if abs(r - 1) < 0.005 else f"{1 - r:.0%} {lower}" if r < 1 else f"{r - 1:.0%} {higher}")
        said.append(f"{what} {change}" if change == "the same" or lower == "lower" else f"{change} {what}")
    if not said:
        return ""
    tokens = report.get("tokens")
    held_out = "tokens of held-out sequences" if tokens and tokens.get("split_by") == "sequence" else "held-out tokens"
    on = ("these loads" if tokens is None else f"the {tokens['evaluated']} {held_out}"
          if tokens["subset"] == "held-out" else f"{tokens['evaluated']} tokens the placement was fitted on"
          if tokens["note"].startswith("all tokens: in-sample") else f"{tokens['evaluated']} tokens")
    return f"against contiguous on {on}: " + "; ".join(said)


def against_baseline(report: dict[str, Any], cols: Sequence[Column]) -> list[str]:
    """The placement against the --baseline placement, the headline metrics shown in the table
    (value vs the baseline's, and their ratio) in one line; a second saying so when the baseline
    is for another GPU count."""
    base = report["baseline"]
    ratios, mine = vs_baseline(report), report["layouts"]["placement"]
    said = []
    for key, *_ in _SHORT:
        c = next((c for c in cols if c.key == key), None)
        if c is None or key not in base["metrics"]:
            continue
        r = ratios.get(key)
        said.append(f"{LABELS[key]} {mine[key]:{c.fmt}} vs {base['metrics'][key]:{c.fmt}} "
                    + (f"({r:.3f}x)" if r is not None else "(no ratio: 0 in the baseline)"))
    same = "the same loads" if report.get("tokens") is None else "the same tokens"
    lines = [f"  vs baseline {base['placement']} (on {same}): " + "; ".join(said)]
    if base["note"]:
        lines.append(f"  (baseline: {base['note']})")
    return lines


def _count(total: float) -> str:
    """A load total as `moeplace import` and `analyze` print it: 6756224, not 6.75622e+06."""
    return f"{total:.0f}" if float(total).is_integer() else f"{total:g}"


def cost_model_line(source: dict[str, Any]) -> str:
    """Where the predicted MoE time's cost model came from, for the report's header: the
    placement's record (a latency solve's) or the cluster (+ model) config given."""
    names = f"{source['cluster']}, {source['model']}"
    batch = source.get("batch_tokens")
    step = f"us per step of {batch} tokens (batch_tokens)" if batch else "us per step of the tokens scored"
    if source["source"] == "placement":
        return f"{step}; cost model recorded in the placement ({names})"
    model = f" --model-config {source['model_config']}" if source.get("model_config") else ""
    return f"{step}; --cluster {source['cluster_config']}{model} ({names})"


def render_traffic(report: dict[str, Any]) -> list[str]:
    """The predicted decode Alltoall traffic: a row per layout and runtime mode."""
    rows = [["layout", "mode", "alltoalls/layer", "dispatch rows/token", "combine rows/token", "bytes/token",
             "x standard+contiguous", "kv_sync bytes/token"]]
    for name, m in table_layouts(report):
        for mode, p in m.get("traffic", {}).items():
            tokens = max(p["tokens"], 1)
            ratio = p.get("vs_standard_contiguous")
            kv = p.get("kv_sync_bytes_per_token")
            rows.append([name, mode, str(p["alltoalls_per_layer"]), f"{p['dispatch_rows'] / tokens:.3f}",
                         f"{p['combine_rows'] / tokens:.3f}", f"{p['alltoall_bytes_per_token']:.1f}",
                         "-" if ratio is None else f"{ratio:.2f}x",
                         "-" if kv is None and mode == "coherent" else f"{kv or 0:.1f}"])
    t = report.get("traffic", {})
    return [
        f"predicted decode Alltoall traffic per token (hidden {t.get('hidden_size')}, {t.get('element_bytes')} B/element; "
        "moeplace serve's dispatch + combine payload, docs/runtime.md):",
        *_align(rows),
        "  (kv_sync: coherent mode's per-step K/V replication, a separate Alltoall not in bytes/token; "
        "'-': kv_sync is known only with --model, and the ratio only with standard mode and a contiguous "
        "baseline in the table)",
    ]


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))).rstrip()
            for r in rows]
