"""The embedded default model: a small expert-choice model made from a fixed seed.

Its weights are random (the text is noise until a trained default ships), but deterministic:
the same seed gives the same bytes on every machine, so outputs are reproducible.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ecserve.config import ModelConfig, RoutingConfig
from ecserve.model.weights import CONFIG_FILE, expected_tensors, save_model

DEFAULT_SEED = 2022
DEFAULT_CONFIG = ModelConfig(
    vocab_size=258,  # the built-in byte tokenizer: 256 bytes, <bos>, <eos>
    hidden_size=256,
    num_layers=4,
    num_heads=8,
    num_kv_heads=2,
    ffn_hidden_size=512,
    num_experts=8,
    expert_ffn_hidden_size=512,
    routing=RoutingConfig(policy="capped", capacity_factor=2.0, group_size=64, scope="batch"),
    max_position_embeddings=2048,
    tokenizer="byte",
    bos_token_id=256,
    eos_token_id=257,
)


def init_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights: names in sorted order, one CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    d = cfg.hidden_size
    state = {}
    for name, shape in sorted(expected_tensors(cfg).items()):
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight"):
            t = torch.ones(shape)
        else:
            # Router logits ~ N(0, 1) so experts have real preferences; embeddings large
            # enough that the tied head gives a peaked next-token distribution; a visible
            # position bias; output projections scaled down with depth, as in GPT-2.
            std = {"router": d**-0.5, "router_bias": 0.1, "rel_bias": 0.5, "embed": 0.1,
                   "lm_head": 0.1}.get(leaf, 0.02)
            if leaf in ("wo", "w_down"):
                std /= math.sqrt(2 * cfg.num_layers)
            t = torch.empty(shape).normal_(0.0, std, generator=gen)
        state[name] = t
    return state


def write_model(model_dir: str | os.PathLike, cfg: ModelConfig = DEFAULT_CONFIG,
                seed: int = DEFAULT_SEED) -> Path:
    """`ecserve init-model DIR`: write a complete model directory."""
    save_model(model_dir, cfg, init_weights(cfg, seed))
    return Path(model_dir)


def cache_root() -> Path:
    if env := os.environ.get("ECSERVE_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ecserve"


def default_model_dir() -> Path:
    """The default model in the user's cache, written on first use (atomically)."""
    key = json.dumps([DEFAULT_CONFIG.to_dict(), DEFAULT_SEED], sort_keys=True)
    target = cache_root() / "models" / f"default-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / CONFIG_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".default-", dir=target.parent))
    try:
        write_model(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / CONFIG_FILE).is_file():  # not a concurrent writer winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
