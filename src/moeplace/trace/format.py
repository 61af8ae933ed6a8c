"""The routing trace (format v1) shared by every stage, and the load-only input.

Trace v1 is an `.npz` holding:

    topk_ids      int   [tokens, moe_layers, k]  expert ids, highest gate weight first
    topk_weights  float [tokens, moe_layers, k]  gate weights (optional), each row non-increasing
    num_experts   int   scalar                   (optional; inferred as max id + 1)
    token_ids     int   [tokens]                 (optional) vocabulary ids
    sequence_ids  int   [tokens]                 (optional) which sequence a token belongs to
    positions     int   [tokens]                 (optional) position in its sequence
    meta          str   scalar JSON              (optional) model, moe_layers, hidden_size, source, corpus...

ExFlow's trace, a `.npy` int array [tokens, moe_layers] of top-1 ids, is read as k = 1.

Column 0 is taken as each token's top-1 expert everywhere. Saving refuses topk_weights rows that
increase anywhere (ties are allowed); loading such a file (another tool's convention, e.g. rows in
selection-score order) warns on stderr and reads column 0 as the top-1, as stored. In memory
(`make_trace`) the order is not checked.

Load-only input (format "moeplace.loads/v1"), for sources that have no per-token paths (SGLang
`stat` dumps, Mixtral MMLU popularity counts): an `.npz` with `expert_loads` float
[moe_layers, experts] (token-expert selections per expert) and `meta`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import TraceError, warn
from moeplace.io import (NPY_FAILURES, existing_file, json_default, looks_like, loads_json, npy_data_fits, npz_names, read_npz,
                         save_npz_atomic)

TRACE_FORMAT = "moeplace.trace/v1"
LOADS_FORMAT = "moeplace.loads/v1"
_PER_TOKEN = ("token_ids", "sequence_ids", "positions")
# Far above any real MoE (DeepSeek-V3: 256 routed experts); every stage allocates [E, E] or
# [L, E] arrays, so an absurd num_experts must fail here, not as a 58 TiB allocation.
MAX_EXPERTS = 1 << 16
# Token-expert selections per expert and layer: far above any real count (DeepSeek-V3's 14.8T
# training tokens x 8 / 256 experts is 4.6e11), exact in float64, and below HiGHS's
# large_matrix_value (1e15), past which `solve --objective balance` cannot build its model.
MAX_LOAD = 1e15


@dataclass(frozen=True)
class Trace:
    """Per-token routing: which experts each token used at each MoE layer."""

    topk_ids: np.ndarray  # int64 [T, L, k]
    num_experts: int
    topk_weights: np.ndarray | None = None  # float32 [T, L, k]
    token_ids: np.ndarray | None = None  # int64 [T]
    sequence_ids: np.ndarray | None = None  # int64 [T]
    positions: np.ndarray | None = None  # int64 [T]
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""  # of the file it was loaded from ("" if built in memory)

    @property
    def num_tokens(self) -> int:
        return int(self.topk_ids.shape[0])

    def model_identity(self) -> dict[str, Any] | None:
        return model_identity(self.meta)

    def meta_hidden_size(self) -> int | None:
        """The traced model's hidden size, meta `hidden_size` (`moeplace trace` records it from the
        model's config), to compare with a cost model's; None when meta has none (imports, older
        traces) or holds no whole number >= 1 there (another tool's file: not worth refusing)."""
        value = self.meta.get("hidden_size")
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None

    def holds_prompt_tokens(self) -> bool:
        """Whether the trace says it holds prompt (prefill) tokens besides decode tokens: meta
        "phases" (`serve --routing-out --routing-prefill`) is a list naming "prefill"; its meta
        "prompt_lengths" then tells them apart (eval/traffic.py decode_tokens)."""
        phases = self.meta.get("phases")
        return isinstance(phases, list) and "prefill" in phases

    def routing_sha256(self) -> str:
        """sha256 of the routing itself (topk_ids, token order included), whatever file holds
        it: a copy, a re-import or a re-save with other meta has the file's sha256 changed, not this."""
        h = hashlib.sha256(repr(self.topk_ids.shape).encode())
        h.update(np.ascontiguousarray(self.topk_ids, dtype=np.int64).data)
        return h.hexdigest()

    @property
    def num_layers(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[2])

    def weights_or_uniform(self) -> np.ndarray:
        """Gate weights [T, L, k]; 1/k each when the trace has none (ExFlow, top-1 imports)."""
        if self.topk_weights is not None:
            return self.topk_weights
        return np.full(self.topk_ids.shape, 1.0 / self.top_k, dtype=np.float32)

    def gate_shares(self, dtype: type = np.float64) -> np.ndarray:
        """Each token-layer's top-k gate weights renormalised to sum to 1, [T, L, k] of `dtype`
        (computed in it); 1/k each where the weights are all zero, or absent."""
        w: np.ndarray = self.weights_or_uniform().astype(dtype, copy=False)
        total = w.sum(axis=-1, keepdims=True)
        return np.divide(w, total, out=np.full_like(w, 1.0 / self.top_k), where=total > 0)

    def select_tokens(self, index: np.ndarray) -> "Trace":
        """The sub-trace of the given token indices (or boolean mask)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(
            self,
            topk_ids=self.topk_ids[index],
            topk_weights=pick(self.topk_weights),
            token_ids=pick(self.token_ids),
            sequence_ids=pick(self.sequence_ids),
            positions=pick(self.positions),
        )

    def expert_loads(self) -> np.ndarray:
        """Token-expert selections per expert, float64 [L, E] (each of the k choices counts 1)."""
        return layer_counts(self.topk_ids, self.num_experts)


def layer_counts(values: np.ndarray, size: int) -> np.ndarray:
    """How often each value in [0, size) occurs at each layer: values int [T, L, k] -> float64 [L, size]."""
    num_layers = values.shape[1]
    flat = (np.arange(num_layers)[None, :, None] * size + values).ravel()
    return np.bincount(flat, minlength=num_layers * size).reshape(num_layers, size).astype(np.float64)


def flow_counts(src: np.ndarray, dst: np.ndarray, num_src: int, num_dst: int) -> np.ndarray:
    """Tokens going from each source to each destination: src int [T], dst int [T, k] -> float64
    [num_src, num_dst] (a token counts once per destination entry)."""
    flat = (src[:, None] * num_dst + dst).ravel()
    return np.bincount(flat, minlength=num_src * num_dst).reshape(num_src, num_dst).astype(np.float64)


def layer_ranges(layers: list[int]) -> str:
    """[2, 3, 4, 9] -> '2-4, 9': layer numbers as a reader scans them."""
    spans: list[list[int]] = []
    for n in sorted(layers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def weight_order_problem(trace: Trace, name: str = "trace") -> str | None:
    """What is wrong when topk_weights rows are not highest first (the v1 rule: column 0 is the
    top-1), else None. Vectorised: one diff over [T, L, k], milliseconds on 200k tokens."""
    w = trace.topk_weights
    if w is None or trace.top_k < 2:
        return None
    rising = (np.diff(w, axis=-1) > 0).any(axis=-1)  # [T, L]
    if not rising.any():
        return None
    tok, lay = divmod(int(np.argmax(rising)), rising.shape[1])  # the first, token-major
    row = ", ".join(f"{x:.4g}" for x in w[tok, lay])
    return (f"{name}: topk_weights of token {tok} at layer {lay} are not highest first ({row}; "
            f"{int(rising.sum())} token-layers affected)")


def split_tokens(num_tokens: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of token indices into (train, held_out), both sorted."""
    if not 0.0 < train_fraction <= 1.0:
        raise TraceError(f"train fraction must be in (0, 1], got {train_fraction}")
    perm = np.random.default_rng(seed).permutation(num_tokens)
    n_train = max(1, int(round(train_fraction * num_tokens)))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


SPLIT_BY = ("token", "sequence")  # solve --split-by; a placement's split["by"] (absent: token)
# median tokens per sequence from which a token split puts parts of one text on both sides
# (solve's note): measured flattering on FLAME's 10-token sequences too (docs/eval.md)
SHARED_SEQUENCE = 2


def split_sequences(sequence_ids: np.ndarray, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of token indices into (train, held_out), both sorted, keeping sequences whole.

    sequence_ids int [T]. The distinct ids are put in a seeded random order; train takes whole
    sequences in that order until its tokens first reach n = max(1, round(train_fraction x T)),
    split_tokens' count (the sequence that reaches it is in train, so train's token share is at
    most one sequence above the fraction, never below it). With two or more sequences and a
    fraction below 1, at least one sequence is on each side; one sequence goes to train whole.
    """
    if not 0.0 < train_fraction <= 1.0:
        raise TraceError(f"train fraction must be in (0, 1], got {train_fraction}")
    seq = np.asarray(sequence_ids)
    ids, inverse, sizes = np.unique(seq, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)  # numpy 2.0-2.1 give it the input's shape
    order = np.random.default_rng(seed).permutation(len(ids))  # [S] sequence indices
    target = max(1, int(round(train_fraction * len(seq))))
    count = int(np.searchsorted(np.cumsum(sizes[order]), target)) + 1  # first prefix reaching the target
    if train_fraction < 1.0 and len(ids) >= 2:
        count = min(count, len(ids) - 1)
    in_train = np.zeros(len(ids), dtype=bool)
    in_train[order[:count]] = True
    mask = in_train[inverse]
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def split_trace(trace: Trace, train_fraction: float, seed: int, by: str = "token",
                name: str = "trace") -> tuple[np.ndarray, np.ndarray]:
    """(train, held_out) token indices of `trace`, sorted: split_tokens, or split_sequences with
    by="sequence", which needs sequence_ids and two or more sequences (TraceError naming `name`)."""
    if by == "token":
        return split_tokens(trace.num_tokens, train_fraction, seed)
    if by != "sequence":
        raise TraceError(f"split by must be one of {', '.join(SPLIT_BY)}, got {by!r}")
    if problem := sequence_split_problem(trace, name):
        raise TraceError(problem)
    assert trace.sequence_ids is not None
    return split_sequences(trace.sequence_ids, train_fraction, seed)


def sequence_split_problem(trace: Trace, name: str = "trace") -> str | None:
    """Why `trace` cannot be split by sequence (no sequence_ids, or one sequence), else None."""
    if trace.sequence_ids is None:
        return (f"{name}: a split by sequence needs the trace's sequence_ids, and it has none (ExFlow .npy and "
                "some imports record none)")
    count = len(np.unique(trace.sequence_ids))
    if count < 2:
        return f"{name}: a split by sequence needs two or more sequences, the trace holds {count}"
    return None


def median_sequence_tokens(trace: Trace) -> float | None:
    """Median tokens per sequence, None when the trace has no sequence_ids."""
    if trace.sequence_ids is None:
        return None
    return float(np.median(np.unique(trace.sequence_ids, return_counts=True)[1]))


def validate_trace(trace: Trace, name: str = "trace") -> Trace:
    """Check shapes, dtypes and ranges; raise TraceError naming `name` and the problem."""
    ids = trace.topk_ids
    if ids.ndim != 3:
        raise TraceError(f"{name}: topk_ids must be [tokens, moe_layers, k], got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TraceError(f"{name}: topk_ids must be integers, got dtype {ids.dtype}")
    t, l, k = ids.shape
    if t == 0 or l == 0 or k == 0:
        raise TraceError(f"{name}: empty trace (shape {list(ids.shape)})")
    if ids.min() < 0:  # before num_experts: inferred from all-negative ids it reads 0
        raise TraceError(f"{name}: expert id {int(ids.min())} is negative (ids count from 0)")
    if not 0 < trace.num_experts <= MAX_EXPERTS:
        raise TraceError(f"{name}: num_experts must be in [1, {MAX_EXPERTS}], got {trace.num_experts}")
    if ids.max() >= trace.num_experts:
        raise TraceError(f"{name}: expert id {int(ids.max())} out of range [0, {trace.num_experts})")
    if k > trace.num_experts:
        raise TraceError(f"{name}: k={k} exceeds num_experts={trace.num_experts}")
    if k > 1:
        s = np.sort(ids, axis=-1)
        dup = np.argwhere((s[..., 1:] == s[..., :-1]).any(axis=-1))
        if len(dup):
            tok, lay = (int(x) for x in dup[0])
            raise TraceError(
                f"{name}: duplicate expert ids in the top-k of token {tok} at layer {lay} "
                f"({len(dup)} token-layers affected)"
            )
    w = trace.topk_weights
    if w is not None:
        if w.shape != ids.shape:
            raise TraceError(f"{name}: topk_weights shape {list(w.shape)} != topk_ids shape {list(ids.shape)}")
        if not np.issubdtype(w.dtype, np.floating):
            raise TraceError(f"{name}: topk_weights must be floats, got dtype {w.dtype}")
        if not np.isfinite(w).all():
            raise TraceError(f"{name}: topk_weights contains NaN or infinite values")
        if (w < 0).any():
            raise TraceError(f"{name}: topk_weights contains negative values")
    for key in _PER_TOKEN:
        a = getattr(trace, key)
        if a is not None and (a.ndim != 1 or a.shape[0] != t):
            raise TraceError(f"{name}: {key} must be [tokens={t}], got shape {list(a.shape)}")
        if a is not None and not np.issubdtype(a.dtype, np.integer):
            raise TraceError(f"{name}: {key} must be integers, got dtype {a.dtype}")
    return trace


def make_trace(
    topk_ids: np.ndarray,
    topk_weights: np.ndarray | None = None,
    num_experts: int | None = None,
    *,
    token_ids: np.ndarray | None = None,
    sequence_ids: np.ndarray | None = None,
    positions: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    name: str = "trace",
) -> Trace:
    """Build and validate a Trace from arrays (ids cast to int64, weights to float32)."""
    ids = np.asarray(topk_ids)
    if ids.ndim == 2:  # top-1 [T, L]
        ids = ids[:, :, None]
    if not np.issubdtype(ids.dtype, np.integer):
        raise TraceError(f"{name}: topk_ids must be integers, got dtype {ids.dtype}")
    _check_fits_int64(ids, name, "expert id")
    ids = ids.astype(np.int64, copy=False)
    if num_experts is None:
        if ids.size == 0:
            raise TraceError(f"{name}: empty trace (shape {list(ids.shape)})")
        num_experts = int(ids.max()) + 1
    w = None
    if topk_weights is not None:
        w = np.asarray(topk_weights)
        if w.ndim == 2:
            w = w[:, :, None]
        if not np.issubdtype(w.dtype, np.floating):
            raise TraceError(f"{name}: topk_weights must be floats, got dtype {w.dtype}")
        _check_fits_float32(w, name)
        w = w.astype(np.float32, copy=False)
    def as_int(key: str, a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        a = np.asarray(a)
        if not np.issubdtype(a.dtype, np.integer):  # checked before the cast, which would truncate
            raise TraceError(f"{name}: {key} must be integers, got dtype {a.dtype}")
        _check_fits_int64(a, name, f"{key} value")
        return a.astype(np.int64, copy=False)

    if isinstance(num_experts, (bool, np.bool_)) or not isinstance(num_experts, (int, np.integer)):
        raise TraceError(f"{name}: num_experts must be an integer, got {num_experts!r}")
    trace = Trace(
        topk_ids=ids,
        num_experts=int(num_experts),
        topk_weights=w,
        token_ids=as_int("token_ids", token_ids),
        sequence_ids=as_int("sequence_ids", sequence_ids),
        positions=as_int("positions", positions),
        meta=dict(meta or {}),
    )
    return validate_trace(trace, name)


def _check_fits_float32(w: np.ndarray, name: str) -> None:
    """A finite float64 weight past float32's range would become inf in the cast (with numpy's
    overflow warning on stderr) and then be called infinite: name the value as stored."""
    if w.dtype.itemsize <= 4 or not w.size:
        return
    with np.errstate(invalid="ignore"):
        over = np.isfinite(w) & (np.abs(w) > np.finfo(np.float32).max)
    if over.any():
        where = np.unravel_index(int(np.argmax(over)), w.shape)
        raise TraceError(f"{name}: topk_weights holds {float(w[where]):.6g} (stored as {w.dtype}), beyond the "
                         f"float32 range weights are kept in (|w| <= {float(np.finfo(np.float32).max):.4g})")


def _check_fits_int64(a: np.ndarray, name: str, what: str) -> None:
    """A uint64 above 2**63 - 1 would wrap to a negative int64: name the value as stored."""
    if a.size and a.dtype.kind == "u" and a.dtype.itemsize == 8 and a.max() > np.iinfo(np.int64).max:
        raise TraceError(f"{name}: {what} {int(a.max())} out of range (stored as {a.dtype}, above the "
                         "largest int64)")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_trace(path: str | Path) -> Trace:
    """Load a v1 `.npz` trace or an ExFlow `.npy` top-1 trace, validated.

    Raises TraceError (one line naming the file) for anything missing, malformed or truncated.
    """
    p = existing_file(path, "trace", TraceError)
    name = str(p)
    if p.stat().st_size == 0:
        raise TraceError(f"{name}: file is empty")
    if p.suffix.lower() == ".npy":
        trace = _load_exflow_npy(p)
    else:
        trace = _load_npz(p)
    return replace(trace, sha256=file_sha256(p))


def trace_shape(path: str | Path) -> tuple[int, int, int, int | None]:
    """(tokens, moe_layers, k, num_experts) of the trace at `path`, read from the .npy headers
    (and the one-value num_experts and meta members) alone: 2 ms where load_trace takes 3 s on a
    150 MB trace, so that a command can refuse a mismatched input (solve --from) before reading
    the tokens. num_experts is None where the file stores none (an ExFlow .npy, an .npz without
    the member: load_trace infers it from the ids). Never unpickles.

    A file whose headers do not describe a trace load_trace would read (not a trace, a truncated
    member, an object array, a header version numpy has no public reader for) goes to load_trace,
    which raises its one-line TraceError (or, for what only numpy can read, gives the shape). What
    only the data shows (ids out of range or repeated, bad weights) is left to load_trace."""
    p = existing_file(path, "trace", TraceError)
    if p.stat().st_size == 0:
        raise TraceError(f"{p}: file is empty")
    try:
        shape = _npy_trace_shape(p) if p.suffix.lower() == ".npy" else _npz_trace_shape(p)
    except NPY_FAILURES:  # a damaged zip or header: load_trace names the problem
        shape = None
    if shape is None:
        trace = load_trace(p)
        return trace.num_tokens, trace.num_layers, trace.top_k, trace.num_experts
    return shape


def _npy_header(f: Any, size: int) -> tuple[tuple[int, ...], np.dtype[Any]] | None:
    """(shape, dtype) of the .npy stream `f` (at its start, `size` bytes in all), None when the
    data it declares is not all there or numpy has no public reader for its header version."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    version = np.lib.format.read_magic(f)
    if version not in readers:
        return None
    shape, _, dtype = readers[version](f)
    return (shape, dtype) if int(np.prod(shape, dtype=object)) * dtype.itemsize <= size - f.tell() else None


