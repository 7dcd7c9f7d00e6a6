"""Lookahead decoding (Fu et al. 2024), batched: per sequence a 2-D Jacobi window of N-1
levels by W columns and a pool of n-grams harvested from it; each step verifies up to G
pool n-grams that start with the last token, all in the same forward as the window."""
import random
import zlib

from pagedlm.speculative.draft import Draft, Proposer


class LookaheadProposer(Proposer):
    """Window token (l, j) sits at position last + 1 + l + j and attends to level 0 up to column
    j, then to column j up to level l: a contiguous chain of positions, so the window is a tree
    rooted at the last token. The candidates form a trie under the same root. The outputs of
    the last level are the window's next level, and each column yields the n-gram
    window[0][j], ..., window[N-2][j], output[j] of consecutive positions. With
    pool_from_prompt, the sequence's own n-grams join the pool too (the prompt's at the first
    step, then those each committed token ends): text repeats itself, so these are often the
    best guesses."""

    def __init__(self, window, ngram, guesses, pool_from_prompt=True):
        self.W, self.N, self.G = window, ngram, guesses
        self.pool_from_prompt = pool_from_prompt
        # Level 0 is a chain from the last token (-1); level l > 0 continues column j of level l - 1.
        self.window_parents = [j - 1 if level == 0 else (level - 1) * self.W + j
                               for level in range(self.N - 1) for j in range(self.W)]
        self.verification_bounds = (0, 1 + self.G * (self.N - 1))  # a trie of G branches of N - 1 tokens
        self.windows = {}  # seq -> N-1 levels of W tokens
        self.pools = {}    # seq -> {first token: {continuation (N-1 tokens): None}, newest last}
        self.pooled = {}   # seq -> how many of its tokens have ended an n-gram added to its pool

    def propose(self, seqs, caps):
        drafts = {}
        for seq, cap in zip(seqs, caps):
            if seq not in self.windows:
                self.windows[seq] = self._initial_window(seq)
            if self.pool_from_prompt:
                self._pool_context(seq)
            window = self.windows[seq]
            tokens = [t for level in window for t in level]
            parents = list(self.window_parents)
            trie = {}  # (parent extra index, token) -> extra index; shared prefixes verify once
            for continuation in self._continuations(seq):
                parent = -1
                for token in continuation[:cap]:
                    if (parent, token) not in trie:
                        trie[parent, token] = len(tokens)
                        tokens.append(token)
                        parents.append(parent)
                    parent = trie[parent, token]
            drafts[seq] = Draft(tokens, parents, candidates=sorted(trie.values()))
        return drafts

    def draft_size(self, seq, cap):
        """The tokens seq's draft is expected to hold: its window, and a branch for each pooled
        continuation of its last token (fewer where they share a prefix; more if the tokens it
        committed since its last draft add some, and then the speculator may drop the draft)."""
        return self.W * (self.N - 1) + len(self._continuations(seq)) * min(self.N - 1, cap)

    def _continuations(self, seq):
        """The pooled continuations of seq's last token, oldest first."""
        return self.pools.get(seq, {}).get(seq.last_token, ())

    def update(self, seq, draft, row_argmax, accepted):
        """row_argmax: the model's greedy token at the last token and at every extra (window first)."""
        size = self.W * (self.N - 1)
        outputs = row_argmax[1 + size - self.W:1 + size]  # the last level's
        window = self.windows[seq]
        for j, column in enumerate(zip(*window)):
            self._add(seq, column + (outputs[j],))
        self.windows[seq] = window[1:] + [outputs]

    def _add(self, seq, gram):
        """gram (a tuple) joins the pool as the newest continuation of its first token; past G,
        the oldest goes (an insertion-ordered dict: an LRU set)."""
        known = self.pools.setdefault(seq, {}).setdefault(gram[0], {})
        known.pop(gram[1:], None)
        known[gram[1:]] = None
        if len(known) > self.G:
            del known[next(iter(known))]

    def _pool_context(self, seq):
        """The n-grams ending at the sequence's tokens not yet pooled (at first, the prompt's)."""
        done, end = self.pooled.get(seq, 0), len(seq)
        first = max(done, self.N - 1)  # where the first new n-gram ends
        if first < end:
            tokens = tuple(seq.token_range(first - self.N + 1, end))
            for start in range(end - first):
                self._add(seq, tokens[start:start + self.N])
        self.pooled[seq] = end

    def forget(self, seq):
        self.windows.pop(seq, None)
        self.pools.pop(seq, None)
        self.pooled.pop(seq, None)

    def _initial_window(self, seq):
        # Random prompt tokens, as the paper starts, seeded by the content so that a sampled
        # request's drafts, and so its tokens, do not depend on the batch.
        rng = random.Random(zlib.crc32(str((seq.prompt, seq.index)).encode()))
        return [[rng.choice(seq.prompt) for _ in range(self.W)] for _ in range(self.N - 1)]
