#pragma once
// Host-side switch from the runtime DType of a launch API to the CUDA element type of a kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "dtype.h"

namespace deepkernels {

// Calls f(T{}) for the floating types float, __nv_bfloat16 and __half; other dtypes are rejected on
// the host before any launch, so they fall through without a call.
template <typename F>
void dispatch_float_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kBFloat16: f(__nv_bfloat16{}); break;
    case DType::kFloat16: f(__half{}); break;
    default: break;
  }
}

}  // namespace deepkernels
