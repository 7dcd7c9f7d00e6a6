// CUDA path of speculative verification, the GPU twin of cpp/src/verify.cpp: the same Philox
// draws, integer weights and exact acceptance tests (pagedlm/verify.h), so results are
// bit-identical to the CPU path.
//
// Shape: one batch row belongs to a thread-block cluster of C CTAs (C <= 8 on sm_90, chosen from
// the batch so the grid fills the GPU); each CTA owns a contiguous slice of the vocabulary and
// streams it with 16-byte loads, several in flight per thread. Slice totals and argmax
// candidates meet through distributed shared memory, one cluster barrier per exchange: no
// global scratch, no second kernel, no host synchronization.
//
// - verify_speculative gathers p_i(x_i) and q_i(x_i) for every draft in parallel, finds the
//   first rejection, then reads only the rows it samples from (p and q at the rejection, or p
//   at the bonus position): most of the k+1 rows are never touched.
// - verify_greedy needs every argmax up to the first mismatch, so it reads all len+1 rows of a
//   row at once (one flattened stream per CTA) rather than one row after another.
// - The tree kernels walk node by node; each step reads one row of V across the cluster.
// - Sampling by inverse CDF narrows down level by level: the CTA slice holding the threshold
//   (from the cluster's slice totals), then a warp's part, repeated, until one warp scans the
//   last few vectors from registers. Integer weights make every level's totals exact.
//
// Values are never trusted: lengths are clamped, an out-of-range draft token is rejected, an
// out-of-range tree token never matches, an out-of-range parent makes a padding node.
#include <cooperative_groups.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "device_query.h"
#include "verify_launchers.h"

namespace pagedlm::cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCluster = 8;   // the portable cluster size
constexpr int kLoadsInFlight = 4;  // per thread, per streamed row (x2 for p and q)
constexpr int kFinalVectors = 2;   // per lane in the last sampling level, held in registers
constexpr unsigned kFullMask = 0xffffffffu;

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define PAGEDLM_VERIFY_NO_CLUSTERS 1  // built for an older GPU: the launcher uses C = 1
#endif

// The CTAs that share one batch row: a cluster along x, so blockIdx.x = row * size + rank.
struct RowGroup {
  int rank, size;

  __device__ void sync() const {
#ifndef PAGEDLM_VERIFY_NO_CLUSTERS
    if (size > 1) {
      cg::this_cluster().sync();
      return;
    }
#endif
    __syncthreads();
  }

  // The same shared-memory variable in CTA `r` of the group.
  template <typename T>
  __device__ T* remote(T* local, int r) const {
#ifndef PAGEDLM_VERIFY_NO_CLUSTERS
    if (size > 1) return cg::this_cluster().map_shared_rank(local, r);
#endif
    return local;
  }
};

__device__ RowGroup row_group(int cluster_size) {
  return RowGroup{static_cast<int>(blockIdx.x % cluster_size), cluster_size};
}

struct Range {
  int64_t begin, end;
  __device__ int64_t size() const { return end - begin; }
};

// Part i of n nearly equal consecutive parts.
__device__ Range part(Range r, int i, int n) {
  const int64_t len = r.size();
  return Range{r.begin + len * i / n, r.begin + len * (i + 1) / n};
}

