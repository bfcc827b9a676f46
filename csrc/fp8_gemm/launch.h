#pragma once
#include <cuda_runtime.h>
#include "params.h"

namespace deepkernels::fp8_gemm {

// Runs params.mode on the stream with the portable mma.sync kernel (any sm_80+ GPU).
void launch_fp8_gemm(const GemmParams& params, cudaStream_t stream);

}  // namespace deepkernels::fp8_gemm
