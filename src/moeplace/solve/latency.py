"""The `latency` objective: minimise the cost model's predicted MoE time summed over layers.

    cost(x) = sum_l  compute_weight * max_g compute[l, g] + dispatch[l] + combine[l]

(costmodel.py; compute_weight = 1 is the predicted time, 0 pure traffic, large pure balance:
`--pareto` sweeps it). The communication terms come from where tokens sit, i.e. the top-1 GPU of
the previous layer, so they carry the inter-layer affinity.

Acceptance rule (every step): a change is kept only if it cuts the cost on the training tokens
by more than Z_ACCEPT standard errors. The standard error comes from the same change measured on
FOLDS disjoint seeded folds of the training tokens (each scaled to the full batch):
sd(fold deltas) / sqrt(FOLDS). The compute term of that cost uses expert loads shrunk toward
their layer mean by their Poisson noise (shrunk_loads, per fold too): a trace of a few hundred
tokens makes the raw max-load term mostly counting noise, and a move that relieves a GPU hot
by chance in the training tokens passes the fold test as well, since the folds share that
chance. The reported value is the exact cost (what `moeplace eval --cluster` predicts).

1. start: the traffic placement (solver.solve_traffic); the balance placement replaces it only
   if it passes the acceptance rule (and is the only start where G does not divide E, under a cap).
   Where G does not divide E but E + R does (`--redundant-experts R`; 16 + 2 on 3 GPUs: 6 slots
   each), a GPU holds at most S = (E + R) / G primaries per layer and its copies fill the rest
   (primary_slots): the balance start under that per-layer limit, the traffic start as traffic's
   placement of E + R experts, R of them never selected (their slots are the copies'); the LP
   bounds each GPU's count by 1..S and the descent also tries slot moves (one expert off the
   layer's slowest GPU to a GPU with fewer than S). Planted trace, 60 experts + 4 copies on 2 x 8
   GPUs: 520.8 us on the training tokens and 530.6 held out, against 649.4 and 648.6 for
   `balance` with the same copies (667.5 / 668.2 with the balance start alone);
2. per layer, the LP relaxation (PuLP + HiGHS) of a MILP with auxiliary max-load and max-link
   variables on a linear surrogate: compute load per GPU (loads shrunk toward the layer mean by
   their Poisson noise), and per-GPU, per-link-class dispatch volumes of this layer (from the
   fixed previous layer) and of the next (whose tokens start where this layer's top-1 experts
   sit); rounded to a placement by an optimal assignment of experts to GPU slots;
3. swap descent on per-layer costs (a swap at layer l changes layers l and l+1) on moves
   off the slowest GPU, until no move passes or the time limit;
   With a total cap C (`--max-experts-per-gpu-total`, MoETuner) per-layer counts may differ
   between GPUs (at least 1 each, at most C summed over layers): the balance start is solved
   under the cap, the LP bounds each GPU's count by what its other layers leave of C, and
   the descent also tries cap moves (one expert off the layer's slowest GPU to a GPU with room
   under C, or, with no room, paired with a move back at the layer where that costs least).
   Where G divides E the equal-count layouts meet the cap, so the search is first the one
   without a cap (from its own starts), then goes on with the capped steps from its result; a
   second, capped search from the capped balance start runs only where that start is the one
   picked and differs, and the lower search cost of the two wins (FLAME: a capped search from the
   traffic start ended above the equal-count one on the training tokens in 7 of 10 solves);
4. `--redundant-experts R`: replicate.add_replicas (exactly R copies per layer; R / G per GPU
   when G divides R, else the uneven mode of replicate.py) on the searched placement and on
   the traffic and balance starts; the lowest exact cost on the training tokens wins (ties: the
   searched one). The search never sees replicas, and the moves it made to relieve a hot GPU
   can cost traffic that a copy would relieve for free (planted trace at 2 nodes: 1480 us on
   the training tokens against 1331 for traffic + copies, 1548 against 1298 held out). This
   one choice among three whole candidates is not put to the fold test: folds of a quarter of
   the tokens, scaled to the batch, are too noisy to confirm even that 10% difference;
5. lower bound: per layer, compute >= max(mean GPU, hottest replica) and each Alltoall phase >= the least
   volume any placement must move spread evenly over the GPUs at the GPU's NVLink and network
   bandwidths summed (it sends on both at once), or its cross-node part at the network's alone,
   plus the smallest link latency when that volume is positive. The least volume: ceil(k / slots)
   - 1 remote GPUs per token; the co-selected pairs no layout keeps together (spread_bound); and,
   without replicas, the tokens whose GPU can hold none of their experts (moved_bound).

Deterministic for a seed: the amount of work is fixed (20 sweeps at most, fixed tries per step)
and no search step's result reads the clock. The time limit only cuts work short, recorded in
solver.cut_steps: "search", "replicas", and "<name> start (<its steps>)" for a start cut by its
own share (e.g. a balance start's candidate ILPs, 16 x 8 layers under a total cap, need 3-4 s
each to prove: such a start may differ with a longer limit or on a faster machine).
solver.stopped_by_time_limit says whether the solve as a whole stopped on the limit (the search
or the replicas cut). A start's share alone does not set it: it did before 2026-11-24, and a
planted 16-expert trace under a cap said "stopped by --time-limit" after 15.6 s of 60 (the
placement with 150 s: the same).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pulp
from scipy.optimize import linear_sum_assignment
from scipy.stats import t as student_t

from moeplace.errors import MoeplaceError
from moeplace.eval.metrics import initial_homes
from moeplace.options import plural
from moeplace.progress import Progress
from moeplace.solve.affinity import coselection
from moeplace.solve.balance import balance_placement, replication_bound, total_slots_per_gpu
from moeplace.solve.costmodel import (
    INTER, INTRA, CostModel, active_probability, alltoall_us, layer_time, layer_traffic, load_cost_model, token_scale,
)
from moeplace.solve.ilp import highs, proven_optimal
from moeplace.trace.format import Trace, flow_counts, layer_counts

if TYPE_CHECKING:  # solver imports this module late: no cycle at run time
    from moeplace.placement import Placement
    from moeplace.solve.solver import SolveOutcome


LAYER_LP_MAX_VARS = 2048  # E x G of one layer above which step 2 is skipped
# Fixed a priori, not fitted to any trace: hundreds of candidate moves are tried per solve, so a
# one-sided test at 98% keeps the share of noise moves that slip through small; 4 folds give a
# spread while each fold keeps a quarter of the tokens. The standard error comes from 4 values
# (3 degrees of freedom), so the critical value is Student's t, not the normal 2.05.
FOLDS = 4
Z_ACCEPT = float(student_t.ppf(0.98, FOLDS - 1))  # 3.48


def significant(delta: float, fold_deltas: np.ndarray) -> bool:
    """The acceptance rule: the cost change `delta` on all the training tokens is a cut larger
    than Z_ACCEPT standard errors estimated from its per-fold values fold_deltas float [FOLDS]."""
    if delta >= -1e-9:
        return False
    if len(fold_deltas) < 2:
        return True
    return delta < -Z_ACCEPT * float(np.std(fold_deltas, ddof=1)) / math.sqrt(len(fold_deltas))


def fold_tokens(num_tokens: int, seed: int) -> list[np.ndarray]:
    """FOLDS disjoint seeded folds of the token indices (none if too few tokens to split)."""
    if num_tokens < 2 * FOLDS:
        return []
    return [np.sort(f) for f in np.array_split(np.random.default_rng(seed).permutation(num_tokens), FOLDS)]


def shrunk_loads(loads: np.ndarray) -> np.ndarray:
    """Expert loads [L, E] shrunk toward each layer's mean by the share of their spread that is
    not counting noise (empirical Bayes: Poisson noise variance = mean count). float [L, E]"""
    mean = loads.mean(axis=1, keepdims=True)
    spread = loads.var(axis=1, keepdims=True)
    keep = np.divide(np.maximum(spread - mean, 0.0), spread, out=np.zeros_like(spread), where=spread > 0)
    return mean + keep * (loads - mean)


class LatencyModel:
    """Exact predicted cost of an expert_to_gpu [L, E] on a trace, with per-layer caching."""

    def __init__(self, cost: CostModel, trace: Trace, compute_weight: float = 1.0, smooth: bool = False,
                 stands_for: int | None = None) -> None:
        self.cost, self.trace, self.w = cost, trace, compute_weight
        self.scale = token_scale(cost, trace.num_tokens, stands_for)  # a fold stands for the whole set
        self.links = cost.link_class()
        self.home0 = initial_homes(trace.num_tokens, cost.cluster.num_gpus)
        shrunk = shrunk_loads(trace.expert_loads()) if smooth else None
        self.loads = shrunk * self.scale if shrunk is not None else None
        # each expert's chance of a token in the batch, from its shrunk share (costmodel.layer_time)
        self.active = active_probability(shrunk / trace.num_tokens, trace.num_tokens, self.scale) \
            if shrunk is not None else None

    def layer(self, e2g: np.ndarray, layer: int) -> np.ndarray:
        """(compute, dispatch, combine) of one layer, float [3]."""
        ids = self.trace.topk_ids
        home = self.home0 if layer == 0 else e2g[layer - 1][ids[:, layer - 1, 0]]
        gpus = e2g[layer][ids[:, layer]]
        if self.loads is None:
            return np.array(layer_time(self.cost, home, gpus, ids[:, layer], self.scale, self.links))
        counts = np.stack(layer_traffic(home, gpus, self.cost.cluster.num_gpus))[:, None]  # [2, 1, G, G]
        assert self.active is not None
        return smoothed_costs(self.cost, self.links, e2g[layer], self.loads[layer][None], self.active[layer][None],
                              np.array([self.scale]), counts)[0]

    def weighted(self, parts: np.ndarray) -> float:
        return float(self.w * parts[..., 0].sum() + parts[..., 1:].sum())

    def all_layers(self, e2g: np.ndarray) -> np.ndarray:
        return np.stack([self.layer(e2g, layer) for layer in range(e2g.shape[0])])  # [L, 3]


def smoothed_costs(cost: CostModel, links: np.ndarray, row: np.ndarray, loads: np.ndarray, active: np.ndarray,
                   scales: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(compute, dispatch, combine) of one layer placed as row int [E] (or each model's layer as
    its row int [M, E]) for M smoothed models, float [M, 3]: compute from each model's shrunk
    loads float [M, E] (already scaled to the batch) and its experts' chances of being active in
    the batch float [M, E] (LatencyModel.active), dispatch and combine from its token counts
    float [2, M, G, G] (costmodel.layer_traffic) scaled by scales float [M]. Each model's numbers
    are those it gets alone."""
    m, (num_models, num_gpus) = cost.model, (len(loads), links.shape[0])
    at = (np.arange(num_models)[:, None] * num_gpus + row).ravel()  # (model, GPU) of each expert
    gpu_load = np.bincount(at, weights=loads.ravel(), minlength=num_models * num_gpus).reshape(num_models, -1)
    gpu_active = np.bincount(at, weights=active.ravel(), minlength=num_models * num_gpus).reshape(num_models, -1)
    volume = counts * scales[None, :, None, None]
    return np.stack([(m.expert_fixed_us * gpu_active + m.expert_us_per_token * gpu_load).max(1),
                     alltoall_us(volume[0], m.hidden_size * m.dispatch_bytes, cost, links),
                     alltoall_us(volume[1], m.hidden_size * m.combine_bytes, cost, links)], axis=1)


