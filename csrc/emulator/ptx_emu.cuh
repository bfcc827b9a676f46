#pragma once
// Emulated csrc/common/ptx.cuh: the same namespace and signatures, semantics from the PTX ISA
// (cp.async 9.7.9.25, ldmatrix 9.7.14.5.15, mma.sync m16n8k16 9.7.14.5.8, ex2 9.7.3.20).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <cstring>
#include <deque>
#include <vector>

namespace emu {

// Shared-state-space address of a generic pointer into shared memory (dynamic: kReserve + offset; static
// __shared__ variables: an address that is never converted back).
inline uint32_t to_shared(const void* p) {
  const TsanIgnore bookkeeping;
  const uint8_t* b = static_cast<const uint8_t*>(p);
  if (g_dyn_base == nullptr) g_dyn_base = find_dynamic_smem(p);
  if (g_dyn_base != nullptr && b >= g_dyn_base && b < g_dyn_base + kMaxSmemPerBlockOptin) {
    if (b >= g_dyn_base + g_dyn_bytes) fail("shared address past the launch's dynamic shared memory size");
    return kReserve + static_cast<uint32_t>(b - g_dyn_base);
  }
  const uint64_t addr = reinterpret_cast<uintptr_t>(p), high = addr >> 32, low = addr & 0xFFFFFFFFu;
  if (low < kReserve + uint64_t(kMaxSmemPerBlockOptin) || (g_static_smem_high != 0 && high != g_static_smem_high))
    fail("static shared memory at a host address the emulator cannot map to a 32-bit shared address");
  g_static_smem_high = high;
  return static_cast<uint32_t>(low);
}
inline uint8_t* from_shared(uint32_t a, uint32_t bytes = 1) {
  if (a >= kReserve + uint32_t(kMaxSmemPerBlockOptin)) {   // static shared memory (see to_shared)
    if (g_static_smem_high == 0) fail("shared address that no smem_addr() produced");
    return reinterpret_cast<uint8_t*>((g_static_smem_high << 32) | a);
  }
  if (g_dyn_base == nullptr || a < kReserve || a - kReserve + bytes > g_dyn_bytes)
    fail("shared address outside the launch's dynamic shared memory");
  return g_dyn_base + (a - kReserve);
}

// cp.async: per-thread pending copies; a committed group lands only at wait_group / wait_all.
struct Copy { uint8_t* dst; const uint8_t* src; bool valid; };
struct CpAsyncState { std::vector<Copy> open; std::deque<std::vector<Copy>> groups; };
inline thread_local std::vector<CpAsyncState> g_cp;   // by flat thread index
inline CpAsyncState& cp_state() { return g_cp[size_t(flat_tid())]; }
inline void cp_land(std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.valid) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
  }
  const TsanIgnore bookkeeping;
  ++g_progress;
}
inline void cp_async_cta_start() { g_cp.assign(size_t(blockDim.x) * blockDim.y * blockDim.z, CpAsyncState{}); }
inline void cp_async_cta_end() {
  for (const auto& s : g_cp)
    if (!s.open.empty() || !s.groups.empty()) fail("a thread exited with cp.async copies it never waited for");
}
inline const int g_cp_async_hooks = register_cta_hooks(&cp_async_cta_start, &cp_async_cta_end);

}  // namespace emu

