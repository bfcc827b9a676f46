#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "../common/launch.cuh"
#include "../common/dtype.h"
#include "combine.cuh"
#include "launch.h"
#include "metadata.cuh"
#include "splitkv_portable.cuh"
#include "splitkv_sm90.cuh"
#include "splitkv_sm90_pipelined.cuh"
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

// The sm_90a wgmma kernels (splitkv_sm90.cuh, splitkv_sm90_pipelined.cuh) are opt-in (DEEPKERNELS_MLA_VARIANT,
// or the legacy DEEPKERNELS_MLA_SM90=1; read on every call) until a GPU session validates them. They run for a
// bf16 or fp16 cache on an sm_90 device whose loaded binary is the sm_90a build. With the legacy switch an e4m3
// cache, other devices, or a build without 90a fall back to the portable kernel; a named variant that cannot run
// is an error.
constexpr int kMaxDevices = 64;

// Whether the sm_90a kernel `kernel` (whose sm_90a build has static_smem bytes of static shared memory and needs
// dyn_smem dynamic) runs on the current device. Cached per device and kernel in `usable`.
template <typename Kernel>
bool sm90_kernel_usable(Kernel kernel, int static_smem, int dyn_smem, std::atomic<int> (&usable)[kMaxDevices]) {
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
  if (device >= kMaxDevices) return false;
  if (usable[device].load(std::memory_order_relaxed) == 0) {
    cudaFuncAttributes attr{};
    bool ok = cudaFuncGetAttributes(&attr, kernel) == cudaSuccess;
    if (!ok) cudaGetLastError();
    // ptxVersion tells a JIT of compute_89 PTX (89) from the sm_90a build (90); a stub also has few registers.
    ok = ok && attr.ptxVersion >= 90 && attr.numRegs > 64 &&
         attr.sharedSizeBytes >= static_cast<size_t>(static_smem) &&
         device_fits(dyn_smem + static_cast<int>(attr.sharedSizeBytes));
    usable[device].store(ok ? 1 : 2, std::memory_order_relaxed);
  }
  return usable[device].load(std::memory_order_relaxed) == 1;
}

bool sm90_usable() {
  static std::atomic<int> usable[kMaxDevices];  // static storage: zero-initialised
  return sm90_kernel_usable(sm90::mla_splitkv_sm90_kernel<__nv_bfloat16>, sm90::kStaticSmemBytes, sm90::kSmemBytes,
                            usable);
}

bool sm90_pipelined_usable() {
  static std::atomic<int> usable[kMaxDevices];
  return sm90_kernel_usable(sm90p::mla_splitkv_sm90_pipelined_kernel<__nv_bfloat16, false>, sm90p::kStaticSmemBytes,
                            sm90p::kSmemBytes, usable);
}

// The legacy switch: DEEPKERNELS_MLA_SM90=1 prefers the sm90 variant where it runs (quiet fallback).
bool use_sm90_legacy(const MlaDecodeParams& p) {
  if (p.kv_fp8) return false;
  const char* flag = std::getenv("DEEPKERNELS_MLA_SM90");
  if (flag == nullptr || std::strcmp(flag, "1") != 0) return false;
  return sm90_usable();
}

enum class Variant { kPortable, kSm90, kSm90Pipelined };

// The variant for p, or an error message in *error.
Variant select_variant(const MlaDecodeParams& p, std::string* error) {
  error->clear();
  const char* name = std::getenv("DEEPKERNELS_MLA_VARIANT");
  if (name == nullptr || name[0] == '\0') return use_sm90_legacy(p) ? Variant::kSm90 : Variant::kPortable;
  if (std::strcmp(name, "portable") == 0) return Variant::kPortable;
  const bool sm90 = std::strcmp(name, "sm90") == 0, pipelined = std::strcmp(name, "sm90_pipelined") == 0;
  if (!sm90 && !pipelined) {
    *error = std::string("DEEPKERNELS_MLA_VARIANT='") + name +
             "' is not an MLA decode variant (expected one of: portable, sm90, sm90_pipelined)";
    return Variant::kPortable;
  }
  if (p.kv_fp8 && sm90) {
    *error = std::string("DEEPKERNELS_MLA_VARIANT='") + name +
             "' does not support an e4m3 kv_cache (its cache dtypes: bfloat16, float16; use 'portable' or "
             "'sm90_pipelined')";
    return Variant::kPortable;
  }
  if (!(sm90 ? sm90_usable() : sm90_pipelined_usable())) {
    int device = 0, major = 0, minor = 0;
    cudaGetDevice(&device);
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    cudaGetLastError();
    *error = std::string("DEEPKERNELS_MLA_VARIANT='") + name + "' needs an sm_90 device and the sm_90a build (device " +
             std::to_string(device) + " is sm_" + std::to_string(major) + std::to_string(minor) + ")";
    return Variant::kPortable;
  }
  return sm90 ? Variant::kSm90 : Variant::kSm90Pipelined;
}

template <typename T>
void launch_sm90(const MlaDecodeParams& p, cudaStream_t stream) {
  cudaFuncSetAttribute(sm90::mla_splitkv_sm90_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       sm90::kSmemBytes);
  const int heads_per_kv = p.h_q / p.h_kv;
  const dim3 grid(p.num_sm_parts, p.h_kv, (p.s_q * heads_per_kv + sm90::kBlockM - 1) / sm90::kBlockM);
  launch_kernel<sm90::mla_splitkv_sm90_kernel<T>>(grid, sm90::kThreads, sm90::kSmemBytes, stream, p);
}

template <typename T, bool kFp8>
void launch_sm90_pipelined(const MlaDecodeParams& p, cudaStream_t stream) {
  cudaFuncSetAttribute(sm90p::mla_splitkv_sm90_pipelined_kernel<T, kFp8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       sm90p::kSmemBytes);
  const int heads_per_kv = p.h_q / p.h_kv;
  const dim3 grid(p.num_sm_parts, p.h_kv, (p.s_q * heads_per_kv + sm90p::kBlockM - 1) / sm90p::kBlockM);
  launch_kernel<sm90p::mla_splitkv_sm90_pipelined_kernel<T, kFp8>>(grid, sm90p::kThreads, sm90p::kSmemBytes, stream,
                                                                   p);
}

}  // namespace

std::string mla_decode_variant_error(const MlaDecodeParams& p) {
  std::string error;
  select_variant(p, &error);
  return error;
}

std::string mla_decode_variant(const MlaDecodeParams& p) {
  std::string error;
  const Variant v = select_variant(p, &error);
  if (!error.empty()) return "";
  return v == Variant::kSm90 ? "sm90" : v == Variant::kSm90Pipelined ? "sm90_pipelined" : "portable";
}

void mla_decode(const MlaDecodeParams& p, cudaStream_t stream) {
  if (p.batch == 0) return;
  std::string error;
  const Variant variant = select_variant(p, &error);
  if (!error.empty()) throw std::invalid_argument(error);
  if (p.num_sm_parts > 0) {
    // an e4m3 cache comes with bf16 q (checked by the binding)
    if (variant == Variant::kSm90) {
      if (p.fp16) launch_sm90<__half>(p, stream);
      else launch_sm90<__nv_bfloat16>(p, stream);
    } else if (variant == Variant::kSm90Pipelined) {
      if (p.kv_fp8) launch_sm90_pipelined<__nv_bfloat16, true>(p, stream);
      else if (p.fp16) launch_sm90_pipelined<__half, false>(p, stream);
      else launch_sm90_pipelined<__nv_bfloat16, false>(p, stream);
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
