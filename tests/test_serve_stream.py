"""`"stream": true` in `moeplace serve`'s HTTP API: server-sent events over chunked HTTP/1.1 whose
pieces put together are the non-streamed answer (text, token ids, finish_reason, usage), for
completions and chat; the incremental decoder; refusals; clients that leave; failures mid-stream."""

from __future__ import annotations

import http.client
import json
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import moeplace.serve.httpserver as hs
from moeplace.models.tiny import build_tiny_model, byte_tokenizer
from moeplace.serve.generate import Runtime
from moeplace.serve.httpserver import step_hook
from moeplace.serve.openai import BadRequest, Job, parse_chat, parse_completion
from moeplace.serve.sampling import GREEDY, Sampling
from moeplace.serve.text import IncrementalText
from test_serve_chat import MESSAGES, TEMPLATE
from test_serve_cli import exposition
from test_serve_edges import set_eos

LIMIT = 8  # the servers' --max-new-tokens
# greedy answers: the chat prompt's reaches 19, and "hello"'s 1, at their 6th token (a "stop" under LIMIT)
EOS = [1, 19]
TEXT = "<|user|>hi\n<|assistant|>"  # the chat prompt as plain text


def chat_checkpoint(path: Path) -> Path:
    """test_serve_chat's checkpoint (its byte tokenizer with TEMPLATE), with EOS ids `EOS`, at
    `path`: conftest's `chat_model`, built once for the serve tests that share it."""
    path = build_tiny_model("qwen3_moe", path, num_experts=8, top_k=2, num_layers=3, seed=4)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    set_eos(path, EOS)
    return path


@pytest.fixture(scope="module")
def rt(chat_model: Path, one_rank_runtime: Callable[[Path], Runtime]) -> Runtime:
    return one_rank_runtime(chat_model)


