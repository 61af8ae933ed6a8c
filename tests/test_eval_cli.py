"""`moeplace eval` and `moeplace check`: token subsets, baselines, report, regression gate."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import ROOT
from moeplace.cli import run
from moeplace.errors import MoeplaceError
from moeplace.eval.check import read_checks
from moeplace.models.config import read_model_shape
from moeplace.eval.metrics import evaluate, imbalance
from moeplace.placement import Placement, load_placement
from moeplace.solve.balance import expected_gpu_loads
from moeplace.solve.baselines import contiguous, greedy_load
from moeplace.solve.eplb import eplb_placement
from moeplace.trace.format import ExpertLoads, load_trace, make_trace, save_loads, save_trace, split_tokens


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    """200 tokens x 4 layers x top-2 over 8 experts, with strong affinity e -> e + 1 (mod 8)."""
    rng = np.random.default_rng(1)
    first = rng.integers(0, 8, size=200)
    top1 = (first[:, None] + np.arange(4)[None, :]) % 8
    noise = rng.random((200, 4)) < 0.2
    top1 = np.where(noise, rng.integers(0, 8, size=(200, 4)), top1)
    second = (top1 + 1 + rng.integers(0, 7, size=top1.shape)) % 8
    path = tmp_path / "trace.npz"
    save_trace(make_trace(np.stack([top1, second], axis=-1), num_experts=8), path)
    return path


def affinity_placement(trace_path: Path, split: dict | None, path: Path) -> Placement:
    """Experts e+l and e+l+1 paired on a GPU at every layer: what a solver finds on this trace."""
    trace = load_trace(trace_path)
    e2g = np.stack([((np.arange(8) - layer) % 8) // 2 for layer in range(4)])
    p = Placement(e2g, num_gpus=4, gpus_per_node=2, trace_sha256=trace.sha256, split=split)
    p.save(path)
    return p


def eval_json(capsys, *args: str) -> tuple[int, dict]:
    rc = run(["eval", *args, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def test_report_ends_its_table_with_the_placement_against_contiguous_in_words(tmp_path: Path, trace_path: Path,
                                                                             capsys) -> None:
    """One line a CI log or `make demo` reader takes in first: the x column of the placement's row
    in words, on the tokens the report scored."""
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "p.json")
    _, report = eval_json(capsys, str(tmp_path / "p.json"), str(trace_path))
    x = report["vs_contiguous"]["placement"]
    assert x["cross_gpu_top1"] < 1 and x["dest_gpus_topk"] < 1  # the paired layout keeps most moves on-GPU
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  in short: ")]

    def words(r: float, what: str, lower: str, higher: str, after: bool = False) -> str:
        change = "the same" if abs(r - 1) < 0.005 else f"{1 - r:.0%} {lower}" if r < 1 else f"{r - 1:.0%} {higher}"
        return f"{what} {change}" if after or change == "the same" else f"{change} {what}"

    node = words(x["cross_node_top1"], "cross-node top-1 transitions", "fewer", "more")
    assert lines == [f"  in short: against contiguous on the {report['tokens']['evaluated']} held-out tokens: "
                     f"{words(x['cross_gpu_top1'], 'cross-GPU top-1 transitions', 'fewer', 'more')}; {node}; "
                     f"{words(x['dest_gpus_topk'], 'other GPUs per token (top-k)', 'fewer', 'more')}; "
                     f"{words(x['imbalance_max'], 'worst layer' + chr(39) + 's max/mean load per GPU', 'lower', 'higher', True)}"]
    assert lines[0].count("% fewer") >= 2


def test_in_short_names_the_tokens_as_the_tokens_line_does(tmp_path: Path, trace_path: Path, capsys) -> None:
    """Fitted on all of a trace: "tokens the placement was fitted on"; on another trace: plain
    tokens (its note says tokens it shares with the fit trace "score in-sample", which once made
    the line claim they were all fitted on)."""
    affinity_placement(trace_path, None, tmp_path / "p.json")
    other = load_trace(trace_path)
    save_trace(make_trace(other.topk_ids[:150], None, 8), tmp_path / "other.npz")

    def short(path: Path) -> str:
        assert run(["eval", str(tmp_path / "p.json"), str(path)]) == 0
        (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  in short: ")]
        return line

    assert short(trace_path).startswith("  in short: against contiguous on 200 tokens the placement was fitted on: ")
    assert short(tmp_path / "other.npz").startswith("  in short: against contiguous on 150 tokens: ")


def test_held_out_tokens_by_default(tmp_path: Path, trace_path: Path, capsys) -> None:
    split = {"train_fraction": 0.6, "seed": 3}
    p = affinity_placement(trace_path, split, tmp_path / "p.json")
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(trace_path))
    assert rc == 0
    trace = load_trace(trace_path)
    train, held = split_tokens(trace.num_tokens, 0.6, 3)
    assert report["tokens"]["subset"] == "held-out" and report["tokens"]["evaluated"] == len(held) == 80
    held_trace = trace.select_tokens(held)
    assert report["layouts"]["placement"]["cross_gpu_top1"] == pytest.approx(evaluate(p, held_trace)["cross_gpu_top1"])
    # greedy_load is fitted on the placement's training tokens, evaluated on the held-out ones
    greedy = Placement(greedy_load(trace.select_tokens(train).expert_loads(), 4), 4, 2)
    assert report["layouts"]["greedy_load"] == pytest.approx(evaluate(greedy, held_trace))
    assert list(report["layouts"]) == ["placement", "contiguous", "round_robin", "random", "greedy_load"]
    cont = evaluate(Placement(contiguous(4, 8, 4), 4, 2), held_trace)
    ratio = report["vs_contiguous"]["placement"]["dest_gpus_topk"]
    assert ratio == pytest.approx(report["layouts"]["placement"]["dest_gpus_topk"] / cont["dest_gpus_topk"])
    assert report["layouts"]["placement"]["cross_gpu_top1"] < 0.6 * cont["cross_gpu_top1"]  # the affinity pays


def test_all_tokens_and_other_traces(tmp_path: Path, trace_path: Path, capsys) -> None:
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "p.json")
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(trace_path), "--all-tokens")
    assert rc == 0 and report["tokens"]["subset"] == "all" and report["tokens"]["evaluated"] == 200
    other = tmp_path / "other.npz"  # same model, different tokens: a different sha256
    t = load_trace(trace_path)
    save_trace(t.select_tokens(np.arange(150)), other)
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(other))
    assert rc == 0 and report["tokens"]["subset"] == "all" and report["tokens"]["evaluated"] == 150
    assert "not the trace the placement was fitted on" in report["tokens"]["note"]


def test_tiny_held_out_part_is_scored_as_is_and_an_empty_one_in_sample(tmp_path: Path, trace_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    # train_fraction 0.98 holds out 4 of 200 tokens (solve warns: fewer than the 8 experts); eval
    # scores those 4, saying how many; 0.999 holds out none: every token, labelled in-sample
    affinity_placement(trace_path, {"train_fraction": 0.98, "seed": 0}, tmp_path / "p.json")
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(trace_path))
    assert rc == 0 and report["tokens"]["subset"] == "held-out" and report["tokens"]["evaluated"] == 4
    affinity_placement(trace_path, {"train_fraction": 0.999, "seed": 0}, tmp_path / "p.json")
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(trace_path))
    assert rc == 0 and report["tokens"]["subset"] == "all" and report["tokens"]["evaluated"] == 200
    assert "in-sample" in report["tokens"]["note"] and "leaves none held out" in report["tokens"]["note"]


def test_table_output_and_report_file(tmp_path: Path, trace_path: Path, capsys) -> None:
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "p.json")
    out = tmp_path / "report.json"
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out tokens" in text and "cross-node top-1" in text and "greedy_load" in text
    assert "max/mean token load per GPU, per layer" in text
    report = json.loads(out.read_text())
    assert report["tokens"]["evaluated"] == 100 and len(report["layouts"]["placement"]["imbalance_per_layer"]) == 4


def test_regression_gate_exit_codes(tmp_path: Path, trace_path: Path, capsys) -> None:
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "p.json")
    _, report = eval_json(capsys, str(tmp_path / "p.json"), str(trace_path))
    cross = report["layouts"]["placement"]["cross_gpu_top1"]
    args = ["eval", str(tmp_path / "p.json"), str(trace_path)]
    assert run(args + ["--max-cross-gpu", f"{cross + 0.01}", "--max-imbalance", "10"]) == 0
    captured = capsys.readouterr()  # a pass says so, one line per gate, on stdout; nothing on stderr
    passes = [line for line in captured.out.splitlines() if line.startswith("moeplace eval: ")]
    assert passes == [f"moeplace eval: PASS: cross-GPU top-1 {cross:.4f} <= {cross + 0.01:g} (--max-cross-gpu; 100 held-out tokens)",
                      f"moeplace eval: PASS: imbalance max {report['layouts']['placement']['imbalance_max']:.4f} <= 10 "
                      "(--max-imbalance; 100 held-out tokens)"]
    assert captured.err == ""
    assert run(args + ["--max-cross-gpu", f"{cross - 0.01}", "--max-imbalance", "1.0"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()  # a failed gate is a verdict, not bad input: no `moeplace: error:`
    assert err == [f"moeplace eval: FAIL: cross-GPU top-1 {cross:.4f} > {cross - 0.01:g} (--max-cross-gpu; 100 held-out tokens)",
                   f"moeplace eval: FAIL: imbalance max {report['layouts']['placement']['imbalance_max']:.4f} > 1 "
                   "(--max-imbalance; 100 held-out tokens)"]
    # --json: stdout is the report alone (its `gates` say it), a failure still on stderr
    assert run(args + ["--max-cross-gpu", f"{cross + 0.01}", "--max-imbalance", "1.0", "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["gates"]["passed"] is False
    assert captured.err.startswith("moeplace eval: FAIL: imbalance max ") and len(captured.err.splitlines()) == 1
    assert run(args + ["--max-cross-gpu", "-1"]) == 2  # bad input keeps exit 2


def test_uneven_experts_get_uneven_baselines(tmp_path: Path, capsys) -> None:
    trace = make_trace(np.array([[[0], [1]], [[2], [4]], [[5], [3]]]), num_experts=6)
    save_trace(trace, tmp_path / "t.npz")
    Placement(np.array([[0, 0, 1, 1, 2, 3], [0, 1, 1, 2, 3, 3]]), 4, 4).save(tmp_path / "p.json")
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(tmp_path / "t.npz"))
    assert rc == 0 and list(report["layouts"]) == ["placement", "contiguous", "round_robin", "random", "greedy_load"]
    # contiguous: the first E % G = 2 GPUs hold 2 experts, the others 1 (vLLM's expert map);
    # token 0 goes 0 -> 1 (GPU 0 -> 0), token 1: 2 -> 4 (1 -> 2), token 2: 5 -> 3 (3 -> 1)
    assert report["layouts"]["contiguous"]["cross_gpu_top1"] == 2 / 3


def write_checks(path: Path, checks: list[dict], defaults: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({"defaults": defaults or {}, "checks": checks}))
    return path


def test_check_pass_and_fail(tmp_path: Path, trace_path: Path, capsys) -> None:
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "good.json")
    bad = Placement(contiguous(4, 8, 4), 4, 2, trace_sha256=load_trace(trace_path).sha256,
                    split={"train_fraction": 0.5, "seed": 0})
    bad.save(tmp_path / "bad.json")
    limits = {"max_cross_gpu_vs_contiguous": 0.7, "max_imbalance": 5}
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "good", "placement": "good.json", **limits}],
                       defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS  good (100 held-out tokens): cross_gpu_top1/contiguous ")
    assert out[-1] == "moeplace check: PASS: the 1 check passed"
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "good", "placement": "good.json", **limits},
                                              {"name": "bad", "placement": "bad.json", **limits}],
                       defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg)]) == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("PASS  good") and lines[1].startswith("FAIL  bad")
    # the broken threshold first, the held ones after "within:" (before: one list in the YAML's order)
    assert lines[1].startswith("FAIL  bad (100 held-out tokens): cross_gpu_top1/contiguous 1.0000 > 0.7; within: "
                               "imbalance_max "), lines[1]
    assert captured.err.strip() == "moeplace check: FAIL: 1 of 2 checks failed (1 passed)"


def test_check_missing_file_is_an_error_line(tmp_path: Path, trace_path: Path, capsys) -> None:
    affinity_placement(trace_path, None, tmp_path / "good.json")
    cfg = write_checks(tmp_path / "ci.yaml", [
        {"name": "gone", "placement": "missing.json", "trace": "trace.npz", "max_cross_gpu": 1},
        {"name": "ok", "placement": "good.json", "trace": "trace.npz", "max_cross_gpu": 1},
    ])
    assert run(["check", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0].startswith("ERROR gone: ") and "missing.json: no such file" in captured.out
    assert captured.out.splitlines()[1].startswith("PASS  ok (200 all tokens)")
    assert captured.err.strip() == "moeplace: error: 1 of 2 checks could not run (1 passed, 0 failed)"


@pytest.mark.parametrize(
    "doc, message",
    [
        ("checks: []", "non-empty 'checks' list"),
        ("checks: [{placement: p.json, trace: t.npz, max_cross_gpus: 0.5}]", "unknown keys ['max_cross_gpus']"),
        ("checks: [{placement: p.json, trace: t.npz}]", "no thresholds"),
        ("checks: [{placement: p.json, max_cross_gpu: 0.5}]", "'trace' (a path) is required"),
        ("checks: [{placement: 123, trace: t.npz, max_cross_gpu: 0.5}]", "'placement' must be a path (a non-empty string), got 123"),
        ("checks: [{placement: p.json, trace: t.npz, max_imbalance: .nan}]", "must be a non-negative number"),
        ("checks: [{placement: p.json, trace: t.npz, max_imbalance: 'nan'}]", "must be a non-negative number, got 'nan'"),
        ("checks: [{placement: p.json, trace: t.npz, max_imbalance: '-1e-1'}]", "must be a non-negative number"),
        ("defaults: {max_imbalanse: 1.2}\nchecks: [{name: a, placement: p.json, trace: t.npz, max_cross_gpu: 0.5}]",
         ": defaults: unknown keys ['max_imbalanse']"),
        ("checks: [{placement: p.json, trace: t.npz, max_imbalance: high}]", "must be a non-negative number"),
        ("checks: [{placement: p.json, trace: t.npz, max_imbalance: 2}]\nextra: 1", "unknown top-level keys"),
        ("checks: [unclosed", "not valid YAML"),
        ("defaults: []\nchecks: [{placement: p.json, trace: t.npz, max_imbalance: 2}]", "'defaults' must be a mapping"),
        ("checks: [{name: a, placement: p.json, trace: t.npz, max_imbalance: 2},\n"
         "         {name: a, placement: q.json, trace: t.npz, max_imbalance: 2}]", "checks 1 and 2 are both named 'a'"),
        ("checks: [{name: [a], placement: p.json, trace: t.npz, max_imbalance: 2}]", "name must be a string"),
        # keys of mixed types (1 and foo) were sorted together: TypeError, exit 3
        ("checks: [{placement: p.json, trace: t.npz, max_imbalance: 2}]\n1: x\nfoo: y", "unknown top-level keys ['1', 'foo']"),
        ("defaults: {1: a, b: c}\nchecks: [{placement: p.json, trace: t.npz, max_imbalance: 2}]",
         "defaults: unknown keys ['1', 'b']"),
        ("checks: [{placement: p.json, trace: t.npz, max_imbalance: 2, 1: x, foo: y}]", "unknown keys ['1', 'foo']"),
        # a 401-digit threshold overflowed float(): OverflowError, exit 3
        ("checks: [{placement: p.json, trace: t.npz, max_cross_gpu: 1" + "0" * 400 + "}]",
         "max_cross_gpu must be a non-negative number, got 10000000000000000000... (401 characters)"),
    ],
)
def test_check_config_errors(tmp_path: Path, doc: str, message: str, capsys) -> None:
    cfg = tmp_path / "ci.yaml"
    cfg.write_text(doc)
    assert run(["check", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_shipped_check_example_passes_on_the_bundled_trace(tmp_path: Path, capsys) -> None:
    """configs/check-example.yaml after the documented solve (make demo), in a copy of the layout."""
    pytest.importorskip("moeplace.solve.cli")
    src = ROOT / "configs" / "check-example.yaml"
    checks = read_checks(src)
    assert checks and all(c["trace"].resolve().is_file() for c in checks), "the example must point at a bundled trace"
    (tmp_path / "configs").mkdir()
    (tmp_path / "traces").mkdir()
    cfg = tmp_path / "configs" / src.name
    cfg.write_text(src.read_text())
    trace_path = tmp_path / "traces" / "flame-moe-290m-decoder.npz"
    trace_path.write_bytes((ROOT / "traces" / trace_path.name).read_bytes())
    solve = ["solve", str(trace_path), "--gpus", "8", "--gpus-per-node", "4", "--train-fraction", "0.5", "--seed", "0"]
    assert run(solve + ["-o", str(tmp_path / "out" / "placement.json")]) == 0
    capsys.readouterr()
    assert run(["check", str(cfg)]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.startswith("PASS  flame-decoder-8gpu-2node (320 held-out tokens)")


def test_check_duplicate_key_is_refused(tmp_path: Path, capsys) -> None:
    """PyYAML keeps the last of two equal keys: a repeated threshold would loosen the gate silently."""
    cfg = tmp_path / "ci.yaml"
    cfg.write_text("checks:\n  - placement: p.json\n    trace: t.npz\n    max_cross_gpu: 0.5\n    max_cross_gpu: 0.7\n")
    assert run(["check", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_cross_gpu" in err and "twice" in err, err


def test_check_threshold_strings_that_are_numbers(tmp_path: Path, trace_path: Path, capsys) -> None:
    """YAML 1.1 reads 1e-1 (no dot) as a string: it is the threshold 0.1, not an error."""
    affinity_placement(trace_path, None, tmp_path / "good.json")
    cfg = tmp_path / "ci.yaml"
    cfg.write_text("checks:\n  - {placement: good.json, trace: trace.npz, max_cross_gpu: 1e-1, max_imbalance: 1e+1}\n")
    assert read_checks(cfg)[0]["limits"] == {"max_cross_gpu": 0.1, "max_imbalance": 10.0}
    assert run(["check", str(cfg)]) == 1
    assert "> 0.1" in capsys.readouterr().out


def test_check_summary_counts_every_kind(tmp_path: Path, trace_path: Path, capsys) -> None:
    """PASS, FAIL and ERROR together: the summary used to say only how many could not run."""
    affinity_placement(trace_path, None, tmp_path / "good.json")
    cfg = write_checks(tmp_path / "ci.yaml", [
        {"name": "pass", "placement": "good.json", "max_cross_gpu": 1},
        {"name": "fail", "placement": "good.json", "max_cross_gpu": 0},
        {"name": "gone", "placement": "missing.json", "max_cross_gpu": 1},
        {"name": "gone2", "placement": "missing2.json", "max_cross_gpu": 1},
    ], defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg)]) == 2  # docs/eval.md: 2 when a check could not run, failures or not
    captured = capsys.readouterr()
    verdicts = [line.split()[0] for line in captured.out.splitlines() if not line.startswith(" ")]
    assert verdicts == ["PASS", "FAIL", "ERROR", "ERROR"]
    assert "      tokens: all tokens: in-sample" in captured.out  # fitted on all of them: said under each line
    assert captured.err.strip() == "moeplace: error: 2 of 4 checks could not run (1 passed, 1 failed)"


def test_gate_line_never_rounds_away_the_comparison(tmp_path: Path, trace_path: Path, capsys) -> None:
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "p.json")
    _, report = eval_json(capsys, str(tmp_path / "p.json"), str(trace_path))
    cross = report["layouts"]["placement"]["cross_gpu_top1"]
    args = ["eval", str(tmp_path / "p.json"), str(trace_path)]
    for limit in (f"{cross:.4f}", f"{cross - 1e-7:.10f}", f"{cross - 1e-12:.17g}"):
        if float(limit) >= cross:
            continue  # 4 decimals rounded up: not a failure
        assert run(args + ["--max-cross-gpu", limit]) == 1
        err = capsys.readouterr().err.strip()
        value, shown_limit = err.split("cross-GPU top-1 ")[1].split(" (")[0].split(" > ")
        assert float(value) > float(shown_limit), err
    assert run(args + ["--max-cross-gpu", f"{cross:.17g}"]) == 0  # equal passes


def test_report_file_records_the_gates(tmp_path: Path, trace_path: Path, capsys) -> None:
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "p.json")
    out = tmp_path / "r.json"
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "-o", str(out),
                "--max-cross-gpu", "0", "--max-imbalance", "10"]) == 1
    gates = json.loads(out.read_text())["gates"]
    assert gates["thresholds"] == {"max_cross_gpu": 0.0, "max_imbalance": 10.0} and gates["passed"] is False
    assert [(r["metric"], r["passed"]) for r in gates["results"]] == [("cross_gpu_top1", False), ("imbalance_max", True)]
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "-o", str(out)]) == 0
    assert "gates" not in json.loads(out.read_text())


def test_a_trace_of_another_model_is_noted(tmp_path: Path, trace_path: Path, capsys) -> None:
    """Shapes are checked; a same-shape trace of another model family (or other MoE layer
    indices) is evaluated but the report says the placement was fitted on another model."""
    trace = load_trace(trace_path)
    for name, meta in [("mixtral", {"model": "a/mixtral", "model_type": "mixtral", "moe_layers": [0, 1, 2, 3]}),
                       ("copy", {"model": "elsewhere/mixtral", "model_type": "mixtral", "moe_layers": [0, 1, 2, 3]}),
                       ("olmoe", {"model": "b/olmoe", "model_type": "olmoe", "moe_layers": [0, 1, 2, 3]}),
                       ("deeper", {"model_type": "mixtral", "moe_layers": [1, 2, 3, 4]})]:
        save_trace(make_trace(trace.topk_ids, trace.topk_weights, 8, meta=meta), tmp_path / f"{name}.npz")
    out = tmp_path / "p.json"
    assert run(["solve", str(tmp_path / "mixtral.npz"), "--gpus", "4", "-q", "-o", str(out)]) == 0
    assert json.loads(out.read_text())["trace_model"]["model_type"] == "mixtral"
    notes = {}
    for name in ("mixtral", "copy", "olmoe", "deeper"):
        rc, report = eval_json(capsys, str(out), str(tmp_path / f"{name}.npz"))
        assert rc == 0
        notes[name] = report["tokens"]["note"]
    assert "another model" not in notes["mixtral"] and "another model" not in notes["copy"]  # the path may differ
    assert "another model's routing: model_type mixtral (this trace: olmoe)" in notes["olmoe"]
    assert "moe_layers [0, 1, 2, 3] (this trace: [1, 2, 3, 4])" in notes["deeper"]


def test_check_node_gates_on_one_node_nulls_and_token_notes(tmp_path: Path, trace_path: Path, capsys) -> None:
    trace = load_trace(trace_path)
    one_node = Placement(np.stack([((np.arange(8) - layer) % 8) // 2 for layer in range(4)]), 4, 4,
                         trace_sha256=trace.sha256, split={"train_fraction": 0.5, "seed": 0})
    one_node.save(tmp_path / "one.json")
    # a shared YAML's cross-node gate has nothing to measure on one node: n/a, not "could not run"
    defaults = {"trace": "trace.npz", "max_cross_node_vs_contiguous": 0.6, "max_imbalance": 0.5}
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "one", "placement": "one.json", "max_imbalance": None}],
                       defaults=defaults)
    assert run(["check", str(cfg)]) == 0  # `max_imbalance: null` dropped the default that would fail
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "PASS  one (100 held-out tokens): cross_node_top1/contiguous n/a (one node)"
    # another trace than the fit one is scored whole, and the line under it says what eval knows
    save_trace(trace.select_tokens(np.arange(150)), tmp_path / "other.npz")
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "other", "placement": "one.json", "trace": "other.npz",
                                               "max_imbalance": None}], defaults=defaults)
    assert run(["check", str(cfg)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS  other (150 all tokens)")
    assert out[1].startswith("      tokens: all tokens (not the trace the placement was fitted on")
    # paths: an empty one is refused; ~ is the home directory; shown without `..`
    cfg = write_checks(tmp_path / "ci.yaml", [{"placement": "", "max_imbalance": 2}], defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg)]) == 2
    assert "'placement' must be a path (a non-empty string), got ''" in capsys.readouterr().err
    cfg = write_checks(tmp_path / "ci.yaml", [{"placement": "~/p.json", "trace": "sub/../t.npz", "max_imbalance": 2}])
    (check,) = read_checks(cfg)
    assert check["placement"] == Path.home() / "p.json" and check["trace"] == tmp_path / "t.npz"


def test_check_goes_on_after_out_of_memory_or_deep_nesting(tmp_path: Path, trace_path: Path,
                                                          capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A check whose input exhausts memory or the recursion limit is an ERROR line; the gate
    runs the other checks (it used to abort on the first)."""
    import moeplace.eval.cli as eval_cli
    affinity_placement(trace_path, None, tmp_path / "good.json")
    real = eval_cli.load_placement

    def load(path: Path) -> Placement:
        if path.name in ("big.json", "deep.json"):
            raise MemoryError() if path.name == "big.json" else RecursionError("maximum recursion depth exceeded")
        return real(path)

    monkeypatch.setattr(eval_cli, "load_placement", load)
    cfg = write_checks(tmp_path / "ci.yaml", [
        {"name": "big", "placement": "big.json", "max_cross_gpu": 1},
        {"name": "deep", "placement": "deep.json", "max_cross_gpu": 1},
        {"name": "ok", "placement": "good.json", "max_cross_gpu": 1},
    ], defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg)]) == 2
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == f"ERROR big: out of memory evaluating {tmp_path / 'big.json'} on {trace_path} (is an input far larger than intended?)"
    assert lines[1] == f"ERROR deep: input nested too deeply, evaluating {tmp_path / 'deep.json'} on {trace_path}"
    assert lines[2].startswith("PASS  ok (200 all tokens)")
    assert captured.err.strip() == "moeplace: error: 2 of 3 checks could not run (1 passed, 0 failed)"


