// Fused CPU attention for rmt_fast._C: torch.ops.rmt_fast.attention (docs/EXTENSION.md, "Fused CPU
// attention").
//
// out[b, t, h*D + d] = sum_j softmax_j(scale * q[b,t,h,:] . k[b,j,h,:]) v[b,j,h,d] over the keys
// j < key_lengths[b] (all Tk keys without key_lengths; no key -> zeros), softmax in float32.
//
// Flash-style: an online softmax over key blocks of kKvBlock keys, per (batch, head, block of
// kQBlock query rows), parallel over those with at::parallel_for. The two products of a block run
// through ATen's oneDNN micro-kernel, at::native::cpublas::brgemm (AMX for bfloat16 where the CPU has
// it), one call for q k^T over the whole key block and one per 64 output columns for p v, on K^T
// and V packed once per (batch, head) into the micro-kernel's layout (VNNI pairs for 16-bit types,
// plain rows for float32, which reads V in place). Keys past key_lengths[b] are never read: the
// blocks stop at the key length instead of masking. The row passes (max, exp and sum, rescale,
// normalise) are AVX-512 where the CPU has it (exp2 by scalef and a polynomial), else scalar.
//
// Why this beats ATen's own flash kernel (FlashAttentionKernel.cpp) here: for bfloat16 that kernel
// calls cpublas::gemm per block, which is oneDNN's generic gemm API (a primitive call with its own
// packing per call), not the AMX micro-kernel on pre-packed K and V; it only uses brgemm + pack for
// float16. And SDPA's mask path adds a float mask to every score.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../rmt_fast.h"

#if defined(__x86_64__) || defined(_M_X64)
#define RMT_FAST_X86 1
#include <immintrin.h>
// GCC 12's AVX-512 headers trip these inside the masked intrinsics (_mm512_undefined_*).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

// #define RMT_FAST_ATTN_PROFILE  // per-phase timings of thread 0, printed by torch.ops.rmt_fast.attn_prof
#ifdef RMT_FAST_ATTN_PROFILE
#include <chrono>
#include <cstdio>
#define PROF_NOW(t) const double t = prof_now()
#define PROF_ADD(i, t0, t1) \
  if (tid == 0) g_prof[i] += (t1) - (t0)
#else
#define PROF_NOW(t)
#define PROF_ADD(i, t0, t1)
#endif

namespace rmt_fast {
namespace {
#ifdef RMT_FAST_ATTN_PROFILE
double g_prof[4];
double prof_now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
#endif

constexpr int64_t kQBlock = 64;    // query rows per work item (brgemm M)
constexpr int64_t kKvBlock = 512;  // keys per online-softmax step (a multiple of kNBlock)
constexpr int64_t kNBlock = 64;    // K^T columns are padded to 64s; p v goes 64 columns a call

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t div_up(int64_t x, int64_t m) { return (x + m - 1) / m; }

template <typename To, typename From>
inline To to_type(From x) {
  if constexpr (std::is_same_v<To, From>) {
    return x;
  } else {
    return static_cast<To>(static_cast<float>(x));
  }
}

// --- row passes, scalar ----------------------------------------------------------------------------
//
// The softmax runs in base 2: with c = scale * log2(e), m = max_j(c s_j), p_j = 2^(c s_j - m).

float row_max_scalar(const float* s, int64_t n, float c) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, s[i] * c);
  return m;
}

template <typename P>
float exp_row_scalar(const float* s, int64_t n, float c, float m, P* p) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    const float e = std::exp2(std::fma(s[i], c, -m));
    sum += e;
    p[i] = to_type<P>(e);
  }
  return sum;
}

void scale_row_scalar(float* o, int64_t n, float a) {
  for (int64_t i = 0; i < n; ++i) o[i] *= a;
}

template <typename T>
void store_row_scalar(const float* o, int64_t n, float inv, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_type<T>(o[i] * inv);
}

// --- row passes and packing, AVX-512 ---------------------------------------------------------------

#ifdef RMT_FAST_X86
#define RMT_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#define RMT_AVX512_BF16 __attribute__((target("avx512f,avx512bf16,avx512vl,avx2,fma,f16c")))

// RMT_FAST_ATTENTION_NO_AVX512=1 takes the scalar paths (read once; for the tests).
bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") != 0 &&
                          std::getenv("RMT_FAST_ATTENTION_NO_AVX512") == nullptr;
  return has;
}

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

