// The passes around the int8 GEMM of rmt_fast/engine/quant.py (docs/EXTENSION.md, "int8 passes"):
//
//   int8_quantize_rows: x [R, K] (float32/bfloat16/float16) -> q [R, K] int8, scale [R, 1] float32,
//     scale[r] = max(amax_k |x[r, k]|, FLT_MIN) / 127 (float32), q = round-half-even(x / scale[r]);
//   int8_dequantize: acc [R, N] int32 -> out [R, N] (float32/bfloat16/float16),
//     out = act(fma(float(acc) * row_scale[r], col_scale[n], bias[n])) rounded once to out's dtype,
//     act one of none, gelu (erf) and relu;
//   int8_linear: the two around at::_int_mm, per block of rows, one block per task of ONE parallel
//     region (each thread quantizes, multiplies and dequantizes its own blocks, so the int32 sums stay
//     in its cache and the GEMM costs one barrier, not three per block).
//
// Each is one pass over memory (a row is read once into cache and written once), where the torch
// ops they replace made four to six. AVX-512 where ATen runs its own AVX-512 kernels
// (at::get_cpu_capability(); ATEN_CPU_CAPABILITY=avx2 takes the scalar code, as the tests do), with
// target attributes so the build flags stay generic (as avx512.h); elsewhere scalar loops that give
// the same integers and, apart from GELU's erf (std::erf there, a rational approximation here), the
// same floats.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

#include "../rmt_fast.h"

#include "avx512.h"

namespace rmt_fast {
namespace {

constexpr float kQMax = 127.f;
enum class Act { kNone, kGelu, kRelu };

// The AVX512-BF16 rounding of bfloat16 outputs; RMT_FAST_INT8_NO_AVX512_BF16=1 (read once; for the
// tests) keeps the plain AVX-512 one.
bool int8_avx512_bf16() {
#ifdef RMT_FAST_X86
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16") != 0 &&
                          std::getenv("RMT_FAST_INT8_NO_AVX512_BF16") == nullptr;
  return has;
#else
  return false;
#endif
}

// Rows per parallel chunk: about 16 K elements, so that small problems stay on one thread.
int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(row_elems, 1));
}

// --- scalar --------------------------------------------------------------------------------------

template <typename T>
void quantize_row_scalar(const T* x, int64_t K, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(float(x[k])));
  const float s = std::max(amax, FLT_MIN) / kQMax;
  for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(std::nearbyint(float(x[k]) / s));
  *scale = s;
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
void dequantize_row_scalar(const int32_t* acc, int64_t N, float sx, const float* sw, const float* bias,
                           Act act, T* out) {
  for (int64_t n = 0; n < N; ++n) {
    const float y = std::fma(float(acc[n]) * sx, sw[n], bias[n]);
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

template <typename T>
RMT_AVX512_BW void quantize_row_avx512(const T* x, int64_t K, int8_t* q, float* scale) {
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
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtsepi32_epi8(i));
  }
  *scale = s;
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

// 16 columns from acc: act(fma(acc * sx, sw, bias)) in float32 (lanes outside m are zeros).
template <Act kAct>
RMT_AVX512_BW static inline __m512 dequantize16(const int32_t* acc, const float* sw, const float* bias, __m512 vsx,
                                                __mmask16 m) {
  const __m512 a = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, acc));
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
RMT_AVX512_BW void dequantize_row_avx512(const int32_t* acc, int64_t N, float sx, const float* sw,
                                         const float* bias, T* out) {
  const __m512 vsx = _mm512_set1_ps(sx);
  for (int64_t n = 0; n < N; n += 16) {
    const int64_t count = std::min<int64_t>(16, N - n);
    store16(out + n, dequantize16<kAct>(acc + n, sw + n, bias + n, vsx, tail_mask(count)), count);
  }
}

// bfloat16 out where the CPU has AVX512-BF16: vcvtneps2bf16 rounds to nearest even (as store16) in one
// instruction instead of five; float32 values below 2^-126 become zero (its denormal rule).
#define RMT_AVX512_BW_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

template <Act kAct>
RMT_AVX512_BW_BF16 void dequantize_row_avx512_bf16(const int32_t* acc, int64_t N, float sx, const float* sw,
                                                   const float* bias, c10::BFloat16* out) {
  const __m512 vsx = _mm512_set1_ps(sx);
  for (int64_t n = 0; n < N; n += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, N - n));
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(dequantize16<kAct>(acc + n, sw + n, bias + n, vsx, m));
    _mm256_mask_storeu_epi16(out + n, m, h);
  }
}

#endif  // RMT_FAST_X86

// --- the ops -------------------------------------------------------------------------------------

template <Act kAct, typename T>
void dequantize_row(bool avx, bool native_bf16, const int32_t* acc, int64_t N, float sx, const float* sw,
                    const float* bias, T* out) {
#ifdef RMT_FAST_X86
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (native_bf16) return dequantize_row_avx512_bf16<kAct>(acc, N, sx, sw, bias, out);
  }
  if (avx) return dequantize_row_avx512<kAct>(acc, N, sx, sw, bias, out);
#endif
  dequantize_row_scalar(acc, N, sx, sw, bias, kAct, out);
}

