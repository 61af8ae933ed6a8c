"""`moeplace serve --port P --routing-out FILE`: the HTTP server records the decode routing of the
traffic it serves and writes it as a trace (periodically and when it stops), the input of
`moeplace solve --from CURRENT.json --max-moves N`. In-process on a one-rank runtime (rank 0's
loop in a thread, as tests/conftest.py's `serving`), plus one launcher run stopped by Ctrl-C."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moeplace.cli import run
from moeplace.models.tiny import build_tiny_model, byte_tokenizer
from moeplace.serve import engine
from moeplace.serve.cli import Terminated, load_tokenizer, writes_routing_on_signals
from moeplace.serve.engine import RoutingLog
from moeplace.serve.generate import Result, Runtime
from moeplace.trace.format import Trace, load_trace
from test_serve_cli import reap, save_placement, stop_launcher, wait_for_server

LIMIT = 8  # the servers' --max-new-tokens
# (prompts, max_tokens) of the requests, sent one after another; batch mode runs the same
# batches from JSONL with --max-batch 2 (the first request's two prompts, then the third alone)
REQUESTS = [(["hi", "mixture"], 6), (["MoE"], 4)]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("live-routing") / "live", num_experts=8, top_k=2,
                            num_layers=3, seed=6)
    byte_tokenizer().save_pretrained(path)  # a request with several prompts sends text
    return path


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> Any:
    return load_tokenizer(str(model))


@pytest.fixture(scope="module")
def rt(model: Path, one_rank_runtime: Callable[[Path], Runtime]) -> Runtime:
    return one_rank_runtime(model)


def complete(port: int, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps({"prompt": prompts, "max_tokens": max_tokens}))
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        return body
    finally:
        conn.close()


def by_sequence(trace: Trace) -> list[dict[str, np.ndarray]]:
    """A trace's tokens per sequence, in sequence-id order (each sorted by position)."""
    assert trace.sequence_ids is not None and trace.positions is not None
    out = []
    for seq in np.unique(trace.sequence_ids):
        sel = np.flatnonzero(trace.sequence_ids == seq)
        sel = sel[np.argsort(trace.positions[sel], kind="stable")]
        out.append({"positions": trace.positions[sel], "topk_ids": trace.topk_ids[sel],
                    "topk_weights": trace.topk_weights[sel] if trace.topk_weights is not None else None,
                    "token_ids": trace.token_ids[sel] if trace.token_ids is not None else None})
    return out


def test_served_routing_is_batch_modes(rt: Runtime, tokenizer: Any, model: Path, tmp_path: Path,
                                       serving: Callable[..., Any],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Two requests over HTTP, then the server stops: the file holds every token a decode step
    ran (each completion's tokens but its last: nothing runs that one through the model), ids
    unique across requests and batches, with the gate weights and token ids, equal to what batch
    mode's --routing-out records for the same prompts; `moeplace solve --from --max-moves` reads it."""
    path = tmp_path / "live.npz"
    answers = []
    with serving(rt, tokenizer, LIMIT, "live", routing=RoutingLog(str(path), rt, every_s=3600)) as port:
        for prompts, max_tokens in REQUESTS:
            answers.append(complete(port, prompts, max_tokens))
        assert not path.exists()  # --routing-every not reached: written when the server stops
    assert f"wrote {path}: decode routing of" in capsys.readouterr().out
    got = load_trace(path)
    completions = [c["token_ids"] for a in answers for c in a["choices"]]
    assert sum(a["usage"]["completion_tokens"] for a in answers) == sum(map(len, completions))
    assert got.num_tokens == sum(len(c) - 1 for c in completions) > 0
    assert got.meta["source"] == "moeplace serve (decode, http)" and got.meta["world"] == 1
    assert got.meta["moe_layers"] == list(rt.model.spec.moe_layers) and got.num_experts == 8
    assert got.sequence_ids is not None
    first = sum(len(c["token_ids"]) - 1 for c in answers[0]["choices"])  # the file lists the batches in order
    ids = [set(got.sequence_ids[:first].tolist()), set(got.sequence_ids[first:].tolist())]
    assert len(ids[0]) == 2 and len(ids[1]) == 1 and not ids[0] & ids[1]  # distinct per request and batch

    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p, "max_tokens": n}) + "\n"
                                    for prompts, n in REQUESTS for p in prompts))
    batch = tmp_path / "batch.npz"
    assert run(["serve", "--model", str(model), "--prompts", str(prompts_file), "--routing-out", str(batch),
                "--max-batch", "2", "--device", "cpu", "--out", str(tmp_path / "out.jsonl")]) == 0
    want = load_trace(batch)
    assert want.topk_weights is not None and want.token_ids is not None  # batch mode records them too now
    seqs, want_seqs = by_sequence(got), by_sequence(want)
    assert len(seqs) == len(want_seqs) == 3
    for seq, want_seq, tokens, prompt in zip(seqs, want_seqs, completions, [p for r in REQUESTS for p in r[0]]):
        start = len(tokenizer.encode(prompt, add_special_tokens=False))
        np.testing.assert_array_equal(seq["positions"], start + np.arange(len(tokens) - 1))
        np.testing.assert_array_equal(seq["token_ids"], tokens[:-1])  # the token each decode step ran
        for key in ("positions", "topk_ids", "token_ids"):
            np.testing.assert_array_equal(seq[key], want_seq[key])
        # two model instances (the fixture's, the batch run's): CPU kernels may round the last
        # float32 bit differently (seen once, 6e-8), so the weights agree to rounding, not bit for bit
        np.testing.assert_allclose(seq["topk_weights"], want_seq["topk_weights"], rtol=1e-6, atol=1e-7)
    w = got.topk_weights
    assert w is not None and (w > 0).all() and (np.diff(w, axis=-1) <= 0).all()  # the router's, highest first

    placement = save_placement(tmp_path / "placement.json", 2, 8, 2)
    capsys.readouterr()
    assert run(["solve", str(path), "--gpus", "2", "--from", str(placement), "--max-moves", "2", "-q",
                "-o", str(tmp_path / "new.json")]) == 0
    assert (tmp_path / "new.json").is_file()


