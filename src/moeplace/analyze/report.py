"""Assemble an analysis into one JSON-ready report, and render its terminal summary.

Report schema ("moeplace.analyze/v1"):

    traces     {"A": trace_report, "B": trace_report (with --compare)}
    transfer   A -> B stability (with --compare): correlation, held-out capture, placement gain
               (printed as ratios to contiguous, `0.41x` as solve and eval print them, and the
               reduction contiguous - placement that `transferred` divides)
    figures    paths of the PNGs written

    trace_report = {info, load: [per layer], load_mean, affinity: {modes: {mode: {per_pair,
                    mean}}, log_num_experts, shuffles, seed}, halves: stability of two halves,
                    verdict: {significant_pairs per mode, text}}

Layer pairs are indexed 0..L-2 into the trace's MoE layers; `info.moe_layers` maps them to the
model's layer numbers (used in every printed label).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from moeplace.analyze.affinity import affinity, load_skew, mean_stats, trace_modes
from moeplace.analyze.stability import load_correlation, split_halves, stability, too_few_tokens
from moeplace.progress import Progress
from moeplace.trace.format import ExpertLoads, Trace

REPORT_FORMAT = "moeplace.analyze/v1"
Source = Union[Trace, ExpertLoads]  # what analyze reads: a per-token trace or load-only counts


def layer_names(meta: dict[str, Any], num_layers: int) -> list[int]:
    """The model's layer number of each MoE layer (from meta["moe_layers"]), else 0..L-1."""
    names = meta.get("moe_layers")
    if isinstance(names, list) and len(names) == num_layers and all(isinstance(n, int) for n in names):
        return names
    return list(range(num_layers))


def source_loads(source: Source) -> np.ndarray:
    """Token-expert selections per expert, float64 [L, E], of a trace or a load-only input."""
    return source.expert_loads() if isinstance(source, Trace) else source.loads


def trace_info(source: Source, path: str) -> dict[str, Any]:
    info = {
        "path": path,
        "sha256": source.sha256,
        "model": source.meta.get("model"),
        "moe_layers": layer_names(source.meta, source.num_layers),
        "num_experts": source.num_experts,
    }
    if not isinstance(source, Trace):
        return {**info, "load_only": True, "selections": float(source.loads.sum())}
    return {
        **info,
        "load_only": False,
        "tokens": source.num_tokens,
        "top_k": source.top_k,
        "has_weights": source.topk_weights is not None,
        "sequences": None if source.sequence_ids is None else int(len(np.unique(source.sequence_ids))),
    }


@dataclass(frozen=True)
class AnalyzeConfig:
    """Knobs of an analysis (the CLI options). num_gpus None skips the placement-transfer test."""

    num_shuffles: int = 8
    seed: int = 0
    hottest: int = 4
    num_gpus: int | None = 8
    gpus_per_node: int = 8
    time_limit: float = 10.0


