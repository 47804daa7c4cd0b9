"""What every figure of the package shares: input conversion, colours, figure and axes set-up.

Conventions:
  * Inputs are plain: numpy arrays, torch tensors (any device, with or without grad) or nested lists.
  * Images are CHW or HWC, float in [0, 1] or uint8 in [0, 255]; grayscale HW is accepted too. An image
    normalised for a backbone is shown after ``mean`` / ``std`` undo the normalisation
    (``mean=IMAGENET_MEAN, std=IMAGENET_STD``).
  * Boxes are absolute pixel coordinates ``(x0, y0, x1, y1)``. Region proposals usually come as normalised
    ``(cx, cy, w, h)``: convert with ``torchvision.ops.box_convert(b, "cxcywh", "xyxy") * [W, H, W, H]``.
  * Every function returns the :class:`matplotlib.figure.Figure` it drew on and never calls ``plt.show()``.
    Figures are built without pyplot (``Figure(...)``), so nothing accumulates in pyplot's global figure list
    during long loops or tests; in a notebook they display as the cell's value once ``%matplotlib inline`` is
    active. Functions drawing a single panel also take ``ax=`` to draw into an existing Axes.
"""


from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

# tab20 with its dark shades first, so the first ten classes get ten clearly different colours.
_TAB20 = matplotlib.colormaps["tab20"]
_PALETTE = [_TAB20(i)[:3] for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
_MASK_ALPHA = 0.45
_LEVEL_CMAP = matplotlib.colormaps["viridis"]


# --------------------------------------------------------------------------------------------------------------
# Input conversion
# --------------------------------------------------------------------------------------------------------------
def to_numpy(x: Any) -> np.ndarray:
    """A numpy array from a torch tensor (detached, moved to the CPU), an array or a nested list."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":   # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def to_display_image(image: Any, mean: Sequence[float] | None = None,
                     std: Sequence[float] | None = None) -> np.ndarray:
    """An image as a float array (H, W, 3) in [0, 1], ready for ``imshow``.

    Args:
        image: (3, H, W) or (1, H, W) channels-first, (H, W, 3) or (H, W, 1) channels-last, or (H, W);
            float in [0, 1] or uint8. A (3, H, 3) array is read as channels-last.
        mean, std: per-channel statistics the image was normalised with, ``x = (pixel - mean) / std``;
            the normalisation is undone before display.
    """
    array = to_numpy(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"image: expected (C, H, W), (H, W, C) or (H, W), got shape {array.shape}")
    if array.shape[-1] not in (1, 3) and array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"image: expected 1 or 3 channels first or last, got shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    else:
        array = array.astype(np.float32)
    if (mean is None) != (std is None):
        raise ValueError("image: pass both mean and std to undo a normalisation, or neither")
    if mean is not None:
        array = array * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)
        # Undoing the normalisation reproduces the original [0, 1] pixels up to rounding; clip the rounding.
        array = np.clip(array, 0.0, 1.0)
    elif array.size and (array.min() < -1e-3 or array.max() > 1.0 + 1e-3):
        raise ValueError(
            f"image: float values span [{array.min():.3g}, {array.max():.3g}], outside [0, 1]; "
            "if the image is normalised, pass mean= and std= (e.g. viz.IMAGENET_MEAN, viz.IMAGENET_STD)")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.clip(array, 0.0, 1.0)


def _as_boxes(boxes: Any, name: str = "boxes") -> np.ndarray:
    array = to_numpy(boxes).astype(np.float64)
    if array.size == 0:
        return array.reshape(0, 4)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name}: expected shape (N, 4) as (x0, y0, x1, y1), got {array.shape}")
    return array


def _as_vector(values: Any, n: int, name: str) -> np.ndarray:
    array = to_numpy(values).reshape(-1)
    if len(array) != n:
        raise ValueError(f"{name}: expected {n} values (one per box), got {len(array)}")
    return array


def class_color(label: int) -> tuple[float, float, float]:
    """The RGB colour of a class id; the same id always gets the same colour, in every figure.

    Ids 0-19 use tab20; later ids step around the hue circle by the golden angle, which keeps neighbouring
    ids far apart.
    """
    label = int(label)
    if label < 0:
        raise ValueError(f"class id must be >= 0, got {label}")
    if label < len(_PALETTE):
        return tuple(_PALETTE[label])
    hue = (label * 0.6180339887) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.75, 0.85)


def _figure(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None,
            **subplot_kw: Any) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def subplots(n: int, ncols: int = 3, panel_size: tuple[float, float] = (3.0, 3.0)) -> tuple[Figure, list[Axes]]:
    """A pyplot-free figure with ``n`` panels in rows of ``ncols``, for functions that take ``ax=``.

    Returns the figure and its first ``n`` axes in reading order; unused cells of the last row are hidden.
    """
    rows, cols = _grid_shape(n, ncols)
    fig, axes = _figure(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows))
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_axis_off()
    return fig, flat[:n]


def _single_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, axes = _figure(figsize=figsize)
    return fig, axes[0, 0]


def _image_axes(ax: Axes | None, image: np.ndarray, width: float = 5.0) -> tuple[Figure, Axes]:
    h, w = image.shape[:2]
    fig, ax = _single_axes(ax, figsize=(width, max(1.5, width * h / max(w, 1))))
    ax.imshow(image)
    ax.set_axis_off()
    return fig, ax


def _hide_frame(ax: Axes) -> None:
    """No ticks and no spines, but keep the x label (captions) and title visible."""
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _grid_shape(n: int, ncols: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError("nothing to draw: expected at least one image")
    ncols = max(1, min(ncols, n))
    return math.ceil(n / ncols), ncols


