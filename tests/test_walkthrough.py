"""The helpers of notebooks 06-08: the trainer's command line (parsed by the real parsers), streaming a child's
output, run status and checkpoints, log parsing, and the evaluation helpers on a tiny model (checked against
pycocotools and the model's own outputs)."""

import json
import random
import sys
import textwrap

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
import torchvision
from helpers import CAPTIONS, single_thread, tiny_config, tiny_model, tokenizer  # noqa: F401
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from uniperceiver_v2 import api, train, walkthrough
from uniperceiver_v2.config import load_config
from uniperceiver_v2.data.coco import Category
from uniperceiver_v2.engine.checkpoint import save_checkpoint
from uniperceiver_v2.engine.evaluation import (
    NovelDetectionResult,
    calibrated_novel_detection,
    choose_on_other_folds,
    evaluate_novel_detection,
    novel_metrics,
)
from uniperceiver_v2.engine.runtime import resolve_device
from uniperceiver_v2.tasks import DetectionTask


# ----------------------------------------------------------------------------------------------------- commands
def test_train_command_is_read_by_the_trainer_as_intended(tmp_path):
    command = walkthrough.train_command("tiny", tmp_path / "train", 70, data_root="/data/x", data_profile="quick",
                                        seed=3, log_every=1, overrides=["optim.lr=5e-4"])
    assert command[:3] == [sys.executable, "-m", "uniperceiver_v2.train"]
    args = train.parse_args(command[3:])
    assert args.resume and args.new_schedule and args.no_eval and args.config == "tiny"
    kept = walkthrough.train_command("tiny", "out", 70, data_root="d", data_profile="quick", new_schedule=False)
    assert "--resume" in kept and "--new-schedule" not in kept
    cfg = load_config(args.config, args.overrides)
    assert cfg.run.iterations == 70 and cfg.run.output_dir == str(tmp_path / "train") and cfg.run.seed == 3
    assert cfg.data.root == "/data/x" and cfg.data.synthetic_profile == "quick"
    assert cfg.run.log_every == 1 and cfg.optim.lr == 5e-4 and cfg.run.device == "auto"


def test_train_command_for_real_data_keeps_the_preset_log_interval():
    command = walkthrough.train_command("tiny", "out", 50, data_root="data/real", data_profile=None, resume=False,
                                        evaluate=True)
    args = train.parse_args(command[3:])
    cfg = load_config(args.config, args.overrides)
    assert not args.resume and not args.new_schedule and not args.no_eval
    assert cfg.data.synthetic_profile is None and cfg.run.log_every == load_config("tiny").run.log_every


def test_train_command_with_several_processes_is_a_torchrun_command():
    from torch.distributed.run import get_args_parser

    command = walkthrough.train_command("tiny", "out", 50, data_root="d", data_profile="quick", nproc=2)
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    launch = get_args_parser().parse_args(command[3:])
    assert launch.nproc_per_node == "2" and launch.standalone and launch.module
    assert launch.training_script == "uniperceiver_v2.train"
    assert load_config("tiny", train.parse_args(launch.training_script_args).overrides).run.iterations == 50
    with pytest.raises(ValueError, match="nproc"):
        walkthrough.train_command("tiny", "out", 50, data_root="d", data_profile="quick", nproc=0)


def test_split_batches_keep_the_global_batch_of_one_process():
    command = walkthrough.train_command("tiny", "out", 50, data_root="d", data_profile="quick", nproc=2,
                                        split_batches=True, overrides=["tasks.detection.batch_size=6",
                                                                       "tasks.mlm.enabled=false"])
    cfg = load_config("tiny", train.parse_args(command[command.index("uniperceiver_v2.train") + 1:]).overrides)
    preset = load_config("tiny")
    assert cfg.tasks.detection.batch_size == 3 and not cfg.tasks.mlm.enabled
    for name in ("classification", "captioning", "retrieval"):
        assert 2 * cfg.tasks.get(name).batch_size == preset.tasks.get(name).batch_size, name
    # one process, or split_batches off: the batches are the preset's
    for kept in (walkthrough.train_command("tiny", "out", 50, data_root="d", data_profile="quick", nproc=1,
                                           split_batches=True),
                 walkthrough.train_command("tiny", "out", 50, data_root="d", data_profile="quick", nproc=2)):
        assert not any(a.startswith("tasks.") for a in kept)
    with pytest.raises(ValueError, match=r"tasks\.detection\.batch_size: 5 does not split evenly over 2"):
        walkthrough.split_batch_overrides("tiny", 2, ["tasks.detection.batch_size=5"])
    assert walkthrough.split_batch_overrides("tiny", 4, ["tasks.detection.enabled=false"]) == [
        f"tasks.{name}.batch_size={preset.tasks.get(name).batch_size // 4}"
        for name in ("classification", "captioning", "mlm", "retrieval")]


def test_default_log_every():
    assert walkthrough.default_log_every(60) == 1 and walkthrough.default_log_every(3000) is None


# ----------------------------------------------------------------------------------------------------- streaming
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def bar(i, total=10, extra=""):
    return f"\rtrain: {10 * i:3d}%|##| {i}/{total} [00:0{i}<00:10, 1.00it/s, task=mlm]{extra}"


def test_progress_lines_are_thinned_and_the_last_one_is_kept():
    shown, clock = [], FakeClock()
    progress = walkthrough.ProgressFilter(shown.append, interval=10.0, clock=clock)
    progress.feed("INFO starting\n")
    for i, t in [(1, 0.0), (2, 1.0), (3, 2.0), (4, 11.0), (5, 12.0)]:
        clock.now = t
        progress.feed(bar(i))
    clock.now = 13.0
    progress.feed(bar(10) + "\n")
    progress.feed("finished 10 iterations\n")
    progress.close()
    assert shown == ["INFO starting", bar(1).strip(), bar(4).strip(), bar(10).strip(), "finished 10 iterations"]


def test_a_log_line_written_behind_a_progress_bar_is_its_own_line():
    shown = []
    progress = walkthrough.ProgressFilter(shown.append, interval=0.0, clock=FakeClock())
    progress.feed(bar(0, extra="INFO ops: loading the extension") + "\n")
    progress.close()
    assert shown == [bar(0).strip(), "INFO ops: loading the extension"]


def test_chunking_does_not_change_what_is_shown():
    stream = "a\n" + bar(1) + bar(2) + "\nb\r\nc" + bar(3) + "\n"
    whole, pieces = [], []
    for out, chunks in ((whole, [stream]), (pieces, list(stream))):
        progress = walkthrough.ProgressFilter(out.append, interval=0.0, clock=FakeClock())
        for chunk in chunks:
            progress.feed(chunk)
        progress.close()
    assert whole == pieces == ["a", bar(1).strip(), bar(2).strip(), "b", "c", bar(3).strip()]


CHILD = textwrap.dedent("""
    import sys
    print("first line")
    for i in range(1, 11):
        sys.stderr.write("\\rtrain: %d/10 [00:00<00:00]" % i)
        sys.stderr.flush()
    sys.stderr.write("\\n")
    print("last line")
    sys.exit(3)
""")


def test_stream_command_shows_lines_logs_everything_and_returns_the_exit_code(tmp_path):
    shown = []
    log = tmp_path / "console.log"
    code, tail = walkthrough.stream_command([sys.executable, "-c", CHILD], log_file=log, progress_interval=1000.0,
                                            emit=shown.append, keep_tail=3)
    assert code == 3
    assert shown == ["first line", "train: 1/10 [00:00<00:00]", "train: 10/10 [00:00<00:00]", "last line"]
    assert tail == shown[-3:]
    raw = log.read_text()
    assert all(f"train: {i}/10" in raw for i in range(1, 11)) and raw.endswith("last line\n")


def test_run_training_raises_with_the_tail_of_the_output(tmp_path):
    with pytest.raises(walkthrough.TrainingFailed, match=r"code 3(.|\n)*\| last line") as error:
        walkthrough.run_training([sys.executable, "-c", CHILD], tmp_path / "train", progress_interval=1000.0)
    assert error.value.returncode == 3 and (tmp_path / "train" / walkthrough.CONSOLE_LOG).is_file()


def test_run_training_without_echo_prints_nothing_and_summarises_the_launch(tmp_path, capsys):
    child = CHILD.replace("sys.exit(3)", "sys.exit(0)")
    launch = walkthrough.run_training([sys.executable, "-c", child], tmp_path / "train", progress_interval=1000.0,
                                       echo=False)
    assert capsys.readouterr().out == ""                     # the lines went to the log only
    assert launch.last_line == "last line" and launch.lines == 4
    assert launch.log == tmp_path / "train" / walkthrough.CONSOLE_LOG and "first line" in launch.log.read_text()
    summary = launch.summary()
    assert summary.startswith("last line\n4 lines") and str(launch.log) in summary
    echoed = walkthrough.run_training([sys.executable, "-c", child], tmp_path / "train", progress_interval=1000.0)
    assert capsys.readouterr().out.splitlines()[0] == "first line" and echoed.lines == 4
    assert launch.log.read_text().count("first line") == 2   # appended, one log for every launch


