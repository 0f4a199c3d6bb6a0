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


def reference_penalties(row: list[float], prompt: list[int], output: list[int],
                        p: SamplingParams) -> list[float]:
    """vLLM's and OpenAI's penalties on one row, one token at a time, in plain Python."""
    out = list(row)
    for t in set(prompt) | set(output):
        if p.repetition_penalty != 1:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * \
                p.repetition_penalty
    for t in set(output):
        out[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return out


def test_penalties_match_a_reference_computation():
    from ecserve.engine.sampler import apply_penalties

    gen = torch.Generator().manual_seed(0)
    cases = [SamplingParams(presence_penalty=1.5), SamplingParams(frequency_penalty=0.7),
             SamplingParams(repetition_penalty=1.3),
             SamplingParams(presence_penalty=-0.5, frequency_penalty=2.0, repetition_penalty=0.8),
             SamplingParams()]
    v = 50
    logits = torch.randn(len(cases), v, generator=gen) * 3
    histories, generated = [], []
    for i in range(len(cases)):
        prompt = torch.randint(0, v, (7,), generator=gen).tolist()
        output = torch.randint(0, v // 2, (5 + i,), generator=gen).tolist()  # repeats
        histories.append(prompt + output)
        generated.append(len(output))
    got = logits.clone()
    apply_penalties(got, cases, generated, histories)
    for i, p in enumerate(cases):
        prompt, output = histories[i][:-generated[i]], histories[i][-generated[i]:]
        want = reference_penalties(logits[i].tolist(), prompt, output, p)
        assert torch.allclose(got[i], torch.tensor(want), atol=1e-5), p
    assert torch.equal(got[-1], logits[-1])  # no penalty: the row untouched
    # Greedy picks the penalized argmax; the repeated favourite is pushed down.
    row = torch.zeros(1, v)
    row[0, 3] = 5.0
    row[0, 4] = 4.0
    picked = sample(row, [SamplingParams(presence_penalty=2.0)], [torch.Generator()], [2],
                    None, [[1, 3, 3]])
    assert picked == [4]
    assert sample(row, [SamplingParams()], [torch.Generator()], [2], None, [[1, 3, 3]]) == [3]
