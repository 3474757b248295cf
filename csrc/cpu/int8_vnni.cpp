// int8_linear_vnni: the int8 linear layer of rmt_fast/engine/quant.py as one tiled loop around
// oneDNN's u8 x s8 -> s32 micro-kernel (at::native::cpublas::brgemm; VNNI or AMX), with the dequantize
// as the tile's epilogue (docs/EXTENSION.md, "int8 linear on the VNNI micro-kernel").
//
//   out [R, N] = act(fma(float(acc - comp[n]) * sx[r], weight_scale[n], bias[n])), rounded once,
//   acc[r, n] = sum_k u[r, k] * w[k, n],  u = q + 128 (uint8),  comp[n] = 128 * sum_k w[k, n],
//
// so acc - comp = sum_k q[r, k] * w[k, n] exactly: the same integers, scales and rounding as
// int8_linear (torch._int_mm between the two passes), bit for bit. The micro-kernel multiplies
// unsigned by signed bytes (vpdpbusd), hence the zero point 128 on the activations and the column
// sums, computed once when the weight is packed. With col_sum (the weight's column sums, [N] int32) the
// rows are quantized asymmetrically (int8_quantize_rows_asym: u in [0, 255] and a zero point z per row,
// the micro-kernel's unsigned operand as it is) and the correction is z * col_sum:
// out = act(fma(float(acc - z[r] * col_sum[n]) * sx[r], ...)), the integers of int8_linear with col_sum.
//
// Why a tiled loop and not int8_linear's torch._int_mm per 256-row block: _int_mm writes a block's
// int32 sums (256 x N, 3 MB for the FFN) to memory and the dequantize reads them back; here each
// [rows, 64] int32 tile stays in L1/L2 and is turned into the output right away.
//
// Weight layout (quant.pack_vnni): packed [Np / 64, Kp / 4, 64, 4] int8, Kp = K rounded up to 4, Np = N
// rounded up to 64, zeros in the padding: packed[n / 64, k / 4, n % 64, k % 4] = w[k, n]: oneDNN's
// VNNI-4 layout for s8, one contiguous panel per 64 output columns, so that a tile streams its
// weights in order.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "../rmt_fast.h"

#include "int8_rows.h"
#include "vnni_pack.h"

