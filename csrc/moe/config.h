#pragma once

namespace deepkernels::moe {

// One warp per output row for the permute / quant / reduce kernels; 8 warps per CTA.
// NOTE: rows are independent, so the CTA size only trades scheduling granularity vs launch count;
// 8 warps keep >= 4 CTAs per SM resident at the kernels' register counts.
constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;

// Layout kernel: one thread per token, a shared-memory histogram of E + R counters (+ an error flag) per CTA.
// NOTE: E + R + 1 counters must fit in 48 KB of shared memory (checked on the host: E + R <= kMaxExperts).
constexpr int kLayoutThreads = 256;
constexpr int kMaxExperts = 8192;

// Un-permute + reduce reads pos / weights of a token into the lanes of its warp, 32 slots at a time: the
// first 32 stay in registers (every DeepSeek / Mixtral top-k; the combine's pos has one column per rank),
// further chunks are re-read per 256-column slab. Any K.
constexpr int kSlotsPerChunk = 32;

// Quantisation group (per-token 1x128 scales, as deepkernels.per_token_cast_to_fp8).
constexpr int kGroup = 128;
// Each lane of the quant / reduce kernels owns 8 consecutive elements of a 256-element slab
// (16 B of bf16): a 128-group is one half-warp.
constexpr int kElemsPerLane = 8;
constexpr int kSlab = 32 * kElemsPerLane;

}  // namespace deepkernels::moe
