// The MLA decode kernels (metadata, split-KV portable, sm_90a and sm_90a pipelined, combine, cache write) and their launch
// code, unchanged, compiled for the SIMT emulator.
#include "runtime.h"

#include "../mla_decode/launch.cu"

DEEPKERNELS_EMU_DYNAMIC_SMEM(deepkernels::mla, unsigned char, smem_raw);
DEEPKERNELS_EMU_DYNAMIC_SMEM(deepkernels::mla::sm90, uint8_t, sm90_smem);
DEEPKERNELS_EMU_DYNAMIC_SMEM(deepkernels::mla::sm90p, uint8_t, sm90p_smem);
