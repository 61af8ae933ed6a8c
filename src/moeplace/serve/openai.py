"""The OpenAI contract of rank 0's HTTP server (moeplace.serve.httpserver): request bodies checked
into a Job, and a finished Job's answer, whole or as stream events, built as dicts. Apart from
the server so that the contract reads in one place and batch runs share it (cli.read_prompts
checks a JSONL line as a /v1/completions body; its records are these answers): no sockets and no
threads here, only the Job's `done` and `events` through which rank 0's main thread answers.

    POST /v1/completions  {"prompt": str | [int] | [str, ...], "max_tokens": int = min(16, cap),
                          "temperature": 0..2 = 0, "top_p": (0, 1] = 1, "top_k": int >= 1, or 0 or
                          -1 for off, "min_p": [0, 1] = 0, "seed": int, "presence_penalty" and
                          "frequency_penalty": [-2, 2] = 0, "repetition_penalty": [0.01, 100] = 1,
                          "logit_bias": {"token id": [-100, 100], ...} (up to 300) = {},
                          "logprobs": 0..5, "n": 1..16 = 1, "stop": str | [str, ...]}
                          (cap: the server's --max-new-tokens). temperature 0 (the default here,
                          not OpenAI's 1) decodes greedily; a sampling request without a seed
                          gets a random one, and the response's "seed" names it (null when
                          greedy), so it can be replayed. "n" choices per prompt, prompt-major
                          (choice p * n + j: prompt p's j-th); choice i samples with seed + i
                          (greedy: n equal choices); prompts x n must fit in --max-batch. "stop"
                          (up to 4 non-empty strings): a choice's text ends right before the
                          first stop string in its generated text, finish_reason "stop", its
                          tokens (usage, token_ids, logprobs) up to the one that completed it;
                          rank 0 finds it as the tokens come (text.StopWatch) and the sequence ends
                          at the batch's next step (its token dropped). A filter ("top_p" < 1,
                          "top_k" > 1, "min_p" > 0) without a temperature is 400 (it would be
                          silently greedy); penalties apply greedy or sampled, and so does
                          "logit_bias" (added to those tokens' raw logits before the penalties,
                          as vLLM; ids in [0, vocab), at most 300 of them). "logprobs": N
                          gives each choice OpenAI's legacy {"tokens", "token_logprobs",
                          "top_logprobs" (the N likeliest), "text_offset"}, of the raw model
                          distribution (before bias, penalties, temperature and filters, as
                          vLLM); a token is its id's decoding, or
                          "token_id:N" with no tokenizer. The other fields that would change the
                          answer (UNSUPPORTED: "echo", "suffix"; "best_of" unless equal to n)
                          are 400 unless null or their default; so is a request
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
    "stream": true (both): server-sent events (`StreamChunks`; httpserver writes them), one
                          `data: {json}` event per new token of a choice (completions:
                          "text_completion" chunks with "text" and "token_ids"; chat:
                          "chat.completion.chunk", a role delta first, a finish delta {} last),
                          the finishing token's event carrying finish_reason (each event one
                          choice's, by "index"), then `data: [DONE]`, as soon as every choice has
                          ended; text that may begin a stop string is held back until the next
                          tokens tell; with logprobs, each event carries those of its tokens
                          (chat: of the tokens since the last event, as a token that adds no text
                          has none). "stream_options": {"include_usage": bool} adds a last chunk
                          with "choices": [] and "usage"; other keys, or stream_options without
                          stream, are 400. Text deltas are decoded incrementally
                          (text.IncrementalText): their concatenation is the non-streamed text.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from moeplace.io import loads_json
from moeplace.serve.generate import TokenLogprobs
from moeplace.serve.sampling import GREEDY, Sampling, int64
from moeplace.serve.text import StopText, choice_decoder

CHAT_ROLES = ("system", "user", "assistant", "developer")
# OpenAI's newer name for the system role; chat templates know "system", so it is passed on as that
TEMPLATE_ROLE = {"developer": "system"}


# fields that change the completion, which this server does not implement: accepted only
# absent or at these values (what OpenAI clients send by default); anything else is a 400
UNSUPPORTED: dict[str, tuple[Any, ...]] = {"echo": (None, False), "suffix": (None, "")}
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
# penalties (sampling.apply_penalties), greedy or sampled: name -> (low, high, default). OpenAI's
# [-2, 2] for presence and frequency; vLLM takes any repetition penalty > 0, but past [0.01, 100]
# it is all-or-nothing already and a float32 logit divided by it could overflow to inf
PENALTIES: dict[str, tuple[float, float, float]] = {
    "presence_penalty": (-2.0, 2.0, 0.0), "frequency_penalty": (-2.0, 2.0, 0.0),
    "repetition_penalty": (0.01, 100.0, 1.0),
}
# "logit_bias": OpenAI's range of a bias (-100 bans a token, 100 all but forces it), and a cap of
# ours on the entries: OpenAI's reference names none we could confirm; 300 is far more than
# banning a few tokens or forcing a choice among a few labels needs, and bounds a request's table
LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS = 100.0, 300
TOKEN_ID = re.compile(r"-?[0-9]+")  # a logit_bias key: a decimal integer (vLLM reads it with int())
# alternatives per token: OpenAI's caps ("logprobs" of completions, "top_logprobs" of chat)
MAX_LOGPROBS, MAX_TOP_LOGPROBS = 5, 20
MIN_LOGPROB = -9999.0  # vLLM's floor: JSON has no -Infinity
MAX_N = 16  # choices per prompt ("n")
# "stop": OpenAI's 4 strings; the length bounds the per-token work of holding back a stop's beginning
MAX_STOPS, MAX_STOP_CHARS = 4, 1024


class BadRequest(ValueError):
    """Invalid client input: answered with HTTP 400 and the message."""


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


def _is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    # bool is an int (True == 1): best_of true is not the default 1
    return any(value == d and type(value) is type(d) for d in allowed)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_penalties(doc: dict[str, Any]) -> Sampling:
    """GREEDY with the request's PENALTIES (null: the default), checked (BadRequest)."""
    values = []
    for name, (low, high, default) in PENALTIES.items():
        value = doc.get(name)
        if value is not None and not (_is_number(value) and low <= value <= high):  # NaN fails too
            raise BadRequest(f"\"{name}\" must be a number in [{low:g}, {high:g}] ({default:g}: off), "
                             f"got {json.dumps(value)[:80]}")
        values.append(default if value is None else float(value))
    presence, frequency, repetition = values
    return dataclasses.replace(GREEDY, presence_penalty=presence, frequency_penalty=frequency,
                               repetition_penalty=repetition)


