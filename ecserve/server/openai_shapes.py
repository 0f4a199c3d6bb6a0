"""Engine events -> OpenAI-compatible response bodies and stream chunks (the completions and
chat shapes, with their two log-probability shapes, as vLLM and OpenAI give them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ecserve.server.openai_params import Call
from ecserve.types import FinishReason, TokenEvent, TokenLogprobs

FINISH = {FinishReason.LENGTH: "length", FinishReason.TIME_LIMIT: "length",
          FinishReason.EOS: "stop", FinishReason.STOP_TOKEN: "stop",
          FinishReason.STOP_SEQUENCE: "stop", FinishReason.ABORTED: "abort",
          FinishReason.ERROR: "error"}
LOGPROB_FLOOR = -9999.0  # JSON has no -inf; what vLLM sends for an impossible token

TokenText = Callable[[int], str]  # one token's text (cached: called per token and alternative)
# (token id, its logprob and alternatives; None for a prompt's first token)
Entry = tuple[int, TokenLogprobs | None]


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)  # generated, when logprobs were asked
    generated: int = 0
    finish: FinishReason | None = None
    detail: str = ""  # the matched stop string
    last_token: int | None = None
    prompt_logprobs: tuple[TokenLogprobs | None, ...] = ()
    offset: int = 0  # completions' text_offset of the next token
    started: bool = False  # a stream sent its first chunk


def _lp(x: float) -> float:
    return x if x > LOGPROB_FLOOR else LOGPROB_FLOOR


class Shaper:
    """One call's choices: fed events, it gives chunks (streaming) or the whole response."""

    def __init__(self, call: Call, token_text: TokenText) -> None:
        self.call, self.token_text = call, token_text
        self.choices = [ChoiceState() for _ in call.requests]
        self.chat = call.kind == "chat"
        self.object = "chat.completion" if self.chat else "text_completion"

    # ------------------------------------------------------------------ feeding

    def feed(self, index: int, events: Sequence[TokenEvent]) -> tuple[str, list[Entry]]:
        """Record a choice's events; (their text, their log-probability entries)."""
        st, want = self.choices[index], self.call.logprobs is not None
        entries: list[Entry] = []
        for e in events:
            if e.prompt_logprobs:
                st.prompt_logprobs = e.prompt_logprobs
            if e.token_id is not None:
                st.generated += 1
                st.last_token = e.token_id
                if want and e.logprob is not None:
                    entries.append((e.token_id, (e.logprob, e.top_logprobs)))
            if e.finish_reason is not None:
                st.finish, st.detail = e.finish_reason, e.detail
        text = "".join(e.text for e in events)
        st.text.append(text)
        st.entries.extend(entries)
        return text, entries

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)

    # ------------------------------------------------------------------ pieces

    def finish_reason(self, st: ChoiceState) -> str | None:
        return FINISH[st.finish] if st.finish is not None else None

    def stop_reason(self, st: ChoiceState) -> str | int | None:
        """vLLM's: the stop string or stop token that ended the choice."""
        if st.finish is FinishReason.STOP_SEQUENCE:
            return st.detail
        if st.finish is FinishReason.STOP_TOKEN:
            return st.last_token
        return None

    def usage(self) -> dict[str, int]:
        prompt = sum(len(r.prompt_token_ids) for r in self.call.requests[::self.call.n])
        done = sum(c.generated for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}

    def _prompt_entries(self, index: int) -> list[Entry]:
        ids = self.call.requests[index].prompt_token_ids
        return list(zip(ids, self.choices[index].prompt_logprobs, strict=True))

    def completion_logprobs(self, st: ChoiceState, entries: list[Entry]) -> dict[str, Any]:
        """The completions shape: parallel lists, the top alternatives as {text: logprob}."""
        tokens, values, tops, offsets = [], [], [], []
        for tid, lps in entries:
            text = self.token_text(tid)
            tokens.append(text)
            offsets.append(st.offset)
            st.offset += len(text)
            if lps is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(_lp(lps[0]))
            top = {self.token_text(i): _lp(v) for i, v in lps[1]}
            top.setdefault(text, _lp(lps[0]))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}

    def chat_logprobs(self, entries: list[Entry]) -> dict[str, Any]:
        """The chat shape: one object per token, with its bytes and alternatives."""
        def item(tid: int, lp: float) -> dict[str, Any]:
            text = self.token_text(tid)
            return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode())}

        return {"content": [{**item(tid, lps[0]), "top_logprobs": [item(i, v) for i, v in lps[1]]}
                            for tid, lps in entries if lps is not None]}

    def prompt_logprobs(self, index: int) -> list[dict[str, Any] | None]:
        """vLLM's prompt_logprobs: per prompt token {id: {logprob, decoded_token}}, None first."""
        out: list[dict[str, Any] | None] = []
        for tid, lps in self._prompt_entries(index):
            if lps is None:
                out.append(None)
                continue
            d = {str(tid): {"logprob": _lp(lps[0]), "decoded_token": self.token_text(tid)}}
            for i, v in lps[1]:
                d.setdefault(str(i), {"logprob": _lp(v), "decoded_token": self.token_text(i)})
            out.append(d)
        return out

    # ------------------------------------------------------------------ whole responses

    def response(self) -> dict[str, Any]:
        call = self.call
        choices = []
        for i, st in enumerate(self.choices):
            text = "".join(st.text)
            choice: dict[str, Any] = {"index": i}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
                choice["logprobs"] = (self.chat_logprobs(st.entries)
                                      if call.logprobs is not None else None)
            else:
                self._completion_body(choice, i, text, st.entries, echo=call.echo)
            choice["finish_reason"] = self.finish_reason(st)
            choice["stop_reason"] = self.stop_reason(st)
            if call.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs(i)
            choices.append(choice)
        return {"id": call.id, "object": self.object, "created": call.created,
                "model": call.model, "choices": choices, "usage": self.usage()}

    def _completion_body(self, choice: dict[str, Any], index: int, text: str,
                         entries: list[Entry], echo: bool) -> None:
        """A completions choice's text and logprobs; with echo the prompt comes first (its
        tokens first in the logprobs too)."""
        if echo:
            prompt = self.call.prompt_texts[self.call.prompt_of(index)]
            text = (prompt if prompt is not None else self.token_text_of(index)) + text
            if self.call.logprobs is not None:
                entries = self._prompt_entries(index) + entries
        choice["text"] = text
        choice["logprobs"] = (self.completion_logprobs(self.choices[index], entries)
                              if self.call.logprobs is not None else None)

    def token_text_of(self, index: int) -> str:
        """A prompt given as ids, as text (for echo)."""
        return "".join(self.token_text(t) for t in self.call.requests[index].prompt_token_ids)

    # ------------------------------------------------------------------ stream chunks

    def chunk(self, index: int, text: str, entries: list[Entry]) -> dict[str, Any]:
        """The chunk of a choice's new events (fed already)."""
        call, st = self.call, self.choices[index]
        choice: dict[str, Any] = {"index": index}
        first = not st.started
        st.started = True
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {
                "content": text}
            choice["delta"] = delta
            choice["logprobs"] = (self.chat_logprobs(entries)
                                  if call.logprobs is not None else None)
        else:
            self._completion_body(choice, index, text, entries, echo=first and call.echo)
        choice["finish_reason"] = self.finish_reason(st)
        choice["stop_reason"] = self.stop_reason(st)
        if first and call.prompt_logprobs is not None:
            choice["prompt_logprobs"] = self.prompt_logprobs(index)
        out = {"id": call.id, "object": self.object + ".chunk" if self.chat else self.object,
               "created": call.created, "model": call.model, "choices": [choice]}
        if call.continuous_usage:
            out["usage"] = self.usage()
        elif call.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, Any]:
        """stream_options.include_usage: the last chunk, with no choices."""
        call = self.call
        return {"id": call.id, "object": self.object + ".chunk" if self.chat else self.object,
                "created": call.created, "model": call.model, "choices": [],
                "usage": self.usage()}
