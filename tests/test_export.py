"""export: engine files have the engines' exact shapes, read back to the same placement, and bad input gets one line."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from moeplace.cli import run
from moeplace.errors import MoeplaceWarning, PlacementError
from moeplace.export.eplb import logical_to_physical, physical_to_logical, placement_from_physical
from moeplace.export.sglang import sglang_map
from moeplace.placement import Placement, load_placement
from moeplace.solve.baselines import random_balanced
from moeplace.trace.format import make_loads, make_trace, save_loads, save_trace

FORMATS = ("sglang", "vllm", "vllm-ascend", "eplb")


def plain() -> Placement:
    return Placement(expert_to_gpu=random_balanced(3, 8, 4, seed=3), num_gpus=4, gpus_per_node=2)


def with_row(p: Placement, layer: int, gpus: list[int]) -> Placement:
    """`p` with one layer's experts on `gpus` (a Placement is frozen: a changed one is new)."""
    layout = p.expert_to_gpu.copy()
    layout[layer] = gpus
    return replace(p, expert_to_gpu=layout)


def replicated() -> Placement:
    """One extra copy on every GPU (of an expert of the next GPU): 3 slots per GPU and layer."""
    e2g = random_balanced(3, 8, 4, seed=4)
    replicas = []
    for layer in range(3):
        reps = []
        for gpu in range(4):
            expert = next(int(e) for e in np.flatnonzero(e2g[layer] == (gpu + 1) % 4))
            reps.append((expert, gpu))
        replicas.append(reps)
    return Placement(expert_to_gpu=e2g, num_gpus=4, gpus_per_node=2, replicas=replicas)


def slots_by_gpu(p: Placement) -> list[list[list[int]]]:
    return [[sorted(p.experts_on_gpu(layer, g)) for g in range(p.num_gpus)] for layer in range(p.num_layers)]


