"""After sampling: append tokens, check stop conditions, detokenize, emit events."""

from __future__ import annotations

from ecserve.engine.sequence import Sequence
from ecserve.types import FinishReason, TokenEvent, TokenLogprobs


def finish_reason(seq: Sequence, token_id: int, eos_token_id: int | None) -> FinishReason | None:
    """Why `seq` stops after `token_id` was appended (stop sequences aside), or None."""
    p = seq.request.params
    if seq.num_generated >= p.min_new_tokens:
        if token_id == eos_token_id and not p.ignore_eos:
            return FinishReason.EOS
        if token_id in p.stop_token_ids:
            return FinishReason.STOP_TOKEN
    if seq.num_generated >= p.max_new_tokens:
        return FinishReason.LENGTH
    return None


def append_token(
    seq: Sequence, token_id: int, eos_token_id: int | None, logprobs: TokenLogprobs | None = None
) -> TokenEvent:
    """Record a sampled token on its sequence and describe it as an event."""
    seq.token_ids.append(token_id)
    reason = finish_reason(seq, token_id, eos_token_id)
    text = seq.detokenizer.add(token_id)
    if reason is not None:
        text += seq.detokenizer.flush()
    can_stop = seq.num_generated >= seq.request.params.min_new_tokens
    text, stop = seq.stops.feed(text, can_stop)
    if stop is not None:
        reason = FinishReason.STOP_SEQUENCE
    elif reason is not None:
        text += seq.stops.flush()
    seq.finish_reason = reason
    lp, top = logprobs if logprobs is not None else (None, ())
    prompt = ()
    if seq.prompt_logprobs is not None and seq.num_generated == 1:  # the first event has them
        prompt = tuple(seq.prompt_logprobs)
    return TokenEvent(seq.request_id, token_id, text, seq.num_generated - 1, reason,
                      logprob=lp, top_logprobs=top, detail=stop or "", prompt_logprobs=prompt)


def end_without_token(seq: Sequence, reason: FinishReason, detail: str = "") -> TokenEvent:
    """Finish `seq` between tokens (time limit, error): emit whatever text was held back."""
    seq.finish_reason = reason
    text = seq.stops.feed(seq.detokenizer.flush(), can_stop=False)[0] + seq.stops.flush()
    return TokenEvent(seq.request_id, None, text, seq.num_generated, reason, detail=detail)
