"""What a request may ask of an engine, checked before it is queued.

A plain dataclass, so the server's front-end process can check requests against an engine
core running in another process (it receives the core's limits once, at start-up) and answer
a bad or unaffordable request at once, without a round trip to the core.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ecserve.config import SCOPES
from ecserve.errors import RequestError
from ecserve.types import Request

__all__ = ["QueueFullError", "RequestError", "RequestLimits"]


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound (overload); the request may be retried later."""


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int  # token ids must be below this
    max_model_len: int  # prompt + max_new_tokens must fit
    max_waiting: int  # requests queued for admission, at most
    max_waiting_tokens: int  # their prompt tokens, at most
    block_size: int  # tokens per KV block
    num_blocks: int  # KV blocks in the whole cache

    def validate(self, r: Request) -> None:
        """Raise RequestError naming the field if the engine cannot serve `r` as given."""
        vocab, p = self.vocab_size, r.params
        if not r.prompt_token_ids:
            raise RequestError("prompt", ": empty (a prompt needs at least one token)")
        # The context first: a prompt longer than it is refused for that, where raising the
        # queue's bound could never help. Both are length checks, before any scan of the ids.
        total = len(r.prompt_token_ids) + p.max_new_tokens
        if total > self.max_model_len:
            raise RequestError(
                "prompt", f" ({len(r.prompt_token_ids)} tokens) + max_new_tokens "
                f"({p.max_new_tokens}) = {total} exceeds the context of {self.max_model_len} "
                "tokens")
        if len(r.prompt_token_ids) > self.max_waiting_tokens:
            raise RequestError("prompt", f": {len(r.prompt_token_ids)} tokens is more than the "
                               f"queue takes (max_waiting_tokens={self.max_waiting_tokens})")
        bad = [t for t in r.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError("prompt", f": token id(s) {bad[:5]} outside the vocabulary "
                               f"[0, {vocab})")
        bad = [t for t in p.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError("stop_token_ids",
                               f": {bad[:5]} outside the vocabulary [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            if (n := getattr(p, name)) is not None and n > vocab:
                raise RequestError(name, f": {n} alternatives asked, the vocabulary has {vocab}")
        if r.routing_scope is not None and r.routing_scope not in SCOPES:
            raise RequestError("routing_scope", f": {r.routing_scope!r} is not one of "
                               f"{', '.join(SCOPES)}")
        need = math.ceil((total - 1) / self.block_size)
        if need > self.num_blocks:
            raise RequestError(
                "prompt", f" + max_new_tokens needs {need} KV blocks but the whole cache has "
                f"{self.num_blocks}; lower max_new_tokens or raise the KV cache budget")

    def check_room(self, waiting: int, waiting_tokens: int, num_requests: int,
                   num_tokens: int) -> None:
        """Raise QueueFullError unless a queue holding `waiting` requests of `waiting_tokens`
        prompt tokens takes this many more."""
        if waiting + num_requests > self.max_waiting:
            raise QueueFullError(f"waiting queue full ({self.max_waiting} requests); retry later")
        if waiting_tokens + num_tokens > self.max_waiting_tokens:
            raise QueueFullError(
                f"waiting queue full ({waiting_tokens} of {self.max_waiting_tokens} "
                f"prompt tokens queued, this request has {num_tokens}); retry later"
            )