def test_eval_sizes_are_bounded(tmp_path: Path, trace_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A 1e300 hidden size overflowed float (exit 3): from --hidden-size, config.json or a cost-model
    YAML it is one line, exit 2."""
    affinity_placement(trace_path, None, tmp_path / "p.json")
    args = ["eval", str(tmp_path / "p.json"), str(trace_path)]
    trace = load_trace(trace_path)
    seqs = tmp_path / "seqs.npz"  # traffic needs sequences and positions
    save_trace(make_trace(trace.topk_ids, num_experts=8, sequence_ids=np.repeat(np.arange(20), 10),
                          positions=np.tile(np.arange(10), 20)), seqs)
    assert run([*args[:2], str(seqs), "--hidden-size", "1" + "0" * 400]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not an integer in the range 1<=x<=1048576" in err and len(err) < 200, err
    assert run([*args[:2], str(seqs), "--hidden-size", str(2**20), "--json"]) == 0  # the bound itself is fine
    assert json.loads(capsys.readouterr().out)["traffic"]["hidden_size"] == 2**20
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 10**300, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 8, "num_experts_per_tok": 2}))
    assert run(args + ["--model", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "config.json hidden_size 10000000000000000000... (301 characters) is more than 1048576" in err
    cluster = tmp_path / "c.yaml"
    cluster.write_text("cluster: {nodes: 2, gpus_per_node: 2, intra_node: {bandwidth_GBps: 400, latency_us: 5},\n"
                       "          inter_node: {bandwidth_GBps: 50, latency_us: 10}}\n"
                       "model: {hidden_size: 1" + "0" * 300 + ", expert_us_per_token: 0.01}\n")
    assert run(args + ["--cluster", str(cluster)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'hidden_size' must be at most 1048576" in err, err
    cluster.write_text(cluster.read_text().replace("1" + "0" * 300, "64").replace("nodes: 2", "nodes: 1"))
    assert run(args + ["--cluster", str(cluster)]) == 2  # the placement is 2 x 2 GPUs
    assert f"cluster config {cluster} has 1 node(s) x 2 GPUs" in capsys.readouterr().err


CLUSTER_2X2 = ("cluster: {nodes: 2, gpus_per_node: 2, intra_node: {bandwidth_GBps: 400, latency_us: 5},\n"
               "          inter_node: {bandwidth_GBps: 50, latency_us: 10}}\n"
               "model: {hidden_size: 64, expert_us_per_token: 0.01}\n")


def test_moe_time_ratio_gate_in_eval_and_check(tmp_path: Path, trace_path: Path, capsys) -> None:
    """The quantity the latency objective optimises can gate CI: eval --max-moe-time-ratio, check's max_moe_time_ratio."""
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "p.json")
    (tmp_path / "cfg").mkdir()
    cluster = tmp_path / "cfg" / "c.yaml"
    cluster.write_text(CLUSTER_2X2)
    args = ["eval", str(tmp_path / "p.json"), str(trace_path), "--cluster", str(cluster)]
    rc, report = eval_json(capsys, *args[1:])
    ratio = report["vs_contiguous"]["placement"]["moe_time_us"]
    assert rc == 0 and 0 < ratio < 1  # the affinity pays in predicted time too
    assert run(args + ["--max-moe-time-ratio", f"{ratio + 0.01}"]) == 0
    assert f"moeplace eval: PASS: predicted MoE time / contiguous {ratio:.4f} <= {ratio + 0.01:g} (--max-moe-time-ratio" \
        in capsys.readouterr().out
    assert run(args + ["--max-moe-time-ratio", f"{ratio - 0.01}", "-o", str(tmp_path / "r.json")]) == 1
    assert capsys.readouterr().err.startswith("moeplace eval: FAIL: predicted MoE time / contiguous ")
    (result,) = json.loads((tmp_path / "r.json").read_text())["gates"]["results"]
    assert result["metric"] == "moe_time_us/contiguous" and result["value"] == pytest.approx(ratio)
    assert run(args[:3] + ["--max-moe-time-ratio", "1"]) == 2  # no cost model, no time
    assert "--max-moe-time-ratio needs --cluster" in capsys.readouterr().err
    # check: cluster (and model_config) relative to the YAML file
    cfg = write_checks(tmp_path / "cfg" / "ci.yaml", [
        {"name": "fast", "placement": "../p.json", "cluster": "c.yaml", "max_moe_time_ratio": ratio + 0.01},
        {"name": "slow", "placement": "../p.json", "cluster": "c.yaml", "max_moe_time_ratio": ratio - 0.01},
    ], defaults={"trace": f"../{trace_path.name}"})
    assert run(["check", str(cfg)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS  fast (100 held-out tokens): moe_time_us/contiguous ")
    assert lines[1].startswith("FAIL  slow (100 held-out tokens): moe_time_us/contiguous ")
    cfg = write_checks(tmp_path / "ci.yaml", [{"placement": "p.json", "trace": "trace.npz", "max_moe_time_ratio": 1}])
    assert run(["check", str(cfg)]) == 2  # no cluster, and the placement records no cost model
    assert capsys.readouterr().out == (f"ERROR check 1: max_moe_time_ratio needs 'cluster' (a cluster config YAML; "
                                       f"model_config too when it has no model section): {tmp_path / 'p.json'} records "
                                       "no cost model (`moeplace solve --objective latency --cluster ...` records one)\n")


def replicated_placement(trace_path: Path, split: dict | None, path: Path) -> Placement:
    """The affinity layout plus a copy of experts 0-3 on the next GPU: 4 redundant experts per layer."""
    trace = load_trace(trace_path)
    e2g = np.stack([((np.arange(8) - layer) % 8) // 2 for layer in range(4)])
    replicas = [[(e, int((e2g[layer, e] + 1) % 4)) for e in range(4)] for layer in range(4)]
    p = Placement(e2g, num_gpus=4, gpus_per_node=2, replicas=replicas, trace_sha256=trace.sha256, split=split)
    p.save(path)
    return p


def test_replicas_get_an_eplb_baseline_with_as_many_copies(tmp_path: Path, trace_path: Path, capsys) -> None:
    replicated_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "p.json")
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(trace_path))
    assert rc == 0 and list(report["layouts"]) == ["placement", "contiguous", "round_robin", "random", "greedy_load", "eplb"]
    trace = load_trace(trace_path)
    train, held = split_tokens(trace.num_tokens, 0.5, 0)
    eplb, _ = eplb_placement(trace.select_tokens(train).expert_loads(), 4, 2, redundant=4)  # on the fit tokens
    assert report["layouts"]["eplb"] == pytest.approx(evaluate(eplb, trace.select_tokens(held)))
    assert report["copies"] == {"placement": 16, "contiguous": 0, "round_robin": 0, "random": 0, "greedy_load": 0,
                                "eplb": sum(len(r) for r in eplb.replicas)}
    assert "eplb: DeepSeek's EPLB with 4 redundant experts per layer" in report["baselines_note"]
    assert "fitted on the placement's fit tokens" in report["baselines_note"]
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[4].split() == ["layout", "copies", "cross-GPU", "top-1", "cross-node", "top-1", "dest", "GPUs", "top-k",
                               "dest", "nodes", "top-k", "imbalance", "max", "imbalance", "mean"]
    assert text[5].split()[:2] == ["placement", "16"] and text[6].split()[:2] == ["contiguous", "0"]
    # another trace: the fit tokens are unknown, so without recorded fit loads eplb balances the
    # evaluated ones, and says so
    other = trace.select_tokens(np.arange(150))
    save_trace(other, tmp_path / "other.npz")
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(tmp_path / "other.npz"))
    assert "fitted on the evaluated tokens (the placement records no fit loads)" in report["baselines_note"]
    # with them (solve records them), greedy_load and eplb are the layouts fitted on those, not an
    # oracle fitted on the replayed tokens
    p = replicated_placement(trace_path, None, tmp_path / "p.json")
    fit_loads = trace.select_tokens(train).expert_loads()
    p = replace(p, fit_loads=fit_loads)
    p.save(tmp_path / "p.json")
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(tmp_path / "other.npz"))
    assert rc == 0 and "greedy_load and eplb fitted on the placement's recorded fit loads" in report["baselines_note"]
    eplb, _ = eplb_placement(fit_loads, 4, 2, redundant=4)
    assert report["layouts"]["eplb"] == pytest.approx(evaluate(eplb, other))
    assert report["layouts"]["greedy_load"] == pytest.approx(evaluate(Placement(greedy_load(fit_loads, 4), 4, 2), other))
    assert not np.array_equal(greedy_load(fit_loads, 4), greedy_load(other.expert_loads(), 4))  # the test can tell
    # no replicas: no eplb row, no copies column (the table as it was)
    affinity_placement(trace_path, None, tmp_path / "q.json")
    assert run(["eval", str(tmp_path / "q.json"), str(trace_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[4].split()[:2] == ["layout", "cross-GPU"] and [line.split()[0] for line in out[5:10]] == [
        "placement", "contiguous", "round_robin", "random", "greedy_load"] and out[10].startswith("  (x: ")


def test_a_trace_of_a_renumbered_checkpoint_warns(tmp_path: Path, trace_path: Path, capsys) -> None:
    """A trace of a `permute-checkpoint` output uses its re-ordered ids: eval used to score the
    placement 2.5x worse than contiguous without a word. It warns (never refuses)."""
    trace = load_trace(trace_path)
    placed = tmp_path / "tiny-moe-placed"
    placed.mkdir()
    (placed / "moeplace_permutation.json").write_text(json.dumps({"format": "moeplace.permutation/v1",
                                                                  "source": "ckpt/tiny-moe"}))
    meta = {"model_type": "mixtral", "moe_layers": [0, 1, 2, 3]}
    save_trace(make_trace(trace.topk_ids, trace.topk_weights, 8, meta={**meta, "model": "ckpt/tiny-moe"}), tmp_path / "fit.npz")
    save_trace(make_trace(trace.topk_ids[:100], None, 8, meta={**meta, "model": str(placed)}), tmp_path / "perm.npz")
    save_trace(make_trace(trace.topk_ids[:100], None, 8, meta={**meta, "model": "ckpt/other-moe"}), tmp_path / "other.npz")
    save_trace(make_trace(trace.topk_ids[:100], None, 8, meta={**meta, "model": "moved/tiny-moe"}), tmp_path / "moved.npz")
    out = tmp_path / "p.json"
    assert run(["solve", str(tmp_path / "fit.npz"), "--gpus", "4", "-q", "-o", str(out)]) == 0
    capsys.readouterr()
    assert run(["eval", str(out), str(tmp_path / "perm.npz")]) == 0
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"moeplace: warning: {tmp_path / 'perm.npz'} is a trace of {placed}, the placement was "
                              "fitted on ckpt/tiny-moe's routing")
    assert "renumbered by `moeplace permute-checkpoint` (from ckpt/tiny-moe)" in warning and "contiguous row" in warning
    assert run(["eval", str(out), str(tmp_path / "other.npz")]) == 0
    (warning,) = capsys.readouterr().err.splitlines()
    assert "is a trace of ckpt/other-moe, the placement was fitted on ckpt/tiny-moe's routing" in warning
    assert run(["eval", str(out), str(tmp_path / "moved.npz")]) == 0  # the same checkpoint moved: no warning
    assert capsys.readouterr().err == ""
    # the trace's meta says it (trace records renumbered_from): the directory need not be here
    shutil.rmtree(placed)
    gone = {**meta, "model": str(placed), "renumbered_from": "ckpt/tiny-moe"}
    save_trace(make_trace(trace.topk_ids[:100], None, 8, meta=gone), tmp_path / "gone.npz")
    assert run(["eval", str(out), str(tmp_path / "gone.npz")]) == 0
    assert "renumbered by `moeplace permute-checkpoint` (from ckpt/tiny-moe)" in capsys.readouterr().err
    # a placement fitted on the renumbered checkpoint's routing, scored on more of it: the same ids
    save_trace(make_trace(trace.topk_ids, trace.topk_weights, 8, meta=gone), tmp_path / "fit-placed.npz")
    assert run(["solve", str(tmp_path / "fit-placed.npz"), "--gpus", "4", "-q", "-o", str(tmp_path / "q.json")]) == 0
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "q.json"), str(tmp_path / "gone.npz")]) == 0
    assert capsys.readouterr().err == ""


