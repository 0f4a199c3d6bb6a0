"""Checkpoint directories: config.json + safetensors (one file, or shards with an index).

Loading checks the tensors against the architecture the config describes and names every
missing, unexpected or misshapen tensor. Only safetensors are read: no pickle formats.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from ecserve.config import ConfigError, ModelConfig
from ecserve.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    expected_tensors,
    open_safetensors,
    tensor_files,
    tensor_problem,
)
from ecserve.model.kernels import Kernels
from ecserve.model.transformer import Transformer
from ecserve.readable import check_readable
from ecserve.routing import policy_for

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # MoELayer's stacked expert tensors [E, ...]

# The expert-parallel seam: MoE layer index -> the experts (ascending) this process keeps. The
# layers' stacked expert tensors are then read and built as [E_own, ...]; every other tensor in
# full. None: all experts (the ordinary single-process load).
ExpertFilter = Mapping[int, Sequence[int]]


def expert_rows(cfg: ModelConfig, experts: ExpertFilter | None) -> dict[str, list[int]]:
    """Tensor name -> the dim-0 rows (experts) to keep, for the filtered expert tensors."""
    if experts is None:
        return {}
    moe = set(cfg.moe_layers or ())
    extra = sorted(set(experts) - moe)
    if extra:
        raise CheckpointError(f"expert filter names layer(s) {extra}, which are not MoE layers "
                              f"(the model's are {sorted(moe)})")
    rows: dict[str, list[int]] = {}
    for layer, keep in experts.items():
        keep = list(keep)
        if keep != sorted(set(keep)) or any(not 0 <= e < cfg.num_experts for e in keep):
            raise CheckpointError(f"expert filter for layer {layer}: {keep} is not an ascending "
                                  f"list of distinct experts in [0, {cfg.num_experts})")
        for w in EXPERT_WEIGHTS:
            rows[f"layers.{layer}.moe.{w}"] = keep
    return rows


def read_config(model_dir: str | os.PathLike) -> ModelConfig:
    path = Path(model_dir) / CONFIG_FILE
    if Path(model_dir).exists() and not Path(model_dir).is_dir():
        raise CheckpointError(f"{model_dir}: not a directory (a model directory holds "
                              f"{CONFIG_FILE} and the weights)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a model directory needs {CONFIG_FILE})")
    check_readable(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    try:
        if isinstance(data, dict) and data.get("model_type", "ecserve") != "ecserve":
            # A Hugging Face checkpoint's own config.json (or an unsupported model type).
            from ecserve.model.hf.config import config_from_hf

            return config_from_hf(data, path.parent)
        return ModelConfig.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}", field=e.field) from e


def threshold_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The `threshold` policy's calibrated theta_e (float32 [E] per MoE layer): optional, but all
    or none, and required by that policy."""
    return {f"layers.{i}.moe.threshold": (cfg.num_experts,) for i in cfg.moe_layers or ()}


