#pragma once
// Hopper (sm_90a) FP8 weight-gradient GEMM -- OPT-IN (DEEPKERNELS_GEMM_SM90=1), NOT YET RUN ON A GPU.
//
// out[M, N] += (a * a_scale) @ (b * b_scale)^T in fp32, both operands 1x128 per-row scaled along K.
// The forward kernel's design (sm90.cuh: persistent CTAs, one TMA producer warpgroup feeding a 128B-swizzled
// shared-memory ring through full/empty mbarriers, 1-2 math warpgroups running wgmma m64nBLOCK_Nk32 e4m3),
// with what wgrad changes:
//   * the promotion after each 128-wide K block scales every accumulator by its row's a scale AND its
//     column's b scale (b is 1x128 per row here, not 128x128 blocks), loaded before the barrier wait;
//   * the epilogue reads and adds: out += total, fp32, element-wise bounds (any M and N).
#include "sm90.cuh"

namespace deepkernels::fp8_gemm::sm90 {

// Tile `tile` of an m_blocks x n_blocks grid in the forward kernel's L2 order (bands of kGroupM M-blocks).
__device__ __forceinline__ void wgrad_tile_coords(int tile, int m_blocks, int n_blocks, int& m_block, int& n_block) {
  const int band = tile / (kGroupM * n_blocks), first_m = band * kGroupM;
  const int band_m = min(kGroupM, m_blocks - first_m), in_band = tile - band * kGroupM * n_blocks;
  m_block = first_m + in_band % band_m;
  n_block = in_band / band_m;
}

template <int kBM, int kBN>
__global__ void __launch_bounds__(Config<kBM, kBN>::kThreads, 1)
    wgrad_gemm_sm90_kernel(const __grid_constant__ CUtensorMap tmap_a, const __grid_constant__ CUtensorMap tmap_b,
                           const __grid_constant__ WgradGemmParams p) {
#if DEEPKERNELS_SM90A
  using C = Config<kBM, kBN>;
  using namespace deepkernels::ptx::sm90;
  extern __shared__ uint8_t smem_raw[];
  // NOTE: TMA's 128B swizzle and the wgmma descriptors assume every 8-row atom starts on a 1024-byte boundary.
  uint8_t* smem = smem_raw + ((1024u - (ptx::smem_addr(smem_raw) & 1023u)) & 1023u);
  __shared__ uint64_t barriers[2 * C::kStages];
  uint64_t* full = barriers;
  uint64_t* empty = barriers + C::kStages;
  const int num_k_blocks = ceil_div(p.k, kBlockK);
  const int m_blocks = ceil_div(p.m, kBM), n_blocks = ceil_div(p.n, kBN), tiles = m_blocks * n_blocks;

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
      int stage = 0;
      uint32_t phase = 0;
      for (int tile = static_cast<int>(blockIdx.x); tile < tiles; tile += static_cast<int>(gridDim.x)) {
        int m_block, n_block;
        wgrad_tile_coords(tile, m_blocks, n_blocks, m_block, n_block);
        for (int kb = 0; kb < num_k_blocks; ++kb) {
          mbarrier_wait(empty + stage, phase ^ 1u);  // the math warps released this stage
          uint8_t* stage_a = smem + stage * C::kStageBytes;
          mbarrier_arrive_expect_tx(full + stage, C::kStageBytes);
          tma_load_3d(stage_a, &tmap_a, full + stage, kb * kBlockK, m_block * kBM, 0);
          tma_load_3d(stage_a + C::kSmemA, &tmap_b, full + stage, kb * kBlockK, n_block * kBN, 0);
          if (++stage == C::kStages) stage = 0, phase ^= 1u;
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
    float partial[C::kAccum], total[C::kAccum];
#pragma unroll
    for (int i = 0; i < C::kAccum; ++i) partial[i] = 0.0f;

    int stage = 0;
    uint32_t phase = 0;
    for (int tile = static_cast<int>(blockIdx.x); tile < tiles; tile += static_cast<int>(gridDim.x)) {
      int m_block, n_block;
      wgrad_tile_coords(tile, m_blocks, n_blocks, m_block, n_block);
      const int m0 = m_block * kBM, n0 = n_block * kBN;
#pragma unroll
      for (int i = 0; i < C::kAccum; ++i) total[i] = 0.0f;
      // Rows/columns past the problem (zero-filled by TMA, never stored) read a clamped, valid scale address.
      const int row_0 = min(m0 + row_in_tile, p.m - 1), row_1 = min(m0 + row_in_tile + 8, p.m - 1);
      const float* a_scale_0 = p.a_scale + static_cast<int64_t>(row_0) * p.a_scale_row_stride;
      const float* a_scale_1 = p.a_scale + static_cast<int64_t>(row_1) * p.a_scale_row_stride;
      for (int kb = 0; kb < num_k_blocks; ++kb) {
        // Scales first: their global-load latency hides behind the barrier wait and the wgmmas.
        const float scale_a_0 = __ldg(a_scale_0 + kb * p.a_scale_col_stride);
        const float scale_a_1 = __ldg(a_scale_1 + kb * p.a_scale_col_stride);
        float scale_b[kBN / 4];
#pragma unroll
        for (int c = 0; c < kBN / 4; ++c) {
          const int col = min(n0 + 8 * (c / 2) + col_in_tile + c % 2, p.n - 1);
          scale_b[c] = __ldg(p.b_scale + static_cast<int64_t>(col) * p.b_scale_row_stride +
                             static_cast<int64_t>(kb) * p.b_scale_col_stride);
        }
        mbarrier_wait(full + stage, phase);
        const uint8_t* stage_a = smem + stage * C::kStageBytes;
        const uint64_t desc_a = smem_desc_k_major_sw128(stage_a + wg * 64 * kBlockK);
        const uint64_t desc_b = smem_desc_k_major_sw128(stage_a + C::kSmemA);
        register_fence(partial);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kBlockK / 32; ++kk) {
          // +32 bytes along K inside the swizzled 128-byte rows = +2 in the descriptor's start field.
          if constexpr (kBN == 128) {
            wgmma_m64n128k32_e4m3(partial, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
          } else {
            wgmma_m64n64k32_e4m3(partial, desc_a + 2 * kk, desc_b + 2 * kk, kk > 0);
          }
        }
        wgmma_commit();
        register_fence(partial);
        wgmma_wait<0>();
        register_fence(partial);
        if (lane == 0) mbarrier_arrive(empty + stage);  // smem of this stage no longer read
        if (++stage == C::kStages) stage = 0, phase ^= 1u;
        // Promotion on CUDA cores: this K block's fp32 partial times its row's and its column's scale.
#pragma unroll
        for (int i = 0; i < C::kAccum / 4; ++i) {
          total[4 * i + 0] = fmaf(partial[4 * i + 0], scale_a_0 * scale_b[2 * i + 0], total[4 * i + 0]);
          total[4 * i + 1] = fmaf(partial[4 * i + 1], scale_a_0 * scale_b[2 * i + 1], total[4 * i + 1]);
          total[4 * i + 2] = fmaf(partial[4 * i + 2], scale_a_1 * scale_b[2 * i + 0], total[4 * i + 2]);
          total[4 * i + 3] = fmaf(partial[4 * i + 3], scale_a_1 * scale_b[2 * i + 1], total[4 * i + 3]);
        }
      }

      // Epilogue: out += total, fp32, element by element (any N, any row stride).
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = m0 + row_in_tile + 8 * h;
        if (row >= p.m) continue;
        float* dst = p.out + static_cast<int64_t>(row) * p.out_row_stride;
#pragma unroll
        for (int i = 0; i < kBN / 8; ++i) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int col = n0 + 8 * i + col_in_tile + j;
            if (col < p.n) dst[col] += total[4 * i + 2 * h + j];
          }
        }
      }
    }
  }
