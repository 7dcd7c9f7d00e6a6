// Hopper (sm_90a) paged prefill for f16/bf16 queries: FlashAttention-3's layout on wgmma, with the
// K/V pages gathered by cp.async. Same contract and results as paged_prefill.cu's mma.sync kernel,
// which keeps every configuration this one does not take (paged_prefill_sm90_supports): causal or
// not, sliding windows, soft caps, head dims 64, 128 and 256, FP8 caches (at 64 and 128) are taken
// here; custom masks are not.
//
// A block works on 128 consecutive queries of one sequence and one query head at a time, with three
// warpgroups:
//  - warpgroup 0 (the producer, registers lowered with setmaxnreg) gathers K/V tiles of 128 keys
//    (64 at head dim 256, whose tiles are twice as wide) from the paged cache into a ring of shared-memory stages with 16-byte cp.async copies, each
//    row to its 128-byte-swizzled place (wgmma.cuh). The stage's `full` mbarrier completes when the
//    copies have landed (cp.async.mbarrier.arrive, so several tiles are in flight); the stage is
//    reused after its `empty` mbarrier says both consumers are done with it. An FP8 cache's tiles
//    land first in a ring of two byte tiles, each thread's own copies, which the thread widens to
//    f16/bf16 into the stage (exact: every FP8 value is one) before arriving on `full`; k_scale joins
//    the score scale and v_scale the output's normalization. Any block size works;
//    with power-of-two pages the lanes look up one page each and hand the ids over by shuffles, and
//    a thread's consecutive rows (16 at D=128) share one lookup when a page holds them. Its instructions
//    share the SM's issue slots with the softmax's, so they are kept few.
//  - warpgroups 1 and 2 (the consumers) own 64 query rows each. Per tile: S = Q K^T by wgmma with
//    both operands in shared memory; the online softmax in registers, in the log2 domain with the
//    scale folded into the exp2's FFMA; P converted to f16/bf16 in registers is the A operand of
//    O += P V, V read from shared memory through the transpose bit. The softmax of one tile runs
//    while the tensor cores compute P V of the one before (FlashAttention-3's intra-warpgroup overlap;
//    ptxas keeps it only while a branch separates the softmax from the wait for P V, see the loop).
//    Stage addresses and descriptors are warp-uniform values (warp_uniform), kept in uniform registers.
//    An item's key tiles go last to first, as FlashAttention-3's do: the causal diagonal comes first,
//    and the blocks that work on one head's query tiles at once read different key tiles at any
//    moment, instead of all starting at key 0.
// Work items (128 queries of one sequence and head) are found on the device by walking cu_seqlens_q,
// heaviest causal tiles first; nothing is synchronised with the host, nothing is allocated. Either
// one block per item, as in the mma.sync kernel, or, given a zeroed tile counter by the caller, a
// persistent grid of one block per SM taking items from the counter (WorkQueue): the producer then
// loads the next item's K/V while the consumers finish the last one, and each consumer warpgroup
// loads its next query rows under its last tile, so a block's start-up and end overlap its
// neighbours' work (+3-7% on the bench shapes, more on short sequences). Bad values never fault: a
// bad block id is zero-filled and, like a bad length or cu_seqlens_q, turns the item's rows into NaN.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "device_query.h"
#include "fp8.cuh"
#include "mma.cuh"
#include "paged_prefill_sm90.h"
#include "paged_tiles.cuh"
#include "prefill_schedule.cuh"
#include "wgmma.cuh"

// The kernel needs sm_90a's wgmma and setmaxnreg; an sm_90 build would compile it empty and route
// to it, so it is refused here. Other architectures compile it empty and never route to it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "cuda/paged_prefill_sm90.cu needs sm_90a: set CMAKE_CUDA_ARCHITECTURES to 90a, not 90"
#endif

namespace pagedlm::cuda {
namespace {

__device__ __forceinline__ uint4 ld_shared_16(uint32_t address) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(address) : "memory");
  return v;
}

__device__ __forceinline__ void st_shared_16(uint32_t address, uint4 v) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

template <int D, bool kFp8 = false>
struct Sm90Shape {
  static constexpr int kConsumers = 2;                     // warpgroups of 64 query rows
  static constexpr int kQueryTile = 64 * kConsumers;       // queries per block
  static constexpr int kKvTile = D == 256 ? 64 : 128;      // keys per K/V tile
  static constexpr int kThreads = 128 * (1 + kConsumers);  // warpgroup 0 loads, the others compute
  static constexpr int kChunks = D / 8;                    // 16-byte chunks per row
  static constexpr int kStages = D <= 64 ? 4 : D == 256 || kFp8 ? 2 : 3;
  static constexpr int kQBytes = kQueryTile * D * 2;
  static constexpr int kTileBytes = kKvTile * D * 2;       // K (or V) of one tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kByteStageBytes = kFp8 ? kStageBytes / 2 : 0;  // FP8: K and V of a tile as stored
  // 1024 bytes of slack to align the tiles for the swizzle, 256 for the mbarriers and the item slots.
  static constexpr int kSmemBytes = 1024 + kQBytes + kStages * kStageBytes + 2 * kByteStageBytes + 256;
  static_assert(kSmemBytes <= 227 * 1024, "over the shared-memory limit of a block");
  // setmaxnreg budgets: 56 * 128 + 224 * 256 (or 40 * 128 + 232 * 256) registers are the 168 * 384 the
  // launch holds; at head dim 256 a consumer thread holds 128 accumulators of O and takes registers
  // from the producer.
  static constexpr int kProducerRegisters = D == 256 ? 40 : 56, kConsumerRegisters = D == 256 ? 232 : 224;
};

