// int8 CPU attention for rmt_fast._C: torch.ops.rmt_fast.attention_int8 (docs/EXTENSION.md, "int8
// attention"), the attention of Engine(..., quantize="int8") where the drift allows (engine/quant.py).
//
// Per (batch, head), with Q, K, V quantized symmetrically to int8 and both products on oneDNN's
// u8 x s8 -> s32 micro-kernel (at::native::cpublas::brgemm, VNNI):
//   q[t, :] ~ sq[t] * qi[t, :]   per query row      (passed as qi + 128, unsigned)
//   k[j, :] ~ sk[j] * ki[j, :]   per key row        comp[j] = 128 * sum_d ki[j, d] undoes the 128
//   v[:, d] ~ sv[d] * vi[:, d]   per value column over the keys (the product sums over keys, so a
//                                scale per key could not come out of the sum)
//   y[t, j] = float(sum_d (qi + 128) ki - comp[j]) * (sk[j] * scale * log2(e)),  x = sq[t] * y
//   online softmax over key blocks of kKvBlock: m = running max of x (sq[t] * max_j y),
//   pu[t, j] = round(2^(fma(y, sq[t], -(m - log2 255)))) = round(255 * 2^(x - m)) (uint8, the
//   probabilities' fixed scale 1/255), l = sum_j pu (rescaled by 2^(m_old - m_new) when the max
//   grows, as the accumulator)
//   out[t, d] = (sum_j pu[t, j] vi[j, d]) * sv[d] / l[t]     (1/255 cancels between the two)
// Every integer sum is exact; the rest is float32. The torch twin (_ext_twins.attention_int8_torch)
// computes the same arithmetic with torch ops, key block by key block.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../rmt_fast.h"

#include "int8_rows.h"
#include "vnni_pack.h"

namespace rmt_fast {
namespace {

using namespace int8_rows;

constexpr int64_t kQRows = 64;  // query rows per micro-kernel call
constexpr float kLog2Of255 = 7.99435343685885793f;

// --- row passes ------------------------------------------------------------------------------------
// The row's query scale sq > 0 is left out of the scores and applied in the exponent:
//   y[j] = float(acc[j] - comp[j]) * skc[j],  x[j] = sq * y[j],  max_j x = sq * max_j y.
// scores_row: y in place of acc (reinterpreted as float), returns max_j y.
float scores_row_scalar(int32_t* acc, const int32_t* comp, const float* skc, int64_t n) {
  float* y = reinterpret_cast<float*>(acc);
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    y[j] = float(acc[j] - comp[j]) * skc[j];
    m = std::max(m, y[j]);
  }
  return m;
}

// pu[j] = round(2^(sq * y[j] - m + log2(255))) = round(255 * 2^(x[j] - m)) for j < n, zeros to n_pad;
// returns sum_j pu[j].
int64_t probs_row_scalar(const float* y, float sq, float m, int64_t n, int64_t n_pad, uint8_t* pu) {
  const float shift = m - kLog2Of255;
  int64_t sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int v = static_cast<int>(std::nearbyint(std::exp2(std::fma(y[j], sq, -shift))));
    pu[j] = static_cast<uint8_t>(v);
    sum += v;
  }
  for (int64_t j = n; j < n_pad; ++j) pu[j] = 0;
  return sum;
}

#ifdef RMT_FAST_X86
RMT_AVX512_BW float scores_row_avx512(int32_t* acc, const int32_t* comp, const float* skc, int64_t n) {
  float* y = reinterpret_cast<float*>(acc);
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(std::min<int64_t>(16, n - j));
    const __m512i a = _mm512_sub_epi32(_mm512_maskz_loadu_epi32(k, acc + j), _mm512_maskz_loadu_epi32(k, comp + j));
    const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_maskz_loadu_ps(k, skc + j));
    _mm512_mask_storeu_ps(y + j, k, v);
    m = _mm512_mask_max_ps(m, k, m, v);
  }
  return _mm512_reduce_max_ps(m);
}

RMT_AVX512_BW int64_t probs_row_avx512(const float* y, float sq, float m, int64_t n, int64_t n_pad, uint8_t* pu) {
  const __m512 vsq = _mm512_set1_ps(sq), vshift = _mm512_set1_ps(m - kLog2Of255);
  __m512i sum = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j < n; j += 16) {
    const __mmask16 k = tail_mask(std::min<int64_t>(16, n - j));
    const __m512 p = exp2_512<true>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, y + j), vsq, vshift));
    const __m512i u = _mm512_maskz_cvt_roundps_epi32(k, p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    sum = _mm512_add_epi32(sum, u);
    _mm_mask_storeu_epi8(pu + j, k, _mm512_cvtusepi32_epi8(u));
  }
  for (j = n; j < n_pad; ++j) pu[j] = 0;
  return _mm512_reduce_add_epi32(sum);
}