#else
  (void)tmap_a; (void)tmap_b; (void)p;
#endif
}

// TMA requirements (cuTensorMapEncodeTiled): 16-byte aligned global addresses, row strides multiples of 16
// bytes, >= K and < 2^40. The portable kernel takes what this rejects.
inline bool wgrad_tma_compatible(const WgradGemmParams& p) {
  constexpr int64_t kMaxStride = int64_t{1} << 40;
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  if (p.k <= 0 || p.m <= 0 || p.n <= 0 || !aligned(p.a) || !aligned(p.b)) return false;
  for (const int64_t stride : {p.a_row_stride, p.b_row_stride}) {
    if (stride < p.k || stride % 16 != 0 || stride >= kMaxStride) return false;
  }
  return true;
}

template <int kBM, int kBN>
LaunchResult launch_wgrad_shape(const WgradGemmParams& p, int device, int num_sms, cudaStream_t stream,
                                const char** error) {
  using C = Config<kBM, kBN>;
  constexpr auto kernel = wgrad_gemm_sm90_kernel<kBM, kBN>;
  // As for the forward kernel: only the sm_90a image has a body (and the static barriers).
  static const cudaError_t image_status = [&] {
    cudaFuncAttributes attr{};
    const cudaError_t status = cudaFuncGetAttributes(&attr, kernel);
    if (status != cudaSuccess) return status;
    return (attr.binaryVersion >= 90 && attr.ptxVersion >= 90 &&
            attr.sharedSizeBytes >= static_cast<size_t>(C::kBarrierBytes))
               ? cudaSuccess
               : cudaErrorNoKernelImageForDevice;
  }();
  if (image_status != cudaSuccess) {
    *error = "DEEPKERNELS_GEMM_SM90=1 but the extension has no sm_90a image of the wgrad GEMM (build with "
             "DEEPKERNELS_CUDA_ARCHS containing 90a)";
    return LaunchResult::kError;
  }
  int smem_optin = 0;
  if (cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      smem_optin < C::kSmemBytes + C::kBarrierBytes) {
    *error = "DEEPKERNELS_GEMM_SM90=1: the device offers less shared memory per block than the kernel's ring needs";
    return LaunchResult::kError;
  }
  const auto encode = tensor_map_encoder();
  if (encode == nullptr) {
    *error = "DEEPKERNELS_GEMM_SM90=1: cuTensorMapEncodeTiled not found in the driver";
    return LaunchResult::kError;
  }
  CUtensorMap tmap_a, tmap_b;
  if (!encode_operand_map(&tmap_a, encode, p.a, p.k, p.m, 1, p.a_row_stride, int64_t{p.m} * p.a_row_stride, kBM) ||
      !encode_operand_map(&tmap_b, encode, p.b, p.k, p.n, 1, p.b_row_stride, int64_t{p.n} * p.b_row_stride, kBN)) {
    *error = "DEEPKERNELS_GEMM_SM90=1: cuTensorMapEncodeTiled rejected a wgrad operand that passed the TMA checks";
    return LaunchResult::kError;
  }
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes) != cudaSuccess) {
    *error = "DEEPKERNELS_GEMM_SM90=1: cudaFuncSetAttribute(MaxDynamicSharedMemorySize) failed";
    return LaunchResult::kError;
  }
  const int64_t tiles = static_cast<int64_t>(ceil_div(p.m, kBM)) * ceil_div(p.n, kBN);
  const unsigned grid = static_cast<unsigned>(tiles < num_sms ? tiles : num_sms);
  launch_kernel<kernel>(grid, C::kThreads, C::kSmemBytes, stream, tmap_a, tmap_b, p);
  return LaunchResult::kLaunched;
}

