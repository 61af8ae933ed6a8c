"""Defects found by the audit of `moeplace check`, `export` and `permute-checkpoint`: a YAML alias
bomb in a check's error line, safetensors headers whose byte ranges overlap, an expert missing one
tensor, a pickled .pt map's advice, and the permute summary's counts."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from moeplace.errors import MoeplaceError
from moeplace.eval.check import read_checks
from moeplace.models.checkpoint import CheckpointError, moe_blocks, open_checkpoint, read_safetensors_header
from moeplace.placement import Placement

from conftest import ROOT
from test_audit_round31 import one_error_line


def alias_bomb(levels: int) -> str:
    """A YAML flow list of `levels` anchors, each nine aliases of the one before: a few hundred
    bytes whose last element expands to 9**levels strings."""
    parts, prev = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"], "l0"
    for n in range(1, levels):
        parts.append(f"&l{n} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = f"l{n}"
    return "[" + ", ".join(parts) + "]"


@pytest.mark.parametrize("key", ["name", "placement", "max_cross_gpu"])
def test_a_yaml_alias_bomb_in_a_check_is_a_short_line(key: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the check's label and its errors printed the whole value (str / repr): 6 levels made
    a 3.7 MB 'one line', 8 levels 27 s and gigabytes (MemoryError traceback under a memory limit).
    Lists and mappings are now shown cut short as they are built (reprlib)."""
    check = {"name": "n", "placement": "p.json", "trace": "t.npz", "max_cross_gpu": "0.5"}
    check[key] = alias_bomb(6)
    config = tmp_path / "c.yaml"
    config.write_text("checks:\n  - " + "\n    ".join(f"{k}: {v}" for k, v in check.items()) + "\n")
    with pytest.raises(MoeplaceError) as e:
        read_checks(config)
    assert len(str(e.value)) < 400 and "[['lol', 'lol', 'lol', ...]" in str(e.value), str(e.value)[:400]
    assert len(one_error_line(capsys, ["check", str(config)])) < 400


def safetensors_file(path: Path, header: dict[str, dict[str, object]], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize("offsets,size,message", [
    ([(0, 16), (0, 16)], 32, "corrupt header: tensor b starts at byte 0 of the data, not 16 where the tensor "
                             "before it ends (it overlaps that one)"),
    ([(0, 16), (32, 48)], 48, "corrupt header: tensor b starts at byte 32 of the data, not 16 where the tensor "
                              "before it ends (a gap between them)"),
    ([(0, 16), (16, 32)], 40, "corrupt: 8 bytes after the last tensor's data"),
])
def test_a_header_whose_byte_ranges_do_not_tile_the_data_is_refused(
        offsets: list[tuple[int, int]], size: int, message: str, tmp_path: Path) -> None:
    """Before: only ranges past the end were refused, so a header pointing two tensors at one range
    was renumbered into a checkpoint that loads (the output lays the bytes out anew) with the second
    tensor silently a copy of the first; the safetensors library refuses such an input."""
    header = {name: {"dtype": "F32", "shape": [4], "data_offsets": list(r)} for name, r in zip("ab", offsets)}
    path = safetensors_file(tmp_path / "m.safetensors", header, bytes(size))
    with pytest.raises(CheckpointError) as e:
        read_safetensors_header(path)
    assert str(e.value) == f"{path}: {message}"
    ok = safetensors_file(tmp_path / "ok.safetensors", header | {"b": {**header["b"], "data_offsets": [16, 32]}},
                          bytes(32))
    entries, _ = read_safetensors_header(ok)  # the same tensors, tiling the data: read
    assert entries["b"].begin == entries["a"].end == entries["a"].begin + 16 == ok.stat().st_size - 16


def moe_checkpoint(root: Path, num_experts: int = 4, drop: tuple[str, ...] = ()) -> Path:
    """A one-layer per-expert MoE checkpoint (w1, w2 per expert) with its config, minus `drop`."""
    root.mkdir()
    tensors = {"model.layers.0.mlp.gate.weight": np.zeros((num_experts, 8), np.float32)}
    for e in range(num_experts):
        for w in ("w1", "w2"):
            tensors[f"model.layers.0.mlp.experts.{e}.{w}.weight"] = np.full((2, 8), e, np.float32)
    save_file({k: v for k, v in tensors.items() if k not in drop}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "num_hidden_layers": 1,
                                                  "num_experts": num_experts}))
    return root


