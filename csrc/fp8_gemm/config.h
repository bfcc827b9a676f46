#pragma once

namespace deepkernels::fp8_gemm::portable {

// Portable path (sm_80+): 4 warps in a 2x2 grid, each owning a 32x32 piece of a 64x64 output tile.
// NOTE: kBlockN = 64 divides the 128-row b_scale block, so one N tile has one b scale per K group.
// NOTE: kBlockK = 64 divides the 128-wide scale group: partial sums are promoted every 128 of K
//       (or at the end of K), fp32 registers: 32 accumulators + 32 partials per thread.
// NOTE: the contiguous grouped layout needs group segments aligned to kBlockM rows (the Python side
//       exposes 128, a multiple of it), so one M tile uses one b.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kBlockK = 64;
constexpr int kThreads = 128;
constexpr int kStages = 2;
// Shared-memory row pitch in bytes: 64 data + 16 padding keeps cp.async 16-byte alignment and spreads
// the 8 rows a fragment load touches over distinct banks.
constexpr int kSmemPitch = kBlockK + 16;

}  // namespace deepkernels::fp8_gemm::portable
