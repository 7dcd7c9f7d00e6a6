// CUDA paged-attention prefill for f16/bf16 queries (f32: paged_prefill_f32.cu): FlashAttention-2 on mma.m16n8k16 over
// the paged KV cache, 16-bit or FP8; the GPU twin of cpp/src/paged_prefill.cpp.
//
// A block owns 128 consecutive queries of one sequence and one query head. At D <= 128 each of
// its 4 warps owns 32 of them as two m16 tiles, so every K/V fragment read from shared memory
// feeds two mma; at D = 256 (where two tiles' O accumulators would not fit in registers) 8
// warps own 16 rows each. The query tile is staged in shared memory once; each warp keeps its
// rows' online softmax in registers (S becomes the A operand of P.V without leaving registers)
// and skips K/V tiles that none of its rows can see. K/V tiles stream through shared memory
// with cp.async, two landing while one is computed (PagedTiles). An FP8 cache lands as bytes
// (half the traffic) and each tile is widened to T in shared memory before the MMAs; k_scale
// joins the score scale and v_scale the output's normalization.
// The grid is sized from total_q on the host; each block finds its (sequence, query tile)
// by walking cu_seqlens_q on the device, so nothing is synchronised and the launch is
// graph-capturable. Bad values never fault: a bad block id, length or cu_seqlens_q turns
// the affected block's rows into NaN.
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"
#include "mma.cuh"
#include "paged_fp8.h"
#include "paged_prefill_f32.h"
#include "paged_prefill_sm90.h"
#include "paged_tiles.cuh"
#include "prefill_mask.cuh"
#include "prefill_schedule.cuh"

