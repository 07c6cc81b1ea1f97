// One-row int4 GEMV, y = W_hat x, for decoding at batch 1 (src/hyperloop/quant/gemv.py builds it),
// with the small operations around a decoder layer's matmuls folded in, so that a layer runs in five
// kernels instead of about ten (infer/int4_block.py):
//   prologue   x <- RMSNorm(x) * weight                  (before wqkv and w_gate_up)
//   epilogues  y <- residual + W_hat x                   (wo, w_down)
//              y <- silu(gate) * up                      (w_gate_up, rows in (gate_i, up_i) pairs)
//              q, k <- RoPE(q, k); k, v -> the KV cache  (wqkv, rows in (i, i + D/2) pairs per head)
// and the layer's attention over the KV cache (decode_attention_kernel, at the end of the file).
// For an mHC model, whose sub-layers are wrapped one by one in hyper-connection sites, the sites fold
// into the GEMVs around a sub-layer (model/hc_site.cu: SiteFold): the first GEMV of a branch finishes
// its site's read, and the last one does the site's write and starts the next site's read.
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
// Parallelism: a warp computes one pair of rows (the epilogues work on pairs); SPLIT warps of a block
// share a pair and split K (for matrices with few rows and long rows), reducing through shared memory.

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <optional>
#include <type_traits>

int64_t fold_sum_sets(int64_t N, int64_t split, int64_t device);  // after the launches

