"""The tensor-parallel process group: the driver (the LLM's process) is rank 0 and runs the
whole engine, scheduler, block manager and sampler included; ranks 1..N-1 are worker
processes (torch.multiprocessing, spawn), each holding its shard of the weights and of every
layer's KV cache, so a block id means the same on every rank.

Per step the driver sends each worker, over its pipe, what to do: the copy-on-write block
copies, then a forward's header (each input's name, dtype, shape and offset); the inputs
themselves (token ids, positions, the AttentionBatch's tensors, the logits rows) follow as one
broadcast of a byte buffer, device to device. Every rank then runs the same sharded forward,
whose all-reduces and final gather meet across the ranks, and rank 0 samples from the
gathered logits as a single-process engine does. Workers never sample and send nothing back
but errors.

Backends: NCCL on GPUs (rank r on cuda:base + r), gloo on the CPU. Faults: before each step
the driver checks that every worker lives, and a forward that fails (a worker killed inside a
collective breaks its peers' sockets; a hung one runs into COLLECTIVE_TIMEOUT) raises a
RuntimeError naming the worker and how it ended. Either way the group is broken for good: its
workers are stopped and every later step raises at once. close(), the group being collected,
and interpreter exit each stop the workers (a polite message, then terminate, then kill)."""
import datetime
import multiprocessing.connection
import os
import signal
import threading
import traceback
import weakref

import torch
import torch.distributed as dist

from pagedlm.engine.forward import apply_block_copies
from pagedlm.engine.runner import ModelRunner
from pagedlm.kv_cache import make_layer_caches
from pagedlm.models import AttentionBatch
from pagedlm.models.llama import DecodeRows
from pagedlm.parallel.loader import load_shard, read_args

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("PAGEDLM_TP_TIMEOUT", 600)))
STARTUP_TIMEOUT_S = 3600.0  # loading a shard of a large checkpoint
REPLY_TIMEOUT_S = 600.0
STOP_GRACE_S = 5.0

