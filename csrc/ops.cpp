// rmt_fast._C: the input checks shared by every kernel (CPU, CUDA, Meta), the Meta kernels (the
// checks alone, for FakeTensor/torch.compile/opcheck) and the Python module stub that makes
// `import rmt_fast._C` load the library.
//
// The op schemas are defined once, in rmt_fast/_ext.py (torch.library), so that the pure-torch twins
// can implement the same ops where this library is not built; this file and the kernels register
// implementations only (TORCH_LIBRARY_IMPL).
#include <Python.h>
#include <torch/headeronly/version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "rmt_fast.h"

namespace rmt_fast {
namespace {

// CHECK_SHAPE in the flash-attention style, with the expected and the actual shape in the message.
#define RMT_CHECK(cond, ...) TORCH_CHECK(cond, "rmt_fast::", op, ": ", __VA_ARGS__)
#define CHECK_SHAPE(x, ...)                                                               \
  RMT_CHECK((x).sizes() == c10::IntArrayRef({__VA_ARGS__}),                               \
            #x " must have shape (" #__VA_ARGS__ ") = ", c10::IntArrayRef({__VA_ARGS__}), \
            ", got ", (x).sizes())
#define CHECK_DIM(x, d) \
  RMT_CHECK((x).dim() == (d), #x " must be ", d, "-D, got shape ", (x).sizes())
#define CHECK_DTYPE(x, dt) \
  RMT_CHECK((x).scalar_type() == (dt), #x " must be ", dt, ", got ", (x).scalar_type())
#define CHECK_DEVICE(x, dev)                                                                      \
  RMT_CHECK((x).device() == (dev), #x " is on ", (x).device(), " but ", dev_name, " is on ", dev, \
            "; all tensors must be on one device")

bool is_half_or_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}
bool is_floating(at::ScalarType t) { return is_half_or_float(t) || t == at::kDouble; }

}  // namespace

SegmentEmbedSizes check_segment_embed(const at::Tensor& ids, const at::Tensor& memory,
                                      const at::Tensor& word_emb, const at::Tensor& pos_emb,
                                      const at::Tensor& type_emb0, const at::Tensor& ln_weight,
                                      const at::Tensor& ln_bias, double eps,
                                      const at::Tensor& out) {
  const char* op = "segment_embed";
  CHECK_DIM(ids, 2);
  CHECK_DTYPE(ids, at::kLong);
  CHECK_DIM(word_emb, 2);
  CHECK_DIM(memory, 3);
  const int64_t B = ids.size(0), T = ids.size(1), V = word_emb.size(0), H = word_emb.size(1);
  const int64_t M = memory.size(1);
  RMT_CHECK(H >= 1, "hidden size H = word_emb.size(1) must be >= 1, got ", H);
  CHECK_SHAPE(memory, B, M, H);
  CHECK_DTYPE(memory, at::kFloat);
  CHECK_DIM(pos_emb, 2);
  RMT_CHECK(pos_emb.size(1) == H, "pos_emb must have shape (P, H) with H = ", H, ", got ",
            pos_emb.sizes());
  RMT_CHECK(pos_emb.size(0) >= T, "pos_emb has P = ", pos_emb.size(0),
            " positions but the segment has T = ", T, " rows (need P >= T)");
  CHECK_SHAPE(type_emb0, H);
  CHECK_SHAPE(ln_weight, H);
  CHECK_SHAPE(ln_bias, H);
  const auto table_dtype = word_emb.scalar_type();
  RMT_CHECK(is_half_or_float(table_dtype), "word_emb must be float32, bfloat16 or float16, got ",
            table_dtype);
  CHECK_DTYPE(pos_emb, table_dtype);
  CHECK_DTYPE(type_emb0, table_dtype);
  CHECK_DTYPE(ln_weight, table_dtype);
  CHECK_DTYPE(ln_bias, table_dtype);
  CHECK_SHAPE(out, B, T, H);
  RMT_CHECK(is_half_or_float(out.scalar_type()), "out must be float32, bfloat16 or float16, got ",
            out.scalar_type());
  RMT_CHECK(out.is_contiguous(), "out must be contiguous (it is written in place), got strides ",
            out.strides());
  RMT_CHECK(eps >= 0, "eps must be >= 0, got ", eps);
  const auto dev = out.device();
  const char* dev_name = "out";
  CHECK_DEVICE(ids, dev);
  CHECK_DEVICE(memory, dev);
  CHECK_DEVICE(word_emb, dev);
  CHECK_DEVICE(pos_emb, dev);
  CHECK_DEVICE(type_emb0, dev);
  CHECK_DEVICE(ln_weight, dev);
  CHECK_DEVICE(ln_bias, dev);
  return {B, T, M, H, V};
}

namespace {
void check_state(const char* op, const at::Tensor& state) {
  CHECK_DIM(state, 3);
  CHECK_DTYPE(state, at::kFloat);
  RMT_CHECK(state.is_contiguous(),
            "state must be contiguous (it is written in place), got strides ", state.strides());
}
}  // namespace

MemoryWriteSizes check_memory_write(const at::Tensor& state, const at::Tensor& hidden,
                                    int64_t row_offset, const at::Tensor& slots) {
  const char* op = "memory_write";
  check_state(op, state);
  CHECK_DIM(slots, 1);
  CHECK_DTYPE(slots, at::kLong);
  CHECK_DIM(hidden, 3);
  const int64_t S = state.size(0), M = state.size(1), H = state.size(2);
  const int64_t B = slots.size(0), R = hidden.size(1);
  RMT_CHECK(hidden.size(0) == B && hidden.size(2) == H,
            "hidden must have shape (B, R, H) with B = slots.size(0) = ", B,
            " and H = state.size(2) = ", H, ", got ", hidden.sizes());
  RMT_CHECK(is_floating(hidden.scalar_type()),
            "hidden must be float32, bfloat16, float16 or float64, got ", hidden.scalar_type());
  RMT_CHECK(row_offset >= 0 && row_offset + M <= R,
            "rows row_offset .. row_offset + M - 1 = ", row_offset, " .. ", row_offset + M - 1,
            " must lie within hidden's R = ", R, " rows");
  const auto dev = state.device();
  const char* dev_name = "state";
  CHECK_DEVICE(hidden, dev);
  CHECK_DEVICE(slots, dev);
  return {S, M, H, B, R};
}

std::vector<int64_t> host_key_lengths(const std::optional<at::Tensor>& key_lengths, int64_t B, int64_t Tk,
                                      const char* op) {
  std::vector<int64_t> lens(B, Tk);
  if (key_lengths.has_value()) {
    const at::Tensor kl = key_lengths->contiguous();
    const int64_t* p = kl.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(p[b] >= 0, "rmt_fast::", op, ": key_lengths[", b, "] = ", p[b], " is negative");
      lens[b] = std::min(p[b], Tk);
    }
  }
  return lens;
}

AttentionSizes check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& key_lengths, double scale, const char* op) {
  CHECK_DIM(q, 4);
  CHECK_DIM(k, 4);
  CHECK_DIM(v, 4);
  const int64_t B = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3), Tk = k.size(1);
  RMT_CHECK(k.size(0) == B && k.size(2) == H && k.size(3) == D,
            "k must have shape (B, Tk, heads, D) with (B, heads, D) = (", B, ", ", H, ", ", D,
            ") from q, got ", k.sizes());
  CHECK_SHAPE(v, B, Tk, H, D);
  RMT_CHECK(is_half_or_float(q.scalar_type()), "q must be float32, bfloat16 or float16, got ",
            q.scalar_type());
  CHECK_DTYPE(k, q.scalar_type());
  CHECK_DTYPE(v, q.scalar_type());
  RMT_CHECK(q.stride(3) == 1 || D <= 1, "q must have stride 1 in its last dimension, got strides ",
            q.strides());
  RMT_CHECK(k.stride(3) == 1 || D <= 1, "k must have stride 1 in its last dimension, got strides ",
            k.strides());
  RMT_CHECK(v.stride(3) == 1 || D <= 1, "v must have stride 1 in its last dimension, got strides ",
            v.strides());
  RMT_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  const auto dev = q.device();
  const char* dev_name = "q";
  CHECK_DEVICE(k, dev);
  CHECK_DEVICE(v, dev);
  if (key_lengths.has_value()) {
    const at::Tensor& key_lengths_ = *key_lengths;
    RMT_CHECK(key_lengths_.dim() == 1 && key_lengths_.size(0) == B,
              "key_lengths must have shape (B) = [", B, "], got ", key_lengths_.sizes());
    RMT_CHECK(key_lengths_.scalar_type() == at::kLong, "key_lengths must be ", at::kLong, ", got ",
              key_lengths_.scalar_type());
    RMT_CHECK(key_lengths_.device() == dev, "key_lengths is on ", key_lengths_.device(), " but ",
              dev_name, " is on ", dev, "; all tensors must be on one device");
  }
  return {B, Tq, Tk, H, D};
}

