"""Assemble an analysis into one JSON-ready report, and render its terminal summary.

Report schema ("moeplace.analyze/v1"):

    traces     {"A": trace_report, "B": trace_report (with --compare)}
    transfer   A -> B stability (with --compare): correlation, held-out capture, placement gain
               (printed as ratios to contiguous, `0.41x` as solve and eval print them, and the
               reduction contiguous - placement that `transferred` divides)
    learning_curve  (with --learning-curve) held-out and in-sample ratios to contiguous of
               placements solved on nested training sets of TRACE, and the trace-length verdict
               (analyze/curve.py)
    figures    paths of the PNGs written
    transition_pairs  the layer pairs transitions.png draws ([] when it is not drawn)

    trace_report = {info, load: [per layer], load_mean, affinity: {modes: {mode: {per_pair,
                    mean}}, log_num_experts, shuffles, seed}, halves: stability of two halves,
                    verdict: {significant_pairs per mode, text (affinity), load: load_verdict}}
    transfer.verdict = domain_verdict (with --compare)

Layer numbering, one rule everywhere in analyze (JSON, summary, figures, --layers): MoE layers
are numbered 0..L-1 in the trace's order, as solve and eval number them, and pair l is MoE layer
l -> l+1. Where the model's decoder layer numbers (`info.moe_layers`, from the trace's meta)
differ, the summary and the figures print them beside the MoE numbers, e.g. "0>1 (decoder 2>3)".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence, Union

import numpy as np

from moeplace.analyze.affinity import affinity, load_skew, mean_stats, trace_modes
from moeplace.analyze.stability import load_correlation, split_halves, stability, too_few_tokens
from moeplace.options import plural
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


def decoder_differs(decoder: Sequence[int]) -> bool:
    """Whether some MoE layer's decoder number is not its MoE number (a dense layer before it)."""
    return list(decoder) != list(range(len(decoder)))


def layer_label(decoder: Sequence[int], layer: int) -> str:
    """MoE layer `layer` as printed: its MoE number, with its decoder number where they differ."""
    return f"{layer} (decoder {decoder[layer]})" if decoder_differs(decoder) else str(layer)


def pair_label(decoder: Sequence[int], pair: int) -> str:
    """Layer pair `pair` (MoE layer pair -> pair+1) as printed: "0>1", or "0>1 (decoder 2>3)"."""
    label = f"{pair}>{pair + 1}"
    return f"{label} (decoder {decoder[pair]}>{decoder[pair + 1]})" if decoder_differs(decoder) else label


def number_ranges(numbers: Sequence[int]) -> str:
    """[0, 2, 3, 4] -> "0, 2-4"."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def numbering_line(decoder: Sequence[int]) -> str | None:
    """The summary's line that maps MoE to decoder numbers, where they differ (else None)."""
    if not decoder_differs(decoder):
        return None
    return (f"Layer numbers: MoE layers {number_ranges(range(len(decoder)))} are the model's decoder layers "
            f"{number_ranges(decoder)}; tables, figures and --layers count MoE layers from 0 (as solve and eval do), "
            "decoder numbers beside them")


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
    curve_splits: int | None = None  # --learning-curve's splits; None: no curve


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
    report: dict[str, Any] = {
        "info": trace_info(loads, path),
        "load": load,
        "load_mean": mean_stats(load),
        "affinity": {"modes": {}},
        "halves": {"skipped": "load-only input: no per-token paths"},
        "verdict": {"text": "load-only input: load skew only; affinity and its stability need a per-token "
                            "trace (moeplace trace, or moeplace import of per-token dumps)."},
    }
    report["verdict"]["load"] = load_verdict(report)
    return report


# The verdicts' thresholds, all here; reasoned, not fitted to a trace.
SIGNIFICANT_STD = 3.0  # an MI excess beyond this many shuffle stds is counted as affinity
# Load skew is "high" from the worst layer's hottest expert at 2x the mean expert load: each
# expert that hot carries an extra mean expert's tokens, and the traffic objective (E/G experts per
# GPU whatever their load) groups experts chosen together, hot ones most, so a few of them on one
# GPU make it the bottleneck (docs/solver.md: 1.7x contiguous's worst-layer GPU max/mean on two
# skewed traces). Below 2x no expert adds as much as a mean expert's load to its GPU.
LOAD_SKEW_HIGH = 2.0
# Share of the cross-GPU reduction (vs contiguous) a placement fitted on one trace keeps on the
# other: from 80% one placement serves both (no more is lost than between two halves of one
# small trace, e.g. FLAME's halves keep 76-87%); under 50% most of the gain is the domain's own.
TRANSFER_KEEPS = 0.8
TRANSFER_LOSES = 0.5


