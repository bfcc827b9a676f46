#pragma once
// Hopper (sm_90a) FP8 blockwise GEMM -- OPT-IN (DEEPKERNELS_GEMM_SM90=1), NOT YET RUN ON A GPU.
//
// Persistent, warp-specialised (the DeepGEMM design, written from the PTX ISA):
//   * grid = #SMs; every CTA walks tiles blockIdx.x, +gridDim.x, ... in an L2-friendly order (bands of
//     kGroupM M-blocks, N-blocks inside a band); grouped modes resolve a tile's group on the device.
//   * warpgroup kMathWarpgroups (the last): producer. setmaxnreg.dec to 40; one thread issues, per 128-wide
//     K block, two TMA loads (A [BLOCK_M x 128], B [BLOCK_N x 128] e4m3, 128B-swizzled) into the next
//     stage of a shared-memory ring, guarded by full/empty mbarriers.
//   * warpgroups 0..kMathWarpgroups-1: math. setmaxnreg.inc to 232; WG w owns tile rows 64w..64w+63 and
//     runs 4 x wgmma m64nBLOCK_Nk32 e4m3 per K block into fp32 `partial`, releases the stage, then
//     promotes on CUDA cores: total += partial * a_scale[row, kb] * b_scale[n/128, kb]. Epilogue: bf16
//     pairs straight from registers to global memory with row/column bounds (masked rows untouched,
//     contiguous padding rows zero), or (p.tma_store) through a shared-memory output tile and a TMA store
//     per warpgroup that overlaps the next tile's main loop (bounded by the out map; masked tiles with rows
//     past masked_m[g] still take the register path).
// Partial tiles: TMA zero-fills out-of-bounds rows/columns (still counted in the transaction bytes), so
// any M >= 1 and N, K multiples of 16 need no special path; only the stores are bounded.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "../common/launch.cuh"
#include "../common/fp8.cuh"
#include "../common/ptx_sm90.cuh"
#include "heuristic.h"
#include "params.h"

namespace deepkernels::fp8_gemm::sm90 {

// NOTE: BLOCK_K = 128 is both the scale granularity (one promotion per K block) and, for e4m3, exactly one
// 128-byte swizzle row -- the widest box row a CU_TENSOR_MAP_SWIZZLE_128B tensor map allows.
constexpr int kBlockK = 128;
// NOTE: 227 KiB is the sm_90 per-block dynamic shared memory maximum (opt-in attribute).
constexpr int kSmemBudget = plan::kSm90SmemBudget;
constexpr int kMaxStages = plan::kSm90MaxStages;
// L2 order: 8 M-blocks x all N-blocks per band, so the ~132 resident tiles share a few A row-panels and
// ~16 B column-panels.
constexpr int kGroupM = 8;
// NOTE: 128 * 40 + 256 * 232 = 64512 <= 65536 registers per SM for the 384-thread configuration.
constexpr uint32_t kProducerRegs = 40, kMathRegs = 232;

template <int kBM, int kBN>
struct Config {
  static_assert(kBM == 64 || kBM == 128, "BLOCK_M: one or two 64-row math warpgroups");
  static_assert(kBN == 16 || kBN == 32 || kBN == 64 || kBN == 128,
                "BLOCK_N divides 128, so a tile needs one b_scale per K block");
  static constexpr int kMathWarpgroups = kBM / 64;
  static constexpr int kMathThreads = 128 * kMathWarpgroups;
  static constexpr int kThreads = kMathThreads + 128;
  static constexpr int kSmemA = kBM * kBlockK, kSmemB = kBN * kBlockK;  // both multiples of 1024
  static constexpr int kStageBytes = kSmemA + kSmemB;
  static constexpr int kAlignSlack = 1024;  // the dynamic smem base is re-aligned to 1024 in the kernel
  static constexpr int kFit = (kSmemBudget - kAlignSlack - 16 * kMaxStages) / kStageBytes;
  static constexpr int kStages = kFit < kMaxStages ? kFit : kMaxStages;
  static_assert(kStages == plan::sm90_max_stages(kBM, kBN), "heuristic.h's stage bound is this ring's");
  // TMA-store epilogue (p.tma_store): the bf16 tile in shared memory after the ring, per math warpgroup 64 rows
  // in boxes of kOutBoxCols columns (at most 64: a 128-byte row, the widest a swizzled box allows), each box
  // swizzled over its kOutBoxCols * 2-byte rows (32/64/128B), so the row-per-lane register stores hit 32 banks.
  static constexpr int kOutBytes = plan::sm90_out_tile_bytes(kBM, kBN, 1);
  static constexpr int kOutBoxCols = kBN < 64 ? kBN : 64;
  static constexpr int kOutBoxBytes = 64 * kOutBoxCols * 2;  // multiples of 1024: every box starts a swizzle atom
  static constexpr int kOutWgBytes = 64 * kBN * 2;
  static constexpr int kStoreStages = plan::sm90_max_stages(kBM, kBN, 1);
  static_assert(kStoreStages >= 2, "the TMA-store epilogue leaves room for a two-stage ring");
  // The ring (+ the output tile) of a launch with `stages` (2..kStages, or ..kStoreStages with the TMA store).
  static constexpr int smem_bytes(int stages, int tma_store = 0) {
    return kAlignSlack + stages * kStageBytes + (tma_store ? kOutBytes : 0);
  }
  // dynamic: the deepest ring of either epilogue
  static constexpr int kSmemBytes = std::max(smem_bytes(kStages), smem_bytes(kStoreStages, 1));
  static constexpr int kBarrierBytes = 16 * kStages;  // static: the full/empty mbarriers (sm_90a image only)
  static constexpr int kAccum = kBN / 2;  // fp32 accumulators per thread of an m64nBNk32 wgmma
  // The overlapped promotion keeps two accumulator sets + the total: 3 x 64 registers do not fit the 168 a
  // 384-thread 128x128 CTA compiles with (it spilled), so that one has no overlapped variant (heuristic.h).
  static constexpr bool kCanOverlap = plan::sm90_can_overlap(kBM, kBN);
  static_assert(kStages >= 2, "the ring needs at least two stages");
  static_assert(kSmemBytes + kBarrierBytes <= kSmemBudget, "dynamic + static shared memory fit sm_90's opt-in");
};

// One output tile and the problem it belongs to.
struct Tile {
  int m0, n0;
  int rows;     // valid rows of its problem: M, or masked_m[g] clamped to [0, Mmax]
  int a_group;  // masked: group of a / a_scale / out; 0 otherwise
  int b_group;  // group of b / b_scale; -1 = contiguous padding tile (written as zeros, nothing loaded)
  int split;    // split-K slice of this work unit (0 without split-K)
  int kb_begin, kb_end;  // its 128-wide K blocks
};

// Walks this CTA's tiles. Producer and math warpgroups each own a copy and see the same sequence (all
// inputs are read-only for the launch), which keeps their ring stages and mbarrier phases in step.
template <int kBM, int kBN>
class Scheduler {
 public:
  __device__ explicit Scheduler(const Fp8GemmParams& p)
      : mode_(p.mode), m_(p.m), num_groups_(p.num_groups), n_blocks_(ceil_div(p.n, kBN)),
        split_k_(p.split_k > 1 ? p.split_k : 1), k_blocks_(ceil_div(p.k, kBlockK)),
        k_per_split_(ceil_div(ceil_div(p.k, kBlockK), p.split_k > 1 ? p.split_k : 1)), m_indices_(p.m_indices),
        masked_m_(p.masked_m), next_(static_cast<int>(blockIdx.x)) {
    if (mode_ == GemmMode::kGroupedMasked) {
      load_group();
    } else {
      rows_ = m_;
      tiles_ = ceil_div(m_, kBM) * n_blocks_ * split_k_;  // work units: split_k per tile, every mode
    }
  }

