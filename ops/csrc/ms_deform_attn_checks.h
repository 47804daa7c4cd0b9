// Host-side argument checks shared by the CPU and CUDA bindings.
//
// The Python entry point `uniperceiver_v2.ops.ms_deform_attn` already validates shapes with friendlier
// messages; these checks make the compiled functions safe to call directly as well, because a kernel
// fed a wrongly sized tensor would read out of bounds instead of failing.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace msda {

struct Sizes {
  int64_t batch;        // N
  int64_t num_value;    // S = sum over levels of H * W
  int64_t num_heads;    // M
  int64_t channels;     // C, channels per head
  int64_t num_queries;  // Lq
  int64_t num_levels;   // L
  int64_t num_points;   // P
};

// value (N, S, M, C); spatial_shapes (L, 2) int64; level_start_index (L,) int64;
// sampling_locations (N, Lq, M, L, P, 2); attention_weights (N, Lq, M, L, P).
// All contiguous and on `device_type`.
inline Sizes check_inputs(
    const at::Tensor& value,
    const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights,
    c10::DeviceType device_type) {
  const at::Tensor* all[] = {
      &value, &spatial_shapes, &level_start_index, &sampling_locations, &attention_weights};
  for (const at::Tensor* tensor : all) {
    TORCH_CHECK(tensor->device().type() == device_type,
                "ms_deform_attn: expected every tensor on ", device_type, ", got one on ",
                tensor->device());
    TORCH_CHECK(tensor->is_contiguous(), "ms_deform_attn: inputs must be contiguous");
  }
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, C), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong &&
                  level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share a dtype");

  Sizes sizes;
  sizes.batch = value.size(0);
  sizes.num_value = value.size(1);
  sizes.num_heads = value.size(2);
  sizes.channels = value.size(3);
  sizes.num_queries = sampling_locations.size(1);
  sizes.num_levels = sampling_locations.size(3);
  sizes.num_points = sampling_locations.size(4);

  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == sizes.num_levels &&
                  spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2) with L = ", sizes.num_levels);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == sizes.num_levels,
              "ms_deform_attn: level_start_index must be (L,) with L = ", sizes.num_levels);
  TORCH_CHECK(sampling_locations.size(0) == sizes.batch &&
                  sampling_locations.size(2) == sizes.num_heads,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(),
              " does not match value ", value.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5),
              "ms_deform_attn: attention_weights ", attention_weights.sizes(),
              " does not match sampling_locations ", sampling_locations.sizes());
  return sizes;
}

}  // namespace msda
