"""``bench words``: the choice among an attribute's values, checked on hand-made distributions and a hand recount of
a tiny model's teacher-forced probabilities."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import tiny_config, tiny_model

from uniperceiver_v2.bench import words
from uniperceiver_v2.tasks.losses import IGNORE_INDEX

# a vocabulary of 6 tokens: 0 "red", 1 "crimson" (also red), 2 "blue", 3 "a", 4 "circle", 5 "."
COLOURS = words.AttributeWords(values=["red", "blue"], token_value={0: 0, 1: 0, 2: 1})


def test_values_sum_over_their_tokens_and_other_positions_are_ignored():
    probabilities = torch.tensor([
        [0.30, 0.30, 0.40, 0.00, 0.00, 0.00],   # reference "red":     P(red) = 0.6 > P(blue) = 0.4 -> right
        [0.20, 0.00, 0.30, 0.50, 0.00, 0.00],   # reference "crimson": P(red) = 0.2 < 0.3          -> wrong, red->blue
        [0.10, 0.10, 0.00, 0.80, 0.00, 0.00],   # reference "blue":    P(blue) = 0 < 0.2            -> wrong, blue->red
        [0.50, 0.50, 0.00, 0.00, 0.00, 0.00],   # reference "a": no colour, ignored
        [0.50, 0.50, 0.00, 0.00, 0.00, 0.00],   # padding, ignored
    ])
    targets = torch.tensor([0, 1, 2, 3, IGNORE_INDEX])
    result = words.attribute_choices(probabilities, targets, COLOURS)
    assert result["positions"] == 3 and result["right"] == 1
    assert result["counts"] == [2, 1]
    assert result["confusions"] == {("red", "blue"): 1, ("blue", "red"): 1}
    assert result["mass"] == pytest.approx(1.0 + 0.5 + 0.2)
    assert result["share"] == pytest.approx(0.6 / 1.0 + 0.2 / 0.5 + 0.0 / 0.2)


def test_target_cosine_averages_over_pairs_of_different_values_only():
    targets = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [5.0, 5.0], [1.0, 1.0], [0.0, 1.0]])
    # red = tokens 0 and 1 (the same direction: their cosine of 1 is a pair of one value and does not count)
    assert words.target_cosine(targets, COLOURS) == pytest.approx(0.0, abs=1e-12)
    blue_diagonal = words.AttributeWords(values=["red", "blue"], token_value={0: 0, 1: 0, 3: 1})
    assert words.target_cosine(targets, blue_diagonal) == pytest.approx(2 ** -0.5)
    one_value = words.AttributeWords(values=["red", "blue"], token_value={0: 0, 1: 0})
    assert math.isnan(words.target_cosine(targets, one_value))


def test_in_image_counts_the_chosen_and_the_reference_values_found_in_the_image():
    probabilities = torch.tensor([
        [0.60, 0.00, 0.40, 0.00, 0.00, 0.00],   # reference red, chooses red; the image has blue only
        [0.00, 0.00, 0.90, 0.10, 0.00, 0.00],   # reference red, chooses blue; the image has red and blue
        [0.00, 0.00, 0.00, 1.00, 0.00, 0.00],   # no colour here: ignored whatever the image has
        [0.70, 0.00, 0.30, 0.00, 0.00, 0.00],   # reference blue, chooses red; the image has blue only
    ])
    targets = torch.tensor([0, 1, 3, 2])
    present = torch.tensor([[False, True], [True, True], [True, True], [False, True]])
    result = words.attribute_choices(probabilities, targets, COLOURS, present)
    assert result["positions"] == 3 and result["right"] == 1
    assert result["in_image"] == 1                  # only the second choice (blue) is in its image
    assert result["reference_in_image"] == 2        # the first reference (red) is not in its image
    assert result["present_counts"] == [1, 3]
    with pytest.raises(ValueError, match="present must be"):
        words.attribute_choices(probabilities, targets, COLOURS, present[:, :1])


def test_image_values_reads_colour_size_and_shape_and_names_a_bad_annotation(tmp_path):
    from uniperceiver_v2.data.summary import DataError

    data = {"images": [{"id": 1}, {"id": 2}],
            "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "digit two"}],
            "annotations": [
                {"id": 10, "image_id": 1, "category_id": 1, "attributes": {"colour": "red", "size": "small"}},
                {"id": 11, "image_id": 1, "category_id": 2, "attributes": {"colour": "blue", "size": "large"}}]}
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(data))
    values = words.image_values(path)
    assert values[1] == {"colour": {"red", "blue"}, "size": {"small", "large"}, "shape": {"circle"}}
    assert values[2] == {"colour": set(), "size": set(), "shape": set()}
    del data["annotations"][1]["attributes"]["size"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"instances_val.json.*id=11.*attributes.size"):
        words.image_values(path)
    data["annotations"][1]["image_id"] = 7
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown image 7"):
        words.image_values(path)


def test_a_token_shared_by_two_values_is_dropped(tokenizer_and_vocabulary):
    tokenizer, vocabulary = tokenizer_and_vocabulary
    mapped = words.attribute_words(tokenizer, vocabulary, {"red": ["red", "dark"], "black": ["black", "dark"]})
    red, black, dark = (vocabulary.tolist().index(tokenizer(w, add_special_tokens=False)["input_ids"][0])
                        for w in ("red", "black", "dark"))
    assert mapped.token_value == {red: 0, black: 1}
    assert len(mapped.dropped) == 2 and all("shared" in reason for reason in mapped.dropped)
    absent = words.attribute_words(tokenizer, vocabulary, {"x": ["xylophone"]})
    assert absent.token_value == {} and "not in the vocabulary" in absent.dropped[0]


def test_a_word_whose_first_token_is_a_number_word_is_dropped(tokenizer_and_vocabulary):
    """"five-pointed star" starts with the token "five", which a reference uses far more often as the number."""
    tokenizer, vocabulary = tokenizer_and_vocabulary
    mapped = words.attribute_words(tokenizer, vocabulary, {"star": ["star", "five-pointed star"], "circle": ["circle"]})
    star, five = (vocabulary.tolist().index(tokenizer(w, add_special_tokens=False)["input_ids"][0])
                  for w in ("star", "five"))
    assert mapped.token_value[star] == 0 and five not in mapped.token_value
    assert mapped.dropped == ["'five-pointed star' (first token 'five' is also a word of its own)"]
    kept = words.attribute_words(tokenizer, vocabulary, {"star": ["five-pointed star"]}, other_words=set())
    assert kept.token_value == {five: 0}


@pytest.fixture(scope="module")
def tokenizer_and_vocabulary():
    model = tiny_model(tiny_config())
    tokenizer = model.text_encoder.tokenizer
    ids = sorted({i for w in ("red", "black", "dark", "a", "circle", "star", "five") for i in
                  tokenizer(w, add_special_tokens=False)["input_ids"]})
    return tokenizer, torch.tensor(ids)


@pytest.fixture(scope="module")
def model_and_config(quick_suite_model):
    return quick_suite_model


def _colour_choices_by_hand(model, task, batch, colour):
    """[(reference value, chosen value, image id)] at every colour position of one batch, recounted from the task's
    teacher-forced logits word by word (the slow path the benchmark is checked against)."""
    with torch.no_grad():
        image = model.encode_images(batch.images, batch.padding_mask)
        tokens = model.tokenize(batch.captions)
        logits, targets, _ = task.teacher_forced_logits(model, image, batch.caption_image_index,
                                                        tokens["input_ids"], tokens["attention_mask"])
    probabilities = logits.softmax(-1)
    choices = []
    for n, t in zip(*torch.nonzero(targets >= 0, as_tuple=True)):
        value = colour.token_value.get(int(targets[n, t]))
        if value is None:
            continue
        sums = [sum(float(probabilities[n, t, k]) for k, v in colour.token_value.items() if v == j)
                for j in range(len(colour.values))]
        picked = max(range(len(sums)), key=sums.__getitem__)
        choices.append((value, picked, batch.image_ids[int(batch.caption_image_index[n])]))
    return choices


def _captioning_val(model, cfg):
    from uniperceiver_v2.engine.data_setup import build_task_dataset
    from uniperceiver_v2.tasks import TASKS

    dataset = build_task_dataset(cfg, "captioning", "val", train=False)
    colour = words.attribute_words(model.text_encoder.tokenizer, model.vocabulary, attribute="colour")
    return dataset, TASKS["captioning"].from_dataset(cfg.tasks.captioning, dataset), colour


def test_word_grounding_recounts_the_teacher_forced_probabilities(model_and_config):
    """The totals over a split equal a direct recount from the task's own logits, image by image."""
    model, cfg = model_and_config
    result = words.word_grounding(model, cfg, "val", images=3, batch_size=2)
    dataset, task, colour = _captioning_val(model, cfg)
    choices = [c for i in range(3) for c in _colour_choices_by_hand(model, task, task.collate([dataset[i]]), colour)]
    positions, right = len(choices), sum(value == picked for value, picked, _ in choices)
    assert result["captions"] == 15 and result["colour"]["positions"] == positions > 0
    assert result["colour"]["right"] == right
    assert result["colour"]["chance"] == pytest.approx(1 / 10)
    assert sum(result["colour"]["counts"]) == positions
    assert 0 < result["colour"]["majority"] <= 1 and 0 <= result["colour"]["mass"] <= 1
    model.eval()
    expected = words.target_cosine(model.vocabulary_embeddings("captioning"), colour)
    assert result["colour"]["target_cosine"] == pytest.approx(expected)


