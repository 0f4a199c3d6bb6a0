"""Decode steps over static buffers (the CUDA-graph path) compute what eager steps compute.

Without capture, DecodeGraphs(capture=False) replays by running the forward pass over the same
static buffers a graph would read (on a CPU, under the Triton interpreter). That checks the
buffer handling, the layouts and the dispatch; `host_syncs` checks that the captured forward has
no operation that waits for the device (which would break a capture). The real capture is the
GPU test at the end.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton runs on the CPU only interpreted; set before jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from graph_safety import host_syncs

from ecserve.config import EngineConfig
from ecserve.engine.decode_graphs import DecodeGraphs
from ecserve.engine.engine import Engine
from ecserve.types import Request, SamplingParams

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Staggered lengths: sequences finish at different steps, so the decode batch shrinks and its
# layout changes; mixed scopes put batch groups and groups of one in the same step.
PROMPTS = {"a": ((256, 5, 6, 7, 8, 9, 10, 11, 12), 7, "batch"),
           "b": ((256, 40, 41), 4, "batch"),
           "c": ((256, 90), 6, "sequence"),
           "d": ((256, 3, 1, 4, 1, 5), 5, "batch"),
           "e": ((256, 77, 78, 79), 3, "sequence")}


def generate(engine: Engine) -> dict[str, list[int]]:
    for rid, (prompt, n, scope) in PROMPTS.items():
        engine.add_request(Request(rid, prompt, SamplingParams(max_new_tokens=n, ignore_eos=True),
                                   routing_scope=scope))
    out: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    return out


def engine(model, graphs: bool, **cfg) -> Engine:
    eng = Engine(model, EngineConfig(device=DEV, kernels="triton", record_steps=True,
                                     expert_timing_every=0, **cfg))
    if graphs:
        assert eng.runner.enable_decode_graphs(max_batch=8, max_graphs=64, capture=False) is None
    return eng


def assert_same_steps(a: Engine, b: Engine) -> None:
    for ra, rb in zip(a.records, b.records, strict=True):
        assert ra.stats.plan == rb.stats.plan
        for rid in ra.logits:
            assert torch.equal(ra.logits[rid], rb.logits[rid]), rid  # same kernels, same shapes
        for ma, mb in zip(ra.stats.moe, rb.stats.moe, strict=True):
            assert torch.equal(ma.tokens_per_expert, mb.tokens_per_expert)
            assert torch.equal(ma.gate_sum, mb.gate_sum)
            assert torch.equal(ma.experts_per_token, mb.experts_per_token)
            assert ma.capacity_slots == mb.capacity_slots


@pytest.mark.parametrize("policy", ["capped", "ec", "token_choice"])
def test_static_decode_steps_equal_eager_steps(make_model, policy):
    model = make_model(num_layers=2, moe_layers=[1], routing={"policy": policy})
    eager, static = engine(model, False), engine(model, True)
    assert generate(static) == generate(eager)
    assert_same_steps(eager, static)
    graphed = [r.stats.graphed for r in static.records]
    decode = [all(len(c.token_ids) == 1 for c in r.stats.plan.chunks) for r in static.records]
    assert graphed == decode and any(graphed) and not all(graphed)  # prefill steps ran eagerly
    graphs = static.runner.decode_graphs
    assert graphs is not None and graphs.replays == sum(graphed)
    layouts = {r.stats.plan.group_sizes for r in static.records if r.stats.graphed}
    assert set(graphs.graphs) == layouts and len(layouts) > 2
    assert any(1 in key and max(key) > 1 for key in layouts)  # a mixed-scope layout
    assert static.records[-1].stats.decode_graphs == len(layouts)


def test_layouts_past_the_limit_and_batches_past_the_size_run_eagerly(make_model):
    model = make_model(num_layers=2, moe_layers=[1])
    eager, static = engine(model, False), engine(model, False)
    static.runner.decode_graphs = DecodeGraphs(
        static.runner.model, static.runner.kv, static.runner.block_size,
        static.runner.table_width or 0, max_batch=3, max_graphs=1, capture=False)
    assert generate(static) == generate(eager)
    assert_same_steps(eager, static)
    graphs = static.runner.decode_graphs
    assert len(graphs.graphs) == 1
    (key,) = graphs.graphs
    assert sum(key) <= 3
    assert all(r.stats.graphed == (r.stats.plan.group_sizes == key) for r in static.records)


def test_capture_ahead_of_traffic(make_model):
    model = make_model(num_layers=2, moe_layers=[1])
    static = engine(model, True)
    layouts = [static.batcher.decode_groups(n, 0) for n in range(8, 0, -1)]
    assert static.runner.capture_decode_graphs([*layouts, (9,), (2, 2, 2, 2, 2)]) == 8
    assert layouts[0] == (8,) and layouts[-1] == (1,)  # group_size 8: one group up to 8
    held = dict(static.runner.decode_graphs.graphs)
    eager = engine(model, False)
    assert generate(static) == generate(eager)
    for key, entry in held.items():  # the ahead-of-time graphs were used, not rebuilt
        assert static.runner.decode_graphs.graphs[key] is entry


def test_a_failed_capture_falls_back_to_eager_steps(make_model, monkeypatch):
    model = make_model(num_layers=2, moe_layers=[1])
    eager, static = engine(model, False), engine(model, True)

    def boom(self, key):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphs, "_capture", boom)
    assert generate(static) == generate(eager)
    graphs = static.runner.decode_graphs
    assert graphs is not None and "stream is capturing" in (graphs.disabled or "")
    assert not any(r.stats.graphed for r in static.records)


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_hugging_face_models_through_static_decode_steps(tmp_path, monkeypatch, model_type):
    """Token-choice checkpoints (biases, shared experts, q/k norms) replayed over static
    buffers on the Triton path generate what the plain torch path generates."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from hf_models import build

    _, model = build(model_type, tmp_path / model_type)
    cfg = {"device": DEV, "record_steps": True, "expert_timing_every": 0,
           "kv_cache_bytes": 1 << 22, "block_size": 4, "max_num_batched_tokens": 64,
           "max_num_seqs": 8}
    plain = Engine(model, EngineConfig(kernels="torch", **cfg))
    static = Engine(model, EngineConfig(kernels="triton", **cfg))
    assert static.runner.enable_decode_graphs(8, 64, capture=False) is None
    assert generate(static) == generate(plain)
    assert sum(r.stats.graphed for r in static.records) > 3
    for ra, rb in zip(plain.records, static.records, strict=True):
        for rid in ra.logits:
            torch.testing.assert_close(rb.logits[rid], ra.logits[rid], atol=1e-4, rtol=1e-4)
        for ma, mb in zip(ra.stats.moe, rb.stats.moe, strict=True):
            assert torch.equal(ma.tokens_per_expert, mb.tokens_per_expert)
            assert ma.capacity_slots == mb.capacity_slots


