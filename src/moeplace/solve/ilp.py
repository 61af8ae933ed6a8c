"""Integer programs for the traffic objective (PuLP model, HiGHS solver), and a valid lower bound.

`solve_window` re-optimises a window of consecutive layers exactly, every other layer fixed; the
window of all layers is the exact model. Variables (never one per token: edges are aggregated):

    x[l, e, g] in {0, 1}     expert e of layer l on GPU g       sum_g x = 1, sum_e x = E/G
    y[edge, g] in [0, 1]     both endpoints on GPU g            y <= x[u, g], y <= x[v, g]
    z[edge, n] in [0, 1]     both endpoints on node n           z <= sum_{g in n} x[u, g], same for v

An edge of weight w inside the window costs w * (node_cost - (node_cost - 1) sum_n z - sum_g y)
(the distance 0 / 1 / node_cost of affinity.distance_matrix; z is dropped on one node), an edge
to a fixed layer is linear in x. Maximising y, z at the optimum makes them the indicators.
With a move limit (solve --max-moves N), every window layer keeps at least E - N experts on
their CURRENT GPU: sum_e x[l, e, current(l, e)] >= E - N.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass

import highspy
import numpy as np
import pulp

from moeplace.solve.affinity import AffinityGraph, one_hot
from moeplace.solve.heuristics import LoadCap, MoveLimit, unary_of

_banner_lock = threading.Lock()
_banner_done = False


def software() -> dict[str, str]:
    """What a placement depends on besides its inputs and seed: where an LP or ILP has several
    optima, another HiGHS release may return another (recorded as solver.software)."""
    from moeplace import __version__

    highs_version = f"{highspy.HIGHS_VERSION_MAJOR}.{highspy.HIGHS_VERSION_MINOR}.{highspy.HIGHS_VERSION_PATCH}"
    return {"moeplace": __version__, "highs": highs_version, "pulp": pulp.__version__, "numpy": np.__version__}


def highs(time_limit: float | None = None) -> pulp.HiGHS:
    """PuLP's HiGHS interface, silent, on one thread. msg=False turns off the solve log, but
    HiGHS prints its banner on stdout when a process makes its first solver object, before any
    option can stop it, and stdout is the commands' output (`-q`, JSON): that first object is
    made here with file descriptor 1 pointed at /dev/null."""
    global _banner_done
    with _banner_lock:
        if not _banner_done:
            _banner_done = True
            sys.stdout.flush()
            saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, 1)
                highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
                os.close(devnull)
    options = {} if time_limit is None else {"timeLimit": time_limit}
    return pulp.HiGHS(msg=False, threads=1, **options)


@dataclass(frozen=True)
class IlpResult:
    expert_to_gpu: np.ndarray  # int64 [L, E], the window replaced when a solution was found
    cost: float | None  # window terms of the objective at the returned solution (None: no solution)
    bound: float | None  # valid lower bound on those window terms (HiGHS dual bound)
    optimal: bool
    seconds: float


def window_size(graph: AffinityGraph, layers: range, num_gpus: int, num_nodes: int) -> int:
    """Number of variables of the window model (to decide whether it is tractable)."""
    edges = sum(int(np.count_nonzero(graph.intra[l])) // 2 for l in layers)
    edges += sum(int(np.count_nonzero(graph.inter[l])) for l in layers if l + 1 in layers)
    per_edge = num_gpus + (num_nodes if num_nodes > 1 else 0)
    return len(layers) * graph.num_experts * num_gpus + edges * per_edge


def solve_window(graph: AffinityGraph, expert_to_gpu: np.ndarray, layers: range, distance: np.ndarray,
                 gpus_per_node: int, time_limit: float, pin_first: bool = False,
                 cap: LoadCap | None = None, moves: MoveLimit | None = None) -> IlpResult:
    """Optimal placement of `layers` given every other layer of expert_to_gpu [L, E].

    `pin_first` breaks the symmetry of GPU labels on the first window layer (expert 0 on GPU 0;
    on one node expert e on a GPU <= e): valid only when nothing outside the window is fixed
    (GPUs are interchangeable then; a cap, the same for every GPU, keeps them so) and the graph
    has no unary costs (heuristics.MovingGraph: they name GPUs; pin_first is ignored then) and no
    move limit (it names CURRENT's GPUs; ignored then too).
    Unary costs of the window layers are linear in x.
    `cap`: every window layer's token load per GPU at most its limit (the model is infeasible,
    and no solution is returned, where a limit is out of reach).
    `moves`: every window layer keeps at least E - N experts on their MoveLimit.current GPU
    (N = moves.max_moves; CURRENT itself meets it, so the model stays feasible).
    """
    start = time.monotonic()
    num_layers, num_experts = expert_to_gpu.shape
    num_gpus = distance.shape[0]
    num_nodes = num_gpus // gpus_per_node
    node_cost = float(distance.max()) if num_nodes > 1 else 1.0
    per_gpu = num_experts // num_gpus
    gpus, experts = range(num_gpus), range(num_experts)
    unary = unary_of(graph)
    pin_first = pin_first and unary is None and moves is None

    prob = pulp.LpProblem("moeplace_window", pulp.LpMinimize)
    x = {(l, e, g): pulp.LpVariable(f"x_{l}_{e}_{g}", cat=pulp.LpBinary) for l in layers for e in experts for g in gpus}
    for l in layers:
        for e in experts:
            prob += pulp.lpSum(x[l, e, g] for g in gpus) == 1
        for g in gpus:
            prob += pulp.lpSum(x[l, e, g] for e in experts) == per_gpu
            if cap is not None:
                prob += pulp.lpSum(float(cap.loads[l, e]) * x[l, e, g] for e in experts if cap.loads[l, e]) \
                    <= float(cap.limits[l])
        if moves is not None:
            prob += pulp.lpSum(x[l, e, int(moves.current[l, e])] for e in experts) >= num_experts - moves.max_moves
    if pin_first:
        # any relabelling of GPUs (of GPUs within nodes, and of whole nodes) leaves the cost as
        # it is; on one node, number GPUs by first use over the first layer's experts: expert e
        # then sits on a GPU <= e. Across nodes only expert 0 -> GPU 0 keeps that simple.
        for e in experts if num_nodes == 1 else range(1):
            for g in range(e + 1, num_gpus) if num_nodes == 1 else range(1, num_gpus):
                prob += x[layers[0], e, g] == 0

    terms: list[tuple[pulp.LpVariable, float]] = []
    constant = 0.0
    # edges to fixed layers: linear in x
    for l in layers:
        fixed = np.zeros((num_experts, num_gpus))
        if l - 1 >= 0 and l - 1 not in layers:
            fixed += graph.inter[l - 1].T @ (one_hot(expert_to_gpu[l - 1], num_gpus) @ distance)
        if l + 1 < num_layers and l + 1 not in layers:
            fixed += graph.inter[l] @ (one_hot(expert_to_gpu[l + 1], num_gpus) @ distance.T)
        if unary is not None:
            fixed += unary[l]
        terms += [(x[l, e, g], float(fixed[e, g])) for e in experts for g in gpus if fixed[e, g]]
    # edges inside the window: pair variables
    edges: list[tuple[tuple[int, int], tuple[int, int], float]] = []
    for l in layers:
        iu = np.argwhere(np.triu(graph.intra[l], 1) > 0)
        edges += [((l, int(a)), (l, int(b)), float(graph.intra[l][a, b])) for a, b in iu]
        if l + 1 in layers:
            edges += [((l, int(a)), (l + 1, int(b)), float(graph.inter[l][a, b])) for a, b in np.argwhere(graph.inter[l] > 0)]
    # star cuts: an expert on GPU g shares it with exactly E/G experts of a neighbouring layer
    # (E/G - 1 of its own), its node with E/N (E/N - 1). Implied by the integer model, not by its
    # LP relaxation, where x = 1/G lets every pair variable reach 1/G (a bound of zero saved).
    stars: dict[tuple[int, int, int], list[int]] = {}  # (layer, expert, neighbouring layer) -> edges
    y: dict[tuple[int, int], pulp.LpVariable] = {}
    z: dict[tuple[int, int], pulp.LpVariable] = {}
    for n, ((lu, u), (lv, v), w) in enumerate(edges):
        constant += w * node_cost
        stars.setdefault((lu, u, lv), []).append(n)
        stars.setdefault((lv, v, lu), []).append(n)
        for g in gpus:
            y[n, g] = pulp.LpVariable(f"y_{n}_{g}", 0, 1)
            prob += y[n, g] <= x[lu, u, g]
            prob += y[n, g] <= x[lv, v, g]
            terms.append((y[n, g], -w))
        if num_nodes > 1:
            for node in range(num_nodes):
                z[n, node] = pulp.LpVariable(f"z_{n}_{node}", 0, 1)
                members = range(node * gpus_per_node, (node + 1) * gpus_per_node)
                prob += z[n, node] <= pulp.lpSum(x[lu, u, g] for g in members)
                prob += z[n, node] <= pulp.lpSum(x[lv, v, g] for g in members)
                terms.append((z[n, node], -(node_cost - 1.0) * w))
    for (l, u, other), star in stars.items():
        own = int(other == l)  # an expert is not its own neighbour
        if len(star) > per_gpu - own:
            for g in gpus:
                prob += pulp.lpSum(y[n, g] for n in star) <= (per_gpu - own) * x[l, u, g]
        if num_nodes > 1 and len(star) > per_gpu * gpus_per_node - own:
            for node in range(num_nodes):
                members = range(node * gpus_per_node, (node + 1) * gpus_per_node)
                prob += pulp.lpSum(z[n, node] for n in star) <= \
                    (per_gpu * gpus_per_node - own) * pulp.lpSum(x[l, u, g] for g in members)
    prob += pulp.LpAffineExpression(terms)

    prob.solve(highs(max(time_limit, 0.1)))
    info = prob.solverModel.getInfo()
    out = expert_to_gpu.copy()
    has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
    cost = None
    if has_solution:
        for l in layers:
            for e in experts:
                out[l, e] = max(gpus, key=lambda g: x[l, e, g].varValue or 0.0)
        cost = float(pulp.value(prob.objective) or 0.0) + constant
    dual = info.mip_dual_bound
    bound = float(dual) + constant if np.isfinite(dual) else None
    return IlpResult(out, cost, bound, proven_optimal(prob), time.monotonic() - start)


def proven_optimal(prob: pulp.LpProblem) -> bool:
    """Whether HiGHS proved `prob` optimal. Not `pulp.LpStatus[prob.status] == "Optimal"`: PuLP
    maps HiGHS' time-limit (and iteration-limit, interrupt) stops to LpStatusOptimal too."""
    return highs_status(prob) == highspy.HighsModelStatus.kOptimal


