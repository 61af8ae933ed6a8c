"""Context-coherent expert parallelism (ExFlow): in decode a token continues where its expert is.

Every rank holds the KV cache of every sequence (see generate.py: each step's new K/V entries are
replicated once per step), so attention can run wherever a token happens to be. At each MoE
layer, for the tokens currently on this rank:

    1. route here: ids, weights [n, k] and the rank serving each choice, gpus [n, k] (see
       standard.py); the token's next rank is g1 = the rank serving its top-1 choice
    2. dispatch Alltoall: a row [h | ids | weights | slot] to each distinct rank serving one of
       its choices other than this one (the residual h travels, so g1 can continue the token)
    3. each rank applies its experts to the choices it serves in the rows it holds (kept or
       received): partial sums
    4. combine Alltoall (k > 1 only): partials of ranks other than g1 go to g1, ordered by slot,
       so g1 knows what arrives without a counts exchange
    5. g1 continues the token with h + sum of partials; the others drop their copy

Top-1: exactly one Alltoall per MoE layer (no combine). A token whose experts all sit on its
current rank sends nothing. Cross-rank rows per token-layer: |D - {here}| dispatch and |D| - 1
combine, D = the distinct ranks serving its k choices.
"""

from __future__ import annotations

import torch

from moeplace.serve.dist import Comm, pack, unpack
from moeplace.serve.model import RankModel
from moeplace.serve.standard import destinations, row_ids, serving_ranks


def moe_coherent(model: RankModel, comm: Comm, moe: int, h: torch.Tensor, slots: torch.Tensor, ids: torch.Tensor,
                 weights: torch.Tensor, gpus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoE layer for the tokens here: (h [n, H], slots [n]) -> the tokens that continue here.

    ids [n, k] / weights [n, k] / gpus [n, k]: their routing at this layer (step 1).
    Returns (h + moe(h), slots) of the tokens whose top-1 choice is served here, slot-sorted.
    """
    k, hidden, rank, world = model.spec.top_k, h.shape[1], comm.rank, comm.world
    dest, token, send_counts = destinations(gpus, world)
    rows = pack(h[token], row_ids(ids[token], gpus[token], dest), weights[token], slots[token])
    got, _ = comm.alltoall(rows, send_counts, "dispatch", moe)
    rh, rids, rweights, rslots = unpack(got, hidden, [(k, torch.int32), (k, torch.float32), (1, torch.int32)])
    rids, rslots = rids.long(), rslots[:, 0].long()
    partial = model.experts(moe, rh, rids, rweights)
    comm.counters.record_served(moe, (rids >= 0).sum())  # the choices run here (others are negative)
    rgpus = serving_ranks(rids, rank)
    g1 = rgpus[:, 0]
    mine = torch.nonzero(g1 == rank, as_tuple=True)[0]
    mine = mine[torch.argsort(rslots[mine])]
    moe_out = partial[mine]
    if k > 1:
        # send partials of tokens continuing elsewhere, grouped by g1 and slot-ordered
        away = torch.nonzero(g1 != rank, as_tuple=True)[0]
        away = away[torch.argsort(g1[away] * (int(rslots.max()) + 1) + rslots[away])] if away.numel() else away
        send = torch.bincount(g1[away], minlength=world).tolist()
        # partials expected for my tokens: one from each other rank serving one of their choices
        dest, tok, _ = destinations(rgpus[mine], world)
        other = dest != rank
        dest, tok = dest[other], tok[other]
        recv = torch.bincount(dest, minlength=world).tolist()
        back, _ = comm.alltoall(partial[away], send, "combine", moe, recv_counts=recv)
        moe_out = moe_out.index_add(0, tok, back)  # tok is slot-ordered within each source rank
    return rh[mine] + moe_out, rslots[mine]
