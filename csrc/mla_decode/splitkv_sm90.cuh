#pragma once
// Hopper (sm_90a) split-KV MLA decode, OFF by default (DEEPKERNELS_MLA_SM90=1 enables it on an sm_90
// device with a bf16 or fp16 cache; an e4m3 cache always runs the portable kernel). NOT YET RUN ON A GPU.
//
// Same contract as splitkv_portable.cuh: grid (num_sm_parts, h_kv, ceil(s_q * h_q / h_kv / 64)); CTA
// (part, kv head, m block) walks the splits of its part (tile_scheduler_metadata row) and writes, per split,
// the normalised fp32 partial + lse for combine.cuh, or for a sequence with a single split the final bf16
// out + lse. Query row r of a CTA = (token r / heads_per_kv, head kv_head * heads_per_kv + r % heads_per_kv).
//
// Pipeline (256 threads = two math warpgroups WG0, WG1; no producer warp):
//   shared memory: Q [64 x 576] | K ring 2 x [64 keys x 576] | P [64 x 64] bf16, all in the wgmma 128-byte
//   swizzle layout: 9 column blocks of 64 dims (128 B rows, 8 KB each); 16-byte chunk c of row r stored at
//   chunk c ^ (r % 8). 224 KB (+1 KB alignment slack) dynamic + 1 KB static.
//   per 64-key tile t (stage t % 2):
//     wait for K(t) (cp.async) -> barrier -> issue K(t + 1) into the other stage (cp.async, 18 x 16 B per
//       thread; its block-table entries were read one tile ahead)
//     S_w = Q K[32w .. 32w + 32)^T    WG w: 36 x wgmma m64n32k16 (A = Q, B = K rows, both K-major from smem)
//     online softmax on S_w in registers: scale, mask (key >= split end, bottom-right causal), row max
//       exchanged between the WGs through smem (64 floats each), P_w = exp2(S - max) -> bf16 -> smem
//     O_w = O_w * alpha + P V[:, 256w .. 256w + 256)    WG w: 4 x wgmma m64n256k16, A = P (K-major smem),
//       B = the SAME K tile read as V (MN-major, transposed descriptor): no second copy of V
//   O_w is 64 x 256 fp32 = 128 registers per thread; S_w 16.
// Why cp.async and not TMA: the tile is gathered through block_table in pages of any multiple of 16 tokens
// (a 64-key tile spans 1-4 pages, page 48 not even aligned); cp.async issues one 16-byte copy per (row,
// chunk) with a per-row source, and its zero-fill (src-size 0) clears rows at or past the split end for
// free -- those cache slots may hold NaN, and P = 0 times a NaN V row would still be NaN in the MMA. (Rows
// of an out-of-range block-table entry are NaN-filled instead, so the error shows.) TMA
// would need a host tensor map, boxes of 16 rows per page and an explicit zeroing pass over tail rows.
// TODO(next, needs a GPU): mbarrier-tracked column-block arrival so S starts on the first 8 KB; overlap
// S(t + 1) with P V(t) across the warpgroups (FlashMLA-style); an e4m3 path (convert in smem).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "../common/ptx.cuh"
#include "../common/ptx_sm90.cuh"
#include "config.h"
#include "metadata.cuh"
#include "params.h"
#include "split_output.cuh"

