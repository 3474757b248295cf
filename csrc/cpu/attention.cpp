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
#include <ATen/Version.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
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

#include "avx512.h"
#include "vnni_pack.h"

namespace rmt_fast {
namespace {

constexpr int64_t kQBlock = 64;  // query rows per work item (brgemm M)

// --- row passes without AVX-512 --------------------------------------------------------------------
//
// The softmax runs in base 2: with c = scale * log2(e), m = max_j(c s_j), p_j = 2^(c s_j - m).
// at::vec at the build's baseline ISA where it does the job; the exp and the 16-bit stores stay
// scalar (std::exp2, c10's round-to-nearest-even conversions).

using Vec = at::vec::Vectorized<float>;

float row_max_scalar(const float* s, int64_t n, float c) {  // n >= 1
  return at::vec::map_reduce_all<float>([c](Vec x) { return x * Vec(c); },
                                        [](Vec a, Vec b) { return at::vec::maximum(a, b); }, s, n);
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
  at::vec::map([a](Vec x) { return x * Vec(a); }, o, o, n);
}

template <typename T>
void store_row_scalar(const float* o, int64_t n, float inv, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_type<T>(o[i] * inv);
}

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
      if (fused && t0 == 0) pack_head(bh, own_pack);
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
        // S = Q K^T over this block's keys (in 64s; the columns past len are zeros)
        at::native::cpublas::brgemm(M, round_up(len, kNBlock), Dk, lda, Lp, KV, /*add_C=*/false, A,
                                    kt + s * (vnni ? 2 : 1), S, vnni);
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
  const std::vector<int64_t> lens = host_key_lengths(key_lengths, sz.B, sz.Tk, "attention");
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

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) { m.impl("attention", &attention_cpu); }

}  // namespace rmt_fast
