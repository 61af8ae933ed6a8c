"""Defects found by the audit of `moeplace trace`, `import`, `export` and `permute-checkpoint`:
each test fails without its fix."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moeplace.cli import run
from moeplace.errors import MoeplaceError, TraceError
from moeplace.export.permute import check_group_routing
from moeplace.models.checkpoint import CheckpointError
from moeplace.models.tiny import build_tiny_model, byte_tokenizer
from moeplace.placement import Placement, load_placement
from moeplace.trace.format import load_trace
from moeplace.trace.importers import import_sglang
from moeplace.trace.text import skip_windows


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("mixtral", tmp_path_factory.mktemp("tiny") / "mixtral")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """Documents of different lengths: a batch of their windows is padded."""
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": "routing " * n}) for n in (1, 3, 2, 5)) + "\n")
    return f


def trace(model: Path, data: Path, out: Path, *extra: str) -> int:
    return run(["trace", "--model", str(model), "--data", str(data), "-o", str(out), "-q", "--seq-len", "16",
                "--batch-size", "4", *extra])


def one_error_line(err: str) -> str:
    line = err.strip()
    assert line.startswith("moeplace: error: ") and "\n" not in line and "Traceback" not in line, err
    return line


def test_trace_pads_with_an_id_the_model_has(mixtral: Path, data: Path, tmp_path: Path) -> None:
    """A tokenizer whose added pad token lies past the model's vocabulary (id 256 of 256) padded
    batches with it: IndexError in the embedding, an internal error. Padded positions are dropped
    and unseen by real tokens, so the routing is the model's own tokenizer's, bit for bit."""
    tokenizer = byte_tokenizer()
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.pad_token_id == 256
    tokenizer.save_pretrained(tmp_path / "tok")
    assert trace(mixtral, data, tmp_path / "own.npz") == 0
    assert trace(mixtral, data, tmp_path / "pad.npz", "--tokenizer", str(tmp_path / "tok")) == 0
    own, pad = load_trace(tmp_path / "own.npz"), load_trace(tmp_path / "pad.npz")
    assert own.num_tokens == pad.num_tokens == 8 * (1 + 3 + 2 + 5)
    assert np.array_equal(own.topk_ids, pad.topk_ids) and own.topk_weights.tobytes() == pad.topk_weights.tobytes()


class _Unsafe:
    """Unpickled, it would create the directory `path`: the proof that the file was not unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.makedirs, (str(self.path),)


