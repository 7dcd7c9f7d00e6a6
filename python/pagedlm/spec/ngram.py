"""Prompt-lookup drafting: find the most recent earlier occurrence of the sequence's last n
tokens (n from max_ngram down to 1) and propose the tokens that followed it. No draft model;
a deterministic draft, so sampled requests verify it with a one-hot q."""
from pagedlm.spec.draft import Draft


class NgramProposer:
    def __init__(self, num_tokens, max_ngram):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram

    def propose(self, seqs, caps):
        drafts = {}
        for seq, cap in zip(seqs, caps):
            tokens = lookup(seq.tokens, self.max_ngram, min(cap, self.num_tokens))
            if tokens:
                drafts[seq] = Draft(tokens)
        return drafts

    def update(self, seq, draft, row_argmax, accepted):
        pass

    def forget(self, seq):
        pass


def lookup(tokens, max_ngram, count):
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + count]
    return []