namespace deepkernels::mla::sm90 {

constexpr int kBlockM = 64;   // query rows per CTA
constexpr int kBlockN = 64;   // keys per tile
constexpr int kThreads = 256; // two warpgroups
constexpr int kStages = 2;
constexpr int kRowBytes = 128;                               // 64 bf16: one 128-byte swizzle row
constexpr int kColBlocks = kHeadDim / 64;                    // 9 column blocks of 64 dims
constexpr int kColBlockBytes = kBlockN * kRowBytes;          // 8 KB (64 rows)
constexpr int kTileBytes = kColBlocks * kColBlockBytes;      // 72 KB (Q, or one K stage)
constexpr int kKeysPerWarpgroup = kBlockN / 2;               // S columns of each warpgroup
constexpr int kDimsPerWarpgroup = kHeadDimV / 2;             // O columns of each warpgroup
// Dynamic shared memory: offsets from a 1024-byte aligned base (the swizzle pattern repeats every 1 KB
// and the descriptors assume base offset 0); kSmemBytes carries the slack to align the base.
constexpr int kOffQ = 0;
constexpr int kOffK = kOffQ + kTileBytes;
constexpr int kOffP = kOffK + kStages * kTileBytes;
constexpr int kSmemUsed = kOffP + kColBlockBytes;            // 229376
constexpr int kSmemBytes = kSmemUsed + 1024;
// NOTE: 1 KB of row statistics are static __shared__ (launch.cu also uses their presence to detect
// that the loaded binary is the sm_90a build and not an empty stub); with them the CTA needs 231424 B,
// under sm_90's 232448-byte opt-in limit. A third K stage (72 KB) does not fit.
constexpr int kStaticSmemBytes = 4 * kBlockM * static_cast<int>(sizeof(float));
static_assert(kBlockN == kBlockTokens, "splits start on a tile");
static_assert(kBlockM == 64 && kBlockN == 64, "wgmma M = 64; loader rows tid / 8, + 32; Q, K share kColBlockBytes");
static_assert(kSmemBytes + kStaticSmemBytes <= 232448, "fits sm_90's opt-in shared memory");

// Matrix descriptors (PTX ISA "matrix descriptor format"): start address >> 4 in bits 0-13 (added per
// use), leading byte offset >> 4 in 16-29, stride byte offset >> 4 in 32-45, swizzle mode in 62-63
// (1 = 128 B). K-major 128B swizzle: SBO = 1024 (next 8 rows), LBO unused (1). MN-major 128B swizzle
// (V: keys are K, dims are N, dims contiguous): LBO = 8192 (next 64-dim column block), SBO = 1024 (next 8 keys).
constexpr uint64_t kSwizzle128 = uint64_t{1} << 62;
constexpr uint64_t kDescKMajor = kSwizzle128 | (uint64_t{1024 >> 4} << 32) | (uint64_t{1} << 16);
constexpr uint64_t kDescMnMajor =
    kSwizzle128 | (uint64_t{1024 >> 4} << 32) | (uint64_t{kColBlockBytes >> 4} << 16);

__device__ __forceinline__ uint64_t desc(uint64_t base, uint32_t smem_addr) { return base + (smem_addr >> 4); }

// Byte offset of 16-byte chunk `chunk` (0..7) of row `row` inside a 128B-swizzled column block.
__device__ __forceinline__ uint32_t swizzle(int row, int chunk) {
  return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ (row & 7)) << 4));
}

#if DEEPKERNELS_SM90A

// Row statistics shared by the warpgroups (static so launch.cu can tell the real kernel from a stub).
struct RowStats {
  float max[2][kBlockM];  // per-tile row max of each warpgroup's key half
  float sum[2][kBlockM];  // final row sums of each warpgroup's key half
};
static_assert(sizeof(RowStats) == kStaticSmemBytes, "static shared memory as launch.cu expects");

// A loader row's source: an element offset >= 0, or one of these.
constexpr int64_t kZeroRow = -1;     // at or past the split end: zero-filled, never read
constexpr int64_t kInvalidRow = -2;  // a block-table entry outside [0, num_blocks) (or past max_blocks): NaN-filled

// Element offset of the cache row of key `pos` (pos must be < the sequence length), or kInvalidRow: block-table
// values are trusted (DEEPKERNELS_CHECK=1 validates them) but an out-of-range page is never dereferenced; its
// key scores NaN so the rows that see it show the error.
__device__ __forceinline__ int64_t kv_row_offset(const MlaDecodeParams& p, int batch, int kv_head, int pos) {
  const int block = pos / p.page_size;
  const int page = block >= 0 && block < p.max_blocks ? p.block_table[batch * p.block_table_stride + block] : -1;
  if (page < 0 || page >= p.num_blocks) return kInvalidRow;
  return page * p.kv_block_stride + (pos % p.page_size) * p.kv_page_stride + kv_head * p.kv_head_stride;
}

