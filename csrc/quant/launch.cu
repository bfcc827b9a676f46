#include "../common/launch.cuh"
#include "../common/dtype_dispatch.cuh"
#include "cast.cuh"
#include "launch.h"

namespace deepkernels::quant {

namespace {

int element_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace

bool per_token_cast_is_vectorizable(const PerTokenCastParams& p) {
  const int64_t vec_bytes = kElemsPerLane * element_size(p.x_dtype);
  return reinterpret_cast<uintptr_t>(p.x) % vec_bytes == 0 && p.x_row_stride % kElemsPerLane == 0 &&
         p.k % kElemsPerLane == 0 && reinterpret_cast<uintptr_t>(p.out) % 4 == 0;
}

void per_token_cast_to_fp8(const PerTokenCastParams& p, cudaStream_t stream) {
  const int64_t groups = p.m * ceil_div<int64_t>(p.k, kGroup);
  if (groups == 0) return;
  const dim3 block(kWarpsPerBlock * 32);
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(groups, kWarpsPerBlock)));
  const bool vectorized = per_token_cast_is_vectorizable(p);
  dispatch_float_dtype(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vectorized) launch_kernel<per_token_cast_to_fp8_kernel<T, true>>(grid, block, 0, stream, p);
    else launch_kernel<per_token_cast_to_fp8_kernel<T, false>>(grid, block, 0, stream, p);
  });
}

void per_block_cast_to_fp8(const PerBlockCastParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.k == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.k, kGroup)),
                  static_cast<unsigned>(ceil_div<int64_t>(p.n, kGroup)));
  dispatch_float_dtype(p.w_dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_kernel<per_block_cast_to_fp8_kernel<T>>(grid, kBlockThreads, 0, stream, p);
  });
}

void cast_from_fp8(const DequantParams& p, cudaStream_t stream) {
  const int64_t total = p.rows * p.k;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div<int64_t>(total, kThreads);
  const dim3 grid(static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8));
  dispatch_float_dtype(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_kernel<cast_from_fp8_kernel<T>>(grid, kThreads, 0, stream, p);
  });
}

}  // namespace deepkernels::quant
