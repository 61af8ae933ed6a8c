"""`"stop"` and `"n"` in `moeplace serve`'s HTTP API: a stop string ends a choice's text right
before it (finish_reason "stop", its tokens up to the one that completed it), streamed and not;
n choices per prompt, prompt-major, each sampled with seed + its index; refusals. Every expected
answer is derived from what the same server returns without stop, or with n = 1."""

from __future__ import annotations

import http.client
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moeplace.models.tiny import byte_tokenizer
from moeplace.serve.generate import Runtime
from moeplace.serve.openai import BadRequest, parse_chat, parse_completion
from moeplace.serve.text import StopText
from test_serve_chat import MESSAGES
from test_serve_cli import exposition
from test_serve_stream import joined_completion, post, stream

LIMIT = 16  # the server's --max-new-tokens; the serving fixture's --max-batch is 8
PROMPT = "The cat"  # its greedy answer runs to LIMIT tokens, no EOS, with ASCII and split characters
SAMPLED = {"temperature": 1.0, "seed": 41}


@pytest.fixture(scope="module")
def server(chat_model: Path, chat_tokenizer: Any, one_rank_runtime: Callable[[Path], Runtime],
           serving: Callable[..., Any]) -> Iterator[int]:
    # named as test_serve_stream's server: its joined_completion checks the name
    with serving(one_rank_runtime(chat_model), chat_tokenizer, LIMIT, "streamy") as port:
        yield port


def completion(port: int, body: dict[str, Any]) -> dict[str, Any]:
    code, doc = post(port, "/v1/completions", {"max_tokens": LIMIT, **body})
    assert code == 200, doc
    return doc


def ascii_pair(text: str, start: int) -> str:
    """The first two printable ASCII characters in a row at or after `start`: one byte, so one
    token, each (the stop string spans a token boundary)."""
    i = next(i for i in range(start, len(text) - 1) if text[i:i + 2].isascii() and text[i:i + 2].isprintable())
    return text[i:i + 2]


def completing(tokenizer: Any, tokens: list[int], stop: str, **decode: Any) -> int:
    """How many tokens it takes for `stop` to appear in their decoding."""
    return next(c for c in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:c], **decode))


def test_a_stop_string_ends_the_text_before_it(server: int, chat_tokenizer: Any) -> None:
    full = completion(server, {"prompt": PROMPT})
    (whole,) = full["choices"]
    assert whole["finish_reason"] == "length" and len(whole["token_ids"]) == LIMIT
    stop = ascii_pair(whole["text"], 1)  # not at the very start: some text comes before it
    cut = whole["text"].index(stop)
    count = completing(chat_tokenizer, whole["token_ids"], stop)
    assert 0 < cut and count < LIMIT
    for form in (stop, [stop]):
        doc = completion(server, {"prompt": PROMPT, "stop": form, "logprobs": 2})
        (choice,) = doc["choices"]
        assert choice["text"] == whole["text"][:cut] and choice["finish_reason"] == "stop"
        assert choice["token_ids"] == whole["token_ids"][:count]  # up to the one completing the stop string
        assert doc["usage"] == {"prompt_tokens": full["usage"]["prompt_tokens"], "completion_tokens": count,
                                "total_tokens": full["usage"]["prompt_tokens"] + count}
        assert len(choice["logprobs"]["tokens"]) == len(choice["logprobs"]["token_logprobs"]) == count
    # the stop string is looked for in the generated text only, not in the prompt
    assert PROMPT not in whole["text"]
    assert completion(server, {"prompt": PROMPT, "stop": PROMPT})["choices"][0] == whole
    # a token-id prompt answers no text, but its tokens end at the stop string all the same
    ids = completion(server, {"prompt": chat_tokenizer.encode(PROMPT), "stop": stop})["choices"][0]
    assert ids["text"] == "" and ids["token_ids"] == whole["token_ids"][:count] and ids["finish_reason"] == "stop"


