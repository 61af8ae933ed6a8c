"""Batch runs (`moeplace serve --prompts FILE`) at parity with the HTTP API: `--min-p`, "stop" /
`--stop`, "n" / `--choices` and "logprobs" / `--logprobs`, with /v1/completions' checks and answers;
one output line per choice; the output of a run without them unchanged byte for byte. Every
expected record is derived from what the HTTP server answers for the same prompt and seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moeplace.cli import run
from moeplace.errors import MoeplaceError
from moeplace.serve.cli import read_prompts
from moeplace.trace.format import load_trace
from test_serve_stop_n import ascii_pair, completing
from test_serve_stream import post

LIMIT = 16  # --max-new-tokens and the HTTP server's cap
PROMPT = "The cat"  # its greedy answer runs to LIMIT tokens, no EOS (test_serve_stop_n)
EOS_PROMPT = "hello"  # its greedy answer ends at an EOS token within LIMIT (test_serve_stream)
SAMPLED = {"temperature": 1.0, "seed": 41}


@pytest.fixture(scope="module")
def server(chat_model: Path, chat_tokenizer: Any, one_rank_runtime: Callable[[Path], Any],
           serving: Callable[..., Any]) -> Iterator[int]:
    with serving(one_rank_runtime(chat_model), chat_tokenizer, LIMIT) as port:
        yield port


def completion(port: int, body: dict[str, Any]) -> dict[str, Any]:
    code, doc = post(port, "/v1/completions", {"max_tokens": LIMIT, **body})
    assert code == 200, doc
    return doc


def batch(model: Path, path: Path, lines: list[dict[str, Any]] | list[str], *args: str) -> tuple[bytes, list[dict]]:
    """A one-rank batch run of `lines` (JSONL objects, or text prompts for a .txt path): the
    --out file's bytes and its records."""
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    out = path.with_name(path.stem + ".out.jsonl")
    assert run(["serve", "--model", str(model), "--device", "cpu", "--prompts", str(path), "--out", str(out),
                "--max-new-tokens", str(LIMIT), *args]) == 0
    data = out.read_bytes()
    return data, [json.loads(line) for line in data.decode().splitlines()]


@pytest.fixture(scope="module")
def full(server: int) -> dict[str, Any]:
    """PROMPT's greedy choice over HTTP, without stop strings."""
    (choice,) = completion(server, {"prompt": PROMPT})["choices"]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == LIMIT
    return choice


@pytest.fixture(scope="module")
def stop(full: dict[str, Any]) -> str:
    """Two ASCII characters of the greedy text, after its start: one token each, so the stop
    string spans a token boundary and cuts the text short."""
    return ascii_pair(full["text"], 1)


