// The one translation unit that includes torch: turns tensors into the kernels' params structs
// and registers the CUDA implementations of the ops whose schemas deepkernels/*.py defines.
// Full argument checks with readable messages live in Python; the TORCH_CHECKs here are the cheap
// guard for callers that reach torch.ops.deepkernels directly.
// Built twice: for CUDA (deepkernels._C), and with DEEPKERNELS_EMULATOR for the SIMT emulator
// (deepkernels._emu, csrc/emulator/torch_bindings_emu.cpp): the same checks and launch code, run on CPU
// tensors and registered as the CPU kernels of namespace deepkernels_emu.
#include <Python.h>

#include <algorithm>
#include <limits>

#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef DEEPKERNELS_EMULATOR
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

#include "common/dtype.h"
#include "fp8_gemm/launch.h"
#include "mla_decode/launch.h"
#include "moe/config.h"
#include "moe/launch.h"
#include "quant/launch.h"

namespace {

#ifdef DEEPKERNELS_EMULATOR
constexpr const char* kKernelDevice = "CPU";
bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
struct KernelDeviceGuard {
  explicit KernelDeviceGuard(const c10::Device&) {}
};
cudaStream_t current_stream() { return nullptr; }
void check_launch() {}  // emulated launches report failures as exceptions
#else
constexpr const char* kKernelDevice = "CUDA";
bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
using KernelDeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
void check_launch() { C10_CUDA_KERNEL_LAUNCH_CHECK(); }
#endif

}  // namespace

#ifdef DEEPKERNELS_EMULATOR
#define DEEPKERNELS_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(deepkernels_emu, CPU, m)
#else
#define DEEPKERNELS_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(deepkernels, CUDA, m)
#endif

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
  TORCH_CHECK(on_kernel_device(t), name, ": expected a ", kKernelDevice, " tensor, got ", t.device());
}

// ---------------------------------------------------------------------------------------------
// quant: per-token / per-block fp8 casts

std::tuple<at::Tensor, at::Tensor> per_token_cast_to_fp8(const at::Tensor& x) {
  check_cuda(x, "x");
  TORCH_CHECK(x.dim() == 2, "x: expected 2 dims [M, K], got ", x.sizes());
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, "x: expected unit stride along K, got strides ", x.strides());
  const KernelDeviceGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1);
  auto out = at::empty({m, k}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty({m, (k + 127) / 128}, x.options().dtype(at::kFloat));
  deepkernels::quant::PerTokenCastParams p{x.data_ptr(), to_dtype(x.scalar_type(), "x"), x.stride(0),
                                          static_cast<uint8_t*>(out.data_ptr()), scale.data_ptr<float>(), m, k};
  deepkernels::quant::per_token_cast_to_fp8(p, current_stream());
  check_launch();
  return {out, scale};
}

std::tuple<at::Tensor, at::Tensor> per_block_cast_to_fp8(const at::Tensor& w) {
  check_cuda(w, "w");
  TORCH_CHECK(w.dim() == 2, "w: expected 2 dims [N, K], got ", w.sizes());
  TORCH_CHECK(w.size(1) == 0 || w.stride(1) == 1, "w: expected unit stride along K, got strides ", w.strides());
  const KernelDeviceGuard guard(w.device());
  const int64_t n = w.size(0), k = w.size(1);
  auto out = at::empty({n, k}, w.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty({(n + 127) / 128, (k + 127) / 128}, w.options().dtype(at::kFloat));
  deepkernels::quant::PerBlockCastParams p{w.data_ptr(), to_dtype(w.scalar_type(), "w"), w.stride(0),
                                          static_cast<uint8_t*>(out.data_ptr()), scale.data_ptr<float>(), n, k};
  deepkernels::quant::per_block_cast_to_fp8(p, current_stream());
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
  const KernelDeviceGuard guard(x.device());
  auto out = at::empty({rows, k}, x.options().dtype(out_dtype));
  deepkernels::quant::DequantParams p{static_cast<const uint8_t*>(x.data_ptr()), scale.data_ptr<float>(),
                                     out.data_ptr(), to_dtype(out_dtype, "out_dtype"), rows, k,
                                     static_cast<int>(rows_per_scale)};
  deepkernels::quant::cast_from_fp8(p, current_stream());
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

DEEPKERNELS_LIBRARY_IMPL(m) {
  m.impl("per_token_cast_to_fp8", &per_token_cast_to_fp8);
  m.impl("per_block_cast_to_fp8", &per_block_cast_to_fp8);
  m.impl("per_token_cast_from_fp8", &per_token_cast_from_fp8);
  m.impl("per_block_cast_from_fp8", &per_block_cast_from_fp8);
}

// ---------------------------------------------------------------------------------------------
// fp8_gemm: dense and grouped FP8 blockwise GEMMs

namespace fp8_gemm_binding {

using deepkernels::fp8_gemm::Fp8GemmParams;
using deepkernels::fp8_gemm::GemmMode;

void check_fp8_operand(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat8_e4m3fn, name, ": expected float8_e4m3fn, got ", t.scalar_type());
  TORCH_CHECK(t.size(-1) % 16 == 0, name, ": K must be a multiple of 16, got ", t.size(-1));
  TORCH_CHECK(t.stride(-1) == 1, name, ": expected unit stride along K, got strides ", t.strides());
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    TORCH_CHECK(t.stride(d) % 16 == 0, name, ": rows (and groups) must start 16-byte aligned, got strides ",
                t.strides());
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": data pointer must be 16-byte aligned");
}

Fp8GemmParams make_params(GemmMode mode, const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                          const at::Tensor& b_scale, const at::Tensor& out) {
  check_fp8_operand(a, "a");
  check_fp8_operand(b, "b");
  TORCH_CHECK(b.is_contiguous(), "b: expected a contiguous tensor");
  TORCH_CHECK(on_kernel_device(a_scale) && a_scale.scalar_type() == at::kFloat, "a_scale: expected a float32 ",
              kKernelDevice, " tensor");
  TORCH_CHECK(on_kernel_device(b_scale) && b_scale.scalar_type() == at::kFloat && b_scale.is_contiguous(),
              "b_scale: expected a contiguous float32 ", kKernelDevice, " tensor");
  TORCH_CHECK(on_kernel_device(out) && out.scalar_type() == at::kBFloat16 && out.stride(-1) == 1,
              "out: expected a bfloat16 ", kKernelDevice, " tensor with unit stride along N");
  // The kernels store bf16 pairs: 4-byte aligned rows.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 4 == 0 && out.stride(-2) % 2 == 0 &&
                  (out.dim() < 3 || out.stride(0) % 2 == 0),
              "out: expected a 4-byte aligned data pointer and even row strides, got strides ", out.strides());
  TORCH_CHECK(a.size(-1) == b.size(-1), "a and b: K differs (", a.size(-1), " vs ", b.size(-1), ")");
  TORCH_CHECK(b.size(-2) % 16 == 0, "b: N must be a multiple of 16, got ", b.size(-2));
  const int64_t k_blocks = (a.size(-1) + 127) / 128;
  TORCH_CHECK(a_scale.size(-1) == k_blocks && a_scale.size(-2) == a.size(-2), "a_scale: shape ", a_scale.sizes(),
              " does not match a ", a.sizes());
  TORCH_CHECK(b_scale.size(-1) == k_blocks && b_scale.size(-2) == (b.size(-2) + 127) / 128, "b_scale: shape ",
              b_scale.sizes(), " does not match b ", b.sizes());
  const bool grouped_a = mode == GemmMode::kGroupedMasked;
  // The kernels index scales by group: a_scale (masked) and b_scale (grouped) need one slice per group of b.
  if (b.dim() == 3) {
    TORCH_CHECK(b_scale.dim() == 3 && b_scale.size(0) == b.size(0), "b_scale: expected ", b.size(0),
                " groups (b's leading dim), got shape ", b_scale.sizes());
  }
  if (grouped_a) {
    TORCH_CHECK(a_scale.dim() == 3 && a_scale.size(0) == a.size(0), "a_scale: expected ", a.size(0),
                " groups (a's leading dim), got shape ", a_scale.sizes());
  }
  Fp8GemmParams p{};
  p.mode = mode;
  p.a = static_cast<const uint8_t*>(a.data_ptr());
  p.a_row_stride = a.stride(-2);
  p.a_group_stride = grouped_a ? a.stride(0) : 0;
  p.a_scale = a_scale.data_ptr<float>();
  p.a_scale_row_stride = a_scale.stride(-2);
  p.a_scale_col_stride = a_scale.stride(-1);
  p.a_scale_group_stride = grouped_a ? a_scale.stride(0) : 0;
  p.b = static_cast<const uint8_t*>(b.data_ptr());
  p.b_scale = b_scale.data_ptr<float>();
  p.out = out.data_ptr();
  p.out_row_stride = out.stride(-2);
  p.out_group_stride = grouped_a ? out.stride(0) : 0;
  p.m = static_cast<int>(a.size(-2));
  p.n = static_cast<int>(b.size(-2));
  p.k = static_cast<int>(a.size(-1));
  p.num_groups = b.dim() == 3 ? static_cast<int>(b.size(0)) : 1;
  return p;
}

