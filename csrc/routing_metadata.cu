// CUDA implementation of routing metadata (see routing_metadata.h).
//
// Five fixed-shape kernels on the caller's stream, no host synchronisation and
// no allocation (scratch lives in the caller's workspace), so the whole thing
// can be captured in a CUDA graph:
//
//   1. count_kernel      one warp per segment of tokens: each token's group
//                        (stored in the workspace) and the segment's histogram.
//   2. scan_seg_kernel   one block per group: exclusive scan of that group's
//                        counts over the segments (in place) and its total.
//   3. scan_group_kernel one block: group_offsets, each group's first tile and
//                        num_tiles from the group totals.
//   4. tiles_kernel      one thread per tile slot: tile_group/start/end.
//   5. scatter_kernel    one warp per segment: each token's stable rank in its
//                        group, and the write into sorted_token_idx.
//
// A segment is a contiguous run of tokens that one warp walks 32 at a time, in
// order. Walking in order is what makes the sort stable: a token's position is
// (its group's offset) + (earlier segments' tokens of the group) + (earlier
// tokens of the group in this segment), the last of which is a running
// counter per group plus the token's rank among same-group lanes of the warp
// (__match_any_sync, then a popcount of the lower lanes).
#include "routing_metadata.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace flextron {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kSegmentWarps = 8;                         // warps per block, kernels 1 and 5
constexpr int kSegmentThreads = kSegmentWarps * kWarpSize;
constexpr int kScanSegThreads = 256;                     // kernel 2
constexpr int kScanGroupThreads = 1024;                  // kernel 3: one thread per group
constexpr int kTileThreads = 256;                        // kernel 4
constexpr std::size_t kWorkspaceAlign = 256;

static_assert(kRoutingMaxGroups <= kScanGroupThreads, "kernel 3 has one thread per group");
// Kernel 1 keeps the boundaries plus one counter per group per warp in shared
// memory; stay under the 48 KiB a launch gets without opting in.
static_assert((1 + kSegmentWarps) * kRoutingMaxGroups * sizeof(int32_t) <= 48 * 1024,
              "shared memory of count_kernel");

// Tokens per segment. Every segment stores one counter per group, so a
// segment at least G tokens long keeps the histogram no larger than the
// tokens; at least 256 tokens keeps the per-segment overhead small when G is.
int64_t segment_length(int64_t num_groups) {
  const int64_t rounded = (num_groups + kWarpSize - 1) / kWarpSize * kWarpSize;
  return std::max<int64_t>(256, rounded);
}