class SearchModels:
    """What the search and its acceptance rule see: the smoothed model of all training tokens and
    of FOLDS disjoint folds of them, `all` = [whole, *folds], evaluated together.

    Token counts are sums over tokens, so one pass over the training tokens, each tagged with its
    fold, gives every fold's dispatch and combine counts, and their sum is the whole set's (the
    same integers as a pass of its own). Layer 0 is the exception: each fold starts its tokens
    on its own round-robin homes, so there the whole set gets a pass of its own.

    Trial moves are counted incrementally (`propose`): the counts of the current placement are
    kept (`reset`, `commit`), and a move re-counts only the tokens it touches: at a layer, those
    selecting an expert it moved and those whose previous top-1 expert it moved (their home).
    The counts are integers, so this gives the numbers of a full recount, bit for bit. The
    difference of the touched tokens' counts is taken without sorting their GPUs (`_delta`), from
    the current placement's multiplicities (how many of a token's k experts sit on each GPU).
    """

    def __init__(self, whole: LatencyModel, token_folds: list[np.ndarray]) -> None:
        assert whole.loads is not None, "the search sees smoothed models"
        trace = whole.trace
        self.all = [whole] + [LatencyModel(whole.cost, trace.select_tokens(f), whole.w, smooth=True,
                                           stands_for=trace.num_tokens) for f in token_folds]
        self.num_gpus, self.num_folds = whole.cost.cluster.num_gpus, len(token_folds)
        self.fold = np.zeros(trace.num_tokens, dtype=np.int64)
        self.fold_home0 = whole.home0.copy()  # each token's layer-0 home in its fold
        for f, (tokens, model) in enumerate(zip(token_folds, self.all[1:])):
            self.fold[tokens] = f
            self.fold_home0[tokens] = model.home0
        self.fold_at = self.fold * self.num_gpus**2  # where each token's fold starts in flat counts
        self.ids = trace.topk_ids
        self.selections = trace.expert_loads()  # [L, E] token-expert selections (integers)
        self.selecting = [_tokens_by_expert(self.ids[:, layer], trace.num_experts) for layer in range(trace.num_layers)]
        self.top1 = [_tokens_by_expert(self.ids[:, layer, :1], trace.num_experts) for layer in range(trace.num_layers)]
        self.loads = np.stack([m.loads for m in self.all])  # type: ignore[misc]  # [M, L, E]
        self.active = np.stack([m.active for m in self.all])  # type: ignore[misc]  # [M, L, E]
        self.scales = np.array([m.scale for m in self.all])
        self.counts: list[np.ndarray] = []  # the current placement's, per layer (`_count`)
        self.first = [np.ascontiguousarray(self.ids[:, layer, 0]) for layer in range(trace.num_layers)]  # top-1 ids
        self.e2g = np.zeros((0, 0), dtype=np.int64)  # the current placement (`reset`, `commit`)
        self.mult: list[np.ndarray] = []  # its multiplicities per layer, int [G, T] (`_multiplicities`)
        self.pos = np.zeros(trace.num_tokens, dtype=np.int64)  # scratch: a token's row in `_delta`
        self.proposed: tuple[dict[int, np.ndarray], list[np.ndarray]] | None = None  # rows, counts

    def _count(self, e2g: np.ndarray, layer: int, tokens: np.ndarray | slice = slice(None),
               cand: np.ndarray | None = None) -> np.ndarray:
        """Dispatch and combine token counts of one layer for each model from `tokens` (all by
        default), float [2, M, G, G]; with `cand`, those of cand minus those of e2g (by sorting
        each token's GPUs: the search takes that difference from `_delta`, tested against this)."""
        rows = [e2g] if cand is None else [e2g, cand]
        ids = self.ids[tokens, layer]
        gpus = np.concatenate([x[layer][ids] for x in rows])
        if layer == 0:
            homes = [self.fold_home0[tokens]] * len(rows)
        else:
            top1 = self.ids[tokens, layer - 1, 0]
            homes = [x[layer - 1][top1] for x in rows]
        fold, n = self.fold[tokens], len(rows)

        def by_row(counts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:  # [2, n * groups, G, G] -> [2, groups, G, G]
            c = np.stack(counts).reshape(2, n, -1, self.num_gpus, self.num_gpus)
            return c[:, 0] if n == 1 else c[:, 1] - c[:, 0]

        groups = max(self.num_folds, 1)  # no folds: one group, all tokens, on the whole set's homes
        grouped = by_row(layer_traffic(np.concatenate(homes), gpus, self.num_gpus,
                                       np.concatenate([fold + i * groups for i in range(n)]), n * groups))
        if self.num_folds == 0:
            return grouped
        if layer == 0:
            whole = by_row(layer_traffic(np.concatenate([self.all[0].home0[tokens]] * n), gpus, self.num_gpus,
                                         np.repeat(np.arange(n), len(fold)), n))
        else:
            whole = grouped.sum(1, keepdims=True)
        return np.concatenate([whole, grouped], axis=1)

    def _multiplicities(self, row: np.ndarray, layer: int) -> np.ndarray:
        """How many of each token's k experts at `layer` sit on each GPU under row int [E],
        int8 [G, T] (GPU-major: a move reads and writes a few GPUs' rows; int16 past k = 127)."""
        ids = self.ids[:, layer]
        flat = (row[ids] * len(ids) + np.arange(len(ids))[:, None]).ravel()
        dtype = np.int8 if ids.shape[1] < 128 else np.int16
        return np.bincount(flat, minlength=len(ids) * self.num_gpus).astype(dtype).reshape(self.num_gpus, -1)

    def _touched(self, e2g: np.ndarray, cand: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens whose counts at `layer` cand changes, the experts it moved there), int [n], [m]:
        those selecting a moved expert and those whose previous top-1 expert moved (their home)."""
        mark = np.zeros(len(self.fold), dtype=bool)
        moved = np.flatnonzero(e2g[layer] != cand[layer])
        for e in moved:
            mark[self.selecting[layer][e]] = True
        if layer > 0:
            for e in np.flatnonzero(e2g[layer - 1] != cand[layer - 1]):
                mark[self.top1[layer - 1][e]] = True
        return np.flatnonzero(mark), moved

    def _delta(self, e2g: np.ndarray, cand: np.ndarray, layer: int, tokens: np.ndarray,
               moved: np.ndarray) -> np.ndarray:
        """The counts of `tokens` int [n] at `layer` under cand minus those under e2g, the current
        placement, float [2, M, G, G]: the numbers of `_count(e2g, layer, tokens, cand)`, without
        its sort. `tokens` holds (at least) those of `_touched`, `moved` its experts.

        A token sends to each GPU holding one of its experts other than its home (dispatch) and
        each such GPU other than its top-1 GPU sends back (combine), once per GPU: the GPUs where
        its multiplicity is positive. Where its home (top-1 GPU) stays, its dispatch (combine)
        entries change only at the GPUs where that positivity changed, some of `cols`, the old
        and new GPUs of the moved experts; where it changed, its whole old row goes, the new comes."""
        num_gpus, groups = self.num_gpus, max(self.num_folds, 1)
        flat = num_gpus * num_gpus
        mult = self.mult[layer]
        cols = np.unique(np.concatenate([e2g[layer][moved], cand[layer][moved]]))  # int [c]
        before = np.take(mult[cols], tokens, axis=1)  # int [c, n]
        after = before.copy()
        self.pos[tokens] = np.arange(len(tokens))
        for e, was, now in zip(moved, np.searchsorted(cols, e2g[layer][moved]), np.searchsorted(cols, cand[layer][moved])):
            rows = self.pos[self.selecting[layer][e]]  # a token selects an expert once: no repeats
            after[was, rows] -= 1
            after[now, rows] += 1
        # +1 / -1 where GPU cols[j] starts / stops serving the token, int8 [c, n]
        present = (after > 0).view(np.int8) - (before > 0).view(np.int8)
        fold_at = self.fold_at[tokens]
        if layer == 0:
            home_old = home_new = self.fold_home0[tokens]
        else:
            first = self.first[layer - 1][tokens]
            home_old, home_new = e2g[layer - 1][first], cand[layer - 1][first]
        first = self.first[layer][tokens]
        gpu = np.arange(num_gpus)
        # Entries of the flat counts [2, groups, G, G] and their +1 / -1. A token's own home
        # (top-1 GPU) is not skipped: it lands on the diagonal, which is zeroed at the end (no
        # token sends to its home or has its top-1 GPU send back to itself).
        index, weight = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int8)]
        for phase, (here_old, here_new) in enumerate(((home_old, home_new), (e2g[layer][first], cand[layer][first]))):
            # phase 0, dispatch: entry (home, serving GPU); 1, combine: (serving GPU, top-1 GPU)
            row = fold_at + phase * groups * flat
            stride = (num_gpus, 1) if phase == 0 else (1, num_gpus)
            if len(cols):  # every token as if its home stayed
                index.append(((row + here_old * stride[0])[None, :] + (cols * stride[1])[:, None]).ravel())
                weight.append(present.ravel())
            moves = np.flatnonzero(here_old != here_new)
            if len(moves) == 0:
                continue
            # where it moved, that put (new - old) at cols on the old home's row, which should
            # instead lose its old row and the new gain the new: the old row less the new at
            # cols is the new row (the two differ only at cols), so the old row loses it all
            served = np.take(mult, tokens[moves], axis=1) > 0  # bool [G, m]
            served[cols] = after[:, moves] > 0
            served = served.view(np.int8)
            for here, sign in ((here_old, -1), (here_new, 1)):
                index.append(((row + here * stride[0])[None, moves] + (gpu * stride[1])[:, None]).ravel())
                weight.append(served.ravel() * np.int8(sign))
        grouped = np.bincount(np.concatenate(index), weights=np.concatenate(weight),
                              minlength=2 * groups * flat).reshape(2, groups, num_gpus, num_gpus)
        grouped.reshape(-1, flat)[:, ::num_gpus + 1] = 0.0  # the diagonals
        if self.num_folds == 0:
            return grouped
        whole = grouped.sum(1, keepdims=True)
        if layer == 0:  # the whole set's own round-robin homes (they stay): its dispatch apart
            at = (self.all[0].home0[tokens] * num_gpus)[None, :] + cols[:, None]
            whole[0, 0] = np.bincount(at.ravel(), weights=present.ravel(), minlength=flat).reshape(num_gpus, num_gpus)
            whole[0, 0].reshape(-1)[::num_gpus + 1] = 0.0
        return np.concatenate([whole, grouped], axis=1)

    def _costs(self, e2g: np.ndarray, layer: int, counts: np.ndarray) -> np.ndarray:
        """float [M, 3]: smoothed_costs of every model from its counts [2, M, G, G]."""
        whole = self.all[0]
        return smoothed_costs(whole.cost, whole.links, e2g[layer], self.loads[:, layer], self.active[:, layer],
                              self.scales, counts)

    def _per_model(self, costs: list[np.ndarray]) -> list[np.ndarray]:
        """Per-layer costs float [M, 3] each -> float [layers, 3] for each model."""
        return list(np.stack(costs, axis=1))

    def layer(self, e2g: np.ndarray, layer: int) -> list[np.ndarray]:
        """(compute, dispatch, combine) of one layer for each model, float [3] each."""
        return list(self._costs(e2g, layer, self._count(e2g, layer)))

    def layers(self, e2g: np.ndarray, layers: list[int]) -> list[np.ndarray]:
        """float [len(layers), 3] for each model."""
        return self._per_model([self._costs(e2g, layer, self._count(e2g, layer)) for layer in layers])

    def reset(self, e2g: np.ndarray) -> list[np.ndarray]:
        """Make e2g the current placement; its float [L, 3] for each model."""
        self.e2g = e2g.copy()
        self.mult = [self._multiplicities(row, layer) for layer, row in enumerate(e2g)]
        self.counts = [self._count(e2g, layer) for layer in range(e2g.shape[0])]
        self.proposed = None
        return self._per_model([self._costs(e2g, layer, c) for layer, c in enumerate(self.counts)])

    def propose(self, e2g: np.ndarray, cand: np.ndarray, touched: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Layers `touched` of `cand`, which differs from the current placement e2g at no layer
        outside `touched` and at none whose next layer is outside it: (float [len(touched), 3]
        for each model, the counts to `commit` if cand is kept)."""
        assert np.array_equal(e2g, self.e2g), "propose from the current placement (the one reset or committed)"
        num_tokens = len(self.fold)
        new_counts = []
        for layer in touched:
            tokens, moved = self._touched(e2g, cand, layer)
            if len(tokens) == 0:
                new_counts.append(self.counts[layer])
            elif 2 * len(tokens) > num_tokens:  # cheaper to count them all
                new_counts.append(self._count(cand, layer))
            else:
                new_counts.append(self.counts[layer] + self._delta(e2g, cand, layer, tokens, moved))
        # all touched layers of all models in one evaluation, as models of their own
        num_models, whole = len(self.all), self.all[0]
        stacked = smoothed_costs(whole.cost, whole.links, np.repeat(cand[touched], num_models, axis=0),
                                 self.loads[:, touched].transpose(1, 0, 2).reshape(len(touched) * num_models, -1),
                                 self.active[:, touched].transpose(1, 0, 2).reshape(len(touched) * num_models, -1),
                                 np.tile(self.scales, len(touched)), np.concatenate(new_counts, axis=1))
        self.proposed = ({layer: cand[layer].copy() for layer in touched}, new_counts)
        return list(stacked.reshape(len(touched), num_models, 3).transpose(1, 0, 2)), new_counts

    def commit(self, touched: list[int], new_counts: list[np.ndarray]) -> None:
        """Make the candidate of the last `propose` (whose counts new_counts are) current."""
        assert self.proposed is not None and self.proposed[1] is new_counts, "commit what propose just gave"
        rows = self.proposed[0]
        for layer, c in zip(touched, new_counts):
            self.counts[layer] = c
            if (rows[layer] != self.e2g[layer]).any():
                self.e2g[layer] = rows[layer]
                self.mult[layer] = self._multiplicities(rows[layer], layer)
        self.proposed = None


def _tokens_by_expert(ids: np.ndarray, num_experts: int) -> list[np.ndarray]:
    """The tokens selecting each expert: ids int [T, k] -> num_experts int arrays of token indices."""
    order = np.argsort(ids.ravel(), kind="stable")
    tokens = (order // ids.shape[1]).astype(np.int32 if len(ids) < 2**31 else np.int64)
    return np.split(tokens, np.cumsum(np.bincount(ids.ravel(), minlength=num_experts))[:-1])


def solve_latency(trace: Trace, num_gpus: int, gpus_per_node: int, time_limit: float, seed: int,
                  progress: bool = False, *, cluster: str | None = None, model_config: str | None = None,
                  cost: CostModel | None = None, compute_weight: float = 1.0, redundant: int = 0,
                  max_experts_per_gpu_total: int | None = None,
                  traffic_options: dict[str, Any] | None = None) -> SolveOutcome:
    """The `latency` objective (module docstring) -> solver.SolveOutcome.

    1. starts: the traffic and balance placements, the better one by the acceptance rule (at
       most S primaries a GPU where G divides E + R but not E: primary_slots);
    2-3. per-layer LP and swap descent (and cap moves) from it, each step through that rule
       (under a cap with G | E: the equal-count search, continued under the cap);
    4. replicas, on the searched placement and on the starts, the best kept;
    5. a lower bound on the predicted time, and the gap.
    """
    from moeplace.solve.solver import SolveOutcome, relative_gap

    if cost is None:
        if cluster is None:
            raise MoeplaceError("--objective latency needs --cluster CONFIG.yaml (see configs/cluster/)")
        cost = load_cost_model(cluster, model_config)
    cost.check(num_gpus, gpus_per_node)
    cap = max_experts_per_gpu_total
    _check_arguments(trace, num_gpus, redundant, cap)  # before the cost models are built: cheap errors first
    start = time.monotonic()
    end = start + time_limit
    deadline = start + (0.6 if redundant else 1.0) * time_limit  # the rest is the replicas'
    exact = LatencyModel(cost, trace, compute_weight)  # the reported value: the cost model as eval predicts it
    model = LatencyModel(cost, trace, compute_weight, smooth=True)  # what the search and the acceptance rule see
    token_folds = fold_tokens(trace.num_tokens, seed)
    models = SearchModels(model, token_folds)
    bar = Progress("latency", enabled=progress)

    # 1. starts
    slots = primary_slots(trace.num_experts, num_gpus, redundant, cap)  # G does not divide E, E + R: uneven primaries
    firsts = _starts(trace, num_gpus, gpus_per_node, time_limit, seed, cap, traffic_options, slots)
    starts: dict[str, np.ndarray] = {name: first.expert_to_gpu for name, first in firsts.items()}
    all_layers = list(range(trace.num_layers))
    costs = {name: np.array([m.weighted(p) for m, p in zip(models.all, models.layers(x, all_layers))])
             for name, x in starts.items()}  # [whole, *folds] per start
    scored = {name: float(c[0]) for name, c in costs.items()}

    def pick_start(balance: str) -> str:
        """traffic, or the balance start `balance` if it passes the acceptance rule against it."""
        if "traffic" not in starts or significant(scored[balance] - scored["traffic"],
                                                  costs[balance][1:] - costs["traffic"][1:]):
            return balance
        return "traffic"

    # 2-3. search, in place on `best`
    chains: dict[str, float] | None = None
    if "balance equal" in starts:
        # Under a cap with G | E the equal-count layouts are feasible too, yet a capped search can
        # end worse than the equal-count one, even on the training tokens: its cap moves draw from
        # the same generator, so its swaps take another path. So the equal-count search runs as
        # without a cap and then goes on with the cap's steps from its result (no worse on the
        # training tokens, each step through the acceptance rule). The capped search from the
        # starts runs only where its start differs (the capped balance placement): from the same
        # start it is the same search on another random path, and picking the better of two paths
        # on the training tokens picks their noise. Of two searches, the lower search cost wins
        # (ties: the first), a choice between whole candidates as in step 4.
        start_name = pick_start("balance equal")
        best = starts[start_name].copy()
        bar.update(0, f"start {start_name} (equal counts), search cost {scored[start_name]:.1f}")
        rng = np.random.default_rng(seed)
        stats, _ = _search(models, best, num_gpus, None, rng, deadline, bar)
        more, parts = _search(models, best, num_gpus, cap, rng, deadline, bar)
        stats = {k: stats.get(k, 0) + v for k, v in more.items()}
        chains = {"equal then cap": model.weighted(parts[0])}
        capped_start = pick_start("balance")
        if not np.array_equal(starts[capped_start], starts[start_name]):
            capped = starts[capped_start].copy()
            bar.update(0, f"start {capped_start} (capped), search cost {scored[capped_start]:.1f}")
            capped_stats, capped_parts = _search(models, capped, num_gpus, cap, np.random.default_rng(seed), deadline, bar)
            chains["capped"] = model.weighted(capped_parts[0])
            if chains["capped"] < chains["equal then cap"] - 1e-9:
                best, parts, stats, start_name = capped, capped_parts, capped_stats, capped_start
    else:
        start_name = pick_start("balance")
        best = starts[start_name].copy()
        bar.update(0, f"start {start_name}, search cost {scored[start_name]:.1f}")
        stats, parts = _search(models, best, num_gpus, cap, np.random.default_rng(seed), deadline, bar, slots)
    cut = ["search"] if time.monotonic() > deadline else []  # the steps the time limit cut short
    searched = model.weighted(parts[0])

    # 4. replicas, on the searched placement and on the two starts (module docstring)
    replicas: list[list[tuple[int, int]]] = [[] for _ in range(trace.num_layers)]
    value = exact.weighted(exact.all_layers(best))
    replicas_on = None
    if redundant:
        replicas_on, best, replicas, value = _replicas(exact, best, starts, redundant, end, token_folds)
        if time.monotonic() > end:
            cut.append("replicas")
    cut += _cut_starts(firsts)

    # 5. bound
    bound = latency_bound(exact, num_gpus, redundant, cap)
    bar.close(f"predicted {value:.1f} us (exact loads), bound {bound:.1f}")
    return SolveOutcome(
        expert_to_gpu=best,
        replicas=replicas,
        objective={"name": "latency" if compute_weight == 1.0 else "latency-weighted", "value": value,
                   "compute_weight": compute_weight, "unit": "us (predicted, summed over layers)",
                   "cost_model": cost.describe(), "definition": "docs/cost-model.md"},
        solver={"method": "starts+layer-lp+swap-descent" + ("+replication" if redundant else ""),
                "start": start_name, "start_costs": {name: exact.weighted(exact.all_layers(x)) for name, x in starts.items()},
                "search_costs": {"starts": scored, "final": searched},
                "acceptance": {"z": Z_ACCEPT, "folds": len(models.all) - 1, "loads": "shrunk"},
                "slots_per_gpu": math.ceil((trace.num_experts + redundant) / num_gpus) if cap is None else None,
                "equal_slots": cap is None and (trace.num_experts + redundant) % num_gpus == 0, "max_experts_per_gpu_total": cap,
                "redundant_experts": redundant, "replicas_on": replicas_on, "seed": seed,
                "time_limit_s": time_limit, "seconds": round(time.monotonic() - start, 3),
                "stopped_by_time_limit": bool({"search", "replicas"} & set(cut)), "cut_steps": cut, **stats, **({"cap_searches": chains} if chains else {})},
        bound=bound,
        gap=relative_gap(value, bound),
        starts=starts,
    )


def _cut_starts(firsts: dict[str, Placement | SolveOutcome]) -> list[str]:
    """The starts their own share of the time limit cut short, e.g. "balance start (ilp)": a
    share cut is the start's, not the solve's (solve_latency's docstring)."""
    out = []
    for name, first in firsts.items():
        if first.solver.get("stopped_by_time_limit"):
            steps = first.solver.get("cut_steps")
            out.append(f"{name} start" + (f" ({', '.join(steps)})" if steps else ""))
    return out


def _check_arguments(trace: Trace, num_gpus: int, redundant: int, cap: int | None) -> None:
    """One-line errors for copies or a memory cap no placement can meet."""
    if redundant > trace.num_experts * (num_gpus - 1):
        raise MoeplaceError(f"--redundant-experts {redundant}: at most {trace.num_experts * (num_gpus - 1)} copies "
                            f"fit {plural(num_gpus, 'GPU')} without two copies of one expert on a GPU")
    if cap is not None:
        if redundant:
            raise MoeplaceError("--max-experts-per-gpu-total with --redundant-experts: replicas need equal slots "
                                "per GPU; use --objective balance for both, or drop one")
        total_slots_per_gpu(trace.num_layers, trace.num_experts, num_gpus, 0, cap)  # C x G >= L x E, or a clear error
    num_experts = trace.num_experts
    if cap is None and num_experts % num_gpus and primary_slots(num_experts, num_gpus, redundant, cap) is None:
        fill = (-num_experts) % num_gpus
        raise MoeplaceError(f"{num_experts} experts per layer cannot be split equally over {num_gpus} GPUs: latency needs "
                            f"--max-experts-per-gpu-total, or --redundant-experts R with {num_experts} + R a multiple of "
                            f"{num_gpus} (R = {fill}, {fill + num_gpus}, ...: the copies fill equal slots)")


def primary_slots(num_experts: int, num_gpus: int, redundant: int, cap: int | None) -> int | None:
    """Slots per GPU where G does not divide E but E + R (16 experts + 2 copies on 3 GPUs: 6 each):
    they bound a GPU's primaries per layer, its copies fill the rest (step 4); else None."""
    if cap is None and redundant and num_experts % num_gpus and (num_experts + redundant) % num_gpus == 0:
        return (num_experts + redundant) // num_gpus
    return None


def _starts(trace: Trace, num_gpus: int, gpus_per_node: int, time_limit: float, seed: int, cap: int | None,
            traffic_options: dict[str, Any] | None, slots: int | None = None) -> dict[str, Placement | SolveOutcome]:
    """The balance placement and, where G divides E, the traffic one, each with 0.3 of the time
    (under a cap with G | E also the equal-count balance placement, "balance equal").

    Traffic keeps E / G experts per GPU: where G does not divide E only a cap allows a
    placement, and balance is the one start, or copies that fill `slots` per GPU (primary_slots):
    then both starts hold at most `slots` primaries a GPU, the traffic one as traffic's placement
    of E + R experts, R of them never selected (the slots they take are left to the copies)."""
    from moeplace.solve.solver import solve_traffic

    firsts: dict[str, Placement | SolveOutcome] = {"balance": balance_placement(trace.expert_loads(), num_gpus, gpus_per_node, 0, 0.3 * time_limit,
        max_experts_per_gpu=slots, progress=False, max_experts_per_gpu_total=cap, tight_bound=False)}  # a start: its gap is not used
    if slots is not None:
        # traffic over E + R experts, the R extra never selected: the slots they take are the copies'
        padded = solve_traffic(dataclasses.replace(trace, num_experts=slots * num_gpus), num_gpus, gpus_per_node,
                               0.3 * time_limit, seed, False, **(traffic_options or {}))
        firsts["traffic"] = dataclasses.replace(padded, expert_to_gpu=padded.expert_to_gpu[:, :trace.num_experts])
    if trace.num_experts % num_gpus == 0:
        firsts["traffic"] = solve_traffic(trace, num_gpus, gpus_per_node, 0.3 * time_limit, seed, False,
                                          **(traffic_options or {}))
        if cap is not None:  # the equal-count search's own start (solve_latency, step 2-3)
            firsts["balance equal"] = balance_placement(trace.expert_loads(), num_gpus, gpus_per_node, 0, 0.3 * time_limit,
                                                        progress=False, tight_bound=False)
    return firsts


def _search(models: SearchModels, best: np.ndarray, num_gpus: int, cap: int | None, rng: np.random.Generator,
            deadline: float, bar: Progress, slots: int | None = None) -> tuple[dict[str, int], list[np.ndarray]]:
    """Sweeps of per-layer LP (small layers), swap descent and cap moves (slot moves with
    `slots`, primary_slots) over `best` int [L, E], in place, each change through the acceptance
    rule, until a sweep changes nothing or the deadline -> (counts of accepted steps, the models'
    per-layer parts of the result)."""
    model = models.all[0]
    num_layers, num_experts = best.shape
    parts = models.reset(best)
    moves = "cap_moves_accepted" if cap is not None else "slot_moves_accepted" if slots is not None else None
    stats = {"lp_accepted": 0, "swaps_accepted": 0, "sweeps": 0} | ({moves: 0} if moves else {})
    small = num_experts * num_gpus <= LAYER_LP_MAX_VARS
    lp_refused: dict[int, bytes] = {}  # layer -> its neighbourhood when its LP step was refused
    for sweep in range(20):
        improved = False
        for layer in range(num_layers):
            if time.monotonic() > deadline:
                break
            if small:
                counts = count_range(best, layer, num_gpus, cap, slots)
                # the LP and the test of its rounding read only this layer, its neighbours and the
                # count range: if none changed since the LP here was refused, it would be again
                seen = _lp_inputs(best, layer, counts)
                row = None if lp_refused.get(layer) == seen else \
                    _layer_lp(model, best, layer, max(0.05, deadline - time.monotonic()), counts)
                if row is not None:
                    cand = best.copy()
                    cand[layer] = row
                    if _accept(models, best, cand, parts, [layer]):
                        stats["lp_accepted"] += 1
                        improved = True
                    else:
                        lp_refused[layer] = seen
            n = _swap_descent(models, best, parts, layer, rng, deadline)
            stats["swaps_accepted"] += n
            improved |= n > 0
            if moves:
                n = _cap_moves(models, best, parts, layer, cap, rng, deadline, slots=slots)
                stats[moves] += n
                improved |= n > 0
        stats["sweeps"] = sweep + 1
        bar.update(sweep + 1, f"sweep {sweep + 1}: search cost {model.weighted(parts[0]):.1f}")  # shrunk loads
        if not improved or time.monotonic() > deadline:
            break
    return stats, parts


def _replicas(exact: LatencyModel, searched: np.ndarray, starts: dict[str, np.ndarray], redundant: int, end: float,
              token_folds: list[np.ndarray]) -> tuple[str, np.ndarray, list[list[tuple[int, int]]], float]:
    """`redundant` copies per layer added to the searched placement and to each start (one that
    equals a layout already tried, or is reached after `end`, is skipped) -> (which layout,
    expert_to_gpu int [L, E], replicas, predicted value) of the best."""
    from moeplace.solve import replicate

    pick: tuple[str, np.ndarray, list[list[tuple[int, int]]], float] | None = None
    for name, x in (("search", searched), *starts.items()):
        if pick is not None and (time.monotonic() > end or (x == pick[1]).all()):
            continue
        reps, val = replicate.add_replicas(exact, x, redundant, end, token_folds)
        if pick is None or val < pick[3] - 1e-9:
            pick = (name, x, reps, val)
    assert pick is not None
    return pick[0], pick[1].copy(), pick[2], pick[3]


def _accept(models: SearchModels, best: np.ndarray, cand: np.ndarray, parts: list[np.ndarray],
            layers: list[int]) -> bool:
    """Replace `best` by `cand` (differs at `layers`) in place if the change passes the acceptance
    rule; parts[i] float [L, 3] of models.all[i] (all training tokens, then the folds) kept current."""
    touched = sorted({t for layer in layers for t in (layer, layer + 1) if t < best.shape[0]})
    new, counts = models.propose(best, cand, touched)
    deltas = np.array([m.weighted(n) - m.weighted(p[touched]) for m, n, p in zip(models.all, new, parts)])
    if significant(deltas[0], deltas[1:]):
        best[layers] = cand[layers]
        models.commit(touched, counts)
        for p, n in zip(parts, new):
            p[touched] = n
        return True
    return False


def _swap_descent(models: SearchModels, best: np.ndarray, parts: list[np.ndarray], layer: int,
                  rng: np.random.Generator, deadline: float, tries: int = 64) -> int:
    """Swap two experts of `layer` on different GPUs while the exact cost drops: one expert from
    the GPU with the most compute or traffic, the other at random. Returns swaps accepted."""
    model = models.all[0]
    expert_load = models.selections[layer]  # integers: the GPU sums below are exact
    accepted = 0
    for _ in range(tries):
        if time.monotonic() > deadline:
            break
        row = best[layer]
        load = np.bincount(row, weights=expert_load, minlength=model.cost.cluster.num_gpus)
        hot = np.flatnonzero(row == np.argmax(load)) if rng.random() < 0.5 else np.arange(len(row))
        a = int(rng.choice(hot))
        others = np.flatnonzero(row != row[a])
        if not others.size:  # the layer's experts all on one GPU (--gpus 1): nothing to swap
            break
        b = int(rng.choice(others))
        cand = best.copy()
        cand[layer, [a, b]] = cand[layer, [b, a]]
        accepted += _accept(models, best, cand, parts, [layer])
    return accepted


def count_range(e2g: np.ndarray, layer: int, num_gpus: int, cap: int | None,
                slots: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(least, most) experts each GPU may hold at `layer`, int [G] each: E / G both without a total
    cap; with one, at least 1 and at most what the GPU's other layers leave of the cap; with
    `slots` (primary_slots: copies fill every GPU to it), at least 1 (0 where G > E) and at most it."""
    num_experts = e2g.shape[1]
    if slots is not None:
        return np.full(num_gpus, int(num_experts >= num_gpus)), np.full(num_gpus, slots)
    if cap is None:
        equal = np.full(num_gpus, num_experts // num_gpus)
        return equal, equal
    counts = layer_counts(e2g.T[:, :, None], num_gpus).astype(np.int64)  # experts per GPU, [L, G]
    others = counts.sum(0) - counts[layer]
    return np.ones(num_gpus, dtype=np.int64), cap - others


def _cap_moves(models: SearchModels, best: np.ndarray, parts: list[np.ndarray], layer: int, cap: int | None,
               rng: np.random.Generator, deadline: float, tries: int = 16, *, slots: int | None = None) -> int:
    """Under a total cap: move an expert off `layer`'s slowest GPU a (by token load) to a GPU b.
    If b has room under the cap, alone; else paired with a move of one of b's experts to a at the
    layer where a has the most spare load (so totals stay put). With per-layer `slots` instead
    (primary_slots), b is one with a free slot at `layer`, and the move is alone. Returns moves accepted."""
    model = models.all[0]
    num_gpus = model.cost.cluster.num_gpus
    expert_load = models.selections  # [L, E]
    accepted = 0
    for _ in range(tries if num_gpus > 1 else 0):
        if time.monotonic() > deadline:
            break
        counts = layer_counts(best.T[:, :, None], num_gpus)  # experts per GPU, [L, G]
        gpu_load = np.stack([np.bincount(row, weights=w, minlength=num_gpus) for row, w in zip(best, expert_load)])
        a = int(np.argmax(gpu_load[layer]))
        if counts[layer, a] < 2:
            break
        room = np.arange(num_gpus) != a
        if slots is not None:
            room &= counts[layer] < slots
            if not room.any():
                break
        b = int(rng.choice(np.flatnonzero(room)))
        cand = best.copy()
        cand[layer, rng.choice(np.flatnonzero(best[layer] == a))] = b
        changed = [layer]
        if cap is not None and counts[:, b].sum() >= cap:
            # the partner layer: b can give one up and a has the most spare load there
            ok = np.flatnonzero((counts[:, b] >= 2) & (np.arange(best.shape[0]) != layer))
            if len(ok) == 0:
                continue
            spare = gpu_load[ok].max(1) - gpu_load[ok, a]
            partner = int(ok[np.argmax(spare)])
            mine = np.flatnonzero(best[partner] == b)
            cand[partner, mine[np.argmin(expert_load[partner, mine])]] = a
            changed.append(partner)
        accepted += _accept(models, best, cand, parts, changed)
    return accepted


def _lp_inputs(e2g: np.ndarray, layer: int, counts: tuple[np.ndarray, np.ndarray]) -> bytes:
    """What the LP step at `layer` and the test of its rounding read of the placement."""
    return b"".join(a.tobytes() for a in (e2g[max(0, layer - 1):layer + 2], *counts))


def _layer_lp(model: LatencyModel, e2g: np.ndarray, layer: int, time_limit: float,
              counts: tuple[np.ndarray, np.ndarray]) -> np.ndarray | None:
    """Re-place one layer given its neighbours: the LP relaxation of the linear surrogate of the
    module docstring (GPU g holding between counts[0][g] and counts[1][g] experts, count_range),
    rounded by `round_assignment`. Returns int [E]: the new row, or None if unsolved.

    An LP and not the MILP: HiGHS needs seconds per layer to close the MILP, so a MILP step
    would be cut by a time limit, and its incumbent (hence the placement) would depend on the
    machine's speed. The LP solves to optimality in ~0.1 s and its rounding is deterministic."""
    cost, trace = model.cost, model.trace
    num_gpus, num_experts = cost.cluster.num_gpus, trace.num_experts
    ids = trace.topk_ids
    scale, m, c = model.scale, cost.model, cost.cluster
    links = model.links
    least, most = counts
    # us per token hidden state sent over each link class, per phase
    us = {cls: m.hidden_size * m.dispatch_bytes * scale / (bw * 1e3) for cls, bw in ((INTRA, c.intra_GBps), (INTER, c.inter_GBps))}
    home = model.home0 if layer == 0 else e2g[layer - 1][ids[:, layer - 1, 0]]
    homed = flow_counts(home, ids[:, layer], num_gpus, num_experts)  # tokens at GPU h selecting expert e
    load = model.loads[layer] if model.loads is not None else np.bincount(ids[:, layer].ravel(), minlength=num_experts) * scale
    # HiGHS refuses coefficients past 1e15 (PuLP then fails on an IndexError), which a batch of 2**40
    # tokens or a slow expert reaches: divide all by one power of two, which leaves the solution as it is
    unit = lp_unit(max(m.expert_us_per_token * float(load.max()), max(us.values()) * len(ids)))
    us = {cls: u / unit for cls, u in us.items()}
    per_token = m.expert_us_per_token / unit

    prob = pulp.LpProblem("latency_layer", pulp.LpMinimize)
    x = {(e, g): pulp.LpVariable(f"x_{e}_{g}", 0, 1) for e in range(num_experts) for g in range(num_gpus)}
    t_comp, t_in, t_out = (pulp.LpVariable(n, lowBound=0) for n in ("compute", "dispatch_in", "dispatch_next"))
    prob += model.w * t_comp + t_in + t_out
    for e in range(num_experts):
        prob += pulp.lpSum(x[e, g] for g in range(num_gpus)) == 1
    for g in range(num_gpus):
        held = pulp.lpSum(x[e, g] for e in range(num_experts))
        if least[g] == most[g]:
            prob += held == int(least[g])
        else:
            prob += held >= int(least[g])
            prob += held <= int(most[g])
        prob += t_comp >= _expr((x[e, g], per_token * float(load[e])) for e in range(num_experts))
        for cls in (INTRA, INTER):
            peers = np.flatnonzero(links[g] == cls).tolist()
            if len(peers) == 0:
                continue
            # this layer's dispatch: tokens at g whose expert sits on a peer; tokens at peers whose expert sits on g
            prob += t_in >= _expr((x[e, p], us[cls] * float(homed[g, e]))
                                  for e in range(num_experts) for p in peers if homed[g, e])
            into = homed[peers].sum(0)
            prob += t_in >= _expr((x[e, g], us[cls] * float(into[e])) for e in range(num_experts) if into[e])
    if layer + 1 < trace.num_layers:
        # next layer's dispatch: tokens whose top-1 here is e start on e's GPU; their next experts are fixed
        nxt_gpu = e2g[layer + 1][ids[:, layer + 1]]  # [T, k]
        flow = flow_counts(ids[:, layer, 0], nxt_gpu, num_experts, num_gpus)  # tokens with top-1 e going to GPU d next
        for g in range(num_gpus):
            for cls in (INTRA, INTER):
                peers = np.flatnonzero(links[g] == cls).tolist()
                if len(peers) == 0:
                    continue
                out = flow[:, peers].sum(1)
                prob += t_out >= _expr((x[e, g], us[cls] * float(out[e])) for e in range(num_experts) if out[e])
                prob += t_out >= _expr((x[e, p], us[cls] * float(flow[e, g]))
                                       for e in range(num_experts) for p in peers if flow[e, g])
    prob.solve(highs(time_limit))
    if not proven_optimal(prob):  # a time-limited LP iterate would depend on the machine's speed
        return None
    frac = np.array([[x[e, g].varValue or 0.0 for g in range(num_gpus)] for e in range(num_experts)])
    return round_assignment(frac, least, most)


def lp_unit(largest: float) -> float:
    """The power of two to divide LP coefficients by so that `largest` stays below 2**32 (1:
    it does already, as with any realistic batch, so the LP is left unchanged)."""
    if not largest > 2.0**32:
        return 1.0
    return 2.0 ** (math.frexp(largest)[1] - 32)


def _expr(terms: Iterable[tuple[pulp.LpVariable, float]]) -> pulp.LpAffineExpression:
    """sum of coefficient x variable, built in one go: the same expression, term for term, as
    `c * pulp.lpSum(a * v ...)`, which builds an expression per term (80% of the LP step)."""
    return pulp.LpAffineExpression(list(terms))


def round_assignment(frac: np.ndarray, least: np.ndarray, most: np.ndarray) -> np.ndarray:
    """Round a fractional placement frac float [E, G] to GPU ids int [E] with GPU g holding between
    least[g] and most[g] experts, maximising the kept fraction sum_e frac[e, gpu(e)]: an optimal
    assignment of experts to GPU slots, the `least` slots of each GPU made mandatory by a bonus
    larger than any sum of fractions (requires sum(least) <= E <= sum(most))."""
    num_experts, num_gpus = frac.shape
    slot_gpu = np.repeat(np.arange(num_gpus), most)
    mandatory = np.concatenate([np.arange(m) < lo for lo, m in zip(least, most)])
    value = frac[:, slot_gpu] + (num_experts + 1.0) * mandatory[None, :]
    rows, cols = linear_sum_assignment(value, maximize=True)
    out = np.empty(num_experts, dtype=np.int64)
    out[rows] = slot_gpu[cols]
    return out


def latency_bound(model: LatencyModel, num_gpus: int, redundant: int, cap: int | None = None) -> float:
    """A valid lower bound on the weighted cost (module docstring, step 5). Under a total cap a
    GPU may hold up to E - G + 1 experts of a layer (each other GPU keeps one), and no more than
    the cap leaves after one per other layer."""
    trace, cost = model.trace, model.cost
    c, m = cost.cluster, cost.model
    slots = math.ceil((trace.num_experts + redundant) / num_gpus)
    if cap is not None:
        slots = max(slots, min(trace.num_experts - num_gpus + 1, cap - (trace.num_layers - 1)))
    loads = trace.expert_loads() * model.scale
    # an expert's copies together are at least as likely active as one copy taking all its tokens
    # (1 - (1 - p)^B is concave and 0 at 0, so subadditive): the layout-free active count
    active = active_probability(trace.expert_loads() / trace.num_tokens, trace.num_tokens, model.scale).sum(1)
    # a GPU sends on its NVLink and its network link at once (costmodel.alltoall_us): at best
    # every byte moves at the two bandwidths summed
    bandwidth = (c.intra_GBps if c.gpus_per_node > 1 else 0.0) + (c.inter_GBps if c.num_nodes > 1 else 0.0)
    latency = min(c.intra_latency_us, c.inter_latency_us) if c.num_nodes > 1 else c.intra_latency_us
    pairs = trace.num_experts ** 2 <= MAX_BOUND_PAIRS
    total = 0.0
    for layer in range(trace.num_layers):
        # the slowest GPU is at least the mean GPU, and at least the hottest replica's tokens
        mean = (m.expert_fixed_us * active[layer] + m.expert_us_per_token * loads[layer].sum()) / num_gpus
        compute = max(mean, m.expert_us_per_token * replication_bound(loads[layer], num_gpus, redundant))
        # messages per phase, summed over tokens: any GPU, then only those crossing nodes
        ids = trace.topk_ids[:, layer]
        gpu_msgs = float(max(0, math.ceil(trace.top_k / slots) - 1) * trace.num_tokens)
        node_msgs = 0.0
        if pairs:
            together = coselection(ids, trace.num_experts)
            gpu_msgs = max(gpu_msgs, spread_bound(together, trace.top_k, slots - 1, redundant, num_gpus))
            if c.num_nodes > 1:
                node_msgs = spread_bound(together, trace.top_k, c.gpus_per_node * slots - 1, redundant, c.num_nodes)
        dispatch_msgs = gpu_msgs
        if layer > 0 and pairs and redundant == 0:  # a token's GPU is its previous top-1 expert's
            dispatch_msgs = max(gpu_msgs, moved_bound(trace.topk_ids[:, layer - 1, 0], ids, trace.num_experts, slots))
        comm = 0.0
        for msgs, dtype_bytes in ((dispatch_msgs, m.dispatch_bytes), (gpu_msgs, m.combine_bytes)):
            volume = model.scale * m.hidden_size * dtype_bytes / num_gpus / 1e3  # bytes per GPU / 1e3
            if msgs > 0 or node_msgs > 0:
                comm += max(msgs * volume / bandwidth, node_msgs * volume / c.inter_GBps) + latency
        total += model.w * compute + comm
    return total


# The co-selection counts of the communication bound are [E, E] per layer: skipped above this
MAX_BOUND_PAIRS = 2048 ** 2


def spread_bound(together: np.ndarray, top_k: int, partners: int, redundant: int, max_copies: int) -> float:
    """Least sum over tokens of (places serving the token's k experts - 1), for any layout where a
    place (a GPU, or a node) holds at most partners + 1 expert copies of the layer and the layer
    has `redundant` extra copies, each expert on at most max_copies places.

    together float [E, E] co-selection counts (`affinity.coselection`). Why it holds:
    1. a token whose experts sit on D places has at most floor(k/2) * ceil(k/2) pairs split per
       place beyond the first (a cut into D parts splits the most pairs per part at D = 2), so
       D - 1 >= split pairs / (floor(k/2) * ceil(k/2));
    2. a pair served on one place must sit together somewhere: expert i with c_i copies sits
       with at most c_i * partners others, so at least its row sum less its c_i * partners
       largest entries is split; each split pair is counted from both ends;
    3. the copies that minimise that sum: c_i >= 1, sum(c_i - 1) <= redundant, c_i <= max_copies;
       each row's loss is convex in c_i (its sorted entries fall), so giving copies one at a time
       to the largest drop is optimal.
    """
    per_place = (top_k // 2) * ((top_k + 1) // 2)
    if per_place == 0 or partners <= 0:
        return 0.0
    num_experts = together.shape[0]
    ranked = -np.sort(-together, axis=1)
    kept = np.concatenate([np.zeros((num_experts, 1)), np.cumsum(ranked, axis=1)], axis=1)  # [E, E + 1]
    row = kept[:, -1]

    def lost(copies: np.ndarray) -> np.ndarray:
        return row - kept[np.arange(num_experts), np.minimum(copies * partners, num_experts)]

    copies = np.ones(num_experts, dtype=np.int64)
    for _ in range(min(redundant, num_experts * (max_copies - 1))):
        drop = lost(copies) - lost(copies + 1)
        drop[copies >= max_copies] = -1.0
        best = int(np.argmax(drop))
        if drop[best] <= 0:
            break
        copies[best] += 1
    return float(lost(copies).sum()) / 2 / per_place


def moved_bound(previous_top1: np.ndarray, ids: np.ndarray, num_experts: int, slots: int) -> float:
    """Least number of tokens whose GPU holds none of their k experts (each such token sends at
    least one dispatch message), without replicas: the GPU of previous top-1 expert i holds at
    most `slots` experts of this layer, so at most the `slots` largest entries of i's row of
    transitions stay home. previous_top1 int [T]; ids int [T, k]."""
    flow = flow_counts(previous_top1, ids, num_experts, num_experts)
    stay = np.minimum(-np.sort(-flow, axis=1)[:, :slots].sum(1), np.bincount(previous_top1, minlength=num_experts))
    return float(len(previous_top1) - stay.sum())
