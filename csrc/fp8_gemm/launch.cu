#include "launch.h"
#include "portable.cuh"

namespace deepkernels::fp8_gemm {

void launch_fp8_gemm(const GemmParams& p, cudaStream_t stream) {
  using namespace portable;
  // Contiguous with no groups still writes its (all padding) rows as zeros.
  if (p.m == 0 || p.n == 0 || (p.groups == 0 && p.mode != GemmMode::kGroupedContiguous)) return;
  const unsigned m_tiles = static_cast<unsigned>((p.m + kBlockM - 1) / kBlockM);
  const unsigned n_tiles = static_cast<unsigned>((p.n + kBlockN - 1) / kBlockN);
  const dim3 block(kThreads);
  switch (p.mode) {
    case GemmMode::kDense:
      fp8_gemm_portable_kernel<GemmMode::kDense><<<dim3(n_tiles, m_tiles, 1), block, 0, stream>>>(p);
      break;
    case GemmMode::kGroupedContiguous:
      fp8_gemm_portable_kernel<GemmMode::kGroupedContiguous><<<dim3(n_tiles, m_tiles, 1), block, 0, stream>>>(p);
      break;
    case GemmMode::kGroupedMasked:
      fp8_gemm_portable_kernel<GemmMode::kGroupedMasked>
          <<<dim3(n_tiles, m_tiles, static_cast<unsigned>(p.groups)), block, 0, stream>>>(p);
      break;
  }
}

}  // namespace deepkernels::fp8_gemm