namespace {

constexpr int kRows = 2;   // outputs a warp: one pair
// Two ways to run, by grid size (an H100 sweep and decode A/B, results/int4.md):
// - small grids (up to kSmallGridBlocksPerSM blocks of 8 warps per SM, all resident at once) are
//   launched as programmatic dependents of the kernel before (sm_90+, see launch_kernel): they start
//   while it finishes, request their first weights, then wait for its results; and they let the
//   kernel after them start early the same way. This hides the launch and the first trip to memory,
//   the larger part of a small GEMV's time (1.6-2.6 us at the S shapes).
// - larger grids run blocks of 16 warps (half as many blocks, each staging x, and summing its
//   squares for the RMSNorm, once for twice the rows) with plain launches: early starts around them
//   made a transformer-m decode step 8% slower.
constexpr int kSmallGridBlocksPerSM = 4;
constexpr int kSmallGridWarps = 8, kLargeGridWarps = 16;

enum Epilogue : int { kStore, kResidual, kSwiglu, kRopeCache };

// An mHC site (Sinkhorn H_res, n <= 4 streams: fold_site checks) folded into a GEMV; hc_site.cu says how.
struct SiteFold {
  int n;  // streams
  // READ, in the GEMV that opens a branch: x (n, K) holds the streams y', the GEMV's input is
  // sum_j h_pre_j y'_j, and the gates come from the sums the blocks of the GEMV before left.
  bool read;
  const float* partials;  // (2n + n^2 + 1, partial_blocks)
  int partial_blocks;
  const __nv_bfloat16* bias;   // the site's (2n + n^2,)
  const __nv_bfloat16* alpha;  // (3,)
  float eps;                   // of the RMS over the streams (model/hyper.py: RMS_EPS)
  float* h_post;               // out: (n,) the site's gates for its write,
  float* logits;               // out: (2, n^2) its H_res logits, then H_res (the site block's iterations)
  // WRITE, in the GEMV that closes a branch (kStore), out = its output:
  //   y' = H_res y + h_post out, stored, and this block's share of the next site's W y' and |y'|^2.
  bool write;
  const __nv_bfloat16* streams;  // y (n, N), stream stride below (0: a broadcast)
  int64_t stream_stride;
  const float* write_h_post;     // (n,) the site's gates,
  const float* write_res;        // (n^2,) and H_res, or with iters > 0 its logits (a read not folded)
  int iters;                     // Sinkhorn iterations (READ: the site block's; WRITE: 0 or the site's)
  const __nv_bfloat16* next_weight;  // (2n + n^2, nN) the next site's W
  __nv_bfloat16* new_streams;    // out: y' (n, N)
  float* new_partials;           // out: (2n + n^2 + 1, gridDim.x)
};

struct Params {
  const uint4* words;
  const __half2* grid;
  const uint4* x;
  const uint4* norm_weight;  // RMSNorm's weight (K,) bf16, or nullptr: x is used as it is
  float eps;
  int K, N, group_size;
  Epilogue epilogue;
  __nv_bfloat16* y;                // (N,), (N/2,) for kSwiglu, q (N/3,) for kRopeCache
  const __nv_bfloat16* residual;   // kResidual: (N,)
  const float* cos;                // kRopeCache: RoPE tables (positions, D/2), read at row *position
  const float* sin;
  const int64_t* position;         // the token's RoPE position
  __nv_bfloat16* k_cache;          // kRopeCache: (heads, cache_len, D), written at *column
  __nv_bfloat16* v_cache;
  const int64_t* column;
  int heads, head_dim, cache_len;
};

// A GEMV's parameters with a site folded in: its own kernel instances, so that a plain GEMV keeps
// the lean code and parameter block (with the fold in every instance, hyperloop-s int4 decode was 9%
// slower, even where unused).
struct FoldParams : Params {
  SiteFold site;
};

__device__ __forceinline__ void bf16x8_to_float(const uint4& raw, float* out) {
  const __nv_bfloat16* v = reinterpret_cast<const __nv_bfloat16*>(&raw);
#pragma unroll
  for (int s = 0; s < 8; ++s) out[s] = __bfloat162float(v[s]);
}

__device__ __forceinline__ uint4 bf16x8_of(const float* v) {
  uint4 raw;
  __nv_bfloat16* out = reinterpret_cast<__nv_bfloat16*>(&raw);
#pragma unroll
  for (int s = 0; s < 8; ++s) out[s] = __float2bfloat16(v[s]);
  return raw;
}

// The output pair (a, b) = rows (2 pair, 2 pair + 1) of the operands, to where the epilogue sends it.
__device__ __forceinline__ void finish_pair(const Params& p, int pair, float a, float b) {
  switch (p.epilogue) {
    case kStore:
      p.y[2 * pair] = __float2bfloat16(a);
      p.y[2 * pair + 1] = __float2bfloat16(b);
      break;
    case kResidual:
      p.y[2 * pair] = __float2bfloat16(__bfloat162float(p.residual[2 * pair]) + a);
      p.y[2 * pair + 1] = __float2bfloat16(__bfloat162float(p.residual[2 * pair + 1]) + b);
      break;
    case kSwiglu:  // (gate, up)
      p.y[pair] = __float2bfloat16(a / (1.f + __expf(-a)) * b);
      break;
    case kRopeCache: {  // (element i, element i + D/2) of a head of q, k or v
      const int half = p.head_dim / 2, per_part = p.heads * half;
      const int part = pair / per_part, head = pair % per_part / half, i = pair % half;
      if (part < 2) {  // rotate-half RoPE on q and k (model/layers.py: apply_rope)
        const size_t at = *p.position * half + i;
        const float c = p.cos[at], s = p.sin[at];
        const float rotated_a = a * c - b * s;
        b = b * c + a * s;
        a = rotated_a;
      }
      __nv_bfloat16* out = part == 0 ? p.y + head * p.head_dim
                                     : (part == 1 ? p.k_cache : p.v_cache) +
                                           (static_cast<size_t>(head) * p.cache_len + *p.column) * p.head_dim;
      out[i] = __float2bfloat16(a);
      out[i + half] = __float2bfloat16(b);
      break;
    }
  }
}

// The site folds, defined with the site kernel (model/hc_site.cu, compiled after this file). `fold`:
// the shared memory after x_pairs; the block's output columns are col0 .. col0 + cols - 1.
__device__ __forceinline__ bool fold_read_gates(const FoldParams& p, float* fold);
__device__ __forceinline__ void fold_x_word(const FoldParams& p, const float* fold, int j, float* v);
__device__ __forceinline__ void fold_write_early(const FoldParams& p, float* fold, int col0, int cols);
__device__ __forceinline__ void fold_write(const FoldParams& p, float* fold, int col0, int cols);

// Programmatic dependent launch (sm_90): wait until the kernel before has finished and its writes
// are visible; let the kernel after start early. Both are no-ops on a plain launch.
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Word j (8 elements) of the GEMV's input: x's, or with a folded site read, the streams combined.
template <typename P>
__device__ __forceinline__ void load_x(const P& p, const float* fold, int j, float* v) {
  if constexpr (std::is_same_v<P, FoldParams>) {
    if (p.site.read) return fold_x_word(p, fold, j, v);
  }
  bf16x8_to_float(p.x[j], v);
}

// A warp's weights at chunk c (32 codes a row): the codes of its two rows and their group's grid.
struct Chunk {
  uint4 codes[kRows];
  __half2 scale_zero[kRows];
};

__device__ __forceinline__ Chunk load_chunk(const Params& p, int row0, int c) {
  const int chunks = p.K / 32, groups = p.K / p.group_size;
  Chunk chunk;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {  // all loads first, so they are in flight together
    const int row = min(row0 + r, p.N - 1);
    chunk.codes[r] = __ldcs(p.words + static_cast<size_t>(row) * chunks + c);  // read once: do not keep in cache
    chunk.scale_zero[r] = p.grid[static_cast<size_t>(row) * groups + c / (p.group_size / 32)];
  }
  return chunk;
}

// Asks L2 for the warp's weights from chunk c on (no registers held): for a GEMV whose work before
// its first weights is long, so that their trip from memory overlaps it (in a plain GEMV, whose work
// before them is short, it made mhc-m's wqkv slower: 4.9 -> 6.9 us on an H100).
__device__ __forceinline__ void prefetch_chunks(const Params& p, int row0, int c, int stride) {
  const int chunks = p.K / 32, groups = p.K / p.group_size;
  for (; c < chunks; c += stride)
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = min(row0 + r, p.N - 1);
      asm volatile("prefetch.global.L2 [%0];" ::"l"(p.words + static_cast<size_t>(row) * chunks + c));
      if (c % (p.group_size / 32) == 0)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(p.grid + static_cast<size_t>(row) * groups + c / (p.group_size / 32)));
    }
}