void launch(Fp8GemmParams p, const at::Tensor& a) {
  const KernelDeviceGuard guard(a.device());
  const char* error = nullptr;
  const auto plan = deepkernels::fp8_gemm::fp8_gemm_plan(p, &error);
  TORCH_CHECK(error == nullptr, error);
  // Split-K plans (sm_90a, every mode): fp32 partials of every K slice ([split, M, N]; masked [split, G, Mmax, N]),
  // reduced in a second launch. Allocated per call from the stream's caching allocator (graph-capturable).
  at::Tensor workspace;
  if (const size_t bytes = deepkernels::fp8_gemm::fp8_gemm_workspace_bytes(plan, p); bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(bytes / sizeof(float))}, a.options().dtype(at::kFloat));
#ifdef DEEPKERNELS_EMULATOR
    workspace.fill_(std::numeric_limits<float>::quiet_NaN());  // a slot read before any slice wrote it shows as NaN
#endif
    p.workspace = workspace.data_ptr<float>();
    p.workspace_bytes = bytes;
  }
  error = deepkernels::fp8_gemm::fp8_gemm_nt(p, plan, current_stream());
  TORCH_CHECK(error == nullptr, error);
  check_launch();
}

// Python functions of the extension module (deepkernels.gemm.explain / the tuning table / tests):
//   gemm_plan(mode, m, n, k, num_groups, expected_m, num_sms) -> the sm_90a plan (env > table > heuristic)
//   gemm_last_plan() -> the plan of the last GEMM launched on this thread
//   gemm_set_table([(mode, m, n, k, groups, expected_m, num_sms, block_m, block_n, split_k, stages, overlap
//                    [, tma_store]), ...])
PyObject* plan_dict(const deepkernels::fp8_gemm::GemmPlan& g) {
  static const char* kSources[] = {"heuristic", "table", "env"};
  return Py_BuildValue("{s:s,s:i,s:i,s:i,s:i,s:i,s:i,s:L,s:i,s:s}", "kernel",
                       g.kernel == deepkernels::fp8_gemm::GemmKernel::kSm90 ? "sm90" : "portable", "block_m",
                       g.block_m, "block_n", g.block_n, "split_k", g.split_k, "stages", g.stages, "overlap",
                       g.overlap, "tma_store", g.tma_store, "units",
                       static_cast<long long>(g.units), "ctas", g.ctas, "source",
                       kSources[static_cast<int>(g.source)]);
}

PyObject* py_gemm_plan(PyObject*, PyObject* args) {
  int mode = 0, m = 0, n = 0, k = 0, groups = 1, expected_m = 0, num_sms = 0;
  if (!PyArg_ParseTuple(args, "iiiiiii", &mode, &m, &n, &k, &groups, &expected_m, &num_sms)) return nullptr;
  if (mode < 0 || mode > 2 || m < 1 || n < 16 || k < 16 || groups < 1 || expected_m < 0 || num_sms < 1) {
    PyErr_SetString(PyExc_ValueError, "gemm_plan: expected mode 0..2, m >= 1, n, k >= 16, groups, num_sms >= 1");
    return nullptr;
  }
  Fp8GemmParams p{};
  p.mode = static_cast<GemmMode>(mode);
  p.m = m, p.n = n, p.k = k, p.num_groups = groups, p.expected_m = expected_m;
  std::string why;
  const char* error = nullptr;
  const auto plan = deepkernels::fp8_gemm::plan_sm90(p, num_sms, why, &error);
  if (error != nullptr) {
    PyErr_SetString(PyExc_ValueError, error);
    return nullptr;
  }
  return plan_dict(plan);
}

