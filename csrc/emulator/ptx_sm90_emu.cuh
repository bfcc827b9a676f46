#pragma once
// Emulated csrc/common/ptx_sm90.cuh: mbarrier (arrival count, transaction bytes, phase parity), 3-D TMA tile
// loads through the emulated CUtensorMap (32/64/128B swizzle, out-of-bounds zero fill, the full box counted in
// transaction bytes), 3-D TMA stores in bulk async-groups (out-of-bounds elements not written, the source read at
// wait_group[.read], the global writes at wait_group or CTA end), named barriers (bar.sync id, n), and wgmma
// (e4m3 m64nNk32, bf16/f16 m64n{32,64}k16, bf16/f16 m64n256k16 with an MN-major B, also with A from registers)
// reading its operands through a general decode of the shared-memory matrix descriptor.
// Sources: PTX ISA 9.7.13.15 (mbarrier), 9.7.9.27 (cp.async.bulk.tensor), cp.async.bulk.commit_group /
// cp.async.bulk.wait_group, bar.sync, 9.7.15 (wgmma: 9.7.15.5.1 matrix
// descriptor and shared-memory layouts, 9.7.15.5.1.1 the D fragment), CUTLASS cute/arch/mma_sm90_desc.hpp.
#include <cuda.h>
#include <cudaTypedefs.h>
#include <algorithm>
#include <array>
#include <cstdint>
#include <deque>
#include <map>
#include <vector>

#include "../common/arch.h"
#include "ptx_emu.cuh"
#include "tensor_map.h"

