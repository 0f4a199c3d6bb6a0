"""A Hugging Face MoE config.json (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) as an ecserve ModelConfig.

Each model type's architecture and routing are taken exactly as its transformers modeling code
computes them: token_choice routing with the type's top-k and renormalisation (Mixtral always
renormalises; the others when `norm_topk_prob`). Keys that would change the computation in a way
ecserve does not implement (rope scaling, sliding windows shorter than the context, qkv clipping,
other activations) are refused with a ConfigError naming the key and its value. Keys that only
matter for training (dropout, aux-loss coefficients, router jitter) are ignored.

An optional `ecserve_routing` object in config.json (a RoutingConfig, e.g. {"policy": "ec",
"capacity_factor": 2.0}) replaces the model's own routing: an explicit experiment, not the
model as trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecserve.config import ConfigError, ModelConfig, RoutingConfig, parse_dataclass

HF_MODEL_TYPES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
# Per model type: the transformers config class's defaults for keys a config.json may omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32,
                "attention_bias": False,
                "bos_token_id": 1, "eos_token_id": 2},
    "olmoe": {"rope_theta": 1e4, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
              "norm_topk_prob": False, "attention_bias": False, "eos_token_id": 50279},
    "qwen2_moe": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                  "norm_topk_prob": False, "qkv_bias": True, "decoder_sparse_step": 1},
    "qwen3_moe": {"rope_theta": 1e4, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768,
                  "norm_topk_prob": False, "attention_bias": False, "decoder_sparse_step": 1},
}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu"}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _get(data: dict[str, Any], key: str, model_type: str, *aliases: str) -> Any:
    """data[key] (or an alias), else the type's default; a ConfigError when neither exists."""
    for k in (key, *aliases):
        if data.get(k) is not None:
            return data[k]
    if key in _DEFAULTS[model_type]:
        return _DEFAULTS[model_type][key]
    raise ConfigError(f"missing key {key} (needed for model_type {model_type!r})")


def _rope_theta(data: dict[str, Any], model_type: str) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4)."""
    params = data.get("rope_parameters") or {}
    scaling = data.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope_parameters.rope_type={rope_type!r} is not supported "
                          "(ecserve implements plain rope only)")
    if scaling:
        raise ConfigError(f"rope_scaling={json.dumps(scaling)} is not supported "
                          "(ecserve implements plain rope only)")
    prf = params.get("partial_rotary_factor", data.get("partial_rotary_factor"))
    if prf not in (None, 1, 1.0):
        raise ConfigError(f"partial_rotary_factor={prf} is not supported (only full rope)")
    return float(params.get("rope_theta") or _get(data, "rope_theta", model_type))


def _check_unsupported(data: dict[str, Any], model_type: str, context: int) -> None:
    """Refuse options that change the forward pass in ways ecserve does not compute."""
    window = data.get("sliding_window")
    uses_window = model_type == "mixtral" or (
        model_type in ("qwen2_moe", "qwen3_moe") and data.get("use_sliding_window"))
    if uses_window and window is not None and window < context:
        raise ConfigError(
            f"sliding_window={window} is smaller than max_position_embeddings={context}: "
            "sliding-window attention is not supported")
    if data.get("clip_qkv") is not None:
        raise ConfigError(f"clip_qkv={data['clip_qkv']} is not supported (only null)")
    act = data.get("hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"hidden_act={act!r} is not supported (supported: "
                          f"{', '.join(_ACTIVATIONS)})")
    if data.get("num_experts", data.get("num_local_experts")) == 0:
        raise ConfigError("num_experts=0: a dense model, not an MoE checkpoint")


def _token_id(value: Any) -> int | None:
    """An HF token id field: an int, a list (the first is used), or null."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _moe_layers(data: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    if model_type in ("mixtral", "olmoe"):
        return tuple(range(num_layers))
    step = _get(data, "decoder_sparse_step", model_type)
    dense = set(data.get("mlp_only_layers") or ())
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def _routing(data: dict[str, Any], model_type: str, num_experts: int) -> RoutingConfig:
    """The model's own token-choice routing, or the config's `ecserve_routing` experiment."""
    if "ecserve_routing" in data:
        return parse_dataclass(RoutingConfig, data["ecserve_routing"], "ecserve_routing")
    renorm = True if model_type == "mixtral" else bool(_get(data, "norm_topk_prob", model_type))
    top_k = _get(data, "num_experts_per_tok", model_type)
    return RoutingConfig(policy="token_choice", top_k=top_k, renormalize=renorm,
                         group_size=64, scope="batch")


