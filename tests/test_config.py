"""Configs: YAML round trip, overrides, validation errors that name the key, and the paper presets."""

import dataclasses

import pytest
import yaml

from uniperceiver_v2.config import (
    PRESETS,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    get_preset,
    load_config,
    load_yaml,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip_is_exact(name, tmp_path):
    cfg = get_preset(name)
    path = tmp_path / f"{name}.yaml"
    cfg.save_yaml(path)
    again = load_yaml(path)
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()
    assert again.hash() == cfg.hash()


def test_partial_yaml_starts_from_its_preset(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("preset: r50\ndecoder:\n  depth: 2\noptim:\n  lr: 1e-5\n")
    cfg = load_yaml(path)
    assert cfg.decoder.depth == 2
    assert cfg.optim.lr == pytest.approx(1e-5)
    assert cfg.image_encoder.num_queries == 300          # the rest comes from r50


def test_overrides_parse_values_as_yaml():
    cfg = apply_overrides(get_preset("tiny"), ["decoder.moe.top_k=1", "optim.lr=3e-4", "tasks.mlm.enabled=false",
                                               "optim.decay_at=[0.5, 0.9]", "text_encoder.path=/x/y"])
    assert cfg.decoder.moe.top_k == 1
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.tasks.mlm.enabled is False
    assert "mlm" not in cfg.tasks.names()
    assert cfg.optim.decay_at == [0.5, 0.9]
    assert cfg.text_encoder.path == "/x/y"


def test_load_config_accepts_a_preset_or_a_file(tmp_path):
    assert load_config("swin_base").image_encoder.num_queries == 900
    path = tmp_path / "c.yaml"
    get_preset("tiny").save_yaml(path)
    assert load_config(path, ["run.iterations=70"]).run.iterations == 70


@pytest.mark.parametrize("override, key", [
    ("decoder.moe.top_k=9", "decoder.moe.top_k"),                       # top-k > number of experts
    ("tasks.retrieval.sampling_weight=-0.1", "tasks.retrieval.sampling_weight"),
    ("image_encoder.topk_queries=1000", "image_encoder.topk_queries"),  # > num_queries
    ("decoder.moee.top_k=2", "decoder.moee"),                           # unknown key
    ("optim.lr=fast", "optim.lr"),                                      # wrong type
    ("run.iterations=1.5", "run.iterations"),
    ("decoder.moe.routing=expert", "decoder.moe.routing"),
    ("image_encoder.num_feature_levels=2", "image_encoder.num_feature_levels"),
    ("image_encoder.use_denoising=maybe", "image_encoder.use_denoising"),
    ("decoder.width=102", "decoder.width"),                             # not divisible by heads
    ("data.det_min_size=500", "data.det_min_size"),
    ("data.zoom_out_prob=1.5", "data.zoom_out_prob"),
    ("tasks.detection.seen_penalties=[2, -1]", "tasks.detection.seen_penalties"),
    ("tasks.detection.mask_box_iou=1.5", "tasks.detection.mask_box_iou"),
    ("data.zoom_out_min_scale=0", "data.zoom_out_min_scale"),
    ("preset=r51", "preset"),
    ("tasks.classification.start_iteration=-3", "tasks.classification.start_iteration"),
    ("tasks.classification.start_iteration=2.5", "tasks.classification.start_iteration"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        apply_overrides(get_preset("tiny"), [override])
    assert str(err.value).startswith(key), str(err.value)


def test_some_task_must_start_at_iteration_zero():
    late = [f"tasks.{name}.start_iteration=5" for name in ("classification", "detection", "mlm", "captioning",
                                                             "retrieval")]
    with pytest.raises(ConfigError, match="^tasks: no enabled task .* starts at iteration 0"):
        apply_overrides(get_preset("tiny"), late)
    # a late task is fine while another one runs from the start; a disabled task's start does not count
    assert apply_overrides(get_preset("tiny"), late[1:] + ["tasks.classification.start_iteration=0"])
    with pytest.raises(ConfigError, match="^tasks: no enabled task"):
        apply_overrides(get_preset("tiny"), late[:4] + ["tasks.retrieval.enabled=false"])


def test_task_moments_need_unmixed_mt_adamw():
    assert apply_overrides(get_preset("tiny"), ["optim.task_moments=true"]).optim.task_moments
    with pytest.raises(ConfigError, match="^optim.task_moments"):
        apply_overrides(get_preset("tiny"), ["optim.task_moments=true", "run.sampling=mixed"])


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("decoder: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_yaml(path)
    path.write_text("decoder:\n  widht: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: decoder.widht: unknown key"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(get_preset("tiny"), ["decoder.depth"])


def test_all_tasks_disabled_is_an_error():
    data = {"tasks": {n: {"enabled": False} for n in get_preset("tiny").tasks.names()}}
    with pytest.raises(ConfigError, match="^tasks"):
        config_from_dict(data, get_preset("tiny"))


@pytest.mark.parametrize("override, key, message", [
    ("optim.lr=inf", "optim.lr", "must be a finite number, got inf"),
    ("optim.lr=.nan", "optim.lr", "must be a finite number, got nan"),
    ("optim.lr=0", "optim.lr", "must be > 0"),
    ("optim.lr=-1e-4", "optim.lr", "must be > 0"),
    ("optim.weight_decay=nan", "optim.weight_decay", "must be a finite number"),
    ("tasks.mlm.loss_weight=.inf", "tasks.mlm.loss_weight", "must be a finite number"),
    ("tasks.detection.sampling_weight=nan", "tasks.detection.sampling_weight", "must be a finite number"),
    ("optim.betas=[0.9, nan]", "optim.betas[1]", "must be a finite number"),
    ("run.iterations=19", "run.iterations", "19 is shorter than the warm-up optim.warmup_iters=20"),
    ("optim.decay_at=[0.05]", "optim.decay_at", "falls inside the warm-up optim.warmup_iters=20"),
    ("optim.decay_at=[0.9, 0.5]", "optim.decay_at", "must be increasing"),
    ("data.on_invalid=ignore", "data.on_invalid", "'ignore' not in ('error', 'skip')"),
    ("data.preflight=sometimes", "data.preflight", "expected true/false"),
    ("text_encoder.output_layer=0", "text_encoder.output_layer", "must be >= 1"),
    ("tasks.mlm.masked_input=mask", "tasks.mlm.masked_input", "must be one of ('spe', 'encoder'), got 'mask'"),
])
def test_values_that_would_fail_after_model_loading_are_refused_by_load_config(override, key, message):
    """Refused by ``load_config``, before seconds of model loading (or a run that ends with "loss is nan")."""
    with pytest.raises(ConfigError) as err:
        load_config("tiny", [override])
    assert str(err.value).startswith(f"{key}: ") and message in str(err.value), str(err.value)


def test_the_schedule_conditions_accept_their_limits():
    assert load_config("tiny", ["run.iterations=25"]).run.iterations == 25            # first decay at 20 = warm-up
    assert load_config("tiny", ["run.iterations=20", "optim.decay_at=[1.0]"]).run.iterations == 20
    assert load_config("tiny", ["run.iterations=5", "optim.warmup_iters=0"]).run.iterations == 5


def test_image_sizes_far_above_the_presets_warn_naming_key_value_and_preset_value():
    with pytest.warns(UserWarning) as record:
        load_config("tiny", ["data.det_crop_size=1000", "data.det_max_size=1000", "data.det_max_long=1200"])
    messages = sorted(str(w.message).split(":")[0] for w in record)
    assert messages == ["data.det_crop_size=1000 is 7.8x the tiny preset's 128",
                        "data.det_max_long=1200 is 6.2x the tiny preset's 192",
                        "data.det_max_size=1000 is 6.2x the tiny preset's 160"]
    with pytest.warns(UserWarning, match=r"data\.image_size=512 is 2\.3x the r50 preset's 224") as record:
        load_config("r50", ["data.image_size=512"])
    assert len(record) == 1


def test_preset_image_sizes_and_moderate_changes_do_not_warn(recwarn):
    for name in PRESETS:
        get_preset(name)
    load_config("tiny", ["data.image_size=256", "data.det_crop_size=160"])   # at most 2x
    assert [str(w.message) for w in recwarn if "data." in str(w.message)] == []


def test_the_config_knows_the_readers_on_invalid_policies():
    from uniperceiver_v2.config import INVALID_POLICIES
    from uniperceiver_v2.data.summary import INVALID_POLICIES as READER_POLICIES

    assert INVALID_POLICIES == READER_POLICIES
    cfg = get_preset("tiny")
    assert cfg.data.on_invalid == "error" and cfg.data.preflight is True


# ---------------------------------------------------------------------------------------------------------------
# The paper presets carry the paper's hyper-parameters verbatim (v2 paper: Tab. 7, Tab. 8, Sec. 5.2, appendix B).
# The expected values below are typed in from Tab. 7, Tab. 8, Sec. 5.2 and appendix B, not read from config.py.
# ---------------------------------------------------------------------------------------------------------------
TAB7 = dict(enc_layers=6, dec_layers=6, dim_feedforward=2048, hidden_dim=256, dropout=0.0, nheads=8,
            topk_queries=200, enc_n_points=4, dec_n_points=4,
            cls_cost_coef=2.0, bbox_cost_coef=5.0, giou_cost_coef=2.0, mask_cost_coef=5.0, dice_cost_coef=5.0,
            cls_loss_coef=2.0, bbox_loss_coef=5.0, giou_loss_coef=2.0, mask_loss_coef=5.0, dice_loss_coef=5.0,
            dn_box_noise_scale=1.0, dn_label_noise_ratio=0.5, mask_points=112 * 112, num_feature_levels=4,
            num_global_pools=10, mask_pool_size=28)
TAB8 = {  # task: (batch size per GPU, sampling weight s_k, scaling factor w_k), captioning/retrieval summed
    "classification": (28, 0.1, 1.0),
    "detection": (1, 0.25, 1.0),
    "mlm": (256, 0.05, 0.5),
    "captioning": (24, 0.3, 0.5),
    "retrieval": (28, 0.3, 1.0),
}
PAPER = {  # preset: (backbone, num_queries, image size, iterations)
    "r50": ("resnet50", 300, 224, 150_000),
    "swin_base": ("swin_base_patch4_window12_384", 900, 384, 200_000),
    "swin_large": ("swin_large_patch4_window12_384", 900, 384, 200_000),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_match_the_paper(name):
    cfg = get_preset(name)
    backbone, num_queries, image_size, iterations = PAPER[name]
    ie = cfg.image_encoder
    assert ie.backbone == backbone and ie.num_queries == num_queries
    for key, value in TAB7.items():
        assert getattr(ie, key) == value, f"image_encoder.{key}"
    assert ie.use_denoising and ie.use_global and ie.use_regional

    dec = cfg.decoder                                     # BERT-base width, 6 layers, appendix B
    assert (dec.width, dec.heads, dec.ffn_dim, dec.depth) == (768, 12, 3072, 6)
    assert dec.drop_path == 0.1 and dec.layer_scale is False
    assert (dec.moe.routing, dec.moe.num_experts, dec.moe.placement) == ("attribute", 8, ["ffn"])
    assert dec.temperature_init == 0.07 and dec.logit_scale_max == 100.0

    assert cfg.text_encoder.name == "roberta-base" and cfg.text_encoder.lr_mult == 0.1

    o = cfg.optim                                         # Sec. 5.2
    assert o.name == "mt_adamw" and o.lr == 1e-4 and o.weight_decay == 1e-4 and o.encoder_lr_mult == 0.1
    assert o.normalize and o.compensate
    assert o.decay_at == [0.8] and o.decay_factor == 0.1  # x0.1 at 160k of 200k
    assert cfg.run.iterations == iterations and cfg.run.sampling == "unmixed"
    assert cfg.tasks.retrieval.gather

    for task, (batch, s_k, w_k) in TAB8.items():
        t = cfg.tasks.get(task)
        assert (t.batch_size, t.sampling_weight, t.loss_weight) == (batch, s_k, w_k), task
        assert t.label_smoothing == (0.0 if task == "mlm" else 0.1), task
    assert cfg.tasks.mlm.mask_prob == 0.15

    d = cfg.data                                          # appendix B "Data augmentation"
    assert d.image_size == image_size
    assert (d.det_min_size, d.det_max_size, d.det_max_long, d.det_crop_size) == (200, 1800, 2400, 1600)
    assert (d.det_eval_size, d.det_eval_max_long) == (1400, 1600)


def test_every_field_is_yaml_friendly():
    """Only plain types appear in the serialised config (no tuples, no objects)."""
    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        else:
            assert x is None or isinstance(x, (bool, int, float, str)), x
    for name in PRESETS:
        walk(yaml.safe_load(get_preset(name).to_yaml()))
    assert dataclasses.is_dataclass(Config)