def test_eval_and_check_score_a_placement_on_a_load_only_file(tmp_path: Path, capsys) -> None:
    """`moeplace import loads-json` output: eval scores load balance against contiguous, greedy_load and eplb."""
    loads = np.array([[40, 10, 10, 10, 5, 5, 10, 10], [1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.float64)
    save_loads(ExpertLoads(loads, {"source": "loads-json"}), tmp_path / "loads.npz")
    replicas = [[(0, 1), (0, 2), (0, 3), (1, 2)], [(7, 0), (6, 1), (7, 1), (6, 0)]]  # 8 + 4 slots on 4 GPUs
    p = Placement(np.array([[0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 1, 1, 2, 2, 3, 3]]), 4, 4, replicas=replicas)
    p.save(tmp_path / "p.json")
    args = ["eval", str(tmp_path / "p.json"), str(tmp_path / "loads.npz")]
    rc, report = eval_json(capsys, *args[1:])
    assert rc == 0 and list(report["layouts"]) == ["placement", "contiguous", "greedy_load", "eplb"]
    expected = imbalance(expected_gpu_loads(p, loads))
    assert report["layouts"]["placement"]["imbalance_per_layer"] == pytest.approx(expected.tolist())
    assert report["layouts"]["contiguous"]["imbalance_per_layer"] == pytest.approx([50 / 25, 15 / 9])
    assert "cross_gpu_top1" not in report["layouts"]["placement"] and "no token paths" in report["loads"]["note"]
    assert report["copies"]["placement"] == 8 and report["copies"]["eplb"] > 0
    assert run(args + ["--max-imbalance", f"{expected.max() - 0.01}"]) == 1
    assert capsys.readouterr().err.startswith("moeplace eval: FAIL: imbalance max ")
    assert run(args + ["--max-imbalance", "5"]) == 0
    assert "moeplace eval: PASS: imbalance max" in capsys.readouterr().out
    assert run(args + ["--max-cross-gpu", "1"]) == 2
    assert "load-only file (no token paths): only the imbalance thresholds apply" in capsys.readouterr().err
    assert run(args + ["--hidden-size", "64"]) == 2
    assert "load-only file" in capsys.readouterr().err
    cfg = write_checks(tmp_path / "ci.yaml", [{"placement": "p.json", "trace": "loads.npz", "max_imbalance_vs_contiguous": 0.9}])
    assert run(["check", str(cfg)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("PASS  check 1 (expert loads): imbalance_max/contiguous ") and lines[1].startswith("      loads: ")
    # a placement that records its fit loads: the baselines are fitted on those, not on the file replayed
    fit = np.array([[10, 10, 10, 10, 10, 10, 10, 40], [8, 7, 6, 5, 4, 3, 2, 1]], dtype=np.float64)
    p = replace(p, fit_loads=fit)
    p.save(tmp_path / "p.json")
    rc, report = eval_json(capsys, *args[1:])
    assert rc == 0 and "greedy_load and eplb fitted on the placement's recorded fit loads" in report["baselines_note"]
    want = imbalance(expected_gpu_loads(Placement(greedy_load(fit, 4), 4, 4), loads))
    assert report["layouts"]["greedy_load"]["imbalance_per_layer"] == pytest.approx(want.tolist())
    assert not np.array_equal(greedy_load(fit, 4), greedy_load(loads, 4))
    # the loads line says whether they are the fit loads (in-sample), as the tokens line does;
    # and counts as `import` does (before: 1.4e+06 token-expert selections, not in- or out-of-sample)
    assert report["loads"]["note"].endswith("; other loads than the placement was fitted on")
    save_loads(ExpertLoads(fit * 1e4, {"source": "loads-json"}), tmp_path / "big.npz")
    p = replace(p, fit_loads=fit * 1e4)
    p.save(tmp_path / "p.json")
    assert run(["eval", str(tmp_path / "p.json"), str(tmp_path / "big.npz")]) == 0
    out = capsys.readouterr().out
    assert "  loads: 1460000 token-expert selections, a load-only file" in out, out
    assert "; in-sample: the placement was fitted on these loads\n" in out


def test_eval_dtype_takes_serve_and_short_spellings(tmp_path: Path, trace_path: Path, capsys) -> None:
    affinity_placement(trace_path, None, tmp_path / "p.json")
    trace = load_trace(trace_path)
    seqs = tmp_path / "seqs.npz"
    save_trace(make_trace(trace.topk_ids, num_experts=8, sequence_ids=np.repeat(np.arange(20), 10),
                          positions=np.tile(np.arange(10), 20)), seqs)
    got = {}
    for dtype in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16"):
        rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(seqs), "--hidden-size", "64", "--dtype", dtype)
        assert rc == 0
        got[dtype] = (report["traffic"]["dtype"], report["traffic"]["element_bytes"])
    assert got["fp32"] == got["float32"] == ("float32", 4)
    assert got["bf16"] == got["bfloat16"] == ("bfloat16", 2) and got["fp16"] == got["float16"] == ("float16", 2)


def test_a_cost_model_of_another_hidden_size_than_the_traced_one_warns(tmp_path: Path, trace_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """eval --cluster/--model-config, --hidden-size and check never compared the hidden size they
    predict with to the traced model's (trace meta hidden_size, `moeplace trace` records it): one
    warning line each naming both values and files; equal sizes, or no meta hidden_size, say nothing."""
    trace = load_trace(trace_path)
    tokens = trace.num_tokens
    for name, meta in [("h64", {"hidden_size": 64}), ("h1024", {"hidden_size": 1024}), ("plain", {})]:
        save_trace(make_trace(trace.topk_ids, num_experts=8, sequence_ids=np.arange(tokens) // 10,
                              positions=np.arange(tokens) % 10, meta=meta), tmp_path / f"{name}.npz")
    affinity_placement(trace_path, None, tmp_path / "p.json")
    (tmp_path / "c.yaml").write_text(CLUSTER_2X2.split("model:")[0])
    (tmp_path / "m.yaml").write_text("model: {hidden_size: 1024, expert_us_per_token: 0.01}\n")
    cost = ["--cluster", str(tmp_path / "c.yaml"), "--model-config", str(tmp_path / "m.yaml")]

    def warnings(name: str, *args: str) -> list[str]:
        assert run(["eval", str(tmp_path / "p.json"), str(tmp_path / f"{name}.npz"), *args]) == 0
        return [line for line in capsys.readouterr().err.splitlines() if "hidden_size" in line]

    (line,) = warnings("h64", *cost)
    assert line.startswith(f"moeplace: warning: {tmp_path / 'h64.npz'} is a trace of a model of hidden_size 64 "
                           f"(trace meta), {tmp_path / 'm.yaml'} gives hidden_size 1024: ")
    assert warnings("h1024", *cost) == [] and warnings("plain", *cost) == []
    (line,) = warnings("h1024", "--hidden-size", "512")
    assert "hidden_size 1024 (trace meta), --hidden-size gives hidden_size 512: " in line
    assert warnings("h64", "--hidden-size", "64") == [] and warnings("plain", "--hidden-size", "512") == []
    # both predictions, each its own size: one line for the one that differs
    (line,) = warnings("h64", *cost, "--hidden-size", "64")
    assert f"{tmp_path / 'm.yaml'} gives hidden_size 1024" in line
    # check, a cost model with the model section in the cluster file: that file is named
    (tmp_path / "cm.yaml").write_text(CLUSTER_2X2)
    cfg = write_checks(tmp_path / "ci.yaml", [{"placement": "p.json", "trace": "h1024.npz", "cluster": "cm.yaml",
                                                "max_moe_time_ratio": 10}])
    assert run(["check", str(cfg)]) == 0
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "hidden_size" in line]
    assert f"hidden_size 1024 (trace meta), {tmp_path / 'cm.yaml'} gives hidden_size 64" in line


def test_a_model_config_of_another_expert_count_or_top_k_warns(tmp_path: Path, trace_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """A model config that states num_experts / top_k (the shipped ones do) is checked against the
    trace's shape, which every trace has: FLAME's import records no hidden_size, and Mixtral's
    figures on it predicted 35x the time without a word. Matching or unstated counts say nothing."""
    trace = load_trace(trace_path)  # 8 experts, top-2
    affinity_placement(trace_path, None, tmp_path / "p.json")
    (tmp_path / "c.yaml").write_text(CLUSTER_2X2.split("model:")[0])
    model = "model: {hidden_size: 1024, expert_us_per_token: 0.01%s}\n"
    for name, extra in [("mix", ", num_experts: 8, top_k: 2"), ("unstated", ""), ("e64", ", num_experts: 64, top_k: 2"),
                        ("k6", ", num_experts: 8, top_k: 6"), ("flame", ", num_experts: 64, top_k: 6")]:
        (tmp_path / f"{name}.yaml").write_text(model % extra)
    assert (trace.num_experts, trace.top_k) == (8, 2)

    def warnings(name: str) -> list[str]:
        assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "--cluster", str(tmp_path / "c.yaml"),
                    "--model-config", str(tmp_path / f"{name}.yaml")]) == 0
        return [line for line in capsys.readouterr().err.splitlines() if "is a trace of a model of" in line]

    assert warnings("mix") == [] and warnings("unstated") == []
    (line,) = warnings("e64")
    assert line == (f"moeplace: warning: {trace_path} is a trace of a model of num_experts 8, {tmp_path / 'e64.yaml'} "
                    "gives num_experts 64: predicted bytes and times are those of that model (if that is not the "
                    "what-if intended, give the traced model's figures)")
    assert f"of top_k 2, {tmp_path / 'k6.yaml'} gives top_k 6: " in warnings("k6")[0]
    assert f"of num_experts 8, top_k 2, {tmp_path / 'flame.yaml'} gives num_experts 64, top_k 6: " in warnings("flame")[0]
    # solve --objective latency says it before solving
    assert run(["solve", str(trace_path), "--gpus", "4", "--gpus-per-node", "2", "--objective", "latency",
                "--cluster", str(tmp_path / "c.yaml"),
                "--model-config", str(tmp_path / "flame.yaml"), "--time-limit", "2", "-q",
                "-o", str(tmp_path / "q.json")]) == 0
    assert "of num_experts 8, top_k 2, " in capsys.readouterr().err


def test_load_report_baselines_need_an_expert_per_gpu() -> None:
    from moeplace.eval.report import build_load_report

    loads = np.array([[4.0, 2.0, 1.0, 1.0]])
    report = build_load_report(Placement(np.array([[0, 1, 2, 3]]), 4, 4), loads)  # G == E: one expert each
    assert list(report["layouts"]) == ["placement", "contiguous", "greedy_load", "eplb"]
    assert report["num_layers"] == 1 and report["num_experts"] == 4 and report["loads"]["total"] == 8.0
    assert report["baselines_note"].endswith("greedy_load and eplb fitted on these loads")
    # 2 experts on 4 GPUs (copies fill the rest): no baseline can give every GPU an expert
    spread = Placement(np.array([[0, 1]]), 4, 4, replicas=[[(0, 2), (1, 3)]])
    report = build_load_report(spread, np.array([[3.0, 1.0]]))
    assert list(report["layouts"]) == ["placement"] and report["baselines_note"] == "" and report["vs_contiguous"] == {}
    assert report["layouts"]["placement"]["imbalance_per_layer"] == pytest.approx([1.5 / 1.0])


def test_random_baseline_is_seeded_as_the_solve_was(trace_path: Path) -> None:
    """build_report: random uses the placement's solver.seed, else 0; an explicit seed wins."""
    from moeplace.eval.report import build_report
    from moeplace.solve.baselines import random_balanced

    trace = load_trace(trace_path)
    e2g = np.stack([((np.arange(8) - layer) % 8) // 2 for layer in range(4)])

    def random_row(seed: int) -> dict:
        return evaluate(Placement(random_balanced(4, 8, 4, seed), 4, 2), trace)

    assert len({random_row(s)["cross_gpu_top1"] for s in (0, 5, 8)}) == 3  # the test can tell the seeds apart
    seeded = Placement(e2g, 4, 2, solver={"name": "x", "seed": 5})
    assert build_report(seeded, trace)["layouts"]["random"] == pytest.approx(random_row(5))
    assert build_report(seeded, trace, seed=8)["layouts"]["random"] == pytest.approx(random_row(8))
    unseeded = Placement(e2g, 4, 2, solver={"name": "x", "seed": "5"})  # not an int: seed 0
    assert build_report(unseeded, trace)["layouts"]["random"] == pytest.approx(random_row(0))


def test_baselines_need_an_expert_per_gpu_and_eplb_may_refuse(tmp_path: Path) -> None:
    """build_report: G == E still gets every baseline; G > E none (said in the note); a replica
    count EPLB cannot lay out (E + R not a multiple of G) drops the eplb row, the note says why."""
    from moeplace.eval.report import build_load_report, build_report

    ids = np.array([[[0], [1]], [[2], [3]], [[3], [0]]])
    trace = make_trace(ids, num_experts=4)
    report = build_report(Placement(np.array([[0, 1, 2, 3], [1, 2, 3, 0]]), 4, 2), trace)  # G == E
    assert list(report["layouts"]) == ["placement", "contiguous", "round_robin", "random", "greedy_load"]
    assert report["tokens"]["note"] == "all tokens (the placement records no trace)"
    spread = Placement(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), 8, 4,
                       replicas=[[(0, 4), (1, 5), (2, 6), (3, 7)], [(0, 4), (1, 5), (2, 6), (3, 7)]])
    report = build_report(spread, trace)  # 8 GPUs for 4 experts: no baseline can fill them
    assert list(report["layouts"]) == ["placement"] and report["vs_contiguous"] == {} and report["baselines_note"] == ""
    assert report["tokens"]["note"].endswith("; no baselines: 8 GPUs for 4 experts leave some GPU without one")
    # 4 experts + 1 copy = 5 slots on 4 GPUs: EPLB refuses, the other baselines stay
    one_copy = Placement(np.array([[0, 1, 2, 3], [1, 2, 3, 0]]), 4, 2, replicas=[[(0, 1)], []])
    why = ("no eplb baseline (EPLB needs physical slots (5) >= experts (4) and a multiple of GPUs (4), and GPUs "
           "a multiple of nodes (2)); greedy_load and eplb fitted on the evaluated tokens (the placement records "
           "no fit loads)")
    report = build_report(one_copy, trace)
    assert list(report["layouts"]) == ["placement", "contiguous", "round_robin", "random", "greedy_load"]
    assert report["baselines_note"] == why and report["copies"]["placement"] == 1
    report = build_load_report(one_copy, trace.expert_loads())
    assert list(report["layouts"]) == ["placement", "contiguous", "greedy_load"]
    assert report["baselines_note"] == why.split("; ")[0] + "; greedy_load and eplb fitted on these loads"


def test_replay_progress_counts_each_layout(trace_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The progress line (shown on a replay longer than a second) counts up to every layout, by name."""
    import moeplace.eval.report as report_module

    calls: list[tuple[float, str]] = []

    class Recorder:
        def __init__(self, label: str, total: float | None = None) -> None:
            assert total == 5  # the placement and 4 baselines

        def update(self, done: float, note: str = "") -> None:
            calls.append((done, note))

        def close(self) -> None:
            calls.append((-1, "closed"))

    monkeypatch.setattr(report_module, "Progress", Recorder)
    report_module.build_report(Placement(contiguous(4, 8, 4), 4, 2), load_trace(trace_path))
    assert calls == [(1, "placement"), (2, "contiguous"), (3, "round_robin"), (4, "random"), (5, "greedy_load"),
                     (-1, "closed")]


def test_threshold_results_on_ratios_and_missing_metrics() -> None:
    """A node ratio on two nodes is judged like any other. Where contiguous's value is 0 there is
    no ratio: the threshold holds when the placement's is 0 too (n/a; on one node, for a node
    metric, "one node") and fails otherwise, as against a zero baseline; no contiguous layout at
    all, or a missing metric, is one line."""
    from moeplace.errors import MoeplaceError
    from moeplace.eval.gates import Verdict, threshold_results

    report = {"trace": "t.npz", "num_nodes": 2,
              "layouts": {"placement": {"cross_gpu_top1": 0.0, "cross_node_top1": 0.3, "dest_nodes_topk": 0.0,
                                        "dest_gpus_topk": 0.25},
                          "contiguous": {"cross_gpu_top1": 0.0, "cross_node_top1": 0.4, "dest_nodes_topk": 0.0,
                                         "dest_gpus_topk": 0.0}},
              "vs_contiguous": {"placement": {"cross_node_top1": 0.75}}}
    assert threshold_results(report, {"max_cross_node_vs_contiguous": 0.5, "max_dest_nodes_vs_contiguous": 0.5,
                                      "max_cross_gpu_vs_contiguous": 1.0, "max_dest_gpus_vs_contiguous": 9.0}) == [
        Verdict("cross_node_top1/contiguous", 0.75, 0.5, False, "max_cross_node_vs_contiguous"),
        Verdict("dest_nodes_topk/contiguous", None, 0.5, True, "max_dest_nodes_vs_contiguous",
                note="n/a (0 here and in contiguous)"),
        Verdict("cross_gpu_top1/contiguous", None, 1.0, True, "max_cross_gpu_vs_contiguous",
                note="n/a (0 here and in contiguous)"),
        Verdict("dest_gpus_topk/contiguous", None, 9.0, False, "max_dest_gpus_vs_contiguous",
                note="n/a: 0.25 where contiguous has 0, worse at any ratio")]
    one_node = {**report, "num_nodes": 1}
    assert threshold_results(one_node, {"max_dest_nodes_vs_contiguous": 0.5}) == [
        Verdict("dest_nodes_topk/contiguous", None, 0.5, True, "max_dest_nodes_vs_contiguous", note="n/a (one node)")]
    no_contiguous = {**report, "layouts": {"placement": report["layouts"]["placement"]}, "vs_contiguous": {}}
    with pytest.raises(MoeplaceError, match=r"^max_cross_gpu_vs_contiguous: no contiguous cross_gpu_top1 to compare "
                                            r"with on this trace$"):
        threshold_results(no_contiguous, {"max_cross_gpu_vs_contiguous": 1.0})
    with pytest.raises(MoeplaceError, match=r"^max_moe_time_ratio: the report has no moe_time_us \(the predicted MoE "
                                            r"time needs a cluster config\)$"):
        threshold_results(report, {"max_moe_time_ratio": 1.0})


def test_gate_values_take_the_fewest_digits_that_keep_the_verdict() -> None:
    """shown(): 4 decimals unless they contradict the verdict, then 6 significant digits, 7, ..."""
    from moeplace.eval.gates import Verdict, shown

    assert shown(Verdict("x", 0.58394, 0.6, True)) == ("0.5839", "0.6")
    assert shown(Verdict("x", 0.5839126, 0.58391, False)) == ("0.583913", "0.58391")  # 0.5839 <= 0.58391 would pass
    assert shown(Verdict("x", 0.58391234, 0.583912, False)) == ("0.5839123", "0.583912")
    # one ulp apart: only 17 significant digits tell them apart (16 give 0.3000000000000000 > 0.3)
    assert shown(Verdict("x", float(np.nextafter(0.3, 1)), 0.3, False)) == ("0.30000000000000004", "0.29999999999999999")


def test_eval_option_checks_json_layout_and_check_summary(tmp_path: Path, trace_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    affinity_placement(trace_path, None, tmp_path / "p.json")
    args = ["eval", str(tmp_path / "p.json"), str(trace_path)]
    (tmp_path / "m.yaml").write_text("model: {hidden_size: 64, expert_us_per_token: 0.01}\n")
    assert run(args + ["--model-config", str(tmp_path / "m.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "moeplace: error: --model-config needs --cluster"
    assert run(args + ["--json"]) == 0  # the report as JSON, indented by 2 (as -o writes it)
    out = capsys.readouterr().out
    assert out.startswith('{\n  "placement": ') and out == json.dumps(json.loads(out), indent=2) + "\n"
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "a", "placement": "p.json", "max_cross_gpu": 1},
                                              {"name": "b", "placement": "p.json", "max_imbalance": 10}],
                       defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "moeplace check: PASS: all 2 checks passed"


def test_eplb_baseline_takes_the_expert_groups_of_the_trace_meta(trace_path: Path) -> None:
    """num_groups in the trace meta reaches EPLB: groups that divide the experts and spread over the
    nodes give its hierarchical policy; none, or groups that do not divide the experts, the global one."""
    from moeplace.eval.report import build_report

    trace = load_trace(trace_path)
    e2g = np.stack([((np.arange(8) - layer) % 8) // 2 for layer in range(4)])
    replicas = [[(e, int((e2g[layer, e] + 1) % 4)) for e in range(4)] for layer in range(4)]
    p = Placement(e2g, 4, 2, replicas=replicas)  # 8 experts + 4 copies on 2 nodes x 2 GPUs
    policies = {}
    for groups in (None, 2, 3):
        meta = {} if groups is None else {"num_groups": groups}
        note = build_report(p, make_trace(trace.topk_ids, num_experts=8, meta=meta))["baselines_note"]
        policies[groups] = note.split("redundant experts per layer (")[1].split(")")[0]
    assert policies == {None: "eplb-global", 2: "eplb-hierarchical", 3: "eplb-global"}


@pytest.mark.parametrize("doc, message", [
    ("checks: [{placement: p.json, trace: t.npz, max_imbalance: 2}, 3]", "ci.yaml: check 2 must be a mapping"),
    ("checks: [{name: a, placement: p.json, trace: t.npz, max_imbalance: 2},\n"
     "         {placement: q.json, trace: t.npz, max_imbalanse: 2}]", "ci.yaml: check 2 (unnamed): unknown keys ['max_imbalanse']; thresholds are "
     "max_<cross_gpu|cross_node|dest_gpus|dest_nodes|imbalance>[_vs_contiguous|_vs_baseline], max_moe_time_ratio, "
     "max_moe_time_vs_baseline"),
    ("checks: [{name: a, placement: p.json, trace: t.npz, model_config: m.yaml, max_imbalance: 2}]",
     "ci.yaml: check 1 (a): model_config needs cluster"),
    ("checks: [{placement: p.json, trace: t.npz, all_tokens: 'yes', max_imbalance: 2}]",
     "ci.yaml: check 1 (unnamed): all_tokens must be true or false"),
    ("checks: [{placement: p.json, trace: t.npz, max_imbalance: -0.5}]",
     "ci.yaml: check 1 (unnamed): max_imbalance must be a non-negative number, got -0.5"),
    # limits no placement can pass: max/mean >= 1, a ratio of positive imbalances or times > 0
    ("checks: [{placement: p.json, trace: t.npz, max_imbalance: 0.5}]",
     "ci.yaml: check 1 (unnamed): max_imbalance 0.5: the imbalance (max/mean load per GPU) is at least 1 (1: every "
     "GPU at the mean), so no placement passes"),
    ("checks: [{placement: p.json, trace: t.npz, max_imbalance_vs_contiguous: 0}]",
     "ci.yaml: check 1 (unnamed): max_imbalance_vs_contiguous 0: the ratio of two positive imbalances is above 0, "
     "so no placement passes; give a positive ratio"),
    ("checks: [{placement: p.json, trace: t.npz, max_moe_time_ratio: 0}]",
     "ci.yaml: check 1 (unnamed): max_moe_time_ratio 0: the ratio of two positive times is above 0, so no "
     "placement passes; give a positive ratio"),
    ("checks: [{name: true, placement: p.json, trace: t.npz, max_imbalance: 2}]",
     "ci.yaml: check 1 (True): name must be a string, got True"),  # a bool is no numeric name
])
def test_check_config_errors_name_the_check(tmp_path: Path, doc: str, message: str) -> None:
    from moeplace.errors import MoeplaceError

    cfg = tmp_path / "ci.yaml"
    cfg.write_text(doc)
    with pytest.raises(MoeplaceError) as e:
        read_checks(cfg)
    assert str(e.value) == f"{tmp_path}/{message}"


def test_check_config_values_as_read(tmp_path: Path) -> None:
    """read_checks: a 0 threshold is valid, `cluster: null` drops the default's, numeric names become
    strings, an unnamed check is `check N`, all_tokens is kept."""
    cfg = tmp_path / "ci.yaml"
    cfg.write_text("defaults: {trace: t.npz, cluster: c.yaml}\n"
                   "checks:\n"
                   "  - {name: 2026, placement: p.json, cluster: null, max_cross_gpu: 0, all_tokens: true}\n"
                   "  - {placement: q.json, max_moe_time_ratio: 0.9}\n")
    first, second = read_checks(cfg)
    assert first == {"name": "2026", "placement": tmp_path / "p.json", "trace": tmp_path / "t.npz", "all_tokens": True,
                     "limits": {"max_cross_gpu": 0.0}}
    assert second == {"name": "check 2", "placement": tmp_path / "q.json", "trace": tmp_path / "t.npz",
                      "cluster": tmp_path / "c.yaml", "limits": {"max_moe_time_ratio": 0.9}}


def test_traffic_report_names_the_model_folder_or_none(tmp_path: Path, trace_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    affinity_placement(trace_path, None, tmp_path / "p.json")
    trace = load_trace(trace_path)
    seqs = tmp_path / "seqs.npz"
    save_trace(make_trace(trace.topk_ids, num_experts=8, sequence_ids=np.repeat(np.arange(20), 10),
                          positions=np.tile(np.arange(10), 20)), seqs)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_local_experts": 8, "num_experts_per_tok": 2}))
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(seqs), "--hidden-size", "64")
    assert rc == 0 and report["traffic"]["model"] is None and report["traffic"]["kv_bytes_per_rank"] is None
    rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(seqs), "--model", str(model))
    # kv_sync row per decoder layer: 2 x 2 K/V heads x head_dim 16 x 2 bytes + 12 = 140, x 4 layers
    assert rc == 0 and report["traffic"]["model"] == str(model) and report["traffic"]["kv_bytes_per_rank"] == 4 * 140


def test_check_without_the_defaults_cluster_drops_its_cost_model_parts(tmp_path: Path) -> None:
    # `cluster: null` in a check used to keep the defaults' model_config ("model_config needs
    # cluster") and max_moe_time_ratio ("needs 'cluster'"): a check could not opt out in one key
    cfg = tmp_path / "ci.yaml"
    cfg.write_text("defaults: {trace: t.npz, cluster: c.yaml, model_config: m.yaml, max_moe_time_ratio: 0.9,\n"
                   "           max_imbalance: 1.5}\n"
                   "checks:\n"
                   "  - {name: loads, placement: p.json, cluster: null}\n"
                   "  - {name: own, placement: p.json, cluster: null, max_moe_time_ratio: 0.8}\n"
                   "  - {name: timed, placement: q.json}\n")
    # one the check sets itself stays: the cost model its placement records, if any, predicts the time
    loads, own, timed = read_checks(cfg)
    assert "cluster" not in own and own["limits"] == {"max_moe_time_ratio": 0.8, "max_imbalance": 1.5}
    assert loads == {"name": "loads", "placement": tmp_path / "p.json", "trace": tmp_path / "t.npz",
                     "limits": {"max_imbalance": 1.5}}
    assert timed["cluster"] == tmp_path / "c.yaml" and timed["model_config"] == tmp_path / "m.yaml"
    assert timed["limits"] == {"max_moe_time_ratio": 0.9, "max_imbalance": 1.5}


def test_model_shape_bounds_are_inclusive_and_the_kv_width_is_heads_times_dim(tmp_path: Path) -> None:
    """read_model_shape: hidden_size 2**20 and top_k == experts are valid (the bounds themselves);
    the K/V row is num_key_value_heads x head_dim wide, 2 x (2**19 + 1) is past 2**20; a missing
    config.json is named by its OS reason alone."""
    cfg = {"hidden_size": 2**20, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
           "head_dim": 2**19, "num_local_experts": 8, "num_experts_per_tok": 8}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert read_model_shape(tmp_path) == {"hidden_size": 2**20, "num_layers": 3, "num_kv_heads": 2,
                                          "head_dim": 2**19, "num_experts": 8, "top_k": 8}
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32, "head_dim": 2**19 + 1}))
    with pytest.raises(MoeplaceError, match=r"config.json num_key_value_heads x head_dim 1048578 is more than 1048576"):
        read_model_shape(tmp_path)
    with pytest.raises(MoeplaceError) as e:
        read_model_shape(tmp_path / "nope")
    assert str(e.value) == f"--model {tmp_path / 'nope'}: cannot read config.json: No such file or directory"


def test_a_share_limit_above_one_is_refused_as_a_percentage(tmp_path: Path, trace_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `--max-cross-gpu 60` (meant as 60%) printed PASS forever: a share never exceeds 1.
    Limits on counts (dest GPUs), imbalance and ratios to contiguous may exceed 1."""
    affinity_placement(trace_path, None, tmp_path / "p.json")
    args = ["eval", str(tmp_path / "p.json"), str(trace_path)]
    assert run([*args, "--max-cross-gpu", "60"]) == 2
    assert capsys.readouterr().err.strip() == (
        "moeplace: error: --max-cross-gpu 60: the cross-GPU top-1 share is a fraction in [0, 1], so this limit "
        "checks nothing; a percentage? give 0.6")
    assert run([*args, "--max-cross-node", "1.5"]) == 2
    assert "--max-cross-node 1.5: the cross-node top-1 share" in capsys.readouterr().err
    assert run([*args, "--max-cross-gpu", "1", "--max-dest-gpus", "3", "--max-imbalance", "4"]) == 0
    cfg = write_checks(tmp_path / "ci.yaml", [{"placement": "p.json", "trace": str(trace_path), "max_cross_gpu": 70}])
    assert run(["check", str(cfg)]) == 2
    assert "check 1 (unnamed): max_cross_gpu 70: the cross-GPU top-1 share is a fraction" in capsys.readouterr().err
    cfg = write_checks(tmp_path / "ok.yaml", [{"placement": "p.json", "trace": str(trace_path),
                                               "max_cross_gpu_vs_contiguous": 70}])
    assert run(["check", str(cfg)]) == 0


def test_check_given_another_kind_of_file_says_which(tmp_path: Path, trace_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a placement got "expected a mapping with a non-empty 'checks' list", a trace
    "not valid YAML ('utf-8' codec can't decode byte ...)"."""
    affinity_placement(trace_path, None, tmp_path / "p.json")
    assert run(["check", str(tmp_path / "p.json")]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "p.json: a moeplace.placement/v1 file, not a list of checks (a YAML file with a 'checks:' list, "
        "e.g. configs/check-example.yaml)")
    assert run(["check", str(trace_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(
        "trace.npz: not YAML but a zip archive (an .npz trace?): is it the right file, or are two arguments swapped?")


def test_eval_and_check_predict_with_the_cost_model_the_placement_records(tmp_path: Path, trace_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A latency solve records its cost model (objective.cost_model): eval and check predict the
    MoE time with it when given no cluster, and say so; --cluster still wins; max_moe_time_ratio
    needs no cluster then. A record of another model than the trace's, or a malformed one, is left
    out with a one-line warning, and is the one-line error (exit 2) of a gate that needs it."""
    (tmp_path / "c.yaml").write_text(CLUSTER_2X2.replace("model: {", "model: {name: tiny, num_experts: 8, top_k: 2, "))
    p = tmp_path / "p.json"
    assert run(["solve", str(trace_path), "--gpus", "4", "--gpus-per-node", "2", "--cluster", str(tmp_path / "c.yaml"),
                "--train-fraction", "0.5", "--time-limit", "2", "--quiet", "-o", str(p)]) == 0
    capsys.readouterr()
    rc, recorded = eval_json(capsys, str(p), str(trace_path))
    unnamed = f"{tmp_path / 'c.yaml'}: cluster"  # how a cluster config without a name is called
    assert rc == 0 and recorded["cost_model"] == {"source": "placement", "cluster": unnamed, "model": "tiny",
                                                  "batch_tokens": None}
    rc, given = eval_json(capsys, str(p), str(trace_path), "--cluster", str(tmp_path / "c.yaml"))
    assert rc == 0 and given["layouts"] == recorded["layouts"]  # the same cost model, the same times
    assert given["cost_model"]["source"] == "config" and given["cost_model"]["cluster_config"] == str(tmp_path / "c.yaml")
    assert recorded["layouts"]["placement"]["moe_time_us"] > 0
    assert run(["eval", str(p), str(trace_path)]) == 0
    assert (f"\n  predicted MoE time: us per step of the tokens scored; cost model recorded in the placement "
            f"({unnamed}, tiny)\n") in capsys.readouterr().out
    # an explicit --cluster wins: another expert cost, other times
    (tmp_path / "slow.yaml").write_text((tmp_path / "c.yaml").read_text().replace("0.01}", "1.0}"))
    rc, slow = eval_json(capsys, str(p), str(trace_path), "--cluster", str(tmp_path / "slow.yaml"))
    assert slow["layouts"]["placement"]["moe_time_us"] > recorded["layouts"]["placement"]["moe_time_us"]
    # the gate without --cluster, in eval and in check
    ratio = recorded["vs_contiguous"]["placement"]["moe_time_us"]
    assert run(["eval", str(p), str(trace_path), "--max-moe-time-ratio", f"{ratio + 0.01}"]) == 0
    assert "moeplace eval: PASS: predicted MoE time / contiguous" in capsys.readouterr().out
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "timed", "placement": "p.json", "max_moe_time_ratio": ratio + 0.01}],
                       defaults={"trace": trace_path.name})
    assert run(["check", str(cfg)]) == 0
    assert capsys.readouterr().out.startswith("PASS  timed (100 held-out tokens): moe_time_us/contiguous ")
    # a record of another model (top-3): its times would be that model's, so they are left out with
    # a warning; a gate that needs them is refused with the reason; a cost model for this trace works
    doc = json.loads(p.read_text())
    doc["objective"]["cost_model"]["model"]["top_k"] = 3
    (tmp_path / "other.json").write_text(json.dumps(doc))
    other = (f"{tmp_path / 'other.json'} records the cost model of tiny (top_k 3), but {trace_path} has top_k 2: "
             "give --cluster (and --model-config) for this trace's model to predict its MoE time")
    rc, report = eval_json(capsys, str(tmp_path / "other.json"), str(trace_path))
    assert rc == 0 and "cost_model" not in report and "moe_time_us" not in report["layouts"]["placement"]
    assert run(["eval", str(tmp_path / "other.json"), str(trace_path)]) == 0
    assert capsys.readouterr().err == f"moeplace: warning: {other} (no predicted MoE time in this report)\n"
    assert run(["eval", str(tmp_path / "other.json"), str(trace_path), "--max-moe-time-ratio", "2"]) == 2
    assert capsys.readouterr().err == f"moeplace: error: {other}\n"
    assert run(["eval", str(tmp_path / "other.json"), str(trace_path), "--cluster", str(tmp_path / "c.yaml")]) == 0
    capsys.readouterr()
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "other", "placement": "other.json", "max_imbalance": 10},
                                              {"name": "timed", "placement": "other.json", "max_moe_time_ratio": 2}],
                       defaults={"trace": trace_path.name})
    assert run(["check", str(cfg)]) == 2
    out = capsys.readouterr().out
    # in check's words: its keys, not eval's options
    in_check = other.replace("give --cluster (and --model-config)", "give a 'cluster' key (and 'model_config')")
    assert out.startswith("PASS  other") and f"ERROR timed: {in_check}" in out
    # a record edited by hand: named, one line; a warning unless a gate needs the time
    doc["objective"]["cost_model"]["cluster"]["num_nodes"] = "two"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    bad = f"{tmp_path / 'bad.json'}: objective.cost_model.cluster: 'num_nodes' must be an integer, got 'two'"
    assert run(["eval", str(tmp_path / "bad.json"), str(trace_path)]) == 0
    assert capsys.readouterr().err == f"moeplace: warning: {bad} (no predicted MoE time in this report)\n"
    assert run(["eval", str(tmp_path / "bad.json"), str(trace_path), "--max-moe-time-ratio", "2"]) == 2
    assert capsys.readouterr().err == f"moeplace: error: {bad}\n"


