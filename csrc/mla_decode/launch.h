#pragma once
#include <cuda_runtime.h>

#include "params.h"

namespace deepkernels::mla {

// Split-KV pass then combine, both on `stream`, no host synchronisation (CUDA-graph capturable).
void mla_decode(const MlaDecodeParams& params, cudaStream_t stream);
// The split plan (tile_scheduler_metadata, num_splits) from cache_seqlens, on the device.
void mla_decode_metadata(const MlaMetadataParams& params, cudaStream_t stream);
// Write / quantise new rows into the paged cache.
void mla_write_cache(const MlaWriteCacheParams& params, cudaStream_t stream);

}  // namespace deepkernels::mla
