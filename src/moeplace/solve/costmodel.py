"""Predicted MoE-layer time: a cluster + model config (YAML) applied to a trace and a placement.

Per MoE layer l (tail latency, the quantity MoETuner targets; docs/cost-model.md):

    time[l]     = max_g compute[l, g] + dispatch[l] + combine[l]
    compute     = expert_fixed_us * expected active experts on g + expert_us_per_token * token-expert load on g
                  (an expert, or a copy, serving a share p of the traced tokens is active in a batch
                  of B tokens with probability 1 - (1 - p)^B; B = the traced tokens: active if p > 0)
    dispatch    = max_g Alltoall time of GPU g: a token sends its hidden state once to every GPU,
                  other than its current one, that serves one of its k experts (DeepEP-style
                  de-duplication per destination GPU)
    combine     = likewise, each serving GPU returns its partial output to the token's new home,
                  the GPU of its top-1 expert (context-coherent EP: the token continues there)
    GPU g's Alltoall time = max(send, receive), each = max(NVLink bytes / NVLink bandwidth,
                  network bytes / network bandwidth) + the latency of the slowest link class used
                  (NVLink and the NIC are separate engines and run concurrently).

Token counts are scaled from the trace to `batch_tokens` tokens per step (model config) so
times are those of a realistic batch. Where tokens sit follows eval/metrics.py: the top-1 GPU
of the previous layer, `initial_homes` at layer 0. The model section may instead be estimated
from a checkpoint's config.json and the cluster YAML's `gpu:` figures (estimate_model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeplace.errors import MoeplaceError
from moeplace.io import read_yaml
from moeplace.options import DTYPE_BYTES, DTYPE_SPELLINGS, MAX_BATCH_TOKENS, MAX_HIDDEN_SIZE, brief, plural, yaml_number
from moeplace.eval.metrics import initial_homes, remote_mask, token_gpus
from moeplace.placement import Placement
from moeplace.trace.format import MAX_EXPERTS, Trace

SELF, INTRA, INTER = 0, 1, 2  # link classes


@dataclass(frozen=True)
class Cluster:
    name: str
    num_nodes: int
    gpus_per_node: int
    intra_GBps: float  # GB/s per GPU per direction, effective Alltoall bandwidth inside a node
    intra_latency_us: float
    inter_GBps: float  # GB/s per GPU per direction across nodes
    inter_latency_us: float

    @property
    def num_gpus(self) -> int:
        return self.num_nodes * self.gpus_per_node


@dataclass(frozen=True)
class ModelCost:
    name: str
    hidden_size: int
    dispatch_bytes: float  # bytes per hidden element sent to experts (1 for FP8 dispatch)
    combine_bytes: float  # bytes per hidden element returned (2 for BF16 combine)
    expert_us_per_token: float  # one token through one expert FFN
    expert_fixed_us: float  # per active expert per layer: reading its weights
    batch_tokens: int | None  # tokens per step the trace is scaled to (None: as traced)
    num_experts: int | None = None  # experts per MoE layer of the model these figures describe,
    top_k: int | None = None  # and its top-k: checked against the trace (None: not stated)


# shipped cluster configs (repository configs/cluster/) by (nodes, GPUs per node)
SHIPPED_CLUSTERS = {(1, 4): "configs/cluster/h100-1x4-nvlink.yaml", (1, 8): "configs/cluster/h100-1x8-nvlink.yaml",
                    (2, 8): "configs/cluster/h100-2x8-ib.yaml", (8, 8): "configs/cluster/h100-8x8-ib.yaml"}


def shipped(config: str) -> str:
    """A shipped config's path as the user can type it: relative where the working directory is
    the repository, else the checkout's absolute path (editable install), else as in the repository."""
    repository = Path(__file__).resolve().parents[3] / config
    return config if Path(config).exists() or not repository.exists() else str(repository)


