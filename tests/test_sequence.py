"""Sequence.token_range: the slice of prompt + output the engine reads every step, without
building the whole list."""
from hypothesis import given
from hypothesis import strategies as st

from pagedlm.engine.sequence import SamplingParams, Sequence

tokens = st.lists(st.integers(0, 99), max_size=8)


@given(tokens.filter(bool), tokens, st.integers(0, 20), st.integers(0, 20))
def test_token_range_equals_slicing_the_whole_sequence(prompt, output, start, length):
    seq = Sequence(0, "r", 0, prompt, SamplingParams())
    seq.output = output
    assert seq.token_range(start, start + length) == (prompt + output)[start:start + length]
