"""Every figure of the project, one module per subject; this package re-exports them all (``viz.draw_detections``).

Notebooks and tests draw through this package only, so a figure looks the same wherever it appears.

Conventions (every module):
  * Inputs are plain: numpy arrays, torch tensors (any device, with or without grad) or nested lists.
  * Images are CHW or HWC, float in [0, 1] or uint8 in [0, 255]; grayscale HW is accepted too. An image normalised
    for a backbone is shown after ``mean`` / ``std`` undo the normalisation (``mean=IMAGENET_MEAN, std=IMAGENET_STD``).
  * Boxes are absolute pixel coordinates ``(x0, y0, x1, y1)``.
  * Every function returns the :class:`matplotlib.figure.Figure` it drew on and never calls ``plt.show()``; figures
    are built without pyplot, so nothing accumulates in pyplot's figure list. Single-panel functions take ``ax=``.
  * A task has one colour in every figure (``task_color``); log axes are labelled with plain numbers.

| module | subject |
| --- | --- |
| ``base`` | input conversion, class colours, the one task palette (``task_color``), log axes, figure set-up |
| ``images`` | images with detections, masks, proposals, sampling points, attention maps, captions, retrieved texts |
| ``matrices`` | attention masks, similarity matrices, expert usage (gates) as heat maps |
| ``curves`` | training curves from ``metrics.jsonl`` |
| ``statistics`` | statistics of a COCO instances file |
| ``regions`` | region proposal network internals: level maps, denoising groups, matching costs, token layout, bars |
| ``decoder`` | the unified decoder's MoE: attribute bits, expert usage per layer, expert load |
| ``evaluation`` | qualitative evaluation: top-k predictions, text-to-image retrieval, caption beams and steps |
| ``optim`` | task sampling, gradient norms, per-task curves, interference matrices |
| ``tables`` | result tables and ablations next to the paper's |
| ``explore`` | interactive explorers (ipywidgets) built on the inference API and the figures above; import it by name |
"""

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .base import TASK_COLORS, class_color, set_log_scale, subplots, task_color, to_display_image, to_numpy
from .curves import plateau_values, plot_curves
from .decoder import plot_attribute_bits, plot_expert_load, plot_expert_loads, plot_expert_usage
from .evaluation import (
    plot_calibration,
    plot_ranked_texts,
    plot_token_probabilities,
    plot_topk_predictions,
    show_text_retrieval,
)
from .images import (
    attention_heatmaps,
    draw_detections,
    draw_proposals,
    draw_sampling_points,
    image_grid,
    show_captions,
    show_image,
    show_retrieval,
)
from .matrices import plot_attention_mask, plot_gate_heatmap, plot_similarity_matrix
from .optim import plot_grad_norms, plot_interference, plot_sampling_weights, plot_task_curves, plot_task_sequence
from .regions import draw_denoising_boxes, plot_bars, plot_cost_matrices, plot_level_maps, plot_token_layout
from .statistics import coco_instance_statistics, coco_size_counts, plot_instance_statistics
from .tables import grouped_bars, plot_ablation, plot_metrics_vs_paper, results_table_figure

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "attention_heatmaps", "class_color", "coco_instance_statistics",
    "coco_size_counts",
    "draw_denoising_boxes", "draw_detections", "draw_proposals", "draw_sampling_points", "grouped_bars",
    "image_grid", "plot_ablation", "plot_attention_mask", "plot_attribute_bits", "plot_bars", "plot_calibration",
    "plot_cost_matrices",
    "plateau_values", "plot_curves", "plot_expert_load", "plot_expert_loads", "plot_expert_usage",
    "plot_gate_heatmap", "plot_grad_norms",
    "plot_instance_statistics", "plot_interference", "plot_level_maps", "plot_metrics_vs_paper",
    "plot_ranked_texts", "plot_sampling_weights", "plot_similarity_matrix", "plot_task_curves",
    "plot_task_sequence", "plot_token_layout", "plot_token_probabilities", "plot_topk_predictions",
    "results_table_figure", "set_log_scale", "show_captions", "show_image", "show_retrieval", "show_text_retrieval",
    "subplots", "task_color", "TASK_COLORS", "to_display_image", "to_numpy",
]
