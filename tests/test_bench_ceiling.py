"""The data ceiling benchmark: claims parsed from grammar captions, the attribute oracle's scores, the retrieval
and captioning numbers it reports and the masked-language-modelling context-count predictor
(`python -m uniperceiver_v2.bench ceiling`)."""

import io
import json
import math

import numpy as np
import pytest
import torch

from uniperceiver_v2.bench import available_benchmarks, ceiling
from uniperceiver_v2.bench.ceiling import (
    MASKED,
    Claim,
    ContextCounts,
    SceneAttributes,
    parse_claims,
    score_masked,
    score_matrix,
    tie_broken,
)
from uniperceiver_v2.data.summary import DataError
from uniperceiver_v2.metrics.retrieval import retrieval_recall


@pytest.fixture(scope="module")
def quick_result(synthetic_root):
    return ceiling.ceilings(synthetic_root, "test")


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_noun_phrases_with_counts_sizes_synonyms_and_background():
    assert parse_claims("Two small red triangles left of a violet disc on a background of stripes.") == [
        Claim("triangle", "red", "small", 2), Claim("circle", "purple"), Claim(background="stripes")]
    assert parse_claims("Five objects on a noisy texture, including a big turquoise plus sign.") == [
        Claim(count=5), Claim(background="noise"), Claim("cross", "cyan", "large")]
    assert parse_claims("Two red items and one blue item.") == [Claim(colour="red", count=2),
                                                                Claim(colour="blue", count=1)]


def test_parse_digits_multiword_nouns_and_uninformative_phrases():
    # "one" / "three" are number words and digit names; the digit nouns always carry their prefix.
    assert parse_claims("Two handwritten threes above the number one.") == [
        Claim("digit three", count=2), Claim("digit one")]
    assert parse_claims("A single tiny green square tile on a checkerboard pattern.") == [
        Claim("square", "green", "small", 1), Claim(background="checker")]
    # "the largest object" constrains nothing and is dropped; positions are not claims.
    assert parse_claims("The largest object is a medium-sized black five-pointed star.") == [
        Claim("star", "black", "medium")]
    assert parse_claims("In the top left corner there is a hexagon.") == [Claim("hexagon")]


# ------------------------------------------------------------------------------------------------ scoring
RED_TRIANGLES = SceneAttributes([("triangle", "red", "small"), ("triangle", "red", "small"),
                                 ("circle", "purple", "large")], "stripes")
BLUE_TRIANGLE = SceneAttributes([("triangle", "blue", "small"), ("circle", "purple", "large")], "stripes")
MIXED = SceneAttributes([("triangle", "red", "small"), ("triangle", "red", "large"), ("star", "yellow", "small")],
                        "noise")


def test_claims_hold_by_attributes_and_exact_counts():
    assert RED_TRIANGLES.holds(Claim("triangle", "red", "small", 2))
    assert not RED_TRIANGLES.holds(Claim("triangle", "red", count=3))
    assert not MIXED.holds(Claim("triangle", "red", "small", 2))  # two red triangles, but not both small
    assert MIXED.holds(Claim("triangle", "red", count=2)) and MIXED.holds(Claim("triangle", "red", "large"))
    assert RED_TRIANGLES.holds(Claim(count=3)) and not MIXED.holds(Claim(colour="red", count=1))
    assert RED_TRIANGLES.holds(Claim(background="stripes")) and not MIXED.holds(Claim(background="stripes"))
    assert not BLUE_TRIANGLE.holds(Claim("triangle", "red"))


def test_score_counts_claims_that_hold_and_the_true_caption_wins():
    captions = ["Two small red triangles next to a big violet disc on stripes.",  # 3 claims, all in image 0
                "A blue triangle next to a purple circle on stripes.",  # all in image 1; image 0 has no blue one
                "A yellow star."]
    scores = score_matrix([RED_TRIANGLES, BLUE_TRIANGLE, MIXED], captions)
    assert scores.tolist() == [[3, 2, 0],
                               [2, 3, 0],
                               [0, 0, 1]]
    # Each caption scores its own image highest; the caption about another colour does not pick image 0.
    assert scores.argmax(axis=0).tolist() == [0, 1, 2]


