// Hopper (sm_90a) building blocks of the wgmma prefill kernel: shared-memory matrix descriptors
// for the 128-byte swizzle, wgmma issue/commit/wait, mbarriers, cp.async with zero fill, named
// barriers and setmaxnreg. Every function here compiles only in the sm_90a device pass
// (__CUDA_ARCH_FEAT_SM90_ALL); callers guard their use the same way.
//
// Shared-memory layout of an operand tile ("swizzled rows"): rows of 64 elements (128 bytes), the
// 16-byte chunk c of row r stored at chunk c ^ (r % 8), 8 rows forming a 1024-byte atom; a row of
// D elements is split into D / 64 column blocks, each a [rows][64] slab of its own. The same
// layout serves Q and K (K-major operands) and V (N-major, read with the transpose bit).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace pagedlm::cuda::sm90 {

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of `rows` rows.
__device__ __forceinline__ uint32_t swizzled_offset(int rows, int row, int chunk) {
  return (chunk / 8) * rows * 128 + row * 128 + (((chunk % 8) ^ (row % 8)) * 16);
}

// wgmma shared-memory descriptor, 128-byte swizzle. K-major operands ignore `leading` (one k16 step
// never leaves a 128-byte row) and step 8 rows by `stride` = 1024; N-major operands (V) step 64
// columns of N by `leading` (a column block) and 8 rows of K by `stride` = 1024.
__device__ __forceinline__ uint64_t smem_desc(uint32_t address, uint32_t leading, uint32_t stride) {
  return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | (static_cast<uint64_t>(leading >> 4) << 16) |
         (static_cast<uint64_t>(stride >> 4) << 32) | (1ull << 62);
}

// The descriptor of the same operand `bytes` further on in shared memory (a multiple of 16): the
// 14-bit address field holds any shared address, so adding to it never carries into the next field.
__device__ __forceinline__ uint64_t smem_desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// x of lane 0. The compiler then knows the value is the same in every lane of the warp and keeps
// what derives from it (shared addresses, descriptors) in uniform registers instead of
// recomputing it per thread and moving it over before each wgmma.
__device__ __forceinline__ int warp_uniform(int x) { return __shfl_sync(0xffffffffu, x, 0); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving reads or writes of accumulator registers across a wgmma wait.
template <int N>
__device__ __forceinline__ void fence_registers(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

// d (+)= a * b, m64 x N x k16, f32 accumulators; a and b are K-major shared-memory descriptors.
template <typename T, int N>
__device__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate);
// d (+)= a * b with a (m64 x k16) in registers, as mma.m16n8k16's A fragment per warp, and b an
// N-major shared-memory descriptor (transposed).
template <typename T, int N>
__device__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b, int accumulate);

// The specializations, each written once for both 16-bit types (PTX: the type's name in the
// instruction). The accumulators' register lists are long and regular: the operand list and its
// "%i" placeholders are written once per size (32 for N = 64, 64 for N = 128, 128 for N = 256).

#define PAGEDLM_WGMMA_REGS32                                                                                     \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                                      \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define PAGEDLM_WGMMA_REGS64                                                                                     \
  PAGEDLM_WGMMA_REGS32 ", "                                                                                      \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "                            \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define PAGEDLM_WGMMA_REGS128                                                                                    \
  PAGEDLM_WGMMA_REGS64 ", "                                                                                      \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "                            \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "                            \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "                 \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
#define PAGEDLM_WGMMA_OUT32(d)                                                                                   \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),          \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),        \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define PAGEDLM_WGMMA_OUT64(d)                                                                                   \
  PAGEDLM_WGMMA_OUT32(d),                                                                                        \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),        \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),        \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),        \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])

#define PAGEDLM_WGMMA_OUT128(d)                                                                                  \
  PAGEDLM_WGMMA_OUT64(d),                                                                                        \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),        \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),        \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),        \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),        \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),    \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),\
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),\
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

