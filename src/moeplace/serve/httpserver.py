"""Rank 0's HTTP front end (stdlib): OpenAI-style completions and chat, health and Prometheus metrics.

Handler threads only validate and enqueue; rank 0's main thread (`serve_forever`) drains the
queue in batches, broadcasts each batch to the other ranks and runs it, so the expert-parallel
collectives stay on one thread; a streamed request's handler reads its tokens from a queue of
its own, which the main thread fills after each decode step (Runtime.generate's on_step, `step_hook`,
which also ends early the sequences whose stop string is complete or whose streaming client has
gone: docs/runtime.md, "Stop strings and `n`"). While
idle it sends heartbeats: a dead rank surfaces within the timeout even with no traffic, and the
server then exits with that error instead of hanging; it also stops when its launcher has gone
(dist.tie_to_launcher). On the way out every request not yet answered (running, queued, or
arriving) gets a 503 with the reason. With --routing-out, the loop also keeps each batch's decode
routing (engine.RoutingLog) and writes it periodically and on the way out (docs/runtime.md,
"Recording live routing").

    POST /v1/completions  {"prompt": str | [int] | [str, ...], "max_tokens": int = min(16, cap),
                          "temperature": 0..2 = 0, "top_p": (0, 1] = 1, "top_k": int >= 1, or 0 or
                          -1 for off, "min_p": [0, 1] = 0, "seed": int, "logprobs": 0..5,
                          "n": 1..16 = 1, "stop": str | [str, ...]}
                          (cap: the server's --max-new-tokens). temperature 0 (the default here,
                          not OpenAI's 1) decodes greedily; a sampling request without a seed
                          gets a random one, and the response's "seed" names it (null when
                          greedy), so it can be replayed. "n" choices per prompt, prompt-major
                          (choice p * n + j: prompt p's j-th); choice i samples with seed + i
                          (greedy: n equal choices); prompts x n must fit in --max-batch. "stop"
                          (up to 4 non-empty strings): a choice's text ends right before the
                          first stop string in its generated text, finish_reason "stop", its
                          tokens (usage, token_ids, logprobs) up to the one that completed it;
                          rank 0 finds it as the tokens come (StopWatch) and the sequence ends at
                          the batch's next step (its token dropped). A filter ("top_p" < 1,
                          "top_k" > 1, "min_p" > 0) without a temperature is 400 (it would be
                          silently greedy). "logprobs": N gives each choice OpenAI's legacy
                          {"tokens", "token_logprobs", "top_logprobs" (the N likeliest),
                          "text_offset"}, of the raw model distribution (before
                          temperature and filters, as vLLM); a token is its id's decoding, or
                          "token_id:N" with no tokenizer. The other fields that would change the
                          answer (UNSUPPORTED: "echo", "suffix", penalties, "logit_bias"; "best_of"
                          unless equal to n) are 400 unless null or their default; so is a request
                          of more sequences than --max-batch. "user" is accepted.
    POST /v1/chat/completions  {"messages": [{"role": "system" | "developer" | "user" | "assistant", "content": str},
                          ...], "max_completion_tokens" (or "max_tokens"), sampling and refusals as
                          above}: the prompt is the tokenizer's chat template with the generation
                          prompt; the answer is OpenAI's chat.completion (special tokens skipped),
                          n choices of the one prompt; "stop" looks in the content.
                          "logprobs": true (+ "top_logprobs": 0..20) gives each choice's logprobs =
                          {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}, one entry
                          per generated token, the stop token included; "top_logprobs" without
                          "logprobs": true is 400. No tokenizer or no chat template: 400
                          (/v1/completions still works).
    "stream": true (both): server-sent events over chunked HTTP/1.1, one `data: {json}` event per
                          new token of a choice (completions: "text_completion" chunks with "text"
                          and "token_ids"; chat: "chat.completion.chunk", a role delta first, a
                          finish delta {} last), the finishing token's event carrying
                          finish_reason (each event one choice's, by "index"), then `data:
                          [DONE]`, as soon as every choice has ended; text that may begin a stop
                          string is held back until the next tokens tell; with logprobs, each event carries
                          those of its tokens (chat: of the tokens since the last event, as a
                          token that adds no text has none). "stream_options": {"include_usage":
                          bool} adds a last chunk with "choices": [] and "usage"; other keys, or
                          stream_options without stream, are 400. Text deltas are decoded
                          incrementally (`IncrementalText`): their concatenation is the
                          non-streamed text. A failure before the first token is the usual 503;
                          after it (status 200 sent), a `data: {"error": ...}` event ends the
                          stream without [DONE]. A client that leaves mid-stream is dropped
                          quietly; its sequences end at the batch's next step after the handler
                          notices (`gone`).
    GET  /v1/models       OpenAI list format: the one served model (the checkpoint's directory name)
    GET  /health          {"status": "ok", "world": N, "mode": ..., "placement": path as given or
                          "contiguous (no --placement)", "placement_sha256": 12 hex digits or null}
    GET  /metrics         Prometheus text (tokens/s, Alltoall bytes, per-layer cross-rank tokens,
                          each rank's expert load; moeplace_info names mode, world and placement)
Unknown path: 404; a route with the wrong method (PUT, DELETE, PATCH, OPTIONS too): 405 and an Allow
header; HEAD of a GET route: its headers. Bodies: Content-Length (digits only) or chunked, at most
MAX_BODY bytes (413; a refused body is still read, up to MAX_DRAIN, so the client gets the answer
rather than a broken pipe); no length: 411. A client silent for CLIENT_TIMEOUT_S is dropped (408
when a body was under way). Protocol errors too are OpenAI-shaped JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import secrets
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from moeplace.errors import MoeplaceError
from moeplace.io import loads_json
from moeplace.serve.counters import KINDS
from moeplace.serve.dist import error_text, launcher_pid
from moeplace.serve.engine import GENERATE, NOOP, Request, RoutingLog, merged_counters, run_request, send_command
from moeplace.serve.generate import Runtime, StepCallback, TokenLogprobs
from moeplace.serve.sampling import GREEDY, Sampling, int64

MAX_BODY = 1 << 20  # bytes
# a body over MAX_BODY is still read (and dropped) up to this size before the connection closes:
# a client that sends it all before reading (urllib, requests) gets the 413, not a broken pipe
MAX_DRAIN = 16 * MAX_BODY
# seconds a client may stay silent (before its request, inside it, or not reading a stream):
# then its connection is dropped, so a stalled client cannot hold a handler thread for ever
CLIENT_TIMEOUT_S = 60.0
# connections waiting to be accepted: socketserver's 5 reset a burst of a dozen clients
LISTEN_BACKLOG = 1024
ROUTES = {"/v1/completions": "POST", "/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET",
          "/metrics": "GET"}
CHAT_ROLES = ("system", "user", "assistant", "developer")
# OpenAI's newer name for the system role; chat templates know "system", so it is passed on as that
TEMPLATE_ROLE = {"developer": "system"}


# fields that change the completion, which this server does not implement: accepted only
# absent or at these values (what OpenAI clients send by default); anything else is a 400
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False), "suffix": (None, ""),
    # these reshape the logits, so they change even a greedy answer
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0),
    "logit_bias": (None, {}),
}
# sampling filters (OpenAI's top_p; vLLM's and SGLang's top_k, min_p) at values that filter
# nothing: any other value asks for sampling, refused without a temperature (it would be moot)
SAMPLING: dict[str, tuple[Any, ...]] = {"top_p": (None, 1, 1.0), "top_k": (None, -1, 0, 1), "min_p": (None, 0, 0.0)}
# chat's own fields that would change the answer, at their defaults; "echo", "best_of" and
# "suffix" are not chat fields, but a client sending them expects them honoured (best_of: check_options)
CHAT_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    **UNSUPPORTED, "response_format": (None, {"type": "text"}), "tools": (None, []), "functions": (None, []),
    # without tools, a choice that demands a call cannot be honoured (OpenAI refuses it too)
    "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
}
MAX_TEMPERATURE = 2.0  # OpenAI's range
# alternatives per token: OpenAI's caps ("logprobs" of completions, "top_logprobs" of chat)
MAX_LOGPROBS, MAX_TOP_LOGPROBS = 5, 20
MIN_LOGPROB = -9999.0  # vLLM's floor: JSON has no -Infinity
MAX_N = 16  # choices per prompt ("n")
# "stop": OpenAI's 4 strings; the length bounds the per-token work of holding back a stop's beginning
MAX_STOPS, MAX_STOP_CHARS = 4, 1024


class BadRequest(ValueError):
    """Invalid client input: answered with HTTP 400 and the message."""


class ClientError(Exception):
    """A request the HTTP layer refuses (its body's framing or size): answered with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_text(text: str, where: str) -> str:
    """`text` when it is Unicode text: JSON's \\ud800 escapes a lone surrogate, which no tokenizer
    can encode (BadRequest)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"{where} is not valid Unicode text: a lone surrogate "
                         f"{text[e.start]!a} at character {e.start}") from None
    return text


# what rank 0's main thread hands a streamed job's handler: (choice index, new token, finished,
# its log-probabilities when the job asked for them); None once the job is answered (result or error)
StreamItem = tuple[int, int, bool, TokenLogprobs | None] | None


@dataclass
class Job:
    # one per sequence, i.e. per choice: each prompt of the request `n` times, prompt-major (choice
    # p * n + j is prompt p's j-th: OpenAI's and vLLM's index order)
    prompts: list[list[int]]
    max_tokens: int
    texts: bool  # answer with decoded text (prompt was text)
    sampling: Sampling = GREEDY  # the request's; choice i samples with seed + i (prompt_sampling)
    chat: bool = False  # answer as a chat.completion (/v1/chat/completions)
    stream: bool = False  # answer as server-sent events, token by token
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None = None  # N: each token's log-probability and the N likeliest; None: none
    n: int = 1  # choices per prompt: `prompts` holds each prompt n times
    stop: tuple[str, ...] = ()  # stop strings: a choice's text ends before the first (StopText)
    done: threading.Event = field(default_factory=threading.Event)
    result: list[list[int]] | None = None  # per choice, every token decoded (a stop string's cut comes later)
    result_logprobs: list[list[TokenLogprobs]] | None = None  # per choice, per token, when asked for
    error: str | None = None
    # filled by rank 0's main thread (streamed jobs only), read by the job's handler thread
    events: "queue.SimpleQueue[StreamItem]" = field(default_factory=queue.SimpleQueue)
    gone: bool = False  # its stream has ended (answered, or the client left): its tokens need not be queued

    def finish(self, result: list[list[int]] | None = None, error: str | None = None,
               logprobs: list[list[TokenLogprobs]] | None = None) -> None:
        """Answer the job; wakes its handler, waiting on `done` or, streamed, on `events`."""
        self.result, self.error, self.result_logprobs = result, error, logprobs
        self.done.set()
        self.events.put(None)


@dataclass
class Stats:
    """Server counters. Handler threads count rejections while rank 0's main thread records
    batches: both update under `lock`, and /metrics reads a `snapshot`, never a half-updated set."""

    generated_tokens: int = 0
    decode_seconds: float = 0.0
    last_tokens_per_s: float = 0.0
    requests: int = 0
    rejected: int = 0
    counters: dict[str, Any] = field(default_factory=dict)  # replaced whole, never mutated
    lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def reject(self) -> None:
        with self.lock:
            self.rejected += 1

    def record_batch(self, requests: int, generated: int, seconds: float, counters: dict[str, Any]) -> None:
        with self.lock:
            self.requests += requests
            self.generated_tokens += generated
            self.decode_seconds += seconds
            self.last_tokens_per_s = generated / seconds if seconds > 0 else 0.0
            self.counters = counters

    def snapshot(self) -> Stats:
        """A consistent copy (with a lock of its own)."""
        with self.lock:
            return dataclasses.replace(self)


def _is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    # bool is an int (True == 1): best_of true is not the default 1
    return any(value == d and type(value) is type(d) for d in allowed)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_sampling(doc: dict[str, Any]) -> Sampling:
    """The request's temperature, top_p, top_k, min_p and seed, checked (BadRequest). A request that
    samples without a seed gets a random one (the response reports it); a greedy one keeps
    GREEDY's. A filter without a temperature is refused: answering it greedily would hide that
    it was ignored."""
    temperature, top_p, top_k, min_p, seed = (doc.get(k) for k in ("temperature", "top_p", "top_k", "min_p", "seed"))
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= MAX_TEMPERATURE):
        raise BadRequest(f"\"temperature\": {json.dumps(temperature)[:80]} is not supported: send a number in "
                         f"[0, {MAX_TEMPERATURE:g}] (0, the default, decodes greedily)")
    if top_p is not None and not (_is_number(top_p) and 0 < top_p <= 1):
        raise BadRequest(f"\"top_p\" must be a number in (0, 1], got {json.dumps(top_p)[:80]}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= -1):
        raise BadRequest(f"\"top_k\" must be an integer >= 1, or 0 or -1 for no limit, got {json.dumps(top_k)[:80]}")
    if min_p is not None and not (_is_number(min_p) and 0 <= min_p <= 1):
        raise BadRequest(f"\"min_p\" must be a number in [0, 1], got {json.dumps(min_p)[:80]}")
    if seed is not None and not (isinstance(seed, int) and not isinstance(seed, bool) and -(1 << 63) <= seed < 1 << 63):
        raise BadRequest(f"\"seed\" must be an integer in [-2**63, 2**63), got {json.dumps(seed)[:80]}")
    if temperature == 0:  # greedy asked for: a filter on the sampled set changes nothing
        return GREEDY
    for name, neutral in SAMPLING.items():
        if _is_one_of(doc.get(name), neutral):
            continue
        if temperature is None:
            raise BadRequest(f"\"{name}\": {json.dumps(doc.get(name))[:80]} asks for sampling, but the temperature "
                             "is 0 (the default here, unlike OpenAI's 1): send a \"temperature\" in "
                             f"(0, {MAX_TEMPERATURE:g}] to sample, or leave {name} out")
    if temperature is None:
        return GREEDY
    params = Sampling(float(temperature), 1.0 if top_p is None else float(top_p),
                      0 if top_k is None or top_k < 1 else min(top_k, 1 << 31),  # past any vocab: int64-safe
                      0 if seed is None else seed, 0.0 if min_p is None else float(min_p))
    if params.greedy:  # top_k 1: the argmax at any temperature
        return GREEDY
    return params if seed is not None else dataclasses.replace(params, seed=secrets.randbits(63))


def prompt_sampling(params: Sampling, prompts: int) -> list[Sampling]:
    """Each sequence's parameters: sequence (choice) i of a request samples with seed + i (its
    prompt alone, with that seed, gives the same tokens), so equal prompts in one request, and
    the n choices of one prompt, differ."""
    return [params if params.greedy else dataclasses.replace(params, seed=int64(params.seed + i))
            for i in range(prompts)]


def read_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (BadRequest otherwise)."""
    try:
        doc = loads_json(body or b"null")  # deep nesting: ValueError, so a 400 like any bad body
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object")
    return doc


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_options(doc: dict[str, Any], unsupported: dict[str, tuple[Any, ...]], what: str) -> tuple[Sampling, int]:
    """Refuse what this server cannot honour (`unsupported` fields off their defaults; `what`
    names the endpoint in the message); return the request's sampling and "n" (1..MAX_N, null 1).
    "best_of" is accepted only where it changes nothing: null or equal to n (vLLM's default)."""
    n = doc.get("n")
    if n is not None and not (_is_int(n) and 1 <= n <= MAX_N):  # 1.0 and true are no integer 1
        raise BadRequest(f"\"n\" must be 1 to {MAX_N} (an integer: the completions per prompt), "
                         f"got {json.dumps(n)[:80]}")
    n = 1 if n is None else n
    best_of = doc.get("best_of")
    if best_of is not None and not (_is_int(best_of) and best_of == n):
        raise BadRequest(f"\"best_of\" is not supported ({what}): leave it out, null or equal to \"n\" ({n}), "
                         f"got {json.dumps(best_of)[:80]}")
    for name, defaults in unsupported.items():
        if not _is_one_of(doc.get(name), defaults):
            raise BadRequest(f"\"{name}\" is not supported ({what}): "
                             f"leave it out or null, got {json.dumps(doc.get(name))[:80]}")
    return parse_sampling(doc), n


