"""Tiny random Hugging Face MoE checkpoints, built from a config offline (tests and bench).

Needs transformers (the test and bench extras), never the network: set HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

BOS, EOS = 256, 257
# Small but complete: GQA, several experts, top-2, a dense block where the type allows it.
COMMON: dict[str, Any] = dict(
    vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0, tie_word_embeddings=False,
)
TYPES: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, mlp_only_layers=[1],
                      norm_topk_prob=False, qkv_bias=True),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      mlp_only_layers=[0], norm_topk_prob=True),
}


def byte_tokenizer(add_bos: bool) -> Tokenizer:
    """Byte-level BPE without merges: ids 0..255 are bytes, 256 <s>, 257 </s>."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"<s>": BOS, "</s>": EOS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    if add_bos:  # as Mixtral's (Llama) tokenizer: <s> before every text
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", BOS)])
    return tok


@torch.no_grad()
def randomize(model: PreTrainedModel, seed: int) -> None:
    """Weights with real structure: unit-scale activations, decisive routers, norms != 1 and
    biases != 0, so every mapped tensor matters to the logits."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "norm" in name:
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif p.dim() == 1:  # biases
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def build(model_type: str, out_dir: Path, seed: int = 0, shard: bool = False,
          **overrides: Any) -> tuple[PreTrainedModel, Path]:
    """A random float32 model of `model_type`, saved with its tokenizer.json in out_dir."""
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **TYPES[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize(model, seed)
    model.generation_config.eos_token_id = None  # greedy runs to max_new_tokens, as ecserve's
    model.save_pretrained(out_dir, max_shard_size="200KB" if shard else "1GB")
    byte_tokenizer(add_bos=model_type == "mixtral").save(str(out_dir / "tokenizer.json"))
    return model, out_dir
