"""The CUDA-graph paths of speculative decoding, run on the CPU: VarlenGraphs (verification,
the draft's catch-up, lookahead's masked forward), VerificationGraphs and DraftChainGraphs
(the greedy draft chain with the argmax fed back), and DecodeGraphs (plain decode steps),
with `capture` replaced by a stand-in whose replay reruns
the forward into the captured output. Their padding (a padding sequence over block 0, empty
sequences, slots -1, spare chain steps) must pass the CPU kernels' strict input checks and
change no token: greedy outputs equal plain decoding's, batched and alone."""
import pytest
import torch

import pagedlm.engine.cuda_graphs as cuda_graphs
import pagedlm.engine.varlen_graphs as varlen_graphs
from pagedlm import LLM, SamplingParams
from pagedlm.engine.sampler import greedy_choices
from pagedlm.engine.varlen_graphs import VarlenGraphs
from pagedlm.speculative.draft_chain import DraftChainGraphs

from graph_stand_in import replay_eagerly
from llama_checkpoint import save_llama
from spec_checks import assert_drafts_take_turns

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
OTHER = dict(TINY, hidden_size=32, intermediate_size=48, num_hidden_layers=1)
GREEDY = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
MAX_SEQS = 8


@pytest.fixture(autouse=True)
def eager_capture(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "capture", replay_eagerly)  # the one capture every graph set goes through


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-graphs")
    folders = {}
    for name, config, seed in (("target", TINY, 0), ("other", OTHER, 1)):
        save_llama(root / name, config, seed)
        folders[name] = root / name
    return folders


def prompts(count, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(97, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist() * 2)[:45]
            for _ in range(count)]


def tokens(outputs):
    return [[o.token_ids for o in r.outputs] for r in outputs]


def engine(models, block_size, speculative=None, **options):
    llm = LLM(models["target"], device="cpu", block_size=block_size, num_blocks=512, max_num_seqs=MAX_SEQS,
              speculative=speculative, **options)
    if speculative is not None:  # the graph objects the GPU engine builds, over the CPU caches
        llm.runner.varlen = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
        proposer = llm.speculator.proposer
        if speculative["method"] == "draft":
            proposer.varlen = VarlenGraphs(proposer.model, proposer.kv_caches, MAX_SEQS, llm.device, None)
            proposer.chain = DraftChainGraphs(proposer.model, proposer.kv_caches, speculative["num_tokens"] - 1,
                                              MAX_SEQS, llm.device, None)
    return llm


METHODS = {
    "draft-same": dict(method="draft", model="target", num_tokens=4, adaptive=False),
    "draft-other": dict(method="draft", model="other", num_tokens=3, adaptive=False),
    "ngram": dict(method="ngram", num_tokens=3, max_ngram=3, adaptive=False),
    "lookahead": dict(method="lookahead", window=4, ngram=3, guesses=3, adaptive=False),
}


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("batch_size", [1, 5])
@pytest.mark.parametrize("name", METHODS)
def test_graph_paths_emit_plain_greedy_tokens(models, name, batch_size, block_size):
    batch = prompts(batch_size)
    expected = tokens(engine(models, block_size).generate(batch, GREEDY, use_tqdm=False))
    config = dict(METHODS[name])
    if "model" in config:
        config["model"] = models[config["model"]]
    llm = engine(models, block_size, config)
    outputs = llm.generate(batch, GREEDY, use_tqdm=False)
    assert tokens(outputs) == expected
    assert llm.runner.varlen.replays > 0, "the target's forward never replayed a graph"
    assert llm.speculator.verification_graphs.graphs, "verification never replayed a graph"
    if name.startswith("draft"):
        assert llm.speculator.proposer.chain.graphs, "the draft chain never replayed a graph"
    if name == "draft-same":  # the draft is the target: every drafted token is accepted
        assert all(o.metrics["acceptance_rate"] == 1.0 for o in outputs)


def test_draft_chain_respects_each_sequences_cap(models):
    """Requests a few tokens from their end draft fewer tokens than k; the chain's spare steps
    must write nothing (a stray KV write would corrupt the draft cache and later drafts)."""
    config = dict(METHODS["draft-same"], model=models["target"])
    batch = prompts(4, seed=5)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (2, 3, 6, 11)]
    expected = tokens(engine(models, 4).generate(batch, params, use_tqdm=False))
    llm = engine(models, 4, config)
    assert tokens(llm.generate(batch, params, use_tqdm=False)) == expected
    assert llm.speculator.proposer.bm.num_free_blocks == llm.speculator.proposer.bm.num_blocks


