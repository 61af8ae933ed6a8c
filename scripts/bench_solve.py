#!/usr/bin/env python3
"""Benchmark of `moeplace solve` (issue 2): held-out quality and scale. Prints the figures.

Quality: fit on a seeded random half of a trace, evaluate on the other half, mean over seeded
splits, as ratios to the contiguous layout (lower is better), for moeplace and for the plain
reference heuristic (coordinate ascent on gate-weighted transitions, best of 8 random starts).
On the real FLAME trace, and on a SYNTHETIC planted-affinity trace of the same shape (to check
that nothing is tuned to FLAME).

Scale: SYNTHETIC planted-affinity traces of Mixtral-8x7B, OLMoE and DeepSeek-V3 sizes; each case
runs in a fresh subprocess so its peak RSS is its own. recovery = (C(contiguous) - C(found)) /
(C(contiguous) - C(planted)) with C the solver's objective on the trace: the share of the
planted placement's improvement over contiguous that the solver finds (1.0 = as good as
planted; above 1 when noise lets it do better).

    python scripts/bench_solve.py                  # everything
    python scripts/bench_solve.py --only quality --splits 5
    python scripts/bench_solve.py --only quality --trace /tmp/q/wiki.npz   # also other traces
    python scripts/bench_solve.py --only scale
    python scripts/bench_solve.py --only learning-curve --splits 6
    python scripts/bench_solve.py --only learning-curve --splits 3 --trace T.npz --sizes 320,2500,10000 --test-tokens 5000
    python scripts/bench_solve.py --only tokens
    python scripts/bench_solve.py --only load-cap --splits 3 --trace T.npz   # FLAME and T.npz

Load cap: `solve --max-imbalance` (docs/solver.md, step 6) at no cap, contiguous's worst-layer
imbalance on the fit tokens, 1.25 and 1.1: held-out ratios to contiguous and the held-out worst
layer's max/mean token load, mean over splits (the cap holds on the fit tokens by construction).

Learning curve: how the held-out ratio moves with the number of training tokens on FLAME. Per
split, a seeded permutation keeps 160 tokens for testing and fits on the first n of the other
480 (n = 80 ... 480), so every n is scored on the same tokens; mean and standard error over
splits, and the in-sample ratio on the n training tokens and the plain reference (fitted on the
same n tokens) beside it. --trace, --sizes and --test-tokens run it on another trace.

Tokens: how `moeplace solve` (traffic, default settings, --train-fraction 0.5) scales with the
length of a trace: SYNTHETIC planted traces of OLMoE shape (16 x 64, top-8, 8 GPUs) of 10,000 to
200,000 tokens, each in a fresh process: wall time of solve_placement (cross-validation, search,
baseline metrics on both halves), the cross-validation's share, peak RSS, and whether the time
limit cut anything.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FLAME = ROOT / "traces" / "flame-moe-290m-decoder.npz"
THRESHOLDS = ROOT / "tests" / "regression_thresholds.yaml"
METRICS = ("cross_gpu_top1", "dest_gpus_topk")
# name: (tokens, layers, experts, top_k, gpus, gpus_per_node, target seconds)
SCALE = {
    "mixtral-8x7b": (2048, 32, 8, 2, 8, 8, 5.0),
    "mixtral-4gpu": (2048, 32, 8, 2, 4, 4, 5.0),  # 2,520 layouts per layer: the exact shortest path
    "mixtral-2x2": (2048, 32, 8, 2, 4, 2, 5.0),  # the same on 2 nodes of 2 GPUs
    "olmoe": (2048, 16, 64, 8, 8, 8, 5.0),
    "deepseek-v3": (4096, 58, 256, 8, 64, 8, 60.0),
}


def held_out_ratios(trace, num_gpus: int, splits: range) -> dict[str, np.ndarray]:
    """Mean over splits of held-out metric / contiguous: moeplace, moeplace with the default edge
    weights fixed (no cross-validation) and the plain reference."""
    from threadpoolctl import threadpool_limits

    from moeplace.eval.metrics import evaluate
    from moeplace.placement import Placement
    from moeplace.solve.baselines import contiguous
    from moeplace.solve.solver import plain_coordinate_ascent, solve_placement
    from moeplace.trace.format import split_tokens

    from moeplace.solve.solver import DEFAULT_WEIGHTS

    out: dict[str, list[list[float]]] = {"moeplace": [], "defaults": [], "plain": []}
    for seed in splits:
        # moeplace as shipped (weights chosen by cross-validation) and with the default weights fixed
        for method, weights in (("moeplace", {}), ("defaults", DEFAULT_WEIGHTS)):
            placement = solve_placement(trace, num_gpus, time_limit=60, seed=seed, train_fraction=0.5, **weights)
            held = placement.metrics["held_out"]
            out[method].append([held["placement"][m] / held["contiguous"][m] for m in METRICS])
        train_idx, held_idx = split_tokens(trace.num_tokens, 0.5, seed)
        with threadpool_limits(1, "blas"):
            plain = plain_coordinate_ascent(trace.select_tokens(train_idx), num_gpus, seed=seed)
        sub = trace.select_tokens(held_idx)
        base = evaluate(Placement(contiguous(trace.num_layers, trace.num_experts, num_gpus), num_gpus, num_gpus), sub)
        m = evaluate(Placement(plain, num_gpus, num_gpus), sub)
        out["plain"].append([m[k] / base[k] for k in METRICS])
    return {k: np.mean(v, axis=0) for k, v in out.items()}


def quality(splits: int, extra: list[Path]) -> None:
    from moeplace.solve.synthetic import planted_trace
    from moeplace.trace.format import load_trace

    traces = {}
    if FLAME.is_file():
        traces["FLAME-MoE-290M decoder (real)"] = load_trace(FLAME)
    traces["SYNTHETIC planted, 640 x 8 x 64 top-6"] = planted_trace(640, 8, 64, 6, 8, affinity=0.6, boost=8.0, seed=7)[0]
    for path in extra:
        traces[path.name] = load_trace(path)
    print("held-out ratio to contiguous (lower is better), mean over splits")
    results: dict[int, np.ndarray] = {}
    print(f"{'trace':40} {'splits':>7} {'GPUs':>5} {'method':>9} {'cross-GPU top-1':>16} {'dest GPUs top-k':>18}")
    for name, trace in traces.items():
        for split_range in (range(splits), range(100, 100 + splits)):
            for gpus in (4, 8):
                t = time.monotonic()
                r = held_out_ratios(trace, gpus, split_range)
                for method, (top1, dest) in r.items():
                    label = f"{split_range.start}..{split_range.stop - 1}"
                    print(f"{name:40} {label:>7} {gpus:>5} {method:>9} {top1:>16.3f} {dest:>18.3f}")
                print(f"{'':40} {'':>7} {'':>5} {'(time)':>9} {time.monotonic() - t:>15.1f}s", flush=True)
                if name.startswith("FLAME") and split_range.start == 0:
                    results[gpus] = r["moeplace"]
    print_targets(results, splits)


def print_targets(results: dict[int, np.ndarray], splits: int) -> None:
    """Issue 2's targets (tests/regression_thresholds.yaml `targets`) against the FLAME ratios."""
    import yaml

    spec = yaml.safe_load(THRESHOLDS.read_text())["traces"][FLAME.name]
    if not results or splits != spec["splits"]:
        return
    print(f"issue 2 targets on {FLAME.name} (splits 0..{splits - 1}):")
    for gpus, targets in spec["targets"].items():
        for metric, target in targets.items():
            ratio = results[int(gpus)][METRICS.index(metric)]
            print(f"  {gpus} GPUs {metric:16} {ratio:.3f} <= {target}: {'met' if ratio <= target else 'NOT MET'}")