// A folded site's instances are held to the registers that keep every block of its grids resident
// at once: 4 blocks of 8 warps an SM (a small grid, as a plain one's are), 3 of 16 (mhc-m's folded
// w_gate_up, 352 blocks, took 55 registers and ran in two waves: 12.9 us, capped 10.3).
template <int SPLIT, bool SMALL_GRID, typename P>  // P: Params, or FoldParams for a folded site
__global__ void __launch_bounds__((SMALL_GRID ? kSmallGridWarps : kLargeGridWarps) * 32,
                                  std::is_same_v<P, FoldParams> ? (SMALL_GRID ? kSmallGridBlocksPerSM : 3) : 0)
    int4_gemv_kernel(const P p) {
  constexpr int warps = SMALL_GRID ? kSmallGridWarps : kLargeGridWarps;
  constexpr bool kFold = std::is_same_v<P, FoldParams>;
  extern __shared__ uint4 x_pairs[];  // K/8 entries, one per word: four f16x2 (x_s, x_{s+4}) * x_scale
  __shared__ float partial[warps][kRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, x_words = p.K / 8, chunks = p.K / 32;
  constexpr int pairs_per_block = warps / SPLIT, stride = 32 * SPLIT;
  const int row0 = (blockIdx.x * pairs_per_block + warp / SPLIT) * kRows;
  float* fold = reinterpret_cast<float*>(x_pairs + x_words);  // a folded site's (see hc_site.cu)
  const int col0 = blockIdx.x * pairs_per_block * kRows, cols = min(pairs_per_block * kRows, p.N - col0);
  int c = (warp % SPLIT) * 32 + lane;
  Chunk chunk{};
  // The warp's first weights (at K = 1024 and SPLIT 1 all that a lane reads) do not depend on the
  // kernel before: requested while it may still be running; so are a folded write's operands.
  if (SMALL_GRID && c < chunks) chunk = load_chunk(p, row0, c);
  if constexpr (kFold) {
    // A folded read computes its gates before its weights: the rest of them (half a lane's at
    // K = 2048) are asked of L2 now. mhc-m's wqkv 10.4 -> 7.4 us on an H100; on a large grid it was
    // slower (results/int4.json: mhc_fold_m_2026_11_27).
    if (SMALL_GRID && p.site.read) prefetch_chunks(p, row0, c + stride, stride);
    if (p.site.write) fold_write_early(p, fold, col0, cols);
  }
  if (SMALL_GRID || kFold) {  // (a no-op after a plain launch)
    wait_for_previous_kernel();  // x and the residual are its results
    if (SMALL_GRID) allow_next_kernel();
  }
  if constexpr (kFold)
    if (p.site.read && fold_read_gates(p, fold)) return;  // the site block

  float x_scale = 0.0625f;
  if (p.norm_weight != nullptr) {  // every block sums the squares of all of x itself: cheaper than a kernel
    float squares = 0.f;
    for (int j = threadIdx.x; j < x_words; j += warps * 32) {
      float v[8];
      load_x(p, fold, j, v);
      if constexpr (kFold)
        if (p.site.read) x_pairs[j] = bf16x8_of(v);  // the streams combined once: the staging reads it back
#pragma unroll
      for (int s = 0; s < 8; ++s) squares += v[s] * v[s];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) squares += __shfl_xor_sync(0xffffffffu, squares, offset);
    if (lane == 0) partial[warp][0] = squares;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < warps; ++w) total += partial[w][0];
    x_scale *= rsqrtf(total / p.K + p.eps);  // partial is written next after the staging's barrier
  }
  for (int j = threadIdx.x; j < x_words; j += warps * 32) {
    float v[8], w[8];
    bool combined = false;  // by the pass above
    if constexpr (kFold) combined = p.site.read && p.norm_weight != nullptr;
    if (combined)
      bf16x8_to_float(x_pairs[j], v);
    else
      load_x(p, fold, j, v);
    if (p.norm_weight != nullptr) bf16x8_to_float(p.norm_weight[j], w);
    uint4 staged;
    __half2* pairs = reinterpret_cast<__half2*>(&staged);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const float lo = v[s] * x_scale, hi = v[s + 4] * x_scale;
      pairs[s] = p.norm_weight != nullptr ? __floats2half2_rn(lo * w[s], hi * w[s + 4]) : __floats2half2_rn(lo, hi);
    }
    x_pairs[j] = staged;
  }
  __syncthreads();

  float total[kRows] = {};
  for (bool first = true; c < chunks; c += stride, first = false) {
    if (!SMALL_GRID || !first) chunk = load_chunk(p, row0, c);
    uint4 xs[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) xs[i] = x_pairs[c * 4 + i];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const __half2 zero = __half2half2(__high2half(chunk.scale_zero[r]));
      const uint32_t* word = reinterpret_cast<const uint32_t*>(&chunk.codes[r]);
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
      total[r] += (sum.x + sum.y) * __low2float(chunk.scale_zero[r]);
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
  const int pair = blockIdx.x * pairs_per_block + threadIdx.x;
  if (threadIdx.x < pairs_per_block && 2 * pair < p.N) {
    float sums[kRows] = {};
#pragma unroll
    for (int s = 0; s < SPLIT; ++s)
#pragma unroll
      for (int r = 0; r < kRows; ++r) sums[r] += partial[threadIdx.x * SPLIT + s][r];
    finish_pair(p, pair, sums[0] * 16.f, sums[1] * 16.f);  // undo the 1/16 of x_scale
  }
  if constexpr (kFold)
    if (p.site.write) fold_write(p, fold, col0, cols);
}

