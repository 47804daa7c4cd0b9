"""The pre-flight check of every image file a run reads (``data/preflight.py``), ``data.on_invalid`` from the config
to every reader, the run's data report (``data_check.json``) and ``python -m uniperceiver_v2.data.check``.

Every test builds a small data root in the tiny config's layout (two training scenes, one validation scene, two
classes, a corpus) in ``tmp_path``.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import pytest
from PIL import Image

from uniperceiver_v2.config import load_config
from uniperceiver_v2.data import CocoCaptions, CocoInstances, DataError, ImageFolderClassification
from uniperceiver_v2.data.check import main as check_main
from uniperceiver_v2.data.preflight import (
    FILE_NOT_FOUND,
    FILE_UNREADABLE,
    SIZE_MISMATCH,
    check_dataset,
    check_images,
)
from uniperceiver_v2.engine.data_setup import (
    build_task_dataset,
    build_task_datasets,
    data_report,
    format_data_report,
    save_data_report,
)

FIXTURES = Path(__file__).parent / "fixtures" / "data"


SCENE_SIZE = (32, 24)   # (W, H)
SPLIT_IMAGES = {"train": (1, 2), "val": (3,)}


def make_data_root(root: Path) -> Path:
    """A complete data set for every task of the tiny config, without a synthetic-suite manifest (a user's data)."""
    for split, ids in SPLIT_IMAGES.items():
        images, instances, captions = [], [], []
        for image_id in ids:
            name = f"{image_id:03d}.png"
            path = root / "scenes" / split / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", SCENE_SIZE, (200, 30, 30)).save(path)
            images.append({"id": image_id, "file_name": name, "width": SCENE_SIZE[0], "height": SCENE_SIZE[1]})
            instances.append({"id": 10 * image_id, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                              "bbox": [4.0, 4.0, 10.0, 8.0], "segmentation": [[4, 4, 14, 4, 14, 12, 4, 12]]})
            captions.append({"id": 10 * image_id, "image_id": image_id, "caption": "a red square"})
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": instances, "categories": [{"id": 1, "name": "square"}]}))
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": captions}))
        for colour, folder in (((0, 0, 250), "circle"), ((250, 0, 0), "square")):
            path = root / "classification" / split / folder / "0.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), colour).save(path)
        (root / "text").mkdir(exist_ok=True)
        (root / "text" / f"corpus_{split}.txt").write_text("a red square\nthe blue circle\n")
    return root


def _truncate(png: Path) -> None:
    """Cut a PNG file just after the start of its pixel data: the header still reads, the pixels do not."""
    content = png.read_bytes()
    png.write_bytes(content[:content.index(b"IDAT") + 8])


@pytest.fixture
def data_root(tmp_path) -> Path:
    return make_data_root(tmp_path / "data")


def _config(root: Path, *overrides: str):
    return load_config("tiny", [f"data.root={root}", *overrides])


# ---------------------------------------------------------------------------------------------------
# the check of one file and of one dataset
# ---------------------------------------------------------------------------------------------------


def test_each_kind_of_bad_file_is_found_and_named(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(FIXTURES / "images", folder)
    (folder / "gray.png").unlink()
    (folder / "rgba.png").write_bytes(b"not an image at all")
    _truncate(folder / "palette.png")
    data = json.loads((FIXTURES / "instances.json").read_text())
    data["images"][4]["width"] = 20   # gray16.png is 16x12
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(data))
    files = CocoInstances(folder, ann_file).image_files()

    headers = check_images(files)
    assert {path.name: reason for path, (reason, _) in headers.items()} == {
        "gray.png": FILE_NOT_FOUND, "rgba.png": FILE_UNREADABLE, "gray16.png": SIZE_MISMATCH}
    assert "image id=11" in headers[folder / "gray.png"][1]
    assert "the file is 16x12 (WxH), the record says 20x12" in headers[folder / "gray16.png"][1]
    # A truncated file passes the header check; decoding it whole finds it.
    assert check_images(files, decode=True)[folder / "palette.png"][0] == FILE_UNREADABLE


def test_error_policy_lists_the_bad_files_with_their_records(tmp_path):
    folder = tmp_path / "images"
    shutil.copytree(FIXTURES / "images", folder)
    (folder / "gray.png").unlink()
    dataset = CocoInstances(folder, FIXTURES / "instances.json")
    with pytest.raises(DataError) as error:
        check_dataset(dataset)
    message = str(error.value)
    assert "instances.json: 1 of 5 image files cannot be used" in message
    assert f"image file not found: {folder / 'gray.png'} (image id=11 in" in message
    assert "data.on_invalid=skip" in message and "data.preflight=false" in message
    assert len(dataset) == 5   # nothing dropped under "error"


@pytest.mark.parametrize("reader", ["instances", "captions", "classification"])
def test_skip_policy_drops_the_records_of_bad_files_and_counts_them(tmp_path, reader):
    if reader == "classification":
        root = tmp_path / "imagefolder"
        shutil.copytree(FIXTURES / "imagefolder", root)
        victim = sorted(root.rglob("*.png"))[0]
        dataset = ImageFolderClassification(root, on_invalid="skip")
        labels_before = dict(zip([str(f.path) for f in dataset.image_files()], dataset.labels))
    else:
        folder = tmp_path / "images"
        shutil.copytree(FIXTURES / "images", folder)
        victim = folder / "gray.png"
        dataset = (CocoInstances(folder, FIXTURES / "instances.json", on_invalid="skip") if reader == "instances"
                   else CocoCaptions(folder, FIXTURES / "captions.json", iterate="image", on_invalid="skip"))
    size = len(dataset)
    victim.write_bytes(b"garbage")
    problems = check_dataset(dataset)
    assert list(problems) == [victim]
    assert len(dataset) == size - 1 and victim not in {f.path for f in dataset.image_files()}
    summary = dataset.summary()
    assert summary.skipped[FILE_UNREADABLE] == 1 and summary.invalid == {FILE_UNREADABLE: 1}
    assert victim.name in summary.examples[FILE_UNREADABLE][0]
    assert summary.kept["images"] == size - 1
    if reader == "classification":   # class indices do not move
        assert all(labels_before[str(f.path)] == label for f, label in zip(dataset.image_files(), dataset.labels))


# ---------------------------------------------------------------------------------------------------
# through the config: data.preflight, data.on_invalid, the run's report
# ---------------------------------------------------------------------------------------------------


def test_a_missing_scene_stops_the_build_unless_the_check_is_off(data_root):
    (data_root / "scenes" / "train" / "002.png").unlink()
    with pytest.raises(DataError, match=r"002\.png \(image id=2 in .*instances_train\.json\)"):
        build_task_dataset(_config(data_root), "detection", "train", train=True)
    unchecked = build_task_dataset(_config(data_root, "data.preflight=false"), "detection", "train", train=True)
    assert len(unchecked) == 2   # found only when sampled, as before the check existed
    with pytest.raises(DataError, match="image file not found"):
        unchecked[1]


def test_on_invalid_from_the_config_reaches_every_reader(data_root):
    data = json.loads((data_root / "annotations" / "instances_train.json").read_text())
    data["annotations"][0]["bbox"] = [4.0, 4.0, 0.0, 8.0]   # degenerate box: unusable, not malformed
    (data_root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    (data_root / "text" / "corpus_train.txt").write_bytes(b"a red square\n\xff broken\n")
    with pytest.raises(DataError, match=r"annotation id=10 .*degenerate box .*set data\.on_invalid=skip"):
        build_task_dataset(_config(data_root), "detection", "train", train=True)
    datasets = build_task_datasets(_config(data_root, "data.on_invalid=skip"), "train", train=True)
    assert {name: dataset.on_invalid for name, dataset in datasets.items()} == {name: "skip" for name in datasets}
    assert datasets["detection"].summary().invalid == {"degenerate box (width 0.0, height 8.0)": 1}
    assert datasets["mlm"].summary().invalid == {"line is not valid UTF-8": 1}


def test_the_run_report_lists_what_was_skipped_and_why(data_root, tmp_path):
    (data_root / "scenes" / "train" / "002.png").unlink()
    (data_root / "scenes" / "val" / "003.png").write_bytes(b"broken")
    cfg = _config(data_root, "data.on_invalid=skip")
    datasets = build_task_datasets(cfg, "train", train=True)
    with pytest.raises(DataError, match="no usable record left"):   # the only validation scene is broken
        data_report(cfg, datasets, eval_split="val")
    shutil.copy(data_root / "scenes" / "train" / "001.png", data_root / "scenes" / "val" / "003.png")
    report = data_report(cfg, datasets, eval_split="val")
    assert set(report["datasets"]) == {f"{split}/{task}" for split in ("train", "val")
                                       for task in ("classification", "detection", "captioning", "retrieval", "mlm")}
    assert report["datasets"]["train/detection"]["skipped"] == {FILE_NOT_FOUND: 1}
    assert report["datasets"]["train/captioning"]["kept"] == {"images": 1, "captions": 1}
    assert report["datasets"]["val/detection"]["skipped"] == {}
    text = format_data_report(report)
    assert "data.on_invalid=skip" in text and "train/detection: kept images 1" in text
    assert f"e.g. {FILE_NOT_FOUND}: {data_root / 'scenes' / 'train' / '002.png'} (image id=2 in" in text
    saved = json.loads(save_data_report(report, tmp_path / "run").read_text())
    assert saved == json.loads(json.dumps(report))


def test_an_evaluation_split_that_cannot_be_read_is_listed_not_fatal(data_root, caplog):
    """As the evaluator skips a task whose split data is missing, the report lists it (and warns) before training."""
    (data_root / "text" / "corpus_val.txt").unlink()
    cfg = _config(data_root)
    report = data_report(cfg, build_task_datasets(cfg, "train", train=True), eval_split="val")
    assert "val/mlm" not in report["datasets"] and "text corpus not found" in report["unreadable"]["val/mlm"]
    assert "val/mlm: cannot be read: text corpus not found" in format_data_report(report)
    assert "its evaluation will be skipped" in caplog.text


def test_train_refuses_a_missing_image_before_building_the_model(data_root, tmp_path, capsys, monkeypatch):
    """One missing image among many used to surface only if sampled; now train exits 2 before the first step."""
    from uniperceiver_v2.engine import build
    from uniperceiver_v2.train import main as train_main

    monkeypatch.setattr(build, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    (data_root / "scenes" / "train" / "002.png").unlink()
    code = train_main(["--config", "tiny", f"data.root={data_root}", f"run.output_dir={tmp_path / 'run'}",
                       "--no-eval", "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "002.png" in err and "image id=2" in err and "data.on_invalid=skip" in err


def test_train_prints_and_saves_the_data_report(data_root, tmp_path, capsys, monkeypatch):
    """train's wiring with the model and the trainer stubbed out: the report is printed and saved in the run dir."""
    from uniperceiver_v2.engine import build, trainer
    from uniperceiver_v2.train import main as train_main

    def fake_build_training(cfg):
        from uniperceiver_v2.engine.data_setup import ensure_data

        ensure_data(cfg)
        return None, {}, build_task_datasets(cfg, cfg.data.train_split, train=True)

    class FakeTrainer:
        def __init__(self, *args, **kwargs):
            self.elapsed = 0.0

        def train(self):
            return types.SimpleNamespace(interrupted_by=None, iteration=0, final_losses={})

    monkeypatch.setattr(build, "build_training", fake_build_training)
    monkeypatch.setattr(trainer, "Trainer", FakeTrainer)
    (data_root / "classification" / "train" / "circle" / "0.png").write_bytes(b"broken")
    run_dir = tmp_path / "run"
    code = train_main(["--config", "tiny", f"data.root={data_root}", f"run.output_dir={run_dir}",
                       "data.on_invalid=skip", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "train/classification: kept images 1, classes 2; skipped image file cannot be decoded 1" in out
    report = json.loads((run_dir / "data_check.json").read_text())
    assert report["datasets"]["train/classification"]["invalid"] == {FILE_UNREADABLE: 1}
    assert "val/mlm" in report["datasets"]   # evaluation is on: its split was checked before training


# ---------------------------------------------------------------------------------------------------
# python -m uniperceiver_v2.data.check
# ---------------------------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


def test_check_command_passes_a_clean_root_and_writes_nothing_there(data_root, tmp_path, capsys):
    before = _files(data_root)
    assert check_main([str(data_root), "--json", str(tmp_path / "report.json")]) == 0
    out = capsys.readouterr().out
    assert "no problem found; whole images decoded" in out and "val/detection: kept images 1" in out
    assert "every image file decoded" in out
    assert _files(data_root) == before
    assert json.loads((tmp_path / "report.json").read_text())["problems"] == 0


def test_check_command_reports_every_problem_and_exits_1(data_root, capsys):
    (data_root / "scenes" / "train" / "002.png").unlink()
    _truncate(data_root / "scenes" / "val" / "003.png")
    (data_root / "annotations" / "captions_val.json").write_text('{"images": [], "annotations": null}')
    assert check_main([str(data_root), "--header-only"]) == 1
    out = capsys.readouterr().out
    assert f"e.g. {FILE_NOT_FOUND}: {data_root / 'scenes' / 'train' / '002.png'} (image id=2 in" in out
    assert "val/captioning: cannot be read:" in out and "'annotations' must be a list, got null" in out
    assert "003.png" not in out   # its header is intact
    assert check_main([str(data_root)]) == 1   # decoding every image whole finds the truncated one
    out = capsys.readouterr().out
    assert "val/detection: kept images 0" in out
    assert f"e.g. {FILE_UNREADABLE}: cannot decode image file {data_root / 'scenes' / 'val' / '003.png'}" in out


def test_check_command_split_and_config_options(data_root, tmp_path, capsys):
    (data_root / "scenes" / "val" / "003.png").unlink()
    assert check_main([str(data_root), "--split", "train"]) == 0
    assert "val/" not in capsys.readouterr().out
    assert check_main([str(data_root), "--split", "val", "tasks.detection.enabled=false",
                       "tasks.captioning.enabled=false", "tasks.retrieval.enabled=false"]) == 0
    assert check_main([str(data_root), "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert check_main([str(tmp_path / "absent")]) == 2
