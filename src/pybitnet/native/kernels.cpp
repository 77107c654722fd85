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
#include <cmath>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define PYBITNET_X86 1
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 256;      // weights per packed block
constexpr int64_t kBlockBytes = 64;  // bytes per packed block
constexpr int64_t kRowChunk = 64;    // activation rows kept hot in cache while a weight row is read

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
  int32_t* out;      // (M, N) accumulators, or null when out_scaled is set
  const int32_t* qsum;  // (M,)
  int64_t M, N, KB;
  float* out_scaled = nullptr;        // (M, N): acc * (inv_scale[m] * col_scale[n]) instead of acc
  const float* inv_scale = nullptr;   // (M,)  1 / act_scale
  const float* col_scale = nullptr;   // (N,)  β of each output column's projection

  // One output: the accumulator, or y = acc * (1/s_x * β) as BitLinear.scale_parts computes it
  // (two float32 roundings in this order, so the packed and the unpacked paths agree bit for bit).
  inline void store(int64_t m, int64_t n, int32_t acc) const {
    if (out_scaled) out_scaled[m * N + n] = float(acc) * (inv_scale[m] * col_scale[n]);
    else out[m * N + n] = acc;
  }
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
    a.store(m, n, acc - a.qsum[m]);
  }
}

#ifdef PYBITNET_X86
template <int MT, int NR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void ternary_tile_avx512(const TernaryArgs& a, int64_t n,
                                                                                  int64_t m0, int64_t rs) {
  const int64_t row_bytes = a.KB * kBlockBytes, kp = a.KB * kBlock;
  const uint8_t* w = a.w + n * row_bytes;
  const int8_t* q = a.q + m0 * kp;
  // Few rows: one accumulator per (row, s) so the four vpdpbusd of a block do not wait on each other.
  // Those tiles (at most 4 (weight row, activation row) pairs) also skip the shifts: code s is masked
  // in place (code * 4^s, at most 128, still a u8 operand), its accumulator sums exact multiples of
  // 4^s, and an exact arithmetic shift by 2s takes the factor off at the end. With one or two rows
  // the shifts were as costly as the vpdpbusd; larger tiles have no registers for four accumulators.
  constexpr int SA = NR * MT <= 4 ? 4 : (NR * MT <= 8 ? 2 : 1);
  constexpr bool kInPlace = SA == 4;
  const __m512i mask = _mm512_set1_epi8(3);  // the shifted tiles' mask
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
      v[r] = _mm512_loadu_si512(w + r * rs * row_bytes + b * kBlockBytes);
      _mm_prefetch(reinterpret_cast<const char*>(w + r * rs * row_bytes + (b + 8) * kBlockBytes), _MM_HINT_T0);
    }
    #pragma GCC unroll 16
    for (int s = 0; s < 4; ++s) {
      __m512i c[NR];
      #pragma GCC unroll 16
      for (int r = 0; r < NR; ++r) {
        if (kInPlace) {
          c[r] = _mm512_and_si512(v[r], _mm512_set1_epi8(char(3 << (2 * s))));
        } else {
          c[r] = _mm512_and_si512(v[r], mask);
          v[r] = _mm512_srli_epi16(v[r], 2);
        }
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
      for (int t = 1; t < SA; ++t)
        total = _mm512_add_epi32(total, kInPlace ? _mm512_srai_epi32(acc[r][m][t], 2 * t) : acc[r][m][t]);
      a.store(m0 + m, n + r * rs, _mm512_reduce_add_epi32(total) - a.qsum[m0 + m]);
    }
}

__attribute__((target("avx2"))) inline int32_t hsum_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

template <int MT, int NR>
__attribute__((target("avx2"))) void ternary_tile_avx2(const TernaryArgs& a, int64_t n, int64_t m0, int64_t rs) {
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
        v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rs * row_bytes + b * kBlockBytes + 32 * h));
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
    for (int m = 0; m < MT; ++m) a.store(m0 + m, n + r * rs, hsum_avx2(acc[r][m]) - a.qsum[m0 + m]);
}

template <template <int, int> class Tile, int NR>
struct ByRows;

#define PYBITNET_TILE_FN(NAME)                                                               \
  template <int NR>                                                                          \
  void NAME##_dispatch(const TernaryArgs& a, int64_t n, int64_t m0, int64_t mt, int64_t rs) { \
    switch (mt) {                                                                            \
      case 1: NAME<1, NR>(a, n, m0, rs); break;                                              \
      case 2: NAME<2, NR>(a, n, m0, rs); break;                                              \
      case 3: NAME<3, NR>(a, n, m0, rs); break;                                              \
      case 4: NAME<4, NR>(a, n, m0, rs); break;                                              \
      case 5: NAME<5, NR>(a, n, m0, rs); break;                                              \
      case 6: NAME<6, NR>(a, n, m0, rs); break;                                              \
      case 7: NAME<7, NR>(a, n, m0, rs); break;                                              \
      default: NAME<8, NR>(a, n, m0, rs); break;                                             \
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
      if (mend - mc <= 8) {
        // Up to 8 activation rows: two weight rows per pass, taken from the two halves of the range,
        // so each of the two loads walks its own rows in one sequential sweep. (Two adjacent rows per
        // pass jump at every row end and halved the rate from DRAM; one row per pass leaves the core
        // short of memory-level parallelism: ~15% slower on the 2B-4T shapes.)
        const int64_t half = (n1 - n) / 2, mt = mend - mc;
        for (int64_t i = 0; i < half; ++i)
          wide ? ternary_tile_avx512_dispatch<2>(a, n + i, mc, mt, half)
               : ternary_tile_avx2_dispatch<2>(a, n + i, mc, mt, half);
        n += 2 * half;
      }
      // More than 8 activation rows: two adjacent weight rows per pass, reused from L1 for every row.
      if (mend - mc > 8)
        for (; n + 2 <= n1; n += 2)
          for (int64_t m = mc; m < mend; m += 8) {
            const int64_t mt = std::min<int64_t>(8, mend - m);
            wide ? ternary_tile_avx512_dispatch<2>(a, n, m, mt, 1) : ternary_tile_avx2_dispatch<2>(a, n, m, mt, 1);
          }
      for (; n < n1; ++n)
        for (int64_t m = mc; m < mend; m += 8) {
          const int64_t mt = std::min<int64_t>(8, mend - m);
          wide ? ternary_tile_avx512_dispatch<1>(a, n, m, mt, 1) : ternary_tile_avx2_dispatch<1>(a, n, m, mt, 1);
        }
      continue;
    }
#endif
    for (; n < n1; ++n) ternary_rows_scalar(a, n, mc, mend - mc);
  }
}

void check_packed(const at::Tensor& packed, int64_t k, const char* op) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte, "pybitnet.", op,
              ": packed weights must be 2-D uint8");
  TORCH_CHECK(packed.device().is_cpu(), "pybitnet.", op, ": CPU tensors only");
  const int64_t KB = (k + kBlock - 1) / kBlock;
  TORCH_CHECK(packed.size(1) == KB * kBlockBytes, "pybitnet.", op, ": packed weights have ", packed.size(1),
              " bytes per row, expected ", KB * kBlockBytes, " for K = ", k);
}

void run_ternary(const TernaryArgs& a, int64_t isa) {
  if (a.M == 0 || a.N == 0) return;
  // grain: whole groups of four output rows per task (at least 16 groups, so the two halves that a
  // thread's few-row tiles sweep at once are long runs)
  at::parallel_for(0, (a.N + 3) / 4, 16, [&](int64_t g0, int64_t g1) {
    ternary_range(a, isa, g0 * 4, std::min(a.N, g1 * 4));
  });
}

at::Tensor ternary_matmul(const at::Tensor& q, const at::Tensor& packed, int64_t k, int64_t isa) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "pybitnet.ternary_matmul: q must be 2-D int8, got ",
              q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(q.device().is_cpu(), "pybitnet.ternary_matmul: CPU tensors only");
  check_packed(packed, k, "ternary_matmul");
  const int64_t M = q.size(0), N = packed.size(0), KB = (k + kBlock - 1) / kBlock, kp = KB * kBlock;
  TORCH_CHECK(q.size(1) == k, "pybitnet.ternary_matmul: q has ", q.size(1), " columns, expected ", k);
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
  run_ternary(TernaryArgs{w.data_ptr<uint8_t>(), qd, out.data_ptr<int32_t>(), qsum.data_ptr<int32_t>(), M, N, KB},
              chosen);
  return out;
}

// ------------------------------------------------------------------------------------------
// Activation quantization of BitLinear inputs (docs/exactness.md), float32, one row at a time in one
// fixed order, so a row gives the same integers alone or in any batch, on every instruction set:
//   z = x (float rows) or relu(g)^2 * u (int32 gate|up accumulators (M, 2K): the relu^2 FFN)
//   t = w * z with an RMSNorm weight w, else z;  c = row_scale[m] (1 without one)
//   factor = c / sqrt(sum(z^2) / K * c^2 + eps) with a norm (the sum of squares in double), else c
//   act_scale = 127 / max(absmax(t) * factor, 1e-5),  q = clamp(round_half_even(t * (act_scale * factor)))
// Absmax quantization is invariant to a positive per-row factor, so the normed row is never built.

constexpr float kActMax = 127.0f;
constexpr float kAbsmaxFloor = 1e-5f;
constexpr int kSumLanes = 16;  // squares are summed into 16 double lanes (element i into lane i % 16)

struct QuantArgs {
  const float* x = nullptr;      // (M, K) float rows, or
  const int32_t* acc = nullptr;  // (M, 2K) gate|up accumulators
  const float* norm = nullptr;   // (K,) or null
  const float* row_scale = nullptr;  // (M,) or null
  double eps = 0.0;
  int64_t M = 0, K = 0, q_stride = 0;  // q_stride >= K: the padded width of q's rows
  int8_t* q = nullptr;
  float* act_scale = nullptr;    // (M,)
  int32_t* qsum = nullptr;       // (M,) or null: sum of each row of q
};

inline float input_at(const QuantArgs& a, int64_t m, int64_t i) {
  if (a.x) return a.x[m * a.K + i];
  const int32_t* row = a.acc + m * 2 * a.K;
  float g = std::max(float(row[i]), 0.0f);
  return (g * g) * float(row[a.K + i]);
}

inline int8_t round_to_int8(float v) {
  // round half to even (the default rounding mode), then clamp; NaN -> -128 (std::max keeps its first
  // argument when the comparison fails), as _mm512_max_ps does with NaN in its first operand
  return int8_t(std::min(127.0f, std::max(-128.0f, std::nearbyint(v))));
}

// The row's factor from the sum of squares: shared by every instruction set.
inline float row_factor(const QuantArgs& a, int64_t m, const double* lanes) {
  const float c = a.row_scale ? a.row_scale[m] : 1.0f;
  if (!a.norm) return c;
  double ss = 0.0;
  for (int l = 0; l < kSumLanes; ++l) ss += lanes[l];
  const double cd = double(c);
  return float(cd / std::sqrt(ss / double(a.K) * cd * cd + a.eps));
}

inline void finish_row(const QuantArgs& a, int64_t m, float absmax, float factor, float* scale_out, float* mult_out) {
  const float act_scale = kActMax / std::max(absmax * factor, kAbsmaxFloor);
  a.act_scale[m] = act_scale;
  *scale_out = act_scale;
  *mult_out = act_scale * factor;
}

void quantize_row_scalar(const QuantArgs& a, int64_t m) {
  double lanes[kSumLanes] = {0};
  float absmax = 0.0f;
  for (int64_t i = 0; i < a.K; ++i) {
    const float z = input_at(a, m, i);
    lanes[i % kSumLanes] += double(z) * double(z);
    const float t = a.norm ? a.norm[i] * z : z;
    absmax = std::max(absmax, std::fabs(t));
  }
  float scale, mult;
  finish_row(a, m, absmax, row_factor(a, m, lanes), &scale, &mult);
  int8_t* q = a.q + m * a.q_stride;
  int32_t sum = 0;
  for (int64_t i = 0; i < a.K; ++i) {
    const float z = input_at(a, m, i);
    q[i] = round_to_int8((a.norm ? a.norm[i] * z : z) * mult);
    sum += q[i];
  }
  std::memset(q + a.K, 0, a.q_stride - a.K);
  if (a.qsum) a.qsum[m] = sum;
}

#ifdef PYBITNET_X86
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) inline __m512 input16_avx512(const QuantArgs& a, int64_t m,
                                                                                   int64_t i, __mmask16 mask) {
  if (a.x) return _mm512_maskz_loadu_ps(mask, a.x + m * a.K + i);
  const int32_t* row = a.acc + m * 2 * a.K;
  __m512 g = _mm512_max_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, row + i)), _mm512_setzero_ps());
  return _mm512_mul_ps(_mm512_mul_ps(g, g), _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(mask, row + a.K + i)));
}

