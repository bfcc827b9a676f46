#pragma once
// Portable FP8 blockwise GEMM (sm_80+): e4m3 tiles land in shared memory with cp.async (double buffered),
// are widened to fp16 in registers (exact: every e4m3 value is an fp16 value) and multiplied with
// mma.sync m16n8k16 (fp32 accumulate); every 128 of K the partial sums are promoted into the fp32
// accumulators multiplied by a_scale(row) * b_scale(tile).
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>

#include "config.h"
#include "params.h"

namespace deepkernels::fp8_gemm::portable {

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Two consecutive e4m3 bytes -> packed fp16x2 (low byte -> low half).
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(const uint8_t* p) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(*reinterpret_cast<const __nv_fp8x2_storage_t*>(p), __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

__device__ __forceinline__ void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

struct SharedTiles {
  uint8_t a[kStages][kBlockM][kSmemPitch];
  uint8_t b[kStages][kBlockN][kSmemPitch];
};

// One 64x64 fp8 tile: 256 chunks of 16 bytes, 2 per thread; rows >= rows_valid and K beyond k read zeros.
__device__ __forceinline__ void load_tile(uint8_t (*dst)[kSmemPitch], const uint8_t* src, int rows_valid,
                                          int k, int k0) {
#pragma unroll
  for (int c = threadIdx.x; c < kBlockM * (kBlockK / 16); c += kThreads) {
    const int row = c / (kBlockK / 16), col = (c % (kBlockK / 16)) * 16;
    const bool valid = row < rows_valid && k0 + col < k;
    cp_async_16(&dst[row][col], valid ? src + static_cast<int64_t>(row) * k + k0 + col : src, valid);
  }
}

template <GemmMode kMode>
__global__ void __launch_bounds__(kThreads) fp8_gemm_portable_kernel(const GemmParams p) {
  __shared__ __align__(16) SharedTiles smem;
  const int group = kMode == GemmMode::kGroupedMasked ? static_cast<int>(blockIdx.z) : 0;
  const int m0 = static_cast<int>(blockIdx.y) * kBlockM, n0 = static_cast<int>(blockIdx.x) * kBlockN;
  const int m_valid = kMode == GemmMode::kGroupedMasked ? min(p.masked_m[group], p.m) : p.m;
  if (m0 >= m_valid) return;  // masked rows: left untouched

  // Which b this M tile multiplies (contiguous layout: the group of the tile's first non-padding row).
  int b_group = group;
  if constexpr (kMode == GemmMode::kGroupedContiguous) {
    b_group = -1;
    for (int i = m0; i < min(m0 + kBlockM, p.m) && b_group < 0; ++i) b_group = p.m_indices[i];
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = (warp / 2) * 32, warp_n = (warp % 2) * 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t out_base = static_cast<int64_t>(group) * p.out_group_stride;

  float acc[2][4][4] = {};
  if (b_group >= 0) {
    const uint8_t* a = p.a + static_cast<int64_t>(group) * p.a_group_stride + static_cast<int64_t>(m0) * p.k;
    const uint8_t* b = p.b + static_cast<int64_t>(b_group) * p.n * p.k + static_cast<int64_t>(n0) * p.k;
    const int k_groups = (p.k + 127) / 128;
    const float* b_scale = p.b_scale + (static_cast<int64_t>(b_group) * ((p.n + 127) / 128) + n0 / 128) * k_groups;
    const float* a_scale = p.a_scale + static_cast<int64_t>(group) * p.sa_group_stride;
    const int rows_a = min(kBlockM, m_valid - m0), rows_b = min(kBlockN, p.n - n0);
    const int k_tiles = (p.k + kBlockK - 1) / kBlockK;

    float part[2][4][4] = {};
    load_tile(smem.a[0], a, rows_a, p.k, 0);
    load_tile(smem.b[0], b, rows_b, p.k, 0);
    cp_async_commit();
    for (int kt = 0; kt < k_tiles; ++kt) {
      const int stage = kt % kStages;
      if (kt + 1 < k_tiles) {
        load_tile(smem.a[stage ^ 1], a, rows_a, p.k, (kt + 1) * kBlockK);
        load_tile(smem.b[stage ^ 1], b, rows_b, p.k, (kt + 1) * kBlockK);
      }
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBlockK; kk += 16) {
        uint32_t af[2][4], bf[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int r = warp_m + mi * 16 + g;
          af[mi][0] = e4m3x2_to_f16x2(&smem.a[stage][r][kk + 2 * t]);
          af[mi][1] = e4m3x2_to_f16x2(&smem.a[stage][r + 8][kk + 2 * t]);
          af[mi][2] = e4m3x2_to_f16x2(&smem.a[stage][r][kk + 2 * t + 8]);
          af[mi][3] = e4m3x2_to_f16x2(&smem.a[stage][r + 8][kk + 2 * t + 8]);
        }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const int c = warp_n + ni * 8 + g;
          bf[ni][0] = e4m3x2_to_f16x2(&smem.b[stage][c][kk + 2 * t]);
          bf[ni][1] = e4m3x2_to_f16x2(&smem.b[stage][c][kk + 2 * t + 8]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) mma_f16_16816(part[mi][ni], af[mi], bf[ni]);
      }
      __syncthreads();  // the next iteration's loads overwrite this stage

      const bool group_ends = ((kt + 1) * kBlockK) % 128 == 0 || kt + 1 == k_tiles;
      if (group_ends) {  // promote: acc += part * a_scale(row) * b_scale
        const int kb = (kt * kBlockK) / 128;
        const float sb = b_scale[kb];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int row = min(m0 + warp_m + mi * 16 + g + h * 8, p.m - 1);
            const float s = sb * a_scale[static_cast<int64_t>(row) * p.sa_row_stride + kb * p.sa_col_stride];
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
              acc[mi][ni][2 * h] += part[mi][ni][2 * h] * s;
              acc[mi][ni][2 * h + 1] += part[mi][ni][2 * h + 1] * s;
              part[mi][ni][2 * h] = 0.f;
              part[mi][ni][2 * h + 1] = 0.f;
            }
          }
      }
    }
  }

  // Epilogue: bf16 pairs straight from registers; padding rows (contiguous, m_indices == -1) get zeros.
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_m + mi * 16 + g + h * 8;
      if (row >= m_valid) continue;
      bool zero_row = b_group < 0;
      if constexpr (kMode == GemmMode::kGroupedContiguous) zero_row = p.m_indices[row] != b_group;
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int col = n0 + warp_n + ni * 8 + 2 * t;
        if (col >= p.n) continue;
        const __nv_bfloat162 v = zero_row ? __floats2bfloat162_rn(0.f, 0.f)
                                          : __floats2bfloat162_rn(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        *reinterpret_cast<__nv_bfloat162*>(p.out + out_base + static_cast<int64_t>(row) * p.n + col) = v;
      }
    }
}

}  // namespace deepkernels::fp8_gemm::portable
