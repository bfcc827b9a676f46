#pragma once
#include <cuda_runtime.h>
#include "params.h"

namespace deepkernels::moe {

void get_dispatch_layout(const LayoutParams& params, cudaStream_t stream);
void permute(const PermuteParams& params, cudaStream_t stream);
void permute_fp8(const PermuteFp8Params& params, cudaStream_t stream);
void unpermute_reduce(const UnpermuteReduceParams& params, cudaStream_t stream);
void pack_rows(const PackRowsParams& params, cudaStream_t stream);
void unpack_rows(const UnpackRowsParams& params, cudaStream_t stream);

}  // namespace deepkernels::moe