// sv[d] = max(sv[d], max_j |v[j, d]|), d < D.
template <typename T>
RMT_AVX512_BW void column_amax_avx512(const T* v, int64_t vs, int64_t L, int64_t D, float* sv) {
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = tail_mask(std::min<int64_t>(16, D - d));
      _mm512_mask_storeu_ps(sv + d, m, _mm512_max_ps(_mm512_maskz_loadu_ps(m, sv + d),
                                                     _mm512_abs_ps(load16(v + j * vs + d, m))));
    }
  }
}

// row[d] = round-half-even(v[d] / sv[d]) as int8, d < D.
template <typename T>
RMT_AVX512_BW void quantize_v_row_avx512(const T* v, int64_t D, const float* sv, int8_t* row) {
  for (int64_t d = 0; d < D; d += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, D - d));
    const __m512 x = _mm512_div_ps(load16(v + d, m), _mm512_mask_loadu_ps(_mm512_set1_ps(1.f), m, sv + d));
    const __m512i i = _mm512_cvt_roundps_epi32(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_mask_storeu_epi8(row + d, m, _mm512_cvtsepi32_epi8(i));
  }
}

// out[d * 4 + i] = rows[i * Dn + d] for 4 rows of Dn (a multiple of 16) bytes.
RMT_AVX512_BW void interleave4_avx512(const int8_t* rows, int64_t Dn, int8_t* out) {
  for (int64_t d = 0; d < Dn; d += 16) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + d));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + Dn + d));
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + 2 * Dn + d));
    const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows + 3 * Dn + d));
    const __m128i ab_lo = _mm_unpacklo_epi8(a, b), ab_hi = _mm_unpackhi_epi8(a, b);
    const __m128i ce_lo = _mm_unpacklo_epi8(c, e), ce_hi = _mm_unpackhi_epi8(c, e);
    __m128i* o = reinterpret_cast<__m128i*>(out + d * 4);
    _mm_storeu_si128(o, _mm_unpacklo_epi16(ab_lo, ce_lo));
    _mm_storeu_si128(o + 1, _mm_unpackhi_epi16(ab_lo, ce_lo));
    _mm_storeu_si128(o + 2, _mm_unpacklo_epi16(ab_hi, ce_hi));
    _mm_storeu_si128(o + 3, _mm_unpackhi_epi16(ab_hi, ce_hi));
  }
}
#endif

// --- packing one (batch, head) ---------------------------------------------------------------------
// K^T as the micro-kernel's B operand, VNNI-4 along D: kt[(d / 4) * Lp * 4 + j * 4 + d % 4] = ki[j, d],
// i.e. the [L, Dp / 4] words of the quantized rows transposed; comp[j] = 128 * sum_d ki[j, d];
// skc[j] = sk[j] * c. Zeros pad D to Dp and the keys to Lp. rows: scratch of L * Dp bytes.
template <typename T>
void pack_k(bool avx, const T* k, int64_t ks, int64_t L, int64_t D, int64_t Dp, int64_t Lp, float c,
            int8_t* rows, int8_t* kt, int32_t* comp, float* skc) {
  for (int64_t j = 0; j < L; ++j) {
    int8_t* row = rows + j * Dp;
    float s;
    quantize_row(avx, k + j * ks, D, row, &s);
    std::fill(row + D, row + Dp, int8_t(0));
    int32_t sum = 0;
    for (int64_t d = 0; d < D; ++d) sum += row[d];
    comp[j] = 128 * sum;
    skc[j] = s * c;
  }
  uint32_t* words = reinterpret_cast<uint32_t*>(kt);
  transpose_words(avx, reinterpret_cast<const char*>(rows), Dp, L, Dp / 4, words, Lp);
  for (int64_t x = 0; x < Dp / 4; ++x) std::fill(words + x * Lp + L, words + (x + 1) * Lp, 0u);
  std::fill(comp + L, comp + Lp, 0);
  std::fill(skc + L, skc + Lp, 0.f);
}

