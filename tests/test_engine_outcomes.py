"""How requests end besides their stop conditions, and what else events carry: time limits,
a failing step (only its requests fail), a lost runner (all of them), logprobs, and the
waiting queue's token bound."""

from __future__ import annotations

import time

import pytest
import torch

from ecserve.config import EngineConfig
from ecserve.engine.batcher import QueueFullError
from ecserve.engine.engine import Engine
from ecserve.engine.runner import RunnerLost
from ecserve.types import FinishReason, Request, SamplingParams


@pytest.fixture
def engine(make_model) -> Engine:
    return Engine(make_model(), EngineConfig(device="cpu", record_steps=True))


def run(engine: Engine) -> dict[str, list]:
    events: dict[str, list] = {}
    while engine.has_unfinished():
        for ev in engine.step():
            events.setdefault(ev.request_id, []).append(ev)
    return events


class Finished:
    """An engine observer keeping each finished request's reason (what the metrics count)."""

    def __init__(self) -> None:
        self.reasons: dict[str, FinishReason] = {}

    def step_done(self, stats: object) -> None:
        pass

    def request_done(self, stats) -> None:
        self.reasons[stats.request_id] = stats.finish_reason


def req(rid: str, n: int = 40, **params) -> Request:
    return Request(rid, tuple(range(1, 9)), SamplingParams(max_new_tokens=n, ignore_eos=True,
                                                           **params))


def test_time_limit_ends_a_request_between_tokens(engine):
    engine.observer = finished = Finished()
    engine.add_request(req("slow", time_limit=0.05))
    engine.add_request(req("free", n=6))
    events = {"slow": [], "free": []}
    while engine.has_unfinished():
        for ev in engine.step():
            events[ev.request_id].append(ev)
        time.sleep(0.01)
    last = events["slow"][-1]
    assert last.finish_reason is FinishReason.TIME_LIMIT and last.token_id is None
    assert 0 < len(events["slow"]) - 1 < 40
    assert events["free"][-1].finish_reason is FinishReason.LENGTH and len(events["free"]) == 6
    assert engine.blocks.num_free == engine.blocks.num_blocks
    # Counted as what it was, not as an abort.
    assert finished.reasons == {"slow": FinishReason.TIME_LIMIT, "free": FinishReason.LENGTH}


def test_a_failing_step_fails_only_its_requests(engine, monkeypatch):
    engine.observer = finished = Finished()
    engine.add_request(req("a", n=4))
    engine.add_request(req("b", n=4))
    engine.step()  # both prefill together
    real = engine.runner.execute

    def boom(plan, *args):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine.runner, "execute", boom)
    events = engine.step()
    assert {e.request_id: e.finish_reason for e in events} == {"a": FinishReason.ERROR,
                                                               "b": FinishReason.ERROR}
    assert all("device fell over" in e.detail and e.token_id is None for e in events)
    assert finished.reasons == {"a": FinishReason.ERROR, "b": FinishReason.ERROR}
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    # The engine keeps serving: a new request runs to the end.
    monkeypatch.setattr(engine.runner, "execute", real)
    engine.add_request(req("c", n=3))
    assert run(engine)["c"][-1].finish_reason is FinishReason.LENGTH


def test_a_lost_runner_ends_every_request_and_takes_no_more(make_model, monkeypatch):
    """RunnerLost (an expert-parallel rank gone): the running request, the one still waiting
    for admission and any later one all end at once; nothing hangs, no block leaks."""
    engine = Engine(make_model(), EngineConfig(device="cpu", max_num_seqs=1))
    engine.add_request(req("a", n=4))
    engine.add_request(req("b", n=4))  # waits: one sequence at a time
    engine.step()

    def lost(plan, *args):
        raise RunnerLost("expert-parallel step failed: rank 1 is gone")

    monkeypatch.setattr(engine.runner, "execute", lost)
    events = engine.step()
    assert {e.request_id: e.finish_reason for e in events} == {"a": FinishReason.ERROR,
                                                               "b": FinishReason.ERROR}
    assert all("rank 1 is gone" in e.detail for e in events)
    assert engine.lost and "rank 1 is gone" in engine.lost
    assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
    with pytest.raises(RunnerLost, match="rank 1 is gone"):
        engine.add_request(req("c"))


def test_logprobs_are_the_models_distribution(engine):
    engine.add_request(req("g", n=5, logprobs=3))
    engine.add_request(req("s", n=5, logprobs=0, temperature=0.7, seed=3))
    engine.add_request(req("none", n=5))
    events = run(engine)
    logits = {}  # request id -> [steps] of its sampled rows
    for rec in engine.records:
        for rid, row in rec.logits.items():
            logits.setdefault(rid, []).append(row)
    for rid, n in (("g", 3), ("s", 0)):
        for ev, row in zip(events[rid], logits[rid], strict=True):
            lp = torch.log_softmax(row.float(), dim=-1)
            assert ev.logprob == pytest.approx(lp[ev.token_id].item(), abs=1e-5)
            want = lp.topk(n) if n else None
            assert [i for i, _ in ev.top_logprobs] == ([] if want is None
                                                       else want.indices.tolist())
            if want is not None:
                assert [v for _, v in ev.top_logprobs] == pytest.approx(want.values.tolist(),
                                                                        abs=1e-5)
    # Greedy picks the top token; a request that asked for nothing gets nothing.
    assert all(ev.top_logprobs[0][0] == ev.token_id for ev in events["g"])
    assert all(ev.logprob is None and ev.top_logprobs == () for ev in events["none"])


def test_waiting_queue_bounds_prompt_tokens(make_model):
    engine = Engine(make_model(), EngineConfig(device="cpu", max_num_seqs=1,
                                               max_waiting_tokens=20))
    engine.add_request(req("running"))  # 8 tokens, admitted at the first step
    engine.step()
    engine.add_request(req("w1"))
    engine.add_request(req("w2"))  # 16 tokens waiting
    with pytest.raises(QueueFullError, match="16 of 20 prompt tokens queued"):
        engine.add_request(req("w3"))
    assert engine.abort("w1")  # leaving the queue gives its tokens back
    engine.add_request(req("w3"))
    assert engine.batcher.waiting_tokens == 16
