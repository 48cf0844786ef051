// AVX-512 hot loops of noise_fill.h: Philox4x32-10 on 16 counters per vector, the words ->
// noise transforms on whole vectors, a vectorized Box-Muller (own log/sin/cos, Cephes
// polynomials, ~1 ulp) and, for float32 rows, the add fused in (no noise buffer). Compiled
// for AVX-512 through `#pragma GCC target` (after every header, so no inline function of
// another file is compiled for AVX-512); run only where the CPU has it (cpu_kernels() in
// noise_fill.cpp).
//
// Every float operation is one IEEE operation rounded once, as in noise.h (no FMA):
// uniform, +-1 and u are bit for bit those of the portable code.
#include "noise_fill.h"

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// GCC only (`#pragma GCC target`); elsewhere these kernels are left out (null)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTNOISE_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
// GCC 12 warns that intrinsics' internal undefined vectors may be used uninitialized (a
// false positive inside avx512fintrin.h)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace fastnoise {
namespace cpu {
namespace {

struct Words16 {
  __m512i w[4];  // word k of counters base .. base + 15, lane l = counter base + l
};

// One Philox round on 8 counters held in the low 32 bits of 64-bit lanes: _mm512_mul_epu32
// reads only those, so the upper halves may hold anything (and do: products, xors), and
// one multiply gives both words (lo = the product's low half, hi = its high half).
inline void philox_round8(__m512i& c0, __m512i& c1, __m512i& c2, __m512i& c3, __m512i k0,
                          __m512i k1) {
  const __m512i prod_b = _mm512_mul_epu32(c2, _mm512_set1_epi64(kPhiloxRoundB));
  const __m512i prod_a = _mm512_mul_epu32(c0, _mm512_set1_epi64(kPhiloxRoundA));
  // 0x96: a ^ b ^ c
  c0 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(prod_b, 32), c1, k0, 0x96);
  c2 = _mm512_ternarylogic_epi64(_mm512_srli_epi64(prod_a, 32), c3, k1, 0x96);
  c1 = prod_b;
  c3 = prod_a;
}

// philox4x32_10 (philox.h) of the 16 counters base .. base + 15 (64-bit, wrapping): two
// interleaved sets of 8 (counters base + l and base + 8 + l in 64-bit lane l), packed into
// 16 32-bit lanes at the end.
inline Words16 philox16(uint64_t base, uint64_t seed) {
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i ctr_a = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(base)), iota);
  const __m512i ctr_b = _mm512_add_epi64(ctr_a, _mm512_set1_epi64(8));
  __m512i a0 = ctr_a, a1 = _mm512_srli_epi64(ctr_a, 32);
  __m512i b0 = ctr_b, b1 = _mm512_srli_epi64(ctr_b, 32);
  __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
  __m512i b2 = _mm512_setzero_si512(), b3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m512i vk0 = _mm512_set1_epi64(k0), vk1 = _mm512_set1_epi64(k1);
    philox_round8(a0, a1, a2, a3, vk0, vk1);
    philox_round8(b0, b1, b2, b3, vk0, vk1);
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  // the low halves: a's 8 lanes, then b's
  const __m512i low = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return Words16{{_mm512_permutex2var_epi32(a0, low, b0), _mm512_permutex2var_epi32(a1, low, b1),
                  _mm512_permutex2var_epi32(a2, low, b2), _mm512_permutex2var_epi32(a3, low, b3)}};
}

// philox16 for a run of at most 8 counters (a +-1 row of d <= 1024 values): only the 8
// counters base .. base + 7 are computed, lanes 8 .. 15 repeat lanes 0 .. 7.
inline Words16 philox8(uint64_t base, uint64_t seed) {
  const __m512i iota = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(base)), iota);
  __m512i a0 = ctr, a1 = _mm512_srli_epi64(ctr, 32);
  __m512i a2 = _mm512_setzero_si512(), a3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    philox_round8(a0, a1, a2, a3, _mm512_set1_epi64(k0), _mm512_set1_epi64(k1));
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m512i low = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 2, 4, 6, 8, 10, 12, 14);
  return Words16{{_mm512_permutexvar_epi32(low, a0), _mm512_permutexvar_epi32(low, a1),
                  _mm512_permutexvar_epi32(low, a2), _mm512_permutexvar_epi32(low, a3)}};
}

