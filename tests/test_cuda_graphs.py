"""The CUDA-graph mechanism's parts that need no GPU: StaticInputs' packing of named fields into
one int64 buffer with a host twin, GraphSet's build-once bookkeeping and its reuse of wider
graphs (in an engine too, with capture emulated), and the bucket helpers."""
import numpy as np
import pytest
import torch

import pagedlm.engine.cuda_graphs as cuda_graphs
from pagedlm.engine.cuda_graphs import GraphSet, StaticInputs, batch_buckets, bucket_of, width_of


def test_fields_pack_on_int64_boundaries_and_views_alias_the_buffer():
    inputs = StaticInputs(dict(ids=5, meta=(3, 2, 4), tables=((3, 7), torch.int32), mask=(13, torch.bool),
                               none=0, last=2), "cpu")
    # 5 + 24 + ceil(21 / 2) + ceil(13 / 8) + 0 + 2 words
    assert inputs.ends == dict(ids=5, meta=29, tables=40, mask=42, none=42, last=44)
    assert inputs.tensor.shape == (44,) and inputs.tensor.dtype == torch.int64
    shapes = {name: (tuple(view.shape), view.dtype) for name, view in inputs.device.items()}
    assert shapes == dict(ids=((5,), torch.int64), meta=((3, 2, 4), torch.int64), tables=((3, 7), torch.int32),
                          mask=((13,), torch.bool), none=((0,), torch.int64), last=((2,), torch.int64))
    for name, view in inputs.device.items():  # device views alias the one buffer, host views the host twin
        assert view.untyped_storage().data_ptr() == inputs.tensor.untyped_storage().data_ptr(), name
        assert inputs.host[name].shape == tuple(view.shape) and inputs.host[name].dtype == view.numpy().dtype


def test_upload_sends_the_host_fields_and_a_prefix_only_when_asked():
    inputs = StaticInputs(dict(a=3, tables=((2, 3), torch.int32), mask=(9, torch.bool)), "cpu")
    f = inputs.host
    f["a"][:] = [7, -1, 2**40]
    f["tables"][:] = np.arange(6).reshape(2, 3) - 3
    f["mask"][:] = np.arange(9) % 3 == 0
    inputs.upload(inputs.ends["tables"])  # the mask's words stay as they were
    assert inputs.device["a"].tolist() == [7, -1, 2**40]
    assert inputs.device["tables"].tolist() == [[-3, -2, -1], [0, 1, 2]]
    assert not inputs.device["mask"].any()
    inputs.upload()
    assert inputs.device["mask"].tolist() == (np.arange(9) % 3 == 0).tolist()


def test_a_graph_set_builds_each_key_once_and_counts_captures():
    built = []
    graphs = GraphSet(lambda *key: built.append(key) or object())
    first = graphs.graph((4, 64))
    assert graphs.graph((4, 64)) is first and graphs.graph((8, 64)) is not first
    assert built == [(4, 64), (8, 64)] and graphs.captures == 2 and set(graphs.graphs) == {(4, 64), (8, 64)}


def test_a_graph_replays_over_its_inputs_into_its_output(monkeypatch):
    """Graph: forward(inputs.device) captured once; replay() uploads the host fields first."""
    class Rerun:  # the capture stand-in of the graph tests: a replay reruns the forward into the output
        def __init__(self, forward, output):
            self.forward, self.output = forward, output

        def replay(self):
            self.output.copy_(self.forward())

    monkeypatch.setattr(cuda_graphs, "capture", lambda forward, pool, device: (lambda o: (Rerun(forward, o), o))(
        forward()))
    inputs = StaticInputs(dict(x=4), "cpu")
    graph = cuda_graphs.Graph(inputs, lambda f: f["x"] * 2 + 1, None, "cpu")
    inputs.host["x"][:] = [1, 2, 3, 4]
    out = graph.replay()
    assert out is graph.output and out.tolist() == [3, 5, 7, 9]


@pytest.mark.parametrize("max_num_seqs, expected", [(1, [1]), (8, [1, 2, 4, 8]), (40, [1, 2, 4, 8, 16, 32, 40])])
def test_batch_buckets(max_num_seqs, expected):
    assert batch_buckets(max_num_seqs) == expected
    assert all(bucket_of(b, expected) >= b for b in range(1, max_num_seqs + 1))


def test_width_of_is_a_power_of_two_from_the_minimum():
    assert [width_of(n) for n in (0, 1, 64, 65, 1000)] == [64, 64, 64, 128, 1024]


def test_a_made_graph_up_to_twice_as_wide_serves_a_narrower_table():
    graphs = GraphSet(lambda *key: object())
    graphs.graph((4, 256, 0))
    graphs.graph((4, 512, 0))
    assert graphs.served_by((4, 256, 0), 1) == (4, 256, 0)        # made: itself
    assert graphs.served_by((4, 128, 0), 1) == (4, 256, 0)        # the narrowest made one, twice as wide
    assert graphs.served_by((4, 64, 0), 1) == (4, 64, 0)          # four times as wide is too wide: made anew
    assert graphs.served_by((8, 128, 0), 1) == (8, 128, 0)        # another bucket
    assert graphs.served_by((4, 128, 1), 1) == (4, 128, 1)        # another trailing field
    assert graphs.served_by((4, 1024, 0), 1) == (4, 1024, 0)      # never a narrower one
    graphs.graph((4, 64, 0))
    assert graphs.served_by((4, 64, 0), 1) == (4, 64, 0) and graphs.captures == 3


def test_an_engine_steps_narrower_tables_through_a_wider_graph(tmp_path, monkeypatch):
    """Decode and prompt-chunk steps whose tables need half the width of graphs made for an
    earlier, longer request replay those graphs (no capture) and emit what an eager engine emits."""
    from pagedlm import LLM, SamplingParams
    from pagedlm.engine.cuda_graphs import DecodeGraphs
    from pagedlm.engine.varlen_graphs import VarlenGraphs

    from graph_stand_in import replay_eagerly
    from llama_checkpoint import save_random_checkpoint

    monkeypatch.setattr(cuda_graphs, "capture", replay_eagerly)
    save_random_checkpoint(tmp_path, dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=2048, rms_norm_eps=1e-5), seed=3)
    options = dict(device="cpu", block_size=4, num_blocks=1024, max_num_seqs=4, max_num_batched_tokens=256)
    graphed, eager = LLM(tmp_path, **options), LLM(tmp_path, **options)
    graphed.runner.graphs = DecodeGraphs(graphed.model, graphed.kv_caches, 4, graphed.device)
    graphed.runner.varlen = VarlenGraphs(graphed.model, graphed.kv_caches, 4, graphed.device, None)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    g = torch.Generator().manual_seed(5)
    long_prompt, short_prompt = (torch.randint(97, (n,), generator=g).tolist() for n in (700, 400))
    # 700 tokens: tables of 176 blocks, graphs 256 wide; 400 tokens: 100 blocks, a width of 128.
    for prompt in (long_prompt, short_prompt):
        decode, chunks = graphed.runner.graphs.captures, graphed.runner.varlen.captures
        got = graphed.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == eager.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert graphed.runner.graphs.captures == decode and graphed.runner.varlen.captures == chunks
    assert graphed.runner.graphs.replays > 0 and graphed.runner.varlen.chunk_replays > 0
    assert {key[1] for key in graphed.runner.graphs.graphs} == {64, 256}  # none made 128 wide