def parse_stop(doc: dict[str, Any], tokenizer: Any) -> tuple[str, ...]:
    """The request's "stop": a string or a list of up to MAX_STOPS non-empty strings (null and []:
    none), each at most MAX_STOP_CHARS characters, duplicates dropped; checked (BadRequest). The
    strings are looked for in the decoded answer, so a model without a tokenizer refuses them."""
    stop = doc.get("stop")
    if stop is None or stop == []:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS or \
            not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stops):
        raise BadRequest(f"\"stop\" must be a string or a list of at most {MAX_STOPS} strings, each of 1 to "
                         f"{MAX_STOP_CHARS} characters, got {json.dumps(stop)[:80]}")
    if tokenizer is None:
        raise BadRequest("\"stop\" is not supported: this model has no tokenizer, so its answers have no text "
                         "to look for a stop string in")
    for i, s in enumerate(stops):
        check_text(s, "stop" if isinstance(stop, str) else f"stop[{i}]")
    return tuple(dict.fromkeys(stops))


def parse_logprobs(doc: dict[str, Any]) -> int | None:
    """A completions request's "logprobs": N alternatives per token, 0..MAX_LOGPROBS (OpenAI's
    cap), or None (absent or null: none), checked (BadRequest)."""
    logprobs = doc.get("logprobs")
    if logprobs is not None and not (isinstance(logprobs, int) and not isinstance(logprobs, bool)
                                     and 0 <= logprobs <= MAX_LOGPROBS):
        raise BadRequest(f"\"logprobs\" must be an integer in [0, {MAX_LOGPROBS}] (the alternatives per token, "
                         f"OpenAI's cap), got {json.dumps(logprobs)[:80]}")
    return logprobs