namespace emu {

// A tensor map's swizzle of `span` bytes (0 none, 32, 64, 128) on a shared byte address: the 16-byte chunk bits
// [4, 4 + log2(span / 16)) ^= the same number of bits from bit 7 (CuTe Swizzle<1,4,3>, <2,4,3>, <3,4,3>).
inline uint32_t tma_swizzle(uint32_t a, uint32_t span) {
  return span == 0 ? a : a ^ (((a >> 7) & (span / 16 - 1)) << 4);
}
// Shared byte address of element (x, y, z) of a box at `dst`: rows of box[0] elements, packed, then swizzled.
inline uint32_t box_smem_addr(const TensorMap& tm, uint32_t dst, uint32_t x, uint32_t y, uint32_t z) {
  return tma_swizzle(dst + ((z * tm.box[1] + y) * tm.box[0] + x) * tm.esize, tm.swizzle);
}
// Global address of element (x, y, z) of the tensor, or nullptr when it is outside the map's dims.
inline uint8_t* tensor_element(const TensorMap& tm, int64_t x, int64_t y, int64_t z) {
  if (x < 0 || y < 0 || z < 0 || uint64_t(x) >= tm.dims[0] || uint64_t(y) >= tm.dims[1] || uint64_t(z) >= tm.dims[2])
    return nullptr;
  return const_cast<uint8_t*>(tm.base) + x * tm.esize + y * tm.strides[1] + z * tm.strides[2];
}
// Checks a tensor-map operand of a TMA instruction and its shared-memory box address; returns the map.
inline TensorMap tma_map_and_box(const CUtensorMap* map, uint32_t smem, const char* what) {
  TensorMap tm;
  std::memcpy(&tm, map, sizeof(tm));
  if (tm.magic != kTensorMapMagic) {
    fail(std::string(what) + ": the tensor map was not encoded by cuTensorMapEncodeTiled");
  }
  // NOTE: the swizzle pattern repeats every 8 rows of `span` bytes; the kernels align boxes to it (128 without).
  if (smem % (tm.swizzle ? 8 * tm.swizzle : 128) != 0)
    fail(std::string(what) + ": shared memory box misaligned for its swizzle mode");
  return tm;
}

// ---- the async proxy (TMA, wgmma) sees shared memory through its own view. Generic-proxy stores (st.shared,
// cp.async) reach that view only when a thread executes fence.proxy.async; TMA writes both. So a kernel that
// feeds wgmma from generic stores without the fence reads stale bytes (one legal outcome on hardware).
// NOTE: coarse, not per thread: one fence publishes every generic store made before the next async read.
inline thread_local std::vector<uint8_t> g_async_view;
inline thread_local bool g_async_view_stale = false;   // a fence was executed since the view was synced
inline void async_view_cta_start() {
  if (g_async_view.size() < size_t(kMaxSmemPerBlockOptin)) g_async_view.resize(kMaxSmemPerBlockOptin);
  if (g_dyn_base != nullptr) std::memcpy(g_async_view.data(), g_dyn_base, g_dyn_bytes);
  else std::memset(g_async_view.data(), 0xA5, g_dyn_bytes);   // the launch's garbage fill, see runtime.cpp
  g_async_view_stale = false;
}
inline const int g_async_view_hooks = register_cta_hooks(&async_view_cta_start, [] {});
// The async proxy's byte at shared address a (dynamic shared memory only).
inline uint8_t* async_view(uint32_t a, uint32_t bytes) {
  uint8_t* generic = from_shared(a, bytes);   // bounds
  EMU_TSAN_READ_RANGE(generic, bytes);        // racecheck: the async proxy's access is to this shared memory
  if (g_async_view_stale) {
    const TsanIgnore bookkeeping;
    std::memcpy(g_async_view.data(), g_dyn_base, g_dyn_bytes);
    g_async_view_stale = false;
  }
  return g_async_view.data() + (generic - g_dyn_base);
}

// ---- mbarrier: the state lives beside the 64-bit object (keyed by its address), reset at every CTA start.
struct PendingTma { uint32_t dst; TensorMap map; int coord[3]; };
struct MBar {
  uint32_t expected = 0, pending = 0, phase = 0;
  int64_t tx = 0;
  std::vector<PendingTma> tma;   // issued, lands when a thread waits on the barrier
};
inline thread_local std::map<const uint64_t*, MBar> g_mbar;
inline MBar& mbar(const uint64_t* bar) {
  auto it = g_mbar.find(bar);
  if (it == g_mbar.end()) fail("mbarrier used before mbarrier.init");
  return it->second;
}
inline void mbar_maybe_complete(MBar& m) {
  ++g_progress;
  if (m.pending == 0 && m.tx == 0) {
    m.phase ^= 1u;
    m.pending = m.expected;
  }
}
inline void tma_land(MBar& m) {
  for (const PendingTma& t : m.tma) {
    const TensorMap& tm = t.map;
    for (uint32_t z = 0; z < tm.box[2]; ++z)
      for (uint32_t y = 0; y < tm.box[1]; ++y)
        for (uint32_t x = 0; x < tm.box[0]; ++x) {
          const int64_t gx = int64_t(t.coord[0]) + x, gy = int64_t(t.coord[1]) + y, gz = int64_t(t.coord[2]) + z;
          const uint8_t* g = tensor_element(tm, gx, gy, gz);
          for (uint32_t e = 0; e < tm.esize; ++e) {
            const uint32_t addr = box_smem_addr(tm, t.dst, x, y, z) + e;
            const uint8_t value = g != nullptr ? g[e] : 0;
            *from_shared(addr) = value;   // the async proxy writes; generic reads see it after the mbarrier wait
            const TsanIgnore bookkeeping;
            *async_view(addr, 1) = value;
          }
        }
    const TsanIgnore bookkeeping;
    m.tx -= int64_t(tm.box[0]) * tm.box[1] * tm.box[2] * tm.esize;   // out-of-bounds bytes count too
  }
  const TsanIgnore bookkeeping;
  m.tma.clear();
  if (m.tx < 0) fail("mbarrier: more transaction bytes completed than expected (expect_tx too small)");
  mbar_maybe_complete(m);
}
inline void mbar_state(const void* arg, char* buf, size_t n) {
  const MBar& m = *static_cast<const MBar*>(arg);
  std::snprintf(buf, n, " (phase %u, %u of %u arrivals pending, %lld transaction bytes pending)", m.phase, m.pending,
                m.expected, static_cast<long long>(m.tx));
}
inline bool mbar_ready(const void* m, uint64_t parity) {
  const MBar& b = *static_cast<const MBar*>(m);
  return b.phase != (parity & 1u) || !b.tma.empty();
}

// ---- TMA stores (cp.async.bulk.tensor.3d.global.shared::cta.bulk_group) and bulk async-groups, per thread.
// A store is recorded at issue; its group's wait performs it at the latest moments the ISA allows:
//   * the source is read at the first wait of its group (wait_group or wait_group.read), through the async
//     proxy's view (generic stores reach it only through fence.proxy.async). A source changed after the issue
//     (in the async view, or by a generic store at all: overwritten before wait_group.read) is reported;
//   * the global writes land only at a full wait_group (or at CTA end): after wait_group.read they are still in
//     flight ("the writes being made visible to the executing thread" is only wait_group's), so a kernel that
//     reads its own stored rows after only wait_group.read reads the old values.
// A thread that exits with a store whose source was never waited for (no wait_group[.read]) is reported; one
// whose sources were read (wait_group.read, as CUTLASS's store_tail) has its writes performed at CTA end.
struct PendingStore {
  uint32_t src;
  TensorMap map;
  int coord[3];
  std::vector<uint8_t> at_issue;        // the async proxy's view of the source box at issue
  std::vector<uint8_t> generic_issue;   // the generic (st.shared) bytes of the source box at issue
  bool read = false;                    // the source was read (a wait_group[.read] covered its group)
  std::vector<uint8_t> data;            // what the store writes (read from the source)
};
struct BulkState { std::vector<PendingStore> open; std::deque<std::vector<PendingStore>> groups; };
inline thread_local std::vector<BulkState> g_bulk;   // by flat thread index
inline BulkState& bulk_state() { return g_bulk[size_t(flat_tid())]; }
inline uint32_t box_bytes(const TensorMap& tm) { return tm.box[0] * tm.box[1] * tm.box[2] * tm.esize; }
// The store's source box, in box order (x fastest): the async proxy's view, or (generic) the st.shared bytes.
inline std::vector<uint8_t> store_source(const PendingStore& s, bool generic = false) {
  const TensorMap& tm = s.map;
  std::vector<uint8_t> v(box_bytes(tm));
  size_t i = 0;
  for (uint32_t z = 0; z < tm.box[2]; ++z)
    for (uint32_t y = 0; y < tm.box[1]; ++y)
      for (uint32_t x = 0; x < tm.box[0]; ++x)
        for (uint32_t e = 0; e < tm.esize; ++e) {
          const uint32_t a = box_smem_addr(tm, s.src, x, y, z) + e;
          v[i++] = generic ? *from_shared(a) : *async_view(a, 1);
        }
  return v;
}
inline void store_read(PendingStore& s) {
  std::vector<uint8_t> src = store_source(s);
  if (src != s.at_issue || store_source(s, true) != s.generic_issue)
    fail("TMA store: its shared-memory source changed between the store and its cp.async.bulk.wait_group.read "
         "(overwritten before the wait, or written without fence.proxy.async before the store)");
  const TsanIgnore bookkeeping;
  s.data = std::move(src);
  s.read = true;
}
inline void store_write(const PendingStore& s) {
  const TensorMap& tm = s.map;
  size_t i = 0;
  for (uint32_t z = 0; z < tm.box[2]; ++z)
    for (uint32_t y = 0; y < tm.box[1]; ++y)
      for (uint32_t x = 0; x < tm.box[0]; ++x, i += tm.esize)
        if (uint8_t* g = tensor_element(tm, int64_t(s.coord[0]) + x, int64_t(s.coord[1]) + y,
                                        int64_t(s.coord[2]) + z))
          std::memcpy(g, s.data.data() + i, tm.esize);   // out-of-bounds elements are not written
  const TsanIgnore bookkeeping;
  ++g_progress;
}
// wait_group[.read] `pending`: all but the `pending` most recent committed groups have read their sources; without
// .read they are also complete (written) and retired.
inline void bulk_wait(size_t pending, bool read_only) {
  BulkState& b = bulk_state();
  const size_t older = b.groups.size() > pending ? b.groups.size() - pending : 0;
  for (size_t g = 0; g < older; ++g)
    for (PendingStore& s : b.groups[g])
      if (!s.read) store_read(s);
  {
    const TsanIgnore bookkeeping;
    ++g_progress;
  }
  if (read_only) return;
  while (b.groups.size() > pending) {
    std::vector<PendingStore> group = std::move(b.groups.front());
    {
      const TsanIgnore bookkeeping;
      b.groups.pop_front();
    }
    for (const PendingStore& s : group) store_write(s);
  }
}
inline void bulk_cta_start() { g_bulk.assign(size_t(blockDim.x) * blockDim.y * blockDim.z, BulkState{}); }
inline void bulk_cta_end() {
  for (const auto& b : g_bulk) {
    if (!b.open.empty()) fail("a thread exited with TMA stores it never committed (cp.async.bulk.commit_group)");
    for (const auto& group : b.groups)
      for (const PendingStore& s : group)
        if (!s.read) fail("a thread exited with TMA stores it never waited for (cp.async.bulk.wait_group)");
  }
  for (const auto& b : g_bulk)   // sources read (wait_group.read): the writes complete after the CTA's threads exit
    for (const auto& group : b.groups)
      for (const PendingStore& s : group) store_write(s);
}
inline const int g_bulk_hooks = register_cta_hooks(&bulk_cta_start, &bulk_cta_end);

// ---- named barriers (bar.sync id, threads): ids 1..15 (0 is __syncthreads'), counted per arriving thread.
struct NamedBarrier { int arrived = 0, expected = 0; uint64_t gen = 0; };
inline thread_local NamedBarrier g_named[16];
inline void named_cta_start() {
  for (auto& b : g_named) b = NamedBarrier{};
}
inline const int g_named_hooks = register_cta_hooks(&named_cta_start, [] {});
inline void named_state(const void* arg, char* buf, size_t n) {
  const NamedBarrier& b = *static_cast<const NamedBarrier*>(arg);
  std::snprintf(buf, n, " (%d of %d threads arrived)", b.arrived, b.expected);
}
inline bool named_released(const void* arg, uint64_t gen) {
  return static_cast<const NamedBarrier*>(arg)->gen != gen;
}

// ---- wgmma shared-memory operands (PTX ISA "Shared Memory Matrix Layout"; CUTLASS GmmaDescriptor and
// make_gmma_desc). Descriptor: bits 0-13 start >> 4, 16-29 LBO >> 4, 32-45 SBO >> 4, 49-51 base offset,
// 62-63 swizzle (0 none, 1 128B, 2 64B, 3 32B). Canonical layouts in elements (T = 16 bytes / element size,
// sw = swizzle bytes / 16; the swizzle is applied to the resulting byte address):
//   K-major  none:     ((8,m),(T,2k)):((1T,SBO),(1,LBO))      swizzled: ((8,m),(T,2k)):((sw*T,SBO),(1,T))
//   MN-major none:     ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))   swizzled: ((T,sw,m),(8,k)):((1,T,LBO),(sw*T,SBO))
// Mode 0 is the M (A) / N (B) index, mode 1 the K index.
namespace gmma {
enum class Major { K, MN };
struct Desc { uint32_t start, lbo, sbo, base_offset, mode; };
inline Desc decode(uint64_t d) {
  if (d & ((3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3FFull << 52)))
    fail("wgmma: matrix descriptor has reserved bits set (start or offset field overflow?)");
  return {uint32_t(d & 0x3FFF) << 4, uint32_t((d >> 16) & 0x3FFF) << 4, uint32_t((d >> 32) & 0x3FFF) << 4,
          uint32_t((d >> 49) & 7), uint32_t(d >> 62)};
}
inline uint32_t swizzle_units(uint32_t mode) { return mode == 0 ? 1u : 16u >> mode; }   // 16-byte units: 1/8/4/2
// Swizzle<B,4,3> on a byte address: bits [4, 4+B) ^= bits [7, 7+B).
inline uint32_t swizzle(uint32_t addr, uint32_t mode) {
  return mode == 0 ? addr : addr ^ (((addr >> 7) & (swizzle_units(mode) - 1)) << 4);
}
// Shared byte address of element (mn, k) of the operand that `d` describes.
inline uint32_t element_addr(const Desc& d, Major major, int esize, int mn, int k) {
  const uint32_t T = 16 / esize, sw = swizzle_units(d.mode), m = uint32_t(mn), kk = uint32_t(k);
  uint32_t off;
  if (major == Major::K)
    off = (m % 8) * sw * 16 + (m / 8) * d.sbo + (kk % T) * esize + (kk / T) * (d.mode == 0 ? d.lbo : 16);
  else if (d.mode == 0)
    off = (m % T) * esize + (m / T) * d.sbo + (kk % 8) * 16 + (kk / 8) * d.lbo;
  else
    off = (m % T) * esize + ((m / T) % sw) * 16 + (m / (T * sw)) * d.lbo + (kk % 8) * sw * 16 + (kk / 8) * d.sbo;
  if (d.mode != 0 && d.base_offset != 0) fail("wgmma: a non-zero matrix base offset is not emulated");
  return swizzle(d.start + off, d.mode);
}
}  // namespace gmma

// ---- wgmma: recorded at issue, executed at wait_group (shared memory read late, registers written late).
// Between issue and completion the accumulator registers hold a NaN pattern (reading them before
// wgmma.wait_group is undefined in the ISA); a register written meanwhile is reported at completion.
constexpr uint32_t kAccPoison = 0x7FC0DEADu;
struct AccBuf { float* regs[128]; int nregs = 0; int pending = 0; std::vector<float> v; };
struct WgmmaOp {
  int n, k; bool fp8, trans_b; uint64_t da, db; bool scale_d; AccBuf* acc; bool f16 = false;
  std::vector<float> a_regs;   // A [64 x k] read from registers at issue (the register-A form); empty: A from smem
};
struct WgState {
  std::vector<WgmmaOp> open;
  std::deque<std::vector<WgmmaOp>> groups;
  std::map<float*, AccBuf> acc;   // keyed by thread 0's accumulator array
  bool ever_fenced = false;
  std::vector<float*> touched;    // accumulators completed (readable) since the last wgmma.fence
};
inline thread_local WgState g_wg[8];
inline float e4m3_to_float(uint8_t v) {
  static const auto lut = [] {
    std::array<float, 256> t{};
    for (int i = 0; i < 256; ++i)
      t[i] = __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(i), __NV_E4M3)));
    return t;
  }();
  return lut[v];
}
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float f16_bits_to_float(uint16_t h) {
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}
// rows x k operand (row = row of A / column of B) -> out[row * k + kk]; 16-bit elements are bf16, or f16
inline void load_operand(uint64_t desc, gmma::Major major, bool fp8, int rows, int k, float* out, bool f16 = false) {
  const gmma::Desc d = gmma::decode(desc);
  const int esize = fp8 ? 1 : 2;
  for (int r = 0; r < rows; ++r)
    for (int kk = 0; kk < k; ++kk) {
      const uint8_t* p = async_view(gmma::element_addr(d, major, esize, r, kk), esize);
      if (fp8) {
        out[r * k + kk] = e4m3_to_float(*p);
      } else {
        uint16_t h;
        std::memcpy(&h, p, 2);
        out[r * k + kk] = f16 ? f16_bits_to_float(h) : bf16_bits_to_float(h);
      }
    }
}
inline bool is_acc_poison(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u == kAccPoison;
}
// D fragment (ISA "wgmma .m64nNk* D matrix fragment", CUTLASS CLayout_64xN): thread t = 32 w + l holds
// d[4 i + 2 h + j] = D[16 w + l / 4 + 8 h][8 i + 2 (l % 4) + j].
inline void wgmma_execute(WgmmaOp& op) {
  std::vector<float> A(size_t(64) * op.k), B(size_t(op.n) * op.k);
  if (!op.a_regs.empty()) A = op.a_regs;
  else load_operand(op.da, gmma::Major::K, op.fp8, 64, op.k, A.data(), op.f16);
  load_operand(op.db, op.trans_b ? gmma::Major::MN : gmma::Major::K, op.fp8, op.n, op.k, B.data(), op.f16);
  AccBuf& acc = *op.acc;
  for (int t = 0; t < 128; ++t) {
    const int w = t / 32, l = t % 32;
    for (int i = 0; i < op.n / 8; ++i)
      for (int h = 0; h < 2; ++h)
        for (int j = 0; j < 2; ++j) {
          const int row = 16 * w + l / 4 + 8 * h, col = 8 * i + 2 * (l % 4) + j;
          float sum = 0.f;   // fp32; the hardware's summation order and rounding are unspecified
          for (int kk = 0; kk < op.k; ++kk) sum += A[size_t(row) * op.k + kk] * B[size_t(col) * op.k + kk];
          float& d = acc.v[size_t(t) * acc.nregs + 4 * i + 2 * h + j];
          d = op.scale_d ? d + sum : sum;
        }
  }
}
inline void wgmma_complete_if_last(WgState& s, AccBuf& acc) {
  if (--acc.pending != 0) return;
  for (int t = 0; t < 128; ++t)
    for (int r = 0; r < acc.nregs; ++r) {
      if (!is_acc_poison(acc.regs[t][r])) fail("wgmma: accumulator register written while its wgmma was in flight");
      acc.regs[t][r] = acc.v[size_t(t) * acc.nregs + r];
    }
  float* key = acc.regs[0];
  s.touched.push_back(key);
  s.acc.erase(key);
}
inline void sm90_cta_start() {
  g_mbar.clear();
  for (auto& w : g_wg) w = WgState{};
}
inline void sm90_cta_end() {
  for (const auto& w : g_wg)
    if (!w.open.empty() || !w.groups.empty() || !w.acc.empty())
      fail("a warpgroup exited with wgmma operations it never waited for");
}
inline const int g_sm90_hooks = register_cta_hooks(&sm90_cta_start, &sm90_cta_end);

