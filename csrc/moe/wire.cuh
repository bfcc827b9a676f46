#pragma once
#include <cstdint>
#include "../common/fp8.cuh"
#include "config.h"
#include "params.h"
#include "permute.cuh"

namespace deepkernels::moe {

// ---------------------------------------------------------------------------------------------
// Fused pack / unpack of the dispatch wire rows (deepkernels/moe/wire.py). One warp per row; a row's
// fields are written by the warp that owns it, so every byte of the buffer is written exactly once.

// Destination rank of send row i in normal mode: the r with sum(per_rank[:r]) <= i < sum(per_rank[:r+1]),
// found 32 ranks at a time (a warp-wide inclusive scan, then a count of the lanes whose end is <= i).
// A row past the total gets num_ranks (no slot is local there).
__device__ __forceinline__ int rank_of_row(const int32_t* per_rank, int num_ranks, int64_t i, int lane) {
  int64_t base = 0;
  for (int r0 = 0; r0 < num_ranks; r0 += 32) {
    int64_t incl = r0 + lane < num_ranks ? __ldg(per_rank + r0 + lane) : 0;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int64_t v = __shfl_sync(0xffffffffu, incl, lane >= off ? lane - off : lane);
      if (lane >= off) incl += v;
    }
    // lanes past num_ranks hold the chunk total, so they count only when i is past the whole chunk
    int below = base + incl <= i ? 1 : 0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) below += __shfl_xor_sync(0xffffffffu, below, off);
    const int valid = num_ranks - r0 < 32 ? num_ranks - r0 : 32;
    if (below < valid) return r0 + below;
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
  return num_ranks;
}

// Byte copy of n bytes by one warp with V-wide accesses (both pointers and n aligned to sizeof(V));
// a null source writes zeros.
template <typename V>
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t n, int lane) {
  const int64_t words = n / static_cast<int64_t>(sizeof(V));
  V* d = reinterpret_cast<V*>(dst);
  if (src == nullptr) {
    for (int64_t w = lane; w < words; w += 32) d[w] = V{};
    return;
  }
  const V* s = reinterpret_cast<const V*>(src);
  constexpr int kUnroll = 4;
  for (int64_t base = lane; base < words; base += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * 32 < words) v[u] = load_nc(s + base + u * 32);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (base + u * 32 < words) d[base + u * 32] = v[u];
  }
}

__device__ __forceinline__ void warp_zero_bytes(uint8_t* dst, int64_t from, int64_t to, int lane) {
  for (int64_t b = from + lane; b < to; b += 32) dst[b] = 0;
}

// Payload kinds of the pack kernel.
enum class PackPayload { kCopy, kQuantize, kFp8Pair };

