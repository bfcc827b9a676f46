// Fidelity of the emulator's PTX models (csrc/emulator/ptx_emu.cuh, ptx_sm90_emu.cuh) to documented facts.
// Every expected value comes from a document, never from the emulator: the PTX ISA ("Parallel Thread
// Execution ISA", section numbers of ISA 8.x) and, independently, CUTLASS's published CuTe atom layouts,
// which are evaluated here generically from their printed text (colexicographic, as CuTe evaluates them).
// Each harness::check names its source. Kernels are small __global__ functions run by the emulator.
#include "harness.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

namespace ptx = deepkernels::ptx;
namespace sm90 = deepkernels::ptx::sm90;
using harness::check;

// ---- CuTe layouts from their text "(shape):(stride)": nested tuples whose leaves are integers ("_32", "8"),
// symbols or multiples of symbols ("8T", "SBO", "2k"), bound by an environment. Each of the two top-level
// modes maps a 1-D coordinate colexicographically onto its leaves (the last leaf takes the rest); the
// layout's value is the sum of leaf coordinate x leaf stride (cute/layout.hpp, crd2idx).
using Env = std::map<std::string, long>;
struct Node { std::string leaf; std::vector<Node> kids; };
Node parse_node(const std::string& s, size_t& i) {
  Node n;
  if (s[i] == '(') {
    ++i;
    for (;;) { n.kids.push_back(parse_node(s, i)); if (s[i++] == ')') break; }
  } else {
    while (i < s.size() && s[i] != ',' && s[i] != ')') n.leaf += s[i++];
  }
  return n;
}
void flatten(const Node& n, std::vector<const Node*>& out) {
  if (n.kids.empty()) out.push_back(&n);
  else for (const Node& k : n.kids) flatten(k, out);
}
long leaf_value(std::string t, const Env& env) {
  if (!t.empty() && t[0] == '_') t = t.substr(1);
  size_t j = 0;
  while (j < t.size() && std::isdigit(static_cast<unsigned char>(t[j]))) ++j;
  const long c = j ? std::stol(t.substr(0, j)) : 1;
  return j == t.size() ? c : c * env.at(t.substr(j));
}
struct CuteLayout {
  std::vector<long> shape[2], stride[2];
  long mode(int m, long c) const {
    long off = 0;
    for (size_t l = 0; l < shape[m].size(); ++l) {
      off += (l + 1 == shape[m].size() ? c : c % shape[m][l]) * stride[m][l];
      c /= shape[m][l];
    }
    return off;
  }
  long operator()(long c0, long c1) const { return mode(0, c0) + mode(1, c1); }
};
CuteLayout cute_layout(std::string text, Env env = {}) {
  text.erase(std::remove(text.begin(), text.end(), ' '), text.end());
  for (const char* s : {"m", "n", "k", "X"}) env.emplace(s, s[0] == 'X' ? 0 : 1 << 20);   // free extents
  const size_t colon = text.find("):(");
  size_t i = 0;
  const Node shape = parse_node(text.substr(0, colon + 1), i);
  i = 0;
  const Node stride = parse_node(text.substr(colon + 2), i);
  CuteLayout l;
  for (int m = 0; m < 2; ++m) {
    std::vector<const Node*> sh, st;
    flatten(shape.kids[m], sh);
    flatten(stride.kids[m], st);
    for (size_t j = 0; j < sh.size(); ++j) {
      l.shape[m].push_back(leaf_value(sh[j]->leaf, env));
      l.stride[m].push_back(leaf_value(st[j]->leaf, env));
    }
  }
  return l;
}
// cute::Swizzle<B,M,S> (cute/swizzle.hpp): x ^ ((x & yyy_msk) >> S), yyy_msk = ((1 << B) - 1) << (M + S).
uint32_t cute_swizzle(uint32_t x, int B, int M = 4, int S = 3) {
  return x ^ ((x & (((1u << B) - 1) << (M + S))) >> S);
}

// CUTLASS cute/arch/mma_sm90_desc.hpp GmmaDescriptor: its bitfield declaration, verbatim.
union GmmaDescriptor {
  uint64_t desc_;
  struct {
    uint16_t start_address_ : 14, : 2;
    uint16_t leading_byte_offset_ : 14, : 2;
    uint16_t stride_byte_offset_ : 14, : 2;
    uint8_t : 1, base_offset_ : 3, : 4;
    uint8_t : 6, layout_type_ : 2;   // SWIZZLE_NONE = 0, SWIZZLE_32B = 3, SWIZZLE_64B = 2, SWIZZLE_128B = 1
  } bitfield;
};
static_assert(sizeof(GmmaDescriptor) == 8, "GmmaDescriptor is 64 bits");
uint64_t cutlass_desc(uint32_t start, uint32_t lbo, uint32_t sbo, int layout_type, int base_offset = 0) {
  GmmaDescriptor d;
  d.desc_ = 0;
  d.bitfield.start_address_ = uint16_t(start >> 4);
  d.bitfield.leading_byte_offset_ = uint16_t(lbo >> 4);
  d.bitfield.stride_byte_offset_ = uint16_t(sbo >> 4);
  d.bitfield.base_offset_ = uint8_t(base_offset);
  d.bitfield.layout_type_ = uint8_t(layout_type);
  return d.desc_;
}

template <typename T>
uint16_t raw16(T h) { uint16_t u; std::memcpy(&u, &h, 2); return u; }
uint16_t bf16_bits(float f) { return raw16(__float2bfloat16_rn(f)); }
uint16_t f16_bits(float f) { return raw16(__float2half_rn(f)); }
uint8_t e4m3_bits(float f) { return uint8_t(__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3)); }
std::mt19937 g_rng(20240607);
float small_int(int lo, int hi) { return float(std::uniform_int_distribution<int>(lo, hi)(g_rng)); }
std::string at(int a, int b) { return " (first mismatch at " + std::to_string(a) + ", " + std::to_string(b) + ")"; }
template <auto kKernel, typename... Args>
void launch(int threads, size_t smem, const Args&... args) {
  deepkernels::launch_kernel<kKernel>(dim3(1), dim3(threads), smem, nullptr, args...);
}

// Dynamic shared memory from a 1024-byte aligned shared address (the emulator's is deliberately not aligned).
uint8_t* aligned_smem() {
  const uint32_t a = ptx::smem_addr(harness_smem::test_smem);
  return harness_smem::test_smem + (1024 - a % 1024) % 1024;
}
constexpr size_t kPad = 1024;

// ======== 1. mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 fragments ========
struct Coord { int8_t r, c; };
struct MmaMap { Coord a[32][8], b[32][4], c[32][4]; };   // (row, col) of each fragment element; B: (k, n)

// PTX ISA 9.7.14.5.8 "Matrix Fragments for mma.m16n8k16 with floating point type" (.f16/.bf16 A, B; .f32 C/D).
MmaMap isa_mma_map() {
  MmaMap m{};
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane % 4;   // groupID, threadID_in_group
    for (int i = 0; i < 8; ++i)
      m.a[lane][i] = {int8_t((i < 2 || (i >= 4 && i < 6)) ? g : g + 8), int8_t(t * 2 + (i & 1) + (i >= 4 ? 8 : 0))};
    for (int i = 0; i < 4; ++i) m.b[lane][i] = {int8_t(t * 2 + (i & 1) + (i >= 2 ? 8 : 0)), int8_t(g)};
    for (int i = 0; i < 4; ++i) m.c[lane][i] = {int8_t(i < 2 ? g : g + 8), int8_t(t * 2 + (i & 1))};
  }
  return m;
}
// CUTLASS cute/atom/mma_traits_sm80.hpp, MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN> (= the F16 atom's layouts):
// (thread, value) -> index; ALayout over (m,k) = m + 16k, BLayout over (n,k) = n + 8k, CLayout over (m,n) = m + 16n.
MmaMap cute_mma_map() {
  const CuteLayout A = cute_layout("((_4,_8),(_2,_2,_2)):((_32,_1),(_16,_8,_128))");
  const CuteLayout B = cute_layout("((_4,_8),(_2,_2)):((_16,_1),(_8,_64))");
  const CuteLayout C = cute_layout("((_4,_8),(_2,_2)):((_32,_1),(_16,_8))");   // SM80_16x8_Row
  MmaMap m{};
  for (int t = 0; t < 32; ++t) {
    for (int v = 0; v < 8; ++v) m.a[t][v] = {int8_t(A(t, v) % 16), int8_t(A(t, v) / 16)};
    for (int v = 0; v < 4; ++v) m.b[t][v] = {int8_t(B(t, v) / 8), int8_t(B(t, v) % 8)};
    for (int v = 0; v < 4; ++v) m.c[t][v] = {int8_t(C(t, v) % 16), int8_t(C(t, v) / 16)};
  }
  return m;
}