def parse_chat_logprobs(doc: dict[str, Any]) -> int | None:
    """A chat request's "logprobs" (a bool) and "top_logprobs" (0..MAX_TOP_LOGPROBS, only with
    "logprobs": true, as OpenAI checks): the alternatives per token, or None for none."""
    logprobs, top = doc.get("logprobs"), doc.get("top_logprobs")
    if not _is_one_of(logprobs, (None, False, True)):
        raise BadRequest(f"\"logprobs\" must be true or false (chat completions; \"top_logprobs\" says how many "
                         f"alternatives), got {json.dumps(logprobs)[:80]}")
    if top is not None and logprobs is not True:
        raise BadRequest(f"\"top_logprobs\" needs \"logprobs\": true, got \"top_logprobs\": {json.dumps(top)[:80]} "
                         f"with \"logprobs\": {json.dumps(logprobs)}")
    if top is not None and not (isinstance(top, int) and not isinstance(top, bool) and 0 <= top <= MAX_TOP_LOGPROBS):
        raise BadRequest(f"\"top_logprobs\" must be an integer in [0, {MAX_TOP_LOGPROBS}] (OpenAI's cap), "
                         f"got {json.dumps(top)[:80]}")
    return (top or 0) if logprobs else None


def parse_stream(doc: dict[str, Any]) -> tuple[bool, bool]:
    """The request's ("stream", "stream_options".include_usage), checked (BadRequest): OpenAI's
    one stream option, and only with "stream": true (OpenAI refuses it otherwise too)."""
    stream, options = doc.get("stream"), doc.get("stream_options")
    if not _is_one_of(stream, (None, False, True)):
        raise BadRequest(f"\"stream\" must be true or false, got {json.dumps(stream)[:80]}")
    if options is None:
        return bool(stream), False
    if not stream:
        raise BadRequest("\"stream_options\" is only for \"stream\": true: leave it out or null")
    usage = options.get("include_usage") if isinstance(options, dict) else None
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not _is_one_of(usage, (None, False, True)):
        raise BadRequest("\"stream_options\" is not supported beyond {\"include_usage\": true | false}, "
                         f"got {json.dumps(options)[:80]}")
    return True, bool(usage)


