"""uniperceiver_v2: a Jupyter-first reproduction of Uni-Perceiver v2."""

__version__ = "0.1.0"
