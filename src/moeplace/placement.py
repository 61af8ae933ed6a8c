"""The placement (format v1) shared by solve, eval, serve and export.

A JSON file:

    format         "moeplace.placement/v1"
    num_layers     MoE layers L
    num_experts    logical experts per layer E
    num_gpus       G (expert-parallel ranks)
    gpus_per_node  GPUs per node (G % gpus_per_node == 0); node of gpu g = g // gpus_per_node
    expert_to_gpu  [L][E] GPU of each expert's primary copy
    replicas       [L] lists of [expert, gpu]: extra copies (redundant experts); [] when none
    objective, solver, bound, gap, metrics, trace_sha256, trace_routing_sha256, trace_model, split:
                   how it was made (informative; eval finds the fit trace by either sha256 to hold
                   out its split, and notes a trace of another model_type or MoE layers);
                   split is {train_fraction, seed} and, for whole sequences held out
                   (solve --split-by sequence), by: "sequence" (absent or "token": a token split)
    fit_paths      a fixed-size sketch of the fit tokens' routing paths (trace/paths.py): eval
                   says what share of another trace's tokens repeat them (null when unknown)
    fit_loads      [L][E] token-expert selections per expert of the fit tokens (or the fit load
                   file): eval fits its load-balancing baselines on them whatever trace it replays
                   (null when unknown: a placement of an older moeplace, or built by hand)

Physical slots (what engines number): on each GPU, its primary experts in ascending id, then
its replicas in the listed order; GPU 0's slots first. See `physical_slots`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeplace.errors import PlacementError
from moeplace.io import json_default, read_json, write_json_atomic
from moeplace.trace.format import SPLIT_BY
from moeplace.trace.paths import sketch_problem

PLACEMENT_FORMAT = "moeplace.placement/v1"


@dataclass(frozen=True, eq=False)
class Placement:
    """Which GPU holds each expert of each MoE layer (placement format v1, docs/solver.md): the
    primary copy in `expert_to_gpu` [L, E], extra copies in `replicas`, and what produced it
    (objective, solver, bound/gap, metrics, the fit trace's hashes and split). Checked on
    construction; `save` writes the JSON atomically, `load_placement` reads and checks it.

    Frozen, so a checked placement stays checked: the fields cannot be re-bound, the arrays are
    read-only copies and `replicas` is tuples. A changed placement is a new one, checked again:
    `dataclasses.replace(p, bound=..., metrics=...)`. The provenance dicts (objective, solver,
    metrics, extra) are records that their maker may still annotate.

    `p == q` when both write the same JSON document (a saved and re-loaded placement equals the
    original); the hash is the table's (layout, replicas, cluster), so placements can key dicts.
    (The dataclass default compared the ndarray fields as a tuple: "truth value of an array is
    ambiguous", and hashed them: "unhashable type".)"""

    expert_to_gpu: np.ndarray  # int64 [L, E], read-only
    num_gpus: int
    gpus_per_node: int
    replicas: Sequence[Sequence[tuple[int, int]]] = ()  # per layer (expert, gpu); stored as tuples
    objective: dict[str, Any] = field(default_factory=dict)
    solver: dict[str, Any] = field(default_factory=dict)
    bound: float | None = None
    gap: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    trace_sha256: str | None = None
    trace_routing_sha256: str | None = None  # Trace.routing_sha256: the fit trace in any file
    trace_model: dict[str, Any] | None = None  # Trace.model_identity of the fit trace
    split: dict[str, Any] | None = None  # {"train_fraction": f, "seed": s[, "by": "sequence"]} when fitted on a split
    fit_paths: dict[str, Any] | None = None  # trace/paths.py sketch of the fit tokens' routing paths
    fit_loads: np.ndarray | None = None  # float64 [L, E] expert loads of the fit tokens
    extra: dict[str, Any] = field(default_factory=dict)  # other keys, kept on round-trip

    def __post_init__(self) -> None:
        raw = np.asarray(self.expert_to_gpu)
        if raw.ndim != 2 or not (np.issubdtype(raw.dtype, np.integer) or raw.size == 0):
            # a float layout would be truncated (0.9 -> GPU 0); a ragged one fails later, obscurely
            raise PlacementError(f"expert_to_gpu must be an integer array [layers, experts], got {raw.dtype} "
                                 f"of shape {raw.shape}")
        layout = raw.astype(np.int64)  # a copy: the caller's array stays theirs
        layout.flags.writeable = False
        object.__setattr__(self, "expert_to_gpu", layout)  # (frozen: construction sets through object)
        for name in ("num_gpus", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise PlacementError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))  # a numpy integer as Python's: equal JSON, no overflow
        if self.num_gpus % self.gpus_per_node:
            raise PlacementError(f"num_gpus {self.num_gpus} is not a multiple of gpus_per_node {self.gpus_per_node}")
        if raw.size and not (0 <= self.expert_to_gpu.min() and self.expert_to_gpu.max() < self.num_gpus):
            raise PlacementError(f"expert_to_gpu holds GPU ids outside [0, {self.num_gpus})")
        if self.fit_loads is not None:
            loads = _checked_loads(self.fit_loads, raw.shape)
            loads.flags.writeable = False
            object.__setattr__(self, "fit_loads", loads)
        replicas: Any = self.replicas
        if isinstance(replicas, np.ndarray) and replicas.ndim == 3:  # [L, R, 2]: as many replicas in every layer
            replicas = list(replicas)
        if isinstance(replicas, (list, tuple)) and not replicas:
            replicas = [[] for _ in range(self.num_layers)]
        problem = _replicas_problem(replicas, self.expert_to_gpu, self.num_gpus)
        if problem:  # here, not as an IndexError in holders() later
            raise PlacementError(problem)
        object.__setattr__(self, "replicas", tuple(tuple((int(e), int(g)) for e, g in r) for r in replicas))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self is other or _document_text(self) == _document_text(other)

    def __hash__(self) -> int:
        # only what construction froze (equal documents have equal tables); the dicts may be annotated
        return hash((self.num_gpus, self.gpus_per_node, self.expert_to_gpu.shape, self.expert_to_gpu.tobytes(),
                     self.replicas))

    @property
    def num_layers(self) -> int:
        return int(self.expert_to_gpu.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.expert_to_gpu.shape[1])

    @property
    def num_nodes(self) -> int:
        return self.num_gpus // self.gpus_per_node

    @property
    def num_replicas(self) -> int:
        return max((len(r) for r in self.replicas), default=0)

    def holders(self, layer: int) -> list[list[int]]:
        """GPUs holding a copy of each expert of `layer` (primary first)."""
        out = [[int(g)] for g in self.expert_to_gpu[layer]]
        for e, g in self.replicas[layer]:
            out[e].append(int(g))
        return out

    def experts_on_gpu(self, layer: int, gpu: int) -> list[int]:
        """Logical experts of `layer` with a copy on `gpu`, in physical slot order."""
        primary = [int(e) for e in np.flatnonzero(self.expert_to_gpu[layer] == gpu)]
        return primary + [int(e) for e, g in self.replicas[layer] if g == gpu]

    def physical_slots(self, layer: int) -> list[tuple[int, int]]:
        """(gpu, logical expert) of each physical slot of `layer`, GPU-major."""
        return [(g, e) for g in range(self.num_gpus) for e in self.experts_on_gpu(layer, g)]

    def check_fits(self, num_layers: int, num_experts: int, what: str = "trace") -> None:
        """Reject a placement made for another model (layer or expert count)."""
        if (self.num_layers, self.num_experts) != (num_layers, num_experts):
            raise PlacementError(
                f"placement is for {self.num_layers} MoE layers x {self.num_experts} experts, "
                f"but the {what} has {num_layers} x {num_experts}"
            )

    def check_model(self, model_type: object, moe_layers: Sequence[int] | None, what: str) -> None:
        """Reject a placement fitted on another model's routing, where both sides say which: the fit
        trace's record (trace_model) names another model_type, or other decoder layers for the MoE
        layers. check_fits passes two models of one shape; their expert ids number other experts.
        A checkpoint of the same family and layers (a fine-tune, a copy) passes; `model_type` as a
        config holds it (anything but a string: not known, not compared)."""
        fitted = self.trace_model or {}
        fitted_type, fitted_layers = fitted.get("model_type"), fitted.get("moe_layers")
        source = f" ({fitted['model']})" if isinstance(fitted.get("model"), str) else ""
        if isinstance(fitted_type, str) and isinstance(model_type, str) and fitted_type != model_type:
            raise PlacementError(
                f"placement was fitted on the routing of {_a(fitted_type)} model{source}, but the {what} is "
                f"{_a(model_type)} model: its expert ids number other experts; solve a placement on a trace of it")
        if isinstance(fitted_layers, list) and moe_layers is not None and list(fitted_layers) != list(moe_layers):
            raise PlacementError(
                f"placement was fitted on a model{source} with its MoE layers at decoder layers "
                f"{_short(fitted_layers)}, but the {what} has them at {_short(list(moe_layers))}: "
                "solve a placement on a trace of it")

    def to_json(self) -> dict[str, Any]:
        """The v1 JSON document (a dict; numpy values are converted when written)."""
        return {
            "format": PLACEMENT_FORMAT,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "expert_to_gpu": self.expert_to_gpu.tolist(),
            "replicas": [[[int(e), int(g)] for e, g in r] for r in self.replicas],
            "objective": self.objective,
            "solver": self.solver,
            "bound": self.bound,
            "gap": self.gap,
            "metrics": self.metrics,
            "trace_sha256": self.trace_sha256,
            "trace_routing_sha256": self.trace_routing_sha256,
            "trace_model": self.trace_model,
            "split": self.split,
            "fit_paths": self.fit_paths,
            "fit_loads": None if self.fit_loads is None else _numbers(self.fit_loads),
            **self.extra,
        }

    def save(self, path: str | Path) -> None:
        """Check and write the v1 JSON to `path` atomically (temp file + rename)."""
        validate_placement(self, str(path))
        write_json_atomic(path, self.to_json())


_KNOWN = {
    "format", "num_layers", "num_experts", "num_gpus", "gpus_per_node", "expert_to_gpu", "replicas",
    "objective", "solver", "bound", "gap", "metrics", "trace_sha256", "trace_routing_sha256", "trace_model", "split",
    "fit_paths", "fit_loads",
}


def validate_placement(p: Placement, name: str = "placement") -> Placement:
    """What construction leaves open, for a placement to be used or written: a non-empty table,
    and no GPU without a copy; raise PlacementError naming `name` and the problem. (The rest is
    checked on construction, and a Placement is frozen.)"""
    if p.expert_to_gpu.ndim != 2 or 0 in p.expert_to_gpu.shape:
        raise PlacementError(f"{name}: expert_to_gpu must be a non-empty [layers][experts] table")
    copies = p.num_experts + p.num_replicas  # the most copies any layer has
    if p.num_gpus > copies:  # checked before any stage loops or allocates per GPU (2**31 of them)
        held = f"{p.num_experts} experts" + (f" + {p.num_replicas} replicas" if p.num_replicas else "")
        raise PlacementError(f"{name}: num_gpus {p.num_gpus} exceeds the {copies} expert copies of a layer "
                             f"({held}): some GPU would hold no expert")
    return p


def _checked_loads(loads: Any, shape: tuple[int, ...]) -> np.ndarray:
    """`fit_loads` as float64 [L, E] of the layout's `shape`: finite, non-negative, with finite
    per-layer sums (the load baselines add them up); else PlacementError saying what is wrong."""
    try:
        a = np.asarray(loads, dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as e:  # ragged rows, a huge JSON integer
        raise PlacementError(f"malformed fit_loads, not numbers [layers, experts] ({e})") from None
    if a.shape != tuple(shape):
        raise PlacementError(f"fit_loads must have the layout's shape [layers, experts] {tuple(shape)}, got {a.shape}")
    bad = ~np.isfinite(a) | (a < 0)
    if bad.any():
        layer, expert = (int(i) for i in np.argwhere(bad)[0])
        raise PlacementError(f"fit_loads must be finite and non-negative: layer {layer}, expert {expert} holds "
                             f"{float(a[layer, expert])}")
    with np.errstate(over="ignore"):
        if not np.isfinite(a.sum(axis=1)).all():
            raise PlacementError("fit_loads must sum to a finite load per layer")
    return a


def _replicas_problem(replicas: Any, e2g: np.ndarray, num_gpus: int) -> str | None:
    """What is wrong with `replicas` for the layout `e2g` [L, E] (one list per layer of (expert,
    gpu) integer pairs in range, no second copy of an expert on one GPU), else None. A layer and a
    pair may be numpy arrays ([R, 2] and [2] of integers: np.argwhere's rows); a layer may not be a
    set or a mapping, whose order is not the listed order physical slots follow."""
    num_layers, num_experts = e2g.shape
    if not isinstance(replicas, (list, tuple)) or len(replicas) != num_layers:
        got = len(replicas) if isinstance(replicas, (list, tuple)) else type(replicas).__name__
        return f"replicas must have one list per layer ({num_layers}), got {got}"
    for layer, reps in enumerate(replicas):
        if not (isinstance(reps, (list, tuple)) or isinstance(reps, np.ndarray) and reps.ndim == 2):
            return f"replicas of layer {layer} must be a list of (expert, gpu) pairs, got {type(reps).__name__}"
        seen: set[tuple[int, int]] = set()
        for pair in reps:
            if not (isinstance(pair, (tuple, list)) or isinstance(pair, np.ndarray) and pair.ndim == 1) \
                    or len(pair) != 2 or not all(_is_int(x) for x in pair):
                return f"replica {pair!r} of layer {layer} is not an (expert, gpu) pair of integers"
            e, g = (int(x) for x in pair)
            if not (0 <= e < num_experts and 0 <= g < num_gpus):
                return f"replica ({e}, {g}) of layer {layer} is out of range"
            if g == e2g[layer, e] or (e, g) in seen:
                return f"expert {e} of layer {layer} has two copies on GPU {g}"
            seen.add((e, g))
    return None


def load_placement(path: str | Path, label: str = "") -> Placement:
    """Read and check a v1 placement JSON; PlacementError (one line naming the file) if it is not one.
    `label`, the option or key that named the file (e.g. "--from"), starts each error: "nope.json:
    no such file" does not say which of a command's files is missing."""
    try:
        doc = read_json(path, PlacementError)
    except PlacementError as e:
        raise PlacementError(f"{label} {e}" if label else str(e)) from None
    return placement_from_json(doc, f"{label} {path}" if label else str(path))


def placement_from_json(doc: Any, name: str = "placement") -> Placement:
    """A Placement from a parsed v1 JSON document, every field checked; `name` for the errors."""
    if not isinstance(doc, dict):
        raise PlacementError(f"{name}: a placement is a JSON object")
    if doc.get("format") != PLACEMENT_FORMAT:
        raise PlacementError(f"{name}: not a moeplace placement (format {doc.get('format')!r}, expected {PLACEMENT_FORMAT!r})")
    for key in ("num_layers", "num_experts", "num_gpus", "gpus_per_node", "expert_to_gpu"):
        if key not in doc:
            raise PlacementError(f"{name}: missing '{key}'")
    num_layers, num_experts, num_gpus, gpn = (_json_int(doc[k], k, name) for k in
                                               ("num_layers", "num_experts", "num_gpus", "gpus_per_node"))
    rows = doc["expert_to_gpu"]
    if not (isinstance(rows, list) and all(isinstance(r, list) and all(_is_int(x) for x in r) for r in rows)):
        raise PlacementError(f"{name}: expert_to_gpu must be a list of lists of integer GPU ids")
    reps = doc.get("replicas") or []
    if not (isinstance(reps, list) and all(isinstance(r, list) and all(
            isinstance(c, list) and len(c) == 2 and all(_is_int(x) for x in c) for c in r) for r in reps)):
        raise PlacementError(f"{name}: replicas must be one list per layer of [expert, gpu] integer pairs")
    replicas = [[(int(e), int(g)) for e, g in r] for r in reps]
    try:
        e2g = np.asarray(rows, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise PlacementError(f"{name}: malformed expert_to_gpu ({e})") from None
    if e2g.ndim != 2:
        raise PlacementError(f"{name}: expert_to_gpu must be a rectangular table of integer GPU ids")
    if e2g.shape != (num_layers, num_experts):
        raise PlacementError(
            f"{name}: expert_to_gpu is {e2g.shape[0]}x{e2g.shape[1]} but num_layers x num_experts "
            f"is {num_layers}x{num_experts}"
        )
    split = doc.get("split")
    if split is not None and not (
            isinstance(split, dict) and isinstance(split.get("train_fraction"), (int, float))
            and not isinstance(split.get("train_fraction"), bool) and 0 < split["train_fraction"] <= 1
            and _is_int(split.get("seed")) and split["seed"] >= 0):
        raise PlacementError(f"{name}: 'split' must hold train_fraction in (0, 1] and an integer seed >= 0, "
                             f"got {split!r}")
    if split is not None and split.get("by", "token") not in SPLIT_BY:  # eval must re-draw the same held-out part
        raise PlacementError(f"{name}: 'split' by must be one of {', '.join(map(repr, SPLIT_BY))}, got {split['by']!r}")
    for key in ("objective", "solver", "metrics", "trace_model"):  # objects as solve writes them; eval reads solver.get(...)
        if not isinstance(doc.get(key, {}), (dict, type(None))):
            raise PlacementError(f"{name}: '{key}' must be a JSON object or null, got {_json_kind(doc[key])}")
    for key in ("bound", "gap"):
        value = doc.get(key)
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value)):
            raise PlacementError(f"{name}: '{key}' must be a finite number or null, got {_json_kind(value)}")
    for key in ("trace_sha256", "trace_routing_sha256"):
        if not isinstance(doc.get(key), (str, type(None))):
            raise PlacementError(f"{name}: '{key}' must be a string or null, got {_json_kind(doc[key])}")
    fit_paths = doc.get("fit_paths")
    problem = None if fit_paths is None else sketch_problem(fit_paths)
    if problem:
        raise PlacementError(f"{name}: 'fit_paths' {problem}")
    fit_loads = doc.get("fit_loads")
    if fit_loads is not None:
        if not (isinstance(fit_loads, list) and all(isinstance(r, list) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in r) for r in fit_loads)):
            raise PlacementError(f"{name}: 'fit_loads' must be one list of numbers per layer, or null")
    try:
        p = Placement(
            expert_to_gpu=e2g,
            num_gpus=num_gpus,
            gpus_per_node=gpn,
            replicas=replicas,
            objective=doc.get("objective") or {},
            solver=doc.get("solver") or {},
            bound=doc.get("bound"),
            gap=doc.get("gap"),
            metrics=doc.get("metrics") or {},
            trace_sha256=doc.get("trace_sha256"),
            trace_routing_sha256=doc.get("trace_routing_sha256"),
            trace_model=doc.get("trace_model"),
            split=doc.get("split"),
            fit_paths=fit_paths,
            fit_loads=None if fit_loads is None else _checked_loads(fit_loads, e2g.shape),
            extra={k: v for k, v in doc.items() if k not in _KNOWN},
        )
    except PlacementError as e:  # construction checks the layout and replicas: name the file
        raise PlacementError(f"{name}: {e}") from None
    return validate_placement(p, name)


