"""`moeplace serve` runtime edge cases on 2 gloo ranks, against transformers' own `generate`
(greedy, float32, one prompt at a time):

* EOS stopping (an EOS id list) with per-prompt token budgets: a prompt stopped by EOS at its
  first token, one mid-way, others by their budget;
* EOS ids set only in generation_config.json, which is what `generate` reads;
* fewer prompts than ranks (a rank homes nothing), also through rank 0's command broadcast, and
  batches whose prompts differ in length;
* top-3 routing with 4 experts per rank (Mixtral renormalised, OLMoE not), both modes, with and
  without replicated experts.

Each test runs its jobs on one 2-rank process group; each job is checked like tests/test_serve.py
does (ids identical, logits close, Alltoall bytes equal to the eval prediction for its routing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from moeplace.models.tiny import build_tiny_model
from moeplace.placement import load_placement
from moeplace.serve.counters import Counters
from moeplace.serve.dist import Comm
from moeplace.serve.generate import Result, Runtime
from moeplace.serve.model import RankModel, read_spec
from moeplace.serve.replicas import ExpertMap
from test_serve import check_job, free_port, placements, replicated
from test_serve_model import ThreadComm

# slots 0..4 (homes: rank 0, 1, 0, 1, 0); lengths 3, 5, 2, 2, 1
EOS_PROMPTS = [[42, 43, 44], [5, 6, 7, 8, 9], [100, 20], [10, 11], [7]]
EOS_BUDGETS = [6, 7, 8, 2, 8]
# lengths 9, 4, 1, 2: rank 0 homes the longest and the shortest
LENGTH_PROMPTS = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 1, 2, 3], [7], [60, 61]]
TOP3_PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10], [7]]
SPAWN_DEADLINE_S = 180  # a hang fails the test instead of blocking the suite

Job = tuple[str, str, str, list[list[int]], list[int], bool]  # model, placement, mode, prompts, budgets, via_command


def set_eos(path: Path, eos: list[int]) -> None:
    """EOS ids in config.json (what serve reads) and generation_config.json (what `generate` reads)."""
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((path / name).read_text())
        (path / name).write_text(json.dumps(cfg | {"eos_token_id": eos}))


def reference(path: Path, prompts: list[list[int]], budgets: list[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy `generate`, one prompt at a time: (ids, logits [steps, V]) per prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, logits = [], []
    for prompt, budget in zip(prompts, budgets):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        ids.append(out.sequences[0, len(prompt):].tolist())
        logits.append(torch.cat(out.logits))
    return ids, logits


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Tiny Qwen3-MoE (top-2, a dense layer) whose EOS ids are [1, t], t = the first greedy token
    of EOS_PROMPTS[0]; returns (path, t)."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("serve-edges") / "qwen3_eos", num_experts=8,
                            top_k=2, num_layers=3, seed=5)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        t = int(model(torch.tensor([EOS_PROMPTS[0]])).logits[0, -1].argmax())
    set_eos(path, [1, t])
    return path, t


@pytest.fixture(scope="module")
def top3_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-edges-top3")
    return [build_tiny_model(family, root / f"{family}_top3", num_experts=8, top_k=3, num_layers=3, seed=5)
            for family in ("mixtral", "olmoe")]


def _worker(rank: int, world: int, port: int, jobs: list[Job], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from moeplace.serve.engine import GENERATE, STOP, Request, build_runtime, merged_counters, run_request
    from moeplace.serve.engine import send_command, worker_loop

    results: list[dict] = []
    for model_dir, placement, mode, prompts, budgets, via_command in jobs:
        rt = build_runtime(model_dir, placement, mode, timeout_s=60, device="cpu")
        if via_command:  # as `moeplace serve` runs: rank 0 broadcasts the batch, the others follow
            if rank == 0:
                req = Request(prompts, budgets)
                send_command(rt, GENERATE, req)
                res = run_request(rt, req)
                merged_counters(rt)
                send_command(rt, STOP)
            else:
                worker_loop(rt)
            results.append({"tokens": res.tokens if rank == 0 else None})
            continue
        rt.record_routing = True
        res = rt.generate(prompts, budgets, collect_logits=True)
        counters = merged_counters(rt)
        results.append({"tokens": res.tokens, "logits": res.logits, "routing": res.routing,
                        "decode": counters.summary("decode", per_token=True)})
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.barrier()  # leave cleanly: a process group torn down at interpreter exit can abort
    dist.destroy_process_group()


def run_two_ranks(jobs: list[Job], tmp: Path) -> list[dict]:
    """Every job on one 2-rank gloo group; fails (ranks killed) if they have not finished in time."""
    import torch.multiprocessing as mp

    for attempt in range(2):  # the free port can be taken by another process before rank 0 binds it
        ctx = mp.spawn(_worker, args=(2, free_port(), jobs, str(tmp)), nprocs=2, join=False)
        deadline = time.monotonic() + SPAWN_DEADLINE_S
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        p.kill()
                    pytest.fail(f"2 ranks did not finish {len(jobs)} jobs in {SPAWN_DEADLINE_S} s (hang)")
            break
        except mp.ProcessRaisedException as e:
            if attempt or "address already in use" not in str(e).lower():
                raise
    return torch.load(tmp / "results.pt", weights_only=False)


def test_eos_budgets_lengths_and_fewer_prompts_than_ranks(eos_model: tuple[Path, int], tmp_path: Path) -> None:
    path, eos = eos_model
    placement = str(placements(tmp_path, path, 2)["permuted"])
    cases = [(EOS_PROMPTS, EOS_BUDGETS), (LENGTH_PROMPTS, [6, 6, 6, 6]),
             ([EOS_PROMPTS[1]], [6]), ([EOS_PROMPTS[0]], [5])]  # one prompt: rank 1 homes nothing
    refs = [reference(path, prompts, budgets) for prompts, budgets in cases]
    # the cases hold what they are meant to: EOS at the first token and mid-way, budgets reached
    eos_ids = refs[0][0]
    assert eos_ids[0] == [eos] and len(eos_ids[2]) < EOS_BUDGETS[2] and eos_ids[2][-1] == eos
    assert eos_ids[4][-1] == eos and 1 < len(eos_ids[4]) < EOS_BUDGETS[4]
    assert [len(ids) for ids in eos_ids[1:4:2]] == [EOS_BUDGETS[1], EOS_BUDGETS[3]]
    assert eos not in eos_ids[1] + eos_ids[3] and len(refs[3][0][0]) == 1
    jobs: list[Job] = [(str(path), placement, mode, prompts, budgets, False)
                       for prompts, budgets in cases for mode in ("coherent", "standard")]
    jobs += [(str(path), placement, mode, [EOS_PROMPTS[1]], [6], True) for mode in ("coherent", "standard")]
    # EOS ids only in generation_config.json (as Qwen3 lists two there, one in config.json): generate stops there
    gen_only = tmp_path / path.name
    shutil.copytree(path, gen_only)
    cfg = json.loads((gen_only / "config.json").read_text())
    (gen_only / "config.json").write_text(json.dumps(cfg | {"eos_token_id": 1}))
    gen_ref = reference(gen_only, EOS_PROMPTS, EOS_BUDGETS)
    assert gen_ref[0] == refs[0][0]
    jobs.append((str(gen_only), placement, "coherent", EOS_PROMPTS, EOS_BUDGETS, False))
    results = run_two_ranks(jobs, tmp_path)
    refs = [ref for ref in refs for _ in ("coherent", "standard")] + [refs[2]] * 2 + [gen_ref]
    for job, result, (ref_ids, ref_logits) in zip(jobs, results, refs, strict=True):
        model_dir, placement_path, mode, _, _, via_command = job
        if via_command:
            assert result["tokens"] == ref_ids, f"{mode}, through rank 0's command: generations differ"
            continue
        if result["decode"]["steps"] == 0:  # EOS at the first token: no decode forward, nothing to predict
            assert result["tokens"] == ref_ids and result["decode"]["alltoall_bytes"] == 0
            torch.testing.assert_close(result["logits"][0], ref_logits[0], atol=1e-4, rtol=1e-4)
            continue
        check_job((model_dir, placement_path, mode), result, {path.name: (path, ref_ids, ref_logits)}, 2)


def test_top3_both_modes_with_and_without_replicas(top3_models: list[Path], tmp_path: Path) -> None:
    budgets = [5] * len(TOP3_PROMPTS)
    refs = {path.name: (path, *reference(path, TOP3_PROMPTS, budgets)) for path in top3_models}
    jobs: list[Job] = []
    for path in top3_models:
        for placement in (placements(tmp_path, path, 2)["permuted"], replicated(tmp_path, path, 2, 1)):
            jobs += [(str(path), str(placement), mode, TOP3_PROMPTS, budgets, False) for mode in ("coherent", "standard")]
    for job, result in zip(jobs, run_two_ranks(jobs, tmp_path), strict=True):
        check_job(job[:3], result, refs, 2)


def test_eos_ids_come_from_generation_config(eos_model: tuple[Path, int], tmp_path: Path) -> None:
    from moeplace.errors import MoeplaceError
    from moeplace.serve.model import read_spec

    path, eos = eos_model
    copy = tmp_path / "m"
    shutil.copytree(path, copy)
    (copy / "config.json").write_text(json.dumps(json.loads((copy / "config.json").read_text()) | {"eos_token_id": 1}))
    assert read_spec(copy).eos_token_ids == (1, eos)  # generation_config.json's, as `generate` uses
    (copy / "generation_config.json").write_text(json.dumps({"bos_token_id": 0}))
    assert read_spec(copy).eos_token_ids == ()  # it sets none: `generate` then never stops at config.json's
    (copy / "generation_config.json").unlink()
    assert read_spec(copy).eos_token_ids == (1,)  # no generation_config.json: config.json's
    (copy / "generation_config.json").write_text("{")
    with pytest.raises(MoeplaceError, match="generation_config.json: not valid JSON"):
        read_spec(copy)


@dataclasses.dataclass
class ThreadRanks(ThreadComm):
    """ThreadComm with the all-reduce too: a whole `generate` on ranks that are threads."""

    def max_reduce(self, values: torch.Tensor, kind: str) -> torch.Tensor:
        self.mailbox[self.rank] = (values.clone(),)
        self.barrier.wait()
        out = torch.stack([self.mailbox[src][0] for src in range(self.world)]).amax(0)
        self.barrier.wait()
        self.counters.record(kind, 0, values.numel() * values.element_size() * (self.world - 1))
        return out


class OwnRouting(Runtime):
    """A thread rank's routing rows, unmerged (the real gather is a process-group all_gather)."""

    def _gather_routing(self) -> np.ndarray:
        return torch.cat(self._routing).numpy() if self._routing else np.empty((0, 3 + self.model.spec.top_k))


