"""Tests of multi-scale deformable attention (Deformable-DETR eq. (3)) in uniperceiver_v2.ops.

The pure-PyTorch reference is checked against an explicit loop over the bilinear formula; every other
implementation is checked against the reference in float64 (values and gradients) and with gradcheck,
over odd shapes: one and five levels, non-square maps, points outside the maps, heads x channels that
are not powers of two, batch 1.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import sys
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from uniperceiver_v2.bench import available_benchmarks
from uniperceiver_v2.bench import ops as bench_ops
from uniperceiver_v2.ops import (
    ENV_VAR,
    available_implementations,
    dispatch,
    extension,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    unavailable_reason,
)


@dataclass(frozen=True)
class Shape:
    spatial_shapes: tuple[tuple[int, int], ...]
    batch: int
    heads: int
    channels: int
    queries: int
    points: int


SHAPES = {
    "one-level": Shape(((3, 5),), batch=2, heads=2, channels=3, queries=4, points=2),
    "five-levels": Shape(((4, 5), (3, 2), (2, 2), (1, 3), (2, 1)), batch=2, heads=3, channels=5, queries=3, points=2),
    "batch-one-single-head": Shape(((4, 6), (2, 3)), batch=1, heads=1, channels=7, queries=5, points=3),
}
# Locations are drawn from [-MARGIN, 1 + MARGIN], so that some points fall (partly) outside the maps.
MARGIN = 0.3


def make_inputs(shape: Shape, dtype=torch.float64, device="cpu", seed=0, margin=MARGIN):
    """value (N, S, M, C), spatial_shapes (L, 2), level_start_index (L,),
    sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P)."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shape.spatial_shapes, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n, m, c, q, p, levels = shape.batch, shape.heads, shape.channels, shape.queries, shape.points, len(sizes)
    value = torch.randn(n, int(sizes.sum()), m, c, generator=generator, dtype=torch.float64)
    locations = torch.rand(n, q, m, levels, p, 2, generator=generator, dtype=torch.float64)
    locations = locations * (1 + 2 * margin) - margin
    weights = torch.rand(n, q, m, levels, p, generator=generator, dtype=torch.float64)
    return (
        value.to(device, dtype),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(device, dtype),
        weights.to(device, dtype),
    )