def decode_figures(port: int) -> tuple[int, int]:
    """The server's (tokens all-reduces of the decode phase, tokens generated) so far: one
    all-reduce per decode step of a batch, and one after its prefill."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/metrics")
        values = exposition(conn.getresponse().read().decode())
    finally:
        conn.close()
    return (int(values.get('moeplace_collectives_total{phase="decode",kind="tokens"}', 0)),
            int(values["moeplace_generated_tokens_total"]))


def test_a_stopped_sequence_ends_at_the_next_step_and_its_neighbour_runs_on(server: int, chat_tokenizer: Any) -> None:
    """The batch of a request whose stop string completes at token `count` of LIMIT runs `count`
    + 1 steps (the last one's token dropped), not LIMIT (before: LIMIT); the answer is the same;
    a sequence beside it in the batch runs on to its end, token for token what it is alone."""
    whole = completion(server, {"prompt": PROMPT})["choices"][0]
    stop = ascii_pair(whole["text"], 1)
    count = completing(chat_tokenizer, whole["token_ids"], stop)
    other = completion(server, {"prompt": "Grüße"})["choices"][0]
    assert count < LIMIT // 2 and stop not in other["text"] and len(other["token_ids"]) == LIMIT
    for stream_it in (False, True):
        body = {"prompt": PROMPT, "max_tokens": LIMIT, "stop": stop}
        before = decode_figures(server)
        if stream_it:
            _, events = stream(server, "/v1/completions", body)
            (choice,) = joined_completion(events, 1)
        else:
            (choice,) = completion(server, body)["choices"]
        # a stream can end (its stop string seen) before its batch has been counted: wait for it
        deadline = time.monotonic() + 30
        while (after := decode_figures(server)) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert choice["token_ids"] == whole["token_ids"][:count] and choice["finish_reason"] == "stop"
        assert choice["text"] == whole["text"][:whole["text"].index(stop)]
        assert (after[0] - before[0], after[1] - before[1]) == (count + 1, count)
    doc = completion(server, {"prompt": [PROMPT, "Grüße"], "stop": stop})
    assert [c["token_ids"] for c in doc["choices"]] == [whole["token_ids"][:count], other["token_ids"]]
    assert [c["finish_reason"] for c in doc["choices"]] == ["stop", "length"]
    assert doc["choices"][1]["text"] == other["text"]


def test_a_stop_string_not_in_the_text_changes_nothing_and_is_held_back_when_begun(server: int) -> None:
    whole = completion(server, {"prompt": PROMPT})["choices"][0]
    pair = ascii_pair(whole["text"], 0)
    i = whole["text"].index(pair)
    stop = pair[0] + "\x7f"  # begins like the text at i, then differs
    assert stop not in whole["text"]
    doc = completion(server, {"prompt": PROMPT, "stop": [stop]})
    assert doc["choices"][0] == whole and doc["usage"]["completion_tokens"] == LIMIT
    _, events = stream(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": LIMIT, "stop": [stop]})
    assert joined_completion(events, 1) == [whole]
    texts = [e["choices"][0]["text"] for e in events]
    sent = "".join(texts[:texts.index(pair[0] + pair[1]) if pair[0] + pair[1] in texts else len(texts)])
    # the character that may begin the stop string went out only with the one after it
    assert pair in texts and sent == whole["text"][:i], texts


def test_a_stop_string_across_tokens_of_one_character_in_chat(server: int, chat_tokenizer: Any) -> None:
    """The chat answer's content has a character of two or more bytes (two tokens): stopping at it
    needs both; the streamed deltas put together are the content."""
    full = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": LIMIT, "logprobs": True})[1]
    (whole,) = full["choices"]
    content = whole["message"]["content"]
    stop = next(c for c in content if len(c.encode()) > 1 and c != "\ufffd")
    cut = content.index(stop)
    prompt = chat_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False)
    tokens = completion(server, {"prompt": [int(t) for t in prompt]})["choices"][0]["token_ids"]
    count = completing(chat_tokenizer, tokens, stop, skip_special_tokens=True)
    assert len(stop.encode()) > 1 and count < len(whole["logprobs"]["content"])
    body = {"messages": MESSAGES, "max_tokens": LIMIT, "stop": [stop], "logprobs": True}
    code, doc = post(server, "/v1/chat/completions", body)
    assert code == 200
    (choice,) = doc["choices"]
    assert choice["message"]["content"] == content[:cut] and choice["finish_reason"] == "stop"
    assert doc["usage"]["completion_tokens"] == count == len(choice["logprobs"]["content"])
    assert choice["logprobs"]["content"] == whole["logprobs"]["content"][:count]
    _, events = stream(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    *chunks, last = events
    deltas = [e["choices"][0] for e in chunks]
    assert "".join(d["delta"].get("content", "") for d in deltas) == content[:cut]
    assert deltas[-1]["delta"] == {} and deltas[-1]["finish_reason"] == "stop" and last["usage"] == doc["usage"]
    assert [x for d in deltas if d["logprobs"] for x in d["logprobs"]["content"]] == choice["logprobs"]["content"]


def test_streamed_stop_deltas_are_the_answer_and_the_earliest_stop_wins(server: int) -> None:
    whole = completion(server, {"prompt": PROMPT})["choices"][0]
    first = ascii_pair(whole["text"], 1)
    after = whole["text"].index(first) + len(first)
    # a character that first appears after the first stop string
    later = next(c for c in whole["text"][after:] if c.isascii() and c.isprintable() and c not in whole["text"][:after])
    for stops in ([later, first], [first, "\x7f\x7f\x7f", later]):
        body = {"prompt": [PROMPT, "hello"], "stop": stops, "logprobs": 1}
        doc = completion(server, body)
        assert doc["choices"][0]["text"] == whole["text"][:whole["text"].index(first)]
        resp, events = stream(server, "/v1/completions", {**body, "max_tokens": LIMIT})
        choices = [{**c, "logprobs": None} for c in doc["choices"]]
        assert joined_completion([{**e, "choices": [{**e["choices"][0], "logprobs": None}]} for e in events],
                                 2) == choices
        for i, c in enumerate(doc["choices"]):  # each event's logprobs: those of its token
            mine = [e["choices"][0]["logprobs"] for e in events if e["choices"][0]["index"] == i]
            assert [x["tokens"][0] for x in mine] == c["logprobs"]["tokens"]


def test_n_seeded_choices_are_distinct_and_each_replays_alone(server: int) -> None:
    prompts, short = [PROMPT, "hello"], {"max_tokens": 8, **SAMPLED}
    doc = completion(server, {"prompt": prompts, "n": 3, **short})
    assert [c["index"] for c in doc["choices"]] == list(range(6)) and doc["seed"] == SAMPLED["seed"]
    tokens = [c["token_ids"] for c in doc["choices"]]
    assert len({tuple(t) for t in tokens[:3]}) == 3 and len({tuple(t) for t in tokens[3:]}) == 3
    for i, choice in enumerate(doc["choices"]):  # prompt-major: choice i is prompt i // n, with seed + i
        alone = completion(server, {"prompt": prompts[i // 3], **short, "seed": SAMPLED["seed"] + i})
        assert {**alone["choices"][0], "index": i} == choice
    again = completion(server, {"prompt": prompts, "n": 3, **short})
    assert (again["choices"], again["usage"]) == (doc["choices"], doc["usage"])
    alone_usage = [completion(server, {"prompt": p, "max_tokens": 1})["usage"]["prompt_tokens"] for p in prompts]
    assert doc["usage"]["prompt_tokens"] == sum(alone_usage)  # each prompt once, as OpenAI counts it
    assert doc["usage"]["completion_tokens"] == sum(len(t) for t in tokens)
    # streamed: each event's choice by its index; put together, the answer
    _, events = stream(server, "/v1/completions", {"prompt": prompts, "n": 3, **short})
    assert joined_completion(events, 6) == doc["choices"]
    # chat: n choices of the one prompt, as distinct, streamed alike ("best_of" equal to n: accepted)
    body = {"messages": MESSAGES, "n": 3, "best_of": 3, **short}
    code, chat = post(server, "/v1/chat/completions", body)
    assert code == 200 and [c["index"] for c in chat["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in chat["choices"]}) == 3
    _, events = stream(server, "/v1/chat/completions", body)
    for i, c in enumerate(chat["choices"]):
        deltas = [e["choices"][0] for e in events if e["choices"][0]["index"] == i]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(d["delta"].get("content", "") for d in deltas[1:]) == c["message"]["content"]
        assert deltas[-1]["finish_reason"] == c["finish_reason"]


def test_n_greedy_choices_are_identical(server: int) -> None:
    one = completion(server, {"prompt": PROMPT, "stop": "\x7f"})["choices"][0]
    doc = completion(server, {"prompt": PROMPT, "n": 3, "stop": "\x7f"})
    assert doc["choices"] == [{**one, "index": i} for i in range(3)] and doc["seed"] is None
    assert doc["usage"]["completion_tokens"] == 3 * len(one["token_ids"])


def test_n_times_prompts_over_max_batch_is_a_400(server: int, chat_tokenizer: Any) -> None:
    code, doc = post(server, "/v1/completions", {"prompt": [PROMPT, "a", "b"], "n": 3})
    message = doc["error"]["message"]
    assert code == 400 and "\"n\" 3 = 9 sequences" in message and "at most 8" in message and "--max-batch" in message
    code, doc = post(server, "/v1/chat/completions", {"messages": MESSAGES, "n": 9})
    assert code == 400 and "\"n\" 9" in doc["error"]["message"] and "--max-batch" in doc["error"]["message"]
    assert completion(server, {"prompt": [PROMPT, "a"], "n": 4, "max_tokens": 1})["usage"]["completion_tokens"] == 8


@pytest.mark.parametrize("body, message", [
    ({"stop": [""]}, "\"stop\" must be a string or a list of at most 4 strings, each of 1 to 1024 characters"),
    ({"stop": ""}, "\"stop\" must be a string or a list"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "\"stop\" must be a string or a list of at most 4"),
    ({"stop": 7}, "\"stop\" must be a string or a list"),
    ({"stop": ["a", 3]}, "\"stop\" must be a string or a list"),
    ({"stop": {"a": 1}}, "\"stop\" must be a string or a list"),
    ({"stop": "x" * 1025}, "\"stop\" must be a string or a list"),
    ({"stop": ["a", "\ud800"]}, "stop[1] is not valid Unicode text"),
    ({"n": 0}, "\"n\" must be 1 to 16 (an integer: the completions per prompt), got 0"),
    ({"n": 17}, "\"n\" must be 1 to 16"),
    ({"n": 2.0}, "\"n\" must be 1 to 16"),
    ({"n": True}, "\"n\" must be 1 to 16"),
    ({"n": "2"}, "\"n\" must be 1 to 16"),
    ({"n": 3, "best_of": 4}, "\"best_of\" is not supported"),
    ({"best_of": 2}, "\"best_of\" is not supported"),
    ({"n": 2, "best_of": 2.0}, "\"best_of\" is not supported"),
])
def test_bad_stop_and_n_values_are_a_400(chat_tokenizer: Any, server: int, body: dict[str, Any], message: str) -> None:
    for parse in (lambda b: parse_completion(b, chat_tokenizer, 256, 256, LIMIT),
                  lambda b: parse_chat(b, chat_tokenizer, "streamy", 256, 256, LIMIT)):
        with pytest.raises(BadRequest) as e:
            parse(json.dumps({"prompt": "hi", "messages": MESSAGES, **body}).encode())
        assert str(e.value).startswith(message), str(e.value)
    code, doc = post(server, "/v1/completions", {"prompt": "hi", **body})
    assert code == 400 and doc["error"]["message"].startswith(message)


def test_neutral_stop_and_n_values_and_no_tokenizer() -> None:
    for neutral in ({"stop": None}, {"stop": []}, {"n": None, "best_of": None}, {"n": 1, "best_of": 1}):
        job = parse_completion(json.dumps({"prompt": [1, 2], **neutral}).encode(), None, 256, 256, LIMIT)
        assert (job.prompts, job.n, job.stop) == ([[1, 2]], 1, ())
    job = parse_completion(json.dumps({"prompt": [1, 2], "n": 3, "best_of": 3}).encode(), None, 256, 256, LIMIT)
    assert (job.prompts, job.n) == ([[1, 2]] * 3, 3)
    # no tokenizer: no text to look for a stop string in
    with pytest.raises(BadRequest, match="\"stop\" is not supported: this model has no tokenizer"):
        parse_completion(json.dumps({"prompt": [1, 2], "stop": "x"}).encode(), None, 256, 256, LIMIT)


def test_stop_text_sends_only_what_the_answer_keeps() -> None:
    """Any bytes (split and invalid characters too), any stop strings: the text ends at the token
    whose decoding first holds a stop string, right before the first one in it; no delta ever
    sends what the answer then drops; the deltas put together are the answer."""
    tok = byte_tokenizer()
    rng = random.Random(1)
    alphabet = [*b"ab\n", *"é".encode()]
    for _ in range(500):
        ids = [rng.choice(alphabet) for _ in range(rng.randrange(1, 14))]
        stops = tuple(dict.fromkeys(tok.decode([rng.choice(alphabet) for _ in range(rng.randrange(1, 4))])
                                    for _ in range(rng.randrange(1, 4))))
        if any("\ufffd" in s for s in stops):  # (a stop string is text, not a broken character)
            continue
        prefixes = [tok.decode(ids[:c]) for c in range(1, len(ids) + 1)]
        ends = next((c for c, p in enumerate(prefixes, 1) if any(s in p for s in stops)), None)
        if ends is None:
            want = tok.decode(ids)
        else:
            p = prefixes[ends - 1]
            want = p[:min(p.find(s) for s in stops if s in p)]
        text, sent = StopText(tok.decode, stops), ""
        watch = StopText(tok.decode, stops, hold=False)  # StopWatch's: the same token stops it
        for c, token in enumerate(ids, 1):
            sent += text.push(token)
            watch.push(token)
            assert want.startswith(sent), (ids, stops, sent, want)
            assert text.stopped == watch.stopped == (c == ends), (ids, stops, c)
            if text.stopped:
                break
        else:
            sent += text.finish()
        assert sent == want, (ids, stops)
