"""uniperceiver_v2: a Jupyter-first reproduction of Uni-Perceiver v2.

    from uniperceiver_v2 import api
    model = api.build_model("tiny")                  # or api.build_model(None, checkpoint="runs/tiny")
    api.classify(model, images, ["circle", "digit three"])

Where things are: ``model.py`` (the whole model), ``modeling/`` (its parts), ``tasks/`` (one module per task: inputs,
candidate targets, loss, prediction), ``engine/`` (building, training, evaluation), ``metrics/``, ``data/``, ``ops/``
(deformable attention). The command-line programs are ``train``, ``evaluate``, ``pretrain_backbone``, ``reproduce``
and ``bench``. ``viz/`` draws every figure; ``walkthrough/`` is course material for the notebooks only.

``api``'s functions and ``evaluate`` are imported on first use, so ``import uniperceiver_v2`` stays light.
"""

__version__ = "0.1.0"
_API = ("build_model", "caption", "classify", "detect", "fill_mask", "retrieve")
__all__ = [*_API, "evaluate", "__version__"]


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    if name == "evaluate":
        from .engine.evaluation import evaluate
        return evaluate
    raise AttributeError(f"module 'uniperceiver_v2' has no attribute {name!r}")
