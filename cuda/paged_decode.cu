// CUDA paged-attention decode (flash-decoding), the GPU twin of cpp/src/paged_decode.cpp.
// f16/bf16 queries take the tensor-core kernel of paged_decode_tc.cuh, over 16-bit or FP8
// caches; f32 the CUDA-core kernel below (FP8 caches under f32 queries: paged_fp8.cu).
//
// CUDA-core kernel: a thread block owns one (sequence, kv head, group of up to 8 query heads, split of the
// sequence): it reads each K/V row of its range once for all its query heads (GQA). Rows
// stream through shared memory in tiles of 32 tokens with cp.async, kPipeline tiles in
// flight, their 16-byte chunks XOR-swizzled so that lanes reading different rows hit
// different banks. Each lane keeps a quarter of q in registers; four lanes share a dot
// product. Scores use an online softmax; with more than one split per sequence
// each block writes a partial (output, log-sum-exp) to the caller's workspace and a merge
// kernel combines them. Splits are chosen on the host from the grid size alone (no
// synchronisation), and each block derives its token range from the sequence's real length.
//
// Bad values never fault: an out-of-range block id or length turns the row into NaN. A NaN or +inf
// among a row's visible scores turns it into NaN as well, with lse NaN or +inf (common.cuh).
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "device_query.h"
#include "launchers.h"
#include "mma.cuh"
#include "paged_fp8.h"

namespace pagedlm::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 32;  // tokens per tile

struct SplitInfo {
  int num_splits;
  float* partial_out;  // [batch, num_heads, num_splits, head_dim]
  float* partial_lse;  // [batch, num_heads, num_splits]
};

template <typename T, int D>
struct Layout {
  static constexpr int kVec = 16 / sizeof(T);          // elements per 16-byte chunk
  static constexpr int kChunks = D / kVec;              // chunks per row (>= 8 for every D, T here)
  static constexpr int kStageBytes = 2 * kTile * D * sizeof(T);
  static constexpr int kPipeline = kStageBytes <= 32768 ? 3 : 2;
  // Chunk c of row r lives at position c ^ (4 if r is odd). In the score loop a phase of 8
  // lanes reads chunks {q, q+4, ...} (q = 0..3) of two adjacent rows: the XOR sends the two
  // rows to opposite halves of the 128-byte bank line, so the 8 reads hit 8 distinct banks.
  __device__ static int offset(int row, int chunk) { return row * D + ((chunk ^ ((row & 1) << 2)) * kVec); }
};

// Loads N contiguous elements (N * sizeof(T) a power of two <= 16, suitably aligned) in one access.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* src, float (&dst)[N]) {
  constexpr int kBytes = N * sizeof(T);
  using Raw = typename std::conditional<kBytes == 16, uint4, typename std::conditional<kBytes == 8, uint2,
              typename std::conditional<kBytes == 4, uint32_t, uint16_t>::type>::type>::type;
  const Raw raw = *reinterpret_cast<const Raw*>(src);
  const T* elems = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < N; ++i) dst[i] = to_float(elems[i]);
}

// The tokens one split of one sequence attends to: [start, len) cut into num_splits runs of
// whole tiles (trailing splits may be empty). A length outside the block table's capacity
// is flagged, never read through.
struct TokenRange {
  int begin, end;
  bool bad_len;
};

__device__ __forceinline__ TokenRange split_range(const PagedDecodeParams& p, int b, int split_id, int num_splits,
                                                  int tile) {
  const int len = p.seq_lens[b];
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  const bool bad_len = len < 0 || len > capacity;
  const int start = bad_len ? 0 : (p.sliding_window > 0 ? max(0, len - p.sliding_window) : 0);
  const int span = bad_len ? 0 : len - start;
  const int tiles = (span + tile - 1) / tile;
  const int tiles_per_split = (tiles + num_splits - 1) / num_splits;
  const int begin = start + split_id * tiles_per_split * tile;
  return {begin, min(start + span, begin + tiles_per_split * tile), bad_len};
}