// Runs the wgrad GEMM on the sm_90a kernel. kUnsupported: a layout TMA cannot describe (use the portable
// kernel); kError: the opt-in kernel cannot run here at all (*error says why).
inline LaunchResult launch_wgrad(const WgradGemmParams& p, cudaStream_t stream, const char** error) {
  if (!wgrad_tma_compatible(p)) return LaunchResult::kUnsupported;
  int device = 0, num_sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || num_sms <= 0) {
    *error = "DEEPKERNELS_GEMM_SM90=1: cannot query the device";
    return LaunchResult::kError;
  }
  BlockShape shape = select_block_shape(p.m, p.n, 1, num_sms);
  // DEEPKERNELS_GEMM_SM90_BLOCKS=64x64|64x128|128x64|128x128 overrides the heuristic (tests run every shape).
  if (const char* forced = std::getenv("DEEPKERNELS_GEMM_SM90_BLOCKS")) {
    constexpr BlockShape kShapes[] = {{64, 64}, {64, 128}, {128, 64}, {128, 128}};
    for (const BlockShape candidate : kShapes) {
      char name[16];
      std::snprintf(name, sizeof(name), "%dx%d", candidate.block_m, candidate.block_n);
      if (std::strcmp(forced, name) == 0) shape = candidate;
    }
  }
  if (shape.block_m == 64) {
    return shape.block_n == 64 ? launch_wgrad_shape<64, 64>(p, device, num_sms, stream, error)
                               : launch_wgrad_shape<64, 128>(p, device, num_sms, stream, error);
  }
  return shape.block_n == 64 ? launch_wgrad_shape<128, 64>(p, device, num_sms, stream, error)
                             : launch_wgrad_shape<128, 128>(p, device, num_sms, stream, error);
}

}  // namespace deepkernels::fp8_gemm::sm90
