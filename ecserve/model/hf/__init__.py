"""Hugging Face MoE checkpoints (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE), loaded in place."""

from ecserve.model.hf.config import HF_MODEL_TYPES, config_from_hf
from ecserve.model.hf.tensors import hf_sources, load_hf_state_dict

__all__ = ["HF_MODEL_TYPES", "config_from_hf", "hf_sources", "load_hf_state_dict"]
