"""`moeplace eval` and `moeplace check` audit: refusals from the trace's headers before its tokens
are read, ratios to a contiguous layout that has none of a metric, check names, and path shares
between traces of another top-k."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import ROOT
from moeplace.cli import run
from moeplace.eval import cli as eval_cli
from moeplace.eval.check import read_checks
from moeplace.errors import MoeplaceError
from moeplace.placement import Placement
from moeplace.solve.baselines import contiguous
from moeplace.trace.format import load_trace, make_trace, save_trace

CLUSTER_1X8 = ROOT / "configs" / "cluster" / "h100-1x8-nvlink.yaml"
FLAME_MODEL = ROOT / "configs" / "model" / "flame-moe-290m.yaml"


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    """120 tokens x 3 layers x top-2 over 8 experts, 12 sequences of 10."""
    rng = np.random.default_rng(7)
    top1 = rng.integers(0, 8, size=(120, 3))
    second = (top1 + 1 + rng.integers(0, 7, size=top1.shape)) % 8
    path = tmp_path / "trace.npz"
    save_trace(make_trace(np.stack([top1, second], axis=-1), num_experts=8, sequence_ids=np.arange(120) // 10,
                          positions=np.arange(120) % 10), path)
    return path


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The traces eval and check read whole (moeplace.eval.cli.load_trace), in order."""
    calls: list[Path] = []

    def counted(path: Any) -> Any:
        calls.append(Path(path))
        return load_trace(path)

    monkeypatch.setattr(eval_cli, "load_trace", counted)
    return calls


def write_yaml(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_another_models_placement_is_refused_from_the_headers_before_the_tokens_are_read(
        tmp_path: Path, trace_path: Path, reads: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    """The trace's headers state its layers and experts: a placement, a check's baseline, a --model
    or a --cluster of another model or cluster is refused before its tokens are read (seconds on a
    large trace), with the message the check after reading gives."""
    Placement(contiguous(3, 16, 4), 4, 4).save(tmp_path / "other.json")
    Placement(contiguous(3, 8, 4), 4, 4).save(tmp_path / "p.json")
    assert run(["eval", str(tmp_path / "other.json"), str(trace_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert err == (f"moeplace: error: {tmp_path / 'other.json'} does not fit {trace_path}: placement is for 3 MoE "
                   "layers x 16 experts, but the trace has 3 x 8\n")
    # check: the placement's line, and a baseline of another shape, neither reading the trace
    cfg = write_yaml(tmp_path / "ci.yaml", {"defaults": {"trace": "trace.npz"}, "checks": [
        {"name": "other", "placement": "other.json", "max_cross_gpu": 1},
        {"name": "base", "placement": "p.json", "baseline": "other.json", "max_cross_gpu_vs_baseline": 1}]})
    assert run(["check", str(cfg)]) == 2
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ERROR other: {tmp_path / 'other.json'} does not fit {trace_path}: placement is for 3 MoE layers "
                   "x 16 experts, but the trace has 3 x 8",
                   f"ERROR base: baseline {tmp_path / 'other.json'} is for 3 MoE layers x 16 experts, but "
                   f"{tmp_path / 'p.json'} for 3 x 8: a baseline is a placement of the same model"]
    # a cluster config of another GPU count, and --model of another expert count
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "--cluster", str(CLUSTER_1X8),
                "--model-config", str(FLAME_MODEL)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moeplace: error: cluster config {CLUSTER_1X8} has 1 node(s) x 8 GPUs, but the placement "
                          "uses 4 GPUs with 4 per node") and err.count("\n") == 1  # no warning before it
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "hidden_size": 64, "num_local_experts": 16, "num_experts_per_tok": 2,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}))
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "--model", str(model)]) == 2
    assert capsys.readouterr().err == (f"moeplace: error: --model {model} is not the model of {trace_path}: 16 experts "
                                       "top-2, the trace 8 experts top-2\n")
    assert reads == []
    # the same placement on a fitting trace is read once
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "--json"]) == 0
    assert reads == [trace_path] and json.loads(capsys.readouterr().out)["num_experts"] == 8


