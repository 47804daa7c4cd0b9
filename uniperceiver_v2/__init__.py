"""uniperceiver_v2: a Jupyter-first reproduction of Uni-Perceiver v2.

    from uniperceiver_v2 import build_model
    model = build_model("tiny")                      # or build_model(None, checkpoint="runs/tiny")
    model.classify(images, ["circle", "digit three"])

``build_model`` and ``evaluate`` are imported on first use, so ``import uniperceiver_v2`` stays light.
"""

__version__ = "0.1.0"
__all__ = ["build_model", "evaluate", "__version__"]


def __getattr__(name):
    if name == "build_model":
        from .api import build_model
        return build_model
    if name == "evaluate":
        from .evaluate import evaluate
        return evaluate
    raise AttributeError(f"module 'uniperceiver_v2' has no attribute {name!r}")
