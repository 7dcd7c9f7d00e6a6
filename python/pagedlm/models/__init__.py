"""Llama-family models (Llama 2/3, Mistral, Qwen2) running on pagedlm's paged-attention ops."""
from pagedlm.models.config import ModelArgs
from pagedlm.models.llama import AttentionBatch, LlamaForCausalLM
from pagedlm.models.loader import load_model, random_model

__all__ = ["AttentionBatch", "LlamaForCausalLM", "ModelArgs", "load_model", "random_model"]
