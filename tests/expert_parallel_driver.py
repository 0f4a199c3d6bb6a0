"""Rank 0 of the expert-parallel tests, and the workload both sides run.

python tests/expert_parallel_driver.py MODEL_DIR WORLD SCOPE OUT PLACEMENT: serves WORKLOAD
with an expert-parallel engine over WORLD local processes and saves its tokens, logits and
routing groups to OUT. PLACEMENT: contiguous (the balanced plan; rank 0 loads only its experts)
| interleaved (expert e on rank e % WORLD; rank 0 loads all and drops the others) | a plan JSON
file (rank 0 loads only its experts). OUT also gets rank 0's expert weight shapes and, for a
second run of TRAFFIC_PROMPTS, the executor's counted cross-device rows and the planner's
prediction for the same steps.
"""

from __future__ import annotations

import sys

import torch

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.types import Request, SamplingParams

# (join step, prompt length, max_new_tokens): prompts of several lengths joining mid-run, so
# steps mix prefill chunks and decodes and some groups are partial.
WORKLOAD = [(0, 30, 8), (0, 7, 10), (1, 5, 6), (2, 45, 8), (4, 12, 5), (5, 1, 4)]
TRAFFIC_PROMPTS = [list(range(3, 3 + n)) for n in (20, 9, 33)]


def engine_config() -> EngineConfig:
    return EngineConfig(device="cpu", dtype="float32", max_num_batched_tokens=32,
                        max_num_seqs=8, kv_cache_bytes=1 << 22, record_steps=True)


def serve(engine: Engine, scope: str) -> dict[str, object]:
    """Run WORKLOAD; returns each request's tokens and the logits each step sampled from."""
    gen = torch.Generator().manual_seed(7)
    pending = [(step, i, n, m) for i, (step, n, m) in enumerate(WORKLOAD)]
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or pending:
        while pending and pending[0][0] <= step:
            _, i, n, m = pending.pop(0)
            prompt = tuple(torch.randint(0, 256, (n,), generator=gen).tolist())
            engine.add_request(Request(f"r{i}", prompt, SamplingParams(max_new_tokens=m),
                                       routing_scope=scope))
        for ev in engine.step():
            tokens.setdefault(ev.request_id, []).append(ev.token_id)
        step += 1
    logits = [{k: v.clone() for k, v in r.logits.items()} for r in engine.records]
    groups = [r.groups() for r in engine.records]
    return {"tokens": tokens, "logits": logits, "groups": groups}


def main(model_dir: str, world: int, scope: str, out: str, placement: str) -> None:
    from ecserve.model.weights import read_config
    from ecserve.parallel.driver import ExpertParallel
    from ecserve.parallel.moe_ep import (
        default_placement,
        owned_experts,
        reset_traffic,
        traffic,
    )
    from ecserve.placement import Placement, load_plan
    from ecserve.placement.plan import ModelShape
    from ecserve.placement.routing_stats import record_routing
    from ecserve.placement.traffic import cross_device_tokens

    torch.set_num_threads(1)
    cfg = read_config(model_dir)
    if placement == "contiguous":
        plan = default_placement(cfg, world)
    elif placement == "interleaved":
        base = default_placement(cfg, world)
        plan = Placement(ModelShape.of(cfg), base.devices, "balanced", {
            layer: tuple((e % world,) for e in range(cfg.num_experts))
            for layer in base.layers})
    else:
        plan = load_plan(placement, cfg)
    experts = None if placement == "interleaved" else owned_experts(plan, 0)
    ep = ExpertParallel(cfg, world, plan, timeout_s=60)
    try:
        engine = Engine(model_dir, engine_config(), experts=experts, lockstep=ep.attach)
    except BaseException:
        ep.close()
        raise
    model = engine.runner.model
    try:
        result = serve(engine, scope)
        result["shapes"] = {b.moe.layer: tuple(b.moe.w_gate.shape) for b in model.layers
                            if b.moe is not None}
        reset_traffic(model)
        stats = record_routing(engine, TRAFFIC_PROMPTS, 5)
        counted = traffic(model)
    finally:
        ep.close()
    predicted = cross_device_tokens(plan, stats, dedup=False)
    result["traffic"] = {layer: (int(m.sum() - m.trace()), calls, predicted[layer] *
                                 stats.num_steps(layer)) for layer, (m, calls) in counted.items()}
    result["steps"] = {layer: stats.num_steps(layer) for layer in stats.layers}
    torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
