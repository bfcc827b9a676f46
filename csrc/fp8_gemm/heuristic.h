#pragma once
// FP8 GEMM launch plan: which kernel, tile shape, split-K and ring depth a call gets. Host-only C++ with no
// CUDA calls, so the same function serves the launcher (launch.cu), the emulator and the Python binding
// (deepkernels.gemm.explain mirrors it; tests/test_gemm.py checks the mirror against this function and
// against what the emulated launches record).
//
// Order of precedence for the sm_90a kernel: DEEPKERNELS_GEMM_CONFIG (read per call) > the tuning table
// (deepkernels/tuning/gemm_sm90.json, pushed from Python at import) > the heuristic below.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "params.h"

namespace deepkernels::fp8_gemm {

enum class GemmKernel : int { kPortable = 0, kSm90 = 1 };
enum class PlanSource : int { kHeuristic = 0, kTable = 1, kEnv = 2 };

struct GemmPlan {
  GemmKernel kernel = GemmKernel::kPortable;
  int block_m = 64, block_n = 64, split_k = 1, stages = 2;
  int overlap = 0;    // sm_90a: promotion of K block kb - 1 overlapped with kb's wgmmas (double accumulators)
  int tma_store = 0;  // sm_90a: bf16 tiles stored through shared memory by TMA, overlapping the next tile (sm90.cuh)
  int64_t units = 0;  // work units: output tiles x split_k (the persistent kernel's loop count, all CTAs)
  int ctas = 0;       // CTAs launched
  PlanSource source = PlanSource::kHeuristic;
};

namespace plan {

// sm_90a kernel constants (sm90.cuh static_asserts its Config against these).
constexpr int kSm90SmemBudget = 232448;  // 227 KiB: the sm_90 opt-in per-block maximum
constexpr int kSm90MaxStages = 8;
constexpr int kSm90AlignSlack = 1024;
// The instantiated (BLOCK_M, BLOCK_N) pairs: BLOCK_N divides 128 (one b_scale per tile and K block);
// the narrow 16 / 32 only with one math warpgroup (small M).
constexpr int kSm90Shapes[][2] = {{64, 16}, {64, 32}, {64, 64}, {64, 128}, {128, 64}, {128, 128}};
// Split-K (every mode): at least this many 128-wide K blocks per split, at most this many splits.
constexpr int kMinKBlocksPerSplit = 4;
constexpr int kMaxSplitK = 8;
// NOTE: the heuristic splits only while the fp32 workspace (split_k x G x Mmax x N for masked, whose masked_m is
// only known on the device; split_k x M x N otherwise) stays <= 128 MiB: a decode GEMM must not hold GiBs of
// scratch (e.g. 8 experts x Mmax 4096 x N 4096 is 512 MiB per slice). Forced plans (env, table) are not capped.
constexpr int64_t kMaxSplitWorkspaceBytes = int64_t{128} << 20;
// Cost model weights (relative units: one unit ~ 128 bytes of operand per SM per K block).
constexpr int64_t kReduceLaunchCost = 256;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The TMA-store epilogue's bf16 output tile in shared memory, after the ring.
constexpr int sm90_out_tile_bytes(int block_m, int block_n, int tma_store) {
  return tma_store ? block_m * block_n * 2 : 0;
}

constexpr int sm90_max_stages(int block_m, int block_n, int tma_store = 0) {
  const int ring =
      kSm90SmemBudget - kSm90AlignSlack - 16 * kSm90MaxStages - sm90_out_tile_bytes(block_m, block_n, tma_store);
  const int fit = ring / ((block_m + block_n) * 128);
  return fit < kSm90MaxStages ? fit : kSm90MaxStages;
}

// The overlapped promotion (two accumulator sets) fits the registers of every tile but 128x128.
constexpr bool sm90_can_overlap(int block_m, int block_n) { return !(block_m == 128 && block_n == 128); }

inline bool sm90_shape_instantiated(int block_m, int block_n) {
  for (const auto& s : kSm90Shapes) {
    if (s[0] == block_m && s[1] == block_n) return true;
  }
  return false;
}

// Rows per problem the tile shape is chosen for, and the number of problems (masked: groups).
inline int rows_per_problem(const Fp8GemmParams& p) {
  return p.mode == GemmMode::kGroupedMasked && p.expected_m > 0 ? (p.expected_m < p.m ? p.expected_m : p.m) : p.m;
}

inline int64_t sm90_units(const Fp8GemmParams& p, int block_m, int block_n, int split_k) {
  // The persistent grid covers every tile the problem can have: masked counts Mmax rows per group.
  const int64_t problems = p.mode == GemmMode::kGroupedMasked ? p.num_groups : 1;
  return problems * cdiv(p.m, block_m) * cdiv(p.n, block_n) * split_k;
}

inline void finish_sm90(GemmPlan& g, const Fp8GemmParams& p, int num_sms) {
  g.kernel = GemmKernel::kSm90;
  if (g.stages <= 0) g.stages = sm90_max_stages(g.block_m, g.block_n, g.tma_store);
  g.units = sm90_units(p, g.block_m, g.block_n, g.split_k);
  g.ctas = static_cast<int>(g.units < num_sms ? g.units : num_sms);
}

// fp32 bytes of one split-K slice of the workspace: G x Mmax x N for masked (every group's rows), else M x N.
inline int64_t split_slice_bytes(const Fp8GemmParams& p) {
  const int64_t groups = p.mode == GemmMode::kGroupedMasked ? p.num_groups : 1;
  return groups * p.m * int64_t{p.n} * 4;
}

// The heuristic. BLOCK_M: 64 when the (expected) rows per problem fit one 64-row math warpgroup, else 128.
// Among BLOCK_N in {128, 64, 32, 16} (BLOCK_M = 64) or {128, 64} and split-K in 1..8 (every mode, only while
// the tiles, counted from the expected rows, do not fill the SMs, >= 4 K blocks per split, workspace <= 128
// MiB): first keep >= 80% of the SM slots of the last wave busy if any candidate can, then the least modelled
// time, then the higher utilisation; remaining ties go to the wider tile and the fewer splits. Modelled time:
// waves x K blocks per split x (BLOCK_M + BLOCK_N) (the operand bytes a CTA streams per K block) plus, with
// split-K, a reduce launch and its fp32 traffic (split x the expected rows of all problems x N).
inline GemmPlan sm90_heuristic(const Fp8GemmParams& p, int num_sms) {
  const int m_pp = rows_per_problem(p);
  const int64_t problems = p.mode == GemmMode::kGroupedMasked ? p.num_groups : 1;
  const int block_m = m_pp <= 64 ? 64 : 128;
  const int64_t k_blocks = cdiv(p.k, 128);
  GemmPlan best;
  bool have = false, best_low = false;
  int64_t best_cost = 0, best_units = 0, best_waves = 1;
  for (const int block_n : {128, 64, 32, 16}) {
    if (!sm90_shape_instantiated(block_m, block_n)) continue;
    const int64_t tiles = problems * cdiv(m_pp, block_m) * cdiv(p.n, block_n);
    int64_t max_split = 1;
    if (tiles < num_sms) {
      max_split = k_blocks / kMinKBlocksPerSplit;
      if (max_split > kMaxSplitK) max_split = kMaxSplitK;
      while (max_split > 1 && max_split * split_slice_bytes(p) > kMaxSplitWorkspaceBytes) --max_split;
      if (max_split < 1) max_split = 1;
    }
    for (int64_t split = 1; split <= max_split; ++split) {
      const int64_t units = tiles * split, waves = cdiv(units, num_sms);
      int64_t cost = waves * cdiv(k_blocks, split) * (block_m + block_n);
      if (split > 1) {
        cost += kReduceLaunchCost + cdiv(8 * split * problems * m_pp * int64_t{p.n}, 128 * int64_t{num_sms});
      }
      const bool low = units * 5 < waves * num_sms * 4;  // < 80% of the SM slots busy
      bool better = !have;
      if (have) {
        if (low != best_low) better = !low;
        else if (cost != best_cost) better = cost < best_cost;
        else better = units * best_waves > best_units * waves;
      }
      if (better) {
        have = true, best_low = low, best_cost = cost, best_units = units, best_waves = waves;
        best.block_m = block_m, best.block_n = block_n, best.split_k = static_cast<int>(split);
      }
    }
  }
  best.stages = 0;
  best.source = PlanSource::kHeuristic;
  finish_sm90(best, p, num_sms);
  return best;
}

// ---- the tuning table (pushed from Python: deepkernels/tuning/gemm_sm90.json, entries of this device)
struct TableEntry {
  int mode, m, n, k, num_groups, expected_m, num_sms;
  int block_m, block_n, split_k, stages, overlap;
  int tma_store;
};

inline std::mutex& table_mutex() {
  static std::mutex mu;
  return mu;
}
inline std::vector<TableEntry>& table() {
  static std::vector<TableEntry> entries;
  return entries;
}

// Why (block_m, block_n, split_k, stages, overlap, tma_store) cannot run on problem p, or nullptr. `where` names
// the source.
inline const char* validate_sm90(const Fp8GemmParams& p, int block_m, int block_n, int split_k, int stages,
                                 int overlap, std::string& why, const char* where, int tma_store = 0) {
  char buf[320];
  const bool store = tma_store == 1;
  if (!sm90_shape_instantiated(block_m, block_n)) {
    std::snprintf(buf, sizeof(buf),
                  "%s: expected block_m,block_n one of 64,16 64,32 64,64 64,128 128,64 128,128, got %d,%d", where,
                  block_m, block_n);
  } else if (split_k < 1 || split_k > cdiv(p.k, 128)) {
    std::snprintf(buf, sizeof(buf), "%s: expected split_k in [1, ceil(K/128) = %lld], got %d", where,
                  static_cast<long long>(cdiv(p.k, 128)), split_k);
  } else if (tma_store != 0 && tma_store != 1) {
    std::snprintf(buf, sizeof(buf), "%s: expected tma_store 0 or 1, got %d", where, tma_store);
  } else if (store && split_k > 1) {
    std::snprintf(buf, sizeof(buf),
                  "%s: expected tma_store 0 with split_k > 1 (split-K stores fp32 slices to its workspace), got 1",
                  where);
  } else if (stages != 0 && (stages < 2 || stages > sm90_max_stages(block_m, block_n, tma_store))) {
    std::snprintf(buf, sizeof(buf),
                  "%s: expected stages in [2, %d] for %dx%d tiles%s (or 0 = the most that fit), got %d", where,
                  sm90_max_stages(block_m, block_n, tma_store), block_m, block_n,
                  store ? " with the TMA-store epilogue" : "", stages);
  } else if (overlap != 0 && overlap != 1) {
    std::snprintf(buf, sizeof(buf), "%s: expected overlap 0 or 1, got %d", where, overlap);
  } else if (overlap == 1 && !sm90_can_overlap(block_m, block_n)) {
    std::snprintf(buf, sizeof(buf),
                  "%s: expected overlap 0 for %dx%d tiles (two accumulator sets do not fit its registers), got 1",
                  where, block_m, block_n);
  } else {
    return nullptr;
  }
  why = buf;
  return why.c_str();
}

// DEEPKERNELS_GEMM_CONFIG="block_m,block_n,split_k[,stages[,overlap[,tma_store]]]" (read per call), or the legacy
// DEEPKERNELS_GEMM_SM90_BLOCKS="BMxBN" (split 1). Returns false when unset; *error when set but invalid.
inline bool env_override(const Fp8GemmParams& p, GemmPlan& g, std::string& why, const char** error) {
  const char* text = std::getenv("DEEPKERNELS_GEMM_CONFIG");
  const char* name = "DEEPKERNELS_GEMM_CONFIG";
  int v[6] = {0, 0, 1, 0, 0, 0};
  if (text != nullptr && *text != '\0') {
    int consumed = 0;
    const int count = std::sscanf(text, " %d , %d , %d%n , %d%n , %d%n , %d%n", &v[0], &v[1], &v[2], &consumed, &v[3],
                                  &consumed, &v[4], &consumed, &v[5], &consumed);
    if (count < 3 || text[consumed] != '\0') {
      why = std::string(name) +
            ": expected \"block_m,block_n,split_k[,stages[,overlap[,tma_store]]]\" (integers), got \"" + text + "\"";
      *error = why.c_str();
      return true;
    }
  } else if ((text = std::getenv("DEEPKERNELS_GEMM_SM90_BLOCKS")) != nullptr && *text != '\0') {
    name = "DEEPKERNELS_GEMM_SM90_BLOCKS";
    int consumed = 0;
    if (std::sscanf(text, "%dx%d%n", &v[0], &v[1], &consumed) != 2 || text[consumed] != '\0') {
      why = std::string(name) + ": expected \"BMxBN\" (e.g. 64x128), got \"" + text + "\"";
      *error = why.c_str();
      return true;
    }
  } else {
    return false;
  }
  if (const char* bad = validate_sm90(p, v[0], v[1], v[2], v[3], v[4], why, name, v[5])) {
    *error = bad;
    return true;
  }
  g.block_m = v[0], g.block_n = v[1], g.split_k = v[2], g.stages = v[3], g.overlap = v[4], g.tma_store = v[5];
  g.source = PlanSource::kEnv;
  return true;
}

inline bool table_lookup(const Fp8GemmParams& p, int num_sms, GemmPlan& g) {
  const int expected_m = p.mode == GemmMode::kGroupedMasked ? p.expected_m : 0;
  std::lock_guard<std::mutex> lock(table_mutex());
  for (const TableEntry& e : table()) {
    if (e.mode == static_cast<int>(p.mode) && e.m == p.m && e.n == p.n && e.k == p.k && e.num_groups == p.num_groups &&
        e.expected_m == expected_m && e.num_sms == num_sms) {
      std::string ignored;
      if (validate_sm90(p, e.block_m, e.block_n, e.split_k, e.stages, e.overlap, ignored, "table", e.tma_store) !=
          nullptr) {
        return false;
      }
      g.block_m = e.block_m, g.block_n = e.block_n, g.split_k = e.split_k, g.stages = e.stages, g.overlap = e.overlap;
      g.tma_store = e.tma_store;
      g.source = PlanSource::kTable;
      return true;
    }
  }
  return false;
}

}  // namespace plan

// The sm_90a kernel's plan for p on a device with num_sms SMs: env override, else table, else heuristic.
// *error (and the returned plan is meaningless) when DEEPKERNELS_GEMM_CONFIG is set but invalid for p.
inline GemmPlan plan_sm90(const Fp8GemmParams& p, int num_sms, std::string& why, const char** error) {
  *error = nullptr;
  GemmPlan g;
  if (plan::env_override(p, g, why, error)) {
    if (*error != nullptr) return g;
    plan::finish_sm90(g, p, num_sms);
    return g;
  }
  if (plan::table_lookup(p, num_sms, g)) {
    plan::finish_sm90(g, p, num_sms);
    return g;
  }
  return plan::sm90_heuristic(p, num_sms);
}

// The portable kernel's (fixed) plan: 64x64 tiles, one CTA each, no split.
inline GemmPlan plan_portable(const Fp8GemmParams& p) {
  GemmPlan g;
  g.kernel = GemmKernel::kPortable;
  g.block_m = 64, g.block_n = 64, g.split_k = 1, g.stages = 2;
  const int64_t z = p.mode == GemmMode::kGroupedMasked ? p.num_groups : 1;
  g.units = plan::cdiv(p.n, 64) * plan::cdiv(p.m, 64) * z;
  g.ctas = static_cast<int>(g.units);
  return g;
}

// fp32 workspace a split-K plan needs, in bytes (0 without split-K): [split_k, M, N] for dense and contiguous,
// [split_k, G, Mmax, N] for masked (masked_m is only known on the device, so every group's Mmax rows).
inline size_t workspace_bytes(const GemmPlan& g, const Fp8GemmParams& p) {
  return g.split_k > 1 ? static_cast<size_t>(g.split_k) * static_cast<size_t>(plan::split_slice_bytes(p)) : 0;
}

}  // namespace deepkernels::fp8_gemm
