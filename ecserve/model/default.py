"""The default model, and a seeded random model for tests.

With no `--model`, ecserve serves ecserve-code: a small expert-choice model of Python code,
trained by `ecserve train` and shipped inside the package (ecserve/default_model/; its model
card is the README.md there). `ecserve init-model DIR` copies it; `--random` writes instead a
model of random weights made from a fixed seed (byte tokenizer, 4 layers): the same bytes on
every machine, for tests that need a model but not a trained one.
"""

from __future__ import annotations

import math
import os
import shutil
import stat
from pathlib import Path

import torch

from ecserve.config import ModelConfig, RoutingConfig
from ecserve.model.checkpoint import CONFIG_FILE, expected_tensors
from ecserve.model.weights import save_model

PACKAGED = Path(__file__).resolve().parent.parent / "default_model"
RANDOM_SEED = 2022
RANDOM_CONFIG = ModelConfig(
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


def write_model(model_dir: str | os.PathLike, cfg: ModelConfig = RANDOM_CONFIG,
                seed: int = RANDOM_SEED) -> Path:
    """`ecserve init-model --random DIR`: write a complete model directory of random weights."""
    save_model(model_dir, cfg, init_weights(cfg, seed))
    return Path(model_dir)


def default_model_dir() -> Path:
    """The shipped trained model's directory (inside the installed package; read only)."""
    if not (PACKAGED / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{PACKAGED}: the default model is missing from this install; "
                                "reinstall ecserve, or give a model directory (--model)")
    return PACKAGED


def copy_default_model(model_dir: str | os.PathLike) -> Path:
    """`ecserve init-model DIR`: a copy of the shipped model, readable by every user."""
    target = Path(model_dir)
    shutil.copytree(default_model_dir(), target, ignore=shutil.ignore_patterns("__pycache__"))
    for f in target.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    return target
