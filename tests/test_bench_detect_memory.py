"""``bench detect_memory``: one fresh process per mask format, the returned bytes as the formats promise."""

from __future__ import annotations

import torch

from uniperceiver_v2.bench import detect_memory


def test_returned_bytes_counts_nested_tensors_and_strings():
    value = {"a": torch.zeros(2, 3, dtype=torch.bool), "b": [{"counts": b"abcd"}, "xy"], "c": 7}
    assert detect_memory.returned_bytes(value) == 6 + 4 + 2


def test_formats_measured_in_their_own_processes(capsys):
    assert detect_memory.main(["--size", "160", "--formats", "full,rle"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert set(rows) == {"full", "rle"}
    detections = {int(row[1]) for row in rows.values()}
    assert len(detections) == 1 and detections.pop() > 0          # the same model and image for every format
    returned = {name: float(row[3]) for name, row in rows.items()}
    # RLE is a compression of the full masks; 160 x 160 booleans per detection make the full result > 0.02 MB
    assert returned["rle"] < returned["full"] and returned["full"] > 0.02
