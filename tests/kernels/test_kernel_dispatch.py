"""The engine on the Triton path (under the interpreter without CUDA) generates what the torch path
generates: the fused expert MLP in every MoE layer, paged decode attention and the KV write."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton runs on the CPU only interpreted; set before jit
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from ecserve.config import ConfigError, EngineConfig
from ecserve.engine.engine import Engine
from ecserve.engine.runner import resolve_kernels
from ecserve.types import Request, SamplingParams

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run(engine: Engine) -> dict[str, list[int]]:
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompts = {"a": (256, 5, 6, 7, 8, 9, 10, 11, 12), "b": (256, 40, 41), "c": (256, 90)}
    for rid, prompt in prompts.items():
        engine.add_request(Request(rid, prompt, params, routing_scope="sequence"))
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    while engine.has_unfinished():
        for ev in engine.step():
            out[ev.request_id].append(ev.token_id)
    return out


@pytest.mark.parametrize("policy", ["capped", "ec", "token_choice"])
def test_triton_path_generates_the_torch_paths_tokens(make_model, policy):
    model = make_model(num_layers=2, moe_layers=[1], routing={"policy": policy})
    torch_engine = Engine(model, EngineConfig(device=DEV, kernels="torch", record_steps=True))
    triton_engine = Engine(model, EngineConfig(device=DEV, kernels="triton", record_steps=True))
    assert triton_engine.runner.kernels == "triton"
    assert run(triton_engine) == run(torch_engine)
    for a, b in zip(torch_engine.records, triton_engine.records, strict=True):
        for rid in a.logits:
            torch.testing.assert_close(b.logits[rid], a.logits[rid], atol=1e-4, rtol=1e-4)


def test_kernel_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_kernels("auto", cpu) == "torch"
    assert resolve_kernels("auto", cuda) == "triton"
    assert resolve_kernels("torch", cuda) == "torch"
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert resolve_kernels("triton", cpu) == "triton"


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="kernels=triton needs a CUDA device"):
        resolve_kernels("triton", torch.device("cpu"))
    with pytest.raises(ConfigError, match="kernels"):
        EngineConfig(kernels="cuda")