// The same operations as quantize_row_scalar, sixteen elements at a time (lane l of the double sums
// holds elements l, l + 16, ..., as in the scalar body); products and roundings are per element.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) void quantize_row_avx512(const QuantArgs& a, int64_t m) {
  __m512d lo = _mm512_setzero_pd(), hi = _mm512_setzero_pd();
  __m512 absmax = _mm512_setzero_ps();
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t i = 0; i < a.K; i += 16) {
    const __mmask16 mask = a.K - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.K - i)) - 1);
    const __m512 z = input16_avx512(a, m, i, mask);
    const __m512d zl = _mm512_cvtps_pd(_mm512_castps512_ps256(z));
    const __m512d zh = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
    lo = _mm512_add_pd(lo, _mm512_mul_pd(zl, zl));
    hi = _mm512_add_pd(hi, _mm512_mul_pd(zh, zh));
    const __m512 t = a.norm ? _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, a.norm + i), z) : z;
    absmax = _mm512_max_ps(absmax, _mm512_andnot_ps(sign, t));
  }
  alignas(64) double lanes[kSumLanes];
  _mm512_store_pd(lanes, lo);
  _mm512_store_pd(lanes + 8, hi);
  float scale, mult;
  finish_row(a, m, _mm512_reduce_max_ps(absmax), row_factor(a, m, lanes), &scale, &mult);
  const __m512 vmult = _mm512_set1_ps(mult);
  int8_t* q = a.q + m * a.q_stride;
  __m512i sum = _mm512_setzero_si512();
  for (int64_t i = 0; i < a.K; i += 16) {
    const __mmask16 mask = a.K - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (a.K - i)) - 1);
    const __m512 z = input16_avx512(a, m, i, mask);
    const __m512 t = a.norm ? _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, a.norm + i), z) : z;
    __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(t, vmult), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f));  // NaN -> -128
    const __m512i v = _mm512_maskz_mov_epi32(mask, _mm512_cvtps_epi32(r));
    _mm_mask_storeu_epi8(q + i, mask, _mm512_cvtsepi32_epi8(v));
    sum = _mm512_add_epi32(sum, _mm512_cvtepi8_epi32(_mm512_cvtsepi32_epi8(v)));
  }
  std::memset(q + a.K, 0, a.q_stride - a.K);
  if (a.qsum) a.qsum[m] = _mm512_reduce_add_epi32(sum);
}
#endif

void quantize_rows_into(const QuantArgs& a, int64_t isa) {
  at::parallel_for(0, a.M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
#ifdef PYBITNET_X86
      if (isa == kAvx512) {
        quantize_row_avx512(a, m);
        continue;
      }
#endif
      quantize_row_scalar(a, m);
    }
  });
}

// x (M, K) float32 or (M, 2K) int32 gate|up accumulators; the norm weight (K,) and row_scale (M,)
// or (M, 1) optional. The arguments common to quantize_rows and ternary_linear, checked once.
QuantArgs quant_args(const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight,
                     const c10::optional<at::Tensor>& row_scale, double eps, const char* op, at::Tensor& xc,
                     at::Tensor& wc, at::Tensor& rc) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kInt),
              "pybitnet.", op, ": x must be a 2-D float32 (rows) or int32 (gate|up accumulators) CPU tensor, got ",
              x.scalar_type(), " ", x.sizes());
  QuantArgs a;
  xc = x.contiguous();
  a.M = xc.size(0);
  if (xc.scalar_type() == at::kFloat) {
    a.K = xc.size(1);
    a.x = xc.data_ptr<float>();
  } else {
    TORCH_CHECK(xc.size(1) % 2 == 0, "pybitnet.", op, ": gate|up accumulators need an even width, got ", xc.size(1));
    a.K = xc.size(1) / 2;
    a.acc = xc.data_ptr<int32_t>();
  }
  if (norm_weight.has_value() && norm_weight->defined()) {
    wc = norm_weight->contiguous();
    TORCH_CHECK(wc.scalar_type() == at::kFloat && wc.numel() == a.K, "pybitnet.", op,
                ": norm weight must be float32 with ", a.K, " elements");
    a.norm = wc.data_ptr<float>();
  }
  if (row_scale.has_value() && row_scale->defined()) {
    rc = row_scale->contiguous();
    TORCH_CHECK(rc.scalar_type() == at::kFloat && rc.numel() == a.M, "pybitnet.", op,
                ": row_scale must be float32 with one value per row (", a.M, ")");
    a.row_scale = rc.data_ptr<float>();
  }
  a.eps = eps;
  return a;
}

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight,
                                                 const c10::optional<at::Tensor>& row_scale, double eps, int64_t isa) {
  at::Tensor xc, wc, rc;
  QuantArgs a = quant_args(x, norm_weight, row_scale, eps, "quantize_rows", xc, wc, rc);
  at::Tensor q = at::empty({a.M, a.K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({a.M, 1}, x.options().dtype(at::kFloat));
  a.q_stride = a.K;
  a.q = q.data_ptr<int8_t>();
  a.act_scale = scale.data_ptr<float>();
  quantize_rows_into(a, resolve_isa(isa));
  return {q, scale};
}

// The whole BitLinear on packed weights: quantize_rows, the ternary GEMV, and (with col_scale, the β
// of each output column) the scaling y = acc * (1/act_scale * β). Returns (acc int32 or y float32
// (M, N), act_scale (M, 1)).
std::tuple<at::Tensor, at::Tensor> ternary_linear(const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight,
                                                  const c10::optional<at::Tensor>& row_scale, double eps,
                                                  const at::Tensor& packed, const c10::optional<at::Tensor>& col_scale,
                                                  int64_t isa) {
  at::Tensor xc, wc, rc;
  QuantArgs a = quant_args(x, norm_weight, row_scale, eps, "ternary_linear", xc, wc, rc);
  check_packed(packed, a.K, "ternary_linear");
  const int64_t chosen = resolve_isa(isa);
  const int64_t M = a.M, N = packed.size(0), KB = (a.K + kBlock - 1) / kBlock;
  at::Tensor q = at::empty({M, KB * kBlock}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, 1}, x.options().dtype(at::kFloat));
  at::Tensor qsum = at::empty({M}, x.options().dtype(at::kInt));
  a.q_stride = KB * kBlock;
  a.q = q.data_ptr<int8_t>();
  a.act_scale = scale.data_ptr<float>();
  a.qsum = qsum.data_ptr<int32_t>();
  quantize_rows_into(a, chosen);
  at::Tensor w = packed.contiguous();
  TernaryArgs t{w.data_ptr<uint8_t>(), a.q, nullptr, a.qsum, M, N, KB};
  at::Tensor out, inv, cs;
  if (col_scale.has_value() && col_scale->defined()) {
    cs = col_scale->contiguous();
    TORCH_CHECK(cs.scalar_type() == at::kFloat && cs.numel() == N, "pybitnet.ternary_linear: col_scale must be float32 with ",
                N, " elements");
    inv = scale.reciprocal();
    out = at::empty({M, N}, x.options().dtype(at::kFloat));
    t.out_scaled = out.data_ptr<float>();
    t.inv_scale = inv.data_ptr<float>();
    t.col_scale = cs.data_ptr<float>();
  } else {
    out = at::empty({M, N}, x.options().dtype(at::kInt));
    t.out = out.data_ptr<int32_t>();
  }
  run_ternary(t, chosen);
  return {out, scale};
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
// bf16, fp16 or fp32 weights x fp32 rows -> fp32 (the lm_head). Each (row, vocab entry) is one dot product in a
// fixed order (lane-wise fp32 FMAs over the hidden dim, then a fixed tree and a scalar tail), the
// same whatever the other rows of the batch: logits of a row do not depend on its neighbours.

enum HeadWeight : int { kHeadBf16 = 0, kHeadFp16 = 1, kHeadFp32 = 2 };

struct HeadArgs {
  const float* h;            // (M, H)
  const void* w;             // (V, H): bf16 or fp16 bits, or fp32
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
// the f16 stored (little-endian) at p
inline float fp16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return fp16_to_float(bits);
}

// element i of the head's weights as fp32
template <int kW>
inline float head_weight(const void* w, int64_t i) {
  if (kW == kHeadFp32) return static_cast<const float*>(w)[i];
  const uint16_t bits = static_cast<const uint16_t*>(w)[i];
  return kW == kHeadFp16 ? fp16_to_float(bits) : bf16_to_float(bits);
}

template <int kW>
void head_scalar(const HeadArgs& a, int64_t v0, int64_t v1) {
  for (int64_t v = v0; v < v1; ++v)
    for (int64_t m = 0; m < a.M; ++m) {
      float acc = 0.f;
      for (int64_t i = 0; i < a.H; ++i) acc += a.h[m * a.H + i] * head_weight<kW>(a.w, v * a.H + i);
      a.out[m * a.V + v] = acc;
    }
}

#ifdef PYBITNET_X86
// AVX-512 head: VB vocabulary entries x MT rows per tile, every partial sum in a register, the rows'
// h chunk loaded once for the VB entries. A bf16 chunk of 32 weights widens with two unpacks (zero
// words below each bf16), which leave its elements lane-permuted: lo holds elements 0-3, 8-11, 16-19,
// 24-27 and hi 4-7, 12-15, 20-23, 28-31. h is permuted the same way once per call (head_permuted_h),
// so lane l of lo always meets the same element of h (fp16 and fp32 chunks load in order: lo holds
// elements 0-15, hi 16-31). Each (row, entry) thus gets the same FMA sequence in every tile shape and batch size: two lane-wise fp32 accumulators over the 32-element
// chunks, a fixed reduction, then the scalar tail. VB and MT change speed only, never bits.
inline int64_t head_lane_element(int64_t j) {  // position in a 32-chunk of lane j of (lo | hi), bf16
  const int64_t half = j / 16, l = j % 16;
  return (l / 4) * 8 + half * 4 + l % 4;
}

template <int kW>
__attribute__((target("avx512f,avx512bw"))) inline void widen32_avx512(const void* weights, int64_t offset, __m512& lo,
                                                                     __m512& hi) {
  if (kW == kHeadFp32) {
    const float* w = static_cast<const float*>(weights) + offset;
    lo = _mm512_loadu_ps(w);
    hi = _mm512_loadu_ps(w + 16);
    return;
  }
  const __m512i raw = _mm512_loadu_si512(static_cast<const uint16_t*>(weights) + offset);
  if (kW == kHeadFp16) {
    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(raw));
    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(raw, 1));
  } else {
    lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), raw));
    hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), raw));
  }
}

template <int VB, int MT, int kW>
__attribute__((target("avx512f,avx512bw"))) void head_block_avx512(const HeadArgs& a, const float* hp, int64_t v,
                                                                     int64_t m0) {
  __m512 acc0[VB][MT], acc1[VB][MT];
  #pragma GCC unroll 8
  for (int r = 0; r < VB; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc0[r][m] = acc1[r][m] = _mm512_setzero_ps();
  const int64_t vector_end = a.H / 32 * 32;
  for (int64_t i = 0; i < vector_end; i += 32) {
    __m512 h0[MT], h1[MT];
    #pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      h0[m] = _mm512_loadu_ps(hp + (m0 + m) * a.H + i);
      h1[m] = _mm512_loadu_ps(hp + (m0 + m) * a.H + i + 16);
    }
    #pragma GCC unroll 8
    for (int r = 0; r < VB; ++r) {
      __m512 lo, hi;
      widen32_avx512<kW>(a.w, (v + r) * a.H + i, lo, hi);
      #pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        acc0[r][m] = _mm512_fmadd_ps(lo, h0[m], acc0[r][m]);
        acc1[r][m] = _mm512_fmadd_ps(hi, h1[m], acc1[r][m]);
      }
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < VB; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) {
      float acc = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r][m], acc1[r][m]));
      for (int64_t t = vector_end; t < a.H; ++t)
        acc += a.h[(m0 + m) * a.H + t] * head_weight<kW>(a.w, (v + r) * a.H + t);
      a.out[(m0 + m) * a.V + v + r] = acc;
    }
}

template <int VB, int kW>
void head_rows_avx512(const HeadArgs& a, const float* hp, int64_t v) {
  int64_t m = 0;
  for (; m + 2 <= a.M; m += 2) head_block_avx512<VB, 2, kW>(a, hp, v, m);
  if (m < a.M) head_block_avx512<VB, 1, kW>(a, hp, v, m);
}

