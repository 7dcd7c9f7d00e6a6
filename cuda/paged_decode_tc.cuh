// Tensor-core paged decode for f16/bf16 caches (included by paged_decode.cu).
//
// The query heads of one kv head (up to 16; GQA groups are 4-8 in practice) form the 16
// rows of an mma.m16n8k16 A operand, so each K/V row is read from memory once and fed to
// the tensor cores for every head at once. A block of 4 warps streams 64-token tiles
// through shared memory with cp.async (one tile landing while another is computed), their
// 16-byte chunks XOR-swizzled by row so that ldmatrix reads of 8 rows hit 8 different
// banks. Each warp owns 16 tokens of every tile and keeps its own online softmax
// (FlashAttention-2 style: S stays in registers and becomes the A operand of P.V), so warps
// never wait for each other inside a tile; their four partial states are merged once at
// the end.
//
// FP8 caches take the same kernel with half the bytes in flight: the tiles land as bytes, are
// widened (exactly) to the query's type in shared memory, and the MMAs run as for a 16-bit
// cache. k_scale multiplies the scores' scale and v_scale the output.
#pragma once

#include "mma.cuh"
#include "paged_tiles.cuh"

namespace pagedlm::cuda {
namespace tc {

constexpr int kTile = 64;   // tokens per tile
constexpr int kRows = 16;   // query heads per block (mma M)
constexpr int kWarps = 4;

template <typename T, typename KV, int D, int Stages>
struct Smem {
  using C = CacheElem<T, KV>;
  static constexpr int kStageElems = 2 * kTile * D;  // stored elements of one stage (K and V)
  static constexpr int kStageBytes = kStageElems * static_cast<int>(sizeof(typename C::Stored));
  static constexpr int kStages = Stages;
  static constexpr int kWidenedBytes = C::kFp8 ? kStageElems * 2 : 0;  // FP8: the widened tile
  static constexpr int kPipelineBytes = kStages * kStageBytes + kWidenedBytes;
  static constexpr int kMergeBytes = kWarps * kRows * D * 4;  // per-warp outputs, reusing the pipeline
  static constexpr int kBytes = kPipelineBytes > kMergeBytes ? kPipelineBytes : kMergeBytes;
};

template <typename T, typename KV, int D, int Stages, int MinBlocks>
__global__ void __launch_bounds__(kWarps * 32, MinBlocks) paged_decode_tc_kernel(PagedDecodeParams p, SplitInfo split) {
  using C = CacheElem<T, KV>;
  using Stored = typename C::Stored;
  using S = Smem<T, KV, D, Stages>;
  extern __shared__ uint4 smem_raw[];
  Stored* kv_smem = reinterpret_cast<Stored*>(smem_raw);
  T* widened = reinterpret_cast<T*>(reinterpret_cast<unsigned char*>(smem_raw) + S::kStages * S::kStageBytes);
  __shared__ float warp_stats[kWarps][kRows][2];  // running max, sum
  __shared__ int bad_row;
  __shared__ int score_kind[kRows];  // non-finite scores seen, per head row (common.cuh)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int group = p.num_heads / p.num_kv_heads;
  const int chunks_per_kv = (group + kRows - 1) / kRows;
  const int kv_head = blockIdx.y / chunks_per_kv;
  const int first = (blockIdx.y % chunks_per_kv) * kRows;
  const int head0 = kv_head * group + first;
  const int rows_valid = min(kRows, group - first);
  const int b = blockIdx.z, split_id = blockIdx.x;
  const TokenRange range = split_range(p, b, split_id, split.num_splits, kTile);
  const int begin = range.begin, end = range.end;
  const int my_tiles = end > begin ? (end - begin + kTile - 1) / kTile : 0;
  bool flagged = range.bad_len;
  const uint8_t* row_mask = mask_row(p, b, flagged);

  if (tid == 0) bad_row = flagged;
  if (tid < kRows) score_kind[tid] = kScoreFinite;
  __syncthreads();

  float score_scale = p.scale, out_scale = 1.0f;
  if constexpr (C::kFp8) {
    score_scale *= scale_at(p.k_scale, kv_head);
    out_scale = scale_at(p.v_scale, kv_head);
  }

  using Tiles = PagedTiles<Stored, D, kTile, kWarps * 32>;
  using Layout = PagedTiles<T, D, kTile, kWarps * 32>;  // the 16-bit tile that ldmatrix reads
  Tiles tiles(p.key_cache, p.value_cache, p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq,
              p.num_kv_heads, kv_head, p.block_size, p.num_blocks, end);
  auto stage_k = [&](int stage) { return kv_smem + stage * S::kStageElems; };
  for (int s = 0; s < S::kStages - 1; ++s) {
    if (s < my_tiles) {
      tiles.fetch(begin + s * kTile);
      tiles.issue(begin + s * kTile, stage_k(s), stage_k(s) + kTile * D, &bad_row);
    }
    cp_async_commit();
  }
  if (S::kStages - 1 < my_tiles) tiles.fetch(begin + (S::kStages - 1) * kTile);

  // Q as the mma A operand: rows lane/4 and lane/4 + 8, columns (lane%4)*2 (+8) per k-step.
  const int r0 = lane / 4, r1 = r0 + 8, col = (lane % 4) * 2;
  uint32_t q_frag[D / 16][4];
  {
    const T* q = static_cast<const T*>(p.query) + (static_cast<int64_t>(b) * p.num_heads + head0) * D;
    auto q_pair = [&](int row, int c) -> uint32_t {
      return row < rows_valid ? *reinterpret_cast<const uint32_t*>(q + row * D + c) : 0u;
    };
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      q_frag[ks][0] = q_pair(r0, ks * 16 + col);
      q_frag[ks][1] = q_pair(r1, ks * 16 + col);
      q_frag[ks][2] = q_pair(r0, ks * 16 + col + 8);
      q_frag[ks][3] = q_pair(r1, ks * 16 + col + 8);
    }
  }

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // rows r0, r1; sum is lane-partial
  int kind[2] = {kScoreFinite, kScoreFinite};  // non-finite scores seen by this lane, rows r0, r1
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  const int mi = lane / 8, ri = lane % 8;  // ldmatrix: which 8x8 matrix and row this lane addresses

