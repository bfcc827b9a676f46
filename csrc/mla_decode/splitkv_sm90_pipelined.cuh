#pragma once
// Hopper (sm_90a) split-KV MLA decode, variant "sm90_pipelined" (DEEPKERNELS_MLA_VARIANT=sm90_pipelined):
// FlashMLA's structure -- a producer warp, an mbarrier-synchronised K ring, whole 64-key tiles alternating
// between two math warpgroups, register-resident P for the local warpgroup. NOT YET RUN ON A GPU (verified
// under the SIMT emulator on the same cases as splitkv_sm90.cuh, which stays the "sm90" variant).
//
// Same contract as splitkv_sm90.cuh: grid (num_sm_parts, h_kv, ceil(s_q * h_q / h_kv / 64)), the same plan,
// partials + lse and combine; query row r of a CTA = (token r / heads_per_kv, head kv_head * heads_per_kv +
// r % heads_per_kv); bf16 or fp16 (q, cache, P, out), or an e4m3 cache with per-token scales (bf16 q, P, out),
// dequantised into shared memory by the producer.
//
// 384 threads: warps 0-3 = math warpgroup WG0, warps 4-7 = WG1, warps 8-11 = the producer (setmaxnreg 64 / 224).
// Shared memory (the wgmma 128-byte swizzle, as splitkv_sm90.cuh): Q [64 x 576] | K ring 2 x [64 x 576] |
// P [64 x 64] | row statistics (225 KB + 1 KB alignment slack) and 720 B static (mbarriers, e4m3 token scales).
//
// Producer (warpgroup 2, cp.async): per tile, waits `empty[stage]`, reads the block table one tile AHEAD (four rows
// per thread), issues the tile as 9 commit groups, one per 64-dim column block (4 rows x 128 contiguous bytes per
// warp instruction), the split's Q column blocks riding in tile 0's groups; then retires
// them in order (cp.async.wait_group 8..0 + fence.proxy.async) and arrives on `full[stage][cb]`: per-column-block
// barriers, so S starts on the first 8 KB. Rows at or past the split end are zero-filled by cp.async; rows of an
// out-of-range block-table entry are NaN-filled (plain stores), as in splitkv_sm90.cuh.
//
// Consumers: tile j of a split belongs to WG (j % 2). Each WG owns O[:, 256 w .. 256 w + 256) (128 fp32 registers)
// and processes EVERY tile for its O half: its own tiles with P in registers, the other WG's from shared memory.
//   own tile j:  S_j = Q K_j^T (36 x wgmma m64n64k16, waits full[stage][cb] per column block)
//                -- meanwhile: the other WG's tile j-1: wait its running max m_{j-1} (max_ready), rescale O,
//                   wait its P (p_ready), O += P_{j-1} V_{j-1} (4 x wgmma m64n256k16, A from smem)
//                softmax: m_j = max(m_{j-1}, rowmax S_j) -> published at once (the other WG's next tile needs it)
//                P_j -> shared memory (for the other WG; the P buffer's only reader, this WG, is done with P_{j-1})
//                O = O * alpha + P_j V_j (4 x wgmma m64n256k16 with A = P_j from REGISTERS: the S accumulator
//                fragment is the A fragment, packed to 16 bits, no shuffle)
//   Both WGs end at the same final running max, so the row sum is the sum of the two WGs' own-tile sums.
//   A stage is released (empty[stage], 256 arrivals) when both WGs' wgmma reads of it have retired.
// So S of tile j+1 (the other WG) overlaps softmax and P V of tile j (this WG), and the copy of tile j+1 overlaps
// the maths of tile j. Why whole tiles per WG rather than FlashMLA's split of S columns across the WGs (what
// splitkv_sm90.cuh does): each WG keeps its full S tile, so the only cross-WG dependency per tile is the running
// max (64 floats), not a max exchange plus a barrier in the middle of every tile, and the local P never goes
// through shared memory. The O split by V columns stays (a 64 x 512 fp32 O does not fit one WG's registers).
// Only 2 K stages fit (Q + 2 x 72 KB + P = 224 KB of 227 KB), so tile j+2's copy waits for tile j's P V.
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
#include "splitkv_portable.cuh"  // e4m3x16_to_bf16
#include "splitkv_sm90.cuh"