inline __mmask16 tail_mask(int64_t rem) { return static_cast<__mmask16>((1u << rem) - 1u); }

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

RMT_AVX512 float row_max_avx512(const float* s, int64_t n, float c) {
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
RMT_AVX512 float exp_row_avx512(const float* s, int64_t n, float c, float m, P* p) {
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
RMT_AVX512_BF16 float exp_row_avx512_bf16(const float* s, int64_t n, float c, float m,
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

RMT_AVX512 void scale_row_avx512(float* o, int64_t n, float a) {
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(std::min<int64_t>(16, n - i));
    _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, o + i), va));
  }
}

template <typename T>
RMT_AVX512 void store_row_avx512(const float* o, int64_t n, float inv, T* out) {
  const __m512 vi = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t count = std::min<int64_t>(16, n - i);
    store16(out + i, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail_mask(count), o + i), vi), count);
  }
}

// 16 x 16 block of 32-bit words: dst[x * ld + n] = word x of row n (rows at src + n * row_bytes).
RMT_AVX512 void transpose16_avx512(const char* src, int64_t row_bytes, uint32_t* dst, int64_t ld) {
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
RMT_AVX512 void interleave_avx512(const uint16_t* lo, const uint16_t* hi, int64_t n, uint32_t* dst) {
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
#else
bool cpu_has_avx512() { return false; }
#endif

float row_max(bool avx, const float* s, int64_t n, float c) {
#ifdef RMT_FAST_X86
  if (avx) return row_max_avx512(s, n, c);
#endif
  return row_max_scalar(s, n, c);
}
template <typename P>
float exp_row(bool avx, const float* s, int64_t n, float c, float m, P* p) {
#ifdef RMT_FAST_X86
  if (avx) {
    if constexpr (std::is_same_v<P, c10::BFloat16>) return exp_row_avx512_bf16(s, n, c, m, p);
    return exp_row_avx512(s, n, c, m, p);
  }
#endif
  return exp_row_scalar(s, n, c, m, p);
}
void scale_row(bool avx, float* o, int64_t n, float a) {
#ifdef RMT_FAST_X86
  if (avx) return scale_row_avx512(o, n, a);
#endif
  scale_row_scalar(o, n, a);
}
template <typename T>
void store_row(bool avx, const float* o, int64_t n, float inv, T* out) {
#ifdef RMT_FAST_X86
  if (avx) return store_row_avx512(o, n, inv, out);
#endif
  store_row_scalar(o, n, inv, out);
}

// dst[x * ld + n] = the 32-bit word x of row n, row n at src + n * row_bytes, n < rows, x < words.
void transpose_words(bool avx, const char* src, int64_t row_bytes, int64_t rows, int64_t words,
                     uint32_t* dst, int64_t ld) {
  int64_t n0 = 0;
#ifdef RMT_FAST_X86
  if (avx) {
    for (; n0 + 16 <= rows; n0 += 16) {
      int64_t x0 = 0;
      for (; x0 + 16 <= words; x0 += 16) {
        transpose16_avx512(src + n0 * row_bytes + 4 * x0, row_bytes, dst + x0 * ld + n0, ld);
      }
      for (int64_t n = n0; n < n0 + 16; ++n) {
        for (int64_t x = x0; x < words; ++x) std::memcpy(dst + x * ld + n, src + n * row_bytes + 4 * x, 4);
      }
    }
  }
#endif
  for (int64_t n = n0; n < rows; ++n) {
    for (int64_t x = 0; x < words; ++x) std::memcpy(dst + x * ld + n, src + n * row_bytes + 4 * x, 4);
  }
}

// --- packing of K^T and V into the micro-kernel's B layout -----------------------------------------
//
// brgemm computes C[M, N] (+)= A[M, K] B[K, N], A and C row-major, B either plain row-major [K, N]
// with row length ld_b or, for 16-bit types (vnni), in pairs of K rows: B[k/2][n][k%2], ld_b
// counting pairs. Per (batch, head), with L keys and Lp = Tk rounded up to 64:
//   K^T: [Dk, Lp] (plain, Dk = D) or [Dk/2, Lp, 2] (vnni, Dk = D rounded up to even), ld_b = Lp,
//        zeros past D and for keys L .. L rounded up to 64;
//   V:   per key block at key s of ekv = (block length rounded up to even) rows, chunks of
//        [ekv, w] (plain) or [ekv/2, w, 2] (vnni) over the Dn = D rounded up to 16 columns,
//        w = min(64, Dn - c0), ld_b = w; the block at s * Dn, its chunk c0 at s * Dn + ekv * c0
//        (zeros past the block's keys and past D). float32 uses V in place instead.

template <typename in_t, typename mm_t, bool vnni>
void pack_kt(bool avx, const in_t* k, int64_t ks, int64_t L, int64_t D, int64_t Lp, mm_t* dst) {
  const int64_t Lz = round_up(L, kNBlock);  // columns L .. Lz - 1 are read (as zeros)
  if constexpr (std::is_same_v<in_t, mm_t>) {
    // float32 words, or pairs of 16-bit values moving as one 32-bit word
    constexpr int64_t per_word = 4 / sizeof(mm_t);
    const int64_t words = D / per_word, Dk = round_up(D, per_word);
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    transpose_words(avx, reinterpret_cast<const char*>(k), ks * int64_t(sizeof(in_t)), L, words, d, Lp);
    if (Dk > D) {  // odd D (16-bit): the last word is (k[D-1], 0)
      for (int64_t n = 0; n < L; ++n) {
        uint16_t half[2] = {0, 0};
        std::memcpy(&half[0], k + n * ks + D - 1, sizeof(uint16_t));
        std::memcpy(d + words * Lp + n, half, 4);
      }
    }
    for (int64_t x = 0; x < Dk / per_word; ++x) {
      for (int64_t n = L; n < Lz; ++n) d[x * Lp + n] = 0;
    }
  } else {
    const int64_t Dk = vnni ? round_up(D, 2) : D;
    for (int64_t n = 0; n < Lz; ++n) {
      const in_t* row = k + n * ks;
      for (int64_t x = 0; x < Dk; ++x) {
        const mm_t val = (n < L && x < D) ? to_type<mm_t>(row[x]) : mm_t(0);
        if constexpr (vnni) {
          dst[((x / 2) * Lp + n) * 2 + (x % 2)] = val;
        } else {
          dst[x * Lp + n] = val;
        }
      }
    }
  }
}

template <typename in_t, typename mm_t, bool vnni>
void pack_v(bool avx, const in_t* v, int64_t vs, int64_t L, int64_t D, int64_t Dn, mm_t* dst) {
  for (int64_t s = 0; s < L; s += kKvBlock) {
    const int64_t len = std::min(kKvBlock, L - s), ekv = round_up(len, 2);
    for (int64_t c0 = 0; c0 < Dn; c0 += kNBlock) {
      const int64_t w = std::min(kNBlock, Dn - c0), cols = std::max<int64_t>(0, std::min(w, D - c0));
      mm_t* d = dst + s * Dn + ekv * c0;
      if constexpr (vnni && std::is_same_v<in_t, mm_t>) {
#ifdef RMT_FAST_X86
        if (avx) {
          for (int64_t r = 0; r < ekv; r += 2) {
            const uint16_t* lo = reinterpret_cast<const uint16_t*>(v + (s + r) * vs + c0);
            const uint16_t* hi = r + 1 < len ? reinterpret_cast<const uint16_t*>(v + (s + r + 1) * vs + c0) : nullptr;
            uint32_t* out = reinterpret_cast<uint32_t*>(d + r * w);
            interleave_avx512(lo, hi, cols, out);
            for (int64_t n = cols; n < w; ++n) out[n] = 0;
          }
          continue;
        }
#endif
      }
      for (int64_t r = 0; r < ekv; ++r) {
        const in_t* row = v + (s + r) * vs + c0;
        mm_t* out = vnni ? d + (r / 2) * 2 * w + (r % 2) : d + r * w;
        const int64_t step = vnni ? 2 : 1;
        const int64_t valid = r < len ? cols : 0;
        for (int64_t n = 0; n < valid; ++n) out[n * step] = to_type<mm_t>(row[n]);
        for (int64_t n = valid; n < w; ++n) out[n * step] = mm_t(0);
      }
    }
  }
}

// Whether bfloat16 runs oneDNN's bf16 micro-kernel on VNNI-packed B: on AMX (could_pack) and on
// AVX512-BF16 CPUs without AMX, where brgemm runs it with vdpbf16ps (measured on an AMD Zen 4: 2.2x
// the float32 path, docs/EXTENSION.md). Probed once on a small exact problem, so that a build or CPU
// where the call throws or disagrees takes the float32 path instead.
// RMT_FAST_ATTENTION_BF16_AS_FLOAT32=1 forces the float32 path (read once; for the tests).
bool bf16_brgemm_probe() {
  constexpr int64_t M = 3, N = 64, K = 6;  // B in VNNI pairs: B[k / 2][n][k % 2], ld_b = N
  std::vector<c10::BFloat16> a(M * K), b(K * N);
  std::vector<float> c(M * N, 0.f), want(M * N, 0.f);
  for (int64_t i = 0; i < M * K; ++i) a[i] = c10::BFloat16(float(i % 5) - 2.f);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t n = 0; n < N; ++n) b[((k / 2) * N + n) * 2 + k % 2] = c10::BFloat16(float((k + n) % 7) - 3.f);
  }
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) want[m * N + n] += float(a[m * K + k]) * (float((k + n) % 7) - 3.f);
    }
  }
  try {
    at::native::cpublas::brgemm(M, N, K, K, N, N, /*add_C=*/false, a.data(), b.data(), c.data(), true);
    at::native::cpublas::brgemm_release(true);
  } catch (const std::exception&) {
    return false;
  }
  return c == want;  // small integers: exact in bf16 and float32
}

