#pragma once
// Portable FP8 weight-gradient GEMM (sm_80+): out[M, N] += (a * a_scale) @ (b * b_scale)^T in fp32 with
// both operands 1x128 per-row scaled along K (DeepSeek-V3's wgrad: K is the token dimension). The tile,
// the cp.async pipeline and the mma.sync inner loop are those of gemm_portable.cuh; what differs is the
// promotion (b's scale is per output column, not per 128x128 block) and the epilogue (fp32, accumulated,
// any M and N).
#include "gemm_portable.cuh"

namespace deepkernels::fp8_gemm {

__global__ void __launch_bounds__(kThreads) wgrad_gemm_portable_kernel(WgradGemmParams p) {
  __shared__ __align__(16) uint8_t smem[kSmemBytes];
  const int n0 = blockIdx.x * kBlockN, m0 = blockIdx.y * kBlockM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = (warp / 2) * 32, warp_n = (warp % 2) * 32;
  const int gid = lane / 4, tig = lane % 4;
  const int num_k_blocks = ceil_div(p.k, kBlockK);

  float total[2][4][4] = {};
  const auto stage_a = [&](int s) { return smem + s * kSmemStageBytes; };
  const auto stage_b = [&](int s) { return smem + s * kSmemStageBytes + kBlockM * kSmemRowBytes; };
  const auto load_stage = [&](int kb) {
    load_tile<kBlockM>(stage_a(kb % kStages), p.a, p.a_row_stride, m0, p.m, kb, p.k);
    load_tile<kBlockN>(stage_b(kb % kStages), p.b, p.b_row_stride, n0, p.n, kb, p.k);
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

    // Promotion: this K block's fp32 partial times the row's a scale and the column's b scale.
    float scale_b[4][2];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int col = n0 + warp_n + nt * 8 + tig * 2 + j;
        scale_b[nt][j] = col < p.n
            ? __ldg(p.b_scale + col * p.b_scale_row_stride + kb * p.b_scale_col_stride) : 0.0f;
      }
    }
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + warp_m + mt * 16 + gid + half * 8;
        const float scale_a = row < p.m
            ? __ldg(p.a_scale + row * p.a_scale_row_stride + kb * p.a_scale_col_stride) : 0.0f;
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          total[mt][nt][half * 2 + 0] += partial[mt][nt][half * 2 + 0] * (scale_a * scale_b[nt][0]);
          total[mt][nt][half * 2 + 1] += partial[mt][nt][half * 2 + 1] * (scale_a * scale_b[nt][1]);
        }
      }
    }
    __syncthreads();  // the next iteration's cp.async overwrites this stage
  }

  // Epilogue: accumulate into out element by element (any N, any row stride).
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + warp_m + mt * 16 + gid + half * 8;
      if (row >= p.m) continue;
      float* out_row = p.out + row * p.out_row_stride;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = n0 + warp_n + nt * 8 + tig * 2 + j;
          if (col < p.n) out_row[col] += total[mt][nt][half * 2 + j];
        }
      }
    }
  }
}

}  // namespace deepkernels::fp8_gemm
