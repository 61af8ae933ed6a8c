"""Importers: traces of other tools into the v1 trace format, and load-only inputs.

Dense CSV layers ("one CSV per layer, one row per token, one column per expert"): each row holds
the gate probability of every expert, zero for those not selected; the non-zero entries are the
token's top-k. The FLAME-MoE decoder traces are a directory of such layer sets, one per decode
position.

SGLang expert-distribution recorder dumps (`.pt`, read with torch.load(weights_only=True)):
`per_token` mode -> Trace, `stat` mode -> ExpertLoads. Per-layer count JSON (fiddler's Mixtral
`expert_popularity`) -> ExpertLoads. docs/import.md gives every layout with its source.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from moeplace.errors import TraceError
from moeplace.io import read_json
from moeplace.progress import Progress
from moeplace.trace.format import ExpertLoads, Trace, make_loads, make_trace

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
    suffixes = [header[i][len(expert_prefix):] for i in cols]
    if not all(x.isdigit() for x in suffixes):
        raise TraceError(f"{path}: expert columns must be named {expert_prefix}0..{expert_prefix}N")
    experts = [int(x) for x in suffixes]
    if sorted(experts) != list(range(len(experts))):
        raise TraceError(f"{path}: expert columns are not expert_0..expert_{len(experts) - 1}")
    tok_col = header.index("token_id") if "token_id" in header else None
    body = rows[1:]
    short = next((r for r, row in enumerate(body) if len(row) != len(header)), None)
    if short is not None:
        raise TraceError(f"{path}: row {short + 2} has {len(body[short])} fields, header has {len(header)} (truncated?)")
    dense = np.zeros((len(body), len(cols)))
    try:  # fast path: numpy parses the whole table when every column is numeric
        dense[:, experts] = np.array(body, dtype=np.float64)[:, cols]
        tok = np.array([row[tok_col] for row in body], dtype=np.int64) if tok_col is not None else None
    except ValueError:  # other text columns, or a bad value: row by row, naming the bad row
        tok = np.zeros(len(body), dtype=np.int64) if tok_col is not None else None
        for r, row in enumerate(body):
            try:
                dense[r, experts] = [float(row[i]) for i in cols]
                if tok is not None and tok_col is not None:
                    tok[r] = int(row[tok_col])
            except ValueError as e:
                raise TraceError(f"{path}: row {r + 2}: {e}") from None
    return dense, tok


def dense_to_topk(dense: np.ndarray, k: int | None, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense gate weights [T, E] -> (ids [T, k], weights [T, k]) sorted by weight, highest first."""
    if not np.isfinite(dense).all() or (dense < 0).any():
        raise TraceError(f"{name}: gate weights must be finite and non-negative")
    nnz = (dense > 0).sum(axis=1)
    if k is None:
        k = int(nnz.max())
    if k == 0:
        raise TraceError(f"{name}: no row selects any expert (all gate weights are 0)")
    if (nnz < k).any():
        bad = int(np.argmax(nnz < k))
        raise TraceError(f"{name}: row {bad} selects {int(nnz[bad])} experts, expected top-{k}")
    ids = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(dense, ids, axis=1)


