"""Image backbones: multi-scale feature maps F_0..F_3 at strides 4, 8, 16, 32 (Sec. 4.1, appendix A).

* ``tiny_convnet``: the package's own small convolutional network for CPU training (widths
  ``image_encoder.backbone_channels``), GroupNorm so that it trains with batches of 1-4 images.
* any timm model with a ``features_only`` mode, e.g. ``resnet50``, ``swin_base_patch4_window12_384``,
  ``swin_large_patch4_window12_384`` (the paper's backbones). Swin is built with ``strict_img_size=False`` so it
  takes any input size divisible by 32 (the detection images vary in size); its NHWC features are permuted to NCHW.

Weights are never downloaded: the backbone is randomly initialised unless ``image_encoder.backbone_weights`` names a
local file (safetensors, or a torch checkpoint read with ``weights_only=True``) holding the state dict of the plain
timm model (``timm.create_model(name).state_dict()``, optionally nested under "model" or "state_dict").

BatchNorm of a *pretrained* timm backbone (ResNet-50) is frozen (``FREEZE_PRETRAINED_BATCHNORM``), as in DETR and
Mask DINO: detection batches hold one image per GPU (Tab. 8), too few for batch statistics. A randomly initialised
backbone keeps trainable BatchNorm, which it needs to train from scratch.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import timm
from timm.layers import freeze_batch_norm_2d
import torch
import torch.nn as nn

STRIDES = (4, 8, 16, 32)
FREEZE_PRETRAINED_BATCHNORM = True


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


# Per-family construction arguments: Swin must accept inputs of any size (multiples of 32).
_TIMM_KWARGS = {"swin": {"strict_img_size": False}}


def _timm_kwargs(name: str) -> dict:
    return next((kw for prefix, kw in _TIMM_KWARGS.items() if name.startswith(prefix)), {})


class TimmBackbone(nn.Module):
    """A timm model in ``features_only`` mode returning the stride-4, 8, 16 and 32 maps as NCHW tensors.

    ``weights``: optional local state dict of the plain timm model (see ``load_backbone_weights``); when given,
    BatchNorm layers are then frozen (``FREEZE_PRETRAINED_BATCHNORM``).
    """

    def __init__(self, name: str, weights: str | Path | None = None):
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
        if weights is not None:
            load_backbone_weights(body, weights, name)
            if FREEZE_PRETRAINED_BATCHNORM:
                body = freeze_batch_norm_2d(body)
        self.body = body

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, C_l, H / s_l, W / s_l) for s_l in 4, 8, 16, 32]."""
        features = self.body(images)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]
        return features


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


def build_backbone(name: str, channels: list[int], weights: str | None = None) -> nn.Module:
    """``image_encoder.backbone`` -> a module mapping (B, 3, H, W) images to 4 maps at strides 4, 8, 16, 32.

    The module exposes ``channels`` (4 ints) and ``strides`` ([4, 8, 16, 32]).
    """
    if name != "tiny_convnet":
        return TimmBackbone(name, weights)
    backbone = TinyConvNet(channels)
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return backbone