  __device__ bool next(Tile& t) {
    const int tile = next_;
    next_ += static_cast<int>(gridDim.x);
    // Masked: tiles are numbered group after group; masked_m is read here, on the device (no host sync).
    while (tile >= start_ + tiles_) {
      if (mode_ != GemmMode::kGroupedMasked || group_ + 1 >= num_groups_) return false;
      start_ += tiles_;
      ++group_;
      load_group();
    }
    // Split-K: consecutive units are the K slices of one tile (they share its A and B panels in L2).
    const int local = (tile - start_) / split_k_, m_blocks = ceil_div(rows_, kBM);
    t.split = (tile - start_) % split_k_;
    t.kb_begin = t.split * k_per_split_;
    t.kb_end = min(t.kb_begin + k_per_split_, k_blocks_);
    const int band = local / (kGroupM * n_blocks_), first_m = band * kGroupM;
    const int band_m = min(kGroupM, m_blocks - first_m), in_band = local - band * kGroupM * n_blocks_;
    t.m0 = (first_m + in_band % band_m) * kBM;
    t.n0 = (in_band / band_m) * kBN;
    t.rows = rows_;
    t.a_group = mode_ == GemmMode::kGroupedMasked ? group_ : 0;
    t.b_group = group_;
    if (mode_ == GemmMode::kGroupedContiguous) {
      // NOTE: group segments start at multiples of 128 (>= BLOCK_M), so a tile never spans two groups and
      // its first row names its group; -1 (padding) or an id >= G: nothing computed (the epilogue writes 0 for
      // -1 rows, NaN for any other id; see gemm.py: m_indices is trusted on the device).
      const int g = __ldg(m_indices_ + t.m0);
      t.b_group = (g >= 0 && g < num_groups_) ? g : -1;
    }
    return true;
  }

 private:
  __device__ void load_group() {
    rows_ = min(max(__ldg(masked_m_ + group_), 0), m_);
    tiles_ = ceil_div(rows_, kBM) * n_blocks_ * split_k_;  // units of this group: its valid tiles x split_k
  }