def cli(*args: str) -> int:
    return run(["export", *args])


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_without_replicas_is_exact(tmp_path: Path, fmt: str) -> None:
    src, out, back = tmp_path / "p.json", tmp_path / f"engine.{fmt}.json", tmp_path / "back.json"
    plain().save(src)
    assert cli(str(src), "--to", fmt, "-o", str(out)) == 0
    assert cli("--from", fmt, str(out), "--gpus", "4", "--gpus-per-node", "2", "-o", str(back)) == 0
    p = load_placement(back)
    np.testing.assert_array_equal(p.expert_to_gpu, plain().expert_to_gpu)
    assert not any(p.replicas) and (p.num_gpus, p.gpus_per_node) == (4, 2)
    assert not list(tmp_path.glob(".*")), "atomic write left a temp file"


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_with_replicas_keeps_every_copy(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    src, out, back = tmp_path / "p.json", tmp_path / "engine.json", tmp_path / "back.json"
    replicated().save(src)
    assert cli(str(src), "--to", fmt, "-o", str(out)) == 0
    gpus = [] if fmt != "sglang" else ["--gpus", "4", "--gpus-per-node", "2"]  # the others say their GPU count
    capsys.readouterr()
    assert cli("--from", fmt, str(out), *gpus, "-o", str(back)) == 0
    # counted as solve and the engines count them (before: "12 replicas in all", read as 12 experts)
    assert capsys.readouterr().out == (f"wrote {back}: 3 MoE layers x 8 experts on 4 GPUs, 4 redundant experts per "
                                       "layer (extra copies, as eval's copies column counts: 12 in all)\n")
    p = load_placement(back)
    assert slots_by_gpu(p) == slots_by_gpu(replicated())
    assert [sorted(map(sorted, p.holders(layer))) for layer in range(3)] == \
        [sorted(map(sorted, replicated().holders(layer))) for layer in range(3)]


def test_eplb_arrays_follow_deepseek_layout(tmp_path: Path) -> None:
    p = replicated()
    assert cli(_save(p, tmp_path), "--to", "eplb", "-o", str(tmp_path / "e.npz")) == 0
    with np.load(tmp_path / "e.npz") as z:
        phy2log, log2phy, logcnt = z["phy2log"], z["log2phy"], z["logcnt"]
    assert phy2log.shape == (3, 12) and log2phy.shape == (3, 8, 12 - 8 + 1) and logcnt.shape == (3, 8)
    for layer in range(3):
        for gpu in range(4):  # slot s on GPU s // 3
            assert sorted(phy2log[layer, gpu * 3:(gpu + 1) * 3].tolist()) == sorted(p.experts_on_gpu(layer, gpu))
        for expert in range(8):
            slots = log2phy[layer, expert, :logcnt[layer, expert]]
            assert (phy2log[layer, slots] == expert).all() and (log2phy[layer, expert, logcnt[layer, expert]:] == -1).all()
            assert sorted(slots // 3) == sorted(p.holders(layer)[expert])


def test_sglang_file_holds_only_the_map_with_a_row_per_decoder_layer(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """DeepSeek-like: layer 0 dense, 1-2 MoE, 3 a multi-token-prediction layer past num_hidden_layers."""
    model = fake_checkpoint(tmp_path / "model", moe_layers=(1, 2, 3), num_hidden_layers=3)
    p = Placement(expert_to_gpu=random_balanced(2, 8, 4, seed=5), num_gpus=4, gpus_per_node=4)
    out = tmp_path / "loc.json"
    assert cli(_save(p, tmp_path), "--to", "sglang", "--model", str(model), "-o", str(out)) == 0
    assert "note:" not in capsys.readouterr().err  # SGLang's DeepSeek classes read the map
    doc = json.loads(out.read_text())
    assert list(doc) == ["physical_to_logical_map"]  # SGLang passes the keys as kwargs to init_by_mapping
    table = np.asarray(doc["physical_to_logical_map"])
    assert table.shape == (3, 8)
    np.testing.assert_array_equal(table[0], np.arange(8))  # dense row: SGLang's trivial map
    # MoE rows, by hand: slot s lies on GPU s // 2 (2 slots per GPU) and holds an expert placed there
    for row, layer in ((1, 0), (2, 1)):
        assert sorted(table[row]) == list(range(8))
        np.testing.assert_array_equal(p.expert_to_gpu[layer, table[row]], np.arange(8) // 2)
    back = tmp_path / "back.json"
    assert cli("--from", "sglang", str(out), "--gpus", "4", "--model", str(model), "-o", str(back)) == 0
    np.testing.assert_array_equal(load_placement(back).expert_to_gpu, p.expert_to_gpu)
    np.testing.assert_array_equal(sglang_map(p, [1, 2], 3), table)
    # with copies (12 physical slots), a dense row is SGLang's trivial map of 12 slots: ids stay < E
    r = replicated()
    dense_too = sglang_map(r, [0, 2, 3], 4)
    np.testing.assert_array_equal(dense_too[1], np.arange(12) % 8)
    for row, layer in ((0, 0), (2, 1), (3, 2)):
        assert sorted(set(dense_too[row])) == list(range(8))  # every expert, 4 of them twice
        np.testing.assert_array_equal(np.sort(np.bincount(dense_too[row], minlength=8)), [1] * 4 + [2] * 4)
    assert cli(_save(p, tmp_path), "--to", "sglang", "--moe-layers", "1-2", "--num-hidden-layers", "3",
               "-o", str(tmp_path / "loc2.json")) == 0
    assert json.loads((tmp_path / "loc2.json").read_text()) == doc


def test_sglang_rows_from_a_trace_meta(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`moeplace trace` records which decoder layers are MoE: the trace a placement was fit to says the rows."""
    ids = np.argsort(np.random.default_rng(0).random((16, 2, 8)), axis=-1)[..., :2]  # distinct top-2
    p = Placement(expert_to_gpu=random_balanced(2, 8, 4, seed=6), num_gpus=4, gpus_per_node=4)
    save_trace(make_trace(ids, num_experts=8, meta={"moe_layers": [1, 3], "num_decoder_layers": 4}), tmp_path / "t.npz")
    out = tmp_path / "loc.json"
    assert cli(_save(p, tmp_path), "--to", "sglang", "--trace", str(tmp_path / "t.npz"), "-o", str(out)) == 0
    np.testing.assert_array_equal(np.asarray(json.loads(out.read_text())["physical_to_logical_map"]),
                                  sglang_map(p, [1, 3], 4))
    save_trace(make_trace(ids, num_experts=8), tmp_path / "bare.npz")
    assert cli(_save(p, tmp_path), "--to", "sglang", "--trace", str(tmp_path / "bare.npz"), "-o", str(out)) == 2
    assert "does not list the decoder layer of each MoE layer" in capsys.readouterr().err


def test_sglang_pt_file_is_read_weights_only(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "loc.pt"
    torch.save({"physical_to_logical_map": torch.as_tensor(physical_to_logical(plain()))}, path)
    back = tmp_path / "back.json"
    assert cli("--from", "sglang", str(path), "--gpus", "4", "--gpus-per-node", "2", "-o", str(back)) == 0
    np.testing.assert_array_equal(load_placement(back).expert_to_gpu, plain().expert_to_gpu)


def test_vllm_files(tmp_path: Path) -> None:
    p = replicated()
    assert cli(_save(p, tmp_path), "--to", "vllm", "-o", str(tmp_path / "v.json")) == 0
    doc = json.loads((tmp_path / "v.json").read_text())
    assert (doc["ep_size"], doc["num_redundant_experts"], doc["num_moe_layers"]) == (4, 4, 3)
    assert np.asarray(doc["logical_to_physical_map"]).shape == (3, 8, 5)
    assert np.asarray(doc["logical_replica_count"]).sum(axis=1).tolist() == [12, 12, 12]
    assert cli(_save(p, tmp_path), "--to", "vllm-ascend", "-o", str(tmp_path / "a.json")) == 0
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["moe_layer_count"] == 3 and doc["layer_list"][2]["device_count"] == 4
    device = doc["layer_list"][2]["device_list"][1]
    assert device["device_id"] == 1 and sorted(device["device_expert"]) == sorted(p.experts_on_gpu(2, 1))


def test_duplicate_copy_on_one_gpu_is_counted_once(capsys: pytest.CaptureFixture[str]) -> None:
    """DeepSeek EPLB can put two copies of a hot expert on one GPU (deepseek-ai/EPLB#22)."""
    table = [[0, 0, 1, 2, 3, 1]]  # GPU 0: 0, 0, 1; GPU 1: 2, 3, 1
    with pytest.warns(MoeplaceWarning, match="counted once"):
        p = placement_from_physical(table, num_gpus=2, gpus_per_node=2)
    assert p.expert_to_gpu.tolist() == [[0, 0, 1, 1]] and p.replicas == (((1, 1),),)


def test_logical_to_physical_pads_with_minus_one() -> None:
    log2phy, logcnt = logical_to_physical(np.array([[0, 1, 0]]), 2)
    assert log2phy.tolist() == [[[0, 2], [1, -1]]] and logcnt.tolist() == [[2, 1]]


def test_placements_with_no_engine_form_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uneven = with_row(plain(), 0, [0, 0, 0, 1, 1, 2, 2, 3])
    with pytest.raises(PlacementError, match="layer 0: GPU 0 holds 3 physical experts but GPU 3 holds 1"):
        physical_to_logical(uneven)
    full = replicated()
    ragged = replace(full, replicas=[full.replicas[0], (), full.replicas[2]])  # layer 1 without replicas: 8 slots vs 12
    with pytest.raises(PlacementError, match="different numbers of physical experts"):
        physical_to_logical(ragged)


@pytest.mark.parametrize("content,args,message", [
    ('{"logical_count": [[1, 2]]}', ["--from", "sglang", "--gpus", "2"], "holds 'logical_count'"),
    ('{"other": 1}', ["--from", "sglang", "--gpus", "2"], "no 'physical_to_logical_map'"),
    ('{"physical_to_logical_map": [[0, 1], [0]]}', ["--from", "sglang", "--gpus", "2"], "rectangular"),
    ('{"physical_to_logical_map": [[0, 1, 2]]}', ["--from", "sglang", "--gpus", "2"], "cannot be split equally over 2 GPUs"),
    ('{"physical_to_logical_map": [[0, 2, 2, 0]]}', ["--from", "sglang", "--gpus", "2"], "no physical copy of expert 1"),
    ('{"physical_to_logical_map": [[0, 1]]}', ["--from", "sglang"], "needs --gpus"),
    ('{"physical_to_logical_map": [[0, 1]]}', ["--from", "sglang", "--gpus", "2", "--moe-layers", "x"], "--moe-layers 'x'"),
    ('{"physical_to_logical_map": [[0, 1]]}', ["--from", "sglang", "--gpus", "2", "--moe-layers", "4"], "1 row (SGLang writes one per decoder layer), but the MoE layers are decoder layers 4"),
    ('{"phy2log": [[0, 1]], "logcnt": [[1, 2]]}', ["--from", "eplb", "--gpus", "2"], "'logcnt' does not match"),
    ('{"phy2log": [[0, 1]]}', ["--from", "eplb"], "pass --gpus"),
    ('{"phy2log": [[0, 1]], "num_gpus": 2}', ["--from", "eplb", "--gpus", "1"], "for 2 GPUs but --gpus is 1"),
    ('{"layer_list": [{"device_list": [{"device_expert": [0]}]}], "moe_layer_count": 2}', ["--from", "vllm"],
     "moe_layer_count is 2"),
    ('{"layer_list": "x"}', ["--from", "vllm", "--gpus", "1"], "malformed vllm-ascend expert map"),
    # a --to vllm state whose counts or derived arrays contradict its map (used to be ignored)
    ('{"physical_to_logical_map": [[0, 1, 2, 3]], "ep_size": 2, "num_logical_experts": 3}', ["--from", "vllm"],
     "outside [0, 3) (num_logical_experts = 3)"),
    ('{"physical_to_logical_map": [[0, 1, 2, 3]], "ep_size": 2, "num_logical_experts": 5}', ["--from", "vllm"],
     "no physical copy of expert 4"),
    ('{"physical_to_logical_map": [[0, 1, 2, 3]], "ep_size": 2, "logical_replica_count": [[1, 1, 1, 2]]}',
     ["--from", "vllm"], "'logical_replica_count' does not match"),
    ('{"physical_to_logical_map": [[0, 1, 2, 3]], "ep_size": 2, "logical_to_physical_map": [[[0], [2], [1], [3]]]}',
     ["--from", "vllm"], "'logical_to_physical_map' does not list the slots"),
    ('{"physical_to_logical_map": [[0, 1, 2, 3]], "ep_size": 2, "num_moe_layers": 2}', ["--from", "vllm"],
     "'num_moe_layers' is 2 but physical_to_logical_map has 1"),
    ('{"physical_to_logical_map": [[0, 1, 2, 3]], "ep_size": 2, "num_logical_experts": "x"}', ["--from", "vllm"],
     "'num_logical_experts' must be an integer"),
    ('{"unknown": []}', ["--from", "vllm", "--gpus", "1"], "neither a vLLM EPLB state"),
    ("not json", ["--from", "eplb", "--gpus", "1"], "not valid JSON"),
    ("[1, 2]", ["--from", "vllm", "--gpus", "1"], "expected a JSON object"),
])
def test_bad_engine_files_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str,
                                       args: list[str], message: str) -> None:
    path = tmp_path / "engine.json"
    path.write_text(content)
    fmt_at = args.index("--from") + 1
    argv = args[:fmt_at + 1] + [str(path)] + args[fmt_at + 1:]
    assert cli(*argv, "-o", str(tmp_path / "p.json")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeplace: error:") and message in err and "\n" not in err, err
    assert not (tmp_path / "p.json").exists()


def test_bad_export_requests_get_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _save(plain(), tmp_path)
    uneven = with_row(plain(), 2, [0, 0, 0, 1, 1, 2, 2, 3])
    uneven_path = tmp_path / "uneven.json"
    uneven.save(uneven_path)
    npz = tmp_path / "bad.npz"
    npz.write_bytes(b"PK\x03\x04 truncated")
    x = str(tmp_path / "x.json")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    cases = [
        ([src, "-o", x], "exactly one of --to"),
        ([src, "--to", "eplb", "--from", "eplb", "-o", x], "exactly one of --to"),
        ([src, "--to", "eplb", "--gpus", "4", "-o", x], "--gpus/--gpus-per-node are for --from"),
        ([src, "--to", "vllm", "--moe-layers", "1-3", "-o", x], "only apply to sglang (vllm files hold MoE layers only)"),
        ([str(uneven_path), "--to", "sglang", "-o", x], "layer 2: GPU 0 holds 3"),
        ([src, "--to", "sglang", "--model", str(empty), "-o", x], "no .safetensors weights"),
        ([str(tmp_path / "missing.json"), "--to", "sglang", "-o", x], "no such file"),
        ([src, "--to", "eplb", "-o", str(tmp_path)], "is a directory"),
        ([src, "--to", "sglang", "-o", str(tmp_path / "loc.pt")], "ends in .json"),
        ([src, "--to", "vllm-ascend", "-o", str(tmp_path / "map.txt")], "does not end in .json"),
        (["--from", "eplb", str(npz), "--gpus", "2", "-o", x], "not a readable .npz"),
    ]
    for argv, message in cases:
        assert cli(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("moeplace: error:") and message in err and "\n" not in err, (argv, err)
    assert not Path(x).exists()


@pytest.mark.parametrize("fmt", ["sglang", "vllm", "eplb"])
def test_model_of_another_size_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    model = fake_checkpoint(tmp_path / "model", moe_layers=(0, 1), num_hidden_layers=2)
    out = tmp_path / ("o.json" if fmt != "eplb" else "o.npz")
    assert cli(_save(plain(), tmp_path), "--to", fmt, "--model", str(model), "-o", str(out)) == 2
    assert "placement is for 3 MoE layers x 8 experts, but the model" in capsys.readouterr().err
    assert not out.exists()


def test_sglang_map_missing_the_last_expert_is_caught_with_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = fake_checkpoint(tmp_path / "model", moe_layers=(0,), num_hidden_layers=1)
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3, 4, 5, 6, 0]]}))
    assert cli("--from", "sglang", str(path), "--gpus", "2", "--model", str(model), "-o", str(tmp_path / "p.json")) == 2
    assert "no physical copy of expert 7" in capsys.readouterr().err


def test_help_teaches_inputs_outputs_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--help") == 0
    text = capsys.readouterr().out
    for needle in ("--to", "--from", "physical_to_logical_map", "phy2log", "Examples:", "moeplace export"):
        assert needle in text


def _save(p: Placement, tmp_path: Path) -> str:
    path = tmp_path / "placement.json"
    p.save(path)
    return str(path)


def fake_checkpoint(root: Path, moe_layers: tuple[int, ...], num_hidden_layers: int, num_experts: int = 8,
                    model_type: str = "deepseek_v3") -> Path:
    """Headers are all that export reads: a few tiny tensors named like a DeepSeek checkpoint."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"num_hidden_layers": num_hidden_layers, "model_type": model_type}))
    tensors = {"model.layers.0.mlp.gate_proj.weight": np.zeros((2, 2), np.float32)}
    for layer in moe_layers:
        tensors[f"model.layers.{layer}.mlp.gate.weight"] = np.zeros((num_experts, 2), np.float32)
        for e in range(num_experts):
            tensors[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(root / "model.safetensors"))
    return root


def test_sglang_export_for_a_model_sglang_gives_no_map_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SGLang 0.5.23's Mixtral and OLMoE classes build no expert-location metadata: the map would be
    ignored silently (found by running SGLang's loader, scripts/check_engines.py)."""
    model = fake_checkpoint(tmp_path / "model", moe_layers=(0, 1), num_hidden_layers=2, model_type="mixtral")
    p = Placement(expert_to_gpu=random_balanced(2, 8, 4, seed=5), num_gpus=4, gpus_per_node=4)
    assert cli(_save(p, tmp_path), "--to", "sglang", "--model", str(model), "-o", str(tmp_path / "loc.json")) == 0
    assert "does not use an expert map for Mixtral models" in capsys.readouterr().err
    # the trace a placement was fit to names the model too (`moeplace trace` records model_type)
    ids = np.argsort(np.random.default_rng(1).random((16, 2, 8)), axis=-1)[..., :2]
    for model_type, noted in (("olmoe", True), ("qwen3_moe", False)):
        save_trace(make_trace(ids, num_experts=8, meta={"moe_layers": [0, 1], "num_decoder_layers": 2,
                                                        "model_type": model_type}), tmp_path / "t.npz")
        assert cli(_save(p, tmp_path), "--to", "sglang", "--trace", str(tmp_path / "t.npz"),
                   "-o", str(tmp_path / "loc.json")) == 0
        assert ("does not use an expert map for OLMoE models" in capsys.readouterr().err) == noted


def test_sglang_export_of_replicas_for_mixtral_names_a_way_that_works(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the note sent the user to permute-checkpoint, which refuses replicas and sends them back here."""
    model = fake_checkpoint(tmp_path / "model", moe_layers=(0, 1, 2), num_hidden_layers=3, model_type="mixtral")
    assert cli(_save(replicated(), tmp_path), "--to", "sglang", "--model", str(model),
               "-o", str(tmp_path / "loc.json")) == 0
    note = capsys.readouterr().err.strip().splitlines()[-1]
    assert note.startswith("moeplace export: note: SGLang (0.5.23) does not use an expert map for Mixtral models, and `moeplace "
                           "permute-checkpoint` cannot create this placement's 4 redundant experts."), note
    assert "Ways to run it: `moeplace serve --placement` (copies included" in note
    assert "solve again without --redundant-experts" in note and "--to sglang" not in note


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_already_renumbered_for_the_placement_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               fmt: str) -> None:
    """A permute-checkpoint output realises its placement under the contiguous layout: an engine
    file of the same placement would move the experts a second time (serve and permute-checkpoint
    refuse it already; export used to write it)."""
    from moeplace.export.permute import check_not_applied, permute_checkpoint

    model = fake_checkpoint(tmp_path / "model", moe_layers=(0, 1), num_hidden_layers=2)
    p = Placement(expert_to_gpu=random_balanced(2, 8, 4, seed=5), num_gpus=4, gpus_per_node=4)
    permute_checkpoint(model, p, tmp_path / "placed", progress=False)
    out = tmp_path / ("o.npz" if fmt == "eplb" else "o.json")
    assert cli(_save(p, tmp_path), "--to", fmt, "--model", str(tmp_path / "placed"), "-o", str(out)) == 2
    err = capsys.readouterr().err.strip()
    with pytest.raises(PlacementError) as shared:  # the very check (and words) of serve and permute-checkpoint
        check_not_applied(tmp_path / "placed", p)
    assert err == f"moeplace: error: {shared.value}" and not out.exists()
    assert cli(_save(p, tmp_path), "--to", fmt, "--model", str(model), "-o", str(out)) == 0  # the original is fine


def test_sglang_without_layer_source_notes_its_assumption(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = _save(plain(), tmp_path), str(tmp_path / "loc.json")
    assert cli(src, "--to", "sglang", "-o", out) == 0
    out_err = capsys.readouterr()
    notes = [line for line in out_err.err.splitlines() if line.startswith("moeplace export: note:")]
    assert len(notes) == 1 and "decoder layers 0-2 are all MoE" in notes[0]
    # what was written is the command's result (stdout, as trace, import and solve print it); notes are stderr
    assert out_err.out.startswith(f"wrote {out}: 3 decoder layers") and "wrote" not in out_err.err
    assert cli(src, "--to", "sglang", "--moe-layers", "1-3", "-o", out) == 0
    assert "note:" not in capsys.readouterr().err


def test_sglang_rows_from_the_placements_fit_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # a placement solved on FLAME records moe_layers [2..9]; without --trace the map had rows
    # 0-7, and SGLang (which does not check the row count) read every layer two rows off
    p = replace(plain(), trace_model={"model": "m", "moe_layers": [2, 4, 5]})
    src, out = _save(p, tmp_path), tmp_path / "loc.json"
    assert cli(src, "--to", "sglang", "-o", str(out)) == 0
    assert "MoE layers [2, 4, 5] from the placement's fit trace" in capsys.readouterr().err
    rows = np.asarray(json.loads(out.read_text())["physical_to_logical_map"])
    assert rows.shape == (6, 8)
    for dense in (0, 1, 3):  # decoder layers that are no MoE layer of the placement: the trivial map
        np.testing.assert_array_equal(rows[dense], np.arange(8))
    back = tmp_path / "back.json"
    assert cli("--from", "sglang", str(out), "--moe-layers", "2,4-5", "--gpus", "4", "--gpus-per-node", "2",
               "-o", str(back)) == 0
    np.testing.assert_array_equal(load_placement(back).expert_to_gpu, p.expert_to_gpu)


def test_sglang_rows_of_a_placement_solved_on_a_load_only_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an SGLang stat dump of a model with a dense first layer imports as loads of decoder layers
    # 1-3; the balance solve must record them, and --trace must accept the load file, or the map
    # is written with MoE layer i on decoder layer i (every layer one row off)
    loads = make_loads(np.random.default_rng(0).integers(1, 50, (3, 8)), meta={"moe_layers": [1, 2, 3]})
    save_loads(loads, tmp_path / "stat.npz")
    placement = tmp_path / "p.json"
    assert run(["solve", str(tmp_path / "stat.npz"), "--gpus", "4", "--objective", "balance",
                "--redundant-experts", "4", "-q", "-o", str(placement)]) == 0
    p = load_placement(placement)
    assert p.trace_model == {"moe_layers": [1, 2, 3]}
    for extra in ([], ["--trace", str(tmp_path / "stat.npz")]):
        out = tmp_path / "loc.json"
        assert cli(str(placement), "--to", "sglang", *extra, "-o", str(out)) == 0
        np.testing.assert_array_equal(np.asarray(json.loads(out.read_text())["physical_to_logical_map"]),
                                      sglang_map(p, [1, 2, 3], 4))
    assert cli(str(placement), "--to", "vllm", "--trace", str(tmp_path / "stat.npz"), "-o", str(tmp_path / "v.json")) == 0
    save_loads(make_loads(np.ones((2, 8))), tmp_path / "other.npz")  # the fit check reads a load file too
    assert cli(str(placement), "--to", "eplb", "--trace", str(tmp_path / "other.npz"), "-o", str(tmp_path / "e.json")) == 2
    assert "placement is for 3 MoE layers x 8 experts, but the trace" in capsys.readouterr().err


def test_from_sglang_out_of_range_id_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Expert 0 replaced by id 8 in an 8-expert map: the count inferred from the ids is 9, and
    "no physical copy of expert 0" alone hid the cause."""
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[8, 1, 2, 3, 4, 5, 6, 7]]}))
    assert cli("--from", "sglang", str(path), "--gpus", "2", "-o", str(tmp_path / "p.json")) == 2
    err = capsys.readouterr().err.strip()
    assert "no physical copy of expert 0" in err and "largest id + 1 = 9: is id 8 out of range?" in err
    model = fake_checkpoint(tmp_path / "model", moe_layers=(0,), num_hidden_layers=1)
    assert cli("--from", "sglang", str(path), "--gpus", "2", "--model", str(model), "-o", str(tmp_path / "p.json")) == 2
    assert "layer 0 slot 0 holds expert id 8, outside [0, 8) (--model: 8 experts)" in capsys.readouterr().err


