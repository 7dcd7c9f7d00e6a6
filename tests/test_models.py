"""Llama-family models on pagedlm's paged cache against transformers: tiny random Llama
(llama3 rope scaling; tied embeddings), Mistral (sliding window shorter than the prompt)
and Qwen2 (q/k/v biases) are saved with save_pretrained, loaded by pagedlm, and the logits
of a packed two-sequence prefill and of every decode step must match transformers' own."""
import json

import pytest
import torch

import pagedlm
from pagedlm.models import AttentionBatch, load_model, random_model

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)

FAMILIES = {
    "llama3": (transformers.LlamaConfig, dict(rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "llama-tied": (transformers.LlamaConfig, dict(tie_word_embeddings=True)),
    "mistral-window": (transformers.MistralConfig, dict(sliding_window=7)),
    "qwen2-bias": (transformers.Qwen2Config, dict()),
}


def build(family, folder, shard=False):
    config_class, extra = FAMILIES[family]
    config = config_class(**TINY, **extra)
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # biases and norms are zero / one at init: make them matter
        for name, p in reference.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    reference.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB" if shard else "5GB")
    return reference


class Runner:
    """Drives the model the way the engine will: the block manager assigns slots."""

    def __init__(self, model, num_blocks=64, block_size=4):
        self.model, self.bm = model, pagedlm.BlockManager(num_blocks, block_size)
        self.caches = model.make_kv_caches(num_blocks, block_size)

    def step(self, new_tokens):
        """new_tokens: {seq_id: [tokens]}; returns {seq_id: logits [len(tokens), vocab]}."""
        ids, positions, counts = [], [], []
        for seq, tokens in new_tokens.items():
            start = self.bm.num_tokens(seq) if seq in self.bm else 0
            if seq in self.bm:
                self.bm.append(seq, tokens)
            else:
                self.bm.allocate(seq, tokens)
            ids += tokens
            positions += range(start, start + len(tokens))
            counts.append(len(tokens))
        seqs = list(new_tokens)
        cu = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
        batch = AttentionBatch(
            slot_mapping=torch.from_numpy(self.bm.slot_mapping(seqs, counts)),
            block_tables=torch.from_numpy(self.bm.block_tables(seqs)),
            seq_lens=torch.tensor([self.bm.num_tokens(s) for s in seqs], dtype=torch.int32),
            cu_seqlens_q=cu, decode_only=all(c == 1 for c in counts))
        logits = self.model(torch.tensor(ids), torch.tensor(positions), batch, self.caches)
        return {s: logits[cu[i]:cu[i + 1]] for i, s in enumerate(seqs)}


def relative_error(ours, ref):
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_steps_match(runner, reference, prompts, *, steps, label):
    """A packed prefill of `prompts` ({seq: token ids}) and then `steps` decode steps, each
    sequence taking its greedy token in one batch: every step's logits within 1e-4 relative of
    the transformers `reference` over the whole sequence so far."""
    sequences = {s: list(p) for s, p in prompts.items()}
    logits = runner.step(prompts)
    for step in range(steps):
        for s, tokens in sequences.items():
            with torch.no_grad():
                expected = reference(torch.tensor([tokens])).logits[0]
            ours = logits[s]
            assert relative_error(ours, expected[-len(ours):]) < 1e-4, (label, step, s)
        next_tokens = {s: [int(logits[s][-1].argmax())] for s in sequences}
        for s, t in next_tokens.items():
            sequences[s] += t
        logits = runner.step(next_tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_prefill_and_decode_logits_match_transformers(family, tmp_path):
    reference = build(family, tmp_path, shard=family == "llama-tied")
    model = load_model(tmp_path)
    runner = Runner(model)
    generator = torch.Generator().manual_seed(1)
    prompts = {0: torch.randint(97, (23,), generator=generator).tolist(),
               1: torch.randint(97, (9,), generator=generator).tolist()}
    assert_steps_match(runner, reference, prompts, steps=6, label=family)


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    build("llama-tied", tmp_path, shard=True)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    load_model(tmp_path)


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        load_model(tmp_path)


def test_random_model_from_a_transformers_config_is_seeded():
    config = transformers.LlamaConfig(**TINY)
    a, b = random_model(config, seed=3), random_model(config, seed=3)
    c = random_model(config, seed=4)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
