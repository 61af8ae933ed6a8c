"""How the predicted MoE time depends on the trace's token count, and a length-invariant estimator.

    python scripts/bench_cost_bias.py [--trace PATH] [--placements DIR] [--seeds N] [--reps R] [--draws M]

The cost model (docs/cost-model.md) scales a trace's counts to `batch_tokens` (FLAME: 8192) and
takes maxima over GPUs of compute and of Alltoall send/receive. The max of scaled sample counts
is biased upward by the sample's noise (~1/sqrt(n)), so one placement's prediction falls as the
trace grows. This script measures that and prototypes estimators of E[time of a batch of B tokens
drawn from the routing distribution the trace samples] that should not depend on n:

  raw     costmodel.predict_gpus (what eval and the solver report)
  shrink  per layer, per-token load vectors x_t (compute: us per GPU; dispatch / combine: us per
          GPU, side (send / receive) and link class); their mean shrunk toward the mean of its
          group (GPUs of one kind) by the share of the spread that exceeds the mean's own noise
          (empirical Bayes, noise variance S_jj / n from the per-token covariance S), then the
          batch's own noise: E max_j (B mu_j + lat_j + sqrt(B) z_j), z ~ N(0, S), Monte Carlo
  boot    parametric-bootstrap bias correction of the max: 2 g(1/B) - g(1/n + 1/B), with
          g(v) = E max_j (B mu_j + lat_j + B sqrt(v) z_j), mu the plain sample mean
  boot-s  as boot, but the bias g(1/n + 1/B) - g(1/B) taken at the shrunk mean (whose gaps
          between GPUs are not widened by the sample's noise) and subtracted from g(1/B) at mu
  split   split-half Richardson extrapolation assuming bias ~ 1/sqrt(n), on raw itself:
          raw_n - (raw_{n/2} - raw_n) / (sqrt 2 - 1) * (1 - sqrt(n / B)), raw_{n/2} the mean over
          random halves

Sections (1 node x 8 H100 and 2 nodes x 8, FLAME model config):
  A  subsets without replacement of all the trace's tokens, n = 80/160/320/640 (mean of --reps;
     one at 640): per-term raw figures, their fit a + b/sqrt(n) (a: infinite tokens; a + b/sqrt(B):
     a batch of B) and each estimator's total. Placements: contiguous and the seed-0 solves.
  B  a world where the routing distribution is the trace's own tokens (draws with replacement):
     truth = mean raw time of --reps batches of B tokens; estimators on n-token draws vs truth.
  C  the held-out half of seeds 0..N-1: traffic / balance / latency (and contiguous) under raw and
     the estimators, mean over seeds, and each minus traffic (mean, sd over seeds).
Placements are read from DIR/{g8,n2}_{traffic,balance,latency}_s{S}.json (written by
`moeplace solve TRACE --train-fraction 0.5 --seed S ...`); missing ones are solved and saved there.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeplace.eval.metrics import initial_homes, remote_mask, token_gpus
from moeplace.placement import Placement, load_placement
from moeplace.solve import baselines
from moeplace.solve.costmodel import INTER, CostModel, active_probability, load_cost_model, predict_gpus
from moeplace.solve.latency import shrunk_loads
from moeplace.trace.format import Trace, load_trace, split_tokens

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "configs/model/flame-moe-290m.yaml"
CONFIGS = {  # name: (cluster file, GPUs, GPUs per node)
    "g8": (ROOT / "configs/cluster/h100-1x8-nvlink.yaml", 8, 8),
    "n2": (ROOT / "configs/cluster/h100-2x8-ib.yaml", 16, 8),
}
OBJECTIVES = ("traffic", "balance", "latency")
TERMS = ("compute", "dispatch", "combine")
ESTIMATORS = ("raw", "shrink", "boot", "boot-s", "split")
SIZES = (80, 160, 320, 640)


# ---------------------------------------------------------------- placements

def placement_file(folder: Path, config: str, objective: str, seed: int) -> Path:
    return folder / f"{config}_{objective}_s{seed}.json"


def get_placement(folder: Path, trace: Trace, config: str, objective: str, seed: int) -> Placement:
    """The solve `moeplace solve TRACE --train-fraction 0.5 --seed S` makes, cached in folder
    (a cached file fitted on another trace, by routing hash, is solved again)."""
    path = placement_file(folder, config, objective, seed)
    if path.exists():
        cached = load_placement(path)
        if cached.trace_routing_sha256 == trace.routing_sha256():
            return cached
    from moeplace.solve.solver import solve_placement
    cluster, gpus, per_node = CONFIGS[config]
    options: dict[str, Any] = {"cluster": str(cluster), "model_config": str(MODEL)} if objective == "latency" else {}
    t0 = time.monotonic()
    p = solve_placement(trace, gpus, per_node, seed=seed, objective=objective, train_fraction=0.5, **options)
    folder.mkdir(parents=True, exist_ok=True)
    p.save(path)
    print(f"  solved {path.name} in {time.monotonic() - t0:.1f} s")
    return p


def contiguous(trace: Trace, config: str) -> Placement:
    _, gpus, per_node = CONFIGS[config]
    return Placement(baselines.contiguous(trace.num_layers, trace.num_experts, gpus), gpus, per_node)


# ---------------------------------------------------------------- per-token load vectors

@dataclass
class LayerVectors:
    """One layer's per-token loads, us per token before scaling to the batch, and per-entry latency.

    compute float [T, G]; dispatch / combine float [T, 4G] (send intra, send inter, recv intra,
    recv inter); fixed float [G]: expert_fixed_us x expected active experts per GPU."""

    compute: np.ndarray
    dispatch: np.ndarray
    combine: np.ndarray
    fixed: np.ndarray


def phase_vectors(src: np.ndarray, dst: np.ndarray, token: np.ndarray, num_tokens: int, cost: CostModel,
                  bytes_per_token: float) -> np.ndarray:
    """Per-token us of one Alltoall phase per (side, class, GPU) entry, float [T, 4G]."""
    g = cost.cluster.num_gpus
    inter = (cost.link_class()[src, dst] == INTER).astype(np.int64)
    us = bytes_per_token / (np.where(inter == 1, cost.cluster.inter_GBps, cost.cluster.intra_GBps) * 1e3)
    out = np.zeros((num_tokens, 4 * g))
    np.add.at(out, (token, inter * g + src), us)  # send
    np.add.at(out, (token, 2 * g + inter * g + dst), us)  # receive
    return out


def layer_vectors(cost: CostModel, home: np.ndarray, gpus: np.ndarray, experts: np.ndarray,
                  e2g: np.ndarray) -> LayerVectors:
    """Per-token vectors of one layer; gpus/experts int [T, k], e2g int [E] (no replicas)."""
    m, g = cost.model, cost.cluster.num_gpus
    n = len(gpus)
    compute = (gpus[:, :, None] == np.arange(g)).sum(1) * m.expert_us_per_token
    rows = np.repeat(np.arange(n), gpus.shape[1]).reshape(gpus.shape)
    s, go = remote_mask(gpus, home)
    dispatch = phase_vectors(np.broadcast_to(home[:, None], s.shape)[go], s[go], rows[go], n, cost,
                             m.hidden_size * m.dispatch_bytes)
    s, back = remote_mask(gpus, gpus[:, 0])
    combine = phase_vectors(s[back], np.broadcast_to(gpus[:, :1], s.shape)[back], rows[back], n, cost,
                            m.hidden_size * m.combine_bytes)
    # the per-expert term from shrunk shares, as the latency search's smoothed model
    loads = shrunk_loads(np.bincount(experts.ravel(), minlength=len(e2g))[None].astype(float))[0]
    scale = (m.batch_tokens or n) / n
    fixed = m.expert_fixed_us * np.bincount(e2g, weights=active_probability(loads / n, n, scale), minlength=g)
    return LayerVectors(compute, dispatch, combine, fixed)


def side_latency(mean: np.ndarray, cost: CostModel) -> np.ndarray:
    """Latency added to each (side, class, GPU) entry: the larger latency of the classes its GPU
    side uses (costmodel.alltoall_us), float [4G] from the expected per-token us [4G]."""
    c, g = cost.cluster, cost.cluster.num_gpus
    used = mean.reshape(2, 2, g) > 0  # side, class, GPU
    lat = np.maximum(np.where(used[:, 0], c.intra_latency_us, 0.0), np.where(used[:, 1], c.inter_latency_us, 0.0))
    return np.repeat(lat[:, None], 2, axis=1).ravel()


def shrink(mean: np.ndarray, noise: np.ndarray, groups: int) -> np.ndarray:
    """Entries of mean [J] shrunk toward their group's mean (J / groups consecutive entries each)
    by the share of the group's spread that exceeds each entry's noise variance noise [J]."""
    m, v = mean.reshape(groups, -1), noise.reshape(groups, -1)
    centre = m.mean(1, keepdims=True)
    tau2 = np.maximum(m.var(1, keepdims=True) - v.mean(1, keepdims=True), 0.0)
    keep = np.divide(tau2, tau2 + v, out=np.ones_like(v), where=tau2 + v > 0)
    return (centre + keep * (m - centre)).ravel()


def expected_max(mean: np.ndarray, offset: np.ndarray, centred: np.ndarray, weights: np.ndarray, batch: int,
                 variance: float) -> float:
    """Monte Carlo E max_j (B mean_j + offset_j + B sqrt(variance) z_j), z ~ N(0, S) drawn as
    weights [M, n] @ centred [n, J] / sqrt(n) (S the per-token covariance, n its tokens)."""
    z = weights @ centred / np.sqrt(len(centred))
    return float((batch * mean + offset + batch * np.sqrt(variance) * z).max(1).mean())


def vector_estimates(cost: CostModel, e2g: np.ndarray, gpus: np.ndarray, experts: np.ndarray,
                     weights: np.ndarray) -> dict[str, np.ndarray]:
    """shrink, boot (and the plug-in `plain`, a check against raw) per term summed over layers,
    {name: float [3]}; gpus/experts int [n, L, k], weights [M, n] standard normal."""
    n, num_layers, _ = gpus.shape
    batch = cost.model.batch_tokens or n
    home = initial_homes(n, cost.cluster.num_gpus)
    out = {k: np.zeros(3) for k in ("plain", "shrink", "boot", "boot-s")}
    for layer in range(num_layers):
        v = layer_vectors(cost, home, gpus[:, layer], experts[:, layer], e2g[layer])
        for i, (x, offset, groups) in enumerate(((v.compute, v.fixed, 1), (v.dispatch, None, 4), (v.combine, None, 4))):
            mu = x.mean(0)
            off = side_latency(mu, cost) if offset is None else offset
            centred = x - mu
            noise = centred.var(0) / n
            out["plain"][i] += float((batch * mu + off).max())
            shrunk = shrink(mu, noise, groups)
            at_batch = expected_max(mu, off, centred, weights, batch, 1 / batch)
            out["shrink"][i] += expected_max(shrunk, off, centred, weights, batch, 1 / batch)
            out["boot"][i] += 2 * at_batch - expected_max(mu, off, centred, weights, batch, 1 / n + 1 / batch)
            # the max's bias depends on the gaps between GPUs, which the sample mean widens: take
            # it at the shrunk means instead
            out["boot-s"][i] += at_batch - (expected_max(shrunk, off, centred, weights, batch, 1 / n + 1 / batch)
                                            - expected_max(shrunk, off, centred, weights, batch, 1 / batch))
        home = gpus[:, layer, 0]
    return out


def raw_terms(cost: CostModel, gpus: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """costmodel.predict_gpus per term, summed over layers, float [3]."""
    t = predict_gpus(cost, gpus, experts)
    return np.array([t.compute_us.sum(), t.dispatch_us.sum(), t.combine_us.sum()])


def split_terms(cost: CostModel, gpus: np.ndarray, experts: np.ndarray, rng: np.random.Generator,
                halves: int) -> np.ndarray:
    """Split-half Richardson extrapolation (bias ~ 1/sqrt(n)) of raw to a batch of B, float [3]."""
    n = len(gpus)
    full = raw_terms(cost, gpus, experts)
    half = np.mean([raw_terms(cost, gpus[idx], experts[idx])
                    for _ in range(halves) for idx in np.array_split(rng.permutation(n), 2)], axis=0)
    batch = cost.model.batch_tokens or n
    return full - (half - full) / (np.sqrt(2) - 1) * (1 - np.sqrt(n / batch))


def estimates(cost: CostModel, placement: Placement, trace: Trace, weights: dict[int, np.ndarray],
              rng: np.random.Generator, halves: int) -> dict[str, np.ndarray]:
    """Every estimator's per-term figures of placement on trace, {name: float [3]}."""
    gpus, experts = token_gpus(placement, trace), trace.topk_ids.astype(np.int64)
    n = trace.num_tokens
    if n not in weights:
        weights[n] = np.random.default_rng(1234 + n).standard_normal((weights[0].shape[0], n))
    vec = vector_estimates(cost, placement.expert_to_gpu, gpus, experts, weights[n])
    raw = raw_terms(cost, gpus, experts)
    # the vector form must reproduce the cost model exactly when it plugs in the sample mean
    # (the per-expert term differs only where shrinking a share changes 1-(1-p)^B: not on FLAME)
    assert np.allclose(vec["plain"][1:], raw[1:], rtol=1e-9), (vec["plain"], raw)
    return {"raw": raw, "shrink": vec["shrink"], "boot": vec["boot"], "boot-s": vec["boot-s"],
            "split": split_terms(cost, gpus, experts, rng, halves)}


