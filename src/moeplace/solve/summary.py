"""`moeplace solve`'s printed summary: the placement against every baseline on train and held-out
tokens, in eval's columns and formats, its predicted MoE time, and the notes that name a next step."""

from __future__ import annotations

import math
from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING, Any

from moeplace.options import plural
from moeplace.placement import Placement

if TYPE_CHECKING:
    from moeplace.eval.report import Column

# metrics of the summary table; their titles and formats are eval's (eval/report.py COLUMNS), so
# the same figure of the same placement reads the same in `solve` and in `eval`
METRICS = ("cross_gpu_top1", "cross_node_top1", "dest_gpus_topk", "imbalance_max")


def summary(placement: Placement, trace_name: str, trace_path: str | None = None, output: str | None = None,
            median_sequence: float | None = None) -> str:
    """Human summary: the placement vs every baseline, on train and held-out tokens.
    trace_path, output: as given on the command line, for the command the load note suggests;
    median_sequence: the trace's median tokens per sequence (None: no sequence ids), for the note
    that a token split of long sequences flatters the held-out figure."""
    s, o = placement.solver, placement.objective
    lines = [f"moeplace solve: {trace_name} -> {plural(placement.num_gpus, 'GPU')} "
             f"({placement.num_nodes} node{'s' if placement.num_nodes > 1 else ''} x {placement.gpus_per_node})"]
    by_sequence = placement.split is not None and placement.split.get("by") == "sequence"
    if placement.split:
        what = "whole sequences" if by_sequence else "the tokens"
        lines.append(f"fitted on a {placement.split['train_fraction']:g} split of {what} (seed {placement.split['seed']})")
    gap = "unknown" if placement.gap is None else f"{placement.gap:.1%}"
    # a time as the tables below print it (48.5 us, not 48.4655); a weighted count to 6 digits
    fmt = ".1f" if str(o.get("name", "")).startswith("latency") else ".6g"
    bound = "none" if placement.bound is None else f"{placement.bound:{fmt}}"
    lines.append(f"objective {o.get('name')}: {o.get('value', float('nan')):{fmt}}{_unit(o)}, lower bound {bound}, gap {gap} "
                 f"({s.get('method')}, {s.get('seconds', 0):.1f} s"
                 f"{', stopped by --time-limit' if s.get('stopped_by_time_limit') else _share_cut(s)})")
    if o.get("name") == "traffic" and placement.gap is not None and placement.gap > 0.25:
        # the bound takes each expert's heaviest edges on its own, loose when E/G is large
        lines.append("  (a large gap here means \"not proven\", not \"that far from the best\": the bound lets each "
                     "expert keep its heaviest edges on its own; docs/solver.md, step 5)")
    if o.get("name") == "latency" and placement.gap is not None and placement.gap > 0.25:
        # a large gap here is mostly the bound: it takes each layer's least traffic on its own
        # (one layout must serve every layer), so it says little of how far the placement is from the best one
        lines.append("  (the latency bound is loose: it counts only the traffic no placement can avoid; "
                     "docs/cost-model.md, \"Bounds\")")
    lines.extend(cap_line(placement))
    lines.extend(migration_lines(placement))
    columns = summary_columns(placement.num_nodes)
    titles = {part: (f"held-out sequences ({results['placement']['tokens']} tokens):"
                     if by_sequence and part == "held_out" else
                     f"{part.replace('_', '-')} tokens ({results['placement']['tokens']}):")
              for part, results in placement.metrics.items()}
    width = max([26, *(len(t) + 1 for t in titles.values())])  # one label column for every table
    for part, results in placement.metrics.items():
        base = results.get("contiguous", {})
        lines.append("")
        lines.append(titles[part].ljust(width)
                     + "".join(c.label.rjust(20) for c in columns))
        for name, m in results.items():  # rows and ratios as `moeplace eval` prints them
            cells = []
            for c in columns:
                key = c.key
                ratio = f" ({m[key] / base[key]:.2f}x)" if base.get(key) else ""
                cells.append(f"{format(m[key], c.fmt)}{ratio}".rjust(20))
            lines.append(f"  {name}".ljust(width) + "".join(cells))
    if placement.metrics:
        lines.append("  (x: ratio to contiguous, the default layout of Megatron, DeepSpeed, vLLM and SGLang; lower is better)")
    lines.extend(_shared_sequences_note(placement, median_sequence))
    lines.extend(_time_table(placement))
    lines.extend(_load_note(placement, trace_path or trace_name, output))
    return "\n".join(lines)


