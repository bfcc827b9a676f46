#pragma once
#include <cstdint>
#include "../common/fp8.cuh"
#include "params.h"

namespace deepkernels::quant {

constexpr int kGroup = 128;
constexpr int kWarpsPerBlock = 8;
// Each lane owns 4 consecutive elements of a 128-group, so one warp covers one group.
constexpr int kElemsPerLane = kGroup / 32;

template <typename T, bool kVectorized>
__device__ __forceinline__ void load_group_slice(const T* row, int64_t col, int64_t k, float (&v)[kElemsPerLane]) {
  if (kVectorized && col + kElemsPerLane <= k) {
    // 4 fp32 = 16 B; 4 bf16/fp16 = 8 B. Alignment is checked on the host.
    if constexpr (sizeof(T) == 4) {
      const float4 q = *reinterpret_cast<const float4*>(row + col);
      v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
      const uint2 q = *reinterpret_cast<const uint2*>(row + col);
#pragma unroll
      for (int i = 0; i < kElemsPerLane; ++i) v[i] = half_bits_to_float<T>(i < 2 ? q.x : q.y, i % 2);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i) v[i] = (col + i < k) ? to_float<T>(row[col + i]) : 0.0f;
  }
}

template <typename T, bool kVectorized>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
per_token_cast_to_fp8_kernel(PerTokenCastParams p) {
  const int64_t groups_per_row = ceil_div<int64_t>(p.k, kGroup);
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (group >= p.m * groups_per_row) return;
  const int64_t row = group / groups_per_row;
  const int64_t col = (group % groups_per_row) * kGroup + lane * kElemsPerLane;

  const T* x_row = static_cast<const T*>(p.x) + row * p.x_row_stride;
  float v[kElemsPerLane];
  load_group_slice<T, kVectorized>(x_row, col, p.k, v);

  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kElemsPerLane; ++i) amax = nan_propagating_absmax(amax, v[i]);
  amax = warp_reduce_max(amax);
  amax = isnan(amax) ? amax : fmaxf(amax, kFp8AmaxClamp);
  const float inv_scale = fp8_inv_scale(amax);

  uint8_t q[kElemsPerLane];
#pragma unroll
  for (int i = 0; i < kElemsPerLane; ++i) q[i] = float_to_e4m3(v[i] * inv_scale);
  uint8_t* out_row = p.out + row * p.k;
  if (kVectorized && col + kElemsPerLane <= p.k) {
    *reinterpret_cast<uint32_t*>(out_row + col) =
        q[0] | (uint32_t(q[1]) << 8) | (uint32_t(q[2]) << 16) | (uint32_t(q[3]) << 24);
  } else {
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i)
      if (col + i < p.k) out_row[col + i] = q[i];
  }
  if (lane == 0) p.scale[group] = amax / kFp8E4m3Max;
}

constexpr int kBlockThreads = 256;
constexpr int kBlockRowsPerPass = kBlockThreads / 32;

// One CTA per 128x128 block: a warp per row, 4 columns per lane; two passes over the block
// (amax, then cast) -- the second pass is served from L1/L2.
template <typename T>
__global__ void __launch_bounds__(kBlockThreads) per_block_cast_to_fp8_kernel(PerBlockCastParams p) {
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kGroup;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kGroup + (threadIdx.x % 32) * kElemsPerLane;
  const int warp = threadIdx.x / 32;
  const T* w = static_cast<const T*>(p.w);

  float amax = 0.0f;
  for (int r = warp; r < kGroup; r += kBlockRowsPerPass) {
    const int64_t row = row0 + r;
    if (row >= p.n) break;
    float v[kElemsPerLane];
    load_group_slice<T, false>(w + row * p.w_row_stride, col, p.k, v);
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i) amax = nan_propagating_absmax(amax, v[i]);
  }
  amax = warp_reduce_max(amax);
  __shared__ float warp_amax[kBlockRowsPerPass];
  if (threadIdx.x % 32 == 0) warp_amax[warp] = amax;
  __syncthreads();
  amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kBlockRowsPerPass; ++i) amax = nan_propagating_absmax(amax, warp_amax[i]);
  amax = isnan(amax) ? amax : fmaxf(amax, kFp8AmaxClamp);
  const float inv_scale = fp8_inv_scale(amax);

  for (int r = warp; r < kGroup; r += kBlockRowsPerPass) {
    const int64_t row = row0 + r;
    if (row >= p.n) break;
    float v[kElemsPerLane];
    load_group_slice<T, false>(w + row * p.w_row_stride, col, p.k, v);
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i)
      if (col + i < p.k) p.out[row * p.k + col + i] = float_to_e4m3(v[i] * inv_scale);
  }
  if (threadIdx.x == 0) p.scale[blockIdx.y * gridDim.x + blockIdx.x] = amax / kFp8E4m3Max;
}

template <typename T>
__global__ void cast_from_fp8_kernel(DequantParams p) {
  const int64_t groups_per_row = ceil_div<int64_t>(p.k, kGroup);
  const int64_t total = p.rows * p.k;
  T* out = static_cast<T*>(p.out);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / p.k, col = i % p.k;
    const float s = p.scale[(row / p.rows_per_scale) * groups_per_row + col / kGroup];
    out[i] = from_float<T>(e4m3_to_float(p.x[i]) * s);
  }
}

}  // namespace deepkernels::quant