def test_trace_reads_bin_weights_as_tensors_only(mixtral: Path, data: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A pickled (.bin) checkpoint is read by transformers with weights_only=True. One that needs
    arbitrary objects is refused naming the object, and a damaged one gets transformers' reason:
    both used to be 'no .safetensors weights (found pickled weights, which moeplace never loads)',
    untrue for trace, which has just read the plain .bin."""
    state = load_file(mixtral / "model.safetensors")

    def bin_model(name: str, weights: dict[str, object]) -> Path:
        d = tmp_path / name
        shutil.copytree(mixtral, d)
        (d / "model.safetensors").unlink()
        torch.save(weights, d / "pytorch_model.bin")
        return d

    assert trace(bin_model("plain", state), data, tmp_path / "plain.npz") == 0
    assert trace(mixtral, data, tmp_path / "own.npz") == 0
    assert np.array_equal(load_trace(tmp_path / "plain.npz").topk_ids, load_trace(tmp_path / "own.npz").topk_ids)
    capsys.readouterr()

    marker = tmp_path / "unpickled"
    assert trace(bin_model("unsafe", {**state, "x": _Unsafe(marker)}), data, tmp_path / "u.npz") == 2
    err = one_error_line(capsys.readouterr().err)
    assert "refused: its pickled weights need unpickling of arbitrary Python objects (it holds " in err
    assert "makedirs" in err and not marker.exists() and not (tmp_path / "u.npz").exists()

    cut = bin_model("cut", state)
    raw = (cut / "pytorch_model.bin").read_bytes()
    (cut / "pytorch_model.bin").write_bytes(raw[: len(raw) // 2])
    assert trace(cut, data, tmp_path / "c.npz") == 2
    err = one_error_line(capsys.readouterr().err)
    assert err.startswith("moeplace: error: cannot load model ") and "never loads" not in err


def _sglang_dump(path: Path, **record: object) -> Path:
    ids = torch.full((2, 3, 8), -1, dtype=torch.int32)
    ids[:, :, 0], ids[:, :, 1] = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])
    rec = {"forward_pass_id": 0, "rank": 0, "input_ids": torch.arange(3), "positions": torch.arange(3),
           "topk_ids_of_layer": ids, **record}
    torch.save({"records": [rec], "last_physical_to_logical_map": torch.arange(4).repeat(2, 1)}, path)
    return path


def test_sglang_forward_pass_and_rank_must_be_integers(tmp_path: Path) -> None:
    """A forward_pass_id of several values was an internal error (bool of a tensor), a float rank
    was truncated without a word; SGLang writes Python ints (a 0-d integer tensor is taken too)."""
    for ok in (3, torch.tensor(3)):
        trace_ = import_sglang([_sglang_dump(tmp_path / "ok.pt", forward_pass_id=ok, rank=ok)])
        assert trace_.num_tokens == 3
    for key, bad, shown in (("forward_pass_id", torch.tensor([1, 2]), "a tensor of shape [2] dtype torch.int64"),
                            ("rank", torch.tensor(1.5), "a tensor of shape [] dtype torch.float32"),
                            ("rank", 1.5, "1.5"), ("forward_pass_id", True, "True")):
        with pytest.raises(TraceError, match=re.escape(f"record 0: {key} must be an integer, got {shown}")):
            import_sglang([_sglang_dump(tmp_path / "bad.pt", **{key: bad})])


def test_group_counts_must_be_integers() -> None:
    """n_group / topk_group were cast with int(): "x" or [4] an internal error, 4.5 checked as
    groups of another size."""
    mixing = np.array([[0, 2, 1, 3, 4, 6, 5, 7]])
    for value in ("x", [4], 4.5, True):
        with pytest.raises(CheckpointError,
                           match=f"^{re.escape(f'ckpt/config.json: n_group must be an integer, got {json.dumps(value)}')}$"):
            check_group_routing({"n_group": value, "topk_group": 2}, mixing, "ckpt/config.json")
    with pytest.raises(CheckpointError, match="topk_group must be an integer"):
        check_group_routing({"n_group": 4, "topk_group": "2"}, mixing)
    check_group_routing({"n_group": None, "topk_group": 0}, mixing)  # absent or 0: no groups, as before


def test_permute_checkpoint_needs_config_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without config.json the family and group checks found nothing to check: a renumbering that
    mixes DeepSeek-V3's routing groups was written, and routed otherwise once the config was back."""
    ds = build_tiny_model("deepseek_v3", tmp_path / "ds")
    mixing = Placement(expert_to_gpu=np.tile(np.arange(8) % 4, (3, 1)), num_gpus=4, gpus_per_node=4)
    mixing.save(tmp_path / "p.json")
    args = ["permute-checkpoint", str(ds), str(tmp_path / "p.json"), "-q", "-o"]
    assert run([*args, str(tmp_path / "with")]) == 2
    assert "n_group=4, topk_group=2" in one_error_line(capsys.readouterr().err)
    (ds / "config.json").unlink()
    assert run([*args, str(tmp_path / "without")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"moeplace: error: {ds}: no config.json: permute-checkpoint reads the model family and its group-limited "
        "routing (n_group, topk_group) there, to refuse a renumbering that would change routing, and copies it "
        "beside the renumbered weights; give the save_pretrained directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "p.json"]


def test_resume_refuses_stray_sequence_ids_before_sizing_by_them() -> None:
    """bincount of a partial trace's sequence ids sized its table by the largest: one stray id of
    2**62 was a ValueError (internal error), 10**12 an 'out of memory' blamed on the input."""
    for seq in ([0, 0, 2**62], [0, 0, 2], [1, 1, 2], [0, 1, 0]):
        with pytest.raises(MoeplaceError, match="its sequences are not windows numbered from 0 in order"):
            skip_windows(iter([]), np.arange(3), np.array(seq), np.array([0, 1, 0]), "--resume p.npz")


def test_counts_of_one_are_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """'1 redundant experts' in export's lines."""
    p = Placement(expert_to_gpu=np.array([[0, 0, 0, 1, 1, 2, 2, 2]]), num_gpus=3, gpus_per_node=3,
                  replicas=[[(0, 1)]])
    p.save(tmp_path / "p.json")
    assert run(["export", str(tmp_path / "p.json"), "--to", "eplb", "-o", str(tmp_path / "e.json")]) == 0
    assert capsys.readouterr().out.strip().endswith("EP size 3, 1 redundant expert")
    assert run(["export", str(tmp_path / "e.json"), "--from", "eplb", "-o", str(tmp_path / "back.json")]) == 0
    assert ", 1 redundant expert per layer (extra copies" in capsys.readouterr().out


def test_vllm_state_is_not_written_under_an_npz_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--to vllm wrote JSON into `-o x.npz`, which --from vllm then read as a numpy archive and
    refused ('not an .npz file'): a round trip that could not come back. Refused before writing."""
    p = Placement(expert_to_gpu=np.array([[0, 0, 1, 1]]), num_gpus=2, gpus_per_node=2)
    p.save(tmp_path / "p.json")
    assert run(["export", str(tmp_path / "p.json"), "--to", "vllm", "-o", str(tmp_path / "v.npz")]) == 2
    assert "--to vllm writes JSON, and an .npz name is read back" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "v.npz").exists()
    assert run(["export", str(tmp_path / "p.json"), "--to", "vllm", "-o", str(tmp_path / "v.json")]) == 0
    assert run(["export", str(tmp_path / "v.json"), "--from", "vllm", "-o", str(tmp_path / "back.json")]) == 0
    assert np.array_equal(load_placement(tmp_path / "back.json").expert_to_gpu, p.expert_to_gpu)
