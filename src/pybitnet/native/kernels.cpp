// Native CPU kernels for pybitnet, registered as torch custom ops in the `pybitnet` namespace.
//
// Packed ternary layout (see quant/packed.py): a weight (N, K) is stored as uint8 (N, KB * 64) with
// KB = ceil(K / 256). Byte j of block b of row n holds the codes of elements 256b + 64s + j,
// s = 0..3, in bits 2s..2s+1; a code is the weight + 1 (0, 1, 2), and padding past K is code 1.
// One 64-byte load thus yields, after a shift and a mask, four 64-byte vectors of codes that line
// up with 64 contiguous int8 activations each: the operands of one vpdpbusd (u8 x s8 -> s32).
// Since code = w + 1, q . w = q . code - sum(q), and every accumulator is an exact int32.
//
// Every function is compiled for a baseline x86-64 target; the AVX2 and AVX-512 bodies carry
// their own target attributes and are chosen at run time from the CPU's features.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#define PYBITNET_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 256;      // weights per packed block
constexpr int64_t kBlockBytes = 64;  // bytes per packed block
constexpr int64_t kRowChunk = 64;    // activation rows kept hot in cache while a weight row is read
constexpr int64_t kHeadRows = 8;     // rows of a head tile (AVX-512: 16 accumulators + operands in 32 zmm)

enum Isa : int64_t { kAuto = 0, kScalar = 1, kAvx2 = 2, kAvx512 = 3 };
enum Feature : int64_t { kHasAvx2 = 1, kHasAvx512Vnni = 2, kHasAvx512Bf16 = 4 };

int64_t cpu_features() {
  int64_t f = 0;
#ifdef PYBITNET_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= kHasAvx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vnni"))
    f |= kHasAvx512Vnni;
  if (__builtin_cpu_supports("avx512bf16")) f |= kHasAvx512Bf16;
#endif
  return f;
}

int64_t resolve_isa(int64_t isa) {
  const int64_t f = cpu_features();
  if (isa == kAuto) return (f & kHasAvx512Vnni) ? kAvx512 : (f & kHasAvx2) ? kAvx2 : kScalar;
  TORCH_CHECK(isa >= kScalar && isa <= kAvx512, "pybitnet: unknown instruction set id ", isa);
  TORCH_CHECK(isa != kAvx512 || (f & kHasAvx512Vnni), "pybitnet: this CPU lacks AVX-512 VNNI");
  TORCH_CHECK(isa != kAvx2 || (f & kHasAvx2), "pybitnet: this CPU lacks AVX2");
  return isa;
}

// ------------------------------------------------------------------------------------------
// ternary GEMV/GEMM: out[m, n] = sum_k q[m, k] * code[n, k]  (the caller subtracts sum(q))

struct TernaryArgs {
  const uint8_t* w;  // (N, KB * 64)
  const int8_t* q;   // (M, KB * 256), zero past K
  int32_t* out;      // (M, N)
  const int32_t* qsum;  // (M,)
  int64_t M, N, KB;
};

// Scalar body, any CPU: the definition every vector body must agree with.
void ternary_rows_scalar(const TernaryArgs& a, int64_t n, int64_t m0, int64_t mt) {
  const uint8_t* w = a.w + n * a.KB * kBlockBytes;
  const int64_t kp = a.KB * kBlock;
  for (int64_t m = m0; m < m0 + mt; ++m) {
    const int8_t* q = a.q + m * kp;
    int32_t acc = 0;
    for (int64_t b = 0; b < a.KB; ++b)
      for (int64_t s = 0; s < 4; ++s)
        for (int64_t j = 0; j < kBlockBytes; ++j)
          acc += int32_t((w[b * kBlockBytes + j] >> (2 * s)) & 3) * q[b * kBlock + 64 * s + j];
    a.out[m * a.N + n] = acc - a.qsum[m];
  }
}