// Loader mapping (Q and K tiles): thread -> rows lr and lr + 32 (lr = tid / 8), chunk lc = tid % 8 of each
// of the 9 column blocks. A warp instruction covers 4 rows x 128 contiguous bytes. Row i comes from
// src + offset[i] (cp.async), or is zero-filled (kZeroRow, cp.async src-size 0) or NaN-filled (kInvalidRow,
// plain stores, published to the tensor cores by the fence.proxy.async before the tile is used).
template <typename T>
__device__ __forceinline__ void load_rows(uint8_t* smem, uint32_t smem_base, uint32_t dst_tile,
                                          const T* src, const int64_t (&offset)[2], int lr, int lc) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t dst = dst_tile + swizzle(lr + 32 * i, lc);
    if (offset[i] == kInvalidRow) {
      constexpr uint32_t kNan2 = std::is_same_v<T, __half> ? 0x7e007e00u : 0x7fc07fc0u;  // two f16 / bf16 NaN
      const uint4 nan4 = make_uint4(kNan2, kNan2, kNan2, kNan2);
#pragma unroll
      for (int cb = 0; cb < kColBlocks; ++cb) {
        *reinterpret_cast<uint4*>(smem + (dst - smem_base) + cb * kColBlockBytes) = nan4;
      }
    } else {
      const bool valid = offset[i] >= 0;
      const T* row = src + (valid ? offset[i] : 0);
#pragma unroll
      for (int cb = 0; cb < kColBlocks; ++cb) ptx::cp_async_16(dst + cb * kColBlockBytes, row + cb * 64 + lc * 8, valid);
    }
  }
}

// Attention of this CTA's 64 query rows over keys [kv_begin, kv_end) of one sequence -> split `split`.
// T: bf16 or fp16 (q, cache, P, out): the f16 wgmma variants for fp16.
template <typename T>
__device__ __forceinline__ void attend_split(const MlaDecodeParams& p, uint8_t* smem, uint32_t smem_base,
                                             RowStats& stats, int batch, int kv_head, int m_block, int kv_begin,
                                             int kv_end, int seqlen, int split) {
  const int tid = threadIdx.x;
  const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int heads_per_kv = p.h_q / p.h_kv;
  const int rows_total = p.s_q * heads_per_kv;
  const int row0 = m_block * kBlockM;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const auto* kv = static_cast<const T*>(p.kv);
  const int lr = tid / 8, lc = tid % 8;

  // Q rows (zero past the end) and K tile 0, one cp.async group.
  {
    const auto* q = static_cast<const T*>(p.q);
    int64_t q_off[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + lr + 32 * i;
      q_off[i] = row < rows_total ? batch * p.q_batch_stride + (row / heads_per_kv) * p.q_seq_stride +
                                        (kv_head * heads_per_kv + row % heads_per_kv) * p.q_head_stride
                                  : kZeroRow;
    }
    load_rows(smem, smem_base, smem_base + kOffQ, q, q_off, lr, lc);
  }
  const int num_tiles = (kv_end - kv_begin + kBlockN - 1) / kBlockN;
  // Cache-row offsets of this thread's two loader rows for the next tile to issue (kZeroRow past kv_end).
  int64_t next_off[2];
  auto lookup = [&](int tile) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int pos = kv_begin + tile * kBlockN + lr + 32 * i;
      next_off[i] = pos < kv_end ? kv_row_offset(p, batch, kv_head, pos) : kZeroRow;
    }
  };
  auto issue = [&](int tile) {
    load_rows(smem, smem_base, smem_base + kOffK + (tile % kStages) * kTileBytes, kv, next_off, lr, lc);
    ptx::cp_async_commit();
  };
  lookup(0);
  issue(0);
  if (num_tiles > 1) lookup(1);

  // Accumulator layout (m64nN): warp w of a warpgroup owns rows 16w..16w+15; d[4i + 2h + j] is row
  // 16w + g + 8h, column 8i + 2 t4 + j. Both S_w and O_w follow it, so a thread's rows are the same in both.
  int last_visible[2];  // last key a row may see (bottom-right causal); -1 for padding rows
  float row_max[2], row_sum[2];  // running max (log2 domain, same in both warpgroups); this thread's partial sum
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + warp * 16 + g + 8 * h;
    last_visible[h] = row >= rows_total ? -1 : (p.causal ? seqlen - p.s_q + row / heads_per_kv : seqlen - 1);
    row_max[h] = -INFINITY;
    row_sum[h] = 0.f;
  }
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;

  const uint32_t q_tile = smem_base + kOffQ, p_tile = smem_base + kOffP;