def test_retrieval_numbers_are_retrieval_recall_of_the_tie_broken_scores():
    captions = ["A red triangle.", "A purple circle on stripes.", "A yellow star.", "A small triangle."]
    scenes = [RED_TRIANGLES, BLUE_TRIANGLE, MIXED]
    text_to_image = [0, 1, 2, 2]
    scores = score_matrix(scenes, captions)
    assert scores.tolist() == [[1, 2, 0, 1], [0, 2, 0, 1], [1, 0, 1, 1]]
    broken = tie_broken(scores, seed=0)
    assert np.array_equal(np.floor(broken), scores)  # the jitter only orders ties
    recall = retrieval_recall(torch.from_numpy(broken), text_to_image, (1, 2))
    # Ties: caption 0 (image 0) with image 2, caption 1 (image 1) with image 0, caption 3 (image 2) with all.
    ranks = (broken >= broken[text_to_image, range(4)]).sum(axis=0) - 1
    assert recall["t2i_R@1"] == pytest.approx(np.mean(ranks == 0))
    assert recall["t2i_R@2"] == pytest.approx(np.mean(ranks < 2))
    # With every tie counted against the right answer only caption 2 ("a yellow star") finds its image.
    pessimistic = retrieval_recall(torch.from_numpy(scores.astype(float)), text_to_image, (1,))
    assert pessimistic["t2i_R@1"] == pytest.approx(0.25)


def test_tie_break_does_not_favour_the_right_answer():
    # All scores equal: the random order must give about chance, not the diagonal.
    recall = retrieval_recall(torch.from_numpy(tie_broken(np.zeros((200, 200), dtype=np.int64))), range(200), (10,))
    assert 0.01 < recall["t2i_R@10"] < 0.15 and 0.01 < recall["i2t_R@10"] < 0.15


