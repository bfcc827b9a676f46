#pragma once
#include <cstddef>
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
  // Split-K (sm_90a, every mode, see heuristic.h): fp32 [split_k, m, n] partial sums ([split_k, groups, m, n] for
  // masked), reduced in a second launch. Set by the caller from fp8_gemm_workspace_bytes(); nullptr / 0 when no
  // plan needs it.
  float* workspace;
  size_t workspace_bytes;
  // Filled in by the launcher from its plan (the kernel reads them); callers leave them 0.
  int split_k, stages;
  int overlap;  // 1: two accumulator sets, the promotion of K block kb - 1 overlaps kb's wgmmas (wait<1>)
  int tma_store;  // 1: bf16 tiles go through shared memory and a TMA store (sm90.cuh), overlapping the next tile
};

}  // namespace deepkernels::fp8_gemm

namespace deepkernels::fp8_gemm {

// Weight-gradient GEMM: out += (a * a_scale) @ (b * b_scale)^T, fp32, both operands 1x128 per-row scaled
// along K (the token dimension in wgrad). Strides are in elements.
//   a        e4m3 [m, k], unit stride along k, rows 16-byte aligned
//   a_scale  fp32 [m, ceil(k/128)], any row/col strides
//   b        e4m3 [n, k], unit stride along k, rows 16-byte aligned
//   b_scale  fp32 [n, ceil(k/128)], any row/col strides
//   out      fp32 [m, n], unit stride along n: read and written (accumulated)
struct WgradGemmParams {
  const uint8_t* a;
  int64_t a_row_stride;
  const float* a_scale;
  int64_t a_scale_row_stride, a_scale_col_stride;
  const uint8_t* b;
  int64_t b_row_stride;
  const float* b_scale;
  int64_t b_scale_row_stride, b_scale_col_stride;
  float* out;
  int64_t out_row_stride;
  int m, n, k;
};

// K-grouped weight gradients in DeepGEMM's flat layout: group g multiplies the [m, ks[g]] block of a at
// element m * sum(ks[:g]) by the [n, ks[g]] block of b at n * sum(ks[:g]), with scales
// a_scale [sum(ceil(ks/128)), m] and b_scale [sum(ceil(ks/128)), n] (row j = one K block's scales of every
// row), accumulating into out[g] ([num_groups, m, n] contiguous). ks is a HOST array of num_groups ints.
struct KGroupedWgradGemmParams {
  const uint8_t* a;
  const float* a_scale;
  const uint8_t* b;
  const float* b_scale;
  float* out;
  int m, n, num_groups;
  const int64_t* ks;
};

}  // namespace deepkernels::fp8_gemm