def _npy_trace_shape(p: Path) -> tuple[int, int, int, int | None] | None:
    """An ExFlow .npy's shape as a trace's (k = 1, no num_experts), None unless 2-D integer ids."""
    with open(p, "rb") as f:
        header = _npy_header(f, p.stat().st_size)
    if header is None or len(header[0]) != 2 or header[1].kind not in "iu" or 0 in header[0]:
        return None
    tokens, layers = header[0]
    return tokens, layers, 1, None


def _npz_trace_shape(p: Path) -> tuple[int, int, int, int | None] | None:
    """A v1 .npz's shape from its members' headers (each checked whole, as load_trace reads them
    all), None unless topk_ids is a non-empty 3-D integer array and num_experts, when stored, is
    one integer in [1, MAX_EXPERTS] and at least k."""
    shapes: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
    small: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(p) as z:
        for info in z.infolist():
            with z.open(info) as f:
                header = _npy_header(f, info.file_size)
                if header is None or header[1].hasobject:
                    return None
                key = info.filename.removesuffix(".npy")
                shapes[key] = header
                if key in ("num_experts", "meta") and int(np.prod(header[0], dtype=object)) == 1:
                    f.seek(0)
                    small[key] = np.lib.format.read_array(f, allow_pickle=False)
    if "topk_ids" not in shapes or ("meta" in shapes and "meta" not in small):
        return None
    ids_shape, ids_dtype = shapes["topk_ids"]
    if len(ids_shape) != 3 or ids_dtype.kind not in "iu" or 0 in ids_shape:
        return None
    if _parse_meta(small.get("meta"), p).get("format", TRACE_FORMAT) != TRACE_FORMAT:
        return None
    tokens, layers, k = ids_shape
    if "num_experts" not in shapes:
        return tokens, layers, k, None
    stored = small.get("num_experts")
    if stored is None or stored.dtype.kind not in "iu":
        return None
    num_experts = int(stored.reshape(()))
    return (tokens, layers, k, num_experts) if k <= num_experts <= MAX_EXPERTS else None  # k >= 1: checked above


