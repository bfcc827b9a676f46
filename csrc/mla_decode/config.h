#pragma once
// Tile sizes of the MLA decode kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

namespace deepkernels::mla {

constexpr int kHeadDim = 576;    // 512 latent (= V) + 64 rope
constexpr int kHeadDimV = 512;
constexpr int kMetadataSize = 8;  // int32 words per part of the split plan
// Work-block granularity of the split plan (deepkernels/mla.py BLOCK_TOKENS): every split starts at a
// multiple of it, and it is a multiple of kBlockN.
constexpr int kBlockTokens = 64;

// Portable (sm_80+) split-KV kernel: one CTA = 32 query rows x one split, 8 warps.
// NOTE: sQ + sK (32 x 576 bf16 each, rows padded by 16 B) plus the score tiles is ~95 KB of shared
// memory, which fits sm_89's 99 KB per-block limit; a 64-row tile or double-buffered K would not.
// NOTE: the output accumulator (32 rows x 512 fp32) is split across the 8 warps by 64-column slices:
// 64 fp32 registers per thread, which keeps the kernel spill-free under 255 registers.
constexpr int kBlockM = 32;
constexpr int kBlockN = 32;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kDimsPerWarp = kHeadDimV / kWarps;  // 64
constexpr int kRowStride = kHeadDim + 8;  // bf16 elements; +16 B makes ldmatrix rows conflict-free
constexpr int kSStride = kBlockN + 4;     // fp32 scores
constexpr int kPStride = kBlockN + 8;     // bf16 probabilities; 80 B rows are conflict-free for ldmatrix
constexpr int kSoftmaxThreadsPerRow = kThreads / kBlockM;  // 8
// S = Q K^T: the 8 warps are 2 row blocks of 16 x kSplitK slices of the 576 dims.
constexpr int kSplitKWarpsPerRowBlock = 2;
constexpr int kSplitK = kWarps / kSplitKWarpsPerRowBlock;  // 4
constexpr int kDimsPerSplitK = kHeadDim / kSplitK;         // 144 = 9 mma k-steps
static_assert(kDimsPerSplitK % 16 == 0, "each dim slice is whole mma k-steps");
static_assert(kBlockTokens % kBlockN == 0, "splits must start on a kernel tile");
static_assert(kSoftmaxThreadsPerRow * 4 == kBlockN, "each softmax thread owns 4 scores of its row");

// NOTE: kStages K buffers (cp.async of tiles t+1.. overlaps the maths on tile t): 1 stage ~95 KB,
// 2 ~132 KB, 3 ~169 KB: 3 fits sm_90 (227 KB), 2 sm_80 (163 KB), sm_89 (99 KB) runs 1 stage.
// launch.cu picks the deepest that fits the device's opt-in shared memory limit.
// e4m3 cache: with kStages > 1 the raw e4m3 rows are multi-buffered by cp.async (k_raw) and converted
// into the single bf16 tile `k` right before use; with one stage they are converted through registers
// on load (no k_raw). T: the 16-bit type of q, P and the tiles (bf16, or fp16 with an fp16 cache).
template <int kStages, bool kFp8, typename T = __nv_bfloat16>
struct SplitKvSmem {
  static_assert(!kFp8 || std::is_same_v<T, __nv_bfloat16>, "an e4m3 cache is read with bf16 q");
  using Elem = T;
  static constexpr bool kStagedFp8 = kFp8 && kStages > 1;
  static constexpr int kBf16Stages = kFp8 ? 1 : kStages;
  T q[kBlockM][kRowStride];
  T k[kBf16Stages][kBlockN][kRowStride];
  uint8_t k_raw[kStagedFp8 ? kStages : 1][kBlockN][kStagedFp8 ? kHeadDim : 16];
  float s[kSplitK][kBlockM][kSStride];  // partial scores of each dim slice
  T p[kBlockM][kPStride];
  float alpha[kBlockM];
  float row_sum[kBlockM];
  float row_max[kBlockM];
  float token_scale[kStages][kBlockN];
  int64_t token_offset[kStages][kBlockN];
};

// Combine: one warp per (batch, query token, head) row; each lane owns 16 of the 512 output dims.
constexpr int kCombineWarps = 4;
// Metadata: one CTA scans the batch in chunks of kMetadataThreads sequences.
constexpr int kMetadataThreads = 512;

}  // namespace deepkernels::mla
