#pragma once
// Hopper (sm_90a) step 1, OFF by default (DEEPKERNELS_GEMM_SM90=1 enables it; not yet run on a GPU):
// the portable kernel's 64x64 tiling with 64-wide K steps and cp.async double buffering, but the e4m3 tiles are stored in the
// wgmma "no-swizzle" core-matrix layout and multiplied with fp8 wgmma m64n64k32 by one warpgroup.
// TODO(next): TMA + mbarrier ring, producer warp + 2 math warpgroups, persistent L2-swizzled scheduler.
#include <cuda_bf16.h>
#include <cstdint>

#include "config.h"
#include "params.h"
#include "../common/ptx.cuh"

namespace deepkernels::fp8_gemm::sm90 {

using ptx::cp_async_16;
using ptx::cp_async_commit;
constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 64, kThreads = 128, kStages = 2;
// Core matrix: 8 rows x 16 bytes, stored as 128 contiguous bytes. Tile layout [row/8][k/16][row%8][16 B]:
// neighbouring core matrices along K are kCoreK bytes apart (LBO), along M/N kCoreMN bytes (SBO).
constexpr int kCoreK = 128, kCoreMN = (kBlockK / 16) * 128;
constexpr int kTileBytes = kBlockM * kBlockK;

__device__ __forceinline__ int core_offset(int row, int k_byte) {
  return (row / 8) * kCoreMN + (k_byte / 16) * kCoreK + (row % 8) * 16 + (k_byte % 16);
}

// Shared-memory matrix descriptor, no swizzle: start, LBO and SBO in 16-byte units.
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  const uint64_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  return ((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(kCoreK >> 4) << 16) |
         (static_cast<uint64_t>(kCoreMN >> 4) << 32);
}

__device__ __forceinline__ void load_tile(uint8_t* dst, const uint8_t* src, int64_t row_stride, int rows_valid,
                                          int k, int k0) {
  for (int c = threadIdx.x; c < kBlockM * (kBlockK / 16); c += kThreads) {
    const int row = c / (kBlockK / 16), col = (c % (kBlockK / 16)) * 16;
    const bool valid = row < rows_valid && k0 + col < k;
    cp_async_16(dst + core_offset(row, col), valid ? src + row * row_stride + k0 + col : src, valid);
  }
}

// d[64x64] (+)= a[64x32] * b[64x32]^T, both K-major e4m3 in shared memory; accumulate when `accumulate`.
__device__ __forceinline__ void wgmma_m64n64k32_e4m3(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, %32, %33, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(a), "l"(b), "r"(accumulate));
#else
  (void)d; (void)a; (void)b; (void)accumulate;
#endif
}

template <GemmMode kMode>
__global__ void __launch_bounds__(kThreads) fp8_gemm_sm90_kernel(const Fp8GemmParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(128) uint8_t smem_a[kStages][kTileBytes];
  __shared__ __align__(128) uint8_t smem_b[kStages][kTileBytes];
  const int group = kMode == GemmMode::kGroupedMasked ? static_cast<int>(blockIdx.z) : 0;
  const int m0 = static_cast<int>(blockIdx.y) * kBlockM, n0 = static_cast<int>(blockIdx.x) * kBlockN;
  const int m_valid = kMode == GemmMode::kGroupedMasked ? min(p.masked_m[group], p.m) : p.m;
  if (m0 >= m_valid) return;
  int b_group = group;
  if constexpr (kMode == GemmMode::kGroupedContiguous) {
    b_group = -1;
    for (int i = m0; i < min(m0 + kBlockM, p.m) && b_group < 0; ++i) b_group = p.m_indices[i];
    if (b_group >= p.num_groups) b_group = -1;  // out-of-range ids: zero rows, as the portable kernel
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + static_cast<int64_t>(group) * p.out_group_stride;
  // Accumulator layout of m64nNk32: warp w owns rows 16w..16w+15; d[4i + 2h + j] is row 16w + g + 8h,
  // column 8i + 2t + j.
  float acc[32] = {};
  if (b_group >= 0) {
    const uint8_t* a = p.a + static_cast<int64_t>(group) * p.a_group_stride + static_cast<int64_t>(m0) * p.a_row_stride;
    const uint8_t* b = p.b + static_cast<int64_t>(b_group) * p.n * p.k + static_cast<int64_t>(n0) * p.k;
    const int k_groups = (p.k + 127) / 128;
    const float* b_scale = p.b_scale + (static_cast<int64_t>(b_group) * ((p.n + 127) / 128) + n0 / 128) * k_groups;
    const float* a_scale = p.a_scale + static_cast<int64_t>(group) * p.a_scale_group_stride;
    const int rows_a = min(kBlockM, m_valid - m0), rows_b = min(kBlockN, p.n - n0);
    const int k_tiles = (p.k + kBlockK - 1) / kBlockK;
    float part[32];
    load_tile(smem_a[0], a, p.a_row_stride, rows_a, p.k, 0);
    load_tile(smem_b[0], b, p.k, rows_b, p.k, 0);
    cp_async_commit();
    bool fresh = true;  // the first wgmma of each 128-K group overwrites `part`
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int stage = kt % kStages;
      if (kt + 1 < k_tiles) {
        load_tile(smem_a[stage ^ 1], a, p.a_row_stride, rows_a, p.k, (kt + 1) * kBlockK);
        load_tile(smem_b[stage ^ 1], b, p.k, rows_b, p.k, (kt + 1) * kBlockK);
      }
      cp_async_commit();
      ptx::cp_async_wait_group<1>();
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async writes -> wgmma reads
      __syncthreads();
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int kk = 0; kk < kBlockK / 32; ++kk) {
        wgmma_m64n64k32_e4m3(part, smem_desc(smem_a[stage] + kk * 2 * kCoreK),
                             smem_desc(smem_b[stage] + kk * 2 * kCoreK), fresh ? 0 : 1);
        fresh = false;
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      __syncthreads();
      if (((kt + 1) * kBlockK) % 128 == 0 || kt + 1 == k_tiles) {
        const int kb = (kt * kBlockK) / 128;
        const float sb = b_scale[kb];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = min(m0 + warp * 16 + g + h * 8, p.m - 1);
          const float s = sb * a_scale[static_cast<int64_t>(row) * p.a_scale_row_stride + kb * p.a_scale_col_stride];
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            acc[4 * i + 2 * h] += part[4 * i + 2 * h] * s;
            acc[4 * i + 2 * h + 1] += part[4 * i + 2 * h + 1] * s;
          }
        }
        fresh = true;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = m0 + warp * 16 + g + h * 8;
    if (row >= m_valid) continue;
    bool zero_row = b_group < 0;
    if constexpr (kMode == GemmMode::kGroupedContiguous) zero_row = p.m_indices[row] != b_group;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int col = n0 + 8 * i + 2 * t;
      if (col >= p.n) continue;
      const __nv_bfloat162 v = zero_row ? __floats2bfloat162_rn(0.f, 0.f)
                                        : __floats2bfloat162_rn(acc[4 * i + 2 * h], acc[4 * i + 2 * h + 1]);
      *reinterpret_cast<__nv_bfloat162*>(out + static_cast<int64_t>(row) * p.out_row_stride + col) = v;
    }
  }
#else
  (void)p;
#endif
}

}  // namespace deepkernels::fp8_gemm::sm90
