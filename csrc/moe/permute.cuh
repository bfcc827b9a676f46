#pragma once
#include <cstdint>
#include "../common/fp8.cuh"
#include "config.h"
#include "params.h"

namespace deepkernels::moe {

// ---------------------------------------------------------------------------------------------
// Row gather: one warp per output row, V-wide copies (uint4 = 16 B when the row allows it),
// four independent loads in flight per lane before their stores.
template <typename V> __device__ __forceinline__ V load_nc(const V* p) { return __ldg(p); }

// All bits set: NaN in every float dtype (fp32/bf16/fp16/e4m3), -1 in the integer ones.
template <typename V> __device__ __forceinline__ V poison_bits() {
  if constexpr (sizeof(V) == 16) {
    return make_uint4(~0u, ~0u, ~0u, ~0u);
  } else {
    return static_cast<V>(~V{});
  }
}

// A trusted index outside [-1, n): never dereferenced; its output is poisoned (NaN) instead.
__device__ __forceinline__ bool bad_index(int64_t i, int64_t n) { return i < -1 || i >= n; }

template <typename V>
__global__ void __launch_bounds__(kThreads) permute_kernel(PermuteParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.num_out) return;
  const int32_t src = __ldg(p.src_idx + row);
  const int64_t n = p.row_bytes / static_cast<int64_t>(sizeof(V));
  V* __restrict__ dst = reinterpret_cast<V*>(static_cast<char*>(p.out) + row * p.row_bytes);
  if (src < 0 || src >= p.num_src) {
    if (src == -1 && p.skip_empty) return;
    const V fill = bad_index(src, p.num_src) ? poison_bits<V>() : V{};
    for (int64_t i = lane; i < n; i += 32) dst[i] = fill;
    return;
  }
  const V* __restrict__ s = reinterpret_cast<const V*>(static_cast<const char*>(p.x) + src * p.row_bytes);
  constexpr int kUnroll = 4;
  for (int64_t base = lane; base < n; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * 32 < n) v[u] = load_nc(s + base + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * 32 < n) dst[base + u * 32] = v[u];
  }
}

// ---------------------------------------------------------------------------------------------
// 8 consecutive elements per lane. kVec: hidden % 8 == 0 and 16-byte aligned rows, so one uint4
// (bf16/fp16) or two float4 (fp32) per lane; otherwise element loads with bounds checks.
// A null row reads as zeros.
template <typename T, bool kVec>
__device__ __forceinline__ void load8(const T* row, int64_t col, int64_t hidden, float (&v)[kElemsPerLane]) {
  if (row == nullptr || col >= hidden) {
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i) v[i] = 0.0f;
    return;
  }
  if constexpr (kVec) {
    if constexpr (sizeof(T) == 4) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(row + col));
      const float4 b = __ldg(reinterpret_cast<const float4*>(row + col) + 1);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
      const uint4 q = __ldg(reinterpret_cast<const uint4*>(row + col));
#pragma unroll
      for (int i = 0; i < kElemsPerLane; ++i) v[i] = half_bits_to_float<T>(word_of(q, i / 2), i % 2);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i) v[i] = (col + i < hidden) ? to_float<T>(row[col + i]) : 0.0f;
  }
}

template <typename T, bool kVec>
__device__ __forceinline__ void store8(T* row, int64_t col, int64_t hidden, const float (&v)[kElemsPerLane]) {
  if (col >= hidden) return;
  if constexpr (kVec) {
    if constexpr (sizeof(T) == 4) {
      reinterpret_cast<float4*>(row + col)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(row + col)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
      uint32_t w[4];
#pragma unroll
      for (int i = 0; i < 4; ++i)
        w[i] = float_to_half_bits<T>(v[2 * i]) | (float_to_half_bits<T>(v[2 * i + 1]) << 16);
      *reinterpret_cast<uint4*>(row + col) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i)
      if (col + i < hidden) row[col + i] = from_float<T>(v[i]);
  }
}

