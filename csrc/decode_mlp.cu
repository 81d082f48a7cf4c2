// CUDA implementation of the fused elastic decode MLP (see decode_mlp.h).
//
// Decode is memory-bound: each weight byte is used by at most 64 tokens. Two kernels on
// the caller's stream, each a stream over weight rows:
//
//   1. hidden_kernel  one block per 16 rows of w_up/w_gate: both projections, the
//                     activation and the width mask, into hidden [T, F]; blocks whose rows
//                     are past every token's width return at once (no weight read).
//   2. down_kernel    one block per 16 rows of w_down: the reduction runs over the first
//                     max(width) columns only; scale and b_down in the epilogue.
//
// Inside a block, the 8 warps split the reduction (32 columns per warp and step, 8
// contiguous elements, one 16-byte load per lane and row) and are summed in a fixed order
// through shared memory, so results are deterministic (a graph replay equals eager).
//
// Tensor cores do the multiply (mma.m16n8k16: 16 weight rows x 8 tokens x 16 columns).
// A reduction does not care in which order its columns come, so each lane feeds the mma
// the 8 contiguous elements it loaded, and the token operand is loaded with the same
// column permutation: no shuffle, no shared-memory staging. With 16 or more tokens,
// fp32 FMAs on the CUDA cores would cost as much time as the weight stream itself.
#include "decode_mlp.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace flextron {

namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerBlock = 16;           // the M of one mma.m16n8k16
constexpr int kColumnsPerWarpStep = 32;     // 4 lanes x 8 elements (16 bytes)
constexpr int kBlockStep = kWarps * kColumnsPerWarpStep;

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                           uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// Weights are read once: stream them past L1 (evict-first). Token rows are re-read by
// every block: the read-only cache.
__device__ __forceinline__ uint4 load_weights(const void* p) { return __ldcs(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint4 load_tokens(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ float activate(int activation, float z) {
  switch (static_cast<DecodeActivation>(activation)) {
    case DecodeActivation::kSilu:
      return z / (1.0f + __expf(-z));
    case DecodeActivation::kGelu:
      return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case DecodeActivation::kGeluTanh:
      return 0.5f * z * (1.0f + tanhf(0.79788456080286536f * (z + 0.044715f * z * z * z)));
    case DecodeActivation::kRelu:
      return fmaxf(z, 0.0f);
    case DecodeActivation::kRelu2: {
      const float r = fmaxf(z, 0.0f);
      return r * r;
    }
  }
  return z;
}

// The widest token of the batch, clamped to [0, ffn]. Every thread reads the (at most
// 64, cached) widths itself: no synchronisation needed.
__device__ __forceinline__ int64_t batch_max_width(const DecodeMlpArgs& p) {
  if (p.widths == nullptr) return p.static_width;
  int width = 0;
  for (int64_t t = 0; t < p.num_tokens; ++t) width = max(width, p.widths[t]);
  return min(static_cast<int64_t>(max(width, 0)), p.ffn);
}

// Loads in flight per lane and step: with few tokens, several steps' weight loads are
// issued before the first mma; with more tokens the token operands take the registers.
template <int NT>
__host__ __device__ constexpr int unroll_for() {
  return NT <= 2 ? 4 : (NT == 4 ? 2 : 1);
}

// One step of the block over kUnroll x 256 columns from `base` (per lane: kUnroll loads of
// 16 bytes per weight row and token, then the mmas). PREDICATED: columns from `limit` on
// (relative to the lane's first column) read as zeros.
template <typename T, int NT, int NMAT, bool PREDICATED>
__device__ __forceinline__ void block_step(const T* const (&w_lo)[NMAT], const T* const (&w_hi)[NMAT],
                                           const T* const (&token_row)[NT], int64_t base, int64_t limit,
                                           float (&acc)[NMAT][NT][4]) {
  constexpr int kUnroll = unroll_for<NT>();
  uint4 a_lo[kUnroll][NMAT], a_hi[kUnroll][NMAT], b[kUnroll][NT];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t offset = base + u * kBlockStep;
    const bool col_ok = !PREDICATED || offset < limit;
    const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int m = 0; m < NMAT; ++m) {
      a_lo[u][m] = col_ok ? load_weights(w_lo[m] + offset) : zero;
      a_hi[u][m] = col_ok ? load_weights(w_hi[m] + offset) : zero;
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) b[u][j] = col_ok ? load_tokens(token_row[j] + offset) : zero;
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
    for (int m = 0; m < NMAT; ++m) {
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        mma_16x8x16<T>(acc[m][j], a_lo[u][m].x, a_hi[u][m].x, a_lo[u][m].y, a_hi[u][m].y, b[u][j].x, b[u][j].y);
        mma_16x8x16<T>(acc[m][j], a_lo[u][m].z, a_hi[u][m].z, a_lo[u][m].w, a_hi[u][m].w, b[u][j].z, b[u][j].w);
      }
    }
  }
}

