// A hyper-connection site at decode, for a few rows (model/decode_site.py): one kernel between two
// branches, where a compiled step ran three or four (an RMS-and-projection reduction, the gates, the
// combine, the write), and for mHC's Sinkhorn H_res a chain of forty tiny normalisations besides.
// Compiled in one unit after quant/gemv.cu (quant/gemv.py: extension), whose launch and
// programmatic-launch helpers, device query and argument checks it uses.
//
// For streams y (R, n, C), as model/hyper.py computes them:
//   WRITE  y'_i = sum_j H_res[i, j] y_j + h_post_i (out + e)   the previous site's write, its gates
//          (a diagonal H_res (Hyperloop's): h_res_i y_i; a Sinkhorn one (mHC's): all n streams)
//   READ   u = W y' / rms(y')                            the next site's read, W (2n + r, nC)
//          h_pre  = sigmoid(a_pre u_pre + b_pre),   h_post' = 2 sigmoid(a_post u_post + b_post),
//          res'   = a_res u_res + b_res                  diagonal: h_res' = sigmoid(res'), r = n
//                                                        Sinkhorn: res' are the n x n logits, r = n^2
//          x = sum_j h_pre_j y'_j                        (the branch input)
//   MERGE  the mean of the y'_j instead of storing them (the last site)
// WRITE alone stores y'; READ alone reads y (the first site, y a broadcast of one stream).
//
// A row's columns are split over a cluster of blocks (sm_90), each thread holding 8 columns of one
// stream. Each block sums its share of u and of y'^2, the blocks exchange those 2n + r + 1 sums
// through distributed shared memory, and every block then computes the gates itself and its columns
// of x. Launched as a programmatic dependent (sm_90), a block requests W and, when it writes, the old
// streams and gates (earlier kernels' results) before waiting for the kernel before (the branch's
// last layer, which gives `out`), and lets the next one start its own early loads. A Sinkhorn site's
// read stores only the logits: its write runs the Sinkhorn iterations in that early part, alongside
// the branch's last layer, where the read would have run them between the site and its branch.

namespace {

constexpr int kSiteMaxClusterBlocks = 8;  // a portable cluster
constexpr int kSiteColumns = 8;           // a thread's columns of one stream: one 16-byte load
constexpr int kSiteMaxThreads = 256;      // a block's (n = 8 takes about 230 registers a thread)

struct SiteParams {
  const __nv_bfloat16* y;  // (R, n, C) streams, row and stream strides below (0: a broadcast)
  int64_t y_row, y_stream;
  const __nv_bfloat16* out;         // WRITE: (R, C) the branch output
  const float* h_post;              // WRITE: (R, n) the previous site's gates
  const float* h_res;               // WRITE: (R, r) its h_res (diagonal) or H_res logits (Sinkhorn)
  const __nv_bfloat16* embedding;   // WRITE: (C,) the loop embedding e, or nullptr
  const __nv_bfloat16* weight;      // READ: (2n + r, nC) [W_pre; W_post; W_res]
  const __nv_bfloat16* bias;        // READ: (2n + r,)
  const __nv_bfloat16* alpha;       // READ: (3,) a_pre, a_post, a_res
  float eps;
  __nv_bfloat16* y_new;             // WRITE without MERGE: (R, n, C)
  __nv_bfloat16* x;                 // READ: (R, C) the branch input; MERGE: (R, C) the streams' mean
  float* gates_post;                // READ: (R, n) the site's h_post, and its h_res or logits
  float* gates_res;                 //       (R, r), for its write
  int C, sinkhorn_iters;
  bool write, read, merge;
};

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }

