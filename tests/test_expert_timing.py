"""Expert timing (ecserve/engine/expert_timing.py): every MoE layer of a timed step reports each
expert's seconds, untimed steps report none, and timing never changes what is generated."""

from __future__ import annotations

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.types import Request, SamplingParams


def run(model, every: int) -> tuple[list[int], list[list]]:
    engine = Engine(model, EngineConfig(device="cpu", expert_timing_every=every))
    engine.add_request(Request("r", (1, 2, 3, 4), SamplingParams(max_new_tokens=6)))
    tokens, seconds = [], []
    while engine.has_unfinished():
        tokens += [ev.token_id for ev in engine.step() if ev.token_id is not None]
        assert engine.last_stats is not None
        seconds.append([m.expert_seconds for m in engine.last_stats.moe])
    return tokens, seconds


def test_every_layer_of_a_timed_step_reports_every_expert(make_model):
    model = make_model()
    tokens, seconds = run(model, every=2)
    num_experts = Engine(model, EngineConfig(device="cpu")).model_cfg.num_experts
    for step, layers in enumerate(seconds, start=1):
        assert len(layers) >= 2  # the tiny model has several MoE layers
        for s in layers:
            if step % 2:
                assert s is None
            else:
                assert s is not None and s.shape == (num_experts,) and bool((s > 0).all())
    assert tokens == run(model, every=0)[0]