def parse_logit_bias(doc: dict[str, Any], vocab: int) -> tuple[tuple[int, float], ...]:
    """The request's "logit_bias" ({"token id": bias}; null and {}: none) as Sampling.logit_bias,
    (id, bias) pairs sorted by id, checked (BadRequest): keys decimal token ids in [0, vocab)
    (vLLM refuses ids out of range too), one entry per id, values finite numbers in
    [-LOGIT_BIAS_RANGE, LOGIT_BIAS_RANGE], at most MAX_LOGIT_BIAS entries."""
    bias = doc.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise BadRequest(f"\"logit_bias\" must be an object {{\"token id\": bias in [-{LOGIT_BIAS_RANGE:g}, "
                         f"{LOGIT_BIAS_RANGE:g}], ...}}, got {json.dumps(bias)[:80]}")
    if len(bias) > MAX_LOGIT_BIAS:
        raise BadRequest(f"\"logit_bias\" has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    pairs: dict[int, float] = {}
    for key, value in bias.items():
        # 20 digits: past int64, and short of int()'s limit on digits (a ValueError)
        token = int(key) if TOKEN_ID.fullmatch(key) and len(key) <= 20 else None
        if token is None and TOKEN_ID.fullmatch(key):
            token = vocab  # a long number: out of range
        if token is None or not 0 <= token < vocab:
            raise BadRequest(f"\"logit_bias\": key {json.dumps(key)[:80]} is not a token id of this model "
                             f"(an integer in [0, {vocab}), as a string)")
        if token in pairs:
            raise BadRequest(f"\"logit_bias\": token id {token} is given twice")
        if not (_is_number(value) and -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE):  # NaN fails too
            raise BadRequest(f"\"logit_bias\": the bias of token id {token} must be a number in "
                             f"[-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}], got {json.dumps(value)[:80]}")
        pairs[token] = float(value)
    return tuple(sorted(pairs.items()))


def parse_sampling(doc: dict[str, Any], vocab: int) -> Sampling:
    """The request's temperature, top_p, top_k, min_p, seed, penalties and logit bias (token ids
    in [0, vocab)), checked (BadRequest). A request that samples without a seed gets a random one
    (the response reports it); a greedy one keeps GREEDY's, with its penalties and bias. A filter
    without a temperature is refused: answering it greedily would hide that it was ignored.
    Penalties and a bias need no temperature: they change the greedy answer too."""
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
    greedy = dataclasses.replace(parse_penalties(doc), logit_bias=parse_logit_bias(doc, vocab))
    if temperature == 0:  # greedy asked for: a filter on the sampled set changes nothing
        return greedy
    for name, neutral in SAMPLING.items():
        if _is_one_of(doc.get(name), neutral):
            continue
        if temperature is None:
            raise BadRequest(f"\"{name}\": {json.dumps(doc.get(name))[:80]} asks for sampling, but the temperature "
                             "is 0 (the default here, unlike OpenAI's 1): send a \"temperature\" in "
                             f"(0, {MAX_TEMPERATURE:g}] to sample, or leave {name} out")
    if temperature is None:
        return greedy
    params = dataclasses.replace(greedy, temperature=float(temperature), top_p=1.0 if top_p is None else float(top_p),
                                 top_k=0 if top_k is None or top_k < 1 else min(top_k, 1 << 31),  # int64-safe
                                 seed=0 if seed is None else seed, min_p=0.0 if min_p is None else float(min_p))
    if params.greedy:  # top_k 1: the argmax at any temperature
        return greedy
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


def check_options(doc: dict[str, Any], unsupported: dict[str, tuple[Any, ...]], what: str,
                  vocab: int) -> tuple[Sampling, int]:
    """Refuse what this server cannot honour (`unsupported` fields off their defaults; `what`
    names the endpoint in the message); return the request's sampling (a logit bias's token ids
    in [0, vocab)) and "n" (1..MAX_N, null 1).
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
            accepted = " or ".join(json.dumps(d) for d in defaults)  # what changes nothing: null, false, "auto" ...
            raise BadRequest(f"\"{name}\" is not supported ({what}): "
                             f"leave it out or send {accepted}, got {json.dumps(doc.get(name))[:80]}")
    return parse_sampling(doc, vocab), n


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
    sampling, n = check_options(doc, UNSUPPORTED, "plain completions", vocab)
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
                                 f"leave it out or send null or [], got {json.dumps(value)[:80]}")
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
    sampling, n = check_options(doc, CHAT_UNSUPPORTED, "chat completions", vocab)
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


def completion_response(job: Job, tokenizer: Any, model_name: str, eos_token_ids: tuple[int, ...]) -> dict[str, Any]:
    """OpenAI's text_completion for a finished completions Job (its prompts x n choices)."""
    choices = []
    answers = job_choices(job, tokenizer, eos_token_ids)
    for i, a in enumerate(answers):
        logprobs = None
        if job.logprobs is not None and a.logprobs is not None:
            logprobs = completion_logprobs(a.tokens, a.logprobs, job.logprobs, tokenizer)[0]
        choices.append({"index": i, "text": a.text, "token_ids": a.tokens, "finish_reason": a.finish_reason,
                        "logprobs": logprobs})
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
        "model": model_name, "choices": choices, "seed": None if job.sampling.greedy else job.sampling.seed,
        "usage": usage(job, sum(len(a.tokens) for a in answers)),
    }


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


class StreamChunks:
    """The server-sent events of one streamed Job, as dicts, built from its tokens as they come
    (no I/O): OpenAI's text_completion / chat.completion.chunk objects, one id and created for all,
    each event one choice's (its "index"). With logprobs, each event carries those of its tokens;
    a chat token that adds no text has no event, so its entry waits for the next one (the finish
    event takes the stop token's). With stop strings a choice's text goes through StopText: text
    that may begin a stop string waits, the token that completes one ends the choice
    (finish_reason "stop"); rank 0 ends its sequence then (httpserver.step_hook), and any token that still
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
        if self.ended[i]:  # after its stop string (where rank 0's text.StopWatch failed to end it): not answered
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