  GemmMode mode_;
  int m_, num_groups_, n_blocks_, split_k_, k_blocks_, k_per_split_;
  const int* m_indices_;
  const int* masked_m_;
  int next_;
  int group_ = 0, start_ = 0, rows_ = 0, tiles_ = 0;
};

// One K block of a math warpgroup: 4 x wgmma m64nBNk32 (e4m3, K-major, 128B swizzle) into acc, committed as one
// group. +32 bytes along K inside the swizzled 128-byte rows = +2 in the descriptor's start field.
template <int kBN>
__device__ __forceinline__ void issue_k_block(float (&acc)[kBN / 2], uint64_t desc_a, uint64_t desc_b) {
#if DEEPKERNELS_SM90A
  using namespace deepkernels::ptx::sm90;
  register_fence(acc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kBlockK / 32; ++kk) {
    if constexpr (kBN == 128) {
      wgmma_m64n128k32_e4m3(acc, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
    } else if constexpr (kBN == 64) {
      wgmma_m64n64k32_e4m3(acc, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
    } else if constexpr (kBN == 32) {
      wgmma_m64n32k32_e4m3(acc, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
    } else {
      wgmma_m64n16k32_e4m3(acc, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
    }
  }
  wgmma_commit();
#else
  (void)acc; (void)desc_a; (void)desc_b;
#endif
}

// Promotion on CUDA cores: total += partial * scale (s0 for the thread's first row, s1 for the row 8 below).
template <int kAccum>
__device__ __forceinline__ void promote(float (&total)[kAccum], const float (&partial)[kAccum], float s0, float s1) {
#pragma unroll
  for (int i = 0; i < kAccum / 4; ++i) {
    total[4 * i + 0] = fmaf(partial[4 * i + 0], s0, total[4 * i + 0]);
    total[4 * i + 1] = fmaf(partial[4 * i + 1], s0, total[4 * i + 1]);
    total[4 * i + 2] = fmaf(partial[4 * i + 2], s1, total[4 * i + 2]);
    total[4 * i + 3] = fmaf(partial[4 * i + 3], s1, total[4 * i + 3]);
  }
}

template <int kBM, int kBN>
__global__ void __launch_bounds__(Config<kBM, kBN>::kThreads, 1)
    fp8_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                         const __grid_constant__ CUtensorMap tmap_out, const __grid_constant__ Fp8GemmParams p) {
#if DEEPKERNELS_SM90A
  using C = Config<kBM, kBN>;
  using namespace deepkernels::ptx::sm90;
  extern __shared__ uint8_t smem_raw[];
  // NOTE: TMA's 128B swizzle and the wgmma descriptors assume every 8-row atom starts on a 1024-byte boundary.
  uint8_t* smem = smem_raw + ((1024u - (ptx::smem_addr(smem_raw) & 1023u)) & 1023u);
  // NOTE: static shared memory, which only this (sm_90a) body has: the host tells this image from the empty
  // stub of an sm_90 build without "a" (same binary/PTX version 90) by cudaFuncAttributes::sharedSizeBytes.
  __shared__ uint64_t barriers[2 * C::kStages];
  uint64_t* full = barriers;
  uint64_t* empty = barriers + C::kStages;
  const int num_k_blocks = ceil_div(p.k, kBlockK);
  const int stages = p.stages;  // the plan's ring depth, 2..C::kStages (checked on the host)

  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < C::kStages; ++s) {
      mbarrier_init(full + s, 1);                      // the producer's arrive.expect_tx (+ TMA bytes)
      mbarrier_init(empty + s, C::kMathThreads / 32);  // lane 0 of every math warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x >= C::kMathThreads) {
    // ---------------- producer warpgroup: one thread issues all TMA loads
    if constexpr (C::kMathWarpgroups == 2) setmaxnreg_dec<kProducerRegs>();
    if (threadIdx.x == C::kMathThreads) {
      prefetch_tensor_map(&tmap_a);
      prefetch_tensor_map(&tmap_b);
      if (p.tma_store) prefetch_tensor_map(&tmap_out);  // (a zero map otherwise: never touched)
      Scheduler<kBM, kBN> scheduler(p);
      Tile t;
      int stage = 0;
      uint32_t phase = 0;
      while (scheduler.next(t)) {
        if (t.b_group < 0) continue;  // padding tile: the math warpgroups write zeros, nothing to load
        for (int kb = t.kb_begin; kb < t.kb_end; ++kb) {
          mbarrier_wait(empty + stage, phase ^ 1u);  // the math warps released this stage
          uint8_t* stage_a = smem + stage * C::kStageBytes;
          mbarrier_arrive_expect_tx(full + stage, C::kStageBytes);
          tma_load_3d(stage_a, &tmap_a, full + stage, kb * kBlockK, t.m0, t.a_group);
          tma_load_3d(stage_a + C::kSmemA, &tmap_b, full + stage, kb * kBlockK, t.n0, t.b_group);
          if (++stage == stages) stage = 0, phase ^= 1u;
        }
      }
    }
  } else {
    // ---------------- math warpgroups
    if constexpr (C::kMathWarpgroups == 2) setmaxnreg_inc<kMathRegs>();
    const int wg = static_cast<int>(threadIdx.x) / 128, warp = (static_cast<int>(threadIdx.x) / 32) % 4;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    // m64nNk32 accumulator layout: warp w of the warpgroup owns rows 16w..16w+15; d[4i + 2h + j] is
    // row 16w + lane/4 + 8h, column 8i + 2*(lane%4) + j.
    const int row_in_tile = wg * 64 + warp * 16 + lane / 4, col_in_tile = 2 * (lane % 4);
    const int scale_n_blocks = ceil_div(p.n, 128);
    // partial_b: the second accumulator set of the overlapped variant (p.overlap)
    float partial[C::kAccum], partial_b[C::kCanOverlap ? C::kAccum : 1], total[C::kAccum];
#pragma unroll
    for (int i = 0; i < C::kAccum; ++i) partial[i] = 0.0f;
#pragma unroll
    for (float& x : partial_b) x = 0.0f;

    Scheduler<kBM, kBN> scheduler(p);
    Tile t;
    int stage = 0;
    uint32_t phase = 0;
    bool store_pending = false;  // a TMA store of this warpgroup's output tile may still read it
    while (scheduler.next(t)) {
#pragma unroll
      for (int i = 0; i < C::kAccum; ++i) total[i] = 0.0f;
      if (t.b_group >= 0) {
        // Rows past the problem (zero-filled by TMA, never stored) read a clamped, valid scale address.
        const float* a_scale = p.a_scale + static_cast<int64_t>(t.a_group) * p.a_scale_group_stride;
        const int row_0 = min(t.m0 + row_in_tile, p.m - 1), row_1 = min(t.m0 + row_in_tile + 8, p.m - 1);
        const float* a_scale_0 = a_scale + static_cast<int64_t>(row_0) * p.a_scale_row_stride;
        const float* a_scale_1 = a_scale + static_cast<int64_t>(row_1) * p.a_scale_row_stride;
        const float* b_scale =
            p.b_scale + (static_cast<int64_t>(t.b_group) * scale_n_blocks + t.n0 / 128) * num_k_blocks;
        bool overlapped = false;
        if constexpr (C::kCanOverlap) {
          if (p.overlap) {
          overlapped = true;
          // Overlapped variant: two accumulator sets, A = partial and B = partial_b, K blocks alternating
          // A, B, A, ...: block kb's wgmmas run while kb - 1's partial is promoted (wait<1> retires only the older
          // group, whose stage is then released). Unrolled by two so that which set is in flight is known
          // statically on every path (a runtime choice makes ptxas serialise the wgmmas).
          float sa0 = 0.0f, sa1 = 0.0f, sb0 = 0.0f, sb1 = 0.0f;  // scales of the K block in A / in B
          int stage_a = 0, stage_b = 0;                          // and its ring stage
          const auto issue = [&](float (&acc)[C::kAccum], int kb, float& s0, float& s1, int& acc_stage) {
            const float scale_a_0 = __ldg(a_scale_0 + kb * p.a_scale_col_stride);
            const float scale_a_1 = __ldg(a_scale_1 + kb * p.a_scale_col_stride);
            const float scale_b = __ldg(b_scale + kb);
            mbarrier_wait(full + stage, phase);
            const uint8_t* stage_base = smem + stage * C::kStageBytes;
            issue_k_block<kBN>(acc, smem_desc_k_major_sw128(stage_base + wg * 64 * kBlockK),
                               smem_desc_k_major_sw128(stage_base + C::kSmemA));
            s0 = scale_a_0 * scale_b, s1 = scale_a_1 * scale_b, acc_stage = stage;
            if (++stage == stages) stage = 0, phase ^= 1u;
          };
          const auto retire = [&](float (&acc)[C::kAccum], float s0, float s1, int acc_stage) {
            if (lane == 0) mbarrier_arrive(empty + acc_stage);  // its wgmmas retired: the stage is free
            register_fence(acc);
            promote(total, acc, s0, s1);
          };
          const int blocks = t.kb_end - t.kb_begin;
          if (blocks > 0) {
            issue(partial, t.kb_begin, sa0, sa1, stage_a);
            int j = 1;
            for (; j + 1 < blocks; j += 2) {
              issue(partial_b, t.kb_begin + j, sb0, sb1, stage_b);
              wgmma_wait<1>();
              retire(partial, sa0, sa1, stage_a);
              issue(partial, t.kb_begin + j + 1, sa0, sa1, stage_a);
              wgmma_wait<1>();
              retire(partial_b, sb0, sb1, stage_b);
            }
            if (j < blocks) {
              issue(partial_b, t.kb_begin + j, sb0, sb1, stage_b);
              wgmma_wait<1>();
              retire(partial, sa0, sa1, stage_a);
              wgmma_wait<0>();
              retire(partial_b, sb0, sb1, stage_b);
            } else {
              wgmma_wait<0>();
              retire(partial, sa0, sa1, stage_a);
            }
          }
          }
        }
        if (!overlapped) {
          for (int kb = t.kb_begin; kb < t.kb_end; ++kb) {
            // Scales first: their global-load latency hides behind the barrier wait and the wgmmas.
            const float scale_a_0 = __ldg(a_scale_0 + kb * p.a_scale_col_stride);
            const float scale_a_1 = __ldg(a_scale_1 + kb * p.a_scale_col_stride);
            const float scale_b = __ldg(b_scale + kb);
            mbarrier_wait(full + stage, phase);
            const uint8_t* stage_a = smem + stage * C::kStageBytes;
            issue_k_block<kBN>(partial, smem_desc_k_major_sw128(stage_a + wg * 64 * kBlockK),
                               smem_desc_k_major_sw128(stage_a + C::kSmemA));
            register_fence(partial);
            wgmma_wait<0>();
            register_fence(partial);
            if (lane == 0) mbarrier_arrive(empty + stage);  // smem of this stage no longer read
            if (++stage == stages) stage = 0, phase ^= 1u;
            promote(total, partial, scale_a_0 * scale_b, scale_a_1 * scale_b);
          }
        }
      }

      if (p.split_k > 1) {
        // Split-K (every mode): this slice's fp32 sums to the workspace [split][a_group][row][col] (masked: Mmax
        // rows per group, as masked_m is only known on the device); fp8_gemm_splitk_reduce_kernel adds the slices
        // in a fixed order (deterministic) and rounds once to bf16. Rows >= masked_m[g] are neither written here
        // nor read there. Contiguous rows this tile does not compute reach the epilogue's value through the sum:
        // slice 0 holds the fill (0 for padding, NaN for any other foreign id), every other slice 0.
        const int64_t ws_groups = p.mode == GemmMode::kGroupedMasked ? p.num_groups : 1;
        float* ws = p.workspace + (static_cast<int64_t>(t.split) * ws_groups + t.a_group) * p.m * p.n;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = t.m0 + row_in_tile + 8 * h;
          if (row >= t.rows) continue;
          bool keep = t.b_group >= 0;
          float fill = 0.0f;
          if (p.mode == GemmMode::kGroupedContiguous) {
            const int row_group = __ldg(p.m_indices + row);
            keep = keep && row_group == t.b_group;
            if (row_group != -1 && t.split == 0) fill = __int_as_float(0x7fffffff);
          }
          float* dst = ws + static_cast<int64_t>(row) * p.n;
#pragma unroll
          for (int i = 0; i < kBN / 8; ++i) {
            const int col = t.n0 + 8 * i + col_in_tile;
            if (col >= p.n) continue;
            *reinterpret_cast<float2*>(dst + col) =
                keep ? make_float2(total[4 * i + 2 * h], total[4 * i + 2 * h + 1]) : make_float2(fill, fill);
          }
        }
        continue;
      }
      // Epilogue through shared memory and TMA (p.tma_store): this warpgroup's 64 rows in bf16 to its output
      // tile, then one thread stores them (the out map bounds rows >= M and columns >= N) while the warpgroup
      // goes on to the next tile's main loop; the buffer is reused only after wait_group.read. Masked tiles with
      // rows past masked_m[g] (which the host-encoded map cannot bound) take the register path below, as do
      // layouts TMA cannot describe (the host clears p.tma_store).
      const int wg_row0 = t.m0 + wg * 64;
      if (p.tma_store && wg_row0 < t.rows && (p.mode != GemmMode::kGroupedMasked || wg_row0 + 64 <= t.rows)) {
        uint8_t* tile = smem + stages * C::kStageBytes + wg * C::kOutWgBytes;
        if (store_pending) {  // the previous tile's store has read the buffer before anyone overwrites it
          if (threadIdx.x % 128 == 0) bulk_wait_group_read<0>();
          named_barrier_sync(1 + wg, 128);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = t.m0 + row_in_tile + 8 * h, r = row_in_tile % 64 + 8 * h;
          bool keep = t.b_group >= 0;  // the same values as the register path (see there)
          float fill = 0.0f;
          if (p.mode == GemmMode::kGroupedContiguous && row < t.rows) {
            const int row_group = __ldg(p.m_indices + row);
            keep = keep && row_group == t.b_group;
            if (row_group != -1) fill = __int_as_float(0x7fffffff);
          }
#pragma unroll
          for (int i = 0; i < kBN / 8; ++i) {
            const int col = 8 * i + col_in_tile, box = col / C::kOutBoxCols;
            const uint32_t linear = box * C::kOutBoxBytes + (r * C::kOutBoxCols + col % C::kOutBoxCols) * 2;
            // the map's swizzle: 16-byte chunk bits [4, 4 + log2(span / 16)) ^= row bits (from bit 7)
            const uint32_t offset = linear ^ (((linear >> 7) & (C::kOutBoxCols / 8 - 1)) << 4);
            const float v0 = keep ? total[4 * i + 2 * h] : fill, v1 = keep ? total[4 * i + 2 * h + 1] : fill;
            *reinterpret_cast<__nv_bfloat162*>(tile + offset) = __floats2bfloat162_rn(v0, v1);
          }
        }
        fence_proxy_async();  // this thread's st.shared, visible to the TMA unit (the async proxy)
        named_barrier_sync(1 + wg, 128);
        if (threadIdx.x % 128 == 0) {
#pragma unroll
          for (int box = 0; box < kBN / C::kOutBoxCols; ++box) {
            tma_store_3d(&tmap_out, tile + box * C::kOutBoxBytes, t.n0 + box * C::kOutBoxCols, wg_row0, t.a_group);
          }
          bulk_commit_group();
        }
        store_pending = true;
        continue;
      }
      // Epilogue: bf16 pairs (n % 16 == 0, so a pair never straddles the N edge).
      __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + static_cast<int64_t>(t.a_group) * p.out_group_stride;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = t.m0 + row_in_tile + 8 * h;
        if (row >= t.rows) continue;  // masked: rows >= masked_m[g] stay untouched
        // contiguous: a row whose id is not its tile's group is not computed: 0 for padding (-1), NaN for any
        // other id (out of [0, G) or a segment not aligned to BLOCK_M; m_indices is trusted, see gemm.py)
        bool keep = t.b_group >= 0;
        float fill = 0.0f;
        if (p.mode == GemmMode::kGroupedContiguous) {
          const int row_group = __ldg(p.m_indices + row);
          keep = keep && row_group == t.b_group;
          if (row_group != -1) fill = __int_as_float(0x7fffffff);
        }
        __nv_bfloat16* dst = out + static_cast<int64_t>(row) * p.out_row_stride;
#pragma unroll
        for (int i = 0; i < kBN / 8; ++i) {
          const int col = t.n0 + 8 * i + col_in_tile;
          if (col >= p.n) continue;
          const float v0 = keep ? total[4 * i + 2 * h] : fill, v1 = keep ? total[4 * i + 2 * h + 1] : fill;
          *reinterpret_cast<__nv_bfloat162*>(dst + col) = __floats2bfloat162_rn(v0, v1);
        }
      }
    }
    // The stores' global writes complete before the CTA exits (and its shared memory goes to the next CTA).
    if (store_pending && threadIdx.x % 128 == 0) bulk_wait_group<0>();
  }
#else
  (void)tmap_a; (void)tmap_b; (void)tmap_out; (void)p;
#endif
}

// ------------------------------------------------------------------------------------------------
// Host side: block-size heuristic, tensor maps, launch.

struct BlockShape {
  int block_m, block_n;
};

// BLOCK_M: 64 when the (expected) rows per problem fit one 64-row warpgroup, else 128 (two). BLOCK_N: the
// candidate with the least work on the busiest SM, waves x BLOCK_N (tile time ~ BLOCK_N at fixed BLOCK_M);
// ties go to 128 (half the A re-reads). E.g. M=64, N=2112 on 132 SMs: 33 tiles of 64 beat 17 of 128.
inline BlockShape select_block_shape(int m_per_problem, int n, int problems, int num_sms) {
  BlockShape best{m_per_problem <= 64 ? 64 : 128, 128};
  int64_t best_cost = -1;
  for (const int block_n : {128, 64}) {
    const int64_t tiles = static_cast<int64_t>(problems) * ceil_div(m_per_problem, best.block_m) * ceil_div(n, block_n);
    const int64_t cost = ceil_div<int64_t>(tiles, num_sms) * block_n;
    if (best_cost < 0 || cost < best_cost) best_cost = cost, best.block_n = block_n;
  }
  return best;
}

enum class LaunchResult { kLaunched, kUnsupported, kError };

// TMA requirements (cuTensorMapEncodeTiled): 16-byte aligned global address, strides multiples of 16 bytes
// and < 2^40. The portable kernel handles what this rejects (broadcast views with stride 0, for instance).
inline bool tma_compatible(const Fp8GemmParams& p) {
  constexpr int64_t kMaxStride = int64_t{1} << 40;
  const auto aligned = [](const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; };
  if (p.k <= 0 || p.num_groups <= 0 || !aligned(p.a, 16) || !aligned(p.b, 16) || !aligned(p.out, 4)) return false;
  if (p.a_row_stride < p.k || p.a_row_stride % 16 != 0 || p.a_row_stride >= kMaxStride) return false;
  if (p.mode == GemmMode::kGroupedMasked && p.num_groups > 1 &&
      (p.a_group_stride < p.m * p.a_row_stride || p.a_group_stride % 16 != 0 || p.a_group_stride >= kMaxStride)) {
    return false;
  }
  if (p.out_row_stride % 2 != 0 || p.out_group_stride % 2 != 0) return false;  // bf16x2 stores
  return static_cast<int64_t>(p.n) * p.k < kMaxStride;
}

// The TMA-store epilogue's bf16 out map [groups, rows, n]: 16-byte aligned base, row (masked: and group) strides
// in bytes multiples of 16 below 2^40, rows (groups) not overlapping. Other layouts (a row stride padded to an odd
// number of elements, an 8-byte offset view, ...) keep the register epilogue: plan() clears tma_store for them.
inline bool tma_store_compatible(const Fp8GemmParams& p) {
  constexpr int64_t kMaxStride = int64_t{1} << 40;
  const int64_t row_bytes = p.out_row_stride * 2, group_bytes = p.out_group_stride * 2;
  if (reinterpret_cast<uintptr_t>(p.out) % 16 != 0) return false;
  if (p.out_row_stride < p.n || row_bytes % 16 != 0 || int64_t{p.m} * row_bytes >= kMaxStride) return false;
  if (p.mode == GemmMode::kGroupedMasked && p.num_groups > 1 &&
      (p.out_group_stride < int64_t{p.m} * p.out_row_stride || group_bytes % 16 != 0 || group_bytes >= kMaxStride)) {
    return false;
  }
  return true;
}

// cuTensorMapEncodeTiled through the runtime's driver entry point: no link against libcuda, so the
// extension builds and imports on machines without a driver.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// 3-D map over e4m3 [groups, rows, k] (strides in bytes), box 128 (K) x box_rows x 1, 128-byte swizzle,
// out-of-bounds elements read as zero.
inline bool encode_operand_map(CUtensorMap* map, PFN_cuTensorMapEncodeTiled_v12000 encode, const void* base, int k,
                               int rows, int groups, int64_t row_stride, int64_t group_stride, int box_rows) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(k), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(groups)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(row_stride), static_cast<cuuint64_t>(group_stride)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(kBlockK), static_cast<cuuint32_t>(box_rows), 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, const_cast<void*>(base), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// 3-D map over the bf16 output [groups, rows, n] (strides in bytes) for the TMA-store epilogue: box box_cols (N,
// at most 64 = 128 bytes) x 64 rows x 1, swizzled over its box_cols * 2-byte rows (32, 64 or 128B); a store
// writes only the box's elements inside the dims (rows >= M and columns >= N are left alone).
inline bool encode_output_map(CUtensorMap* map, PFN_cuTensorMapEncodeTiled_v12000 encode, const void* base, int n,
                              int rows, int groups, int64_t row_stride_bytes, int64_t group_stride_bytes,
                              int box_cols) {
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(n), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(groups)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(row_stride_bytes),
                                 static_cast<cuuint64_t>(group_stride_bytes)};
  const cuuint32_t box[3] = {static_cast<cuuint32_t>(box_cols), 64, 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  const CUtensorMapSwizzle swizzle = box_cols == 16   ? CU_TENSOR_MAP_SWIZZLE_32B
                                     : box_cols == 32 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                      : CU_TENSOR_MAP_SWIZZLE_128B;
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void*>(base), dims, strides, box,
                element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// ---- caches (issue 15: decode GEMMs are a few us; re-encoding two tensor maps and re-querying the device and the
// function attributes on every call cost a few us more). All guarded by one mutex; entries never go stale:
// a tensor map is a pure function of its key (the address included), attributes of (device, kernel).
struct DeviceInfo {
  int num_sms = 0, smem_optin = 0;
};
inline std::mutex& cache_mutex() {
  static std::mutex mu;
  return mu;
}
// SM count and opt-in shared memory of the current device (queried once per device). false: cannot query.
inline bool device_info(int& device, DeviceInfo& info) {
  if (cudaGetDevice(&device) != cudaSuccess || device < 0) return false;
  static std::vector<DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(cache_mutex());
  if (static_cast<size_t>(device) >= cache.size()) cache.resize(device + 1);
  DeviceInfo& d = cache[device];
  if (d.num_sms <= 0) {
    DeviceInfo q;
    if (cudaDeviceGetAttribute(&q.num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || q.num_sms <= 0 ||
        cudaDeviceGetAttribute(&q.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
      return false;
    }
#ifdef DEEPKERNELS_EMULATOR
    return info = q, true;  // DEEPKERNELS_EMULATE_SMS may change between calls: never cached under emulation
#endif
    d = q;
  }
  info = d;
  return true;
}

struct MapKey {
  int device;
  const void* base;
  int k, rows, groups, box_rows;
  int64_t row_stride, group_stride;
  int out_box_cols = 0;  // 0: an e4m3 operand map (k = K); > 0: the bf16 output map (k = N, strides in elements)
  bool operator==(const MapKey& o) const {
    return device == o.device && base == o.base && k == o.k && rows == o.rows && groups == o.groups &&
           box_rows == o.box_rows && row_stride == o.row_stride && group_stride == o.group_stride &&
           out_box_cols == o.out_box_cols;
  }
};
// encode_operand_map / encode_output_map through a small cache (weights hit every call; so do reused activation
// and output buffers).
inline bool cached_tensor_map(CUtensorMap* map, PFN_cuTensorMapEncodeTiled_v12000 encode, const MapKey& key) {
  constexpr size_t kCapacity = 128;
  static std::vector<std::pair<MapKey, CUtensorMap>> cache;
  static size_t next_slot = 0;
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    for (const auto& e : cache) {
      if (e.first == key) return *map = e.second, true;
    }
  }
  const bool encoded =
      key.out_box_cols > 0
          ? encode_output_map(map, encode, key.base, key.k, key.rows, key.groups, key.row_stride * 2,
                              key.group_stride * 2, key.out_box_cols)
          : encode_operand_map(map, encode, key.base, key.k, key.rows, key.groups, key.row_stride, key.group_stride,
                               key.box_rows);
  if (!encoded) return false;
  std::lock_guard<std::mutex> lock(cache_mutex());
  if (cache.size() < kCapacity) {
    cache.emplace_back(key, *map);
  } else {
    cache[next_slot] = {key, *map};  // FIFO replacement
    next_slot = (next_slot + 1) % kCapacity;
  }
  return true;
}

// Split-K reduce: out[g, row, col] = bf16(sum over s of workspace[s, g, row, col]) in slice order (deterministic:
// the same bits on every run), over the rows group g has: M (dense and contiguous: one group), or masked_m[g]
// clamped to [0, M], read here on the device (no host sync; rows past it stay untouched). blocks_per_group CTAs
// per group stride over its rows.
__global__ void __launch_bounds__(256)
    fp8_gemm_splitk_reduce_kernel(const __grid_constant__ Fp8GemmParams p, int blocks_per_group) {
  const bool masked = p.mode == GemmMode::kGroupedMasked;
  const int group = static_cast<int>(blockIdx.x) / blocks_per_group;
  const int block = static_cast<int>(blockIdx.x) % blocks_per_group;
  const int rows = masked ? min(max(__ldg(p.masked_m + group), 0), p.m) : p.m;
  const int64_t half_n = p.n / 2, pairs = static_cast<int64_t>(rows) * half_n;
  const int64_t group_elems = static_cast<int64_t>(p.m) * p.n, slice = (masked ? p.num_groups : 1) * group_elems;
  const float* ws = p.workspace + group * group_elems;
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + group * p.out_group_stride;
  for (int64_t i = static_cast<int64_t>(block) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(blocks_per_group) * blockDim.x) {
    const int64_t row = i / half_n, col = 2 * (i % half_n);
    const float* src = ws + row * p.n + col;
    float2 sum = *reinterpret_cast<const float2*>(src);
    for (int s = 1; s < p.split_k; ++s) {
      const float2 v = *reinterpret_cast<const float2*>(src + s * slice);
      sum.x += v.x;
      sum.y += v.y;
    }
    *reinterpret_cast<__nv_bfloat162*>(out + row * p.out_row_stride + col) = __floats2bfloat162_rn(sum.x, sum.y);
  }
}

// Per (kernel, device): the sm_90a image check and the opt-in dynamic shared memory (set once, at the
// deepest ring, so any plan's stage count fits).
template <int kBM, int kBN>
const char* prepare_kernel(int device, const DeviceInfo& info) {
  using C = Config<kBM, kBN>;
  constexpr auto kernel = fp8_gemm_sm90_kernel<kBM, kBN>;
  static std::vector<signed char> ready;  // per device: 0 unknown, 1 ready
  {
    std::lock_guard<std::mutex> lock(cache_mutex());
    if (static_cast<size_t>(device) < ready.size() && ready[device] == 1) return nullptr;
  }
  // The sm_90a image must be the one the device runs; an sm_80/89 image (or PTX JIT) of this kernel, and
  // the image of an sm_90 build without "a", are an empty body: only the sm_90a one has the static barriers.
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.binaryVersion < 90 || attr.ptxVersion < 90 ||
      attr.sharedSizeBytes < static_cast<size_t>(C::kBarrierBytes)) {
    return "DEEPKERNELS_GEMM_SM90=1 but the extension has no sm_90a image of the GEMM (build with "
           "DEEPKERNELS_CUDA_ARCHS containing 90a)";
  }
  if (info.smem_optin < C::kSmemBytes + C::kBarrierBytes) {
    return "DEEPKERNELS_GEMM_SM90=1: the device offers less shared memory per block than the kernel's ring needs";
  }
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes) != cudaSuccess) {
    return "DEEPKERNELS_GEMM_SM90=1: cudaFuncSetAttribute(MaxDynamicSharedMemorySize) failed";
  }
  std::lock_guard<std::mutex> lock(cache_mutex());
  if (static_cast<size_t>(device) >= ready.size()) ready.resize(device + 1, 0);
  ready[device] = 1;
  return nullptr;
}