def check_max_tokens(max_tokens: Any, limit: int, name: str = "max_tokens") -> int:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limit:
        raise BadRequest(f"{name} must be an integer in [1, {limit}] (the server's --max-new-tokens)")
    return max_tokens


def check_prompt_ids(prompts: list[list[int]], vocab: int, max_len: int, max_tokens: int) -> None:
    for p in prompts:
        if not p:
            raise BadRequest("empty prompt")
        if min(p) < 0 or max(p) >= vocab:
            raise BadRequest(f"token id out of range [0, {vocab})")
        if len(p) + max_tokens > max_len:
            raise BadRequest(f"prompt ({len(p)} tokens) + max_tokens exceeds the context limit {max_len}")


def parse_completion(body: bytes, tokenizer: Any, vocab: int, max_len: int, max_tokens_limit: int,
                     max_prompts: int | None = None) -> Job:
    """Validate a /v1/completions body into a Job; raises BadRequest with a readable reason.
    `max_prompts`: the server's --max-batch (one request runs in one batch: its prompts x n)."""
    doc = read_body(body)
    sampling, n = check_options(doc, UNSUPPORTED, "plain completions")
    stop = parse_stop(doc, tokenizer)
    logprobs = parse_logprobs(doc)
    stream, include_usage = parse_stream(doc)
    prompt = doc.get("prompt")
    max_tokens = doc.get("max_tokens")  # null: the default, as OpenAI's (and chat's here)
    max_tokens = check_max_tokens(min(16, max_tokens_limit) if max_tokens is None else max_tokens, max_tokens_limit)
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts, texts = [prompt], False
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if tokenizer is None:
            raise BadRequest("this model has no tokenizer: send token ids (\"prompt\": [1, 2, 3])")
        prompts = [list(tokenizer.encode(check_text(p, "prompt" if len(prompt) == 1 else f"prompt[{i}]"),
                                         add_special_tokens=False)) for i, p in enumerate(prompt)]
        texts = True
    else:
        raise BadRequest("prompt must be a string, a list of strings or a list of token ids")
    if max_prompts is not None and len(prompts) * n > max_prompts:
        asked = f"{len(prompts)} prompts" if n == 1 else \
            f"{len(prompts)} prompt(s) x \"n\" {n} = {len(prompts) * n} sequences"
        raise BadRequest(f"{asked} in one request; this server decodes at most {max_prompts} sequences together "
                         "(--max-batch): split the request" + (" or lower \"n\"" if n > 1 else ""))
    check_prompt_ids(prompts, vocab, max_len, max_tokens)
    return Job([p for p in prompts for _ in range(n)], max_tokens, texts, sampling, stream=stream,
               include_usage=include_usage, logprobs=logprobs, n=n, stop=stop)


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """The request's messages as [{role, content}], checked; BadRequest names the first bad field."""
    if not isinstance(messages, list):
        raise BadRequest(f"\"messages\" must be a list of {{\"role\", \"content\"}} objects, "
                         f"got {json.dumps(messages)[:80]}")
    if not messages:
        raise BadRequest("\"messages\" is empty: send at least one message")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise BadRequest(f"\"{where}\" must be an object with \"role\" and \"content\", got {json.dumps(m)[:80]}")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise BadRequest(f"\"{where}.role\": {json.dumps(role)[:80]} is not supported: "
                             f"one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise BadRequest(f"\"{where}.content\" must be a string (content parts are not supported), "
                             f"got {json.dumps(content)[:80]}")
        for key, value in m.items():  # "name", "tool_calls", ...: the template would not see them
            if key not in ("role", "content") and value not in (None, []):
                raise BadRequest(f"\"{where}.{key}\" is not supported (only role and content are read): "
                                 f"leave it out or null, got {json.dumps(value)[:80]}")
        out.append({"role": TEMPLATE_ROLE.get(role) or str(role), "content": check_text(content, f"{where}.content")})
    return out


