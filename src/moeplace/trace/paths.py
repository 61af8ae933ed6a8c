"""Routing paths: which tokens of a trace follow a path (experts at every layer) the placement was fitted on.

A placement measured on the tokens it was fitted on looks better than it will serve. eval finds
its fit trace by hash and holds out the split; this module covers the rest (a subset, a
re-ordering or a merge of the fit tokens in another file) with a fixed-size sketch stored in the
placement:

    fit_paths   {"hash": PATH_HASH, "complete": bool, "sample": [16-hex-digit strings, ascending]}

`sample` holds the SKETCH_SIZE smallest distinct path hashes of the fit tokens (all of them, and
`complete`, when there are fewer). Because a hash picks the same part of path space in any trace,
the evaluated tokens whose hash is at most the largest sampled one are checked exactly against
the sample: the share of them found there estimates the share of all evaluated tokens.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

PATH_HASH = "splitmix64-path/v1"
SKETCH_SIZE = 256
_HEX16 = re.compile(r"[0-9a-f]{16}")


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 [T] (wrapping arithmetic)."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def path_hashes(topk_ids: np.ndarray) -> np.ndarray:
    """One 64-bit hash per token of its routing path: topk_ids [T, L, k] -> uint64 [T].

    Order-sensitive over layers and over the k slots (the top-1 expert is the first), and seeded
    with L * k so that paths of different shapes never compare equal by construction.
    """
    tokens = topk_ids.shape[0]
    flat = np.ascontiguousarray(topk_ids.reshape(tokens, -1), dtype=np.int64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(np.full(tokens, flat.shape[1], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        for column in flat.T:
            h = _mix(h ^ column)
    return h


def sketch(topk_ids: np.ndarray, size: int = SKETCH_SIZE) -> dict[str, Any]:
    """The `fit_paths` sketch of the fit tokens topk_ids [T, L, k] (module docstring)."""
    distinct = np.unique(path_hashes(topk_ids))  # ascending
    return {"hash": PATH_HASH, "complete": bool(len(distinct) <= size),
            "sample": [f"{int(h):016x}" for h in distinct[:size]]}


def sketch_problem(doc: Any) -> str | None:
    """What is wrong with a `fit_paths` value read from JSON, else None."""
    if not isinstance(doc, dict) or doc.get("hash") != PATH_HASH or not isinstance(doc.get("complete"), bool):
        return f"must be an object with hash {PATH_HASH!r}, complete true/false and a sample"
    sample = doc.get("sample")
    if not (isinstance(sample, list) and len(sample) <= 1 << 16
            and all(isinstance(h, str) and _HEX16.fullmatch(h) for h in sample)):
        return "sample must be a list of 16-digit lowercase hex hashes"
    if sample != sorted(set(sample)):  # equal-width hex sorts as the numbers do
        return "sample must be ascending without repeats"
    return None


def fit_path_share(topk_ids: np.ndarray, fit_paths: dict[str, Any]) -> tuple[float | None, int]:
    """(share of the tokens topk_ids [T, L, k] whose path is one of the fit tokens', tokens it is
    measured on): exact when the sketch is complete, else estimated on the tokens whose hash falls
    in the sketch's range. (None, 0) when no token does."""
    sample = np.array([int(h, 16) for h in fit_paths["sample"]], dtype=np.uint64)
    hashes = path_hashes(topk_ids)
    if not fit_paths["complete"] and len(sample):
        hashes = hashes[hashes <= sample[-1]]
    if len(hashes) == 0:
        return None, 0
    return float(np.isin(hashes, sample).mean()), int(len(hashes))
