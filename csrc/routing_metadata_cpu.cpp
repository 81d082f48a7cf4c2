// Host implementation of routing metadata (see routing_metadata.h).
#include "routing_metadata.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace flextron {

namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

void check_pointer(const void* ptr, const char* name) {
  if (ptr == nullptr) {
    throw std::invalid_argument(std::string("routing_metadata: ") + name + " is a null pointer");
  }
}

}  // namespace

int64_t routing_max_tiles(int64_t num_tokens, int64_t num_groups, int64_t block_m) {
  return (num_tokens + block_m - 1) / block_m + num_groups;
}

void check_routing_sizes(int64_t num_tokens, int64_t num_groups, int64_t block_m,
                         int64_t max_groups) {
  if (num_tokens < 0) {
    throw std::invalid_argument("routing_metadata: num_tokens must be >= 0, got " +
                                std::to_string(num_tokens));
  }
  if (num_tokens > kInt32Max) {
    throw std::invalid_argument("routing_metadata: num_tokens must fit in int32, got " +
                                std::to_string(num_tokens));
  }
  if (num_groups < 1 || num_groups > max_groups) {
    throw std::invalid_argument("routing_metadata: num_groups must be in [1, " +
                                std::to_string(max_groups) + "], got " +
                                std::to_string(num_groups));
  }
  if (block_m < 1 || block_m > kInt32Max) {
    throw std::invalid_argument("routing_metadata: block_m must be in [1, 2^31 - 1], got " +
                                std::to_string(block_m));
  }
  // Tile indices, group_offsets[G] and the tile count are all int32.
  if (routing_max_tiles(num_tokens, num_groups, block_m) > kInt32Max) {
    throw std::invalid_argument(
        "routing_metadata: num_tokens and num_groups give more than 2^31 - 1 tile slots");
  }
}

void routing_metadata_cpu(const int32_t* widths, int64_t num_tokens, const int32_t* boundaries,
                          int64_t num_groups, int64_t block_m, int32_t* sorted_token_idx,
                          int32_t* group_offsets, int32_t* tile_group, int32_t* tile_start,
                          int32_t* tile_end, int32_t* num_tiles) {
  check_routing_sizes(num_tokens, num_groups, block_m, std::numeric_limits<int32_t>::max());
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

  const int64_t T = num_tokens;
  const int64_t G = num_groups;

  // Group of each token: lower_bound over the boundaries, clamped to G - 1.
  std::vector<int32_t> group(static_cast<std::size_t>(T));
  std::vector<int64_t> offsets(static_cast<std::size_t>(G + 1), 0);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t g = std::lower_bound(boundaries, boundaries + G, widths[t]) - boundaries;
    group[t] = static_cast<int32_t>(std::min(g, G - 1));
    ++offsets[group[t] + 1];
  }
  for (int64_t g = 0; g < G; ++g) offsets[g + 1] += offsets[g];
  for (int64_t g = 0; g <= G; ++g) group_offsets[g] = static_cast<int32_t>(offsets[g]);

  // Counting sort: walking tokens in order keeps each group stable.
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t t = 0; t < T; ++t) sorted_token_idx[next[group[t]]++] = static_cast<int32_t>(t);

  // Tiles: each group in turn, cut into pieces of block_m tokens.
  const int64_t slots = routing_max_tiles(T, G, block_m);
  int64_t tile = 0;
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t start = offsets[g]; start < offsets[g + 1]; start += block_m, ++tile) {
      tile_group[tile] = static_cast<int32_t>(g);
      tile_start[tile] = static_cast<int32_t>(start);
      tile_end[tile] = static_cast<int32_t>(std::min(start + block_m, offsets[g + 1]));
    }
  }
  *num_tiles = static_cast<int32_t>(tile);
  for (; tile < slots; ++tile) {
    tile_group[tile] = -1;
    tile_start[tile] = static_cast<int32_t>(T);
    tile_end[tile] = static_cast<int32_t>(T);
  }
}

}  // namespace flextron
