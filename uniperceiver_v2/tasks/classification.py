"""Image classification as target selection (v2 Sec. 4.3, v1 Sec. 3.2).

    input x   = [<SPE>, f_image(x)]                    the image's global and regional tokens (v2 eq. (1))
    targets Y = { [<SPE>, f_text(class name)] }        one sequence per class name of the dataset

    logits[b, c] = cos(g(x_b)_<SPE>, g(y_c)_<SPE>) / tau_cls       (v2 eq. (6)),   loss = v2 eq. (7)

The class names are text, so any list of names works at inference without retraining (zero-shot): the
candidates are whatever names the batch carries. In training the embeddings of all classes of the batch's dataset
are computed once per step and shared by the batch (``UniPerceiverV2.class_name_embeddings``).

Region naming from image labels (our addition, ``tasks.classification.region_name_weight``; 0 = off, as the paper).
Detection trains the regional tokens to name only the categories that have boxes, so a category that only
classification knows (the synthetic suite's "novel" ones) is named at chance by the detector even when
classification recognises it. With the term on, the classification images' proposals are named too, through the
detection task's own path (``detection.region_logits``), as a multiple-instance problem (the image label says that
some proposal shows the class, not which one):

    s_c = sum_j w_j softmax_c(logits_j),   w = softmax_j(objectness logits) (no gradient),   loss = -log s_label

the probability that a proposal drawn by its objectness is named with the image's label (``region_label_loss``).
Detic (Zhou et al. 2022) trains detectors on image labels in the same spirit, with the largest proposal instead of
the objectness-weighted mixture (here the proposal network, trained on scenes of small objects, returns
fragments of the large centred object of a classification image, so no single proposal is reliable). The
sequence this term decodes is ``[<SPE>, regional tokens]``, without the global tokens (``regional_only``): with
them, the regional tokens of a one-object image learnt to copy its class from the global tokens (on 192 test
images, named right 0.969 of the time with the global tokens in the sequence and 0.135 without, chance 0.071) and
named the novel objects of multi-object scenes no better than before. With the regional tokens alone the detector
of the small profile tells the novel objects apart among the novel names 0.40 of the time (chance 0.25, and 0.24
without the term), but a seen category that looks alike still outscores the novel name
(docs/benchmarks.md, "Naming novel categories").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from uniperceiver_v2.data.collate import collate_classification
from uniperceiver_v2.data.samples import ClassificationSample
from uniperceiver_v2.tasks.base import Task
from uniperceiver_v2.tasks.losses import unified_loss

__all__ = ["ClassificationTask", "ClassificationTaskBatch", "region_label_loss", "regional_only"]


def regional_only(image):
    """``image`` (an ``ImageEncoderOutput``) with its global tokens left out: the tokens the region-naming term
    decodes. With the global tokens in the sequence, the regional tokens of a one-object classification image learn
    to copy the image's class from them instead of reading their own region (see the module text)."""
    num_proposals = image.boxes.shape[1]
    padding = image.token_padding_mask
    return replace(image, tokens=image.tokens[:, -num_proposals:], token_types=image.token_types[:, -num_proposals:],
                   token_padding_mask=None if padding is None else padding[:, -num_proposals:])


