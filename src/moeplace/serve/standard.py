"""Classic expert parallelism: dispatch to the experts' ranks, combine back to the home rank.

DeepSpeed/Megatron style. A token lives on a fixed home rank (its sequence's). At each MoE layer:

    1. route on the home rank: ids, weights [n, k]; the rank serving each choice, gpus [n, k]
       (the expert's rank, or with replicas the copy `metrics.serve_layer` picks)
    2. dispatch Alltoall: one row [h | ids | weights | slot] per (token, distinct rank serving one
       of its choices); a rank serving several of a token's choices gets the row once
    3. each rank applies its experts to the rows it received: partial sums [m, H]
    4. combine Alltoall: the exact reverse of step 2 (no counts needed), partials only [m, H]
    5. home rank: h + sum of the partials

Cross-rank rows per token-layer: |distinct serving ranks other than home| in each direction.

In a row, ids the destination does not serve are written as -1 - (their serving rank): the
destination runs only its own choices (a replica holder must not run a choice sent to another
copy), and in coherent mode it still learns every choice's rank.
"""

from __future__ import annotations

import torch

from moeplace.serve.dist import Comm, pack, unpack
from moeplace.serve.model import RankModel


def destinations(gpus: torch.Tensor, world: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Distinct ranks serving each token's choices, grouped by rank.

    gpus [n, k] -> (dest rank [m], token index [m], rows per rank [world]), rows sorted by
    (rank, token).
    """
    hit = torch.zeros(gpus.shape[0], world, dtype=torch.bool, device=gpus.device)
    hit.scatter_(1, gpus, True)
    dest, token = torch.nonzero(hit.T, as_tuple=True)
    return dest, token, torch.bincount(dest, minlength=world).tolist()


def row_ids(ids: torch.Tensor, gpus: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """Expert ids as sent to `dest` [m]: ids [m, k] served there, -1 - serving rank elsewhere."""
    return torch.where(gpus == dest[:, None], ids, -1 - gpus)


def serving_ranks(rids: torch.Tensor, rank: int) -> torch.Tensor:
    """Inverse of `row_ids` on the receiving rank: the rank serving each choice, [m, k]."""
    return torch.where(rids >= 0, torch.full_like(rids, rank), -1 - rids)


def moe_standard(model: RankModel, comm: Comm, moe: int, h: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, gpus: torch.Tensor) -> torch.Tensor:
    """One MoE layer for the tokens homed here: h [n, H] -> h + moe(h) [n, H].

    ids [n, k] / weights [n, k] / gpus [n, k]: their routing at this layer and the rank serving
    each choice (step 1).
    """
    k, hidden = model.spec.top_k, h.shape[1]
    dest, token, send_counts = destinations(gpus, comm.world)
    rows = pack(h[token], row_ids(ids[token], gpus[token], dest), weights[token], slots[token])
    got, recv_counts = comm.alltoall(rows, send_counts, "dispatch", moe)
    rh, rids, rweights, _ = unpack(got, hidden, [(k, torch.int32), (k, torch.float32), (1, torch.int32)])
    partial = model.experts(moe, rh, rids.long(), rweights)
    comm.counters.record_served(moe, (rids >= 0).sum())  # the choices run here (others are negative)
    back, _ = comm.alltoall(partial, recv_counts, "combine", moe, recv_counts=send_counts)
    moe_out = torch.zeros_like(h).index_add_(0, token, back)
    return h + moe_out
