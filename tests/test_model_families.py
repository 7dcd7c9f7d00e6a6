"""Qwen3, Gemma 2, Gemma 3 (text), Phi-3, Mixtral and Qwen3-MoE against transformers on the CPU
in float32: tiny random models saved with save_pretrained and loaded by pagedlm must give the
logits of a packed two-sequence prefill and of each decode step within 1e-4 (relative), and
greedy generation through pagedlm.LLM (block size 4, chunked prefill, prompts longer than the
sliding windows) must equal transformers' generate. Also: the grouped expert computation
against the naive loop, and how configs resolve into per-layer settings."""
import json

import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.models import ModelArgs, load_model, random_model
from pagedlm.models.loader import checkpoint_names, expected_shapes
from pagedlm.models.moe import expert_mlp, naive_expert_mlp, route

from model_families import TINY, checkpoint_cache, families, prompts
from test_models import Runner, assert_steps_match, relative_error

transformers = pytest.importorskip("transformers")
FAMILIES = families(transformers)
CLASSES = ["Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3TextConfig", "Phi3ForCausalLM",
           "MixtralForCausalLM", "Qwen3MoeForCausalLM"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (folder, transformers model), each built once for the module."""
    return checkpoint_cache(transformers, tmp_path_factory)


def test_transformers_has_every_family():
    assert [name for name in CLASSES if not hasattr(transformers, name)] == []


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_and_decode_logits_match_transformers(family, checkpoints):
    folder, reference = checkpoints(family)
    model = load_model(folder)
    runner = Runner(model, num_blocks=64, block_size=4)
    low = FAMILIES[family][3]
    sequences = dict(enumerate(prompts(2, TINY["vocab_size"], low + 8, low + 24, seed=1)))
    assert_steps_match(runner, reference, {s: list(p) for s, p in sequences.items()}, steps=5, label=family)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generation_equals_transformers_generate(family, checkpoints):
    folder, reference = checkpoints(family)
    low = FAMILIES[family][3]
    batch = prompts(3, TINY["vocab_size"], max(low, 14), max(low, 14) + 16, seed=2)
    count = 8
    # Chunks of at most 16 tokens: a prompt's later chunks attend across the window boundary.
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=128, max_num_batched_tokens=16)
    outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=count, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(batch, outputs):
        # An explicit mask: without one, generate masks out prompt tokens equal to pad_token_id.
        # eos_token_id=None: EOS is a token like any other, as with ignore_eos (min_new_tokens
        # would suppress it instead).
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=int),
                                          max_new_tokens=count, do_sample=False, pad_token_id=0,
                                          eos_token_id=None)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == expected, family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_expected_shapes_are_the_built_models(family):
    config_class, _, extra, _ = FAMILIES[family]
    model = random_model(config_class(**{**TINY, **extra}))
    built = {name: tuple(param[rows].shape) for name, (param, rows) in checkpoint_names(model).items()
             if not (name == "lm_head.weight" and model.args.tie_word_embeddings)}
    assert dict(expected_shapes(model.args)) == built


def test_per_layer_attention_settings_are_python_constants():
    """What a CUDA graph captures: each layer hands the kernels plain numbers, resolved once."""
    config_class, _, extra, _ = FAMILIES["gemma2"]
    model = random_model(config_class(**{**TINY, **extra}))
    attention = [layer.self_attn for layer in model.model.layers]
    assert [a.sliding_window for a in attention] == [8, None, 8]
    assert all(type(a.scale) is float and type(a.soft_cap) is float for a in attention)
    assert attention[0].scale == pytest.approx(24 ** -0.5) and attention[0].soft_cap == 4.0
    assert model.args.final_soft_cap == 2.5 and model.args.embed_scale == pytest.approx(8.0)


@pytest.mark.parametrize("method", ["grouped", "loop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_equal_the_naive_loop(method, dtype):
    g = torch.Generator().manual_seed(0)
    tokens, hidden, inter, experts, top_k = 37, 64, 32, 6, 2
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.1).to(dtype)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 5] = -30  # one expert no token picks: an empty segment
    weights, ids = route(logits, top_k, renormalize=True)
    expected = naive_expert_mlp(x, weights, ids, w13, w2, "silu")
    got = expert_mlp(x, weights, ids, w13, w2, "silu", method=method)
    assert relative_error(got, expected) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_routing_follows_each_family():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = route(logits, 2, renormalize=True)  # Mixtral: the softmax over the top-k logits
    assert ids.tolist() == [[1, 2]]
    assert torch.allclose(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))
    weights, _ = route(logits, 2, renormalize=False)   # Qwen3-MoE without norm_topk_prob
    assert torch.allclose(weights, torch.softmax(logits, -1)[:, [1, 2]])


def hub_style(**changes):
    return {**TINY, **changes}


def test_gemma_configs_without_layer_types_use_the_family_pattern():
    gemma2 = ModelArgs.from_hf(hub_style(model_type="gemma2", num_hidden_layers=4, sliding_window=16))
    assert gemma2.layer_windows == (16, None, 16, None)
    # Gemma 3 as the hub's configs were first written: a window pattern, a local base, linear scaling.
    gemma3 = ModelArgs.from_hf(hub_style(model_type="gemma3_text", num_hidden_layers=7, sliding_window=32,
                                         sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4,
                                         rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert gemma3.layer_windows == (32,) * 5 + (None, 32)
    assert gemma3.layer_rope == ("local",) * 5 + ("global", "local")
    assert (gemma3.rope_theta, gemma3.local_rope_theta, gemma3.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    assert gemma3.local_rope_scaling is None and gemma3.qk_norm and gemma3.tie_word_embeddings


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gemma2", layer_types=["sliding_attention"]), "layer_types must list"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(model_type="gemma2", hidden_activation="relu"), "hidden_activation 'relu' is not supported"),
    (dict(model_type="qwen3", hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(model_type="gemma2", rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope type 'yarn'"),
    (dict(model_type="llama", rope_scaling={"rope_type": "longrope", "factor": 2.0}), "rope type 'longrope'"),
    (dict(model_type="phi3", rope_scaling={"type": "su", "short_factor": [1.0] * 3, "long_factor": [1.0] * 8}),
     r"rope_scaling.short_factor must be a list of 8 positive numbers"),
    (dict(model_type="mixtral", num_local_experts=2, num_experts_per_tok=3), "num_experts_per_tok \\(3\\) exceeds"),
    (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=2), "missing field 'moe_intermediate_size'"),
    (dict(model_type="gemma2", final_logit_softcapping=-1.0), "final_logit_softcapping must be a finite number > 0"),
])
def test_a_bad_family_field_is_named(changes, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hub_style(**changes)))
    with pytest.raises(ValueError, match=message) as error:
        load_model(tmp_path)
    assert "config.json" in str(error.value)


def test_longrope_factor_choice(tmp_path):
    rope = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8}
    long_context = hub_style(model_type="phi3", rope_scaling=rope, original_max_position_embeddings=64)
    assert ModelArgs.from_hf(long_context).rope_scaling["uses"] == "long_factor"
    assert ModelArgs.from_hf(long_context, rope_factors="short").rope_scaling["uses"] == "short_factor"
    same = ModelArgs.from_hf({**long_context, "original_max_position_embeddings": 256})
    assert same.rope_scaling["uses"] == "short_factor" and same.rope_attention_factor == 1.0