def _load_exflow_npy(p: Path) -> Trace:
    with open(p, "rb") as f:
        head = f.read(6)
    if head[:2] != b"PK" and head != b"\x93NUMPY":  # numpy's own error would speak of pickled data
        what = looks_like(p)
        raise TraceError(f"{p}: not a .npy file (no NUMPY header){f'; it looks like {what}' if what else ''}")
    try:
        with open(p, "rb") as f:
            if not npy_data_fits(f, p.stat().st_size):
                raise TraceError(f"{p}: truncated .npy (its header declares more data than the file holds)")
        arr = np.load(p, allow_pickle=False)
    except TraceError:
        raise
    except ValueError as e:  # object arrays need pickle: refuse them
        raise TraceError(f"{p}: not a plain numeric .npy array ({e})") from None
    except NPY_FAILURES as e:  # OSError, EOFError, and what a garbled header makes the parser raise
        raise TraceError(f"{p}: truncated or unreadable .npy ({type(e).__name__}: {e})") from None
    if not isinstance(arr, np.ndarray):  # np.load reads a zip archive (.npz) whatever its name
        arr.close()
        raise TraceError(f"{p}: an .npz archive named .npy; an ExFlow trace is a single .npy array "
                         "(a moeplace trace: name it .npz)")
    if arr.ndim != 2:
        raise TraceError(f"{p}: an ExFlow trace is [tokens, moe_layers] of top-1 ids, got shape {list(arr.shape)}")
    return make_trace(arr, meta={"source": "exflow-npy", "file": p.name}, name=str(p))


