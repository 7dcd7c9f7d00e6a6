"""Architectures of well-known models, each with the published source of its numbers.

Plain dictionaries of ModelConfig keyword arguments, so this table imports nothing;
`ModelConfig.preset(name)` turns an entry into a validated config.
"""
from __future__ import annotations

_GPT2 = dict(mlp="gelu", norm="layernorm", position="learned", tied_embeddings=True,
             qkv_bias=True, attn_out_bias=True, mlp_bias=True, vocab_size=50257, max_seq_len=1024)
_GPT2_SRC = ("Radford et al. 2019, 'Language Models are Unsupervised Multitask Learners', Table 2; "
             "Hugging Face openai-community/{} config.json")

_LLAMA1_SRC = ("Touvron et al. 2023, 'LLaMA: Open and Efficient Foundation Language Models', Table 2; "
               "d_ff from the reference code's rule 256*ceil(8d/3/256)")
_LLAMA1 = dict(vocab_size=32000, max_seq_len=2048)
_LLAMA2_SRC = ("Touvron et al. 2023, 'Llama 2: Open Foundation and Fine-Tuned Chat Models', Table 1; "
               "Hugging Face meta-llama/{} config.json")
_LLAMA2 = dict(vocab_size=32000, max_seq_len=4096)
_LLAMA3_SRC = "Meta Llama 3 model card (2024); Hugging Face meta-llama/{} config.json"
_LLAMA3 = dict(vocab_size=128256, max_seq_len=8192)
_QWEN2_SRC = "Yang et al. 2024, 'Qwen2 Technical Report', Table 1; Hugging Face Qwen/{} config.json"
_QWEN2 = dict(qkv_bias=True)

# name -> (ModelConfig keyword arguments, source)
PRESETS: dict[str, tuple[dict, str]] = {
    "gpt2": (dict(_GPT2, n_layers=12, d_model=768, n_heads=12), _GPT2_SRC.format("gpt2")),
    "gpt2-medium": (dict(_GPT2, n_layers=24, d_model=1024, n_heads=16), _GPT2_SRC.format("gpt2-medium")),
    "gpt2-large": (dict(_GPT2, n_layers=36, d_model=1280, n_heads=20), _GPT2_SRC.format("gpt2-large")),
    "gpt2-xl": (dict(_GPT2, n_layers=48, d_model=1600, n_heads=25), _GPT2_SRC.format("gpt2-xl")),
    "llama-7b": (dict(_LLAMA1, n_layers=32, d_model=4096, n_heads=32, d_ff=11008), _LLAMA1_SRC),
    "llama-13b": (dict(_LLAMA1, n_layers=40, d_model=5120, n_heads=40, d_ff=13824), _LLAMA1_SRC),
    "llama-33b": (dict(_LLAMA1, n_layers=60, d_model=6656, n_heads=52, d_ff=17920), _LLAMA1_SRC),
    "llama-65b": (dict(_LLAMA1, n_layers=80, d_model=8192, n_heads=64, d_ff=22016), _LLAMA1_SRC),
    "llama2-7b": (dict(_LLAMA2, n_layers=32, d_model=4096, n_heads=32, d_ff=11008),
                  _LLAMA2_SRC.format("Llama-2-7b-hf")),
    "llama2-13b": (dict(_LLAMA2, n_layers=40, d_model=5120, n_heads=40, d_ff=13824),
                   _LLAMA2_SRC.format("Llama-2-13b-hf")),
    "llama2-70b": (dict(_LLAMA2, n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672),
                   _LLAMA2_SRC.format("Llama-2-70b-hf")),
    "llama3-8b": (dict(_LLAMA3, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336),
                  _LLAMA3_SRC.format("Meta-Llama-3-8B")),
    "llama3-70b": (dict(_LLAMA3, n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672),
                   _LLAMA3_SRC.format("Meta-Llama-3-70B")),
    "mistral-7b": (dict(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=32000,
                        max_seq_len=32768),
                   "Jiang et al. 2023, 'Mistral 7B', Table 1; Hugging Face mistralai/Mistral-7B-v0.1 config.json"),
    "qwen2-0.5b": (dict(_QWEN2, n_layers=24, d_model=896, n_heads=14, n_kv_heads=2, d_ff=4864, vocab_size=151936,
                        max_seq_len=32768, tied_embeddings=True), _QWEN2_SRC.format("Qwen2-0.5B")),
    "qwen2-7b": (dict(_QWEN2, n_layers=28, d_model=3584, n_heads=28, n_kv_heads=4, d_ff=18944, vocab_size=152064,
                      max_seq_len=131072), _QWEN2_SRC.format("Qwen2-7B")),
}