def analyze_trace(trace: Trace, path: str, cfg: AnalyzeConfig, name: str = "A") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(report of one trace, conditional matrices P(j | i) [L-1, E, E] per mode for figures).

    1. load skew per layer; 2. affinity per layer pair with a shuffled baseline;
    3. stability between two seeded halves.
    """
    load = load_skew(trace.expert_loads(), cfg.hottest)
    progress = Progress(f"analyze {name}: affinity", total=len(trace_modes(trace)) * (1 + cfg.num_shuffles))
    aff = affinity(trace, cfg.num_shuffles, cfg.seed, progress)
    progress.close()
    conditionals = aff.pop("conditional")
    report: dict[str, Any] = {"info": trace_info(trace, path), "load": load, "load_mean": mean_stats(load), "affinity": aff}
    if trace.num_layers < 2:
        report["halves"] = {"skipped": "one MoE layer: no layer pairs"}
    elif trace.num_tokens < 4:
        report["halves"] = {"skipped": f"{trace.num_tokens} tokens are too few to split"}
    else:
        half_a, half_b, split = split_halves(trace, cfg.seed)
        report["halves"] = {"split": split, **_stability(half_a, half_b, cfg, f"{name} halves")}
    report["verdict"] = verdict(report)
    return report, conditionals


def analyze_loads(loads: ExpertLoads, path: str, cfg: AnalyzeConfig) -> dict[str, Any]:
    """Report of a load-only input: load skew only (no per-token paths, so no affinity)."""
    load = load_skew(loads.loads, cfg.hottest)
    return {
        "info": trace_info(loads, path),
        "load": load,
        "load_mean": mean_stats(load),
        "affinity": {"modes": {}},
        "halves": {"skipped": "load-only input: no per-token paths"},
        "verdict": {"text": "load-only input: load skew only; affinity and its stability need a per-token "
                            "trace (moeplace trace, or moeplace import of per-token dumps)."},
    }


SIGNIFICANT_STD = 3.0  # an MI excess beyond this many shuffle stds is counted as affinity


def verdict(tr: dict[str, Any]) -> dict[str, Any]:
    """The one-paragraph answer: how many layer pairs show affinity, and does it transfer?"""
    modes = tr["affinity"]["modes"]
    out: dict[str, Any] = {"num_pairs": len(tr["load"]) - 1, "significant_std": SIGNIFICANT_STD, "significant_pairs": {}}
    for mode, res in modes.items():
        out["significant_pairs"][mode] = sum(
            r.get("mi_excess") is not None and r["mi_excess"] > SIGNIFICANT_STD * r["mi_baseline_std"] + 1e-9
            for r in res["per_pair"])
    parts = []
    if modes:
        mode = "topk" if "topk" in modes else "top1"
        mean = modes[mode]["mean"]
        parts.append(f"{mode} affinity above the shuffled baseline (> {SIGNIFICANT_STD:g} std) in "
                     f"{out['significant_pairs'][mode]}/{out['num_pairs']} layer pairs, mean MI excess "
                     f"{_f(mean.get('mi_excess'))} nats")
    halves = tr.get("halves", {})
    if "modes" in halves and "top1" in halves["modes"]:
        m = halves["modes"]["top1"]["mean"]
        parts.append(f"on the held-out half, top-1 successors capture {m['capture_heldout']['1']:.2f} of top-1 "
                     f"transitions vs {m['capture_heldout_marginal']['1']:.2f} without affinity")
    if "placement" in halves:
        moved = halves["placement"]["a_to_b"]["transferred"]["cross_gpu_top1"]
        parts.append(f"a placement solved on one half keeps {_pct(moved)} of its cross-GPU reduction (vs contiguous) "
                     "on the other"
                     if moved is not None else "solving a placement gains nothing over contiguous here")
    out["text"] = "; ".join(parts) + "." if parts else "no layer pairs to analyse."
    return out


def build_report(
    sources: dict[str, tuple[Source, str]], cfg: AnalyzeConfig
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]]]:
    """The full report for {"A": (source, path)} or {"A": ..., "B": ...} (B = --compare).

    Returns (report, conditionals per source name and mode; empty for load-only inputs).
    """
    report: dict[str, Any] = {"format": REPORT_FORMAT, "traces": {}}
    conditionals: dict[str, dict[str, np.ndarray]] = {}
    for name, (source, path) in sources.items():
        if isinstance(source, Trace):
            report["traces"][name], conditionals[name] = analyze_trace(source, path, cfg, name)
        else:
            report["traces"][name], conditionals[name] = analyze_loads(source, path, cfg), {}
    if "B" in sources:
        a, b = sources["A"][0], sources["B"][0]
        if isinstance(a, Trace) and isinstance(b, Trace) and a.num_layers > 1:
            report["transfer"] = _stability(a, b, cfg, "A -> B")
        else:
            report["transfer"] = {"load_corr": load_correlation(source_loads(a), source_loads(b))}
    return report, conditionals


def _stability(a: Trace, b: Trace, cfg: AnalyzeConfig, what: str) -> dict[str, Any]:
    if cfg.num_gpus is not None and not too_few_tokens([a.num_tokens, b.num_tokens], a.num_experts):
        Progress(f"analyze {what}", after=0.0, every=0.0).update(
            0, f"solving placements ({cfg.num_gpus} GPUs, up to {cfg.time_limit:g} s each)")
    return stability(a, b, cfg.num_gpus, cfg.gpus_per_node, cfg.time_limit, cfg.seed)


# ---------------------------------------------------------------------------------------------
# Terminal summary
# ---------------------------------------------------------------------------------------------


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _load_lines(tr: dict[str, Any]) -> list[str]:
    names = tr["info"]["moe_layers"]
    lines = [f"  {'layer':>5}  {'max/mean':>8}  {'CV':>5}  {'Gini':>5}  {'H/logE':>6}  {'unused':>6}  hottest experts (share)"]
    for row in tr["load"]:
        hot = ", ".join(f"{h['expert']} ({_pct(h['share'], 1)})" for h in row["hottest"])
        lines.append(f"  {names[row['layer']]:>5}  {row['max_over_mean']:8.2f}  {row['cv']:5.2f}  {row['gini']:5.2f}"
                     f"  {row['entropy_frac']:6.2f}  {row['unused']:6d}  {hot}")
    return lines


def _affinity_lines(tr: dict[str, Any], mode: str) -> list[str]:
    names = tr["info"]["moe_layers"]
    rows = tr["affinity"]["modes"][mode]["per_pair"]
    ms = list(rows[0]["capture"])
    cap_head = " ".join(f"{'top-' + m:>11}" for m in ms)
    lines = [f"  {'pair':>7}  {'MI':>6}  {'shuffled':>15}  {'excess':>6}  {'ratio':>6}  {'H(j|i)/logE':>11}  {cap_head}"]
    for r in [*rows, {**tr["affinity"]["modes"][mode]["mean"], "pair": None}]:
        pair = "mean" if r["pair"] is None else f"{names[r['pair'][0]]}>{names[r['pair'][1]]}"
        base = f"{_f(r.get('mi_baseline'))}+-{_f(r.get('mi_baseline_std'), '.2g')}"
        caps = " ".join(
            f"{_f(r['capture'][m], '.2f'):>5}({_f(r.get('capture_baseline', {}).get(m), '.2f')})" for m in ms
        )
        lines.append(f"  {pair:>7}  {r['mi']:6.3f}  {base:>15}  {_f(r.get('mi_excess')):>6}  {_f(r.get('mi_ratio'), '.3g'):>6}"
                     f"  {r['cond_entropy_frac']:11.2f}  {caps}")
    return lines


def _stability_lines(st: dict[str, Any], a: str, b: str) -> list[str]:
    if "skipped" in st:
        return [f"  skipped: {st['skipped']}"]
    corr = st["load_corr"]
    lowest = min((c for c in corr["per_layer"] if c is not None), default=None)
    lines = [f"  expert-load correlation {a} vs {b} per layer: mean {_f(corr['mean'])}, lowest {_f(lowest)}"]
    if not st.get("modes"):
        return lines
    ms = list(next(iter(st["modes"].values()))["mean"]["capture_heldout"])
    lines += [f"  top-m capture of {b} by {a}'s successors: held-out / no-affinity (busiest experts) / {b} in-sample",
              f"  {'mode':>5}  {'corr joint':>10}  {'corr excess':>11}  " + "  ".join(f"{'m=' + m:^14}" for m in ms)]
    for mode, res in st["modes"].items():
        mean = res["mean"]
        caps = "  ".join(f"{mean['capture_heldout'][m]:.2f}/{mean['capture_heldout_marginal'][m]:.2f}/"
                         f"{mean['capture_in_sample'][m]:.2f}" for m in ms)
        lines.append(f"  {mode:>5}  {_f(mean.get('corr_joint')):>10}  {_f(mean.get('corr_excess')):>11}  {caps}")
    pl = st.get("placement")
    if pl:
        lines += _transfer_lines(pl, "a_to_b", a, b)
        back = pl["b_to_a"]["transferred"]
        lines.append(f"    reverse, {b} -> {a}: transferred " + ", ".join(
            f"{metric} {_pct(r) if r is not None else 'n/a'}" for metric, r in back.items()))
    return lines


def _transfer_lines(pl: dict[str, Any], direction: str, a: str, b: str) -> list[str]:
    """The replay table with each layout's ratio to contiguous (`0.41x`, as solve and eval print
    it), then per metric the ratios and the reduction (contiguous - placement) that `transferred`
    divides."""
    res = pl[direction]
    ev = res["evaluated"]
    base = ev["contiguous"]
    lines = [f"  placement on {pl['num_gpus']} GPUs ({pl['gpus_per_node']} per node), replayed on {b} "
             "(x: ratio to contiguous, lower is better):",
             f"    {'':22} {'cross_gpu_top1':>16} {'dest_gpus_topk':>16} {'imbalance_max':>13}"]
    for key, label in (("contiguous", "contiguous"), ("greedy_load_from_source", f"greedy_load ({a})"),
                       ("solved_on_source", f"solved on {a}"), ("solved_on_target", f"solved on {b}")):
        m = ev[key]
        cells = [f"{m[metric]:.3f}" + ("" if key == "contiguous" else f" ({_x(m[metric], base[metric])})")
                 for metric in ("cross_gpu_top1", "dest_gpus_topk")]
        lines.append(f"    {label:22} {cells[0]:>16} {cells[1]:>16} {m['imbalance_max']:13.3f}")
    for metric, ratio in res["transferred"].items():
        gain = res["gain"][metric]
        lines.append(f"    {metric} on {b}: solved on {a} {_x(ev['solved_on_source'][metric], base[metric])}, "
                     f"solved on {b} {_x(ev['solved_on_target'][metric], base[metric])} of contiguous; reduction "
                     f"(contiguous - placement) {gain['solved_on_source']:.3f} vs {gain['solved_on_target']:.3f} "
                     "-> transferred "
                     + (_pct(ratio) if ratio is not None else f"n/a (solving on {b} reduces nothing)"))
    return lines


def _x(value: float, base: float) -> str:
    """`value` as a ratio to the contiguous layout's, worded as solve and eval word it."""
    return f"{value / base:.2f}x" if base else "n/a"