def naive_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Eq. (3) by explicit loops: bilinear interpolation written out, zeros outside the map, float64."""
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    output = torch.zeros(batch, queries, heads, channels, dtype=torch.float64)
    for n in range(batch):
        for q in range(queries):
            for m in range(heads):
                for level in range(levels):
                    height, width = (int(size) for size in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for point in range(points):
                        x_location, y_location = (float(v) for v in sampling_locations[n, q, m, level, point])
                        # align_corners=False: pixel centres at (i + 0.5) / W.
                        x = x_location * width - 0.5
                        y = y_location * height - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for row, column, bilinear in (
                            (y0, x0, (y0 + 1 - y) * (x0 + 1 - x)),
                            (y0, x0 + 1, (y0 + 1 - y) * (x - x0)),
                            (y0 + 1, x0, (y - y0) * (x0 + 1 - x)),
                            (y0 + 1, x0 + 1, (y - y0) * (x - x0)),
                        ):
                            if 0 <= row < height and 0 <= column < width:
                                pixel = value[n, start + row * width + column, m].double()
                                output[n, q, m] += float(attention_weights[n, q, m, level, point]) * bilinear * pixel
    return output.view(batch, queries, heads * channels)


def _device_for(impl: str) -> str:
    return "cuda" if impl == "cuda" else "cpu"


def _require(impl: str) -> None:
    reason = unavailable_reason(impl, _device_for(impl))
    if reason is not None:
        pytest.skip(f"the {impl!r} implementation is unavailable: {reason}")


def _value_and_grads(impl, inputs, grad_dtype=None):
    """Output of `impl` and the gradients of <output, random tensor> w.r.t. value, locations, weights.

    The random output gradient is rounded to `grad_dtype` (default: the output's dtype) first, so that
    a float64 reference can be fed exactly the gradient a reduced-precision implementation gets.
    """
    value, shapes, starts, locations, weights = (
        tensor.detach().clone().requires_grad_(tensor.is_floating_point()) for tensor in inputs
    )
    output = ms_deform_attn(value, shapes, starts, locations, weights, impl=impl)
    generator = torch.Generator().manual_seed(1)
    grad_output = torch.randn(output.shape, generator=generator, dtype=torch.float64)
    grad_output = grad_output.to(grad_dtype or output.dtype).to(output)
    grads = torch.autograd.grad(output, (value, locations, weights), grad_output)
    return [output.detach(), *grads]


# ---------------------------------------------------------------------------------------------- reference


def test_reference_matches_naive_loops():
    shape = Shape(((3, 4), (2, 5)), batch=2, heads=2, channels=3, queries=3, points=2)
    inputs = make_inputs(shape)
    assert ((inputs[3] < 0) | (inputs[3] > 1)).any(), "the case must contain points outside the maps"
    torch.testing.assert_close(ms_deform_attn_pytorch(*inputs), naive_ms_deform_attn(*inputs), rtol=1e-12, atol=1e-12)


def test_points_outside_every_map_contribute_nothing():
    value, shapes, starts, locations, weights = make_inputs(SHAPES["five-levels"])
    # Beyond one pixel past the border of the largest map every bilinear neighbour is outside.
    far_outside = torch.where(locations < 0.5, locations - 2.0, locations + 2.0)
    inputs = (value, shapes, starts, far_outside, weights)
    for impl in available_implementations("cpu"):
        output, grad_value, grad_locations, grad_weights = _value_and_grads(impl, inputs)
        for tensor in (output, grad_value, grad_locations, grad_weights):
            assert torch.count_nonzero(tensor) == 0, impl


# ------------------------------------------------------------------------------ implementations vs reference

IMPLEMENTATIONS = ["pytorch", "cpp", "cuda"]
COMPILED = ["cpp", "cuda"]


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", COMPILED)
def test_compiled_matches_reference_float64(impl, shape_name):
    _require(impl)
    inputs = make_inputs(SHAPES[shape_name], device=_device_for(impl))
    reference = _value_and_grads("pytorch", [tensor.cpu() for tensor in inputs])
    compiled = _value_and_grads(impl, inputs)
    for name, expected, actual in zip(("output", "grad value", "grad locations", "grad weights"), reference, compiled):
        torch.testing.assert_close(
            actual.cpu(), expected, rtol=1e-10, atol=1e-10, msg=lambda message, name=name: f"{name}: {message}"
        )


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_gradcheck(impl, shape_name):
    _require(impl)
    value, shapes, starts, locations, weights = make_inputs(SHAPES[shape_name], device=_device_for(impl))

    def attend(value, locations, weights):
        return ms_deform_attn(value, shapes, starts, locations, weights, impl=impl)

    leaves = tuple(tensor.requires_grad_() for tensor in (value, locations, weights))
    assert torch.autograd.gradcheck(attend, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 4e-3)], ids=str
)
@pytest.mark.parametrize("impl", COMPILED)
def test_lower_precision_matches_float64_reference(impl, dtype, tolerance):
    """Reduced-precision inputs, float accumulation: compare against float64 on the same rounded inputs."""
    _require(impl)
    shape = Shape(((6, 9), (3, 5), (2, 2)), batch=2, heads=2, channels=24, queries=20, points=4)
    inputs = make_inputs(shape, dtype=dtype, device=_device_for(impl))
    rounded_inputs = [t.cpu().double() if t.is_floating_point() else t.cpu() for t in inputs]
    reference = _value_and_grads("pytorch", rounded_inputs, grad_dtype=dtype)
    compiled = _value_and_grads(impl, inputs)
    for expected, actual in zip(reference, compiled):
        assert actual.dtype == dtype
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.cpu().double(), expected, rtol=tolerance, atol=tolerance * scale)


def test_cpp_backward_with_more_threads_than_heads():
    """More threads than (batch, head) pairs: the CPU backward splits the queries over per-group
    grad_value buffers (see ms_deform_attn_cpu.cpp); the sum must not depend on the split."""
    _require("cpp")
    inputs = make_inputs(Shape(((5, 4), (2, 3)), batch=1, heads=2, channels=6, queries=11, points=3))
    reference = _value_and_grads("pytorch", inputs)
    threads = torch.get_num_threads()
    try:
        for count in (1, 3, 8):
            torch.set_num_threads(count)
            for expected, actual in zip(reference, _value_and_grads("cpp", inputs)):
                torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)
    finally:
        torch.set_num_threads(threads)


def test_non_contiguous_and_mixed_dtype_inputs():
    value, shapes, starts, locations, weights = make_inputs(SHAPES["five-levels"])
    # A transposed copy: same values, non-contiguous strides; float32 weights are promoted to float64.
    value_strided = value.transpose(2, 3).contiguous().transpose(2, 3)
    assert not value_strided.is_contiguous()
    expected = ms_deform_attn_pytorch(value, shapes, starts, locations, weights)
    for impl in available_implementations("cpu"):
        output = ms_deform_attn(value_strided, shapes, starts, locations, weights.float(), impl=impl)
        assert output.dtype == torch.float64
        torch.testing.assert_close(output, expected, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- CUDA toolchain


def _nvcc() -> str | None:
    return shutil.which("nvcc")


@pytest.mark.slow  # about 25 s of CPU time, over a minute on a busy two-core machine
@pytest.mark.skipif(_nvcc() is None, reason="nvcc (CUDA toolkit) not found on PATH")
def test_cuda_kernels_compile_with_nvcc(tmp_path):
    """Compile ms_deform_attn_cuda.cu to an object file, so that an error in the CUDA source cannot hide
    on machines without a GPU (the flags mirror what torch.utils.cpp_extension passes to nvcc)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    command = [_nvcc(), "-c", str(extension.SOURCE_DIR / "ms_deform_attn_cuda.cu"), "-o", str(tmp_path / "kernels.o")]
    command += [f"-I{path}" for path in include_paths(device_type="cuda")]
    command += [f"-I{sysconfig.get_paths()['include']}", "-std=c++20", "-Xcompiler", "-fPIC"]
    command += [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    command += COMMON_NVCC_FLAGS + extension.CUDA_CFLAGS
    completed = subprocess.run(command, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (tmp_path / "kernels.o").stat().st_size > 0


# --------------------------------------------------------------------------------------- validation errors


def _replace(inputs, index, tensor):
    return tuple(tensor if i == index else t for i, t in enumerate(inputs))


VALIDATION_CASES = {
    "value rank": (lambda x: _replace(x, 0, x[0][0]), "value must be (N, S, heads, C)"),
    "S != sum(H*W)": (lambda x: _replace(x, 0, x[0][:, :-1]), "sum(H * W)"),
    "batch mismatch": (lambda x: _replace(x, 0, x[0][:1]), "batch size"),
    "heads mismatch": (lambda x: _replace(x, 0, x[0][:, :, :1]), "heads"),
    "locations rank": (lambda x: _replace(x, 3, x[3][..., 0]), "sampling_locations must be"),
    "weights shape": (lambda x: _replace(x, 4, x[4][..., :1]), "attention_weights shape"),
    "levels mismatch": (lambda x: _replace(x, 1, x[1][:1]), "levels"),
    "level_start_index": (lambda x: _replace(x, 2, x[2] + 1), "level_start_index"),
    "float spatial_shapes": (lambda x: _replace(x, 1, x[1].double()), "integer tensor"),
    "integer value": (lambda x: _replace(x, 0, x[0].long()), "floating-point"),
}


@pytest.mark.parametrize("case", list(VALIDATION_CASES))
def test_bad_inputs_raise_clear_errors(case):
    mutate, message = VALIDATION_CASES[case]
    inputs = mutate(make_inputs(SHAPES["five-levels"]))
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        ms_deform_attn(*inputs, impl="pytorch")


# ------------------------------------------------------------------------------------ choice of implementation


def test_available_implementations():
    everywhere = available_implementations()
    assert everywhere[-1] == "pytorch"
    assert ("cpp" in everywhere) == (unavailable_reason("cpp") is None)
    assert "cuda" not in available_implementations("cpu")
    reason = unavailable_reason("cpp", "meta")
    assert reason is not None and "'cpp'" in reason and "meta" in reason
    assert "cpp" not in available_implementations("meta")


def test_cpp_builds_where_a_compiler_exists():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on PATH")
    assert unavailable_reason("cpp") is None


def test_unknown_or_unavailable_implementation_raises():
    inputs = make_inputs(SHAPES["one-level"])
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        ms_deform_attn(*inputs, impl="triton")
    with pytest.raises(RuntimeError, match="'cuda' .* unavailable: the 'cuda' implementation runs on cuda tensors"):
        ms_deform_attn(*inputs, impl="cuda")


def test_automatic_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_logged_choices", set())
    inputs = make_inputs(SHAPES["one-level"])
    expected = available_implementations("cpu")[0]
    with caplog.at_level(logging.INFO, logger="uniperceiver_v2.ops.dispatch"):
        ms_deform_attn(*inputs)
        ms_deform_attn(*inputs)
    messages = [record.getMessage() for record in caplog.records if record.name == "uniperceiver_v2.ops.dispatch"]
    assert len(messages) == 1 and repr(expected) in messages[0] and "cpu" in messages[0], messages


def test_environment_variable_overrides_default(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged_choices", set())
    monkeypatch.setenv(ENV_VAR, "pytorch")
    with caplog.at_level(logging.INFO, logger="uniperceiver_v2.ops.dispatch"):
        ms_deform_attn(*make_inputs(SHAPES["one-level"]))
    assert f"'pytorch' implementation for cpu tensors (set by {ENV_VAR})" in caplog.text
    monkeypatch.setenv(ENV_VAR, "fastest")
    unknown = f"unknown implementation 'fastest' \\(from the environment variable {ENV_VAR}"
    with pytest.raises(ValueError, match=unknown):
        ms_deform_attn(*make_inputs(SHAPES["one-level"]))


def test_failed_build_falls_back_with_one_warning(monkeypatch, tmp_path):
    """A real compile error: impl=None warns once (naming the error) and uses the reference;
    impl="cpp" raises."""
    source_dir = tmp_path / "csrc"
    source_dir.mkdir()
    (source_dir / "ms_deform_attn_cpu.cpp").write_text("#error deliberately broken kernel source\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "build"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    broken = extension.CompiledExtension(
        "uniperceiver_v2_msda_broken_test", ["ms_deform_attn_cpu.cpp"], source_dir=source_dir
    )
    monkeypatch.setattr(extension, "CPU_EXTENSION", broken)
    monkeypatch.setattr(dispatch, "_warned_fallbacks", set())
    inputs = make_inputs(SHAPES["one-level"])

    with pytest.warns(RuntimeWarning, match="falling back .* deliberately broken kernel source"):
        output = ms_deform_attn(*inputs)
    torch.testing.assert_close(output, ms_deform_attn_pytorch(*inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ms_deform_attn(*inputs)
    with pytest.raises(RuntimeError, match="'cpp' .* unavailable: building .* failed: .*deliberately broken"):
        ms_deform_attn(*inputs, impl="cpp")


def test_missing_sources_name_the_folder(tmp_path):
    missing = extension.CompiledExtension("uniperceiver_v2_msda_missing_test", ["kernels.cpp"], source_dir=tmp_path)
    reason = missing.unavailable_reason()
    assert str(tmp_path / "kernels.cpp") in reason and "pip install -e ." in reason


def test_sources_are_found_next_to_the_package():
    assert extension.SOURCE_DIR == Path(__file__).resolve().parents[1] / "ops" / "csrc"
    for source in extension.CPU_EXTENSION.sources + extension.CUDA_EXTENSION.sources:
        assert (extension.SOURCE_DIR / source).is_file()


# ------------------------------------------------------------------------------------------------ benchmark


def test_benchmark_dispatcher_and_inputs():
    assert "ops" in available_benchmarks()
    completed = subprocess.run([sys.executable, "-m", "uniperceiver_v2.bench"], capture_output=True, text=True)
    assert completed.returncode == 2 and "ops" in completed.stdout
    for name in ("tiny-encoder", "tiny-decoder"):
        case = bench_ops.CASES[name]
        value, shapes, starts, locations, weights = bench_ops.make_inputs(case)
        output = ms_deform_attn(value, shapes, starts, locations, weights, impl="pytorch")
        assert output.shape == (case.batch, case.queries, case.heads * case.channels)
        torch.testing.assert_close(weights.sum((-1, -2)), torch.ones(case.batch, case.queries, case.heads))
