"""Attention masks of the unified decoder.

Convention, everywhere in the package: a boolean mask of shape (..., T_query, T_key) where **True means the query
may attend to the key** (the convention of ``torch.nn.functional.scaled_dot_product_attention``). Padding is given
separately as a key-padding mask of shape (B, T) where **True means padding**; ``combine_masks`` merges the two.

Masks per task:
* classification, detection, retrieval and the candidate targets: bidirectional (``bidirectional_mask``);
* masked language modelling: bidirectional too (``mlm_mask``): "the model predicts each masked word based on all
  inputs" (v1 Sec. 3.2);
* captioning: the auto-regressive mask of v1 appendix B (``autoregressive_mask``), which lets one forward pass
  predict every word of a caption with ``<SPE>`` tokens appended after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "autoregressive_causal_flags",
    "autoregressive_mask",
    "bidirectional_mask",
    "combine_masks",
    "mlm_mask",
    "to_additive_mask",
]


def bidirectional_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Every token attends to every non-padding token of its sequence.

    Args:
        key_padding_mask: (B, T) bool, True = padding.

    Returns:
        (B, T, T) bool, True = may attend.
    """
    if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
        raise ValueError(f"key_padding_mask: expected a (B, T) bool tensor, got {key_padding_mask.dtype} "
                         f"{tuple(key_padding_mask.shape)}")
    B, T = key_padding_mask.shape
    return (~key_padding_mask)[:, None, :].expand(B, T, T).clone()