// A wgmma joins the accumulator chain of its registers (d_of(t): thread t's accumulator array, nregs floats each):
// after a wgmma.fence only; a new chain snapshots the inputs and poisons the registers until it completes.
template <class DOf>
inline AccBuf* join_acc_chain(WgState& s, int nregs, DOf d_of) {
  float* const d0 = d_of(0);
  if (!s.ever_fenced || std::find(s.touched.begin(), s.touched.end(), d0) != s.touched.end())
    fail("wgmma.mma_async: accumulator registers accessed since the last wgmma.fence (or no fence before the first)");
  auto it = s.acc.find(d0);
  if (it == s.acc.end()) {
    AccBuf& b = s.acc[d0];
    b.nregs = nregs;
    b.v.resize(size_t(128) * b.nregs);
    for (int t = 0; t < 128; ++t) {
      b.regs[t] = d_of(t);
      for (int r = 0; r < b.nregs; ++r) {
        b.v[size_t(t) * b.nregs + r] = b.regs[t][r];
        std::memcpy(&b.regs[t][r], &kAccPoison, 4);
      }
    }
    it = s.acc.find(d0);
  } else {
    if (it->second.nregs != nregs) fail("wgmma: an in-flight accumulator reused with another shape");
    for (int t = 0; t < 128; ++t)
      if (it->second.regs[t] != d_of(t)) fail("wgmma: accumulator chain with other registers");
  }
  ++it->second.pending;
  return &it->second;
}

