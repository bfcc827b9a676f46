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

#include "fp8_gemm/launch.h"

namespace fp8_gemm_binding {

namespace fg = deepkernels::fp8_gemm;

void check_operand(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.is_cuda(), name, ": expected a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, ": expected ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, ": expected ", dim, " dims, got ", t.sizes());
}

// Fills everything but the mode-specific fields; a_scale may be row-major or column-major per group.
fg::GemmParams make_params(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                           const at::Tensor& b_scale, const at::Tensor& out, bool batched_a, fg::GemmMode mode) {
  const int64_t adim = batched_a ? 3 : 2;
  check_operand(a, "a", at::kFloat8_e4m3fn, adim);
  check_operand(a_scale, "a_scale", at::kFloat, adim);
  check_operand(b, "b", at::kFloat8_e4m3fn, mode == fg::GemmMode::kDense ? 2 : 3);
  check_operand(b_scale, "b_scale", at::kFloat, b.dim());
  check_operand(out, "out", at::kBFloat16, adim);
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && b_scale.is_contiguous() && out.is_contiguous(),
              "a, b, b_scale, out: expected contiguous tensors");
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-2);
  TORCH_CHECK(k % 16 == 0 && n % 16 == 0, "N and K must be multiples of 16, got N=", n, " K=", k);
  TORCH_CHECK(b.size(-1) == k && out.size(-2) == m && out.size(-1) == n, "a ", a.sizes(), ", b ", b.sizes(),
              ", out ", out.sizes(), ": inconsistent shapes");
  TORCH_CHECK(a_scale.size(-2) == m && a_scale.size(-1) == (k + 127) / 128, "a_scale: expected [.., ", m, ", ",
              (k + 127) / 128, "], got ", a_scale.sizes());
  TORCH_CHECK(a_scale.stride(-1) == 1 || a_scale.stride(-2) == 1 || a_scale.size(-1) == 1 || m <= 1,
              "a_scale: expected row-major or column-major layout, got strides ", a_scale.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(b.data_ptr()) % 16 == 0,
              "a, b: expected 16-byte aligned data");
  fg::GemmParams p{};
  p.a = static_cast<const uint8_t*>(a.data_ptr());
  p.a_scale = a_scale.data_ptr<float>();
  p.b = static_cast<const uint8_t*>(b.data_ptr());
  p.b_scale = b_scale.data_ptr<float>();
  p.out = reinterpret_cast<uint16_t*>(out.data_ptr());
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.groups = mode == fg::GemmMode::kDense ? 1 : static_cast<int>(b.size(0));
  p.a_group_stride = batched_a ? a.stride(0) : 0;
  p.sa_group_stride = batched_a ? a_scale.stride(0) : 0;
  p.sa_row_stride = a_scale.stride(-2);
  p.sa_col_stride = a_scale.stride(-1);
  p.out_group_stride = batched_a ? out.stride(0) : 0;
  p.mode = mode;
  return p;
}

void run(const fg::GemmParams& p, const at::Tensor& a) {
  const c10::cuda::CUDAGuard guard(a.device());
  fg::launch_fp8_gemm(p, at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void fp8_gemm_nt(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                 const at::Tensor& out) {
  run(make_params(a, a_scale, b, b_scale, out, false, fg::GemmMode::kDense), a);
}

void m_grouped_fp8_gemm_nt_contiguous(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                      const at::Tensor& b_scale, const at::Tensor& out, const at::Tensor& m_indices) {
  auto p = make_params(a, a_scale, b, b_scale, out, false, fg::GemmMode::kGroupedContiguous);
  check_operand(m_indices, "m_indices", at::kInt, 1);
  TORCH_CHECK(m_indices.is_contiguous() && m_indices.size(0) == a.size(0), "m_indices: expected contiguous [M]");
  p.m_indices = m_indices.data_ptr<int>();
  run(p, a);
}

void m_grouped_fp8_gemm_nt_masked(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                  const at::Tensor& b_scale, const at::Tensor& out, const at::Tensor& masked_m,
                                  int64_t expected_m) {
  (void)expected_m;  // a scheduling hint; the portable kernel launches every row tile and exits early
  auto p = make_params(a, a_scale, b, b_scale, out, true, fg::GemmMode::kGroupedMasked);
  check_operand(masked_m, "masked_m", at::kInt, 1);
  TORCH_CHECK(masked_m.is_contiguous() && masked_m.size(0) == b.size(0) && a.size(0) == b.size(0),
              "masked_m: expected contiguous [G] with G = a.size(0) = b.size(0)");
  p.masked_m = masked_m.data_ptr<int>();
  run(p, a);
}

}  // namespace fp8_gemm_binding

TORCH_LIBRARY_IMPL(deepkernels, CUDA, m) {
  m.impl("fp8_gemm_nt", &fp8_gemm_binding::fp8_gemm_nt);
  m.impl("m_grouped_fp8_gemm_nt_contiguous", &fp8_gemm_binding::m_grouped_fp8_gemm_nt_contiguous);
  m.impl("m_grouped_fp8_gemm_nt_masked", &fp8_gemm_binding::m_grouped_fp8_gemm_nt_masked);
}



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