void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "rmt_fast::", op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "rmt_fast::", op, ": ", name,
              " must have stride 1 in its last dimension, got strides ", t.strides());
  TORCH_CHECK(t.device().is_cpu(), "rmt_fast::", op, ": ", name, " must be a CPU tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor> int8_quantize_rows_cpu(const at::Tensor& x) {
  const char* op = "int8_quantize_rows";
  check_rows(op, "x", x);
  const int64_t R = x.size(0), K = x.size(1), ld = x.stride(0);
  at::Tensor q = at::empty({R, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({R, 1}, x.options().dtype(at::kFloat));
  if (R == 0) return {q, scale};
  int8_t* qd = q.data_ptr<int8_t>();
  float* sd = scale.data_ptr<float>();
  const bool avx = cpu_has_avx512();
  dispatch_float<false>(x.scalar_type(), "rmt_fast::int8_quantize_rows: x", [&](auto zero) {
    using T = decltype(zero);
    const T* xd = x.const_data_ptr<T>();
    at::parallel_for(0, R, grain_rows(K), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
#ifdef RMT_FAST_X86
        if (avx) {
          quantize_row_avx512(xd + r * ld, K, qd + r * K, sd + r);
          continue;
        }
#endif
        quantize_row_scalar(xd + r * ld, K, qd + r * K, sd + r);
      }
    });
  });
  return {q, scale};
}

Act parse_act(const std::string& a) {
  if (a == "none") return Act::kNone;
  if (a == "gelu") return Act::kGelu;
  if (a == "relu") return Act::kRelu;
  TORCH_CHECK(false, "rmt_fast::int8_dequantize: activation must be 'none', 'gelu' or 'relu', got '", a, "'");
}

void int8_dequantize_cpu(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& col_scale,
                         const at::Tensor& bias, c10::string_view activation, at::Tensor& out) {
  const char* op = "int8_dequantize";
  check_rows(op, "acc", acc);
  check_rows(op, "out", out);
  const int64_t R = acc.size(0), N = acc.size(1);
  TORCH_CHECK(acc.scalar_type() == at::kInt, "rmt_fast::", op, ": acc must be int32, got ", acc.scalar_type());
  TORCH_CHECK(out.size(0) == R && out.size(1) == N, "rmt_fast::", op, ": out must have shape (R, N) = [", R,
              ", ", N, "], got ", out.sizes());
  TORCH_CHECK(row_scale.numel() == R && row_scale.is_contiguous() && row_scale.scalar_type() == at::kFloat,
              "rmt_fast::", op, ": row_scale must be contiguous float32 with R = ", R, " values, got ",
              row_scale.scalar_type(), " of shape ", row_scale.sizes());
  auto check_vector = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N && t.is_contiguous() && t.scalar_type() == at::kFloat,
                "rmt_fast::", op, ": ", name, " must be contiguous float32 of shape (N) = [", N, "], got ",
                t.scalar_type(), " of shape ", t.sizes());
  };
  check_vector("col_scale", col_scale);
  check_vector("bias", bias);
  const Act act = parse_act(std::string(activation));
  if (R == 0 || N == 0) return;
  const int32_t* ad = acc.const_data_ptr<int32_t>();
  const float* sx = row_scale.const_data_ptr<float>();
  const float* sw = col_scale.const_data_ptr<float>();
  const float* bd = bias.const_data_ptr<float>();
  const int64_t lda = acc.stride(0), ldo = out.stride(0);
  const bool avx = cpu_has_avx512(), native_bf16 = int8_avx512_bf16();
  dispatch_float<false>(out.scalar_type(), "rmt_fast::int8_dequantize: out", [&](auto zero) {
    using T = decltype(zero);
    T* od = out.data_ptr<T>();
    at::parallel_for(0, R, grain_rows(N), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int32_t* a = ad + r * lda;
        T* o = od + r * ldo;
        switch (act) {
          case Act::kGelu:
            dequantize_row<Act::kGelu>(avx, native_bf16, a, N, sx[r], sw, bd, o);
            break;
          case Act::kRelu:
            dequantize_row<Act::kRelu>(avx, native_bf16, a, N, sx[r], sw, bd, o);
            break;
          default:
            dequantize_row<Act::kNone>(avx, native_bf16, a, N, sx[r], sw, bd, o);
        }
      }
    });
  });
}

// out [R, N] = act(x [R, K] @ W^T * scales + bias), W given as qweight_t [K, N] int8 (any strides)
// with its per-channel weight_scale [N]; blocks of row_block rows, each on one thread (the ops
// inside a parallel region run on the calling thread).
void int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight_t, const at::Tensor& weight_scale,
                     const at::Tensor& bias, c10::string_view activation, int64_t row_block, at::Tensor& out) {
  const char* op = "int8_linear";
  check_rows(op, "x", x);
  check_rows(op, "out", out);
  TORCH_CHECK(qweight_t.dim() == 2 && qweight_t.scalar_type() == at::kChar && qweight_t.size(0) == x.size(1),
              "rmt_fast::", op, ": qweight_t must be int8 of shape (K, N) with K = ", x.size(1), ", got ",
              qweight_t.scalar_type(), " of shape ", qweight_t.sizes());
  TORCH_CHECK(row_block >= 1, "rmt_fast::", op, ": row_block must be >= 1, got ", row_block);
  const int64_t R = x.size(0);
  TORCH_CHECK(out.size(0) == R && out.size(1) == qweight_t.size(1), "rmt_fast::", op,
              ": out must have shape (R, N) = [", R, ", ", qweight_t.size(1), "], got ", out.sizes());
  parse_act(std::string(activation));  // checked before any work
  const int64_t blocks = (R + row_block - 1) / row_block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * row_block, rows = std::min(row_block, R - r0);
      auto [q, scale] = int8_quantize_rows_cpu(x.narrow(0, r0, rows));
      at::Tensor block_out = out.narrow(0, r0, rows);
      int8_dequantize_cpu(at::_int_mm(q, qweight_t), scale, weight_scale, bias, activation, block_out);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) {
  m.impl("int8_quantize_rows", &int8_quantize_rows_cpu);
  m.impl("int8_dequantize", &int8_dequantize_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
}

}  // namespace rmt_fast