def test_an_expert_missing_one_tensor_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the expert ids were checked, not each expert's tensors, so an expert without its w1
    (a checkpoint transformers refuses to load) was renumbered, the hole moved to another id."""
    model = moe_checkpoint(tmp_path / "m", drop=("model.layers.0.mlp.experts.2.w1.weight",))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.experts\.2 has no w1\.weight tensor"):
        moe_blocks(open_checkpoint(model))
    placement = tmp_path / "p.json"
    Placement(expert_to_gpu=np.array([[1, 0, 1, 0]]), num_gpus=2, gpus_per_node=2).save(placement)
    err = one_error_line(capsys, ["permute-checkpoint", str(model), str(placement), "-q", "-o", str(tmp_path / "o")])
    assert err == (f"{model}: model.layers.0.mlp.experts.2 has no w1.weight tensor, which other experts of the layer "
                   "have: a missing or truncated shard?")
    assert not (tmp_path / "o").exists()
    whole = moe_checkpoint(tmp_path / "w", drop=tuple(f"model.layers.0.mlp.experts.1.{w}.weight" for w in ("w1", "w2")))
    with pytest.raises(CheckpointError, match=r"router scores 4: no tensors of expert 1$"):
        moe_blocks(open_checkpoint(whole))


def test_the_permute_summary_counts_in_words(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: '1 MoE layers renumbered, 1 experts per GPU'."""
    model = moe_checkpoint(tmp_path / "m", num_experts=2)
    placement = tmp_path / "p.json"
    Placement(expert_to_gpu=np.array([[1, 0]]), num_gpus=2, gpus_per_node=2).save(placement)
    from moeplace.cli import run

    assert run(["permute-checkpoint", str(model), str(placement), "-q", "-o", str(tmp_path / "o")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'o'}: 1 MoE layer renumbered, 1 expert per GPU on "
                                              "2 GPUs: serve with expert parallelism of size 2")


class _Marker:
    """Unpickling this would run os.system: the test fails if the marker file appears."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.path}",)


def test_a_pt_map_that_needs_pickle_is_refused_without_torchs_advice(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Before: the line quoted torch's text, which says to re-run torch.load with weights_only=False
    ('will likely succeed'): advice to execute the file, from a tool that never unpickles."""
    import torch

    marker, path = tmp_path / "ran", tmp_path / "map.pt"
    torch.save({"physical_to_logical_map": torch.tensor([[0, 1]]), "x": _Marker(marker)}, path)
    err = one_error_line(capsys, ["export", "--from", "sglang", str(path), "--gpus", "2", "-o", str(tmp_path / "o.json")])
    assert err.startswith(f"{path}: a weights-only load refuses it (it holds Python objects, or is no torch file); "
                          "moeplace never unpickles") and "weights_only" not in err, err
    assert not marker.exists() and not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("where", ["cluster", "gpu", "model"])
def test_a_cost_config_name_must_be_text(where: str, tmp_path: Path) -> None:
    """Before: a cluster, gpu or model `name` was taken through str() whatever it was: an alias of
    aliases there turned a 1 KB YAML into a 351 MB `eval --json` document. A name that is not text
    is refused in one short line, through brief (options.py), which cuts containers as they are built."""
    from moeplace.solve.costmodel import load_cost_model

    config = tmp_path / "c.yaml"
    text = (ROOT / "configs" / "cluster" / "h100-1x8-nvlink.yaml").read_text()
    model = None if where == "model" else ROOT / "configs" / "model" / "flame-moe-290m.yaml"
    if where == "model":
        text += "model:\n  name: m\n  hidden_size: 1024\n  expert_us_per_token: 0.01\n"
    text, count = re.subn(rf"^{where}:\n  name: [^\n]*\n", f"{where}:\n  name: {alias_bomb(6)}\n", text, flags=re.M)
    assert count == 1
    config.write_text(text)
    with pytest.raises(MoeplaceError, match=rf"{where}: 'name' must be text, got \[\['lol', 'lol', 'lol', \.\.\.\]") \
            as e:
        load_cost_model(config, model)
    assert len(str(e.value)) < 300
    config.write_text(text.replace(f"  name: {alias_bomb(6)}\n", "  name: 2026\n"))
    load_cost_model(config, model)  # a number is a fine name


def test_a_check_without_a_model_section_names_its_key(tmp_path: Path) -> None:
    """In `moeplace check` the missing model is a `model_config:` key to add, not eval's option."""
    from moeplace.solve.costmodel import load_cost_model

    cluster = ROOT / "configs" / "cluster" / "h100-1x8-nvlink.yaml"
    with pytest.raises(MoeplaceError, match=r"no 'model:' section; give a model_config: key \(configs/model"):
        load_cost_model(cluster, None, "cluster", "model_config")
    with pytest.raises(MoeplaceError, match=r"no 'model:' section; give --model-config \(configs/model"):
        load_cost_model(cluster, None, "--cluster", "--model-config")