def region_label_loss(logits: torch.Tensor, objectness: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multiple-instance naming loss of the proposals of images that carry one label each (see the module text).

    Args:
        logits: (B, O, C) naming logits of the O proposals of each image.
        objectness: (B, O) objectness logits; their softmax over the proposals weighs them (no gradient).
        labels: (B,) long, the class of each image.

    Returns:
        0-d: mean over images of -log sum_j w_j softmax(logits_j)[label], computed in float32.
    """
    if logits.dim() != 3 or objectness.shape != logits.shape[:2] or labels.shape != logits.shape[:1]:
        raise ValueError(f"region_label_loss: expected logits (B, O, C), objectness (B, O), labels (B,); got "
                         f"{tuple(logits.shape)}, {tuple(objectness.shape)}, {tuple(labels.shape)}")
    log_weights = objectness.detach().float().log_softmax(dim=1)                           # (B, O)
    log_names = logits.float().log_softmax(dim=-1)                                          # (B, O, C)
    index = labels.view(-1, 1, 1).expand(-1, logits.shape[1], 1)
    log_label = log_names.gather(2, index).squeeze(2)                                       # (B, O)
    return -(log_weights + log_label).logsumexp(dim=1).mean()


@dataclass
class ClassificationTaskBatch:
    """A classification batch with its candidate set.

    Attributes:
        images: (B, 3, H, W) normalised, padded; padding_mask: (B, H, W) bool, True = padding.
        labels: (B,) long index into ``class_names`` (or None at inference).
        class_names: the C candidate names.
    """

    images: torch.Tensor
    padding_mask: torch.Tensor
    labels: torch.Tensor | None
    class_names: tuple[str, ...]

    def to(self, device: torch.device | str) -> ClassificationTaskBatch:
        return replace(self, images=self.images.to(device), padding_mask=self.padding_mask.to(device),
                       labels=None if self.labels is None else self.labels.to(device))


class ClassificationTask(Task):
    """Image classification against the names of ``class_names``.

    Args:
        config: ``tasks.classification``.
        class_names: the training / evaluation dataset's class names (``ImageFolderClassification.class_names``).
    """

    name = "classification"

    def __init__(self, config, class_names: Sequence[str] = ()):
        super().__init__(config)
        self.class_names = tuple(class_names)

    @classmethod
    def from_dataset(cls, config, dataset) -> ClassificationTask:
        return cls(config, class_names=dataset.class_names)

    def collate(self, samples: Sequence[ClassificationSample]) -> ClassificationTaskBatch:
        if not self.class_names:
            raise ValueError("ClassificationTask: no class names; build the task with class_names= or from_dataset")
        batch = collate_classification(samples)
        if int(batch.labels.max()) >= len(self.class_names):
            raise ValueError(f"ClassificationTask: label {int(batch.labels.max())} but only "
                             f"{len(self.class_names)} class names")
        return ClassificationTaskBatch(batch.images, batch.padding_mask, batch.labels, self.class_names)

    def logits(self, model, batch: ClassificationTaskBatch, image=None) -> tuple[torch.Tensor, torch.Tensor]:
        """v2 eq. (6) logits (B, C) of every image against every class name, and the MoE auxiliary loss.
        ``image``: the batch's ``model.encode_images`` output when the caller already has it."""
        if image is None:
            image = model.encode_images(batch.images, batch.padding_mask)
        inputs, aux = model.image_representations(image, self.name, is_input=True)         # (B, d)
        targets = model.class_name_embeddings(batch.class_names, self.name)                # (C, d)
        return model.similarity(inputs, targets, self.name), aux

    def loss(self, model, batch: ClassificationTaskBatch) -> dict[str, torch.Tensor]:
        if batch.labels is None:
            raise ValueError("ClassificationTask.loss: the batch has no labels")
        image = model.encode_images(batch.images, batch.padding_mask)
        logits, aux = self.logits(model, batch, image)
        terms = {"loss_cls": unified_loss(logits, batch.labels, self.config.label_smoothing),
                 "loss_moe_aux": aux}
        metrics = {"accuracy": (logits.argmax(1) == batch.labels).float().mean().detach()}
        weighted = dict(terms)
        if self.config.region_name_weight > 0:
            from uniperceiver_v2.tasks.detection import region_logits

            if image.boxes is None:
                raise ValueError("tasks.classification.region_name_weight > 0 needs regional tokens: "
                                 "image_encoder.use_regional=true")
            names, region_aux = region_logits(model, regional_only(image), batch.class_names)  # (B, O, C)
            terms["loss_region_name"] = region_label_loss(names, image.objectness, batch.labels)
            terms["loss_moe_aux"] = aux + region_aux
            weighted = {**terms, "loss_region_name": self.config.region_name_weight * terms["loss_region_name"]}
            # how often the most objectness-weighted proposal's name is the image's label (a training-time gauge)
            best = image.objectness.argmax(dim=1)
            named = names[torch.arange(len(best), device=best.device), best].argmax(-1)
            metrics["region_accuracy"] = (named == batch.labels).float().mean().detach()
        return {**terms, **metrics, "loss": self.weighted_total(weighted)}

    @torch.no_grad()
    def predict(self, model, batch: ClassificationTaskBatch, top_k: int = 5) -> dict[str, torch.Tensor]:
        """Top-k classes of each image (v2 eq. (5)).

        Returns:
            {"scores": (B, k) softmax probabilities, "labels": (B, k) long indices into ``batch.class_names``,
             "logits": (B, C)} with k = min(top_k, C).
        """
        logits, _ = self.logits(model, batch)
        probs = logits.softmax(dim=1)
        scores, labels = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return {"scores": scores, "labels": labels, "logits": logits}
