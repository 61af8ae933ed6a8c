"""/v1/chat/completions in `moeplace serve`: the prompt is the tokenizer's chat template, the answer
is what /v1/completions gives on those ids, in OpenAI's chat.completion shape; refusals are one line."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from moeplace.models.tiny import build_tiny_model, byte_tokenizer
from moeplace.serve.cli import load_tokenizer
from moeplace.serve.generate import Runtime
from moeplace.serve.openai import BadRequest, Job, chat_response, parse_chat
from moeplace.serve.sampling import GREEDY, Sampling
from test_serve_cli import exposition, http

# a plain Jinja template (transformers renders it) that also refuses, as real templates do
TEMPLATE = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('Conversation must start with a "
            "system or user message') }}{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
RENDERED = "<|system|>Be brief.\n<|user|>hi\n<|assistant|>"  # what TEMPLATE makes of MESSAGES
NEW = 6
LIMIT = 16  # the servers' --max-new-tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, its byte tokenizer saved again with TEMPLATE (as a chat model ships it)."""
    path = build_tiny_model("qwen3_moe", tmp_path_factory.mktemp("serve-chat") / "chatty", num_experts=8, top_k=2,
                            num_layers=3, seed=4)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(model: Path) -> Any:
    tok = load_tokenizer(str(model))  # as serve loads it: the template must survive save and load
    assert tok.chat_template == TEMPLATE
    return tok


@pytest.fixture(scope="module")
def rt(model: Path, one_rank_runtime: Callable[[Path], Runtime]) -> Runtime:
    return one_rank_runtime(model)


@pytest.fixture
def server(rt: Runtime, tokenizer: Any, serving: Callable[..., Any]) -> Iterator[int]:
    """Per test: two loops on one runtime would run its batches concurrently."""
    with serving(rt, tokenizer, LIMIT, "chatty") as port:
        yield port


