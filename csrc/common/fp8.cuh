#pragma once
// fp8 / bf16 conversion helpers shared by every kernel family. CUDA headers only.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cstdint>

namespace deepkernels {

// 448 is the largest finite e4m3 (fn) value.
constexpr float kFp8E4m3Max = 448.0f;
// amax is clamped from below so an all-zero group gets a finite, non-zero scale.
constexpr float kFp8AmaxClamp = 1e-4f;

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// 448 / amax as the references compute it (and DeepGEMM's): in torch, `448 / amax` on a tensor is
// amax.reciprocal() * 448, two correctly rounded steps; one division differs in the last bit, which moves
// values that land on a rounding tie of e4m3 to the other neighbour.
__device__ __forceinline__ float fp8_inv_scale(float amax) { return __fmul_rn(__frcp_rn(amax), kFp8E4m3Max); }

// 16-bit floats packed in 32-bit words (element i of a word: bits 16i..16i+15, the memory order) with shifts
// and the bit-cast intrinsics, never a pointer cast: the same registers on the GPU, and defined C++ for
// the host compiler of the emulator, whose type-based alias analysis miscompiles pointer-cast punning.
template <typename T> __device__ __forceinline__ float half_bits_to_float(uint32_t word, int i);
template <> __device__ __forceinline__ float half_bits_to_float<__nv_bfloat16>(uint32_t word, int i) {
  return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(word >> (16 * i))));
}
template <> __device__ __forceinline__ float half_bits_to_float<__half>(uint32_t word, int i) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(word >> (16 * i))));
}
template <typename T> __device__ __forceinline__ uint32_t float_to_half_bits(float v);
template <> __device__ __forceinline__ uint32_t float_to_half_bits<__nv_bfloat16>(float v) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
template <> __device__ __forceinline__ uint32_t float_to_half_bits<__half>(float v) {
  return __half_as_ushort(__float2half_rn(v));
}
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return uint32_t{__bfloat16_as_ushort(v.x)} | (uint32_t{__bfloat16_as_ushort(v.y)} << 16);
}
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Round-to-nearest-even, saturating to +-448; NaN stays NaN (matches torch's .to(float8_e4m3fn)
// for every value the cast kernels produce, which are bounded by 448 in magnitude or NaN).
__device__ __forceinline__ uint8_t float_to_e4m3(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float e4m3_to_float(uint8_t v) {
  __half_raw h = __nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(v), __NV_E4M3);
  return __half2float(__half(h));
}

// fmaxf drops NaN; the quantisers must propagate it so a corrupt group is visible in its scale.
__device__ __forceinline__ float nan_propagating_absmax(float a, float b) {
  return (isnan(a) || isnan(b)) ? __int_as_float(0x7fffffff) : fmaxf(a, fabsf(b));
}

__device__ __forceinline__ float warp_reduce_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = nan_propagating_absmax(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) { return (a + b - 1) / b; }

}  // namespace deepkernels