def test_run_training_status_line_shows_the_bar_then_gives_way_to_the_summary(tmp_path, monkeypatch):
    """In a notebook the progress bar is one line updated in place; when the run ends the launch's summary replaces
    it, so a finished cell shows how the run ended, not a stale bar of one rank's last batch (nor an empty output)."""
    from uniperceiver_v2.walkthrough import runs

    shown: list[str] = []
    monkeypatch.setattr(runs, "_status_line", lambda: shown.append)
    child = CHILD.replace("sys.exit(3)", "sys.exit(0)")
    launch = walkthrough.run_training([sys.executable, "-c", child], tmp_path / "train", progress_interval=1000.0,
                                      echo=False)
    assert shown == ["train: 1/10 [00:00<00:00]", "train: 10/10 [00:00<00:00]", launch.summary()]
    assert shown[-1].startswith("last line\n4 lines")


# ----------------------------------------------------------------------------------------------------- run status
def test_training_status_and_require_checkpoint(tmp_path):
    run_dir = tmp_path / "runs" / "quick"
    output_dir = walkthrough.training_dir(run_dir)
    assert output_dir == run_dir / "train"
    with pytest.raises(FileNotFoundError, match="06_multitask_training"):
        walkthrough.require_checkpoint(run_dir)
    status = walkthrough.training_status(output_dir, 10)
    assert status.checkpoint is None and status.iteration == 0 and not status.finished

    model = torch.nn.Linear(2, 2)
    save_checkpoint(output_dir / "checkpoints", 4, model, None)
    latest = save_checkpoint(output_dir / "checkpoints", 10, model, None)
    assert walkthrough.training_status(output_dir, 10).finished
    status = walkthrough.training_status(output_dir, 12)
    assert status.checkpoint == latest and status.iteration == 10 and not status.finished
    assert walkthrough.require_checkpoint(run_dir) == latest


def test_resolve_backbone_weights_finds_the_runs_backbone_file_from_notebooks(tmp_path, monkeypatch):
    """A run started from ``runs/backbone.safetensors`` (relative to the checkout, as the README's commands give it)
    can be rebuilt from ``notebooks/``: the path is taken from the checkout, not the working folder."""
    from safetensors.torch import save_file

    from uniperceiver_v2.modeling.backbone import build_backbone_from_config

    checkout = tmp_path / "checkout"                       # the nearest folder holding uniperceiver_v2/__init__.py
    (checkout / "uniperceiver_v2").mkdir(parents=True)
    (checkout / "uniperceiver_v2" / "__init__.py").write_text("")
    (checkout / "notebooks").mkdir()
    (checkout / "runs").mkdir()
    cfg = load_config("tiny")
    torch.manual_seed(0)
    trained = build_backbone_from_config(cfg.image_encoder)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, checkout / "runs" / "backbone.safetensors")
    cfg.image_encoder.backbone_weights = "runs/backbone.safetensors"
    monkeypatch.chdir(checkout / "notebooks")

    with pytest.raises(FileNotFoundError, match="image_encoder.backbone_weights"):
        build_backbone_from_config(cfg.image_encoder)      # from notebooks/ the relative path names nothing
    resolved = walkthrough.resolve_backbone_weights(cfg)
    assert resolved.image_encoder.backbone_weights == str(checkout / "runs" / "backbone.safetensors")
    assert cfg.image_encoder.backbone_weights == "runs/backbone.safetensors"        # the run's config is a copy
    torch.manual_seed(1)                                   # another random start: the weights must come from the file
    rebuilt = build_backbone_from_config(resolved.image_encoder)
    for name, value in trained.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], value), name

    for kept in (None, "imagenet", str(tmp_path / "absolute.safetensors")):
        cfg.image_encoder.backbone_weights = kept
        assert walkthrough.resolve_backbone_weights(cfg).image_encoder.backbone_weights == kept


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


# ----------------------------------------------------------------------------------------------------- logs
def record(iteration, task, count=1, lr=1e-3):
    return {"kind": "train", "iteration": iteration, "task": task, "count": count, "loss": 1.0, "lr": lr,
            "lr/lr x1": lr, "lr/lr x1, no weight decay": lr, "lr/lr x0.1": lr / 10,
            "lr/lr x0.1, no weight decay": lr / 10}


def test_lr_records_merge_groups_by_multiplier():
    records = [record(1, "mlm", lr=1e-4), record(2, "detection", lr=2e-4), record(2, "mlm", lr=2e-4),
               {"kind": "eval", "iteration": 2, "task": "mlm", "accuracy": 0.5}]
    rows = walkthrough.lr_records(records)
    assert [(r["group"], r["iteration"]) for r in rows] == [("lr x0.1", 1), ("lr x0.1", 2),
                                                            ("lr x1", 1), ("lr x1", 2)]
    assert [r["lr"] for r in rows] == pytest.approx([1e-5, 2e-5, 1e-4, 2e-4])


def test_task_sequence_from_records():
    records = [record(1, "mlm"), record(2, "detection"), record(3, "mlm"),
               {"kind": "eval", "iteration": 3, "task": "mlm"}]
    assert walkthrough.task_sequence_from_records(records) == ["mlm", "detection", "mlm"]
    with pytest.raises(ValueError, match="log_every=1"):
        walkthrough.task_sequence_from_records([record(1, "mlm"), record(3, "mlm")])
    with pytest.raises(ValueError, match="log_every=1"):
        walkthrough.task_sequence_from_records([record(2, "mlm", count=2)])


def test_compare_logged_draws_checks_every_logging_window():
    drawn = ["mlm", "detection", "mlm", "mlm", "detection"]
    # one record per iteration (run.log_every=1)
    assert walkthrough.compare_logged_draws([record(i + 1, task) for i, task in enumerate(drawn)], drawn) == 5
    # windows of 2 iterations and a last window of 1; two batches per iteration (grad_accum x processes)
    windowed = [record(2, "mlm", count=2), record(2, "detection", count=2), record(4, "mlm", count=4),
                record(5, "detection", count=2), {"kind": "eval", "iteration": 5, "task": "mlm"}]
    assert walkthrough.compare_logged_draws(windowed, drawn, batches_per_iteration=2) == 3
    with pytest.raises(ValueError, match="iterations 3-4"):
        walkthrough.compare_logged_draws([record(2, "mlm"), record(2, "detection"), record(4, "detection", count=2)],
                                         drawn)
    with pytest.raises(ValueError, match="the draws only"):
        walkthrough.compare_logged_draws([record(9, "mlm")], drawn)
    with pytest.raises(ValueError, match="no training records"):
        walkthrough.compare_logged_draws([], drawn)


def test_param_group_table_lists_every_parameter_once():
    model = torch.nn.Module()
    model.encoder = torch.nn.Sequential(torch.nn.Linear(3, 4))
    model.head = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW([
        {"params": [model.head.weight], "lr": 1.0, "weight_decay": 0.1, "name": "x1"},
        {"params": [model.encoder[0].weight, model.encoder[0].bias, model.head.bias], "lr": 0.1,
         "weight_decay": 0.0, "name": "x0.1"}])
    table = walkthrough.param_group_table(model, optimizer)
    assert table["rows"] == [["x1", 1.0, 0.1, 1, 8, "head.weight"],
                             ["x0.1", 0.1, 0.0, 3, 18, "encoder.0, head.bias"]]


def test_metrics_table_scales_skips_and_blanks():
    results = {"classification": {"top1": 0.5, "top5": 0.875, "num_images": 8},
               "detection": {"bbox_AP": 0.1234, "bbox_AP50": None, "segm_AP": float("nan"), "segm_AP50": 0.2,
                             "agnostic_bbox_AP": 0.25, "novel_calibrated_bbox_AP50": 0.5},
               "mlm": {"skipped": "no corpus for split test"}}
    rows = walkthrough.metrics_table(results, "test")["rows"]
    assert rows == [["classification", "test", "top1", 50.0], ["classification", "test", "top5", 87.5],
                    ["detection", "test", "bbox_AP", 12.34], ["detection", "test", "bbox_AP50", None],
                    ["detection", "test", "segm_AP", None], ["detection", "test", "segm_AP50", 20.0],
                    ["detection", "test", "agnostic_bbox_AP", 25.0], ["detection", "test", "agnostic_bbox_AP50", None],
                    ["detection", "novel scenes", "novel_calibrated_bbox_AP50", 50.0],   # optional: shown when present,
                    # measured on the novel-category scenes whatever the split
                    ["mlm", "test", "skipped", "no corpus for split test"]]


# ----------------------------------------------------------------------------------------------------- examples
def test_mask_one_word_hides_a_single_token_word():
    tok = tokenizer()
    rng = random.Random(0)
    for _ in range(20):
        masked, word = walkthrough.mask_one_word("a red circle above the hexagonal xylophones.", tok, rng)
        assert masked.count("<mask>") == 1 and len(tok.tokenize(word)) == 1
        assert masked.replace("<mask>", word) == "a red circle above the hexagonal xylophones."
        # what api.fill_mask checks: the mask survives tokenisation as one mask token
        assert tok(masked.replace("<mask>", tok.mask_token))["input_ids"].count(tok.mask_token_id) == 1
    assert walkthrough.mask_one_word("xylophones 123", tok, rng) is None
    hidden = {walkthrough.mask_one_word("a red circle above the hexagon.", tok, rng, skip={"a", "the", "red"})[1]
              for _ in range(20)}
    assert hidden <= {"circle", "above", "hexagon"} and len(hidden) > 1          # skipped words are never hidden
    assert walkthrough.mask_one_word("The a", tok, rng, skip={"a", "the"}) is None  # compared in lower case


