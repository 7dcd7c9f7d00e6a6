"""Decoder-only models on pagedlm's paged-attention ops: Llama 2/3, Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3 (text), Phi-3, Mixtral and Qwen3-MoE (docs/models.md)."""
from pagedlm.models.config import ModelArgs
from pagedlm.models.llama import AttentionBatch, LlamaForCausalLM
from pagedlm.models.loader import load_model, random_model

__all__ = ["AttentionBatch", "LlamaForCausalLM", "ModelArgs", "load_model", "random_model"]