def summary(report: dict[str, Any]) -> str:
    """Human-readable summary of a report (the terminal output of `moeplace analyze`)."""
    out: list[str] = []
    for name, tr in report["traces"].items():
        info = tr["info"]
        size = (f"load-only, {info['selections']:.0f} token-expert selections" if info["load_only"]
                else f"{info['tokens']} tokens, top-{info['top_k']}")
        out.append(f"[{name}] {info['path']}: {size}, {len(info['moe_layers'])} MoE layers, {info['num_experts']} experts"
                   + (f", model {info['model']}" if info["model"] else ""))
        out.append("Load skew per layer:")
        out += _load_lines(tr)
        aff = tr["affinity"]
        for mode in aff["modes"]:
            out.append(f"Affinity l -> l+1, {mode} (nats; log E = {aff['log_num_experts']:.3f}; shuffled = mean+-std of "
                       f"{aff['shuffles']} token shuffles; capture: real(shuffled)):")
            out += _affinity_lines(tr, mode)
        halves = tr["halves"]
        split = halves.get("split", {})
        out.append("Stability between two halves" + (f" (split by {split['by']}, {split['tokens'][0]}/{split['tokens'][1]} tokens)" if split else "") + ":")
        out += _stability_lines(halves, "half 1", "half 2")
        out.append(f"Verdict [{name}]: {tr['verdict']['text']}")
        out.append("")
    if "B" in report["traces"]:
        out.append("Side by side (means over layers and layer pairs):")
        out += _side_by_side(report["traces"]["A"], report["traces"]["B"])
    if "transfer" in report:
        out.append("Domain shift A -> B:")
        out += _stability_lines(report["transfer"], "A", "B")
    if report.get("figures"):
        out.append("Figures:")
        out += [f"  {p}" for p in report["figures"]]
    if report.get("json"):
        out.append(f"JSON: {report['json']}")
    return "\n".join(out)


def _side_by_side(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    rows: list[tuple[str, Any, Any]] = [
        ("load max/mean", a["load_mean"]["max_over_mean"], b["load_mean"]["max_over_mean"]),
        ("load Gini", a["load_mean"]["gini"], b["load_mean"]["gini"]),
    ]
    for mode in a["affinity"]["modes"]:
        if mode not in b["affinity"]["modes"]:
            continue
        ma, mb = a["affinity"]["modes"][mode]["mean"], b["affinity"]["modes"][mode]["mean"]
        rows += [(f"{mode} MI", ma["mi"], mb["mi"]), (f"{mode} MI shuffled", ma.get("mi_baseline"), mb.get("mi_baseline")),
                 (f"{mode} MI excess", ma.get("mi_excess"), mb.get("mi_excess")),
                 (f"{mode} top-1 capture", ma["capture"]["1"], mb["capture"]["1"])]
    lines = [f"  {'':22} {'A':>8} {'B':>8}"]
    lines += [f"  {label:22} {_f(x):>8} {_f(y):>8}" for label, x, y in rows]
    return lines
