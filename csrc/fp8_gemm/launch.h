#pragma once
#include <cuda_runtime.h>
#include "params.h"

namespace deepkernels::fp8_gemm {

// Launches the FP8 blockwise GEMM described by params (dense, grouped-contiguous or grouped-masked).
// Requirements checked by the caller: n % 16 == 0, k % 16 == 0, a rows and the a/b base pointers
// 16-byte aligned, out 4-byte aligned. No host synchronisation (masked_m and m_indices are read on the
// device). Returns nullptr once the kernel is enqueued, else why the opt-in sm_90a kernel
// (DEEPKERNELS_GEMM_SM90=1) cannot run on this build/device; nothing was launched then.
const char* fp8_gemm_nt(const Fp8GemmParams& params, cudaStream_t stream);

}  // namespace deepkernels::fp8_gemm