template <typename T>
const T* aligned(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  return reinterpret_cast<const T*>(t.data_ptr());
}

const __nv_bfloat16* bf16_of(const torch::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 && t.is_contiguous() && t.numel() == numel, name,
              ": contiguous bf16 of ", numel, " elements");
  return reinterpret_cast<const __nv_bfloat16*>(t.data_ptr<at::BFloat16>());
}

// The parameters common to every epilogue, checked; the caller sets the epilogue's own. x: (K,), or
// the streams (n, K) of a site whose read the GEMV folds (`x_rows` n).
Params gemv_params(const torch::Tensor& x, const torch::Tensor& words, const torch::Tensor& grid, int64_t group_size,
                   const std::optional<torch::Tensor>& norm_weight, double eps, int64_t x_rows) {
  Params p{};
  TORCH_CHECK(words.scalar_type() == torch::kInt32 && words.is_contiguous() && words.dim() == 2,
              "words: contiguous int32 (N, K/8)");
  p.K = words.size(1) * 8;
  p.N = words.size(0);
  bf16_of(x, x_rows * p.K, "x");
  TORCH_CHECK(p.K % 32 == 0 && group_size % 32 == 0 && p.K % group_size == 0 && p.N % 2 == 0,
              "K, group_size: multiples of 32; N even");
  TORCH_CHECK(grid.scalar_type() == torch::kHalf && grid.numel() == 2 * p.N * (p.K / group_size), "grid: fp16 (N, groups, 2)");
  p.words = reinterpret_cast<const uint4*>(words.data_ptr<int>());
  p.grid = reinterpret_cast<const __half2*>(grid.data_ptr<at::Half>());
  p.x = aligned<uint4>(x, "x");
  if (norm_weight.has_value()) {
    bf16_of(*norm_weight, p.K, "norm_weight");
    p.norm_weight = aligned<uint4>(*norm_weight, "norm_weight");
  }
  p.eps = static_cast<float>(eps);
  p.group_size = group_size;
  return p;
}

