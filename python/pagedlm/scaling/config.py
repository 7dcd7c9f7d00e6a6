"""ModelConfig: the architecture numbers every estimator in pagedlm.scaling reads.

One frozen dataclass for decoder-only transformers (GPT-2 and Llama families, MHA/GQA/MQA),
validated on construction; built directly, from a Hugging Face config.json, or from a preset.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from . import validate
from .hf import kwargs_from_hf
from .presets import PRESETS

MLPS = ("swiglu", "gelu")  # "swiglu": any gated MLP (gate, up, down); "gelu": two matrices
NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned")


def llama_d_ff(d_model: int, multiple_of: int = 256) -> int:
    """SwiGLU width of the LLaMA reference code: 2/3 of 4*d (same parameters as a 4*d GELU MLP),
    rounded up to a multiple of 256 (Touvron et al. 2023, section 2.2; d=4096 gives 11008)."""
    return multiple_of * math.ceil(int(2 * 4 * d_model / 3) / multiple_of)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int | None = None  # None: same as n_heads (MHA)
    head_dim: int | None = None  # None: d_model // n_heads
    d_ff: int | None = None  # None: 4*d_model (gelu) or llama_d_ff(d_model) (swiglu)
    vocab_size: int
    max_seq_len: int = 2048
    tied_embeddings: bool = False
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    position: str = "rope"
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    name: str = ""
    source: str = ""

    def __post_init__(self):
        for field in ("n_layers", "d_model", "n_heads", "vocab_size", "max_seq_len"):
            validate.positive_int(field, getattr(self, field))
        validate.choice("mlp", self.mlp, MLPS)
        validate.choice("norm", self.norm, NORMS)
        validate.choice("position", self.position, POSITIONS)
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}) "
                                 "when head_dim is not given")
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        validate.positive_int("head_dim", self.head_dim)
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        validate.positive_int("n_kv_heads", self.n_kv_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model if self.mlp == "gelu" else llama_d_ff(self.d_model))
        validate.positive_int("d_ff", self.d_ff)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of K (and of V): smaller than q_dim under GQA/MQA."""
        return self.n_kv_heads * self.head_dim

    @property
    def mlp_matrices(self) -> int:
        return 3 if self.mlp == "swiglu" else 2

    @property
    def aspect_ratio(self) -> float:
        """d_model / n_layers, the width-to-depth ratio of Kaplan et al. 2020, Figure 5."""
        return self.d_model / self.n_layers

    @classmethod
    def from_hf(cls, path_or_dict) -> ModelConfig:
        """Read a Llama, Mistral, Qwen2 or GPT-2 config.json (a dict, a file, or a model folder)."""
        if isinstance(path_or_dict, dict):
            hf = path_or_dict
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise ValueError(f"path_or_dict: no config.json at {path!r}")
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        return cls(**kwargs_from_hf(hf))

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A well-known model's architecture; see `preset_names()` and each config's `source`."""
        kwargs, source = validate.lookup("preset", name, PRESETS)
        key = next(k for k in PRESETS if k.lower() == name.lower())
        return cls(**kwargs, name=key, source=source)

    @staticmethod
    def preset_names() -> list[str]:
        return list(PRESETS)