template <int kN, int kK, bool kFp8, bool kTransB, bool kF16 = false>
inline void wgmma_issue(float* d, uint64_t da, uint64_t db, int scale_d) {
  struct Arg { float* d; uint64_t da, db; int acc; } a{d, da, db, scale_d};
  static const std::string op_name = std::string("wgmma.mma_async.m64n") + std::to_string(kN) + "k" +
                                     std::to_string(kK) + (kFp8 ? ".e4m3" : kF16 ? ".f16" : ".bf16") +
                                     (kTransB ? ".tnspB" : "");
  emu::warp_collective<128>(op_name.c_str(), &a, [](void** args) {
    const Arg& a0 = *static_cast<Arg*>(args[0]);
    WgState& s = g_wg[flat_tid() / 128];
    WgmmaOp op{kN, kK, kFp8, kTransB, a0.da, a0.db, a0.acc != 0, nullptr, kF16};
    for (int t = 0; t < 128; ++t) {
      const Arg* x = static_cast<Arg*>(args[t]);
      if (x->da != op.da || x->db != op.db || (x->acc != 0) != op.scale_d)
        fail("wgmma: descriptors or scale-d differ across the warpgroup (divergent collective operands)");
    }
    op.acc = join_acc_chain(s, kN / 2, [&](int t) { return static_cast<Arg*>(args[t])->d; });
    (void)gmma::decode(op.da);
    (void)gmma::decode(op.db);
    s.open.push_back(op);
  });
}

