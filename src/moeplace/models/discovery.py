"""Find the MoE layers of a transformers model from its module structure, for every family.

One mechanism, no per-family tables: a *sparse MoE block* is a module with two children,

    router   a module whose 2-D `weight` is [num_experts, hidden] (named `gate` or `router` in
             transformers 5.x); its forward returns (router_logits [T, E], topk_weights [T, k],
             topk_ids [T, k]) with the family's own routing (softmax/sigmoid, groups, biases,
             renormalisation, scaling) already applied
    experts  the routed experts: either fused 3-D parameters with the expert dim first
             (`gate_up_proj`, `down_proj`, and `*_bias` for GPT-OSS), or an nn.ModuleList of
             per-expert MLPs (older / remote-code models)

The block's position in the decoder-layer list gives `layer_index`; decoder layers whose MLP is
dense (DeepSeek `first_k_dense_replace`, Qwen `mlp_only_layers` / `decoder_sparse_step`) have no
such block and are skipped, so `moe_index` (the trace's layer axis) and `layer_index` differ.

In-memory layout in transformers 5.23 (expert dim 0 everywhere):

    family        router (path .mlp.X)                  experts params
    mixtral       gate.weight [E, H]                    gate_up_proj [E, 2I, H], down_proj [E, H, I]
    qwen2_moe     gate.weight                           same; + shared_expert, shared_expert_gate
    qwen3_moe     gate.weight                           same
    olmoe         gate.weight                           same
    deepseek_v2   gate.weight                           same; + shared_experts
    deepseek_v3   gate.weight, gate.e_score_correction_bias [E] (buffer)   same; + shared_experts
    gpt_oss       router.weight, router.bias [E]        gate_up_proj [E, H, 2I] (gate/up interleaved
                                                        on the last dim), gate_up_proj_bias [E, 2I],
                                                        down_proj [E, I, H], down_proj_bias [E, H]

The safetensors files do not mirror this module tree (`save_pretrained` converts back to each
family's hub format): their layout is read, torch-free, by `moeplace.models.checkpoint`.

Renumbering experts must permute, with the same permutation, the router rows (`weight`), every
per-expert router vector (`bias`, `e_score_correction_bias`) and the experts; with grouped
routing (`MoELayer.num_groups` > 1, DeepSeek) expert e belongs to group e // (E / num_groups), so
a renumbering that moves experts across groups changes which experts a token can reach.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moeplace.errors import MoeplaceError

_ROUTER_NAMES = ("gate", "router")


@dataclass
class MoELayer:
    """One sparse MoE block of a model, in trace order."""

    moe_index: int  # 0..L-1, the trace's layer axis
    layer_index: int  # decoder layer index in the model (dense layers skipped)
    path: str  # dotted module path of the sparse MoE block, e.g. "model.layers.3.mlp"
    block: nn.Module  # the sparse MoE block
    router: nn.Module  # forward -> (router_logits [T, E], topk_weights [T, k], topk_ids [T, k])
    experts: nn.Module  # the routed experts container
    num_experts: int
    top_k: int
    router_name: str = "gate"  # attribute of `block` holding the router ("gate" or "router")
    experts_name: str = "experts"  # attribute of `block` holding the experts
    # names (relative to `router`) of its parameters/buffers whose dim 0 is the expert dim
    router_expert_params: tuple[str, ...] = ()
    # fused experts: names (relative to `experts`) of parameters whose dim 0 is the expert dim;
    # empty for an nn.ModuleList of per-expert modules (then expert e is `experts[e]`)
    expert_params: tuple[str, ...] = ()
    fused: bool = True
    shared_experts: tuple[str, ...] = ()  # attribute names of always-on shared experts in `block`
    num_groups: int = 1  # >1: grouped routing (DeepSeek); groups are contiguous expert-id ranges

    @property
    def router_path(self) -> str:
        return f"{self.path}.{self.router_name}"

    @property
    def experts_path(self) -> str:
        return f"{self.path}.{self.experts_name}"


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """The sparse MoE blocks of `model`, ordered by decoder layer.

    Raises MoeplaceError naming what was not found (no router / experts, or blocks that are not
    inside a numbered decoder-layer list).
    """
    layers: list[MoELayer] = []
    taken: set[str] = set()
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in taken):
            continue  # a block's own sub-modules are not further blocks
        found = _match_block(module)
        if found is None:
            continue
        router_name, experts_name, num_experts = found
        taken.add(path)
        layers.append(_describe(path, module, router_name, experts_name, num_experts, model))
    if not layers:
        raise MoeplaceError(
            f"{type(model).__name__}: no sparse MoE block found (looked for a module with a router "
            f"child whose weight is [num_experts, hidden] and an experts child with "
            f"[num_experts, ...] parameters or a ModuleList of experts)"
        )
    layers.sort(key=lambda m: m.layer_index)
    for i, layer in enumerate(layers):
        layer.moe_index = i
    if len({m.layer_index for m in layers}) != len(layers):
        raise MoeplaceError(f"{type(model).__name__}: more than one MoE block per decoder layer is not supported")
    return layers


def num_decoder_layers(model: nn.Module) -> int:
    """Number of decoder layers (dense and MoE) from the model config."""
    config = getattr(model, "config", None)
    n = getattr(getattr(config, "get_text_config", lambda: config)(), "num_hidden_layers", None)
    if n is None:
        raise MoeplaceError(f"{type(model).__name__}: config has no num_hidden_layers")
    return int(n)


def _experts_count(experts: nn.Module) -> int | None:
    """Expert count of an experts container: fused 3-D params or a ModuleList; None otherwise."""
    if isinstance(experts, nn.ModuleList):
        return len(experts) or None
    fused = [p for _, p in experts.named_parameters(recurse=False) if p.dim() == 3]
    if fused and len({p.shape[0] for p in fused}) == 1:
        return int(fused[0].shape[0])
    return None


def _match_block(module: nn.Module) -> tuple[str, str, int] | None:
    """(router attribute, experts attribute, num_experts) when `module` is a sparse MoE block."""
    children = dict(module.named_children())
    experts_name = next(
        (n for n, c in children.items() if "expert" in n and not n.startswith("shared") and _experts_count(c)), None
    )
    if experts_name is None:
        return None
    num_experts = _experts_count(children[experts_name])
    for name in (*_ROUTER_NAMES, *children):
        child = children.get(name)
        if child is None or name == experts_name:
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() == 2 and weight.shape[0] == num_experts:
            return name, experts_name, int(num_experts)
    return None


def _decoder_layer_index(path: str, model: nn.Module) -> int:
    """Index in the nearest enclosing ModuleList: 'model.layers.3.mlp' -> 3."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit() and isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
            return int(parts[i])
    raise MoeplaceError(f"MoE block {path!r} is not inside a numbered list of decoder layers")