__device__ uint64_t warp_sum(uint64_t x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ uint64_t warp_inclusive_scan(uint64_t x, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint64_t y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  return x;
}

__device__ uint64_t offset_of(const RandomStream& r) {
  return r.offset_tensor ? static_cast<uint64_t>(*r.offset_tensor) : r.offset;
}

// ---- weights of a probability row --------------------------------------------------------

// The weights a row is sampled from: max(0, p - q), or p alone (q null), or p without the
// drafted token (q null, one_hot >= 0: a deterministic draft), with `excluded` tokens at zero.
// Element for element the same expressions as the CPU path, so the same integers.
template <int kVec>
struct ProbSource {
  const float* p = nullptr;
  const float* q = nullptr;
  int64_t one_hot = -1;
  const int32_t* excluded = nullptr;
  int num_excluded = 0;

  struct Values {
    float p[kVec], q[kVec];
  };

  __device__ Values load(int64_t vector) const {
    Values x;
    if constexpr (kVec == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(p) + vector);
      x.p[0] = a.x, x.p[1] = a.y, x.p[2] = a.z, x.p[3] = a.w;
      if (q) {
        const float4 b = __ldg(reinterpret_cast<const float4*>(q) + vector);
        x.q[0] = b.x, x.q[1] = b.y, x.q[2] = b.z, x.q[3] = b.w;
      }
    } else {
      x.p[0] = __ldg(p + vector);
      if (q) x.q[0] = __ldg(q + vector);
    }
    return x;
  }

  __device__ uint64_t weight(const Values& x, int e, int64_t token) const {
    const float r = q ? x.p[e] - x.q[e] : token == one_hot ? x.p[e] - 1.0f : x.p[e];
    uint64_t w = prob_weight(r);
    for (int i = 0; i < num_excluded; ++i) {
      if (excluded[i] == token) w = 0;
    }
    return w;
  }

  __device__ uint64_t weight_sum(const Values& x, int64_t vector) const {
    uint64_t s = 0;
#pragma unroll
    for (int e = 0; e < kVec; ++e) s += weight(x, e, vector * kVec + e);
    return s;
  }
};

// The weight of range r (in vectors), summed by one warp with kLoadsInFlight loads per lane
// issued before any is used.
template <int kVec>
__device__ uint64_t warp_range_weight(const ProbSource<kVec>& src, Range r, int lane) {
  uint64_t sum = 0;
  for (int64_t base = r.begin + lane; base < r.end; base += 32 * kLoadsInFlight) {
    typename ProbSource<kVec>::Values x[kLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      if (base + 32 * u < r.end) x[u] = src.load(base + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      if (base + 32 * u < r.end) sum += src.weight_sum(x[u], base + 32 * u);
    }
  }
  return warp_sum(sum);
}

// Warp w sums part w of r into totals[w]; ends with the block synchronized.
template <int kVec>
__device__ void warp_part_totals(const ProbSource<kVec>& src, Range r, uint64_t* totals) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const uint64_t t = warp_range_weight(src, part(r, warp, kWarps), lane);
  if (lane == 0) totals[warp] = t;
  __syncthreads();
}

// Which of n consecutive parts holds `target` (an offset into their combined weight); moves
// target to an offset into that part. Every thread computes the same answer.
__device__ int locate(const uint64_t* totals, int n, uint64_t& target) {
  for (int i = 0; i < n - 1; ++i) {
    if (target < totals[i]) return i;
    target -= totals[i];
  }
  return n - 1;
}

struct SampleShared {
  uint64_t warp_total[kWarps];
  uint64_t published[2];  // this CTA's slice total, read by the cluster (two slots: see below)
  uint64_t slice_total[kMaxCluster];
};

// The total weight of a row across the cluster. Leaves in shared memory this CTA's warp-part
// totals and every CTA's slice total. Consecutive calls alternate `published` slots, so a CTA
// never overwrites a slot that a slower CTA may still be reading (it has passed one more
// cluster barrier by the time it writes that slot again).
template <int kVec>
__device__ uint64_t row_weight_total(const ProbSource<kVec>& src, int64_t num_vectors, const RowGroup& g,
                                     SampleShared& sh, int& parity) {
  __syncthreads();  // the previous call's readers of warp_total and slice_total are done
  const Range slice = part(Range{0, num_vectors}, g.rank, g.size);
  warp_part_totals(src, slice, sh.warp_total);
  if (threadIdx.x == 0) {
    uint64_t s = 0;
    for (int w = 0; w < kWarps; ++w) s += sh.warp_total[w];
    sh.published[parity] = s;
  }
  g.sync();
  if (threadIdx.x < g.size) sh.slice_total[threadIdx.x] = *g.remote(&sh.published[parity], threadIdx.x);
  __syncthreads();
  parity ^= 1;
  uint64_t total = 0;
  for (int c = 0; c < g.size; ++c) total += sh.slice_total[c];
  return total;
}