@dataclass(frozen=True)
class CostModel:
    cluster: Cluster
    model: ModelCost
    source: str | None = None  # the cluster YAML, for errors (the cluster's `name` may be shared or absent)
    model_source: str | None = None  # the YAML holding the model section (--model-config, else the cluster's)
    estimate: dict[str, Any] | None = None  # how the model section was estimated from a config.json (else None)

    def link_class(self) -> np.ndarray:
        """SELF / INTRA / INTER of each (source, destination) GPU pair, int [G, G]."""
        node = np.arange(self.cluster.num_gpus) // self.cluster.gpus_per_node
        same_node = node[:, None] == node[None, :]
        return np.where(np.eye(len(node), dtype=bool), SELF, np.where(same_node, INTRA, INTER))

    def check(self, num_gpus: int, gpus_per_node: int) -> None:
        c = self.cluster
        if (num_gpus, gpus_per_node) != (c.num_gpus, c.gpus_per_node):
            where = f"cluster config {self.source}" if self.source else f"cluster config {c.name!r}"
            fits = SHIPPED_CLUSTERS.get((num_gpus // gpus_per_node, gpus_per_node))
            raise MoeplaceError(
                f"{where} has {c.num_nodes} node(s) x {plural(c.gpus_per_node, 'GPU')}, but the placement "
                f"uses {plural(num_gpus, 'GPU')} with {gpus_per_node} per node"
                + (f" (the shipped {shipped(fits)} describes that cluster)" if fits else "")
            )

    def describe(self) -> dict[str, Any]:
        """The record a placement keeps (objective.cost_model); `estimate` only when the model
        section was estimated from a checkpoint (cost_model_from_record reads cluster and model)."""
        record = {"cluster": self.cluster.__dict__, "model": self.model.__dict__}
        return record if self.estimate is None else {**record, "estimate": estimate_record(self)}


def load_cost_model(cluster_path: str | Path, model_path: str | Path | None = None, cluster_label: str = "",
                    model_label: str = "") -> CostModel:
    """Read a cluster YAML (with an optional `model:` section) and an optional model YAML, or a
    checkpoint directory (or its config.json) whose model section is estimated with the cluster
    YAML's `gpu:` figures (estimate_model).

    Raises MoeplaceError naming the file and the missing or bad field; a file that cannot be read
    as a YAML mapping also by its label, the option or key that named it ("--cluster"; `moeplace
    check`: "cluster"), as "nope.yaml: no such file" does not say which of the two is missing.
    """
    doc = _read_yaml(cluster_path, cluster_label)
    if "cluster" not in doc:
        raise MoeplaceError(f"{cluster_path}: no 'cluster:' section (see configs/cluster/*.yaml)")
    _known(doc, {"cluster", "model", "gpu"}, str(cluster_path))
    cluster = _cluster(doc["cluster"], str(cluster_path))
    if model_path is not None and is_checkpoint(Path(model_path)):
        model_dir = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
        if doc.get("gpu") is None:
            raise MoeplaceError(f"{cluster_path}: no 'gpu:' section, needed to estimate the expert costs from "
                                f"{model_dir / 'config.json'}: add gpu: {{dense_tflops: {{bfloat16: PEAK}}, hbm_GBps: "
                                f"BANDWIDTH}} (as in {shipped(SHIPPED_CLUSTERS[(1, 8)])}), or give a model YAML")
        model, estimate = estimate_model(model_dir, _gpu(doc["gpu"], str(cluster_path)), cluster.num_gpus, model_label)
        return CostModel(cluster, model, str(cluster_path), str(model_dir), estimate)
    if doc.get("gpu") is not None:
        _gpu(doc["gpu"], str(cluster_path))  # checked whether or not this run uses it
    model_doc, model_src = doc.get("model"), str(cluster_path)
    if model_path is not None:
        mdoc = _read_yaml(model_path, model_label)
        if "model" not in mdoc and (hf := sorted(HF_CONFIG_KEYS & set(mdoc))):  # not dozens of "unknown" keys
            raise MoeplaceError(f"{model_path}: a Hugging Face config.json (it has {', '.join(hf[:3])}), not a model "
                                "YAML: a checkpoint's config is read from its directory, or from a file named "
                                "config.json (rename it, or put it in a directory of its own)")
        if "model" in mdoc:
            _known(mdoc, {"model"}, str(model_path))
        model_doc, model_src = mdoc.get("model", mdoc), str(model_path)
    if model_doc is None:
        wanted = model_label or "--model-config"  # an option, or `moeplace check`'s key
        raise MoeplaceError(f"{cluster_path}: no 'model:' section; give {wanted if wanted.startswith('-') else 'a ' + wanted + ': key'} "
                            "(configs/model/*.yaml, or a checkpoint directory)")
    return CostModel(cluster, _model(model_doc, model_src), str(cluster_path), model_src)


def estimate_record(cost: CostModel) -> dict[str, Any] | None:
    """How the model section was estimated from a checkpoint (for a placement or report), else None."""
    return None if cost.estimate is None else {k: v for k, v in cost.estimate.items() if k != "note"}


def estimate_lines(cost: CostModel) -> list[str]:
    """The lines telling the user what was estimated from a checkpoint, and from where ([] for a model YAML)."""
    return [] if cost.estimate is None else cost.estimate["note"].splitlines()


def is_checkpoint(path: Path) -> bool:
    """Whether --model-config names a checkpoint (a directory, or its config.json), not a model YAML."""
    return path.is_dir() or path.name == "config.json"


def checkpoint_dir(model_config: Path | None) -> Path | None:
    """The checkpoint directory --model-config (or a check's model_config) names, None for a file
    (a model YAML, or a config.json, which a caller protects as the input file it is; the folder
    around a lone config.json may be the working directory): an output inside the directory would
    replace or add to the checkpoint's files (options.check_outside)."""
    return model_config if model_config is not None and model_config.is_dir() else None


# keys of a Hugging Face config.json that no model YAML has: such a file given under another name
HF_CONFIG_KEYS = {"model_type", "architectures", "transformers_version", "num_local_experts", "n_routed_experts",
                  "num_experts_per_tok", "intermediate_size", "moe_intermediate_size"}


@dataclass(frozen=True)
class Gpu:
    """A cluster YAML's `gpu:` section: the figures the expert costs are estimated from."""

    name: str
    dense_tflops: dict[str, float]  # peak dense (no sparsity) TFLOPS by compute dtype: bfloat16, float16, float32, float8
    hbm_GBps: float  # HBM bandwidth, GB/s
    efficiency: float | None  # share of the peak an expert's GEMMs reach; None: default_efficiency
    source: str = "the cluster's gpu:"  # where the section is ("CLUSTER.yaml: gpu"), for errors


GPU_DTYPES = ("bfloat16", "float16", "float32", "float8")
_GPU_KEYS = {"name", "dense_tflops", "hbm_GBps", "efficiency"}


def _gpu(d: Any, src: str) -> Gpu:
    src = f"{src}: gpu"
    if not isinstance(d, dict):
        raise MoeplaceError(f"{src}: expected a mapping (dense_tflops, hbm_GBps; name, efficiency optional), "
                            f"got {brief(d)}")
    _known(d, _GPU_KEYS, src)
    peaks = d.get("dense_tflops")
    if not isinstance(peaks, dict) or not peaks:
        raise MoeplaceError(f"{src}: 'dense_tflops' must map a dtype ({', '.join(GPU_DTYPES)}) to its peak "
                            f"dense TFLOPS, got {brief(peaks)}")
    _known(peaks, set(GPU_DTYPES), f"{src}.dense_tflops")
    return Gpu(name=_name(d, src, "the cluster's GPU"),
               dense_tflops={k: _field(peaks, k, f"{src}.dense_tflops", most=MAX_GBPS) for k in peaks},
               hbm_GBps=_field(d, "hbm_GBps", src, least=MIN_GBPS, most=MAX_GBPS),
               efficiency=_field(d, "efficiency", src, default=None, most=1.0), source=src)


# Compute efficiency the shipped model YAMLs assume (their comments), by the size of the expert's
# weight matrices, hidden x FFN width: ~40% of the dense peak for FLAME-MoE's small expert GEMMs
# (1024 x 704) and ~60% for Mixtral's large ones (4096 x 14336).
EFFICIENCY_ANCHORS = ((1024 * 704, 0.40), (4096 * 14336, 0.60))


def default_efficiency(hidden: int, ffn: int) -> float:
    """The share of the peak an expert of hidden x ffn reaches, when the `gpu:` section gives no
    `efficiency`: linear in log(hidden x ffn) between the two anchors the shipped model YAMLs state
    (EFFICIENCY_ANCHORS), held at the nearer anchor outside them (GEMM efficiency grows with size
    and saturates). Not fitted: the anchors are the shipped assumptions, taken as they are."""
    (small, low), (large, high) = EFFICIENCY_ANCHORS
    t = (math.log(hidden * ffn) - math.log(small)) / (math.log(large) - math.log(small))
    return low + (high - low) * min(max(t, 0.0), 1.0)


BATCH_TOKENS_PER_GPU = 1024  # the shipped FLAME, Mixtral (8192 at 8 GPUs) and tiny-moe (4096 at 4) configs


def fp8_quantization(quant: Any) -> tuple[bool, bool, str]:
    """(FP8 weights, FP8 GEMMs, what is not modelled: "" when nothing) of a config.json's
    `quantization_config`, as the engines read its FP8 spellings (method names case-insensitive):

        quant_method fp8 (DeepSeek-V3, Qwen3 -FP8), fbgemm_fp8 (Llama FP8),
        modelopt with quant_algo FP8 (NVIDIA ModelOpt)    FP8 weights, FP8 GEMMs (activations
                                                           quantized on the fly)
        compressed-tensors (llm-compressor), every config group's weights float 8-bit:
            its input_activations float 8-bit too         FP8 weights, FP8 GEMMs
            else (W8A16)                                  FP8 weights, GEMMs at the model's dtype

    Another method (int4 AWQ/GPTQ, MXFP4, ...) or a malformed section is named as not modelled."""
    if quant is None:
        return False, False, ""
    if not isinstance(quant, dict):
        return False, False, f"quantization_config {brief(quant)} (not an object)"
    method = quant.get("quant_method")
    name = method.lower() if isinstance(method, str) else None
    if name in ("fp8", "fbgemm_fp8"):
        return True, True, ""
    algo = quant.get("quant_algo")
    if name == "modelopt" and isinstance(algo, str) and algo.upper() == "FP8":
        return True, True, ""
    if name == "compressed-tensors":
        groups = quant.get("config_groups")
        schemes = list(groups.values()) if isinstance(groups, dict) else []

        def float8(scheme: Any, part: str) -> bool:
            args = scheme.get(part) if isinstance(scheme, dict) else None
            return isinstance(args, dict) and args.get("type") == "float" and args.get("num_bits") == 8

        if schemes and all(float8(g, "weights") for g in schemes):
            return True, all(float8(g, "input_activations") for g in schemes), ""
        return False, False, "quantization compressed-tensors (other than FP8 weights)"
    if method is None:
        return False, False, "quantization_config without quant_method"
    return False, False, f"quantization {brief(method)}"


def estimate_model(model_dir: Path, gpu: Gpu, num_gpus: int, label: str = "") -> tuple[ModelCost, dict[str, Any]]:
    """A model section estimated from a checkpoint's config.json (no torch) and the GPU figures,
    with the record of how (CostModel.estimate: the config read, the keys and figures used, a
    one-line `note` for the user). A routed expert is a SwiGLU MLP of three hidden x ffn matmuls:

        expert_us_per_token = 6 x hidden x ffn FLOP / (peak dense TFLOPS at its dtype x efficiency)
        expert_fixed_us     = 3 x hidden x ffn x weight bytes / HBM bandwidth (its weights, read once)
        batch_tokens        = 1024 x the cluster's GPUs

    Shared experts (DeepSeek, Qwen2-MoE) are left out: every GPU runs them alike, no placement
    changes their time. An FP8 checkpoint (fp8_quantization: quant_method fp8, fbgemm_fp8, modelopt
    FP8, compressed-tensors float 8-bit) has 1-byte weights and its GEMMs at the float8 peak (at
    the dtype's for FP8 weights alone); activations (dispatch, combine) are torch_dtype's.
    `label` (e.g. "--model-config") starts the errors of reading config.json."""
    from moeplace.models.config import check_width, config_size, moe_shape, read_config_json

    config = model_dir / "config.json"
    cfg = read_config_json(model_dir, f"{label} {model_dir}" if label else str(model_dir))
    where, need = f"{config}", "the expert costs of --model-config"
    shape = moe_shape(cfg, where, need)
    ffn_keys = ("moe_intermediate_size", "intermediate_size")
    ffn = config_size(cfg, where, *ffn_keys, needed_for=f"{need}: the expert FFN width")
    ffn_key = next(k for k in ffn_keys if cfg.get(k) is not None)
    check_width(where, ffn_key, ffn)  # a 400-digit width overflows the float arithmetic below
    notes = []
    dtype_key = next((k for k in ("torch_dtype", "dtype") if cfg.get(k) is not None), None)  # null is absent
    raw_dtype = cfg[dtype_key] if dtype_key is not None else None
    dtype = DTYPE_SPELLINGS.get(raw_dtype) if isinstance(raw_dtype, str) else None
    if dtype is None:
        dtype = "bfloat16"
        said = "no torch_dtype" if dtype_key is None else f"{dtype_key} {brief(raw_dtype)}"
        notes.append(f"{said}: bfloat16 assumed")
    act_bytes = DTYPE_BYTES[dtype]
    fp8_weights, fp8_compute, unmodelled = fp8_quantization(cfg.get("quantization_config"))
    compute = "float8" if fp8_compute else dtype
    weight_bytes = 1 if fp8_weights else act_bytes
    if unmodelled:
        notes.append(f"{unmodelled} not modelled: {dtype} weights assumed")
    if compute not in gpu.dense_tflops:
        raise MoeplaceError(f"{gpu.source}: no dense_tflops for {compute} (the compute dtype of {config}): add "
                            f"dense_tflops: {{{compute}: PEAK}}")
    hidden = shape["hidden_size"]
    efficiency = gpu.efficiency if gpu.efficiency is not None else default_efficiency(hidden, ffn)
    peak = gpu.dense_tflops[compute]
    flop = 6 * hidden * ffn  # 3 matmuls x 2 FLOP per multiply-add
    per_token = flop / (peak * efficiency * 1e6)  # TFLOPS = 1e6 FLOP/us
    fixed = 3 * hidden * ffn * weight_bytes / (gpu.hbm_GBps * 1e3)  # GB/s = 1e3 bytes/us
    batch = BATCH_TOKENS_PER_GPU * num_gpus
    for key, value in (("expert_us_per_token", per_token), ("expert_fixed_us", fixed)):
        if not 0 < value <= MAX_TIME_US:
            raise MoeplaceError(f"{config}: estimated {key} {value:g} is out of (0, {MAX_TIME_US:g}] (check the gpu: figures)")
    name = str(cfg.get("model_type") or "model")
    label = f"{model_dir.resolve().name or name} ({name}, estimated)"
    model = ModelCost(name=label, hidden_size=hidden, dispatch_bytes=float(act_bytes), combine_bytes=float(act_bytes),
                      expert_us_per_token=per_token, expert_fixed_us=fixed, batch_tokens=min(batch, MAX_BATCH_TOKENS),
                      num_experts=shape["num_experts"], top_k=shape["top_k"])
    precision = (dtype if not fp8_weights else f"float8 weights, {dtype} activations"
                 + ("" if fp8_compute else " and GEMMs (weights upcast)"))
    note = (f"{label}: hidden {hidden}, {shape['num_experts']} experts top-{shape['top_k']}, expert FFN {ffn} ({ffn_key}), "
            f"{precision}: {per_token:.3g} us per token-expert "
            f"(6 x {hidden} x {ffn} FLOP, SwiGLU, at {efficiency:.0%} of {gpu.name}'s {peak:g} TFLOPS), "
            f"{fixed:.3g} us per active expert (3 x {hidden} x {ffn} x {weight_bytes} B at {gpu.hbm_GBps:g} GB/s), "
            f"batch {batch} tokens ({BATCH_TOKENS_PER_GPU} per GPU)" + "".join(f"; {n}" for n in notes)
            + f"\nestimated from {config}; write a model YAML to refine them (configs/model/*.yaml, docs/cost-model.md)")
    estimate = {"config": str(config), "ffn_key": ffn_key, "ffn": ffn, "dtype": dtype, "compute_dtype": compute,
                "weight_bytes": weight_bytes, "gpu": gpu.name, "peak_tflops": peak, "efficiency": efficiency,
                "efficiency_rule": gpu.efficiency is None, "hbm_GBps": gpu.hbm_GBps,
                "batch_tokens_per_gpu": BATCH_TOKENS_PER_GPU, "notes": notes, "note": note}
    return model, estimate


def cost_model_from_record(record: Any, src: str, model_source: str) -> CostModel:
    """A CostModel from what describe() wrote (a placement's objective.cost_model), checked field
    by field as a config is: a record edited by hand is one line naming the field."""
    if not isinstance(record, dict):
        raise MoeplaceError(f"{src} must be an object (cluster, model), got {brief(record)}")
    c, m = record.get("cluster"), record.get("model")
    cs, ms = f"{src}.cluster", f"{src}.model"
    for d, fields, where in ((c, Cluster.__dataclass_fields__, cs), (m, ModelCost.__dataclass_fields__, ms)):
        _known(d, set(fields), where)
    cluster = Cluster(
        name=str(c.get("name", "the recorded cluster")) if isinstance(c, dict) else "",
        num_nodes=_field(c, "num_nodes", cs, int, most=MAX_GPUS),
        gpus_per_node=_field(c, "gpus_per_node", cs, int, most=MAX_GPUS),
        intra_GBps=_field(c, "intra_GBps", cs, least=MIN_GBPS, most=MAX_GBPS),
        intra_latency_us=_field(c, "intra_latency_us", cs, positive=False),
        inter_GBps=_field(c, "inter_GBps", cs, least=MIN_GBPS, most=MAX_GBPS),
        inter_latency_us=_field(c, "inter_latency_us", cs, positive=False))
    model = ModelCost(
        name=str(m.get("name", "the recorded model")) if isinstance(m, dict) else "",
        hidden_size=_field(m, "hidden_size", ms, int, most=MAX_HIDDEN_SIZE),
        dispatch_bytes=_field(m, "dispatch_bytes", ms, most=MAX_DTYPE_BYTES),
        combine_bytes=_field(m, "combine_bytes", ms, most=MAX_DTYPE_BYTES),
        expert_us_per_token=_field(m, "expert_us_per_token", ms),
        expert_fixed_us=_field(m, "expert_fixed_us", ms, positive=False),
        batch_tokens=_field(m, "batch_tokens", ms, int, default=None, most=MAX_BATCH_TOKENS),
        num_experts=_field(m, "num_experts", ms, int, default=None, most=MAX_EXPERTS),
        top_k=_field(m, "top_k", ms, int, default=None, most=MAX_EXPERTS))
    return CostModel(cluster, model, source=src, model_source=model_source)


@dataclass(frozen=True)
class ModelFacts:
    """What a prediction assumes of the traced model, to check against the trace: where it came
    from (a model config, --hidden-size, --model DIR) and the figures it states (None: not stated)."""

    source: str
    hidden_size: int
    num_experts: int | None = None
    top_k: int | None = None


def model_facts(cost: CostModel) -> ModelFacts:
    m = cost.model
    return ModelFacts(str(cost.model_source), m.hidden_size, m.num_experts, m.top_k)


def model_mismatch(trace: Trace, trace_name: str, facts: ModelFacts) -> str:
    """A one-line warning when `trace` is not of the model `facts` describe, else "": its meta
    records another hidden size, or it has another expert count or top-k than the model config
    states. Never an error: modelling other hardware or a bigger model on a trace is a legitimate
    what-if, but a wrong config (Mixtral's figures on FLAME's routing) silently scales every
    predicted byte and microsecond. What neither side records is not compared."""
    traced = {"hidden_size": trace.meta_hidden_size(), "num_experts": trace.num_experts, "top_k": trace.top_k}
    stated = {"hidden_size": facts.hidden_size, "num_experts": facts.num_experts, "top_k": facts.top_k}
    differ = [key for key in traced if traced[key] is not None and stated[key] is not None and traced[key] != stated[key]]
    if not differ:
        return ""
    said = {"hidden_size": " (trace meta)"}
    return (f"{trace_name} is a trace of a model of "
            + ", ".join(f"{key} {traced[key]}{said.get(key, '')}" for key in differ)
            + f", {facts.source} gives " + ", ".join(f"{key} {stated[key]}" for key in differ)
            + ": predicted bytes and times are those of that model (if that is not the what-if intended, give "
            "the traced model's figures)")


def _read_yaml(path: str | Path, label: str = "") -> dict[str, Any]:
    """A YAML mapping; `label` (the option or key that named the file) starts the errors."""
    try:
        doc = read_yaml(path, MoeplaceError)
    except MoeplaceError as e:
        raise MoeplaceError(f"{label} {e}" if label else str(e)) from None
    if not isinstance(doc, dict):
        raise MoeplaceError(f"{label + ' ' if label else ''}{path}: expected a YAML mapping")
    return doc


_CLUSTER_KEYS = {"name", "nodes", "gpus_per_node", "intra_node", "inter_node"}
_LINK_KEYS = {"bandwidth_GBps", "latency_us"}
_MODEL_KEYS = {"name", "hidden_size", "num_experts", "top_k", "dtype_bytes", "dispatch_dtype_bytes", "combine_dtype_bytes",
               "expert_us_per_token", "expert_fixed_us", "batch_tokens"}


def _known(d: Any, keys: set[str], src: str) -> None:
    """A mistyped optional key would silently fall back to its default: refuse unknown keys."""
    unknown = set(d) - keys if isinstance(d, dict) else set()
    if unknown:
        raise MoeplaceError(f"{src}: unknown key(s) {sorted(map(str, unknown))} (known: {', '.join(sorted(keys))})")


# upper bounds of the figures: far past any hardware or model, far below what overflows a
# predicted time (hidden size x batch x bytes / bandwidth stays finite) or what HiGHS can solve
MAX_TIME_US = 1e12  # latencies and per-expert times (11 days)
MAX_GBPS = 1e12
MIN_GBPS = 1e-6  # 1 KB/s: a byte over a 1e-320 GB/s link takes an infinite time
MAX_DTYPE_BYTES = 64.0
MAX_GPUS = 2**20  # nodes, GPUs per node


def _field(d: Any, key: str, src: str, kind: type = float, positive: bool = True, default: Any = ...,
           most: float = MAX_TIME_US, least: float = 0.0) -> Any:
    """d[key] as `kind`, in [least, most] (and above 0 when `positive`), else one-line MoeplaceError."""
    if not isinstance(d, dict):
        raise MoeplaceError(f"{src}: expected a mapping holding '{key}'")
    if key not in d or d[key] is None:
        if default is not ...:
            return default
        raise MoeplaceError(f"{src}: missing '{key}'")
    raw = d[key]
    # YAML `true` is an int to Python, and int(8.5) would truncate: only real numbers of the kind asked
    # (a string holding a number is one: YAML 1.1 reads `1e3` as a string; not for integers)
    number = yaml_number(raw) if kind is float else None
    if kind is int and isinstance(raw, int) and not isinstance(raw, bool):
        number = raw
    if number is None:
        raise MoeplaceError(f"{src}: '{key}' must be {'an integer' if kind is int else 'a number'}, got {brief(raw)}")
    if not isinstance(raw, int) and not math.isfinite(number):  # nan, inf; a 400-digit int is out of range below
        raise MoeplaceError(f"{src}: '{key}' must be finite, got {brief(raw)}")
    if (number <= 0) if positive else (number < 0):
        raise MoeplaceError(f"{src}: '{key}' must be {'positive' if positive else 'non-negative'}, got {brief(raw)}")
    if not least <= number <= most:
        bound = f"at least {least:g}" if number < least else f"at most {most:{'d' if kind is int else 'g'}}"
        raise MoeplaceError(f"{src}: '{key}' must be {bound}, got {brief(raw)}")
    return kind(number)


def _name(d: dict[str, Any], src: str, default: str) -> str:
    """A section's optional `name`: text (a number is read as its text). Anything else is refused:
    a list or mapping there (a YAML alias of aliases can stand for gigabytes) would be carried into
    every report and --json document that names the cluster or model."""
    name = d.get("name", default)
    if isinstance(name, bool) or not isinstance(name, (str, int, float)):
        raise MoeplaceError(f"{src}: 'name' must be text, got {brief(name)}")
    return str(name)


def _cluster(d: Any, src: str) -> Cluster:
    src = f"{src}: cluster"
    intra, inter = (d.get(k, {}) if isinstance(d, dict) else None for k in ("intra_node", "inter_node"))
    _known(d, _CLUSTER_KEYS, src)
    _known(intra, _LINK_KEYS, f"{src}.intra_node")
    _known(inter, _LINK_KEYS, f"{src}.inter_node")
    num_nodes = _field(d, "nodes", src, int, most=MAX_GPUS)
    multi = num_nodes > 1  # a single node never uses the network: its figures are optional
    return Cluster(
        name=_name(d, src, src),
        num_nodes=num_nodes,
        gpus_per_node=_field(d, "gpus_per_node", src, int, most=MAX_GPUS),
        intra_GBps=_field(intra, "bandwidth_GBps", f"{src}.intra_node", least=MIN_GBPS, most=MAX_GBPS),
        intra_latency_us=_field(intra, "latency_us", f"{src}.intra_node", positive=False),
        inter_GBps=_field(inter, "bandwidth_GBps", f"{src}.inter_node", default=... if multi else 1.0,
                          least=MIN_GBPS, most=MAX_GBPS),
        inter_latency_us=_field(inter, "latency_us", f"{src}.inter_node", positive=False, default=... if multi else 0.0),
    )


def _model(d: Any, src: str) -> ModelCost:
    src = f"{src}: model"
    _known(d, _MODEL_KEYS, src)
    dtype = _field(d, "dtype_bytes", src, default=2.0, most=MAX_DTYPE_BYTES)
    batch = _field(d, "batch_tokens", src, int, default=None, most=MAX_BATCH_TOKENS)
    return ModelCost(
        name=_name(d, src, src),
        hidden_size=_field(d, "hidden_size", src, int, most=MAX_HIDDEN_SIZE),
        dispatch_bytes=_field(d, "dispatch_dtype_bytes", src, default=dtype, most=MAX_DTYPE_BYTES),
        combine_bytes=_field(d, "combine_dtype_bytes", src, default=dtype, most=MAX_DTYPE_BYTES),
        expert_us_per_token=_field(d, "expert_us_per_token", src),
        expert_fixed_us=_field(d, "expert_fixed_us", src, positive=False, default=0.0),
        batch_tokens=batch,
        num_experts=_field(d, "num_experts", src, int, default=None, most=MAX_EXPERTS),
        top_k=_field(d, "top_k", src, int, default=None, most=MAX_EXPERTS),
    )


@dataclass(frozen=True)
class LayerTimes:
    """Predicted time of each MoE layer, microseconds, float [L] each."""

    compute_us: np.ndarray
    dispatch_us: np.ndarray
    combine_us: np.ndarray

    @property
    def total_us(self) -> np.ndarray:
        return self.compute_us + self.dispatch_us + self.combine_us

    def summary(self) -> dict[str, Any]:
        return {
            "moe_time_us": float(self.total_us.sum()),
            "compute_us": float(self.compute_us.sum()),
            "dispatch_us": float(self.dispatch_us.sum()),
            "combine_us": float(self.combine_us.sum()),
            "per_layer_us": [round(float(t), 3) for t in self.total_us],
        }


def alltoall_us(counts: np.ndarray, bytes_per_token: float, cost: CostModel, links: np.ndarray | None = None) -> float | np.ndarray:
    """Time of one Alltoall phase: the slowest GPU's max(send, receive). counts float [G, G] ->
    float; a stack of them, float [M, G, G] -> float [M]."""
    c = cost.cluster
    links = cost.link_class() if links is None else links
    b = counts * bytes_per_token
    intra, inter = np.where(links == INTRA, b, 0.0), np.where(links == INTER, b, 0.0)

    def side(axis: int) -> np.ndarray:
        bi, bx = intra.sum(axis), inter.sum(axis)
        lat = np.maximum(np.where(bi > 0, c.intra_latency_us, 0.0), np.where(bx > 0, c.inter_latency_us, 0.0))
        return np.maximum(bi / (c.intra_GBps * 1e3), bx / (c.inter_GBps * 1e3)) + lat  # GB/s = 1e3 bytes/us

    slowest = np.maximum(side(-1), side(-2)).max(-1)  # sends, receives
    return float(slowest) if counts.ndim == 2 else slowest


def layer_traffic(home: np.ndarray, gpus: np.ndarray, num_gpus: int, group: np.ndarray | None = None,
                  num_groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token hidden states moved by one layer's dispatch and combine, float [G, G] each.

    home int [T] current GPU of each token; gpus int [T, k] GPUs serving its k experts (top-1 first).
    With group int [T] (values < num_groups) the counts are kept per group of tokens, float
    [num_groups, G, G] each, in the same pass.
    """
    new_home = gpus[:, 0]
    flat = num_gpus * num_gpus
    s, go = remote_mask(gpus, home)
    _, back = remote_mask(gpus, new_home)
    base = 0 if group is None else group[:, None] * flat
    dispatch = np.bincount((base + home[:, None] * num_gpus + s)[go], minlength=flat * num_groups)
    combine = np.bincount((base + s * num_gpus + new_home[:, None])[back], minlength=flat * num_groups)
    shape = (num_gpus, num_gpus) if group is None else (num_groups, num_gpus, num_gpus)
    return dispatch.reshape(shape).astype(np.float64), combine.reshape(shape).astype(np.float64)


def active_probability(share: np.ndarray, num_tokens: int, scale: float) -> np.ndarray:
    """Probability that an expert (or one copy of it) taking share float [...] of `num_tokens`
    traced tokens is active (gets at least one token) in the batch they are scaled to by `scale`
    (token_scale), float [...]: 1 - (1 - share)^B for a batch of B independent tokens.

    Scale 1: the batch is the traced tokens themselves, whose active experts are known (share > 0).
    Exactly 1.0 once share x B exceeds about 37, so a trace whose experts are all busy keeps the
    plain count of active experts, bit for bit; exactly 0.0 at share 0."""
    share = np.clip(share, 0.0, 1.0)
    if scale == 1:
        return (share > 0).astype(np.float64)
    with np.errstate(divide="ignore"):  # share 1: log1p(-1) = -inf, probability 1
        return -np.expm1(num_tokens * scale * np.log1p(-share))


def layer_time(cost: CostModel, home: np.ndarray, gpus: np.ndarray, experts: np.ndarray, scale: float,
               links: np.ndarray | None = None) -> tuple[float, float, float]:
    """(compute, dispatch, combine) microseconds of one layer; gpus/experts int [T, k]."""
    g_count = cost.cluster.num_gpus
    m = cost.model
    num_tokens = len(gpus)
    load = np.bincount(gpus.ravel(), minlength=g_count) * scale
    # the per-expert term counts the (GPU, expert) pairs expected active in the scaled batch, from
    # each pair's share of the traced tokens (a token selects an expert at most once)
    pairs, served = np.unique(gpus.ravel() * (experts.max() + 1) + experts.ravel(), return_counts=True)
    active = np.bincount(pairs // (experts.max() + 1), minlength=g_count,
                         weights=active_probability(served / num_tokens, num_tokens, scale))
    compute = float((m.expert_fixed_us * active + m.expert_us_per_token * load).max())
    dispatch, combine = layer_traffic(home, gpus, g_count)
    bytes_d, bytes_c = m.hidden_size * m.dispatch_bytes, m.hidden_size * m.combine_bytes
    return (compute, float(alltoall_us(dispatch * scale, bytes_d, cost, links)),
            float(alltoall_us(combine * scale, bytes_c, cost, links)))


def token_scale(cost: CostModel, num_tokens: int, stands_for: int | None = None) -> float:
    """Factor from `num_tokens` traced tokens to the batch they predict: `batch_tokens` of the
    model config, else `stands_for` (a sample of a larger set, e.g. a fold of the training
    tokens, predicts that set's batch), else the tokens themselves (1)."""
    return (cost.model.batch_tokens or stands_for or num_tokens) / num_tokens


def predict(cost: CostModel, placement: Placement, trace: Trace) -> LayerTimes:
    """Predicted per-layer MoE time of `placement` serving `trace` (replicas by metrics.token_gpus)."""
    cost.check(placement.num_gpus, placement.gpus_per_node)
    placement.check_fits(trace.num_layers, trace.num_experts)
    gpus = token_gpus(placement, trace)
    return predict_gpus(cost, gpus, trace.topk_ids)


def predict_gpus(cost: CostModel, gpus: np.ndarray, experts: np.ndarray) -> LayerTimes:
    """As `predict`, from the serving GPU of each token-expert choice, int [T, L, k] each."""
    num_tokens, num_layers, _ = gpus.shape
    scale, links = token_scale(cost, num_tokens), cost.link_class()
    home = initial_homes(num_tokens, cost.cluster.num_gpus)
    out = np.zeros((3, num_layers))
    for layer in range(num_layers):
        out[:, layer] = layer_time(cost, home, gpus[:, layer], experts[:, layer], scale, links)
        home = gpus[:, layer, 0]
    return LayerTimes(*out)


def _columns() -> tuple[list[Any], list[tuple[str, str]]]:
    from moeplace.eval.report import Column
    return ([Column("moe_time_us", "MoE time us", ".1f"), Column("compute_us", "compute us", ".1f"),
             Column("dispatch_us", "dispatch us", ".1f"), Column("combine_us", "combine us", ".1f")],
            [("moe_time_per_layer", "predicted MoE-layer time (us), per layer")])


COST_COLUMNS, COST_PER_LAYER = _columns()


def cost_metric(cost: CostModel) -> Callable[[Placement, Trace], dict[str, Any]]:
    """An eval report metric: the predicted MoE time of a layout under `cost` (`moeplace eval --cluster`)."""

    def metric(placement: Placement, trace: Trace) -> dict[str, Any]:
        times = predict(cost, placement, trace)
        return {**times.summary(), "moe_time_per_layer": times.total_us.tolist()}

    return metric