# ---------------------------------------------------------------- sections

def fit_power(sizes: np.ndarray, values: np.ndarray, power: float = 0.5) -> tuple[float, float, float]:
    """Least squares values ~ a + b / sizes^power: (a, b, largest |residual|)."""
    design = np.stack([np.ones(len(sizes)), sizes ** -power], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, values, rcond=None)
    return float(a), float(b), float(np.abs(design @ [a, b] - values).max())


def dispersion(cost: CostModel, placement: Placement, trace: Trace) -> float:
    """Mean over layers and GPUs of var/mean of a token's number of experts on the GPU: 1 - 1/G
    for experts spread at random, larger when a placement keeps a token's k experts together."""
    gpus = token_gpus(placement, trace)
    counts = (gpus[..., None] == np.arange(cost.cluster.num_gpus)).sum(2)  # [T, L, G]
    return float((counts.var(0) / np.maximum(counts.mean(0), 1e-12)).mean())


def sampled(trace: Trace, n: int, reps: int, rng: np.random.Generator, replace: bool) -> list[Trace]:
    if not replace and n >= trace.num_tokens:
        return [trace]
    return [trace.select_tokens(np.sort(rng.choice(trace.num_tokens, n, replace=replace))) for _ in range(reps)]


def section_a(trace: Trace, layouts: dict[str, dict[str, Placement]], costs: dict[str, CostModel], reps: int,
              weights: dict[int, np.ndarray], halves: int) -> None:
    print("\nA. subsets of all 640 tokens without replacement (mean of", reps, "subsets; 1 at 640); us summed over 8 layers")
    for config, named in layouts.items():
        cost = costs[config]
        batch = cost.model.batch_tokens or trace.num_tokens
        print(f"\n[{config}] raw per term (C/D/Cb) by n; fit a + b/sqrt(n): a = infinite tokens, @B = a + b/sqrt({batch})")
        print(f"{'placement':11} {'term':8}" + "".join(f"{n:>8}" for n in SIZES)
              + f"{'a':>8}{'@B':>8}{'bias320':>8}{'resid':>7}{'a(1/n)':>8}{'resid':>7}")
        totals: dict[str, dict[str, np.ndarray]] = {}
        for name, p in named.items():
            rng = np.random.default_rng(0)
            per_n = {e: [] for e in ESTIMATORS}  # type: dict[str, list[np.ndarray]]
            sd_n = {e: [] for e in ESTIMATORS}  # type: dict[str, list[float]]
            for n in SIZES:
                rows = [estimates(cost, p, sub, weights, rng, halves) for sub in sampled(trace, n, reps, rng, False)]
                for e in ESTIMATORS:
                    per_n[e].append(np.mean([r[e] for r in rows], axis=0))
                    sd_n[e].append(float(np.std([r[e].sum() for r in rows])))
            raw = np.array(per_n["raw"])  # [sizes, 3]
            for i, term in enumerate(TERMS + ("total",)):
                col = raw.sum(1) if term == "total" else raw[:, i]
                a, b, res = fit_power(np.array(SIZES, float), col)
                a1, _, res1 = fit_power(np.array(SIZES, float), col, 1.0)
                print(f"{name:11} {term:8}" + "".join(f"{v:8.1f}" for v in col)
                      + f"{a:8.1f}{a + b / np.sqrt(batch):8.1f}{b / np.sqrt(320):8.1f}{res:7.1f}{a1:8.1f}{res1:7.1f}")
            print(f"{name:11} lumpiness: var/mean of a token's expert count per GPU {dispersion(cost, p, trace):.2f}")
            totals[name] = {e: np.array(per_n[e]).sum(1) for e in ESTIMATORS} | {
                f"sd_{e}": np.array(sd_n[e]) for e in ESTIMATORS}
        print(f"\n[{config}] total by estimator (mean; sd over subsets in brackets)")
        print(f"{'placement':11} {'estim':7}" + "".join(f"{n:>15}" for n in SIZES))
        for name, t in totals.items():
            for e in ESTIMATORS:
                print(f"{name:11} {e:7}" + "".join(f"{v:8.1f} ({s:4.1f})" for v, s in zip(t[e], t[f"sd_{e}"])))
        for e in ESTIMATORS:
            order = [" < ".join(sorted(totals, key=lambda k: totals[k][e][j])) for j in range(len(SIZES))]
            print(f"order {e:7}: " + " | ".join(f"n={n}: {o}" for n, o in zip(SIZES, order)))