def _load_npz(p: Path) -> Trace:
    arrays = read_npz(p, "trace", TraceError)
    if "topk_ids" not in arrays:
        hint = " (this is a load-only file: use it where expert loads are accepted)" if "expert_loads" in arrays else ""
        raise TraceError(f"{p}: not a moeplace trace: no 'topk_ids' array{hint}")
    if arrays["topk_ids"].ndim != 3:
        raise TraceError(f"{p}: topk_ids must be [tokens, moe_layers, k], got shape {list(arrays['topk_ids'].shape)}")
    meta = _parse_meta(arrays.get("meta"), p)
    fmt = meta.get("format", TRACE_FORMAT)
    if fmt != TRACE_FORMAT:
        raise TraceError(f"{p}: unsupported trace format {fmt!r} (this moeplace reads {TRACE_FORMAT})")
    stored = arrays.get("num_experts")
    num_experts: int | None = None
    if stored is not None:
        if stored.size != 1 or not np.issubdtype(stored.dtype, np.integer):
            raise TraceError(f"{p}: num_experts must be one integer")
        num_experts = int(stored.reshape(()))
    trace = make_trace(
        arrays["topk_ids"],
        arrays.get("topk_weights"),
        num_experts,
        token_ids=arrays.get("token_ids"),
        sequence_ids=arrays.get("sequence_ids"),
        positions=arrays.get("positions"),
        meta=meta,
        name=str(p),
    )
    problem = weight_order_problem(trace, str(p))
    if problem:  # another tool's convention (e.g. selection-score order), not a broken file: say how it is read
        warn(f"{problem}: column 0 is taken as each token's top-1, as stored")
    return trace