// Launches kernel(p) with `config`, its blocks in clusters of `cluster` along x (sm_90; 1: none), and
// if `programmatic` as a programmatic dependent: it may start before the kernel before it has
// finished (also in a CUDA graph) and waits for it in wait_for_previous_kernel.
template <typename KernelParams>
void launch_with(cudaLaunchConfig_t config, void (*kernel)(KernelParams), const KernelParams& p, int cluster,
                 bool programmatic) {
  cudaLaunchAttribute attributes[2];
  int count = 0;
  if (cluster > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count++].val.clusterDim = {static_cast<unsigned>(cluster), 1, 1};
  }
  if (programmatic) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
}

template <int SPLIT, bool SMALL_GRID, typename P>
void launch_kernel(const P& p, int blocks, int smem, cudaStream_t stream, bool programmatic) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks);
  config.blockDim = dim3((SMALL_GRID ? kSmallGridWarps : kLargeGridWarps) * 32);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  launch_with(config, int4_gemv_kernel<SPLIT, SMALL_GRID, P>, p, 1, programmatic);
}

struct Device {
  int major = 0, sms = 0;  // 0: not asked yet
};

const Device& device_info(int device) {  // asked once per device
  static std::array<Device, 64> devices;
  Device& d = devices.at(device);
  if (d.major == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device));
  }
  return d;
}

// The grid of a GEMV with N rows and `split`: small (launched early) or large, see kSmallGridBlocksPerSM.
struct Grid {
  int blocks, warps;
  bool small;
};

Grid gemv_grid(int N, int split, int device) {
  TORCH_CHECK(split == 1 || split == 2 || split == 4, "split must be 1, 2 or 4");
  const auto blocks = [&](int warps) { return (N / kRows + warps / split - 1) / (warps / split); };
  if (blocks(kSmallGridWarps) <= kSmallGridBlocksPerSM * device_info(device).sms)
    return {blocks(kSmallGridWarps), kSmallGridWarps, true};
  return {blocks(kLargeGridWarps), kLargeGridWarps, false};
}

// A large grid is launched plainly (see kSmallGridBlocksPerSM), but for a folded read, whose work
// before its weights is long enough that an early start pays.
template <typename P>
bool large_grid_early(const P& p) {
  if constexpr (std::is_same_v<P, FoldParams>) return p.site.read;
  return false;
}

template <int SPLIT, typename P>
void launch_split(const P& p, const Grid& g, int smem, cudaStream_t stream, int device) {
  if (g.small)
    launch_kernel<SPLIT, true>(p, g.blocks, smem, stream, device_info(device).major >= 9);
  else
    launch_kernel<SPLIT, false>(p, g.blocks, smem, stream, large_grid_early(p) && device_info(device).major >= 9);
}

int fold_floats(const FoldParams& p, int cols);  // hc_site.cu

template <typename P>
void launch(const P& p, int64_t split, const torch::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Grid g = gemv_grid(p.N, split, x.get_device());
  int smem = p.K / 8 * sizeof(uint4);
  if constexpr (std::is_same_v<P, FoldParams>) {
    smem += fold_floats(p, kRows * g.warps / split) * sizeof(float);
    g.blocks += p.site.read;  // the site block (hc_site.cu: fold_read_gates)
  }
  switch (split) {
    case 1: launch_split<1>(p, g, smem, stream, x.get_device()); break;
    case 2: launch_split<2>(p, g, smem, stream, x.get_device()); break;
    default: launch_split<4>(p, g, smem, stream, x.get_device()); break;
  }
}

std::vector<torch::Tensor> fold_site(FoldParams& p, const torch::Tensor& x, const std::vector<torch::Tensor>& read_site,
                                     const std::vector<torch::Tensor>& write_site, double eps, int64_t iters,
                                     int blocks);  // hc_site.cu

// Launches p's GEMV, with an mHC site's read or write folded in when read_site or write_site is given
// (hc_site.cu: fold_site); returns the two outputs the fold adds, or two empty tensors.
std::vector<torch::Tensor> launch_folding(const Params& p, int64_t split, const torch::Tensor& x,
                                          const std::vector<torch::Tensor>& read_site,
                                          const std::vector<torch::Tensor>& write_site, double eps, int64_t iters) {
  if (read_site.empty() && write_site.empty()) {
    launch(p, split, x);
    return {torch::empty({0}, x.options()), torch::empty({0}, x.options())};  // distinct, as a custom op's outputs must be
  }
  FoldParams folded{};
  static_cast<Params&>(folded) = p;
  auto outputs = fold_site(folded, x, read_site, write_site, eps, iters, fold_sum_sets(p.N, split, x.get_device()));
  launch(folded, split, x);
  return outputs;
}