bool bf16_brgemm_usable() {
  static const bool ok = [] {
    if (std::getenv("RMT_FAST_ATTENTION_BF16_AS_FLOAT32") != nullptr) return false;
    if (at::native::cpublas::could_pack(at::kBFloat16)) return true;
#ifdef RMT_FAST_X86
    // the row passes write bf16 probabilities with AVX512-BF16 instructions on this path
    return __builtin_cpu_supports("avx512bf16") != 0 && bf16_brgemm_probe();
#else
    return false;
#endif
  }();
  return ok;
}

// --- the kernel ------------------------------------------------------------------------------------

template <typename in_t, typename mm_t, bool vnni>
void attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      const int64_t* lens, float scale, at::Tensor& out, const AttentionSizes& sz) {
  const int64_t B = sz.B, Tq = sz.Tq, Tk = sz.Tk, H = sz.H, D = sz.D;
  // Dk: the reduction length of q k^T (even for VNNI pairs); Dn: output columns, in 16s
  const int64_t Dk = vnni ? round_up(D, 2) : D, Dn = round_up(D, 16);
  const int64_t Lp = round_up(std::max<int64_t>(Tk, 1), kNBlock);
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const in_t* qd = q.const_data_ptr<in_t>();
  const in_t* kd = k.const_data_ptr<in_t>();
  const in_t* vd = v.const_data_ptr<in_t>();
  in_t* od = out.data_ptr<in_t>();
  const bool avx = cpu_has_avx512();
  const bool q_direct = std::is_same_v<in_t, mm_t> && D == Dk;
  constexpr bool v_direct = !vnni && std::is_same_v<in_t, mm_t>;  // float32: V in place
  const float c = scale * 1.4426950408889634f;                     // softmax in base 2

  // K^T and V of one (batch, head), packed once for all its query blocks.
  const int64_t kt_size = Lp * round_up(Dk, 2);
  const int64_t v_size = v_direct ? 0 : round_up(std::max<int64_t>(Tk, 1), 2) * Dn;
  const int64_t per_head = round_up(kt_size + v_size, 32);
  auto pack_head = [&](int64_t bh, mm_t* dst) {
    const int64_t b = bh / H, h = bh % H, L = lens[b];
    if (L == 0) return;
    pack_kt<in_t, mm_t, vnni>(avx, kd + b * ks0 + h * ks2, ks1, L, D, Lp, dst);
    if constexpr (!v_direct) {
      pack_v<in_t, mm_t, vnni>(avx, vd + b * vs0 + h * vs2, vs1, L, D, Dn, dst + kt_size);
    }
  };
  const int64_t QB = std::min(kQBlock, Tq), nq = div_up(Tq, QB);
  const int64_t threads = at::get_num_threads();
  // Fused: one work item per (batch, head), packed into the thread's own buffer right before its
  // query blocks use it, so the packed copy stays in cache (packing every head first would write
  // and read back B * heads * per_head values through memory). Split, for too few heads to keep
  // every thread busy: all heads packed first, then one work item per (batch, head, query block).
  const bool fused = B * H >= 4 * threads || nq == 1;
  at::Tensor packed;
  mm_t* pk = nullptr;
  if (!fused) {
    packed = at::empty({B * H * per_head}, q.options().dtype(c10::CppTypeToScalarType<mm_t>::value));
    pk = packed.data_ptr<mm_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) pack_head(bh, pk + bh * per_head);
    });
  }

  // Per-thread scratch, in floats: scores [QB, KV], probabilities [QB, KV] (mm_t), the output
  // accumulator [QB, Dn], row max and sum, the query block when it cannot be used in place, and in
  // fused mode the packed head.
  const int64_t KV = std::min(kKvBlock, Lp);
  const int64_t s_size = round_up(QB * KV, 16), p_size = round_up(QB * KV, 16);
  const int64_t o_size = round_up(QB * Dn, 16), ml_size = round_up(2 * QB, 16);
  const int64_t qb_size = round_up(QB * Dk, 16);
  const int64_t pack_floats = fused ? round_up(div_up(per_head * int64_t(sizeof(mm_t)), 4), 16) : 0;
  const int64_t per_thread = s_size + p_size + o_size + ml_size + qb_size + pack_floats;
  at::Tensor scratch = at::empty({threads * per_thread}, q.options().dtype(at::kFloat));
  float* sc = scratch.data_ptr<float>();

  const int64_t row_out = H * D;
  const int64_t items = fused ? B * H : B * H * nq;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    float* S = sc + tid * per_thread;
    mm_t* P = reinterpret_cast<mm_t*>(S + s_size);
    float* O = S + s_size + p_size;
    float* mx = O + o_size;
    float* sum = mx + QB;
    mm_t* qbuf = reinterpret_cast<mm_t*>(mx + ml_size);
    mm_t* own_pack = reinterpret_cast<mm_t*>(mx + ml_size + qb_size);
    bool used_brgemm = false;
    for (int64_t job = fused ? begin * nq : begin; job < (fused ? end * nq : end); ++job) {
      const int64_t bh = job / nq, t0 = (job % nq) * QB;
      const int64_t b = bh / H, h = bh % H, L = lens[b], M = std::min(QB, Tq - t0);
      in_t* o_rows = od + (b * Tq + t0) * row_out + h * D;
      if (L == 0) {  // no key: zeros
        for (int64_t r = 0; r < M; ++r) std::fill(o_rows + r * row_out, o_rows + r * row_out + D, in_t(0));
        continue;
      }
      if (fused && t0 == 0) {
        PROF_NOW(tp0);
        pack_head(bh, own_pack);
        PROF_NOW(tp1);
        PROF_ADD(0, tp0, tp1);
      }
      const in_t* q_rows = qd + b * qs0 + t0 * qs1 + h * qs2;
      const mm_t* A;
      int64_t lda;
      if (q_direct) {
        A = reinterpret_cast<const mm_t*>(q_rows);
        lda = qs1;
      } else {
        for (int64_t r = 0; r < M; ++r) {
          for (int64_t x = 0; x < Dk; ++x) {
            qbuf[r * Dk + x] = x < D ? to_type<mm_t>(q_rows[r * qs1 + x]) : mm_t(0);
          }
        }
        A = qbuf;
        lda = Dk;
      }
      const mm_t* kt = fused ? own_pack : pk + bh * per_head;
      const mm_t* vp = kt + kt_size;
      used_brgemm = true;
      for (int64_t s = 0; s < L; s += KV) {
        const int64_t len = std::min(KV, L - s), ekv = round_up(len, 2);
        PROF_NOW(ta);
        // S = Q K^T over this block's keys (in 64s; the columns past len are zeros)
        at::native::cpublas::brgemm(M, round_up(len, kNBlock), Dk, lda, Lp, KV, /*add_C=*/false, A,
                                    kt + s * (vnni ? 2 : 1), S, vnni);
        PROF_NOW(tb);
        PROF_ADD(1, ta, tb);
        // online softmax: new row max, P = 2^(c S - max), rescale what came before
        for (int64_t r = 0; r < M; ++r) {
          const float* srow = S + r * KV;
          const float m_blk = row_max(avx, srow, len, c);
          const float m_new = s == 0 ? m_blk : std::max(mx[r], m_blk);
          mm_t* prow = P + r * ekv;
          const float part = exp_row(avx, srow, len, c, m_new, prow);
          if (ekv > len) prow[len] = mm_t(0);
          if (s == 0) {
            sum[r] = part;
          } else {
            const float alpha = std::exp2(mx[r] - m_new);
            sum[r] = sum[r] * alpha + part;
            scale_row(avx, O + r * Dn, D, alpha);
          }
          mx[r] = m_new;
        }
        PROF_NOW(tc);
        PROF_ADD(2, tb, tc);
        // O (+)= P V
        for (int64_t c0 = 0; c0 < D; c0 += kNBlock) {
          if constexpr (v_direct) {
            const int64_t w = std::min(kNBlock, D - c0);
            at::native::cpublas::brgemm(M, w, len, ekv, vs1, Dn, /*add_C=*/s > 0, P,
                                        vd + b * vs0 + h * vs2 + s * vs1 + c0, O + c0, vnni);
          } else {
            const int64_t w = std::min(kNBlock, Dn - c0);
            at::native::cpublas::brgemm(M, w, ekv, ekv, w, Dn, /*add_C=*/s > 0, P,
                                        vp + s * Dn + ekv * c0, O + c0, vnni);
          }
        }
        PROF_NOW(td);
        PROF_ADD(3, tc, td);
      }
      for (int64_t r = 0; r < M; ++r) store_row(avx, O + r * Dn, D, 1.f / sum[r], o_rows + r * row_out);
    }
    if constexpr (vnni) {
      if (used_brgemm) at::native::cpublas::brgemm_release(vnni);
    }
  });
}

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const std::optional<at::Tensor>& key_lengths, double scale) {
  const AttentionSizes sz = check_attention(q, k, v, key_lengths, scale);
  at::Tensor out = at::empty({sz.B, sz.Tq, sz.H * sz.D}, q.options());
  if (out.numel() == 0) return out;
  // key lengths, clamped to Tk (a length past the keys masks nothing); negative is an error
  std::vector<int64_t> lens(sz.B, sz.Tk);
  if (key_lengths.has_value()) {
    const at::Tensor kl = key_lengths->contiguous();
    const int64_t* p = kl.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < sz.B; ++b) {
      TORCH_CHECK(p[b] >= 0, "rmt_fast::attention: key_lengths[", b, "] = ", p[b], " is negative");
      lens[b] = std::min(p[b], sz.Tk);
    }
  }
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat:
      attention_kernel<float, float, false>(q, k, v, lens.data(), s, out, sz);
      break;
    case at::kBFloat16:
      // VNNI-packed B: the bf16 micro-kernel (AMX, or AVX512-BF16); else float32 products.
      if (bf16_brgemm_usable()) {
        attention_kernel<c10::BFloat16, c10::BFloat16, true>(q, k, v, lens.data(), s, out, sz);
      } else {
        attention_kernel<c10::BFloat16, float, false>(q, k, v, lens.data(), s, out, sz);
      }
      break;
    case at::kHalf:
      // AMX-FP16 where the CPU has it, else float32 products (exact conversions of the inputs).
      if (at::native::cpublas::could_pack(at::kHalf)) {
        attention_kernel<c10::Half, c10::Half, true>(q, k, v, lens.data(), s, out, sz);
      } else {
        attention_kernel<c10::Half, float, false>(q, k, v, lens.data(), s, out, sz);
      }
      break;
    default:
      TORCH_CHECK(false, "rmt_fast::attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

#ifdef RMT_FAST_ATTN_PROFILE
void attn_prof(int64_t n) {
  std::printf("pack %.3f  qk %.3f  softmax %.3f  pv %.3f  ms\n", g_prof[0] * 1e3 / n,
              g_prof[1] * 1e3 / n, g_prof[2] * 1e3 / n, g_prof[3] * 1e3 / n);
  for (auto& x : g_prof) x = 0;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) { m.impl("attention", &attention_cpu); }
#ifdef RMT_FAST_ATTN_PROFILE
TORCH_LIBRARY_FRAGMENT(rmt_fast, m) { m.def("attn_prof(int n) -> ()", &attn_prof); }
#endif

}  // namespace rmt_fast
