// Multi-scale deformable attention on the CPU: forward and backward.
//
// Work is split with at::parallel_for, which PyTorch builds on OpenMP: the kernels share PyTorch's
// OpenMP thread pool, so torch.set_num_threads controls them and no second runtime is started.
//
// Memory layout (all contiguous):
//   value              (N, S, M, C)          S = sum_l H_l * W_l, the levels stacked along S
//   spatial_shapes     (L, 2) int64          (H_l, W_l)
//   level_start_index  (L,) int64            offset of level l along S
//   sampling_locations (N, Lq, M, L, P, 2)   (x, y) in [0, 1]
//   attention_weights  (N, Lq, M, L, P)
//   output             (N, Lq, M * C)
// A "row" below is one (n, q, m) triple, i.e. one head of one query; its C output channels are
// contiguous, and so are the C channels of one pixel of one head in `value`, so every inner loop runs
// over contiguous memory.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_common.h"

namespace {

int64_t divup(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The kernels trust spatial_shapes and level_start_index to index into value; check them here
// (cheap on the CPU) so that a bad shape gives an error instead of an out-of-bounds read.
void check_levels(const msda::Sizes& sizes, const at::Tensor& spatial_shapes,
                  const at::Tensor& level_start_index) {
  const int64_t* shapes = spatial_shapes.data_ptr<int64_t>();
  const int64_t* starts = level_start_index.data_ptr<int64_t>();
  for (int64_t level = 0; level < sizes.num_levels; ++level) {
    const int64_t height = shapes[2 * level];
    const int64_t width = shapes[2 * level + 1];
    TORCH_CHECK(height > 0 && width > 0, "ms_deform_attn: level ", level, " has shape (", height,
                ", ", width, ")");
    TORCH_CHECK(starts[level] >= 0 && starts[level] + height * width <= sizes.num_value,
                "ms_deform_attn: level ", level, " (start ", starts[level], ", ", height, "x",
                width, ") does not fit in value with S = ", sizes.num_value);
  }
}

template <typename scalar_t>
void forward_kernel(const msda::Sizes& s, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const scalar_t* locations, const scalar_t* weights,
                    scalar_t* output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = s.batch * s.num_queries * s.num_heads;
  const int64_t points_per_row = s.num_levels * s.num_points;
  const int64_t pixel_stride = s.num_heads * s.channels;  // between neighbouring pixels in value
  const int64_t work_per_row = std::max<int64_t>(1, points_per_row * 4 * s.channels);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / work_per_row);

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> accumulator(s.channels);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t head = row % s.num_heads;
      const int64_t n = row / (s.num_queries * s.num_heads);
      const scalar_t* row_locations = locations + row * points_per_row * 2;
      const scalar_t* row_weights = weights + row * points_per_row;
      std::fill(accumulator.begin(), accumulator.end(), acc_t(0));
      acc_t* acc = accumulator.data();

      for (int64_t level = 0; level < s.num_levels; ++level) {
        const int64_t height = shapes[2 * level];
        const int64_t width = shapes[2 * level + 1];
        const scalar_t* level_value =
            value + ((n * s.num_value + starts[level]) * s.num_heads + head) * s.channels;
        for (int64_t point = 0; point < s.num_points; ++point) {
          const int64_t lp = level * s.num_points + point;
          const msda::BilinearCorners<acc_t> corners = msda::bilinear_corners<acc_t>(
              static_cast<acc_t>(row_locations[2 * lp]),
              static_cast<acc_t>(row_locations[2 * lp + 1]), height, width);
          const acc_t attention = static_cast<acc_t>(row_weights[lp]);
          for (int k = 0; k < 4; ++k) {
            if (corners.index[k] < 0) {
              continue;
            }
            const acc_t w = attention * corners.weight[k];
            const scalar_t* pixel = level_value + corners.index[k] * pixel_stride;
#pragma omp simd
            for (int64_t c = 0; c < s.channels; ++c) {
              acc[c] += w * static_cast<acc_t>(pixel[c]);
            }
          }
        }
      }
      scalar_t* out = output + row * s.channels;
      for (int64_t c = 0; c < s.channels; ++c) {
        out[c] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// grad_value receives one scattered update per (row, level, point, pixel); rows of different queries
// hit the same pixels, so two threads must never own the same (n, m) slice of one buffer. Each task
// is a (group, n, m) triple that owns the (n, m) slice of buffer `group`, so there are no races and
// no atomics, and the result is deterministic for a given thread count. With at least as many
// (n, m) pairs as threads there is a single group; otherwise the queries are split into `groups`
// chunks, each with its own buffer, summed afterwards (memory: groups x the size of value).
template <typename scalar_t>
void backward_kernel(const msda::Sizes& s, int64_t groups, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const scalar_t* locations,
                     const scalar_t* weights, const scalar_t* grad_output,
                     at::opmath_type<scalar_t>* grad_value_groups, scalar_t* grad_locations,
                     scalar_t* grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t points_per_row = s.num_levels * s.num_points;
  const int64_t pixel_stride = s.num_heads * s.channels;
  const int64_t value_numel = s.batch * s.num_value * pixel_stride;
  const int64_t queries_per_group = divup(s.num_queries, groups);
  const int64_t tasks = groups * s.batch * s.num_heads;

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> grad_row_buffer(s.channels);
    acc_t* grad_row = grad_row_buffer.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task % s.num_heads;
      const int64_t n = (task / s.num_heads) % s.batch;
      const int64_t group = task / (s.num_heads * s.batch);
      acc_t* grad_value = grad_value_groups + group * value_numel;
      const int64_t query_end = std::min(s.num_queries, (group + 1) * queries_per_group);

      for (int64_t query = group * queries_per_group; query < query_end; ++query) {
        const int64_t row = (n * s.num_queries + query) * s.num_heads + head;
        const scalar_t* row_locations = locations + row * points_per_row * 2;
        const scalar_t* row_weights = weights + row * points_per_row;
        scalar_t* row_grad_locations = grad_locations + row * points_per_row * 2;
        scalar_t* row_grad_weights = grad_weights + row * points_per_row;
        const scalar_t* row_grad_output = grad_output + row * s.channels;
        for (int64_t c = 0; c < s.channels; ++c) {
          grad_row[c] = static_cast<acc_t>(row_grad_output[c]);
        }

        for (int64_t level = 0; level < s.num_levels; ++level) {
          const int64_t height = shapes[2 * level];
          const int64_t width = shapes[2 * level + 1];
          const int64_t level_offset =
              ((n * s.num_value + starts[level]) * s.num_heads + head) * s.channels;
          const scalar_t* level_value = value + level_offset;
          acc_t* level_grad_value = grad_value + level_offset;
          for (int64_t point = 0; point < s.num_points; ++point) {
            const int64_t lp = level * s.num_points + point;
            const msda::BilinearCorners<acc_t> corners = msda::bilinear_corners<acc_t>(
                static_cast<acc_t>(row_locations[2 * lp]),
                static_cast<acc_t>(row_locations[2 * lp + 1]), height, width);
            const acc_t attention = static_cast<acc_t>(row_weights[lp]);
            // d out / d attention = sampled value; d out / d x = attention * sum_k dweight_dx * v_k.
            acc_t grad_attention = 0;
            acc_t grad_x = 0;
            acc_t grad_y = 0;
            for (int k = 0; k < 4; ++k) {
              if (corners.index[k] < 0) {
                continue;
              }
              const acc_t w = attention * corners.weight[k];
              const scalar_t* pixel = level_value + corners.index[k] * pixel_stride;
              acc_t* grad_pixel = level_grad_value + corners.index[k] * pixel_stride;
              acc_t grad_dot_pixel = 0;  // <grad_output row, value of this pixel>
#pragma omp simd reduction(+ : grad_dot_pixel)
              for (int64_t c = 0; c < s.channels; ++c) {
                grad_dot_pixel += grad_row[c] * static_cast<acc_t>(pixel[c]);
                grad_pixel[c] += w * grad_row[c];
              }
              grad_attention += corners.weight[k] * grad_dot_pixel;
              grad_x += corners.dweight_dx[k] * grad_dot_pixel;
              grad_y += corners.dweight_dy[k] * grad_dot_pixel;
            }
            row_grad_weights[lp] = static_cast<scalar_t>(grad_attention);
            // x_pixel = x * W - 0.5, hence the factor W (and H for y).
            row_grad_locations[2 * lp] = static_cast<scalar_t>(attention * grad_x * width);
            row_grad_locations[2 * lp + 1] = static_cast<scalar_t>(attention * grad_y * height);
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const msda::Sizes s = msda::check_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights, at::kCPU);
  check_levels(s, spatial_shapes, level_start_index);
  at::Tensor output =
      at::empty({s.batch, s.num_queries, s.num_heads * s.channels}, value.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
        forward_kernel<scalar_t>(s, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
                                 level_start_index.data_ptr<int64_t>(),
                                 sampling_locations.data_ptr<scalar_t>(),
                                 attention_weights.data_ptr<scalar_t>(),
                                 output.data_ptr<scalar_t>());
      });
  return output;
}

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
std::vector<at::Tensor> ms_deform_attn_backward_cpu(const at::Tensor& value,
                                                    const at::Tensor& spatial_shapes,
                                                    const at::Tensor& level_start_index,
                                                    const at::Tensor& sampling_locations,
                                                    const at::Tensor& attention_weights,
                                                    const at::Tensor& grad_output) {
  const msda::Sizes s = msda::check_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights, at::kCPU);
  check_levels(s, spatial_shapes, level_start_index);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.device().is_cpu() &&
                  grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn: grad_output must be a contiguous CPU tensor of value's dtype");
  TORCH_CHECK(grad_output.numel() == s.batch * s.num_queries * s.num_heads * s.channels,
              "ms_deform_attn: grad_output ", grad_output.sizes(), " does not match (N, Lq, M * C)");

  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  const int64_t groups = std::max<int64_t>(
      1, std::min(s.num_queries, divup(threads, s.batch * s.num_heads)));
  // Accumulate in float for half / bfloat16 so that thousands of small updates are not rounded away.
  at::Tensor grad_value_groups =
      at::zeros({groups, s.batch, s.num_value, s.num_heads, s.channels},
                value.options().dtype(at::toOpMathType(value.scalar_type())));
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_weights = at::empty_like(attention_weights);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
        backward_kernel<scalar_t>(
            s, groups, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
            attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
            grad_value_groups.data_ptr<at::opmath_type<scalar_t>>(),
            grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>());
      });
  at::Tensor grad_value = groups == 1 ? grad_value_groups[0] : grad_value_groups.sum(0);
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention, CPU kernels (uniperceiver_v2/ops)";
  m.def("forward", &ms_deform_attn_forward_cpu,
        "value (N,S,M,C), spatial_shapes (L,2), level_start_index (L,), "
        "sampling_locations (N,Lq,M,L,P,2), attention_weights (N,Lq,M,L,P) -> (N,Lq,M*C)");
  m.def("backward", &ms_deform_attn_backward_cpu,
        "same inputs + grad_output (N,Lq,M*C) -> [grad_value, grad_sampling_locations, "
        "grad_attention_weights]");
}