def test_runner_replays_varlen_graphs_for_a_few_tokens_per_sequence(models):
    """Plain steps in which every sequence brings 2..FEW_TOKENS tokens (here short prompts of
    mixed lengths, as a tree method's recomputed tokens are) replay a few-tokens graph, and emit
    what the eager forward does; a longer prompt in the step makes it a chunks graph's."""
    from pagedlm.engine.runner import FEW_TOKENS
    g = torch.Generator().manual_seed(11)
    short = [torch.randint(97, (n,), generator=g).tolist() for n in (2, FEW_TOKENS, 5)]
    for batch, chunks in ((short, False), (short + [list(range(FEW_TOKENS + 1))], True)):
        expected = tokens(engine(models, 4).generate(batch, GREEDY, use_tqdm=False))
        llm = engine(models, 4)
        llm.runner.varlen = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
        assert tokens(llm.generate(batch, GREEDY, use_tqdm=False)) == expected
        assert llm.runner.varlen.replays > 0
        assert {key[-1] for key in llm.runner.varlen.graphs} == {chunks}  # the graphs' kinds: chunks or not


@pytest.mark.parametrize("budget", [13, 23, 64])
def test_chunks_graphs_emit_the_eager_engines_tokens(models, budget):
    """Prompts of many lengths under a small token budget: prompt chunks join the decodes of the
    running sequences step after step, through chunks graphs (one logits row per sequence, the
    padding sequence after the real ones), and every token equals the eager engine's. A request
    that asks for prompt logprobs sends its steps eagerly, with the same logprobs as eager."""
    g = torch.Generator().manual_seed(5)
    batch = [torch.randint(97, (int(torch.randint(1, 60, (1,), generator=g)),), generator=g).tolist()
             for _ in range(7)]
    params = [GREEDY] * 6 + [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=2)]
    eager = engine(models, 4, max_num_batched_tokens=budget).generate(batch, params, use_tqdm=False)
    llm = engine(models, 4, max_num_batched_tokens=budget)
    llm.runner.varlen = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
    graphed = llm.generate(batch, params, use_tqdm=False)
    assert tokens(graphed) == tokens(eager)
    for a, b in zip(graphed[-1].prompt_logprobs[1:], eager[-1].prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)
    assert llm.runner.varlen.chunk_replays > 0, "no step replayed a chunks graph"
    assert llm.runner.varlen.replays > 0


@pytest.mark.parametrize("split, per_query", [([(9, 1), (5, 3), (0, 7)], True), ([(9, 1), (0, 60)], False)])
def test_varlen_graph_logits_equal_the_eager_forward(models, split, per_query):
    """A mixed batch (a decode, a 3-token draft, a 7-token chunk; or a long chunk) through a
    graph with padding equals the eager forward, row for row (both read the same cache: the
    prefixes' KV is whatever the cache holds, the new tokens' KV is written by each). A few
    tokens per sequence attend as decode queries, many through the prefill kernel."""
    from pagedlm.engine.forward import ForwardItem, paged_forward
    llm = engine(models, 4)
    bm = llm.block_manager
    items = []
    for seq_id, (cached, new) in enumerate(split):
        bm.allocate(seq_id, list(range(cached + new)))
        items.append(ForwardItem(seq_id, list(range(cached, cached + new)), cached, 0, None, list(range(new))))
    graphs = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
    eager = paged_forward(llm.model, llm.kv_caches, bm, llm.device, items).clone()
    graphed, choices = paged_forward(llm.model, llm.kv_caches, bm, llm.device, items, graphs, choices=True)
    assert graphs.captures == 1 and [g.per_query for g in graphs.graphs.values()] == [per_query]
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    # The graph's greedy choices are its logits' (the rows picked by logit_rows, as the logits).
    torch.testing.assert_close(choices, greedy_choices(graphed), rtol=0, atol=0)


def test_mixtures_of_experts_run_prompt_chunks_eagerly(tmp_path):
    """A mixture of experts replays no chunks graph (under a capture its experts may run densely,
    every expert on every token), and emits what the eager engine does."""
    from model_families import build
    build(transformers, "mixtral", tmp_path)
    g = torch.Generator().manual_seed(9)
    batch = [torch.randint(97, (int(n),), generator=g).tolist() for n in (3, 20, 41, 9)]
    options = dict(device="cpu", block_size=4, num_blocks=256, max_num_seqs=MAX_SEQS, max_num_batched_tokens=30)
    expected = tokens(LLM(tmp_path, **options).generate(batch, GREEDY, use_tqdm=False))
    llm = LLM(tmp_path, **options)
    llm.runner.varlen = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
    assert tokens(llm.generate(batch, GREEDY, use_tqdm=False)) == expected
    assert not any(key[-1] for key in llm.runner.varlen.graphs)


