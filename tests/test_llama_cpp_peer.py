"""The llama.cpp peer of bench/bench_vs_llama_cpp.py agrees with ecserve token for token.

Needs the `peer` extra (llama-cpp-python builds from source, so CI leaves it out and this test
is skipped there); it guards the GGUF mapping (expert stacking, the q/k rope permutation)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_vs_llama_cpp import LlamaCpp
from gguf_mixtral import write_gguf
from hf_models import build

from ecserve.config import EngineConfig
from ecserve.engine.llm import LLM
from ecserve.types import SamplingParams


@pytest.mark.parametrize("seqs", [1, 3])
def test_greedy_tokens_match_llama_cpp_on_the_same_weights(tmp_path: Path, seqs: int) -> None:
    model_dir = tmp_path / "mixtral"
    build("mixtral", model_dir)
    gguf = write_gguf(model_dir, tmp_path / "mixtral.gguf", "F32")
    prompts = [[(7 * s + 3 * j) % 256 for j in range(5 + s)] for s in range(seqs)]
    peer = LlamaCpp(gguf, seqs, 64, threads=1, kv_f32=True, flash=False)
    try:
        theirs = peer.generate(prompts, 12)
    finally:
        peer.close()
    llm = LLM(model_dir, EngineConfig(device="cpu", max_num_seqs=seqs, max_model_len=64,
                                      max_num_batched_tokens=64, expert_timing_every=0))
    ours = [o.token_ids for o in llm.generate(prompts, SamplingParams(max_new_tokens=12,
                                                                        ignore_eos=True))]
    assert ours == theirs
