"""A choice's text as its tokens come: incremental decoding (IncrementalText) and stop strings
(StopText, and StopWatch, rank 0's search for them while a batch decodes). Apart from the OpenAI
contract (openai.py) because two places feed it tokens: the answers, streamed or not, and the
decode loop that ends a sequence at its stop string (httpserver.step_hook, cli's batch runs);
both must cut the text at the same token, so they share this code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def choice_decoder(chat: bool, tokenizer: Any) -> Callable[[list[int]], str]:
    """How a choice's text is decoded: chat skips special tokens (its content has none)."""
    if chat:
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids)


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
    IncrementalText. The deltas put together are the answer's text, streamed or not (openai.job_choices).
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


class StopWatch:
    """Rank 0's search for stop strings while a batch decodes, so that a sequence can end at the
    step after the token that completes its first stop string (Runtime.generate's on_step)
    instead of decoding on to its EOS or max_tokens: one StopText per sequence that has stop
    strings, fed its tokens as they come, as openai.job_choices feeds the finished answer's, so it stops
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
