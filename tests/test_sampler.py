"""Token sampling: greedy, temperature, top-k, top-p, seeds, min_new_tokens."""

from __future__ import annotations

import torch

from ecserve.engine.sampler import sample
from ecserve.types import SamplingParams


def draw(logits, params, seeds, generated=None, eos=None):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return sample(logits, params, gens, generated or [0] * len(params), eos)


def test_greedy_is_argmax_with_ties_to_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 0.0, 0.0, 5.0]])
    assert draw(logits, [SamplingParams()] * 2, [0, 0]) == [1, 0]


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=7)
    alone = [draw(logits[2:3], [p], [7])[0] for _ in range(3)]
    batched = draw(logits, [p, SamplingParams(temperature=0.8), p, SamplingParams()], [1, 2, 7, 3])
    assert alone == [alone[0]] * 3 and batched[2] == alone[0]
    # different seeds give different streams
    streams = {tuple(draw(logits[:1].repeat(20, 1), [p] * 20, list(range(s, s + 20))))
               for s in (0, 100)}
    assert len(streams) == 2


def test_top_k_top_p_and_temperature_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = lambda p: {draw(logits, [p], [s])[0] for s in range(300)}  # noqa: E731
    assert seen(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}
    assert seen(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}
    assert seen(SamplingParams(temperature=1.0, top_p=0.79)) == {0, 1}  # 0.5 + 0.3 covers it
    assert seen(SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert seen(SamplingParams(temperature=1.0, top_p=0.01)) == {0}
    assert seen(SamplingParams(temperature=1e-4)) == {0}


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    p = SamplingParams(temperature=1.0)
    picks = draw(torch.log(probs)[None].repeat(4000, 1), [p] * 4000, list(range(4000)))
    freq = torch.bincount(torch.tensor(picks), minlength=3).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_min_new_tokens_masks_eos_and_stop_tokens():
    logits = torch.tensor([[0.0, 1.0, 9.0, 8.0]])
    p = SamplingParams(min_new_tokens=2, stop_token_ids=(3,))
    assert draw(logits, [p], [0], generated=[0], eos=2) == [1]  # 2 (eos) and 3 (stop) masked
    assert draw(logits, [p], [0], generated=[2], eos=2) == [2]
    ignore = SamplingParams(min_new_tokens=2, ignore_eos=True)
    assert draw(logits, [ignore], [0], generated=[0], eos=2) == [2]
