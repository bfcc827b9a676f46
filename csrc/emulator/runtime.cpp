// The emulator's runtime: fiber switching, the CTA scheduler (with deadlock reports), __syncthreads, the
// grid launch (CTAs spread over a few OS threads), launch statistics, and the emulated runtime/driver API.
#include "runtime.h"

#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "stats.h"
#include "tensor_map.h"

#if !EMU_USE_UCONTEXT
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack, stores the stack
// pointer in *save_sp, and resumes the fiber whose stack pointer is new_sp.
asm(R"(
.text
.globl deepkernels_emu_ctx_switch
.hidden deepkernels_emu_ctx_switch
.type deepkernels_emu_ctx_switch,@function
deepkernels_emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.globl deepkernels_emu_fiber_trampoline
.hidden deepkernels_emu_fiber_trampoline
deepkernels_emu_fiber_trampoline:
  movq %r12, %rdi
  call deepkernels_emu_fiber_main
  ud2
)");
#endif

extern "C" void deepkernels_emu_fiber_main(emu::Fiber* f) {
  emu::fiber_started();
  void (*fn)(void*);
  void* arg;
  {
    const emu::TsanIgnore bookkeeping;
    fn = f->fn;
    arg = f->arg;
  }
  try {
    fn(arg);
  } catch (...) {   // a failed check in this thread: caught on its own stack, reported by the scheduler
    emu::on_fiber_exception(std::current_exception());
  }
  emu::fiber_exit();
}

namespace emu {

namespace {

thread_local std::exception_ptr t_cta_error;   // the running CTA's first failure

std::string format_block(const uint3& b) {
  return "(" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " + std::to_string(b.z) + ")";
}

}  // namespace

int num_sms() {   // read on every query, so a test can shrink the device to wrap a persistent grid
  const char* s = std::getenv("DEEPKERNELS_EMULATE_SMS");
  const int v = s != nullptr ? std::atoi(s) : 0;
  return v > 0 ? v : 132;
}

std::string where() {
  return std::string("kernel ") + g_kernel + ", block " + format_block(blockIdx) + ", thread " +
         std::to_string(g_cta != nullptr ? flat_tid() : -1);
}

void fail(const std::string& what) { throw KernelError("emulator: " + what + " (" + where() + ")"); }

void on_fiber_exception(std::exception_ptr error) {
  const TsanIgnore bookkeeping;
  if (!t_cta_error) t_cta_error = error;
}

void block_described(bool (*ready)(const void*, uint64_t), const void* arg, uint64_t val, LiveState live_state,
                     const char* fmt, ...) {
  {   // no ignore scope may stay open across the switch: a thread abandoned here (deadlock) never resumes
    const TsanIgnore bookkeeping;
    Fiber& f = *g_sched.cur;
    f.live_state = live_state;
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(f.waits_on, sizeof(f.waits_on), fmt, ap);
    va_end(ap);
    f.ready = ready;
    f.ready_arg = arg;
    f.ready_val = val;
  }
  switch_to_sched();
}

void barrier_state(const void*, char* buf, size_t n) {
  std::snprintf(buf, n, " (%d of %d live threads arrived)", g_cta->bar_arrived, g_cta->live);
}

void barrier_release_if_complete() {
  Cta& c = *g_cta;
  if (c.bar_arrived > 0 && c.bar_arrived == c.live) {
    c.bar_arrived = 0;
    c.bar_file = nullptr;
    ++c.bar_gen;
    ++g_progress;
  }
}

// ---- registries (filled during static initialisation, read-only afterwards)
namespace {
std::vector<SmemAccessor>& smem_arrays() {
  static std::vector<SmemAccessor> v;
  return v;
}
std::vector<std::pair<void (*)(), void (*)()>>& cta_hooks() {
  static std::vector<std::pair<void (*)(), void (*)()>> v;
  return v;
}
}  // namespace

