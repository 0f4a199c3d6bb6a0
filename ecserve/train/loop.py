"""The training loop: AdamW, warm-up and cosine decay, gradient clipping, bf16 autocast with the
router in float32, checkpoint and resume, a tqdm progress bar, periodic validation, and the
threshold policy's calibration as a moving average of each group's k-th largest score."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ecserve.config import ModelConfig
from ecserve.errors import ConfigError
from ecserve.model.transformer import Transformer
from ecserve.train.data import TrainBatches
from ecserve.train.forward import ForwardOut, forward, token_nll


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one run (the recipe's; every field is in the model card)."""

    steps: int  # optimizer steps
    batch_size: int = 64  # sequences per step (a multiple of group_size)
    seq_len: int = 256  # tokens per sequence
    group_size: int = 64  # routing group: tokens at one position of group_size sequences
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices, not on norms or biases
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm
    aux_loss_weight: float = 0.01  # load balancing, token_choice models only
    threshold_momentum: float = 0.99  # EMA of each group's k-th largest score, per step
    seed: int = 0
    autocast: str = "bfloat16"  # bfloat16 | none (float32)
    compile: bool = True  # torch.compile the step's forward and loss
    eval_every: int = 100  # steps between validation passes (0: only at the end)
    eval_batches: int = 4  # validation batches per periodic pass
    checkpoint_every: int = 50  # steps between checkpoints

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        frac = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights and the optimizer."""

    step: int = 0
    seconds: float = 0.0  # training wall time over all sittings (evaluation excluded)
    thresholds: dict[int, list[float]] = field(default_factory=dict)  # layer -> EMA [E]
    history: list[dict[str, Any]] = field(default_factory=list)  # log rows (loss curve)


def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2-style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers),
    norms at 1, the router small so experts start near-uniform."""
    gen = torch.Generator().manual_seed(seed)
    layers = model.cfg.num_layers
    for name, p in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf.startswith("b") or leaf == "router_bias":
                p.zero_()
            else:
                std = 0.02 / math.sqrt(2 * layers) if leaf in ("wo", "w_down") else 0.02
                p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=gen))


def _optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for _, p in sorted(model.named_parameters()) if p.dim() >= 2]
    other = [p for _, p in sorted(model.named_parameters()) if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": other, "weight_decay": 0.0}],
        lr=cfg.lr, betas=cfg.betas, fused=False)


def autocast_ctx(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


StepFn = Callable[[Transformer, torch.Tensor, int], tuple[torch.Tensor, ForwardOut]]


def step_loss(model: Transformer, batch: torch.Tensor, group_size: int
              ) -> tuple[torch.Tensor, ForwardOut]:
    """batch int64 [B, T + 1] -> per-token NLL [T*B] (position-major) and the forward's output."""
    out = forward(model, batch[:, :-1], group_size)
    return token_nll(out, batch[:, 1:]), out


def step_function(cfg: TrainConfig, device: torch.device) -> StepFn:
    """step_loss under the run's precision, compiled when asked."""
    def fn(model: Transformer, batch: torch.Tensor, group_size: int
           ) -> tuple[torch.Tensor, ForwardOut]:
        with autocast_ctx(cfg, device):
            return step_loss(model, batch, group_size)

    return torch.compile(fn) if cfg.compile else fn


@torch.no_grad()
def evaluate(model: Transformer, batches: list[torch.Tensor], group_size: int,
             token_bytes: torch.Tensor, step_fn: StepFn = step_loss) -> dict[str, float]:
    """Validation NLL under the training grouping: nats per token and bits per byte."""
    was_training = model.training
    model.eval()
    nats, tokens, nbytes = 0.0, 0, 0
    device = model.embed.device
    for batch in batches:
        batch = batch.to(device)
        nll, _ = step_fn(model, batch, group_size)
        nats += float(nll.double().sum())
        tokens += nll.numel()
        nbytes += int(token_bytes[batch[:, 1:].cpu()].sum())
    model.train(was_training)
    return {"nats_per_token": nats / tokens, "bits_per_byte": nats / math.log(2) / nbytes,
            "tokens": tokens, "bytes": nbytes}


def _save(path: Path, model: Transformer, opt: torch.optim.Optimizer, state: TrainState,
          meta: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "state": asdict(state), "meta": meta}, tmp)
    os.replace(tmp, path)  # atomic: a kill mid-write leaves the previous checkpoint


