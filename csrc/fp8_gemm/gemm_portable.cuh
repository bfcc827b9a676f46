#pragma once
// Portable FP8 blockwise GEMM (sm_80+): e4m3 tiles -> shared memory with cp.async (2 stages),
// converted to f16 while loading mma fragments, mma.sync m16n8k16 with fp32 accumulation; after each
// 128-wide K block the block's partial sums are promoted into the total with a_scale * b_scale.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>

#include "../common/fp8.cuh"
#include "../common/ptx.cuh"
#include "config.h"
#include "params.h"

namespace deepkernels::fp8_gemm {

// Two adjacent e4m3 bytes of shared memory -> one f16x2 register (exact: e4m3 is a subset of f16).
__device__ __forceinline__ uint32_t e4m3x2_to_f16x2(const uint8_t* smem) {
  const __nv_fp8x2_storage_t pair = *reinterpret_cast<const uint16_t*>(smem);
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
  return static_cast<uint32_t>(h.x) | (static_cast<uint32_t>(h.y) << 16);
}

// Copies rows [row0, row0 + kRows) x K block kb of a row-major e4m3 matrix into shared memory,
// zero-filling rows >= rows_valid and columns >= k.
template <int kRows>
__device__ __forceinline__ void load_tile(uint8_t* smem, const uint8_t* src, int64_t row_stride, int row0,
                                          int rows_valid, int kb, int k) {
  constexpr int kChunksPerRow = kBlockK / 16;
  for (int chunk = threadIdx.x; chunk < kRows * kChunksPerRow; chunk += kThreads) {
    const int r = chunk / kChunksPerRow, c = (chunk % kChunksPerRow) * 16;
    const int col = kb * kBlockK + c;
    const bool valid = row0 + r < rows_valid && col < k;
    const uint8_t* g = valid ? src + static_cast<int64_t>(row0 + r) * row_stride + col : src;
    ptx::cp_async_16(smem + r * kSmemRowBytes + c, g, valid);
  }
}

// One 128-wide K block of the warp's 32x32 sub-tile: e4m3 pairs widened to f16 (exact), mma.sync m16n8k16
// into fp32 `partial` (k_steps = valid K / 16 of this block).
__device__ __forceinline__ void mma_k_block(const uint8_t* sa, const uint8_t* sb, int k_steps, int warp_m,
                                            int warp_n, int gid, int tig, float (&partial)[2][4][4]) {
  for (int ks = 0; ks < k_steps; ++ks) {
    const int kc = ks * 16 + tig * 2;
    uint32_t a_frag[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const uint8_t* row_lo = sa + (warp_m + mt * 16 + gid) * kSmemRowBytes;
      const uint8_t* row_hi = row_lo + 8 * kSmemRowBytes;
      a_frag[mt][0] = e4m3x2_to_f16x2(row_lo + kc);
      a_frag[mt][1] = e4m3x2_to_f16x2(row_hi + kc);
      a_frag[mt][2] = e4m3x2_to_f16x2(row_lo + kc + 8);
      a_frag[mt][3] = e4m3x2_to_f16x2(row_hi + kc + 8);
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const uint8_t* col = sb + (warp_n + nt * 8 + gid) * kSmemRowBytes;
      const uint32_t b0 = e4m3x2_to_f16x2(col + kc), b1 = e4m3x2_to_f16x2(col + kc + 8);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) ptx::mma_f16_16816(partial[mt][nt], a_frag[mt], b0, b1);
    }
  }
}