def _parse_meta(raw: np.ndarray | None, p: Path) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        value = raw.reshape(()).item()
        meta = loads_json(value.decode("utf-8") if isinstance(value, bytes) else str(value))  # bytes: np.asarray(b"{...}")
    except (ValueError, TypeError) as e:
        raise TraceError(f"{p}: 'meta' is not a JSON string ({e})") from None
    if not isinstance(meta, dict):
        raise TraceError(f"{p}: 'meta' must be a JSON object")
    return meta


def save_trace(trace: Trace, path: str | Path, compress: bool = True, checked: bool = False) -> None:
    """Write a v1 trace atomically (temp file + rename); refuses what loading would refuse.

    compress=False stores the arrays as they are: gate weights barely compress, and a large
    trace written often (serve's live routing, engine.RoutingLog) takes seconds instead of tens
    of them. checked=True skips the validation, for arrays that come straight from a router's
    top-k (distinct ids, weights highest first); load_trace still checks what it reads."""
    if not checked:
        problem = weight_order_problem(validate_trace(trace, str(path)), str(path))
        if problem:  # what moeplace writes keeps the v1 promise
            raise TraceError(f"{problem}: a v1 trace lists each token's experts by gate weight, highest first")
    arrays: dict[str, np.ndarray] = {
        "topk_ids": trace.topk_ids.astype(_id_dtype(trace.num_experts)),
        "num_experts": np.asarray(trace.num_experts, dtype=np.int64),
        "meta": np.asarray(json.dumps({**trace.meta, "format": TRACE_FORMAT}, default=json_default)),
    }
    if trace.topk_weights is not None:
        arrays["topk_weights"] = trace.topk_weights.astype(np.float32)
    for key in _PER_TOKEN:
        a = getattr(trace, key)
        if a is not None:
            arrays[key] = a.astype(np.int64)
    save_npz_atomic(path, arrays, compress)