// ---- The layer's attention: one query a row over the KV cache (int4_block.py, between wqkv and wo) ----
//   out[b, h] = sum_t softmax_t(q . k_t / sqrt(D)) v_t   over the columns t = pad[b] .. *column
// Why a kernel of its own (infer/decode_attention.py has a Triton one): one program per head leaves
// most SMs idle and waits on each of its loads in turn (6.3 us a layer at M). Here each head gets a
// cluster of up to 8 blocks, so up to 64 warps share its columns (warp g of G takes g, g + G, ...), each
// lane holding D/32 elements of every row; and, launched as a programmatic dependent of the wqkv
// GEMV, a warp loads its first kAttnBatch keys and values before waiting for that kernel: all the
// columns but the new token's were written by earlier steps. Every warp keeps an online softmax
// (fp32), the warps of a block combine in shared memory, and block 0 of the cluster combines the
// blocks through distributed shared memory (sm_90; elsewhere one block a head).
constexpr int kAttnWarps = 8;
constexpr int kAttnBatch = 8;        // columns a warp has in flight
constexpr int kAttnMaxBlocks = 8;    // a portable cluster
constexpr int kAttnColumnsPerWarp = 8;  // fewer blocks for short caches: at least this many columns a warp

struct AttnParams {
  const __nv_bfloat16* q;  // (B, H, D)
  const __nv_bfloat16* k;  // (B, H, cache_len, D)
  const __nv_bfloat16* v;
  __nv_bfloat16* out;      // (B, H, D)
  const int64_t* pad;      // (B,)
  const int64_t* column;   // the new token's column
  int heads, cache_len;
};

template <int E>  // E consecutive bf16: a lane's slice of a row, read in one load
struct __align__(2 * E) Slice {
  __nv_bfloat16 v[E];
};

template <int D>
struct AttnPartial {  // a softmax over some columns: running max m (log2 units), sum l, weighted values
  float m, l, acc[D];
};

// Combines the partials get(0 .. count-1) into m, l and element t of acc (thread t, t < D).
template <int D, typename Get>
__device__ __forceinline__ void combine(int count, Get get, float& m, float& l, float& acc_t, int t) {
  m = -INFINITY;
  for (int i = 0; i < count; ++i) m = fmaxf(m, get(i)->m);
  l = 0.f, acc_t = 0.f;
  for (int i = 0; i < count; ++i) {
    const AttnPartial<D>* part = get(i);
    const float weight = part->m == -INFINITY ? 0.f : exp2f(part->m - m);  // a part that saw no column: 0
    l += weight * part->l;
    acc_t += weight * part->acc[t];
  }
}

template <int D>
__global__ void __launch_bounds__(kAttnWarps * 32) decode_attention_kernel(const AttnParams p) {
  static_assert(kAttnWarps * 32 >= D, "a thread per element of the head's output");
  constexpr int E = D / 32;
  using Row = Slice<E>;
  __shared__ AttnPartial<D> warp_part[kAttnWarps];
  __shared__ AttnPartial<D> block_part;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, b = blockIdx.z, h = blockIdx.y;
  const int G = gridDim.x * kAttnWarps, g = blockIdx.x * kAttnWarps + warp;
  const size_t head = static_cast<size_t>(b) * p.heads + h;
  const Row* keys = reinterpret_cast<const Row*>(p.k + head * p.cache_len * D) + lane;  // row t at [t * 32]
  const Row* values = reinterpret_cast<const Row*>(p.v + head * p.cache_len * D) + lane;
  // Written before the wqkv GEMV began (earlier kernels and steps): the padding, the counter, old columns.
  const int first = static_cast<int>(p.pad[b]), last = static_cast<int>(*p.column);
  Row key[kAttnBatch] = {}, value[kAttnBatch] = {};  // a column not loaded weighs 0: keep 0 * value finite
#pragma unroll
  for (int i = 0; i < kAttnBatch; ++i) {
    const int t = g + i * G;
    if (t >= first && t < last) key[i] = keys[static_cast<size_t>(t) * 32], value[i] = values[static_cast<size_t>(t) * 32];
  }
  wait_for_previous_kernel();  // q and the new token's key and value
  allow_next_kernel();
  float query[E];
  const Row q_row = reinterpret_cast<const Row*>(p.q + head * D)[lane];
  const float scale = rsqrtf(static_cast<float>(D)) * 1.4426950408889634f;  // exp2 below: log2(e) folded in
#pragma unroll
  for (int e = 0; e < E; ++e) query[e] = __bfloat162float(q_row.v[e]) * scale;

  float m = -INFINITY, l = 0.f, acc[E] = {};
  for (int base = g; base <= last; base += kAttnBatch * G) {
#pragma unroll
    for (int i = 0; i < kAttnBatch; ++i) {  // the batch's loads (the first batch: only the new column's)
      const int t = base + i * G;
      if (t >= first && t <= last && (base != g || t == last))
        key[i] = keys[static_cast<size_t>(t) * 32], value[i] = values[static_cast<size_t>(t) * 32];
    }
    float score[kAttnBatch];
#pragma unroll
    for (int i = 0; i < kAttnBatch; ++i) {
      score[i] = 0.f;
#pragma unroll
      for (int e = 0; e < E; ++e) score[i] += query[e] * __bfloat162float(key[i].v[e]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)  // the batch's sums side by side: independent shuffles
#pragma unroll
      for (int i = 0; i < kAttnBatch; ++i) score[i] += __shfl_xor_sync(0xffffffffu, score[i], offset);
    float batch_max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kAttnBatch; ++i) {
      const int t = base + i * G;
      if (t < first || t > last) score[i] = -INFINITY;
      batch_max = fmaxf(batch_max, score[i]);
    }
    if (batch_max == -INFINITY) continue;  // padding only
    const float new_m = fmaxf(m, batch_max), rescale = exp2f(m - new_m);  // 0 while m = -inf
    l *= rescale;
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] *= rescale;
#pragma unroll
    for (int i = 0; i < kAttnBatch; ++i) {
      const float weight = exp2f(score[i] - new_m);  // 0 for a column outside first..last
      l += weight;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += weight * __bfloat162float(value[i].v[e]);
    }
    m = new_m;
  }

  if (lane == 0) warp_part[warp].m = m, warp_part[warp].l = l;
