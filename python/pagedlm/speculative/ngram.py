"""Prompt-lookup drafting: find the most recent earlier occurrence of the sequence's last n
tokens (n from max_ngram down to 1) and propose the tokens that followed it. No draft model;
a deterministic draft, so sampled requests verify it with a one-hot q.

Each sequence keeps an index from every n-gram (n <= max_ngram) to where the tokens after its
latest occurrence start, extended by the tokens added since the last step, so a lookup costs
O(max_ngram) however long the sequence (a scan would cost its length, every step)."""
from pagedlm.speculative.draft import ChainProposer, Draft


class NgramProposer(ChainProposer):
    def __init__(self, num_tokens, max_ngram):
        self.num_tokens, self.max_ngram = num_tokens, max_ngram
        self.indexes = {}  # seq -> NgramIndex

    def propose(self, seqs, caps):
        drafts = {}
        for seq, cap in zip(seqs, caps):
            index = self.indexes.get(seq)
            if index is None:
                index = self.indexes[seq] = NgramIndex(self.max_ngram)
            tokens = seq.tokens
            index.extend(tokens)
            draft = index.lookup(tokens, min(cap, self.num_tokens))
            if draft:
                drafts[seq] = Draft(draft)
        return drafts

    def forget(self, seq):
        self.indexes.pop(seq, None)


class NgramIndex:
    """For n = 1 .. max_ngram: n-gram -> the position after its latest occurrence that has a
    token after it (so never the sequence's own suffix)."""

    def __init__(self, max_ngram):
        self.max_ngram = max_ngram
        self.after = [{} for _ in range(max_ngram + 1)]  # after[n][gram]
        self.done = 0  # n-grams ending before position done - 1 ... are indexed: ends e < done

    def extend(self, tokens):
        """Indexes the n-grams ending at positions done .. len(tokens) - 2."""
        for end in range(self.done, len(tokens) - 1):
            for n in range(1, min(self.max_ngram, end + 1) + 1):
                self.after[n][tuple(tokens[end - n + 1:end + 1])] = end + 1
        self.done = max(self.done, len(tokens) - 1)

    def lookup(self, tokens, count):
        """The tokens after the latest earlier occurrence of the longest suffix found."""
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            start = self.after[n].get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start:start + count]
        return []