  for (int tile = 0; tile < my_tiles; ++tile) {
    const int stage = tile % S::kStages;
    // One barrier per tile: after it, tile `tile` has landed for every thread and every warp
    // is done with tile - 1, whose stage the copies issued next overwrite.
    cp_async_wait<S::kStages - 2>();
    __syncthreads();
    const int ahead = tile + S::kStages - 1;
    if (ahead < my_tiles) {
      Stored* k_dst = stage_k(ahead % S::kStages);
      tiles.issue(begin + ahead * kTile, k_dst, k_dst + kTile * D, &bad_row);
    }
    cp_async_commit();
    if (ahead + 1 < my_tiles) tiles.fetch(begin + (ahead + 1) * kTile);

    const T* k_tile;
    if constexpr (C::kFp8) {
      C::template widen<D, kTile, kWarps * 32>(kv_smem + stage * S::kStageElems, widened);
      __syncthreads();  // every warp finished the previous tile before the first barrier
      k_tile = widened;
    } else {
      k_tile = kv_smem + stage * S::kStageElems;
    }
    const T* v_tile = k_tile + kTile * D;
    const int rb = warp * 16;  // this warp's tokens in the tile
    // Which of this lane's four tokens the row does not see, read before the MMAs hide the latency.
    const int token0 = begin + tile * kTile + rb + col;
    bool hidden[2][2];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int t = token0 + j * 8 + i;
        hidden[j][i] = t >= end || (row_mask && !row_mask[t]);
      }
    }

