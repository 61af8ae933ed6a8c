"""`moeplace trace --resume`: an interrupted trace, continued, equals one uninterrupted run."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from moeplace.cli import run
from moeplace.models.tiny import build_tiny_model
from moeplace.trace import text as text_mod
from moeplace.trace.format import file_sha256, load_trace, make_trace, save_trace
from moeplace.trace.text import Batch

ARRAYS = ("topk_ids", "topk_weights", "token_ids", "sequence_ids", "positions")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {f: build_tiny_model(f, root / f, initializer_range=0.2) for f in ("olmoe", "mixtral")}


@pytest.fixture
def data(tmp_path: Path) -> list[Path]:
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("Experts that fire together are placed together. " * 12)
    b.write_text("\n".join(json.dumps({"text": f"Document {i}: routing shifts with the domain of the text."})
                           for i in range(6)) + "\n")
    return [a, b]


def trace(model: Path, data: list[Path], out: Path, *extra: str) -> int:
    args = ["trace", "--model", str(model), "-o", str(out), "-q", "--seq-len", "16", "--batch-size", "2"]
    for f in data:
        args += ["--data", str(f)]
    return run([*args, *extra])


def assert_same_trace(resumed: Path, full: Path) -> None:
    a, b = load_trace(resumed), load_trace(full)
    for key in ARRAYS:  # bit for bit: the weights compared as their bytes
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), key
    assert a.num_experts == b.num_experts
    assert {k: v for k, v in a.meta.items() if k != "resumed"} == b.meta


def test_resume_after_interruptions_equals_the_uninterrupted_trace(models: dict[str, Path], data: list[Path],
                                                                   tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str],
        ctrl_c_at_batch: Callable[[int], Callable[..., Iterator[Batch]]]) -> None:
    full, part = tmp_path / "full.npz", tmp_path / "part.npz"
    assert trace(models["olmoe"], data, full, "--max-tokens", "700") == 0
    assert load_trace(full).num_tokens == 700  # both files read: the resume crosses into b.jsonl

    monkeypatch.setattr(text_mod, "iter_batches", ctrl_c_at_batch(3))
    assert trace(models["olmoe"], data, part, "--max-tokens", "700") == 130
    first = load_trace(part)
    assert first.num_tokens == 96 and first.meta["interrupted"] is True and first.meta["batch_size"] == 2
    first_sha = file_sha256(part)

    # the resumed run is interrupted too: the partial trace itself grows (it is -o), nothing goes beside it
    monkeypatch.setattr(text_mod, "iter_batches", ctrl_c_at_batch(2))
    assert trace(models["olmoe"], data, part, "--max-tokens", "700", "--resume", str(part)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"(interrupted: a valid shorter trace; resumed from {part} at 96 tokens)"), err
    second = load_trace(part)
    assert second.num_tokens == 160 and second.meta["interrupted"] is True
    assert second.meta["resumed"] == [{"file": str(part), "sha256": first_sha, "tokens": 96}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.jsonl", "full.npz", "part.npz"]

    monkeypatch.undo()  # no more interruptions
    out = tmp_path / "resumed.npz"
    assert trace(models["olmoe"], data, out, "--max-tokens", "700", "--resume", str(part)) == 0
    assert_same_trace(out, full)
    assert "interrupted" not in load_trace(out).meta
    assert [r["tokens"] for r in load_trace(out).meta["resumed"]] == [96, 160]


def test_the_model_does_not_run_on_the_windows_already_traced(models: dict[str, Path], data: list[Path],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ctrl_c_at_batch: Callable[[int], Callable[..., Iterator[Batch]]]) -> None:
    from moeplace.trace import collect as collect_mod

    part = tmp_path / "part.npz"
    monkeypatch.setattr(text_mod, "iter_batches", ctrl_c_at_batch(2))
    assert trace(models["mixtral"], data, part) == 130
    monkeypatch.undo()
    routed: list[int] = []
    real = collect_mod.route_batch

    def counting(model: object, recorder: object, input_ids: object) -> object:
        routed.append(int(input_ids.shape[0]))  # type: ignore[attr-defined]
        return real(model, recorder, input_ids)  # type: ignore[arg-type]

    monkeypatch.setattr(collect_mod, "route_batch", counting)
    assert trace(models["mixtral"], data, part, "--resume", str(part)) == 0
    seq = load_trace(part).sequence_ids
    assert seq is not None
    total_windows = int(seq.max()) + 1
    assert sum(routed) == total_windows - 4  # the 4 windows (2 batches) of the partial trace were not run again


def test_a_complete_trace_is_left_as_it_is(models: dict[str, Path], data: list[Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.npz"
    assert trace(models["olmoe"], data[:1], out) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert run(["trace", "--model", str(models["olmoe"]), "--data", str(data[0]), "-o", str(out), "--seq-len", "16",
                "--batch-size", "2", "--resume", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"{out} already holds every window of --data: nothing left to trace; {out} left as it is")
    assert out.read_bytes() == before


def test_an_interrupt_before_a_new_batch_leaves_the_partial_trace(models: dict[str, Path], data: list[Path],
                                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str],
        ctrl_c_at_batch: Callable[[int], Callable[..., Iterator[Batch]]]) -> None:
    part = tmp_path / "part.npz"
    monkeypatch.setattr(text_mod, "iter_batches", ctrl_c_at_batch(1))
    assert trace(models["olmoe"], data, part) == 130
    before = part.read_bytes()
    monkeypatch.setattr(text_mod, "iter_batches", ctrl_c_at_batch(0))
    capsys.readouterr()
    assert trace(models["olmoe"], data, part, "--resume", str(part)) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"moeplace: error: interrupted before the first batch completed: {part} left as it was")
    assert part.read_bytes() == before


@pytest.fixture
def partial(models: dict[str, Path], data: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ctrl_c_at_batch: Callable[[int], Callable[..., Iterator[Batch]]]) -> Path:
    part = tmp_path / "part.npz"
    with monkeypatch.context() as m:
        m.setattr(text_mod, "iter_batches", ctrl_c_at_batch(2))
        assert trace(models["olmoe"], data, part) == 130
    return part


def refused(capsys: pytest.CaptureFixture[str], code: int, part: Path, before: bytes) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert part.read_bytes() == before and not (part.parent / "out.npz").exists()
    return err[0]


@pytest.mark.parametrize("case, expected", [
    ("other model", 'it was traced with --model "{olmoe}", this run has "{mixtral}"'),
    ("other seq-len", "it was traced with --seq-len 16, this run has 32"),
    ("other batch-size", "it was traced with --batch-size 2, this run has 4"),
    ("other dtype", 'it was traced with --dtype "float32", this run has "bfloat16"'),
    ("other file", "it read {a}, which this run's --data does not give"),
    ("file grown", "{a} held 576 bytes when traced, {a} holds 577 now"),
    ("text changed", "sequence 1 differs from what --data gives now (token 4 is 103 there, 84 now): resume with "
                     "the same --data, --tokenizer and --seq-len"),
    ("max-tokens", "holds 64 tokens, more than --max-tokens 50 (which counts the whole trace, the partial one "
                   "included)"),
])
def test_a_resume_that_would_not_continue_the_same_trace_is_refused(
        models: dict[str, Path], data: list[Path], partial: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], case: str, expected: str) -> None:
    before = partial.read_bytes()
    model, extra, files = models["olmoe"], [], list(data)
    a = data[0]
    if case == "other model":
        model = models["mixtral"]
    elif case == "other seq-len":
        extra = ["--seq-len", "32"]
    elif case == "other batch-size":
        extra = ["--batch-size", "4"]
    elif case == "other dtype":
        extra = ["--dtype", "bf16"]
    elif case == "other file":
        files[0] = tmp_path / "c.txt"
        files[0].write_text(a.read_text())
    elif case == "file grown":
        a.write_text(a.read_text() + "!")
    elif case == "text changed":  # same size, one letter other
        text = a.read_text()
        a.write_text(text[:20] + "T" + text[21:])
    elif case == "max-tokens":
        extra = ["--max-tokens", "50"]
    capsys.readouterr()
    code = trace(model, files, tmp_path / "out.npz", *extra, "--resume", str(partial))
    line = refused(capsys, code, partial, before)
    assert line == f"moeplace: error: --resume {partial}: " + expected.format(
        olmoe=models["olmoe"], mixtral=models["mixtral"], a=a)


def test_an_older_partial_trace_with_other_batches_is_refused(models: dict[str, Path], data: list[Path],
                                                               partial: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A partial trace from before meta.batch_size: its sequence count still tells other batches."""
    t = load_trace(partial)
    older = tmp_path / "older.npz"
    save_trace(make_trace(t.topk_ids, t.topk_weights, t.num_experts, token_ids=t.token_ids,
                          sequence_ids=t.sequence_ids, positions=t.positions,
                          meta={k: v for k, v in t.meta.items() if k not in ("batch_size", "data_bytes", "format")}),
               older)
    before = older.read_bytes()
    capsys.readouterr()
    code = trace(models["olmoe"], data, tmp_path / "out.npz", "--batch-size", "3", "--resume", str(older))
    assert refused(capsys, code, older, before) == (
        f"moeplace: error: --resume {older}: holds 4 sequences, not whole batches of --batch-size 3: it was traced "
        "with another --batch-size")