#ifdef PYBITNET_X86
template <int MT, int NR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void ternary_tile_avx512(const TernaryArgs& a, int64_t n,
                                                                                  int64_t m0) {
  const int64_t row_bytes = a.KB * kBlockBytes, kp = a.KB * kBlock;
  const uint8_t* w = a.w + n * row_bytes;
  const int8_t* q = a.q + m0 * kp;
  const __m512i mask = _mm512_set1_epi8(3);
  // Few rows: one accumulator per (row, s) so the four vpdpbusd of a block do not wait on each other.
  constexpr int SA = NR * MT <= 4 ? 4 : (NR * MT <= 8 ? 2 : 1);
  __m512i acc[NR][MT][SA];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int m = 0; m < MT; ++m)
      #pragma GCC unroll 16
      for (int t = 0; t < SA; ++t) acc[r][m][t] = _mm512_setzero_si512();
  for (int64_t b = 0; b < a.KB; ++b) {
    __m512i v[NR];
    #pragma GCC unroll 16
    for (int r = 0; r < NR; ++r) {
      v[r] = _mm512_loadu_si512(w + r * row_bytes + b * kBlockBytes);
      _mm_prefetch(reinterpret_cast<const char*>(w + r * row_bytes + (b + 8) * kBlockBytes), _MM_HINT_T0);
    }
    #pragma GCC unroll 16
    for (int s = 0; s < 4; ++s) {
      __m512i c[NR];
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        c[r] = _mm512_and_si512(v[r], mask);
        v[r] = _mm512_srli_epi16(v[r], 2);
      }
      #pragma GCC unroll 16
      for (int m = 0; m < MT; ++m) {
        const __m512i qv = _mm512_loadu_si512(q + m * kp + b * kBlock + 64 * s);
        #pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) acc[r][m][s % SA] = _mm512_dpbusd_epi32(acc[r][m][s % SA], c[r], qv);
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) {
      __m512i total = acc[r][m][0];
      #pragma GCC unroll 16
      for (int t = 1; t < SA; ++t) total = _mm512_add_epi32(total, acc[r][m][t]);
      a.out[(m0 + m) * a.N + n + r] = _mm512_reduce_add_epi32(total) - a.qsum[m0 + m];
    }
}

__attribute__((target("avx2"))) inline int32_t hsum_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int MT, int NR>
__attribute__((target("avx2"))) void ternary_tile_avx2(const TernaryArgs& a, int64_t n, int64_t m0) {
  const int64_t row_bytes = a.KB * kBlockBytes, kp = a.KB * kBlock;
  const uint8_t* w = a.w + n * row_bytes;
  const int8_t* q = a.q + m0 * kp;
  const __m256i mask = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[NR][MT];
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) acc[r][m] = _mm256_setzero_si256();
  for (int64_t b = 0; b < a.KB; ++b) {
    #pragma GCC unroll 16
    for (int h = 0; h < 2; ++h) {  // the two 32-byte halves of a 64-byte block
      __m256i v[NR];
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r)
        v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_bytes + b * kBlockBytes + 32 * h));
      #pragma GCC unroll 16
      for (int s = 0; s < 4; ++s) {
        __m256i c[NR];
        #pragma GCC unroll 16
        for (int r = 0; r < NR; ++r) {
          c[r] = _mm256_and_si256(v[r], mask);
          v[r] = _mm256_srli_epi16(v[r], 2);
        }
        #pragma GCC unroll 16
        for (int m = 0; m < MT; ++m) {
          const __m256i qv =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + m * kp + b * kBlock + 64 * s + 32 * h));
          #pragma GCC unroll 16
          for (int r = 0; r < NR; ++r) {
            // codes <= 2 and |q| <= 128: the u8 x s8 pair sums fit int16 without saturating
            const __m256i pairs = _mm256_maddubs_epi16(c[r], qv);
            acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(pairs, ones));
          }
        }
      }
    }
  }
  #pragma GCC unroll 16
  for (int r = 0; r < NR; ++r)
    #pragma GCC unroll 16
    for (int m = 0; m < MT; ++m) a.out[(m0 + m) * a.N + n + r] = hsum_avx2(acc[r][m]) - a.qsum[m0 + m];
}

