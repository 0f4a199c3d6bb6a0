"""Prefix caching (ecserve/engine/kv_cache.py, prefix_cache.py; docs/kv-cache.md): the block
manager's references, keys and eviction; cached == uncached for every routing that can be
formed again (docs/routing.md §8), hits counted exactly, batch-scope expert choice bypassed, no
block leaked under a flood of prefixes or a cancel mid-prefill."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from safetensors.torch import load_file, save_file
from serving import ServerThread
from test_prometheus import samples, scrape

from ecserve.client import Client
from ecserve.config import EngineConfig
from ecserve.engine.core import CoreSpec, load_engine
from ecserve.engine.engine import Engine
from ecserve.engine.kv_cache import BlockManager
from ecserve.engine.llm import LLM
from ecserve.engine.runner import kv_bytes_per_block
from ecserve.engine.sequence import SeqStatus
from ecserve.server.core_process import ProcessTransport
from ecserve.types import Request, SamplingParams, TokenEvent

CFG = EngineConfig(device="cpu", block_size=4, max_num_seqs=8, max_num_batched_tokens=32,
                   kv_cache_bytes=1 << 22, record_steps=True)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def test_blocks_are_shared_counted_and_evicted_least_recently_used_first():
    bm = BlockManager(4, 2)
    a = bm.allocate("a", 4)  # 2 blocks
    assert bm.register(a[0], key(1)) and bm.register(a[1], key(2))
    assert not bm.register(a[1], key(3)) and not bm.register(7, key(1))  # one key per block
    b = bm.allocate("b", 6, cached=bm.match([key(1), key(2), key(9)]))
    assert b[:2] == a and bm.num_used == 3 and bm.num_free == 1
    bm.free("a")
    assert bm.num_used == 3 and bm.num_evictable == 0  # b still holds them
    bm.free("b")
    assert bm.num_used == 0 and bm.num_free == 4 and bm.num_evictable == 2
    # Freed last block first in line: a new sequence needing all 4 blocks evicts both.
    assert bm.match([key(1), key(2)]) == a
    c = bm.allocate("c", 6)  # 3 blocks: the free one, then block a[1], then a[0]... one left
    assert bm.num_evictable == 1 and bm.match([key(1)]) == [a[0]] and bm.match([key(2)]) == []
    assert a[1] in c
    assert not bm.can_allocate(4) and bm.can_allocate(2)
    # Reusing an idle cached block takes it out of the allocatable count too.
    assert bm.can_allocate(2, cached=[a[0]]) and not bm.can_allocate(4, cached=[a[0]])
    bm.free("c")
    assert bm.num_used == 0 and bm.num_free == 4


def run(engine_or_llm, prompts, params, scope=None):
    """Tokens and logprobs of each prompt, generated one request after another's admission."""
    llm = engine_or_llm
    logprobs: dict[str, list[float]] = {}

    def on_token(ev: TokenEvent) -> None:
        logprobs.setdefault(ev.request_id, []).append(ev.logprob)

    outs = llm.generate(prompts, params, on_token=on_token, routing_scope=scope)
    return [o.token_ids for o in outs], [logprobs[o.request_id] for o in outs]


def shared_prompts(n: int, prefix_len: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 256, (prefix_len,), generator=gen).tolist()
    return [prefix + torch.randint(0, 256, (3 + i,), generator=gen).tolist() for i in range(n)]


def loud_model(make_model, routing: dict) -> str:
    """A tiny model whose experts move the logits (weights x4): a block reused under the wrong
    routing group then changes the output by far more than float noise (0.05-0.1 against
    1e-6, measured)."""
    path = make_model(routing=routing)
    state = load_file(path / "model.safetensors")
    save_file({k: v * 4 if ".moe.w_" in k else v for k, v in state.items()},
              path / "model.safetensors")
    return str(path)


CASES = [  # (routing, scope, shared prefix length, prompt tokens each later request reuses)
    ({"policy": "threshold"}, None, 37, 36),
    ({"policy": "token_choice", "top_k": 2}, None, 37, 36),
    ({"policy": "token_choice", "top_k": 2}, "sequence", 37, 36),
    # Whole groups only: the group of tokens 32-39 holds 4 tokens past the shared prefix.
    ({"policy": "ec", "group_size": 8}, "sequence", 36, 32),
    ({"policy": "capped", "group_size": 12, "max_experts_per_token": 2}, "sequence", 34, 24),
]


