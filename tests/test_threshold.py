"""The `threshold` policy in the engine: exact routing statistics against a slow reference,
batch invariance, and the checkpoint's thresholds validated on load.

(The policy against its reference on random scores: test_routing.py; the KV-cached engine
against a non-cached recompute: test_engine_vs_recompute.py.)"""

from __future__ import annotations

import pytest
import torch
from conftest import spread_thresholds
from reference_model import recompute_logits
from reference_routing import ref_threshold_choice
from test_engine_vs_recompute import ENGINE, run_staggered

from ecserve.config import ConfigError, EngineConfig
from ecserve.engine.engine import Engine
from ecserve.model.checkpoint import CheckpointError
from ecserve.model.default import init_weights
from ecserve.model.weights import read_config, save_model
from ecserve.types import Request, SamplingParams


@pytest.mark.parametrize("b", [None, 1, 2])
def test_engine_statistics_equal_the_reference_routing(make_model, b):
    """Every step's per-layer counts (tokens per expert, gate sums, experts per token) are the
    slow reference's, routed from the non-cached recompute's router scores."""
    engine = Engine(make_model(routing={"policy": "threshold", "max_experts_per_token": b}),
                    ENGINE)
    tokens = run_staggered(engine)
    groups = [g for rec in engine.records for g in rec.groups()]
    scores: dict = {}
    recompute_logits(engine.runner.model, tokens, groups, scores)
    mc = engine.model_cfg
    theta = spread_thresholds(mc.num_experts)
    cap = b or mc.num_experts
    hist_all = torch.zeros(mc.num_experts + 1, dtype=torch.long)
    for rec in engine.records:
        step_tokens = [tok for g in rec.groups() for tok in g]
        for st in rec.stats.moe:
            s = torch.stack([scores[st.layer][tok] for tok in step_tokens])  # [N, E]
            idx, gate = ref_threshold_choice(s, theta, cap)
            valid = idx >= 0
            assert torch.equal(st.tokens_per_expert, valid.sum(1))
            torch.testing.assert_close(st.gate_sum, (gate * valid).sum(1))
            per_token = torch.bincount(idx[valid], minlength=len(step_tokens))
            want = torch.bincount(per_token, minlength=mc.num_experts + 1)
            assert torch.equal(st.experts_per_token, want)
            assert st.capacity_slots == idx.shape[1]  # the dropless width
            hist_all += want
    # The workload exercised the policy: dropped tokens, single and multiple experts, the cap.
    assert hist_all[0] > 0 and hist_all[1] > 0
    assert hist_all[2:].sum() > 0 if cap > 1 else hist_all[2:].sum() == 0
    if b == 2:
        assert hist_all[3:].sum() == 0


def test_batch_scope_outputs_do_not_depend_on_other_requests(make_model):
    """Batch scope groups a request with whatever else runs; under threshold that changes
    nothing: the same request alone and among others samples from the same logits."""
    model = make_model(routing={"policy": "threshold"})
    target = Request("target", tuple(range(40, 71)), SamplingParams(max_new_tokens=8))

    def run(others: int) -> torch.Tensor:
        engine = Engine(model, ENGINE)
        engine.add_request(target)
        for i in range(others):
            prompt = tuple((i * 37 + j * 11) % 250 for j in range(5 + 9 * i))
            engine.add_request(Request(f"o{i}", prompt, SamplingParams(max_new_tokens=12)))
        while engine.has_unfinished():
            engine.step()
        return torch.stack([r.logits["target"] for r in engine.records if "target" in r.logits])

    alone, crowded = run(0), run(5)
    assert alone.shape == crowded.shape == (8, 258)
    torch.testing.assert_close(crowded, alone, atol=1e-5, rtol=0)
    assert torch.equal(crowded.argmax(-1), alone.argmax(-1))


def test_the_engine_can_serve_a_checkpoints_thresholds_under_any_policy(make_model):
    """Thresholds are stored beside the weights: a checkpoint configured for capped loads them
    and `routing_policy=threshold` serves with them; one without them is refused."""
    with_theta = make_model(thresholds=True)  # policy capped, thresholds stored
    assert read_config(with_theta).routing.policy == "capped"
    engine = Engine(with_theta, EngineConfig(device="cpu", routing_policy="threshold",
                                             max_experts_per_token=2))
    assert (engine.model_cfg.routing.policy, engine.model_cfg.routing.max_experts_per_token) == (
        "threshold", 2)
    engine.add_request(Request("a", (1, 2, 3), SamplingParams(max_new_tokens=2)))
    while engine.has_unfinished():
        engine.step()
    assert engine.last_stats is not None and engine.last_stats.moe[0].policy == "threshold"
    with pytest.raises(CheckpointError, match=r"routing.policy 'threshold' needs the calibrated "
                                              r"per-expert thresholds layers\.1\.moe\.threshold"):
        Engine(make_model(), EngineConfig(device="cpu", routing_policy="threshold"))
    with pytest.raises(ConfigError, match="max_experts_per_token must be in"):
        Engine(with_theta, EngineConfig(device="cpu", max_experts_per_token=9))


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: s.pop("layers.3.moe.threshold"), "thresholds for some MoE layers only"),
    (lambda s: s.update({"layers.1.moe.threshold": torch.tensor([0.1, float("nan"), 0.2, 0.3])}),
     r"layers\.1\.moe\.threshold: thresholds must be router probabilities in \[0, 1\]"),
    (lambda s: s.update({"layers.1.moe.threshold": torch.tensor([0.1, 1.5, 0.2, 0.3])}),
     r"in \[0, 1\], got \[0\.1"),
    (lambda s: s.update({"layers.1.moe.threshold": torch.full((3,), 0.2)}),
     r"layers\.1\.moe\.threshold: torch.float32 \[3\], expected float32 \[4\]"),
    (lambda s: s.update({"layers.2.moe.threshold": torch.full((4,), 0.2)}),
     r"unexpected tensor\(s\): layers\.2\.moe\.threshold"),
])
def test_bad_thresholds_are_refused_on_load(tmp_path, make_model, change, message):
    cfg = read_config(make_model(routing={"policy": "threshold"}))
    state = init_weights(cfg, 0)
    state.update({f"layers.{i}.moe.threshold": spread_thresholds(4) for i in (1, 3)})
    change(state)
    save_model(tmp_path / "m", cfg, state)
    with pytest.raises(CheckpointError, match=message):
        Engine(tmp_path / "m", EngineConfig(device="cpu"))


def test_thresholds_stay_float32_in_a_bfloat16_model(make_model):
    engine = Engine(make_model(routing={"policy": "threshold"}, dtype="bfloat16"),
                    EngineConfig(device="cpu"))
    moe = engine.runner.model.layers[1].moe
    assert moe.w_gate.dtype == torch.bfloat16 and moe.threshold.dtype == torch.float32
    assert torch.equal(moe.threshold, spread_thresholds(4))