#define PAGEDLM_WGMMA_SS_64(T, PTX)                                                                              \
template <>                                                                                                      \
__device__ __forceinline__ void wgmma_ss<T, 64>(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {        \
  asm volatile(                                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                                               \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {" PAGEDLM_WGMMA_REGS32                       \
      "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                                         \
      : PAGEDLM_WGMMA_OUT32(d)                                                                                   \
      : "l"(a), "l"(b), "r"(accumulate));                                                                        \
}

#define PAGEDLM_WGMMA_RS_64(T, PTX)                                                                              \
template <>                                                                                                      \
__device__ __forceinline__ void wgmma_rs<T, 64>(float (&d)[32], const uint32_t (&a)[4], uint64_t b,              \
                                                int accumulate) {                                                \
  asm volatile(                                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                               \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." PTX "." PTX " {" PAGEDLM_WGMMA_REGS32                       \
      "}, {%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                           \
      : PAGEDLM_WGMMA_OUT32(d)                                                                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));                                    \
}

#define PAGEDLM_WGMMA_SS_128(T, PTX)                                                                             \
template <>                                                                                                      \
__device__ __forceinline__ void wgmma_ss<T, 128>(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {       \
  asm volatile(                                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                               \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {" PAGEDLM_WGMMA_REGS64                      \
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"                                                                         \
      : PAGEDLM_WGMMA_OUT64(d)                                                                                   \
      : "l"(a), "l"(b), "r"(accumulate));                                                                        \
}

#define PAGEDLM_WGMMA_RS_128(T, PTX)                                                                             \
template <>                                                                                                      \
__device__ __forceinline__ void wgmma_rs<T, 128>(float (&d)[64], const uint32_t (&a)[4], uint64_t b,             \
                                                int accumulate) {                                                \
  asm volatile(                                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                               \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." PTX "." PTX " {" PAGEDLM_WGMMA_REGS64                      \
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                           \
      : PAGEDLM_WGMMA_OUT64(d)                                                                                   \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));                                    \
}

// O += P V at head dim 256 (the P operand in registers; S = Q K^T there uses N = 64, the key tile).
#define PAGEDLM_WGMMA_RS_256(T, PTX)                                                                             \
template <>                                                                                                      \
__device__ __forceinline__ void wgmma_rs<T, 256>(float (&d)[128], const uint32_t (&a)[4], uint64_t b,            \
                                                int accumulate) {                                                \
  asm volatile(                                                                                                  \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"                                                              \
      "wgmma.mma_async.sync.aligned.m64n256k16.f32." PTX "." PTX " {" PAGEDLM_WGMMA_REGS128                     \
      "}, {%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"                                                       \
      : PAGEDLM_WGMMA_OUT128(d)                                                                                  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));                                    \
}

PAGEDLM_WGMMA_SS_64(__nv_bfloat16, "bf16")
PAGEDLM_WGMMA_SS_64(__half, "f16")
PAGEDLM_WGMMA_RS_64(__nv_bfloat16, "bf16")
PAGEDLM_WGMMA_RS_64(__half, "f16")
PAGEDLM_WGMMA_SS_128(__nv_bfloat16, "bf16")
PAGEDLM_WGMMA_SS_128(__half, "f16")
PAGEDLM_WGMMA_RS_128(__nv_bfloat16, "bf16")
PAGEDLM_WGMMA_RS_128(__half, "f16")
PAGEDLM_WGMMA_RS_256(__nv_bfloat16, "bf16")
PAGEDLM_WGMMA_RS_256(__half, "f16")
#undef PAGEDLM_WGMMA_SS_64
#undef PAGEDLM_WGMMA_RS_64
#undef PAGEDLM_WGMMA_SS_128
#undef PAGEDLM_WGMMA_RS_128
#undef PAGEDLM_WGMMA_RS_256
#undef PAGEDLM_WGMMA_REGS128
#undef PAGEDLM_WGMMA_OUT128
#undef PAGEDLM_WGMMA_REGS32
#undef PAGEDLM_WGMMA_REGS64
#undef PAGEDLM_WGMMA_OUT32
#undef PAGEDLM_WGMMA_OUT64

__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
}

// 16-byte copy global -> shared that writes zeros and reads nothing when `valid` is false.
__device__ __forceinline__ void cp_async_16_or_zero(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

// Arrives on the mbarrier once every cp.async this thread issued so far has landed; the barrier's
// expected count includes this arrival (.noinc).
__device__ __forceinline__ void cp_async_arrive_on(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// Orders this thread's view of shared memory (its own writes, and others' made visible to it by a
// barrier, cp.async included) before its later tensor-core reads (the async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void named_barrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

template <int Registers>
__device__ __forceinline__ void registers_down() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Registers));
}
template <int Registers>
__device__ __forceinline__ void registers_up() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Registers));
}

}  // namespace pagedlm::cuda::sm90
