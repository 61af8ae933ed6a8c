"""Solver II benchmark: balance vs DeepSeek EPLB on the real Mixtral loads; latency on FLAME.

    python scripts/bench_solver2.py mixtral [--time-limit S]
    python scripts/bench_solver2.py joint [--trace PATH] [--seeds N] [--total-cap]
    python scripts/bench_solver2.py deepseek [--time-limit S]
    python scripts/bench_solver2.py balance-speed [--trace PATH] [--time-limit S]
    python scripts/bench_solver2.py latency-speed [--time-limit S]
    python scripts/bench_solver2.py balance-ilp [--trace PATH] [--seeds N] [--time-limit S]

mixtral: every file of ../shared/data/mixtral-8x7b-expert-loads (2 variants x 7 subjects), 4 and 8
GPUs, 0 and 8 redundant experts: mean over layers of max/mean GPU load for moeplace balance, EPLB
hierarchical and global (EPLB's own equal-split-per-slot figure), and the number of layers where
moeplace is worse / better than the best EPLB.
joint: held-out predicted MoE time (cost model, configs/model/flame-moe-290m.yaml) of traffic,
balance, latency (and, when E divides by G, balance and latency with G redundant experts) and
MoETuner placements, fitted on seeded halves of a trace (default traces/flame-moe-290m-decoder.npz),
under the 8-GPU and 2-node clusters; mean over seeds and latency - traffic per seed. --total-cap
adds balance and latency with uneven per-layer counts under a total cap of L x E / G per GPU.
deepseek: SYNTHETIC planted-affinity trace (solve/synthetic.py) of DeepSeek-V3 size: 4096 tokens,
58 layers x 256 experts, top-8, 64 GPUs in 8 nodes, 32 redundant experts, latency objective
under configs/cluster/h100-8x8-ib.yaml: wall time, peak memory, value, bound, gap.
balance-speed: `balance` with G redundant experts on all tokens of a trace (default FLAME) for 8
and 16 GPUs (2 nodes): wall time, how each layer's plan was found, max/mean, and whether the time
limit cut it.
latency-speed: the latency objective on SYNTHETIC planted traces of OLMoE shape (16 x 64, top-8,
8 GPUs, configs/cluster/h100-1x8-nvlink.yaml) of 2,000 to 20,000 tokens, half for training:
wall time, the sweeps of its descent (it stops after 20 or when a sweep accepts nothing), and
whether the time limit cut it (then more time could give a different placement).
balance-ilp: the per-layer balance ILP (balance.ilp_layer, no replicas, per-layer counts free as
under a total cap of L x E / G) on the training half of each seed, 8 GPUs, --time-limit per
layer: seconds, whether HiGHS proved it optimal, max load and dual bound of every layer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def mixtral(time_limit: float) -> None:
    from moeplace.solve import eplb
    from moeplace.solve.balance import balance_placement, expected_gpu_loads

    worse_total = 0
    print(f"{'input':48} G  R   moeplace  eplb-hier  eplb-glob  worse  better  gap    s")
    for f in sorted((DATA / "mixtral-8x7b-expert-loads").glob("*/*.json")):
        w = np.array(json.loads(f.read_text())["expert_popularity"], dtype=float)
        for gpus in (4, 8):
            for redundant in (0, 8):
                t0 = time.monotonic()
                p = balance_placement(w, gpus, gpus, redundant, time_limit, progress=False)
                mean = w.sum(1) / gpus
                ours = expected_gpu_loads(p, w).max(1) / mean
                own = {pol: eplb.eplb_placement(w, gpus, gpus, redundant, 1, pol)[1].max(1) / mean for pol in eplb.POLICIES}
                best = np.minimum(*own.values())
                worse, better = int((ours > best + 1e-9).sum()), int((ours < best - 1e-9).sum())
                worse_total += worse
                print(f"{f.parent.name[-8:] + '/' + f.stem[18:]:48} {gpus}  {redundant}   {ours.mean():.4f}    "
                      f"{own['hierarchical'].mean():.4f}     {own['global'].mean():.4f}     {worse:3d}    {better:3d}  "
                      f"{p.gap:.4f} {time.monotonic() - t0:4.1f}", flush=True)
    print(f"layers worse than EPLB, all inputs: {worse_total}")


def joint(trace_path: Path, seeds: int, time_limit: float, total_cap: bool = False, only: list[str] | None = None) -> None:
    from moeplace.solve.costmodel import load_cost_model, predict
    from moeplace.solve.moetuner import moetuner_placement
    from moeplace.solve.solver import solve_placement
    from moeplace.trace.format import load_trace, split_tokens

    trace = load_trace(trace_path)
    print(f"{trace_path.name}: {trace.num_tokens} tokens, {trace.num_layers} x {trace.num_experts}, top-{trace.top_k}")
    for cluster, gpus in (("h100-1x8-nvlink", 8), ("h100-2x8-ib", 16)):
        cm = load_cost_model(ROOT / "configs" / "cluster" / f"{cluster}.yaml", ROOT / "configs" / "model" / "flame-moe-290m.yaml")
        redundant = gpus if trace.num_experts % gpus == 0 else 0  # one extra slot per GPU
        rows: dict[str, list[float]] = {}
        cut: list[str] = []  # solves the time limit cut short: their result depends on the machine's speed
        for seed in range(seeds):
            train, held = split_tokens(trace.num_tokens, 0.5, seed)
            held_trace = trace.select_tokens(held)
            runs: list[tuple[str, str, dict]] = [("traffic", "traffic", {}), ("balance", "balance", {}),
                                                 ("latency", "latency", {})]
            if redundant:
                runs += [(f"{o}+R{redundant}", o, {"redundant": redundant}) for o in ("balance", "latency")]
            cap = trace.num_layers * trace.num_experts // gpus  # the memory of the equal layout
            if total_cap:
                runs += [(f"{o} cap{cap}", o, {"max_experts_per_gpu_total": cap}) for o in ("balance", "latency")]
            for name, objective, extra in runs:
                if only and name.rstrip("0123456789") not in only:  # "latency+R16" -> "latency+R"
                    continue
                opts = ({"cost": cm} if objective == "latency" else {}) | extra
                p = solve_placement(trace, gpus, 8, time_limit, seed, objective=objective, train_fraction=0.5, **opts)
                rows.setdefault(name, []).append(predict(cm, p, held_trace).total_us.sum())
                if p.solver.get("stopped_by_time_limit"):
                    cut.append(f"{name} seed {seed}")
            if not only or "moetuner" in only:
                p = moetuner_placement(trace.select_tokens(train), gpus, 8, time_limit)
                rows.setdefault("moetuner", []).append(predict(cm, p, held_trace).total_us.sum())
        mean = {k: round(float(np.mean(v)), 1) for k, v in rows.items()}
        diffs = {f"{k} - traffic": np.round(np.array(rows[k]) - np.array(rows["traffic"]), 1).tolist()
                 for k in rows if k.startswith("latency") and "traffic" in rows}
        print(cluster, mean, "| per seed:", diffs, f"| cut by the time limit: {cut or 'none'}", flush=True)


def deepseek(time_limit: float) -> None:
    import resource

    from moeplace.solve.costmodel import load_cost_model
    from moeplace.solve.solver import solve_placement
    from moeplace.solve.synthetic import planted_trace

    trace, _ = planted_trace(4096, 58, 256, 8, 64, gpus_per_node=8, seed=0)
    cm = load_cost_model(ROOT / "configs" / "cluster" / "h100-8x8-ib.yaml", ROOT / "configs" / "model" / "deepseek-v3.yaml")
    t0 = time.monotonic()
    p = solve_placement(trace, 64, 8, time_limit, 0, objective="latency", cost=cm, redundant=32)
    s = p.solver
    print(f"deepseek-v3 size (synthetic): {time.monotonic() - t0:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB; predicted {p.objective['value']:.0f} us "
          f"(starts {', '.join(f'{k} {v:.0f}' for k, v in s['start_costs'].items())}; copies on {s['replicas_on']}), "
          f"bound {p.bound:.0f}, gap {p.gap:.3f}, cut by the time limit: {s['stopped_by_time_limit']}")


def balance_speed(trace_path: Path, time_limit: float) -> None:
    from moeplace.solve.balance import balance_placement
    from moeplace.trace.format import load_trace

    trace = load_trace(trace_path)
    loads = trace.expert_loads()
    print(f"{trace_path.name}: {trace.num_tokens} tokens, {trace.num_layers} x {trace.num_experts}, top-{trace.top_k}")
    for gpus in (8, 16):
        t0 = time.monotonic()
        p = balance_placement(loads, gpus, 8, gpus, time_limit, progress=False)
        print(f"{gpus} GPUs, R = {gpus}: {time.monotonic() - t0:.1f} s, max/mean {p.objective['value']:.4f}, gap "
              f"{p.gap:.4f}, layers by {p.solver['layer_methods']}, cut by the time limit: "
              f"{p.solver['stopped_by_time_limit']}", flush=True)


def latency_speed(time_limit: float) -> None:
    from moeplace.solve.costmodel import load_cost_model
    from moeplace.solve.solver import solve_placement
    from moeplace.solve.synthetic import planted_trace

    cm = load_cost_model(ROOT / "configs" / "cluster" / "h100-1x8-nvlink.yaml", ROOT / "configs" / "model" / "flame-moe-290m.yaml")
    for tokens in (2_000, 5_000, 20_000):
        trace, _ = planted_trace(tokens, 16, 64, 8, 8, 8, seed=1)
        t0 = time.monotonic()
        p = solve_placement(trace, 8, 8, time_limit, 0, objective="latency", cost=cm, train_fraction=0.5)
        s = p.solver
        print(f"{tokens} tokens (train {tokens // 2}): {time.monotonic() - t0:.1f} s, {s['sweeps']} sweeps, predicted "
              f"{p.objective['value']:.1f} us (traffic start {s['start_costs']['traffic']:.1f}), cut by the time "
              f"limit: {s['stopped_by_time_limit']}", flush=True)


def balance_ilp(trace_path: Path, seeds: int, time_limit: float) -> None:
    from moeplace.solve.balance import ilp_layer, layer_max_load, total_slots_per_gpu
    from moeplace.trace.format import load_trace, split_tokens

    trace, gpus = load_trace(trace_path), 8
    slots = total_slots_per_gpu(trace.num_layers, trace.num_experts, gpus, 0, trace.num_layers * trace.num_experts // gpus)
    print(f"{trace_path.name}: {trace.num_layers} x {trace.num_experts}, {gpus} GPUs, at most {slots} experts per GPU")
    for seed in range(seeds):
        loads = trace.select_tokens(split_tokens(trace.num_tokens, 0.5, seed)[0]).expert_loads()
        for layer in range(trace.num_layers):
            t0 = time.monotonic()
            copies, bound, timed_out = ilp_layer(loads[layer], gpus, slots, 0, time_limit)
            value = "-" if copies is None else f"{layer_max_load(loads[layer], copies, gpus):.0f}"
            print(f"seed {seed} layer {layer}: {time.monotonic() - t0:5.2f} s, "
                  f"{'proven' if copies is not None else 'cut' if timed_out else 'no result'}, max load {value}, "
                  f"bound {bound:.2f}", flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("mixtral", "joint", "deepseek", "balance-speed", "latency-speed",
                                           "balance-ilp"))
    ap.add_argument("--trace", type=Path, default=ROOT / "traces" / "flame-moe-290m-decoder.npz")
    ap.add_argument("--time-limit", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="joint: only these set-ups (traffic balance latency balance+R latency+R 'balance cap' "
                         "'latency cap' moetuner)")
    ap.add_argument("--total-cap", action="store_true",
                    help="joint: also balance and latency with per-layer counts free under a total cap of L x E / G")
    a = ap.parse_args()
    {"mixtral": lambda: mixtral(a.time_limit), "joint": lambda: joint(a.trace, a.seeds, a.time_limit, a.total_cap, a.only),
     "deepseek": lambda: deepseek(a.time_limit), "balance-speed": lambda: balance_speed(a.trace, a.time_limit),
     "latency-speed": lambda: latency_speed(a.time_limit),
     "balance-ilp": lambda: balance_ilp(a.trace, a.seeds, a.time_limit)}[a.what]()
