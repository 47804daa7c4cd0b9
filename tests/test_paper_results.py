"""The paper's numbers (Tab. 2-6) against two sources: reference values typed in here, and a text transcript of
the paper itself (parsed from ``000_*.txt`` in ``PAPERS`` when it is there); plus the table builders."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from uniperceiver_v2.walkthrough import paper_results as P

PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"

# Reference values of Tab. 2 and Tab. 4: det mAP / IN-1k acc / I2T R@1, T2I R@1 / caption B@4.
REFERENCE_TAB2 = {
    "Global": (None, 76.8, 46.3, 34.6, 28.8),
    "Regional": (48.2, 75.9, 52.3, 39.2, 31.2),
    "Global + Regional": (49.9, 76.9, 51.3, 38.8, 30.6),
}
REFERENCE_TAB4 = {
    "mixed": (49.6, 76.7, 40.1, 31.9, 27.6),
    "unmixed": (49.2, 76.6, 39.8, 30.9, 27.5),
    "unmixed + gather": (49.3, 76.8, 50.4, 37.3, 27.6),
    "unmixed + gather + MT-AdamW": (49.9, 76.9, 51.3, 38.8, 30.6),
}


def test_tab2_and_tab4_match_design_md():
    assert dict(P.paper_table("tab2").rows) == REFERENCE_TAB2
    assert dict(P.paper_table("tab4").rows) == REFERENCE_TAB4


def test_the_full_model_is_the_same_row_in_tab2_to_tab5():
    full = (49.9, 76.9, 51.3, 38.8, 30.6)
    assert P.TAB2.rows["Global + Regional"] == full
    assert P.TAB3.rows["All Tasks w/ MoE"] == full
    assert P.TAB4.rows["unmixed + gather + MT-AdamW"] == full
    assert P.TAB5.rows["Supervised (IN-1k & COCO)"] == full


def test_tab3_printed_gaps_agree_with_values_except_the_two_known_cells():
    headers = P.TAB3.columns
    inconsistent = []
    for row, gaps in P.TAB3_PRINTED_GAPS.items():
        for column, gap in zip(headers, gaps):
            value, base = P.TAB3.value(row, column), P.TAB3.value("All Tasks", column)
            assert (gap is None) == (value is None), (row, column)
            if gap is not None and not math.isclose(value - base, gap, abs_tol=1e-6):
                inconsistent.append((row, column))
    assert tuple(inconsistent) == P.TAB3_INCONSISTENT_GAPS


def test_tab6_printed_gains_are_to_the_best_earlier_generalist_except_bleu4():
    earlier = [label for label in P.TAB6.rows if not label.startswith("Uni-Perceiver-v2")]
    mismatched = []
    for column, gain in zip(P.TAB6.columns[1:], P.TAB6_PRINTED_GAINS):
        best = max(v for v in (P.TAB6.value(label, column) for label in earlier) if v is not None)
        if not math.isclose(P.TAB6.value("Uni-Perceiver-v2 LARGE", column) - best, gain, abs_tol=1e-6):
            mismatched.append(column)
    assert tuple(mismatched) == P.TAB6_INCONSISTENT_GAINS
    # The printed +1.6 is the gain over Pix2Seq v2.
    assert math.isclose(36.5 - P.TAB6.value("Pix2Seq v2", "COCO Caption B@4"), 1.6)


# ---------------------------------------------------------------------------------------------- the transcript
def _cell_numbers(cell: str) -> tuple[list[float | None], list[float]]:
    """Values and bracketed gaps of one transcript cell ("-" and empty cells are one None)."""
    cell = (cell.replace("\\left(", "(").replace("\\right)", ")").replace("$", "")
            .replace("<u>", "").replace("</u>", ""))
    gaps = [float(g) for g in re.findall(r"\(\s*([+-]?\d+\.\d+)\s*\)", cell)]
    outside = re.sub(r"\([^)]*\)", " ", cell).strip()
    if outside in ("", "-"):
        return [None], gaps
    return [float(v) for v in re.findall(r"\d+\.\d+", outside)], gaps


def _transcript_row(text: str, prefix: str, skip: int) -> tuple[list[float | None], list[float], list[str]]:
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"{prefix!r} matches {len(lines)} transcript lines"
    cells = lines[0].split("\t")
    values, gaps = [], []
    for cell in cells[skip:]:
        cell_values, cell_gaps = _cell_numbers(cell)
        values += cell_values
        gaps += cell_gaps
    return values, gaps, cells


TRANSCRIPT_ROWS = {
    "tab2": ({"Global": "Global\t", "Regional": "Regional\t", "Global + Regional": "Global + Regional\t"}, 1),
    "tab3": ({label: f"{label}\t" for label in P.TAB3.rows}, 1),
    "tab4": ({"mixed": "mixed\t\t\t", "unmixed": "unmixed\t\t\t", "unmixed + gather": "unmixed\t\\checkmark\t\t",
              "unmixed + gather + MT-AdamW": "unmixed\t\\checkmark\t\\checkmark\t"}, 3),
    "tab5": ({"Supervised (IN-1k)": "Supervised\tIN-1k\t", "Supervised (IN-21k)": "Supervised\tIN-21k\t",
              "Supervised (IN-1k & COCO)": "Supervised\tIN-1k & COCO\t", "MoCo v2 (IN-1k)": "MoCo v2\tIN-1k\t",
              "CLIP (CLIP data)": "CLIP\tCLIP data\t"}, 2),
    "tab6": ({"Pix2Seq v2": "Pix2Seq v2 [6]\t", "UniTab": "UniTab [43]\t",
              "Unified-IO LARGE": "Unified-IO LARGE [23]\t", "Unified-IO XL": "Unified-IO _{XL} [23]\t",
              "Flamingo-3B": "Flamingo-3B [2]\t", "Uni-Perceiver BASE": "Uni-Perceiver BASE [1]\t",
              "Uni-Perceiver LARGE": "Uni-Perceiver LARGE [1]\t",
              "Uni-Perceiver-MoE BASE": "Uni-Perceiver-MoE _{BASE} [48]\t",
              "Uni-Perceiver-MoE LARGE": "Uni-Perceiver-MoE LARGE [48]\t",
              "Uni-Perceiver-v2 BASE": "Uni-Perceiver-v2 BASE\t", "Uni-Perceiver-v2 LARGE": "Uni-Perceiver-v2 LARGE\t"},
             2),
}


@pytest.fixture(scope="module")
def transcript() -> str:
    files = sorted(PAPERS.glob("000_*.txt"))
    if not files:
        pytest.skip(f"the paper transcript (000_*.txt) is not in {PAPERS}; only the reference-value checks ran")
    return files[0].read_text()


@pytest.mark.parametrize("key", sorted(TRANSCRIPT_ROWS))
def test_every_value_matches_the_paper_transcript(transcript, key):
    prefixes, skip = TRANSCRIPT_ROWS[key]
    table = P.paper_table(key)
    assert list(prefixes) == list(table.rows)
    for label, prefix in prefixes.items():
        values, gaps, cells = _transcript_row(transcript, prefix, skip)
        expected = table.rows[label]
        if key == "tab6":
            assert cells[1] == expected[0], label     # #params
            expected = expected[1:]
        assert values == list(expected), label
        if key == "tab3" and label in P.TAB3_PRINTED_GAPS:
            assert gaps == [g for g in P.TAB3_PRINTED_GAPS[label] if g is not None], label
        if label == "Uni-Perceiver-v2 LARGE":
            assert gaps == list(P.TAB6_PRINTED_GAINS)


# ---------------------------------------------------------------------------------------------- builders
def test_metric_value_scales_to_percent_and_skips_missing():
    top1 = P.ABLATION_COLUMNS[1]
    assert top1.task == "classification" and top1.key == "top1"
    assert P.metric_value({"classification": {"top1": 0.125}}, top1) == pytest.approx(12.5)
    assert P.metric_value({"classification": {"skipped": "no data"}}, top1) is None
    assert P.metric_value({"detection": {"bbox_AP": 0.5}}, top1) is None
    assert P.metric_value(None, top1) is None
    assert P.metric_value({"classification": {"top1": float("nan")}}, top1) is None
    assert P.metric_value({"classification": {"top1": -1.0}}, top1) is None     # pycocotools' "undefined"


def test_ours_vs_paper_interleaves_and_appends_rows_without_counterpart():
    ours = {"Global": (None, 10.0, 1.0, 2.0, 3.0), "Global + Regional": (5.0, 11.0, 1.5, 2.5, 3.5)}
    table = P.ours_vs_paper(ours, P.TAB2)
    assert table["columns"][:3] == ["row", "COCO Det. mAP ours", "COCO Det. mAP paper"]
    assert len(table["columns"]) == 1 + 2 * 5
    rows = {row[0]: row[1:] for row in table["rows"]}
    assert rows["Global"][:4] == [None, None, 10.0, 76.8]
    assert rows["Global + Regional"][0::2] == list(ours["Global + Regional"])
    assert rows["Global + Regional"][1::2] == list(P.TAB2.rows["Global + Regional"])
    assert rows["(paper) Regional"][0::2] == [None] * 5
    # A row with no counterpart keeps empty paper cells; every paper row then follows.
    lonely = P.ours_vs_paper({"random text encoder": (1.0,) * 5}, P.TAB5, {"random text encoder": None})
    assert lonely["rows"][0][2::2] == [None] * 5 and len(lonely["rows"]) == 1 + len(P.TAB5.rows)
    with pytest.raises(ValueError, match="row 'Global' has 2 values"):
        P.ours_vs_paper({"Global": (1.0, 2.0)}, P.TAB2)
    with pytest.raises(KeyError, match="not a row"):
        P.ours_vs_paper({"x": (1.0,) * 5}, P.TAB2, {"x": "Regionnal"})


def test_find_eval_metrics_finds_evaluate_shaped_results_anywhere():
    evaluation = {"classification": {"top1": 0.5, "top5": 0.9}, "retrieval": {"i2t_R@1": 0.2, "t2i_R@1": 0.1}}
    results = {"profile": "quick", "tables": {"x": {"columns": [], "rows": []}},
               "eval": {"val": evaluation}, "other": {"loss": 1.0}}
    assert P.find_eval_metrics(results) == [("eval.val", evaluation)]
    assert P.find_eval_metrics({"metrics": {"detection": {"bbox_AP": 0.1}, "mlm": {"accuracy": 0.3}}})[0][0] == \
        "metrics"
    assert P.find_eval_metrics({"a": {"classification": 0.5}}) == []


def test_main_results_table_puts_ours_above_the_paper():
    metrics = {"classification": {"top1": 0.5}, "detection": {"bbox_AP": 0.25, "segm_AP": 0.2},
               "captioning": {"BLEU-4": 0.1, "CIDEr": 0.3}, "retrieval": {"i2t_R@1": 0.4, "t2i_R@1": 0.35}}
    table = P.main_results_table({"ours": metrics})
    assert table["columns"][0] == "model" and len(table["rows"]) == 3
    assert table["rows"][0] == ["ours", 50.0, 25.0, 20.0, 10.0, 30.0, 40.0, 35.0]
    assert table["rows"][1] == ["(paper) Uni-Perceiver-v2 BASE", 86.3, 58.6, 50.6, 35.4, 116.9, 71.8, 55.6]


def test_evaluation_scope_says_what_our_columns_measure():
    metrics = {"classification": {"top1": 0.5, "num_images": 700}, "detection": {"bbox_AP": 0.1},
               "captioning": {"BLEU-4": 0.1, "CIDEr": 0.2, "num_images": 500},
               "retrieval": {"i2t_R@1": 0.1, "t2i_R@1": 0.1, "num_images": 500, "num_texts": 2500}}
    scope = dict(zip([m.header for m in P.MAIN_COLUMNS], P.evaluation_scope(metrics, num_classes=14)))
    assert scope["IN-1k Acc"] == "synthetic: 14 classes, 700 images, chance 7.1"
    assert scope["COCO Det. mAP"] == "synthetic scenes" and scope["COCO Seg. mAP"] is None   # no segm_AP
    counted = {**metrics, "detection": {"bbox_AP": 0.1, "segm_AP": 0.1, "num_images": 500}}
    scope_counted = dict(zip([m.header for m in P.MAIN_COLUMNS], P.evaluation_scope(counted, num_classes=14)))
    assert scope_counted["COCO Det. mAP"] == scope_counted["COCO Seg. mAP"] == "synthetic: 500 scenes"
    assert scope["COCO Caption CIDEr"] == "synthetic: 500 images"
    # R@1 by chance: an image's 5 captions among 2500 texts, a caption's 1 image among 500: 0.2 either way
    assert scope["COCO TR R@1"] == "synthetic: 2500 candidate texts, chance 0.2"
    assert scope["COCO IR R@1"] == "synthetic: 500 candidate images, chance 0.2"
    assert P.evaluation_scope({"classification": {"top1": 0.5}})[0] == "synthetic"
    assert P.evaluation_scope(None) == [None] * len(P.MAIN_COLUMNS)
    chance = dict(zip([m.header for m in P.MAIN_COLUMNS], P.main_column_chance(metrics, num_classes=14)))
    assert chance == {"IN-1k Acc": pytest.approx(100 / 14), "COCO Det. mAP": None, "COCO Seg. mAP": None,
                      "COCO Caption B@4": None, "COCO Caption CIDEr": None, "COCO TR R@1": pytest.approx(0.2),
                      "COCO IR R@1": pytest.approx(0.2)}
    assert P.main_column_chance(metrics)[0] is None                         # no class count: no chance level
    assert P.main_column_chance({"retrieval": {"i2t_R@1": 0.1}})[5] is None  # no image count either


def test_encoder_initialisation_reads_the_run_config():
    config = {"image_encoder": {"backbone": "tiny_convnet", "backbone_weights": "/runs/quick/backbone/b.safetensors"},
              "text_encoder": {"name": "all-MiniLM-L6-v2", "pretrained": True, "freeze": True}}
    text = P.encoder_initialisation(config)
    assert "`tiny_convnet` pre-trained on the synthetic classification images (`b.safetensors`" in text
    assert "`all-MiniLM-L6-v2` pre-trained and frozen" in text
    random = P.encoder_initialisation({"image_encoder": {"backbone": "tiny_convnet", "backbone_weights": None},
                                       "text_encoder": {"name": "x", "pretrained": False, "freeze": False}})
    assert "`tiny_convnet` from random weights" in random and "`x` from random weights;" in random
    assert "ImageNet weights" in P.encoder_initialisation({"image_encoder": {"backbone_weights": "imagenet"}})


def test_paper_ticks_below_zero_are_the_paper_drops_larger_than_our_reference():
    ours = {"Global": (None, 7.0, 5.0, 12.0, 0.0), "Global + Regional": (0.0, 7.0, 5.0, 6.0, 0.0)}
    directions = {"rows": [["tab2", "Global", "COCO Det. mAP", None, None, 0.5, None, None],
                           ["tab2", "Global", "IN-1k Acc", -0.1, 0.0, 0.5, "within noise", "paper flat"],
                           ["tab2", "Global", "COCO I2T R@1", -5.0, 0.0, 0.5, "within noise", "within noise"],
                           ["tab2", "Global", "COCO Caption B@4", -1.8, 0.0, 0.5, "within noise", "within noise"],
                           ["tab4", "mixed", "COCO Caption B@4", -3.0, 0.0, 0.5, "within noise", "within noise"]]}
    assert P.paper_ticks_below_zero(ours, "Global + Regional", directions, "tab2") == [
        ("Global", "COCO Caption B@4", -1.8)]
    assert len(P.paper_ticks_below_zero(ours, "Global + Regional", directions)) == 2
    assert P.paper_ticks_below_zero(ours, None, directions) == []