def load_cap(splits: int, extra: list[Path]) -> None:
    from moeplace.solve.solver import solve_placement
    from moeplace.trace.format import load_trace

    print("load cap: held-out top-1 / top-k ratio to contiguous, held-out imbalance max (contiguous's), mean over splits")
    for path in [FLAME, *extra]:
        trace = load_trace(path)
        for gpus in (4, 8):
            for cap in (None, "contiguous", 1.25, 1.1):
                rows = []
                for seed in range(splits):
                    if cap == "contiguous":  # the uncapped solve records contiguous's imbalance on the fit tokens
                        free = solve_placement(trace, gpus, time_limit=60, seed=seed, train_fraction=0.5)
                        limit = max(free.metrics["train"]["contiguous"]["imbalance_max"], 1.0)
                    else:
                        limit = cap
                    p = solve_placement(trace, gpus, time_limit=60, seed=seed, train_fraction=0.5, max_imbalance=limit)
                    h = p.metrics["held_out"]
                    rows.append([h["placement"][m] / h["contiguous"][m] for m in METRICS]
                                + [h["placement"]["imbalance_max"], h["contiguous"]["imbalance_max"],
                                   len(p.objective.get("layers_above_max_imbalance") or [])])
                r = np.mean(rows, axis=0)
                print(f"{path.name:32} {gpus} GPUs cap {str(cap):>10}: top-1 {r[0]:.3f} top-k {r[1]:.3f} "
                      f"imbalance {r[2]:.3f} ({r[3]:.3f}) layers above cap {r[4]:.1f}", flush=True)


