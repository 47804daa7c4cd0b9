"""Multi-scale deformable attention (Deformable-DETR eq. (3)) on every device.

The region proposal network's deformable encoder and decoder (Uni-Perceiver v2 appendix A, following
Mask DINO) attend to the four feature scales through this op. Entry point:

    ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   impl=None) -> (N, Lq, M * C)

with implementations "cuda" (compiled, CUDA tensors), "cpp" (compiled with OpenMP, CPU tensors) and
"pytorch" (the `grid_sample` reference, any device). The compiled kernels are built on first use from
the repository's `ops/csrc` folder; see `ops/README.md` for the build cache and the environment
variable UNIPERCEIVER_MSDA_IMPL.
"""

from uniperceiver_v2.ops.dispatch import (
    ENV_VAR,
    IMPLEMENTATIONS,
    available_implementations,
    ms_deform_attn,
    unavailable_reason,
)
from uniperceiver_v2.ops.reference import ms_deform_attn_pytorch

__all__ = [
    "ENV_VAR",
    "IMPLEMENTATIONS",
    "available_implementations",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "unavailable_reason",
]
