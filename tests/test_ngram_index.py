"""Prompt lookup's incremental n-gram index finds what a backward scan finds: the tokens after
the latest earlier occurrence of the longest suffix (n <= max_ngram), as the sequence grows
by one or several tokens at a time."""
import random

import pytest

from pagedlm.speculative.ngram import NgramIndex


def scan(tokens, max_ngram, count):
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == suffix:
                return tokens[start + n:start + n + count]
    return []


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_ngram", [1, 2, 3, 5])
def test_index_equals_a_backward_scan(seed, max_ngram):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 11])
    tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
    index = NgramIndex(max_ngram)
    for _ in range(60):
        count = rng.randrange(1, 6)
        index.extend(tokens)
        assert index.lookup(tokens, count) == scan(tokens, max_ngram, count), tokens
        tokens += [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]


def test_no_match_and_a_single_token():
    index, tokens = NgramIndex(3), [7]
    index.extend(tokens)
    assert index.lookup(tokens, 4) == []
    tokens += [1, 2, 3]
    index.extend(tokens)
    assert index.lookup(tokens, 4) == []
    tokens += [1, 2]
    index.extend(tokens)
    assert index.lookup(tokens, 4) == [3, 1, 2]