// sv[d] = max(max_j |v[j, d]|, FLT_MIN) / 127 over the L keys, for d < D (1 past D).
template <typename T>
void value_scales(bool avx, const T* v, int64_t vs, int64_t L, int64_t D, int64_t Dn, float* sv) {
  std::fill(sv, sv + Dn, 0.f);
#ifdef RMT_FAST_X86
  if (avx) {
    column_amax_avx512(v, vs, L, D, sv);
  } else
#endif
  {
    for (int64_t j = 0; j < L; ++j) {
      for (int64_t d = 0; d < D; ++d) sv[d] = std::max(sv[d], std::fabs(float(v[j * vs + d])));
    }
  }
  for (int64_t d = 0; d < D; ++d) sv[d] = std::max(sv[d], FLT_MIN) / kQMax;
  std::fill(sv + D, sv + Dn, 1.f);
}

// V as the B operand, VNNI-4 along the keys: vp[(j / 4) * Dn * 4 + d * 4 + j % 4] = vi[j, d] =
// round-half-even(v[j, d] / sv[d]); zeros pad the keys to a multiple of 4 and D to Dn.
// rows: scratch of 4 * Dn bytes.
template <typename T>
void pack_v_int8(bool avx, const T* v, int64_t vs, int64_t L, int64_t D, int64_t Dn, const float* sv, int8_t* rows,
                 int8_t* vp) {
  for (int64_t j0 = 0; j0 < L; j0 += 4) {
    for (int64_t i = 0; i < 4; ++i) {  // four key rows quantized, zeros past L and D
      int8_t* row = rows + i * Dn;
      const int64_t j = j0 + i;
      std::fill(row, row + Dn, int8_t(0));
      if (j >= L) continue;
#ifdef RMT_FAST_X86
      if (avx) {
        quantize_v_row_avx512(v + j * vs, D, sv, row);
        continue;
      }
#endif
      for (int64_t d = 0; d < D; ++d) row[d] = static_cast<int8_t>(std::nearbyint(float(v[j * vs + d]) / sv[d]));
    }
    int8_t* out = vp + j0 * Dn;  // (j0 / 4) * Dn * 4
#ifdef RMT_FAST_X86
    if (avx) {
      interleave4_avx512(rows, Dn, out);
      continue;
    }
#endif
    for (int64_t d = 0; d < Dn; ++d) {
      for (int64_t i = 0; i < 4; ++i) out[d * 4 + i] = rows[i * Dn + d];
    }
  }
}