def _id_dtype(num_experts: int) -> type:
    # ids are stored compactly; loading widens them to int64
    return np.int16 if num_experts <= np.iinfo(np.int16).max else np.int32


@dataclass(frozen=True)
class ExpertLoads:
    """Load-only routing statistics: token-expert selections per expert and layer."""

    loads: np.ndarray  # float64 [L, E]
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def num_layers(self) -> int:
        return int(self.loads.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.loads.shape[1])

    def model_identity(self) -> dict[str, Any] | None:
        return model_identity(self.meta)


def model_identity(meta: dict[str, Any]) -> dict[str, Any] | None:
    """Which model a trace's or load file's routing came from, as far as its meta says: model (a
    path or hub id), model_type, moe_layers (decoder layer indices) and renumbered_from (the
    original of a checkpoint `permute-checkpoint` renumbered); None when meta says none of them.
    A placement records it (trace_model) so that export and serve can check and map layers."""
    found: dict[str, Any] = {key: meta[key] for key in ("model", "model_type", "moe_layers", "renumbered_from")
                             if key in meta}
    return found or None


def make_loads(loads: np.ndarray, meta: dict[str, Any] | None = None, name: str = "loads",
               what: str = "expert_loads") -> ExpertLoads:
    """Checked load-only input; errors read "{name}: {what} must be ..." (what: the field)."""
    a = np.asarray(loads)
    if a.ndim != 2 or 0 in a.shape:
        raise TraceError(f"{name}: {what} must be a non-empty [moe_layers, experts] array, got shape {list(a.shape)}")
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise TraceError(f"{name}: {what} must be numeric, got dtype {a.dtype}")
    if a.shape[1] > MAX_EXPERTS:  # as a trace's: every stage allocates [E, E] or [L, E] arrays
        raise TraceError(f"{name}: num_experts must be in [1, {MAX_EXPERTS}], got {a.shape[1]}")
    a = a.astype(np.float64)
    if not np.isfinite(a).all() or (a < 0).any():
        layer, expert = (int(x) for x in np.argwhere(~np.isfinite(a) | (a < 0))[0])
        raise TraceError(f"{name}: {what} must be finite and non-negative, got {a[layer, expert]:.6g} at layer {layer}, "
                         f"expert {expert}")
    if (a >= MAX_LOAD).any():
        layer, expert = (int(x) for x in np.argwhere(a >= MAX_LOAD)[0])
        raise TraceError(f"{name}: {what} holds {a[layer, expert]:.6g} at layer {layer}, expert {expert}: "
                         "counts of token selections must be below 1e15")
    if not a.any():
        raise TraceError(f"{name}: {what} holds no expert selection (every count is 0)")
    return ExpertLoads(a, dict(meta or {}))


