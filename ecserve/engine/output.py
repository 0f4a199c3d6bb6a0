"""After sampling: append tokens, check stop conditions, detokenize, emit events."""

from __future__ import annotations

from ecserve.engine.sequence import Sequence
from ecserve.types import FinishReason, TokenEvent


def finish_reason(seq: Sequence, token_id: int, eos_token_id: int | None) -> FinishReason | None:
    """Why `seq` stops after `token_id` was appended, or None to keep going."""
    p = seq.request.params
    if seq.num_generated >= p.min_new_tokens:
        if token_id == eos_token_id and not p.ignore_eos:
            return FinishReason.EOS
        if token_id in p.stop_token_ids:
            return FinishReason.STOP_TOKEN
    if seq.num_generated >= p.max_new_tokens:
        return FinishReason.LENGTH
    return None


def append_token(seq: Sequence, token_id: int, eos_token_id: int | None) -> TokenEvent:
    """Record a sampled token on its sequence and describe it as an event."""
    seq.token_ids.append(token_id)
    reason = finish_reason(seq, token_id, eos_token_id)
    text = seq.detokenizer.add(token_id)
    if reason is not None:
        text += seq.detokenizer.flush()
        seq.finish_reason = reason
    return TokenEvent(seq.request_id, token_id, text, seq.num_generated - 1, reason)