#pragma unroll
  for (int e = 0; e < E; ++e) warp_part[warp].acc[lane * E + e] = acc[e];
  __syncthreads();
  const int t = threadIdx.x;  // element t of the head's output
  float block_m, block_l, block_acc;
  if (t < D) {
    combine<D>(kAttnWarps, [&](int w) { return &warp_part[w]; }, block_m, block_l, block_acc, t);
    block_part.acc[t] = block_acc;
    if (t == 0) block_part.m = block_m, block_part.l = block_l;
  }
  __nv_bfloat16* out = p.out + head * D;
  if (gridDim.x == 1) {
    if (t < D) out[t] = __float2bfloat16(block_acc / block_l);
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every block's partial written
  if (cluster.block_rank() == 0 && t < D) {
    float head_m, head_l, head_acc;
    combine<D>(gridDim.x, [&](int r) { return cluster.map_shared_rank(&block_part, r); }, head_m, head_l, head_acc, t);
    out[t] = __float2bfloat16(head_acc / head_l);
  }
  cluster.sync();  // the other blocks' shared memory stays until block 0 has read it
#endif
}

template <int D>
void launch_attention(const AttnParams& p, int batch, int blocks, cudaStream_t stream, bool programmatic) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks, p.heads, batch);
  config.blockDim = dim3(kAttnWarps * 32);
  config.stream = stream;
  launch_with(config, decode_attention_kernel<D>, p, blocks, programmatic);  // a head's blocks: a cluster
}

}  // namespace

// The sets of sums a folded write of an N-row GEMV leaves, one a block; gemv.py's fakes ask it too.
int64_t fold_sum_sets(int64_t N, int64_t split, int64_t device) { return gemv_grid(N, split, device).blocks; }

// y, then the two outputs a folded mHC site adds (hc_site.cu: fold_site), or two empty tensors.
std::vector<torch::Tensor> int4_gemv(torch::Tensor x, torch::Tensor words, torch::Tensor grid, int64_t group_size,
                                     int64_t split, std::optional<torch::Tensor> norm_weight, double eps,
                                     std::optional<torch::Tensor> residual, bool swiglu,
                                     std::vector<torch::Tensor> read_site, std::vector<torch::Tensor> write_site,
                                     double site_eps, int64_t sinkhorn_iters) {
  Params p = gemv_params(x, words, grid, group_size, norm_weight, eps, read_site.empty() ? 1 : x.size(0));
  TORCH_CHECK(!(swiglu && residual.has_value()), "swiglu and residual do not go together");
  auto y = torch::empty({swiglu ? p.N / 2 : p.N}, x.options());
  p.y = reinterpret_cast<__nv_bfloat16*>(y.data_ptr<at::BFloat16>());
  p.epilogue = swiglu ? kSwiglu : kStore;
  if (residual.has_value()) {
    p.residual = bf16_of(*residual, p.N, "residual");
    p.epilogue = kResidual;
  }
  auto outputs = launch_folding(p, split, x, read_site, write_site, site_eps, sinkhorn_iters);
  outputs.insert(outputs.begin(), y);
  return outputs;
}

