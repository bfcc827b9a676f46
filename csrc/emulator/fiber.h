#pragma once
// Cooperative fibers for the SIMT emulator: one fiber per CUDA thread; a CTA's fibers run on one OS thread
// and switch only at synchronisation points. x86-64 uses a 30 ns hand-written switch; elsewhere ucontext.
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_USE_UCONTEXT 0
extern "C" void deepkernels_emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void deepkernels_emu_fiber_trampoline();
// (defined in runtime.cpp)
#else
#undef EMU_USE_UCONTEXT
#define EMU_USE_UCONTEXT 1
#endif

// ThreadSanitizer build (the racecheck, tests/test_emulator.py): every fiber is a TSan fiber, switched
// without synchronisation, so only the emulated CUDA synchronisation (barriers, collectives, mbarriers: the
// EMU_TSAN_RELEASE/ACQUIRE edges) orders the threads' memory accesses; the emulator's own bookkeeping runs
// inside EMU_TSAN_IGNORE_BEGIN/END.
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
#define EMU_TSAN_RELEASE(p) __tsan_release(const_cast<void*>(static_cast<const volatile void*>(p)))
#define EMU_TSAN_ACQUIRE(p) __tsan_acquire(const_cast<void*>(static_cast<const volatile void*>(p)))
#define EMU_TSAN_IGNORE_BEGIN() \
  (AnnotateIgnoreReadsBegin(__FILE__, __LINE__), AnnotateIgnoreWritesBegin(__FILE__, __LINE__))
#define EMU_TSAN_IGNORE_END() (AnnotateIgnoreWritesEnd(__FILE__, __LINE__), AnnotateIgnoreReadsEnd(__FILE__, __LINE__))
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void AnnotateNewMemory(const char* file, int line, const volatile void* mem, long size);
// A new CTA's shared memory: no access of an earlier CTA (one that aborted, with threads that never exited)
// races with it.
#define EMU_TSAN_NEW_MEMORY(p, n) AnnotateNewMemory(__FILE__, __LINE__, (p), long(n))
#define EMU_TSAN_READ_RANGE(p, n) __tsan_read_range(const_cast<void*>(static_cast<const void*>(p)), (n))
#else
#define EMU_TSAN_READ_RANGE(p, n) ((void)(p), (void)(n))
#define EMU_TSAN_NEW_MEMORY(p, n) ((void)(p), (void)(n))
#define EMU_TSAN_RELEASE(p) ((void)(p))
#define EMU_TSAN_ACQUIRE(p) ((void)(p))
#define EMU_TSAN_IGNORE_BEGIN() ((void)0)
#define EMU_TSAN_IGNORE_END() ((void)0)
#endif

namespace emu {

// The emulator's own bookkeeping in a scope: not a memory access of the emulated kernel (TSan builds).
struct TsanIgnore {
  TsanIgnore() { EMU_TSAN_IGNORE_BEGIN(); }
  ~TsanIgnore() { EMU_TSAN_IGNORE_END(); }
  TsanIgnore(const TsanIgnore&) = delete;
  TsanIgnore& operator=(const TsanIgnore&) = delete;
};

// Owns its stack (reused from CTA to CTA); pooled by unique_ptr, never copied.
struct Fiber {
  Fiber() = default;
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
  ~Fiber() {
    std::free(stack);
#if defined(__SANITIZE_THREAD__)
    if (tsan != nullptr) __tsan_destroy_fiber(tsan);
#endif
  }
  void* sp = nullptr;
  ucontext_t uc;
  uint8_t* stack = nullptr;
  size_t stack_size = 0;
  int tid = 0;
  bool done = false;
  void (*fn)(void*) = nullptr;
  void* arg = nullptr;
  // Blocked until ready(ready_arg, ready_val) holds (nullptr: runnable). The scheduler tests it without
  // switching to the fiber, so blocked fibers cost nothing and a schedule can pick among runnable ones.
  bool (*ready)(const void*, uint64_t) = nullptr;
  const void* ready_arg = nullptr;
  uint64_t ready_val = 0;
  char waits_on[160] = {};          // what a blocked fiber waits for (deadlock reports) ...
  void (*live_state)(const void* arg, char* buf, size_t n) = nullptr;   // ... and its state when reported
  void* tsan = nullptr;             // its ThreadSanitizer fiber (TSan builds)
  void* asan_fake_stack = nullptr;  // AddressSanitizer's fake stack while switched out (ASan builds)
};

struct Sched {
  void* sched_sp = nullptr;
  ucontext_t sched_uc;
  Fiber* cur = nullptr;
  uint64_t switches = 0;
  void* tsan = nullptr;             // the scheduler's ThreadSanitizer fiber (TSan builds)
  // AddressSanitizer builds: the scheduler's stack, and its fake stack while a fiber runs.
  const void* asan_stack_bottom = nullptr;
  size_t asan_stack_size = 0;
  void* asan_fake_stack = nullptr;
};
inline thread_local Sched g_sched;

void on_fiber_exception(std::exception_ptr error);   // runtime.h: records the CTA's first failure

}  // namespace emu

