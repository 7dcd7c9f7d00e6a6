"""Jacobi decoding (Santilli et al. 2023): keep a window of guessed next tokens per sequence
and verify it as a draft chain. The model's greedy outputs at the window's positions become
the next guesses, so each step is one Jacobi iteration; a guess prefix that already equals
the model's own continuation (the part at its fixed point) is accepted."""
from pagedlm.speculative.draft import ChainProposer, Draft


class JacobiProposer(ChainProposer):
    def __init__(self, num_tokens):
        self.num_tokens = num_tokens
        self.guesses = {}  # seq -> the window carried over from its previous step

    def propose(self, seqs, caps):
        drafts = {}
        for seq, cap in zip(seqs, caps):
            window = self.guesses.get(seq, [])
            # A fresh window starts as copies of the last token: any guess is lossless.
            window = (window + [seq.last_token] * self.num_tokens)[:min(cap, self.num_tokens)]
            if window:
                drafts[seq] = Draft(window)
        return drafts

    def update(self, seq, draft, row_argmax, accepted):
        """row_argmax: the model's greedy token at the last token and at each guess; accepted:
        guesses accepted. The outputs past the correction guess the positions after it."""
        self.guesses[seq] = row_argmax[accepted + 1:len(draft.tokens) + 1]

    def forget(self, seq):
        self.guesses.pop(seq, None)
