"""CUDA graphs for decode-only steps (DecodeGraphs), and what every graph set shares: capture,
static input buffers, batch buckets and table widths. A decode graph holds the whole forward,
then the LM head and each row's greedy choice, per batch-size bucket and block-table width;
a step replays it with its inputs copied into the graph's buffer."""
import gc

import numpy as np
import torch

from pagedlm.engine.sampler import greedy_choices
from pagedlm.models import AttentionBatch

MIN_WIDTH = 64          # blocks per table row in the narrowest graphs
MAX_WIDTH = 1 << 16     # wider tables run eagerly


def capture(forward, pool, device):
    """(graph, output) of forward() captured into the memory pool, after one eager warm-up run
    (lazy allocations and kernel choices happen outside the capture). Each graph set counts
    its own captures (.captures): a step that captured a graph is no measure of speed."""
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


def bucket_of(size, buckets):
    return next(b for b in buckets if b >= size)


def width_of(blocks):
    """The captured table width for a table of `blocks` columns: a power of two >= MIN_WIDTH."""
    width = MIN_WIDTH
    while width < blocks:
        width *= 2
    return width


class InputBuffer:
    """A graph's static int64 inputs (.tensor, on its device) and their host side (.host, a
    pageable numpy array): a replay's inputs are written into .host in place and go up in one
    copy. The same host array serves every replay, since a copy from pageable memory has read
    it when copy_ returns; so nothing is allocated per replay."""

    def __init__(self, size, device):
        self.tensor = torch.zeros(size, dtype=torch.int64, device=device)
        self.host = np.zeros(size, dtype=np.int64)
        self._host_tensor = torch.from_numpy(self.host)

    def upload(self, used=None):
        """The first `used` elements of .host (all by default) to .tensor."""
        used = len(self.host) if used is None else used
        self.tensor[:used].copy_(self._host_tensor[:used], non_blocking=True)


def int32_rows(flat, rows, cols):
    """flat (int64, numpy or torch) viewed as int32 [rows, cols]: block tables inside a packed buffer."""
    as_int32 = flat.view(np.int32 if isinstance(flat, np.ndarray) else torch.int32)
    return as_int32[:rows * cols].reshape(rows, cols)


def batch_buckets(max_num_seqs):
    """1, 2, 4, 8, then multiples of 16 up to max_num_seqs (the padding stays under 16 rows)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    buckets += range(16, max_num_seqs, 16)
    return buckets + [max_num_seqs]


class DecodeGraphs:
    """A step of B sequences runs the graph of the smallest bucket >= B; the padding rows write
    no KV (slot -1) and attend to nothing (length 0, an all -1 block-table row), so they cost
    little and change nothing. Tables are captured at a few widths (powers of two from
    MIN_WIDTH blocks) because the decode kernel sizes its split-K from the table's capacity: a
    table sized for the model's longest context would split short sequences into many empty
    pieces."""

    def __init__(self, model, kv_caches, max_num_seqs, device):
        self.model, self.kv_caches, self.device = model, kv_caches, device
        self.buckets = batch_buckets(max_num_seqs)
        self.pool = torch.cuda.graph_pool_handle()
        self.widths = {}   # width -> _GraphSet
        self.captures = 0  # graphs captured so far (each costs one warm-up forward and a capture)
        # The common width is captured up front, largest bucket first so that the smaller
        # captures reuse its pool memory; other widths and buckets on first use.
        narrow = self._graph_set(MIN_WIDTH)
        for bucket in reversed(self.buckets):
            narrow.graph(bucket)

    def fits(self, batch, width):
        return batch <= self.buckets[-1] and width <= MAX_WIDTH

    def run(self, ids, positions, slots, tables):
        """(logits float32 [len(ids), vocab], their greedy_choices) of one decode step (views of
        the graph's outputs). slots and tables: the block manager's arrays."""
        batch, needed = len(ids), tables.shape[1]
        graphs = self._graph_set(width_of(needed))
        bucket = bucket_of(batch, self.buckets)
        graph = graphs.graph(bucket)  # before the inputs are copied in: a first capture resets the buffers
        # ids, positions, slots, lengths [4, bucket], then the tables: one host array, one copy
        # (padding rows write no KV and read nothing).
        meta, padded_tables = graphs.host_layout(bucket)
        meta.fill(0)
        meta[0, :batch], meta[1, :batch], meta[2, :batch], meta[2, batch:] = ids, positions, slots, -1
        meta[3, :batch] = meta[1, :batch] + 1
        padded_tables.fill(-1)
        padded_tables[:batch, :tables.shape[1]] = tables
        graphs.inputs.upload(graphs.size(bucket))
        graph.replay()
        return graphs.output_views(bucket, batch)

    def _graph_set(self, width):
        if width not in self.widths:
            self.widths[width] = _GraphSet(self, width)
        return self.widths[width]


class _GraphSet:
    """The static input buffer of one table width and the graphs captured over it. A bucket's
    graph reads its first size(bucket) elements: meta [4, bucket], then tables int32
    [bucket, width], so each step's inputs are one copy whatever the bucket."""

    def __init__(self, owner, width):
        self.owner, self.width = owner, width
        self.inputs = InputBuffer(self.size(owner.buckets[-1]), owner.device)
        self.host_views = {}  # bucket -> layout(self.inputs.host, bucket), made once
        self.graphs, self.outputs = {}, {}
        self.views = {}  # (bucket, batch) -> the first batch rows of the bucket's outputs

    def host_layout(self, bucket):
        if bucket not in self.host_views:
            self.host_views[bucket] = self.layout(self.inputs.host, bucket)
        return self.host_views[bucket]

    def output_views(self, bucket, batch):
        """The first batch rows of the bucket graph's (logits, choices), made once: on a small
        model's step, slicing a tensor costs the host as much as a kernel."""
        if (bucket, batch) not in self.views:
            logits, choices = self.outputs[bucket]
            self.views[bucket, batch] = (logits[:batch], choices[:batch])
        return self.views[bucket, batch]

    def size(self, bucket):
        return 4 * bucket + -(-bucket * self.width // 2)

    def layout(self, packed, bucket):
        """(meta [4, bucket], tables [bucket, width]): views of a packed buffer, torch or numpy."""
        return packed[:4 * bucket].reshape(4, bucket), int32_rows(packed[4 * bucket:], bucket, self.width)

    def graph(self, bucket):
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        return self.graphs[bucket]

    def _forward(self, bucket):
        meta, tables = self.layout(self.inputs.tensor, bucket)
        batch = AttentionBatch(slot_mapping=meta[2], block_tables=tables, seq_lens=meta[3].int(),
                               cu_seqlens_q=None, decode_only=True)
        logits = self.owner.model(meta[0], meta[1], batch, self.owner.kv_caches)
        return logits, greedy_choices(logits)

    def _capture(self, bucket):
        meta, tables = self.layout(self.inputs.tensor, bucket)
        meta.copy_(torch.tensor([[0], [0], [-1], [0]]).expand(4, bucket))  # padding rows: no KV write, nothing read
        tables.fill_(-1)
        graph, self.outputs[bucket] = capture(lambda: self._forward(bucket), self.owner.pool, self.owner.device)
        self.owner.captures += 1
        return graph
