"""Tiny random checkpoints of each supported model family, built and saved by transformers,
shared by the CPU tests (test_model_families.py) and the GPU tests
(test_model_families_gpu.py). Windows are short (8-12 tokens) so that the prompts pass them."""
import torch

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-5)
# On the GPU: a head size the CUDA attention kernels are built for.
GPU_TINY = {**TINY, "hidden_size": 256, "head_dim": 64, "intermediate_size": 192}


def _longrope(half, seed):
    g = torch.Generator().manual_seed(seed)
    return [round(float(f), 4) for f in 1 + 3 * torch.rand(half, generator=g)]


def families(transformers, head_dim=TINY["head_dim"]):
    """{name: (config class, model class, fields beyond TINY, shortest prompt)}."""
    t = transformers
    half = head_dim // 2
    return {
        # Layer 0 global, layers 1-2 with an 8-token window (max_window_layers).
        "qwen3": (t.Qwen3Config, t.Qwen3ForCausalLM,
                  dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), 1),
        # Sliding (8), global, sliding; attention and final soft caps small enough to bite.
        "gemma2": (t.Gemma2Config, t.Gemma2ForCausalLM,
                   dict(sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
                        final_logit_softcapping=2.5), 1),
        # Two local layers (base 10^4), a global one (base 10^6, linear scaling by 8).
        "gemma3": (t.Gemma3TextConfig, t.Gemma3ForCausalLM,
                   dict(sliding_window=8, query_pre_attn_scalar=16, final_logit_softcapping=2.5,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), 1),
        # LongRoPE with a 32-token original context: every prompt is longer, so transformers uses
        # the long factors throughout, as pagedlm does for a model whose context exceeds it.
        "phi3-longrope": (t.Phi3Config, t.Phi3ForCausalLM,
                          dict(sliding_window=12, original_max_position_embeddings=32, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2,
                               rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                "short_factor": _longrope(half, 1), "long_factor": _longrope(half, 2)}), 33),
        # Phi-4-mini's layout: half of each head rotated.
        "phi3-partial": (t.Phi3Config, t.Phi3ForCausalLM,
                         dict(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.5}), 1),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM,
                    dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=12), 1),
        # Layer 1 dense (mlp_only_layers); top-k weights not renormalised.
        "qwen3-moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM,
                      dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False,
                           mlp_only_layers=[1]), 1),
        "qwen3-moe-norm": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM,
                           dict(num_experts=5, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                                num_hidden_layers=2), 1),
    }


def build(transformers, family, folder, *, dtype=torch.float32, seed=0, dims=TINY):
    """The family's tiny transformers model with seeded random weights, saved to folder; returns
    it in eval mode (eager attention: the path that applies soft caps and windows exactly)."""
    config_class, model_class, extra, _ = families(transformers, dims["head_dim"])[family]
    config = config_class(**{**dims, **extra})
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # zero or one at init: make them matter
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("gate.weight"):  # routers: decisive, so no near-tie flips an expert
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(folder)
    model.config._attn_implementation = "eager"
    return model.to(dtype)


def checkpoint_cache(transformers, tmp_path_factory, dims=TINY):
    """get(family) -> (folder, transformers model): each family's checkpoint built once, on first use."""
    made = {}

    def get(family):
        if family not in made:
            folder = tmp_path_factory.mktemp(family)
            made[family] = folder, build(transformers, family, folder, dims=dims)
        return made[family]
    return get


def assert_choices_near_best(reference, prompt, chosen):
    """Each token pagedlm chose after prompt is within bf16 tolerance of the best under the
    transformers reference's logits for the same prefix (bf16 may flip a near-tie, so choices
    are compared, not sequences). Returns those steps' logits, float32 [len(chosen), vocab]."""
    device = next(reference.parameters()).device
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + chosen], device=device)).logits[0].float()
    steps = logits[len(prompt) - 1:-1]
    picked = steps.gather(-1, torch.tensor(chosen, device=device)[:, None]).squeeze(-1)
    tolerance = 0.03 * steps.abs().amax(-1) + 0.02
    assert bool((picked >= steps.amax(-1) - tolerance).all())
    return steps


def prompts(count, vocab, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(vocab, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(count)]
