"""pagedlm.LLM: offline generation with the familiar vLLM API, on the C++ block manager and
pagedlm's paged-attention ops (continuous batching, preemption by recompute, prefix caching,
n > 1 by copy-on-write forks, speculative decoding). A step: the scheduler picks the tokens,
the model runner runs them and returns each sequence's new tokens, LLM._emit appends them."""
import collections
import functools
import itertools
import numbers
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import pagedlm
from pagedlm._torch_glue import debug_checks
from pagedlm.beam_search import BeamSearch, BeamSearchParams, beam_score
from pagedlm.engine.checks import (check_bool, check_float, check_int, check_token_ids, resolve_device,
                                   resolve_dtype)
from pagedlm.engine.overlap import OverlappedSteps
from pagedlm.engine.recovery import StepRecovery
from pagedlm.engine.runner import ModelRunner
from pagedlm.engine.scheduler import Scheduler
from pagedlm.engine.sequence import Logprob, SamplingParams, Sequence, Status
from pagedlm.engine.text import SampleText, completion_text
from pagedlm.models import LlamaForCausalLM, load_model
from pagedlm.kv_cache import checkpoint_kv_scales, make_layer_caches, resolve_kv_cache_dtype
from pagedlm.models.loader import _weight_files, eos_token_ids
from pagedlm.parallel import TensorParallelGroup, TensorParallelRunner, check_llm_options
from pagedlm.speculative import check_config, make_speculator

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob"]

CPU_KV_BUDGET_BYTES = 1 << 30
INT32_MAX = 2**31 - 1  # the block manager counts blocks, tokens per block and sequences in int32