template <template <int, int> class Tile, int NR>
struct ByRows;

#define PYBITNET_TILE_FN(NAME)                                                               \
  template <int NR>                                                                          \
  void NAME##_dispatch(const TernaryArgs& a, int64_t n, int64_t m0, int64_t mt) {            \
    switch (mt) {                                                                            \
      case 1: NAME<1, NR>(a, n, m0); break;                                                  \
      case 2: NAME<2, NR>(a, n, m0); break;                                                  \
      case 3: NAME<3, NR>(a, n, m0); break;                                                  \
      case 4: NAME<4, NR>(a, n, m0); break;                                                  \
      case 5: NAME<5, NR>(a, n, m0); break;                                                  \
      case 6: NAME<6, NR>(a, n, m0); break;                                                  \
      case 7: NAME<7, NR>(a, n, m0); break;                                                  \
      default: NAME<8, NR>(a, n, m0); break;                                                 \
    }                                                                                        \
  }
PYBITNET_TILE_FN(ternary_tile_avx512)
PYBITNET_TILE_FN(ternary_tile_avx2)
#undef PYBITNET_TILE_FN
#endif

// Rows [n0, n1) of the output for every activation row: each weight row is read from memory once
// per chunk of kRowChunk activation rows and reused from L1 for all of them.
void ternary_range(const TernaryArgs& a, int64_t isa, int64_t n0, int64_t n1) {
  for (int64_t mc = 0; mc < a.M; mc += kRowChunk) {
    const int64_t mend = std::min(a.M, mc + kRowChunk);
    int64_t n = n0;
#ifdef PYBITNET_X86
    if (isa != kScalar) {
      const bool wide = isa == kAvx512;
      // Up to 8 activation rows: one weight row at a time, so the weights stream in one sequential
      // sweep (interleaving rows halved the rate from DRAM); more rows: two weight rows per pass.
      if ((mend - mc) > 8)
        for (; n + 2 <= n1; n += 2)
          for (int64_t m = mc; m < mend; m += 8) {
            const int64_t mt = std::min<int64_t>(8, mend - m);
            wide ? ternary_tile_avx512_dispatch<2>(a, n, m, mt) : ternary_tile_avx2_dispatch<2>(a, n, m, mt);
          }
      for (; n < n1; ++n)
        for (int64_t m = mc; m < mend; m += 8) {
          const int64_t mt = std::min<int64_t>(8, mend - m);
          wide ? ternary_tile_avx512_dispatch<1>(a, n, m, mt) : ternary_tile_avx2_dispatch<1>(a, n, m, mt);
        }
      continue;
    }
#endif
    for (; n < n1; ++n) ternary_rows_scalar(a, n, mc, mend - mc);
  }
}