def threshold_problems(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> list[str]:
    """What is wrong with the thresholds `state` holds for this config (none is fine unless the
    policy is threshold)."""
    names = threshold_tensors(cfg)
    present = sorted(n for n in names if n in state)
    if not present:
        if not policy_for(cfg.routing.policy).layer_tensors:
            return []
        return [f"routing.policy {cfg.routing.policy!r} needs the calibrated per-expert thresholds "
                f"{', '.join(names)} (written by `ecserve train`), which this checkpoint has not"]
    if len(present) != len(names):
        return [f"thresholds for some MoE layers only: has {', '.join(present)}, needs "
                f"{', '.join(names)}"]
    problems = []
    for name in present:
        t = state[name]
        if tuple(t.shape) != names[name] or t.dtype != torch.float32:
            problems.append(f"{name}: {t.dtype} {list(t.shape)}, expected float32 "
                            f"{list(names[name])}")
        elif not bool(((t >= 0) & (t <= 1)).all()):  # also refuses NaN
            problems.append(f"{name}: thresholds must be router probabilities in [0, 1], got "
                            f"{t.tolist()}")
    return problems


def _read_rows(f, name: str, rows: list[int]) -> torch.Tensor:
    """Only `rows` of a stored tensor's dim 0, read as slices of contiguous runs."""
    sl = f.get_slice(name)
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append(sl[rows[start]: rows[i - 1] + 1])
            start = i
    if not runs:  # this process holds none of the layer's experts
        return sl[0:0]
    return torch.cat(runs) if len(runs) > 1 else runs[0]


def load_state_dict(model_dir: str | os.PathLike, cfg: ModelConfig,
                    experts: ExpertFilter | None = None) -> dict[str, torch.Tensor]:
    """Read and check every tensor; errors list all problems at once.

    experts: keep only these experts of each listed MoE layer (their tensors come back as
    [E_own, ...], read from safetensors as slices, so the other experts are never read)."""
    model_dir = Path(model_dir)
    rows = expert_rows(cfg, experts)
    if cfg.model_type != "ecserve":  # a Hugging Face checkpoint: its names, mapped to ours
        from ecserve.model.hf.tensors import load_hf_state_dict

        # Hugging Face layouts store experts per tensor or fused: read whole, then keep the
        # rows (the memory saving of the filter applies to ecserve checkpoints only for now).
        state = load_hf_state_dict(model_dir, cfg)
        for name, keep in rows.items():
            state[name] = state[name][keep].clone()
        return state
    files = tensor_files(model_dir)
    expected = expected_tensors(cfg)
    optional = threshold_tensors(cfg)
    problems = []
    missing = sorted(set(expected) - set(files))
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing)}")
    unexpected = sorted(set(files) - set(expected) - set(optional))
    if unexpected:
        problems.append(f"unexpected tensor(s): {', '.join(unexpected)}")
    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in (expected.keys() | optional.keys()) & files.keys():
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with open_safetensors(path) as f:
            stored = set(f.keys())
            for name in sorted(names):
                if name not in stored:
                    problems.append(f"{name}: listed in the index but absent from {path.name}")
                    continue
                if name in rows:
                    stored_shape = tuple(f.get_slice(name).get_shape())
                    if stored_shape != expected[name]:
                        problems.append(f"{name}: shape {list(stored_shape)}, expected "
                                        f"{list(expected[name])}")
                        continue
                    t = _read_rows(f, name, rows[name])
                else:
                    t = f.get_tensor(name)
                if name in optional:
                    state[name] = t  # checked with the others below
                    continue
                problem = tensor_problem(name, t, None if name in rows else expected[name])
                if problem is not None:
                    problems.append(problem)
                state[name] = t
    problems += threshold_problems(cfg, state)
    if problems:
        raise CheckpointError(f"{model_dir}: " + "; ".join(problems))
    return state


def load_model(
    model_dir: str | os.PathLike,
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    experts: ExpertFilter | None = None,
    kernels: Kernels | None = None,
) -> Transformer:
    """Build the model from a checked checkpoint, in `dtype` (default: the config's), running
    `kernels` (default: plain torch, see Transformer).

    experts (expert parallelism): each listed MoE layer holds only those experts, its
    w_gate/w_up/w_down [E_own, ...] in the listed order; the rest of the model is whole."""
    dtype = dtype or TORCH_DTYPES[cfg.dtype]
    state = load_state_dict(model_dir, cfg, experts)
    with torch.device("meta"):
        model = Transformer(cfg, kernels)
    for name in expert_rows(cfg, experts):  # shrink the meta parameters to the kept rows
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        shape = tuple(state[name].shape)
        with torch.device("meta"):
            setattr(module, attr, torch.nn.Parameter(torch.empty(shape), requires_grad=False))
    thresholds = {k: state.pop(k) for k in threshold_tensors(cfg) if k in state}
    if cfg.model_type != "ecserve":  # no thresholds in a Hugging Face checkpoint
        problems = threshold_problems(cfg, thresholds)
        if problems:
            raise CheckpointError(f"{model_dir}: " + "; ".join(problems))
    state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    for name, t in thresholds.items():  # routing data, not weights: float32 whatever the dtype
        model.get_submodule(name.rpartition(".")[0]).threshold = t.to(device)
    return model.eval().requires_grad_(False)


def save_model(
    model_dir: str | os.PathLike, cfg: ModelConfig, state: dict[str, torch.Tensor],
    storage_dtype: str | None = None,
) -> None:
    """Write config.json and model.safetensors (the whole model in one file), the weights in
    storage_dtype (default: the config's; loading converts to the run's dtype) and the
    thresholds, if any, in float32."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    dtype, routing = TORCH_DTYPES[storage_dtype or cfg.dtype], threshold_tensors(cfg)
    tensors = {k: v.detach().to(torch.float32 if k in routing else dtype).contiguous()
               for k, v in state.items()}
    save_file(tensors, model_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    # safetensors writes 0600; give the weights config.json's mode (the umask's), so a server
    # running as another user (a container's) can read what this user wrote.
    (model_dir / WEIGHTS_FILE).chmod((model_dir / CONFIG_FILE).stat().st_mode & 0o777)
