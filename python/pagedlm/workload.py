"""A simulated serving workload for the block manager, with no model behind it.

`synthetic_requests` draws the requests of the block-manager benchmark's trace (prompts
of 16-2,048 tokens, half behind a few shared system prompts, 1-512 decode steps, 30% of
requests sampled 2-4 ways). `simulate` runs them through a minimal continuous-batching
scheduler: admit while blocks last, one token per running sequence per step, build the
block tables and slot mapping each step, preempt the newest request (to be recomputed)
when blocks run out, free finished requests. It drives any manager with the
BlockManager interface: `pagedlm demo` runs it on the C++ one, bench/ records it as a trace.
"""
import random
from dataclasses import dataclass, field


@dataclass
class Request:
    prompt: list
    max_new_tokens: int
    num_samples: int = 1


@dataclass
class SimulationStats:
    steps: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    cow_copies: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    # Per step: KV slots holding tokens / slots allocated, for paging and for a system that
    # reserves max_len contiguous slots per sequence (the vLLM paper's baseline).
    paged_utilization: list = field(default_factory=list)
    reserved_utilization: list = field(default_factory=list)


def synthetic_requests(num_requests=1000, *, seed=0, min_prompt=16, max_prompt=2048, max_new_tokens=512,
                       fork_fraction=0.3, shared_prefix_fraction=0.5, vocab_size=32000):
    rng = random.Random(seed)
    system_prompts = [[rng.randrange(vocab_size) for _ in range(rng.randint(64, 1024))] for _ in range(4)]
    requests = []
    for _ in range(num_requests):
        length = rng.randint(min_prompt, max_prompt)
        prefix = rng.choice(system_prompts)[:length - 1] if rng.random() < shared_prefix_fraction else []
        prompt = prefix + [rng.randrange(vocab_size) for _ in range(length - len(prefix))]
        samples = rng.randint(2, 4) if rng.random() < fork_fraction else 1
        requests.append(Request(prompt, rng.randint(1, max_new_tokens), samples))
    return requests


def simulate(manager, requests, *, max_running=256, seed=0, track_utilization=True, on_step=None):
    """Serve `requests` on `manager`; returns SimulationStats. `on_step(step, stats)` is
    called after every decode step. Every request is served: none is dropped."""
    rng = random.Random(seed)
    block_size = manager.block_size
    max_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    stats = SimulationStats()
    outputs = [None] * len(requests)      # per request, per sample: tokens generated so far
    waiting = list(range(len(requests)))  # request indices, oldest first
    running = []                          # (request index, seq id of each sample)
    next_seq = 0
    while waiting or running:
        # Admit while the request fits with room left for one step of every running sequence
        # (one token needs at most one block: a new one, or the copy of a shared last block).
        while waiting and len(running) < max_running:
            index = waiting[0]
            request = requests[index]
            resumed = outputs[index] is not None
            samples = outputs[index] or [[] for _ in range(request.num_samples)]
            blocks = sum(-(-(len(request.prompt) + len(out)) // block_size) for out in samples)
            reserve = sum(len(seqs) for _, seqs in running) + len(samples)
            if (blocks if resumed else blocks // len(samples)) + reserve > manager.num_free_blocks:
                break
            waiting.pop(0)
            outputs[index] = samples
            seqs = list(range(next_seq, next_seq + len(samples)))
            next_seq += len(samples)
            if resumed:  # preempted earlier: recompute each sample's prompt + output so far
                for seq, out in zip(seqs, samples):
                    stats.cached_prompt_tokens += manager.allocate(seq, request.prompt + out)
            else:
                stats.cached_prompt_tokens += manager.allocate(seqs[0], request.prompt)
                for child in seqs[1:]:
                    manager.fork(seqs[0], child)
            stats.prompt_tokens += len(request.prompt)
            running.append((index, seqs))
        if not running:
            raise RuntimeError("a single request does not fit in the cache: give it more blocks")
        while sum(len(seqs) for _, seqs in running) > manager.num_free_blocks and len(running) > 1:
            index, seqs = running.pop()
            for seq in seqs:
                manager.free(seq)
            waiting.insert(0, index)
            stats.preemptions += 1

        ids = [seq for _, seqs in running for seq in seqs]
        for index, seqs in running:
            for seq, out in zip(seqs, outputs[index]):
                token = rng.randrange(32000)
                stats.cow_copies += len(manager.append(seq, [token]))
                out.append(token)
        manager.block_tables(ids)
        manager.slot_mapping(ids, [1] * len(ids))
        stats.steps += 1
        stats.generated_tokens += len(ids)
        if track_utilization:
            stats.paged_utilization.append(manager.stats()["utilization"])
            stats.reserved_utilization.append(sum(manager.num_tokens(s) for s in ids) / (len(ids) * max_len))
        if on_step:
            on_step(stats.steps, stats)

        still_running = []
        for index, seqs in running:
            if len(outputs[index][0]) < requests[index].max_new_tokens:
                still_running.append((index, seqs))
            else:
                for seq in seqs:
                    manager.free(seq)
        running = still_running
    return stats
