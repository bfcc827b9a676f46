// The MoE kernels (layout, permute, permute + fp8, un-permute + reduce, fused wire pack / unpack) and their
// launch code, unchanged, compiled for the SIMT emulator.
#include "runtime.h"

#include "../moe/launch.cu"

DEEPKERNELS_EMU_DYNAMIC_SMEM(deepkernels::moe, int, smem_counts);