template <int kBM, int kBN>
LaunchResult launch_shape(const Fp8GemmParams& params, const GemmPlan& plan, int device, const DeviceInfo& info,
                          cudaStream_t stream, const char** error) {
  using C = Config<kBM, kBN>;
  if ((*error = prepare_kernel<kBM, kBN>(device, info)) != nullptr) return LaunchResult::kError;
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) {
    *error = "DEEPKERNELS_GEMM_SM90=1: cuTensorMapEncodeTiled not found in the driver";
    return LaunchResult::kError;
  }
  Fp8GemmParams p = params;
  p.split_k = plan.split_k;
  p.stages = plan.stages;
  p.overlap = plan.overlap;
  if (p.split_k > 1 && (p.workspace == nullptr || p.workspace_bytes < workspace_bytes(plan, p))) {
    *error = "fp8_gemm: the split-K plan needs an fp32 workspace of fp8_gemm_workspace_bytes() (split_k x M x N "
             "floats, x G for masked)";
    return LaunchResult::kError;
  }
  const bool masked = p.mode == GemmMode::kGroupedMasked;
  const int a_groups = masked ? p.num_groups : 1;
  const int64_t a_group_stride = masked && p.num_groups > 1 ? p.a_group_stride : int64_t{p.m} * p.a_row_stride;
  CUtensorMap tmap_a, tmap_b;
  if (!cached_tensor_map(&tmap_a, encode, {device, p.a, p.k, p.m, a_groups, kBM, p.a_row_stride, a_group_stride}) ||
      !cached_tensor_map(&tmap_b, encode, {device, p.b, p.k, p.n, p.num_groups, kBN, p.k, int64_t{p.n} * p.k})) {
    *error = "DEEPKERNELS_GEMM_SM90=1: cuTensorMapEncodeTiled rejected an operand that passed the TMA checks";
    return LaunchResult::kError;
  }
  // TMA-store epilogue: the bf16 out map ([G, Mmax, N] for masked, else [1, M, N]); a layout it cannot describe
  // (plan() already cleared tma_store for those) keeps the register epilogue.
  CUtensorMap tmap_out{};
  p.tma_store = plan.tma_store && p.split_k <= 1 && tma_store_compatible(p) ? 1 : 0;
  if (p.tma_store) {
    const int out_groups = masked ? p.num_groups : 1;
    const int64_t out_group_stride = masked && p.num_groups > 1 ? p.out_group_stride : int64_t{p.m} * p.out_row_stride;
    if (!cached_tensor_map(&tmap_out, encode, {device, p.out, p.n, p.m, out_groups, 64, p.out_row_stride,
                                               out_group_stride, C::kOutBoxCols})) {
      p.tma_store = 0;
    }
  }
  if (p.tma_store && p.stages > C::kStoreStages) {
    *error = "fp8_gemm: a TMA-store plan with more stages than fit beside the output tile (fp8_gemm_plan)";
    return LaunchResult::kError;
  }
  launch_kernel<fp8_gemm_sm90_kernel<kBM, kBN>>(static_cast<unsigned>(plan.ctas), C::kThreads,
                                                C::smem_bytes(plan.stages, p.tma_store), stream, tmap_a, tmap_b,
                                                tmap_out, p);
  if (p.split_k > 1) {
    // CTAs per group: enough for its (expected) rows, ~4 per SM in all; rows beyond the estimate are strided.
    const int64_t groups = masked ? p.num_groups : 1, rows = masked ? plan::rows_per_problem(p) : p.m;
    const int64_t want = std::max<int64_t>(1, (rows * (p.n / 2) + 255) / 256);
    const int64_t cap = std::max<int64_t>(1, (int64_t{4} * info.num_sms + groups - 1) / groups);
    const int64_t per_group = std::min(want, cap);
    launch_kernel<fp8_gemm_splitk_reduce_kernel>(static_cast<unsigned>(groups * per_group), 256, 0, stream, p,
                                                 static_cast<int>(per_group));
  }
  return LaunchResult::kLaunched;
}