@pytest.mark.parametrize("split", [[(9, 1), (5, 1), (0, 30), (3, 1)], [(30, 1), (2, 13)], [(7, 1), (0, 1), (4, 9)]])
def test_decode_rows_equal_the_prefill_of_a_mixed_step(models, split, monkeypatch):
    """A step whose leading sequences decode and whose others bring chunks (a decode after them
    included): its decode rows through the decode kernel (DecodeRows, the prefill seeing them as
    one placeholder sequence), eagerly and through a chunks graph, equal the whole step through
    the prefill kernel, row for row."""
    import pagedlm.engine.forward as forward
    from pagedlm.engine.forward import ForwardItem, paged_forward
    llm = engine(models, 4)
    bm = llm.block_manager
    items = []
    for seq_id, (cached, new) in enumerate(split):
        tokens = [(31 * seq_id + t) % 97 for t in range(cached + new)]  # no two share a cached block
        bm.allocate(seq_id, tokens)
        items.append(ForwardItem(seq_id, tokens[cached:], cached, 0, None, [new - 1]))
    split_eager = paged_forward(llm.model, llm.kv_caches, bm, llm.device, items).clone()
    graphs = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
    graphed = paged_forward(llm.model, llm.kv_caches, bm, llm.device, items, graphs, chunks=True).clone()
    assert graphs.replays == 1 and [key[-1] for key in graphs.graphs] == [True]
    monkeypatch.setattr(forward, "leading_decodes", lambda counts: 0)  # every row through the prefill kernel
    prefill_only = paged_forward(llm.model, llm.kv_caches, bm, llm.device, items)
    torch.testing.assert_close(split_eager, prefill_only, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graphed, prefill_only, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trees", [[(9, [-1, -1, 0, 1, 1]), (5, [-1, 0, 1]), (20, [-1, -1, -1, 2])],
                                   [(1, [-1, 0])]])  # a mask smaller than its padding rows' share
def test_masked_varlen_graph_rows_equal_the_eager_forward(models, trees):
    """Token trees (a custom mask) through a graph whose tokens attend as masked decode queries,
    padding rows included (they attend to nothing, their mask offsets still inside the mask: the
    CPU kernel checks them), equal the eager forward through the masked prefill kernel."""
    from pagedlm.engine.forward import ForwardItem, paged_forward
    llm = engine(models, 4)
    bm = llm.block_manager
    items = []
    for seq_id, (cached, parents) in enumerate(trees):
        n = 1 + len(parents)  # the last committed token, then its tree
        bm.allocate(seq_id, list(range(cached + n)))
        items.append(ForwardItem(seq_id, list(range(cached, cached + n)), cached, len(parents), parents,
                                 list(range(n))))
    graphs = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
    eager = paged_forward(llm.model, llm.kv_caches, bm, llm.device, items).clone()
    graphed = paged_forward(llm.model, llm.kv_caches, bm, llm.device, items, graphs)
    assert [(g.per_query, g.masked_rows) for g in graphs.graphs.values()] == [(True, True)]
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def test_capture_all_takes_every_bucket_a_step_can_meet(models):
    """Up front, every (token bucket, sequence bucket) with room for its sequences; a step's
    forward then finds its graph and captures nothing."""
    from pagedlm.engine.forward import ForwardItem, paged_forward
    from pagedlm.engine.varlen_graphs import TOKEN_BUCKETS
    llm = engine(models, 4)
    graphs = VarlenGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device, None)
    graphs.capture_all(masked=False)
    keys = set(graphs.graphs)
    assert {t for t, _, _, _, _ in keys} == set(TOKEN_BUCKETS)
    assert all(s <= t + 1 and not masked and not chunks for t, s, _, masked, chunks in keys)
    assert graphs.captures == len(keys)
    bm = llm.block_manager
    items = []
    for seq_id in range(5):  # 5 sequences of 3 new tokens
        bm.allocate(seq_id, list(range(7)))
        items.append(ForwardItem(seq_id, [1, 2, 3], 4, 0, None, [2]))
    paged_forward(llm.model, llm.kv_caches, bm, llm.device, items, graphs)
    assert graphs.captures == len(keys) and graphs.replays == 1


