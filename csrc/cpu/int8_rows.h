// The row kernels of the int8 ops (csrc/cpu/int8.cpp, int8_vnni.cpp; docs/EXTENSION.md, "int8 passes"):
// quantize a row per token (int8, or uint8 = int8 + 128 for the u8 x s8 micro-kernel), symmetric
// (x ~ scale * q) or asymmetric (x ~ scale * (u - z), u and the zero point z in [0, 255]), and dequantize
// a row of int32 sums (- a zero-point correction + scales + bias + activation + rounding to the output
// dtype) in one pass.
// AVX-512 where ATen runs its own AVX-512 kernels (at::get_cpu_capability(); ATEN_CPU_CAPABILITY=avx2
// takes the scalar code, as the tests do), with target attributes so the build flags stay generic (as
// avx512.h); elsewhere scalar loops that give the same integers and, apart from GELU's erf (std::erf
// there, a rational approximation here), the same floats.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "../rmt_fast.h"

#include "avx512.h"

namespace rmt_fast {
namespace int8_rows {

constexpr float kQMax = 127.f;
enum class Act { kNone, kGelu, kRelu };

// The AVX512-BF16 rounding of bfloat16 outputs; RMT_FAST_INT8_NO_AVX512_BF16=1 (read once; for the
// tests) keeps the plain AVX-512 one.
inline bool int8_avx512_bf16() {
#ifdef RMT_FAST_X86
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16") != 0 &&
                          std::getenv("RMT_FAST_INT8_NO_AVX512_BF16") == nullptr;
  return has;
#else
  return false;
#endif
}

// Rows per parallel chunk: about 16 K elements, so that small problems stay on one thread.
inline int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(row_elems, 1));
}

// --- scalar --------------------------------------------------------------------------------------

// Q = int8_t: q in [-127, 127]; Q = uint8_t: q + 128 (the unsigned operand of u8 x s8 products).
template <typename T, typename Q>
void quantize_row_scalar(const T* x, int64_t K, Q* q, float* scale) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(float(x[k])));
  const float s = std::max(amax, FLT_MIN) / kQMax;
  constexpr int kZero = std::is_same_v<Q, uint8_t> ? 128 : 0;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<Q>(static_cast<int>(std::nearbyint(float(x[k]) / s)) + kZero);
  *scale = s;
}

// Asymmetric: the range [min(x, 0), max(x, 0)] in 256 steps, s = max(range / 255, FLT_MIN),
// z = round(-min / s) in [0, 255], u = clamp(round(x / s) + z, 0, 255), x ~ s * (u - z).
// Q = uint8_t stores u, Q = int8_t stores u - 128; *zero is z either way.
inline float asym_scale(float lo, float hi) { return std::max((hi - lo) / 255.f, FLT_MIN); }
inline int32_t asym_zero(float lo, float s) { return std::clamp(static_cast<int32_t>(std::nearbyint(-lo / s)), 0, 255); }

template <typename T, typename Q>
void quantize_row_asym_scalar(const T* x, int64_t K, Q* q, float* scale, int32_t* zero) {
  float lo = 0.f, hi = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    lo = std::min(lo, float(x[k]));
    hi = std::max(hi, float(x[k]));
  }
  const float s = asym_scale(lo, hi);
  const int32_t z = asym_zero(lo, s);
  constexpr int kShift = std::is_same_v<Q, uint8_t> ? 0 : 128;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t u = std::clamp(static_cast<int32_t>(std::nearbyint(float(x[k]) / s)) + z, 0, 255);
    q[k] = static_cast<Q>(u - kShift);
  }
  *scale = s;
  *zero = z;
}

inline float act_scalar(Act act, float y) {
  switch (act) {
    case Act::kGelu:
      return 0.5f * y * (1.f + std::erf(y * 0.70710678118654752f));
    case Act::kRelu:
      return y > 0.f ? y : 0.f;
    default:
      return y;
  }
}

