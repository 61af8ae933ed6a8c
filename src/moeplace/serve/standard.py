"""Classic expert parallelism: dispatch to the experts' ranks, combine back to the home rank.

DeepSpeed/Megatron style. A token lives on a fixed home rank (its sequence's). At each MoE layer:

    1. route on the home rank: ids, weights [n, k]
    2. dispatch Alltoall: one row [h | ids | weights | slot] per (token, distinct rank holding one
       of its experts); a rank holding several of a token's experts gets the row once
    3. each rank applies its experts to the rows it received: partial sums [m, H]
    4. combine Alltoall: the exact reverse of step 2 (no counts needed), partials only [m, H]
    5. home rank: h + sum of the partials

Cross-rank rows per token-layer: |distinct expert ranks other than home| in each direction.
"""

from __future__ import annotations

import torch

from moeplace.serve.dist import Comm, pack, unpack
from moeplace.serve.model import RankModel


def destinations(expert_gpu: torch.Tensor, ids: torch.Tensor,
                 world: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Distinct ranks of each token's experts, grouped by rank.

    expert_gpu [E], ids [n, k] -> (dest rank [m], token index [m], rows per rank [world]),
    rows sorted by (rank, token).
    """
    hit = torch.zeros(ids.shape[0], world, dtype=torch.bool, device=ids.device)
    hit.scatter_(1, expert_gpu[ids], True)
    dest, token = torch.nonzero(hit.T, as_tuple=True)
    return dest, token, torch.bincount(dest, minlength=world).tolist()


def moe_standard(model: RankModel, comm: Comm, expert_gpu: torch.Tensor, moe: int, h: torch.Tensor,
                 slots: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """One MoE layer for the tokens homed here: h [n, H] -> h + moe(h) [n, H].

    ids [n, k] / weights [n, k]: their routing at this layer (computed on the home rank, step 1).
    """
    k, hidden = model.spec.top_k, h.shape[1]
    _, token, send_counts = destinations(expert_gpu[moe], ids, comm.world)
    rows = pack(h[token], ids[token], weights[token], slots[token])
    got, recv_counts = comm.alltoall(rows, send_counts, "dispatch", moe)
    rh, rids, rweights, _ = unpack(got, hidden, [(k, torch.int32), (k, torch.float32), (1, torch.int32)])
    partial = model.experts(moe, rh, rids.long(), rweights)
    back, _ = comm.alltoall(partial, recv_counts, "combine", moe, recv_counts=send_counts)
    moe_out = torch.zeros_like(h).index_add_(0, token, back)
    return h + moe_out