def test_from_eplb_names_the_files_gpu_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"phy2log": [[0, 1, 2]], "num_gpus": 3, "gpus_per_node": 4}))
    assert cli("--from", "eplb", str(path), "-o", str(tmp_path / "p.json")) == 2
    err = capsys.readouterr().err.strip()
    assert "num_gpus = 3 must be a multiple of gpus_per_node = 4" in err and "--gpus" not in err, err
    assert cli("--from", "eplb", str(path), "--gpus-per-node", "2", "-o", str(tmp_path / "p.json")) == 2
    assert "num_gpus = 3 must be a multiple of --gpus-per-node 2" in capsys.readouterr().err


def test_uneven_vllm_ascend_device_lists_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "map.json"
    devices = [{"device_id": 0, "device_expert": [0, 1, 2]}, {"device_id": 1, "device_expert": [3]}]
    path.write_text(json.dumps({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_list": devices}]}))
    assert cli("--from", "vllm-ascend", str(path), "-o", str(tmp_path / "p.json")) == 2
    err = capsys.readouterr().err.strip()
    assert "device 1: device_expert lists 1 experts but MoE layer 0, device 0 lists 3" in err, err
    assert "physical_to_logical" not in err and "\n" not in err


def test_from_vllm_ascend_takes_gpus_per_node_from_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The expert map records no node size: --gpus-per-node gives it; without it, one node, said on stderr."""
    src, out, back = _save(plain(), tmp_path), tmp_path / "a.json", tmp_path / "back.json"
    assert cli(src, "--to", "vllm-ascend", "-o", str(out)) == 0
    capsys.readouterr()
    assert cli("--from", "vllm-ascend", str(out), "--gpus-per-node", "2", "-o", str(back)) == 0
    assert load_placement(back).gpus_per_node == 2 and "note" not in capsys.readouterr().err
    assert cli("--from", "vllm-ascend", str(out), "-o", str(back)) == 0
    assert load_placement(back).gpus_per_node == 4
    assert "does not say how many GPUs a node has: all 4 taken as one node" in capsys.readouterr().err
    assert cli("--help") == 0
    assert "expert maps carry none" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("fmt", ["eplb", "vllm", "vllm-ascend"])
def test_from_with_model_checks_the_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str) -> None:
    """--help promises a fit check for any format; --from eplb/vllm used to refuse --model outright."""
    engine, back = tmp_path / "engine.json", tmp_path / "back.json"
    assert cli(_save(plain(), tmp_path), "--to", fmt, "-o", str(engine)) == 0
    fits = fake_checkpoint(tmp_path / "fits", moe_layers=(0, 1, 2), num_hidden_layers=3)
    assert cli("--from", fmt, str(engine), "--model", str(fits), "-o", str(back)) == 0
    other = fake_checkpoint(tmp_path / "other", moe_layers=(0, 1), num_hidden_layers=2)
    capsys.readouterr()
    assert cli("--from", fmt, str(engine), "--model", str(other), "-o", str(tmp_path / "no.json")) == 2
    assert "placement is for 3 MoE layers x 8 experts, but the model" in capsys.readouterr().err
    assert cli("--from", fmt, str(engine), "--moe-layers", "0-2", "-o", str(tmp_path / "no.json")) == 2
    assert f"--moe-layers only applies to --from sglang ({fmt} files hold MoE layers only)" in capsys.readouterr().err


def test_from_sglang_map_without_rows_for_the_traces_moe_layers_says_so(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A map of 8 rows read with a trace whose MoE layers are decoder layers 2-9 (FLAME's): the
    error spoke of "MoE layer ids ... within [0, 8) decoder layers", ids the user never gave."""
    ids = np.argsort(np.random.default_rng(0).random((16, 8, 8)), axis=-1)[..., :2]
    trace = tmp_path / "t.npz"
    save_trace(make_trace(ids, num_experts=8, meta={"moe_layers": list(range(2, 10))}), trace)
    p = Placement(expert_to_gpu=random_balanced(8, 8, 4, seed=2), num_gpus=4, gpus_per_node=4)
    loc = tmp_path / "loc.json"
    assert cli(_save(p, tmp_path), "--to", "sglang", "-o", str(loc)) == 0  # no layer source: row i = MoE layer i
    capsys.readouterr()
    back = tmp_path / "back.json"
    assert cli("--from", "sglang", str(loc), "--gpus", "4", "--trace", str(trace), "-o", str(back)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "distinct and within" not in err, err
    assert (f"loc.json: 8 rows (SGLang writes one per decoder layer), but the MoE layers are decoder layers 2-9 "
            f"(from --trace {trace}: meta.moe_layers), and there is no row 8-9") in err
    assert "give --moe-layers 0-7" in err and not back.exists()
    assert cli("--from", "sglang", str(loc), "--gpus", "4", "--moe-layers", "0-7", "-o", str(back)) == 0
    np.testing.assert_array_equal(load_placement(back).expert_to_gpu, p.expert_to_gpu)


def test_vllm_ascend_map_is_read_in_list_order_as_vllm_ascend_does(tmp_path: Path) -> None:
    """vllm-ascend's expert_file_to_tensor indexes layer_list and device_list by position; the ids
    are labels. Before: both were sorted by id, so a map listing device 1 first read as another layout."""
    layers = [{"layer_id": 5, "device_count": 2, "device_list": [{"device_id": 1, "device_expert": [0, 1]},
                                                                 {"device_id": 0, "device_expert": [2, 3]}]},
              {"layer_id": 3, "device_count": 2, "device_list": [{"device_id": 0, "device_expert": [0, 2]},
                                                                 {"device_id": 1, "device_expert": [1, 3]}]}]
    path, out = tmp_path / "map.json", tmp_path / "p.json"
    path.write_text(json.dumps({"moe_layer_count": 2, "layer_list": layers}))
    assert cli("--from", "vllm-ascend", str(path), "-o", str(out)) == 0
    assert load_placement(out).expert_to_gpu.tolist() == [[0, 0, 1, 1], [0, 1, 0, 1]]


@pytest.mark.parametrize("fmt, key, value", [
    ("vllm", "ep_size", 2.9), ("vllm", "ep_size", True), ("vllm", "num_logical_experts", 4.7),
    ("vllm", "num_logical_experts", "8"), ("eplb", "num_gpus", 4.0), ("eplb", "gpus_per_node", "2"),
    ("vllm-ascend", "moe_layer_count", 3.0),
])
def test_integer_fields_of_engine_files_are_not_rounded(tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str,
                                                        key: str, value: object) -> None:
    """Before: int() made ep_size 2.9 two GPUs and true one; eplb took a non-integer num_gpus as absent."""
    engine = tmp_path / "engine.json"
    assert cli(_save(plain(), tmp_path), "--to", fmt, "-o", str(engine)) == 0
    doc = json.loads(engine.read_text())
    engine.write_text(json.dumps({**doc, key: value}))
    capsys.readouterr()
    assert cli("--from", fmt, str(engine), "-o", str(tmp_path / "back.json")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moeplace: error: {engine}: '{key}' must be an integer, got {value!r}", err
    assert not (tmp_path / "back.json").exists()


def test_vllm_ascend_expert_ids_must_be_integers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "map.json"
    devices = [{"device_id": 0, "device_expert": [0, 1.5]}, {"device_id": 1, "device_expert": [2, 3]}]
    path.write_text(json.dumps({"moe_layer_count": 1, "layer_list": [{"layer_id": 0, "device_list": devices}]}))
    assert cli("--from", "vllm-ascend", str(path), "-o", str(tmp_path / "p.json")) == 2
    assert "device_expert holds 1.5, not an expert id" in capsys.readouterr().err


# --- bad input found by the CLI audit: each was an internal error, an out-of-memory or accepted


def _one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeplace: error:") and "\n" not in err, err
    return err


def test_from_vllm_ragged_logical_to_physical_map_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3]], "ep_size": 2,
                                "logical_to_physical_map": [[[0], [1], [2, -1], [3]]]}))  # was ValueError in np.asarray
    err = _one_line_error(capsys, "--from", "vllm", str(path), "-o", str(tmp_path / "p.json"))
    assert "'logical_to_physical_map' does not list the slots of each expert" in err