@pytest.fixture
def server(rt: Runtime, chat_tokenizer: Any, serving: Callable[..., Any]) -> Iterator[int]:
    with serving(rt, chat_tokenizer, LIMIT, "streamy") as port:
        yield port


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps(body))
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def sse_events(body: str) -> tuple[list[dict[str, Any]], bool]:
    """The events of a server-sent-events body, and whether it ended with `data: [DONE]`."""
    assert body.endswith("\n\n"), body[-200:]
    blocks = body[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    done = blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: "):]) for b in blocks[:len(blocks) - done]], done


def stream(port: int, path: str, body: dict[str, Any],
           conn: http.client.HTTPConnection | None = None) -> tuple[http.client.HTTPResponse, list[dict[str, Any]]]:
    """POST with "stream": true; the response (read) and its events, checked to end with [DONE]."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}))
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        events, done = sse_events(resp.read().decode())  # http.client undoes the chunked encoding
        assert done
        return resp, events
    finally:
        if own:
            conn.close()


def joined_completion(events: list[dict[str, Any]], prompts: int) -> list[dict[str, Any]]:
    """Each choice put together from its chunks, checking their form on the way."""
    first = events[0]
    choices: list[dict[str, Any]] = [{"index": i, "text": "", "token_ids": [], "finish_reason": None, "logprobs": None}
                                     for i in range(prompts)]
    for e in events:
        assert e["id"] == first["id"] and e["created"] == first["created"] and e["id"].startswith("cmpl-")
        assert e["object"] == "text_completion" and e["model"] == "streamy" and e["seed"] == first["seed"]
        (c,) = e["choices"]
        assert set(c) == {"index", "text", "token_ids", "finish_reason", "logprobs"} and c["logprobs"] is None
        choice = choices[c["index"]]
        assert choice["finish_reason"] is None, "a chunk after the choice's finish_reason"
        assert len(c["token_ids"]) == 1  # one chunk per new token
        choice["text"] += c["text"]
        choice["token_ids"] += c["token_ids"]
        choice["finish_reason"] = c["finish_reason"]
    return choices


@pytest.mark.parametrize("body, reason", [
    ({"prompt": TEXT}, "length"),  # its answer splits 2-byte characters over tokens
    ({"prompt": "hello", "max_tokens": LIMIT}, "stop"),  # the EOS token in the text and ids, as unstreamed
    ({"prompt": "Grüße", "max_tokens": 7, "temperature": 1.5, "top_k": 40, "seed": 3}, None),
    ({"prompt": ["hello", "Grüße", TEXT], "max_tokens": 6, "temperature": 0.8, "seed": -7}, None),
    ({"prompt": [5, 6, 7, 200, 9], "max_tokens": 5}, "length"),  # token ids: no text, as the plain answer
], ids=["greedy", "stop", "sampled", "list", "token-ids"])
def test_streamed_completions_put_together_are_the_answer(server: int, body: dict[str, Any],
                                                          reason: str | None) -> None:
    code, want = post(server, "/v1/completions", body)
    assert code == 200 and reason in (None, want["choices"][0]["finish_reason"])
    resp, events = stream(server, "/v1/completions", body)
    assert joined_completion(events, len(want["choices"])) == want["choices"]
    assert events[0]["seed"] == want["seed"] and all("usage" not in e for e in events)
    assert resp.getheader("Content-Type") == "text/event-stream" and resp.getheader("Cache-Control") == "no-cache"
    assert resp.getheader("Transfer-Encoding") == "chunked" and resp.getheader("Content-Length") is None
    if isinstance(body["prompt"], str) and "seed" not in body:  # incomplete characters were held back
        assert "" in [e["choices"][0]["text"] for e in events[:-1]]


def test_chat_stream_put_together_is_the_chat_answer(server: int) -> None:
    reasons = []
    for body in ({"messages": MESSAGES, "max_tokens": LIMIT},  # stops at EOS 19: not in the content
                 {"messages": MESSAGES, "max_completion_tokens": 5},
                 {"messages": MESSAGES, "max_tokens": LIMIT, "temperature": 1.2, "seed": 11}):
        code, want = post(server, "/v1/chat/completions", body)
        assert code == 200
        _, events = stream(server, "/v1/chat/completions", body)
        assert all(e["id"] == events[0]["id"] and e["id"].startswith("chatcmpl-") and e["model"] == "streamy"
                   and e["object"] == "chat.completion.chunk" and e["seed"] == want["seed"] for e in events)
        deltas = [e["choices"][0] for e in events]
        assert all(len(e["choices"]) == 1 and d["index"] == 0 for e, d in zip(events, deltas))
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert deltas[-1]["delta"] == {} and deltas[-1]["finish_reason"] == want["choices"][0]["finish_reason"]
        assert all(d["finish_reason"] is None and set(d["delta"]) == {"content"} for d in deltas[1:-1])
        content = "".join(d["delta"]["content"] for d in deltas[1:-1])
        assert content == want["choices"][0]["message"]["content"]
        reasons.append(deltas[-1]["finish_reason"])
    assert reasons[:2] == ["stop", "length"]  # greedy: both kinds of end


def test_include_usage_adds_the_usage_chunk(server: int) -> None:
    for path, body in (("/v1/completions", {"prompt": ["hello", "Grüße"], "max_tokens": 8}),
                       ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 6})):
        want = post(server, path, body)[1]
        _, events = stream(server, path, {**body, "stream_options": {"include_usage": True}})
        *chunks, last = events
        assert last["choices"] == [] and last["usage"] == want["usage"] and last["id"] == chunks[0]["id"]
        assert all(e["usage"] is None and e["choices"] for e in chunks)  # OpenAI: null but in the last chunk
        _, events = stream(server, path, {**body, "stream_options": {"include_usage": False}})
        assert all("usage" not in e and e["choices"] for e in events)


def test_chunked_framing_on_the_wire_and_keep_alive(server: int) -> None:
    """Raw bytes: hex size, CRLF, data, CRLF per chunk, a zero chunk last; HTTP/1.0 without chunks;
    then one HTTP/1.1 connection serves a stream, a plain request and another stream."""
    body = json.dumps({"prompt": [5, 6, 7], "max_tokens": 6, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while not data.endswith(b"\r\n0\r\n\r\n"):
            got = s.recv(65536)
            assert got, data
            data += got
    head, rest = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"\r\nTransfer-Encoding: chunked" in head
    assert b"Content-Length" not in head
    payload, sizes = b"", []
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line, 16)
        sizes.append(size)
        if size == 0:
            assert rest == b"\r\n"
            break
        payload += rest[:size]
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]
    events, done = sse_events(payload.decode())
    want = post(server, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 6})[1]["choices"][0]["token_ids"]
    assert done and [e["choices"][0]["token_ids"][0] for e in events] == want and len(sizes) >= 2
    # an HTTP/1.0 client knows no chunks: the bare events, ended by closing the connection
    with socket.create_connection(("127.0.0.1", server), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while got := s.recv(65536):
            data += got
    head, rest = data.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    events, done = sse_events(rest.decode())
    assert done and [e["choices"][0]["token_ids"][0] for e in events] == want
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    try:
        _, first = stream(server, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 6}, conn)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6, 7], "max_tokens": 6}))
        plain = conn.getresponse()
        assert plain.status == 200 and plain.getheader("Content-Length") is not None
        assert json.loads(plain.read())["choices"][0]["token_ids"] == [e["choices"][0]["token_ids"][0] for e in first]
        assert len(stream(server, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 6}, conn)[1]) == 6
    finally:
        conn.close()


@pytest.mark.parametrize("body, message", [
    ({"stream_options": {"include_usage": True}}, "\"stream_options\" is only for \"stream\": true"),
    ({"stream": False, "stream_options": {}}, "\"stream_options\" is only for \"stream\": true"),
    ({"stream": True, "stream_options": {"include_usage": True, "chunk_size": 3}},
     "\"stream_options\" is not supported beyond {\"include_usage\": true | false}, got {\"include_usage\": true, "),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "\"stream_options\" is not supported beyond"),
    ({"stream": True, "stream_options": True}, "\"stream_options\" is not supported beyond"),
    ({"stream": "true"}, "\"stream\" must be true or false, got \"true\""),
    ({"stream": 1}, "\"stream\" must be true or false, got 1"),
])
def test_bad_stream_fields_are_a_400(chat_tokenizer: Any, body: dict[str, Any], message: str) -> None:
    for parse in (lambda b: parse_completion(b, chat_tokenizer, 256, 256, LIMIT),
                  lambda b: parse_chat(b, chat_tokenizer, "streamy", 256, 256, LIMIT)):
        with pytest.raises(BadRequest) as e:
            parse(json.dumps({"prompt": "hi", "messages": MESSAGES, **body}).encode())
        assert str(e.value).startswith(message), str(e.value)


def test_stream_fields_accepted(chat_tokenizer: Any, server: int) -> None:
    def job(body: dict[str, Any]) -> Job:
        return parse_completion(json.dumps({"prompt": [1, 2], **body}).encode(), chat_tokenizer, 256, 256, LIMIT)

    assert (job({}).stream, job({}).include_usage) == (False, False)
    assert not job({"stream": False, "stream_options": None}).stream
    assert (job({"stream": True}).stream, job({"stream": True}).include_usage) == (True, False)
    assert job({"stream": True, "stream_options": {"include_usage": True}}).include_usage
    assert not job({"stream": True, "stream_options": {}}).include_usage
    chat = parse_chat(json.dumps({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}})
                      .encode(), chat_tokenizer, "streamy", 256, 256, LIMIT)
    assert chat.stream and chat.include_usage and chat.chat
    # over the wire: a 400 as any refusal, and the server goes on
    code, doc = post(server, "/v1/completions", {"prompt": [1, 2], "stream_options": {"include_usage": True}})
    assert code == 400 and doc["error"]["message"].startswith("\"stream_options\" is only for")
    assert post(server, "/v1/chat/completions", {"messages": MESSAGES, "stream": True,
                                                 "stream_options": {"x": 1}})[0] == 400
    assert len(stream(server, "/v1/completions", {"prompt": [1, 2], "max_tokens": 3})[1]) == 3


def test_incremental_text_holds_back_split_characters() -> None:
    tok = byte_tokenizer()  # id = byte: every character of two or more bytes is split across tokens

    def deltas(ids: list[int]) -> list[str]:
        text = IncrementalText(tok.decode)
        return [text.push(t) for t in ids] + [text.finish()]

    ids = list("aé你🙂b".encode())
    assert deltas(ids) == ["a", "", "é", "", "", "你", "", "", "", "🙂", "b", ""]
    assert deltas(list("é".encode())[:1]) == ["", "\ufffd"]  # cut short: flushed as the whole decodes it
    rng = random.Random(0)  # any bytes, valid or not: the deltas put together are the decoded text
    for _ in range(300):
        ids = [rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100), *"é你🙂".encode()]) for _ in range(20)]
        got = deltas(ids)
        assert "".join(got) == tok.decode(ids), ids
        assert not any(d.endswith("\ufffd") for d in got[:-1]), got  # only the end flushes an incomplete one


def test_incremental_text_decodes_each_token_in_its_context() -> None:
    """A SentencePiece-like decode drops the space of the text's first word: each delta is decoded
    after the token before it, so " world" keeps its space (decoded alone it would not)."""
    pieces = ["▁Hello", "▁world", "!", "▁x"]

    def decode(ids: list[int]) -> str:
        text = "".join(pieces[i] for i in ids).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text

    text = IncrementalText(decode)
    got = [text.push(i) for i in range(4)] + [text.finish()]
    assert got == ["Hello", " world", "!", " x", ""] and "".join(got) == decode([0, 1, 2, 3])
    assert [decode([i]) for i in range(4)] != got[:4]  # decoding tokens alone would lose the spaces


def test_generate_reports_each_step_and_the_router_queues_them(rt: Runtime) -> None:
    prompts = [list("Grüße".encode()), [5, 6, 7], list(b"hello")]
    steps: list[list[tuple[int, int, bool, Any]]] = []
    sampling = [Sampling(1.0, seed=5), GREEDY, GREEDY]
    result = rt.generate(prompts, [LIMIT, 3, LIMIT], on_step=steps.append, sampling=sampling)
    assert result.tokens == rt.generate(prompts, [LIMIT, 3, LIMIT], sampling=sampling).tokens  # the hook: no change
    got: list[list[int]] = [[], [], []]
    for step in steps:
        assert [s for s, _, _, _ in step] == sorted({s for s, _, _, _ in step})
        for slot, token, finished, logprobs in step:
            assert logprobs is None  # none asked for
            assert not got[slot] or got[slot][-1] not in EOS  # no token after a stop
            got[slot].append(token)
            assert finished == (len(got[slot]) == len(result.tokens[slot]))
    assert got == result.tokens and len(got[1]) == 3 and got[2][-1] in EOS and len(got[2]) < LIMIT  # one stopped
    # the hook: slot -> (job, prompt index); every batch gets one (any client may leave)
    plain, streamed = Job([[1]], 4, False), Job([[1], [2]], 4, False, stream=True)
    route = step_hook([plain, streamed], None)
    assert route([(0, 7, False, None), (1, 8, False, None), (2, 9, True, None)]) == []  # nothing to end
    streamed.gone = True  # its client left: its unfinished sequences end, nothing more is queued
    assert route([(0, 9, False, None), (1, 10, False, None), (2, 11, True, None)]) == [1]
    assert plain.events.empty() and [streamed.events.get_nowait() for _ in range(2)] == [(0, 8, False, None),
                                                                                          (1, 9, True, None)]
    assert streamed.events.empty()
    plain.gone = True  # a non-streamed client left too: its unfinished slot ends, nothing is queued
    assert route([(0, 3, False, None)]) == [0] and plain.events.empty()


def test_a_client_that_leaves_mid_stream_leaves_the_server_serving(
        rt: Runtime, chat_tokenizer: Any, serving: Callable[..., Any], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The handler stops writing without a traceback, the abandoned sequence ends at the step
    after the handler noticed (its batch does not decode on to the end), and the next requests
    are answered."""
    left = threading.Event()
    batches: list[list[Job]] = []
    real_run, real_hook = hs.run_request, hs.step_hook

    def hook(batch: list[Job], tokenizer: Any) -> Any:
        batches.append(batch)
        return real_hook(batch, tokenizer)

    def run(rt: Runtime, req: Any, on_step: Any = None) -> Any:
        def step(s: list[tuple[int, int, bool, Any]]) -> Any:
            ended = on_step(s)
            # the client leaves after the first token; the second (text: an event) meets its closed
            # socket, so the handler marks the job gone, which the hook reads at the next step
            left.wait(30) if not left.is_set() else wait_for(lambda: batches[0][0].gone, 10)
            return ended
        return real_run(rt, req, step if on_step is not None and not left.is_set() else on_step)

    monkeypatch.setattr(hs, "run_request", run)
    monkeypatch.setattr(hs, "step_hook", hook)
    # its greedy answer runs to LIMIT, its first tokens ASCII characters: each one an event
    body = json.dumps({"prompt": "The cat", "max_tokens": LIMIT, "stream": True}).encode()
    with serving(rt, chat_tokenizer, LIMIT, "streamy") as port:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                      % (len(body), body))
            data = b""
            while b"data: " not in data:
                data += s.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 ")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        left.set()
        deadline = time.monotonic() + 30
        while not batches[0][0].gone:
            assert time.monotonic() < deadline, "the handler never noticed the client had gone"
            time.sleep(0.05)
        code, want = post(port, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": LIMIT})
        assert code == 200
        _, events = stream(port, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": LIMIT})
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == \
            want["choices"][0]["message"]["content"]
        values: dict[str, str] = {}

        def counted() -> bool:  # a stream can end before its batch is counted: wait for the 3rd
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("GET", "/metrics")
            values.update(exposition(conn.getresponse().read().decode()))
            conn.close()
            return values["moeplace_requests_total"] == "3"
        wait_for(counted, 30)
        abandoned = int(values["moeplace_generated_tokens_total"]) - 2 * want["usage"]["completion_tokens"]
        # its tokens up to the step whose hook saw it gone: the 3rd where the write of the 2nd
        # failed, not the LIMIT its batch would have decoded (before: exactly LIMIT)
        assert 3 <= abandoned < LIMIT, abandoned
        assert values["moeplace_requests_total"] == "3" and values["moeplace_rejected_requests_total"] == "0"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err


def wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    """Poll `condition` until it holds or `timeout_s` has passed (the caller checks it again)."""
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_failure_mid_stream_is_an_error_event_and_before_it_a_503(
        rt: Runtime, chat_tokenizer: Any, serving: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = hs.run_request
    fail_after: list[int] = []

    def run(rt: Runtime, req: Any, on_step: Any = None) -> Any:
        taken = 0

        def step(s: list[tuple[int, int, bool, Any]]) -> None:
            nonlocal taken
            if taken == fail_after[0]:
                raise RuntimeError("rank 1 died")
            taken += 1
            on_step(s)
        return real_run(rt, req, step)

    monkeypatch.setattr(hs, "run_request", run)
    for after in (2, 0):
        fail_after[:] = [after]
        with serving(rt, chat_tokenizer, LIMIT, "streamy") as port:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/completions", json.dumps({"prompt": [5, 6, 7], "max_tokens": 8, "stream": True}))
            resp = conn.getresponse()
            body = resp.read().decode()  # complete chunked framing, or http.client raises IncompleteRead
            conn.close()
        if after == 0:  # nothing sent yet: the plain 503 of a failed request
            assert resp.status == 503 and resp.getheader("Content-Type") == "application/json"
            assert json.loads(body)["error"]["message"] == "runtime failed: rank 1 died"
            continue
        assert resp.status == 200
        events, done = sse_events(body)
        assert not done and [len(e["choices"]) for e in events[:-1]] == [1] * after
        assert events[-1] == {"error": {"message": "runtime failed: rank 1 died", "type": "server_error", "code": 503}}
