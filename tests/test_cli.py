"""The top-level command group: every stage is listed, help is fast, and failures are one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from moeplace import cli


def test_help_lists_every_stage_without_importing_torch() -> None:
    code = "import sys; from moeplace.cli import run; rc = run(['--help']); print('torch' in sys.modules); sys.exit(rc)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in cli.COMMANDS:
        assert name in out
    assert out.strip().endswith("False"), "`moeplace --help` imported torch"


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run([name, "--help"]) == 0
    assert "unavailable" not in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], ["import"], ["export"], ["permute-checkpoint"]])
def test_bare_command_prints_its_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(argv) == 0  # what --help gives, not a usage error squeezed into one line
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"Usage: moeplace {' '.join(argv)}".rstrip()) and out.count("\n") > 5


def test_silenced_turns_off_progress_made_inside_it(capsys: pytest.CaptureFixture[str]) -> None:
    from moeplace.progress import Progress, silenced

    def report() -> str:
        Progress("step", after=0.0, every=0.0).update(1, "working")
        return capsys.readouterr().err

    with silenced():
        with silenced(False):  # an inner command without --quiet stays quiet
            assert report() == ""
        assert report() == ""
    assert "step:" in report()


def test_quiet_commands_print_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    layer = "token_id,expert_0,expert_1,expert_2,expert_3\n" + "".join(
        f"{t},{0.6 if t % 2 else 0.0},{0.0 if t % 2 else 0.7},0.4,0.3\n" for t in range(64))  # halves of 32: run
    for n in (2, 3):
        (tmp_path / f"layer{n}.csv").write_text(layer)
    trace = tmp_path / "t.npz"
    assert cli.run(["import", "csv", str(tmp_path), "-k", "2", "-o", str(trace), "-q"]) == 0
    assert cli.run(["analyze", str(trace), "-o", str(tmp_path / "a"), "--shuffles", "2", "--gpus", "2", "-q"]) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "a" / "analyze.json").is_file()
    assert cli.run(["analyze", str(trace), "-o", str(tmp_path / "b"), "--shuffles", "2", "--gpus", "2"]) == 0
    out, err = capsys.readouterr()
    assert "Load skew per layer" in out and "solving placements" in err  # what -q silenced


def test_unimportable_command_is_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("moeplace.no_such_module", "ghost", "A stage that is not installed."))
    assert cli.run(["ghost"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeplace: error: 'ghost' is unavailable in this install") and "\n" not in err


def test_quiet_solve_prints_nothing_on_stdout_not_even_the_highs_banner(tmp_path: Path) -> None:
    from moeplace.solve.synthetic import planted_trace
    from moeplace.trace.format import save_trace

    # HiGHS prints a banner on stdout when a process makes its first solver object, whatever
    # PuLP's msg=False says; a fresh process, and balance on 16 x 4 layers, which always runs
    # the per-layer ILP
    save_trace(planted_trace(200, 2, 16, 2, 4, seed=0)[0], tmp_path / "t.npz")
    cmd = [sys.executable, "-m", "moeplace", "solve", str(tmp_path / "t.npz"), "--gpus", "4", "--objective",
           "balance", "-q", "-o", str(tmp_path / "p.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and (tmp_path / "p.json").exists()


@pytest.mark.parametrize("fraction, warned", [(0.5, ""), (0.96, "holds out 8 of 200 tokens"),
                                              (0.04, "fits on 8 and holds out 192")])
def test_solve_warns_when_a_split_part_has_fewer_tokens_than_experts(
        fraction: float, warned: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeplace.solve.synthetic import planted_trace
    from moeplace.trace.format import save_trace

    save_trace(planted_trace(200, 2, 16, 2, 4, seed=0)[0], tmp_path / "t.npz")
    assert cli.run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", "--train-fraction", str(fraction),
                    "--time-limit", "2", "-q", "-o", str(tmp_path / "p.json")]) == 0  # a warning, not an error
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("moeplace: warning:")]
    if not warned:
        assert lines == []
        return
    assert len(lines) == 1 and warned in lines[0] and "16 experts per layer" in lines[0], lines
    assert ("reliable fit" in lines[0]) == (fraction < 0.5) and ("held-out" in lines[0]) == (fraction > 0.5)


def test_solve_refuses_a_train_fraction_for_load_only_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from moeplace.trace.format import make_loads, save_loads

    save_loads(make_loads(np.ones((2, 8))), tmp_path / "loads.npz")
    argv = ["solve", str(tmp_path / "loads.npz"), "--gpus", "2", "--objective", "balance", "-q", "-o", str(tmp_path / "p.json")]
    assert cli.run([*argv, "--train-fraction", "0.5"]) == 2  # it was silently fitted on all loads
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeplace: error: --train-fraction:") and "no tokens to split" in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()
    assert cli.run(argv) == 0


def test_solve_on_load_only_input_balances_without_being_told(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Loads allow only balance, as --cluster asks for latency: no --objective means balance
    (before: "--redundant-experts applies to --objective latency or balance", with no word of
    the input being load-only); the traffic objective's options say why they do not apply."""
    import numpy as np

    from moeplace.placement import load_placement
    from moeplace.trace.format import make_loads, save_loads

    save_loads(make_loads(np.arange(1, 17).reshape(2, 8)), tmp_path / "loads.npz")
    argv = ["solve", str(tmp_path / "loads.npz"), "--gpus", "4", "--time-limit", "2", "-o", str(tmp_path / "p.json")]
    assert cli.run([*argv, "--redundant-experts", "4"]) == 0
    assert "; objective balance, all that loads without token paths allow" in capsys.readouterr().out
    p = load_placement(tmp_path / "p.json")
    assert p.objective["name"] == "balance" and p.num_replicas == 4
    assert cli.run([*argv, "--max-imbalance", "1.2"]) == 2
    assert capsys.readouterr().err == (f"moeplace: error: --max-imbalance: {tmp_path / 'loads.npz'} holds expert loads "
                                       "only (no token paths), so the objective is balance, which minimises the "
                                       "imbalance; the traffic objective's options need a trace\n")
    assert cli.run([*argv, "--objective", "traffic"]) == 2  # asked for: refused, saying why
    assert "holds expert loads only (no token paths): use --objective balance" in capsys.readouterr().err


