"""Figures of multi-task optimisation (paper Sec. 4.4): task sequences of the samplers, sampling weights,
gradient norms per iteration, evaluation curves per task and variant, and the task-interference matrix.

Same conventions as the rest of `uniperceiver_v2.viz`: plain inputs (lists, numpy arrays,
torch tensors), every function returns the `matplotlib.figure.Figure` it drew on, built without pyplot, and
never calls `plt.show()`. A task always has the colour `viz.task_color(task)`, the same in every figure of the
series.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter

from .base import set_log_scale, task_color, to_numpy

__all__ = [
    "plot_grad_norms",
    "plot_interference",
    "plot_sampling_weights",
    "plot_task_curves",
    "plot_task_sequence",
]

# Variants (optimizers, samplers) are not tasks: they take Dark2, which shares no colour with the task palette.
_VARIANT_COLORS = matplotlib.colormaps["Dark2"]
_MIXED_COLOR = task_color("mixed")


def _task_indices(tasks: Sequence[str], task_names: Sequence[str], what: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(task_names)}
    unknown = sorted({task for task in tasks if task not in index})
    if unknown:
        raise ValueError(f"{what}: task(s) {unknown} are not in task_names {list(task_names)}")
    return np.array([index[task] for task in tasks], dtype=np.int64)


def plot_task_sequence(unmixed_tasks: Sequence[str], mixed_slots: Sequence[Sequence[str]],
                       task_names: Sequence[str], sampling_ratios: Mapping[str, float],
                       title: str | None = None, shown: int | None = None,
                       ratios_label: str = "$s_k$") -> Figure:
    """The tasks drawn by unmixed and mixed sampling, iteration by iteration, and how often each was drawn.

    Args:
        unmixed_tasks: (T,) the task of each iteration (`UnmixedTaskSampler.task_for_iteration`).
        mixed_slots: (T, S) the task of each slot of each iteration (`MixedTaskSampler.slots_for_iteration`).
        task_names: the tasks, fixing their colours and order.
        sampling_ratios: s_k of every task, drawn next to the observed frequencies (or any expected share, e.g.
            ``UnmixedTaskSampler.expected_iterations`` / T when a task joins late, with ``ratios_label`` saying so).
        shown: draw only the first ``shown`` iterations in the strips (thousands of one-pixel columns read as a
            barcode); the frequencies are those of all T iterations. None: every iteration.
    """
    unmixed = _task_indices(list(unmixed_tasks), task_names, "unmixed_tasks")  # (T,)
    if not len(mixed_slots):
        raise ValueError("mixed_slots: no iterations given")
    slots = len(mixed_slots[0])
    if any(len(row) != slots for row in mixed_slots):
        raise ValueError(f"mixed_slots: every iteration must have the same number of slots ({slots})")
    mixed = _task_indices([task for row in mixed_slots for task in row], task_names,
                          "mixed_slots").reshape(len(mixed_slots), slots).T  # (S, T)
    missing = [name for name in task_names if name not in sampling_ratios]
    if missing:
        raise ValueError(f"sampling_ratios: no s_k for task(s) {missing}")

    if shown is not None and shown < 1:
        raise ValueError(f"shown: expected at least 1 iteration, got {shown}")
    drawn = len(unmixed) if shown is None else min(shown, len(unmixed))
    first = "" if drawn == len(unmixed) else f" (the first {drawn} of {len(unmixed)} iterations)"

    fig = Figure(figsize=(13.0, 3.9), layout="constrained")
    grid = fig.add_gridspec(2, 2, width_ratios=[3.2, 1.0], height_ratios=[1.0, max(1.0, slots / 2)])
    cmap = ListedColormap([task_color(name) for name in task_names])
    top, bottom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0])
    top.imshow(unmixed[None, :drawn], cmap=cmap, vmin=-0.5, vmax=len(task_names) - 0.5, aspect="auto",
               interpolation="nearest")
    top.set_yticks([0], ["all GPUs"], fontsize=8)
    top.set_title("unmixed: one task per iteration, the whole global batch" + first, fontsize=9, loc="left")
    bottom.imshow(mixed[:, :drawn], cmap=cmap, vmin=-0.5, vmax=len(task_names) - 0.5, aspect="auto",
                  interpolation="nearest")
    bottom.set_yticks(range(slots), [f"slot {s}" for s in range(slots)], fontsize=8)
    bottom.set_title(f"mixed: {slots} slots (per-GPU batches) per iteration, each with its own task", fontsize=9,
                     loc="left")
    bottom.set_xlabel("iteration")
    top.set_xticks([])

    bars = fig.add_subplot(grid[:, 1])
    positions = np.arange(len(task_names))
    unmixed_freq = np.bincount(unmixed, minlength=len(task_names)) / len(unmixed)
    mixed_freq = np.bincount(mixed.reshape(-1), minlength=len(task_names)) / mixed.size
    colors = [task_color(name) for name in task_names]
    bars.barh(positions - 0.2, unmixed_freq, height=0.38, color=colors, label="unmixed (iterations)")
    bars.barh(positions + 0.2, mixed_freq, height=0.38, color=colors, alpha=0.45, hatch="//",
              label="mixed (slots)")
    bars.scatter([sampling_ratios[name] for name in task_names], positions, marker="|", s=300, color="black",
                 zorder=3, label=ratios_label)
    bars.set_yticks(positions, list(task_names), fontsize=9)
    bars.invert_yaxis()
    bars.set_xlabel("fraction drawn" + ("" if drawn == len(unmixed) else f" (all {len(unmixed)} iterations)"))
    for label, color in zip(bars.get_yticklabels(), colors):   # the task names double as the strips' colour key
        label.set_color(color)
    bars.set_xlim(0, 1.15 * max(unmixed_freq.max(), mixed_freq.max(), *(sampling_ratios[n] for n in task_names)))
    # Grey stand-ins in the legend: a swatch in the first task's colour would read as that task.
    handles = [Patch(facecolor="0.55", label="unmixed (iterations)"),
               Patch(facecolor="0.55", alpha=0.45, hatch="//", label="mixed (slots)"),
               Line2D([], [], marker="|", linestyle="none", markersize=10, color="black", label=ratios_label)]
    bars.legend(handles=handles, fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False,
                handlelength=1.2, columnspacing=0.8)
    bars.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_sampling_weights(names: Sequence[str], weights: Mapping[str, Sequence[float]],
                          title: str | None = None, ax: Axes | None = None) -> Figure:
    """Grouped bars of several sets of sampling weights for the same data sets (e.g. a paper's table next to
    a rule such as sqrt(dataset size)).

    Args:
        names: the data sets (bar groups).
        weights: legend label -> one weight per data set.
    """
    for label, values in weights.items():
        if len(values) != len(names):
            raise ValueError(f"weights[{label!r}]: expected {len(names)} values (one per data set), got {len(values)}")
    if ax is None:
        fig = Figure(figsize=(1.2 + 1.1 * len(names), 3.4), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    width = 0.8 / max(1, len(weights))
    positions = np.arange(len(names))
    for index, (label, values) in enumerate(weights.items()):
        offset = (index - (len(weights) - 1) / 2) * width
        drawn = ax.bar(positions + offset, to_numpy(values), width=width * 0.95, label=label,
                       color=_VARIANT_COLORS(index))
        ax.bar_label(drawn, fmt="%.3f", fontsize=8, rotation=90, padding=2)
    ax.set_xticks(positions, list(names), fontsize=9, rotation=20, ha="right")
    ax.set_ylabel("sampling weight $s_k$")
    ax.margins(y=0.3)
    ax.legend(fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def plot_grad_norms(runs: Mapping[str, tuple[Sequence[str], Sequence[float]]], task_names: Sequence[str],
                    title: str | None = None) -> Figure:
    """Raw global gradient norm of every iteration, one panel per run, each point coloured by its task; the rarer
    a task in a run, the later its points are drawn, so a rarely sampled task is not hidden under the others.

    Args:
        runs: run label -> (step_tasks (T,), grad_norms (T,)); a step task "mixed" (an iteration holding
            several tasks) is drawn in grey.
        task_names: the tasks, fixing their colours.
    """
    if not runs:
        raise ValueError("plot_grad_norms: no runs given")
    fig = Figure(figsize=(4.4 * len(runs), 3.3), layout="constrained")
    axes = fig.subplots(1, len(runs), squeeze=False, sharey=True)[0]
    for ax, (label, (tasks, norms)) in zip(axes, runs.items()):
        norms = to_numpy(norms).astype(np.float64).reshape(-1)
        if len(tasks) != len(norms):
            raise ValueError(f"runs[{label!r}]: {len(tasks)} step tasks but {len(norms)} gradient norms")
        iterations = np.arange(len(norms))
        is_mixed = np.array([task == "mixed" for task in tasks], dtype=bool)
        if is_mixed.any():
            ax.scatter(iterations[is_mixed], norms[is_mixed], s=4, color=_MIXED_COLOR)
        if (~is_mixed).any():
            indices = _task_indices([t for t, m in zip(tasks, is_mixed) if not m], task_names, f"runs[{label!r}]")
            # the most frequent task first, the rarest last: a rare task's few points stay on top, visible
            order = np.argsort(-np.bincount(indices, minlength=len(task_names))[indices], kind="stable")
            ax.scatter(iterations[~is_mixed][order], norms[~is_mixed][order], s=4,
                       c=[task_color(task_names[i]) for i in indices[order]])
        set_log_scale(ax, "y")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("global gradient norm ||grad||")
    handles = [Line2D([], [], marker="o", linestyle="", markersize=5, color=task_color(name), label=name)
               for name in task_names]
    if any(task == "mixed" for tasks, _ in runs.values() for task in tasks):
        handles.append(Line2D([], [], marker="o", linestyle="", markersize=5, color=_MIXED_COLOR,
                              label="mixed iteration"))
    fig.legend(handles=handles, loc="outside right center", fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


# Mantissas of the ticks a short log axis may get, nicest first: 1, then 2 and 5, the other digits, the halves, then
# the tenths (1.2 ... 1.9, 2.2, ...). See _label_short_log_axis.
_TICK_MANTISSAS = ([1.0], [2.0, 5.0], [3.0, 4.0, 6.0, 7.0, 8.0, 9.0], [1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5, 9.5],
                   [round(1.0 + i / 10, 1) for i in range(1, 90) if i % 5])


def short_log_ticks(low: float, high: float, parts: int = 8) -> list[float]:
    """Tick values for a log axis from ``low`` to ``high`` (> 0) that spans at most one decade: the nicest values
    first (1, 2 and 5, the other digits, the halves, the tenths, times a power of ten), each kept only if it lies at
    least 1 / ``parts`` of the axis' log range from every value kept before, so the labels do not collide and
    reach close to both ends of the axis."""
    if not 0 < low < high:
        raise ValueError(f"short_log_ticks: expected 0 < low < high, got {low}, {high}")
    span = math.log10(high / low)
    gap = span / parts
    exponents = range(math.floor(math.log10(low)), math.floor(math.log10(high)) + 1)
    kept: list[float] = []
    for level in _TICK_MANTISSAS:
        for mantissa in level:
            for exponent in exponents:
                value = float(f"{mantissa * 10.0 ** exponent:.12g}")
                if low <= value <= high and all(abs(math.log10(value / other)) >= gap for other in kept):
                    kept.append(value)
    return sorted(kept)


def _label_short_log_axis(ax: Axes) -> None:
    """Label a log y axis that spans at most one decade at :func:`short_log_ticks` (minor ticks; a decade keeps its
    major label). ``set_log_scale`` labels only the digits 1-9 there, and over a short range (losses between 1.2 and
    3.4, say) those are two labels that stop above where the curves end."""
    low, high = sorted(ax.get_ylim())
    if not 0 < low < high or math.log10(high / low) > 1.0:
        return
    ax.yaxis.set_minor_locator(FixedLocator(short_log_ticks(low, high)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _position=None: f"{value:g}"))


def plot_task_curves(curves: Mapping[str, Mapping[str, tuple[Any, Any, Any, Any]]], task_names: Sequence[str],
                     xlabel: str = "iteration", ylabel: str = "held-out loss", logx: bool = False,
                     logy: bool = False, ncols: int = 3, title: str | None = None) -> Figure:
    """One panel per task, one line per variant with a shaded band: held-out loss during training, or final
    loss against the learning rate.

    Args:
        curves: variant label -> task -> (x (P,), mean (P,), low (P,), high (P,)); the band between low and
            high (e.g. min and max over seeds) is shaded.
        task_names: the panels, in order.
        xlabel, ylabel: axis labels of every panel.
        logx, logy: logarithmic axes; a logarithmic y axis that spans at most one decade is labelled at
            :func:`short_log_ticks`, so that its labels reach the values where the curves end.
        ncols: panels per row.
    """
    if not curves:
        raise ValueError("plot_task_curves: no curves given")
    rows = -(-len(task_names) // ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * rows), layout="constrained")
    axes = list(fig.subplots(rows, ncols, squeeze=False).flat)
    for ax in axes[len(task_names):]:
        ax.set_axis_off()
    x_values: set[float] = set()
    for index, (label, per_task) in enumerate(curves.items()):
        color = _VARIANT_COLORS(index)
        for ax, task in zip(axes, task_names):
            if task not in per_task:
                raise ValueError(f"curves[{label!r}]: no curve for task {task!r}")
            x, mean, low, high = (to_numpy(a).astype(np.float64).reshape(-1) for a in per_task[task])
            x_values.update(x.tolist())
            if not len(x) == len(mean) == len(low) == len(high):
                raise ValueError(f"curves[{label!r}][{task!r}]: x, mean, low and high differ in length")
            ax.plot(x, mean, color=color, linewidth=1.3, marker="o" if len(x) <= 8 else None, markersize=3,
                    label=label)
            ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)
    for ax, task in zip(axes, task_names):
        ax.set_title(task, fontsize=9)      # black: the line colours are the variants', not the tasks'
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            set_log_scale(ax, "x")
            if 0 < len(x_values) <= 8 and min(x_values) > 0:
                # a few swept values (e.g. learning rates): a tick at each, so 0.003 is read, not guessed
                ax.xaxis.set_minor_locator(FixedLocator([]))
                ax.set_xticks(sorted(x_values), [f"{value:g}" for value in sorted(x_values)])
        if logy:
            set_log_scale(ax, "y")
            _label_short_log_axis(ax)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if len(task_names) < len(axes):
        axes[-1].legend(handles, labels, loc="center", fontsize=8, frameon=False)
    else:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(3, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def plot_interference(matrix: Any, task_names: Sequence[str], title: str | None = None,
                      limit: float | None = None, ax: Axes | None = None, colorbar: bool = True) -> Figure:
    """The task-interference matrix I(i -> j) (MoE paper Sec. 3.1; `walkthrough.interference`) as a heat map.

    Args:
        matrix: (K, K), matrix[i, j] = I(task i -> task j): > 0 training task i lowers task j's loss, < 0 it
            raises it; the diagonal is 1. Rows are the task trained, columns the task affected.
        task_names: the K tasks.
        limit: the colour scale spans [-limit, limit]; default max |I(i -> j)| over i != j (at least 0.1).
            Pass the same limit to several panels to compare them.
        colorbar: False draws no colour bar, for panels that share one (same ``limit``; the colour-scaled image
            is ``ax.images[0]``, e.g. ``fig.colorbar(axes[0].images[0], ax=axes, label="I(i -> j)")``).

    The diagonal (1 by definition) is drawn in grey, so the colour scale, symmetric around 0 (red: helps,
    blue: hurts), is spent on the off-diagonal entries. A NaN entry (a task whose column is undefined,
    ``task_interference(..., undefined="nan")``) is left blank and labelled "n/a".
    """
    values = to_numpy(matrix).astype(np.float64)
    if values.ndim != 2 or values.shape[0] != values.shape[1]:
        raise ValueError(f"matrix: expected a square (K, K) array, got shape {values.shape}")
    if len(task_names) != len(values):
        raise ValueError(f"task_names: expected {len(values)} names, got {len(task_names)}")
    if ax is None:
        size = 1.8 + 0.75 * len(values)
        fig = Figure(figsize=(size + 1.2, size), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    off_diagonal = ~np.eye(len(values), dtype=bool)
    if limit is None:
        limit = max(0.1, float(np.nanmax(np.abs(values[off_diagonal]))) if off_diagonal.any() else 0.1)
    elif not limit > 0:
        raise ValueError(f"limit: expected a positive colour-scale limit, got {limit}")
    image = ax.imshow(np.where(off_diagonal, values, np.nan), cmap="RdBu_r", vmin=-limit, vmax=limit,
                      interpolation="nearest")
    ax.imshow(np.where(off_diagonal, np.nan, 1.0), cmap=ListedColormap([(0.85, 0.85, 0.85)]),
              interpolation="nearest")
    if colorbar:
        fig.colorbar(image, ax=ax, shrink=0.85, label="I(i -> j)")
    for i in range(len(values)):
        for j in range(len(values)):
            strong = off_diagonal[i, j] and abs(values[i, j]) > 0.6 * limit
            label = f"{values[i, j]:.2f}" if np.isfinite(values[i, j]) else "n/a"
            ax.text(j, i, label, ha="center", va="center", fontsize=8, color="white" if strong else "black")
    ax.set_xticks(range(len(values)), list(task_names), rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(values)), list(task_names), fontsize=8)
    ax.set_xlabel("task j (affected)")
    ax.set_ylabel("task i (trained)")
    if title:
        ax.set_title(title, fontsize=10)
    return fig