def parse_chat(body: bytes, tokenizer: Any, model_name: str, vocab: int, max_len: int, max_tokens_limit: int,
               max_prompts: int | None = None) -> Job:
    """Validate a /v1/chat/completions body into a Job whose prompt (n times, one per choice) is
    the tokenizer's chat template applied to the messages, with the generation prompt; raises
    BadRequest. `max_prompts`: the server's --max-batch, which the n choices must fit in."""
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:  # checked first: no chat request can succeed, whatever its body
        has = "has no tokenizer" if tokenizer is None else "has a tokenizer without a chat template"
        raise BadRequest(f"model {model_name} {has}, so no chat: use /v1/completions "
                         "(a prompt string or token ids)")
    doc = read_body(body)
    sampling, n = check_options(doc, CHAT_UNSUPPORTED, "chat completions")
    if max_prompts is not None and n > max_prompts:
        raise BadRequest(f"\"n\" {n}: {n} sequences in one request; this server decodes at most {max_prompts} "
                         "sequences together (--max-batch): lower \"n\"")
    stop = parse_stop(doc, tokenizer)
    logprobs = parse_chat_logprobs(doc)
    stream, include_usage = parse_stream(doc)
    messages = chat_messages(doc.get("messages"))
    given = {k: doc[k] for k in ("max_completion_tokens", "max_tokens") if doc.get(k) is not None}
    if len(given) == 2 and given["max_completion_tokens"] != given["max_tokens"]:
        raise BadRequest("\"max_completion_tokens\" and \"max_tokens\" differ: send one (max_tokens is "
                         "OpenAI's older name for it)")
    name, value = next(iter(given.items()), ("max_completion_tokens", min(16, max_tokens_limit)))
    max_tokens = check_max_tokens(value, max_tokens_limit, name)
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # the template's own refusals (raise_exception: "roles must alternate", ...)
        first = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise BadRequest(f"the chat template of model {model_name} refused the messages "
                         f"({type(e).__name__}: {first[:200]})") from None
    prompt = [int(t) for t in ids]
    check_prompt_ids([prompt], vocab, max_len, max_tokens)
    return Job([prompt] * n, max_tokens, True, sampling, chat=True, stream=stream, include_usage=include_usage,
               logprobs=logprobs, n=n, stop=stop)


def label_value(value: Any) -> str:
    """A Prometheus label value: backslash, double quote and newline escaped (a path may hold them)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(stats: Stats, mode: str, world: int, placement: dict[str, str | None]) -> str:
    """Prometheus text exposition of the server's counters: each metric family one contiguous
    group (HELP, TYPE, then its samples). `placement`: cli.placement_name's {placement, placement_sha256}."""
    c = stats.counters
    phases = [(phase, c[phase]) for phase in ("prefill", "decode") if phase in c]
    info = (f'mode="{mode}",world="{world}",placement="{label_value(placement["placement"])}",'
            f'placement_sha256="{label_value(placement["placement_sha256"] or "")}"')
    families: list[tuple[str, str, str, list[tuple[str, Any]]]] = [  # name, type, help, [(labels, value)]
        ("moeplace_info", "gauge", "Constant 1; the labels describe the server (placement_sha256: first 12 hex "
         "digits of the placement file's sha256, empty without --placement).", [(info, 1)]),
        ("moeplace_generated_tokens_total", "counter", "Tokens generated (a sequence ended early counts up "
         "to its last token kept).", [("", stats.generated_tokens)]),
        ("moeplace_tokens_per_second", "gauge", "Decode throughput of the last batch.",
         [("", f"{stats.last_tokens_per_s:.3f}")]),
        ("moeplace_decode_seconds_total", "counter", "Wall time of generation, summed over batches.",
         [("", f"{stats.decode_seconds:.6f}")]),
        ("moeplace_requests_total", "counter", "Requests served (completions and chat completions together).", [("", stats.requests)]),
        ("moeplace_rejected_requests_total", "counter",
         "Requests answered with an error (a 4xx or 5xx status).", [("", stats.rejected)]),
        ("moeplace_collective_bytes_total", "counter", "Bytes sent to other ranks by kind of collective, "
         "summed over ranks.",
         [(f'phase="{phase}",kind="{kind}"', s[kind]["bytes"]) for phase, s in phases for kind in KINDS if kind in s]),
        ("moeplace_collectives_total", "counter", "Collectives issued by kind (the same count on every rank).",
         [(f'phase="{phase}",kind="{kind}"', s[kind]["collectives"])
          for phase, s in phases for kind in KINDS if kind in s]),
        ("moeplace_alltoall_bytes_total", "counter", "Bytes of the dispatch and combine Alltoalls (the traffic "
         "the placement decides), summed over ranks.",
         [(f'phase="{phase}"', s["alltoall_bytes"]) for phase, s in phases if "alltoall_bytes" in s]),
        ("moeplace_cross_rank_tokens_total", "counter", "Token rows sent to another rank by the dispatch and "
         "combine Alltoalls, per MoE layer.",
         [(f'phase="{phase}",layer="{layer}"', rows) for phase, s in phases
          for layer, rows in enumerate(s.get("cross_rank_rows_per_layer", []))]),
        ("moeplace_expert_tokens_total", "counter", "Token-expert choices each rank's experts ran, summed over "
         "MoE layers (the load the placement balances; a token with two experts on a rank counts 2).",
         [(f'phase="{phase}",rank="{rank}"', n) for phase, s in phases
          for rank, n in enumerate(s.get("rank_expert_tokens", []))]),
    ]
    lines = []
    for name, metric_type, help_text, samples in families:
        if not samples:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {metric_type}"]
        lines += [f"{name}{{{labels}}} {value}" if labels else f"{name} {value}" for labels, value in samples]
    return "\n".join(lines) + "\n"


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
        job.done.wait()
        if job.error or job.result is None:
            return self._error(503, job.error or "generation failed")
        if job.chat:
            return self._send(200, json.dumps(chat_response(job, srv.tokenizer, srv.model_name, spec.eos_token_ids)))
        choices = []
        answers = job_choices(job, srv.tokenizer, spec.eos_token_ids)
        for i, a in enumerate(answers):
            logprobs = None
            if job.logprobs is not None and a.logprobs is not None:
                logprobs = completion_logprobs(a.tokens, a.logprobs, job.logprobs, srv.tokenizer)[0]
            choices.append({"index": i, "text": a.text, "token_ids": a.tokens, "finish_reason": a.finish_reason,
                            "logprobs": logprobs})
        self._send(200, json.dumps({
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": srv.model_name, "choices": choices, "seed": None if job.sampling.greedy else job.sampling.seed,
            "usage": usage(job, sum(len(a.tokens) for a in answers)),
        }))

    def _stream(self, job: Job) -> None:
        """Write a streamed job's events as its tokens come, in chunked transfer encoding (no
        Content-Length, so the connection stays usable; an HTTP/1.0 client, which knows no
        chunks, gets the bare events and the end of the connection). Until its first token a
        failure is the usual 503; after it, an error event that ends the stream (status 200 sent)."""
        srv = self.server
        items = [job.events.get()]
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
        try:
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
                self._write_chunk(sse(events))
                events, items = [], [job.events.get()]
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
        except OSError:  # the client left, or stopped reading (CLIENT_TIMEOUT_S): stop writing; step_hook ends
            # its sequences at the batch's next step
            job.gone = True
            self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)


