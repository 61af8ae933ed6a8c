"""Rank 0's HTTP front end (stdlib): OpenAI-style completions, health and Prometheus metrics.

Handler threads only validate and enqueue; rank 0's main thread (`serve_forever`) drains the
queue in batches, broadcasts each batch to the other ranks and runs it, so the expert-parallel
collectives stay on one thread. While idle it sends heartbeats: a dead rank surfaces within the
timeout even with no traffic, and the server then exits with that error instead of hanging.

    POST /v1/completions  {"prompt": str | [int] | [str, ...], "max_tokens": int = min(16, cap)}
                          (cap: the server's --max-new-tokens)
    GET  /health          {"status": "ok", "world": N, "mode": ...}
    GET  /metrics         Prometheus text (tokens/s, Alltoall bytes, per-layer cross-rank tokens)
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from moeplace.serve.counters import KINDS
from moeplace.serve.engine import GENERATE, NOOP, Request, merged_counters, run_request, send_command
from moeplace.serve.generate import Runtime

MAX_BODY = 1 << 20  # bytes


class BadRequest(ValueError):
    """Invalid client input: answered with HTTP 400 and the message."""


@dataclass
class Job:
    prompts: list[list[int]]
    max_tokens: int
    texts: bool  # answer with decoded text (prompt was text)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[int]] | None = None
    error: str | None = None


@dataclass
class Stats:
    generated_tokens: int = 0
    decode_seconds: float = 0.0
    last_tokens_per_s: float = 0.0
    requests: int = 0
    rejected: int = 0
    counters: dict[str, Any] = field(default_factory=dict)


def parse_completion(body: bytes, tokenizer: Any, vocab: int, max_len: int, max_tokens_limit: int) -> Job:
    """Validate a /v1/completions body into a Job; raises BadRequest with a readable reason."""
    try:
        doc = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    prompt = doc.get("prompt")
    max_tokens = doc.get("max_tokens", min(16, max_tokens_limit))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= max_tokens_limit:
        raise BadRequest(f"max_tokens must be an integer in [1, {max_tokens_limit}]")
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts, texts = [prompt], False
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if tokenizer is None:
            raise BadRequest("this model has no tokenizer: send token ids (\"prompt\": [1, 2, 3])")
        prompts, texts = [list(tokenizer.encode(p, add_special_tokens=False)) for p in prompt], True
    else:
        raise BadRequest("prompt must be a string, a list of strings or a list of token ids")
    for p in prompts:
        if not p:
            raise BadRequest("empty prompt")
        if min(p) < 0 or max(p) >= vocab:
            raise BadRequest(f"token id out of range [0, {vocab})")
        if len(p) + max_tokens > max_len:
            raise BadRequest(f"prompt ({len(p)} tokens) + max_tokens exceeds the context limit {max_len}")
    return Job(prompts, max_tokens, texts)


def metrics_text(stats: Stats, mode: str, world: int) -> str:
    """Prometheus exposition text of the server's counters."""
    lines = [
        "# HELP moeplace_generated_tokens_total Tokens generated.",
        "# TYPE moeplace_generated_tokens_total counter",
        f"moeplace_generated_tokens_total {stats.generated_tokens}",
        "# HELP moeplace_tokens_per_second Decode throughput of the last batch.",
        "# TYPE moeplace_tokens_per_second gauge",
        f"moeplace_tokens_per_second {stats.last_tokens_per_s:.3f}",
        "# HELP moeplace_decode_seconds_total Wall time of generation, summed over batches.",
        "# TYPE moeplace_decode_seconds_total counter",
        f"moeplace_decode_seconds_total {stats.decode_seconds:.6f}",
        "# HELP moeplace_requests_total Completion requests served.",
        "# TYPE moeplace_requests_total counter",
        f"moeplace_requests_total {stats.requests}",
        "# HELP moeplace_rejected_requests_total Requests answered with an error (400, 404, 413, 503).",
        "# TYPE moeplace_rejected_requests_total counter",
        f"moeplace_rejected_requests_total {stats.rejected}",
        f'moeplace_info{{mode="{mode}",world="{world}"}} 1',
        "# HELP moeplace_collective_bytes_total Bytes sent to other ranks, summed over ranks.",
        "# TYPE moeplace_collective_bytes_total counter",
    ]
    c = stats.counters
    for phase in ("prefill", "decode"):
        s = c.get(phase, {})
        for kind in KINDS:
            if kind in s:
                lines.append(f'moeplace_collective_bytes_total{{phase="{phase}",kind="{kind}"}} {s[kind]["bytes"]}')
                lines.append(f'moeplace_collectives_total{{phase="{phase}",kind="{kind}"}} {s[kind]["collectives"]}')
        if "alltoall_bytes" in s:
            lines.append(f'moeplace_alltoall_bytes_total{{phase="{phase}"}} {s["alltoall_bytes"]}')
        for layer, rows in enumerate(s.get("cross_rank_rows_per_layer", [])):
            lines.append(f'moeplace_cross_rank_tokens_total{{phase="{phase}",layer="{layer}"}} {rows}')
    return "\n".join(lines) + "\n"