__attribute__((target("avx2,fma"))) inline float hsum_ps_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int kW>
__attribute__((target("avx2,fma,f16c"))) inline __m256 widen8_avx2(__m128i raw) {
  if (kW == kHeadFp16) return _mm256_cvtph_ps(raw);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// elements offset .. offset + 15 of the head's weights as fp32: lo 0-7, hi 8-15
template <int kW>
__attribute__((target("avx2,fma,f16c"))) inline void widen16_avx2(const void* weights, int64_t offset, __m256& lo,
                                                                  __m256& hi) {
  if (kW == kHeadFp32) {
    const float* w = static_cast<const float*>(weights) + offset;
    lo = _mm256_loadu_ps(w);
    hi = _mm256_loadu_ps(w + 8);
    return;
  }
  const uint16_t* w = static_cast<const uint16_t*>(weights) + offset;
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  lo = widen8_avx2<kW>(_mm256_castsi256_si128(raw));
  hi = widen8_avx2<kW>(_mm256_extracti128_si256(raw, 1));
}

template <int MT, int kW>
__attribute__((target("avx2,fma,f16c"))) void head_tile_avx2(const HeadArgs& a, int64_t v, int64_t m0) {
  __m256 acc0[MT], acc1[MT];
  for (int m = 0; m < MT; ++m) acc0[m] = acc1[m] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= a.H; i += 16) {
    __m256 lo, hi;
    widen16_avx2<kW>(a.w, v * a.H + i, lo, hi);
    for (int m = 0; m < MT; ++m) {
      const float* h = a.h + (m0 + m) * a.H + i;
      acc0[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(h), acc0[m]);
      acc1[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(h + 8), acc1[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    float acc = hsum_ps_avx2(_mm256_add_ps(acc0[m], acc1[m]));
    for (int64_t t = i; t < a.H; ++t) acc += a.h[(m0 + m) * a.H + t] * head_weight<kW>(a.w, v * a.H + t);
    a.out[(m0 + m) * a.V + v] = acc;
  }
}
#endif

template <int kW>
void head_range(const HeadArgs& a, const float* hp, int64_t isa, int64_t v0, int64_t v1) {
#ifdef PYBITNET_X86
  if (isa == kAvx512) {
    if (a.M == 1) {  // one entry at a time: the head streams from memory in one sequential sweep
      for (int64_t v = v0; v < v1; ++v) head_block_avx512<1, 1, kW>(a, hp, v, 0);
      return;
    }
    int64_t v = v0;  // several rows: 4 entries x 2 rows per tile, the entries' 20 KB reused from L1
    for (; v + 4 <= v1; v += 4) head_rows_avx512<4, kW>(a, hp, v);
    for (; v < v1; ++v) head_rows_avx512<1, kW>(a, hp, v);
    return;
  }
  if (isa != kScalar) {
    for (int64_t mc = 0; mc < a.M; mc += kRowChunk) {
      const int64_t mend = std::min(a.M, mc + kRowChunk);
      for (int64_t v = v0; v < v1; ++v)
        for (int64_t m = mc; m < mend; m += 4) {  // 16 ymm registers: tiles of 4 rows at most
          switch (std::min<int64_t>(4, mend - m)) {
            case 1: head_tile_avx2<1, kW>(a, v, m); break;
            case 2: head_tile_avx2<2, kW>(a, v, m); break;
            case 3: head_tile_avx2<3, kW>(a, v, m); break;
            default: head_tile_avx2<4, kW>(a, v, m); break;
          }
        }
    }
    return;
  }
#endif
  head_scalar<kW>(a, v0, v1);
}

// h (M, H) -> the AVX-512 bf16 body's lane order within each 32-element chunk (tails stay in place)
at::Tensor head_permuted_h(const at::Tensor& h, int kind, int64_t isa) {
  if (isa != kAvx512 || kind != kHeadBf16) return h;
  at::Tensor out = h.clone();
  const int64_t M = h.size(0), H = h.size(1), vector_end = H / 32 * 32;
  const float* src = h.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < vector_end; i += 32)
      for (int64_t j = 0; j < 32; ++j) dst[m * H + i + j] = src[m * H + i + head_lane_element(j)];
  return out;
}

at::Tensor half_matmul(const at::Tensor& h, const at::Tensor& weight, int64_t isa) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat, "pybitnet.half_matmul: h must be 2-D float32");
  const at::ScalarType wtype = weight.scalar_type();
  TORCH_CHECK(weight.dim() == 2 && (wtype == at::kBFloat16 || wtype == at::kHalf || wtype == at::kFloat),
              "pybitnet.half_matmul: weight must be 2-D bf16, fp16 or fp32");
  const int kind = wtype == at::kFloat ? kHeadFp32 : wtype == at::kHalf ? kHeadFp16 : kHeadBf16;
  TORCH_CHECK(h.size(1) == weight.size(1), "pybitnet.half_matmul: h has ", h.size(1), " columns, weight ",
              weight.size(1));
  const int64_t chosen = resolve_isa(isa);
  at::Tensor hc = h.contiguous(), wc = weight.contiguous();
  const int64_t M = hc.size(0), V = wc.size(0), H = hc.size(1);
  at::Tensor out = at::empty({M, V}, h.options());
  if (M == 0 || V == 0) return out;
  const HeadArgs a{hc.data_ptr<float>(), wc.data_ptr(), out.data_ptr<float>(), M, V, H};
  const at::Tensor hp = head_permuted_h(hc, kind, chosen);
  const float* hpd = hp.data_ptr<float>();
  at::parallel_for(0, V, 256, [&](int64_t v0, int64_t v1) {
    if (kind == kHeadFp32) head_range<kHeadFp32>(a, hpd, chosen, v0, v1);
    else if (kind == kHeadFp16) head_range<kHeadFp16>(a, hpd, chosen, v0, v1);
    else head_range<kHeadBf16>(a, hpd, chosen, v0, v1);
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// The int8 head: per-row int8 activations (quantize_rows without a norm) against a per-row int8
// copy of the head, exact int32 sums, logits = acc * (w_scale[v] / act_scale[m]) (head.py's formula
// and op order). vpdpbusd multiplies unsigned by signed bytes, so the activations go in offset by
// +128 and 128 * sum(w[v]) comes off again: every sum stays an exact integer.

struct Int8HeadArgs {
  const uint8_t* qu;      // (M, Hp) activations + 128, zero past H
  const int8_t* w;        // (V, H)
  const float* w_scale;   // (V,)
  const int32_t* w_sum;   // (V,)
  const float* act_scale; // (M,)
  float* out;             // (M, V)
  int64_t M, V, H, Hp;
};

inline void int8_head_store(const Int8HeadArgs& a, int64_t m, int64_t v, int32_t acc) {
  a.out[m * a.V + v] = float(acc - 128 * a.w_sum[v]) * (a.w_scale[v] / a.act_scale[m]);
}

void int8_head_scalar(const Int8HeadArgs& a, int64_t v0, int64_t v1) {
  for (int64_t v = v0; v < v1; ++v)
    for (int64_t m = 0; m < a.M; ++m) {
      int32_t acc = 0;
      for (int64_t i = 0; i < a.H; ++i) acc += int32_t(a.qu[m * a.Hp + i]) * int32_t(a.w[v * a.H + i]);
      int8_head_store(a, m, v, acc);
    }
}

#ifdef PYBITNET_X86
// VR vocabulary entries (v, v + rs, ...) x MT rows per tile; each (row, entry) sums in the same order
// whatever the tile, so VR and MT change speed only.
template <int MT, int VR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_head_tile_avx512(const Int8HeadArgs& a, int64_t v,
                                                                                   int64_t m0, int64_t rs) {
  const uint8_t* qu = a.qu + m0 * a.Hp;
  __m512i acc0[VR][MT], acc1[VR][MT];  // two chains per sum, so consecutive vpdpbusd do not wait on each other
  #pragma GCC unroll 8
  for (int r = 0; r < VR; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < MT; ++m) acc0[r][m] = acc1[r][m] = _mm512_setzero_si512();
  int64_t i = 0;
  for (; i + 128 <= a.H; i += 128) {
    #pragma GCC unroll 8
    for (int r = 0; r < VR; ++r) {
      const int8_t* w = a.w + (v + r * rs) * a.H;
      const __m512i w0 = _mm512_loadu_si512(w + i), w1 = _mm512_loadu_si512(w + i + 64);
      #pragma GCC unroll 8
      for (int m = 0; m < MT; ++m) {
        acc0[r][m] = _mm512_dpbusd_epi32(acc0[r][m], _mm512_loadu_si512(qu + m * a.Hp + i), w0);
        acc1[r][m] = _mm512_dpbusd_epi32(acc1[r][m], _mm512_loadu_si512(qu + m * a.Hp + i + 64), w1);
      }
    }
  }
  for (; i < a.H; i += 64) {  // the activations are zero past H; the weights are masked there
    const __mmask64 mask = a.H - i >= 64 ? ~__mmask64(0) : (__mmask64(1) << (a.H - i)) - 1;
    #pragma GCC unroll 8
    for (int r = 0; r < VR; ++r) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, a.w + (v + r * rs) * a.H + i);
      #pragma GCC unroll 8
      for (int m = 0; m < MT; ++m)
        acc0[r][m] = _mm512_dpbusd_epi32(acc0[r][m], _mm512_loadu_si512(qu + m * a.Hp + i), wv);
    }
  }
  #pragma GCC unroll 8
  for (int r = 0; r < VR; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < MT; ++m)
      int8_head_store(a, m0 + m, v + r * rs, _mm512_reduce_add_epi32(_mm512_add_epi32(acc0[r][m], acc1[r][m])));
}

// [v0, v1) read as VR sequential streams side by side: rows(VR, v, part) for the entries v, v + part, ...,
// v + (VR - 1) part, then rows(1, v, 1) for what is left over (VR is a std::integral_constant, so rows can
// pass it on as a template argument). Several streams keep more reads in flight than one, which a single
// core needs to approach memory speed.
template <int VR, typename Rows>
inline void in_streams(int64_t v0, int64_t v1, Rows rows) {
  const int64_t part = (v1 - v0) / VR;
  for (int64_t v = v0; v < v0 + part; ++v) rows(std::integral_constant<int, VR>{}, v, part);
  for (int64_t v = v0 + VR * part; v < v1; ++v) rows(std::integral_constant<int, 1>{}, v, int64_t(1));
}

template <int VR>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void int8_head_rows_avx512(const Int8HeadArgs& a, int64_t v,
                                                                                   int64_t rs) {
  for (int64_t m = 0; m < a.M; m += 8) {
    switch (std::min<int64_t>(8, a.M - m)) {
      case 1: int8_head_tile_avx512<1, VR>(a, v, m, rs); break;
      case 2: int8_head_tile_avx512<2, VR>(a, v, m, rs); break;
      case 3: int8_head_tile_avx512<3, VR>(a, v, m, rs); break;
      case 4: int8_head_tile_avx512<4, VR>(a, v, m, rs); break;
      case 5: int8_head_tile_avx512<5, VR>(a, v, m, rs); break;
      case 6: int8_head_tile_avx512<6, VR>(a, v, m, rs); break;
      case 7: int8_head_tile_avx512<7, VR>(a, v, m, rs); break;
      default: int8_head_tile_avx512<8, VR>(a, v, m, rs); break;
    }
  }
}
#endif

// Per-row int8 activations of an int8 head (quantize_rows without a norm): q (M, stride) int8, zero past
// H when stride > H, and act_scale (M,) float32
std::tuple<at::Tensor, at::Tensor> head_activations(const at::Tensor& h, int64_t stride, int64_t isa) {
  const int64_t M = h.size(0);
  at::Tensor q = at::zeros({M, stride}, h.options().dtype(at::kChar));
  at::Tensor act = at::empty({M}, h.options());
  QuantArgs qa;
  qa.x = h.data_ptr<float>();
  qa.M = M;
  qa.K = h.size(1);
  qa.q_stride = stride;
  qa.q = q.data_ptr<int8_t>();
  qa.act_scale = act.data_ptr<float>();
  quantize_rows_into(qa, isa);
  return {q, act};
}

at::Tensor int8_head(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& w_scale, const at::Tensor& w_sum,
                     int64_t isa) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.device().is_cpu(),
              "pybitnet.int8_head: h must be 2-D float32 on CPU");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == h.size(1),
              "pybitnet.int8_head: weight must be int8 (V, ", h.size(1), ")");
  const int64_t M = h.size(0), V = weight.size(0), H = h.size(1), Hp = (H + 63) / 64 * 64;
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == V && w_sum.scalar_type() == at::kInt &&
                  w_sum.numel() == V,
              "pybitnet.int8_head: w_scale (float32) and w_sum (int32) need one value per vocabulary row");
  const int64_t chosen = resolve_isa(isa);
  at::Tensor hc = h.contiguous(), wc = weight.contiguous(), sc = w_scale.contiguous(), uc = w_sum.contiguous();
  const auto [q, act] = head_activations(hc, Hp, chosen);
  uint8_t* qu = reinterpret_cast<uint8_t*>(q.data_ptr<int8_t>());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < H; ++i) qu[m * Hp + i] ^= 0x80;  // two's complement + 128 as unsigned
  at::Tensor out = at::empty({M, V}, h.options());
  if (M == 0 || V == 0) return out;
  const Int8HeadArgs a{qu, wc.data_ptr<int8_t>(), sc.data_ptr<float>(), uc.data_ptr<int32_t>(), act.data_ptr<float>(),
                       out.data_ptr<float>(), M, V, H, Hp};
  at::parallel_for(0, V, 256, [&](int64_t v0, int64_t v1) {
#ifdef PYBITNET_X86
    if (chosen == kAvx512) {  // two sequential sweeps of the weights
      in_streams<2>(v0, v1, [&](auto vr, int64_t v, int64_t rs) { int8_head_rows_avx512<decltype(vr)::value>(a, v, rs); });
      return;
    }
#endif
    int8_head_scalar(a, v0, v1);
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// Decode attention: one new token per row, attending over that row's own cache positions.
//   qkv (B, (Hq + 2 Hkv) * D) float32: each row's q | k | v projections
//   cos, sin (B or 1, D): RoPE at each row's position;  positions (B,) int64
//   keys, values (B, Hkv, L, D): one layer's cache, written in place at positions[b]
// q and k are rotated as layers.apply_rope does (x * cos + rotate_half(x) * sin, the same float32
// operations, so the keys written here equal the full path's), then out = softmax(q·Kᵀ * scale) V
// over positions [0, positions[b]]. Each (row, kv head) is one task in a fixed order: a row's output
// does not depend on the other rows of the batch or on their lengths.

inline void rope_row(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) {
    const float rotated = i < half ? -x[i + half] : x[i - half];
    out[i] = x[i] * cos[i] + rotated * sin[i];
  }
}

struct AttnArgs {
  const float* qkv;
  const float *cos, *sin;
  int64_t cos_stride;  // 0 when one RoPE row serves every batch row
  float *keys, *values;
  const int64_t* positions;
  float* out;
  int64_t B, Hq, Hkv, L, D;
  float scale;
};

// Scores s[0, S) of one query head -> exp(s - max(s)) in place; returns 1 / their sum.
inline float softmax_numerators(float* s, int64_t S) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < S; ++j) mx = std::max(mx, s[j]);
  float total = 0.f;
  for (int64_t j = 0; j < S; ++j) total += (s[j] = std::exp(s[j] - mx));
  return 1.0f / total;
}

