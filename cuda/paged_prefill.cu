// CUDA paged-attention prefill for f16/bf16 caches (f32: paged_prefill_f32.cu): FlashAttention-2 on mma.m16n8k16 over
// the paged KV cache; the GPU twin of cpp/src/paged_prefill.cpp.
//
// A block of 4 warps owns 64 consecutive queries of one sequence and one query head; each
// warp owns 16 of them as the rows of its mma A operand and keeps their online softmax in
// registers (S becomes the A operand of P.V without leaving registers). K/V tiles stream
// through shared memory with cp.async, two tiles landing while one is computed (PagedTiles).
// The grid is sized from total_q on the host; each block finds its (sequence, query tile)
// by walking cu_seqlens_q on the device, so nothing is synchronised and the launch is
// graph-capturable. Bad values never fault: a bad block id, length or cu_seqlens_q turns
// the affected rows into NaN.
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"
#include "mma.cuh"
#include "paged_prefill_f32.h"
#include "paged_tiles.cuh"
#include "prefill_mask.cuh"

namespace pagedlm::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kQueryTile = 16 * kWarps;

template <int D>
struct PrefillShape {
  static constexpr int kKvTile = D <= 128 ? 64 : 32;  // tokens per K/V tile (register budget at D = 256)
  static constexpr int kStageElems = 2 * kKvTile * D;
  static constexpr int kStages = 3;                        // two tiles land while one is computed
  static constexpr int kSmemBytes = kStages * kStageElems * 2;  // 2-byte elements
};

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) paged_prefill_kernel(PagedPrefillParams p) {
  using Shape = PrefillShape<D>;
  constexpr int kKvTile = Shape::kKvTile;
  constexpr int kNTiles = kKvTile / 8;  // score columns per warp, in mma n-tiles
  using Tiles = PagedTiles<T, D, kKvTile, kWarps * 32>;
  extern __shared__ uint4 smem_raw[];
  T* kv_smem = reinterpret_cast<T*>(smem_raw);
  __shared__ int bad_row;

  // Which (sequence, query tile) is this block's?
  int b = 0, tile = blockIdx.x;
  for (; b < p.batch; ++b) {
    const int q_len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    const int tiles = q_len > 0 ? (q_len + kQueryTile - 1) / kQueryTile : 0;
    if (tile < tiles) break;
    tile -= tiles;
  }
  if (b == p.batch) return;  // the grid is an upper bound on the tiles

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int head = blockIdx.y, kv_head = head / (p.num_heads / p.num_kv_heads);
  const int q_begin = p.cu_seqlens_q[b], q_len = p.cu_seqlens_q[b + 1] - q_begin;
  const int len = p.seq_lens[b];
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  const bool bad_len = len < 0 || len > capacity || q_len > len || q_begin < 0 || q_begin + q_len > p.total_q;
  const int q0 = tile * kQueryTile;                        // first query of the block, within the sequence
  const int pos0 = len - q_len + q0;                       // its absolute position
  const int last_pos = pos0 + min(kQueryTile, q_len - q0) - 1;
  const bool causal = p.causal && !p.mask;
  const int kv_lo = bad_len ? 0 : (p.sliding_window > 0 ? max(0, pos0 - p.sliding_window + 1) : 0);
  const int kv_end = bad_len ? 0 : (causal ? last_pos + 1 : len);
  const int kv_tiles = kv_end > kv_lo ? (kv_end - kv_lo + kKvTile - 1) / kKvTile : 0;

  if (tid == 0) bad_row = bad_len;
  __syncthreads();

  Tiles tiles(p.key_cache, p.value_cache, p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq,
              p.num_kv_heads, kv_head, p.block_size, p.num_blocks, kv_end);
  auto stage_k = [&](int stage) { return kv_smem + stage * Shape::kStageElems; };
  constexpr int kStages = Shape::kStages;
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < kv_tiles) {
      tiles.fetch(kv_lo + s * kKvTile);
      tiles.issue(kv_lo + s * kKvTile, stage_k(s), stage_k(s) + kKvTile * D, &bad_row);
    }
    cp_async_commit();
  }
  if (kStages - 1 < kv_tiles) tiles.fetch(kv_lo + (kStages - 1) * kKvTile);

  // This warp's 16 query rows: r0 = lane / 4 and r1 = r0 + 8.
  const int r0 = lane / 4, col = (lane % 4) * 2;
  const int row_q[2] = {q0 + warp * 16 + r0, q0 + warp * 16 + r0 + 8};  // within the sequence
  uint32_t q_frag[D / 16][4];
  {
    auto q_pair = [&](int qi, int c) -> uint32_t {
      if (bad_len || qi >= q_len) return 0u;
      const T* row = static_cast<const T*>(p.query) + (static_cast<int64_t>(q_begin + qi) * p.num_heads + head) * D;
      return *reinterpret_cast<const uint32_t*>(row + c);
    };
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      q_frag[ks][0] = q_pair(row_q[0], ks * 16 + col);
      q_frag[ks][1] = q_pair(row_q[1], ks * 16 + col);
      q_frag[ks][2] = q_pair(row_q[0], ks * 16 + col + 8);
      q_frag[ks][3] = q_pair(row_q[1], ks * 16 + col + 8);
    }
  }
  const PrefillRow rows[2] = {prefill_row(p, row_q[0], len, q_len), prefill_row(p, row_q[1], len, q_len)};
  auto visible = [&](int h, int t) { return prefill_visible(p, b, len, q_len, causal, rows[h], t, kv_end, &bad_row); };

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // sum is lane-partial
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  const int mi = lane / 8, ri = lane % 8;

  for (int kt = 0; kt < kv_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt landed everywhere; everyone is done with tile kt - 1's stage
    const int ahead = kt + kStages - 1;
    if (ahead < kv_tiles) {
      T* k_dst = stage_k(ahead % kStages);
      tiles.issue(kv_lo + ahead * kKvTile, k_dst, k_dst + kKvTile * D, &bad_row);
    }
    cp_async_commit();
    if (ahead + 1 < kv_tiles) tiles.fetch(kv_lo + (ahead + 1) * kKvTile);

    const T* k_tile = stage_k(kt % kStages);
    const T* v_tile = k_tile + kKvTile * D;
    const int t0 = kv_lo + kt * kKvTile;

    float s[kNTiles][4];
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t kf[4];  // (tokens 0-7, k lo), (0-7, k hi), (8-15, k lo), (8-15, k hi) of this pair
        ldmatrix_x4(kf, k_tile + Tiles::offset(np * 16 + (mi / 2) * 8 + ri, ks * 2 + (mi % 2)));
        mma_16816<T>(s[2 * np], q_frag[ks], kf[0], kf[1]);
        mma_16816<T>(s[2 * np + 1], q_frag[ks], kf[2], kf[3]);
      }
    }

    // Only tiles on the causal diagonal, at the window's edge, past the sequence's end or under a
    // custom mask hide any (row, key) pair of a real row; the others skip the per-element test.
    const bool tile_masked = p.mask != nullptr || t0 + kKvTile > kv_end || (causal && t0 + kKvTile - 1 > pos0) ||
                             (p.sliding_window > 0 && t0 < last_pos - p.sliding_window + 1);
    float tile_max[2] = {-INFINITY, -INFINITY};
    auto finish_scores = [&](auto masked) {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1, t = t0 + j * 8 + col + (e & 1);
          float v = s[j][e] * p.scale;
          if (p.soft_cap > 0.0f) v = p.soft_cap * tanhf(v / p.soft_cap);
          if (decltype(masked)::value && !visible(h, t)) v = -INFINITY;
          s[j][e] = v;
          tile_max[h] = fmaxf(tile_max[h], v);
        }
      }
    };
    if (tile_masked) {
      finish_scores(std::true_type{});
    } else {
      finish_scores(std::false_type{});
    }
    float rescale[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      const float new_max = fmaxf(row_max[h], tile_max[h]);
      rescale[h] = new_max == -INFINITY ? 1.0f : exp2f((row_max[h] - new_max) * kLog2e);
      row_max[h] = new_max;
      row_sum[h] *= rescale[h];
    }
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float m = row_max[e >> 1];
        s[j][e] = m == -INFINITY ? 0.0f : exp2f((s[j][e] - m) * kLog2e);
        row_sum[e >> 1] += s[j][e];
      }
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= rescale[0], o[n][1] *= rescale[0];
      o[n][2] *= rescale[1], o[n][3] *= rescale[1];
    }

    // O += P V, 16 tokens (two n-tiles of S) per k-step.
