"""ModelConfig: reading Hugging Face configs, presets, and the errors bad input raises."""
import json
import subprocess
import sys

import pytest

from pagedlm.scaling import ModelConfig, count_params

# meta-llama/Llama-2-7b-hf config.json (the LLaMA-7B architecture), fields as published.
LLAMA_7B_HF = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
    "hidden_act": "silu", "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
# openai-community/gpt2 config.json: n_inner is null (4 * n_embd) and tie_word_embeddings is left to its default.
GPT2_HF = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None, "n_positions": 1024,
           "vocab_size": 50257, "activation_function": "gelu_new"}
# Qwen/Qwen2-0.5B config.json: GQA 14/2, tied embeddings, q/k/v biases implied by the model type.
QWEN2_05B_HF = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                "max_position_embeddings": 32768, "hidden_act": "silu", "tie_word_embeddings": True}
# mistralai/Mistral-7B-v0.1 config.json.
MISTRAL_7B_HF = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                 "max_position_embeddings": 32768, "hidden_act": "silu", "tie_word_embeddings": False}


def test_llama_7b_from_hf_has_exactly_6_738_415_616_params():
    # 6,738,415,616: the count Hugging Face shows for meta-llama/Llama-2-7b-hf (safetensors metadata),
    # the "6.7B" of Touvron et al. 2023, Table 2.
    assert count_params(ModelConfig.from_hf(LLAMA_7B_HF)) == 6_738_415_616


def test_gpt2_from_hf_counts_tied_embeddings_once():
    # 124,439,808: openai-community/gpt2 on Hugging Face. Radford et al. 2019, Table 2 says 117M, a
    # miscount the openai/gpt-2 README corrects ("our original parameter counts were wrong").
    cfg = ModelConfig.from_hf(GPT2_HF)
    assert (cfg.tied_embeddings, cfg.d_ff, cfg.position, cfg.norm) == (True, 3072, "learned", "layernorm")
    assert count_params(cfg) == 124_439_808


def test_qwen2_and_mistral_from_hf():
    # Hugging Face model pages: Qwen/Qwen2-0.5B 494,032,768; mistralai/Mistral-7B-v0.1 7,241,732,096.
    qwen = ModelConfig.from_hf(QWEN2_05B_HF)
    assert (qwen.qkv_bias, qwen.attn_out_bias, qwen.n_kv_heads, qwen.head_dim) == (True, False, 2, 64)
    assert count_params(qwen) == 494_032_768
    assert count_params(ModelConfig.from_hf(MISTRAL_7B_HF)) == 7_241_732_096


def test_from_hf_reads_a_file_and_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B_HF))
    assert ModelConfig.from_hf(tmp_path / "config.json") == ModelConfig.from_hf(str(tmp_path))


def test_llama_attention_bias_flag_adds_biases_to_all_four_projections():
    with_bias = ModelConfig.from_hf({**LLAMA_7B_HF, "attention_bias": True})
    extra = count_params(with_bias) - count_params(ModelConfig.from_hf(LLAMA_7B_HF))
    assert extra == 32 * 4 * 4096


# Published parameter counts (Hugging Face model pages, safetensors metadata) of each preset.
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
    "llama-7b": 6_738_415_616, "llama-13b": 13_015_864_320, "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672, "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496, "mistral-7b": 7_241_732_096, "qwen2-0.5b": 494_032_768,
    "qwen2-7b": 7_615_616_512,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_matches_published_parameter_count(name):
    cfg = ModelConfig.preset(name)
    assert cfg.source and cfg.name == name
    assert count_params(cfg) == PUBLISHED[name]


def test_every_preset_has_a_source_and_is_case_insensitive():
    for name in ModelConfig.preset_names():
        assert ModelConfig.preset(name.upper()).source
    assert ModelConfig.preset("LLaMA-7B") == ModelConfig.preset("llama-7b")


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_layers=-1), "n_layers"),
    (dict(n_layers=0), "n_layers"),
    (dict(d_model=4000, n_heads=48), "n_heads"),  # heads that don't divide the width
    (dict(n_kv_heads=5), "n_kv_heads"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(d_ff=-8), "d_ff"),
    (dict(mlp="relu"), "mlp"),
    (dict(norm="batchnorm"), "norm"),
    (dict(position="alibi"), "position"),
    (dict(n_layers=2.5), "n_layers"),
])
def test_bad_config_raises_value_error_naming_the_field(kwargs, field):
    base = dict(n_layers=2, d_model=256, n_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**base, **kwargs})


def test_unknown_preset_and_model_type_are_named():
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.preset("gpt-5")
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({**LLAMA_7B_HF, "model_type": "mamba"})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        ModelConfig.from_hf({k: v for k, v in LLAMA_7B_HF.items() if k != "num_hidden_layers"})


def test_explicit_head_dim_may_differ_from_width_over_heads():
    cfg = ModelConfig(n_layers=1, d_model=1000, n_heads=8, head_dim=128, vocab_size=10)
    assert cfg.q_dim == 1024


def test_importing_scaling_loads_no_other_part_of_pagedlm():
    code = ("import sys, pagedlm.scaling; "
            "bad = [m for m in sys.modules if m.startswith('pagedlm') and m != 'pagedlm' "
            "and not m.startswith('pagedlm.scaling')] + [m for m in sys.modules if m.startswith('matplotlib')]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
