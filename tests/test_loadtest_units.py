"""ecserve.loadtest without a server: vLLM's metric definitions on hand-made records, the
workload (exact synthetic lengths, prompts files, gamma arrivals) and targets parsing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ecserve.errors import ConfigError
from ecserve.loadtest.config import LoadTestConfig, parse_slos
from ecserve.loadtest.records import RequestRecord
from ecserve.loadtest.stats import calculate_metrics, errors_by_code
from ecserve.loadtest.targets import evaluate, load_targets
from ecserve.loadtest.workload import ModelLimits, arrival_offsets, build_workload, read_prompts


def rec(i: int, ttft: float, itl: list[float], input_len: int = 10) -> RequestRecord:
    """A successful request whose chunks carry one token each."""
    latency = ttft + sum(itl)
    return RequestRecord(i, input_len, len(itl) + 1, ttft=ttft, latency=latency, itl=itl,
                         output_tokens=len(itl) + 1, success=True, end=latency)


def test_metrics_follow_vllm_definitions():
    a = rec(0, 0.100, [0.010, 0.030])  # 3 tokens: TPOT (0.14 - 0.1) / 2 = 0.02
    b = rec(1, 0.300, [0.050])  # 2 tokens: TPOT 0.05
    c = rec(2, 0.200, [])  # 1 token: no TPOT sample (0 for goodput)
    bad = RequestRecord(3, 10, 5, error="RESOURCE_EXHAUSTED", output_tokens=0)
    m = calculate_metrics([a, b, c, bad], duration=2.0, slos_ms={"ttft": 250, "tpot": 30})
    assert m["completed"] == 3 and m["failed"] == 1 and m["error_rate"] == 0.25
    assert m["total_input"] == 30  # failed requests count no input, as vLLM
    assert m["total_output"] == 6
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 3.0
    assert m["total_token_throughput"] == 18.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0)
    assert m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["p90_ttft_ms"] == pytest.approx(np.percentile([100, 300, 200], 90))
    assert m["mean_tpot_ms"] == pytest.approx(35.0)  # (20 + 50) / 2, the 1-token one left out
    assert m["mean_itl_ms"] == pytest.approx(30.0)  # gaps pooled over requests: 10, 30, 50
    assert m["p99_itl_ms"] == pytest.approx(np.percentile([10, 30, 50], 99))
    assert m["mean_e2el_ms"] == pytest.approx((140 + 350 + 200) / 3)
    # goodput: a meets both (ttft 100, tpot 20), b misses ttft, c meets (tpot counts as 0)
    assert m["goodput"] == pytest.approx(2 / 2.0)
    assert errors_by_code([a, bad]) == {"RESOURCE_EXHAUSTED": 1}


def test_metrics_with_no_success_are_zero_and_no_goodput_without_slos():
    m = calculate_metrics([RequestRecord(0, 5, 5, error="UNAVAILABLE")], duration=1.0)
    assert m["completed"] == 0 and m["p99_ttft_ms"] == 0.0 and "goodput" not in m
    (v,) = evaluate({"max_p99_ttft_ms": 100}, m)
    assert not v.passed and "n/a" in v.line()  # no successes cannot pass a latency target


LIMITS = ModelLimits(vocab_size=258, max_model_len=256, bos_token_id=256, eos_token_id=257)


def test_synthetic_prompts_have_exact_lengths_and_no_special_ids():
    cfg = LoadTestConfig(input_len_range=(5, 40), output_len_range=(1, 9), seed=3)
    specs = build_workload(cfg, LIMITS, 200)
    assert specs == build_workload(cfg, LIMITS, 200)  # seeded
    assert specs != build_workload(LoadTestConfig(input_len_range=(5, 40),
                                                  output_len_range=(1, 9), seed=4), LIMITS, 200)
    lengths = [len(s.prompt) for s in specs]
    assert all(s.input_len == len(s.prompt) for s in specs)
    assert min(lengths) == 5 and max(lengths) == 40  # both ends reachable
    assert {s.output_len for s in specs} == set(range(1, 10))
    for s in specs:
        assert s.prompt[0] == 256 and all(0 <= t < 256 for t in s.prompt[1:])


def test_lengths_past_max_model_len_are_refused():
    with pytest.raises(ValueError, match="max_model_len is 256"):
        build_workload(LoadTestConfig(input_len=200, output_len=57), LIMITS, 1)


def test_prompts_file(tmp_path: Path):
    p = tmp_path / "prompts.jsonl"
    p.write_text('{"prompt": "hello", "max_new_tokens": 3}\n\nplain text line\n')
    assert read_prompts(str(p)) == [("hello", 3), ("plain text line", None)]
    specs = build_workload(LoadTestConfig(prompts_file=str(p), output_len=7), LIMITS, 5)
    assert [(s.prompt, s.output_len) for s in specs] == [
        ("hello", 3), ("plain text line", 7), ("hello", 3), ("plain text line", 7), ("hello", 3)]
    p.write_text('{"prompt": ""}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: \"prompt\" must be"):
        read_prompts(str(p))


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_are_gamma_with_the_rate_as_mean(burstiness):
    it = arrival_offsets(50.0, burstiness, seed=0)
    t = np.array([next(it) for _ in range(20001)])
    gaps = np.diff(t)
    assert t[0] == 0.0
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    # gamma(shape B): coefficient of variation 1/sqrt(B); 1 for Poisson
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    inf = arrival_offsets(math.inf, 1.0, seed=0)
    assert [next(inf) for _ in range(3)] == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"concurrency": 2, "request_rate": 1.0}, "not both"),
    ({"request_rate": 0.0}, "--request-rate must be > 0"),
    ({"burstiness": 0.0}, "--burstiness must be > 0"),
    ({"input_len_range": (9, 3)}, "--input-len-range needs 1 <= LO <= HI"),
    ({"input_len": 4, "input_len_range": (1, 3)}, "not both"),
    ({"goodput": {"latency": 5.0}}, "unknown SLO 'latency'"),
    ({"max_in_flight": 0}, "--max-in-flight must be >= 1"),
])
def test_config_errors_name_the_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoadTestConfig(**kwargs).validate()


def test_parse_slos():
    assert parse_slos(["ttft:500", "e2el:2.5"]) == {"ttft": 500.0, "e2el": 2.5}
    with pytest.raises(ValueError, match="NAME:MS"):
        parse_slos(["ttft=500"])


def test_targets_files(tmp_path: Path):
    j = tmp_path / "t.json"
    j.write_text('{"min_output_throughput": 100, "max_p99_ttft_ms": 500}')
    assert load_targets(str(j)) == {"min_output_throughput": 100.0, "max_p99_ttft_ms": 500.0}
    t = tmp_path / "t.toml"
    t.write_text("max_error_rate = 0.01\nmax_median_itl_ms = 20\n")
    assert load_targets(str(t)) == {"max_error_rate": 0.01, "max_median_itl_ms": 20.0}
    j.write_text('{"min_output_throughput": 100, "max_p99_ttft": 500}')
    with pytest.raises(ValueError, match="unknown target 'max_p99_ttft'"):
        load_targets(str(j))
    j.write_text('{"max_error_rate": "low"}')
    with pytest.raises(ValueError, match="max_error_rate must be a number"):
        load_targets(str(j))


def test_target_verdicts():
    m = {"completed": 5, "output_throughput": 120.0, "p99_ttft_ms": 600.0, "error_rate": 0.0}
    v = evaluate({"min_output_throughput": 100, "max_p99_ttft_ms": 500,
                  "max_error_rate": 0.0}, m)
    assert [(x.name, x.passed) for x in v] == [
        ("min_output_throughput", True), ("max_error_rate", True), ("max_p99_ttft_ms", False)]
    assert v[0].line() == ("PASS  min_output_throughput: output_throughput = 120 "
                           "(limit >= 100 tok/s)")
    assert v[2].line().startswith("FAIL  max_p99_ttft_ms: p99_ttft_ms = 600")


def test_requests_ask_for_exact_lengths_and_no_token_ids_over_both_protocols():
    from ecserve.loadtest.transport import grpc_request, http_body
    from ecserve.loadtest.workload import RequestSpec

    msg = grpc_request(RequestSpec((256, 5, 6), 9, 3), LoadTestConfig(), 0)
    assert list(msg.prompt_token_ids) == [256, 5, 6] and not msg.prompt
    assert msg.stopping.max_new_tokens == 9 and msg.stopping.ignore_eos
    assert not msg.response.token_ids and not msg.response.logprobs
    assert not msg.sampling.HasField("seed")  # greedy: no seed needed
    sampled = grpc_request(RequestSpec("hi", 2, None), LoadTestConfig(temperature=0.7,
                                                                      seed=5), 3)
    assert sampled.prompt == "hi" and sampled.sampling.seed == 8  # seed + index: reproducible
    body = http_body(RequestSpec((256, 5, 6), 9, 3), LoadTestConfig(), 0)
    assert body["prompt"] == [256, 5, 6] and body["max_tokens"] == 9 and body["ignore_eos"]
    assert body["temperature"] == 0 and "seed" not in body and "logprobs" not in body
    assert body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert http_body(RequestSpec("hi", 2, None), LoadTestConfig(temperature=0.7, seed=5),
                     3)["seed"] == 8


def test_shared_prefix_workload_gives_each_request_one_of_n_prefixes():
    cfg = LoadTestConfig(input_len=5, output_len=3, shared_prefix_len=20, num_prefixes=2)
    specs = build_workload(cfg, ModelLimits(300, 64, bos_token_id=256), 6)
    heads = [s.prompt[:20] for s in specs]
    assert heads[0] != heads[1] and heads[0::2] == [heads[0]] * 3 and heads[1::2] == [heads[1]] * 3
    assert all(s.input_len == len(s.prompt) == 25 and s.prompt[0] == 256 for s in specs)
    assert len({s.prompt[20:] for s in specs}) == 6  # each its own suffix
    with pytest.raises(ConfigError, match="max_model_len is 64"):
        build_workload(LoadTestConfig(input_len=5, output_len=3, shared_prefix_len=60),
                       ModelLimits(300, 64), 1)
    with pytest.raises(ConfigError, match="--num-prefixes must be >= 1"):
        LoadTestConfig(num_prefixes=0).validate()