def train(model_cfg: ModelConfig, cfg: TrainConfig, batches: TrainBatches,
          valid: list[torch.Tensor], token_bytes: torch.Tensor, checkpoint: Path,
          device: torch.device, meta: dict[str, Any],
          max_steps_now: int | None = None) -> tuple[Transformer, TrainState]:
    """Train to cfg.steps, resuming from `checkpoint` when it exists (with the same meta), and
    checkpointing there. max_steps_now: stop this sitting after that many steps."""
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    init_weights(model, cfg.seed)
    model.train()
    opt = _optimizer(model, cfg)
    state = _resume(checkpoint, model, opt, meta) if checkpoint.exists() else TrainState()
    step_fn = step_function(cfg, device)
    end = cfg.steps if max_steps_now is None else min(cfg.steps, state.step + max_steps_now)
    interactive = sys.stderr.isatty()
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=state.step, unit="step", dynamic_ncols=True,
               mininterval=1.0 if interactive else 60.0, file=sys.stderr, smoothing=0.05)
    moe_layers = list(model_cfg.moe_layers or ())
    while state.step < end:
        step = state.step
        t0 = time.perf_counter()
        batch = batches.batch(step).to(device)
        lr = cfg.lr_at(step)
        for group in opt.param_groups:
            group["lr"] = lr
        nll_tokens, out = step_fn(model, batch, cfg.group_size)
        nll = nll_tokens.mean()
        loss = nll + cfg.aux_loss_weight * out.aux_loss
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        _update_thresholds(state, moe_layers, out.routing, cfg.threshold_momentum)
        state.seconds += time.perf_counter() - t0
        state.step += 1
        row = _log_row(state, cfg, float(nll.detach()), lr, grad_norm, out)
        if (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == cfg.steps:
            row["valid"] = evaluate(model, valid[:cfg.eval_batches], cfg.group_size,
                                    token_bytes, step_fn)["nats_per_token"]
        state.history.append(row)
        tok_s = state.step * cfg.tokens_per_step / max(state.seconds, 1e-9)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        bar.update(1)
        if state.step % cfg.checkpoint_every == 0 or state.step == end:
            _save(checkpoint, model, opt, state, meta)
    bar.close()
    return model, state


def _resume(checkpoint: Path, model: Transformer, opt: torch.optim.Optimizer,
            meta: dict[str, Any]) -> TrainState:
    ck = torch.load(checkpoint, map_location=model.embed.device, weights_only=True)
    if ck["meta"] != meta:
        raise ConfigError(f"{checkpoint} is from a different run (its recipe: {ck['meta']}); "
                         "remove it or use another work directory")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    state = TrainState(**ck["state"])
    state.thresholds = {int(k): v for k, v in state.thresholds.items()}
    return state


def _log_row(state: TrainState, cfg: TrainConfig, loss: float, lr: float, grad_norm: float,
             out: ForwardOut) -> dict[str, Any]:
    row: dict[str, Any] = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           "seconds": round(state.seconds, 2),
                           "tokens": state.step * cfg.tokens_per_step}
    if out.routing:  # the share of tokens no expert took, over the MoE layers
        row["dropped"] = sum(int(r.dropped) for r in out.routing) / sum(
            r.tokens for r in out.routing)
    return row


def _update_thresholds(state: TrainState, layers: list[int], records: list, momentum: float
                       ) -> None:
    for layer, rec in zip(layers, records, strict=True):
        if rec.kth_score is None:
            continue
        kth = rec.kth_score.float().cpu().tolist()
        old = state.thresholds.get(layer)
        state.thresholds[layer] = kth if old is None else [
            momentum * o + (1 - momentum) * k for o, k in zip(old, kth, strict=True)]
