"""`moeplace eval PLACEMENT TRACE --baseline OTHER.json`: another placement (the one deployed)
scored on exactly the placement's tokens, as a table row, ratios and --max-*-vs-baseline gates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from moeplace.cli import run
from moeplace.eval.metrics import imbalance
from moeplace.placement import Placement
from moeplace.solve.balance import expected_gpu_loads
from moeplace.solve.baselines import contiguous
from moeplace.trace.format import ExpertLoads, Trace, load_trace, make_trace, save_loads, save_trace, split_tokens
from test_eval_cli import affinity_placement

SPLIT = {"train_fraction": 0.5, "seed": 0}
SCALARS = ("cross_gpu_top1", "cross_node_top1", "dest_gpus_topk", "dest_nodes_topk", "imbalance_max", "imbalance_mean")


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    """test_eval_cli's trace: 200 tokens x 4 layers x top-2 over 8 experts, affinity e -> e + 1 (mod 8)."""
    rng = np.random.default_rng(1)
    first = rng.integers(0, 8, size=200)
    top1 = (first[:, None] + np.arange(4)[None, :]) % 8
    top1 = np.where(rng.random((200, 4)) < 0.2, rng.integers(0, 8, size=(200, 4)), top1)
    second = (top1 + 1 + rng.integers(0, 7, size=top1.shape)) % 8
    path = tmp_path / "trace.npz"
    save_trace(make_trace(np.stack([top1, second], axis=-1), num_experts=8), path)
    return path


