"""The scheduler's order and preemption policy, on the block manager alone."""
import pagedlm
from pagedlm import SamplingParams
from pagedlm.engine.scheduler import Scheduler
from pagedlm.engine.sequence import Sequence, Status


def admitted(scheduler, prompts):
    seqs = [Sequence(i, str(i), 0, prompt, SamplingParams()) for i, prompt in enumerate(prompts)]
    for seq in seqs:
        scheduler.add([seq])
    batch, _ = scheduler.schedule()
    for s in batch:  # as the engine does after the forward: cached, then one token out
        s.seq.num_cached += s.num_new
        s.seq.output.append(7)
    return seqs


def test_decodes_run_oldest_first_and_the_newest_is_preempted():
    # Five sequences of 4 tokens fill a block of 4 each; one block is left. Each decode needs a
    # new block: the oldest takes the free one, the next two the blocks of the two newest.
    bm = pagedlm.BlockManager(6, 4)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    seqs = admitted(scheduler, [[i, i + 1, i + 2, i + 3] for i in range(0, 20, 4)])
    batch, _ = scheduler.schedule()
    assert [s.seq.seq_id for s in batch] == [0, 1, 2]
    assert [s.status for s in seqs] == [Status.RUNNING] * 3 + [Status.WAITING] * 2
    assert [group[0].seq_id for group in scheduler.waiting] == [3, 4]  # back in their order of arrival
    assert scheduler.preemptions == 2