def import_csv_layers(
    files: Sequence[Path], k: int | None = None, on_file: Callable[[Path], None] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Layer files (in layer order) -> ids [T, L, k], weights [T, L, k], row token ids [T], experts E."""
    ids: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    row_ids: np.ndarray | None = None
    num_experts = 0
    for path in files:
        dense, tok = read_dense_csv(path)
        if on_file is not None:
            on_file(path)
        if ids and dense.shape[1] != num_experts:
            raise TraceError(f"{path}: {dense.shape[1]} expert columns, but {files[0]} has {num_experts}")
        num_experts = dense.shape[1]
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
    return np.stack(ids, axis=1), np.stack(weights, axis=1).astype(np.float32), row_ids, num_experts


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
    try:
        return np.array([int(x) for x in m.group(1).replace("\n", " ").split(",")]) if m else None
    except ValueError:  # an unexpected printout: token ids are optional
        return None


def import_csv(paths: Sequence[Path], k: int | None = None) -> Trace:
    """One directory (see `import_csv_dir`) or the layer CSV files of one token set.

    Files named `layerN.csv` are put in order of N (a shell glob puts layer10 before layer2);
    other names keep the order given, layer l being the l-th file.
    """
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        return import_csv_dir(paths[0], k)
    for p in paths:
        if not p.is_file():
            raise TraceError(f"{p}: no such file (give one directory, or layer CSV files)")
    matches = [_LAYER_FILE.search(p.name) for p in paths]
    numbers = [int(m.group(1)) for m in matches if m is not None]
    if len(numbers) == len(paths):
        if len(set(numbers)) != len(numbers):
            raise TraceError(f"layer numbers repeat among the files: {sorted(numbers)}")
        paths = [p for _, p in sorted(zip(numbers, paths))]
        layers = sorted(numbers)
    else:
        layers = list(range(len(paths)))
    return _import_csv_groups([(None, paths)], layers, k, name=str(paths[0].parent), source=[p.name for p in paths])


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
    if direct:
        return _import_csv_groups([(None, [p for _, p in direct])], [n for n, _ in direct], k, str(directory), directory.name)
    sub = [p for p in directory.iterdir() if p.is_dir() and layer_files(p)]
    if not sub:
        raise TraceError(f"{directory}: no layerN.csv files, nor folders holding them")
    folders = sorted((int(m.group()) if (m := re.match(r"\d+", p.name)) else 0, p) for p in sub)
    layers0 = [n for n, _ in layer_files(folders[0][1])]
    groups: list[tuple[int | None, list[Path]]] = []
    for position, folder in folders:
        files = layer_files(folder)
        if [n for n, _ in files] != layers0:
            raise TraceError(f"{folder}: layers {[n for n, _ in files]} differ from {folders[0][1]} ({layers0})")
        groups.append((position, [p for _, p in files]))
    return _import_csv_groups(groups, layers0, k, str(directory), directory.name)


def _import_csv_groups(
    groups: Sequence[tuple[int | None, list[Path]]], layers: list[int], k: int | None, name: str, source: Any
) -> Trace:
    """Token sets (position or None, layer files) -> one Trace; row r of a set is sequence r."""
    all_ids: list[np.ndarray] = []
    all_w: list[np.ndarray] = []
    seq: list[np.ndarray] = []
    pos: list[np.ndarray] = []
    toks: list[np.ndarray | None] = []
    num_experts = 0
    progress = Progress("import csv: reading layer files", total=sum(len(files) for _, files in groups))
    read: list[Path] = []

    def on_file(path: Path) -> None:
        read.append(path)
        progress.update(len(read), path.name)

    for position, files in groups:
        ids, w, row_ids, num_experts = import_csv_layers(files, k, on_file)
        k = ids.shape[2]
        n = ids.shape[0]
        all_ids.append(ids)
        all_w.append(w)
        seq.append(row_ids if row_ids is not None else np.arange(n))
        pos.append(np.full(n, position if position is not None else 0))
        t = _tokens_txt_ids(files[0].parent / "tokens.txt")
        toks.append(t if t is not None and len(t) == n else None)
    progress.close()
    known = [t for t in toks if t is not None]
    token_ids = np.concatenate(known) if len(known) == len(toks) else None
    has_positions = any(position is not None for position, _ in groups)
    return make_trace(
        np.concatenate(all_ids),
        np.concatenate(all_w),
        num_experts,
        token_ids=token_ids,
        sequence_ids=np.concatenate(seq),
        positions=np.concatenate(pos) if has_positions else None,
        meta={"source": "csv-layers", "moe_layers": layers, "input": source},
        name=name,
    )


# --- torch dumps (SGLang) ------------------------------------------------------------------------


def load_torch_dump(path: Path) -> Any:
    """torch.load(weights_only=True): tensors and plain containers only, never arbitrary objects."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise TraceError(f"{path}: file is empty")
    with open(path, "rb") as f:
        magic = f.read(4)
    # torch.save writes a zip archive (legacy: a pickle, protocol 2 starts with 0x80): anything
    # else is the wrong file, not an unsafe one
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise TraceError(f"{path}: not a torch.save file (no zip or pickle signature)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" (it holds {found.group(1)})" if found else ""
        raise TraceError(
            f"{path}: refused: loading needs unpickling of arbitrary Python objects{what}; "
            "moeplace reads only tensors and plain containers"
        ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(f"{path}: truncated or not a torch.save file ({first})") from None


def _dump_files(paths: Sequence[Path]) -> list[Path]:
    """Files given, with a directory standing for its `*.pt` files (sorted by name)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.pt"))
            if not found:
                raise TraceError(f"{p}: no .pt files in this directory")
            out += found
        else:
            out.append(p)
    if not out:
        raise TraceError("no dump files given")
    return out


def import_sglang(paths: Sequence[Path], num_experts: int | None = None) -> Trace | ExpertLoads:
    """SGLang expert-distribution recorder dumps -> Trace (`per_token` mode) or ExpertLoads (`stat`).

    The mode is read from the dumps' keys: `records` (per_token) or `logical_count` (stat).
    """
    dumps = []
    for path in _dump_files(paths):
        dump = load_torch_dump(path)
        if not isinstance(dump, dict) or not ({"records", "logical_count"} & set(dump)):
            keys = sorted(map(str, dump)) if isinstance(dump, dict) else type(dump).__name__
            raise TraceError(
                f"{path}: not an SGLang expert-distribution dump: expected a dict with 'records' "
                f"(per_token mode) or 'logical_count' (stat mode), got {keys}"
            )
        dumps.append((path, dump))
    modes = {"records" in d for _, d in dumps}
    if len(modes) > 1:
        raise TraceError("mixed SGLang dump modes: give either per_token dumps or stat dumps, not both")
    if modes == {True}:
        return sglang_per_token(dumps, num_experts)
    return sglang_stat(dumps, num_experts)


def _as_int_array(x: Any, name: str, ndim: int) -> np.ndarray:
    """A tensor or (nested) list as an int64 array of `ndim` dimensions, else TraceError."""
    import torch

    try:
        a = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TraceError(f"{name}: not an integer array ({e})") from None
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
        raise TraceError(f"{name}: expected an integer array of {ndim} dimensions, got shape {list(a.shape)} dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


_SglangRecord = tuple[int, int, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def _sglang_record(rec: Any, p2l: np.ndarray | None, name: str) -> _SglangRecord | None:
    """One per_token record -> (forward pass, rank, logical ids [layers, n, 8], input ids [n], positions [n]).

    None for an idle forward pass (no token).
    """
    if not isinstance(rec, dict) or "topk_ids_of_layer" not in rec:
        raise TraceError(f"{name}: no 'topk_ids_of_layer' (is this a per_token dump?)")
    ids = _as_int_array(rec["topk_ids_of_layer"], f"{name}: topk_ids_of_layer", 3)
    if ids.shape[1] == 0:
        return None
    per_token = []
    for key in ("input_ids", "positions"):
        v = rec.get(key)
        v = None if v is None else _as_int_array(v, f"{name}: {key}", 1)
        if v is not None and len(v) != ids.shape[1]:
            raise TraceError(f"{name}: {key} has {len(v)} entries but topk_ids_of_layer has {ids.shape[1]} tokens")
        per_token.append(v)
    if ids.min() < -1:
        raise TraceError(f"{name}: expert id {int(ids.min())} (only -1 may mark a missing expert)")
    if p2l is not None:
        if p2l.shape[0] != ids.shape[0]:
            raise TraceError(f"{name}: {ids.shape[0]} layers, but last_physical_to_logical_map has {p2l.shape[0]}")
        if ids.max() >= p2l.shape[1]:
            raise TraceError(f"{name}: physical expert id {int(ids.max())} out of range [0, {p2l.shape[1]})")
        ids = np.where(ids >= 0, p2l[np.arange(ids.shape[0])[:, None, None], ids.clip(0)], -1)
    try:
        pass_id, rank = int(rec.get("forward_pass_id") or 0), int(rec.get("rank") or 0)
    except (TypeError, ValueError):
        raise TraceError(f"{name}: forward_pass_id and rank must be integers") from None
    return pass_id, rank, ids, per_token[0], per_token[1]


def sglang_per_token(dumps: Sequence[tuple[Path, dict]], num_experts: int | None = None) -> Trace:
    """per_token dumps (one `.pt` per rank) -> Trace with token ids and positions; no gate weights.

    Layout (sglang/srt/eplb/expert_distribution.py, _DetailAccumulator.dump):
        {"records": [record, ...], "last_physical_to_logical_map": int [layers, physical experts]}
        record: {"forward_pass_id": int, "rank": int, "input_ids": [n], "positions": [n],
                 "topk_ids_of_layer": int32 [layers, n, 8] physical ids, -1 = no expert, ...}
    1. keep each distinct record once: without DP attention every rank records the same batch;
    2. order by (forward_pass_id, rank) and map physical ids to logical ones through the map;
    3. MoE layers = layers with any id (dense layers stay -1); k = slots used at those layers;
    4. drop token rows with a missing id (batch padding, which SGLang masks to -1).
    """
    records: list[_SglangRecord] = []
    seen: set[tuple[int, bytes]] = set()
    for path, dump in dumps:
        p2l = dump.get("last_physical_to_logical_map")
        p2l = None if p2l is None else _as_int_array(p2l, f"{path}: last_physical_to_logical_map", 2)
        if p2l is not None and num_experts is None:
            num_experts = int(p2l.max()) + 1
        if not isinstance(dump["records"], list):
            raise TraceError(f"{path}: 'records' must be a list")
        for r, rec in enumerate(dump["records"]):
            parsed = _sglang_record(rec, p2l, f"{path}: record {r}")
            if parsed is None:
                continue  # an idle forward pass
            tokens = parsed[3] if parsed[3] is not None else np.zeros(0, np.int64)
            key = (parsed[0], hashlib.sha256(parsed[2].tobytes() + tokens.tobytes()).digest())
            if key not in seen:
                seen.add(key)
                records.append(parsed)
    if not records:
        raise TraceError("the SGLang dumps hold no tokens (was recording started before the requests?)")
    num_layers = {r[2].shape[0] for r in records}
    if len(num_layers) > 1:
        raise TraceError(f"records disagree on the number of layers: {sorted(num_layers)}")
    records.sort(key=lambda r: (r[0], r[1]))
    ids = np.concatenate([r[2] for r in records], axis=1)  # [layers, T, slots]
    moe_layers = np.flatnonzero((ids >= 0).any(axis=(1, 2)))
    if not len(moe_layers):
        raise TraceError("the SGLang dumps record no expert at any layer: nothing to import")
    ids = ids[moe_layers]
    k = int(np.flatnonzero((ids >= 0).any(axis=(0, 1))).max()) + 1
    ids = ids[:, :, :k].transpose(1, 0, 2)  # [T, L, k]
    keep = (ids >= 0).all(axis=(1, 2))
    if not keep.any():
        raise TraceError("every recorded token misses an expert at some MoE layer: nothing to import")

    def per_token(i: int) -> np.ndarray | None:
        if any(r[i] is None for r in records):
            return None
        return np.concatenate([r[i] for r in records])[keep]

    meta = {
        "source": "sglang-per_token",
        "moe_layers": moe_layers.tolist(),
        "input": [p.name for p, _ in dumps],
        "records": len(records),
        "dropped_tokens": int((~keep).sum()),
    }
    return make_trace(
        ids[keep], None, num_experts, token_ids=per_token(3), positions=per_token(4), meta=meta, name="SGLang dumps"
    )


def sglang_stat(dumps: Sequence[tuple[Path, dict]], num_experts: int | None = None) -> ExpertLoads:
    """stat dumps -> ExpertLoads summed over recorded steps (and over the files given).

    Layout (sglang/srt/eplb/expert_distribution.py, _StatAccumulator.dump; rank 0 writes it):
        {"rank": 0, "logical_count": int [steps, layers, logical experts],
         "average_utilization_rate_over_window": float or None}
    Layers with no selection at all are dense layers of the model and are dropped.
    """
    total = None
    for path, dump in dumps:
        counts = _as_int_array(dump["logical_count"], f"{path}: logical_count", 3).sum(axis=0)
        if total is not None and counts.shape != total.shape:
            raise TraceError(f"{path}: logical_count is {list(counts.shape)} per step, but {dumps[0][0]} has {list(total.shape)}")
        total = counts if total is None else total + counts
    assert total is not None
    moe_layers = np.flatnonzero(total.sum(axis=1) > 0)
    if not len(moe_layers):
        raise TraceError("the SGLang stat dumps count no expert selection (was recording started?)")
    loads = total[moe_layers]
    if num_experts is not None:
        if num_experts < loads.shape[1] and loads[:, num_experts:].any():
            raise TraceError(f"--num-experts {num_experts}, but experts up to {loads.shape[1] - 1} were selected")
        loads = np.pad(loads, ((0, 0), (0, max(0, num_experts - loads.shape[1]))))[:, :num_experts]
    meta = {"source": "sglang-stat", "moe_layers": moe_layers.tolist(), "input": [p.name for p, _ in dumps]}
    return make_loads(loads, meta, name="SGLang stat dumps")


# --- per-layer count JSON ------------------------------------------------------------------------

_COUNT_KEYS = ("expert_popularity", "expert_loads")


def import_loads_json(paths: Sequence[Path]) -> ExpertLoads:
    """JSON objects holding per-layer counts [layers][experts] -> ExpertLoads (files summed).

    The counts sit under `expert_popularity` (fiddler's Mixtral-8x7B MMLU dumps, with
    `total_input_tokens`) or `expert_loads`. Summing several files (e.g. several subjects)
    gives the load of the mixed traffic.
    """
    if not paths:
        raise TraceError("no JSON files given")
    total: np.ndarray | None = None
    tokens = 0
    for path in map(Path, paths):
        doc = read_json(path, TraceError)
        key = next((k for k in _COUNT_KEYS if isinstance(doc, dict) and k in doc), None)
        if key is None:
            raise TraceError(f"{path}: no {' or '.join(repr(k) for k in _COUNT_KEYS)} [layers][experts] counts")
        rows = doc[key]
        if isinstance(rows, list) and any(isinstance(x, bool) for r in rows if isinstance(r, list) for x in r):
            raise TraceError(f"{path}: '{key}' must hold numbers, not true/false")
        try:
            counts = np.asarray(rows, dtype=np.float64)
        except (TypeError, ValueError):
            raise TraceError(f"{path}: '{key}' must be a rectangular [layers][experts] table of numbers") from None
        counts = make_loads(counts, name=str(path), what=f"'{key}'").loads
        if total is not None and counts.shape != total.shape:
            raise TraceError(f"{path}: {key} is {list(counts.shape)}, but {paths[0]} has {list(total.shape)}")
        total = counts if total is None else total + counts
        n = doc.get("total_input_tokens", 0)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TraceError(f"{path}: 'total_input_tokens' must be a non-negative integer, got {n!r}")
        tokens += n
    assert total is not None  # paths is not empty
    meta: dict[str, Any] = {"source": "loads-json", "input": [Path(p).name for p in paths]}
    if tokens:
        meta["total_input_tokens"] = tokens
    return make_loads(total, meta, name=str(paths[0]))