namespace {

// Meta kernels: the checks and nothing else (the ops return nothing and change no metadata).
void segment_embed_meta(const at::Tensor& ids, const at::Tensor& memory, const at::Tensor& word_emb,
                        const at::Tensor& pos_emb, const at::Tensor& type_emb0,
                        const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                        at::Tensor& out) {
  check_segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out);
}
void memory_write_meta(at::Tensor& state, const at::Tensor& hidden, int64_t row_offset,
                       const at::Tensor& slots) {
  check_memory_write(state, hidden, row_offset, slots);
}
at::Tensor attention_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_lengths, double scale) {
  const AttentionSizes sz = check_attention(q, k, v, key_lengths, scale);
  return at::empty({sz.B, sz.Tq, sz.H * sz.D}, q.options());
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, Meta, m) {
  m.impl("segment_embed", &segment_embed_meta);
  m.impl("memory_write", &memory_write_meta);
  m.impl("attention", &attention_meta);
}

}  // namespace rmt_fast

// The module itself holds no functions (the ops live in torch.ops.rmt_fast); importing it loads the
// library, which runs the registrations above. Built against the limited Python API.
#ifdef RMT_FAST_WITH_CUDA
#define RMT_FAST_WITH_CUDA_VALUE 1
#else
#define RMT_FAST_WITH_CUDA_VALUE 0
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C",
      "rmt_fast._C: kernels of the ops in torch.ops.rmt_fast (segment_embed, memory_write, "
      "attention)",
      -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", RMT_FAST_WITH_CUDA_VALUE) < 0 ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "MAX_HIDDEN_CUDA", rmt_fast::kMaxHiddenCuda) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