# --gpus 1: every layout is the same, so the placement test's "no gain" is no verdict on the trace
ONE_GPU = ("on --gpus 1 every expert shares the one GPU, so there is no cross-GPU traffic for a placement to reduce "
           "(give --gpus of the deployment to measure the placement gain)")


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
    if "placement" in halves and halves["placement"].get("num_gpus") == 1:  # not the trace's fault: say so
        parts.append(ONE_GPU)
    elif "placement" in halves:
        moved = halves["placement"]["a_to_b"]["transferred"]["cross_gpu_top1"]
        parts.append(f"a placement solved on one half keeps {_pct(moved)} of its cross-GPU reduction (vs contiguous) "
                     "on the other"
                     if moved is not None else "solving a placement gains nothing over contiguous here")
    out["text"] = "; ".join(parts) + "." if parts else "no layer pairs to analyse."
    out["load"] = load_verdict(tr)
    return out


def load_sampling_noise(selections_per_expert: float, num_counts: int) -> float:
    """The max/mean expert load that sampling alone reaches on even routing, over `num_counts`
    counts (L x E: the verdict takes the worst layer). A count of mean n exceeds n + t with
    probability at most exp(-t^2 / (2 (n + t/3))) (Bernstein; a count of independent tokens has
    variance <= n); t where num_counts times that is 1 gives 1 + t/n, about the 95th percentile
    of the worst layer's max/mean in simulations of even routing (5 to 1000 selections per expert)."""
    if selections_per_expert <= 0:
        return float("inf")
    a = 2.0 * np.log(max(num_counts, 2))
    t = a / 6.0 + np.sqrt(a * a / 36.0 + a * selections_per_expert)
    return 1.0 + float(t / selections_per_expert)


def load_verdict(tr: dict[str, Any]) -> dict[str, Any]:
    """Is the load skewed enough to constrain a placement? The worst layer's max/mean expert load
    against LOAD_SKEW_HIGH, and against what sampling alone gives at this size: skew within that
    is no evidence either way when chance alone can reach LOAD_SKEW_HIGH."""
    info = tr["info"]
    num_experts, decoder = info["num_experts"], info["moe_layers"]
    per_layer = info["selections"] / len(decoder) if info["load_only"] else info["tokens"] * info["top_k"]
    per_expert = per_layer / num_experts
    noise = load_sampling_noise(per_expert, len(decoder) * num_experts)
    worst = max(tr["load"], key=lambda r: r["max_over_mean"])
    skew = worst["max_over_mean"]
    where = f"worst layer's max/mean expert load {skew:.2f} (MoE layer {layer_label(decoder, worst['layer'])})"
    chance = f"even routing reaches about {noise:.2f} by chance with {per_expert:.3g} selections per expert"
    if skew >= max(LOAD_SKEW_HIGH, noise):
        status = "high"
        fix = ("a placement must absorb it: solve on these loads (objective balance) spreads it, and "
               "--redundant-experts adds copies of the hottest experts" if info["load_only"] else
               "the traffic objective alone keeps E/G experts per GPU whatever their load and may pile hot experts "
               "on one GPU; cap it with solve --max-imbalance, or weigh load with --objective latency (with "
               "--redundant-experts for copies of hot experts)")
        text = f"load skewed, {where} >= {LOAD_SKEW_HIGH:g} ({chance}): {fix}"
    elif noise >= LOAD_SKEW_HIGH:
        status = "too_few"
        text = f"too few selections to judge load skew: {where}, and {chance}"
    else:
        status = "low"
        text = (f"load skew low, {where} < {LOAD_SKEW_HIGH:g} ({chance}): a traffic placement is unlikely to pile "
                "load on a GPU")
    pl = tr.get("halves", {}).get("placement")
    if pl:  # what the traffic placement actually did to the GPU load on held-out tokens
        ev = pl["a_to_b"]["evaluated"]
        text += (f"; a placement solved on half 1 has worst-layer GPU max/mean {ev['solved_on_source']['imbalance_max']:.2f} "
                 f"on half 2, contiguous {ev['contiguous']['imbalance_max']:.2f}")
    return {"status": status, "text": text + ".", "worst_layer": worst["layer"], "max_over_mean": skew,
            "sampling_noise": noise, "high": LOAD_SKEW_HIGH}