def mlm_mask(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """Masked language modelling: the ``<SPE>`` tokens that replace the masked words, like every other token, see
    the whole (non-padding) sentence in both directions (v1 Sec. 3.2). Same as ``bidirectional_mask``.

    Args:
        key_padding_mask: (B, T) bool, True = padding.

    Returns:
        (B, T, T) bool, True = may attend.
    """
    return bidirectional_mask(key_padding_mask)


def autoregressive_mask(
    num_prefix: int,
    num_words: int,
    spe_targets: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """The auto-regressive attention mask of v1 appendix B (its Fig. 4), used for captioning.

    Sequence layout (T = num_prefix + num_words + P)::

        [ prefix_1 .. prefix_{num_prefix} | x_1 .. x_{num_words} | <SPE>_1 .. <SPE>_P ]

    where the prefix is the leading ``<SPE>`` followed by the image tokens. The j-th trailing ``<SPE>`` predicts
    word ``i = spe_targets[j]`` (1-based) and its output is compared with the vocabulary.

    Who sees whom (True = may attend):
      * prefix tokens see all prefix tokens (bidirectional) and no word or trailing ``<SPE>``: the image
        representation is the same whichever caption follows it;
      * word x_j sees the prefix and x_1..x_j (causal);
      * no word sees a trailing ``<SPE>`` ("the word tokens do not attend to <SPE> tokens");
      * the trailing ``<SPE>`` predicting word i sees the prefix, x_1..x_{i-1} and itself, and no other ``<SPE>``.

    Teacher forcing (training) uses the default ``spe_targets = 1..num_words``: all words predicted in one pass.
    Generation predicts word i from ``[prefix, x_1..x_{i-1}, <SPE>]``, i.e. ``num_words = i - 1`` and
    ``spe_targets = [i]``; since every token sees exactly the same tokens in both layouts, the ``<SPE>`` output
    is identical in training and inference (the alignment v1 appendix B claims; tested in
    ``tests/test_unified_decoder.py``).

    Args:
        num_prefix: number of prefix tokens (leading ``<SPE>`` + image tokens), >= 1.
        num_words: number of word tokens T_w.
        spe_targets: (P,) 1-based index of the word each trailing ``<SPE>`` predicts, each in [1, num_words + 1].
            Default ``1..num_words``.

    Returns:
        (T, T) bool.
    """
    if num_prefix < 1:
        raise ValueError(f"num_prefix: expected >= 1 (at least the leading <SPE>), got {num_prefix}")
    if num_words < 0:
        raise ValueError(f"num_words: expected >= 0, got {num_words}")
    if spe_targets is None:
        targets = torch.arange(1, num_words + 1)
    else:
        targets = torch.as_tensor(spe_targets, dtype=torch.long).reshape(-1)
        if targets.numel() and (targets.min() < 1 or targets.max() > num_words + 1):
            raise ValueError(f"spe_targets: every target word index must be in [1, num_words + 1 = "
                             f"{num_words + 1}], got {targets.tolist()}")
    num_spe = targets.numel()
    T = num_prefix + num_words + num_spe
    words = slice(num_prefix, num_prefix + num_words)
    spes = slice(num_prefix + num_words, T)

    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:, :num_prefix] = True                                   # everyone sees the prefix
    word_index = torch.arange(1, num_words + 1)
    # x_j sees x_1..x_j
    mask[words, words] = word_index[None, :] <= word_index[:, None]
    # the <SPE> predicting word i sees x_1..x_{i-1} and itself
    mask[spes, words] = word_index[None, :] < targets[:, None]
    mask[spes, spes] = torch.eye(num_spe, dtype=torch.bool)
    return mask


def autoregressive_causal_flags(num_prefix: int, num_words: int, num_spe: int) -> torch.Tensor:
    """Which tokens of the ``autoregressive_mask`` layout have a causal attention row (attribute bit 6).

    The words and the trailing ``<SPE>`` tokens see only the past; the prefix (leading ``<SPE>`` and image tokens)
    attends bidirectionally within itself.

    Returns:
        (num_prefix + num_words + num_spe,) bool.
    """
    return torch.cat([torch.zeros(num_prefix, dtype=torch.bool), torch.ones(num_words + num_spe, dtype=torch.bool)])


def combine_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Merge an attention mask and a key-padding mask into one (B, T, T) mask that every query can use.

    Each query is always allowed to attend to itself: a row with no True entry would make the attention softmax
    0/0 = NaN (e.g. a padding query whose attention row allowed only other padding tokens). A padding query's
    output is never used, and letting a real query see itself is always allowed by the masks above, so this
    changes no output that matters.

    Args:
        attn_mask: (T, T) or (B, T, T) bool, True = may attend; None = all True.
        key_padding_mask: (B, T) bool, True = padding; None = no padding.

    Returns:
        (B, T, T) bool (or (1, T, T) when there is no key-padding mask), or None when both inputs are None.
    """
    if attn_mask is None and key_padding_mask is None:
        return None
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool or attn_mask.dim() not in (2, 3) or attn_mask.shape[-1] != attn_mask.shape[-2]:
            raise ValueError(f"attn_mask: expected a (T, T) or (B, T, T) bool tensor (True = may attend), got "
                             f"{attn_mask.dtype} {tuple(attn_mask.shape)}")
        mask = attn_mask if attn_mask.dim() == 3 else attn_mask[None]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.dim() != 2:
            raise ValueError(f"key_padding_mask: expected a (B, T) bool tensor (True = padding), got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        if attn_mask is not None and key_padding_mask.shape[1] != attn_mask.shape[-1]:
            raise ValueError(f"key_padding_mask: length {key_padding_mask.shape[1]} != attn_mask length "
                             f"{attn_mask.shape[-1]}")
        keys = (~key_padding_mask)[:, None, :]
        mask = keys if attn_mask is None else mask & keys
    T = mask.shape[-1]
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    return mask | eye


def to_additive_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean mask (True = may attend) as the additive float mask added to attention scores before softmax.

    Args:
        mask: (..., T_q, T_k) bool.
        dtype: dtype of the result.

    Returns:
        (..., T_q, T_k) of ``dtype``: 0 where the mask is True, -inf where it is False.
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a bool tensor (True = may attend), got {mask.dtype}")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