def post(port: int, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    code, text, _ = http(port, path, json.dumps(body).encode())
    return code, json.loads(text)


def chat(port: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    return post(port, "/v1/chat/completions", body)


def template_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def parse(body: dict[str, Any], tokenizer: Any, max_len: int = 256) -> Job:
    return parse_chat(json.dumps(body).encode(), tokenizer, "chatty", 256, max_len, LIMIT)


def test_the_prompt_is_the_chat_template_with_the_generation_prompt(tokenizer: Any) -> None:
    job = parse({"messages": MESSAGES, "max_tokens": 5}, tokenizer)
    assert job.prompts == [template_ids(tokenizer, MESSAGES)]
    assert job.prompts == [list(RENDERED.encode())]  # byte tokenizer: id = byte; the generation prompt is there
    assert job.chat and job.texts and job.max_tokens == 5 and job.sampling == GREEDY
    assert parse({"messages": MESSAGES, "max_completion_tokens": 7}, tokenizer).max_tokens == 7
    assert parse({"messages": MESSAGES, "max_completion_tokens": 7, "max_tokens": 7}, tokenizer).max_tokens == 7
    assert parse({"messages": MESSAGES, "max_tokens": None}, tokenizer).max_tokens == LIMIT  # default min(16, cap)
    assert parse({"messages": MESSAGES, "temperature": 0.5, "seed": 3}, tokenizer).sampling == Sampling(0.5, seed=3)
    # what OpenAI clients send at their defaults is accepted
    job = parse({"messages": [{"role": "user", "content": "", "name": None}], "model": "x", "stream": False, "n": 1,
                 "logprobs": False, "response_format": {"type": "text"}, "tools": [], "user": "u"}, tokenizer)
    assert job.prompts == [list(b"<|user|>\n<|assistant|>")]
    # OpenAI's "developer" role (its newer name for system) reaches the template as "system"
    developer = [{"role": "developer", "content": "Be brief."}, MESSAGES[1]]
    assert parse({"messages": developer}, tokenizer).prompts == [template_ids(tokenizer, MESSAGES)]


def test_the_answer_is_the_completion_of_those_ids(server: int, tokenizer: Any) -> None:
    ids = template_ids(tokenizer, MESSAGES)
    code, doc = chat(server, {"model": "chatty", "messages": MESSAGES, "max_tokens": NEW})
    assert code == 200, doc
    code, plain = post(server, "/v1/completions", {"prompt": ids, "max_tokens": NEW})
    assert code == 200
    toks = plain["choices"][0]["token_ids"]
    assert set(doc) == {"id", "object", "created", "model", "choices", "usage", "seed"}
    assert doc["id"].startswith("chatcmpl-") and doc["object"] == "chat.completion" and doc["model"] == "chatty"
    assert isinstance(doc["created"], int) and doc["seed"] is None
    (choice,) = doc["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant",
                                                         "content": tokenizer.decode(toks, skip_special_tokens=True)}
    assert choice["finish_reason"] == plain["choices"][0]["finish_reason"] == "length" and len(toks) == NEW
    assert doc["usage"] == {"prompt_tokens": len(ids), "completion_tokens": NEW, "total_tokens": len(ids) + NEW}
    assert doc["usage"] == plain["usage"]
    # max_completion_tokens, OpenAI's newer name, caps it the same way
    code, short = chat(server, {"messages": MESSAGES, "max_completion_tokens": 2})
    assert code == 200 and short["usage"]["completion_tokens"] == 2
    assert short["choices"][0]["message"]["content"] == tokenizer.decode(toks[:2], skip_special_tokens=True)


def test_sampling_with_a_seed_replays(server: int, tokenizer: Any) -> None:
    ids = template_ids(tokenizer, MESSAGES)
    body = {"messages": MESSAGES, "max_tokens": NEW, "temperature": 1.8, "top_k": 50}
    code, doc = chat(server, body)
    seed = doc["seed"]
    assert code == 200 and isinstance(seed, int)  # no seed sent: a random one, reported
    again = chat(server, {**body, "seed": seed})[1]
    assert again["choices"] == doc["choices"] and again["seed"] == seed
    code, plain = post(server, "/v1/completions", {"prompt": ids, "max_tokens": NEW, "temperature": 1.8, "top_k": 50,
                                                   "seed": seed})
    assert code == 200 and doc["choices"][0]["message"]["content"] == tokenizer.decode(
        plain["choices"][0]["token_ids"], skip_special_tokens=True)
    greedy = chat(server, {"messages": MESSAGES, "max_tokens": NEW})[1]["choices"][0]["message"]["content"]
    others = {chat(server, {**body, "seed": s})[1]["choices"][0]["message"]["content"] for s in range(3)}
    assert len(others | {greedy}) > 1  # the seed matters: the replay check can fail


def test_chat_and_completions_share_the_queue_batches_and_counters(rt: Runtime, tokenizer: Any,
                                                                   serving: Callable[..., Any]) -> None:
    """Concurrent chat and completion requests: each answer is the one it gets alone, and
    /metrics counts both kinds (and chat's refusals) in the same families."""
    ids = template_ids(tokenizer, MESSAGES)
    with serving(rt, tokenizer, LIMIT, "chatty") as port:
        alone = [chat(port, {"messages": MESSAGES, "max_tokens": NEW})[1]["choices"],
                 post(port, "/v1/completions", {"prompt": ids, "max_tokens": NEW})[1]["choices"]]
        results: list[Any] = [None] * 6

        def ask(i: int) -> None:
            results[i] = (chat(port, {"messages": MESSAGES, "max_tokens": NEW}) if i % 2 == 0
                          else post(port, "/v1/completions", {"prompt": ids, "max_tokens": NEW}))[1]["choices"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == [alone[i % 2] for i in range(6)]
        assert chat(port, {"messages": []})[0] == 400
        code, text, _ = http(port, "/metrics")
        values = exposition(text)
        assert values["moeplace_requests_total"] == "8" and values["moeplace_rejected_requests_total"] == "1"
        assert int(values["moeplace_generated_tokens_total"]) == 8 * NEW


@pytest.mark.parametrize("body, message", [
    ({}, "\"messages\" must be a list of {\"role\", \"content\"} objects, got null"),
    ({"messages": "hi"}, "\"messages\" must be a list of {\"role\", \"content\"} objects, got \"hi\""),
    ({"messages": []}, "\"messages\" is empty: send at least one message"),
    ({"messages": [MESSAGES[0], "hi"]}, "\"messages[1]\" must be an object with \"role\" and \"content\", got \"hi\""),
    ({"messages": [{"content": "hi"}]}, "\"messages[0].role\": null is not supported: one of system, user, assistant, developer"),
    ({"messages": [MESSAGES[0], {"role": "tool", "content": "x"}]}, "\"messages[1].role\": \"tool\" is not supported"),
    ({"messages": [{"role": "User", "content": "x"}]}, "\"messages[0].role\": \"User\" is not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     "\"messages[0].content\" must be a string (content parts are not supported), got [{\"type\": \"text\""),
    ({"messages": [{"role": "user"}]}, "\"messages[0].content\" must be a string (content parts are not supported), "
                                       "got null"),
    ({"messages": [MESSAGES[0], {"role": "user", "content": 7}]}, "\"messages[1].content\" must be a string"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]},
     "\"messages[0].name\" is not supported (only role and content are read): leave it out or send null or [], got \"bob\""),
    ({"messages": [{"role": "assistant", "content": "x"}]},
     "the chat template of model chatty refused the messages (TemplateError: Conversation must start with a system "
     "or user message)"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens must be an integer in [1, 16] (the server's --max-new-tokens)"),
    ({"messages": MESSAGES, "max_completion_tokens": 17}, "max_completion_tokens must be an integer in [1, 16]"),
    ({"messages": MESSAGES, "max_completion_tokens": 4, "max_tokens": 5},
     "\"max_completion_tokens\" and \"max_tokens\" differ: send one"),
    ({"messages": MESSAGES, "stream_options": {"include_usage": True}},
     "\"stream_options\" is only for \"stream\": true: leave it out or null"),
    ({"messages": MESSAGES, "n": 17}, "\"n\" must be 1 to 16"),
    ({"messages": MESSAGES, "top_p": 0.9}, "\"top_p\": 0.9 asks for sampling, but the temperature is 0"),
    ({"messages": MESSAGES, "temperature": 3}, "\"temperature\": 3 is not supported"),
    ({"messages": MESSAGES, "logprobs": 1}, "\"logprobs\" must be true or false (chat completions; "
                                            "\"top_logprobs\" says how many alternatives), got 1"),
    ({"messages": MESSAGES, "top_logprobs": 2}, "\"top_logprobs\" needs \"logprobs\": true"),
    ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "\"tools\" is not supported (chat completions)"),
    ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "\"response_format\" is not supported"),
    ({"messages": MESSAGES, "stop": [""]}, "\"stop\" must be a string or a list")])
def test_bad_requests_are_a_400_naming_the_first_bad_field(body: dict, message: str, tokenizer: Any) -> None:
    with pytest.raises(BadRequest) as e:
        parse(body, tokenizer)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_a_prompt_past_the_context_is_refused(tokenizer: Any) -> None:
    with pytest.raises(BadRequest, match=r"prompt \(44 tokens\) \+ max_tokens exceeds the context limit 50"):
        parse({"messages": MESSAGES, "max_tokens": 7}, tokenizer, max_len=50)
    assert parse({"messages": MESSAGES, "max_tokens": 6}, tokenizer, max_len=50).prompts[0] == list(RENDERED.encode())


def test_refusals_over_http_and_the_routes(server: int) -> None:
    code, doc = chat(server, {"messages": [{"role": "user", "content": None}]})
    assert code == 400 and doc["error"]["type"] == "invalid_request_error"
    assert doc["error"]["message"].startswith("\"messages[0].content\" must be a string")
    code, text, _ = http(server, "/v1/chat/completions", b"{not json")
    assert code == 400 and json.loads(text)["error"]["message"].startswith("body is not valid JSON")
    code, text, headers = http(server, "/v1/chat/completions")
    assert code == 405 and headers["Allow"] == "POST"
    code, text, _ = http(server, "/v1/chat")
    assert code == 404 and json.loads(text)["error"]["message"] == (
        "no route /v1/chat (routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, "
        "GET /metrics)")
    assert chat(server, {"messages": MESSAGES, "max_tokens": 1})[0] == 200  # the server goes on


@pytest.mark.parametrize("which, message", [
    ("none", "model chatty has no tokenizer, so no chat: use /v1/completions (a prompt string or token ids)"),
    ("plain", "model chatty has a tokenizer without a chat template, so no chat: use /v1/completions (a prompt "
              "string or token ids)")])
def test_no_chat_template_is_a_400_pointing_to_completions(rt: Runtime, which: str, message: str,
                                                           serving: Callable[..., Any]) -> None:
    tokenizer = None if which == "none" else byte_tokenizer()
    with serving(rt, tokenizer, LIMIT, "chatty") as port:
        bodies: list[dict[str, Any]] = [{"messages": MESSAGES}, {"messages": []}]
        for body in bodies:  # whatever the body: the server cannot chat
            code, doc = chat(port, body)
            assert code == 400 and doc["error"]["message"] == message
        code, doc = post(port, "/v1/completions", {"prompt": [5, 6, 7], "max_tokens": 2})
        assert code == 200 and len(doc["choices"][0]["token_ids"]) == 2


def test_a_stop_token_ends_the_answer_and_is_not_in_it(tokenizer: Any) -> None:
    """The tiny model's EOS (id 1) is no special token of the byte tokenizer: still left out."""
    job = Job([list(b"<|user|>hi\n<|assistant|>")], 8, True, GREEDY, chat=True)
    job.result = [list(b"hello") + [1]]
    doc = chat_response(job, tokenizer, "chatty", (1,))
    assert doc["choices"][0]["message"]["content"] == "hello" and doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"] == {"prompt_tokens": 24, "completion_tokens": 6, "total_tokens": 30}
    job.result = [list(b"hello")]
    doc = chat_response(job, tokenizer, "chatty", (1,))
    assert doc["choices"][0]["message"]["content"] == "hello" and doc["choices"][0]["finish_reason"] == "length"