std::size_t align_up(std::size_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

// Where each scratch array lives inside the workspace (byte offsets).
struct WorkspaceLayout {
  int64_t segment_len;
  int64_t num_segments;
  std::size_t token_group;  // int32[T]: group of each token
  std::size_t seg_hist;     // int32[G][num_segments]: counts, then their scan
  std::size_t group_count;  // int32[G]: tokens per group
  std::size_t first_tile;   // int32[G]: first tile slot of each group
  std::size_t total;
};

WorkspaceLayout plan_workspace(int64_t num_tokens, int64_t num_groups) {
  WorkspaceLayout w;
  w.segment_len = segment_length(num_groups);
  w.num_segments = (num_tokens + w.segment_len - 1) / w.segment_len;
  const auto i32 = static_cast<std::size_t>(sizeof(int32_t));
  std::size_t at = 0;
  w.token_group = at;
  at += align_up(static_cast<std::size_t>(num_tokens) * i32);
  w.seg_hist = at;
  at += align_up(static_cast<std::size_t>(num_groups * w.num_segments) * i32);
  w.group_count = at;
  at += align_up(static_cast<std::size_t>(num_groups) * i32);
  w.first_tile = at;
  at += align_up(static_cast<std::size_t>(num_groups) * i32);
  w.total = at;
  return w;
}

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

// Number of boundaries strictly below `width` (a lower_bound), clamped to G - 1.
__device__ __forceinline__ int32_t group_of(const int32_t* bounds, int32_t num_groups,
                                            int32_t width) {
  int32_t lo = 0, hi = num_groups;
  while (lo < hi) {
    const int32_t mid = (lo + hi) >> 1;
    if (bounds[mid] < width) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return min(lo, num_groups - 1);
}

// Exclusive scan of one value per thread, in thread order, over a block of
// kThreads threads. Returns the thread's prefix; *total gets the block sum.
// Every thread of the block must call it.
template <int kThreads>
__device__ int32_t block_exclusive_scan(int32_t value, int32_t* total) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= 1024, "block size");
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ int32_t warp_sums[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  int32_t inclusive = value;
#pragma unroll
  for (int d = 1; d < kWarpSize; d *= 2) {
    const int32_t up = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == kWarpSize - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int32_t sum = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int d = 1; d < kWarpSize; d *= 2) {
      const int32_t up = __shfl_up_sync(kFullMask, sum, d);
      if (lane >= d) sum += up;
    }
    if (lane < kWarps) warp_sums[lane] = sum;  // inclusive scan of warp totals
  }
  __syncthreads();
  const int32_t before = warp == 0 ? 0 : warp_sums[warp - 1];
  *total = warp_sums[kWarps - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + inclusive - value;
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// 1. Group of every token, and a histogram per segment.
// Shared memory: boundaries [G], then one counter array [G] per warp.
__global__ void __launch_bounds__(kSegmentThreads)
    count_kernel(const int32_t* __restrict__ widths, int32_t num_tokens,
                 const int32_t* __restrict__ boundaries, int32_t num_groups,
                 int32_t segment_len, int32_t num_segments, int32_t* __restrict__ token_group,
                 int32_t* __restrict__ seg_hist) {
  extern __shared__ int32_t smem[];
  int32_t* bounds = smem;
  for (int32_t g = threadIdx.x; g < num_groups; g += blockDim.x) bounds[g] = boundaries[g];
  __syncthreads();  // the only block-wide barrier: warps may leave after it

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t segment = static_cast<int64_t>(blockIdx.x) * kSegmentWarps + warp;
  if (segment >= num_segments) return;

  int32_t* count = smem + num_groups * (1 + warp);
  for (int32_t g = lane; g < num_groups; g += kWarpSize) count[g] = 0;
  __syncwarp();

  const int64_t begin = segment * segment_len;
  const int64_t end = min(begin + segment_len, static_cast<int64_t>(num_tokens));
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t t = base + lane;
    int32_t g = -1;  // lanes past the end take part in the match with a non-group
    if (t < end) {
      g = group_of(bounds, num_groups, widths[t]);
      token_group[t] = g;
    }
    const unsigned peers = __match_any_sync(kFullMask, g);
    // The lowest lane of each set of peers adds the set's size: distinct
    // groups touch distinct counters, so no atomics are needed.
    if (g >= 0 && lane == __ffs(peers) - 1) count[g] += __popc(peers);
    __syncwarp();
  }
  // [group][segment] layout: kernel 2 then scans contiguous rows.
  for (int32_t g = lane; g < num_groups; g += kWarpSize) {
    seg_hist[static_cast<int64_t>(g) * num_segments + segment] = count[g];
  }
}

// 2. For group blockIdx.x: seg_hist[g][s] <- tokens of g in segments < s, and
// group_count[g] <- tokens of g.
__global__ void __launch_bounds__(kScanSegThreads)
    scan_seg_kernel(int32_t* __restrict__ seg_hist, int32_t num_segments,
                    int32_t* __restrict__ group_count) {
  int32_t* row = seg_hist + static_cast<int64_t>(blockIdx.x) * num_segments;
  int32_t carry = 0;
  for (int32_t base = 0; base < num_segments; base += kScanSegThreads) {
    const int32_t s = base + threadIdx.x;
    const int32_t value = s < num_segments ? row[s] : 0;
    int32_t chunk_total;
    const int32_t prefix = block_exclusive_scan<kScanSegThreads>(value, &chunk_total);
    if (s < num_segments) row[s] = carry + prefix;
    carry += chunk_total;
  }
  if (threadIdx.x == 0) group_count[blockIdx.x] = carry;
}

// 3. One block, one thread per group: group_offsets, first tile of each group
// and the number of tiles.
__global__ void __launch_bounds__(kScanGroupThreads)
    scan_group_kernel(const int32_t* __restrict__ group_count, int32_t num_groups,
                      int32_t block_m, int32_t* __restrict__ group_offsets,
                      int32_t* __restrict__ first_tile, int32_t* __restrict__ num_tiles) {
  const int32_t g = threadIdx.x;
  const int32_t count = g < num_groups ? group_count[g] : 0;
  const int32_t tiles = count == 0 ? 0 : (count - 1) / block_m + 1;  // cdiv without overflow
  int32_t total_tokens, total_tiles;
  const int32_t offset = block_exclusive_scan<kScanGroupThreads>(count, &total_tokens);
  const int32_t first = block_exclusive_scan<kScanGroupThreads>(tiles, &total_tiles);
  if (g < num_groups) {
    group_offsets[g] = offset;
    first_tile[g] = first;
  }
  if (g == 0) {
    group_offsets[num_groups] = total_tokens;
    *num_tiles = total_tiles;
  }
}

// 4. One thread per tile slot.
__global__ void __launch_bounds__(kTileThreads)
    tiles_kernel(const int32_t* __restrict__ group_offsets, const int32_t* __restrict__ first_tile,
                 const int32_t* __restrict__ num_tiles, int32_t num_groups, int32_t num_tokens,
                 int32_t block_m, int32_t num_slots, int32_t* __restrict__ tile_group,
                 int32_t* __restrict__ tile_start, int32_t* __restrict__ tile_end) {
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * kTileThreads + threadIdx.x;
  if (slot >= num_slots) return;
  if (slot >= *num_tiles) {
    tile_group[slot] = -1;
    tile_start[slot] = num_tokens;
    tile_end[slot] = num_tokens;
    return;
  }
  // The slot's group is the last one whose first tile is <= slot (an
  // upper_bound, minus one): groups without tiles share their first tile with
  // the next group, so they are skipped. first_tile[0] == 0, so g >= 0.
  int32_t lo = 0, hi = num_groups;
  while (lo < hi) {
    const int32_t mid = (lo + hi) >> 1;
    if (first_tile[mid] <= slot) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int32_t g = lo - 1;
  const int64_t start =
      group_offsets[g] + (slot - first_tile[g]) * static_cast<int64_t>(block_m);
  const int64_t end = min(start + block_m, static_cast<int64_t>(group_offsets[g + 1]));
  tile_group[slot] = g;
  tile_start[slot] = static_cast<int32_t>(start);
  tile_end[slot] = static_cast<int32_t>(end);
}

// 5. Stable scatter: walk each segment in order with a running output position
// per group (in shared memory, one array [G] per warp).
__global__ void __launch_bounds__(kSegmentThreads)
    scatter_kernel(const int32_t* __restrict__ token_group, int32_t num_tokens,
                   int32_t num_groups, int32_t segment_len, int32_t num_segments,
                   const int32_t* __restrict__ seg_base, const int32_t* __restrict__ group_offsets,
                   int32_t* __restrict__ sorted_token_idx) {
  extern __shared__ int32_t smem[];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t segment = static_cast<int64_t>(blockIdx.x) * kSegmentWarps + warp;
  if (segment >= num_segments) return;  // no block-wide barrier in this kernel

  int32_t* next = smem + num_groups * warp;
  for (int32_t g = lane; g < num_groups; g += kWarpSize) {
    next[g] = group_offsets[g] + seg_base[static_cast<int64_t>(g) * num_segments + segment];
  }
  __syncwarp();

  const unsigned lower_lanes = (1u << lane) - 1u;
  const int64_t begin = segment * segment_len;
  const int64_t end = min(begin + segment_len, static_cast<int64_t>(num_tokens));
  for (int64_t base = begin; base < end; base += kWarpSize) {
    const int64_t t = base + lane;
    const int32_t g = t < end ? token_group[t] : -1;
    const unsigned peers = __match_any_sync(kFullMask, g);
    if (g >= 0) {
      sorted_token_idx[next[g] + __popc(peers & lower_lanes)] = static_cast<int32_t>(t);
    }
    __syncwarp();  // every peer has read next[g] before the leader bumps it
    if (g >= 0 && lane == __ffs(peers) - 1) next[g] += __popc(peers);
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------

void check_pointer(const void* ptr, const char* name) {
  if (ptr == nullptr) {
    throw std::invalid_argument(std::string("routing_metadata_cuda: ") + name +
                                " is a null pointer");
  }
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("routing_metadata_cuda: ") + kernel + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

unsigned grid_for(int64_t items, int64_t per_block) {
  return static_cast<unsigned>((items + per_block - 1) / per_block);
}

}  // namespace

std::size_t routing_metadata_workspace_bytes(int64_t num_tokens, int64_t num_groups,
                                             int64_t block_m) {
  check_routing_sizes(num_tokens, num_groups, block_m, kRoutingMaxGroups);
  return plan_workspace(num_tokens, num_groups).total;
}

void routing_metadata_cuda(const int32_t* widths, int64_t num_tokens, const int32_t* boundaries,
                           int64_t num_groups, int64_t block_m, int32_t* sorted_token_idx,
                           int32_t* group_offsets, int32_t* tile_group, int32_t* tile_start,
                           int32_t* tile_end, int32_t* num_tiles, void* workspace,
                           std::size_t workspace_bytes, void* stream) {
  check_routing_sizes(num_tokens, num_groups, block_m, kRoutingMaxGroups);
  const WorkspaceLayout layout = plan_workspace(num_tokens, num_groups);
  if (workspace_bytes < layout.total) {
    throw std::invalid_argument("routing_metadata_cuda: workspace_bytes is " +
                                std::to_string(workspace_bytes) + ", need at least " +
                                std::to_string(layout.total));
  }
  // Empty tensors may have a null data pointer; everything else must not.
  if (num_tokens > 0) {
    check_pointer(widths, "widths_ptr");
    check_pointer(sorted_token_idx, "sorted_token_idx_ptr");
  }
  check_pointer(boundaries, "boundaries_ptr");
  check_pointer(group_offsets, "group_offsets_ptr");
  check_pointer(tile_group, "tile_group_ptr");
  check_pointer(tile_start, "tile_start_ptr");
  check_pointer(tile_end, "tile_end_ptr");
  check_pointer(num_tiles, "num_tiles_ptr");
  check_pointer(workspace, "workspace_ptr");
  if (reinterpret_cast<std::uintptr_t>(workspace) % alignof(int32_t) != 0) {
    throw std::invalid_argument("routing_metadata_cuda: workspace_ptr must be 4-byte aligned");
  }

  // check_routing_sizes guarantees that all of these fit in int32.
  const auto T = static_cast<int32_t>(num_tokens);
  const auto G = static_cast<int32_t>(num_groups);
  const auto bm = static_cast<int32_t>(block_m);
  const auto slots = static_cast<int32_t>(routing_max_tiles(num_tokens, num_groups, block_m));
  const auto seg_len = static_cast<int32_t>(layout.segment_len);
  const auto num_segments = static_cast<int32_t>(layout.num_segments);

  auto* ws = static_cast<char*>(workspace);
  auto* token_group = reinterpret_cast<int32_t*>(ws + layout.token_group);
  auto* seg_hist = reinterpret_cast<int32_t*>(ws + layout.seg_hist);
  auto* group_count = reinterpret_cast<int32_t*>(ws + layout.group_count);
  auto* first_tile = reinterpret_cast<int32_t*>(ws + layout.first_tile);
  auto s = static_cast<cudaStream_t>(stream);

  // Kernels 1 and 5 have nothing to do without tokens (and a grid of 0 blocks
  // is an invalid launch); 2-4 still run and write the empty outputs.
  const unsigned segment_blocks = grid_for(num_segments, kSegmentWarps);
  if (T > 0) {
    const std::size_t smem = (1 + kSegmentWarps) * static_cast<std::size_t>(G) * sizeof(int32_t);
    count_kernel<<<segment_blocks, kSegmentThreads, smem, s>>>(widths, T, boundaries, G, seg_len,
                                                              num_segments, token_group, seg_hist);
    check_launch("count_kernel");
  }
  scan_seg_kernel<<<G, kScanSegThreads, 0, s>>>(seg_hist, num_segments, group_count);
  check_launch("scan_seg_kernel");
  scan_group_kernel<<<1, kScanGroupThreads, 0, s>>>(group_count, G, bm, group_offsets,
                                                    first_tile, num_tiles);
  check_launch("scan_group_kernel");
  tiles_kernel<<<grid_for(slots, kTileThreads), kTileThreads, 0, s>>>(
      group_offsets, first_tile, num_tiles, G, T, bm, slots, tile_group, tile_start, tile_end);
  check_launch("tiles_kernel");
  if (T > 0) {
    const std::size_t smem = kSegmentWarps * static_cast<std::size_t>(G) * sizeof(int32_t);
    scatter_kernel<<<segment_blocks, kSegmentThreads, smem, s>>>(
        token_group, T, G, seg_len, num_segments, seg_hist, group_offsets, sorted_token_idx);
    check_launch("scatter_kernel");
  }
}

}  // namespace flextron
