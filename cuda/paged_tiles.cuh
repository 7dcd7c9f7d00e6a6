// Streaming a sequence's K/V rows from the paged cache into shared-memory tiles, for the
// tensor-core kernels. Each thread copies one fixed 16-byte column (chunk) of several rows
// per tile; the rows' block ids are fetched from the block table one tile before their
// copies are issued, so the table's latency hides behind a tile of compute. Rows past the
// range or behind a bad block id are zero-filled (P.V then multiplies them by exactly zero)
// and a bad id raises the caller's flag. S is the stored element: a 16-bit type, whose chunk
// c of row r is stored at c ^ (r % 8) so that ldmatrix reads of 8 rows hit 8 different banks,
// or an FP8 byte, whose rows are staged as they are (the kernel widens them into the 16-bit
// layout before any ldmatrix).
#pragma once

#include <cstdint>

#include "fp8.cuh"
#include "mma.cuh"

namespace pagedlm::cuda {

template <typename S, int D, int Tile, int Threads>
struct PagedTiles {
  static constexpr int kChunkElems = 16 / static_cast<int>(sizeof(S));
  static constexpr int kChunks = D / kChunkElems;  // 16-byte chunks per stored row
  static constexpr int kColumnThreads = Threads / kChunks;
  static constexpr int kIdsPerThread = Tile / kColumnThreads;
  static constexpr int kTileElems = Tile * D;
  static_assert(Threads % kChunks == 0 && Tile % kColumnThreads == 0, "threads must tile the rows' chunks");

  // Element offset of 16-bit chunk `chunk` (8 elements) of row `row` in a tile read by ldmatrix.
  __device__ static int offset(int row, int chunk) { return row * D + ((chunk ^ (row & 7)) * 8); }
  // Where issue() stages stored chunk `chunk` of row `row`.
  __device__ static int stage_offset(int row, int chunk) {
    return sizeof(S) == 2 ? offset(row, chunk) : row * D + chunk * kChunkElems;
  }
  __device__ static int log2_floor(int x) {
    int shift = 0;
    while ((2 << shift) <= x) ++shift;
    return shift;
  }

  const S* key_cache;
  const S* value_cache;
  const int32_t* table;
  int64_t row_stride;  // elements between consecutive tokens of one block
  int kv_head, block_size, num_blocks, block_shift, my_chunk, my_row0, end;
  bool pow2_block;
  int32_t ids[kIdsPerThread];

  __device__ PagedTiles(const void* k, const void* v, const int32_t* block_table, int num_kv_heads, int kv_head_,
                        int block_size_, int num_blocks_, int end_)
      : key_cache(static_cast<const S*>(k)), value_cache(static_cast<const S*>(v)), table(block_table),
        row_stride(static_cast<int64_t>(num_kv_heads) * D), kv_head(kv_head_), block_size(block_size_),
        num_blocks(num_blocks_), block_shift(log2_floor(block_size_)), my_chunk(threadIdx.x % kChunks),
        my_row0(threadIdx.x / kChunks), end(end_), pow2_block((block_size_ & (block_size_ - 1)) == 0) {}

  // Reads the block ids of the tile starting at token `first`.
  __device__ void fetch(int first) {
#pragma unroll
    for (int k = 0; k < kIdsPerThread; ++k) {
      const int t = first + my_row0 + k * kColumnThreads;
      ids[k] = t < end ? table[pow2_block ? t >> block_shift : t / block_size] : 0;
    }
  }

  // Issues the copies of the tile starting at token `first` (ids from fetch(first)).
  __device__ void issue(int first, S* k_dst, S* v_dst, int* bad_flag) const {
#pragma unroll
    for (int k = 0; k < kIdsPerThread; ++k) {
      const int row = my_row0 + k * kColumnThreads;
      const int t = first + row;
      const int32_t block = ids[k];
      const bool valid = t < end && block >= 0 && block < num_blocks;
      if (t < end && !valid) *bad_flag = 1;
      if (!valid) {
        *reinterpret_cast<uint4*>(k_dst + stage_offset(row, my_chunk)) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(v_dst + stage_offset(row, my_chunk)) = make_uint4(0, 0, 0, 0);
        continue;
      }
      const int in_block = pow2_block ? t & (block_size - 1) : t % block_size;
      const int64_t elem = (static_cast<int64_t>(block) * block_size + in_block) * row_stride +
                           static_cast<int64_t>(kv_head) * D + my_chunk * kChunkElems;
      cp_async_16(k_dst + stage_offset(row, my_chunk), key_cache + elem);
      cp_async_16(v_dst + stage_offset(row, my_chunk), value_cache + elem);
    }
  }
};

// The caches' element type KV, as the tensor-core kernels take it: T itself, or Fp8<F> for FP8
// bytes of format F, which land in shared memory as they are and are widened to T there.
template <__nv_fp8_interpretation_t F>
struct Fp8 {};

template <typename T, typename KV>
struct CacheElem {
  using Stored = T;
  static constexpr bool kFp8 = false;
};

template <typename T, __nv_fp8_interpretation_t F>
struct CacheElem<T, Fp8<F>> {
  using Stored = uint8_t;
  static constexpr bool kFp8 = true;

  // Sixteen stored values (16 bytes) as sixteen T values: the first eight in `first`, the rest in `second`.
  __device__ __forceinline__ static void widen16(uint4 bytes, uint4& first, uint4& second) {
    first = widen_fp8x8<T, F>(make_uint2(bytes.x, bytes.y));
    second = widen_fp8x8<T, F>(make_uint2(bytes.z, bytes.w));
  }

  // Widens a stage's K and V tiles (2 * Tile rows of D bytes, as PagedTiles stages them) into the
  // 16-bit ldmatrix layout at `dst` (K tile, then V tile). Every thread of the block takes part.
  template <int D, int Tile, int Threads>
  __device__ static void widen(const uint8_t* src, T* dst) {
    using Layout = PagedTiles<T, D, Tile, Threads>;
    constexpr int kByteChunks = D / 16;
    for (int i = threadIdx.x; i < 2 * Tile * kByteChunks; i += Threads) {
      const int row = i / kByteChunks, c = i % kByteChunks;
      T* tile = dst + (row / Tile) * Tile * D;
      const int r = row % Tile;
      widen16(*reinterpret_cast<const uint4*>(src + row * D + c * 16),
              *reinterpret_cast<uint4*>(tile + Layout::offset(r, 2 * c)),
              *reinterpret_cast<uint4*>(tile + Layout::offset(r, 2 * c + 1)));
    }
  }
};

}  // namespace pagedlm::cuda