// One kv head's attention: K, V (S, D) its cached keys and values, q (rep, D) the rotated queries of its group,
// out (rep, D) their outputs; scores is scratch of rep * S floats.
void attend_scalar(const AttnArgs& a, const float* K, const float* V, float* out, const float* q, int64_t rep,
                   int64_t S, float* scores) {
  for (int64_t r = 0; r < rep; ++r) {
    float* s = scores + r * S;
    for (int64_t j = 0; j < S; ++j) {
      float dot = 0.f;
      for (int64_t d = 0; d < a.D; ++d) dot += q[r * a.D + d] * K[j * a.D + d];
      s[j] = dot * a.scale;
    }
    const float inv = softmax_numerators(s, S);
    float* o = out + r * a.D;
    for (int64_t d = 0; d < a.D; ++d) o[d] = 0.f;
    for (int64_t j = 0; j < S; ++j)
      for (int64_t d = 0; d < a.D; ++d) o[d] += s[j] * V[j * a.D + d];
    for (int64_t d = 0; d < a.D; ++d) o[d] *= inv;
  }
}

#ifdef PYBITNET_X86
// exp(x) for x <= 0 (scores minus their max): Cephes' expf polynomial, 2^n applied with scalef.
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(y, n);
}

// Lane k of the result = the sum of the 16 lanes of v[k]: pairs within 128-bit lanes, then quads,
// then across the four 128-bit lanes (45 instructions for 16 sums, against 16 full reductions).
__attribute__((target("avx512f"))) inline __m512 sum16_avx512(const __m512* v) {
  __m512 t[8], u[4];
  #pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of a = v[2k], b = v[2k+1]
    t[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  #pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: the lane's sums of v[4k .. 4k+3]
    u[k] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * k], t[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// D a multiple of 16 (head dims of real models: 64, 128, ...). The pieces below are shared by attend_avx512 (one
// query position) and attend_group_avx512 (several positions of one kv head at once), so both compute every
// score, softmax and output element with the same operations in the same order.

// Raw scores q_r·k_j (unscaled) of keys [j0, j0 + 4) for heads [r0, r0 + 4): 16 lane-wise dot products, then one
// transposing sum. The K rows are loaded here; for several queries in a row they come from L1 after the first.
__attribute__((target("avx512f"))) inline void score_tile_avx512(const float* K, const float* q, int64_t D,
                                                                 int64_t j0, int64_t r0, float* scores, int64_t S) {
  __m512 acc[16];  // acc[4 r + jj]
  #pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    __m512 kv[4];
    #pragma GCC unroll 4
    for (int jj = 0; jj < 4; ++jj) kv[jj] = _mm512_loadu_ps(K + (j0 + jj) * D + d);
    #pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      const __m512 qv = _mm512_loadu_ps(q + (r0 + r) * D + d);
      #pragma GCC unroll 4
      for (int jj = 0; jj < 4; ++jj) acc[4 * r + jj] = _mm512_fmadd_ps(qv, kv[jj], acc[4 * r + jj]);
    }
  }
  const __m512 sums = sum16_avx512(acc);  // lanes 4r .. 4r+3: head r0 + r, keys j0 .. j0+3
  #pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) {
    alignas(16) float lane[4];
    _mm_store_ps(lane, r == 0 ? _mm512_extractf32x4_ps(sums, 0) : r == 1 ? _mm512_extractf32x4_ps(sums, 1)
                           : r == 2 ? _mm512_extractf32x4_ps(sums, 2) : _mm512_extractf32x4_ps(sums, 3));
    std::memcpy(scores + (r0 + r) * S + j0, lane, sizeof(lane));
  }
}

// Where the tiles of a query over S keys end: keys below it are scored in tiles, the rest one at a time.
inline int64_t tiled_keys(int64_t rep, int64_t S) { return rep % 4 == 0 ? S / 4 * 4 : 0; }

// Raw scores of one key j for every head, one dot product at a time.
__attribute__((target("avx512f"))) inline void score_key_avx512(const float* K, const float* q, int64_t D, int64_t rep,
                                                                int64_t j, float* scores, int64_t S) {
  const float* k = K + j * D;
  for (int64_t r = 0; r < rep; ++r) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * D + d), _mm512_loadu_ps(k + d), acc);
    scores[r * S + j] = _mm512_reduce_add_ps(acc);
  }
}

// Scores (rep, S) -> exp(scale * s - max) in place; inv[r] = 1 / the sum of head r's numerators.
__attribute__((target("avx512f"))) inline void softmax_avx512(float scale, int64_t rep, int64_t S, float* scores,
                                                              float* inv) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t r = 0; r < rep; ++r) {
    float* s = scores + r * S;
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= S; j += 16) mx = _mm512_max_ps(mx, _mm512_mul_ps(_mm512_loadu_ps(s + j), vscale));
    float m = _mm512_reduce_max_ps(mx);
    for (; j < S; ++j) m = std::max(m, s[j] * scale);
    const __m512 vm = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (j = 0; j + 16 <= S; j += 16) {
      const __m512 e = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(s + j), vscale), vm));
      _mm512_storeu_ps(s + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (j < S) {
      const __mmask16 mask = __mmask16((1u << (S - j)) - 1);
      const __m512 e = exp_nonpositive_avx512(
          _mm512_sub_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, s + j), vscale), vm));
      _mm512_mask_storeu_ps(s + j, mask, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    inv[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}

__attribute__((target("avx512f"))) void attend_avx512(const AttnArgs& a, const float* K, const float* V, float* out,
                                                       const float* q, int64_t rep, int64_t S, float* scores) {
  const int64_t tiled = tiled_keys(rep, S);
  for (int64_t j0 = 0; j0 < tiled; j0 += 4)
    for (int64_t r0 = 0; r0 < rep; r0 += 4) score_tile_avx512(K, q, a.D, j0, r0, scores, S);
  for (int64_t j = tiled; j < S; ++j) score_key_avx512(K, q, a.D, rep, j, scores, S);  // the last keys one at a time
  float inv[64];
  softmax_avx512(a.scale, rep, S, scores, inv);
  // out = P V: each 16-wide slice of a value row is loaded once for up to 8 query heads of the group
  for (int64_t r0 = 0; r0 < rep; r0 += 8) {
    const int64_t nr = std::min<int64_t>(8, rep - r0);
    for (int64_t d = 0; d < a.D; d += 16) {
      __m512 acc[8];
      for (int64_t r = 0; r < nr; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t j = 0; j < S; ++j) {
        const __m512 v = _mm512_loadu_ps(V + j * a.D + d);
        for (int64_t r = 0; r < nr; ++r)
          acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(r0 + r) * S + j]), v, acc[r]);
      }
      for (int64_t r = 0; r < nr; ++r)
        _mm512_storeu_ps(out + (r0 + r) * a.D + d, _mm512_mul_ps(acc[r], _mm512_set1_ps(inv[r0 + r])));
    }
  }
}

// attend_avx512 for G <= 4 consecutive query positions of one kv head (S[g] = S[0] + g keys, rep <= 4): the
// same scores, softmax and P·V accumulation per query and element, in the same order, so the same bits; each K
// tile and V slice is loaded once for all G queries instead of once per query, which is what prefill over a
// long cache is bound by.
constexpr int64_t kGroup = 4;

__attribute__((target("avx512f"))) void attend_group_avx512(const AttnArgs& a, const float* K, const float* V,
                                                             float* const* outs, const float* const* qs, int64_t rep,
                                                             const int64_t* S, int64_t G, float* const* scores) {
  int64_t tiled[kGroup];
  for (int64_t g = 0; g < G; ++g) tiled[g] = tiled_keys(rep, S[g]);
  for (int64_t j0 = 0; j0 < tiled[G - 1]; j0 += 4)
    for (int64_t g = 0; g < G; ++g)
      if (j0 < tiled[g])
        for (int64_t r0 = 0; r0 < rep; r0 += 4) score_tile_avx512(K, qs[g], a.D, j0, r0, scores[g], S[g]);
  float inv[kGroup][4];
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t j = tiled[g]; j < S[g]; ++j) score_key_avx512(K, qs[g], a.D, rep, j, scores[g], S[g]);
    softmax_avx512(a.scale, rep, S[g], scores[g], inv[g]);
  }
  for (int64_t d = 0; d < a.D; d += 16) {
    __m512 acc[kGroup][4];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < rep; ++r) acc[g][r] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j < S[0]; ++j) {  // keys every query of the group sees
      const __m512 v = _mm512_loadu_ps(V + j * a.D + d);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t r = 0; r < rep; ++r)
          acc[g][r] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g][r * S[g] + j]), v, acc[g][r]);
    }
    for (int64_t g = 1; g < G; ++g)  // then each query's own last keys, still in key order
      for (int64_t jj = j; jj < S[g]; ++jj) {
        const __m512 v = _mm512_loadu_ps(V + jj * a.D + d);
        for (int64_t r = 0; r < rep; ++r)
          acc[g][r] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g][r * S[g] + jj]), v, acc[g][r]);
      }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t r = 0; r < rep; ++r)
        _mm512_storeu_ps(outs[g] + r * a.D + d, _mm512_mul_ps(acc[g][r], _mm512_set1_ps(inv[g][r])));
  }
}
#endif

#ifdef PYBITNET_X86
// AVX2, D a multiple of 8: eight-lane dot products and P·V, the softmax's exp in scalar code.
__attribute__((target("avx2,fma"))) void attend_avx2(const AttnArgs& a, const float* K, const float* V, float* out,
                                                     const float* q, int64_t rep, int64_t S, float* scores) {
  for (int64_t j = 0; j < S; ++j)
    for (int64_t r = 0; r < rep; ++r) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < a.D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * a.D + d), _mm256_loadu_ps(K + j * a.D + d), acc);
      scores[r * S + j] = hsum_ps_avx2(acc) * a.scale;
    }
  float inv[64];
  for (int64_t r = 0; r < rep; ++r) inv[r] = softmax_numerators(scores + r * S, S);
  for (int64_t r0 = 0; r0 < rep; r0 += 8) {  // each 8-wide slice of a value row loaded once for 8 heads
    const int64_t nr = std::min<int64_t>(8, rep - r0);
    for (int64_t d = 0; d < a.D; d += 8) {
      __m256 acc[8];
      for (int64_t r = 0; r < nr; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t j = 0; j < S; ++j) {
        const __m256 v = _mm256_loadu_ps(V + j * a.D + d);
        for (int64_t r = 0; r < nr; ++r)
          acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(scores[(r0 + r) * S + j]), v, acc[r]);
      }
      for (int64_t r = 0; r < nr; ++r)
        _mm256_storeu_ps(out + (r0 + r) * a.D + d,
                         _mm256_mul_ps(acc[r], _mm256_set1_ps(inv[r0 + r])));
    }
  }
}
#endif

// One kv head group's attention over S cached positions, on the widest body the ISA and D allow.
inline void attend(const AttnArgs& a, int64_t chosen, const float* K, const float* V, float* out, const float* q,
                   int64_t rep, int64_t S, float* scores) {
#ifdef PYBITNET_X86
  if (chosen == kAvx512 && a.D % 16 == 0) return attend_avx512(a, K, V, out, q, rep, S, scores);
  if (chosen == kAvx2 && a.D % 8 == 0) return attend_avx2(a, K, V, out, q, rep, S, scores);
#endif
  attend_scalar(a, K, V, out, q, rep, S, scores);
}

void check_attention_cache(const at::Tensor& keys, const at::Tensor& values, int64_t num_heads, int64_t num_kv_heads,
                           const char* op) {
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes() && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat && keys.is_contiguous() && values.is_contiguous() &&
                  keys.device().is_cpu() && values.device().is_cpu(),
              "pybitnet.", op, ": keys and values must be contiguous float32 (B, Hkv, L, D) CPU tensors");
  const int64_t Hkv = keys.size(1), D = keys.size(3);
  TORCH_CHECK(num_kv_heads == Hkv && num_kv_heads > 0 && num_heads % Hkv == 0 && num_heads / Hkv <= 64 && D % 2 == 0,
              "pybitnet.", op, ": ", num_heads, " query heads do not group over ", Hkv, " kv heads of dim ", D);
}

