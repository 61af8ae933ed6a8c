"""`moeplace import merge`: traces of one model concatenated, sequences kept distinct."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.errors import TraceError
from moeplace.models.tiny import build_tiny_model
from moeplace.trace.format import Trace, file_sha256, load_trace, make_trace, save_trace
from moeplace.trace.merge import merge_traces

ARRAYS = ("topk_ids", "topk_weights", "token_ids", "sequence_ids", "positions")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("olmoe", tmp_path_factory.mktemp("tiny") / "olmoe", initializer_range=0.2)


def trace(model: Path, out: Path, *data: Path) -> None:
    args = ["trace", "--model", str(model), "-o", str(out), "-q", "--seq-len", "16", "--batch-size", "2"]
    assert run([*args, *(a for f in data for a in ("--data", str(f)))]) == 0


def test_merge_equals_the_trace_of_the_concatenated_input(model: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("Experts that fire together are placed together. " * 12)  # 576 tokens: 36 windows, 18 batches
    b.write_text("\n".join(json.dumps({"text": f"Document {i}: routing shifts with the domain."}) for i in range(5)))
    trace(model, tmp_path / "a.npz", a)
    trace(model, tmp_path / "b.npz", b)
    trace(model, tmp_path / "ab.npz", a, b)  # b's windows start a batch here too: the same batches, bit for bit
    capsys.readouterr()
    out = tmp_path / "m.npz"
    assert run(["import", "merge", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {out}: trace of 791 tokens x 4 MoE layers x top-2 over 8 experts, merged from 2 traces (corpus a,b)")
    merged, whole = load_trace(out), load_trace(tmp_path / "ab.npz")
    for key in ARRAYS:
        assert getattr(merged, key).tobytes() == getattr(whole, key).tobytes(), key
    assert merged.sequence_ids is not None and merged.sequence_ids[576] == 36  # b's first window follows a's 36
    meta = merged.meta
    assert meta["source"] == "moeplace import merge" and meta["corpus"] == whole.meta["corpus"] == "a,b"
    fingerprint = whole.meta["router_sha256"]  # one model's: the same in every run
    assert meta["inputs"] == [
        {"file": str(tmp_path / n), "sha256": file_sha256(tmp_path / n), "tokens": t, "source": "moeplace trace",
         "corpus": c, "router_sha256": fingerprint} for n, t, c in (("a.npz", 576, "a"), ("b.npz", 215, "b"))]
    assert meta["data"] == whole.meta["data"]
    for key in ("model", "moe_layers", "hidden_size", "dtype", "seq_len", "num_experts", "top_k", "router_sha256"):
        assert meta[key] == whole.meta[key], key


def synthetic(n: int, k: int = 2, experts: int = 8, seed: int = 0, **meta: object) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(3)]) for _ in range(n)])
    w = -np.sort(-rng.random((n, 3, k)).astype(np.float32), axis=-1)
    return make_trace(ids, w, experts, token_ids=rng.integers(0, 100, n), sequence_ids=np.repeat(np.arange(n // 4), 4),
                      positions=np.tile(np.arange(4), n // 4), meta=dict(meta))


def test_sequence_ids_of_later_inputs_are_offset() -> None:
    a, b, c = synthetic(8), synthetic(12, seed=1), synthetic(4, seed=2)
    b = make_trace(b.topk_ids, b.topk_weights, 8, sequence_ids=np.repeat(np.arange(5, 8), 4))  # ids 5..7, other arrays gone
    merged, dropped = merge_traces([("a", a), ("b", b), ("c", c)])
    assert merged.sequence_ids is not None and merged.sequence_ids.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4
    assert dropped == ["token_ids", "positions"] and merged.token_ids is None and merged.positions is None
    np.testing.assert_array_equal(merged.topk_ids, np.concatenate([a.topk_ids, b.topk_ids, c.topk_ids]))
    np.testing.assert_array_equal(merged.topk_weights, np.concatenate([a.topk_weights, b.topk_weights, c.topk_weights]))


FINGERPRINT = "0123456789abcdef"  # meta router_sha256 of trace a below


@pytest.mark.parametrize("other, expected", [
    (synthetic(8, model="m2", moe_layers=[0, 1, 2]),
     'meta model "m2", but {a} has "m1": only traces of one model (and one expert numbering) merge'),
    (synthetic(8, model="m1", moe_layers=[1, 2, 3]),
     "meta moe_layers [1, 2, 3], but {a} has [0, 1, 2]: only traces of one model"),
    (synthetic(8, k=3, model="m1"), "top-k 3, but {a} has 2: only traces"),
    (synthetic(8, experts=16, model="m1"), "num_experts 16, but {a} has 8: only traces"),
    (synthetic(8, model="m1", moe_layers=[0, 1, 2], dtype="float32", router_sha256="fedcba9876543210"),
     'meta router_sha256 "fedcba9876543210", but {a} has "0123456789abcdef" (other router weights: another '
     "checkpoint, or one replaced at the same path): only traces of one model (and one expert numbering) merge"),
    (synthetic(8, model="m1", moe_layers=[0, 1, 2], dtype="bfloat16", router_sha256="fedcba9876543210"),
     'meta router_sha256 "fedcba9876543210", but {a} has "0123456789abcdef" (traced in "bfloat16", {a} in '
     '"float32"): only traces'),
])
def test_traces_of_another_model_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             other: Trace, expected: str) -> None:
    save_trace(synthetic(8, model="m1", moe_layers=[0, 1, 2], dtype="float32", router_sha256=FINGERPRINT),
               tmp_path / "a.npz")
    save_trace(other, tmp_path / "b.npz")
    out = tmp_path / "m.npz"
    out.write_bytes(b"earlier")
    assert run(["import", "merge", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = expected.format(a=tmp_path / "a.npz")
    assert len(err) == 1 and err[0].startswith(f"moeplace: error: {tmp_path / 'b.npz'}: {expected}"), err
    assert out.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "m.npz"]


def test_fingerprints_are_compared_also_when_the_first_input_has_none() -> None:
    a, b = synthetic(4, model="m1"), synthetic(4, seed=1, model="m1", router_sha256=FINGERPRINT)
    c = synthetic(4, seed=2, model="m1", router_sha256="fedcba9876543210")
    with pytest.raises(TraceError, match=f'^c: meta router_sha256 "fedcba9876543210", but b has "{FINGERPRINT}" '):
        merge_traces([("a", a), ("b", b), ("c", c)])


def test_a_fingerprint_only_some_inputs_record_is_dropped_with_a_warning(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    names = [tmp_path / n for n in ("a.npz", "b.npz", "c.npz")]
    save_trace(synthetic(8, model="m1", router_sha256=FINGERPRINT), names[0])
    save_trace(synthetic(8, seed=1, model="m1"), names[1])  # traced before moeplace recorded it
    save_trace(synthetic(8, seed=2, model="m1", router_sha256=FINGERPRINT), names[2])
    out = tmp_path / "m.npz"
    assert run(["import", "merge", *map(str, names), "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moeplace: warning: router_sha256 dropped from the merged trace: {names[1]} has none (router weights not "
        "compared)"]
    meta = load_trace(out).meta
    assert "router_sha256" not in meta and meta["model"] == "m1"
    assert [i.get("router_sha256") for i in meta["inputs"]] == [FINGERPRINT, None, FINGERPRINT]  # kept per input


def test_an_input_with_an_earlier_inputs_routing_is_refused() -> None:
    """A copy (other meta, other arrays beside topk_ids) two inputs after its original: its tokens
    would count twice. Another input with the same meta but other routing merges."""
    a, b = synthetic(8, model="m1"), synthetic(8, seed=1, model="m1")
    copy = make_trace(a.topk_ids, a.topk_weights, 8, meta={"model": "m1", "corpus": "shard2"})
    with pytest.raises(TraceError, match=r"^c\.npz: the same routing as a\.npz \(every token's experts alike"):
        merge_traces([("a.npz", a), ("b.npz", b), ("c.npz", copy)])
    merged, _ = merge_traces([("a.npz", a), ("b.npz", b)])
    assert merged.num_tokens == 16


def test_meta_recorded_by_one_input_only_is_no_difference() -> None:
    merged, _ = merge_traces([("a", synthetic(4, model="m1", dtype="float32")), ("b", synthetic(4, seed=1))])
    assert "model" not in merged.meta and "dtype" not in merged.meta  # not shared by every input: not claimed
    assert merged.meta["corpus"] == "a,b"


def test_optional_arrays_only_some_inputs_have_are_dropped_and_named(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    full = synthetic(8)
    bare = make_trace(synthetic(4, seed=1).topk_ids, None, 8, sequence_ids=np.zeros(4, dtype=np.int64))
    save_trace(full, tmp_path / "a.npz")
    save_trace(bare, tmp_path / "b.npz")
    out = tmp_path / "m.npz"
    assert run(["import", "merge", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "-o", str(out), "-q"]) == 0
    b = tmp_path / "b.npz"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"moeplace: warning: {key} dropped from the merged trace: {b} has none"
        for key in ("topk_weights", "token_ids", "positions")]
    t = load_trace(out)
    assert t.topk_weights is None and t.token_ids is None and t.positions is None
    assert t.sequence_ids is not None and t.sequence_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]


@pytest.mark.parametrize("args, expected", [
    (["a.npz"], "import merge a.npz: give at least two traces to merge"),
    (["a.npz", "a.npz"], "a.npz: the same file as a.npz: given twice, its contents would be counted twice"),
    (["a.npz", "m.npz"], "-o m.npz: is an input of this run (m.npz); write the output elsewhere"),
])
def test_bad_merge_runs_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    save_trace(synthetic(8), tmp_path / "a.npz")
    save_trace(synthetic(8, seed=1), tmp_path / "m.npz")
    before = (tmp_path / "m.npz").read_bytes()
    assert run(["import", "merge", *args, "-o", "m.npz"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"moeplace: error: {expected}"]
    assert (tmp_path / "m.npz").read_bytes() == before


def test_a_failed_write_leaves_the_output_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    save_trace(synthetic(8), tmp_path / "a.npz")
    save_trace(synthetic(8, seed=1), tmp_path / "b.npz")
    out = tmp_path / "m.npz"
    out.write_bytes(b"earlier")

    def disk_full(*args: object, **kw: object) -> None:
        f = args[0]
        f.write(b"PK half a file")  # type: ignore[attr-defined]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", disk_full)
    assert run(["import", "merge", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "-o", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"moeplace: error: cannot write {out}: No space left on device"]
    assert out.read_bytes() == b"earlier"  # never half-written: the temp file is dropped, not renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "m.npz"]


def test_merge_needs_two_traces() -> None:
    with pytest.raises(TraceError, match="at least two"):
        merge_traces([("a", synthetic(4))])