#pragma unroll
    for (int kk = 0; kk < kNTiles / 2; ++kk) {
      const uint32_t p_frag[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                  pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t vf[4];  // (tokens 0-7, d lo), (8-15, d lo), (0-7, d hi), (8-15, d hi)
        ldmatrix_x4_trans(vf, v_tile + Tiles::offset(kk * 16 + (mi % 2) * 8 + ri, np * 2 + mi / 2));
        mma_16816<T>(o[2 * np], p_frag, vf[0], vf[1]);
        mma_16816<T>(o[2 * np + 1], p_frag, vf[2], vf[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // bad_row is final

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
  // With cu_seqlens_q itself out of range there is no row that is certainly ours to write.
  const bool rows_known = q_begin >= 0 && q_len >= 0 && q_begin + q_len <= p.total_q;
  const bool bad = bad_row != 0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (!rows_known || row_q[h] >= q_len) continue;
    const int64_t out_row = (static_cast<int64_t>(q_begin + row_q[h]) * p.num_heads + head);
    const float inv = row_sum[h] > 0.0f ? 1.0f / row_sum[h] : 0.0f;  // a row that sees nothing yields zeros
    T* out = static_cast<T*>(p.out) + out_row * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      out[n * 8 + col] = from_float<T>(bad ? NAN : o[n][2 * h] * inv);
      out[n * 8 + col + 1] = from_float<T>(bad ? NAN : o[n][2 * h + 1] * inv);
    }
    if (p.lse && lane % 4 == 0) {
      p.lse[out_row] = bad ? NAN : (row_sum[h] > 0.0f ? row_max[h] + logf(row_sum[h]) : -INFINITY);
    }
  }
}

template <typename T, int D>
int launch(const PagedPrefillParams& p, cudaStream_t stream) {
  auto kernel = paged_prefill_kernel<T, D>;
  const int smem = PrefillShape<D>::kSmemBytes;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  // Sequence i needs ceil(q_len_i / 64) blocks: at most total_q / 64 + batch in all.
  const int64_t blocks = static_cast<int64_t>(p.total_q) / kQueryTile + p.batch;
  kernel<<<dim3(static_cast<unsigned>(blocks), p.num_heads), kWarps * 32, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int paged_prefill(const PagedPrefillParams& p, void* stream_ptr) {
  if (p.batch == 0 || p.total_q == 0) return 0;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  return dispatch_dtype(p.dtype, [&](auto type) {
    using T = decltype(type);
    if constexpr (std::is_same<T, float>::value) {
      return paged_prefill_f32(p, stream);
    } else {
      switch (p.head_dim) {
        case 64: return launch<T, 64>(p, stream);
        case 128: return launch<T, 128>(p, stream);
        case 256: return launch<T, 256>(p, stream);
        default: return static_cast<int>(cudaErrorInvalidValue);
      }
    }
  });
}

}  // namespace pagedlm::cuda
