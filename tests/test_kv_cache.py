"""KV block bookkeeping, and that the engine never leaks blocks."""

from __future__ import annotations

import pytest

from ecserve.config import EngineConfig
from ecserve.engine.engine import Engine
from ecserve.engine.kv_cache import BlockManager
from ecserve.types import Request, SamplingParams


def test_allocate_and_free():
    bm = BlockManager(num_blocks=10, block_size=4)
    t1 = bm.allocate("a", 9)  # 3 blocks
    t2 = bm.allocate("b", 4)  # 1 block
    assert len(t1) == 3 and len(t2) == 1 and not set(t1) & set(t2)
    assert bm.num_free == 6 and bm.can_allocate(24) and not bm.can_allocate(25)
    with pytest.raises(MemoryError):
        bm.allocate("c", 25)
    with pytest.raises(KeyError):
        bm.allocate("a", 1)
    bm.free("a")
    bm.free("a")  # idempotent
    assert bm.num_free == 9 and bm.holders() == ["b"]
    bm.free("b")
    assert bm.num_free == 10 and sorted(bm.allocate("d", 40)) == list(range(10))


def engine_for(make_model, **kw) -> Engine:
    cfg = dict(device="cpu", block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
               kv_cache_bytes=200_000)
    cfg.update(kw)
    return Engine(make_model(), EngineConfig(**cfg))


def test_no_leak_after_finish_and_abort(make_model):
    eng = engine_for(make_model)
    total = eng.blocks.num_blocks
    for i in range(8):
        prompt = tuple(range(1, 3 + 7 * i))
        eng.add_request(Request(f"r{i}", prompt, SamplingParams(max_new_tokens=5)))
    eng.step()  # some admitted and prefilling, others waiting
    assert eng.blocks.num_used > 0 and eng.batcher.waiting
    assert eng.abort("r0")  # running, mid-prefill or decoding
    assert eng.abort("r7")  # still waiting
    assert not eng.abort("r7") and not eng.abort("nope")
    steps = 0
    while eng.has_unfinished():
        eng.step()
        steps += 1
        if steps == 3:
            eng.abort("r3")
    assert eng.blocks.num_free == total and not eng.blocks.holders() and not eng.seqs


def test_admission_never_exceeds_the_cache(make_model):
    eng = engine_for(make_model)
    per_request = eng.blocks.blocks_for(40 + 20 - 1)
    for i in range(10):
        eng.add_request(Request(f"r{i}", tuple([5] * 40), SamplingParams(max_new_tokens=20)))
    admitted_max = 0
    while eng.has_unfinished():
        eng.step()
        assert eng.blocks.num_used <= eng.blocks.num_blocks
        admitted_max = max(admitted_max, len(eng.batcher.running))
    assert admitted_max == min(4, eng.blocks.num_blocks // per_request)
    assert eng.blocks.num_free == eng.blocks.num_blocks
