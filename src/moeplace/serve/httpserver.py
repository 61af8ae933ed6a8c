"""Rank 0's HTTP front end (stdlib): the server, its handler threads and the loop that runs their
requests. What a request may say and what it is answered: moeplace.serve.openai.

Handler threads only validate (openai.parse_completion, parse_chat) and enqueue; rank 0's main
thread (`serve_forever`) drains the queue in batches, broadcasts each batch to the other ranks
and runs it, so the expert-parallel collectives stay on one thread; a streamed request's handler
reads its tokens from a queue of its own, which the main thread fills after each decode step
(Runtime.generate's on_step, `step_hook`, which also ends early the sequences whose stop string
is complete or whose client has gone: docs/runtime.md, "Stop strings and `n`"). While
idle it sends heartbeats: a dead rank surfaces within the timeout even with no traffic, and the
server then exits with that error instead of hanging; it also stops when its launcher has gone
(dist.tie_to_launcher). On the way out every request not yet answered (running, queued, or
arriving) gets a 503 with the reason. With --routing-out, the loop also keeps each batch's decode
routing (engine.RoutingLog) and writes it periodically and on the way out (docs/runtime.md,
"Recording live routing").

    POST /v1/completions, POST /v1/chat/completions: OpenAI's (moeplace.serve.openai).
                          "stream": true: its server-sent events over chunked HTTP/1.1 (an
                          HTTP/1.0 client, which knows no chunks, gets the bare events and the end
                          of the connection). A failure before the first token is the usual 503;
                          after it (status 200 sent), a `data: {"error": ...}` event ends the
                          stream without [DONE]. A client that leaves mid-stream is dropped
                          quietly; its sequences end at the batch's next step after the handler
                          notices (`gone`). A client that closes its connection while it waits
                          (non-streamed, or before its first token) is noticed within
                          GONE_POLL_S (`client_left`): the same early end, or, still queued, no
                          slot in a batch (`next_batch`); nothing is written to it.
    GET  /v1/models       OpenAI list format: the one served model (the checkpoint's directory name)
    GET  /health          {"status": "ok", "world": N, "mode": ..., "placement": path as given or
                          "contiguous (no --placement)", "placement_sha256": 12 hex digits or null,
                          "nodes": the nodes the ranks run on (with --placement: the topology check)}
    GET  /metrics         Prometheus text (metrics.metrics_text: tokens/s, Alltoall bytes,
                          per-layer cross-rank tokens, each rank's expert load; moeplace_info
                          names mode, world and placement)
Unknown path: 404; a route with the wrong method (PUT, DELETE, PATCH, OPTIONS too): 405 and an Allow
header; HEAD of a GET route: its headers. Bodies: Content-Length (digits only) or chunked, at most
MAX_BODY bytes (413; a refused body is still read, up to MAX_DRAIN, so the client gets the answer
rather than a broken pipe); no length: 411. A client silent for CLIENT_TIMEOUT_S is dropped (408
when a body was under way). Protocol errors too are OpenAI-shaped JSON.
"""

from __future__ import annotations

import json
import os
import queue
import re
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from moeplace.errors import MoeplaceError
from moeplace.serve.dist import error_text, launcher_pid
from moeplace.serve.engine import GENERATE, NOOP, Request, RoutingLog, merged_counters, run_request, send_command
from moeplace.serve.generate import Runtime, StepCallback, TokenLogprobs
from moeplace.serve.metrics import Stats, metrics_text
from moeplace.serve.openai import (
    BadRequest,
    Job,
    StreamChunks,
    StreamItem,
    chat_response,
    completion_response,
    parse_chat,
    parse_completion,
    prompt_sampling,
)
from moeplace.serve.text import StopWatch

MAX_BODY = 1 << 20  # bytes
# a body over MAX_BODY is still read (and dropped) up to this size before the connection closes:
# a client that sends it all before reading (urllib, requests) gets the 413, not a broken pipe
MAX_DRAIN = 16 * MAX_BODY
# seconds a client may stay silent (before its request, inside it, or not reading a stream):
# then its connection is dropped, so a stalled client cannot hold a handler thread for ever
CLIENT_TIMEOUT_S = 60.0
# connections waiting to be accepted: socketserver's 5 reset a burst of a dozen clients
LISTEN_BACKLOG = 1024
# seconds between two looks at a waiting client's connection (client_left): the most a departed
# client's sequences decode on before rank 0 can end them (a few decode steps of a real model),
# against one wake-up and one poll per waiting request per slice on rank 0's interpreter, whose
# main thread drives the decode
GONE_POLL_S = 0.25
ROUTES = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET",
          "/metrics": "GET"}