// The plan the sm_90a path would launch for p here: kPortable when TMA cannot describe the layout.
// *error: the device cannot be queried, or DEEPKERNELS_GEMM_CONFIG is invalid for p.
inline GemmPlan plan(const Fp8GemmParams& p, std::string& why, const char** error) {
  *error = nullptr;
  if (!tma_compatible(p)) return plan_portable(p);
  int device = 0;
  DeviceInfo info;
  if (!device_info(device, info)) {
    *error = "DEEPKERNELS_GEMM_SM90=1: cannot query the device";
    return plan_portable(p);
  }
  GemmPlan g = plan_sm90(p, info.num_sms, why, error);
  if (g.tma_store && !tma_store_compatible(p)) g.tma_store = 0;  // the register epilogue writes any layout
  return g;
}

// Runs the GEMM on the sm_90a kernel with `plan` (from plan() above, kernel kSm90). kError: the opt-in
// kernel cannot run here at all (*error says why).
inline LaunchResult launch(const Fp8GemmParams& p, const GemmPlan& plan, cudaStream_t stream, const char** error) {
  int device = 0;
  DeviceInfo info;
  if (!device_info(device, info)) {
    *error = "DEEPKERNELS_GEMM_SM90=1: cannot query the device";
    return LaunchResult::kError;
  }
  switch (plan.block_m * 1000 + plan.block_n) {
    case 64016: return launch_shape<64, 16>(p, plan, device, info, stream, error);
    case 64032: return launch_shape<64, 32>(p, plan, device, info, stream, error);
    case 64064: return launch_shape<64, 64>(p, plan, device, info, stream, error);
    case 64128: return launch_shape<64, 128>(p, plan, device, info, stream, error);
    case 128064: return launch_shape<128, 64>(p, plan, device, info, stream, error);
    case 128128: return launch_shape<128, 128>(p, plan, device, info, stream, error);
    default: *error = "fp8_gemm: a plan with a tile shape that is not instantiated"; return LaunchResult::kError;
  }
}

}  // namespace deepkernels::fp8_gemm::sm90
