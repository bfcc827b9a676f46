#pragma once
// Every kernel launch goes through launch_kernel, so one launcher serves the CUDA build and the SIMT
// emulator (csrc/emulator), which runs the same launch code with CPU fibers as threads.
#include <cuda_runtime.h>

namespace deepkernels {

template <auto kKernel, typename... Args>
inline void launch_kernel(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, const Args&... args) {
#ifdef DEEPKERNELS_EMULATOR
  emu::launch<kKernel>(grid, block, smem_bytes, stream, args...);
#else
  kKernel<<<grid, block, smem_bytes, stream>>>(args...);
#endif
}

}  // namespace deepkernels
