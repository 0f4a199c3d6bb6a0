"""The model runner: owns the device, the weights and the KV tensors; runs a step plan."""

from __future__ import annotations

import os

import torch

from ecserve.config import ConfigError
from ecserve.model.attention import LayerKV
from ecserve.model.batch import ForwardBatch
from ecserve.model.transformer import Transformer
from ecserve.types import MoEStats, StepPlan


def kv_bytes_per_block(model: Transformer, block_size: int) -> int:
    cfg = model.cfg
    assert cfg.num_kv_heads is not None and cfg.head_dim is not None
    elem = model.embed.element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


def free_memory_bytes(device: torch.device) -> int:
    """Memory still free on `device`: CUDA's allocator view, or the OS's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def resolve_kernels(choice: str, device: torch.device) -> str:
    """EngineConfig.kernels -> torch | triton for this device."""
    import ecserve_kernels

    if choice == "auto":
        return "triton" if device.type == "cuda" and ecserve_kernels.HAS_TRITON else "torch"
    if choice == "triton":
        if not ecserve_kernels.HAS_TRITON:
            raise ConfigError("kernels=triton: triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"kernels=triton needs a CUDA device, got {device} (on a CPU "
                              "only Triton's interpreter runs them: TRITON_INTERPRET=1, slow)")
    return choice


class ModelRunner:
    def __init__(self, model: Transformer, num_blocks: int, block_size: int,
                 kernels: str = "torch") -> None:
        cfg = model.cfg
        assert cfg.num_kv_heads is not None and cfg.head_dim is not None
        self.model = model
        self.kernels = kernels
        model.set_kernels(kernels)
        self.block_size = block_size
        self.device = model.embed.device
        shape = (num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        # Zeroed, not empty: attention gathers padded slots, and garbage could hold NaNs.
        self.kv = [
            LayerKV(torch.zeros(shape, dtype=model.embed.dtype, device=self.device),
                    torch.zeros(shape, dtype=model.embed.dtype, device=self.device))
            for _ in range(cfg.num_layers)
        ]

    @torch.inference_mode()
    def execute(
        self, plan: StepPlan, time_experts: bool = False
    ) -> tuple[torch.Tensor, list[MoEStats]]:
        """Run the plan; returns float32 logits [M, V] for its sampling chunks, in plan order.

        With `time_experts`, each MoE layer also times every expert's work alone (metrics)."""
        batch = ForwardBatch.from_plan(plan, self.model.cfg, self.block_size, self.device,
                                       time_experts)
        logits, stats = self.model(batch, self.kv)
        return logits.cpu(), stats
