"""Defects an adversarial pass over the newest user paths found (eval --baseline and its gates,
serve --chat-template, the frozen Placement as a library type); each test fails without its fix."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from moeplace.cli import run
from moeplace.errors import PlacementError
from moeplace.placement import Placement, load_placement
from moeplace.solve.baselines import contiguous
from moeplace.trace.format import ExpertLoads, save_loads

TINY = ROOT / "checkpoints" / "tiny-moe"


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one stderr line of a refused run (exit 2): nothing on stdout, no traceback."""
    assert run(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1 and "Traceback" not in captured.err
    return captured.err.strip()


# --- Placement as a library type -------------------------------------------------------------


def test_placements_compare_by_their_document_and_hash_by_their_table(tmp_path: Path) -> None:
    """The dataclass's own == compared the ndarray fields inside a tuple ("truth value of an array is
    ambiguous"), and its hash hashed them ("unhashable type: 'numpy.ndarray'")."""
    def make(**kw: object) -> Placement:
        return Placement(np.array([[0, 1, 1, 0]]), 2, 1, replicas=[[(0, 1)]], metrics={"gain": float("nan")},
                         fit_loads=np.array([[1.0, 2.0, 3.0, 4.0]]), **kw)  # type: ignore[arg-type]

    p, q = make(), make()
    assert p == q and not p != q and hash(p) == hash(q)
    assert {p: "deployed"}[q] == "deployed"
    p.save(tmp_path / "p.json")
    assert load_placement(tmp_path / "p.json") == p  # a round trip gives the same placement
    assert replace(p, bound=1.0) != p  # provenance is part of the document
    assert make(trace_sha256="ab") != p
    assert Placement(np.array([[1, 0, 0, 1]]), 2, 1, replicas=[[(0, 0)]]) != p  # another layout
    assert p != "placement" and p != p.to_json()


def test_replicas_from_numpy_arrays_and_malformed_layers() -> None:
    """np.argwhere-style arrays are (expert, gpu) pairs; a layer that is no list is a PlacementError
    (it was a TypeError from iterating an int), and a set (no listed order for the slots) is refused."""
    layout = np.array([[0, 1, 1, 0], [1, 0, 0, 1]])
    as_tuples = Placement(layout, 2, 1, replicas=[[(0, 1)], [(2, 1), (3, 0)]])
    as_arrays = Placement(layout, 2, 1, replicas=[np.array([[0, 1]]), np.array([[2, 1], [3, 0]])])
    assert as_arrays.replicas == as_tuples.replicas == (((0, 1),), ((2, 1), (3, 0)))
    assert Placement(layout, 2, 1, replicas=np.array([[[0, 1]], [[2, 1]]])).replicas == (((0, 1),), ((2, 1),))
    assert Placement(layout, 2, 1, replicas=[np.empty((0, 2), dtype=np.int64)] * 2).replicas == ((), ())
    for layer in (5, None, "ab", {(0, 1)}):
        with pytest.raises(PlacementError, match="replicas of layer 1 must be a list of"):
            Placement(layout, 2, 1, replicas=[[], layer])  # type: ignore[list-item]
    with pytest.raises(PlacementError, match=r"is not an \(expert, gpu\) pair of integers"):
        Placement(layout, 2, 1, replicas=[np.array([[0.0, 1.0]]), []])
    p = Placement(layout, np.int64(2), np.int32(1))  # type: ignore[arg-type]
    assert type(p.num_gpus) is int and type(p.gpus_per_node) is int


# --- eval --baseline -------------------------------------------------------------------------


def test_a_baseline_on_another_gpu_count_is_compared_on_the_same_loads(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A load-only file: the note said "compared on the same tokens" below a line "(on the same loads)"."""
    loads = np.random.default_rng(0).integers(1, 100, size=(2, 8)).astype(float)
    save_loads(ExpertLoads(loads, {"source": "loads-json"}), tmp_path / "loads.npz")
    Placement(contiguous(2, 8, 4), 4, 2).save(tmp_path / "new.json")
    Placement(contiguous(2, 8, 2), 2, 2).save(tmp_path / "two.json")
    assert run(["eval", str(tmp_path / "new.json"), str(tmp_path / "loads.npz"), "--baseline",
                str(tmp_path / "two.json")]) == 0
    out = capsys.readouterr().out
    assert f"(baseline: {tmp_path / 'two.json'} is for 2 GPUs (1 node), this one for 4 (2 nodes); compared on the " \
           "same loads)" in out
    assert "same tokens" not in out


def test_eval_errors_name_the_option_and_check_errors_the_yaml_key(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """threshold_results's errors named check's YAML key (max_cross_gpu_vs_baseline) in `moeplace
    eval`, whose user typed --max-cross-gpu-vs-baseline."""
    loads = np.random.default_rng(0).integers(1, 100, size=(2, 8)).astype(float)
    save_loads(ExpertLoads(loads, {"source": "loads-json"}), tmp_path / "loads.npz")
    Placement(contiguous(2, 8, 4), 4, 2).save(tmp_path / "p.json")
    Placement(contiguous(2, 8, 4)[:, ::-1].copy(), 4, 2).save(tmp_path / "old.json")
    base = ["eval", str(tmp_path / "p.json"), str(tmp_path / "loads.npz"), "--baseline", str(tmp_path / "old.json")]
    for option in ("--max-cross-gpu", "--max-dest-nodes", "--max-cross-gpu-vs-baseline"):
        assert one_error_line(capsys, [*base, option, "0.5"]) == (
            f"moeplace: error: {option}: {tmp_path / 'loads.npz'} is a load-only file (no token paths): only the "
            "imbalance thresholds apply to it")
    # `moeplace check` names the key its YAML holds
    (tmp_path / "c.yaml").write_text("checks:\n  - placement: p.json\n    trace: loads.npz\n    baseline: old.json\n"
                                     "    max_cross_gpu_vs_baseline: 0.5\n")
    assert run(["check", str(tmp_path / "c.yaml")]) == 2
    assert f"ERROR check 1: max_cross_gpu_vs_baseline: {tmp_path / 'loads.npz'} is a load-only file" in \
           capsys.readouterr().out


# --- serve --chat-template -------------------------------------------------------------------


def test_nproc_per_node_hands_its_ranks_a_piped_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--chat-template /dev/stdin` fed by a pipe, or bash's `<(...)`: the launcher's check read the pipe
    empty, and rank 0 then found "the template is empty" (or, for /dev/fd/N, "no such file"). The ranks
    now get a copy of what the pipe held, removed when they are done; a regular file or template text
    is handed on as given."""
    from moeplace.serve import launch

    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    seen: list[tuple[str, str | None]] = []

    def fake_launch(nproc: int, argv: list[str], grace: int = 0) -> None:
        value = next(a.split("=", 1)[1] for a in argv if a.startswith("--chat-template="))
        seen.append((value, Path(value).read_text(encoding="utf-8") if Path(value).is_file() else None))

    monkeypatch.setattr(launch, "precheck", lambda *args: None)
    monkeypatch.setattr(launch, "launch", fake_launch)
    monkeypatch.setattr(launch, "under_torchrun", lambda: False)
    read, write = os.pipe()
    os.write(write, template.encode())
    os.close(write)
    try:
        argv = ["serve", "--nproc-per-node", "2", "--device", "cpu", "--model", str(TINY), "--port", "0"]
        assert run([*argv, "--chat-template", f"/dev/fd/{read}"]) == 0
    finally:
        os.close(read)
    (copy, text), = seen
    assert text == template and not Path(copy).exists()  # the ranks read the template; the copy went with them
    (tmp_path / "chat.jinja").write_text(template)
    assert run([*argv, "--chat-template", str(tmp_path / "chat.jinja")]) == 0
    assert run([*argv, "--chat-template", template]) == 0
    assert seen[1:] == [(str(tmp_path / "chat.jinja"), template), (template, None)]
