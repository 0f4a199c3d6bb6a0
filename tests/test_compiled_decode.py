"""The compiled decode step (ecserve/engine/compiled_decode.py) against the eager one: the same
greedy tokens, logprobs within 1e-4 and the same routing statistics, on the default model
(threshold routing), the tiny Mixtral (token choice, imported from Hugging Face) and a made
token-choice model; the cached engine through it equals a recompute; a newcomer's `ecserve
serve` compiles; and the steps it declines run eagerly."""

from __future__ import annotations

import dataclasses
import subprocess

import ecserve_kernels.cpu
import pytest
import torch
from serving import health, serve_process, wait_for
from test_engine_vs_recompute import ARRIVALS, ENGINE, check_against_recompute, run_staggered
from torch._dynamo.utils import counters

from ecserve.client import Client
from ecserve.config import EngineConfig
from ecserve.engine.compiled_decode import KILL_SWITCH, compile_blocker
from ecserve.engine.decode_graphs import is_decode
from ecserve.engine.engine import Engine
from ecserve.engine.llm import LLM
from ecserve.parallel.group import free_port
from ecserve.types import SamplingParams, TokenEvent

pytestmark = pytest.mark.skipif(not ecserve_kernels.cpu.available(),
                                reason=f"CPU ops: {ecserve_kernels.cpu.load()}")
# The tiny Mixtral of bench/bench_vs_llama_cpp.py (its weights, random): width 512, 4 layers,
# 8 experts of width 1,024, top-2.
TINY_MIXTRAL = dict(vocab_size=1024, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=512)


@pytest.fixture(autouse=True)
def compiled_decode_on(monkeypatch):
    monkeypatch.setenv(KILL_SWITCH, "1")  # tests/conftest.py turns it off for every other test


def run(llm: LLM, prompts: list[list[int]], new_tokens: list[int]
        ) -> tuple[list[list[int]], list[list[float]], list]:
    logprobs: dict[str, list[float]] = {}

    def on_token(ev: TokenEvent) -> None:
        if ev.logprob is not None:
            logprobs.setdefault(ev.request_id, []).append(ev.logprob)

    params = [SamplingParams(max_new_tokens=n, temperature=0.0, logprobs=0, ignore_eos=True)
              for n in new_tokens]
    outs = llm.generate(prompts, params, on_token=on_token)
    return ([o.token_ids for o in outs], [logprobs[o.request_id] for o in outs],
            [r.stats.moe for r in llm.engine.records])


