#include "gemm_portable.cuh"
#include "launch.h"

namespace deepkernels::fp8_gemm {

void fp8_gemm_nt(const Fp8GemmParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0 || p.num_groups == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kBlockN)), static_cast<unsigned>(ceil_div(p.m, kBlockM)),
                  static_cast<unsigned>(p.mode == GemmMode::kGroupedMasked ? p.num_groups : 1));
  fp8_gemm_nt_portable_kernel<<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace deepkernels::fp8_gemm
