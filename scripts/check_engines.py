"""Run moeplace's engine exports and its EPLB through the engines' own code (not a re-reading of it).

Checked: SGLang 0.5.23, vLLM 0.33.0, vllm-ascend 0.23.0.post1. Nothing is installed: the wheels are
unpacked under /tmp and only the modules under test are loaded from them, with the stubs listed
below. Never pip install sglang or vllm next to moeplace (they pull a CUDA torch).

    pip download sglang==0.5.23 --no-deps -d /tmp/sgl
    unzip -q /tmp/sgl/sglang-0.5.23-*.whl 'sglang/srt/eplb/*' 'sglang/srt/models/*' 'sglang/srt/arg_groups/*' -d /tmp/sglx
    pip download vllm==0.33.0 --no-deps -d /tmp/vllmdl                      # 336 MB, optional
    unzip -q /tmp/vllmdl/vllm-0.33.0-*.whl 'vllm/distributed/eplb/*' -d /tmp/vllmx
    # optional: vllm-ascend is an sdist whose metadata step fails off-Ascend, so pip download
    # exits 1; --no-clean leaves it unpacked under /tmp/pip-download-*/
    pip download vllm-ascend==0.23.0.post1 --no-deps --no-build-isolation --no-clean -d /tmp/ascdl
    mkdir -p /tmp/ascx && cp -r /tmp/pip-download-*/vllm-ascend_*/vllm_ascend /tmp/ascx/
    nice python scripts/check_engines.py /tmp/sglx --vllm /tmp/vllmx --vllm-ascend /tmp/ascx

1. SGLang `--init-expert-location`: placements solved by `moeplace solve` (traffic, 8 GPUs in 2
   nodes; latency with 16 redundant experts, 16 GPUs in 2 nodes) are exported `--to sglang` (also
   with 3 leading dense layers) and loaded by SGLang's `compute_initial_expert_location_metadata`
   for every EP rank; the per-rank expert lists, `logical_to_all_physical_map` and the static
   dispatch table must say what the placement says, and the trace's real top-k ids, routed by
   `topk_ids_logical_to_physical` (static and dynamic), must land on their experts. SGLang's own
   EPLB placement (`init_by_eplb` on the FLAME loads) is read back with `moeplace export --from
   sglang`; its `stat` load dump is read with `moeplace import sglang`. SGLang's startup rule for --ep-dispatch-algorithm (arg_groups/parallel_hook.py) is
   run for each --moe-a2a-backend.
2. DeepSeek EPLB: SGLang's copy of deepseek-ai/EPLB (eplb_algorithms/deepseek.py) and vLLM's
   (policy/default.py) against moeplace.solve.eplb on the Mixtral-8x7B loads (the Solver II
   load-only grid: 4 and 8 GPUs, 0 and 8 redundant) and the FLAME per-layer loads.
3. vLLM: the `--to vllm` arrays against `compute_logical_maps` (what `EplbState.update_mapping`
   stores); the `--to vllm-ascend` file through vllm-ascend's `init_eplb_config`.

Stubs (nothing else is replaced):
- SGLang: the packages `sglang`, `sglang.srt`, `sglang.srt.eplb` are empty modules pointing at the
  unpacked tree (their __init__ pulls the whole server); `sglang.srt.runtime_context`
  (server-args accessors: get_exec/get_parallel/get_device/get_resources, needs msgspec) returns
  the settings each check sets (EP size, nodes, redundant experts, a2a backend, dispatch
  algorithm, the map file; device cpu); `sglang.srt.elastic_ep.elastic_ep.elastic_expanded_world_enabled` -> False;
  `ModelConfigForExpertLocation.from_model_config` returns (num_layers, num_logical_experts,
  num_groups) directly instead of resolving the HF architecture (DeepSeek-V2/V3's
  `get_model_config_for_expert_location` returns (num_hidden_layers, n_routed_experts, n_group)).
- SGLang's `_convert_global_physical_count_to_logical_count` (what the `stat` recorder dumps) is
  taken out of eplb/expert_distribution.py with `ast`; the dump dict's keys are written as
  `_StatAccumulator.dump` writes them.
- SGLang's `handle_eplb_and_dispatch` is taken out of arg_groups/parallel_hook.py with `ast`, its
  server-args views (`resolving_view`, `resolved_view`, `declare_resolution`) replaced by a
  plain namespace.
- vLLM: `compute_logical_maps`, `EplbState.build_initial_global_physical_to_logical_map` and the
  MAX_EXPERT_REDUNDANCY constant are taken out of eplb_state.py with `ast` and run alone (the
  module imports vLLM's distributed runtime); policy/default.py is imported as is.
- vllm-ascend: `vllm.logger.logger` (a logging logger), `determine_expert_map` (unused for a file
  map), and `torch.Tensor.npu` (identity: runs on CPU).

Prints figures and PASS/FAIL lines; exits 1 if any check fails. Not imported by the tests.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FLAME = ROOT / "traces" / "flame-moe-290m-decoder.npz"
FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {what}", flush=True)
    if not ok:
        FAILED.append(what)


def moeplace(*args: str) -> None:
    """The moeplace CLI, as a user runs it."""
    r = subprocess.run([sys.executable, "-m", "moeplace", *args], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["(no message)"])[-1]
        sys.exit(f"check_engines: error: moeplace {' '.join(args)} failed: {last}")


# ---------------------------------------------------------------- loading upstream modules


def _package(name: str, path: Path | None) -> types.ModuleType:
    """An empty package module (its __init__ not run) whose submodules load from `path`."""
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)] if path else []
    sys.modules[name] = mod
    return mod


def _load(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class SGLang:
    """SGLang's expert-location code with its server settings stubbed (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        for name in ("sglang", "sglang.srt", "sglang.srt.eplb"):
            _package(name, root / name.replace(".", "/"))
        self.moe = types.SimpleNamespace(init_expert_location="trivial", ep_num_redundant_experts=0,
                                         ep_dispatch_algorithm="static", moe_a2a_backend="none",
                                         ep_join_mode="none", eplb_algorithm="auto")
        self.parallel = types.SimpleNamespace(ep_size=1, nnodes=1, tp_size=1, elastic_ep_initial_size=None,
                                              ep_join_rank_offset=0)
        ctx = types.ModuleType("sglang.srt.runtime_context")
        ctx.get_exec = lambda: types.SimpleNamespace(moe=self.moe)  # type: ignore[attr-defined]
        ctx.get_parallel = lambda: self.parallel  # type: ignore[attr-defined]
        ctx.get_device = lambda: types.SimpleNamespace(device="cpu")  # type: ignore[attr-defined]
        self.resources = types.SimpleNamespace(expert_location_metadata=None)
        ctx.get_resources = lambda: self.resources  # type: ignore[attr-defined]
        sys.modules[ctx.__name__] = ctx
        _package("sglang.srt.elastic_ep", None)
        elastic = types.ModuleType("sglang.srt.elastic_ep.elastic_ep")
        elastic.elastic_expanded_world_enabled = lambda: False  # type: ignore[attr-defined]
        sys.modules[elastic.__name__] = elastic
        eplb_dir = root / "sglang" / "srt" / "eplb"
        self.algorithms = _load("sglang.srt.eplb.eplb_algorithms", eplb_dir / "eplb_algorithms" / "__init__.py")
        self.deepseek = sys.modules["sglang.srt.eplb.eplb_algorithms.deepseek"]
        self.location = _load("sglang.srt.eplb.expert_location", eplb_dir / "expert_location.py")
        self.dispatch = _load("sglang.srt.eplb.expert_location_dispatch", eplb_dir / "expert_location_dispatch.py")
        self.model: Any = None
        self.location.ModelConfigForExpertLocation.from_model_config = staticmethod(lambda _cfg: self.model)

    def metadata(self, init_expert_location: str, num_layers: int, num_experts: int, ep_size: int, nnodes: int,
                 redundant: int, rank: int, a2a: str = "none", num_groups: int | None = None,
                 dispatch: str | None = "static") -> Any:
        """What SGLang builds on EP rank `rank` from --init-expert-location (the startup path).

        dispatch None skips the static dispatch table (init_by_eplb asks torch.distributed for the rank)."""
        self.model = self.location.ModelConfigForExpertLocation(num_layers, num_experts, num_groups)
        self.moe.init_expert_location, self.moe.ep_num_redundant_experts = init_expert_location, redundant
        self.moe.moe_a2a_backend, self.moe.ep_dispatch_algorithm = a2a, dispatch
        self.parallel.ep_size, self.parallel.nnodes, self.parallel.tp_size = ep_size, nnodes, ep_size
        return self.location.compute_initial_expert_location_metadata(None, rank)