#pragma unroll 1
  for (int t = 0; t < num_tiles; ++t) {
    const int stage = t % kStages;
    const uint32_t k_tile = smem_base + kOffK + stage * kTileBytes;
    ptx::cp_async_wait_all();  // K(t) (and at t = 0 Q) landed for this thread's copies
    ptx::sm90::fence_proxy_async();       // ... and is visible to the tensor cores (async proxy)
    __syncthreads();           // everyone's copies; everyone finished tile t - 1, so its stage is free
    if (t + 1 < num_tiles) {
      issue(t + 1);
      if (t + 2 < num_tiles) lookup(t + 2);  // block-table reads land while this tile computes
    }

    // S_w = Q K[32 wg .. +32)^T over the 576 dims: 9 column blocks x 4 k-steps of 16.
    float s[16];
#pragma unroll
    for (int i = 0; i < 16; ++i) s[i] = 0.f;
    ptx::sm90::register_fence(s);
    // Tiles are 1024-byte aligned, so a compile-time byte offset adds offset >> 4 to a descriptor.
    const uint64_t desc_q = desc(kDescKMajor, q_tile);
    const uint64_t desc_k = desc(kDescKMajor, k_tile + wg * kKeysPerWarpgroup * kRowBytes);
    ptx::sm90::wgmma_fence();
#pragma unroll
    for (int cb = 0; cb < kColBlocks; ++cb) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const uint32_t off = (cb * kColBlockBytes + kk * 32) >> 4;
        if constexpr (std::is_same_v<T, __half>) {
          ptx::sm90::wgmma_m64n32k16_f16(s, desc_q + off, desc_k + off, cb + kk > 0);
        } else {
          ptx::sm90::wgmma_m64n32k16_bf16(s, desc_q + off, desc_k + off, cb + kk > 0);
        }
      }
    }
    ptx::sm90::wgmma_commit();
    ptx::sm90::wgmma_wait<0>();
    ptx::sm90::register_fence(s);

    // Online softmax (log2 domain). Masked keys get -inf before the exp, so P is exactly 0 there; keys at or
    // past kv_end were zero-filled by cp.async, so neither S nor V of this tile holds NaN.
    const int n0 = kv_begin + t * kBlockN;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int pos = n0 + wg * kKeysPerWarpgroup + 8 * i + 2 * t4 + j;
          float& v = s[4 * i + 2 * h + j];
          v = (pos < kv_end && pos <= last_visible[h]) ? v * scale_log2 : -INFINITY;
          tile_max[h] = nan_propagating_max(tile_max[h], v);
        }
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = nan_propagating_max(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = nan_propagating_max(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      if (t4 == 0) stats.max[wg][warp * 16 + g + 8 * h] = tile_max[h];
    }
    __syncthreads();  // both halves' row maxima
    float alpha[2], ref[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float other = stats.max[wg ^ 1][warp * 16 + g + 8 * h];
      const float new_max = nan_propagating_max(row_max[h], nan_propagating_max(tile_max[h], other));
      ref[h] = new_max == -INFINITY ? 0.f : new_max;  // a row with no key yet stays all-zero
      alpha[h] = ptx::ex2(row_max[h] - ref[h]);
      row_max[h] = new_max;
      row_sum[h] *= alpha[h];
    }
    // P_w -> smem (bf16, same swizzle; key column 32 wg + 8 i + 2 t4 is in chunk 4 wg + i of its row).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float p0 = ptx::ex2(s[4 * i + 2 * h] - ref[h]), p1 = ptx::ex2(s[4 * i + 2 * h + 1] - ref[h]);
        row_sum[h] += p0 + p1;
        const int row = warp * 16 + g + 8 * h;
        *reinterpret_cast<uint32_t*>(smem + kOffP + swizzle(row, wg * 4 + i) + t4 * 4) = pack_16x2<T>(p0, p1);
      }
    }