def usage(job: Job, completion_tokens: int) -> dict[str, int]:
    """OpenAI's usage: each prompt's tokens once, however many choices it has (as OpenAI counts
    them), and the choices' tokens (`completion_tokens`: up to a stop string's last token)."""
    prompt_tokens = sum(len(p) for p in job.prompts[::job.n])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Choice:
    """One finished choice as answered: its tokens up to where it ended (a stop string's last token
    included, the tokens decoded after it dropped), its text and why it ended."""

    tokens: list[int]
    text: str
    finish_reason: str  # "stop" (an EOS token or a stop string) or "length"
    logprobs: list[TokenLogprobs] | None  # of `tokens`, when the job asked for them


def choice_decoder(chat: bool, tokenizer: Any) -> Callable[[list[int]], str]:
    """How a choice's text is decoded: chat skips special tokens (its content has none)."""
    if chat:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids)


def job_choices(job: Job, tokenizer: Any, eos_token_ids: tuple[int, ...]) -> list[Choice]:
    """A finished job's choices. Without stop strings the text is the decoding of the tokens (chat:
    without the EOS token that ended it); with them, the tokens go through StopText one by one as a
    stream's do, so a streamed answer's deltas put together are this text."""
    assert job.result is not None
    out = []
    for i, toks in enumerate(job.result):
        eos = bool(toks) and toks[-1] in eos_token_ids
        reason = "stop" if eos else "length"
        # the EOS token is no part of a chat answer, also where the tokenizer does not mark it special
        shown = toks[:-1] if job.chat and eos else toks
        if job.stop and tokenizer is not None:
            matcher = StopText(choice_decoder(job.chat, tokenizer), job.stop)
            text = ""
            for count, token in enumerate(shown, 1):
                text += matcher.push(token)
                if matcher.stopped:
                    toks, reason = toks[:count], "stop"
                    break
            else:
                text += matcher.finish()
                reason = "stop" if matcher.stopped else reason
        else:
            text = choice_decoder(job.chat, tokenizer)(shown) if job.texts and tokenizer is not None else ""
        lps = job.result_logprobs[i][:len(toks)] if job.logprobs is not None and job.result_logprobs is not None \
            else None
        out.append(Choice(toks, text if job.texts else "", reason, lps))
    return out


def token_text(tokenizer: Any, token: int) -> str:
    """A token as a logprobs entry names it: its id's decoding (a piece of a multi-byte character
    decodes to U+FFFD), or "token_id:N" with no tokenizer (vLLM's spelling)."""
    return tokenizer.decode([token]) if tokenizer is not None else f"token_id:{token}"


def completion_logprobs(tokens: list[int], logprobs: list[TokenLogprobs], top: int, tokenizer: Any,
                        offset: int = 0) -> tuple[dict[str, Any], int]:
    """OpenAI's legacy logprobs of `tokens` (a choice, or a stream chunk's part of it): {"tokens",
    "token_logprobs", "top_logprobs" ({token: log-prob} of the `top` likeliest; tokens that
    decode alike share a key, the likeliest's value), "text_offset" (from `offset`, the length of the
    token strings before: vLLM's)}; and the offset after them."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, (lp, alternatives) in zip(tokens, logprobs):
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(max(lp, MIN_LOGPROB))
        top_logprobs: dict[str, float] = {}
        for i, v in alternatives[:top]:  # tokens that decode alike: the likeliest's
            top_logprobs.setdefault(token_text(tokenizer, i), max(v, MIN_LOGPROB))
        out["top_logprobs"].append(top_logprobs)
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def chat_logprob(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    text = token_text(tokenizer, token)
    return {"token": text, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(text.encode("utf-8", "replace"))}


def chat_logprobs(tokens: list[int], logprobs: list[TokenLogprobs], top: int, tokenizer: Any) -> list[dict[str, Any]]:
    """OpenAI chat's logprobs "content" entries of `tokens`: {"token", "logprob", "bytes" (the
    token string's UTF-8), "top_logprobs": [the `top` likeliest, as {"token", "logprob", "bytes"}]}."""
    return [{**chat_logprob(tokenizer, token, lp),
             "top_logprobs": [chat_logprob(tokenizer, i, v) for i, v in alternatives[:top]]}
            for token, (lp, alternatives) in zip(tokens, logprobs)]