// base + a * b by one 32 x 32 -> 64-bit multiply-add (C++ widening leaves an add of a zero high word).
__device__ __forceinline__ const char* offset_by(const char* base, uint32_t a, uint32_t b) {
  uint64_t address;
  asm("mad.wide.u32 %0, %1, %2, %3;" : "=l"(address) : "r"(a), "r"(b), "l"(reinterpret_cast<uint64_t>(base)));
  return reinterpret_cast<const char*>(address);
}

// One unit of work: the 128 queries from query tile `tile` of sequence `seq`, for one query head.
// A negative seq ends a block's work.
struct WorkItem {
  int seq, tile, head;
};

// What the producer and the consumers both derive from a work item.
struct ItemGeometry {
  SequenceRows rows;
  int q_begin, q_len, len;
  bool bad_len;     // the sequence's length or rows are out of range: its rows turn into NaN
  int q0, pos0;     // the tile's first query within the sequence, and that query's position
  int kv_end;       // keys seen by the tile: all of the sequence's, or under a causal mask up to its last query
  int tile_lo;      // the first key tile (of kKvTile keys from key 0) the tile sees: under a window, its first query's
  int kv_tiles;     // key tiles tile_lo .. tile_lo + kv_tiles - 1
};

template <int kQueryTile, int kKvTile>
__device__ __forceinline__ ItemGeometry item_geometry(const PagedPrefillParams& p, const WorkItem& w) {
  ItemGeometry g;
  g.rows = sequence_rows(p, w.seq);
  g.q_begin = g.rows.begin;
  g.q_len = g.rows.len;
  g.len = p.seq_lens[w.seq];
  g.bad_len = sequence_out_of_range(p, g.rows, g.len);
  g.q0 = w.tile * kQueryTile;
  g.pos0 = g.len - g.q_len + g.q0;
  const int last_pos = g.pos0 + min(kQueryTile, g.q_len - g.q0) - 1;
  g.kv_end = g.bad_len ? 0 : (p.causal ? last_pos + 1 : g.len);
  // Tiles stay aligned to key 0 (the causal diagonal's masking counts on it); a window drops the
  // tiles wholly before the first query's first key.
  g.tile_lo = g.bad_len || p.sliding_window <= 0 ? 0 : max(0, g.pos0 - p.sliding_window + 1) / kKvTile;
  g.kv_tiles = max((g.kv_end + kKvTile - 1) / kKvTile - g.tile_lo, 0);
  return g;
}

// Hands out a block's work items to its thread 0. Without a tile counter a block has the one item
// its blockIdx names, the grid covering every query tile. With one the grid is persistent: each
// block takes tickets from the counter until they run out. Tickets go heaviest first (sequences from
// the last, their query tiles from the last, which under a causal mask see the most keys) and the
// heads of one query tile one after another, so that the blocks running at once share K/V in L2.
// A ticket is fetched one item ahead: its atomic's latency hides behind the item's loads.
template <int kQueryTile>
class WorkQueue {
 public:
  __device__ explicit WorkQueue(const PagedPrefillParams& p)
      : seq_(p.batch - 1),
        tickets_(static_cast<int>(min(static_cast<int64_t>(p.total_q / kQueryTile + p.batch) * p.num_heads,
                                      static_cast<int64_t>(INT32_MAX)))) {
    if (p.tile_counter && threadIdx.x == 0) ticket_ = atomicAdd(p.tile_counter, 1);
  }

  __device__ WorkItem next(const PagedPrefillParams& p) {
    WorkItem w{-1, 0, 0};
    if (!p.tile_counter) {
      if (!handed_ && find_query_tile(p, kQueryTile, w.seq, w.tile)) w.head = blockIdx.y;
      else w.seq = -1;
      handed_ = true;
      return w;
    }
    // As many tickets as the non-persistent grid has blocks: a bad cu_seqlens_q cannot make more work.
    const int ticket = ticket_;
    if (ticket >= tickets_) return w;
    ticket_ = atomicAdd(p.tile_counter, 1);
    const int rank = ticket / p.num_heads;  // query tiles before this one, heaviest first
    for (; seq_ >= 0; --seq_) {
      // 64-bit: a bad cu_seqlens_q may hold any int32 values (rank and first_rank_ stay below tickets_).
      const int64_t q_len = static_cast<int64_t>(p.cu_seqlens_q[seq_ + 1]) - p.cu_seqlens_q[seq_];
      const int64_t tiles = q_len > 0 ? (q_len + kQueryTile - 1) / kQueryTile : 0;
      if (rank < first_rank_ + tiles) {
        w = WorkItem{seq_, static_cast<int>(tiles - 1 - (rank - first_rank_)), ticket % p.num_heads};
        break;
      }
      first_rank_ += static_cast<int>(tiles);
    }
    return w;
  }