def _halves_kept(tr: dict[str, Any]) -> float | None:
    """Share of the cross-GPU reduction a placement solved on one half of a trace keeps on the
    other (None where not measured): what sampling alone loses, with no domain shift."""
    return tr.get("halves", {}).get("placement", {}).get("a_to_b", {}).get("transferred", {}).get("cross_gpu_top1")


def domain_verdict(transfer: dict[str, Any], traces: dict[str, Any], no_paths: str | None = None) -> dict[str, Any]:
    """With --compare: does a placement fitted on one trace keep its cross-GPU gain on the other,
    i.e. is one placement enough or should each domain get its own? The worse direction of the
    two decides (TRANSFER_KEEPS, TRANSFER_LOSES); a loss no larger than between two halves of one
    trace (A's or B's, where only sampling differs) is not counted as domain shift.
    `no_paths`: why there was no per-token comparison (a load-only input, one MoE layer)."""
    out: dict[str, Any] = {"status": "not_measured", "keeps": TRANSFER_KEEPS, "loses": TRANSFER_LOSES, "kept": None}
    pl = transfer.get("placement")
    if "skipped" in transfer:
        out["text"] = f"not measured: {transfer['skipped']}."
    elif "modes" not in transfer:
        out["text"] = (f"expert-load correlation only (mean {_f(transfer['load_corr']['mean'])}; {no_paths}): whether "
                       "a traffic placement transfers needs per-token traces of both with two or more MoE layers.")
    elif pl is None:
        out["text"] = ("placement transfer not measured (--no-solve): run without it to see how much of a placement "
                       "fitted on A keeps on B.")
    else:
        a_to_b, b_to_a = (pl[d]["transferred"]["cross_gpu_top1"] for d in ("a_to_b", "b_to_a"))
        known = [v for v in (a_to_b, b_to_a) if v is not None]
        if pl.get("num_gpus") == 1 or not known:
            out["text"] = (f"not measured: {ONE_GPU}." if pl.get("num_gpus") == 1 else
                           "solving on either trace gains nothing over contiguous: no placement gain to keep or lose.")
            return out
        out["kept"] = kept = min(known)
        halves = [v for v in (_halves_kept(traces["A"]), _halves_kept(traces["B"])) if v is not None]
        out["halves_kept"] = own = min(halves, default=None)
        said = (f"a placement fitted on A keeps {_pct(a_to_b) if a_to_b is not None else 'n/a'} of its cross-GPU "
                f"reduction (vs contiguous) on B, one fitted on B {_pct(b_to_a) if b_to_a is not None else 'n/a'} on A")
        ref = f" (between halves of one trace, where only sampling differs: {_pct(own)})" if own is not None else ""
        if kept >= TRANSFER_KEEPS:
            out["status"] = "keeps"
            advice = f"both >= {_pct(TRANSFER_KEEPS)}: one placement serves both domains; re-solving per domain gains little"
        elif own is not None and kept >= own:
            out["status"] = "sampling"
            advice = ("no more lost than between halves of one trace, so sampling noise alone can explain the loss: "
                      "no evidence of domain shift; longer traces of each domain would tell whether re-solving pays")
        elif kept < TRANSFER_LOSES:
            out["status"] = "loses"
            advice = (f"under {_pct(TRANSFER_LOSES)}: most of the gain is domain-specific; solve per domain (or on a "
                      "trace of the traffic mix you serve)")
        else:
            out["status"] = "partial"
            advice = (f"between {_pct(TRANSFER_LOSES)} and {_pct(TRANSFER_KEEPS)}: part of the gain is domain-specific; "
                      "solve per domain if the weaker direction's traffic matters")
        out["text"] = f"{said}{ref}; {advice}."
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
        no_paths = None
        if isinstance(a, Trace) and isinstance(b, Trace) and a.num_layers > 1:
            report["transfer"] = _stability(a, b, cfg, "A -> B")
        else:
            report["transfer"] = {"load_corr": load_correlation(source_loads(a), source_loads(b))}
            no_paths = ("one MoE layer: no layer pairs" if isinstance(a, Trace) and isinstance(b, Trace)
                        else "a load-only input has no per-token paths")
        report["transfer"]["verdict"] = domain_verdict(report["transfer"], report["traces"], no_paths)
    first = sources["A"][0]
    if cfg.curve_splits is not None and cfg.num_gpus is not None and isinstance(first, Trace):
        report["learning_curve"] = {"trace": "A", **_curve(first, cfg)}
    return report, conditionals


