// Multi-scale deformable attention on CUDA: forward and backward.
//
// Same tensor layout and sampling convention as ms_deform_attn_cpu.cpp (see ms_deform_attn_common.h).
// Supported dtypes: float64, float32, float16 and bfloat16; the reduced-precision types load and store
// in their own format but accumulate in float (at::opmath_type), and grad_value is accumulated in a
// float buffer and rounded once at the end.
//
// Forward: one thread per output element (n, q, m, c). Neighbouring threads read neighbouring
// channels of the same pixel, so the loads from value are coalesced.
// Backward: one warp per row (n, q, m); its lanes stride over the C channels. The channel sums behind
// the gradients of the attention weight and of the location are reduced with warp shuffles, and the
// scatter into grad_value uses atomicAdd because rows of different queries hit the same pixels.
// Per-operator headers instead of <ATen/ATen.h> keep nvcc from parsing all of ATen.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn_checks.h"
#include "ms_deform_attn_common.h"

namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
// Grid-stride loops cover any size; capping the grid keeps the block count legal on every device.
constexpr int64_t kMaxBlocks = 65535;

int64_t blocks_for(int64_t threads_needed) {
  return std::min<int64_t>(kMaxBlocks, (threads_needed + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

template <typename scalar_t>
__global__ void forward_kernel(msda::Sizes s, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts,
                               const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights,
                               scalar_t* __restrict__ output) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = s.batch * s.num_queries * s.num_heads * s.channels;
  const int64_t points_per_row = s.num_levels * s.num_points;
  const int64_t pixel_stride = s.num_heads * s.channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t channel = i % s.channels;
    const int64_t row = i / s.channels;  // (n, q, m) flattened
    const int64_t head = row % s.num_heads;
    const int64_t n = row / (s.num_queries * s.num_heads);
    const scalar_t* row_locations = locations + row * points_per_row * 2;
    const scalar_t* row_weights = weights + row * points_per_row;
    acc_t accumulator = 0;
    for (int64_t level = 0; level < s.num_levels; ++level) {
      const int64_t height = shapes[2 * level];
      const int64_t width = shapes[2 * level + 1];
      const scalar_t* level_value =
          value + ((n * s.num_value + starts[level]) * s.num_heads + head) * s.channels + channel;
      for (int64_t point = 0; point < s.num_points; ++point) {
        const int64_t lp = level * s.num_points + point;
        const msda::BilinearCorners<acc_t> corners = msda::bilinear_corners<acc_t>(
            static_cast<acc_t>(row_locations[2 * lp]),
            static_cast<acc_t>(row_locations[2 * lp + 1]), height, width);
        const acc_t attention = static_cast<acc_t>(row_weights[lp]);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (corners.index[k] >= 0) {
            accumulator += attention * corners.weight[k] *
                           static_cast<acc_t>(level_value[corners.index[k] * pixel_stride]);
          }
        }
      }
    }
    output[i] = static_cast<scalar_t>(accumulator);
  }
}