def test_retrieval_examples_rank_consistently():
    examples = walkthrough.RetrievalExamples(
        texts=["a", "b", "c"], text_image=torch.tensor([0, 0, 1]),
        i2t=torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.1, 0.2]]), t2i=torch.tensor([[0.3, 0.1], [0.2, 0.4], [0.9, 0.1]]))
    assert examples.texts_for_image(0, top=2) == (["b", "c"], [True, False], pytest.approx([0.9, 0.5]))
    assert examples.images_for_text(2, top=2) == ([0, 1], [False, True], pytest.approx([0.9, 0.1]))
    # image 0: best text "b" is its own; image 1: best text "a" is not -> i2t R@1 = 1/2.
    # texts: a -> 0 right, b -> 1 wrong, c -> 0 wrong -> t2i R@1 = 1/3.
    assert examples.recall_at(1) == pytest.approx({"i2t_R@1": 0.5, "t2i_R@1": 1 / 3})
    assert examples.recall_at(2) == pytest.approx({"i2t_R@2": 1.0, "t2i_R@2": 1.0})
    # image 1's own text "c" (0.2) is behind "a" (0.8); texts b and c each have the other image first
    ranks = examples.ranks()
    assert ranks["i2t"].tolist() == [1, 2] and ranks["t2i"].tolist() == [1, 2, 2]
    assert examples.ranking_summary() == pytest.approx({
        "images": 2, "texts": 3, "i2t_median_rank": 1, "t2i_median_rank": 2, "i2t_random_rank": 4 / 2.5,
        "t2i_random_rank": 1.5, "i2t_random_median_rank": 1, "t2i_random_median_rank": 1, "i2t_distinct_top1": 2,
        "i2t_largest_hub": 1, "t2i_distinct_top1": 2, "t2i_largest_hub": 2})
    tied = walkthrough.RetrievalExamples(texts=["a", "b"], text_image=torch.tensor([0, 1]), i2t=torch.zeros(2, 2),
                                         t2i=torch.zeros(2, 2))
    assert tied.ranks()["i2t"].tolist() == [2, 2] and tied.ranks()["t2i"].tolist() == [2, 2]   # ties count against


def test_overlapping_detections_counts_duplicates():
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 5, 10]])
    assert walkthrough.overlapping_detections(boxes) == 2          # the first two; the fourth has IoU 0.5 exactly
    assert walkthrough.overlapping_detections(boxes, threshold=0.4) == 3
    assert walkthrough.overlapping_detections(boxes[:1]) == 0 and walkthrough.overlapping_detections([]) == 0


def test_caption_repetition_counts_distinct_and_looping_captions():
    captions = ["a green circle a a a a.", "A green circle a a a a.", "a red square.", "two two circles", ""]
    assert walkthrough.caption_repetition(captions) == {"captions": 5, "distinct": 5, "looping": 2}
    assert walkthrough.caption_repetition(captions, run=2)["looping"] == 3
    assert walkthrough.caption_repetition(["a b", "a  b"])["distinct"] == 1


@pytest.fixture(scope="module")
def model():
    return tiny_model(tiny_config(), texts=CAPTIONS).eval()


def test_retrieval_and_fill_mask_examples_on_a_model(model):
    images = [torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    captions = [CAPTIONS[:2], CAPTIONS[2:3], CAPTIONS[3:]]
    examples = walkthrough.retrieval_examples(model, images, captions)
    reference = api.retrieve(model, images, CAPTIONS)
    assert examples.texts == CAPTIONS and examples.text_image.tolist() == [0, 0, 1, 2]
    torch.testing.assert_close(examples.i2t, reference["i2t"].float())
    torch.testing.assert_close(examples.t2i, reference["t2i"].float())

    table = walkthrough.fill_mask_examples(model, CAPTIONS, count=3, seed=0, top_k=2)
    assert len(table["rows"]) == 3
    for masked, word, predictions, hit in table["rows"]:
        assert masked.count("<mask>") == 1 and masked.replace("<mask>", word) in CAPTIONS
        best = predictions.split(" (")[0]
        assert hit == (best == word) and len(predictions.split(", ")) == 2
        assert word not in walkthrough.results.FUNCTION_WORDS            # a content word, not a guess from position


# A tiny novel-category set: three categories (one novel), two scenes of squares.
CATEGORIES = [{"id": 5, "name": "circle"}, {"id": 9, "name": "square"}, {"id": 11, "name": "hexagon", "novel": True}]
OBJECTS = {1: [(5, [4, 4, 20, 20]), (11, [30, 30, 24, 22])], 2: [(11, [10, 30, 20, 20]), (9, [36, 6, 20, 16])]}


def write_novel_set(root):
    (root / "scenes" / "novel").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for image_id, objects in OBJECTS.items():
        pixels = np.full((64, 64, 3), 30, dtype=np.uint8)
        for category_id, (x, y, w, h) in objects:
            pixels[y:y + h, x:x + w] = 60 + 15 * category_id
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[y:y + h, x:x + w] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                "segmentation": {"size": [64, 64], "counts": rle["counts"].decode()}})
        Image.fromarray(pixels).save(root / "scenes" / "novel" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 64, "width": 64})
    path = root / "annotations" / "instances_novel.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def cocoeval_boxes(gt_path, records, cat_ids):
    gt = COCO(str(gt_path))
    evaluator = COCOeval(gt, gt.loadRes(records), iouType="bbox")
    evaluator.params.catIds = cat_ids
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.stats[0], evaluator.stats[1]


def categories():
    return [Category(c["id"], c["name"], novel=c.get("novel", False)) for c in CATEGORIES]


def test_novel_box_metrics_count_only_the_novel_categories(tmp_path):
    path = write_novel_set(tmp_path)
    # Every object found with its box; the novel ones named correctly in scene 1, named "square" in scene 2.
    records = [{"image_id": i, "category_id": c if (i, c) != (2, 11) else 9, "bbox": box, "score": 0.9}
               for i, objects in OBJECTS.items() for c, box in objects]
    metrics, per_category = novel_metrics(path, records, categories())
    novel, base = metrics["novel"]["bbox"], metrics["base"]["bbox"]
    assert (novel["AP"], novel["AP50"]) == pytest.approx(cocoeval_boxes(path, records, [11]))
    assert (base["AP"], base["AP50"]) == pytest.approx(cocoeval_boxes(path, records, [5, 9]))
    assert 0.0 < metrics["novel"]["bbox"]["AP"] < 1.0            # one of the two hexagons is missed
    assert per_category == {"hexagon": {"AP": pytest.approx(metrics["novel"]["bbox"]["AP"]),
                                        "AP50": pytest.approx(metrics["novel"]["bbox"]["AP50"]), "instances": 2}}


def test_evaluate_novel_detection_on_a_model_matches_pycocotools(model, tmp_path):
    path = write_novel_set(tmp_path)
    cfg = tiny_config()
    cfg.data.root = str(tmp_path)
    result = evaluate_novel_detection(model, cfg)
    assert result.class_names == ["circle", "square", "hexagon"] and result.novel_names == ["hexagon"]
    assert result.records and {r["category_id"] for r in result.records} <= {5, 9, 11}
    assert "segmentation" not in result.records[0]
    expected = cocoeval_boxes(path, result.records, [11])
    assert (result.metrics["novel"]["bbox"]["AP"], result.metrics["novel"]["bbox"]["AP50"]) == pytest.approx(expected)

    # A candidate list without the novel name: nothing can be called "hexagon", so its AP is 0 by construction.
    seen_only = evaluate_novel_detection(model, cfg, class_names=["circle", "square", "balloon"])
    assert {r["category_id"] for r in seen_only.records} <= {5, 9} and seen_only.metrics["novel"]["bbox"]["AP"] == 0.0


def test_choose_on_other_folds_takes_the_best_elsewhere_and_the_smaller_on_ties():
    assert choose_on_other_folds([[0.1, 0.3, 0.2], [0.4, 0.2, 0.5]], [0.0, 2.0, 8.0]) == [8.0, 2.0]
    assert choose_on_other_folds([[0.2, 0.2], [0.3, 0.3]], [4.0, 1.0]) == [1.0, 1.0]      # ties: the smaller gamma
    # three folds: each fold sums the two others
    assert choose_on_other_folds([[1, 0], [0, 1], [0, 1]], [0.0, 1.0]) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="2 folds"):
        choose_on_other_folds([[0.1, 0.2]], [0.0, 1.0])
    with pytest.raises(ValueError, match="a score per candidate"):
        choose_on_other_folds([[0.1], [0.2, 0.3]], [0.0, 1.0])