// x0..x3 (value k of counter l in lane l of xk) in the reference's order, as 4 vectors of
// 16 consecutive values: v[q] lane i = value 16 * q + i = x((16q + i) % 4)[(16q + i) / 4].
inline void interleave(__m512 x0, __m512 x1, __m512 x2, __m512 x3, __m512 v[4]) {
  const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i pair_hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i quad_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i quad_hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  const __m512d a = _mm512_castps_pd(_mm512_permutex2var_ps(x0, pair_lo, x1));  // lanes 0-7
  const __m512d b = _mm512_castps_pd(_mm512_permutex2var_ps(x0, pair_hi, x1));  // lanes 8-15
  const __m512d c = _mm512_castps_pd(_mm512_permutex2var_ps(x2, pair_lo, x3));
  const __m512d d = _mm512_castps_pd(_mm512_permutex2var_ps(x2, pair_hi, x3));
  v[0] = _mm512_castpd_ps(_mm512_permutex2var_pd(a, quad_lo, c));
  v[1] = _mm512_castpd_ps(_mm512_permutex2var_pd(a, quad_hi, c));
  v[2] = _mm512_castpd_ps(_mm512_permutex2var_pd(b, quad_lo, d));
  v[3] = _mm512_castpd_ps(_mm512_permutex2var_pd(b, quad_hi, d));
}

// uniform01 of noise.h: v = w < 2**31 ? w : ~w & 0x7FFFFFFF, float(v) * kUniformScale.
inline __m512 uniform01_16(__m512i w) {
  const __m512i v = _mm512_and_si512(_mm512_xor_si512(w, _mm512_srai_epi32(w, 31)),
                                     _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(kUniformScale));
}

// uniform_noise of noise.h: u * 2 - 1.
inline __m512 uniform_noise16(__m512i w) {
  return _mm512_sub_ps(_mm512_mul_ps(uniform01_16(w), _mm512_set1_ps(2.0f)),
                       _mm512_set1_ps(1.0f));
}

inline __m512 poly_step(__m512 acc, __m512 x, float c) {  // acc * x + c, two roundings
  return _mm512_add_ps(_mm512_mul_ps(acc, x), _mm512_set1_ps(c));
}

// Natural log for x in [1e-7, 1) (positive normal floats): Cephes logf.
inline __m512 log16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  // x = m * 2**e, m in [0.5, 1)
  __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126));
  const __m512 m = _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_and_si512(bits, _mm512_set1_epi32(0x007FFFFF)), _mm512_set1_epi32(0x3F000000)));
  const __mmask16 small = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f),
                                             _CMP_LT_OQ);
  e = _mm512_mask_sub_epi32(e, small, e, _mm512_set1_epi32(1));
  const __m512 t = _mm512_sub_ps(_mm512_mask_add_ps(m, small, m, m), _mm512_set1_ps(1.0f));
  const __m512 fe = _mm512_cvtepi32_ps(e);
  const __m512 z = _mm512_mul_ps(t, t);
  __m512 y = _mm512_set1_ps(7.0376836292E-2f);
  y = poly_step(y, t, -1.1514610310E-1f);
  y = poly_step(y, t, 1.1676998740E-1f);
  y = poly_step(y, t, -1.2420140846E-1f);
  y = poly_step(y, t, 1.4249322787E-1f);
  y = poly_step(y, t, -1.6668057665E-1f);
  y = poly_step(y, t, 2.0000714765E-1f);
  y = poly_step(y, t, -2.4999993993E-1f);
  y = poly_step(y, t, 3.3333331174E-1f);
  y = _mm512_mul_ps(_mm512_mul_ps(y, t), z);
  y = _mm512_add_ps(y, _mm512_mul_ps(fe, _mm512_set1_ps(-2.12194440e-4f)));
  y = _mm512_sub_ps(y, _mm512_mul_ps(z, _mm512_set1_ps(0.5f)));
  __m512 r = _mm512_add_ps(t, y);
  return _mm512_add_ps(r, _mm512_mul_ps(fe, _mm512_set1_ps(0.693359375f)));
}