// q, then with read_site (an mHC site's read folded in, x its streams) that site's h_post and (2, n^2) logits and H_res,
// else two empty tensors.
std::vector<torch::Tensor> int4_gemv_rope_cache(torch::Tensor x, torch::Tensor words, torch::Tensor grid,
                                                int64_t group_size, int64_t split, std::optional<torch::Tensor> norm_weight,
                                                double eps, torch::Tensor cos, torch::Tensor sin, torch::Tensor position,
                                                torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor column,
                                                std::vector<torch::Tensor> read_site, double site_eps,
                                                int64_t sinkhorn_iters) {
  Params p = gemv_params(x, words, grid, group_size, norm_weight, eps, read_site.empty() ? 1 : x.size(0));
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes()
                  && v_cache.is_contiguous(), "k_cache, v_cache: contiguous (1, heads, cache_len, head_dim)");
  p.heads = k_cache.size(1);
  p.cache_len = k_cache.size(2);
  p.head_dim = k_cache.size(3);
  TORCH_CHECK(p.N == 3 * p.heads * p.head_dim && p.head_dim % 2 == 0, "words: 3 x heads x head_dim rows");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat && cos.dim() == 2 && cos.size(1) == p.head_dim / 2
                  && sin.sizes() == cos.sizes() && cos.is_contiguous() && sin.is_contiguous(),
              "cos, sin: contiguous fp32 (positions, head_dim / 2)");
  TORCH_CHECK(column.scalar_type() == torch::kLong && column.numel() == 1 && position.scalar_type() == torch::kLong
                  && position.numel() == 1, "column, position: one int64 each");
  auto q = torch::empty({p.N / 3}, x.options());
  p.y = reinterpret_cast<__nv_bfloat16*>(q.data_ptr<at::BFloat16>());
  p.k_cache = const_cast<__nv_bfloat16*>(bf16_of(k_cache, k_cache.numel(), "k_cache"));
  p.v_cache = const_cast<__nv_bfloat16*>(bf16_of(v_cache, v_cache.numel(), "v_cache"));
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.position = position.data_ptr<int64_t>();
  p.column = column.data_ptr<int64_t>();
  p.epilogue = kRopeCache;
  auto outputs = launch_folding(p, split, x, read_site, {}, site_eps, sinkhorn_iters);
  outputs.insert(outputs.begin(), q);
  return outputs;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor pad,
                               torch::Tensor column) {
  TORCH_CHECK(q.dim() == 3, "q: (batch, heads, head_dim)");
  const int64_t batch = q.size(0), heads = q.size(1), D = q.size(2);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(0) == batch && k_cache.size(1) == heads && k_cache.size(3) == D
                  && v_cache.sizes() == k_cache.sizes(), "k_cache, v_cache: (batch, heads, cache_len, head_dim) as q");
  TORCH_CHECK(pad.scalar_type() == torch::kLong && pad.numel() == batch && pad.is_contiguous(), "pad: int64 (batch,)");
  TORCH_CHECK(column.scalar_type() == torch::kLong && column.numel() == 1, "column: one int64");
  AttnParams p{};
  p.q = bf16_of(q, q.numel(), "q");
  p.k = bf16_of(k_cache, k_cache.numel(), "k_cache");
  p.v = bf16_of(v_cache, v_cache.numel(), "v_cache");
  auto out = torch::empty_like(q);
  p.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr<at::BFloat16>());
  p.pad = pad.data_ptr<int64_t>();
  p.column = column.data_ptr<int64_t>();
  p.heads = heads;
  p.cache_len = k_cache.size(2);
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Device& d = device_info(q.get_device());
  const int wanted = (p.cache_len + kAttnWarps * kAttnColumnsPerWarp - 1) / (kAttnWarps * kAttnColumnsPerWarp);
  const int blocks = d.major >= 9 ? std::min(kAttnMaxBlocks, wanted) : 1;  // clusters: sm_90
  const bool programmatic = d.major >= 9;
  switch (D) {
    case 64: launch_attention<64>(p, batch, blocks, stream, programmatic); break;
    case 128: launch_attention<128>(p, batch, blocks, stream, programmatic); break;
    default: TORCH_CHECK(false, "head_dim must be 64 or 128");
  }
  return out;
}