def _shared_sequences_note(placement: Placement, median_sequence: float | None) -> list[str]:
    """A note under the tables when the held-out tokens were drawn token by token from sequences
    of SHARED_SEQUENCE or more tokens (median): neighbouring tokens of one text route alike, so
    the held-out figure is partly in-sample (FLAME, 10-token sequences: docs/eval.md)."""
    from moeplace.trace.format import SHARED_SEQUENCE

    split = placement.split
    if (not split or split.get("by", "token") != "token" or "held_out" not in placement.metrics
            or median_sequence is None or median_sequence < SHARED_SEQUENCE):
        return []
    return [f"  note: the held-out tokens share sequences with the fit ones (median {median_sequence:g} tokens per "
            "sequence); --split-by sequence gives the figure on unseen text"]


def summary_columns(num_nodes: int) -> list[Column]:
    """eval's Column of each summary metric (eval/report.py: key, label, fmt), in METRICS' order;
    the node metric only across nodes (0 on one)."""
    from moeplace.eval.report import COLUMNS

    by_key = {c.key: c for c in COLUMNS}
    return [by_key[key] for key in METRICS if num_nodes > 1 or not by_key[key].multi_node]


def eval_format(value: float, key: str) -> str:
    """A metric as `moeplace eval` prints it: the format of its eval column (eval/report.py
    COLUMNS, or the cost model's COST_COLUMNS for the predicted times)."""
    from moeplace.eval.report import COLUMNS
    from moeplace.solve.costmodel import COST_COLUMNS

    return format(value, next(c.fmt for c in [*COLUMNS, *COST_COLUMNS] if c.key == key))


def _share_cut(solver: dict[str, Any]) -> str:
    """Steps cut by their own share of --time-limit while the solve as a whole was not (a
    latency start's candidate ILPs): said, since a longer limit or a faster machine may differ."""
    steps = solver.get("cut_steps") or []
    return f", {', '.join(steps)} cut by {'its' if len(steps) == 1 else 'their'} share of --time-limit" if steps else ""


def _unit(objective: dict[str, Any]) -> str:
    """What an objective's value counts (predicted time, weighted moves); balance's is a load
    ratio, which its own line says."""
    if objective.get("name") == "traffic" and "move_cost" in objective:
        return " (traffic of the fit tokens + --move-cost per moved expert, docs/solver.md, Re-placement)"
    if objective.get("name") == "traffic":
        return " (gate-weighted cross-GPU/cross-node moves of the fit tokens, docs/solver.md)"
    if objective.get("name") == "latency":
        return " us (predicted MoE time, summed over layers)"
    if objective.get("name") == "latency-weighted":
        return f" us (predicted MoE time summed over layers, compute term x{objective.get('compute_weight', 1):g})"
    return ""


