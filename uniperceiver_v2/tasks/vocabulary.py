"""The vocabulary of the language-modelling tasks (captioning, MLM) and the sharded encoding of candidate targets.

In captioning and masked language modelling the candidate set Y is the vocabulary: every word is its own target
sequence ``[<SPE>, word]``, encoded by the text encoder and the decoder like any input (v1 Sec. 3.2), and its
``<SPE>`` output is compared with the ``<SPE>`` that stands in for the word to predict.

Which words. The text encoder's tokenizer has ~30k (WordPiece) to ~50k (BPE) tokens. Encoding all of them through
the text encoder and the decoder at every training step is what the paper does on 32-64 GPUs (each GPU encodes
a shard, see below), and is far too slow for the CPU ``tiny`` run. So the task vocabulary is a list of token ids:

* ``build_vocabulary(tokenizer, texts)``: the tokens that occur in the training captions and corpus, plus the
  end-of-sequence token that stops a caption. A word outside it can be neither generated nor scored; in MLM a
  masked token outside it is left out of the loss and counts as a miss in the accuracy. For the synthetic suite
  this is a few hundred tokens.
* ``full_vocabulary(tokenizer)``: every token except the special and the reserved (``[unused*]``) ones, the
  paper's choice, for runs that can afford it.

The list is stored in the model as the buffer ``UniPerceiverV2.vocabulary``, so it is saved with the weights and
inference uses exactly the list the model was trained with. Its embeddings are computed once per training step
(``UniPerceiverV2.vocabulary_embeddings``) and cached at evaluation.

Sharding (v1 appendix E, "Data Parallel for Vocabulary and Class Labels"): when torch.distributed is initialised,
rank r encodes only the r-th contiguous shard of the candidates and an autograd-aware all-gather
(``engine.distributed.all_gather_with_grad``) re-assembles the full (|Y|, d) matrix on every rank, in the original
order; the gradient of each rank's loss flows back to the rank that encoded each shard. This needs every rank to
run the same task in the same iteration, i.e. unmixed sampling (``run.sampling="unmixed"``); with mixed
sampling each rank encodes the whole candidate set itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import torch

from uniperceiver_v2.engine.distributed import all_gather_with_grad, get_rank, get_world_size, is_distributed
from uniperceiver_v2.tasks.losses import IGNORE_INDEX

__all__ = [
    "build_vocabulary",
    "encode_sharded",
    "end_token_id",
    "full_vocabulary",
    "start_token_id",
    "vocabulary_lookup",
]

# Batch of texts tokenised at once while counting tokens (bounded memory for a large corpus).
_TOKENIZE_CHUNK = 1024


def start_token_id(tokenizer) -> int:
    """The token that opens every tokenised sequence: [CLS] (BERT) or <s> (RoBERTa)."""
    token = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    if token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a [CLS] nor a start-of-sequence token")
    return int(token)


def end_token_id(tokenizer) -> int:
    """The token that ends a sequence and stops caption generation: [SEP] (BERT) or </s> (RoBERTa)."""
    token = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a [SEP] nor an end-of-sequence token")
    return int(token)


def build_vocabulary(tokenizer, texts: Iterable[str], min_count: int = 1) -> torch.Tensor:
    """The token ids that occur at least ``min_count`` times in ``texts``, plus the end token.

    Args:
        tokenizer: a transformers tokenizer (``TextEncoder.tokenizer``).
        texts: training captions and corpus sentences.
        min_count: drop rarer tokens (1 keeps every token seen).

    Returns:
        (V,) long, sorted ascending, without special tokens except the end token.
    """
    if min_count < 1:
        raise ValueError(f"build_vocabulary: min_count must be >= 1, got {min_count}")
    special = set(tokenizer.all_special_ids)
    counts: Counter[int] = Counter()
    chunk: list[str] = []

    def count(chunk: list[str]) -> None:
        for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            counts.update(ids)

    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"build_vocabulary: expected strings, got {type(text).__name__}")
        chunk.append(text)
        if len(chunk) == _TOKENIZE_CHUNK:
            count(chunk)
            chunk = []
    if chunk:
        count(chunk)
    ids = {token for token, n in counts.items() if n >= min_count and token not in special}
    if not ids:
        raise ValueError("build_vocabulary: the texts contain no (non-special) token")
    ids.add(end_token_id(tokenizer))
    return torch.tensor(sorted(ids), dtype=torch.long)


def full_vocabulary(tokenizer) -> torch.Tensor:
    """Every token id of the tokenizer except special and reserved ones, plus the end token.

    Reserved tokens are BERT's ``[unused0]``..``[unused993]`` and RoBERTa's ``madeupword`` fillers: they never occur
    in tokenised text. Returns (V,) long, sorted.
    """
    special = set(tokenizer.all_special_ids)
    ids = [index for token, index in tokenizer.get_vocab().items()
           if index not in special and not token.startswith("[unused") and not token.startswith("madeupword")]
    ids.append(end_token_id(tokenizer))
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


def vocabulary_lookup(vocabulary: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Token id -> index into ``vocabulary``, ``IGNORE_INDEX`` for tokens outside it.

    Args:
        vocabulary: (V,) long token ids.
        num_tokens: size of the tokenizer's id space (``len(tokenizer)``).

    Returns:
        (num_tokens,) long.
    """
    if vocabulary.numel() and int(vocabulary.max()) >= num_tokens:
        raise ValueError(f"vocabulary: token id {int(vocabulary.max())} >= the tokenizer's {num_tokens} ids; the "
                         f"vocabulary was built with another tokenizer")
    lookup = torch.full((num_tokens,), IGNORE_INDEX, dtype=torch.long, device=vocabulary.device)
    lookup[vocabulary] = torch.arange(vocabulary.numel(), device=vocabulary.device)
    return lookup


def encode_sharded(encode: Callable[[torch.Tensor], torch.Tensor], num: int, shard: bool,
                   width: int, reference: torch.Tensor) -> torch.Tensor:
    """Encode ``num`` candidate targets, split across ranks when ``shard`` and torch.distributed is initialised.

    Args:
        encode: indices (n,) long -> (n, width) embeddings of those candidates (n >= 1).
        num: number of candidates |Y|.
        shard: allow sharding (only when every rank runs this same call: unmixed sampling).
        width: embedding width (for an empty shard when |Y| < world size).
        reference: any tensor on the target device / dtype (for that empty shard).

    Returns:
        (num, width), row i the embedding of candidate i, on every rank; differentiable with respect to the
        local shard (``all_gather_with_grad``).
    """
    indices = torch.arange(num, device=reference.device)
    if not (shard and is_distributed() and get_world_size() > 1):
        return encode(indices)
    local = torch.tensor_split(indices, get_world_size())[get_rank()]
    embeddings = encode(local) if local.numel() else reference.new_zeros(0, width)
    return all_gather_with_grad(embeddings)
