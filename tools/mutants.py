"""The mutants of tools/mutate.py: each a plausible bug, planted by replacing one exact snippet
of one file, with the tests that own that code (pytest node ids or files; `cpp:FILTER` runs the
C++ unit tests with that --gtest_filter). `equivalent`, when given, argues why the mutant cannot
change behaviour; such a mutant is still run (a kill proves the argument wrong) but a survivor
leaves the kill rate's denominator.

Owning tests are fast example tests: the randomized stateful test of the block manager and the
statistical tests of verification are deliberately not owners, so a mutant only they catch
counts as a gap.
"""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str
    file: str
    original: str
    replacement: str
    tests: tuple
    equivalent: str = ""


BM = "cpp/src/block_manager.cpp"
BM_TESTS = ("cpp:*", "tests/test_block_manager.py", "tests/test_block_manager_rules.py")
PREFILL = "cpp/src/paged_prefill.cpp"
ATTN_TESTS = ("tests/test_paged_prefill.py", "tests/test_paged_decode.py")
VERIFY_H = "cpp/include/pagedlm/verify.h"
VERIFY = "cpp/src/verify.cpp"
VERIFY_TESTS = ("tests/test_verify.py", "tests/test_verify_boundaries.py")
SCHED = "python/pagedlm/engine/scheduler.py"
LLM = "python/pagedlm/llm.py"
RECOVERY = "python/pagedlm/engine/recovery.py"
ENGINE_TESTS = ("tests/test_engine_logprobs.py", "tests/test_engine.py::test_n_samples_share_prompt_blocks_and_abort_frees_them",
                "tests/test_engine.py::test_one_sampling_params_per_prompt",
                "tests/test_engine.py::test_prefix_caching_reuses_blocks_and_changes_nothing",
                "tests/test_engine.py::test_chunked_prefill_changes_nothing")
CASCADE = "python/pagedlm/engine/cascade.py"
GRAPHS = "python/pagedlm/engine/cuda_graphs.py"
SERVING_TESTS = ("tests/test_serving_engine.py",)
CASCADE_TESTS = ("tests/test_cascade_engine.py",
                 "tests/test_spec_graphs.py::test_cascade_decode_graphs_emit_the_eager_tokens")
GRAPH_TESTS = ("tests/test_spec_graphs.py",)
FAULT_TESTS = ("tests/test_engine_faults.py::test_a_failed_step_fails_its_requests_and_the_others_go_on",
               "tests/test_engine_faults.py::test_a_request_that_fails_steps_fails_alone")
SAMPLER = "python/pagedlm/engine/sampler.py"
SAMPLER_TESTS = ("tests/test_sampler.py",)
RUNNER = "python/pagedlm/engine/runner.py"
PROMPT_LOGPROBS_TESTS = ("tests/test_prompt_logprobs.py",)
SCALING_TESTS = ("tests/test_scaling_laws.py", "tests/test_scaling_params.py", "tests/test_scaling_design.py",
                 "tests/test_scaling_flops.py", "tests/test_scaling_memory.py")