// sin and cos of x in [0, 2*pi]: Cephes sinf/cosf (octant reduction with pi/4 split in
// three parts, then the two minimax polynomials on [-pi/4, pi/4]).
inline void sincos16(__m512 x, __m512& s, __m512& c) {
  __m512i j = _mm512_cvttps_epi32(_mm512_mul_ps(x, _mm512_set1_ps(1.27323954473516f)));
  j = _mm512_and_si512(_mm512_add_epi32(j, _mm512_set1_epi32(1)), _mm512_set1_epi32(~1));
  const __m512 y = _mm512_cvtepi32_ps(j);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(y, _mm512_set1_ps(0.78515625f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(y, _mm512_set1_ps(2.4187564849853515625e-4f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(y, _mm512_set1_ps(3.77489497744594108e-8f)));
  const __m512 z = _mm512_mul_ps(r, r);
  __m512 ps = _mm512_set1_ps(-1.9515295891E-4f);
  ps = poly_step(ps, z, 8.3321608736E-3f);
  ps = poly_step(ps, z, -1.6666654611E-1f);
  ps = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(ps, z), r), r);  // sin(r)
  __m512 pc = _mm512_set1_ps(2.443315711809948E-5f);
  pc = poly_step(pc, z, -1.388731625493765E-3f);
  pc = poly_step(pc, z, 4.166664568298827E-2f);
  pc = _mm512_mul_ps(_mm512_mul_ps(pc, z), z);
  pc = _mm512_sub_ps(pc, _mm512_mul_ps(z, _mm512_set1_ps(0.5f)));
  pc = _mm512_add_ps(pc, _mm512_set1_ps(1.0f));  // cos(r)
  // x = r + q * pi/2, q = j / 2 mod 4: sin x = (sin r, cos r, -sin r, -cos r)[q],
  // cos x = (cos r, -sin r, -cos r, sin r)[q]
  const __m512i q = _mm512_srli_epi32(j, 1);
  const __mmask16 swap = _mm512_test_epi32_mask(q, _mm512_set1_epi32(1));
  const __mmask16 sin_neg = _mm512_test_epi32_mask(q, _mm512_set1_epi32(2));
  const __mmask16 cos_neg =
      _mm512_test_epi32_mask(_mm512_add_epi32(q, _mm512_set1_epi32(1)), _mm512_set1_epi32(2));
  const __m512 sv = _mm512_mask_blend_ps(swap, ps, pc);
  const __m512 cv = _mm512_mask_blend_ps(swap, pc, ps);
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  s = _mm512_castsi512_ps(
      _mm512_mask_xor_epi32(_mm512_castps_si512(sv), sin_neg, _mm512_castps_si512(sv), sign));
  c = _mm512_castsi512_ps(
      _mm512_mask_xor_epi32(_mm512_castps_si512(cv), cos_neg, _mm512_castps_si512(cv), sign));
}

// box_muller of noise.h on 16 pairs of words.
inline void box_muller16(__m512i wa, __m512i wb, __m512& xa, __m512& xb) {
  const __m512 ua = _mm512_max_ps(uniform01_16(wa), _mm512_set1_ps(kGaussianMinU));
  const __m512 th = _mm512_mul_ps(_mm512_set1_ps(kTwoPi), uniform01_16(wb));
  const __m512 rad = _mm512_sqrt_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), log16(ua)));
  __m512 s, c;
  sincos16(th, s, c);
  xa = _mm512_mul_ps(rad, c);
  xb = _mm512_mul_ps(rad, s);
}