 private:
  int seq_;             // the walk's sequence (a block's tickets only grow: the walk never goes back)
  int first_rank_ = 0;  // rank of seq_'s last query tile
  int tickets_;
  int ticket_ = 0;
  bool handed_ = false;
};

// Shared memory through which the producer hands a work item to the consumers (two in flight), with
// the item's bad flag: set by the producer threads that met a bad block id among its K/V tiles.
struct ItemSlot {
  WorkItem item;
  int bad;
};

// kLanePages: block_size is a power of two >= 4, so a K/V tile spans at most 32 pages, which the
// producer's lanes look up one each.
// KV: the caches' element, T or Fp8<format> (paged_tiles.cuh), which the producer widens to T.
template <typename T, typename KV, int D, bool kLanePages>
__global__ void __launch_bounds__(Sm90Shape<D>::kThreads, 1) paged_prefill_sm90_kernel(const PagedPrefillParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace sm90;
  using Cache = CacheElem<T, KV>;
  using Stored = typename Cache::Stored;
  constexpr bool kFp8 = Cache::kFp8;
  using Shape = Sm90Shape<D, kFp8>;
  constexpr int kQueryTile = Shape::kQueryTile, kKvTile = Shape::kKvTile, kStages = Shape::kStages;
  constexpr int kChunks = Shape::kChunks, kTileBytes = Shape::kTileBytes, kStageBytes = Shape::kStageBytes;
  constexpr int kByteStageBytes = Shape::kByteStageBytes;
  extern __shared__ uint8_t smem_raw[];
  // The swizzle acts on address bits: tiles start on 1024-byte boundaries.
  const uint32_t smem_raw_address = shared_address(smem_raw);
  const uint32_t q_smem = (smem_raw_address + 1023) & ~1023u;
  const uint32_t kv_smem = q_smem + Shape::kQBytes;  // stage s: K at kv_smem + s * kStageBytes, V after it
  const uint32_t byte_smem = kv_smem + kStages * kStageBytes;  // FP8: byte tile b at byte_smem + b * kByteStageBytes
  const uint32_t barriers = byte_smem + 2 * kByteStageBytes;
  // The K/V ring counts tiles over all of a block's items: tile number i lives in stage i % kStages
  // and is that stage's (i / kStages)-th use, whose parity the barriers' waits take.
  auto full = [&](uint32_t i) { return barriers + 8 * (i % kStages); };
  auto empty = [&](uint32_t i) { return barriers + 8 * (kStages + i % kStages); };
  // Item n goes through slot n % 2: item_full when the producer has written it, item_done when the
  // producer has issued all its tiles (its bad flag is final), item_empty when the consumers are done.
  auto item_full = [&](int n) { return barriers + 8 * (2 * kStages + (n & 1)); };
  auto item_done = [&](int n) { return barriers + 8 * (2 * kStages + 2 + (n & 1)); };
  auto item_empty = [&](int n) { return barriers + 8 * (2 * kStages + 4 + (n & 1)); };
  ItemSlot* slots = reinterpret_cast<ItemSlot*>(smem_raw + (barriers + 8 * (2 * kStages + 6) - smem_raw_address));

  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(full(s), 128);
      mbarrier_init(empty(s), 128 * Shape::kConsumers);
    }
    for (int s = 0; s < 2; ++s) {
      mbarrier_init(item_full(s), 1);
      mbarrier_init(item_done(s), 128);
      mbarrier_init(item_empty(s), 128 * Shape::kConsumers);
    }
  }
  __syncthreads();

  if (tid < 128) {
    // ---- Producer: K/V tiles into the stage ring. Thread tid copies 16-byte chunk tid % kCopies of
    // the kRowsPerThread consecutive rows from row_first: a warp reads whole rows, coalesced.
    registers_down<Shape::kProducerRegisters>();
    constexpr int kCopies = D * sizeof(Stored) / 16;  // 16-byte copies per cache row
    constexpr int kRowsPerThread = kKvTile * kCopies / 128;
    static_assert(kFp8 || kRowsPerThread % 8 == 0, "a thread's first row must start a swizzle atom");
    constexpr int kCopyTileBytes = kKvTile * D * sizeof(Stored);  // K (or V) of a tile as copied
    const int chunk = tid % kCopies, row_first = tid / kCopies * kRowsPerThread, lane = tid % 32;
    const int block_size = p.block_size, block_shift = __ffs(block_size) - 1;
    const int pages_per_tile = max(kKvTile >> block_shift, 1);  // kLanePages: pages start a tile or hold it
    const uint32_t row_bytes = p.num_kv_heads * D * sizeof(Stored);  // between consecutive cache rows
    // Row row_first + k goes to my_offset + dst_offset(k). In a stage row_first starts a swizzle atom,
    // so the chunk's place in the row depends on k alone; a byte tile is row-major.
    const uint32_t chunk_in_atom = chunk % 8;
    const uint32_t my_offset = kFp8 ? row_first * D + chunk * 16
                                    : swizzled_offset(kKvTile, row_first, chunk) - chunk_in_atom * 16;
    auto dst_offset = [&](int k) { return kFp8 ? k * D : k * 128 + ((chunk_in_atom ^ (k % 8)) * 16); };
    // FP8: widens this thread's copies of ring position r (byte tile r % 2, landed) into the stage:
    // chunk c of a byte row is chunks 2c and 2c + 1 of the 16-bit row.
    auto widen = [&](uint32_t r) {
      if constexpr (kFp8) {  // (a 16-bit cache never calls it)
        if (r >= kStages) mbarrier_wait(empty(r), (r / kStages - 1) & 1);
        const uint32_t src = byte_smem + (r % 2) * kByteStageBytes + my_offset;
        const uint32_t dst = kv_smem + (r % kStages) * kStageBytes;
#pragma unroll
        for (int k = 0; k < kRowsPerThread; ++k) {
#pragma unroll
          for (int v = 0; v < 2; ++v) {  // K, then V
            uint4 first, second;
            Cache::widen16(ld_shared_16(src + v * kCopyTileBytes + k * D), first, second);
            const uint32_t tile = dst + v * kTileBytes;
            st_shared_16(tile + swizzled_offset(kKvTile, row_first + k, 2 * chunk), first);
            st_shared_16(tile + swizzled_offset(kKvTile, row_first + k, 2 * chunk + 1), second);
          }
        }
        fence_proxy_async();  // the generic-proxy stores, before the consumers' wgmma reads them
        mbarrier_arrive(full(r));
      }
    };
    WorkQueue<kQueryTile> queue(p);  // used by thread 0
    uint32_t ring = 0;
    for (int n = 0;; ++n) {
      if (n >= 2) mbarrier_wait(item_empty(n), ((n >> 1) - 1) & 1);
      if (tid == 0) {
        slots[n & 1] = ItemSlot{queue.next(p), 0};
        mbarrier_arrive(item_full(n));
      }
      mbarrier_wait(item_full(n), (n >> 1) & 1);
      const WorkItem item = slots[n & 1].item;
      if (item.seq < 0) break;
      const ItemGeometry g = item_geometry<kQueryTile, kKvTile>(p, item);
      const int kv_head = item.head / (p.num_heads / p.num_kv_heads);
      const int32_t* table = p.block_tables + static_cast<int64_t>(item.seq) * p.max_blocks_per_seq;
      const char* key_base =
          reinterpret_cast<const char*>(static_cast<const Stored*>(p.key_cache) + kv_head * D) + chunk * 16;
      const int64_t value_offset = static_cast<const char*>(p.value_cache) - static_cast<const char*>(p.key_cache);
      // The block ids of a tile's tokens are looked up one tile ahead, so the table's latency hides
      // behind a tile; a token past the end or behind a bad block id is zero-filled (P V multiplies it
      // by exact zeros). The producer's instructions share the SM's issue slots with the consumers':
      // the copy loop is kept to a few instructions per row.
      //  - kLanePages (block_size a power of two >= 4): a tile spans at most 32 pages, and lane L of
      //    each producer warp looks up the tile's L-th; a thread takes its rows' page from that lane by
      //    a shuffle (one for all of its rows when a page holds them: block_size >= kRowsPerThread).
      //  - otherwise each thread looks up the cache row of each of its own tokens.
      int page_row = INT32_MIN;         // kLanePages: the cache row of this lane's page (< 0: none, or bad)
      int32_t rows[kRowsPerThread];     // otherwise: each token's cache row (-1: zero-filled)
      bool bad = false;
      auto fetch = [&](int first) {
        if constexpr (kLanePages) {
          const int page = (first >> block_shift) + lane;
          const bool used = lane < pages_per_tile && page * block_size < g.kv_end;
          const int32_t id = used ? __ldg(table + page) : -1;
          const bool valid = static_cast<uint32_t>(id) < static_cast<uint32_t>(p.num_blocks);
          bad |= used && !valid;
          page_row = valid ? id * block_size : INT32_MIN;  // any row of a bad page stays negative
        } else {
#pragma unroll
          for (int k = 0; k < kRowsPerThread; ++k) {
            const int t = first + row_first + k;
            const int page = t / block_size, in_block = t - page * block_size;
            const int32_t id = t < g.kv_end ? __ldg(table + page) : -1;
            const bool valid = static_cast<uint32_t>(id) < static_cast<uint32_t>(p.num_blocks);
            bad |= t < g.kv_end && !valid;
            rows[k] = valid ? id * block_size + in_block : -1;  // fits an int (paged_prefill_sm90_supports)
          }
        }
      };
      // The K and V copies of the thread's row k, from the key cache's key_row (or zeros).
      auto copy_row = [&](uint32_t k_dst, int k, const char* key_row, bool copy) {
        cp_async_16_or_zero(k_dst + dst_offset(k), key_row, copy);
        cp_async_16_or_zero(k_dst + kCopyTileBytes + dst_offset(k), key_row + value_offset, copy);
      };
      // The item's key tiles go last to first (ring position i holds key tile tile_lo + kv_tiles - 1 - i).
      if (g.kv_tiles > 0) fetch((g.tile_lo + g.kv_tiles - 1) * kKvTile);
      for (int kt = 0; kt < g.kv_tiles; ++kt, ++ring) {
        uint32_t k_dst;
        if constexpr (kFp8) {
          k_dst = byte_smem + (ring % 2) * kByteStageBytes + my_offset;  // widened by widen(ring) a tile later
        } else {
          if (ring >= kStages) mbarrier_wait(empty(ring), (ring / kStages - 1) & 1);
          k_dst = kv_smem + (ring % kStages) * kStageBytes + my_offset;
        }
        const int first = (g.tile_lo + g.kv_tiles - 1 - kt) * kKvTile;
        const int rows_left = g.kv_end - first - row_first;  // this thread's rows before the sequence's end
        if constexpr (kLanePages) {
          const int u0 = (first & (block_size - 1)) + row_first;  // from the start of the tile's first page
          if (block_size >= kRowsPerThread) {  // this thread's rows lie in one page
            const int row0 = __shfl_sync(0xffffffffu, page_row, u0 >> block_shift) + (u0 & (block_size - 1));
            // A zero-filled row's address still lies in the cache.
            const char* key_row = offset_by(key_base, max(row0, 0), row_bytes);
#pragma unroll
            for (int k = 0; k < kRowsPerThread; ++k) {
              copy_row(k_dst, k, key_row + k * row_bytes, row0 >= 0 && k < rows_left);
            }
          } else {
#pragma unroll
            for (int k = 0; k < kRowsPerThread; ++k) {
              const int u = u0 + k;
              const int row = __shfl_sync(0xffffffffu, page_row, u >> block_shift) + (u & (block_size - 1));
              copy_row(k_dst, k, offset_by(key_base, max(row, 0), row_bytes), row >= 0 && k < rows_left);
            }
          }
        } else {
#pragma unroll
          for (int k = 0; k < kRowsPerThread; ++k) {
            copy_row(k_dst, k, offset_by(key_base, max(rows[k], 0), row_bytes), rows[k] >= 0);
          }
        }
        if constexpr (kFp8) {
          // This tile's copies in flight while the last one's are widened.
          cp_async_commit();
          if (kt + 1 < g.kv_tiles) fetch(first - kKvTile);
          if (kt > 0) {
            cp_async_wait<1>();
            widen(ring - 1);
          }
        } else {
          // The stage's `full` barrier completes once every producer thread's copies so far have landed;
          // meanwhile the next tiles are issued, up to kStages in flight.
          cp_async_arrive_on(full(ring));
          if (kt + 1 < g.kv_tiles) fetch(first - kKvTile);
        }
      }
      if constexpr (kFp8) {
        if (g.kv_tiles > 0) {
          cp_async_wait<0>();
          widen(ring - 1);
        }
      }
      if (bad) slots[n & 1].bad = 1;
      mbarrier_arrive(item_done(n));
    }
  } else {
    // ---- Consumers: 64 query rows each; warp w of the warpgroup holds rows 16w..16w+15 as
    // wgmma's accumulator layout has them (rows lane / 4 and lane / 4 + 8, column pairs).
    registers_up<Shape::kConsumerRegisters>();
    const int wg = warp_uniform(tid / 128 - 1), ctid = tid % 128, warp = ctid / 32, lane = tid % 32;
    const int wg_row0 = wg * 64;  // within the block's query tile
    const uint64_t q_desc = smem_desc(q_smem + wg_row0 * 128, 16, 1024);
    const bool soft_cap = p.soft_cap > 0.0f;
    const float cap_in = soft_cap ? 2.0f / p.soft_cap : 0.0f, cap_out = p.soft_cap * kLog2e;
    const int window = p.sliding_window;

    auto wait_item = [&](int n) {
      mbarrier_wait(item_full(n), (n >> 1) & 1);
      return slots[n & 1].item;
    };
    // Issues the copies of this warpgroup's query rows of an item into shared memory, padding rows as
    // zeros; they are waited for when the item starts.
    auto load_q = [&](const WorkItem& item, const ItemGeometry& g) {
      const T* query = static_cast<const T*>(p.query);
      for (int i = ctid; i < 64 * kChunks; i += 128) {
        const int row = wg_row0 + i / kChunks, chunk = i % kChunks, qi = g.q0 + row;
        const bool valid = !g.bad_len && qi < g.q_len;
        const int64_t elem = valid ? (static_cast<int64_t>(g.q_begin + qi) * p.num_heads + item.head) * D + chunk * 8 : 0;
        cp_async_16_or_zero(q_smem + swizzled_offset(kQueryTile, row, chunk), query + elem, valid);
      }
      cp_async_commit();
    };

    WorkItem item = wait_item(0);
    ItemGeometry g{};
    if (item.seq >= 0) {
      g = item_geometry<kQueryTile, kKvTile>(p, item);
      load_q(item, g);
    }
    uint32_t ring = 0;
    for (int n = 0; item.seq >= 0; ++n) {
      cp_async_wait<0>();
      fence_proxy_async();
      named_barrier(2 + wg, 128);  // this warpgroup's query rows have landed

      const int row_lo = wg_row0 + warp * 16 + lane / 4;  // this thread's rows: row_lo and row_lo + 8
      const int pos_lo = g.pos0 + row_lo, col = (lane % 4) * 2;
      const bool wg_has_rows = g.q0 + wg_row0 < g.q_len;
      const int wg_last_pos = g.pos0 + wg_row0 + min(64, g.q_len - g.q0 - wg_row0) - 1;
      const int warp_first_pos = g.pos0 + wg_row0 + warp * 16;
      const int kv_end = g.kv_end, kv_tiles = warp_uniform(g.kv_tiles), tile_hi = g.tile_lo + kv_tiles;
      // Scores live in the log2 domain. With a positive scale and no soft cap the max of the raw dot
      // products times scale * log2 e is the scaled max, and the scale folds into the exp2's FFMA;
      // otherwise (a soft cap, or an FP8 cache's k_scale not positive) each score is scaled (and
      // capped: cap * tanh(score / cap)) on its own first.
      const int kv_head = item.head / (p.num_heads / p.num_kv_heads);
      const float scale = kFp8 ? p.scale * scale_at(p.k_scale, kv_head) : p.scale;
      const float out_scale = kFp8 ? scale_at(p.v_scale, kv_head) : 1.0f;
      const bool per_score = soft_cap || !(scale > 0.0f);
      const float score_mult = per_score ? 1.0f : scale * kLog2e;
      float o[D / 2];
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
      float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // sums are lane-partial
      int kind[2] = {kScoreFinite, kScoreFinite};  // non-finite scores seen, lane-partial (common.cuh)

      // Tiles this warpgroup computes, [wg_lo, wg_hi): under a causal mask none past its last row's position,
      // under a window none wholly before its first row's window.
      const int wg_hi = warp_uniform(p.causal ? min(tile_hi, wg_last_pos / kKvTile + 1) : tile_hi);
      const int wg_lo =
          warp_uniform(window > 0 ? max(g.tile_lo, max(0, g.pos0 + wg_row0 - window + 1) / kKvTile) : g.tile_lo);
      const int wg_tiles = warp_uniform(wg_has_rows ? wg_hi - wg_lo : 0);
      auto wait_tile = [&](int kt) {
        mbarrier_wait(full(ring + kt), ((ring + kt) / kStages) & 1);
        fence_proxy_async();  // the copies' generic-proxy writes, now visible here, before wgmma reads them
      };
      auto release_tile = [&](int kt) { mbarrier_arrive(empty(ring + kt)); };
      auto k_tile = [&](int kt) { return kv_smem + ((ring + kt) % kStages) * kStageBytes; };

      // The next item's query rows are loaded under this item's last tile, once S = Q K^T of that tile
      // is done with the rows. That tile is the last the producer issues for the item (tiles go last
      // to first, and the ones past this warpgroup's rows were released up front), so the producer
      // can hand over the next item meanwhile. With no rows here, or tiles before this warpgroup's
      // window still to come (the producer needs their stages freed first), the load waits for the end.
      WorkItem next{-1, 0, 0};
      ItemGeometry next_g{};
      bool next_loaded = false;
      auto load_next = [&] {
        named_barrier(2 + wg, 128);  // every warp's S = Q K^T is done with the rows
        next = wait_item(n + 1);
        if (next.seq >= 0) {
          next_g = item_geometry<kQueryTile, kKvTile>(p, next);
          load_q(next, next_g);
        }
        next_loaded = true;
      };
      // Key tiles come last to first: the first `skip` ring positions hold the tiles past this
      // warpgroup's rows, waited for and released now (a release never counts towards a later use of
      // the stage); computation m then takes ring position pos(m), key tile key(m); the tiles before
      // its window come last, released after the computation.
      const int skip = wg_tiles > 0 ? tile_hi - wg_hi : kv_tiles;
      const int behind = kv_tiles - skip - wg_tiles;
      const bool load_next_early = wg_tiles > 0 && behind == 0;
      auto pass_tiles = [&](int from, int to) {
        for (int kt = from; kt < to; ++kt) {
          mbarrier_wait(full(ring + kt), ((ring + kt) / kStages) & 1);
          release_tile(kt);
        }
      };
      pass_tiles(0, skip);
      auto pos = [&](int m) { return skip + m; };
      auto key = [&](int m) { return wg_hi - 1 - m; };

      float sc[kKvTile / 2];    // S of the newest tile
      uint32_t pf[kKvTile / 16][4];  // P of the tile before it, wgmma's register A operand
      float rescale[2];
      // S = Q K^T: D / 16 k-steps; a k-step moves 32 bytes along a 128-byte row, then to the next column block.
      // The descriptors of the tiles' starts, each k-step's an add of a constant.
      auto issue_qk = [&](int kt) {
        const uint64_t k_desc = smem_desc(k_tile(kt), 16, 1024);
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
          wgmma_ss<T, kKvTile>(sc, smem_desc_advance(q_desc, (ks / 4) * kQueryTile * 128 + (ks % 4) * 32),
                               smem_desc_advance(k_desc, (ks / 4) * kKvTile * 128 + (ks % 4) * 32), ks > 0);
        }
        wgmma_commit();
      };
      // O += P V: k-step kk covers keys 16kk..16kk+15, two 1024-byte atoms down the V tile.
      auto issue_pv = [&](int kt) {
        const uint64_t v_desc = smem_desc(k_tile(kt) + kTileBytes, kKvTile * 128, 1024);
#pragma unroll
        for (int kk = 0; kk < kKvTile / 16; ++kk) {
          wgmma_rs<T, D>(o, pf[kk], smem_desc_advance(v_desc, kk * 16 * 128), 1);
        }
        wgmma_commit();
      };
      // Online softmax of S (tile kt) in place: soft cap, masks, new row maxima, rescale factors for O, exp2.
      auto softmax = [&](int kt) {
        const int t0 = kt * kKvTile;
        if (per_score) {
          // tanh(x) = 1 - 2 / (e^2x + 1): within a few units of 1e-7 of tanh, +-1 at +-inf, NaN kept.
#pragma unroll
          for (int i = 0; i < kKvTile / 2; ++i) {
            const float v = sc[i] * scale * kLog2e;
            sc[i] = soft_cap ? cap_out * (1.0f - __fdividef(2.0f, exp2_ftz(v * cap_in) + 1.0f)) : v;
          }
        }
        // Only tiles past the sequence's end, on the causal diagonal or at the window's edge hide any
        // (row, key) pair (a warp's rows lie at positions warp_first_pos .. warp_first_pos + 15).
        if (t0 + kKvTile > kv_end || (p.causal && t0 + kKvTile - 1 > warp_first_pos) ||
            (window > 0 && t0 < warp_first_pos + 15 - window + 1)) {
#pragma unroll
          for (int i = 0; i < kKvTile / 2; ++i) {
            const int t = t0 + (i / 4) * 8 + col + (i & 1), pos = pos_lo + ((i & 2) ? 8 : 0);
            if (t >= kv_end || (p.causal && t > pos) || (window > 0 && t <= pos - window)) sc[i] = -INFINITY;
          }
        }
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int i = 0; i < kKvTile / 2; ++i) tile_max[(i >> 1) & 1] = fmax_nan(tile_max[(i >> 1) & 1], sc[i]);
        float exp_offset[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          kind[r] = max(kind[r], nonfinite_kind(tile_max[r]));
          tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
          tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
          const float new_max = fmaxf(row_max[r], tile_max[r] * score_mult);
          rescale[r] = new_max == -INFINITY ? 1.0f : exp2_ftz(row_max[r] - new_max);
          row_max[r] = new_max;
          row_sum[r] *= rescale[r];
          // A row with no visible key yet has only -inf scores, which exp2 takes to 0 with any finite offset.
          exp_offset[r] = new_max == -INFINITY ? 0.0f : -new_max;
        }
#pragma unroll
        for (int i = 0; i < kKvTile / 2; ++i) {
          const int r = (i >> 1) & 1;
          sc[i] = exp2_ftz(fmaf(sc[i], score_mult, exp_offset[r]));
          row_sum[r] += sc[i];
        }
      };
      // P in f16/bf16 as wgmma's A fragments, 16 keys per k-step: the pairs mma.m16n8k16 takes.
      auto pack_p = [&] {
#pragma unroll
        for (int kk = 0; kk < kKvTile / 16; ++kk) {
#pragma unroll
          for (int h = 0; h < 4; ++h) pf[kk][h] = pack2<T>(sc[8 * kk + 2 * h], sc[8 * kk + 2 * h + 1]);
        }
      };

      // The softmax of tile kt runs while the tensor cores compute P V of tile kt - 1 (FlashAttention-3's
      // intra-warpgroup overlap): S of kt and P of kt - 1 are live together.
      if (wg_tiles > 0) {
        wait_tile(pos(0));
        wgmma_fence();
        issue_qk(pos(0));
        wgmma_wait<0>();
        fence_registers(sc);
        softmax(key(0));  // O is still zero: nothing to rescale
        if (load_next_early && wg_tiles == 1) load_next();
        pack_p();
        for (int kt = 1; kt < wg_tiles; ++kt) {
          wait_tile(pos(kt));
          wgmma_fence();
          issue_qk(pos(kt));
          issue_pv(pos(kt - 1));
          wgmma_wait<1>();  // S of tile kt
          fence_registers(sc);
          softmax(key(kt));
          // Also a branch between the softmax and the wait below: ptxas hoists a wgmma wait to the top of
          // its basic block, which would put the softmax after P V instead of under it.
          if (load_next_early && kt == wg_tiles - 1) load_next();
          wgmma_wait<0>();  // P V of tile kt - 1
          fence_registers(o);
          release_tile(pos(kt - 1));
          // Once the row maxima settle, rescale is exactly 1 and the O update can be skipped (warp-uniform).
          if (__any_sync(0xffffffffu, rescale[0] != 1.0f || rescale[1] != 1.0f)) {
#pragma unroll
            for (int i = 0; i < D / 2; ++i) o[i] *= rescale[(i >> 1) & 1];
          }
          pack_p();
        }
        wgmma_fence();
        issue_pv(pos(wg_tiles - 1));
        wgmma_wait<0>();
        fence_registers(o);
        release_tile(pos(wg_tiles - 1));
      }
      pass_tiles(skip + wg_tiles, skip + wg_tiles + behind);
      if (!next_loaded) load_next();

