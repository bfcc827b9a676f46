#include <cstdlib>
#include <cstring>

#include "../common/launch.cuh"
#include "gemm_portable.cuh"
#include "launch.h"
#include "sm90.cuh"
#include "wgrad_portable.cuh"
#include "wgrad_sm90.cuh"

namespace deepkernels::fp8_gemm {

namespace {

// The sm_90a kernel is opt-in (DEEPKERNELS_GEMM_SM90=1) until a GPU session validates it.
bool use_sm90() {
  const char* flag = std::getenv("DEEPKERNELS_GEMM_SM90");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;
}

}  // namespace

namespace {
thread_local GemmPlan g_last_plan;  // what the last fp8_gemm_nt call on this thread launched
thread_local std::string g_plan_error;
}  // namespace

GemmPlan fp8_gemm_plan(const Fp8GemmParams& p, const char** error) {
  *error = nullptr;
  if (!use_sm90()) return plan_portable(p);
  return sm90::plan(p, g_plan_error, error);
}

size_t fp8_gemm_workspace_bytes(const GemmPlan& plan, const Fp8GemmParams& p) { return workspace_bytes(plan, p); }

const GemmPlan& fp8_gemm_last_plan() { return g_last_plan; }

void fp8_gemm_set_table(const plan::TableEntry* entries, size_t count) {
  std::lock_guard<std::mutex> lock(plan::table_mutex());
  plan::table().assign(entries, entries + count);
}

const char* fp8_gemm_nt(const Fp8GemmParams& p, const GemmPlan& plan, cudaStream_t stream) {
  // A contiguous call with no groups still writes its rows (all padding) as zeros.
  if (p.m == 0 || p.n == 0 || (p.num_groups == 0 && p.mode != GemmMode::kGroupedContiguous)) return nullptr;
  if (plan.kernel == GemmKernel::kSm90) {
    const char* error = nullptr;
    if (sm90::launch(p, plan, stream, &error) == sm90::LaunchResult::kLaunched) {
      g_last_plan = plan;
      return nullptr;
    }
    cudaGetLastError();  // the message is the report: leave no runtime error for a later launch check
    return error;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kBlockN)), static_cast<unsigned>(ceil_div(p.m, kBlockM)),
                  static_cast<unsigned>(p.mode == GemmMode::kGroupedMasked ? p.num_groups : 1));
  launch_kernel<fp8_gemm_nt_portable_kernel>(grid, kThreads, 0, stream, p);
  g_last_plan = plan_portable(p);
  return nullptr;
}

const char* fp8_gemm_nt(const Fp8GemmParams& p, cudaStream_t stream) {
  const char* error = nullptr;
  const GemmPlan plan = fp8_gemm_plan(p, &error);
  return error != nullptr ? error : fp8_gemm_nt(p, plan, stream);
}

const char* wgrad_gemm_nt(const WgradGemmParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0 || p.k == 0) return nullptr;  // out += 0
  if (use_sm90()) {
    const char* error = nullptr;
    switch (sm90::launch_wgrad(p, stream, &error)) {
      case sm90::LaunchResult::kLaunched: return nullptr;
      case sm90::LaunchResult::kError:
        cudaGetLastError();  // the message is the report: leave no runtime error for a later launch check
        return error;
      case sm90::LaunchResult::kUnsupported: break;
    }
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kBlockN)), static_cast<unsigned>(ceil_div(p.m, kBlockM)));
  launch_kernel<wgrad_gemm_portable_kernel>(grid, kThreads, 0, stream, p);
  return nullptr;
}

const char* k_grouped_wgrad_gemm_nt(const KGroupedWgradGemmParams& p, cudaStream_t stream) {
  // One launch per group (K differs per group; the offsets come from the host's ks, so no device sync).
  int64_t k0 = 0, scale_row0 = 0;
  for (int g = 0; g < p.num_groups; ++g) {
    const int64_t k = p.ks[g], k_blocks = ceil_div(k, static_cast<int64_t>(kBlockK));
    WgradGemmParams q{};
    q.a = p.a + p.m * k0;
    q.a_row_stride = k;
    q.a_scale = p.a_scale + scale_row0 * p.m;
    q.a_scale_row_stride = 1;
    q.a_scale_col_stride = p.m;
    q.b = p.b + p.n * k0;
    q.b_row_stride = k;
    q.b_scale = p.b_scale + scale_row0 * p.n;
    q.b_scale_row_stride = 1;
    q.b_scale_col_stride = p.n;
    q.out = p.out + static_cast<int64_t>(g) * p.m * p.n;
    q.out_row_stride = p.n;
    q.m = p.m;
    q.n = p.n;
    q.k = static_cast<int>(k);
    if (const char* error = wgrad_gemm_nt(q, stream)) return error;
    k0 += k;
    scale_row0 += k_blocks;
  }
  return nullptr;
}

}  // namespace deepkernels::fp8_gemm