at::Tensor attention_decode(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor keys,
                            at::Tensor values, const at::Tensor& positions, int64_t num_heads, int64_t num_kv_heads,
                            double scale, int64_t isa) {
  check_attention_cache(keys, values, num_heads, num_kv_heads, "attention_decode");
  const int64_t B = keys.size(0), Hkv = keys.size(1), L = keys.size(2), D = keys.size(3);
  TORCH_CHECK(qkv.dim() == 2 && qkv.scalar_type() == at::kFloat && qkv.size(0) == B &&
                  qkv.size(1) == (num_heads + 2 * Hkv) * D,
              "pybitnet.attention_decode: qkv must be float32 (", B, ", ", (num_heads + 2 * Hkv) * D, "), got ",
              qkv.sizes());
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(1) == D && (cos.size(0) == B || cos.size(0) == 1) &&
                  cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "pybitnet.attention_decode: cos/sin must be float32 (B or 1, ", D, ")");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == B && positions.scalar_type() == at::kLong,
              "pybitnet.attention_decode: positions must be int64 (", B, ",)");
  at::Tensor qc = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous(), pc = positions.contiguous();
  const int64_t* pos = pc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < L, "pybitnet.attention_decode: position ", pos[b], " of row ", b,
                " is outside the cache's ", L, " positions");
  const int64_t chosen = resolve_isa(isa);
  at::Tensor out = at::empty({B, num_heads * D}, qkv.options());
  const AttnArgs a{qc.data_ptr<float>(), cc.data_ptr<float>(), sc.data_ptr<float>(), cc.size(0) == 1 ? 0 : D,
                   keys.data_ptr<float>(), values.data_ptr<float>(), pos, out.data_ptr<float>(),
                   B, num_heads, Hkv, L, D, float(scale)};
  const int64_t rep = num_heads / Hkv, width = (num_heads + 2 * Hkv) * D;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> q(rep * D), scores;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / Hkv, h = t % Hkv, S = pos[b] + 1;
      const float* row = a.qkv + b * width;
      const float* c = a.cos + b * a.cos_stride;
      const float* s = a.sin + b * a.cos_stride;
      float* K = a.keys + (b * Hkv + h) * L * D;
      float* V = a.values + (b * Hkv + h) * L * D;
      rope_row(row + (num_heads + h) * D, c, s, K + pos[b] * D, D);
      std::memcpy(V + pos[b] * D, row + (num_heads + Hkv + h) * D, D * sizeof(float));
      for (int64_t r = 0; r < rep; ++r) rope_row(row + (h * rep + r) * D, c, s, q.data() + r * D, D);
      scores.resize(rep * S);
      attend(a, chosen, K, V, a.out + b * num_heads * D + h * rep * D, q.data(), rep, S, scores.data());
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// Causal attention for T new tokens per row, as T decode steps would compute it.
//   qkv (B, T, (Hq + 2 Hkv) * D) float32;  cos, sin (T or B * T, D): RoPE at each token's position
//   starts (B,) int64: row b's tokens sit at positions starts[b] .. starts[b] + T - 1
//   keys, values (B, Hkv, L, D): one layer's cache, written in place at those positions
// Every token's K/V are written first; then the query at position p attends over [0, p] through the
// same code, and in the same float order, as attention_decode at position p. So a query's output does
// not depend on how the sequence was split into calls (one pass, chunks, or one token at a time):
// prefilling a prompt in pieces, or after a cached prefix, gives the bits of one pass.
at::Tensor attention_prefill(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor keys,
                             at::Tensor values, const at::Tensor& starts, int64_t num_heads, int64_t num_kv_heads,
                             double scale, int64_t isa) {
  check_attention_cache(keys, values, num_heads, num_kv_heads, "attention_prefill");
  const int64_t B = keys.size(0), Hkv = keys.size(1), L = keys.size(2), D = keys.size(3);
  const int64_t width = (num_heads + 2 * Hkv) * D;
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat && qkv.size(0) == B && qkv.size(2) == width,
              "pybitnet.attention_prefill: qkv must be float32 (", B, ", T, ", width, "), got ", qkv.sizes());
  const int64_t T = qkv.size(1);
  TORCH_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes() && cos.size(1) == D &&
                  (cos.size(0) == T || cos.size(0) == B * T) && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "pybitnet.attention_prefill: cos/sin must be float32 (T or B * T, ", D, ")");
  TORCH_CHECK(starts.dim() == 1 && starts.size(0) == B && starts.scalar_type() == at::kLong,
              "pybitnet.attention_prefill: starts must be int64 (", B, ",)");
  at::Tensor qc = qkv.contiguous(), cc = cos.contiguous(), sc = sin.contiguous(), pc = starts.contiguous();
  const int64_t* start = pc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(start[b] >= 0 && start[b] + T <= L, "pybitnet.attention_prefill: positions ", start[b], "..",
                start[b] + T - 1, " of row ", b, " are outside the cache's ", L, " positions");
  const int64_t chosen = resolve_isa(isa);
  at::Tensor out = at::empty({B, T, num_heads * D}, qkv.options());
  const AttnArgs a{qc.data_ptr<float>(), cc.data_ptr<float>(), sc.data_ptr<float>(), cc.size(0) == T ? 0 : T * D,
                   keys.data_ptr<float>(), values.data_ptr<float>(), start, out.data_ptr<float>(),
                   B, num_heads, Hkv, L, D, float(scale)};
  const int64_t rep = num_heads / Hkv;
  auto rope_at = [&](int64_t b, int64_t t, const float*& c, const float*& s) {
    c = a.cos + b * a.cos_stride + t * D;
    s = a.sin + b * a.cos_stride + t * D;
  };
  at::parallel_for(0, B * T, 1, [&](int64_t i0, int64_t i1) {  // keys and values of every new token
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / T, t = i % T, p = start[b] + t;
      const float* row = a.qkv + i * width;
      const float *c, *s;
      rope_at(b, t, c, s);
      for (int64_t h = 0; h < Hkv; ++h) {
        rope_row(row + (num_heads + h) * D, c, s, a.keys + ((b * Hkv + h) * L + p) * D, D);
        std::memcpy(a.values + ((b * Hkv + h) * L + p) * D, row + (num_heads + Hkv + h) * D, D * sizeof(float));
      }
    }
  });
  // Tasks (b, h, group of up to kGroup positions) with positions fastest: each thread's contiguous range mixes
  // short and long key spans. The AVX-512 body takes a group's queries together (attend_group_avx512: the
  // same bits as one at a time); the others take them one by one.
#ifdef PYBITNET_X86
  const int64_t group = (chosen == kAvx512 && D % 16 == 0 && rep <= 4) ? kGroup : 1;
#else
  const int64_t group = 1;
#endif
  const int64_t groups = (T + group - 1) / group;
  at::parallel_for(0, B * Hkv * groups, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> q(kGroup * rep * D);
    std::vector<float> scores[kGroup];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t t0 = (i % groups) * group, h = (i / groups) % Hkv, b = i / (groups * Hkv);
      const int64_t G = std::min(group, T - t0);
      const float* K = a.keys + (b * Hkv + h) * L * D;
      const float* V = a.values + (b * Hkv + h) * L * D;
      int64_t S[kGroup];
      const float* qs[kGroup];
      float* outs[kGroup];
      float* sp[kGroup];
      for (int64_t g = 0; g < G; ++g) {
        const int64_t t = t0 + g;
        const float* row = a.qkv + (b * T + t) * width;
        const float *c, *s;
        rope_at(b, t, c, s);
        float* qg = q.data() + g * rep * D;
        for (int64_t r = 0; r < rep; ++r) rope_row(row + (h * rep + r) * D, c, s, qg + r * D, D);
        S[g] = start[b] + t + 1;
        scores[g].resize(rep * S[g]);
        qs[g] = qg;
        sp[g] = scores[g].data();
        outs[g] = a.out + (b * T + t) * num_heads * D + h * rep * D;
      }
#ifdef PYBITNET_X86
      if (group > 1) {
        attend_group_avx512(a, K, V, outs, qs, rep, S, G, sp);
        continue;
      }
#endif
      attend(a, chosen, K, V, outs[0], qs[0], rep, S[0], sp[0]);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// The decode step of a stack of relu² BitNet blocks, float32, one token per row, in one op: the
// calls and float32 operations of layers.Block.forward on the native path, so a step pays Python's
// and the dispatcher's per-call cost once rather than for some twenty Python calls (five of them
// native ops) per layer. Per layer:
//   mid = h + o_proj(attn_sub_norm(attention(qkv(attn_norm(h)))))
//   h   = mid + down(ffn_sub_norm(relu(g)² · u · factor)),  [g | u] = gate_up(ffn_norm(mid)) as int32
// with factor = (β_g/s)² · (β_u/s) per row (FeedForward._activate's operations), s the gate/up
// activation scale. `weights` holds kLayerTensors per layer in the order of kLayerTensorNames (sub
// norms may be None), `betas` (β_g, β_u) per layer; keys/values are each layer's cache, written in place.
constexpr int64_t kLayerTensors = 11;
constexpr const char* kLayerTensorNames[kLayerTensors] = {
    "attn_norm", "qkv", "qkv column scale", "attn_sub_norm", "o_proj", "o_proj column scale",
    "ffn_norm", "gate_up", "ffn_sub_norm", "down", "down column scale"};

at::Tensor decode_stack(const at::Tensor& h, const c10::List<c10::optional<at::Tensor>>& weights,
                        c10::ArrayRef<double> betas, double eps, const at::Tensor& cos, const at::Tensor& sin,
                        at::TensorList keys, at::TensorList values, const at::Tensor& positions, int64_t num_heads,
                        int64_t num_kv_heads, double scale, int64_t isa) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat, "pybitnet.decode_stack: h must be float32 (B, H)");
  const int64_t layers = int64_t(keys.size());
  TORCH_CHECK(layers > 0 && int64_t(values.size()) == layers && int64_t(weights.size()) == kLayerTensors * layers &&
                  int64_t(betas.size()) == 2 * layers,
              "pybitnet.decode_stack: need at least one layer and, per layer, ", kLayerTensors,
              " weights, 2 betas and one key and one value cache; got ", weights.size(), " weights, ", betas.size(),
              " betas, ", keys.size(), " key and ", values.size(), " value caches");
  auto required = [&](int64_t i) -> at::Tensor {
    const c10::optional<at::Tensor> t = weights.get(i);
    TORCH_CHECK(t.has_value() && t->defined(), "pybitnet.decode_stack: ", kLayerTensorNames[i % kLayerTensors],
                " of layer ", i / kLayerTensors, " is missing");
    return *t;
  };
  const int64_t M = h.size(0);
  at::Tensor x = h;
  for (int64_t l = 0; l < layers; ++l) {
    const int64_t w = l * kLayerTensors;
    // attn_norm, qkv, qkv β per column, attn_sub_norm?, o_proj, o β, ffn_norm, gate_up, ffn_sub_norm?, down, down β
    const at::Tensor qkv = std::get<0>(ternary_linear(x, required(w), c10::nullopt, eps, required(w + 1),
                                                      required(w + 2), isa));
    const at::Tensor attended = attention_decode(qkv, cos, sin, keys[l], values[l], positions, num_heads,
                                                 num_kv_heads, scale, isa);
    const at::Tensor o = std::get<0>(ternary_linear(attended, weights.get(w + 3), c10::nullopt, eps, required(w + 4),
                                                    required(w + 5), isa));
    at::Tensor mid = x.add(o);
    const auto [acc, act_scale] = ternary_linear(mid, required(w + 6), c10::nullopt, eps, required(w + 7),
                                                 c10::nullopt, isa);
    at::Tensor factor = at::empty({M}, h.options());
    const float* s = act_scale.data_ptr<float>();
    float* f = factor.data_ptr<float>();
    const float bg = float(betas[2 * l]), bu = float(betas[2 * l + 1]);  // torch scales float32 rows by float32(β)
    for (int64_t m = 0; m < M; ++m) {
      const float inv = 1.0f / s[m];
      const float g = inv * bg;
      f[m] = (g * g) * (inv * bu);
    }
    const at::Tensor y = std::get<0>(ternary_linear(acc, weights.get(w + 8), factor, eps, required(w + 9),
                                                    required(w + 10), isa));
    x = mid.add_(y);
  }
  return x;
}

// ------------------------------------------------------------------------------------------
// A ggml Q8_0, Q6_K, Q5_K, Q4_K or Q4_0 table (token_embd / output kept as stored) x fp32 rows -> fp32 (the
// lm_head). Each vocabulary entry's row of blocks is dequantized once per call into the float32 values ggml's
// dequantize_row_* give (Q8_0, Q4_0: d * q; Q6_K: (d * scale) * (code - 32); Q4_K, Q5_K: (d * sc) * code -
// dmin * m, the one rounding in the difference), then every activation row takes its dot product with them in
// one fixed order, the same in every body and batch size: element j of the row goes into partial sum j % 64 by
// an fp32 FMA, in order of j; then the 64 partials halve pairwise (k += k + s for s = 32, 16, 8, 4, 2, 1).
// Scalar, AVX2 and AVX-512 bodies therefore give the same bits, and a row's logits do not depend on its
// neighbours. One row of activations is bound by arithmetic, not by memory: every value is widened,
// scaled and multiplied (three vector operations per 16 values beside the FMA), where a 16-bit head only
// converts; the figures are in BENCHMARKS.md.

enum QuantKind : int64_t { kQ8_0 = 0, kQ6_K = 1, kQ4_K = 2, kQ5_K = 3, kQ4_0 = 4 };

// elements and bytes of one block
inline int64_t quant_block_elements(int64_t kind) { return kind == kQ8_0 || kind == kQ4_0 ? 32 : 256; }
inline int64_t quant_block_bytes(int64_t kind) {
  switch (kind) {
    case kQ8_0: return 34;
    case kQ6_K: return 210;
    case kQ4_K: return 144;
    case kQ5_K: return 176;
    default: return 18;  // kQ4_0
  }
}
inline int64_t quant_row_bytes(int64_t kind, int64_t H) { return H / quant_block_elements(kind) * quant_block_bytes(kind); }

// step = d * sc and low = dmin * m of the 8 sub-blocks of a Q4_K super-block (both products exact)
inline void q4_k_steps(const uint8_t* blk, float* step, float* low) {
  const float d = fp16_at(blk);
  const float dmin = fp16_at(blk + 2);
  const uint8_t* sc = blk + 4;
  for (int s = 0; s < 8; ++s) {
    const int scale = s < 4 ? sc[s] & 63 : (sc[s + 4] & 15) | ((sc[s - 4] >> 6) << 4);
    const int min = s < 4 ? sc[s + 4] & 63 : (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    step[s] = d * float(scale);
    low[s] = dmin * float(min);
  }
}

// one Q4_K super-block (144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 of codes) -> 256
// values (d * sc) * code - (dmin * m), ggml's dequantize_row_q4_K: both products exact, one rounding
inline void q4_k_block(const uint8_t* blk, float* y) {
  float step[8], low[8];
  q4_k_steps(blk, step, low);
  const uint8_t* qs = blk + 16;
  for (int s = 0; s < 8; ++s) {
    const uint8_t* q = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int l = 0; l < 32; ++l) y[32 * s + l] = step[s] * float((q[l] >> shift) & 15) - low[s];
  }
}