// acc[m][j] += w[m][row0:row0+16, :k_end] . in[8j:8j+8, :k_end]^T over this warp's
// share of the columns (chunk c of 32 columns belongs to warp c % kWarps).
// mma fragment layout (lane = 4g + q): the A operand holds rows g and g+8 at logical
// columns 2q, 2q+1, 2q+8, 2q+9, the B operand token g at the same columns. Lane q's
// 16-byte load covers physical columns 8q..8q+7 of the 32-column chunk; step s of the
// two mmas per chunk maps logical columns {2q, 2q+1 | 2q+8, 2q+9} to physical
// 8q+4s+{0, 1 | 2, 3}, the same map for both operands.
//
// Rows past num_rows and tokens past num_tokens read the last valid row or token
// instead: their results are never stored. So only the columns of the last block step
// need a predicate, and every other step's loads are unconditional, which lets the
// compiler issue all of them before the step's first mma (predicated loads were
// interleaved with the mmas, a few in flight at a time).
template <typename T, int NT, int NMAT>
__device__ __forceinline__ void accumulate_rows(const T* const* w, const int64_t* w_stride,
                                                int64_t row0, int64_t num_rows, const T* in, int64_t in_stride,
                                                int64_t num_tokens, int64_t k_end, float (&acc)[NMAT][NT][4]) {
  constexpr int kUnroll = unroll_for<NT>();
  constexpr int64_t kStep = static_cast<int64_t>(kUnroll) * kBlockStep;  // columns per block step
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  const int64_t lane_col = static_cast<int64_t>(warp) * kColumnsPerWarpStep + 8 * q;
  const T* w_lo[NMAT];
  const T* w_hi[NMAT];
#pragma unroll
  for (int m = 0; m < NMAT; ++m) {
    w_lo[m] = w[m] + min(row0 + g, num_rows - 1) * w_stride[m] + lane_col;
    w_hi[m] = w[m] + min(row0 + g + 8, num_rows - 1) * w_stride[m] + lane_col;
  }
  const T* token_row[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) token_row[j] = in + min(static_cast<int64_t>(j * 8 + g), num_tokens - 1) * in_stride + lane_col;

  // k_end and every column here are multiples of 8: a lane's 8 elements are all in or all out.
  const int64_t full_end = k_end / kStep * kStep;
  // The loop bounds are the same for every lane of the warp (mma.sync needs all 32).
  for (int64_t base = 0; base < full_end; base += kStep) {
    block_step<T, NT, NMAT, false>(w_lo, w_hi, token_row, base, k_end - lane_col, acc);
  }
  if (full_end < k_end) block_step<T, NT, NMAT, true>(w_lo, w_hi, token_row, full_end, k_end - lane_col, acc);
}

// Sums the warps' partial fragments into warp 0's, in a fixed order (7, 6, ..., 0).
template <int NMAT, int NT>
__device__ __forceinline__ void sum_over_warps(float (&acc)[NMAT][NT][4], float* partial) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int w = kWarps - 1; w >= 1; --w) {
    if (warp == w) {
#pragma unroll
      for (int m = 0; m < NMAT; ++m)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float& slot = partial[((m * NT + j) * 4 + e) * 32 + lane];
            slot = (w == kWarps - 1 ? 0.0f : slot) + acc[m][j][e];
          }
    }
    __syncthreads();
  }
  if (warp == 0) {
#pragma unroll
    for (int m = 0; m < NMAT; ++m)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][j][e] += partial[((m * NT + j) * 4 + e) * 32 + lane];
  }
}

