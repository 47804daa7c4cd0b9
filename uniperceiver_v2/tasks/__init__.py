"""The tasks of Uni-Perceiver v2, each "pick the most likely target from a candidate set" (v2 eq. (5)-(7)).

``TASKS`` maps the task names of ``config.tasks`` to their classes; build one with
``TASKS[name].from_dataset(config.tasks.get(name), dataset)`` (or ``TASKS[name](config.tasks.get(name))`` for the
tasks without dataset-specific candidates). Detection and instance segmentation are one task ("detection"): the
same proposals give boxes and masks.

| name             | input x                                   | candidates Y                          |
| ---------------- | ----------------------------------------- | ------------------------------------- |
| classification   | ``[<SPE>, image]``                        | class names                           |
| detection        | ``[<SPE>, image]``, each proposal's output| class names                           |
| captioning       | image + words so far + ``<SPE>``          | the vocabulary                        |
| mlm              | text with masked words as ``<SPE>``       | the vocabulary                        |
| retrieval        | ``[<SPE>, image]`` / ``[<SPE>, text]``    | the batch's texts / images            |
"""

from uniperceiver_v2.tasks.base import Task
from uniperceiver_v2.tasks.captioning import CaptioningTask
from uniperceiver_v2.tasks.classification import ClassificationTask
from uniperceiver_v2.tasks.detection import DetectionTask, to_coco_results
from uniperceiver_v2.tasks.mlm import MaskedLanguageModelingTask
from uniperceiver_v2.tasks.retrieval import RetrievalTask

TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (ClassificationTask, DetectionTask, CaptioningTask, MaskedLanguageModelingTask, RetrievalTask)
}

__all__ = [
    "TASKS",
    "CaptioningTask",
    "ClassificationTask",
    "DetectionTask",
    "MaskedLanguageModelingTask",
    "RetrievalTask",
    "Task",
    "to_coco_results",
]