namespace deepkernels::mla::sm90p {

using sm90::kBlockM;
using sm90::kBlockN;
using sm90::kColBlockBytes;
using sm90::kColBlocks;
using sm90::kDescKMajor;
using sm90::kDescMnMajor;
using sm90::kRowBytes;
using sm90::kTileBytes;
using sm90::desc;
using sm90::swizzle;

constexpr int kMathThreads = 256;               // two math warpgroups
constexpr int kProducerThreads = 128;           // + the producer warpgroup (ptxas budgets registers per 4 warps:
                                                // a lone producer warp would cost as much, and cap all at 168)
constexpr int kThreads = kMathThreads + kProducerThreads;
// setmaxnreg: the producer gives registers back, the math warpgroups take them (128 x 64 + 256 x 224 = 64 K;
// the e4m3 producer, which converts in registers, spills at 56).
constexpr uint32_t kProducerRegs = 64;
constexpr uint32_t kMathRegs = 224;
constexpr int kStages = 2;
constexpr int kDimsPerWarpgroup = kHeadDimV / 2;
constexpr int kOffQ = 0;
constexpr int kOffK = kOffQ + kTileBytes;
constexpr int kOffP = kOffK + kStages * kTileBytes;
constexpr int kOffStats = kOffP + kColBlockBytes;
constexpr int kSmemUsed = kOffStats + 4 * kBlockM * static_cast<int>(sizeof(float));  // 230400
constexpr int kSmemBytes = kSmemUsed + 1024;        // + slack to align the base to 1 KB

// Row statistics (dynamic shared memory at kOffStats).
struct RowStats {
  float max[2][kBlockM];               // running max after WG w's latest tile (log2 domain)
  float sum[2][kBlockM];               // final own-tile row sums of each WG
};
static_assert(sizeof(RowStats) == kSmemUsed - kOffStats, "row statistics size");

// Static shared memory: the mbarriers and the e4m3 token scales (launch.cu checks its size to tell the sm_90a build
// from a stub; static because the dynamic part is at the opt-in limit).
struct Shared {
  float scale[kStages][kBlockN];       // e4m3: token scale of each key row of a stage (written with the tile)
  uint64_t full[kStages][kColBlocks];  // producer -> consumers, per column block (128 arrivals: the producer threads)
  uint64_t empty[kStages];             // consumers -> producer (256 arrivals)
  uint64_t max_ready[2];               // WG w published the running max of its latest tile (128 arrivals)
  uint64_t p_ready;                    // the P buffer holds the latest tile's P (128 arrivals)
  uint64_t sums_ready;                 // both WGs' row sums of the split are in `sum` (256 arrivals)
  uint64_t split_done;                 // the math WGs finished the split: Q may be reloaded (256 arrivals)
};
constexpr int kStaticSmemBytes = static_cast<int>(sizeof(Shared));
static_assert(kSmemBytes + kStaticSmemBytes <= 232448, "fits sm_90's opt-in shared memory");

// Phase bookkeeping carried across the splits of a CTA (the same in every thread).
struct Phases {
  uint32_t it = 0;          // K tiles issued so far (stage = it % 2, use = it / 2)
  uint32_t p = 0;           // P buffer publications
  uint32_t m[2] = {0, 0};   // running-max publications of each WG
  uint32_t splits = 0;      // splits finished
  __device__ __forceinline__ void advance(int kv_begin, int kv_end) {
    const uint32_t tiles = static_cast<uint32_t>((kv_end - kv_begin + kBlockN - 1) / kBlockN);
    it += tiles;
    p += tiles;
    m[0] += (tiles + 1) / 2;
    m[1] += tiles / 2;
    ++splits;
  }
};

#if DEEPKERNELS_SM90A

template <int kPending>
__device__ __forceinline__ void retire_column_block(uint64_t* bar) {
  ptx::cp_async_wait_group<kPending>();  // column blocks 0 .. 8 - kPending of this tile landed (this lane's copies)
  ptx::sm90::fence_proxy_async();        // ... and are visible to wgmma
  ptx::sm90::mbarrier_arrive(bar);
}

// The producer warpgroup: Q (with tile 0) and the K tiles of one split, through the ring. Thread pt copies
// 16-byte chunk pt % 8 of rows pt / 8 + 16 i (i = 0..3) of every column block: a warp instruction covers 4 rows x
// 128 contiguous bytes.
//
// e4m3 cache (kFp8, T = bf16): K rows are dequantised INTO shared memory by the producer: thread pt loads 16-byte
// chunk pt % 4 (16 e4m3) of the column block's 64-byte slice of rows pt / 4 + 32 i (i = 0, 1) with plain loads,
// converts it to 16 bf16 exactly and stores the two 16-byte chunks; the row's token scale goes to the per-stage
// scale array (NaN for an out-of-range page, whose row is NaN-filled). The math WGs fold the scale into S and P as
// the portable kernel does, so the bf16 wgmma sees exact values.
template <typename T, bool kFp8>
__device__ __forceinline__ void produce_split(const MlaDecodeParams& p, uint8_t* smem, uint32_t smem_base, Shared& sh,
                                              int batch, int kv_head, int m_block, int kv_begin, int kv_end,
                                              const Phases& ph) {
  static_assert(!kFp8 || std::is_same_v<T, __nv_bfloat16>, "an e4m3 cache is read with bf16 q");
  const int pt = static_cast<int>(threadIdx.x) - kMathThreads;
  const int lr = pt / 8, lc = pt % 8;
  const int heads_per_kv = p.h_q / p.h_kv;
  const int rows_total = p.s_q * heads_per_kv;
  const int row0 = m_block * kBlockM;
  using Cache = std::conditional_t<kFp8, uint8_t, T>;
  const auto* kv = static_cast<const Cache*>(p.kv);
  const auto* q = static_cast<const T*>(p.q);
  const int num_tiles = (kv_end - kv_begin + kBlockN - 1) / kBlockN;
  constexpr uint32_t kNan2 = std::is_same_v<T, __half> ? 0x7e007e00u : 0x7fc07fc0u;  // two f16 / bf16 NaN
  // This thread's K rows of a tile: 16-bit cache lr + 16 i (i < 4); e4m3 pt / 4 + 32 i (i < 2).
  constexpr int kRows = kFp8 ? 2 : 4;
  auto k_row = [&](int i) { return kFp8 ? pt / 4 + 32 * i : lr + 16 * i; };

  // Cache-row offsets of this thread's rows of a tile (sm90::kZeroRow past kv_end, kInvalidRow for a bad page),
  // looked up one tile AHEAD so the block-table reads are in flight while the current tile issues; e4m3: and
  // their token scales (0 past kv_end, NaN for a bad page).
  int64_t ahead[kRows];
  float ahead_scale[kRows];
  auto lookup = [&](int tile) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int pos = kv_begin + tile * kBlockN + k_row(i);
      ahead[i] = pos < kv_end ? sm90::kv_row_offset(p, batch, kv_head, pos) : sm90::kZeroRow;
      if constexpr (kFp8) {
        float scale = 0.f;
        if (ahead[i] == sm90::kInvalidRow) {
          scale = __int_as_float(0x7fffffff);
        } else if (ahead[i] >= 0) {
          const int block = pos / p.page_size;
          const int page = p.block_table[batch * p.block_table_stride + block];  // valid: kv_row_offset checked it
          scale = p.kv_scale[(static_cast<int64_t>(page) * p.page_size + pos % p.page_size) * p.h_kv + kv_head];
        }
        ahead_scale[i] = scale;
      }
    }
  };
  lookup(0);
  // Q is reloaded once the math WGs finished the previous split (a fresh barrier passes parity 1).
  ptx::sm90::mbarrier_wait(&sh.split_done, (ph.splits & 1u) ^ 1u);
