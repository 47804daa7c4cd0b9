"""The whole notebook series runs headless in the smoke profile through the reproduction pipeline.

This is the test that makes CI execute every notebook: each must complete and write its results JSON, and the
pipeline's summary must list them all. It runs the real command a user runs (``make reproduce`` calls it).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_profile_runs_every_notebook(tmp_path):
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert notebooks, "no notebooks in notebooks/"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-m", "uniperceiver_v2.reproduce", "--profile", "smoke",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60 * 60)
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    run = tmp_path / "smoke"
    state = json.loads((run / "state.json").read_text())
    for name in notebooks:
        stem = name[:-len(".ipynb")]
        assert (run / "notebooks" / name).is_file(), f"{name}: no executed copy"
        results = run / "results" / f"{stem}.json"
        assert results.is_file(), f"{name}: wrote no results JSON"
        assert json.loads(results.read_text()), f"{name}: empty results"
        entry = state["notebooks"].get(stem)
        assert entry is not None and entry.get("status") == "completed", f"{name}: state {entry}"
    summary = (run / "summary.md").read_text()
    for name in notebooks:
        assert name[:-len(".ipynb")] in summary, f"{name} missing from summary.md"