// Element v of a fragment sits in register v / 2, half v % 2 (lower 16 bits = lower index).
template <bool kBf16>
__global__ void mma_kernel(const float* A, const float* B, const float* C, const MmaMap* map, float* D) {
  const int lane = threadIdx.x;
  uint32_t a[4] = {}, b[2] = {};
  float d[4];
  const auto bits = [](float f) { return uint32_t(kBf16 ? bf16_bits(f) : f16_bits(f)); };
  for (int i = 0; i < 8; ++i) a[i / 2] |= bits(A[map->a[lane][i].r * 16 + map->a[lane][i].c]) << (16 * (i % 2));
  for (int i = 0; i < 4; ++i) b[i / 2] |= bits(B[map->b[lane][i].r * 8 + map->b[lane][i].c]) << (16 * (i % 2));
  for (int i = 0; i < 4; ++i) d[i] = C[map->c[lane][i].r * 8 + map->c[lane][i].c];
  if constexpr (kBf16) ptx::mma_bf16_16816(d, a, b[0], b[1]);
  else ptx::mma_f16_16816(d, a, b[0], b[1]);
  for (int i = 0; i < 4; ++i) D[map->c[lane][i].r * 8 + map->c[lane][i].c] = d[i];
}

void test_mma() {
  const MmaMap isa = isa_mma_map(), cute = cute_mma_map();
  check(std::memcmp(&isa, &cute, sizeof(MmaMap)) == 0,
        "mma m16n8k16: the ISA fragment tables equal CuTe's A/B/C layouts",
        "PTX ISA 9.7.14.5.8; cute/atom/mma_traits_sm80.hpp SM80_16x8x16_F32BF16BF16F32_TN");
  std::vector<float> A(256), B(128), C(128), ref(128);
  for (float& x : A) x = small_int(-4, 4);
  for (float& x : B) x = small_int(-4, 4);   // B[k][n]
  for (float& x : C) x = small_int(-50, 50);
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      float s = C[m * 8 + n];
      for (int k = 0; k < 16; ++k) s += A[m * 16 + k] * B[k * 8 + n];   // small integers: exact in fp32
      ref[m * 8 + n] = s;
    }
  for (int which = 0; which < 2; ++which)
    for (int bf16 = 0; bf16 < 2; ++bf16) {
      const MmaMap& map = which == 0 ? isa : cute;
      std::vector<float> D(128, NAN);
      if (bf16) launch<mma_kernel<true>>(32, 0, A.data(), B.data(), C.data(), &map, D.data());
      else launch<mma_kernel<false>>(32, 0, A.data(), B.data(), C.data(), &map, D.data());
      check(D == ref, std::string("mma.sync m16n8k16 ") + (bf16 ? "bf16" : "f16") +
                          ": D = A B + C with fragments by the " + (which == 0 ? "ISA table" : "CuTe layouts"),
            which == 0 ? "PTX ISA 9.7.14.5.8 (groupID = lane >> 2, threadID_in_group = lane % 4)"
                       : "cute/atom/mma_traits_sm80.hpp ALayout/BLayout/SM80_16x8_Row");
    }
}

// ======== 2. ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 ========
// Lane l's row (matrix l / 8, row l % 8) lives in 16-byte slot (37 l + 11) % 64: arbitrary, distinct addresses.
int ldsm_slot(int l) { return (37 * l + 11) % 64; }
uint16_t ldsm_value(int mat, int row, int col) { return uint16_t((mat << 8) | (row << 4) | col); }

template <bool kTrans>
__global__ void ldmatrix_kernel(uint32_t* out) {
  uint16_t* s = reinterpret_cast<uint16_t*>(aligned_smem());
  const int lane = threadIdx.x;
  for (int c = 0; c < 8; ++c) s[ldsm_slot(lane) * 8 + c] = ldsm_value(lane / 8, lane % 8, c);
  __syncthreads();
  uint32_t r[4];
  if constexpr (kTrans) ptx::ldmatrix_x4_trans(r, s + ldsm_slot(lane) * 8);
  else ptx::ldmatrix_x4(r, s + ldsm_slot(lane) * 8);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// S = A B through ldmatrix (A rows) and ldmatrix.trans (B stored [k][n]), as the kernels use them.
__global__ void ldmatrix_mma_kernel(const uint16_t* A, const uint16_t* B, float* D) {
  constexpr int kStride = 24;   // padded rows of 48 bytes: 16-byte aligned row addresses
  uint16_t* sA = reinterpret_cast<uint16_t*>(aligned_smem());
  uint16_t* sB = sA + 16 * kStride;
  const int lane = threadIdx.x, g = lane >> 2, t = lane % 4;
  for (int e = lane; e < 256; e += 32) {
    sA[(e / 16) * kStride + e % 16] = A[e];
    sB[(e / 16) * kStride + e % 16] = B[e];
  }
  __syncthreads();
  uint32_t a[4], b[4];
  ptx::ldmatrix_x4(a, sA + (lane % 16) * kStride + (lane / 16) * 8);
  ptx::ldmatrix_x4_trans(b, sB + (lane % 8 + ((lane / 8) % 2) * 8) * kStride + (lane / 16) * 8);
  for (int j = 0; j < 2; ++j) {
    float d[4] = {};
    ptx::mma_bf16_16816(d, a, b[2 * j], b[2 * j + 1]);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 16 + 8 * j + 2 * t + (i & 1)] = d[i];
  }
}

void test_ldmatrix() {
  for (int trans = 0; trans < 2; ++trans) {
    std::vector<uint32_t> out(128, 0xDEADBEEFu);
    if (trans) launch<ldmatrix_kernel<true>>(32, 1024 + kPad, out.data());
    else launch<ldmatrix_kernel<false>>(32, 1024 + kPad, out.data());
    const std::string name = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
    // (a) PTX ISA 9.7.14.5.15: thread t receives, of each matrix i (register i), the two consecutive elements
    // of row t / 4 at columns 2 (t % 4), 2 (t % 4) + 1; with .trans the matrix is delivered transposed.
    int bad = -1;
    for (int t = 0; t < 32 && bad < 0; ++t)
      for (int i = 0; i < 4; ++i) {
        const int r = t / 4, c = 2 * (t % 4);
        const uint32_t want = trans ? (ldsm_value(i, c, r) | uint32_t(ldsm_value(i, c + 1, r)) << 16)
                                    : (ldsm_value(i, r, c) | uint32_t(ldsm_value(i, r, c + 1)) << 16);
        if (out[t * 4 + i] != want) { bad = t * 4 + i; break; }
      }
    check(bad < 0, name + ": register i of thread t holds row t/4, columns 2(t%4)..+1 of matrix i" +
                       " (transposed with .trans)" + (bad < 0 ? "" : at(bad / 4, bad % 4)),
          "PTX ISA 9.7.14.5.15 ldmatrix");
    // (b) CUTLASS cute/atom/copy_traits_sm75.hpp: SrcLayout (src thread, bit) -> bit and DstLayout (dst thread,
    // value bit) -> bit of SM75_U32x4_LDSM_N / SM75_U16x8_LDSM_T, compared bit by bit.
    const CuteLayout src = cute_layout("(_32,_128):(_128,_1)");
    const CuteLayout dst = trans ? cute_layout("((_4,_8),(_16,_2,_4)):((_256,_16),(_1,_128,_1024))")
                                 : cute_layout("(_32,(_32,_4)):(_32,(_1,_1024))");
    std::vector<int> who(4096, -1);
    for (int s = 0; s < 32; ++s)
      for (int b = 0; b < 128; ++b) who[src(s, b)] = s * 128 + b;
    bad = -1;
    for (int t = 0; t < 32 && bad < 0; ++t)
      for (int v = 0; v < 128; ++v) {
        const int sb = who[dst(t, v)], s = sb / 128, b = sb % 128;   // lane s supplied matrix s/8, row s%8
        const uint32_t want = (ldsm_value(s / 8, s % 8, b / 16) >> (b % 16)) & 1u;
        if (((out[t * 4 + v / 32] >> (v % 32)) & 1u) != want) { bad = t * 128 + v; break; }
      }
    check(bad < 0, name + ": every destination bit where CuTe's Src/DstLayout put it" +
                       (bad < 0 ? "" : at(bad / 128, bad % 128)),
          std::string("cute/atom/copy_traits_sm75.hpp Copy_Traits<") +
              (trans ? "SM75_U16x8_LDSM_T>" : "SM75_U32x4_LDSM_N>"));
  }
  // (c) ldmatrix output fed to mma.sync: the product of the fragments the ISA tables define.
  std::vector<uint16_t> A(256), B(256);
  std::vector<float> Af(256), Bf(256), D(256, NAN), ref(256, 0.f);
  for (int i = 0; i < 256; ++i) {
    Af[i] = small_int(-4, 4);
    Bf[i] = small_int(-4, 4);
    A[i] = bf16_bits(Af[i]);
    B[i] = bf16_bits(Bf[i]);
  }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n)
      for (int k = 0; k < 16; ++k) ref[m * 16 + n] += Af[m * 16 + k] * Bf[k * 16 + n];
  launch<ldmatrix_mma_kernel>(32, 2048 + kPad, A.data(), B.data(), D.data());
  check(D == ref, "ldmatrix.x4 (A) / ldmatrix.x4.trans (B [k][n]) fed to mma.sync m16n8k16 bf16: D = A B",
        "PTX ISA 9.7.14.5.15 + 9.7.14.5.8 (the ldmatrix layout is the mma A/B fragment layout)");
}

