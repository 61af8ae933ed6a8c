"""Second adversarial audit of `moeplace solve` and `moeplace analyze`: the defects it found, each
pinned by a test that fails without its fix (one line, exit 2, no traceback, no hang)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeplace import cli
from moeplace.errors import MoeplaceError
from moeplace.placement import Placement, load_placement
from moeplace.solve.baselines import contiguous
from moeplace.trace.format import make_loads, save_loads
import test_cli_audit
from test_cli_audit import one_error_line

trace_path = test_cli_audit.trace_path  # its fixture: a planted 64-token trace, 3 layers x 8 experts, top-2

ONE_GPU_CLUSTER = """cluster:
  name: 1 node x 1 GPU
  nodes: 1
  gpus_per_node: 1
  intra_node: {bandwidth_GBps: 400, latency_us: 5}
"""
MODEL_8 = """model:
  name: planted 8 experts
  hidden_size: 128
  num_experts: 8
  top_k: 2
  dtype_bytes: 2
  expert_us_per_token: 0.000123
  expert_fixed_us: 0.0147
  batch_tokens: 4096
"""


def uneven_current(path: Path) -> Path:
    """A 3-layer x 8-expert placement on 4 GPUs whose layer 0 puts 5 experts on GPU 0 (as a
    balance solve with --max-experts-per-gpu(-total) may): no layout of E/G = 2 per GPU is
    within 2 moves of it."""
    layout = contiguous(3, 8, 4)
    layout[0] = [0, 0, 0, 0, 0, 1, 2, 3]
    Placement(layout, num_gpus=4, gpus_per_node=4).save(path)
    return path


def test_latency_on_one_gpu_solves_and_says_gpu(trace_path: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--objective latency --gpus 1: the swap descent drew a partner from an empty set (internal
    error, exit 3); and its replica refusal said '1 GPUs'."""
    cluster, model, out = tmp_path / "c1.yaml", tmp_path / "m8.yaml", tmp_path / "p.json"
    cluster.write_text(ONE_GPU_CLUSTER)
    model.write_text(MODEL_8)
    argv = ["solve", str(trace_path), "--gpus", "1", "--cluster", str(cluster), "--model-config", str(model),
            "--time-limit", "5", "-o", str(out), "-q"]
    assert cli.run(argv) == 0, capsys.readouterr().err
    p = load_placement(out)
    assert p.num_gpus == 1 and (p.expert_to_gpu == 0).all() and p.objective["name"] == "latency"
    capsys.readouterr()
    assert cli.run([*argv, "--redundant-experts", "2"]) == 2
    assert "at most 0 copies fit 1 GPU without" in one_error_line(capsys)


def test_balance_max_moves_refuses_current_of_other_copies_before_solving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A CURRENT of 8 copies per layer against a solve of 8 + 2: refused after the plain balance
    solve (up to half of --time-limit, 30 s by default), not before it."""
    import moeplace.solve.balance as balance

    loads = tmp_path / "loads.npz"
    save_loads(make_loads(np.random.default_rng(0).integers(1, 100, (3, 8)).astype(float)), loads)
    current = tmp_path / "cur.json"
    Placement(contiguous(3, 8, 4), num_gpus=4, gpus_per_node=4).save(current)

    def solved(*_: object, **__: object) -> None:
        raise AssertionError("the balance solve ran before the refusal of CURRENT")

    monkeypatch.setattr(balance, "balance_placement", solved)
    assert cli.run(["solve", str(loads), "--gpus", "4", "--redundant-experts", "2", "--from", str(current),
                    "--max-moves", "1", "-o", str(tmp_path / "p.json"), "-q"]) == 2
    assert "CURRENT's layer 0 holds 8 expert copies, this solve 10" in one_error_line(capsys)


def test_traffic_max_moves_refuses_a_current_of_uneven_counts_before_reading_the_trace(
        trace_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """traffic keeps E/G experts per GPU: from a CURRENT of 5 on one GPU the exchanges back
    (heuristics.repair_layer) could never bring a layer within 2 moves, and looped past
    --time-limit without end. Refused from CURRENT alone, before the trace is read."""
    import moeplace.trace.format as fmt

    current = uneven_current(tmp_path / "cur.json")

    def read(*_: object) -> None:
        raise AssertionError("the trace was read before a refusal that needs no trace")

    monkeypatch.setattr(fmt, "load_trace", read)
    for flags in (["--max-moves", "2"], ["--max-moves", "0"], ["--move-cost", "5"]):
        assert cli.run(["solve", str(trace_path), "--gpus", "4", "--from", str(current), *flags, "--time-limit", "2",
                        "-o", str(tmp_path / "p.json"), "-q"]) == 2
        line = one_error_line(capsys)
        assert f"{flags[0]} with --from {current}: its layer 0 holds 5 experts on GPU 0" in line, line
        assert "E/G = 2" in line
    assert not (tmp_path / "p.json").exists()


def test_traffic_move_cost_from_uneven_current_is_refused_by_the_library(trace_path: Path, tmp_path: Path) -> None:
    """solve_placement(move_cost=W, current=uneven) kept CURRENT as its start and wrote a traffic
    placement of 7 experts on one GPU and none on two; --from alone (the free renaming) still
    solves, with E/G experts on every GPU."""
    from moeplace.solve.solver import solve_placement
    from moeplace.trace.format import load_trace

    trace = load_trace(trace_path)
    path = uneven_current(tmp_path / "cur.json")
    current = load_placement(path)
    with pytest.raises(MoeplaceError, match="--move-cost with --from .*its layer 0 holds 5 experts on GPU 0"):
        solve_placement(trace, 4, None, 2.0, 0, move_cost=1000.0, current=current, current_path=str(path))
    p = solve_placement(trace, 4, None, 2.0, 0, current=current, current_path=str(path))
    assert all((np.bincount(row, minlength=4) == 2).all() for row in p.expert_to_gpu)


def test_improve_layer_past_its_deadline_does_not_score_its_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """balance at 64 GPUs x 64 experts + 64 copies: scoring a layer's start alone takes 0.16 s,
    and every candidate of every layer scored its start after the deadline had passed, so
    --time-limit 1 ran 7 s. Past the deadline the copies come back as given, unscored."""
    import moeplace.solve.balance as balance

    def scored(*_: object, **__: object) -> None:
        raise AssertionError("a layout was scored after the deadline")

    monkeypatch.setattr(balance, "batch_layer_loads", scored)
    copies = [[e // 2] for e in range(8)]
    weight = np.arange(1.0, 9.0)
    assert balance.improve_layer(weight, copies, 4, 2, deadline=0.0) == copies
