#pragma once
// Cooperative fibers for the SIMT emulator: one fiber per CUDA thread; a CTA's fibers run on one OS thread
// and switch only at synchronisation points. x86-64 uses a 30 ns hand-written switch; elsewhere ucontext.
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <ucontext.h>

#if defined(__x86_64__) && !defined(EMU_USE_UCONTEXT)
#define EMU_USE_UCONTEXT 0
extern "C" void deepkernels_emu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void deepkernels_emu_fiber_trampoline();
// (defined in runtime.cpp)
#else
#undef EMU_USE_UCONTEXT
#define EMU_USE_UCONTEXT 1
#endif

namespace emu {

struct Fiber {
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
  char waits_on[192] = {};          // what a blocked fiber waits for (deadlock reports)
};

struct Sched {
  void* sched_sp = nullptr;
  ucontext_t sched_uc;
  Fiber* cur = nullptr;
  uint64_t switches = 0;
};
inline thread_local Sched g_sched;

void on_fiber_exception(std::exception_ptr error);   // runtime.h: records the CTA's first failure

}  // namespace emu

extern "C" void deepkernels_emu_fiber_main(emu::Fiber* f);   // runs f->fn(f->arg), then fiber_exit()

namespace emu {

inline void switch_to_sched() {
  ++g_sched.switches;
#if EMU_USE_UCONTEXT
  swapcontext(&g_sched.cur->uc, &g_sched.sched_uc);
#else
  deepkernels_emu_ctx_switch(&g_sched.cur->sp, g_sched.sched_sp);
#endif
}

inline void switch_to_fiber(Fiber& f) {
  g_sched.cur = &f;
#if EMU_USE_UCONTEXT
  swapcontext(&g_sched.sched_uc, &f.uc);
#else
  deepkernels_emu_ctx_switch(&g_sched.sched_sp, f.sp);
#endif
}

inline bool word_changed(const void* p, uint64_t v) { return *static_cast<const uint64_t*>(p) != v; }

[[noreturn]] inline void fiber_exit() {
  g_sched.cur->done = true;
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
  f.fn = fn; f.arg = arg; f.done = false; f.ready = nullptr; f.waits_on[0] = '\0';
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
