#pragma once
// Split-KV MLA decode for sm_80+: bf16 (or f16) mma.sync (m16n8k16) for S = Q K^T and O = P V with an fp32
// online softmax; K rows arrive by cp.async through the block table (e4m3 rows are converted to bf16
// exactly on load, their per-token scale applied to the fp32 scores and to P).
//
// Grid (num_sm_parts, h_kv, ceil(s_q * h_q / h_kv / kBlockM)). CTA (part, kv head, m block) walks the
// sequences of its part (tile_scheduler_metadata row) and, for each, writes one split: the output
// normalised by its own softmax sum into o_accum and its lse into lse_accum (combine.cuh merges them), or,
// when the sequence has a single split, the final bf16 out and lse directly.
// Query rows of a CTA are the flattened (query token, head) pairs that share kv head blockIdx.y:
// row r -> token r / heads_per_kv, head blockIdx.y * heads_per_kv + r % heads_per_kv.
#include <cuda_fp8.h>

#include "../common/ptx.cuh"
#include "config.h"
#include "metadata.cuh"
#include "params.h"
#include "split_output.cuh"

namespace deepkernels::mla {

// 16 e4m3 -> 16 bf16, exact (every e4m3 value is representable in bf16).
__device__ __forceinline__ void e4m3x16_to_bf16(const uint4& in, uint4 (&out)[2]) {
  uint32_t dst[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const auto pair = static_cast<__nv_fp8x2_storage_t>(word_of(in, i / 2) >> (16 * (i % 2)));
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3);
    const float2 f = __half22float2(__half2(h));
    dst[i] = pack_bf16x2(f.x, f.y);
  }
  out[0] = make_uint4(dst[0], dst[1], dst[2], dst[3]);
  out[1] = make_uint4(dst[4], dst[5], dst[6], dst[7]);
}

// Loads kBlockM query rows (zero for rows past the end) with cp.async.
template <typename Smem>
__device__ __forceinline__ void load_q_tile(const MlaDecodeParams& p, Smem& sm, int batch, int kv_head,
                                            int row0, int rows_total, int heads_per_kv) {
  constexpr int kChunksPerRow = kHeadDim / 8;  // 16 B = 8 bf16
  using T = typename Smem::Elem;
  const auto* q = static_cast<const T*>(p.q);
  for (int c = threadIdx.x; c < kBlockM * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const int row = row0 + r;
    const bool valid = row < rows_total;
    const int token = valid ? row / heads_per_kv : 0;
    const int head = kv_head * heads_per_kv + (valid ? row % heads_per_kv : 0);
    const T* src = q + batch * p.q_batch_stride + token * p.q_seq_stride + head * p.q_head_stride;
    ptx::cp_async_16(&sm.q[r][chunk * 8], src + chunk * 8, valid);
  }
}

// Row offsets (elements) and per-token scales of keys [n0, n0 + kBlockN) into `stage`. Keys at or past
// kv_end get offset -1 (zero-filled, never read) / scale 0 and their block-table entries are never read.
// A block-table entry outside [0, num_blocks), or a key past the block table's max_blocks pages (values are
// trusted; DEEPKERNELS_CHECK=1 validates them), is never dereferenced either: offset -1 and scale NaN, so
// the rows that see that key come out NaN instead of reading another sequence's (or no) memory.
// A key row's cache offset and token scale (what lookup_k_row returns for one key position).
struct KRow {
  int64_t offset;
  float scale;
};

// Called by threads < kBlockN for key pos: one tile AHEAD of its use (attend_split keeps the result in registers
// and stores it to token_offset / token_scale when the tile is issued), so the block-table and scale reads are in
// flight while the current tile is copied and computed.
template <bool kFp8>
__device__ __forceinline__ KRow lookup_k_row(const MlaDecodeParams& p, int batch, int kv_head, int pos, int kv_end) {
  KRow row{-1, 0.f};
  if (pos < kv_end) {
    const int block = pos / p.page_size;
    const int page = block >= 0 && block < p.max_blocks ? p.block_table[batch * p.block_table_stride + block] : -1;
    const int slot = pos % p.page_size;
    if (page >= 0 && page < p.num_blocks) {
      row.offset = page * p.kv_block_stride + slot * p.kv_page_stride + kv_head * p.kv_head_stride;
      row.scale = kFp8 ? p.kv_scale[(static_cast<int64_t>(page) * p.page_size + slot) * p.h_kv + kv_head] : 1.f;
    } else {
      row.scale = __int_as_float(0x7fffffff);
    }
  }
  return row;
}

