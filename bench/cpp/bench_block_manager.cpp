// Microbenchmarks of single block-manager operations on one core (Google Benchmark).
// items_per_second is the figure that matters: block-manager calls per second.
//   build/cpp/bench/cpp/bench_block_manager --benchmark_repetitions=5 --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>

#include <numeric>
#include <vector>

#include "pagedlm/block_manager.h"

using pagedlm::BlockManager;
using pagedlm::TokenId;

namespace {

std::vector<TokenId> prompt_tokens(int n, int salt = 0) {
  std::vector<TokenId> t(n);
  std::iota(t.begin(), t.end(), salt * 100003);
  return t;
}

// Decode steady state: 256 running sequences each take one token per step; a sequence
// that reaches 512 tokens is freed and a new one allocated in its place.
void BM_DecodeAppend(benchmark::State& state) {
  const int kSeqs = 256, kMaxTokens = 512, kBlock = 16;
  const bool caching = state.range(0) != 0;
  BlockManager bm(kSeqs * (kMaxTokens / kBlock + 1), kBlock, caching);
  std::vector<int64_t> ids(kSeqs);
  int64_t next_id = 0;
  const auto prompt = prompt_tokens(1);
  for (auto& id : ids) bm.allocate(id = next_id++, prompt.data(), 1);
  const TokenId token = 7;
  int64_t ops = 0;
  for (auto _ : state) {
    for (auto& id : ids) {
      bm.append(id, &token, 1);
      ++ops;
      if (bm.num_tokens(id) == kMaxTokens) {
        bm.free(id);
        bm.allocate(id = next_id++, prompt.data(), 1);
        ops += 2;
      }
    }
  }
  state.SetItemsProcessed(ops);
}
BENCHMARK(BM_DecodeAppend)->Arg(0)->Arg(1)->ArgName("prefix_caching");

// Allocate a 128-token prompt (8 blocks) and free it.
void BM_AllocateFree(benchmark::State& state) {
  BlockManager bm(1024, 16, state.range(0) != 0);
  const auto prompt = prompt_tokens(128);
  int64_t id = 0;
  for (auto _ : state) {
    bm.allocate(id, prompt.data(), 128);
    bm.free(id++);
  }
  state.SetItemsProcessed(2 * state.iterations());
}
BENCHMARK(BM_AllocateFree)->Arg(0)->Arg(1)->ArgName("prefix_caching");

// Parallel sampling / beam search: fork a 100-token sequence, append one token (a
// copy-on-write of the shared last block), free the child.
void BM_ForkAppendFree(benchmark::State& state) {
  BlockManager bm(1024, 16);
  const auto prompt = prompt_tokens(100);
  bm.allocate(0, prompt.data(), 100);
  const TokenId token = 3;
  for (auto _ : state) {
    bm.fork(0, 1);
    benchmark::DoNotOptimize(bm.append(1, &token, 1));
    bm.free(1);
  }
  state.SetItemsProcessed(3 * state.iterations());
}
BENCHMARK(BM_ForkAppendFree);

// A 2048-token prompt whose first 2032 tokens are in the prefix cache.
void BM_PrefixHitAllocate(benchmark::State& state) {
  BlockManager bm(4096, 16, true);
  const auto prompt = prompt_tokens(2048);
  bm.allocate(0, prompt.data(), 2048);
  int64_t id = 1;
  for (auto _ : state) {
    benchmark::DoNotOptimize(bm.allocate(id, prompt.data(), 2048));
    bm.free(id++);
  }
  state.SetItemsProcessed(2 * state.iterations());
}
BENCHMARK(BM_PrefixHitAllocate);

// The batched builder the scheduler calls every step: 256 sequences x 128 blocks.
void BM_BlockTables(benchmark::State& state) {
  const int kSeqs = 256, kBlocks = 128, kBlock = 16;
  BlockManager bm(kSeqs * kBlocks, kBlock);
  std::vector<int64_t> ids(kSeqs);
  const auto prompt = prompt_tokens(kBlocks * kBlock);
  for (int i = 0; i < kSeqs; ++i) bm.allocate(ids[i] = i, prompt.data(), kBlocks * kBlock);
  std::vector<int32_t> out(kSeqs * kBlocks);
  for (auto _ : state) {
    const int32_t width = bm.max_blocks(ids.data(), kSeqs);
    bm.block_tables(ids.data(), kSeqs, width, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_BlockTables)->Unit(benchmark::kMicrosecond);

// slot_mapping for a decode step (one slot per sequence) over 256 sequences.
void BM_SlotMappingDecode(benchmark::State& state) {
  const int kSeqs = 256;
  BlockManager bm(kSeqs * 64, 16);
  std::vector<int64_t> ids(kSeqs), counts(kSeqs, 1), out(kSeqs);
  const auto prompt = prompt_tokens(1000);
  for (int i = 0; i < kSeqs; ++i) bm.allocate(ids[i] = i, prompt.data(), 1000);
  for (auto _ : state) {
    bm.slot_mapping(ids.data(), counts.data(), kSeqs, out.data());
    benchmark::DoNotOptimize(out.data());
  }
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_SlotMappingDecode)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
