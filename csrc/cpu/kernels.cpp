// CPU kernels of rmt_fast._C, parallel over rows with at::parallel_for (OpenMP, torch's thread
// pool). Data-dependent checks (token ids in range, slots in range and distinct) run here, before
// anything is written, since on the CPU they cost no synchronisation.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../rmt_fast.h"

namespace rmt_fast {
namespace {

// Rows per parallel chunk, for about `elements` elements of work each: ATen's own grain (32768) for
// the embedding's arithmetic, 1 MiB of float32 for the plain copies, below which another thread
// costs more than it saves.
constexpr int64_t kComputeGrain = 32768, kCopyGrain = 1 << 18;
int64_t row_grain(int64_t row_len, int64_t elements) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(1, row_len));
}

// Sum with 8 independent accumulators, so the compiler can vectorise it without -ffast-math.
float sum8(const float* x, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += x[i + k];
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += x[i];
  return s;
}

float sum_sq_dev8(const float* x, float mean, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const float d = x[i + k] - mean;
      acc[k] += d * d;
    }
  }
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) {
    const float d = x[i] - mean;
    s += d * d;
  }
  return s;
}

template <typename table_t, typename out_t>
void segment_embed_rows(const int64_t* ids,       // [B, T]
                        const float* memory,      // [B, M, H]
                        const table_t* word_emb,  // [V, H]
                        const table_t* pos_emb,   // [P, H]
                        const table_t* type_emb0, const table_t* ln_weight,
                        const table_t* ln_bias,  // [H] each
                        float eps, out_t* out,   // [B, T, H]
                        const SegmentEmbedSizes& sz) {
  const int64_t T = sz.T, M = sz.M, H = sz.H;
  at::parallel_for(0, sz.B * T, row_grain(H, kComputeGrain), [&](int64_t begin, int64_t end) {
    std::vector<float> e(H);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / T, t = row % T;
      const table_t* pos = pos_emb + t * H;
      if (t >= 1 && t <= M) {
        const float* mem = memory + (b * M + (t - 1)) * H;
        for (int64_t h = 0; h < H; ++h) {
          e[h] = mem[h] + static_cast<float>(pos[h]) + static_cast<float>(type_emb0[h]);
        }
      } else {
        const table_t* word = word_emb + ids[row] * H;
        for (int64_t h = 0; h < H; ++h) {
          e[h] = static_cast<float>(word[h]) + static_cast<float>(pos[h]) +
                 static_cast<float>(type_emb0[h]);
        }
      }
      const float mean = sum8(e.data(), H) / static_cast<float>(H);
      const float var = sum_sq_dev8(e.data(), mean, H) / static_cast<float>(H);
      const float rstd = 1.0f / std::sqrt(var + eps);
      out_t* o = out + row * H;
      for (int64_t h = 0; h < H; ++h) {
        o[h] = static_cast<out_t>((e[h] - mean) * rstd * static_cast<float>(ln_weight[h]) +
                                  static_cast<float>(ln_bias[h]));
      }
    }
  });
}

void segment_embed_cpu(const at::Tensor& ids, const at::Tensor& memory, const at::Tensor& word_emb,
                       const at::Tensor& pos_emb, const at::Tensor& type_emb0,
                       const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                       at::Tensor& out) {
  const auto sz =
      check_segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out);
  if (sz.B * sz.T == 0) return;
  const auto ids_c = ids.contiguous();
  const int64_t* id = ids_c.const_data_ptr<int64_t>();
  // Every row that gathers (t == 0 or t > M) must hold an id in [0, V); memory rows are not read.
  for (int64_t b = 0; b < sz.B; ++b) {
    for (int64_t t = 0; t < sz.T; ++t) {
      if (t >= 1 && t <= sz.M) continue;
      const int64_t v = id[b * sz.T + t];
      TORCH_CHECK(v >= 0 && v < sz.V, "rmt_fast::segment_embed: ids[", b, ", ", t, "] = ", v,
                  " is out of range for word_emb with V = ", sz.V, " rows");
    }
  }
  const auto memory_c = memory.contiguous();
  const auto word_c = word_emb.contiguous(), pos_c = pos_emb.contiguous();
  const auto type_c = type_emb0.contiguous(), w_c = ln_weight.contiguous(),
             b_c = ln_bias.contiguous();
  dispatch_float<false>(word_emb.scalar_type(), "rmt_fast::segment_embed: tables", [&](auto t_tag) {
    using table_t = decltype(t_tag);
    dispatch_float<false>(out.scalar_type(), "rmt_fast::segment_embed: out", [&](auto o_tag) {
      using out_t = decltype(o_tag);
      segment_embed_rows<table_t, out_t>(
          id, memory_c.const_data_ptr<float>(), word_c.const_data_ptr<table_t>(),
          pos_c.const_data_ptr<table_t>(), type_c.const_data_ptr<table_t>(),
          w_c.const_data_ptr<table_t>(), b_c.const_data_ptr<table_t>(), static_cast<float>(eps),
          out.mutable_data_ptr<out_t>(), sz);
    });
  });
}

void memory_write_cpu(at::Tensor& state, const at::Tensor& hidden, int64_t row_offset,
                      const at::Tensor& slots) {
  const auto sz = check_memory_write(state, hidden, row_offset, slots);
  const auto slots_c = slots.contiguous();
  const int64_t* slot = slots_c.const_data_ptr<int64_t>();
  std::vector<int64_t> writer(sz.S, -1);
  for (int64_t b = 0; b < sz.B; ++b) {
    const int64_t s = slot[b];
    if (s < 0) continue;
    TORCH_CHECK(s < sz.S, "rmt_fast::memory_write: slots[", b, "] = ", s,
                " is out of range for state with S = ", sz.S, " slots");
    TORCH_CHECK(writer[s] < 0, "rmt_fast::memory_write: slots[", writer[s], "] and slots[", b,
                "] both write slot ", s, "; each slot may be written by one row only");
    writer[s] = b;
  }
  if (sz.B * sz.M * sz.H == 0) return;
  float* dst = state.mutable_data_ptr<float>();
  const int64_t M = sz.M, H = sz.H;
  const int64_t hs0 = hidden.stride(0), hs1 = hidden.stride(1), hs2 = hidden.stride(2);
  dispatch_float<true>(hidden.scalar_type(), "rmt_fast::memory_write: hidden", [&](auto tag) {
    using h_t = decltype(tag);
    const h_t* src = hidden.const_data_ptr<h_t>();
    at::parallel_for(0, sz.B * M, row_grain(H, kCopyGrain), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / M, m = r % M;
        const int64_t s = slot[b];
        if (s < 0) continue;
        const h_t* in = src + b * hs0 + (row_offset + m) * hs1;
        float* o = dst + (s * M + m) * H;
        for (int64_t h = 0; h < H; ++h) o[h] = static_cast<float>(in[h * hs2]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) {
  m.impl("segment_embed", &segment_embed_cpu);
  m.impl("memory_write", &memory_write_cpu);
}

}  // namespace rmt_fast
