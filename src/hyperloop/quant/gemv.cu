// One-row int4 GEMV, y = W_hat x, for decoding at batch 1 (src/hyperloop/quant/gemv.py builds it).
//
// Operands (gemv.py: operands):
//   words (N, K/8) int32: row n's codes, K contiguous, eight a word, LSB first (code k in bits 4(k%8)..)
//   grid  (N, K/group_size) half2: (scale, 1024 + zero) of row n and each group
//   x     (K,) bf16, 16-byte aligned
// W_hat[n, k] = scale * (code - zero). Each lane reads 32 codes (one uint4) at a time.
//
// Dequantisation without integer-to-float conversions: OR-ing a code into the mantissa of the f16
// 1024 (0x6400) gives exactly 1024 + code, and one mask takes two codes at once into an f16x2
// (bits 0-3 and 16-19 of the word: codes s and s + 4, for s = 0..3 by shifting). One f16x2 subtract
// of (1024 + zero) leaves code - zero exactly, and one f16x2 FMA multiplies it with x. So x is
// staged once per block in shared memory as f16 pairs (x_s, x_{s+4}) of each word, scaled by 1/16 so
// that the f16 sum of a 32-code chunk (16 products a half, |code - zero| <= 15) stays below f16's
// 65504 unless x is near 4000 across most of the chunk; the chunk's sum then goes to fp32 times the
// group's scale, and the 1/16 is undone at the end.
//
// Parallelism: a warp computes ROWS outputs; SPLIT warps of a block share them and split K (for
// matrices with few rows and long rows), reducing through shared memory.

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

namespace {

constexpr int kRows = 2;   // outputs a warp
constexpr int kWarps = 8;  // warps a block

template <int SPLIT>
__global__ void __launch_bounds__(kWarps * 32) int4_gemv_kernel(
    const uint4* __restrict__ words, const __half2* __restrict__ grid, const uint4* __restrict__ x,
    __nv_bfloat16* __restrict__ y, int K, int N, int group_size) {
  extern __shared__ uint4 x_pairs[];  // K/8 entries, one per word: four f16x2 (x_s, x_{s+4}) / 16
  __shared__ float partial[kWarps][kRows];
  for (int j = threadIdx.x; j < K / 8; j += kWarps * 32) {
    const uint4 raw = x[j];
    const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
    uint4 staged;
    __half2* pairs = reinterpret_cast<__half2*>(&staged);
#pragma unroll
    for (int s = 0; s < 4; ++s)
      pairs[s] = __floats2half2_rn(__bfloat162float(v[s]) * 0.0625f, __bfloat162float(v[s + 4]) * 0.0625f);
    x_pairs[j] = staged;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = (blockIdx.x * (kWarps / SPLIT) + warp / SPLIT) * kRows;
  const int chunks = K / 32, groups = K / group_size, chunks_per_group = group_size / 32;
  float total[kRows] = {};
  for (int c = (warp % SPLIT) * 32 + lane; c < chunks; c += 32 * SPLIT) {
    uint4 w[kRows];
    __half2 scale_zero[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {  // all loads first, so they are in flight together
      const int row = min(row0 + r, N - 1);
      w[r] = __ldcs(words + static_cast<size_t>(row) * chunks + c);  // read once: do not keep in cache
      scale_zero[r] = grid[static_cast<size_t>(row) * groups + c / chunks_per_group];
    }
    uint4 xs[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) xs[i] = x_pairs[c * 4 + i];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const __half2 zero = __half2half2(__high2half(scale_zero[r]));
      const uint32_t* word = reinterpret_cast<const uint32_t*>(&w[r]);
      __half2 acc = __float2half2_rn(0.f);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const __half2* xx = reinterpret_cast<const __half2*>(&xs[i]);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          uint32_t bits = ((word[i] >> (4 * s)) & 0x000f000fu) | 0x64006400u;  // 1024 + codes s, s + 4
          acc = __hfma2(__hsub2(*reinterpret_cast<__half2*>(&bits), zero), xx[s], acc);
        }
      }
      const float2 sum = __half22float2(acc);
      total[r] += (sum.x + sum.y) * __low2float(scale_zero[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) total[r] += __shfl_xor_sync(0xffffffffu, total[r], offset);

  if (lane == 0)
#pragma unroll
    for (int r = 0; r < kRows; ++r) partial[warp][r] = total[r];
  __syncthreads();
  constexpr int rows_per_block = (kWarps / SPLIT) * kRows;
  if (threadIdx.x < rows_per_block) {
    const int group = threadIdx.x / kRows, r = threadIdx.x % kRows;
    float t = 0.f;
#pragma unroll
    for (int p = 0; p < SPLIT; ++p) t += partial[group * SPLIT + p][r];
    const int row = blockIdx.x * rows_per_block + threadIdx.x;
    if (row < N) y[row] = __float2bfloat16(t * 16.f);
  }
}

}  // namespace

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor words, torch::Tensor grid, int64_t group_size, int64_t split) {
  const int K = x.size(0), N = words.size(0);
  TORCH_CHECK(x.dim() == 1 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 (K,)");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, "x must be 16-byte aligned");
  TORCH_CHECK(words.scalar_type() == torch::kInt32 && words.size(1) * 8 == K, "words: int32 (N, K/8)");
  TORCH_CHECK(K % 32 == 0 && group_size % 32 == 0 && K % group_size == 0, "K, group_size: multiples of 32");
  const at::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({N}, x.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int smem = K / 8 * sizeof(uint4);
  const auto* w = reinterpret_cast<const uint4*>(words.data_ptr<int>());
  const auto* g = reinterpret_cast<const __half2*>(grid.data_ptr<at::Half>());
  const auto* xv = reinterpret_cast<const uint4*>(x.data_ptr<at::BFloat16>());
  auto* out = reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>());
  const int rows_per_block = (kWarps / split) * kRows;
  const int blocks = (N + rows_per_block - 1) / rows_per_block;
  switch (split) {
    case 1: int4_gemv_kernel<1><<<blocks, kWarps * 32, smem, stream>>>(w, g, xv, out, K, N, group_size); break;
    case 2: int4_gemv_kernel<2><<<blocks, kWarps * 32, smem, stream>>>(w, g, xv, out, K, N, group_size); break;
    case 4: int4_gemv_kernel<4><<<blocks, kWarps * 32, smem, stream>>>(w, g, xv, out, K, N, group_size); break;
    default: TORCH_CHECK(false, "split must be 1, 2 or 4");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}