// kCopy: V = access width of the payload copy, T unused. kQuantize: T = x's float type, kVec as
// permute_fp8_kernel. kFp8Pair: V = access width of the e4m3 payload copy.
template <PackPayload kKind, typename T, typename V, bool kVec>
__global__ void __launch_bounds__(kThreads) pack_rows_kernel(PackRowsParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const RowLayout& l = p.layout;
  const bool fixed = p.capacity >= 0;
  const int64_t slot_bytes = kSlotHeaderBytes + (fixed ? p.capacity : 0) * l.row_bytes;
  if (fixed && i < p.num_ranks && lane < 4) {  // slot i's header: [rows for rank i, T, 0, 0]
    int32_t* hdr = reinterpret_cast<int32_t*>(p.out + i * slot_bytes);
    hdr[lane] = lane == 0 ? __ldg(p.per_rank + i) : lane == 1 ? static_cast<int32_t>(p.num_tokens) : 0;
  }
  if (i >= p.num_rows) return;
  const int rank = fixed ? static_cast<int>(i / p.capacity) : rank_of_row(p.per_rank, p.num_ranks, i, lane);
  uint8_t* dst = fixed ? p.out + rank * slot_bytes + kSlotHeaderBytes + (i % p.capacity) * l.row_bytes
                       : p.out + i * l.row_bytes;
  const int32_t src = __ldg(p.src_idx + i);
  if (bad_index(src, p.num_tokens)) {  // trusted index out of range: nothing read, the row poisoned
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t w = lane; w < l.row_bytes / 16; w += 32) d[w] = poison_bits<uint4>();
    return;
  }

  // payload (+ scales)
  if constexpr (kKind == PackPayload::kQuantize) {
    const T* x = src >= 0 ? static_cast<const T*>(p.x) + static_cast<int64_t>(src) * p.hidden : nullptr;
    const int64_t groups = ceil_div<int64_t>(p.hidden, kGroup);
    float* scale = reinterpret_cast<float*>(dst + l.scale_off);
    for (int64_t base = 0; base < p.hidden; base += 2 * kSlab) {
      float v0[kElemsPerLane], v1[kElemsPerLane];
      load8<T, kVec>(x, base + lane * kElemsPerLane, p.hidden, v0);
      load8<T, kVec>(x, base + kSlab + lane * kElemsPerLane, p.hidden, v1);
      quantize_store_slab<kVec>(v0, base, lane, p.hidden, groups, dst, scale);
      if (base + kSlab < p.hidden) quantize_store_slab<kVec>(v1, base + kSlab, lane, p.hidden, groups, dst, scale);
    }
  } else {
    const uint8_t* x = src >= 0 ? static_cast<const uint8_t*>(p.x) + static_cast<int64_t>(src) * l.payload_bytes
                                : nullptr;
    warp_copy<V>(dst, x, l.payload_bytes, lane);
    if constexpr (kKind == PackPayload::kFp8Pair) {
      const int64_t groups = ceil_div<int64_t>(p.hidden, kGroup);
      const float* s = src >= 0 ? p.x_scale + static_cast<int64_t>(src) * groups : nullptr;
      float* d = reinterpret_cast<float*>(dst + l.scale_off);
      for (int64_t g = lane; g < groups; g += 32) d[g] = s != nullptr ? __ldg(s + g) : 0.0f;
    }
  }
  warp_zero_bytes(dst, l.payload_bytes, (l.payload_bytes + 3) / 4 * 4, lane);  // payload's alignment gap

  // metadata: source token, local expert ids, weights
  if (l.src_off >= 0) {
    if (lane == 0) *reinterpret_cast<int32_t*>(dst + l.src_off) = src;
    int32_t* lid = reinterpret_cast<int32_t*>(dst + l.lid_off);
    float* w = l.w_off >= 0 ? reinterpret_cast<float*>(dst + l.w_off) : nullptr;
    for (int j = lane; j < p.topk; j += 32) {
      const int64_t gid = src >= 0 ? __ldg(p.topk_idx + static_cast<int64_t>(src) * p.topk + j) : -1;
      const int64_t local_id = gid - static_cast<int64_t>(rank) * p.num_local_experts;
      const bool local = gid >= 0 && local_id >= 0 && local_id < p.num_local_experts;
      lid[j] = local ? static_cast<int32_t>(local_id) : -1;
      if (w != nullptr) w[j] = local ? __ldg(p.topk_weights + static_cast<int64_t>(src) * p.topk + j) : 0.0f;
    }
  }
  warp_zero_bytes(dst, l.end, l.row_bytes, lane);  // row padding
}

// One warp per row: each field of the row copied out to its contiguous tensor.
template <typename V>
__global__ void __launch_bounds__(kThreads) unpack_rows_kernel(UnpackRowsParams p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (i >= p.num_rows) return;
  const RowLayout& l = p.layout;
  const uint8_t* row = p.capacity >= 0
                           ? p.buf + (i / p.capacity) * (kSlotHeaderBytes + p.capacity * l.row_bytes) +
                                 kSlotHeaderBytes + (i % p.capacity) * l.row_bytes
                           : p.buf + i * l.row_bytes;
  warp_copy<V>(static_cast<uint8_t*>(p.x) + i * l.payload_bytes, row, l.payload_bytes, lane);
  if (p.scale != nullptr) {
    const float* s = reinterpret_cast<const float*>(row + l.scale_off);
    for (int64_t g = lane; g < p.scale_groups; g += 32) p.scale[i * p.scale_groups + g] = s[g];
  }
  if (p.src != nullptr && lane == 0) p.src[i] = *reinterpret_cast<const int32_t*>(row + l.src_off);
  if (p.lid != nullptr) {
    const int32_t* lid = reinterpret_cast<const int32_t*>(row + l.lid_off);
    for (int j = lane; j < p.topk; j += 32) p.lid[i * p.topk + j] = lid[j];
  }
  if (p.w != nullptr) {
    const float* w = reinterpret_cast<const float*>(row + l.w_off);
    for (int j = lane; j < p.topk; j += 32) p.w[i * p.topk + j] = w[j];
  }
}

}  // namespace deepkernels::moe
