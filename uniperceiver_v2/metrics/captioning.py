"""Caption metrics BLEU-1..4 and CIDEr with the COCO caption evaluation code (pycocoevalcap).

The scores come from pycocoevalcap's own `Bleu` and `Cider` scorers, which are pure Python. The official
pipeline first runs the Stanford PTB tokenizer, which needs Java; `ptb_tokenize` replaces it with a Python
tokenizer that gives the same tokens for plain English captions:

* lower-cases;
* splits off the clitics PTB splits ("dog's" -> "dog 's", "don't" -> "do n't", "they're" -> "they 're",
  "cannot" -> "can not");
* keeps hyphenated words ("black-and-white") and numbers with decimal points or thousands separators
  ("3.5", "1,000") as one token;
* drops the punctuation tokens the official pipeline removes after PTB tokenisation
  (. , ? ! : ; - -- ... quotes, apostrophes and brackets), and keeps other symbols ($ % & # / ...)
  as tokens of their own.

Known differences from the Java tokenizer, all rare in captions: abbreviations with periods ("u.s.",
"a.m.") become separate letters; PTB's splits of "gonna" / "wanna" and some leading-apostrophe words
("'em", "'90s") are not reproduced; URLs and e-mail addresses are split at their symbols.

CIDEr here is coco-caption's "CIDEr" (CIDEr-D: clipped n-gram counts, Gaussian length penalty, x10). Its
idf comes from the references of the evaluated set itself, so it needs many images to be meaningful (with
one image every idf is 0 and CIDEr is 0).
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

__all__ = ["caption_metrics", "ptb_tokenize"]

# After tokenisation the official pipeline drops these tokens; PTB turns quotes into `` / '' and brackets
# into -LRB- etc., which are dropped too, so their raw characters are listed here.
_DROPPED = {".", ",", "?", "!", ":", ";", "-", "--", "...", "'", "''", "`", "``", '"', "(", ")", "[", "]", "{", "}"}
_TOKEN = re.compile(
    r"\d+(?:[.,]\d+)+"  # numbers: 3.5, 1,000
    r"|[^\W_]+(?:[-'][^\W_]+)*"  # words, with internal hyphens or apostrophes
    r"|\.\.\.|--"  # multi-character punctuation
    r"|\S"  # any other symbol, one character
)
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")


def ptb_tokenize(caption: str) -> list[str]:
    """Tokens of one caption, as the PTB tokenizer + punctuation removal of coco-caption gives them."""
    tokens: list[str] = []
    for token in _TOKEN.findall(caption.lower()):
        if token in _DROPPED:
            continue
        if token == "cannot":
            tokens += ["can", "not"]
            continue
        clitic = _CLITIC.fullmatch(token)
        if clitic:
            tokens += [clitic.group(1), clitic.group(2)]
        else:
            tokens.append(token)
    return tokens


def caption_metrics(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr of one predicted caption per image against its reference captions.

    Args:
        predictions: image id -> predicted caption (raw text).
        references: image id -> reference captions (raw text, at least one); same ids as `predictions`.

    Returns:
        {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"}: BLEU in [0, 1] (corpus-level, "closest" reference
        length for the brevity penalty, as coco-caption), CIDEr-D in [0, 10]; the paper reports both x100.
    """
    missing = [image_id for image_id in references if image_id not in predictions]
    if missing:
        raise ValueError(f"no predicted caption for image {missing[0]!r} ({len(missing)} images missing)")
    extra = [image_id for image_id in predictions if image_id not in references]
    if extra:
        raise ValueError(f"predicted caption for image {extra[0]!r}, which has no reference captions")
    if not references:
        raise ValueError("caption_metrics: no images")
    gts: dict[Hashable, list[str]] = {}
    res: dict[Hashable, list[str]] = {}
    for image_id, captions in references.items():
        if isinstance(captions, str) or not captions:
            raise ValueError(f"image {image_id!r}: references must be a non-empty list of captions")
        gts[image_id] = [" ".join(ptb_tokenize(c)) for c in captions]
        res[image_id] = [" ".join(ptb_tokenize(predictions[image_id]))]

    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}, "CIDEr": float(cider)}
