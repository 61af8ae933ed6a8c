"""`moeplace trace`: recorded routing equals the model's own, on tiny models of every family."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import ROOT, SHARED_DATA
from moeplace.analyze.affinity import affinity
from moeplace.cli import run
from moeplace.errors import MoeplaceError
from moeplace.models.discovery import find_moe_layers
from moeplace.models.tiny import FAMILIES, build_tiny_model, byte_tokenizer
from moeplace.parallel import available_cpus
from moeplace.trace import collect as collect_mod
from moeplace.trace import text as text_mod
from moeplace.trace.collect import RouterRecorder, collect, route_batch
from moeplace.trace.format import load_trace
from moeplace.trace.text import Batch, expand_paths, iter_batches, iter_windows

F = torch.nn.functional


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    # a larger init spread than the default makes routing decisive (no near-ties in the reference)
    return {f: build_tiny_model(f, root / f, initializer_range=0.2) for f in FAMILIES}


def load(path: Path) -> nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


# ---- reference routing: each family's rule re-derived from its router logits -------------------

def reference_route(family: str, logits: torch.Tensor, router: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [T, k], weights [T, k]) highest weight first, from router logits [T, E]."""
    k, logits = router.top_k, logits.float()
    if family == "gpt_oss":
        top, ids = logits.topk(k, dim=-1)
        return ids, top.softmax(-1)
    if family == "deepseek_v3":
        scores = logits.sigmoid()
        choice = scores + router.e_score_correction_bias
        t, e, g = choice.shape[0], choice.shape[1], router.num_group
        group_score = choice.view(t, g, e // g).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros(t, g).scatter(1, group_score.topk(router.topk_group, dim=-1).indices, 1.0)
        choice = choice.masked_fill(keep.repeat_interleave(e // g, dim=1) == 0, float("-inf"))
        ids = choice.topk(k, dim=-1).indices
        w = scores.gather(1, ids)
        w = w / w.sum(-1, keepdim=True) * router.routed_scaling_factor
        return _sorted(ids, w)
    probs = logits.softmax(-1)
    if family == "deepseek_v2":
        t, e, g = probs.shape[0], probs.shape[1], router.num_group
        group_score = probs.view(t, g, e // g).max(-1).values
        keep = torch.zeros(t, g).scatter(1, group_score.topk(router.topk_group, dim=-1).indices, 1.0)
        w, ids = probs.masked_fill(keep.repeat_interleave(e // g, dim=1) == 0, 0.0).topk(k, dim=-1)
        return _sorted(ids, w * router.routed_scaling_factor)
    w, ids = probs.topk(k, dim=-1)
    if getattr(router, "norm_topk_prob", family == "mixtral"):
        w = w / w.sum(-1, keepdim=True)
    return ids, w


def _sorted(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = w.argsort(dim=-1, descending=True, stable=True)
    return ids.gather(-1, order), w.gather(-1, order)


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_routing_equals_router_rule(tiny_dirs: dict[str, Path], family: str) -> None:
    model = load(tiny_dirs[family])
    layers = find_moe_layers(model)
    x = torch.randint(0, 256, (3, 11), generator=torch.Generator().manual_seed(1))
    with RouterRecorder(layers) as rec:
        ids, weights = route_batch(model, rec, x)
    assert ids.shape == weights.shape == (33, len(layers), 2)
    assert (np.diff(weights, axis=-1) <= 0).all()  # highest weight first
    with torch.no_grad():
        logits = model(input_ids=x, output_router_logits=True).router_logits
    assert len(logits) == len(layers)
    for m, layer_logits in zip(layers, logits):
        ref_ids, ref_w = reference_route(family, layer_logits, m.router)
        np.testing.assert_array_equal(ids[:, m.moe_index], ref_ids.numpy())
        np.testing.assert_allclose(weights[:, m.moe_index], ref_w.numpy(), rtol=1e-5, atol=1e-6)
    if family == "deepseek_v3":  # the bias and groups change the choice: plain top-k would differ
        plain = logits[0].sigmoid().topk(2, dim=-1).indices.sort(-1).values.numpy()
        assert (np.sort(ids[:, 0], -1) != plain).any()


def test_right_padding_is_exact(tiny_dirs: dict[str, Path]) -> None:
    model = load(tiny_dirs["qwen3_moe"])
    layers = find_moe_layers(model)
    long, short = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 5))
    with RouterRecorder(layers) as rec:
        alone = route_batch(model, rec, short)[0]
        padded = route_batch(model, rec, torch.cat([long, F.pad(short, (0, 7), value=3)]))[0]
    np.testing.assert_array_equal(padded[12:17], alone)


def test_collect_interrupted_keeps_completed_batches(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    model = load(tiny_dirs["mixtral"])
    layers = find_moe_layers(model)
    windows = [np.arange(i, i + 6) for i in range(5)]

    def interrupted() -> Iterator[Batch]:
        for n, b in enumerate(iter_batches(windows, 2)):
            if n == 2:
                raise KeyboardInterrupt
            yield b

    out = collect(model, layers, interrupted(), device=torch.device("cpu"), meta={}, spool_dir=tmp_path,
                  progress=False)
    assert out.interrupted and out.num_batches == 2 and out.trace is not None
    assert out.trace.num_tokens == 24 and out.trace.sequence_ids.max() == 3
    assert list(tmp_path.iterdir()) == []  # the spool directory is gone


def test_progress_rate_leaves_the_warm_up_out(tiny_dirs: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = load(tiny_dirs["mixtral"])
    layers = find_moe_layers(model)
    clock = iter([0.0, 10.0, 11.0, 12.0, 12.0])  # start, after batches 1 (10 s of warm-up), 2, 3, end
    monkeypatch.setattr(collect_mod, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    notes: list[str] = []

    class Recording:
        def __init__(self, *args: object, **kw: object) -> None: ...
        def update(self, done: float, note: str = "") -> None: notes.append(note)
        def close(self, note: str = "") -> None: ...

    monkeypatch.setattr(collect_mod, "Progress", Recording)
    windows = [np.arange(i, i + 6) for i in range(6)]  # 3 batches of 2 x 6 tokens
    collect(model, layers, iter_batches(windows, 2), device=torch.device("cpu"), meta={}, spool_dir=tmp_path)
    assert notes == ["12 tokens, 1 tokens/s", "24 tokens, 12 tokens/s", "36 tokens, 12 tokens/s"]


def test_progress_says_the_time_left_once_a_few_percent_are_done(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from moeplace import progress as progress_mod

    clock = iter([0.0, 1.0, 5.0, 100.0, 400.0])  # start, then each update
    monkeypatch.setattr(progress_mod, "time", SimpleNamespace(monotonic=lambda: next(clock)))
    bar = progress_mod.Progress("step", total=1000, after=0.0, every=0.0)
    for done in (10, 100, 500, 40):  # 1% (too early to tell), 10%, 50%, then a slow run's 4%
        bar.update(done, "x")
    assert capsys.readouterr().err.splitlines() == [
        "step:  1.0% x [1.0s]", "step: 10.0% x [5.0s, ~45s left]", "step: 50.0% x [100.0s, ~1m40s left]",
        "step:  4.0% x [400.0s, ~2h40m left]"]
    clock = iter([0.0, 50.0])
    progress_mod.Progress("step", after=0.0, every=0.0).update(500, "x")  # no total: no share, no time left
    assert capsys.readouterr().err.splitlines() == ["step: x [50.0s]"]


def test_input_share_follows_the_text_read(tmp_path: Path) -> None:
    """The share of the input bytes behind the first N tokens: interpolated within a piece of text,
    a .jsonl file's JSON syntax caught up when the next file starts or the input ends."""
    (tmp_path / "a.txt").write_text("x" * 10)
    (tmp_path / "b.jsonl").write_text('{"text": "yyyy"}\n')  # 17 bytes, 4 of them text
    files = expand_paths([tmp_path / "a.txt", tmp_path / "b.jsonl"])
    share = collect_mod.InputShare([f.stat().st_size for f in files])

    def tok(text: str) -> list[int]:
        share.tokenized(text, len(text))
        return [ord(c) for c in text]

    windows = iter_windows(share.files(files), tok, 4)
    seen, done = [], 0
    for w in windows:
        done += len(w)
        seen.append(share.at(done) * 27)
    assert seen == pytest.approx([4, 8, 10, 14])  # windows of 4, 4, 2 (a.txt) and 4 (b.jsonl's text)
    assert share.at(done) == 1.0  # the input is all read


def test_trace_without_max_tokens_shows_the_share_of_the_text_read(
        tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from moeplace.progress import Progress

    monkeypatch.setattr(collect_mod, "Progress", lambda *a, **kw: Progress(*a, **kw, after=0.0, every=0.0))
    assert run(["trace", "--model", str(tiny_dirs["mixtral"]), "--data", str(corpus), "-o", str(tmp_path / "t.npz"),
                "--seq-len", "64", "--batch-size", "2"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trace: ")]
    shares = [float(line.split()[1].removesuffix("%")) for line in lines[:-1] if line.split()[1].endswith("%")]
    # 576 tokens: 5 batches of 2 x 64, each line with its share
    assert len(shares) == 5 and shares == sorted(shares) and shares[0] > 0 and shares[-1] == 100.0
    assert lines[-2].endswith("left]") and lines[-1].startswith("trace: done 576 tokens")


# ---- text input ----------------------------------------------------------------------------------

def test_windows_and_batches(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x" * 10)
    (tmp_path / "b.jsonl").write_text('{"text": "yyy"}\n\n{"text": "zzzzz"}\n')
    files = expand_paths([tmp_path])
    tok = lambda s: [ord(c) for c in s]  # noqa: E731
    assert [len(w) for w in iter_windows(files, tok, 4)] == [4, 4, 2, 3, 4, 1]
    assert [len(w) for w in iter_windows(files, tok, 4, max_tokens=9)] == [4, 4, 1]
    batches = list(iter_batches(iter_windows(files, tok, 4), 4, pad_id=0))
    assert [b.input_ids.shape for b in batches] == [(4, 4), (2, 4)]
    assert batches[0].lengths.tolist() == [4, 4, 2, 3] and batches[1].sequence_ids.tolist() == [4, 5]
    assert batches[0].num_tokens == 13 and batches[0].input_ids[2, 2:].tolist() == [0, 0]


@pytest.mark.parametrize("content, match", [
    ('{"text": 3}\n', "string 'text' field"),
    ("not json\n", "not a JSON line"),
])
def test_bad_jsonl(tmp_path: Path, content: str, match: str) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(content)
    with pytest.raises(MoeplaceError, match=match):
        list(iter_windows([f], list, 4))


# ---- the CLI end to end --------------------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    f = tmp_path / "corpus.txt"
    f.write_text("Experts that fire together are placed together. " * 12)
    return f


def trace_cli(model: Path, data: Path, out: Path, *extra: str) -> int:
    return run(["trace", "--model", str(model), "--data", str(data), "-o", str(out), "-q", *extra])


def test_cli_end_to_end(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.npz"
    assert trace_cli(tiny_dirs["qwen2_moe"], corpus, out, "--seq-len", "64", "--batch-size", "3",
                     "--max-tokens", "500") == 0
    t = load_trace(out)
    expected_ids = byte_tokenizer()(corpus.read_text(), add_special_tokens=False)["input_ids"][:500]
    assert t.num_tokens == 500 and t.token_ids.tolist() == expected_ids
    assert (t.num_layers, t.top_k, t.num_experts) == (3, 2, 8)
    assert t.meta["moe_layers"] == [0, 2, 3] and t.meta["dense_layers"] == [1]
    assert t.sequence_ids.tolist() == np.repeat(np.arange(8), 64)[:500].tolist()
    assert t.positions.tolist() == np.tile(np.arange(64), 8)[:500].tolist()
    assert t.meta["corpus"] == "corpus" and t.meta["dtype"] == "float32"
    # the same tokens routed directly give the same ids
    model = load(tiny_dirs["qwen2_moe"])
    with RouterRecorder(find_moe_layers(model)) as rec:
        direct = route_batch(model, rec, torch.tensor([expected_ids[:64]]))[0]
    np.testing.assert_array_equal(t.topk_ids[:64], direct)


def test_trace_of_a_renumbered_checkpoint_says_so(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    """A `permute-checkpoint` output renumbers experts: its trace records the original, so eval can
    warn about a placement of the original even when the directory is gone."""
    placed = tmp_path / "placed"
    shutil.copytree(tiny_dirs["qwen2_moe"], placed)
    assert trace_cli(placed, corpus, tmp_path / "plain.npz", "--max-tokens", "50") == 0
    assert "renumbered_from" not in load_trace(tmp_path / "plain.npz").meta
    (placed / "moeplace_permutation.json").write_text(json.dumps({"format": "moeplace.permutation/v1",
                                                                  "source": "ckpt/original"}))
    assert trace_cli(placed, corpus, tmp_path / "t.npz", "--max-tokens", "50") == 0
    t = load_trace(tmp_path / "t.npz")
    assert t.meta["renumbered_from"] == "ckpt/original"
    assert (t.model_identity() or {})["renumbered_from"] == "ckpt/original"


def test_cli_interrupt_writes_valid_shorter_trace(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str],
                                                   ctrl_c_at_batch: Callable[[int], Callable[..., Iterator[Batch]]],
                                                   ) -> None:
    out = tmp_path / "t.npz"
    monkeypatch.setattr(text_mod, "iter_batches", ctrl_c_at_batch(2))
    assert trace_cli(tiny_dirs["olmoe"], corpus, out, "--seq-len", "16", "--batch-size", "2") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("(interrupted: a valid shorter trace)"), err  # and no "aborted" after it
    t = load_trace(out)
    assert t.num_tokens == 64 and t.meta["interrupted"] is True
    monkeypatch.setattr(text_mod, "iter_batches", ctrl_c_at_batch(0))
    out0 = tmp_path / "none.npz"
    assert trace_cli(tiny_dirs["olmoe"], corpus, out0) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "moeplace: error: interrupted before the first batch completed: no trace written")
    assert not out0.exists() and [p.name for p in tmp_path.iterdir()] == ["corpus.txt", "t.npz"]


def test_cli_interrupt_leaves_an_existing_trace_untouched(tiny_dirs: dict[str, Path], corpus: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.npz"
    assert trace_cli(tiny_dirs["olmoe"], corpus, out, "--seq-len", "16", "--batch-size", "2") == 0
    complete = out.read_bytes()
    real = text_mod.iter_batches

    def one_batch(*args: object, **kw: object) -> Iterator[Batch]:  # Ctrl-C after the first batch
        batches = real(*args, **kw)  # type: ignore[arg-type]
        yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(text_mod, "iter_batches", one_batch)
    capsys.readouterr()
    assert trace_cli(tiny_dirs["olmoe"], corpus, out, "--seq-len", "16", "--batch-size", "2") == 130
    assert out.read_bytes() == complete  # the complete trace is not replaced by a partial one
    beside = tmp_path / "out.interrupted.npz"
    t = load_trace(beside)
    assert t.num_tokens == 32 and t.meta["interrupted"] is True
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wrote {beside}: 32 tokens x 4 MoE layers x top-2 over 8 experts, decoder layers [0, 1, 2, 3], "
                   f"from corpus.txt (interrupted: a valid shorter trace; {out} left as it was)"]


def test_cli_messages(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    one_layer = build_tiny_model("qwen3_moe", tmp_path / "one-layer", num_layers=2)  # layer 1 is dense
    out = tmp_path / "t.npz"
    args = ["trace", "--model", str(one_layer), "--data", str(corpus), "-o", str(out), "--max-tokens", "100"]
    assert run(args) == 0
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert err[-1].startswith("trace: done 100 tokens [") and " in " not in err[-1], err  # the time once
    assert cap.out == f"wrote {out}: 100 tokens x 1 MoE layer x top-2 over 8 experts, decoder layer [0], from corpus.txt\n"
    assert run([*args, "-q"]) == 0 and capsys.readouterr() == ("", "")  # -q: errors only
    for name, text in (("empty.txt", ""), ("blank.jsonl", "\n  \n")):  # nothing to trace: no "done"
        (tmp_path / name).write_text(text)
        assert run(["trace", "--model", str(one_layer), "--data", str(tmp_path / name), "-o", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"moeplace: error: no tokens in {tmp_path / name}"]


def test_cli_meta_lists_only_the_files_read(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("x" * 40)
    b.write_text('{"text": "more text"}\n')
    out = tmp_path / "t.npz"
    assert trace_cli(tiny_dirs["mixtral"], a, out, "--data", str(b), "--max-tokens", "30") == 0
    t = load_trace(out)
    assert t.meta["data"] == [str(a)] and t.meta["corpus"] == "a"
    assert trace_cli(tiny_dirs["mixtral"], a, out, "--data", str(b), "--max-tokens", "45") == 0
    t = load_trace(out)
    assert t.meta["data"] == [str(a), str(b)] and t.meta["corpus"] == "a,b"


def test_data_given_twice_is_refused(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.npz"
    again = tmp_path / ".." / tmp_path.name / corpus.name  # the same file by another path
    for extra, message in ((corpus, f"{corpus}: already read"), (again, f"{again}: already read as {corpus}"),
                           (tmp_path, f"{corpus} (in {tmp_path}): already read")):
        assert trace_cli(tiny_dirs["mixtral"], corpus, out, "--data", str(extra)) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"moeplace: error: --data {message}; give each file once (its text would be traced twice)"]
    assert not out.exists()


def test_directory_picks_text_files_in_any_case_skipping_hidden(tmp_path: Path) -> None:
    for name in ("B.TXT", "a.jsonl", "sub/c.Txt", "notes.md", ".draft.txt", ".cache/d.txt", "sub/.e.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "t"}\n')
    assert [f.relative_to(tmp_path).as_posix() for f in expand_paths([tmp_path])] == ["B.TXT", "a.jsonl", "sub/c.Txt"]
    assert expand_paths([tmp_path / "B.TXT"]) == [tmp_path / "B.TXT"]
    sources: list[tuple[Path, int]] = []
    windows = list(iter_windows(expand_paths([tmp_path]), lambda s: [ord(c) for c in s], 4, sources=sources))
    assert [len(w) for w in windows] == [4, 4, 4, 2, 1, 4, 4, 4, 2]  # a.jsonl is one 1-token document
    assert [(f.name, first) for f, first in sources] == [("B.TXT", 0), ("a.jsonl", 4), ("c.Txt", 5)]


def test_directory_skips_licence_and_notice_files_unless_named(tmp_path: Path) -> None:
    for name in ("LICENSE-olmoe-apache-2.0.txt", "licence.txt", "sub/COPYING.TXT", "Notice.jsonl", "a.txt",
                 "licensed_text.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "t"}\n')
    skipped: list[Path] = []
    assert [f.name for f in expand_paths([tmp_path], skipped)] == ["a.txt", "licensed_text.txt"]
    assert sorted(f.name for f in skipped) == ["COPYING.TXT", "LICENSE-olmoe-apache-2.0.txt", "Notice.jsonl",
                                               "licence.txt"]
    assert expand_paths([tmp_path / "licence.txt"]) == [tmp_path / "licence.txt"]  # named: read
    only = tmp_path / "sub"
    with pytest.raises(MoeplaceError, match="licence/notice files skipped"):
        expand_paths([only])


def test_cli_says_which_licence_files_it_skipped_and_names_the_corpus(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "LICENSE-olmoe-apache-2.0.txt").write_text("Apache License " * 20)
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (data / name).write_text(f"text of {name} ")
    out = tmp_path / "t.npz"
    assert run(["trace", "--model", str(tiny_dirs["olmoe"]), "--data", str(data), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert (f"trace: skipped 1 licence/notice file in --data directories: {data / 'LICENSE-olmoe-apache-2.0.txt'} "
            "(give a file as --data itself to read it)") in cap.err.splitlines()
    assert cap.out.endswith(", from 4 files\n"), cap.out
    t = load_trace(out)
    assert t.meta["corpus"] == "a,b,c,d" and "LICENSE" not in " ".join(t.meta["data"])
    assert run(["trace", "--model", str(tiny_dirs["olmoe"]), "--data", str(data / "a.txt"), "--data",
                str(data / "b.txt"), "-o", str(out)]) == 0
    cap = capsys.readouterr()
    assert cap.out.endswith(", from a.txt, b.txt\n") and "skipped" not in cap.err, cap


def test_sigterm_keeps_the_batches_done_and_removes_the_spool(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    # `kill`, `timeout`, Slurm preemption or a cancelled CI job: as Ctrl-C, the batches done
    # become a valid shorter trace, one line, exit 128 + 15, and no hidden spool of routed
    # batches is left behind (Python's default would leave the spool and write nothing; before,
    # SIGTERM wrote nothing either, losing the run)
    corpus = tmp_path / "corpus.txt"  # long enough that the run is far from done at its first batch
    words = np.random.default_rng(0).choice(["expert", "token", "layer", "route", "gpu", "node"], 400_000)
    corpus.write_text(" ".join(words))
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "moeplace", "trace", "--model", str(ROOT / "checkpoints" / "tiny-moe"), "--data",
           str(corpus), "--seq-len", "64", "--batch-size", "2", "--threads", "1", "-o", str(out / "t.npz")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    # two parts spooled: the first is complete (the second may be mid-write)
    while not any(p.name.startswith(".moeplace-trace-") and len(list(p.glob("*.npz"))) > 1 for p in out.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "trace ended before it spooled a batch"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out / 't.npz'}: ") and last.endswith("(terminated (SIGTERM): a valid shorter trace)")
    assert [p.name for p in out.iterdir()] == ["t.npz"]
    t = load_trace(out / "t.npz")
    assert t.num_tokens > 0 and t.num_tokens % 64 == 0 and t.meta["interrupted"] is True


def test_cli_bad_inputs(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.npz"
    model = tiny_dirs["mixtral"]
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        (no_tok / f).write_bytes((model / f).read_bytes())
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_bytes((model / "config.json").read_bytes())
    (truncated / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:5000])
    byte_tokenizer().save_pretrained(truncated)
    not_a_tokenizer = tmp_path / "not-a-tokenizer"
    not_a_tokenizer.mkdir()
    dense = tmp_path / "dense"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
    )).save_pretrained(dense)
    byte_tokenizer().save_pretrained(dense)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    small_vocab = build_tiny_model("mixtral", tmp_path / "small-vocab", vocab_size=64)
    # weights of a layer missing: transformers would initialise them at random and trace noise
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in model.iterdir():
        if f.name != "model.safetensors":
            (partial / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(model / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.1.")}, str(partial / "model.safetensors"),
              metadata={"format": "pt"})
    # a config.json that disagrees with the weights' shapes: named, not "look at the report above"
    reshaped = tmp_path / "reshaped"
    shutil.copytree(model, reshaped)
    cfg = json.loads((reshaped / "config.json").read_text())
    (reshaped / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 2 * cfg["intermediate_size"]}))
    cases = [
        (["--model", str(reshaped)], "of the wrong shape, e.g. model.layers.0.mlp.experts."),
        (["--model", str(partial)], "missing from the checkpoint, e.g. model.layers.1."),
        (["--model", str(model), "--seq-len", "100000"], "exceeds the model's max_position_embeddings"),
        (["--model", str(tmp_path / "missing")], "no such directory"),
        (["--model", "some-org/some-moe"], "unreachable"),
        (["--model", str(dense)], "no sparse MoE block"),
        (["--model", str(no_tok)], "--tokenizer"),
        (["--model", str(truncated)], "cannot load model"),
        # the tokenizer is checked before the weights load (a real model takes minutes)
        (["--model", str(truncated), "--tokenizer", str(not_a_tokenizer)], "cannot load a tokenizer"),
        (["--model", str(model), "--data", str(tmp_path / "nope.txt")], f"--data {tmp_path / 'nope.txt'}: no such file"),
        (["--model", str(model), "--resume", str(tmp_path / "nope.npz")], f"--resume {tmp_path / 'nope.npz'}: no such file"),
        (["--model", str(model), "--data", str(tmp_path / "data.csv")], "unsupported text file"),
        (["--model", str(model), "--data", str(tmp_path / "empty.txt")], "no tokens"),
        (["--model", str(model), "--data", str(tmp_path / "binary.txt")], "not UTF-8"),
        (["--model", str(small_vocab)], "vocabulary size 64"),
        (["--model", str(model), "--seq-len", "0"], "'--seq-len': 0 is not in the range x>=1"),
        (["--model", str(model), "-o", str(corpus / "t.npz")], f"{corpus} is not a directory"),
        (["--model", str(model), "--device", "cuda"] if not torch.cuda.is_available() else None, "no CUDA"),
    ]
    for args, message in cases:
        if args is None:
            continue
        data = [] if "--data" in args else ["--data", str(corpus)]
        full = ["trace", *data, "-o", str(out), "-q", *args]
        assert run(full) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("moeplace: error:") and message in err[-1], (args, err)
        assert "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_cli_directory_and_separate_tokenizer(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.txt").write_text("first document")
    (data / "sub" / "b.jsonl").write_text('{"text": "second"}\n{"text": "third one"}\n')
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for f in ("config.json", "model.safetensors"):
        (weights_only / f).write_bytes((tiny_dirs["deepseek_v2"] / f).read_bytes())
    out = tmp_path / "t.npz"
    assert trace_cli(weights_only, data, out, "--tokenizer", str(tiny_dirs["mixtral"]), "--seq-len", "8") == 0
    t = load_trace(out)
    lengths = [len("first document"), len("second"), len("third one")]
    assert t.num_tokens == sum(lengths) and t.meta["corpus"] == "a,b"
    # windows never cross documents: 14 -> 8 + 6, 6, 9 -> 8 + 1
    assert np.bincount(t.sequence_ids).tolist() == [8, 6, 6, 8, 1]
    assert t.meta["moe_layers"] == [1, 2, 3] and t.meta["dense_layers"] == [0]


def test_trace_help_teaches() -> None:
    from click.testing import CliRunner

    from moeplace.trace.cli import trace

    text = CliRunner().invoke(trace, ["--help"]).output
    for needle in ("--model", "--data", "--seq-len", "--max-tokens", "--batch-size", "--dtype", "--device",
                   "Example", "moe_layers", "Ctrl-C"):
        assert needle in text


def test_meta_is_json_serialisable(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.npz"
    assert trace_cli(tiny_dirs["gpt_oss"], corpus, out, "--max-tokens", "40", "--dtype", "bfloat16") == 0
    t = load_trace(out)
    assert t.meta["dtype"] == "bfloat16" and t.meta["model_type"] == "gpt_oss"


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_trace_records_the_models_hidden_size(family: str, corpus: Path, tmp_path: Path) -> None:
    """meta hidden_size, from the model's config: what a cost model's hidden_size is checked against."""
    model = build_tiny_model(family, tmp_path / family, hidden_size=48)  # not the tiny models' 32
    assert trace_cli(model, corpus, tmp_path / "t.npz", "--max-tokens", "20") == 0
    assert load_trace(tmp_path / "t.npz").meta["hidden_size"] == 48
    assert json.loads((model / "config.json").read_text())["hidden_size"] == 48


def test_dtype_takes_evals_spelling_too(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    """Before: trace took float32|bfloat16|float16 only, eval bf16|fp16|fp32 only."""
    out = tmp_path / "t.npz"
    for given, stored in (("bf16", "bfloat16"), ("fp32", "float32")):
        assert trace_cli(tiny_dirs["mixtral"], corpus, out, "--max-tokens", "20", "--dtype", given) == 0
        assert load_trace(out).meta["dtype"] == stored


def router_sha256(ckpt: Path, dtype: torch.dtype | None = None) -> str:
    """The routing fingerprint re-derived from the checkpoint's safetensors file: its router tensors
    (`mlp.gate.*` / `mlp.router.*`) in decoder-layer order then by name, each as "NAME DTYPE SHAPE\n"
    and its bytes (cast to `dtype` first, as `--dtype` loads them), sha256, first 16 hex digits."""
    found = sorted((int(m[1]), m[2], t) for key, t in load_file(ckpt / "model.safetensors").items()
                   if (m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(?:gate|router)\.(\w+)", key)))
    assert found, "no router tensors in the checkpoint"
    h = hashlib.sha256()
    for _, name, t in found:
        t = t.to(dtype) if dtype is not None else t
        h.update(f"{name} {str(t.dtype).removeprefix('torch.')} {list(t.shape)}\n".encode())
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes())  # numpy has no bf16
    return h.hexdigest()[:16]


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss"])  # weight; + correction bias; + router bias
def test_trace_records_the_router_weights_fingerprint(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path,
                                                      family: str) -> None:
    out = tmp_path / "t.npz"
    assert trace_cli(tiny_dirs[family], corpus, out, "--max-tokens", "20") == 0
    recorded = load_trace(out).meta["router_sha256"]
    assert re.fullmatch(r"[0-9a-f]{16}", recorded) and recorded == router_sha256(tiny_dirs[family])


def test_router_fingerprint_covers_the_dtype_loaded_and_not_the_path(tiny_dirs: dict[str, Path], corpus: Path,
                                                                     tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_dirs["olmoe"], tmp_path / "elsewhere")
    runs = {"fp32": (tiny_dirs["olmoe"], ()), "copy": (copy, ("--seq-len", "8")), "bf16": (copy, ("--dtype", "bf16"))}
    found = {}
    for label, (model, extra) in runs.items():
        assert trace_cli(model, corpus, tmp_path / f"{label}.npz", "--max-tokens", "20", *extra) == 0
        found[label] = load_trace(tmp_path / f"{label}.npz").meta["router_sha256"]
    assert found["copy"] == found["fp32"] == router_sha256(tiny_dirs["olmoe"])  # the same weights: the same hash
    assert found["bf16"] == router_sha256(copy, torch.bfloat16) != found["fp32"]


# ---- the committed trained checkpoint -------------------------------------------------------------

def test_trained_checkpoint_has_learned_affinity(tmp_path: Path) -> None:
    ckpt, text = ROOT / "checkpoints" / "tiny-moe", SHARED_DATA / "text" / "wikipedia_texts.txt"
    assert ckpt.is_dir(), f"{ckpt}: the committed trained checkpoint is missing"
    if not text.is_file():
        pytest.skip("../shared/data/text absent")
    assert transformers.AutoTokenizer.from_pretrained(ckpt)("hello world")["input_ids"]
    out = tmp_path / "t.npz"
    assert trace_cli(ckpt, text, out, "--max-tokens", "3000", "--seq-len", "128", "--dtype", "float32") == 0
    t = load_trace(out)
    assert (t.num_experts, t.top_k, t.num_layers) == (16, 2, 4)
    for pair in affinity(t, num_shuffles=4)["modes"]["top1"]["per_pair"]:
        assert pair["mi"] > 3 * pair["mi_baseline"], pair


# ---- trace tour fixes ------------------------------------------------------------------------------

def test_output_inside_the_model_or_tokenizer_directory_is_refused(tiny_dirs: dict[str, Path], corpus: Path,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `-o CKPT/model.safetensors` ran and replaced the checkpoint's weights with a trace."""
    victim = tmp_path / "victim"
    shutil.copytree(tiny_dirs["mixtral"], victim)
    tok = tmp_path / "tok"
    byte_tokenizer().save_pretrained(tok)
    before = {p: p.read_bytes() for d in (victim, tok) for p in d.iterdir()}
    os.link(victim / "config.json", tmp_path / "hard.npz")  # the checkpoint's file under another name
    (tmp_path / "link.npz").symlink_to(victim / "model.safetensors")
    cases = [
        (victim / "sub" / "new.npz", [], "--model"),  # a new file: it would become part of the checkpoint
        (tmp_path / "hard.npz", [], "--model"),
        (tmp_path / "link.npz", [], "--model"),
        (tok / "new.npz", ["--tokenizer", str(tok)], "--tokenizer"),
    ]
    for out, extra, name in cases:
        assert trace_cli(victim, corpus, out, *extra) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"moeplace: error: -o {out}: is inside the {name} directory"), err
    for out in (victim / "model.safetensors", victim / "config.json", tok / "tokenizer.json"):
        assert trace_cli(victim, corpus, out) == 2, out  # refused sooner: not an .npz name
        assert "name it .npz" in capsys.readouterr().err
    assert {p: p.read_bytes() for d in (victim, tok) for p in d.iterdir()} == before
    assert trace_cli(victim, corpus, tmp_path / "t.npz", "--tokenizer", str(tok), "--max-tokens", "20") == 0


def test_a_long_line_reaches_the_tokenizer_in_bounded_pieces(tmp_path: Path) -> None:
    """Before: a one-line file went to the tokenizer whole (20 MB: 5.6 GB, 45 s, deaf to Ctrl-C)."""
    words = np.random.default_rng(0).choice(["expert", "token", "a", "b\tc", "layer  "], 400_000)
    line = " ".join(words)  # ~2.4M characters, no newline
    nospace = "x" * (5 * 65536 + 5)  # no whitespace at all: hard cuts
    (tmp_path / "one.txt").write_text(line)
    (tmp_path / "two.txt").write_text(nospace + " tail\n" + line[:1000])
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": line}) + "\n")
    for name, text in (("one.txt", line), ("two.txt", nospace + " tail\n" + line[:1000]), ("doc.jsonl", line)):
        pieces: list[str] = []
        tok = lambda s: pieces.append(s) or [ord(c) for c in s]  # noqa: E731
        assert sum(len(w) for w in iter_windows([tmp_path / name], tok, 512)) == len(text)
        assert "".join(pieces) == text and len(pieces) > 1, name
        assert max(map(len, pieces)) <= (256 + 64) * 1024, name  # a block, plus at most one piece
        assert all(p[0].isspace() for p in pieces[1:] if name != "two.txt"), name  # cut before whitespace
    pieces = []
    tok = lambda s: pieces.append(s) or [ord(c) for c in s]  # noqa: E731
    assert sum(len(w) for w in iter_windows([tmp_path / "one.txt"], tok, 64, max_tokens=1000)) == 1000
    assert len(pieces) == 1  # --max-tokens stops after the first bounded piece


def test_lines_below_the_cut_are_tokenised_as_before(tmp_path: Path) -> None:
    """Files of ordinary lines: the tokenizer sees the blocks of whole lines it always saw."""
    rng = np.random.default_rng(1)
    lines = [" ".join(rng.choice(["moe", "expert", "é", "\t"], int(n))) + "\n" for n in rng.integers(0, 5000, 400)]
    f = tmp_path / "lines.txt"
    f.write_text("".join(lines))
    old, block = [], ""  # the blocks before the change: whole lines, flushed at >= 256K characters
    for ln in lines:
        block += ln
        if len(block) >= text_mod._BLOCK_CHARS:
            old.append(block)
            block = ""
    old.append(block)
    pieces: list[str] = []
    list(iter_windows([f], lambda s: pieces.append(s) or [1] * len(s), 512))
    assert pieces == old and len(old) > 2


def test_long_lines_keep_the_tokens_of_a_byte_level_bpe(tmp_path: Path) -> None:
    ckpt = ROOT / "checkpoints" / "tiny-moe"
    assert (ckpt / "tokenizer.json").is_file(), f"{ckpt}: the committed trained checkpoint is missing"
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt)
    words = np.random.default_rng(2).choice(["Experts", "fire", "together,", "placed", "  apart.", "don't"], 150_000)
    line = " ".join(words)
    f = tmp_path / "long.txt"
    f.write_text(line)
    tok = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    got = np.concatenate(list(iter_windows([f], tok, 4096)))
    assert got.tolist() == tok(line)  # cut before whitespace: a byte-level BPE word never spans a cut


def test_bad_data_fails_before_the_model_loads_naming_the_line(tiny_dirs: dict[str, Path], corpus: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Before: a bad last line failed after the whole run (120 s on a 7521-line file), writing
    nothing, and a bad UTF-8 byte was placed at "position 260" of a 256 KB block."""
    import moeplace.trace.cli as trace_cli_mod

    loads: list[str] = []
    real_load = trace_cli_mod._load_model
    monkeypatch.setattr(trace_cli_mod, "_load_model", lambda *a: loads.append(a[0]) or real_load(*a))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "fine"}\n' * 5000 + '{"title": "no text"}\n')
    big = tmp_path / "big.txt"
    big.write_bytes(("x" * 99 + "\n").encode() * 3000 + "é\n".encode() + b"ok \xff end\n")
    truncated = tmp_path / "trunc.txt"
    truncated.write_bytes(b"line one\n\xe2\x82")
    cases = [
        (jsonl, f"{jsonl}:5001: expected an object with a string 'text' field"),
        (big, f"{big}:3002: not UTF-8 text (byte 0xff at offset 300006: invalid start byte)"),
        (truncated, f"{truncated}:2: not UTF-8 text (byte 0xe2 at offset 9: unexpected end of data)"),
    ]
    for bad, message in cases:
        out = tmp_path / "t.npz"
        assert trace_cli(tiny_dirs["mixtral"], corpus, out, "--data", str(bad), "--max-tokens", "50") == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"moeplace: error: {message}"]
        assert loads == [] and not out.exists()


def test_a_mistyped_local_path_is_no_hub_id(tmp_path: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `--model models/mixtrl` waited for the hub probe, then blamed an unreachable hub."""
    import moeplace.trace.cli as trace_cli_mod

    def no_probe(*args: object) -> bool:
        raise AssertionError("the hub was probed for a local path")

    monkeypatch.setattr(trace_cli_mod, "_hub_reachable", no_probe)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "mixtral").mkdir(parents=True)
    for ref, message in (("models/mixtrl", "model 'models/mixtrl': no such directory; did you mean 'models/mixtral'?"),
                         ("./models/zzz", "model './models/zzz': no such directory"),
                         (str(corpus), f"model {str(corpus)!r}: not a directory")):
        assert run(["trace", "--model", ref, "--data", str(corpus), "-o", "t.npz"]) == 2  # ref as typed
        assert capsys.readouterr().err.strip().splitlines() == [f"moeplace: error: {message}"]
    monkeypatch.setattr(trace_cli_mod, "_hub_reachable", lambda *a: False)  # ORG/NAME, no local ORG: a hub id
    assert trace_cli(Path("some-org/some-moe"), corpus, tmp_path / "t.npz") == 2
    assert "the hub is unreachable" in capsys.readouterr().err


def test_a_given_tokenizer_directory_says_what_it_lacks(tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "emptydir"
    empty.mkdir()
    assert trace_cli(tiny_dirs["mixtral"], corpus, tmp_path / "t.npz", "--tokenizer", str(empty)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moeplace: error: cannot load a tokenizer from {str(empty)!r}: it holds none of tokenizer.json, "
                   "tokenizer_config.json, tokenizer.model, vocab.json, vocab.txt; it is not a tokenizer directory"]


def test_threads_past_the_cpus_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: --threads 100000 went to torch.set_num_threads and crashed its OpenMP pool (SIGSEGV)."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    too_many = available_cpus() + 1
    assert run(["trace", "--model", str(tmp_path / "no-model"), "--data", str(corpus), "--threads", str(too_many),
                "-o", str(tmp_path / "t.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moeplace: error: --threads {too_many}: this process may use {available_cpus()} CPUs", err
    assert not (tmp_path / "t.npz").exists()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_broken_config_json_is_named_before_the_tokenizer_loads(
        tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path, family: str,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: invalid JSON failed in the tokenizer load, which took the blame ("pass --tokenizer");
    no model_type or an unknown one said "Unrecognized model" or printed transformers' warning
    above the error; a field of the wrong type crashed as an internal error (exit code 3)."""
    import moeplace.trace.cli as trace_cli_mod

    tokenizer_loads: list[str] = []
    monkeypatch.setattr(trace_cli_mod, "_load_tokenizer", lambda *a, **k: tokenizer_loads.append(a[0]))
    good = json.loads((tiny_dirs[family] / "config.json").read_text())
    version = transformers.__version__
    cases: list[tuple[str | None, str]] = [
        (json.dumps(good).replace('"model_type":', '"model_type"', 1),
         "config.json: not valid JSON (Expecting ':' delimiter: line 1 column"),
        (json.dumps({k: v for k, v in good.items() if k != "model_type"}),
         "config.json has no model_type (the transformers model family, e.g. 'mixtral')"),
        (json.dumps(good | {"model_type": "foo"}),
         f"config.json: model_type 'foo' is no model family transformers {version} knows (a newer transformers may know it)"),
        (json.dumps(good | {"model_type": family[:-1]}),
         f"config.json: model_type {family[:-1]!r} is no model family transformers {version} knows; did you mean {family!r}?"),
        (json.dumps(good | {"model_type": 3}), "config.json: model_type 3 is not a string naming a model family"),
        (json.dumps([good]), "config.json: not a JSON object"),
        (json.dumps(good | {"hidden_size": "wide"}), "config.json: transformers cannot build a config from it ("),
        # transformers checks no sign: -4 was torch's "negative dimension", config.json unnamed
        (json.dumps(good | {"hidden_size": -4}), "config.json: hidden_size must be >= 1, got -4"),
        (json.dumps(good | {"num_experts_per_tok": 0}), "config.json: num_experts_per_tok must be >= 1, got 0"),
        (None, "config.json: no such file (a save_pretrained model directory holds one)"),
    ]
    for n, (text, message) in enumerate(cases):
        broken = tmp_path / f"broken{n}"
        shutil.copytree(tiny_dirs[family], broken)
        if text is None:
            (broken / "config.json").unlink()
        else:
            (broken / "config.json").write_text(text)
        assert trace_cli(broken, corpus, tmp_path / "t.npz", "--max-tokens", "50") == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"moeplace: error: {broken}") and message in err[0], (message, err)
        assert tokenizer_loads == []


class _CurrentStderr:
    """Writes to whatever sys.stderr is at the time (capsys's during a test)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture
def hf_log_to_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers' log handler keeps the stderr of import time (pytest's own capture): point it at
    the current one, which capsys reads, as a real run's handler writes to the process's stderr."""
    from transformers.utils import logging as hf_logging

    for handler in hf_logging.get_logger().handlers:
        if isinstance(handler, logging.StreamHandler):
            monkeypatch.setattr(handler, "stream", _CurrentStderr())


def _loud_tokenizer_load(monkeypatch: pytest.MonkeyPatch, fail: bool) -> None:
    """AutoTokenizer.from_pretrained that first logs and warns, as transformers does when it falls
    back to another tokenizer reader, then fails (or loads)."""
    from transformers.utils import logging as hf_logging

    real = transformers.AutoTokenizer.from_pretrained

    def loud(*args: object, **kwargs: object) -> object:
        hf_logging.get_logger("transformers.tokenization_utils").warning("falling back to another reader")
        warnings.warn("a deprecated tokenizer option", FutureWarning, stacklevel=2)
        if fail:
            raise OSError("no tokenizer here")
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", loud)


def test_a_failed_load_prints_its_one_line_and_no_warning_above(
        tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path, hf_log_to_stderr: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], recwarn: pytest.WarningsRecorder) -> None:
    """Before: transformers' warnings of the failed load (a SentencePiece fallback of a bad
    tokenizer.model, a rope_scaling it cannot validate) printed above moeplace's error line."""
    odd = tmp_path / "odd-rope"
    shutil.copytree(tiny_dirs["mixtral"], odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(cfg | {"rope_scaling": {"type": "weird"}}))
    assert trace_cli(odd, corpus, tmp_path / "t.npz", "--max-tokens", "50") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moeplace: error: cannot load model {str(odd)!r}"), err
    assert err[0].endswith(": KeyError: 'weird'"), err  # the bare key 'weird' said nothing of what failed
    _loud_tokenizer_load(monkeypatch, fail=True)
    assert trace_cli(tiny_dirs["mixtral"], corpus, tmp_path / "t.npz", "--max-tokens", "50") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moeplace: error: cannot load a tokenizer from {str(tiny_dirs['mixtral'])!r} (no tokenizer here); "
                   "pass --tokenizer PATH"]
    # Python warnings go to pytest's recorder here (stderr in a real run): none was let through
    assert [str(w.message) for w in recwarn if "tokenizer" in str(w.message)] == []


def test_warnings_of_a_load_that_succeeds_are_still_shown(
        tiny_dirs: dict[str, Path], corpus: Path, tmp_path: Path, hf_log_to_stderr: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _loud_tokenizer_load(monkeypatch, fail=False)
    with pytest.warns(FutureWarning, match="a deprecated tokenizer option"):
        assert trace_cli(tiny_dirs["mixtral"], corpus, tmp_path / "t.npz", "--max-tokens", "50") == 0
    assert "falling back to another reader" in capsys.readouterr().err


CUSTOM_CONFIG = "from transformers import MixtralConfig\n\nclass CustomConfig(MixtralConfig):\n    model_type = 'moeplace_custom'\n"
CUSTOM_MODEL = ("from transformers import MixtralForCausalLM\nfrom .configuration_custom import CustomConfig\n\n"
                "class CustomForCausalLM(MixtralForCausalLM):\n    config_class = CustomConfig\n")


def custom_code_model(base: Path, out: Path) -> Path:
    """A checkpoint whose family only its own Python files define (config.json auto_map), as many
    hub MoE models are: a Mixtral under another model_type, with the tiny Mixtral's weights."""
    import importlib.util

    out.mkdir()
    (out / "configuration_custom.py").write_text(CUSTOM_CONFIG)
    (out / "modeling_custom.py").write_text(CUSTOM_MODEL)
    (out / "__init__.py").write_text("")
    spec = importlib.util.spec_from_file_location("custom_pkg", out / "__init__.py", submodule_search_locations=[str(out)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules["custom_pkg"] = package
    try:
        spec.loader.exec_module(package)
        from custom_pkg.configuration_custom import CustomConfig  # type: ignore[import-not-found]
        from custom_pkg.modeling_custom import CustomForCausalLM  # type: ignore[import-not-found]

        mixtral = transformers.AutoModelForCausalLM.from_pretrained(base)
        fields = {k: v for k, v in mixtral.config.to_dict().items()
                  if k not in ("model_type", "architectures", "transformers_version")}
        model = CustomForCausalLM(CustomConfig(**fields))
        model.load_state_dict(mixtral.state_dict(), strict=True)
        model.save_pretrained(out)
    finally:
        for name in [n for n in sys.modules if n.startswith("custom_pkg")]:
            del sys.modules[name]
    (out / "__init__.py").unlink()
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, out / name)
    return out


def test_custom_code_models_run_only_with_trust_remote_code(tiny_dirs: dict[str, Path], corpus: Path,
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: transformers asked "Do you wish to run the custom code? [y/N]" on the terminal (twice),
    and there was no option to say yes without a terminal."""
    model = custom_code_model(tiny_dirs["mixtral"], tmp_path / "custom")
    capsys.readouterr()  # save_pretrained's progress
    assert trace_cli(model, corpus, tmp_path / "t.npz") == 2
    assert capsys.readouterr().err.strip() == (
        f"moeplace: error: {model}/config.json: model_type 'moeplace_custom' is defined by Python code in {model} "
        f"(auto_map), not by transformers {transformers.__version__}: pass --trust-remote-code to run that code "
        "(only for a checkpoint you trust)")
    assert not (tmp_path / "t.npz").exists()
    # with the flag it runs, in a process of its own: transformers copies the code into a module cache
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    done = subprocess.run([sys.executable, "-m", "moeplace", "trace", "--model", str(model), "--data", str(corpus),
                           "-o", str(tmp_path / "t.npz"), "-q", "--trust-remote-code"],
                          env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    t = load_trace(tmp_path / "t.npz")
    assert t.meta["model_type"] == "moeplace_custom" and t.num_experts == 8 and t.top_k == 2
    # the same routing as the tiny Mixtral whose weights it holds
    assert trace_cli(tiny_dirs["mixtral"], corpus, tmp_path / "ref.npz") == 0
    np.testing.assert_array_equal(t.topk_ids, load_trace(tmp_path / "ref.npz").topk_ids)
