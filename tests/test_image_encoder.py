"""ImageEncoder (Sec. 4.1): token layout of eq. (1), eq. (2) fusion and its detach, eq. (3) pooling, gradient flow,
the ablation switches, every preset, backbone weight loading and post-processing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from uniperceiver_v2.config import get_preset
from uniperceiver_v2.modeling import ImageEncoder, postprocess
from uniperceiver_v2.modeling.backbone import TimmBackbone, TinyConvNet, build_backbone, load_backbone_weights
from uniperceiver_v2.modeling.global_pooling import GLOBAL_FLATTENED, GLOBAL_POOLED, GlobalAttentionPooling
from uniperceiver_v2.modeling.image_encoder import REGIONAL
from uniperceiver_v2.modeling.region_proposal import ProposalFusion

torch.set_num_threads(1)


def tiny_cfg(**overrides):
    return dataclasses.replace(get_preset("tiny").image_encoder, **overrides)


def _scene(height: int, width: int, boxes: list[list[int]]) -> dict:
    """Targets for rectangles given as integer xyxy pixel boxes."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        masks[k, y1:y2, x1:x2] = True
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4), "masks": masks,
            "labels": torch.zeros(len(boxes), dtype=torch.long), "size": torch.tensor([height, width])}


def _batch():
    """Two images padded to 64 x 80: the first 64 x 80, the second 48 x 56."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 64, 80)
    padding = torch.zeros(2, 64, 80, dtype=torch.bool)
    padding[1, 48:] = True
    padding[1, :, 56:] = True
    images[1][:, padding[1]] = 0
    targets = [_scene(64, 80, [[4, 6, 30, 40], [40, 10, 76, 30]]), _scene(48, 56, [[10, 10, 40, 30]])]
    return images, padding, targets


def test_tiny_token_layout_and_outputs():
    cfg = tiny_cfg()
    model = ImageEncoder(cfg).eval()
    images, padding, _ = _batch()
    with torch.no_grad():
        out = model(images, padding)
    batch, d = 2, cfg.hidden_dim
    assert model.output_dim == d
    assert out.padded_size == (64, 96)                                       # padded to a multiple of 32
    assert out.image_sizes.tolist() == [[64, 80], [48, 56]]
    h, w = out.global_map_size
    assert (h, w) == (2, 3)
    n_pool, n_flat = cfg.num_global_pools, h * w
    num_queries = min(cfg.num_queries, 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2)   # S positions of the 4 levels
    num_kept = min(cfg.topk_queries, num_queries)
    assert out.num_global == n_pool + n_flat
    assert out.tokens.shape == (batch, n_pool + n_flat + num_kept, d)
    expected_types = [GLOBAL_POOLED] * n_pool + [GLOBAL_FLATTENED] * n_flat + [REGIONAL] * num_kept
    assert out.token_types.tolist() == [expected_types] * batch
    # padding: only flattened-map positions of the smaller image that lie in the padding
    flat_padding = out.token_padding_mask[:, n_pool:n_pool + n_flat].view(batch, h, w)
    expected = F.interpolate(F.pad(padding, (0, 16), value=True)[:, None].float(), size=(h, w))[:, 0].bool()
    assert flat_padding.equal(expected) and not out.token_padding_mask[0].any()
    assert not out.token_padding_mask[:, :n_pool].any() and not out.token_padding_mask[:, out.num_global:].any()
    # proposals: top-O of the last layer's objectness, boxes inside the unit square
    assert out.boxes.shape == (batch, num_kept, 4) and out.masks.shape == (batch, num_kept, 16, 24)
    assert ((out.boxes >= 0) & (out.boxes <= 1)).all()
    assert out.all_objectness.shape == (batch, num_queries) and out.all_boxes.shape == (batch, num_queries, 4)
    torch.testing.assert_close(out.objectness, out.all_objectness.gather(1, out.proposal_indices))
    assert (out.objectness[:, :-1] >= out.objectness[:, 1:]).all()
    top = out.all_objectness.topk(num_kept, dim=1).values
    torch.testing.assert_close(out.objectness, top)
    # visualisation outputs
    assert [m.shape[-2:] for m in out.encoder_objectness] == [(8, 12), (4, 6), (2, 3), (1, 2)]
    assert out.sampling_locations.shape == (batch, num_queries, cfg.nheads, 4, cfg.dec_n_points, 2)
    weights = out.attention_pool_weights
    assert weights.shape == (batch, n_pool, n_flat)
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, n_pool))
    assert (weights[1][:, expected[1].flatten()] == 0).all()                # padding gets no attention


@pytest.mark.parametrize("use_global,use_regional", [(True, False), (False, True)])
def test_ablation_switches_change_tokens_and_parameters(use_global, use_regional):
    model = ImageEncoder(tiny_cfg(use_global=use_global, use_regional=use_regional)).eval()
    images, padding, targets = _batch()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("global_representations") for n in names) == use_global
    assert any(n.startswith("region_proposals") for n in names) == use_regional
    with torch.no_grad():
        out = model(images, padding)
    if use_global:
        assert out.boxes is None and out.num_global == out.tokens.shape[1]
        assert (out.token_types < REGIONAL).all()
        with pytest.raises(ValueError, match="use_regional=false"):
            model(images, padding, targets)
    else:
        assert out.num_global == 0 and (out.token_types == REGIONAL).all()
        assert out.tokens.shape[1] == out.boxes.shape[1] and out.attention_pool_weights is None


def _grad_norm(module: torch.nn.Module) -> float:
    return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)


def test_gradients_reach_every_part():
    model = ImageEncoder(tiny_cfg()).train()
    images, padding, targets = _batch()
    out = model(images, padding, targets)
    assert {"rpn_enc_focal", "rpn_dec1_giou", "rpn_dn0_dice"} <= set(out.losses)
    assert all(torch.isfinite(v) for v in out.losses.values())
    (sum(out.losses.values()) + out.tokens.square().mean()).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    rpn = model.region_proposals
    parts = {"backbone": model.backbone, "encoder": rpn.encoder, "decoder": rpn.decoder, "mask head": rpn.mask_head,
             "objectness head": rpn.objectness_head, "box head (last layer)": rpn.box_head.layers[-1],
             "query selection": rpn.enc_output, "denoising content": rpn.denoising_content,
             "eq. (2) fusion": rpn.fusion, "eq. (3) attention pools": model.global_representations.pools,
             "eq. (3) projection": model.global_representations.proj, "input projections": rpn.input_proj}
    for name, module in parts.items():
        assert _grad_norm(module) > 0, name


def test_eq2_fusion_detaches_box_and_mask():
    """A loss on the regional tokens reaches q^sem (decoder, encoder, backbone) but never the box and mask heads:
    the box and mask representations are detached before fusing (appendix A). The paper's fusion (no appearance
    term; with it the pixel embedding is reached on purpose, see the next tests)."""
    model = ImageEncoder(tiny_cfg(mask_pooling="image", region_appearance_size=0)).train()
    images, padding, targets = _batch()
    out = model(images, padding, targets)
    out.tokens[:, out.num_global:].square().sum().backward()
    rpn = model.region_proposals
    for name, module in {"box head": rpn.box_head, "mask head": rpn.mask_head,
                         "objectness head": rpn.objectness_head}.items():
        assert _grad_norm(module) == 0, name
    for name, module in {"B projection": rpn.fusion.box_proj, "M projection": rpn.fusion.mask_proj,
                         "decoder": rpn.decoder, "encoder": rpn.encoder, "backbone": model.backbone}.items():
        assert _grad_norm(module) > 0, name


def test_fusion_pools_mask_probabilities_over_the_unpadded_region():
    fusion = ProposalFusion(hidden_dim=8, mask_pool_size=2)
    logits = torch.randn(1, 3, 6, 8)
    pooled = fusion.pool_masks(logits, [(4, 4)])
    expected = F.adaptive_avg_pool2d(logits[0, :, :4, :4].sigmoid(), 2).flatten(1)[None]
    torch.testing.assert_close(pooled, expected)
    changed = logits.clone()
    changed[..., 4:, :] = 100.0                                            # padding does not matter
    torch.testing.assert_close(fusion.pool_masks(changed, [(4, 4)]), pooled)


def test_empty_image_and_evaluation_mode():
    model = ImageEncoder(tiny_cfg()).train()
    images, padding, targets = _batch()
    targets[1] = _scene(48, 56, [])
    out = model(images, padding, targets)
    assert all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    model.eval()
    with torch.no_grad():
        evaluated = model(images, padding, targets)   # validation losses: no denoising queries in evaluation
    assert not any(k.startswith("rpn_dn") for k in evaluated.losses) and "rpn_dec1_l1" in evaluated.losses


def test_target_size_must_match_the_padding_mask():
    model = ImageEncoder(tiny_cfg()).eval()
    images, padding, targets = _batch()
    targets[1] = _scene(50, 56, [[1, 1, 5, 5]])
    with pytest.raises(ValueError, match=r"targets\[1\]\['size'\]"):
        model(images, padding, targets)


@pytest.mark.parametrize("preset,channels,num_queries,size", [
    ("r50", [256, 512, 1024, 2048], 300, (128, 128)),        # S = 340 positions >= 300 queries
    ("swin_base", [128, 256, 512, 1024], 900, (64, 96)),     # S < 900: N = S (see region_proposal.py)
    ("swin_large", [192, 384, 768, 1536], 900, (64, 64)),
])
def test_paper_presets_forward_backward(preset, channels, num_queries, size):
    """The paper architectures (Tab. 7) for real on small images, random init (nothing is downloaded);
    fewer mask points than the paper's 112 x 112 for speed."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset(preset).image_encoder, mask_points=256)
    model = ImageEncoder(cfg).train()
    assert model.backbone.channels == channels and model.backbone.strides == [4, 8, 16, 32]
    rpn = model.region_proposals
    assert len(rpn.encoder.layers) == 6 and len(rpn.decoder.layers) == 6 and model.output_dim == 256
    assert rpn.query_embed.num_embeddings == num_queries and len(rpn.extra_levels) == 1
    assert rpn.encoder.layers[0].self_attn.n_points == 4 and rpn.decoder.layers[0].cross_attn.n_levels == 4
    assert rpn.fusion.mask_proj.in_features == 28 * 28 and model.global_representations.pools.num_pools == 10

    height, width = size
    padding = torch.zeros(1, height, width, dtype=torch.bool)
    padding[:, :, width - 16:] = True                                       # exercise padding on every backbone
    out = model(torch.randn(1, 3, height, width), padding,
                [_scene(height, width - 16, [[4, 6, 30, 40], [20, 30, width - 20, height - 2]])])
    stride64 = (-(-height // 64), -(-width // 64))                          # 3x3 stride-2 conv: ceil
    positions = sum((height // s) * (width // s) for s in (8, 16, 32)) + stride64[0] * stride64[1]
    num_kept = min(200, num_queries, positions)
    assert out.tokens.shape == (1, 10 + (height // 32) * (width // 32) + num_kept, 256)
    assert out.all_boxes.shape == (1, min(num_queries, positions), 4)
    assert out.masks.shape == (1, num_kept, height // 4, width // 4)
    (sum(out.losses.values()) + out.tokens.square().mean()).backward()
    for module in (model.backbone, rpn.encoder, rpn.decoder, rpn.mask_head, model.global_representations):
        assert _grad_norm(module) > 0


def test_backbone_weights_load_and_errors(tmp_path):
    source = TinyConvNet([8, 16, 32, 64])
    torch.save(source.state_dict(), tmp_path / "tiny.pt")
    loaded = build_backbone("tiny_convnet", [8, 16, 32, 64], str(tmp_path / "tiny.pt"))
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        assert a.equal(b), name
    with pytest.raises(FileNotFoundError, match="backbone_weights"):
        build_backbone("tiny_convnet", [8, 16, 32, 64], str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="shape mismatches"):
        build_backbone("tiny_convnet", [8, 16, 32, 128], str(tmp_path / "tiny.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        build_backbone("tiny_convnet", [8, 16, 32, 64], str(tmp_path / "junk.pt"))


def test_timm_weights_from_a_plain_model_state_dict(tmp_path):
    """A plain timm checkpoint (nested stages `layers.0`, classifier head) loads into the features-only backbone."""
    import timm
    from safetensors.torch import save_file

    full = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, strict_img_size=False)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(tmp_path / "swin.safetensors"))
    backbone = TimmBackbone("swin_tiny_patch4_window7_224", weights=tmp_path / "swin.safetensors")
    own = backbone.state_dict()
    assert own["body.layers_2.blocks.1.mlp.fc1.weight"].equal(full.state_dict()["layers.2.blocks.1.mlp.fc1.weight"])
    unused = load_backbone_weights(backbone.body, tmp_path / "swin.safetensors")
    assert unused and all(k.startswith(("head", "norm")) for k in unused)


def test_pretrained_resnet_features_match_the_plain_model_with_frozen_batchnorm(tmp_path):
    import timm

    full = timm.create_model("resnet18", pretrained=False)
    with torch.no_grad():   # non-trivial BatchNorm statistics
        for module in full.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
    torch.save(full.state_dict(), tmp_path / "resnet18.pt")
    backbone = TimmBackbone("resnet18", weights=tmp_path / "resnet18.pt").train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = backbone(images)                                         # train mode: statistics stay frozen
        expected = full.eval().forward_features(images)
    assert [f.shape[1] for f in features] == [64, 128, 256, 512]
    torch.testing.assert_close(features[3], expected, atol=1e-5, rtol=1e-4)


def test_postprocess_boxes_and_masks():
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]])                          # centre half of the image
    masks = torch.full((1, 1, 16, 24), -20.0)                               # stride 4 of a 64 x 96 canvas
    masks[0, 0, 4:12, 5:15] = 20.0                                          # image rows 16:48, cols 20:60
    image_sizes = torch.tensor([[64, 80]])
    out = postprocess(boxes, masks, image_sizes, original_sizes=torch.tensor([[128, 160]]))[0]
    torch.testing.assert_close(out["boxes"], torch.tensor([[40.0, 32.0, 120.0, 96.0]]))
    assert out["masks"].shape == (1, 128, 160) and out["masks"].dtype == torch.bool
    expected = torch.zeros(128, 160, dtype=torch.bool)
    expected[32:96, 40:120] = True                                          # x2 of rows 16:48, cols 20:60
    assert (out["masks"][0] ^ expected).float().mean() < 0.01


def test_attention_pooling_matches_torch_multihead_attention():
    """Each of the M' pools is multi-head attention of its learned query over the map (eq. (3)); compare with
    torch's nn.MultiheadAttention given the same projections (query projection = identity)."""
    torch.manual_seed(0)
    dim, heads, pools = 16, 4, 3
    pooling = GlobalAttentionPooling(dim, pools, heads).double()
    tokens, pos = torch.randn(2, 7, dim, dtype=torch.float64), torch.randn(2, 7, dim, dtype=torch.float64)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    pooled, weights = pooling(tokens, pos, padding)
    for m in range(pools):
        mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).double()
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([torch.eye(dim), pooling.key_weight[m], pooling.value_weight[m]]))
            mha.in_proj_bias.copy_(torch.cat([torch.zeros(dim), pooling.key_bias[m], pooling.value_bias[m]]))
            mha.out_proj.weight.copy_(pooling.out_weight[m])
            mha.out_proj.bias.copy_(pooling.out_bias[m])
        query = pooling.query[m].detach().view(1, 1, dim).expand(2, 1, dim)
        expected, expected_weights = mha(query, tokens + pos, tokens, key_padding_mask=padding)
        torch.testing.assert_close(pooled[:, m], expected[:, 0])
        torch.testing.assert_close(weights[:, m], expected_weights[:, 0])


def test_attention_pooling_and_fusion_gradcheck():
    torch.manual_seed(0)
    pooling = GlobalAttentionPooling(8, 2, 2).double()
    tokens = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 5, 8, dtype=torch.float64)
    padding = torch.tensor([[False, False, False, True, False]])
    assert torch.autograd.gradcheck(lambda x: pooling(x, pos, padding)[0], (tokens,))
    fusion = ProposalFusion(hidden_dim=8, mask_pool_size=2).double()
    semantic = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    boxes, masks = torch.rand(1, 3, 4, dtype=torch.float64), torch.randn(1, 3, 6, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q: fusion(q, boxes, masks, [(4, 6)]), (semantic,))


def _linear_mask_logits(height: int, width: int) -> torch.Tensor:
    """(1, 1, H, W) logits whose probabilities grow linearly along x: p(x) = 0.1 + 0.8 * x / W at cell centre x."""
    centres = torch.arange(width, dtype=torch.float64) + 0.5
    probs = (0.1 + 0.8 * centres / width).expand(height, width)
    return torch.logit(probs)[None, None]


def test_box_mask_pooling_samples_the_mask_inside_the_box():
    """mask_pooling="box": RoI-aligned probabilities inside the box. Bilinear sampling is exact for a mask that is
    linear in x, so each pooled cell equals p at the cell's centre (closed form), whatever the box size."""
    fusion = ProposalFusion(hidden_dim=8, mask_pool_size=4, mask_pooling="box").double()
    logits = _linear_mask_logits(16, 20)
    valid = [(16, 20)]                                                   # the whole map is the image
    # box in normalised cxcywh: x from 0.25 to 0.75 of the width, y from 0.25 to 0.75
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5]]], dtype=torch.float64)
    pooled = fusion.pool_masks_in_boxes(logits, boxes, valid).view(4, 4)
    x1, x2 = 0.25 * 20, 0.75 * 20
    bin_centres = x1 + (torch.arange(4, dtype=torch.float64) + 0.5) * (x2 - x1) / 4
    expected = (0.1 + 0.8 * bin_centres / 20).expand(4, 4)
    torch.testing.assert_close(pooled, expected)
    # the image pooling averages over everything: one number per column band, independent of the box
    image = ProposalFusion(hidden_dim=8, mask_pool_size=4).double().pool_masks(logits, valid).view(4, 4)
    assert not torch.allclose(image, pooled)
    # a small object keeps its shape: a 3 x 3 cell cross in a 16 x 20 map pooled in its box
    cross = torch.full((1, 1, 16, 20), -10.0, dtype=torch.float64)
    cross[..., 7, 8:11] = 10.0
    cross[..., 6:9, 9] = 10.0
    box = torch.tensor([[[9.5 / 20, 7.5 / 16, 3 / 20, 3 / 16]]], dtype=torch.float64)
    shape = ProposalFusion(8, 3, "box").double().pool_masks_in_boxes(cross, box, valid).view(3, 3)
    # (bilinear samples a quarter cell outside each bin's centre, so the arms' ends blur with the background)
    assert shape[1, 1] > 0.9 and shape[1].min() > 0.6 and shape[:, 1].min() > 0.6
    assert max(shape[0, 0], shape[0, 2], shape[2, 0], shape[2, 2]) < 0.25            # a cross, not a blob
    whole = ProposalFusion(8, 3).double().pool_masks(cross, valid).view(3, 3)
    assert whole.max() < 0.2                                             # the whole-image pooling smears it


