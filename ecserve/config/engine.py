"""How the engine runs a model: device, KV cache budget, per-step limits, kernels."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from ecserve.config.fields import check_choices, check_positive, flag
from ecserve.config.model import Dtype, Policy
from ecserve.errors import ConfigError


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: device, KV cache budget and per-step limits."""

    device: str = "auto"
    """auto (cuda when available, else cpu) | cpu | cuda | cuda:N."""
    dtype: Dtype | None = None
    """Run in this dtype instead of the checkpoint's (e.g. float32 on a CPU)."""
    block_size: int = 16
    """Tokens per KV cache block."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    max_num_batched_tokens: int = 512
    """Most tokens (decode tokens and prefill chunks) in one step; at least max_num_seqs and
    the model's routing.group_size."""
    max_model_len: int | None = None
    """Longest prompt + output; default: the model's max_position_embeddings."""
    kv_cache_bytes: int | None = field(default=None, metadata=flag(metavar="BYTES"))
    """KV cache size in bytes; default: kv_cache_memory_fraction of the device's free memory
    after the weights. Never more than max_num_seqs full-length sequences need."""
    kv_cache_memory_fraction: float = 0.5
    """The KV cache's share of free device memory when kv_cache_bytes is not given."""
    kv_blocks_on_demand: bool = True
    """Give a request KV blocks as it grows, preempting the youngest and replaying it later when
    none are left, where its routing can be formed again (docs/kv-cache.md); off, or for
    batch-scope ec/capped: reserve its prompt + max_new_tokens at admission."""
    prefix_caching: bool = True
    """Keep full KV blocks after their request ends, keyed by their tokens, and start a new
    request after the longest cached run of its prompt; only where routing can be formed again
    (per-token policies, or sequence scope: docs/kv-cache.md); elsewhere bypassed."""
    max_waiting: int = 1024
    """Most requests queued for admission; more are refused (RESOURCE_EXHAUSTED)."""
    max_waiting_tokens: int = 262144
    """Most prompt tokens queued for admission; more are refused."""
    max_prefill_chunk: int | None = None
    """Most prompt tokens of one sequence in one step; default: what the step's budget allows.
    1 scores a prompt as decode steps would (one token per sequence per step)."""
    routing_policy: Policy | None = None
    """Serve with this routing policy instead of the model's (ec | capped | threshold |
    token_choice)."""
    max_experts_per_token: int | None = None
    """b, the most experts a token takes under capped and threshold; default: the model's."""
    record_steps: bool = False
    """Debug: keep every step's routing groups and sampled logits (Engine.records)."""
    expert_timing_every: int = 64
    """Every Nth step, time each expert's work alone for the per-expert latency metric (a
    measurement pass beside the real computation); 0: off."""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """torch (plain PyTorch) | triton (the fused expert MLP and paged decode attention of
    ecserve_kernels) | auto (triton on CUDA devices; on CPUs ecserve's C++ ops, built on first
    use, where a compiler is found, else plain torch)."""
    decode: Literal["eager", "compiled"] = "compiled"
    """compiled: on a CPU, run pure-decode steps of per-token routing policies through one
    torch.compile'd graph, compiled at start (the first compile takes tens of seconds, later
    starts reuse inductor's cache); where it cannot (no C++ compiler, a routing policy that
    mixes sequences, ECSERVE_COMPILED_DECODE=0) steps run eagerly and the log says why in one
    line. eager: operator by operator."""
    cuda_graphs: bool = True
    """On CUDA with the Triton kernels, capture pure decode steps as CUDA graphs (one per
    routing-group layout) and replay them; the default scope's layouts are captured at start."""
    cuda_graph_max_batch: int | None = None
    """Largest decode batch run by a CUDA graph; default: max_num_seqs."""
    cuda_graph_limit: int = 256
    """Most decode graphs held, one per routing-group layout."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device: {self.device!r} is not one of auto, cpu, cuda, cuda:N",
                              field="device")
        check_choices(self)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting",
                     "max_waiting_tokens", "cuda_graph_limit"):
            check_positive(name, getattr(self, name))
        for name in ("max_model_len", "cuda_graph_max_batch", "max_prefill_chunk",
                     "max_experts_per_token", "kv_cache_bytes"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))
        if not isinstance(self.expert_timing_every, int) or self.expert_timing_every < 0:
            raise ConfigError(f"expert_timing_every must be an int >= 0, got "
                              f"{self.expert_timing_every!r}", field="expert_timing_every")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ConfigError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}",
                field="kv_cache_memory_fraction")