@pytest.fixture(scope="module")
def shared(chat_model: Path, chat_tokenizer: Any, stop: str,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run most tests read: its lines, its records grouped by line, its bytes."""
    lines: list[dict[str, Any]] = [
        {"prompt": PROMPT},  # 0: greedy, whole
        {"prompt": PROMPT, "stop": stop},  # 1
        {"prompt": PROMPT, "stop": [stop, "\x7f\x7f"], "logprobs": 1},  # 2
        {"prompt": PROMPT, "n": 3, "logprobs": 2, **SAMPLED},  # 3: seeds 41, 42, 43
        {"prompt": PROMPT, "temperature": 1.0, "seed": 43},  # 4: line 3's third choice alone
        {"prompt": chat_tokenizer.encode(PROMPT), "stop": stop},  # 5: token ids
        {"prompt": PROMPT, "n": 2, "temperature": 1.0},  # 6: --seed + its sequences' indices 8, 9
        {"prompt": PROMPT, "temperature": 1.0},  # 7: sequence 10
        {"prompt": PROMPT, "n": 2},  # 8: greedy: two equal choices
    ]
    path = tmp_path_factory.mktemp("shared") / "p.jsonl"
    # --max-batch 4: line 3's choices and line 6's are split over two batches
    data, records = batch(chat_model, path, lines, "--seed", "100", "--max-batch", "4")
    by_line: list[list[dict[str, Any]]] = [[] for _ in lines]
    for r in records:
        by_line[r["index"]].append(r)
    return {"lines": lines, "records": records, "by_line": by_line, "bytes": data, "path": path}


def test_n_choices_are_records_prompt_major_with_their_seeds(shared: dict[str, Any], full: dict[str, Any],
                                                            chat_model: Path) -> None:
    by_line = shared["by_line"]
    assert [(r["index"], r["choice"]) for r in shared["records"]] == [
        (i, j) for i, line in enumerate(shared["lines"]) for j in range(line.get("n", 1))]
    # a line's seed is choice 0's, choice j samples with seed + j; lines without one count on from
    # --seed over the run's sequences (prompt-major); greedy records name no seed
    assert [r.get("seed") for r in shared["records"]] == [
        None, None, None, 41, 42, 43, 43, None, 108, 109, 110, None, None]
    third = by_line[3][2]
    assert {k: v for k, v in third.items() if k not in ("index", "logprobs")} == \
        {**{k: v for k, v in by_line[4][0].items() if k != "index"}, "choice": 2}
    assert len({tuple(r["token_ids"]) for r in by_line[3]}) == 3  # sampled with other seeds: other tokens
    assert [r["token_ids"] for r in by_line[8]] == [full["token_ids"]] * 2 == [by_line[0][0]["token_ids"]] * 2
    # reproducible: the same file and --seed give the same bytes
    again, _ = batch(chat_model, shared["path"], shared["lines"], "--seed", "100", "--max-batch", "4")
    assert again == shared["bytes"]


def test_n_choices_equal_the_http_answer_and_their_seed_alone(shared: dict[str, Any], server: int) -> None:
    doc = completion(server, {"prompt": PROMPT, "n": 3, "logprobs": 2, **SAMPLED})
    assert doc["seed"] == 41 and len(doc["choices"]) == 3
    for record, choice in zip(shared["by_line"][3], doc["choices"], strict=True):
        assert {k: record[k] for k in ("token_ids", "text", "finish_reason")} == \
            {k: choice[k] for k in ("token_ids", "text", "finish_reason")}
    for j, record in enumerate(shared["by_line"][6]):  # seed 108 + j, asked for alone
        alone = completion(server, {"prompt": PROMPT, "temperature": 1.0, "seed": 108 + j})["choices"][0]
        assert record["token_ids"] == alone["token_ids"] and record["seed"] == 108 + j


@pytest.mark.parametrize("line, stops", [({"prompt": PROMPT, "n": 3, "logprobs": 2, **SAMPLED}, False),
                                         ({"prompt": PROMPT, "logprobs": 1}, True),
                                         ({"prompt": EOS_PROMPT, "logprobs": 0}, False)])
def test_logprobs_equal_the_http_answers(chat_model: Path, server: int, stop: str, tmp_path: Path,
                                         line: dict[str, Any], stops: bool) -> None:
    """The same sequences in one batch as the HTTP request's: the same "logprobs" objects, to the
    bit (in another batch, the logits can differ in their last float32 bits)."""
    line = {**line, "stop": stop} if stops else line
    _, records = batch(chat_model, tmp_path / "p.jsonl", [line])
    doc = completion(server, line)
    assert len(records) == len(doc["choices"]) == line.get("n", 1)
    for record, choice in zip(records, doc["choices"]):
        assert {k: record[k] for k in ("token_ids", "text", "finish_reason", "logprobs")} == \
            {k: choice[k] for k in ("token_ids", "text", "finish_reason", "logprobs")}
        assert len(record["logprobs"]["tokens"]) == len(record["token_ids"])
        # the K alternatives asked for (fewer where two decode alike), whatever the batch computed
        assert max(len(top) for top in record["logprobs"]["top_logprobs"]) == line["logprobs"]
    if stops:  # cut by it: the log-probabilities end at the token that completed it
        assert records[0]["finish_reason"] == "stop" and len(records[0]["token_ids"]) < LIMIT


def test_a_stop_string_cuts_the_text_and_tokens_as_http_does(shared: dict[str, Any], full: dict[str, Any],
                                                             chat_tokenizer: Any, stop: str) -> None:
    whole = shared["by_line"][0][0]
    assert (whole["token_ids"], whole["text"], whole["finish_reason"]) == \
        (full["token_ids"], full["text"], "length")
    cut, count = full["text"].index(stop), completing(chat_tokenizer, full["token_ids"], stop)
    assert 0 < cut and count < LIMIT
    (record,) = shared["by_line"][1]
    assert whole["text"].startswith(record["text"]) and record["text"] == full["text"][:cut]
    assert record["token_ids"] == full["token_ids"][:count] and record["finish_reason"] == "stop"
    assert "logprobs" not in record  # only where asked for
    # a token-id prompt: its text decoded all the same, cut at the same place
    (ids,) = shared["by_line"][5]
    assert (ids["text"], ids["token_ids"], ids["finish_reason"]) == (record["text"], record["token_ids"], "stop")
    # with logprobs: those of the tokens up to the one completing the stop string
    (with_lp,) = shared["by_line"][2]
    assert (with_lp["text"], with_lp["token_ids"]) == (record["text"], record["token_ids"])
    assert len(with_lp["logprobs"]["tokens"]) == len(with_lp["logprobs"]["top_logprobs"]) == count


def test_a_stop_string_ends_its_sequence_at_the_next_step(chat_model: Path, chat_tokenizer: Any, full: dict[str, Any],
                                                          stop: str, tmp_path: Path) -> None:
    """The record is the cut one, and the batch stopped decoding right after the token that
    completed the stop string: `count` decode steps and tokens, not LIMIT - 1 steps and LIMIT
    tokens (before)."""
    count = completing(chat_tokenizer, full["token_ids"], stop)
    stats = tmp_path / "s.json"
    _, records = batch(chat_model, tmp_path / "p.jsonl", [{"prompt": PROMPT, "stop": stop}], "--stats-out", str(stats))
    assert records == [{"index": 0, "prompt": PROMPT, "token_ids": full["token_ids"][:count],
                        "text": full["text"][:full["text"].index(stop)], "finish_reason": "stop"}]
    figures = json.loads(stats.read_text())
    decode = figures["decode"]
    assert (decode["steps"], figures["generated_tokens"], decode["tokens"]["collectives"]) == (count, count, count + 1)
    assert count < LIMIT - 1


def test_without_the_options_the_output_is_unchanged_byte_for_byte(chat_model: Path, chat_tokenizer: Any, server: int,
                                                                   tmp_path: Path) -> None:
    """The records of the runs before these options: {index, prompt, token_ids, text,
    finish_reason} and "seed" where sampled, in that order, one per prompt; "n": 1, "stop": null
    or [] and "logprobs": null in a line, or --choices 1, change no byte."""
    ids = chat_tokenizer.encode(PROMPT)
    lines: list[dict[str, Any]] = [{"prompt": EOS_PROMPT}, {"prompt": PROMPT, "max_tokens": 5},
                                   {"prompt": ids, "temperature": 0.8}, {"prompt": "Grüße", "temperature": 1.3,
                                                                         "top_p": 0.9, "seed": 7}]
    data, records = batch(chat_model, tmp_path / "p.jsonl", lines, "--seed", "11")
    want = []
    for i, line in enumerate(lines):
        seed = line.get("seed", 11 + i) if "temperature" in line else None
        body = {k: v for k, v in line.items() if k != "seed"} | ({"seed": seed} if seed is not None else {})
        (choice,) = completion(server, body)["choices"]
        record = {"index": i, "prompt": line["prompt"], "token_ids": choice["token_ids"],
                  "text": chat_tokenizer.decode(choice["token_ids"]), "finish_reason": choice["finish_reason"]}
        want.append(json.dumps(record if seed is None else {**record, "seed": seed}))
    assert data == ("\n".join(want) + "\n").encode()
    assert {r["finish_reason"] for r in records} == {"stop", "length"}  # both kinds
    neutral = [{**lines[0], "n": 1}, {**lines[1], "stop": None, "logprobs": None}, {**lines[2], "stop": []},
               lines[3]]
    assert batch(chat_model, tmp_path / "p.jsonl", neutral, "--seed", "11", "--choices", "1")[0] == data


def test_min_p_option_and_line(chat_model: Path, server: int, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    _, records = batch(chat_model, tmp_path / "p.txt", [PROMPT, EOS_PROMPT], "--temperature", "1.0", "--min-p", "0.9",
                       "--seed", "5")
    for i, (record, prompt) in enumerate(zip(records, [PROMPT, EOS_PROMPT])):
        choice = completion(server, {"prompt": prompt, "temperature": 1.0, "min_p": 0.9, "seed": 5 + i})["choices"][0]
        assert record["token_ids"] == choice["token_ids"] and record["seed"] == 5 + i
    plain = completion(server, {"prompt": PROMPT, "temperature": 1.0, "seed": 5})["choices"][0]["token_ids"]
    assert records[0]["token_ids"] != plain  # min_p 0.9 applied: another draw than without it
    # a line's own "min_p" wins over the option, as its other sampling keys do
    _, (own,) = batch(chat_model, tmp_path / "p.jsonl", [{"prompt": PROMPT, "min_p": 0}], "--temperature", "1.0",
                      "--min-p", "0.9", "--seed", "5")
    assert own["token_ids"] == plain
    capsys.readouterr()
    base = ["serve", "--model", str(chat_model), "--device", "cpu", "--prompts", str(tmp_path / "p.txt")]
    for args, message in [(["--min-p", "0.9"], "--min-p shapes sampling: give --temperature too"),
                          (["--temperature", "1", "--min-p", "1.5"], "--min-p"),
                          (["--port", "0", "--min-p", "0.9"], "--min-p applies to batch runs (--prompts)")]:
        assert run([*(base[:-2] if "--port" in args else base), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moeplace: error: ") and message in err[0], err


@pytest.mark.parametrize("field, message", [
    ({"n": 0}, "\"n\" must be 1 to 16 (an integer: the completions per prompt), got 0"),
    ({"n": 17}, "\"n\" must be 1 to 16"),
    ({"n": 2.0}, "\"n\" must be 1 to 16"),
    ({"n": True}, "\"n\" must be 1 to 16"),
    ({"best_of": 3}, "\"best_of\" is not supported (batch runs)"),
    ({"stop": ""}, "\"stop\" must be a string or a list of at most 4 strings, each of 1 to 1024 characters"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "\"stop\" must be a string or a list of at most 4 strings"),
    ({"stop": 5}, "\"stop\" must be a string or a list"),
    ({"stop": ["ok", "\ud800"]}, "stop[1] is not valid Unicode text"),
    ({"logprobs": 6}, "\"logprobs\" must be an integer in [0, 5]"),
    ({"logprobs": True}, "\"logprobs\" must be an integer in [0, 5]"),
    ({"logprobs": -1}, "\"logprobs\" must be an integer in [0, 5]")])
def test_bad_line_values_are_one_line_naming_file_line_and_field(chat_model: Path, tmp_path: Path,
                                                                 field: dict[str, Any], message: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": PROMPT, **field}) + "\n")
    out = tmp_path / "o.jsonl"
    out.write_text("before\n")
    assert run(["serve", "--model", str(chat_model), "--device", "cpu", "--prompts", str(prompts),
                "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moeplace: error: {prompts}:2: {message}"), err
    # refused before any output: the file is as it was, and no temporary file is left
    assert out.read_text() == "before\n" and sorted(p.name for p in tmp_path.iterdir()) == ["o.jsonl", "p.jsonl"]


@pytest.mark.parametrize("args, message", [
    (["--choices", "0"], "--choices"), (["--choices", "17"], "--choices"), (["--logprobs", "6"], "--logprobs"),
    (["--stop", ""], "--stop: a stop string has 1 to 1024 characters, got 0"),
    (["--stop", "x" * 1025], "--stop: a stop string has 1 to 1024 characters, got 1025"),
    ([arg for s in "abcde" for arg in ("--stop", s)], "--stop: at most 4 stop strings, got 5"),
    (["--stop", "a\udcff"], "--stop is not valid Unicode text"),  # an argument that is no UTF-8
    (["--port", "0", "--stop", "a"], "--stop applies to batch runs (--prompts), not to the HTTP server"),
    (["--port", "0", "--choices", "2"], "--choices applies to batch runs"),
    (["--port", "0", "--logprobs", "1"], "--logprobs applies to batch runs")])
def test_bad_options_are_one_line(chat_model: Path, tmp_path: Path, args: list[str], message: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text(PROMPT + "\n")
    base = ["serve", "--model", str(chat_model), "--device", "cpu"] + \
        ([] if "--port" in args else ["--prompts", str(prompts)])
    assert run([*base, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeplace: error: ") and message in err[0], err


def test_stop_needs_a_tokenizer(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2]}\n{"prompt": [3], "stop": "x"}\n')
    with pytest.raises(MoeplaceError, match=r"p.jsonl:2: \"stop\" is not supported: this model has no tokenizer"):
        read_prompts(str(prompts), None, 100, 64, 4)
    with pytest.raises(MoeplaceError, match=r"^--stop: this model has no tokenizer"):
        read_prompts(str(prompts), None, 100, 64, 4, {"stop": ["x"]})


def test_the_launcher_passes_each_stop_string_and_the_choices() -> None:
    """launch.command_line gives the ranks each --stop string on its own as --stop=TEXT (a string
    that starts with "-" stays a value), and --choices, which torchrun's parser does not take for
    an abbreviation of its own options (as it took --n)."""
    from moeplace.serve import launch
    from moeplace.serve.cli import serve

    ctx = serve.make_context("serve", ["--model", "m", "--prompts", "p.txt", "--stop", "-x", "--stop", "y z", "-n", "3",
                                       "--ignore-eos", "--nproc-per-node", "2"])
    argv = launch.command_line(ctx, "nproc_per_node")
    assert argv == ["--model=m", "--prompts=p.txt", "--ignore-eos", "--choices=3", "--stop=-x", "--stop=y z"]
    assert serve.make_context("serve", argv).params["stop"] == ("-x", "y z")  # the ranks read what was given


def test_two_ranks_give_the_one_rank_records(chat_model: Path, tmp_path: Path, stop: str, full: dict[str, Any]) -> None:
    """--choices, --stop (one string that starts with "-", through the launcher), --logprobs and a
    line overriding them, on 2 gloo ranks with batches of 2 sequences: the records of one rank
    (log-probabilities to float32 summation order), and a routing trace whose sequences are the
    records."""
    lines: list[dict[str, Any]] = [{"prompt": PROMPT}, {"prompt": EOS_PROMPT, "n": 1, "stop": None, "logprobs": None},
                                   {"prompt": PROMPT, "temperature": 0}]
    args = ["--choices", "2", "--stop", "-\x7f", "--stop", stop, "--logprobs", "1", "--temperature", "1.0", "--seed", "7",
            "--max-batch", "2"]
    _, one = batch(chat_model, tmp_path / "p.jsonl", lines, *args)
    out, routing = tmp_path / "two.jsonl", tmp_path / "r.npz"
    proc = subprocess.run([sys.executable, "-m", "moeplace", "serve", "--nproc-per-node", "2", "--device", "cpu",
                           "--model", str(chat_model), "--prompts", str(tmp_path / "p.jsonl"), "--out", str(out),
                           "--routing-out", str(routing), "--max-new-tokens", str(LIMIT), *args],
                          capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batch of 3 prompts, 5 sequences (2 ranks, coherent)" in proc.stderr
    two = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["choice"], r.get("seed")) for r in one] == [(0, 0, 7), (0, 1, 8), (1, 0, 9), (2, 0, None),
                                                                       (2, 1, None)]
    assert "logprobs" not in one[2] and all("logprobs" in r for i, r in enumerate(one) if i != 2)
    # the greedy line's two choices, cut by the second --stop string
    assert [(r["finish_reason"], r["text"]) for r in one[3:]] == [("stop", full["text"][:full["text"].index(stop)])] * 2
    for a, b in zip(one, two, strict=True):
        assert {k: v for k, v in a.items() if k != "logprobs"} == {k: v for k, v in b.items() if k != "logprobs"}
        if "logprobs" in a:
            assert a["logprobs"]["tokens"] == b["logprobs"]["tokens"]
            assert b["logprobs"]["token_logprobs"] == pytest.approx(a["logprobs"]["token_logprobs"], abs=1e-4)
    trace = load_trace(routing)
    assert sorted(set(trace.sequence_ids.tolist())) == list(range(len(two)))
    # the stopped greedy choices ended at the step after their stop string on both ranks: every
    # kept token was fed to a step (the last to the one that ended them), none after (before:
    # LIMIT - 1 tokens each, decoded to the budget)
    for k in (3, 4):
        assert int((trace.sequence_ids == k).sum()) == len(two[k]["token_ids"]) < LIMIT - 1
