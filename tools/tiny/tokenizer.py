"""A byte-level BPE tokenizer trained on the corpus, and the corpus as one token stream per split
with the end-of-text token between files."""
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE (GPT-2's pre-tokenizer and byte alphabet, so any text round-trips) with
    EOT as id 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    if tokenizer.token_to_id(EOT) != 0:
        raise RuntimeError(f"tokenizer: {EOT} got id {tokenizer.token_to_id(EOT)}, expected 0")
    return tokenizer


def encode_stream(tokenizer, texts, chunk=1024):
    """All texts as one uint16 array, each followed by EOT. encode_batch runs on every core."""
    if tokenizer.get_vocab_size() > 2**16:
        raise ValueError(f"tokenizer: vocabulary of {tokenizer.get_vocab_size()} does not fit uint16")
    eot = tokenizer.token_to_id(EOT)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # no offsets: faster, when present
    parts = []
    for start in range(0, len(texts), chunk):
        for enc in encode(texts[start:start + chunk], add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.uint16))
            parts.append(np.array([eot], dtype=np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)
