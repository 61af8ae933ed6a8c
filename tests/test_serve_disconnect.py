"""`moeplace serve --port` notices clients that leave before their answer: a non-streamed request
whose client closed its connection ends at the batch's next decode step instead of decoding to
max_tokens, while the other requests of its batch get the answer they get alone; a request whose
client left while it was still queued (streamed or not) takes no slot in the batch; a kept-alive
client that pipelines its next request is not taken for gone. Decodes ignore EOS here (as
test_serve_early_end's), so that only an early end can cut them short; the batches are formed
and held at their first step by wrappers of next_batch and run_request, not by sleeps."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import moeplace.serve.httpserver as hs
from moeplace.serve.generate import Result, Runtime
from moeplace.serve.openai import Job
from test_serve_cli import exposition
from test_serve_http_audit import parse
from test_serve_stream import post, wait_for

LIMIT = 64  # the server's --max-new-tokens: what a request that is not ended early decodes
LEAVER = [5, 6, 7]  # the prompt of the request whose client leaves
STAYER = [9, 10, 11, 12]  # the prompt of the one that stays
STAYS = {"prompt": STAYER, "max_tokens": 12}
WAIT_S = 10.0  # how long a wrapper waits for what the server should do (the fix does it in < 1 s)


@pytest.fixture(scope="module")
def rt(chat_model: Path, one_rank_runtime: Callable[[Path], Runtime]) -> Runtime:
    return one_rank_runtime(chat_model)


class Batches:
    """Wraps the server loop's next_batch and run_request: the next batch forms once `gate` holds
    for the jobs pending (waiting or queued); its decode ignores EOS; `at_first_step(batch)` runs
    on rank 0's main thread at its first decode step, before the server's own hook. Keeps each
    batch and its Result."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list[Job]] = []
        self.results: list[Result] = []
        self.gate: Callable[[list[Job]], bool] = lambda pending: True
        self.at_first_step: Callable[[list[Job]], None] = lambda batch: None
        real_next, real_run = hs.next_batch, hs.run_request

        def next_batch(waiting: list[Job], jobs: Any, max_batch: int) -> list[Job]:
            def pending() -> list[Job]:
                with jobs.mutex:
                    return waiting + list(jobs.queue)
            wait_for(lambda: self.gate(pending()), WAIT_S)
            batch = real_next(waiting, jobs, max_batch)
            self.batches.append(batch)
            return batch

        def run(rt: Runtime, req: Any, on_step: Any = None) -> Result:
            batch, first = self.batches[-1], [True]

            def step(s: list[tuple[int, int, bool, Any]]) -> Any:
                if first:
                    first.clear()
                    self.at_first_step(batch)
                return on_step(s) if on_step is not None else None
            result = real_run(rt, dataclasses.replace(req, ignore_eos=True), step)
            self.results.append(result)
            return result

        monkeypatch.setattr(hs, "next_batch", next_batch)
        monkeypatch.setattr(hs, "run_request", run)

    def tokens(self, prompt: list[int]) -> list[list[int]]:
        """The tokens decoded for `prompt` in each batch that had it."""
        found = []
        for batch, result in zip(self.batches, self.results):
            slots = [p for job in batch for p in job.prompts]
            found += [result.tokens[i] for i, p in enumerate(slots) if p == prompt]
        return found


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Batches:
    return Batches(monkeypatch)


@pytest.fixture
def server(rt: Runtime, chat_tokenizer: Any, serving: Callable[..., Any], batches: Batches) -> Iterator[int]:
    with serving(rt, chat_tokenizer, LIMIT, "leavers") as port:
        yield port