PyObject* py_gemm_last_plan(PyObject*, PyObject*) { return plan_dict(deepkernels::fp8_gemm::fp8_gemm_last_plan()); }

PyObject* py_gemm_set_table(PyObject*, PyObject* arg) {
  PyObject* seq = PySequence_Fast(arg, "gemm_set_table: expected a list of 12- or 13-int tuples");
  if (seq == nullptr) return nullptr;
  std::vector<deepkernels::fp8_gemm::plan::TableEntry> entries;
  const Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
  for (Py_ssize_t i = 0; i < count; ++i) {
    deepkernels::fp8_gemm::plan::TableEntry e{};
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iiiiiiiiiiii|i", &e.mode, &e.m, &e.n, &e.k,
                          &e.num_groups, &e.expected_m, &e.num_sms, &e.block_m, &e.block_n, &e.split_k, &e.stages,
                          &e.overlap, &e.tma_store)) {
      Py_DECREF(seq);
      return nullptr;
    }
    entries.push_back(e);
  }
  Py_DECREF(seq);
  deepkernels::fp8_gemm::fp8_gemm_set_table(entries.data(), entries.size());
  Py_RETURN_NONE;
}

void fp8_gemm_nt(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b, const at::Tensor& b_scale,
                 const at::Tensor& out) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "fp8_gemm_nt: expected a [M, K] and b [N, K]");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == a.size(0) && out.size(1) == b.size(0), "out: expected [M, N], got ",
              out.sizes());
  launch(make_params(GemmMode::kDense, a, a_scale, b, b_scale, out), a);
}

void m_grouped_fp8_gemm_nt_contiguous(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                      const at::Tensor& b_scale, const at::Tensor& out, const at::Tensor& m_indices) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 3, "expected a [M, K] and b [G, N, K]");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == a.size(0) && out.size(1) == b.size(1), "out: expected [M, N], got ",
              out.sizes());
  TORCH_CHECK(on_kernel_device(m_indices) && m_indices.scalar_type() == at::kInt && m_indices.is_contiguous() &&
                  m_indices.numel() == a.size(0),
              "m_indices: expected a contiguous int32 ", kKernelDevice, " tensor of length M");
  auto p = make_params(GemmMode::kGroupedContiguous, a, a_scale, b, b_scale, out);
  p.m_indices = m_indices.data_ptr<int>();
  launch(p, a);
}

void m_grouped_fp8_gemm_nt_masked(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                  const at::Tensor& b_scale, const at::Tensor& out, const at::Tensor& masked_m,
                                  int64_t expected_m) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0), "expected a [G, Mmax, K] and b [G, N, K]");
  TORCH_CHECK(out.dim() == 3 && out.size(0) == a.size(0) && out.size(1) == a.size(1) && out.size(2) == b.size(1),
              "out: expected [G, Mmax, N], got ", out.sizes());
  TORCH_CHECK(on_kernel_device(masked_m) && masked_m.scalar_type() == at::kInt && masked_m.is_contiguous() &&
                  masked_m.numel() == a.size(0),
              "masked_m: expected a contiguous int32 ", kKernelDevice, " tensor of length G");
  TORCH_CHECK(expected_m >= 0, "expected_m: expected a non-negative int, got ", expected_m);
  auto p = make_params(GemmMode::kGroupedMasked, a, a_scale, b, b_scale, out);
  p.masked_m = masked_m.data_ptr<int>();
  p.expected_m = static_cast<int>(std::min<int64_t>(expected_m, a.size(1)));  // tile-shape hint (sm_90a kernel)
  launch(p, a);
}

}  // namespace fp8_gemm_binding

DEEPKERNELS_LIBRARY_IMPL(m) {
  m.impl("fp8_gemm_nt", &fp8_gemm_binding::fp8_gemm_nt);
  m.impl("m_grouped_fp8_gemm_nt_contiguous", &fp8_gemm_binding::m_grouped_fp8_gemm_nt_contiguous);
  m.impl("m_grouped_fp8_gemm_nt_masked", &fp8_gemm_binding::m_grouped_fp8_gemm_nt_masked);
}

// ---------------------------------------------------------------------------------------------
// fp8_gemm (training): weight-gradient GEMMs, fp32 out accumulated, 1x128 per-row scales on both operands