// Calls store(j, e, row, token) for each C fragment element (token tile j, element e) that
// warp 0's lane holds inside [row0, num_rows) x [0, num_tokens).
template <int NT, typename Store>
__device__ __forceinline__ void for_each_result(int64_t row0, int64_t num_rows, int64_t num_tokens, Store store) {
  const int lane = threadIdx.x;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t row = row0 + (lane >> 2) + (e >= 2 ? 8 : 0);
      const int64_t token = j * 8 + 2 * (lane & 3) + (e & 1);
      if (row < num_rows && token < num_tokens) store(j, e, row, token);
    }
  }
}

template <typename T, int NT, bool GATED>
__global__ void __launch_bounds__(kThreads) hidden_kernel(DecodeMlpArgs p) {
  constexpr int NMAT = GATED ? 2 : 1;
  __shared__ float partial[NMAT * NT * 4 * 32];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  if (row0 >= batch_max_width(p)) return;  // the whole block: no token uses these rows

  const T* w[NMAT];
  int64_t w_stride[NMAT];
  w[0] = static_cast<const T*>(p.w_up);
  w_stride[0] = p.w_up_stride;
  if constexpr (GATED) {
    w[1] = static_cast<const T*>(p.w_gate);
    w_stride[1] = p.w_gate_stride;
  }
  float acc[NMAT][NT][4] = {};
  accumulate_rows<T, NT, NMAT>(w, w_stride, row0, p.ffn, static_cast<const T*>(p.x), p.x_stride, p.num_tokens,
                               p.d_model, acc);
  sum_over_warps<NMAT, NT>(acc, partial);
  if (threadIdx.x >= 32) return;

  const T* b_up = static_cast<const T*>(p.b_up);
  T* hidden = static_cast<T*>(p.hidden);
  for_each_result<NT>(row0, p.ffn, p.num_tokens, [&](int j, int e, int64_t row, int64_t token) {
    const int64_t width = p.widths != nullptr ? p.widths[token] : p.static_width;
    const float up = acc[0][j][e] + (b_up != nullptr ? to_float(b_up[row]) : 0.0f);
    const float h = GATED ? activate(p.activation, acc[NMAT - 1][j][e]) * up : activate(p.activation, up);
    hidden[token * p.ffn + row] = from_float<T>(row < width ? h : 0.0f);
  });
}

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads) down_kernel(DecodeMlpArgs p) {
  __shared__ float partial[NT * 4 * 32];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  // hidden is written up to the end of the 16-row block holding the widest token's last
  // unit, and is zero past each token's width: reducing up to a multiple of 8 is exact.
  const int64_t k_end = (batch_max_width(p) + 7) / 8 * 8;

  const T* w[1] = {static_cast<const T*>(p.w_down)};
  const int64_t w_stride[1] = {p.w_down_stride};
  float acc[1][NT][4] = {};
  accumulate_rows<T, NT, 1>(w, w_stride, row0, p.d_model, static_cast<const T*>(p.hidden), p.ffn, p.num_tokens,
                            k_end, acc);
  sum_over_warps<1, NT>(acc, partial);
  if (threadIdx.x >= 32) return;

  const T* scale = static_cast<const T*>(p.scale);
  const T* b_down = static_cast<const T*>(p.b_down);
  T* out = static_cast<T*>(p.out);
  for_each_result<NT>(row0, p.d_model, p.num_tokens, [&](int j, int e, int64_t row, int64_t token) {
    float v = acc[0][j][e];
    if (scale != nullptr) v *= to_float(scale[token]);
    if (b_down != nullptr) v += to_float(b_down[row]);
    out[token * p.out_stride + row] = from_float<T>(v);
  });
}

void fail(const std::string& what) { throw std::invalid_argument("elastic_mlp_decode_cuda: " + what); }

