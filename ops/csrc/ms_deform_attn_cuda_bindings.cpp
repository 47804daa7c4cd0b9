// Python bindings of the CUDA kernels in ms_deform_attn_cuda.cu. They live in their own file so that
// nvcc only compiles the kernels and never the pybind11 headers.
#include <torch/extension.h>

#include <vector>

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights);

std::vector<at::Tensor> ms_deform_attn_backward_cuda(const at::Tensor& value,
                                                     const at::Tensor& spatial_shapes,
                                                     const at::Tensor& level_start_index,
                                                     const at::Tensor& sampling_locations,
                                                     const at::Tensor& attention_weights,
                                                     const at::Tensor& grad_output);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Multi-scale deformable attention, CUDA kernels (uniperceiver_v2/ops)";
  m.def("forward", &ms_deform_attn_forward_cuda,
        "value (N,S,M,C), spatial_shapes (L,2), level_start_index (L,), "
        "sampling_locations (N,Lq,M,L,P,2), attention_weights (N,Lq,M,L,P) -> (N,Lq,M*C)");
  m.def("backward", &ms_deform_attn_backward_cuda,
        "same inputs + grad_output (N,Lq,M*C) -> [grad_value, grad_sampling_locations, "
        "grad_attention_weights]");
}
