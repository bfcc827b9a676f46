// The FP8 GEMM kernels (portable and sm_90a) and their launch code, unchanged, compiled for the SIMT emulator.
#include "runtime.h"

#include "../fp8_gemm/launch.cu"

// One array for every sm90 kernel of the family (forward and wgrad both declare sm90::smem_raw).
DEEPKERNELS_EMU_DYNAMIC_SMEM(deepkernels::fp8_gemm::sm90, uint8_t, smem_raw);