namespace wgrad_gemm_binding {

void check_wgrad_operand(const at::Tensor& t, const char* name) {
  fp8_gemm_binding::check_fp8_operand(t, name);
  TORCH_CHECK(t.dim() == 2, name, ": expected 2 dims, got ", t.sizes());
}

void check_scale(const at::Tensor& scale, const char* name, int64_t rows, int64_t k_blocks) {
  TORCH_CHECK(on_kernel_device(scale) && scale.scalar_type() == at::kFloat && scale.dim() == 2 &&
                  scale.size(0) == rows && scale.size(1) == k_blocks,
              name, ": expected a float32 ", kKernelDevice, " tensor [", rows, ", ", k_blocks, "], got ",
              scale.scalar_type(), " ", scale.sizes(), " on ", scale.device());
}

void wgrad_gemm_fp8_fp8_fp32_nt(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                const at::Tensor& b_scale, const at::Tensor& out) {
  check_wgrad_operand(a, "a");
  check_wgrad_operand(b, "b");
  TORCH_CHECK(a.size(1) == b.size(1), "a and b: K differs (", a.size(1), " vs ", b.size(1), ")");
  const int64_t m = a.size(0), n = b.size(0), k = a.size(1), k_blocks = (k + 127) / 128;
  check_scale(a_scale, "a_scale", m, k_blocks);
  check_scale(b_scale, "b_scale", n, k_blocks);
  TORCH_CHECK(on_kernel_device(out) && out.scalar_type() == at::kFloat && out.dim() == 2 && out.size(0) == m &&
                  out.size(1) == n && (n <= 1 || out.stride(1) == 1),
              "out: expected a float32 ", kKernelDevice, " tensor [", m, ", ", n, "] with unit stride along N, got ",
              out.scalar_type(), " ", out.sizes(), " strides ", out.strides());
  deepkernels::fp8_gemm::WgradGemmParams p{};
  p.a = static_cast<const uint8_t*>(a.data_ptr());
  p.a_row_stride = a.stride(0);
  p.a_scale = a_scale.data_ptr<float>();
  p.a_scale_row_stride = a_scale.stride(0);
  p.a_scale_col_stride = a_scale.stride(1);
  p.b = static_cast<const uint8_t*>(b.data_ptr());
  p.b_row_stride = b.stride(0);
  p.b_scale = b_scale.data_ptr<float>();
  p.b_scale_row_stride = b_scale.stride(0);
  p.b_scale_col_stride = b_scale.stride(1);
  p.out = out.data_ptr<float>();
  p.out_row_stride = out.stride(0);
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  const KernelDeviceGuard guard(a.device());
  const char* error = deepkernels::fp8_gemm::wgrad_gemm_nt(p, current_stream());
  TORCH_CHECK(error == nullptr, error);
  check_launch();
}

void k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(const at::Tensor& a, const at::Tensor& a_scale, const at::Tensor& b,
                                          const at::Tensor& b_scale, const at::Tensor& out, at::IntArrayRef ks) {
  TORCH_CHECK(on_kernel_device(out) && out.scalar_type() == at::kFloat && out.dim() == 3 && out.is_contiguous() &&
                  out.size(0) == static_cast<int64_t>(ks.size()),
              "out: expected a contiguous float32 ", kKernelDevice, " tensor [G = len(ks) = ", ks.size(),
              ", M, N], got ", out.scalar_type(), " ", out.sizes());
  const int64_t m = out.size(1), n = out.size(2);
  int64_t total_k = 0, scale_rows = 0;
  for (size_t g = 0; g < ks.size(); ++g) {
    TORCH_CHECK(ks[g] >= 0 && ks[g] % 16 == 0, "ks[", g, "]: expected a non-negative multiple of 16, got ", ks[g]);
    total_k += ks[g];
    scale_rows += (ks[g] + 127) / 128;
  }
  const auto check_flat = [&](const at::Tensor& t, const char* name, int64_t rows) {
    check_cuda(t, name);
    TORCH_CHECK(t.scalar_type() == at::kFloat8_e4m3fn && t.is_contiguous() && t.numel() == rows * total_k,
                name, ": expected a contiguous float8_e4m3fn tensor of ", rows * total_k, " elements, got ",
                t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, ": data pointer must be 16-byte aligned");
  };
  check_flat(a, "a", m);
  check_flat(b, "b", n);
  check_scale(a_scale, "a_scale", scale_rows, m);
  check_scale(b_scale, "b_scale", scale_rows, n);
  TORCH_CHECK(a_scale.is_contiguous() && b_scale.is_contiguous(), "a_scale and b_scale: expected contiguous tensors");
  const std::vector<int64_t> ks_host(ks.begin(), ks.end());
  deepkernels::fp8_gemm::KGroupedWgradGemmParams p{};
  p.a = static_cast<const uint8_t*>(a.data_ptr());
  p.a_scale = a_scale.data_ptr<float>();
  p.b = static_cast<const uint8_t*>(b.data_ptr());
  p.b_scale = b_scale.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.num_groups = static_cast<int>(ks.size());
  p.ks = ks_host.data();
  const KernelDeviceGuard guard(out.device());
  const char* error = deepkernels::fp8_gemm::k_grouped_wgrad_gemm_nt(p, current_stream());
  TORCH_CHECK(error == nullptr, error);
  check_launch();
}

}  // namespace wgrad_gemm_binding

DEEPKERNELS_LIBRARY_IMPL(m) {
  m.impl("wgrad_gemm_fp8_fp8_fp32_nt", &wgrad_gemm_binding::wgrad_gemm_fp8_fp8_fp32_nt);
  m.impl("k_grouped_wgrad_gemm_fp8_fp8_fp32_nt", &wgrad_gemm_binding::k_grouped_wgrad_gemm_fp8_fp8_fp32_nt);
}

// ---------------------------------------------------------------------------------------------
// mla_decode: split plan, paged decode, cache write

namespace mla_decode_binding {

std::tuple<at::Tensor, at::Tensor> get_mla_decode_metadata(const at::Tensor& cache_seqlens,
                                                           int64_t num_q_tokens_per_head_k, int64_t num_heads_k,
                                                           int64_t num_sm_parts) {
  check_cuda(cache_seqlens, "cache_seqlens");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.scalar_type() == at::kInt,
              "cache_seqlens: expected int32 [b], got ", cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  TORCH_CHECK(num_sm_parts >= 1, "num_sm_parts: expected >= 1, got ", num_sm_parts);
  (void)num_q_tokens_per_head_k;  // the part count already accounts for them
  (void)num_heads_k;
  const KernelDeviceGuard guard(cache_seqlens.device());
  const auto seqlens = cache_seqlens.contiguous();
  const int64_t b = seqlens.size(0);
  auto meta = at::empty({num_sm_parts, 8}, seqlens.options());
  auto num_splits = at::empty({b + 1}, seqlens.options());
  deepkernels::mla::MlaMetadataParams p{seqlens.data_ptr<int>(), static_cast<int>(b), static_cast<int>(num_sm_parts),
                                        meta.data_ptr<int>(), num_splits.data_ptr<int>()};
  deepkernels::mla::mla_decode_metadata(p, current_stream());
  check_launch();
  return {meta, num_splits};
}

bool rows_16b_aligned(const at::Tensor& t, int64_t elems_per_16b) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) > 1 && t.stride(d) % elems_per_16b != 0) return false;
  }
  return t.stride(-1) == 1;
}