def send(port: int, body: dict[str, Any], sock: socket.socket | None = None) -> socket.socket:
    """POST `body` to /v1/completions on a raw connection (a new one unless `sock`), reading nothing."""
    data = json.dumps(body).encode()
    s = sock or socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def leave(s: socket.socket, how: str) -> None:
    """Close the client's side: an orderly close (FIN) or a reset (RST, SO_LINGER 0)."""
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def metrics(port: int) -> dict[str, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        return exposition(conn.getresponse().read().decode())
    finally:
        conn.close()


def counted(port: int, requests: int) -> dict[str, str]:
    """/metrics once `requests` requests are counted (a batch is counted after its answers go out)."""
    values: dict[str, str] = {}
    wait_for(lambda: values.update(metrics(port)) or values["moeplace_requests_total"] == str(requests), WAIT_S)
    return values


def answer(doc: dict[str, Any]) -> list[Any]:
    """What a completion answers, without its id and time."""
    return [doc["choices"], doc["usage"]]


@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_non_streamed_request_whose_client_left_ends_at_the_next_step(
        server: int, batches: Batches, how: str) -> None:
    """Before: its sequence decoded on to its max_tokens (64), holding its batch that long."""
    code, alone = post(server, "/v1/completions", STAYS)
    assert code == 200
    batches.gate = lambda pending: len(pending) == 2  # the leaver and the stayer in one batch
    # held at its first step until the leaver's handler has noticed (the step after it ends it)
    batches.at_first_step = lambda batch: wait_for(lambda: any(j.gone for j in batch), WAIT_S)
    with ThreadPoolExecutor(1) as pool:
        stays = pool.submit(post, server, "/v1/completions", STAYS)
        s = send(server, {"prompt": LEAVER, "max_tokens": LIMIT})
        wait_for(lambda: len(batches.batches) == 2, WAIT_S)  # its batch formed: the client leaves
        leave(s, how)
        code, together = stays.result(60)
    assert [len(j.prompts) for j in batches.batches[1]] == [1, 1]
    assert code == 200 and answer(together) == answer(alone)  # the stayer: its answer alone
    # the leaver: its first token, then the step that saw it gone ends it (not its 64)
    assert [len(t) for t in batches.tokens(LEAVER)] == [1]
    assert len(batches.tokens(STAYER)[1]) == STAYS["max_tokens"]
    values = counted(server, 3)
    assert values["moeplace_abandoned_requests_total"] == "1" and values["moeplace_rejected_requests_total"] == "0"
    assert values["moeplace_generated_tokens_total"] == str(2 * STAYS["max_tokens"] + 1)


@pytest.mark.parametrize("stream", [False, True])
def test_a_queued_request_whose_client_left_takes_no_slot(server: int, batches: Batches, stream: bool) -> None:
    """Before: it was batched and decoded (to max_tokens) with nobody to answer."""
    # the next batch forms once both are queued and the leaver's handler has noticed
    batches.gate = lambda pending: len(pending) == 2 and any(j.gone for j in pending)
    s = send(server, {"prompt": LEAVER, "max_tokens": LIMIT, "stream": stream})
    leave(s, "close")
    code, doc = post(server, "/v1/completions", STAYS)
    assert code == 200 and len(doc["choices"]) == 1
    assert [[j.prompts for j in b] for b in batches.batches] == [[[STAYER]]]  # the leaver: no slot
    assert batches.tokens(LEAVER) == [] and len(batches.tokens(STAYER)[0]) == STAYS["max_tokens"]
    values = counted(server, 1)  # the one that ran
    assert values["moeplace_abandoned_requests_total"] == "1" and values["moeplace_rejected_requests_total"] == "0"


def test_a_kept_alive_client_that_pipelines_its_next_request_is_not_gone(
        server: int, batches: Batches, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next request's bytes make its connection readable while the first waits: not an end."""
    checks: list[bool] = []  # client_left's answers
    readable: list[bool] = []  # whether the connection had bytes to read at each
    real = hs.client_left

    def spy(conn: socket.socket, watch: Any) -> bool:
        readable.append(bool(watch.select(0)))
        checks.append(real(conn, watch))
        return checks[-1]

    monkeypatch.setattr(hs, "client_left", spy)
    started = threading.Event()

    def hold(batch: list[Job]) -> None:  # the first batch waits for two checks that saw the second request
        if not started.is_set():
            started.set()
            wait_for(lambda: sum(readable) >= 2, WAIT_S)

    batches.at_first_step = hold
    first, second = {"prompt": LEAVER, "max_tokens": 8}, {"prompt": STAYER, "max_tokens": 6}
    with socket.create_connection(("127.0.0.1", server), timeout=60) as s:
        send(server, first, s)
        assert started.wait(WAIT_S)
        send(server, second, s)  # pipelined: before the first answer, on the same connection
        replies = read_responses(s, 2)
    # the first request's handler saw the second's bytes (nothing else was there to read), left
    # them there, and took its client for present, as every check did
    assert sum(readable) >= 2 and checks and not any(checks)
    assert [status for status, _ in replies] == [200, 200]
    decoded = batches.tokens(LEAVER) + batches.tokens(STAYER)
    assert [len(t) for t in decoded] == [8, 6]  # both decoded to the end
    for (_, reply), tokens in zip(replies, decoded, strict=True):  # (the answer ends at an EOS, if any)
        ids = reply["choices"][0]["token_ids"]
        assert ids and ids == tokens[:len(ids)]
    assert metrics(server)["moeplace_abandoned_requests_total"] == "0"


def read_responses(s: socket.socket, count: int) -> list[tuple[int, dict[str, Any]]]:
    """`count` responses (Content-Length bodies) read off one connection."""
    data = b""
    out: list[tuple[int, dict[str, Any]]] = []
    while len(out) < count:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            status, headers, _ = parse(head + sep)
            size = int(headers["content-length"])
            if len(rest) >= size:
                out.append((status, json.loads(rest[:size])))
                data = rest[size:]
                continue
        chunk = s.recv(1 << 16)
        assert chunk, f"the server closed the connection after {len(out)} responses"
        data += chunk
    return out


def test_a_stream_that_has_nothing_to_write_still_notices_its_client_leave(
        server: int, batches: Batches, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens that add no text (a character's first bytes, a stop string's held-back start) give a
    stream nothing to write, so no failed write tells that its client left. Before: its handler
    waited for the next token, unaware, and the sequence decoded on to its max_tokens."""
    monkeypatch.setattr(hs.StreamChunks, "token", lambda self, *item: [])  # no token adds text
    real_hook = hs.step_hook

    def step_hook(batch: list[Job], tokenizer: Any) -> Any:
        hook, steps = real_hook(batch, tokenizer), [0]

        def held(step: list[tuple[int, int, bool, Any]]) -> Any:
            steps[0] += 1
            if steps[0] == 2:  # the first token went to the handler at step 1: the client has its headers
                wait_for(lambda: all(j.gone for j in batch), WAIT_S)
            return hook(step)
        return held

    monkeypatch.setattr(hs, "step_hook", step_hook)
    s = send(server, {"prompt": LEAVER, "max_tokens": LIMIT, "stream": True})
    head = b""
    while b"\r\n\r\n" not in head:  # the status line and headers came with its first token
        chunk = s.recv(1 << 16)
        assert chunk, "the server closed the stream before its headers"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200")
    leave(s, "close")
    values = counted(server, 1)
    # its first two tokens (the second step's hook saw it gone and ended it there), not 64
    assert [len(t) for t in batches.tokens(LEAVER)] == [2]
    assert values["moeplace_abandoned_requests_total"] == "1" and values["moeplace_rejected_requests_total"] == "0"