def deployed(trace_path: Path, path: Path, num_gpus: int = 4, gpus_per_node: int = 2) -> Placement:
    """A balanced layout other than the paired one and contiguous, fitted on all of the trace."""
    rng = np.random.default_rng(7)
    e2g = np.stack([rng.permutation(8) * num_gpus // 8 for _ in range(4)])
    p = Placement(e2g, num_gpus, gpus_per_node, trace_sha256=load_trace(trace_path).sha256)
    p.save(path)
    return p


def eval_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert run(["eval", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one stderr line of a refused run (exit 2), nothing on stdout, no traceback."""
    assert run(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err and len(captured.err.splitlines()) == 1
    return captured.err.strip()


def row(out: str, name: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(name + " ")).split()


def test_baseline_is_scored_on_the_placements_held_out_tokens(tmp_path: Path, trace_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A placement fitted on half the tokens against one fitted on all of them: the baseline is scored
    on the placement's 100 held-out tokens only, with the values (and ratio to contiguous) a separate
    eval of it on exactly those tokens gives; vs_baseline is the placement's over those."""
    affinity_placement(trace_path, SPLIT, tmp_path / "new.json")
    deployed(trace_path, tmp_path / "placement.json")
    held = split_tokens(200, 0.5, 0)[1]
    save_trace(load_trace(trace_path).select_tokens(held), tmp_path / "held.npz")
    alone = eval_json(capsys, str(tmp_path / "placement.json"), str(tmp_path / "held.npz"))
    assert alone["tokens"]["evaluated"] == len(held) == 100
    report = eval_json(capsys, str(tmp_path / "new.json"), str(trace_path), "--baseline", str(tmp_path / "placement.json"))
    base, theirs = report["baseline"], alone["layouts"]["placement"]
    assert base["metrics"]["tokens"] == 100 and report["tokens"]["evaluated"] == 100
    for key in SCALARS:
        assert base["metrics"][key] == pytest.approx(theirs[key])
        assert report["vs_baseline"][key] == pytest.approx(report["layouts"]["placement"][key] / theirs[key])
    assert base["per_layer"]["imbalance_per_layer"] == pytest.approx(theirs["imbalance_per_layer"])
    assert report["vs_baseline"]["cross_gpu_top1"] < 0.8  # the paired layout beats a random one here
    # fitted on all tokens, it would score 200 of them on its own: its cross-GPU share differs there
    whole = eval_json(capsys, str(tmp_path / "placement.json"), str(trace_path))
    assert whole["tokens"]["evaluated"] == 200 and whole["layouts"]["placement"]["cross_gpu_top1"] != pytest.approx(
        base["metrics"]["cross_gpu_top1"])

    assert run(["eval", str(tmp_path / "new.json"), str(trace_path), "--baseline", str(tmp_path / "placement.json")]) == 0
    out = capsys.readouterr().out
    x = alone["vs_contiguous"]["placement"]  # contiguous is the same layout on the same tokens
    assert row(out, "baseline")[1:5] == [f"{theirs['cross_gpu_top1']:.4f}", f"({x['cross_gpu_top1']:.2f}x)",
                                         f"{theirs['cross_node_top1']:.4f}", f"({x['cross_node_top1']:.2f}x)"]
    names = [line.split()[0] for line in out.splitlines()[4:8]]
    assert names == ["layout", "placement", "baseline", "contiguous"]
    mine, r = report["layouts"]["placement"], report["vs_baseline"]
    line = next(line for line in out.splitlines() if line.startswith("  vs baseline "))
    assert line == (f"  vs baseline {tmp_path / 'placement.json'} (on the same tokens): "
                    f"cross-GPU top-1 {mine['cross_gpu_top1']:.4f} vs {theirs['cross_gpu_top1']:.4f} "
                    f"({r['cross_gpu_top1']:.3f}x); cross-node top-1 {mine['cross_node_top1']:.4f} vs "
                    f"{theirs['cross_node_top1']:.4f} ({r['cross_node_top1']:.3f}x); dest GPUs top-k "
                    f"{mine['dest_gpus_topk']:.3f} vs {theirs['dest_gpus_topk']:.3f} ({r['dest_gpus_topk']:.3f}x); "
                    f"imbalance max {mine['imbalance_max']:.3f} vs {theirs['imbalance_max']:.3f} "
                    f"({r['imbalance_max']:.3f}x)")
    per_layer = out.split("max/mean token load per GPU, per layer:\n")[1].splitlines()
    assert per_layer[0].split()[:3] == ["layer", "placement", "baseline"]
    assert per_layer[1].split()[2] == f"{theirs['imbalance_per_layer'][0]:.3f}"


def test_baseline_equal_to_the_placement_is_one_everywhere_and_gates(tmp_path: Path, trace_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """The placement as its own baseline: every ratio 1.0 and the gates at 1 pass; contiguous against
    it fails them (exit 1), a line per gate naming the threshold and the baseline's value in JSON."""
    affinity_placement(trace_path, SPLIT, tmp_path / "good.json")
    sha = load_trace(trace_path).sha256
    Placement(contiguous(4, 8, 4), 4, 2, trace_sha256=sha, split=SPLIT).save(tmp_path / "worse.json")
    report = eval_json(capsys, str(tmp_path / "good.json"), str(trace_path), "--baseline", str(tmp_path / "good.json"))
    assert set(SCALARS) <= set(report["vs_baseline"])
    assert all(v == pytest.approx(1.0) for v in report["vs_baseline"].values())
    assert report["baseline"]["metrics"]["cross_gpu_top1"] == report["layouts"]["placement"]["cross_gpu_top1"]

    gates = ["--max-cross-gpu-vs-baseline", "1", "--max-dest-gpus-vs-baseline", "1", "--max-imbalance-vs-baseline", "1"]
    assert run(["eval", str(tmp_path / "good.json"), str(trace_path), "--baseline", str(tmp_path / "good.json"),
                *gates]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "moeplace eval: PASS: cross-GPU top-1 / baseline 1.0000 <= 1 (--max-cross-gpu-vs-baseline; 100 held-out " \
           "tokens)" in out
    assert sum(line.startswith("moeplace eval: PASS: ") for line in out) == 3

    assert run(["eval", str(tmp_path / "worse.json"), str(trace_path), "--baseline", str(tmp_path / "good.json"),
                *gates, "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    cross = report["gates"]["results"][0]
    assert cross["threshold"] == "max_cross_gpu_vs_baseline" and cross["passed"] is False
    assert cross["value"] == pytest.approx(report["vs_baseline"]["cross_gpu_top1"]) and cross["value"] > 1
    assert cross["baseline_value"] == pytest.approx(report["baseline"]["metrics"]["cross_gpu_top1"])
    assert report["gates"]["passed"] is False
    assert captured.err.startswith(f"moeplace eval: FAIL: cross-GPU top-1 / baseline {cross['value']:.4f} > 1 "
                                   "(--max-cross-gpu-vs-baseline; 100 held-out tokens)\n")


def test_bad_baselines_are_one_line(tmp_path: Path, trace_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    affinity_placement(trace_path, SPLIT, tmp_path / "good.json")
    Placement(contiguous(3, 8, 4), 4, 2).save(tmp_path / "three.json")
    Placement(contiguous(4, 8, 4), 4, 2, trace_model={"model_type": "mixtral"}).save(tmp_path / "mixtral.json")
    good = json.loads((tmp_path / "good.json").read_text())
    (tmp_path / "qwen.json").write_text(json.dumps({**good, "trace_model": {"model_type": "qwen2_moe"}}))
    (tmp_path / "cut.json").write_text((tmp_path / "good.json").read_text()[:50])
    base = ["eval", str(tmp_path / "good.json"), str(trace_path), "--baseline"]
    assert error_line(capsys, [*base, str(tmp_path / "three.json")]) == (
        f"moeplace: error: baseline {tmp_path / 'three.json'} is for 3 MoE layers x 8 experts, but "
        f"{tmp_path / 'good.json'} for 4 x 8: a baseline is a placement of the same model")
    assert error_line(capsys, ["eval", str(tmp_path / "qwen.json"), str(trace_path), "--baseline",
                               str(tmp_path / "mixtral.json")]) == (
        f"moeplace: error: baseline {tmp_path / 'mixtral.json'} was fitted on another model than "
        f"{tmp_path / 'qwen.json'}: model_type mixtral (the placement's: qwen2_moe)")
    assert error_line(capsys, [*base, str(tmp_path / "nothing.json")]) == (
        f"moeplace: error: baseline {tmp_path / 'nothing.json'}: no such file")
    assert error_line(capsys, [*base, str(tmp_path / "cut.json")]).startswith(
        f"moeplace: error: baseline {tmp_path / 'cut.json'}")
    # a gate on a baseline needs one; a zero ratio of positive values passes nothing; -o is not an input
    assert error_line(capsys, ["eval", str(tmp_path / "good.json"), str(trace_path), "--max-cross-gpu-vs-baseline", "1",
                               "--max-dest-gpus-vs-baseline", "1"]) == (
        "moeplace: error: --max-cross-gpu-vs-baseline and --max-dest-gpus-vs-baseline need --baseline (a placement "
        "file of the same model to compare with)")
    assert error_line(capsys, [*base, str(tmp_path / "good.json"), "--max-imbalance-vs-baseline", "0"]) == (
        "moeplace: error: --max-imbalance-vs-baseline 0: the ratio of two positive imbalances is above 0, so no "
        "placement passes; give a positive ratio")
    before = (tmp_path / "mixtral.json").read_bytes()
    assert "-o" in error_line(capsys, [*base, str(tmp_path / "mixtral.json"), "-o", str(tmp_path / "mixtral.json")])
    assert (tmp_path / "mixtral.json").read_bytes() == before


def test_baseline_on_another_gpu_count_or_node_count(tmp_path: Path, trace_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Another GPU count is compared on the same tokens and said so; a one-node baseline crosses no
    node: no ratio (null), said in the line, and a gate on it fails when the placement crosses some."""
    affinity_placement(trace_path, SPLIT, tmp_path / "good.json")  # 2 nodes x 2 GPUs
    two = deployed(trace_path, tmp_path / "two.json", num_gpus=2, gpus_per_node=2)
    report = eval_json(capsys, str(tmp_path / "good.json"), str(trace_path), "--baseline", str(tmp_path / "two.json"))
    note = f"{tmp_path / 'two.json'} is for 2 GPUs (1 node), this one for 4 (2 nodes); compared on the same tokens"
    assert report["baseline"]["note"] == note and report["baseline"]["num_gpus"] == two.num_gpus == 2
    assert report["vs_baseline"]["cross_node_top1"] is None and report["baseline"]["metrics"]["cross_node_top1"] == 0
    assert report["vs_baseline"]["cross_gpu_top1"] == pytest.approx(
        report["layouts"]["placement"]["cross_gpu_top1"] / report["baseline"]["metrics"]["cross_gpu_top1"])
    assert run(["eval", str(tmp_path / "good.json"), str(trace_path), "--baseline", str(tmp_path / "two.json"),
                "--max-cross-node-vs-baseline", "5"]) == 1
    captured = capsys.readouterr()
    assert f"  (baseline: {note})" in captured.out.splitlines()
    vs = next(line for line in captured.out.splitlines() if line.startswith("  vs baseline "))
    assert "; cross-node top-1 0." in vs and " vs 0.0000 (no ratio: 0 in the baseline);" in vs
    assert captured.err.startswith("moeplace eval: FAIL: cross-node top-1 / baseline n/a: 0.")
    assert captured.err.rstrip().endswith(" where the baseline has 0, worse at any ratio (--max-cross-node-vs-baseline; "
                                          "100 held-out tokens)")


def test_baseline_moe_time_and_traffic(tmp_path: Path, small_trace: Trace, capsys: pytest.CaptureFixture[str]) -> None:
    """With a cost model and a traffic prediction, the baseline's MoE time and bytes are those a
    separate eval of it gives on the same tokens; on another GPU count it has neither, and a gate on
    its time is an error."""
    save_trace(small_trace, tmp_path / "t.npz")
    rng = np.random.default_rng(3)
    new = Placement(np.stack([rng.permutation(8) // 2 for _ in range(3)]), 4, 4)
    new.save(tmp_path / "new.json")
    Placement(contiguous(3, 8, 4)[:, ::-1].copy() % 4, 4, 4).save(tmp_path / "old.json")
    cost = ["--cluster", str(ROOT / "configs/cluster/h100-1x4-nvlink.yaml"),
            "--model-config", str(ROOT / "configs/model/mixtral-8x7b.yaml"), "--hidden-size", "64"]
    report = eval_json(capsys, str(tmp_path / "new.json"), str(tmp_path / "t.npz"), "--baseline",
                       str(tmp_path / "old.json"), *cost)
    alone = eval_json(capsys, str(tmp_path / "old.json"), str(tmp_path / "t.npz"), *cost)["layouts"]["placement"]
    base = report["baseline"]
    assert base["metrics"]["moe_time_us"] == pytest.approx(alone["moe_time_us"]) and alone["moe_time_us"] > 0
    assert report["vs_baseline"]["moe_time_us"] == pytest.approx(report["layouts"]["placement"]["moe_time_us"]
                                                                 / alone["moe_time_us"])
    assert base["traffic"] == alone["traffic"]  # the same computation, vs_standard_contiguous included
    assert "vs_standard_contiguous" in base["traffic"]["standard"]
    assert run(["eval", str(tmp_path / "new.json"), str(tmp_path / "t.npz"), "--baseline", str(tmp_path / "old.json"),
                *cost, "--max-moe-time-vs-baseline", "100"]) == 0
    out = capsys.readouterr().out
    assert f"predicted MoE time {report['layouts']['placement']['moe_time_us']:.1f} vs {alone['moe_time_us']:.1f} " \
           f"({report['vs_baseline']['moe_time_us']:.3f}x)" in out
    traffic = [line.split() for line in out.splitlines() if line.split()[:2] == ["baseline", "standard"]]
    assert traffic[0][5] == f"{alone['traffic']['standard']['alltoall_bytes_per_token']:.1f}"

    Placement(contiguous(3, 8, 2), 2, 2).save(tmp_path / "two.json")
    report = eval_json(capsys, str(tmp_path / "new.json"), str(tmp_path / "t.npz"), "--baseline",
                       str(tmp_path / "two.json"), *cost)
    assert "moe_time_us" not in report["baseline"]["metrics"] and "traffic" not in report["baseline"]
    assert error_line(capsys, ["eval", str(tmp_path / "new.json"), str(tmp_path / "t.npz"), "--baseline",
                               str(tmp_path / "two.json"), *cost, "--max-moe-time-vs-baseline", "1"]).startswith(
        f"moeplace: error: --max-moe-time-vs-baseline: the baseline {tmp_path / 'two.json'} has no moe_time_us; ")


def test_baseline_on_a_load_only_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Expert loads, no token paths: the baseline's load balance on the same loads."""
    rng = np.random.default_rng(0)
    loads = rng.integers(1, 100, size=(4, 8)).astype(float)
    save_loads(ExpertLoads(loads, {"source": "loads-json"}), tmp_path / "loads.npz")
    new = Placement(np.stack([np.argsort(-row) % 4 for row in loads]), 4, 2)
    new.save(tmp_path / "new.json")
    old = Placement(contiguous(4, 8, 4), 4, 2)
    old.save(tmp_path / "old.json")
    report = eval_json(capsys, str(tmp_path / "new.json"), str(tmp_path / "loads.npz"), "--baseline",
                       str(tmp_path / "old.json"))
    imb = imbalance(expected_gpu_loads(old, loads))
    assert report["baseline"]["metrics"] == pytest.approx({"imbalance_mean": imb.mean(), "imbalance_max": imb.max()})
    assert report["vs_baseline"] == pytest.approx({
        k: report["layouts"]["placement"][k] / report["baseline"]["metrics"][k] for k in ("imbalance_mean", "imbalance_max")})
    assert run(["eval", str(tmp_path / "new.json"), str(tmp_path / "loads.npz"), "--baseline", str(tmp_path / "old.json"),
                "--max-imbalance-vs-baseline", "100"]) == 0
    out = capsys.readouterr().out
    assert row(out, "baseline")[1] == f"{imb.max():.3f}"
    assert f"  vs baseline {tmp_path / 'old.json'} (on the same loads): imbalance max " in out
    assert "moeplace eval: PASS: imbalance max / baseline " in out and "(--max-imbalance-vs-baseline; expert loads)" in out
    assert error_line(capsys, ["eval", str(tmp_path / "new.json"), str(tmp_path / "loads.npz"), "--baseline",
                               str(tmp_path / "old.json"), "--max-cross-gpu-vs-baseline", "1"]) == (
        f"moeplace: error: --max-cross-gpu-vs-baseline: {tmp_path / 'loads.npz'} is a load-only file (no token paths): "
        "only the imbalance thresholds apply to it")


def test_eval_help_documents_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["eval", "--help"]) == 0
    out = capsys.readouterr().out
    assert "moeplace eval new.json live.npz --baseline placement.json" in out
    assert all(f"--max-{m}-vs-baseline" in out for m in ("cross-gpu", "cross-node", "dest-gpus", "dest-nodes",
                                                         "imbalance", "moe-time"))
