"""Beam search on the paged cache (LLM.beam_search). Beams are forks of one sequence in the
BlockManager: a beam that keeps several children forks them (sharing every block), and the
partly filled last block is copied on write with copy_blocks when a child appends; beams
that no child continues are freed at once. Each step is one forward over the live beams of
every prompt.

Selection follows vLLM's LLM.beam_search: every live beam offers its 2 * beam_width most
likely next tokens; candidates ending in EOS (unless ignore_eos) are set aside as completed,
the others ranked by cumulative log-probability keep the best beam_width. At the end the
completed and live beams are ranked by cum_logprob / length ** length_penalty, the length
counting the prompt and not a final EOS, and the best beam_width are returned.
"""
import itertools
import math
from dataclasses import dataclass

import torch

from pagedlm.engine.checks import check_bool, check_float, check_int
from pagedlm.engine.forward import ForwardItem, apply_block_copies, paged_forward


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    length_penalty: float = 1.0
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "beam_width", check_int("beam_width", self.beam_width, minimum=1))
        object.__setattr__(self, "max_tokens", check_int("max_tokens", self.max_tokens, minimum=1))
        object.__setattr__(self, "length_penalty", check_float("length_penalty", self.length_penalty))
        object.__setattr__(self, "ignore_eos", check_bool("ignore_eos", self.ignore_eos))


@dataclass
class Beam:
    seq_id: int
    tokens: list          # prompt and generated
    cum_logprob: float
    finished: bool = False


def beam_score(beam, length_penalty):
    """cum_logprob / length ** length_penalty. Where the power leaves float's range (a penalty
    of a few hundred, either sign), the quotient's limit: -0.0 under a large penalty, -inf under
    a large negative one (a beam of log-probability 0 scores 0)."""
    length = len(beam.tokens) - beam.finished  # a finished beam ends in EOS, which does not count
    try:
        return beam.cum_logprob / length ** length_penalty
    except OverflowError:  # length ** length_penalty past float's largest value
        return -0.0 if beam.cum_logprob < 0 else 0.0
    except ZeroDivisionError:  # length ** length_penalty rounded to 0
        return -math.inf if beam.cum_logprob < 0 else 0.0