@pytest.mark.parametrize(("routing", "scope", "shared", "hit"), CASES)
def test_a_cached_prefix_gives_what_computing_it_gives(make_model, routing, scope, shared, hit):
    model = loud_model(make_model, routing)
    prompts = shared_prompts(5, shared)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=0)
    cached = LLM(model, CFG)
    first = run(cached, prompts[:1], params, scope)
    rest = run(cached, prompts[1:], params, scope)
    plain = LLM(model, dataclasses.replace(CFG, prefix_caching=False))
    want = run(plain, prompts, params, scope)
    assert [*first[0], *rest[0]] == want[0]
    for got, exp in zip([*first[1], *rest[1]], want[1], strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(exp), rtol=0, atol=1e-4)
    hits = [r.stats.prefix_hit_tokens for r in cached.engine.records]
    queried = [r.stats.prefix_queried_tokens for r in cached.engine.records]
    assert sum(hits) == hit * 4, hits
    assert sum(queried) == sum(len(p) for p in prompts)
    engine = cached.engine
    assert engine.blocks.num_used == 0 and engine.blocks.num_evictable > 0


@pytest.mark.parametrize("policy", ["ec", "capped"])
def test_batch_scope_expert_choice_never_shares_blocks(make_model, policy):
    llm = LLM(make_model(routing={"policy": policy}), CFG)
    prompts = shared_prompts(3, 37)
    params = SamplingParams(max_new_tokens=4, temperature=0.0)
    run(llm, prompts[:1], params)
    run(llm, prompts[1:], params)
    stats = [r.stats for r in llm.engine.records]
    assert sum(s.prefix_queried_tokens for s in stats) == 0
    assert llm.engine.blocks.num_cached == 0


def test_a_request_scoring_its_prompt_computes_every_row(make_model):
    llm = LLM(make_model(routing={"policy": "threshold"}), CFG)
    prompts = shared_prompts(2, 37)
    run(llm, prompts[:1], SamplingParams(max_new_tokens=2))
    out = llm.generate(prompts[1:], SamplingParams(max_new_tokens=2, prompt_logprobs=0))
    assert len(out[0].prompt_logprobs) == len(prompts[1])
    assert sum(r.stats.prefix_hit_tokens for r in llm.engine.records) == 0


def test_a_flood_of_prefixes_evicts_and_leaks_nothing(make_model):
    """A cache of 24 blocks, 20 distinct 30-token prefixes twice over: blocks are evicted
    least recently used first, every request still runs, and idle, every block is free."""
    model = make_model(routing={"policy": "threshold"})
    per_block = kv_bytes_per_block(Engine(model, CFG).runner.model, CFG.block_size)
    engine = Engine(model, dataclasses.replace(CFG, kv_cache_bytes=24 * per_block,
                                               max_num_seqs=2))
    assert engine.blocks.num_blocks == 24
    prompts = [shared_prompts(1, 30, seed=s)[0] for s in range(20)]
    done = 0
    for round_ in range(2):
        for i, p in enumerate(prompts):
            engine.add_request(Request(f"r{round_}-{i}", tuple(p),
                                       SamplingParams(max_new_tokens=3)))
        while engine.has_unfinished():
            done += sum(ev.finished for ev in engine.step())
    assert done == 40
    assert engine.blocks.num_used == 0 and engine.blocks.num_free == 24
    assert 0 < engine.blocks.num_cached == engine.blocks.num_evictable <= 24


def test_a_cancel_mid_prefill_keeps_what_was_computed_and_frees_the_rest(make_model):
    model = make_model(routing={"policy": "threshold"})
    cfg = dataclasses.replace(CFG, max_num_batched_tokens=8)  # 8-token prefill chunks
    engine = Engine(model, cfg)
    prompts = shared_prompts(2, 37)
    engine.add_request(Request("doomed", tuple(prompts[0]), SamplingParams(max_new_tokens=4)))
    engine.step()
    engine.step()  # 16 prompt tokens computed: 4 blocks registered
    assert engine.blocks.num_cached == 4
    assert engine.abort("doomed")
    assert engine.blocks.num_used == 0 and engine.blocks.num_evictable == 4
    params = SamplingParams(max_new_tokens=5, temperature=0.0, logprobs=0)
    engine.add_request(Request("next", tuple(prompts[1]), params))
    tokens = []
    while engine.has_unfinished():
        tokens += [ev.token_id for ev in engine.step() if ev.token_id is not None]
    assert sum(r.stats.prefix_hit_tokens for r in engine.records) == 16
    plain = LLM(model, dataclasses.replace(cfg, prefix_caching=False))
    assert tokens == plain.generate([prompts[1]], params)[0].token_ids
    assert engine.blocks.num_used == 0


