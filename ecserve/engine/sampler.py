"""Logits -> token ids: penalties, greedy, temperature, top-k, top-p, per-request seeded
RNG."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from ecserve.types import SamplingParams


def sample(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    generators: Seq[torch.Generator],
    num_generated: Seq[int],
    eos_token_id: int | None,
    token_ids: Seq[Seq[int]] | None = None,
) -> list[int]:
    """One token per row of `logits` [M, V] (float32), row i under params[i]; token_ids[i]
    (prompt then output so far) is needed where params[i] has a penalty.

    Each sampled row draws exactly one uniform number from its own generator, so a request's
    tokens depend only on its seed and its logits, not on what else is in the batch.
    """
    logits = logits.float().clone()
    apply_penalties(logits, params, num_generated, token_ids)
    _mask_early_stops(logits, params, num_generated, eos_token_id)
    out = logits.argmax(dim=-1)  # [M]: greedy (ties to the lowest id)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        sub = logits[rows] / torch.tensor([params[i].temperature for i in rows])[:, None]
        sorted_logits, order = torch.sort(sub, dim=-1, descending=True, stable=True)  # [R, V]
        v = sub.shape[1]
        rank = torch.arange(v)[None, :]
        top_k = torch.tensor([params[i].top_k or v for i in rows])[:, None]
        sorted_logits = sorted_logits.masked_fill(rank >= top_k, float("-inf"))
        probs = torch.softmax(sorted_logits, dim=-1)
        # top-p: keep a token while the mass before it is below p (the first is always kept).
        top_p = torch.tensor([params[i].top_p for i in rows])[:, None]
        mass_before = torch.cumsum(probs, dim=-1) - probs
        probs = probs.masked_fill(mass_before >= top_p, 0.0)
        cdf = torch.cumsum(probs, dim=-1)  # [R, V]
        u = torch.cat([torch.rand(1, generator=generators[i]) for i in rows])  # [R]
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)  # [R, 1]
        pick = pick.clamp(max=v - 1)
        out[rows] = order.gather(1, pick)[:, 0]
    return out.tolist()


def apply_penalties(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    num_generated: Seq[int],
    token_ids: Seq[Seq[int]] | None,
) -> None:
    """In place, on the rows that ask, in vLLM's order: the repetition penalty over the tokens
    of the prompt and the output, then the frequency and presence penalties over the output's
    token counts. The reported logprobs stay the model's own (token_logprobs)."""
    v = logits.shape[1]
    for i, p in enumerate(params):
        if not p.penalized:
            continue
        assert token_ids is not None, "a penalty needs the request's tokens"
        ids = torch.tensor(list(token_ids[i]), dtype=torch.long)  # [prompt + output]
        row = logits[i]  # [V], a view
        if p.repetition_penalty != 1:
            seen = torch.zeros(v, dtype=torch.bool)
            seen[ids] = True
            r = p.repetition_penalty
            row[seen] = torch.where(row[seen] > 0, row[seen] / r, row[seen] * r)
        out = ids[len(ids) - num_generated[i]:]
        if out.numel() and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(out, minlength=v).float()  # [V]
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()


def _mask_early_stops(
    logits: torch.Tensor,
    params: Seq[SamplingParams],
    num_generated: Seq[int],
    eos_token_id: int | None,
) -> None:
    """Forbid EOS and stop tokens until a request has its min_new_tokens."""
    for i, p in enumerate(params):
        if num_generated[i] < p.min_new_tokens:
            banned = list(p.stop_token_ids)
            if eos_token_id is not None and not p.ignore_eos:
                banned.append(eos_token_id)
            logits[i, banned] = float("-inf")


def token_logprobs(
    logits: torch.Tensor, token_ids: Seq[int], top_n: Seq[int | None]
) -> list[tuple[float, tuple[tuple[int, float], ...]] | None]:
    """Per row: (logprob of token_ids[i], its top_n[i] most likely (id, logprob)), or None.

    From the model's own distribution (log_softmax of the raw logits, before temperature,
    top-k/top-p and min_new_tokens masking), as vLLM reports by default.
    """
    rows = [i for i, n in enumerate(top_n) if n is not None]
    out: list[tuple[float, tuple[tuple[int, float], ...]] | None] = [None] * len(top_n)
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1)  # [R, V]
    chosen = lp.gather(1, torch.tensor([token_ids[i] for i in rows])[:, None])[:, 0].tolist()
    most = max(top_n[i] or 0 for i in rows)
    top_lp, top_id = lp.topk(most, dim=-1) if most else (lp[:, :0], lp[:, :0].long())
    top_lp, top_id = top_lp.tolist(), top_id.tolist()
    for r, i in enumerate(rows):
        n = top_n[i] or 0
        out[i] = (chosen[r], tuple(zip(top_id[r][:n], top_lp[r][:n], strict=True)))
    return out