def test_seen_penalty_shifts_the_logits_of_the_seen_names_before_the_softmax(model):
    from dataclasses import replace

    from uniperceiver_v2.tasks.detection import region_logits

    config = replace(tiny_config().tasks.detection, nms_threshold=0.0, segmentation=False, max_detections=7)
    names, gamma = ["circle", "square", "hexagon"], 1.5
    task = DetectionTask(config, names, seen_names=["circle", "square"], seen_penalty=gamma)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    sizes = torch.tensor([[64, 64], [64, 64]])
    with torch.no_grad():
        found = task.detect(model, images, None, sizes, names)
        image = model.encode_images(images, None)
        logits = region_logits(model, image, names)[0].double()
        logits[..., :2] -= gamma                                     # by hand: the two seen names
        scores = image.objectness.double().sigmoid()[..., None] * logits.softmax(-1)
        expected = scores.flatten(1).topk(7, dim=1)
    for b in range(2):
        torch.testing.assert_close(found[b]["scores"].double(), expected.values[b], rtol=1e-4, atol=1e-6)
        assert found[b]["labels"].tolist() == (expected.indices[b] % 3).tolist()
    with pytest.raises(ValueError, match="seen_penalty"):
        DetectionTask(config, names, seen_penalty=-1.0)


def test_detect_penalised_equals_detect_with_each_gamma_from_one_forward_pass(model, monkeypatch):
    from dataclasses import replace

    # boxes from masks on (mask_box_iou), NMS on: the selection detect does after the network, per gamma
    config = replace(tiny_config().tasks.detection, segmentation=False, mask_box_iou=0.3, max_detections=9)
    names, penalties = ["circle", "square", "hexagon"], [0.0, 1.5, 6.0]
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    sizes = torch.tensor([[64, 64], [48, 80]])
    calls = []
    encode = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda *args: calls.append(1) or encode(*args))
    task = DetectionTask(config, names, seen_names=["circle", "square"])
    by_gamma = task.detect_penalised(model, images, None, sizes, names, penalties)
    assert len(calls) == 1 and list(by_gamma) == penalties
    for gamma in penalties:
        alone = DetectionTask(config, names, seen_names=["circle", "square"], seen_penalty=gamma).detect(
            model, images, None, sizes, names)
        for b in range(2):
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(by_gamma[gamma][b][key], alone[b][key], rtol=0, atol=0)
    assert len(calls) == 1 + len(penalties)
    with pytest.raises(ValueError, match="penalties must be >= 0"):
        task.detect_penalised(model, images, None, sizes, names, [0.0, -2.0])


def test_calibrated_novel_detection_scores_each_half_with_the_gamma_of_the_other(model, tmp_path):
    path = write_novel_set(tmp_path)
    cfg = tiny_config()
    cfg.data.root = str(tmp_path)
    plain = evaluate_novel_detection(model, cfg)
    # One candidate, gamma 0: the plain evaluation.
    single = calibrated_novel_detection(model, cfg, penalties=[0.0])
    assert single.chosen == [0.0, 0.0] and single.folds == [[1], [2]]
    assert single.metrics["novel"]["bbox"]["AP50"] == pytest.approx(plain.metrics["novel"]["bbox"]["AP50"])
    assert sorted(map(json.dumps, single.records)) == sorted(map(json.dumps, plain.records))
    # Two candidates: each half keeps the records of the gamma that was best on the other half.
    penalties = [0.0, 30.0]
    result = calibrated_novel_detection(model, cfg, penalties=penalties)
    assert result.chosen == choose_on_other_folds(result.fold_ap50, penalties)
    for half, gamma in zip(result.folds, result.chosen):
        alone = evaluate_novel_detection(model, cfg, seen_penalty=gamma)
        expected = sorted(json.dumps(r) for r in alone.records if r["image_id"] in half)
        assert sorted(json.dumps(r) for r in result.records if r["image_id"] in half) == expected
    expected_ap = cocoeval_boxes(path, result.records, [11]) if result.records else (0.0, 0.0)
    assert (result.metrics["novel"]["bbox"]["AP"], result.metrics["novel"]["bbox"]["AP50"]) == \
        pytest.approx(expected_ap)
    with pytest.raises(ValueError, match="penalties"):
        calibrated_novel_detection(model, cfg, penalties=[])


def test_best_proposal_logits_take_the_proposal_that_overlaps_each_object_most(model):
    from uniperceiver_v2.data.samples import DetectionSample
    from uniperceiver_v2.modeling.box_ops import box_cxcywh_to_xyxy

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 64, 80, generator=generator)
    boxes = torch.tensor([[4.0, 4.0, 30.0, 28.0], [40.0, 20.0, 76.0, 60.0]])
    sample = DetectionSample(image, boxes, torch.tensor([0, 2]), None, 1, (64, 80), "x.png")
    names = ["circle", "square", "hexagon"]
    logits, iou = walkthrough.best_proposal_logits(model, sample, names)
    assert logits.shape == (2, 3) and iou.shape == (2,)

    with torch.no_grad():
        encoded = model.encode_images(image[None], torch.zeros(1, 64, 80, dtype=torch.bool))
        all_logits, _ = DetectionTask(model.config.tasks.detection, names).region_logits(model, encoded, names)
    proposals = box_cxcywh_to_xyxy(encoded.boxes[0]) * torch.tensor([80.0, 64.0, 80.0, 64.0])
    reference_iou = torchvision.ops.box_iou(boxes, proposals)                        # independent IoU
    torch.testing.assert_close(iou, reference_iou.max(dim=1).values)
    torch.testing.assert_close(logits, all_logits[0, reference_iou.argmax(dim=1)])


# ----------------------------------------------------------------------------------------------------- run setup
def test_config_of_command_and_the_task_mixture():
    command = walkthrough.train_command("tiny", "out", 50, data_root="d", data_profile="quick", nproc=2,
                                        overrides=["tasks.mlm.enabled=false", "tasks.detection.sampling_weight=0.6"])
    cfg = walkthrough.config_of_command(command)
    assert cfg.run.iterations == 50 and not cfg.tasks.mlm.enabled
    sampler = walkthrough.unmixed_sampler(cfg)
    assert sampler.task_names == ["classification", "detection", "captioning", "retrieval"]
    table = walkthrough.task_mixture_table(cfg, 50)
    shares = {row[0]: row[1] for row in table["rows"]}
    assert shares["detection"] == pytest.approx(0.6 / (0.2 + 0.6 + 0.2 + 0.2), abs=1e-4)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)
    detection = next(row for row in table["rows"] if row[0] == "detection")
    assert detection[2:] == [1.0, 4, 4, round(50 * detection[1], 1), round(50 * detection[1] * 4)]
    two = next(row for row in walkthrough.task_mixture_table(cfg, 50, nproc=2)["rows"] if row[0] == "detection")
    assert two[3:5] == [4, 8] and two[6] == round(50 * detection[1] * 8)
    cfg.run.grad_accum = 3                              # three micro-batches per process and step
    three = next(row for row in walkthrough.task_mixture_table(cfg, 50, nproc=2)["rows"] if row[0] == "detection")
    assert three[3:5] == [4, 24]
    header = walkthrough.task_mixture_table(cfg, 50, nproc=2)["columns"][4]
    assert header == "batch of a step (2 processes x 3 micro-batch(es))"
    assert walkthrough.task_mixture_table(cfg, 50)["columns"][4] == "batch of a step (3 micro-batch(es))"
    with pytest.raises(ValueError, match="uniperceiver_v2.train"):
        walkthrough.config_of_command(["python", "-c", "pass"])
    cfg.run.sampling = "mixed"
    with pytest.raises(ValueError, match="unmixed"):
        walkthrough.unmixed_sampler(cfg)


def test_loss_summary_averages_the_first_and_last_records_of_each_task():
    records = [dict(record(i, "mlm"), loss=float(10 - i)) for i in range(1, 6)] + [dict(record(6, "detection"),
                                                                                        loss=40.0)]
    table = walkthrough.loss_summary(records, window=2)
    assert table["rows"] == [["detection", 1, 40.0, 40.0, 1.0], ["mlm", 5, 8.5, 5.5, round(5.5 / 8.5, 3)]]


# ----------------------------------------------------------------------------------------------------- chance
def test_chance_levels_match_a_simulation_of_random_rankings():
    results = {"retrieval": {"num_images": 6, "num_texts": 18}}
    chance = walkthrough.chance_levels(results, num_classes=14, vocabulary_size=200)
    assert chance[("classification", "top1")] == pytest.approx(1 / 14)
    assert chance[("classification", "top5")] == pytest.approx(5 / 14)
    assert chance[("mlm", "accuracy")] == pytest.approx(1 / 200)
    generator = np.random.default_rng(0)
    text_image = np.repeat(np.arange(6), 3)
    trials = 20000
    for k in (1, 5, 10):
        ranks = np.argsort(generator.random((trials, 18)), axis=1)[:, :k]        # k random texts per query
        i2t = (text_image[ranks] == 0).any(axis=1).mean()                          # image 0's captions among them
        assert chance[("retrieval", f"i2t_R@{k}")] == pytest.approx(i2t, abs=0.01)
        assert chance[("retrieval", f"t2i_R@{k}")] == pytest.approx(min(k, 6) / 6)
    table = walkthrough.metrics_table({"classification": {"top1": 0.25, "top5": 0.5}}, "test", chance=chance)
    assert table["columns"][-1] == "chance (x100)"
    assert table["rows"] == [["classification", "test", "top1", 25.0, round(100 / 14, 2)],
                             ["classification", "test", "top5", 50.0, round(500 / 14, 2)]]