namespace pagedlm::cuda {
namespace {

// Per head dim: registers hold O for every row a warp owns plus S for one K/V tile, which sets
// the tile sizes (two m-tiles and 64 keys at D = 64, two m-tiles and 32 keys at D = 128, one
// m-tile and 32 keys at D = 256). 128 threads and up to 255 registers let two blocks share an SM
// at D <= 128; at D = 256 one block of 8 warps fills it.
template <int D>
struct PrefillShape {
  static constexpr int kKvTile = D <= 64 ? 64 : 32;  // tokens per K/V tile
  static constexpr int kMTiles = D <= 128 ? 2 : 1;   // m16 query tiles per warp
  static constexpr int kWarps = D <= 128 ? 4 : 8;
  static constexpr int kWarpRows = 16 * kMTiles;
  static constexpr int kQueryTile = kWarpRows * kWarps;  // 128 queries per block
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kStages = 3;  // two tiles land while one is computed
  static constexpr int kQueryElems = kQueryTile * D;
  static constexpr int kStageElems = 2 * kKvTile * D;
  // The query tile, the pipeline's stages of stored elements and, for FP8, one widened stage.
  // 16-bit: 64/80/160 KB.
  template <bool kFp8>
  static constexpr int smem_bytes() {
    return kQueryElems * 2 + kStages * kStageElems * (kFp8 ? 1 : 2) + (kFp8 ? kStageElems * 2 : 0);
  }
};

template <typename T, typename KV, int D>
__global__ void __launch_bounds__(PrefillShape<D>::kThreads) paged_prefill_kernel(PagedPrefillParams p) {
  using Shape = PrefillShape<D>;
  using C = CacheElem<T, KV>;
  using Stored = typename C::Stored;
  constexpr int kKvTile = Shape::kKvTile, kMTiles = Shape::kMTiles, kWarpRows = Shape::kWarpRows;
  constexpr int kQueryTile = Shape::kQueryTile, kStages = Shape::kStages;
  constexpr int kNTiles = kKvTile / 8;  // score columns per m-tile, in mma n-tiles
  constexpr int kRows = 2 * kMTiles;    // query rows per thread: r0 and r0 + 8 of each m-tile
  using Tiles = PagedTiles<T, D, kKvTile, Shape::kThreads>;  // the 16-bit layout ldmatrix reads
  extern __shared__ uint4 smem_raw[];
  T* q_smem = reinterpret_cast<T*>(smem_raw);
  Stored* kv_smem = reinterpret_cast<Stored*>(q_smem + Shape::kQueryElems);
  T* widened = reinterpret_cast<T*>(kv_smem + kStages * Shape::kStageElems);  // FP8 only
  __shared__ int bad_row;

  int b, tile;
  if (!find_query_tile(p, kQueryTile, b, tile)) return;  // a spare block of the grid's bound

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int head = blockIdx.y, kv_head = head / (p.num_heads / p.num_kv_heads);
  const SequenceRows seq_rows = sequence_rows(p, b);
  const int q_begin = seq_rows.begin, q_len = seq_rows.len;
  const int len = p.seq_lens[b];
  const bool bad_len = sequence_out_of_range(p, seq_rows, len);
  const int q0 = tile * kQueryTile;                        // first query of the block, within the sequence
  const int pos0 = len - q_len + q0;                       // its absolute position
  const int last_pos = pos0 + min(kQueryTile, q_len - q0) - 1;
  const bool causal = p.causal && !p.mask;
  const int kv_lo = bad_len ? 0 : (p.sliding_window > 0 ? max(0, pos0 - p.sliding_window + 1) : 0);
  const int kv_end = bad_len ? 0 : (causal ? last_pos + 1 : len);
  const int kv_tiles = kv_end > kv_lo ? (kv_end - kv_lo + kKvTile - 1) / kKvTile : 0;

  if (tid == 0) bad_row = bad_len;

  // The query tile goes to shared memory in the first copy group, padding rows as zeros.
  {
    constexpr int kChunks = D / 8;
    const bool q_aligned = (reinterpret_cast<uintptr_t>(p.query) & 15) == 0;  // else 4-byte loads
#pragma unroll
    for (int i = tid; i < kQueryTile * kChunks; i += Shape::kThreads) {
      const int row = i / kChunks, chunk = i % kChunks, qi = q0 + row;
      T* dst = q_smem + Tiles::offset(row, chunk);
      if (bad_len || qi >= q_len) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
        continue;
      }
      const T* src = static_cast<const T*>(p.query) + (static_cast<int64_t>(q_begin + qi) * p.num_heads + head) * D +
                     chunk * 8;
      if (q_aligned) {
        cp_async_16(dst, src);
      } else {
        const uint32_t* w = reinterpret_cast<const uint32_t*>(src);
        *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
  }
  __syncthreads();  // bad_row is set before any copy can raise it

  PagedTiles<Stored, D, kKvTile, Shape::kThreads> tiles(p.key_cache, p.value_cache, p.block_tables + static_cast<int64_t>(b) * p.max_blocks_per_seq,
              p.num_kv_heads, kv_head, p.block_size, p.num_blocks, kv_end);
  auto stage_k = [&](int stage) { return kv_smem + stage * Shape::kStageElems; };
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < kv_tiles) {
      tiles.fetch(kv_lo + s * kKvTile);
      tiles.issue(kv_lo + s * kKvTile, stage_k(s), stage_k(s) + kKvTile * D, &bad_row);
    }
    cp_async_commit();
  }
  if (kStages - 1 < kv_tiles) tiles.fetch(kv_lo + (kStages - 1) * kKvTile);

  // This warp's rows: r0 = lane / 4 and r0 + 8 of each of its m-tiles.
  const int r0 = lane / 4, col = (lane % 4) * 2;
  const int warp_row0 = warp * kWarpRows;  // within the block's query tile
  const int warp_q0 = q0 + warp_row0;
  const bool warp_has_rows = warp_q0 < q_len;
  const int warp_first_pos = pos0 + warp_row0;
  const int warp_last_pos = warp_first_pos + min(kWarpRows, q_len - warp_q0) - 1;
  PrefillRow rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rows[r] = prefill_row(p, warp_q0 + (r / 2) * 16 + (r % 2) * 8 + r0, len, q_len);
  auto visible = [&](int r, int t) { return prefill_visible(p, b, len, q_len, causal, rows[r], t, kv_end, &bad_row); };

