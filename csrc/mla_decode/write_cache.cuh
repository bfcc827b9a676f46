#pragma once
// Write new 576-dim rows into the paged cache: one warp per (token, head). For an e4m3 cache the row
// is quantised with one scale: scale = max(amax, 1e-4) / 448, value = rne(x * (448 / amax)), matching
// deepkernels/mla.py write_mla_kv_cache_ref bit for bit (divisions are IEEE round-to-nearest).
#include "../common/fp8.cuh"
#include "config.h"
#include "params.h"

namespace deepkernels::mla {

constexpr int kWriteWarps = 4;
constexpr int kElemsPerLaneWrite = kHeadDim / 32;  // 18

template <typename T>
__global__ void __launch_bounds__(kWriteWarps * 32) mla_write_cache_kernel(const MlaWriteCacheParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWriteWarps + threadIdx.x / 32;
  if (item >= p.num_tokens * p.h_kv) return;
  const int64_t token = item / p.h_kv;
  const int head = static_cast<int>(item % p.h_kv);
  const int64_t slot = p.slot_mapping[token];
  // -1 skips (padding); any other slot outside [0, num_slots) is trusted not to occur (DEEPKERNELS_CHECK=1
  // validates slot_mapping) and is skipped rather than written out of bounds.
  if (slot < 0 || slot >= p.num_slots) return;
  const T* src = static_cast<const T*>(p.kv) + item * kHeadDim;
  const int64_t dst_row = slot * p.h_kv + head;  // [num_blocks * page, h_kv] rows of the contiguous cache

  float v[kElemsPerLaneWrite];
#pragma unroll
  for (int j = 0; j < kElemsPerLaneWrite; ++j) v[j] = to_float(src[lane + 32 * j]);
  if (!p.cache_fp8) {
    if (p.cache_fp16) {
      auto* dst = static_cast<__half*>(p.cache) + dst_row * kHeadDim;
#pragma unroll
      for (int j = 0; j < kElemsPerLaneWrite; ++j) dst[lane + 32 * j] = __float2half_rn(v[j]);
    } else {
      auto* dst = static_cast<__nv_bfloat16*>(p.cache) + dst_row * kHeadDim;
#pragma unroll
      for (int j = 0; j < kElemsPerLaneWrite; ++j) dst[lane + 32 * j] = __float2bfloat16_rn(v[j]);
    }
    return;
  }
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < kElemsPerLaneWrite; ++j) amax = nan_propagating_absmax(amax, v[j]);
  amax = warp_reduce_max(amax);
  amax = isnan(amax) ? amax : fmaxf(amax, kFp8AmaxClamp);  // a NaN row keeps a NaN scale, as torch does
  const float inv_scale = fp8_inv_scale(amax);
  auto* dst = static_cast<uint8_t*>(p.cache) + dst_row * kHeadDim;
#pragma unroll
  for (int j = 0; j < kElemsPerLaneWrite; ++j) dst[lane + 32 * j] = float_to_e4m3(__fmul_rn(v[j], inv_scale));
  if (lane == 0) p.cache_scale[dst_row] = __fdiv_rn(amax, kFp8E4m3Max);
}

}  // namespace deepkernels::mla
