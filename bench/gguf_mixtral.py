"""A Hugging Face Mixtral checkpoint written as a GGUF file for llama.cpp (bench_vs_llama_cpp.py).

Written directly with the `gguf` package rather than llama.cpp's converter, which cannot convert
the tests' byte tokenizer: the benchmark feeds token ids to both engines, so the GGUF only needs
a vocabulary of the right size (SentencePiece-style, ids < 256 named as bytes). The tensors are
mapped as llama.cpp's own converter maps Mixtral: architecture "llama" with experts, each layer's
experts stacked on a leading axis, and q/k rows permuted from Hugging Face's half-rotation rope
to the interleaved pairs llama.cpp's "llama" rope rotates.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

FILE_TYPES = {"F32": 0, "F16": 1}  # gguf's LlamaFileType: ALL_F32, MOSTLY_F16


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows [heads * hd, d]: rotate_half's (i, i + hd/2) pairs -> adjacent (2i, 2i + 1)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _load(model_dir: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def write_gguf(model_dir: Path, out: Path, file_type: str = "F32") -> Path:
    """Write the Mixtral checkpoint in model_dir as `out` (F32, or F16 matrices as llama.cpp's
    converter writes them: norms and the router stay F32)."""
    import gguf  # optional: the `peer` extra

    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "mixtral":
        raise ValueError(f"{model_dir}: needs a Mixtral checkpoint, not {cfg.get('model_type')}")
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, layers, experts = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_local_experts"]
    head_dim = cfg.get("head_dim") or d // heads
    vocab = cfg["vocab_size"]
    state = _load(model_dir)
    half = file_type == "F16"

    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name(model_dir.name)
    w.add_file_type(FILE_TYPES[file_type])
    w.add_vocab_size(vocab)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    bos, eos = cfg.get("bos_token_id"), cfg.get("eos_token_id")
    tokens, types = [], []
    for i in range(vocab):
        if i == bos:
            tokens.append("<s>")
            types.append(gguf.TokenType.CONTROL)
        elif i == eos:
            tokens.append("</s>")
            types.append(gguf.TokenType.CONTROL)
        elif i < 256:
            tokens.append(f"<0x{i:02X}>")
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(f"<unused{i}>")
            types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores([0.0] * vocab)
    if bos is not None:
        w.add_bos_token_id(bos)
        w.add_add_bos_token(False)  # the benchmark passes token ids as they are
    if eos is not None:
        w.add_eos_token_id(eos)

    def put(name: str, t: torch.Tensor, matrix: bool = True) -> None:
        arr = t.detach().float().numpy()
        w.add_tensor(name, arr.astype(np.float16) if half and matrix else arr)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], matrix=False)
        put(f"blk.{i}.attn_q.weight", _permute(state[p + "self_attn.q_proj.weight"], heads))
        put(f"blk.{i}.attn_k.weight", _permute(state[p + "self_attn.k_proj.weight"], kv_heads))
        put(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"],
            matrix=False)
        moe = p + "block_sparse_moe."
        put(f"blk.{i}.ffn_gate_inp.weight", state[moe + "gate.weight"], matrix=False)
        for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            stacked = torch.stack([state[f"{moe}experts.{e}.{theirs}.weight"]
                                   for e in range(experts)])  # [E, out, in]
            put(f"blk.{i}.ffn_{ours}_exps.weight", stacked)
    put("output_norm.weight", state["model.norm.weight"], matrix=False)
    put("output.weight", state.get("lm_head.weight", state["model.embed_tokens.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
