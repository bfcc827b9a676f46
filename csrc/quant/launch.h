#pragma once
#include <cuda_runtime.h>
#include "params.h"

namespace deepkernels::quant {

void per_token_cast_to_fp8(const PerTokenCastParams& params, cudaStream_t stream);
void per_block_cast_to_fp8(const PerBlockCastParams& params, cudaStream_t stream);
void cast_from_fp8(const DequantParams& params, cudaStream_t stream);

// True when x can be read with 16-byte vector loads by the per-token kernel.
bool per_token_cast_is_vectorizable(const PerTokenCastParams& params);

}  // namespace deepkernels::quant