def chat_response(job: Job, tokenizer: Any, model_name: str, eos_token_ids: tuple[int, ...]) -> dict[str, Any]:
    """OpenAI's chat.completion for a finished chat Job (one prompt, n choices)."""
    answers = job_choices(job, tokenizer, eos_token_ids)
    choices = []
    for i, a in enumerate(answers):
        logprobs = None  # every token's, the stop token's too: the probability of stopping is information
        if job.logprobs is not None and a.logprobs is not None:
            logprobs = {"content": chat_logprobs(a.tokens, a.logprobs, job.logprobs, tokenizer)}
        choices.append({"index": i, "message": {"role": "assistant", "content": a.text},
                        "finish_reason": a.finish_reason, "logprobs": logprobs})
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
        "model": model_name, "seed": None if job.sampling.greedy else job.sampling.seed, "choices": choices,
        "usage": usage(job, sum(len(a.tokens) for a in answers)),
    }


class IncrementalText:
    """One sequence's text as its tokens come, in deltas whose concatenation is `decode(ids)` of
    all of them: the non-streamed answer's text.

    A delta is what the newest tokens add to the decoding of a short window of the tokens before
    them (vLLM's prefix and read offsets): the window gives them their context (SentencePiece
    drops the leading space of a text's first word only), and a token costs two decodes of a few
    tokens, not of the whole sequence. A decoding that ends in U+FFFD is held back: the tokens end
    inside a UTF-8 sequence (byte-level tokenizers split characters), which later tokens may
    complete. `finish` flushes what is left, taken from one decoding of all the ids."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # the window: ids[prefix:read] is context, already sent
        self.read = 0  # ids[read:] are not sent yet
        self.context: str | None = ""  # decode(ids[prefix:read]), None until computed
        self.sent: list[str] = []

    def push(self, token: int) -> str:
        """The text `token` completes ("" while a character is incomplete)."""
        self.ids.append(token)
        if self.context is None:
            self.context = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(self.context) or text.endswith("\ufffd"):
            return ""
        delta = text[len(self.context):]
        self.prefix, self.read, self.context = self.read, len(self.ids), None
        self.sent.append(delta)
        return delta

    def finish(self) -> str:
        """What is left once the sequence has ended: held-back bytes, as the whole text has them."""
        whole, sent = self.decode(self.ids), "".join(self.sent)
        if whole.startswith(sent):
            rest = whole[len(sent):]
        else:  # a tokenizer whose decoding of a window differs from the whole's: the window's rest
            context = self.decode(self.ids[self.prefix:self.read]) if self.context is None else self.context
            rest = self.decode(self.ids[self.prefix:])[len(context):]
        self.prefix = self.read = len(self.ids)
        self.context = ""
        self.sent.append(rest)
        return rest


def held_back(text: str, stops: tuple[str, ...], sent: int) -> int:
    """The length of the longest end of `text` (within its unsent part, after `sent` characters)
    that is the beginning of a stop string: what must wait until the next text shows whether
    the stop string follows."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - sent), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


class StopText:
    """One choice's text, token by token, cut before the first stop string (vLLM's stop
    strings): `push` gives what a token adds that can be sent, as IncrementalText's deltas but
    holding back an end that may be the beginning of a stop string; once a stop string is seen,
    `stopped` is set and the text ends right before it (of those seen at one token, the one that
    starts first). Only generated text is searched, never the prompt. Without stop strings it is
    IncrementalText. The deltas put together are the answer's text, streamed or not (job_choices).
    hold: False only looks for the stop strings (StopWatch): `stopped` is set at the same token,
    but `push` holds nothing back (it skips that search), so its text is not for sending."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...], hold: bool = True) -> None:
        self.incremental = IncrementalText(decode)
        self.stops, self.hold = stops, hold
        self.longest = max(map(len, stops), default=0)
        self.text = ""  # the deltas so far, the held-back end included
        self.sent = 0  # characters of `text` given out
        self.stopped = False

    def push(self, token: int) -> str:
        """The text `token` adds that can be sent now ("" once stopped)."""
        return self._take(self.incremental.push(token), final=False)

    def finish(self) -> str:
        """The sequence has ended: the rest, held-back text included (up to a stop string in it)."""
        return self._take(self.incremental.finish(), final=True)

    def _take(self, delta: str, final: bool) -> str:
        if self.stopped:
            return ""
        # a stop string found now ends in `delta`: it starts at most longest - 1 characters before it
        start = max(0, len(self.text) - self.longest + 1)
        self.text += delta
        found = [i for stop in self.stops if (i := self.text.find(stop, start)) >= 0]
        if found:  # it starts after `sent`: what began it was held back
            self.stopped, end = True, min(found)
        else:
            end = len(self.text) if final or not self.hold else \
                len(self.text) - held_back(self.text, self.stops, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out


class StreamChunks:
    """The server-sent events of one streamed Job, as dicts, built from its tokens as they come
    (no I/O): OpenAI's text_completion / chat.completion.chunk objects, one id and created for all,
    each event one choice's (its "index"). With logprobs, each event carries those of its tokens;
    a chat token that adds no text has no event, so its entry waits for the next one (the finish
    event takes the stop token's). With stop strings a choice's text goes through StopText: text
    that may begin a stop string waits, the token that completes one ends the choice
    (finish_reason "stop"); rank 0 ends its sequence then (step_hook), and any token that still
    comes after it is dropped."""

    def __init__(self, job: Job, tokenizer: Any, model_name: str, eos_token_ids: tuple[int, ...]) -> None:
        self.job, self.eos, self.tokenizer = job, eos_token_ids, tokenizer
        choices = len(job.prompts)
        self.offsets = [0] * choices  # completions: each choice's text_offset so far
        self.pending: list[list[dict[str, Any]]] = [[] for _ in range(choices)]  # chat: logprobs entries not yet sent
        self.counts = [0] * choices  # each choice's tokens answered (its usage)
        self.ended = [False] * choices  # each choice's finish_reason sent
        self.head = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                     "object": "chat.completion.chunk" if job.chat else "text_completion",
                     "created": int(time.time()), "model": model_name}
        self.tail: dict[str, Any] = {"seed": None if job.sampling.greedy else job.sampling.seed}
        if job.include_usage:  # OpenAI: every chunk has the field, null but in the last one
            self.tail["usage"] = None
        self.texts: list[StopText] | None = None
        if (job.texts or job.stop) and tokenizer is not None:  # as the non-streamed answers decode
            self.texts = [StopText(choice_decoder(job.chat, tokenizer), job.stop) for _ in job.prompts]

    @property
    def done(self) -> bool:
        """Every choice has ended (its last token, or a stop string): the stream can end."""
        return all(self.ended)

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.head, "choices": choices, **self.tail}

    def start(self) -> list[dict[str, Any]]:
        """Chat: each choice's assistant role, before any content."""
        if not self.job.chat:
            return []
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                             "logprobs": None}]) for i in range(len(self.job.prompts))]

    def token(self, i: int, token: int, finished: bool,
              logprobs: TokenLogprobs | None = None) -> list[dict[str, Any]]:
        """The events of choice i's new token (with its log-probabilities when the job asked for
        them); the last token's carry its finish_reason; none after a stop string."""
        if self.ended[i]:  # after its stop string (where rank 0's StopWatch failed to end it): not answered
            return []
        reason = ("stop" if token in self.eos else "length") if finished else None
        # chat: the stop token is no part of the answer (job_choices)
        shown = not (self.job.chat and reason == "stop")
        text = ""
        if self.texts is not None:
            matcher = self.texts[i]
            text = matcher.push(token) if shown else ""
            if reason is not None:
                text += matcher.finish()
            if matcher.stopped:
                reason = "stop"
            if not self.job.texts:  # a token-id prompt: text only to find the stop strings in
                text = ""
        self.counts[i] += 1
        self.ended[i] = reason is not None
        top = self.job.logprobs
        if not self.job.chat:
            lps = None
            if top is not None and logprobs is not None:
                lps, self.offsets[i] = completion_logprobs([token], [logprobs], top, self.tokenizer, self.offsets[i])
            return [self.chunk([{"index": i, "text": text, "token_ids": [token], "finish_reason": reason,
                                 "logprobs": lps}])]
        entry = chat_logprobs([token], [logprobs], top, self.tokenizer) if top is not None and logprobs else []
        if shown:
            self.pending[i] += entry
        events = [self.chunk([{"index": i, "delta": {"content": text}, "finish_reason": None,
                               "logprobs": self.take_logprobs(i)}])] if text else []
        if reason is not None:
            if not shown:  # the stop token, not in the content: its entry rides on the finish event
                self.pending[i] += entry
            events.append(self.chunk([{"index": i, "delta": {}, "finish_reason": reason,
                                       "logprobs": self.take_logprobs(i)}]))
        return events

    def take_logprobs(self, i: int) -> dict[str, Any] | None:
        """Chat: choice i's entries waiting for an event, as its "logprobs" (None when there are none)."""
        pending, self.pending[i] = self.pending[i], []
        return {"content": pending} if pending else None

    def end(self) -> list[dict[str, Any]]:
        """After every choice has ended: the usage chunk, when asked for."""
        if not self.job.include_usage:
            return []
        return [{**self.chunk([]), "usage": usage(self.job, sum(self.counts))}]


