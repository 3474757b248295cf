// Packing of K^T and V into the layout of ATen's oneDNN micro-kernel (at::native::cpublas::brgemm),
// for the CPU attention: plain rows for float32, VNNI pairs of rows for 16-bit types.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "avx512.h"

namespace rmt_fast {

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

inline void transpose_words(bool avx, const char* src, int64_t row_bytes, int64_t rows, int64_t words,
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

}  // namespace rmt_fast
