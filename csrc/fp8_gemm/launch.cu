#include <cstdlib>
#include <cstring>

#include "launch.h"
#include "portable.cuh"
#include "sm90.cuh"

namespace deepkernels::fp8_gemm {

namespace {

// The Hopper wgmma kernel is opt-in (DEEPKERNELS_GEMM_SM90=1) until a GPU session validates it.
bool use_sm90(cudaStream_t) {
  const char* flag = std::getenv("DEEPKERNELS_GEMM_SM90");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  return major == 9 && minor == 0;
}

template <template <GemmMode> class Launcher>
void dispatch_mode(const GemmParams& p, dim3 grid_xy, cudaStream_t stream) {
  switch (p.mode) {
    case GemmMode::kDense: Launcher<GemmMode::kDense>::run(p, grid_xy, stream); break;
    case GemmMode::kGroupedContiguous: Launcher<GemmMode::kGroupedContiguous>::run(p, grid_xy, stream); break;
    case GemmMode::kGroupedMasked:
      Launcher<GemmMode::kGroupedMasked>::run(p, dim3(grid_xy.x, grid_xy.y, static_cast<unsigned>(p.groups)), stream);
      break;
  }
}

template <GemmMode kMode>
struct PortableLauncher {
  static void run(const GemmParams& p, dim3 grid, cudaStream_t stream) {
    portable::fp8_gemm_portable_kernel<kMode><<<grid, portable::kThreads, 0, stream>>>(p);
  }
};

template <GemmMode kMode>
struct Sm90Launcher {
  static void run(const GemmParams& p, dim3 grid, cudaStream_t stream) {
    sm90::fp8_gemm_sm90_kernel<kMode><<<grid, sm90::kThreads, 0, stream>>>(p);
  }
};

}  // namespace

void launch_fp8_gemm(const GemmParams& p, cudaStream_t stream) {
  // Contiguous with no groups still writes its (all padding) rows as zeros.
  if (p.m == 0 || p.n == 0 || (p.groups == 0 && p.mode != GemmMode::kGroupedContiguous)) return;
  static_assert(portable::kBlockM == sm90::kBlockM && portable::kBlockN == sm90::kBlockN, "one grid for both");
  const dim3 grid(static_cast<unsigned>((p.n + portable::kBlockN - 1) / portable::kBlockN),
                  static_cast<unsigned>((p.m + portable::kBlockM - 1) / portable::kBlockM), 1);
  if (use_sm90(stream)) dispatch_mode<Sm90Launcher>(p, grid, stream);
  else dispatch_mode<PortableLauncher>(p, grid, stream);
}

}  // namespace deepkernels::fp8_gemm
