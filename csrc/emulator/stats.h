#pragma once
// What the emulator counts since the extension was loaded (deepkernels.emulator_stats()). No CUDA types:
// the torch binding includes this.
#include <cstdint>
#include <map>
#include <string>

namespace emu {

struct Stats {
  uint64_t launches = 0, ctas = 0, switches = 0;
  double seconds = 0;
  std::map<std::string, uint64_t> kernels;   // kernel function name -> launches
};
Stats stats();

}  // namespace emu