namespace deepkernels::ptx {

inline uint32_t smem_addr(const void* p) { return emu::to_shared(p); }

inline void cp_async_16(uint32_t smem_dst, const void* gmem_src, bool valid) {
  uint8_t* dst = emu::from_shared(smem_dst, 16);
  if (smem_dst % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0))
    emu::fail("cp.async.cg 16: misaligned address");
  std::memset(dst, 0xFF, 16);   // in flight: a read before the wait sees NaN / garbage, not stale data
  const emu::TsanIgnore bookkeeping;
  emu::cp_state().open.push_back({dst, static_cast<const uint8_t*>(gmem_src), valid});
}
inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  cp_async_16(emu::to_shared(smem_dst), gmem_src, valid);
}
inline void cp_async_commit() {
  const emu::TsanIgnore bookkeeping;
  auto& s = emu::cp_state();
  s.groups.push_back(std::move(s.open));
  s.open.clear();
}
inline void cp_async_wait_all() {
  auto& s = emu::cp_state();
  cp_async_commit();
  for (; !s.groups.empty(); s.groups.pop_front()) emu::cp_land(s.groups.front());
}
template <int kPending>
inline void cp_async_wait_group() {
  auto& s = emu::cp_state();
  for (; s.groups.size() > size_t(kPending); s.groups.pop_front()) emu::cp_land(s.groups.front());
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane l gives the row address of matrix l / 8, row l % 8
// (16 bytes). Lane t receives in r[i], for matrix i: row t / 4, columns 2 (t % 4) and 2 (t % 4) + 1
// (.trans: rows 2 (t % 4) and 2 (t % 4) + 1 of column t / 4).
template <bool kTrans>
inline void ldmatrix_x4_impl(uint32_t (&r)[4], const void* smem_row) {
  struct Arg { const uint16_t* row; uint32_t* out; } a{static_cast<const uint16_t*>(smem_row), r};
  if (emu::to_shared(smem_row) % 16 != 0) emu::fail("ldmatrix: row address not 16-byte aligned");
  emu::warp_collective(kTrans ? "ldmatrix.x4.trans" : "ldmatrix.x4", &a, [](void** args) {
    const uint16_t* rows[32];
    for (int l = 0; l < 32; ++l) rows[l] = static_cast<Arg*>(args[l])->row;
    for (int t = 0; t < 32; ++t) {
      uint32_t* out = static_cast<Arg*>(args[t])->out;
      for (int i = 0; i < 4; ++i) {
        uint16_t e[2];
        for (int j = 0; j < 2; ++j)
          e[j] = kTrans ? rows[i * 8 + 2 * (t % 4) + j][t / 4] : rows[i * 8 + t / 4][2 * (t % 4) + j];
        out[i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
      }
    }
  });
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { ldmatrix_x4_impl<false>(r, smem_row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { ldmatrix_x4_impl<true>(r, smem_row); }

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, fragments (g = lane / 4, c = lane % 4):
// A a[0] (g, 2c..2c+1), a[1] (g+8, 2c..), a[2] (g, 2c+8..), a[3] (g+8, 2c+8..);
// B b0 (k 2c..2c+1, n g), b1 (k 2c+8.., n g); C/D d[0..1] (g, 2c..2c+1), d[2..3] (g+8, 2c..2c+1).
template <bool kBf16>
inline float half_bits_to_float(uint16_t h) {
  if constexpr (kBf16) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  } else {
    __half_raw r;
    r.x = h;
    return __half2float(__half(r));
  }
}
template <bool kBf16>
inline void mma_16816_impl(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Arg { uint32_t a[4], b[2]; float* d; } arg{{a[0], a[1], a[2], a[3]}, {b0, b1}, d};
  emu::warp_collective(kBf16 ? "mma.sync.m16n8k16.bf16" : "mma.sync.m16n8k16.f16", &arg, [](void** args) {
    float A[16][16], B[16][8], D[16][8];
    for (int t = 0; t < 32; ++t) {
      const Arg& x = *static_cast<Arg*>(args[t]);
      const int g = t / 4, c = t % 4;
      for (int j = 0; j < 2; ++j) {
        A[g][2 * c + j] = half_bits_to_float<kBf16>(uint16_t(x.a[0] >> (16 * j)));
        A[g + 8][2 * c + j] = half_bits_to_float<kBf16>(uint16_t(x.a[1] >> (16 * j)));
        A[g][2 * c + 8 + j] = half_bits_to_float<kBf16>(uint16_t(x.a[2] >> (16 * j)));
        A[g + 8][2 * c + 8 + j] = half_bits_to_float<kBf16>(uint16_t(x.a[3] >> (16 * j)));
        B[2 * c + j][g] = half_bits_to_float<kBf16>(uint16_t(x.b[0] >> (16 * j)));
        B[2 * c + 8 + j][g] = half_bits_to_float<kBf16>(uint16_t(x.b[1] >> (16 * j)));
      }
      D[g][2 * c] = x.d[0]; D[g][2 * c + 1] = x.d[1]; D[g + 8][2 * c] = x.d[2]; D[g + 8][2 * c + 1] = x.d[3];
    }
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        float s = 0.f;   // bf16/f16 products are exact in fp32; the hardware's summation order is unspecified
        for (int k = 0; k < 16; ++k) s += A[m][k] * B[k][n];
        D[m][n] += s;
      }
    for (int t = 0; t < 32; ++t) {
      float* out = static_cast<Arg*>(args[t])->d;
      const int g = t / 4, c = t % 4;
      out[0] = D[g][2 * c]; out[1] = D[g][2 * c + 1]; out[2] = D[g + 8][2 * c]; out[3] = D[g + 8][2 * c + 1];
    }
  });
}
inline void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_16816_impl<true>(d, a, b0, b1);
}
inline void mma_f16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma_16816_impl<false>(d, a, b0, b1);
}

// ex2.approx.ftz.f32: exp2f with subnormal inputs and results flushed to zero; ex2(-inf) = +0.
inline float ex2(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = exp2f(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

}  // namespace deepkernels::ptx