int register_dynamic_smem(SmemAccessor get) {
  smem_arrays().push_back(get);
  return int(smem_arrays().size());
}
int register_cta_hooks(void (*start)(), void (*end)()) {
  cta_hooks().emplace_back(start, end);
  return int(cta_hooks().size());
}
uint8_t* find_dynamic_smem(const void* p) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  for (SmemAccessor get : smem_arrays()) {
    uint8_t* base = get();
    if (b >= base && b < base + kMaxSmemPerBlockOptin) return base;
  }
  return nullptr;
}

// ---- statistics
namespace {
std::mutex g_stats_mutex;
Stats g_stats;
}  // namespace

}  // namespace emu

// ---- __syncthreads
void __syncthreads(std::source_location site) {
  emu::Cta& c = *emu::g_cta;
  uint64_t my;
  {
    const emu::TsanIgnore bookkeeping;
    if (c.bar_arrived == 0) {
      c.bar_file = site.file_name();
      c.bar_line = site.line();
    } else if (c.bar_line != site.line() || std::strcmp(c.bar_file, site.file_name()) != 0) {
      emu::fail("divergent __syncthreads: this thread is at " + std::string(site.file_name()) + ":" +
                std::to_string(site.line()) + " while " + std::to_string(c.bar_arrived) + " thread(s) wait at " +
                c.bar_file + ":" + std::to_string(c.bar_line));
    }
    my = c.bar_gen;
    ++c.bar_arrived;
    ++emu::g_progress;
  }
  EMU_TSAN_RELEASE(&c.bar_gen);
  {
    const emu::TsanIgnore bookkeeping;
    emu::barrier_release_if_complete();
  }
  while (c.bar_gen == my)
    emu::block_described(&emu::word_changed, &c.bar_gen, my, &emu::barrier_state, "__syncthreads");
  EMU_TSAN_ACQUIRE(&c.bar_gen);
}