def test_a_trace_that_stores_no_expert_count_is_checked_once_read(tmp_path: Path, trace_path: Path,
                                                                  reads: list[Path],
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An ExFlow .npy states no expert count (inferred from the ids): the same refusal, after reading."""
    np.save(tmp_path / "t.npy", load_trace(trace_path).topk_ids[:, :, 0])  # ids 0..7
    Placement(contiguous(3, 16, 4), 4, 4).save(tmp_path / "other.json")
    assert run(["eval", str(tmp_path / "other.json"), str(tmp_path / "t.npy")]) == 2
    assert capsys.readouterr().err == (f"moeplace: error: {tmp_path / 'other.json'} does not fit {tmp_path / 't.npy'}: "
                                       "placement is for 3 MoE layers x 16 experts, but the trace has 3 x 8\n")
    assert reads == [tmp_path / "t.npy"]


def test_traffic_on_a_trace_without_sequences_is_refused_before_the_replay(tmp_path: Path, trace_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """--hidden-size needs each token's sequence (its home rank): said once the trace is read, naming
    the option and the file, not after the placement's replay."""
    np.save(tmp_path / "t.npy", load_trace(trace_path).topk_ids[:, :, 0])
    Placement(contiguous(3, 8, 4), 4, 4).save(tmp_path / "p.json")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("replayed")

    monkeypatch.setattr(eval_cli, "build_report", never)
    assert run(["eval", str(tmp_path / "p.json"), str(tmp_path / "t.npy"), "--hidden-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeplace: error: --hidden-size: the traffic prediction needs the sequence of each token")
    assert f"{tmp_path / 't.npy'} has no sequence_ids" in err and err.count("\n") == 1


def stay_trace(path: Path, layers: int = 4) -> Path:
    """100 tokens whose top-1 expert is the same at every layer (second choice: the next expert)."""
    first = np.random.default_rng(0).integers(0, 8, size=100)
    top1 = np.repeat(first[:, None], layers, axis=1)
    save_trace(make_trace(np.stack([top1, (top1 + 1) % 8], axis=-1), num_experts=8), path)
    return path


def test_a_ratio_to_a_contiguous_layout_without_that_traffic_holds_at_zero_and_fails_above(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Where contiguous has 0 of a metric (one GPU, one MoE layer, tokens that keep their expert's
    GPU) there is no ratio; the check ran all the same: n/a and held when the placement has 0 too,
    failed when it has any, never "could not run"."""
    stay_trace(tmp_path / "stay.npz")
    stay_trace(tmp_path / "one_layer.npz", layers=1)
    Placement(contiguous(4, 8, 4), 4, 2).save(tmp_path / "cont.json")
    moved = contiguous(4, 8, 4)
    moved[1] = (moved[1] + 1) % 4  # layer 1 elsewhere: every top-1 transition 0 -> 1 and 1 -> 2 crosses
    Placement(moved, 4, 2).save(tmp_path / "moved.json")
    Placement(np.zeros((4, 8), dtype=np.int64), 1, 1).save(tmp_path / "one_gpu.json")
    Placement(contiguous(1, 8, 4), 4, 2).save(tmp_path / "one_layer.json")
    cfg = write_yaml(tmp_path / "ci.yaml", {"defaults": {"trace": "stay.npz", "max_cross_gpu_vs_contiguous": 1.0},
                                            "checks": [
        {"name": "same", "placement": "cont.json", "max_cross_node_vs_contiguous": 1.0},
        {"name": "moved", "placement": "moved.json"},
        {"name": "one-gpu", "placement": "one_gpu.json", "max_dest_nodes_vs_contiguous": 1.0},
        {"name": "one-layer", "placement": "one_layer.json", "trace": "one_layer.npz"}]})
    assert run(["check", str(cfg)]) == 1
    out = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("      tokens:")]
    assert out == [
        "PASS  same (100 all tokens): cross_gpu_top1/contiguous n/a (0 here and in contiguous), "
        "cross_node_top1/contiguous n/a (0 here and in contiguous)",
        "FAIL  moved (100 all tokens): cross_gpu_top1/contiguous n/a: 0.6667 where contiguous has 0, worse at any ratio",
        "PASS  one-gpu (100 all tokens): cross_gpu_top1/contiguous n/a (0 here and in contiguous), "
        "dest_nodes_topk/contiguous n/a (one node)",
        "PASS  one-layer (100 all tokens): cross_gpu_top1/contiguous n/a (0 here and in contiguous)"]
    assert run(["check", str(cfg), "--json", "--only", "moved"]) == 1
    (t,) = json.loads(capsys.readouterr().out)["checks"][0]["thresholds"]
    assert t == {"threshold": "max_cross_gpu_vs_contiguous", "metric": "cross_gpu_top1/contiguous", "limit": 1.0,
                 "value": None, "note": "n/a: 0.6667 where contiguous has 0, worse at any ratio", "passed": False}


@pytest.mark.parametrize("name", ["", "   ", "ok\nPASS  forged (1 held-out tokens): cross_gpu_top1 0 <= 1", "a\r",
                                  "a\u2028b"])
def test_a_check_name_is_one_line_of_text(tmp_path: Path, name: str) -> None:
    """A check's name starts its PASS/FAIL line: empty, blank or with a line break it would print a
    nameless line or forge another check's."""
    cfg = write_yaml(tmp_path / "ci.yaml", {"checks": [{"name": name, "placement": "p.json", "trace": "t.npz",
                                                        "max_cross_gpu": 1}]})
    with pytest.raises(MoeplaceError, match=r"ci\.yaml: check 1: name must be one line of text, not empty, got "):
        read_checks(cfg)


def test_a_top1_copy_of_the_fit_trace_has_no_path_share(tmp_path: Path, trace_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A path is the k experts of every layer: the ExFlow .npy (top-1) of a top-2 fit trace repeats
    none of the fit tokens' paths though half its tokens are fit tokens; the report says the share
    cannot be known rather than "0% repeat a fit token's routing path"."""
    placement = tmp_path / "p.json"
    assert run(["solve", str(trace_path), "--gpus", "4", "--train-fraction", "0.5", "-q", "-o", str(placement)]) == 0
    np.save(tmp_path / "t.npy", load_trace(trace_path).topk_ids[:, :, 0])
    capsys.readouterr()
    assert run(["eval", str(placement), str(tmp_path / "t.npy"), "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert tokens["fit_path_share"] is None and "0% of them repeat" not in tokens["note"]
    assert tokens["note"].endswith("; the placement was fitted on top-2 routing and this trace is top-1: its tokens' "
                                   "paths cannot be compared with the fit tokens'")
    # a top-2 trace of other tokens is still compared
    other = load_trace(trace_path).select_tokens(np.arange(60))
    save_trace(other, tmp_path / "part.npz")
    assert run(["eval", str(placement), str(tmp_path / "part.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]["fit_path_share"] is not None