at::Tensor ternary_matmul(const at::Tensor& q, const at::Tensor& packed, int64_t k, int64_t isa) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "pybitnet.ternary_matmul: q must be 2-D int8, got ",
              q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte,
              "pybitnet.ternary_matmul: packed weights must be 2-D uint8");
  TORCH_CHECK(q.device().is_cpu() && packed.device().is_cpu(), "pybitnet.ternary_matmul: CPU tensors only");
  const int64_t M = q.size(0), N = packed.size(0), KB = (k + kBlock - 1) / kBlock, kp = KB * kBlock;
  TORCH_CHECK(q.size(1) == k, "pybitnet.ternary_matmul: q has ", q.size(1), " columns, expected ", k);
  TORCH_CHECK(packed.size(1) == KB * kBlockBytes, "pybitnet.ternary_matmul: packed weights have ", packed.size(1),
              " bytes per row, expected ", KB * kBlockBytes, " for K = ", k);
  const int64_t chosen = resolve_isa(isa);
  at::Tensor w = packed.contiguous();
  at::Tensor qp = q.contiguous();
  if (k != kp) {  // pad activations with zeros to whole blocks (padded weights are code 1: weight 0)
    at::Tensor padded = at::zeros({M, kp}, q.options());
    for (int64_t m = 0; m < M; ++m)
      std::memcpy(padded.data_ptr<int8_t>() + m * kp, qp.data_ptr<int8_t>() + m * k, k);
    qp = padded;
  }
  at::Tensor qsum = at::empty({M}, q.options().dtype(at::kInt));
  const int8_t* qd = qp.data_ptr<int8_t>();
  for (int64_t m = 0; m < M; ++m) {
    int32_t s = 0;
    for (int64_t i = 0; i < kp; ++i) s += qd[m * kp + i];
    qsum.data_ptr<int32_t>()[m] = s;
  }
  at::Tensor out = at::empty({M, N}, q.options().dtype(at::kInt));
  if (M == 0 || N == 0) return out;
  const TernaryArgs a{w.data_ptr<uint8_t>(), qd, out.data_ptr<int32_t>(), qsum.data_ptr<int32_t>(), M, N, KB};
  // grain: whole groups of four output rows per task, so row pairs/quads never straddle threads
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t g0, int64_t g1) {
    ternary_range(a, chosen, g0 * 4, std::min(N, g1 * 4));
  });
  return out;
}

// packed blocks [b0, b1) -> int8 values: each 64-byte block becomes four 64-byte runs of w = code - 1
void unpack_blocks_scalar(const uint8_t* src, int8_t* dst, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t s = 0; s < 4; ++s)
      for (int64_t j = 0; j < kBlockBytes; ++j)
        dst[b * kBlock + 64 * s + j] = int8_t(((src[b * kBlockBytes + j] >> (2 * s)) & 3) - 1);
}

#ifdef PYBITNET_X86
__attribute__((target("avx512f,avx512bw"))) void unpack_blocks_avx512(const uint8_t* src, int8_t* dst, int64_t b0,
                                                                        int64_t b1) {
  const __m512i mask = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
  for (int64_t b = b0; b < b1; ++b) {
    __m512i v = _mm512_loadu_si512(src + b * kBlockBytes);
    for (int s = 0; s < 4; ++s) {
      _mm512_storeu_si512(dst + b * kBlock + 64 * s, _mm512_sub_epi8(_mm512_and_si512(v, mask), one));
      v = _mm512_srli_epi16(v, 2);
    }
  }
}

__attribute__((target("avx2"))) void unpack_blocks_avx2(const uint8_t* src, int8_t* dst, int64_t b0, int64_t b1) {
  const __m256i mask = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
  for (int64_t b = b0; b < b1; ++b)
    for (int h = 0; h < 2; ++h) {
      __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + b * kBlockBytes + 32 * h));
      for (int s = 0; s < 4; ++s) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + b * kBlock + 64 * s + 32 * h),
                            _mm256_sub_epi8(_mm256_and_si256(v, mask), one));
        v = _mm256_srli_epi16(v, 2);
      }
    }
}
#endif