// The last level: r spans at most kWarps * 32 * kFinalVectors vectors. Each warp loads its part
// into registers and sums it; the warp whose part holds target scans it lane by lane. Returns
// the token in every lane of that warp, -1 elsewhere.
template <int kVec>
__device__ int64_t find_in_range(const ProbSource<kVec>& src, Range r, uint64_t target, uint64_t* totals) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const Range mine = part(r, warp, kWarps);
  typename ProbSource<kVec>::Values x[kFinalVectors];
  uint64_t lane_weight[kFinalVectors];
#pragma unroll
  for (int j = 0; j < kFinalVectors; ++j) {
    if (mine.begin + j * 32 + lane < mine.end) x[j] = src.load(mine.begin + j * 32 + lane);
  }
  uint64_t lane_total = 0;
#pragma unroll
  for (int j = 0; j < kFinalVectors; ++j) {
    const int64_t v = mine.begin + j * 32 + lane;
    lane_weight[j] = v < mine.end ? src.weight_sum(x[j], v) : 0;
    lane_total += lane_weight[j];
  }
  const uint64_t warp_total = warp_sum(lane_total);
  if (lane == 0) totals[warp] = warp_total;
  __syncthreads();
  if (locate(totals, kWarps, target) != warp) return -1;
  // Step j covers vectors mine.begin + 32j .. + 31, lane order. No early exit, so the loop
  // unrolls and x stays in registers.
  uint64_t before = 0;  // weight of the steps before j
  int64_t token = -1;
#pragma unroll
  for (int j = 0; j < kFinalVectors; ++j) {
    const uint64_t inclusive = warp_inclusive_scan(lane_weight[j], lane);
    const unsigned crossing = __ballot_sync(kFullMask, token < 0 && before + inclusive > target);
    if (crossing) {
      // The first lane past the target owns a vector of positive weight (a zero weight never
      // moves the running sum past it), so its elements are loaded; scan them one by one.
      const int first = __ffs(crossing) - 1;
      int64_t found = -1;
      if (lane == first) {
        const int64_t v = mine.begin + j * 32 + lane;
        uint64_t running = before + inclusive - lane_weight[j];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          running += src.weight(x[j], e, v * kVec + e);
          if (found < 0 && running > target) found = v * kVec + e;
        }
      }
      token = __shfl_sync(kFullMask, found, first);
    }
    before += __shfl_sync(kFullMask, inclusive, 31);
  }
  return token;  // >= 0: target < this warp's total
}

// Inverse-CDF sample of a row over src's weights: the smallest token whose running weight
// exceeds sample_threshold(total, word). Exactly one thread of the cluster writes it to *out.
// Returns false, writing nothing, when every weight is zero (the same answer in every CTA).
template <int kVec>
__device__ bool sample_row(const ProbSource<kVec>& src, int64_t num_vectors, uint32_t word, int64_t* out,
                           const RowGroup& g, SampleShared& sh, int& parity) {
  const uint64_t total = row_weight_total(src, num_vectors, g, sh, parity);
  if (total == 0) return false;
  uint64_t target = sample_threshold(total, word);
  if (locate(sh.slice_total, g.size, target) != g.rank) return true;
  const Range slice = part(Range{0, num_vectors}, g.rank, g.size);
  Range range = part(slice, locate(sh.warp_total, kWarps, target), kWarps);
  while (range.size() > kWarps * 32 * kFinalVectors) {
    __syncthreads();  // everyone has located in warp_total
    warp_part_totals(src, range, sh.warp_total);
    range = part(range, locate(sh.warp_total, kWarps, target), kWarps);
  }
  __syncthreads();
  const int64_t token = find_in_range(src, range, target, sh.warp_total);
  if (token >= 0 && threadIdx.x % 32 == 0) *out = token;
  return true;
}

// ---- argmax of logit rows ----------------------------------------------------------------

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Chunk {
  T v[kVec];
};

template <typename T, int kVec>
__device__ Chunk<T, kVec> load_chunk(const T* row, int64_t vector) {
  Chunk<T, kVec> c;
  if constexpr (sizeof(T) * kVec == 16) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row) + vector);
    memcpy(&c, &raw, 16);
  } else {
    c.v[0] = row[vector];
  }
  return c;
}

