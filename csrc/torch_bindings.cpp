// The one translation unit that includes torch: turns tensors into the kernels' params structs
// and registers the CUDA implementations of the ops whose schemas deepkernels/*.py defines.
// Full argument checks with readable messages live in Python; the TORCH_CHECKs here are the cheap
// guard for callers that reach torch.ops.deepkernels directly.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/dtype.h"
#include "quant/launch.h"

namespace {

using deepkernels::DType;

DType to_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kFloat8_e4m3fn: return DType::kFloat8E4M3;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
}

void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }

// ---------------------------------------------------------------------------------------------
// quant: per-token / per-block fp8 casts

std::tuple<at::Tensor, at::Tensor> per_token_cast_to_fp8(const at::Tensor& x) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected 2 dims [M, K], got ", x.sizes());
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, "x: expected unit stride along K, got strides ", x.strides());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  auto out = at::empty({m, k}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty({m, (k + 127) / 128}, x.options().dtype(at::kFloat));
  deepkernels::quant::PerTokenCastParams p{x.data_ptr(), to_dtype(x.scalar_type(), "x"), x.stride(0),
                                          static_cast<uint8_t*>(out.data_ptr()), scale.data_ptr<float>(), m, k};
  deepkernels::quant::per_token_cast_to_fp8(p, at::cuda::getCurrentCUDAStream());
  check_launch();
  return {out, scale};
}

std::tuple<at::Tensor, at::Tensor> per_block_cast_to_fp8(const at::Tensor& w) {
  check_cuda(w, "w");
  TORCH_CHECK(w.dim() == 2, "w: expected 2 dims [N, K], got ", w.sizes());
  TORCH_CHECK(w.size(1) == 0 || w.stride(1) == 1, "w: expected unit stride along K, got strides ", w.strides());
  const c10::cuda::CUDAGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1);
  auto out = at::empty({n, k}, w.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty({(n + 127) / 128, (k + 127) / 128}, w.options().dtype(at::kFloat));
  deepkernels::quant::PerBlockCastParams p{w.data_ptr(), to_dtype(w.scalar_type(), "w"), w.stride(0),
                                          static_cast<uint8_t*>(out.data_ptr()), scale.data_ptr<float>(), n, k};
  deepkernels::quant::per_block_cast_to_fp8(p, at::cuda::getCurrentCUDAStream());
  check_launch();
  return {out, scale};
}

at::Tensor cast_from_fp8(const at::Tensor& x, const at::Tensor& scale, int64_t rows_per_scale,
                         at::ScalarType out_dtype) {
  check_cuda(x, "x");
  check_cuda(scale, "scale");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: expected a contiguous 2-D tensor, got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat8_e4m3fn, "x: expected float8_e4m3fn, got ", x.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale: expected contiguous float32");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == (rows + rows_per_scale - 1) / rows_per_scale &&
                  scale.size(1) == (k + 127) / 128,
              "scale: shape ", scale.sizes(), " does not match x ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = at::empty({rows, k}, x.options().dtype(out_dtype));
  deepkernels::quant::DequantParams p{static_cast<const uint8_t*>(x.data_ptr()), scale.data_ptr<float>(),
                                     out.data_ptr(), to_dtype(out_dtype, "out_dtype"), rows, k,
                                     static_cast<int>(rows_per_scale)};
  deepkernels::quant::cast_from_fp8(p, at::cuda::getCurrentCUDAStream());
  check_launch();
  return out;
}

at::Tensor per_token_cast_from_fp8(const at::Tensor& x, const at::Tensor& scale, at::ScalarType out_dtype) {
  return cast_from_fp8(x, scale, 1, out_dtype);
}

at::Tensor per_block_cast_from_fp8(const at::Tensor& x, const at::Tensor& scale, at::ScalarType out_dtype) {
  return cast_from_fp8(x, scale, 128, out_dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(deepkernels, CUDA, m) {
  m.impl("per_token_cast_to_fp8", &per_token_cast_to_fp8);
  m.impl("per_block_cast_to_fp8", &per_block_cast_to_fp8);
  m.impl("per_token_cast_from_fp8", &per_token_cast_from_fp8);
  m.impl("per_block_cast_from_fp8", &per_block_cast_from_fp8);
}

// ---------------------------------------------------------------------------------------------
// fp8_gemm (issue 4): bindings and TORCH_LIBRARY_IMPL block go below this line.



// ---------------------------------------------------------------------------------------------
// mla_decode (issue 5): bindings and TORCH_LIBRARY_IMPL block go below this line.



// ---------------------------------------------------------------------------------------------
// moe (issue 6): bindings and TORCH_LIBRARY_IMPL block go below this line.



// ---------------------------------------------------------------------------------------------
// The extension module itself carries no Python functions: importing it runs the registrations.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