LEARNING_SIZES = (80, 160, 240, 320, 480)
LEARNING_TEST = 160


def learning_curve(splits: int, path: Path = FLAME, sizes: tuple[int, ...] = LEARNING_SIZES,
                   test_tokens: int = LEARNING_TEST) -> None:
    from threadpoolctl import threadpool_limits

    from moeplace.eval.metrics import evaluate
    from moeplace.placement import Placement
    from moeplace.solve.baselines import contiguous
    from moeplace.solve.solver import plain_coordinate_ascent, solve_placement
    from moeplace.trace.format import load_trace

    trace = load_trace(path)
    if test_tokens + max(sizes) > trace.num_tokens:
        raise SystemExit(f"{path.name} has {trace.num_tokens} tokens, fewer than {test_tokens} test + {max(sizes)}")
    print(f"{path.name}: held-out ratio to contiguous against training tokens ({test_tokens} test tokens, "
          f"{splits} splits, mean +- standard error; plain = the reference heuristic on the same tokens)")
    print(f"{'GPUs':>5} {'train tokens':>13} {'held-out top-1':>18} {'held-out top-k':>18} {'in-sample top-1':>16} "
          f"{'top-k':>6} {'plain top-1':>12} {'top-k':>6}")
    for gpus in (4, 8):
        contiguous_layout = Placement(contiguous(trace.num_layers, trace.num_experts, gpus), gpus, gpus)
        held, train, plain = ({n: [] for n in sizes} for _ in range(3))
        for seed in range(splits):
            order = np.random.default_rng(1000 + seed).permutation(trace.num_tokens)
            test = trace.select_tokens(np.sort(order[:test_tokens]))
            base = evaluate(contiguous_layout, test)
            for n in sizes:
                fit = trace.select_tokens(np.sort(order[test_tokens:test_tokens + n]))
                placement = solve_placement(fit, gpus, time_limit=60, seed=seed, progress=False)
                m = evaluate(Placement(placement.expert_to_gpu, gpus, gpus), test)
                held[n].append([m[k] / base[k] for k in METRICS])
                own = placement.metrics["train"]
                train[n].append([own["placement"][k] / own["contiguous"][k] for k in METRICS])
                with threadpool_limits(1, "blas"):
                    ref = plain_coordinate_ascent(fit, gpus, seed=seed)
                m = evaluate(Placement(ref, gpus, gpus), test)
                plain[n].append([m[k] / base[k] for k in METRICS])
        for n in sizes:
            h, t, p = np.array(held[n]), np.mean(train[n], axis=0), np.mean(plain[n], axis=0)
            se = h.std(axis=0, ddof=1) / np.sqrt(len(h)) if len(h) > 1 else np.zeros(2)
            print(f"{gpus:>5} {n:>13} {h[:, 0].mean():>11.3f} +- {se[0]:.3f} {h[:, 1].mean():>11.3f} +- {se[1]:.3f} "
                  f"{t[0]:>16.3f} {t[1]:>6.3f} {p[0]:>12.3f} {p[1]:>6.3f}", flush=True)


def scale_case(name: str) -> dict:
    """One scale case (run in its own process): solve time, recovery, gap."""
    from threadpoolctl import threadpool_limits

    from moeplace.solve.affinity import distance_matrix, edge_weights, placement_cost
    from moeplace.solve.baselines import contiguous
    from moeplace.solve.solver import solve_placement
    from moeplace.solve.synthetic import planted_trace

    tokens, layers, experts, k, gpus, gpn, target = SCALE[name]
    trace, planted = planted_trace(tokens, layers, experts, k, gpus, gpn, seed=0)
    t = time.monotonic()
    placement = solve_placement(trace, gpus, gpn, time_limit=target, seed=0)
    seconds = time.monotonic() - t
    with threadpool_limits(1, "blas"):
        o = placement.objective
        graph = edge_weights(trace, o["top1_weight"], o["coselect_weight"], o["smoothing"], o["prior"])
        d = distance_matrix(gpus, gpn, o["node_cost"])
        c_contig, c_planted, c_found = (placement_cost(graph, x, d) for x in
                                        (contiguous(layers, experts, gpus), planted, placement.expert_to_gpu))
    return {
        "case": name, "shape": f"{layers}x{experts} top-{k}, {tokens} tokens, {gpus} GPUs / {gpus // gpn} nodes",
        "seconds": seconds, "target_s": target,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "recovery": (c_contig - c_found) / (c_contig - c_planted),
        "gap": placement.gap, "method": placement.solver["method"],
        "cross_gpu_top1_vs_contiguous": placement.metrics["train"]["placement"]["cross_gpu_top1"]
        / placement.metrics["train"]["contiguous"]["cross_gpu_top1"],
    }


