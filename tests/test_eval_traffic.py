"""`moeplace eval --model/--hidden-size`: the predicted Alltoall bytes equal what `moeplace serve`
measures for the routing it recorded (issue 4: within 1%), and bad traffic options fail cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.models.tiny import build_tiny_model
from moeplace.placement import Placement
from moeplace.solve.baselines import random_balanced
from moeplace.trace.format import make_trace, save_trace


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny Qwen3-MoE: top-2 over 8 experts, 3 decoder layers (2 MoE), hidden 32."""
    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("eval-traffic") / "qwen3", num_experts=8, top_k=2,
                            num_layers=3, seed=2)


def eval_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    capsys.readouterr()
    assert run(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_predicts_measured_serve_bytes(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    placement = tmp_path / "p.json"
    Placement(random_balanced(2, 8, 2, 3), num_gpus=2, gpus_per_node=2).save(placement)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ([5, 6, 7, 8, 9], [10, 11, 12], [40] * 7)) + "\n")
    stats, routing = tmp_path / "stats.json", tmp_path / "routing.npz"
    cmd = [sys.executable, "-m", "moeplace", "serve", "--nproc-per-node", "2", "--device", "cpu", "--model", str(model), "--placement", str(placement), "--prompts", str(prompts),
           "--out", str(tmp_path / "out.jsonl"), "--stats-out", str(stats), "--routing-out", str(routing),
           "--max-new-tokens", "8", "--ignore-eos", "--timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(stats.read_text())
    assert measured["mode"] == "coherent" and measured["dtype"] == "float32"

    report = eval_json(capsys, str(placement), str(routing), "--model", str(model), "--dtype", "fp32")
    assert report["traffic"]["hidden_size"] == 32 and report["traffic"]["element_bytes"] == 4
    predicted = report["layouts"]["placement"]["traffic"]["coherent"]
    decode = measured["decode"]
    assert decode["alltoall_bytes"] > 0
    assert abs(predicted["alltoall_bytes"] - decode["alltoall_bytes"]) <= 0.01 * decode["alltoall_bytes"]
    assert predicted["dispatch_rows"] == decode["dispatch"]["rows"]
    assert predicted["combine_rows"] == decode["combine"]["rows"]
    assert predicted["cross_rank_rows_per_layer"] == decode["cross_rank_rows_per_layer"]
    assert predicted["alltoalls_per_layer"] == decode["alltoalls_per_layer_step"]
    # K/V replication: every decoded token's entries of all 3 layers go to the other rank
    assert predicted["kv_sync_bytes_per_token"] * predicted["tokens"] == decode["kv_sync"]["bytes"]

    # --hidden-size gives the same payload prediction; the ratios are against standard + contiguous
    by_size = eval_json(capsys, str(placement), str(routing), "--hidden-size", "32", "--dtype", "fp32")
    assert by_size["layouts"]["placement"]["traffic"]["coherent"]["alltoall_bytes"] == predicted["alltoall_bytes"]
    assert "kv_sync_bytes_per_token" not in by_size["layouts"]["placement"]["traffic"]["coherent"]
    base = by_size["layouts"]["contiguous"]["traffic"]["standard"]
    assert base["vs_standard_contiguous"] == 1.0
    assert predicted["vs_standard_contiguous"] == pytest.approx(
        predicted["alltoall_bytes_per_token"] / base["alltoall_bytes_per_token"])


@pytest.fixture
def routing_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 2-GPU placement, a routing trace with sequences and one without."""
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(2)]) for _ in range(12)])
    placement = tmp_path / "p.json"
    Placement(random_balanced(2, 8, 2, 1), num_gpus=2, gpus_per_node=2).save(placement)
    routed, bare = tmp_path / "routing.npz", tmp_path / "bare.npz"
    save_trace(make_trace(ids, None, 8, sequence_ids=np.repeat([0, 1, 2], 4), positions=np.tile(np.arange(4), 3)),
               routed)
    save_trace(make_trace(ids, None, 8), bare)
    return placement, routed, bare


def test_table_shows_modes_and_ratio(routing_files: tuple[Path, Path, Path],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, _ = routing_files
    assert run(["eval", str(placement), str(routed), "--hidden-size", "64", "--runtime-mode", "standard"]) == 0
    out = capsys.readouterr().out
    assert "predicted decode Alltoall traffic" in out and "x standard+contiguous" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:2] in (["placement", "standard"],
                                                                              ["contiguous", "standard"])]
    assert len(rows) == 2 and all(r[1] == "standard" for r in rows)
    assert not any(line.split()[:1] == ["placement"] and "coherent" in line for line in out.splitlines())
    assert rows[1][6] == "1.00x"  # contiguous + standard is the reference


def test_without_options_the_report_is_unchanged(routing_files: tuple[Path, Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, _ = routing_files
    report = eval_json(capsys, str(placement), str(routed))
    assert "traffic" not in report and all("traffic" not in m for m in report["layouts"].values())
    assert run(["eval", str(placement), str(routed)]) == 0
    assert "predicted" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--dtype", "fp32"], "need --hidden-size or --model"),
    (["--hidden-size", "8", "--model", "."], "not both"),
    (["--model", "no-such-dir"], "cannot read config.json"),
    (["--hidden-size", "0"], "Invalid value"),
])
def test_bad_traffic_options(routing_files: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str],
                             extra: list[str], message: str) -> None:
    placement, routed, _ = routing_files
    assert run(["eval", str(placement), str(routed), *extra]) == 2
    assert message in capsys.readouterr().err


def test_trace_without_sequences_or_for_another_model(routing_files: tuple[Path, Path, Path], model: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    placement, routed, bare = routing_files
    assert run(["eval", str(placement), str(bare), "--hidden-size", "16"]) == 2
    assert "sequence_ids" in capsys.readouterr().err
    config = tmp_path / "other" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({**json.loads((model / "config.json").read_text()), "num_local_experts": 16}))
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "not the model of" in capsys.readouterr().err
    config.write_text(json.dumps({**json.loads((model / "config.json").read_text()), "num_experts_per_tok": 1}))
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "8 experts top-1, the trace 8 experts top-2" in capsys.readouterr().err
    config.write_text("{not json")
    assert run(["eval", str(placement), str(routed), "--model", str(config.parent)]) == 2
    assert "config.json is not valid JSON" in capsys.readouterr().err