#pragma unroll 1
  for (int j = 0; j < num_tiles; ++j) {
    const uint32_t it = ph.it + j;
    const int stage = static_cast<int>(it % kStages);
    int64_t off[kRows];
    float scale[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      off[i] = ahead[i];
      if constexpr (kFp8) scale[i] = ahead_scale[i];
    }
    if (j + 1 < num_tiles) lookup(j + 1);
    // The stage is free once both WGs retired their reads of its previous use (a fresh barrier passes parity 1).
    ptx::sm90::mbarrier_wait(&sh.empty[stage], ((it / kStages) & 1u) ^ 1u);
    const uint32_t k_tile = smem_base + kOffK + stage * kTileBytes;
    if constexpr (kFp8) {
      // published to the math WGs by the arrivals on full[stage][*] below
      float* tile_scale = sh.scale[stage];
      if (pt % 4 == 0) {
#pragma unroll
        for (int i = 0; i < kRows; ++i) tile_scale[k_row(i)] = scale[i];
      }
    }
#pragma unroll 1
    for (int cb = 0; cb < kColBlocks; ++cb) {
      if (j == 0) {  // Q column block cb rides in tile 0's group cb
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = lr + 16 * i;
          const int row = row0 + r;
          const bool valid = row < rows_total;
          const int64_t q_off = valid ? batch * p.q_batch_stride + (row / heads_per_kv) * p.q_seq_stride +
                                            (kv_head * heads_per_kv + row % heads_per_kv) * p.q_head_stride
                                      : 0;
          ptx::cp_async_16(smem_base + kOffQ + cb * kColBlockBytes + swizzle(r, lc), q + q_off + cb * 64 + lc * 8,
                           valid);
        }
      }
      if constexpr (kFp8) {
        // 16 e4m3 of row k_row(i) (dims cb * 64 + 16 c4 ..) -> bf16 chunks 2 c4, 2 c4 + 1 of the swizzled row
        const int c4 = pt % 4;
        uint4 raw[kRows];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          raw[i] = off[i] >= 0 ? __ldg(reinterpret_cast<const uint4*>(kv + off[i] + cb * 64 + c4 * 16))
                               : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          uint4 converted[2];
          if (off[i] == sm90::kInvalidRow) {
            converted[0] = converted[1] = make_uint4(kNan2, kNan2, kNan2, kNan2);
          } else {
            e4m3x16_to_bf16(raw[i], converted);
          }
          const uint32_t row_base = k_tile + cb * kColBlockBytes - smem_base;
          *reinterpret_cast<uint4*>(smem + row_base + swizzle(k_row(i), 2 * c4)) = converted[0];
          *reinterpret_cast<uint4*>(smem + row_base + swizzle(k_row(i), 2 * c4 + 1)) = converted[1];
        }
        // column block cb is complete once this thread's Q copies (tile 0 only) landed: publish it at once
        if (j == 0) ptx::cp_async_wait_all();
        ptx::sm90::fence_proxy_async();
        ptx::sm90::mbarrier_arrive(&sh.full[stage][cb]);
      } else {
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const uint32_t dst = k_tile + cb * kColBlockBytes + swizzle(k_row(i), lc);
          if (off[i] == sm90::kInvalidRow) {
            *reinterpret_cast<uint4*>(smem + (dst - smem_base)) = make_uint4(kNan2, kNan2, kNan2, kNan2);
          } else {
            const bool valid = off[i] >= 0;
            ptx::cp_async_16(dst, kv + (valid ? off[i] : 0) + cb * 64 + lc * 8, valid);
          }
        }
        ptx::cp_async_commit();
      }
    }
    if constexpr (kFp8) continue;  // published column block by column block above
    static_assert(kColBlocks == 9, "one retire per column block");
    retire_column_block<8>(&sh.full[stage][0]);
    retire_column_block<7>(&sh.full[stage][1]);
    retire_column_block<6>(&sh.full[stage][2]);
    retire_column_block<5>(&sh.full[stage][3]);
    retire_column_block<4>(&sh.full[stage][4]);
    retire_column_block<3>(&sh.full[stage][5]);
    retire_column_block<2>(&sh.full[stage][6]);
    retire_column_block<1>(&sh.full[stage][7]);
    retire_column_block<0>(&sh.full[stage][8]);
  }
}