template <typename T>
void dequantize_row_scalar(const int32_t* acc, const int32_t* comp, int32_t comp_mul, int64_t N, float sx,
                           const float* sw, const float* bias, Act act, T* out) {
  for (int64_t n = 0; n < N; ++n) {
    const float y = std::fma(float(comp ? acc[n] - comp_mul * comp[n] : acc[n]) * sx, sw[n], bias[n]);
    out[n] = static_cast<T>(act_scalar(act, y));  // c10: round to nearest even
  }
}

// --- AVX-512 -------------------------------------------------------------------------------------
#ifdef RMT_FAST_X86

// AVX-512 with the byte/word and dq instructions (BW, VL, DQ): ATen's AVX512 capability requires them.
#define RMT_AVX512_BW __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

template <typename T>
RMT_AVX512_BW static inline __m512 load16(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

template <typename T, typename Q>
RMT_AVX512_BW void quantize_row_avx512(const T* x, int64_t K, Q* q, float* scale) {
  __m512 m0 = _mm512_setzero_ps(), m1 = m0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    m0 = _mm512_max_ps(m0, _mm512_abs_ps(load16(x + k, 0xffff)));
    m1 = _mm512_max_ps(m1, _mm512_abs_ps(load16(x + k + 16, 0xffff)));
  }
  for (; k < K; k += 16) m0 = _mm512_max_ps(m0, _mm512_abs_ps(load16(x + k, tail_mask(std::min<int64_t>(16, K - k)))));
  const float s = std::max(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)), FLT_MIN) / kQMax;
  const __m512 vs = _mm512_set1_ps(s);
  for (k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, K - k));
    // a true division (not a multiply by 1/s): the integers are those of round(x / s)
    const __m512 v = _mm512_div_ps(load16(x + k, m), vs);
    const __m512i i = _mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m128i b = _mm512_cvtsepi32_epi8(i);
    if constexpr (std::is_same_v<Q, uint8_t>) b = _mm_xor_si128(b, _mm_set1_epi8(char(0x80)));  // + 128
    _mm_mask_storeu_epi8(q + k, m, b);
  }
  *scale = s;
}

template <typename T, typename Q>
RMT_AVX512_BW void quantize_row_asym_avx512(const T* x, int64_t K, Q* q, float* scale, int32_t* zero) {
  // from 0: the range holds 0 (masked lanes load 0); two chains each, as quantize_row_avx512
  __m512 lo0 = _mm512_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 v0 = load16(x + k, 0xffff), v1 = load16(x + k + 16, 0xffff);
    lo0 = _mm512_min_ps(lo0, v0);
    hi0 = _mm512_max_ps(hi0, v0);
    lo1 = _mm512_min_ps(lo1, v1);
    hi1 = _mm512_max_ps(hi1, v1);
  }
  for (; k < K; k += 16) {
    const __m512 v = load16(x + k, tail_mask(std::min<int64_t>(16, K - k)));
    lo0 = _mm512_min_ps(lo0, v);
    hi0 = _mm512_max_ps(hi0, v);
  }
  const float l = _mm512_reduce_min_ps(_mm512_min_ps(lo0, lo1));
  const float s = asym_scale(l, _mm512_reduce_max_ps(_mm512_max_ps(hi0, hi1)));
  const int32_t z = asym_zero(l, s);
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i vz = _mm512_set1_epi32(z), v0 = _mm512_setzero_si512(), v255 = _mm512_set1_epi32(255);
  for (k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, K - k));
    const __m512 v = _mm512_div_ps(load16(x + k, m), vs);  // a true division, as the scalar code
    __m512i u = _mm512_add_epi32(_mm512_cvt_roundps_epi32(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
    u = _mm512_min_epi32(_mm512_max_epi32(u, v0), v255);
    if constexpr (!std::is_same_v<Q, uint8_t>) u = _mm512_sub_epi32(u, _mm512_set1_epi32(128));
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(u));  // in range: truncation is exact
  }
  *scale = s;
  *zero = z;
}