@pytest.mark.parametrize("mode, copies", [("standard", False), ("coherent", False), ("coherent", True)])
def test_generate_on_two_thread_ranks_matches_transformers(tmp_path: Path, mode: str, copies: bool) -> None:
    """In-process and fast: greedy ids and logits of transformers' `generate`, with an EOS mid-way
    (prompt 0 stops at its 3rd token), a budget of 1, a budget of 0 and uneven prompt lengths,
    on a permuted placement (slot s homed on rank s % 2), with copies of every other expert on the
    other rank or none; Alltoall figures as eval predicts."""
    path = build_tiny_model("mixtral", tmp_path / "m", num_experts=4, top_k=2, num_layers=2, seed=7)
    prompts, budgets = [[42, 43, 44], [5, 6, 7, 8, 9], [100], [10, 11]], [6, 5, 1, 4]
    ids, _ = reference(path, prompts[:1], [3])
    set_eos(path, [ids[0][2]])
    want_ids, want_logits = reference(path, prompts, budgets)
    assert len(want_ids[0]) == 3 and [len(t) for t in want_ids[1:]] == budgets[1:]
    spec = read_spec(path)
    layers, world = len(spec.moe_layers), 2
    placement_path = replicated(tmp_path, path, world, world) if copies else placements(tmp_path, path, world)["permuted"]
    placement = load_placement(placement_path)
    emap = ExpertMap.from_placement(placement, torch.device("cpu"))
    mailbox: dict[int, tuple[torch.Tensor, ...]] = {}
    barrier = threading.Barrier(world, timeout=60)

    def rank(r: int) -> tuple[Result, Counters]:
        local = [sorted(placement.experts_on_gpu(m, r)) for m in range(layers)]
        comm = ThreadRanks(r, world, torch.device("cpu"), Counters(layers), mailbox, barrier)
        rt = OwnRouting(RankModel(spec, local, torch.device("cpu"), torch.float32), comm, emap, mode,
                        record_routing=True)
        try:
            return rt.generate(prompts + [[3]], budgets + [0], collect_logits=True), comm.counters
        except BaseException:
            barrier.abort()
            raise

    with ThreadPoolExecutor(world) as pool:
        results = list(pool.map(rank, range(world)))
    assert results[0][0].tokens == results[1][0].tokens and results[0][0].logits is not None
    assert results[0][0].logits[-1].shape == (0, spec.vocab_size)
    for res, _ in results[1:]:
        for got, want in zip(res.logits or [], results[0][0].logits, strict=True):
            torch.testing.assert_close(got, want)
    routing = np.concatenate([res.routing for res, _ in results])
    vec = np.sum([c.as_vector(r, world) for r, (_, c) in enumerate(results)], axis=0).tolist()
    result = {"tokens": results[0][0].tokens, "logits": results[0][0].logits,
              "routing": routing[np.lexsort((routing[:, 2], routing[:, 1], routing[:, 0]))],
              "decode": Counters.from_vector(layers, vec, world).summary("decode", per_token=True)}
    models = {"m": (path, want_ids + [[]], want_logits + [torch.empty(0, spec.vocab_size)])}
    check_job((str(path), str(placement_path), mode), result, models, world)