#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
        row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
      }
      mbarrier_wait(item_done(n), (n >> 1) & 1);  // the producer's bad flag is final
      const bool bad = g.bad_len || slots[n & 1].bad != 0;
      // With cu_seqlens_q itself out of range there is no row that is certainly ours to write.
      const bool rows_known = g.rows.known;
#pragma unroll
      for (int r = 0; r < 2; ++r) kind[r] = bad ? kScoreNaN : quad_max(kind[r]);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int q = g.q0 + row_lo + 8 * r;
        if (!rows_known || q >= g.q_len) continue;
        const int64_t out_row = static_cast<int64_t>(g.q_begin + q) * p.num_heads + item.head;
        const float inv = row_sum[r] > 0.0f ? out_scale / row_sum[r] : 0.0f;  // a row that sees nothing yields zeros
        T* out = static_cast<T*>(p.out) + out_row * D + col;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          const float lo = flagged_out(kind[r], o[4 * j + 2 * r] * inv);
          const float hi = flagged_out(kind[r], o[4 * j + 2 * r + 1] * inv);
          *reinterpret_cast<uint32_t*>(out + 8 * j) = pack2<T>(lo, hi);
        }
        if (p.lse && lane % 4 == 0) {
          p.lse[out_row] =
              flagged_lse(kind[r], row_sum[r] > 0.0f ? (row_max[r] + log2f(row_sum[r])) * kLn2 : -INFINITY);
        }
      }
      mbarrier_arrive(item_empty(n));
      ring += kv_tiles;
      item = next;
      g = next_g;
    }
  }