#pragma unroll
    for (int i = 0; i < 32; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        o[4 * i + 2 * h] *= alpha[h];
        o[4 * i + 2 * h + 1] *= alpha[h];
      }
    }
    ptx::sm90::fence_proxy_async();  // generic-proxy P stores -> wgmma reads
    __syncthreads();      // all of P

    // O_w += P V[:, 256 wg .. +256): 4 k-steps of 16 keys; V = the K tile, dims 256 wg.. = column blocks 4 wg..
    ptx::sm90::register_fence(o);  // the alpha rescale happens before wgmma.fence, as wgmma requires
    const uint64_t desc_p = desc(kDescKMajor, p_tile);
    const uint64_t desc_v = desc(kDescMnMajor, k_tile + wg * 4 * kColBlockBytes);
    ptx::sm90::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const uint64_t a = desc_p + ((kk * 32) >> 4), b = desc_v + ((kk * 16 * kRowBytes) >> 4);
      if constexpr (std::is_same_v<T, __half>) {
        ptx::sm90::wgmma_m64n256k16_f16_tnsp_b(o, a, b);
      } else {
        ptx::sm90::wgmma_m64n256k16_bf16_tnsp_b(o, a, b);
      }
    }
    ptx::sm90::wgmma_commit();
    ptx::sm90::wgmma_wait<0>();
    ptx::sm90::register_fence(o);
  }
  ptx::cp_async_wait_all();  // nothing in flight (defensive: a split always has a tile)

  // Row sums: this thread's partial -> quad -> both warpgroups.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
    if (t4 == 0) stats.sum[wg][warp * 16 + g + 8 * h] = row_sum[h];
  }
  __syncthreads();

  const SplitOutput<T> output(p, batch, split);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    const int row = row0 + r;
    if (row >= rows_total) continue;
    const int token = row / heads_per_kv, head = kv_head * heads_per_kv + row % heads_per_kv;
    const float l = stats.sum[0][r] + stats.sum[1][r];
    // A row that saw no key is exactly 0 (its P was 0, but 0 times a NaN V row of a masked key is NaN).
    const bool seen = row_max[h] != -INFINITY;
    const float inv = 1.f / l;
    const int64_t col0 = static_cast<int64_t>(token * p.h_q + head) * kHeadDimV + wg * kDimsPerWarpgroup + 2 * t4;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      output.store_pair(col0 + 8 * i, seen ? o[4 * i + 2 * h] * inv : 0.f, seen ? o[4 * i + 2 * h + 1] * inv : 0.f);
    }
    if (wg == 0 && t4 == 0) output.store_lse(p, token, head, seen, row_max[h], l);
  }
  __syncthreads();  // the next split reuses Q, the K ring and the row statistics
}

#endif  // sm_90a

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) mla_splitkv_sm90_kernel(const MlaDecodeParams p) {
#if DEEPKERNELS_SM90A
  __shared__ RowStats stats;
  extern __shared__ __align__(16) uint8_t sm90_smem[];
  const uint32_t raw = ptx::smem_addr(sm90_smem);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = sm90_smem + (base - raw);
  for_each_split_of_part(p, [&](int batch, int kv_begin, int kv_end, int seqlen, int split) {
    attend_split<T>(p, smem, base, stats, batch, blockIdx.y, blockIdx.z, kv_begin, kv_end, seqlen, split);
  });
#else
  (void)p;
#endif
}

}  // namespace deepkernels::mla::sm90
