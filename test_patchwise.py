"""Tests for patchwise.py: each asserts a claim of the method (../shared/METHOD.md) or of the tool.

Run: python -m pytest -q test_patchwise.py   (CPU only, no network, a few minutes)
"""
import itertools
import json
import math
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import patchwise as pw
import patchwise_tools as tools

HERE = os.path.dirname(os.path.abspath(__file__))
# torchvision 0.29 deprecates its decoders (for TorchCodec) with a warning each call; load_image falls back to PIL
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


# ------------------------------------------------------------------------------------------------
# ViT and head
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch_size, native, side", [(16, 224, 96), (8, 32, 16), (4, 32, 16), (16, 224, 224)])
def test_vit_runs_any_divisible_side_through_the_interpolated_position_embedding(patch_size, native, side):
    torch.manual_seed(0)
    model = pw.vit("vit_tiny", patch_size=patch_size, depth=2, img_size=native).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = model(x)
        # the same forward written out, with the position embedding interpolated to the view's grid
        g = side // patch_size
        t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        t = torch.cat([model.cls_token.expand(2, -1, -1), t], 1) + pw.interpolate_pos_embed(model.pos_embed, (g, g))
        for block in model.blocks:
            t = block(t)
        ref = model.norm(t)
    assert out.shape == (2, 1 + g * g, 192) and torch.allclose(out, ref, atol=1e-5)


def test_position_embedding_is_resized_for_a_grid_of_another_shape_with_as_many_tokens():
    vit = pw.vit("vit_tiny", patch_size=16, depth=1, img_size=224).eval()  # a 14 x 14 table
    x = torch.randn(1, 3, 112, 448)  # a 7 x 28 grid: 196 patches, as many as the table holds
    patches = vit.patch_embed(x).flatten(2).transpose(1, 2)  # (1, 196, D)
    expected = torch.cat([vit.cls_token, patches], dim=1) + pw.interpolate_pos_embed(vit.pos_embed, (7, 28))
    assert torch.allclose(vit.prepare_tokens(x), expected, atol=1e-6)


def test_sdpa_attention_equals_explicit_softmax_in_float64():
    torch.manual_seed(0)
    attn = pw.Attention(dim=48, num_heads=3)
    x = torch.randn(2, 10, 48)
    out = attn(x)
    xd = x.double()
    qkv = F.linear(xd, attn.qkv.weight.double(), attn.qkv.bias.double()).reshape(2, 10, 3, 3, 16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(16), dim=-1)
    ref = (weights @ v).transpose(1, 2).reshape(2, 10, 48)
    ref = F.linear(ref, attn.proj.weight.double(), attn.proj.bias.double())
    rel = (out.double() - ref).norm() / ref.norm()
    assert rel < 1e-6
    # the weights the attention pictures show are these, each row a distribution
    vit = pw.vit("vit_tiny", patch_size=8, depth=1, img_size=32).eval()
    vit.blocks[0].attn = attn
    vit.blocks[0].norm1 = torch.nn.Identity()  # so that the block's attention input is x itself
    vit.prepare_tokens = lambda _: x
    assert torch.allclose(tools.last_selfattention(vit, None).double(), weights, atol=1e-6)


def test_position_embedding_interpolation_is_identity_on_the_native_grid():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert torch.allclose(pw.interpolate_pos_embed(pos, (14, 14)), pos, atol=1e-5)
    small = pw.interpolate_pos_embed(pos, (6, 6))
    assert small.shape == (1, 37, 32) and torch.equal(small[:, 0], pos[:, 0])  # the CLS entry is kept
    # a grid constant per dimension stays constant at any size
    flat = torch.cat([pos[:, :1], torch.arange(32.0).expand(1, 14 * 14, 32)], 1)
    assert torch.allclose(pw.interpolate_pos_embed(flat, (6, 6))[:, 1:], torch.arange(32.0).expand(1, 36, 32), atol=1e-4)


def test_state_dict_names_and_shapes_are_dinos():
    model = pw.vit("vit_small", patch_size=16)
    expected = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384),
                "patch_embed.proj.weight": (384, 3, 16, 16), "patch_embed.proj.bias": (384,),
                "norm.weight": (384,), "norm.bias": (384,)}
    for i in range(12):
        b = f"blocks.{i}."
        expected.update({b + "norm1.weight": (384,), b + "norm1.bias": (384,),
                         b + "attn.qkv.weight": (1152, 384), b + "attn.qkv.bias": (1152,),
                         b + "attn.proj.weight": (384, 384), b + "attn.proj.bias": (384,),
                         b + "norm2.weight": (384,), b + "norm2.bias": (384,),
                         b + "mlp.fc1.weight": (1536, 384), b + "mlp.fc1.bias": (1536,),
                         b + "mlp.fc2.weight": (384, 1536), b + "mlp.fc2.bias": (384,)})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    head = pw.DINOHead(384, 8192)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048),
        "mlp.2.bias": (2048,), "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight_v": (8192, 256), "last_layer.weight_g": (8192, 1)}


def test_head_last_layer_is_weight_normalised_like_torch_weight_norm():
    head = pw.DINOHead(16, 10, hidden_dim=32, bottleneck_dim=8, norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2)
    ref = torch.nn.Linear(8, 10, bias=False)
    with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated, still DINO's
        warnings.simplefilter("ignore")
        ref = torch.nn.utils.weight_norm(ref)
    ref.weight_g.data.copy_(head.last_layer.weight_g.data)
    ref.weight_v.data.copy_(head.last_layer.weight_v.data)
    z = torch.randn(5, 8)
    assert torch.allclose(head.last_layer(z), ref(z), atol=1e-6)
    assert not pw.DINOHead(16, 10).last_layer.weight_g.requires_grad  # frozen norm by default


# ------------------------------------------------------------------------------------------------
# Patch matching
# ------------------------------------------------------------------------------------------------

def _match(t_box, t_flip, t_size, s_box, s_flip, s_size, p):
    return pw.match_patches(torch.tensor([t_box], dtype=torch.float32), torch.tensor([t_flip]), t_size,
                            torch.tensor([s_box], dtype=torch.float32), torch.tensor([s_flip]), s_size, p)


def test_identical_geometry_matches_every_patch_to_itself():
    index, valid = _match((10, 20, 100, 120), False, 64, (10, 20, 100, 120), False, 64, 8)
    assert valid.all()
    assert torch.equal(index[0], torch.arange(64))
    index, valid = _match((10, 20, 100, 120), True, 64, (10, 20, 100, 120), True, 64, 8)
    assert valid.all() and torch.equal(index[0], torch.arange(64))


def test_flipped_student_over_the_same_box_matches_mirrored_columns():
    index, valid = _match((0, 0, 50, 50), False, 32, (0, 0, 50, 50), True, 32, 4)
    g = 8
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    assert valid.all()
    assert torch.equal(index[0], (rows * g + (g - 1 - cols)).flatten())


def test_disjoint_boxes_have_no_valid_patch():
    _, valid = _match((0, 0, 50, 50), False, 32, (60, 60, 40, 40), False, 16, 4)
    assert not valid.any()
    _, valid = _match((0, 0, 50, 50), True, 32, (0, 51, 30, 30), True, 16, 4)
    assert not valid.any()


def test_global_local_pair_at_known_boxes_gives_hand_computed_indices():
    # Teacher: the whole 224x224 image at 224 px, so a teacher patch is 16 original pixels.
    # Student: box at top 32, left 64, side 48, shown at 96 px: a student patch is 8 original
    # pixels, its centres at x = 68, 76, ..., 108 -> teacher columns 4 4 5 5 6 6; y = 36 ... 76
    # -> teacher rows 2 2 3 3 4 4.
    index, valid = _match((0, 0, 224, 224), False, 224, (32, 64, 48, 48), False, 96, 16)
    rows, cols = [2, 2, 3, 3, 4, 4], [4, 4, 5, 5, 6, 6]
    expected = [r * 14 + c for r in rows for c in cols]
    assert valid.all() and index[0].tolist() == expected
    # Teacher flipped: column c becomes 13 - c.
    index, _ = _match((0, 0, 224, 224), True, 224, (32, 64, 48, 48), False, 96, 16)
    assert index[0].tolist() == [r * 14 + 13 - c for r in rows for c in cols]
    # Teacher box covering only x in [0, 80): student centres at x 68, 76 inside, 84.. outside.
    index, valid = _match((0, 0, 224, 80), False, 80, (32, 64, 48, 48), False, 96, 16)
    assert valid[0].view(6, 6)[:, :2].all() and not valid[0].view(6, 6)[:, 2:].any()


def test_match_patches_agrees_with_coordinate_oracle():
    """Render an image whose pixels hold their own (x, y), cut views with the real spatial
    augmentation, and check every valid match against the pixels themselves."""
    H, W, p = 192, 256, 8
    yy, xx = np.mgrid[0:H, 0:W]
    img = torch.from_numpy(np.stack([xx, yy, np.zeros_like(xx)]).astype(np.uint8))  # (3, H, W)
    checked = off_by_one = wrong = invalid_inside = 0
    for seed in range(12):
        rng = np.random.default_rng(seed)
        glob, local, box, flip = pw.spatial_views(img, rng, 64, 32, 4)
        views = [glob[0], glob[1]] + list(local)
        for i, v in itertools.product(range(2), range(6)):
            if v == i:
                continue
            s_size, t_size = views[v].shape[-1], 64
            index, valid = pw.match_patches(box[i:i + 1], flip[i:i + 1], t_size, box[v:v + 1], flip[v:v + 1], s_size, p)
            gs, gt = s_size // p, t_size // p
            s_img, t_img = views[v].float(), views[i].float()  # (3, S, S), values = original pixel index
            t_px = box[i, 3].item() / t_size  # original pixels per teacher-view pixel
            for n in range(gs * gs):
                r, c = divmod(n, gs)
                cy, cx = r * p + p // 2, c * p + p // 2  # the 2x2 pixels around the patch centre
                centre = s_img[:, cy - 1:cy + 1, cx - 1:cx + 1].mean((1, 2)) + 0.5  # original coords
                tr, tc = divmod(index[0, n].item(), gt)
                patch = t_img[:, tr * p:(tr + 1) * p, tc * p:(tc + 1) * p]
                lo = patch.amin((1, 2)) + 0.5 - t_px / 2  # the teacher patch's extent in original pixels
                hi = patch.amax((1, 2)) + 0.5 + t_px / 2
                if not valid[0, n]:
                    t_top, t_left, t_h, t_w = box[i].tolist()
                    inside = (t_left + 1 < centre[0] < t_left + t_w - 1) and (t_top + 1 < centre[1] < t_top + t_h - 1)
                    invalid_inside += inside
                    continue
                checked += 1
                miss = torch.maximum(lo[:2] - centre[:2], centre[:2] - hi[:2]).max().item()
                if miss > 1.0:
                    wrong += 1
                elif miss > 0.5:  # within one pixel: resampling and uint8 rounding at patch borders
                    off_by_one += 1
    assert checked > 1000
    assert wrong == 0 and invalid_inside == 0
    assert off_by_one <= 0.02 * checked, (off_by_one, checked)


def _public_intersection_pairs(t_box, t_flip, t_size, s_box, s_flip, s_size, p):
    """METHOD.md section 4's rule as the public PW-Self code runs it (augment.py's correspondences),
    written out for one pair with numpy slices and np.linspace: {student patch: teacher patch}."""
    top, left = max(t_box[0], s_box[0]), max(t_box[1], s_box[1])
    bottom = min(t_box[0] + t_box[2], s_box[0] + s_box[2])
    right = min(t_box[1] + t_box[3], s_box[1] + s_box[3])
    if top >= bottom or left >= right:
        return {}

    def covering(box, flip, size):  # the view's patch ids over the intersection, in image order
        P = size // p
        ids = np.arange(P * P).reshape(P, P)
        h0 = int(round(P * (top - box[0]) / box[2]))
        w0 = int(round(P * (left - box[1]) / box[3]))
        h1 = min(h0 + round(P * (bottom - top) / box[2]), P)  # a slice stops at the grid's edge
        w1 = min(w0 + round(P * (right - left) / box[3]), P)
        if flip:  # the columns mirrored, then read right to left
            return np.fliplr(ids[h0:h1, P - w1:P - w0])
        return ids[h0:h1, w0:w1]
    t, s = covering(t_box, t_flip, t_size), covering(s_box, s_flip, s_size)

    def subsample(n_long, n_short):
        return [int(np.floor(x)) for x in np.linspace(0, n_long - 1, n_short)]
    rows, cols = min(len(t), len(s)), min(t.shape[1], s.shape[1])
    t = t[subsample(len(t), rows)][:, subsample(t.shape[1], cols)]
    s = s[subsample(len(s), rows)][:, subsample(s.shape[1], cols)]
    return dict(zip(s.flatten().tolist(), t.flatten().tolist()))


def test_intersection_matching_is_the_public_rule_written_out():
    """--matching intersection against the public rule pair by pair: real crop boxes and flips,
    global-global and global-local pairs at ImageNet's and the demo's grids, disjoint crops too."""
    checked = 0
    for (t_size, s_size, p), seed in itertools.product([(224, 96, 16), (224, 224, 16), (32, 16, 8), (64, 40, 8)],
                                                       range(40)):
        rng = np.random.default_rng(seed)
        H, W = rng.integers(40, 400, size=2)
        boxes = [pw.sample_crop_box(rng, H, W, (0.4, 1.0)), pw.sample_crop_box(rng, H, W, (0.05, 0.4))]
        flips = rng.random(2) < 0.5
        t_box, s_box = torch.tensor(boxes, dtype=torch.float32)  # as the loader's, float32
        index, valid = pw.match_patches(t_box[None], torch.tensor(flips[:1]), t_size, s_box[None],
                                        torch.tensor(flips[1:]), s_size, p, rule="intersection")
        want = _public_intersection_pairs(t_box.tolist(), flips[0], t_size, s_box.tolist(), flips[1], s_size, p)
        got = {n: int(index[0, n]) for n in range(index.shape[1]) if valid[0, n]}
        assert got == want, (t_size, s_size, p, seed)
        assert len(set(got.values())) == len(got)  # one-to-one
        checked += len(got)
    assert checked > 2000
    # crops that do not meet have no pair; a flipped pair over the same box pairs mirrored columns
    box, far = torch.tensor([[0., 0, 50, 50]]), torch.tensor([[60., 60, 40, 40]])
    yes, no = torch.tensor([True]), torch.tensor([False])
    _, valid = pw.match_patches(box, no, 32, far, no, 16, 4, rule="intersection")
    assert not valid.any()
    index, valid = pw.match_patches(box, yes, 32, box, no, 32, 4, rule="intersection")
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    assert valid.all() and torch.equal(index[0], (rows * 8 + 7 - cols).flatten())


def test_similarity_matching_finds_identical_features():
    t = torch.randn(2, 9, 16)
    perm = torch.randperm(9)
    matches = pw.match_views(None, None, [24, 24], 8, 2, [t, t[:, perm]], [t, t])
    index, valid = matches[1, 0]  # teacher view 1 holds student patch j at perm.argsort()[j]
    assert valid.all() and torch.equal(index, perm.argsort().expand(2, 9))
    index, valid = matches[0, 1]
    assert valid.all() and torch.equal(index, torch.arange(9).expand(2, 9))


# ------------------------------------------------------------------------------------------------
# Per-patch photometric augmentation
# ------------------------------------------------------------------------------------------------

def _params(n_tiles, seed=0, p_jitter=0.8, p_gray=0.2, n_views=1):
    return pw.draw_photometric_params(np.random.default_rng(seed), n_views, n_tiles, 0.0, 0.0, p_jitter, p_gray)


def test_every_patch_of_a_uniform_image_gets_its_own_colour():
    x = torch.tensor([0.5, 0.3, 0.6]).view(1, 3, 1, 1).expand(1, 3, 32, 32).contiguous()
    tile, _ = _params(64, p_jitter=1.0, p_gray=0.0)
    out = pw.color_jitter_tiles(x, tile)
    patches = out.reshape(3, 8, 4, 8, 4)  # (3, gh, q, gw, q)
    colours = patches.mean((2, 4)).reshape(3, 64).T  # (64, 3)
    assert len({tuple(c) for c in (colours * 1e4).round().tolist()}) == 64
    # a uniform patch stays uniform: all pixels of a patch share the patch's parameters
    assert patches.std(dim=(2, 4)).max() < 1e-6
    assert out.min() >= 0 and out.max() <= 1


def test_per_patch_jitter_equals_torchvision_applied_to_each_patch_alone():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    tile, _ = _params(16, seed=3, n_views=2)
    out = pw.color_jitter_tiles(x, tile)
    for b, n in itertools.product(range(2), range(16)):
        r, c = divmod(n, 4)
        on, bright, contrast, sat, hue, gray = tile[b, n].tolist()
        ref = x[b, :, r * 4:r * 4 + 4, c * 4:c * 4 + 4]
        if on:  # torchvision's ops in our fixed order; contrast pivots on this patch's own mean grey
            ref = TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
                ref, bright), contrast), sat), hue)
        if gray:
            ref = TF.rgb_to_grayscale(ref, 3)
        assert torch.allclose(out[b, :, r * 4:r * 4 + 4, c * 4:c * 4 + 4], ref, atol=1e-5), (b, n)