@pytest.mark.parametrize("log2phy", [[[[0], [2], [1], [3]]], [[[0], [1]], [[2]]], "x", [[[0.0], [1.0], [2.0], [3.0]]]])
def test_from_eplb_checks_log2phy(tmp_path: Path, capsys: pytest.CaptureFixture[str], log2phy: object) -> None:
    path = tmp_path / "e.json"
    doc = {"phy2log": [[0, 1, 2, 3]], "num_gpus": 2}
    path.write_text(json.dumps({**doc, "log2phy": log2phy}))  # was ignored
    err = _one_line_error(capsys, "--from", "eplb", str(path), "-o", str(tmp_path / "p.json"))
    assert "'log2phy' does not list the slots of each expert in 'phy2log'" in err
    path.write_text(json.dumps({**doc, "log2phy": [[[0, -1], [1, -1], [2, -1], [3, -1]]]}))  # padding of any width
    assert cli("--from", "eplb", str(path), "-o", str(tmp_path / "p.json")) == 0


def test_layer_counts_are_checked_before_rows_are_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each was a table sized by the value: "out of memory", naming nothing."""
    src, out = _save(plain(), tmp_path), str(tmp_path / "s.json")
    huge = str(2**62)
    assert "--moe-layers '0,1,4611686018427387904': layer 4611686018427387904 is beyond 65535" in _one_line_error(
        capsys, src, "--to", "sglang", "--moe-layers", f"0,1,{huge}", "-o", out)
    assert "--moe-layers '0-4611686018427387904': layer 4611686018427387904 is beyond" in _one_line_error(
        capsys, src, "--to", "sglang", "--moe-layers", f"0-{huge}", "-o", out)
    assert f"--num-hidden-layers {huge}: more than the 65536 decoder layers" in _one_line_error(
        capsys, src, "--to", "sglang", "--num-hidden-layers", huge, "-o", out)
    assert "layer 5 is beyond the model's 5 decoder layers (--num-hidden-layers 5)" in _one_line_error(
        capsys, src, "--to", "sglang", "--moe-layers", "1,3,5", "--num-hidden-layers", "5", "-o", out)
    assert not Path(out).exists()
    assert cli(src, "--to", "sglang", "--moe-layers", "1,3,5", "--num-hidden-layers", "6", "-o", out) == 0


def test_trace_meta_layers_beyond_what_moeplace_handles_are_refused(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.npz"
    ids = np.tile(np.arange(2)[None, None, :], (4, 3, 1))
    save_trace(make_trace(ids, num_experts=8, meta={"moe_layers": [0, 1, 2**40]}), trace)
    err = _one_line_error(capsys, _save(plain(), tmp_path), "--to", "sglang", "--trace", str(trace),
                          "-o", str(tmp_path / "s.json"))
    assert "meta.moe_layers: MoE layer at decoder layer 1099511627776, beyond the 65536 decoder layers" in err


def test_moe_layers_out_of_order_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = _save(plain(), tmp_path), str(tmp_path / "s.json")
    assert "--moe-layers '7,6,5': list the layers in ascending order" in _one_line_error(
        capsys, src, "--to", "sglang", "--moe-layers", "7,6,5", "-o", out)  # was accepted: MoE layer 0 in row 7
    assert cli(src, "--to", "sglang", "--moe-layers", "5,6,7", "-o", out) == 0
    capsys.readouterr()
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3]] * 3}))
    assert "list the layers in ascending order" in _one_line_error(
        capsys, "--from", "sglang", str(path), "--gpus", "2", "--moe-layers", "2,0", "-o", str(tmp_path / "p.json"))


def test_from_sglang_huge_expert_id_is_refused_before_sizing_by_it(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 2**62]]}))  # was a [1, 2**62 + 1] table
    err = _one_line_error(capsys, "--from", "sglang", str(path), "--gpus", "2", "-o", str(tmp_path / "p.json"))
    assert "layer 0 slot 3 holds expert id 4611686018427387904: moeplace handles at most 65536 experts per layer" in err


def test_from_sglang_map_naming_few_experts_is_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            recwarn: pytest.WarningsRecorder) -> None:
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0] * 8] * 2}))  # all zero: 1 expert, 8 slots
    assert cli("--from", "sglang", str(path), "--gpus", "2", "-o", str(tmp_path / "p.json")) == 0
    assert ("loc.json: the map names only 1 logical expert (largest id + 1) for 8 physical slots per layer"
            in capsys.readouterr().err)
    recwarn.clear()
    placement_from_physical([[0, 1, 2, 3, 0, 1]], 2, 2, name="usual")  # fewer redundant slots than experts
    placement_from_physical([[0] * 4], 2, 2, 1, name="given")  # the count given, not inferred
    assert not [w for w in recwarn if "names only" in str(w.message)]


def test_wrong_log2phy_error_names_the_expected_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The one line says which table was expected: phy2log's layers and logical experts."""
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"phy2log": [[0, 1, 2, 0], [2, 1, 0, 1]], "num_gpus": 2, "log2phy": [[[0]]]}))
    err = _one_line_error(capsys, "--from", "eplb", str(path), "-o", str(tmp_path / "p.json"))
    assert "expected an integer [layers=2][experts=3][copies] table, -1 padded" in err