def test_eval_refuses_limits_no_placement_can_pass(tmp_path: Path, trace_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """max/mean load per GPU is at least 1: --max-imbalance below 1 is a usage error (exit 2), as is
    a zero limit on a ratio of positive values; the bounds themselves, and 0 traffic, still gate."""
    affinity_placement(trace_path, None, tmp_path / "p.json")
    args = ["eval", str(tmp_path / "p.json"), str(trace_path)]
    assert run(args + ["--max-imbalance", "0.1"]) == 2
    assert capsys.readouterr().err == ("moeplace: error: --max-imbalance 0.1: the imbalance (max/mean load per GPU) is at "
                                       "least 1 (1: every GPU at the mean), so no placement passes; 10% above the mean "
                                       "is 1.1\n")
    assert run(args + ["--max-moe-time-ratio", "0"]) == 2  # said before it asks for a cost model
    assert capsys.readouterr().err == ("moeplace: error: --max-moe-time-ratio 0: the ratio of two positive times is "
                                       "above 0, so no placement passes; give a positive ratio\n")
    assert run(args + ["--max-imbalance", "1"]) == 1  # can pass: a perfectly balanced layout
    assert run(args + ["--max-cross-gpu", "0", "--max-dest-gpus", "0", "--max-dest-nodes", "0"]) == 1
    capsys.readouterr()


def test_check_suggests_no_eval_report_for_a_missing_placement(tmp_path: Path, trace_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A mistyped placement path: the did-you-mean names a file that could be one (same suffix, not
    named like an eval report), never the eval report written beside it."""
    (tmp_path / "p_eval.json").write_text("{}")  # `moeplace eval p.json ... -o p_eval.json`, p.json since moved
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "a", "placement": "p.json", "max_imbalance": 10}],
                       defaults={"trace": trace_path.name})
    assert run(["check", str(cfg)]) == 2
    assert capsys.readouterr().out == f"ERROR a: {tmp_path / 'p.json'}: no such file\n"
    (tmp_path / "p.jsonl").write_text("{}")  # closer by name, but another kind of file
    assert run(["check", str(cfg)]) == 2
    assert capsys.readouterr().out == f"ERROR a: {tmp_path / 'p.json'}: no such file\n"
    affinity_placement(trace_path, None, tmp_path / "p1x8.json")
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "b", "placement": "p1x9.json", "max_imbalance": 10}],
                       defaults={"trace": trace_path.name})
    assert run(["check", str(cfg)]) == 2
    assert capsys.readouterr().out == f"ERROR b: {tmp_path / 'p1x9.json'}: no such file; did you mean {tmp_path / 'p1x8.json'}?\n"
    # a name like an eval report's may be offered one
    from moeplace.io import not_a_file
    assert not_a_file(tmp_path / "p_eval2.json") == f"no such file; did you mean {tmp_path / 'p_eval.json'}?"


def three_checks(tmp_path: Path, trace_path: Path) -> Path:
    """A YAML with one passing, one failing and one erroring check (its placement is missing)."""
    affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "good.json")
    return write_checks(tmp_path / "ci.yaml", [
        {"name": "pass", "placement": "good.json", "max_cross_gpu_vs_contiguous": 0.7, "max_imbalance": 5},
        {"name": "fail & <co>", "placement": "good.json", "max_cross_gpu": 0, "max_imbalance": 5},
        {"name": "gone", "placement": "missing.json", "max_cross_gpu": 1},
    ], defaults={"trace": "trace.npz"})


def test_check_json_reports_every_check_and_keeps_the_exit_codes(tmp_path: Path, trace_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg = three_checks(tmp_path, trace_path)
    assert run(["check", str(cfg), "--json"]) == 2
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # stdout is the document alone
    assert doc["passed"] is False
    assert doc["summary"] == {"checks": 3, "passed": 1, "failed": 1, "errors": 1, "not_selected": 0}
    ok, bad, gone = doc["checks"]
    assert [c["status"] for c in doc["checks"]] == ["pass", "fail", "error"]
    assert ok["placement"] == str(tmp_path / "good.json") and ok["trace"] == str(trace_path)
    assert ok["tokens"]["subset"] == "held-out" and ok["tokens"]["evaluated"] == 100
    assert [t["threshold"] for t in ok["thresholds"]] == ["max_cross_gpu_vs_contiguous", "max_imbalance"]
    assert all(t["passed"] and t["value"] <= t["limit"] for t in ok["thresholds"])
    broke = {t["threshold"]: t for t in bad["thresholds"]}
    assert broke["max_cross_gpu"]["passed"] is False and broke["max_cross_gpu"]["limit"] == 0
    assert broke["max_cross_gpu"]["value"] > 0 and broke["max_imbalance"]["passed"] is True
    assert "error" not in ok and gone["error"] == f"{tmp_path / 'missing.json'}: no such file"
    assert "thresholds" not in gone
    # the summary line stays on stderr, as without --json
    assert captured.err.strip() == "moeplace: error: 1 of 3 checks could not run (1 passed, 1 failed)"
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "fail", "placement": "good.json", "max_cross_gpu": 0}],
                       defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg), "--json"]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["summary"]["failed"] == 1
    assert captured.err.strip() == "moeplace check: FAIL: 1 of 1 check failed (0 passed)"
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "ok", "placement": "good.json", "max_cross_gpu": 1}],
                       defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["passed"] is True and captured.err == ""


def test_check_json_on_a_malformed_yaml_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 2 before any check runs: nothing on stdout for a JSON reader to half-parse."""
    cfg = tmp_path / "ci.yaml"
    cfg.write_text("checks: [unclosed")
    assert run(["check", str(cfg), "--json", "--junit-xml", str(tmp_path / "r.xml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and "not valid YAML" in captured.err
    assert not (tmp_path / "r.xml").exists()


def test_check_junit_xml_has_a_testcase_per_check(tmp_path: Path, trace_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import xml.etree.ElementTree as ET

    cfg = three_checks(tmp_path, trace_path)
    assert run(["check", str(cfg)]) == 2
    text = capsys.readouterr()
    report = tmp_path / "reports" / "check.xml"
    assert run(["check", str(cfg), "--junit-xml", str(report)]) == 2
    assert capsys.readouterr() == text  # the lines are as without the flag
    root = ET.parse(report).getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "moeplace check"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("3", "1", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["pass", "fail & <co>", "gone"]  # escaped, and read back whole
    assert cases[0].find("failure") is None and cases[0].find("error") is None
    failure = cases[1].find("failure")
    assert failure is not None and failure.get("message", "").startswith("cross_gpu_top1 ")
    assert "imbalance" not in failure.get("message", "")  # names the broken thresholds, not the held ones
    error = cases[2].find("error")
    assert error is not None and error.get("message") == f"{tmp_path / 'missing.json'}: no such file"
    assert cases[2].find("failure") is None
    assert not list(report.parent.glob(".*tmp"))  # written atomically: no temp file left beside it


def test_check_junit_xml_writes_what_xml_cannot_hold_as_replacement_characters(tmp_path: Path, trace_path: Path,
                                                                              capsys) -> None:
    import xml.etree.ElementTree as ET

    affinity_placement(trace_path, None, tmp_path / "good.json")
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "bell\x07", "placement": "good.json", "max_cross_gpu": 1}],
                       defaults={"trace": "trace.npz"})
    assert run(["check", str(cfg), "--junit-xml", str(tmp_path / "r.xml")]) == 0
    case = ET.parse(tmp_path / "r.xml").getroot().find("testsuite/testcase")
    assert case is not None and case.get("name") == "bell\ufffd"


def test_check_only_runs_the_named_checks(tmp_path: Path, trace_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = three_checks(tmp_path, trace_path)
    assert run(["check", str(cfg), "--only", "pass"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("PASS  pass ") and out[-1] == "moeplace check: PASS: the 1 check passed" and len(out) == 2
    assert run(["check", str(cfg), "--only", "gone", "--only", "pass", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in doc["checks"]] == ["pass", "gone"]  # in the YAML's order
    assert doc["summary"]["not_selected"] == 1


def test_check_only_an_unknown_name_is_one_error_line(tmp_path: Path, trace_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = three_checks(tmp_path, trace_path)
    assert run(["check", str(cfg), "--only", "pas", "--junit-xml", str(tmp_path / "r.xml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not (tmp_path / "r.xml").exists()
    assert captured.err == (f"moeplace: error: --only 'pas': {cfg} has no such check; did you mean 'pass'? "
                            "its checks: 'pass', 'fail & <co>', 'gone'\n")
    assert run(["check", str(cfg), "--only", "zzz"]) == 2
    assert "did you mean" not in capsys.readouterr().err


def test_check_help_teaches_the_ci_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--junit-xml out/check.xml --json" in out and "--only NAME" in out


# --- check: baseline (the placement shipped last) ---------------------------------------------------


def baseline_files(tmp_path: Path, trace_path: Path) -> dict[str, Placement]:
    """good.json (affinity, fitted on split seed 0), released.json (its layout, fitted on another split:
    scored on its own held-out tokens it would score otherwise) and worse.json (contiguous)."""
    sha = load_trace(trace_path).sha256
    good = affinity_placement(trace_path, {"train_fraction": 0.5, "seed": 0}, tmp_path / "good.json")
    released = Placement(good.expert_to_gpu, 4, 2, trace_sha256=sha, split={"train_fraction": 0.5, "seed": 1})
    released.save(tmp_path / "released.json")
    worse = Placement(contiguous(4, 8, 4), 4, 2, trace_sha256=sha, split={"train_fraction": 0.5, "seed": 0})
    worse.save(tmp_path / "worse.json")
    return {"good": good, "released": released, "worse": worse}


def test_check_against_a_baseline_on_the_placements_tokens(tmp_path: Path, trace_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The same layout as the baseline is 1.0 on every metric: the baseline is scored on the placement's
    held-out tokens, not on its own split's; contiguous against it is worse and fails, naming the threshold."""
    files = baseline_files(tmp_path, trace_path)
    limits = {"max_cross_gpu_vs_baseline": 1.0, "max_dest_gpus_vs_baseline": 1.0, "max_imbalance_vs_baseline": 1.0}
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "same", "placement": "good.json"},
                                              {"name": "worse", "placement": "worse.json"}],
                       defaults={"trace": "trace.npz", "baseline": "released.json", **limits})
    assert run(["check", str(cfg)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("PASS  same (100 held-out tokens): cross_gpu_top1/baseline 1.0000 <= 1, "
                      "dest_gpus_topk/baseline 1.0000 <= 1, imbalance_max/baseline 1.0000 <= 1")
    assert out[1].startswith("FAIL  worse (100 held-out tokens): cross_gpu_top1/baseline "), out[1]
    assert run(["check", str(cfg), "--json", "--junit-xml", str(tmp_path / "r.xml")]) == 1
    same, worse = json.loads(capsys.readouterr().out)["checks"]
    # the values eval gives each layout on the placement's held-out tokens
    held = split_tokens(200, 0.5, 0)[1]
    tokens = load_trace(trace_path).select_tokens(held)
    mine, theirs = evaluate(files["worse"], tokens), evaluate(files["good"], tokens)
    assert same["baseline"] == {"placement": str(tmp_path / "released.json"), "num_gpus": 4, "gpus_per_node": 2,
                                "note": ""}
    assert [(t["threshold"], t["metric"], t["value"], t["limit"]) for t in same["thresholds"]] == [
        ("max_cross_gpu_vs_baseline", "cross_gpu_top1/baseline", 1.0, 1.0),
        ("max_dest_gpus_vs_baseline", "dest_gpus_topk/baseline", 1.0, 1.0),
        ("max_imbalance_vs_baseline", "imbalance_max/baseline", 1.0, 1.0)]
    cross = {t["threshold"]: t for t in worse["thresholds"]}["max_cross_gpu_vs_baseline"]
    assert cross["passed"] is False and cross["baseline_value"] == pytest.approx(theirs["cross_gpu_top1"])
    assert cross["value"] == pytest.approx(mine["cross_gpu_top1"] / theirs["cross_gpu_top1"]) and cross["value"] > 1
    failure = xml_root(tmp_path / "r.xml").find("testsuite/testcase[@name='worse']/failure")
    assert failure is not None and failure.get("message", "").startswith("cross_gpu_top1/baseline ")


def xml_root(path: Path):
    import xml.etree.ElementTree as ET

    return ET.parse(path).getroot()


def test_check_baseline_of_another_shape_or_model_is_an_error_line(tmp_path: Path, trace_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    baseline_files(tmp_path, trace_path)
    Placement(contiguous(3, 8, 4), 4, 2).save(tmp_path / "three.json")
    Placement(contiguous(4, 8, 4), 4, 2, trace_model={"model_type": "mixtral"}).save(tmp_path / "mixtral.json")
    good = json.loads((tmp_path / "good.json").read_text())
    (tmp_path / "qwen.json").write_text(json.dumps({**good, "trace_model": {"model_type": "qwen2_moe"}}))
    cfg = write_checks(tmp_path / "ci.yaml", [
        {"name": "short", "placement": "good.json", "baseline": "three.json"},
        {"name": "other", "placement": "qwen.json", "baseline": "mixtral.json"},
        {"name": "gone", "placement": "good.json", "baseline": "nothing.json"},
        {"name": "ok", "placement": "good.json", "baseline": "good.json"},
    ], defaults={"trace": "trace.npz", "max_cross_gpu_vs_baseline": 1})
    assert run(["check", str(cfg)]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines()[:3] == [
        f"ERROR short: baseline {tmp_path / 'three.json'} is for 3 MoE layers x 8 experts, but "
        f"{tmp_path / 'good.json'} for 4 x 8: a baseline is a placement of the same model",
        f"ERROR other: baseline {tmp_path / 'mixtral.json'} was fitted on another model than "
        f"{tmp_path / 'qwen.json'}: model_type mixtral (the placement's: qwen2_moe)",
        f"ERROR gone: baseline {tmp_path / 'nothing.json'}: no such file"]
    assert captured.out.splitlines()[3].startswith("PASS  ok ")
    assert captured.err.strip() == "moeplace: error: 3 of 4 checks could not run (1 passed, 0 failed)"


@pytest.mark.parametrize("doc, message", [
    ("checks: [{name: a, placement: p.json, trace: t.npz, max_cross_gpu_vs_baseline: 1}]",
     "ci.yaml: check 1 (a): max_cross_gpu_vs_baseline needs 'baseline' (a placement file of the same model to "
     "compare with)"),
    # `baseline: null` drops the defaults' baseline and the thresholds on it; one the check sets itself stays
    ("defaults: {baseline: b.json, max_cross_gpu_vs_baseline: 1}\n"
     "checks: [{name: a, placement: p.json, trace: t.npz, baseline: null, max_dest_gpus_vs_baseline: 1}]",
     "ci.yaml: check 1 (a): max_dest_gpus_vs_baseline needs 'baseline' (a placement file of the same model to "
     "compare with)"),
    ("checks: [{name: a, placement: p.json, trace: t.npz, baseline: b.json, max_cross_gpu: 0.5}]",
     "ci.yaml: check 1 (a): baseline is set but no max_<metric>_vs_baseline threshold uses it"),
    ("checks: [{name: a, placement: p.json, trace: t.npz, baseline: b.json, max_imbalance_vs_baseline: 0}]",
     "ci.yaml: check 1 (a): max_imbalance_vs_baseline 0: the ratio of two positive imbalances is above 0, so no "
     "placement passes; give a positive ratio"),
])
def test_check_baseline_config_errors_name_the_check(tmp_path: Path, doc: str, message: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "ci.yaml"
    cfg.write_text(doc)
    assert run(["check", str(cfg)]) == 2
    assert capsys.readouterr().err == f"moeplace: error: {tmp_path}/{message}\n"


def test_check_baseline_as_read(tmp_path: Path) -> None:
    cfg = tmp_path / "ci.yaml"
    cfg.write_text("defaults: {trace: t.npz, baseline: ../released/b.json, max_cross_gpu_vs_baseline: 1.05}\n"
                   "checks:\n"
                   "  - {name: a, placement: p.json, max_moe_time_vs_baseline: 1}\n"
                   "  - {name: b, placement: p.json, baseline: null, max_imbalance: 2}\n"
                   "  - {name: c, placement: p.json, max_cross_gpu_vs_baseline: null, max_imbalance: 2}\n")
    a, b, c = read_checks(cfg)
    assert a["baseline"] == tmp_path.parent / "released" / "b.json"
    assert a["limits"] == {"max_cross_gpu_vs_baseline": 1.05, "max_moe_time_vs_baseline": 1.0}
    assert "baseline" not in b and b["limits"] == {"max_imbalance": 2.0}
    assert "baseline" not in c and c["limits"] == {"max_imbalance": 2.0}  # the defaults' baseline gates nothing here


def test_check_baseline_of_zero_and_of_another_gpu_count(tmp_path: Path, trace_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A baseline on one node crosses no node: the ratio is undefined, it holds when the placement
    crosses none either and fails otherwise; a baseline on other GPUs is compared, and said so."""
    sha, split = load_trace(trace_path).sha256, {"train_fraction": 0.5, "seed": 0}
    good = affinity_placement(trace_path, split, tmp_path / "good.json")  # 2 nodes x 2 GPUs
    Placement(good.expert_to_gpu, 4, 4, trace_sha256=sha, split=split).save(tmp_path / "one-node.json")
    Placement(contiguous(4, 8, 2), 2, 2, trace_sha256=sha, split=split).save(tmp_path / "two-gpus.json")
    cfg = write_checks(tmp_path / "ci.yaml", [
        {"name": "zero", "placement": "one-node.json", "baseline": "one-node.json"},
        {"name": "nodes", "placement": "good.json", "baseline": "one-node.json"},
        {"name": "gpus", "placement": "good.json", "baseline": "two-gpus.json", "max_cross_node_vs_baseline": None,
         "max_cross_gpu_vs_baseline": 5},
    ], defaults={"trace": "trace.npz", "max_cross_node_vs_baseline": 1})
    assert run(["check", str(cfg)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "PASS  zero (100 held-out tokens): cross_node_top1/baseline n/a (0 here and in the baseline)"
    assert out[1].startswith("FAIL  nodes (100 held-out tokens): cross_node_top1/baseline n/a: 0."), out[1]
    assert out[1].endswith(" where the baseline has 0, worse at any ratio")
    assert out[2] == (f"      baseline: {tmp_path / 'one-node.json'} is for 4 GPUs (1 node), this one for 4 "
                      "(2 nodes); compared on the same tokens")
    assert out[3].startswith("PASS  gpus (100 held-out tokens): cross_gpu_top1/baseline ")
    assert out[4] == (f"      baseline: {tmp_path / 'two-gpus.json'} is for 2 GPUs (1 node), this one for 4 "
                      "(2 nodes); compared on the same tokens")
    assert run(["check", str(cfg), "--json", "--only", "nodes"]) == 1
    (t,) = json.loads(capsys.readouterr().out)["checks"][0]["thresholds"]
    assert t["value"] is None and t["baseline_value"] == 0 and t["passed"] is False and "baseline has 0" in t["note"]


def test_check_moe_time_against_a_baseline(tmp_path: Path, trace_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """max_moe_time_vs_baseline: the baseline timed with the placement's cost model, on its tokens."""
    baseline_files(tmp_path, trace_path)
    (tmp_path / "c.yaml").write_text(CLUSTER_2X2)
    cfg = write_checks(tmp_path / "ci.yaml", [
        {"name": "faster", "placement": "good.json", "baseline": "worse.json"},
        {"name": "slower", "placement": "worse.json", "baseline": "good.json"},
        # `cluster: null` drops the defaults' time thresholds (as max_moe_time_ratio); one set here needs a cost model
        {"name": "untimed", "placement": "good.json", "baseline": "worse.json", "cluster": None,
         "max_moe_time_vs_baseline": 1},
    ], defaults={"trace": "trace.npz", "cluster": "c.yaml", "max_moe_time_vs_baseline": 1})
    assert run(["check", str(cfg)]) == 2
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert len(out) == 3, captured.err
    assert out[0].startswith("PASS  faster (100 held-out tokens): moe_time_us/baseline 0.")
    assert out[1].startswith("FAIL  slower (100 held-out tokens): moe_time_us/baseline 1.")
    assert out[2].startswith("ERROR untimed: max_moe_time_vs_baseline needs 'cluster'")


def test_check_help_documents_the_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["check", "--help"]) == 0
    out = capsys.readouterr().out
    assert "baseline:" in out and "max_cross_gpu_vs_baseline" in out and "max_moe_time_vs_baseline" in out


def test_check_baseline_on_a_load_only_file(tmp_path: Path, trace_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On expert loads the baseline is scored on the same loads: imbalance only."""
    files = baseline_files(tmp_path, trace_path)
    loads = load_trace(trace_path).expert_loads()
    save_loads(ExpertLoads(loads, {"source": "loads-json"}), tmp_path / "loads.npz")
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "balance", "placement": "worse.json", "baseline": "good.json",
                                              "trace": "loads.npz", "max_imbalance_vs_baseline": 1.5}])
    assert run(["check", str(cfg), "--json"]) == 0
    (t,) = json.loads(capsys.readouterr().out)["checks"][0]["thresholds"]
    mine, theirs = (imbalance(expected_gpu_loads(files[k], loads)).max() for k in ("worse", "good"))
    assert t["baseline_value"] == pytest.approx(theirs) and t["value"] == pytest.approx(mine / theirs)


def test_eval_and_check_never_write_over_what_they_read(tmp_path: Path, trace_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`eval -o` (and `solve -o`) onto its --cluster or --model-config YAML, or into a checkpoint
    directory it reads (--model, --model-config DIR or DIR/config.json), replaced that file with
    the report (-o CKPT/config.json: the checkpoint's config); `check --junit-xml` likewise into a check's
    model_config checkpoint. Refused before anything runs, as `trace -o` inside --model is."""
    affinity_placement(trace_path, None, tmp_path / "p.json")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "hidden_size": 32, "intermediate_size": 64, "num_local_experts": 8,
        "num_experts_per_tok": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4}))
    cluster = tmp_path / "cluster.yaml"  # the placement's 2 nodes x 2 GPUs, with the figures an estimate needs
    cluster.write_text(yaml.safe_dump({
        "cluster": {"nodes": 2, "gpus_per_node": 2, "intra_node": {"bandwidth_GBps": 400, "latency_us": 5},
                    "inter_node": {"bandwidth_GBps": 50, "latency_us": 10}},
        "gpu": {"dense_tflops": {"bfloat16": 989}, "hbm_GBps": 3350}}))
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(yaml.safe_dump({"model": {"hidden_size": 32, "expert_us_per_token": 0.01}}))
    before = {p: p.read_bytes() for p in (ckpt / "config.json", cluster, model_yaml)}
    inside = "(it would replace or add to the files this run reads); write the output elsewhere"
    cases = [
        (["--cluster", cluster, "--model-config", model_yaml], cluster, f"is an input of this run ({cluster}); write the output elsewhere"),
        (["--cluster", cluster, "--model-config", model_yaml], model_yaml, f"is an input of this run ({model_yaml}); write the output elsewhere"),
        (["--cluster", cluster, "--model-config", ckpt], ckpt / "config.json",
         f"is inside the --model-config directory {ckpt} {inside}"),
        (["--cluster", cluster, "--model-config", ckpt / "config.json"], ckpt / "config.json",
         f"is an input of this run ({ckpt / 'config.json'}); write the output elsewhere"),
        (["--model", ckpt], ckpt / "config.json", f"is inside the --model directory {ckpt} {inside}"),
    ]
    # solve reads the same cost inputs (all but --model) and is refused alike, before it solves
    runs = [["eval", str(tmp_path / "p.json"), str(trace_path), *map(str, extra), "-o", str(out)]
            for extra, out, _ in cases]
    runs += [["solve", str(trace_path), "--gpus", "4", "--gpus-per-node", "2", *map(str, extra), "-o", str(out)]
             for extra, out, _ in cases[:4]]
    for argv, message in zip(runs, [m for _, _, m in cases] + [m for _, _, m in cases[:4]]):
        assert run(argv) == 2, argv
        assert capsys.readouterr().err.strip().splitlines() == [f"moeplace: error: -o {argv[-1]}: {message}"], argv
        assert {p: p.read_bytes() for p in before} == before and not (ckpt / "report.json").exists()
    # the same runs with -o elsewhere succeed: only the destination was wrong; a lone config.json
    # protects itself, not its folder (which may be the working directory)
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "--cluster", str(cluster), "--model-config",
                str(ckpt), "-o", str(tmp_path / "report.json")]) == 0
    assert run(["eval", str(tmp_path / "p.json"), str(trace_path), "--cluster", str(cluster), "--model-config",
                str(ckpt / "config.json"), "-o", str(ckpt / "report.json")]) == 0
    config = write_checks(tmp_path / "ci.yaml", [{"name": "ckpt", "placement": "p.json", "trace": "trace.npz",
                                                  "cluster": "cluster.yaml", "model_config": "ckpt",
                                                  "max_moe_time_ratio": 10}])
    capsys.readouterr()
    assert run(["check", str(config), "--junit-xml", str(ckpt / "config.json")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moeplace: error: --junit-xml {ckpt / 'config.json'}: is inside the check 'ckpt' model_config directory "
        f"{ckpt} {inside}"]
    assert {p: p.read_bytes() for p in before} == before
    assert run(["check", str(config), "--junit-xml", str(tmp_path / "ci.xml")]) == 0


def sequence_trace(path: Path, sequences: int = 20, seed: int = 3) -> Path:
    """Sequences of 6-30 tokens (ids 100, 103, ...: not 0..S-1) with the e -> e + 1 affinity of
    trace_path; each sequence has its own start expert, so its tokens route alike."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(6, 31, size=sequences)
    seq = np.repeat(100 + 3 * np.arange(sequences), sizes)
    start = rng.integers(0, 8, size=sequences)[(seq - 100) // 3]
    top1 = (start[:, None] + np.arange(4)[None, :]) % 8
    top1 = np.where(rng.random(top1.shape) < 0.2, rng.integers(0, 8, size=top1.shape), top1)
    second = (top1 + 1 + rng.integers(0, 7, size=top1.shape)) % 8
    save_trace(make_trace(np.stack([top1, second], axis=-1), num_experts=8, sequence_ids=seq), path)
    return path


def held_out_sequences(sequence_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The rule of docs/eval.md, written out apart from trace.format: distinct ids in a seeded
    order; whole sequences to the fit until it holds round(F x T) tokens; the rest held out."""
    ids = sorted(set(sequence_ids.tolist()))
    order = np.random.default_rng(seed).permutation(len(ids))
    fit: set[int] = set()
    for i in order:
        if sum(int((sequence_ids == s).sum()) for s in fit) >= round(fraction * len(sequence_ids)):
            break
        fit.add(ids[i])
    return np.array([t for t, s in enumerate(sequence_ids.tolist()) if s not in fit])


def test_solve_split_by_sequence_is_recorded_and_eval_scores_the_held_out_sequences(tmp_path: Path, capsys) -> None:
    path = sequence_trace(tmp_path / "seq.npz")
    trace = load_trace(path)
    out = tmp_path / "p.json"
    assert run(["solve", str(path), "--gpus", "4", "--gpus-per-node", "2", "--train-fraction", "0.4", "--seed", "5",
                "--split-by", "sequence", "--time-limit", "5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fitted on a 0.4 split of whole sequences (seed 5)" in text
    held = held_out_sequences(trace.sequence_ids, 0.4, 5)
    assert f"held-out sequences ({len(held)} tokens):" in text
    assert "--split-by sequence gives" not in text  # the note is for token splits
    doc = json.loads(out.read_text())
    assert doc["split"] == {"train_fraction": 0.4, "seed": 5, "by": "sequence"}
    assert doc["metrics"]["held_out"]["placement"]["tokens"] == len(held)
    rc, report = eval_json(capsys, str(out), str(path))
    assert rc == 0 and report["tokens"]["subset"] == "held-out" and report["tokens"]["evaluated"] == len(held)
    assert report["tokens"]["split_by"] == "sequence" and report["tokens"]["note"].startswith(
        f"held-out sequences, {len(set(trace.sequence_ids[held].tolist()))} of them, not seen by the solver")
    expected = evaluate(load_placement(out), trace.select_tokens(held))
    assert report["layouts"]["placement"]["cross_gpu_top1"] == expected["cross_gpu_top1"]
    assert report["layouts"]["placement"]["dest_gpus_topk"] == expected["dest_gpus_topk"]
    assert report["tokens"]["fit_path_share"] is not None
    assert run(["eval", str(out), str(path)]) == 0
    assert "tokens of held-out sequences" in capsys.readouterr().out  # the in-short line
    cfg = write_checks(tmp_path / "ci.yaml", [{"name": "seq", "placement": "p.json", "trace": "seq.npz",
                                              "max_imbalance": 100}])
    assert run(["check", str(cfg), "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["checks"][0]
    assert check["tokens"]["evaluated"] == len(held) and check["tokens"]["note"].startswith("held-out sequences"), check


def test_a_placement_without_split_by_still_holds_out_tokens(tmp_path: Path, capsys) -> None:
    """Placements of earlier moeplace (no "by") and "by": "token" re-draw split_tokens, also on a
    trace with sequence ids."""
    path = sequence_trace(tmp_path / "seq.npz")
    trace = load_trace(path)
    _, held = split_tokens(trace.num_tokens, 0.5, 2)
    reports = []
    for split in ({"train_fraction": 0.5, "seed": 2}, {"train_fraction": 0.5, "seed": 2, "by": "token"}):
        affinity_placement(path, split, tmp_path / "p.json")
        rc, report = eval_json(capsys, str(tmp_path / "p.json"), str(path))
        assert rc == 0 and report["tokens"]["evaluated"] == len(held) and report["tokens"]["split_by"] == "token"
        assert report["tokens"]["note"].startswith("held-out tokens, not seen by the solver")
        expected = evaluate(load_placement(tmp_path / "p.json"), trace.select_tokens(held))
        assert report["layouts"]["placement"]["cross_gpu_top1"] == expected["cross_gpu_top1"]
        reports.append(report["layouts"])
    assert reports[0] == reports[1]


@pytest.mark.parametrize("case, needle", [
    ("no-sequence-ids", "t.npz: a split by sequence needs the trace's sequence_ids, and it has none"),
    ("one-sequence", "t.npz: a split by sequence needs two or more sequences, the trace holds 1"),
    ("no-fraction", "--split-by sequence says which tokens --train-fraction holds out"),
    ("loads", "--split-by: "),  # named first: --train-fraction is not given
])
def test_solve_split_by_sequence_refusals_are_one_line(tmp_path: Path, capsys, case: str, needle: str) -> None:
    ids = np.stack([np.arange(40) % 8, (np.arange(40) + 1) % 8], axis=-1)[:, None, :].repeat(2, axis=1)
    path = tmp_path / "t.npz"
    if case == "loads":
        save_loads(ExpertLoads(np.ones((2, 8))), path)
    else:
        seq = None if case == "no-sequence-ids" else np.zeros(40, dtype=np.int64) if case == "one-sequence" else \
            np.arange(40) // 10
        save_trace(make_trace(ids, num_experts=8, sequence_ids=seq), path)
    fraction = [] if case in ("no-fraction", "loads") else ["--train-fraction", "0.5"]
    objective = ["--objective", "balance"] if case == "loads" else []
    out = tmp_path / "p.json"
    assert run(["solve", str(path), "--gpus", "4", *fraction, *objective, "--split-by", "sequence", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeplace: error:") and needle in err[0], err
    assert not out.exists()


def test_eval_refuses_to_guess_held_out_sequences_of_a_file_without_them(tmp_path: Path, capsys) -> None:
    """The same routing re-saved without sequence ids (as an ExFlow .npy of it would be): the
    held-out sequences cannot be re-drawn, so eval says so in one line; --all-tokens scores all."""
    path = sequence_trace(tmp_path / "seq.npz")
    trace = load_trace(path)
    out = tmp_path / "p.json"
    assert run(["solve", str(path), "--gpus", "4", "--train-fraction", "0.5", "--split-by", "sequence",
                "--time-limit", "1", "-q", "-o", str(out)]) == 0
    bare = tmp_path / "bare.npz"
    save_trace(make_trace(trace.topk_ids, num_experts=8), bare)
    capsys.readouterr()
    assert run(["eval", str(out), str(bare)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "this file has no sequence_ids: its held-out sequences cannot be re-drawn" in err[0], err
    rc, report = eval_json(capsys, str(out), str(bare), "--all-tokens")
    assert rc == 0 and report["tokens"]["evaluated"] == trace.num_tokens


def test_solve_notes_that_a_token_split_of_sequences_shares_them(tmp_path: Path, capsys) -> None:
    note = "the held-out tokens share sequences with the fit ones"
    ids = np.stack([np.arange(256) % 8, (np.arange(256) + 1) % 8], axis=-1)[:, None, :].repeat(2, axis=1)
    for length, shown in ((2, True), (1, False)):  # median tokens per sequence against SHARED_SEQUENCE
        path = tmp_path / f"t{length}.npz"
        save_trace(make_trace(ids, num_experts=8, sequence_ids=np.arange(256) // length), path)
        for split_by in ("token", "sequence"):
            assert run(["solve", str(path), "--gpus", "4", "--train-fraction", "0.5", "--split-by", split_by,
                        "--time-limit", "5", "-o", str(tmp_path / "p.json")]) == 0
            assert (note in capsys.readouterr().out) == (shown and split_by == "token"), (length, split_by)