# ----------------------------------------------------------------------------------------------------- exposure
def test_category_exposure_counts_each_category_in_every_training_source(tmp_path):
    write_novel_set(tmp_path)
    cfg = tiny_config()
    cfg.data.root = str(tmp_path)
    train_file = tmp_path / "annotations" / "instances_train.json"
    novel = json.loads((tmp_path / "annotations" / "instances_novel.json").read_text())
    seen = [a for a in novel["annotations"] if a["category_id"] != 11]
    train_file.write_text(json.dumps({**novel, "annotations": seen}))
    for folder, count in (("circle", 2), ("hexagon", 3)):
        (tmp_path / "classification" / "train" / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "classification" / "train" /
                                                                     folder / f"{i}.png")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "corpus_train.txt").write_text(
        "Two hexagons and a circle.\nA square.\nA hexagonal tile.\nA Hexagon on stripes.\n")
    table = walkthrough.category_exposure(cfg)
    assert table["rows"] == [["circle", "no", 1, 2, 1], ["square", "no", 1, 0, 1], ["hexagon", "yes", 0, 3, 2]]


def test_novel_category_names(tmp_path):
    cfg = tiny_config()
    cfg.data.root = str(tmp_path)
    assert walkthrough.novel_category_names(cfg) == []
    write_novel_set(tmp_path)
    assert walkthrough.novel_category_names(cfg) == ["hexagon"]


def test_novel_tables_scale_to_percent_and_blank_missing_values():
    result = NovelDetectionResult(
        ["circle", "hexagon"], ["hexagon"], [],
        {"novel": {"bbox": {"AP": 0.1234, "AP50": 0.5}}, "base": {"bbox": {"AP": float("nan"), "AP50": 0.25}}},
        {"hexagon": {"AP": 0.1234, "AP50": 0.5, "instances": 3}})
    assert walkthrough.novel_ap_table([("trained", "all names", result)])["rows"] == [
        ["trained", "all names", 12.34, 50.0, None, 25.0]]
    assert walkthrough.per_category_table(result)["rows"] == [["hexagon", 3, 12.34, 50.0]]


def test_distinct_detections_keep_one_box_per_proposal():
    boxes = torch.tensor([[0.0, 0, 4, 4], [0, 0, 4, 4], [1, 1, 5, 5], [0, 0, 4, 4], [2, 2, 6, 6]])
    detections = {"boxes": boxes, "scores": torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]),
                  "labels": torch.tensor([3, 1, 2, 0, 1]), "masks": torch.arange(5)[:, None, None].expand(5, 2, 2),
                  "names": ["d", "b", "c", "a", "b"]}
    kept = walkthrough.distinct_detections(detections, 2)
    assert kept["labels"].tolist() == [3, 2] and kept["names"] == ["d", "c"]
    assert torch.equal(kept["boxes"], boxes[[0, 2]]) and kept["masks"][:, 0, 0].tolist() == [0, 2]
    assert walkthrough.distinct_detections(detections, 10)["scores"].tolist() == pytest.approx([0.9, 0.7, 0.5])
    # a pair scoring 0 is a proposal nms_threshold suppressed: no detection; count 0 keeps nothing
    suppressed = dict(detections, scores=torch.tensor([0.9, 0.8, 0.7, 0.0, 0.0]))
    assert walkthrough.distinct_detections(suppressed, 10)["scores"].tolist() == pytest.approx([0.9, 0.7])
    assert walkthrough.distinct_detections(detections, 0)["boxes"].shape == (0, 4)
    # with overlap, a box overlapping a kept one is left out (IoU 9/23 = 0.39 between boxes 0 and 2, and 2 and 4)
    assert walkthrough.distinct_detections(detections, 10, overlap=0.3)["scores"].tolist() == pytest.approx([0.9, 0.5])
    assert walkthrough.distinct_detections(detections, 10, overlap=0.4)["scores"].tolist() == pytest.approx(
        [0.9, 0.7, 0.5])


def test_detection_verdicts_tell_right_misnamed_and_off_detections():
    from types import SimpleNamespace

    sample = SimpleNamespace(boxes=torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]),
                             labels=torch.tensor([1, 0, 2]))
    found = {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 31], [0, 0, 10, 11], [60, 60, 70, 70]]),
             "labels": torch.tensor([1, 2, 1, 1])}        # right, misnamed, a second right on object 0, off
    verdicts = walkthrough.detection_verdicts(found, sample)
    assert verdicts == {"verdicts": ["right", "misnamed", "right", "off"], "right": 2, "misnamed": 1, "off": 1,
                        "objects": 3, "found": 1}
    empty = walkthrough.detection_verdicts({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}, sample)
    assert empty["verdicts"] == [] and empty["found"] == 0 and empty["objects"] == 3


def test_representation_similarity_measures_how_alike_different_inputs_are(model):
    from uniperceiver_v2.api import prepare_whole_images
    from uniperceiver_v2.tasks import RetrievalTask

    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    spread = walkthrough.representation_similarity(model, images, CAPTIONS[:3])
    with torch.no_grad():
        pixels, padding = prepare_whole_images(model, images, "retrieval")
        queries = RetrievalTask(model.config.tasks.retrieval).embed_images(model, pixels, padding)[0].double()
    pairs = [torch.nn.functional.cosine_similarity(queries[i], queries[j], dim=0) for i, j in ((0, 1), (0, 2), (1, 2))]
    assert spread["images_mean"] == pytest.approx(float(sum(pairs) / 3), abs=1e-5)
    assert spread["images_min"] == pytest.approx(float(min(pairs)), abs=1e-5)
    same = walkthrough.representation_similarity(model, [images[0]] * 2, [CAPTIONS[0]] * 2)
    assert same["images_mean"] == pytest.approx(1.0, abs=1e-5) and same["texts_min"] == pytest.approx(1.0, abs=1e-5)


def test_representation_similarity_reuses_the_representations_of_retrieval_examples(model, monkeypatch):
    images = [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    captions = [CAPTIONS[:2], CAPTIONS[2:3], CAPTIONS[3:]]
    examples = walkthrough.retrieval_examples(model, images, captions)
    assert examples.image_queries.shape == (3, model.width) and examples.text_queries.shape == (4, model.width)
    encoded = walkthrough.representation_similarity(model, images, [texts[0] for texts in captions])
    monkeypatch.setattr(type(model), "encode_images", lambda *a, **k: pytest.fail("encoded the images again"))
    monkeypatch.setattr(type(model), "encode_texts", lambda *a, **k: pytest.fail("encoded the texts again"))
    reused = walkthrough.representation_similarity(examples=examples)       # each image's first caption
    assert reused == pytest.approx(encoded, abs=1e-5)
    with pytest.raises(ValueError, match="either"):
        walkthrough.representation_similarity(model, images, CAPTIONS[:3], examples=examples)
    bare = walkthrough.RetrievalExamples(examples.texts, examples.text_image, examples.i2t, examples.t2i)
    with pytest.raises(ValueError, match="kept no representations"):
        walkthrough.representation_similarity(examples=bare)
    with pytest.raises(ValueError, match="pass model"):
        walkthrough.representation_similarity(model, images)


def test_shell_command_puts_each_override_on_its_own_line(tmp_path):
    import shlex

    command = ["python", "-m", "uniperceiver_v2.train", "--config", "tiny", "--resume", "data.root=/a b",
               "run.iterations=5"]
    text = walkthrough.shell_command(command)
    assert text.splitlines() == ["python -m uniperceiver_v2.train --config tiny --resume \\",
                                 "    'data.root=/a b' \\", "    run.iterations=5"]
    assert shlex.split(text.replace("\\\n", " ")) == command
    # from the checkout: its paths relative to it, the running interpreter as "python", other paths as they are
    root = tmp_path / "checkout"
    command = [sys.executable, "-m", "uniperceiver_v2.train", f"data.root={root.resolve()}/data/synthetic",
               "run.output_dir=/elsewhere/train"]
    assert walkthrough.shell_command(command, root=root).splitlines() == [
        "python -m uniperceiver_v2.train \\", "    data.root=data/synthetic \\", "    run.output_dir=/elsewhere/train"]


def test_an_interrupt_is_forwarded_once_and_re_raised(tmp_path):
    marker = tmp_path / "signals.txt"
    child = textwrap.dedent(f"""
        import signal, sys, time
        def handler(signum, frame):
            open({str(marker)!r}, "a").write("SIGINT\\n")
            sys.exit(130)
        signal.signal(signal.SIGINT, handler)
        print("ready", flush=True)
        time.sleep(30)
    """)

    def interrupt_on_first_line(line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        walkthrough.stream_command([sys.executable, "-c", child], emit=interrupt_on_first_line)
    assert marker.read_text() == "SIGINT\n"


def test_ceiling_table_puts_the_model_next_to_the_oracle_and_the_references():
    results = {"retrieval": {"i2t_R@1": 0.25, "t2i_R@1": 0.125}, "captioning": {"BLEU-4": 0.2, "CIDEr": 0.5}}
    ceiling = {"retrieval_oracle": {"i2t_R@1": 0.7, "t2i_R@1": 0.5},
               "chance": {"i2t_R@1": 0.002, "t2i_R@1": 0.002},
               "captioning_reference_agreement": {"BLEU-4": 0.25, "CIDEr": 0.9},
               "captioning_grammar_caption": {"BLEU-4": 0.4, "CIDEr": 1.3}}
    table = walkthrough.ceiling_table(results, ceiling)
    rows = {(row[0], row[3]): row for row in table["rows"]}
    assert table["columns"] == ["metric", "model", "reference", "reference is", "chance"]
    assert rows[("retrieval R@1 image->text", table["rows"][0][3])][1:3] == [25.0, 70.0]
    assert [row[1:3] for row in table["rows"] if row[0] == "captioning CIDEr"] == [[50.0, 90.0], [50.0, 130.0]]
    assert table["rows"][1][4] == 0.2                                    # chance of text->image R@1, x100
    no_captioning = walkthrough.ceiling_table({"retrieval": results["retrieval"]}, ceiling)
    assert all(row[1] is None for row in no_captioning["rows"] if row[0].startswith("captioning"))
    assert not any(row[0] == "MLM accuracy" for row in table["rows"])      # no MLM reference in the ceiling
    ceiling["mlm_context_counts"] = {"accuracy": 0.625, "corpus_split": "val"}
    with_mlm = walkthrough.ceiling_table({**results, "mlm": {"accuracy": 0.5}}, ceiling)
    assert [row[1:3] for row in with_mlm["rows"] if row[0] == "MLM accuracy"] == [[50.0, 62.5]]


# ----------------------------------------------------------------------------------------------------- notebook 01
def test_anchor_size_deviation_is_zero_for_the_anchors_and_relative_to_the_nearest_side():
    from uniperceiver_v2.modeling.region_proposal import RegionProposalNetwork
    from uniperceiver_v2.walkthrough.rpn import anchor_size_deviation

    shapes = torch.tensor([[8, 8], [4, 4], [2, 2], [1, 1]])
    logits, valid = RegionProposalNetwork.anchors(torch.zeros(1, int(shapes.prod(1).sum()), dtype=torch.bool), shapes)
    anchors = logits.sigmoid()[valid]                                                # (n, 4) cx, cy, w, h
    assert anchor_size_deviation(anchors, num_levels=4).max() < 1e-5
    boxes = torch.tensor([[0.5, 0.5, 0.12, 0.1],       # the 0.1 side (level 1), 20 % wider
                          [0.5, 0.5, 0.4, 0.3],        # the 0.4 side (level 3), 25 % lower
                          [0.5, 0.5, 0.05, 0.05]])     # a level-0 anchor
    assert anchor_size_deviation(boxes, num_levels=4).tolist() == pytest.approx([0.2, 0.25, 0.0])


def test_anchor_size_deviation_against_each_box_s_own_anchor_and_the_level_of_each_position():
    from uniperceiver_v2.walkthrough.rpn import anchor_size_deviation, position_levels

    shapes = torch.tensor([[8, 8], [4, 4], [2, 2], [1, 1]])                 # S = 64 + 16 + 4 + 1
    positions = torch.tensor([0, 63, 64, 79, 80, 83, 84])
    assert position_levels(positions, shapes).tolist() == [0, 0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="positions"):
        position_levels(torch.tensor([85]), shapes)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2],        # twice the level-1 side: 100 % off its own anchor, ...
                          [0.5, 0.5, 0.05, 0.15]])     # a level-0 box three times as high as its anchor
    own = anchor_size_deviation(boxes, num_levels=4, levels=torch.tensor([1, 0]))
    assert own.tolist() == pytest.approx([1.0, 2.0])
    assert anchor_size_deviation(boxes, num_levels=4).tolist() == pytest.approx([0.0, 0.5])   # ... 0 to the nearest
    with pytest.raises(ValueError, match="levels"):
        anchor_size_deviation(boxes, num_levels=4, levels=torch.tensor([4, 0]))