def test_served_over_grpc_the_cache_is_exact_counted_and_its_gauges_right_from_serving(
        make_model):
    """The engine core in its own process: before any request /metrics gives the KV capacity;
    a second prompt sharing a prefix reuses its blocks, gives the uncached tokens, and the
    queries, hits, cached and evictable blocks are scraped as they happened."""
    model = loud_model(make_model, {"policy": "threshold"})
    transport = ProcessTransport(functools.partial(load_engine, model, CFG),
                                 CoreSpec(torch_threads=1), model)
    prompts = shared_prompts(2, 37)
    with ServerThread(transport) as s:
        before = samples(scrape(s))
        blocks = before[("ecserve_kv_cache_capacity_blocks", frozenset())]
        assert blocks > 0
        got = []
        with Client(f"127.0.0.1:{s.port}") as c:
            for p in prompts:
                reply = c.generate(p, max_new_tokens=6, ignore_eos=True, token_ids=True)
                got.append([t.id for t in reply.tokens])
        after = samples(scrape(s))
    plain = LLM(model, dataclasses.replace(CFG, prefix_caching=False))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    assert got == [o.token_ids for o in plain.generate(prompts, params)]
    assert after[("ecserve_prefix_cache_queries_total", frozenset())] == 40 + 41
    assert after[("ecserve_prefix_cache_hits_total", frozenset())] == 36
    assert after[("ecserve_kv_cache_blocks_used", frozenset())] == 0
    # Both requests' full blocks: 10 + (36 shared, then 5 more of their own tokens).
    cached = after[("ecserve_kv_cache_blocks_cached", frozenset())]
    assert cached == after[("ecserve_kv_cache_blocks_evictable", frozenset())] > 10


# ---------------------------------------------------------------- blocks on demand, preemption

class Finished:
    """An EngineObserver keeping each finished request's stats."""

    def __init__(self) -> None:
        self.requests: list = []

    def step_done(self, stats) -> None:
        pass

    def request_done(self, stats) -> None:
        self.requests.append(stats)


def run_engine(engine: Engine, prompts: list[list[int]], new_tokens: int, scope: str | None
               ) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, logprobs=0,
                            ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"r{i}", tuple(p), params, routing_scope=scope))
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.token_id is not None:
                tokens.setdefault(ev.request_id, []).append(ev.token_id)
                logprobs.setdefault(ev.request_id, []).append(ev.logprob)
    return tokens, logprobs


def small_cache(model: str, blocks: int, **cfg: object) -> Engine:
    per_block = kv_bytes_per_block(Engine(model, CFG).runner.model, CFG.block_size)
    engine = Engine(model, dataclasses.replace(CFG, kv_cache_bytes=blocks * per_block, **cfg))
    assert engine.blocks.num_blocks == blocks
    return engine


REPLAYS = [({"policy": "threshold"}, None), ({"policy": "token_choice", "top_k": 2}, None),
           ({"policy": "ec", "group_size": 8}, "sequence"),
           ({"policy": "capped", "group_size": 12, "max_experts_per_token": 2}, "sequence")]