  // Scores and row maxima live in the log2 domain (natural logits times log2 e), so each
  // probability is one exp2. With a positive scale and no soft cap the max of the raw dot products
  // times scale * log2 e is the scaled max, and the scale folds into the exp2's FFMA; otherwise
  // every score is scaled (and capped) on its own first.
  float scale = p.scale, out_scale = 1.0f;
  if constexpr (C::kFp8) {
    scale *= scale_at(p.k_scale, kv_head);
    out_scale = scale_at(p.v_scale, kv_head);
  }
  const bool fold_scale = scale > 0.0f && p.soft_cap <= 0.0f;
  const float score_mult = fold_scale ? scale * kLog2e : 1.0f;
  float row_max[kRows], row_sum[kRows];  // sum is lane-partial
  int kind[kRows];                       // non-finite scores seen, lane-partial (common.cuh)
  float o[kMTiles][D / 8][4];
#pragma unroll
  for (int r = 0; r < kRows; ++r) row_max[r] = -INFINITY, row_sum[r] = 0.0f, kind[r] = kScoreFinite;
#pragma unroll
  for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[m][n][0] = o[m][n][1] = o[m][n][2] = o[m][n][3] = 0.0f;
  }
  // Lane offsets (elements) of the ldmatrix reads at k-step 0; mi = lane / 8 names the 8x8 matrix
  // and ri its row. Stepping k by 16 flips bits that the row part never touches, so k-step ks
  // reads offset ^ (16 * ks); stepping rows by 16 adds 16 * D, a constant the load folds in.
  const int mi = lane / 8, ri = lane % 8;
  const int q_lane = Tiles::offset(warp_row0 + (mi % 2) * 8 + ri, mi / 2);
  const int k_lane = Tiles::offset((mi / 2) * 8 + ri, mi % 2);
  const int v_lane = Tiles::offset((mi % 2) * 8 + ri, mi / 2);
  const uint32_t q_base = shared_address(q_smem), kv_base = shared_address(kv_smem);