def test_view_mode_applies_one_transform_to_all_patches():
    x = torch.tensor([0.5, 0.3, 0.6]).view(1, 3, 1, 1).expand(3, 3, 32, 32).contiguous()
    tile, _ = _params(1, n_views=3, p_jitter=1.0)
    out = pw.color_jitter_tiles(x, tile)
    assert (out - out[:, :, :1, :1]).abs().max() < 1e-6  # uniform in, uniform out
    ref = torch.stack([TF.adjust_hue(TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(
        x[b], tile[b, 0, 1].item()), tile[b, 0, 2].item()), tile[b, 0, 3].item()), tile[b, 0, 4].item()) for b in range(3)])
    ref = torch.where(tile[:, 0, 5].view(3, 1, 1, 1) > 0, TF.rgb_to_grayscale(ref, 3), ref)
    assert torch.allclose(out, ref, atol=1e-5)


def test_same_parameters_give_bit_identical_views_and_blur_matches_reference():
    torch.manual_seed(0)
    views = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    tile, view = pw.draw_photometric_params(np.random.default_rng(1), 4, 64, [1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 1.0, 0.0])
    a = pw.photometric_augment(views, tile, view)
    torch.manual_seed(123)  # the global generator plays no part: the parameters carry the randomness
    assert torch.equal(pw.photometric_augment(views, tile, view), a)
    # a tile's parameters act on that tile alone: grayscale toggled on tile (0, 5) of view 1 (no blur
    # there), 4 px tiles on a 32 px view, changes those 4x4 pixels and no other
    other = tile.clone()
    other[1, 5, 5] = 1 - other[1, 5, 5]
    changed = (pw.photometric_augment(views, other, view) != a).any(dim=1)  # (4, 32, 32)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[0:4, 20:24] = True
    assert changed[1][inside].any() and not changed[1][~inside].any() and not changed[[0, 2, 3]].any()
    # blur: each image with its own sigma equals torchvision's Gaussian blur with that sigma
    x = torch.rand(3, 3, 20, 20)
    sigma = torch.tensor([0.0, 0.7, 1.9])
    out = pw.gaussian_blur(x, sigma)
    assert torch.allclose(out[0], x[0])
    for i in (1, 2):
        ref = TF.gaussian_blur(x[i:i + 1], kernel_size=13, sigma=sigma[i].item())
        assert torch.allclose(out[i:i + 1], ref, atol=1e-5)


def test_a_view_is_pils_antialiased_bicubic_of_the_integer_box_its_law_draws():
    import torchvision.transforms as T
    # a photo: on noise, where bicubic overshoots, the two round their intermediate rows differently
    photo = Image.open(os.path.join(HERE, "figures", "chelsea.png")).convert("RGB").resize((160, 120), Image.BICUBIC)
    glob, local, box, flip = pw.spatial_views(TF.pil_to_tensor(photo), np.random.default_rng(3), 64, 32, 6)
    for view, (top, left, h, w), f in zip(list(glob) + list(local), box.int().tolist(), flip):
        size = view.shape[-1]  # globals shrink their box, locals enlarge theirs
        # DINO's RandomResizedCrop on PIL: crop, then resize; to PIL's rounding
        ref = TF.pil_to_tensor(TF.resized_crop(photo, top, left, h, w, [size, size], TF.InterpolationMode.BICUBIC))
        assert (view.int() - (ref.flip(-1) if f else ref).int()).abs().max() <= 2
    # the law of torchvision's RandomResizedCrop (DINO's): the same box distribution, the same fallback
    rng, n = np.random.default_rng(0), 4000
    torch.manual_seed(0)
    for scale in ((0.05, 0.4), (0.4, 1.0)):
        ours = np.array([pw.sample_crop_box(rng, 90, 120, scale) for _ in range(n)], dtype=float)
        theirs = np.array([T.RandomResizedCrop.get_params(torch.zeros(3, 90, 120), scale, (3 / 4, 4 / 3))
                           for _ in range(n)], dtype=float)
        assert np.allclose(ours.mean(0), theirs.mean(0), rtol=0.05) and np.allclose(ours.std(0), theirs.std(0), rtol=0.1)
    fallback = pw.sample_crop_box(rng, 10, 1000, (0.4, 1.0))  # no try fits a 10 px high strip
    assert fallback == T.RandomResizedCrop.get_params(torch.zeros(3, 10, 1000), (0.4, 1.0), (3 / 4, 4 / 3)) == (0, 493, 10, 13)


def test_spatial_views_are_a_pure_function_of_the_generator():
    img = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 50, 70), dtype=np.uint8))
    a = pw.spatial_views(img, np.random.default_rng((1, 2, 3)), 32, 16, 3)
    np.random.seed(5)  # the global generators play no part
    torch.manual_seed(5)
    b = pw.spatial_views(img, np.random.default_rng((1, 2, 3)), 32, 16, 3)
    c = pw.spatial_views(img, np.random.default_rng((1, 2, 4)), 32, 16, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[2], c[2])
    glob, local, box, flip = a
    assert glob.shape == (2, 3, 32, 32) and local.shape == (3, 3, 16, 16) and glob.dtype == torch.uint8
    assert box.shape == (5, 4) and flip.shape == (5,)
    top, left, h, w = box.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 50).all() and (left + w <= 70).all()
    assert torch.equal(box, box.round())  # integer boxes, as RandomResizedCrop's
    area = h * w / (50 * 70)
    assert (area[:2] >= 0.4 - 1e-4).all() and (area[2:] <= 0.4 + 1e-4).all()


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------