std::tuple<at::Tensor, at::Tensor> mla_decode_with_kvcache(
    const at::Tensor& q_in, const at::Tensor& kv_cache, const at::Tensor& block_table, const at::Tensor& cache_seqlens,
    int64_t head_dim_v, const at::Tensor& tile_scheduler_metadata, const at::Tensor& num_splits, double softmax_scale,
    bool causal, const std::optional<at::Tensor>& kv_scale) {
  for (auto [t, name] : {std::pair{&q_in, "q"}, {&kv_cache, "kv_cache"}, {&block_table, "block_table"},
                         {&cache_seqlens, "cache_seqlens"}, {&tile_scheduler_metadata, "tile_scheduler_metadata"},
                         {&num_splits, "num_splits"}}) {
    check_cuda(*t, name);
  }
  const bool fp16 = q_in.scalar_type() == at::kHalf;
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(3) == 576 && (fp16 || q_in.scalar_type() == at::kBFloat16),
              "q: expected bf16 or fp16 [b, s_q, h_q, 576], got ", q_in.scalar_type(), " ", q_in.sizes());
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(3) == 576, "kv_cache: expected [blocks, page, h_kv, 576], got ",
              kv_cache.sizes());
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK((fp8 && !fp16) || kv_cache.scalar_type() == q_in.scalar_type(),
              "kv_cache: expected q's dtype (", q_in.scalar_type(), ") or e4m3 with a bf16 q, got ",
              kv_cache.scalar_type());
  TORCH_CHECK(rows_16b_aligned(kv_cache, fp8 ? 16 : 8), "kv_cache: rows must be 16-byte aligned with unit last stride");
  TORCH_CHECK(kv_cache.size(1) % 16 == 0, "kv_cache: page size must be a multiple of 16, got ", kv_cache.size(1));
  TORCH_CHECK(head_dim_v == 512, "head_dim_v: expected 512, got ", head_dim_v);
  const int64_t b = q_in.size(0), s_q = q_in.size(1), h_q = q_in.size(2), h_kv = kv_cache.size(2);
  TORCH_CHECK(h_q % h_kv == 0, "q: heads ", h_q, " not a multiple of kv heads ", h_kv);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == b && block_table.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1,
              "block_table: expected int32 [b, max_blocks] with unit inner stride");
  TORCH_CHECK(cache_seqlens.numel() == b && cache_seqlens.scalar_type() == at::kInt && cache_seqlens.is_contiguous(),
              "cache_seqlens: expected contiguous int32 [b]");
  TORCH_CHECK(tile_scheduler_metadata.dim() == 2 && tile_scheduler_metadata.size(0) >= 1 &&
                  tile_scheduler_metadata.size(1) == 8 &&
                  tile_scheduler_metadata.scalar_type() == at::kInt && tile_scheduler_metadata.is_contiguous(),
              "tile_scheduler_metadata: expected contiguous int32 [num_sm_parts >= 1, 8]");
  TORCH_CHECK(num_splits.numel() == b + 1 && num_splits.scalar_type() == at::kInt && num_splits.is_contiguous(),
              "num_splits: expected contiguous int32 [b + 1]");
  if (fp8) {
    TORCH_CHECK(kv_scale.has_value() && on_kernel_device(*kv_scale) && kv_scale->scalar_type() == at::kFloat &&
                    kv_scale->is_contiguous() && kv_scale->dim() == 3 && kv_scale->size(0) == kv_cache.size(0) &&
                    kv_scale->size(1) == kv_cache.size(1) && kv_scale->size(2) == h_kv,
                "kv_scale: expected contiguous fp32 [num_blocks, page, h_kv] for an e4m3 cache");
  }
  const KernelDeviceGuard guard(q_in.device());
  // (a contiguous q at an odd offset stays misaligned under .contiguous(): a fresh copy is aligned)
  const at::Tensor q = rows_16b_aligned(q_in, 8) ? q_in : q_in.clone(at::MemoryFormat::Contiguous);
  const int64_t parts = tile_scheduler_metadata.size(0);
  const auto f32 = q.options().dtype(at::kFloat);
  auto out = at::empty({b, s_q, h_q, 512}, q.options());
  auto lse = at::empty({b, h_q, s_q}, f32);
  // Splits per sequence come from the device plan; b + parts bounds their total (see mla.py).
  auto o_accum = at::empty({b + parts, s_q * h_q, 512}, f32);
  auto lse_accum = at::empty({b + parts, s_q * h_q}, f32);
  deepkernels::mla::MlaDecodeParams p{};
  p.q = q.data_ptr();
  p.q_batch_stride = q.stride(0);
  p.q_seq_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.kv = kv_cache.data_ptr();
  p.kv_block_stride = kv_cache.stride(0);
  p.kv_page_stride = kv_cache.stride(1);
  p.kv_head_stride = kv_cache.stride(2);
  p.kv_scale = fp8 ? kv_scale->data_ptr<float>() : nullptr;
  p.kv_fp8 = fp8;
  p.block_table = block_table.data_ptr<int>();
  p.block_table_stride = block_table.stride(0);
  p.num_blocks = static_cast<int>(kv_cache.size(0));
  p.max_blocks = static_cast<int>(block_table.size(1));
  p.cache_seqlens = cache_seqlens.data_ptr<int>();
  p.tile_scheduler_metadata = tile_scheduler_metadata.data_ptr<int>();
  p.num_splits = num_splits.data_ptr<int>();
  p.num_sm_parts = static_cast<int>(parts);
  p.o_accum = o_accum.data_ptr<float>();
  p.lse_accum = lse_accum.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = static_cast<int>(b);
  p.s_q = static_cast<int>(s_q);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.page_size = static_cast<int>(kv_cache.size(1));
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.fp16 = fp16;
  // DEEPKERNELS_MLA_VARIANT (read per call): an unknown name or a variant that cannot run here, before any launch
  const std::string variant_error = deepkernels::mla::mla_decode_variant_error(p);
  TORCH_CHECK_VALUE(variant_error.empty(), variant_error);
  if (b > 0 && s_q > 0 && h_q > 0) {
    deepkernels::mla::mla_decode(p, current_stream());
    check_launch();
  }
  return {out, lse};
}

