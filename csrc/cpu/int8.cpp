// The passes around the int8 GEMM of rmt_fast/engine/quant.py (docs/EXTENSION.md, "int8 passes"):
//
//   int8_quantize_rows: x [R, K] (float32/bfloat16/float16) -> q [R, K] int8, scale [R, 1] float32,
//     scale[r] = max(amax_k |x[r, k]|, FLT_MIN) / 127 (float32), q = round-half-even(x / scale[r]);
//   int8_quantize_rows_asym: the same, asymmetric: q = u - 128, zero [R, 1] int32 = z - 128, where
//     u = clamp(round(x / s) + z, 0, 255), s = max((max(x, 0) - min(x, 0)) / 255, FLT_MIN),
//     z = round(-min(x, 0) / s): x ~ scale[r] * (q - zero[r]);
//   int8_dequantize: acc [R, N] int32 -> out [R, N] (float32/bfloat16/float16),
//     out = act(fma(float(acc - row_zero[r] * col_sum[n]) * row_scale[r], col_scale[n], bias[n])) rounded
//     once to out's dtype (row_zero and col_sum, the weight's column sums, only for asymmetric rows),
//     act one of none, gelu (erf) and relu;
//   int8_linear: the two around at::_int_mm, per block of rows, one block per task of ONE parallel
//     region (each thread quantizes, multiplies and dequantizes its own blocks, so the int32 sums stay
//     in its cache and the GEMM costs one barrier, not three per block); asymmetric rows where the
//     weight's col_sum is given.
//
// Each is one pass over memory (a row is read once into cache and written once), where the torch
// ops they replace made four to six. The row kernels are in int8_rows.h.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_int_mm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "../rmt_fast.h"

#include "int8_rows.h"

namespace rmt_fast {
namespace {

using namespace int8_rows;

// Quantize the rows of x into q [R, K] int8, scale [R, 1] and, where zero is defined, the zero points
// [R, 1] (asymmetric: q = u - 128, zero = z - 128); one parallel pass.
void quantize_rows_into(const char* op, const at::Tensor& x, at::Tensor& q, at::Tensor& scale, at::Tensor* zero) {
  const int64_t R = x.size(0), K = x.size(1), ld = x.stride(0);
  if (R == 0) return;
  int8_t* qd = q.data_ptr<int8_t>();
  float* sd = scale.data_ptr<float>();
  int32_t* zd = zero ? zero->data_ptr<int32_t>() : nullptr;
  const bool avx = cpu_has_avx512();
  const std::string what = std::string("rmt_fast::") + op + ": x";
  dispatch_float<false>(x.scalar_type(), what.c_str(), [&](auto zero_value) {
    using T = decltype(zero_value);
    const T* xd = x.const_data_ptr<T>();
    at::parallel_for(0, R, grain_rows(K), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (zd) {
          quantize_row_asym(avx, xd + r * ld, K, qd + r * K, sd + r, zd + r);
          zd[r] -= 128;  // q holds u - 128
        } else {
          quantize_row(avx, xd + r * ld, K, qd + r * K, sd + r);
        }
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> int8_quantize_rows_cpu(const at::Tensor& x) {
  check_rows("int8_quantize_rows", "x", x);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({x.size(0), 1}, x.options().dtype(at::kFloat));
  quantize_rows_into("int8_quantize_rows", x, q, scale, nullptr);
  return {q, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_quantize_rows_asym_cpu(const at::Tensor& x) {
  check_rows("int8_quantize_rows_asym", "x", x);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({x.size(0), 1}, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({x.size(0), 1}, x.options().dtype(at::kInt));
  quantize_rows_into("int8_quantize_rows_asym", x, q, scale, &zero);
  return {q, scale, zero};
}

void int8_dequantize_cpu(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& col_scale,
                         const at::Tensor& bias, c10::string_view activation, at::Tensor& out,
                         const std::optional<at::Tensor>& row_zero, const std::optional<at::Tensor>& col_sum) {
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
  check_vector(op, "col_scale", col_scale, N, at::kFloat, "float32");
  check_vector(op, "bias", bias, N, at::kFloat, "float32");
  TORCH_CHECK(row_zero.has_value() == col_sum.has_value(), "rmt_fast::", op,
              ": row_zero and col_sum go together (asymmetric rows), got only ",
              row_zero.has_value() ? "row_zero" : "col_sum");
  if (row_zero) {
    TORCH_CHECK(row_zero->numel() == R && row_zero->is_contiguous() && row_zero->scalar_type() == at::kInt,
                "rmt_fast::", op, ": row_zero must be contiguous int32 with R = ", R, " values, got ",
                row_zero->scalar_type(), " of shape ", row_zero->sizes());
    check_vector(op, "col_sum", *col_sum, N, at::kInt, "int32");
  }
  const Act act = parse_act(op, std::string(activation));
  if (R == 0 || N == 0) return;
  const int32_t* zr = row_zero ? row_zero->const_data_ptr<int32_t>() : nullptr;
  const int32_t* cs = col_sum ? col_sum->const_data_ptr<int32_t>() : nullptr;
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
        dequantize_row_act(act, avx, native_bf16, ad + r * lda, cs, zr ? zr[r] : 0, N, sx[r], sw, bd, od + r * ldo);
      }
    });
  });
}

// out [R, N] = act(x [R, K] @ W^T * scales + bias), W given as qweight_t [K, N] int8 (any strides)
// with its per-channel weight_scale [N]; blocks of row_block rows, each on one thread (the ops
// inside a parallel region run on the calling thread). With col_sum (W's column sums, [N] int32) the
// rows are quantized asymmetrically.
void int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight_t, const at::Tensor& weight_scale,
                     const at::Tensor& bias, c10::string_view activation, int64_t row_block, at::Tensor& out,
                     const std::optional<at::Tensor>& col_sum) {
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
  parse_act(op, std::string(activation));  // checked before any work
  if (col_sum) check_vector(op, "col_sum", *col_sum, qweight_t.size(1), at::kInt, "int32");
  const int64_t blocks = (R + row_block - 1) / row_block;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t r0 = b * row_block, rows = std::min(row_block, R - r0);
      at::Tensor block_out = out.narrow(0, r0, rows);
      if (col_sum) {
        auto [q, scale, zero] = int8_quantize_rows_asym_cpu(x.narrow(0, r0, rows));
        int8_dequantize_cpu(at::_int_mm(q, qweight_t), scale, weight_scale, bias, activation, block_out, zero,
                            col_sum);
      } else {
        auto [q, scale] = int8_quantize_rows_cpu(x.narrow(0, r0, rows));
        int8_dequantize_cpu(at::_int_mm(q, qweight_t), scale, weight_scale, bias, activation, block_out,
                            std::nullopt, std::nullopt);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) {
  m.impl("int8_quantize_rows", &int8_quantize_rows_cpu);
  m.impl("int8_quantize_rows_asym", &int8_quantize_rows_asym_cpu);
  m.impl("int8_dequantize", &int8_dequantize_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
}

}  // namespace rmt_fast