// one Q5_K super-block (176 bytes: f16 d, f16 dmin, the 12 scale bytes of Q4_K, qh[32], qs[128]) -> 256 values
// (d * sc) * code - (dmin * m) with a 5-bit code: element 64j + 32t + l has the low bits
// (qs[32j + l] >> 4t) & 15 and bit 4 from (qh[l] >> (2j + t)) & 1 (ggml's dequantize_row_q5_K); both products
// exact, one rounding
inline void q5_k_block(const uint8_t* blk, float* y) {
  float step[8], low[8];
  q4_k_steps(blk, step, low);
  const uint8_t* qh = blk + 16;
  const uint8_t* qs = blk + 48;
  for (int s = 0; s < 8; ++s) {
    const int j = s / 2, t = s % 2;
    for (int l = 0; l < 32; ++l) {
      const int code = ((qs[32 * j + l] >> (4 * t)) & 15) | (((qh[l] >> s) & 1) << 4);
      y[32 * s + l] = step[s] * float(code) - low[s];
    }
  }
}

__attribute__((always_inline)) inline void quant_dequant_row_body(const uint8_t* row, int64_t kind, int64_t H,
                                                                   float* out) {
  if (kind == kQ8_0) {
    for (int64_t b = 0; b < H / 32; ++b) {
      const uint8_t* blk = row + b * 34;
      const float d = fp16_at(blk);
      const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
      float* y = out + b * 32;
      for (int j = 0; j < 32; ++j) y[j] = d * float(q[j]);
    }
    return;
  }
  if (kind == kQ4_K) {
    for (int64_t b = 0; b < H / 256; ++b) q4_k_block(row + b * 144, out + b * 256);
    return;
  }
  if (kind == kQ5_K) {
    for (int64_t b = 0; b < H / 256; ++b) q5_k_block(row + b * 176, out + b * 256);
    return;
  }
  if (kind == kQ4_0) {
    for (int64_t b = 0; b < H / 32; ++b) {
      const uint8_t* blk = row + b * 18;
      const float d = fp16_at(blk);
      float* y = out + b * 32;
      for (int l = 0; l < 16; ++l) {
        y[l] = d * float((blk[2 + l] & 15) - 8);
        y[l + 16] = d * float((blk[2 + l] >> 4) - 8);
      }
    }
    return;
  }
  for (int64_t b = 0; b < H / 256; ++b) {
    const uint8_t* blk = row + b * 210;
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = fp16_at(blk + 208);
    float* y = out + b * 256;
    for (int h = 0; h < 2; ++h)
      for (int k = 0; k < 4; ++k) {
        const uint8_t* lo = ql + 64 * h + 32 * (k & 1);
        const uint8_t* hi = qh + 32 * h;
        const int lo_shift = 4 * (k >> 1), hi_shift = 2 * k;
        for (int half = 0; half < 2; ++half) {
          const float step = d * float(sc[8 * h + 2 * k + half]);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int code = ((lo[l] >> lo_shift) & 15) | (((hi[l] >> hi_shift) & 3) << 4);
            y[128 * h + 32 * k + l] = step * float(code - 32);
          }
        }
      }
  }
}

void quant_dequant_row_scalar(const uint8_t* row, int64_t kind, int64_t H, float* out) {
  quant_dequant_row_body(row, kind, H, out);
}

inline float quant_halve(float* acc, int width) {
  for (int s = width / 2; s >= 1; s /= 2)
    for (int k = 0; k < s; ++k) acc[k] = acc[k] + acc[k + s];
  return acc[0];
}

float quant_dot_scalar(const float* h, const float* w, int64_t H) {
  float acc[64] = {0.f};
  for (int64_t j = 0; j < H; ++j) acc[j & 63] = std::fma(h[j], w[j], acc[j & 63]);
  return quant_halve(acc, 64);
}

#ifdef PYBITNET_X86
// 32 codes of a Q6_K block (k-th quarter of half h) as unsigned bytes 0..63, minus 32
__attribute__((target("avx2"))) inline __m256i q6_codes_avx2(const uint8_t* ql, const uint8_t* qh, int h, int k) {
  const __m256i nibble = _mm256_set1_epi8(15), two = _mm256_set1_epi8(3);
  __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h + 32 * (k & 1)));
  if (k >> 1) lo = _mm256_srli_epi16(lo, 4);
  lo = _mm256_and_si256(lo, nibble);
  __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h));
  hi = _mm256_and_si256(_mm256_srli_epi16(hi, 2 * k), two);  // shifts of 16-bit lanes: masked per byte after
  hi = _mm256_slli_epi16(hi, 4);                               // bytes <= 3 << 4: no carry between bytes
  return _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
}

// The same values as quant_dequant_row_body (each a product of two floats, rounded once), 8 at a time.
__attribute__((target("avx2,fma,f16c"))) void quant_dequant_row_avx2(const uint8_t* row, int64_t kind, int64_t H,
                                                                     float* out) {
  if (kind == kQ5_K || kind == kQ4_0) {  // the scalar body's values (no AVX2 unpacking of these two)
    quant_dequant_row_body(row, kind, H, out);
    return;
  }
  if (kind == kQ4_K) {
    for (int64_t b = 0; b < H / 256; ++b) {
      const uint8_t* blk = row + b * 144;
      float step[8], low[8];
      q4_k_steps(blk, step, low);
      for (int j = 0; j < 4; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * j));
        for (int t = 0; t < 2; ++t) {
          const __m256i q = _mm256_and_si256(t ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(15));
          const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
          const __m256 st = _mm256_set1_ps(step[2 * j + t]), lo = _mm256_set1_ps(low[2 * j + t]);
          float* y = out + b * 256 + 64 * j + 32 * t;
          auto put = [&](float* at, __m128i bytes) __attribute__((target("avx2"))) {
            _mm256_storeu_ps(at, _mm256_sub_ps(_mm256_mul_ps(st, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))), lo));
          };
          put(y, q0);
          put(y + 8, _mm_srli_si128(q0, 8));
          put(y + 16, q1);
          put(y + 24, _mm_srli_si128(q1, 8));
        }
      }
    }
    return;
  }
  if (kind == kQ8_0) {
    for (int64_t b = 0; b < H / 32; ++b) {
      const uint8_t* blk = row + b * 34;
      const __m256 d = _mm256_set1_ps(fp16_at(blk));
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
      float* y = out + b * 32;
      _mm256_storeu_ps(y, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0))));
      _mm256_storeu_ps(y + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)))));
      _mm256_storeu_ps(y + 16, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1))));
      _mm256_storeu_ps(y + 24, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)))));
    }
    return;
  }
  for (int64_t b = 0; b < H / 256; ++b) {
    const uint8_t* blk = row + b * 210;
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    const float d = fp16_at(blk + 208);
    float* y = out + b * 256;
    for (int h = 0; h < 2; ++h)
      #pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) {
        const __m256i q = q6_codes_avx2(blk, blk + 128, h, k);
        const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
        const __m256 s0 = _mm256_set1_ps(d * float(sc[8 * h + 2 * k])), s1 = _mm256_set1_ps(d * float(sc[8 * h + 2 * k + 1]));
        float* yk = y + 128 * h + 32 * k;
        _mm256_storeu_ps(yk, _mm256_mul_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0))));
        _mm256_storeu_ps(yk + 8, _mm256_mul_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8)))));
        _mm256_storeu_ps(yk + 16, _mm256_mul_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1))));
        _mm256_storeu_ps(yk + 24, _mm256_mul_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8)))));
      }
  }
}

// partial r*8 + lane in register r; H a multiple of 32
__attribute__((target("avx2,fma"))) float quant_dot_avx2(const float* h, const float* w, int64_t H) {
  __m256 a[8];
  #pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) a[r] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 64 <= H; j += 64) {
    #pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(h + j + 8 * r), _mm256_loadu_ps(w + j + 8 * r), a[r]);
  }
  if (j < H) {  // the last 32 elements: partials 0-31
    #pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(h + j + 8 * r), _mm256_loadu_ps(w + j + 8 * r), a[r]);
  }
  #pragma GCC unroll 4
  for (int r = 0; r < 4; ++r) a[r] = _mm256_add_ps(a[r], a[r + 4]);  // s = 32
  a[0] = _mm256_add_ps(a[0], a[2]);                                  // s = 16
  a[1] = _mm256_add_ps(a[1], a[3]);
  a[0] = _mm256_add_ps(a[0], a[1]);  // s = 8
  float acc[8];
  _mm256_storeu_ps(acc, a[0]);
  return quant_halve(acc, 8);
}

// AVX-512, dequantization fused with the dot products of MT rows: each group of 16 values goes
// straight from the blocks into the FMAs of every row, register (j / 16) mod 4 for element j, so each
// row gets exactly quant_dot_scalar's sequence of operations on the same values (the same bits); the
// values are never stored. One vocabulary entry's bytes stream by at a time, so the next entry's are
// prefetched kQuantPrefetch bytes ahead (one core alone does not keep enough reads in flight to reach
// the memory's bandwidth); codes are unpacked 64 at a time into a small buffer and widened from there.
constexpr int64_t kQuantPrefetch = 2048;

// fp16_at with the F16C conversion (the same value)
__attribute__((always_inline, target("f16c"))) inline float f16_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

// q4_k_steps without branches: the 12 scale bytes as three little-endian words a, b, c hold
// sc[0..3] = a & 63, sc[4..7] = (c & 15) | (a >> 6) << 4, m[0..3] = b & 63, m[4..7] = (c >> 4) | (b >> 6) << 4,
// byte by byte; the same exact products d * sc and dmin * m, 8 at a time (low negated for an FMA)
__attribute__((target("avx2,fma,f16c"))) inline void q4_k_steps_avx2(const uint8_t* blk, float* step, float* neg_low) {
  uint32_t a, b, c;
  std::memcpy(&a, blk + 4, 4);
  std::memcpy(&b, blk + 8, 4);
  std::memcpy(&c, blk + 12, 4);
  const uint64_t sc = uint64_t(a & 0x3F3F3F3Fu) | uint64_t((c & 0x0F0F0F0Fu) | ((a >> 2) & 0x30303030u)) << 32;
  const uint64_t mn = uint64_t(b & 0x3F3F3F3Fu) | uint64_t(((c >> 4) & 0x0F0F0F0Fu) | ((b >> 2) & 0x30303030u)) << 32;
  const __m256 d = _mm256_set1_ps(f16_at(blk));
  const __m256 dmin = _mm256_set1_ps(f16_at(blk + 2));
  const __m256 scf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(sc))));
  const __m256 mf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(mn))));
  _mm256_storeu_ps(step, _mm256_mul_ps(d, scf));
  _mm256_storeu_ps(neg_low, _mm256_xor_ps(_mm256_mul_ps(dmin, mf), _mm256_set1_ps(-0.0f)));
}

// The 128 codes 0..63 of half hh of a Q6_K super-block, in element order: ql's low nibbles are quarters
// k = 0, 1, its high nibbles k = 2, 3; qh's bit pairs 0-1, 2-3, 4-5, 6-7 are bits 4-5 of k = 0, 1, 2, 3.
// With qh2 = [qh, qh >> 2], bits 4-5 of qh2 are those of k = 2, 3 and bits 4-5 of qh2 << 4 those of
// k = 0, 1 (16-bit shifts; every byte masked after). c01 holds k = 0, 1, c23 k = 2, 3.
__attribute__((target("avx512f,avx512bw,avx2"))) inline void q6_k_codes_avx512(const uint8_t* blk, int hh, __m512i& c01,
                                                                               __m512i& c23) {
  const __m512i ql = _mm512_loadu_si512(blk + 64 * hh);
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * hh));
  const __m512i qh2 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
  const __m512i bits45 = _mm512_set1_epi8(0x30), nibble = _mm512_set1_epi8(15);
  // 0xCA: nibble ? first : second, bit by bit
  c01 = _mm512_ternarylogic_epi32(nibble, ql, _mm512_and_si512(_mm512_slli_epi16(qh2, 4), bits45), 0xCA);
  c23 = _mm512_ternarylogic_epi32(nibble, _mm512_srli_epi16(ql, 4), _mm512_and_si512(qh2, bits45), 0xCA);
}

// bit s of each of a Q5_K super-block's 32 qh bytes, moved to bit 4 (16-bit shifts that keep every byte's
// bit s in that byte's bit 4; masked after): the fifth code bit of sub-block s
__attribute__((target("avx2"))) inline __m256i q5_k_high_bits(__m256i qh, int s) {
  return _mm256_and_si256(s <= 4 ? _mm256_slli_epi16(qh, 4 - s) : _mm256_srli_epi16(qh, s - 4), _mm256_set1_epi8(16));
}

