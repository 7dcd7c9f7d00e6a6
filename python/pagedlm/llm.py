"""pagedlm.LLM: offline generation with the familiar vLLM API, on the C++ block manager and
pagedlm's paged-attention ops (continuous batching, preemption by recompute, prefix
caching, n > 1 by copy-on-write forks)."""
import itertools
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import pagedlm
from pagedlm._torch_glue import debug_checks
from pagedlm.beam_search import BeamSearch, BeamSearchParams, beam_score
from pagedlm.engine.runner import ModelRunner
from pagedlm.engine.sampler import sample
from pagedlm.engine.scheduler import Scheduler
from pagedlm.engine.sequence import SamplingParams, Sequence, Status
from pagedlm.models import LlamaForCausalLM, load_model
from pagedlm.models.loader import read_config
from pagedlm.spec import Speculator, check_config, make_proposer, verification_bounds

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "RequestOutput", "CompletionOutput"]

CPU_KV_BUDGET_BYTES = 1 << 30


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: str
    cumulative_logprob: float


@dataclass
class RequestOutput:
    request_id: str
    prompt: object
    prompt_token_ids: list
    outputs: list
    metrics: dict = field(default_factory=dict)


class LLM:
    def __init__(self, model, *, device=None, dtype=None, block_size=16, num_blocks=None,
                 gpu_memory_utilization=0.9, max_num_seqs=256, max_num_batched_tokens=8192,
                 enable_prefix_caching=True, seed=0, enforce_eager=False, speculative=None):
        if speculative is not None:
            check_config(speculative)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer, self.eos_token_ids = None, frozenset()
        if isinstance(model, LlamaForCausalLM):
            self.model = model.to(self.device)
        else:
            self.model = load_model(model, dtype=dtype, device=self.device)
            eos = read_config(model).get("eos_token_id")  # an id, a list of ids (Llama 3) or absent
            self.eos_token_ids = frozenset([eos] if isinstance(eos, int) else eos or ())
            self.tokenizer = _load_tokenizer(Path(model))
        _check_cuda_head_dim(self.model, self.device, "model")
        draft = (self._load_draft(speculative["model"], dtype)
                 if speculative is not None and speculative["method"] == "draft" else None)
        if draft is not None:
            _check_cuda_head_dim(draft, self.device, "speculative['model']")
        if num_blocks is None:
            # A draft model's cache has as many blocks as the target's.
            bytes_per_block = sum(_kv_block_bytes(m, block_size) for m in (self.model, draft) if m is not None)
            budget = (torch.cuda.mem_get_info(self.device)[0] * gpu_memory_utilization
                      if self.device.type == "cuda" else CPU_KV_BUDGET_BYTES)
            num_blocks = max(1, int(budget // bytes_per_block))
        self.block_manager = pagedlm.BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.kv_caches = self.model.make_kv_caches(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        # Decode steps replay CUDA graphs on the GPU unless enforce_eager (as vLLM's option) or
        # PAGEDLM_DEBUG=1, whose value checks synchronize, which no capture allows.
        self.runner = ModelRunner(self.model, self.kv_caches, self.block_manager, self.device,
                                  max_num_seqs=max_num_seqs,
                                  use_cuda_graphs=self.device.type == "cuda" and not enforce_eager
                                  and not debug_checks())
        self.seed = seed
        self.speculator = None
        if speculative is not None:
            proposer = make_proposer(speculative, draft_model=draft, num_blocks=num_blocks, block_size=block_size,
                                     device=self.device, engine_seed=seed,
                                     use_cuda_graphs=self.runner.graphs is not None,
                                     max_num_seqs=max_num_seqs)
            self.speculator = Speculator(proposer, self.runner, max_num_batched_tokens, seed,
                                         adaptive=speculative.get("adaptive", True))
            if self.runner.varlen is not None:  # verification graphs up front
                # Chains verify unmasked; trees (lookahead) masked, and their accepted tokens are
                # recomputed in the next step unmasked (when it drafts nothing).
                self.runner.varlen.capture_all(masked=False)
                if speculative["method"] == "lookahead":
                    self.runner.varlen.capture_all(masked=True)
                self.speculator.capture_verification_graphs(max_num_seqs, *verification_bounds(speculative))
        self._ids = itertools.count()
        self._requests = {}

    # -- requests ---------------------------------------------------------------------
    def add_request(self, prompt, params):
        """Queues a prompt (text or token ids); returns its request id."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        request_id = str(next(self._ids))
        token_ids = self._token_ids(prompt, f"prompts[{request_id}]")
        seqs = [Sequence(next(self._ids), request_id, i, list(token_ids), params) for i in range(params.n)]
        self._requests[request_id] = dict(prompt=prompt, token_ids=token_ids, seqs=seqs, start=time.perf_counter(),
                                          first_token=None)
        needed = -(-(len(token_ids) + params.max_tokens) // self.block_manager.block_size)
        why_never = (f"needs {needed} KV blocks, the cache has {self.block_manager.num_blocks}"
                     if needed > self.block_manager.num_blocks else
                     f"needs {params.n} sequences at once, max_num_seqs is {self.scheduler.max_num_seqs}"
                     if params.n > self.scheduler.max_num_seqs else None)
        if why_never:
            warnings.warn(f"request {request_id}: {why_never}; refused")
            for s in seqs:
                s.status, s.finish_reason = Status.FINISHED, "refused"
        else:
            self.scheduler.add(seqs)
        return request_id

    def _token_ids(self, prompt, name):
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{name}: text needs a tokenizer.json in the model folder; pass token ids")
            token_ids = self.tokenizer.encode(prompt).ids
        else:
            token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise ValueError(f"{name}: empty prompt")
        return token_ids

    def sequences(self, request_id):
        """The request's Sequence objects, one per sample, whose `output` lists grow as steps
        sample tokens and whose `finish_reason` is set when they end: what a streaming front end
        reads between steps (the request stays until take_output)."""
        return list(self._requests[request_id]["seqs"])

    def finish_sequence(self, seq, reason="stop"):
        """Ends one sample of a request now, freeing its blocks (a front end found a stop string
        in its text); its siblings go on. A no-op on a finished sample."""
        if seq.status == Status.FINISHED:
            return
        if seq.status == Status.RUNNING:
            self.scheduler.finish(seq)
        else:  # waiting (preempted, or not yet admitted): out of its queued group
            self.scheduler.waiting = type(self.scheduler.waiting)(
                left for left in ([s for s in group if s is not seq] for group in self.scheduler.waiting) if left)
            seq.status = Status.FINISHED
        seq.finish_reason = reason
        if self.speculator is not None:
            self.speculator.finished(seq)

    def abort(self, request_id):
        self.scheduler.abort(request_id)
        if self.speculator is not None and request_id in self._requests:
            for seq in self._requests[request_id]["seqs"]:
                self.speculator.finished(seq)

    def step(self):
        """One engine iteration; returns the number of tokens sampled."""
        scheduled, copies = self.scheduler.schedule()
        if not scheduled:
            return 0
        if self.speculator is not None:
            emitted = self.speculator.step(scheduled, copies)
            if emitted is not None:
                kept = {seq: self._emit_tokens(seq, tokens) for seq, tokens in emitted.items()}
                self.speculator.speculative_step_done(scheduled, kept)
                return sum(kept.values())
        seqs, logits, choices = self.runner.step(scheduled, copies)
        sampled, logprobs = sample(logits, seqs, self.seed, choices) if seqs else ([], [])
        for seq, token, logprob in zip(seqs, sampled, logprobs):
            self._emit(seq, token, logprob)
        if self.speculator is not None:
            self.speculator.plain_step_done(scheduled, len(seqs))
        return len(seqs)

    def _emit_tokens(self, seq, tokens):
        """Appends (token, logprob) pairs up to a stop or max_tokens (the rest are dropped);
        returns how many it kept."""
        for count, (token, logprob) in enumerate(tokens, 1):
            if self._emit(seq, token, logprob):
                return count
        return len(tokens)

    def _emit(self, seq, token, logprob):
        """Appends a sampled token; True when it finishes the sequence."""
        seq.output.append(token)
        seq.cumulative_logprob += logprob
        request = self._requests[seq.request_id]
        request["first_token"] = request["first_token"] or time.perf_counter()
        if token in seq.params.stop_token_ids or (token in self.eos_token_ids and not seq.params.ignore_eos):
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.params.max_tokens:
            seq.finish_reason = "length"
        if seq.finish_reason:
            self.scheduler.finish(seq)
            if self.speculator is not None:
                self.speculator.finished(seq)
        return bool(seq.finish_reason)

    # -- the offline API ----------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        """sampling_params: one SamplingParams for every prompt, or a list of one per prompt (as vLLM takes)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        else:
            params = [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            done = set()
            while self.scheduler.has_work():
                self.step()
                finished = {r for r in ids if r not in done and
                            all(s.status == Status.FINISHED for s in self._requests[r]["seqs"])}
                bar.update(len(finished))
                done |= finished
        return [self.take_output(r) for r in ids]

    def beam_search(self, prompts, params):
        """The best params.beam_width beams of each prompt (text or token ids), best first, as
        RequestOutputs; metrics hold the beams' scores and the KV memory that sharing saved.
        Prompts are searched together in waves that fit the cache with nothing shared."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_ids = [self._token_ids(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
        search = BeamSearch(self.model, self.kv_caches, self.block_manager, self.device, self.eos_token_ids, params)
        results = []
        for i, (beams, saved) in enumerate(search.run_in_waves(token_ids)):
            prompt = token_ids[i]
            outputs = [CompletionOutput(rank, self._completion_text(prompt, b.tokens[len(prompt):]),
                                        b.tokens[len(prompt):], "stop" if b.finished else "length", b.cum_logprob)
                       for rank, b in enumerate(beams)]
            metrics = {"beam_scores": [beam_score(b, params.length_penalty) for b in beams],
                       "kv_memory_saved": saved}
            results.append(RequestOutput(str(i), prompts[i], prompt, outputs, metrics))
        return results

    def take_output(self, request_id):
        """The RequestOutput of a request whose sequences have finished; forgets the request."""
        r = self._requests.pop(request_id)
        seqs = r["seqs"]
        outputs = [CompletionOutput(s.index, self._completion_text(s.prompt, s.output), list(s.output), s.finish_reason,
                                    s.cumulative_logprob) for s in seqs]
        end = time.perf_counter()
        first = r["first_token"] or end
        generated = sum(len(s.output) for s in seqs)
        metrics = {"time_to_first_token": first - r["start"],
                   "decode_tokens_per_s": (generated - len(seqs)) / (end - first) if end > first else 0.0,
                   "cached_prompt_tokens": seqs[0].cached_prompt_tokens}
        if self.speculator is not None:
            metrics.update(self.speculator.metrics(seqs))
        return RequestOutput(request_id, r["prompt"], r["token_ids"], outputs, metrics)

    def _load_draft(self, model, dtype):
        draft = model.to(self.device) if isinstance(model, LlamaForCausalLM) else load_model(model, dtype=dtype,
                                                                                               device=self.device)
        if draft.args.vocab_size != self.model.args.vocab_size:
            raise ValueError(f"speculative['model']: vocabulary of {draft.args.vocab_size} tokens, the target's is "
                             f"{self.model.args.vocab_size}")
        return draft

    def _completion_text(self, prompt, output):
        """The text the output adds to the prompt: decoding the two together and dropping the
        prompt's text keeps the spaces and merges that decoding the output alone would lose."""
        if not self.tokenizer or not output:
            return ""
        prompt_text = self.tokenizer.decode(prompt)
        full_text = self.tokenizer.decode(prompt + output)
        return full_text[len(prompt_text):] if full_text.startswith(prompt_text) else self.tokenizer.decode(output)


def _kv_block_bytes(model, block_size):
    args = model.args
    return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * model.lm_head.weight.element_size()


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