def test_a_checkpoint_whose_router_weights_changed_at_the_same_path_is_refused(
        models: dict[str, Path], data: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, ctrl_c_at_batch: Callable[[int], Callable[..., Iterator[Batch]]]) -> None:
    """A new fine-tune saved over the checkpoint: same path, config and tokenizer, other routers."""
    ckpt = shutil.copytree(models["olmoe"], tmp_path / "ckpt")
    part = tmp_path / "part.npz"
    with monkeypatch.context() as m:
        m.setattr(text_mod, "iter_batches", ctrl_c_at_batch(2))
        assert trace(ckpt, data, part) == 130
    traced_with = load_trace(part).meta["router_sha256"]
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.2.mlp.gate.weight"][3, 5] += 1e-3  # one number of one router
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    before = part.read_bytes()
    capsys.readouterr()
    code = trace(ckpt, data, tmp_path / "out.npz", "--resume", str(part))
    line = refused(capsys, code, part, before)
    found = re.fullmatch(rf'moeplace: error: --resume {re.escape(str(part))}: it was traced with router weights '
                         rf'router_sha256 "{traced_with}", --model\'s are "([0-9a-f]{{16}})" now: the checkpoint was '
                         'replaced or changed since; trace it anew', line)
    assert found and found[1] != traced_with, line