def test_from_eplb_log2phy_narrower_than_the_derived_one_is_read(tmp_path: Path) -> None:
    """6 slots for 4 experts gives moeplace's log2phy 3 columns; a file with 2 (every expert has
    at most 2 copies) lists the same slots, padded with -1 to its own width."""
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"phy2log": [[0, 1, 2, 3, 0, 1]], "num_gpus": 2,
                                "log2phy": [[[0, 4], [1, 5], [2, -1], [3, -1]]]}))
    assert cli("--from", "eplb", str(path), "-o", str(tmp_path / "p.json")) == 0
    p = load_placement(tmp_path / "p.json")
    assert p.expert_to_gpu.tolist() == [[0, 0, 0, 1]] and p.replicas == (((0, 1), (1, 1)),)


def test_sglang_map_checks_its_layer_arguments() -> None:
    """The Python API refuses what the CLI refuses: a depth beyond 65536 decoder layers (the
    table is sized by it), and MoE layer ids that are not one per placement layer."""
    p = plain()  # 3 MoE layers of 8 experts on 4 GPUs
    assert sglang_map(p, [0, 1, 65535], 1 << 16).shape == (1 << 16, 8)  # the limit itself is allowed
    with pytest.raises(PlacementError, match="65537 decoder layers: more than the 65536 moeplace handles"):
        sglang_map(p, [0, 1, 2], (1 << 16) + 1)
    with pytest.raises(PlacementError, match="2 MoE layer ids given for a placement of 3 MoE layers"):
        sglang_map(p, [0, 1], 4)
    with pytest.raises(PlacementError, match=r"distinct and within \[0, 4\) decoder layers"):
        sglang_map(p, [0, 1, 4], 4)
    with pytest.raises(PlacementError, match="distinct"):
        sglang_map(p, [0, 0, 1], 4)  # unchecked, layer 0's row would silently hold MoE layer 1's slots
    with pytest.raises(PlacementError, match="distinct and within"):
        sglang_map(p, [-1, 0, 1], 4)  # unchecked, numpy would write the last row
    with pytest.raises(PlacementError, match="^2 decoder layers cannot hold the placement's 3 MoE layers$"):
        sglang_map(p, None, 2)  # no ids given: the error used to be about ids
    assert sglang_map(p, None, 3).shape == (3, 8)


