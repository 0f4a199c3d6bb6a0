"""Hugging Face MoE tensor names -> ecserve's, read lazily from safetensors shards.

Per-expert tensors (Mixtral `experts.E.w1/w3/w2`, the others `experts.E.gate/up/down_proj`) are
stacked into ecserve's `[E, f, d]` / `[E, d, f]` one expert at a time, so memory stays at one
copy of the weights. The fused layout of transformers 5 (`experts.gate_up_proj [E, 2f, d]`,
`experts.down_proj [E, d, f]`) is read too. Every missing, unexpected or misshapen tensor is
named, all at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch

from ecserve.config import ModelConfig
from ecserve.model.checkpoint import (
    CheckpointError,
    expected_tensors,
    open_safetensors,
    tensor_files,
    tensor_problem,
)

# Buffers some checkpoints carry that ecserve recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}  # gate, up, down
_DEFAULT_EXPERT_NAMES = ("gate_proj", "up_proj", "down_proj")


class Source(NamedTuple):
    """How one ecserve tensor is made from stored ones."""

    kind: str  # one (as is) | stack (one per expert, on a new axis 0) | gate | up (fused halves)
    names: tuple[str, ...]  # the stored tensors it reads


def _moe_prefix(cfg: ModelConfig, layer: str, stored: set[str]) -> str:
    if cfg.model_type == "mixtral" and any(n.startswith(f"{layer}block_sparse_moe.")
                                           for n in stored):
        return f"{layer}block_sparse_moe."
    return f"{layer}mlp."


def _moe_sources(cfg: ModelConfig, i: int, m: str, stored: set[str]) -> dict[str, Source]:
    out = {f"layers.{i}.moe.router": Source("one", (f"{m}gate.weight",))}
    fused = f"{m}experts.gate_up_proj"
    if fused in stored:
        out[f"layers.{i}.moe.w_gate"] = Source("gate", (fused,))
        out[f"layers.{i}.moe.w_up"] = Source("up", (fused,))
        out[f"layers.{i}.moe.w_down"] = Source("one", (f"{m}experts.down_proj",))
    else:
        names = _EXPERT_NAMES.get(cfg.model_type, _DEFAULT_EXPERT_NAMES)
        for ours, theirs in zip(("w_gate", "w_up", "w_down"), names, strict=True):
            out[f"layers.{i}.moe.{ours}"] = Source("stack", tuple(
                f"{m}experts.{e}.{theirs}.weight" for e in range(cfg.num_experts)))
    if cfg.shared_expert_ffn_hidden_size:
        for ours, theirs in zip(("w_gate", "w_up", "w_down"), _DEFAULT_EXPERT_NAMES, strict=True):
            out[f"layers.{i}.moe.shared.{ours}"] = Source(
                "one", (f"{m}shared_expert.{theirs}.weight",))
    if cfg.shared_expert_gate:
        out[f"layers.{i}.moe.shared_gate"] = Source("one", (f"{m}shared_expert_gate.weight",))
    return out


def _layer_sources(cfg: ModelConfig, i: int, stored: set[str]) -> dict[str, Source]:
    p, ours = f"model.layers.{i}.", f"layers.{i}."
    out = {
        f"{ours}attn_norm.weight": Source("one", (f"{p}input_layernorm.weight",)),
        f"{ours}ffn_norm.weight": Source("one", (f"{p}post_attention_layernorm.weight",)),
    }
    for w, proj in zip("qkvo", ("q_proj", "k_proj", "v_proj", "o_proj"), strict=True):
        out[f"{ours}attn.w{w}"] = Source("one", (f"{p}self_attn.{proj}.weight",))
        out[f"{ours}attn.b{w}"] = Source("one", (f"{p}self_attn.{proj}.bias",))
    for norm in ("q_norm", "k_norm"):
        out[f"{ours}attn.{norm}.weight"] = Source("one", (f"{p}self_attn.{norm}.weight",))
    assert cfg.moe_layers is not None
    if i in cfg.moe_layers:
        out.update(_moe_sources(cfg, i, _moe_prefix(cfg, p, stored), stored))
    else:
        for w, proj in zip(("w_gate", "w_up", "w_down"), _DEFAULT_EXPERT_NAMES, strict=True):
            out[f"{ours}ffn.{w}"] = Source("one", (f"{p}mlp.{proj}.weight",))
    return out


def hf_sources(cfg: ModelConfig, stored: Iterable[str]) -> dict[str, Source]:
    """For every tensor the ecserve model needs, where it comes from in the checkpoint."""
    stored = set(stored)
    table = {
        "embed": Source("one", ("model.embed_tokens.weight",)),
        "norm.weight": Source("one", ("model.norm.weight",)),
        "lm_head": Source("one", ("lm_head.weight",)),
    }
    for i in range(cfg.num_layers):
        table.update(_layer_sources(cfg, i, stored))
    need = expected_tensors(cfg)
    return {name: src for name, src in table.items() if name in need}


def _build(src: Source, read) -> torch.Tensor:
    if src.kind == "one":
        return read(src.names[0])
    if src.kind == "stack":
        first = read(src.names[0])
        out = torch.empty((len(src.names), *first.shape), dtype=first.dtype)  # [E, ...]
        out[0] = first
        for e, name in enumerate(src.names[1:], start=1):
            t = read(name)
            if t.shape != first.shape:
                raise CheckpointError(f"{name}: shape {list(t.shape)}, expected "
                                      f"{list(first.shape)} like {src.names[0]}")
            out[e] = t
        return out
    fused = read(src.names[0])  # [E, 2f, d]: gate rows, then up rows
    half = fused.shape[1] // 2
    return (fused[:, :half] if src.kind == "gate" else fused[:, half:]).contiguous()


def load_hf_state_dict(model_dir: str | Path, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Read a Hugging Face MoE checkpoint into ecserve's tensor names, checked."""
    model_dir = Path(model_dir)
    files = tensor_files(model_dir)
    sources = hf_sources(cfg, files)
    expected = expected_tensors(cfg)
    used = {n for src in sources.values() for n in src.names}
    missing = sorted(n for n in used if n not in files)
    ignorable = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    unexpected = sorted(n for n in files if n not in used and n not in ignorable
                        and not n.endswith(_IGNORED_SUFFIXES))
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensor(s) for {cfg.model_type} with this config.json: "
                        f"{', '.join(unexpected)}")
    if problems:
        raise CheckpointError(f"{model_dir}: " + "; ".join(problems))
    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def read(name: str) -> torch.Tensor:
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(open_safetensors(path))
            try:
                return handles[path].get_tensor(name)  # type: ignore[attr-defined]
            except Exception as e:  # a name the index lists but the shard lacks
                raise CheckpointError(f"{name}: listed in the index but unreadable from "
                                      f"{path.name} ({e})") from e

        for name, src in sources.items():
            t = _build(src, read)
            problem = tensor_problem(f"{src.names[0]} (ecserve {name})", t, expected[name])
            if problem is not None:
                problems.append(problem)
            state[name] = t
    if problems:
        raise CheckpointError(f"{model_dir}: " + "; ".join(problems))
    return state