// The largest value of a chunk, NaN ignored (all NaN: NaN). f16/bf16 pairs are compared packed
// first; comparing in the narrow type is exact.
template <typename T, int kVec>
__device__ float chunk_max(const Chunk<T, kVec>& c) {
  if constexpr (kVec == 8 && !std::is_same_v<T, float>) {
    using Pair = std::conditional_t<std::is_same_v<T, __half>, __half2, __nv_bfloat162>;
    Pair pairs[4];
    memcpy(pairs, c.v, 16);
    const Pair m = __hmax2(__hmax2(pairs[0], pairs[1]), __hmax2(pairs[2], pairs[3]));
    return fmaxf(to_float(m.x), to_float(m.y));
  } else {
    float m = to_float(c.v[0]);
#pragma unroll
    for (int e = 1; e < kVec; ++e) m = fmaxf(m, to_float(c.v[e]));
    return m;
  }
}

// (value, index) packed so that the largest key is the largest value, then the lowest index.
// Zero is below every candidate and decodes as index 0 (a row of NaN and -inf).
__device__ uint64_t argmax_key(float value, int64_t index) {
  if (value == 0.0f) value = 0.0f;  // -0 ranks as +0
  uint32_t bits = __float_as_uint(value);
  bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(index));
}

__device__ int64_t argmax_index(uint64_t key) {
  return key == 0 ? 0 : static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(key));
}

// Argmax candidates of this CTA's vocabulary slice of num_rows consecutive rows, folded into
// keys[row] with shared-memory atomics. The (row, vector) pairs are streamed as one flat
// sequence so every thread keeps kUnroll loads in flight whatever the row count.
template <typename T, int kVec>
__device__ void slice_argmax(const T* first_row, int64_t vocab, int num_rows, Range slice, uint64_t* keys) {
  constexpr int kUnroll = 8;
  const int64_t per_row = slice.size();
  if (per_row <= 0) return;
  int row = 0;
  int64_t offset = threadIdx.x;  // into the row's slice, in vectors
  while (offset >= per_row && row < num_rows) offset -= per_row, ++row;
  int best_row = row;
  float best = -INFINITY;
  int64_t best_index = -1;
  auto flush = [&] {
    if (best_index >= 0) atomicMax(reinterpret_cast<unsigned long long*>(&keys[best_row]), argmax_key(best, best_index));
  };
  while (row < num_rows) {
    Chunk<T, kVec> chunk[kUnroll];
    int chunk_row[kUnroll];
    int64_t chunk_vector[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      chunk_row[u] = row;
      chunk_vector[u] = slice.begin + offset;
      if (row < num_rows) chunk[u] = load_chunk<T, kVec>(first_row + row * vocab, chunk_vector[u]);
      offset += kThreads;
      while (offset >= per_row && row < num_rows) offset -= per_row, ++row;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (chunk_row[u] >= num_rows) break;
      if (chunk_row[u] != best_row) {
        flush();
        best_row = chunk_row[u], best = -INFINITY, best_index = -1;
      }
      const float m = chunk_max(chunk[u]);
      if (m > best) {  // within a thread indices only grow: an equal value later never wins
        int e = 0;
        while (e < kVec - 1 && to_float(chunk[u].v[e]) != m) ++e;
        best = m, best_index = chunk_vector[u] * kVec + e;
      }
    }
  }
  flush();
}

// The argmax of row `row` from every CTA's keys (read through the cluster).
__device__ int64_t cluster_argmax(const RowGroup& g, uint64_t* keys, int row) {
  uint64_t key = 0;
  for (int c = 0; c < g.size; ++c) {
    const uint64_t other = *g.remote(&keys[row], c);
    key = other > key ? other : key;
  }
  return argmax_index(key);
}

