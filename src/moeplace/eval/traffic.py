"""Predicted cross-rank Alltoall traffic of decoding a routing trace under a placement.

The prediction `moeplace serve` must match (scripts/bench_serve.py checks it against the
runtime's counters). Without replicas it uses the same token -> GPU map as metrics.py
(`token_gpus`), so the coherent dispatch rows of layers 1.. are exactly `dest_gpus_topk` per
token. With replicas it applies the same rule (`metrics.serve_layer`) to the batches the runtime
decides on (`serving_gpus`): one decode step at a time (a sequence's i-th token of the trace is in
step i), tokens ordered by sequence, home = the token's current rank in that mode.

Runtime conventions (src/moeplace/serve): sequence s is homed on rank s % G; every decoded token
of the trace is one row of each MoE layer's Alltoalls. For token t at MoE layer l with distinct
expert ranks D (|D| <= k) and current rank `here`:

    standard   dispatch rows |D - {home}|, combine rows |D - {home}| (the reverse Alltoall)
    coherent   here = home for a sequence's first decoded token, else the top-1 rank of the last
               MoE layer of its previous token; at layer l > 0 here = top-1 rank at l-1;
               dispatch rows |D - {here}|, combine rows |D| - 1 (k > 1 only; none for top-1)

Row sizes: a dispatch row is [hidden | k expert ids | k gate weights | slot] = hidden * b +
4 * (2k + 1) bytes (b: bytes per activation element); a combine row is hidden * b bytes.
Collectives per MoE layer and step: standard 2, coherent 1 for top-1 and 2 for top-k.

Decode tokens only: a `serve --routing-out --routing-prefill` trace also holds its prompt tokens
(meta "phases" has "prefill"; meta "prompt_lengths" gives each sequence's prompt length, below
which its positions are prompt tokens). Prefill is one forward of whole prompts on their home
ranks (standard path, counted apart in serve's --stats-out "prefill"), not decode steps, so
the prediction leaves those tokens out (`decode_tokens`) and says how many (`prompt_tokens`).
Any other trace (`moeplace trace`, imports, decode-only serve files) is taken as decode tokens,
as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeplace.errors import TraceError
from moeplace.eval.metrics import remote_destinations, serve_layer, token_gpus
from moeplace.placement import Placement
from moeplace.trace.format import Trace

MODES = ("standard", "coherent")


def dispatch_row_bytes(hidden_size: int, top_k: int, element_bytes: int) -> int:
    return hidden_size * element_bytes + 4 * (2 * top_k + 1)


def serving_gpus(placement: Placement, trace: Trace, mode: str) -> np.ndarray:
    """GPU serving each token-expert choice in the runtime's batched decode, int64 [T, L, k].

    Without replicas: the experts' GPUs. With replicas, per decode step (all sequences' i-th
    tokens, ordered by sequence, as the runtime's global batch) and layer: serve_layer with
    home = the token's home rank (standard) or its current rank (coherent: where its previous
    token ended at step start, then the top-1 GPU of the previous layer).
    """
    if not any(placement.replicas):
        return token_gpus(placement, trace)
    seq, pos = _sequences(trace)
    num_gpus, num_tokens = placement.num_gpus, trace.num_tokens
    layers = np.arange(trace.num_layers)[None, :, None]
    gpus = placement.expert_to_gpu[layers, trace.topk_ids]  # primaries; replica layers rewritten below
    # 1. step of each token (its rank in its sequence) and the token before it (-1: none)
    order = np.lexsort((pos, seq))
    starts = np.r_[True, seq[order][1:] != seq[order][:-1]]
    run_start = np.maximum.accumulate(np.where(starts, np.arange(num_tokens), 0))
    step = np.empty(num_tokens, dtype=np.int64)
    step[order] = np.arange(num_tokens) - run_start
    prev = np.full(num_tokens, -1, dtype=np.int64)
    prev[order[1:][~starts[1:]]] = order[:-1][~starts[1:]]
    # 2. steps in order (a coherent step starts where the previous one left each token); tokens
    # grouped by step once, by sequence within a step (`order` is by sequence, the sort stable)
    holders = [placement.holders(layer) if placement.replicas[layer] else None for layer in range(trace.num_layers)]
    by_step = order[np.argsort(step[order], kind="stable")]
    for tok in np.split(by_step, np.cumsum(np.bincount(step))[:-1]) if num_tokens else []:
        here = seq[tok] % num_gpus
        if mode == "coherent":
            here = np.where(prev[tok] >= 0, gpus[prev[tok], -1, 0], here)
        for layer, copies in enumerate(holders):
            if copies is not None:
                gpus[tok, layer] = serve_layer(copies, trace.topk_ids[tok, layer], gpus[tok, layer], here,
                                               placement.gpus_per_node, num_gpus)
            if mode == "coherent":
                here = gpus[tok, layer, 0]
    return gpus


def _sequences(trace: Trace) -> tuple[np.ndarray, np.ndarray]:
    if trace.sequence_ids is None or trace.positions is None:
        raise TraceError("traffic prediction needs sequence_ids and positions in the trace")
    return trace.sequence_ids, trace.positions


def start_ranks(trace: Trace, gpus: np.ndarray, num_gpus: int) -> np.ndarray:
    """Rank where each token starts its step in coherent decode, int64 [T].

    Home (sequence % G) for a sequence's first token in the trace, else the top-1 rank at the
    last MoE layer of the token before it in its sequence (by position).
    """
    seq, pos = _sequences(trace)
    start = seq % num_gpus
    order = np.lexsort((pos, seq))
    follows = seq[order][1:] == seq[order][:-1]  # token order[i+1] follows order[i] in its sequence
    start[order[1:][follows]] = gpus[order[:-1][follows], -1, 0]
    return start


def decode_tokens(trace: Trace) -> np.ndarray | None:
    """Indices of the trace's decode tokens, int64 [D] ascending, when it holds prompt tokens
    too (Trace.holds_prompt_tokens): the tokens at or past their sequence's meta "prompt_lengths"
    entry; None when every token is a decode step's. Raises TraceError when the meta cannot
    tell them apart (no valid prompt_lengths: _prompt_length_pairs; or none for one of its
    sequences: a file whose sequence ids were renumbered)."""
    if not trace.holds_prompt_tokens():
        return None
    seq, pos = _sequences(trace)
    pairs = _prompt_length_pairs(trace.meta.get("prompt_lengths"))
    pairs = pairs[np.argsort(pairs[:, 0], kind="stable")]
    at = np.minimum(np.searchsorted(pairs[:, 0], seq), max(len(pairs) - 1, 0))
    listed = pairs[at, 0] == seq if len(pairs) else np.zeros(len(seq), dtype=bool)
    if not listed.all():
        raise TraceError(f"the trace holds prompt tokens (meta phases) but its meta prompt_lengths lists no sequence "
                         f"{int(seq[~listed][0])}: its decode tokens cannot be told from its prompt tokens")
    return np.flatnonzero(pos >= pairs[at, 1])


def _prompt_length_pairs(table: Any) -> np.ndarray:
    """Meta prompt_lengths as int64 [S, 2] (sequence id, prompt length), checked: JSON integers
    (not true/false, floats or strings, which numpy would cast: 3.9 to 3, true to 1), lengths
    >= 0, each sequence once (else which of two lengths holds is a guess). TraceError otherwise."""
    what = "the trace holds prompt tokens (meta phases) but"
    ints = isinstance(table, list) and all(
        isinstance(r, list) and len(r) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                    and -(1 << 63) <= v < 1 << 63 for v in r) for r in table)
    if not ints:
        raise TraceError(f"{what} no valid meta prompt_lengths ([[sequence id, prompt length], ...], integers): its "
                         "decode tokens cannot be told from them")
    pairs = np.array(table, dtype=np.int64).reshape(-1, 2)
    if (pairs[:, 1] < 0).any():
        row = table[int(np.flatnonzero(pairs[:, 1] < 0)[0])]
        raise TraceError(f"{what} its meta prompt_lengths gives sequence {row[0]} a negative length ({row[1]})")
    ids, counts = np.unique(pairs[:, 0], return_counts=True)
    if (counts > 1).any():
        raise TraceError(f"{what} its meta prompt_lengths lists sequence {int(ids[counts > 1][0])} "
                         f"{int(counts[counts > 1][0])} times: which length holds is unknown")
    return pairs


def predict_traffic(placement: Placement, trace: Trace, mode: str, hidden_size: int,
                    element_bytes: int) -> dict[str, Any]:
    """Cross-rank rows and bytes of each Alltoall kind, totals and per decoded token.

    trace: the decoded tokens (sequence_ids and positions required); placement: replicas allowed.
    A trace that also holds prompt tokens (Trace.holds_prompt_tokens) is predicted on its decode
    tokens alone: `tokens` counts those, and `prompt_tokens` the prompt tokens left out.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    placement.check_fits(trace.num_layers, trace.num_experts)
    decode = decode_tokens(trace)
    prompt_tokens = None
    if decode is not None:
        prompt_tokens = trace.num_tokens - len(decode)
        trace = trace.select_tokens(decode)
    num_gpus, k = placement.num_gpus, trace.top_k
    gpus = serving_gpus(placement, trace, mode)  # [T, L, k]
    distinct = remote_destinations(gpus, np.full(gpus.shape[:2], -1))  # |D| [T, L]
    if mode == "standard":
        home = trace.sequence_ids % num_gpus if trace.sequence_ids is not None else None
        if home is None:
            raise TraceError("traffic prediction needs sequence_ids in the trace")
        dispatch = remote_destinations(gpus, np.broadcast_to(home[:, None], gpus.shape[:2]))
        combine = dispatch
    else:
        here = np.concatenate([start_ranks(trace, gpus, num_gpus)[:, None], gpus[:, :-1, 0]], axis=1)
        dispatch = remote_destinations(gpus, here)
        combine = distinct - 1 if k > 1 else np.zeros_like(distinct)
    d_bytes = int(dispatch.sum()) * dispatch_row_bytes(hidden_size, k, element_bytes)
    c_bytes = int(combine.sum()) * hidden_size * element_bytes
    tokens = max(trace.num_tokens, 1)
    return {
        "mode": mode,
        "tokens": trace.num_tokens,
        "dispatch_rows": int(dispatch.sum()),
        "combine_rows": int(combine.sum()),
        "dispatch_bytes": d_bytes,
        "combine_bytes": c_bytes,
        "alltoall_bytes": d_bytes + c_bytes,
        "alltoall_bytes_per_token": (d_bytes + c_bytes) / tokens,
        "alltoalls_per_layer": 1 if mode == "coherent" and k == 1 else 2,
        "cross_rank_rows_per_layer": (dispatch + combine).sum(axis=0).tolist(),
        **({} if prompt_tokens is None else {"prompt_tokens": prompt_tokens}),
    }


def traffic_scope_note(trace: Trace, name: str) -> str | None:
    """One line for eval to print when the traffic prediction leaves some of the trace's tokens
    out (a serve --routing-prefill trace: its prompt tokens), else None. Raises TraceError as
    decode_tokens does, and for a trace of prompt tokens alone (every request ended at its
    first token): a per-token prediction over no token would print 0 bytes a token."""
    decode = decode_tokens(trace)
    if decode is None:
        return None
    prompt = trace.num_tokens - len(decode)
    if not len(decode):
        raise TraceError(f"{name} holds {prompt} prompt (prefill) tokens and no decode token (meta phases): there is "
                         "no decode traffic to predict; leave out --model and --hidden-size for the placement metrics")
    return (f"{name} holds {prompt} prompt (prefill) and {len(decode)} decode tokens (meta phases): the predicted "
            "Alltoall traffic covers the decode tokens only, as serve's --stats-out \"decode\" counts them; the "
            "placement metrics cover all tokens")