# ----------------------------------------------------------------------------------------------------- notebook 02
def test_pool_similarity_compares_the_pools_deviations_from_the_uniform_share():
    from uniperceiver_v2.walkthrough.pooling import mean_pairwise, pool_similarity

    uniform = torch.full((4,), 0.25)
    left = torch.tensor([0.4, 0.4, 0.1, 0.1])
    sharper_left = torch.tensor([0.5, 0.5, 0.0, 0.0])
    right = torch.tensor([0.1, 0.1, 0.4, 0.4])
    top = torch.tensor([0.4, 0.1, 0.4, 0.1])
    similarity = pool_similarity(torch.stack([left, sharper_left, right, top, uniform]))
    assert similarity.shape == (5, 5)
    assert similarity[0, 1].item() == pytest.approx(1.0)        # the same pattern, whatever its strength
    assert similarity[0, 2].item() == pytest.approx(-1.0)       # opposite cells
    assert similarity[0, 3].item() == pytest.approx(0.0, abs=1e-6)   # unrelated patterns
    assert similarity[4, :4].abs().max().item() < 1e-6          # a uniform pool has no pattern
    assert mean_pairwise(similarity[:2, :2]) == pytest.approx(1.0)
    assert mean_pairwise(torch.ones(1, 1)) != mean_pairwise(torch.ones(1, 1))   # nan for a single pool
    with pytest.raises(ValueError, match="weights"):
        pool_similarity(torch.rand(2, 3, 4))


def test_pool_spread_counts_the_cells_a_pool_averages():
    from uniperceiver_v2.walkthrough.pooling import pool_spread

    uniform = torch.full((2, 3, 16), 1.0 / 16)
    one_cell = torch.zeros(16)
    one_cell[5] = 1.0
    half = torch.cat([torch.full((8,), 1.0 / 8), torch.zeros(8)])   # padding cells weigh 0 and do not count
    assert torch.allclose(pool_spread(uniform), torch.full((2, 3), 16.0))
    assert torch.allclose(pool_spread(torch.stack([one_cell, half])), torch.tensor([1.0, 8.0]))


def test_query_lengths_are_the_norms_of_the_pools_queries():
    from uniperceiver_v2.config import get_preset
    from uniperceiver_v2.modeling import ImageEncoder
    from uniperceiver_v2.walkthrough.pooling import query_lengths

    encoder = ImageEncoder(get_preset("tiny").image_encoder)
    pools = encoder.global_representations.pools
    lengths = query_lengths(encoder)
    assert lengths.shape == (pools.num_pools,)
    with torch.no_grad():
        pools.query.mul_(3.0)
    assert torch.allclose(query_lengths(encoder), 3.0 * lengths)


def test_a_short_training_sharpens_the_pools_and_no_run_means_no_run_encoder(synthetic_root, tmp_path):
    from uniperceiver_v2.walkthrough.pooling import encoder_of_run, train_attention_pools

    cfg = load_config("tiny", [f"data.root={synthetic_root}"])
    result = train_attention_pools(cfg, iterations=40, batch_size=8, seed=0)
    assert [r["iteration"] for r in result.history] == list(range(40)) and not result.encoder.training
    assert result.encoder.region_proposals is None                  # the global half only
    assert result.history[-1]["spread"] < result.history[0]["spread"]   # the queries grew: sharper pools
    assert result.history[0]["spread"] == pytest.approx(16.0, abs=0.1)   # a 128 x 128 scene: 4 x 4 cells, uniform
    assert encoder_of_run(tmp_path) is None
    with pytest.raises(ValueError, match="iterations"):
        train_attention_pools(cfg, iterations=0)


def test_source_block_shows_the_package_code_from_start_to_end():
    from uniperceiver_v2.modeling.global_pooling import GlobalAttentionPooling
    from uniperceiver_v2.walkthrough.pages import source_block

    block = source_block(GlobalAttentionPooling.forward, start="logits = ", end="softmax")
    assert block.startswith("`GlobalAttentionPooling.forward` in `uniperceiver_v2/modeling/global_pooling.py`, line ")
    code = block.split("```python\n", 1)[1].rsplit("\n```", 1)[0].splitlines()
    assert code[0].startswith("logits = ") and code[-1].startswith("attn = ") and "softmax" in code[-1]
    assert "def forward" in source_block(GlobalAttentionPooling.forward)
    with pytest.raises(ValueError, match="not in the source"):
        source_block(GlobalAttentionPooling.forward, start="no such line")


# ----------------------------------------------------------------------------------------------------- notebook 04
def test_a_short_gate_training_fits_the_stand_in_on_a_copy_of_the_decoder(tmp_path):
    from test_gating import EXPERTS, captioning_inputs, classification_target_inputs, make_decoder, record

    from uniperceiver_v2.walkthrough import gating
    from uniperceiver_v2.walkthrough.gates_training import model_of_run, replayed_calls, train_gates

    decoder = make_decoder()
    before = {name: value.clone() for name, value in decoder.state_dict().items()}
    calls = record(decoder, captioning_inputs(), classification_target_inputs(), keep_inputs=True).calls
    result = train_gates(decoder, calls, iterations=60, lr=3e-3, seed=0)
    assert [r["iteration"] for r in result.history] == list(range(60)) and not result.decoder.training
    first, last = (sum(r["loss"] for r in part) / 10 for part in (result.history[:10], result.history[-10:]))
    assert last < first
    assert all(torch.equal(value, decoder.state_dict()[name]) for name, value in before.items())   # a copy trains
    replayed = replayed_calls(result.decoder, calls)
    with torch.no_grad():
        direct = gating.replay(calls[0], result.decoder)
    assert torch.equal(replayed[0].gates[0]["ffn"].indices, direct.gates[0]["ffn"].indices)
    assert replayed[0].x is calls[0].x and not result.decoder.training
    usage = gating.expert_usage(replayed, by="attribute", num_experts=EXPERTS)
    assert usage.usage.shape == (2, len(result.codes), EXPERTS)               # (L, combinations, E)
    assert model_of_run(tmp_path) is None
    with pytest.raises(ValueError, match="iterations"):
        train_gates(decoder, calls, iterations=0)
    with pytest.raises(ValueError, match="keep_inputs"):
        train_gates(decoder, record(decoder, captioning_inputs()).calls)