// ======== 3. wgmma: operands from shared memory through descriptors, D read through CUTLASS's CLayout ========
// Places element (mn, k) of a [rows][cols] operand at byte `base` + Swizzle<B,4,3>(esize * layout(mn, k)).
// 16-bit elements are bf16, or f16 when `f16`.
void place(std::vector<uint8_t>& img, uint32_t base, const CuteLayout& l, int swizzle_bits, int esize, int rows,
           int cols, const std::vector<float>& v, bool f16 = false) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const uint32_t a = base + cute_swizzle(uint32_t(esize * l(r, c)), swizzle_bits);
      if (esize == 1) img.at(a) = e4m3_bits(v[r * cols + c]);
      else {
        const uint16_t h = f16 ? f16_bits(v[r * cols + c]) : bf16_bits(v[r * cols + c]);
        (void)img.at(a + 1);
        std::memcpy(&img[a], &h, 2);
      }
    }
}
// The ISA canonical layouts (9.7.15.5.1.2.1.3), in elements: 128B swizzle K-major and MN-major, no-swizzle K-major.
const char* kKMajorSw128 = "((8,m),(T,2k)):((8T,SBO),(1,T))";
const char* kKMajorNone = "((8,m),(T,2k)):((1T,SBO),(1,LBO))";
const char* kMnMajorSw128 = "((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))";

uint8_t* stage(const uint8_t* img, int bytes) {
  uint8_t* base = aligned_smem();
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) base[i] = img[i];
  sm90::fence_proxy_async();
  __syncthreads();
  return base;
}
uint64_t relocate(uint64_t desc, const uint8_t* base) { return desc + (ptx::smem_addr(base) >> 4); }   // start field

__global__ void wgmma_e4m3_kernel(const uint8_t* img, int bytes, int off_b, float* out) {
  uint8_t* base = stage(img, bytes);
  float d[32];
  for (float& x : d) x = 1e6f;   // scale-d = 0: D = A B, the old contents ignored
  sm90::wgmma_fence();
  for (int ks = 0; ks < 2; ++ks)   // K = 64: the second k-step moves the start address 32 bytes along the row
    sm90::wgmma_m64n64k32_e4m3(d, sm90::smem_desc_k_major_sw128(base + 32 * ks),
                               sm90::smem_desc_k_major_sw128(base + off_b + 32 * ks), ks);
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) out[threadIdx.x * 32 + i] = d[i];
}
// The narrow e4m3 shapes of the small-M GEMM (BLOCK_N 16 / 32): same operands, N rows of B.
template <int kN>
__global__ void wgmma_e4m3_narrow_kernel(const uint8_t* img, int bytes, int off_b, float* out) {
  uint8_t* base = stage(img, bytes);
  float d[kN / 2];
  for (float& x : d) x = 1e6f;   // scale-d = 0: D = A B, the old contents ignored
  sm90::wgmma_fence();
  for (int ks = 0; ks < 4; ++ks) {  // K = 128: a whole 128-byte swizzled row, four 32-byte k-steps
    if constexpr (kN == 16) {
      sm90::wgmma_m64n16k32_e4m3(d, sm90::smem_desc_k_major_sw128(base + 32 * ks),
                                 sm90::smem_desc_k_major_sw128(base + off_b + 32 * ks), ks);
    } else {
      sm90::wgmma_m64n32k32_e4m3(d, sm90::smem_desc_k_major_sw128(base + 32 * ks),
                                 sm90::smem_desc_k_major_sw128(base + off_b + 32 * ks), ks);
    }
  }
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < kN / 2; ++i) out[threadIdx.x * (kN / 2) + i] = d[i];
}
template <bool kF16>
__global__ void wgmma_bf16_n32_kernel(const uint8_t* img, int bytes, uint64_t da, uint64_t db, float* out) {
  uint8_t* base = stage(img, bytes);
  float d[16];
  for (float& x : d) x = 1e6f;
  sm90::wgmma_fence();
  for (int acc = 0; acc < 2; ++acc) {   // D = 2 A B
    if constexpr (kF16) sm90::wgmma_m64n32k16_f16(d, relocate(da, base), relocate(db, base), acc);
    else sm90::wgmma_m64n32k16_bf16(d, relocate(da, base), relocate(db, base), acc);
  }
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < 16; ++i) out[threadIdx.x * 16 + i] = d[i];
}
template <bool kF16>
__global__ void wgmma_bf16_n256_kernel(const uint8_t* img, int bytes, uint64_t da, uint64_t db, const float* c,
                                       float* out) {
  uint8_t* base = stage(img, bytes);
  float d[128];
  for (int i = 0; i < 128; ++i) d[i] = c[threadIdx.x * 128 + i];   // accumulates: D = A B + C
  sm90::wgmma_fence();
  if constexpr (kF16) sm90::wgmma_m64n256k16_f16_tnsp_b(d, relocate(da, base), relocate(db, base));
  else sm90::wgmma_m64n256k16_bf16_tnsp_b(d, relocate(da, base), relocate(db, base));
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < 128; ++i) out[threadIdx.x * 128 + i] = d[i];
}

// Register-A form: thread t's four 32-bit A registers come from `a_frag` (host-built through CUTLASS's
// ALayout_64x16), B [k][n] MN-major in shared memory; D = A B + C.
template <bool kF16>
__global__ void wgmma_rs_n256_kernel(const uint8_t* img, int bytes, const uint32_t* a_frag, uint64_t db,
                                     const float* c, float* out) {
  uint8_t* base = stage(img, bytes);
  float d[128];
  for (int i = 0; i < 128; ++i) d[i] = c[threadIdx.x * 128 + i];
  uint32_t a[4];
  for (int r = 0; r < 4; ++r) a[r] = a_frag[threadIdx.x * 4 + r];
  sm90::wgmma_fence();
  if constexpr (kF16) sm90::wgmma_m64n256k16_f16_rs_tnsp_b(d, a, relocate(db, base));
  else sm90::wgmma_m64n256k16_bf16_rs_tnsp_b(d, a, relocate(db, base));
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < 128; ++i) out[threadIdx.x * 128 + i] = d[i];
}
// m64n64k16, both operands K-major 128B swizzle (the MLA kernels' S = Q K^T), scale-d 0 then 1: D = 2 A B.
template <bool kF16>
__global__ void wgmma_n64k16_kernel(const uint8_t* img, int bytes, uint64_t da, uint64_t db, float* out) {
  uint8_t* base = stage(img, bytes);
  float d[32];
  for (float& x : d) x = 1e6f;
  sm90::wgmma_fence();
  for (int acc = 0; acc < 2; ++acc) {
    if constexpr (kF16) sm90::wgmma_m64n64k16_f16(d, relocate(da, base), relocate(db, base), acc);
    else sm90::wgmma_m64n64k16_bf16(d, relocate(da, base), relocate(db, base), acc);
  }
  sm90::wgmma_commit();
  sm90::wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) out[threadIdx.x * 32 + i] = d[i];
}

// CUTLASS cute/atom/mma_traits_sm90_gmma.hpp CLayout_64xN: (thread, value) -> m + 64 n.
CuteLayout clayout_64xn(int n) {
  return cute_layout("((_4,_8,_4),(_2,_2,N8)):((_128,_1,_16),(_64,_8,_512))", {{"N8", n / 8}});
}
// Compares register file `out` [128 threads][n/2] with D [64][n] read through CLayout_64xN.
void check_d(const std::vector<float>& out, const std::vector<float>& ref, int n, const std::string& what) {
  const CuteLayout cl = clayout_64xn(n);
  int bad = -1;
  for (int t = 0; t < 128 && bad < 0; ++t)
    for (int v = 0; v < n / 2; ++v) {
      const long idx = cl(t, v);
      if (out[t * (n / 2) + v] != ref[(idx % 64) * n + idx / 64]) { bad = t * 1000 + v; break; }
    }
  check(bad < 0, what + (bad < 0 ? "" : at(bad / 1000, bad % 1000)),
        "PTX ISA 9.7.15 wgmma + 9.7.15.5.1.2 canonical layouts; D via cute/atom/mma_traits_sm90_gmma.hpp CLayout_64xN");
}

