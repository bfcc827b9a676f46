#pragma once
#include <cstdint>

namespace deepkernels::fp8_gemm {

enum class GemmMode : int { kDense = 0, kGroupedContiguous = 1, kGroupedMasked = 2 };

// out = (a * a_scale) @ (b * b_scale)^T per group. Strides are in elements.
//   a        e4m3 [groups?, m, k], unit stride along k
//   a_scale  fp32 [groups?, m, ceil(k/128)], any row/col strides (row-major or DeepGEMM's column-major)
//   b        e4m3 [groups?, n, k] contiguous
//   b_scale  fp32 [groups?, ceil(n/128), ceil(k/128)] contiguous
//   out      bf16 [groups?, m, n], unit stride along n
// Dense: groups = 1. Contiguous: a/a_scale/out are not grouped; m_indices[m] picks b's group, -1 = zero row.
// Masked: a/a_scale/out grouped; only the first masked_m[g] rows of group g are computed and written.
struct Fp8GemmParams {
  GemmMode mode;
  const uint8_t* a;
  int64_t a_row_stride, a_group_stride;
  const float* a_scale;
  int64_t a_scale_row_stride, a_scale_col_stride, a_scale_group_stride;
  const uint8_t* b;
  const float* b_scale;
  void* out;
  int64_t out_row_stride, out_group_stride;
  int m, n, k, num_groups;
  int expected_m;  // masked: typical rows per group (tile-shape hint only, 0 = unknown)
  const int* m_indices;
  const int* masked_m;
};

}  // namespace deepkernels::fp8_gemm
