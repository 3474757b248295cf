// AVX-512 row passes of the CPU attention (the online softmax's max, exp2 and sum, rescale, store)
// and the two packing helpers (a 16 x 16 transpose of 32-bit words, the interleave of VNNI pairs).
//
// Compiled with target attributes, not with -mavx512f for the whole file: the build flags stay
// generic and attention.cpp calls these only where the CPU has AVX-512 (cpu_has_avx512()). That is
// also why at::vec::Vectorized<float> cannot replace them: its AVX-512 specialisation is chosen at
// compile time by ATen's CPU_CAPABILITY macros, which would need a per-ISA build and dispatch.
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define RMT_FAST_X86 1
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

// GCC 12's AVX-512 headers trip these inside the masked intrinsics (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#define RMT_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define RMT_AVX512_BF16 __attribute__((target("avx512f,avx512bf16,avx512vl,avx2,fma,f16c")))

namespace rmt_fast {

// 2^x for finite x: 2^round(x) by scalef times 2^f, f in [-1/2, 1/2], by its Taylor polynomial of
// degree 6 (relative error below 1.3e-7, about 1 ulp), or with kLow of degree 5 (below 2.5e-6, for
// probabilities that are rounded to 16 bits next: bfloat16's half ulp is 2e-3); x far below -149
// gives 0.
template <bool kLow = false>
RMT_AVX512 static inline __m512 exp2_512(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p;
  if constexpr (kLow) {
    p = _mm512_set1_ps(1.3333558146428443e-3f);
  } else {
    p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

RMT_AVX512 inline __mmask16 tail_mask(int64_t rem) { return static_cast<__mmask16>((1u << rem) - 1u); }

// 16 floats to P at p (the first `count` of them).
template <typename P>
RMT_AVX512 static inline void store16(P* p, __m512 x, int64_t count) {
  if constexpr (std::is_same_v<P, float>) {
    _mm512_mask_storeu_ps(p, tail_mask(count), x);
  } else {
    __m256i h;
    if constexpr (std::is_same_v<P, c10::BFloat16>) {
      // round to nearest even (NaN stays NaN: only its payload's low bits can carry into the sign)
      const __m512i b = _mm512_castps_si512(x);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
      const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
      h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
    } else {
      h = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    if (count == 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    } else {
      alignas(32) uint16_t tmp[16];
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), h);
      std::memcpy(p, tmp, count * sizeof(uint16_t));
    }
  }
}

inline RMT_AVX512 float row_max_avx512(const float* s, int64_t n, float c) {
  if (c > 0.f) {  // max(c s) = c max(s)
    __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      m0 = _mm512_max_ps(m0, _mm512_loadu_ps(s + i));
      m1 = _mm512_max_ps(m1, _mm512_loadu_ps(s + i + 16));
    }
    for (; i < n; i += 16) {
      const __mmask16 k = tail_mask(std::min<int64_t>(16, n - i));
      m0 = _mm512_mask_max_ps(m0, k, m0, _mm512_maskz_loadu_ps(k, s + i));
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1)) * c;
  }
  const __m512 vc = _mm512_set1_ps(c);
  __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm512_max_ps(m0, _mm512_mul_ps(_mm512_loadu_ps(s + i), vc));
    m1 = _mm512_max_ps(m1, _mm512_mul_ps(_mm512_loadu_ps(s + i + 16), vc));
  }
  for (; i < n; i += 16) {
    const __mmask16 k = tail_mask(std::min<int64_t>(16, n - i));
    m0 = _mm512_mask_max_ps(m0, k, m0, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, s + i), vc));
  }
  return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

template <typename P>
inline RMT_AVX512 float exp_row_avx512(const float* s, int64_t n, float c, float m, P* p) {
  constexpr bool low = !std::is_same_v<P, float>;
  const __m512 vc = _mm512_set1_ps(c), vm = _mm512_set1_ps(m);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 e0 = exp2_512<low>(_mm512_fmsub_ps(_mm512_loadu_ps(s + i), vc, vm));
    const __m512 e1 = exp2_512<low>(_mm512_fmsub_ps(_mm512_loadu_ps(s + i + 16), vc, vm));
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
    store16(p + i, e0, 16);
    store16(p + i + 16, e1, 16);
  }
  for (; i < n; i += 16) {
    const int64_t count = std::min<int64_t>(16, n - i);
    const __mmask16 k = tail_mask(count);
    const __m512 e =
        _mm512_maskz_mov_ps(k, exp2_512<low>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + i), vc, vm)));
    acc0 = _mm512_add_ps(acc0, e);
    store16(p + i, e, count);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// The bfloat16 probabilities of the bf16 micro-kernel path, rounded by AVX512-BF16 (every AMX CPU has