// O_w += P V[:, 256 w .. +256) of the tile in `k_tile`, A = P from registers (a[kk]: keys 16 kk .. 16 kk + 15).
template <typename T>
__device__ __forceinline__ void issue_pv_regs(float (&o)[128], const uint32_t (&a)[4][4], uint32_t k_tile, int wg) {
  const uint64_t desc_v = desc(kDescMnMajor, k_tile + wg * 4 * kColBlockBytes);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t b = desc_v + ((kk * 16 * kRowBytes) >> 4);
    if constexpr (std::is_same_v<T, __half>) {
      ptx::sm90::wgmma_m64n256k16_f16_rs_tnsp_b(o, a[kk], b);
    } else {
      ptx::sm90::wgmma_m64n256k16_bf16_rs_tnsp_b(o, a[kk], b);
    }
  }
}

// O_w += P V[:, 256 w .. +256) with P from the shared P buffer (the other WG's tile).
template <typename T>
__device__ __forceinline__ void issue_pv_smem(float (&o)[128], uint32_t p_tile, uint32_t k_tile, int wg) {
  const uint64_t desc_p = desc(kDescKMajor, p_tile);
  const uint64_t desc_v = desc(kDescMnMajor, k_tile + wg * 4 * kColBlockBytes);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t a = desc_p + ((kk * 32) >> 4), b = desc_v + ((kk * 16 * kRowBytes) >> 4);
    if constexpr (std::is_same_v<T, __half>) {
      ptx::sm90::wgmma_m64n256k16_f16_tnsp_b(o, a, b);
    } else {
      ptx::sm90::wgmma_m64n256k16_bf16_tnsp_b(o, a, b);
    }
  }
}

