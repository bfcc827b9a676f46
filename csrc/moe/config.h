#pragma once

namespace deepkernels::moe {

// One warp per output row for the permute / quant / reduce kernels; 8 warps per CTA.
// NOTE: rows are independent, so the CTA size only trades scheduling granularity vs launch count;
// 8 warps keep >= 4 CTAs per SM resident at the kernels' register counts.
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;

// Layout kernel: one thread per token, a shared-memory histogram of E + R counters per CTA.
// NOTE: E + R counters must fit in shared memory (checked on the host: E <= kMaxExperts).
constexpr int kLayoutThreads = 256;
constexpr int kMaxExperts = 8192;

// Un-permute + reduce reads pos / weights of a token into the lanes of its warp: topk <= 32.
constexpr int kMaxTopk = 32;

// Quantisation group (per-token 1x128 scales, as deepkernels.per_token_cast_to_fp8).
constexpr int kGroup = 128;
// Each lane of the quant / reduce kernels owns 8 consecutive elements of a 256-element slab
// (16 B of bf16): a 128-group is one half-warp.
constexpr int kElemsPerLane = 8;
constexpr int kSlab = 32 * kElemsPerLane;

}  // namespace deepkernels::moe