def _time_table(placement: Placement) -> list[str]:
    """Predicted MoE time of the placement and each baseline (metrics[part][name]["moe_time_us"],
    written by a latency solve) per token part, as ratios to contiguous; with the traffic start
    of the latency search (solver.start_times_us)."""
    parts = {part: r for part, r in placement.metrics.items() if "moe_time_us" in r.get("placement", {})}
    if not parts:
        return []
    cost_model = placement.objective.get("cost_model", {})
    cluster = cost_model.get("cluster", {}).get("name", "the --cluster config")
    batch = cost_model.get("model", {}).get("batch_tokens")
    step = f"step of {batch} tokens (batch_tokens)" if batch else "step of the tokens scored"
    names = list(next(iter(parts.values())))
    traffic = placement.solver.get("start_times_us", {}).get("traffic")
    rows = {name: {part: r[name]["moe_time_us"] for part, r in parts.items() if name in r} for name in names}
    if traffic is not None and placement.objective.get("name") == "latency":
        rows["traffic"] = traffic
    lines = ["", f"predicted MoE time (us per {step}, summed over {placement.num_layers} layers; {cluster}):",
             "".ljust(26) + "".join(f"{part.replace('_', '-')} tokens".rjust(20) for part in parts)]
    for name, times in rows.items():
        cells = []
        for part, r in parts.items():
            t, base = times.get(part), r.get("contiguous", {}).get("moe_time_us")
            ratio = f" ({t / base:.2f}x)" if t is not None and base else ""
            cells.append(("-" if t is None else f"{eval_format(t, 'moe_time_us')}{ratio}").rjust(20))
        lines.append(f"  {name}".ljust(26) + "".join(cells))
    if "traffic" in rows:
        # where G does not divide E, copies fill the slots: the start was traffic's over E + R experts
        what = ("traffic's placement of E + R experts, R of them never selected (their slots went to the copies)"
                if placement.num_experts % placement.num_gpus else
                "`--objective traffic` with the same seed and split unless a time limit cut either")
        lines.append(f"  (traffic: the traffic placement the latency search started from, {what}; "
                     "like the baselines, it holds no replicas)")
    return lines


LOAD_NOTE_RATIO = 1.25  # worst-layer max/mean load this far above contiguous's is worth a line
# shipped model configs (repository configs/model/) by a name in the trace's model
SHIPPED_MODELS = {"tiny-moe": "configs/model/tiny-moe.yaml", "flame-moe-290m": "configs/model/flame-moe-290m.yaml",
                  "mixtral-8x7b": "configs/model/mixtral-8x7b.yaml", "deepseek-v3": "configs/model/deepseek-v3.yaml"}


def _load_note(placement: Placement, trace_path: str, output: str | None = None) -> list[str]:
    """Lines when `traffic` bought its traffic with token load: it keeps E/G experts per GPU,
    not tokens, so at many GPUs co-selected experts can pile tokens on one GPU (1.7x contiguous's
    max/mean at 64 GPUs on a planted trace; 3.0 against 1.78 on the tour's 4-GPU tiny model).
    Worst of the train and held-out parts; the next step is the latency solve's command line."""
    if placement.objective.get("name") != "traffic" or placement.objective.get("max_imbalance") is not None:
        return []  # capped: the user chose the load (cap_line says where the cap was not reached)
    worst: tuple[str, float, float] | None = None
    for part, r in placement.metrics.items():
        mine, base = (r.get(k, {}).get("imbalance_max") for k in ("placement", "contiguous"))
        if mine and base and mine > LOAD_NOTE_RATIO * base and (worst is None or mine / base > worst[1] / worst[2]):
            worst = (part, mine, base)
    if worst is None:
        return []
    part, mine, base = worst
    return ["", f"note: the worst layer's max/mean token load per GPU is {mine:.2f} against contiguous's {base:.2f} "
                f"({part.replace('_', '-')} tokens): --objective traffic keeps equal expert counts, not token load; "
                f"--max-imbalance {math.ceil(base * 100) / 100:.2f} (contiguous's) caps it, and "
                "--objective latency weighs both by predicted time (docs/cost-model.md):",
            *("  " + line for line in latency_command(placement, trace_path, output))]