def section_b(trace: Trace, layouts: dict[str, dict[str, Placement]], costs: dict[str, CostModel], reps: int,
              weights: dict[int, np.ndarray], halves: int) -> None:
    print(f"\nB. world = the trace's 640 tokens, draws with replacement: truth = mean raw of {reps} batches of B;"
          f" estimator mean (sd) over {reps} draws of n, minus truth")
    for config, named in layouts.items():
        cost = costs[config]
        batch = cost.model.batch_tokens or trace.num_tokens
        print(f"\n[{config}] {'placement':11} {'truth':>7} {'estim':7}" + "".join(f"{n:>15}" for n in SIZES))
        for name, p in named.items():
            rng = np.random.default_rng(1)
            truths = np.mean([raw_terms(cost, token_gpus(p, b), b.topk_ids.astype(np.int64))
                              for b in sampled(trace, batch, reps, rng, True)], axis=0)
            truth = float(truths.sum())
            rows = {n: [estimates(cost, p, s, weights, rng, halves) for s in sampled(trace, n, reps, rng, True)]
                    for n in SIZES}
            for i, term in enumerate(TERMS):
                print(f"[{config}] {name:11} {truths[i]:7.1f} raw-{term[:4]} "
                      + "".join(f"{np.mean([r['raw'][i] for r in rows[n]]) - truths[i]:+8.1f}{'':7}" for n in SIZES))
            for e in ESTIMATORS:
                cells = [(np.mean([r[e].sum() for r in rows[n]]) - truth, np.std([r[e].sum() for r in rows[n]]))
                         for n in SIZES]
                print(f"[{config}] {name:11} {truth:7.1f} {e:7}" + "".join(f"{d:+8.1f} ({s:4.1f})" for d, s in cells))


