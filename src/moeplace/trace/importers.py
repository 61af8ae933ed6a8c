"""Importers: traces of other tools into the v1 trace format.

Dense CSV layers ("one CSV per layer, one row per token, one column per expert"): each row holds
the gate probability of every expert, zero for those not selected; the non-zero entries are the
token's top-k. The FLAME-MoE decoder traces are a directory of such layer sets, one per decode
position.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from moeplace.errors import TraceError
from moeplace.trace.format import Trace, make_trace

_LAYER_FILE = re.compile(r"layer[_-]?(\d+)\.csv$")


def read_dense_csv(path: Path, expert_prefix: str = "expert_") -> tuple[np.ndarray, np.ndarray | None]:
    """One layer file -> (gate weights float [rows, E], row token ids int [rows] or None)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: unreadable CSV ({e})") from None
    if len(rows) < 2:
        raise TraceError(f"{path}: no data rows")
    header = rows[0]
    cols = [i for i, h in enumerate(header) if h.startswith(expert_prefix)]
    if not cols:
        raise TraceError(f"{path}: no '{expert_prefix}N' columns in the header")
    experts = [int(header[i][len(expert_prefix):]) for i in cols]
    if sorted(experts) != list(range(len(experts))):
        raise TraceError(f"{path}: expert columns are not expert_0..expert_{len(experts) - 1}")
    tok_col = header.index("token_id") if "token_id" in header else None
    dense = np.zeros((len(rows) - 1, len(cols)))
    tok = np.zeros(len(rows) - 1, dtype=np.int64) if tok_col is not None else None
    for r, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise TraceError(f"{path}: row {r + 2} has {len(row)} fields, header has {len(header)} (truncated?)")
        try:
            dense[r, experts] = [float(row[i]) for i in cols]
            if tok is not None:
                tok[r] = int(row[tok_col])
        except ValueError as e:
            raise TraceError(f"{path}: row {r + 2}: {e}") from None
    return dense, tok


def dense_to_topk(dense: np.ndarray, k: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense gate weights [T, E] -> (ids [T, k], weights [T, k]) sorted by weight, highest first."""
    nnz = (dense > 0).sum(axis=1)
    if k is None:
        k = int(nnz.max())
    if (nnz < k).any():
        bad = int(np.argmax(nnz < k))
        raise TraceError(f"{name}: row {bad} selects {int(nnz[bad])} experts, expected top-{k}")
    if np.isnan(dense).any() or (dense < 0).any():
        raise TraceError(f"{name}: gate weights must be finite and non-negative")
    ids = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(dense, ids, axis=1)


def import_csv_layers(files: Sequence[Path], k: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Layer files (in layer order) -> ids [T, L, k], weights [T, L, k], row token ids [T]."""
    ids, weights, row_ids = [], [], None
    for path in files:
        dense, tok = read_dense_csv(path)
        i, w = dense_to_topk(dense, k, str(path))
        k = i.shape[1]
        if ids and i.shape[0] != ids[0].shape[0]:
            raise TraceError(f"{path}: {i.shape[0]} rows, but {files[0]} has {ids[0].shape[0]}: layers must list the same tokens")
        if row_ids is not None and tok is not None and not np.array_equal(tok, row_ids):
            raise TraceError(f"{path}: token_id column differs from {files[0]}: rows are not the same tokens")
        row_ids = tok if row_ids is None else row_ids
        ids.append(i)
        weights.append(w)
    if not ids:
        raise TraceError("no layer CSV files given")
    return np.stack(ids, axis=1), np.stack(weights, axis=1).astype(np.float32), row_ids


def layer_files(directory: Path) -> list[tuple[int, Path]]:
    """`layerN.csv` files of a directory, sorted by N."""
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _LAYER_FILE.search(p.name))]
    return sorted(found)


def _tokens_txt_ids(path: Path) -> np.ndarray | None:
    """Token ids printed as the 'samples' tensor of a FLAME tokens.txt (None if absent)."""
    if not path.is_file():
        return None
    text = path.read_text(errors="replace")
    m = re.search(r"-samples-+\s*torch\.Size\(\[\d+\]\)\s*tensor\(\[(.*?)\]\)", text, re.S)
    return np.array([int(x) for x in m.group(1).replace("\n", " ").split(",")]) if m else None


def import_csv_dir(directory: Path, k: int | None = None) -> Trace:
    """A directory of `layerN.csv` files, or of position folders each holding such files.

    Position folders (FLAME: `1st` ... `10th`) are sorted by their leading number; the row index
    within a folder is the sequence, so token (sequence s, position p) keeps the same sequence id
    across folders. Layers must be the same set in every folder.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TraceError(f"{directory}: not a directory")
    direct = layer_files(directory)
    groups: list[tuple[int, Path]]
    if direct:
        groups = [(0, directory)]
    else:
        sub = [p for p in directory.iterdir() if p.is_dir() and layer_files(p)]
        if not sub:
            raise TraceError(f"{directory}: no layerN.csv files, nor folders holding them")
        groups = sorted((int(re.match(r"\d+", p.name).group()) if re.match(r"\d+", p.name) else 0, p) for p in sub)
    all_ids, all_w, seq, pos, toks = [], [], [], [], []
    layers0: list[int] | None = None
    for position, folder in groups:
        files = layer_files(folder)
        layers = [n for n, _ in files]
        if layers0 is not None and layers != layers0:
            raise TraceError(f"{folder}: layers {layers} differ from {groups[0][1]} ({layers0})")
        layers0 = layers
        ids, w, row_ids = import_csv_layers([p for _, p in files], k)
        k = ids.shape[2]
        n = ids.shape[0]
        all_ids.append(ids)
        all_w.append(w)
        seq.append(row_ids if row_ids is not None else np.arange(n))
        pos.append(np.full(n, position))
        t = _tokens_txt_ids(folder / "tokens.txt")
        toks.append(t if t is not None and len(t) == n else None)
    token_ids = np.concatenate(toks) if all(t is not None for t in toks) else None
    num_experts = read_dense_csv(layer_files(groups[0][1])[0][1])[0].shape[1]
    return make_trace(
        np.concatenate(all_ids),
        np.concatenate(all_w),
        num_experts,
        token_ids=token_ids,
        sequence_ids=np.concatenate(seq),
        positions=np.concatenate(pos),
        meta={"source": "csv-layers", "moe_layers": layers0, "input": directory.name},
        name=str(directory),
    )