// ---- kernels --------------------------------------------------------------------------

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 2) verify_greedy_kernel(ChainVerifyParams p, int cluster_size) {
  extern __shared__ uint64_t greedy_shared[];
  uint64_t* keys = greedy_shared;                                         // [k + 1]
  int64_t* best = reinterpret_cast<int64_t*>(greedy_shared + p.k + 1);   // [k + 1]
  __shared__ int first_mismatch;
  const RowGroup g = row_group(cluster_size);
  const int64_t b = blockIdx.x / cluster_size;
  const int k = p.k;
  const int len = p.draft_lens ? min(max(p.draft_lens[b], 0), k) : k;
  const int64_t* drafts = p.draft_tokens + b * k;

  for (int i = threadIdx.x; i <= len; i += kThreads) keys[i] = 0;
  if (threadIdx.x == 0) first_mismatch = len;
  __syncthreads();
  const T* rows = static_cast<const T*>(p.target) + b * (k + 1) * static_cast<int64_t>(p.vocab);
  slice_argmax<T, kVec>(rows, p.vocab, len + 1, part(Range{0, p.vocab / kVec}, g.rank, g.size), keys);
  g.sync();
  if (g.rank == 0) {
    for (int i = threadIdx.x; i <= len; i += kThreads) {
      best[i] = cluster_argmax(g, keys, i);
      if (i < len && drafts[i] != best[i]) atomicMin(&first_mismatch, i);
    }
    __syncthreads();
    const int accepted = first_mismatch;
    int64_t* out = p.output_tokens + b * (k + 1);
    for (int i = threadIdx.x; i <= k; i += kThreads) out[i] = i < accepted ? drafts[i] : i == accepted ? best[i] : -1;
    if (threadIdx.x == 0) p.num_accepted[b] = accepted;
  }
  g.sync();  // no CTA leaves while rank 0 may still read its keys
}

template <int kVec>
__global__ void __launch_bounds__(kThreads, 2) verify_speculative_kernel(ChainVerifyParams p, int cluster_size) {
  __shared__ SampleShared sh;
  __shared__ int first_rejected;
  const RowGroup g = row_group(cluster_size);
  const int64_t b = blockIdx.x / cluster_size;
  const int k = p.k;
  const int64_t vocab = p.vocab;
  const int len = p.draft_lens ? min(max(p.draft_lens[b], 0), k) : k;
  const uint64_t offset = offset_of(p.random);
  const float* target = static_cast<const float*>(p.target) + b * (k + 1) * vocab;  // row b, position 0
  const float* draft = p.draft_probs ? p.draft_probs + b * k * vocab : nullptr;
  const int64_t* drafts = p.draft_tokens + b * k;

  // Every draft's test at once: only p_i(x_i) and q_i(x_i) are read.
  if (threadIdx.x == 0) first_rejected = len;
  __syncthreads();
  for (int i = threadIdx.x; i < len; i += kThreads) {
    const int64_t token = drafts[i];
    bool accepted = false;
    if (token >= 0 && token < vocab) {
      const float q = draft ? draft[i * vocab + token] : 1.0f;
      const uint32_t word = philox_draws(p.random.seed, offset, static_cast<uint32_t>(b), i).word[kDrawAccept];
      accepted = accept_draft(word, target[i * vocab + token], q);
    }
    if (!accepted) atomicMin(&first_rejected, i);
  }
  __syncthreads();
  const int accepted = first_rejected;
  int64_t* out = p.output_tokens + b * (k + 1);
  if (g.rank == 0) {
    for (int i = threadIdx.x; i <= k; i += kThreads) {
      if (i != accepted) out[i] = i < accepted ? drafts[i] : -1;
    }
    if (threadIdx.x == 0) p.num_accepted[b] = accepted;
  }

  // The one token left to sample: from the residual at the rejection, or the bonus from p.
  ProbSource<kVec> src;
  src.p = target + accepted * vocab;
  if (accepted < len) {
    if (draft) {
      src.q = draft + accepted * vocab;
    } else {
      src.one_hot = drafts[accepted];
    }
  }
  const uint32_t word = philox_draws(p.random.seed, offset, static_cast<uint32_t>(b), accepted).word[kDrawSample];
  int parity = 0;
  bool sampled = sample_row(src, vocab / kVec, word, out + accepted, g, sh, parity);
  if (!sampled && accepted < len) {  // the residual has no mass: sample from p
    ProbSource<kVec> plain;
    plain.p = src.p;
    sampled = sample_row(plain, vocab / kVec, word, out + accepted, g, sh, parity);
  }
  if (!sampled && g.rank == 0 && threadIdx.x == 0) out[accepted] = 0;
  g.sync();  // no CTA leaves while another may still read its slice total
}

