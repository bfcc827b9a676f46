// The quant casts and their launch code, unchanged, compiled for the SIMT emulator.
#include "runtime.h"

#include "../quant/launch.cu"