class BeamSearch:
    """One beam search over several prompts sharing a model, its KV caches and BlockManager."""

    def __init__(self, model, kv_caches, block_manager, device, eos_token_ids, params, cascade=False):
        """cascade: whether the beams' decode reads the prefix they share once (engine/cascade.py)."""
        self.model, self.kv_caches, self.bm, self.device = model, kv_caches, block_manager, device
        self.cascade = cascade
        self.eos, self.params = eos_token_ids, params
        self._ids = itertools.count(1 << 62)  # beam seq ids, apart from the engine's
        self.blocks_shared = self.blocks_unshared = 0  # summed over steps, for the saving figure

    def worst_case_blocks(self, prompt_len):
        """Blocks that a prompt's beams could hold with nothing shared, plus one copy each."""
        per_beam = -(-(prompt_len + self.params.max_tokens) // self.bm.block_size)
        return self.params.beam_width * (per_beam + 1)

    def check_fits(self, prompts):
        """ValueError for a prompt whose beams may never fit the cache."""
        for i, prompt in enumerate(prompts):
            if self.worst_case_blocks(len(prompt)) > self.bm.num_blocks:
                raise ValueError(f"prompts[{i}]: {self.params.beam_width} beams of {len(prompt)} + "
                                 f"{self.params.max_tokens} tokens may need {self.worst_case_blocks(len(prompt))} "
                                 f"KV blocks, the cache has {self.bm.num_blocks}")

    def run_in_waves(self, prompts):
        """(best beams, KV saving of its wave) for each prompt, searching as many prompts at
        once as fit the free blocks with nothing shared; ValueError for one that never fits."""
        self.check_fits(prompts)
        start = 0
        while start < len(prompts):
            wave, free = [], self.bm.num_free_blocks
            for prompt in prompts[start:]:
                if wave and self.worst_case_blocks(len(prompt)) > free:
                    break
                wave.append(prompt)
                free -= self.worst_case_blocks(len(prompt))
            self.blocks_shared = self.blocks_unshared = 0
            for beams in self.run(wave):
                yield beams, self.kv_saving()
            start += len(wave)

    def run(self, prompts):
        """[best beams, best first] for each prompt (token-id lists)."""
        beams, items = [], []
        for prompt in prompts:
            seq_id = next(self._ids)
            cached = self.bm.allocate(seq_id, prompt)
            beams.append([Beam(seq_id, list(prompt), 0.0)])
            items.append(ForwardItem(seq_id, prompt[cached:], cached, 0, None, [len(prompt) - cached - 1]))
        logprobs = torch.log_softmax(paged_forward(self.model, self.kv_caches, self.bm, self.device, items), -1)
        completed = [[] for _ in prompts]
        for step in range(self.params.max_tokens):
            rows = iter(logprobs)
            beams = [self._select(live, [next(rows) for _ in live], done, last=step == self.params.max_tokens - 1)
                     for live, done in zip(beams, completed)]
            live = [b for group in beams for b in group]
            if not live:
                break
            self._count_sharing(beams)
            if step == self.params.max_tokens - 1:
                break
            items = [ForwardItem(b.seq_id, b.tokens[-1:], len(b.tokens) - 1, 0, None, [0]) for b in live]
            logprobs = torch.log_softmax(paged_forward(self.model, self.kv_caches, self.bm, self.device, items,
                                                       cascade=self.cascade), -1)
        results = []
        for live, done in zip(beams, completed):
            for beam in live:
                self.bm.free(beam.seq_id)
            ranked = sorted(live + done, key=lambda b: beam_score(b, self.params.length_penalty),
                            reverse=True)
            results.append(ranked[:self.params.beam_width])
        return results

    def _select(self, live, logprobs, completed, last):
        """The next live beams of one prompt; completed gains the beams that ended in EOS."""
        width = self.params.beam_width
        candidates = []
        for beam, row in zip(live, logprobs):
            top = torch.topk(row, min(2 * width, row.numel()))
            for logprob, token in zip(top.values.tolist(), top.indices.tolist()):
                candidates.append((beam.cum_logprob + logprob, beam, token))
        candidates.sort(key=lambda c: c[0], reverse=True)  # stable: ties keep beam, then rank order
        chosen = []
        for cum, beam, token in candidates:
            if token in self.eos and not self.params.ignore_eos:
                completed.append(Beam(-1, beam.tokens + [token], cum, finished=True))
            elif len(chosen) < width:
                chosen.append((cum, beam, token))
        return self._continue(live, chosen, last)

    def _continue(self, live, chosen, last):
        """Beams for the chosen (cum_logprob, parent, token), in that order: a parent's first
        child takes its sequence, the others fork it before anything is appended; parents
        left without a child are freed."""
        seq_ids = {}
        for cum, beam, token in chosen:
            if id(beam) in seq_ids:
                seq_ids[id(beam)].append(next(self._ids))
                self.bm.fork(beam.seq_id, seq_ids[id(beam)][-1])
            else:
                seq_ids[id(beam)] = [beam.seq_id]
        for beam in live:
            if id(beam) not in seq_ids:
                self.bm.free(beam.seq_id)
        new_beams, copies, taken = [], [], {}
        for cum, beam, token in chosen:
            seq_id = seq_ids[id(beam)][taken.setdefault(id(beam), 0)]
            taken[id(beam)] += 1
            if not last:  # the last step's tokens are never computed
                copies += self.bm.append(seq_id, [token])
            new_beams.append(Beam(seq_id, beam.tokens + [token], cum))
        apply_block_copies(self.kv_caches, copies, self.device)
        return new_beams

    def _count_sharing(self, beams):
        for group in beams:
            tables = [self.bm.block_table(b.seq_id) for b in group]
            self.blocks_shared += len({block for table in tables for block in table})
            self.blocks_unshared += sum(len(table) for table in tables)

    def kv_saving(self):
        """The fraction of KV blocks that sharing saved against unshared beams, over the steps."""
        return 1 - self.blocks_shared / self.blocks_unshared if self.blocks_unshared else 0.0