// packed (N, KB * 64) -> out int8 (N, KB * 256) ternary values (padding decodes to 0)
at::Tensor unpack_ternary_out(const at::Tensor& packed, at::Tensor out, int64_t isa) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte, "pybitnet.unpack_ternary: uint8 2-D input");
  TORCH_CHECK(out.scalar_type() == at::kChar && out.is_contiguous() && out.dim() == 2 &&
                  out.size(0) == packed.size(0) && out.size(1) == packed.size(1) * 4,
              "pybitnet.unpack_ternary: out must be contiguous int8 (N, 4 * packed columns)");
  at::Tensor w = packed.contiguous();
  const uint8_t* src = w.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  const int64_t nblocks = w.numel() / kBlockBytes;
  const int64_t chosen = resolve_isa(isa);
  at::parallel_for(0, nblocks, 1024, [&](int64_t b0, int64_t b1) {
#ifdef PYBITNET_X86
    if (chosen == kAvx512) return unpack_blocks_avx512(src, dst, b0, b1);
    if (chosen == kAvx2) return unpack_blocks_avx2(src, dst, b0, b1);
#endif
    unpack_blocks_scalar(src, dst, b0, b1);
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// 16-bit (bf16 or fp16) weights x fp32 rows -> fp32 (the lm_head). Each (row, vocab entry) is one dot product in a
// fixed order (lane-wise fp32 FMAs over the hidden dim, then a fixed tree and a scalar tail), the
// same whatever the other rows of the batch: logits of a row do not depend on its neighbours.

struct HeadArgs {
  const float* h;            // (M, H)
  const uint16_t* w;         // (V, H) bf16 or fp16 bits
  float* out;                // (M, V)
  int64_t M, V, H;
};

inline float bf16_to_float(uint16_t bits) {
  uint32_t u = uint32_t(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float fp16_to_float(uint16_t bits) { return float(c10::Half(bits, c10::Half::from_bits())); }

template <bool kHalf>
inline float widen(uint16_t bits) {
  return kHalf ? fp16_to_float(bits) : bf16_to_float(bits);
}

template <bool kHalf>
void head_scalar(const HeadArgs& a, int64_t v0, int64_t v1) {
  for (int64_t v = v0; v < v1; ++v)
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t i = 0; i < a.H; ++i) acc += a.h[m * a.H + i] * widen<kHalf>(a.w[v * a.H + i]);
      a.out[m * a.V + v] = acc;
    }
}

#ifdef PYBITNET_X86
template <bool kHalf>
__attribute__((target("avx512f,avx512bw"))) inline __m512 widen16_avx512(__m256i raw) {
  if (kHalf) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

template <int MT, bool kHalf>
__attribute__((target("avx512f,avx512bw"))) void head_tile_avx512(const HeadArgs& a, int64_t v, int64_t m0) {
  const uint16_t* w = a.w + v * a.H;
  __m512 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= a.H; i += 32) {
    const __m512i raw = _mm512_loadu_si512(w + i);
    const __m512 lo = widen16_avx512<kHalf>(_mm512_castsi512_si256(raw));
    const __m512 hi = widen16_avx512<kHalf>(_mm512_extracti64x4_epi64(raw, 1));
    for (int m = 0; m < MT; ++m) {
      const float* h = a.h + (m0 + m) * a.H + i;
      acc0[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(h), acc0[m]);
      acc1[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(h + 16), acc1[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    float acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
    for (int64_t t = i; t < a.H; ++t) acc += a.h[(m0 + m) * a.H + t] * widen<kHalf>(w[t]);
    a.out[(m0 + m) * a.V + v] = acc;
  }
}

// Several rows: the same per-(row, entry) FMA sequence as head_tile_avx512, walked in chunks of the
// hidden dim over a group of vocabulary entries, so the rows' chunk of h stays in L1 instead of
// streaming all of h from L2 once per vocabulary entry. The 16-lane partial sums wait in `state`
// between chunks (a store and a load change no bits): results equal the unblocked tile's exactly.
constexpr int64_t kHeadGroup = 16;   // vocabulary entries per group
constexpr int64_t kHeadChunk = 256;  // hidden elements per chunk (a multiple of 32)

template <int MT, bool kHalf>
__attribute__((target("avx512f,avx512bw"))) void head_group_avx512(const HeadArgs& a, int64_t v0, int64_t nv,
                                                                     int64_t m0) {
  alignas(64) float state[kHeadGroup][MT][2][16];
  std::memset(state, 0, sizeof(state));
  const int64_t vector_end = a.H / 32 * 32;
  for (int64_t c0 = 0; c0 < vector_end; c0 += kHeadChunk) {
    const int64_t c1 = std::min(vector_end, c0 + kHeadChunk);
    for (int64_t g = 0; g < nv; ++g) {
      const uint16_t* w = a.w + (v0 + g) * a.H;
      __m512 acc0[MT], acc1[MT];
      for (int m = 0; m < MT; ++m) {
        acc0[m] = _mm512_load_ps(state[g][m][0]);
        acc1[m] = _mm512_load_ps(state[g][m][1]);
      }
      for (int64_t i = c0; i < c1; i += 32) {
        const __m512i raw = _mm512_loadu_si512(w + i);
        const __m512 lo = widen16_avx512<kHalf>(_mm512_castsi512_si256(raw));
        const __m512 hi = widen16_avx512<kHalf>(_mm512_extracti64x4_epi64(raw, 1));
        for (int m = 0; m < MT; ++m) {
          const float* h = a.h + (m0 + m) * a.H + i;
          acc0[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(h), acc0[m]);
          acc1[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(h + 16), acc1[m]);
        }
      }
      for (int m = 0; m < MT; ++m) {
        _mm512_store_ps(state[g][m][0], acc0[m]);
        _mm512_store_ps(state[g][m][1], acc1[m]);
      }
    }
  }
  for (int64_t g = 0; g < nv; ++g) {
    const uint16_t* w = a.w + (v0 + g) * a.H;
    for (int m = 0; m < MT; ++m) {
      float acc = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_load_ps(state[g][m][0]), _mm512_load_ps(state[g][m][1])));
      for (int64_t t = vector_end; t < a.H; ++t) acc += a.h[(m0 + m) * a.H + t] * widen<kHalf>(w[t]);
      a.out[(m0 + m) * a.V + v0 + g] = acc;
    }
  }
}

__attribute__((target("avx2,fma"))) inline float hsum_ps_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <bool kHalf>
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen16_avx2(__m128i raw) {
  if (kHalf) return _mm256_cvtph_ps(raw);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <int MT, bool kHalf>
__attribute__((target("avx2,fma,f16c"))) void head_tile_avx2(const HeadArgs& a, int64_t v, int64_t m0) {
  const uint16_t* w = a.w + v * a.H;
  __m256 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= a.H; i += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    const __m256 lo = widen16_avx2<kHalf>(_mm256_castsi256_si128(raw));
    const __m256 hi = widen16_avx2<kHalf>(_mm256_extracti128_si256(raw, 1));
    for (int m = 0; m < MT; ++m) {
      const float* h = a.h + (m0 + m) * a.H + i;
      acc0[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(h), acc0[m]);
      acc1[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(h + 8), acc1[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    float acc = hsum_ps_avx2(_mm256_add_ps(acc0[m], acc1[m]));
    for (int64_t t = i; t < a.H; ++t) acc += a.h[(m0 + m) * a.H + t] * widen<kHalf>(w[t]);
    a.out[(m0 + m) * a.V + v] = acc;
  }
}
#endif

template <bool kHalf>
void head_range(const HeadArgs& a, int64_t isa, int64_t v0, int64_t v1) {
#ifdef PYBITNET_X86
  if (isa == kAvx512 && a.M > 1) {
    for (int64_t mc = 0; mc < a.M; mc += kRowChunk) {
      const int64_t mend = std::min(a.M, mc + kRowChunk);
      for (int64_t v = v0; v < v1; v += kHeadGroup) {
        const int64_t nv = std::min(kHeadGroup, v1 - v);
        for (int64_t m = mc; m < mend; m += kHeadRows) {
          switch (std::min<int64_t>(kHeadRows, mend - m)) {
            case 1: head_group_avx512<1, kHalf>(a, v, nv, m); break;
            case 2: head_group_avx512<2, kHalf>(a, v, nv, m); break;
            case 3: head_group_avx512<3, kHalf>(a, v, nv, m); break;
            case 4: head_group_avx512<4, kHalf>(a, v, nv, m); break;
            case 5: head_group_avx512<5, kHalf>(a, v, nv, m); break;
            case 6: head_group_avx512<6, kHalf>(a, v, nv, m); break;
            case 7: head_group_avx512<7, kHalf>(a, v, nv, m); break;
            default: head_group_avx512<8, kHalf>(a, v, nv, m); break;
          }
        }
      }
    }
    return;
  }
  if (isa != kScalar) {
    for (int64_t mc = 0; mc < a.M; mc += kRowChunk) {
      const int64_t mend = std::min(a.M, mc + kRowChunk);
      for (int64_t v = v0; v < v1; ++v)
        for (int64_t m = mc; m < mend; m += kHeadRows) {
          // up to 8 rows per tile: each 16-bit weight is widened once for all of them
          const int64_t mt = std::min<int64_t>(kHeadRows, mend - m);
          if (isa == kAvx512) {
            switch (mt) {
              case 1: head_tile_avx512<1, kHalf>(a, v, m); break;
              case 2: head_tile_avx512<2, kHalf>(a, v, m); break;
              case 3: head_tile_avx512<3, kHalf>(a, v, m); break;
              case 4: head_tile_avx512<4, kHalf>(a, v, m); break;
              case 5: head_tile_avx512<5, kHalf>(a, v, m); break;
              case 6: head_tile_avx512<6, kHalf>(a, v, m); break;
              case 7: head_tile_avx512<7, kHalf>(a, v, m); break;
              default: head_tile_avx512<8, kHalf>(a, v, m); break;
            }
          } else {  // 16 ymm registers: tiles of 4 rows at most
            switch (mt) {
              case 1: head_tile_avx2<1, kHalf>(a, v, m); break;
              case 2: head_tile_avx2<2, kHalf>(a, v, m); break;
              case 3: head_tile_avx2<3, kHalf>(a, v, m); break;
              default:
                for (int64_t t = 0; t < mt; t += 4) {
                  const int64_t rows = std::min<int64_t>(4, mt - t);
                  if (rows == 4) head_tile_avx2<4, kHalf>(a, v, m + t);
                  else if (rows == 3) head_tile_avx2<3, kHalf>(a, v, m + t);
                  else if (rows == 2) head_tile_avx2<2, kHalf>(a, v, m + t);
                  else head_tile_avx2<1, kHalf>(a, v, m + t);
                }
                break;
            }
          }
        }
    }
    return;
  }
#endif
  head_scalar<kHalf>(a, v0, v1);
}

at::Tensor half_matmul(const at::Tensor& h, const at::Tensor& weight, int64_t isa) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat, "pybitnet.half_matmul: h must be 2-D float32");
  const bool half = weight.scalar_type() == at::kHalf;
  TORCH_CHECK(weight.dim() == 2 && (half || weight.scalar_type() == at::kBFloat16),
              "pybitnet.half_matmul: weight must be 2-D bf16 or fp16");
  TORCH_CHECK(h.size(1) == weight.size(1), "pybitnet.half_matmul: h has ", h.size(1), " columns, weight ",
              weight.size(1));
  const int64_t chosen = resolve_isa(isa);
  at::Tensor hc = h.contiguous(), wc = weight.contiguous();
  const int64_t M = hc.size(0), V = wc.size(0), H = hc.size(1);
  at::Tensor out = at::empty({M, V}, h.options());
  if (M == 0 || V == 0) return out;
  const HeadArgs a{hc.data_ptr<float>(), reinterpret_cast<const uint16_t*>(wc.data_ptr()), out.data_ptr<float>(), M,
                   V, H};
  at::parallel_for(0, V, 256, [&](int64_t v0, int64_t v1) {
    half ? head_range<true>(a, chosen, v0, v1) : head_range<false>(a, chosen, v0, v1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pybitnet, m) {
  m.def("ternary_matmul(Tensor q, Tensor packed, int k, int isa=0) -> Tensor");
  m.def("unpack_ternary(Tensor packed, Tensor(a!) out, int isa=0) -> Tensor(a!)");
  m.def("half_matmul(Tensor h, Tensor weight, int isa=0) -> Tensor");
  m.def("cpu_features() -> int", &cpu_features);
}

TORCH_LIBRARY_IMPL(pybitnet, CPU, m) {
  m.impl("ternary_matmul", &ternary_matmul);
  m.impl("unpack_ternary", &unpack_ternary_out);
  m.impl("half_matmul", &half_matmul);
}