namespace rmt_fast {
namespace {

using namespace int8_rows;

constexpr int64_t kTileN = 64;  // output columns per micro-kernel call (a [rows, 64] int32 tile)

void int8_linear_vnni_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& comp,
                          const at::Tensor& weight_scale, const at::Tensor& bias, c10::string_view activation,
                          int64_t row_block, at::Tensor& out, const std::optional<at::Tensor>& col_sum) {
  const char* op = "int8_linear_vnni";
  check_rows(op, "x", x);
  check_rows(op, "out", out);
  const int64_t R = x.size(0), K = x.size(1), N = out.size(1);
  TORCH_CHECK(out.size(0) == R, "rmt_fast::", op, ": out must have R = ", R, " rows, got ", out.sizes());
  TORCH_CHECK(packed.dim() == 4 && packed.size(2) == kTileN && packed.size(3) == 4 &&
                  packed.scalar_type() == at::kChar && packed.is_contiguous() && packed.device().is_cpu(),
              "rmt_fast::", op, ": packed must be a contiguous CPU int8 tensor of shape (Np / 64, Kp / 4, 64, 4), got ",
              packed.scalar_type(), " of shape ", packed.sizes());
  const int64_t Kp = packed.size(1) * 4, Np = packed.size(0) * kTileN;
  TORCH_CHECK(Kp == round_up(K, 4) && Np == round_up(N, kTileN), "rmt_fast::", op, ": packed has shape ",
              packed.sizes(), " but x has K = ", K, " and out N = ", N, " columns: want (", div_up(N, kTileN),
              ", ", round_up(K, 4) / 4, ", 64, 4)");
  check_vector(op, "comp", comp, N, at::kInt, "int32");
  if (col_sum) check_vector(op, "col_sum", *col_sum, N, at::kInt, "int32");
  check_vector(op, "weight_scale", weight_scale, N, at::kFloat, "float32");
  check_vector(op, "bias", bias, N, at::kFloat, "float32");
  TORCH_CHECK(row_block >= 1, "rmt_fast::", op, ": row_block must be >= 1, got ", row_block);
  const Act act = parse_act(op, std::string(activation));
  if (R == 0 || N == 0) return;

  // Work items: (row block, column group). Column groups only where the row blocks alone would leave
  // threads idle (one segment on many threads); each group quantizes its rows itself (cheap).
  const int64_t blocks = div_up(R, row_block), tiles = Np / kTileN;
  const int64_t threads = at::get_num_threads();
  const int64_t groups = blocks >= threads ? 1 : std::min(div_up(threads, blocks), tiles);
  const int8_t* wd = packed.const_data_ptr<int8_t>();
  const int32_t* cd = comp.const_data_ptr<int32_t>();
  const int32_t* cs = col_sum ? col_sum->const_data_ptr<int32_t>() : nullptr;  // asymmetric rows
  const float* sw = weight_scale.const_data_ptr<float>();
  const float* bd = bias.const_data_ptr<float>();
  const int64_t ldx = x.stride(0), ldo = out.stride(0);
  const bool avx = cpu_has_avx512(), native_bf16 = int8_avx512_bf16();
  dispatch_float<false>(x.scalar_type(), "rmt_fast::int8_linear_vnni: x", [&](auto x_zero) {
    dispatch_float<false>(out.scalar_type(), "rmt_fast::int8_linear_vnni: out", [&](auto out_zero) {
      using T = decltype(x_zero);
      using O = decltype(out_zero);
      const T* xd = x.const_data_ptr<T>();
      O* od = out.data_ptr<O>();
      at::parallel_for(0, blocks * groups, 1, [&](int64_t begin, int64_t end) {
        const int64_t rb_max = std::min(row_block, R);
        ScratchCarver carve{thread_scratch<0>(scratch_round(rb_max * Kp) + scratch_round(rb_max * sizeof(float)) +
                                              scratch_round(rb_max * kTileN * sizeof(int32_t)) +
                                              scratch_round(rb_max * sizeof(int32_t)))};
        uint8_t* a = carve.take<uint8_t>(rb_max * Kp);  // rows q + 128 (or u); K..Kp any: the weight's pad rows are 0
        float* sx = carve.take<float>(rb_max);
        int32_t* tile = carve.take<int32_t>(rb_max * kTileN);
        int32_t* zero = carve.take<int32_t>(rb_max);      // asymmetric: each row's zero point
        for (int64_t item = begin; item < end; ++item) {
          const int64_t r0 = (item / groups) * row_block, g = item % groups;
          const int64_t rows = std::min(row_block, R - r0);
          for (int64_t r = 0; r < rows; ++r) {
            if (cs) {
              quantize_row_asym(avx, xd + (r0 + r) * ldx, K, a + r * Kp, &sx[r], &zero[r]);
            } else {
              quantize_row(avx, xd + (r0 + r) * ldx, K, a + r * Kp, &sx[r]);
            }
          }
          for (int64_t t = g * tiles / groups; t < (g + 1) * tiles / groups; ++t) {
            // the last tile multiplies only the 16s that hold real columns
            const int64_t n0 = t * kTileN, n_out = std::min(kTileN, N - n0), w = round_up(n_out, 16);
            at::native::cpublas::brgemm(rows, w, Kp, Kp, kTileN, kTileN, /*add_C=*/false, a,
                                        reinterpret_cast<const signed char*>(wd + t * Kp * kTileN), tile,
                                        true);
            for (int64_t r = 0; r < rows; ++r) {
              dequantize_row_act(act, avx, native_bf16, tile + r * kTileN, (cs ? cs : cd) + n0,
                                 cs ? zero[r] : 1, n_out, sx[r], sw + n0, bd + n0, od + (r0 + r) * ldo + n0);
            }
          }
        }
        at::native::cpublas::brgemm_release(true);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CPU, m) { m.impl("int8_linear_vnni", &int8_linear_vnni_cpu); }

}  // namespace rmt_fast