// Row b's custom mask, or null without one. A mask row not inside the mask's bytes flags the row
// (its output turns into NaN) and is not read.
__device__ __forceinline__ const uint8_t* mask_row(const PagedDecodeParams& p, int b, bool& bad) {
  if (p.mask == nullptr) return nullptr;
  const int64_t start = p.mask_offsets[b];
  bad = bad || start < 0 || start > p.mask_size - max(p.seq_lens[b], 0);  // start + len could pass 2^63
  return bad ? nullptr : p.mask + start;
}

// GT: query heads per block (1, 2, 4 or 8).
template <typename T, int D, int GT>
__global__ void __launch_bounds__(kThreads) paged_decode_kernel(PagedDecodeParams p, SplitInfo split) {
  using L = Layout<T, D>;
  // Scores: 4 lanes share a dot product, each holding a quarter of q in registers; a warp
  // covers 8 tokens at a time (lane = 4 * slot + quarter) and loops over the rest.
  constexpr int kWarpsPerHead = GT >= 4 ? 1 : 4 / GT;
  constexpr int kHeadsPerWarp = GT > 4 ? GT / 4 : 1;
  constexpr int kRowsPerSlot = kTile / kWarpsPerHead / 8;
  constexpr int kQuarterChunks = L::kChunks / 4;
  constexpr int kThreadsPerHead = kThreads / GT;                     // for the P.V product
  constexpr int kOutPerThread = D / kThreadsPerHead > 0 ? D / kThreadsPerHead : 1;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* kv_smem = reinterpret_cast<T*>(smem_raw);                       // [kPipeline][2][kTile][D]
  float* p_smem = reinterpret_cast<float*>(smem_raw + L::kPipeline * L::kStageBytes);  // [GT][kTile]
  float* rescale_smem = p_smem + GT * kTile;                         // [GT]
  float* sum_smem = rescale_smem + GT;                               // [GT]
  float* max_smem = sum_smem + GT;                                   // [GT]
  __shared__ int bad_row;
  __shared__ int score_kind[GT];  // non-finite scores seen, per head (common.cuh)

  const int split_id = blockIdx.x;
  const int heads_per_kv = p.num_heads / p.num_kv_heads;
  const int kv_head = blockIdx.y / (heads_per_kv / GT);
  const int head0 = kv_head * heads_per_kv + (blockIdx.y % (heads_per_kv / GT)) * GT;
  const int b = blockIdx.z;
  const int tid = threadIdx.x;

  const TokenRange range = split_range(p, b, split_id, split.num_splits, kTile);
  const int begin = range.begin, end = range.end;
  const int my_tiles = end > begin ? (end - begin + kTile - 1) / kTile : 0;
  bool flagged = range.bad_len;
  const uint8_t* row_mask = mask_row(p, b, flagged);

  if (tid == 0) bad_row = flagged;
  if (tid < GT) score_kind[tid] = kScoreFinite;
  __syncthreads();  // before any load can flag a bad block id

  const int warp = tid / 32, lane = tid % 32;
  const int slot = lane / 4, quarter = lane % 4;
  float q[kHeadsPerWarp][kQuarterChunks][L::kVec];  // this lane's quarter of q, scaled
#pragma unroll
  for (int h = 0; h < kHeadsPerWarp; ++h) {
    const int g = GT >= 4 ? warp + 4 * h : warp / kWarpsPerHead;
    const T* q_row = static_cast<const T*>(p.query) + (static_cast<int64_t>(b) * p.num_heads + head0 + g) * D;
#pragma unroll
    for (int i = 0; i < kQuarterChunks; ++i) {
      load_vec<T, L::kVec>(q_row + (quarter + 4 * i) * L::kVec, q[h][i]);
#pragma unroll
      for (int e = 0; e < L::kVec; ++e) q[h][i][e] *= p.scale;
    }
  }

  const int32_t* table = p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq;
  const int64_t row_stride = static_cast<int64_t>(p.num_kv_heads) * D;  // elements between tokens

  // Issue the cp.async copies of tile `tile` into pipeline stage `stage`.
  auto load_tile = [&](int tile, int stage) {
    T* k_dst = kv_smem + stage * 2 * kTile * D;
    T* v_dst = k_dst + kTile * D;
    for (int i = tid; i < kTile * L::kChunks; i += kThreads) {
      const int row = i / L::kChunks, chunk = i % L::kChunks;
      const int t = begin + tile * kTile + row;
      if (t >= end) continue;
      const int32_t block = table[t / p.block_size];
      if (block < 0 || block >= p.num_blocks) {
        bad_row = 1;
        continue;
      }
      const int64_t elem = (static_cast<int64_t>(block) * p.block_size + t % p.block_size) * row_stride +
                           static_cast<int64_t>(kv_head) * D + chunk * L::kVec;
      cp_async_16(k_dst + L::offset(row, chunk), static_cast<const T*>(p.key_cache) + elem);
      cp_async_16(v_dst + L::offset(row, chunk), static_cast<const T*>(p.value_cache) + elem);
    }
  };

  for (int s = 0; s < L::kPipeline - 1; ++s) {
    if (s < my_tiles) load_tile(s, s);
    cp_async_commit();
  }

  // Running softmax state, kept by the warp that owns each head (warp w owns heads w, w+4).
  float run_max[(GT + 3) / 4], run_sum[(GT + 3) / 4];
  for (int i = 0; i < (GT + 3) / 4; ++i) run_max[i] = -INFINITY, run_sum[i] = 0.0f;
  float acc[kOutPerThread];
  for (int i = 0; i < kOutPerThread; ++i) acc[i] = 0.0f;
  const int pv_head = tid / kThreadsPerHead;
  const int pv_d0 = (tid % kThreadsPerHead) * kOutPerThread;
  const bool pv_active = pv_d0 < D;

  for (int tile = 0; tile < my_tiles; ++tile) {
    const int stage = tile % L::kPipeline;
    if (tile + L::kPipeline - 1 < my_tiles) load_tile(tile + L::kPipeline - 1, (tile + L::kPipeline - 1) % L::kPipeline);
    cp_async_commit();
    cp_async_wait<L::kPipeline - 1>();
    __syncthreads();

    const T* k_tile = kv_smem + stage * 2 * kTile * D;
    const T* v_tile = k_tile + kTile * D;
    const int tile_begin = begin + tile * kTile;

    // Scores of this warp's heads for its rows of the tile.
#pragma unroll
    for (int h = 0; h < kHeadsPerWarp; ++h) {
      const int g = GT >= 4 ? warp + 4 * h : warp / kWarpsPerHead;
      const int row0 = (GT >= 4 ? 0 : (warp % kWarpsPerHead) * (kTile / kWarpsPerHead)) + slot;
#pragma unroll
      for (int j = 0; j < kRowsPerSlot; ++j) {
        const int row = row0 + 8 * j;
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < kQuarterChunks; ++i) {
          float k[L::kVec];
          load_vec<T, L::kVec>(k_tile + L::offset(row, quarter + 4 * i), k);
#pragma unroll
          for (int e = 0; e < L::kVec; ++e) s += q[h][i][e] * k[e];
        }
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (p.soft_cap > 0.0f) s = p.soft_cap * tanhf(s / p.soft_cap);
        if (tile_begin + row >= end || (row_mask && !row_mask[tile_begin + row])) {
          s = -INFINITY;
        } else if (nonfinite_kind(s) != kScoreFinite) {
          if (quarter == 0) atomicMax(&score_kind[g], nonfinite_kind(s));
          s = -INFINITY;
        }
        if (quarter == 0) p_smem[g * kTile + row] = s;
      }
    }
    __syncthreads();

    // Online softmax: warp w folds the tile into the state of heads w, w+4, ...
    for (int i = 0, g = warp; g < GT; ++i, g += kThreads / 32) {
      const float s = p_smem[g * kTile + lane];
      const float new_max = fmaxf(run_max[i], warp_max(s));
      const float rescale = new_max == -INFINITY ? 1.0f : exp2_ftz((run_max[i] - new_max) * kLog2e);
      const float prob = new_max == -INFINITY ? 0.0f : exp2_ftz((s - new_max) * kLog2e);
      run_sum[i] = run_sum[i] * rescale + warp_sum(prob);
      run_max[i] = new_max;
      p_smem[g * kTile + lane] = prob;
      if (lane == 0) rescale_smem[g] = rescale;
    }
    __syncthreads();

    if (pv_active) {
      const float rescale = rescale_smem[pv_head];
#pragma unroll
      for (int i = 0; i < kOutPerThread; ++i) acc[i] *= rescale;
      // Rows past the range hold stale data: skip them rather than multiply it by zero.
      const int rows = min(kTile, end - tile_begin);
      constexpr int kPiece = kOutPerThread < L::kVec ? kOutPerThread : L::kVec;  // elements within one chunk
      for (int row4 = 0; row4 < rows; row4 += 4) {
        const float4 probs = *reinterpret_cast<const float4*>(p_smem + pv_head * kTile + row4);
        const float prob4[4] = {probs.x, probs.y, probs.z, probs.w};
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          if (row4 + r >= rows) break;
#pragma unroll
          for (int piece = 0; piece < kOutPerThread / kPiece; ++piece) {
            const int d = pv_d0 + piece * kPiece;
            float v[kPiece];
            load_vec<T, kPiece>(v_tile + L::offset(row4 + r, d / L::kVec) + d % L::kVec, v);
#pragma unroll
            for (int i = 0; i < kPiece; ++i) acc[piece * kPiece + i] += prob4[r] * v[i];
          }
        }
      }
    }
    __syncthreads();  // the stage is overwritten by the next iteration's prefetch
  }
  cp_async_wait<0>();

  for (int i = 0, g = warp; g < GT; ++i, g += kThreads / 32) {
    if (lane == 0) sum_smem[g] = run_sum[i], max_smem[g] = run_max[i];
  }
  __syncthreads();
  if (!pv_active) return;

  const int kind = bad_row != 0 ? kScoreNaN : score_kind[pv_head];
  const int head = head0 + pv_head;
  const float total = sum_smem[pv_head];
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;  // an empty range yields zeros
  const float lse = flagged_lse(kind, total > 0.0f ? max_smem[pv_head] + logf(total) : -INFINITY);
  const int64_t row_index = static_cast<int64_t>(b) * p.num_heads + head;
  if (split.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + row_index * D + pv_d0;
#pragma unroll
    for (int i = 0; i < kOutPerThread; ++i) out[i] = from_float<T>(flagged_out(kind, acc[i] * inv));
    if (p.lse && pv_d0 == 0) p.lse[row_index] = lse;
  } else {
    float* out = split.partial_out + (row_index * split.num_splits + split_id) * D + pv_d0;
#pragma unroll
    for (int i = 0; i < kOutPerThread; ++i) out[i] = flagged_out(kind, acc[i] * inv);
    if (pv_d0 == 0) split.partial_lse[row_index * split.num_splits + split_id] = lse;
  }
}

}  // namespace
}  // namespace pagedlm::cuda

