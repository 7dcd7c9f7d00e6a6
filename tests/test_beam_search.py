"""LLM.beam_search equals a plain, unbatched beam search over transformers' logits (the same
selection rule, written for clarity: every beam recomputed from scratch each step), shares
KV blocks between beams, frees every beam, and gives the same beams when the cache is so
small that prompts are searched in several waves."""
import math

import pytest
import torch

from pagedlm import LLM, BeamSearchParams
from pagedlm.beam_search import Beam, beam_score

from llama_checkpoint import save_llama

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, eos_token_id=2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("beam")
    return folder, save_llama(folder, TINY)


def reference_beam_search(model, prompt, width, max_tokens, length_penalty, ignore_eos, eos=2):
    """[(tokens, cum_logprob, finished)], best first."""
    beams, completed = [(list(prompt), 0.0)], []
    for _ in range(max_tokens):
        candidates = []
        for tokens, cum in beams:
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1].float(), -1)
            top = torch.topk(logprobs, 2 * width)
            candidates += [(cum + lp, tokens, t) for lp, t in zip(top.values.tolist(), top.indices.tolist())]
        candidates.sort(key=lambda c: c[0], reverse=True)
        beams = []
        for cum, tokens, token in candidates:
            if token == eos and not ignore_eos:
                completed.append((tokens + [token], cum, True))
            elif len(beams) < width:
                beams.append((tokens + [token], cum))
    everything = completed + [(t, c, False) for t, c in beams]

    def score(beam):
        tokens, cum, finished = beam
        return cum / (len(tokens) - (finished and tokens[-1] == eos)) ** length_penalty
    return sorted(everything, key=score, reverse=True)[:width]


PROMPTS = [[5, 17, 33, 2, 9], [40, 41], list(range(10, 31))]


@pytest.mark.parametrize("width, length_penalty, ignore_eos", [(4, 1.0, False), (3, 0.5, True), (1, 1.0, True)])
def test_equals_a_reference_beam_search_over_transformers_logits(checkpoint, width, length_penalty, ignore_eos):
    folder, model = checkpoint
    params = BeamSearchParams(beam_width=width, max_tokens=7, length_penalty=length_penalty, ignore_eos=ignore_eos)
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=128)
    outputs = llm.beam_search(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        expected = reference_beam_search(model, prompt, width, 7, length_penalty, ignore_eos)
        assert [o.token_ids for o in out.outputs] == [tokens[len(prompt):] for tokens, _, _ in expected]
        assert [o.finish_reason for o in out.outputs] == ["stop" if f else "length" for _, _, f in expected]
        for o, (_, cum, _) in zip(out.outputs, expected):
            assert math.isclose(o.cumulative_logprob, cum, rel_tol=1e-4, abs_tol=1e-4)
        if width > 1:
            assert out.metrics["kv_memory_saved"] > 0.2
    assert llm.block_manager.stats()["used_blocks"] == 0


def test_a_small_cache_searches_in_waves_with_the_same_beams(checkpoint):
    folder, _ = checkpoint
    params = BeamSearchParams(beam_width=4, max_tokens=6)
    roomy = LLM(folder, device="cpu", block_size=4, num_blocks=128).beam_search(PROMPTS, params)
    small = LLM(folder, device="cpu", block_size=4, num_blocks=40)
    assert [[o.token_ids for o in r.outputs] for r in small.beam_search(PROMPTS, params)] == \
        [[o.token_ids for o in r.outputs] for r in roomy]
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        small.beam_search([list(range(1, 90))], params)


def test_bad_params_name_the_field():
    for kwargs, field in [(dict(beam_width=0, max_tokens=4), "beam_width"), (dict(beam_width=2, max_tokens=0),
                                                                             "max_tokens")]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**kwargs)


def test_a_penalty_past_floats_range_scores_the_limit():
    """length ** length_penalty overflows (or rounds to 0) for a penalty of a few hundred: the
    score is the quotient's limit, and a search with such a penalty runs."""
    beam = Beam(0, [1] * 7, -3.5)
    assert beam_score(beam, 1.0) == -0.5
    assert beam_score(beam, 400.0) == 0.0 and math.copysign(1, beam_score(beam, 400.0)) == -1
    assert beam_score(beam, -400.0) == -math.inf
    assert beam_score(Beam(0, [1] * 7, 0.0), -400.0) == 0.0


@pytest.mark.parametrize("length_penalty", [400.0, -400.0, 1e300])
def test_a_search_with_an_extreme_length_penalty_returns_its_beams(checkpoint, length_penalty):
    folder, _ = checkpoint
    llm = LLM(folder, device="cpu", block_size=4, num_blocks=128)
    out = llm.beam_search(PROMPTS[:2], BeamSearchParams(beam_width=3, max_tokens=4, length_penalty=length_penalty))
    assert [len(o.outputs) for o in out] == [3, 3]
    assert llm.block_manager.stats()["used_blocks"] == 0