def test_region_appearance_reaches_the_pixel_embedding_but_not_the_box():
    torch.manual_seed(0)
    fusion = ProposalFusion(hidden_dim=8, mask_pool_size=2, mask_pooling="box", appearance_size=2).double()
    semantic = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    boxes = (torch.rand(2, 3, 4, dtype=torch.float64) * 0.4 + 0.3).requires_grad_()
    masks = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    pixels = torch.randn(2, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    valid = [(6, 6), (4, 6)]
    out = fusion(semantic, boxes, masks, valid, pixels)
    out.square().sum().backward()
    assert boxes.grad is None and masks.grad is None                     # detached, as eq. (2) wants
    assert pixels.grad.abs().sum() > 0
    assert pixels.grad[1, :, 4:].abs().sum() == 0                        # nothing below image 2's valid rows
    assert torch.autograd.gradcheck(lambda p: fusion(semantic.detach(), boxes.detach(), masks.detach(), valid, p),
                                    (pixels,))
    with pytest.raises(ValueError, match="pixel embedding"):
        fusion(semantic, boxes, masks, valid)


def test_region_appearance_from_the_backbone_reads_its_stride_4_map():
    """``region_appearance_source="backbone"``: A RoI-aligns the backbone's F_0 (its width, not d), so the regional
    tokens see the pixels' own features (an object's colour), and the mask head's embedding is no longer read."""
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    model = ImageEncoder(tiny_cfg(mask_pooling="box", region_appearance_size=2,
                                  region_appearance_source="backbone")).eval()
    rpn = model.region_proposals
    assert rpn.fusion.appearance_proj.in_features == model.backbone.channels[0] * 2 * 2
    seen = {}
    rpn.fusion.register_forward_hook(lambda module, args, out: seen.update(map=args[4], boxes=args[1], out=out))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(images, torch.zeros(1, 64, 64, dtype=torch.bool))
        f0 = model.backbone(images)[0]
        assert torch.equal(seen["map"], f0)                               # F_0 itself, not the pixel embedding
        # A of the first token by hand: roi_align of F_0 in the box's stride-4 cells, through the Linear
        box = seen["boxes"][0, 0]
        h, w = f0.shape[-2:]
        x0, y0, x1, y1 = ((box[0] - box[2] / 2) * w, (box[1] - box[3] / 2) * h,
                          (box[0] + box[2] / 2) * w, (box[1] + box[3] / 2) * h)
        cells = roi_align(f0, torch.tensor([[0.0, x0, y0, x1, y1]]), 2, sampling_ratio=2, aligned=True)
        by_hand = rpn.fusion.appearance_proj(cells.flatten(1))[0]
        without = seen["out"][0, 0] - rpn.fusion.appearance(f0, seen["boxes"], [(h, w)])[0, 0]
        assert torch.allclose(without + by_hand, seen["out"][0, 0], atol=1e-5)
        assert torch.equal(out.tokens[0, out.num_global], seen["out"][0, 0])
    model.train()
    images, padding, targets = _batch()
    out = model(images, padding, targets)
    out.tokens[:, out.num_global:].square().sum().backward()
    assert _grad_norm(rpn.fusion.appearance_proj) > 0
    assert _grad_norm(rpn.mask_head.lateral) == 0                         # the embedding is not read by the tokens


def test_fusion_options_in_the_image_encoder_and_the_config():
    from uniperceiver_v2.config import ConfigError, load_config

    # the appearance term on the mask head's per-pixel embedding (the tiny preset reads F_0, tested above)
    model = ImageEncoder(tiny_cfg(mask_pooling="box", region_appearance_size=3,
                                  region_appearance_source="pixel_embedding")).train()
    images, padding, targets = _batch()
    out = model(images, padding, targets)
    out.tokens[:, out.num_global:].square().sum().backward()
    rpn = model.region_proposals
    assert _grad_norm(rpn.fusion.appearance_proj) > 0 and _grad_norm(rpn.mask_head.lateral) > 0
    assert _grad_norm(rpn.mask_head.query_mlp) == 0                      # the masks stay detached
    model.eval()
    with torch.no_grad():
        assert model(images, padding).tokens.shape == out.tokens.shape
    with pytest.raises(ConfigError, match="image_encoder.mask_pooling"):
        load_config("tiny", ["image_encoder.mask_pooling=boxes"])
    with pytest.raises(ConfigError, match="image_encoder.region_appearance_size"):
        load_config("tiny", ["image_encoder.region_appearance_size=-1"])
    with pytest.raises(ConfigError, match="image_encoder.region_appearance_source"):
        load_config("tiny", ["image_encoder.region_appearance_source=pixels"])
    with pytest.raises(ConfigError, match="tasks.detection.proposal_loss_weight"):
        load_config("tiny", ["tasks.detection.proposal_loss_weight=0"])