def migration_lines(placement: Placement) -> list[str]:
    """--from: how many primaries moved from the deployed placement; with --move-cost, what W is
    on this trace and the unpenalised solve's traffic and moves beside the result's; with
    --max-moves, the moves per layer against the limit and those of the solve without it."""
    m = placement.extra.get("migration")
    if not m:
        return []
    lines = [f"moved {m['moved']} of {m['of']} experts ({m['moved'] / max(m['of'], 1):.1%}) from {m['from']['path']}"]
    mc = placement.objective.get("move_cost")
    if mc:
        plain = mc["without_move_cost"]
        lines.append(f"  --move-cost {mc['W']:g} token transition{'' if mc['W'] == 1 else 's'} = {mc['per_move']:.4g} per moved expert (one "
                     f"transition, a fit token's mean edge weight at one layer pair: {mc['unit']:.4g}); traffic "
                     f"{mc['traffic']:.6g} against {plain['value']:.6g} for the unpenalised solve, which moved "
                     f"{plain['moved']} of {m['of']}")
    mm = placement.objective.get("max_moves")
    if mm and placement.objective.get("name") == "traffic":
        lines.extend(_traffic_limit_lines(mm))
    elif mm:
        plain = mm["plain"]
        lines.append(f"  --max-moves {mm['N']}: moved {mm['moved']} of {mm['of']} expert copies (per layer at most "
                     f"{max(mm['moved_per_layer'], default=0)}; a copy CURRENT lacks), imbalance "
                     f"{placement.objective['value']:.4f} (mean over layers of max/mean load); the plain balance "
                     f"solve: {plain['value']:.4f}, moving {plain['moved']} (per layer at most "
                     f"{max(plain['moved_per_layer'], default=0)})")
    return lines


def _traffic_limit_lines(mm: dict[str, Any]) -> list[str]:
    """traffic --max-moves N: the moves per layer (mean, max), whether the limit held on every
    layer, and the solve without the limit beside it; what N = 1 means (no move at all)."""
    def per_layer(moved: list[int]) -> str:
        return f"per layer mean {sum(moved) / max(len(moved), 1):.2f}, max {max(moved, default=0)}"

    free, n = mm["without_max_moves"], mm["N"]
    over = [layer for layer, m in enumerate(mm["moved_per_layer"]) if m > n]
    held = "held on every layer" if not over else f"NOT held on layers {over}"
    lines = [f"  --max-moves {n} (experts off their CURRENT GPU, per layer): moved {per_layer(mm['moved_per_layer'])}; "
             f"the limit {held}; traffic {mm['traffic']:.6g} against {free['traffic']:.6g} for the solve without the "
             f"limit, which moved {free['moved']} ({per_layer(free['moved_per_layer'])})"]
    if n == 1:
        lines.append("  (N = 1 allows no move: with E/G experts on every GPU a moved expert takes another's place, "
                     "so a layer moves 0 or at least 2 experts; --max-moves 2 allows one exchange per layer)")
    return lines


def cap_remedy(objective: dict[str, Any]) -> str:
    """Why layers stay above --max-imbalance, and what would bring them under: copies where no
    layout of equal counts goes lower (objective.layers_at_least_imbalance), else the balance
    objective, which finds each layer's least."""
    above = objective.get("layers_above_max_imbalance") or []
    floor = objective.get("layers_at_least_imbalance") or []
    copies = "--redundant-experts R with --objective balance or latency adds copies of the hot experts"
    if above and sorted(floor) == sorted(above):
        return ("no layout of equal expert counts goes lower: the GPU of the hottest expert carries at least it and "
                f"the lightest others; {copies}")
    balance = ("the swaps found no layout of equal expert counts under it: --objective balance gives each layer's "
               "least imbalance")
    if not floor:
        return f"for them, {balance}"
    rest = [layer for layer in above if layer not in floor]
    return f"layers {floor} cannot go lower with equal expert counts ({copies}); for layers {rest}, {balance}"


