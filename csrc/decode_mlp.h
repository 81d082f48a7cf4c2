// Fused elastic MLP for decode: up to kDecodeMaxTokens tokens, each at its own hidden width.
//
//   hidden[t, f] = act(x[t] . w_gate[f]) * (x[t] . w_up[f] + b_up[f])   (gated)
//                = act(x[t] . w_up[f] + b_up[f])                         (ungated)
//                  for f < width[t], 0 beyond;
//   out[t, d]    = scale[t] * (hidden[t, :] . w_down[d, :]) + b_down[d].
//
// Torch-free: buffers by address, sizes and strides in elements, a cudaStream_t handle.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flextron {

constexpr int64_t kDecodeMaxTokens = 64;

enum class DecodeDtype : int { kFloat16 = 0, kBFloat16 = 1 };
// Same order as flextron_kernels.reference.ACTIVATIONS.
enum class DecodeActivation : int { kSilu = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3, kRelu2 = 4 };

struct DecodeMlpArgs {
  int dtype;       // DecodeDtype
  int activation;  // DecodeActivation
  int64_t num_tokens, d_model, ffn;
  const void* x;          // [num_tokens, d_model], row stride x_stride
  int64_t x_stride;
  const void* w_up;       // [ffn, d_model], row stride w_up_stride
  int64_t w_up_stride;
  const void* w_gate;     // [ffn, d_model] or null (ungated), row stride w_gate_stride
  int64_t w_gate_stride;
  const void* w_down;     // [d_model, ffn], row stride w_down_stride
  int64_t w_down_stride;
  const void* b_up;       // [ffn] or null
  const void* b_down;     // [d_model] or null
  const void* scale;      // [num_tokens] or null
  const int32_t* widths;  // [num_tokens] device int32, or null: every token at static_width
  int64_t static_width;
  void* hidden;           // [num_tokens, ffn] workspace, the dtype of x
  void* out;              // [num_tokens, d_model], row stride out_stride
  int64_t out_stride;
};

// Checks sizes and alignment (std::invalid_argument naming what is wrong), then enqueues two
// kernels on the stream: no allocation, no synchronisation, launch shapes from the sizes only
// (the widths are read on the device), so a CUDA graph can capture it.
void elastic_mlp_decode_cuda(const DecodeMlpArgs& args, void* stream);

}  // namespace flextron
