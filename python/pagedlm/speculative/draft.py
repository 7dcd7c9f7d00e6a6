"""What every speculative method shares: Draft (the extra tokens proposed for one sequence) and
the Proposer interface the speculator calls."""
from dataclasses import dataclass

import torch


@dataclass
class Draft:
    """Extra tokens to verify after a sequence's last token.

    parents None: a chain, tokens[i] following tokens[i-1]. Else a tree: parents[i] is the index
    of token i's parent (-1 = the sequence's last token), always an earlier one. candidates:
    the extras forming the verification tree (None = all); other extras are computed for the
    proposer only (lookahead's window). probs: for a chain sampled from a distribution q,
    float32 [len(tokens), vocab]; None = deterministic (one-hot q).
    """
    tokens: list
    parents: list | None = None
    candidates: list | None = None
    probs: torch.Tensor | None = None


class Proposer:
    """A speculative method: propose(seqs, caps) -> {seq: Draft}, draft_size(seq, cap), and
    update(seq, draft, row_argmax, accepted) after each verification; forget(seq) drops what
    it keeps for a sequence. verification_bounds: (longest chain drafted, most nodes of a
    verification tree, root included), the shapes its steps verify."""
    verification_bounds = (0, 0)
    captures = 0  # CUDA graphs it captured (a draft model's)

    def update(self, seq, draft, row_argmax, accepted):
        pass


class ChainProposer(Proposer):
    """A proposer of chains of at most num_tokens tokens (n-gram, Jacobi, draft model)."""

    @property
    def verification_bounds(self):
        return self.num_tokens, 0

    def draft_size(self, seq, cap):
        """The tokens seq's draft will hold, at most, when it may take `cap` more (the speculator
        proposes only for the sequences whose drafts fit the step)."""
        return min(cap, self.num_tokens)