void test_wgmma() {
  // ISA 9.7.15.5.1.1 "Matrix fragments for wgmma .m64nNk*", accumulator D: row = 16 warp + groupID (+8 for
  // d_i with i % 4 >= 2), col = 2 threadID_in_group + (i & 1) + 8 (i / 4) -- against CLayout_64xN.
  const CuteLayout c256 = clayout_64xn(256);
  bool same = true;
  for (int t = 0; t < 128; ++t)
    for (int i = 0; i < 128; ++i) {
      const int row = 16 * (t / 32) + (t % 32) / 4 + 8 * ((i % 4) / 2), col = 2 * (t % 4) + (i & 1) + 8 * (i / 4);
      same = same && c256(t, i) == row + 64 * col;
    }
  check(same, "wgmma D fragment: the ISA's row/col formula equals CUTLASS CLayout_64xN (N = 256)",
        "PTX ISA 9.7.15.5.1.1; cute/atom/mma_traits_sm90_gmma.hpp CLayout_64xN");

  {  // e4m3 m64n64k32, both operands K-major, 128B swizzle (ISA canonical layout), two k-steps (K = 64)
    std::vector<float> A(64 * 64), B(64 * 64), ref(64 * 64, 0.f);
    for (float& x : A) x = small_int(-4, 4);   // exact in e4m3; every sum is exact in fp32
    for (float& x : B) x = small_int(-4, 4);
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n)
        for (int k = 0; k < 64; ++k) ref[m * 64 + n] += A[m * 64 + k] * B[n * 64 + k];
    const CuteLayout l = cute_layout(kKMajorSw128, {{"T", 16}, {"SBO", 1024}});
    std::vector<uint8_t> img(16384, 0);
    place(img, 0, l, 3, 1, 64, 64, A);
    place(img, 8192, l, 3, 1, 64, 64, B);
    std::vector<float> out(128 * 32, NAN);
    launch<wgmma_e4m3_kernel>(128, img.size() + kPad, img.data(), int(img.size()), 8192, out.data());
    check_d(out, ref, 64, "wgmma m64n64k32 e4m3 (K-major, 128B swizzle, smem_desc_k_major_sw128, 2 k-steps): D = A B");
  }
  {  // e4m3 m64n16k32 / m64n32k32 (small-M GEMM tiles): K = 128, B of 16 / 32 rows (two / four 8-row atoms)
    const auto narrow = [&](auto n_tag) {
      constexpr int kN = decltype(n_tag)::value;
      std::vector<float> A(64 * 128), B(kN * 128), ref(64 * kN, 0.f);
      for (float& x : A) x = small_int(-4, 4);
      for (float& x : B) x = small_int(-4, 4);
      for (int m = 0; m < 64; ++m)
        for (int n = 0; n < kN; ++n)
          for (int k = 0; k < 128; ++k) ref[m * kN + n] += A[m * 128 + k] * B[n * 128 + k];
      const CuteLayout l = cute_layout(kKMajorSw128, {{"T", 16}, {"SBO", 1024}});
      std::vector<uint8_t> img(8192 + kN * 128, 0);
      place(img, 0, l, 3, 1, 64, 128, A);
      place(img, 8192, l, 3, 1, kN, 128, B);
      std::vector<float> out(128 * (kN / 2), NAN);
      launch<wgmma_e4m3_narrow_kernel<kN>>(128, img.size() + kPad, img.data(), int(img.size()), 8192, out.data());
      check_d(out, ref, kN, "wgmma m64n" + std::to_string(kN) +
                                "k32 e4m3 (K-major, 128B swizzle, 4 k-steps over a 128-byte row): D = A B");
    };
    narrow(std::integral_constant<int, 16>{});
    narrow(std::integral_constant<int, 32>{});
  }
  // bf16, then f16: values k/8 + 1/256 need 9 significant bits, exact in f16 but not in bf16 (so an f16 operand
  // read as bf16 fails); every product and sum stays exact in fp32.
  for (const bool f16 : {false, true}) {
  const char* type = f16 ? "f16" : "bf16";
  auto value = [&] { return f16 ? small_int(-8, 8) / 8 + 1.f / 256 : small_int(-4, 4); };
  auto launch_n32 = [&](auto... args) {
    if (f16) launch<wgmma_bf16_n32_kernel<true>>(args...);
    else launch<wgmma_bf16_n32_kernel<false>>(args...);
  };
  auto launch_n256 = [&](auto... args) {
    if (f16) launch<wgmma_bf16_n256_kernel<true>>(args...);
    else launch<wgmma_bf16_n256_kernel<false>>(args...);
  };
  std::vector<float> A(64 * 16);
  for (float& x : A) x = value();
  const CuteLayout la = cute_layout(kKMajorSw128, {{"T", 8}, {"SBO", 512}});
  const uint64_t da = cutlass_desc(0, 16, 1024, 1);   // 128B swizzle: LBO unused ("assumed 1")
  {  // bf16 m64n32k16: A K-major 128B swizzle; B K-major without swizzle (LBO 128 B between the two K core
     // matrices, SBO 256 B between 8-row groups), the descriptor built with CUTLASS's bitfields
    std::vector<float> B(32 * 16), ref(64 * 32, 0.f);
    for (float& x : B) x = value();
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 32; ++n)
        for (int k = 0; k < 16; ++k) ref[m * 32 + n] += 2 * A[m * 16 + k] * B[n * 16 + k];
    std::vector<uint8_t> img(8192 + 1024, 0);
    place(img, 0, la, 3, 2, 64, 16, A, f16);
    place(img, 8192, cute_layout(kKMajorNone, {{"T", 8}, {"SBO", 128}, {"LBO", 64}}), 0, 2, 32, 16, B, f16);
    std::vector<float> out(128 * 16, NAN);
    launch_n32(128, img.size() + kPad, img.data(), int(img.size()), da,
                                  cutlass_desc(8192, 128, 256, 0), out.data());
    check_d(out, ref, 32,
            std::string("wgmma m64n32k16 ") + type + " (A K-major 128B swizzle, B K-major no swizzle), scale-d 0 then 1: D = 2 A B");
  }
  {  // bf16 m64n256k16 .tnspB: B [k][n] MN-major, 128B swizzle: 64-column atoms (8 K rows x 128 B) with
     // SBO = 1024 B between the two 8-row K groups and LBO = 2048 B between 64-column blocks (ISA 9.7.15.5.1.2.1)
    std::vector<float> Bkn(16 * 256), Bnk(256 * 16), ref(64 * 256), c(128 * 128);
    for (float& x : Bkn) x = value();
    for (int k = 0; k < 16; ++k)
      for (int n = 0; n < 256; ++n) Bnk[n * 16 + k] = Bkn[k * 256 + n];
    for (float& x : ref) x = small_int(-50, 50);   // C
    const CuteLayout cl = clayout_64xn(256);
    for (int t = 0; t < 128; ++t)
      for (int v = 0; v < 128; ++v) c[t * 128 + v] = ref[(cl(t, v) % 64) * 256 + cl(t, v) / 64];
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 256; ++n)
        for (int k = 0; k < 16; ++k) ref[m * 256 + n] += A[m * 16 + k] * Bkn[k * 256 + n];
    std::vector<uint8_t> img(8192 + 8192, 0);
    place(img, 0, la, 3, 2, 64, 16, A, f16);
    place(img, 8192, cute_layout(kMnMajorSw128, {{"T", 8}, {"LBO", 1024}, {"SBO", 512}}), 3, 2, 256, 16, Bnk,
          f16);
    std::vector<float> out(128 * 128, NAN);
    launch_n256(128, img.size() + kPad, img.data(), int(img.size()), da,
                                   cutlass_desc(8192, 2048, 1024, 1), c.data(), out.data());
    check_d(out, ref, 256,
            std::string("wgmma m64n256k16 ") + type + " .tnspB (B MN-major, 128B swizzle, hand-built descriptor): D = A B + C");

    // The same product with A from registers: CUTLASS's ALayout_64x16 (= CLayout_64x16, (thread, value) ->
    // m + 64 k; value v in register v / 2, low half for even v) places A[m][k] (PTX ISA 9.7.15.5.1.1.1, "Matrix
    // Fragments for wgmma.m64nNk16", matrix A: the mma.m16n8k16 A layout per warp, warp w holding rows 16w..).
    const CuteLayout al = clayout_64xn(16);
    std::vector<uint32_t> frag(128 * 4, 0);
    for (int t = 0; t < 128; ++t)
      for (int v = 0; v < 8; ++v) {
        const long idx = al(t, v);
        const float x = A[(idx % 64) * 16 + idx / 64];
        const uint32_t h = f16 ? f16_bits(x) : bf16_bits(x);
        frag[t * 4 + v / 2] |= h << (16 * (v % 2));
      }
    std::vector<float> out_rs(128 * 128, NAN);
    if (f16) launch<wgmma_rs_n256_kernel<true>>(128, img.size() + kPad, img.data(), int(img.size()), frag.data(),
                                               cutlass_desc(8192, 2048, 1024, 1), c.data(), out_rs.data());
    else launch<wgmma_rs_n256_kernel<false>>(128, img.size() + kPad, img.data(), int(img.size()), frag.data(),
                                             cutlass_desc(8192, 2048, 1024, 1), c.data(), out_rs.data());
    check_d(out_rs, ref, 256,
            std::string("wgmma m64n256k16 ") + type +
                " register-A (fragments through CUTLASS ALayout_64x16) .tnspB: D = A B + C");
  }
  {  // m64n64k16: A [64 x 16] and B [64 x 16], both K-major 128B swizzle
    std::vector<float> B(64 * 16), ref(64 * 64, 0.f);
    for (float& x : B) x = value();
    for (int m = 0; m < 64; ++m)
      for (int n = 0; n < 64; ++n)
        for (int k = 0; k < 16; ++k) ref[m * 64 + n] += 2 * A[m * 16 + k] * B[n * 16 + k];
    std::vector<uint8_t> img(16384, 0);
    place(img, 0, la, 3, 2, 64, 16, A, f16);
    place(img, 8192, la, 3, 2, 64, 16, B, f16);
    std::vector<float> out(128 * 32, NAN);
    if (f16) launch<wgmma_n64k16_kernel<true>>(128, img.size() + kPad, img.data(), int(img.size()), da,
                                              cutlass_desc(8192, 16, 1024, 1), out.data());
    else launch<wgmma_n64k16_kernel<false>>(128, img.size() + kPad, img.data(), int(img.size()), da,
                                            cutlass_desc(8192, 16, 1024, 1), out.data());
    check_d(out, ref, 64, std::string("wgmma m64n64k16 ") + type + " (A, B K-major 128B swizzle), scale-d 0 then 1: D = 2 A B");
  }
  }
}

