"""Image-text retrieval in both directions (v2 Sec. 4.3, v1 Sec. 3.2), negatives from the (global) batch.

    image -> text:  input [<SPE>, f_image(x)],  candidates { [<SPE>, f_text(t)] : t in the batch's texts }
    text -> image:  input [<SPE>, f_text(t)],   candidates { [<SPE>, f_image(x)] : x in the batch's images }

Each direction is its own task for the MoE attributes (``attributes.TASK_IDS``: "retrieval_i2t" / "retrieval_t2i"):
the image is an input in one and a candidate target in the other, and the attribute bits say so. The image
and text encoders run once per batch; the decoder runs once per sequence kind (4 kinds). Both directions share one
temperature. The loss is the mean of the two directions' cross-entropies (v2 eq. (7) with Y = the batch):
the usual symmetric contrastive loss.

Gather Feature (paper Tab. 4): with ``tasks.retrieval.gather`` in a distributed run, every rank's candidates are
all-gathered (``all_gather_with_grad``: the gradient reaches the rank that computed each candidate) so each query
is contrasted with the whole global batch. Only with unmixed sampling, where all ranks run retrieval together.

Positives are decided by image id, not by row: when a batch holds two captions of the same image, both captions
are correct for that image (``losses.contrastive_loss`` spreads the target over them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from uniperceiver_v2.data.collate import collate_captions
from uniperceiver_v2.data.samples import CaptionSample, ImageCaptionsSample
from uniperceiver_v2.engine.distributed import all_gather_with_grad, get_world_size, is_distributed
from uniperceiver_v2.tasks.base import Task
from uniperceiver_v2.tasks.losses import contrastive_loss

__all__ = ["RetrievalEmbeddings", "RetrievalTask", "RetrievalTaskBatch", "symmetric_retrieval_loss"]


@dataclass
class RetrievalTaskBatch:
    """Images and texts; text t belongs to image row ``text_image_index[t]``.

    Attributes:
        images: (B, 3, H, W) normalised, padded; padding_mask: (B, H, W) bool.
        texts: T strings.
        text_image_index: (T,) long.
        image_ids: (B,) long dataset image ids (two rows with the same id are the same image).
    """

    images: torch.Tensor
    padding_mask: torch.Tensor
    texts: list[str]
    text_image_index: torch.Tensor
    image_ids: torch.Tensor

    def to(self, device: torch.device | str) -> RetrievalTaskBatch:
        return replace(self, images=self.images.to(device), padding_mask=self.padding_mask.to(device),
                       text_image_index=self.text_image_index.to(device), image_ids=self.image_ids.to(device))


@dataclass
class RetrievalEmbeddings:
    """The four kinds of representations, each (N, d): images as i2t queries / t2i candidates, texts as
    t2i queries / i2t candidates."""

    image_queries: torch.Tensor
    image_candidates: torch.Tensor
    text_queries: torch.Tensor
    text_candidates: torch.Tensor


class RetrievalTask(Task):
    """Image-text retrieval with the symmetric cross-entropy over the batch."""

    name = "retrieval"

    def collate(self, samples: Sequence[CaptionSample | ImageCaptionsSample]) -> RetrievalTaskBatch:
        batch = collate_captions(samples)
        return RetrievalTaskBatch(batch.images, batch.padding_mask, batch.captions, batch.caption_image_index,
                                  torch.tensor(batch.image_ids, dtype=torch.long))

    # -- representations -----------------------------------------------------------------------------------------
    def embed_images(self, model, images: torch.Tensor, padding_mask: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images as i2t queries and as t2i candidates: (B, d), (B, d) and the MoE auxiliary loss."""
        image = model.encode_images(images, padding_mask)
        queries, aux_q = model.image_representations(image, "retrieval_i2t", is_input=True)
        candidates, aux_c = model.image_representations(image, "retrieval_t2i", is_input=False)
        return queries, candidates, aux_q + aux_c

    def embed_texts(self, model, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Texts as t2i queries and as i2t candidates: (T, d), (T, d) and the MoE auxiliary loss."""
        features, attention_mask = model.encode_texts(texts)
        queries, aux_q = model.text_feature_representations(features, attention_mask, "retrieval_t2i", is_input=True)
        candidates, aux_c = model.text_feature_representations(features, attention_mask, "retrieval_i2t",
                                                               is_input=False)
        return queries, candidates, aux_q + aux_c

    def embed(self, model, batch: RetrievalTaskBatch) -> tuple[RetrievalEmbeddings, torch.Tensor]:
        image_q, image_c, aux_i = self.embed_images(model, batch.images, batch.padding_mask)
        text_q, text_c, aux_t = self.embed_texts(model, batch.texts)
        return RetrievalEmbeddings(image_q, image_c, text_q, text_c), aux_i + aux_t

    @staticmethod
    def logits(model, embeddings: RetrievalEmbeddings) -> tuple[torch.Tensor, torch.Tensor]:
        """v2 eq. (6) logits: image->text (B, T) and text->image (T, B)."""
        i2t = model.similarity(embeddings.image_queries, embeddings.text_candidates, "retrieval_i2t")
        t2i = model.similarity(embeddings.text_queries, embeddings.image_candidates, "retrieval_t2i")
        return i2t, t2i

    # -- loss ------------------------------------------------------------------------------------------------------
    def _gather(self, model) -> bool:
        return (self.config.gather and model.config.run.sampling == "unmixed" and is_distributed()
                and get_world_size() > 1)

    def loss(self, model, batch: RetrievalTaskBatch) -> dict[str, torch.Tensor]:
        embeddings, aux = self.embed(model, batch)
        image_ids = batch.image_ids                                       # (B,)
        text_image_ids = batch.image_ids[batch.text_image_index]         # (T,)
        candidate_texts, candidate_text_ids = embeddings.text_candidates, text_image_ids
        candidate_images, candidate_image_ids = embeddings.image_candidates, image_ids
        if self._gather(model):
            candidate_texts = all_gather_with_grad(candidate_texts)
            candidate_images = all_gather_with_grad(candidate_images)
            candidate_text_ids = all_gather_with_grad(candidate_text_ids)
            candidate_image_ids = all_gather_with_grad(candidate_image_ids)
        i2t = model.similarity(embeddings.image_queries, candidate_texts, "retrieval_i2t")       # (B, T_all)
        t2i = model.similarity(embeddings.text_queries, candidate_images, "retrieval_t2i")      # (T, B_all)
        parts = symmetric_retrieval_loss(i2t, t2i, image_ids[:, None] == candidate_text_ids[None, :],
                                         text_image_ids[:, None] == candidate_image_ids[None, :],
                                         self.config.label_smoothing)
        terms = {"loss_retrieval": parts["loss_retrieval"], "loss_moe_aux": aux}
        return {"loss_i2t": parts["loss_i2t"].detach(), "loss_t2i": parts["loss_t2i"].detach(), **terms,
                "loss": self.weighted_total(terms)}

    @torch.no_grad()
    def predict(self, model, batch: RetrievalTaskBatch) -> dict[str, torch.Tensor]:
        """Similarities of the batch's images and texts.

        Returns:
            {"i2t": (B, T) logits ranking texts for each image, "t2i": (T, B) logits ranking images for each
             text}. Recall@K: ``evaluation.retrieval`` on these matrices.
        """
        embeddings, _ = self.embed(model, batch)
        i2t, t2i = self.logits(model, embeddings)
        return {"i2t": i2t, "t2i": t2i}


def symmetric_retrieval_loss(i2t: torch.Tensor, t2i: torch.Tensor, i2t_positives: torch.Tensor,
                             t2i_positives: torch.Tensor, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """The mean of the image->text and text->image cross-entropies (v2 eq. (7) with Y = the batch).

    Args:
        i2t: (B, T') logits of B image queries against T' text candidates.
        t2i: (T, B') logits of T text queries against B' image candidates.
        i2t_positives: (B, T') bool; t2i_positives: (T, B') bool.
        label_smoothing: eps.

    Returns:
        {"loss_i2t", "loss_t2i", "loss_retrieval" = (loss_i2t + loss_t2i) / 2}.
    """
    loss_i2t = contrastive_loss(i2t, i2t_positives, label_smoothing)
    loss_t2i = contrastive_loss(t2i, t2i_positives, label_smoothing)
    return {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "loss_retrieval": 0.5 * (loss_i2t + loss_t2i)}