void write_mla_kv_cache(at::Tensor& kv_cache, const std::optional<at::Tensor>& kv_scale, const at::Tensor& kv,
                        const at::Tensor& slot_mapping) {
  check_cuda(kv_cache, "kv_cache");
  check_cuda(kv, "kv");
  check_cuda(slot_mapping, "slot_mapping");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(3) == 576 && kv_cache.is_contiguous(),
              "kv_cache: expected contiguous [blocks, page, h_kv, 576]");
  const bool fp8 = kv_cache.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(fp8 || kv_cache.scalar_type() == at::kBFloat16 || kv_cache.scalar_type() == at::kHalf,
              "kv_cache: expected bf16, fp16 or e4m3");
  TORCH_CHECK(!fp8 || (kv_scale.has_value() && kv_scale->is_contiguous() && kv_scale->scalar_type() == at::kFloat &&
                       kv_scale->numel() == kv_cache.numel() / 576),
              "kv_scale: expected contiguous fp32 [num_blocks, page, h_kv] for an e4m3 cache");
  TORCH_CHECK(kv.dim() == 3 && kv.size(1) == kv_cache.size(2) && kv.size(2) == 576 && kv.is_contiguous(),
              "kv: expected contiguous [t, h_kv, 576]");
  TORCH_CHECK(slot_mapping.numel() == kv.size(0), "slot_mapping: expected [t]");
  const KernelDeviceGuard guard(kv_cache.device());
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  deepkernels::mla::MlaWriteCacheParams p{kv.data_ptr(), static_cast<int>(to_dtype(kv.scalar_type(), "kv")),
                                          slots.data_ptr<int64_t>(), kv_cache.data_ptr(),
                                          fp8 ? kv_scale->data_ptr<float>() : nullptr, fp8, kv.size(0),
                                          kv_cache.size(0) * kv_cache.size(1), static_cast<int>(kv_cache.size(2)),
                                          static_cast<int>(kv_cache.size(1))};
  p.cache_fp16 = kv_cache.scalar_type() == at::kHalf;
  deepkernels::mla::mla_write_cache(p, current_stream());
  check_launch();
}

}  // namespace mla_decode_binding

DEEPKERNELS_LIBRARY_IMPL(m) {
  m.impl("get_mla_decode_metadata", &mla_decode_binding::get_mla_decode_metadata);
  m.impl("mla_decode_with_kvcache", &mla_decode_binding::mla_decode_with_kvcache);
  m.impl("write_mla_kv_cache", &mla_decode_binding::write_mla_kv_cache);
}

// ---------------------------------------------------------------------------------------------
// moe: dispatch layout, permute (+fp8), un-permute + reduce

