"""What a checkpoint directory holds: its file names, the tensors an architecture needs, its
safetensors files opened and listed, and the error that names what is wrong with them.

The one place both loaders (ecserve's own, ecserve.model.weights, and the Hugging Face
translation, ecserve.model.hf) read files from: neither imports the other's internals.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ecserve.config import ConfigError, ModelConfig
from ecserve.model.transformer import Transformer
from ecserve.readable import check_readable

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ConfigError):
    """A checkpoint's files do not match what its config describes; the message says how."""


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the architecture needs, with its shape."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def tensor_problem(label: str, t: torch.Tensor, shape: tuple[int, ...] | None) -> str | None:
    """What is wrong with a loaded tensor, or None (shape None: checked before reading)."""
    if shape is not None and tuple(t.shape) != shape:
        return f"{label}: shape {list(t.shape)}, expected {list(shape)}"
    if not t.is_floating_point():
        return f"{label}: dtype {t.dtype}, expected a floating-point tensor"
    return None


def open_safetensors(path: Path):
    """safe_open, with a corrupt or truncated file reported as a CheckpointError naming it."""
    check_readable(path)
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def tensor_files(model_dir: Path) -> dict[str, Path]:
    """Map each stored tensor name to the file holding it."""
    single, index = model_dir / WEIGHTS_FILE, model_dir / INDEX_FILE
    if index.is_file():
        check_readable(index)
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e})") from e
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        absent = sorted({str(p) for p in files.values() if not p.is_file()})
        if absent:
            raise CheckpointError(f"{index} names missing shard file(s): {', '.join(absent)}")
        return files
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    raise CheckpointError(
        f"{model_dir}: no weights: expected {WEIGHTS_FILE} or {INDEX_FILE} with shards "
        "(safetensors only; pickle formats are not loaded)"
    )