def ast_functions(path: Path, names: set[str], constants: set[str]) -> dict[str, Any]:
    """Module-level functions, methods and constant assignments named in `names` / `constants`,
    compiled alone (their module's imports are not run) with torch in scope."""
    import torch

    tree = ast.parse(path.read_text())
    ns: dict[str, Any] = {"torch": torch, "__name__": "upstream"}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            node.decorator_list = []
            exec(compile(ast.Module([node], []), str(path), "exec"), ns)
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in constants for t in node.targets):
            exec(compile(ast.Module([node], []), str(path), "exec"), ns)
    missing = (names | constants) - ns.keys()
    if missing:
        sys.exit(f"check_engines: error: {path} no longer defines {sorted(missing)}")
    return ns


# ---------------------------------------------------------------- 1. SGLang


def check_sglang_map(sgl: SGLang, path: Path, placement: Any, moe_layers: list[int], num_hidden_layers: int,
                     label: str) -> None:
    """Load `path` on every EP rank as SGLang does and compare with the placement."""
    import torch

    G, E, P = placement.num_gpus, placement.num_experts, placement.num_experts + placement.num_replicas
    k = P // G
    # SGLang 0.5.23 takes `static` dispatch only with an all-to-all backend (sglang_server_args): without
    # one every rank keeps all copies of an expert (`dynamic`); with one, the nearest copy and a table
    for a2a, algorithm in (("none", "dynamic"), ("deepep", "static")):
        ok, local, same_node, remote = True, 0, 0, 0
        for rank in range(G):
            md = sgl.metadata(str(path), num_hidden_layers, E, G, placement.num_nodes, placement.num_replicas, rank,
                              a2a, dispatch=algorithm)
            p2l = md.physical_to_logical_map_cpu.numpy()
            l2all = md.logical_to_all_physical_map_cpu.numpy()
            table = md.logical_to_rank_dispatch_physical_map
            for i, layer in enumerate(moe_layers):
                holders = placement.holders(i)
                ok &= p2l[layer, rank * k:(rank + 1) * k].tolist() == placement.experts_on_gpu(i, rank)
                for e in range(E):
                    copies = [int(s) for s in l2all[layer, e] if s >= 0]
                    if a2a == "none" or len(holders[e]) == 1:
                        ok &= sorted(s // k for s in copies) == sorted(holders[e])
                    else:  # the nearest copy only: the rank's own slot(s) of e, else copies on holders
                        own = [s for s in range(rank * k, (rank + 1) * k) if p2l[layer, s] == e]
                        ok &= copies == own if own else (len(copies) >= 1 and all(s // k in holders[e] for s in copies))
                    if table is None:
                        continue
                    gpu = int(table[layer, e]) // k
                    ok &= gpu in holders[e] and (rank not in holders[e] or gpu == rank)
                    if gpu == rank:
                        local += 1
                    elif gpu // placement.gpus_per_node == rank // placement.gpus_per_node:
                        same_node += 1
                    else:
                        remote += 1
        what = ("static table: a copy on a holder, the rank's own when it has one; "
                f"own/same-node/other-node picks over all ranks {local}/{same_node}/{remote}") if algorithm == "static" \
            else "every copy kept"
        check(ok, f"sglang {label} a2a={a2a} ({algorithm}), all {G} ranks: slot rows = experts_on_gpu, "
                  f"logical_to_all_physical_map GPUs = holders; {what}")
    assert md is not None
    shape_ok = tuple(md.physical_to_logical_map.shape) == (num_hidden_layers, P) and md.num_local_physical_experts == k
    check(shape_ok, f"sglang {label}: accepted, physical_to_logical_map {tuple(md.physical_to_logical_map.shape)}, "
                    f"{md.num_local_physical_experts} slots per rank, {P - E} redundant")
    dense = [layer for layer in range(num_hidden_layers) if layer not in moe_layers]
    if dense:
        trivial = sgl.metadata("trivial", num_hidden_layers, E, G, placement.num_nodes, placement.num_replicas, 0)
        same = torch.equal(md.physical_to_logical_map_cpu[dense], trivial.physical_to_logical_map_cpu[dense])
        check(same, f"sglang {label}: dense layers {dense} carry SGLang's own trivial rows (init_trivial)")


def check_token_dispatch(sgl: SGLang, path: Path, placement: Any, topk_ids: np.ndarray, label: str) -> None:
    """Route the trace's real top-k ids through SGLang's topk_ids_logical_to_physical (static with an
    all-to-all backend, dynamic without one) and check every id lands on a slot of that expert."""
    import torch

    G, E, k = placement.num_gpus, placement.num_experts, (placement.num_experts + placement.num_replicas) // placement.num_gpus
    for algorithm, a2a in (("static", "deepep"), ("dynamic", "none")):
        ok, local, spread = True, 0, []
        for rank in (0, G - 1):
            md = sgl.metadata(str(path), placement.num_layers, E, G, placement.num_nodes, placement.num_replicas, rank,
                              a2a, dispatch=algorithm)
            sgl.resources.expert_location_metadata = md
            p2l = md.physical_to_logical_map_cpu
            for layer in range(placement.num_layers):
                info = sgl.dispatch.ExpertLocationDispatchInfo.init_new(layer)
                logical = torch.from_numpy(topk_ids[:, layer, :])
                physical = sgl.dispatch.topk_ids_logical_to_physical(logical, info)
                ok &= torch.equal(p2l[layer][physical], logical)
                gpus = (physical // k).numpy()
                holders = placement.holders(layer)
                ok &= all(int(g) in holders[int(e)] for g, e in zip(gpus.ravel(), logical.numpy().ravel()))
                local += int((gpus == rank).sum())
                for e in range(E):
                    if len(holders[e]) > 1:
                        spread.append(len(set(physical[logical == e].tolist())))
        used = f"; replicated experts use {np.mean(spread):.2f} copies on average" if spread else ""
        check(ok, f"sglang {label} {algorithm} dispatch (a2a {a2a}, ranks 0 and {G - 1}): all {2 * topk_ids.size} "
                  f"real top-k ids land on a slot of their expert on a holder GPU{used}")
    sgl.resources.expert_location_metadata = None


def sglang_server_args(root: Path) -> None:
    """SGLang's startup rule for --ep-dispatch-algorithm (arg_groups/parallel_hook.py), run alone."""
    hook_file = root / "sglang" / "srt" / "arg_groups" / "parallel_hook.py"
    if not hook_file.is_file():
        print(f"note: {hook_file} not unpacked: --ep-dispatch-algorithm rule not checked")
        return
    ns = ast_functions(hook_file, {"handle_eplb_and_dispatch"}, set())
    ns["logger"] = logging.getLogger("sglang")
    ns["resolving_view"] = ns["resolved_view"] = lambda args: args
    ns["declare_resolution"] = lambda args, _source, **fields: args.__dict__.update(fields)

    def resolve(a2a: str, dispatch: str | None) -> str:
        args = types.SimpleNamespace(enable_eplb=False, expert_distribution_recorder_mode=None, moe_a2a_backend=a2a,
                                     init_expert_location="map.json", ep_dispatch_algorithm=dispatch, ep_join_mode="none")
        try:
            ns["handle_eplb_and_dispatch"](args)
        except ValueError:
            return "refused"
        return str(args.ep_dispatch_algorithm)

    got = {(a2a, d): resolve(a2a, d) for a2a in ("none", "deepep") for d in (None, "static", "dynamic")}
    print("  --init-expert-location FILE: (--moe-a2a-backend, --ep-dispatch-algorithm) -> "
          + ", ".join(f"({a}, {d or 'unset'}) -> {r}" for (a, d), r in got.items()))
    check(got[("none", "static")] == "refused" and got[("none", None)] == "dynamic" and got[("deepep", None)] == "static",
          "sglang startup: without an all-to-all backend `static` is refused and an unset algorithm becomes `dynamic`; "
          "with one it becomes `static`")


def sglang_checks(sgl: SGLang, work: Path, time_limit: float) -> None:
    from moeplace.export.sglang import read_sglang
    from moeplace.placement import load_placement
    from moeplace.trace.format import load_trace

    print("\n== 1. SGLang --init-expert-location")
    traffic, latency = work / "traffic.json", work / "latency_r16.json"
    moeplace("solve", str(FLAME), "--gpus", "8", "--gpus-per-node", "4", "--time-limit", str(time_limit), "-o", str(traffic))
    moeplace("solve", str(FLAME), "--gpus", "16", "--gpus-per-node", "8", "--objective", "latency",
             "--cluster", str(ROOT / "configs/cluster/h100-2x8-ib.yaml"),
             "--model-config", str(ROOT / "configs/model/flame-moe-290m.yaml"),
             "--redundant-experts", "16", "--time-limit", str(time_limit), "-o", str(latency))
    for src in (traffic, latency):
        p = load_placement(src)
        L = p.num_layers
        print(f"{src.name}: {L} layers x {p.num_experts} experts, {p.num_gpus} GPUs ({p.gpus_per_node}/node), "
              f"{p.num_replicas} replicas per layer")
        out = work / f"{src.stem}_sglang.json"
        moeplace("export", str(src), "--to", "sglang", "-o", str(out))
        check(list(json.loads(out.read_text())) == ["physical_to_logical_map"], f"{out.name}: the only key is physical_to_logical_map")
        check_sglang_map(sgl, out, p, list(range(L)), L, src.stem)
        check_token_dispatch(sgl, out, p, load_trace(FLAME).topk_ids, src.stem)
        # DeepSeek-style model: 3 leading dense decoder layers, then the MoE layers, one more dense at the end
        dense_out = work / f"{src.stem}_sglang_dense.json"
        moe_layers = list(range(3, 3 + L))
        moeplace("export", str(src), "--to", "sglang", "--moe-layers", f"3-{2 + L}", "--num-hidden-layers", str(L + 4),
                 "-o", str(dense_out))
        check_sglang_map(sgl, dense_out, p, moe_layers, L + 4, f"{src.stem} dense 0-2,{L + 3}")
    # SGLang accepts a map with too few rows for the model: nothing checks the row count
    p = load_placement(traffic)
    short = sgl.metadata(str(work / "traffic_sglang.json"), p.num_layers + 3, p.num_experts, p.num_gpus, p.num_nodes, 0, 0)
    print(f"note: SGLang also accepts {p.num_layers} rows for a {p.num_layers + 3}-layer model "
          f"(metadata.num_layers = {short.num_layers}): rows are indexed by decoder layer id, so give export "
          "--model/--trace/--moe-layers when a model has dense layers")

    print("\n-- SGLang's own EPLB (init_by_eplb on the FLAME loads) read back with `moeplace export --from sglang`")
    loads = load_trace(FLAME).expert_loads()
    for groups, label in ((None, "global"), (8, "hierarchical")):
        src = work / f"sglang_eplb_{label}.json"
        src.write_text(json.dumps({"logical_count": loads.tolist()}))
        md = sgl.metadata(str(src), loads.shape[0], loads.shape[1], 8, 2, 8, 0, num_groups=groups, dispatch=None)
        p2l = md.physical_to_logical_map_cpu.numpy()
        mapped = work / f"sglang_eplb_{label}_map.json"
        mapped.write_text(json.dumps({"physical_to_logical_map": p2l.tolist()}))
        back = work / f"sglang_eplb_{label}_placement.json"
        moeplace("export", "--from", "sglang", str(mapped), "--gpus", "8", "--gpus-per-node", "4", "-o", str(back))
        q = read_sglang(mapped, 8, 4)
        l2all = md.logical_to_all_physical_map_cpu.numpy()
        dup = sum(len(s) - len(set(s)) for s in (
            [int(x) // 9 for x in l2all[layer, e] if x >= 0] for layer in range(q.num_layers) for e in range(q.num_experts)))
        ok = all(sorted({int(x) // 9 for x in l2all[layer, e] if x >= 0}) == sorted(q.holders(layer)[e])
                 for layer in range(q.num_layers) for e in range(q.num_experts))
        check(ok, f"SGLang EPLB ({label}, 8 GPUs, 2 nodes, 8 redundant) -> --from sglang: holders = GPUs of SGLang's "
                  f"logical_to_all_physical_map ({dup} second copies on one GPU counted once)")
        again = work / f"sglang_eplb_{label}_again.json"
        r = subprocess.run([sys.executable, "-m", "moeplace", "export", str(back), "--to", "sglang", "-o", str(again)],
                           capture_output=True, text=True)
        if dup:  # the merged copy leaves that GPU one slot short: no engine form, and moeplace says so
            check(r.returncode == 2 and "same number of" in r.stderr and "Traceback" not in r.stderr,
                  f"SGLang EPLB ({label}) read back -> --to sglang refused in one line: {r.stderr.strip()[:110]}...")
            continue
        md2 = sgl.metadata(str(again), q.num_layers, q.num_experts, 8, 2, 8, 0)
        p2 = md2.physical_to_logical_map_cpu.numpy()
        same = all(sorted(p2[layer, g * 9:(g + 1) * 9]) == sorted(p2l[layer, g * 9:(g + 1) * 9])
                   for layer in range(q.num_layers) for g in range(8))
        check(r.returncode == 0 and same, f"SGLang EPLB ({label}) -> moeplace -> --to sglang -> SGLang: same experts on every rank")


def sglang_loads_dump(root: Path, work: Path) -> None:
    """SGLang's `stat` recorder dump (expert_distribution.py, `_StatAccumulator.dump`) of the FLAME
    loads, recorded under an EPLB map with 8 redundant experts, through `moeplace import sglang`."""
    import torch

    from moeplace.solve import eplb
    from moeplace.trace.format import load_loads, load_trace

    ns = ast_functions(root / "sglang/srt/eplb/expert_distribution.py",
                       {"_convert_global_physical_count_to_logical_count"}, set())
    loads = load_trace(FLAME).expert_loads()
    L, E = loads.shape
    phy2log, _, _ = eplb.rebalance_experts(loads.astype(float), E + 8, 1, 1, 8)
    physical = np.zeros((L, E + 8), dtype=np.int64)  # the tokens of each expert spread over its copies
    for layer in range(L):
        for e in range(E):
            slots = np.flatnonzero(phy2log[layer] == e)
            share, extra = divmod(int(loads[layer, e]), len(slots))
            physical[layer, slots] = share + (np.arange(len(slots)) < extra)
    logical = ns["_convert_global_physical_count_to_logical_count"](
        torch.from_numpy(physical)[None], num_layers=L, num_logical_experts=E,
        physical_to_logical_map=torch.from_numpy(phy2log))
    dump, out = work / "expert_distribution_recorder_0.pt", work / "sglang_loads.npz"
    torch.save({"rank": 0, "logical_count": logical, "average_utilization_rate_over_window": None}, dump)
    moeplace("import", "sglang", str(dump), "-o", str(out))
    check(np.array_equal(np.asarray(load_loads(out).loads), loads),
          f"SGLang stat dump (logical_count {tuple(logical.shape)}, recorded over {E + 8} physical slots) -> "
          "`moeplace import sglang`: the loads come back exactly")


def sglang_models(sgl: SGLang, root: Path) -> None:
    """Which model classes size the map (get_model_config_for_expert_location); the rest get no metadata."""
    models = root / "sglang" / "srt" / "models"
    sgl.model = None
    none = sgl.location.compute_initial_expert_location_metadata(None, 0) is None
    check(none, "sglang: a model class without get_model_config_for_expert_location gets no expert-location "
                "metadata (--init-expert-location is not used)")
    if models.is_dir():
        has = {f.stem for f in models.glob("*.py") if "def get_model_config_for_expert_location" in f.read_text()}
        print("  model files with it, of those moeplace names: " + ", ".join(
            f"{m}: {'yes' if m in has else 'NO'}" for m in ("deepseek_v2", "qwen3_moe", "qwen2_moe", "gpt_oss", "mixtral", "olmoe")))


# ---------------------------------------------------------------- 2. DeepSeek EPLB


def eplb_inputs() -> list[tuple[str, np.ndarray]]:
    from moeplace.trace.format import load_trace

    out = [(f"{f.parent.name.removeprefix('mixtral_8x7b_')}/{f.stem.removeprefix('expert_popularity_')}",
            np.array(json.loads(f.read_text())["expert_popularity"], dtype=float))
           for f in sorted((DATA / "mixtral-8x7b-expert-loads").glob("*/*.json"))]
    if not out:
        print(f"note: {DATA / 'mixtral-8x7b-expert-loads'} not found: Mixtral inputs skipped")
    return out + [("flame", load_trace(FLAME).expert_loads().astype(float))]


def eplb_checks(sgl: SGLang, vllm_policy: Any | None) -> None:
    import torch

    from moeplace.export.eplb import logical_to_physical
    from moeplace.solve import eplb

    print("\n== 2. DeepSeek EPLB: upstream rebalance_experts vs moeplace.solve.eplb")
    inputs = eplb_inputs()
    table: dict[tuple[int, int], list[float]] = {}
    for group_name, names in (("mixtral", [n for n, _ in inputs if n != "flame"]), ("flame", ["flame"])):
        rows = [(n, w) for n, w in inputs if n in names]
        if not rows:
            continue
        for G in (4, 8):
            for R in (0, 8):
                setups = [("global", 1, 1), ("hierarchical", 1, 1)]
                if group_name == "flame":
                    setups.append(("hierarchical", 8, 2))  # DeepSeek-style: 8 expert groups over 2 nodes
                for policy, groups, nodes in setups:
                    same_map = same_cnt = same_loads = same_max = vllm_same = vllm_loads = same_l2p = experts = 0
                    layers = 0
                    for _, w in rows:
                        P = w.shape[1] + R
                        up, up_log2phy, up_cnt = sgl.deepseek.rebalance_experts(
                            torch.tensor(w), P, groups, nodes, G, policy == "hierarchical")
                        up, up_cnt = up.numpy(), up_cnt.numpy()
                        ours, cnt, _ = eplb.rebalance_experts(w, P, groups, nodes, G, policy)
                        up_loads = eplb.eplb_gpu_loads(w, up, up_cnt, G)
                        our_loads = eplb.eplb_gpu_loads(w, ours, cnt, G)
                        same_map += int((up == ours).all(1).sum())
                        same_cnt += int((up_cnt == cnt).all(1).sum())
                        l2p, _ = logical_to_physical(up, w.shape[1])  # moeplace's export of upstream's phy2log
                        up_log2phy = up_log2phy.numpy()
                        same_l2p += sum(sorted(x for x in up_log2phy[i, e] if x >= 0) == [x for x in l2p[i, e] if x >= 0]
                                        for i in range(w.shape[0]) for e in range(w.shape[1]))
                        experts += w.size
                        same_loads += int(np.isclose(np.sort(up_loads, 1), np.sort(our_loads, 1)).all(1).sum())
                        same_max += int(np.isclose(up_loads.max(1), our_loads.max(1)).sum())
                        layers += w.shape[0]
                        if group_name == "mixtral" and policy == "global":
                            table.setdefault((G, R), []).append(float((up_loads.max(1) / (w.sum(1) / G)).mean()))
                        if vllm_policy is not None:  # vLLM picks the policy itself: hierarchical iff groups % nodes == 0
                            v = vllm_policy.rebalance_experts(torch.tensor(w), P, groups, nodes, G).numpy()
                            v_cnt = np.stack([np.bincount(r, minlength=w.shape[1]) for r in v])
                            vllm_same += int((v == ours).all(1).sum())
                            vllm_loads += int(np.isclose(np.sort(eplb.eplb_gpu_loads(w, v, v_cnt, G), 1),
                                                         np.sort(our_loads, 1)).all(1).sum())
                    vtxt = f"; vLLM: {vllm_same} same phy2log, {vllm_loads} same GPU loads" if vllm_policy is not None else ""
                    check(same_loads == layers and same_cnt == layers and same_l2p == experts,
                          f"{group_name:7} G={G} R={R} {policy:12} groups={groups} nodes={nodes}: {layers} layers, "
                          f"SGLang phy2log identical on {same_map}, logcnt on {same_cnt}, sorted GPU loads on {same_loads}, "
                          f"max load on {same_max}; log2phy slot sets equal for {same_l2p}/{experts} experts{vtxt}")
    if table:
        print("Solver II load-only table, EPLB column recomputed with SGLang's deepseek.py "
              "(mean over the 14 inputs of the mean over layers of max/mean GPU load):")
        for (G, R), vals in sorted(table.items()):
            print(f"  {G} GPUs, {R} redundant: {np.mean(vals):.4f}")


# ---------------------------------------------------------------- 3. vLLM / vllm-ascend


def _pad(t: Any, width: int) -> Any:
    """-1 pad the last axis to `width`, as EplbState.update_mapping does."""
    import torch

    return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=-1)


def vllm_checks(vllm_root: Path | None, ascend_root: Path | None, work: Path) -> None:
    import torch

    from moeplace.export.eplb import physical_to_logical
    from moeplace.placement import load_placement

    print("\n== 3. vLLM")
    if vllm_root is None and ascend_root is None:
        print("skipped: no --vllm / --vllm-ascend given")
        return
    srcs = [work / "traffic.json", work / "latency_r16.json"]
    if vllm_root is not None:
        state = ast_functions(vllm_root / "vllm/distributed/eplb/eplb_state.py",
                              {"compute_logical_maps", "build_initial_global_physical_to_logical_map"},
                              {"MAX_EXPERT_REDUNDANCY"})
        width = state["MAX_EXPERT_REDUNDANCY"] + 1  # EplbState's logical_to_physical_map is this wide
        for src in srcs:
            p = load_placement(src)
            out = work / f"{src.stem}_vllm.json"
            moeplace("export", str(src), "--to", "vllm", "-o", str(out))
            doc = json.loads(out.read_text())
            phy2log = torch.tensor(doc["physical_to_logical_map"])
            l2p, count = state["compute_logical_maps"](phy2log, p.num_experts)
            ours = torch.tensor(doc["logical_to_physical_map"])
            R = doc["num_redundant_experts"]
            ok = (torch.equal(phy2log, torch.from_numpy(physical_to_logical(p)))
                  and tuple(ours.shape) == (p.num_layers, p.num_experts, R + 1)
                  and torch.equal(_pad(ours, width), _pad(l2p, width))
                  and torch.equal(torch.tensor(doc["logical_replica_count"]), count))
            check(ok, f"vllm {src.stem}: physical_to_logical_map {tuple(phy2log.shape)}; logical_to_physical_map "
                      f"{tuple(ours.shape)} -1 padded = compute_logical_maps {tuple(l2p.shape)} padded to EplbState's "
                      f"width {width}; logical_replica_count equal; ep_size {doc['ep_size']}, {R} redundant")
        init = state["build_initial_global_physical_to_logical_map"](64, 8)
        print(f"note: vLLM's initial EPLB layout for 64 experts + 8 redundant: slots 64-71 hold experts "
              f"{init[64:]} (linear, redundant appended at the end)")
    if ascend_root is not None:
        print("\n-- vllm-ascend expert_map_path (eplb_utils.init_eplb_config)")
        _package("vllm", None)
        log_mod = types.ModuleType("vllm.logger")
        log_mod.logger = logging.getLogger("vllm_ascend")  # type: ignore[attr-defined]
        sys.modules["vllm.logger"] = log_mod
        emm = types.ModuleType("vllm.model_executor.layers.fused_moe.expert_map_manager")
        emm.determine_expert_map = lambda *a, **k: (_ for _ in ()).throw(AssertionError("not on the file path"))  # type: ignore[attr-defined]
        sys.modules[emm.__name__] = emm
        utils = _load("ascend_eplb_utils", ascend_root / "vllm_ascend/eplb/core/eplb_utils.py")
        torch.Tensor.npu = lambda self: self  # type: ignore[attr-defined]
        for src in srcs:
            p = load_placement(src)
            out = work / f"{src.stem}_ascend.json"
            moeplace("export", str(src), "--to", "vllm-ascend", "-o", str(out))
            G, E, k = p.num_gpus, p.num_experts, (p.num_experts + p.num_replicas) // p.num_gpus
            ok = True
            for rank in range(G):
                for layer in range(p.num_layers):
                    cfg = types.SimpleNamespace(expert_map_path=str(out), dynamic_eplb=False, num_redundant_experts=0)
                    moe = types.SimpleNamespace(num_experts=E, ep_size=G, ep_rank=rank)
                    global_map, local_map, log2phy, redundant = utils.init_eplb_config(cfg, layer, moe)
                    holders = p.holders(layer)
                    on_gpu = p.experts_on_gpu(layer, rank)
                    ok &= redundant == p.num_replicas
                    ok &= all((global_map[g, e] >= 0).item() == (g in holders[e]) for g in range(G) for e in range(E))
                    ok &= all(int(local_map[e]) == on_gpu.index(e) for e in on_gpu)
                    ok &= all(int(log2phy[e]) // k in holders[e] for e in range(E))
            check(ok, f"vllm-ascend {src.stem}: accepted on all {G} ranks and {p.num_layers} MoE layers; expert maps = "
                      f"holders, local index = slot order, {p.num_replicas} redundant inferred, log2phy on a holder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sglang", type=Path, help="directory holding the unpacked sglang wheel (sglang/srt/eplb/...)")
    ap.add_argument("--vllm", type=Path, help="directory holding the unpacked vllm wheel (vllm/distributed/eplb/...)")
    ap.add_argument("--vllm-ascend", type=Path, help="directory holding vllm-ascend's vllm_ascend/ source")
    ap.add_argument("--time-limit", type=float, default=20.0, help="moeplace solve --time-limit (s)")
    args = ap.parse_args()
    needs = [(args.sglang, "sglang/srt/eplb/expert_location.py")]
    needs += [(args.vllm, "vllm/distributed/eplb/eplb_state.py")] if args.vllm else []
    needs += [(args.vllm_ascend, "vllm_ascend/eplb/core/eplb_utils.py")] if args.vllm_ascend else []
    for root, rel in needs:
        if not (root / rel).is_file():
            sys.exit(f"check_engines: error: {root / rel} not found: unpack the wheel there first (see this script's docstring)")
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("check_engines: error: needs torch (the upstream code is torch)")
    sgl = SGLang(args.sglang)
    vllm_policy = None
    if args.vllm:
        for name in ("vllm", "vllm.distributed", "vllm.distributed.eplb", "vllm.distributed.eplb.policy"):
            _package(name, args.vllm / name.replace(".", "/"))
        _load("vllm.distributed.eplb.policy.abstract", args.vllm / "vllm/distributed/eplb/policy/abstract.py")
        vllm_policy = _load("vllm.distributed.eplb.policy.default",
                            args.vllm / "vllm/distributed/eplb/policy/default.py").DefaultEplbPolicy
    with tempfile.TemporaryDirectory(prefix="check_engines_") as tmp:
        work = Path(tmp)
        sglang_checks(sgl, work, args.time_limit)
        sglang_loads_dump(args.sglang, work)
        sglang_models(sgl, args.sglang)
        sglang_server_args(args.sglang)
        eplb_checks(sgl, vllm_policy)
        vllm_checks(args.vllm, args.vllm_ascend, work)
    print(f"\n{len(FAILED)} checks failed" if FAILED else "\nall checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
