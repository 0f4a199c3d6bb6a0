"""After sampling: append tokens, check the token-level stop conditions, emit events.

Events leave here without text: turning ids into text and watching for stop sequences is the
text stage's work (ecserve/engine/text.py), which runs beside the engine in-process and in the
front-end process when the engine core runs in its own.
"""

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
    """Record a sampled token on its sequence and describe it as an event (no text yet)."""
    seq.token_ids.append(token_id)
    seq.finish_reason = finish_reason(seq, token_id, eos_token_id)
    lp, top = logprobs if logprobs is not None else (None, ())
    prompt = ()
    if seq.prompt_logprobs is not None and seq.num_generated == 1:  # the first event has them
        prompt = tuple(seq.prompt_logprobs)
    return TokenEvent(seq.request_id, token_id, "", seq.num_generated - 1, seq.finish_reason,
                      logprob=lp, top_logprobs=top, prompt_logprobs=prompt)


def end_without_token(seq: Sequence, reason: FinishReason, detail: str = "") -> TokenEvent:
    """Finish `seq` between tokens (time limit, error)."""
    seq.finish_reason = reason
    return TokenEvent(seq.request_id, None, "", seq.num_generated, reason, detail=detail)