// ======== 4. The matrix descriptor and the canonical layouts (emu::gmma::decode / element_addr) ========
uint64_t isa_desc(uint32_t start, uint32_t lbo, uint32_t sbo, uint32_t base, uint32_t mode) {   // ISA 9.7.15.5.1.2.2
  const auto enc = [](uint64_t x) { return (x & 0x3FFFF) >> 4; };   // matrix-descriptor-encode
  return enc(start) | enc(lbo) << 16 | enc(sbo) << 32 | uint64_t(base & 7) << 49 | uint64_t(mode) << 62;
}
// Compares element_addr over an operand with the byte address a layout + swizzle gives; returns "" or the mismatch.
template <typename F>
std::string compare_addr(const emu::gmma::Desc& d, emu::gmma::Major major, int esize, int rows, int kext, F&& want) {
  for (int mn = 0; mn < rows; ++mn)
    for (int k = 0; k < kext; ++k)
      if (emu::gmma::element_addr(d, major, esize, mn, k) != want(mn, k))
        return at(mn, k) + " decoder " + std::to_string(emu::gmma::element_addr(d, major, esize, mn, k)) + " layout " +
               std::to_string(want(mn, k));
  return "";
}

void test_descriptors() {
  using emu::gmma::Major;
  {  // field positions: CUTLASS's bitfields and the ISA's bit table encode the same word; the decoder reads it
    bool ok = true;
    for (int i = 0; i < 200; ++i) {
      const uint32_t start = (g_rng() % 0x4000) << 4, lbo = (g_rng() % 0x4000) << 4, sbo = (g_rng() % 0x4000) << 4;
      const int mode = int(g_rng() % 4), base = int(g_rng() % 8);
      const uint64_t w = cutlass_desc(start, lbo, sbo, mode, base);
      const emu::gmma::Desc d = emu::gmma::decode(w);
      ok = ok && w == isa_desc(start, lbo, sbo, base, mode) && d.start == start && d.lbo == lbo && d.sbo == sbo &&
           d.base_offset == uint32_t(base) && d.mode == uint32_t(mode);
    }
    check(ok, "descriptor fields: start bits 0-13, LBO 16-29, SBO 32-45, base offset 49-51, swizzle 62-63 (all >> 4)",
          "PTX ISA 9.7.15.5.1.2.2 Matrix Descriptor Format; cute/arch/mma_sm90_desc.hpp GmmaDescriptor");
    const uint32_t x = 0x7A5C0;   // beyond 18 bits: matrix-descriptor-encode(x) = (x & 0x3FFFF) >> 4
    check(emu::gmma::decode(isa_desc(x, 0, 0, 0, 0)).start == (x & 0x3FFF0),
          "descriptor start: only address bits 4-17 are encoded",
          "PTX ISA 9.7.15.5.1.2.2 matrix-descriptor-encode");
  }
  // Canonical layouts in elements (ISA table) and in uint128_t units (CUTLASS make_gmma_desc comments).
  struct Canon { Major major; int mode, B; const char* isa; const char* cutlass; };
  const Canon canon[] = {
      {Major::MN, 0, 0, "((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))", "((1,n),(8,k)):((X,SBO),(1,LBO))"},
      {Major::MN, 3, 1, "((T,2,m),(8,k)):((1,T,LBO),(2T,SBO))", "((2,n),(8,k)):((1,LBO),(2,SBO))"},
      {Major::MN, 2, 2, "((T,4,m),(8,k)):((1,T,LBO),(4T,SBO))", "((4,n),(8,k)):((1,LBO),(4,SBO))"},
      {Major::MN, 1, 3, "((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))", "((8,n),(8,k)):((1,LBO),(8,SBO))"},
      {Major::K, 0, 0, "((8,m),(T,2k)):((1T,SBO),(1,LBO))", "((8,n),2):((1,SBO),LBO)"},
      {Major::K, 3, 1, "((8,m),(T,2k)):((2T,SBO),(1,T))", "((8,n),2):((2,SBO),1)"},
      {Major::K, 2, 2, "((8,m),(T,2k)):((4T,SBO),(1,T))", "((8,n),2):((4,SBO),1)"},
      {Major::K, 1, 3, "((8,m),(T,2k)):((8T,SBO),(1,T))", "((8,n),2):((8,SBO),1)"},
  };
  const char* names[] = {"none", "128B", "64B", "32B"};
  for (const Canon& c : canon)
    for (int esize : {1, 2, 4}) {
      if (c.major == Major::MN && esize != 2) continue;   // MN-major operands: 16-bit types only (ISA 9.7.15.5.1.2)
      const int T = 16 / esize, kext = 32 / esize, rows = c.major == Major::MN ? 256 : 64;
      std::string isa_err, cutlass_err;
      for (uint32_t lbo : {128u, 2048u, 8192u})
        for (uint32_t sbo : {256u, 1024u, 4096u})
          for (uint32_t start : {4096u, 4096u + 32u, 8192u + 96u}) {
            if (c.major == Major::MN && start % 1024) continue;   // MN-major: K steps move by whole 8-row groups
            const emu::gmma::Desc d = emu::gmma::decode(isa_desc(start, lbo, sbo, 0, c.mode));
            const CuteLayout li = cute_layout(c.isa, {{"T", T}, {"LBO", lbo / esize}, {"SBO", sbo / esize}});
            const CuteLayout lc = cute_layout(c.cutlass, {{"LBO", lbo / 16}, {"SBO", sbo / 16}});
            if (isa_err.empty())
              isa_err = compare_addr(d, c.major, esize, rows, kext, [&](int mn, int k) {
                return cute_swizzle(start + esize * uint32_t(li(mn, k)), c.B);
              });
            if (cutlass_err.empty())
              cutlass_err = compare_addr(d, c.major, esize, rows, kext, [&](int mn, int k) {
                const uint32_t off = c.major == Major::MN ? 16 * uint32_t(lc(mn / T, k)) + esize * (mn % T)
                                                          : 16 * uint32_t(lc(mn, k / T)) + esize * (k % T);
                return cute_swizzle(start + off, c.B);
              });
          }
      const std::string what = std::string(c.major == Major::K ? "K-major " : "MN-major ") + names[c.mode] +
                               " swizzle, " + std::to_string(esize) + "-byte elements: element_addr = ";
      check(isa_err.empty(), what + "Swizzle<" + std::to_string(c.B) + ",4,3> o " + c.isa + isa_err,
            "PTX ISA 9.7.15.5.1.2.1.3 Canonical Layouts");
      check(cutlass_err.empty(), what + "(uint128_t units) " + c.cutlass + cutlass_err,
            "cute/atom/mma_traits_sm90_gmma.hpp make_gmma_desc comments");
    }
  // The ISA's worked examples: exact layout (elements) and the encoded LBO / SBO the ISA gives for it.
  struct Example {
    const char* name;
    Major major;
    int mode, B, esize, rows, kext;
    uint32_t lbo_enc, sbo_enc;
    const char* exact;
  };
  const Example ex[] = {
      {"K-major, no swizzle, tf32", Major::K, 0, 0, 4, 16, 8, 16, 8, "((8,2),(4,4)):((4,32),(1,64))"},
      {"K-major, 32B swizzle, tf32", Major::K, 3, 1, 4, 16, 8, 1, 16, "((8,2),(4,4)):((8,64),(1,4))"},
      {"MN-major, no swizzle, bf16", Major::MN, 0, 0, 2, 16, 16, 16, 8, "((8,1,2),(8,2)):((1,8,64),(8,128))"},
      {"MN-major, 32B swizzle, bf16", Major::MN, 3, 1, 2, 32, 16, 16, 32, "((8,2,2),(8,2)):((1,8,128),(16,256))"},
      {"MN-major, 64B swizzle, bf16", Major::MN, 2, 2, 2, 64, 16, 32, 64, "((8,4,2),(8,2)):((1,8,256),(32,512))"},
  };
  for (const Example& e : ex) {
    const uint32_t start = 4096;
    const CuteLayout l = cute_layout(e.exact);
    const emu::gmma::Desc d = emu::gmma::decode(isa_desc(start, e.lbo_enc << 4, e.sbo_enc << 4, 0, e.mode));
    const std::string err = compare_addr(d, e.major, e.esize, e.rows, e.kext, [&](int mn, int k) {
      return cute_swizzle(start + e.esize * uint32_t(l(mn, k)), e.B);
    });
    check(err.empty(), std::string("ISA worked example ") + e.name + ": " + e.exact + err,
          "PTX ISA 9.7.15.5.1.2.1.3 Canonical Layouts, Examples");
  }
  {  // negative: LBO and SBO swapped in a no-swizzle K-major descriptor give other addresses
    const emu::gmma::Desc good = emu::gmma::decode(isa_desc(4096, 128, 256, 0, 0));
    const emu::gmma::Desc swapped = emu::gmma::decode(isa_desc(4096, 256, 128, 0, 0));
    bool differs = false;
    for (int mn = 0; mn < 64; ++mn)
      for (int k = 0; k < 16; ++k)
        differs = differs || emu::gmma::element_addr(good, Major::K, 2, mn, k) !=
                                 emu::gmma::element_addr(swapped, Major::K, 2, mn, k);
    const CuteLayout l = cute_layout(kKMajorNone, {{"T", 8}, {"LBO", 64}, {"SBO", 128}});
    const std::string err =
        compare_addr(swapped, Major::K, 2, 64, 16, [&](int mn, int k) { return 4096 + 2 * uint32_t(l(mn, k)); });
    check(differs && !err.empty(), "K-major no swizzle: swapping LBO and SBO changes the element addresses",
          "PTX ISA 9.7.15.5.1.2.1.1/2 (LBO: between the K core matrices; SBO: between 8-row groups)");
  }
  // what the decoder does not model is reported, not silently mis-emulated
  const std::string base_err = harness::error_of([] {
    (void)emu::gmma::element_addr(emu::gmma::decode(isa_desc(4096, 16, 1024, 1, 1)), Major::K, 1, 0, 0);
  });
  check(harness::contains(base_err, "base offset"),
        "a non-zero matrix base offset (128B swizzle) is reported: " + base_err,
        "PTX ISA 9.7.15.5.1.2.2 (base offset for patterns not starting at a 1024-byte boundary)");
  const std::string reserved_err =
      harness::error_of([] { (void)emu::gmma::decode(isa_desc(4096, 16, 1024, 0, 1) | (1ull << 14)); });
  check(harness::contains(reserved_err, "reserved"), "descriptor bits outside the ISA's fields are reported",
        "PTX ISA 9.7.15.5.1.2.2 Matrix Descriptor Format");
}

