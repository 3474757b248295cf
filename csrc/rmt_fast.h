// Shared declarations of rmt_fast._C: the input checks every backend (CPU, CUDA, Meta) runs first,
// and a dispatch helper over the floating dtypes the ops accept. Host code only: the .cu includes
// it.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace rmt_fast {

// CUDA segment_embed keeps one row of H float32 values in dynamic shared memory, beside its own
// static 32-float reduction scratch; a block gets 48 KiB of shared memory without opt-in, so
// H <= (49152 - 128) / 4 = 12256. tests/test_extension.py checks the scratch size against ptxas.
constexpr int64_t kSharedMemoryBytes = 48 * 1024;
constexpr int64_t kReductionScratchFloats = 32;
constexpr int64_t kMaxHiddenCuda =
    (kSharedMemoryBytes - kReductionScratchFloats * int64_t(sizeof(float))) / int64_t(sizeof(float));

struct SegmentEmbedSizes {
  int64_t B, T, M, H, V;
};
struct MemoryWriteSizes {
  int64_t S, M, H, B, R;
};
struct AttentionSizes {
  int64_t B, Tq, Tk, H, D;
};

// Metadata checks only (shapes, dtypes, devices, layout): they never read tensor data, so the Meta
// kernels run them too and the CUDA path stays free of host synchronisation. Each raises a
// c10::Error (RuntimeError in Python) naming the op, the argument, what was expected and what came.
SegmentEmbedSizes check_segment_embed(const at::Tensor& ids, const at::Tensor& memory,
                                      const at::Tensor& word_emb, const at::Tensor& pos_emb,
                                      const at::Tensor& type_emb0, const at::Tensor& ln_weight,
                                      const at::Tensor& ln_bias, double eps, const at::Tensor& out);
MemoryWriteSizes check_memory_write(const at::Tensor& state, const at::Tensor& hidden,
                                    int64_t row_offset, const at::Tensor& slots);
// attention: q (B, Tq, heads, D), k and v (B, Tk, heads, D), one dtype (float32, bfloat16, float16),
// any strides with the last one 1; key_lengths None or (B,) int64; scale finite.
AttentionSizes check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_lengths, double scale,
                               const char* op = "attention");
// The CPU attention kernels' key lengths: key_lengths[b] clamped to Tk (a length past the keys masks
// nothing), Tk for every row without key_lengths; a negative length is an error naming op and b.
std::vector<int64_t> host_key_lengths(const std::optional<at::Tensor>& key_lengths, int64_t B, int64_t Tk,
                                      const char* op);

// Calls f(T{}) with T the C++ type of `dtype`: float32, bfloat16 or float16, and float64 when
// kWithDouble. One switch instead of nested AT_DISPATCH macros, so two dtypes (tables x output) can
// be dispatched readably; kWithDouble is a template argument so unused types are never
// instantiated.
template <bool kWithDouble, typename F>
void dispatch_float(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      return;
    case at::kBFloat16:
      f(c10::BFloat16{});
      return;
    case at::kHalf:
      f(c10::Half{});
      return;
    case at::kDouble:
      if constexpr (kWithDouble) {
        f(double{});
        return;
      }
      break;
    default:
      break;
  }
  TORCH_CHECK(false, what, ": unsupported dtype ", dtype);
}

}  // namespace rmt_fast