    // S = Q K^T for 16 tokens: two n-tiles of 8 tokens.
    // Even and odd k-steps accumulate separately: two independent mma chains per n-tile.
    float s[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}}, s_odd[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t kf[4];  // matrices: (tokens 0-7, k lo), (0-7, k hi), (8-15, k lo), (8-15, k hi)
      ldmatrix_x4(kf, k_tile + Layout::offset(rb + (mi / 2) * 8 + ri, ks * 2 + (mi % 2)));
      float (&acc)[2][4] = ks % 2 ? s_odd : s;
      mma_16816<T>(acc[0], q_frag[ks], kf[0], kf[1]);
      mma_16816<T>(acc[1], q_frag[ks], kf[2], kf[3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] += s_odd[j][e];
    }

    // Online softmax on rows r0 (elements 0, 1) and r1 (elements 2, 3) of each n-tile.
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[j][e] * score_scale;
        if (p.soft_cap > 0.0f) v = p.soft_cap * tanhf(v / p.soft_cap);
        v = hidden[j][e & 1] ? -INFINITY : v;
        s[j][e] = v;
        tile_max[e >> 1] = fmax_nan(tile_max[e >> 1], v);
      }
    }
    float rescale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      kind[h] = max(kind[h], nonfinite_kind(tile_max[h]));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float new_max = fmaxf(row_max[h], tile_max[h]);
      rescale[h] = new_max == -INFINITY ? 1.0f : exp2_ftz((row_max[h] - new_max) * kLog2e);
      row_max[h] = new_max;
      row_sum[h] *= rescale[h];
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float m = row_max[e >> 1];
        s[j][e] = m == -INFINITY ? 0.0f : exp2_ftz((s[j][e] - m) * kLog2e);
        row_sum[e >> 1] += s[j][e];
      }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= rescale[0], o[n][1] *= rescale[0];
      o[n][2] *= rescale[1], o[n][3] *= rescale[1];
    }

    // O += P V: P (16 x 16 tokens) is S re-packed as an A operand; V via transposed ldmatrix.
    const uint32_t p_frag[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                                pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t vf[4];  // matrices: (tokens 0-7, d lo), (8-15, d lo), (0-7, d hi), (8-15, d hi)
      ldmatrix_x4_trans(vf, v_tile + Layout::offset(rb + (mi % 2) * 8 + ri, np * 2 + mi / 2));
      mma_16816<T>(o[2 * np], p_frag, vf[0], vf[1]);
      mma_16816<T>(o[2 * np + 1], p_frag, vf[2], vf[3]);
    }
  }
  cp_async_wait<0>();

  // Merge the four warps' partial states: through shared memory, reusing the pipeline.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
  __syncthreads();
  float* warp_out = reinterpret_cast<float*>(smem_raw);  // [kWarps][kRows][D]
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {  // rows past rows_valid are padding: not stored
    float* base = warp_out + (warp * kRows) * D + n * 8 + col;
    if (r0 < rows_valid) base[r0 * D] = o[n][0], base[r0 * D + 1] = o[n][1];
    if (r1 < rows_valid) base[r1 * D] = o[n][2], base[r1 * D + 1] = o[n][3];
  }
  if (lane % 4 == 0) {
    warp_stats[warp][r0][0] = row_max[0], warp_stats[warp][r0][1] = row_sum[0];
    warp_stats[warp][r1][0] = row_max[1], warp_stats[warp][r1][1] = row_sum[1];
  }
  if (kind[0] != kScoreFinite) atomicMax(&score_kind[r0], kind[0]);
  if (kind[1] != kScoreFinite) atomicMax(&score_kind[r1], kind[1]);
  __syncthreads();

  const bool bad = bad_row != 0;
  for (int item = tid; item < rows_valid * D; item += kWarps * 32) {
    const int row = item / D, d = item % D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_stats[w][row][0]);
    float total = 0.0f, value = 0.0f;
    if (m != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float weight = exp2_ftz((warp_stats[w][row][0] - m) * kLog2e);  // 0 for a warp that saw nothing
        total += weight * warp_stats[w][row][1];
        value += weight * warp_out[(w * kRows + row) * D + d];
      }
    }
    const int row_kind = bad ? kScoreNaN : score_kind[row];
    const float result = flagged_out(row_kind, total > 0.0f ? value / total * out_scale : 0.0f);
    const float lse = flagged_lse(row_kind, total > 0.0f ? m + logf(total) : -INFINITY);
    const int64_t row_index = static_cast<int64_t>(b) * p.num_heads + head0 + row;
    if (split.num_splits == 1) {
      static_cast<T*>(p.out)[row_index * D + d] = from_float<T>(result);
      if (p.lse && d == 0) p.lse[row_index] = lse;
    } else {
      split.partial_out[(row_index * split.num_splits + split_id) * D + d] = result;
      if (d == 0) split.partial_lse[row_index * split.num_splits + split_id] = lse;
    }
  }
}

}  // namespace tc
}  // namespace pagedlm::cuda
