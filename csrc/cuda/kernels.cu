// CUDA kernels of rmt_fast._C. Everything runs on the current stream with no host synchronisation,
// so a whole segment step can be captured in a CUDA graph. Out-of-range token ids or slots trip a
// device-side assert (as torch's own embedding does) instead of a host-side check that would sync.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE
// headers): the CUDA toolkit on the build machines has no cuBLAS headers, and the kernels need
// none.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../rmt_fast.h"

namespace rmt_fast {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 512;  // per block of segment_embed
static_assert(kReductionScratchFloats >= kMaxThreads / kWarp, "one scratch float per warp");

// Sum over the block; blockDim.x is a multiple of 32. `scratch` holds a float per warp of shared memory
// and may be reused once this returns.
__device__ float block_sum(float v, float* scratch) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = blockDim.x / kWarp;
    v = lane < n_warps ? scratch[lane] : 0.0f;
    for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  const float total = scratch[0];
  __syncthreads();
  return total;
}

// One block per row of the segment: gather (or take the memory row), add position and token type,
// then a two-pass LayerNorm in float32 over the row kept in shared memory.
template <typename table_t, typename out_t>
__global__ void segment_embed_kernel(const int64_t* __restrict__ ids,       // [B, T]
                                     const float* __restrict__ memory,      // [B, M, H]
                                     const table_t* __restrict__ word_emb,  // [V, H]
                                     const table_t* __restrict__ pos_emb,   // [P, H]
                                     const table_t* __restrict__ type_emb0,
                                     const table_t* __restrict__ ln_weight,
                                     const table_t* __restrict__ ln_bias,  // [H] each
                                     float eps, out_t* __restrict__ out,   // [B, T, H]
                                     int64_t T, int64_t M, int64_t H, int64_t V) {
  extern __shared__ float e[];  // [H]
  __shared__ float scratch[kReductionScratchFloats];
  const int64_t row = blockIdx.x;
  const int64_t b = row / T, t = row % T;
  const bool is_memory = t >= 1 && t <= M;
  const float* mem = is_memory ? memory + (b * M + (t - 1)) * H : nullptr;
  const table_t* word = word_emb;
  if (!is_memory) {
    const int64_t id = ids[row];
    CUDA_KERNEL_ASSERT_MSG(id >= 0 && id < V, "rmt_fast::segment_embed: token id out of [0, V)");
    word = word_emb + id * H;
  }
  const table_t* pos = pos_emb + t * H;
  float local = 0.0f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float x = (is_memory ? mem[h] : static_cast<float>(word[h])) +
                    static_cast<float>(pos[h]) + static_cast<float>(type_emb0[h]);
    e[h] = x;
    local += x;
  }
  // Each thread reads back only the elements it wrote, so no barrier is needed on e itself.
  const float mean = block_sum(local, scratch) / static_cast<float>(H);
  local = 0.0f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float d = e[h] - mean;
    local += d * d;
  }
  const float var = block_sum(local, scratch) / static_cast<float>(H);
  const float rstd = rsqrtf(var + eps);
  out_t* o = out + row * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    o[h] = static_cast<out_t>((e[h] - mean) * rstd * static_cast<float>(ln_weight[h]) +
                              static_cast<float>(ln_bias[h]));
  }
}

template <typename h_t>
__global__ void memory_write_kernel(float* __restrict__ state,          // [S, M, H]
                                    const h_t* __restrict__ hidden,     // [B, R, H], strided
                                    const int64_t* __restrict__ slots,  // [B]
                                    int64_t B, int64_t M, int64_t H, int64_t S, int64_t hs0,
                                    int64_t hs1, int64_t hs2, int64_t row_offset) {
  const int64_t n = B * M * H;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t h = i % H, m = (i / H) % M, b = i / (H * M);
    const int64_t s = slots[b];
    if (s < 0) continue;
    CUDA_KERNEL_ASSERT_MSG(s < S, "rmt_fast::memory_write: slot index >= S");
    state[(s * M + m) * H + h] =
        static_cast<float>(hidden[b * hs0 + (row_offset + m) * hs1 + h * hs2]);
  }
}

