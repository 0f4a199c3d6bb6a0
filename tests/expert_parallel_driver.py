"""Rank 0 of the expert-parallel tests, and the workload both sides run.

python tests/expert_parallel_driver.py MODEL_DIR WORLD SCOPE OUT PLACEMENT: serves WORKLOAD
with an expert-parallel engine over WORLD local processes (PLACEMENT: contiguous | interleaved)
and saves its tokens, logits and routing groups to OUT.
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
    from ecserve.parallel.driver import ExpertParallel
    from ecserve.parallel.group import Placement

    torch.set_num_threads(1)
    engine = Engine(model_dir, engine_config())
    e = engine.model_cfg.num_experts
    owner = (Placement.contiguous(e, world) if placement == "contiguous"
             else Placement(tuple(i % world for i in range(e))))  # interleaved
    ep = ExpertParallel(engine, world, owner, timeout_s=60)
    try:
        result = serve(engine, scope)
    finally:
        ep.close()
    torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