// A math thread's state across the main loop and the epilogue of a split.
struct Acc {
  float o[128];     // O_w (this WG's 256 columns), scaled to m_run
  float m_run[2];   // running max of the thread's two rows (log2 domain)
};

// The math warpgroups: attention of the CTA's 64 query rows over keys [kv_begin, kv_end); leaves O_w and m_run in
// `acc` and the WG's own-tile row sums in the row statistics (read after sums_ready by store_split).
template <typename T, bool kFp8>
__device__ __forceinline__ void consume_split(const MlaDecodeParams& p, uint8_t* smem, uint32_t smem_base, Shared& sh,
                                              int batch, int kv_head, int m_block, int kv_begin, int kv_end,
                                              int seqlen, const Phases& ph, Acc& acc) {
  (void)batch; (void)kv_head;
  const int tid = threadIdx.x;
  const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int heads_per_kv = p.h_q / p.h_kv;
  const int rows_total = p.s_q * heads_per_kv;
  const int row0 = m_block * kBlockM;
  const float scale_log2 = p.softmax_scale * 1.4426950408889634f;
  const int num_tiles = (kv_end - kv_begin + kBlockN - 1) / kBlockN;
  const uint32_t q_tile = smem_base + kOffQ, p_tile = smem_base + kOffP;
  RowStats& st = *reinterpret_cast<RowStats*>(smem + kOffStats);
  auto stage_of = [&](int j) { return static_cast<int>((ph.it + j) % kStages); };
  auto full_parity = [&](int j) { return ((ph.it + j) / kStages) & 1u; };
  auto k_tile_of = [&](int j) { return smem_base + kOffK + stage_of(j) * kTileBytes; };

  // Accumulator layout (m64nN): warp w of a WG owns rows 16w..16w+15; d[4i + 2h + j] is row 16w + g + 8h,
  // column 8i + 2 t4 + j. S and O follow it, so a thread's rows are the same in both.
  int last_visible[2];
  float (&m_run)[2] = acc.m_run;
  float l_run[2];  // own-tile partial row sums, scaled to m_run
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + warp * 16 + g + 8 * h;
    last_visible[h] = row >= rows_total ? -1 : (p.causal ? seqlen - p.s_q + row / heads_per_kv : seqlen - 1);
    m_run[h] = -INFINITY;
    l_run[h] = 0.f;
  }
  float (&o)[128] = acc.o;
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;

  uint32_t a[4][4];  // P_j as wgmma A fragments; kept live (register_fence) until its P V retired
  bool own_pv_in_flight = false;
  int own_pv_stage = 0;