def _exclusive(method):
    """One caller at a time: a call from a second thread while another is inside the engine
    raises at once (rather than corrupting the scheduler or waiting on a lock forever, as two
    generate loops each waiting for the other's requests would)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"LLM.{method.__name__}: this LLM is in use by another thread. An LLM serves "
                               f"one thread at a time; to share one engine between threads or tasks use an "
                               f"asynchronous engine (pagedlm.AsyncLLM), or give each thread its own LLM")
        try:
            return method(self, *args, **kwargs)
        finally:
            self._lock.release()
    return locked


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: str
    cumulative_logprob: float
    logprobs: list | None = None  # with SamplingParams.logprobs: a {token_id: Logprob} dict per token


@dataclass
class RequestOutput:
    request_id: str
    prompt: object
    prompt_token_ids: list
    outputs: list
    metrics: dict = field(default_factory=dict)
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then a {token_id:
    # Logprob} dict per prompt token (the prompt's token first), the same for every sample.
    prompt_logprobs: list | None = None


class LLM(StepRecovery, OverlappedSteps):
    def __init__(self, model, *, device=None, dtype=None, block_size=16, num_blocks=None,
                 gpu_memory_utilization=0.9, max_num_seqs=256, max_num_batched_tokens=8192,
                 enable_prefix_caching=True, seed=0, enforce_eager=False, speculative=None,
                 kv_cache_dtype="auto", calculate_kv_scales=False, tensor_parallel_size=1,
                 disable_cascade_attn=True, async_scheduling=None):
        """gpu_memory_utilization: the share of the GPU memory free once the weights are loaded
        that the KV cache takes (vLLM's counts the weights and activations in its share of the
        whole card). device: "auto" (None), "cpu", "cuda" or "cuda:N"; dtype of the weights loaded from a
        folder: "auto" (None: bfloat16 on a GPU, float32 on the CPU), "float16"/"half",
        "bfloat16", "float32"/"float" or the torch dtype. kv_cache_dtype: "auto" (the model's
        dtype), "fp8" (= "fp8_e4m3") or "fp8_e5m2": an FP8 KV cache, one byte per element, with
        per-layer scales read from the checkpoint's *.k_scale / *.v_scale / *.kv_scale tensors
        (1.0 where it has none), or, with calculate_kv_scales, measured from the first prefill's
        keys and values (amax / the format's max). A draft model's cache keeps its dtype. Every
        argument is checked before anything is loaded: a bad one raises a ValueError naming it.
        tensor_parallel_size: split the model over that many processes, one GPU each (or the
        CPU), this one being rank 0 (docs/tensor-parallel.md); close() stops them.
        disable_cascade_attn (vLLM's name; True by default here, unlike vLLM, until the cascade
        measures faster in the engine): False makes decode steps read a prefix that rows share
        (n > 1 samples, beams, prompts from one prefix-cache entry) once per group (docs/engine.md);
        steps without such sharing, layers with a sliding window and tensor parallelism never do.
        async_scheduling (vLLM's name): while the GPU runs a step, the host schedules and
        launches the next, and emits the tokens of the one before (engine/overlap.py): steps
        whose requests ask for no logprobs, penalties, logit bias or min_tokens overlap, prompt
        chunks and decodes alike; any other step runs as without it. None (the default): on
        for a CUDA device without speculative decoding or tensor parallelism, which it does not
        support; True there raises. On the CPU, where a step's host and compute work take turns
        anyway, it gains nothing."""
        _check_model_arg("model", model)
        self.device = resolve_device(device)
        dtype = resolve_dtype(dtype, self.device)
        block_size = check_int("block_size", block_size, minimum=1, maximum=INT32_MAX)
        if num_blocks is not None:
            num_blocks = check_int("num_blocks", num_blocks, minimum=1, maximum=INT32_MAX)
        gpu_memory_utilization = check_float("gpu_memory_utilization", gpu_memory_utilization, maximum=1, above=0)
        max_num_seqs = check_int("max_num_seqs", max_num_seqs, minimum=1, maximum=INT32_MAX)
        max_num_batched_tokens = check_int("max_num_batched_tokens", max_num_batched_tokens, minimum=1,
                                           maximum=INT32_MAX)
        enable_prefix_caching = check_bool("enable_prefix_caching", enable_prefix_caching)
        seed = check_int("seed", seed)
        enforce_eager = check_bool("enforce_eager", enforce_eager)
        disable_cascade_attn = check_bool("disable_cascade_attn", disable_cascade_attn)
        kv_dtype = resolve_kv_cache_dtype(kv_cache_dtype)
        calculate_kv_scales = check_bool("calculate_kv_scales", calculate_kv_scales)
        if calculate_kv_scales and kv_dtype is None:
            raise ValueError("calculate_kv_scales: needs an FP8 kv_cache_dtype (\"fp8\", \"fp8_e4m3\" or "
                             "\"fp8_e5m2\"), got kv_cache_dtype='auto'")
        if speculative is not None:
            check_config(speculative)
            if speculative["method"] == "draft":
                _check_model_arg("speculative['model']", speculative["model"])
        tensor_parallel_size = check_int("tensor_parallel_size", tensor_parallel_size, minimum=1, maximum=INT32_MAX)
        supports_async = speculative is None and tensor_parallel_size == 1
        if async_scheduling is None:
            async_scheduling = supports_async and self.device.type == "cuda"
        self.async_scheduling = check_bool("async_scheduling", async_scheduling)
        if async_scheduling and not supports_async:
            raise ValueError("async_scheduling: not with speculative decoding or tensor_parallel_size > 1")
        check_llm_options(tensor_parallel_size, model_is_object=isinstance(model, LlamaForCausalLM),
                          speculative=speculative, kv_cache_dtype=kv_dtype)
        self.tensor_parallel_size, self._tp = tensor_parallel_size, None
        # One caller at a time (see _exclusive); reentrant, as generate calls step.
        self._lock = threading.RLock()
        self.tokenizer, eos_ids = None, frozenset()
        if isinstance(model, LlamaForCausalLM):
            self.model = model.to(self.device)
        else:
            if tensor_parallel_size > 1:  # rank 0's shard; the workers load theirs
                self._tp = TensorParallelGroup(model, tensor_parallel_size, dtype=dtype, device=self.device)
                self.model = self._tp.model
            else:
                self.model = load_model(model, dtype=dtype, device=self.device)
            eos_ids = eos_token_ids(model)
            self.tokenizer = _load_tokenizer(Path(model))
        _check_cuda_head_dim(self.model, self.device, "model")
        draft = None
        if speculative is not None and speculative["method"] == "draft":
            draft = speculative["model"]
            draft = (draft.to(self.device) if isinstance(draft, LlamaForCausalLM)
                     else load_model(draft, dtype=dtype, device=self.device))
            if draft.args.vocab_size != self.model.args.vocab_size:
                raise ValueError(f"speculative['model']: vocabulary of {draft.args.vocab_size} tokens, the target's "
                                 f"is {self.model.args.vocab_size}")
            _check_cuda_head_dim(draft, self.device, "speculative['model']")
        # A draft model's cache has as many blocks as the target's.
        bytes_per_block = (_kv_block_bytes(self.model, block_size, kv_dtype)
                           + (_kv_block_bytes(draft, block_size) if draft is not None else 0))
        if num_blocks is None:
            budget = ((torch.cuda.mem_get_info(self.device)[0] if self._tp is None else self._tp.free_memory())
                      * gpu_memory_utilization
                      if self.device.type == "cuda" else CPU_KV_BUDGET_BYTES)
            num_blocks = max(1, int(budget // bytes_per_block))
        _check_kv_fits(num_blocks * bytes_per_block, num_blocks, block_size, self.device)
        # The checkpoint's KV scales, if it has them (read before the cache is allocated: a bad one
        # refuses the engine).
        scales = (checkpoint_kv_scales(_weight_files(model), self.model.args.num_layers, self.model.args.num_kv_heads)
                  if kv_dtype is not None and not isinstance(model, LlamaForCausalLM) else None)
        self.block_manager = pagedlm.BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.kv_cache_dtype = kv_dtype or self.model.lm_head.weight.dtype
        self.kv_caches = make_layer_caches(self.model.make_kv_caches(num_blocks, block_size, dtype=kv_dtype),
                                           scales=scales)
        if self._tp is not None:
            self._tp.make_caches(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        # Steps replay CUDA graphs on a GPU, except with enforce_eager (vLLM's option), tensor
        # parallelism or PAGEDLM_DEBUG=1 (below).
        use_cuda_graphs = self.device.type == "cuda" and not enforce_eager and self._tp is None
        if use_cuda_graphs and debug_checks():
            warnings.warn("PAGEDLM_DEBUG=1: CUDA graphs are off (the ops' value checks synchronize, which no "
                          "capture allows); steps run eagerly and slower")
            use_cuda_graphs = False
        speculator = (make_speculator(speculative, max_num_batched_tokens=max_num_batched_tokens, draft_model=draft,
                                      num_blocks=num_blocks, block_size=block_size, device=self.device,
                                      use_cuda_graphs=use_cuda_graphs, max_num_seqs=max_num_seqs)
                      if speculative is not None else None)
        runner = ModelRunner if self._tp is None else functools.partial(TensorParallelRunner, group=self._tp)
        self.runner = runner(self.model, self.kv_caches, self.block_manager, self.device,
                             max_num_seqs=max_num_seqs, use_cuda_graphs=use_cuda_graphs, eos_token_ids=eos_ids,
                             speculator=speculator, cascade=not disable_cascade_attn and self._tp is None)
        if self.tokenizer is not None:  # logprobs' decoded_token: each token decoded alone, as vLLM
            self.runner.decode_token = functools.lru_cache(maxsize=None)(lambda t: self.tokenizer.decode([t]))
        self.seed = seed
        # Scales are measured by the first real forward, not by the warm-up runs of graph captures above.
        for cache in self.kv_caches:
            cache.measure = calculate_kv_scales and cache.is_fp8
        self._ids = itertools.count()
        self._requests = {}
        self._flights = collections.deque()  # launched steps not landed yet (async_scheduling)
        # The running step's scheduled sequences, which a failure of it rolls back; None between
        # steps and until the scheduler returns (a failure before that is no request's).
        self._scheduled = None

    def close(self):
        """Stops the tensor-parallel workers (tensor_parallel_size > 1; their process group is
        left, so another such LLM may start); later steps raise. Also done when the LLM is
        collected and at interpreter exit. Nothing to do otherwise."""
        if self._tp is not None:
            self._tp.close()

    # -- requests ---------------------------------------------------------------------

    @_exclusive
    def add_request(self, prompt, params, *, detokenize=False):
        """Queues a prompt (text or token ids); returns its request id. A bad prompt or params
        raises (naming it) and queues nothing. detokenize: keep each sample's text (its
        Sequence's `text`, a SampleText) up to date as tokens come, for a streaming front end;
        samples with stop strings always have it."""
        token_ids = self._check_request(prompt, params, "prompt", "params")
        return self._enqueue(prompt, token_ids, params, detokenize=detokenize)

    def _check_request(self, prompt, params, prompt_name, params_name):
        """The prompt's token ids, after checking that the request can run on this engine."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"{params_name}: expected SamplingParams, got {type(params).__name__}")
        token_ids = self._token_ids(prompt, prompt_name)
        vocab_size = self.model.args.vocab_size
        check_token_ids(f"{params_name}.stop_token_ids", params.stop_token_ids, vocab_size)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"{params_name}.stop: stop strings need a tokenizer.json in the model folder; use "
                             f"stop_token_ids")
        if params.logit_bias is not None and max(params.logit_bias) >= vocab_size:
            raise ValueError(f"{params_name}.logit_bias: token id {max(params.logit_bias)} is not in the vocabulary "
                             f"[0, {vocab_size})")
        for name in ("logprobs", "prompt_logprobs"):
            count = getattr(params, name)
            if count is not None and count > vocab_size:
                raise ValueError(f"{params_name}.{name}: {count} asked for, the vocabulary has {vocab_size} tokens")
        # Refused before any sequence is built: n samples run at once from the first step, and
        # to be admitted together they reserve the prompt's blocks plus one token each.
        if params.n > self.scheduler.max_num_seqs:
            raise ValueError(f"{params_name}.n: {params.n} samples run at once, max_num_seqs is "
                             f"{self.scheduler.max_num_seqs}")
        blocks = -(-(len(token_ids) + params.n) // self.block_manager.block_size)
        if params.n > 1 and blocks > self.block_manager.num_blocks:
            raise ValueError(f"{params_name}.n: {params.n} samples of a {len(token_ids)}-token prompt need {blocks} "
                             f"KV blocks to start together, the cache has {self.block_manager.num_blocks}")
        return token_ids

    def _enqueue(self, prompt, token_ids, params, detokenize=False):
        request_id = str(next(self._ids))
        # Blocks the request's longest sequence needs with nothing else running.
        needed = -(-(len(token_ids) + params.max_tokens) // self.block_manager.block_size)
        seqs = [Sequence(next(self._ids), request_id, i, list(token_ids), params, engine_seed=self.seed)
                for i in range(params.n)]
        prompt_logprobs = [None] if params.prompt_logprobs is not None else None  # the samples share it
        for seq in seqs:
            seq.prompt_logprobs = prompt_logprobs
            if params.logprobs is not None:
                seq.logprobs = []
            if params.stop or detokenize:
                seq.text = SampleText(self.tokenizer, token_ids, params)
        self._requests[request_id] = dict(prompt=prompt, token_ids=token_ids, seqs=seqs, start=time.perf_counter(),
                                          first_token=None)
        if needed > self.block_manager.num_blocks:
            warnings.warn(f"request {request_id}: needs {needed} KV blocks, the cache has "
                          f"{self.block_manager.num_blocks}; refused")
            for s in seqs:
                s.status, s.finish_reason = Status.FINISHED, "refused"
        else:
            self.scheduler.add(seqs)
        return request_id

    def _token_ids(self, prompt, name):
        vocab_size = self.model.args.vocab_size
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{name}: text needs a tokenizer.json in the model folder; pass token ids")
            # (Checked too: a tokenizer may have a larger vocabulary than the model.)
            token_ids = check_token_ids(f"{name} (tokenized)", self.tokenizer.encode(prompt).ids, vocab_size)
        else:
            token_ids = check_token_ids(name, prompt, vocab_size)
        if not token_ids:
            raise ValueError(f"{name}: empty prompt")
        return token_ids

    def sequences(self, request_id):
        """The request's Sequence objects, one per sample, whose `output` lists grow as steps
        sample tokens and whose `finish_reason` is set when they end: what a streaming front end
        reads between steps (the request stays until take_output)."""
        return list(self._requests[request_id]["seqs"])

    @_exclusive
    def finish_sequence(self, seq, reason="stop"):
        """Ends one sample of a request now, freeing its blocks; its siblings go on. A no-op on
        a finished sample. (The engine ends samples at their stop strings itself.)"""
        if seq.status != Status.FINISHED:
            self._finish(seq, reason)

    @_exclusive
    def abort(self, request_id):
        """Finishes a request's unfinished sequences with finish_reason "abort", freeing their
        blocks; its output stays for take_output. Unknown or finished requests: nothing to do."""
        self._abort(request_id, "abort")

    def _abort(self, request_id, reason):
        # In the scheduler's order (running, then waiting), in which their blocks are freed.
        scheduler = self.scheduler
        for seq in scheduler.running + [s for group in scheduler.waiting for s in group]:
            if seq.request_id == request_id:
                self._finish(seq, reason)

    def _finish(self, seq, reason):
        """Every end of an unfinished sequence comes here (a stop or max_tokens, finish_sequence,
        an abort, a refusal): it leaves the scheduler (its blocks freed) and the runner (what it
        keeps for the sequence: a proposer's state, a draft model's blocks)."""
        self.scheduler.finish(seq)
        seq.finish_reason = reason
        self.runner.forget(seq)

    @property
    def speculator(self):
        """The runner's Speculator (None without speculative decoding): its metrics are reported
        with each request's output."""
        return self.runner.speculator

    @property
    def eos_token_ids(self):
        """The model's end-of-sequence ids (its folder's; none for a model object): a sample ends
        at one unless ignore_eos, and sampling holds them back until min_tokens (in the runner)."""
        return self.runner.eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids):
        self.runner.eos_token_ids = frozenset(ids)

    @_exclusive
    def step(self):
        """One engine iteration; returns the number of tokens sampled.

        A step that raises leaves the engine consistent and usable (see _recover): the
        request(s) that make it fail finish with finish_reason "error" (an interrupt fails
        none), their blocks are freed, and the step's other sequences go on as if those had
        never been there; the exception is re-raised, with a note naming the failed requests."""
        try:
            return self._step()
        except BaseException as exc:
            failed = self._recover(exc)
            if failed:
                exc.add_note(f"pagedlm: request(s) {', '.join(sorted(failed, key=int))} were in the failed step and "
                             f"finished with finish_reason 'error'; the engine goes on with the others")
            raise
        finally:
            self._scheduled = None

    def _step(self):
        """Schedules, runs and emits one step. With async scheduling, a step that can overlap
        (engine/overlap.py) is launched, and the step in flight before it is landed; any other
        first lands the step in flight."""
        overlaps = self._overlaps()
        if self._flights and not overlaps:
            return self._land_oldest()
        scheduled, copies = self.scheduler.schedule()
        self._scheduled = scheduled
        if not scheduled:
            if self._flights:
                return self._land_oldest()
            if self.scheduler.waiting and not self.scheduler.running:
                self._refuse_head()
            return 0
        if overlaps:
            self._launch(scheduled, copies)
            return self._land_oldest() if len(self._flights) > 1 else 0
        return sum(self._emit(seq, tokens) for seq, tokens in self.runner.step(scheduled, copies).items())

    def _refuse_head(self):
        """Nothing runs and the first waiting group still cannot be admitted: it never will be
        (add_request refuses such requests; this is the guard against waiting forever)."""
        request_id = self.scheduler.waiting[0][0].request_id
        warnings.warn(f"request {request_id}: cannot be admitted into an empty KV cache; refused")
        self._abort(request_id, "refused")

    def _emit(self, seq, tokens):
        """Appends one step's tokens of seq, (token, logprob, top) each (top: its position's
        {token_id: logprob} when the request asks for logprobs), up to the one that finishes it:
        a stop id or EOS, max_tokens, or a stop string in the text (cut there); the rest are
        dropped. Returns how many it kept."""
        seq.forwards += 1
        request = self._requests[seq.request_id]
        request["first_token"] = request["first_token"] or time.perf_counter()
        eos_token_ids = self.runner.eos_token_ids
        for kept, (token, logprob, top) in enumerate(tokens, 1):
            seq.output.append(token)
            seq.cumulative_logprob += logprob
            if seq.logprobs is not None:
                seq.logprobs.append(top)
            if token in seq.params.stop_token_ids or (token in eos_token_ids and not seq.params.ignore_eos):
                seq.finish_reason = "stop"
            elif len(seq.output) >= seq.params.max_tokens:
                seq.finish_reason = "length"
            if seq.text is not None:
                try:
                    if seq.text.add(token, final=bool(seq.finish_reason)):
                        seq.finish_reason = "stop"
                except Exception as e:  # a fault in one sample's text fails that sample, not the step
                    seq.finish_reason, seq.error = "error", f"its text failed: {e!r}"
            if seq.finish_reason:
                self._finish(seq, seq.finish_reason)
                break
        return kept

    # -- the offline API ----------------------------------------------------------------

    @_exclusive
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        """sampling_params: one SamplingParams for every prompt, or a list of one per prompt (as vLLM takes).

        Every prompt and params is checked before any is queued, so a bad one raises (naming
        it) and changes nothing. A step that fails on some of the call's requests fails those
        (finish_reason "error", with a RuntimeWarning) and the others go on; it raises when no
        request of the call is blamed, or all of them are. However generate exits (a return, an
        error, an interrupt), it leaves none of its requests behind in the engine."""
        prompts = _prompt_list(prompts)
        params = SamplingParams() if sampling_params is None else sampling_params
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
            names = [f"sampling_params[{i}]" for i in range(len(prompts))]
        else:
            params, names = [params] * len(prompts), ["sampling_params"] * len(prompts)
        checked = [self._check_request(p, sp, f"prompts[{i}]", name)
                   for i, (p, sp, name) in enumerate(zip(prompts, params, names))]
        ids = []
        try:
            for prompt, token_ids, sp in zip(prompts, checked, params):
                ids.append(self._enqueue(prompt, token_ids, sp))
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
                left = {r for r in ids if not self._finished(r)}  # refused ones are
                bar.update(len(ids) - len(left))
                while left:
                    if not self.scheduler.has_work():  # never: a guard against waiting forever
                        raise RuntimeError(f"requests {sorted(left)} are unfinished but nothing is queued")
                    try:
                        self.step()
                    except Exception as exc:  # not an interrupt: that ends the call
                        self._go_on_after(exc, ids)
                    finished = {r for r in left if self._finished(r)}
                    bar.update(len(finished))
                    left -= finished
            outputs = [self._output(r) for r in ids]
        finally:
            for r in ids:  # on an error or interrupt: this call's requests go with it
                if r in self._requests:
                    self.abort(r)
                    del self._requests[r]
        return outputs

    def _go_on_after(self, exc, ids):
        """After a step that raised exc: generate goes on when it blamed some of the call's
        requests (they finished with finish_reason "error") but not all of them; otherwise exc
        goes to the caller."""
        failed = [r for r in ids if any(s.finish_reason == "error" for s in self._requests[r]["seqs"])]
        if not failed or len(failed) == len(ids):
            raise exc
        warnings.warn(f"pagedlm: a step failed ({exc!r}); request(s) {', '.join(map(str, failed))} finished with "
                      f"finish_reason 'error' and generate goes on with the others", RuntimeWarning, stacklevel=3)

    def _finished(self, request_id):
        return all(s.status == Status.FINISHED for s in self._requests[request_id]["seqs"])

    @_exclusive
    def beam_search(self, prompts, params):
        """The best params.beam_width beams of each prompt (text or token ids), best first, as
        RequestOutputs; metrics hold the beams' scores and the KV memory that sharing saved.
        Prompts are searched together in waves that fit the cache with nothing shared."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError(f"params: expected BeamSearchParams, got {type(params).__name__}")
        if self._tp is not None:
            raise NotImplementedError(f"LLM.beam_search: not supported with tensor_parallel_size="
                                      f"{self.tensor_parallel_size}")
        prompts = _prompt_list(prompts)
        token_ids = [self._token_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        self._land_all()  # (async scheduling) the search shares the block manager
        search = BeamSearch(self.model, self.kv_caches, self.block_manager, self.device, self.eos_token_ids, params,
                            cascade=self.runner.cascade)
        search.check_fits(token_ids)
        try:
            waves = list(search.run_in_waves(token_ids))
        except BaseException:
            # Beams may be left in the block manager, and prompt blocks whose KV was never
            # written in its prefix cache.
            self._reset()
            raise
        results = []
        for i, (beams, saved) in enumerate(waves):
            prompt = token_ids[i]
            outputs = [CompletionOutput(rank, self._completion_text(prompt, b.tokens[len(prompt):]),
                                        b.tokens[len(prompt):], "stop" if b.finished else "length", b.cum_logprob)
                       for rank, b in enumerate(beams)]
            metrics = {"beam_scores": [beam_score(b, params.length_penalty) for b in beams],
                       "kv_memory_saved": saved}
            results.append(RequestOutput(str(i), prompts[i], prompt, outputs, metrics))
        return results

    @_exclusive
    def take_output(self, request_id):
        """The RequestOutput of a request whose sequences have finished; forgets the request."""
        if request_id not in self._requests:
            raise KeyError(f"request_id: no request {request_id!r} (never added, or its output was taken)")
        if not self._finished(request_id):
            raise ValueError(f"request_id: request {request_id!r} has not finished (abort it first)")
        output = self._output(request_id)
        del self._requests[request_id]
        return output

    def _output(self, request_id):
        r = self._requests[request_id]
        seqs = r["seqs"]
        outputs = [CompletionOutput(s.index, s.text.text if s.text is not None and s.text.stopped
                                    else self._completion_text(s.prompt, s.output), list(s.output), s.finish_reason,
                                    s.cumulative_logprob, None if s.logprobs is None else list(s.logprobs))
                   for s in seqs]
        end = time.perf_counter()
        first = r["first_token"] or end
        generated = sum(len(s.output) for s in seqs)
        metrics = {"time_to_first_token": first - r["start"],
                   "decode_tokens_per_s": (generated - len(seqs)) / (end - first) if end > first else 0.0,
                   "cached_prompt_tokens": seqs[0].cached_prompt_tokens}
        if self.speculator is not None:
            metrics.update(self.speculator.metrics(seqs))
        prompt_logprobs = seqs[0].prompt_logprobs
        return RequestOutput(request_id, r["prompt"], r["token_ids"], outputs, metrics,
                             None if prompt_logprobs is None else list(prompt_logprobs))

    def _completion_text(self, prompt, output):
        return completion_text(self.tokenizer, prompt, output)


def _check_model_arg(name, model):
    if not isinstance(model, (str, os.PathLike, LlamaForCausalLM)):
        raise TypeError(f"{name}: expected a model folder (a str or path) or a LlamaForCausalLM, "
                        f"got {type(model).__name__}")


def _prompt_list(prompts):
    """generate's and beam_search's prompts as a list: one prompt (text or token ids) or a list of them."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and isinstance(prompts[0], numbers.Integral)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected text, token ids or a list of them, got {type(prompts).__name__}")
    return list(prompts)


def _check_kv_fits(need, num_blocks, block_size, device):
    """The KV cache of num_blocks blocks, need bytes (a draft model's included), must fit the
    device's memory: a larger one would fail in allocation after the weights loaded, or on the
    CPU be granted and then exhaust the machine's memory as it is zeroed."""
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > have:
        raise ValueError(f"num_blocks, block_size: a KV cache of {num_blocks} blocks of {block_size} tokens needs "
                         f"{need / 2**30:.1f} GiB, the {device.type} has {have / 2**30:.1f} GiB")


def _kv_block_bytes(model, block_size, kv_dtype=None):
    """Bytes of one block of K and V in every layer: kv_dtype's elements, or the model's."""
    args = model.args
    element = kv_dtype.itemsize if kv_dtype is not None else model.lm_head.weight.element_size()
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * element


CUDA_HEAD_DIMS = (64, 128, 256)  # what the CUDA attention kernels are built for


def _check_cuda_head_dim(model, device, name):
    head_dim = model.args.head_dim
    if device.type == "cuda" and head_dim not in CUDA_HEAD_DIMS:
        raise ValueError(f"{name}: head_dim {head_dim} has no CUDA attention kernel (built for {CUDA_HEAD_DIMS}); "
                         f"run it on the CPU")


def _load_tokenizer(folder):
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{path}: cannot read the tokenizer ({e})") from None