def _dino_loss_reference(student, teacher, center, t_temp, s_temp=0.1):
    """DINO's DINOLoss, written from its definition in float64: CLS outputs only."""
    student, teacher, center = student.double(), teacher.double(), center.double()
    total, n = 0.0, 0
    for i, t in enumerate(teacher):
        q = torch.softmax((t - center) / t_temp, dim=-1)
        for v, s in enumerate(student):
            if v == i:
                continue
            total = total + torch.sum(-q * torch.log_softmax(s / s_temp, dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_loss_without_patch_term_is_the_dino_loss():
    torch.manual_seed(0)
    B, K, V = 4, 32, 5
    student = [torch.randn(B, 1 + (9 if v < 2 else 4), K) for v in range(V)]
    teacher = [torch.randn(B, 10, K) for _ in range(2)]
    loss_fn = pw.PWSelfLoss(K, warmup_teacher_temp=0.04, teacher_temp=0.07,
                            warmup_teacher_temp_epochs=5, patch_loss_weight=0.0)
    loss_fn.center_cls.normal_()
    center = loss_fn.center_cls.clone()
    total, image, patch = loss_fn(student, teacher, {}, epoch=2)
    t_temp = np.linspace(0.04, 0.07, 5)[2]
    ref = _dino_loss_reference(torch.stack([s[:, 0] for s in student]), torch.stack([t[:, 0] for t in teacher]),
                               center, t_temp)
    assert abs(total.item() - ref.item()) < 1e-5 * abs(ref.item())
    assert patch.item() == 0.0 and total.item() == image.item()
    # the CLS outputs alone, as the head gives them to plain DINO, give the same loss
    loss_fn.center_cls.copy_(center)
    cls_only = loss_fn([s[:, :1] for s in student], [t[:, :1] for t in teacher], {}, epoch=2)[0]
    assert cls_only.item() == pytest.approx(total.item(), rel=1e-6)


def _random_matches(B, sizes, n_t, G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(i, v): (torch.randint(0, n_t, (B, n), generator=g), torch.rand(B, n, generator=g) < 0.6)
            for i in range(G) for v, n in enumerate(sizes) if v != i}


def test_patch_loss_is_the_mean_over_valid_matched_patches():
    torch.manual_seed(1)
    B, K, sizes, n_t = 3, 8, [4, 4, 1, 1], 4
    student = [torch.randn(B, 1 + n, K) for n in sizes]
    teacher = [torch.randn(B, 1 + n_t, K) for _ in range(2)]
    matches = _random_matches(B, sizes, n_t)
    loss_fn = pw.PWSelfLoss(K, patch_loss_weight=0.5)
    loss_fn.center_patch.normal_()
    cp = loss_fn.center_patch.clone().double()
    total, image, patch = loss_fn(student, teacher, matches, epoch=0)
    terms = []
    for (i, v), (index, valid) in matches.items():
        ce = []
        for b in range(B):
            for n in range(sizes[v]):
                if valid[b, n]:
                    q = torch.softmax((teacher[i][b, 1 + index[b, n]].double() - cp[0]) / 0.04, -1)
                    ce.append(-(q * torch.log_softmax(student[v][b, 1 + n].double() / 0.1, -1)).sum())
        terms.append(torch.stack(ce).mean() if ce else torch.zeros((), dtype=torch.float64))
    ref = 0.5 * torch.stack(terms).mean()
    assert abs(patch.item() - ref.item()) < 1e-5 * ref.item()
    assert abs(total.item() - image.item() - patch.item()) < 1e-5


def test_token_mean_weighting_matches_its_definition_on_a_tiny_example():
    torch.manual_seed(2)
    B, K, sizes, n_t = 2, 3, [2, 2, 1], 2
    student = [torch.randn(B, 1 + n, K) for n in sizes]
    teacher = [torch.randn(B, 1 + n_t, K) for _ in range(2)]
    matches = _random_matches(B, sizes, n_t, seed=5)
    loss_fn = pw.PWSelfLoss(K, loss_weighting="token_mean")
    total, _, _ = loss_fn(student, teacher, matches, epoch=0)

    def ce(t, s):
        return -(torch.softmax(t.double() / 0.04, -1) * torch.log_softmax(s.double() / 0.1, -1)).sum()
    pair_losses = []
    for (i, v), (index, valid) in matches.items():
        tokens = [ce(teacher[i][b, 0], student[v][b, 0]) for b in range(B)]
        tokens += [ce(teacher[i][b, 1 + index[b, n]], student[v][b, 1 + n])
                   for b in range(B) for n in range(sizes[v]) if valid[b, n]]
        pair_losses.append(sum(tokens) / len(tokens))
    ref = sum(pair_losses) / len(pair_losses)
    assert abs(total.item() - ref.item()) < 1e-5 * ref.item()


def test_no_valid_patch_gives_finite_loss_and_zero_patch_part():
    B, K = 2, 16
    student = [torch.randn(B, 5, K) for _ in range(4)]
    teacher = [torch.randn(B, 5, K) for _ in range(2)]
    matches = {(i, v): (torch.zeros(B, 4, dtype=torch.long), torch.zeros(B, 4, dtype=torch.bool))
               for i in range(2) for v in range(4) if v != i}
    for weighting in ("sum", "token_mean"):
        total, image, patch = pw.PWSelfLoss(K, loss_weighting=weighting)(
            student, teacher, matches, 0)
        assert torch.isfinite(total) and patch.item() == 0.0 and total.item() == image.item()


def test_plain_dino_runs_the_head_on_the_cls_tokens_only():
    encoder = pw.build_encoder("vit_tiny", 8, 32, depth=1, img_size=32, head_hidden_dim=16, bottleneck_dim=8)
    rows = []
    encoder.head.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    crops = [torch.randn(6, 3, 32, 32), torch.randn(12, 3, 16, 16)]
    tokens, out = encoder(crops, patches=False)
    assert [o.shape for o in out] == [(6, 1, 32), (12, 1, 32)] and rows == [6 + 12]
    tokens, out = encoder(crops)
    assert [o.shape for o in out] == [(6, 17, 32), (12, 5, 32)] and rows[-1] == 6 * 17 + 12 * 5
    assert torch.allclose(out[1][:, 0], encoder(crops, patches=False)[1][1][:, 0], atol=1e-6)


def _reference_losses(student, teacher, matches, weight, weighting, cc, cp, t_temp, s_temp=0.1):
    """PW-Self's loss from its definition (METHOD, section 5), token by token in float64."""
    def ce(t, c, s):
        return -(torch.softmax((t.double() - c.double()) / t_temp, -1) * torch.log_softmax(s.double() / s_temp, -1)).sum()
    image, patch = [], []
    for (i, v), (index, valid) in matches.items():
        B = len(index)
        cls = [ce(teacher[i][b, 0], cc, student[v][b, 0]) for b in range(B)]
        pat = [ce(teacher[i][b, 1 + index[b, n]], cp, student[v][b, 1 + n])
               for b in range(B) for n in range(index.shape[1]) if valid[b, n]] if weight > 0 else []
        if weighting == "sum":
            image.append(sum(cls) / B)
            patch.append(weight * sum(pat) / max(len(pat), 1))
        else:
            image.append(sum(cls) / (B + len(pat)))
            patch.append(weight * sum(pat) / (B + len(pat)))
    image, patch = sum(image) / len(image), sum(patch) / len(patch)
    return [float(image + patch), float(image), float(patch)]


def test_loss_on_real_geometry_is_its_definition_in_every_weighting():
    """Matches from match_views on random boxes with flips and invalid matches, for both
    weightings, with and without local views, and plain DINO (weight 0)."""
    g = torch.Generator().manual_seed(8)
    B, K, patch, G = 4, 16, 8, 2
    for n_local, weighting, weight in ((3, "sum", 1.0), (3, "token_mean", 0.5), (0, "sum", 0.7),
                                       (0, "token_mean", 1.0), (2, "sum", 0.0)):
        sizes = [32] * G + [16] * n_local
        top_left = torch.rand(B, len(sizes), 2, generator=g) * 40
        side = 20 + torch.rand(B, len(sizes), 2, generator=g) * 40
        box = torch.cat([top_left, side], dim=-1)  # (B, V, 4) (top, left, height, width) in a 100 px image
        flip = torch.rand(B, len(sizes), generator=g) < 0.5
        matches = pw.match_views(box, flip, sizes, patch, G)
        valid = torch.cat([v.flatten() for _, v in matches.values()])
        assert 0 < valid.float().mean() < 1  # some matches fall outside the teacher view
        student = [torch.randn(B, 1 + (s // patch) ** 2, K, generator=g) for s in sizes]
        teacher = [torch.randn(B, 1 + 16, K, generator=g) for _ in range(G)]
        loss_fn = pw.PWSelfLoss(K, warmup_teacher_temp=0.03, teacher_temp=0.05, warmup_teacher_temp_epochs=3,
                                patch_loss_weight=weight, loss_weighting=weighting)
        cc, cp = torch.linspace(-1, 1, K), torch.linspace(1, -1, K)
        loss_fn.center_cls.copy_(cc)
        loss_fn.center_patch.copy_(cp)
        got = [x.item() for x in loss_fn(student, teacher, matches if weight > 0 else {}, epoch=1)]
        ref = _reference_losses(student, teacher, matches, weight, weighting, cc, cp, 0.04)  # mid warm-up
        assert np.allclose(got, ref, rtol=1e-5, atol=1e-7), (n_local, weighting, got, ref)
        assert ref[0] > 0 and (ref[2] > 0) == (weight > 0)
        # the patch centre follows all the teacher's patch outputs, used by the loss or not
        assert not torch.equal(loss_fn.center_patch[0], cp)


def test_gradients_reach_the_student_only_and_centres_follow_their_ema():
    B, K = 3, 8
    student = [torch.randn(B, 5, K, requires_grad=True) for _ in range(3)]
    teacher = [torch.randn(B, 5, K, requires_grad=True) for _ in range(2)]
    matches = _random_matches(B, [4, 4, 4], 4)
    loss_fn = pw.PWSelfLoss(K)
    loss_fn.center_cls.fill_(0.5)
    loss_fn.center_patch.fill_(-0.5)
    total, _, _ = loss_fn(student, teacher, matches, 0)
    total.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)
    assert all(t.grad is None for t in teacher)
    cls_mean = torch.cat([t[:, 0] for t in teacher]).mean(0)
    # the patch centre follows all the teacher's patch outputs, matched or not (iBOT's centre)
    patch_mean = torch.cat([t[:, 1:] for t in teacher]).flatten(0, 1).mean(0)
    assert torch.allclose(loss_fn.center_cls[0], 0.9 * 0.5 + 0.1 * cls_mean.detach(), atol=1e-6)
    assert torch.allclose(loss_fn.center_patch[0], 0.9 * -0.5 + 0.1 * patch_mean.detach(), atol=1e-6)


def test_teacher_entropies_tell_a_healthy_teacher_from_both_collapses():
    K, M = 64, 32
    uniform = torch.full((M, K), 1.0 / K)
    one_dim = F.one_hot(torch.zeros(M, dtype=torch.long), K).double()
    healthy = torch.softmax(torch.randn(M, K, dtype=torch.float64) * 6, dim=1)  # confident, each its own dim
    assert torch.allclose(pw.entropies([uniform]), torch.full((2,), math.log(K)))
    assert torch.allclose(pw.entropies([one_dim]), torch.zeros(2, dtype=torch.float64))
    row, mean = pw.entropies([healthy])
    assert torch.allclose(pw.entropies([healthy[:5], healthy[5:].view(3, 9, K)], chunk=4), torch.stack([row, mean]))
    # against the definitions, written out; rows in chunks of 3 give the same
    assert torch.isclose(row, -(healthy * healthy.log()).sum(1).mean())
    assert torch.isclose(mean, -(healthy.mean(0) * healthy.mean(0).log()).sum())
    assert row < 0.5 * math.log(K) < mean
    assert pw.entropies([torch.zeros(4, 0, K)]).tolist() == [0.0, 0.0]  # no rows (plain DINO's patches)


def test_collapse_warning_names_each_collapse_and_stays_silent_otherwise():
    ln_k = math.log(1024)
    assert pw.collapse_warning([0.995 * ln_k, 1.005 * ln_k], [6.0, 6.5], 1024)[0] == "uniform"
    assert pw.collapse_warning([4.0, 9.0], [0.995 * ln_k, ln_k], 1024)[0] == "uniform"
    assert pw.collapse_warning([0.5, 4.0], [0.2, 0.3], 1024)[0] == "one dimension"
    assert pw.collapse_warning([2.5, 3.5], [2.87, 2.88], 1024)[0] == "constant"
    # near ln K, not yet within 1%: a uniform collapse on its way, named when it gets there
    assert pw.collapse_warning([6.7, 6.9], [6.85, 6.87], 1024) is None
    assert pw.collapse_warning([2.5, 6.0], [2.0, 4.0], 1024) is None
    assert pw.collapse_warning([5.0, 6.5], [6.0, 6.4], 1024) is None  # a young, barely sharp one
    # a loss that starts far above ln K (a random student) and ends near it is not yet a collapse
    assert pw.collapse_warning([0.995 * ln_k, 1.2 * ln_k], [6.0, 6.5], 1024) is None
    for kind, line in (pw.collapse_warning([ln_k, ln_k], [6.9, 6.9], 1024),
                       pw.collapse_warning([1, 2], [0.1, 0.1], 1024),
                       pw.collapse_warning([3, 4], [3.0, 3.0], 1024)):
        assert "\n" not in line and "collapse" in line and "--" in line  # one line, with the flags to try


def test_collapse_warnings_fire_on_collapsed_runs_and_not_on_a_healthy_one(tmp_path, capsys):
    def run(name, *extra):
        pw.main(TINY + ["--synthetic_size", "192", "40", "--epochs", "3", "--no_initial_knn",
                        "--output_dir", str(tmp_path / name)] + list(extra))
        out = capsys.readouterr().out
        return out, [json.loads(line) for line in open(tmp_path / name / "log.txt")]
    out, log = run("healthy")
    assert "warning" not in out and "teacher entropy of a target/of the batch mean: cls" in out
    assert log[-1]["teacher_entropy_cls_target"] < log[-1]["teacher_entropy_cls_batch_mean"] < log[-1]["ln_K"]
    # centring without sharpening: a teacher so hot that its centred outputs are flat (DINO, fig. 7)
    out, log = run("hot", "--teacher_temp", "10", "--warmup_teacher_temp", "10")
    assert out.count("warning: collapse") == 1 and "uniform" in out
    assert log[-1]["teacher_entropy_cls_target"] > 0.99 * log[-1]["ln_K"]
    # sharpening without centring: every image's teacher output peaks on one dimension, as the loss
    # sees it when the centre has not caught up (DINO, fig. 7)
    B, K, V = 8, 64, 4
    loss_fn = pw.PWSelfLoss(K)
    peak = torch.zeros(K)
    peak[3] = 1.0
    teacher = [peak + 0.01 * torch.randn(B, 5, K) for _ in range(2)]
    student = [torch.randn(B, 5, K) for _ in range(V)]
    image = loss_fn(student, teacher, _random_matches(B, [4] * V, 4), 0)[1]
    entropy = loss_fn.teacher_entropy
    assert entropy[1] < 0.01
    kind, line = pw.collapse_warning([image.item()] * 2, entropy[:2].tolist(), K)
    assert kind == "one dimension" and "--teacher_temp" in line
    # a teacher that follows the student too fast: every image gets the same output, neither
    # uniform nor on one dimension (measured on grayscale digits with --momentum_teacher 0.9)
    loss_fn = pw.PWSelfLoss(K)
    shared = 0.1 * torch.randn(K)
    teacher = [shared + 0.001 * torch.randn(B, 5, K) for _ in range(2)]
    image = loss_fn(student, teacher, _random_matches(B, [4] * V, 4), 0)[1]
    row, mean = loss_fn.teacher_entropy[:2].tolist()
    assert 1.0 < row < 0.9 * math.log(K) and mean - row < 0.01
    kind, line = pw.collapse_warning([image.item()] * 2, [row, mean], K)
    assert kind == "constant" and "--momentum_teacher" in line


# ------------------------------------------------------------------------------------------------
# Data, sampler, k-NN
# ------------------------------------------------------------------------------------------------

def test_views_depend_only_on_seed_epoch_and_index_not_on_workers():
    train, _, _ = pw.build_datasets("synthetic", "", synthetic_size=(40, 10))
    ds = pw.MultiViewDataset(train, seed=3, global_size=32, local_size=16, n_local=2, patch_size=4)
    sampler = pw.EpochSampler(ds, num_replicas=1, rank=0, seed=3, batch_size=8)
    sampler.set_epoch(1)

    def batches(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers)
        return list(loader)
    a, b = batches(0), batches(2)
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert a[0]["tile_global"].shape == (8, 2, 64, 6) and a[0]["tile_local"].shape == (8, 2, 16, 6)
    assert not torch.equal(ds[(2, 0)]["global_views"], ds[(1, 0)]["global_views"])  # a new epoch, new views
    assert ds[(2, 0)]["box"].shape == (4, 4)


def test_ranks_together_see_the_single_process_global_batches_and_resume_mid_epoch():
    ds = list(range(103))
    single = pw.EpochSampler(ds, num_replicas=1, rank=0, seed=7, batch_size=12)
    ranks = [pw.EpochSampler(ds, num_replicas=3, rank=r, seed=7, batch_size=4) for r in range(3)]
    for s in [single] + ranks:
        s.set_epoch(5)
    one = [k for _, k in single]
    per_rank = [[k for _, k in s] for s in ranks]
    for b in range(len(one) // 12):
        union = sorted(sum((r[b * 4:(b + 1) * 4] for r in per_rank), []))
        assert union == sorted(one[b * 12:(b + 1) * 12])
    single.set_epoch(5, start_batch=3)
    assert [k for _, k in single] == one[36:]
    assert all(e == 5 for e, _ in single)


def _knn_reference(train_f, train_y, test_f, test_y, k, T, C):
    """DINO's knn_classifier, one test image at a time."""
    top1 = top5 = 0
    for f, y in zip(test_f, test_y):
        sim = train_f @ f
        s, idx = sim.topk(k)
        votes = torch.zeros(C)
        for si, i in zip(s, idx):
            votes[train_y[i]] += math.exp(si / T)
        pred = [c for c in votes.argsort(descending=True)[:5].tolist() if votes[c] > 0]
        top1 += int(pred[0] == y)
        top5 += int(y in pred)
    return 100 * top1 / len(test_y), 100 * top5 / len(test_y)


def test_knn_classify_matches_dinos_weighted_vote():
    torch.manual_seed(0)
    C = 7
    centres = F.normalize(torch.randn(C, 16), dim=1)
    train_y, test_y = torch.randint(0, C, (300,)), torch.randint(0, C, (50,))
    train_f = F.normalize(centres[train_y] + 0.6 * torch.randn(300, 16), dim=1)
    test_f = F.normalize(centres[test_y] + 0.6 * torch.randn(50, 16), dim=1)
    got = pw.knn_classify(train_f, train_y, test_f, test_y, ks=(1, 5, 20, 400), T=0.07, num_classes=C)
    for k in (1, 5, 20, 400):  # one top-k for all ks; k beyond the 300 train images: all of them
        assert got[k] == pytest.approx(_knn_reference(train_f, train_y, test_f, test_y, min(k, 300), 0.07, C))
    assert 40 < got[20][0] < 100 and got[20][1] >= got[20][0]  # informative features, not chance, not trivial
    assert pw.knn_classify(centres[train_y], train_y, centres[test_y], test_y)[20][0] == 100.0


def _gaussian_classes(n, C, D, spread, seed, offset=3.0):
    """n features (n, D) in float16 around C class means, with a constant offset and unequal scales
    per dimension, as backbone features have; labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=torch.Generator().manual_seed(123))
    y = torch.randint(0, C, (n,), generator=g)
    scale = torch.linspace(0.2, 5.0, D)
    return ((means[y] + spread * torch.randn(n, D, generator=g)) * scale + offset).half(), y


def _newton_logistic(x, y, C, l2):
    """The same objective as the probe's, solved independently: Newton's method with the exact
    Hessian and a backtracking line search, in float64, to machine precision. Returns the
    standardisation (mean, std), W (F, C), b (C,) and the objective's value."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    z = (x - mean) / std
    Fd = x.shape[1]

    def f(theta):
        W, b = theta[:Fd * C].view(Fd, C), theta[Fd * C:]
        return F.cross_entropy(z @ W + b, y) + l2 / 2 * (W ** 2).sum()
    theta = torch.zeros((Fd + 1) * C, dtype=torch.float64)
    for _ in range(100):
        g = torch.autograd.functional.jacobian(f, theta)
        H = torch.autograd.functional.hessian(f, theta)
        step = torch.linalg.solve(H + 1e-10 * torch.eye(len(theta), dtype=torch.float64), g)
        t = 1.0
        while f(theta - t * step) > f(theta) - 1e-4 * t * (g @ step) and t > 1e-8:
            t /= 2
        theta = theta - t * step
        if g.abs().max() < 1e-12:
            break
    return mean, std, theta[:Fd * C].view(Fd, C), theta[Fd * C:], f(theta).item()


def _ill_conditioned_classes(n, C, D, seed):
    """Overlapping classes in float16 features mixed by a matrix of condition number ~1e4, so that
    standardising each feature alone does not make the problem well-conditioned; labels (n,)."""
    x, y = _gaussian_classes(n, C, D, 1.5, seed)
    g = torch.Generator().manual_seed(99)
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    mix = U @ torch.diag(torch.logspace(0, -4, D)) @ U.T
    return (x.float() @ mix * 100).half(), y


def test_linear_probe_is_the_converged_logistic_regression_on_ill_conditioned_features():
    x, y = _ill_conditioned_classes(1500, 4, 16, seed=2)
    vx, vy = _ill_conditioned_classes(3000, 4, 16, seed=3)
    for l2 in (1e-2, 1e-4):
        mean, std, W_ref, b_ref, f_ref = _newton_logistic(x, y, 4, l2)
        ref = 100 * ((((vx.double() - mean) / std) @ W_ref + b_ref).argmax(1) == vy).double().mean().item()
        W, b = pw.fit_logistic(x, y, 4, l2, mean.float(), std.float(), pw.feature_stats(x)[2])
        f_ours = pw.logistic_objective(x, y, W, b, mean.float(), std.float(), l2)[0].item()
        assert f_ours <= f_ref * (1 + 1e-4) + 1e-6, (l2, f_ours, f_ref)  # the same optimum
        assert abs(pw.linear_accuracy(vx, vy, W, b, mean.float(), std.float())[0] - ref) <= 0.5
        # where a few passes of SGD (DINO's eval_linear, on these cached features) still are: far off
        Ws, bs = torch.zeros(16, 4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
        z = (x.double() - mean) / std
        for epoch in range(5):
            for i in range(0, len(z), 64):
                p = torch.softmax(z[i:i + 64] @ Ws + bs, 1)
                p[torch.arange(len(p)), y[i:i + 64]] -= 1
                Ws -= 0.1 * (z[i:i + 64].T @ p / len(p) + l2 * Ws)
                bs -= 0.1 * p.mean(0)
        f_sgd = (F.cross_entropy(z @ Ws + bs, y) + l2 / 2 * (Ws ** 2).sum()).item()
        assert f_sgd > f_ref + 0.01, (l2, f_sgd, f_ref)
    # and the whole probe lands on the converged fit of its chosen L2
    got = pw.linear_probe(x, y, vx, vy, 4)
    mean, std, W_ref, b_ref, _ = _newton_logistic(x, y, 4, got["linear_l2"])
    ref = 100 * ((((vx.double() - mean) / std) @ W_ref + b_ref).argmax(1) == vy).double().mean().item()
    assert 40 < ref < 95 and abs(got["linear_top1"] - ref) <= 1.0, (got, ref)


def test_linear_probe_separates_separable_features():
    x, y = _gaussian_classes(600, 5, 32, 0.05, seed=0)
    vx, vy = _gaussian_classes(300, 5, 32, 0.05, seed=1)
    got = pw.linear_probe(x, y, vx, vy, 5)
    assert got["linear_top1"] == got["linear_top5"] == 100.0


def test_linear_probe_chooses_its_l2_on_training_images_only():
    # few images, many noisy features: the weakest L2 over-fits, and held-out images see it
    x, y = _gaussian_classes(200, 4, 128, 6.0, seed=4)
    vx, vy = _gaussian_classes(2000, 4, 128, 6.0, seed=5)
    a = pw.linear_probe(x, y, vx, vy, 4)
    b = pw.linear_probe(x, y, vx, torch.randint(0, 4, (2000,)), 4)  # val labels of noise
    c = pw.linear_probe(x, y, -vx, vy, 4)  # other val features
    assert a["linear_l2"] == b["linear_l2"] == c["linear_l2"]
    assert b["linear_top1"] < 40 < a["linear_top1"]  # and the val set was really used for the report
    # the held-out choice matters: the weakest L2 does worse on val than the one chosen
    mean, std, basis = pw.feature_stats(x)
    weakest = pw.fit_logistic(x, y, 4, pw.LINEAR_L2[-1], mean, std, basis)
    assert a["linear_l2"] > pw.LINEAR_L2[-1]
    assert a["linear_top1"] > pw.linear_accuracy(vx, vy, *weakest, mean, std)[0] + 1


def test_linear_probe_reports_progress_with_an_eta(monkeypatch):
    clock = iter(range(0, 10 ** 6, 31))  # every reading of the clock 31 s after the last
    monkeypatch.setattr(pw.time, "time", lambda: next(clock))
    lines = []
    x, y = _gaussian_classes(300, 3, 8, 1.0, seed=6)
    pw.linear_probe(x, y, x, y, 3, log=lambda *a, **k: lines.append(a[0]))
    assert lines and all(line.startswith("  linear probe, L2 ") and "ETA" in line for line in lines)
    assert any("on all training images" in line for line in lines)


def test_extract_features_returns_dataset_order_and_normalised_cls():
    train, _, _ = pw.build_datasets("synthetic", "", synthetic_size=(20, 10))
    ds = pw.EvalDataset(train, 32)
    backbone = pw.vit("vit_tiny", patch_size=8, depth=1, img_size=32)
    feats, labels, linear = pw.extract_features(backbone, ds, batch_size=6, device=torch.device("cpu"),
                                                linear=(4, False))
    assert feats.shape == (20, 192) and torch.equal(labels, torch.tensor([y for _, y in train]))
    x = torch.stack([ds[i][0] for i in (3, 17)])
    with torch.no_grad():
        direct = F.normalize(backbone.eval()(pw.imagenet_normalize(x.float() / 255))[:, 0], dim=1)
    assert torch.allclose(feats[[3, 17]], direct, atol=1e-5)
    assert torch.allclose(feats.norm(dim=1), torch.ones(20), atol=1e-5)
    # DINO's linear features, written out: the CLS of the last n blocks through the final norm
    deep = pw.vit("vit_tiny", patch_size=8, depth=5, img_size=32).eval()
    _, _, linear = pw.extract_features(deep, ds, 6, torch.device("cpu"), linear=(4, False))
    _, _, pooled = pw.extract_features(deep, ds, 6, torch.device("cpu"), linear=(1, True))
    with torch.no_grad():
        t, cls = deep.prepare_tokens(pw.imagenet_normalize(x.float() / 255)), []
        for i, block in enumerate(deep.blocks):
            t = block(t)
            cls.append(deep.norm(t)[:, 0])
        last = deep.norm(t)
    assert linear.dtype == torch.float16 and linear.shape == (20, 4 * 192) and pooled.shape == (20, 2 * 192)
    assert torch.allclose(linear[[3, 17]].float(), torch.cat(cls[1:], 1), atol=1e-2)
    assert torch.allclose(pooled[[3, 17]].float(), torch.cat([last[:, 0], last[:, 1:].mean(1)], 1), atol=1e-2)


def _write_image_folder(root, n_per_class=6, sizes=((40, 30), (25, 50))):
    modes = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"]
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n_per_class):
                w, h = sizes[i % len(sizes)]
                img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                mode = modes[i % len(modes)]
                img = img.convert("L").convert("I;16") if mode == "I;16" else img.convert(mode)
                img.save(os.path.join(root, split, c, f"{i}.{'jpg' if mode in ('RGB', 'L', 'CMYK') else 'png'}"))


FOLDER_RUN = ["--data", "folder", "--arch", "vit_tiny", "--depth", "1", "--patch_size", "8", "--global_size", "48",
              "--local_size", "16", "--n_local", "2", "--out_dim", "64", "--head_hidden_dim", "32",
              "--bottleneck_dim", "16", "--batch_size", "4", "--epochs", "1", "--num_workers", "0", "--knn_k", "3"]


def test_image_folder_of_mixed_modes_and_small_images_trains(tmp_path):
    _write_image_folder(tmp_path / "data")
    train, val, n_classes = pw.build_datasets("folder", str(tmp_path / "data"))
    assert (len(train), len(val), n_classes) == (12, 12, 2)
    assert all(train[i][0].shape[0] == 3 and train[i][0].dtype == torch.uint8 for i in range(len(train)))
    # 16-bit images are scaled to 8 bits, not clipped to white
    sixteen = [i for i, (path, _) in enumerate(train.samples) if Image.open(path).mode.startswith("I")]
    assert sixteen and all(train[i][0].float().mean() < 200 for i in sixteen)
    pw.main(FOLDER_RUN + ["--data_path", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")])
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.txt")]
    assert len(log) == 1 and math.isfinite(log[0]["train_loss"]) and "knn_top1_k3" in log[0]
    assert log[0]["bad_images"] == 0


def test_a_folder_of_small_images_gets_the_small_recipe_sized_to_the_device(tmp_path):
    _write_image_folder(tmp_path / "small", n_per_class=25, sizes=((30, 26),))
    _write_image_folder(tmp_path / "large", n_per_class=3, sizes=((500, 375), (320, 480)))
    cpu = pw.resolve_args(["--data", "folder", "--data_path", str(tmp_path / "small"), "--device", "cpu"])
    # the demo's model and views, and CPU_SAMPLES samples over these 50 images
    assert (cpu.arch, cpu.patch_size, cpu.depth, cpu.global_size, cpu.local_size) == ("vit_tiny", 8, 4, 32, 16)
    assert cpu.epochs == round(pw.CPU_SAMPLES / 50) and "26 px" in cpu.notes[0]
    gpu = pw.resolve_args(["--data", "folder", "--data_path", str(tmp_path / "small"), "--device", "cuda"])
    assert gpu.epochs == 10 * cpu.epochs and gpu.global_size == 32
    big = pw.resolve_args(["--data", "folder", "--data_path", str(tmp_path / "large"), "--device", "cpu"])
    assert (big.arch, big.patch_size, big.global_size, big.epochs) == ("vit_small", 16, 224, 100)
    # a flag on the command line still wins over the recipe
    assert pw.resolve_args(["--data", "folder", "--data_path", str(tmp_path / "small"), "--epochs", "3"]).epochs == 3


def test_in100_takes_exactly_the_cmc_classes_from_an_imagenet_root_or_a_prepared_folder(tmp_path):
    assert len(set(pw.IMAGENET100_CLASSES)) == 100 and "n02869837" in pw.IMAGENET100_CLASSES
    others = ["n01440764", "n01443537", "n09999999"]  # ImageNet-1K classes outside the subset
    for root, names in (("in1k", list(pw.IMAGENET100_CLASSES) + others), ("in100", pw.IMAGENET100_CLASSES)):
        for split in ("train", "val"):
            for c in names:
                os.makedirs(tmp_path / root / split / c)
                Image.new("RGB", (8, 8)).save(tmp_path / root / split / c / "0.png")
    for root in ("in1k", "in100"):
        train, val, n = pw.build_datasets("in100", str(tmp_path / root))
        assert n == 100 and train.classes == sorted(pw.IMAGENET100_CLASSES) == val.classes
        assert sorted(y for _, y in train.samples) == list(range(100))
        assert not any(o in path for path, _ in train.samples for o in others)
    import shutil
    shutil.rmtree(tmp_path / "in100" / "train" / "n02869837")
    with pytest.raises(pw.UserError, match=r"1 of the 100 ImageNet-100 \(CMC\) classes are missing .*n02869837"):
        pw.build_datasets("in100", str(tmp_path / "in100"))


def test_every_image_format_reads_as_pil_reads_it_and_damaged_files_are_unreadable(tmp_path, monkeypatch):
    a = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    a[:15] = 200  # flat and noisy parts
    rgb, pil_open = Image.fromarray(a), Image.open
    files = {"rgb.jpg": (rgb, {}), "grey.jpg": (rgb.convert("L"), {}), "cmyk.jpg": (rgb.convert("CMYK"), {}),
             "progressive.jpg": (rgb, dict(progressive=True)), "palette.png": (rgb.convert("P"), {}),
             "alpha.png": (rgb.convert("RGBA"), {}), "grey_alpha.png": (rgb.convert("LA"), {}),
             "png_named.JPEG": (rgb, dict(format="PNG")), "still.gif": (rgb, {}), "lossless.webp": (rgb, dict(lossless=True)),
             "bmp.bmp": (rgb, {}), "tiff.tif": (rgb, {}), "ppm.ppm": (rgb, {}), "pgm.pgm": (rgb.convert("L"), {}),
             "animated.gif": (rgb, dict(save_all=True, append_images=[rgb.rotate(90)]))}
    for name, (img, kw) in files.items():
        img.save(tmp_path / name, **kw)
        got = pw.load_image(tmp_path / name)
        want = TF.pil_to_tensor(pil_open(tmp_path / name).convert("RGB"))  # the first frame of an animation
        assert got.dtype == torch.uint8 and got.shape == want.shape == (3, 30, 40), name
        assert (got.int() - want.int()).abs().max() <= (1 if name.endswith("jpg") else 0), name
    sixteen = Image.fromarray((a[..., 0].astype(np.uint16) * 257)).convert("I;16")
    sixteen.save(tmp_path / "16bit.png")
    assert (pw.load_image(tmp_path / "16bit.png")[0].int() - torch.from_numpy(a[..., 0]).int()).abs().max() <= 1  # scaled
    # JPEG and PNG, even under another name, skip PIL: torchvision's decoders read them into tensors
    monkeypatch.setattr(pw.Image, "open", lambda *a, **k: pytest.fail("PIL opened a JPEG or PNG"))
    for name in ("rgb.jpg", "cmyk.jpg", "progressive.jpg", "palette.png", "png_named.JPEG"):
        pw.load_image(tmp_path / name)
    monkeypatch.undo()
    good = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(good[:len(good) // 2])
    (tmp_path / "truncated.png").write_bytes((tmp_path / "palette.png").read_bytes()[:200])
    (tmp_path / "text.jpg").write_bytes(b"not an image at all")
    for name in ("truncated.jpg", "truncated.png", "text.jpg"):
        with pytest.raises(pw.UNREADABLE):
            pw.load_image(tmp_path / name)


def test_corrupt_images_are_reported_replaced_and_counted_until_too_many(tmp_path, capsys):
    root = tmp_path / "data"
    _write_image_folder(root, n_per_class=8)
    good = open(root / "train" / "cat" / "0.jpg", "rb").read()
    open(root / "train" / "cat" / "0.jpg", "wb").write(good[:len(good) // 2])  # truncated JPEG
    open(root / "train" / "dog" / "1.png", "wb").write(b"not an image at all")
    args = FOLDER_RUN + ["--data_path", str(root), "--no_initial_knn"]
    pw.main(args + ["--output_dir", str(tmp_path / "ok"), "--max_bad_images", "0.5"])
    err = capsys.readouterr().err
    assert "0.jpg" in err and "1.png" in err and "unreadable" in err
    log = json.loads(open(tmp_path / "ok" / "log.txt").read())
    assert log["bad_images"] >= 1 and math.isfinite(log["train_loss"])
    with pytest.raises(SystemExit) as stop:
        pw.main(args + ["--output_dir", str(tmp_path / "strict"), "--max_bad_images", "0"])
    assert stop.value.code == 2 and "--max_bad_images" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Training end to end
# ------------------------------------------------------------------------------------------------

TINY = ["--data", "synthetic", "--synthetic_size", "96", "40", "--depth", "1", "--patch_size", "8",
        "--out_dim", "64", "--head_hidden_dim", "32", "--bottleneck_dim", "16", "--n_local", "2",
        "--batch_size", "16", "--knn_k", "5", "10", "--log_every", "2"]


def test_training_writes_safe_dino_layout_checkpoints_and_json_logs(tmp_path, capsys):
    out = str(tmp_path / "run")
    results = pw.main(TINY + ["--epochs", "2", "--output_dir", out])
    printed = capsys.readouterr().out
    assert "k-NN of the randomly initialised teacher" in printed and "k-NN of the trained teacher" in printed
    assert "ETA" in printed and "img/s" in printed
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)  # no pickled objects
    assert isinstance(ckpt["args"], dict) and ckpt["args"]["depth"] == 1
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 0
    for key in ("teacher", "student"):
        names = set(ckpt[key])
        assert "backbone.cls_token" in names and "head.last_layer.weight_v" in names
        assert all(n.startswith(("backbone.", "head.")) for n in names)
    # the teacher moved away from the student's init, by EMA, and differs from the student
    assert not torch.equal(ckpt["teacher"]["backbone.pos_embed"], ckpt["student"]["backbone.pos_embed"])
    log = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [e["epoch"] for e in log] == [0, 1]
    assert all(k in log[-1] for k in ("train_loss", "train_loss_image", "train_loss_patch", "knn_top1_k10",
                                      "linear_top1", "linear_top5", "linear_l2"))
    assert "linear probe of the trained teacher" in printed and "linear_top1" not in log[0]
    assert log[-1]["train_loss"] == pytest.approx(log[-1]["train_loss_image"] + log[-1]["train_loss_patch"], rel=1e-5)
    # patchwise_tools.py --eval on that checkpoint gives the same k-NN as the end of training
    again = tools.main(["--eval"] + TINY + ["--epochs", "2", "--output_dir", out])
    assert again["knn_top1_k10"] == pytest.approx(results["knn_top1_k10"])
    assert again["linear_top1"] == pytest.approx(results["linear_top1"])


def test_a_command_run_again_goes_on_with_its_run_and_never_rewrites_a_finished_one(tmp_path, capsys):
    out, log = tmp_path / "run", tmp_path / "run" / "log.txt"
    run = TINY + ["--output_dir", str(out), "--no_initial_knn"]
    pw.main(run + ["--epochs", "1"])
    finished = (out / "checkpoint.pth").read_bytes()
    capsys.readouterr()
    # the same command again: nothing trained, the checkpoint and the log as they were
    assert pw.main(run + ["--epochs", "1"]) == {}
    printed = capsys.readouterr().out
    assert "finished at epoch 1" in printed and "epoch 1/1" not in printed
    assert (out / "checkpoint.pth").read_bytes() == finished and len(log.read_text().splitlines()) == 1
    # longer: it goes on from the checkpoint (--resume is accepted, not needed), schedules recomputed
    pw.main(run + ["--epochs", "2", "--resume"])
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "epoch 1, iteration 0" in printed
    assert "schedules recomputed for 2 epochs" in printed
    assert "randomly initialised" not in printed and "epoch 1/2" not in printed and "epoch 2/2" in printed
    lines = log.read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]
    # shorter: refused in one line, the checkpoint kept
    ckpt = (out / "checkpoint.pth").read_bytes()
    with pytest.raises(SystemExit) as stop:
        pw.main(run + ["--epochs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--epochs 2 (checkpoint) vs 1 (now, shorter)" in err[0], err
    assert (out / "checkpoint.pth").read_bytes() == ckpt
    # log.txt holds each epoch once: a line written twice is kept once, and a line lost to a kill
    # during the evaluation that follows the epoch's checkpoint comes back from that checkpoint
    log.write_text(lines[0] + "\n" + lines[0] + "\n")
    pw.main(run + ["--epochs", "3"])
    again = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["epoch"] for e in again] == [0, 1, 2] and again[0] == json.loads(lines[0])
    assert again[1]["train_loss"] == json.loads(lines[1])["train_loss"]


def test_resume_refuses_every_changed_flag_that_would_change_the_run_and_names_both_values(tmp_path, capsys):
    out = str(tmp_path / "run")
    pw.main(TINY + ["--epochs", "1", "--no_initial_knn", "--output_dir", out])
    capsys.readouterr()
    changed = ["--batch_size", "8", "--seed", "3", "--photometric", "view", "--global_scale", "0.5", "1",
               "--teacher_temp", "0.05", "--data", "folder", "--synthetic_size", "96", "20"]
    with pytest.raises(SystemExit) as stop:
        pw.main(TINY + ["--epochs", "2", "--resume", "--output_dir", out, "--data_path", str(tmp_path)] + changed)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    for words in ("--batch_size 16 (checkpoint) vs 8 (now)", "--seed 0 (checkpoint) vs 3 (now)",
                  "--photometric patch (checkpoint) vs view (now)", "--global_scale (0.4, 1.0) (checkpoint) vs (0.5, 1.0)",
                  "--teacher_temp 0.04 (checkpoint) vs 0.05", "--data synthetic (checkpoint) vs folder",
                  "--synthetic_size (96, 40) (checkpoint) vs (96, 20)"):
        assert words in lines[0], (words, lines[0])
    assert "--epochs" not in lines[0] and "--data_path" not in lines[0]
    # where the data lies, how it is loaded, logged and evaluated may change
    pw.main(TINY + ["--epochs", "1", "--resume", "--output_dir", out, "--num_workers", "1", "--log_every", "5",
                    "--knn_k", "3", "--linear_iters", "10", "--data_path", str(tmp_path)])


def test_similarity_matching_and_dino_mode_train(tmp_path):
    for i, extra in enumerate((["--matching", "similarity"], ["--matching", "intersection"],
                               ["--patch_loss_weight", "0", "--photometric", "view"],
                               ["--loss_weighting", "token_mean", "--n_local", "0"])):
        pw.main(TINY + ["--epochs", "1", "--no_initial_knn", "--output_dir", str(tmp_path / str(i))] + extra)
        log = json.loads(open(tmp_path / str(i) / "log.txt").read())
        assert math.isfinite(log["train_loss"])
        assert (log["train_loss_patch"] == 0.0) == (extra[1] == "0")


def _run(args, env=None, timeout=300):
    return subprocess.run([sys.executable] + args, cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_torchrun_with_two_processes_trains_and_evaluates_on_cpu(tmp_path):
    r = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "patchwise.py"] + TINY +
             ["--epochs", "1", "--output_dir", str(tmp_path), "--device", "cpu"])
    assert r.returncode == 0, r.stderr[:3000]
    assert "on 2 process(es)" in r.stdout and "k-NN of the trained teacher" in r.stdout
    assert r.stdout.count("k-NN of the trained teacher") == 1  # rank 0 alone prints


def _assert_one_line_error(r, words):
    """A user mistake: exit code 2, and one stderr line, no traceback, naming the problem."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_user_mistakes_end_with_one_line_and_no_traceback(tmp_path):
    cases = [
        (["--global_size", "30"], "not divisible by --patch_size"),
        (["--data", "folder", "--data_path", str(tmp_path / "missing")], "does not exist"),
        (["--data", "cifar10", "--data_path", str(tmp_path)], "add --download"),
    ]
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "val" / "a").mkdir(parents=True)
    cases.append((["--data", "folder", "--data_path", str(tmp_path / "empty")], "no images"))
    for args, words in cases:
        _assert_one_line_error(_run(["patchwise.py"] + args, timeout=120), words)


def test_help_shows_every_real_default_and_each_presets_value():
    parser = pw.build_parser()
    assert "default: None" not in parser.format_help()
    actions = {a.dest: a for a in parser._actions}
    show = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else str(v)  # noqa: E731
    for key, value in pw.DEFAULTS.items():
        text = pw.HelpFormatter("patchwise.py")._get_help_string(actions[key]) % {}
        assert f"(default: {show(value) if value is not None else 12}" in text, (key, text)
        for name, preset in pw.PRESETS.items():
            if key in preset:
                assert preset[key] != value, f"preset {name} repeats the default of {key}"
                assert f"{name} {show(preset[key])}" in text, (key, name, text)


def test_every_runs_sh_command_is_accepted_by_the_parser():
    r = subprocess.run(["bash", "runs.sh", "--dry-run"], cwd=HERE, capture_output=True, text=True, check=True)
    export, *commands = r.stdout.strip().splitlines()
    assert export == "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"  # torchrun's restarts need it
    assert len(commands) == 12  # 3 datasets x (PW-Self, DINO) x (pretrain, evaluation)
    for line, script in zip(commands, itertools.cycle(["patchwise.py", "patchwise_tools.py"])):
        words = line.split()
        assert words[0] == "torchrun" and script in words and "--resume" not in words
        flags = words[words.index(script) + 1:]
        if script == "patchwise_tools.py":
            assert flags[0] == "--eval"
            flags = flags[1:]
        args = pw.resolve_args(flags)
        pw.check_args(args)
        assert args.data in ("cifar10", "in100", "in1k")


# ------------------------------------------------------------------------------------------------
# Reliability: exact resume, atomic checkpoints, rank-count invariance, bad input
# ------------------------------------------------------------------------------------------------

def _states(path):
    ckpt = torch.load(path, weights_only=True)
    return {f"{k}.{n}": t for k in ("teacher", "student") for n, t in ckpt[k].items()}


def _kill_after(args, lines, env=None):
    """Start a run and SIGKILL it once it has logged `lines` iterations."""
    proc = subprocess.Popen([sys.executable, "patchwise.py"] + args, cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("epoch ")
        if seen >= lines:
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -9, "the run ended before it could be killed"


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    run = TINY + ["--synthetic_size", "96", "40", "--batch_size", "8", "--epochs", "10", "--drop_path", "0.1",
                  "--ckpt_every", "7", "--log_every", "1", "--no_initial_knn", "--knn_k", "5"]
    ref = tmp_path / "ref"
    r = _run(["patchwise.py"] + run + ["--output_dir", str(ref)])
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "killed"
    rng = np.random.default_rng(0)
    _kill_after(run + ["--output_dir", str(out)], int(rng.integers(15, 50)))
    _kill_after(run + ["--output_dir", str(out), "--resume"], int(rng.integers(10, 40)))
    r = _run(["patchwise.py"] + run + ["--output_dir", str(out), "--resume"])
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    a, b = _states(ref / "checkpoint.pth"), _states(out / "checkpoint.pth")
    assert a.keys() == b.keys()
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) == 0.0


def _rank_of_children(pid):
    """{pid: RANK} of the processes whose parent is pid (torchrun's workers), read from /proc."""
    ranks = {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            if int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                env = open(f"/proc/{d}/environ", "rb").read().split(b"\0")
                ranks[int(d)] = next(e[5:].decode() for e in env if e.startswith(b"RANK="))
        except (OSError, StopIteration):  # gone meanwhile, or not a worker
            pass
    return ranks


# As runs.sh sets it: a group that torchrun restarts gets a store of its own (pytorch/pytorch#135712)
RESTARTABLE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds torchrun's workers through /proc")
def test_torchrun_restarting_after_one_rank_is_killed_goes_on_from_the_checkpoint_bit_for_bit(tmp_path):
    run = TINY + ["--synthetic_size", "96", "40", "--batch_size", "8", "--epochs", "2", "--drop_path", "0.1",
                  "--ckpt_every", "5", "--log_every", "1", "--no_initial_knn", "--linear_iters", "0", "--device", "cpu"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    ref = _run(launch[1:] + ["patchwise.py"] + run + ["--output_dir", str(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(launch + ["--max-restarts", "1", "patchwise.py"] + run + ["--output_dir", str(out)],
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **RESTARTABLE})
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("epoch 1/2 it 7/12") and "resumed" not in "".join(printed):  # after iteration 5's save
            rank1 = [pid for pid, rank in _rank_of_children(proc.pid).items() if rank == "1"]
            assert len(rank1) == 1, _rank_of_children(proc.pid)
            os.kill(rank1[0], 9)
    proc.wait(timeout=300)
    printed = "".join(printed)
    assert proc.returncode == 0, printed[-3000:]
    # restarted by torchrun, both ranks went on from the mid-epoch checkpoint, not from scratch
    assert printed.count("epoch 1/2 it 1/12") == 1 and "resumed from" in printed
    assert f"{out / 'checkpoint.pth'}: epoch 0, iteration 5" in printed
    a, b = _states(tmp_path / "ref" / "checkpoint.pth"), _states(out / "checkpoint.pth")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["epoch"] for line in open(out / "log.txt")] == [0, 1]


def test_a_kill_during_save_leaves_the_previous_checkpoint_whole(tmp_path):
    # the run, with every rename of a finished temporary file made 2 s late: a window to kill it in
    slow_rename = ("import os, sys, time, patchwise; replace = os.replace; "
                   "os.replace = lambda a, b: (time.sleep(2), replace(a, b)); patchwise.main(sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", slow_rename] + TINY +
                            ["--epochs", "3", "--ckpt_every", "2", "--no_initial_knn", "--output_dir", str(tmp_path)],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, tmp = tmp_path / "checkpoint.pth", tmp_path / "checkpoint.pth.tmp"
    import time
    deadline = time.time() + 120
    while not (ckpt.exists() and tmp.exists()) and time.time() < deadline:  # the second save is under way
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert ckpt.exists() and tmp.exists()
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 2 and state["epoch"] == 0


def _assert_same_teacher(a, b):
    """The teachers of two checkpoints agree to 1e-5 of each tensor's scale."""
    t1, t2 = _states(a), _states(b)
    for k in t1:
        if k.startswith("teacher."):
            assert (t1[k] - t2[k]).abs().max() <= 1e-5 * max(t1[k].abs().max().item(), 1.0), k


def _losses(stdout):
    import re
    return [float(m) for m in re.findall(r"it \d+/\d+  loss ([0-9.]+)", stdout)]


def test_one_and_two_processes_give_the_same_losses_and_teacher(tmp_path):
    run = TINY + ["--synthetic_size", "320", "40", "--batch_size", "16", "--epochs", "1", "--log_every", "1",
                  "--no_initial_knn", "--device", "cpu"]
    one = _run(["patchwise.py"] + run + ["--output_dir", str(tmp_path / "one")])
    two = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "patchwise.py"] + run +
               ["--output_dir", str(tmp_path / "two")])
    assert one.returncode == 0 and two.returncode == 0, two.stderr[:3000]
    l1, l2 = _losses(one.stdout), _losses(two.stdout)
    assert len(l1) == len(l2) == 20
    assert max(abs(a - b) / abs(a) for a, b in zip(l1, l2)) < 1e-5 + 5e-6 / min(l1)  # printed to 5 decimals
    _assert_same_teacher(tmp_path / "one" / "checkpoint.pth", tmp_path / "two" / "checkpoint.pth")
    # the evaluation of one teacher does not depend on the number of processes that extract its features
    again = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "patchwise_tools.py",
                  "--eval"] + run + ["--output_dir", str(tmp_path / "one")])
    assert again.returncode == 0, again.stderr[:3000]
    import re
    probe = r"linear probe of the .*L2 (\S+) chosen.*top-1 ([0-9.]+)% top-5 ([0-9.]+)%"
    knn = r"k-NN of the .*: (k=5.*)"
    assert re.findall(probe, one.stdout) == re.findall(probe, again.stdout) != []
    assert re.findall(knn, one.stdout) == re.findall(knn, again.stdout) != []


def test_non_finite_loss_stops_with_the_iteration_and_keeps_a_good_checkpoint(tmp_path):
    # the warm-up's first step has lr 0 and its second huge weights, so the loss of the third is the
    # first that is not finite; the checkpoint saved after the second step is the last good one
    r = _run(["patchwise.py"] + TINY + ["--epochs", "2", "--lr", "1e35", "--warmup_epochs", "1", "--ckpt_every",
                                        "1", "--log_every", "1", "--no_initial_knn", "--output_dir", str(tmp_path)])
    assert r.returncode == 2 and "non-finite at iteration 2 " in r.stderr and "Traceback" not in r.stderr, r.stderr
    # the line names every flag that sets the step's size: a huge --min_lr or weight decay also ends here
    assert all(f in r.stderr for f in ("--lr,", "--min_lr,", "--weight_decay(_end)", "--teacher_temp")), r.stderr
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=True)["iteration"] == 2
    assert all(t.isfinite().all() for t in _states(tmp_path / "checkpoint.pth").values())


# Run by torchrun in the tests below: patchwise with one rank (RANK_ALONE) meeting what the others do
# not: a non-finite loss from its third step (nan), or a data folder missing on its node (no_data).
RANK_ALONE = """
import os, sys
sys.path.insert(0, {here!r})
import patchwise as pw
alone = os.environ["RANK"] == os.environ["RANK_ALONE"]
if os.environ["WHAT"] == "nan" and alone:
    real_step, calls = pw.train_step, []
    def train_step(*args, **kwargs):
        calls.append(1)
        out = real_step(*args, **kwargs)
        return out * float("nan") if len(calls) >= 3 else out
    pw.train_step = train_step
if os.environ["WHAT"] == "own_output_dir" and alone:
    real_prepare = pw.prepare_output_dir
    pw.prepare_output_dir = lambda path: real_prepare(path + "_on_this_node")
if os.environ["WHAT"] == "no_data" and alone:
    real_build = pw.build_datasets
    pw.build_datasets = lambda data, path, *a: real_build(data, path + "_not_on_this_node", *a)
pw.main(sys.argv[1:])
"""


def _run_with_one_rank_alone(tmp_path, what, rank, argv):
    script = tmp_path / "rank_alone.py"
    script.write_text(RANK_ALONE.format(here=HERE))
    return _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)] + argv,
                env={"WHAT": what, "RANK_ALONE": str(rank)})


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_the_same_step_with_one_line(tmp_path):
    r = _run_with_one_rank_alone(tmp_path, "nan", 1, TINY + ["--epochs", "2", "--log_every", "1", "--no_initial_knn",
                                                            "--device", "cpu", "--output_dir", str(tmp_path / "out")])
    lines = [line for line in r.stderr.splitlines() if line.startswith("patchwise: error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    assert "loss became non-finite at iteration 2 of the run" in lines[0] and "rank" not in lines[0]
    assert 'patchwise.py", line' not in r.stderr  # no traceback through patchwise (torchrun prints its own)
    # both ranks stopped there: rank 0, whose own loss stayed finite, logged its last line at iteration 2
    assert [line.split("  loss")[0] for line in r.stdout.splitlines() if line.startswith("epoch")][-1] == "epoch 1/2 it 2/6"


def test_an_error_that_one_rank_alone_meets_is_printed_once_with_its_rank(tmp_path):
    _write_image_folder(tmp_path / "data")
    r = _run_with_one_rank_alone(tmp_path, "no_data", 1, FOLDER_RUN + [
        "--data_path", str(tmp_path / "data"), "--device", "cpu", "--output_dir", str(tmp_path / "out")])
    lines = [line for line in r.stderr.splitlines() if line.startswith("patchwise: error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("patchwise: error: rank 1: --data_path") and "_not_on_this_node does not exist" in lines[0]


def test_more_user_mistakes_are_named_with_their_fix(tmp_path):
    pw.main(TINY + ["--epochs", "1", "--no_initial_knn", "--output_dir", str(tmp_path / "a")])
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        (["--resume", "--output_dir", str(tmp_path / "a"), "--patch_size", "4"], {}, "patch_size 8 (checkpoint) vs 4 (now)"),
        (["--output_dir", str(blocker / "out")], {}, "not writable"),
        (["--batch_size", "1"], {"WORLD_SIZE": "2"}, "does not split over 2 processes"),
    ]
    for args, env, words in cases:
        _assert_one_line_error(_run(["patchwise.py"] + TINY + args, env=env, timeout=120), words)


# ------------------------------------------------------------------------------------------------
# Tools: pictures, weights in and out
# ------------------------------------------------------------------------------------------------

def _photo(w=120, h=90, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


# Among -1, 0 and nan, the values that are legal (each means something: off, none, no decay, ...);
# every other one of them, for every numeric flag the parser has, must be refused in one line.
LEGAL = {("seed", "-1"), ("seed", "0"), ("num_workers", "0"), ("max_bad_images", "0"), ("drop_path", "0"),
         ("n_local", "0"), ("blur_sigma", "0"), ("patch_loss_weight", "0"), ("warmup_teacher_temp_epochs", "0"),
         ("min_lr", "0"), ("warmup_epochs", "0"), ("weight_decay", "0"), ("weight_decay_end", "0"),
         ("momentum_teacher", "0"), ("clip_grad", "0"), ("freeze_last_layer", "0"), ("ckpt_every", "0"),
         ("knn_every", "0"), ("linear_iters", "0")}


def test_every_numeric_flag_refuses_bad_values_in_one_line_naming_flag_and_value(capsys, tmp_path):
    numeric = [a for a in pw.build_parser()._actions if a.type not in (None, pw.true_or_false)]
    assert len(numeric) >= 34
    for action in numeric:
        flag, n = action.option_strings[0], action.nargs if isinstance(action.nargs, int) else 1
        for value in ("-1", "0", "nan"):
            argv = [flag] + [value] * n
            if (action.dest, value) in LEGAL:
                pw.check_args(pw.resolve_args(argv))
                continue
            with pytest.raises(SystemExit) as stop:
                pw.main(argv)
            lines = capsys.readouterr().err.strip().splitlines()
            assert stop.value.code == 2 and len(lines) == 1, (argv, lines)
            assert flag in lines[0] and value in lines[0], (argv, lines)
    for argv, words in ((["--global_scale", "0.9", "0.1"], "smaller value first"),
                        (["--local_scale", "0.2", "1.5"], "(0, 1]"), (["--lr", "-1"], "a positive number")):
        with pytest.raises(SystemExit):
            pw.main(argv)
        assert words in capsys.readouterr().err
    # legal but odd: a negative seed trains
    pw.main(TINY + ["--seed", "-1", "--epochs", "1", "--no_initial_knn", "--output_dir", str(tmp_path)])
    assert math.isfinite(json.loads(open(tmp_path / "log.txt").read())["train_loss"])


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save({"w": torch.zeros(1000)}, tmp_path / "whole.pth")
    (tmp_path / "torn.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:600])
    for name in ("photo.jpg", "notes.txt", "empty.pth", "torn.pth"):
        r = _run(["patchwise_tools.py", "--eval"] + TINY + ["--pretrained", str(tmp_path / name)], timeout=120)
        _assert_one_line_error(r, f"cannot read {tmp_path / name} as a PyTorch file")
        assert "empty, truncated or not a checkpoint; pass another file" in r.stderr
        assert "--trust_checkpoint" not in r.stderr  # torch's words for these are not its refusal of a global


def test_data_workers_never_outnumber_the_cores_and_torch_does_not_warn(tmp_path):
    cores = len(os.sched_getaffinity(0))
    args = pw.resolve_args(["--num_workers", str(cores + 3)])
    assert args.num_workers == cores and any(f"{cores + 3} data workers asked for" in n for n in args.notes)
    assert pw.resolve_args(["--num_workers", "1"]).notes == []
    r = _run(["patchwise.py"] + TINY + ["--epochs", "1", "--num_workers", str(cores + 3), "--output_dir",
                                        str(tmp_path)], env={"PYTHONWARNINGS": "always"})
    assert r.returncode == 0 and "data workers asked for" in r.stdout, r.stderr[-2000:]
    assert "worker processes in total" not in r.stderr, r.stderr[-2000:]


def test_show_matching_draws_exactly_the_valid_matches(tmp_path):
    p, sg, sl = 8, 64, 32
    out = tmp_path / "m.png"
    pairs, box, flip = tools.show_matching(TF.pil_to_tensor(_photo()), out, patch_size=p, global_size=sg, local_size=sl, seed=3)
    index, valid = pw.match_patches(box[0:1], flip[0:1], sg, box[2:3], flip[2:3], sl, p)  # re-derived
    assert pairs == [(n, int(index[0, n])) for n in range(index.shape[1]) if valid[0, n]] and pairs
    img = np.asarray(Image.open(out))
    margin, gap = 8, 16
    assert img.shape == (2 * margin + 2 * sg + gap, 2 * margin + sg + gap + sl, 3)
    for row in range(2):  # per-patch and per-view panels carry the same outlines
        top = margin + row * (sg + gap)
        for n, t in pairs:
            colour = tools.pair_colour(t)
            (sr, sc), (tr, tc) = divmod(n, sl // p), divmod(t, sg // p)
            assert tuple(img[top + tr * p + p // 2, margin + tc * p]) == colour  # teacher patch's left edge
            assert tuple(img[top + sr * p + p // 2, margin + sg + gap + sc * p]) == colour  # student's


def test_pictures_of_a_photo_take_the_imagenet_geometry_unless_told_otherwise(tmp_path, monkeypatch):
    _photo().save(tmp_path / "photo.png")
    margin, gap = 8, 16
    for flags, (sg, sl) in (([], (224, 96)), (["--global_size", "64", "--local_size", "32"], (64, 32))):
        tools.main(["--show_matching", str(tmp_path / "photo.png"), "--out", str(tmp_path / "m.png")] + flags)
        assert Image.open(tmp_path / "m.png").size == (2 * margin + sg + gap + sl, 2 * margin + 2 * sg + gap)
    torch.save({"teacher": pw.encoder_from_args(pw.resolve_args([])).state_dict()}, tmp_path / "demo.pth")
    drawn, show_attention = [], tools.show_attention
    monkeypatch.setattr(tools, "show_attention", lambda image, out, backbone, size: drawn.append(
        (size, backbone.patch_size, show_attention(image, out, backbone, size).shape)))
    tools.main(["--show_attention", str(tmp_path / "photo.png"), "--out", str(tmp_path / "a.png"),
             "--pretrained", str(tmp_path / "demo.pth")])
    assert drawn == [(224, 8, (3, 1 + 28 * 28))]  # the photo at 224 px through the demo's patch-8 ViT


def test_show_attention_draws_a_distribution_per_head(tmp_path):
    backbone = pw.vit("vit_tiny", patch_size=8, depth=2, img_size=32)
    attn = tools.show_attention(TF.pil_to_tensor(_photo()), tmp_path / "a.png", backbone, size=32)
    img = TF.center_crop(TF.resize(TF.pil_to_tensor(_photo()), 32, TF.InterpolationMode.BICUBIC, antialias=True), 32)
    with torch.no_grad():  # the CLS row of the last block's attention over the centre crop
        ref = tools.last_selfattention(backbone, pw.imagenet_normalize(img[None].float() / 255))[0, :, 0]
    assert attn.shape == (3, 1 + 16) and torch.allclose(attn, ref, atol=1e-6)
    assert Image.open(tmp_path / "a.png").size == (4 * (224 + 4) - 4, 224)  # the image and a panel per head, x7


def _features(backbone, x):
    with torch.no_grad():
        return backbone.eval()(x)


def test_weights_round_trip_through_export_and_every_layout_we_read(tmp_path):
    out = tmp_path / "run"
    pw.main(TINY + ["--epochs", "1", "--no_initial_knn", "--output_dir", str(out)])
    exported = tmp_path / "backbone.pth"
    tools.main(TINY + ["--output_dir", str(out), "--export_backbone", str(exported)])
    bare = torch.load(exported, weights_only=True)
    assert "cls_token" in bare and not any(k.startswith(("backbone.", "head.")) for k in bare)
    teacher = {k.removeprefix("backbone."): v for k, v in torch.load(out / "checkpoint.pth", weights_only=True)["teacher"].items()
               if k.startswith("backbone.")}
    ref = pw.vit("vit_tiny", patch_size=8, depth=1, img_size=32)
    ref.load_state_dict(teacher, strict=True)
    again = pw.vit("vit_tiny", patch_size=8, depth=1, img_size=32)
    again.load_state_dict(bare, strict=True)  # DINO's / timm's ViT load it the same way
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_features(ref, x), _features(again, x))

    # DINO's full checkpoint: module.-prefixed teacher with backbone./head., args as a Namespace
    import argparse
    full = {"teacher": {"module.backbone." + k: v for k, v in bare.items()} | {"module.head.mlp.0.weight": torch.zeros(1)},
            "args": argparse.Namespace(arch="vit_tiny")}
    torch.save(full, tmp_path / "dino_full.pth")
    with pytest.raises(pw.UserError, match="--trust_checkpoint"):
        pw.read_weights(str(tmp_path / "dino_full.pth"))
    loaded = pw.vit("vit_tiny", patch_size=8, depth=1, img_size=32)
    pw.load_backbone(loaded, pw.read_weights(str(tmp_path / "dino_full.pth"), trust=True), "dino_full.pth")
    assert torch.equal(_features(loaded, x), _features(ref, x))

    # timm: bare keys plus a classifier head; and a position embedding at another grid (224/16 -> 14x14)
    timm_like = dict(bare, **{"head.weight": torch.zeros(10, 192), "head.bias": torch.zeros(10)})
    big = pw.vit("vit_tiny", patch_size=8, depth=1, img_size=112)  # 14x14 grid
    pw.load_backbone(big, timm_like, "timm")
    assert torch.allclose(big.pos_embed, pw.interpolate_pos_embed(bare["pos_embed"], (14, 14)))
    assert torch.equal(big.blocks[0].attn.qkv.weight, bare["blocks.0.attn.qkv.weight"])

    # our checkpoint's student, when asked for
    student = pw.vit("vit_tiny", patch_size=8, depth=1, img_size=32)
    pw.load_backbone(student, torch.load(out / "checkpoint.pth", weights_only=True), "ckpt", key="student")
    assert not torch.equal(student.pos_embed, ref.pos_embed)  # the student, not the EMA teacher

    # --eval --pretrained evaluates the exported file like the checkpoint itself
    a = tools.main(["--eval"] + TINY + ["--output_dir", str(out)])
    b = tools.main(["--eval"] + TINY + ["--output_dir", str(tmp_path / "none"), "--pretrained", str(exported)])
    assert a == b

    # another architecture, another depth: one line names the mismatched shapes and the missing keys
    with pytest.raises(pw.UserError, match=r"size mismatch for cls_token: .*\[1, 1, 192\].*\[1, 1, 384\]") as e:
        pw.load_backbone(pw.vit("vit_small", patch_size=8, depth=1, img_size=32), bare, "backbone.pth")
    assert "\n" not in str(e.value) and "--arch" in str(e.value)
    with pytest.raises(pw.UserError, match=r"Missing key\(s\) in state_dict: .*blocks\.1\.") as e:
        pw.load_backbone(pw.vit("vit_tiny", patch_size=8, depth=2, img_size=32), bare, "backbone.pth")
    assert "\n" not in str(e.value) and "--depth" in str(e.value)


def _synthetic_batches(n):
    """n batches of 8 demo images (32/16 px views, 2 locals, patch 8), one epoch's draws each."""
    train, _, _ = pw.build_datasets("synthetic", "", synthetic_size=(8, 2))
    ds = pw.MultiViewDataset(train, 0, 32, 16, 2, 8)
    return [torch.utils.data.default_collate([ds[(epoch, i)] for i in range(8)]) for epoch in range(n)]


def _tiny_models(K, depth, hidden, bottleneck):
    """A seeded ViT-tiny/8 student, its equal teacher, PWSelfLoss and AdamW, as train builds them."""
    torch.manual_seed(0)
    student = pw.build_encoder("vit_tiny", 8, K, 0.0, depth, 32, hidden, bottleneck)
    teacher = pw.build_encoder("vit_tiny", 8, K, 0.0, depth, 32, hidden, bottleneck)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher, pw.PWSelfLoss(K), torch.optim.AdamW(pw.param_groups(student))


class _HostWaits(TorchDispatchMode):
    """Records, by patchwise.py's line, every op where the host would wait for a CUDA device: a value
    read back, a copy to the host, a copy from the host without non_blocking."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:  # recorded, and 0 lets the step go on
            self.seen.append((str(func), self.where()))
            return 0
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):  # (src, dst) on CUDA?
            src, dst = (args[0], kwargs.get("device") or args[0].device) if func is torch.ops.aten._to_copy.default \
                else (args[1], args[0].device)
            non_blocking = kwargs.get("non_blocking") or args[2:3] == (True,)
            src, dst = src.device.type == "cuda", torch.device(dst).type == "cuda"
            if src and not dst or dst and not src and not non_blocking:
                self.seen.append((str(func), self.where()))
        return func(*args, **kwargs)

    @staticmethod
    def where():
        import traceback
        return [f"{f.lineno}: {f.line}" for f in traceback.extract_stack()
                if os.path.basename(f.filename) == "patchwise.py"][-1:]


def test_a_training_step_never_makes_the_host_wait_for_the_device(monkeypatch):
    """train_step on CUDA tensors simulated by FakeTensorMode, every op seen by torch's dispatch.
    Autograd's engine wants a real CUDA context, so backward gives every parameter a gradient
    instead: it runs only ops derived from the forward's, none of patchwise's own lines."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    layer = torch.nn.Linear(1, 1)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer.to("cuda")
    except RuntimeError:  # torch 2.4 initialises CUDA to move a module, and needs a driver for it
        pytest.skip("this torch cannot simulate CUDA tensors without a CUDA driver")
    (batch,) = _synthetic_batches(1)
    warnings.simplefilter("ignore")  # autocast off without a real GPU: the same ops in float32
    with FakeTensorMode(allow_non_fake_inputs=True), _HostWaits() as waits:  # the detector sees all three
        x = torch.zeros(4, 3, device="cuda")
        x[:, [0, 2]].sum().item()
        torch.tensor([1.0]).to("cuda")
    assert [f for f, _ in waits.seen] == ["aten._to_copy.default", "aten._local_scalar_dense.default",
                                          "aten._to_copy.default"]
    for weight, matching in ((1.0, "coords"), (1.0, "intersection"), (1.0, "similarity"), (0.0, "coords")):
        student, teacher, loss_fn, _ = _tiny_models(64, 1, 32, 16)  # built outside: drop path's rates
        loss_fn.patch_loss_weight = weight
        with FakeTensorMode(allow_non_fake_inputs=True):
            student, teacher, loss_fn = student.to("cuda"), teacher.to("cuda"), loss_fn.to("cuda")
            opt = torch.optim.AdamW(pw.param_groups(student), fused=True)
            monkeypatch.setattr(torch.Tensor, "backward", lambda loss: [
                setattr(p, "grad", torch.ones_like(p)) for p in student.parameters() if p.requires_grad])
            with _HostWaits() as waits:
                for measure_entropy in (True, False):  # a logged step, then another
                    out = pw.train_step(student, teacher, loss_fn, opt, batch, epoch=0, lr=1e-3, wd=0.04,
                                        momentum=0.99, patch_size=8, matching=matching, amp_dtype=torch.bfloat16,
                                        measure_entropy=measure_entropy)
            assert out.device.type == "cuda" and out.shape == (7,)
        assert waits.seen == [], (weight, matching, waits.seen)
        monkeypatch.undo()


def test_entropies_are_measured_only_when_asked_and_change_nothing_else():
    (batch,) = _synthetic_batches(1)
    outs = []
    for measure_entropy in (True, False):
        student, teacher, loss_fn, opt = _tiny_models(64, 1, 32, 16)
        outs.append(pw.train_step(student, teacher, loss_fn, opt, batch, epoch=0, lr=1e-3, wd=0.04, momentum=0.99,
                                  patch_size=8, measure_entropy=measure_entropy))
        outs.append(torch.cat([p.flatten() for p in teacher.parameters()]))
    assert torch.equal(outs[0][:3], outs[2][:3]) and torch.equal(outs[1], outs[3])
    assert (outs[0][3:] > 0).all() and (outs[2][3:] == 0).all()


def test_the_clip_caps_each_parameters_gradient_norm_on_its_own():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((3, 4), (5,), (2, 2, 2), (7,))]
    for p, size in zip(params, (10.0, 0.1, 3.0, 0.0)):
        p.grad = torch.randn_like(p) * size
    before = [p.grad.clone() for p in params]
    pw.clip_gradients(params, 1.0)
    for p, g in zip(params, before):  # DINO's clip_gradients, written out
        assert torch.allclose(p.grad, g * min(1.0, 1.0 / (g.norm().item() + 1e-6)))
    assert torch.equal(params[1].grad, before[1]) and params[0].grad.norm() == pytest.approx(1.0, abs=1e-5)


def test_compiled_step_gives_the_eager_losses():
    batches, losses = _synthetic_batches(3), []
    for compile_ in (False, True):
        student, teacher, loss_fn, opt = _tiny_models(64, 1, 32, 16)
        s, t = (torch.compile(student), torch.compile(teacher)) if compile_ else (student, teacher)
        try:
            # lr 1e-4: AdamW's division by sqrt(v) turns the rounding of near-zero gradients into
            # lr-sized steps, and compiled kernels round otherwise (torch 2.4 at lr 1e-3: 1.1e-5)
            losses.append([pw.train_step(s, t, loss_fn, opt, batch, epoch=0, lr=1e-4, wd=0.04, momentum=0.9,
                                         patch_size=8)[0].item() for batch in batches])
        except Exception as e:  # no working compiler toolchain on this machine
            if compile_:
                pytest.skip(f"torch.compile does not work here: {type(e).__name__}")
            raise
    assert max(abs(a - b) / abs(a) for a, b in zip(*losses)) < 1e-5, losses


# ------------------------------------------------------------------------------------------------
# Downstream: copy detection and image retrieval as DINO measures them (../shared/DOWNSTREAM.md)
# ------------------------------------------------------------------------------------------------

def test_trapezoid_ap_and_compute_map_give_the_golden_values():
    assert tools.average_precision([0], 1) == 1.0
    assert tools.average_precision([1], 1) == 0.25  # not 1/2: the trapezoid
    assert tools.average_precision([], 3) == 0.0
    ranks = np.array([[3, 0, 5, 1, 2, 4]]).T  # (n_db, n_q): one query
    easy, hard, junk = [0], [1, 2], [3]
    m, aps, mp, _ = tools.compute_map(ranks, [dict(ok=easy, junk=junk + hard)])
    assert m == pytest.approx(1.0)
    m, _, mp, _ = tools.compute_map(ranks, [dict(ok=easy + hard, junk=junk)])
    assert m == pytest.approx(55 / 72) and mp == pytest.approx([1, 0.75, 0.75])
    m, _, mp, _ = tools.compute_map(ranks, [dict(ok=hard, junk=junk + easy)])
    assert m == pytest.approx(5 / 12) and mp == pytest.approx([0, 2 / 3, 2 / 3])
    # a query without positives is NaN and leaves the mean; junk is never a positive
    ranks = np.array([[0, 1, 2], [2, 1, 0]]).T
    m, aps, _, _ = tools.compute_map(ranks, [dict(ok=[0]), dict(ok=[], junk=[2])])
    assert m == 1.0 and np.isnan(aps[1])
    m, _, _, _ = tools.compute_map(ranks[:, :1], [dict(ok=[2], junk=[0, 1])])
    assert m == 1.0  # the two junk items above the positive are left out of the ranking


def _jpeg(path, seed, size=(40, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = _photo(*size, seed=seed)
    if str(path).endswith(".png"):
        img.save(path)
    else:
        img.save(path, quality=90)


def _copydays(root, levels=True):
    """Copydays' layout: 6-digit names, strong copies by prefix, a jpegqual and a crops level."""
    for i in range(4):
        _jpeg(root / "original" / f"20{i}000.jpg", i)
    for name in ("200001", "200002", "201001", "203001"):
        _jpeg(root / "strong" / f"{name}.jpg", 100 + int(name[2]))
    if levels:
        for i in range(4):
            _jpeg(root / "jpegqual" / "30" / f"20{i}000.jpg", 200 + i)
            _jpeg(root / "crops" / "50" / f"20{i}000.jpg", 300 + i)
    return root


def test_copy_detection_scores_injected_features_by_the_protocol(tmp_path, monkeypatch, capsys):
    """Originals A B C; strong A1 -> [A, .], A2 -> [B, A], B1 -> [A, C] in the top 2: APs 1, 0.25, 0,
    strong mAP 0.416667. A distractor given A1's own feature, named as A's original, drops A1 to 0.25:
    it is in the database, never a positive."""
    root = tmp_path / "copydays"
    for name in ("100000", "110000", "120000"):
        _jpeg(root / "original" / f"{name}.jpg", 0)
    for name in ("100001", "100002", "110001"):
        _jpeg(root / "strong" / f"{name}.jpg", 0)
    _jpeg(tmp_path / "distractors" / "100000.png", 0)
    A, B, C, D = torch.eye(4)
    feats = {"original/100000": A, "original/110000": B, "original/120000": C, "strong/100001": A + 0.3 * D,
             "strong/100002": B + 0.9 * A, "strong/110001": A + 0.5 * C, "distractors/100000": A + 0.3 * D}

    def injected(backbone, paths, *args, **kwargs):
        return torch.stack([feats[os.path.join(*p.split(os.sep)[-2:]).split(".")[0]] for p in paths])
    monkeypatch.setattr(tools, "copy_detection_features", injected)
    result = tools.copy_detection(None, str(root), 32, "cpu", k=2)
    assert result["strong"] == pytest.approx(100 * 1.25 / 3) and result["original"] == 100
    assert "eval on strong mAP=0.417 (3 queries)" in capsys.readouterr().out
    result = tools.copy_detection(None, str(root), 32, "cpu", distractors=str(tmp_path / "distractors"), k=2)
    assert result["strong"] == pytest.approx(100 * 0.5 / 3)
    # the whole database ranked (k = 20 > its size): B1 finds B at rank 2, 1 / (2 x 3)
    assert tools.copy_detection(None, str(root), 32, "cpu")["strong"] == pytest.approx(100 * (1 + 0.25 + 1 / 6) / 3)


def test_whitening_whitens_and_does_not_depend_on_eigenvector_signs():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3  # correlated, off-centre
    mu, P = tools.learn_whitening(train)
    S = train.double().T @ train.double() / len(train)  # uncentred, as DINO's
    assert torch.allclose(P.double() @ S @ P.double().T, torch.eye(6, dtype=torch.float64), atol=1e-4)
    assert torch.allclose(mu, train.mean(0))
    x = torch.randn(10, 6, generator=g)
    sim = lambda P: F.normalize((x - mu) @ P.T, dim=1) @ F.normalize((x - mu) @ P.T, dim=1).T  # noqa: E731
    flipped = P.clone()
    flipped[2] *= -1  # an eigenvector's sign is arbitrary
    assert torch.allclose(sim(P), sim(flipped), atol=1e-5)
    # fewer images than dimensions still whiten the directions they span (the eigenvalue floor)
    mu, P = tools.learn_whitening(train[:3])
    assert torch.isfinite(P).all()


def test_copydays_and_retrieval_commands_run_end_to_end_with_a_real_backbone(tmp_path, capsys):
    torch.manual_seed(0)
    vit = pw.vit("vit_tiny", patch_size=8, depth=1, img_size=32)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    weights = ["--pretrained", str(tmp_path / "vit.pth"), "--arch", "vit_tiny", "--patch_size", "8", "--depth", "1"]
    root = _copydays(tmp_path / "copydays")
    for i, ext in enumerate(("jpg", "png", "JPEG", "webp")):  # distractors of mixed extensions
        _jpeg(tmp_path / "distractors" / f"d{i}.{ext}", 400 + i, size=(50, 20))
    for i in range(12):
        _jpeg(tmp_path / "whitening" / f"w{i}.jpg", 500 + i)
    r = tools.main(["--copydays", str(root), "--distractors", str(tmp_path / "distractors"), "--whitening",
                    str(tmp_path / "whitening"), "--imsize", "40"] + weights)
    out = capsys.readouterr().out
    assert set(r) == {"original", "strong", "jpegqual/30", "crops/50"} and r["original"] == 100
    assert "eval on strong mAP=" in out and "16 Copydays blocks absent, skipped: jpegqual/3" in out
    for features in ("cls", "pixels"):
        assert 0 <= tools.main(["--copydays", str(root), "--features", features] + weights)["strong"] <= 100
    assert tools.main(["--copydays", str(root), "--features", "pixels"])["strong"] >= 0  # pixels need no weights
    # the features: [CLS, GeM of the final-norm patch tokens], DINO's, from the square resize
    pil = TF.pil_to_tensor(Image.open(root / "strong" / "200001.jpg").convert("RGB").resize((40, 40), Image.BICUBIC))
    x = F.interpolate(pw.load_image(root / "strong" / "200001.jpg")[None], (40, 40), mode="bicubic", antialias=True)
    assert (x[0].int() - pil.int()).abs().max() <= 2  # PIL's bicubic, as DINO resizes, to its rounding
    x = pw.imagenet_normalize(x.float() / 255)
    with torch.no_grad():
        tokens = vit.eval()(x)
        gem = F.avg_pool2d(tokens[:, 1:].reshape(1, 5, 5, -1).permute(0, 3, 1, 2).clamp(min=1e-6).pow(4), 5).pow(0.25)
        got = tools.copy_detection_features(vit, [str(root / "strong" / "200001.jpg")], 40, "cpu")
    assert torch.allclose(got, torch.cat([tokens[:, 0], gem.flatten(1)], 1), atol=1e-5)

    # revisited Oxford: a query whose easy is empty, non-square images, sides not multiples of the patch
    data = tmp_path / "revisited" / "roxford5k"
    names = [f"db{i}" for i in range(6)]
    for i, name in enumerate(names + ["q0", "q1"]):
        _jpeg(data / "jpg" / f"{name}.jpg", 600 + i, size=(45 + 7 * i, 37 + 3 * i))
    gnd = [dict(bbx=[3.0, 2.0, 30.5, 25.0], easy=[0], hard=[1, 2], junk=[3]),
           dict(bbx=[0.0, 0.0, 20.0, 20.0], easy=[], hard=np.array([4]), junk=[])]
    with open(data / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(dict(imlist=names, qimlist=["q0", "q1"], gnd=gnd), f)
    for extra in ([], ["--multiscale"], ["--query_crop"]):
        r = tools.main(["--retrieval", str(tmp_path / "revisited"), "--dataset", "roxford5k", "--imsize", "52"]
                       + weights + extra)
        out = capsys.readouterr().out
        assert all(0 <= r[f"map_{p}"] <= 100 for p in "EMH") and len(r["mp_M"]) == 3
        assert ">> roxford5k: mAP E:" in out and ("cropped to their bbx" in out) == ("--query_crop" in extra)
    # DINO's feature: thumbnail (LANCZOS) to 52, the CLS after the final norm, L2-normalised
    img = Image.open(data / "jpg" / "db5.jpg").convert("RGB")
    img.thumbnail((52, 52), Image.Resampling.LANCZOS)
    with torch.no_grad():
        want = F.normalize(vit(pw.imagenet_normalize(TF.pil_to_tensor(img)[None].float() / 255))[0, 0], dim=0)
        got = tools.retrieval_feature(vit, str(data / "jpg" / "db5.jpg"), 52, "cpu")
    assert img.size == (52, 34) and torch.allclose(got, want, atol=1e-5)  # a 6 x 4 grid, remainders dropped


def test_retrieval_ranks_by_the_protocols(tmp_path, monkeypatch, capsys):
    """Features that rank [easy, hard, junk, negatives]: Hard AP 1 (easy is junk there), Medium 1."""
    data = tmp_path / "rparis6k"
    names = [f"db{i}" for i in range(5)]
    for name in names + ["q"]:
        _jpeg(data / "jpg" / f"{name}.jpg", 0)
    with open(data / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump(dict(imlist=names, qimlist=["q"], gnd=[dict(bbx=[0, 0, 5, 5], easy=[3], hard=[1], junk=[4])]), f)
    score = {"db3": 0.9, "db1": 0.8, "db4": 0.7, "db0": 0.2, "db2": 0.1, "q": 1.0}

    def injected(backbone, path, *args):
        s = score[os.path.basename(path)[:-4]]
        return F.normalize(torch.tensor([s, (1 - s * s) ** 0.5]), dim=0)
    monkeypatch.setattr(tools, "retrieval_feature", injected)
    r = tools.image_retrieval(None, str(tmp_path), "rparis6k", 32, "cpu")
    assert r["map_H"] == 100 and r["map_M"] == 100 and r["map_E"] == 100 and r["mp_M"] == [100, 100, 100]


def test_downstream_mistakes_are_one_line_and_nothing_falls_back(tmp_path, capsys):
    root = _copydays(tmp_path / "copydays", levels=False)
    weights = ["--arch", "vit_tiny", "--patch_size", "8", "--depth", "1"]

    def error(argv):
        with pytest.raises(SystemExit) as e:
            tools.main(argv + weights)
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1, lines
        return lines[0]
    assert "does not exist; point --pretrained" in error(["--copydays", str(root), "--pretrained", str(tmp_path / "no.pth")])
    assert "checkpoint.pth does not exist" in error(["--copydays", str(root), "--output_dir", str(tmp_path / "none")])
    assert "--copydays" in error(["--copydays", str(tmp_path / "absent"), "--random_init"])
    assert "no original/*.jpg" in error(["--copydays", str(tmp_path), "--random_init"])
    _jpeg(root / "strong" / "209901.jpg", 7)  # a strong copy without its original
    assert "209901.jpg has no original 2099" in error(["--copydays", str(root), "--random_init"])
    os.remove(root / "strong" / "209901.jpg")
    _jpeg(root / "jpegqual" / "3" / "200000.jpg", 7)  # a level with fewer copies than originals
    assert "jpegqual/3 has 1 images, original/ 4" in error(["--copydays", str(root), "--random_init"])
    os.remove(root / "jpegqual" / "3" / "200000.jpg")
    (root / "strong" / "203001.jpg").write_bytes(b"not an image")
    assert "cannot read 1 image(s), such as" in error(["--copydays", str(root), "--random_init"])
    os.makedirs(tmp_path / "empty")
    assert "no images in --distractors" in error(["--copydays", str(root), "--random_init", "--distractors",
                                                  str(tmp_path / "empty")])
    assert "gnd_roxford5k.pkl does not exist" in error(["--retrieval", str(tmp_path), "--random_init"])
    os.makedirs(tmp_path / "roxford5k" / "jpg")
    with open(tmp_path / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(dict(imlist=["a"], qimlist=["b"], gnd=[dict(bbx=[0, 0, 1, 1], easy=[0], hard=[], junk=[])]), f)
    assert "2 images of" in error(["--retrieval", str(tmp_path), "--random_init"])


def test_random_init_is_the_teacher_a_run_starts_from():
    args = pw.resolve_args(TINY + ["--seed", "3"])
    backbone, _ = tools.backbone_from_args(args, random_init=True)
    _, teacher, _, _ = pw.build_models(args, torch.device("cpu"), 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), teacher.backbone.state_dict().values()))


def test_make_copy_set_writes_copydays_layout_deterministically(tmp_path, capsys):
    images = [(TF.pil_to_tensor(_photo(48, 40, seed=i)), 0) for i in range(12)]  # (image, label), as a dataset
    assert tools.make_copy_set(images, tmp_path / "a", seed=5, n_originals=4) == (4, 8, 8)
    tools.make_copy_set(images, tmp_path / "b", seed=5, n_originals=4)
    files = sorted(os.listdir(tmp_path / "a" / "copydays" / "strong"))
    assert files == [f"{1000 + i}{c:02d}.jpg" for i in range(4) for c in (1, 2)]
    for sub in ("copydays/original", "copydays/strong", "distractors"):
        for name in os.listdir(tmp_path / "a" / sub):
            assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes()
    # a copy is an altered crop of its original, not the original
    orig = np.asarray(Image.open(tmp_path / "a" / "copydays" / "original" / "100000.jpg"), dtype=float)
    copy = np.asarray(Image.open(tmp_path / "a" / "copydays" / "strong" / "100001.jpg"), dtype=float)
    assert orig.shape == copy.shape and np.abs(orig - copy).mean() > 10
    # the command: from --data's val images, evaluated by --copydays
    n, copies, rest = tools.main(["--make_copy_set", str(tmp_path / "c")] + TINY)
    assert (n, copies, rest) == (20, 40, 20)
    r = tools.main(["--copydays", str(tmp_path / "c" / "copydays"), "--distractors", str(tmp_path / "c" / "distractors"),
                    "--random_init"] + TINY)
    assert r["original"] == 100 and 0 < r["strong"] <= 100
    # an image folder's val/ of every mode, one file unreadable: named, left out, the rest written
    _write_image_folder(tmp_path / "folder")
    (tmp_path / "folder" / "val" / "dog" / "5.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert tools.main(["--make_copy_set", str(tmp_path / "d"), "--data", "folder", "--data_path",
                       str(tmp_path / "folder")]) == (6, 12, 5)
    assert "unreadable image" in capsys.readouterr().err and len(os.listdir(tmp_path / "d" / "distractors")) == 5


# ------------------------------------------------------------------------------------------------
# The first hour on a GPU node, rehearsed on the CPU: each runs.sh experiment at its preset's real
# geometry and model, a few iterations on a stand-in of its data; bf16; two nodes
# ------------------------------------------------------------------------------------------------

def _jpegs(folder, n, seed):
    """n JPEGs of assorted sizes and modes, as ImageNet's are."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        w, h = ((500, 375), (320, 480), (1024, 683), (160, 90))[(seed + i) % 4]
        img = _photo(w, h, seed * 7 + i)
        (img.convert("L") if (seed + i) % 5 == 0 else img).save(os.path.join(folder, f"{i}.JPEG"), quality=85)


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """An ImageNet-1K root: the 100 CMC classes among others, a train and a val image each."""
    root = tmp_path_factory.mktemp("imagenet")
    for c, name in enumerate(list(pw.IMAGENET100_CLASSES) + ["n01440764", "n01443537", "n15075141"]):
        for split in ("train", "val"):
            _jpegs(root / split / name, 1, c)
    return root


def _few_training_images(monkeypatch, n):
    """A few iterations of a preset: its training split cut to n images spread over its classes."""
    real = pw.build_datasets

    def few(*args, **kwargs):
        train, val, num_classes = real(*args, **kwargs)
        return torch.utils.data.Subset(train, range(0, len(train), len(train) // n)[:n]), val, num_classes
    monkeypatch.setattr(pw, "build_datasets", few)


def _rehearse(argv, out, geometry):
    """Run the preset with a batch of 2 (the rest untouched), evaluate, and check what ran."""
    results = pw.main(argv + ["--batch_size", "2", "--epochs", "1", "--no_initial_knn", "--output_dir", str(out)])
    log = json.loads(open(out / "log.txt").read())
    assert math.isfinite(log["train_loss"]) and log["train_loss_patch"] > 0
    assert math.isfinite(results["knn_top1_k20"]) and 0 <= results["linear_top1"] <= 100
    args = torch.load(out / "checkpoint.pth", weights_only=True)["args"]
    assert tuple(args[k] for k in ("arch", "patch_size", "global_size", "local_size", "n_local", "out_dim")) == geometry
    return args


VIT_S16 = ("vit_small", 16, 224, 96, 8, 8192)


@pytest.mark.parametrize("data", ["in100", "in1k"])
def test_imagenet_presets_train_and_evaluate_at_their_real_geometry(data, imagenet_root, tmp_path, monkeypatch, capsys):
    _few_training_images(monkeypatch, 4)
    args = _rehearse(["--data", data, "--data_path", str(imagenet_root)], tmp_path, VIT_S16)
    said = capsys.readouterr().out
    # the preset's 10 warm-up epochs do not fit a 1-epoch run: scaled, and said so
    assert args["warmup_epochs"] == 0.1 and "warm-up scaled to a tenth of the run" in said


def _cifar10_stand_in(root):
    """CIFAR-10's python layout (rows of 3 x 32 x 32 bytes) with 10 train and 10 test images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 10)]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "labels": list(rng.integers(0, 10, n))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class {i}" for i in range(10)]}, f)


# The real files' checksums are fixed: the stand-ins pass torchvision's check by existing.
CIFAR10_STAND_IN_CHECK = "lambda path, md5=None: os.path.isfile(path)"


def test_cifar10_preset_trains_through_torchvisions_loader(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar
    _cifar10_stand_in(tmp_path / "cifar10")
    monkeypatch.setattr(cifar, "check_integrity", eval(CIFAR10_STAND_IN_CHECK))
    _rehearse(["--data", "cifar10", "--data_path", str(tmp_path / "cifar10"), "--download"], tmp_path / "out",
              ("vit_small", 4, 32, 16, 8, 4096))


# Trains and evaluates each run of argv (a JSON list) with data workers started by a start method
# that this machine's Python does not use by default: spawn (macOS, Windows), forkserver (3.14).
START_METHOD = """
import json, multiprocessing, os, sys
sys.path.insert(0, {here!r})
import torchvision.datasets.cifar
torchvision.datasets.cifar.check_integrity = {check}
import patchwise
if __name__ == "__main__":  # a spawned worker imports this file again: it must not train
    multiprocessing.set_start_method(sys.argv[1], force=True)
    for argv in json.loads(sys.argv[2]):
        patchwise.main(argv)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_every_dataset_trains_and_evaluates_with_workers_under_spawn_and_forkserver(method, imagenet_root, tmp_path):
    _cifar10_stand_in(tmp_path / "cifar10")
    _write_image_folder(tmp_path / "folder")
    small = ["--arch", "vit_tiny", "--depth", "1", "--patch_size", "8", "--global_size", "32", "--local_size", "16",
             "--n_local", "2", "--out_dim", "64", "--head_hidden_dim", "32", "--bottleneck_dim", "16",
             "--batch_size", "4", "--epochs", "1", "--num_workers", "1", "--knn_k", "3", "--linear_iters", "10",
             "--no_initial_knn", "--device", "cpu"]
    runs = {"synthetic": ["--synthetic_size", "32", "16"], "cifar10": ["--data_path", str(tmp_path / "cifar10")],
            "folder": ["--data_path", str(tmp_path / "folder")], "in100": ["--data_path", str(imagenet_root)]}
    argv = [["--data", data, "--output_dir", str(tmp_path / data)] + extra + small for data, extra in runs.items()]
    script = tmp_path / "start_method.py"
    script.write_text(START_METHOD.format(here=HERE, check=CIFAR10_STAND_IN_CHECK))
    r = _run([str(script), method, json.dumps(argv)], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for data in runs:
        log = json.loads(open(tmp_path / data / "log.txt").read())
        assert math.isfinite(log["train_loss"]) and 0 <= log["knn_top1_k3"] <= 100 and "linear_top1" in log, data


def test_a_folder_of_large_photos_gets_the_imagenet_recipe_and_trains(tmp_path):
    for split in ("train", "val"):
        for c in range(3):
            _jpegs(tmp_path / "photos" / split / f"class{c}", 2, c)
    _rehearse(["--data", "folder", "--data_path", str(tmp_path / "photos")], tmp_path / "out", VIT_S16)


def test_a_bf16_autocast_step_stays_finite_and_close_to_float32():
    batches, got = _synthetic_batches(2), {}
    for amp in (None, torch.bfloat16):  # the CPU's bf16 autocast standing in for CUDA's
        student, teacher, loss_fn, opt = _tiny_models(256, 2, 64, 32)
        out = torch.stack([pw.train_step(student, teacher, loss_fn, opt, b, epoch=0, lr=1e-3, wd=0.04,
                                         momentum=0.9, patch_size=8, amp_dtype=amp) for b in batches])
        got[amp] = (out, loss_fn.center_cls.clone(), loss_fn.center_patch.clone())
    (f32, c32, p32), (bf, cbf, pbf) = got[None], got[torch.bfloat16]
    assert all(t.isfinite().all() for t in (bf, cbf, pbf))
    # loss and entropies (nats, ln 256 = 5.5) to bf16's precision; centres to a small part of their size
    assert (bf - f32).abs().max() < 0.05, (bf, f32)
    for a, b in ((cbf, c32), (pbf, p32)):
        assert (a - b).norm() < 0.05 * b.norm(), ((a - b).norm(), b.norm())


def test_under_autocast_the_teacher_runs_in_float16_and_the_student_in_the_runs_dtype():
    # bf16 rounds a logit near 1 by up to 0.004, 0.1 after the teacher's division by 0.04: targets
    # ~65x further (KL) from float32's than fp16's, DINO's precision (docs/experiments.md)
    (batch,), dtypes = _synthetic_batches(1), {}
    student, teacher, loss_fn, opt = _tiny_models(64, 1, 32, 16)
    for name, model in (("teacher", teacher), ("student", student)):
        model.head.register_forward_hook(lambda m, i, out, name=name: dtypes.update({name: out.dtype}) and None)
    out = pw.train_step(student, teacher, loss_fn, opt, batch, epoch=0, lr=1e-3, wd=0.04, momentum=0.9,
                        patch_size=8, amp_dtype=torch.bfloat16)
    assert dtypes == {"teacher": torch.float16, "student": torch.bfloat16} and out.isfinite().all()


def test_runs_sh_two_node_launch_gives_the_teacher_of_one_process(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    launch = {}
    for rank in (0, 1):  # runs.sh's own launch line for NNODES=2, one process per node
        env = {**os.environ, "NNODES": "2", "NGPUS": "1", "NODE_RANK": str(rank), "RDZV_ENDPOINT": f"localhost:{port}"}
        line = subprocess.run(["bash", "runs.sh", "--dry-run", "cifar10"], cwd=HERE, env=env, capture_output=True,
                              text=True, check=True).stdout.splitlines()[1]  # after the export
        words = line.split()
        assert words[0] == "torchrun" and "--rdzv_backend=c10d" in words
        launch[rank] = [sys.executable, "-m", "torch.distributed.run"] + words[1:words.index("patchwise.py") + 1]
    run = TINY + ["--synthetic_size", "64", "20", "--epochs", "1", "--log_every", "1", "--no_initial_knn",
                  "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(launch[r] + run + ["--output_dir", str(tmp_path / "two")], cwd=HERE, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), outs[0][1][-3000:] + outs[1][1][-3000:]
    assert "on 2 process(es)" in outs[0][0]
    one = _run(["patchwise.py"] + run + ["--output_dir", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    assert len(_losses(outs[0][0])) == len(_losses(one.stdout)) == 4
    _assert_same_teacher(tmp_path / "one" / "checkpoint.pth", tmp_path / "two" / "checkpoint.pth")


# ------------------------------------------------------------------------------------------------
# Sizes that cannot fit, memory that runs out, the last bad inputs, what the log says
# ------------------------------------------------------------------------------------------------

def test_sizes_out_of_range_or_of_no_batch_are_refused_in_one_line(capsys, tmp_path):
    out = ["--output_dir", str(tmp_path)]
    for argv, words in (
            (["--n_local", "100000"], "--n_local: 100000 is out of range: it takes 0 to 32"),
            (["--depth", "1000000"], "--depth: 1000000 is out of range: it takes 1 to 256"),
            (["--batch_size", str(10 ** 12)], f"fewer than one batch of {10 ** 12}"),
            (["--out_dim", str(10 ** 30)], "out of range"), (["--global_size", str(10 ** 12)], "out of range"),
            (["--synthetic_size", "1000000", "10"], "out of range"), (["--seed", str(2 ** 64)], "64 bits"),
            (["--depth", str(10 ** 400)], "out of range"), (["--epochs", str(10 ** 400)], "out of range")):
        with pytest.raises(SystemExit) as stop:
            pw.main(argv + out)
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and words in lines[0], (argv, lines)
    assert not os.path.exists(tmp_path / "checkpoint.pth")


def test_running_out_of_memory_ends_in_one_line_naming_the_stage_its_sizes_and_the_checkpoint(tmp_path, monkeypatch, capsys):
    real_step = pw.train_step
    calls = []

    def step_then_oom(*args, **kwargs):
        calls.append(1)
        if len(calls) > 6:  # the second epoch (6 iterations an epoch): a checkpoint is saved
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(*args, **kwargs)
    monkeypatch.setattr(pw, "train_step", step_then_oom)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        pw.main(TINY + ["--epochs", "2", "--no_initial_knn", "--output_dir", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    for words in ("out of GPU memory during a training step", "--batch_size 16", "--n_local 2", "--global_size 32",
                  "--out_dim 64", "--head_hidden_dim 32", f"the same command goes on from {out / 'checkpoint.pth'}"):
        assert words in lines[0], (words, lines[0])
    monkeypatch.setattr(pw, "train_step", real_step)

    def no_memory(*args, **kwargs):  # the host's allocator, as torch words it
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    for where, words in (("extract_features", "out of host memory during the teacher's evaluation"),
                         ("build_encoder", "out of host memory during building the model")):
        monkeypatch.setattr(pw, where, no_memory)
        with pytest.raises(SystemExit):
            pw.main(TINY + ["--epochs", "1", "--output_dir", str(tmp_path / where)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and words in lines[0] and "nothing was saved" in lines[0], lines
        monkeypatch.undo()
    # any other error is not called a memory error
    monkeypatch.setattr(pw, "train_step", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        pw.main(TINY + ["--epochs", "1", "--no_initial_knn", "--output_dir", str(tmp_path / "other")])


def test_paths_of_the_wrong_kind_are_named_for_every_path_flag(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    for script, argv, words in (
            ("patchwise.py", ["--data", "folder", "--data_path", str(a_file)], f"--data_path {a_file} is a file"),
            ("patchwise.py", ["--data", "cifar10", "--data_path", str(a_file)], f"--data_path {a_file} is a file"),
            ("patchwise.py", ["--output_dir", str(a_file)], f"--output_dir {a_file} is a file; it takes a folder"),
            ("patchwise.py", ["--pretrained", str(tmp_path)], f"--pretrained {tmp_path} is a folder; it takes a file"),
            ("patchwise_tools.py", ["--show_matching", str(tmp_path), "--out", "x.png"], "--show_matching"),
            ("patchwise_tools.py", ["--show_attention", str(a_file), "--out", str(tmp_path)], "--out"),
            ("patchwise_tools.py", ["--export_backbone", str(tmp_path)], "is a folder; it takes a file")):
        _assert_one_line_error(_run([script] + argv, timeout=120), words)


def test_the_log_says_the_recipe_that_runs_and_a_slow_rate(tmp_path, monkeypatch, capsys):
    _write_image_folder(tmp_path / "small", n_per_class=25, sizes=((30, 26),))
    args = pw.resolve_args(["--data", "folder", "--data_path", str(tmp_path / "small"), "--epochs", "80",
                            "--global_size", "48"])
    assert "80 epochs of 50 images, about 4000 samples" in args.notes[0] and "at 48/16 px" in args.notes[0]
    # the preset's warm-up is scaled to a run shorter than it (and said so); the user's is kept
    args = pw.resolve_args(["--data", "in100", "--epochs", "2"])
    assert args.warmup_epochs == 0.2 and any("warm-up scaled to a tenth of the run" in n for n in args.notes)
    args = pw.resolve_args(["--data", "in100", "--epochs", "2", "--warmup_epochs", "5"])
    assert args.warmup_epochs == 5 and not any("warm-up" in note for note in args.notes)
    assert pw.resolve_args(["--data", "in100", "--epochs", "20"]).warmup_epochs == 10
    # a machine slower than an image a second says how slow, not "0 img/s"
    clock = iter(range(0, 10 ** 7, 100))  # every reading of the clock 100 s after the last
    monkeypatch.setattr(pw.time, "time", lambda: next(clock))
    pw.main(TINY + ["--epochs", "1", "--no_initial_knn", "--linear_iters", "0", "--output_dir", str(tmp_path / "run")])
    import re
    rates = re.findall(r"  (\S+) img/s", capsys.readouterr().out)
    assert rates and all(0 < float(r) < 1 for r in rates), rates


# ------------------------------------------------------------------------------------------------
# The first cluster run: what only several ranks, nodes, launchers and GPUs show, with stand-ins
# ------------------------------------------------------------------------------------------------

def test_a_rank_that_sees_another_checkpoint_stops_the_run_in_one_line_naming_it(tmp_path):
    out = tmp_path / "out"
    pw.main(TINY + ["--epochs", "1", "--no_initial_knn", "--output_dir", str(out)])
    # rank 1's node has its own, empty, output folder: it would start a new run beside rank 0's
    r = _run_with_one_rank_alone(tmp_path, "own_output_dir", 1, TINY + [
        "--epochs", "2", "--no_initial_knn", "--device", "cpu", "--output_dir", str(out)])
    lines = [line for line in r.stderr.splitlines() if line.startswith("patchwise: error:")]
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    assert f"rank 1 sees no checkpoint in {out}, rank 0 epoch 1, iteration 0" in lines[0]
    assert "on a filesystem every node sees" in lines[0] and "epoch 2/2" not in r.stdout


# Run as two processes at once: CIFAR-10 through torchvision's CIFAR10(download=True), its fetch
# replaced by one that writes the archive at a network's pace and checks it, as torchvision does.
DOWNLOAD = """
import os, sys, tarfile, time
sys.path.insert(0, {here!r})
import torchvision.datasets.cifar as cifar
cifar.check_integrity = {check}
def fetch(url, root, filename, md5):
    with open({fetches!r}, "a") as f:
        f.write("fetched\\n")
    data, path = open({archive!r}, "rb").read(), os.path.join(root, filename)
    os.makedirs(root, exist_ok=True)
    with open(path, "wb") as f:
        for i in range(0, len(data), len(data) // 40 + 1):
            f.write(data[i:i + len(data) // 40 + 1])
            f.flush()
            time.sleep(0.05)
    if open(path, "rb").read() != data:  # torchvision's checksum of the downloaded file
        raise RuntimeError("File not found or corrupted.")
    with tarfile.open(path) as t:
        t.extractall(root)
cifar.download_and_extract_archive = fetch
import patchwise as pw
open({ready!r} + sys.argv[1], "w").close()  # both start fetching together
while not all(os.path.exists({ready!r} + s) for s in "01"):
    time.sleep(0.01)
train, val, classes = pw.build_datasets("cifar10", {root!r}, download=True)
print(len(train), len(val), classes)
"""


def test_ranks_that_download_cifar10_together_take_turns_and_fetch_it_once(tmp_path):
    import tarfile
    _cifar10_stand_in(tmp_path / "source")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as t:
        t.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    script = tmp_path / "download.py"
    script.write_text(DOWNLOAD.format(here=HERE, check=CIFAR10_STAND_IN_CHECK, fetches=str(tmp_path / "fetches"),
                                      archive=str(tmp_path / "cifar-10-python.tar.gz"), ready=str(tmp_path / "ready"),
                                      root=str(tmp_path / "cifar10")))
    procs = [subprocess.Popen([sys.executable, str(script), str(i)], cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    assert [o[0].split()[-3:] for o in outs] == [["10", "10", "10"]] * 2  # sizes: train, val, classes
    assert (tmp_path / "fetches").read_text().count("fetched") == 1


def test_val_labels_are_train_labels_whatever_class_folders_val_holds(tmp_path):
    root = tmp_path / "data"
    for split, classes in (("train", ("ant", "bee", "cat")), ("val", ("bee", "cat"))):
        for c in classes:
            os.makedirs(root / split / c)
            for i in range(2):
                _photo(16, 16, i).save(root / split / c / f"{i}.png")
    train, val, num_classes = pw.build_datasets("folder", str(root))
    assert num_classes == 3 and val.classes == train.classes
    name = {label: c for c, label in train.class_to_idx.items()}
    assert len(val) == 4 and all(os.path.basename(os.path.dirname(p)) == name[y] for p, y in val.samples)
    # a class that train/ lacks would have no label of train's: one line names it
    os.makedirs(root / "val" / "dog")
    _photo(16, 16).save(root / "val" / "dog" / "0.png")
    with pytest.raises(pw.UserError, match=r"has classes that train/ lacks \(dog\)"):
        pw.build_datasets("folder", str(root))


def test_small_images_are_evaluated_whole_and_large_ones_as_dinos_centre_crop():
    small = TF.pil_to_tensor(_photo(32, 32, 1))
    assert torch.equal(pw.EvalDataset([(small, 0)], 32)[0][0], small)  # CIFAR-10's 32 px
    chelsea = Image.open(os.path.join(HERE, "figures", "chelsea.png")).convert("RGB")  # a photo: see the views' test
    for w, h in ((300, 200), (200, 301), (517, 375)):  # DINO's transforms on PIL, to PIL's bicubic's rounding
        large = chelsea.resize((w, h), Image.BICUBIC)
        dino = TF.pil_to_tensor(TF.center_crop(TF.resize(large, 256, interpolation=TF.InterpolationMode.BICUBIC), 224))
        got = pw.EvalDataset([(TF.pil_to_tensor(large), 0)], 224)[0][0]
        assert got.shape == (3, 224, 224) and (got.int() - dino.int()).abs().max() <= 2


def test_workers_are_divided_among_ranks_only_when_the_ranks_share_their_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    # (cores this rank may use, workers of 10 asked for): all 64 shared by 8 ranks, 8 of its own
    # (SLURM's --cpus-per-task 8), 4 of its own, 32 shared by the 8
    for cores, workers in ((64, 8), (8, 8), (4, 4), (32, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert pw.resolve_args(["--num_workers", "10"]).num_workers == workers, cores


def test_the_precision_follows_the_gpu_bf16_where_it_is_native_else_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for capability, dtype in (((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16),
                              ((9, 0), torch.bfloat16)):  # V100, T4: fp16 with a GradScaler; A100, H100: bf16
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert pw.start_run(pw.resolve_args(["--device", "cuda"]))[4] == dtype, capability
    assert pw.start_run(pw.resolve_args(["--device", "cpu"]))[4] is None


def test_runs_sh_expands_no_array_that_can_be_empty_which_bash_before_4_4_refuses_under_set_u():
    import re
    text = "\n".join(line for line in open(os.path.join(HERE, "runs.sh")) if not line.startswith("#"))
    assert "set -euo pipefail" in text
    for name in set(re.findall(r'"\$\{(\w+)\[@\]\}"', text)):
        values = re.findall(rf"\b{name}=\((.*?)\)", text)
        # every assignment holds a word of its own, not only expansions that may be empty ("$@")
        assert values and all(any(not w.startswith(('"$', "$")) for w in v.split()) for v in values), name


def test_an_fp16_step_unscales_before_the_clip_skips_an_overflow_and_otherwise_follows_float32():
    # the CPU's fp16 autocast standing in for a V100's; the gradients as AdamW receives them
    (batch,) = _synthetic_batches(1)
    grads, scales = {}, {}
    for name, amp, scale in (("float32", None, None), ("fp16", torch.float16, 2.0 ** 8),
                             ("overflow", torch.float16, 2.0 ** 16)):
        student, teacher, loss_fn, opt = _tiny_models(256, 2, 64, 32)
        before = [p.detach().clone() for p in student.parameters()]
        grads[name] = []

        def step_seeing_the_gradients(*args, real_step=opt.step, seen=grads[name], **kwargs):
            seen.extend(p.grad.clone() for p in student.parameters() if p.grad is not None)
            return real_step(*args, **kwargs)
        opt.step = step_seeing_the_gradients
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        pw.train_step(student, teacher, loss_fn, opt, batch, epoch=0, lr=1e-3, wd=0.04, momentum=0.9, patch_size=8,
                      clip_grad=0.01, amp_dtype=amp, scaler=scaler)  # a clip that acts on every parameter
        scales[name] = scaler and scaler.get_scale()
        if name == "overflow":  # fp16 gradients at 2^16 overflow here: the step is skipped, the scale halved
            assert grads[name] == [] and all(torch.equal(p, b) for p, b in zip(student.parameters(), before))
    assert scales["overflow"] == 2.0 ** 15 and scales["fp16"] == 2.0 ** 8
    assert len(grads["fp16"]) == len(grads["float32"]) > 0
    for a, b in zip(grads["fp16"], grads["float32"]):  # unscaled, then clipped: float32's to fp16's rounding
        assert (a - b).norm() <= 0.02 * b.norm() + 1e-12, ((a - b).norm(), b.norm())


def test_ci_tests_the_oldest_torch_and_torchvision_that_requirements_allow():
    import re
    floors = dict(re.findall(r"^(torch|torchvision)>=([\d.]+)$", open(os.path.join(HERE, "requirements.txt")).read(), re.M))
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    for name, floor in floors.items():  # a patch release of the floor: torch>=2.4 -> torch==2.4.1
        assert re.search(rf"\b{name}=={re.escape(floor)}\.\d+\b", ci), (name, floor)
    assert set(floors) == {"torch", "torchvision"}