// A row's tree in shared memory: parents with bad values turned into padding (-1), tokens out of
// range into -1 (they never match and weigh nothing).
struct TreeShared {
  int32_t* parent;
  int32_t* token;
  int32_t* path;  // accepted nodes, root first
};

__device__ TreeShared load_tree(const TreeVerifyParams& p, int64_t b, char* shared) {
  TreeShared t;
  t.parent = reinterpret_cast<int32_t*>(shared);
  t.token = t.parent + p.nodes;
  t.path = t.token + p.nodes;
  for (int c = threadIdx.x; c < p.nodes; c += kThreads) {
    const int32_t parent = p.parents[b * p.nodes + c];
    t.parent[c] = c > 0 && parent >= 0 && parent < c ? parent : -1;
    const int64_t token = p.tree_tokens[b * p.nodes + c];
    t.token[c] = token >= 0 && token < p.vocab ? static_cast<int32_t>(token) : -1;
  }
  if (threadIdx.x == 0) t.path[0] = 0;
  __syncthreads();
  return t;
}

// Rank 0 writes the accepted path (padded with -1) and its length.
__device__ void write_tree_path(const TreeVerifyParams& p, int64_t b, const TreeShared& t, int depth,
                                const RowGroup& g) {
  __syncthreads();
  if (g.rank != 0) return;
  for (int i = threadIdx.x; i < p.width; i += kThreads) p.accepted_nodes[b * p.width + i] = i <= depth ? t.path[i] : -1;
  if (threadIdx.x == 0) p.num_accepted[b] = depth;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 2) verify_tree_greedy_kernel(TreeVerifyParams p, int cluster_size) {
  extern __shared__ __align__(16) char tree_shared[];
  __shared__ uint64_t keys[2];  // alternate per step, like SampleShared::published
  __shared__ int next_child;
  const RowGroup g = row_group(cluster_size);
  const int64_t b = blockIdx.x / cluster_size;
  const TreeShared tree = load_tree(p, b, tree_shared);
  const Range slice = part(Range{0, p.vocab / kVec}, g.rank, g.size);
  int node = 0, depth = 0, parity = 0;
  int64_t best = 0;
  for (;;) {
    if (threadIdx.x == 0) keys[parity] = 0, next_child = INT_MAX;
    __syncthreads();
    const T* row = static_cast<const T*>(p.target) + (b * p.nodes + node) * static_cast<int64_t>(p.vocab);
    slice_argmax<T, kVec>(row, p.vocab, 1, slice, &keys[parity]);
    g.sync();
    best = cluster_argmax(g, keys, parity);
    parity ^= 1;
    if (depth + 1 >= p.width) break;
    for (int c = node + 1 + threadIdx.x; c < p.nodes; c += kThreads) {
      if (tree.parent[c] == node && tree.token[c] == best) atomicMin(&next_child, c);
    }
    __syncthreads();
    if (next_child == INT_MAX) break;
    node = next_child;
    ++depth;
    if (threadIdx.x == 0) tree.path[depth] = node;
    __syncthreads();  // everyone has read next_child before it is reset
  }
  write_tree_path(p, b, tree, depth, g);
  if (g.rank == 0 && threadIdx.x == 0) p.next_token[b] = best;
  g.sync();
}