// it; without AMX, bf16_brgemm_usable takes this path only where the CPU has it). A twin of
// exp_row_avx512 rather than one template: its intrinsics need the wider target attribute.
inline RMT_AVX512_BF16 float exp_row_avx512_bf16(const float* s, int64_t n, float c, float m,
                                          c10::BFloat16* p) {
  const __m512 vc = _mm512_set1_ps(c), vm = _mm512_set1_ps(m);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 e0 = exp2_512<true>(_mm512_fmsub_ps(_mm512_loadu_ps(s + i), vc, vm));
    const __m512 e1 = exp2_512<true>(_mm512_fmsub_ps(_mm512_loadu_ps(s + i + 16), vc, vm));
    acc0 = _mm512_add_ps(acc0, e0);
    acc1 = _mm512_add_ps(acc1, e1);
    _mm512_storeu_si512(p + i, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
  }
  for (; i < n; i += 16) {
    const int64_t count = std::min<int64_t>(16, n - i);
    const __mmask16 k = tail_mask(count);
    const __m512 e =
        _mm512_maskz_mov_ps(k, exp2_512<true>(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(k, s + i), vc, vm)));
    acc0 = _mm512_add_ps(acc0, e);
    alignas(32) uint16_t tmp[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(tmp), (__m256i)_mm512_cvtneps_pbh(e));
    std::memcpy(p + i, tmp, count * sizeof(uint16_t));
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

inline RMT_AVX512 void scale_row_avx512(float* o, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(std::min<int64_t>(16, n - i));
    _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, o + i), va));
  }
}

template <typename T>
inline RMT_AVX512 void store_row_avx512(const float* o, int64_t n, float inv, T* out) {
  const __m512 vi = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t count = std::min<int64_t>(16, n - i);
    store16(out + i, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail_mask(count), o + i), vi), count);
  }
}

// 16 x 16 block of 32-bit words: dst[x * ld + n] = word x of row n (rows at src + n * row_bytes).
inline RMT_AVX512 void transpose16_avx512(const char* src, int64_t row_bytes, uint32_t* dst, int64_t ld) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * row_bytes);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int g = 0; g < 16; g += 8) {
    for (int i = 0; i < 4; ++i) {
      t[g + i] = _mm512_shuffle_i32x4(r[g + i], r[g + 4 + i], 0x88);
      t[g + 4 + i] = _mm512_shuffle_i32x4(r[g + i], r[g + 4 + i], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * ld, r[i]);  // r[i]: word i of rows 0..15
}

// dst[n] = lo[n] | hi[n] << 16 (a VNNI pair of 16-bit values per 32-bit word); hi may be null (0).
inline RMT_AVX512 void interleave_avx512(const uint16_t* lo, const uint16_t* hi, int64_t n, uint32_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + i)));
    __m512i w = a;
    if (hi != nullptr) {
      const __m512i b =
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + i)));
      w = _mm512_or_si512(a, _mm512_slli_epi32(b, 16));
    }
    _mm512_storeu_si512(dst + i, w);
  }
  for (; i < n; ++i) dst[i] = uint32_t(lo[i]) | (hi != nullptr ? uint32_t(hi[i]) << 16 : 0u);
}

}  // namespace rmt_fast

#endif  // x86-64

#include <ATen/Version.h>

namespace rmt_fast {

// Whether the CPU kernels take the AVX-512 code of this header: where ATen itself runs its AVX-512
// kernels (at::get_cpu_capability(), which follows torch's own ATEN_CPU_CAPABILITY switch:
// ATEN_CPU_CAPABILITY=avx2 takes the scalar paths, as the tests do). Read once per process.
inline bool cpu_has_avx512() {
#ifdef RMT_FAST_X86
  static const bool has = at::get_cpu_capability() == "AVX512";
  return has;
#else
  return false;
#endif
}

}  // namespace rmt_fast
