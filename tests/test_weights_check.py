"""Weights are checked on load: a plain ``.safetensors`` file has no checksum, so one flipped exponent bit would
load as a weight of about 1e37. ``load_weights`` (behind ``build_model``) refuses NaN / inf and values beyond
``MAX_ABS_WEIGHT``, naming the file and the tensors."""

from __future__ import annotations

import json
import struct

import pytest
import safetensors.torch
import torch
from helpers import single_thread, tiny_model  # noqa: F401 - single_thread is an autouse fixture

from uniperceiver_v2.engine.build import load_weights
from uniperceiver_v2.engine.checkpoint import MAX_ABS_WEIGHT, CheckpointError, check_weights


def flip_exponent_bit(path, tensor_name: str) -> tuple[float, float]:
    """Flip the highest exponent bit of the first float32 element of ``tensor_name`` with 0 < |x| < 1, in the
    file's bytes (the damage a bad disk or transfer does); returns (old value, new value)."""
    data = bytearray(path.read_bytes())
    header_size = struct.unpack("<Q", data[:8])[0]
    entry = json.loads(data[8:8 + header_size])[tensor_name]
    assert entry["dtype"] == "F32"
    start, end = (8 + header_size + offset for offset in entry["data_offsets"])
    for position in range(start, end, 4):
        (value,) = struct.unpack("<f", data[position:position + 4])
        if 0 < abs(value) < 1:
            data[position + 3] ^= 0x40                     # bit 30: the top bit of the 8-bit exponent
            path.write_bytes(bytes(data))
            return value, struct.unpack("<f", data[position:position + 4])[0]
    raise AssertionError(f"{tensor_name} has no element in (0, 1)")


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def test_a_flipped_exponent_bit_in_a_safetensors_file_is_refused(model, tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_model(model, str(path))
    load_weights(model, path)                                         # the intact file loads
    name = next(n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("decoder"))
    old, new = flip_exponent_bit(path, name)
    assert abs(new) > 1e30 and abs(new) / abs(old) == 2.0 ** 128
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"weights.safetensors: 1 tensor\(s\) hold values beyond 1e\+06 .*"
                                              rf"{name} \(\|value\| up to .*e\+3\d\)"):
        load_weights(model, path)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())   # nothing loaded


def test_nan_in_a_safetensors_file_is_refused_naming_the_tensors(model, tmp_path):
    state = {key: value.clone() for key, value in model.state_dict().items()}
    names = [n for n, v in state.items() if v.is_floating_point()][:7]
    for name in names:
        state[name].view(-1)[0] = float("nan")
    state[names[0]].view(-1)[-1] = float("inf")
    path = tmp_path / "diverged.safetensors"
    safetensors.torch.save_file(state, str(path))
    with pytest.raises(CheckpointError) as error:
        load_weights(model, path)
    message = str(error.value)
    assert str(path) in message and "NaN or inf in 7 tensor(s)" in message
    assert f"{names[0]} (2 of " in message and "and 2 more" in message     # five named, the rest counted


def test_check_weights_bound_and_integer_tensors():
    fine = {"w": torch.full((3,), MAX_ABS_WEIGHT), "half": torch.ones(2, dtype=torch.bfloat16),
            "counter": torch.tensor(10**12), "ids": torch.arange(5), "empty": torch.zeros(0)}
    check_weights(fine, "fine.safetensors")
    with pytest.raises(CheckpointError, match=r"big.safetensors: 1 tensor\(s\) .*: w \(\|value\| up to 2e\+06\)"):
        check_weights({**fine, "w": torch.tensor([0.5, -2e6])}, "big.safetensors")
    with pytest.raises(CheckpointError, match=r"half \(1 of 2 values\)"):
        check_weights({**fine, "half": torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16)}, "x")
