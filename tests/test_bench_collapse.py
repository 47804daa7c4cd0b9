"""The collapse diagnostic (`python -m uniperceiver_v2.bench collapse`): its cosine against a brute-force loop, and
a two-iteration run on the quick synthetic suite that prints and records every row."""

import io
import itertools
import json
import math
import re

import pytest
import torch

from uniperceiver_v2.bench import available_benchmarks, collapse


def brute_force_mean_cosine(vectors: torch.Tensor) -> float:
    rows = [v.to(torch.float64) for v in vectors]
    pairs = [(a @ b / (a.norm() * b.norm())).item() for a, b in itertools.permutations(rows, 2)]
    return sum(pairs) / len(pairs)


def test_mean_pairwise_cosine_matches_a_loop_over_pairs():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(7, 5, generator=generator) + torch.tensor([2.0, 0, 0, 0, 0])
    assert collapse.mean_pairwise_cosine(vectors) == pytest.approx(brute_force_mean_cosine(vectors), abs=1e-12)


def test_mean_pairwise_cosine_closed_forms():
    assert collapse.mean_pairwise_cosine(torch.ones(4, 3) * torch.tensor([[1.0], [2.0], [3.0], [4.0]])) == \
        pytest.approx(1.0)                                      # all one direction: collapsed
    assert collapse.mean_pairwise_cosine(torch.eye(5)) == pytest.approx(0.0, abs=1e-12)   # orthogonal
    assert collapse.mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="N >= 2"):
        collapse.mean_pairwise_cosine(torch.ones(1, 3))


def test_collapse_diagnostic_runs_and_records_each_row(synthetic_root, tmp_path):
    assert "collapse" in available_benchmarks()
    jsonl = tmp_path / "rows.jsonl"
    args = collapse.argparse.Namespace(
        config="tiny", tasks=["classification"], iterations=2, every=1, probe=4, jsonl=str(jsonl),
        overrides=[f"data.root={synthetic_root}", "data.synthetic_profile=quick", "tasks.classification.batch_size=4",
                   "optim.warmup_iters=0"])
    out = io.StringIO()
    rows = collapse.run(args, str(tmp_path / "run"), out=out)

    assert [row["iteration"] for row in rows] == [0, 1, 2]
    assert math.isnan(rows[0]["loss"])                           # no step taken yet
    for row in rows[1:]:
        assert math.isfinite(row["loss"]) and 0.0 <= row["accuracy"] <= 1.0
    for row in rows:
        for key in ("img", "cls", "tok"):
            assert -1.0 - 1e-9 <= row[key] <= 1.0 + 1e-9
    # Training changed the image side of the probe.
    assert rows[2]["img"] != rows[0]["img"]
    assert [json.loads(line) for line in jsonl.read_text().splitlines()] == json.loads(json.dumps(rows))
    # The printed table: one line per returned row, each column named by the row's key and holding its value
    # (to the printed precision); the first line gives ln C for C classes (chance-level cross-entropy).
    printed = out.getvalue().splitlines()
    ln_c, num_classes = re.search(r"ln C = (\d+\.\d+) \(C = (\d+)\)", printed[0]).groups()
    assert int(num_classes) >= 2 and float(ln_c) == pytest.approx(math.log(int(num_classes)), abs=5e-4)
    columns = printed[1].split()
    assert len(printed) == 2 + len(rows)
    tolerance = {"iteration": 0, "loss": 5e-4, "accuracy": 5e-4, "img": 5e-5, "cls": 5e-5, "tok": 5e-5,
                 "seconds": 0.05}
    for line, row in zip(printed[2:], rows, strict=True):
        shown = dict(zip(columns, map(float, line.split()), strict=True))
        assert set(shown) == set(row) == set(tolerance)
        for key, value in row.items():
            if math.isnan(value):
                assert math.isnan(shown[key]), (key, line)
            else:
                assert shown[key] == pytest.approx(value, abs=tolerance[key] * 1.01), (key, line)


def test_collapse_cli_rejects_runs_without_classification(capsys):
    with pytest.raises(SystemExit):
        collapse.main(["--tasks", "retrieval"])
    assert "must include classification" in capsys.readouterr().err
