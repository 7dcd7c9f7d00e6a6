"""The new model families on the GPU (run on a GPU machine: `pytest -m gpu
tests/test_model_families_gpu.py`): bf16 logits of a packed prefill and of decode steps close to
transformers' own bf16 forward, greedy choices transformers' bf16 logits agree with, and
CUDA-graph decode equal to eager decode, for each family (tests/model_families.py)."""
import pytest
import torch

from pagedlm import LLM, SamplingParams
from pagedlm.models import AttentionBatch, load_model

from model_families import GPU_TINY, assert_choices_near_best, checkpoint_cache, families, prompts
from test_models import Runner

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.gpu
FAMILIES = families(transformers, GPU_TINY["head_dim"])
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> its GPU-sized checkpoint's folder, each built once for the module."""
    get = checkpoint_cache(transformers, tmp_path_factory, dims=GPU_TINY)
    return lambda family: get(family)[0]


def reference_model(folder, family, dtype):
    _, model_class, _, _ = FAMILIES[family]
    return model_class.from_pretrained(folder, dtype=dtype, attn_implementation="eager").to("cuda").eval()


def family_prompts(family, count, seed, extra=24):
    low = max(FAMILIES[family][3], 14)
    return prompts(count, GPU_TINY["vocab_size"], low, low + extra, seed=seed)


class CudaRunner(Runner):
    """test_models.Runner with the batch's tensors on the GPU."""

    def step(self, new_tokens):
        ids, positions, counts = [], [], []
        for seq, tokens in new_tokens.items():
            start = self.bm.num_tokens(seq) if seq in self.bm else 0
            (self.bm.append if seq in self.bm else self.bm.allocate)(seq, tokens)
            ids += tokens
            positions += range(start, start + len(tokens))
            counts.append(len(tokens))
        seqs = list(new_tokens)
        cu = [0, *torch.tensor(counts).cumsum(0).tolist()]
        batch = AttentionBatch(
            slot_mapping=torch.from_numpy(self.bm.slot_mapping(seqs, counts)).cuda(),
            block_tables=torch.from_numpy(self.bm.block_tables(seqs)).cuda(),
            seq_lens=torch.tensor([self.bm.num_tokens(s) for s in seqs], dtype=torch.int32, device="cuda"),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device="cuda"), decode_only=all(c == 1 for c in counts))
        logits = self.model(torch.tensor(ids, device="cuda"), torch.tensor(positions, device="cuda"), batch,
                            self.caches)
        return {s: logits[cu[i]:cu[i + 1]] for i, s in enumerate(seqs)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_logits_as_close_to_f32_as_transformers_bf16(family, checkpoints):
    """Prefill and 4 decode steps in bf16: each implementation rounds differently, so pagedlm's
    logits are measured against transformers' f32 logits and must be about as close as
    transformers' own bf16 logits are (within 1.5x, plus 0.005 for rounding noise)."""
    folder = checkpoints(family)
    reference, truth = (reference_model(folder, family, dtype) for dtype in (torch.bfloat16, torch.float32))
    model = load_model(folder, dtype=torch.bfloat16, device="cuda")
    runner = CudaRunner(model, num_blocks=128, block_size=4)
    sequences = dict(enumerate(family_prompts(family, 2, seed=1)))
    logits = runner.step({s: list(p) for s, p in sequences.items()})
    for step in range(5):
        for s, tokens in sequences.items():
            with torch.no_grad():
                ids = torch.tensor([tokens], device="cuda")
                exact, theirs = truth(ids).logits[0].float(), reference(ids).logits[0].float()
            ours = logits[s].float()
            exact, theirs = exact[-len(ours):], theirs[-len(ours):]
            our_error = ((ours - exact).norm() / exact.norm()).item()
            their_error = ((theirs - exact).norm() / exact.norm()).item()
            assert our_error <= 1.5 * their_error + 0.005, (family, step, s, our_error, their_error)
        next_tokens = {s: [int(logits[s][-1].argmax())] for s in sequences}
        for s, t in next_tokens.items():
            sequences[s] += t
        logits = runner.step(next_tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_greedy_choices_agree_with_transformers_logits(family, checkpoints):
    """bf16 may flip a near-tie, so each chosen token must be within tolerance of the best under
    transformers' bf16 logits for the same prefix."""
    folder = checkpoints(family)
    reference = reference_model(folder, family, torch.bfloat16)
    batch = family_prompts(family, 5, seed=2)
    llm = LLM(folder, device="cuda", dtype=torch.bfloat16, block_size=4, num_blocks=1024, max_num_batched_tokens=32)
    for prompt, out in zip(batch, llm.generate(batch, GREEDY, use_tqdm=False)):
        assert_choices_near_best(reference, prompt, out.outputs[0].token_ids)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cuda_graph_decode_equals_eager(family, dtype, checkpoints):
    """The same forward captured: per-layer windows, soft caps and scales, and the expert
    computation (grouped GEMM, or the dense fallback under capture), replayed."""
    folder = checkpoints(family)
    batch = family_prompts(family, 7, seed=3, extra=60)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = LLM(folder, device="cuda", dtype=dtype, block_size=4, num_blocks=1024, enforce_eager=True)
    graphed = LLM(folder, device="cuda", dtype=dtype, block_size=4, num_blocks=1024, max_num_seqs=16)
    expected = eager.generate(batch, params, use_tqdm=False)
    got = graphed.generate(batch, params, use_tqdm=False)
    assert graphed.runner.graphs.replays > 0 and eager.runner.graphs is None
    assert [r.outputs[0].token_ids for r in got] == [r.outputs[0].token_ids for r in expected], family
    for a, b in zip(got, expected):
        assert a.outputs[0].cumulative_logprob == pytest.approx(b.outputs[0].cumulative_logprob, abs=1e-2)