// ======== 5. TMA (cp.async.bulk.tensor.3d ... mbarrier::complete_tx::bytes) ========
constexpr int kDimX = 200, kDimY = 50, kDimZ = 3, kPitch = 208, kBoxX = 128, kBoxY = 16, kBoxBytes = kBoxX * kBoxY;
uint8_t gval(int x, int y, int z) { return uint8_t(1 + (x * 7 + y * 13 + z * 29) % 251); }   // never 0

__global__ void tma_kernel(const __grid_constant__ CUtensorMap map, int c0, int c1, int c2, uint32_t tx, uint8_t* out) {
  uint8_t* base = aligned_smem();
  uint64_t* bar = reinterpret_cast<uint64_t*>(base + kBoxBytes);
  if (threadIdx.x == 0) {
    sm90::mbarrier_init(bar, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm90::mbarrier_arrive_expect_tx(bar, tx);
    sm90::tma_load_3d(base, &map, bar, c0, c1, c2);
  }
  sm90::mbarrier_wait(bar, 0);
  for (int i = threadIdx.x; i < kBoxBytes; i += blockDim.x) out[i] = base[i];
}

void test_tma() {
  std::vector<uint8_t> g(size_t(kPitch) * kDimY * kDimZ, 0);
  for (int z = 0; z < kDimZ; ++z)
    for (int y = 0; y < kDimY; ++y)
      for (int x = 0; x < kDimX; ++x) g[(size_t(z) * kDimY + y) * kPitch + x] = gval(x, y, z);
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult q{};
  cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q);
  check(fn != nullptr && q == cudaDriverEntryPointSuccess,
        "cuTensorMapEncodeTiled through cudaGetDriverEntryPointByVersion",
        "CUDA runtime API cudaGetDriverEntryPointByVersion");
  if (fn == nullptr) return;
  const cuuint64_t dims[3] = {kDimX, kDimY, kDimZ}, strides[2] = {kPitch, cuuint64_t(kPitch) * kDimY};
  const cuuint32_t box[3] = {kBoxX, kBoxY, 1}, estr[3] = {1, 1, 1};
  CUtensorMap map;
  const CUresult r = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, g.data(), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  check(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled: uint8, box {128, 16, 1}, SWIZZLE_128B",
        "CUDA driver API cuTensorMapEncodeTiled");
  const auto load = [&](int c0, int c1, int c2, uint32_t tx, std::vector<uint8_t>& out) {
    return harness::error_of([&] { launch<tma_kernel>(32, kBoxBytes + 64 + kPad, map, c0, c1, c2, tx, out.data()); });
  };
  struct Case { int c0, c1, c2; const char* what; };
  const Case cases[] = {{128, 40, 2, "box past the end in x and y"},
                        {-16, -3, 1, "box before the start in x and y (negative coordinates)"},
                        {0, 0, 3, "box entirely out of bounds in z"}};
  for (const Case& c : cases) {
    std::vector<uint8_t> out(kBoxBytes, 0xCD);
    const std::string err = load(c.c0, c.c1, c.c2, kBoxBytes, out);
    check(err.empty(), std::string("TMA ") + c.what + ": expect_tx of the full box (" + std::to_string(kBoxBytes) +
                           " bytes, out-of-bounds ones included) completes the phase" + (err.empty() ? "" : ": " + err),
          "PTX ISA cp.async.bulk.tensor .mbarrier::complete_tx::bytes (the box bytes); CUTLASS sm90 collectives: "
          "TmaTransactionBytes = smem tile bytes, residue tiles too");
    int in_bad = -1, oob_bad = -1, chunk_bad = -1;
    for (int y = 0; y < kBoxY; ++y)
      for (int x = 0; x < kBoxX; ++x) {
        const int gx = c.c0 + x, gy = c.c1 + y, gz = c.c2;
        const bool inside = gx >= 0 && gx < kDimX && gy >= 0 && gy < kDimY && gz >= 0 && gz < kDimZ;
        const uint8_t want = inside ? gval(gx, gy, gz) : 0;
        if (out[cute_swizzle(uint32_t(y * kBoxX + x), 3)] != want) (inside ? in_bad : oob_bad) = y * kBoxX + x;
        // the same placement stated as "16-byte chunk index XOR (row % 8)" on 128-byte rows
        if (out[y * 128 + (((x / 16) ^ (y % 8)) * 16) + x % 16] != want) chunk_bad = y * kBoxX + x;
      }
    const std::string w = std::string("TMA ") + c.what + ": ";
    check(in_bad < 0,
          w + "in-bounds bytes copied to Swizzle<3,4,3>(128 y + x)" +
              (in_bad < 0 ? "" : at(in_bad % kBoxX, in_bad / kBoxX)),
          "CUDA driver API cuTensorMapEncodeTiled (CU_TENSOR_MAP_SWIZZLE_128B); cute/swizzle.hpp Swizzle<3,4,3>");
    check(oob_bad < 0, w + "out-of-bounds bytes are zero" + (oob_bad < 0 ? "" : at(oob_bad % kBoxX, oob_bad / kBoxX)),
          "CUDA driver API cuTensorMapEncodeTiled: out-of-bound elements are filled with zero (OOB_FILL_NONE)");
    check(chunk_bad < 0, w + "128B swizzle: 16-byte chunk c of row y lands at chunk c ^ (y % 8)",
          "CUDA programming guide, TMA swizzle modes (128B: chunk index XOR row % 8)");
  }
  // expect_tx must count the whole box: only the in-bounds bytes (72 x 10) is too small, one more row deadlocks
  std::vector<uint8_t> out(kBoxBytes);
  const std::string small = load(128, 40, 2, 72 * 10, out);
  check(harness::contains(small, "expect_tx too small"),
        "TMA: expect_tx of the in-bounds bytes only is reported: " + small,
        "PTX ISA cp.async.bulk.tensor: complete_tx counts the full box; mbarrier tx-count");
  const std::string large = load(128, 40, 2, kBoxBytes + 128, out);
  check(harness::contains(large, "deadlock") && harness::contains(large, "mbarrier"),
        "TMA: expect_tx beyond the box never completes the phase (deadlock on the mbarrier): " + large,
        "PTX ISA 9.7.13.15.6 Phase Completion of the mbarrier object: pending arrivals 0 and tx-count 0");
}

