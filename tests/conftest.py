"""Shared test settings: offline, few threads, deterministic."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

# One thread: the models in the tests are tiny, and several tests start two processes of their own.
torch.set_num_threads(1)
