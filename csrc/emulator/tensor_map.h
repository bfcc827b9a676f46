#pragma once
// The emulated CUtensorMap: what cuTensorMapEncodeTiled would encode, kept inside the 128-byte opaque
// object, and the encoder with the driver's documented constraints that the kernels rely on.
#include <cuda.h>
#include <cstdint>

namespace emu {

struct TensorMap {
  uint64_t magic;
  const uint8_t* base;
  uint64_t dims[3], strides[3];   // strides[i]: bytes between consecutive indices of dim i (dim 0: esize)
  uint32_t box[3], rank, esize;
  uint32_t swizzle;   // span in bytes: 0 (none), 32, 64 or 128
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "fits the opaque map");
constexpr uint64_t kTensorMapMagic = 0x656d75746d617031ull;

CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* addr,
                      const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                      const cuuint32_t* element_strides, CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                      CUtensorMapL2promotion l2, CUtensorMapFloatOOBfill oob_fill);

}  // namespace emu
