"""`moeplace serve` runtime: token-identical to transformers on 1, 2 and 4 gloo ranks, both modes,
with and without replicated experts, with equal and uneven expert counts per rank.

One process group per world size runs every (model, placement, mode) job, so the suite pays the
start-up of each world once. Each job checks, against a single-process transformers greedy run
of the same checkpoint: generated ids identical, logits close; and the runtime's cross-rank
Alltoall bytes equal to the eval prediction (eval/traffic.py) for the routing it recorded.
"""

from __future__ import annotations

import os
import socket
from unittest import mock
from pathlib import Path

import numpy as np
import pytest
import torch

from moeplace.eval.metrics import evaluate, gpu_loads, imbalance
from moeplace.eval.traffic import predict_traffic, serving_gpus
from moeplace.models.tiny import build_tiny_model
from moeplace.placement import Placement, load_placement
from moeplace.serve.model import read_spec
from moeplace.solve.baselines import contiguous, random_balanced
from moeplace.trace.format import make_trace

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10], [100, 20], [7], [42, 43, 44]]
NEW_TOKENS = 5
# family, top_k: Mixtral top-1 (one Alltoall per layer), Qwen3-MoE top-2 with a dense layer, OLMoE top-2
MODELS = [("mixtral", 1), ("qwen3_moe", 2), ("olmoe", 2)]
TRAINED = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-moe"  # the locally trained model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[list[int]], list[torch.Tensor]]]:
    """family -> (checkpoint dir, reference greedy ids, reference logits [steps, V]) per prompt."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("serve-models")
    out = {}
    paths = {family: build_tiny_model(family, root / family, num_experts=8, top_k=k, num_layers=3, seed=1)
             for family, k in MODELS}
    assert TRAINED.is_dir(), f"{TRAINED}: the committed trained checkpoint is missing"
    paths["tiny-moe"] = TRAINED
    for family, path in paths.items():
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids_out, logits_out = [], []
        for prompt in PROMPTS:
            ids, steps = torch.tensor([prompt]), []
            for _ in range(NEW_TOKENS):
                with torch.no_grad():
                    logits = ref(ids).logits[0, -1]
                steps.append(logits)
                ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
            ids_out.append(ids[0, len(prompt):].tolist())
            logits_out.append(torch.stack(steps))
        out[family] = (path, ids_out, logits_out)
    return out


def placements(root: Path, path: Path, world: int) -> dict[str, Path]:
    """contiguous and a permuted (non-contiguous, balanced) placement for `world` ranks."""
    spec = read_spec(path)
    layers, experts = len(spec.moe_layers), spec.num_experts
    out = {}
    for name, table in (("contiguous", contiguous(layers, experts, world)),
                        ("permuted", random_balanced(layers, experts, world, 7))):
        out[name] = root / f"{path.name}-{name}-{world}.json"
        Placement(table, num_gpus=world, gpus_per_node=world).save(out[name])
    return out


def replicated(root: Path, path: Path, world: int, gpus_per_node: int, full: bool = False) -> Path:
    """The permuted placement plus copies: of every other expert on its rank's node partner
    (rank ^ 1), or with `full` of every expert on every rank."""
    spec = read_spec(path)
    layers, experts = len(spec.moe_layers), spec.num_experts
    table = random_balanced(layers, experts, world, 7)
    replicas = [[(e, g) for e in range(experts) for g in range(world) if g != table[m, e]] if full else
                [(e, int(table[m, e]) ^ 1) for e in range(0, experts, 2)] for m in range(layers)]
    out = root / f"{path.name}-replicated-{world}-{gpus_per_node}{'-full' if full else ''}.json"
    Placement(table, num_gpus=world, gpus_per_node=gpus_per_node, replicas=replicas).save(out)
    return out


def uneven(root: Path, path: Path, counts: list[int]) -> Path:
    """Experts per rank that differ between ranks (`counts`, rotated by one rank per layer), as
    `solve --objective balance --max-experts-per-gpu-total` gives; experts shuffled (seeded)."""
    spec = read_spec(path)
    layers, world = len(spec.moe_layers), len(counts)
    assert sum(counts) == spec.num_experts
    rng = np.random.default_rng(11)
    table = np.stack([rng.permutation(np.repeat((np.arange(world) + m) % world, counts)) for m in range(layers)])
    out = root / f"{path.name}-uneven-{world}.json"
    Placement(table, num_gpus=world, gpus_per_node=world).save(out)
    return out


def _worker(rank: int, world: int, port: int, jobs: list[tuple[str, str, str]], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from moeplace.serve.engine import build_runtime, merged_counters

    results = []
    for model_dir, placement, mode in jobs:
        rt = build_runtime(model_dir, placement, mode, timeout_s=60, device="cpu")
        rt.record_routing = True
        res = rt.generate(PROMPTS, [NEW_TOKENS] * len(PROMPTS), ignore_eos=True, collect_logits=True)
        counters = merged_counters(rt)
        results.append({"tokens": res.tokens, "logits": res.logits, "routing": res.routing,
                        "decode": counters.summary("decode", per_token=True)})
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    if world > 1:  # leave cleanly: a process group torn down at interpreter exit can abort
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, jobs: list[tuple[str, str, str]], tmp: Path) -> list[dict]:
    if world == 1:  # no process group: the runtime's single-rank path, in this process
        with mock.patch.dict(os.environ):  # _worker sets RANK/WORLD_SIZE: not for the tests after it
            _worker(0, 1, 0, jobs, str(tmp))
    else:
        import torch.multiprocessing as mp

        for attempt in range(2):  # the free port can be taken by another process before rank 0 binds it
            try:
                mp.spawn(_worker, args=(world, free_port(), jobs, str(tmp)), nprocs=world)
                break
            except mp.ProcessRaisedException as e:
                if attempt or "address already in use" not in str(e).lower():
                    raise
    return torch.load(tmp / "results.pt", weights_only=False)


def routing_trace(routing: np.ndarray, moe_layers: int, experts: int):
    rows = routing.reshape(-1, moe_layers, routing.shape[1])
    return make_trace(rows[:, :, 3:], None, experts, sequence_ids=rows[:, 0, 0], positions=rows[:, 0, 1])


def check_job(job: tuple[str, str, str], result: dict, models: dict, world: int) -> None:
    model_dir, placement_path, mode = job
    family = Path(model_dir).name
    _, ref_ids, ref_logits = models[family]
    spec = read_spec(model_dir)
    assert result["tokens"] == ref_ids, f"{family} {mode} {placement_path} x{world}: generations differ"
    assert len(result["logits"]) == len(ref_logits) > 0, f"{family} {mode}: {len(result['logits'])} logits rows"
    for got, want in zip(result["logits"], ref_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    measured = result["decode"]
    if world == 1:
        assert measured["alltoall_bytes"] == 0
        # one rank runs every choice: k per token decoded and MoE layer
        assert measured["rank_expert_tokens_per_layer"] == [[measured["tokens_processed"] * spec.top_k]] * len(
            spec.moe_layers)
        return
    placement = load_placement(placement_path)
    trace = routing_trace(result["routing"], placement.num_layers, placement.num_experts)
    predicted = predict_traffic(placement, trace, mode, hidden_size=spec.hidden_size, element_bytes=4)
    # each rank's expert load, counted where the experts ran, is eval's per-layer GPU load of the
    # routing replayed (replicas: the copies the runtime's batches chose, serving_gpus)
    loads = gpu_loads(placement, trace, serving_gpus(placement, trace, mode))
    assert measured["rank_expert_tokens_per_layer"] == loads.astype(int).tolist()
    assert measured["imbalance_per_layer"] == pytest.approx(imbalance(loads).tolist())
    assert measured["dispatch"]["bytes"] == predicted["dispatch_bytes"]
    assert measured["combine"]["bytes"] == predicted["combine_bytes"]
    assert measured["cross_rank_rows_per_layer"] == predicted["cross_rank_rows_per_layer"]
    k = spec.top_k
    steps = measured["steps"]
    assert measured["dispatch"]["collectives"] == steps * placement.num_layers
    # one routing all-reduce per step and MoE layer with replicas, none without
    assert measured["routing"]["collectives"] == steps * sum(map(bool, placement.replicas))
    if placement.num_replicas:  # the replicas served some choices: not the primaries' routing
        primaries = placement.expert_to_gpu[np.arange(placement.num_layers)[None, :, None], trace.topk_ids]
        assert (serving_gpus(placement, trace, mode) != primaries).any()
    # coherent top-1: exactly one Alltoall per MoE layer and step; otherwise dispatch + combine
    assert measured["alltoalls_per_layer_step"] == (1.0 if mode == "coherent" and k == 1 else 2.0)
    if mode == "coherent":  # dispatch rows of layers 1.. are eval's Alltoall destinations
        d_rows = np.asarray(predicted["cross_rank_rows_per_layer"])
        if k == 1 and not placement.num_replicas:  # with replicas eval batches the whole trace at once
            assert d_rows[1:].sum() == pytest.approx(evaluate(placement, trace)["dest_gpus_topk"]
                                                     * trace.num_tokens * (placement.num_layers - 1))


def test_single_rank_matches_transformers(models: dict, tmp_path: Path) -> None:
    jobs = [(str(models[f][0]), None, mode) for f in models for mode in ("coherent", "standard")]
    for job, result in zip(jobs, run_world(1, jobs, tmp_path), strict=True):
        check_job(job, result, models, 1)


def test_two_ranks_all_modes_and_placements(models: dict, tmp_path: Path) -> None:
    pl = {f: placements(tmp_path, models[f][0], 2) for f, _ in MODELS}
    jobs = [(str(models["mixtral"][0]), str(pl["mixtral"][name]), mode)
            for mode in ("coherent", "standard") for name in ("contiguous", "permuted")]
    jobs += [(str(models["qwen3_moe"][0]), str(pl["qwen3_moe"]["permuted"]), "coherent"),
             (str(models["qwen3_moe"][0]), str(pl["qwen3_moe"]["contiguous"]), "standard"),
             (str(models["olmoe"][0]), str(pl["olmoe"]["permuted"]), "coherent")]
    # replicas: a copy on the token's own rank serves it there (gpus_per_node 1: own rank or other)
    mixtral_rep = str(replicated(tmp_path, models["mixtral"][0], 2, 1))
    qwen_full = str(replicated(tmp_path, models["qwen3_moe"][0], 2, 2, full=True))
    jobs += [(str(models["mixtral"][0]), mixtral_rep, mode) for mode in ("coherent", "standard")]
    jobs += [(str(models["qwen3_moe"][0]), qwen_full, mode) for mode in ("coherent", "standard")]
    results = run_world(2, jobs, tmp_path)
    for job, result in zip(jobs, results, strict=True):
        check_job(job, result, models, 2)
    by_job = dict(zip(jobs, results, strict=True))
    for mode in ("coherent", "standard"):
        # every expert on every rank: no token ever leaves its rank
        assert by_job[(str(models["qwen3_moe"][0]), qwen_full, mode)]["decode"]["alltoall_bytes"] == 0
        # half the experts also on the other rank: less traffic than the same primaries alone
        bytes_of = {pl_path: by_job[(str(models["mixtral"][0]), pl_path, mode)]["decode"]["alltoall_bytes"]
                    for pl_path in (str(pl["mixtral"]["permuted"]), mixtral_rep)}
        assert bytes_of[mixtral_rep] < bytes_of[str(pl["mixtral"]["permuted"])]


def test_four_ranks_both_modes(models: dict, tmp_path: Path) -> None:
    pl = {f: placements(tmp_path, models[f][0], 4) for f in models}
    jobs = [(str(models["mixtral"][0]), str(pl["mixtral"]["permuted"]), "coherent"),
            (str(models["qwen3_moe"][0]), str(pl["qwen3_moe"]["permuted"]), "coherent"),
            (str(models["qwen3_moe"][0]), str(pl["qwen3_moe"]["contiguous"]), "standard")]
    # replicas on the node partner (2 nodes of 2): tokens of the other node fill the least-loaded copy
    qwen_rep = str(replicated(tmp_path, models["qwen3_moe"][0], 4, 2))
    jobs += [(str(models["qwen3_moe"][0]), qwen_rep, mode) for mode in ("coherent", "standard")]
    mixtral_uneven = str(uneven(tmp_path, models["mixtral"][0], [3, 2, 2, 1]))
    jobs += [(str(models["mixtral"][0]), mixtral_uneven, mode) for mode in ("coherent", "standard")]
    if "tiny-moe" in models:  # the trained checkpoint (bf16 weights, tied embeddings, 16 experts)
        jobs.append((str(models["tiny-moe"][0]), str(pl["tiny-moe"]["permuted"]), "coherent"))
    for job, result in zip(jobs, run_world(4, jobs, tmp_path), strict=True):
        check_job(job, result, models, 4)