// erf by the rational approximation of XLA's ErfImpl32 and Eigen's fast erf (x clamped to +-4,
// where erf is +-1 in float32; x * P(x^2) / Q(x^2), degrees 13 and 8): no exp, one reciprocal (rcp14
// and a Newton step). Its error against float64, measured by the tests, is within their float32 bound.
RMT_AVX512_BW static inline __m512 erf_512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(4.f)), _mm512_set1_ps(-4.f));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = _mm512_fmadd_ps(x2, _mm512_set1_ps(-2.72614225801306e-10f), _mm512_set1_ps(2.77068142495902e-08f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.10102402082508e-06f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-5.69250639462346e-05f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-7.34990630326855e-04f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-2.95459980854025e-03f));
  p = _mm512_fmadd_ps(x2, p, _mm512_set1_ps(-1.60960333262415e-02f));
  __m512 q = _mm512_fmadd_ps(x2, _mm512_set1_ps(-1.45660718464996e-05f), _mm512_set1_ps(-2.13374055278905e-04f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.68282697438203e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-7.37332916720468e-03f));
  q = _mm512_fmadd_ps(x2, q, _mm512_set1_ps(-1.42647390514189e-02f));
  __m512 r = _mm512_rcp14_ps(q);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(q, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(_mm512_mul_ps(x, p), r);
}

// 16 columns from acc: act(fma((acc - comp_mul * comp) * sx, sw, bias)) in float32 (lanes outside m are zeros).
template <Act kAct>
RMT_AVX512_BW static inline __m512 dequantize16(const int32_t* acc, const int32_t* comp, int32_t comp_mul,
                                                const float* sw, const float* bias, __m512 vsx, __mmask16 m) {
  __m512i i = _mm512_maskz_loadu_epi32(m, acc);
  if (comp) {
    __m512i c = _mm512_maskz_loadu_epi32(m, comp);
    if (comp_mul != 1) c = _mm512_mullo_epi32(c, _mm512_set1_epi32(comp_mul));
    i = _mm512_sub_epi32(i, c);
  }
  const __m512 a = _mm512_cvtepi32_ps(i);
  __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(a, vsx), _mm512_maskz_loadu_ps(m, sw), _mm512_maskz_loadu_ps(m, bias));
  if constexpr (kAct == Act::kGelu) {
    const __m512 half_y = _mm512_mul_ps(y, _mm512_set1_ps(0.5f));
    y = _mm512_fmadd_ps(half_y, erf_512(_mm512_mul_ps(y, _mm512_set1_ps(0.70710678118654752f))), half_y);
  } else if constexpr (kAct == Act::kRelu) {
    y = _mm512_max_ps(y, _mm512_setzero_ps());
  }
  return y;
}

template <Act kAct, typename T>
RMT_AVX512_BW void dequantize_row_avx512(const int32_t* acc, const int32_t* comp, int32_t comp_mul, int64_t N,
                                         float sx, const float* sw, const float* bias, T* out) {
  const __m512 vsx = _mm512_set1_ps(sx);
  for (int64_t n = 0; n < N; n += 16) {
    const int64_t count = std::min<int64_t>(16, N - n);
    store16(out + n,
            dequantize16<kAct>(acc + n, comp ? comp + n : nullptr, comp_mul, sw + n, bias + n, vsx, tail_mask(count)),
            count);
  }
}

// bfloat16 out where the CPU has AVX512-BF16: vcvtneps2bf16 rounds to nearest even (as store16) in one
// instruction instead of five; float32 values below 2^-126 become zero (its denormal rule).
#define RMT_AVX512_BW_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

template <Act kAct>
RMT_AVX512_BW_BF16 void dequantize_row_avx512_bf16(const int32_t* acc, const int32_t* comp, int32_t comp_mul,
                                                   int64_t N, float sx, const float* sw, const float* bias,
                                                   c10::BFloat16* out) {
  const __m512 vsx = _mm512_set1_ps(sx);
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, N - n));
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(
        dequantize16<kAct>(acc + n, comp ? comp + n : nullptr, comp_mul, sw + n, bias + n, vsx, m));
    _mm256_mask_storeu_epi16(out + n, m, h);
  }
}

#endif  // RMT_FAST_X86

// --- dispatch ------------------------------------------------------------------------------------