template <typename scalar_t>
__global__ void backward_kernel(msda::Sizes s, const scalar_t* __restrict__ value,
                                const int64_t* __restrict__ shapes,
                                const int64_t* __restrict__ starts,
                                const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ weights,
                                const scalar_t* __restrict__ grad_output,
                                at::opmath_type<scalar_t>* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_locations,
                                scalar_t* __restrict__ grad_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows = s.batch * s.num_queries * s.num_heads;
  const int64_t points_per_row = s.num_levels * s.num_points;
  const int64_t pixel_stride = s.num_heads * s.channels;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps_in_grid = static_cast<int64_t>(blockDim.x) * gridDim.x / kWarpSize;
  // blockDim.x is a multiple of the warp size, so all lanes of a warp share `row` and take the same
  // trip count through every loop below: the full-mask shuffles in warp_sum are safe.
  for (int64_t row = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / kWarpSize;
       row < rows; row += warps_in_grid) {
    const int64_t head = row % s.num_heads;
    const int64_t n = row / (s.num_queries * s.num_heads);
    const scalar_t* row_locations = locations + row * points_per_row * 2;
    const scalar_t* row_weights = weights + row * points_per_row;
    const scalar_t* row_grad_output = grad_output + row * s.channels;
    for (int64_t level = 0; level < s.num_levels; ++level) {
      const int64_t height = shapes[2 * level];
      const int64_t width = shapes[2 * level + 1];
      const int64_t level_offset =
          ((n * s.num_value + starts[level]) * s.num_heads + head) * s.channels;
      for (int64_t point = 0; point < s.num_points; ++point) {
        const int64_t lp = level * s.num_points + point;
        const msda::BilinearCorners<acc_t> corners = msda::bilinear_corners<acc_t>(
            static_cast<acc_t>(row_locations[2 * lp]),
            static_cast<acc_t>(row_locations[2 * lp + 1]), height, width);
        const acc_t attention = static_cast<acc_t>(row_weights[lp]);
        // Per-lane partial sums over this lane's channels of <grad_output, value_k> weighted by the
        // bilinear weight and by its x / y derivatives.
        acc_t grad_attention = 0;
        acc_t grad_x = 0;
        acc_t grad_y = 0;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (corners.index[k] < 0) {
            continue;
          }
          const int64_t pixel_offset = level_offset + corners.index[k] * pixel_stride;
          const acc_t w = attention * corners.weight[k];
          for (int64_t c = lane; c < s.channels; c += kWarpSize) {
            const acc_t grad = static_cast<acc_t>(row_grad_output[c]);
            const acc_t grad_dot_pixel = grad * static_cast<acc_t>(value[pixel_offset + c]);
            grad_attention += corners.weight[k] * grad_dot_pixel;
            grad_x += corners.dweight_dx[k] * grad_dot_pixel;
            grad_y += corners.dweight_dy[k] * grad_dot_pixel;
            atomicAdd(grad_value + pixel_offset + c, w * grad);
          }
        }
        grad_attention = warp_sum(grad_attention);
        grad_x = warp_sum(grad_x);
        grad_y = warp_sum(grad_y);
        if (lane == 0) {
          grad_weights[row * points_per_row + lp] = static_cast<scalar_t>(grad_attention);
          // x_pixel = x * W - 0.5, hence the factor W (and H for y).
          grad_locations[(row * points_per_row + lp) * 2] =
              static_cast<scalar_t>(attention * grad_x * static_cast<acc_t>(width));
          grad_locations[(row * points_per_row + lp) * 2 + 1] =
              static_cast<scalar_t>(attention * grad_y * static_cast<acc_t>(height));
        }
      }
    }
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const msda::Sizes s = msda::check_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights, at::kCUDA);
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output =
      at::empty({s.batch, s.num_queries, s.num_heads * s.channels}, value.options());
  const int64_t total = output.numel();
  if (total == 0) {
    return output;
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
        forward_kernel<scalar_t><<<blocks_for(total), kThreadsPerBlock, 0, stream>>>(
            s, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
            level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
            attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return output;
}

// Returns (grad_value, grad_sampling_locations, grad_attention_weights).
std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output) {
  const msda::Sizes s = msda::check_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights, at::kCUDA);
  TORCH_CHECK(grad_output.is_contiguous() && grad_output.device() == value.device() &&
                  grad_output.scalar_type() == value.scalar_type(),
              "ms_deform_attn: grad_output must be contiguous, on value's device and dtype");
  TORCH_CHECK(grad_output.numel() == s.batch * s.num_queries * s.num_heads * s.channels,
              "ms_deform_attn: grad_output ", grad_output.sizes(), " does not match (N, Lq, M * C)");
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor grad_value_accumulator =
      at::zeros(value.sizes(), value.options().dtype(at::toOpMathType(value.scalar_type())));
  at::Tensor grad_locations = at::zeros_like(sampling_locations);
  at::Tensor grad_weights = at::zeros_like(attention_weights);
  const int64_t rows = s.batch * s.num_queries * s.num_heads;
  if (rows > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          backward_kernel<scalar_t><<<blocks_for(rows * kWarpSize), kThreadsPerBlock, 0, stream>>>(
              s, value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
              level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
              attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
              grad_value_accumulator.data_ptr<at::opmath_type<scalar_t>>(),
              grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_value_accumulator.to(value.scalar_type()), grad_locations, grad_weights};
}