#endif
}

template <typename T, typename KV, int D>
int launch(const PagedPrefillParams& p, cudaStream_t stream) {
  using Shape = Sm90Shape<D, CacheElem<T, KV>::kFp8>;
  const bool lane_pages = (p.block_size & (p.block_size - 1)) == 0 && p.block_size >= 4;
  auto kernel = lane_pages ? paged_prefill_sm90_kernel<T, KV, D, true> : paged_prefill_sm90_kernel<T, KV, D, false>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Shape::kSmemBytes);
  // Sequence i needs ceil(q_len_i / 128) blocks: at most total_q / 128 + batch in all.
  const int64_t tiles = static_cast<int64_t>(p.total_q) / Shape::kQueryTile + p.batch;
  // With a tile counter, one resident block per SM takes the work items in turn (WorkQueue).
  const dim3 grid = p.tile_counter ? dim3(static_cast<unsigned>(std::min<int64_t>(tiles * p.num_heads,
                                                                                  current_multiprocessors())))
                                   : dim3(static_cast<unsigned>(tiles), p.num_heads);
  kernel<<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

// Whether this build holds the kernel's sm_90a code: the #error above rules out plain sm_90.
constexpr bool built_for_sm90a() {
#ifdef __CUDA_ARCH_LIST__
  constexpr int archs[] = {__CUDA_ARCH_LIST__};
  for (int arch : archs) {
    if (arch == 900) return true;
  }
#endif
  return false;
}