// The values of fill_noise (noise_fill.h), 16 at a time: sink(j, v) gets values j .. j + 15
// (j a multiple of 16, j < count; lanes past count are garbage).
template <typename Sink>
inline void generate(int kind, uint64_t first_counter, int64_t count, uint64_t seed, float m,
                     Sink&& sink) {
  const __m512 vm = _mm512_set1_ps(m);
  if (kind == kFillBernoulli) {
    const __m512 neg_m = _mm512_set1_ps(-m);
    const int64_t counters = (count + 127) / 128;
    for (int64_t g0 = 0; g0 < counters; g0 += 16) {
      const uint64_t base = first_counter + static_cast<uint64_t>(g0);
      // a row of d <= 1024 needs at most 8 counters: half the Philox work
      const Words16 r = counters - g0 <= 8 ? philox8(base, seed) : philox16(base, seed);
      __m512 w[4];  // the 64 words in the reference's order
      interleave(_mm512_castsi512_ps(r.w[0]), _mm512_castsi512_ps(r.w[1]),
                 _mm512_castsi512_ps(r.w[2]), _mm512_castsi512_ps(r.w[3]), w);
      alignas(64) uint32_t words[64];
      for (int q = 0; q < 4; ++q) _mm512_store_ps(reinterpret_cast<float*>(words) + 16 * q, w[q]);
      const int64_t begin = 128 * g0, end = std::min<int64_t>(count, begin + 2048);
      for (int64_t j = begin; j < end; j += 16) {
        // bit b of the mask: element j + b, bit (j + b) % 32 of word (j + b) / 32; set = -m
        const __mmask16 bits = static_cast<__mmask16>(words[(j - begin) >> 5] >> (j & 31));
        sink(j, _mm512_mask_blend_ps(bits, vm, neg_m));
      }
    }
    return;
  }
  const int64_t counters = (count + 3) / 4;
  for (int64_t g0 = 0; g0 < counters; g0 += 16) {
    const Words16 r = philox16(first_counter + static_cast<uint64_t>(g0), seed);
    __m512 x[4];
    if (kind == kFillGaussian) {
      box_muller16(r.w[0], r.w[1], x[0], x[1]);
      box_muller16(r.w[2], r.w[3], x[2], x[3]);
      for (int k = 0; k < 4; ++k) x[k] = _mm512_mul_ps(x[k], vm);
    } else if (kind == kFillUniform01) {
      for (int k = 0; k < 4; ++k) x[k] = uniform01_16(r.w[k]);
    } else {
      for (int k = 0; k < 4; ++k) x[k] = _mm512_mul_ps(uniform_noise16(r.w[k]), vm);
    }
    __m512 v[4];
    interleave(x[0], x[1], x[2], x[3], v);
    for (int q = 0; q < 4 && 4 * g0 + 16 * q < count; ++q) sink(4 * g0 + 16 * q, v[q]);
  }
}

void fill_noise_avx512(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                       float m, float* out) {
  generate(kind, first_counter, count, seed, m,
           [out](int64_t j, __m512 v) { _mm512_storeu_ps(out + j, v); });
}

// o = e + n, o2 = e - n (o2 may be null) straight from the registers: no noise buffer.
void noisy_row_f32_avx512(int kind, uint64_t first_counter, int64_t count, uint64_t seed,
                          float m, const float* e, float* o, float* o2, float* /*scratch*/) {
  generate(kind, first_counter, count, seed, m, [=](int64_t j, __m512 n) {
    if (j + 16 <= count) {
      const __m512 ev = _mm512_loadu_ps(e + j);
      _mm512_storeu_ps(o + j, _mm512_add_ps(ev, n));
      if (o2 != nullptr) _mm512_storeu_ps(o2 + j, _mm512_sub_ps(ev, n));
    } else {
      const __mmask16 tail = static_cast<__mmask16>((1u << (count - j)) - 1u);
      const __m512 ev = _mm512_maskz_loadu_ps(tail, e + j);
      _mm512_mask_storeu_ps(o + j, tail, _mm512_add_ps(ev, n));
      if (o2 != nullptr) _mm512_mask_storeu_ps(o2 + j, tail, _mm512_sub_ps(ev, n));
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace fastnoise

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // GCC on x86-64

namespace fastnoise {
namespace cpu {
#if defined(FASTNOISE_AVX512)
const FillNoiseFn kFillNoiseAvx512 = fill_noise_avx512;
const NoisyRowF32Fn kNoisyRowF32Avx512 = noisy_row_f32_avx512;
#else
const FillNoiseFn kFillNoiseAvx512 = nullptr;
const NoisyRowF32Fn kNoisyRowF32Avx512 = nullptr;
#endif
}  // namespace cpu
}  // namespace fastnoise
