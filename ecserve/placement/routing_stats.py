"""Routing statistics for placement: which experts each token of each step went to, per layer.

A step's routing in one MoE layer is a bool matrix A [N, E] (token t chose expert e). From it:
co-selection C = A^T A (C[i, j]: tokens chosen by both i and j; the diagonal is tokens per
expert), and the exact cross-device traffic of any placement (ecserve/placement/traffic.py),
which needs each token's whole expert set, not only the pairs.

They come from explicit assignments (RoutingStats.from_assignments, for constructed workloads) or
from a real engine run (collect_routing_stats): a forward pre-hook on every MoELayer recomputes
the layer's routing from its input with MoELayer.route, the method MoELayer.forward uses, without
touching the model. The recomputation is checked against the engine's own MoEStats per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ecserve.config import EngineConfig


@dataclass
class RoutingStats:
    num_experts: int
    # MoE layer -> one bool [N_step, E] per recorded step, tokens in the order the model saw them.
    layers: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    source: str = ""  # what was run, for reports

    @classmethod
    def from_assignments(
        cls, num_experts: int, layers: Mapping[int, Sequence[Sequence[Iterable[int]]]]
    ) -> RoutingStats:
        """layers[layer][step][token] = the experts that token went to."""
        out = cls(num_experts, source="explicit assignments")
        for layer, steps in layers.items():
            mats = []
            for step in steps:
                a = torch.zeros(len(step), num_experts, dtype=torch.bool)
                for t, experts in enumerate(step):
                    for e in experts:
                        if not 0 <= e < num_experts:
                            raise ValueError(f"layer {layer}: expert {e} outside "
                                             f"[0, {num_experts})")
                        a[t, e] = True
                mats.append(a)
            out.layers[int(layer)] = mats
        return out

    def num_steps(self, layer: int) -> int:
        return len(self.layers[layer])

    def num_tokens(self, layer: int) -> int:
        return sum(a.shape[0] for a in self.layers[layer])

    def coselection(self, layer: int) -> torch.Tensor:
        """int64 [E, E]: C[i, j] = tokens (over all steps) chosen by both i and j; C[i, i] =
        tokens chosen by i. Symmetric."""
        c = torch.zeros(self.num_experts, self.num_experts, dtype=torch.int64)
        for a in self.layers[layer]:
            a64 = a.to(torch.int64)
            c += a64.T @ a64
        return c

    def tokens_per_expert(self, layer: int) -> torch.Tensor:
        """int64 [E]: tokens each expert took, summed over steps."""
        return torch.stack([a.sum(0) for a in self.layers[layer]]).sum(0) \
            if self.layers[layer] else torch.zeros(self.num_experts, dtype=torch.int64)


def synthetic_prompts(num: int, vocab: int, exclude: Iterable[int | None] = (),
                      seed: int = 0, min_len: int = 16, max_len: int = 64) -> list[list[int]]:
    """`num` prompts of random token ids (seeded), lengths in [min_len, max_len]."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor(sorted(set(range(vocab)) - set(exclude)))
    out = []
    for _ in range(num):
        n = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        out.append(allowed[torch.randint(len(allowed), (n,), generator=gen)].tolist())
    return out


def step_assignment(layer: torch.nn.Module, x: torch.Tensor,
                    group_bounds: Sequence[int]) -> torch.Tensor:
    """bool [N, E]: the routing MoELayer.forward computes for input x, recomputed."""
    idx, _ = layer.route(x, group_bounds)  # [E, K] step-wide, -1 empty
    idx = idx.cpu()
    a = torch.zeros(x.shape[0], idx.shape[0], dtype=torch.bool)
    e, slot = (idx >= 0).nonzero(as_tuple=True)
    a[idx[e, slot], e] = True
    return a


def collect_routing_stats(
    model_dir: str | Path | None = None,
    prompts: Sequence[str | Sequence[int]] | None = None,
    engine_cfg: EngineConfig | None = None,
    *,
    synthetic_requests: int = 8,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> RoutingStats:
    """Run an engine (default: on CPU) on `prompts` (text or token ids; None:
    `synthetic_requests` random ones) to completion and record every step's routing."""
    from ecserve.engine.engine import Engine

    cfg = dataclasses.replace(engine_cfg or EngineConfig(device="cpu"), record_steps=True)
    engine = Engine(model_dir, cfg)
    mc = engine.model_cfg
    source = f"{len(prompts)} prompts" if prompts is not None else \
        f"{synthetic_requests} synthetic requests (seed {seed})"
    if prompts is None:
        prompts = synthetic_prompts(synthetic_requests, engine.tokenizer.vocab_size,
                                    (mc.bos_token_id, mc.eos_token_id), seed)
    stats = record_routing(engine, prompts, max_new_tokens)
    stats.source = f"{source}, {len(engine.records)} steps"
    return stats


def record_routing(engine, prompts: Sequence[str | Sequence[int]],
                   max_new_tokens: int = 16) -> RoutingStats:
    """Run `prompts` through `engine` (an idle Engine with record_steps=True), greedy with EOS
    ignored, to completion; every MoE layer's routing of every step, checked against the
    engine's MoEStats of the same steps."""
    from ecserve.model.moe import MoELayer
    from ecserve.types import Request, SamplingParams

    if not engine.cfg.record_steps or engine.has_unfinished():
        raise ValueError("record_routing needs an idle engine made with record_steps=True")
    if not prompts:
        raise ValueError("no prompts to collect routing statistics from")
    mc = engine.model_cfg
    stats = RoutingStats(mc.num_experts, {layer: [] for layer in mc.moe_layers or ()})
    layers = [m for m in engine.runner.model.modules() if isinstance(m, MoELayer)]

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        bounds = args[1] if len(args) > 1 else kwargs["group_bounds"]
        with torch.no_grad():
            stats.layers[module.layer].append(step_assignment(module, x, bounds))

    first = len(engine.records)
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        for i, p in enumerate(prompts):
            ids = engine.encode(p) if isinstance(p, str) else list(p)
            engine.add_request(Request(f"placement-{first}-{i}", tuple(ids), params))
        while engine.has_unfinished():
            engine.step()
    finally:
        for h in handles:
            h.remove()
    _check_against_engine(stats, engine.records[first:])
    return stats


def _check_against_engine(stats: RoutingStats, records: Sequence) -> None:
    """The recomputed routing must fill exactly the slots the layers reported (MoEStats)."""
    for layer, mats in stats.layers.items():
        if len(mats) != len(records):
            raise RuntimeError(f"layer {layer}: routing recorded for {len(mats)} steps, the "
                               f"engine ran {len(records)}")
        for step, (a, rec) in enumerate(zip(mats, records, strict=True)):
            (moe,) = [m for m in rec.stats.moe if m.layer == layer]
            if not torch.equal(a.sum(0), moe.tokens_per_expert.cpu()):
                raise RuntimeError(f"layer {layer}, step {step}: recomputed routing "
                                   f"{a.sum(0).tolist()} differs from the layer's "
                                   f"{moe.tokens_per_expert.tolist()} tokens per expert")
