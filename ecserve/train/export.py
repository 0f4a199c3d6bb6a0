"""Write a trained model as a complete ecserve model directory, and measure what it ships.

The weights are stored in bfloat16 (the matmuls trained under bf16 autocast saw exactly these
values; half the bytes of float32) and run in float32 by default (config dtype), so CPUs without
fast bf16 serve them well. The held-out loss in the model card is measured on the stored
weights, reloaded, under the training grouping. The `threshold` policy's theta_e come from a
calibration pass of the stored weights over training batches (the mean, over groups, of each
expert's k-th largest score); the moving average kept during training is reported beside them.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from pathlib import Path
from typing import Any

import torch

from ecserve.config import ModelConfig
from ecserve.model.transformer import Transformer
from ecserve.model.weights import load_model, read_config, save_model
from ecserve.routing import policy_for
from ecserve.train import bpe
from ecserve.train.corpus import CorpusManifest
from ecserve.train.data import TrainBatches
from ecserve.train.forward import forward
from ecserve.train.loop import TrainConfig, TrainState, evaluate
from ecserve.train.presets import model_config

STORAGE_DTYPE = "bfloat16"
CALIBRATION_BATCHES = 8
TRAINING_FILE = "training.json"
CARD_FILE = "README.md"


def export(out: Path, model: Transformer, state: TrainState, cfg: TrainConfig, preset: str,
           tok_path: Path, manifest: CorpusManifest, valid: list[torch.Tensor],
           token_bytes: torch.Tensor, batches: TrainBatches, recipe: str,
           device: torch.device) -> dict[str, Any]:
    serve_cfg = model_config(preset, model.cfg.vocab_size, cfg.seq_len, cfg.group_size,
                             serving=True)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_model(out, serve_cfg, state_dict, storage_dtype=STORAGE_DTYPE)
    shutil.copyfile(tok_path, out / bpe.TOKENIZER_FILE)
    bpe.write_hf_config(out, serve_cfg.max_position_embeddings)
    # Reload what was written, with the training grouping's policy, in float32.
    train_cfg = dataclasses.replace(serve_cfg, routing=model.cfg.routing)
    stored = load_model(out, train_cfg, device, torch.float32)
    calibrated = calibrate_thresholds(stored, batches, cfg.group_size)
    if calibrated:
        for layer, theta in calibrated.items():
            state_dict[f"layers.{layer}.moe.threshold"] = theta
        save_model(out, serve_cfg, state_dict, storage_dtype=STORAGE_DTYPE)
    held_out = evaluate(stored, valid, cfg.group_size, token_bytes)
    params = count_parameters(model.cfg)
    record = {
        "preset": preset, "recipe": recipe, "train": dataclasses.asdict(cfg),
        "corpus": dataclasses.asdict(manifest),
        "tokenizer": {"vocab_size": model.cfg.vocab_size, "sha256": bpe.file_sha256(tok_path)},
        "parameters": params, "held_out": held_out, "storage_dtype": STORAGE_DTYPE,
        "thresholds": {"calibrated": {str(k): v.tolist() for k, v in calibrated.items()},
                       "training_ema": {str(k): v for k, v in state.thresholds.items()}},
        "steps": state.step, "tokens": state.step * cfg.tokens_per_step,
        "epochs": batches.epoch_of(state.step), "train_seconds": state.seconds,
        "machine": machine(device), "history": state.history,
    }
    (out / TRAINING_FILE).write_text(json.dumps(record, indent=1) + "\n")
    (out / CARD_FILE).write_text(model_card(read_config(out), record))
    return record


@torch.no_grad()
def calibrate_thresholds(model: Transformer, batches: TrainBatches, group_size: int,
                         num_batches: int = CALIBRATION_BATCHES) -> dict[int, torch.Tensor]:
    """Per `ec` MoE layer: float32 [E], the mean over training groups of each expert's k-th
    largest router score (empty for models without `ec` layers)."""
    sums: dict[int, torch.Tensor] = {}
    layers = list(model.cfg.moe_layers or ())
    device = model.embed.device
    for i in range(num_batches):
        out = forward(model, batches.batch(i)[:, :-1].to(device), group_size)
        for layer, rec in zip(layers, out.routing, strict=True):
            if rec.kth_score is not None:
                sums[layer] = sums.get(layer, 0) + rec.kth_score.double().cpu()
    return {layer: (s / num_batches).float() for layer, s in sums.items()}


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total parameters, and those one token uses (its experts at capacity factor c)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters()
                  if n.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down") and ".moe." in n)
    r = cfg.routing
    per_token = policy_for(r.policy).experts_per_token(r)
    active = total - experts + round(experts * per_token / cfg.num_experts)
    return {"total": total, "active_per_token": active, "embedding": cfg.vocab_size *
            cfg.hidden_size}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def model_card(cfg: ModelConfig, r: dict[str, Any]) -> str:
    """The model directory's README.md."""
    c, t, h, p = r["corpus"], r["train"], r["held_out"], r["parameters"]
    hours = r["train_seconds"] / 3600
    # Per preset: what the model is, its MoE layers, how held-out loss is routed, the routing line.
    kind, layer_kind, grouping, routing = {
        "ec": ("expert-choice", "expert-choice",
               f"under the training grouping (`ec` routing, groups of {t['group_size']} tokens "
               f"at one position of\n{t['group_size']} sequences)",
               f"- Served routing: `{cfg.routing.policy}` (routing.group_size "
               f"{cfg.routing.group_size}); the\n  `threshold` policy's per-expert thresholds "
               "are stored (`layers.N.moe.threshold`).\n"),
        "top2": ("token-choice top-2 MoE", "token-choice top-2",
                 "under top-2 token-choice routing, as trained",
                 "- Routing: `token_choice`, top-2, renormalised (trained with a load-balancing "
                 "loss).\n"),
        "dense": ("dense", "", "as trained", ""),
    }[r["preset"]]
    stored = (f"- Weights stored in {r['storage_dtype']}, run in {cfg.dtype} unless `--dtype` "
              "says otherwise.")
    moe = (f"{len(cfg.moe_layers or ())} of them {layer_kind} MoE layers "
           f"(blocks {', '.join(map(str, cfg.moe_layers or ()))}) of {cfg.num_experts} GLU "
           f"experts of hidden width {cfg.expert_ffn_hidden_size}, capacity factor "
           f"{cfg.routing.capacity_factor:g}" if cfg.moe_layers else "all dense")
    return f"""# ecserve-code ({r['preset']}): a small {kind} language model of Python code

A {p['total'] / 1e6:.1f}M-parameter decoder ({p['active_per_token'] / 1e6:.1f}M used per token)
trained from scratch by ecserve's own recipe on CPython's standard library. It writes
Python-looking code; it is a demonstration and test model for serving expert-choice routing,
not an assistant.

## Held-out loss

On the validation split ({h['tokens']:,} tokens, {h['bytes']:,} bytes of held-out files),
{grouping}, with the stored weights run in float32:

| nats per token | bits per byte |
|---|---|
| {h['nats_per_token']:.4f} | {h['bits_per_byte']:.4f} |

What each serving policy costs against this: ecserve's `bench/bench_decode_policies.py`.

## Data

{c['source']}: {c['python']} ({c['stdlib']}), split by whole file
({c['valid_per_mille'] / 10:g}% of files held out by a hash of their path).

| split | files | bytes | sha256 |
|---|---|---|---|
| train | {c['files']['train']} | {c['bytes']['train']:,} | `{c['sha256']['train']}` |
| valid | {c['files']['valid']} | {c['bytes']['valid']:,} | `{c['sha256']['valid']}` |

Licence of the data: {c['licence']}.

## Model

- Tokenizer: byte-level BPE, {r['tokenizer']['vocab_size']} ids, trained on the training split
  (`tokenizer.json`, sha256 `{r['tokenizer']['sha256']}`); `<|bos|>` = 0 starts every
  document and prompt, `<|eos|>` = 1 ends a document.
- {cfg.num_layers} blocks of width {cfg.hidden_size}, {cfg.num_heads} query heads and
  {cfg.num_kv_heads} key/value heads, RoPE, RMSNorm, SwiGLU; {moe}.
  Context {cfg.max_position_embeddings} tokens. Tied embeddings.
{routing}{stored}

## Training

```
{r['recipe']}
```

{r['steps']:,} AdamW steps of {t['batch_size']} x {t['seq_len']} tokens ({r['tokens'] / 1e6:.1f}M
tokens, {r['epochs']:.2f} epochs), peak learning rate {t['lr']:g} after {t['warmup_steps']}
warm-up steps, cosine decay to {t['min_lr_ratio']:g}x, weight decay {t['weight_decay']:g},
betas {tuple(t['betas'])}, gradient clipping at {t['grad_clip']:g}, seed {t['seed']},
{'bf16 autocast with the router in float32' if t['autocast'] == 'bfloat16' else 'float32'}.
Every training routing group holds at most one token per sequence (no future-token leakage).
Trained in {hours:.2f} h ({r['tokens'] / max(r['train_seconds'], 1e-9):,.0f} tokens/s) on
{r['machine']}. `training.json` has the whole recipe and the loss curve.

## Intended use and limits

For trying ecserve and for measuring what expert-choice serving policies cost in quality. It
has seen only the Python standard library: it continues code plausibly in that style, makes up
names and APIs, does not follow instructions, and its code is not to be trusted. Weights under
the project's licence (Apache-2.0); generated text may echo the PSF-licensed training data.
"""