template <int kVec>
__global__ void __launch_bounds__(kThreads, 2) verify_tree_speculative_kernel(TreeVerifyParams p, int cluster_size) {
  extern __shared__ __align__(16) char tree_shared[];
  __shared__ SampleShared sh;
  __shared__ int next_child, num_excluded;
  const RowGroup g = row_group(cluster_size);
  const int64_t b = blockIdx.x / cluster_size;
  const TreeShared tree = load_tree(p, b, tree_shared);
  uint64_t* child_weight = reinterpret_cast<uint64_t*>(tree_shared + 16 * ((3 * 4 * p.nodes + 15) / 16));
  uint32_t* child_word = reinterpret_cast<uint32_t*>(child_weight + p.nodes);
  int32_t* excluded = reinterpret_cast<int32_t*>(child_word + p.nodes);
  const uint64_t offset = offset_of(p.random);
  const int64_t num_vectors = p.vocab / kVec;
  int node = 0, depth = 0, parity = 0;
  for (;;) {
    const float* probs = static_cast<const float*>(p.target) + (b * p.nodes + node) * static_cast<int64_t>(p.vocab);
    int excluded_count = 0;
    if (depth + 1 < p.width) {
      int found_child = 0;
      for (int c = node + 1 + threadIdx.x; c < p.nodes; c += kThreads) {
        if (tree.parent[c] != node) continue;
        found_child = 1;
        child_weight[c] = tree.token[c] >= 0 ? prob_weight(probs[tree.token[c]]) : 0;
        child_word[c] = philox_draws(p.random.seed, offset, static_cast<uint32_t>(b), c).word[kDrawAccept];
      }
      if (__syncthreads_or(found_child)) {
        ProbSource<kVec> plain;
        plain.p = probs;
        uint64_t remaining = row_weight_total(plain, num_vectors, g, sh, parity);
        if (threadIdx.x == 0) {  // the tries are sequential: each rejection renormalises the next
          int next = -1, count = 0;
          for (int c = node + 1; c < p.nodes && next < 0; ++c) {
            if (tree.parent[c] != node) continue;
            bool seen = false;
            for (int i = 0; i < count; ++i) seen |= excluded[i] == tree.token[c];
            const uint64_t weight = seen ? 0 : child_weight[c];
            if (accept_child(child_word[c], weight, remaining)) {
              next = c;
            } else if (weight > 0) {
              remaining -= weight;
              excluded[count++] = tree.token[c];
            }
          }
          next_child = next;
          num_excluded = count;
        }
        __syncthreads();
        if (next_child >= 0) {
          node = next_child;
          ++depth;
          if (threadIdx.x == 0) tree.path[depth] = node;
          __syncthreads();  // everyone has read next_child before it is rewritten
          continue;
        }
        excluded_count = num_excluded;
      }
    }
    // No child accepted, a leaf, or the depth bound: sample what is left of p here.
    ProbSource<kVec> rest;
    rest.p = probs;
    rest.excluded = excluded;
    rest.num_excluded = excluded_count;
    const uint32_t word = philox_draws(p.random.seed, offset, static_cast<uint32_t>(b), node).word[kDrawSample];
    bool sampled = sample_row(rest, num_vectors, word, p.next_token + b, g, sh, parity);
    if (!sampled && excluded_count > 0) {
      ProbSource<kVec> plain;
      plain.p = probs;
      sampled = sample_row(plain, num_vectors, word, p.next_token + b, g, sh, parity);
    }
    if (!sampled && g.rank == 0 && threadIdx.x == 0) p.next_token[b] = 0;
    break;
  }
  write_tree_path(p, b, tree, depth, g);
  g.sync();
}

// ---- launchers ------------------------------------------------------------------------

struct DeviceInfo {
  int multiprocessors = 0;
  bool clusters = false;
};

DeviceInfo device_info() {
  static DeviceInfo cache[64];  // written once per device; every writer writes the same values
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return DeviceInfo{108, false};
  DeviceInfo& info = cache[device];
  if (info.multiprocessors == 0) {
    int sms = 0, major = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    // Clusters need a Hopper or newer device running code compiled for one: PTX for compute_80,
    // JIT-compiled on an H100, has no cluster barriers (PAGEDLM_VERIFY_NO_CLUSTERS).
    info.clusters = major >= 9 && current_kernel_architecture() >= 90;
    info.multiprocessors = sms > 0 ? sms : 108;
  }
  return info;
}

// CTAs per row: enough for about two CTAs per SM over the whole batch, each CTA keeping at least
// one vector per thread of the row it streams.
int cluster_size_for(int64_t rows, int64_t vectors_per_row) {
  const DeviceInfo info = device_info();
  if (!info.clusters) return 1;
  int size = 1;
  while (size < kMaxCluster && rows * size < 2 * info.multiprocessors && vectors_per_row / (2 * size) >= kThreads) {
    size *= 2;
  }
  return size;
}

