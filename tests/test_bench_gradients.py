"""``bench gradients``: per-task gradient norms and their split over parameter groups, checked by a recount."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, tiny_model

from uniperceiver_v2.bench import gradients
from uniperceiver_v2.engine.build import vocabulary_texts
from uniperceiver_v2.engine.data_setup import build_task_dataset


@pytest.fixture(scope="module")
def model_and_config(synthetic_root):
    cfg = tiny_config()
    cfg.data.root = str(synthetic_root)
    cfg.data.synthetic_profile = None
    for name in cfg.tasks.names():
        cfg.tasks.get(name).batch_size = 2
    # the language tasks' vocabulary from the suite's texts, as training builds it (a masked word outside the
    # vocabulary is no target, and the helpers' four captions would leave MLM without any)
    datasets = {name: build_task_dataset(cfg, name, "train", train=True) for name in ("captioning", "mlm")}
    return tiny_model(cfg, texts=list(vocabulary_texts(datasets))).eval(), cfg


@pytest.fixture(scope="module")
def results(model_and_config):
    model, cfg = model_and_config
    return gradients.task_gradients(model, cfg, split="train", batches=1)


def test_every_parameter_of_the_tiny_model_has_a_named_group(model_and_config):
    model, _ = model_and_config
    groups = {gradients.parameter_group(name) for name, p in model.named_parameters() if p.requires_grad}
    assert "other" not in groups
    assert {"backbone", "proposal network", "image encoder rest", "unified decoder", "logit scales"} <= groups
    assert gradients.parameter_group("text_encoder.model.embeddings.word_embeddings.weight") == "text encoder"


def test_every_enabled_task_is_measured_and_its_shares_add_up_to_one(model_and_config, results):
    model, cfg = model_and_config
    assert list(results) == list(cfg.tasks.names())
    for task, row in results.items():
        assert set(row["shares"]) == set(gradients.GRADIENT_GROUPS)
        assert sum(row["shares"].values()) == pytest.approx(1.0, abs=1e-9), task
        assert row["norm"] > 0 and row["weight"] == cfg.tasks.get(task).loss_weight
    assert not model.training                                   # the mode is restored


def test_a_text_only_task_does_not_reach_the_image_encoder(results):
    shares = results["mlm"]["shares"]
    assert shares["backbone"] == 0 and shares["proposal network"] == 0 and shares["image encoder rest"] == 0
    assert shares["unified decoder"] > 0
    assert results["detection"]["shares"]["backbone"] > 0


@pytest.mark.parametrize("task_name", ["detection", "mlm"])
def test_the_norm_equals_a_direct_computation(model_and_config, results, task_name):
    from uniperceiver_v2.engine.data_setup import TaskStream
    from uniperceiver_v2.tasks import TASKS

    model, cfg = model_and_config
    dataset = build_task_dataset(cfg, task_name, "train", train=True)
    task = TASKS[task_name].from_dataset(cfg.tasks.get(task_name), dataset)
    batch = next(TaskStream(task_name, dataset, task.collate, 2, seed=cfg.run.seed))
    model.train()
    try:
        torch.manual_seed(cfg.run.seed)
        loss = task.loss(model, batch)["loss"]
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.eval()
    direct = torch.sqrt(sum(g.double().square().sum() for g in grads if g is not None)).item()
    assert results[task_name]["norm"] == pytest.approx(direct, rel=1e-6)
    backbone = sum(g.double().square().sum().item() for n, g in zip(names, grads)
                   if g is not None and n.startswith("image_encoder.backbone."))
    assert results[task_name]["shares"]["backbone"] == pytest.approx(backbone / direct ** 2, rel=1e-6, abs=1e-12)


def test_main_prints_one_row_per_task(model_and_config, monkeypatch, capsys, synthetic_root):
    model, _ = model_and_config
    monkeypatch.setattr("uniperceiver_v2.engine.build.build_model", lambda config, checkpoint: model)
    assert gradients.main(["--checkpoint", "runs/x", "--batches", "1", "tasks.classification.enabled=false",
                           "tasks.captioning.enabled=false", "tasks.retrieval.enabled=false",
                           "tasks.detection.enabled=false"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "|g|" in lines[1] and "backbone" in lines[1] and "proposal network" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["mlm"]
    with pytest.raises(SystemExit):
        gradients.main(["--checkpoint", "x", "--batches", "0"])
