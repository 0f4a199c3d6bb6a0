"""The text stage: token events -> text deltas, and stop sequences over that text.

It runs where the caller reads events: in the server's front end (wherever the engine core
runs, so detokenization never holds a core process's GIL) and in the offline `LLM` (whose
add_request/step serve scripts that step an engine themselves). The engine never runs it.
A stop sequence is found here, after the engine produced the token: the caller then aborts
the request in the engine (`TextStage.process` returns which).
"""

from __future__ import annotations

import dataclasses

from ecserve.engine.stop import StopMatcher
from ecserve.tokenizer import IncrementalDetokenizer, Tokenizer
from ecserve.types import FinishReason, Request, TokenEvent


class TextStream:
    """One request's detokenizer and stop-sequence matcher."""

    def __init__(self, tokenizer: Tokenizer, request: Request) -> None:
        p = request.params
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_token_ids)
        self.stops = StopMatcher(p.stop_sequences, p.include_stop_sequence)
        self.min_new_tokens = p.min_new_tokens

    def apply(self, ev: TokenEvent) -> TokenEvent:
        """The event with its text; finished with STOP_SEQUENCE if the text reached one."""
        if ev.token_id is None:  # ended between tokens: whatever text was held back
            text = self.stops.feed(self.detokenizer.flush(), can_stop=False)[0]
            return dataclasses.replace(ev, text=text + self.stops.flush())
        reason = ev.finish_reason
        text = self.detokenizer.add(ev.token_id)
        if reason is not None:
            text += self.detokenizer.flush()
        text, stop = self.stops.feed(text, can_stop=ev.index + 1 >= self.min_new_tokens)
        if stop is not None:
            return dataclasses.replace(ev, text=text, finish_reason=FinishReason.STOP_SEQUENCE,
                                       detail=stop)
        if reason is not None:
            text += self.stops.flush()
        return dataclasses.replace(ev, text=text)


class TextStage:
    """The live requests' text streams."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._streams: dict[str, TextStream] = {}

    def add(self, request: Request) -> None:
        self._streams[request.request_id] = TextStream(self.tokenizer, request)

    def drop(self, request_id: str) -> None:
        """Forget a request that ended without an event (cancelled)."""
        self._streams.pop(request_id, None)

    def process(self, events: list[TokenEvent]) -> tuple[list[TokenEvent], list[str]]:
        """(the events with text, the ids of requests a stop sequence just ended).

        Events of requests already ended here (the engine ran a step past a stop sequence
        before hearing of it) are dropped: their caller has its last event.
        """
        out, stopped = [], []
        for ev in events:
            stream = self._streams.get(ev.request_id)
            if stream is None:
                continue
            done = stream.apply(ev)
            out.append(done)
            if done.finished:
                del self._streams[ev.request_id]
                if not ev.finished:  # the engine still runs it
                    stopped.append(ev.request_id)
        return out, stopped
