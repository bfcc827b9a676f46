#pragma once

namespace deepkernels::fp8_gemm {

// Portable (sm_80+) kernel tile: 64x64 outputs per CTA, 4 warps in a 2x2 grid of 32x32 warp tiles.
constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
// NOTE: BLOCK_K equals the scale granularity (128) so each K step is promoted with one (a, b) scale pair;
// BLOCK_N = 64 divides 128, so one b_scale row covers the whole tile.
constexpr int kBlockK = 128;
constexpr int kThreads = 128;
constexpr int kStages = 2;
// NOTE: +16 bytes per shared row: the 8 rows a warp reads for one fragment land 4 banks apart
// (no bank conflicts) while rows stay 16-byte aligned for cp.async.
constexpr int kSmemRowBytes = kBlockK + 16;
constexpr int kSmemStageBytes = (kBlockM + kBlockN) * kSmemRowBytes;
constexpr int kSmemBytes = kStages * kSmemStageBytes;  // 36 KiB: under the 48 KiB static limit

// Contiguous grouped layout: each group's row segment starts at a multiple of this, so a BLOCK_M tile
// never spans two groups (kept at 128 for the wider tiles of a Hopper kernel).
constexpr int kContiguousMAlignment = 128;

}  // namespace deepkernels::fp8_gemm
