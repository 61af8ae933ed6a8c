"""`moeplace serve --port` against clients that break the rules: bodies that are not Unicode, other
methods and protocol errors, chunked and mis-sized bodies, silent and slow clients, bodies over the
limit, request targets in absolute form, null fields, many clients at once, a handler that fails.
Every refusal is OpenAI's JSON error shape with its 4xx code, and the server then answers the next
request exactly as a fresh server does (`reference`: its first answer). Batch prompts files with a
BOM or text that is not Unicode. One server for the module."""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import moeplace.serve.httpserver as hs
from moeplace.errors import MoeplaceError
from moeplace.serve.cli import read_prompts
from moeplace.serve.generate import Runtime
from test_serve_chat import MESSAGES

LIMIT = 8  # the server's --max-new-tokens
GOOD = {"prompt": "hello", "max_tokens": 4}


@pytest.fixture(scope="module")
def port(chat_model: Path, chat_tokenizer: Any, one_rank_runtime: Callable[[Path], Runtime],
         serving: Callable[..., Any]) -> Iterator[int]:
    with serving(one_rank_runtime(chat_model), chat_tokenizer, LIMIT, "audited") as p:
        yield p


@pytest.fixture(scope="module")
def reference(port: int) -> list[int]:
    """GOOD's token ids from the server before any bad request reached it."""
    code, doc = post(port, GOOD)
    assert code == 200
    return doc["choices"][0]["token_ids"]


def post(port: int, body: dict[str, Any], path: str = "/v1/completions") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def exchange(port: int, data: bytes, timeout: float = 20) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(1 << 16):
            out += chunk
    return out


def request(method: str, path: str, body: bytes | None = None, headers: str = "") -> bytes:
    length = f"Content-Length: {len(body)}\r\n" if body is not None else ""
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{length}{headers}\r\n".encode() + (body or b"")


def parse(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:]))
    return int(lines[0].split()[1]), headers, body


def assert_error(raw: bytes, code: int, says: str = "") -> dict[str, str]:
    """An OpenAI-shaped JSON error with HTTP status `code` whose message contains `says`."""
    status, headers, body = parse(raw)
    assert status == code, raw[:300]
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    kind = "invalid_request_error" if code < 500 else "server_error"
    assert error["code"] == code and error["type"] == kind and says in error["message"], error
    return headers


def assert_serves(port: int, reference: list[int]) -> None:
    code, doc = post(port, GOOD)
    assert code == 200 and doc["choices"][0]["token_ids"] == reference


def test_text_that_is_not_unicode_is_a_400(port: int, reference: list[int]) -> None:
    # a lone surrogate is valid JSON but no Unicode text: the tokenizer raised in the handler (a
    # traceback, and the connection dropped without an answer), chat blamed the template
    for path, body in [("/v1/completions", b'{"prompt": "a\\ud800"}'),
                       ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}')]:
        assert_error(exchange(port, request("POST", path, body)), 400, "not valid Unicode")
    assert_serves(port, reference)


def test_other_methods_and_protocol_errors_are_json(port: int, reference: list[int]) -> None:
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):  # were 501 with an HTML page
        headers = assert_error(exchange(port, request(method, "/v1/completions", b"{}")), 405, "takes POST")
        assert headers["allow"] == "POST"
        assert_error(exchange(port, request(method, "/nowhere")), 404, "no route /nowhere")
    headers = assert_error(exchange(port, request("GET", "/v1/completions")), 405)
    assert headers["allow"] == "POST"
    assert parse(exchange(port, request("POST", "/health", b"{}")))[1]["allow"] == "GET, HEAD"
    # HEAD of a GET route: GET's status and headers, no body
    status, headers, body = parse(exchange(port, request("HEAD", "/health")))
    assert status == 200 and int(headers["content-length"]) > 0 and body == b""
    assert_error(exchange(port, request("FROB", "/health")), 501, "FROB")  # a method no one knows
    assert_error(exchange(port, b"NONSENSE\r\n\r\n"), 400)
    assert_error(exchange(port, request("GET", "/" + "a" * 70000)), 414)
    assert_serves(port, reference)


