"""The `balance` objective: minimise each layer's max token load per GPU, with optional replicas.

For load-only inputs (SGLang `stat` dumps, per-layer count files) this is the only objective.
Load model: the serving rule of eval/metrics.serve_layer on aggregate loads (`layer_loads`):
without token positions every token of a replicated expert goes to its least-loaded copy, so an
expert's load fills its copies' GPUs to a common level. Per layer, with w [E] the expert loads,
x[e, g] = 1 when GPU g holds a copy of e and f[e, g] the load it serves:

    min  T
    s.t. sum_g f[e, g] = w[e],   f[e, g] <= w[e] x[e, g],   sum_g x[e, g] >= 1
         sum_{e, g} x[e, g] = E + R                 exactly R redundant copies
         sum_e x[e, g] <= S                         slots per GPU
         sum_e f[e, g] <= T                         load of GPU g
         sum_e x[e, g] >= 1                         every GPU serves (when E + R >= G)
         x[e, g] = 0 for g > rank(e)                without replicas: symmetry breaking
    (S = ceil((E + R) / G), or the --max-experts-per-gpu cap; rank(e) = e's place in decreasing
    load). GPUs are interchangeable within a layer, so labelling them in the order of the
    heaviest expert each holds keeps an optimum; without it HiGHS explores all G! relabellings
    (16 x 8 layers with free counts: 5.4-9.6 s -> 0.1-1.1 s to prove). With replicas two GPUs
    can share their heaviest expert, so the cut would not be valid there.

With a total cap C (--max-experts-per-gpu-total) per-layer counts may differ between GPUs
(MoETuner) as long as sum_l sum_e x[l, e, g] <= C: each layer is solved with free counts (a
relaxation, so its bounds stay valid), GPUs are relabelled per layer so that totals balance (the
objective is blind to GPU names within a layer), and while a GPU is over C the copy move to a GPU
under C that raises its layer's max/mean load least is made (`fit_total_cap`).

HiGHS solves it where small (ILP_CANDIDATE_MAX_VARS: a candidate only when proven optimal; when
its time runs out first the placement says stopped_by_time_limit, as a faster machine could have
had one more candidate) and gives a dual bound up to ILP_MAX_VARS; LPT on EPLB's replica
counts and EPLB itself (both policies, when its topology rules allow) give further candidates,
each improved by swap / re-replication descent, and a layer keeps the best under the serving
rule. Lower bound per layer: the ILP's dual
bound, and always max(mean load, least max load per replica for R replicas) (EPLB's
replication rule is optimal for the latter); without replicas, on integer loads (token counts),
rounded up, since every GPU's load is then an integer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import highspy
import numpy as np
import pulp

from moeplace.errors import PlacementError
from moeplace.options import plural
from moeplace.placement import Placement
from moeplace.progress import Progress
from moeplace.solve import eplb, ilp

IMPROVE_MAX_EXPERTS = 64  # per layer; the descent is quadratic in experts
ILP_MAX_VARS = 4096  # per layer; above this the heuristics alone (HiGHS would prove little)
# Per layer, at most this many variables: the ILP is also a candidate, given the layer's whole
# share of the time. Above, it only gives a bound within 1 s: whether HiGHS proves optimality in
# time depends on the machine (64 x 8 layers sit at ~1 s), so as a candidate it would make the
# placement depend on the machine's speed too.
ILP_CANDIDATE_MAX_VARS = 256


@dataclass
class LayerPlan:
    copies: list[list[int]]  # GPUs of each expert's copies, primary first
    max_load: float
    bound: float
    method: str


def expected_gpu_loads(placement: Placement, loads: np.ndarray) -> np.ndarray:
    """Token load per GPU under the serving rule without token paths, float [L, G] (see layer_loads)."""
    return np.stack([layer_loads(loads[layer], placement.holders(layer), placement.num_gpus)
                     for layer in range(placement.num_layers)])


def layer_loads(weight: np.ndarray, copies: list[list[int]], num_gpus: int, passes: int = 50) -> np.ndarray:
    """Load per GPU of one layer, float [G]: least-loaded serving on aggregate loads.

    A load-only input has no token positions, so every token of a replicated expert is free to
    go to its least-loaded copy (eval/metrics.serve_layer's last rule). Single-copy experts load
    their GPU; experts with several copies, heaviest first, fill their copies' GPUs to a common
    level; then each re-fills given the others until nothing moves (the balanced split: no
    token could move to a less loaded copy).
    """
    # Plain Python floats: the experts hold 2-3 copies each, where numpy's per-call overhead
    # would dominate (improve_layer calls this once per trial move).
    load = [0.0] * num_gpus
    multi = []
    for e, gpus in enumerate(copies):
        if len(gpus) == 1:
            load[gpus[0]] += float(weight[e])
        else:
            multi.append(e)
    multi.sort(key=lambda e: (-weight[e], e))
    share = {e: [0.0] * len(copies[e]) for e in multi}
    tolerance = 1e-9 * max(float(weight.sum()), 1.0)
    for _ in range(passes if multi else 0):
        moved = 0.0
        for e in multi:
            gpus, old = copies[e], share[e]
            base = [load[g] - s for g, s in zip(gpus, old)]
            new = [f - b for f, b in zip(_fill(base, float(weight[e])), base)]
            moved = max(moved, max(abs(n - o) for n, o in zip(new, old)))
            for g, b, n in zip(gpus, base, new):
                load[g] = b + n
            share[e] = new
        if moved <= tolerance:
            break
    return np.array(load)


def _fill(level: list[float], amount: float) -> list[float]:
    """Pour `amount` into bins at `level` [c], lowest first, to a common level. [c]"""
    lv = sorted(level)
    below = sum(lv)
    for m in range(len(lv), 0, -1):
        top = (amount + below) / m
        if top >= lv[m - 1]:
            return [max(x, top) for x in level]
        below -= lv[m - 1]
    return list(level)  # unreachable: m = 1 always qualifies


def slots_per_gpu(num_experts: int, num_gpus: int, redundant: int, max_experts_per_gpu: int | None = None) -> int:
    """Physical expert slots a GPU may hold per layer."""
    need = math.ceil((num_experts + redundant) / num_gpus)
    if max_experts_per_gpu is None:
        return need
    if max_experts_per_gpu < need:
        raise PlacementError(
            f"--max-experts-per-gpu {max_experts_per_gpu} cannot hold {num_experts} experts + {redundant} "
            f"redundant over {plural(num_gpus, 'GPU')} (needs >= {need})"
        )
    return max_experts_per_gpu


def replication_bound(weight: np.ndarray, num_gpus: int, redundant: int) -> float:
    """A valid lower bound on one layer's max GPU load: max(mean, least possible max load per replica)."""
    if redundant == 0:
        per_replica = weight.max()
    else:
        _, _, logcnt = eplb.replicate_experts(weight[None, :], len(weight) + redundant)
        per_replica = (weight / logcnt[0]).max()  # uncapped counts: a relaxation, so still a bound
    return float(max(weight.sum() / num_gpus, per_replica))


def lpt_layer(weight: np.ndarray, num_gpus: int, slots: int, redundant: int) -> list[list[int]]:
    """Heuristic: EPLB's replica counts (capped at G), then heaviest replica to the lightest GPU
    with room that holds no copy of the same expert (longest processing time first)."""
    num_experts = len(weight)
    _, _, logcnt = eplb.replicate_experts(weight[None, :], num_experts + redundant)
    count = np.minimum(logcnt[0], num_gpus)
    extra = num_experts + redundant - count.sum()  # copies lost to the cap: give them to the next hottest
    while extra > 0:
        room = np.flatnonzero(count < num_gpus)
        e = room[np.argmax(weight[room] / count[room])]
        count[e] += 1
        extra -= 1
    items = [(weight[e] / count[e], e) for e in range(num_experts) for _ in range(count[e])]
    items.sort(key=lambda it: (-it[0], it[1]))
    load, used = np.zeros(num_gpus), np.zeros(num_gpus, dtype=np.int64)
    copies: list[list[int]] = [[] for _ in range(num_experts)]
    for w, e in items:
        ok = np.flatnonzero((used < slots) & ~np.isin(np.arange(num_gpus), copies[e]))
        g = int(ok[np.lexsort((used[ok], load[ok]))[0]])  # ties to the emptiest: zero-load experts spread
        copies[e].append(g)
        load[g] += w
        used[g] += 1
    return copies


def improve_layer(weight: np.ndarray, copies: list[list[int]], num_gpus: int, slots: int, lower: float = 0.0,
                  deadline: float = float("inf"), current: np.ndarray | None = None,
                  max_moves: int | None = None) -> list[list[int]]:
    """Steepest descent on (max load, sum of squared loads) with moves off the most loaded GPU:
    swap one of its copies with a copy elsewhere, or hand its slot of an expert with several
    copies to another expert (re-replication). Slot counts per GPU never change.

    With `current` (bool [E, G], the deployed copies) and `max_moves`, only layouts with at most
    max_moves copies that `current` lacks are taken (`copies` must be one), and a copy may also
    relocate to a GPU with a free slot (counts may then change: from CURRENT's counts a single
    relocation is often the only one-move step).

    Each step scores all its moves at once (`batch_layer_loads`), the current layout with them,
    so every comparison uses the same arithmetic.
    """
    copies = [list(c) for c in copies]
    if time.monotonic() > deadline:  # before scoring the start: 0.16 s a layout at 64 x 64 (+R 64)
        return copies
    num_experts = len(weight)
    cur = batch_layer_loads(weight, _holds(copies, num_gpus)[None], num_gpus)[0]
    best_key = _keys(cur[None])[0]
    for _ in range(8 * (num_experts + slots * num_gpus)):
        if cur.max() <= lower * (1 + 1e-9) or time.monotonic() > deadline:
            break  # provably optimal, or out of time
        hi = int(np.argmax(cur))
        moves: list[tuple[int, int, list[int], list[int]]] = []
        for e in [e for e in range(num_experts) if hi in copies[e]]:
            for f in range(num_experts):
                if f == e or hi in copies[f]:
                    continue
                for g in copies[f]:  # swap: e's copy on hi <-> f's copy on g
                    if g not in copies[e]:
                        moves.append((e, f, [g if x == hi else x for x in copies[e]],
                                      [hi if x == g else x for x in copies[f]]))
                if len(copies[e]) > 1 and len(copies[f]) < num_gpus:  # re-replication: hi's slot e -> f
                    moves.append((e, f, [x for x in copies[e] if x != hi], copies[f] + [hi]))
            if current is not None:  # relocation: e's copy on hi -> a GPU with a free slot
                used = np.bincount([g for c in copies for g in c], minlength=num_gpus)
                for g in range(num_gpus):
                    if used[g] < slots and g not in copies[e]:
                        ce = [g if x == hi else x for x in copies[e]]
                        moves.append((e, e, ce, ce))
        if not moves:
            break
        holds = np.repeat(_holds(copies, num_gpus)[None], len(moves), axis=0)
        for t, (e, f, ce, cf) in enumerate(moves):
            holds[t, e], holds[t, f] = False, False
            holds[t, e, ce], holds[t, f, cf] = True, True
        if current is not None and max_moves is not None:  # keep the layouts within the move limit
            keep = np.flatnonzero((holds & ~current).sum((1, 2)) <= max_moves)
            if keep.size == 0:
                break
            moves, holds = [moves[t] for t in keep], holds[keep]
        loads = batch_layer_loads(weight, holds, num_gpus)
        keys = _keys(loads)
        t = int(np.lexsort((np.arange(len(moves)), keys[:, 1], keys[:, 0]))[0])  # ties: first move
        if tuple(keys[t]) >= tuple(best_key):
            break
        e, f, ce, cf = moves[t]
        copies[e], copies[f] = ce, cf
        best_key, cur = keys[t], loads[t]
    return copies


def _holds(copies: list[list[int]], num_gpus: int) -> np.ndarray:
    """bool [E, G]: GPU g holds a copy of expert e."""
    holds = np.zeros((len(copies), num_gpus), dtype=bool)
    for e, gpus in enumerate(copies):
        holds[e, gpus] = True
    return holds


def _keys(loads: np.ndarray) -> np.ndarray:
    """Descent keys of loads [T, G]: float [T, 2] = (max rounded to 1e-9, sum of squares)."""
    return np.stack([np.round(loads.max(1), 9), (loads ** 2).sum(1)], axis=1)


def batch_layer_loads(weight: np.ndarray, holds: np.ndarray, num_gpus: int, passes: int = 50) -> np.ndarray:
    """`layer_loads` of T layouts of one layer at once: holds bool [T, E, G] -> loads float [T, G].

    The same Gauss-Seidel split, vectorised over layouts: step p of a pass re-fills, in every
    layout, its p-th heaviest expert with several copies; a layout stops when a pass moves
    nothing, as layer_loads does alone, so its result does not depend on the rest of the batch.
    """
    weight = np.asarray(weight, dtype=float)
    num_layouts, num_experts, _ = holds.shape
    count = holds.sum(2)  # [T, E] copies
    load = np.einsum("teg,e->tg", (holds & (count == 1)[:, :, None]).astype(float), weight)  # [T, G]
    multi = count > 1
    rank = np.empty(num_experts, dtype=np.int64)
    rank[np.lexsort((np.arange(num_experts), -weight))] = np.arange(num_experts)  # heaviest first
    steps = int(multi.sum(1).max(initial=0))
    by_rank = np.argsort(np.where(multi, rank, num_experts), axis=1, kind="stable")[:, :steps]  # [T, P]
    present = np.take_along_axis(multi, by_rank, axis=1)  # [T, P]: the layout has a p-th such expert
    share = np.zeros((num_layouts, steps, num_gpus))
    active = multi.any(1)
    tolerance = 1e-9 * max(float(weight.sum()), 1.0)
    for _ in range(passes):
        if not active.any():
            break
        moved = np.zeros(num_layouts)
        for p in range(steps):
            rows = np.flatnonzero(active & present[:, p])
            if rows.size == 0:
                continue
            experts = by_rank[rows, p]
            old = share[rows, p]
            base = load[rows] - old
            new = _fill_rows(base, holds[rows, experts], weight[experts])
            moved[rows] = np.maximum(moved[rows], np.abs(new - old).max(1))
            load[rows] = base + new
            share[rows, p] = new
        active &= moved > tolerance
    return load


def _fill_rows(base: np.ndarray, mask: np.ndarray, amount: np.ndarray) -> np.ndarray:
    """`_fill` per row: pour amount [R] into the masked bins of base [R, G] to a common level;
    returns what each bin received, float [R, G] (0 off the mask)."""
    num = base.shape[1]
    level = np.sort(np.where(mask, base, np.inf), axis=1)
    count = mask.sum(1)
    inside = np.arange(num)[None, :] < count[:, None]
    top = (amount[:, None] + np.cumsum(np.where(inside, level, 0.0), axis=1)) / np.arange(1, num + 1)
    fits = (top >= level) & inside  # pouring into the m lowest bins stays above the m-th
    m = num - 1 - np.argmax(fits[:, ::-1], axis=1)  # the most bins that fit (1 always does)
    surface = top[np.arange(len(top)), m]
    return np.where(mask, np.maximum(base, surface[:, None]) - base, 0.0)


def ilp_layer(weight: np.ndarray, num_gpus: int, slots: int, redundant: int,
              time_limit: float, current: np.ndarray | None = None,
              max_moves: int | None = None) -> tuple[list[list[int]] | None, float, bool]:
    """The model of the module docstring for one layer: (copies or None, dual bound, whether the
    time limit stopped HiGHS). With `current` (bool [E, G]) and `max_moves`: one more constraint,
    sum of x[e, g] over the copies `current` lacks <= max_moves, and no symmetry cut (the GPU
    names are fixed by CURRENT's)."""
    num_experts = len(weight)
    experts, gpus = range(num_experts), range(num_gpus)
    prob = pulp.LpProblem("balance", pulp.LpMinimize)
    # the symmetry cut's last GPU per expert: its rank in decreasing load (ties by expert id, so
    # the model is the same on every run); none with replicas or a move limit
    last = (np.argsort(np.argsort(-weight, kind="stable"), kind="stable")
            if redundant == 0 and current is None else None)
    # binary, fixed at 0 past `last` (PuLP's "Binary" would reset that bound to 1)
    x = {(e, g): pulp.LpVariable(f"x_{e}_{g}", lowBound=0, upBound=int(last is None or g <= last[e]), cat="Integer")
         for e in experts for g in gpus}
    f = {(e, g): pulp.LpVariable(f"f_{e}_{g}", lowBound=0) for e in experts for g in gpus}
    top = pulp.LpVariable("T", lowBound=0)
    limited = current is not None and max_moves is not None
    # with a move limit, fewer moves break ties between equal max loads: eps per move, so small
    # that the max load found is within eps x (E + R) of the least, and the bound corrected by it
    eps = 1e-7 * float(weight.sum()) / num_gpus if limited else 0.0
    lacks = np.zeros((num_experts, num_gpus), dtype=bool) if current is None else ~current
    moved = pulp.lpSum(x[e, g] for e in experts for g in gpus if lacks[e, g])
    prob += top + eps * moved if limited else top
    for e in experts:
        prob += pulp.lpSum(f[e, g] for g in gpus) == float(weight[e])
        prob += pulp.lpSum(x[e, g] for g in gpus) >= 1
        for g in gpus:
            prob += f[e, g] <= float(weight[e]) * x[e, g]
    prob += pulp.lpSum(x.values()) == num_experts + redundant
    for g in gpus:
        prob += pulp.lpSum(x[e, g] for e in experts) <= slots
        if num_experts + redundant >= num_gpus:
            prob += pulp.lpSum(x[e, g] for e in experts) >= 1
        prob += pulp.lpSum(f[e, g] for e in experts) <= top
    prob += top >= replication_bound(weight, num_gpus, redundant)  # a valid cut that tightens the LP
    if limited:
        prob += moved <= max_moves
    prob.solve(ilp.highs(max(time_limit, 0.05)))
    bound = _dual_bound(prob) - eps * min(max_moves or 0, num_experts + redundant)
    status = ilp.highs_status(prob)
    timed_out = status == highspy.HighsModelStatus.kTimeLimit
    # A time-limited incumbent would make the placement depend on the machine's speed: only a
    # proven optimum is a candidate (the dual bound stays valid either way).
    if top.varValue is None or status != highspy.HighsModelStatus.kOptimal:
        return None, bound, timed_out
    copies = [[g for g in gpus if (x[e, g].varValue or 0) > 0.5] for e in experts]
    if any(len(c) == 0 for c in copies):
        return None, bound, timed_out
    return copies, bound, timed_out


def _dual_bound(prob: pulp.LpProblem) -> float:
    try:
        return float(prob.solverModel.getInfo().mip_dual_bound)
    except AttributeError:
        return 0.0


def layer_max_load(weight: np.ndarray, copies: list[list[int]], num_gpus: int) -> float:
    return float(layer_loads(weight, copies, num_gpus).max())


def total_slots_per_gpu(num_layers: int, num_experts: int, num_gpus: int, redundant: int, cap: int,
                        max_experts_per_gpu: int | None = None) -> int:
    """Check a total cap C (copies per GPU over all layers); return the per-layer slot cap, which
    is free (every other GPU keeps one copy) unless --max-experts-per-gpu sets it."""
    copies = num_experts + redundant
    if cap * num_gpus < num_layers * copies:
        raise PlacementError(
            f"--max-experts-per-gpu-total {cap} x {plural(num_gpus, 'GPU')} cannot hold {num_layers} layers x {copies} "
            f"expert copies (needs >= {math.ceil(num_layers * copies / num_gpus)})"
        )
    free = max(math.ceil(copies / num_gpus), copies - num_gpus + 1)
    return free if max_experts_per_gpu is None else slots_per_gpu(num_experts, num_gpus, redundant, max_experts_per_gpu)


def balance_placement(loads: np.ndarray, num_gpus: int, gpus_per_node: int, redundant: int = 0,
                      time_limit: float = 30.0, max_experts_per_gpu: int | None = None, num_groups: int = 1,
                      progress: bool = False, max_experts_per_gpu_total: int | None = None,
                      tight_bound: bool = True) -> Placement:
    """Solve `balance` for loads float [L, E]: a Placement with bound, gap and EPLB comparison.

    1. per layer, candidates: LPT, EPLB (hierarchical and global when its rules allow; freed
       duplicate slots refilled) and the ILP when small enough (ILP_CANDIDATE_MAX_VARS) and
       proven optimal within its share of the time limit; larger ILPs (up to ILP_MAX_VARS) only
       give a bound;
    2. each improved by `improve_layer` (up to IMPROVE_MAX_EXPERTS experts), the best kept under
       `layer_loads`: never worse than EPLB's candidates; once a candidate sits at the lower
       bound (as given, else after its descent), no further one is descended: it is optimal;
    3. with max_experts_per_gpu_total, `fit_total_cap` makes the free per-layer counts fit it;
    4. objective = mean over layers of max / mean GPU load; bound from the per-layer bounds.
    The placement is deterministic unless the time limit cut a step short (recorded as
    solver.stopped_by_time_limit, and which in solver.cut_steps: "ilp", a candidate ILP without
    its proof; "descent"; "total cap", step 3's descent); the ILP's
    dual bound, hence the reported gap, may be tighter on a faster machine. tight_bound=False
    skips the bound-only ILPs (up to 1 s a layer): the same placement, with the replication
    bound only, for callers that use the placement and not its gap (the latency objective's start).
    """
    num_layers, num_experts = loads.shape
    if redundant > num_experts * (num_gpus - 1):
        raise PlacementError(f"--redundant-experts {redundant}: at most {num_experts * (num_gpus - 1)} copies "
                             f"fit {plural(num_gpus, 'GPU')} without two copies of one expert on a GPU")
    total_cap = max_experts_per_gpu_total
    if total_cap is not None:
        slots = total_slots_per_gpu(num_layers, num_experts, num_gpus, redundant, total_cap, max_experts_per_gpu)
    else:
        slots = slots_per_gpu(num_experts, num_gpus, redundant, max_experts_per_gpu)
        if max_experts_per_gpu is None and redundant == 0 and num_experts % num_gpus:
            raise PlacementError(
                f"{num_experts} experts per layer cannot be split equally over {num_gpus} GPUs; pass "
                f"--max-experts-per-gpu, --max-experts-per-gpu-total or --redundant-experts to fill the slots"
            )
    if slots * num_gpus < num_experts + redundant:
        raise PlacementError(f"{plural(num_gpus, 'GPU')} x {slots} slots cannot hold {num_experts + redundant} expert "
                             "copies")
    start = time.monotonic()
    deadline = start + time_limit * (0.8 if total_cap is not None else 1.0)  # the rest: step 3
    eplb_layers = _eplb_candidates(loads, num_gpus, gpus_per_node, redundant, num_groups, slots)
    plans: list[LayerPlan] = []
    cut: set[str] = set()  # the steps the time limit cut short: "ilp", "descent", "total cap"
    bar = Progress("balance", total=num_layers, enabled=progress)
    nvars = 2 * num_experts * num_gpus
    for layer in range(num_layers):
        w = loads[layer]
        # `lower` steers the search (early exits), so it takes no bound that the clock decides;
        # `bound`, reported, also takes a time-limited ILP's dual bound
        lower = bound = replication_bound(w, num_gpus, redundant)
        candidates = [(lpt_layer(w, num_gpus, slots, redundant), "lpt")]
        candidates += [(c[layer], name) for name, c in eplb_layers.items()]
        left = deadline - time.monotonic()
        candidate_ilp = nvars <= ILP_CANDIDATE_MAX_VARS
        if candidate_ilp and left <= 0:
            cut.add("ilp")
        if nvars <= ILP_MAX_VARS and left > 0 and (candidate_ilp or tight_bound):
            share = left / (num_layers - layer)
            copies, ilp_bound, timed_out = ilp_layer(w, num_gpus, slots, redundant,
                                                     share if candidate_ilp else min(1.0, share))
            bound = max(bound, ilp_bound)
            if candidate_ilp:
                if timed_out:  # a faster machine might have proven it: another candidate
                    cut.add("ilp")
                lower = bound
                if copies is not None:
                    candidates.append((copies, "ilp"))
        scored = [(layer_max_load(w, c, num_gpus), i, c, m) for i, (c, m) in enumerate(candidates)]
        if num_experts <= IMPROVE_MAX_EXPERTS and not any(s[0] <= lower * (1 + 1e-9) for s in scored):
            stop = time.monotonic() + max(deadline - time.monotonic(), 0.0) / (num_layers - layer)
            improved = []
            for _, i, c, m in scored:
                c = improve_layer(w, c, num_gpus, slots, lower, stop)
                improved.append((layer_max_load(w, c, num_gpus), i, c, m))
                if improved[-1][0] <= lower * (1 + 1e-9):
                    break  # at the bound: provably optimal, the other candidates cannot beat it
            scored = improved
            if time.monotonic() > stop:  # a descent may have stopped before its last move
                cut.add("descent")
        best, _, copies, method = min(scored, key=lambda s: (s[0], s[1]))
        plans.append(LayerPlan(copies, best, min(bound, best), method))
        bar.update(layer + 1, f"layer {layer + 1}/{num_layers}")
    bar.close()
    if total_cap is not None:
        plans = fit_total_cap(plans, loads, num_gpus, slots, total_cap, deadline + 0.2 * time_limit)
        if time.monotonic() > deadline + 0.2 * time_limit:
            cut.add("total cap")
    placement = _to_placement(plans, loads, num_gpus, gpus_per_node, redundant, slots, total_cap)
    placement.solver.update({"time_limit_s": time_limit, "seconds": round(time.monotonic() - start, 3),
                             "stopped_by_time_limit": bool(cut),  # else deterministic: no step reads the clock
                             "cut_steps": sorted(cut)})
    return placement


def copy_counts(plans: list[LayerPlan], num_gpus: int) -> np.ndarray:
    """Expert copies per GPU per layer, int [L, G]."""
    return np.array([np.bincount([g for c in p.copies for g in c], minlength=num_gpus) for p in plans])


def fit_total_cap(plans: list[LayerPlan], loads: np.ndarray, num_gpus: int, slots: int, cap: int,
                  deadline: float = float("inf")) -> list[LayerPlan]:
    """Make per-layer plans with free copy counts hold at most `cap` copies per GPU in total.

    1. relabel GPUs per layer, most uneven layer first: its fullest GPU takes the label with the
       fewest copies so far (a layer's loads do not depend on which GPU is called what);
    2. while some GPU h is over the cap, move one copy off h (from a layer where h keeps another)
       to a GPU under the cap with room and no copy of that expert, choosing the move that raises
       its layer's max / mean load least (copy share: load / copies);
    3. re-run `improve_layer` (counts fixed) on the layers step 2 changed.
    """
    plans = [LayerPlan([list(c) for c in p.copies], p.max_load, p.bound, p.method) for p in plans]
    counts = copy_counts(plans, num_gpus)
    total = np.zeros(num_gpus, dtype=np.int64)
    for layer in np.argsort(counts.min(1) - counts.max(1), kind="stable"):
        label = np.empty(num_gpus, dtype=np.int64)
        label[np.argsort(-counts[layer], kind="stable")] = np.argsort(total, kind="stable")
        plans[layer].copies = [[int(label[g]) for g in c] for c in plans[layer].copies]
        counts[layer, label] = counts[layer].copy()
        total += counts[layer]
    layer_load = [layer_loads(loads[layer], p.copies, num_gpus) for layer, p in enumerate(plans)]
    mean = np.maximum(loads.sum(axis=1) / num_gpus, 1e-12)
    changed: set[int] = set()
    while total.max() > cap:
        h = int(np.argmax(total))
        best: tuple[float, int, int, int] | None = None  # (rise in max / mean, layer, expert, to GPU)
        for layer in np.flatnonzero(counts[:, h] >= 2):
            load, w, copies = layer_load[layer], loads[layer], plans[layer].copies
            room = (counts[layer] < slots) & (total < cap)
            for e in [e for e, c in enumerate(copies) if h in c]:
                ok = room.copy()
                ok[copies[e]] = False
                if not ok.any():
                    continue
                g = int(np.flatnonzero(ok)[np.argmin(load[ok])])
                share = w[e] / len(copies[e])
                rest = np.delete(load, [h, g])
                new_max = max(rest.max(initial=0.0), load[h] - share, load[g] + share)
                rise = (new_max - load.max()) / mean[layer]
                if best is None or rise < best[0]:
                    best = (rise, int(layer), e, g)
        if best is None:
            raise PlacementError(f"cannot move a copy off GPU {h} to fit --max-experts-per-gpu-total {cap} "
                                 f"(per-layer slots {slots})")
        _, layer, e, g = best
        copies = plans[layer].copies
        copies[e][copies[e].index(h)] = g
        counts[layer, h] -= 1
        counts[layer, g] += 1
        total[h] -= 1
        total[g] += 1
        layer_load[layer] = layer_loads(loads[layer], copies, num_gpus)
        changed.add(layer)
    for layer in sorted(changed):
        p, w = plans[layer], loads[layer]
        if loads.shape[1] <= IMPROVE_MAX_EXPERTS:
            p.copies = improve_layer(w, p.copies, num_gpus, slots, p.bound, deadline)
        p.max_load = layer_max_load(w, p.copies, num_gpus)
        p.method += "+cap"
    return plans


def _eplb_candidates(loads: np.ndarray, num_gpus: int, gpus_per_node: int, redundant: int, num_groups: int,
                     slots: int) -> dict[str, list[list[list[int]]]]:
    """EPLB's per-layer copies under each policy its topology rules allow."""
    out: dict[str, list[list[list[int]]]] = {}
    num_experts = loads.shape[1]
    if (num_experts + redundant) % num_gpus or (num_experts + redundant) // num_gpus > slots:
        return out
    for policy in eplb.POLICIES:
        try:
            p, _ = eplb.eplb_placement(loads, num_gpus, gpus_per_node, redundant, num_groups, policy)
        except PlacementError:
            continue
        out[f"eplb-{policy}"] = [_fill_free_slots(loads[layer], p.holders(layer), num_gpus, slots, num_experts + redundant)
                                 for layer in range(p.num_layers)]
    return out


def _fill_free_slots(weight: np.ndarray, copies: list[list[int]], num_gpus: int, slots: int, total: int) -> list[list[int]]:
    """Give slots left free (EPLB's merged duplicates) to the experts with the most load per copy,
    on the least-loaded GPU with room that holds none of their copies."""
    copies = [list(c) for c in copies]
    used = np.bincount([g for c in copies for g in c], minlength=num_gpus)
    for _ in range(total - int(used.sum())):
        load = layer_loads(weight, copies, num_gpus)
        for e in np.argsort([-weight[e] / len(c) for e, c in enumerate(copies)], kind="stable"):
            room = [g for g in np.argsort(load, kind="stable") if used[g] < slots and g not in copies[e]]
            if room:
                copies[e].append(int(room[0]))
                used[room[0]] += 1
                break
    return copies


def _to_placement(plans: list[LayerPlan], loads: np.ndarray, num_gpus: int, gpus_per_node: int, redundant: int,
                  slots: int, total_cap: int | None = None) -> Placement:
    mean = loads.sum(axis=1) / num_gpus
    safe = np.where(mean > 0, mean, 1.0)
    # a layer with no load (a dense layer recorded as zeros) is balanced: 1.0, as eval.metrics.imbalance says
    ratio = np.where(mean > 0, np.array([p.max_load for p in plans]) / safe, 1.0)
    bound = np.array([p.bound for p in plans])
    if redundant == 0 and np.array_equal(loads, np.round(loads)):
        bound = np.ceil(bound - 1e-6)  # each GPU's load is a sum of whole expert loads: an integer
    bound = np.where(mean > 0, bound / safe, 1.0)
    obj, lb = float(ratio.mean()), float(bound.mean())
    e2g = np.array([[c[0] for c in p.copies] for p in plans], dtype=np.int64)
    replicas = [[(e, g) for e, c in enumerate(p.copies) for g in c[1:]] for p in plans]
    methods = [p.method for p in plans]
    return Placement(
        e2g, num_gpus, gpus_per_node, replicas,
        objective={"name": "balance", "value": obj, "definition": "mean over layers of max/mean token load per GPU",
                   "load_model": "least-loaded serving over replicas (layer_loads)"},
        solver={"method": "balance-ilp+lpt+eplb", "redundant_experts": redundant, "slots_per_gpu": slots,
                "max_experts_per_gpu_total": total_cap,
                "layer_methods": {m: methods.count(m) for m in sorted(set(methods))}},
        bound=lb,
        gap=(obj - lb) / obj if obj > 0 else 0.0,
        metrics={"imbalance_per_layer": ratio.tolist(), "imbalance_mean": obj, "imbalance_max": float(ratio.max())},
        fit_loads=loads,
    )


def copy_moves(copies: list[list[int]], current: list[list[int]]) -> int:
    """One layer's moves: (expert, GPU) copies of `copies` that `current` does not have (each a
    transfer of the expert's weights to that GPU; which copy is the primary does not count)."""
    return sum(len(set(c) - set(k)) for c, k in zip(copies, current))


def check_current_copies(current: Placement, num_experts: int, redundant: int, slots: int) -> None:
    """--max-moves starts from CURRENT's copies: refuse, in one line, a CURRENT whose layers do not
    hold E + R copies within this solve's slots per GPU (N = 0 must be a valid result)."""
    for layer in range(current.num_layers):
        held = current.holders(layer)
        count = sum(len(c) for c in held)
        if count != num_experts + redundant:
            raise PlacementError(f"--max-moves: CURRENT's layer {layer} holds {count} expert copies, this solve "
                                 f"{num_experts + redundant} ({num_experts} experts + --redundant-experts {redundant}): "
                                 "give the --redundant-experts CURRENT was solved with")
        used = np.bincount([g for c in held for g in c], minlength=current.num_gpus)
        if used.max() > slots or any(len(set(c)) < len(c) for c in held):
            raise PlacementError(f"--max-moves: CURRENT's layer {layer} puts {int(used.max())} copies on a GPU (or two "
                                 f"copies of an expert on one), over this solve's {slots} slots per GPU: raise "
                                 "--max-experts-per-gpu")


def _like_current(copies: list[list[int]], current: list[list[int]]) -> list[list[int]]:
    """Copies ordered as CURRENT's (kept ones first, CURRENT's primary first when kept), new ones after."""
    return [[g for g in k if g in c] + [g for g in c if g not in k] for c, k in zip(copies, current)]


def balance_moves_placement(loads: np.ndarray, num_gpus: int, gpus_per_node: int, redundant: int,
                            time_limit: float, max_experts_per_gpu: int | None, current: Placement,
                            max_moves: int, progress: bool = False) -> Placement:
    """`balance` that moves at most `max_moves` copies per layer away from CURRENT (--max-moves N).

    A move is an (expert, GPU) copy of the result that CURRENT's layer does not have (`copy_moves`).
    1. the plain balance solve (half the time limit), renamed by the one GPU permutation of all
       layers that keeps the most copies where CURRENT has them (migrate.best_copy_relabeling):
       the result is then written in CURRENT's GPU names, and moves are counted against them;
    2. per layer, candidates: CURRENT itself (0 moves), the renamed plain layer when it moves at
       most N, and the ILP with the move constraint (ilp_layer, where small enough and proven);
       each improved by improve_layer keeping at most N moves; the least max load wins, ties
       (within 1e-6 of the mean load) to fewer moves. N >= the plain layer's moves gives at most its max load; N = 0 gives CURRENT.
    Bound per layer: the unconstrained replication bound (a relaxation of the constrained
    problem, hence still valid) and the constrained ILP's dual bound.
    """
    from moeplace.solve.migrate import best_copy_relabeling

    start = time.monotonic()
    num_layers, num_experts = loads.shape
    slots = slots_per_gpu(num_experts, num_gpus, redundant, max_experts_per_gpu)  # balance_placement's, as it sets them
    check_current_copies(current, num_experts, redundant, slots)  # a refused CURRENT: before the solve, not after it
    plain = balance_placement(loads, num_gpus, gpus_per_node, redundant, time_limit / 2, max_experts_per_gpu,
                              progress=progress)
    assert int(plain.solver["slots_per_gpu"]) == slots
    held = [current.holders(layer) for layer in range(num_layers)]
    label = best_copy_relabeling([plain.holders(layer) for layer in range(num_layers)], held, num_gpus, gpus_per_node)
    renamed = [[[int(label[g]) for g in c] for c in plain.holders(layer)] for layer in range(num_layers)]
    plain_moves = [copy_moves(renamed[layer], held[layer]) for layer in range(num_layers)]
    deadline = start + time_limit
    cut: set[str] = set(plain.solver.get("cut_steps", []))
    plans: list[LayerPlan] = []
    bar = Progress("balance --max-moves", total=num_layers, enabled=progress)
    for layer in range(num_layers):
        w, cur = loads[layer], _holds(held[layer], num_gpus)
        lower = bound = replication_bound(w, num_gpus, redundant)
        candidates = [(held[layer], "current")]
        if plain_moves[layer] <= max_moves:
            candidates.append((renamed[layer], "plain"))
        left = deadline - time.monotonic()
        if 2 * num_experts * num_gpus <= ILP_CANDIDATE_MAX_VARS:
            if left > 0:
                copies, ilp_bound, timed_out = ilp_layer(w, num_gpus, slots, redundant, left / (num_layers - layer),
                                                         cur, max_moves)
                lower = bound = max(bound, ilp_bound)
                if timed_out:
                    cut.add("ilp")
                if copies is not None and copy_moves(copies, held[layer]) <= max_moves:
                    candidates.append((copies, "ilp"))
            else:
                cut.add("ilp")
        scored = [(layer_max_load(w, c, num_gpus), copy_moves(c, held[layer]), i, c, m)
                  for i, (c, m) in enumerate(candidates)]
        if num_experts <= IMPROVE_MAX_EXPERTS and not any(s[0] <= lower * (1 + 1e-9) for s in scored):
            stop = time.monotonic() + max(deadline - time.monotonic(), 0.0) / (num_layers - layer)
            improved = []
            for _, _, i, c, m in scored:
                c = improve_layer(w, c, num_gpus, slots, lower, stop, cur, max_moves)
                improved.append((layer_max_load(w, c, num_gpus), copy_moves(c, held[layer]), i, c, m))
            scored = improved
            if time.monotonic() > stop:
                cut.add("descent")
        unit = max(float(w.sum()) / num_gpus, 1e-12)  # ties within 1e-6 of the mean load: fewer moves win
        least = min(s[0] for s in scored)
        best, _, _, copies, method = min((s for s in scored if s[0] <= least + 1e-6 * unit), key=lambda s: (s[1], s[0], s[2]))
        plans.append(LayerPlan(_like_current(copies, held[layer]), best, min(bound, best), method))
        bar.update(layer + 1, f"layer {layer + 1}/{num_layers}")
    bar.close()
    placement = _to_placement(plans, loads, num_gpus, gpus_per_node, redundant, slots)
    moved = [copy_moves(p.copies, k) for p, k in zip(plans, held)]
    placement.objective["max_moves"] = {
        "N": max_moves, "moved": int(sum(moved)), "of": num_layers * (num_experts + redundant),
        "moved_per_layer": moved, "imbalance_per_layer": placement.metrics["imbalance_per_layer"],
        "definition": "per layer, (expert, GPU) copies that CURRENT does not have, in CURRENT's GPU names",
        "relabeling": "the plain solve's, best for copies kept (migrate.best_copy_relabeling)",
        "plain": {"value": plain.objective["value"], "moved": int(sum(plain_moves)), "moved_per_layer": plain_moves,
                  "imbalance_per_layer": plain.metrics["imbalance_per_layer"]}}
    placement.solver.update({"method": "balance-moves", "time_limit_s": time_limit,
                             "seconds": round(time.monotonic() - start, 3), "stopped_by_time_limit": bool(cut),
                             "cut_steps": sorted(cut)})
    return placement