class ClientError(Exception):
    """A request the HTTP layer refuses (its body's framing or size): answered with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Handler(BaseHTTPRequestHandler):
    """Validates and enqueues; never touches the runtime (rank 0's main thread does)."""

    protocol_version = "HTTP/1.1"
    server: "Server"
    chunked = True  # a stream's body in chunks (HTTP/1.1 clients)
    timeout = CLIENT_TIMEOUT_S  # the connection's socket timeout (StreamRequestHandler.setup)
    body_pending = False  # the request's body is not read yet: _send reads and drops it after the answer

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: no per-request stderr lines
        pass

    def parse_request(self) -> bool:
        self.body_pending = False  # (a refused Expect: 100-continue has no body coming)
        if not super().parse_request():
            return False
        self.body_pending = self.headers.get("Content-Length", "0").strip() not in ("", "0") or \
            "Transfer-Encoding" in self.headers
        return True

    def handle_expect_100(self) -> bool:
        """Refuse a body over the limit before the client sends it (curl asks first for large ones)."""
        try:
            length = self._content_length()
        except ClientError:
            length = None  # the request is refused with the reason once it is read
        if length is not None and length > MAX_BODY:
            self._error(413, f"body larger than {MAX_BODY} bytes")
            return False
        return super().handle_expect_100()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals (a malformed request line or headers, an unknown method, a
        URI too long) in the JSON shape of every other error, not an HTML page."""
        if self.request_version == "HTTP/0.9":  # a request line it could not read: answer with a status line
            self.request_version = "HTTP/1.0"
        self._error(code, message or self.responses.get(code, ("error",))[0])

    def _send(self, code: int, body: str, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:  # say so: a keep-alive client would send its next request into the void
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        except OSError:  # the client left or stalled: nobody to answer
            self.close_connection = True
            return
        if self.body_pending:  # answered without reading it (404, 413, ...): read it now
            self._drain()

    def _error(self, code: int, msg: str, headers: dict[str, str] | None = None) -> None:
        self.server.stats.reject()
        self.close_connection = True  # the body may be unread: it must not parse as the next request
        kind = "invalid_request_error" if code < 500 else "server_error"
        self._send(code, json.dumps({"error": {"message": msg, "type": kind, "code": code}}), headers=headers)

    def _path(self) -> str:
        """The request target's path: without the query, also in absolute form (http://host/path,
        which RFC 9112 has servers accept)."""
        if self.path.startswith("/"):
            return self.path.split("?", 1)[0]
        return urlsplit(self.path).path or "/"

    def _route(self, method: str) -> str | None:
        """The request's path when `method` serves it (HEAD: a GET route); else answers 404 or 405
        and returns None."""
        path = self._path()
        allowed = ROUTES.get(path)
        if allowed is None:
            routes = ", ".join(f"{method} {route}" for route, method in ROUTES.items())
            self._error(404, f"no route {path} (routes: {routes})")
        elif allowed != method and not (method == "HEAD" and allowed == "GET"):
            self._error(405, f"{path} takes {allowed}", {"Allow": "GET, HEAD" if allowed == "GET" else allowed})
        else:
            return path
        return None

    def _content_length(self) -> int | None:
        """The Content-Length, None without one; ClientError(400) unless plain digits, or given
        twice with two values (int() reads "+36", " 36" and "3_6" too)."""
        values = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not values:
            return None
        if len(values) > 1:
            raise ClientError(400, f"conflicting Content-Length headers ({', '.join(sorted(values))})")
        value = values.pop()
        if not re.fullmatch(r"[0-9]{1,20}", value):
            raise ClientError(400, f"bad Content-Length {value[:40]!r}: send the body's size in bytes")
        return int(value)

    def _body(self) -> bytes:
        """The request body, Content-Length or chunked, checked against MAX_BODY (ClientError)."""
        encoding = ",".join(self.headers.get_all("Transfer-Encoding") or []).strip().lower()
        length = self._content_length()
        if encoding and length is not None:  # RFC 9112 6.3: a request smuggling risk; refuse
            raise ClientError(400, "both Transfer-Encoding and Content-Length: send one")
        if encoding:
            if encoding != "chunked":
                raise ClientError(501, f"Transfer-Encoding {encoding[:40]!r} is not supported: send the body "
                                       "as is (Content-Length) or chunked")
            self.body_pending = False  # a broken chunked body cannot be skipped: the connection closes
            return self._read_chunked()
        if length is None:
            raise ClientError(411, "no Content-Length: send the JSON body with its size (or chunked)")
        if length > MAX_BODY:
            raise ClientError(413, f"body larger than {MAX_BODY} bytes")
        self.body_pending = False
        body = self.rfile.read(length)
        if len(body) < length:
            raise ClientError(400, f"the body ended after {len(body)} of its {length} bytes (Content-Length)")
        return body

    def _read_chunked(self) -> bytes:
        """A chunked body (RFC 9112 7.1): hex sizes (extensions ignored), data, trailers."""
        body = bytearray()
        while True:
            line = self.rfile.readline(1024)
            size = line.split(b";", 1)[0].strip()
            if not line.endswith(b"\n") or not re.fullmatch(rb"[0-9a-fA-F]{1,16}", size):
                raise ClientError(400, f"bad chunk size line {line[:40]!r} in the chunked body")
            n = int(size, 16)
            if n == 0:
                break
            if len(body) + n > MAX_BODY:
                raise ClientError(413, f"body larger than {MAX_BODY} bytes")
            chunk = self.rfile.read(n)
            if len(chunk) < n or self.rfile.readline(3).strip():
                raise ClientError(400, "a chunk of the chunked body is cut short or longer than its size")
            body += chunk
        for _ in range(100):  # trailer fields, up to the blank line
            if self.rfile.readline(8192).strip() == b"":
                return bytes(body)
        raise ClientError(400, "too many trailer fields after the chunked body")

    def _drain(self) -> None:
        """Read and drop the body of a request answered without it: a client that sends it all
        before reading (urllib, requests) then gets the answer, not a broken pipe, and the next
        request on the connection starts where it should. Beyond MAX_DRAIN, or chunked, the
        connection just closes."""
        self.body_pending = False
        try:
            left = self._content_length()
        except ClientError:
            return
        if left is None or left > MAX_DRAIN or "Transfer-Encoding" in self.headers:
            self.close_connection = True
            return
        try:
            while left > 0 and (n := len(self.rfile.read(min(left, 1 << 16)))):
                left -= n
        except OSError:
            self.close_connection = True

    def do_GET(self) -> None:
        srv = self.server
        path = self._route(self.command)  # GET or HEAD
        if path == "/health":
            self._send(200, json.dumps({"status": "ok", "world": srv.world, "mode": srv.mode, **srv.placement}))
        elif path == "/metrics":
            self._send(200, metrics_text(srv.stats.snapshot(), srv.mode, srv.world, srv.placement),
                       "text/plain; version=0.0.4")
        elif path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [
                {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "moeplace"}]}))

    do_HEAD = do_GET  # the same status and headers; _send leaves out the body

    def _no_such_method(self) -> None:
        """A method no route takes: 404 for an unknown path, else 405 naming the route's."""
        self._route(self.command)

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _no_such_method

    def do_POST(self) -> None:
        srv = self.server
        path = self._route("POST")
        if path is None:
            return
        if srv.closing is not None:  # also checked where the job is queued (`submit`): this saves the parse
            return self._error(503, srv.closing)
        spec = srv.spec
        try:
            body = self._body()
            if path == "/v1/chat/completions":
                job = parse_chat(body, srv.tokenizer, srv.model_name, spec.vocab_size, spec.max_positions,
                                 srv.max_tokens_limit, srv.max_batch)
            else:
                job = parse_completion(body, srv.tokenizer, spec.vocab_size, spec.max_positions,
                                       srv.max_tokens_limit, srv.max_batch)
        except BadRequest as e:
            return self._error(400, str(e))
        except ClientError as e:
            return self._error(e.code, str(e))
        except TimeoutError:
            return self._error(408, f"the request body did not arrive within {self.timeout:g} s")
        except OSError:  # the client left mid-body: nobody to answer
            self.close_connection = True
            return
        except Exception as e:  # a bug (or a tokenizer's surprise): a 500 and one line, not a dropped connection
            first = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
            print(f"moeplace serve: warning: internal error reading a request to {path}: {type(e).__name__}: "
                  f"{first}", file=sys.stderr, flush=True)
            return self._error(500, f"internal error ({type(e).__name__}: {first})")
        if not srv.submit(job):
            return self._error(503, srv.closing or "the server is shutting down")
        try:
            self._answer(job)
        finally:
            srv.answered()

    def _answer(self, job: Job) -> None:
        srv, spec = self.server, self.server.spec
        if job.stream:
            return self._stream(job)
        if not self._wait_watching(job, job.done.wait):
            return
        if job.error or job.result is None:
            return self._error(503, job.error or "generation failed")
        respond = chat_response if job.chat else completion_response
        self._send(200, json.dumps(respond(job, srv.tokenizer, srv.model_name, spec.eos_token_ids)))

    def _stream(self, job: Job) -> None:
        """Write a streamed job's events as its tokens come, in chunked transfer encoding (no
        Content-Length, so the connection stays usable; an HTTP/1.0 client, which knows no
        chunks, gets the bare events and the end of the connection). Until its first token a
        failure is the usual 503; after it, an error event that ends the stream (status 200 sent)."""
        srv = self.server
        items: list[StreamItem] = []

        def arrived(timeout: float) -> bool:  # its next token (or its end) has come
            try:
                items.append(job.events.get(timeout=timeout))
            except queue.Empty:
                return False
            return True
        # before its first token nothing is written that could fail: the client may have left
        # while it was queued or in prefill (after it, a failed write or client_left notices)
        if not self._wait_watching(job, arrived):
            return
        if items[0] is None and job.result is None:
            return self._error(503, job.error or "generation failed")
        chunks = StreamChunks(job, srv.tokenizer, srv.model_name, srv.spec.eos_token_ids)
        self.chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if self.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
        watch = selectors.DefaultSelector()  # (poll or epoll: any descriptor number, unlike select())
        try:
            watch.register(self.connection, selectors.EVENT_READ)
            self.end_headers()
            events = chunks.start()
            while True:
                while True:  # what has come meanwhile goes out in one chunk
                    try:
                        items.append(job.events.get_nowait())
                    except queue.Empty:
                        break
                ended = None in items
                for item in items[:items.index(None)] if ended else items:
                    assert item is not None
                    events += chunks.token(*item)
                if ended or chunks.done:
                    break
                # a failed write tells that the client left; a round with nothing to write (tokens
                # that add no text yet, held back for a stop string) and a wait for the next token
                # look at the connection instead (client_left), as a non-streamed wait does
                if events:
                    self._write_chunk(sse(events))
                elif client_left(self.connection, watch):
                    return self._left(job)
                events, items = [], []
                if not self._wait_watching(job, arrived, watch):
                    return
            # every choice has ended (stop strings can end them all before their batch does), or
            # the job finished without an error
            if chunks.done or (job.error is None and job.result is not None):
                job.gone = True  # what the batch still decodes for it need not be queued: step_hook ends it
                self._write_chunk(sse(events + chunks.end()) + b"data: [DONE]\n\n")
            else:  # failed mid-stream (a rank died, the server is closing): say so, no [DONE]
                srv.stats.reject()
                self.close_connection = True
                error = {"message": job.error or "generation failed", "type": "server_error", "code": 503}
                self._write_chunk(sse(events + [{"error": error}]))
            if self.chunked:
                self.wfile.write(b"0\r\n\r\n")  # the last chunk
        except OSError:  # the client left, or stopped reading (CLIENT_TIMEOUT_S): stop writing
            self._left(job)
        finally:
            watch.close()

    def _wait_watching(self, job: Job, came: Callable[[float], bool],
                       watch: selectors.BaseSelector | None = None) -> bool:
        """Wait for what `came(timeout)` waits for (True once it has come), looking between slices of
        GONE_POLL_S whether the client has closed its connection (`client_left`, on `watch`, the
        connection's selector, or one of its own): if so, `_left` and return False. A quick answer
        never registers a watch of its own."""
        if came(GONE_POLL_S):
            return True
        own = watch is None
        if watch is None:
            watch = selectors.DefaultSelector()  # (poll or epoll: any descriptor number, unlike select())
            watch.register(self.connection, selectors.EVENT_READ)
        try:
            while not came(GONE_POLL_S):
                if client_left(self.connection, watch):
                    self._left(job)
                    return False
        finally:
            if own:
                watch.close()
        return True

    def _left(self, job: Job) -> None:
        """The client has gone: mark the job `gone` (rank 0 drops it from the queue, or step_hook
        ends its sequences at the batch's next step), drop the connection without writing more,
        and count it abandoned."""
        job.gone = True
        self.close_connection = True
        self.server.stats.abandon()

    def _write_chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)