def test_in_image_rates_recount_from_the_annotations(model_and_config):
    """On the synthetic suite the in-image rates equal a recount of the chosen values against the instances file;
    every reference colour is one of its image's objects."""
    from uniperceiver_v2.data.suite import SyntheticSuite

    model, cfg = model_and_config
    result = words.word_grounding(model, cfg, "val", images=3, batch_size=3)
    values = words.image_values(SyntheticSuite(cfg.data.root).instances_file("val"))
    dataset, task, colour = _captioning_val(model, cfg)
    choices = _colour_choices_by_hand(model, task, task.collate([dataset[i] for i in range(3)]), colour)
    chosen_in_image = sum(colour.values[picked] in values[image_id]["colour"] for _, picked, image_id in choices)
    assert result["colour"]["positions"] == len(choices) > 0
    assert result["colour"]["in_image"] == pytest.approx(chosen_in_image / len(choices))
    assert result["colour"]["reference_in_image"] == 1.0
    assert 0 < result["colour"]["in_image_majority"] <= 1


def test_main_prints_the_table_and_writes_json(model_and_config, monkeypatch, capsys, tmp_path):
    model, cfg = model_and_config
    from uniperceiver_v2 import bench

    monkeypatch.setattr(bench, "model_of_checkpoint", lambda checkpoint, overrides: (model, cfg))
    out = tmp_path / "words.json"
    assert words.main(["--checkpoint", "unused", "--split", "val", "--images", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| colour (10 values) |" in printed and "| size (3 values) |" in printed
    assert "chosen value in the image" in printed and "cosine between the values' targets" in printed
    assert "chosen value in the image" in printed and "references' own values found in the image" in printed
    saved = json.loads(out.read_text())
    assert saved["images"] == 2 and set(words.ATTRIBUTES) <= set(saved)


def test_word_classes_take_the_grammar_words_by_their_first_token(tokenizer_and_vocabulary):
    tokenizer, _ = tokenizer_and_vocabulary
    classes = words.word_classes(tokenizer)
    first = {w: tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in
             ("red", "turquoise", "large", "circle", "stars", "three", "five", "the", "corner")}
    assert [classes.get(first[w], "other") for w in first] == [
        "colour", "colour", "size", "shape", "shape", "number", "number", "other", "other"]


def test_mlm_by_word_class_counts_the_evaluations_positions_by_the_masked_words_class(model_and_config, monkeypatch):
    from uniperceiver_v2.bench.ceiling import mlm_context_counts
    from uniperceiver_v2.engine.evaluation import evaluate_task
    from uniperceiver_v2.tasks.mlm import MaskedLanguageModelingTask as MLMTask

    model, cfg = model_and_config
    plain = words.mlm_by_word_class(model, cfg, "val")
    assert plain["all"]["model"] == pytest.approx(evaluate_task(model, cfg, "mlm", "val")["accuracy"])
    reference = mlm_context_counts(cfg, "val")
    assert plain["all"]["positions"] == reference["masked"]
    assert plain["all"]["context_counts"] == pytest.approx(reference["accuracy"])
    assert sum(row["positions"] for name, row in plain.items() if name != "all") == reference["masked"]
    assert {"colour", "shape", "other"} <= set(plain) and set(plain) <= {*words.WORD_CLASSES, "all"}
    # A model right on exactly the colour words: 1 there, 0 elsewhere, whatever the network.
    colour = torch.tensor(sorted(t for t, name in words.word_classes(model.text_encoder.tokenizer).items()
                                 if name == "colour"))
    predict = MLMTask.predict

    def right_on_colours(self, model, batch):
        out = predict(self, model, batch)
        on_colour = torch.isin(out["target"], colour)
        return {**out, "predicted": torch.where(on_colour, out["target"], torch.full_like(out["target"], -1))}

    monkeypatch.setattr(MLMTask, "predict", right_on_colours)
    oracle = words.mlm_by_word_class(model, cfg, "val")
    assert oracle["colour"]["model"] == 1.0
    assert all(row["model"] == 0.0 for name, row in oracle.items() if name not in ("colour", "all"))
    assert oracle["all"]["model"] == pytest.approx(oracle["colour"]["share"])
    assert oracle["colour"]["context_counts"] == plain["colour"]["context_counts"]


def test_main_mlm_prints_the_class_table(model_and_config, monkeypatch, capsys, tmp_path):
    model, cfg = model_and_config
    from uniperceiver_v2 import bench

    monkeypatch.setattr(bench, "model_of_checkpoint", lambda checkpoint, overrides: (model, cfg))
    out = tmp_path / "mlm.json"
    assert words.main(["--mlm", "--checkpoint", "unused", "--split", "val", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| masked word | positions | share | model | context counts |" in printed and "| colour |" in printed
    assert json.loads(out.read_text())["all"]["share"] == 1.0
