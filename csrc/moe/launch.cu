#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include "../common/launch.cuh"
#include "../common/dtype_dispatch.cuh"
#include "launch.h"
#include "layout.cuh"
#include "permute.cuh"
#include "wire.cuh"

namespace deepkernels::moe {

namespace {

bool aligned(const void* ptr, int64_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

dim3 row_grid(int64_t rows) { return dim3(static_cast<unsigned>(ceil_div<int64_t>(rows, kWarpsPerBlock))); }

// 8 elements per lane as one or two 16-byte accesses: rows must be 16-byte aligned.
bool vec8_ok(const void* a, const void* b, int64_t hidden, int elem_size) {
  return hidden % kElemsPerLane == 0 && aligned(a, 16) && aligned(b, elem_size == 1 ? 8 : 16) &&
         (hidden * elem_size) % 16 == 0;
}

}  // namespace

void get_dispatch_layout(const LayoutParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return;
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(p.num_tokens, kLayoutThreads)));
  const size_t smem = sizeof(int) * static_cast<size_t>(p.num_experts + p.num_ranks + 1);  // + the error flag
  launch_kernel<layout_kernel>(grid, kLayoutThreads, smem, stream, p);
}

void permute(const PermuteParams& p, cudaStream_t stream) {
  if (p.num_out == 0 || p.row_bytes == 0) return;
  const dim3 grid = row_grid(p.num_out);
  if (p.row_bytes % 16 == 0 && aligned(p.x, 16) && aligned(p.out, 16)) {
    launch_kernel<permute_kernel<uint4>>(grid, kThreads, 0, stream, p);
  } else if (p.row_bytes % 4 == 0 && aligned(p.x, 4) && aligned(p.out, 4)) {
    launch_kernel<permute_kernel<unsigned int>>(grid, kThreads, 0, stream, p);
  } else {
    launch_kernel<permute_kernel<unsigned char>>(grid, kThreads, 0, stream, p);
  }
}

void permute_fp8(const PermuteFp8Params& p, cudaStream_t stream) {
  if (p.num_out == 0 || p.hidden == 0) return;
  const dim3 grid = row_grid(p.num_out);
  dispatch_float_dtype(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    // the fp8 output row of 8 elements is one 8-byte store
    if (vec8_ok(p.x, p.out, p.hidden, static_cast<int>(sizeof(T))) && aligned(p.out, 8))
      launch_kernel<permute_fp8_kernel<T, true>>(grid, kThreads, 0, stream, p);
    else
      launch_kernel<permute_fp8_kernel<T, false>>(grid, kThreads, 0, stream, p);
  });
}

void unpermute_reduce(const UnpermuteReduceParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0 || p.hidden == 0) return;
  const dim3 grid = row_grid(p.num_tokens);
  dispatch_float_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (vec8_ok(p.y, p.out, p.hidden, static_cast<int>(sizeof(T))))
      launch_kernel<unpermute_reduce_kernel<T, true>>(grid, kThreads, 0, stream, p);
    else
      launch_kernel<unpermute_reduce_kernel<T, false>>(grid, kThreads, 0, stream, p);
  });
}

// The widest access (16 / 4 / 1 bytes) that divides n bytes and keeps both pointers aligned.
template <typename F>
void with_copy_width(const void* a, const void* b, int64_t n, F&& f) {
  if (n % 16 == 0 && aligned(a, 16) && aligned(b, 16)) {
    f(uint4{});
  } else if (n % 4 == 0 && aligned(a, 4) && aligned(b, 4)) {
    f(static_cast<unsigned int>(0));
  } else {
    f(static_cast<unsigned char>(0));
  }
}

void pack_rows(const PackRowsParams& p, cudaStream_t stream) {
  const int64_t warps = p.capacity >= 0 && p.num_ranks > p.num_rows ? p.num_ranks : p.num_rows;
  if (warps == 0) return;
  const dim3 grid = row_grid(warps);
  if (p.quantize) {
    dispatch_float_dtype(p.x_dtype, [&](auto tag) {
      using T = decltype(tag);
      // the fp8 output of 8 elements is one 8-byte store (rows are 16-byte aligned in the buffer)
      if (vec8_ok(p.x, p.out, p.hidden, static_cast<int>(sizeof(T))))
        launch_kernel<pack_rows_kernel<PackPayload::kQuantize, T, unsigned char, true>>(grid, kThreads, 0, stream, p);
      else
        launch_kernel<pack_rows_kernel<PackPayload::kQuantize, T, unsigned char, false>>(grid, kThreads, 0, stream, p);
    });
    return;
  }
  // rows in the buffer are 16-byte aligned: the payload's width depends on x and the row length only
  with_copy_width(p.x, p.out, p.layout.payload_bytes, [&](auto tag) {
    using V = decltype(tag);
    if (p.layout.scale_off >= 0)  // an fp8 pair (x_scale's pointer is null when T == 0)
      launch_kernel<pack_rows_kernel<PackPayload::kFp8Pair, float, V, false>>(grid, kThreads, 0, stream, p);
    else
      launch_kernel<pack_rows_kernel<PackPayload::kCopy, float, V, false>>(grid, kThreads, 0, stream, p);
  });
}

void unpack_rows(const UnpackRowsParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return;
  const dim3 grid = row_grid(p.num_rows);
  with_copy_width(p.buf, p.x, p.layout.payload_bytes, [&](auto tag) {
    using V = decltype(tag);
    launch_kernel<unpack_rows_kernel<V>>(grid, kThreads, 0, stream, p);
  });
}

}  // namespace deepkernels::moe