def client_left(conn: socket.socket, watch: selectors.BaseSelector) -> bool:
    """Whether the client has closed its side of `conn` (registered in `watch` for reading): the
    connection is readable and a peek finds its end (b""), or it was reset. Readable with bytes (a
    kept-alive client's pipelined next request) is not gone; nothing is consumed. A client that
    only shuts down its sending side (SHUT_WR) and still reads looks gone too (docs/runtime.md,
    "Streaming"). One poll per call, and a peek only when readable."""
    try:
        if not watch.select(0):
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:  # reset (ConnectionResetError), or the connection failed otherwise
        return True


def sse(events: list[dict[str, Any]]) -> bytes:
    """Server-sent events: one `data: JSON` line and a blank line each."""
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


def step_hook(batch: list[Job], tokenizer: Any) -> StepCallback:
    """Runtime.generate's on_step for a batch (its prompts are slots 0.. in order): queue each
    streamed job's tokens for its handler thread, and return the slots to end now: those whose
    stop string a token completed (StopWatch, streamed or not) and the unfinished ones of a job
    that is `gone` (its client left, streamed or not, or every choice of its stream ended at a
    stop string). Every batch gets one, as any client may leave: its cost is a Python loop over
    the step's slots, microseconds against a decode step."""
    owners = [(job, i) for job in batch for i in range(len(job.prompts))]
    watch = StopWatch(tokenizer, [(job.stop, job.chat) for job, _ in owners])

    def hook(step: list[tuple[int, int, bool, TokenLogprobs | None]]) -> list[int]:
        ended = []
        for slot, token, finished, logprobs in step:
            job, i = owners[slot]
            if job.gone:  # (set by its handler thread: a read that comes late costs a step)
                if not finished:
                    ended.append(slot)
                continue
            if job.stream:
                job.events.put((i, token, finished, logprobs if job.logprobs is not None else None))
            if watch.completed(slot, token, finished):
                ended.append(slot)
        return ended
    return hook


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG  # (the kernel caps it at net.core.somaxconn)
    # set by serve_forever
    spec: Any
    tokenizer: Any
    mode: str
    world: int
    placement: dict[str, str | None]  # cli.placement_name: which placement the ranks apply
    model_name: str
    created: int  # start time, the model's "created" in /v1/models
    max_tokens_limit: int
    max_batch: int  # sequences per batch; a request never has more
    jobs: "queue.Queue[Job]"
    stats: Stats

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # `closing` (the reason, once set) and `_in_flight` (jobs submitted, not yet answered)
        # change only under `_cond`, so no job is queued after `close` drained the queue
        self._cond = threading.Condition()
        self.closing: str | None = None
        self._in_flight = 0

    def submit(self, job: Job) -> bool:
        """Queue `job` for rank 0's main thread; False once the server is closing."""
        with self._cond:
            if self.closing is not None:
                return False
            self._in_flight += 1
            self.jobs.put(job)
        return True

    def answered(self) -> None:
        """A submitted job's response has been written (or its client has gone)."""
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

    def close(self, reason: str, waiting: list[Job], grace_s: float = 2.0) -> None:
        """Refuse new jobs; fail `waiting` and every queued job with `reason` (a 503); then give
        the handler threads up to `grace_s` to write those answers before the process exits
        (they are daemon threads: nothing else waits for them)."""
        with self._cond:
            self.closing = reason
        pending = list(waiting)
        while True:
            try:
                pending.append(self.jobs.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if not job.done.is_set():
                job.finish(error=reason)
        with self._cond:
            self._cond.wait_for(lambda: self._in_flight <= 0, timeout=grace_s)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that disconnects or stalls mid-request is no error of the server's; anything
        else escaping a handler (a bug) is one line, not a traceback (MOEPLACE_TRACEBACK=1: it)."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return
        if os.environ.get("MOEPLACE_TRACEBACK"):
            super().handle_error(request, client_address)
        else:
            print(f"moeplace serve: warning: internal error answering {client_address[0]}: "
                  f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)


def make_server(host: str, port: int) -> Server:
    """Bind early (before weights load) so a busy port is an immediate, clean error."""
    return Server((host, port), Handler)


def serve_forever(rt: Runtime, server: Server, tokenizer: Any, max_batch: int, max_tokens_limit: int,
                  heartbeat_s: float, model_name: str, placement: dict[str, str | None],
                  routing: RoutingLog | None = None) -> None:
    """Rank 0: answer HTTP and drive the other ranks until interrupted or a rank fails.
    routing: record each batch's decode routing there (while it has room, or, keep="last", a
    window of the latest), write it every `routing.every_s` (checked after each batch and each
    idle heartbeat) and on the way out, however the loop ends (Ctrl-C, a dead rank: what was
    gathered is valid data)."""
    server.spec, server.tokenizer, server.mode, server.world = rt.model.spec, tokenizer, rt.mode, rt.comm.world
    server.placement = placement
    server.model_name, server.max_tokens_limit, server.created = model_name, max_tokens_limit, int(time.time())
    server.max_batch = max_batch
    server.jobs, server.stats = queue.Queue(), Stats()
    jobs, stats = server.jobs, server.stats
    launcher = launcher_pid()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    waiting: list[Job] = []  # taken from the queue, but did not fit in the last batch
    reason = "the server is shutting down"
    try:
        while True:
            if not waiting:
                try:
                    waiting.append(jobs.get(timeout=heartbeat_s))
                except queue.Empty:
                    if routing is not None:
                        routing.maybe_write()
                    send_command(rt, NOOP)  # heartbeat: raises if a rank died
                    if launcher is not None and os.getppid() != launcher:  # where no PR_SET_PDEATHSIG (not Linux)
                        raise MoeplaceError(f"rank 0: the launcher (pid {launcher}) exited; stopping")
                    continue
            batch = next_batch(waiting, jobs, max_batch)
            if not batch:  # every job taken had lost its client
                continue
            asked = [j.logprobs for j in batch if j.logprobs is not None]  # the batch computes the most asked for
            req = Request([p for j in batch for p in j.prompts], [j.max_tokens for j in batch for _ in j.prompts],
                          record_routing=routing is not None and routing.recording,
                          sampling=[p for j in batch for p in prompt_sampling(j.sampling, len(j.prompts))],
                          logprobs=max(asked) if asked else None)
            try:
                send_command(rt, GENERATE, req)
                result = run_request(rt, req, step_hook(batch, tokenizer))
                counters = merged_counters(rt)
            except BaseException as e:
                for j in batch:
                    j.finish(error=f"runtime failed: {error_text(e)}")
                raise
            it = iter(result.tokens)
            lps = iter(result.logprobs or [])
            for j in batch:
                j.finish([next(it) for _ in j.prompts],
                         logprobs=[next(lps) for _ in j.prompts] if result.logprobs is not None else None)
            stats.record_batch(len(batch), sum(len(t) for t in result.tokens), result.seconds,
                               {p: counters.summary(p) for p in ("prefill", "decode")})
            if routing is not None:  # after the answers: the clients do not wait for it
                routing.add(req, result)
                routing.maybe_write()
    except Exception as e:  # a failed batch, heartbeat or launcher check: the queued jobs get it too
        reason = f"runtime failed: {error_text(e)}"
        raise
    finally:
        if routing is not None:
            routing.closing = True  # from here a SIGTERM waits for the last write (cli.writes_routing_on_signals)
        try:
            server.close(reason, waiting)
            server.shutdown()
            server.server_close()
        finally:
            if routing is not None:
                close_routing(routing)


def close_routing(routing: RoutingLog) -> None:
    """The last write, on the way out: its failure is raised unless the loop is already
    unwinding with an error of its own (which stays the one reported; the write's is printed)."""
    try:
        routing.close()
    except MoeplaceError as e:
        if sys.exc_info()[1] is None:
            raise
        print(f"moeplace serve: warning: {e}", file=sys.stderr, flush=True)


def next_batch(waiting: list[Job], jobs: "queue.Queue[Job]", max_batch: int) -> list[Job]:
    """The next batch: waiting jobs first, then queued ones, in order, while their prompts fit in
    `max_batch` sequences (a job never has more: parse_completion). The job that does not fit
    is left in `waiting` for the batch after. A job whose client has already left (`gone`: its
    handler has returned, counting it abandoned) is finished unanswered and takes no slot; the
    batch may then be empty."""
    batch: list[Job] = []
    size = 0
    while waiting or not jobs.empty():
        job = waiting.pop(0) if waiting else jobs.get_nowait()
        if job.gone:
            job.finish(error="the client left before its batch")  # (nobody reads it)
            continue
        if batch and size + len(job.prompts) > max_batch:
            waiting.insert(0, job)
            break
        batch.append(job)
        size += len(job.prompts)
    return batch
