"""Audit of round 31's serve --routing-prefill, its eval and merge sides, and a batch run that
records no token: each test fails without its fix.

- eval/traffic.py: a prefill file's meta prompt_lengths edited to a negative length, a float,
  true, a string or a sequence listed twice was cast by numpy (3.9 -> 3, true -> 1) or taken
  at its first row, so prompt tokens were silently predicted as decode tokens (or the reverse);
  a file of prompt tokens alone was predicted at 0 bytes a token.
- trace/merge.py: sequence-id shifts past int64 (the least common multiple of edited meta
  worlds, or ids near 2**63) were an internal error or wrapped silently; an input whose meta
  phases is a string was read as a prefill file, which eval reads as decode-only.
- serve/cli.py: a batch --routing-out run in which no decode step ran ended in exit 2
  ("empty trace (shape [0, 2, 2])") after writing its generations; the HTTP server says so in
  a note.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.errors import TraceError
from moeplace.eval.traffic import decode_tokens, predict_traffic, traffic_scope_note
from moeplace.placement import load_placement
from moeplace.trace.format import Trace, make_trace, save_trace
from moeplace.trace.merge import merge_traces
from test_serve_cli import save_placement

LAYERS, EXPERTS, K = 2, 8, 2
# two sequences of a prefill file: 0 with a 3-token prompt and 2 decode tokens, 1 with 2 + 1
SEQ = np.array([0, 0, 0, 0, 0, 1, 1, 1])
POS = np.array([0, 1, 2, 3, 4, 0, 1, 2])
LENGTHS = [[0, 3], [1, 2]]


def prefill_trace(meta: dict[str, Any] | None = None, sequence_ids: np.ndarray = SEQ, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(EXPERTS)[:K] for _ in range(len(sequence_ids) * LAYERS)])
    meta = {"source": "moeplace serve (prefill+decode)", "world": 2, "phases": ["prefill", "decode"],
            "prompt_lengths": LENGTHS} if meta is None else meta
    return make_trace(ids.reshape(len(sequence_ids), LAYERS, K), None, EXPERTS, sequence_ids=sequence_ids,
                      positions=POS[:len(sequence_ids)], token_ids=np.arange(len(sequence_ids)), meta=meta)


def test_the_valid_table_tells_decode_tokens() -> None:
    """The reference the refusals below are measured against: positions at or past the length."""
    idx = decode_tokens(prefill_trace())
    assert idx is not None and idx.tolist() == [3, 4, 7]


@pytest.mark.parametrize("table, message", [
    ([[0, 3], [1, -2]], "gives sequence 1 a negative length"),  # was: all of 1's tokens decode tokens
    ([[0, 3], [1, 2.9]], "no valid meta prompt_lengths"),  # was: cast to 2
    ([[0, 3], [1, True]], "no valid meta prompt_lengths"),  # was: read as 1
    ([[0, 3], [1, "2"]], "no valid meta prompt_lengths"),  # was: parsed by numpy
    ([[0, 3], [True, 2]], "no valid meta prompt_lengths"),
    ([[0, 3], [1, 2], [1, 0]], "lists sequence 1 2 times"),  # was: the first row, silently
])
def test_an_edited_prompt_length_table_is_refused_not_cast(table: list[Any], message: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    trace = prefill_trace({"phases": ["prefill", "decode"], "prompt_lengths": table})
    placement = load_placement(save_placement(tmp_path / "p.json", LAYERS, EXPERTS, 2))
    with pytest.raises(TraceError, match=message):
        predict_traffic(placement, trace, "standard", 32, 4)
    save_trace(trace, tmp_path / "t.npz")
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "p.json"), str(tmp_path / "t.npz"), "--hidden-size", "32"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_file_of_prompt_tokens_alone_has_no_decode_traffic_to_predict(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Every request ended at its first token (max_tokens 1, EOS, a cut window): eval's traffic
    columns were 0.0 bytes a token for every layout; now one line, exit 2, and the placement
    metrics still run without --hidden-size."""
    trace = prefill_trace({"phases": ["prefill", "decode"], "prompt_lengths": [[0, 5], [1, 3]]})
    with pytest.raises(TraceError, match="holds 8 prompt .prefill. tokens and no decode token"):
        traffic_scope_note(trace, "t.npz")
    save_trace(trace, tmp_path / "t.npz")
    save_placement(tmp_path / "p.json", LAYERS, EXPERTS, 2)
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "p.json"), str(tmp_path / "t.npz"), "--hidden-size", "32"]) == 2
    out, err = capsys.readouterr()
    assert "no decode traffic to predict" in err and "bytes/token" not in out
    assert run(["eval", str(tmp_path / "p.json"), str(tmp_path / "t.npz")]) == 0


