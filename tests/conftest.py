"""Shared test settings: offline, few threads, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# One intra-op thread for the whole session: the models in the tests are tiny, several tests start two processes
# of their own, and on a small shared CPU two OpenMP threads mostly wait on each other (docs/benchmarks.md).
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_root(pytestconfig, tmp_path_factory):
    """The quick synthetic suite, generated once into pytest's cache folder (``ensure_synthetic`` regenerates it
    only when missing or out of date)."""
    from pathlib import Path

    from uniperceiver_v2.data.synthetic import ensure_synthetic

    cache = getattr(pytestconfig, "cache", None)
    root = cache.mkdir("synthetic_quick") if cache is not None else tmp_path_factory.mktemp("synthetic_quick")
    ensure_synthetic(root, "quick")
    return Path(root)


@pytest.fixture(scope="module")
def quick_suite_model(synthetic_root):
    """(an untrained tiny model in evaluation mode, its config reading the quick synthetic suite)."""
    from helpers import tiny_config, tiny_model

    cfg = tiny_config()
    cfg.data.root = str(synthetic_root)
    cfg.data.synthetic_profile = None
    return tiny_model(cfg).eval(), cfg