def test_item_mask_is_causal_then_ancestors():
    """The tree mask, against its definition: committed rows causal; extra i sees the cached
    prefix, every committed token, itself and its ancestors (random trees, parents first)."""
    import random

    import numpy as np

    from pagedlm.engine.forward import ForwardItem, write_item_mask
    rng = random.Random(0)
    for _ in range(50):
        committed, extras, cached = rng.randrange(1, 4), rng.randrange(0, 9), rng.randrange(0, 7)
        parents = [rng.randrange(-1, i) for i in range(extras)]
        item = ForwardItem(0, [0] * (committed + extras), cached, extras, parents, [])
        seq_len = cached + committed + extras
        mask = np.ones((committed + extras, seq_len), dtype=bool)  # poisoned both ways: every cell written
        write_item_mask(item, mask)
        unpoisoned = np.zeros_like(mask)
        write_item_mask(item, unpoisoned)
        assert (mask == unpoisoned).all()
        for row in range(committed + extras):
            if row < committed:
                seen = set(range(cached + row + 1))
            else:
                seen, node = set(range(cached + committed)), row - committed
                while node >= 0:
                    seen.add(cached + committed + node)
                    node = parents[node]
            assert {int(t) for t in mask[row].nonzero()[0]} == seen


class _Seq:
    def __init__(self, last_token):
        self.params, self.last_token = GREEDY, last_token


@pytest.mark.parametrize("chains, trees", [(3, 0), (0, 5), (1, 1), (2, 5)])
def test_verification_graph_equals_eager_verification(chains, trees, monkeypatch):
    """Greedy chains (ragged) and trees (random shapes) verified by a verification graph, whose
    inputs are padded to its buckets (3 chains of up to 3 drafts run as 4 of 4, 5 trees as 8),
    give the eager verification's verdicts and row choices; past MAX_GATHER_BYTES, the eager one."""
    from types import SimpleNamespace

    from pagedlm.speculative.draft import Draft
    from pagedlm.speculative.verification import Verification, VerificationGraphs
    g = torch.Generator().manual_seed(chains * 10 + trees)
    vocab = 11
    logits = torch.randn(512, vocab, generator=g)
    buffers = SimpleNamespace(logits=logits, choices=greedy_choices(logits), device=torch.device("cpu"), pool=None)
    drafts, spans, row = {}, {}, 0
    for i in range(chains + trees):
        size = int(torch.randint(1, 4 if i < chains else 7, (1,), generator=g))
        parents = None if i < chains else [int(torch.randint(-1, j, (1,), generator=g)) for j in range(size)]
        # Drafts that are mostly the target's argmax, so paths go deep.
        tokens = [int(logits[row + (j if parents is None else parents[j] + 1)].argmax())
                  if torch.rand(1, generator=g) < 0.8 else 0 for j in range(size)]
        seq = _Seq(int(torch.randint(vocab, (1,), generator=g)))
        drafts[seq], spans[seq] = Draft(tokens, parents), (row, size + 1)
        row += size + 1
    rows = logits[:row]
    eager = Verification(drafts, spans, rows.device).accept(rows, greedy_choices(rows))
    graphs = VerificationGraphs(buffers)
    assert graphs.holds(rows)
    verification = Verification(drafts, spans, rows.device, graphs)
    assert verification.shapes[0] == {0: 0, 1: 1, 2: 2, 3: 4}[chains] and verification.shapes[2] == {0: 0, 1: 1, 5: 8}[trees]
    assert verification.accept(rows, None) == eager
    assert verification.row_choices == [tuple(c) for c in greedy_choices(rows).tolist()]
    assert len(graphs.graphs) == 1
    # A graph whose logits gather would be too large is not made: that step verifies eagerly.
    monkeypatch.setattr("pagedlm.speculative.verification.MAX_GATHER_BYTES", 0)
    assert graphs.graph(verification.shapes) is None
    assert Verification(drafts, spans, rows.device, graphs).accept(rows, greedy_choices(rows)) == eager


@pytest.mark.parametrize("name", ["ngram", "lookahead"])
def test_verification_capture_all_takes_every_shape_a_run_meets(models, name):
    """Captured up front from the method's bounds, the verification graphs cover every step of
    a batched run, as sequences finish at different steps: nothing is captured mid-run."""
    config = dict(METHODS[name])
    llm = engine(models, 4, config)
    llm.speculator.capture_graphs(llm.runner.varlen, MAX_SEQS)
    graphs = llm.speculator.verification_graphs
    captured = set(graphs.graphs)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 7, 13, 9, 5)]
    llm.generate(prompts(5), params, use_tqdm=False)
    assert llm.speculator.verification_graphs is graphs and set(graphs.graphs) == captured
    # Sequence buckets 1-8, times draft-length buckets 1-4 (k = 3) or tree-node buckets 1-8 (7 nodes).
    assert len(captured) == 4 * {"ngram": 3, "lookahead": 4}[name]