// ======== 5b. TMA stores (cp.async.bulk.tensor.3d.global.shared::cta.bulk_group), bf16, 32/64/128B swizzle ========
constexpr int kStX = 100, kStY = 40, kStZ = 2, kStPitch = 112, kStBoxY = 16;   // pitch 224 bytes (a multiple of 16)
uint16_t st_gval(int x, int y) { return uint16_t(0x4000 + y * 128 + x); }
constexpr uint16_t kStPoison = 0xFFFF;

// Threads place the box (box_x x 16 bf16, values from `vals`) at CuTe's Swizzle<B,4,3> of the packed byte offset,
// thread 0 stores it at (c0, c1, c2) and waits; then (load_back) the same box is loaded through the same map and
// copied to `back` in shared-memory byte order.
__global__ void tma_store_kernel(const __grid_constant__ CUtensorMap map, int box_x, int swizzle_bits, int c0, int c1,
                                 int c2, const uint16_t* vals, uint8_t* back) {
  uint8_t* base = aligned_smem();
  const int bytes = box_x * kStBoxY * 2;
  uint64_t* bar = reinterpret_cast<uint64_t*>(base + 4096);
  for (int i = threadIdx.x; i < box_x * kStBoxY; i += blockDim.x)
    std::memcpy(base + cute_swizzle(uint32_t(2 * i), swizzle_bits), vals + i, 2);
  sm90::fence_proxy_async();
  __syncthreads();
  if (threadIdx.x == 0) {
    sm90::tma_store_3d(&map, base, c0, c1, c2);
    sm90::bulk_commit_group();
    sm90::bulk_wait_group<0>();
    sm90::mbarrier_init(bar, 1);
    sm90::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    sm90::mbarrier_arrive_expect_tx(bar, uint32_t(bytes));
    sm90::tma_load_3d(base, &map, bar, c0, c1, c2);
  }
  sm90::mbarrier_wait(bar, 0);
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) back[i] = base[i];
}