#include "paged_decode_tc.cuh"

namespace pagedlm::cuda {
namespace {

// Combines the splits of one (sequence, head): weights exp(lse_s - max lse). One thread per
// split computes its weight (splits <= 128 = blockDim), then each thread sums one column. A
// split with lse NaN (a bad value or NaN score) or +inf (an infinite score) decides the row.
template <typename T>
__global__ void __launch_bounds__(128) merge_splits_kernel(PagedDecodeParams p, SplitInfo split) {
  __shared__ float weight[128];
  __shared__ float warp_max_lse[4], warp_total[4];
  __shared__ int any_bad, any_inf;
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const float lse = tid < split.num_splits ? split.partial_lse[row * split.num_splits + tid] : -INFINITY;
  if (tid == 0) any_bad = 0, any_inf = 0;
  __syncthreads();
  if (isnan(lse)) any_bad = 1;
  if (lse == INFINITY) any_inf = 1;
  const float local_max = warp_max(isnan(lse) || lse == INFINITY ? -INFINITY : lse);
  if (lane == 0) warp_max_lse[warp] = local_max;
  __syncthreads();
  const float max_lse = fmaxf(fmaxf(warp_max_lse[0], warp_max_lse[1]), fmaxf(warp_max_lse[2], warp_max_lse[3]));
  const float w = max_lse == -INFINITY || isnan(lse) || lse == INFINITY ? 0.0f : exp2_ftz((lse - max_lse) * kLog2e);
  weight[tid] = w;
  const float local_total = warp_sum(w);
  if (lane == 0) warp_total[warp] = local_total;
  __syncthreads();
  const float total = warp_total[0] + warp_total[1] + warp_total[2] + warp_total[3];
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const int kind = any_bad ? kScoreNaN : any_inf ? kScoreInf : kScoreFinite;
  const float* partial = split.partial_out + row * split.num_splits * p.head_dim;
  for (int d = tid; d < p.head_dim; d += blockDim.x) {
    float value = 0.0f;
#pragma unroll 8
    for (int s = 0; s < split.num_splits; ++s) value += weight[s] * partial[s * p.head_dim + d];
    static_cast<T*>(p.out)[row * p.head_dim + d] = from_float<T>(flagged_out(kind, value * inv));
  }
  if (p.lse && tid == 0) p.lse[row] = flagged_lse(kind, total > 0.0f ? max_lse + logf(total) : -INFINITY);
}

// Splits per sequence: as many as fill the resident block slots of the GPU in one wave
// (never more than one wave's worth, which would leave a ragged tail), with at least
// kMinSplitTokens of table capacity per split. The real lengths are on the device; each block
// trims its range to them. Below ~1024 tokens a split saves less than the merge kernel costs.
constexpr int64_t kMinSplitTokens = 1024;
template <typename Kernel>
SplitInfo choose_splits(Kernel kernel, int threads, int smem, int64_t blocks_per_split, const PagedDecodeParams& p,
                        const DecodeWorkspace& ws) {
  int per_sm = 1;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  const int64_t slots = static_cast<int64_t>(std::max(per_sm, 1)) * current_multiprocessors();
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(128, (capacity + kMinSplitTokens - 1) / kMinSplitTokens));
  const int64_t work = std::max<int64_t>(blocks_per_split, 1);
  // The fewest splits whose blocks fill their last wave at least 90% (a ragged last wave
  // leaves SMs idle while it runs); failing that, the best-filled count.
  int64_t splits = 1;
  double best_fill = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const double waves = static_cast<double>(work * s) / slots;
    const double fill = waves / std::ceil(waves);
    if (fill > best_fill + 1e-9) best_fill = fill, splits = s;
    if (fill >= 0.9) break;
  }
  const int64_t rows = static_cast<int64_t>(p.batch) * p.num_heads;
  // The workspace bounds the splits: [rows, splits, D] outputs + [rows, splits] lse, f32.
  while (splits > 1 && static_cast<size_t>(rows * splits * (p.head_dim + 1)) * sizeof(float) > ws.bytes) --splits;
  SplitInfo split{static_cast<int>(splits), nullptr, nullptr};
  if (splits > 1) {
    split.partial_out = static_cast<float*>(ws.data);
    split.partial_lse = split.partial_out + rows * splits * p.head_dim;
  }
  return split;
}

