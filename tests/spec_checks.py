"""Checks shared by the speculative tests on the CPU (graph stand-ins) and on the GPU."""


def assert_drafts_take_turns(llm, batch, params, expected):
    """Generates batch with llm, a speculative engine whose drafts do not all fit its largest
    graph: every speculative forward replays a graph, fewer sequences than the batch draft in
    any step, every sequence gets its turn, and the tokens are `expected` (plain decoding's)."""
    varlen, graphs, drafting = llm.runner.varlen, [], []
    graph_for = varlen.graph_for
    varlen.graph_for = lambda *shape: graphs.append(graph_for(*shape)) or graphs[-1]
    propose = llm.speculator.proposer.propose
    llm.speculator.proposer.propose = lambda seqs, caps: drafting.append(len(seqs)) or propose(seqs, caps)
    outputs = llm.generate(batch, params, use_tqdm=False)
    assert [[o.token_ids for o in r.outputs] for r in outputs] == expected
    assert graphs and all(g is not None for g in graphs), "a speculative step ran eagerly"
    assert max(drafting) < len(batch), "every sequence drafted at once: no turns taken"
    assert all(o.metrics["draft_steps"] > 0 for o in outputs), "a sequence never got its turn"
