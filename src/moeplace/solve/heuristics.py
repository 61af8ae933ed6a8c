"""Local search for the traffic objective (affinity.placement_cost), layer by layer.

Shapes: expert_to_gpu int [L, E]; a layer's cost table float64 [E, G] (cost of expert e on GPU
g with every other expert fixed); distance float64 [G, G] (affinity.distance_matrix).

The moves, all keeping E/G experts of each layer per GPU:
    * improve_layer: optimal re-assignment of one layer given its neighbours (assign_layer).
      Without intra-layer edges this is a transport problem solved exactly
      (linear_sum_assignment over E/G slots per GPU); the intra-layer part is linearised around
      the current layer, so the result is kept unless the exact cost gets worse. Then
    * swap_descent: Kernighan-Lin style best-improvement swaps of two experts of one layer on
      different GPUs, with exact deltas including intra-layer edges.
    * chain_init: greedy chaining, an anchor layer grouped by co-selection into GPUs then nodes
      (cluster_layer, balanced_groups), each layer outwards assigned optimally to its neighbour.
    * perturb: a seeded random shuffle of a window of layers (iterated local search kicks).

With a LoadCap (solve --max-imbalance) improve_layer and coordinate_descent keep each layer's
token load per GPU under its limit: a layer above it is first brought under (meet_cap), and no
move then takes a GPU above it again. With a MoveLimit (solve --from --max-moves) they keep each
layer within N experts off their CURRENT GPU the same way: a layer over it is first brought
within (meet_limit: the cheapest exchanges back), and no swap then takes it over N again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from moeplace.solve.affinity import AffinityGraph, one_hot, placement_cost
from moeplace.solve.baselines import greedy_load


@dataclass(frozen=True)
class MovingGraph(AffinityGraph):
    """The traffic graph plus a unary cost of each expert on each GPU, unary float [L, E, G]
    (`solve --move-cost`: the penalty of a moved expert where g is not its CURRENT GPU, else 0).
    Every layer score here (layer_costs, layer_cost) and the ILP windows add it; being
    non-negative, it can only raise the optimum, so traffic-only bounds stay lower bounds."""

    unary: np.ndarray


def with_move_cost(graph: AffinityGraph, current: np.ndarray, penalty: float, num_gpus: int) -> MovingGraph:
    """`graph` with a cost of `penalty` per (layer, expert) off its GPU in current int [L, E]."""
    return MovingGraph(graph.inter, graph.intra, penalty * (1.0 - one_hot_layers(current, num_gpus)))


def one_hot_layers(expert_to_gpu: np.ndarray, num_gpus: int) -> np.ndarray:
    """float [L, E, G]: 1 where expert e of layer l is on GPU g."""
    return (expert_to_gpu[..., None] == np.arange(num_gpus)).astype(np.float64)


def unary_of(graph: AffinityGraph) -> np.ndarray | None:
    """The unary costs [L, E, G] of a MovingGraph, None for a plain graph."""
    return graph.unary if isinstance(graph, MovingGraph) else None


def objective_cost(graph: AffinityGraph, expert_to_gpu: np.ndarray, distance: np.ndarray) -> float:
    """placement_cost plus the unary costs (MovingGraph); placement_cost itself for a plain graph."""
    cost = placement_cost(graph, expert_to_gpu, distance)
    unary = unary_of(graph)
    if unary is None:
        return cost
    layers, experts = np.indices(expert_to_gpu.shape)
    return cost + float(unary[layers, experts, expert_to_gpu].sum())


@dataclass(frozen=True)
class MoveLimit:
    """At most `max_moves` experts of each layer off their GPU in `current` int [L, E] (solve
    --from CURRENT.json --max-moves N, counted in CURRENT's GPU names). With E/G experts on every
    GPU an expert only moves by taking another's place, so a layer moves 0 or at least 2 experts:
    N = 1 allows no move."""

    current: np.ndarray
    max_moves: int

    def moves(self, gpus: np.ndarray, layer: int) -> int:
        """Experts of `layer`, laid out as gpus int [E], that are off their CURRENT GPU."""
        return int((gpus != self.current[layer]).sum())

    def over(self, expert_to_gpu: np.ndarray) -> list[int]:
        """Layers of expert_to_gpu int [L, E] with more than max_moves moves."""
        return [l for l in range(len(self.current)) if self.moves(expert_to_gpu[l], l) > self.max_moves]


def swap_moves(gpus: np.ndarray, home: np.ndarray) -> np.ndarray:
    """The layer's moves (experts off their `home` GPU, both int [E]) once a and b have swapped
    GPUs, int [E, E]; only a's and b's own moves change."""
    moved = (gpus != home).astype(np.int64)
    a_there = (gpus[None, :] != home[:, None]).astype(np.int64)  # [a, b]: a on b's GPU, off home
    b_there = (gpus[:, None] != home[None, :]).astype(np.int64)  # [a, b]: b on a's GPU, off home
    return int(moved.sum()) - moved[:, None] - moved[None, :] + a_there + b_there


@dataclass(frozen=True)
class LoadCap:
    """The most token load one GPU may carry in each layer: loads float [L, E] (tokens of each
    expert, Trace.expert_loads), limits float [L]."""

    loads: np.ndarray
    limits: np.ndarray
    _packings: dict[int, list[np.ndarray]] = field(default_factory=dict, compare=False, repr=False)

    def packings(self, layer: int, num_gpus: int) -> list[np.ndarray]:
        """Load-balanced layouts of `layer`, int [E] each with E/G experts per GPU (copies): the
        greedy_load packing, then that packing improved by the balance objective's descent
        (balance.improve_layer: swaps off the most loaded GPU scored by max load, then sum of
        squares) where the layer has at most balance.IMPROVE_MAX_EXPERTS experts and the descent
        moved something. Computed once per layer: they depend on the loads only, and meet_cap
        asks for them on every layer above its limit of every restart."""
        if layer not in self._packings:
            from moeplace.solve import balance  # balance -> ilp -> this module

            weight = self.loads[layer]
            rows = [greedy_load(weight[None], num_gpus)[0]]
            if len(weight) <= balance.IMPROVE_MAX_EXPERTS:
                copies = balance.improve_layer(weight, [[int(g)] for g in rows[0]], num_gpus, len(weight) // num_gpus)
                improved = np.array([c[0] for c in copies], dtype=np.int64)
                if not np.array_equal(improved, rows[0]):
                    rows.append(improved)
            self._packings[layer] = rows
        return [row.copy() for row in self._packings[layer]]

    @classmethod
    def from_ratio(cls, loads: np.ndarray, max_imbalance: float, num_gpus: int) -> LoadCap:
        """Max / mean load per GPU at most `max_imbalance` in every layer (eval's imbalance). The
        limit is widened by a relative 1e-12 so that a peak of exactly X times the mean counts as
        under it whatever the rounding of X x mean (1.15 x 100 = 114.99999999999999)."""
        return cls(loads, max_imbalance * loads.sum(axis=1) / num_gpus * (1 + 1e-12))

    def peak(self, gpus: np.ndarray, layer: int, num_gpus: int) -> float:
        """Largest GPU load of `layer` laid out as gpus int [E]."""
        return float(np.bincount(gpus, weights=self.loads[layer], minlength=num_gpus).max())

    def above(self, expert_to_gpu: np.ndarray, num_gpus: int) -> list[int]:
        """Layers of expert_to_gpu int [L, E] whose largest GPU load is over their limit."""
        return [l for l in range(len(self.limits)) if self.peak(expert_to_gpu[l], l, num_gpus) > self.limits[l]]

    def at_floor(self, expert_to_gpu: np.ndarray, num_gpus: int) -> list[int]:
        """Layers above their limit whose largest GPU load no layout with E/G experts per GPU can
        lower: the GPU of the hottest expert carries at least it and the E/G - 1 lightest others,
        and the layer's peak is that much."""
        out = []
        for layer in self.above(expert_to_gpu, num_gpus):
            weight = np.sort(self.loads[layer])
            floor = weight[-1] + weight[:len(weight) // num_gpus - 1].sum()
            if self.peak(expert_to_gpu[layer], layer, num_gpus) <= floor * (1 + 1e-12):
                out.append(layer)
        return out

    def kept(self, expert_to_gpu: np.ndarray, num_gpus: int) -> LoadCap:
        """The cap a search from expert_to_gpu [L, E] keeps: a layer it could not bring under its
        limit keeps its own peak instead (moves never raise it)."""
        peaks = np.array([self.peak(expert_to_gpu[l], l, num_gpus) for l in range(len(self.limits))])
        return LoadCap(self.loads, np.maximum(self.limits, peaks), self._packings)


def layer_costs(graph: AffinityGraph, expert_to_gpu: np.ndarray, layer: int, distance: np.ndarray,
                intra: bool = True) -> np.ndarray:
    """Cost of each expert of `layer` on each GPU, all other experts fixed. float64 [E, G].

    in-edges from layer-1, out-edges to layer+1, and (when `intra`) co-selection edges to the
    other experts of this layer at their current GPUs.
    """
    num_gpus = distance.shape[0]
    num_layers = expert_to_gpu.shape[0]
    cost = np.zeros((expert_to_gpu.shape[1], num_gpus))
    if layer > 0:  # sum_i inter[l-1, i, e] D[g(i), g]
        cost += graph.inter[layer - 1].T @ (one_hot(expert_to_gpu[layer - 1], num_gpus) @ distance)
    if layer < num_layers - 1:  # sum_j inter[l, e, j] D[g, g(j)]
        cost += graph.inter[layer] @ (one_hot(expert_to_gpu[layer + 1], num_gpus) @ distance.T)
    if intra:
        cost += graph.intra[layer] @ (one_hot(expert_to_gpu[layer], num_gpus) @ distance)
    if (unary := unary_of(graph)) is not None:
        cost += unary[layer]
    return cost


def layer_cost(graph: AffinityGraph, expert_to_gpu: np.ndarray, layer: int, distance: np.ndarray) -> float:
    """Exact objective terms touching `layer` (in-, out- and intra-layer edges; its unary costs)."""
    ext = layer_costs(graph, expert_to_gpu, layer, distance, intra=False)
    gpus = expert_to_gpu[layer]
    own = ext[np.arange(len(gpus)), gpus].sum()
    return float(own + (graph.intra[layer] * distance[gpus][:, gpus]).sum() / 2)


def assign_layer(cost: np.ndarray) -> np.ndarray:
    """Min-cost balanced assignment of E experts to G GPUs, E/G each. cost [E, G] -> int [E].

    A transport problem with unit supplies; as an assignment over E slots (slot s on GPU
    s // (E/G)) it is solved exactly by the Hungarian method.
    """
    num_experts, num_gpus = cost.shape
    slots = np.repeat(np.arange(num_gpus), num_experts // num_gpus)
    rows, cols = linear_sum_assignment(cost[:, slots])
    out = np.empty(num_experts, dtype=np.int64)
    out[rows] = slots[cols]
    return out


def swap_deltas(cost: np.ndarray, gpus: np.ndarray, intra: np.ndarray | None, distance: np.ndarray) -> np.ndarray:
    """Exact change of the layer's cost when experts a and b swap GPUs, float [E, E]:

    delta(a, b) = C[a,g_b] - C[a,g_a] + C[b,g_a] - C[b,g_b] + 2 intra[a,b] D[g_a,g_b]
    (the last term undoes the a-b edge that both one-sided moves count). 0 for a and b on one GPU.
    intra None: the layer has no intra-layer edges (callers test that once, not per swap).
    """
    own = cost[np.arange(len(gpus)), gpus]
    cross = cost[:, gpus]  # [a, b] = C[a, g_b]
    delta = cross - own[:, None] + cross.T - own[None, :]
    if intra is not None:
        delta += 2.0 * intra * distance[gpus][:, gpus]
    return delta


def _swap(cost: np.ndarray, gpus: np.ndarray, intra: np.ndarray | None, distance: np.ndarray, a: int, b: int) -> None:
    """Swap the GPUs of experts a and b in place, keeping `cost` [E, G] current (intra as swap_deltas)."""
    ga, gb = gpus[a], gpus[b]
    if intra is not None:  # experts co-selected with a (b) see a (b) change GPU
        cost += np.outer(intra[:, a], distance[gb] - distance[ga])
        cost += np.outer(intra[:, b], distance[ga] - distance[gb])
    gpus[a], gpus[b] = gb, ga


def swap_loads(gpus: np.ndarray, weight: np.ndarray, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """GPU loads after each swap, float [E, E] twice: (load of a's GPU, load of b's GPU) once a
    and b have swapped; weight float [E] the token load of each expert."""
    load = np.bincount(gpus, weights=weight, minlength=num_gpus)
    moved = weight[None, :] - weight[:, None]  # [a, b]: what a's GPU gains
    return load[gpus][:, None] + moved, load[gpus][None, :] - moved


def swap_descent(cost: np.ndarray, gpus: np.ndarray, intra: np.ndarray, distance: np.ndarray,
                 max_swaps: int = 100_000, tol: float = 1e-9, weight: np.ndarray | None = None,
                 limit: float = np.inf, home: np.ndarray | None = None, max_moves: int = 0) -> float:
    """Best-improvement swaps within one layer until none improves (swap_deltas). Updates `gpus`
    [E] and `cost` [E, G] in place; returns the total improvement (>= 0). With `weight` float [E]
    (expert token loads), swaps that leave either GPU's load above `limit` are not made; with
    `home` int [E] (CURRENT's GPUs, MoveLimit), swaps that leave more than `max_moves` experts
    off their home (or more than now, where the layer is over it) are not made."""
    gained = 0.0
    edges = intra if intra.any() else None
    for _ in range(max_swaps):
        delta = swap_deltas(cost, gpus, edges, distance)
        if weight is not None:
            load_a, load_b = swap_loads(gpus, weight, distance.shape[0])
            delta[(load_a > limit) | (load_b > limit)] = np.inf
        if home is not None:
            delta[swap_moves(gpus, home) > max(max_moves, int((gpus != home).sum()))] = np.inf
        flat = int(np.argmin(delta))
        best = float(delta.flat[flat])
        if best >= -tol:
            break
        _swap(cost, gpus, edges, distance, *divmod(flat, len(gpus)))
        gained -= best
    return gained


def relieve_layer(cost: np.ndarray, gpus: np.ndarray, intra: np.ndarray, distance: np.ndarray,
                  weight: np.ndarray, limit: float, max_swaps: int = 100_000) -> bool:
    """Bring one layer's largest GPU load down to `limit` by swaps, in place (gpus int [E], cost
    float [E, G] as swap_descent; weight float [E] expert token loads). Returns whether it got there.

    1. each step swaps an expert of the most loaded GPU with a lighter one elsewhere, so that
       neither GPU ends at or above that load (the sorted loads fall, so it ends);
    2. of those, the swap of least traffic cost per unit of load taken off the peak.
    """
    num_gpus = distance.shape[0]
    edges = intra if intra.any() else None
    for _ in range(max_swaps):
        load = np.bincount(gpus, weights=weight, minlength=num_gpus)
        hot = int(np.argmax(load))
        if load[hot] <= limit:
            return True
        load_a, load_b = swap_loads(gpus, weight, num_gpus)
        relief = load[hot] - np.maximum(load_a, load_b)
        ok = (gpus[:, None] == hot) & (gpus[None, :] != hot) & (relief > 1e-9 * max(load[hot], 1.0))
        if not ok.any():
            return False
        score = np.where(ok, swap_deltas(cost, gpus, edges, distance) / np.where(ok, relief, 1.0), np.inf)
        _swap(cost, gpus, edges, distance, *divmod(int(np.argmin(score)), len(gpus)))
    return False


def repair_layer(cost: np.ndarray, gpus: np.ndarray, intra: np.ndarray, distance: np.ndarray,
                 home: np.ndarray, max_moves: int) -> None:
    """Bring one layer within `max_moves` experts off their `home` GPU (int [E], MoveLimit) by
    reverting moves, in place (gpus int [E], cost float [E, G] as swap_descent).

    Each step is the exchange (a swap of two experts) that takes one or two experts back home at
    the least cost per move reverted. One always exists while a layer has moves: GPU g = home(a)
    of a moved expert a holds E/G experts but at most E/G - 1 of those whose home is g, so one of
    them, b, is moved too, and swapping a and b takes a home. Equal counts per GPU hold throughout."""
    edges = intra if intra.any() else None
    while (now := int((gpus != home).sum())) > max_moves:
        reverted = now - swap_moves(gpus, home)
        ok = reverted > 0
        score = np.where(ok, swap_deltas(cost, gpus, edges, distance) / np.where(ok, reverted, 1), np.inf)
        _swap(cost, gpus, edges, distance, *divmod(int(np.argmin(score)), len(gpus)))


def meet_limit(graph: AffinityGraph, expert_to_gpu: np.ndarray, layer: int, distance: np.ndarray,
               limit: MoveLimit) -> None:
    """Bring `layer` of expert_to_gpu [L, E] within its move limit at the least cost the
    exchanges back find (repair_layer), in place; a layer within it is left as it is."""
    if limit.moves(expert_to_gpu[layer], layer) <= limit.max_moves:
        return
    gpus = expert_to_gpu[layer].copy()
    repair_layer(layer_costs(graph, expert_to_gpu, layer, distance), gpus, graph.intra[layer], distance,
                 limit.current[layer], limit.max_moves)
    expert_to_gpu[layer] = gpus


def meet_cap(graph: AffinityGraph, expert_to_gpu: np.ndarray, layer: int, distance: np.ndarray,
             cap: LoadCap) -> bool:
    """Bring `layer` of expert_to_gpu [L, E] under its cap at the least traffic cost the swaps
    find, in place; returns whether it got there.

    relieve_layer from each start in turn until one ends under the limit: the current layout,
    then the layer's load-balanced packings (LoadCap.packings). Where none does, the layer keeps
    the lowest peak reached (the earlier start on a tie: it moved fewer experts).
    """
    num_gpus, limit, loads = distance.shape[0], float(cap.limits[layer]), cap.loads[layer]
    best: np.ndarray | None = None
    for gpus in [expert_to_gpu[layer].copy(), *cap.packings(layer, num_gpus)]:
        expert_to_gpu[layer] = gpus  # the cost table's intra-layer part reads the layer's own GPUs
        if relieve_layer(layer_costs(graph, expert_to_gpu, layer, distance), gpus, graph.intra[layer], distance,
                         loads, limit):
            expert_to_gpu[layer] = gpus
            return True
        if best is None or cap.peak(gpus, layer, num_gpus) < cap.peak(best, layer, num_gpus):
            best = gpus
    assert best is not None
    expert_to_gpu[layer] = best
    return False


def improve_layer(graph: AffinityGraph, expert_to_gpu: np.ndarray, layer: int, distance: np.ndarray,
                  cap: LoadCap | None = None, moves: MoveLimit | None = None) -> float:
    """Re-assign `layer` optimally given its neighbours, then swap-descend. In place; returns the gain.

    With `cap`: a layer above its limit is first brought under it (meet_cap; the gain is counted
    from there); the optimal re-assignment, where it lands above the limit, is relieved
    (relieve_layer) and dropped if it stays above; the swaps keep the limit (or the layer's peak,
    where the limit was out of reach).
    With `moves` (MoveLimit) likewise: a layer over it is first brought within (meet_limit), the
    re-assignment is brought within it by the same exchanges back, and the swaps keep it."""
    num_gpus = distance.shape[0]
    limit = np.inf
    if cap is not None:
        if cap.peak(expert_to_gpu[layer], layer, num_gpus) > cap.limits[layer]:
            meet_cap(graph, expert_to_gpu, layer, distance, cap)
        limit = max(float(cap.limits[layer]), cap.peak(expert_to_gpu[layer], layer, num_gpus))
    if moves is not None:
        meet_limit(graph, expert_to_gpu, layer, distance, moves)
    before = layer_cost(graph, expert_to_gpu, layer, distance)
    current = expert_to_gpu[layer].copy()
    candidate = assign_layer(layer_costs(graph, expert_to_gpu, layer, distance))
    expert_to_gpu[layer] = candidate
    if cap is not None and cap.peak(candidate, layer, num_gpus) > limit:
        cost = layer_costs(graph, expert_to_gpu, layer, distance)
        if not relieve_layer(cost, candidate, graph.intra[layer], distance, cap.loads[layer], limit):
            candidate = current
        expert_to_gpu[layer] = candidate
    if moves is not None:
        meet_limit(graph, expert_to_gpu, layer, distance, moves)
    if layer_cost(graph, expert_to_gpu, layer, distance) > before:
        expert_to_gpu[layer] = current
    gpus = expert_to_gpu[layer].copy()
    swap_descent(layer_costs(graph, expert_to_gpu, layer, distance), gpus, graph.intra[layer], distance,
                 weight=None if cap is None else cap.loads[layer], limit=limit,
                 home=None if moves is None else moves.current[layer],
                 max_moves=0 if moves is None else moves.max_moves)
    expert_to_gpu[layer] = gpus
    return before - layer_cost(graph, expert_to_gpu, layer, distance)


def coordinate_descent(graph: AffinityGraph, expert_to_gpu: np.ndarray, distance: np.ndarray,
                       max_sweeps: int = 50, rel_tol: float = 1e-6, layers: range | None = None,
                       deadline: float | None = None, cap: LoadCap | None = None,
                       moves: MoveLimit | None = None) -> int:
    """Sweep improve_layer forward and backward until a sweep gains less than rel_tol of the
    total edge weight, or time.monotonic() passes `deadline`. In place; returns the sweeps run.
    With `cap`, every move keeps the layers under it; with `moves`, within their move limit
    (improve_layer)."""
    order = list(layers if layers is not None else range(expert_to_gpu.shape[0]))
    scale = max(graph.total_weight(), 1e-12)
    for sweep in range(1, max_sweeps + 1):
        gain = 0.0
        for layer in order if sweep % 2 else order[::-1]:
            if deadline is not None and time.monotonic() > deadline:
                return sweep
            gain += improve_layer(graph, expert_to_gpu, layer, distance, cap, moves)
        if gain <= rel_tol * scale:
            return sweep
    return max_sweeps


def balanced_groups(weight: np.ndarray, num_groups: int, rng: np.random.Generator) -> np.ndarray:
    """Split n items into num_groups groups of n / num_groups, keeping heavy pairs together.

    weight [n, n] symmetric -> int [n] group ids.
    1. average-linkage agglomeration: merge the two clusters with the highest mean weight
       between them (ties broken by seeded noise) while the merged cluster fits in one group;
    2. best-fit decreasing of the clusters into the groups (the fullest group that still fits);
       members of a cluster that fits nowhere go one by one to the groups with most room.
    """
    n = weight.shape[0]
    cap = n // num_groups
    link = weight * (1.0 + 1e-6 * rng.random(weight.shape))
    link = (link + link.T) / 2
    np.fill_diagonal(link, 0.0)
    size = np.ones(n)
    label = np.arange(n)
    alive = np.ones(n, dtype=bool)
    while True:
        score = link / np.outer(size, size)  # average linkage
        score[~alive, :] = -1.0
        score[:, ~alive] = -1.0
        score[size[:, None] + size[None, :] > cap] = -1.0
        np.fill_diagonal(score, -1.0)
        flat = int(np.argmax(score))
        if score.flat[flat] <= 0.0:
            break
        a, b = divmod(flat, n)
        link[a] += link[b]
        link[:, a] += link[:, b]
        link[a, a] = 0.0
        size[a] += size[b]
        alive[b] = False
        label[label == b] = a
    clusters = sorted((np.flatnonzero(label == r) for r in np.unique(label)), key=lambda c: (-len(c), c[0]))
    out = np.empty(n, dtype=np.int64)
    room = np.full(num_groups, cap)
    leftovers: list[int] = []
    for members in clusters:
        fits = np.flatnonzero(room >= len(members))
        if len(fits):
            g = fits[np.argmin(room[fits])]  # tightest fit keeps big holes for big clusters
            out[members] = g
            room[g] -= len(members)
        else:
            leftovers.extend(int(i) for i in members)
    for i in leftovers:
        g = int(np.argmax(room))
        out[i] = g
        room[g] -= 1
    return out


def cluster_layer(intra: np.ndarray, num_gpus: int, gpus_per_node: int, rng: np.random.Generator) -> np.ndarray:
    """Balanced grouping of one layer's experts by co-selection, GPUs then nodes.

    intra [E, E] -> int [E] GPU ids. Experts are grouped into GPUs (balanced_groups); then the
    GPU groups are grouped into nodes by the co-selection weight between them.
    """
    group = balanced_groups(intra, num_gpus, rng)  # [E] arbitrary GPU labels
    num_nodes = num_gpus // gpus_per_node
    if num_nodes == 1:
        return group
    member = one_hot(group, num_gpus)  # [E, G]
    between = member.T @ intra @ member
    np.fill_diagonal(between, 0.0)
    node = balanced_groups(between, num_nodes, rng)  # [G] node of each GPU group
    label = np.empty(num_gpus, dtype=np.int64)
    for n in range(num_nodes):
        members = np.flatnonzero(node == n)
        label[members] = n * gpus_per_node + np.arange(len(members))
    return label[group]


def chain_init(graph: AffinityGraph, num_gpus: int, gpus_per_node: int, distance: np.ndarray,
               rng: np.random.Generator, anchor: int | None = None) -> np.ndarray:
    """Greedy chaining from an anchor layer: the anchor grouped by co-selection (cluster_layer;
    seeded random when it has no intra-layer edges), then each layer outwards assigned
    optimally (assign_layer) to the one before it (plus its unary costs, MovingGraph)."""
    num_layers, num_experts = graph.num_layers, graph.num_experts
    unary = unary_of(graph)
    if anchor is None:
        anchor = int(np.argmax(graph.intra.sum(axis=(1, 2))))
    out = np.empty((num_layers, num_experts), dtype=np.int64)
    if graph.intra[anchor].any():
        out[anchor] = cluster_layer(graph.intra[anchor], num_gpus, gpus_per_node, rng)
    else:
        out[anchor] = rng.permutation(np.repeat(np.arange(num_gpus), num_experts // num_gpus))
    for layer in range(anchor + 1, num_layers):
        prev = one_hot(out[layer - 1], num_gpus) @ distance  # [E, G]
        cost = graph.inter[layer - 1].T @ prev
        out[layer] = assign_layer(cost if unary is None else cost + unary[layer])
    for layer in range(anchor - 1, -1, -1):
        nxt = one_hot(out[layer + 1], num_gpus) @ distance.T
        cost = graph.inter[layer] @ nxt
        out[layer] = assign_layer(cost if unary is None else cost + unary[layer])
    return out


def perturb(expert_to_gpu: np.ndarray, rng: np.random.Generator, window: int, strength: float) -> range:
    """Swap a `strength` fraction of expert pairs in a random window of layers. In place;
    returns the layers touched."""
    num_layers, num_experts = expert_to_gpu.shape
    start = int(rng.integers(0, max(num_layers - window, 0) + 1))
    layers = range(start, min(start + window, num_layers))
    if num_experts < 2:  # one expert per layer: nothing to swap (and to search)
        return layers
    for layer in layers:
        for _ in range(max(1, int(strength * num_experts / 2))):
            a, b = rng.choice(num_experts, 2, replace=False)
            expert_to_gpu[layer, [a, b]] = expert_to_gpu[layer, [b, a]]
    return layers
