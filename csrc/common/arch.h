#pragma once
// The project's arch macros; kernels test these, never the raw __CUDA_ARCH_FEAT_* macros, so the SIMT
// emulator (csrc/emulator) can select the same code paths.
// DEEPKERNELS_SM90A: 1 in the sm_90a device pass (wgmma, setmaxnreg and TMA exist only there: arch-
// conditional features) and under the emulator, which models an sm_90a device; 0 in every other pass.
#if defined(DEEPKERNELS_EMULATOR) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define DEEPKERNELS_SM90A 1
#else
#define DEEPKERNELS_SM90A 0
#endif