def compare(model: str | None, prompts: list[list[int]], longest: int) -> None:
    """Sequence i generates longest - i tokens: as they finish, every batch size from
    len(prompts) down to 1 decodes."""
    n = len(prompts)
    new_tokens = [longest - i for i in range(n)]
    # No expert timing: a timed step runs eagerly, and here every pure-decode step must compile.
    cfg = EngineConfig(device="cpu", max_num_seqs=n, record_steps=True, expert_timing_every=0)
    eager = LLM(model, dataclasses.replace(cfg, decode="eager"))
    compiled = LLM(model, cfg)  # the default
    assert eager.engine.runner.compiled is None and compiled.engine.runner.compiled is not None
    want_tokens, want_lp, want_stats = run(eager, prompts, new_tokens)
    compiles = counters["stats"]["unique_graphs"]
    got_tokens, got_lp, got_stats = run(compiled, prompts, new_tokens)
    # Every pure-decode step ran compiled (those carrying a prefill chunk run eagerly).
    decode_steps = sum(is_decode(r.stats.plan) for r in compiled.engine.records)
    assert compiled.engine.runner.compiled.steps == decode_steps >= longest - 16
    assert counters["stats"]["unique_graphs"] == compiles, "steps recompiled start-up's graphs"
    assert got_tokens == want_tokens
    for a, b in zip(got_lp, want_lp, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
    assert len(got_stats) == len(want_stats)
    for step_a, step_b in zip(got_stats, want_stats, strict=True):
        for a, b in zip(step_a, step_b, strict=True):
            assert (a.layer, a.group_sizes, a.capacity_slots) == (
                b.layer, b.group_sizes, b.capacity_slots)
            assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
            assert torch.equal(a.experts_per_token, b.experts_per_token)
            torch.testing.assert_close(a.gate_sum, b.gate_sum, rtol=1e-5, atol=1e-6)


def prompts_of(n: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(n)
    return [torch.randint(0, vocab - 2, (4 + i % 29,), generator=gen).tolist() for i in range(n)]


def test_compiled_decode_equals_eager_on_the_default_model():
    compare(None, prompts_of(64, 256), longest=128)


def test_compiled_decode_equals_eager_on_the_tiny_mixtral(tmp_path):
    hf_models = pytest.importorskip("hf_models")
    _, model_dir = hf_models.build("mixtral", tmp_path / "mixtral", **TINY_MIXTRAL)
    compare(str(model_dir), prompts_of(64, 1024), longest=128)


def test_compiled_decode_equals_eager_under_token_choice(make_model):
    model = make_model(routing={"policy": "token_choice", "top_k": 2})
    compare(str(model), [list(range(3 + i, 12 + 2 * i)) for i in range(8)], longest=36)


@pytest.mark.parametrize("policy", ["threshold", "token_choice"])
def test_cached_engine_through_the_compiled_step_equals_recompute(make_model, policy):
    engine = Engine(make_model(routing={"policy": policy}), ENGINE)
    assert engine.runner.compiled is not None
    tokens = run_staggered(engine)
    assert engine.runner.compiled.steps > 0
    assert check_against_recompute(engine, tokens) == sum(a[2] for a in ARRIVALS)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_group_mixing_policies_and_other_encodings_stay_eager(make_model):
    ec = LLM(make_model(routing={"policy": "ec"}), EngineConfig(device="cpu", decode="compiled"))
    assert ec.engine.runner.compiled is None
    assert "mixes sequences" in (compile_blocker(ec.engine.runner.model) or "")


def test_compiled_decode_compiles_in_bf16(make_model):
    """bf16 attention takes its own path (ecserve.model.attention.sdpa); the step must still
    compile for every table width, not fall back to eager."""
    model = str(make_model(routing={"policy": "token_choice", "top_k": 2}))
    cfg = EngineConfig(device="cpu", dtype="bfloat16", max_num_seqs=4)
    compiled = LLM(model, dataclasses.replace(cfg, decode="compiled"))
    assert compiled.engine.runner.compiled is not None
    prompts = [list(range(3 + i, 12 + 2 * i)) for i in range(4)]
    params = SamplingParams(max_new_tokens=2, temperature=0.0)
    got = [o.token_ids for o in compiled.generate(prompts, params)]
    assert compiled.engine.runner.compiled.steps >= 1
    eager = LLM(model, dataclasses.replace(cfg, decode="eager"))
    assert got == [o.token_ids for o in eager.generate(prompts, params)]


def test_without_a_compiler_or_with_the_switch_off_decode_runs_eagerly_saying_why(
        make_model, monkeypatch, caplog):
    model = str(make_model(routing={"policy": "token_choice", "top_k": 2}))
    cfg = EngineConfig(device="cpu", max_num_seqs=2)
    caplog.set_level("INFO", logger="ecserve.engine.engine")
    # torch's config object, patched its own way (monkeypatch's undo would delete the key)
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        llm = LLM(model, cfg)
    assert llm.engine.runner.compiled is None
    lines = [r.getMessage() for r in caplog.records if "run eagerly" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("decode steps run eagerly: no C++ compiler")
    params = SamplingParams(max_new_tokens=3, temperature=0.0)
    assert len(llm.generate([[5, 6, 7]], params)[0].token_ids) == 3
    monkeypatch.setenv(KILL_SWITCH, "0")
    caplog.clear()
    assert LLM(model, cfg).engine.runner.compiled is None
    assert [r.getMessage() for r in caplog.records if "run eagerly" in r.getMessage()] == [
        f"decode steps run eagerly: turned off by {KILL_SWITCH}=0"]


def test_a_newcomers_serve_compiles_the_decode_step_and_serves(tmp_path, monkeypatch):
    """`ecserve serve` with no flags: the default model through the compiled step, in the
    engine core's own process."""
    monkeypatch.delenv(KILL_SWITCH)
    port, log_path = free_port(), tmp_path / "serve.log"
    proc = serve_process(log_path, "--port", str(port), "--metrics-port", "0")
    address = f"127.0.0.1:{port}"
    try:
        # A cold compile takes tens of seconds on a 2-core machine.
        wait_for(lambda: health(address) == "SERVING" or proc.poll() is not None, 300,
                 "SERVING")
        log = log_path.read_text()
        assert proc.poll() is None, log
        assert "compiled the decode step (1 .. 64 sequences)" in log, log
        assert "run eagerly" not in log, log
        with Client(address, timeout=60) as c:
            reply = c.generate("def main():", max_new_tokens=16, ignore_eos=True)
            assert reply.generated_token_count == 16
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