def highs_status(prob: pulp.LpProblem) -> highspy.HighsModelStatus | None:
    """HiGHS' own model status of a problem solved with pulp.HiGHS (None: it never ran)."""
    try:
        return prob.solverModel.getModelStatus()
    except AttributeError:
        return None


def combinatorial_bound(graph: AffinityGraph, num_gpus: int, gpus_per_node: int, node_cost: float) -> float:
    """A valid lower bound on the objective from per-expert capacity (sum of per-pair bounds).

    Each edge costs node_cost - (node_cost - 1) [same node] - [same GPU]. An expert shares its GPU
    with exactly E/G experts of the next layer and E/G - 1 of its own, its node with E/N and
    E/N - 1: the weight saved is at most its heaviest such edges, counted from whichever side
    (rows or columns of inter) gives less.
    """
    num_experts = graph.num_experts
    num_nodes = num_gpus // gpus_per_node
    if num_nodes == 1:
        node_cost = 1.0

    def saved(capacity: int) -> float:
        if capacity <= 0:
            return 0.0
        total = 0.0
        for w in graph.inter:
            rows = -np.sort(-w, axis=1)[:, :capacity].sum()
            cols = -np.sort(-w, axis=0)[:capacity, :].sum()
            total += min(rows, cols, w.sum())
        for w in graph.intra:
            total += min(-np.sort(-w, axis=1)[:, : capacity - 1].sum() / 2, w.sum() / 2)
        return float(total)

    gpu_saved = saved(num_experts // num_gpus)
    node_saved = saved(num_experts // num_nodes) if num_nodes > 1 else 0.0
    return max(0.0, node_cost * graph.total_weight() - (node_cost - 1.0) * node_saved - gpu_saved)
