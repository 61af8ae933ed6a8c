"""Adversarial audit of `moeplace solve` and `moeplace analyze`: flag combinations refused up front
in one line, nothing silently ignored, no input replaced, verdicts that do not blame the trace
for what a flag did."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from moeplace import cli
from moeplace.errors import MoeplaceError
from moeplace.placement import Placement, load_placement
from moeplace.solve.baselines import contiguous
from moeplace.solve.synthetic import planted_trace
from moeplace.trace.format import make_loads, make_trace, save_loads, save_trace

CLUSTER_1X4 = ROOT / "configs" / "cluster" / "h100-1x4-nvlink.yaml"
TINY_MODEL = ROOT / "configs" / "model" / "tiny-moe.yaml"  # 16 experts, top-2: another model than the traces here


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    """A planted 64-token trace, 3 layers x 8 experts, top-2 (no sequence ids)."""
    trace, _ = planted_trace(64, 3, 8, 2, 4, seed=0)
    path = tmp_path / "t.npz"
    save_trace(trace, path)
    return path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """stderr holds exactly one line, the error (no warning before it, no traceback); returned."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplace: error: "), err
    return lines[0]


def no_trace_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading the trace fails the test: the refusal must come before it (a large trace takes seconds)."""
    import moeplace.trace.format as fmt

    def refuse(*_: object) -> None:
        raise AssertionError("the trace was read before a refusal that needs no trace")

    monkeypatch.setattr(fmt, "load_trace", refuse)


@pytest.mark.parametrize("flags, said", [
    (["--objective", "latency"], ["--objective latency", "--cluster"]),
    (["--max-experts-per-gpu", "3"], ["--max-experts-per-gpu", "--objective balance"]),
    (["--pareto"], ["--pareto", "--objective latency"]),
    (["--objective", "latency", "--cluster", str(CLUSTER_1X4), "--model-config", str(TINY_MODEL),
      "--redundant-experts", "4", "--max-experts-per-gpu-total", "20"],
     ["--max-experts-per-gpu-total", "--redundant-experts"]),
    (["--gpus-per-node", "3"], ["--gpus 4", "--gpus-per-node 3"]),
])
def test_solve_refuses_flag_conflicts_before_reading_the_trace(
        trace_path: Path, tmp_path: Path, flags: list[str], said: list[str],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    no_trace_read(monkeypatch)
    argv = ["solve", str(trace_path), "--gpus", "4", *flags, "-o", str(tmp_path / "p.json"), "-q"]
    assert cli.run(argv) == 2
    line = one_error_line(capsys)
    assert all(s in line for s in said), line
    assert not (tmp_path / "p.json").exists()


def test_solve_refuses_a_from_placement_of_other_gpus_before_reading_the_trace(
        trace_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    current = tmp_path / "cur.json"
    assert cli.run(["solve", str(trace_path), "--gpus", "2", "--time-limit", "2", "-o", str(current), "-q"]) == 0
    assert load_placement(current).num_gpus == 2
    no_trace_read(monkeypatch)
    assert cli.run(["solve", str(trace_path), "--gpus", "4", "--from", str(current), "-o",
                    str(tmp_path / "p.json"), "-q"]) == 2
    line = one_error_line(capsys)
    assert f"--from {current}: it has 2 GPUs, this solve 4" in line


def test_solve_refuses_gpus_that_do_not_divide_the_experts_before_reading_the_trace(
        trace_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """8 experts (the stored count, from the headers) on 3 GPUs: refused with the solver's own
    line (the library's, which reads the tokens first) before the tokens are read."""
    from moeplace.solve.solver import solve_placement
    from moeplace.trace.format import load_trace

    with pytest.raises(MoeplaceError) as library:
        solve_placement(load_trace(trace_path), 3)
    no_trace_read(monkeypatch)
    assert cli.run(["solve", str(trace_path), "--gpus", "3", "-o", str(tmp_path / "p.json"), "-q"]) == 2
    assert one_error_line(capsys) == f"moeplace: error: {library.value}" and "8 experts" in str(library.value)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("layers, experts, said", [
    (2, 8, "it has 2 MoE layers, this solve 3"),
    (3, 16, "it has 16 experts per layer, this solve 8"),
])
def test_solve_refuses_a_from_placement_of_another_shape_before_reading_the_trace(
        trace_path: Path, tmp_path: Path, layers: int, experts: int, said: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The trace's layers and experts come from its headers (trace_shape): before, the refusal
    came after the whole trace was read (7 s on a 176 MB trace)."""
    current = tmp_path / "cur.json"
    Placement(contiguous(layers, experts, 4), num_gpus=4, gpus_per_node=4).save(current)
    no_trace_read(monkeypatch)
    assert cli.run(["solve", str(trace_path), "--gpus", "4", "--from", str(current), "-o",
                    str(tmp_path / "p.json"), "-q"]) == 2
    assert f"--from {current}: {said}" in one_error_line(capsys)
    assert not (tmp_path / "p.json").exists()


def test_solve_from_on_a_trace_without_an_expert_count_checks_the_experts_once_read(
        trace_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An ExFlow .npy stores no expert count (the ids tell it): its layers are refused before the
    read, its experts after it, still in one line."""
    from moeplace.trace.format import load_trace

    npy = tmp_path / "t.npy"
    np.save(npy, load_trace(trace_path).topk_ids[:, :, 0])
    current, out = tmp_path / "cur.json", tmp_path / "p.json"
    Placement(contiguous(3, 16, 4), num_gpus=4, gpus_per_node=4).save(current)
    argv = ["solve", str(npy), "--gpus", "4", "--from", str(current), "-o", str(out), "-q"]
    assert cli.run(argv) == 2
    assert "it has 16 experts per layer, this solve 8" in one_error_line(capsys)
    Placement(contiguous(2, 8, 4), num_gpus=4, gpus_per_node=4).save(current)
    no_trace_read(monkeypatch)
    assert cli.run(argv) == 2
    assert "it has 2 MoE layers, this solve 3" in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("command, flag", [
    ("solve", "--from"), ("solve", "--cluster"), ("solve", "--model-config"),
    ("eval", "--cluster"), ("eval", "--model-config"),
])
def test_a_missing_file_names_its_flag(trace_path: Path, tmp_path: Path, command: str, flag: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "nope.json: no such file", whichever of a command's files it was."""
    missing = tmp_path / ("nope.json" if flag == "--from" else "nope.yaml")
    given = {"--cluster": CLUSTER_1X4, "--model-config": TINY_MODEL, flag: missing}
    cost = [] if flag == "--from" else ["--cluster", str(given["--cluster"]), "--model-config",
                                        str(given["--model-config"])]
    if command == "solve":
        argv = ["solve", str(trace_path), "--gpus", "4", *(["--from", str(missing)] if flag == "--from" else
                                                          ["--objective", "latency", *cost]),
                "-o", str(tmp_path / "p.json"), "-q"]
    else:
        placement = tmp_path / "placement.json"
        Placement(contiguous(3, 8, 4), num_gpus=4, gpus_per_node=4).save(placement)
        argv = ["eval", str(placement), str(trace_path), *cost]
    assert cli.run(argv) == 2
    assert one_error_line(capsys) == f"moeplace: error: {flag} {missing}: no such file"


@pytest.mark.parametrize("key", ["cluster", "model_config"])
def test_check_names_the_key_of_a_missing_cost_model_file(trace_path: Path, tmp_path: Path, key: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    Placement(contiguous(3, 8, 4), num_gpus=4, gpus_per_node=4).save(tmp_path / "p.json")
    check = {"name": "a", "placement": "p.json", "trace": trace_path.name, "cluster": str(CLUSTER_1X4),
             "model_config": str(TINY_MODEL), key: "nope.yaml", "max_imbalance": 10}
    (tmp_path / "ci.yaml").write_text(json.dumps({"checks": [check]}))  # JSON is YAML
    assert cli.run(["check", str(tmp_path / "ci.yaml")]) == 2
    assert capsys.readouterr().out == f"ERROR a: {key} {tmp_path / 'nope.yaml'}: no such file\n"


def test_seed_is_refused_above_int64(trace_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 23-digit seed was accepted and written into the placement as a JSON integer past 2**64."""
    out = tmp_path / "p.json"
    argv = ["solve", str(trace_path), "--gpus", "2", "--train-fraction", "0.5", "--time-limit", "1", "-o", str(out), "-q"]
    for seed in ("99999999999999999999999", str(2**63)):
        assert cli.run([*argv, "--seed", seed]) == 2
        assert "is not a seed: seeds are integers from 0 to 2**63 - 1" in one_error_line(capsys)
        assert not out.exists()
    assert cli.run([*argv, "--seed", str(2**63 - 1)]) == 0  # the largest is taken, and recorded as it is
    assert json.loads(out.read_text())["split"]["seed"] == 2**63 - 1


@pytest.mark.parametrize("flags, said", [
    (["--objective", "balance", "--redundant-experts", "1"], "at most 0 copies fit 1 GPU without"),
    (["--objective", "latency", "--cluster", str(CLUSTER_1X4), "--model-config", str(TINY_MODEL)],
     "has 1 node(s) x 4 GPUs, but the placement uses 1 GPU with 1 per node"),
])
def test_solve_on_one_gpu_says_gpu_not_gpus(trace_path: Path, tmp_path: Path, flags: list[str], said: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["solve", str(trace_path), "--gpus", "1", *flags, "-o", str(tmp_path / "p.json"), "-q"]) == 2
    line = one_error_line(capsys)
    assert said in line and "1 GPUs" not in line, line


def test_load_only_summary_and_analyze_progress_on_one_gpu(trace_path: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    loads = tmp_path / "loads.npz"
    save_loads(make_loads(np.arange(1.0, 17.0).reshape(2, 8)), loads)
    assert cli.run(["solve", str(loads), "--gpus", "1", "--time-limit", "1", "-o", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "(load only) -> 1 GPU, 0 redundant" in out and "1 GPUs" not in out, out
    assert cli.run(["analyze", str(trace_path), "--compare", str(trace_path), "--gpus", "1", "--shuffles", "2",
                    "--time-limit", "1", "--no-figures", "-o", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "solving placements (1 GPU, up to 1 s each)" in captured.err  # the progress line
    assert "placement on 1 GPU (1 per node)" in captured.out
    assert "1 GPUs" not in captured.out + captured.err


@pytest.mark.parametrize("flags, flag", [(["--pareto"], "--pareto"), (["--seed", "3"], "--seed")])
def test_solve_refuses_what_a_load_only_input_would_ignore(
        tmp_path: Path, flags: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    loads = tmp_path / "loads.npz"
    save_loads(make_loads(np.arange(1.0, 17.0).reshape(2, 8)), loads)
    out = tmp_path / "p.json"
    assert cli.run(["solve", str(loads), "--gpus", "4", *flags, "-o", str(out), "-q"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"moeplace: error: {flag}") and "loads only" in line, line
    assert not out.exists()
    assert cli.run(["solve", str(loads), "--gpus", "4", "--time-limit", "2", "-o", str(out), "-q"]) == 0  # without it


def test_solve_exflow_refusal_is_one_line_without_the_expert_count_warning(
        trace_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeplace.trace.format import load_trace

    npy = tmp_path / "t.npy"
    np.save(npy, load_trace(trace_path).topk_ids[:, :, 0])
    for flags in (["--gpus", "4", "--split-by", "sequence", "--train-fraction", "0.5"], ["--gpus", "3"]):
        assert cli.run(["solve", str(npy), *flags, "-o", str(tmp_path / "p.json"), "-q"]) == 2
        one_error_line(capsys)
    assert cli.run(["solve", str(npy), "--gpus", "4", "--time-limit", "2", "-o", str(tmp_path / "p.json"), "-q"]) == 0
    assert "ExFlow .npy records no expert count" in capsys.readouterr().err  # still said on a run that goes on


@pytest.mark.parametrize("gpus, said", [
    ("4", "6 experts per layer cannot be split equally over 4 GPUs"),  # the solver's order: topology first
    ("6", "has 1 node(s) x 4 GPUs, but the placement uses 6 GPUs"),
])
def test_solve_refusals_come_before_the_other_model_warning(
        tmp_path: Path, gpus: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """tiny-moe.yaml names 16 experts, the trace has 6: that warning, then the refusal, was two
    lines for one refused run."""
    trace, _ = planted_trace(48, 2, 6, 2, 3, seed=0)
    path = tmp_path / "six.npz"
    save_trace(trace, path)
    argv = ["solve", str(path), "--gpus", gpus, "--objective", "latency", "--cluster", str(CLUSTER_1X4),
            "--model-config", str(TINY_MODEL), "-o", str(tmp_path / "p.json"), "-q"]
    assert cli.run(argv) == 2
    assert said in one_error_line(capsys)
    argv[3] = "4"  # a run that goes on still warns
    trace, _ = planted_trace(48, 2, 8, 2, 4, seed=0)
    save_trace(trace, path)
    assert cli.run([*argv, "--time-limit", "1"]) == 0
    assert "gives num_experts 16" in capsys.readouterr().err


def test_load_entropy_of_a_single_expert_layer_is_plus_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeplace.analyze.affinity import load_skew

    rows = load_skew(np.array([[10.0, 0, 0, 0], [1, 1, 1, 1]]))
    assert rows[0]["entropy_frac"] == 0.0 and not np.signbit(rows[0]["entropy_frac"])
    assert rows[1]["entropy_frac"] == pytest.approx(1.0)
    path = tmp_path / "one.npz"
    save_trace(make_trace(np.zeros((40, 2, 1), dtype=np.int64), None, 8), path)
    assert cli.run(["analyze", str(path), "--no-solve", "--no-figures", "--shuffles", "2", "-o",
                    str(tmp_path / "a")]) == 0
    assert "-0.00" not in capsys.readouterr().out


def test_analyze_on_one_gpu_does_not_blame_the_trace(trace_path: Path, tmp_path: Path) -> None:
    """On --gpus 1 every layout is the same: the verdict said 'solving a placement gains nothing
    over contiguous here' of a trace with planted affinity."""
    out = tmp_path / "a"
    argv = ["analyze", str(trace_path), "--compare", str(trace_path), "--gpus", "1", "--shuffles", "2",
            "--time-limit", "1", "--no-figures", "-q", "-o", str(out)]
    assert cli.run(argv) == 0
    report = json.loads((out / "analyze.json").read_text())
    text = report["traces"]["A"]["verdict"]["text"]
    assert "gains nothing" not in text and "--gpus 1" in text, text
    shift = report["transfer"]["verdict"]
    assert shift["status"] == "not_measured" and "--gpus 1" in shift["text"], shift


@pytest.mark.parametrize("option", ["TRACE", "--compare"])
def test_analyze_refuses_to_write_over_an_input(
        trace_path: Path, tmp_path: Path, option: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    out.mkdir()
    inside = out / "analyze.json"  # a trace under the name of the file every run writes
    shutil.copy(trace_path, inside)
    before = inside.read_bytes()
    first, compare = (inside, trace_path) if option == "TRACE" else (trace_path, inside)
    argv = ["analyze", str(first), "--compare", str(compare), "--no-solve", "--no-figures", "--shuffles", "2",
            "-o", str(out)]
    assert cli.run(argv) == 2
    line = one_error_line(capsys)
    assert f"which is {option}" in line and str(inside) in line, line
    assert inside.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["analyze.json"]