// Loads keys [n0, n0 + kBlockN) of a sequence into `stage`; rows with offset -1 (at or past kv_end, or an
// invalid page) are zero and never read. token_offset[stage] must already hold this tile's row offsets (after a
// barrier).
template <bool kFp8, typename Smem>
__device__ __forceinline__ void load_k_tile(const MlaDecodeParams& p, Smem& sm, int stage) {
  if constexpr (Smem::kStagedFp8) {
    constexpr int kChunksPerRow = kHeadDim / 16;  // 16 B = 16 e4m3
    const auto* kv = static_cast<const uint8_t*>(p.kv);
    for (int c = threadIdx.x; c < kBlockN * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
      const int64_t offset = sm.token_offset[stage][r];
      ptx::cp_async_16(&sm.k_raw[stage][r][chunk * 16], kv + (offset >= 0 ? offset : 0) + chunk * 16, offset >= 0);
    }
  } else if constexpr (!kFp8) {
    constexpr int kChunksPerRow = kHeadDim / 8;
    const auto* kv = static_cast<const typename Smem::Elem*>(p.kv);
    for (int c = threadIdx.x; c < kBlockN * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
      const int64_t offset = sm.token_offset[stage][r];
      ptx::cp_async_16(&sm.k[stage][r][chunk * 8], kv + (offset >= 0 ? offset : 0) + chunk * 8, offset >= 0);
    }
  } else {
    constexpr int kChunksPerRow = kHeadDim / 16;  // 16 B = 16 e4m3
    const auto* kv = static_cast<const uint8_t*>(p.kv);
    for (int c = threadIdx.x; c < kBlockN * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
      uint4 converted[2] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
      const int64_t offset = sm.token_offset[stage][r];
      if (offset >= 0) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(kv + offset + chunk * 16));
        e4m3x16_to_bf16(raw, converted);
      }
      *reinterpret_cast<uint4*>(&sm.k[stage][r][chunk * 16]) = converted[0];
      *reinterpret_cast<uint4*>(&sm.k[stage][r][chunk * 16 + 8]) = converted[1];
    }
  }
}

// Staged e4m3 path: raw rows of `stage` (zero past kv_end) -> the bf16 tile, exactly.
template <typename Smem>
__device__ __forceinline__ void convert_staged_k_tile(Smem& sm, int stage) {
  constexpr int kChunksPerRow = kHeadDim / 16;
  for (int c = threadIdx.x; c < kBlockN * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, chunk = c % kChunksPerRow;
    uint4 converted[2];
    e4m3x16_to_bf16(*reinterpret_cast<const uint4*>(&sm.k_raw[stage][r][chunk * 16]), converted);
    *reinterpret_cast<uint4*>(&sm.k[0][r][chunk * 16]) = converted[0];
    *reinterpret_cast<uint4*>(&sm.k[0][r][chunk * 16 + 8]) = converted[1];
  }
}

