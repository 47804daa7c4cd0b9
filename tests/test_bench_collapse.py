"""The collapse diagnostic (`python -m uniperceiver_v2.bench collapse`): its cosine against a brute-force loop, and
a two-iteration run on the quick synthetic suite that prints and records every row."""

import io
import itertools
import json
import math

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
    printed = out.getvalue().splitlines()
    assert "ln C = " in printed[0] and printed[1].split() == ["iteration", "loss", "accuracy", "img", "cls", "tok",
                                                              "seconds"]
    assert len(printed) == 2 + len(rows)


def test_collapse_cli_rejects_runs_without_classification(capsys):
    with pytest.raises(SystemExit):
        collapse.main(["--tasks", "retrieval"])
    assert "must include classification" in capsys.readouterr().err
