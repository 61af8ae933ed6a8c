"""Round-31 leftovers of the audits: trace's -o suffix, export --model without config.json,
analyze's solve options on LOADS --compare TRACE, check_topology's remedies worded by its caller,
and eval's repeated --baseline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.errors import PlacementError
from moeplace.models.tiny import build_tiny_model
from moeplace.placement import Placement, check_topology
from moeplace.trace.format import make_loads, save_loads, save_trace

from test_analyze import planted


def one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one stderr line of a refused run (exit 2), without the 'moeplace: error: ' head."""
    assert run(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeplace: error: "), lines
    return lines[0].removeprefix("moeplace: error: ")


@pytest.mark.parametrize("name", ["x.txt", "trace", "x.npz.json"])
@pytest.mark.parametrize("command", ["trace", "import"])
def test_an_npz_writer_refuses_an_output_name_not_ending_in_npz(name: str, command: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `trace -o x.txt` (and `import csv -o x.txt`) wrote an .npz archive as x.txt, which
    trace's own --resume refused and --data read as text. Refused at the option (options.NPZ_OUTPUT,
    shared by every command that writes a trace or load file), before any input is looked at."""
    data = tmp_path / "d.txt"
    data.write_text("some text")
    out = str(tmp_path / name)
    argv = (["trace", "--model", str(tmp_path / "no-model"), "--data", str(data), "-o", out] if command == "trace"
            else ["import", "csv", str(tmp_path / "no-such.csv"), "-o", out])
    err = one_error_line(capsys, argv)
    assert err.startswith(f"Invalid value for '-o' / '--output': {out!r}: this writes an .npz archive"), err
    assert "name it .npz" in err and "no-model" not in err and "no-such" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.txt"]


def test_trace_output_npz_in_any_case_and_a_fifo_pass_the_option(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """.NPZ is .npz (as --resume reads it); an existing FIFO or device is written through whatever
    its name. Both get past -o to the next check: the missing model."""
    data = tmp_path / "d.txt"
    data.write_text("some text")
    outputs = [tmp_path / "T.NPZ"]
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "out.fifo")
        outputs.append(tmp_path / "out.fifo")
    for out in outputs:
        err = one_error_line(capsys, ["trace", "--model", str(tmp_path / "no-model"), "--data", str(data),
                                      "-o", str(out)])
        assert "no-model" in err and "--output" not in err, err


@pytest.fixture
def deepseek(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny DeepSeek-V3 (decoder layer 0 dense, 1-3 MoE, 8 experts) and a placement of it on 4 GPUs."""
    model = build_tiny_model("deepseek_v3", tmp_path / "ds")
    placement = tmp_path / "p.json"
    Placement(expert_to_gpu=np.tile(np.arange(8) // 2, (3, 1)), num_gpus=4, gpus_per_node=4).save(placement)
    return model, placement


def test_export_model_without_config_json_is_refused_as_permute_refuses_it(
        deepseek: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: export --model DIR without config.json exit 0, the family check passed unseen and the
    SGLang rows ended at the last MoE layer (the depth is num_hidden_layers). permute-checkpoint
    refused such a directory; export now does too, through the same check and words."""
    model, placement = deepseek
    out = tmp_path / "map.json"
    assert run(["export", str(placement), "--to", "sglang", "--model", str(model), "-o", str(out)]) == 0
    assert len(json.loads(out.read_text())["physical_to_logical_map"]) == 4  # config.json's num_hidden_layers
    out.unlink()
    capsys.readouterr()
    (model / "config.json").unlink()
    head = f"{model}: no config.json: "
    tail = "; give the save_pretrained directory"
    for argv in (["export", str(placement), "--to", "sglang"], ["export", str(placement), "--to", "eplb"]):
        err = one_error_line(capsys, [*argv, "--model", str(model), "-o", str(out)])
        assert err == (f"{head}export reads the model family and its decoder layer count (num_hidden_layers) there, "
                       "to check the placement is of this model and to give SGLang a row per decoder layer" + tail)
        assert not out.exists()
    err = one_error_line(capsys, ["permute-checkpoint", str(model), str(placement), "-q", "-o", str(tmp_path / "o")])
    assert err.startswith(f"{head}permute-checkpoint reads the model family") and err.endswith(tail), err


def test_loads_compared_with_a_trace_take_the_solve_options_of_the_traces_halves(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LOADS --compare TRACE solves TRACE's halves: --time-limit, --gpus and --seed reach that
    solve (the audit took --time-limit for refused there); refused only when no input solves."""
    trace, loads = tmp_path / "t.npz", tmp_path / "l.npz"
    save_trace(planted(256, num_experts=8), trace)
    save_loads(make_loads(np.ones((4, 8))), loads)
    out = tmp_path / "o"
    assert run(["analyze", str(loads), "--compare", str(trace), "--time-limit", "1.5", "--gpus", "4", "--seed", "3",
                "--shuffles", "2", "--no-figures", "-q", "-o", str(out)]) == 0
    placement = json.loads((out / "analyze.json").read_text())["traces"]["B"]["halves"]["placement"]
    assert (placement["time_limit"], placement["num_gpus"], placement["seed"]) == (1.5, 4, 3)
    assert placement["solver"]["time_limit_s"] == 1.5
    err = one_error_line(capsys, ["analyze", str(loads), "--time-limit", "1.5", "--no-figures", "-o", str(out)])
    assert err.startswith("--time-limit: not applicable to a load-only input"), err


def test_check_topology_words_the_callers_remedies() -> None:
    """analyze's cluster check was a second copy of check_topology's rules, to word the ways out
    in its own options; check_topology now takes them, and solve's defaults are unchanged."""
    words = {"gpus_named": "--gpus 16", "fewer_gpus": "use fewer", "hint": "use a divisor",
             "per_node_hint": "use a divisor of 16"}
    cases = [
        ((8, 16, 16), "--gpus 16 for 8 experts: some GPU would hold no expert; use fewer",
         ("16 GPUs for 8 experts: some GPU would hold no expert (--objective balance with --redundant-experts adds "
          "copies)")),
        ((24, 16, 16), ("--gpus 16: 24 experts per layer cannot be split equally over 16 GPUs (24 % 16 = 8): use a "
                        "divisor"),
         "24 experts per layer cannot be split equally over 16 GPUs (24 % 16 = 8)"),
        ((8, 16, 3), "--gpus 16 is not a multiple of --gpus-per-node 3; use a divisor of 16",
         "--gpus 16 is not a multiple of --gpus-per-node 3"),
    ]
    for args, worded, default in cases:
        with pytest.raises(PlacementError) as caught:
            check_topology(*args, **words)  # type: ignore[arg-type]
        assert str(caught.value) == worded
        with pytest.raises(PlacementError) as caught:
            check_topology(*args)
        assert str(caught.value) == default


def test_eval_refuses_a_repeated_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `--baseline A --baseline B` scored B alone (click keeps the last), exit 0."""
    trace = tmp_path / "t.npz"
    save_trace(planted(128, num_experts=8), trace)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    Placement(expert_to_gpu=np.tile(np.arange(8) // 2, (4, 1)), num_gpus=4, gpus_per_node=4).save(a)
    Placement(expert_to_gpu=np.tile(np.arange(8) % 4, (4, 1)), num_gpus=4, gpus_per_node=4).save(b)
    out = tmp_path / "r.json"
    err = one_error_line(capsys, ["eval", str(a), str(trace), "--baseline", str(a), "--baseline", str(b),
                                  "-o", str(out)])
    assert err.startswith(f"Invalid value for '--baseline': given 2 times ({a}, {b}): "), err
    assert not out.exists()
    assert run(["eval", str(a), str(trace), "--baseline", str(b), "--json"]) == 0  # once: as before
    assert json.loads(capsys.readouterr().out)["baseline"]["placement"] == str(b)


def test_serve_routing_out_must_be_named_npz(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """serve --routing-out writes a trace (.npz) as trace and import do: another name is refused by
    the same option type, before the model is looked at."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2]}\n')
    out = str(tmp_path / "routing.json")
    err = one_error_line(capsys, ["serve", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts),
                                  "--routing-out", out])
    assert err.startswith(f"Invalid value for '--routing-out': {out!r}: this writes an .npz archive"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_a_group_count_the_config_leaves_out_is_transformers_default() -> None:
    """Before: a DeepSeek-V3 config without n_group / topk_group counted as no groups, so
    permute-checkpoint renumbered across groups; transformers loads that config with its class
    defaults (n_group 8, topk_group 4) and routes over groups, so routing changed. A family
    transformers does not know keeps the old reading (no groups)."""
    from moeplace.export.permute import check_group_routing

    mixing = np.array([[2, 3, 0, 1] + list(range(4, 16))])  # keeps 2-expert groups whole
    mixing[0, [1, 4]] = mixing[0, [4, 1]]  # now new group 0 holds old experts 2 and 4: old groups 1 and 2
    with pytest.raises(PlacementError, match=r"n_group=8, topk_group=4\).*mix old groups"):
        check_group_routing({"model_type": "deepseek_v3"}, mixing)
    check_group_routing({"model_type": "deepseek_v3", "n_group": 1, "topk_group": 1}, mixing)  # written: no groups
    check_group_routing({"model_type": "deepseek_v2"}, mixing)  # V2's defaults: greedy, no groups
    check_group_routing({"model_type": "no-such-family"}, mixing)
    check_group_routing({"model_type": "deepseek_v3"}, np.array([[2, 3, 0, 1] + list(range(4, 16))]))
