#pragma once
#include <cstdint>
#include "../common/dtype.h"

namespace deepkernels::quant {

// x[m, k] (row stride in elements, unit column stride) -> e4m3 out[m, k] (contiguous) and
// fp32 scale[m, ceil(k/128)] (contiguous): one scale per 1x128 group of a row.
struct PerTokenCastParams {
  const void* x;
  DType x_dtype;
  int64_t x_row_stride;
  uint8_t* out;
  float* scale;
  int64_t m, k;
};

// w[n, k] -> e4m3 out[n, k] and fp32 scale[ceil(n/128), ceil(k/128)]: one scale per 128x128 block.
struct PerBlockCastParams {
  const void* w;
  DType w_dtype;
  int64_t w_row_stride;
  uint8_t* out;
  float* scale;
  int64_t n, k;
};

// Inverse of the two casts: out[rows, k] = e4m3 x * scale of its group, in out_dtype (contiguous).
// rows_per_scale is 1 for the per-token layout and 128 for the per-block layout.
struct DequantParams {
  const uint8_t* x;
  const float* scale;
  void* out;
  DType out_dtype;
  int64_t rows, k;
  int rows_per_scale;
};

}  // namespace deepkernels::quant