def test_merge_refuses_sequence_ids_past_int64() -> None:
    """Edited meta worlds (primes near 2**20: their least common multiple is ~1e24) made the
    shift a Python int numpy cannot add (an internal error); ids near 2**63 with no world
    wrapped to negative ids silently."""
    primes = (1048573, 1048571, 1048559, 1048549)
    traces = [(f"w{w}.npz", prefill_trace({"world": w}, seed=i)) for i, w in enumerate(primes)]
    with pytest.raises(TraceError, match=r"sequence ids past 2\*\*63 - 1 when merged"):
        merge_traces(traces)
    near = prefill_trace({}, sequence_ids=SEQ + ((1 << 63) - 2))
    with pytest.raises(TraceError, match=r"sequence ids past 2\*\*63 - 1 when merged"):
        merge_traces([("a.npz", near), ("b.npz", prefill_trace({}, seed=1))])
    merged, _ = merge_traces(traces[:3])  # ~1.2e18: still fits, each id's remainder by every world kept
    assert merged.sequence_ids is not None and merged.sequence_ids.min() >= 0
    for (_, t), part in zip(traces[:3], np.split(merged.sequence_ids, 3)):
        assert (part % t.meta["world"] == SEQ % t.meta["world"]).all()


def test_merge_reads_phases_as_eval_does(tmp_path: Path) -> None:
    """An input whose meta phases is a string ("prefill+decode"), not a list, is a decode-only
    file to eval; merge read it as a prefill file and carried its prompt lengths, so the merged
    file was predicted on fewer tokens than its inputs."""
    odd = prefill_trace({"world": 2, "phases": "prefill+decode", "prompt_lengths": LENGTHS})
    real = prefill_trace(seed=1)
    merged, _ = merge_traces([("odd.npz", odd), ("real.npz", real)])
    placement = load_placement(save_placement(tmp_path / "p.json", LAYERS, EXPERTS, 2))
    parts = [predict_traffic(placement, t, "standard", 32, 4) for t in (odd, real)]
    whole = predict_traffic(placement, merged, "standard", 32, 4)
    assert parts[0]["tokens"] == odd.num_tokens and whole["tokens"] == parts[0]["tokens"] + parts[1]["tokens"]
    assert whole["alltoall_bytes"] == parts[0]["alltoall_bytes"] + parts[1]["alltoall_bytes"]
    assert merged.meta["prompt_lengths"][:2] == [[0, 0], [1, 0]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from moeplace.models.tiny import build_tiny_model

    return build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("audit31b") / "m", num_experts=EXPERTS, top_k=K,
                            num_layers=3, seed=6)


def test_a_batch_with_no_decode_step_says_so_as_the_server_does(model: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Every sequence generates one token (it comes from prefill): no decode step runs, so a
    decode-only --routing-out has no token. Exit 0 with a note (as the HTTP server's), the
    generations written; with --routing-prefill the prompts are the file."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": [5, 6, 7], "max_tokens": 1}) + "\n"
                       + json.dumps({"prompt": [8, 9], "max_tokens": 1}) + "\n")
    routing = tmp_path / "r.npz"
    argv = ["serve", "--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
            "--routing-out", str(routing), "--device", "cpu"]
    capsys.readouterr()
    assert run(argv) == 0
    err = capsys.readouterr().err
    assert f"note: no decode step ran (every sequence ended at its first token), so {routing} was not written" in err
    assert not routing.exists() and len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    assert run([*argv, "--routing-prefill"]) == 0
    assert "prefill+decode routing of 5 tokens (5 prompt, 0 decode)" in capsys.readouterr().out
    assert routing.exists()


def test_brief_shows_a_container_of_a_huge_integer() -> None:
    """Before: brief([1, 10**5000]) raised ValueError (Python's limit on printed digits, which YAML's
    hex integers pass when loaded), so a check YAML `name: [1, 0xfff...]` ended in an internal error."""
    from moeplace.options import brief

    assert "too large to print" in brief([1, 10**5000])
    assert brief(10**5000) == "an integer too large to print"


def test_an_unsupported_field_names_the_values_it_accepts() -> None:
    """Before: every refusal said "leave it out or null", though "tool_choice": "auto", "echo": false
    or "tools": [] are accepted too; the line now lists what changes nothing."""
    from moeplace.serve.openai import CHAT_UNSUPPORTED, BadRequest, check_options

    with pytest.raises(BadRequest, match=r'"tool_choice" is not supported \(chat completions\): leave it out or '
                                         r'send null or "none" or "auto", got "required"'):
        check_options({"tool_choice": "required"}, CHAT_UNSUPPORTED, "chat completions", 100)
    with pytest.raises(BadRequest, match=r'"echo" is not supported \(chat completions\): leave it out or send null '
                                         r"or false, got true"):
        check_options({"echo": True}, CHAT_UNSUPPORTED, "chat completions", 100)
    check_options({"tool_choice": "auto", "echo": False, "tools": []}, CHAT_UNSUPPORTED, "chat completions", 100)