def save_loads(loads: ExpertLoads, path: str | Path) -> None:
    save_npz_atomic(path, {
        "expert_loads": loads.loads,
        "meta": np.asarray(json.dumps({**loads.meta, "format": LOADS_FORMAT}, default=json_default)),
    })


def is_load_only(path: str | Path) -> bool:
    """Whether `path` is load-only input (moeplace.loads/v1) rather than a trace, the one rule
    every stage uses: a readable .npz holding 'expert_loads' and no 'topk_ids' (a file with both
    is read as the trace, whose per-token paths say more). False for anything else, unreadable
    files included: load_trace then names the problem."""
    if Path(path).suffix.lower() == ".npy":  # ExFlow's top-1 trace
        return False
    try:
        return _loads_only(npz_names(path, "trace", TraceError))
    except TraceError:
        return False


def _loads_only(names: list[str]) -> bool:
    return "expert_loads" in names and "topk_ids" not in names


def load_loads(path: str | Path) -> ExpertLoads:
    """Load a load-only `.npz`; a per-token trace (see is_load_only) is accepted too and summed into loads."""
    p = existing_file(path, "loads", TraceError)
    names = npz_names(p, "loads", TraceError)
    if not _loads_only(names):
        if "topk_ids" in names:
            t = load_trace(p)
            return ExpertLoads(t.expert_loads(), {**t.meta, "from_trace": True}, t.sha256)
        raise TraceError(f"{p}: neither 'expert_loads' nor 'topk_ids' found")
    arrays = read_npz(p, "loads", TraceError, members=("expert_loads", "meta"))
    loads = make_loads(arrays["expert_loads"], _parse_meta(arrays.get("meta"), p), str(p))
    return replace(loads, sha256=file_sha256(p))