#pragma unroll 1
  for (int j = wg; j <= num_tiles; j += 2) {
    const bool has_own = j < num_tiles;        // tile j is this WG's
    const bool has_other = j >= 1 && j - 1 < num_tiles;  // tile j - 1 is the other WG's
    // 1. The previous own P V must retire before tile j (same stage as j - 2) may be waited for.
    if (own_pv_in_flight) {
      ptx::sm90::wgmma_wait<0>();
      ptx::sm90::register_fence(o);
#pragma unroll
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) ptx::sm90::register_fence(a[kk]);
      ptx::sm90::mbarrier_arrive(&sh.empty[own_pv_stage]);
      own_pv_in_flight = false;
    }
    // 2. S_j = Q K_j^T, column block by column block as they land.
    float s[32];
    if (has_own) {
#pragma unroll
      for (int i = 0; i < 32; ++i) s[i] = 0.f;
      ptx::sm90::register_fence(s);
      const uint32_t k_tile = k_tile_of(j);
      const uint64_t desc_q = desc(kDescKMajor, q_tile), desc_k = desc(kDescKMajor, k_tile);
      ptx::sm90::wgmma_fence();
#pragma unroll
      for (int cb = 0; cb < kColBlocks; ++cb) {
        ptx::sm90::mbarrier_wait(&sh.full[stage_of(j)][cb], full_parity(j));
        ptx::sm90::wgmma_fence();  // after the wait loop (divergent control flow): keeps ptxas from serialising
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          const uint32_t off = (cb * kColBlockBytes + kk * 32) >> 4;
          if constexpr (std::is_same_v<T, __half>) {
            ptx::sm90::wgmma_m64n64k16_f16(s, desc_q + off, desc_k + off, cb + kk > 0);
          } else {
            ptx::sm90::wgmma_m64n64k16_bf16(s, desc_q + off, desc_k + off, cb + kk > 0);
          }
        }
      }
      ptx::sm90::wgmma_commit();
    }
    // 3. Meanwhile the other WG's tile j - 1 for this WG's O half: its running max, then its P from smem.
    if (has_other) {
      const uint32_t k = ph.m[wg ^ 1] + (j - 1) / 2;  // publication index of WG (wg ^ 1)
      ptx::sm90::mbarrier_wait(&sh.max_ready[wg ^ 1], k & 1u);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = st.max[wg ^ 1][warp * 16 + g + 8 * h];
        const float ref = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = ptx::ex2(m_run[h] - ref);
        m_run[h] = m_new;
        l_run[h] *= alpha;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          o[4 * i + 2 * h] *= alpha;
          o[4 * i + 2 * h + 1] *= alpha;
        }
      }
      ptx::sm90::mbarrier_wait(&sh.p_ready, (ph.p + j - 1) & 1u);