template <typename... Params, typename... Args>
int launch(void (*kernel)(Params...), int64_t rows, int cluster_size, size_t shared_bytes, void* stream,
           Args... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows * cluster_size));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attribute[1];
  if (cluster_size > 1) {
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster_size;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  const cudaError_t status = cudaLaunchKernelEx(&config, kernel, args...);
  return static_cast<int>(status != cudaSuccess ? status : cudaGetLastError());
}

size_t tree_shared_bytes(int32_t nodes, bool speculative) {
  const size_t ints = 16 * ((3 * 4 * static_cast<size_t>(nodes) + 15) / 16);  // parent, token, path
  return speculative ? ints + static_cast<size_t>(nodes) * (8 + 4 + 4) : ints;  // + weight, word, excluded
}

}  // namespace

int verify_greedy(const ChainVerifyParams& p, void* stream) {
  if (p.batch == 0) return 0;
  if (p.k > kMaxGreedyDraftTokens || p.vocab < 1) return static_cast<int>(cudaErrorInvalidValue);
  return dispatch_dtype(p.target_dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int kVec = 16 / sizeof(T);
    const size_t shared = 2 * sizeof(uint64_t) * (p.k + 1);
    if (p.vocab % kVec == 0 && aligned16(p.target)) {
      const int cluster = cluster_size_for(p.batch, p.vocab / kVec);
      return launch(verify_greedy_kernel<T, kVec>, p.batch, cluster, shared, stream, p, cluster);
    }
    const int cluster = cluster_size_for(p.batch, p.vocab);
    return launch(verify_greedy_kernel<T, 1>, p.batch, cluster, shared, stream, p, cluster);
  });
}

int verify_speculative(const ChainVerifyParams& p, void* stream) {
  if (p.batch == 0) return 0;
  if (p.vocab < 1 || p.vocab > kMaxSampledVocab) return static_cast<int>(cudaErrorInvalidValue);
  if (p.vocab % 4 == 0 && aligned16(p.target) && (p.draft_probs == nullptr || aligned16(p.draft_probs))) {
    const int cluster = cluster_size_for(p.batch, p.vocab / 4);
    return launch(verify_speculative_kernel<4>, p.batch, cluster, 0, stream, p, cluster);
  }
  const int cluster = cluster_size_for(p.batch, p.vocab);
  return launch(verify_speculative_kernel<1>, p.batch, cluster, 0, stream, p, cluster);
}

int verify_tree_greedy(const TreeVerifyParams& p, void* stream) {
  if (p.batch == 0) return 0;
  if (p.nodes < 1 || p.nodes > kMaxTreeNodes || p.width < 1 || p.vocab < 1) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  return dispatch_dtype(p.target_dtype, [&](auto zero) {
    using T = decltype(zero);
    constexpr int kVec = 16 / sizeof(T);
    const size_t shared = tree_shared_bytes(p.nodes, false);
    if (p.vocab % kVec == 0 && aligned16(p.target)) {
      const int cluster = cluster_size_for(p.batch, p.vocab / kVec);
      return launch(verify_tree_greedy_kernel<T, kVec>, p.batch, cluster, shared, stream, p, cluster);
    }
    const int cluster = cluster_size_for(p.batch, p.vocab);
    return launch(verify_tree_greedy_kernel<T, 1>, p.batch, cluster, shared, stream, p, cluster);
  });
}

int verify_tree_speculative(const TreeVerifyParams& p, void* stream) {
  if (p.batch == 0) return 0;
  if (p.nodes < 1 || p.nodes > kMaxTreeNodes || p.width < 1 || p.vocab < 1 || p.vocab > kMaxSampledVocab) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  const size_t shared = tree_shared_bytes(p.nodes, true);
  if (p.vocab % 4 == 0 && aligned16(p.target)) {
    const int cluster = cluster_size_for(p.batch, p.vocab / 4);
    return launch(verify_tree_speculative_kernel<4>, p.batch, cluster, shared, stream, p, cluster);
  }
  const int cluster = cluster_size_for(p.batch, p.vocab);
  return launch(verify_tree_speculative_kernel<1>, p.batch, cluster, shared, stream, p, cluster);
}

}  // namespace pagedlm::cuda