def _curve(trace: Trace, cfg: AnalyzeConfig) -> dict[str, Any]:
    """The learning curve of TRACE, a progress line per solve on stderr."""
    from moeplace.analyze.curve import learning_curve, plan

    assert cfg.curve_splits is not None and cfg.num_gpus is not None
    sizes = plan(trace, cfg.curve_splits, cfg.seed)[1]  # cheap: index arrays only
    progress = Progress("analyze A: learning curve", total=cfg.curve_splits * len(sizes), after=0.0, every=0.0)
    gpus = plural(cfg.num_gpus, "GPU")
    note = lambda done, split, n: progress.update(done, f"split {split + 1}/{cfg.curve_splits}: solving on {n} "  # noqa: E731
                                                  f"training tokens ({gpus}, up to {cfg.time_limit:g} s)")
    result = learning_curve(trace, cfg.num_gpus, cfg.gpus_per_node, cfg.time_limit, cfg.seed, cfg.curve_splits, note)
    progress.close(f"{result.report['solves']} solves")
    return result.report


def _stability(a: Trace, b: Trace, cfg: AnalyzeConfig, what: str) -> dict[str, Any]:
    if cfg.num_gpus is not None and not too_few_tokens([a.num_tokens, b.num_tokens], a.num_experts):
        Progress(f"analyze {what}", after=0.0, every=0.0).update(
            0, f"solving placements ({plural(cfg.num_gpus, 'GPU')}, up to {cfg.time_limit:g} s each)")
    return stability(a, b, cfg.num_gpus, cfg.gpus_per_node, cfg.time_limit, cfg.seed)


# ---------------------------------------------------------------------------------------------
# Terminal summary
# ---------------------------------------------------------------------------------------------


