"""Routing scope: `sequence` makes a request's output independent of other traffic."""

from __future__ import annotations

import pytest
import torch

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.types import Request, SamplingParams

PROMPT = tuple(torch.randint(0, 256, (45,), generator=torch.Generator().manual_seed(1)).tolist())


def run(engine: Engine, target_scope: str, others: list[tuple[int, int, str]], params):
    """Serve the target request (joining at step 2) with `others` (join step, prompt length,
    scope) around it; returns its tokens and the logits it sampled from."""
    gen = torch.Generator().manual_seed(5)
    pending = sorted([*others, (2, 0, "target")])
    tokens, step = [], 0
    while engine.has_unfinished() or pending:
        while pending and pending[0][0] <= step:
            _, n, scope = pending.pop(0)
            if scope == "target":
                engine.add_request(Request("target", PROMPT, params, routing_scope=target_scope))
                continue
            prompt = tuple(torch.randint(0, 256, (n,), generator=gen).tolist())
            engine.add_request(Request(f"o{step}-{n}", prompt, SamplingParams(max_new_tokens=6),
                                       routing_scope=scope))
        tokens += [ev.token_id for ev in engine.step() if ev.request_id == "target"]
        step += 1
    logits = [r.logits["target"] for r in engine.records if "target" in r.logits]
    return tokens, torch.stack(logits)


LOADS = [
    (16, []),
    (16, [(0, 30, "batch"), (0, 7, "batch"), (1, 5, "batch"), (2, 50, "sequence"),
          (4, 12, "batch")]),
    (64, [(0, 60, "batch"), (0, 3, "batch"), (1, 33, "batch"), (3, 20, "sequence")]),
]


@pytest.mark.parametrize("policy", ["ec", "capped"])
@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=10),
                                    SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)])
def test_sequence_scope_is_batch_invariant(make_model, policy, params):
    model = make_model(routing={"policy": policy})
    results = []
    for budget, others in LOADS:
        cfg = EngineConfig(device="cpu", max_num_batched_tokens=budget, max_num_seqs=8,
                           kv_cache_bytes=1 << 22, record_steps=True)
        results.append(run(Engine(model, cfg), "sequence", others, params))
    tokens0, logits0 = results[0]
    for tokens, logits in results[1:]:
        assert tokens == tokens0
        torch.testing.assert_close(logits, logits0, atol=1e-5, rtol=0)


def test_batch_scope_depends_on_other_traffic(make_model):
    """The documented trade-off: in `batch` scope, co-batched requests change the outputs."""
    model = make_model(routing={"policy": "ec"})
    params = SamplingParams(max_new_tokens=10)
    outs = []
    for budget, others in LOADS[:2]:
        cfg = EngineConfig(device="cpu", max_num_batched_tokens=budget, max_num_seqs=8,
                           kv_cache_bytes=1 << 22, record_steps=True)
        outs.append(run(Engine(model, cfg), "batch", others, params)[1])
    assert (outs[0] - outs[1]).abs().max() > 1e-3