#pragma unroll
      for (int cb = 0; cb < 4; ++cb) ptx::sm90::mbarrier_wait(&sh.full[stage_of(j - 1)][4 * wg + cb], full_parity(j - 1));
      ptx::sm90::register_fence(o);
      ptx::sm90::wgmma_fence();
      issue_pv_smem<T>(o, p_tile, k_tile_of(j - 1), wg);
      ptx::sm90::wgmma_commit();
    }
    if (!has_own) {
      if (has_other) {
        ptx::sm90::wgmma_wait<0>();
        ptx::sm90::register_fence(o);
        ptx::sm90::mbarrier_arrive(&sh.empty[stage_of(j - 1)]);
      }
      break;
    }
    // 4. S_j retired (the other tile's P V may still run).
    if (has_other) {
      ptx::sm90::wgmma_wait<1>();
    } else {
      ptx::sm90::wgmma_wait<0>();
    }
    ptx::sm90::register_fence(s);

    // 5. Online softmax (log2 domain); masked keys get -inf before the exp (P exactly 0); keys at or past
    // kv_end were zero-filled, so neither S nor V of this tile holds NaN there.
    const int n0 = kv_begin + j * kBlockN;
    // e4m3: the token scales of this thread's 16 key columns (8 i + 2 t4 + e), folded into S and into P for V
    const float* tile_scale = sh.scale[stage_of(j)];
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int pos = n0 + 8 * i + 2 * t4 + e;
          float& v = s[4 * i + 2 * h + e];
          const float key_scale = kFp8 ? tile_scale[8 * i + 2 * t4 + e] : 1.f;
          v = (pos < kv_end && pos <= last_visible[h]) ? v * scale_log2 * key_scale : -INFINITY;
          tile_max[h] = nan_propagating_max(tile_max[h], v);
        }
      }
    }
    float m_new[2], ref[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      tile_max[h] = nan_propagating_max(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
      tile_max[h] = nan_propagating_max(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
      m_new[h] = nan_propagating_max(m_run[h], tile_max[h]);  // m_run = the running max after tile j - 1
      ref[h] = m_new[h] == -INFINITY ? 0.f : m_new[h];       // a row with no key yet stays all-zero
      if (t4 == 0) st.max[wg][warp * 16 + g + 8 * h] = m_new[h];
    }
    ptx::sm90::mbarrier_arrive(&sh.max_ready[wg]);  // the other WG's next tile may start its softmax

    // P_j = exp2(S - m_j): fp32 sums, 16-bit A fragments (k-step kk = keys 16 kk..: columns i = 2 kk, 2 kk + 1).
    float l_tile[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float p0 = ptx::ex2(s[4 * i + 2 * h] - ref[h]), p1 = ptx::ex2(s[4 * i + 2 * h + 1] - ref[h]);
        l_tile[h] += p0 + p1;
        if constexpr (kFp8) {  // P V with V = the unscaled bf16 rows: P * token scale
          a[i / 2][2 * (i % 2) + h] =
              pack_16x2<T>(p0 * tile_scale[8 * i + 2 * t4], p1 * tile_scale[8 * i + 2 * t4 + 1]);
        } else {
          a[i / 2][2 * (i % 2) + h] = pack_16x2<T>(p0, p1);
        }
      }
    }
    // 6. The other tile's P V retired: the P buffer (its only reader is this WG) and that stage are free.
    if (has_other) {
      ptx::sm90::wgmma_wait<0>();
      ptx::sm90::register_fence(o);
      ptx::sm90::mbarrier_arrive(&sh.empty[stage_of(j - 1)]);
    }
    // P_j -> smem for the other WG (same swizzle; key column 8 i + 2 t4 is in chunk i of its 128-byte row).
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = warp * 16 + g + 8 * h;
        *reinterpret_cast<uint32_t*>(smem + kOffP + swizzle(row, i) + t4 * 4) = a[i / 2][2 * (i % 2) + h];
      }
    }
    ptx::sm90::fence_proxy_async();  // generic-proxy P stores -> the other WG's wgmma reads
    ptx::sm90::mbarrier_arrive(&sh.p_ready);
    // 7. O_w = O_w * alpha + P_j V_j, A from registers.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float alpha = ptx::ex2(m_run[h] - ref[h]);
      m_run[h] = m_new[h];
      l_run[h] = l_run[h] * alpha + l_tile[h];
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        o[4 * i + 2 * h] *= alpha;
        o[4 * i + 2 * h + 1] *= alpha;
      }
    }
    ptx::sm90::register_fence(o);
    ptx::sm90::wgmma_fence();
    issue_pv_regs<T>(o, a, k_tile_of(j), wg);
    ptx::sm90::wgmma_commit();
    own_pv_in_flight = true;
    own_pv_stage = stage_of(j);
  }
  if (own_pv_in_flight) {
    ptx::sm90::wgmma_wait<0>();
    ptx::sm90::register_fence(o);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) ptx::sm90::register_fence(a[kk]);
    ptx::sm90::mbarrier_arrive(&sh.empty[own_pv_stage]);
  }

  // Row sums: this thread's partial -> quad -> both warpgroups (both end at the final running max).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
    if (t4 == 0) st.sum[wg][warp * 16 + g + 8 * h] = l_run[h];
  }
}

