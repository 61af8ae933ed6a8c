"""Round-30 audit of the serve additions (penalties, --routing-keep last, disconnect detection):
regressions for the interplay that held. Over HTTP, the n choices of one sampled, penalised
request each keep their own counts (each equals its choice asked for alone with seed + i), a
stop string ends a penalised choice where its text first holds it, and the streamed answer
(text, token ids, finish reasons, raw log-probabilities) is the non-streamed one."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from moeplace.serve.generate import Runtime

LIMIT = 24  # the server's --max-new-tokens


@pytest.fixture(scope="module")
def rt(chat_model: Path, one_rank_runtime: Callable[[Path], Runtime]) -> Runtime:
    return one_rank_runtime(chat_model)


def post(port: int, body: dict[str, Any]) -> Any:
    """The non-streamed answer (a dict), or a streamed one's event payloads (dicts, without [DONE])."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body))
        resp = conn.getresponse()
        data = resp.read().decode()
        assert resp.status == 200, data
    finally:
        conn.close()
    if not body.get("stream"):
        return json.loads(data)
    payloads = [line[6:] for line in data.split("\n") if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def joined(events: list[dict[str, Any]], choices: int) -> list[dict[str, Any]]:
    """A stream's events put together per choice: text, token_ids, finish_reason, token_logprobs."""
    out = [{"text": "", "token_ids": [], "finish_reason": None, "token_logprobs": []} for _ in range(choices)]
    for event in events:
        for c in event["choices"]:
            got = out[c["index"]]
            got["text"] += c["text"]
            got["token_ids"] += c["token_ids"]
            got["finish_reason"] = c["finish_reason"] or got["finish_reason"]
            if c["logprobs"] is not None:
                got["token_logprobs"] += c["logprobs"]["token_logprobs"]
    return out


def test_penalised_choices_keep_their_own_counts_stop_and_stream_alike(
        rt: Runtime, chat_tokenizer: Any, serving: Callable[..., Any]) -> None:
    body = {"prompt": "hi hi hi hi", "max_tokens": LIMIT, "n": 3, "temperature": 1.0, "seed": 21,
            "repetition_penalty": 1.8, "frequency_penalty": 0.7, "presence_penalty": -0.5, "logprobs": 2}
    with serving(rt, chat_tokenizer, LIMIT) as port:
        whole = post(port, body)["choices"]
        # each choice alone (n 1, seed + i): a choice penalised by another's tokens would differ
        alone = [post(port, {**body, "n": 1, "seed": 21 + i})["choices"][0] for i in range(3)]
        assert [c["token_ids"] for c in whole] == [a["token_ids"] for a in alone]
        assert len({tuple(c["token_ids"]) for c in whole}) == 3  # the choices differ: the test can tell
        # a stop string from the middle of choice 0's text ends it there, streamed or not
        text = whole[0]["text"]
        stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip() and
                    text.find(text[i:i + 2]) == i)
        stopped = post(port, {**body, "stop": stop})["choices"]
        assert stopped[0]["finish_reason"] == "stop" and stopped[0]["text"] == text[:text.index(stop)]
        assert whole[0]["token_ids"][:len(stopped[0]["token_ids"])] == stopped[0]["token_ids"]
        for request, want in ((body, whole), ({**body, "stop": stop}, stopped)):
            streamed = joined(post(port, {**request, "stream": True}), 3)
            assert [{**s, "token_logprobs": None} for s in streamed] == \
                [{"text": w["text"], "token_ids": w["token_ids"], "finish_reason": w["finish_reason"],
                  "token_logprobs": None} for w in want]
            assert [s["token_logprobs"] for s in streamed] == [w["logprobs"]["token_logprobs"] for w in want]
