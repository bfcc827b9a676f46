#pragma once
#include <cstdint>

namespace deepkernels::fp8_gemm {

// Which of the three ops a launch computes (the kernels share one body).
enum class GemmMode : int { kDense = 0, kGroupedContiguous = 1, kGroupedMasked = 2 };

// out[g][i][j] = sum_k a[g][i][k] * a_scale[g][i][k/128] * b[g][j][k] * b_scale[g][j/128][k/128]
// (fp32 accumulation, bf16 out). All operands row-major with unit stride along K / N:
//   a        e4m3 [.., m, k]   row stride k bytes, group stride a_group_stride
//   a_scale  fp32 [.., m, ceil(k/128)] at a_scale[g*sa_group_stride + i*sa_row_stride + kb*sa_col_stride]
//            (row-major: sa_row_stride = ceil(k/128), sa_col_stride = 1; DeepGEMM's column-major
//            TMA-aligned layout: sa_row_stride = 1, sa_col_stride = aligned m)
//   b        e4m3 [groups, n, k],  b_scale fp32 [groups, ceil(n/128), ceil(k/128)] contiguous
//   out      bf16 [.., m, n] contiguous (group stride out_group_stride)
// Dense: groups = 1, strides of the group dims unused. Contiguous grouped: a/out are [m, ..] (no group
// dim), row i uses b[m_indices[i]], m_indices[i] == -1 writes a zero row. Masked: a/out [groups, m, ..],
// only rows i < masked_m[g] are written (read on the device).
// Requires k % 16 == 0, n % 16 == 0, a/b 16-byte aligned (a_group_stride, k multiples of 16).
struct GemmParams {
  const uint8_t* a;
  const float* a_scale;
  const uint8_t* b;
  const float* b_scale;
  uint16_t* out;  // bf16 bits
  int m, n, k, groups;
  int64_t a_group_stride, sa_group_stride, sa_row_stride, sa_col_stride, out_group_stride;
  const int* m_indices;  // contiguous mode
  const int* masked_m;   // masked mode
  GemmMode mode;
};

}  // namespace deepkernels::fp8_gemm
