// Routing metadata: group tokens by width and lay out a tile schedule.
//
// The meaning is defined by flextron_kernels.reference.routing_metadata; both
// implementations here agree with it bit for bit. With T tokens, G groups and
// tile height block_m (all buffers int32, contiguous):
//
//   widths[T], boundaries[G]            inputs (boundaries strictly increasing)
//   sorted_token_idx[T]                 token indices, stably sorted by group
//   group_offsets[G + 1]                exclusive prefix sum of group sizes
//   tile_group/tile_start/tile_end[M]   M = cdiv(T, block_m) + G tile slots
//   num_tiles[1]                        number of used tile slots
//
// Token t is in group g = #{boundaries < widths[t]}, clamped to G - 1.
//
// This header is shared by plain C++ and CUDA translation units, so it names
// no CUDA types: device pointers are plain pointers, the stream is a void*.
// Invalid arguments throw std::invalid_argument (ValueError in Python); CUDA
// launch failures throw std::runtime_error (RuntimeError in Python).
#pragma once

#include <cstddef>
#include <cstdint>

namespace flextron {

// Most groups the CUDA implementation supports (one block scans the group
// counts, one thread per group). The CPU implementation takes any number.
constexpr int64_t kRoutingMaxGroups = 1024;

// Number of tile slots: cdiv(num_tokens, block_m) + num_groups.
int64_t routing_max_tiles(int64_t num_tokens, int64_t num_groups, int64_t block_m);

// Checks the sizes shared by both implementations and throws
// std::invalid_argument naming the offending argument: num_tokens >= 0,
// 1 <= num_groups <= max_groups, block_m >= 1, and every index and the tile
// count fitting in int32.
void check_routing_sizes(int64_t num_tokens, int64_t num_groups, int64_t block_m,
                         int64_t max_groups);

// Host implementation; all pointers are host memory.
void routing_metadata_cpu(const int32_t* widths, int64_t num_tokens, const int32_t* boundaries,
                          int64_t num_groups, int64_t block_m, int32_t* sorted_token_idx,
                          int32_t* group_offsets, int32_t* tile_group, int32_t* tile_start,
                          int32_t* tile_end, int32_t* num_tiles);

// Bytes of device scratch memory routing_metadata_cuda needs for these sizes.
// Pure arithmetic: calls no CUDA API.
std::size_t routing_metadata_workspace_bytes(int64_t num_tokens, int64_t num_groups,
                                             int64_t block_m);

// Device implementation; all pointers are device memory. Enqueues fixed-shape
// kernels on `stream` (a cudaStream_t) and returns without synchronising or
// allocating, so it can be captured in a CUDA graph. `workspace` must hold at
// least routing_metadata_workspace_bytes(...) bytes (4-byte aligned).
void routing_metadata_cuda(const int32_t* widths, int64_t num_tokens, const int32_t* boundaries,
                           int64_t num_groups, int64_t block_m, int32_t* sorted_token_idx,
                           int32_t* group_offsets, int32_t* tile_group, int32_t* tile_start,
                           int32_t* tile_end, int32_t* num_tiles, void* workspace,
                           std::size_t workspace_bytes, void* stream);

}  // namespace flextron
