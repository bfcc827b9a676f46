#pragma once
#include <cuda_runtime.h>
#include "heuristic.h"
#include "params.h"

namespace deepkernels::fp8_gemm {

// Launches the FP8 blockwise GEMM described by params (dense, grouped-contiguous or grouped-masked).
// Requirements checked by the caller: n % 16 == 0, k % 16 == 0, a rows and the a/b base pointers
// 16-byte aligned, out 4-byte aligned. No host synchronisation (masked_m and m_indices are read on the
// device). Returns nullptr once the kernel is enqueued, else why the opt-in sm_90a kernel
// (DEEPKERNELS_GEMM_SM90=1) cannot run on this build/device; nothing was launched then.
// (Plans with split-K need params.workspace: see fp8_gemm_plan; without one this returns an error.)
const char* fp8_gemm_nt(const Fp8GemmParams& params, cudaStream_t stream);

// The launch plan of fp8_gemm_nt for params on the current device (heuristic.h: kernel, tile shape, split-K,
// stages, CTAs; DEEPKERNELS_GEMM_CONFIG > tuning table > heuristic for the opt-in sm_90a kernel). *error when
// it cannot run (device query, invalid DEEPKERNELS_GEMM_CONFIG); nothing launched. Then give params a
// workspace of fp8_gemm_workspace_bytes(plan, params) bytes (0: none) and launch with the plan.
GemmPlan fp8_gemm_plan(const Fp8GemmParams& params, const char** error);
size_t fp8_gemm_workspace_bytes(const GemmPlan& plan, const Fp8GemmParams& params);
const char* fp8_gemm_nt(const Fp8GemmParams& params, const GemmPlan& plan, cudaStream_t stream);

// The plan of the last fp8_gemm_nt launch on this thread (tests and explain() read it back).
const GemmPlan& fp8_gemm_last_plan();

// Replaces the tuning table the sm_90a plans consult (entries measured by `python -m bench sweep`).
void fp8_gemm_set_table(const plan::TableEntry* entries, size_t count);

// Weight-gradient GEMM: out[m, n] += a @ b^T in fp32, 1x128 per-row scales on both operands. The portable
// mma.sync kernel on every arch; the sm_90a TMA/wgmma kernel with DEEPKERNELS_GEMM_SM90=1 on sm_90 (opt-in,
// as for fp8_gemm_nt). Requirements checked by the caller: k % 16 == 0, a/b rows and base pointers 16-byte
// aligned. Any m, n; k == 0 launches nothing. Returns nullptr once enqueued, else why the opt-in kernel
// cannot run here (nothing launched).
const char* wgrad_gemm_nt(const WgradGemmParams& params, cudaStream_t stream);

// K-grouped weight gradients (DeepGEMM's flat layout, see params.h): one wgrad_gemm_nt launch per group with
// ks[g] > 0. Requirements: every ks[g] % 16 == 0, a/b base pointers 16-byte aligned, scales and out contiguous.
// Returns nullptr, or the first group's launch error (later groups not launched).
const char* k_grouped_wgrad_gemm_nt(const KGroupedWgradGemmParams& params, cudaStream_t stream);

}  // namespace deepkernels::fp8_gemm