// H_res = sinkhorn(logits) (N x N, row-major), as hyper.py's: alternate row and column normalisation,
// ending on columns. Run by one warp, lane r * N + c holding entry (r, c); a row's lanes differ in the
// low bits, a column's in the high ones, so each sum is a few shuffles. In the exp domain rather than
// hyper.py's log domain (the same iterates, without a log and an exp per step): each row is first
// scaled by its largest entry, so no row can sum to 0 or overflow. (Every thread of the site kernel
// iterating the whole matrix in its registers made an mhc-s bf16 step 15% slower; the folds' single
// thread, fold_sinkhorn below, has not been timed here.)
template <int N>
__device__ void sinkhorn(const float* logits, int iters, float* h_res) {
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = threadIdx.x % 32;
  const float logit = lane < N * N ? logits[lane] : 0.f;  // the other lanes pair among themselves
  float largest = logit;
#pragma unroll
  for (int o = 1; o < N; o *= 2) largest = fmaxf(largest, __shfl_xor_sync(kAll, largest, o));
  float v = expf(logit - largest);
  for (int it = 0; it < iters; ++it) {
    float sum = v;
#pragma unroll
    for (int o = 1; o < N; o *= 2) sum += __shfl_xor_sync(kAll, sum, o);  // the row
    v /= sum;
    sum = v;
#pragma unroll
    for (int o = N; o < N * N; o *= 2) sum += __shfl_xor_sync(kAll, sum, o);  // the column
    v /= sum;
  }
  if (lane < N * N) h_res[lane] = v;
}