def _document_text(p: Placement) -> str:
    """`p`'s JSON document as canonical text, for equality: key order ignored, NaN equal to NaN,
    numpy scalars as their values, anything JSON cannot hold as its repr."""
    return json.dumps(p.to_json(), sort_keys=True, default=_any_default)


def _any_default(obj: Any) -> Any:
    try:
        return json_default(obj)
    except TypeError:
        return repr(obj)


def _numbers(a: np.ndarray) -> list[Any]:
    """A float array as JSON lists, whole numbers (token counts) written as integers."""
    return a.astype(np.int64).tolist() if np.array_equal(a, np.round(a)) and np.abs(a).max(initial=0) < 2 ** 53 \
        else a.tolist()


def _json_kind(value: Any) -> str:
    """A JSON value for an error line: numbers and short strings as written, else their JSON type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 40):
        return repr(value)  # NaN and Infinity, which Python's json reads, show as nan and inf
    kinds: dict[type, str] = {str: "a long string", list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def _is_int(x: Any) -> bool:
    """An integer from JSON or numpy (library callers build replicas from arrays); not a bool,
    which would pass as 1."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _json_int(value: Any, key: str, name: str) -> int:
    if not _is_int(value) or not 1 <= value <= 1 << 31:
        raise PlacementError(f"{name}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _a(word: str) -> str:
    """'a mixtral', 'an olmoe': the article of a model family's name in a sentence."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def check_topology(num_experts: int, num_gpus: int, gpus_per_node: int, balanced: bool = True,
                   hint: str = "", redundant: int = 0, *, gpus_named: str = "", fewer_gpus: str | None = None,
                   per_node_hint: str = "") -> None:
    """Reject impossible clusters before any work: one clear line each. `redundant` extra copies
    per layer let more GPUs than experts each hold one (EPLB-style 16-way EP of 8 experts).

    The rules are the same for every command; the ways out are the caller's, since they name its
    options: `hint` ends the line about unequal counts, `fewer_gpus` the one about more GPUs than
    copies (default: solve's, which adds copies), `per_node_hint` the one about --gpus-per-node.
    `gpus_named` is how the GPU count was given, heading those lines (e.g. "--gpus 8 (the default
    for 8 experts)"; default: "--gpus G" where a line names the option).
    """
    if num_gpus < 1:
        raise PlacementError(f"--gpus must be >= 1, got {num_gpus}")
    if gpus_per_node < 1 or num_gpus % gpus_per_node:
        raise PlacementError(f"{gpus_named or f'--gpus {num_gpus}'} is not a multiple of --gpus-per-node "
                             f"{gpus_per_node}{'; ' + per_node_hint if per_node_hint else ''}")
    if num_gpus > num_experts + redundant:
        copies = f"{num_experts} experts" + (f" + {redundant} redundant copies" if redundant else "")
        if fewer_gpus is None:
            way_out = "" if redundant else " (--objective balance with --redundant-experts adds copies)"
        else:
            way_out = f"; {fewer_gpus}" if fewer_gpus else ""
        raise PlacementError(f"{gpus_named or f'{num_gpus} GPUs'} for {copies}: some GPU would hold no expert{way_out}")
    if balanced and num_experts % num_gpus:
        raise PlacementError(
            f"{gpus_named + ': ' if gpus_named else ''}{num_experts} experts per layer cannot be split equally over "
            f"{num_gpus} GPUs ({num_experts} % {num_gpus} = {num_experts % num_gpus}){': ' + hint if hint else ''}"
        )


def _short(layers: list[Any]) -> str:
    """A layer list for one error line: the first eight, then how many more."""
    return str(layers[:8])[:-1] + (f", ... {len(layers)} in all]" if len(layers) > 8 else "]")