# The forward's tensor inputs, in the order they are packed (absent optional ones are skipped).
BATCH_FIELDS = ("slot_mapping", "block_tables", "seq_lens", "cu_seqlens_q", "custom_mask", "mask_indptr",
                "mask_offsets")


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or failed, or a forward broke the group; the LLM cannot run
    further steps (create a new one)."""


def rank_devices(device, size):
    """(backend, [device of each rank]): gloo over the CPU, NCCL over cuda:base .. cuda:base + size - 1."""
    if device.type == "cpu":
        return "gloo", [torch.device("cpu")] * size
    base = device.index or 0
    count = torch.cuda.device_count()
    if base + size > count:
        raise ValueError(f"tensor_parallel_size: {size} ranks need one GPU each (cuda:{base} to "
                         f"cuda:{base + size - 1}), torch sees {count}")
    return "nccl", [torch.device("cuda", base + r) for r in range(size)]


class _Workers:
    """What stopping the workers needs, apart from the group (its finalizer must not hold it)."""

    def __init__(self):
        self.procs, self.conns, self.owns_process_group, self.stopping = [], [], False, False

    def stop(self):
        self.stopping = True
        for conn in self.conns:
            try:
                conn.send(("close",))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(STOP_GRACE_S)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(STOP_GRACE_S)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.conns = []
        if self.owns_process_group and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # aborted already (watch)
                pass
        self.owns_process_group = False

    def watch(self):
        """NCCL: a worker's death aborts the group's communicators, so that a collective the
        driver waits in returns an error rather than waiting out the timeout. (A thread of its
        own, which holds the workers but not the group, so the group can still be collected.)"""
        multiprocessing.connection.wait([p.sentinel for p in self.procs])
        if not self.stopping and dist.is_initialized():
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:
                pass


class TensorParallelGroup:
    """Starts size - 1 workers for the model folder, loads rank 0's shard (self.model) here,
    and joins the process group. dtype, device: the driver's (rank 0's) as LLM resolved them."""

    def __init__(self, folder, size, *, dtype, device):
        if dist.is_initialized():
            raise RuntimeError("tensor_parallel_size: torch.distributed is already initialized in this process (by "
                               "another LLM with tensor_parallel_size > 1 that is still open, or by the caller); "
                               "one tensor-parallel LLM per process: close() the other first")
        args = read_args(folder, size)
        self.size, self.broken = size, None
        self.backend, self.devices = rank_devices(device, size)
        self._workers = _Workers()
        self._finalizer = weakref.finalize(self, self._workers.stop)
        ctx = torch.multiprocessing.get_context("spawn")
        store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
        try:
            for rank in range(1, size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, name=f"pagedlm-tp-rank{rank}", daemon=True,
                                   args=(rank, size, store.port, str(folder), dtype, self.devices[rank],
                                         self.backend, child))
                proc.start()
                child.close()
                self._workers.procs.append(proc)
                self._workers.conns.append(parent)
            if self.backend == "nccl":
                torch.cuda.set_device(self.devices[0])
            self.model = load_shard(folder, 0, size, dtype=dtype, device=self.devices[0], args=args)
            self._free = [reply[0] for reply in self._replies("loaded", STARTUP_TIMEOUT_S)]
            dist.init_process_group(self.backend, store=store, rank=0, world_size=size, timeout=COLLECTIVE_TIMEOUT,
                                    **({"device_id": self.devices[0]} if self.backend == "nccl" else {}))
            self._workers.owns_process_group = True
        except BaseException:
            self.close()
            raise
        self._store = store
        self.model.driver = self
        if self.backend == "nccl":  # NCCL collectives wait for a dead peer until the timeout: abort them
            threading.Thread(target=self._workers.watch, name="pagedlm-tp-watch", daemon=True).start()

    # -- the driver's side of a step --------------------------------------------------------

    def free_memory(self):
        """Bytes free on the fullest GPU of the group (each worker measured after loading)."""
        return min([torch.cuda.mem_get_info(self.devices[0])[0], *self._free])

    def make_caches(self, num_blocks, block_size):
        """Each worker allocates its shard of the KV cache: num_blocks blocks, as rank 0's."""
        self._check()
        self._send(("caches", num_blocks, block_size))
        self._replies("caches", REPLY_TIMEOUT_S)

    def copy_blocks(self, copies):
        """The step's copy-on-write (src, dst) block pairs, done by every worker before its forward."""
        self._check()
        try:
            self._send(("copies", [(int(s), int(d)) for s, d in copies]))
        except BaseException as e:
            raise self._fail(e) from e

    def run_forward(self, forward, input_ids, positions, batch, kv_caches, logits_indices, logits_out):
        """The model's forward on rank 0, after the workers are handed its inputs."""
        self._check()
        decode_rows = batch.decode_rows
        if decode_rows is not None and decode_rows.decoding is not None:  # only graphs mask them; ranks run eagerly
            raise ValueError("tensor parallelism runs eagerly: DecodeRows.decoding must be None")
        named = [("input_ids", input_ids), ("positions", positions),
                 *[(f, getattr(batch, f)) for f in BATCH_FIELDS], ("logits_indices", logits_indices),
                 ("decode_seq_lens", None if decode_rows is None else decode_rows.seq_lens),
                 ("decode_block_tables", None if decode_rows is None else decode_rows.block_tables)]
        header, buffer = _pack([(n, t) for n, t in named if t is not None], self.devices[0])
        try:
            self._send(("forward", header, buffer.numel(), bool(batch.decode_only)))
            dist.broadcast(buffer, src=0)
            return forward(input_ids, positions, batch, kv_caches, logits_indices, logits_out)
        except BaseException as e:
            error = self._fail(e)
            if error is e:
                raise
            raise error from e

    # -- faults and shutdown ----------------------------------------------------------------

    def close(self):
        """Stops the workers and leaves the process group; the group runs no further forward."""
        self.broken = self.broken or "the LLM was closed"
        self._finalizer()

    def _check(self):
        if self.broken is not None:
            raise TensorParallelError(f"tensor parallelism: {self.broken}; this LLM runs no further steps "
                                      f"(create a new one)")
        dead = self._dead()
        if dead:
            self.broken = dead
            self.close()
            self._check()

    def _dead(self, wait=0.0):
        """A description of the first worker that has ended (waiting up to `wait` seconds for
        one to), with its last words if it sent any, or None."""
        procs = self._workers.procs
        # A sentinel is ready as the process exits, a little before it can be reaped (exitcode).
        ended = multiprocessing.connection.wait([p.sentinel for p in procs], timeout=wait) if procs else []
        for proc in procs:
            if proc.sentinel in ended:
                proc.join(STOP_GRACE_S)
        for rank, (proc, conn) in enumerate(zip(procs, self._workers.conns), 1):
            if proc.exitcode is None:
                continue
            how = (f"was killed by signal {signal.Signals(-proc.exitcode).name}" if proc.exitcode < 0
                   else f"exited with status {proc.exitcode}")
            said = _last_words(conn)
            return f"worker rank {rank} (pid {proc.pid}) {how}" + (f": {said}" if said else "")
        return None

    def _fail(self, exc):
        """The error to raise for a forward (or its hand-over) that raised exc: the group is
        broken from now on (its ranks are out of step) and its workers are stopped. A worker
        that died is named; an interrupt is re-raised as it is."""
        if self.broken is not None:  # closed under us
            return TensorParallelError(f"tensor parallelism: {self.broken}")
        dead = self._dead(wait=2.0)
        self.broken = dead or f"a forward failed on rank 0 ({exc!r}), leaving the ranks out of step"
        self.close()
        if dead is None and not isinstance(exc, Exception):
            return exc
        return TensorParallelError(f"tensor parallelism: {self.broken}; this LLM runs no further steps "
                                   f"(create a new one)")

    def _send(self, message):
        for rank, conn in enumerate(self._workers.conns, 1):
            try:
                conn.send(message)
            except (OSError, ValueError) as e:
                raise TensorParallelError(f"tensor parallelism: cannot reach worker rank {rank} ({e!r})") from e

    def _replies(self, what, timeout):
        """Each worker's reply to the last request (a tuple), in rank order; a worker that fails
        or dies first raises, naming it."""
        replies, pending = {}, dict(enumerate(self._workers.conns, 1))
        procs = self._workers.procs
        deadline = None if timeout is None else _now() + timeout
        while pending:
            left = None if deadline is None else max(0.0, deadline - _now())
            ready = multiprocessing.connection.wait([*pending.values(), *(procs[r - 1].sentinel for r in pending)],
                                                    timeout=left)
            if not ready:
                raise TensorParallelError(f"tensor parallelism: worker(s) {sorted(pending)} did not answer "
                                          f"({what}) within {timeout:.0f} s")
            for rank, conn in list(pending.items()):
                try:
                    message = conn.recv() if conn.poll() else None
                except (EOFError, OSError):
                    message = None
                if message is not None:
                    if message[0] == "error":
                        raise TensorParallelError(f"tensor parallelism: worker rank {rank} failed ({what}): "
                                                  f"{message[1]}")
                    replies[rank] = message[1:]
                    del pending[rank]
                elif procs[rank - 1].sentinel in ready:
                    procs[rank - 1].join(STOP_GRACE_S)
                    raise TensorParallelError(f"tensor parallelism: {self._dead()} ({what})")
        return [replies[r] for r in sorted(replies)]