namespace moe_binding {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_get_dispatch_layout(const at::Tensor& topk_idx, int64_t num_experts,
                                                                       int64_t num_ranks) {
  check_cuda(topk_idx, "topk_idx");
  TORCH_CHECK(topk_idx.dim() == 2 && topk_idx.scalar_type() == at::kLong,
              "topk_idx: expected int64 [T, k], got ", topk_idx.scalar_type(), " ", topk_idx.sizes());
  TORCH_CHECK(num_ranks > 0 && num_experts > 0 && num_experts % num_ranks == 0,
              "num_experts: expected a positive multiple of num_ranks=", num_ranks, ", got ", num_experts);
  TORCH_CHECK(num_experts + num_ranks <= deepkernels::moe::kMaxExperts,
              "num_experts: at most ", deepkernels::moe::kMaxExperts, " experts + ranks, got ", num_experts);
  const KernelDeviceGuard guard(topk_idx.device());
  const auto idx = topk_idx.contiguous();
  const int64_t t = idx.size(0);
  auto per_rank = at::zeros({num_ranks}, idx.options().dtype(at::kInt));
  auto per_expert = at::zeros({num_experts}, idx.options().dtype(at::kInt));
  auto in_rank = at::empty({t, num_ranks}, idx.options().dtype(at::kBool));
  deepkernels::moe::LayoutParams p{idx.data_ptr<int64_t>(), per_rank.data_ptr<int32_t>(),
                                   per_expert.data_ptr<int32_t>(), reinterpret_cast<uint8_t*>(in_rank.data_ptr()),
                                   t, static_cast<int>(idx.size(1)), static_cast<int>(num_experts),
                                   static_cast<int>(num_ranks)};
  deepkernels::moe::get_dispatch_layout(p, current_stream());
  check_launch();
  return {per_rank, per_expert, in_rank};
}

void check_src_idx(const at::Tensor& x, const at::Tensor& src_idx) {
  check_cuda(x, "x");
  check_cuda(src_idx, "src_idx");
  TORCH_CHECK(x.dim() == 2, "x: expected 2 dims [T, H], got ", x.sizes());
  TORCH_CHECK(src_idx.dim() == 1 && src_idx.scalar_type() == at::kInt && src_idx.is_contiguous(),
              "src_idx: expected contiguous int32 [N], got ", src_idx.scalar_type(), " ", src_idx.sizes());
}

at::Tensor permute_rows(const at::Tensor& x_in, const at::Tensor& src_idx, bool skip_empty) {
  check_src_idx(x_in, src_idx);
  const KernelDeviceGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  auto out = at::empty({src_idx.size(0), x.size(1)}, x.options());
  deepkernels::moe::PermuteParams p{x.data_ptr(), src_idx.data_ptr<int32_t>(), out.data_ptr(), src_idx.size(0),
                                    x.size(1) * static_cast<int64_t>(x.element_size()), x.size(0), skip_empty};
  deepkernels::moe::permute(p, current_stream());
  check_launch();
  return out;
}

at::Tensor moe_permute(const at::Tensor& x, const at::Tensor& src_idx) { return permute_rows(x, src_idx, false); }

// As moe_permute, but rows with src_idx == -1 are left unwritten (their contents are unspecified).
at::Tensor moe_permute_no_fill(const at::Tensor& x, const at::Tensor& src_idx) {
  return permute_rows(x, src_idx, true);
}

std::tuple<at::Tensor, at::Tensor> moe_permute_fp8(const at::Tensor& x_in, const at::Tensor& src_idx) {
  check_src_idx(x_in, src_idx);
  const KernelDeviceGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const int64_t n = src_idx.size(0), h = x.size(1);
  auto out = at::empty({n, h}, x.options().dtype(at::kFloat8_e4m3fn));
  auto scale = at::empty({n, (h + 127) / 128}, x.options().dtype(at::kFloat));
  const DType dtype = to_dtype(x.scalar_type(), "x");
  TORCH_CHECK(dtype != DType::kFloat8E4M3, "x: expected float32, bfloat16 or float16, got float8_e4m3fn");
  deepkernels::moe::PermuteFp8Params p{x.data_ptr(), dtype, src_idx.data_ptr<int32_t>(),
                                       static_cast<uint8_t*>(out.data_ptr()), scale.data_ptr<float>(), n, h, x.size(0)};
  deepkernels::moe::permute_fp8(p, current_stream());
  check_launch();
  return {out, scale};
}

at::Tensor moe_unpermute_reduce(const at::Tensor& y_in, const at::Tensor& pos,
                                const std::optional<at::Tensor>& weights) {
  check_cuda(y_in, "y");
  check_cuda(pos, "pos");
  TORCH_CHECK(y_in.dim() == 2, "y: expected 2 dims [N, H], got ", y_in.sizes());
  TORCH_CHECK(pos.dim() == 2 && pos.scalar_type() == at::kInt && pos.is_contiguous(),
              "pos: expected contiguous int32 [T, K], got ", pos.scalar_type(), " ", pos.sizes());
  const DType dtype = to_dtype(y_in.scalar_type(), "y");
  TORCH_CHECK(dtype != DType::kFloat8E4M3, "y: expected float32, bfloat16 or float16, got float8_e4m3fn");
  const float* w = nullptr;
  if (weights.has_value()) {
    check_cuda(*weights, "weights");
    TORCH_CHECK(weights->scalar_type() == at::kFloat && weights->is_contiguous() && weights->sizes() == pos.sizes(),
                "weights: expected contiguous float32 of pos's shape ", pos.sizes(), ", got ",
                weights->scalar_type(), " ", weights->sizes());
    w = weights->data_ptr<float>();
  }
  const KernelDeviceGuard guard(y_in.device());
  const auto y = y_in.contiguous();
  auto out = at::empty({pos.size(0), y.size(1)}, y.options());
  deepkernels::moe::UnpermuteReduceParams p{y.data_ptr(), dtype, pos.data_ptr<int32_t>(), w, out.data_ptr(),
                                            pos.size(0), y.size(1), static_cast<int>(pos.size(1)), y.size(0)};
  deepkernels::moe::unpermute_reduce(p, current_stream());
  check_launch();
  return out;
}

deepkernels::moe::RowLayout wire_layout(int64_t hidden, int payload_elem_bytes, bool fp8_scales, int64_t topk,
                                        bool weights) {
  return deepkernels::moe::make_row_layout(hidden, payload_elem_bytes, fp8_scales, static_cast<int>(topk), weights);
}

// The fused pack of a dispatch's wire rows (see csrc/moe/params.h PackRowsParams). capacity < 0: normal mode.
at::Tensor moe_pack_rows(const at::Tensor& x_in, const std::optional<at::Tensor>& x_scale_in, const at::Tensor& src_idx,
                         const std::optional<at::Tensor>& topk_idx_in, const std::optional<at::Tensor>& topk_weights_in,
                         const at::Tensor& per_rank_in, int64_t num_local_experts, int64_t capacity, bool use_fp8) {
  check_src_idx(x_in, src_idx);
  check_cuda(per_rank_in, "per_rank");
  TORCH_CHECK(per_rank_in.dim() == 1 && per_rank_in.scalar_type() == at::kInt,
              "per_rank: expected int32 [R], got ", per_rank_in.scalar_type(), " ", per_rank_in.sizes());
  const int64_t r = per_rank_in.size(0), n = src_idx.size(0), t = x_in.size(0), h = x_in.size(1);
  TORCH_CHECK(r >= 1, "per_rank: expected at least one rank, got 0");
  TORCH_CHECK(num_local_experts >= 1, "num_local_experts: expected >= 1, got ", num_local_experts);
  TORCH_CHECK(capacity < 0 || n == r * capacity, "src_idx: expected R * capacity = ", r * capacity,
              " rows (fixed-capacity mode), got ", n);
  const DType dtype = to_dtype(x_in.scalar_type(), "x");
  const bool pair = x_scale_in.has_value();
  TORCH_CHECK(!(use_fp8 && dtype == DType::kFloat8E4M3), "use_fp8: expected a float x to quantise, got float8_e4m3fn");
  TORCH_CHECK(!pair || dtype == DType::kFloat8E4M3, "x_scale: expected only with a float8_e4m3fn x, got x ",
              x_in.scalar_type());
  const KernelDeviceGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  at::Tensor x_scale, topk_idx, topk_weights;
  if (pair) {
    check_cuda(*x_scale_in, "x_scale");
    TORCH_CHECK(x_scale_in->scalar_type() == at::kFloat && x_scale_in->dim() == 2 && x_scale_in->size(0) == t &&
                    x_scale_in->size(1) == (h + 127) / 128,
                "x_scale: expected float32 [", t, ", ", (h + 127) / 128, "], got ", x_scale_in->scalar_type(), " ",
                x_scale_in->sizes());
    x_scale = x_scale_in->contiguous();
  }
  int64_t k = 0;
  if (topk_idx_in.has_value()) {
    check_cuda(*topk_idx_in, "topk_idx");
    TORCH_CHECK(topk_idx_in->scalar_type() == at::kLong && topk_idx_in->dim() == 2 && topk_idx_in->size(0) == t,
                "topk_idx: expected int64 [", t, ", k], got ", topk_idx_in->scalar_type(), " ", topk_idx_in->sizes());
    topk_idx = topk_idx_in->contiguous();
    k = topk_idx.size(1);
  }
  if (topk_weights_in.has_value()) {
    TORCH_CHECK(topk_idx_in.has_value(), "topk_weights: expected None without topk_idx");
    check_cuda(*topk_weights_in, "topk_weights");
    TORCH_CHECK(topk_weights_in->scalar_type() == at::kFloat && topk_weights_in->sizes() == topk_idx.sizes(),
                "topk_weights: expected float32 of topk_idx's shape ", topk_idx.sizes(), ", got ",
                topk_weights_in->scalar_type(), " ", topk_weights_in->sizes());
    topk_weights = topk_weights_in->contiguous();
  }
  const auto per_rank = per_rank_in.contiguous();
  const bool fp8_payload = use_fp8 || dtype == DType::kFloat8E4M3;
  const auto layout = wire_layout(h, fp8_payload ? 1 : static_cast<int>(x.element_size()), use_fp8 || pair, k,
                                  topk_weights.defined());
  auto out = capacity < 0 ? at::empty({n, layout.row_bytes}, x.options().dtype(at::kByte))
                          : at::empty({r, deepkernels::moe::kSlotHeaderBytes + capacity * layout.row_bytes},
                                      x.options().dtype(at::kByte));
  deepkernels::moe::PackRowsParams p{};
  p.x = x.data_ptr();
  p.x_dtype = dtype;
  p.x_scale = pair ? x_scale.data_ptr<float>() : nullptr;
  p.quantize = use_fp8;
  p.src_idx = src_idx.data_ptr<int32_t>();
  p.topk_idx = topk_idx.defined() ? topk_idx.data_ptr<int64_t>() : nullptr;
  p.topk_weights = topk_weights.defined() ? topk_weights.data_ptr<float>() : nullptr;
  p.per_rank = per_rank.data_ptr<int32_t>();
  p.out = static_cast<uint8_t*>(out.data_ptr());
  p.num_rows = n;
  p.num_tokens = t;
  p.hidden = h;
  p.topk = static_cast<int>(k);
  p.num_ranks = static_cast<int>(r);
  p.num_local_experts = static_cast<int>(num_local_experts);
  p.capacity = capacity;
  p.layout = layout;
  deepkernels::moe::pack_rows(p, current_stream());
  check_launch();
  return out;
}

// Split received wire rows into (x, scale, src, lid, w); an absent field is a [N, 0] tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_unpack_rows(
    const at::Tensor& buf_in, int64_t num_rows, int64_t hidden, int64_t topk, at::ScalarType payload_dtype,
    bool fp8_scales, bool weights, int64_t capacity) {
  check_cuda(buf_in, "buf");
  TORCH_CHECK(buf_in.scalar_type() == at::kByte && buf_in.dim() == 2, "buf: expected uint8 [rows, bytes], got ",
              buf_in.scalar_type(), " ", buf_in.sizes());
  TORCH_CHECK(num_rows >= 0 && hidden >= 0 && topk >= 0, "num_rows/hidden/topk: expected >= 0");
  const int64_t elem = c10::elementSize(payload_dtype);
  const auto layout = wire_layout(hidden, static_cast<int>(elem), fp8_scales, topk, weights && topk > 0);
  if (capacity < 0) {
    TORCH_CHECK(buf_in.size(0) == num_rows && buf_in.size(1) == layout.row_bytes, "buf: expected [", num_rows, ", ",
                layout.row_bytes, "], got ", buf_in.sizes());
  } else {
    TORCH_CHECK(capacity > 0 ? num_rows == buf_in.size(0) * capacity : num_rows == 0,
                "num_rows: expected slots * capacity = ", buf_in.size(0) * capacity, ", got ", num_rows);
    TORCH_CHECK(buf_in.size(1) == deepkernels::moe::kSlotHeaderBytes + capacity * layout.row_bytes, "buf: expected ",
                deepkernels::moe::kSlotHeaderBytes + capacity * layout.row_bytes, " bytes per slot, got ",
                buf_in.size(1));
  }
  const KernelDeviceGuard guard(buf_in.device());
  const auto buf = buf_in.contiguous();
  const auto opts = buf.options();
  const int64_t groups = fp8_scales ? (hidden + 127) / 128 : 0, k = layout.src_off >= 0 ? topk : 0;
  auto x = at::empty({num_rows, hidden}, opts.dtype(payload_dtype));
  auto scale = at::empty({num_rows, groups}, opts.dtype(at::kFloat));
  auto src = at::empty({num_rows, k > 0 ? 1 : 0}, opts.dtype(at::kInt));
  auto lid = at::empty({num_rows, k}, opts.dtype(at::kInt));
  auto w = at::empty({num_rows, layout.w_off >= 0 ? k : 0}, opts.dtype(at::kFloat));
  deepkernels::moe::UnpackRowsParams p{};
  p.buf = buf.data_ptr<uint8_t>();
  p.x = x.data_ptr();
  p.scale = groups > 0 ? scale.data_ptr<float>() : nullptr;
  p.src = k > 0 ? src.data_ptr<int32_t>() : nullptr;
  p.lid = k > 0 ? lid.data_ptr<int32_t>() : nullptr;
  p.w = layout.w_off >= 0 ? w.data_ptr<float>() : nullptr;
  p.num_rows = num_rows;
  p.capacity = capacity;
  p.topk = static_cast<int>(k);
  p.scale_groups = groups;
  p.layout = layout;
  deepkernels::moe::unpack_rows(p, current_stream());
  check_launch();
  return {x, scale, src, lid, w};
}

}  // namespace moe_binding