def test_chance_recall():
    chance = ceiling.chance_recall([0, 1, 2, 3], 4, ks=(1, 2))
    assert chance == pytest.approx({"i2t_R@1": 0.25, "i2t_R@2": 0.5, "t2i_R@1": 0.25, "t2i_R@2": 0.5})
    chance = ceiling.chance_recall([0, 0, 1, 1], 2, ks=(1,))  # two of four captions are right
    assert chance["i2t_R@1"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ masked words
SPECIAL = ("[CLS]", "[SEP]")


def _sentences(*texts):
    return [text.split() for text in texts]


def _mask_each_word(sentence):
    """One copy of ``sentence`` per word, that word masked (never [CLS] / [SEP])."""
    return [[j == i for j in range(len(sentence))] for i in range(1, len(sentence) - 1)]


def test_context_count_predictor_is_exact_where_the_context_determines_the_word():
    train = _sentences("[CLS] a red circle on stripes [SEP]", "[CLS] a blue square on dots [SEP]",
                       "[CLS] one green star [SEP]") * 3
    counts = ContextCounts(train, SPECIAL)
    sequences = [sentence for sentence in train[:3] for _ in range(len(sentence) - 2)]
    masked = [flags for sentence in train[:3] for flags in _mask_each_word(sentence)]
    result = score_masked(counts, sequences, masked)
    assert result["accuracy"] == 1.0 and result["masked"] == 5 + 5 + 3
    assert result["backoff"] == {"l2 l1 _ r1 r2": 13, "l1 _ r1": 0, "l1 _": 0, "_ r1": 0, "most frequent": 0}


def test_context_count_predictor_majority_ties_and_backoff():
    train = _sentences(*["[CLS] x green y [SEP]"] * 3, "[CLS] x pink y [SEP]",
                       "[CLS] p teal q [SEP]", "[CLS] p gold q [SEP]", "[CLS] gold [SEP]", "[CLS] y [SEP]")
    counts = ContextCounts(train, SPECIAL)
    assert counts.overall["y"] == 5 and "[CLS]" not in counts.overall and counts.most_frequent == "y"
    # x _ y: green 3 times, pink once -> green; p _ q: teal and gold once each -> gold, twice in the whole corpus
    # (teal was seen first: the tie is not broken by order).
    assert counts.predict("[CLS] x ? y [SEP]".split(), 2) == ("green", "l2 l1 _ r1 r2")
    assert counts.predict("[CLS] p ? q [SEP]".split(), 2) == ("gold", "l2 l1 _ r1 r2")
    # Unseen contexts back off: (l1, r1), then (l1,), then (r1,).
    assert counts.predict("[CLS] w x ? y [SEP]".split(), 3) == ("green", "l1 _ r1")
    assert counts.predict("[CLS] p ? y [SEP]".split(), 2) == ("gold", "l1 _")
    assert counts.predict("[CLS] k ? q [SEP]".split(), 2) == ("gold", "_ r1")
    # A masked neighbour matches no training context: green with y masked backs off to (x _); y with green masked
    # to (_ [SEP]); green between two masked words to the most frequent token.
    assert counts.predict(["[CLS]", "x", MASKED, MASKED, "[SEP]"], 2) == ("green", "l1 _")
    assert counts.predict(["[CLS]", "x", MASKED, MASKED, "[SEP]"], 3) == ("y", "_ r1")
    assert counts.predict(["[CLS]", MASKED, MASKED, MASKED, "[SEP]"], 2) == ("y", "most frequent")
    # score_masked reads the masked flags as MASKED and counts every level.
    sequences = _sentences("[CLS] x green y [SEP]", "[CLS] x pink y [SEP]", "[CLS] x green y [SEP]",
                           "[CLS] x green y [SEP]")
    masked = [[False, False, True, False, False], [False, False, True, False, False],
              [False, False, True, True, False], [False, True, True, True, False]]
    result = score_masked(counts, sequences, masked)
    # Predicted: green; green (pink masked: wrong); green (x _), y (_ [SEP]); x ([CLS] _), y (most frequent: wrong,
    # green), y (_ [SEP]) -> 5 of 7 right.
    assert result["masked"] == 7 and result["accuracy"] == pytest.approx(5 / 7)
    assert result["backoff"] == {"l2 l1 _ r1 r2": 2, "l1 _ r1": 0, "l1 _": 2, "_ r1": 2, "most frequent": 1}


# ------------------------------------------------------------------------------------------------ quick suite
def test_quick_suite_retrieval_ordering_and_parser_check(synthetic_root, quick_result):
    result = quick_result
    assert result["num_images"] == 20 and result["num_texts"] == 100
    assert result["claims_hold_own"] == 1.0  # the parser reads every caption as true of its own image
    for key in ("retrieval_oracle", "retrieval_oracle_ties_against", "retrieval_oracle_held_minus_failed"):
        for d in ("i2t", "t2i"):
            r = result[key]
            assert r[f"{d}_R@10"] >= r[f"{d}_R@5"] >= r[f"{d}_R@1"] >= result["chance"][f"{d}_R@1"]
        assert all(result[key][name] >= result["retrieval_oracle_ties_against"][name] for name in result[key])
    # The reported matrix: recomputed here from the annotation files.
    data = ceiling.read_split(synthetic_root, "test")
    texts = [c for captions in data.captions for c in captions]
    text_to_image = [i for i, captions in enumerate(data.captions) for _ in captions]
    scores = score_matrix(data.scenes, texts)
    assert result["retrieval_oracle"] == retrieval_recall(torch.from_numpy(tie_broken(scores)), text_to_image)


def test_quick_suite_captioning_numbers(synthetic_root, quick_result):
    for key in ("captioning_reference_agreement", "captioning_grammar_caption"):
        metrics = quick_result[key]
        assert set(metrics) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "CIDEr"}
        assert all(math.isfinite(v) for v in metrics.values())
        assert all(0.0 <= metrics[f"BLEU-{n}"] <= 1.0 for n in range(1, 5))
        assert metrics["BLEU-1"] >= metrics["BLEU-4"] and metrics["CIDEr"] > 0
    # The grammar's captions of the rebuilt scenes are true of the image, as the references are.
    data = ceiling.read_split(synthetic_root, "test")
    for scene, caption in zip(data.scenes, ceiling.grammar_captions(data).values()):
        assert all(scene.holds(claim) for claim in parse_claims(caption)), caption