def section_c(trace: Trace, folder: Path, costs: dict[str, CostModel], seeds: int, weights: dict[int, np.ndarray],
              halves: int) -> None:
    print(f"\nC. held-out half (320 tokens) of seeds 0..{seeds - 1}: total us, mean over seeds; "
          "minus traffic: mean (sd over seeds)")
    for config, cost in costs.items():
        values: dict[str, dict[str, list[float]]] = {}
        for seed in range(seeds):
            _, held_idx = split_tokens(trace.num_tokens, 0.5, seed)
            held = trace.select_tokens(held_idx)
            named = {"contiguous": contiguous(trace, config)} | {
                o: get_placement(folder, trace, config, o, seed) for o in OBJECTIVES}
            rng = np.random.default_rng(seed)
            for name, p in named.items():
                est = estimates(cost, p, held, weights, rng, halves)
                for e in ESTIMATORS:
                    values.setdefault(name, {}).setdefault(e, []).append(float(est[e].sum()))
        print(f"\n[{config}] {'placement':11}" + "".join(f"{e:>18}" for e in ESTIMATORS))
        for name, v in values.items():
            cells = []
            for e in ESTIMATORS:
                d = np.array(v[e]) - np.array(values["traffic"][e])
                diff = "" if name == "traffic" else f" {d.mean():+5.1f}({d.std(ddof=1):4.1f})"
                cells.append(f"{np.mean(v[e]):7.1f}{diff}")
            print(f"[{config}] {name:11}" + "".join(f"{c:>18}" for c in cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default=str(ROOT / "traces/flame-moe-290m-decoder.npz"))
    ap.add_argument("--placements", default="/tmp/moeplace_costbias", help="folder of cached solves")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=20, help="subsets / draws per size")
    ap.add_argument("--draws", type=int, default=256, help="Monte Carlo draws of the Gaussian estimators")
    ap.add_argument("--halves", type=int, default=4, help="random half-splits per split estimate")
    ap.add_argument("--sections", default="ABC")
    args = ap.parse_args()
    t0 = time.monotonic()
    trace = load_trace(args.trace)
    folder = Path(args.placements)
    costs = {c: load_cost_model(f, MODEL) for c, (f, _, _) in CONFIGS.items()}
    weights = {0: np.zeros((args.draws, 0))}
    layouts = {c: {"contiguous": contiguous(trace, c)} | {o: get_placement(folder, trace, c, o, 0) for o in OBJECTIVES}
               for c in CONFIGS}
    steps: dict[str, Callable[[], None]] = {
        "A": lambda: section_a(trace, layouts, costs, args.reps, weights, args.halves),
        "B": lambda: section_b(trace, layouts, costs, args.reps, weights, args.halves),
        "C": lambda: section_c(trace, folder, costs, args.seeds, weights, args.halves),
    }
    for s in args.sections:
        steps[s]()
        print(f"[{time.monotonic() - t0:.0f} s]")


if __name__ == "__main__":
    main()