class Handler(BaseHTTPRequestHandler):
    """Validates and enqueues; never touches the runtime (rank 0's main thread does)."""

    protocol_version = "HTTP/1.1"
    server: "Server"

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: no per-request stderr lines
        pass

    def _send(self, code: int, body: str, ctype: str = "application/json") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, msg: str) -> None:
        self.server.stats.rejected += 1
        kind = "invalid_request_error" if code < 500 else "server_error"
        self._send(code, json.dumps({"error": {"message": msg, "type": kind, "code": code}}))

    def do_GET(self) -> None:
        srv = self.server
        if self.path == "/health":
            self._send(200, json.dumps({"status": "ok", "world": srv.world, "mode": srv.mode}))
        elif self.path == "/metrics":
            self._send(200, metrics_text(srv.stats, srv.mode, srv.world), "text/plain; version=0.0.4")
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        srv = self.server
        if self.path != "/v1/completions":
            return self._error(404, f"no route {self.path}")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            return self._error(400, "bad Content-Length")
        if length < 0 or length > MAX_BODY:
            return self._error(413, f"body larger than {MAX_BODY} bytes")
        spec = srv.spec
        try:
            job = parse_completion(self.rfile.read(length), srv.tokenizer, spec.vocab_size, spec.max_positions,
                                   srv.max_tokens_limit)
        except BadRequest as e:
            return self._error(400, str(e))
        srv.jobs.put(job)
        job.done.wait()
        if job.error or job.result is None:
            return self._error(503, job.error or "generation failed")
        choices = []
        for i, toks in enumerate(job.result):
            finish = "stop" if toks and toks[-1] in spec.eos_token_ids else "length"
            text = srv.tokenizer.decode(toks) if job.texts and srv.tokenizer is not None else ""
            choices.append({"index": i, "text": text, "token_ids": toks, "finish_reason": finish, "logprobs": None})
        prompt_tokens = sum(len(p) for p in job.prompts)
        completion_tokens = sum(len(t) for t in job.result)
        self._send(200, json.dumps({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": srv.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # set by serve_forever
    spec: Any
    tokenizer: Any
    mode: str
    world: int
    model_name: str
    max_tokens_limit: int
    jobs: "queue.Queue[Job]"
    stats: Stats


def make_server(host: str, port: int) -> Server:
    """Bind early (before weights load) so a busy port is an immediate, clean error."""
    return Server((host, port), Handler)


def serve_forever(rt: Runtime, server: Server, tokenizer: Any, max_batch: int, max_tokens_limit: int,
                  heartbeat_s: float, model_name: str) -> None:
    """Rank 0: answer HTTP and drive the other ranks until interrupted or a rank fails."""
    server.spec, server.tokenizer, server.mode, server.world = rt.model.spec, tokenizer, rt.mode, rt.comm.world
    server.model_name, server.max_tokens_limit = model_name, max_tokens_limit
    server.jobs, server.stats = queue.Queue(), Stats()
    jobs, stats = server.jobs, server.stats
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        while True:
            try:
                batch = [jobs.get(timeout=heartbeat_s)]
            except queue.Empty:
                send_command(rt, NOOP)  # heartbeat: raises if a rank died
                continue
            while len(batch) < max_batch and not jobs.empty():
                batch.append(jobs.get_nowait())
            req = Request([p for j in batch for p in j.prompts],
                          [j.max_tokens for j in batch for _ in j.prompts])
            try:
                send_command(rt, GENERATE, req)
                result = run_request(rt, req)
                counters = merged_counters(rt)
            except BaseException as e:
                for j in batch:
                    j.error = f"runtime failed: {e}"
                    j.done.set()
                raise
            it = iter(result.tokens)
            for j in batch:
                j.result = [next(it) for _ in j.prompts]
                j.done.set()
            generated = sum(len(t) for t in result.tokens)
            stats.requests += len(batch)
            stats.generated_tokens += generated
            stats.decode_seconds += result.seconds
            stats.last_tokens_per_s = generated / result.seconds if result.seconds > 0 else 0.0
            stats.counters = {p: counters.summary(p) for p in ("prefill", "decode")}
    finally:
        server.shutdown()
        server.server_close()
