#pragma once
// The split plan on the device (same result as deepkernels/mla.py get_mla_decode_metadata_ref).
// One CTA scans the batch in chunks: blocks_i = ceil(L_i / 64), start_i = sum_{j<i} blocks_j,
// P = max(1, ceil(T / parts)); sequence i touches parts floor(start_i / P) .. floor((end_i - 1) / P) and
// writes, for each of them, the begin fields (when the part begins inside i) and the end fields
// (when it ends inside i). Parts past T are marked empty (begin_batch = end_batch = b).
#include "config.h"
#include "params.h"
#include "split_output.cuh"

namespace deepkernels::mla {

// The split kernels' walk over their part of the plan (blockIdx.x): calls
// attend(batch, kv_begin, kv_end, seqlen, split) for every (sequence, KV range) the part owns.
template <typename Attend>
__device__ __forceinline__ void for_each_split_of_part(const MlaDecodeParams& p, Attend&& attend) {
  const int* meta = p.tile_scheduler_metadata + blockIdx.x * kMetadataSize;
  const int begin_batch = meta[0], begin_block = meta[1], end_batch = meta[2], end_block = meta[3];
  const int begin_split = meta[4];
  if (begin_batch < 0 || begin_batch >= p.batch) return;  // empty part (or a plan for another batch)
  for (int batch = begin_batch; batch <= end_batch && batch < p.batch; ++batch) {
    const int seqlen = p.cache_seqlens[batch];
    const int num_blocks = num_work_blocks(seqlen);
    // clamped so a plan that does not match cache_seqlens stays inside the sequence (and int range)
    const int lo = batch == begin_batch ? max(0, min(begin_block, num_blocks)) : 0;
    const int hi = batch == end_batch ? max(0, min(end_block, num_blocks)) : num_blocks;
    if (hi <= lo) continue;  // an empty sequence inside the part owns no split
    const int split = batch == begin_batch ? begin_split : p.num_splits[batch];
    const int64_t hi_key = static_cast<int64_t>(hi) * kBlockTokens;
    attend(batch, lo * kBlockTokens, hi_key < seqlen ? static_cast<int>(hi_key) : seqlen, seqlen, split);
  }
}

// Inclusive block-wide scan of one value per thread; `scratch` holds kMetadataThreads ints.
__device__ __forceinline__ int block_inclusive_scan(int v, int* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int offset = 1; offset < kMetadataThreads; offset <<= 1) {
    const int add = threadIdx.x >= static_cast<unsigned>(offset) ? scratch[threadIdx.x - offset] : 0;
    __syncthreads();
    scratch[threadIdx.x] += add;
    __syncthreads();
  }
  const int result = scratch[threadIdx.x];
  __syncthreads();
  return result;
}

__global__ void __launch_bounds__(kMetadataThreads) mla_metadata_kernel(const MlaMetadataParams p) {
  __shared__ int scratch[kMetadataThreads];
  __shared__ int carry_blocks, carry_splits, total_blocks;
  const int tid = threadIdx.x;

  // pass 1: total work blocks T
  int local = 0;
  for (int i = tid; i < p.batch; i += kMetadataThreads) local += num_work_blocks(p.cache_seqlens[i]);
  const int total_incl = block_inclusive_scan(local, scratch);
  if (tid == kMetadataThreads - 1) total_blocks = total_incl;
  if (tid == 0) {
    carry_blocks = 0;
    carry_splits = 0;
    p.num_splits[0] = 0;
  }
  __syncthreads();
  const int total = total_blocks;
  const int per_part = max(1, (total + p.num_sm_parts - 1) / p.num_sm_parts);

  // empty parts
  for (int part = tid; part < p.num_sm_parts; part += kMetadataThreads) {
    int* m = p.tile_scheduler_metadata + part * kMetadataSize;
    const bool empty = static_cast<int64_t>(part) * per_part >= total;
    if (empty) {
      m[0] = p.batch; m[1] = 0; m[2] = p.batch; m[3] = 0; m[4] = 0;
    }
    m[5] = m[6] = m[7] = 0;
  }

  // pass 2: per chunk of sequences, scan blocks and split counts, write num_splits and part bounds
  for (int base = 0; base < p.batch; base += kMetadataThreads) {
    const int i = base + tid;
    const int blocks = i < p.batch ? num_work_blocks(p.cache_seqlens[i]) : 0;
    const int end = carry_blocks + block_inclusive_scan(blocks, scratch);
    const int start = end - blocks;
    const int first_part = start / per_part;
    const int last_part = blocks > 0 ? (end - 1) / per_part : first_part - 1;
    const int count = last_part - first_part + 1;  // 0 for an empty sequence
    const int splits_end = carry_splits + block_inclusive_scan(count, scratch);
    const int splits_begin = splits_end - count;
    if (i < p.batch) p.num_splits[i + 1] = splits_end;
    for (int part = first_part; part <= last_part; ++part) {
      int* m = p.tile_scheduler_metadata + part * kMetadataSize;
      const int part_begin = part * per_part;
      const int part_end = min(part_begin + per_part, total);
      if (part_begin >= start) {
        m[0] = i;
        m[1] = part_begin - start;
        m[4] = splits_begin + part - first_part;
      }
      if (part_end <= end) {
        m[2] = i;
        m[3] = part_end - start;
      }
    }
    __syncthreads();
    if (tid == kMetadataThreads - 1) {
      carry_blocks = end;
      carry_splits = splits_end;
    }
    __syncthreads();
  }
}

}  // namespace deepkernels::mla