def test_from_vllm_state_with_only_the_physical_map(tmp_path: Path) -> None:
    """The derived arrays and counts are optional: checked when present, not required."""
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3, 1, 0]], "ep_size": 2}))
    assert cli("--from", "vllm", str(path), "-o", str(tmp_path / "p.json")) == 0
    p = load_placement(tmp_path / "p.json")  # slots 0-2 on GPU 0, 3-5 on GPU 1
    assert p.expert_to_gpu.tolist() == [[0, 0, 0, 1]] and p.replicas == (((1, 1), (0, 1)),)


@pytest.mark.parametrize("gpus, per_node", [(0, 1), (4, 0), (4, 3)])
def test_placement_from_physical_refuses_bad_gpu_counts(gpus: int, per_node: int) -> None:
    with pytest.raises(PlacementError, match=f"--gpus {gpus} must be >= 1 and a multiple of --gpus-per-node {per_node}"):
        placement_from_physical([[0, 1, 2, 3]], num_gpus=gpus, gpus_per_node=per_node)


def test_placement_from_physical_on_one_gpu_and_one_gpu_per_node() -> None:
    assert placement_from_physical([[0, 1, 2, 3]], num_gpus=1, gpus_per_node=1).expert_to_gpu.tolist() == [[0] * 4]
    p = placement_from_physical([[0, 1, 2, 3]], num_gpus=2, gpus_per_node=1)
    assert p.expert_to_gpu.tolist() == [[0, 0, 1, 1]] and p.gpus_per_node == 1


def test_placement_from_physical_expert_count_limit_is_exact() -> None:
    """Ids are < 65536 and a layer has at most 65536 experts: id 65536 is refused by name, a
    count of 65536 is not (a map that then lacks most experts is refused for that instead)."""
    with pytest.raises(PlacementError, match="layer 0 slot 1 holds expert id 65536: moeplace handles at most 65536"):
        placement_from_physical([[0, 65536]], num_gpus=2, gpus_per_node=2)
    with pytest.raises(PlacementError, match="65537 experts: moeplace handles at most 65536"):
        placement_from_physical([[0, 1]], num_gpus=2, gpus_per_node=2, num_experts=65537)
    with pytest.raises(PlacementError, match="layer 0 has no physical copy of expert 2$"):
        placement_from_physical([[0, 1]], num_gpus=2, gpus_per_node=2, num_experts=65536)


def test_placement_from_physical_names_a_negative_id() -> None:
    """numpy would read id -1 as the last expert: refused, naming its slot."""
    with pytest.raises(PlacementError, match=r"layer 0 slot 1 holds expert id -1, outside \[0, 3\)"):
        placement_from_physical([[0, -1, 1, 2]], num_gpus=2, gpus_per_node=2)