def _prepends_bos(model_dir: Path) -> int | None:
    """The id the directory's tokenizer.json puts before a text (its BOS), or None."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    with_special = tok.encode("a", add_special_tokens=True).ids
    plain = tok.encode("a", add_special_tokens=False).ids
    added_first = len(with_special) > len(plain) and with_special[1:1 + len(plain)] == plain
    return with_special[0] if added_first else None


def _eos(model_dir: Path, data: dict[str, Any], model_type: str) -> int | None:
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        gen_eos = _token_id(json.loads(gen.read_text()).get("eos_token_id"))
        if gen_eos is not None:
            return gen_eos
    return _token_id(data.get("eos_token_id", _DEFAULTS[model_type].get("eos_token_id")))


def config_from_hf(data: dict[str, Any], model_dir: Path) -> ModelConfig:
    """Translate a Hugging Face MoE config.json (already parsed) into a ModelConfig."""
    mt = data.get("model_type")
    if mt not in HF_MODEL_TYPES:
        raise ConfigError(f"model_type={mt!r} is not supported (supported: ecserve, "
                          f"{', '.join(HF_MODEL_TYPES)})")
    context = _get(data, "max_position_embeddings", mt)
    _check_unsupported(data, mt, context)
    hidden, heads = _get(data, "hidden_size", mt), _get(data, "num_attention_heads", mt)
    num_layers = _get(data, "num_hidden_layers", mt)
    experts = _get(data, "num_local_experts" if mt == "mixtral" else "num_experts", mt,
                   "num_experts", "num_local_experts")
    dense_ffn = _get(data, "intermediate_size", mt)
    expert_ffn = dense_ffn if mt in ("mixtral", "olmoe") else _get(data, "moe_intermediate_size",
                                                                     mt)
    shared = (data.get("shared_expert_intermediate_size") or 0) if mt == "qwen2_moe" else 0
    qkv_bias = _get(data, "qkv_bias" if mt == "qwen2_moe" else "attention_bias", mt)
    out_bias = mt in ("olmoe", "qwen3_moe") and bool(qkv_bias)
    dtype = data.get("dtype") or data.get("torch_dtype") or "float32"
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported (float32, bfloat16, float16)")
    bos = _prepends_bos(model_dir)
    return ModelConfig(
        model_type=mt,
        vocab_size=_get(data, "vocab_size", mt),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        head_dim=data.get("head_dim") or hidden // heads,
        ffn_hidden_size=dense_ffn,
        num_experts=experts,
        expert_ffn_hidden_size=expert_ffn,
        moe_layers=_moe_layers(data, mt, num_layers),
        shared_expert_ffn_hidden_size=shared,
        shared_expert_gate=bool(shared),
        attention_bias=bool(qkv_bias),
        attention_output_bias=out_bias,
        qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(mt, "none"),
        activation=_ACTIVATIONS[data.get("hidden_act", "silu")],
        routing=_routing(data, mt, experts),
        rope_theta=_rope_theta(data, mt),
        max_position_embeddings=context,
        norm_eps=float(_get(data, "rms_norm_eps", mt)),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        dtype=_DTYPES[dtype],
        tokenizer="huggingface",
        bos_token_id=bos,
        eos_token_id=_eos(model_dir, data, mt),
    )