void check_aligned(const void* ptr, const char* name) {
  if (reinterpret_cast<std::uintptr_t>(ptr) % 16 != 0) fail(std::string(name) + " must be 16-byte aligned");
}

void check_stride(int64_t stride, int64_t min_stride, const char* name) {
  if (stride < min_stride || stride % 8 != 0) {
    fail(std::string(name) + " must be a multiple of 8 elements and at least " + std::to_string(min_stride) +
         ", got " + std::to_string(stride));
  }
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("elastic_mlp_decode_cuda: ") + kernel + " failed: " +
                             cudaGetErrorString(err));
  }
}

unsigned blocks_for(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

template <typename T, int NT>
void launch(const DecodeMlpArgs& p, cudaStream_t stream) {
  if (p.ffn > 0) {
    if (p.w_gate != nullptr) {
      hidden_kernel<T, NT, true><<<blocks_for(p.ffn), kThreads, 0, stream>>>(p);
    } else {
      hidden_kernel<T, NT, false><<<blocks_for(p.ffn), kThreads, 0, stream>>>(p);
    }
    check_launch("hidden_kernel");
  }
  down_kernel<T, NT><<<blocks_for(p.d_model), kThreads, 0, stream>>>(p);
  check_launch("down_kernel");
}

template <typename T>
void launch_for_tokens(const DecodeMlpArgs& p, cudaStream_t stream) {
  // Token tiles of 8 (the mma's N), rounded up to a power of two: 4 instantiations.
  if (p.num_tokens <= 8) {
    launch<T, 1>(p, stream);
  } else if (p.num_tokens <= 16) {
    launch<T, 2>(p, stream);
  } else if (p.num_tokens <= 32) {
    launch<T, 4>(p, stream);
  } else {
    launch<T, 8>(p, stream);
  }
}

}  // namespace

void elastic_mlp_decode_cuda(const DecodeMlpArgs& p, void* stream) {
  if (p.dtype != static_cast<int>(DecodeDtype::kFloat16) && p.dtype != static_cast<int>(DecodeDtype::kBFloat16)) {
    fail("dtype must be 0 (float16) or 1 (bfloat16), got " + std::to_string(p.dtype));
  }
  if (p.activation < 0 || p.activation > static_cast<int>(DecodeActivation::kRelu2)) {
    fail("activation must be in [0, 4], got " + std::to_string(p.activation));
  }
  if (p.num_tokens < 0 || p.num_tokens > kDecodeMaxTokens) {
    fail("num_tokens must be in [0, " + std::to_string(kDecodeMaxTokens) + "], got " + std::to_string(p.num_tokens));
  }
  if (p.d_model < 0 || p.d_model % 8 != 0) fail("d_model must be a multiple of 8, got " + std::to_string(p.d_model));
  if (p.ffn < 0 || p.ffn % 8 != 0) fail("ffn must be a multiple of 8, got " + std::to_string(p.ffn));
  if (p.widths == nullptr && (p.static_width < 0 || p.static_width > p.ffn)) {
    fail("static_width must be in [0, ffn=" + std::to_string(p.ffn) + "], got " + std::to_string(p.static_width));
  }
  if (p.num_tokens == 0 || p.d_model == 0) return;
  check_aligned(p.x, "x");
  check_aligned(p.w_up, "w_up");
  check_aligned(p.w_down, "w_down");
  check_aligned(p.hidden, "hidden");
  check_stride(p.x_stride, p.d_model, "x_stride");
  check_stride(p.w_up_stride, p.d_model, "w_up_stride");
  check_stride(p.w_down_stride, p.ffn, "w_down_stride");
  if (p.w_gate != nullptr) {
    check_aligned(p.w_gate, "w_gate");
    check_stride(p.w_gate_stride, p.d_model, "w_gate_stride");
  }
  if (p.out_stride < p.d_model) fail("out_stride must be at least d_model");
  if (p.out == nullptr) fail("out must not be null");

  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == static_cast<int>(DecodeDtype::kBFloat16)) {
    launch_for_tokens<__nv_bfloat16>(p, s);
  } else {
    launch_for_tokens<__half>(p, s);
  }
}

}  // namespace flextron