@pytest.mark.parametrize(("routing", "scope"), REPLAYS)
@pytest.mark.parametrize("caching", [True, False])
def test_a_preempted_sequence_replays_to_what_it_would_have_given(make_model, routing, scope,
                                                                  caching):
    """8 sequences that grow to 8-11 blocks each in a cache of 14: the youngest are preempted
    and replayed, prompt in its groups then each generated token alone; every token and
    logprob is the unconstrained engine's, and idle, every block is free."""
    model = loud_model(make_model, routing)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (10 + 2 * i,), generator=gen).tolist() for i in range(8)]
    want = run_engine(Engine(model, dataclasses.replace(CFG, prefix_caching=caching)),
                      prompts, 24, scope)
    engine = small_cache(model, 14, prefix_caching=caching)
    done = Finished()
    engine.observer = done
    got = run_engine(engine, prompts, 24, scope)
    assert got[0] == want[0]
    for rid, lps in want[1].items():
        torch.testing.assert_close(torch.tensor(got[1][rid]), torch.tensor(lps), rtol=0,
                                   atol=1e-4)
    preempted = [r.preemptions for r in done.requests]
    assert sum(r.stats.preemptions for r in engine.records) == sum(preempted) > 0
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize(("routing", "scope"), REPLAYS)
@pytest.mark.parametrize("caching", [True, False])
def test_a_sequence_preempted_twice_even_mid_replay_gives_what_it_would_have(
        make_model, routing, scope, caching):
    """Admission plans for growth, so the cache above seldom preempts a sequence twice: here
    the batcher is made to, once while it decodes and again while it replays (its KV half
    recomputed), with 12-token steps so the replay spans several."""
    model = loud_model(make_model, routing)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (14 + 3 * i,), generator=gen).tolist() for i in range(3)]
    cfg = dataclasses.replace(CFG, prefix_caching=caching, max_num_batched_tokens=12)
    want = run_engine(Engine(model, cfg), prompts, 20, scope)
    engine = Engine(model, cfg)
    params = SamplingParams(max_new_tokens=20, temperature=0.0, logprobs=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"r{i}", tuple(p), params, routing_scope=scope))
    got: tuple[dict[str, list[int]], dict[str, list[float]]] = ({}, {})
    target, step, mid_replay = engine.seqs["r1"], 0, False
    while engine.has_unfinished():
        # The policy's own hook, forced: once while it decodes, then as soon as it is back
        # (still replaying unless its blocks came from the cache).
        first = (step >= 12 and target.preemptions == 0 and not target.is_prefilling
                 and target.status is SeqStatus.RUNNING)
        again = (target.preemptions == 1 and target.status is SeqStatus.RUNNING
                 and target.num_computed > 0)
        if first or again:
            mid_replay |= again and target.is_prefilling
            engine.batcher._preempt(target)
        for ev in engine.step():
            if ev.token_id is not None:
                got[0].setdefault(ev.request_id, []).append(ev.token_id)
                got[1].setdefault(ev.request_id, []).append(ev.logprob)
        step += 1
    assert target.preemptions == 2
    assert mid_replay or caching
    assert got[0] == want[0]
    for rid, lps in want[1].items():
        torch.testing.assert_close(torch.tensor(got[1][rid]), torch.tensor(lps), rtol=0,
                                   atol=1e-4)
    assert engine.blocks.num_used == 0


@pytest.mark.parametrize(("routing", "config"), [
    ({"policy": "ec"}, {}),  # batch scope: its groups mix sequences, never formed again
    ({"policy": "threshold"}, {"kv_blocks_on_demand": False}),
])
def test_unreplayable_or_reserved_sequences_are_never_preempted(make_model, routing, config):
    model = make_model(routing=routing)
    prompts = [list(range(5 + i, 15 + 3 * i)) for i in range(6)]
    want = run_engine(Engine(model, CFG), prompts, 24, None)
    engine = small_cache(model, 24, **config)
    got = run_engine(engine, prompts, 24, None)
    assert got[0] == want[0]
    stats = [r.stats for r in engine.records]
    assert sum(s.preemptions for s in stats) == 0
    assert max(s.num_running for s in stats) <= 2  # 11 blocks each, reserved at admission
    assert engine.blocks.num_used == 0


def test_a_fully_cached_replay_gets_the_block_its_next_token_writes(make_model):
    """Preempted on a block boundary, every block it had is cached: it is admitted decoding,
    and its table must already hold the block of its newest token's position (found by the
    benchmark: without it, that KV went to the table's padding, block 0)."""
    model = make_model(routing={"policy": "threshold"})
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    prompt = tuple(range(10, 18))
    want = run_engine(Engine(model, CFG), [list(prompt)], 12, None)[0]["r0"]
    engine = Engine(model, CFG)
    engine.add_request(Request("r0", prompt, params))
    tokens = []
    while len(engine.seqs["r0"].token_ids) < 13:  # KV of 12 tokens: 3 full blocks, cached
        tokens += [ev.token_id for ev in engine.step()]
    seq = engine.seqs["r0"]
    engine.batcher._preempt(seq)
    engine.batcher._admit()
    assert seq.status is SeqStatus.RUNNING and not seq.is_prefilling  # nothing to recompute
    assert len(seq.block_table) * CFG.block_size >= len(seq.token_ids)
    while engine.has_unfinished():
        tokens += [ev.token_id for ev in engine.step()]
    assert tokens == want