MUTANTS = [
    # ---- block manager: refcounts -------------------------------------------------------
    Mutant("bm_release_threshold", "block_manager", BM,
           "if (--ref_count_[block] > 0) return;", "if (--ref_count_[block] > 1) return;", BM_TESTS),
    Mutant("bm_free_skips_first_block", "block_manager", BM,
           "for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) release(*b);",
           "for (auto b = blocks.rbegin(); b + 1 < blocks.rend(); ++b) release(*b);", BM_TESTS),
    Mutant("bm_free_forward_order", "block_manager", BM,
           "for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) release(*b);",
           "for (auto b = blocks.begin(); b != blocks.end(); ++b) release(*b);", BM_TESTS),
    Mutant("bm_fork_no_refcount", "block_manager", BM,
           "for (BlockId block : parent.blocks) ++ref_count_[block];",
           "for (BlockId block : parent.blocks) (void)block;", BM_TESTS),
    Mutant("bm_fork_refcount_twice", "block_manager", BM,
           "for (BlockId block : parent.blocks) ++ref_count_[block];",
           "for (BlockId block : parent.blocks) ref_count_[block] += 2;", BM_TESTS),
    Mutant("bm_acquire_keeps_lru_entry", "block_manager", BM,
           "if (ref_count_[block]++ == 0) lru_remove(block);", "ref_count_[block]++;", BM_TESTS),
    # ---- block manager: copy-on-write ---------------------------------------------------
    Mutant("bm_cow_threshold", "block_manager", BM,
           "partial && ref_count_[seq.blocks.back()] > 1;", "partial && ref_count_[seq.blocks.back()] > 2;",
           BM_TESTS),
    Mutant("bm_cow_keeps_refcount", "block_manager", BM,
           "--ref_count_[last];  // still > 0: another sequence holds it", "// (no release of the shared block)",
           BM_TESTS),
    Mutant("bm_cow_full_block", "block_manager", BM,
           "const bool partial = seq.num_tokens % block_size_ != 0;",
           "const bool partial = seq.num_tokens > 0;", BM_TESTS),
    Mutant("bm_cow_not_counted", "block_manager", BM,
           "static_cast<int64_t>(seq.blocks.size()) + copy_on_write;",
           "static_cast<int64_t>(seq.blocks.size());", BM_TESTS),
    Mutant("bm_append_keeps_stale_cache_entry", "block_manager", BM,
           "unregister(last);  // about to be overwritten", "// about to be overwritten", BM_TESTS),
    # ---- block manager: truncate --------------------------------------------------------
    Mutant("bm_truncate_floor_blocks", "block_manager", BM,
           "const size_t keep = static_cast<size_t>(blocks_for(num_tokens));",
           "const size_t keep = static_cast<size_t>(num_tokens / block_size_);", BM_TESTS),
    Mutant("bm_truncate_keeps_chain_ids", "block_manager", BM,
           "if (seq.chain_id.size() > full) seq.chain_id.resize(full);", "(void)full;", BM_TESTS),
    Mutant("bm_truncate_keeps_tokens", "block_manager", BM,
           "seq.tokens.resize(num_tokens);", "seq.tokens.reserve(num_tokens);", BM_TESTS),
    # ---- block manager: prefix-cache keying and eviction ---------------------------------
    Mutant("bm_lookup_skips_token_compare", "block_manager", BM,
           "bool same = parent_id_[block] == parent_id &&\n"
           "              std::memcmp(held, tokens, sizeof(TokenId) * block_size_) == 0;",
           "bool same = parent_id_[block] == parent_id; (void)held;", BM_TESTS),
    Mutant("bm_lookup_skips_parent_compare", "block_manager", BM,
           "bool same = parent_id_[block] == parent_id &&\n",
           "bool same = parent_id == parent_id &&\n", BM_TESTS),
    Mutant("bm_hash_ignores_parent", "block_manager", BM,
           "uint64_t h = mix64(parent_id ^ 0x9e3779b97f4a7c15ULL);",
           "uint64_t h = mix64(0x9e3779b97f4a7c15ULL); (void)parent_id;", BM_TESTS,
           equivalent=""),
    Mutant("bm_hit_covers_last_token", "block_manager", BM,
           "(i + 1) * block_size_ <= n - 1; ++i)", "(i + 1) * block_size_ <= n; ++i)", BM_TESTS),
    Mutant("bm_hit_chain_not_followed", "block_manager", BM,
           "      parent = cache_id_[block];\n", "      parent = 0;\n", BM_TESTS),
    Mutant("bm_lru_hits_not_reserved", "block_manager", BM,
           "hits_in_lru += ref_count_[block] == 0;", "hits_in_lru += 0;", BM_TESTS),
    Mutant("bm_evict_most_recent", "block_manager", BM,
           "block = lru_head_;  // callers", "block = lru_tail_;  // callers", BM_TESTS),
    Mutant("bm_evict_keeps_cache_entry", "block_manager", BM,
           "    unregister(block);\n    ++evictions_;", "    ++evictions_;", BM_TESTS),
    Mutant("bm_release_never_caches", "block_manager", BM,
           "if (prefix_caching_ && cache_id_[block] != 0) {", "if (false) {", BM_TESTS),
    Mutant("bm_clash_shares_id", "block_manager", BM,
           "} else if (cached_.count(hash) != 0) {\n      id = next_cache_id_++;",
           "} else if (cached_.count(hash) != 0) {\n      id = cache_id_[cached_.at(hash)];", BM_TESTS),
    # ---- block manager: queries -----------------------------------------------------------
    Mutant("bm_can_allocate_strict", "block_manager", BM,
           "return blocks_for(num_tokens) <= num_free_blocks();",
           "return blocks_for(num_tokens) < num_free_blocks();", BM_TESTS),
    Mutant("bm_slot_mapping_offset", "block_manager", BM,
           "*out++ = static_cast<int64_t>(seq.blocks[t / block_size_]) * block_size_ + t % block_size_;",
           "*out++ = static_cast<int64_t>(seq.blocks[t / block_size_]) * block_size_;", BM_TESTS),
    Mutant("bm_stats_used_counts_cached", "block_manager", BM,
           "s.used_blocks = num_blocks_ - free_count_ - lru_count_;",
           "s.used_blocks = num_blocks_ - free_count_;", BM_TESTS),
    Mutant("bm_stats_hit_tokens", "block_manager", BM,
           "prefix_hit_tokens_ += cached_tokens;", "prefix_hit_tokens_ += n;", BM_TESTS),

    # ---- CPU attention kernels (prefill and, through the same loop, decode) ---------------
    Mutant("attn_no_scale", "kernels", PREFILL,
           "for (int32_t d = 0; d < D; ++d) q[r * D + d] *= p.scale;", "", ATTN_TESTS),
    Mutant("attn_window_off_by_one", "kernels", PREFILL,
           "std::max(0, pos - p.sliding_window + 1)", "std::max(0, pos - p.sliding_window)", ATTN_TESTS),
    Mutant("attn_causal_sees_next", "kernels", PREFILL,
           "return (p.causal && !p.mask) ? pos : len - 1;",
           "return (p.causal && !p.mask) ? std::min(pos + 1, len - 1) : len - 1;", ATTN_TESTS),
    Mutant("attn_causal_over_mask", "kernels", PREFILL,
           "return (p.causal && !p.mask) ? pos : len - 1;", "return p.causal ? pos : len - 1;", ATTN_TESTS),
    Mutant("attn_first_position", "kernels", PREFILL,
           "const int32_t first_pos = len - q_len + tile.q0;",
           "const int32_t first_pos = len - q_len + tile.q0 - (q_len > 1);", ATTN_TESTS),
    Mutant("attn_softcap_unscaled", "kernels", PREFILL,
           "s[j] = p.soft_cap * std::tanh(s[j] / p.soft_cap);", "s[j] = std::tanh(s[j] / p.soft_cap);",
           ATTN_TESTS),
    Mutant("attn_softcap_on_masked", "kernels", PREFILL,
           "bool visible = t >= lo && t <= hi && (!p.mask || mask_allows(query, t));",
           "bool visible = t >= lo && t <= hi && (!p.mask || mask_allows(query, t)) && p.soft_cap <= 0.0f;",
           ATTN_TESTS),
    Mutant("attn_lse_no_log", "kernels", PREFILL,
           "row_max[r] + std::log(row_sum[r])", "row_max[r] + row_sum[r]", ATTN_TESTS),
    Mutant("attn_lse_empty_row", "kernels", PREFILL,
           "std::log(row_sum[r]) : -inf;", "std::log(row_sum[r]) : 0.0f;",
           ATTN_TESTS),
    Mutant("attn_merge_acc_not_rescaled", "kernels", PREFILL,
           "for (int32_t d = 0; d < D; ++d) acc[r * D + d] *= rescale;", "", ATTN_TESTS),
    Mutant("attn_merge_sum_not_rescaled", "kernels", PREFILL,
           "row_sum[r] *= rescale;", "", ATTN_TESTS),
    Mutant("attn_packed_mask_bit_order", "kernels", PREFILL,
           ">> (elem % 8)) & 1) != 0;", ">> (7 - elem % 8)) & 1) != 0;", ATTN_TESTS),
    Mutant("attn_mask_transposed", "kernels", PREFILL,
           "const int64_t elem = static_cast<int64_t>(query) * len + t;",
           "const int64_t elem = static_cast<int64_t>(t) * len + query;", ATTN_TESTS),
    Mutant("attn_gqa_interleaved", "kernels", PREFILL,
           "    const int64_t qrow = static_cast<int64_t>(p.cu_seqlens_q[tile.b] + tile.q0 + r / group) * p.num_heads +\n"
           "                         static_cast<int64_t>(tile.kv_head) * group + r % group;",
           "    const int64_t qrow = static_cast<int64_t>(p.cu_seqlens_q[tile.b] + tile.q0 + r / group) * p.num_heads +\n"
           "                         tile.kv_head + static_cast<int64_t>(r % group) * p.num_kv_heads;", ATTN_TESTS),
    Mutant("decode_drops_window", "kernels", "cpp/src/paged_decode.cpp",
           "prefill.sliding_window = p.sliding_window;", "prefill.sliding_window = 0;",
           ("tests/test_paged_decode.py",)),
    Mutant("decode_drops_soft_cap", "kernels", "cpp/src/paged_decode.cpp",
           "prefill.soft_cap = p.soft_cap;", "prefill.soft_cap = 0.0f;", ("tests/test_paged_decode.py",)),
    Mutant("argmax_ties_go_high", "kernels", "cpp/src/sampling.cpp",
           "if (x > best || std::isnan(x)) best = x, index = i;",
           "if (x >= best || std::isnan(x)) best = x, index = i;", ("tests/test_argmax_logprob.py",)),
    Mutant("argmax_logprob_unshifted", "kernels", "cpp/src/sampling.cpp",
           "load_as_float(p.logits, base + i, p.dtype)) - best);", "load_as_float(p.logits, base + i, p.dtype)));",
           ("tests/test_argmax_logprob.py",)),
    Mutant("copy_blocks_skips_first_pair", "kernels", "cpp/src/kv_cache.cpp",
           "if (src != dst) std::memcpy", "if (src != dst && i > 0) std::memcpy", ("tests/test_kv_cache.py",)),
    Mutant("write_kv_value_stride", "kernels", "cpp/src/kv_cache.cpp",
           "v + t * p.value_stride * esize", "v + t * p.key_stride * esize",
           ("tests/test_kv_cache.py", "tests/test_kv_cache_strides.py")),

    # ---- verification ---------------------------------------------------------------------
    Mutant("verify_accept_le", "verification", VERIFY_H,
           "static_cast<double>(q) < static_cast<double>(p);", "static_cast<double>(q) <= static_cast<double>(p);",
           VERIFY_TESTS),
    Mutant("verify_accept_q_zero", "verification", VERIFY_H,
           "return q > 0.0f && static_cast<double>", "return q >= 0.0f && static_cast<double>", VERIFY_TESTS),
    Mutant("verify_accept_child_le", "verification", VERIFY_H,
           "return scale_by_draw(total, accept_word >> 8, 24) < weight;",
           "return scale_by_draw(total, accept_word >> 8, 24) <= weight;", VERIFY_TESTS),
    Mutant("verify_weight_unclamped", "verification", VERIFY_H,
           "const float clamped = x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f;",
           "const float clamped = x > 0.0f ? (x < 1.0f ? x : 2.0f) : 0.0f;", VERIFY_TESTS),
    Mutant("verify_sample_ge", "verification", VERIFY,
           "if (running > threshold) return i;", "if (running >= threshold) return i;", VERIFY_TESTS),
    Mutant("verify_residual_sign", "verification", VERIFY,
           "prob_weight(target_probs[i] - draft_probs[i]);", "prob_weight(draft_probs[i] - target_probs[i]);",
           VERIFY_TESTS),
    Mutant("verify_onehot_residual_keeps_draft", "verification", VERIFY,
           "return prob_weight(i == drafted ? target_probs[i] - 1.0f : target_probs[i]);",
           "return prob_weight(target_probs[i]);", VERIFY_TESTS),
    Mutant("verify_sample_position", "verification", VERIFY,
           "philox_draws(p.random.seed, offset, static_cast<uint32_t>(b), accepted).word[kDrawSample];",
           "philox_draws(p.random.seed, offset, static_cast<uint32_t>(b), accepted + 1).word[kDrawSample];",
           VERIFY_TESTS),
    Mutant("verify_accept_uses_sample_word", "verification", VERIFY,
           "static_cast<uint32_t>(b), accepted).word[kDrawAccept];",
           "static_cast<uint32_t>(b), accepted).word[kDrawSample];", VERIFY_TESTS),
    Mutant("verify_offset_ignored", "verification", VERIFY,
           "return r.offset_tensor ? static_cast<uint64_t>(*r.offset_tensor) : r.offset;",
           "return r.offset_tensor ? static_cast<uint64_t>(*r.offset_tensor) : 0;", VERIFY_TESTS),
    Mutant("verify_greedy_ignores_draft_lens", "verification", VERIFY,
           "while (accepted < len && p.draft_tokens", "while (accepted < p.k && p.draft_tokens", VERIFY_TESTS),
    Mutant("verify_tree_no_renormalise", "verification", VERIFY,
           "            remaining -= weight;\n", "", VERIFY_TESTS),
    Mutant("verify_tree_retries_rejected_token", "verification", VERIFY,
           "const uint64_t weight = seen ? 0 : prob_weight(probs[token]);",
           "const uint64_t weight = prob_weight(probs[token]); (void)seen;", VERIFY_TESTS),
    Mutant("verify_tree_width_off_by_one", "verification", VERIFY,
           "if (static_cast<int32_t>(path.size()) < p.width) {\n        uint64_t remaining",
           "if (static_cast<int32_t>(path.size()) <= p.width) {\n        uint64_t remaining", VERIFY_TESTS),
    Mutant("verify_tree_greedy_last_match", "verification", VERIFY,
           "for (int32_t c = node + 1; c < p.nodes && next < 0; ++c) {\n          if (parent[c] == node && tokens[c] == best)",
           "for (int32_t c = node + 1; c < p.nodes; ++c) {\n          if (parent[c] == node && tokens[c] == best)",
           VERIFY_TESTS),
    Mutant("verify_tree_sample_position", "verification", VERIFY,
           "philox_draws(p.random.seed, offset, row, node).word[kDrawSample];",
           "philox_draws(p.random.seed, offset, row, 0).word[kDrawSample];", VERIFY_TESTS),
    Mutant("verify_tree_padding_subtree_checked", "verification", VERIFY,
           "depth[c] = parent[c] < 0 || depth[parent[c]] < 0 ? -1 : depth[parent[c]] + 1;",
           "depth[c] = parent[c] < 0 ? -1 : depth[parent[c]] + 1;", VERIFY_TESTS),

    # ---- scheduler and engine ---------------------------------------------------------------
    Mutant("sched_preempt_drops_last_output", "engine", SCHED,
           "        seq.status, seq.num_cached = Status.WAITING, 0\n",
           "        seq.status, seq.num_cached = Status.WAITING, 0\n"
           "        if len(seq.output) > 1:\n            seq.output.pop()\n", ENGINE_TESTS),
    Mutant("sched_running_ignores_budget", "engine", SCHED,
           "count = min(len(seq) + seq.in_flight - seq.num_cached, budget)",
           "count = len(seq) + seq.in_flight - seq.num_cached", ENGINE_TESTS),
    Mutant("sched_waiting_ignores_budget", "engine", SCHED,
           "count = len(first) if len(group) > 1 else min(len(first), budget)", "count = len(first)", ENGINE_TESTS),
    Mutant("sched_cached_prefix_forgotten", "engine", SCHED,
           "first.num_cached = cached", "first.num_cached = 0", ENGINE_TESTS),
    Mutant("sched_finish_keeps_waiting", "engine", SCHED,
           "                if left:\n                    kept.append(left)", "                kept.append(group)",
           ENGINE_TESTS),
    Mutant("sched_max_num_seqs_off_by_one", "engine", SCHED,
           "len(self.running) + len(self.waiting[0]) <= self.max_num_seqs",
           "len(self.running) + len(self.waiting[0]) <= self.max_num_seqs + 1", ENGINE_TESTS),
    Mutant("runner_fork_not_cached", "engine", SCHED,
           "            s.seq.num_cached = s.logits_of.num_cached\n", "            pass\n", ENGINE_TESTS),
    Mutant("llm_max_tokens_off_by_one", "engine", LLM,
           "elif len(seq.output) >= seq.params.max_tokens:", "elif len(seq.output) > seq.params.max_tokens:",
           ENGINE_TESTS),
    Mutant("llm_stop_tokens_ignored", "engine", LLM,
           "if token in seq.params.stop_token_ids or", "if False or", ENGINE_TESTS),
    Mutant("llm_eos_despite_ignore_eos", "engine", LLM,
           "(token in eos_token_ids and not seq.params.ignore_eos)", "(token in eos_token_ids)",
           ENGINE_TESTS),
    Mutant("llm_logprob_not_accumulated", "engine", LLM,
           "seq.cumulative_logprob += logprob", "seq.cumulative_logprob = logprob", ENGINE_TESTS),
    Mutant("llm_abort_keeps_running", "engine", LLM,
           "            if seq.request_id == request_id:\n                self._finish(seq, reason)",
           "            if seq.request_id == request_id:\n                seq.finish_reason = reason", ENGINE_TESTS),
    # ---- engine: prompt logprobs ----------------------------------------------------------
    Mutant("runner_prompt_rows_recomputed", "engine", RUNNER,
           "    low, high = max(start, done), min(start + count, len(seq.prompt) - 1)\n"
           "    if low >= high:\n        return None\n    if low > done:",
           "    low, high = start, min(start + count, len(seq.prompt) - 1)\n"
           "    if low >= high:\n        return None\n    if False:", PROMPT_LOGPROBS_TESTS),
    Mutant("sched_prompt_logprobs_take_cache_hits", "engine", SCHED,
           "        if not owes_prompt_logprobs(seq):", "        if True:", PROMPT_LOGPROBS_TESTS),
    Mutant("runner_decode_step_prompt_row_lost", "engine", RUNNER,
           "                if s.seq.prompt_logprobs is not None and _prompt_positions(s.seq, s.seq.num_cached, 1):",
           "                if False:", PROMPT_LOGPROBS_TESTS),
    Mutant("runner_samples_from_first_prompt_row", "engine", RUNNER,
           "            rows[seq] = first + logit_rows.index(s.num_new - 1)", "            rows[seq] = first",
           PROMPT_LOGPROBS_TESTS),
    Mutant("sampler_rank_counts_ties_and_itself", "engine", SAMPLER,
           "(logprobs > value).sum(-1, keepdim=True)", "(logprobs >= value).sum(-1, keepdim=True)",
           PROMPT_LOGPROBS_TESTS),
    # A failed step (recovery, blame).
    Mutant("llm_failed_step_blocks_stay_in_prefix_cache", "engine", RECOVERY,
           "                    bm.truncate(seq_id, j * size + 1)\n                    bm.append(seq_id, [UNMATCHABLE_TOKEN])",
           "                    pass", FAULT_TESTS),
    Mutant("llm_roll_back_keeps_partial_block", "engine", RECOVERY,
           "        keep -= keep % size\n        if bm.enable_prefix_caching:\n            table = bm.block_table(seq_id)\n"
           "            for j in range(len(table) - 1, keep // size - 1, -1):",
           "        if bm.enable_prefix_caching:\n            table = bm.block_table(seq_id)\n"
           "            for j in range(len(table) - 1, -(-keep // size) - 1, -1):", FAULT_TESTS),
    Mutant("llm_roll_back_in_step_order", "engine", RECOVERY,
           "        for s in reversed(batch):\n            seq = s.seq\n", "        for s in batch:\n            seq = s.seq\n",
           FAULT_TESTS),
    Mutant("llm_blame_fails_the_whole_step", "engine", RECOVERY,
           "if len(group) <= 1 or retries < 2:", "if True:", FAULT_TESTS),

    # ---- sampler ------------------------------------------------------------------------------
    Mutant("sampler_temperature_multiplies", "sampler", SAMPLER,
           "keepdim=True)) / temperature[:, None]", "keepdim=True)) * temperature[:, None]", SAMPLER_TESTS),
    Mutant("sampler_top_k_keeps_one_more", "sampler", SAMPLER,
           "[min(k, scaled.shape[-1]) - 1 for k in top_k]", "[min(k, scaled.shape[-1] - 1) for k in top_k]",
           SAMPLER_TESTS),
    Mutant("sampler_top_k_drops_ties", "sampler", SAMPLER,
           "scaled = scaled.masked_fill(scaled < kth, float(\"-inf\"))",
           "keep = scaled.topk(max(top_k), -1).indices\n"
           "        scaled = torch.full_like(scaled, float(\"-inf\")).scatter(-1, keep, scaled.gather(-1, keep))",
           SAMPLER_TESTS),
    Mutant("sampler_top_p_drops_crossing_token", "sampler", SAMPLER,
           "outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]",
           "outside = sorted_probs.cumsum(-1) > top_p[:, None]", SAMPLER_TESTS),
    Mutant("sampler_top_p_not_renormalised", "sampler", SAMPLER,
           "        probs = probs / probs.sum(-1, keepdim=True)\n", "", SAMPLER_TESTS),
    Mutant("sampler_draw_ignores_position", "sampler", SAMPLER,
           "    position = len(seq) + seq.in_flight\n", "    position = len(seq.prompt) + seq.in_flight\n", SAMPLER_TESTS),
    Mutant("sampler_draw_ignores_sample_index", "sampler", SAMPLER,
           "_C.philox4x32_10(seq.index & 0xFFFFFFFF,", "_C.philox4x32_10(0,", SAMPLER_TESTS),
    Mutant("sampler_logprob_before_truncation", "sampler", SAMPLER,
           "return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()",
           "return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)", SAMPLER_TESTS),
    Mutant("sampler_logit_bias_ignored", "sampler", SAMPLER,
           "    if biased:\n        row, token, bias = zip(*biased)",
           "    if False:\n        row, token, bias = zip(*biased)", SAMPLER_TESTS),

    # ---- scaling estimators ---------------------------------------------------------------------
    Mutant("laws_n_opt_exponent", "scaling", "python/pagedlm/scaling/laws.py",
           "N = G * (C / 6.0) ** (self.beta / s)", "N = G * (C / 6.0) ** (self.alpha / s)", SCALING_TESTS),
    Mutant("laws_loss_data_exponent", "scaling", "python/pagedlm/scaling/laws.py",
           "self.B / np.power(D, self.beta)", "self.B / np.power(D, self.alpha)", SCALING_TESTS),
    Mutant("params_final_norm_missing", "scaling", "python/pagedlm/scaling/params.py",
           "\"norms\": (2 * cfg.n_layers + 1) * norm,", "\"norms\": 2 * cfg.n_layers * norm,", SCALING_TESTS),
    Mutant("params_tied_head_counted", "scaling", "python/pagedlm/scaling/params.py",
           "0 if cfg.tied_embeddings else cfg.vocab_size * d", "cfg.vocab_size * d", SCALING_TESTS),
    Mutant("params_kv_as_q", "scaling", "python/pagedlm/scaling/params.py",
           "attention = d * cfg.q_dim + 2 * d * cfg.kv_dim + cfg.q_dim * d",
           "attention = d * cfg.q_dim + 2 * d * cfg.q_dim + cfg.q_dim * d", SCALING_TESTS),
    Mutant("cascade_op_kv_heads_unpacked", "engine", "python/pagedlm/ops.py",
           "shared_out.view(batch, per_kv, num_kv_heads, head_dim).transpose(1, 2)",
           "shared_out.view(batch, num_kv_heads, per_kv, head_dim)", ("tests/test_cascade_attention.py",)),
    Mutant("cascade_suffix_len_off_by_one", "engine", CASCADE,
           "(lens - skip * block_size).astype", "(lens - skip * block_size - 1).astype", CASCADE_TESTS),
    Mutant("cascade_group_prefix_max", "engine", CASCADE,
           "np.minimum.reduceat(shared, starts)", "np.maximum.reduceat(shared, starts)", CASCADE_TESTS),
    Mutant("cascade_prefix_from_wrong_row", "engine", CASCADE,
           "rows[starts][:, :width]", "rows[starts - 1][:, :width]", CASCADE_TESTS),
    Mutant("graphs_padding_rows_write_kv", "engine", GRAPHS,
           'f["slots"][:batch], f["slots"][batch:] = slots, -1', 'f["slots"][:batch], f["slots"][batch:] = slots, 0',
           GRAPH_TESTS),
    Mutant("graphs_padding_group_not_closed", "engine", GRAPHS,
           'f["indptr"][:groups + 1], f["indptr"][groups + 1:] = cascade.group_indptr, bucket',
           'f["indptr"][:groups + 1], f["indptr"][groups + 1:] = cascade.group_indptr, batch', GRAPH_TESTS),
    Mutant("graphs_reuse_a_narrower_graph", "engine", GRAPHS,
           "and width < k[width_at] <= WIDER_REUSE * width]", "and 0 < k[width_at] <= WIDER_REUSE * width]",
           ("tests/test_cuda_graphs.py",)),
    Mutant("serving_merge_keeps_the_last_text", "serving", "python/pagedlm/serving/async_llm.py",
           "merged.text += d.text", "merged.text = d.text", SERVING_TESTS),
    Mutant("serving_stream_drops_the_queued_error", "serving", "python/pagedlm/serving/async_llm.py",
           "                self._error = queued.pop()\n", "                queued.pop()\n", SERVING_TESTS),
    Mutant("detokenizer_primed_inside_a_character", "serving", "python/pagedlm/engine/text.py",
           " and not tokenizer.decode(tail).endswith(REPLACEMENT) else None)", " else None)", SERVING_TESTS),
    Mutant("budget_days_ignore_gpus", "scaling", "python/pagedlm/scaling/budget.py",
           "/ n_gpus / 24.0", "/ 24.0", SCALING_TESTS),
    Mutant("design_gpus_ignore_memory", "scaling", "python/pagedlm/scaling/design.py",
           "(n < min_for_memory or training_days", "(training_days", SCALING_TESTS),
    Mutant("design_tokens_from_n_opt", "scaling", "python/pagedlm/scaling/design.py",
           "tokens = C / (6.0 * params)", "tokens = C / (6.0 * n_opt)", SCALING_TESTS),
    Mutant("flops_6nd_as_2nd", "scaling", "python/pagedlm/scaling/flops.py",
           "return 6.0 * count_params(cfg) * tokens", "return 2.0 * count_params(cfg) * tokens", SCALING_TESTS),
    Mutant("memory_kv_without_k_and_v", "scaling", "python/pagedlm/scaling/memory.py",
           "elements = 2 * cfg.n_layers * cfg.kv_dim * tokens", "elements = cfg.n_layers * cfg.kv_dim * tokens",
           SCALING_TESTS),
    Mutant("memory_zero3_unsharded", "scaling", "python/pagedlm/scaling/memory.py",
           "return (weights / dp if zero_stage >= 3 else weights,", "return (weights,", SCALING_TESTS),
]

# The CI sample: a few mutants of every module, the three historic survivors included, chosen so
# the run stays well under three minutes on two cores (one C++ file rebuilt per C++ mutant).
QUICK = [
    "bm_lookup_skips_token_compare", "bm_free_skips_first_block", "bm_cow_keeps_refcount",
    "bm_truncate_keeps_chain_ids",
    "attn_window_off_by_one", "attn_merge_acc_not_rescaled",
    "verify_accept_le", "verify_tree_no_renormalise",
    "sched_preempt_drops_last_output", "sched_running_ignores_budget",
    "sampler_top_p_drops_crossing_token",
    "laws_n_opt_exponent", "params_final_norm_missing",
]