def test_map_with_as_many_redundant_slots_as_experts_is_warned_about() -> None:
    """Engines add fewer redundant slots than logical experts: 2 x E slots (E inferred) is
    suspect, one slot fewer is not."""
    with pytest.warns(MoeplaceWarning, match="names only 2 logical experts"):
        placement_from_physical([[0, 1, 0, 1]], num_gpus=2, gpus_per_node=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert placement_from_physical([[0, 1, 0]], num_gpus=3, gpus_per_node=3).replicas == (((0, 2),),)


# --- engine files found by the mutation pass on the export readers


def test_from_eplb_gpu_count_is_checked_against_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One GPU is a valid file; 0 is refused by the file's own field name, even when 0 is a
    multiple of gpus_per_node (0 % 1 == 0 would let it through to a message naming --gpus)."""
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"phy2log": [[0, 1]], "num_gpus": 1, "gpus_per_node": 1}))
    assert cli("--from", "eplb", str(path), "-o", str(tmp_path / "p.json")) == 0
    assert load_placement(tmp_path / "p.json").expert_to_gpu.tolist() == [[0, 0]]
    capsys.readouterr()
    path.write_text(json.dumps({"phy2log": [[0, 1]], "num_gpus": 0, "gpus_per_node": 1}))
    err = _one_line_error(capsys, "--from", "eplb", str(path), "-o", str(tmp_path / "q.json"))
    assert err.endswith(f"{path}: num_gpus = 0 must be >= 1"), err
    path.write_text(json.dumps({"phy2log": [[0, 1]], "num_gpus": 2, "gpus_per_node": 0}))  # not a modulo by zero
    err = _one_line_error(capsys, "--from", "eplb", str(path), "-o", str(tmp_path / "q.json"))
    assert err.endswith("num_gpus = 2 must be a multiple of gpus_per_node = 0 (GPUs per node)"), err
    assert not (tmp_path / "q.json").exists()


def test_from_eplb_logcnt_narrower_than_the_ids_names_logcnt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """logcnt [layers, logical] gives the expert count: an id beyond it is named with its source."""
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"phy2log": [[0, 1, 2, 3]], "num_gpus": 2, "logcnt": [[1, 1, 1]]}))
    err = _one_line_error(capsys, "--from", "eplb", str(path), "-o", str(tmp_path / "p.json"))
    assert "layer 0 slot 3 holds expert id 3, outside [0, 3) (the width of logcnt)" in err, err


def test_from_vllm_ascend_empty_layer_list_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"moe_layer_count": 0, "layer_list": []}))  # was "different device counts []"
    err = _one_line_error(capsys, "--from", "vllm-ascend", str(path), "--gpus", "1", "-o", str(tmp_path / "p.json"))
    assert "layer_list is empty" in err, err


@pytest.mark.parametrize("value, message", [
    ("grad", "must be a non-empty rectangular [layers][experts] table of integers"),  # float: detached, then refused
    ("bf16", "must be a rectangular [layers][physical experts] table of integers (Got unsupported ScalarType BFloat16)"),
    ("sparse", "must be a rectangular [layers][physical experts] table of integers"),
], ids=["requires_grad", "bfloat16", "sparse"])
def test_from_sglang_pt_tensors_numpy_cannot_read_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             value: str, message: str) -> None:
    """Each was an internal error from tensor.numpy() (RuntimeError / TypeError)."""
    torch = pytest.importorskip("torch")
    tensors = {"grad": lambda: torch.tensor([[0.0, 1.0]], requires_grad=True),
               "bf16": lambda: torch.tensor([[0, 1]], dtype=torch.bfloat16),
               "sparse": lambda: torch.tensor([[0, 1]]).to_sparse()}
    path = tmp_path / "loc.pt"
    torch.save({"physical_to_logical_map": tensors[value]()}, path)
    err = _one_line_error(capsys, "--from", "sglang", str(path), "--gpus", "1", "-o", str(tmp_path / "p.json"))
    assert message in err, err
    assert not (tmp_path / "p.json").exists()


def test_from_sglang_pt_with_non_string_keys_lists_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "loc.pt"
    torch.save({1: torch.tensor([0]), "a": torch.tensor([1])}, path)  # sorted() of int and str keys was a TypeError
    err = _one_line_error(capsys, "--from", "sglang", str(path), "--gpus", "1", "-o", str(tmp_path / "p.json"))
    assert "no 'physical_to_logical_map' (keys: ['1', 'a'])" in err, err


def test_from_eplb_without_phy2log_lists_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"num_gpus": 2, "logcnt": [[1, 1]]}))
    err = _one_line_error(capsys, "--from", "eplb", str(path), "-o", str(tmp_path / "p.json"))
    assert err.endswith(f"{path}: no 'phy2log' array (keys: ['logcnt', 'num_gpus'])"), err


@pytest.mark.parametrize("name", ["eplb.npz", "EPLB.NPZ"])  # an upper-case name got JSON inside
def test_from_eplb_npz_round_trip_reads_the_gpu_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       name: str) -> None:
    """An .npz stores num_gpus / gpus_per_node as 0-d integer arrays: read back as the counts."""
    out, back = tmp_path / name, tmp_path / "back.json"
    assert cli(_save(replicated(), tmp_path), "--to", "eplb", "-o", str(out)) == 0
    with np.load(out) as z:
        assert z["num_gpus"].shape == () and int(z["num_gpus"]) == 4 and int(z["gpus_per_node"]) == 2
    assert cli("--from", "eplb", str(out), "-o", str(back)) == 0
    p = load_placement(back)
    assert (p.num_gpus, p.gpus_per_node) == (4, 2) and slots_by_gpu(p) == slots_by_gpu(replicated())


@pytest.mark.parametrize("phy2log", [[[0, 1.5]], [[0, 1], [2]], "x", [[]], [[0, True]]])
def test_from_eplb_phy2log_that_is_not_an_integer_table_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  phy2log: object) -> None:
    """1.5 would be cut to 1 and true read as 1; a ragged or string table was an internal error."""
    path = tmp_path / "e.json"
    path.write_text(json.dumps({"phy2log": phy2log, "num_gpus": 1}))
    err = _one_line_error(capsys, "--from", "eplb", str(path), "-o", str(tmp_path / "p.json"))
    assert "physical_to_logical map must be a non-empty rectangular [layers][experts] table of integers" in err, err


def test_from_sglang_moe_layers_beyond_the_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Row 2 of a 2-row map is missing (not "ids out of range"); with the layers from --moe-layers
    the map holding only the MoE layers is no explanation, so that hint is left out."""
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, 3]] * 2}))
    err = _one_line_error(capsys, "--from", "sglang", str(path), "--gpus", "2", "--moe-layers", "0,2",
                          "-o", str(tmp_path / "p.json"))
    assert "2 rows (SGLang writes one per decoder layer), but the MoE layers are decoder layers 0, 2 (from --moe-layers 0,2)" in err, err
    assert err.endswith("and there is no row 2: a map of another model?"), err


def test_from_sglang_map_that_is_not_a_table_with_moe_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": 5}))  # rows were counted from its shape: IndexError
    err = _one_line_error(capsys, "--from", "sglang", str(path), "--gpus", "2", "--moe-layers", "0",
                          "-o", str(tmp_path / "p.json"))
    assert err.endswith("'physical_to_logical_map' must be a [layers][physical experts] table"), err


def test_from_sglang_map_holding_true_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """numpy reads [[0, true]] as the ids [[0, 1]]: a JSON boolean is not an expert id."""
    path = tmp_path / "loc.json"
    path.write_text(json.dumps({"physical_to_logical_map": [[0, True]]}))
    err = _one_line_error(capsys, "--from", "sglang", str(path), "--gpus", "1", "-o", str(tmp_path / "p.json"))
    assert "'physical_to_logical_map' must be a table of integers (it holds true/false)" in err, err


def test_from_sglang_pt_holding_a_bare_tensor_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch = pytest.importorskip("torch")
    path = tmp_path / "loc.pt"
    torch.save(torch.tensor([[0, 1]]), path)  # the map itself, not SGLang's {"physical_to_logical_map": ...}
    err = _one_line_error(capsys, "--from", "sglang", str(path), "--gpus", "1", "-o", str(tmp_path / "p.json"))
    assert err.endswith(f"{path}: expected a dict with 'physical_to_logical_map'"), err