@pytest.mark.parametrize("family, overrides", [("qwen3_moe", {}), ("olmoe", {"clip_qkv": 0.1})])
def test_qk_norms_and_clip_qkv_match_transformers(tmp_path: Path, family: str, overrides: dict) -> None:
    """One rank, in-process: Qwen3's per-head q/k RMSNorm, OLMoE's whole-projection one and its
    clip_qkv (q, k, v clamped after the norms) give transformers' greedy ids and logits."""
    path = build_tiny_model(family, tmp_path / family, num_experts=4, top_k=2, num_layers=2, seed=3, **overrides)
    spec = read_spec(path)
    assert spec.qk_norm == {"qwen3_moe": "head", "olmoe": "full"}[family] and spec.clip_qkv == overrides.get("clip_qkv")
    prompts, budgets = [[42, 43, 44, 45], [7, 8]], [3, 3]
    want_ids, want_logits = reference(path, prompts, budgets)
    layers = len(spec.moe_layers)
    rt = Runtime(RankModel(spec, [list(range(spec.num_experts))] * layers, torch.device("cpu"), torch.float32),
                 Comm(0, 1, torch.device("cpu"), Counters(layers)),
                 ExpertMap(torch.zeros(layers, spec.num_experts, dtype=torch.int64), [None] * layers, 1))
    res = rt.generate(prompts, budgets, ignore_eos=True, collect_logits=True)
    assert res.tokens == want_ids and res.logits is not None
    for got, want in zip(res.logits, want_logits):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