def _f(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{100 * x:.{digits}f}%"


def _decoder_column(decoder: Sequence[int]) -> Callable[[str], str]:
    """A table's decoder-number cell: present only where those numbers are not the MoE ones."""
    both = decoder_differs(decoder)
    return lambda text: f"  {text:>7}" if both else ""


def _load_lines(tr: dict[str, Any]) -> list[str]:
    names = tr["info"]["moe_layers"]
    dec = _decoder_column(names)
    lines = [f"  {'MoE':>5}{dec('decoder')}  {'max/mean':>8}  {'CV':>5}  {'Gini':>5}  {'H/logE':>6}  {'unused':>6}  "
             "hottest experts (share)"]
    for row in tr["load"]:
        hot = ", ".join(f"{h['expert']} ({_pct(h['share'], 1)})" for h in row["hottest"])
        lines.append(f"  {row['layer']:>5}{dec(str(names[row['layer']]))}  {row['max_over_mean']:8.2f}  {row['cv']:5.2f}"
                     f"  {row['gini']:5.2f}  {row['entropy_frac']:6.2f}  {row['unused']:6d}  {hot}")
    return lines


def _affinity_lines(tr: dict[str, Any], mode: str) -> list[str]:
    names = tr["info"]["moe_layers"]
    dec = _decoder_column(names)
    rows = tr["affinity"]["modes"][mode]["per_pair"]
    ms = list(rows[0]["capture"])
    cap_head = " ".join(f"{'top-' + m:>11}" for m in ms)
    lines = [f"  {'pair':>7}{dec('decoder')}  {'MI':>6}  {'shuffled':>15}  {'excess':>6}  {'ratio':>6}  {'H(j|i)/logE':>11}  "
             f"{cap_head}"]
    for r in [*rows, {**tr["affinity"]["modes"][mode]["mean"], "pair": None}]:
        pair, decoder = ("mean", "") if r["pair"] is None else (
            f"{r['pair'][0]}>{r['pair'][1]}", f"{names[r['pair'][0]]}>{names[r['pair'][1]]}")
        base = f"{_f(r.get('mi_baseline'))}+-{_f(r.get('mi_baseline_std'), '.2g')}"
        caps = " ".join(
            f"{_f(r['capture'][m], '.2f'):>5}({_f(r.get('capture_baseline', {}).get(m), '.2f')})" for m in ms
        )
        lines.append(f"  {pair:>7}{dec(decoder)}  {r['mi']:6.3f}  {base:>15}  {_f(r.get('mi_excess')):>6}"
                     f"  {_f(r.get('mi_ratio'), '.3g'):>6}  {r['cond_entropy_frac']:11.2f}  {caps}")
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
    lines = [f"  placement on {plural(pl['num_gpus'], 'GPU')} ({pl['gpus_per_node']} per node), replayed on {b} "
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
        if line := numbering_line(info["moe_layers"]):
            out.append(line)
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
        out.append(f"Verdict [{name}], load: {tr['verdict']['load']['text']}")
        out.append(f"Verdict [{name}], affinity: {tr['verdict']['text']}")
        out.append("")
    if "learning_curve" in report:
        out += _curve_lines(report["learning_curve"])
        out.append("")
    if "B" in report["traces"]:
        out.append("Side by side (means over layers and layer pairs):")
        out += _side_by_side(report["traces"]["A"], report["traces"]["B"])
    if "transfer" in report:
        out.append("Domain shift A -> B:")
        out += _stability_lines(report["transfer"], "A", "B")
        out.append(f"Verdict [A vs B], domain shift: {report['transfer']['verdict']['text']}")
    if report.get("figures"):
        out.append("Figures:")
        out += [f"  {p}" + (_drawn_pairs(report) if p.endswith("transitions.png") else "") for p in report["figures"]]
    if report.get("json"):
        out.append(f"JSON: {report['json']}")
    return "\n".join(out)


def _curve_lines(lc: dict[str, Any]) -> list[str]:
    """The learning curve's table (mean +- standard error over splits) and its verdict line."""
    tests = sorted(set(lc["test_tokens"]))
    test = str(tests[0]) if len(tests) == 1 else f"{tests[0]}-{tests[-1]}"
    lines = [f"Learning curve [A] on {plural(lc['num_gpus'], 'GPU')} ({lc['gpus_per_node']} per node): placements "
             f"solved on nested training sets, scored on {test} held-out tokens per split (split by {lc['split_by']}, "
             f"{lc['splits']} splits, mean +- standard error; ratio to contiguous, lower is better):",
             f"  {'training tokens':>15}  {'held-out top-1':>14}  {'held-out top-k':>14}  {'in-sample top-1':>15}  "
             f"{'in-sample top-k':>15}"]
    for p in lc["points"]:
        held = [f"{_f(p['held_out'][m]['mean'])} +- {_f(p['held_out'][m]['se'])}" for m in ("cross_gpu_top1", "dest_gpus_topk")]
        own = [_f(p["in_sample"][m]["mean"]) for m in ("cross_gpu_top1", "dest_gpus_topk")]
        lines.append(f"  {p['tokens']:>15}  {held[0]:>14}  {held[1]:>14}  {own[0]:>15}  {own[1]:>15}")
    for skip in lc["skipped_sizes"]:
        lines.append(f"  skipped {skip['tokens']} training tokens: {skip['reason']}")
    if lc["stopped_by_time_limit"]:
        lines.append(f"  {lc['stopped_by_time_limit']} of {lc['solves']} solves stopped at --time-limit "
                     f"{lc['time_limit']:g} s (their placements may differ between runs)")
    lines.append(f"Verdict [A], trace length: {lc['verdict']['text']}")
    return lines


def _drawn_pairs(report: dict[str, Any]) -> str:
    """Which layer pairs transitions.png shows, as the tables number them: "  (pairs 0>1, 2>3;
    decoder 2>3, 4>5)"."""
    decoder, pairs = report["traces"]["A"]["info"]["moe_layers"], report.get("transition_pairs", [])
    if not pairs:
        return ""
    dec = "; decoder " + ", ".join(f"{decoder[p]}>{decoder[p + 1]}" for p in pairs) if decoder_differs(decoder) else ""
    return f"  (pairs {', '.join(f'{p}>{p + 1}' for p in pairs)}{dec})"


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
