"""Course material: what the notebooks need beyond the library. Nothing in the library imports this package.

| module | for |
| --- | --- |
| ``runs`` | notebook 06: the trainer as a subprocess (command, streamed output, status, logs) |
| ``results`` | notebooks 06-07: metric tables next to chance, qualitative examples from a trained model |
| ``novel`` | notebook 08: novel categories, their exposure in training, tables of the novel-category evaluation |
| ``rpn`` | notebook 01: the region proposal network alone (traces, matching costs, a short training) |
| ``pooling`` | notebook 02: the attention pools of notebook 06's run, or a short training of their own |
| ``gating`` | notebooks 03-04: the unified decoder's calls recorded and replayed, expert usage, re-parameterisation |
| ``toy_multitask`` | notebook 05: a toy multi-task problem that trains in seconds, for MT-AdamW and sampling |
| ``interference`` | notebook 05: the MoE paper's task-interference metric |
| ``ablations`` | notebooks 09-10: the ablation runs of Tab. 2-5 and their tables |
| ``paper_results`` | notebooks 09-10: the paper's numbers, to put next to ours |
| ``pipeline`` | ``python -m uniperceiver_v2.reproduce``: papermill over the series, profiles, results files |

The names of ``runs``, ``results`` and ``novel`` are re-exported here (``walkthrough.train_command``); import the
other modules by name (``from uniperceiver_v2.walkthrough import gating``).
"""

from .novel import (
    above_reference,
    best_proposal_logits,
    category_exposure,
    images_with_novel_names,
    novel_ap_table,
    novel_category_names,
    novel_naming,
    novel_objects_named,
    per_category_table,
)
from .results import (
    RetrievalExamples,
    caption_repetition,
    ceiling_table,
    chance_levels,
    detection_verdicts,
    distinct_detections,
    fill_mask_examples,
    mask_one_word,
    metrics_table,
    overlapping_detections,
    representation_similarity,
    retrieval_examples,
)
from .runs import (
    CONSOLE_LOG,
    ProgressFilter,
    TrainingFailed,
    TrainingLaunch,
    TrainingStatus,
    compare_logged_draws,
    config_of_command,
    default_log_every,
    longest_gaps,
    loss_summary,
    lr_records,
    param_group_table,
    pretrained_backbone,
    require_checkpoint,
    resolve_backbone_weights,
    run_training,
    shell_command,
    split_batch_overrides,
    stream_command,
    task_mixture_table,
    task_sequence_from_records,
    task_trends,
    time_budget_decision,
    train_command,
    training_dir,
    training_status,
    unmixed_sampler,
)

__all__ = [
    "ceiling_table", "above_reference", "images_with_novel_names", "novel_naming",
    "novel_objects_named",
    "CONSOLE_LOG", "ProgressFilter", "RetrievalExamples", "TrainingFailed", "TrainingLaunch", "TrainingStatus",
    "best_proposal_logits", "caption_repetition", "category_exposure", "chance_levels", "compare_logged_draws",
    "config_of_command", "default_log_every", "detection_verdicts", "distinct_detections", "fill_mask_examples",
    "longest_gaps", "loss_summary", "lr_records", "mask_one_word", "metrics_table", "novel_ap_table",
    "novel_category_names", "overlapping_detections", "param_group_table", "per_category_table",
    "pretrained_backbone", "representation_similarity", "require_checkpoint", "resolve_backbone_weights",
    "retrieval_examples", "run_training",
    "shell_command", "split_batch_overrides", "stream_command", "task_mixture_table", "task_sequence_from_records",
    "task_trends", "time_budget_decision", "train_command", "training_dir", "training_status", "unmixed_sampler",
]