// Register-A form (A from registers, B a descriptor), 16-bit A: the registers are read at issue. Fragment
// (PTX ISA 9.7.15.5.1.1 "Register Fragments", wgmma .m64nNk16 A matrix for .f16/.bf16 = the mma.m16n8k16 A
// layout per warp): thread t = 32 w + l, 32-bit register r in 0..3 holds A[16 w + l / 4 + 8 (r % 2)]
// [2 (l % 4) + 8 (r / 2) + e] in its half e (e = 0 low, 1 high).
template <int kN, bool kTransB, bool kF16>
inline void wgmma_issue_rs(float* d, const uint32_t* a_regs, uint64_t db) {
  struct Arg { float* d; const uint32_t* a; uint64_t db; } a{d, a_regs, db};
  static const std::string op_name = std::string("wgmma.mma_async.m64n") + std::to_string(kN) + "k16" +
                                     (kF16 ? ".f16" : ".bf16") + ".regA" + (kTransB ? ".tnspB" : "");
  emu::warp_collective<128>(op_name.c_str(), &a, [](void** args) {
    const Arg& a0 = *static_cast<Arg*>(args[0]);
    WgState& s = g_wg[flat_tid() / 128];
    WgmmaOp op{kN, 16, false, kTransB, 0, a0.db, true, nullptr, kF16};
    op.a_regs.assign(size_t(64) * 16, 0.f);
    for (int t = 0; t < 128; ++t) {
      const Arg* x = static_cast<Arg*>(args[t]);
      if (x->db != op.db) fail("wgmma: descriptors differ across the warpgroup (divergent collective operands)");
      const int w = t / 32, l = t % 32;
      for (int r = 0; r < 4; ++r)
        for (int e = 0; e < 2; ++e) {
          const uint16_t h = uint16_t(x->a[r] >> (16 * e));
          const int row = 16 * w + l / 4 + 8 * (r % 2), col = 2 * (l % 4) + 8 * (r / 2) + e;
          op.a_regs[size_t(row) * 16 + col] = kF16 ? f16_bits_to_float(h) : bf16_bits_to_float(h);
        }
    }
    op.acc = join_acc_chain(s, kN / 2, [&](int t) { return static_cast<Arg*>(args[t])->d; });
    (void)gmma::decode(op.db);
    s.open.push_back(std::move(op));
  });
}

}  // namespace emu