template <int MT>
__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))) void quant_tile_avx512(const uint8_t* row, int64_t kind,
                                                                               int64_t H, const float* h,
                                                                               float* out, int64_t V) {
  __m512 acc[MT][4];
  #pragma GCC unroll 4
  for (int m = 0; m < MT; ++m)
    #pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) acc[m][r] = _mm512_setzero_ps();
#define PYBITNET_QUANT_FEED(r, j, w)                                                                \
  do {                                                                                              \
    const __m512 w_ = (w);                                                                          \
    _Pragma("GCC unroll 4") for (int m = 0; m < MT; ++m) acc[m][r] =                                \
        _mm512_fmadd_ps(_mm512_loadu_ps(h + m * H + (j)), w_, acc[m][r]);                          \
  } while (0)
  const char* ahead = reinterpret_cast<const char*>(row) + kQuantPrefetch;
  auto widen_signed = [](const int8_t* q) __attribute__((target("avx512f"))) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  };
  if (kind == kQ8_0 || kind == kQ4_0) {  // blocks of 32: d * q, or d * (code - 8); both exact
    const int64_t blocks = H / 32, nb = quant_block_bytes(kind);
    auto block = [&](int64_t b, int r) __attribute__((always_inline, target("avx512f,avx512bw,avx2,fma,f16c"))) {
      const uint8_t* blk = row + b * nb;
      const __m512 d = _mm512_set1_ps(f16_at(blk));
      __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)), hi;  // elements 0..15, 16..31
      if (kind == kQ8_0) {
        hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18));
      } else {
        const __m128i nibble = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
        hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(lo, 4), nibble), eight);
        lo = _mm_sub_epi8(_mm_and_si128(lo, nibble), eight);
      }
      PYBITNET_QUANT_FEED(r, b * 32, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo))));
      PYBITNET_QUANT_FEED(r + 1, b * 32 + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi))));
    };
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {  // block b feeds registers 0, 1 when b is even, 2, 3 when odd
      _mm_prefetch(ahead + b * nb, _MM_HINT_T0);
      _mm_prefetch(ahead + b * nb + 64, _MM_HINT_T0);
      block(b, 0);
      block(b + 1, 2);
    }
    if (b < blocks) block(b, 0);
  } else if (kind == kQ4_K || kind == kQ5_K) {
    const int64_t nb = quant_block_bytes(kind);
    const int qs_at = kind == kQ5_K ? 48 : 16;
    alignas(32) float step[8], neg_low[8];
    for (int64_t b = 0; b < H / 256; ++b) {
      const uint8_t* blk = row + b * nb;
      #pragma GCC unroll 3
      for (int c = 0; c < 3; ++c) _mm_prefetch(ahead + b * nb + 64 * c, _MM_HINT_T0);
      q4_k_steps_avx2(blk, step, neg_low);
      const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));  // Q5_K only
      const __m256i nibble = _mm256_set1_epi8(15);
      #pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + qs_at + 32 * j));
        #pragma GCC unroll 2
        for (int t = 0; t < 2; ++t) {  // sub-block s = 2j + t: low nibbles, then high
          const int s = 2 * j + t;
          __m256i q = _mm256_and_si256(t ? _mm256_srli_epi16(raw, 4) : raw, nibble);
          if (kind == kQ5_K) q = _mm256_or_si256(q, q5_k_high_bits(qh, s));
          #pragma GCC unroll 2
          for (int half = 0; half < 2; ++half) {  // element b * 256 + 32s + 16half: register (2s + half) mod 4
            const __m128i q16 = half ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
            // step * code is exact (at most 22 significant bits): one FMA rounds as ggml's product-then-difference
            PYBITNET_QUANT_FEED((2 * s + half) & 3, b * 256 + 32 * s + 16 * half,
                                _mm512_fmadd_ps(_mm512_set1_ps(step[s]), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q16)),
                                                _mm512_set1_ps(neg_low[s])));
          }
        }
      }
    }
  } else {
    alignas(64) float steps[16];
    for (int64_t b = 0; b < H / 256; ++b) {
      const uint8_t* blk = row + b * 210;
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) _mm_prefetch(ahead + b * 210 + 64 * c, _MM_HINT_T0);
      // step = d * scale for the 16 groups: one exact product each, as the scalar body's
      const __m512 d = _mm512_set1_ps(f16_at(blk + 208));
      _mm512_store_ps(steps, _mm512_mul_ps(d, widen_signed(reinterpret_cast<const int8_t*>(blk + 192))));
      // each step is read back from memory as a broadcast operand of its multiply (one load, no shuffle);
      // without this barrier the compiler keeps them in a register and broadcasts with two shuffles each
      asm volatile("" : : : "memory");
      #pragma GCC unroll 2
      for (int hh = 0; hh < 2; ++hh) {
        __m512i c01, c23;
        q6_k_codes_avx512(blk, hh, c01, c23);
        const __m512i bias = _mm512_set1_epi8(32);  // codes 0..63 minus 32
        c01 = _mm512_sub_epi8(c01, bias);
        c23 = _mm512_sub_epi8(c23, bias);
        #pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {  // element b * 256 + 128hh + 16g: register g mod 4, scale 8hh + g
          const __m512i c = g < 4 ? c01 : c23;
          const __m128i q = (g & 3) == 0 ? _mm512_castsi512_si128(c) : _mm512_extracti32x4_epi32(c, g & 3);
          PYBITNET_QUANT_FEED(g & 3, b * 256 + 128 * hh + 16 * g,
                              _mm512_mul_ps(_mm512_set1_ps(steps[8 * hh + g]), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
        }
      }
    }
  }
  #pragma GCC unroll 4
  for (int m = 0; m < MT; ++m) {
    const __m512 c = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][2]), _mm512_add_ps(acc[m][1], acc[m][3]));
    float lanes[16];
    _mm512_storeu_ps(lanes, c);
    out[m * V] = quant_halve(lanes, 16);
  }
}
#undef PYBITNET_QUANT_FEED
#endif

at::Tensor quant_head(const at::Tensor& h, const at::Tensor& blocks, int64_t kind, int64_t isa) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat, "pybitnet.quant_head: h must be 2-D float32");
  TORCH_CHECK(kind >= kQ8_0 && kind <= kQ4_0, "pybitnet.quant_head: unknown table kind ", kind);
  const int64_t H = h.size(1);
  TORCH_CHECK(H % quant_block_elements(kind) == 0, "pybitnet.quant_head: ", H, " columns is not a whole number of blocks");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.size(1) == quant_row_bytes(kind, H),
              "pybitnet.quant_head: blocks must be uint8 (V, ", quant_row_bytes(kind, H), ")");
  const int64_t chosen = resolve_isa(isa);
  at::Tensor hc = h.contiguous(), bc = blocks.contiguous();
  const int64_t M = hc.size(0), V = bc.size(0), row_bytes = bc.size(1);
  at::Tensor out = at::empty({M, V}, h.options());
  if (M == 0 || V == 0) return out;
  const float* hd = hc.data_ptr<float>();
  const uint8_t* wd = bc.data_ptr<uint8_t>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, V, 64, [&](int64_t v0, int64_t v1) {
    std::vector<float> buffer(H);
    float* w = buffer.data();
    for (int64_t v = v0; v < v1; ++v) {
      const uint8_t* row = wd + v * row_bytes;
#ifdef PYBITNET_X86
      if (chosen == kAvx512) {  // tiles of up to 4 rows, each dequantizing the entry's blocks on the fly
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) quant_tile_avx512<4>(row, kind, H, hd + m * H, od + m * V + v, V);
        switch (M - m) {
          case 3: quant_tile_avx512<3>(row, kind, H, hd + m * H, od + m * V + v, V); break;
          case 2: quant_tile_avx512<2>(row, kind, H, hd + m * H, od + m * V + v, V); break;
          case 1: quant_tile_avx512<1>(row, kind, H, hd + m * H, od + m * V + v, V); break;
          default: break;
        }
        continue;
      }
      if (chosen == kAvx2) {
        quant_dequant_row_avx2(row, kind, H, w);
        for (int64_t m = 0; m < M; ++m) od[m * V + v] = quant_dot_avx2(hd + m * H, w, H);
        continue;
      }
#endif
      quant_dequant_row_scalar(row, kind, H, w);
      for (int64_t m = 0; m < M; ++m) od[m * V + v] = quant_dot_scalar(hd + m * H, w, H);
    }
  });
  return out;
}

// ------------------------------------------------------------------------------------------
// lm_head="int8" over a table kept as stored: per-row int8 activations a (quantize_rows, as the int8
// head) against the blocks themselves, no copy. Every type writes value = step * code - low with an
// unsigned code and (step, low) shared by a group of 16 or 32 elements. Per chunk of 64 elements and
// lane of 4, C = sum of code * a is an exact integer (vpdpbusd) and A = sum of a is one too.
//  - Q8_0 (code = q + 128, low = 128 d), Q4_0 (low = 8 d), Q6_K (low = 32 step): the low is a whole
//    number of steps, low = offset * step, so C - offset * A is the lane's exact integer sum of
//    (code - offset) * a (vpdpbusd starting from -offset * A) and a lane takes acc = fma(step, C', acc);
//  - Q4_K, Q5_K (a separate low per group): acc = fma(step, C, acc), acc = fma(-low, A, acc).
// Chunks alternate between two sets of 16 lanes, which are added, halved pairwise (as quant_head) and
// divided by the row's act_scale. The same float operations in every body and batch size: rows are
// independent of each other. H: a multiple of 64.

struct Int8Chunk {
  uint8_t codes[64];  // elements 64c .. 64c + 63, unsigned
  float step[16];     // per lane of 4 elements
  float neg_low[16];  // Q4_K, Q5_K only: the others' lows are int8_low_offset(kind) steps
};

// the low of Q8_0, Q4_0 and Q6_K in steps; 0 where the low is a float of its own (Q4_K, Q5_K)
inline int32_t int8_low_offset(int64_t kind) {
  return kind == kQ8_0 ? 128 : kind == kQ4_0 ? 8 : kind == kQ6_K ? 32 : 0;
}