def _describe(path: str, block: nn.Module, router_name: str, experts_name: str, num_experts: int,
              model: nn.Module) -> MoELayer:
    router = getattr(block, router_name)
    experts = getattr(block, experts_name)
    top_k = getattr(router, "top_k", None) or getattr(block, "top_k", None) \
        or getattr(getattr(model, "config", None), "num_experts_per_tok", None)
    if not top_k:
        raise MoeplaceError(f"{path}: cannot tell top-k (no top_k on router/block, no num_experts_per_tok in config)")
    router_params = tuple(
        n for n, t in [*router.named_parameters(recurse=False), *router.named_buffers(recurse=False)]
        if t.dim() >= 1 and t.shape[0] == num_experts
    )
    fused = not isinstance(experts, nn.ModuleList)
    expert_params = tuple(
        n for n, p in experts.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[0] == num_experts
    ) if fused else ()
    shared = tuple(n for n in dict(block.named_children()) if n.startswith("shared_expert"))
    grouped = getattr(router, "num_group", None) or 1
    if getattr(router, "topk_method", "group_limited_greedy") == "greedy":  # DeepSeek-V2 plain top-k
        grouped = 1
    return MoELayer(
        moe_index=-1,
        layer_index=_decoder_layer_index(path, model),
        path=path,
        block=block,
        router=router,
        experts=experts,
        num_experts=num_experts,
        top_k=int(top_k),
        router_name=router_name,
        experts_name=experts_name,
        router_expert_params=router_params,
        expert_params=expert_params,
        fused=fused,
        shared_experts=shared,
        num_groups=int(grouped),
    )

