"""Which implementation each operator of a model runs, fixed when the model is built (the
engine picks them for its device: ecserve.engine.runner.model_kernels)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ecserve.model.experts import BatchedExperts, ExpertBackend

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True)
class Kernels:
    # torch: SDPA over a padded key layout; triton: the paged kernels (KV write, decode).
    attention: Literal["torch", "triton"] = "torch"
    experts: ExpertBackend = field(default_factory=BatchedExperts)
    # The dense projections (attention, dense and shared FFNs, output head).
    linear: Linear = F.linear
