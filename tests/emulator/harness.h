// Shared by the emulator's C++ unit tests (tests/emulator/*.cpp, built and run by tests/test_emulator.py with
// the host compiler and the emulator's flags): the emulator prelude, its runtime, and a tiny check harness.
#pragma once
#include "emulator/runtime.h"

#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "common/launch.cuh"
#include "common/ptx_sm90.cuh"

namespace harness {

inline int g_passed = 0, g_failed = 0;

// One named check; `source` cites where the expected fact comes from (PTX ISA section, CUTLASS file).
inline void check(bool ok, const std::string& what, const std::string& source = "") {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    const std::string cited = source.empty() ? "" : "  [" + source + "]";
    std::printf("FAILED: %s%s\n", what.c_str(), cited.c_str());
  }
}

// Runs `launch` and returns the emulator's error message ("" when it succeeded).
inline std::string error_of(const std::function<void()>& launch) {
  try {
    launch();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The closing line pytest's caller reads.
inline int finish() {
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}

}  // namespace harness

// Dynamic shared memory for the tests' own kernels: `extern __shared__ uint8_t test_smem[];` at file scope of
// namespace harness_smem.
namespace harness_smem {
extern __shared__ __align__(1024) uint8_t test_smem[];
}
DEEPKERNELS_EMU_DYNAMIC_SMEM(harness_smem, uint8_t, test_smem);