def test_a_partial_trace_without_a_router_fingerprint_resumes_with_a_warning(
        models: dict[str, Path], data: list[Path], partial: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Written before meta.router_sha256: resumed, saying the weights cannot be checked, and the
    result claims no fingerprint (it would vouch for the partial trace's tokens too)."""
    t = load_trace(partial)
    assert "router_sha256" in t.meta
    older = tmp_path / "older.npz"
    save_trace(make_trace(t.topk_ids, t.topk_weights, t.num_experts, token_ids=t.token_ids,
                          sequence_ids=t.sequence_ids, positions=t.positions,
                          meta={k: v for k, v in t.meta.items() if k not in ("router_sha256", "format")}), older)
    full, out = tmp_path / "full.npz", tmp_path / "out.npz"
    assert trace(models["olmoe"], data, full) == 0
    capsys.readouterr()
    assert trace(models["olmoe"], data, out, "--resume", str(older)) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moeplace: warning: --resume {older}: its meta has no router_sha256 (an older moeplace wrote it): the "
        "model's weights cannot be checked against the ones it was traced with; the resumed trace records none"]
    resumed, whole = load_trace(out), load_trace(full)
    for key in ARRAYS:
        assert getattr(resumed, key).tobytes() == getattr(whole, key).tobytes(), key
    assert "router_sha256" not in resumed.meta and resumed.meta["resumed"][0]["file"] == str(older)
    assert {k: v for k, v in resumed.meta.items() if k != "resumed"} == {
        k: v for k, v in whole.meta.items() if k != "router_sha256"}


def test_only_a_trace_moeplace_trace_wrote_resumes(models: dict[str, Path], data: list[Path], tmp_path: Path,
                                                   small_trace: object, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "imported.npz"
    save_trace(small_trace, other)  # type: ignore[arg-type]
    before = other.read_bytes()
    code = trace(models["olmoe"], data, tmp_path / "out.npz", "--resume", str(other))
    assert refused(capsys, code, other, before) == (
        f"moeplace: error: --resume {other}: not a trace `moeplace trace` wrote (meta source null): only such a "
        "trace can be resumed")


def test_skip_windows_checks_the_partial_traces_numbering() -> None:
    windows = iter([np.array([1, 2, 3]), np.array([4, 5])])
    with pytest.raises(Exception, match="not windows numbered from 0"):
        text_mod.skip_windows(windows, np.array([1, 2, 3]), np.array([1, 1, 1]), np.array([0, 1, 2]), "p")
    windows = iter([np.array([1, 2, 3]), np.array([4, 5]), np.array([6])])
    assert text_mod.skip_windows(windows, np.array([1, 2, 3, 4, 5]), np.array([0, 0, 0, 1, 1]),
                                 np.array([0, 1, 2, 0, 1]), "p") == 2
    assert next(windows).tolist() == [6]  # the next window is left for the run


def test_a_trace_cut_inside_a_window_by_max_tokens_is_refused_with_the_reason(
        models: dict[str, Path], data: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--max-tokens 40 with 16-token windows ends inside the third window: extending that trace
    cannot continue the window it cut, and the refusal says so instead of "sequence 2 differs"."""
    out = tmp_path / "t.npz"
    assert trace(models["olmoe"], data, out, "--max-tokens", "40") == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert trace(models["olmoe"], data, out, "--max-tokens", "200", "--resume", str(out)) == 2
    err = capsys.readouterr().err
    assert "its last sequence stops after 8 of this window's 16 tokens (its --max-tokens cut it)" in err, err
    assert out.read_bytes() == before


def test_a_trace_output_missing_what_resuming_reads_is_named(models: dict[str, Path], data: list[Path],
                                                              tmp_path: Path, small_trace: object,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a `moeplace trace` file that lost its positions (an edit, another tool) was refused as
    'not a trace moeplace trace wrote (meta source "moeplace trace")', the right source given as
    the reason. The missing array is named."""
    import dataclasses

    stripped = tmp_path / "stripped.npz"
    save_trace(dataclasses.replace(small_trace, meta={"source": "moeplace trace"}, positions=None,  # type: ignore
                                   token_ids=np.arange(24)), stripped)
    before = stripped.read_bytes()
    code = trace(models["olmoe"], data, tmp_path / "out.npz", "--resume", str(stripped))
    message = refused(capsys, code, stripped, before)
    assert message.startswith(f"moeplace: error: --resume {stripped}: has no positions, which every `moeplace "
                              "trace` output holds"), message