@pytest.mark.parametrize("doc, message", [
    ({"layer_list": {"0": {"device_list": []}}}, "layer_list is dict, not a list"),
    ({"layer_list": [{"device_list": "0"}]}, "device_list is str, not a list"),
])
def test_vllm_ascend_map_lists_must_be_lists(tmp_path: Path, capsys: pytest.CaptureFixture[str], doc: object,
                                            message: str) -> None:
    """Indexing a dict or string in their place failed somewhere inside: the error names the field."""
    path = tmp_path / "map.json"
    path.write_text(json.dumps(doc))
    err = _one_line_error(capsys, "--from", "vllm-ascend", str(path), "--gpus", "1", "-o", str(tmp_path / "p.json"))
    assert "malformed vllm-ascend expert map" in err and message in err, err


def test_vllm_ascend_map_device_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Layers with different device counts are named as such; a layer with no devices is a map for 0 GPUs."""
    path, out = tmp_path / "map.json", str(tmp_path / "p.json")
    two = {"device_list": [{"device_expert": [0]}, {"device_expert": [1]}]}
    one = {"device_list": [{"device_expert": [0]}]}
    path.write_text(json.dumps({"layer_list": [two, one]}))
    assert "layers list different device counts [1, 2]" in _one_line_error(
        capsys, "--from", "vllm-ascend", str(path), "-o", out)
    path.write_text(json.dumps({"layer_list": [{"device_list": []}]}))
    assert _one_line_error(capsys, "--from", "vllm-ascend", str(path), "--gpus", "1", "-o", out).endswith(
        "the file is for 0 GPUs but --gpus is 1")


def test_a_placement_fitted_on_another_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model or trace of the placement's shape but another model_type, or its MoE layers at other
    decoder layers than the fit trace recorded: the map would put other experts on each GPU."""
    p = replace(plain(), trace_model={"model": "hub/qwen", "model_type": "qwen3_moe", "moe_layers": [1, 2, 3]})
    src, out = _save(p, tmp_path), tmp_path / "loc.json"
    model = fake_checkpoint(tmp_path / "ds", moe_layers=(1, 2, 3), num_hidden_layers=4)
    assert cli(src, "--to", "sglang", "--model", str(model), "-o", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"fitted on the routing of a qwen3_moe model (hub/qwen), but the model {model} is a "
                        "deepseek_v3 model: its expert ids number other experts; solve a placement on a trace of it")
    ids = np.argsort(np.random.default_rng(1).random((16, 3, 8)), axis=-1)[..., :2]
    save_trace(make_trace(ids, num_experts=8, meta={"moe_layers": [0, 1, 2], "num_decoder_layers": 4,
                                                    "model_type": "qwen3_moe"}), tmp_path / "t.npz")
    assert cli(src, "--to", "vllm", "--trace", str(tmp_path / "t.npz"), "-o", str(out)) == 2
    assert "MoE layers at decoder layers [1, 2, 3], but the trace" in capsys.readouterr().err
    assert not out.exists()
    same = fake_checkpoint(tmp_path / "qwen", moe_layers=(1, 2, 3), num_hidden_layers=4, model_type="qwen3_moe")
    assert cli(src, "--to", "sglang", "--model", str(same), "-o", str(out)) == 0


def test_vllm_export_of_replicas_does_not_send_the_user_to_permute_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """permute-checkpoint refuses copies, so the vLLM note names it only for a placement without them."""
    assert cli(_save(replicated(), tmp_path), "--to", "vllm", "-o", str(tmp_path / "v.json")) == 0
    out = capsys.readouterr().out
    assert "`moeplace permute-checkpoint` cannot make this placement's copies" in out
    plain = Placement(expert_to_gpu=random_balanced(2, 8, 4, seed=5), num_gpus=4, gpus_per_node=4)
    assert cli(_save(plain, tmp_path), "--to", "vllm", "-o", str(tmp_path / "v.json")) == 0
    assert "see docs/engines/vllm.md (moeplace permute-checkpoint)" in capsys.readouterr().out


def test_sglang_read_without_layer_source_names_likely_dense_rows(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # a map written for a model whose decoder layers 0-1 are dense: read back without saying which
    # rows are MoE, every row counts as one, and the note names the default-layout prefix
    p = plain()  # a random layout: no MoE layer in the default one
    out, back = tmp_path / "loc.json", str(tmp_path / "back.json")
    assert cli(_save(p, tmp_path), "--to", "sglang", "--moe-layers", "2-4", "-o", str(out)) == 0
    capsys.readouterr()
    assert cli("--from", "sglang", str(out), "--gpus", str(p.num_gpus), "-o", back) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert len(notes) == 1 and "each of the map's 5 rows taken as an MoE layer" in notes[0]
    assert "rows 0-1 hold the default layout" in notes[0] and "give --moe-layers 2-4" in notes[0]
    assert load_placement(back).num_layers == 5
    assert cli("--from", "sglang", str(out), "--gpus", str(p.num_gpus), "--moe-layers", "2-4", "-o", back) == 0
    assert "note:" not in capsys.readouterr().err and load_placement(back).num_layers == 3
    # a map of MoE rows only: the note says what it assumed, and names no dense rows
    assert cli(_save(p, tmp_path), "--to", "sglang", "--moe-layers", "0-2", "-o", str(out)) == 0
    capsys.readouterr()
    assert cli("--from", "sglang", str(out), "--gpus", str(p.num_gpus), "-o", back) == 0
    err = capsys.readouterr().err
    assert "3 rows taken as an MoE layer" in err and "default layout" not in err


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "expert_location.json"])
def test_an_output_inside_the_model_directory_is_refused_and_the_checkpoint_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    """`--model CKPT -o CKPT/config.json` replaced the checkpoint's config (or weights) with the
    engine map; any file written there becomes part of the checkpoint, as for `moeplace trace -o`."""
    model = fake_checkpoint(tmp_path / "ckpt", (0, 1, 2), 3)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    src = _save(plain(), tmp_path)
    assert cli(src, "--to", "sglang", "-o", str(tmp_path / "map.json")) == 0
    capsys.readouterr()
    for argv in ([src, "--to", "sglang"], [src, "--to", "eplb"],
                 ["--from", "sglang", str(tmp_path / "map.json"), "--gpus", "4"]):
        assert cli(*argv, "--model", str(model), "-o", str(model / name)) == 2, argv
        assert capsys.readouterr().err.strip().splitlines() == [
            f"moeplace: error: -o {model / name}: is inside the --model directory {model} (it would replace or add to "
            "the files this run reads); write the output elsewhere"]
        assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert cli(src, "--to", "sglang", "--model", str(model), "-o", str(tmp_path / "loc.json")) == 0  # beside it: fine


def test_eplb_to_a_npy_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """JSON under a .npy name: np.load and every moeplace reader take a .npy for one array."""
    src = _save(plain(), tmp_path)
    assert cli(src, "--to", "eplb", "-o", str(tmp_path / "eplb.npy")) == 2
    assert capsys.readouterr().err.strip() == (
        f"moeplace: error: -o {tmp_path / 'eplb.npy'}: --to eplb writes JSON, or an .npz archive of its arrays when -o "
        "ends in .npz; a .npy file holds one array: name it .npz or .json")
    assert not (tmp_path / "eplb.npy").exists()


def test_a_vllm_state_without_an_expert_count_names_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The count is the largest id + 1 there; "(num_logical_experts = None)" named a field the file lacks."""
    (tmp_path / "state.json").write_text(json.dumps({"physical_to_logical_map": [[0, 1, 2, -1]]}))
    assert cli("--from", "vllm", str(tmp_path / "state.json"), "--gpus", "2", "-o", str(tmp_path / "p.json")) == 2
    assert capsys.readouterr().err.strip() == (f"moeplace: error: {tmp_path / 'state.json'}: layer 0 slot 3 holds "
                                               "expert id -1, outside [0, 3)")
