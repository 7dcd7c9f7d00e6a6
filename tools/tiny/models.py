"""Model shapes: a Llama of a given width and depth on the corpus tokenizer, its exact parameter
count (the convention of pagedlm.scaling.count_params: every parameter, the tied embedding once)
and its training FLOPs 6*N*D (pagedlm.scaling.training_flops, method "6ND")."""
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    d_model: int
    layers: int

    @property
    def heads(self):
        return max(1, self.d_model // 64)

    @property
    def d_ff(self):
        return 32 * round(8 * self.d_model / 3 / 32)  # SwiGLU at 8/3 d: as many weights as a 4d MLP

    def params(self, vocab):
        """All parameters with tied embeddings: equals sum(p.numel()) of the built model."""
        d = self.d_model
        per_layer = 4 * d * d + 3 * d * self.d_ff + 2 * d  # q, k, v, o; gate, up, down; two RMSNorms
        return vocab * d + self.layers * per_layer + d

    def non_embedding_params(self, vocab):
        return self.params(vocab) - vocab * self.d_model

    def name(self):
        return f"d{self.d_model}-l{self.layers}"


def llama_config(shape, vocab, seq_len, eot_id=0):
    """A transformers LlamaConfig (MHA, head dim 64 or d_model when narrower, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=shape.d_model, intermediate_size=shape.d_ff,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.heads, max_position_embeddings=seq_len, rms_norm_eps=1e-5,
                       tie_word_embeddings=True, bos_token_id=eot_id, eos_token_id=eot_id,
                       attn_implementation="sdpa")


def training_flops(n_params, tokens):
    return 6.0 * n_params * tokens
