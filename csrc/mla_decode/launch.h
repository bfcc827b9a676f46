#pragma once
#include <cuda_runtime.h>

#include <string>

#include "params.h"

namespace deepkernels::mla {

// Split-KV pass then combine, both on `stream`, no host synchronisation (CUDA-graph capturable).
// The split-KV kernel is the variant named by DEEPKERNELS_MLA_VARIANT (read on every call): "portable"
// (splitkv_portable.cuh, every device and cache dtype), "sm90" (splitkv_sm90.cuh) or "sm90_pipelined"
// (splitkv_sm90_pipelined.cuh), both sm_90a with a bf16 or fp16 cache. Unset or empty: "portable", or "sm90"
// where it runs when DEEPKERNELS_MLA_SM90=1 (the legacy switch, which falls back quietly). Throws
// std::invalid_argument (before any launch) for the errors mla_decode_variant_error reports.
void mla_decode(const MlaDecodeParams& params, cudaStream_t stream);
// "" when mla_decode can run params with the selected variant, else why not: an unknown variant name, or a
// variant that does not support the cache dtype or the current device / build.
std::string mla_decode_variant_error(const MlaDecodeParams& params);
// The kernel variant mla_decode runs for params ("portable", "sm90", "sm90_pipelined"); "" on error.
std::string mla_decode_variant(const MlaDecodeParams& params);
// The split plan (tile_scheduler_metadata, num_splits) from cache_seqlens, on the device.
void mla_decode_metadata(const MlaMetadataParams& params, cudaStream_t stream);
// Write / quantise new rows into the paged cache.
void mla_write_cache(const MlaWriteCacheParams& params, cudaStream_t stream);

}  // namespace deepkernels::mla