def test_describe_one_hot_names_only_the_layers_where_top_k_acts_as_top_1():
    from uniperceiver_v2.walkthrough.gates_training import describe_one_hot

    text = describe_one_hot([0.61, 0.78, 0.22], top_k=2)
    assert text.startswith("top-2 routing acts almost as top-1 in layers 0, 1 (61 %, 78 %)")
    assert text.endswith("; in layer 2 (22 %) most combinations still mix their 2 experts.")
    assert describe_one_hot([0.9, 0.7], top_k=2).endswith("has saturated).")         # every layer: no second clause
    assert describe_one_hot([0.5, 0.2], top_k=2) is None                           # half is not "almost top-1"
    assert describe_one_hot([1.0, 1.0], top_k=1) is None                           # top-1: one-hot by construction


def test_near_one_hot_counts_the_rows_whose_gate_weight_sits_on_one_expert():
    from uniperceiver_v2.walkthrough.gates_training import near_one_hot
    from uniperceiver_v2.walkthrough.gating import ExpertUsage

    usage = torch.tensor([[[0.5, 0.5, 0.0], [0.97, 0.03, 0.0]],            # layer 0: one of two rows one-hot
                          [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])             # layer 1: both
    assert near_one_hot(ExpertUsage([1, 2], ["a", "b"], usage, torch.ones(2))) == pytest.approx([0.5, 1.0])
    assert near_one_hot(ExpertUsage([1, 2], ["a", "b"], usage, torch.ones(2)), threshold=0.99) == \
        pytest.approx([0.0, 1.0])


def test_gate_difference_is_zero_for_shared_gates_and_one_for_disjoint_experts():
    from uniperceiver_v2.walkthrough.gates_training import gate_difference
    from uniperceiver_v2.walkthrough.gating import ExpertUsage

    usage = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]],      # layer 0: the same decision
                          [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]],      # layer 1: no expert shared
                          [[0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]]])     # layer 2: half the weight moved
    assert gate_difference(ExpertUsage([1, 2], ["a", "b"], usage, torch.ones(2))) == pytest.approx([0.0, 1.0, 0.5])


def test_collapsed_layers_need_the_same_experts_and_nearly_the_same_weights():
    from uniperceiver_v2.walkthrough.gates_training import collapsed_layers, describe_collapsed
    from uniperceiver_v2.walkthrough.gating import ExpertUsage

    usage = torch.tensor([[[0.6, 0.4, 0.0, 0.0], [0.55, 0.45, 0.0, 0.0], [0.65, 0.35, 0.0, 0.0]],   # collapsed
                          [[0.9, 0.1, 0.0, 0.0], [0.1, 0.9, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]],     # same experts,
                          [[0.6, 0.4, 0.0, 0.0], [0.6, 0.0, 0.4, 0.0], [0.6, 0.4, 0.0, 0.0]]])    # other weights;
    rows = ExpertUsage([1, 2, 3], ["a", "b", "c"], usage, torch.ones(3))                         # another expert
    found = collapsed_layers(rows)
    assert [(c.layer, c.experts) for c in found] == [(0, [0, 1])]
    assert found[0].largest_difference == pytest.approx(0.1)
    assert [c.layer for c in collapsed_layers(rows, threshold=0.8)] == [0, 1]
    assert collapsed_layers(ExpertUsage([1], ["a"], usage[:, :1], torch.ones(1))) == []

    text = describe_collapsed({"untrained": [], "trained": found}, combinations=3)
    assert "trained: layer 0 (experts E0, E1, largest difference 0.10)" in text
    assert "No layer of untrained is collapsed." in text
    assert describe_collapsed({"untrained": []}, combinations=3).startswith("**No collapsed layer**")


def test_nearly_collapsed_layers_share_their_experts_and_are_named_apart():
    from uniperceiver_v2.walkthrough.gates_training import collapsed_layers, describe_collapsed, shared_expert_layers
    from uniperceiver_v2.walkthrough.gating import ExpertUsage

    usage = torch.tensor([[[0.6, 0.4, 0.0, 0.0], [0.55, 0.45, 0.0, 0.0], [0.65, 0.35, 0.0, 0.0]],   # collapsed
                          [[0.9, 0.1, 0.0, 0.0], [0.6, 0.4, 0.0, 0.0], [0.7, 0.3, 0.0, 0.0]],     # same experts,
                          [[0.6, 0.4, 0.0, 0.0], [0.6, 0.0, 0.4, 0.0], [0.6, 0.4, 0.0, 0.0]]])    # weights 0.3 apart
    rows = ExpertUsage([1, 2, 3], ["a", "b", "c"], usage, torch.ones(3))
    nearly = shared_expert_layers(rows)
    assert [(c.layer, c.experts) for c in nearly] == [(1, [0, 1])]                # layer 2: another expert
    assert nearly[0].largest_difference == pytest.approx(0.3)
    assert shared_expert_layers(rows, threshold=0.5) == [] and len(collapsed_layers(rows, threshold=0.5)) == 2
    assert shared_expert_layers(ExpertUsage([1], ["a"], usage[:, :1], torch.ones(1))) == []
    # two rows on the two experts of one top-2 layer, each with all but a negligible weight on its own one: they take
    # different experts, the layer is neither collapsed nor nearly collapsed
    apart = ExpertUsage([1, 2], ["a", "b"], torch.tensor([[[0.996, 0.0, 0.004], [0.003, 0.0, 0.997]]]), torch.ones(2))
    assert shared_expert_layers(apart) == [] and collapsed_layers(apart, threshold=1.0) == []
    # the same two experts for both rows, mixed 0.95 / 0.05 and 0.05 / 0.95: specialised by the weights, not named
    mixed = ExpertUsage([1, 2], ["a", "b"], torch.tensor([[[0.95, 0.05, 0.0], [0.05, 0.95, 0.0]]]), torch.ones(2))
    assert shared_expert_layers(mixed) == [] and len(shared_expert_layers(mixed, most=1.0)) == 1
    assert "or weights more than 0.5 apart" in describe_collapsed({"run": []}, combinations=2,
                                                                  nearly={"run": shared_expert_layers(mixed)})

    # no collapsed layer, one nearly collapsed: the bold heading must not say the gates are fine
    text = describe_collapsed({"run": []}, combinations=3, nearly={"run": nearly})
    assert text.startswith("**No collapsed layer, but a nearly collapsed one**")
    assert ("run: layer 1 is nearly collapsed: all 3 combinations take the same experts (E0, E1), only their "
            "weights differ (by at most 0.30") in text
    assert "at least two combinations take different experts" not in text
    # both kinds, and a model with neither
    both = describe_collapsed({"run": collapsed_layers(rows), "untrained": []}, combinations=3,
                              nearly={"run": nearly, "untrained": []})
    assert both.startswith("**Collapsed layers**") and "layer 1 is nearly collapsed" in both
    assert both.endswith("No layer of untrained is collapsed or nearly collapsed.")
    # looked for and none found: every layer has two combinations on different experts
    assert describe_collapsed({"run": []}, combinations=3, nearly={"run": []}).startswith(
        "**No collapsed layer**: in no layer of these gates do all 3 attribute combinations take the same experts")
    assert "different experts or weights more than 0.5 apart. Nothing" in describe_collapsed(
        {"run": []}, combinations=3, nearly={"run": []})
    assert "nothing to compare" in describe_collapsed({"run": []}, combinations=1, nearly={"run": []})


def test_a_layer_on_one_expert_is_collapsed_whatever_its_negligible_second_experts():
    """Top-2 gates that put 0.998 on E1 everywhere and 0.002 on varying second experts act as one top-1 gate."""
    from uniperceiver_v2.walkthrough.gates_training import collapsed_layers, describe_collapsed, shared_expert_layers
    from uniperceiver_v2.walkthrough.gating import ExpertUsage

    usage = torch.tensor([[[0.002, 0.998, 0.0, 0.0], [0.0, 0.998, 0.002, 0.0], [0.0, 0.997, 0.0, 0.003]],
                          [[0.05, 0.95, 0.0, 0.0], [0.0, 0.95, 0.05, 0.0], [0.0, 0.95, 0.0, 0.05]]])   # 5 %: counted
    rows = ExpertUsage([1, 2, 3], ["a", "b", "c"], usage, torch.ones(3))
    found = collapsed_layers(rows)
    assert [(c.layer, c.experts) for c in found] == [(0, [1])] and found[0].largest_difference < 0.01
    assert shared_expert_layers(rows) == []                                        # layer 1 draws on 4 experts
    assert describe_collapsed({"short training": found}, combinations=3, nearly={"short training": []}).startswith(
        "**Collapsed layers**, where all 3 attribute combinations take the same experts, with gate vectors at most "
        "0.2 apart (`gates_training.collapsed_layers`): short training: layer 0 (experts E1, largest difference")