@pytest.mark.parametrize("redundant, load_only, warned", [(1, False, True), (4, False, False), (3, True, True),
                                                     (0, True, False)])
def test_solve_says_when_no_engine_can_take_the_placement(redundant: int, load_only: bool, warned: bool, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # 8 experts + R copies on 4 GPUs: with R = 1 or 3 some GPU holds one more slot, which no
    # engine file can say (export refuses it); solve says so when it writes it, not export later
    import numpy as np

    from moeplace.solve.synthetic import planted_trace
    from moeplace.trace.format import make_loads, save_loads, save_trace

    path = tmp_path / "t.npz"
    if load_only:
        save_loads(make_loads(np.arange(1, 17).reshape(2, 8)), path)
    else:
        save_trace(planted_trace(200, 2, 8, 2, 4, seed=0)[0], path)
    out = tmp_path / "p.json"
    assert cli.run(["solve", str(path), "--gpus", "4", "--objective", "balance", "--redundant-experts", str(redundant),
                    "--time-limit", "2", "-q", "-o", str(out)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "no SGLang/vLLM/EPLB form" in line]
    assert len(lines) == int(warned), lines
    if warned:
        assert "holds 3 physical experts but GPU" in lines[0] and "holds 2" in lines[0]
    assert cli.run(["export", str(out), "--to", "eplb", "-o", str(tmp_path / "e.json")]) == (2 if warned else 0)


@pytest.mark.parametrize("name", ["vocab.txt", "vocab.json", "tokenizer.model"])
def test_serve_and_trace_accept_the_same_tokenizer_files(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from moeplace.serve.cli import load_tokenizer
    from moeplace.trace.cli import TOKENIZER_FILES

    assert name in TOKENIZER_FILES
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda path, **kw: ("tokenizer of", path))
    assert load_tokenizer(str(tmp_path)) is None  # no tokenizer file: prompts must be token ids
    (tmp_path / name).write_text("x")
    # serve used to know only tokenizer.json/_config.json/.model: a vocab-only directory lost its tokenizer
    assert load_tokenizer(str(tmp_path)) == ("tokenizer of", str(tmp_path))


@pytest.mark.parametrize("option", ["--coselect-weight", "--top1-weight", "--smoothing", "--prior", "--node-cost",
                                    "--compute-weight"])
def test_huge_weights_are_refused_not_overflowed(option: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 1e308 is finite but overflowed the edge sums into a numpy "invalid entries" crash (exit 3)
    assert cli.run(["solve", str(tmp_path / "absent.npz"), "--gpus", "4", option, "1e308", "-o", str(tmp_path / "p.json")]) == 2
    assert f"Invalid value for '{option}'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--objective", "balance", "--top1-weight", "2"], "--top1-weight: set the traffic objective's edge costs, which balance"),
    (["--objective", "balance", "--smoothing", "1", "--node-cost", "3"], "--node-cost, --smoothing: set the traffic"),
    (["--objective", "latency", "--coselect-weight", "4"], "--coselect-weight: set the traffic objective's edge costs, "
                                                           "which latency does not read"),
    (["--objective", "latency", "--pareto", "--compute-weight", "4"], "--pareto solves for compute weights"),
])
def test_solve_refuses_options_its_objective_would_ignore(args: list[str], message: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # they were accepted and silently ignored, so a user believed the placement reflected them
    from moeplace.solve.synthetic import planted_trace
    from moeplace.trace.format import save_trace

    save_trace(planted_trace(64, 2, 8, 2, 4, seed=0)[0], tmp_path / "t.npz")
    cluster = ["--cluster", str(ROOT / "configs/cluster/h100-1x4-nvlink.yaml"),
               "--model-config", str(ROOT / "configs/model/tiny-moe.yaml")] if "latency" in args else []
    assert cli.run(["solve", str(tmp_path / "t.npz"), "--gpus", "4", *args, *cluster, "-q",
                    "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


def test_ctrl_c_says_interrupted(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "moeplace: aborted", which reads like a failure; serve and SIGTERM already named the signal."""
    def interrupted(ctx: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.main, "invoke", interrupted)
    assert cli.run(["solve"]) == 130
    assert capsys.readouterr().err == "\nmoeplace: interrupted (SIGINT)\n"  # click's newline closes the ^C echo


@pytest.mark.parametrize("code, says", [(28, "No space left on device writing report.json"),  # ENOSPC
                                         (30, "Read-only file system writing report.json")])  # EROFS
def test_a_full_disk_is_one_line_not_an_internal_error(code: int, says: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `moeplace eval ... --json > /dev/full` was "internal error: OSError ... (a bug)", exit 3."""
    import errno
    import os

    assert code in (errno.ENOSPC, errno.EROFS)

    def full(ctx: object) -> None:
        raise OSError(code, os.strerror(code), "report.json")

    monkeypatch.setattr(cli.main, "invoke", full)
    assert cli.run(["solve"]) == 2
    assert capsys.readouterr().err == f"moeplace: error: {says}\n"
    monkeypatch.setenv("MOEPLACE_TRACEBACK", "1")  # the traceback on request, as for any other error
    with pytest.raises(OSError, match=os.strerror(code)):
        cli.run(["solve"])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_stdout_on_a_full_device_is_one_line() -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "moeplace", "eval", "--help"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "moeplace: error: No space left on device writing the output"], done.stderr


def test_a_mistyped_command_names_the_nearest(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, line in ((["slove"], "No such command 'slove'; did you mean 'solve'? (see 'moeplace --help')"),
                       (["import", "cvs"], "No such command 'cvs'; did you mean 'csv'? (see 'moeplace import --help')"),
                       (["xyz"], "No such command 'xyz'. (see 'moeplace --help')")):  # nothing near: no guess
        assert cli.run(argv) == 2
        assert capsys.readouterr().err == f"moeplace: error: {line}\n"
