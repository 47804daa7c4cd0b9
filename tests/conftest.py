"""Shared test settings: offline, few threads, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# One intra-op thread for the whole session: the models in the tests are tiny, several tests start two processes
# of their own, and on a small shared CPU two OpenMP threads mostly wait on each other (docs/benchmarks.md).
torch.set_num_threads(1)
