#pragma once
// Plain parameter structs of the MLA decode kernels (layouts: deepkernels/mla.py's docstring).
#include <cstdint>

namespace deepkernels::mla {

// Split-KV decode + combine. Strides are in elements. q rows and kv rows have unit stride in the
// last dim and 16-byte aligned starts (checked by the binding).
struct MlaDecodeParams {
  const void* q;                 // bf16 or fp16 [b, s_q, h_q, 576]
  int64_t q_batch_stride, q_seq_stride, q_head_stride;
  const void* kv;                // q's 16-bit type, or e4m3 (bf16 q only) [num_blocks, page_size, h_kv, 576]
  int64_t kv_block_stride, kv_page_stride, kv_head_stride;
  const float* kv_scale;         // fp32 [num_blocks, page_size, h_kv] contiguous; null for bf16
  bool kv_fp8;
  const int* block_table;        // int32 [b, max_blocks]; entries are trusted (DEEPKERNELS_CHECK=1 validates
                                 // them): an entry outside [0, num_blocks) is never dereferenced, its keys score NaN
  int64_t block_table_stride;
  int num_blocks, max_blocks;    // kv_cache.size(0), block_table.size(1): the bounds of those guards
  const int* cache_seqlens;      // int32 [b]
  const int* tile_scheduler_metadata;  // int32 [num_sm_parts, 8]
  const int* num_splits;         // int32 [b + 1]
  int num_sm_parts;
  float* o_accum;                // fp32 [b + num_sm_parts, s_q * h_q, 512]: per-split normalised output
  float* lse_accum;              // fp32 [b + num_sm_parts, s_q * h_q]: per-split natural-log lse (-inf: no key)
  void* out;                     // q's type [b, s_q, h_q, 512] contiguous
  float* lse;                    // fp32 [b, h_q, s_q] contiguous
  int batch, s_q, h_q, h_kv, page_size;
  float softmax_scale;
  bool causal;
  bool fp16;                     // q, out (and a 16-bit cache) are fp16 instead of bf16
};

struct MlaMetadataParams {
  const int* cache_seqlens;      // int32 [b]
  int batch, num_sm_parts;
  int* tile_scheduler_metadata;  // int32 [num_sm_parts, 8]
  int* num_splits;               // int32 [b + 1]
};

// kv_cache[slot / page, slot % page, h] = kv[t, h] (quantised per row for e4m3); slot -1 skips.
struct MlaWriteCacheParams {
  const void* kv;                // [t, h_kv, 576] contiguous, kv_dtype
  int kv_dtype;                  // deepkernels::DType
  const int64_t* slot_mapping;   // [t]
  void* cache;                   // [num_blocks, page, h_kv, 576] contiguous, bf16, fp16 or e4m3
  float* cache_scale;            // [num_blocks, page, h_kv] (e4m3 only)
  bool cache_fp8;
  int64_t num_tokens;
  int64_t num_slots;             // num_blocks * page: slots outside [0, num_slots) are skipped, never written
  int h_kv, page_size;
  bool cache_fp16;               // a 16-bit cache is fp16 (else bf16)
};

}  // namespace deepkernels::mla