extern "C" void deepkernels_emu_fiber_main(emu::Fiber* f);   // runs f->fn(f->arg), then fiber_exit()

namespace emu {

inline void switch_to_sched() {
  EMU_TSAN_IGNORE_BEGIN();
  ++g_sched.switches;
  EMU_TSAN_IGNORE_END();
#if defined(__SANITIZE_THREAD__)
  __tsan_switch_to_fiber(g_sched.tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(__SANITIZE_ADDRESS__)
  Fiber& self = *g_sched.cur;
  __sanitizer_start_switch_fiber(self.done ? nullptr : &self.asan_fake_stack, g_sched.asan_stack_bottom,
                                 g_sched.asan_stack_size);
#endif
#if EMU_USE_UCONTEXT
  swapcontext(&g_sched.cur->uc, &g_sched.sched_uc);
#else
  deepkernels_emu_ctx_switch(&g_sched.cur->sp, g_sched.sched_sp);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(self.asan_fake_stack, &g_sched.asan_stack_bottom, &g_sched.asan_stack_size);
#endif
}

// First thing a fiber does (ASan builds: learn the scheduler's stack to switch back to it).
inline void fiber_started() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &g_sched.asan_stack_bottom, &g_sched.asan_stack_size);
#endif
}

inline void switch_to_fiber(Fiber& f) {
  g_sched.cur = &f;
#if defined(__SANITIZE_THREAD__)
  // The scheduler's writes (threadIdx, the CTA's setup) happen before the thread runs; nothing flows back.
  if (g_sched.tsan == nullptr) g_sched.tsan = __tsan_get_current_fiber();
  void* const sp = f.sp;   // read as the scheduler: from here on TSan sees the fiber
  __tsan_switch_to_fiber(f.tsan, 0);
#else
  void* const sp = f.sp;
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(&g_sched.asan_fake_stack, f.stack, f.stack_size);
#endif
#if EMU_USE_UCONTEXT
  swapcontext(&g_sched.sched_uc, &f.uc);
#else
  deepkernels_emu_ctx_switch(&g_sched.sched_sp, sp);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(g_sched.asan_fake_stack, nullptr, nullptr);
#endif
}

inline bool word_changed(const void* p, uint64_t v) { return *static_cast<const uint64_t*>(p) != v; }

[[noreturn]] inline void fiber_exit() {
  EMU_TSAN_RELEASE(g_sched.cur);   // the scheduler acquires every thread's history when the CTA ends
  EMU_TSAN_IGNORE_BEGIN();
  g_sched.cur->done = true;
  EMU_TSAN_IGNORE_END();
  switch_to_sched();
  __builtin_trap();
}

#if EMU_USE_UCONTEXT
inline void uc_entry(unsigned lo, unsigned hi) {
  deepkernels_emu_fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | lo));
}
#endif

inline void fiber_init(Fiber& f, size_t stack_size, void (*fn)(void*), void* arg) {
  if (f.stack == nullptr || f.stack_size != stack_size) {
    std::free(f.stack);
    f.stack_size = stack_size;
    f.stack = static_cast<uint8_t*>(std::aligned_alloc(64, stack_size));
  }
#if defined(__SANITIZE_ADDRESS__)
  ASAN_UNPOISON_MEMORY_REGION(f.stack, f.stack_size);   // the previous CTA's frames left their redzones
#endif
#if defined(__SANITIZE_THREAD__)
  if (f.tsan == nullptr) f.tsan = __tsan_create_fiber(0);
#endif
  f.fn = fn; f.arg = arg; f.done = false; f.ready = nullptr; f.waits_on[0] = '\0'; f.live_state = nullptr;
#if EMU_USE_UCONTEXT
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack; f.uc.uc_stack.ss_size = f.stack_size; f.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(uc_entry), 2, unsigned(p), unsigned(p >> 32));
#else
  const uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 80);
  const uint32_t csr[2] = {0x1F80u, 0x037Fu};                // default MXCSR and x87 control word
  __builtin_memcpy(&sp[0], csr, 8);
  sp[1] = 0; sp[2] = 0; sp[3] = 0;                           // r15 r14 r13
  sp[4] = reinterpret_cast<uint64_t>(&f);                    // r12: the trampoline's first argument
  sp[5] = 0; sp[6] = 0;                                      // rbx rbp
  sp[7] = reinterpret_cast<uint64_t>(&deepkernels_emu_fiber_trampoline);
  f.sp = sp;
#endif
}

}  // namespace emu