def test_quick_suite_mlm_context_counts_mask_as_the_evaluation_does(synthetic_root, quick_result):
    from uniperceiver_v2.config import get_preset, load_config
    from uniperceiver_v2.modeling.text_encoder import TextEncoder
    from uniperceiver_v2.tasks.mlm import EVAL_MASK_SEED, choose_masked_positions, sentence_draws

    result = ceiling.mlm_context_counts(synthetic_root, "val")
    assert 0.0 < result["accuracy"] < 1.0
    assert sum(result["backoff"].values()) == result["masked"] and set(result["backoff"]) == set(
        ceiling.BACKOFF_LEVELS)
    assert result["corpus"] == str(synthetic_root / "text" / "corpus_val.txt") and result["corpus_split"] == "val"
    assert result["train_corpus"] == str(synthetic_root / "text" / "corpus_train.txt")
    # The suite has no test corpus: the test split is scored on the val one.
    assert not (synthetic_root / "text" / "corpus_test.txt").exists()
    assert quick_result["mlm_context_counts"] == result
    # Recounted with the model's own tokenize (the whole corpus in one batch, padded otherwise than in the chunks).
    lines = (synthetic_root / "text" / "corpus_val.txt").read_text().splitlines()
    texts = [line.strip() for line in lines if line.strip()]
    tiny = get_preset("tiny")
    encoder = TextEncoder(tiny.text_encoder)

    def recount(mask_prob):
        tokens = encoder.tokenize(texts)
        draws = sentence_draws(texts, tokens["input_ids"].shape[1], EVAL_MASK_SEED)
        return int(choose_masked_positions(tokens["input_ids"], tokens["attention_mask"], encoder.special_token_ids,
                                           mask_prob, draws=draws).sum())

    assert result["masked"] == recount(tiny.tasks.mlm.mask_prob)
    # A Config's own MLM settings are used.
    cfg = load_config("tiny", [f"data.root={synthetic_root}", "tasks.mlm.mask_prob=0.4"])
    assert ceiling.mlm_context_counts(cfg, "val")["masked"] == recount(0.4) > result["masked"]
    # mlm=False leaves it out, and the table then has no MLM block.
    without = ceiling.ceilings(synthetic_root, "test", grammar_draws=1, mlm=False)
    assert "mlm_context_counts" not in without
    printed = io.StringIO()
    ceiling.print_table(without, out=printed)
    assert "masked language modelling" not in printed.getvalue()


def test_cli_prints_the_table_and_a_model_next_to_it(synthetic_root, tmp_path, capsys):
    assert "ceiling" in available_benchmarks()
    results = tmp_path / "eval.json"
    results.write_text(json.dumps({"results": {"retrieval": {"i2t_R@1": 0.123, "t2i_R@1": 0.0456},
                                               "captioning": {"BLEU-4": 0.0789, "CIDEr": 0.321},
                                               "mlm": {"accuracy": 0.4321}}}))
    out = tmp_path / "ceiling.json"
    assert ceiling.main(["--split", "test", "--results", str(results), "--json", str(out),
                         f"data.root={synthetic_root}"]) == 0
    printed = capsys.readouterr().out
    assert "attribute oracle" in printed and "0.123" in printed and "0.079" in printed
    written = json.loads(out.read_text())
    assert written["num_texts"] == 100
    # The MLM block: the predictor's row (on the val corpus, said so) and the model's accuracy under it.
    lines = printed.splitlines()
    row = next(line for line in lines if line.startswith("context-count predictor"))
    assert float(row.split()[-1]) == pytest.approx(written["mlm_context_counts"]["accuracy"], abs=5e-4)
    assert lines[lines.index(row) + 1].split() == ["model", "0.432"]
    assert "no test corpus: the val one instead" in printed


def test_annotations_without_attributes_are_an_error(tmp_path):
    (tmp_path / "annotations").mkdir()
    image = {"id": 1, "file_name": "1.png", "height": 8, "width": 8}
    (tmp_path / "annotations" / "captions_test.json").write_text(json.dumps(
        {"images": [image], "annotations": [{"id": 1, "image_id": 1, "caption": "A red circle."}]}))
    (tmp_path / "annotations" / "instances_test.json").write_text(json.dumps(
        {"images": [image], "categories": [{"id": 1, "name": "circle"}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}]}))
    with pytest.raises(DataError, match="attributes"):
        ceiling.ceilings(tmp_path, "test")