template <int N, bool kSinkhorn>
__global__ void __launch_bounds__(kSiteMaxThreads) hc_site_kernel(const SiteParams p) {
  constexpr int R = kSinkhorn ? N * N : N;  // H_res rows of W
  constexpr int P = 2 * N + R;  // gate rows; sums[P] is the sum of squares
  constexpr int Y = kSinkhorn ? N : 1;  // old streams a thread's write mixes: all of them, or its own
  extern __shared__ float mixed[];  // (N, columns of the block): products summed over the streams
  __shared__ float warp_sums[kSiteMaxThreads / 32][P + 1];
  __shared__ float block_sums[P + 1];  // read by the cluster's other blocks
  __shared__ float totals[P + 1];
  __shared__ float h_pre[N];
  __shared__ float h_res[kSinkhorn ? N * N : 1];  // WRITE: the previous site's dense H_res
  const int row = blockIdx.y, cols = p.C / gridDim.x, chunks = cols / kSiteColumns;
  const int j = threadIdx.x / chunks, local = threadIdx.x % chunks * kSiteColumns;
  const int col = blockIdx.x * cols + local;  // the thread's first column in the row
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // What the kernel before does not write: the weights, and (WRITE) the streams and gates of the
  // site before, written by an earlier kernel (the one before waited for it before letting us start).
  uint4 w[P];
  if (p.read)
#pragma unroll
    for (int q = 0; q < P; ++q)
      w[q] = *reinterpret_cast<const uint4*>(p.weight + static_cast<size_t>(q) * N * p.C + j * p.C + col);
  const __nv_bfloat16* y_row = p.y + row * p.y_row;
  uint4 y_raw[Y] = {}, e_raw{};
  float post = 0.f, keep = 0.f;
  if (p.write) {
#pragma unroll
    for (int k = 0; k < Y; ++k)
      y_raw[k] = *reinterpret_cast<const uint4*>(y_row + (kSinkhorn ? k : j) * p.y_stream + col);
    post = p.h_post[row * N + j];
    if constexpr (kSinkhorn) {
      if (warp == 0) sinkhorn<N>(p.h_res + row * R, p.sinkhorn_iters, h_res);
    } else {
      keep = p.h_res[row * N + j];
    }
    if (p.embedding != nullptr) e_raw = *reinterpret_cast<const uint4*>(p.embedding + col);
  }
  wait_for_previous_kernel();
  allow_next_kernel();

  float v[kSiteColumns];  // y'_j at the thread's columns, rounded as stored
  if (p.write) {
    if constexpr (kSinkhorn) __syncthreads();  // h_res written
    float kept[kSiteColumns] = {}, out[kSiteColumns], e[kSiteColumns];
#pragma unroll
    for (int k = 0; k < Y; ++k) {  // sum_k H_res[j, k] y_k, the streams summed in order
      float y_old[kSiteColumns];
      bf16x8_to_float(y_raw[k], y_old);
      const float h = kSinkhorn ? h_res[j * N + k] : keep;
#pragma unroll
      for (int c = 0; c < kSiteColumns; ++c) kept[c] += h * y_old[c];
    }
    bf16x8_to_float(*reinterpret_cast<const uint4*>(p.out + row * p.C + col), out);
    bf16x8_to_float(e_raw, e);  // zeros without an embedding
    uint4 stored;
    __nv_bfloat16* s = reinterpret_cast<__nv_bfloat16*>(&stored);
#pragma unroll
    for (int c = 0; c < kSiteColumns; ++c) {
      s[c] = __float2bfloat16(kept[c] + post * (out[c] + e[c]));
      v[c] = __bfloat162float(s[c]);
    }
    if (!p.merge)
      *reinterpret_cast<uint4*>(p.y_new + (static_cast<size_t>(row) * N + j) * p.C + col) = stored;
  } else {
    bf16x8_to_float(*reinterpret_cast<const uint4*>(y_row + j * p.y_stream + col), v);  // the kernel before wrote y
  }

  float weight_of_stream = 1.f / N;  // MERGE: the mean
  if (p.read) {
    float sums[P + 1];
#pragma unroll
    for (int q = 0; q < P; ++q) {
      float wq[kSiteColumns];
      bf16x8_to_float(w[q], wq);
      sums[q] = 0.f;
#pragma unroll
      for (int c = 0; c < kSiteColumns; ++c) sums[q] += wq[c] * v[c];
    }
    sums[P] = 0.f;
#pragma unroll
    for (int c = 0; c < kSiteColumns; ++c) sums[P] += v[c] * v[c];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
#pragma unroll
      for (int q = 0; q <= P; ++q) sums[q] += __shfl_xor_sync(0xffffffffu, sums[q], offset);
    if (lane == 0)
#pragma unroll
      for (int q = 0; q <= P; ++q) warp_sums[warp][q] = sums[q];
    __syncthreads();
    const int t = threadIdx.x;
    if (t <= P) {
      float sum = 0.f;
      for (int k = 0; k < static_cast<int>(blockDim.x) / 32; ++k) sum += warp_sums[k][t];
      block_sums[t] = sum;
    }
    if (gridDim.x == 1) {  // one block a row (always off sm_90)
      if (t <= P) totals[t] = block_sums[t];
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
      cluster.sync();  // every block's sums written
      if (t <= P) {
        float sum = 0.f;
        for (int r = 0; r < static_cast<int>(gridDim.x); ++r) sum += *cluster.map_shared_rank(&block_sums[t], r);
        totals[t] = sum;
      }
#endif
    }
    __syncthreads();
    if (t < R) {  // stream t's gates (H_res entry t's logit), the same in every block
      const float inv_rms = rsqrtf(totals[P] / (N * p.C) + p.eps);
      const float a_pre = __bfloat162float(p.alpha[0]), a_post = __bfloat162float(p.alpha[1]),
                  a_res = __bfloat162float(p.alpha[2]);
      if (t < N) h_pre[t] = sigmoid(a_pre * (totals[t] * inv_rms) + __bfloat162float(p.bias[t]));
      if (blockIdx.x == 0) {
        if (t < N)
          p.gates_post[row * N + t] = 2.f * sigmoid(a_post * (totals[N + t] * inv_rms) + __bfloat162float(p.bias[N + t]));
        const float res = a_res * (totals[2 * N + t] * inv_rms) + __bfloat162float(p.bias[2 * N + t]);
        p.gates_res[row * R + t] = kSinkhorn ? res : sigmoid(res);
      }
    }
    __syncthreads();
    weight_of_stream = h_pre[j];
  }

  if (p.read || p.merge) {  // x (or the mean) = sum_j weight_j y'_j, the streams summed in order
#pragma unroll
    for (int c = 0; c < kSiteColumns; ++c) mixed[j * cols + local + c] = weight_of_stream * v[c];
    __syncthreads();
    if (j == 0) {
      uint4 stored;
      __nv_bfloat16* s = reinterpret_cast<__nv_bfloat16*>(&stored);
#pragma unroll
      for (int c = 0; c < kSiteColumns; ++c) {
        float sum = mixed[local + c];
#pragma unroll
        for (int k = 1; k < N; ++k) sum += mixed[k * cols + local + c];
        s[c] = __float2bfloat16(sum);
      }
      *reinterpret_cast<uint4*>(p.x + row * p.C + col) = stored;
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (p.read && gridDim.x > 1) cooperative_groups::this_cluster().sync();  // our block_sums stay until all have read them
#endif
}

template <int N, bool kSinkhorn>
void launch_site(const SiteParams& p, int rows, int blocks, cudaStream_t stream, bool programmatic) {
  const int cols = p.C / blocks;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(blocks, rows);
  config.blockDim = dim3(N * cols / kSiteColumns);
  config.dynamicSmemBytes = N * cols * sizeof(float);
  config.stream = stream;
  launch_with(config, hc_site_kernel<N, kSinkhorn>, p, blocks, programmatic);  // a row's blocks: a cluster
}

// ---- mHC's sites folded into the GEMVs around a sub-layer (quant/gemv.cu: SiteFold) ----
// An mHC model wraps each attention and MLP sub-layer in a site (32 in an S model): at one kernel a
// site, an int4 decode step spent as long on them as on its layers. Folded, a site costs no kernel:
//   - the GEMV that closes a branch (wo, w_down) does the site's write on its own output columns,
//     y'_i = sum_j H_res[i, j] y_j + h_post_i out, stores y', and sums its columns' share of the next
//     site's W y' and of |y'|^2, one set of sums a block (W and the old streams are loaded before it
//     waits for the kernel before; the gates may come from that kernel, so they are read after);
//   - the GEMV that opens the next branch (wqkv, w_gate_up) adds up those sums, computes the gates
//     in every block, and combines its input x = sum_j h_pre_j y'_j as it stages it; one block more
//     than the GEMV's runs the site's Sinkhorn iterations, for the write that closes the branch.
// The first site's read and the last site's write (the merge) stay on hc_site_kernel. The math and the
// roundings are the site kernel's: y' and x in bf16, everything else in fp32.

__host__ __device__ constexpr int fold_sums(int n) { return 2 * n + n * n + 1; }  // W's rows, then |y'|^2

// 1/x from the special function unit (rcp.approx.ftz, within 1 ulp): the folds' Sinkhorn takes 2n an
// iteration, and with correctly rounded ones a write running the 20 iterations took 5.7 us longer
// (results/int4.json: mhc_fold_sinkhorn_ab_2026_11_26).
__device__ __forceinline__ float approx_rcp(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// Each row (kRows) or each column of v scaled to sum to 1.
template <int N, bool kRows>
__device__ __forceinline__ void normalize_lines(float (&v)[N][N]) {
#pragma unroll
  for (int a = 0; a < N; ++a) {
    float sum = 0.f;
#pragma unroll
    for (int b = 0; b < N; ++b) sum += kRows ? v[a][b] : v[b][a];
    const float inv = approx_rcp(sum);
#pragma unroll
    for (int b = 0; b < N; ++b) (kRows ? v[a][b] : v[b][a]) *= inv;
  }
}

// H_res = sinkhorn(logits) for the folds, where the iterations' latency is what counts, not the
// threads': one thread holds the N x N matrix in registers, so no sum needs a shuffle, and each half
// iteration is N independent sums, reciprocals and scalings. The same iterates as `sinkhorn` above
// (exp domain, rows scaled by their largest entry first).
template <int N>
__device__ __forceinline__ void fold_sinkhorn(const float* logits, int iters, float* h_res) {
  float v[N][N];
#pragma unroll
  for (int r = 0; r < N; ++r) {
    float largest = logits[r * N];
#pragma unroll
    for (int c = 1; c < N; ++c) largest = fmaxf(largest, logits[r * N + c]);
#pragma unroll
    for (int c = 0; c < N; ++c) v[r][c] = expf(logits[r * N + c] - largest);
  }
#pragma unroll 2
  for (int it = 0; it < iters; ++it) {
    normalize_lines<N, true>(v);   // rows
    normalize_lines<N, false>(v);  // then columns
  }
#pragma unroll
  for (int r = 0; r < N; ++r)
#pragma unroll
    for (int c = 0; c < N; ++c) h_res[r * N + c] = v[r][c];
}

// fold_sinkhorn for n streams (1, 2 or 4), run by the calling thread.
__device__ __forceinline__ void fold_sinkhorn(const float* logits, int n, int iters, float* h_res) {
  if (n == 4) return fold_sinkhorn<4>(logits, iters, h_res);
  if (n == 2) return fold_sinkhorn<2>(logits, iters, h_res);
  return fold_sinkhorn<1>(logits, iters, h_res);
}

// READ, after the wait: the gates from the GEMV before's sums; h_pre stays in `fold` for fold_x_word.
// The sums are (S, blocks), a row of the GEMV before's blocks for each; a warp adds up a row, each
// lane with all its loads in flight at once. The GEMV's blocks need only h_pre and the RMS, n + 1 of
// the S rows: adding up all 25 rows of 256 blocks made mhc-m's wqkv 8.8 us against 7.3 with one
// block's sums, the 5 it needs 7.4 (results/int4.json: mhc_fold_read_sums_2026_11_27). The grid has
// one block more than the GEMV's, the site block: it adds up all S, stores h_post and the logits,
// runs H_res's Sinkhorn iterations for the write that closes the branch (so that they are off that
// GEMV's critical path) and stores H_res; it does no GEMV work (returns true).
constexpr int kFoldSumLoads = 8;  // a lane's loads in flight: 256 blocks a round
__device__ __forceinline__ bool fold_read_gates(const FoldParams& p, float* fold) {
  const SiteFold& s = p.site;
  const int n = s.n, S = fold_sums(n), t = threadIdx.x, lane = t % 32, warps = blockDim.x / 32;
  const bool site_block = blockIdx.x == gridDim.x - 1;
  float* totals = fold;     // (S,)
  float* h_pre = fold + S;  // (n,)
  for (int i = t / 32; i < (site_block ? S : n + 1); i += warps) {
    const int q = site_block || i < n ? i : S - 1;  // W's rows for h_pre, then |y'|^2
    float sum = 0.f;
    for (int b0 = lane; b0 < s.partial_blocks; b0 += 32 * kFoldSumLoads) {
      float part[kFoldSumLoads];
#pragma unroll
      for (int k = 0; k < kFoldSumLoads; ++k) {
        const int b = b0 + 32 * k;
        part[k] = b < s.partial_blocks ? s.partials[q * s.partial_blocks + b] : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kFoldSumLoads; ++k) sum += part[k];
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) totals[q] = sum;
  }
  __syncthreads();
  if (t < n * n) {
    const float inv_rms = rsqrtf(totals[S - 1] / (n * p.K) + s.eps);
    const float a_pre = __bfloat162float(s.alpha[0]), a_post = __bfloat162float(s.alpha[1]),
                a_res = __bfloat162float(s.alpha[2]);
    if (t < n) {
      h_pre[t] = sigmoid(a_pre * (totals[t] * inv_rms) + __bfloat162float(s.bias[t]));
      if (site_block) s.h_post[t] = 2.f * sigmoid(a_post * (totals[n + t] * inv_rms) + __bfloat162float(s.bias[n + t]));
    }
    if (site_block) s.logits[t] = a_res * (totals[2 * n + t] * inv_rms) + __bfloat162float(s.bias[2 * n + t]);
  }
  __syncthreads();
  if (site_block && t == 0) fold_sinkhorn(s.logits, n, s.iters, s.logits + n * n);  // its own stores
  return site_block;
}

// READ: word j of the GEMV's input, x = sum_i h_pre_i y'_i (the streams summed in order), in bf16.
__device__ __forceinline__ void fold_x_word(const FoldParams& p, const float* fold, int j, float* v) {
  const int n = p.site.n;
  const float* h_pre = fold + fold_sums(n);
  uint4 words[4];  // all n loads in flight at once
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (i < n) words[i] = p.x[i * (p.K / 8) + j];
  float sum[8] = {};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i == n) break;
    float y[8];
    bf16x8_to_float(words[i], y);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] += h_pre[i] * y[e];
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = __bfloat162float(__float2bfloat16(sum[e]));
}

// WRITE, before the wait (written by earlier kernels, or parameters): the next site's W at the block's
// columns and the old streams there. `fold`: w (S - 1, n, cols), y (n, cols), then fold_write's H_res
// and y'.
__device__ __forceinline__ void fold_write_early(const FoldParams& p, float* fold, int col0, int cols) {
  const SiteFold& s = p.site;
  const int n = s.n, rows = fold_sums(n) - 1;
  float* w = fold;
  float* y = w + rows * n * cols;
  for (int e = threadIdx.x; e < rows * n * cols; e += blockDim.x)  // W[q, i N + col0 + c] at (q, i, c)
    w[e] = __bfloat162float(s.next_weight[static_cast<size_t>(e / cols) * p.N + col0 + e % cols]);
  for (int e = threadIdx.x; e < n * cols; e += blockDim.x)
    y[e] = __bfloat162float(s.streams[e / cols * s.stream_stride + col0 + e % cols]);
}

constexpr int kFoldSumLanes = 8;  // fold_write's lanes a sum: fold_sums(4) x 8 <= 256, the smallest GEMV block

// WRITE, after the block stored its outputs (kStore): H_res (the read's site block left it, or thread 0
// runs the iterations on the logits of a read that was not folded), y' at its columns, one thread
// each, and the block's sums, kFoldSumLanes lanes a sum over y' in shared memory.
__device__ __forceinline__ void fold_write(const FoldParams& p, float* fold, int col0, int cols) {
  const SiteFold& s = p.site;
  const int n = s.n, S = fold_sums(n), rows = S - 1, t = threadIdx.x;
  const float* w = fold;
  const float* y = w + rows * n * cols;
  float* h = fold + rows * n * cols + n * cols;  // (n, n)
  float* mixed = h + n * n;                      // y' (n, cols)
  if (s.iters > 0) {
    if (t == 0) fold_sinkhorn(s.write_res, n, s.iters, h);
  } else if (t < n * n) {
    h[t] = s.write_res[t];
  }
  __syncthreads();  // the block's outputs stored, H_res in shared memory
  if (t < n * cols) {
    const int i = t / cols, c = t % cols;
    float kept = 0.f;
    for (int k = 0; k < n; ++k) kept += h[i * n + k] * y[k * cols + c];
    const __nv_bfloat16 stored = __float2bfloat16(kept + s.write_h_post[i] * __bfloat162float(p.y[col0 + c]));
    s.new_streams[static_cast<size_t>(i) * p.N + col0 + c] = stored;
    mixed[t] = __bfloat162float(stored);
  }
  __syncthreads();
  const int q = t / kFoldSumLanes;  // W's row q of the next site (its share at these columns), or |y'|^2
  float sum = 0.f;
  if (q < S)
    for (int e = t % kFoldSumLanes; e < n * cols; e += kFoldSumLanes)
      sum += (q < rows ? w[q * n * cols + e] : mixed[e]) * mixed[e];
#pragma unroll
  for (int offset = kFoldSumLanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (q < S && t % kFoldSumLanes == 0) s.new_partials[q * gridDim.x + blockIdx.x] = sum;  // (S, blocks)
}

// The shared memory (floats) a GEMV block of `cols` output columns adds for its fold.
int fold_floats(const FoldParams& p, int cols) {
  const int n = p.site.n, S = fold_sums(n);
  return p.site.write ? (S - 1) * n * cols + 2 * n * cols + n * n : S + n;
}

// Sets p.site from the tensors of a read fold {partials, bias, alpha} (x: the streams (n, K)) or a
// write fold {streams (n, N), h_post, H_res or logits, next_weight}, and returns the two outputs the
// fold adds: h_post and (2, n^2) the logits and H_res (read: `iters` Sinkhorn iterations in the site
// block), y' and the sums, (S, blocks) for its `blocks` blocks (write: with iters > 0 the write runs
// them on logits, else takes H_res as it is).
std::vector<torch::Tensor> fold_site(FoldParams& p, const torch::Tensor& x, const std::vector<torch::Tensor>& read_site,
                                     const std::vector<torch::Tensor>& write_site, double eps, int64_t iters,
                                     int blocks) {
  SiteFold& s = p.site;
  s.read = !read_site.empty(), s.write = !write_site.empty();
  TORCH_CHECK(!(s.read && s.write), "a GEMV folds one site's read or one site's write");
  const auto floats = x.options().dtype(torch::kFloat);
  const torch::Tensor& streams = s.read ? x : write_site[0];
  TORCH_CHECK(streams.dim() == 2 && streams.stride(1) == 1, "the streams: (n, C), C contiguous");
  s.n = streams.size(0);
  TORCH_CHECK(s.n == 1 || s.n == 2 || s.n == 4, "a folded site: 1, 2 or 4 streams");
  const int S = fold_sums(s.n);
  TORCH_CHECK(iters >= 0, "sinkhorn_iters: at least 0");
  s.iters = static_cast<int>(iters);
  if (s.read) {
    TORCH_CHECK(read_site.size() == 3, "read_site: partials, bias, alpha");
    const torch::Tensor& partials = read_site[0];
    TORCH_CHECK(partials.scalar_type() == torch::kFloat && partials.is_contiguous() && partials.dim() == 2
                    && partials.size(0) == S, "partials: contiguous fp32 (", S, ", blocks)");
    s.partials = partials.data_ptr<float>(), s.partial_blocks = partials.size(1);
    s.bias = bf16_of(read_site[1], S - 1, "bias"), s.alpha = bf16_of(read_site[2], 3, "alpha");
    s.eps = static_cast<float>(eps);
    TORCH_CHECK(iters > 0, "a folded read: its Sinkhorn iterations (sinkhorn_iters > 0)");
    auto h_post = torch::empty({s.n}, floats), logits = torch::empty({2 * s.n * s.n}, floats);
    s.h_post = h_post.data_ptr<float>(), s.logits = logits.data_ptr<float>();
    return {h_post, logits};
  }
  TORCH_CHECK(write_site.size() == 4, "write_site: streams, h_post, H_res or logits, next_weight");
  TORCH_CHECK(p.epilogue == kStore && streams.size(1) == p.N && streams.scalar_type() == torch::kBFloat16,
              "a folded write: bf16 streams (n, N) after a plain GEMV");
  s.streams = reinterpret_cast<const __nv_bfloat16*>(streams.data_ptr<at::BFloat16>());
  s.stream_stride = streams.stride(0);
  for (int g = 1; g <= 2; ++g)
    TORCH_CHECK(write_site[g].scalar_type() == torch::kFloat && write_site[g].is_contiguous()
                    && write_site[g].numel() == (g == 1 ? s.n : s.n * s.n), "h_post (n,), H_res (n * n,): fp32");
  s.write_h_post = write_site[1].data_ptr<float>(), s.write_res = write_site[2].data_ptr<float>();
  s.next_weight = bf16_of(write_site[3], static_cast<int64_t>(S - 1) * s.n * p.N, "next_weight");
  auto new_streams = torch::empty({s.n, p.N}, x.options()), partials = torch::empty({S, blocks}, floats);
  s.new_streams = reinterpret_cast<__nv_bfloat16*>(new_streams.data_ptr<at::BFloat16>());
  s.new_partials = partials.data_ptr<float>();
  return {new_streams, partials};
}

}  // namespace

std::vector<torch::Tensor> hc_site_decode(torch::Tensor y, std::optional<torch::Tensor> out,
                                          std::optional<torch::Tensor> h_post, std::optional<torch::Tensor> h_res,
                                          std::optional<torch::Tensor> embedding, std::optional<torch::Tensor> weight,
                                          std::optional<torch::Tensor> bias, std::optional<torch::Tensor> alpha,
                                          double eps, bool merge, int64_t sinkhorn_iters) {
  TORCH_CHECK(y.dim() == 3 && y.scalar_type() == torch::kBFloat16 && y.stride(2) == 1, "y: bf16 (rows, n, C), C contiguous");
  const int64_t rows = y.size(0), n = y.size(1), C = y.size(2);
  const bool dense = sinkhorn_iters > 0;  // a Sinkhorn H_res (else diagonal)
  const int64_t r = dense ? n * n : n;    // its rows of W, entries of the gates
  SiteParams p{};
  p.y = reinterpret_cast<const __nv_bfloat16*>(y.data_ptr<at::BFloat16>());
  p.y_row = y.stride(0), p.y_stream = y.stride(1);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(p.y) % 16 == 0 && p.y_row % 8 == 0 && p.y_stream % 8 == 0,
              "y: 16-byte aligned rows and streams");
  p.C = C, p.eps = static_cast<float>(eps), p.sinkhorn_iters = static_cast<int>(sinkhorn_iters);
  p.write = out.has_value(), p.read = weight.has_value(), p.merge = merge;
  TORCH_CHECK(p.write || p.read, "hc_site_decode: nothing to do (no out, no weight)");
  TORCH_CHECK(!(p.read && merge) && (p.write || !merge), "merge: a write without a read");
  auto options = y.options();
  auto none = [&] { return torch::empty({0}, options); };  // an output this call does not make (none aliases)
  torch::Tensor y_new = none(), x = none(), gates_post = none(), gates_res = none();
  if (p.write) {
    p.out = bf16_of(*out, rows * C, "out");
    TORCH_CHECK(h_post.has_value() && h_res.has_value(), "a write needs the gates h_post, h_res");
    for (const torch::Tensor* g : {&*h_post, &*h_res})
      TORCH_CHECK(g->scalar_type() == torch::kFloat && g->is_contiguous(), "h_post, h_res: contiguous fp32");
    TORCH_CHECK(h_post->numel() == rows * n && h_res->numel() == rows * r, "h_post: (rows, n), h_res: (rows, ", r, ")");
    p.h_post = h_post->data_ptr<float>(), p.h_res = h_res->data_ptr<float>();
    if (embedding.has_value()) p.embedding = bf16_of(*embedding, C, "embedding");
    if (!merge) {
      y_new = torch::empty({rows, n, C}, options);
      p.y_new = reinterpret_cast<__nv_bfloat16*>(y_new.data_ptr<at::BFloat16>());
    }
  }
  if (p.read) {
    p.weight = bf16_of(*weight, (2 * n + r) * n * C, "weight");
    TORCH_CHECK(bias.has_value() && alpha.has_value(), "a read needs bias and alpha");
    p.bias = bf16_of(*bias, 2 * n + r, "bias"), p.alpha = bf16_of(*alpha, 3, "alpha");
    gates_post = torch::empty({rows, n}, options.dtype(torch::kFloat));
    gates_res = torch::empty({rows, r}, options.dtype(torch::kFloat));
    p.gates_post = gates_post.data_ptr<float>(), p.gates_res = gates_res.data_ptr<float>();
  }
  if (p.read || merge) {
    x = torch::empty({rows, C}, options);
    p.x = reinterpret_cast<__nv_bfloat16*>(x.data_ptr<at::BFloat16>());
  }
  const c10::cuda::CUDAGuard guard(y.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Device& d = device_info(y.get_device());
  // blocks a row: as many as a cluster takes while each keeps whole warps and 8 columns a thread
  int blocks = 1;
  if (d.major >= 9)
    while (blocks < kSiteMaxClusterBlocks && n * C % (2 * blocks * kSiteColumns * 32) == 0) blocks *= 2;
  TORCH_CHECK(C % (blocks * kSiteColumns) == 0 && n * C % (blocks * kSiteColumns * 32) == 0
                  && n * C / (blocks * kSiteColumns) <= kSiteMaxThreads,
              "n x C: a multiple of 256 and at most ", kSiteMaxThreads * kSiteColumns * blocks);
  const bool programmatic = d.major >= 9;
  using Launch = void (*)(const SiteParams&, int, int, cudaStream_t, bool);
  // A Sinkhorn site's 2n + n^2 weight rows stay in registers up to n = 4 (n = 8 would take 80).
  const std::array<Launch, 4> diagonal = {launch_site<1, false>, launch_site<2, false>, launch_site<4, false>,
                                          launch_site<8, false>};
  const std::array<Launch, 4> dense_res = {launch_site<1, true>, launch_site<2, true>, launch_site<4, true>, nullptr};
  const int which = n == 1 ? 0 : n == 2 ? 1 : n == 4 ? 2 : n == 8 ? 3 : -1;
  const Launch launch = which < 0 ? nullptr : (dense ? dense_res : diagonal)[which];
  TORCH_CHECK(launch != nullptr, "n (streams): 1, 2, 4 or 8 (1, 2 or 4 with a Sinkhorn H_res)");
  launch(p, rows, blocks, stream, programmatic);
  return {y_new, x, gates_post, gates_res};
}