def cap_line(placement: Placement) -> list[str]:
    """The summary's line on --max-imbalance: what the cap cost, where it was not reached, and the
    held-out imbalance beside it (the cap holds on the fit tokens only)."""
    o = placement.objective
    if o.get("max_imbalance") is None:
        return []
    above = o.get("layers_above_max_imbalance") or []
    where = "every layer at or under it" if not above else f"layers {above} stay above it ({cap_remedy(o)})"
    held = placement.metrics.get("held_out", {}).get("placement", {}).get("imbalance_max")
    if held is not None:
        where += (f"; on the held-out tokens the worst layer is at {held:.3f}"
                  + (" (the cap holds on the fit tokens only)" if held > o["max_imbalance"] * (1 + 1e-12) else ""))
    return [f"  load cap --max-imbalance {o['max_imbalance']:g} (fit tokens): traffic cost {o.get('value', 0):.6g} "
            f"against {o.get('value_without_cap', 0):.6g} without it; {where}"]


def latency_command(placement: Placement, trace_path: str, output: str | None = None) -> list[str]:
    """The `moeplace solve --objective latency` command line for the same trace, GPUs and split,
    with the shipped cluster and model configs where one fits, else placeholders and a line on
    what to put in them."""
    from moeplace.solve.costmodel import SHIPPED_CLUSTERS, shipped

    topology = (placement.num_nodes, placement.gpus_per_node)
    model = str((placement.trace_model or {}).get("model", "")).lower()
    cluster = shipped(SHIPPED_CLUSTERS.get(topology, "CLUSTER.yaml"))
    model_config = shipped(next((path for name, path in SHIPPED_MODELS.items() if name in model), "MODEL.yaml"))
    out = "PLACEMENT.json" if output is None else str(Path(output).with_name(Path(output).stem + "-latency.json"))
    args = ["moeplace solve", quote(trace_path), f"--gpus {placement.num_gpus}"]
    if placement.num_nodes > 1:
        args.append(f"--gpus-per-node {placement.gpus_per_node}")
    if placement.split:
        args.append(f"--train-fraction {placement.split['train_fraction']:g}")
        if placement.split.get("by") == "sequence":
            args.append("--split-by sequence")
    if placement.solver.get("seed"):
        args.append(f"--seed {placement.solver['seed']}")
    args += ["--objective latency", f"--cluster {quote(cluster)}", f"--model-config {quote(model_config)}", f"-o {quote(out)}"]
    lines = [" ".join(args)]
    if cluster == "CLUSTER.yaml":
        lines.append(f"(CLUSTER.yaml: configs/cluster/h100-1x8-nvlink.yaml with nodes: {topology[0]}, "
                     f"gpus_per_node: {topology[1]})")
    if model_config == "MODEL.yaml":
        lines.append("(MODEL.yaml: your model's figures, as in configs/model/*.yaml; or the model's checkpoint "
                     "directory, whose expert costs are then estimated from its config.json)")
    return lines


def render_front(front: dict[str, Any]) -> str:
    """The pareto front as a table (`solve --pareto`; the written placement is the weight-1 row)."""
    lines = [f"pareto front ({front['tokens'].replace('_', '-')} tokens; weight = compute weight, 0 = traffic only; written: weight 1):",
             f"{'weight':>8}{'compute us':>12}{'comm us':>10}{'MoE time us':>13}{'cross-GPU':>11}{'imbalance':>11}"]
    for r in front["rows"]:
        lines.append(f"{r['compute_weight']:>8g}{r['compute_us']:>12.1f}{r['comm_us']:>10.1f}{r['moe_time_us']:>13.1f}"
                     f"{eval_format(r['cross_gpu_top1'], 'cross_gpu_top1'):>11}"
                     f"{eval_format(r['imbalance_max'], 'imbalance_max'):>11}"
                     + ("  (cut by --time-limit)" if r["stopped_by_time_limit"] else ""))
    return "\n".join(lines)
