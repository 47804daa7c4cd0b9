// Geometry shared by the CPU and CUDA kernels of multi-scale deformable attention.
//
// Deformable-DETR's attention (its eq. (3)) reads, for every query q, head m, level l and point p,
//
//     out[n, q, m, :] = sum_{l, p} A[n, q, m, l, p] * bilinear(value_l[n, :, m, :], loc[n, q, m, l, p])
//
// with `loc` = (x, y) normalised to [0, 1] over the level's width W and height H. Sampling follows
// torch.nn.functional.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): the
// location is mapped to pixel coordinates x * W - 0.5 (so 0 is the left edge of pixel 0 and pixel
// centres sit at integers), the four neighbouring pixels are blended, and pixels outside the map
// contribute zero. Keeping this mapping in one place guarantees that the CPU and CUDA kernels agree
// with each other and with the pure-PyTorch reference.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace msda {

// The (up to) four pixels that one sampling point blends, in the order
// (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
template <typename acc_t>
struct BilinearCorners {
  // Pixel index y * W + x inside the level, or -1 for a pixel outside the map (zero padding).
  int64_t index[4];
  // Bilinear weight of each pixel; the weights of the pixels inside the map sum to at most 1.
  acc_t weight[4];
  // d weight / d x and d weight / d y, with x, y in pixel units (multiply by W or H to get the
  // derivative with respect to the normalised location).
  acc_t dweight_dx[4];
  acc_t dweight_dy[4];
};

template <typename acc_t>
MSDA_HOST_DEVICE BilinearCorners<acc_t> bilinear_corners(
    acc_t location_x, acc_t location_y, int64_t height, int64_t width) {
  BilinearCorners<acc_t> corners;
  for (int k = 0; k < 4; ++k) {
    corners.index[k] = -1;
    corners.weight[k] = acc_t(0);
    corners.dweight_dx[k] = acc_t(0);
    corners.dweight_dy[k] = acc_t(0);
  }
  const acc_t x = location_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t y = location_y * static_cast<acc_t>(height) - acc_t(0.5);
  // Written as a negated conjunction so that NaN locations also count as outside, and checked before
  // any float-to-integer conversion so that huge locations cannot overflow it.
  if (!(x > acc_t(-1) && y > acc_t(-1) && x < static_cast<acc_t>(width) &&
        y < static_cast<acc_t>(height))) {
    return corners;
  }
  const acc_t x_floor = std::floor(x);
  const acc_t y_floor = std::floor(y);
  const int64_t x0 = static_cast<int64_t>(x_floor);
  const int64_t y0 = static_cast<int64_t>(y_floor);
  const acc_t fx = x - x_floor;  // distance to the left column, in [0, 1)
  const acc_t fy = y - y_floor;  // distance to the top row, in [0, 1)
  const acc_t gx = acc_t(1) - fx;
  const acc_t gy = acc_t(1) - fy;

  const int64_t xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const int64_t ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const acc_t weight[4] = {gy * gx, gy * fx, fy * gx, fy * fx};
  const acc_t dweight_dx[4] = {-gy, gy, -fy, fy};
  const acc_t dweight_dy[4] = {-gx, -fx, gx, fx};
  for (int k = 0; k < 4; ++k) {
    if (xs[k] >= 0 && xs[k] < width && ys[k] >= 0 && ys[k] < height) {
      corners.index[k] = ys[k] * width + xs[k];
      corners.weight[k] = weight[k];
      corners.dweight_dx[k] = dweight_dx[k];
      corners.dweight_dy[k] = dweight_dy[k];
    }
  }
  return corners;
}

}  // namespace msda