namespace emu {

namespace {

// EMU_SCHED / DEEPKERNELS_EMULATE_SCHEDULE: "rr" (default) resumes every runnable thread in turn; "lo" / "hi"
// always resume the lowest / highest-numbered runnable thread, so one warp(group) runs as far ahead of the
// others as the synchronisation allows: a missing barrier then shows as a read of data not yet written.
int sched_policy() {
  const char* s = std::getenv("DEEPKERNELS_EMULATE_SCHEDULE");
  if (s == nullptr) return 0;
  return std::strcmp(s, "lo") == 0 ? 1 : std::strcmp(s, "hi") == 0 ? 2 : 0;
}

size_t fiber_stack_bytes() {
#if defined(__SANITIZE_ADDRESS__)
  return 256 * 1024;
#else
  return 64 * 1024;
#endif
}

std::string deadlock_report(const std::vector<Fiber*>& fibers, size_t live) {
  const size_t n = fibers.size();
  std::string msg = "emulator: deadlock in kernel " + std::string(g_kernel) + ", block " + format_block(blockIdx) +
                    ": " + std::to_string(live) + " live thread(s) wait forever:";
  std::vector<std::string> waits(n);
  for (size_t i = 0; i < n; ++i) {
    if (fibers[i]->done) continue;
    char state[160] = "";
    if (fibers[i]->live_state != nullptr) fibers[i]->live_state(fibers[i]->ready_arg, state, sizeof(state));
    waits[i] = std::string(fibers[i]->waits_on) + state;
  }
  for (size_t i = 0; i < n;) {
    if (fibers[i]->done) { ++i; continue; }
    size_t j = i + 1;
    while (j < n && !fibers[j]->done && waits[j] == waits[i]) ++j;
    msg += "\n  thread" + std::string(j - i > 1 ? "s " : " ") + std::to_string(i) +
           (j - i > 1 ? "-" + std::to_string(j - 1) : std::string()) + ": " + waits[i];
    i = j;
  }
  return msg;
}

// The CTA is over (finished or aborted): every thread's accesses happen before what the host does next. A
// thread abandoned by an aborted CTA (deadlock, a failed check elsewhere) releases in TSan's books only.
void finish_cta(const std::vector<Fiber*>& fibers) {
#if defined(__SANITIZE_THREAD__)
  for (Fiber* f : fibers) {
    if (f->done) continue;
    __tsan_switch_to_fiber(f->tsan, __tsan_switch_to_fiber_no_sync);
    __tsan_release(f);
    __tsan_switch_to_fiber(g_sched.tsan, __tsan_switch_to_fiber_no_sync);
  }
#endif
  for (Fiber* f : fibers) EMU_TSAN_ACQUIRE(f);
  g_cta = nullptr;
  g_sched.cur = nullptr;
}

// Runs one CTA with one fiber per thread; rethrows the first failure of any of its threads.
void run_cta(dim3 block, CtaBody body, const void* ctx, int policy) {
  static thread_local std::vector<std::unique_ptr<Fiber>> pool;   // stacks reused from CTA to CTA
  const TsanIgnore scheduler;   // the scheduler's own accesses are not the kernel's
  Cta cta;
  cta.nthreads = cta.live = int(block.x * block.y * block.z);
  g_cta = &cta;
  t_cta_error = nullptr;
  while (pool.size() < size_t(cta.nthreads)) pool.push_back(std::make_unique<Fiber>());
  std::vector<Fiber*> fibers(size_t(cta.nthreads));
  struct Entry { CtaBody body; const void* ctx; } entry{body, ctx};
  for (int t = 0; t < cta.nthreads; ++t) {
    fibers[t] = pool[t].get();
    fibers[t]->tid = t;
    fiber_init(*fibers[t], fiber_stack_bytes(),
               [](void* e) { static_cast<Entry*>(e)->body(static_cast<Entry*>(e)->ctx); }, &entry);
  }
  size_t live = size_t(cta.nthreads);
  const auto runnable = [](const Fiber* f) {
    return !f->done && (f->ready == nullptr || f->ready(f->ready_arg, f->ready_val));
  };
  const auto resume = [&](Fiber* f) {
    f->ready = nullptr;
    threadIdx = make_uint3(f->tid % block.x, (f->tid / block.x) % block.y, f->tid / (block.x * block.y));
    switch_to_fiber(*f);
    if (f->done) {
      --live;
      --cta.live;
      barrier_release_if_complete();
    }
  };
  while (live > 0 && !t_cta_error) {
    const uint64_t progress0 = g_progress;
    const size_t live0 = live;
    bool any = false;
    if (policy == 0) {
      for (size_t i = 0; i < fibers.size() && !t_cta_error; ++i)
        if (runnable(fibers[i])) { any = true; resume(fibers[i]); }
    } else {
      Fiber* pick = nullptr;
      for (size_t i = 0; i < fibers.size() && pick == nullptr; ++i) {
        Fiber* f = fibers[policy == 1 ? i : fibers.size() - 1 - i];
        if (runnable(f)) pick = f;
      }
      if (pick != nullptr) { any = true; resume(pick); }
    }
    if (!t_cta_error && live > 0 && (!any || (policy == 0 && live == live0 && g_progress == progress0))) {
      const std::string report = deadlock_report(fibers, live);
      finish_cta(fibers);
      throw KernelError(report);
    }
  }
  finish_cta(fibers);
  if (t_cta_error) std::rethrow_exception(t_cta_error);
}

// Sets up the CTA's dynamic shared memory (garbage below the launch's size, poisoned above it under ASan)
// and the PTX models' state, runs it, and lets the models report work left in flight.
void run_one_cta(const char* kernel, dim3 grid, dim3 block, uint3 bidx, size_t smem, CtaBody body, const void* ctx,
                 int policy) {
  const TsanIgnore scheduler;
  g_kernel = kernel;
  gridDim = grid;
  blockDim = block;
  blockIdx = bidx;
  g_dyn_base = nullptr;
  g_dyn_bytes = smem;
  for (SmemAccessor get : smem_arrays()) {
    uint8_t* base = get();
    EMU_UNPOISON(base, kMaxSmemPerBlockOptin);
    EMU_TSAN_NEW_MEMORY(base, kMaxSmemPerBlockOptin);
    std::memset(base, 0xA5, smem);   // uninitialised shared memory is garbage
    EMU_POISON(base + smem, kMaxSmemPerBlockOptin - smem);
  }
  for (auto& hooks : cta_hooks()) hooks.first();
  run_cta(block, body, ctx, policy);
  for (auto& hooks : cta_hooks()) hooks.second();
}

int worker_count() {
  static const int n = [] {
    const char* s = std::getenv("DEEPKERNELS_EMULATE_THREADS");
    const int v = s != nullptr ? std::atoi(s) : 0;
    const int hw = int(std::thread::hardware_concurrency());
    return v > 0 ? v : std::max(1, std::min(hw, 8));
  }();
  return n;
}

}  // namespace

void run_grid(const char* kernel, const void* kernel_id, dim3 grid, dim3 block, size_t smem, CtaBody body,
              const void* ctx) {
  const int64_t threads = int64_t(block.x) * block.y * block.z;
  const auto launch_error = [&](const std::string& what) {
    throw std::runtime_error("emulator: launch of " + std::string(kernel) + ": " + what);
  };
  if (threads <= 0 || threads > kMaxThreadsPerBlock)
    launch_error("block of " + std::to_string(threads) + " threads (1..1024 allowed)");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    launch_error("invalid grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
                 std::to_string(grid.z) + ")");
  if (smem > size_t(api::max_dynamic_smem(kernel_id)))
    launch_error(std::to_string(smem) + " bytes of dynamic shared memory exceed the " +
                 std::to_string(api::max_dynamic_smem(kernel_id)) +
                 " the kernel allows (cudaFuncSetAttribute(MaxDynamicSharedMemorySize) raises it up to 232448)");
  const int policy = sched_policy();
  const int64_t ctas = int64_t(grid.x) * grid.y * grid.z;
  const auto t0 = std::chrono::steady_clock::now();
  std::atomic<int64_t> next{0};
  std::atomic<uint64_t> switches{0};
  std::mutex error_mutex;
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  const auto work = [&] {
    const uint64_t s0 = g_sched.switches;
    for (int64_t i; !failed.load() && (i = next.fetch_add(1)) < ctas;) {
      const uint3 bidx = make_uint3(unsigned(i % grid.x), unsigned(i / grid.x % grid.y),
                                    unsigned(i / (int64_t(grid.x) * grid.y)));
      try {
        run_one_cta(kernel, grid, block, bidx, smem, body, ctx, policy);
      } catch (...) {
        const std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
        failed = true;
      }
    }
    switches += g_sched.switches - s0;
  };
  const int workers = int(std::min<int64_t>(worker_count(), ctas));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  {
    const std::lock_guard<std::mutex> lock(g_stats_mutex);
    ++g_stats.launches;
    g_stats.ctas += uint64_t(ctas);
    g_stats.switches += switches;
    g_stats.seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++g_stats.kernels[kernel];
  }
  if (error) std::rethrow_exception(error);
}

Stats stats() {
  const std::lock_guard<std::mutex> lock(g_stats_mutex);
  return g_stats;
}

// ---- the emulated runtime / driver API
namespace api {

namespace {
thread_local cudaError_t t_last_error = cudaSuccess;
std::mutex g_attr_mutex;
std::map<const void*, int>& max_smem_attr() {
  static std::map<const void*, int> m;
  return m;
}
}  // namespace

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t get_last_error() {
  const cudaError_t e = t_last_error;
  t_last_error = cudaSuccess;
  return e;
}
cudaError_t device_get_attribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return t_last_error = cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMultiProcessorCount: *value = num_sms(); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kMaxSmemPerBlockOptin; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = kDefaultMaxDynamicSmem; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = kMaxThreadsPerBlock; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: return t_last_error = cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || value > kMaxSmemPerBlockOptin) return t_last_error = cudaErrorInvalidValue;
  const std::lock_guard<std::mutex> lock(g_attr_mutex);
  max_smem_attr()[kernel] = value;
  return cudaSuccess;
}
int max_dynamic_smem(const void* kernel) {
  const std::lock_guard<std::mutex> lock(g_attr_mutex);
  const auto it = max_smem_attr().find(kernel);
  return it == max_smem_attr().end() ? kDefaultMaxDynamicSmem : it->second;
}
// An sm_90a image: the kernels' checks for a real (not stub) sm_90a body pass.
cudaError_t func_get_attributes(cudaFuncAttributes* attr, const void* kernel) {
  *attr = cudaFuncAttributes{};
  attr->binaryVersion = 90;
  attr->ptxVersion = 90;
  attr->numRegs = 168;
  attr->sharedSizeBytes = 1024;
  attr->maxThreadsPerBlock = kMaxThreadsPerBlock;
  attr->maxDynamicSharedSizeBytes = max_dynamic_smem(kernel);
  return cudaSuccess;
}
cudaError_t get_driver_entry_point_by_version(const char* symbol, void** fn, unsigned int, unsigned long long,
                                              cudaDriverEntryPointQueryResult* status) {
  const bool ok = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *fn = ok ? reinterpret_cast<void*>(&encode_tiled) : nullptr;
  if (status != nullptr) *status = ok ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

}  // namespace api

