"""The CUDA-graph mechanism's parts that need no GPU: StaticInputs' packing of named fields into
one int64 buffer with a host twin, GraphSet's build-once bookkeeping, and the bucket helpers."""
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