constexpr int kElementwiseThreads = 256;

int elementwise_blocks(int64_t n) {
  // Grid-stride loops: enough blocks to fill an H100/H200 several times over, no more.
  return static_cast<int>(
      std::min<int64_t>((n + kElementwiseThreads - 1) / kElementwiseThreads, 8192));
}

void segment_embed_cuda(const at::Tensor& ids, const at::Tensor& memory, const at::Tensor& word_emb,
                        const at::Tensor& pos_emb, const at::Tensor& type_emb0,
                        const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps,
                        at::Tensor& out) {
  const auto sz =
      check_segment_embed(ids, memory, word_emb, pos_emb, type_emb0, ln_weight, ln_bias, eps, out);
  TORCH_CHECK(sz.H <= kMaxHiddenCuda, "rmt_fast::segment_embed: hidden size H = ", sz.H,
              " exceeds the CUDA kernel's limit of ", kMaxHiddenCuda,
              " (one row of float32 and the reduction scratch in 48 KiB of shared memory)");
  const int64_t rows = sz.B * sz.T;
  if (rows == 0) return;
  TORCH_CHECK(rows <= INT32_MAX, "rmt_fast::segment_embed: B * T = ", rows, " rows is too many");
  const c10::cuda::CUDAGuard guard(out.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto ids_c = ids.contiguous(), memory_c = memory.contiguous();
  const auto word_c = word_emb.contiguous(), pos_c = pos_emb.contiguous();
  const auto type_c = type_emb0.contiguous(), w_c = ln_weight.contiguous(),
             b_c = ln_bias.contiguous();
  const int threads =
      static_cast<int>(std::min<int64_t>(kMaxThreads, (sz.H + kWarp - 1) / kWarp * kWarp));
  const size_t smem = static_cast<size_t>(sz.H) * sizeof(float);
  dispatch_float<false>(word_emb.scalar_type(), "rmt_fast::segment_embed: tables", [&](auto t_tag) {
    using table_t = decltype(t_tag);
    dispatch_float<false>(out.scalar_type(), "rmt_fast::segment_embed: out", [&](auto o_tag) {
      using out_t = decltype(o_tag);
      segment_embed_kernel<table_t, out_t><<<static_cast<unsigned>(rows), threads, smem, stream>>>(
          ids_c.const_data_ptr<int64_t>(), memory_c.const_data_ptr<float>(),
          word_c.const_data_ptr<table_t>(), pos_c.const_data_ptr<table_t>(),
          type_c.const_data_ptr<table_t>(), w_c.const_data_ptr<table_t>(),
          b_c.const_data_ptr<table_t>(), static_cast<float>(eps), out.mutable_data_ptr<out_t>(),
          sz.T, sz.M, sz.H, sz.V);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void memory_write_cuda(at::Tensor& state, const at::Tensor& hidden, int64_t row_offset,
                       const at::Tensor& slots) {
  const auto sz = check_memory_write(state, hidden, row_offset, slots);
  const int64_t n = sz.B * sz.M * sz.H;
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(state.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto slots_c = slots.contiguous();
  dispatch_float<true>(hidden.scalar_type(), "rmt_fast::memory_write: hidden", [&](auto tag) {
    using h_t = decltype(tag);
    memory_write_kernel<h_t><<<elementwise_blocks(n), kElementwiseThreads, 0, stream>>>(
        state.mutable_data_ptr<float>(), hidden.const_data_ptr<h_t>(),
        slots_c.const_data_ptr<int64_t>(), sz.B, sz.M, sz.H, sz.S, hidden.stride(0),
        hidden.stride(1), hidden.stride(2), row_offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(rmt_fast, CUDA, m) {
  m.impl("segment_embed", &segment_embed_cuda);
  m.impl("memory_write", &memory_write_cuda);
}

}  // namespace rmt_fast