// The cuTensorMapEncodeTiled constraints (CUDA driver API reference) the kernels rely on: a 64-byte aligned map,
// 16-byte aligned global address, strides multiples of 16 below 2^40, box dims 1..256, box inner bytes a multiple
// of 16 and at most the swizzle span (32, 64 or 128 bytes). Element types: 1-byte (e4m3 loads as UINT8), bf16, f16,
// f32.
CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* addr, const cuuint64_t* dims,
                      const cuuint64_t* strides, const cuuint32_t* box, const cuuint32_t* element_strides,
                      CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle, CUtensorMapL2promotion,
                      CUtensorMapFloatOOBfill oob_fill) {
  uint32_t esize = 0;
  switch (type) {
    case CU_TENSOR_MAP_DATA_TYPE_UINT8: esize = 1; break;
    case CU_TENSOR_MAP_DATA_TYPE_BFLOAT16:
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT16: esize = 2; break;
    case CU_TENSOR_MAP_DATA_TYPE_FLOAT32: esize = 4; break;
    default: return CUDA_ERROR_INVALID_VALUE;
  }
  // NOTE: the driver also requires the CUtensorMap object itself to be 64-byte aligned (the type is alignas(64),
  // alignas(128) in CUDA 13's cuda.h; a map encoded into a plain byte buffer need not be).
  if (reinterpret_cast<uintptr_t>(map) % 64 != 0 || rank < 1 || rank > 3 ||
      reinterpret_cast<uintptr_t>(addr) % 16 != 0 ||
      interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || oob_fill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    return CUDA_ERROR_INVALID_VALUE;
  TensorMap m{kTensorMapMagic, static_cast<const uint8_t*>(addr), {1, 1, 1}, {esize, 0, 0}, {1, 1, 1}, rank, esize, 0};
  for (cuuint32_t i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32) || box[i] == 0 || box[i] > 256 || element_strides[i] != 1)
      return CUDA_ERROR_INVALID_VALUE;
    m.dims[i] = dims[i];
    m.box[i] = box[i];
    if (i > 0) {
      if (strides[i - 1] % 16 != 0 || strides[i - 1] >= (uint64_t(1) << 40)) return CUDA_ERROR_INVALID_VALUE;
      m.strides[i] = strides[i - 1];
    }
  }
  const uint32_t inner_bytes = box[0] * esize;
  if (inner_bytes % 16 != 0) return CUDA_ERROR_INVALID_VALUE;
  switch (swizzle) {
    case CU_TENSOR_MAP_SWIZZLE_NONE: m.swizzle = 0; break;
    case CU_TENSOR_MAP_SWIZZLE_32B: m.swizzle = 32; break;
    case CU_TENSOR_MAP_SWIZZLE_64B: m.swizzle = 64; break;
    case CU_TENSOR_MAP_SWIZZLE_128B: m.swizzle = 128; break;
    default: return CUDA_ERROR_INVALID_VALUE;
  }
  if (m.swizzle != 0 && inner_bytes > m.swizzle) return CUDA_ERROR_INVALID_VALUE;
  std::memset(map, 0, sizeof(*map));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

}  // namespace emu