def test_describe_fig3_reads_each_combinations_heaviest_expert():
    from uniperceiver_v2.walkthrough.gates_training import describe_fig3
    from uniperceiver_v2.walkthrough.gating import ExpertUsage

    codes = [1 + 8 + 16 + 128, 2 + 4 + 16, 1 + 2 + 8 + 32 + 64 + 128, 1 + 8 + 32]   # I→T image, T→I image,
    one_hot = torch.eye(4)                                                         # causal caption text, I→T text
    usage = torch.stack([one_hot[[0, 0, 1, 2]], one_hot[[0, 1, 0, 0]]])            # (L=2, R=4, E=4)
    text = describe_fig3(ExpertUsage(codes, ["a", "b", "c", "d"], usage, torch.ones(4)), "these gates")
    assert "heaviest experts are 3, 2 distinct ones (of 4) in layers 0, 1 " in text
    assert "the image tokens of all 2 task shapes share their heaviest expert in layer 0;" in text
    assert "non-causal text" not in text                                           # one task shape only
    assert text.endswith("taken by no non-causal combination in layer 0.")
    assert "(not counted: layer 1, where" in text              # layer 1: three of the four rows lean on E0
    shared = ExpertUsage(codes, ["a", "b", "c", "d"], usage[1:], torch.ones(4))      # layer 1 alone: c shares E0
    assert describe_fig3(shared, "x").endswith("has the same heaviest expert as a causal one.")
    # a layer where every combination leans on E3: the image tokens share it, but so does everything else
    uniform = torch.cat([usage, one_hot[[3, 3, 3, 3]][None]])                        # (L=3, R=4, E=4)
    text = describe_fig3(ExpertUsage(codes, ["a", "b", "c", "d"], uniform, torch.ones(4)), "these gates")
    assert "heaviest experts are 3, 2, 1 distinct ones (of 4) in layers 0, 1, 2 " in text
    assert ("*one modality across tasks* (not counted: layers 1, 2, where one expert is the heaviest of most "
            "combinations, so sharing it is not specific to a modality): the image tokens of all 2 task shapes share "
            "their heaviest expert in layer 0;") in text
    # most combinations (3 of 4) on E3, the causal text alone elsewhere: the image tokens' sharing of E3 says nothing
    mostly = torch.stack([one_hot[[3, 3, 0, 3]], one_hot[[0, 0, 1, 2]]])
    text = describe_fig3(ExpertUsage(codes, ["a", "b", "c", "d"], mostly, torch.ones(4)), "these gates")
    assert "(not counted: layer 0, where one expert" in text and "share their heaviest expert in layer 1;" in text
    # every layer leans on one expert: the modality question cannot be asked (not answered "in no layer")
    everywhere = torch.stack([one_hot[[3, 3, 0, 3]], one_hot[[1, 1, 1, 2]]])
    text = describe_fig3(ExpertUsage(codes, ["a", "b", "c", "d"], everywhere, torch.ones(4)), "these gates")
    assert "*one modality across tasks*: cannot be asked of these gates" in text and "in no layer" not in text
    # layer 1 uniform, layer 0 counted and the image tokens apart there: said of layer 0, not of "no layer"
    apart = torch.stack([one_hot[[0, 1, 2, 3]], one_hot[[1, 1, 1, 2]]])
    text = describe_fig3(ExpertUsage(codes, ["a", "b", "c", "d"], apart, torch.ones(4)), "these gates")
    assert "do not share their heaviest expert in layer 0, the only layer counted;" in text
    assert "in no layer" not in text

# ----------------------------------------------------------------------------------------------------- notebook 05
def test_gaps_between_toy_variants_and_their_sentence():
    from uniperceiver_v2.walkthrough.toy_multitask import VARIANTS, Comparison, ToyMultiTaskProblem, describe_gaps

    problem = ToyMultiTaskProblem(seed=0)
    comparison = Comparison.run(problem, iterations=20, seeds=[0], learning_rates=[3e-3], variants=VARIANTS[:2])
    first, second = VARIANTS[0].name, VARIANTS[1].name
    gaps = comparison.gaps(3e-3, second, first)
    means = comparison.table(3e-3)["mean"]
    assert set(gaps) == set(problem.task_names)
    for task, gap in gaps.items():
        assert gap == pytest.approx(means[second][task] / means[first][task] - 1.0)
    assert all(value == 0.0 for value in comparison.gaps(3e-3, first, first).values())
    with pytest.raises(KeyError, match="no variant"):
        comparison.gaps(3e-3, "nothing", first)
    sentence = describe_gaps({"a": -0.31, "b": 0.12, "c": 0.01}, tolerance=0.02)
    assert sentence == "lower on a (-31 %); higher on b (+12 %); within 2 % on c"
    assert describe_gaps({"a": 0.0}) == "within 2 % on a"


def test_task_trends_show_a_level_loss_with_a_vanishing_gradient():
    records = [{"kind": "train", "iteration": i, "task": "retrieval", "loss": 3.0, "grad_norm": 10.0 ** -i}
               for i in range(6)]
    records += [{"kind": "train", "iteration": 10 + i, "task": "captioning", "loss": 4.0 - i, "grad_norm": 2.0}
                for i in range(3)]
    records.append({"kind": "eval", "iteration": 20, "task": "captioning", "loss": 0.1})
    table = walkthrough.task_trends(records, window=2)
    rows = {row[0]: row[1:] for row in table["rows"]}
    assert rows["captioning"] == [3, pytest.approx(2.5 / 3.5, rel=1e-3), 1.0]   # the eval record is left out
    assert rows["retrieval"][1] == 1.0 and rows["retrieval"][2] < 1e-3            # level loss, no gradient left
    with pytest.raises(ValueError, match="window"):
        walkthrough.task_trends(records, window=0)


def test_longest_gaps_count_the_iterations_without_each_task():
    drawn = ["a", "b", "b", "c", "b", "a", "b"]
    assert walkthrough.longest_gaps(drawn, ["a", "b", "c", "d"]) == {"a": 4, "b": 1, "c": 3, "d": 7}
    # a task that joins at iteration 3 has no gap before it: "c" is drawn at once, "d" misses the 4 after its start
    assert walkthrough.longest_gaps(drawn, ["a", "c", "d"], start_iterations={"c": 3, "d": 3}) == {"a": 4, "c": 3,
                                                                                                    "d": 4}


def test_random_first_rank_median_closed_form_and_simulation():
    from uniperceiver_v2.walkthrough.results import random_first_rank_median

    assert random_first_rank_median(3, 1) == 2               # P(first <= m) = m / 3 reaches 1/2 at m = 2
    assert random_first_rank_median(5, 2) == 2               # 1 - (3/5)(2/4) = 0.7 at m = 2; 0.4 at m = 1
    assert random_first_rank_median(7, 7) == 1
    # 5 correct of 2500 (the small suite's test split, image -> text): about 2500 (1 - 0.5 ** (1/5)) = 324
    assert abs(random_first_rank_median(2500, 5) - 2500 * (1 - 0.5 ** 0.2)) < 2
    generator = torch.Generator().manual_seed(0)
    firsts = [int(torch.randperm(60, generator=generator)[:4].min()) + 1 for _ in range(20000)]   # 4 correct of 60
    simulated = sorted(firsts)[len(firsts) // 2 - 1]         # the lower median, as the helper's smallest m
    assert abs(random_first_rank_median(60, 4) - simulated) <= 1
    with pytest.raises(ValueError, match="correct"):
        random_first_rank_median(3, 0)


def test_json_records_of_runs_name_the_file_and_the_remedy(tmp_path):
    """time_budget.json (notebook 06's run) and an ablation run's result.json go through one reader: absent ->
    None; broken JSON or a missing key -> an error naming the file, the key and what to do."""
    from uniperceiver_v2.walkthrough import ablations, time_budget_decision

    assert time_budget_decision(tmp_path) is None and ablations.load_result(tmp_path) is None
    (tmp_path / "time_budget.json").write_text('{"iterations": 60, "cap": 400')
    with pytest.raises(ValueError, match=r"time_budget\.json: not valid JSON .*let the run decide again"):
        time_budget_decision(tmp_path)
    (tmp_path / "time_budget.json").write_text(json.dumps({"iterations": 60, "cap": 400, "minutes": 0.5}))
    with pytest.raises(ValueError, match=r"missing key\(s\) 'decided_at', 'seconds_per_iteration'"):
        time_budget_decision(tmp_path)
    (tmp_path / "result.json").write_text(json.dumps({"key": "abc"}))
    with pytest.raises(ValueError, match=r"result\.json: missing key\(s\) 'metrics'; delete it to rerun"):
        ablations.load_result(tmp_path)


def test_markdown_table_keeps_the_integer_digits_that_four_significant_figures_would_round():
    # The task-mixture table's expected iterations (1079.5) times the batch (32) are its expected samples (34544):
    # "1080" would not multiply out; small numbers keep four significant figures.
    from uniperceiver_v2.walkthrough.pipeline import markdown_table

    table = markdown_table(["iterations", "samples", "share", "ratio"], [[1079.5, 34544.0, 0.13, 1.0488]])
    assert table.splitlines()[-1] == "| 1079.5 | 34544 | 0.13 | 1.049 |"
    assert markdown_table(["x"], [[float("nan")], [2632.54], [None]]).splitlines()[2:] == \
        ["| nan |", "| 2632.5 |", "| - |"]