@pytest.mark.parametrize(("overrides", "kernels", "reason"), [
    ({}, "torch", "need the Triton kernels"),
    ({"position_encoding": "relative_bias"}, "triton", "position_encoding=relative_bias"),
    ({"routing": {"max_experts_per_token": 2}}, "triton", "max_experts_per_token"),
    pytest.param({}, "triton", "need a CUDA device", marks=pytest.mark.skipif(
        DEV == "cuda", reason="on a CPU")),
])
def test_what_cannot_be_captured_says_why(make_model, overrides, kernels, reason):
    model = make_model(num_layers=2, moe_layers=[1], **overrides)
    eng = Engine(model, EngineConfig(device=DEV, kernels=kernels))
    assert reason in (eng.runner.enable_decode_graphs(8, 64, capture=True) or "")
    assert eng.runner.decode_graphs is None


def test_a_layout_mismatch_is_refused(make_model):
    from ecserve.engine.decode_graphs import _copy_into

    model = make_model(num_layers=2, moe_layers=[1])
    static = engine(model, True)
    static.runner.capture_decode_graphs([(2,), (1, 1)])
    graphs = static.runner.decode_graphs
    with torch.inference_mode(), pytest.raises(ValueError, match="group_bounds"):
        _copy_into(graphs.graphs[(2,)].batch, graphs.graphs[(1, 1)].batch)


@pytest.mark.parametrize("policy", ["capped", "ec", "token_choice"])
def test_the_captured_forward_never_waits_for_the_device(make_model, policy):
    """Whatever a CUDA graph holds must not read a value back to the host (item, nonzero,
    boolean indexing, bincount, ...): capture would fail, or bake in one step's answer."""
    model = make_model(num_layers=2, moe_layers=[1], routing={"policy": policy})
    static = engine(model, True)
    graphs = static.runner.decode_graphs
    key = static.batcher.decode_groups(5, 2)  # a batch group of 5 and two groups of one
    static.runner.capture_decode_graphs([key])
    entry = graphs.graphs[key]
    with torch.inference_mode(), host_syncs() as seen:
        graphs._forward(entry.batch, sum(key), [])
    assert {"sort", "scatter_add_", "linear"} <= set(seen.ops)  # routing, statistics, matmuls
    assert not seen.syncs, seen.syncs


def test_host_syncs_sees_syncs():
    with host_syncs() as seen:
        x = torch.tensor([0, 3, 0, 1])
        _ = x[x > 0]
        _ = x.nonzero()
        _ = int(x.sum())
        _ = torch.bincount(x)
        _ = x[torch.tensor([1, 2])]  # long indices: fine
    assert seen.syncs == ["index", "nonzero", "_local_scalar_dense", "bincount"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_graphed_decode_generates_the_eager_tokens(make_model, dtype):
    model = make_model(num_layers=2, moe_layers=[1])
    cfg = {"device": "cuda", "kernels": "triton", "dtype": dtype, "record_steps": True,
           "expert_timing_every": 0, "max_num_seqs": 8}
    eager = Engine(model, EngineConfig(cuda_graphs=False, **cfg))
    graphed = Engine(model, EngineConfig(cuda_graphs=True, **cfg))
    graphs = graphed.runner.decode_graphs
    assert os.environ.get("TRITON_INTERPRET") != "1"  # the interpreter cannot be captured
    assert graphs is not None and graphs.capture and graphs.disabled is None, graphs.disabled
    assert len(graphs.graphs) == 8  # 1 .. 8 sequences, captured at start
    assert generate(graphed) == generate(eager)  # the same kernels on the same shapes
    assert graphs.disabled is None and graphs.replays > 0
    tol = 1e-5 if dtype == "float32" else 1e-2
    for ra, rb in zip(eager.records, graphed.records, strict=True):
        for rid in ra.logits:
            torch.testing.assert_close(rb.logits[rid], ra.logits[rid], atol=tol, rtol=tol)


def test_graph_steps_are_counted_in_the_metrics(make_model):
    from prometheus_client.parser import text_string_to_metric_families

    from ecserve.metrics import Metrics

    static = engine(make_model(num_layers=2, moe_layers=[1]), True)
    static.observer = metrics = Metrics(static.model_cfg, DEV)
    generate(static)
    found = {s.name: s.value for fam in text_string_to_metric_families(
        metrics.exposition().decode()) for s in fam.samples}
    graphed = sum(r.stats.graphed for r in static.records)
    assert graphed > 0 and found["ecserve_decode_graph_steps_total"] == graphed
    assert found["ecserve_decode_graphs"] == len(static.runner.decode_graphs.graphs) > 0
