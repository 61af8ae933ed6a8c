"""Regression gates shared by `moeplace eval --max-...` and `moeplace check`: which metric a
threshold bounds, its verdict on an eval report, and how a verdict is printed."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from moeplace.errors import MoeplaceError

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
VS_CONTIGUOUS = "_vs_contiguous"
# `moeplace check`'s max_NAME_vs_baseline (eval's --max-NAME-vs-baseline): the metric's ratio to another
# placement's (a check's `baseline:`, eval's --baseline) on the same tokens; every metric with a
# _vs_contiguous form, and the predicted MoE time
VS_BASELINE = "_vs_baseline"
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
    if name.endswith(VS_BASELINE):
        return BASELINE_METRICS[name.removesuffix(VS_BASELINE)], True
    return THRESHOLDS[name.removesuffix(VS_CONTIGUOUS)], name.endswith(VS_CONTIGUOUS)


def threshold_results(report: dict[str, Any], limits: dict[str, float],
                      named: Callable[[str], str] = str) -> list[Verdict]:
    """The verdict of each limit on the report's placement.

    `limits` keys: `max_NAME` bounds the metric, `max_NAME_vs_contiguous` its ratio to contiguous,
    `max_moe_time_ratio` the predicted MoE time's ratio (the report needs the cost model's metrics).
    named(key): how an error names a limit (eval: its option, --max-NAME; check: the YAML key).
    """
    out = []
    for key, limit in limits.items():
        metric, ratio = gate_metric(key)
        if metric not in report["layouts"]["placement"]:
            if "loads" in report:
                raise MoeplaceError(f"{named(key)}: {report['trace']} is a load-only file (no token paths): only "
                                    "the imbalance thresholds apply to it")
            raise MoeplaceError(f"{named(key)}: the report has no {metric} (the predicted MoE time needs a cluster "
                                "config)")
        if key.endswith(VS_BASELINE):
            out.append(baseline_verdict(report, key, float(limit), named(key)))
            continue
        if ratio:
            ratios = report["vs_contiguous"].get("placement", {})
            if metric not in ratios:  # contiguous's value is 0: no ratio
                out.append(zero_contiguous_verdict(report, key, float(limit), named(key)))
                continue
            what, value = f"{metric}/contiguous", ratios[metric]
        else:
            what, value = metric, report["layouts"]["placement"][metric]
        out.append(Verdict(what, float(value), float(limit), value <= limit, key))
    return out


NODE_METRICS = ("cross_node_top1", "dest_nodes_topk")
ONE_NODE = "n/a (one node)"


def zero_contiguous_verdict(report: dict[str, Any], key: str, limit: float, name: str = "") -> Verdict:
    """A max_NAME_vs_contiguous verdict where contiguous's value is 0, so there is no ratio: on one
    node nothing crosses nodes, on one GPU nothing crosses GPUs, nor with one MoE layer or tokens
    that keep their experts' GPU. It holds when the placement's value is 0 too (nothing to regress:
    a shared YAML's gate then holds, shown as n/a, rather than failing the run) and fails otherwise
    (anything is worse than nothing), as against a zero baseline. No contiguous layout at all (more
    GPUs than experts) is an error, naming the limit `name` (default: `key`)."""
    metric = gate_metric(key)[0]
    theirs = report["layouts"].get("contiguous", {}).get(metric)
    if not isinstance(theirs, float) or theirs != 0:
        raise MoeplaceError(f"{name or key}: no contiguous {metric} to compare with on this trace")
    value, what = float(report["layouts"]["placement"][metric]), f"{metric}/contiguous"
    if value == 0:
        one_node = metric in NODE_METRICS and report.get("num_nodes", 1) == 1
        return Verdict(what, None, limit, True, key, note=ONE_NODE if one_node else "n/a (0 here and in contiguous)")
    return Verdict(what, None, limit, False, key, note=f"n/a: {value:.4g} where contiguous has 0, worse at any ratio")


def baseline_verdict(report: dict[str, Any], key: str, limit: float, name: str = "") -> Verdict:
    """A max_NAME_vs_baseline verdict: the placement's value over the baseline's (report["baseline"],
    on the same tokens). A zero baseline has no ratio: it holds when the placement's is 0 too, and
    fails otherwise (anything is worse than nothing). Errors name the limit `name` (default: `key`)."""
    metric, name = gate_metric(key)[0], name or key
    base = report.get("baseline")
    if base is None:
        raise MoeplaceError(f"{name}: no baseline to compare with (the check's 'baseline:', eval's --baseline)")
    if metric not in base["metrics"]:
        why = f"; {base['note']}" if base["note"] else ""
        raise MoeplaceError(f"{name}: the baseline {base['placement']} has no {metric}{why}")
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


def describe(verdicts: list[Verdict]) -> str:
    """A check's verdicts in one line; when some fail, those first and the rest after "within:",
    so the line says which thresholds broke without reading every sign."""
    def one(v: Verdict) -> str:
        value, limit = shown(v)
        if v.value is None:
            return f"{v.what} {v.note or ONE_NODE}"
        return f"{v.what} {value} {'<=' if v.passed else '>'} {limit}"

    over = [one(v) for v in verdicts if not v.passed]
    within = [one(v) for v in verdicts if v.passed]
    if not over:
        return ", ".join(within)
    return ", ".join(over) + (f"; within: {', '.join(within)}" if within else "")


def gate_line(v: Verdict, tokens: str) -> str:
    """`moeplace eval`'s line for one gate: `moeplace eval: FAIL: cross-GPU top-1 0.7100 > 0.6 (--max-cross-gpu; ...)`."""
    metric, ratio = gate_metric(v.key)
    what = LABELS[metric] + ((" / baseline" if v.key.endswith(VS_BASELINE) else " / contiguous") if ratio else "")
    value, limit = shown(v)
    verdict = (v.note or ONE_NODE) if v.value is None else f"{value} {'<=' if v.passed else '>'} {limit}"
    return f"moeplace eval: {'PASS' if v.passed else 'FAIL'}: {what} {verdict} (--{v.key.replace('_', '-')}; {tokens})"


def scored(report: dict[str, Any]) -> str:
    """What the gates judged: '320 held-out tokens', or 'expert loads' for a load-only file."""
    t = report.get("tokens")
    return "expert loads" if t is None else f"{t['evaluated']} {t['subset']} tokens"


def gates(results: list[Verdict], limits: dict[str, float]) -> dict[str, Any]:
    """The report's record of the regression gate: thresholds given, each verdict, overall."""
    return {"thresholds": limits, "passed": all(v.passed for v in results),
            "results": [{"threshold": v.key, "metric": v.what, "value": v.value, "limit": v.limit,
                         **({"baseline_value": v.baseline} if v.key.endswith(VS_BASELINE) else {}),
                         **({"note": v.note} if v.note else {}), "passed": v.passed} for v in results]}



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