def test_periodic_writes_are_always_loadable(rt: Runtime, tokenizer: Any, tmp_path: Path,
                                             serving: Callable[..., Any]) -> None:
    """--routing-every: the file appears while the server runs and is rewritten as tokens come,
    each version on disk a whole trace (temp file + rename), the last one written on stop."""
    path = tmp_path / "live.npz"
    routing = RoutingLog(str(path), rt, every_s=0.01)
    seen: list[int] = []
    watching = threading.Event()
    problems: list[BaseException] = []

    def watch() -> None:
        while not watching.is_set():
            if path.exists():
                try:
                    seen.append(load_trace(path).num_tokens)
                except BaseException as e:  # a half-written file would land here
                    problems.append(e)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with serving(rt, tokenizer, LIMIT, "live", routing=routing) as port:
            served = 0
            for prompts, max_tokens in REQUESTS * 2:
                answer = complete(port, prompts, max_tokens)
                served += sum(len(c["token_ids"]) - 1 for c in answer["choices"])
                deadline = time.monotonic() + 20
                while routing.written < served and time.monotonic() < deadline:  # the writer thread's
                    time.sleep(0.01)
                assert routing.written == served  # on disk while the server runs
                assert load_trace(path).num_tokens == served
    finally:
        watching.set()
        watcher.join(10)
    assert not problems, problems[0]
    assert len(set(seen)) >= 2 and seen == sorted(seen)  # several versions, each whole, never shrinking
    assert load_trace(path).num_tokens == served
    assert [p.name for p in tmp_path.iterdir()] == ["live.npz"]  # no temp file left behind


