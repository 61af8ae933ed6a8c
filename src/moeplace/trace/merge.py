"""Concatenate v1 traces of one model (`moeplace import merge`): shards of a corpus traced apart.

Inputs i = 0..n-1, each topk_ids int [T_i, L, k] over E experts (L, k and E the same for all),
with optional topk_weights float [T_i, L, k] and token_ids / sequence_ids / positions int [T_i].
The result holds topk_ids [sum T_i, L, k] in input order; an optional array is kept when every
input has it, else dropped (and named). Sequence ids of each later input are shifted past the
largest id before it, so sequences stay distinct: two traces of files a and b merge into what
`moeplace trace --data a --data b` writes (windows never cross files), batching aside. Files of
`serve --routing-out` (meta world: W ranks) shift by multiples of W, so each sequence keeps its
home rank (id % W); with --routing-prefill their meta prompt_lengths move with the ids.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import TraceError, warn
from moeplace.options import same_directory
from moeplace.trace.format import Trace, make_trace

OPTIONAL = ("topk_weights", "token_ids", "sequence_ids", "positions")
# meta that must agree where two inputs both record it: what says which model (and numbering) routed
# (router_sha256 last: a difference in a field before it is the better-named one)
IDENTITY = ("model", "model_type", "moe_layers", "renumbered_from", "hidden_size", "router_sha256")
# meta that describes one input alone: recorded per input (meta.inputs), never carried as shared
_PER_INPUT = ("source", "corpus", "data", "data_bytes", "interrupted", "resumed", "inputs", "format", "file",
              "sha256", "phases", "prompt_lengths")


def merge_traces(traces: Sequence[tuple[str, Trace]]) -> tuple[Trace, list[str]]:
    """(name, trace) pairs, in order -> (the concatenated trace, the optional arrays dropped).

    Raises TraceError naming the first input that does not fit an earlier one: other num_experts,
    MoE layer count, k, or meta model / model_type / moe_layers / renumbered_from / hidden_size /
    router_sha256 (checked where both record it); then the first whose routing (topk_ids, token
    order included) repeats an earlier input's (a copy: its tokens would count twice). Meta of
    the result: source "moeplace import merge", inputs (file, sha256, tokens; source, corpus,
    interrupted and router_sha256 when recorded), corpus (the inputs' labels joined by ','), data
    (the files read, when every input lists them) and every other field all inputs record alike
    (dtype, seq_len, ...). router_sha256 recorded by only some inputs is left out, with a
    MoeplaceWarning naming those lacking it.
    """
    if len(traces) < 2:
        raise TraceError("merge needs at least two traces")
    # each input is compared with the first, and with the first to record each IDENTITY field: two
    # fingerprints that differ are caught also when the first input records none
    refs: list[tuple[str, Trace]] = []
    for name, t in traces:
        for ref_name, ref in refs:
            if (found := mismatch(ref, t)) is not None:
                field, mine, theirs = found
                raise TraceError(f"{name}: {field} {_shown(theirs)}, but {ref_name} has {_shown(mine)}"
                                 f"{_why(field, ref_name, ref, t)}: only traces of one model (and one expert "
                                 "numbering) merge")
        if not refs or any(key in t.meta and all(key not in r.meta for _, r in refs) for key in IDENTITY):
            refs.append((name, t))
    _refuse_repeated_routing(traces)
    lacking = [name for name, t in traces if "router_sha256" not in t.meta]
    if lacking and len(lacking) < len(traces):  # said: the router weights of those were never compared
        warn(f"router_sha256 dropped from the merged trace: {', '.join(lacking)} "
             f"{'has' if len(lacking) == 1 else 'have'} none (router weights not compared)")
    kept = [key for key in OPTIONAL if all(getattr(t, key) is not None for _, t in traces)]
    dropped = [key for key in OPTIONAL if key not in kept and any(getattr(t, key) is not None for _, t in traces)]
    arrays: dict[str, np.ndarray] = {"topk_ids": np.concatenate([t.topk_ids for _, t in traces])}
    meta = merged_meta(traces)
    for key in kept:
        parts = [getattr(t, key) for _, t in traces]
        if key == "sequence_ids":
            shifted = _offset(parts, _home_ranks(traces))
            meta.update(_merged_phases(traces, [int(a[0] - b[0]) if len(a) else 0 for a, b in zip(shifted, parts)]))
            parts = shifted
        arrays[key] = np.concatenate(parts)
    merged = make_trace(arrays.pop("topk_ids"), arrays.pop("topk_weights", None), traces[0][1].num_experts,
                        meta=meta, name="merged trace", **arrays)
    return merged, dropped


def _merged_phases(traces: Sequence[tuple[str, Trace]], shifts: list[int]) -> dict[str, Any]:
    """Meta phases and prompt_lengths of the merged trace when some input holds prompt tokens (a
    `serve --routing-prefill` file; eval's traffic prediction keeps its decode tokens by them):
    each input's [sequence id, prompt length] rows moved by its sequence-id shift, and a length 0
    for every sequence of an input without them (all its tokens count as decode tokens, as eval
    takes such a file alone). {} when no input holds prompt tokens. An input whose prompt_lengths
    is not such a list is carried as it is, for eval to refuse in one line."""
    if not any(t.holds_prompt_tokens() for _, t in traces):
        return {}
    rows: list[list[Any]] = []
    for (_, t), shift in zip(traces, shifts):
        table = t.meta.get("prompt_lengths")
        if not t.holds_prompt_tokens():
            assert t.sequence_ids is not None  # (only called when every input has them)
            rows += [[int(q) + shift, 0] for q in np.unique(t.sequence_ids)]
        elif isinstance(table, list) and all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], int)
                                             and not isinstance(r[0], bool) for r in table):
            rows += [[r[0] + shift, r[1]] for r in table]
        else:
            return {"phases": ["prefill", "decode"], "prompt_lengths": table}
    return {"phases": ["prefill", "decode"], "prompt_lengths": rows}


def _refuse_repeated_routing(traces: Sequence[tuple[str, Trace]]) -> None:
    """Refuse an input whose routing (every token's experts, in order) is an earlier input's: a
    copy of one file under another name, or a shard traced twice, would count its tokens twice
    (the CLI refuses one file given twice; this catches the copies)."""
    seen: dict[str, str] = {}
    for name, t in traces:
        key = t.routing_sha256()
        if key in seen:
            raise TraceError(f"{name}: the same routing as {seen[key]} (every token's experts alike: a copy, or the "
                             "same text traced twice?): merged, its tokens would be counted twice")
        seen[key] = name


def mismatch(a: Trace, b: Trace) -> tuple[str, Any, Any] | None:
    """(field, a's value, b's value) for the first way `b` does not fit `a`; None when it fits."""
    for field, mine, theirs in (("num_experts", a.num_experts, b.num_experts),
                                ("MoE layers", a.num_layers, b.num_layers), ("top-k", a.top_k, b.top_k)):
        if mine != theirs:
            return field, mine, theirs
    for key in IDENTITY:
        if key in a.meta and key in b.meta and a.meta[key] != b.meta[key] \
                and not (key == "model" and same_directory(a.meta[key], b.meta[key])):
            return f"meta {key}", a.meta[key], b.meta[key]
    return None


def _why(field: str, a_name: str, a: Trace, b: Trace) -> str:
    """What a differing field means, when its name alone does not say it; else "" (b is the input named)."""
    if field != "meta router_sha256":
        return ""
    dtype, theirs = a.meta.get("dtype"), b.meta.get("dtype")
    if dtype is not None and theirs is not None and dtype != theirs:  # it hashes the weights as loaded
        return f" (traced in {_shown(theirs)}, {a_name} in {_shown(dtype)})"
    return " (other router weights: another checkpoint, or one replaced at the same path)"


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (str, list)) else str(value)


def _offset(parts: list[np.ndarray], align: int = 1) -> list[np.ndarray]:
    """Sequence ids int [T_i] of each part shifted to start past the largest id before it, by a
    multiple of `align`: a sequence's id % align is kept (its home rank in a `serve --routing-out`
    file of `align` ranks, which eval's traffic prediction reads as sequence id % world)."""
    out: list[np.ndarray] = []
    top = -1
    for ids in parts:
        shift = -(-(top + 1 - int(ids.min())) // align) * align if out else 0
        if int(ids.max()) + shift >= 1 << 63 or shift >= 1 << 63:  # numpy would wrap past int64 (or fail)
            raise TraceError(f"sequence ids past 2**63 - 1 when merged (the earlier inputs' ids run to {top}"
                             + (f", shifted by multiples of {align}, the least common multiple of their meta world"
                                if align > 1 else "") + "): merge fewer files, or files whose ids are smaller")
        shifted = ids + np.int64(shift)
        top = max(top, int(shifted.max()))
        out.append(shifted)
    return out


def _home_ranks(traces: Sequence[tuple[str, Trace]]) -> int:
    """The least common multiple of the inputs' meta world (serve --routing-out files), 1 when none
    records one: the sequence-id shifts keep each id's remainder by every input's world."""
    worlds = [t.meta.get("world") for _, t in traces]
    return math.lcm(*(w for w in worlds if isinstance(w, int) and not isinstance(w, bool) and 0 < w <= 1 << 20), 1)


def merged_meta(traces: Sequence[tuple[str, Trace]]) -> dict[str, Any]:
    """Meta of the merged trace (see merge_traces)."""
    metas = [t.meta for _, t in traces]
    shared = {key: value for key, value in metas[0].items()
              if key not in _PER_INPUT and all(key in m and m[key] == value for m in metas[1:])}
    inputs = []
    for name, t in traces:
        record: dict[str, Any] = {"file": name, "sha256": t.sha256, "tokens": t.num_tokens}
        record.update({key: t.meta[key] for key in ("source", "corpus", "interrupted", "router_sha256")
                       if key in t.meta})
        inputs.append(record)
    meta: dict[str, Any] = {"source": "moeplace import merge", **shared, "inputs": inputs,
                            "corpus": ",".join(str(m.get("corpus") or Path(name).stem)
                                               for (name, _), m in zip(traces, metas))}
    if all(isinstance(m.get("data"), list) for m in metas):
        meta["data"] = [f for m in metas for f in m["data"]]
    return meta
