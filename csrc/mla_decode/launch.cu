#include <atomic>
#include <cstdlib>
#include <cstring>

#include "../common/launch.cuh"
#include "../common/dtype.h"
#include "combine.cuh"
#include "launch.h"
#include "metadata.cuh"
#include "splitkv_portable.cuh"
#include "splitkv_sm90.cuh"
#include "write_cache.cuh"

namespace deepkernels::mla {

namespace {

template <typename T, bool kFp8, int kStages>
void launch_splitkv(const MlaDecodeParams& p, cudaStream_t stream) {
  constexpr int kSmem = static_cast<int>(sizeof(SplitKvSmem<kStages, kFp8, T>));
  // Attribute set on every launch: cheap, and correct on whichever device is current.
  cudaFuncSetAttribute(mla_splitkv_kernel<T, kFp8, kStages>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  const int heads_per_kv = p.h_q / p.h_kv;
  const dim3 grid(p.num_sm_parts, p.h_kv, (p.s_q * heads_per_kv + kBlockM - 1) / kBlockM);
  launch_kernel<mla_splitkv_kernel<T, kFp8, kStages>>(grid, kThreads, kSmem, stream, p);
}

// Deepest K pipeline the device's opt-in shared memory allows: 3 stages (~155 KB) on sm_80 (163 KB)
// and sm_90 (227 KB), 1 on sm_89 (99 KB). DEEPKERNELS_MLA_STAGES=1|2 caps it (tests run every variant).
int max_stages() {
  const char* forced = std::getenv("DEEPKERNELS_MLA_STAGES");
  if (forced != nullptr && (forced[0] == '1' || forced[0] == '2')) return forced[0] - '0';
  return 3;
}

bool device_fits(int smem_bytes) {
  int device = 0, smem_optin = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  return smem_optin >= smem_bytes;
}

template <typename T, bool kFp8>
void launch_splitkv_pipelined(const MlaDecodeParams& p, cudaStream_t stream) {
  const int stages = max_stages();
  if (stages >= 3 && device_fits(static_cast<int>(sizeof(SplitKvSmem<3, kFp8, T>)))) {
    launch_splitkv<T, kFp8, 3>(p, stream);
  } else if (stages >= 2 && device_fits(static_cast<int>(sizeof(SplitKvSmem<2, kFp8, T>)))) {
    launch_splitkv<T, kFp8, 2>(p, stream);
  } else {
    launch_splitkv<T, kFp8, 1>(p, stream);
  }
}

// The sm_90a wgmma kernel (splitkv_sm90.cuh) is opt-in (DEEPKERNELS_MLA_SM90=1, read on every call) until a
// GPU session validates it. It runs for a bf16 or fp16 cache on an sm_90 device whose loaded binary is the sm_90a
// build; an e4m3 cache, other devices, or a build without 90a fall back to the portable kernel.
constexpr int kMaxDevices = 64;

bool use_sm90(const MlaDecodeParams& p) {
  if (p.kv_fp8) return false;
  const char* flag = std::getenv("DEEPKERNELS_MLA_SM90");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();  // leave no error behind for the launch check
    return false;
  }
  if (major != 9 || minor != 0) return false;
  // Only the sm_90a build has a body (and its static row statistics); the stub of an sm_80/89/90 build
  // (or PTX JIT of compute_89) has none and would write nothing. Cached per device (0 unknown, 1 yes, 2 no).
  static std::atomic<int> usable[kMaxDevices];  // static storage: zero-initialised
  if (device >= kMaxDevices) return false;
  if (usable[device].load(std::memory_order_relaxed) == 0) {
    cudaFuncAttributes attr{};
    bool ok = cudaFuncGetAttributes(&attr, sm90::mla_splitkv_sm90_kernel<__nv_bfloat16>) == cudaSuccess;
    if (!ok) cudaGetLastError();
    // ptxVersion tells a JIT of compute_89 PTX (89) from the sm_90a build (90); a stub also has few registers.
    ok = ok && attr.ptxVersion >= 90 && attr.numRegs > 64 &&
         attr.sharedSizeBytes >= static_cast<size_t>(sm90::kStaticSmemBytes) &&
         device_fits(sm90::kSmemBytes + static_cast<int>(attr.sharedSizeBytes));
    usable[device].store(ok ? 1 : 2, std::memory_order_relaxed);
  }
  return usable[device].load(std::memory_order_relaxed) == 1;
}

template <typename T>
void launch_sm90(const MlaDecodeParams& p, cudaStream_t stream) {
  cudaFuncSetAttribute(sm90::mla_splitkv_sm90_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       sm90::kSmemBytes);
  const int heads_per_kv = p.h_q / p.h_kv;
  const dim3 grid(p.num_sm_parts, p.h_kv, (p.s_q * heads_per_kv + sm90::kBlockM - 1) / sm90::kBlockM);
  launch_kernel<sm90::mla_splitkv_sm90_kernel<T>>(grid, sm90::kThreads, sm90::kSmemBytes, stream, p);
}

}  // namespace

void mla_decode(const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  if (p.num_sm_parts > 0) {
    // an e4m3 cache comes with bf16 q (checked by the binding)
    if (use_sm90(p)) {
      if (p.fp16) launch_sm90<__half>(p, stream);
      else launch_sm90<__nv_bfloat16>(p, stream);
    } else if (p.kv_fp8) {
      launch_splitkv_pipelined<__nv_bfloat16, true>(p, stream);
    } else if (p.fp16) {
      launch_splitkv_pipelined<__half, false>(p, stream);
    } else {
      launch_splitkv_pipelined<__nv_bfloat16, false>(p, stream);
    }
  }
  const int64_t rows = static_cast<int64_t>(p.batch) * p.s_q * p.h_q;
  const dim3 grid(static_cast<unsigned>((rows + kCombineWarps - 1) / kCombineWarps));
  launch_kernel<mla_combine_kernel>(grid, kCombineWarps * 32, 0, stream, p);
}

void mla_decode_metadata(const MlaMetadataParams& p, cudaStream_t stream) {
  launch_kernel<mla_metadata_kernel>(1, kMetadataThreads, 0, stream, p);
}

void mla_write_cache(const MlaWriteCacheParams& p, cudaStream_t stream) {
  const int64_t items = p.num_tokens * p.h_kv;
  if (items == 0) return;
  const dim3 grid(static_cast<unsigned>((items + kWriteWarps - 1) / kWriteWarps));
  switch (static_cast<DType>(p.kv_dtype)) {
    case DType::kFloat32: launch_kernel<mla_write_cache_kernel<float>>(grid, kWriteWarps * 32, 0, stream, p); break;
    case DType::kFloat16: launch_kernel<mla_write_cache_kernel<__half>>(grid, kWriteWarps * 32, 0, stream, p); break;
    default: launch_kernel<mla_write_cache_kernel<__nv_bfloat16>>(grid, kWriteWarps * 32, 0, stream, p); break;
  }
}

}  // namespace deepkernels::mla