def test_request_target_in_absolute_form(port: int) -> None:
    # RFC 9112 3.2.2: a server must accept it (a client talking to a proxy sends it)
    status, _, body = parse(exchange(port, request("GET", f"http://127.0.0.1:{port}/health?verbose=1")))
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_chunked_request_bodies(port: int, reference: list[int]) -> None:
    body = json.dumps(GOOD).encode()
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (body[:5], body[5:])) + b"0\r\n\r\n"
    # was read as an empty body: "body must be a JSON object"
    status, _, answer = parse(exchange(port, request("POST", "/v1/completions", headers="Transfer-Encoding: chunked\r\n")
                                       + chunked))
    assert status == 200 and json.loads(answer)["choices"][0]["token_ids"] == reference
    te = "Transfer-Encoding: chunked\r\n"
    assert_error(exchange(port, request("POST", "/v1/completions", chunked, te)), 400, "both")  # + Content-Length
    assert_error(exchange(port, request("POST", "/v1/completions", headers="Transfer-Encoding: gzip, chunked\r\n")
                          + chunked), 501, "Transfer-Encoding")
    assert_error(exchange(port, request("POST", "/v1/completions", headers=te) + b"zz\r\n"), 400, "chunk")
    big = b"%x\r\n" % (hs.MAX_BODY + 1)
    assert_error(exchange(port, request("POST", "/v1/completions", headers=te) + big), 413)
    assert_serves(port, reference)


def test_content_length_is_checked(port: int, reference: list[int]) -> None:
    body = json.dumps(GOOD).encode()
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    assert_error(exchange(port, head + b"\r\n" + body), 411, "Content-Length")  # was "body must be a JSON object"
    for bad in (b"-5", b"+%d" % len(body), b"%d_0" % len(body), b"0x10"):  # were 413, or int()'s reading
        assert_error(exchange(port, head + b"Content-Length: " + bad + b"\r\n\r\n" + body), 400, "Content-Length")
    twice = b"Content-Length: %d\r\nContent-Length: 5\r\n\r\n" % len(body)
    assert_error(exchange(port, head + twice + body), 400, "Content-Length")
    assert_serves(port, reference)