// ---------------------------------------------------------------------------------------------
// Gather + per-token fp8 quantisation: one warp per output row, 256-element slabs, each half-warp
// owning one 128-group (amax reduced over 16 lanes). Two slabs are loaded before either is
// quantised, so each lane keeps two 16-byte loads in flight. Same numerics as
// per_token_cast_to_fp8: scale = max(amax, 1e-4) / 448, q = rne(x * (448 / amax)).
template <bool kVec>
__device__ __forceinline__ void quantize_store_slab(const float (&v)[kElemsPerLane], int64_t base, int lane,
                                                    int64_t hidden, int64_t groups, uint8_t* out, float* scale) {
  const int64_t col = base + lane * kElemsPerLane;
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kElemsPerLane; ++i) amax = nan_propagating_absmax(amax, v[i]);
#pragma unroll
  for (int offset = 8; offset > 0; offset >>= 1)
    amax = nan_propagating_absmax(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  amax = isnan(amax) ? amax : fmaxf(amax, kFp8AmaxClamp);
  const float inv_scale = fp8_inv_scale(amax);
  uint8_t q[kElemsPerLane];
#pragma unroll
  for (int i = 0; i < kElemsPerLane; ++i) q[i] = float_to_e4m3(v[i] * inv_scale);
  if (col < hidden) {
    if constexpr (kVec) {
      uint2 packed;
      packed.x = q[0] | (uint32_t(q[1]) << 8) | (uint32_t(q[2]) << 16) | (uint32_t(q[3]) << 24);
      packed.y = q[4] | (uint32_t(q[5]) << 8) | (uint32_t(q[6]) << 16) | (uint32_t(q[7]) << 24);
      *reinterpret_cast<uint2*>(out + col) = packed;
    } else {
#pragma unroll
      for (int i = 0; i < kElemsPerLane; ++i)
        if (col + i < hidden) out[col + i] = q[i];
    }
  }
  const int64_t group = (base + (lane / 16) * kGroup) / kGroup;
  if (lane % 16 == 0 && group < groups) scale[group] = amax / kFp8E4m3Max;
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) permute_fp8_kernel(PermuteFp8Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.num_out) return;
  const int32_t src = __ldg(p.src_idx + row);
  const bool poison = bad_index(src, p.num_src);
  const T* x = src >= 0 && !poison ? static_cast<const T*>(p.x) + static_cast<int64_t>(src) * p.hidden : nullptr;
  uint8_t* out = p.out + row * p.hidden;
  const int64_t groups = ceil_div<int64_t>(p.hidden, kGroup);
  float* scale = p.scale + row * groups;

  for (int64_t base = 0; base < p.hidden; base += 2 * kSlab) {
    float v0[kElemsPerLane], v1[kElemsPerLane];
    load8<T, kVec>(x, base + lane * kElemsPerLane, p.hidden, v0);
    load8<T, kVec>(x, base + kSlab + lane * kElemsPerLane, p.hidden, v1);
    if (poison) {
#pragma unroll
      for (int i = 0; i < kElemsPerLane; ++i) v0[i] = v1[i] = __int_as_float(0x7fffffff);
    }
    quantize_store_slab<kVec>(v0, base, lane, p.hidden, groups, out, scale);
    if (base + kSlab < p.hidden) quantize_store_slab<kVec>(v1, base + kSlab, lane, p.hidden, groups, out, scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Un-permute + reduce: one warp per token. Lane l holds pos[t, j0 + l] / w[t, j0 + l] of a chunk of 32
// slots (the first chunk loaded once, later ones re-read per slab: K > 32 is rare). For each slab the
// warp walks j two at a time (both rows' loads issued before either is accumulated; warp-uniform skips
// of pos < 0) and accumulates w * y in fp32 in j order with explicit mul-then-add (no FMA contraction),
// exactly as the reference does.
__device__ __forceinline__ void load_slot(const UnpermuteReduceParams& p, int64_t t, int j, int& pos, float& w) {
  pos = -1;
  w = 1.0f;
  if (j < p.topk) {
    pos = __ldg(p.pos + t * p.topk + j);
    if (p.weights != nullptr) w = __ldg(p.weights + t * p.topk + j);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) unpermute_reduce_kernel(UnpermuteReduceParams p) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (t >= p.num_tokens) return;
  int my_pos;
  float my_w;
  load_slot(p, t, lane, my_pos, my_w);
  const T* y = static_cast<const T*>(p.y);
  T* out = static_cast<T*>(p.out) + t * p.hidden;
  // pos is trusted: a token with an index outside [-1, num_rows) reads nothing and gets a NaN row.
  int bad = lane < p.topk && bad_index(my_pos, p.num_rows);
  for (int j0 = kSlotsPerChunk; j0 < p.topk; j0 += kSlotsPerChunk) {
    int q;
    float unused;
    load_slot(p, t, j0 + lane, q, unused);
    bad |= j0 + lane < p.topk && bad_index(q, p.num_rows);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) bad |= __shfl_xor_sync(0xffffffffu, bad, offset);
  if (bad) {
    float nan8[kElemsPerLane];
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i) nan8[i] = __int_as_float(0x7fffffff);
    for (int64_t base = 0; base < p.hidden; base += kSlab)
      store8<T, kVec>(out, base + lane * kElemsPerLane, p.hidden, nan8);
    return;
  }
  for (int64_t base = 0; base < p.hidden; base += kSlab) {
    const int64_t col = base + lane * kElemsPerLane;
    float acc[kElemsPerLane];
#pragma unroll
    for (int i = 0; i < kElemsPerLane; ++i) acc[i] = 0.0f;
    for (int j0 = 0; j0 < p.topk; j0 += kSlotsPerChunk) {
      int c_pos = my_pos;
      float c_w = my_w;
      if (j0 > 0) load_slot(p, t, j0 + lane, c_pos, c_w);
      const int n = p.topk - j0 < kSlotsPerChunk ? p.topk - j0 : kSlotsPerChunk;
      for (int j = 0; j < n; j += 2) {
        const int p0 = __shfl_sync(0xffffffffu, c_pos, j);
        const float w0 = __shfl_sync(0xffffffffu, c_w, j);
        const int p1_raw = __shfl_sync(0xffffffffu, c_pos, (j + 1) & 31);
        const float w1 = __shfl_sync(0xffffffffu, c_w, (j + 1) & 31);
        const int p1 = j + 1 < n ? p1_raw : -1;
        float v0[kElemsPerLane], v1[kElemsPerLane];
        load8<T, kVec>(p0 >= 0 ? y + static_cast<int64_t>(p0) * p.hidden : nullptr, col, p.hidden, v0);
        load8<T, kVec>(p1 >= 0 ? y + static_cast<int64_t>(p1) * p.hidden : nullptr, col, p.hidden, v1);
        if (p0 >= 0) {
#pragma unroll
          for (int i = 0; i < kElemsPerLane; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w0, v0[i]));
        }
        if (p1 >= 0) {
#pragma unroll
          for (int i = 0; i < kElemsPerLane; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(w1, v1[i]));
        }
      }
    }
    store8<T, kVec>(out, col, p.hidden, acc);
  }
}

}  // namespace deepkernels::moe