// out[n] = act(fma(float(acc[n] - comp_mul * comp[n]) * sx, sw[n], bias[n])) (comp may be null: zeros).
// comp_mul is 1 for the symmetric kernels' +128 correction (comp = 128 x column sums), the row's zero
// point for asymmetric activations (comp = the column sums); the integers are exact in int32.
template <Act kAct, typename T>
void dequantize_row(bool avx, bool native_bf16, const int32_t* acc, const int32_t* comp, int32_t comp_mul, int64_t N,
                    float sx, const float* sw, const float* bias, T* out) {
#ifdef RMT_FAST_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (native_bf16) return dequantize_row_avx512_bf16<kAct>(acc, comp, comp_mul, N, sx, sw, bias, out);
  }
  if (avx) return dequantize_row_avx512<kAct>(acc, comp, comp_mul, N, sx, sw, bias, out);
#endif
  dequantize_row_scalar(acc, comp, comp_mul, N, sx, sw, bias, kAct, out);
}

template <typename T>
void dequantize_row_act(Act act, bool avx, bool native_bf16, const int32_t* acc, const int32_t* comp,
                        int32_t comp_mul, int64_t N, float sx, const float* sw, const float* bias, T* out) {
  switch (act) {
    case Act::kGelu:
      return dequantize_row<Act::kGelu>(avx, native_bf16, acc, comp, comp_mul, N, sx, sw, bias, out);
    case Act::kRelu:
      return dequantize_row<Act::kRelu>(avx, native_bf16, acc, comp, comp_mul, N, sx, sw, bias, out);
    default:
      return dequantize_row<Act::kNone>(avx, native_bf16, acc, comp, comp_mul, N, sx, sw, bias, out);
  }
}

template <typename T, typename Q>
void quantize_row(bool avx, const T* x, int64_t K, Q* q, float* scale) {
#ifdef RMT_FAST_X86
  if (avx) return quantize_row_avx512(x, K, q, scale);
#endif
  quantize_row_scalar(x, K, q, scale);
}

template <typename T, typename Q>
void quantize_row_asym(bool avx, const T* x, int64_t K, Q* q, float* scale, int32_t* zero) {
#ifdef RMT_FAST_X86
  if (avx) return quantize_row_asym_avx512(x, K, q, scale, zero);
#endif
  quantize_row_asym_scalar(x, K, q, scale, zero);
}

inline Act parse_act(const char* op, const std::string& a) {
  if (a == "none") return Act::kNone;
  if (a == "gelu") return Act::kGelu;
  if (a == "relu") return Act::kRelu;
  TORCH_CHECK(false, "rmt_fast::", op, ": activation must be 'none', 'gelu' or 'relu', got '", a, "'");
}

// Per-thread scratch memory kept across calls, one arena per kTag: a kernel carves its buffers out of it
// (ScratchCarver) instead of allocating and filling them on every call of the per-segment loop (up to
// 0.8 MB a GEMM call). Grows, never shrinks; each thread has its own, so concurrent calls do not share.
template <int kTag>
char* thread_scratch(size_t bytes) {
  thread_local std::vector<char> arena;
  if (arena.size() < bytes) arena.resize(bytes);
  return arena.data();
}

inline size_t scratch_round(size_t bytes) { return (bytes + 63) / 64 * 64; }

// Hands out consecutive pieces of a scratch arena, each rounded up to 64 bytes.
struct ScratchCarver {
  char* next;
  template <typename T>
  T* take(int64_t n) {
    T* p = reinterpret_cast<T*>(next);
    next += scratch_round(size_t(n) * sizeof(T));
    return p;
  }
};

// t: a contiguous CPU vector of N values of dtype (named dtype_name in the error).
inline void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t N, at::ScalarType dtype,
                         const char* dtype_name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == N && t.is_contiguous() && t.scalar_type() == dtype && t.device().is_cpu(),
              "rmt_fast::", op, ": ", name, " must be ", dtype_name, ", contiguous, of shape (N) = [", N, "], got ",
              t.scalar_type(), " of shape ", t.sizes());
}

inline void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "rmt_fast::", op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "rmt_fast::", op, ": ", name,
              " must have stride 1 in its last dimension, got strides ", t.strides());
  TORCH_CHECK(t.device().is_cpu(), "rmt_fast::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

}  // namespace int8_rows
}  // namespace rmt_fast