DEEPKERNELS_LIBRARY_IMPL(m) {
  m.impl("moe_get_dispatch_layout", &moe_binding::moe_get_dispatch_layout);
  m.impl("moe_permute", &moe_binding::moe_permute);
  m.impl("moe_permute_no_fill", &moe_binding::moe_permute_no_fill);
  m.impl("moe_permute_fp8", &moe_binding::moe_permute_fp8);
  m.impl("moe_unpermute_reduce", &moe_binding::moe_unpermute_reduce);
  m.impl("moe_pack_rows", &moe_binding::moe_pack_rows);
  m.impl("moe_unpack_rows", &moe_binding::moe_unpack_rows);
}

// ---------------------------------------------------------------------------------------------
// The extension module: importing it runs the registrations; its Python functions are the GEMM plan's.
#define DEEPKERNELS_GEMM_PY_METHODS                                                                            \
  {"gemm_plan", fp8_gemm_binding::py_gemm_plan, METH_VARARGS, "The sm_90a GEMM plan for a problem."},          \
      {"gemm_last_plan", fp8_gemm_binding::py_gemm_last_plan, METH_NOARGS, "The last launched GEMM's plan."}, \
      {"gemm_set_table", fp8_gemm_binding::py_gemm_set_table, METH_O, "Replaces the GEMM tuning table."},
#ifndef DEEPKERNELS_EMULATOR
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {DEEPKERNELS_GEMM_PY_METHODS{nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module);
}
#endif