// --- the kernel ------------------------------------------------------------------------------------
template <typename T>
void attention_int8_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<int64_t>& lens, float scale, at::Tensor& out, const AttentionSizes& sz) {
  const int64_t B = sz.B, Tq = sz.Tq, Tk = sz.Tk, H = sz.H, D = sz.D;
  const int64_t Dp = round_up(D, 4), Dn = round_up(D, 16);
  const int64_t Lp = round_up(std::max<int64_t>(Tk, 1), kNBlock), KV = std::min(kKvBlock, Lp);
  const int64_t QB = std::min(kQRows, Tq);
  const float c = scale * 1.4426950408889634f;  // the softmax in base 2
  const T* qd = q.const_data_ptr<T>();
  const T* kd = k.const_data_ptr<T>();
  const T* vd = v.const_data_ptr<T>();
  T* od = out.data_ptr<T>();
  const int64_t row_out = H * D;
  const bool avx = cpu_has_avx512();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // an upper bound of the pieces below (kt's Dp * Lp <= Lp * Dn; pieces of one type summed), plus
    // each piece's rounding to 64 bytes
    const size_t bytes = scratch_round(Lp * Dp) + scratch_round(4 * Dn) + 2 * scratch_round(Lp * Dn) +
                         scratch_round(4 * (Lp + QB * KV + QB * Dn)) + scratch_round(4 * (2 * Lp + Dn)) +
                         scratch_round(4 * (3 * QB + QB * Dn)) + scratch_round(QB * Dp) + scratch_round(QB * KV);
    ScratchCarver carve{thread_scratch<1>(bytes + 16 * 64)};
    int8_t* krows = carve.take<int8_t>(Lp * Dp);
    int8_t* vrows = carve.take<int8_t>(4 * Dn);
    int8_t* kt = carve.take<int8_t>(Dp * Lp);
    int8_t* vp = carve.take<int8_t>(Lp * Dn);
    int32_t* comp = carve.take<int32_t>(Lp);
    int32_t* S = carve.take<int32_t>(QB * KV);
    int32_t* Oi = carve.take<int32_t>(QB * Dn);
    float* skc = carve.take<float>(Lp);
    float* sv = carve.take<float>(Dn);
    float* sq = carve.take<float>(QB);
    float* O = carve.take<float>(QB * Dn);
    float* mx = carve.take<float>(QB);
    float* sum = carve.take<float>(QB);
    uint8_t* qa = carve.take<uint8_t>(QB * Dp);  // query rows q + 128; D..Dp any: K^T's pad rows are 0
    uint8_t* P = carve.take<uint8_t>(QB * KV);
    bool used = false;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H, L = lens[b];
      if (L == 0) {  // no key: zeros
        for (int64_t t = 0; t < Tq; ++t) {
          T* o = od + (b * Tq + t) * row_out + h * D;
          std::fill(o, o + D, T(0));
        }
        continue;
      }
      used = true;
      pack_k(avx, kd + b * k.stride(0) + h * k.stride(2), k.stride(1), L, D, Dp, Lp, c, krows, kt,
             comp, skc);
      const T* vh = vd + b * v.stride(0) + h * v.stride(2);
      value_scales(avx, vh, v.stride(1), L, D, Dn, sv);
      pack_v_int8(avx, vh, v.stride(1), L, D, Dn, sv, vrows, vp);
      for (int64_t t0 = 0; t0 < Tq; t0 += QB) {
        const int64_t M = std::min(QB, Tq - t0);
        for (int64_t r = 0; r < M; ++r) {
          const T* q_row = qd + b * q.stride(0) + (t0 + r) * q.stride(1) + h * q.stride(2);
          quantize_row(avx, q_row, D, qa + r * Dp, &sq[r]);
        }
        for (int64_t s = 0; s < L; s += KV) {
          const int64_t len = std::min(KV, L - s), len4 = round_up(len, 4);
          at::native::cpublas::brgemm(M, round_up(len, 16), Dp, Dp, Lp, KV, /*add_C=*/false, qa,
                                      reinterpret_cast<const signed char*>(kt + s * 4), S, true);
          for (int64_t r = 0; r < M; ++r) {
            int32_t* srow = S + r * KV;
            float y_max;
            int64_t part;
#ifdef RMT_FAST_X86
            if (avx) {
              y_max = scores_row_avx512(srow, comp + s, skc + s, len);
            } else
#endif
              y_max = scores_row_scalar(srow, comp + s, skc + s, len);
            const float m_blk = sq[r] * y_max;
            const float m_new = s == 0 ? m_blk : std::max(mx[r], m_blk);
            const float* y = reinterpret_cast<const float*>(srow);
#ifdef RMT_FAST_X86
            if (avx) {
              part = probs_row_avx512(y, sq[r], m_new, len, len4, P + r * KV);
            } else
#endif
              part = probs_row_scalar(y, sq[r], m_new, len, len4, P + r * KV);
            if (s == 0) {
              sum[r] = float(part);
            } else {
              const float alpha = std::exp2(mx[r] - m_new);
              sum[r] = sum[r] * alpha + float(part);
              for (int64_t d = 0; d < D; ++d) O[r * Dn + d] *= alpha;
            }
            mx[r] = m_new;
          }
          at::native::cpublas::brgemm(M, Dn, len4, KV, Dn, Dn, /*add_C=*/false, P,
                                      reinterpret_cast<const signed char*>(vp + s * Dn), Oi, true);
          for (int64_t r = 0; r < M; ++r) {
            for (int64_t d = 0; d < D; ++d) {
              const float add = float(Oi[r * Dn + d]) * sv[d];
              O[r * Dn + d] = s == 0 ? add : O[r * Dn + d] + add;
            }
          }
        }
        for (int64_t r = 0; r < M; ++r) {
          T* o = od + (b * Tq + t0 + r) * row_out + h * D;
          const float inv = 1.f / sum[r];  // sum >= 255: the row max gives p = 1
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(O[r * Dn + d] * inv);
        }
      }
    }
    if (used) at::native::cpublas::brgemm_release(true);
  });
}

at::Tensor attention_int8_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& key_lengths, double scale) {
  const AttentionSizes sz = check_attention(q, k, v, key_lengths, scale, "attention_int8");
  at::Tensor out = at::empty({sz.B, sz.Tq, sz.H * sz.D}, q.options());
  if (out.numel() == 0) return out;
  const std::vector<int64_t> lens = host_key_lengths(key_lengths, sz.B, sz.Tk, "attention_int8");
  dispatch_float<false>(q.scalar_type(), "rmt_fast::attention_int8: q", [&](auto zero) {
    attention_int8_kernel<decltype(zero)>(q, k, v, lens, static_cast<float>(scale), out, sz);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) { m.impl("attention_int8", &attention_int8_cpu); }

}  // namespace rmt_fast