def sse(events: list[dict[str, Any]]) -> bytes:
    """Server-sent events: one `data: JSON` line and a blank line each."""
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)


class StopWatch:
    """Rank 0's search for stop strings while a batch decodes, so that a sequence can end at the
    step after the token that completes its first stop string (Runtime.generate's on_step)
    instead of decoding on to its EOS or max_tokens: one StopText per sequence that has stop
    strings, fed its tokens as they come, as job_choices feeds the finished answer's, so it stops
    at the token where the answer is cut (a finished sequence's last token needs no search: it
    ends anyway). The answer is then what it would have been. Never raises: a decoding that fails
    ends the search for that sequence, which then decodes on and is cut afterwards, as before.
    The tokenizer is shared with the handler threads: decoding only reads it."""

    def __init__(self, tokenizer: Any, sequences: list[tuple[tuple[str, ...], bool]]) -> None:
        """sequences: per slot, (its stop strings, whether it is a chat choice: choice_decoder)."""
        self.texts: list[StopText | None] = [
            StopText(choice_decoder(chat, tokenizer), stops, hold=False) if stops and tokenizer is not None else None
            for stops, chat in sequences]

    @property
    def watching(self) -> bool:
        """Some sequence has stop strings to look for."""
        return any(t is not None for t in self.texts)

    def completed(self, slot: int, token: int, finished: bool) -> bool:
        """Whether `token`, the slot's newest, completes a stop string (the sequence can end now)."""
        text = self.texts[slot]
        if text is None or finished:
            return False
        try:
            text.push(token)
        except Exception:  # a tokenizer's surprise: no early end for it, its answer is cut as before
            self.texts[slot] = None
            return False
        if text.stopped:
            self.texts[slot] = None
        return text.stopped


def step_hook(batch: list[Job], tokenizer: Any) -> StepCallback | None:
    """Runtime.generate's on_step for a batch (its prompts are slots 0.. in order): queue each
    streamed job's tokens for its handler thread, and return the slots to end now: those whose
    stop string a token completed (StopWatch, streamed or not) and the unfinished ones of a
    streamed job whose stream has ended (`gone`: its client left, or every choice ended at a stop
    string). None when no job streams or has stop strings (nothing to pay)."""
    if not any(job.stream or job.stop for job in batch):
        return None
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
    routing: record each batch's decode routing there (while it has room), write it every
    `routing.every_s` (checked after each batch and each idle heartbeat) and on the way out,
    however the loop ends (Ctrl-C, a dead rank: what was gathered is valid data)."""
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
    is left in `waiting` for the batch after."""
    batch: list[Job] = []
    size = 0
    while waiting or not jobs.empty():
        job = waiting.pop(0) if waiting else jobs.get_nowait()
        if batch and size + len(job.prompts) > max_batch:
            waiting.insert(0, job)
            break
        batch.append(job)
        size += len(job.prompts)
    return batch