class TensorParallelRunner(ModelRunner):
    """ModelRunner on rank 0 of a group: each step's block copies go to the workers first (the
    forward hands them its inputs itself: ShardedLlamaForCausalLM.forward)."""

    def __init__(self, *args, group, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

    def step(self, scheduled, copies):
        if copies:
            self.group.copy_blocks(copies)
        return super().step(scheduled, copies)


def _pack(named, device):
    """(header, buffer): the tensors' bytes one after another in one uint8 buffer on device,
    each at an 8-byte aligned offset; header: (name, dtype, shape, offset, nbytes) of each."""
    header, chunks, offset = [], [], 0
    for name, tensor in named:
        data = tensor.detach().to(device).contiguous().view(-1).view(torch.uint8)
        pad = -data.numel() % 8
        header.append((name, tensor.dtype, tuple(tensor.shape), offset, data.numel()))
        chunks += [data] + ([torch.zeros(pad, dtype=torch.uint8, device=device)] if pad else [])
        offset += data.numel() + pad
    return header, torch.cat(chunks)


def _unpack(header, buffer):
    return {name: buffer[offset:offset + nbytes].view(dtype).view(shape)
            for name, dtype, shape, offset, nbytes in header}


def _last_words(conn):
    """The error a worker sent before it ended, or None."""
    try:
        while conn.poll():
            message = conn.recv()
            if message[0] == "error":
                return message[1]
    except (EOFError, OSError):
        pass
    return None


def _now():
    import time
    return time.monotonic()


# -- the worker process -----------------------------------------------------------------------

def _worker_main(rank, size, port, folder, dtype, device, backend, conn):
    """Rank `rank`: loads its shard, joins the group, then does what the driver sends until
    "close" (or the driver's end of the pipe closes). An error is sent to the driver, then the
    process exits with status 1."""
    joined = False
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C interrupts the driver, which stops the workers
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        if backend == "nccl":
            torch.cuda.set_device(device)
        store = dist.TCPStore("127.0.0.1", port, size, False, timeout=COLLECTIVE_TIMEOUT)
        model = load_shard(folder, rank, size, dtype=dtype, device=device)
        conn.send(("loaded", torch.cuda.mem_get_info(device)[0] if backend == "nccl" else None))
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=COLLECTIVE_TIMEOUT,
                                **({"device_id": device} if backend == "nccl" else {}))
        joined = True
        caches = None
        while True:
            try:
                message = conn.recv()
            except EOFError:  # the driver is gone
                return
            kind = message[0]
            if kind == "close":
                return
            if kind == "caches":
                _, num_blocks, block_size = message
                caches = make_layer_caches(model.make_kv_caches(num_blocks, block_size))
                conn.send(("caches",))
            elif kind == "copies":
                apply_block_copies(caches, message[1], device)
            elif kind == "forward":
                _, header, nbytes, decode_only = message
                buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
                dist.broadcast(buffer, src=0)
                inputs = _unpack(header, buffer)
                decode_rows = (DecodeRows(inputs["decode_seq_lens"], inputs["decode_block_tables"])
                               if "decode_seq_lens" in inputs else None)
                batch = AttentionBatch(**{f: inputs.get(f) for f in BATCH_FIELDS}, decode_only=decode_only,
                                       decode_rows=decode_rows)
                model(inputs["input_ids"], inputs["positions"], batch, caches, inputs.get("logits_indices"))
            else:
                raise ValueError(f"unknown message {kind!r}")
    except BaseException as e:
        try:
            conn.send(("error", f"{e!r}\n{traceback.format_exc()}"))
        except Exception:
            pass
        if not isinstance(e, (KeyboardInterrupt, SystemExit)):
            os._exit(1)  # skip the interpreter's teardown, which could wait on a broken collective
        raise
    finally:
        if joined:
            try:
                dist.destroy_process_group()
            except Exception:
                pass