namespace deepkernels::ptx::sm90 {

inline void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  (void)emu::to_shared(bar);
  const emu::TsanIgnore bookkeeping;
  emu::MBar m;
  m.expected = m.pending = arrivals;
  emu::g_mbar[bar] = m;
}
inline void fence_proxy_async() {
  const emu::TsanIgnore bookkeeping;
  emu::g_async_view_stale = true;
}
inline void fence_barrier_init() {}
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  EMU_TSAN_RELEASE(bar);
  const emu::TsanIgnore bookkeeping;
  emu::MBar& m = emu::mbar(bar);
  if (m.pending == 0) emu::fail("mbarrier: arrival beyond the expected count");
  m.tx += bytes;
  --m.pending;
  emu::mbar_maybe_complete(m);
}
inline void mbarrier_arrive(uint64_t* bar) {
  EMU_TSAN_RELEASE(bar);
  const emu::TsanIgnore bookkeeping;
  emu::MBar& m = emu::mbar(bar);
  if (m.pending == 0) emu::fail("mbarrier: arrival beyond the expected count");
  --m.pending;
  emu::mbar_maybe_complete(m);
}
// try_wait.parity P succeeds once the phase with parity P has completed, i.e. while the current phase bit != P.
inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  for (;;) {
    emu::MBar* mp;
    bool complete, tma_pending;
    {
      const emu::TsanIgnore bookkeeping;
      mp = &emu::mbar(bar);
      complete = mp->phase != (parity & 1u);
      tma_pending = !mp->tma.empty();
    }
    emu::MBar& m = *mp;
    if (complete) {
      EMU_TSAN_ACQUIRE(bar);
      return;
    }
    if (tma_pending) {   // in-flight TMA lands when someone waits
      EMU_TSAN_ACQUIRE(bar);
      emu::tma_land(m);
      EMU_TSAN_RELEASE(bar);
      continue;
    }
    emu::block_described(&emu::mbar_ready, &m, parity, &emu::mbar_state,
                         "mbarrier.try_wait.parity %u on the mbarrier at shared 0x%x", parity & 1u,
                         emu::to_shared(bar));
  }
}
inline void prefetch_tensor_map(const CUtensorMap*) {}
inline void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  const uint32_t d = emu::to_shared(dst);
  const emu::TensorMap tm = emu::tma_map_and_box(map, d, "TMA load");
  const uint32_t bytes = tm.box[0] * tm.box[1] * tm.box[2] * tm.esize;
  std::memset(emu::from_shared(d, bytes), 0xFF, bytes);   // in flight: e4m3 0xFF is NaN
  EMU_TSAN_RELEASE(bar);   // the copy lands after its issue, in whichever thread waits
  const emu::TsanIgnore bookkeeping;
  emu::mbar(bar).tma.push_back({d, tm, {c0, c1, c2}});
}
inline void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
  const uint32_t s = emu::to_shared(src);
  emu::PendingStore st{s, emu::tma_map_and_box(map, s, "TMA store"), {c0, c1, c2}, {}, {}};
  (void)emu::from_shared(s, emu::box_bytes(st.map));   // the source box lies in the launch's shared memory
  st.at_issue = emu::store_source(st);
  st.generic_issue = emu::store_source(st, true);
  const emu::TsanIgnore bookkeeping;
  emu::bulk_state().open.push_back(std::move(st));
}
inline void bulk_commit_group() {
  const emu::TsanIgnore bookkeeping;
  emu::BulkState& b = emu::bulk_state();
  b.groups.push_back(std::move(b.open));
  b.open.clear();
}
template <int kPending>
inline void bulk_wait_group_read() {
  emu::bulk_wait(size_t(kPending), true);
}
template <int kPending>
inline void bulk_wait_group() {
  emu::bulk_wait(size_t(kPending), false);
}
inline void named_barrier_sync(uint32_t id, uint32_t threads) {
  emu::Cta& c = *emu::g_cta;
  if (id == 0 || id >= 16) {
    emu::fail("bar.sync: named barrier id " + std::to_string(id) + " (1..15; 0 is __syncthreads')");
  }
  if (threads == 0 || threads % 32 != 0 || threads > uint32_t(c.nthreads))
    emu::fail("bar.sync " + std::to_string(id) + ": thread count " + std::to_string(threads) +
              " (a multiple of 32, at most the CTA's)");
  emu::NamedBarrier& b = emu::g_named[id];
  uint64_t my;
  {
    const emu::TsanIgnore bookkeeping;
    if (b.arrived == 0) {
      b.expected = int(threads);
    } else if (b.expected != int(threads)) {
      emu::fail("bar.sync " + std::to_string(id) + ": thread count " + std::to_string(threads) + " while " +
                std::to_string(b.arrived) + " thread(s) wait with count " + std::to_string(b.expected));
    }
    my = b.gen;
    ++b.arrived;
    ++emu::g_progress;
  }
  EMU_TSAN_RELEASE(&b.gen);
  {
    const emu::TsanIgnore bookkeeping;
    if (b.arrived == b.expected) {
      b.arrived = 0;
      ++b.gen;
    }
  }
  while (!emu::named_released(&b, my))
    emu::block_described(&emu::named_released, &b, my, &emu::named_state, "bar.sync %u, %u", id, threads);
  EMU_TSAN_ACQUIRE(&b.gen);
}
template <uint32_t kRegs>
inline void setmaxnreg_dec() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, a multiple of 8");
}
template <uint32_t kRegs>
inline void setmaxnreg_inc() {
  static_assert(kRegs % 8 == 0 && kRegs >= 24 && kRegs <= 256, "setmaxnreg: 24..256, a multiple of 8");
}
inline void wgmma_fence() {
  emu::warp_collective<128>("wgmma.fence", nullptr, [](void**) {
    emu::WgState& s = emu::g_wg[emu::flat_tid() / 128];
    s.ever_fenced = true;
    s.touched.clear();
  });
}
inline void wgmma_commit() {
  emu::warp_collective<128>("wgmma.commit_group", nullptr, [](void**) {
    emu::WgState& s = emu::g_wg[emu::flat_tid() / 128];
    s.groups.push_back(std::move(s.open));
    s.open.clear();
  });
}
template <int kPending>
inline void wgmma_wait() {
  emu::warp_collective<128>("wgmma.wait_group", nullptr, [](void**) {
    emu::WgState& s = emu::g_wg[emu::flat_tid() / 128];
    for (; s.groups.size() > size_t(kPending); s.groups.pop_front())
      for (emu::WgmmaOp& op : s.groups.front()) {
        emu::wgmma_execute(op);
        emu::wgmma_complete_if_last(s, *op.acc);
      }
  });
}
template <int kN>
inline void register_fence(float (&)[kN]) {}
template <int kN>
inline void register_fence(uint32_t (&)[kN]) {}
inline void wgmma_m64n64k32_e4m3(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
  emu::wgmma_issue<64, 32, true, false>(d, a, b, accumulate);
}
inline void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t a, uint64_t b, int accumulate) {
  emu::wgmma_issue<128, 32, true, false>(d, a, b, accumulate);
}
inline void wgmma_m64n16k32_e4m3(float (&d)[8], uint64_t a, uint64_t b, int accumulate) {
  emu::wgmma_issue<16, 32, true, false>(d, a, b, accumulate);
}
inline void wgmma_m64n32k32_e4m3(float (&d)[16], uint64_t a, uint64_t b, int accumulate) {
  emu::wgmma_issue<32, 32, true, false>(d, a, b, accumulate);
}
inline void wgmma_m64n32k16_bf16(float (&d)[16], uint64_t a, uint64_t b, int accumulate) {
  emu::wgmma_issue<32, 16, false, false>(d, a, b, accumulate);
}
inline void wgmma_m64n256k16_bf16_tnsp_b(float (&d)[128], uint64_t a, uint64_t b) {
  emu::wgmma_issue<256, 16, false, true>(d, a, b, 1);
}
inline void wgmma_m64n32k16_f16(float (&d)[16], uint64_t a, uint64_t b, int accumulate) {
  emu::wgmma_issue<32, 16, false, false, true>(d, a, b, accumulate);
}
inline void wgmma_m64n256k16_f16_tnsp_b(float (&d)[128], uint64_t a, uint64_t b) {
  emu::wgmma_issue<256, 16, false, true, true>(d, a, b, 1);
}
inline void wgmma_m64n64k16_bf16(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
  emu::wgmma_issue<64, 16, false, false>(d, a, b, accumulate);
}
inline void wgmma_m64n64k16_f16(float (&d)[32], uint64_t a, uint64_t b, int accumulate) {
  emu::wgmma_issue<64, 16, false, false, true>(d, a, b, accumulate);
}
inline void wgmma_m64n256k16_bf16_rs_tnsp_b(float (&d)[128], const uint32_t (&a)[4], uint64_t b) {
  emu::wgmma_issue_rs<256, true, false>(d, a, b);
}
inline void wgmma_m64n256k16_f16_rs_tnsp_b(float (&d)[128], const uint32_t (&a)[4], uint64_t b) {
  emu::wgmma_issue_rs<256, true, true>(d, a, b);
}

}  // namespace deepkernels::ptx::sm90
