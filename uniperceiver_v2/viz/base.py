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
  * One colour per task across the whole series (:func:`task_color`), one per class id (:func:`class_color`).
  * Logarithmic axes are labelled with plain numbers ("0.5", "60", "0.001"), never "6x10^1"
    (:func:`set_log_scale`).
"""


from __future__ import annotations

import colorsys
import math
import zlib
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

# tab20 with its dark shades first, so the first ten classes get ten clearly different colours.
_TAB20 = matplotlib.colormaps["tab20"]
_PALETTE = [_TAB20(i)[:3] for i in list(range(0, 20, 2)) + list(range(1, 20, 2))]
_MASK_ALPHA = 0.45
_LEVEL_CMAP = matplotlib.colormaps["viridis"]

# The one task -> colour mapping of the series: every figure that colours by task reads it, so captioning is the
# same green in notebook 05's toy, notebook 06's training curves and notebook 09's ablations. Names of the toy
# problem (``language_modelling``) and of the trainer (``mlm``) are the same task.
_TAB10 = matplotlib.colormaps["tab10"]
TASK_COLORS: dict[str, tuple[float, float, float]] = {
    "classification": _TAB10(0)[:3],      # blue
    "detection": _TAB10(1)[:3],           # orange
    "captioning": _TAB10(2)[:3],          # green
    "retrieval": _TAB10(3)[:3],           # red
    "mlm": _TAB10(4)[:3],                 # purple
    "language_modelling": _TAB10(4)[:3],
    "segmentation": _TAB10(5)[:3],        # brown
    "mixed": (0.35, 0.35, 0.35),          # an iteration holding several tasks
}
# Tasks outside the table (a toy's "a", "b") take these, chosen by a stable hash of the name.
_OTHER_TASK_COLORS = [_TAB10(i)[:3] for i in (6, 8, 9, 7)] + [_TAB20(i)[:3] for i in (1, 3, 5, 9, 13, 17, 19)]


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


def task_color(task: str) -> tuple[float, float, float]:
    """The RGB colour of a task, the same in every figure of the series (:data:`TASK_COLORS`).

    A name outside the table gets a colour from a fixed list, picked by a hash of the name that does not change
    between runs (Python's own ``hash`` of a string does), so it too is the same in every figure.
    """
    name = str(task)
    if name in TASK_COLORS:
        return TASK_COLORS[name]
    return _OTHER_TASK_COLORS[zlib.crc32(name.encode("utf-8")) % len(_OTHER_TASK_COLORS)]


def quoted_token(token: str) -> str:
    """A token as a label or in a list: punctuation quoted (a bare "." is a speck at a figure's font size, a bare ","
    reads as the list's own separator)."""
    return f"'{token}'" if token and not any(ch.isalnum() for ch in token) else token


def _plain_number(value: float, _position: Any = None) -> str:
    """A tick label as a plain number: "0.001", "0.5", "60", "2000" (``%g`` switches to "1e+05" from 10^5)."""
    return f"{value:g}"


def set_log_scale(ax: Axes, axis: str = "y") -> None:
    """A logarithmic ``axis`` ("x" or "y") whose ticks read as plain numbers.

    Matplotlib's default labels the minor ticks of a short log axis as "6x10^1"; here decades are written as plain
    numbers ("0.01", "1", "100") and, when the visible range spans at most two decades, minor ticks too ("20",
    "60", "0.3"; over more than one decade only 2 and 5, so labels do not collide). The range is read when the
    labels are drawn, so the axis may be set before or after plotting.
    """
    if axis not in ("x", "y"):
        raise ValueError(f"axis: expected 'x' or 'y', got {axis!r}")
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10.0))
    target.set_major_formatter(FuncFormatter(_plain_number))
    target.set_minor_locator(LogLocator(base=10.0, subs=np.arange(2, 10)))

    def minor_label(value: float, _position: Any = None) -> str:
        low, high = sorted(float(v) for v in target.get_view_interval())
        if value <= 0 or low <= 0:
            return ""
        decades = math.log10(high / low)
        if decades > 2.0:
            return ""
        mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9))
        keep = range(2, 10) if decades <= 1.0 else (2, 5)
        return _plain_number(value) if mantissa in keep else ""

    target.set_minor_formatter(FuncFormatter(minor_label))
    # one size for every label: decade labels larger than the ones between read as two different scales
    ax.tick_params(axis=axis, which="both", labelsize=8)


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