// Attention of this CTA's query rows over keys [kv_begin, kv_end) of one sequence -> split `split`.
template <typename T, bool kFp8, int kStages>
__device__ void attend_split(const MlaDecodeParams& p, SplitKvSmem<kStages, kFp8, T>& sm, int batch, int kv_head, int m_block,
                             int kv_begin, int kv_end, int seqlen, int split) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int heads_per_kv = p.h_q / p.h_kv;
  const int rows_total = p.s_q * heads_per_kv;
  const int row0 = m_block * kBlockM;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;

  load_q_tile(p, sm, batch, kv_head, row0, rows_total, heads_per_kv);
  ptx::cp_async_commit();

  // Softmax ownership: thread tid handles scores [4 * (tid % 8), +4) of row tid / 8.
  const int sm_row = tid / kSoftmaxThreadsPerRow;
  const int sm_col = (tid % kSoftmaxThreadsPerRow) * 4;
  // Last key position row sm_row may see (bottom-right causal mask); rows past the end see nothing.
  int sm_last_visible = -1;
  if (row0 + sm_row < rows_total) {
    sm_last_visible = p.causal ? seqlen - p.s_q + (row0 + sm_row) / heads_per_kv : seqlen - 1;
  }
  float row_max = -INFINITY, row_sum = 0.f;

  float acc_o[2][kDimsPerWarp / 8][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < kDimsPerWarp / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc_o[mt][nt][i] = 0.f;

  // Tile t lives in stage t % kStages. With kStages > 1 the cp.async loads of tiles t + 1 ..
  // t + kStages - 1 are in flight while tile t is computed; with one, each tile is loaded then computed.
  const int num_tiles = (kv_end - kv_begin + kBlockN - 1) / kBlockN;
  // Threads < kBlockN: key row `tid` of the next tile to issue (tiles are issued in order), looked up one tile ahead.
  KRow ahead{-1, 0.f};
  auto lookup = [&](int t) {
    if (tid < kBlockN && t < num_tiles) ahead = lookup_k_row<kFp8>(p, batch, kv_head, kv_begin + t * kBlockN + tid, kv_end);
  };
  lookup(0);
  auto issue_tile = [&](int t) {
    const int stage = t % kStages;
    if (tid < kBlockN) {
      sm.token_offset[stage][tid] = ahead.offset;
      sm.token_scale[stage][tid] = ahead.scale;
    }
    lookup(t + 1);  // tile t + 1's reads land while tile t is copied (and the tiles before it are computed)
    __syncthreads();
    load_k_tile<kFp8>(p, sm, stage);
    ptx::cp_async_commit();
  };
#pragma unroll 1
  for (int t = 0; t < kStages - 1 && t < num_tiles; ++t) issue_tile(t);
#pragma unroll 1
  for (int t = 0; t < num_tiles; ++t) {
    const int n0 = kv_begin + t * kBlockN;
    const int stage = t % kStages;
    if constexpr (kStages == 1) {
      issue_tile(t);
      ptx::cp_async_wait_all();
    } else if (t + kStages - 1 < num_tiles) {
      // its stage, (t - 1) % kStages, was last read by tile t - 1, which ended with a barrier
      issue_tile(t + kStages - 1);
      ptx::cp_async_wait_group<kStages - 1>();  // tile t (and the q tile) have landed
    } else {
      ptx::cp_async_wait_all();  // the last kStages - 1 tiles: drain
    }
    __syncthreads();
    if constexpr (SplitKvSmem<kStages, kFp8, T>::kStagedFp8) {
      convert_staged_k_tile(sm, stage);  // sm.k[0] was last read by tile t - 1, which ended with a barrier
      __syncthreads();
    }
    const auto& k_tile = sm.k[kFp8 ? 0 : stage];
    const float* token_scale = sm.token_scale[stage];

    // S = Q K^T split over the 576 dims: warp -> 16 rows (warp % 2) x all 32 keys x dims
    // [144 * (warp / 2), +144); the 4 partial sums are added by the softmax threads. One A fragment feeds
    // 4 mma (one per 8-key tile), so shared-memory loads per mma are half of a keys-split layout.
    {
      const int mt = warp % 2, kq = warp / kSplitKWarpsPerRowBlock;
      float acc_s[kBlockN / 8][4];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc_s[j][i] = 0.f;
#pragma unroll 3
      for (int k0 = kq * kDimsPerSplitK; k0 < (kq + 1) * kDimsPerSplitK; k0 += 16) {
        uint32_t a[4];
        ptx::ldmatrix_x4(a, &sm.q[mt * 16 + lane % 16][k0 + (lane / 16) * 8]);
#pragma unroll
        for (int jp = 0; jp < kBlockN / 16; ++jp) {
          uint32_t b[4];  // keys [16 jp, +16) x dims [k0, +16): b0 b1 for key tile 2 jp, b2 b3 for 2 jp + 1
          ptx::ldmatrix_x4(b, &k_tile[(jp * 2 + lane / 16) * 8 + lane % 8][k0 + ((lane / 8) % 2) * 8]);
          mma_16816<T>(acc_s[jp * 2], a, b[0], b[1]);
          mma_16816<T>(acc_s[jp * 2 + 1], a, b[2], b[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = mt * 16 + lane / 4 + half * 8;
          const int c = j * 8 + (lane % 4) * 2;
          *reinterpret_cast<float2*>(&sm.s[kq][r][c]) = make_float2(acc_s[j][half * 2], acc_s[j][half * 2 + 1]);
        }
      }
    }
    __syncthreads();

    // Online softmax in the log2 domain; masked keys get -inf (never a product with garbage).
    {
      float s[4];
      float tile_max = -INFINITY;
      float4 sum = *reinterpret_cast<const float4*>(&sm.s[0][sm_row][sm_col]);
#pragma unroll
      for (int kq = 1; kq < kSplitK; ++kq) {
        const float4 part = *reinterpret_cast<const float4*>(&sm.s[kq][sm_row][sm_col]);
        sum.x += part.x;
        sum.y += part.y;
        sum.z += part.z;
        sum.w += part.w;
      }
      const float raw[4] = {sum.x, sum.y, sum.z, sum.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int pos = n0 + sm_col + j;
        s[j] = (pos < kv_end && pos <= sm_last_visible) ? raw[j] * scale_log2 * token_scale[sm_col + j] : -INFINITY;
        tile_max = nan_propagating_max(tile_max, s[j]);
      }
#pragma unroll
      for (int offset = 1; offset < kSoftmaxThreadsPerRow; offset <<= 1) {
        tile_max = nan_propagating_max(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, offset));
      }
      const float new_max = nan_propagating_max(row_max, tile_max);
      const float ref = new_max == -INFINITY ? 0.f : new_max;  // a row with no key yet stays all-zero
      const float alpha = ptx::ex2(row_max - ref);
      float tile_sum = 0.f;
      float prob[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        prob[j] = ptx::ex2(s[j] - ref);
        tile_sum += prob[j];
      }
#pragma unroll
      for (int offset = 1; offset < kSoftmaxThreadsPerRow; offset <<= 1) {
        tile_sum += __shfl_xor_sync(0xffffffffu, tile_sum, offset);
      }
      row_sum = row_sum * alpha + tile_sum;
      row_max = new_max;
      // V rows of an e4m3 cache carry the same per-token scale: fold it into P.
      uint2 packed;
      packed.x = pack_16x2<T>(prob[0] * token_scale[sm_col], prob[1] * token_scale[sm_col + 1]);
      packed.y = pack_16x2<T>(prob[2] * token_scale[sm_col + 2], prob[3] * token_scale[sm_col + 3]);
      *reinterpret_cast<uint2*>(&sm.p[sm_row][sm_col]) = packed;
      if (tid % kSoftmaxThreadsPerRow == 0) sm.alpha[sm_row] = alpha;
    }
    __syncthreads();

    // O = O * alpha + P V: warp -> all 32 rows x dims [64 * warp, +64).
    {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const float alpha_lo = sm.alpha[mt * 16 + lane / 4], alpha_hi = sm.alpha[mt * 16 + lane / 4 + 8];
#pragma unroll
        for (int nt = 0; nt < kDimsPerWarp / 8; ++nt) {
          acc_o[mt][nt][0] *= alpha_lo;
          acc_o[mt][nt][1] *= alpha_lo;
          acc_o[mt][nt][2] *= alpha_hi;
          acc_o[mt][nt][3] *= alpha_hi;
        }
      }
#pragma unroll
      for (int k0 = 0; k0 < kBlockN; k0 += 16) {
        uint32_t a[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) ptx::ldmatrix_x4(a[mt], &sm.p[mt * 16 + lane % 16][k0 + (lane / 16) * 8]);
#pragma unroll
        for (int np = 0; np < kDimsPerWarp / 16; ++np) {
          uint32_t b[4];
          ptx::ldmatrix_x4_trans(b, &k_tile[k0 + lane % 8 + ((lane / 8) % 2) * 8]
                                          [warp * kDimsPerWarp + np * 16 + (lane / 16) * 8]);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_16816<T>(acc_o[mt][np * 2], a[mt], b[0], b[1]);
            mma_16816<T>(acc_o[mt][np * 2 + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // this stage, sP and alpha are rewritten by later tiles
  }

  // Q was loaded but no tile ran (cannot happen for a non-empty split, but keep the group drained).
  ptx::cp_async_wait_all();
  if (tid % kSoftmaxThreadsPerRow == 0) {
    sm.row_sum[sm_row] = row_sum;
    sm.row_max[sm_row] = row_max;
  }
  __syncthreads();

  const SplitOutput<T> output(p, batch, split);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = mt * 16 + lane / 4 + half * 8;
      const int row = row0 + r;
      if (row >= rows_total) continue;
      const int out_row = (row / heads_per_kv) * p.h_q + kv_head * heads_per_kv + row % heads_per_kv;
      // A row that saw no key is exactly 0 (its P was 0, but 0 times a NaN V row of a masked key is NaN).
      const bool seen = sm.row_max[r] != -INFINITY;
      const float inv = 1.f / sm.row_sum[r];
      const int64_t col0 = static_cast<int64_t>(out_row) * kHeadDimV + warp * kDimsPerWarp + (lane % 4) * 2;
#pragma unroll
      for (int nt = 0; nt < kDimsPerWarp / 8; ++nt) {
        output.store_pair(col0 + nt * 8, seen ? acc_o[mt][nt][half * 2] * inv : 0.f,
                          seen ? acc_o[mt][nt][half * 2 + 1] * inv : 0.f);
      }
    }
  }
  if (tid < kBlockM && row0 + tid < rows_total) {
    const int row = row0 + tid;
    output.store_lse(p, row / heads_per_kv, kv_head * heads_per_kv + row % heads_per_kv,
                     sm.row_max[tid] != -INFINITY, sm.row_max[tid], sm.row_sum[tid]);
  }
  __syncthreads();  // the next sequence reuses sQ and the row statistics
}

// T: bf16 or fp16 (q, the 16-bit cache, P and out); kFp8: e4m3 cache (with bf16 q).
template <typename T, bool kFp8, int kStages>
__global__ void __launch_bounds__(kThreads, 1) mla_splitkv_kernel(const MlaDecodeParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<SplitKvSmem<kStages, kFp8, T>*>(smem_raw);
  for_each_split_of_part(p, [&](int batch, int kv_begin, int kv_end, int seqlen, int split) {
    attend_split<T, kFp8, kStages>(p, sm, batch, blockIdx.y, blockIdx.z, kv_begin, kv_end, seqlen, split);
  });
}

}  // namespace deepkernels::mla
