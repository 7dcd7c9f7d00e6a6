"""CUDA graphs: one mechanism for every forward a step replays, and its plainest use.

A GraphSet keys graphs by a shape its owner buckets (batch size, token count, table width, ...)
and captures each on first use, or up front when the owner asks (largest first, so that the
smaller reuse its pool memory). A Graph replays one captured forward over StaticInputs, whose
inputs are written on the host and go up in one copy. DecodeGraphs (decode-only steps) is here;
the others are varlen_graphs.py, speculative/draft_chain.py and speculative/verification.py."""
import gc

import numpy as np
import torch

from pagedlm.engine.cascade import CascadeBatch
from pagedlm.engine.sampler import greedy_choices, staged
from pagedlm.models import AttentionBatch

MIN_WIDTH = 64          # blocks per table row in the narrowest graphs
MAX_WIDTH = 1 << 16     # wider tables run eagerly
WIDER_REUSE = 2         # a graph made for tables up to this many times as wide serves a step
_NUMPY = {torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


def capture(forward, pool, device):
    """(graph, output) of forward() captured into the memory pool, after one eager warm-up run
    (lazy allocations and kernel choices happen outside the capture)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # A collection during the capture may free another engine's graphs, which CUDA forbids
    # while a stream captures (it invalidates the capture): hold the collector off. (No
    # collection first: engines capture dozens of graphs in a row at start-up.)
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool):
            output = forward()
    finally:
        if collecting:
            gc.enable()
    return graph, output


def graph_pool(device):
    """A memory pool for graphs to share (None off CUDA, where graphs only run in tests)."""
    return torch.cuda.graph_pool_handle() if torch.device(device).type == "cuda" else None


def bucket_of(size, buckets):
    return next(b for b in buckets if b >= size)


def power_of_two(n):
    """The smallest power of two >= n (0 for n = 0)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def width_of(blocks):
    """The captured table width for a table of `blocks` columns: a power of two >= MIN_WIDTH."""
    return max(MIN_WIDTH, power_of_two(blocks))


def batch_buckets(max_num_seqs):
    """1, 2, 4, 8, then multiples of 16 up to max_num_seqs (the padding stays under 16 rows)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += range(16, max_num_seqs, 16)
    return buckets + [max_num_seqs]


class StaticInputs:
    """A graph's inputs: named fields packed in one int64 buffer on the device (.device[name])
    with a host twin (.host[name], numpy). A replay writes its inputs into .host in place and
    upload() sends them up in one copy, staged (sampler.staged: copied into a pinned block
    that the copy owns), so the same host array serves every replay. fields: name -> shape
    (int64), or (shape, dtype) with dtype torch.int32 or torch.bool; each field starts on an
    int64 boundary, in the order given, and ends[name] is where it ends (in int64 words), for
    an upload of the fields up to it."""

    def __init__(self, fields, device):
        layout, words = {}, 0
        for name, spec in fields.items():
            typed = isinstance(spec, tuple) and isinstance(spec[-1], torch.dtype)
            shape, dtype = spec if typed else (spec, torch.int64)
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            count = int(np.prod(shape))
            size = -(-count * torch.empty((), dtype=dtype).element_size() // 8)
            layout[name], words = (words, words + size, shape, count, dtype), words + size
        self.tensor = torch.zeros(words, dtype=torch.int64, device=device)
        self._host = np.zeros(words, dtype=np.int64)
        self._host_tensor = torch.from_numpy(self._host)
        self.device, self.host, self.ends = {}, {}, {}
        for name, (start, end, shape, count, dtype) in layout.items():
            device_words = self.tensor[start:end]
            if dtype == torch.bool:  # via bytes: a bool view of int64 words is not allowed
                device_words = device_words.view(torch.uint8)
            self.device[name] = device_words.view(dtype)[:count].view(shape)
            self.host[name] = self._host[start:end].view(_NUMPY[dtype])[:count].reshape(shape)
            self.ends[name] = end

    def upload(self, used=None):
        """The first `used` int64 words (all by default) of the host twin to the device."""
        used = len(self._host) if used is None else used
        self.tensor[:used].copy_(staged(self._host_tensor[:used], self.tensor.device), non_blocking=True)


class Graph:
    """forward(inputs.device) captured once over its StaticInputs; .output is what it returned,
    which every replay overwrites in place."""

    def __init__(self, inputs, forward, pool, device):
        self.inputs = inputs
        self.graph, self.output = capture(lambda: forward(inputs.device), pool, device)

    def replay(self, used=None, feed=None):
        """Uploads the inputs written into .inputs.host (the first `used` words), then replays.
        feed(the token ids on the device) runs between the two: input tokens that come from the
        device (async scheduling, overlap.Feed)."""
        self.inputs.upload(used)
        if feed is not None:
            feed(self.inputs.device["ids"])
        self.graph.replay()
        return self.output


class GraphSet:
    """Graphs by shape key, each made by build(*key) on first use; .captures counts them (a
    step that captured is no measure of speed); .replays counts the steps that replayed one of
    them, where the owner counts (DecodeGraphs and VarlenGraphs do)."""

    def __init__(self, build):
        self.build, self.graphs, self.captures, self.replays = build, {}, 0, 0
        self.views = {}  # first_rows' views by key
        self.served = {}  # key -> the key of the graph that serves it (served_by)

    def served_by(self, key, width_at):
        """The key whose graph serves a step of key: key itself if made, else a made one equal
        to it but for a table width (key[width_at]) at most WIDER_REUSE times as wide, the
        narrowest, else key (to be made). Capturing costs a forward and tens of milliseconds; a
        wider table costs its extra columns' bytes in each upload (padding that no kernel
        reads) and, as the decode kernel bounds split-K by the table's capacity, up to
        WIDER_REUSE times as many (shorter) pieces for a small batch, and their merge."""
        served = self.served.get(key)
        if served is None:
            width = key[width_at]
            wider = [k for k in self.graphs if k[:width_at] == key[:width_at]
                     and k[width_at + 1:] == key[width_at + 1:] and width < k[width_at] <= WIDER_REUSE * width]
            served = key if key in self.graphs or not wider else min(wider, key=lambda k: k[width_at])
            self.served[key] = served
        return served

    def graph(self, key):
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self.build(*key)
            self.captures += 1
        return graph

    def first_rows(self, key, outputs, n):
        """The first n rows of each of outputs, sliced once per key: on a small model's step,
        slicing a tensor costs the host as much as a kernel."""
        views = self.views.get(key)
        if views is None:
            views = self.views[key] = tuple(output[:n] for output in outputs)
        return views


class DecodeGraphs(GraphSet):
    """Decode-only steps: the whole forward, then the LM head and each row's greedy choice, by
    (batch bucket, table width, and for a cascade step its group bucket and prefix table
    width). A step of B sequences runs the graph of the smallest bucket >= B; the padding rows
    write no KV (slot -1) and attend to nothing (length 0, an all -1 block-table row; in a
    cascade step, a group of their own with no prefix), so they cost little and change
    nothing. Tables are captured at a few widths (powers of two from MIN_WIDTH blocks) because
    the decode kernel sizes its split-K from the table's capacity: a table sized for the
    model's longest context would split short sequences into many empty pieces. A graph of up
    to twice the width needed serves a step rather than a new capture (GraphSet.served_by)."""

    def __init__(self, model, kv_caches, max_num_seqs, device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buckets = batch_buckets(max_num_seqs)
        self.pool = graph_pool(device)
        super().__init__(self._capture)
        # The common width is captured up front, largest bucket first; other widths on first use.
        for bucket in reversed(self.buckets):
            self.graph((bucket, MIN_WIDTH, 0, 0))

    def fits(self, batch, width):
        return batch <= self.buckets[-1] and width <= MAX_WIDTH

    def run(self, ids, positions, slots, tables, cascade=None, feed=None):
        """(logits [len(ids), vocab], their greedy_choices) of one decode step (views of the
        graph's outputs). The logits are in the LM head's dtype: a greedy step reads only the
        choices, and a step that samples upcasts them then (sampler.sample), not every replay.
        slots and tables: the block manager's arrays; cascade: the step's CascadePlan, or None.
        feed: the input tokens still in flight (async scheduling, overlap.Feed), or None."""
        batch = len(ids)
        bucket, width = bucket_of(batch, self.buckets), width_of(tables.shape[1])
        key = bucket, width, 0, 0
        if cascade is not None:  # room for the padding rows' group
            key = bucket, width, bucket_of(len(cascade.prefix_lens) + 1, self.buckets), width_of(
                cascade.prefix_tables.shape[1])
        key = self.served_by(key, 1)
        graph = self.graph(key)
        self.replays += 1
        f = graph.inputs.host
        f["ids"][:batch], f["ids"][batch:] = ids, 0
        f["positions"][:batch], f["positions"][batch:] = positions, 0
        f["slots"][:batch], f["slots"][batch:] = slots, -1
        np.add(f["positions"], 1, out=f["lens"])
        f["lens"][batch:] = 0
        f["tables"].fill(-1)
        f["tables"][:batch, :tables.shape[1]] = tables
        if cascade is not None:
            _write_cascade(f, cascade, batch, bucket)
        return self.first_rows((*key, batch), graph.replay(feed=feed), batch)

    def _capture(self, bucket, width, groups, prefix_width):
        fields = dict(ids=bucket, positions=bucket, slots=bucket, lens=bucket, tables=((bucket, width), torch.int32))
        if groups:
            fields.update(order=bucket, indptr=(groups + 1, torch.int32), prefix_lens=(groups, torch.int32),
                          prefix_tables=((groups, prefix_width), torch.int32), suffix_lens=(bucket, torch.int32),
                          suffix_tables=((bucket, width), torch.int32))
        inputs = StaticInputs(fields, self.device)
        # Captured with every row padding: no KV write, nothing read (a cascade: one group of them).
        for name in ("slots", "tables", "prefix_tables", "suffix_tables"):
            if name in fields:
                inputs.device[name].fill_(-1)
        if groups:
            inputs.device["order"].copy_(torch.arange(bucket))
            inputs.device["indptr"][1:] = bucket
        return Graph(inputs, lambda f: self._forward(f, groups > 0), self.pool, self.device)

    def _forward(self, f, cascade):
        cascade = (CascadeBatch(f["order"], f["indptr"], f["prefix_tables"], f["prefix_lens"], f["suffix_tables"],
                                f["suffix_lens"]) if cascade else None)
        batch = AttentionBatch(slot_mapping=f["slots"], block_tables=f["tables"], seq_lens=f["lens"].int(),
                               cu_seqlens_q=None, decode_only=True, cascade=cascade)
        logits = self.model(f["ids"], f["positions"], batch, self.kv_caches, float_logits=False)
        return logits, greedy_choices(logits)


def _write_cascade(f, cascade, batch, bucket):
    """A CascadePlan of batch rows into a cascade graph's host fields: the padding rows after the
    real ones, as one more group with no prefix; the groups after it are empty."""
    groups, prefix_width = len(cascade.prefix_lens), cascade.prefix_tables.shape[1]
    f["order"][:batch], f["order"][batch:] = cascade.order, np.arange(batch, bucket)
    f["indptr"][:groups + 1], f["indptr"][groups + 1:] = cascade.group_indptr, bucket
    f["prefix_lens"][:groups], f["prefix_lens"][groups:] = cascade.prefix_lens, 0
    f["prefix_tables"].fill(-1)
    f["prefix_tables"][:groups, :prefix_width] = cascade.prefix_tables
    f["suffix_lens"][:batch], f["suffix_lens"][batch:] = cascade.suffix_lens, 0
    f["suffix_tables"].fill(-1)
    f["suffix_tables"][:batch, :cascade.suffix_tables.shape[1]] = cascade.suffix_tables
