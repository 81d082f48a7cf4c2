// Python module flextron_kernels._C.
//
// No libtorch here: buffers are passed as raw addresses (Python ints, e.g.
// tensor.data_ptr()) plus sizes, and a CUDA stream as its cudaStream_t handle
// (e.g. torch.cuda.current_stream().cuda_stream). The caller checks dtypes
// (int32), contiguity, devices and buffer lengths. Nothing here touches CUDA
// at import time, so the module loads on machines without a GPU or driver.
//
// Exceptions: std::invalid_argument -> ValueError, std::runtime_error ->
// RuntimeError (pybind11's standard translation).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "decode_mlp.h"
#include "routing_metadata.h"

// Build facts, defined by CMakeLists.txt for this file.
#ifndef FLEXTRON_VERSION
#define FLEXTRON_VERSION "unknown"
#endif
#ifndef FLEXTRON_CXX_COMPILER
#define FLEXTRON_CXX_COMPILER "unknown"
#endif
#ifndef FLEXTRON_CUDA_ARCHS
#define FLEXTRON_CUDA_ARCHS ""  // comma-separated, e.g. "80,90"
#endif

namespace py = pybind11;

namespace {

template <typename T>
T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

py::list split_archs(const std::string& archs) {
  py::list out;
  std::size_t begin = 0;
  while (begin <= archs.size()) {
    std::size_t end = archs.find(',', begin);
    if (end == std::string::npos) end = archs.size();
    if (end > begin) out.append(archs.substr(begin, end - begin));
    begin = end + 1;
  }
  return out;
}

py::dict build_info() {
  py::dict info;
  info["version"] = FLEXTRON_VERSION;
#ifdef FLEXTRON_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = split_archs(FLEXTRON_CUDA_ARCHS);
#ifdef FLEXTRON_CUDA_VERSION
  info["cuda_version"] = FLEXTRON_CUDA_VERSION;
#else
  info["cuda_version"] = py::none();
#endif
#ifdef FLEXTRON_CUDA_RUNTIME_STATIC
  info["cuda_runtime_static"] = true;
#else
  info["cuda_runtime_static"] = false;
#endif
#else
  info["cuda"] = false;
  info["cuda_archs"] = py::list();
  info["cuda_version"] = py::none();
  info["cuda_runtime_static"] = false;
#endif
  info["cxx_compiler"] = FLEXTRON_CXX_COMPILER;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flextron_kernels compiled extension (C++ and, when built with it, CUDA kernels)";

  m.attr("ROUTING_MAX_GROUPS") = py::int_(flextron::kRoutingMaxGroups);
  m.attr("DECODE_MAX_TOKENS") = py::int_(flextron::kDecodeMaxTokens);

  m.def("build_info", &build_info,
        "Dict describing this build: version, cuda, cuda_archs, cuda_version, cxx_compiler, "
        "cuda_runtime_static.");

  m.def(
      "routing_metadata_cpu",
      [](std::uintptr_t widths, int64_t num_tokens, std::uintptr_t boundaries, int64_t num_groups,
         int64_t block_m, std::uintptr_t sorted_token_idx, std::uintptr_t group_offsets,
         std::uintptr_t tile_group, std::uintptr_t tile_start, std::uintptr_t tile_end,
         std::uintptr_t num_tiles) {
        flextron::routing_metadata_cpu(
            as_ptr<const int32_t>(widths), num_tokens, as_ptr<const int32_t>(boundaries),
            num_groups, block_m, as_ptr<int32_t>(sorted_token_idx),
            as_ptr<int32_t>(group_offsets), as_ptr<int32_t>(tile_group),
            as_ptr<int32_t>(tile_start), as_ptr<int32_t>(tile_end), as_ptr<int32_t>(num_tiles));
      },
      py::arg("widths_ptr"), py::arg("num_tokens"), py::arg("boundaries_ptr"),
      py::arg("num_groups"), py::arg("block_m"), py::arg("sorted_token_idx_ptr"),
      py::arg("group_offsets_ptr"), py::arg("tile_group_ptr"), py::arg("tile_start_ptr"),
      py::arg("tile_end_ptr"), py::arg("num_tiles_ptr"), py::call_guard<py::gil_scoped_release>(),
      "Routing metadata on the host. All buffers are contiguous int32 host memory given by "
      "address: widths[num_tokens], boundaries[num_groups] (strictly increasing), and the "
      "outputs sorted_token_idx[num_tokens], group_offsets[num_groups + 1], "
      "tile_group/tile_start/tile_end[cdiv(num_tokens, block_m) + num_groups], num_tiles[1]. "
      "Any num_groups >= 1 is accepted.");

#ifdef FLEXTRON_WITH_CUDA
  m.def("routing_metadata_workspace_bytes", &flextron::routing_metadata_workspace_bytes,
        py::arg("num_tokens"), py::arg("num_groups"), py::arg("block_m"),
        "Bytes of device workspace routing_metadata_cuda needs for these sizes (no CUDA call).");

  m.def(
      "routing_metadata_cuda",
      [](std::uintptr_t widths, int64_t num_tokens, std::uintptr_t boundaries, int64_t num_groups,
         int64_t block_m, std::uintptr_t sorted_token_idx, std::uintptr_t group_offsets,
         std::uintptr_t tile_group, std::uintptr_t tile_start, std::uintptr_t tile_end,
         std::uintptr_t num_tiles, std::uintptr_t workspace, int64_t workspace_bytes,
         std::uintptr_t stream) {
        if (workspace_bytes < 0) {
          throw std::invalid_argument("routing_metadata_cuda: workspace_bytes must be >= 0");
        }
        flextron::routing_metadata_cuda(
            as_ptr<const int32_t>(widths), num_tokens, as_ptr<const int32_t>(boundaries),
            num_groups, block_m, as_ptr<int32_t>(sorted_token_idx),
            as_ptr<int32_t>(group_offsets), as_ptr<int32_t>(tile_group),
            as_ptr<int32_t>(tile_start), as_ptr<int32_t>(tile_end), as_ptr<int32_t>(num_tiles),
            as_ptr<void>(workspace), static_cast<std::size_t>(workspace_bytes),
            as_ptr<void>(stream));
      },
      py::arg("widths_ptr"), py::arg("num_tokens"), py::arg("boundaries_ptr"),
      py::arg("num_groups"), py::arg("block_m"), py::arg("sorted_token_idx_ptr"),
      py::arg("group_offsets_ptr"), py::arg("tile_group_ptr"), py::arg("tile_start_ptr"),
      py::arg("tile_end_ptr"), py::arg("num_tiles_ptr"), py::arg("workspace_ptr"),
      py::arg("workspace_bytes"), py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Routing metadata on the GPU: same buffers as routing_metadata_cpu, in device memory, plus "
      "a scratch workspace of at least routing_metadata_workspace_bytes(...) bytes and a "
      "cudaStream_t handle. Enqueues kernels on the stream and returns: no synchronisation, "
      "no allocation, capturable in a CUDA graph. num_groups <= ROUTING_MAX_GROUPS.");

  m.def(
      "elastic_mlp_decode_cuda",
      [](int dtype, int activation, int64_t num_tokens, int64_t d_model, int64_t ffn, std::uintptr_t x,
         int64_t x_stride, std::uintptr_t w_up, int64_t w_up_stride, std::uintptr_t w_gate,
         int64_t w_gate_stride, std::uintptr_t w_down, int64_t w_down_stride, std::uintptr_t b_up,
         std::uintptr_t b_down, std::uintptr_t scale, std::uintptr_t widths, int64_t static_width,
         std::uintptr_t hidden, std::uintptr_t out, int64_t out_stride, std::uintptr_t stream) {
        flextron::DecodeMlpArgs args{};
        args.dtype = dtype;
        args.activation = activation;
        args.num_tokens = num_tokens;
        args.d_model = d_model;
        args.ffn = ffn;
        args.x = as_ptr<const void>(x);
        args.x_stride = x_stride;
        args.w_up = as_ptr<const void>(w_up);
        args.w_up_stride = w_up_stride;
        args.w_gate = as_ptr<const void>(w_gate);
        args.w_gate_stride = w_gate_stride;
        args.w_down = as_ptr<const void>(w_down);
        args.w_down_stride = w_down_stride;
        args.b_up = as_ptr<const void>(b_up);
        args.b_down = as_ptr<const void>(b_down);
        args.scale = as_ptr<const void>(scale);
        args.widths = as_ptr<const int32_t>(widths);
        args.static_width = static_width;
        args.hidden = as_ptr<void>(hidden);
        args.out = as_ptr<void>(out);
        args.out_stride = out_stride;
        flextron::elastic_mlp_decode_cuda(args, as_ptr<void>(stream));
      },
      py::arg("dtype"), py::arg("activation"), py::arg("num_tokens"), py::arg("d_model"), py::arg("ffn"),
      py::arg("x_ptr"), py::arg("x_stride"), py::arg("w_up_ptr"), py::arg("w_up_stride"),
      py::arg("w_gate_ptr"), py::arg("w_gate_stride"), py::arg("w_down_ptr"), py::arg("w_down_stride"),
      py::arg("b_up_ptr"), py::arg("b_down_ptr"), py::arg("scale_ptr"), py::arg("widths_ptr"),
      py::arg("static_width"), py::arg("hidden_ptr"), py::arg("out_ptr"), py::arg("out_stride"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
      "Fused elastic MLP for decode (see csrc/decode_mlp.h): dtype 0 float16 / 1 bfloat16, "
      "activation an index into reference.ACTIVATIONS, at most DECODE_MAX_TOKENS tokens; "
      "d_model and ffn multiples of 8, row strides (in elements) multiples of 8, matrices "
      "16-byte aligned, last dimensions contiguous. Optional buffers (w_gate, b_up, b_down, "
      "scale, widths) are 0 when absent; without widths every token runs at static_width. "
      "hidden: a [num_tokens, ffn] workspace of the same dtype. Enqueues two kernels on the "
      "stream: no synchronisation, no allocation, capturable in a CUDA graph.");
#endif
}