def test_max_tokens_caps_the_recording(rt: Runtime, tokenizer: Any, tmp_path: Path, serving: Callable[..., Any],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "live.npz"
    with serving(rt, tokenizer, LIMIT, "live", routing=RoutingLog(str(path), rt, max_tokens=7, every_s=3600)) as port:
        for prompts, max_tokens in REQUESTS:  # 5 + 4 decode tokens, then 3: past the cap
            complete(port, prompts, max_tokens)
        assert rt.record_routing is False  # the last batch ran without gathering any routing
    trace = load_trace(path)
    assert trace.num_tokens == 7
    err = capsys.readouterr().err
    assert err.count("(--routing-max-tokens): recording stops here") == 1, err


def test_bad_routing_out_is_refused_before_weights_load(model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def loaded(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(engine, "load_runtime", loaded)
    (tmp_path / "file").write_text("")
    base = ["serve", "--model", str(model), "--port", "0", "--device", "cpu"]
    cases = [
        (["--routing-out", str(tmp_path / "file" / "r.npz")], f"--routing-out {tmp_path / 'file' / 'r.npz'}: "
         f"{tmp_path / 'file'} is not a directory"),
        (["--routing-out", str(tmp_path)], "is a directory"),
        (["--routing-out", str(model / "r.npz")], "is inside the --model directory"),
        (["--routing-every", "5"], "--routing-every shapes the --routing-out file: give --routing-out FILE"),
        (["--routing-out", "r.npz", "--routing-max-tokens", "0"], "--routing-max-tokens"),
    ]
    for extra, message in cases:
        assert run([*base, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moeplace: error: ") and message in lines[0], lines
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2]}\n')
    assert run(["serve", "--model", str(model), "--prompts", str(prompts), "--routing-every", "5"]) == 2
    assert capsys.readouterr().err.strip() == ("moeplace: error: --routing-every applies to the HTTP server "
                                               "(--port), not to batch runs (--prompts)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "p.jsonl"]


def test_sigterm_unwinds_but_waits_for_the_last_write() -> None:
    """Rank 0's SIGTERM handler while recording: serving, it raises Terminated (serve_forever's
    `finally` then writes); once the loop has ended (`closing`), it lets the write finish and
    raises after it. The handlers before are restored either way."""
    before = signal.getsignal(signal.SIGTERM)
    routing = types.SimpleNamespace(closing=False)
    with pytest.raises(Terminated) as stopped:
        with writes_routing_on_signals(routing):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # (the handler runs before this returns)
    assert stopped.value.signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before
    steps = []
    with pytest.raises(Terminated):
        with writes_routing_on_signals(routing):
            routing.closing = True
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("the write went on")
    assert steps == ["the write went on"] and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("event", ["launcher interrupted", "rank 1 killed"])
def test_a_stopped_launcher_leaves_the_routing(model: Path, tmp_path: Path, event: str) -> None:
    """Production's stops under `--nproc-per-node 2`: Ctrl-C (the agent SIGTERMs the ranks), or a
    rank that dies (rank 0 loses contact, and the agent SIGTERMs it meanwhile). Rank 0 writes
    what it recorded; the launcher's one line and exit code stay as they were without it."""
    path = tmp_path / "live.npz"
    placement = save_placement(tmp_path / "p.json", 2, 8, 2)
    (tmp_path / "tmp").mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "moeplace", "serve", "--nproc-per-node", "2", "--device", "cpu",
                             "--model", str(model), "--placement", str(placement), "--port", "0", "--timeout", "8",
                             "--routing-out", str(path)], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, TMPDIR=str(tmp_path / "tmp"), OMP_NUM_THREADS="1"))
    ranks: list[int] = []
    try:
        port, ranks = wait_for_server(proc)
        answer = complete(port, *REQUESTS[0])
        out, _ = stop_launcher(proc, ranks, event)
        trace = load_trace(path)
        assert trace.num_tokens == sum(len(c["token_ids"]) - 1 for c in answer["choices"])
        assert trace.meta["world"] == 2 and f"wrote {path}" in out
        w = trace.topk_weights  # gathered from both ranks next to the ids
        assert w is not None and (w > 0).all() and (np.diff(w, axis=-1) <= 0).all()
        assert trace.sequence_ids is not None and set(trace.sequence_ids.tolist()) == {0, 1}  # home rank: id % 2
    finally:
        reap(proc, ranks)



def fake_batch(prompt_lengths: list[int], new_tokens: list[int], layers: int, k: int = 2,
               experts: int = 8) -> tuple[engine.Request, Result]:
    """A served batch as run_request returns it with record_routing, without running the model:
    slot s has a prompt of prompt_lengths[s] tokens and generated new_tokens[s], so its decode
    steps ran positions len .. len + n - 2 (the last token is never fed back). The routing rows
    (slot, position, moe, ids...) are sorted as _gather_routing sorts them; the ids are distinct
    in a row and vary with slot, position and layer, the weights decrease along k."""
    rows, weights = [], []
    for slot, (length, n) in enumerate(zip(prompt_lengths, new_tokens)):
        for position in range(length, length + n - 1):
            for moe in range(layers):
                first = (3 * slot + position + moe) % experts
                rows.append([slot, position, moe, *((first + j) % experts for j in range(k))])
                weights.append([(k - j) / (k * (k + 1) / 2) + 0.01 * position for j in range(k)])
    req = engine.Request([[7] * length for length in prompt_lengths], list(new_tokens), record_routing=True)
    tokens = [[100 + 10 * slot + j for j in range(n)] for slot, n in enumerate(new_tokens)]
    return req, Result(tokens=tokens, seconds=0.0, routing=np.array(rows, dtype=np.int64).reshape(-1, 3 + k),
                       routing_weights=np.array(weights, dtype=np.float32).reshape(-1, k))


# (prompt lengths, new tokens) per batch; sequence ids (world 1: one per prompt) 0-1, 2, 3-4, 5,
# 6-8; decode tokens 5, 3, 14 (more than test_keep_last's window of 10 alone), 1, 6: 29
BATCHES = [([2, 3], [3, 4]), ([4], [4]), ([1, 2], [8, 8]), ([5], [2]), ([2, 2, 3], [2, 3, 4])]


def recorded(rt: Runtime, path: Path, batches: list[tuple[list[int], list[int]]], **options: Any) -> RoutingLog:
    """A RoutingLog of `path` (no periodic write) that has added `batches`, then closed; checks
    after each batch that it records on and holds at most max_tokens, in arrays of its own."""
    routing = RoutingLog(str(path), rt, every_s=3600, **options)
    for lengths, new in batches:
        req, result = fake_batch(lengths, new, len(rt.model.spec.moe_layers))
        routing.add(req, result)
        assert routing.recording
        assert routing.tokens == sum(len(c["positions"]) for c in routing.chunks) <= routing.max_tokens
        for chunk in routing.chunks:  # before: `positions` was a view keeping the batch's gathered rows alive
            assert not any(np.shares_memory(a, result.routing) for a in chunk.values())
    routing.close()
    return routing


def test_keep_last_holds_the_most_recent_tokens(rt: Runtime, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """--routing-keep last: recording goes on past --routing-max-tokens; the oldest batches are
    dropped and the oldest one kept is cut at its head, so that the file holds exactly the last
    max_tokens tokens of everything recorded, ids and positions as recorded (the first id is not
    0), with the window in its meta; one note when the window fills. solve and eval read it."""
    recorded(rt, tmp_path / "all.npz", BATCHES, max_tokens=1000)
    everything = load_trace(tmp_path / "all.npz")
    assert everything.num_tokens == 29 and "keep" not in everything.meta and "dropped_tokens" not in everything.meta
    capsys.readouterr()
    path = tmp_path / "live.npz"
    routing = recorded(rt, path, BATCHES, max_tokens=10, keep="last")
    out, err = capsys.readouterr()
    assert err.count(f"--routing-out {path} now keeps the most recent 10 decode tokens (--routing-keep last): "
                     "older batches are dropped") == 1, err
    assert "recording stops here" not in err and f"wrote {path}: decode routing of 10 tokens x" in out
    got = load_trace(path)
    assert got.num_tokens == routing.tokens == 10 and routing.added == 29
    assert {key: got.meta.get(key) for key in ("keep", "routing_max_tokens", "dropped_tokens")} == \
        {"keep": "last", "routing_max_tokens": 10, "dropped_tokens": 19}
    # the last batch whole (sequences 6-8), the one before (5), and the last 3 tokens of the
    # batch before that: its second sequence's last positions (its first, 3, is dropped whole)
    assert got.sequence_ids is not None and got.positions is not None
    assert got.sequence_ids.tolist() == [4, 4, 4, 5, 6, 7, 7, 8, 8, 8]
    assert got.positions.tolist() == [6, 7, 8, 5, 2, 2, 3, 3, 4, 5]
    for key in ("topk_ids", "topk_weights", "token_ids", "sequence_ids", "positions"):
        np.testing.assert_array_equal(getattr(got, key), getattr(everything, key)[-10:])

    placement = save_placement(tmp_path / "placement.json", len(rt.model.spec.moe_layers), 8, 2)
    assert run(["solve", str(path), "--gpus", "2", "--from", str(placement), "--max-moves", "2", "-q",
                "-o", str(tmp_path / "new.json")]) == 0
    capsys.readouterr()
    assert run(["eval", str(tmp_path / "new.json"), str(path), "--baseline", str(placement)]) == 0, \
        capsys.readouterr().err


def test_keep_last_writes_when_the_window_changes(rt: Runtime, tmp_path: Path) -> None:
    """A full window holds as many tokens after a batch as before it, other ones: the periodic
    write goes by the tokens ever added (before: by the count held, so the file stayed stale),
    and writes nothing new when nothing was added."""
    path = tmp_path / "live.npz"
    routing = RoutingLog(str(path), rt, max_tokens=4, every_s=0.0, keep="last")
    layers = len(rt.model.spec.moe_layers)
    for batch, want in ((([2], [5]), 0), (([3], [5]), 1)):  # 4 decode tokens each: sequence 0, then 1
        routing.add(*fake_batch(*batch, layers))
        routing.maybe_write()
        assert routing.writer is not None
        routing.writer.join(20)
        assert routing.tokens == 4 and routing.written == routing.added
        got = load_trace(path)
        assert got.sequence_ids is not None and got.sequence_ids.tolist() == [want] * 4
        assert got.meta["dropped_tokens"] == 4 * want
    writer = routing.writer
    routing.maybe_write()
    assert routing.writer is writer  # nothing added since: no write
    mtime = path.stat().st_mtime_ns
    routing.close()
    assert path.stat().st_mtime_ns == mtime  # the file on disk is already the last version


def test_keep_last_over_http(rt: Runtime, tokenizer: Any, tmp_path: Path, serving: Callable[..., Any],
                             capsys: pytest.CaptureFixture[str]) -> None:
    """The server records every batch once the window is full (before: the batch after the cap
    ran without gathering), and the file holds the last tokens the decode steps ran."""
    path = tmp_path / "live.npz"
    routing = RoutingLog(str(path), rt, max_tokens=4, every_s=3600, keep="last")
    answers = []
    with serving(rt, tokenizer, LIMIT, "live", routing=routing) as port:
        for prompts, max_tokens in REQUESTS:  # 5 + 4 decode tokens, then 3: the window fills in the first
            answers.append(complete(port, prompts, max_tokens))
        assert rt.record_routing is True  # the last batch gathered its routing
    ran = []  # (sequence id, position, token id) of each decode step, in the order the file lists them
    for seq, (choice, prompt) in enumerate(zip([c for a in answers for c in a["choices"]],
                                               [p for r in REQUESTS for p in r[0]])):
        start = len(tokenizer.encode(prompt, add_special_tokens=False))
        ran += [(seq, start + i, t) for i, t in enumerate(choice["token_ids"][:-1])]
    assert len(ran) > 4
    got = load_trace(path)
    assert got.sequence_ids is not None and got.positions is not None and got.token_ids is not None
    assert list(zip(got.sequence_ids.tolist(), got.positions.tolist(), got.token_ids.tolist())) == ran[-4:]
    assert got.meta["keep"] == "last" and got.meta["dropped_tokens"] == len(ran) - 4
    assert capsys.readouterr().err.count("(--routing-keep last): older batches are dropped") == 1


def test_routing_keep_options(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--routing-keep is refused where it would shape nothing (no --routing-out; a batch run),
    as --routing-every is, one line and exit 2 before any weight is read; with --port and
    --routing-out it reaches the server's RoutingLog."""
    import moeplace.serve.httpserver as httpserver

    load = engine.load_runtime
    monkeypatch.setattr(engine, "load_runtime", lambda *args, **kwargs: pytest.fail("weights were loaded"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2]}\n')
    base = ["serve", "--model", str(model), "--device", "cpu"]
    cases = [
        (["--port", "0", "--routing-keep", "last"],
         "--routing-keep shapes the --routing-out file: give --routing-out FILE"),
        (["--port", "0", "--routing-keep", "first"], "--routing-keep shapes the --routing-out file"),
        (["--prompts", str(prompts), "--routing-out", str(tmp_path / "r.npz"), "--routing-keep", "last"],
         "--routing-keep applies to the HTTP server (--port), not to batch runs (--prompts)"),
        (["--port", "0", "--routing-out", str(tmp_path / "r.npz"), "--routing-keep", "newest"],
         "'newest' is not one of 'first', 'last'"),
    ]
    for extra, message in cases:
        assert run([*base, *extra]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moeplace: error: ") and message in lines[0], lines

    monkeypatch.setattr(engine, "load_runtime", load)
    served: list[RoutingLog] = []
    monkeypatch.setattr(httpserver, "serve_forever", lambda *args, routing, **kwargs: served.append(routing))
    assert run([*base, "--port", "0", "--routing-out", str(tmp_path / "live.npz"), "--routing-keep", "last",
                "--routing-max-tokens", "5"]) == 0
    assert [(r.keep, r.max_tokens) for r in served] == [("last", 5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]
