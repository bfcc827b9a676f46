#include <cstdlib>
#include <cstring>

#include "gemm_portable.cuh"
#include "launch.h"
#include "sm90.cuh"

namespace deepkernels::fp8_gemm {

namespace {

// The sm_90a wgmma kernel is opt-in (DEEPKERNELS_GEMM_SM90=1) until a GPU session validates it.
bool use_sm90() {
  const char* flag = std::getenv("DEEPKERNELS_GEMM_SM90");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

void launch_sm90(const Fp8GemmParams& p, dim3 grid, cudaStream_t stream) {
  static_assert(sm90::kBlockM == kBlockM && sm90::kBlockN == kBlockN, "one grid for both kernels");
  switch (p.mode) {
    case GemmMode::kDense: sm90::fp8_gemm_sm90_kernel<GemmMode::kDense><<<grid, sm90::kThreads, 0, stream>>>(p); break;
    case GemmMode::kGroupedContiguous:
      sm90::fp8_gemm_sm90_kernel<GemmMode::kGroupedContiguous><<<grid, sm90::kThreads, 0, stream>>>(p);
      break;
    case GemmMode::kGroupedMasked:
      sm90::fp8_gemm_sm90_kernel<GemmMode::kGroupedMasked><<<grid, sm90::kThreads, 0, stream>>>(p);
      break;
  }
}

}  // namespace

void fp8_gemm_nt(const Fp8GemmParams& p, cudaStream_t stream) {
  // A contiguous call with no groups still writes its rows (all padding) as zeros.
  if (p.m == 0 || p.n == 0 || (p.num_groups == 0 && p.mode != GemmMode::kGroupedContiguous)) return;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kBlockN)), static_cast<unsigned>(ceil_div(p.m, kBlockM)),
                  static_cast<unsigned>(p.mode == GemmMode::kGroupedMasked ? p.num_groups : 1));
  if (use_sm90()) launch_sm90(p, grid, stream);
  else fp8_gemm_nt_portable_kernel<<<grid, kThreads, 0, stream>>>(p);
}

}  // namespace deepkernels::fp8_gemm