__global__ void __launch_bounds__(kThreads) fp8_gemm_nt_portable_kernel(Fp8GemmParams p) {
  __shared__ __align__(16) uint8_t smem[kSmemBytes];
  const int n0 = blockIdx.x * kBlockN, m0 = blockIdx.y * kBlockM, group_z = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = (warp / 2) * 32, warp_n = (warp % 2) * 32;
  const int gid = lane / 4, tig = lane % 4;

  // Which group of b this tile multiplies, and how many of its rows are valid.
  int group = group_z, rows_valid = p.m;
  const uint8_t* a = p.a;
  const float* a_scale = p.a_scale;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  if (p.mode == GemmMode::kGroupedMasked) {
    rows_valid = min(p.masked_m[group_z], p.m);
    a += group_z * p.a_group_stride;
    a_scale += group_z * p.a_scale_group_stride;
    out += group_z * p.out_group_stride;
  } else if (p.mode == GemmMode::kGroupedContiguous) {
    group = m0 < p.m ? p.m_indices[m0] : -1;
  }
  if (m0 >= rows_valid) return;

  const auto row_in_group = [&](int row) {
    if (row >= rows_valid) return false;
    return p.mode != GemmMode::kGroupedContiguous || p.m_indices[row] == group;
  };

  // Contiguous: a row whose id is not its tile's group is not computed. A padding row (-1) is written as 0;
  // any other id (out of [0, G), or a segment not aligned to BLOCK_M: m_indices is trusted, not checked on
  // the host) as NaN, so a bad layout is visible instead of plausible.
  const auto fill_of = [&](int row) {
    return p.mode == GemmMode::kGroupedContiguous && p.m_indices[row] != -1 ? __int_as_float(0x7fffffff) : 0.0f;
  };

  if (group < 0 || group >= p.num_groups) {  // contiguous padding tile (or a bad first id): nothing computed
    for (int i = threadIdx.x; i < kBlockM * kBlockN; i += kThreads) {
      const int row = m0 + i / kBlockN, col = n0 + i % kBlockN;
      if (row < p.m && col < p.n) out[row * p.out_row_stride + col] = __float2bfloat16_rn(fill_of(row));
    }
    return;
  }

  const int num_k_blocks = ceil_div(p.k, kBlockK);
  const int64_t b_group_elems = static_cast<int64_t>(p.n) * p.k;
  const int scale_n_blocks = ceil_div(p.n, 128), scale_k_blocks = num_k_blocks;
  const uint8_t* b = p.b + group * b_group_elems;
  const float* b_scale = p.b_scale + static_cast<int64_t>(group) * scale_n_blocks * scale_k_blocks +
                         static_cast<int64_t>(n0 / 128) * scale_k_blocks;

  float total[2][4][4] = {};
  const auto stage_a = [&](int s) { return smem + s * kSmemStageBytes; };
  const auto stage_b = [&](int s) { return smem + s * kSmemStageBytes + kBlockM * kSmemRowBytes; };
  const auto load_stage = [&](int kb) {
    load_tile<kBlockM>(stage_a(kb % kStages), a, p.a_row_stride, m0, rows_valid, kb, p.k);
    load_tile<kBlockN>(stage_b(kb % kStages), b, p.k, n0, p.n, kb, p.k);
    ptx::cp_async_commit();
  };

  load_stage(0);
  for (int kb = 0; kb < num_k_blocks; ++kb) {
    if (kb + 1 < num_k_blocks) {
      load_stage(kb + 1);
      ptx::cp_async_wait_group<1>();
    } else {
      ptx::cp_async_wait_group<0>();
    }
    __syncthreads();

    const uint8_t* sa = stage_a(kb % kStages);
    const uint8_t* sb = stage_b(kb % kStages);
    float partial[2][4][4] = {};
    mma_k_block(sa, sb, min(kBlockK, p.k - kb * kBlockK) / 16, warp_m, warp_n, gid, tig, partial);

    // Promotion: the fp32 partial of this K block times its two scales, added on CUDA cores.
    const float scale_b = __ldg(b_scale + kb);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + warp_m + mt * 16 + gid + half * 8;
        const float scale_a = row < rows_valid
            ? __ldg(a_scale + row * p.a_scale_row_stride + kb * p.a_scale_col_stride) * scale_b : 0.0f;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          total[mt][nt][half * 2 + 0] += partial[mt][nt][half * 2 + 0] * scale_a;
          total[mt][nt][half * 2 + 1] += partial[mt][nt][half * 2 + 1] * scale_a;
        }
      }
    }
    __syncthreads();  // the next iteration's cp.async overwrites this stage
  }

  // Epilogue: bf16 pairs straight to global memory (n % 16 == 0, so a pair never straddles the edge).
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m + mt * 16 + gid + half * 8;
      if (row >= rows_valid && !(p.mode == GemmMode::kGroupedContiguous && row < p.m)) continue;
      const bool keep = row_in_group(row);  // else a contiguous padding row (0) or a bad id (NaN)
      const float fill = keep ? 0.0f : fill_of(row);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int col = n0 + warp_n + nt * 8 + tig * 2;
        if (col >= p.n) continue;
        const float v0 = keep ? total[mt][nt][half * 2 + 0] : fill;
        const float v1 = keep ? total[mt][nt][half * 2 + 1] : fill;
        *reinterpret_cast<__nv_bfloat162*>(out + row * p.out_row_stride + col) = __floats2bfloat162_rn(v0, v1);
      }
    }
  }
}

}  // namespace deepkernels::fp8_gemm