def scale() -> None:
    print("SYNTHETIC planted-affinity traces; solve_placement(time_limit=target) incl. edge weights and "
          "baseline metrics; peak RSS of the whole process")
    print(f"{'case':14} {'shape':46} {'seconds':>8} {'target':>7} {'peak GiB':>9} {'recovery':>9} {'gap':>7}  method")
    for name in SCALE:
        proc = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True)
        if proc.returncode:
            print(f"{name:14} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gap = "n/a" if r["gap"] is None else f"{r['gap']:.1%}"
        print(f"{r['case']:14} {r['shape']:46} {r['seconds']:>8.1f} {r['target_s']:>7.0f} {r['peak_rss_gib']:>9.2f} "
              f"{r['recovery']:>9.4f} {gap:>7}  {r['method']}", flush=True)


TOKENS = (10_000, 50_000, 200_000)


def tokens_case(num_tokens: int) -> dict:
    """One trace length (run in its own process)."""
    from moeplace.solve.solver import solve_placement
    from moeplace.solve.synthetic import planted_trace

    trace, _ = planted_trace(num_tokens, 16, 64, 8, 8, 8, seed=0)
    t = time.monotonic()
    placement = solve_placement(trace, 8, 8, time_limit=60.0, seed=0, train_fraction=0.5)
    seconds = time.monotonic() - t
    held = placement.metrics["held_out"]
    return {"tokens": num_tokens, "seconds": seconds, "solve_s": placement.solver["seconds"],
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "cut": placement.solver["stopped_by_time_limit"],
            "cross_validation": placement.solver["cross_validation"] is not None,
            "held_out_top1_vs_contiguous": held["placement"]["cross_gpu_top1"] / held["contiguous"]["cross_gpu_top1"]}


def tokens() -> None:
    print("SYNTHETIC planted traces, 16 x 64 top-8, 8 GPUs; solve_placement(train_fraction=0.5, time_limit=60)")
    print(f"{'tokens':>8} {'total s':>8} {'objective s':>12} {'CV':>4} {'peak GiB':>9} {'cut':>5} {'held-out top-1':>15}")
    for n in TOKENS:
        proc = subprocess.run([sys.executable, __file__, "--tokens-case", str(n)], capture_output=True, text=True)
        if proc.returncode:
            print(f"{n:>8} FAILED: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{r['tokens']:>8} {r['seconds']:>8.1f} {r['solve_s']:>12.1f} {'yes' if r['cross_validation'] else 'no':>4} "
              f"{r['peak_rss_gib']:>9.2f} {str(r['cut']):>5} {r['held_out_top1_vs_contiguous']:>14.3f}x", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("quality", "scale", "learning-curve", "tokens", "load-cap"))
    ap.add_argument("--splits", type=int, default=5)
    ap.add_argument("--trace", type=Path, action="append", default=[],
                    help="quality: another trace for the table; learning-curve: the trace (default FLAME)")
    ap.add_argument("--sizes", type=lambda v: tuple(int(x) for x in v.split(",")), default=LEARNING_SIZES,
                    help="learning-curve: training-token counts, comma-separated")
    ap.add_argument("--test-tokens", type=int, default=LEARNING_TEST, help="learning-curve: tokens held out")
    ap.add_argument("--case", choices=tuple(SCALE), help=argparse.SUPPRESS)  # internal: one scale case
    ap.add_argument("--tokens-case", type=int, help=argparse.SUPPRESS)  # internal: one trace length
    args = ap.parse_args()
    if args.case:
        print(json.dumps(scale_case(args.case)))
        return
    if args.tokens_case:
        print(json.dumps(tokens_case(args.tokens_case)))
        return
    if args.only in (None, "quality"):
        quality(args.splits, args.trace)
    if args.only in (None, "scale"):
        scale()
    if args.only == "learning-curve":  # not part of the default run: ~10 min on 2 cores
        learning_curve(args.splits, args.trace[0] if args.trace else FLAME, args.sizes, args.test_tokens)
    if args.only == "tokens":  # not part of the default run: ~2 min on 2 cores
        tokens()
    if args.only == "load-cap":  # not part of the default run
        load_cap(args.splits, args.trace)


if __name__ == "__main__":
    main()