def test_silent_and_slow_clients_are_dropped(port: int, reference: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that sends nothing, or less body than it announced, held a handler thread
    for ever; now the socket timeout ends it (408 when a request was under way)."""
    monkeypatch.setattr(hs.Handler, "timeout", 0.3)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        assert_serves(port, reference)  # the others wait on no one
        assert silent.recv(100) == b""  # closed, nothing to answer
        raw = b""
        while chunk := slow.recv(1 << 16):
            raw += chunk
        assert_error(raw, 408, "did not arrive")
    assert_serves(port, reference)


def test_a_body_over_the_limit_is_a_413_not_a_broken_pipe(port: int, reference: list[int]) -> None:
    # urllib sends the whole body before reading: the server closed unread, the client got EPIPE
    code, doc = post(port, {"prompt": "a" * (hs.MAX_BODY + 10)})
    assert code == 413 and doc["error"]["code"] == 413
    # Expect: 100-continue (curl's way for large bodies): refused before the body is sent
    raw = exchange(port, request("POST", "/v1/completions", headers=f"Content-Length: {hs.MAX_BODY + 1}\r\n"
                                 "Expect: 100-continue\r\n"))
    assert b"100 Continue" not in raw
    assert_error(raw, 413)
    # an error closes the connection, and says so: a keep-alive client must not send the next
    # request into it (the header was missing)
    body = json.dumps(GOOD).encode()
    keep_alive = f"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    assert parse(exchange(port, keep_alive))[1]["connection"] == "close"
    assert_serves(port, reference)


def test_null_fields_are_absent_and_n_is_an_integer(port: int, reference: list[int]) -> None:
    # OpenAI's n and max_tokens are nullable: null was a 400 here, while n 1.0 passed
    code, doc = post(port, {**GOOD, "n": None, "max_tokens": None})
    assert code == 200 and doc["choices"][0]["token_ids"] == post(port, {**GOOD, "max_tokens": min(16, LIMIT)})[1][
        "choices"][0]["token_ids"]
    assert doc["choices"][0]["token_ids"][:4] == reference
    for n in (1.0, True, "1", 0, 17):
        code, doc = post(port, {**GOOD, "n": n})
        assert code == 400 and "\"n\"" in doc["error"]["message"]


def test_tool_choice_without_tools_is_refused(port: int) -> None:
    # "tools" is refused, so a tool_choice that demands a call cannot be honoured
    for field, value in (("tool_choice", "required"), ("tool_choice", {"type": "function", "function": {"name": "f"}}),
                         ("function_call", {"name": "f"})):
        code, doc = post(port, {"messages": MESSAGES, "max_tokens": 1, field: value}, "/v1/chat/completions")
        assert code == 400 and field in doc["error"]["message"]
    for value in ("none", "auto", None):
        code, _ = post(port, {"messages": MESSAGES, "max_tokens": 1, "tool_choice": value}, "/v1/chat/completions")
        assert code == 200


def test_the_listen_backlog_holds_many_connections() -> None:
    """Connections queue before the server accepts them (Linux drops the SYN of one that does
    not fit: its connect hangs); 5, socketserver's default, did not hold a burst of clients."""
    srv = hs.make_server("127.0.0.1", 0)
    try:
        clients = [socket.create_connection(srv.server_address, timeout=2) for _ in range(64)]
        for c in clients:
            c.close()
    finally:
        srv.server_close()


def test_a_failing_handler_answers_500_in_one_line(port: int, reference: list[int], monkeypatch: pytest.MonkeyPatch,
                                                   capfd: pytest.CaptureFixture[str]) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(hs, "parse_completion", broken)
    status, _, body = parse(exchange(port, request("POST", "/v1/completions", json.dumps(GOOD).encode())))
    error = json.loads(body)["error"]
    assert status == 500 and error["type"] == "server_error" and "RuntimeError: boom" in error["message"]
    err = capfd.readouterr().err
    assert "Traceback" not in err and "RuntimeError: boom" in err
    monkeypatch.undo()
    assert_serves(port, reference)


def test_the_error_counter_counts_protocol_errors(port: int) -> None:
    before = rejected(port)
    exchange(port, request("PUT", "/health"))
    exchange(port, b"NONSENSE\r\n\r\n")
    assert rejected(port) == before + 2


def rejected(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        line = next(ln for ln in r.read().decode().splitlines() if ln.startswith("moeplace_rejected_requests_total "))
    return int(line.split()[1])


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_a_prompts_file_with_a_bom(tmp_path: Path, chat_tokenizer: Any, suffix: str) -> None:
    """Editors on Windows start UTF-8 files with a BOM: it broke JSONL's first line and became a
    character of a text file's first prompt."""
    line = json.dumps({"prompt": "hi there"}) if suffix == ".jsonl" else "hi there"
    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_text(line + "\n", encoding="utf-8")
    bom.write_text(line + "\n", encoding="utf-8-sig")
    assert [p[1] for p in read_prompts(str(bom), chat_tokenizer, 256, 256, 4)] == \
        [p[1] for p in read_prompts(str(plain), chat_tokenizer, 256, 256, 4)] == [list(b"hi there")]


def test_a_prompts_line_that_is_not_unicode(tmp_path: Path, chat_tokenizer: Any) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine"}\n{"prompt": "x\\ud800"}\n')  # was an internal error (exit 3)
    with pytest.raises(MoeplaceError, match=r"p.jsonl:2: .*not valid Unicode"):
        read_prompts(str(path), chat_tokenizer, 256, 256, 4)


def test_concurrent_bad_and_good_requests(port: int, reference: list[int]) -> None:
    """Refusals and answers interleaved from 16 clients at once (more than socketserver's listen
    backlog of 5, which reset some of them): every answer is the fresh server's."""
    bad = [request("POST", "/v1/completions", b'{"prompt": "\\ud800"}'), request("PUT", "/health"),
           request("POST", "/v1/completions", b"{not json"), b"NONSENSE\r\n\r\n"]
    results: list[bool] = []

    def client(i: int) -> None:
        if i % 2:
            results.append(parse(exchange(port, bad[i // 2 % len(bad)]))[0] >= 400)
        else:
            code, doc = post(port, GOOD)
            results.append(code == 200 and doc["choices"][0]["token_ids"] == reference)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 16 and all(results)