  for (int kt = 0; kt < kv_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt landed everywhere; everyone is done with tile kt - 1's stage
    const int ahead = kt + kStages - 1;
    if (ahead < kv_tiles) {
      Stored* k_dst = stage_k(ahead % kStages);
      tiles.issue(kv_lo + ahead * kKvTile, k_dst, k_dst + kKvTile * D, &bad_row);
    }
    cp_async_commit();
    if (ahead + 1 < kv_tiles) tiles.fetch(kv_lo + (ahead + 1) * kKvTile);
    uint32_t k_tile = kv_base + (kt % kStages) * Shape::kStageElems * 2;  // byte addresses
    if constexpr (C::kFp8) {
      // By the whole block, before any warp skips the tile; the barrier above ended every warp's
      // reads of the previous tile's widened copy.
      C::template widen<D, kKvTile, Shape::kThreads>(kv_smem + (kt % kStages) * Shape::kStageElems, widened);
      __syncthreads();
      k_tile = shared_address(widened);
    }
    const uint32_t v_tile = k_tile + kKvTile * D * 2;

    const int t0 = kv_lo + kt * kKvTile;
    // A warp whose rows are all padding, or all before this tile (causal) or all past it (window),
    // would only add exact zeros: it skips the tile (warp-uniform).
    if (!warp_has_rows || (causal && t0 > warp_last_pos) ||
        (p.sliding_window > 0 && t0 + kKvTile <= warp_first_pos - p.sliding_window + 1)) {
      continue;
    }

    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) s[m][j][0] = s[m][j][1] = s[m][j][2] = s[m][j][3] = 0.0f;
    }
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t qf[kMTiles][4];  // (rows 0-7, k lo), (8-15, k lo), (0-7, k hi), (8-15, k hi)
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) ldmatrix_x4(qf[m], q_base + 2 * ((q_lane ^ (ks * 16)) + m * 16 * D));
#pragma unroll
      for (int np = 0; np < kNTiles / 2; ++np) {
        uint32_t kf[4];  // (tokens 0-7, k lo), (0-7, k hi), (8-15, k lo), (8-15, k hi) of this pair
        ldmatrix_x4(kf, k_tile + 2 * ((k_lane ^ (ks * 16)) + np * 16 * D));
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          mma_16816<T>(s[m][2 * np], qf[m], kf[0], kf[1]);
          mma_16816<T>(s[m][2 * np + 1], qf[m], kf[2], kf[3]);
        }
      }
    }

    // Only tiles on the causal diagonal, at the window's edge, past the sequence's end or under a
    // custom mask hide any (row, key) pair of this warp's real rows; the others skip the
    // per-element test.
    const bool tile_masked = p.mask != nullptr || t0 + kKvTile > kv_end ||
                             (causal && t0 + kKvTile - 1 > warp_first_pos) ||
                             (p.sliding_window > 0 && t0 < warp_last_pos - p.sliding_window + 1);
    if (!fold_scale) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float v = s[m][j][e] * scale;
            if (p.soft_cap > 0.0f) v = p.soft_cap * tanhf(v / p.soft_cap);
            s[m][j][e] = v * kLog2e;
          }
        }
      }
    }
    float tile_max[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) tile_max[r] = -INFINITY;
    auto finish_scores = [&](auto masked) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = 2 * m + (e >> 1), t = t0 + j * 8 + col + (e & 1);
            if (decltype(masked)::value && !visible(r, t)) s[m][j][e] = -INFINITY;
            tile_max[r] = fmax_nan(tile_max[r], s[m][j][e]);
          }
        }
      }
    };
    if (tile_masked) {
      finish_scores(std::true_type{});
    } else {
      finish_scores(std::false_type{});
    }
    float rescale[kRows], exp_offset[kRows];
    bool max_moved = false;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      kind[r] = max(kind[r], nonfinite_kind(tile_max[r]));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      const float new_max = fmaxf(row_max[r], tile_max[r] * score_mult);
      rescale[r] = new_max == -INFINITY ? 1.0f : exp2_ftz(row_max[r] - new_max);
      max_moved |= rescale[r] != 1.0f;
      row_max[r] = new_max;
      row_sum[r] *= rescale[r];
      // A row with no visible key yet has only -inf scores, which exp2 takes to 0 with any finite offset.
      exp_offset[r] = new_max == -INFINITY ? 0.0f : -new_max;
    }
    // Once the row maxima settle, rescale is exactly 1 and the O update can be skipped (warp-uniform).
    max_moved = __any_sync(0xffffffffu, max_moved);
#pragma unroll
    for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = 2 * m + (e >> 1);
          s[m][j][e] = exp2_ftz(fmaf(s[m][j][e], score_mult, exp_offset[r]));
          row_sum[r] += s[m][j][e];
        }
      }
    }
    if (max_moved) {
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[m][n][0] *= rescale[2 * m], o[m][n][1] *= rescale[2 * m];
          o[m][n][2] *= rescale[2 * m + 1], o[m][n][3] *= rescale[2 * m + 1];
        }
      }
    }

    // O += P V, 16 tokens (two n-tiles of S) per k-step; each V fragment serves every m-tile.