// chunk c of a row of blocks, one element at a time (the scalar body, and the reference for the others)
void int8_chunk_scalar(const uint8_t* row, int64_t kind, int64_t c, Int8Chunk& out) {
  if (kind == kQ8_0 || kind == kQ4_0) {
    for (int half = 0; half < 2; ++half) {
      const uint8_t* blk = row + (2 * c + half) * quant_block_bytes(kind);
      const float d = fp16_at(blk);
      for (int l = 0; l < 32; ++l)
        out.codes[32 * half + l] = kind == kQ8_0 ? uint8_t(int(int8_t(blk[2 + l])) + 128)
                                                 : uint8_t(l < 16 ? blk[2 + l] & 15 : blk[2 + l - 16] >> 4);
      for (int li = 8 * half; li < 8 * half + 8; ++li) out.step[li] = d;
    }
    return;
  }
  const int64_t b = c / 4, part = c % 4;
  if (kind == kQ6_K) {
    const uint8_t* blk = row + b * 210;
    const float d = fp16_at(blk + 208);
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    for (int i = 0; i < 64; ++i) {
      const int e = 64 * part + i, h = e / 128, k = (e % 128) / 32, l = e % 32;
      out.codes[i] = uint8_t(((blk[64 * h + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15) |
                             (((blk[128 + 32 * h + l] >> (2 * k)) & 3) << 4));
    }
    for (int li = 0; li < 16; ++li) out.step[li] = d * float(sc[4 * part + li / 4]);
    return;
  }
  const uint8_t* blk = row + b * quant_block_bytes(kind);  // Q4_K, Q5_K
  float step[8], low[8];
  q4_k_steps(blk, step, low);
  const uint8_t* qs = blk + (kind == kQ5_K ? 48 : 16);
  for (int i = 0; i < 64; ++i) {
    const int t = i / 32, l = i % 32;
    int code = (qs[32 * part + l] >> (4 * t)) & 15;
    if (kind == kQ5_K) code |= ((blk[16 + l] >> (2 * part + t)) & 1) << 4;
    out.codes[i] = uint8_t(code);
  }
  for (int li = 0; li < 16; ++li) {
    out.step[li] = step[2 * part + li / 8];
    out.neg_low[li] = -low[2 * part + li / 8];
  }
}

struct QuantInt8Args {
  const int8_t* q;          // (M, H) activations
  const float* lane_sum;    // (M, H / 4) sums of 4 activations, exact (Q4_K, Q5_K)
  const int32_t* low_sum;   // (M, H / 4) -int8_low_offset(kind) * those sums (Q8_0, Q4_0, Q6_K)
  const float* act_scale;   // (M,)
  const uint8_t* blocks;  // (V, row_bytes)
  float* out;             // (M, V)
  int64_t kind, M, V, H, row_bytes;
};

inline void quant_int8_store(const QuantInt8Args& a, int64_t m, int64_t v, float* lanes0, const float* lanes1) {
  for (int li = 0; li < 16; ++li) lanes0[li] = lanes0[li] + lanes1[li];
  a.out[m * a.V + v] = quant_halve(lanes0, 16) / a.act_scale[m];
}

void quant_int8_scalar(const QuantInt8Args& a, int64_t v0, int64_t v1) {
  const bool folded = int8_low_offset(a.kind) != 0;
  Int8Chunk chunk;
  std::vector<float> acc(a.M * 32);
  for (int64_t v = v0; v < v1; ++v) {
    std::fill(acc.begin(), acc.end(), 0.f);
    const uint8_t* row = a.blocks + v * a.row_bytes;
    for (int64_t c = 0; c < a.H / 64; ++c) {
      int8_chunk_scalar(row, a.kind, c, chunk);
      for (int64_t m = 0; m < a.M; ++m) {
        float* lanes = acc.data() + m * 32 + 16 * (c & 1);
        const int8_t* q = a.q + m * a.H + 64 * c;
        for (int li = 0; li < 16; ++li) {
          const int64_t lane = m * (a.H / 4) + 16 * c + li;
          int32_t sum = folded ? a.low_sum[lane] : 0;
          for (int t = 0; t < 4; ++t) sum += int32_t(chunk.codes[4 * li + t]) * int32_t(q[4 * li + t]);
          lanes[li] = std::fma(chunk.step[li], float(sum), lanes[li]);
          if (!folded) lanes[li] = std::fma(chunk.neg_low[li], a.lane_sum[lane], lanes[li]);
        }
      }
    }
    for (int64_t m = 0; m < a.M; ++m) quant_int8_store(a, m, v, acc.data() + m * 32, acc.data() + m * 32 + 16);
  }
}

#ifdef PYBITNET_X86
// MT rows against VR entries (v, v + rs, ...): each chunk's codes, steps and lows built once in registers,
// the same values as int8_chunk_scalar; each (row, entry) sums in the same order whatever the tile, so MT and
// VR change speed only. VR entries are VR sequential streams of blocks, which keep enough reads in flight
// for the hardware prefetcher alone: software prefetches here measured slower (they take load slots from
// a loop that is close to bound by its instructions).
template <int MT, int VR>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c"))) void quant_int8_tile_avx512(
    const QuantInt8Args& a, int64_t m0, int64_t v, int64_t rs) {
  __m512 acc[VR][MT][2];
  const uint8_t* rows[VR];
  #pragma GCC unroll 4
  for (int r = 0; r < VR; ++r) {
    rows[r] = a.blocks + (v + r * rs) * a.row_bytes;
    #pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
  }
  // chunk c feeds the lanes acc[r][m][c & 1]; every call site passes c & 1 as a constant (parity), so
  // the accumulators stay in registers (an index known only at run time puts them on the stack)
  // neg_low: null where the low is int8_low_offset steps (folded into the integer sum through low_sum),
  // else the group's own -low; a constant at every call site, so each inlined copy keeps one of the two
  auto feed = [&](int r, int64_t c, int parity, __m512i codes, __m512 step, const __m512* neg_low)
      __attribute__((always_inline, target("avx512f,avx512bw,avx512vnni,fma"))) {
    #pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      const int64_t lane = (m0 + m) * (a.H / 4) + 16 * c;
      const __m512i q = _mm512_loadu_si512(a.q + (m0 + m) * a.H + 64 * c);
      const __m512i start = neg_low ? _mm512_setzero_si512() : _mm512_loadu_si512(a.low_sum + lane);
      __m512& lanes = acc[r][m][parity];
      lanes = _mm512_fmadd_ps(step, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, codes, q)), lanes);
      if (neg_low) lanes = _mm512_fmadd_ps(*neg_low, _mm512_loadu_ps(a.lane_sum + lane), lanes);
    }
  };
  const int64_t chunks = a.H / 64;
  if (a.kind == kQ8_0 || a.kind == kQ4_0) {
    const int64_t nb = quant_block_bytes(a.kind);
    const int scale1 = int(nb / 2);  // the second block's scale, in 16-bit words from the first's
    const __m512i scale_index = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, scale1, scale1,
                                                 scale1, scale1, scale1, scale1, scale1, scale1, 0, 0, 0, 0, 0, 0, 0, 0);
    for (int64_t pair = 0; pair < chunks; pair += 2)
    #pragma GCC unroll 2
    for (int parity = 0; parity < 2; ++parity) {
      const int64_t c = pair + parity;
      if (parity == 1 && c == chunks) break;
      #pragma GCC unroll 4
      for (int r = 0; r < VR; ++r) {
        const uint8_t* b0 = rows[r] + 2 * c * nb;
        const uint8_t* b1 = b0 + nb;
        __m512i codes;
        if (a.kind == kQ8_0) {
          const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0 + 2));
          const __m256i q1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b1 + 2));
          codes = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1), _mm512_set1_epi8(-128));
        } else {
          const __m128i nibble = _mm_set1_epi8(15);
          const __m128i x0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b0 + 2));
          const __m128i x1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b1 + 2));
          const __m256i y0 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x0, 4), nibble), _mm_and_si128(x0, nibble));
          const __m256i y1 = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x1, 4), nibble), _mm_and_si128(x1, nibble));
          codes = _mm512_inserti64x4(_mm512_castsi256_si512(y0), y1, 1);
        }
        // the two f16 scales (words 0 and 17 of the chunk) spread over lanes 0-7 and 8-15, converted at once
        // the load stays inside the chunk (68 bytes for Q8_0, 36 for Q4_0), so never past the table's end
        const __m512i chunk_head = a.kind == kQ8_0
                                       ? _mm512_loadu_si512(b0)
                                       : _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b0)));
        const __m512i scale_words = _mm512_permutexvar_epi16(scale_index, chunk_head);
        const __m512 step = _mm512_cvtph_ps(_mm512_castsi512_si256(scale_words));
        feed(r, c, parity, codes, step, nullptr);
      }
    }
  } else if (a.kind == kQ6_K) {
    const __m512i quarter = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);  // lane / 4
    for (int64_t b = 0; b < chunks / 4; ++b) {
      #pragma GCC unroll 4
      for (int r = 0; r < VR; ++r) {
        const uint8_t* blk = rows[r] + b * 210;
        const __m512 steps = _mm512_mul_ps(_mm512_set1_ps(f16_at(blk + 208)), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                                                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)))));
        #pragma GCC unroll 2
        for (int hh = 0; hh < 2; ++hh) {
          __m512i c01, c23;
          q6_k_codes_avx512(blk, hh, c01, c23);
          #pragma GCC unroll 2
          for (int odd = 0; odd < 2; ++odd) {
            const int part = 2 * hh + odd;  // groups 4 part .. 4 part + 3
            const __m512 step = _mm512_permutexvar_ps(_mm512_add_epi32(quarter, _mm512_set1_epi32(4 * part)), steps);
            feed(r, 4 * b + part, odd, odd ? c23 : c01, step, nullptr);
          }
        }
      }
    }
  } else {  // Q4_K, Q5_K
    const int64_t nb = quant_block_bytes(a.kind);
    const int qs_at = a.kind == kQ5_K ? 48 : 16;
    const __m512i eighth = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);  // lane / 8
    alignas(32) float step8[8], neg_low8[8];
    for (int64_t b = 0; b < chunks / 4; ++b) {
      #pragma GCC unroll 4
      for (int r = 0; r < VR; ++r) {
        const uint8_t* blk = rows[r] + b * nb;
        q4_k_steps_avx2(blk, step8, neg_low8);
        const __m512 steps = _mm512_castps256_ps512(_mm256_load_ps(step8));
        const __m512 neg_lows = _mm512_castps256_ps512(_mm256_load_ps(neg_low8));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16));
        const __m256i nibble = _mm256_set1_epi8(15);
        #pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + qs_at + 32 * j));
          __m256i lo = _mm256_and_si256(raw, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
          if (a.kind == kQ5_K) {  // the fifth code bits of sub-blocks 2j and 2j + 1
            const int s = 2 * j;
            lo = _mm256_or_si256(lo, q5_k_high_bits(qh, s));
            hi = _mm256_or_si256(hi, q5_k_high_bits(qh, s + 1));
          }
          const __m512i index = _mm512_add_epi32(eighth, _mm512_set1_epi32(2 * j));
          const __m512 neg_low = _mm512_permutexvar_ps(index, neg_lows);
          feed(r, 4 * b + j, j & 1, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1),
               _mm512_permutexvar_ps(index, steps), &neg_low);
        }
      }
    }
  }
  #pragma GCC unroll 4
  for (int r = 0; r < VR; ++r)
    #pragma GCC unroll 4
    for (int m = 0; m < MT; ++m) {
      alignas(64) float lanes0[16], lanes1[16];
      _mm512_store_ps(lanes0, acc[r][m][0]);
      _mm512_store_ps(lanes1, acc[r][m][1]);
      quant_int8_store(a, m0 + m, v + r * rs, lanes0, lanes1);
    }
}

template <int VR>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c"))) void quant_int8_rows_avx512(
    const QuantInt8Args& a, int64_t v, int64_t rs) {
  int64_t m = 0;
  for (; m + 4 <= a.M; m += 4) quant_int8_tile_avx512<4, VR>(a, m, v, rs);
  switch (a.M - m) {
    case 3: quant_int8_tile_avx512<3, VR>(a, m, v, rs); break;
    case 2: quant_int8_tile_avx512<2, VR>(a, m, v, rs); break;
    case 1: quant_int8_tile_avx512<1, VR>(a, m, v, rs); break;
    default: break;
  }
}
#endif

at::Tensor quant_head_int8(const at::Tensor& h, const at::Tensor& blocks, int64_t kind, int64_t isa) {
  TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.device().is_cpu(),
              "pybitnet.quant_head_int8: h must be 2-D float32 on CPU");
  TORCH_CHECK(kind >= kQ8_0 && kind <= kQ4_0, "pybitnet.quant_head_int8: unknown table kind ", kind);
  const int64_t H = h.size(1);
  TORCH_CHECK(H % 64 == 0 && H % quant_block_elements(kind) == 0, "pybitnet.quant_head_int8: ", H,
              " columns: need a multiple of 64 and a whole number of blocks");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.size(1) == quant_row_bytes(kind, H),
              "pybitnet.quant_head_int8: blocks must be uint8 (V, ", quant_row_bytes(kind, H), ")");
  const int64_t chosen = resolve_isa(isa);
  at::Tensor hc = h.contiguous(), bc = blocks.contiguous();
  const int64_t M = hc.size(0), V = bc.size(0);
  const auto [q, act] = head_activations(hc, H, chosen);
  at::Tensor lane_sum = at::empty({M, H / 4}, h.options());
  at::Tensor low_sum = at::empty({M, H / 4}, h.options().dtype(at::kInt));
  const int8_t* qd = q.data_ptr<int8_t>();
  float* ls = lane_sum.data_ptr<float>();
  int32_t* lo = low_sum.data_ptr<int32_t>();
  const int32_t offset = int8_low_offset(kind);
  for (int64_t i = 0; i < M * H / 4; ++i) {
    const int32_t sum = int32_t(qd[4 * i]) + qd[4 * i + 1] + qd[4 * i + 2] + qd[4 * i + 3];
    ls[i] = float(sum);
    lo[i] = -offset * sum;
  }
  at::Tensor out = at::empty({M, V}, h.options());
  if (M == 0 || V == 0) return out;
  const QuantInt8Args a{qd, ls, lo, act.data_ptr<float>(), bc.data_ptr<uint8_t>(), out.data_ptr<float>(), kind, M, V, H,
                        bc.size(1)};
  at::parallel_for(0, V, 64, [&](int64_t v0, int64_t v1) {
#ifdef PYBITNET_X86
    if (chosen == kAvx512) {  // AVX-512 is chosen only with VNNI
      // one row (a decode step) reads four streams of blocks; a batch two, with tiles of four rows (the
      // accumulators of four entries by four rows would not fit in the registers)
      const auto rows = [&](auto vr, int64_t v, int64_t rs) { quant_int8_rows_avx512<decltype(vr)::value>(a, v, rs); };
      if (M == 1)
        in_streams<4>(v0, v1, rows);
      else
        in_streams<2>(v0, v1, rows);
      return;
    }
#endif
    quant_int8_scalar(a, v0, v1);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pybitnet, m) {
  m.def("ternary_matmul(Tensor q, Tensor packed, int k, int isa=0) -> Tensor");
  m.def("unpack_ternary(Tensor packed, Tensor(a!) out, int isa=0) -> Tensor(a!)");
  m.def("half_matmul(Tensor h, Tensor weight, int isa=0) -> Tensor");
  m.def("quantize_rows(Tensor x, Tensor? norm_weight, Tensor? row_scale, float eps, int isa=0) -> (Tensor, Tensor)");
  m.def("ternary_linear(Tensor x, Tensor? norm_weight, Tensor? row_scale, float eps, Tensor packed, Tensor? col_scale, "
        "int isa=0) -> (Tensor, Tensor)");
  m.def("attention_decode(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, Tensor positions, "
        "int num_heads, int num_kv_heads, float scale, int isa=0) -> Tensor");
  m.def("attention_prefill(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) keys, Tensor(b!) values, Tensor starts, "
        "int num_heads, int num_kv_heads, float scale, int isa=0) -> Tensor");
  m.def("int8_head(Tensor h, Tensor weight, Tensor w_scale, Tensor w_sum, int isa=0) -> Tensor");
  m.def("decode_stack(Tensor h, Tensor?[] weights, float[] betas, float eps, Tensor cos, Tensor sin, "
        "Tensor(a!)[] keys, Tensor(b!)[] values, Tensor positions, int num_heads, int num_kv_heads, float scale, "
        "int isa=0) -> Tensor");
  m.def("quant_head(Tensor h, Tensor blocks, int kind, int isa=0) -> Tensor");
  m.def("quant_head_int8(Tensor h, Tensor blocks, int kind, int isa=0) -> Tensor");
  m.def("cpu_features() -> int", &cpu_features);
}

TORCH_LIBRARY_IMPL(pybitnet, CPU, m) {
  m.impl("ternary_matmul", &ternary_matmul);
  m.impl("unpack_ternary", &unpack_ternary_out);
  m.impl("half_matmul", &half_matmul);
  m.impl("quantize_rows", &quantize_rows);
  m.impl("ternary_linear", &ternary_linear);
  m.impl("attention_decode", &attention_decode);
  m.impl("attention_prefill", &attention_prefill);
  m.impl("int8_head", &int8_head);
  m.impl("decode_stack", &decode_stack);
  m.impl("quant_head", &quant_head);
  m.impl("quant_head_int8", &quant_head_int8);
}