template <typename T, typename Kernel>
int launch_with_splits(Kernel kernel, int threads, int smem, int head_groups, const PagedDecodeParams& p,
                       const DecodeWorkspace& ws, cudaStream_t stream) {
  // Per device, and cheap; not a stream operation, so it is allowed during graph capture.
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const SplitInfo split = choose_splits(kernel, threads, smem, static_cast<int64_t>(head_groups) * p.batch, p, ws);
  kernel<<<dim3(split.num_splits, head_groups, p.batch), threads, smem, stream>>>(p, split);
  if (split.num_splits > 1) {
    const unsigned rows = static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.num_heads);
    merge_splits_kernel<T><<<rows, 128, 0, stream>>>(p, split);
  }
  return static_cast<int>(cudaGetLastError());
}

// f32 (and any dtype without tensor cores here): the CUDA-core kernel.
template <typename T, int D, int GT>
int launch_simt(const PagedDecodeParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  using L = Layout<T, D>;
  const int head_groups = p.num_kv_heads * (p.num_heads / p.num_kv_heads / GT);
  const int smem = L::kPipeline * L::kStageBytes + (GT * kTile + 3 * GT) * sizeof(float);
  return launch_with_splits<T>(paged_decode_kernel<T, D, GT>, kThreads, smem, head_groups, p, ws, stream);
}