#pragma unroll
    for (int kk = 0; kk < kNTiles / 2; ++kk) {
      uint32_t p_frag[kMTiles][4];
#pragma unroll
      for (int m = 0; m < kMTiles; ++m) {
        p_frag[m][0] = pack2<T>(s[m][2 * kk][0], s[m][2 * kk][1]);
        p_frag[m][1] = pack2<T>(s[m][2 * kk][2], s[m][2 * kk][3]);
        p_frag[m][2] = pack2<T>(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
        p_frag[m][3] = pack2<T>(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
      }
#pragma unroll
      for (int np = 0; np < D / 16; ++np) {
        uint32_t vf[4];  // (tokens 0-7, d lo), (8-15, d lo), (0-7, d hi), (8-15, d hi)
        ldmatrix_x4_trans(vf, v_tile + 2 * ((v_lane ^ (np * 16)) + kk * 16 * D));
#pragma unroll
        for (int m = 0; m < kMTiles; ++m) {
          mma_16816<T>(o[m][2 * np], p_frag[m], vf[0], vf[1]);
          mma_16816<T>(o[m][2 * np + 1], p_frag[m], vf[2], vf[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // bad_row is final

#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 1);
    row_sum[r] += __shfl_xor_sync(0xffffffffu, row_sum[r], 2);
  }
  // With cu_seqlens_q itself out of range there is no row that is certainly ours to write.
  const bool rows_known = seq_rows.known;
  const bool bad = bad_row != 0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) kind[r] = bad ? kScoreNaN : quad_max(kind[r]);
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    if (!rows_known || rows[r].q >= q_len) continue;
    const int m = r / 2, h = r % 2;
    const int64_t out_row = (static_cast<int64_t>(q_begin + rows[r].q) * p.num_heads + head);
    const float inv = row_sum[r] > 0.0f ? out_scale / row_sum[r] : 0.0f;  // a row that sees nothing yields zeros
    T* out = static_cast<T*>(p.out) + out_row * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      out[n * 8 + col] = from_float<T>(flagged_out(kind[r], o[m][n][2 * h] * inv));
      out[n * 8 + col + 1] = from_float<T>(flagged_out(kind[r], o[m][n][2 * h + 1] * inv));
    }
    if (p.lse && lane % 4 == 0) {
      p.lse[out_row] =
          flagged_lse(kind[r], row_sum[r] > 0.0f ? (row_max[r] + log2f(row_sum[r])) * kLn2 : -INFINITY);
    }
  }
}

template <typename T, typename KV, int D>
int launch(const PagedPrefillParams& p, cudaStream_t stream) {
  using Shape = PrefillShape<D>;
  auto kernel = paged_prefill_kernel<T, KV, D>;
  const int smem = Shape::template smem_bytes<CacheElem<T, KV>::kFp8>();
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  // Sequence i needs ceil(q_len_i / 128) blocks: at most total_q / 128 + batch in all.
  const int64_t blocks = static_cast<int64_t>(p.total_q) / Shape::kQueryTile + p.batch;
  kernel<<<dim3(static_cast<unsigned>(blocks), p.num_heads), Shape::kThreads, smem, stream>>>(p);
  return static_cast<int>(cudaGetLastError());
}

template <typename T, typename KV>
int launch_head_dim(const PagedPrefillParams& p, cudaStream_t stream) {
  switch (p.head_dim) {
    case 64: return launch<T, KV, 64>(p, stream);
    case 128: return launch<T, KV, 128>(p, stream);
    case 256: return launch<T, KV, 256>(p, stream);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace

int paged_prefill(const PagedPrefillParams& p, void* stream_ptr) {
  if (p.batch == 0 || p.total_q == 0) return 0;
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (is_fp8(p.kv_dtype) && p.dtype == DType::f32) return paged_prefill_fp8(p, stream);  // CUDA cores
  return dispatch_dtype(p.dtype, [&](auto type) {
    using T = decltype(type);
    if constexpr (std::is_same<T, float>::value) {
      return paged_prefill_f32(p, stream);
    } else {
      // Hopper takes the wgmma kernel where it covers the configuration (paged_prefill_sm90.cu),
      // unless the caller asked for the mma.sync kernel (the bindings refuse sm90 where it cannot run).
      if (p.backend != PrefillBackend::mma && paged_prefill_sm90_supports(p)) return paged_prefill_sm90(p, stream);
      if (p.kv_dtype == DType::e4m3) return launch_head_dim<T, Fp8<__NV_E4M3>>(p, stream);
      if (p.kv_dtype == DType::e5m2) return launch_head_dim<T, Fp8<__NV_E5M2>>(p, stream);
      return launch_head_dim<T, T>(p, stream);
    }
  });
}

}  // namespace pagedlm::cuda