// Epilogue of a split (after sums_ready: both WGs' row sums published).
template <typename T>
__device__ __forceinline__ void store_split(const MlaDecodeParams& p, const uint8_t* smem, int batch, int kv_head,
                                            int m_block, int split, const Acc& acc) {
  const RowStats& st = *reinterpret_cast<const RowStats*>(smem + kOffStats);
  const int tid = threadIdx.x;
  const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int heads_per_kv = p.h_q / p.h_kv;
  const int rows_total = p.s_q * heads_per_kv;
  const int row0 = m_block * kBlockM;
  const float (&o)[128] = acc.o;
  const SplitOutput<T> output(p, batch, split);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    const int row = row0 + r;
    if (row >= rows_total) continue;
    const int token = row / heads_per_kv, head = kv_head * heads_per_kv + row % heads_per_kv;
    const float l = st.sum[0][r] + st.sum[1][r];
    // A row that saw no key is exactly 0 (its P was 0, but 0 times a NaN V row of a masked key is NaN).
    const bool seen = acc.m_run[h] != -INFINITY;
    const float inv = 1.f / l;
    const int64_t col0 = static_cast<int64_t>(token * p.h_q + head) * kHeadDimV + wg * kDimsPerWarpgroup + 2 * t4;
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      output.store_pair(col0 + 8 * i, seen ? o[4 * i + 2 * h] * inv : 0.f, seen ? o[4 * i + 2 * h + 1] * inv : 0.f);
    }
    if (wg == 0 && t4 == 0) output.store_lse(p, token, head, seen, acc.m_run[h], l);
  }
}

#endif  // sm_90a

// T: bf16 or fp16 (q, P, out; the cache unless kFp8); kFp8: an e4m3 cache with per-token scales (T = bf16).
template <typename T, bool kFp8>
__global__ void __launch_bounds__(kThreads, 1) mla_splitkv_sm90_pipelined_kernel(const MlaDecodeParams p) {
#if DEEPKERNELS_SM90A
  __shared__ Shared sh;
  extern __shared__ __align__(16) uint8_t sm90p_smem[];
  const uint32_t raw = ptx::smem_addr(sm90p_smem);
  const uint32_t base = (raw + 1023u) & ~1023u;
  uint8_t* smem = sm90p_smem + (base - raw);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      for (int cb = 0; cb < kColBlocks; ++cb) ptx::sm90::mbarrier_init(&sh.full[s][cb], kProducerThreads);
      ptx::sm90::mbarrier_init(&sh.empty[s], kMathThreads);
    }
    ptx::sm90::mbarrier_init(&sh.max_ready[0], 128);
    ptx::sm90::mbarrier_init(&sh.max_ready[1], 128);
    ptx::sm90::mbarrier_init(&sh.p_ready, 128);
    ptx::sm90::mbarrier_init(&sh.sums_ready, kMathThreads);
    ptx::sm90::mbarrier_init(&sh.split_done, kMathThreads);
    ptx::sm90::fence_barrier_init();
  }
  __syncthreads();
  // Role branches with no CTA-wide barrier inside (setmaxnreg regions); the roles meet through mbarriers only.
  Phases ph;
  if (threadIdx.x >= kMathThreads) {
    ptx::sm90::setmaxnreg_dec<kProducerRegs>();
    for_each_split_of_part(p, [&](int batch, int kv_begin, int kv_end, int, int) {
      produce_split<T, kFp8>(p, smem, base, sh, batch, blockIdx.y, blockIdx.z, kv_begin, kv_end, ph);
      ph.advance(kv_begin, kv_end);
    });
  } else {
    ptx::sm90::setmaxnreg_inc<kMathRegs>();
    for_each_split_of_part(p, [&](int batch, int kv_begin, int kv_end, int seqlen, int split) {
      Acc acc;
      consume_split<T, kFp8>(p, smem, base, sh, batch, blockIdx.y, blockIdx.z, kv_begin, kv_end, seqlen, ph, acc);
      ptx::sm90::mbarrier_arrive(&sh.sums_ready);
      ptx::sm90::mbarrier_wait(&sh.sums_ready, ph.splits & 1u);
      store_split<T>(p, smem, batch, blockIdx.y, blockIdx.z, split, acc);
      // Q, the P buffer and the row statistics may be reused (the producer reloads Q only after this).
      ptx::sm90::mbarrier_arrive(&sh.split_done);
      ph.advance(kv_begin, kv_end);
    });
  }
#else
  (void)p;
#endif
}

}  // namespace deepkernels::mla::sm90p
