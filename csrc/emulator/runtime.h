#pragma once
// SIMT emulator prelude: included first by every emulated translation unit (csrc/emulator/kernels_*.cpp),
// before any kernel source. It makes the unchanged CUDA sources compile as host C++:
//  1) the real CUDA headers first, in host mode (their bf16/fp16/fp8 conversions work on the host, and
//     their include guards make the kernels' own #includes no-ops);
//  2) the CUDA keywords, mapped to host C++ (__shared__ -> thread_local: a CTA runs on one OS thread, so
//     static and `extern` shared arrays get one copy per running CTA);
//  3) the device built-ins as fiber-aware host functions, the launch entry point, and the runtime API.
// See docs/design.md#emulator for what it models and what it cannot.
#define DEEPKERNELS_EMULATOR 1
#define __shared__ thread_local
#define __launch_bounds__(...)
#define __grid_constant__
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <source_location>
#include <tuple>

#include "fiber.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define EMU_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define EMU_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define EMU_POISON(p, n) ((void)(p), (void)(n))
#define EMU_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
constexpr int warpSize = 32;

namespace emu {

// The emulated device: one sm_90 GPU (H100/H200 limits).
constexpr int kMaxThreadsPerBlock = 1024;
constexpr int kMaxSmemPerBlockOptin = 232448;   // 227 KiB
constexpr int kDefaultMaxDynamicSmem = 49152;   // without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
int num_sms();                                   // 132, or DEEPKERNELS_EMULATE_SMS

// A failed check inside a kernel: thrown on the failing fiber's stack, caught at its entry, and rethrown by
// the launch on the calling thread as std::runtime_error naming the kernel, the CTA and the thread.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
std::string where();   // "kernel K, block (x, y, z), thread t"
[[noreturn]] void fail(const std::string& what);

struct Group {          // a warp or warpgroup at a .sync.aligned collective
  int arrived = 0;
  uint64_t gen = 0;
  const char* op = nullptr;
  void* args[128];
};

struct Cta {
  int nthreads = 0, live = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  const char* bar_file = nullptr;   // source line of the current __syncthreads phase
  unsigned bar_line = 0;
  Group warps[32];
  Group warpgroups[8];
};
inline thread_local Cta* g_cta = nullptr;
inline thread_local uint64_t g_progress = 0;   // bumped by every change of synchronisation state
inline thread_local const char* g_kernel = "";

inline int flat_tid() { return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)); }

// Blocks the calling thread until `ready` holds; `fmt` describes the wait for deadlock reports.
// `live_state` (may be null) appends the awaited object's state when a deadlock is reported.
using LiveState = void (*)(const void* arg, char* buf, size_t n);
void block_described(bool (*ready)(const void*, uint64_t), const void* arg, uint64_t val, LiveState live_state,
                     const char* fmt, ...) __attribute__((format(printf, 5, 6)));

void barrier_release_if_complete();
void barrier_state(const void*, char* buf, size_t n);

// Warp(group)-synchronous collective: every lane deposits `arg`; the last lane to arrive runs
// compute(args) (which writes each lane's results through pointers in its arg), then all lanes go on.
// Lanes at different collectives at once are a divergence error, as .sync.aligned is undefined there.
// (TSan builds: each lane releases at arrival and acquires when the collective completes; `compute` runs in
// the last lane with every lane's history, so its memory accesses are checked as that lane's.)
template <int kGroup = 32, typename F>
inline void warp_collective(const char* op, void* arg, F&& compute) {
  Cta& c = *g_cta;
  const int t = flat_tid(), lane = t % kGroup;
  Group& w = kGroup == 32 ? c.warps[t / 32] : c.warpgroups[t / kGroup];
  uint64_t my;
  bool last;
  {
    const TsanIgnore bookkeeping;
    if (w.arrived == 0) {
      w.op = op;
    } else if (w.op != op && std::strcmp(w.op, op) != 0) {
      fail(std::string("divergent collective: this lane is at ") + op + " while " + std::to_string(w.arrived) +
           " lane(s) of its " + (kGroup == 32 ? "warp" : "warpgroup") + " wait at " + w.op);
    }
    w.args[lane] = arg;
    ++g_progress;
    my = w.gen;
    const int lanes = std::min(kGroup, c.nthreads - (t / kGroup) * kGroup);
    last = ++w.arrived == lanes;
  }
  EMU_TSAN_RELEASE(&w);
  if (last) {
    EMU_TSAN_ACQUIRE(&w);
    compute(w.args);
    EMU_TSAN_RELEASE(&w);
    const TsanIgnore bookkeeping;
    w.arrived = 0;
    ++w.gen;
    return;
  }
  while (word_changed(&w.gen, my) == false)
    block_described(&word_changed, &w.gen, my, nullptr, "%s (%s %d)", op, kGroup == 32 ? "warp" : "warpgroup",
                    t / kGroup);
  EMU_TSAN_ACQUIRE(&w);
}