// KV: the caches' element, T or Fp8<format> (tensor cores), or float (CUDA cores).
template <typename T, typename KV, int D>
int launch_heads(const PagedDecodeParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  if constexpr (!std::is_same<T, float>::value) {
    const int group = p.num_heads / p.num_kv_heads;
    const int head_groups = p.num_kv_heads * ((group + tc::kRows - 1) / tc::kRows);
    // Two pipeline stages with registers capped for three blocks per SM: more resident blocks
    // hide the copies better than a third stage does. D = 256 needs the registers.
    constexpr int kMinBlocks = D <= 128 ? 3 : 1;
    return launch_with_splits<T>(tc::paged_decode_tc_kernel<T, KV, D, 2, kMinBlocks>, tc::kWarps * 32,
                                 tc::Smem<T, KV, D, 2>::kBytes, head_groups, p, ws, stream);
  } else {
    const int group = p.num_heads / p.num_kv_heads;
    // Eight heads per block keep 2 x D/4 q values per lane in registers: only for D <= 128.
    if constexpr (D <= 128) {
      if (group % 8 == 0) return launch_simt<T, D, 8>(p, ws, stream);
    }
    if (group % 4 == 0) return launch_simt<T, D, 4>(p, ws, stream);
    if (group % 2 == 0) return launch_simt<T, D, 2>(p, ws, stream);
    return launch_simt<T, D, 1>(p, ws, stream);
  }
}

template <typename T, typename KV>
int launch_head_dim(const PagedDecodeParams& p, const DecodeWorkspace& ws, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch_heads<T, KV, 64>(p, ws, stream);
    case 128: return launch_heads<T, KV, 128>(p, ws, stream);
    case 256: return launch_heads<T, KV, 256>(p, ws, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int paged_decode(const PagedDecodeParams& p, const DecodeWorkspace& ws, void* stream_ptr) {
  if (p.batch == 0) return 0;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (is_fp8(p.kv_dtype) && p.dtype == DType::f32) return paged_decode_fp8(p, stream);  // CUDA cores
  return dispatch_dtype(p.dtype, [&](auto type) {
    using T = decltype(type);
    if constexpr (!std::is_same<T, float>::value) {
      if (p.kv_dtype == DType::e4m3) return launch_head_dim<T, Fp8<__NV_E4M3>>(p, ws, stream);
      if (p.kv_dtype == DType::e5m2) return launch_head_dim<T, Fp8<__NV_E5M2>>(p, ws, stream);
    }
    return launch_head_dim<T, T>(p, ws, stream);
  });
}

}  // namespace pagedlm::cuda