def test_decode_graphs_emit_the_eager_tokens(models, monkeypatch):
    """DecodeGraphs (plain decode steps) on the CPU, capture replaced as above: batches that
    pad their bucket (5 sequences in the bucket of 8, then fewer as they finish) emit the eager
    decode's tokens; each step's inputs go through the graph set's reused host array."""
    from pagedlm.engine.cuda_graphs import DecodeGraphs
    batch = prompts(5)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 13, 7, 9, 11)]
    expected = tokens(engine(models, 4).generate(batch, params, use_tqdm=False))
    llm = engine(models, 4)
    llm.runner.graphs = graphs = DecodeGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device)
    replays = []
    run = graphs.run
    monkeypatch.setattr(graphs, "run", lambda *args: replays.append(len(args[0])) or run(*args))
    assert tokens(llm.generate(batch, params, use_tqdm=False)) == expected
    assert {5, 4, 3, 2, 1} <= set(replays)  # every bucket met, padded and not


def test_decode_graphs_keep_the_model_dtype_and_sample_as_eager(models, monkeypatch):
    """A bf16 engine's DecodeGraphs return logits in bf16 (the float32 copy is made only when a
    row samples): greedy, sampled, penalized and logprobs requests in one batch emit the eager
    engine's tokens and log-probabilities exactly, the upcast being the same either way."""
    from pagedlm.engine.cuda_graphs import DecodeGraphs
    batch = prompts(4, seed=5)
    # The penalized and logprobs requests end first: the later steps take the plain sampling path.
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=11, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0, repetition_penalty=1.3, max_tokens=4, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=20, logprobs=3, seed=4, max_tokens=4, ignore_eos=True)]

    def run(llm):
        out = llm.generate(batch, params, use_tqdm=False)
        return tokens(out), [[o.cumulative_logprob for o in r.outputs] for r in out], [r.outputs[0].logprobs
                                                                                          for r in out]

    expected = run(engine(models, 4, dtype="bfloat16"))
    llm = engine(models, 4, dtype="bfloat16")
    llm.runner.graphs = graphs = DecodeGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device)
    dtypes = []
    replay = graphs.run

    def spied(*args):
        logits, choices = replay(*args)
        dtypes.append(logits.dtype)
        return logits, choices
    monkeypatch.setattr(graphs, "run", spied)
    assert run(llm) == expected
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_cascade_decode_graphs_emit_the_eager_tokens(models, monkeypatch):
    """DecodeGraphs' cascade graphs (rows reordered into groups that share a prefix, the padding
    rows a group of their own), capture replaced as above: n = 3 samples of a 300-token prompt
    beside an unrelated one, padded into the bucket of 4 and then fewer as samples finish, emit
    what an engine that never cascades emits, and the steps did cascade."""
    from pagedlm.engine.cuda_graphs import DecodeGraphs
    monkeypatch.setattr("pagedlm.engine.cascade.MIN_SAVED_TOKENS", 0)  # a small model: any saving cascades
    g = torch.Generator().manual_seed(17)
    batch = [torch.randint(97, (300,), generator=g).tolist(), torch.randint(97, (20,), generator=g).tolist()]
    params = [SamplingParams(n=3, temperature=0.9, seed=4, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)]
    plain = LLM(models["target"], device="cpu", block_size=4, num_blocks=512, max_num_seqs=MAX_SEQS,
                disable_cascade_attn=True)
    expected = tokens(plain.generate(batch, params, use_tqdm=False))
    llm = engine(models, 4, disable_cascade_attn=False)
    llm.runner.graphs = graphs = DecodeGraphs(llm.model, llm.kv_caches, MAX_SEQS, llm.device)
    assert tokens(llm.generate(batch, params, use_tqdm=False)) == expected
    assert llm.runner.cascade_steps > 0 and any(key[2] for key in graphs.graphs)


def test_drafts_past_the_largest_graph_take_turns(models):
    """Eight lookahead windows of 64 tokens, and their n-gram branches, would make a forward past
    the largest graph (512 tokens): only the sequences whose trees should fit draft, taking turns,
    so every speculative forward replays a graph, every sequence gets to draft, and the output
    stays plain's."""
    batch = prompts(MAX_SEQS, seed=7)
    expected = tokens(engine(models, 4).generate(batch, GREEDY, use_tqdm=False))
    window, ngram = 16, 5
    llm = engine(models, 4, dict(method="lookahead", window=window, ngram=ngram, guesses=4, adaptive=False))
    assert MAX_SEQS * (window * (ngram - 1) + 1) > varlen_graphs.TOKEN_BUCKETS[-1]
    assert_drafts_take_turns(llm, batch, GREEDY, expected)