void test_tma_store() {
  const char* src = "CUDA driver API cuTensorMapEncodeTiled (CU_TENSOR_MAP_SWIZZLE_32B/64B/128B: 16-byte chunk bits "
                    "XOR row bits, CuTe Swizzle<1|2|3,4,3>); PTX ISA cp.async.bulk.tensor: out-of-bound elements of "
                    "a store are not written";
  std::vector<uint16_t> g(size_t(kStPitch) * kStY * kStZ);
  const cuuint64_t dims[3] = {kStX, kStY, kStZ}, strides[2] = {kStPitch * 2, uint64_t(kStPitch) * 2 * kStY};
  const cuuint32_t estr[3] = {1, 1, 1};
  struct Mode { int box_x, bits; CUtensorMapSwizzle swizzle; const char* name; };
  const Mode modes[] = {{16, 1, CU_TENSOR_MAP_SWIZZLE_32B, "32B"}, {32, 2, CU_TENSOR_MAP_SWIZZLE_64B, "64B"},
                        {64, 3, CU_TENSOR_MAP_SWIZZLE_128B, "128B"}};
  struct Where { int c0, c1, c2; const char* what; };
  const Where wheres[] = {{8, 4, 1, "inside"},
                          {kStX - 10, kStY - 5, 0, "past the end in x and y (clipped)"},
                          {-6, -3, 1, "before the start in x and y (negative coordinates, clipped)"},
                          {0, 0, kStZ, "entirely out of bounds in z (nothing written)"}};
  for (const Mode& md : modes) {
    CUtensorMap map;
    const cuuint32_t box[3] = {cuuint32_t(md.box_x), kStBoxY, 1};
    const CUresult r = emu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, g.data(), dims, strides, box, estr,
                                         CU_TENSOR_MAP_INTERLEAVE_NONE, md.swizzle, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    check(r == CUDA_SUCCESS, std::string("cuTensorMapEncodeTiled: bf16, box {") + std::to_string(md.box_x) +
                                 ", 16, 1}, SWIZZLE_" + md.name, "CUDA driver API cuTensorMapEncodeTiled");
    if (r != CUDA_SUCCESS) continue;
    std::vector<uint16_t> vals(size_t(md.box_x) * kStBoxY);
    for (size_t i = 0; i < vals.size(); ++i) vals[i] = uint16_t(0x1000 + i);
    for (const Where& w : wheres) {
      std::fill(g.begin(), g.end(), kStPoison);
      std::vector<uint8_t> back(vals.size() * 2, 0xCD);
      const std::string err = harness::error_of([&] {
        launch<tma_store_kernel>(128, 4096 + 64 + kPad, map, md.box_x, md.bits, w.c0, w.c1, w.c2, vals.data(),
                                 back.data());
      });
      const std::string what = std::string("TMA store, SWIZZLE_") + md.name + ", box " + w.what + ": ";
      check(err.empty(), what + "runs" + (err.empty() ? "" : ": " + err));
      int bad = -1, back_bad = -1;
      for (int z = 0; z < kStZ; ++z)
        for (int y = 0; y < kStY; ++y)
          for (int x = 0; x < kStPitch; ++x) {
            const int bx = x - w.c0, by = y - w.c1;
            const bool in_box = z == w.c2 && bx >= 0 && bx < md.box_x && by >= 0 && by < kStBoxY && x < kStX;
            const uint16_t want = in_box ? vals[size_t(by) * md.box_x + bx] : kStPoison;
            if (g[(size_t(z) * kStY + y) * kStPitch + x] != want) bad = (z * kStY + y) * kStPitch + x;
          }
      for (int by = 0; by < kStBoxY; ++by)
        for (int bx = 0; bx < md.box_x; ++bx) {
          const int x = w.c0 + bx, y = w.c1 + by;
          const bool inside = x >= 0 && x < kStX && y >= 0 && y < kStY && w.c2 >= 0 && w.c2 < kStZ;
          uint16_t got;
          std::memcpy(&got, back.data() + cute_swizzle(uint32_t(2 * (by * md.box_x + bx)), md.bits), 2);
          if (got != (inside ? vals[size_t(by) * md.box_x + bx] : 0)) back_bad = by * md.box_x + bx;
        }
      check(bad < 0, what + "the in-bounds elements of the box land at their coordinates, nothing else is written" +
                         (bad < 0 ? "" : " (first mismatch at element " + std::to_string(bad) + ")"), src);
      check(back_bad < 0, what + "a TMA load of the same box through the same map gives the same swizzled shared "
                                 "layout (out-of-bounds elements 0)" +
                              (back_bad < 0 ? "" : " (first mismatch at " + std::to_string(back_bad) + ")"), src);
    }
  }
  CUtensorMap map;
  const cuuint32_t wide[3] = {64, kStBoxY, 1}, narrow[3] = {4, kStBoxY, 1};
  check(emu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, g.data(), dims, strides, wide, estr,
                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_64B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_ERROR_INVALID_VALUE,
        "cuTensorMapEncodeTiled refuses a 128-byte box row with SWIZZLE_64B (inner box bytes <= the swizzle span)",
        "CUDA driver API cuTensorMapEncodeTiled");
  check(emu::encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, g.data(), dims, strides, narrow, estr,
                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_ERROR_INVALID_VALUE,
        "cuTensorMapEncodeTiled refuses an 8-byte box row (boxDim[0] x element size a multiple of 16 bytes)",
        "CUDA driver API cuTensorMapEncodeTiled");
  {
    struct alignas(64) Raw { unsigned char bytes[sizeof(CUtensorMap) + 64]; } raw;
    CUtensorMap* misaligned = reinterpret_cast<CUtensorMap*>(raw.bytes + 16);
    const cuuint32_t box[3] = {64, kStBoxY, 1};
    check(emu::encode_tiled(misaligned, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, g.data(), dims, strides, box, estr,
                            CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_ERROR_INVALID_VALUE,
          "cuTensorMapEncodeTiled refuses a tensor map object that is not 64-byte aligned",
          "CUDA driver API cuTensorMapEncodeTiled: tensorMap address must be aligned to 64 bytes");
  }
}

// ======== 6. mbarrier phases and parity ========
// The emulated mbarrier.test_wait.parity: non-blocking, true once the phase with that parity has completed (the
// current phase's or the immediately preceding one's parity). It is the predicate the emulated try_wait blocks on.
bool test_wait(uint64_t* bar, uint32_t parity) { return emu::mbar_ready(&emu::mbar(bar), parity); }

__global__ void mbarrier_kernel(int scenario, int* out) {
  uint8_t* base = aligned_smem();
  uint64_t* bar = reinterpret_cast<uint64_t*>(base);
  uint64_t* bar2 = bar + 1;
  volatile int* slot = reinterpret_cast<int*>(base + 64);
  const uint32_t count = scenario >= 2 && scenario <= 4 ? 3 : scenario == 5 || scenario == 8 ? 2 : 1;
  if (threadIdx.x == 0) {
    sm90::mbarrier_init(bar, count);
    sm90::mbarrier_init(bar2, 1);
    sm90::fence_barrier_init();
  }
  // tid is read after the barrier: with a copy taken before it, GCC -O1 threads the later `tid == 0` tests
  // through a duplicated __syncthreads() call, which the emulator (it tells barrier phases apart by call
  // site) reports as a divergent __syncthreads.
  __syncthreads();
  const int tid = threadIdx.x;
  switch (scenario) {
    case 0:   // fresh barrier (phase 0): parity 1 names the preceding phase, complete: returns at once
      if (tid == 0) { sm90::mbarrier_wait(bar, 1); out[0] = 1; }
      break;
    case 1:   // fresh barrier: parity 0 blocks (no arrivals: deadlock)
      if (tid == 0) sm90::mbarrier_wait(bar, 0);
      break;
    case 2:   // count 3: the phase completes at the third arrival, not before
      if (tid == 0)
        for (int j = 0; j < 3; ++j) {
          out[2 * j] = test_wait(bar, 0);
          sm90::mbarrier_arrive(bar);
          out[2 * j + 1] = test_wait(bar, 0);
        }
      break;
    case 3:   // count 3, a waiter in phase 0 and two arrivals: blocks forever
    case 4:   // count 3, a waiter and three arrivals from other threads: released
      if (tid == 0) { sm90::mbarrier_wait(bar, 0); out[0] = 1; }
      if (tid >= 1 && tid <= (scenario == 3 ? 2 : 3)) sm90::mbarrier_arrive(bar);
      break;
    case 5:   // count 2, six phases: parity alternates; per phase (prev done, cur, after 1 arrival, after 2)
      if (tid == 0)
        for (int p = 0; p < 6; ++p) {
          out[4 * p] = test_wait(bar, (p + 1) & 1);
          out[4 * p + 1] = test_wait(bar, p & 1);
          sm90::mbarrier_arrive(bar);
          out[4 * p + 2] = test_wait(bar, p & 1);
          sm90::mbarrier_arrive(bar);
          out[4 * p + 3] = test_wait(bar, p & 1);
          sm90::mbarrier_wait(bar, p & 1);
        }
      break;
    case 6:   // producer (thread 0) / consumer (thread 32) through one slot, full = bar, empty = bar2, 8 rounds
      for (int i = 0; i < 8; ++i) {
        if (tid == 0) {
          sm90::mbarrier_wait(bar2, (i & 1) ^ 1);   // the first round passes on the fresh barrier
          *slot = 100 + i;
          sm90::mbarrier_arrive(bar);
        } else if (tid == 32) {
          sm90::mbarrier_wait(bar, i & 1);
          out[i] = *slot;
          sm90::mbarrier_arrive(bar2);
        }
      }
      break;
    case 7:   // count 1: its arrival is in, transaction bytes pending; one more arrival is beyond the count
      if (tid == 0) {
        sm90::mbarrier_arrive_expect_tx(bar, 16);
        sm90::mbarrier_arrive(bar);
      }
      break;
    case 8:   // count 2: a third arrival after the phase completed counts toward the next phase (legal)
      if (tid == 0) {
        for (int j = 0; j < 3; ++j) sm90::mbarrier_arrive(bar);
        out[0] = test_wait(bar, 0);
        out[1] = test_wait(bar, 1);
        sm90::mbarrier_arrive(bar);
        out[2] = test_wait(bar, 1);
        out[3] = test_wait(bar, 0);
      }
      break;
  }
}

std::vector<int> run_mbarrier(int scenario, std::string* err = nullptr) {
  std::vector<int> out(32, -1);
  const std::string e = harness::error_of([&] {
    launch<mbarrier_kernel>(64, 128 + kPad, scenario, out.data());
  });
  if (err != nullptr) *err = e;
  else if (!e.empty()) std::printf("  (scenario %d: %s)\n", scenario, e.c_str());
  return out;
}

void test_mbarrier() {
  const char* src_wait = "PTX ISA 9.7.13.15.16 mbarrier.test_wait/try_wait .parity";
  const char* src_phase =
      "PTX ISA 9.7.13.15.6 Phase Completion; 9.7.13.15.9 mbarrier.init (phase 0, pending count = count)";
  std::string err;
  check(run_mbarrier(0)[0] == 1, "mbarrier: a fresh barrier is in phase 0, so try_wait.parity 1 returns at once",
        src_wait);
  run_mbarrier(1, &err);
  check(harness::contains(err, "deadlock") && harness::contains(err, "mbarrier"),
        "mbarrier: try_wait.parity 0 on a fresh barrier blocks (no arrivals: deadlock reported)", src_wait);
  std::vector<int> o = run_mbarrier(2);
  check(std::vector<int>(o.begin(), o.begin() + 6) == std::vector<int>{0, 0, 0, 0, 0, 1},
        "mbarrier init count 3: phase 0 completes at the 3rd arrive, not before", src_phase);
  run_mbarrier(3, &err);
  check(harness::contains(err, "deadlock"),
        "mbarrier init count 3: a waiter on parity 0 stays blocked after 2 arrivals", src_phase);
  check(run_mbarrier(4)[0] == 1, "mbarrier init count 3: 3 arrivals from other threads release the parity-0 waiter",
        src_phase);
  o = run_mbarrier(5);
  bool alt = true;
  for (int p = 0; p < 6; ++p) alt = alt && o[4 * p] == 1 && o[4 * p + 1] == 0 && o[4 * p + 2] == 0 && o[4 * p + 3] == 1;
  check(alt, "mbarrier: 6 phases alternate parity 0,1,0,...; the preceding phase tests complete, the current one "
             "only after its 2nd arrival",
        src_wait);
  o = run_mbarrier(6);
  bool pc = true;
  for (int i = 0; i < 8; ++i) pc = pc && o[i] == 100 + i;
  check(pc, "mbarrier: producer/consumer over full/empty barriers, 8 rounds of flipping parity, each value seen once",
        src_wait);
  run_mbarrier(7, &err);
  check(harness::contains(err, "arrival beyond the expected count"),
        "mbarrier: an arrival while the pending count is 0 (tx-count outstanding) is reported: " + err,
        "PTX ISA 9.7.13.15.2 Contents of the mbarrier object: pending arrival count range [0, 2^20 - 1]");
  o = run_mbarrier(8, &err);
  check(err.empty() && std::vector<int>(o.begin(), o.begin() + 4) == std::vector<int>{1, 0, 1, 0},
        "mbarrier: an arrival after phase completion counts toward the next phase (not an error)", src_phase);
}

}  // namespace

int main() {
  const std::pair<const char*, void (*)()> sections[] = {{"mma", test_mma},       {"ldmatrix", test_ldmatrix},
                                                         {"wgmma", test_wgmma},   {"descriptors", test_descriptors},
                                                         {"tma", test_tma},       {"tma_store", test_tma_store},
                                                         {"mbarrier", test_mbarrier}};
  for (const auto& [name, run] : sections) {   // an unexpected emulator error fails its section, not the program
    const std::string err = harness::error_of(run);
    check(err.empty(), std::string(name) + " tests ran to the end" + (err.empty() ? "" : ": " + err));
  }
  return harness::finish();
}
