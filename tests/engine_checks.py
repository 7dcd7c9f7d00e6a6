"""What the fault tests and the engine fuzz share: the engine's bookkeeping invariant, and the
garbage KV that a failing step may leave."""
import torch

from pagedlm.engine.sequence import Status

FINISH_REASONS = {"stop", "length", "abort", "refused", "error"}


def write_garbage_kv(llm, seq_ids, counts):
    """What a step that fails midway may leave: garbage in the KV slots of each sequence's last
    counts[i] tokens, in every layer's cache."""
    slots = torch.from_numpy(llm.block_manager.slot_mapping(seq_ids, counts))
    for cache in llm.kv_caches:
        for t in cache[:2]:
            t.view(-1, *t.shape[2:])[slots] = 7.0


def check_consistent(llm):
    """The block manager holds exactly the running sequences' blocks and KV; every unfinished
    sequence is in exactly one queue, finished ones in none."""
    bm, scheduler = llm.block_manager, llm.scheduler
    running = scheduler.running
    assert len(bm) == len(running)
    held = set()
    for seq in running:
        assert seq.status == Status.RUNNING and seq.seq_id in bm
        assert bm.num_tokens(seq.seq_id) == seq.num_cached <= len(seq)
        held.update(bm.block_table(seq.seq_id))
    assert bm.stats()["used_blocks"] == len(held)
    waiting = [s for group in scheduler.waiting for s in group]
    assert all(s.status == Status.WAITING and s.num_cached == 0 and s.seq_id not in bm for s in waiting)
    queued = [id(s) for s in running + waiting]
    assert len(queued) == len(set(queued))
    live = {id(s) for r in llm._requests.values() for s in r["seqs"] if s.status != Status.FINISHED}
    assert live == set(queued)
    for r in llm._requests.values():
        for s in r["seqs"]:
            assert (s.finish_reason in FINISH_REASONS) == (s.status == Status.FINISHED)