bool current_device_is_sm90() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return false;
  if (device < kMaxDevices && known[device].load(std::memory_order_relaxed) != 0) {
    return known[device].load(std::memory_order_relaxed) == 1;
  }
  int major = 0, minor = 0;
  const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
  const bool yes = ok && major == 9 && minor == 0;
  if (device < kMaxDevices) known[device].store(yes ? 1 : 2, std::memory_order_relaxed);
  return yes;
}

}  // namespace

bool paged_prefill_sm90_supports(const PagedPrefillParams& p) {
  return built_for_sm90a() && (p.dtype == DType::f16 || p.dtype == DType::bf16) &&
         (p.kv_dtype == p.dtype || is_fp8(p.kv_dtype)) &&
         (p.head_dim == 64 || p.head_dim == 128 || (p.head_dim == 256 && !is_fp8(p.kv_dtype))) && p.mask == nullptr &&
         p.scale > 0.0f && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
         aligned16(p.query) && aligned16(p.key_cache) && aligned16(p.value_cache) && aligned16(p.out) &&
         static_cast<int64_t>(p.num_blocks) * p.block_size <= INT32_MAX &&  // cache rows fit an int
         current_device_is_sm90();
}

int paged_prefill_sm90(const PagedPrefillParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto type) {
    using T = decltype(type);
    if constexpr (std::is_same<T, float>::value) {
      return static_cast<int>(cudaErrorInvalidValue);
    } else {
      auto by_head_dim = [&](auto kv) {
        using KV = decltype(kv);
        if (p.head_dim == 64) return launch<T, KV, 64>(p, stream);
        if (p.head_dim == 128) return launch<T, KV, 128>(p, stream);
        // FP8 at head dim 256 would overflow shared memory (supports() refuses it).
        if constexpr (std::is_same<KV, T>::value) return launch<T, KV, 256>(p, stream);
        return static_cast<int>(cudaErrorInvalidValue);
      };
      if (p.kv_dtype == DType::e4m3) return by_head_dim(Fp8<__NV_E4M3>{});
      if (p.kv_dtype == DType::e5m2) return by_head_dim(Fp8<__NV_E5M2>{});
      return by_head_dim(T{});
    }
  });
}

}  // namespace pagedlm::cuda