// ---- dynamic shared memory. The kernels' `extern __shared__` arrays are defined by the emulated
// translation units (DEEPKERNELS_EMU_DYNAMIC_SMEM) and registered here. A 32-bit shared address of dynamic
// smem is kReserve + offset (kReserve models static smem below it; deliberately not 1024-aligned, so
// kernels must align their own tiles), so descriptor start fields fit their 18 bits.
constexpr uint32_t kReserve = 1024 + 16;
using SmemAccessor = uint8_t* (*)();   // the calling OS thread's copy of one array
int register_dynamic_smem(SmemAccessor get);
inline thread_local uint8_t* g_dyn_base = nullptr;   // the array the running CTA uses (first one it touches)
inline thread_local size_t g_dyn_bytes = 0;
// Static __shared__ variables (thread_local, one TLS block) get their pointer's low 32 bits as shared
// address; the high bits, the same for the whole block, are kept to convert back.
inline thread_local uint64_t g_static_smem_high = 0;
uint8_t* find_dynamic_smem(const void* p);           // the registered array holding p, or nullptr

// Per-CTA start / end hooks of the PTX models (reset state; report work left in flight).
int register_cta_hooks(void (*start)(), void (*end)());

// ---- launch
using CtaBody = void (*)(const void* ctx);
void run_grid(const char* kernel, const void* kernel_id, dim3 grid, dim3 block, size_t smem, CtaBody body,
              const void* ctx);

template <auto kKernel>
const char* kernel_name() {
  // "... [with auto kKernel = ns::name<args>]" -> "name"
  static const std::string name = [](std::string s) {
    const size_t at = s.find("kKernel = ");
    s = at == std::string::npos ? s : s.substr(at + 10);
    s = s.substr(0, s.find_first_of("<;]"));
    const size_t colon = s.rfind("::");
    return colon == std::string::npos ? s : s.substr(colon + 2);
  }(__PRETTY_FUNCTION__);
  return name.c_str();
}

template <auto kKernel, typename... Args>
inline void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, const Args&... args) {
  struct Ctx { const std::tuple<const Args&...> args; } ctx{std::tuple<const Args&...>(args...)};
  run_grid(kernel_name<kKernel>(), reinterpret_cast<const void*>(kKernel), grid, block, smem,
           [](const void* c) { std::apply([](const auto&... a) { kKernel(a...); }, static_cast<const Ctx*>(c)->args); },
           &ctx);
}

}  // namespace emu

#define DEEPKERNELS_EMU_DYNAMIC_SMEM(ns, type, name)                                                          \
  namespace ns {                                                                                          \
  alignas(1024) thread_local type name[emu::kMaxSmemPerBlockOptin / sizeof(type)];                        \
  }                                                                                                       \
  static const int deepkernels_emu_smem_##name = emu::register_dynamic_smem(                            \
      [] { return reinterpret_cast<uint8_t*>(&ns::name[0]); })

// ---- device built-ins
// A __syncthreads phase completes when every live thread of the CTA has arrived (exited threads do not
// count, as on sm_70+); threads arriving from different source lines in one phase are reported (divergent
// barrier: undefined behaviour in CUDA). The default argument is evaluated at the kernel's call site.
void __syncthreads(std::source_location site = std::source_location::current());

namespace emu {
// A full-warp shuffle: lane l receives the value of lane source(l, operand) (its own operand).
template <typename Source, typename T>
inline T shuffle(const char* op, unsigned mask, T v, int operand, int width) {
  if (mask != 0xffffffffu || width != 32) fail(std::string(op) + ": only full-warp masks and width 32 are emulated");
  struct Arg { T in; T* out; int operand; } a{v, &v, operand};
  warp_collective(op, &a, [](void** args) {
    T vals[32];
    for (int l = 0; l < 32; ++l) vals[l] = static_cast<Arg*>(args[l])->in;
    for (int l = 0; l < 32; ++l) {
      Arg* x = static_cast<Arg*>(args[l]);
      *x->out = vals[Source{}(l, x->operand) & 31];
    }
  });
  return v;
}
}  // namespace emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return emu::shuffle<decltype([](int lane, int m) { return lane ^ m; })>("__shfl_xor_sync", mask, v, lane_mask, width);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return emu::shuffle<decltype([](int, int src) { return src; })>("__shfl_sync", mask, v, src_lane, width);
}
template <typename T> inline T __ldg(const T* p) { return *p; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __fdiv_rn(float a, float b) { return a / b; }   // built with -ffp-contract=off: no fused ops
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
using std::isnan;

#include "cuda_api.h"
